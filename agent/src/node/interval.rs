//! One export interval's bookkeeping: the samples since the last export by process, their
//! CPU time and top functions, the processes' resource attributes and the agent's health.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::atomic::Ordering,
    time::Duration,
};

use agent_ebpf::{OffKey, SampleKey};

use super::{
    advice,
    config::AgentConfig,
    export::exporter::Exporter,
    resource,
    state::{self, ProcessMetrics},
};
use crate::{
    collect::{Collector, Tracker, View},
    k8s::{lookup::PodLookup, pods::Placement},
    net::NetMetrics,
    profile::{Frame, Profile},
    programs::KernelPrograms,
    sys::{
        cgroup::{Cgroup, CgroupStats},
        process,
    },
};

/// Exports an exited process stays on after its last report until a scraper reads
/// `/metrics` (one reading less often than the agent exports still gets its final
/// figures).
const DEPARTED_EXPORTS: u32 = 8;

/// Per-interval bookkeeping: cumulative counts seen, per-process metrics.
pub(super) struct Interval {
    pub(super) rate_hz: f64,
    pub(super) cpus: f64,
    pub(super) node: Option<String>,
    pub(super) lookup: Option<PodLookup>,
    /// The lookup's generation the resources were last built against.
    pub(super) generation: u64,
    /// Processes in a pod the lookup did not know when their resource was built.
    pub(super) unnamed: HashSet<u32>,
    /// Processes on /metrics since before their first export (see `publish_new`).
    pub(super) early: HashSet<u32>,
    pub(super) last: HashMap<SampleKey, u64>,
    /// Off-CPU nanoseconds seen so far by key (the kernel's, with the waits under way).
    pub(super) off_last: HashMap<OffKey, u64>,
    /// CPU samples of each process's GIL holder seen so far.
    pub(super) gil_last: HashMap<u32, u64>,
    /// Processes gone at an export (reported one last time then): the `/metrics` reads
    /// counted then, and the exports since (see `DEPARTED_EXPORTS`).
    pub(super) departing: HashMap<u32, (u64, u32)>,
    /// This interval's profile of each process (its metrics and Pyroscope push use it).
    pub(super) profiles: HashMap<u32, Profile>,
    pub(super) processes: std::collections::BTreeMap<u32, ProcessMetrics>,
    /// Spans chosen but not sent (over `network.spans.max_per_interval`), since the start.
    pub(super) spans_dropped: u64,
    /// Each process's figures of the intervals in `advice.window` (None: advice off).
    pub(super) advice: Option<advice::Windows>,
    /// This interval's figures of each process, completed by `advise`.
    pub(super) entries: HashMap<u32, advice::Entry>,
}

impl Interval {
    pub(super) fn new(
        config: &AgentConfig,
        env: &dyn Fn(&str) -> Option<String>,
        lookup: Option<PodLookup>,
    ) -> Self {
        Self {
            rate_hz: config.sample_rate_hz as f64,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
            node: config.kubernetes.node_name.clone().or_else(|| env("NODE_NAME")),
            lookup,
            generation: 0,
            unnamed: HashSet::new(),
            early: HashSet::new(),
            last: HashMap::new(),
            off_last: HashMap::new(),
            gil_last: HashMap::new(),
            departing: HashMap::new(),
            profiles: HashMap::new(),
            processes: Default::default(),
            spans_dropped: 0,
            advice: config
                .advice
                .enabled
                .then(|| advice::Windows::new(config.advice.window, config.advice.half_life)),
            entries: HashMap::new(),
        }
    }

