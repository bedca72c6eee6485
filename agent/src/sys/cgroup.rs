//! A process's CPU and memory limits and pressure from its cgroup, on cgroup v1 (the
//! `cpu`, `cpuacct` and `memory` controllers) and v2 (the unified hierarchy): CPU quota,
//! periods throttled and time throttled, usage, pressure, memory use, peak, limit, anon and
//! file pages, OOM kills. Paths are those of /proc/PID/cgroup under /sys/fs/cgroup, as the
//! reader's own cgroup namespace sees them.
use std::{collections::HashMap, fs, path::PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// What a cgroup says at one moment. Counters are cumulative since the cgroup was made;
/// a field is None where this cgroup version or its configuration does not have it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupStats {
    /// 1 or 2.
    pub version: u8,
    /// The cgroup's path in its hierarchy (the `cpu` controller's on v1).
    pub path: String,
    /// CPU quota in CPUs (quota / period); None when unlimited.
    pub cpu_quota: Option<f64>,
    /// Length of a quota period in seconds.
    pub cpu_period: Option<f64>,
    /// CPU time used by the cgroup's processes, seconds.
    pub cpu_usage: Option<f64>,
    pub periods: Option<u64>,
    pub throttled_periods: Option<u64>,
    /// Seconds the cgroup's processes were kept off the CPU by the quota.
    pub throttled_time: Option<f64>,
    pub cpu_pressure: Option<Pressure>,
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    /// None when unlimited.
    pub memory_limit: Option<u64>,
    pub memory_anon: Option<u64>,
    pub memory_file: Option<u64>,
    pub oom_kills: Option<u64>,
    pub memory_pressure: Option<Pressure>,
}

/// Pressure stall information (v2 `cpu.pressure`, `memory.pressure`): the share of the
/// last 10 s some / all tasks stalled, and total stalled seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub some_avg10: f64,
    pub some_total: f64,
    pub full_avg10: f64,
    pub full_total: f64,
}

/// Where a process's cgroup files are: found once, read again later (after the process
/// exited, its cgroup's counters still are there).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cgroup {
    V1 { path: String, cpu: PathBuf, cpuacct: Option<PathBuf>, memory: Option<PathBuf> },
    V2 { path: String, dir: PathBuf },
}

impl Cgroup {
    /// The cgroup of process `pid`; None when it has no readable cgroup.
    pub fn of(pid: u32) -> Option<Self> {
        let paths = parse_proc_cgroup(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?);
        // v1 when the process is in a mounted v1 `cpu` hierarchy; else v2.
        if let Some(path) = paths.v1.get("cpu")
            && let Some(cpu) = v1_dir("cpu", path)
        {
            return Some(Self::V1 {
                path: path.clone(),
                cpu,
                // Its usage only where it is this same cgroup (a separately mounted
                // cpuacct may hold the process in its root: the whole machine's usage).
                cpuacct: paths.v1.get("cpuacct").filter(|p| *p == path).and_then(|p| v1_dir("cpuacct", p)),
                memory: paths.v1.get("memory").and_then(|p| v1_dir("memory", p)),
            });
        }
        let path = paths.v2?;
        let dir = [PathBuf::from(ROOT), PathBuf::from(ROOT).join("unified")]
            .into_iter()
            .map(|root| root.join(path.trim_start_matches('/')))
            .find(|d| d.join("cgroup.procs").exists())?;
        Some(Self::V2 { path, dir })
    }

    /// True for the root of its hierarchy.
    pub fn is_root(&self) -> bool {
        match self {
            Self::V1 { path, .. } | Self::V2 { path, .. } => path == "/",
        }
    }

    /// The memory it uses now (one file: cheap enough to read often).
    pub fn memory_current(&self) -> Option<u64> {
        match self {
            Self::V1 { memory, .. } => number(file(memory.as_ref()?, "memory.usage_in_bytes")),
            Self::V2 { dir, .. } => number(file(dir, "memory.current")),
        }
    }

    /// What its files say now.
    pub fn read(&self) -> CgroupStats {
        match self {
            Self::V1 { path, cpu, cpuacct, memory } => read_v1(path, cpu, cpuacct.as_ref(), memory.as_ref()),
            Self::V2 { path, dir } => read_v2(path, dir),
        }
    }
}

/// A process's cgroup paths: per v1 controller, and the v2 one (`0::path`).
#[derive(Debug, Default, PartialEq)]
struct ProcCgroup {
    v1: HashMap<String, String>,
    v2: Option<String>,
}

