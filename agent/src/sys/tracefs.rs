//! Finds tracefs and mounts it when it is missing (tracepoints need it to be looked up).
use std::{ffi::CString, io, path::Path};

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Returns the tracefs mount point, mounting it at /sys/kernel/tracing if needed.
/// The bool is true when this call mounted it.
pub fn ensure_mounted() -> io::Result<(&'static str, bool)> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok((dir, false));
        }
    }
    let target = CString::new(TRACEFS).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    let source = CString::new("nodev").expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((TRACEFS, true))
}
