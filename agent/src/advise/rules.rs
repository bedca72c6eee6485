//! The rules of `stoker advise`: what one session measured of a process (`Facts`) in,
//! findings with their evidence, action and numbers out. Pure arithmetic, so every rule is
//! tested on figures as well as end to end; thresholds and formulas are the README's.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::{k8s::pods::Resources, sys::cgroup::CgroupStats};

/// VPA's safety margin on its recommendations (recommender `--recommendation-margin-fraction`,
/// 0.15).
pub const MARGIN: f64 = 1.15;
/// Throttled periods over which the quota is the bottleneck (share of the session's periods).
pub const THROTTLED_PERIODS: f64 = 0.10;
/// Runnable but waiting for a CPU, as a share of the time the threads wanted a CPU.
pub const RUNQUEUE_SHARE: f64 = 0.20;
/// Waiting for the GIL, as a share of the time the threads wanted to run Python.
pub const GIL_SHARE: f64 = 0.30;
/// Using no more than this many CPUs: one interpreter at a time.
pub const GIL_ONE_CPU: f64 = 1.15;
/// Waiting on one peer, as a share of the threads' busy time (all but idle waits).
pub const UPSTREAM_SHARE: f64 = 0.50;
/// Waiting in the socket or accept queue, as a share of a request's time in the server.
pub const QUEUE_SHARE: f64 = 0.30;
/// ... and at least this long (ms, mean): a share of a sub-millisecond request is a
/// thread's wake-up, not requests waiting for a worker.
pub const QUEUE_MIN_MS: f64 = 1.0;
/// Requests an endpoint needs before its shares are trusted.
pub const MIN_REQUESTS: u64 = 10;
/// Responses held by Nagle's algorithm, as a share of an endpoint's requests.
pub const NAGLE_SHARE: f64 = 0.10;
/// Memory peak near its limit.
pub const MEMORY_NEAR: f64 = 0.90;
/// Memory peak far under its limit.
pub const MEMORY_FAR: f64 = 0.50;
/// CPU used far under the quota.
pub const CPU_FAR: f64 = 0.50;
/// CPU headroom left for more workers: used under this share of the CPUs available.
pub const CPU_HEADROOM: f64 = 0.70;
/// After an OOM kill, VPA raises memory by the larger of these.
pub const OOM_BUMP_BYTES: u64 = 100 << 20;
pub const OOM_BUMP_RATIO: f64 = 1.2;

const MIB: f64 = (1u64 << 20) as f64;

/// What one session measured of one process.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub pid: u32,
    pub service: String,
    pub elapsed_s: f64,
    /// CPU seconds the process used in the session (the kernel's accounting).
    pub cpu_s: Option<f64>,
    /// CPUs of the host.
    pub host_cpus: f64,
    pub cgroup: Option<CgroupFacts>,
    /// Seconds of thread time by state (`[running]`, `[runqueue]`, `[socket ADDR]`, ...).
    pub states: Vec<(String, f64)>,
    /// Blocked event-loop stretches: seconds and the function seen most in each.
    pub loop_blocks: Vec<(f64, String)>,
    pub servers: Vec<Server>,
    pub stalls: Vec<Stall>,
    /// The functions that used the most CPU: name and share of the samples.
    pub top: Vec<(String, f64)>,
    /// Peers the process connected to (`ADDR:PORT`): its upstreams. A wait on any other
    /// socket (a client of its own, between requests) is not an upstream's.
    pub upstreams: Vec<String>,
    /// Its children running the same program in its cgroup: a pre-fork server's workers.
    pub workers: u32,
    /// The requests and limits its pod spec declares (None: not known).
    pub declared: Option<Resources>,
    /// The highest resident set size seen of it: its memory where no cgroup gives one.
    pub rss_peak: Option<u64>,
    /// The 90th percentile of the CPUs its cgroup (without one, the process) used per
    /// interval, the newer intervals weighing more (the agent's window; None: the mean is
    /// all there is).
    pub cpu_p90: Option<f64>,
    /// The 90th percentile of its memory readings, weighted the same way.
    pub memory_p90: Option<u64>,
}

/// A server endpoint: requests, mean ms in the server (read to write), mean ms in all
/// (with the socket and accept queues; None when not measured).
#[derive(Debug, Clone, Default)]
pub struct Server {
    pub name: String,
    pub count: u64,
    pub own_ms: f64,
    pub total_ms: Option<f64>,
}

/// Requests of one endpoint that stalled for one cause, and the endpoint's requests.
#[derive(Debug, Clone, Default)]
pub struct Stall {
    pub side: &'static str,
    pub endpoint: String,
    pub cause: &'static str,
    pub count: u64,
    pub mean_ms: f64,
    pub requests: u64,
}

/// A cgroup over the session: limits, and what its counters grew by.
#[derive(Debug, Clone, Default)]
pub struct CgroupFacts {
    pub path: String,
    pub quota: Option<f64>,
    pub periods: u64,
    pub throttled_periods: u64,
    pub throttled_s: f64,
    /// CPU seconds all its processes used in the window (None: not counted).
    pub usage_s: Option<f64>,
    pub memory_peak: Option<u64>,
    pub memory_current: Option<u64>,
    pub memory_limit: Option<u64>,
    pub oom_kills: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    High,
    Medium,
    Low,
    Info,
}

