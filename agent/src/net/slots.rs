//! The kernel programs' table of followed connections (`MAP_NET_CONN_SLOTS`), mapped into
//! stoker: connections a process had open before the session are added to it, and those of
//! a process that exited are freed, in place and with the programs' own protocol (a slot's
//! key word changes only by compare-and-exchange).
use std::sync::atomic::{AtomicU64, Ordering};

use agent_ebpf::{
    MAP_NET_CONN_SLOTS, NET_CONN_PROBES, NET_SLOT_BUSY, NET_SLOT_FREE, NetConn, NetConnSlot, conn_slot,
};

use crate::{
    error::{Error, Result},
    programs::KernelPrograms,
    sys::mmap::MappedArray,
};

/// `MAP_NET_CONN_SLOTS`, mapped.
pub struct ConnSlots {
    slots: MappedArray,
}

impl ConnSlots {
    /// Maps the table of the loaded programs.
    pub fn map(programs: &mut KernelPrograms) -> Result<Self> {
        let map = programs
            .ebpf_mut()
            .map(MAP_NET_CONN_SLOTS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_NET_CONN_SLOTS.into() })?;
        Ok(Self { slots: MappedArray::new(map, MAP_NET_CONN_SLOTS)? })
    }

    /// Slot `i`: its key word and its state.
    fn slot(&self, i: u32) -> (&AtomicU64, *mut NetConn) {
        assert!(i < self.slots.entries(), "slot {i} of {}", self.slots.entries());
        // SAFETY: element `i` of the mapped array (checked above), whose values are
        // `NetConnSlot`s, 8-byte aligned with nothing between them (the size is a multiple
        // of 8), valid while `self` lives. The key word changes only atomically (here, and
        // in the programs: compare-and-exchange, and the store of its key by the one that
        // took the slot), so it is used as an atomic.
        unsafe {
            let slot = self.slots.as_ptr().cast::<NetConnSlot>().add(i as usize);
            (AtomicU64::from_ptr(std::ptr::addr_of_mut!((*slot).key)), std::ptr::addr_of_mut!((*slot).conn))
        }
    }

    /// Adds connection `key` (tgid << 32 | fd) with state `conn`, unless it is followed
    /// already; whether it did (false also when its slots are all taken).
    pub fn add(&self, key: u64, conn: &NetConn) -> bool {
        let probes = || (0..NET_CONN_PROBES).map(|p| self.slot(conn_slot(key, p)));
        if probes().any(|(k, _)| k.load(Ordering::Acquire) == key) {
            return false;
        }
        for (k, c) in probes() {
            if k.compare_exchange(NET_SLOT_FREE, NET_SLOT_BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                // SAFETY: the slot's state, which nobody else writes while its key says busy.
                unsafe { c.write_volatile(*conn) };
                k.store(key, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Frees the slots of process `pid`, the path of a request under way cleared (no
    /// request's bytes stay in the map); returns their keys and sockets (`NetConn::sk`).
    pub fn free_process(&self, pid: u32) -> Vec<(u64, u64)> {
        let mut freed = Vec::new();
        for i in 0..self.slots.entries() {
            let (k, c) = self.slot(i);
            let key = k.load(Ordering::Acquire);
            if key == NET_SLOT_FREE || key == NET_SLOT_BUSY || (key >> 32) as u32 != pid {
                continue;
            }
            if k.compare_exchange(key, NET_SLOT_BUSY, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            // SAFETY: the slot's state, which nobody else writes while its key says busy.
            let sk = unsafe {
                std::ptr::addr_of_mut!((*c).path).write_volatile([0; agent_ebpf::NET_PATH_LEN]);
                std::ptr::addr_of!((*c).sk).read_volatile()
            };
            k.store(NET_SLOT_FREE, Ordering::Release);
            freed.push((key, sk));
        }
        freed
    }
}
