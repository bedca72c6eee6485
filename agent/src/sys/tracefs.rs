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

/// True when the kernel has tracepoint `category/event` (tracefs lists it).
pub fn has_event(category: &str, event: &str) -> bool {
    ensure_mounted().is_ok_and(|(dir, _)| Path::new(dir).join("events").join(category).join(event).is_dir())
}

/// Offset of `field` in the record of tracepoint `category/event`, from its format file.
pub fn field_offset(category: &str, event: &str, field: &str) -> io::Result<u32> {
    let (dir, _) = ensure_mounted()?;
    let format =
        std::fs::read_to_string(Path::new(dir).join("events").join(category).join(event).join("format"))?;
    parse_field_offset(&format, field).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("tracepoint {category}/{event} has no field `{field}`"),
        )
    })
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
        if name != field {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_format_files() {
        let format = "name: task_newtask\nformat:\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
                      \tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n\
                      \tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n";
        assert_eq!(parse_field_offset(format, "pid"), Some(8));
        assert_eq!(parse_field_offset(format, "comm"), Some(12));
        assert_eq!(parse_field_offset(format, "clone_flags"), Some(32));
        assert_eq!(parse_field_offset(format, "missing"), None);
    }
}