/// One piece of advice.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub severity: Severity,
    /// What is wrong, in one sentence.
    pub title: String,
    /// The figures, stacks, endpoints and peers that show it.
    pub evidence: Vec<String>,
    /// What to change.
    pub action: String,
    /// The figures the action is computed from, and the computation (`math`).
    pub numbers: BTreeMap<&'static str, serde_json::Value>,
}

impl Finding {
    fn new(rule: &'static str, severity: Severity, title: String, action: String) -> Self {
        Self { rule, severity, title, evidence: Vec::new(), action, numbers: BTreeMap::new() }
    }

    fn num(mut self, key: &'static str, v: f64) -> Self {
        self.numbers.insert(key, serde_json::json!(round3(v)));
        self
    }

    fn math(mut self, math: String) -> Self {
        self.numbers.insert("math", serde_json::Value::String(math));
        self
    }

    fn evidence(mut self, line: String) -> Self {
        self.evidence.push(line);
        self
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Up to the next tenth of a CPU.
fn cpus_up(v: f64) -> f64 {
    (v * 10.0).ceil().max(1.0) / 10.0
}

/// Up to the next MiB, in MiB.
fn mib_up(bytes: f64) -> f64 {
    (bytes / MIB).ceil()
}

impl CgroupFacts {
    /// The cgroup between readings `a` and `b`: its limits as of `b`, what its counters
    /// grew by since `a`. Its memory peak is the cgroup's (lifetime) peak when that rose
    /// between them, else `highest`, the highest reading between them.
    pub fn between(a: &CgroupStats, b: &CgroupStats, highest: Option<u64>) -> Self {
        let delta = |x: Option<u64>, y: Option<u64>| x.zip(y).map_or(0, |(x, y)| x.saturating_sub(y));
        let seconds = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| (x - y).max(0.0));
        let highest = highest.into_iter().chain(a.memory_current).chain(b.memory_current).max();
        Self {
            path: b.path.clone(),
            quota: b.cpu_quota,
            usage_s: seconds(b.cpu_usage, a.cpu_usage),
            periods: delta(b.periods, a.periods),
            throttled_periods: delta(b.throttled_periods, a.throttled_periods),
            throttled_s: seconds(b.throttled_time, a.throttled_time).unwrap_or(0.0),
            memory_peak: match (b.memory_peak, a.memory_peak) {
                (Some(p1), Some(p0)) if p1 > p0 => Some(p1),
                _ => highest,
            },
            memory_current: b.memory_current,
            memory_limit: b.memory_limit,
            oom_kills: delta(b.oom_kills, a.oom_kills),
        }
    }
}

impl Facts {
    fn state(&self, name: &str) -> f64 {
        self.states.iter().filter(|(s, _)| s == name).map(|(_, v)| v).sum()
    }

    fn thread_time(&self) -> f64 {
        self.states.iter().map(|(_, v)| v).sum()
    }

    /// Thread time not spent idle (waiting for any event, sleeping).
    fn busy_time(&self) -> f64 {
        self.thread_time() - self.state("[poll]") - self.state("[sleep]")
    }

    /// CPUs the process may use: its quota, else its pod spec's limit, else the host's.
    fn capacity(&self) -> f64 {
        self.cpu_limit().map_or(self.host_cpus, |(l, _)| l).max(0.01)
    }

    /// Its CPU limit and where it comes from: the cgroup's quota, else the pod spec.
    fn cpu_limit(&self) -> Option<(f64, &'static str)> {
        let quota = self.cgroup.as_ref().and_then(|c| c.quota).map(|q| (q, "quota"));
        quota.or_else(|| Some((self.declared?.cpu_limit?, "limit (pod spec)")))
    }

    /// Its memory peak and what was read: the cgroup's, else the process's resident set.
    fn memory_peak(&self) -> Option<(f64, &'static str)> {
        let cgroup = self.cgroup.as_ref().and_then(|c| c.memory_peak.or(c.memory_current));
        let peak = cgroup.map(|p| (p, "cgroup")).or_else(|| Some((self.rss_peak?, "process RSS")))?;
        Some((peak.0 as f64, peak.1))
    }

    /// Its memory limit: the cgroup's, else the pod spec's.
    fn memory_limit(&self) -> Option<f64> {
        let cgroup = self.cgroup.as_ref().and_then(|c| c.memory_limit);
        cgroup.or_else(|| self.declared?.memory_limit).map(|l| l as f64)
    }

    fn cpu_cores(&self) -> Option<f64> {
        self.cpu_s.map(|s| s / self.elapsed_s.max(1e-9))
    }

    /// Where a memory figure was read.
    fn memory_source(&self, source: &str) -> String {
        match (&self.cgroup, source) {
            (Some(c), "cgroup") => format!("cgroup {}", c.path),
            _ => source.to_string(),
        }
    }