fn parse_proc_cgroup(text: &str) -> ProcCgroup {
    let mut out = ProcCgroup::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            out.v2 = Some(path.to_string());
        } else {
            for c in controllers.split(',') {
                out.v1.insert(c.to_string(), path.to_string());
            }
        }
    }
    out
}

/// The directory of v1 `controller`'s cgroup `path`, where the controller is mounted
/// (`/sys/fs/cgroup/cpu`, or a combined mount such as `cpu,cpuacct`).
fn v1_dir(controller: &str, path: &str) -> Option<PathBuf> {
    let mount = fs::read_dir(ROOT).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.split(',').any(|c| c == controller))
    })?;
    let dir = mount.join(path.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

fn file(dir: &std::path::Path, name: &str) -> Option<String> {
    fs::read_to_string(dir.join(name)).ok()
}

fn number(text: Option<String>) -> Option<u64> {
    text?.trim().parse().ok()
}

fn read_v1(
    path: &str,
    cpu: &std::path::Path,
    acct: Option<&PathBuf>,
    memory: Option<&PathBuf>,
) -> CgroupStats {
    let quota: Option<i64> = file(cpu, "cpu.cfs_quota_us").and_then(|t| t.trim().parse().ok());
    let period = number(file(cpu, "cpu.cfs_period_us"));
    let stat = file(cpu, "cpu.stat").map(|t| keyed(&t)).unwrap_or_default();
    let mut s = CgroupStats {
        version: 1,
        path: path.to_string(),
        cpu_quota: match (quota, period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
            _ => None,
        },
        cpu_period: period.map(|p| p as f64 / 1e6),
        cpu_usage: acct.and_then(|d| number(file(d, "cpuacct.usage"))).map(|ns| ns as f64 / 1e9),
        periods: stat.get("nr_periods").copied(),
        throttled_periods: stat.get("nr_throttled").copied(),
        throttled_time: stat.get("throttled_time").map(|ns| *ns as f64 / 1e9),
        ..Default::default()
    };
    if let Some(dir) = memory {
        s.memory_current = number(file(dir, "memory.usage_in_bytes"));
        s.memory_peak = number(file(dir, "memory.max_usage_in_bytes"));
        // v1 says "no limit" with the largest page-aligned value.
        s.memory_limit = number(file(dir, "memory.limit_in_bytes")).filter(|l| *l < (1 << 62));
        let stat = file(dir, "memory.stat").map(|t| keyed(&t)).unwrap_or_default();
        s.memory_anon = stat.get("total_rss").or(stat.get("rss")).copied();
        s.memory_file = stat.get("total_cache").or(stat.get("cache")).copied();
        s.oom_kills = file(dir, "memory.oom_control").and_then(|t| keyed(&t).get("oom_kill").copied());
    }
    s
}

fn read_v2(path: &str, dir: &std::path::Path) -> CgroupStats {
    let (quota, period) = file(dir, "cpu.max").map_or((None, None), |t| parse_cpu_max(&t));
    let stat = file(dir, "cpu.stat").map(|t| keyed(&t)).unwrap_or_default();
    let memory = file(dir, "memory.stat").map(|t| keyed(&t)).unwrap_or_default();
    let events = file(dir, "memory.events").map(|t| keyed(&t)).unwrap_or_default();
    CgroupStats {
        version: 2,
        path: path.to_string(),
        cpu_quota: quota,
        cpu_period: period,
        cpu_usage: stat.get("usage_usec").map(|us| *us as f64 / 1e6),
        periods: stat.get("nr_periods").copied(),
        throttled_periods: stat.get("nr_throttled").copied(),
        throttled_time: stat.get("throttled_usec").map(|us| *us as f64 / 1e6),
        cpu_pressure: file(dir, "cpu.pressure").and_then(|t| parse_pressure(&t)),
        memory_current: number(file(dir, "memory.current")),
        memory_peak: number(file(dir, "memory.peak")),
        memory_limit: file(dir, "memory.max").and_then(|t| t.trim().parse().ok()),
        memory_anon: memory.get("anon").copied(),
        memory_file: memory.get("file").copied(),
        oom_kills: events.get("oom_kill").copied(),
        memory_pressure: file(dir, "memory.pressure").and_then(|t| parse_pressure(&t)),
    }
}

/// `key value` lines (cpu.stat, memory.stat, memory.events, memory.oom_control).
fn keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// v2 `cpu.max`: `max 100000` or `50000 100000` -> (quota in CPUs, period in seconds).
fn parse_cpu_max(text: &str) -> (Option<f64>, Option<f64>) {
    let mut parts = text.split_whitespace();
    let quota = parts.next();
    let period: Option<f64> = parts.next().and_then(|p| p.parse().ok());
    let quota = match (quota.and_then(|q| q.parse::<f64>().ok()), period) {
        (Some(q), Some(p)) if p > 0.0 => Some(q / p),
        _ => None,
    };
    (quota, period.map(|p| p / 1e6))
}

/// `some avg10=1.50 avg60=0.80 avg300=0.20 total=123456` and a `full` line.
fn parse_pressure(text: &str) -> Option<Pressure> {
    let mut p = Pressure::default();
    let mut any = false;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let kind = fields.next()?;
        let mut avg10 = 0.0;
        let mut total = 0.0;
        for field in fields {
            match field.split_once('=') {
                Some(("avg10", v)) => avg10 = v.parse().ok()?,
                Some(("total", v)) => total = v.parse::<f64>().ok()? / 1e6,
                _ => {}
            }
        }
        match kind {
            "some" => (p.some_avg10, p.some_total) = (avg10, total),
            "full" => (p.full_avg10, p.full_total) = (avg10, total),
            _ => continue,
        }
        any = true;
    }
    any.then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cgroup_v1_and_v2_lines() {
        let text =
            "12:cpu,cpuacct:/kubepods/pod1/abc\n4:memory:/kubepods/pod1/abc\n1:name=systemd:/x\n0::/\n";
        let p = parse_proc_cgroup(text);
        assert_eq!(p.v1.get("cpu").map(String::as_str), Some("/kubepods/pod1/abc"));
        assert_eq!(p.v1.get("cpuacct").map(String::as_str), Some("/kubepods/pod1/abc"));
        assert_eq!(p.v1.get("memory").map(String::as_str), Some("/kubepods/pod1/abc"));
        assert_eq!(p.v2.as_deref(), Some("/"));
        let v2 = parse_proc_cgroup("0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-1.scope\n");
        assert!(v2.v1.is_empty());
        assert_eq!(v2.v2.as_deref(), Some("/kubepods.slice/kubepods-burstable.slice/cri-containerd-1.scope"));
    }

    /// Files as a v2 kernel writes them (recorded from a cgroup with `cpu.max` 50000 100000
    /// and `memory.max` 256 MiB).
    #[test]
    fn v2_files() {
        let dir = std::env::temp_dir().join(format!("stoker-cgroup-v2-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let files = [
            ("cpu.max", "50000 100000\n"),
            (
                "cpu.stat",
                "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 60\nnr_throttled 45\nthrottled_usec 3100000\nnr_bursts 0\nburst_usec 0\n",
            ),
            (
                "cpu.pressure",
                "some avg10=42.50 avg60=20.10 avg300=5.00 total=3200000\nfull avg10=40.00 avg60=19.00 avg300=4.50 total=3100000\n",
            ),
            ("memory.current", "73400320\n"),
            ("memory.peak", "90177536\n"),
            ("memory.max", "268435456\n"),
            ("memory.stat", "anon 52428800\nfile 20971520\nkernel 1048576\n"),
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n"),
            (
                "memory.pressure",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=1000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=500\n",
            ),
        ];
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        let s = read_v2("/pod/c", &dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s.version, 2);
        assert_eq!(s.cpu_quota, Some(0.5));
        assert_eq!(s.cpu_period, Some(0.1));
        assert_eq!(s.cpu_usage, Some(2.5));
        assert_eq!((s.periods, s.throttled_periods), (Some(60), Some(45)));
        assert_eq!(s.throttled_time, Some(3.1));
        assert_eq!(s.cpu_pressure.map(|p| (p.some_avg10, p.full_total)), Some((42.5, 3.1)));
        assert_eq!(
            (s.memory_current, s.memory_peak, s.memory_limit),
            (Some(73400320), Some(90177536), Some(268435456))
        );
        assert_eq!((s.memory_anon, s.memory_file, s.oom_kills), (Some(52428800), Some(20971520), Some(1)));
        assert!(s.memory_pressure.is_some());
    }

    #[test]
    fn unlimited_v2_quota_and_memory() {
        assert_eq!(parse_cpu_max("max 100000\n"), (None, Some(0.1)));
        assert_eq!("max".parse::<u64>().ok(), None);
        assert_eq!(parse_pressure("nonsense"), None);
    }
}
