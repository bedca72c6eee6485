//! Effective capabilities of this process, read from /proc/self/status.
use std::fs;

pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
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
}