    fn hottest(&self) -> String {
        self.top
            .first()
            .map_or_else(|| "no CPU samples".into(), |(f, share)| format!("{f} ({share:.0}% of CPU samples)"))
    }
}

/// The findings for one process, worst first; `healthy` when nothing is wrong.
pub fn findings(f: &Facts) -> Vec<Finding> {
    // Of equal severity, a specific cause before a symptom it also shows: a GIL-bound
    // process on a busy node waits in the run queue too, but more CPU will not help it.
    let mut out: Vec<Finding> = [
        workers_mismatch(f),
        cpu_throttled(f),
        gil_bound(f),
        loop_blocked(f),
        nagle_stall(f),
        queueing(f),
        upstream_bound(f),
        cpu_saturated(f),
        memory_near_limit(f),
        memory_overprovisioned(f),
        cpu_overprovisioned(f),
    ]
    .into_iter()
    .flatten()
    .collect();
    out.sort_by_key(|x| x.severity);
    if out.is_empty() {
        let cpu = f.cpu_cores().map_or("unknown".into(), |c| format!("{c:.2}"));
        out.push(
            Finding::new(
                "healthy",
                Severity::Info,
                "Nothing to change: no rule found a bottleneck or waste in what was watched.".into(),
                "None.".into(),
            )
            .evidence(format!(
                "CPU used {cpu} CPUs of {:.2} available over {:.1} s",
                f.capacity(),
                f.elapsed_s
            )),
        );
    }
    out
}

/// The quota throttles the process and its threads wait for it.
fn cpu_throttled(f: &Facts) -> Option<Finding> {
    let c = f.cgroup.as_ref()?;
    let quota = c.quota?;
    let share = c.throttled_periods as f64 / c.periods.max(1) as f64;
    let (running, throttled) = (f.state("[running]"), f.state("[throttled]"));
    let runqueue = f.state("[runqueue]");
    if c.periods == 0 || share <= THROTTLED_PERIODS || throttled <= 0.0 {
        return None;
    }
    // What the threads would have run without the quota: their time on a CPU, held back
    // by it, and waiting for a CPU, per second of the session; for the whole cgroup, in
    // proportion to this process's share of its CPU use.
    let of_cgroup = cgroup_share(f);
    let demand = (running + throttled + runqueue) / f.elapsed_s.max(1e-9) / of_cgroup;
    let limit = cpus_up(demand * MARGIN);
    Some(
        Finding::new(
            "cpu-throttled",
            Severity::High,
            format!(
                "The CPU limit of {quota:.2} CPUs throttles it: {:.0}% of periods throttled, its threads held back {throttled:.2} s.",
                share * 100.0
            ),
            format!("Raise the CPU limit to {limit:.1} CPUs (or remove it); the request can stay at what it uses."),
        )
        .evidence(format!(
            "cgroup {}: throttled {} of {} periods, {:.2} s",
            c.path, c.throttled_periods, c.periods, c.throttled_s
        ))
        .evidence(format!("threads: [running] {running:.2} s, [throttled] {throttled:.2} s"))
        .evidence(format!("hottest: {}", f.hottest()))
        .num("quota_cpus", quota)
        .num("throttled_periods_share", share)
        .num("running_s", running)
        .num("throttled_s", throttled)
        .num("elapsed_s", f.elapsed_s)
        .num("demand_cpus", demand)
        .num("recommended_limit_cpus", limit)
        .num("share_of_cgroup_cpu", of_cgroup)
        .math(format!(
            "demand = ([running] + [throttled] + [runqueue]) / elapsed / its share of the cgroup's CPU = ({running:.2} + {throttled:.2} + {runqueue:.2}) / {:.2} / {of_cgroup:.2} = {demand:.2} CPUs; \
             limit = demand x {MARGIN} rounded up to 0.1 = {limit:.1}",
            f.elapsed_s
        )),
    )
}

/// Runnable but no CPU free, without a quota to blame.
fn cpu_saturated(f: &Facts) -> Option<Finding> {
    let (running, runqueue) = (f.state("[running]"), f.state("[runqueue]"));
    let share = runqueue / (running + runqueue).max(1e-9);
    let throttled = f
        .cgroup
        .as_ref()
        .is_some_and(|c| c.periods > 0 && c.throttled_periods as f64 / c.periods as f64 > THROTTLED_PERIODS);
    if throttled || share < RUNQUEUE_SHARE || runqueue < 0.05 * f.elapsed_s {
        return None;
    }
    let demand = (running + runqueue) / f.elapsed_s.max(1e-9);
    let request = cpus_up(demand * MARGIN);
    let mut finding = Finding::new(
            "cpu-saturated",
            Severity::High,
            format!(
                "Its threads were runnable with no CPU free {:.0}% of the time they wanted one: the node's CPUs are taken.",
                share * 100.0
            ),
            format!(
                "Request {request:.1} CPUs so the scheduler places it where they are free (or move its neighbours); a limit would not help."
            ),
        )
        .evidence(format!("threads: [running] {running:.2} s, [runqueue] {runqueue:.2} s in {:.2} s", f.elapsed_s))
        .num("running_s", running)
        .num("runqueue_s", runqueue)
        .num("runqueue_share", share)
        .num("demand_cpus", demand)
        .num("recommended_request_cpus", request)
        .math(format!(
            "demand = ([running] + [runqueue]) / elapsed = {demand:.2} CPUs; request = demand x {MARGIN} rounded up to 0.1 = {request:.1}"
        ));
    if let Some(current) = f.declared.and_then(|d| d.cpu_request) {
        finding =
            finding.evidence(format!("its pod spec requests {current:.2} CPUs")).num("request_cpus", current);
    }
    Some(finding)
}

/// A pre-fork server's workers for the CPUs it may use: gunicorn's guideline is
/// 2 x cores + 1, with the cores the quota allows.
fn workers_mismatch(f: &Facts) -> Option<Finding> {
    let quota = f.cpu_limit()?.0;
    let recommended = 2.0 * quota.ceil() + 1.0;
    let workers = f64::from(f.workers);
    if f.workers < 2 || workers <= recommended {
        return None;
    }
    // Throttled too: the workers are why, and this comes before raising the limit.
    let throttled = f
        .cgroup
        .as_ref()
        .is_some_and(|c| c.periods > 0 && c.throttled_periods as f64 / c.periods as f64 > THROTTLED_PERIODS);
    Some(
        Finding::new(
            "workers-mismatch",
            if throttled { Severity::High } else { Severity::Medium },
            format!(
                "It runs {} workers for a CPU quota of {quota:.2} CPUs: sized for the host's {:.0} CPUs, they share the quota and are throttled together.",
                f.workers, f.host_cpus
            ),
            format!(
                "Run {recommended:.0} workers (gunicorn --workers / uvicorn --workers), or raise the quota to what {} workers need.",
                f.workers
            ),
        )
        .evidence(format!("{} children running the same program in its cgroup, quota {quota:.2} CPUs", f.workers))
        .num("workers", workers)
        .num("quota_cpus", quota)
        .num("host_cpus", f.host_cpus)
        .num("recommended_workers", recommended)
        .math(format!("workers = 2 x ceil({quota:.2}) + 1 = {recommended:.0} (gunicorn's 2 x cores + 1, cores from the quota)")),
    )
}

/// This process's share of its cgroup's CPU use in the window: 1 when unknown, or when it
/// used 80% or more (the process's and the cgroup's counters are read at slightly
/// different instants and in different units: a single process's share reads 0.9 to 1.1).
fn cgroup_share(f: &Facts) -> f64 {
    match (f.cpu_s, f.cgroup.as_ref().and_then(|c| c.usage_s)) {
        (Some(own), Some(all)) if all > 0.0 && own > 0.0 && own / all < 0.8 => (own / all).max(0.01),
        _ => 1.0,
    }
}

/// Threads wait for the GIL and the process never gets past one CPU.
fn gil_bound(f: &Facts) -> Option<Finding> {
    let (running, gil) = (f.state("[running]"), f.state("[gil]"));
    let share = gil / (running + gil).max(1e-9);
    let cores = f.cpu_cores()?;
    if share < GIL_SHARE || cores > GIL_ONE_CPU || gil < 0.05 * f.elapsed_s {
        return None;
    }
    // Each process runs one interpreter at a time: as many processes as the threads kept
    // busy, within the CPUs available.
    let wanted = (running + gil) / f.elapsed_s.max(1e-9);
    // Under a quota of one CPU or less, processes could not run more than one interpreter
    // at a time either: the quota is the limit, not the GIL.
    let workers = wanted.ceil().min(f.capacity().ceil());
    if workers < 2.0 {
        return None;
    }
    Some(
        Finding::new(
            "gil-bound",
            Severity::High,
            format!(
                "Its threads wait for the GIL {:.0}% of the time they want to run Python, and it uses {cores:.2} CPUs: more threads or CPUs will not help.",
                share * 100.0
            ),
            format!(
                "Run {workers:.0} worker processes instead of threads (multiprocessing, gunicorn/uvicorn workers), or move the hot code out of Python."
            ),
        )
        .evidence(format!("threads: [running] {running:.2} s, [gil] {gil:.2} s in {:.2} s", f.elapsed_s))
        .evidence(format!("hottest: {}", f.hottest()))
        .num("running_s", running)
        .num("gil_s", gil)
        .num("gil_share", share)
        .num("cpus_used", cores)
        .num("threads_busy", wanted)
        .num("capacity_cpus", f.capacity())
        .num("recommended_workers", workers)
        .math(format!(
            "threads busy = ([running] + [gil]) / elapsed = {wanted:.2}; workers = min(ceil({wanted:.2}), ceil({:.2} CPUs available)) = {workers:.0}",
            f.capacity()
        )),
    )
}

/// An event loop kept from its events by code that ran on it.
fn loop_blocked(f: &Facts) -> Option<Finding> {
    let worst = f.loop_blocks.iter().max_by(|a, b| a.0.total_cmp(&b.0))?;
    let total: f64 = f.loop_blocks.iter().map(|b| b.0).sum();
    let share = total / f.elapsed_s.max(1e-9);
    let severity = if share >= 0.1 { Severity::High } else { Severity::Medium };
    let mut finding = Finding::new(
        "loop-blocked",
        severity,
        format!(
            "Its event loop was blocked {} times, {:.0} ms at worst, in {}: every connection waited meanwhile.",
            f.loop_blocks.len(),
            worst.0 * 1e3,
            worst.1
        ),
        format!(
            "Move {} off the loop (loop.run_in_executor with a ProcessPoolExecutor for CPU work, a thread for blocking calls), or split it with awaits.",
            worst.1
        ),
    )
    .num("blocks", f.loop_blocks.len() as f64)
    .num("blocked_s", total)
    .num("longest_ms", worst.0 * 1e3)
    .num("blocked_share", share)
    .math(format!("blocked share = {total:.3} s blocked / {:.2} s = {:.1}%", f.elapsed_s, share * 100.0));
    for (secs, function) in f.loop_blocks.iter().take(3) {
        finding = finding.evidence(format!("blocked {:.0} ms in {function}", secs * 1e3));
    }
    Some(finding)
}

/// Most of the busy time is waiting on one peer, with CPU to spare.
fn upstream_bound(f: &Facts) -> Option<Finding> {
    let busy = f.busy_time();
    let (peer, waited) = f
        .states
        .iter()
        .filter_map(|(s, v)| Some((s.strip_prefix("[socket ")?.strip_suffix(']')?, *v)))
        .filter(|(peer, _)| f.upstreams.iter().any(|u| u == peer))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(peer, v)| (peer.to_string(), v))?;
    let share = waited / busy.max(1e-9);
    let cores = f.cpu_cores().unwrap_or(f.state("[running]") / f.elapsed_s.max(1e-9));
    if share < UPSTREAM_SHARE || cores > CPU_HEADROOM * f.capacity() {
        return None;
    }
    Some(
        Finding::new(
            "upstream-bound",
            Severity::Medium,
            format!(
                "{:.0}% of its threads' busy time is waiting on {peer}, while it uses {cores:.2} of {:.2} CPUs: more CPU will not help.",
                share * 100.0,
                f.capacity()
            ),
            format!(
                "Look at {peer}: its latency, or more concurrent requests to it (connection pool, async client); do not add CPU."
            ),
        )
        .evidence(format!("threads: [socket {peer}] {waited:.2} s of {busy:.2} s busy"))
        .num("waited_s", waited)
        .num("busy_s", busy)
        .num("share", share)
        .num("cpus_used", cores)
        .num("capacity_cpus", f.capacity())
        .math(format!("share = {waited:.2} s waiting on {peer} / {busy:.2} s busy (all but [poll] and [sleep])")),
    )
}

