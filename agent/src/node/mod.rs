//! The node agent (`stoker agent`): samples a node's CPython processes continuously and
//! exports per-process CPU, memory and top functions as OTLP metrics and on /metrics.
pub mod config;
pub mod exporter;
pub mod http;
pub mod netstate;
pub mod otlp;
pub mod profiles;
pub mod pyroscope;
pub mod resource;
pub mod select;
pub mod state;
pub mod traces;
pub mod transport;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use agent_ebpf::{COUNTS_CAPACITY, SampleKey};

use self::{
    config::AgentConfig,
    exporter::Exporter,
    select::{Selection, Verdict},
    state::{ProcessMetrics, Snapshot},
};
use crate::{
    collect::{Collector, Tracker, View},
    error::{Error, Result},
    k8s::{
        client::{ApiConfig, Client},
        lookup::PodLookup,
        pods::Placement,
    },
    net::{Aggregator, NetMetrics, NetTracer, existing::Adopter, spans::SpanSampler},
    profile::{Frame, Profile},
    programs::KernelPrograms,
    sys::process,
};

const TICK: Duration = Duration::from_millis(100);
/// How long a SIGTERM waits for queued batches to go out.
const FLUSH_DEADLINE: Duration = Duration::from_secs(5);
/// How long the start waits for the first pod list (the API server may be down).
const FIRST_POD_LIST: Duration = Duration::from_secs(3);

/// Runs the agent until SIGINT or SIGTERM; `env` reads environment variables.
pub fn run(config: &AgentConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let snapshot = Arc::new(Mutex::new(Snapshot {
        start: Some(SystemTime::now()),
        host: hostname(),
        top_functions: config.metrics.top_functions,
        agent_attributes: env("OTEL_RESOURCE_ATTRIBUTES").map(|a| parse_attributes(&a)).unwrap_or_default(),
        ..Default::default()
    }));
    let ready = Arc::new(AtomicBool::new(false));
    http::serve(&config.prometheus.listen, snapshot.clone(), ready.clone())?;

    let selection = Selection::new(&config.select);
    let lookup = start_lookup(config, &selection, env)?;
    let mut kernel = KernelPrograms::load(false)?;
    kernel.start(config.sample_rate_hz)?;
    if let Err(e) = kernel.watch_execs() {
        tracing::warn!("new processes are found by scanning /proc only: {e}");
    }
    let mut net = match config.network.enabled {
        true => match NetTracer::attach(&mut kernel) {
            Ok(tracer) => {
                let mut aggregator = Aggregator::new();
                let s = &config.network.spans;
                aggregator.spans = config.export.traces.as_ref().map(|_| {
                    SpanSampler::new(s.sample_ratio, s.slow_threshold.as_nanos() as u64, s.max_per_interval)
                });
                Some((tracer, aggregator))
            }
            Err(e) => {
                tracing::warn!("network latency is off: {e}");
                None
            }
        },
        false => None,
    };
    let mut adopter = Adopter::default();
    let mut tracker = Tracker::new(true, false);
    let patterns: Vec<regex::Regex> =
        config.select.process_names.iter().filter_map(|p| regex::Regex::new(p).ok()).collect();
    if !patterns.is_empty() || !selection.is_empty() {
        let lookup = lookup.clone();
        tracker.set_filter(Box::new(move |pid| {
            if !patterns.is_empty() {
                let comm = process::comm(pid);
                let exe = process::exe(pid).map(|e| e.display().to_string()).unwrap_or_default();
                if !patterns.iter().any(|p| p.is_match(&comm) || p.is_match(&exe)) {
                    return false;
                }
            }
            selected(&selection, lookup.as_ref(), pid)
        }));
    }
    let capacity = config.queue.max_batches;
    let metrics = config.export.metrics.as_ref().map(|t| Exporter::otlp(t, capacity)).transpose()?;
    let profiles = config.export.profiles.as_ref().map(|t| Exporter::otlp(t, capacity)).transpose()?;
    let pyroscope = config.pyroscope.url.as_deref().map(|u| pyroscope::exporter(u, capacity)).transpose()?;
    let traces = match net.as_ref().and(config.export.traces.as_ref()) {
        Some(target) => Some(Exporter::otlp(target, capacity)?),
        None => None,
    };
    let targets = [&config.export.metrics, &config.export.profiles, &config.export.traces];
    for target in targets.into_iter().flatten() {
        tracing::info!("OTLP {:?} over {:?} to {}", target.signal, target.protocol, target.url);
    }
    let mut agent = Interval::new(config, env, lookup);
    let mut collector = Collector::new(false);
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        "stoker agent sampling at {} Hz, exporting every {:?}",
        config.sample_rate_hz,
        config.export_interval
    );

    let mut last_export = Instant::now();
    loop {
        match net.as_mut() {
            Some((tracer, aggregator)) => tracer.sleep_draining(aggregator, TICK),
            None => std::thread::sleep(TICK),
        }
        let stopping = stop.load(Ordering::Relaxed);
        tracker.update(&mut kernel, &mut collector)?;
        let live = tracker.live_targets();
        agent.observe(&live, &tracker);
        if net.is_some() {
            adopter.adopt_new(&mut kernel, &live);
        }
        if stopping || last_export.elapsed() >= config.export_interval {
            let elapsed = last_export.elapsed();
            last_export = Instant::now();
            collector.collect(&kernel, &live, true)?;
            agent.update(&collector, &tracker, &live, elapsed);
            let mut spans = Vec::new();
            if let Some((_, aggregator)) = net.as_mut() {
                agent.fold_network(&aggregator.take_interval());
                if let Some(span_sampler) = aggregator.spans.as_mut() {
                    spans = span_sampler.take();
                    agent.spans_dropped = span_sampler.dropped;
                }
            }
            if collector.counts().len() as u64 > u64::from(COUNTS_CAPACITY) * 3 / 4 {
                kernel.clear_counts()?;
                collector.forget_stacks(&live);
                agent.last.clear();
            }
            let snap = {
                let mut guard = snapshot.lock().unwrap_or_else(|e| e.into_inner());
                guard.time = Some(SystemTime::now());
                guard.processes = agent.processes.clone();
                let exporters = [&metrics, &profiles, &pyroscope, &traces].into_iter().flatten();
                guard.health = agent.health(&kernel, exporters, live.len());
                guard.clone()
            };
            if let Some(exporter) = &metrics {
                exporter.push(&snap.otlp());
            }
            if let Some(exporter) = &profiles
                && let Some(request) =
                    profiles::request(&agent.profiles, &snap, config.sample_rate_hz, elapsed)
            {
                exporter.push(&request);
            }
            if let Some(exporter) = &traces
                && let Some(request) = traces::request(&spans, &snap.processes, traces::mono_to_unix_ns())
            {
                exporter.push(&request);
            }
            if let Some(pyroscope) = &pyroscope {
                let body = pyroscope::push_request(&agent.profiles, &snap, config.sample_rate_hz, elapsed);
                if let Some(body) = body {
                    pyroscope.push_bytes(body);
                }
            }
        }
        if stopping {
            break;
        }
    }
    for exporter in [metrics, profiles, pyroscope, traces].into_iter().flatten() {
        exporter.shutdown(FLUSH_DEADLINE);
    }
    Ok(())
}

