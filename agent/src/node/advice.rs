//! The agent's advice: per process, what its last `advice.window` of intervals measured
//! (`Facts`, summed over a sliding window of interval figures), the findings of
//! `stoker advise`'s rules on it, and the recommendations among them.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    advise::rules::{CgroupFacts, Facts, Finding, Server, Stall},
    k8s::pods::Resources,
    net::{Direction, NetMetrics, report::endpoint_name},
    sys::cgroup::CgroupStats,
};

/// One process's figures of one interval.
#[derive(Debug, Clone, Default)]
pub(super) struct Entry {
    pub elapsed_s: f64,
    pub cpu_s: f64,
    /// Thread seconds off the CPU by state (`[gil]`, `[socket 10.0.0.7:5432]`, ...).
    pub off_cpu: Vec<(String, f64)>,
    /// Its cgroup as read at the end of the interval.
    pub cgroup: Option<CgroupStats>,
    /// What its cgroup's counters grew by since the previous entry's reading (None: no
    /// earlier reading of the same cgroup).
    pub cgroup_delta: Option<CgroupFacts>,
    /// Its resident set size at the end of the interval.
    pub rss: u64,
    /// Its container's requests and limits (pod spec).
    pub declared: Option<Resources>,
    /// Server endpoints: requests, summed ms in the server, summed ms with the queues (and
    /// how many had them).
    pub servers: BTreeMap<String, (u64, f64, f64, u64)>,
    /// Stalls by side, endpoint and cause: count and summed ms.
    pub stalls: BTreeMap<(&'static str, String, &'static str), (u64, f64)>,
    /// Peers it connected to.
    pub peers: BTreeSet<String>,
    /// Requests by endpoint, either side (what a stall's share is of).
    pub requests: BTreeMap<String, u64>,
    /// Blocked event-loop stretches: seconds and the function seen most in each.
    pub loop_blocks: Vec<(f64, String)>,
    /// CPU seconds of the Python functions its samples ended in (`qualname (file.py)`).
    pub functions: Vec<(String, f64)>,
}

/// Each process's entries over the window.
#[derive(Debug, Default)]
pub(super) struct Windows {
    pub window: Duration,
    /// Age at which an entry weighs half in the percentiles (zero: no decay).
    half_life: Duration,
    entries: HashMap<u32, Window>,
}

/// One process's entries, and its start time (a later process in its pid starts afresh).
#[derive(Debug, Default)]
struct Window {
    started: Option<u64>,
    entries: VecDeque<(Instant, Entry)>,
}

impl Windows {
    pub fn new(window: Duration, half_life: Duration) -> Self {
        Self { window, half_life, entries: HashMap::new() }
    }

    /// Adds `pid`'s entry of the interval that ended now; drops what left the window.
    pub fn push(&mut self, pid: u32, entry: Entry) {
        self.push_at(pid, entry, Instant::now());
    }

    fn push_at(&mut self, pid: u32, mut entry: Entry, now: Instant) {
        let started = crate::sys::process::start_time(pid);
        let w = self.entries.entry(pid).or_default();
        if started.is_some() && w.started != started {
            *w = Window { started, entries: VecDeque::new() };
        }
        let q = &mut w.entries;
        let before = q.back().and_then(|(_, e)| e.cgroup.as_ref());
        entry.cgroup_delta = match (before, &entry.cgroup) {
            (Some(a), Some(b)) if a.path == b.path => Some(CgroupFacts::between(a, b, None)),
            _ => None,
        };
        q.push_back((now, entry));
        while q.front().is_some_and(|(at, _)| now.duration_since(*at) > self.window) {
            q.pop_front();
        }
    }

