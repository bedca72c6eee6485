//! Capabilities of this process: the effective set read from /proc/self/status, and
//! dropping those not needed once the kernel programs are loaded.
use std::{fs, io};

pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_NICE: u32 = 23;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The effective capability set as a bit mask (0 when it cannot be read).
pub fn effective() -> u64 {
    fs::read_to_string("/proc/self/status").ok().and_then(|s| parse_cap_eff(&s)).unwrap_or(0)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

pub fn has(mask: u64, cap: u32) -> bool {
    mask & (1 << cap) != 0
}

/// Loading BPF programs and opening system-wide perf events: CAP_BPF + CAP_PERFMON,
/// or CAP_SYS_ADMIN on its own.
pub fn can_sample(mask: u64) -> bool {
    has(mask, CAP_SYS_ADMIN) || (has(mask, CAP_BPF) && has(mask, CAP_PERFMON))
}

/// What the agent needs once its programs are loaded and attached: reading other processes'
/// maps, memory and files (`/proc/PID/root/...`), which may belong to other users.
pub const AFTER_LOAD: [u32; 3] = [CAP_SYS_PTRACE, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH];

/// Whether using maps through open descriptors needs no capability: Linux 6.5 moved the
/// `bpf()` permission checks from every command to map creation and program loading.
pub fn maps_usable_without_caps() -> bool {
    fs::read_to_string("/proc/sys/kernel/osrelease").ok().and_then(|r| parse_release(&r)) >= Some((6, 5))
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit halves.
const VERSION_3: u32 = 0x2008_0522;

/// Keeps only the capabilities in `keep` (of those held) in the effective, permitted and
/// inheritable sets of the calling thread, and clears the ambient set; returns the mask of
/// capabilities dropped. Capabilities are per thread: call this before starting threads.
pub fn keep_only(keep: &[u32]) -> io::Result<u64> {
    let mut header = CapHeader { version: VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are the layout capget(2) takes for version 3 (two data slots).
    if unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let keep_mask = keep.iter().fold(0u64, |m, &c| m | 1 << c);
    let join = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
    let permitted = join(data[0].permitted, data[1].permitted);
    let held = permitted | join(data[0].effective, data[1].effective);
    let dropped = held & !keep_mask;
    for (i, half) in data.iter_mut().enumerate() {
        let mask = (keep_mask >> (32 * i)) as u32;
        half.effective &= mask;
        half.permitted &= mask;
        half.inheritable &= mask;
    }
    // SAFETY: as above; capset(2) reads the same layout.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments only. Fails on kernels without ambient sets.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    Ok(dropped)
}

/// Names of the capabilities in `mask` that stoker knows of, for logs.
pub fn names(mask: u64) -> Vec<String> {
    (0..64u32)
        .filter(|&c| has(mask, c))
        .map(|c| match c {
            CAP_DAC_OVERRIDE => "CAP_DAC_OVERRIDE".to_string(),
            CAP_DAC_READ_SEARCH => "CAP_DAC_READ_SEARCH".to_string(),
            CAP_SYS_PTRACE => "CAP_SYS_PTRACE".to_string(),
            CAP_SYS_ADMIN => "CAP_SYS_ADMIN".to_string(),
            CAP_PERFMON => "CAP_PERFMON".to_string(),
            CAP_BPF => "CAP_BPF".to_string(),
            c => format!("capability {c}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let mask = parse_cap_eff(status).unwrap();
        assert!(has(mask, CAP_BPF) && has(mask, CAP_PERFMON) && has(mask, CAP_SYS_PTRACE));
        assert!(can_sample(mask));
        let perfmon_only = 1u64 << CAP_PERFMON;
        assert!(!can_sample(perfmon_only));
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0"), Some((5, 15)));
        assert!(parse_release("6.4.0").unwrap() < (6, 5));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn keep_only_drops_the_rest_in_the_calling_thread() {
        if !has(effective(), CAP_BPF) {
            return; // needs root: nothing to drop
        }
        // A thread of its own: capabilities are per thread and the test harness's stay.
        std::thread::spawn(|| {
            let dropped = keep_only(&[CAP_SYS_PTRACE]).unwrap();
            assert!(has(dropped, CAP_BPF) && !has(dropped, CAP_SYS_PTRACE), "dropped {:?}", names(dropped));
            let status = fs::read_to_string("/proc/thread-self/status").unwrap();
            assert_eq!(parse_cap_eff(&status), Some(1 << CAP_SYS_PTRACE));
        })
        .join()
        .unwrap();
        assert!(has(effective(), CAP_BPF), "another thread's drop reached this one");
    }
}
