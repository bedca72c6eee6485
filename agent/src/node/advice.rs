//! The agent's advice: per process, what its last `advice.window` of intervals measured
//! (`Facts`, summed over a sliding window of interval figures), the findings of
//! `stoker advise`'s rules on it, and the recommendations among them.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    advise::rules::{CgroupFacts, Facts, Finding, Server, Stall},
    net::{Direction, NetMetrics, report::endpoint_name},
    sys::cgroup::CgroupStats,
};

/// One process's figures of one interval.
#[derive(Debug, Clone, Default)]
pub(super) struct Entry {
    pub elapsed_s: f64,
    pub cpu_s: f64,
    /// Thread seconds off the CPU by state (`gil`, `runqueue`, ...).
    pub off_cpu: Vec<(&'static str, f64)>,
    /// Its cgroup as read at the end of the interval.
    pub cgroup: Option<CgroupStats>,
    /// Server endpoints: requests, summed ms in the server, summed ms with the queues (and
    /// how many had them).
    pub servers: BTreeMap<String, (u64, f64, f64, u64)>,
    /// Stalls by side, endpoint and cause: count and summed ms.
    pub stalls: BTreeMap<(&'static str, String, &'static str), (u64, f64)>,
    /// Peers it connected to.
    pub peers: BTreeSet<String>,
    /// Requests by endpoint, either side (what a stall's share is of).
    pub requests: BTreeMap<String, u64>,
    /// Blocked event-loop stretches, seconds.
    pub loop_blocks: Vec<f64>,
}

/// Each process's entries over the window.
#[derive(Debug, Default)]
pub(super) struct Windows {
    pub window: Duration,
    entries: HashMap<u32, Window>,
}

/// One process's entries, and its start time (a later process in its pid starts afresh).
#[derive(Debug, Default)]
struct Window {
    started: Option<u64>,
    entries: VecDeque<(Instant, Entry)>,
}

impl Windows {
    pub fn new(window: Duration) -> Self {
        Self { window, entries: HashMap::new() }
    }

    /// Adds `pid`'s entry of the interval that ended now; drops what left the window.
    pub fn push(&mut self, pid: u32, entry: Entry) {
        let now = Instant::now();
        let started = crate::sys::process::start_time(pid);
        let w = self.entries.entry(pid).or_default();
        if started.is_some() && w.started != started {
            *w = Window { started, entries: VecDeque::new() };
        }
        let q = &mut w.entries;
        q.push_back((now, entry));
        while q.front().is_some_and(|(at, _)| now.duration_since(*at) > self.window) {
            q.pop_front();
        }
    }

    /// Forgets the processes not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.entries.retain(|pid, _| keep(*pid));
    }

    /// What the window measured of `pid`.
    pub fn facts(&self, pid: u32, service: &str, host_cpus: f64, workers: u32) -> Option<Facts> {
        let q = &self.entries.get(&pid)?.entries;
        let (first, last) = (&q.front()?.1, &q.back()?.1);
        let mut states: BTreeMap<String, f64> = BTreeMap::new();
        let (mut elapsed_s, mut cpu_s) = (0.0, 0.0);
        let mut servers: BTreeMap<&str, (u64, f64, f64, u64)> = BTreeMap::new();
        let mut stalls: BTreeMap<(&str, &str, &str), (u64, f64)> = BTreeMap::new();
        let mut requests: BTreeMap<&str, u64> = BTreeMap::new();
        let mut peers: BTreeSet<&str> = BTreeSet::new();
        let mut loop_blocks = Vec::new();
        for (_, e) in q {
            elapsed_s += e.elapsed_s;
            cpu_s += e.cpu_s;
            for (state, secs) in &e.off_cpu {
                *states.entry(format!("[{state}]")).or_default() += secs;
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
            loop_blocks.extend(
                e.loop_blocks
                    .iter()
                    .map(|s| (*s, "the code on the loop (stoker advise names it)".to_string())),
            );
        }
        *states.entry("[running]".into()).or_default() += cpu_s;
        let cgroup = last.cgroup.as_ref().map(|b| {
            let a = first.cgroup.as_ref().unwrap_or(b);
            let delta = |x: Option<u64>, y: Option<u64>| x.zip(y).map_or(0, |(x, y)| x.saturating_sub(y));
            // The cgroup's peak when it rose during the window, else the highest reading.
            let highest = q.iter().filter_map(|(_, e)| e.cgroup.as_ref()?.memory_current).max();
            let peak = match (b.memory_peak, a.memory_peak) {
                (Some(p1), Some(p0)) if p1 > p0 => Some(p1),
                _ => highest,
            };
            CgroupFacts {
                path: b.path.clone(),
                quota: b.cpu_quota,
                usage_s: b.cpu_usage.zip(a.cpu_usage).map(|(x, y)| (x - y).max(0.0)),
                periods: delta(b.periods, a.periods),
                throttled_periods: delta(b.throttled_periods, a.throttled_periods),
                throttled_s: b.throttled_time.zip(a.throttled_time).map_or(0.0, |(x, y)| (x - y).max(0.0)),
                memory_peak: peak,
                memory_current: b.memory_current,
                memory_limit: b.memory_limit,
                oom_kills: delta(b.oom_kills, a.oom_kills),
            }
        });
        Some(Facts {
            pid,
            service: service.to_string(),
            elapsed_s,
            cpu_s: Some(cpu_s),
            host_cpus,
            cgroup,
            states: states.into_iter().collect(),
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
            top: Vec::new(),
            upstreams: peers.into_iter().map(String::from).collect(),
            workers,
        })
    }
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
        let mut w = Windows::new(Duration::from_secs(3600));
        for _ in 0..3 {
            let e = Entry { elapsed_s: 1.0, cpu_s: 0.3, off_cpu: vec![("gil", 2.0)], ..Default::default() };
            w.push(7, e);
        }
        let f = w.facts(7, "svc", 2.0, 0).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(f.elapsed_s, 3.0) && close(f.cpu_s.unwrap(), 0.9), "{f:?}");
        assert!(f.states.iter().any(|(s, v)| s == "[gil]" && close(*v, 6.0)), "{f:?}");
        assert_eq!(rules::findings(&f)[0].rule, "gil-bound");
        let mut short = Windows::new(Duration::ZERO);
        short.push(7, Entry { elapsed_s: 1.0, ..Default::default() });
        std::thread::sleep(Duration::from_millis(2));
        short.push(7, Entry { elapsed_s: 1.0, ..Default::default() });
        assert_eq!(short.facts(7, "svc", 2.0, 0).unwrap().elapsed_s, 1.0);
    }
}
