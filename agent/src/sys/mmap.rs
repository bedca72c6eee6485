//! Memory-mappable BPF arrays (`BPF_F_MMAPABLE`) mapped into this process: the kernel
//! programs and stoker then share the memory itself, with no system call per access.
use std::os::fd::{AsFd, AsRawFd};

use crate::error::{Error, Result, one_line};

/// A shared read-write mapping of all of a BPF array's values, unmapped on drop. The
/// mapping keeps the map alive on its own.
pub struct MappedArray {
    ptr: *mut u8,
    len: usize,
    entries: u32,
}

// Plain shared memory: what is read or written through it is up to its users, who use
// atomics or volatile accesses.
unsafe impl Send for MappedArray {}

impl MappedArray {
    /// Maps every value of the array map `map` (`name` for errors), its size as the kernel
    /// reports it (values are 8-byte aligned).
    pub fn new(map: &aya::maps::Map, name: &str) -> Result<Self> {
        let aya::maps::Map::Array(data) = map else {
            return Err(Error::Ebpf { what: "kernel map has the wrong type", detail: name.into() });
        };
        let info = data.info().map_err(|e| Error::Ebpf {
            what: "cannot read a kernel map's size",
            detail: format!("{name}: {}", one_line(&e)),
        })?;
        let entries = info.max_entries();
        let len = entries as usize * (info.value_size() as usize).next_multiple_of(8);
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a new shared mapping of a file descriptor; the kernel checks `len` against
        // the map's size.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Ebpf {
                what: "cannot map a kernel map into memory",
                detail: format!("{name}: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(Self { ptr: ptr.cast(), len, entries })
    }

    /// The mapping's first byte, the first value's; all values are valid while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// How many values the array holds.
    pub fn entries(&self) -> u32 {
        self.entries
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used past `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// How many CPU ids the kernel may use: the highest possible CPU plus one (ids can have
/// gaps, so this can exceed the number of CPUs).
pub fn possible_cpu_ids() -> Result<u32> {
    const PATH: &str = "/sys/devices/system/cpu/possible";
    let text = std::fs::read_to_string(PATH)
        .map_err(|e| Error::Ebpf { what: "cannot list possible CPUs", detail: format!("{PATH}: {e}") })?;
    max_cpu_id(&text)
        .map(|id| id + 1)
        .ok_or_else(|| Error::Ebpf { what: "cannot list possible CPUs", detail: format!("{PATH}: {text:?}") })
}

/// The highest online CPU id plus one: programs run only on online CPUs (one brought
/// online later has no region in a map sized by this, and its events are counted as lost).
pub fn online_cpu_ids() -> Option<u32> {
    max_cpu_id(&std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?).map(|id| id + 1)
}

/// The highest id in a kernel CPU list such as `0-3,8-11`.
fn max_cpu_id(list: &str) -> Option<u32> {
    list.trim()
        .split([',', '-'])
        .map(|n| n.parse::<u32>().ok())
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_lists() {
        assert_eq!(max_cpu_id("0\n"), Some(0));
        assert_eq!(max_cpu_id("0-1\n"), Some(1));
        assert_eq!(max_cpu_id("0-3,8-11\n"), Some(11));
        assert_eq!(max_cpu_id(""), None);
        assert!(possible_cpu_ids().unwrap() >= 1);
    }
}