/// Requests wait in the socket or accept queue a large share of their time in the server.
fn queueing(f: &Facts) -> Option<Finding> {
    let (name, count, own, total) = f
        .servers
        .iter()
        .filter_map(|e| Some((&e.name, e.count, e.own_ms, e.total_ms?)))
        .filter(|(_, n, _, _)| *n >= MIN_REQUESTS)
        .max_by(|a, b| (a.3 - a.2).total_cmp(&(b.3 - b.2)))?;
    let waited = (total - own).max(0.0);
    let share = waited / total.max(1e-9);
    if share < QUEUE_SHARE || waited < QUEUE_MIN_MS {
        return None;
    }
    let cores = f.cpu_cores().unwrap_or(0.0);
    let headroom = cores < CPU_HEADROOM * f.capacity();
    let action = if headroom {
        format!(
            "Add workers or concurrency: it uses {cores:.2} of {:.2} CPUs, so requests wait for a free worker, not for CPU.",
            f.capacity()
        )
    } else {
        format!(
            "Add CPU: it uses {cores:.2} of {:.2} CPUs, so more workers would only share them.",
            f.capacity()
        )
    };
    Some(
        Finding::new(
            "queueing",
            Severity::High,
            format!(
                "Requests to {name} wait {waited:.1} ms in the socket and accept queues before it reads them, {:.0}% of their {total:.1} ms in the server.",
                share * 100.0
            ),
            action,
        )
        .evidence(format!("{name}: {count} requests, {own:.1} ms read to write, {total:.1} ms with the queues (means)"))
        .num("requests", count as f64)
        .num("request_ms", own)
        .num("total_ms", total)
        .num("queued_share", share)
        .num("cpus_used", cores)
        .num("capacity_cpus", f.capacity())
        .math(format!("queued share = ({total:.2} - {own:.2}) / {total:.2} ms")),
    )
}