    /// `scrapes`: how many times `/metrics` was read so far.
    pub(super) fn update(
        &mut self,
        collector: &Collector,
        tracker: &Tracker,
        live: &[u32],
        elapsed: Duration,
        scrapes: u64,
    ) {
        self.early.clear();
        // Samples since the last interval, by process.
        let mut deltas: HashMap<u32, Vec<(SampleKey, u64)>> = HashMap::new();
        for (key, count) in collector.counts() {
            let before = self.last.insert(*key, *count).unwrap_or(0);
            if *count > before {
                deltas.entry(key.tgid).or_default().push((*key, count - before));
            }
        }
        // Off-CPU time since the last interval, by process and state.
        let mut off_now: HashMap<OffKey, u64> = HashMap::new();
        for (key, ns) in collector.off() {
            *off_now.entry(*key).or_default() += ns;
        }
        // (state, its frame with the peer of a socket wait, seconds)
        let mut off_deltas: HashMap<u32, Vec<(&'static str, String, f64)>> = HashMap::new();
        for (key, ns) in off_now {
            let before = self.off_last.insert(key, ns).unwrap_or(0);
            if ns > before {
                let (reason, frame) = collector.state_of(&key);
                let state = crate::collect::wall::reason_name(reason);
                off_deltas.entry(key.sample.tgid).or_default().push((
                    state,
                    frame,
                    (ns - before) as f64 / 1e9,
                ));
            }
        }
        let mut gil_deltas: HashMap<u32, u64> = HashMap::new();
        for &(pid, samples) in collector.gil_held() {
            let before = self.gil_last.insert(pid, samples).unwrap_or(0);
            if samples > before {
                gil_deltas.insert(pid, samples - before);
            }
        }
        // A process that exited during the interval is reported once more, with its last
        // samples and its network figures (a process that waited through its last interval
        // has no samples in it). It goes at the next export, or, once something reads
        // `/metrics`, at the first export after `/metrics` was read since that last report
        // (the scraper has its final figures), at most `DEPARTED_EXPORTS` exports on.
        let departing = std::mem::take(&mut self.departing);
        let fresh = |pid: &u32| {
            deltas.contains_key(pid) || off_deltas.contains_key(pid) || gil_deltas.contains_key(pid)
        };
        self.processes.retain(|pid, _| {
            live.contains(pid)
                || fresh(pid)
                || departing
                    .get(pid)
                    .is_none_or(|&(reads, age)| scrapes > 0 && reads == scrapes && age + 1 < DEPARTED_EXPORTS)
        });
        self.departing = self
            .processes
            .keys()
            .copied()
            .filter(|pid| !live.contains(pid))
            .map(|pid| match departing.get(&pid) {
                Some(&(reads, age)) if !fresh(&pid) => (pid, (reads, age + 1)),
                _ => (pid, (scrapes, 0)),
            })
            .collect();
        self.unnamed.retain(|pid| live.contains(pid));
        // Pods listed since: name the processes that run in them.
        let generation = self.lookup.as_ref().map_or(0, PodLookup::generation);
        if generation != self.generation {
            self.generation = generation;
            for pid in std::mem::take(&mut self.unnamed) {
                let (resource, declared) = self.resource(pid, tracker);
                if let Some(p) = self.processes.get_mut(&pid) {
                    (p.resource, p.declared) = (resource, declared);
                }
            }
        }
        self.profiles = deltas
            .iter()
            .map(|(pid, counts)| (*pid, collector.profile_of(counts, View::default())))
            .collect();
        self.observe(live, tracker);
        let mut cgroups: HashMap<Cgroup, CgroupStats> = HashMap::new();
        for (&pid, p) in self.processes.iter_mut() {
            let mut sampled = 0.0;
            // The interval's CPU seconds by leaf function (many stacks end in each).
            let mut functions: HashMap<String, f64> = HashMap::new();
            if let Some(profile) = self.profiles.get(&pid) {
                for (frames, n) in &profile.stacks {
                    let cpu = *n as f64 / self.rate_hz;
                    sampled += cpu;
                    if let Some(function) = frames.last().and_then(python_function) {
                        *functions.entry(function).or_default() += cpu;
                    }
                }
            }
            // The kernel's accounting is exact (sampling at a low rate misses a duty-cycled
            // process by 15% and more an interval); samples split it across functions. A
            // process seen for the first time, or gone (its last interval), counts its samples.
            let accounted = process::cpu_time(pid);
            let seconds = match (accounted, p.accounted) {
                (Some(now), Some(before)) => (now - before).max(0.0),
                _ => sampled,
            };
            p.cpu_seconds = match (accounted, p.accounted) {
                (Some(now), _) => now,
                (None, _) => p.cpu_seconds + sampled,
            };
            p.accounted = accounted;
            let scale = if sampled > 0.0 { seconds / sampled } else { 0.0 };
            for cpu in functions.values_mut() {
                *cpu *= scale;
            }
            for (function, cpu) in &functions {
                *p.functions.entry(function.clone()).or_default() += cpu;
            }
            let off = off_deltas.remove(&pid).unwrap_or_default();
            for (state, _, secs) in &off {
                *p.off_cpu.entry(state).or_default() += secs;
            }
            if self.advice.is_some() {
                let entry = self.entries.entry(pid).or_default();
                (entry.elapsed_s, entry.cpu_s) = (elapsed.as_secs_f64(), seconds);
                entry.off_cpu = off.into_iter().map(|(_, frame, secs)| (frame, secs)).collect();
                entry.functions = functions.into_iter().collect();
            }
            if let Some(samples) = gil_deltas.remove(&pid) {
                *p.gil_held_seconds.get_or_insert(0.0) += samples as f64 / self.rate_hz;
            }
            p.utilization = seconds / elapsed.as_secs_f64().max(1e-3) / self.cpus;
            // A process gone keeps the size it last had (its last report).
            if let Some(rss) = rss_bytes(pid) {
                p.memory_bytes = rss;
            }
            // Its cgroup, read once per export however many processes it holds; a process
            // that exited keeps its last figures.
            if let Some(cgroup) = Cgroup::of(pid).filter(|c| !c.is_root()) {
                let stats = cgroups.entry(cgroup.clone()).or_insert_with(|| cgroup.read());
                p.cgroup = Some(stats.clone());
            }
        }
    }

    /// Notes the resource attributes of processes seen for the first time, while they
    /// live (one that exits before the next export still reports its samples).
    pub(super) fn observe(&mut self, live: &[u32], tracker: &Tracker) {
        // A new process in an old one's pid starts its own series (the old one's last
        // samples since the previous export go with it).
        for pid in tracker.reused() {
            self.processes.remove(pid);
            self.unnamed.remove(pid);
        }
        for &pid in live {
            if !self.processes.contains_key(&pid) {
                let (resource, declared) = self.resource(pid, tracker);
                let started_ns = process::started_unix_ns(pid);
                self.processes
                    .insert(pid, ProcessMetrics { resource, declared, started_ns, ..Default::default() });
            }
        }
        // A fork that exited before it was looked at (a short-lived worker) is its parent's
        // program in its parent's container: it reports under its parent's attributes.
        for &(pid, parent) in tracker.forks() {
            if self.processes.contains_key(&pid) {
                continue;
            }
            if let Some((mut resource, declared)) =
                self.processes.get(&parent).map(|p| (p.resource.clone(), p.declared))
            {
                resource.insert("process.pid".into(), pid.to_string());
                self.processes.insert(pid, ProcessMetrics { resource, declared, ..Default::default() });
            }
        }
    }

    /// The resource attributes of process `pid`, and its container's requests and limits;
    /// one in a pod the lookup does not know yet is remembered in `unnamed` and rebuilt
    /// after the next list.
    fn resource(
        &mut self,
        pid: u32,
        tracker: &Tracker,
    ) -> (BTreeMap<String, String>, Option<crate::k8s::pods::Resources>) {
        let placement = Placement::of(pid);
        let index = self.lookup.as_ref().map(PodLookup::index);
        let found = index.as_deref().and_then(|i| i.find(&placement));
        let mut r = BTreeMap::new();
        if let Some(f) = found {
            r.insert("k8s.namespace.name".into(), f.pod.namespace.clone());
            r.insert("k8s.pod.name".into(), f.pod.name.clone());
            r.insert("k8s.pod.uid".into(), f.pod.uid.clone());
            if let Some(c) = f.container {
                r.insert("k8s.container.name".into(), c.to_string());
            }
        }
        if let (Some(lookup), Some(uid)) = (&self.lookup, &placement.pod_uid)
            && found.is_none_or(|f| f.container.is_none())
        {
            self.unnamed.insert(pid);
            lookup.want(uid);
        }
        let container_name = found.and_then(|f| f.container);
        let declared = found.and_then(|f| f.pod.resources.get(f.container?)).copied();
        r.insert("service.name".into(), resource::service_name(pid, container_name));
        r.insert("process.pid".into(), pid.to_string());
        r.insert("process.executable.name".into(), process::comm(pid));
        r.insert("process.runtime.name".into(), "CPython".into());
        if let Some(v) = tracker.version(pid) {
            r.insert("process.runtime.version".into(), v.into());
        }
        r.insert("host.name".into(), process::hostname());
        if let Some(c) = placement.container_id {
            r.insert("container.id".into(), c);
        }
        if let Some(node) = &self.node {
            r.insert("k8s.node.name".into(), node.clone());
        }
        (r, declared)
    }

    /// Adds an interval's network metrics to the processes they belong to.
    pub(super) fn fold_network(&mut self, m: &NetMetrics, queue_seen: bool) {
        for (&pid, p) in self.processes.iter_mut() {
            p.net.fold(pid, m);
            if self.advice.is_some() {
                advice::add_network(self.entries.entry(pid).or_default(), pid, m, queue_seen);
            }
        }
    }

    /// Ends the interval's figures of each process: into its window, and its advice from
    /// the window. `loop_blocks`: the interval's blocked event-loop stretches (ns, and the
    /// function seen most in each) by pid.
    pub(super) fn advise(&mut self, loop_blocks: &HashMap<u32, Vec<(u64, String)>>) {
        let Some(windows) = self.advice.as_mut() else { return };
        let entries = std::mem::take(&mut self.entries);
        let children = crate::advise::children();
        for (pid, mut entry) in entries {
            let Some(p) = self.processes.get_mut(&pid) else { continue };
            (entry.cgroup, entry.rss, entry.declared) = (p.cgroup.clone(), p.memory_bytes, p.declared);
            entry.loop_blocks = loop_blocks
                .get(&pid)
                .map_or_else(Vec::new, |d| d.iter().map(|(ns, f)| (*ns as f64 / 1e9, f.clone())).collect());
            windows.push(pid, entry);
            let service = p.resource.get("service.name").cloned().unwrap_or_default();
            if let Some(facts) =
                windows.facts(pid, &service, self.cpus, crate::advise::workers(pid, &children))
            {
                p.advice = crate::advise::rules::findings(&facts);
            }
        }
        let processes = &self.processes;
        windows.retain(|pid| processes.contains_key(&pid));
    }

    /// Adds to `snapshot` (what /metrics shows) the processes found since it was made,
    /// with the CPU time and memory the kernel accounts of them so far, and keeps those
    /// figures current until their first export; their samples and functions follow at that
    /// export. The count of processes follows. The memory read now is kept as the process's
    /// last known size (one that exits before the next export reports it).
    pub(super) fn publish_new(&mut self, snapshot: &mut state::Snapshot) {
        let mut added = false;
        for (&pid, p) in self.processes.iter_mut() {
            if let Some(shown) = snapshot.processes.get_mut(&pid) {
                // Published early: the counter grows from the figure first shown (the next
                // export's interval counts from that one, `accounted`).
                if self.early.contains(&pid) {
                    if let Some(cpu) = process::cpu_time(pid) {
                        shown.cpu_seconds = shown.cpu_seconds.max(cpu);
                    }
                    if let Some(rss) = rss_bytes(pid) {
                        (p.memory_bytes, shown.memory_bytes) = (rss, rss);
                    }
                }
                continue;
            }
            if let Some(rss) = rss_bytes(pid) {
                p.memory_bytes = rss;
            }
            // The kernel's figure now is the process's first: the next export's interval
            // counts from it, so its utilization matches the counter's growth.
            if p.accounted.is_none() {
                p.accounted = process::cpu_time(pid);
                p.cpu_seconds = p.accounted.unwrap_or(0.0);
            }
            snapshot.processes.insert(pid, p.clone());
            self.early.insert(pid);
            added = true;
        }
        if added {
            snapshot.health.processes = snapshot.processes.len() as u64;
        }
    }

    /// The agent's counters; export failures and drops summed over every exporter.
    pub(super) fn health<'a>(
        &self,
        kernel: &KernelPrograms,
        exporters: impl Iterator<Item = &'a Exporter>,
        processes: usize,
    ) -> state::Health {
        let stats = kernel.stats().unwrap_or_default();
        let (mut failures, mut dropped) = (0, 0);
        for e in exporters {
            failures += e.stats.failures.load(Ordering::Relaxed);
            dropped += e.stats.dropped.load(Ordering::Relaxed);
        }
        state::Health {
            samples: stats.samples,
            lost: stats.lost + stats.stacks_dropped + stats.py_stacks_full,
            export_failures: failures,
            dropped_batches: dropped,
            processes: processes as u64,
            net_lost: stats.net_events_lost + stats.net_conns_full + stats.net_socks_full,
            spans_dropped: self.spans_dropped,
            losses: stats.losses().to_vec(),
        }
    }
}

/// `qualname (file.py)` of a Python frame, the function without its line; None for others.
fn python_function(frame: &Frame) -> Option<String> {
    Some(format!("{} ({})", frame.function()?, frame.file()?))
}

/// Resident bytes of process `pid`; None once it is gone (or a zombie, whose memory is).
fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    (pages > 0).then_some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_functions_drop_the_line() {
        let py = Frame::Python { function: "Foo.bar".into(), file: "app/x.py".into(), line: 12 };
        assert_eq!(python_function(&py).as_deref(), Some("Foo.bar (app/x.py)"));
        assert_eq!(python_function(&Frame::Native { function: "_PyEval_EvalFrameDefault".into() }), None);
        assert_eq!(python_function(&Frame::Kernel { function: "read_zero".into() }), None);
    }
}
