//! The node agent's main loop (`stoker agent`): loads the kernel programs, follows the
//! node's CPython processes and exports every interval until SIGINT or SIGTERM.
use agent_ebpf::{PY_STACKS_CAPACITY, STACKS_CAPACITY};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use super::{
    config::AgentConfig,
    export::{exporter::Exporter, logs, metrics, profiles, pyroscope, traces},
    http,
    interval::Interval,
    select::{Selection, Verdict},
    state::Snapshot,
};
use crate::{
    collect::{Collector, NamingPace, Tracker},
    error::{Error, Result},
    k8s::{
        client::{ApiConfig, Client},
        lookup::PodLookup,
        pods::Placement,
    },
    net::{Aggregator, Drainer, NetTracer, existing::Adopter, spans::SpanSampler},
    programs::KernelPrograms,
    sys::{caps, process},
};

const TICK: Duration = Duration::from_millis(100);
/// How long the agent takes to end after SIGINT or SIGTERM at most: the last interval is
/// collected and queued, then the exporters get what is left of it to send their queues.
const SHUTDOWN: Duration = Duration::from_millis(1800);
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
        host: process::hostname(),
        top_functions: config.metrics.top_functions,
        agent_attributes: env("OTEL_RESOURCE_ATTRIBUTES").map(|a| parse_attributes(&a)).unwrap_or_default(),
        advice_window: config.advice.enabled.then_some(config.advice.window),
        ..Default::default()
    }));
    // Everything that needs CAP_BPF or CAP_PERFMON happens first, before any thread starts:
    // capabilities are per thread, and the ones not needed after this are dropped below.
    let mut kernel =
        KernelPrograms::load_sized(false, config.kernel.counts_max_bytes, config.network.detail)?;
    kernel.start(config.sample_rate_hz)?;
    if let Err(e) = kernel.watch_execs(true) {
        tracing::warn!("new processes are found by scanning /proc only: {e}");
    }
    if let Err(e) = kernel.follow_children() {
        tracing::warn!("forked workers are found by scanning /proc only: {e}");
    }
    let tracer = match config.network.enabled {
        true => {
            NetTracer::attach(&mut kernel).map_err(|e| tracing::warn!("network latency is off: {e}")).ok()
        }
        false => None,
    };
    if config.off_cpu.enabled {
        if let Err(e) = kernel.watch_off_cpu(config.off_cpu.waits, config.off_cpu.switch_budget) {
            tracing::warn!("off-CPU time is off: {e}");
        }
        let threshold = config.off_cpu.loop_block_threshold;
        if !threshold.is_zero()
            && let Err(e) = kernel.watch_loops(threshold)
        {
            tracing::warn!("blocked event loops are not reported: {e}");
        }
    }
    drop_capabilities();

    // /healthz fails once the loop has not completed a tick for three export intervals (at
    // least 30 s): an export tick symbolizes every new stack, which takes a while on a busy node.
    let heartbeat = Arc::new(http::Heartbeat::new((config.export_interval * 3).max(Duration::from_secs(30))));
    http::serve(&config.prometheus.listen, snapshot.clone(), heartbeat.clone())?;
    let selection = Selection::new(&config.select);
    let lookup = start_lookup(config, &selection, env)?;
    let net = match tracer {
        Some(tracer) => {
            let mut aggregator = Aggregator::new();
            let s = &config.network.spans;
            aggregator.spans = config.export.traces.as_ref().map(|_| {
                SpanSampler::new(s.sample_ratio, s.slow_threshold.as_nanos() as u64, s.max_per_interval)
            });
            Some(Drainer::start(tracer, aggregator)?)
        }
        None => None,
    };
    let mut adopter = Adopter::default();
    let mut tracker = Tracker::new(true, false);
    if config.off_cpu.enabled {
        tracker.count_gil();
    }
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
    let limits = config.export_limits();
    let metrics = config.export.metrics.as_ref().map(|t| Exporter::otlp(t, limits)).transpose()?;
    let profiles = config.export.profiles.as_ref().map(|t| Exporter::otlp(t, limits)).transpose()?;
    let pyroscope = config.pyroscope.url.as_deref().map(|u| pyroscope::exporter(u, limits)).transpose()?;
    let traces = match net.as_ref().and(config.export.traces.as_ref()) {
        Some(target) => Some(Exporter::otlp(target, limits)?),
        None => None,
    };
    let logs = config.export.logs.as_ref().map(|t| Exporter::otlp(t, limits)).transpose()?;
    let mut advised = logs::Advised::new(config.advice.window);
    let targets =
        [&config.export.metrics, &config.export.profiles, &config.export.traces, &config.export.logs];
    for target in targets.into_iter().flatten() {
        tracing::info!("OTLP {:?} over {:?} to {}", target.signal, target.protocol, target.url);
    }
    let mut agent = Interval::new(config, env, lookup);
    let mut collector = Collector::new(false);
    heartbeat.set_ready();
    // One line at any log level: what it watches and where it sends what it finds.
    let mut sinks: Vec<String> = targets
        .into_iter()
        .flatten()
        .map(|t| format!("{} to {}", format!("{:?}", t.signal).to_lowercase(), t.url))
        .collect();
    if let Some(url) = &config.pyroscope.url {
        sinks.push(format!("profiles to Pyroscope at {url}"));
    }
    sinks.push(format!("/metrics on {}", config.prometheus.listen));
    let watched = match (config.select.process_names.is_empty(), Selection::new(&config.select).is_empty()) {
        (true, true) => "every CPython process on this node".to_string(),
        _ => "the CPython processes its select section names".to_string(),
    };
    eprintln!(
        "stoker: agent sampling {watched} at {} Hz; every {}s: {}",
        config.sample_rate_hz,
        config.export_interval.as_secs_f64(),
        sinks.join(", ")
    );

    // Exports keep to a grid of export_interval from the start (each at its time, not a
    // tick late, and a late one does not push the next): a store that scrapes /metrics at
    // the same interval sees one export per scrape, and its rates do not alias.
    let mut last_export = Instant::now();
    let mut next_export = last_export + config.export_interval;
    let mut naming = NamingPace::new();
    let mut stop_seen = None;
    // Blocked event-loop stretches since the last export, and the function seen most in
    // each (named while its process lives), by process.
    let mut loop_blocks: std::collections::HashMap<u32, Vec<(u64, String)>> =
        std::collections::HashMap::new();
    let mut loop_threads = crate::collect::PythonThreads::default();
    let agent_started = process::start_time(std::process::id());
    let mut waits_looked_at: std::collections::HashSet<u32> = std::collections::HashSet::new();
    loop {
        let until_export = next_export.saturating_duration_since(Instant::now());
        tracker.wait(TICK.min(until_export), &mut kernel, &mut collector)?;
        let stopping = stop.load(Ordering::Relaxed);
        if stopping {
            stop_seen.get_or_insert_with(Instant::now);
        }
        tracker.update(&mut kernel, &mut collector)?;
        for block in kernel.take_loop_blocks() {
            if !loop_threads.runs_python(&tracker, block.tgid, block.tid) {
                continue;
            }
            let stack = collector.loop_block_stack(&kernel, &block);
            let function = stack.last().map_or_else(|| "code not sampled".into(), ToString::to_string);
            loop_blocks.entry(block.tgid).or_default().push((block.duration_ns, function));
        }
        let live = tracker.live_targets();
        let alive: std::collections::HashSet<u32> = live.iter().copied().collect();
        loop_threads.retain(&alive);
        agent.observe(&live, &tracker);
        // A process that ran before the agent: its threads blocked since then were seen by
        // no switch, and their waits count from now.
        if config.off_cpu.enabled {
            let older: Vec<u32> = live
                .iter()
                .copied()
                .filter(|&pid| waits_looked_at.insert(pid))
                .filter(
                    |&pid| matches!((process::start_time(pid), agent_started), (Some(t), Some(a)) if t <= a),
                )
                .collect();
            if !older.is_empty() {
                crate::collect::waits::enter(&mut kernel, &mut collector, &tracker, &older);
            }
            waits_looked_at.retain(|pid| alive.contains(pid));
        }
        if net.is_some() {
            adopter.adopt_new(&mut kernel, &live);
        }
        if !stopping && Instant::now() < next_export {
            // New stacks are named while their processes live: a short-lived process's code
            // objects and mappings may be gone by the next export.
            naming.name(&kernel, false, || collector.collect(&kernel, &live, false))?;
            // Processes found since the last export show on /metrics now, with what the
            // kernel accounts of them, not only at the next export.
            let mut guard = snapshot.lock().unwrap_or_else(|e| e.into_inner());
            agent.publish_new(&mut guard);
        } else {
            let elapsed = last_export.elapsed();
            last_export = Instant::now();
            next_export += config.export_interval;
            if next_export <= last_export {
                next_export = last_export + config.export_interval;
            }
            naming.name(&kernel, true, || collector.collect(&kernel, &live, true))?;
            let scrapes = snapshot.lock().unwrap_or_else(|e| e.into_inner()).scrapes;
            agent.update(&collector, &tracker, &live, elapsed, scrapes);
            for (pid, blocks) in &loop_blocks {
                if let Some(p) = agent.processes.get_mut(pid) {
                    p.net.add_loop_blocks(&blocks.iter().map(|(ns, _)| *ns).collect::<Vec<_>>());
                }
            }
            let mut spans = Vec::new();
            if let Some(drainer) = &net {
                let queue_seen = drainer.socket_queue();
                let mut aggregator = drainer.aggregator();
                agent.fold_network(&aggregator.take_interval(), queue_seen);
                if let Some(span_sampler) = aggregator.spans.as_mut() {
                    spans = span_sampler.take();
                    agent.spans_dropped = span_sampler.dropped;
                }
            }
            agent.advise(&loop_blocks);
            loop_blocks.clear();
            // Exited processes reported their last interval above: what they hold in the
            // kernel's maps and what was read of them goes.
            collector.evict_exited(&mut kernel, &live)?;
            agent.last.retain(|key, _| alive.contains(&key.tgid));
            agent.off_last.retain(|key, _| alive.contains(&key.sample.tgid));
            agent.gil_last.retain(|pid, _| alive.contains(pid));
            collector.forget_exited(&live);
            // Maps still close to full with live processes' stacks: emptied, named afresh.
            let full = |used: usize, capacity: u32| used as u64 > u64::from(capacity) * 3 / 4;
            if full(collector.counts().len(), kernel.sizes().counts)
                || full(collector.native_stacks(), STACKS_CAPACITY)
                || full(collector.py_stacks(), PY_STACKS_CAPACITY)
            {
                kernel.clear_counts()?;
                collector.forget_stacks();
                agent.last.clear();
            }
            // The same for off-CPU times: their cumulative figures carry on from what was seen.
            if full(collector.off_entries(), kernel.off_capacity()) {
                let keys: Vec<agent_ebpf::OffKey> = agent.off_last.keys().copied().collect();
                kernel.remove_off(&keys)?;
                agent.off_last.clear();
            }
            let snap = {
                let mut guard = snapshot.lock().unwrap_or_else(|e| e.into_inner());
                guard.time = Some(SystemTime::now());
                guard.processes = agent.processes.clone();
                let exporters = [&metrics, &profiles, &pyroscope, &traces, &logs].into_iter().flatten();
                guard.health = agent.health(&kernel, exporters, agent.processes.len());
                guard.clone()
            };
            if let Some(exporter) = &metrics {
                exporter.push(&metrics::request(&snap));
            }
            if let Some(exporter) = &profiles
                && let Some(request) =
                    profiles::request(&agent.profiles, &snap, config.sample_rate_hz, elapsed)
            {
                exporter.push(&request);
            }
            if let Some(exporter) = &logs
                && let Some(request) =
                    advised.request(&snap.processes, exporter.stats.dropped.load(Ordering::Relaxed))
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
            drop(snap);
            // An export builds and drops large buffers (requests, the snapshot's copy): the
            // allocator gives their free pages back to the system, so the agent's resident
            // size follows what it holds, not the largest export so far.
            // SAFETY: glibc's malloc_trim takes no pointers and only releases free memory.
            unsafe { libc::malloc_trim(0) };
        }
        heartbeat.beat();
        if stopping {
            break;
        }
    }
    let exporters: Vec<Exporter> =
        [metrics, profiles, pyroscope, traces, logs].into_iter().flatten().collect();
    for exporter in &exporters {
        exporter.close();
    }
    // The kernel programs detach (half a second and more: see `KernelPrograms`) while the
    // exporters send what they hold, within the same deadline.
    drop(net);
    let detach = std::thread::spawn(move || drop(kernel));
    let by = stop_seen.unwrap_or_else(Instant::now) + SHUTDOWN;
    for exporter in exporters {
        exporter.shutdown_by(by);
    }
    let _ = detach.join();
    Ok(())
}

/// Keeps only the capabilities reading other processes needs ([`caps::AFTER_LOAD`]): the
/// programs are loaded and attached, and their maps are used through open descriptors.
fn drop_capabilities() {
    if !caps::maps_usable_without_caps() {
        tracing::info!("capabilities kept: before Linux 6.5, using BPF maps needs CAP_BPF");
        return;
    }
    match caps::keep_only(&caps::AFTER_LOAD) {
        Ok(0) => {}
        Ok(dropped) => tracing::info!("dropped {} after loading", caps::names(dropped).join(", ")),
        Err(e) => tracing::warn!("cannot drop capabilities after loading: {e}"),
    }
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

/// `k=v,k=v` as in OTEL_RESOURCE_ATTRIBUTES (values may be percent-encoded; kept as is).
fn parse_attributes(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
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
}
