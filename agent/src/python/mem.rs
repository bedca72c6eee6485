//! Reads another process's memory with process_vm_readv: no ptrace stop, no pause of the
//! target. Used to read code objects and strings when symbolizing Python frames.
use std::io;

/// Memory of a process, as the code-object and `_Py_DebugOffsets` readers see it: the
/// live process (`Memory`) or, in tests and fuzzing, bytes standing in for it.
pub trait ReadMemory {
    /// Fills `buf` from `addr`; a short read is an error.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;

    fn bytes(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    fn u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn u32(&self, addr: u64) -> io::Result<u32> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn i64(&self, addr: u64) -> io::Result<i64> {
        self.u64(addr).map(|v| v as i64)
    }
}

/// The memory of one process.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pid: i32,
}

impl Memory {
    pub fn new(pid: u32) -> Self {
        Self { pid: pid as i32 }
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }
}

impl ReadMemory for Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: both iovecs describe valid memory of the stated lengths (ours is `buf`;
        // the remote one is checked by the kernel).
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read of process memory"));
        }
        Ok(())
    }
}

/// Bytes standing in for a process's memory: `bytes` at `base`, nothing elsewhere.
#[cfg(any(test, feature = "fuzzing"))]
pub struct Image<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

#[cfg(any(test, feature = "fuzzing"))]
impl ReadMemory for Image<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let fault = || io::Error::new(io::ErrorKind::InvalidInput, "address not in the image");
        let start = usize::try_from(addr.checked_sub(self.base).ok_or_else(fault)?).map_err(|_| fault())?;
        let end = start.checked_add(buf.len()).ok_or_else(fault)?;
        buf.copy_from_slice(self.bytes.get(start..end).ok_or_else(fault)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_rejects_bad_addresses() {
        let value: u64 = 0x1122_3344_5566_7788;
        let mem = Memory::new(std::process::id());
        assert_eq!(mem.u64(&value as *const u64 as u64).unwrap(), value);
        assert!(mem.u64(8).is_err(), "address 8 is never mapped");
    }
}