/// Responses held by Nagle's algorithm until the peer's delayed ACK.
fn nagle_stall(f: &Facts) -> Option<Finding> {
    let Stall { side, endpoint, count, mean_ms: mean, requests, .. } = f
        .stalls
        .iter()
        .filter(|s| {
            s.cause == "nagle-delayed-ack" && s.count as f64 >= NAGLE_SHARE * s.requests.max(1) as f64
        })
        .max_by_key(|s| s.count)?;
    let share = *count as f64 / (*requests).max(1) as f64;
    // Seen from a client, the bytes are held by the upstream's kernel: the fix is there.
    let action = if *side == "client" {
        "The upstream holds its responses back: set TCP_NODELAY on its sockets (http.server: disable_nagle_algorithm = True), or have it write each response in one call."
    } else {
        "Set TCP_NODELAY on its sockets (http.server: disable_nagle_algorithm = True), or write each response in one call."
    };
    Some(
        Finding::new(
            "nagle-stall",
            Severity::High,
            format!(
                "{:.0}% of {endpoint}'s responses ({side} side) waited {mean:.1} ms in the kernel for a delayed ACK (Nagle's algorithm).",
                share * 100.0
            ),
            action.into(),
        )
        .evidence(format!("{count} of {requests} requests stalled, {mean:.1} ms each (mean)"))
        .num("stalled", *count as f64)
        .num("requests", *requests as f64)
        .num("stall_mean_ms", *mean)
        .math(format!("share = {count} / {requests}; each costs the client {mean:.1} ms")),
    )
}