    /// Forgets the processes not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.entries.retain(|pid, _| keep(*pid));
    }

    /// An entry's weight in the percentiles: halved every `half_life` of age.
    fn weight(&self, age: Duration) -> f64 {
        if self.half_life.is_zero() {
            return 1.0;
        }
        0.5f64.powf(age.as_secs_f64() / self.half_life.as_secs_f64())
    }

    /// What the window measured of `pid`.
    pub fn facts(&self, pid: u32, service: &str, host_cpus: f64, workers: u32) -> Option<Facts> {
        let q = &self.entries.get(&pid)?.entries;
        let (newest, last) = q.back().map(|(at, e)| (*at, e))?;
        let mut states: BTreeMap<&str, f64> = BTreeMap::new();
        let (mut elapsed_s, mut cpu_s) = (0.0, 0.0);
        let mut servers: BTreeMap<&str, (u64, f64, f64, u64)> = BTreeMap::new();
        let mut stalls: BTreeMap<(&str, &str, &str), (u64, f64)> = BTreeMap::new();
        let mut requests: BTreeMap<&str, u64> = BTreeMap::new();
        let mut peers: BTreeSet<&str> = BTreeSet::new();
        let mut loop_blocks = Vec::new();
        let mut functions: HashMap<&str, f64> = HashMap::new();
        // The cgroup's counters over the entries that have a delta, and their length.
        let mut cgroup: Option<CgroupFacts> = None;
        let mut cgroup_elapsed = 0.0;
        // (CPUs used, memory, weight) per entry, for the percentiles.
        let mut uses: Vec<(Option<f64>, Option<u64>, f64)> = Vec::new();
        for (at, e) in q {
            elapsed_s += e.elapsed_s;
            cpu_s += e.cpu_s;
            for (state, secs) in &e.off_cpu {
                *states.entry(state).or_default() += secs;
            }
            for (name, (n, own, total, with_total)) in &e.servers {
                let s = servers.entry(name).or_default();
                (s.0, s.1, s.2, s.3) = (s.0 + n, s.1 + own, s.2 + total, s.3 + with_total);
            }
            for (name, n) in &e.requests {
                *requests.entry(name).or_default() += n;
            }
            for ((side, endpoint, cause), (n, ms)) in &e.stalls {
                let s = stalls.entry((side, endpoint, cause)).or_default();
                (s.0, s.1) = (s.0 + n, s.1 + ms);
            }
            peers.extend(e.peers.iter().map(String::as_str));
            loop_blocks.extend(e.loop_blocks.iter().cloned());
            for (function, secs) in &e.functions {
                *functions.entry(function).or_default() += secs;
            }
            if let Some(d) = &e.cgroup_delta {
                cgroup_elapsed += e.elapsed_s;
                let c =
                    cgroup.get_or_insert_with(|| CgroupFacts { usage_s: Some(0.0), ..Default::default() });
                c.usage_s = c.usage_s.zip(d.usage_s).map(|(x, y)| x + y);
                c.periods += d.periods;
                c.throttled_periods += d.throttled_periods;
                c.throttled_s += d.throttled_s;
                c.oom_kills += d.oom_kills;
                c.memory_peak = c.memory_peak.max(d.memory_peak);
            }
            // The cgroup's use where its cgroup counts it (not in its first entry), else the
            // process's.
            let counted = e.cgroup.as_ref().is_some_and(|c| c.cpu_usage.is_some());
            let used = match (e.cgroup_delta.as_ref().and_then(|d| d.usage_s), counted) {
                (Some(u), _) => Some(u),
                (None, true) => None,
                (None, false) => Some(e.cpu_s),
            };
            let cpus = used.map(|u| u / e.elapsed_s.max(1e-3));
            let memory = e.cgroup.as_ref().and_then(|c| c.memory_current).or((e.rss > 0).then_some(e.rss));
            uses.push((cpus, memory, self.weight(newest.duration_since(*at))));
        }
        *states.entry("[running]").or_default() += cpu_s;
        // The cgroup as of the last reading; its counters' growth over the entries that
        // have one, scaled to the whole window (the first entry of a process has none).
        let cgroup = last.cgroup.as_ref().map(|b| {
            let grown = cgroup.unwrap_or_default();
            let highest = q.iter().filter_map(|(_, e)| e.cgroup.as_ref()?.memory_current).max();
            let scale = if cgroup_elapsed > 0.0 { elapsed_s / cgroup_elapsed } else { 0.0 };
            CgroupFacts {
                path: b.path.clone(),
                quota: b.cpu_quota,
                usage_s: grown.usage_s.filter(|_| cgroup_elapsed > 0.0).map(|u| u * scale),
                memory_peak: grown.memory_peak.max(highest),
                memory_current: b.memory_current,
                memory_limit: b.memory_limit,
                ..grown
            }
        });
        let percentile = |values: Vec<(f64, f64)>| weighted_percentile(values, 0.9);
        let cpu_p90 = percentile(uses.iter().filter_map(|(c, _, w)| Some(((*c)?, *w))).collect());
        let memory_p90 = percentile(uses.iter().filter_map(|(_, m, w)| Some(((*m)? as f64, *w))).collect())
            .map(|m| m as u64);
        // A process's resident set stands for its container's memory only when it has no
        // workers beside it (a pre-fork server's container holds all their memory).
        let rss_peak = q.iter().map(|(_, e)| e.rss).max().filter(|r| *r > 0 && workers == 0);
        Some(Facts {
            pid,
            service: service.to_string(),
            elapsed_s,
            cpu_s: Some(cpu_s),
            host_cpus,
            cgroup,
            states: states.into_iter().map(|(s, v)| (s.to_string(), v)).collect(),
            loop_blocks,
            servers: servers
                .into_iter()
                .map(|(name, (n, own, total, with_total))| Server {
                    name: name.to_string(),
                    count: n,
                    own_ms: own / n.max(1) as f64,
                    total_ms: (with_total > 0).then(|| total / with_total as f64),
                })
                .collect(),
            stalls: stalls
                .into_iter()
                .map(|((side, endpoint, cause), (n, ms))| Stall {
                    side: if side == "client" { "client" } else { "server" },
                    endpoint: endpoint.to_string(),
                    cause: agent_ebpf::stall_cause::NAMES
                        .into_iter()
                        .find(|c| *c == cause)
                        .unwrap_or("other"),
                    count: n,
                    mean_ms: ms / n.max(1) as f64,
                    requests: requests.get(endpoint).copied().unwrap_or(n),
                })
                .collect(),
            // The hottest functions, as shares of the CPU time (`stoker advise`: of the samples).
            top: {
                let mut top: Vec<(String, f64)> = functions
                    .into_iter()
                    .map(|(f, secs)| (f.to_string(), 100.0 * secs / cpu_s.max(1e-9)))
                    .collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                top.truncate(3);
                top
            },
            upstreams: peers.into_iter().map(String::from).collect(),
            workers,
            declared: last.declared,
            rss_peak,
            cpu_p90,
            memory_p90,
        })
    }
}