/// Starts the pod lookup when enabled and possible; without one, selectors that need it
/// are an error and anything else goes on without k8s.* attributes.
fn start_lookup(
    config: &AgentConfig,
    selection: &Selection,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<PodLookup>> {
    if !config.kubernetes.enabled {
        return Ok(None);
    }
    match ApiConfig::resolve(&config.kubernetes, env) {
        Ok(api) => {
            tracing::info!("listing the pods of node {} from {}", api.node, api.url);
            let client = Client::new(api).map_err(|e| Error::Kubernetes(e.to_string()))?;
            Ok(Some(PodLookup::start(client, config.kubernetes.refresh_interval, FIRST_POD_LIST)?))
        }
        Err(reason) if selection.needs_pods() => {
            Err(Error::Kubernetes(format!("{reason}, and select.namespaces or select.pod_labels need it")))
        }
        Err(reason) => {
            tracing::info!("no Kubernetes pod lookup: {reason}");
            Ok(None)
        }
    }
}

/// Whether process `pid` is in the selected namespaces, pods and containers; a process
/// in a pod not known yet is not, and asks the lookup to list the pods again.
fn selected(selection: &Selection, lookup: Option<&PodLookup>, pid: u32) -> bool {
    if selection.is_empty() {
        return true;
    }
    let placement = Placement::of(pid);
    let index = lookup.map(PodLookup::index);
    let found = index.as_deref().and_then(|i| i.find(&placement));
    match selection.verdict(&placement, found, lookup.is_some()) {
        Verdict::Take => true,
        Verdict::Skip => false,
        Verdict::Later => {
            if let (Some(lookup), Some(uid)) = (lookup, &placement.pod_uid) {
                lookup.want(uid);
            }
            false
        }
    }
}

/// Per-interval bookkeeping: cumulative counts seen, per-process metrics.
struct Interval {
    rate_hz: f64,
    cpus: f64,
    node: Option<String>,
    lookup: Option<PodLookup>,
    /// The lookup's generation the resources were last built against.
    generation: u64,
    /// Processes in a pod the lookup did not know when their resource was built.
    unnamed: HashSet<u32>,
    last: HashMap<SampleKey, u64>,
    /// This interval's profile of each process (its metrics and Pyroscope push use it).
    profiles: HashMap<u32, Profile>,
    processes: std::collections::BTreeMap<u32, ProcessMetrics>,
    /// Spans chosen but not sent (over `network.spans.max_per_interval`), since the start.
    spans_dropped: u64,
}

impl Interval {
    fn new(config: &AgentConfig, env: &dyn Fn(&str) -> Option<String>, lookup: Option<PodLookup>) -> Self {
        Self {
            rate_hz: config.sample_rate_hz as f64,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
            node: config.kubernetes.node_name.clone().or_else(|| env("NODE_NAME")),
            lookup,
            generation: 0,
            unnamed: HashSet::new(),
            last: HashMap::new(),
            profiles: HashMap::new(),
            processes: Default::default(),
            spans_dropped: 0,
        }
    }

    fn update(&mut self, collector: &Collector, tracker: &Tracker, live: &[u32], elapsed: Duration) {
        // Samples since the last interval, by process.
        let mut deltas: HashMap<u32, Vec<(SampleKey, u64)>> = HashMap::new();
        for (key, count) in collector.counts() {
            let before = self.last.insert(*key, *count).unwrap_or(0);
            if *count > before {
                deltas.entry(key.tgid).or_default().push((*key, count - before));
            }
        }
        // A process that exited during the interval reports its last samples once more.
        self.processes.retain(|pid, _| live.contains(pid) || deltas.contains_key(pid));
        self.unnamed.retain(|pid| live.contains(pid));
        // Pods listed since: name the processes that run in them.
        let generation = self.lookup.as_ref().map_or(0, PodLookup::generation);
        if generation != self.generation {
            self.generation = generation;
            for pid in std::mem::take(&mut self.unnamed) {
                let resource = self.resource(pid, tracker);
                if let Some(p) = self.processes.get_mut(&pid) {
                    p.resource = resource;
                }
            }
        }
        self.profiles = deltas
            .iter()
            .map(|(pid, counts)| (*pid, collector.profile_of(counts, View::default())))
            .collect();
        self.observe(live, tracker);
        for (&pid, p) in self.processes.iter_mut() {
            let mut seconds = 0.0;
            if let Some(profile) = self.profiles.get(&pid) {
                for (frames, n) in &profile.stacks {
                    let cpu = *n as f64 / self.rate_hz;
                    seconds += cpu;
                    if let Some(function) = frames.last().and_then(python_function) {
                        *p.functions.entry(function).or_default() += cpu;
                    }
                }
            }
            p.cpu_seconds += seconds;
            p.utilization = seconds / elapsed.as_secs_f64().max(1e-3) / self.cpus;
            p.memory_bytes = rss_bytes(pid);
        }
    }

    /// Notes the resource attributes of processes seen for the first time, while they
    /// live (one that exits before the next export still reports its samples).
    fn observe(&mut self, live: &[u32], tracker: &Tracker) {
        for &pid in live {
            if !self.processes.contains_key(&pid) {
                let resource = self.resource(pid, tracker);
                self.processes.insert(pid, ProcessMetrics { resource, ..Default::default() });
            }
        }
    }

    /// The resource attributes of process `pid`; one in a pod the lookup does not know
    /// yet is remembered in `unnamed` and rebuilt after the next list.
    fn resource(&mut self, pid: u32, tracker: &Tracker) -> BTreeMap<String, String> {
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
        r.insert("service.name".into(), resource::service_name(pid, container_name));
        r.insert("process.pid".into(), pid.to_string());
        r.insert("process.executable.name".into(), process::comm(pid));
        r.insert("process.runtime.name".into(), "CPython".into());
        if let Some(v) = tracker.version(pid) {
            r.insert("process.runtime.version".into(), v.into());
        }
        r.insert("host.name".into(), hostname());
        if let Some(c) = placement.container_id {
            r.insert("container.id".into(), c);
        }
        if let Some(node) = &self.node {
            r.insert("k8s.node.name".into(), node.clone());
        }
        r
    }

    /// Adds an interval's network metrics to the processes they belong to.
    fn fold_network(&mut self, m: &NetMetrics) {
        for (&pid, p) in self.processes.iter_mut() {
            p.net.fold(pid, m);
        }
    }

    /// The agent's counters; export failures and drops summed over every exporter.
    fn health<'a>(
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
        }
    }
}

/// `qualname (file.py)` of a Python frame, the function without its line; None for others.
fn python_function(frame: &Frame) -> Option<String> {
    Some(format!("{} ({})", frame.function()?, frame.file()?))
}

/// `k=v,k=v` as in OTEL_RESOURCE_ATTRIBUTES (values may be percent-encoded; kept as is).
fn parse_attributes(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn rss_bytes(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_attributes_from_the_environment() {
        let attrs = parse_attributes("service.name=stoker-agent, k8s.node.name=node-1,,bad");
        assert_eq!(
            attrs,
            vec![("service.name".into(), "stoker-agent".into()), ("k8s.node.name".into(), "node-1".into())]
        );
    }

    #[test]
    fn python_functions_drop_the_line() {
        let py = Frame::Python { function: "Foo.bar".into(), file: "app/x.py".into(), line: 12 };
        assert_eq!(python_function(&py).as_deref(), Some("Foo.bar (app/x.py)"));
        assert_eq!(python_function(&Frame::Native { function: "_PyEval_EvalFrameDefault".into() }), None);
        assert_eq!(python_function(&Frame::Kernel { function: "read_zero".into() }), None);
    }
}