/// The memory peak near its limit, or OOM kills.
fn memory_near_limit(f: &Facts) -> Option<Finding> {
    let limit = f.memory_limit()?;
    let (peak, source) = f.memory_peak()?;
    let oom_kills = f.cgroup.as_ref().map_or(0, |c| c.oom_kills);
    let near = peak >= MEMORY_NEAR * limit;
    if !near && oom_kills == 0 {
        return None;
    }
    let (recommended, math) = if oom_kills > 0 {
        let r = (peak + OOM_BUMP_BYTES as f64).max(peak * OOM_BUMP_RATIO);
        (r, format!("after an OOM kill: max(peak + 100 MiB, peak x {OOM_BUMP_RATIO}) = {:.0} MiB", mib_up(r)))
    } else {
        let r = peak * MARGIN;
        (r, format!("peak x {MARGIN} = {:.0} MiB", mib_up(r)))
    };
    Some(
        Finding::new(
            "memory-near-limit",
            Severity::High,
            format!(
                "Its memory peaked at {:.0}% of its {:.0} MiB limit{}.",
                100.0 * peak / limit,
                limit / MIB,
                if oom_kills > 0 { format!(", with {oom_kills} OOM kills") } else { String::new() }
            ),
            format!(
                "Raise the memory limit (and request) to {:.0} MiB, or find what holds the memory.",
                mib_up(recommended)
            ),
        )
        .evidence(format!(
            "{}: peak {:.1} MiB, limit {:.1} MiB",
            f.memory_source(source),
            peak / MIB,
            limit / MIB
        ))
        .num("peak_mib", peak / MIB)
        .num("limit_mib", limit / MIB)
        .num("oom_kills", oom_kills as f64)
        .num("recommended_limit_mib", mib_up(recommended))
        .math(math),
    )
}

/// The memory peak far under its limit.
/// The memory peak far under its request (from the pod spec), else its limit.
fn memory_overprovisioned(f: &Facts) -> Option<Finding> {
    let (reference, what) = match f.declared.and_then(|d| d.memory_request) {
        Some(r) => (r as f64, "request"),
        None => (f.memory_limit()?, "limit"),
    };
    let (peak, source) = f.memory_peak()?;
    if peak >= MEMORY_FAR * reference || f.cgroup.as_ref().is_some_and(|c| c.oom_kills > 0) {
        return None;
    }
    // VPA's target: the 90th percentile of the readings (the newer weighing more), not
    // under it the peak's half; without readings over time, the peak.
    let (basis, basis_name) = match f.memory_p90 {
        Some(p90) => (p90 as f64, "90th percentile of the readings"),
        None => (peak, "peak"),
    };
    let recommended = mib_up(basis * MARGIN);
    if recommended * MIB >= reference {
        return None;
    }
    Some(
        Finding::new(
            "memory-overprovisioned",
            Severity::Low,
            format!("Its memory peaked at {:.0}% of its {:.0} MiB {what}.", 100.0 * peak / reference, reference / MIB),
            format!(
                "Lower the memory request to {recommended:.0} MiB (keep the limit above the peak of a longer window: this one saw {:.1} s).",
                f.elapsed_s
            ),
        )
        .evidence(format!(
            "{}: peak {:.1} MiB, {what} {:.1} MiB",
            f.memory_source(source),
            peak / MIB,
            reference / MIB
        ))
        .num("peak_mib", peak / MIB)
        .num(if what == "request" { "request_mib" } else { "limit_mib" }, reference / MIB)
        .num("basis_mib", basis / MIB)
        .num("recommended_request_mib", recommended)
        .math(format!("{basis_name} x {MARGIN} = {:.1} x {MARGIN} = {recommended:.0} MiB", basis / MIB)),
    )
}

