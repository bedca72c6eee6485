//! The kernel's bitmaps of ids (`TARGET_BITS`, `OFF_PENDING`, `OFF_FAST_PROCS`), mapped into
//! this process: bits are set and cleared with atomic operations on the memory the kernel
//! programs read, so a bit the kernel sets (for a followed child, a process whose thread
//! turned fast) is never lost to a concurrent update from here.
use std::sync::atomic::{AtomicU64, Ordering};

use agent_ebpf::MAP_TARGET_BITS;

use crate::{error::Result, sys::mmap::MappedArray};

pub(super) struct TargetBits(MappedArray);

impl TargetBits {
    pub(super) fn map(map: &aya::maps::Map) -> Result<Self> {
        Self::map_named(map, MAP_TARGET_BITS)
    }

    /// Another bitmap of the same shape (`OFF_PENDING`, `OFF_FAST_PROCS`).
    pub(super) fn map_named(map: &aya::maps::Map, name: &str) -> Result<Self> {
        MappedArray::new(map, name).map(Self)
    }

    /// The word holding `pid`'s bit, and the bit.
    fn word(&self, pid: u32) -> Option<(&AtomicU64, u64)> {
        let index = (pid / 64) as usize;
        if index >= self.0.entries() as usize {
            return None;
        }
        // SAFETY: in bounds of the mapping (8-byte aligned, page-aligned start), which lives
        // as long as `self`; every access to it is atomic.
        let word = unsafe { AtomicU64::from_ptr(self.0.as_ptr().cast::<u64>().add(index)) };
        Some((word, 1 << (pid % 64)))
    }

    pub(super) fn set(&self, pid: u32) {
        if let Some((word, bit)) = self.word(pid) {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Clears `pid`'s bit; true when it was set.
    pub(super) fn take(&self, pid: u32) -> bool {
        self.word(pid).is_some_and(|(word, bit)| word.fetch_and(!bit, Ordering::Relaxed) & bit != 0)
    }

    pub(super) fn clear(&self, pid: u32) {
        if let Some((word, bit)) = self.word(pid) {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }
}