/// The `p` quantile of weighted values: the smallest value at which the weights up to it
/// reach `p` of their sum (None: no values).
fn weighted_percentile(mut values: Vec<(f64, f64)>, p: f64) -> Option<f64> {
    values.retain(|(v, w)| v.is_finite() && *w > 0.0);
    values.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = values.iter().map(|(_, w)| w).sum();
    let mut seen = 0.0;
    for (v, w) in &values {
        seen += w;
        if seen >= p * total - 1e-12 {
            return Some(*v);
        }
    }
    values.last().map(|(v, _)| *v)
}

/// Process `pid`'s part of an interval's network metrics, into its entry.
pub(super) fn add_network(entry: &mut Entry, pid: u32, m: &NetMetrics, queue_seen: bool) {
    for (key, stats) in m.requests.iter().filter(|(k, _)| k.pid == pid) {
        let name = endpoint_name(key.peer, key.method, key.route.as_deref());
        *entry.requests.entry(name.clone()).or_default() += stats.latency.count;
        if key.direction == Direction::Server {
            let s = entry.servers.entry(name.clone()).or_default();
            s.0 += stats.latency.count;
            s.1 += stats.latency.sum_ns as f64 / 1e6;
            if queue_seen {
                s.2 += stats.total.sum_ns as f64 / 1e6;
                s.3 += stats.total.count;
            }
        } else if let Some(peer) = key.peer {
            entry.peers.insert(peer.to_string());
        }
        for (&cause, h) in &stats.stalls {
            let key = (key.direction.name(), name.clone(), agent_ebpf::stall_cause::name(cause));
            let s = entry.stalls.entry(key).or_default();
            (s.0, s.1) = (s.0 + h.count, s.1 + h.sum_ns as f64 / 1e6);
        }
    }
    for (_, peer) in m.connects.keys().filter(|(p, _)| *p == pid) {
        entry.peers.insert(peer.to_string());
    }
}

/// The recommendations among `findings`: (metric, value in its unit).
pub(crate) fn recommendations(findings: &[Finding]) -> Vec<(&'static super::metric::Metric, f64)> {
    use super::metric::{REC_CPU_LIMIT, REC_CPU_REQUEST, REC_MEMORY_LIMIT, REC_MEMORY_REQUEST, REC_WORKERS};
    let mut out = Vec::new();
    for f in findings {
        let n = |k: &str| f.numbers.get(k).and_then(serde_json::Value::as_f64);
        let mib = |v: f64| v * (1u64 << 20) as f64;
        let rec = match f.rule {
            "cpu-throttled" => n("recommended_limit_cpus").map(|v| (&REC_CPU_LIMIT, v)),
            "cpu-saturated" | "cpu-overprovisioned" => {
                n("recommended_request_cpus").map(|v| (&REC_CPU_REQUEST, v))
            }
            "memory-near-limit" => n("recommended_limit_mib").map(|v| (&REC_MEMORY_LIMIT, mib(v))),
            "memory-overprovisioned" => n("recommended_request_mib").map(|v| (&REC_MEMORY_REQUEST, mib(v))),
            "gil-bound" | "workers-mismatch" => n("recommended_workers").map(|v| (&REC_WORKERS, v)),
            _ => None,
        };
        if let Some((m, v)) = rec
            && !out.iter().any(|(o, _): &(&super::metric::Metric, f64)| o.name == m.name)
        {
            out.push((m, v));
        }
    }
    out
}