/// CPU used far under the request (from the pod spec), else the quota or limit.
fn cpu_overprovisioned(f: &Facts) -> Option<Finding> {
    let c = f.cgroup.as_ref();
    let (reference, what) = match f.declared.and_then(|d| d.cpu_request) {
        Some(r) => (r, "request (pod spec)"),
        None => f.cpu_limit()?,
    };
    // The quota is the cgroup's: what all its processes used.
    let cores = c.and_then(|c| c.usage_s).map(|u| u / f.elapsed_s.max(1e-9)).or(f.cpu_cores())?;
    let throttled =
        c.is_some_and(|c| c.periods > 0 && c.throttled_periods as f64 / c.periods as f64 > THROTTLED_PERIODS);
    if throttled || cores >= CPU_FAR * reference {
        return None;
    }
    // VPA's target: the 90th percentile of the use per interval; a session has its mean.
    let (basis, basis_name, note) = match f.cpu_p90 {
        Some(p90) => (p90, "90th percentile of the use per interval", String::new()),
        None => (
            cores,
            "mean use",
            format!(
                "; this is the session's mean over {:.1} s (VPA uses the 90th percentile of a longer history: run longer, or use the agent's window)",
                f.elapsed_s
            ),
        ),
    };
    let request = ((basis * MARGIN) * 100.0).ceil().max(1.0) / 100.0;
    // Bursts can put the 90th percentile above the mean: nothing to lower then.
    if request >= reference {
        return None;
    }
    Some(
        Finding::new(
            "cpu-overprovisioned",
            Severity::Low,
            format!("It used {cores:.2} CPUs of a {reference:.2} CPU {what}."),
            format!("Lower the CPU request to {request:.2} CPUs{note}."),
        )
        .evidence(format!("CPU used {:.2} s in {:.2} s", cores * f.elapsed_s, f.elapsed_s))
        .num("cpus_used", cores)
        .num("elapsed_s", f.elapsed_s)
        .num(if what == "quota" { "quota_cpus" } else { "reference_cpus" }, reference)
        .num("basis_cpus", basis)
        .num("recommended_request_cpus", request)
        .math(format!("request = {basis_name} {basis:.3} CPUs x {MARGIN} rounded up to 0.01 = {request:.2}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(states: &[(&str, f64)]) -> Facts {
        Facts {
            pid: 1,
            service: "svc".into(),
            elapsed_s: 10.0,
            cpu_s: Some(states.iter().filter(|(s, _)| *s == "[running]").map(|(_, v)| v).sum()),
            host_cpus: 2.0,
            states: states.iter().map(|(s, v)| (s.to_string(), *v)).collect(),
            ..Default::default()
        }
    }

    fn quota(q: f64, periods: u64, throttled: u64) -> CgroupFacts {
        CgroupFacts {
            path: "/x".into(),
            quota: Some(q),
            periods,
            throttled_periods: throttled,
            ..Default::default()
        }
    }

    #[test]
    fn a_nagle_stall_is_fixed_where_the_bytes_are_held() {
        let stall = |side| Stall {
            side,
            endpoint: "GET /x".into(),
            cause: "nagle-delayed-ack",
            count: 9,
            mean_ms: 40.0,
            requests: 10,
        };
        let mut f = facts(&[("[running]", 1.0)]);
        f.stalls = vec![stall("server")];
        let server = findings(&f)[0].clone();
        f.stalls = vec![stall("client")];
        let client = findings(&f)[0].clone();
        assert_eq!((server.rule, client.rule), ("nagle-stall", "nagle-stall"));
        assert!(server.action.starts_with("Set TCP_NODELAY on its sockets"), "{}", server.action);
        assert!(client.action.starts_with("The upstream holds its responses back"), "{}", client.action);
    }

    #[test]
    fn queueing_needs_a_share_and_a_millisecond() {
        let server =
            |own_ms, total_ms| Server { name: "GET /x".into(), count: 50, own_ms, total_ms: Some(total_ms) };
        let mut f = facts(&[("[running]", 1.0)]);
        f.servers = vec![server(20.0, 57.0)];
        assert_eq!(findings(&f)[0].rule, "queueing");
        // 0.2 of 0.4 ms: half, but a wake-up's time.
        f.servers = vec![server(0.2, 0.4)];
        assert!(findings(&f).iter().all(|x| x.rule != "queueing"), "{:?}", findings(&f));
        // 5 of 100 ms: long, but a small share.
        f.servers = vec![server(95.0, 100.0)];
        assert!(findings(&f).iter().all(|x| x.rule != "queueing"));
    }

    #[test]
    fn throttled_demand_is_running_and_throttled_time() {
        let mut f = facts(&[("[running]", 3.0), ("[throttled]", 7.0)]);
        f.cgroup = Some(quota(0.3, 100, 90));
        let top = &findings(&f)[0];
        assert_eq!(top.rule, "cpu-throttled");
        // (3 + 7) / 10 = 1 CPU, x 1.15 = 1.15, up to 1.2.
        assert_eq!(top.numbers["recommended_limit_cpus"], 1.2);
        // Throttled: not saturated, not overprovisioned.
        assert!(findings(&f).iter().all(|x| x.rule != "cpu-saturated" && x.rule != "cpu-overprovisioned"));
    }

    #[test]
    fn a_throttled_worker_asks_for_its_whole_cgroup() {
        let mut f = facts(&[("[running]", 2.0), ("[throttled]", 2.0)]);
        // One of four equal workers: the cgroup used four times its CPU.
        f.cgroup = Some(CgroupFacts { usage_s: Some(8.0), ..quota(1.0, 100, 50) });
        let top = &findings(&f)[0];
        // (2 + 2) / 10 / 0.25 = 1.6 CPUs, x 1.15 = 1.84, up to 1.9.
        assert_eq!((top.rule, top.numbers["recommended_limit_cpus"].as_f64()), ("cpu-throttled", Some(1.9)));
    }

    #[test]
    fn gil_bound_needs_one_cpu_and_waits() {
        let f = facts(&[("[running]", 10.0), ("[gil]", 30.0)]);
        let top = &findings(&f)[0];
        assert_eq!(top.rule, "gil-bound");
        // 4 threads busy, 2 CPUs: 2 workers.
        assert_eq!(top.numbers["recommended_workers"], 2.0);
        let mut two_cpus = f.clone();
        two_cpus.cpu_s = Some(20.0);
        assert!(findings(&two_cpus).iter().all(|x| x.rule != "gil-bound"));
    }

    #[test]
    fn upstream_bound_only_with_cpu_to_spare() {
        let mut f = facts(&[("[running]", 1.0), ("[socket 10.0.0.7:5432]", 8.0), ("[poll]", 30.0)]);
        // Waiting on a socket it accepted: a client between requests, not an upstream.
        assert_eq!(findings(&f)[0].rule, "healthy");
        f.upstreams = vec!["10.0.0.7:5432".into()];
        let top = &findings(&f)[0];
        assert_eq!(top.rule, "upstream-bound");
        assert!(top.title.contains("10.0.0.7:5432"), "{}", top.title);
        let mut busy = f.clone();
        busy.cpu_s = Some(19.0);
        assert!(findings(&busy).iter().all(|x| x.rule != "upstream-bound"));
    }

    #[test]
    fn memory_after_an_oom_kill_gets_the_larger_bump() {
        let mut f = facts(&[("[running]", 1.0)]);
        f.cgroup = Some(CgroupFacts {
            memory_peak: Some(200 << 20),
            memory_limit: Some(256 << 20),
            oom_kills: 1,
            ..Default::default()
        });
        let top = &findings(&f)[0];
        assert_eq!(top.rule, "memory-near-limit");
        // max(200 + 100, 200 x 1.2) = 300 MiB.
        assert_eq!(top.numbers["recommended_limit_mib"], 300.0);
    }

    #[test]
    fn prefork_workers_are_sized_from_the_quota() {
        let mut f = facts(&[("[running]", 0.1), ("[poll]", 10.0)]);
        f.workers = 8;
        f.cgroup = Some(quota(0.5, 100, 0));
        let top = &findings(&f)[0];
        assert_eq!(top.rule, "workers-mismatch");
        // 2 x ceil(0.5) + 1.
        assert_eq!(top.numbers["recommended_workers"], 3.0);
        assert_eq!(top.severity, Severity::Medium);
        // Throttled as they all start: the workers come first, as the cause.
        f.states.push(("[throttled]".into(), 2.0));
        f.cgroup = Some(quota(0.5, 100, 60));
        let all = findings(&f);
        assert_eq!(
            (all[0].rule, all[0].severity, all[1].rule),
            ("workers-mismatch", Severity::High, "cpu-throttled")
        );
        f.workers = 3;
        assert!(findings(&f).iter().all(|x| x.rule != "workers-mismatch"));
    }

    #[test]
    fn the_pod_spec_stands_in_for_the_cgroup_and_its_request_is_the_reference() {
        // No cgroup figures (a cgroup v2 node without the cpu and memory controllers read):
        // the pod spec's request and limit, and the process's own CPU and resident set.
        let mut f = facts(&[("[running]", 1.0), ("[poll]", 9.0)]);
        f.declared = Some(Resources {
            cpu_request: Some(1.5),
            cpu_limit: Some(2.0),
            memory_request: Some(512 << 20),
            memory_limit: Some(1 << 30),
        });
        f.rss_peak = Some(100 << 20);
        f.cpu_p90 = Some(0.2);
        let all = findings(&f);
        let cpu = all.iter().find(|x| x.rule == "cpu-overprovisioned").expect("cpu-overprovisioned");
        // 0.1 CPUs used of a 1.5 request; the request is the p90 0.2 x 1.15 = 0.23.
        assert_eq!(cpu.numbers["reference_cpus"], 1.5);
        assert_eq!(cpu.numbers["recommended_request_cpus"], 0.23);
        assert!(cpu.title.contains("request"), "{}", cpu.title);
        let memory = all.iter().find(|x| x.rule == "memory-overprovisioned").expect("memory-overprovisioned");
        // 100 MiB of a 512 MiB request: 115 MiB.
        assert_eq!(memory.numbers["request_mib"], 512.0);
        assert_eq!(memory.numbers["recommended_request_mib"], 115.0);
        // Near the pod spec's memory limit: raise it.
        f.rss_peak = Some(950 << 20);
        assert_eq!(findings(&f)[0].rule, "memory-near-limit");
        // A pre-fork server sized past the spec's CPU limit.
        f.rss_peak = Some(100 << 20);
        f.workers = 9;
        assert_eq!(findings(&f)[0].numbers["recommended_workers"], 5.0);
    }

    #[test]
    fn bursts_above_the_request_ask_for_no_lower_request() {
        // A mean of 0.34 CPUs of a 1 CPU request, but a 90th percentile of 1.5.
        let mut f = facts(&[("[running]", 3.4), ("[poll]", 6.6)]);
        f.declared = Some(Resources { cpu_request: Some(1.0), ..Default::default() });
        f.cpu_p90 = Some(1.5);
        assert!(findings(&f).iter().all(|x| x.rule != "cpu-overprovisioned"), "{:?}", findings(&f));
        f.cpu_p90 = Some(0.4);
        assert!(findings(&f).iter().any(|x| x.rule == "cpu-overprovisioned"));
    }

    #[test]
    fn nothing_wrong_is_healthy() {
        let f = facts(&[("[running]", 2.0), ("[poll]", 18.0)]);
        let all = findings(&f);
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].rule, all[0].severity), ("healthy", Severity::Info));
    }
}
