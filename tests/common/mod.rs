//! Helpers for the end-to-end tests: build native fixtures, run `stoker`, read its output.
#![allow(dead_code)]

pub mod agent;
pub mod k8s;
pub mod net;
pub mod workloads;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

pub const STOKER: &str = env!("CARGO_BIN_EXE_stoker");

/// The end-to-end tests load eBPF programs: they need root, and say so when they lack it.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end tests load eBPF programs into the kernel: run them as root"
    );
}

/// Whether a thread of this process may take the lowest real-time priority (`SCHED_FIFO`
/// 1), as stoker's wall-clock sampler does: root may not, in a cgroup with no real-time
/// time (`cpu.rt_runtime_us` 0 under `CONFIG_RT_GROUP_SCHED`). Tried in a thread that ends.
pub fn realtime_allowed() -> bool {
    std::thread::spawn(|| {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: sets the calling thread's policy; `param` is alive across the call.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
    })
    .join()
    .unwrap_or(false)
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A scratch directory unique to this test process and call.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles a C fixture with frame pointers and no optimisation (every function keeps
/// its frame, so frame-pointer unwinding sees each caller).
pub fn build_c(name: &str) -> PathBuf {
    let out = scratch("bin").join(name);
    let src = fixtures_dir().join(format!("{name}.c"));
    let status = Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc must be installed to build the test fixtures");
    assert!(status.success(), "compiling {} failed", src.display());
    out
}

pub fn spawn(program: &Path, args: &[&str]) -> Child {
    Command::new(program).args(args).stdout(Stdio::null()).spawn().expect("start fixture")
}

/// Runs `stoker` to completion.
pub fn stoker(args: &[&str]) -> Output {
    Command::new(STOKER).args(args).stdin(Stdio::null()).output().expect("run stoker")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// stoker's stderr, read on a thread: `wait_for` blocks until a line contains a text.
pub struct Stderr {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Stderr {
    pub fn of(child: &mut Child) -> Self {
        let err = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { rx, seen: Vec::new() }
    }

    pub fn wait_for(&mut self, text: &str) {
        while !self.seen.iter().any(|l| l.contains(text)) {
            match self.rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("stoker did not print `{text}` within 20 s: {:#?}", self.seen),
            }
        }
    }

    pub fn rest(mut self) -> String {
        self.seen.extend(self.rx.iter());
        self.seen.join("\n")
    }
}

/// Waits for `child` to exit (20 s at most).
pub fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `stoker record -f folded -o FOLDED ARGS...`.
pub fn record_folded(folded: &Path, args: &[&str]) -> Output {
    let mut all = vec!["record", "-f", "folded", "-o", folded.to_str().unwrap()];
    all.extend_from_slice(args);
    stoker(&all)
}

/// The CPU seconds a session's summary gives its (one) target, by the kernel's accounting.
pub fn summary_cpu_seconds(err: &str) -> f64 {
    let line = err.lines().find(|l| l.contains("the kernel's accounting")).unwrap_or_else(|| panic!("{err}"));
    line.rsplit("pid ").next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Asserts a failed run printed exactly one clear error line and no panic.
pub fn assert_one_line_error(out: &Output, expected: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic output: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("stoker: error: "), "unexpected error line: {err}");
    assert!(lines[0].contains(expected), "error line should mention `{expected}`: {err}");
}

/// A folded profile: stack (root to leaf) -> count.
pub struct Folded(pub HashMap<Vec<String>, u64>);

impl Folded {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut stacks = HashMap::new();
        for line in text.lines() {
            let (stack, count) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad folded line: {line}"));
            let count: u64 = count.parse().unwrap_or_else(|_| panic!("bad count in: {line}"));
            *stacks.entry(stack.split(';').map(String::from).collect()).or_default() += count;
        }
        Self(stacks)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Samples whose stack contains a frame satisfying `pred`.
    pub fn with_frame(&self, pred: impl Fn(&str) -> bool) -> u64 {
        self.0.iter().filter(|(s, _)| s.iter().any(|f| pred(f))).map(|(_, n)| n).sum()
    }

    pub fn stacks_with(&self, frame: &str) -> impl Iterator<Item = &Vec<String>> {
        self.0.keys().filter(move |s| s.iter().any(|f| f == frame))
    }
}

/// Samples per stack from `perf script`: each sample's list of symbol names, leaf first.
pub fn perf_samples(data: &Path) -> Vec<Vec<String>> {
    let out = Command::new("perf")
        .args(["script", "-F", "ip,sym", "-i"])
        .arg(data)
        .output()
        .expect("perf must be installed (cargo xtask setup installs linux-perf)");
    assert!(out.status.success(), "perf script failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\n\n")
        .map(|block| {
            block.lines().filter_map(|l| l.split_whitespace().nth(1)).map(String::from).collect::<Vec<_>>()
        })
        .filter(|s: &Vec<String>| !s.is_empty())
        .collect()
}

/// The CPython builds every Python test runs on: pyenv's 3.8-3.13 (shared libpython)
/// and Debian's statically linked /usr/bin/python3.11.
pub fn python(version: &str) -> PathBuf {
    let path = if version == "debian-3.11" {
        PathBuf::from("/usr/bin/python3.11")
    } else if let Some(sid) = version.strip_prefix("sid-") {
        // Debian unstable's builds, as `cargo xtask setup` unpacks them: `sid-3.14` (the
        // interpreter linked statically) or `sid-3.14-shared` (libpython3.14.so).
        let (minor, suffix) = sid.split_once('-').map_or((sid, ""), |(m, s)| (m, s));
        let suffix = if suffix.is_empty() { String::new() } else { format!("-{suffix}") };
        Path::new("/opt/stoker-pythons").join(minor).join(format!("usr/bin/python{minor}{suffix}"))
    } else {
        let root = std::env::var_os("PYENV_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").expect("HOME")).join(".pyenv"));
        let (minor, _) = version.rsplit_once('.').expect("version like 3.12.1");
        root.join("versions").join(version).join("bin").join(format!("python{minor}"))
    };
    assert!(
        path.is_file(),
        "CPython {version} is not installed at {} (cargo xtask setup installs it)",
        path.display()
    );
    path
}

pub fn workload() -> PathBuf {
    fixtures_dir().join("python/workload.py")
}

/// Line of the `# line: NAME` marker in the workload.
pub fn workload_line(name: &str) -> usize {
    let text = std::fs::read_to_string(workload()).unwrap();
    let marker = format!("# line: {name}");
    text.lines().position(|l| l.trim_end().ends_with(&marker)).unwrap_or_else(|| panic!("no marker {marker}"))
        + 1
}

/// The frame stoker shows for a workload function at its marked line.
pub fn workload_frame(function: &str, marker: &str) -> String {
    format!("{function} (workload.py:{})", workload_line(marker))
}

/// Decodes a gzipped pprof file with protobuf's own Python runtime (classes generated by
/// grpcio-tools' protoc from tests/fixtures/profile.proto) and returns its JSON summary
/// (tests/fixtures/pprof_decode.py): nothing is shared with stoker's encoder.
pub fn decode_pprof(pb: &Path) -> serde_json::Value {
    let python_has = |module: &str| {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        python_has("google.protobuf") && python_has("grpc_tools.protoc"),
        "decoding pprof needs Python's protobuf and grpcio-tools' protoc: \
         install them with `python3 -m pip install protobuf grpcio-tools` (cargo xtask setup does)"
    );
    let dir = scratch("pprof-decoder");
    let protoc = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(fixtures_dir())
        .arg(format!("--python_out={}", dir.display()))
        .arg(fixtures_dir().join("profile.proto"))
        .output()
        .expect("run python3 -m grpc_tools.protoc");
    assert!(protoc.status.success(), "protoc failed: {}", String::from_utf8_lossy(&protoc.stderr));
    let decoded = Command::new("python3")
        .arg(fixtures_dir().join("pprof_decode.py"))
        .arg(&dir)
        .arg(pb)
        .output()
        .expect("run the pprof decoder");
    assert!(
        decoded.status.success(),
        "decoding {} failed: {}",
        pb.display(),
        String::from_utf8_lossy(&decoded.stderr)
    );
    serde_json::from_slice(&decoded.stdout).expect("decoder prints JSON")
}

/// How far a sample count may stray from `expected` (CPU seconds x sampling rate) by
/// chance alone: every timer tick on a CPU lands in the measured work or not, so a count
/// varies at most as much as a Poisson count of the same mean (a process alone on its CPU
/// varies far less); 4 standard deviations leave about one false failure in 15,000 checks.
pub fn sampling_tolerance(expected: f64) -> f64 {
    4.0 * expected.sqrt()
}

/// Asserts `got` samples of work the workload measured as `cpu_seconds` of CPU time,
/// at `hz` samples a second, within the sampling tolerance.
pub fn assert_samples(what: &str, got: u64, cpu_seconds: f64, hz: f64) {
    assert_samples_stalled(what, got, cpu_seconds, 0.0, hz);
}

/// `assert_samples` for CPU time of which `stalled_seconds` passed in stalled calls (see
/// `measured_share`), which a sampler may not have seen: the count may lie anywhere from
/// the time without the stalls to the time with them, each within the sampling tolerance.
pub fn assert_samples_stalled(what: &str, got: u64, cpu_seconds: f64, stalled_seconds: f64, hz: f64) {
    let (low, high) = ((cpu_seconds - stalled_seconds) * hz, cpu_seconds * hz);
    let (low, high) = (low - sampling_tolerance(low), high + sampling_tolerance(high));
    let stalls = if stalled_seconds > 0.0 {
        format!(" ({:.1} ms of it stalled)", stalled_seconds * 1e3)
    } else {
        String::new()
    };
    eprintln!(
        "{what}: {got} samples, the workload's {cpu_seconds:.3} s of CPU{stalls} at {hz} Hz: {low:.1} to {high:.1}"
    );
    assert!(
        (low..=high).contains(&(got as f64)),
        "{what}: {got} samples; the workload measured {cpu_seconds:.3} s of CPU{stalls}, {low:.1} to {high:.1} samples at {hz} Hz"
    );
}

/// How far a share measured from `n` samples may stray from the true share `p` by chance
/// alone (4 binomial standard deviations).
pub fn share_tolerance(p: f64, n: u64) -> f64 {
    4.0 * (p * (1.0 - p) / n.max(1) as f64).sqrt()
}

/// The functions a `shares` workload times.
const SHARES_FUNCTIONS: [&str; 3] = ["func_a", "func_b", "func_c"];

/// CPU seconds a `shares` workload measured in `function`.
pub fn seconds_in(report: &serde_json::Value, function: &str) -> f64 {
    report_seconds(report, "seconds", function)
}

/// Seconds a `shares` workload spent in stalled calls of `function` (see `measured_share`).
pub fn stalled_in(report: &serde_json::Value, function: &str) -> f64 {
    report_seconds(report, "stalled_seconds", function)
}

/// Seconds a `shares` workload spent in stalled calls of func_a, func_b and func_c.
pub fn stalled_seconds(report: &serde_json::Value) -> f64 {
    SHARES_FUNCTIONS.iter().map(|f| stalled_in(report, f)).sum()
}

fn report_seconds(report: &serde_json::Value, key: &str, function: &str) -> f64 {
    report[key][function].as_f64().unwrap_or_else(|| panic!("no {key} for {function} in {report}"))
}

/// The share of `function` in the time a `shares` workload measured in func_a, func_b and
/// func_c (its `report`), and how far that share moves when the calls it saw stalled are
/// left out (`stalled_seconds`, see STALL_NS in workload.py): a sampled share may lie
/// anywhere between the two, as a stall's thread time may or may not have been sampled.
pub fn measured_share(report: &serde_json::Value, function: &str) -> (f64, f64) {
    let total: f64 = SHARES_FUNCTIONS.iter().map(|f| seconds_in(report, f)).sum();
    let stalled = stalled_seconds(report);
    let (spent, stalled_here) = (seconds_in(report, function), stalled_in(report, function));
    let share = spent / total;
    let unstalled = (spent - stalled_here) / (total - stalled);
    if stalled > 0.0 {
        eprintln!(
            "the workload saw {:.1} ms of stalled calls ({:.1} ms in {function}): {function}'s share is {share:.4} with them, {unstalled:.4} without",
            stalled * 1e3,
            stalled_here * 1e3
        );
    }
    (share, (share - unstalled).abs())
}

/// A v1 `cpu` cgroup made for a test, with a CPU quota; removed when dropped (its processes
/// must have ended).
pub struct QuotaCgroup {
    pub path: PathBuf,
    pub name: String,
}

impl QuotaCgroup {
    /// `/sys/fs/cgroup/cpu/<name>` with `quota_us` of CPU time per 100 ms period.
    pub fn new(name: &str, quota_us: u32) -> Self {
        let root = Path::new("/sys/fs/cgroup/cpu");
        assert!(
            root.join("cpu.cfs_quota_us").exists(),
            "this test needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu"
        );
        let name = format!("{name}-{}", std::process::id());
        let path = root.join(&name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(path.join("cpu.cfs_quota_us"), quota_us.to_string()).unwrap();
        Self { path, name }
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// `cpu.stat`: periods, throttled periods, throttled seconds.
    pub fn stat(&self) -> (u64, u64, f64) {
        let text = std::fs::read_to_string(self.path.join("cpu.stat")).unwrap();
        let get = |k: &str| -> u64 {
            text.lines().find_map(|l| l.strip_prefix(&format!("{k} "))).unwrap().trim().parse().unwrap()
        };
        (get("nr_periods"), get("nr_throttled"), get("throttled_time") as f64 / 1e9)
    }

    /// `cpu.stat` once the cgroup is idle: the kernel's period timer counts up to two periods
    /// after the last CPU use, so this reads until three periods pass without a change
    /// (10 s at most, then the last read).
    pub fn settled(&self) -> (u64, u64, f64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut stat = self.stat();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = self.stat();
            if now == stat || std::time::Instant::now() > deadline {
                return now;
            }
            stat = now;
        }
    }
}

impl Drop for QuotaCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// CPU time the hypervisor took from this VM's CPUs since boot (steal, all CPUs), seconds.
/// A thread current on a CPU the hypervisor took counts as running in CPU samples (their
/// clock runs on) but not in its own CPU time (the kernel leaves steal out), and its own wall
/// time less CPU time counts it as waiting: comparisons of the two allow for the steal during
/// the session.
pub fn steal_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: f64 = stat.lines().next().unwrap().split_whitespace().nth(8).unwrap().parse().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}
