//! `stoker doctor`: checks, one line each, whether this kernel and this process can do
//! what stoker needs, loading the real programs rather than guessing from versions.
use std::path::Path;

use aya::programs::ProgramType;

use crate::{
    error::one_line,
    programs::KernelPrograms,
    sys::{caps, tracefs},
};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Works without it, with less.
    Warn,
    /// Sampling cannot work.
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, level: Level, detail: impl Into<String>) -> Self {
        Self { name, level, detail: detail.into() }
    }

    pub fn render(&self) -> String {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        format!("{tag}  {:<16} {}", self.name, self.detail)
    }
}

/// Runs every check.
pub fn run() -> Vec<Check> {
    let mask = caps::effective();
    let mut checks = vec![capabilities(mask), ptrace(mask), realtime(), btf()];
    checks.extend(sampling());
    checks.push(tracepoints());
    checks.push(pmu("uprobes", "uprobe", Level::Warn, "needed for Python thread discovery hooks"));
    checks.push(pmu("kprobes", "kprobe", Level::Ok, "not needed: stoker uses tracepoints and perf events"));
    checks
}

/// True when every check that sampling depends on passed.
pub fn can_sample(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.level != Level::Fail)
}

fn capabilities(mask: u64) -> Check {
    let names = [
        (caps::CAP_BPF, "CAP_BPF"),
        (caps::CAP_PERFMON, "CAP_PERFMON"),
        (caps::CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (caps::CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (caps::CAP_SYS_NICE, "CAP_SYS_NICE"),
    ];
    let have: Vec<&str> = names.iter().filter(|(c, _)| caps::has(mask, *c)).map(|(_, n)| *n).collect();
    let have = if have.is_empty() { "none".to_string() } else { have.join(", ") };
    if caps::can_sample(mask) {
        Check::new("capabilities", Level::Ok, format!("effective: {have}"))
    } else {
        Check::new(
            "capabilities",
            Level::Fail,
            format!("effective: {have}; sampling needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"),
        )
    }
}

fn ptrace(mask: u64) -> Check {
    if caps::has(mask, caps::CAP_SYS_PTRACE) {
        Check::new("process memory", Level::Ok, "CAP_SYS_PTRACE: can read other processes' maps and memory")
    } else {
        Check::new(
            "process memory",
            Level::Warn,
            "no CAP_SYS_PTRACE: only processes of this user can be symbolized",
        )
    }
}

/// Whether a thread can take the real-time priority the wall-clock sampler runs at (tried
/// in a thread of its own that then ends).
fn realtime() -> Check {
    let tried =
        std::thread::Builder::new().spawn(crate::programs::wall::realtime).ok().and_then(|t| t.join().ok());
    match tried {
        Some(Ok(())) => Check::new(
            "sampler priority",
            Level::Ok,
            "real-time: the wall-clock sampler (--mode wall, off-cpu) samples on time while the CPUs are busy",
        ),
        Some(Err(e)) => Check::new(
            "sampler priority",
            Level::Warn,
            format!("{e}: the wall-clock sampler's samples come late while the CPUs are busy"),
        ),
        None => Check::new("sampler priority", Level::Warn, "could not start a thread to try it"),
    }
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    match path.metadata() {
        Ok(m) => Check::new("BTF", Level::Ok, format!("{} ({} KiB)", path.display(), m.len() / 1024)),
        Err(e) => Check::new("BTF", Level::Warn, format!("{}: {e}", path.display())),
    }
}

fn sampling() -> Vec<Check> {
    let mut kernel = match KernelPrograms::load(false) {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::new("eBPF programs", Level::Fail, one_line(&e))];
        }
    };
    let loaded = Check::new("eBPF programs", Level::Ok, "loaded; the verifier accepts stoker's kernel");
    let cpus = aya::util::online_cpus().map(|c| c.len()).unwrap_or(0);
    let perf = match kernel.start(99) {
        Ok(()) => Check::new("perf events", Level::Ok, format!("cpu-clock sampling attached on {cpus} CPUs")),
        Err(e) => Check::new("perf events", Level::Fail, one_line(&e)),
    };
    let execs = match kernel.watch_execs(true) {
        Ok(()) => Check::new(
            "new processes",
            Level::Ok,
            "sched:sched_process_exec attached: new processes are seen at exec",
        ),
        Err(e) => Check::new(
            "new processes",
            Level::Warn,
            format!("{}; the agent falls back to scanning /proc", one_line(&e)),
        ),
    };
    let net = match crate::net::NetTracer::attach(&mut kernel) {
        Ok(tracer) => Check::new(
            "network",
            Level::Ok,
            format!(
                "reads and writes at the {}, accept, connect and close at their system call exits, \
                 sock:inet_sock_set_state and tcp:tcp_retransmit_skb programs attached",
                tracer.data_calls()
            ),
        ),
        Err(e) => {
            Check::new("network", Level::Warn, format!("{}; network latency is unavailable", one_line(&e)))
        }
    };
    let mem = crate::programs::kernel_memory();
    let sizes = kernel.sizes();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let memory = Check::new(
        "kernel memory",
        Level::Ok,
        format!(
            "{:.1} MiB in {} maps and {:.1} MiB in {} programs, charged to stoker's memory cgroup. Of it, what grows with the CPUs: sample counts {} entries x {} possible CPUs ({:.1} MiB, capped by kernel.counts_max_bytes), network event ring for {} online CPUs ({:.1} MiB)",
            mib(mem.map_bytes),
            mem.maps,
            mib(mem.program_bytes),
            mem.programs,
            sizes.counts,
            sizes.possible_cpus,
            mib(sizes.counts_bytes()),
            sizes.event_cpus,
            mib(sizes.ring_bytes()),
        ),
    );
    vec![loaded, perf, execs, net, memory]
}

fn tracepoints() -> Check {
    let (dir, mounted) = match tracefs::ensure_mounted() {
        Ok(found) => found,
        Err(e) => {
            return Check::new(
                "tracepoints",
                Level::Warn,
                format!("tracefs not mounted and mounting failed: {e}"),
            );
        }
    };
    let supported = aya::sys::is_program_supported(ProgramType::TracePoint).unwrap_or(false);
    let has_sched = Path::new(dir).join("events/sched/sched_process_exec").is_dir();
    let how = if mounted { "mounted by stoker at" } else { "tracefs at" };
    if supported && has_sched {
        Check::new("tracepoints", Level::Ok, format!("{how} {dir}"))
    } else {
        Check::new(
            "tracepoints",
            Level::Warn,
            format!("{how} {dir}, but tracepoint programs are not supported"),
        )
    }
}

fn pmu(name: &'static str, pmu: &str, missing: Level, why: &str) -> Check {
    let path = format!("/sys/bus/event_source/devices/{pmu}/type");
    if Path::new(&path).exists() {
        Check::new(name, Level::Ok, "available")
    } else {
        Check::new(name, missing, format!("not available ({why})"))
    }
}
