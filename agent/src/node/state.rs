//! What the node agent exports, as of the last interval: per-process CPU (the kernel's
//! accounting, split across functions by samples), memory, top Python functions and network series, and the agent's own health.
use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use super::{
    metric::{self, Metric},
    netstate::NetSeries,
};

/// One sampled process.
#[derive(Debug, Clone, Default)]
pub struct ProcessMetrics {
    /// Resource attributes (`service.name`, `process.pid`, ...), sorted by key.
    pub resource: BTreeMap<String, String>,
    /// CPU time of the process: the kernel's accounting (all its threads, since it started)
    /// as read at the last export; after it exits, plus the samples of its last interval.
    pub cpu_seconds: f64,
    /// When the process started (Unix ns): the start of its cumulative CPU time.
    pub started_ns: Option<u64>,
    /// The kernel's figure at the last export (None: not read yet, or the process is gone).
    pub accounted: Option<f64>,
    pub utilization: f64,
    pub memory_bytes: u64,
    /// CPU seconds per function (leaf Python frame, without its line), cumulative: each
    /// interval's samples scaled to the interval's accounted CPU time.
    pub functions: HashMap<String, f64>,
    /// Request latencies and TCP counters, cumulative.
    pub net: NetSeries,
    /// The process's cgroup as of the last export (not for the root cgroup).
    pub cgroup: Option<crate::sys::cgroup::CgroupStats>,
    /// Seconds its threads spent off the CPU by state (`gil`, `socket`...), cumulative.
    pub off_cpu: BTreeMap<&'static str, f64>,
    /// Seconds its threads ran holding the GIL (CPU samples of the holder / rate),
    /// cumulative; None until a sample of the holder was seen (with off_cpu.enabled).
    pub gil_held_seconds: Option<f64>,
    /// The advice over `advice.window` (empty: not enough seen yet, or advice off).
    pub advice: Vec<crate::advise::rules::Finding>,
    /// Its container's requests and limits from its pod's spec (None: not in a listed pod,
    /// or none declared).
    pub declared: Option<crate::k8s::pods::Resources>,
}

/// The agent's own counters.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub samples: u64,
    pub lost: u64,
    pub export_failures: u64,
    pub dropped_batches: u64,
    pub processes: u64,
    /// Network events lost in the kernel (event rings or maps full).
    pub net_lost: u64,
    /// Request spans chosen but not sent (over the per-interval bound).
    pub spans_dropped: u64,
    /// Every kernel loss counter, by reason.
    pub losses: Vec<(&'static str, u64)>,
}

/// Everything exported, as of the last interval.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub start: Option<SystemTime>,
    pub time: Option<SystemTime>,
    pub processes: BTreeMap<u32, ProcessMetrics>,
    pub health: Health,
    pub host: String,
    pub top_functions: usize,
    /// Extra attributes of the agent's own resource (`OTEL_RESOURCE_ATTRIBUTES`).
    pub agent_attributes: Vec<(String, String)>,
    /// The advice's window (None: advice off).
    pub advice_window: Option<std::time::Duration>,
    /// How many times `/metrics` was read since the start.
    pub scrapes: u64,
}

impl Snapshot {
    /// The agent's own resource: `service.name` stoker-agent and `host.name`, then
    /// `OTEL_RESOURCE_ATTRIBUTES` over them.
    pub fn agent_resource(&self) -> BTreeMap<String, String> {
        let mut r = BTreeMap::from([
            ("service.name".to_string(), "stoker-agent".to_string()),
            ("host.name".to_string(), self.host.clone()),
        ]);
        r.extend(self.agent_attributes.iter().cloned());
        r
    }
}

impl ProcessMetrics {
    /// The `n` functions with the most CPU time.
    pub fn top(&self, n: usize) -> Vec<(&str, f64)> {
        let mut f: Vec<(&str, f64)> = self.functions.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        f.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        f.truncate(n);
        f
    }
}

impl Health {
    /// Each health figure with its metric, in the order they are rendered.
    pub(crate) fn values(&self) -> [(&'static Metric, u64); 7] {
        [
            (&metric::SAMPLES, self.samples),
            (&metric::SAMPLES_LOST, self.lost),
            (&metric::EXPORT_FAILURES, self.export_failures),
            (&metric::EXPORT_DROPPED, self.dropped_batches),
            (&metric::PROCESSES_TRACKED, self.processes),
            (&metric::NET_EVENTS_LOST, self.net_lost),
            (&metric::SPANS_DROPPED, self.spans_dropped),
        ]
    }
}