/// The findings of every process, as `stoker advise --format json` writes them.
pub(crate) fn json(snapshot: &super::state::Snapshot, window: Duration) -> String {
    let processes: Vec<serde_json::Value> = snapshot
        .processes
        .iter()
        .filter(|(_, p)| !p.advice.is_empty())
        .map(|(pid, p)| {
            serde_json::json!({
                "pid": pid,
                "service": p.resource.get("service.name"),
                "cgroup": p.cgroup.as_ref().map(|c| c.path.clone()),
                "findings": p.advice,
            })
        })
        .collect();
    let doc = serde_json::json!({"window_s": window.as_secs_f64(), "processes": processes});
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advise::rules;

    #[test]
    fn the_window_sums_its_intervals_and_forgets_older_ones() {
        let mut w = Windows::new(Duration::from_secs(3600), Duration::ZERO);
        for _ in 0..3 {
            let e = Entry {
                elapsed_s: 1.0,
                cpu_s: 0.3,
                off_cpu: vec![("[gil]".into(), 2.0)],
                ..Default::default()
            };
            w.push(7, e);
        }
        let f = w.facts(7, "svc", 2.0, 0).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(f.elapsed_s, 3.0) && close(f.cpu_s.unwrap(), 0.9), "{f:?}");
        assert!(f.states.iter().any(|(s, v)| s == "[gil]" && close(*v, 6.0)), "{f:?}");
        assert_eq!(rules::findings(&f)[0].rule, "gil-bound");
        let mut short = Windows::new(Duration::ZERO, Duration::ZERO);
        short.push(7, Entry { elapsed_s: 1.0, ..Default::default() });
        std::thread::sleep(Duration::from_millis(2));
        short.push(7, Entry { elapsed_s: 1.0, ..Default::default() });
        assert_eq!(short.facts(7, "svc", 2.0, 0).unwrap().elapsed_s, 1.0);
    }

    fn reading(usage: f64, periods: u64, memory: u64) -> CgroupStats {
        CgroupStats {
            path: "/pod".into(),
            cpu_quota: Some(1.0),
            cpu_usage: Some(usage),
            periods: Some(periods),
            throttled_periods: Some(0),
            memory_current: Some(memory),
            ..Default::default()
        }
    }

    #[test]
    fn cgroup_counters_count_every_interval_and_percentiles_favour_newer_ones() {
        let mut w = Windows::new(Duration::from_secs(3600), Duration::from_secs(60));
        let t0 = Instant::now();
        // Ten 1 s intervals of a cgroup using 0.1 CPUs, then, 20 minutes on, ten at 0.5 CPUs.
        let mut usage = 100.0;
        for i in 0..20u64 {
            let at = t0 + Duration::from_secs(if i < 10 { i } else { 1200 + i });
            let rate = if i < 10 { 0.1 } else { 0.5 };
            usage += rate;
            let e = Entry {
                elapsed_s: 1.0,
                cpu_s: rate,
                cgroup: Some(reading(usage, 10 * i, (100 + i) << 20)),
                ..Default::default()
            };
            w.push_at(7, e, at);
        }
        let f = w.facts(7, "svc", 2.0, 0).unwrap();
        let c = f.cgroup.as_ref().unwrap();
        // 19 deltas (the first interval has no earlier reading) scaled to the 20 s window:
        // (9 x 0.1 + 10 x 0.5) / 19 x 20.
        let expected = (0.9 + 5.0) / 19.0 * 20.0;
        assert!((c.usage_s.unwrap() - expected).abs() < 1e-9, "{c:?}");
        assert_eq!(c.periods, 190);
        assert_eq!(c.memory_peak, Some(119 << 20));
        // The older intervals weigh 2^-20 as much: the p90 is the newer figure.
        assert!((f.cpu_p90.unwrap() - 0.5).abs() < 1e-9, "{:?}", f.cpu_p90);
        assert!(f.memory_p90.unwrap() >= 110 << 20, "{:?}", f.memory_p90);
        // Without decay, 9 of 19 intervals at 0.1 and 10 at 0.5: the p90 is still 0.5, the
        // p40 0.1.
        assert_eq!(weighted_percentile(vec![(0.1, 1.0), (0.5, 1.0)], 0.4), Some(0.1));
        assert_eq!(weighted_percentile(vec![(0.1, 9.0), (0.5, 1.0)], 0.9), Some(0.1));
        assert_eq!(weighted_percentile(vec![(0.1, 9.0), (0.5, 1.5)], 0.9), Some(0.5));
        assert_eq!(weighted_percentile(Vec::new(), 0.9), None);
    }
}
