//! Every metric the agent exports, defined once: OTLP name, unit, instrument, Prometheus
//! name and help. The OTLP and Prometheus renderings both read these definitions.

/// How a metric's points aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Instrument {
    /// Monotonic, cumulative.
    Counter,
    Gauge,
    /// Cumulative, with these bucket bounds (seconds).
    Histogram(&'static [f64]),
}

/// One metric.
#[derive(Debug)]
pub(crate) struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub instrument: Instrument,
    pub prometheus: &'static str,
    pub help: &'static str,
}

impl Metric {
    /// The Prometheus `# TYPE`.
    pub fn prometheus_type(&self) -> &'static str {
        match self.instrument {
            Instrument::Counter => "counter",
            Instrument::Gauge => "gauge",
            Instrument::Histogram(_) => "histogram",
        }
    }
}

const fn def(
    name: &'static str,
    unit: &'static str,
    instrument: Instrument,
    prometheus: &'static str,
    help: &'static str,
) -> Metric {
    Metric { name, unit, instrument, prometheus, help }
}

use Instrument::{Counter, Gauge, Histogram};

// Per process.
pub(crate) const CPU_TIME: Metric = def(
    "process.cpu.time",
    "s",
    Counter,
    "process_cpu_time_seconds_total",
    "CPU time of the process: the kernel's accounting (user and system, all threads).",
);
pub(crate) const CPU_UTILIZATION: Metric = def(
    "process.cpu.utilization",
    "1",
    Gauge,
    "process_cpu_utilization_ratio",
    "CPU time over the last interval divided by its length and the CPUs.",
);
pub(crate) const MEMORY_USAGE: Metric =
    def("process.memory.usage", "By", Gauge, "process_memory_usage_bytes", "Resident memory of the process.");
// Per process, from its cgroup (v1 or v2): counters are the cgroup's own, since it was made.
pub(crate) const CGROUP_CPU_QUOTA: Metric = def(
    "stoker.cgroup.cpu.quota",
    "{cpu}",
    Gauge,
    "stoker_cgroup_cpu_quota",
    "CPU quota of the process's cgroup in CPUs (quota / period); absent when unlimited.",
);
pub(crate) const CGROUP_CPU_PERIODS: Metric = def(
    "stoker.cgroup.cpu.periods",
    "{period}",
    Counter,
    "stoker_cgroup_cpu_periods_total",
    "Quota periods in which the cgroup's processes ran.",
);
pub(crate) const CGROUP_CPU_THROTTLED_PERIODS: Metric = def(
    "stoker.cgroup.cpu.throttled.periods",
    "{period}",
    Counter,
    "stoker_cgroup_cpu_throttled_periods_total",
    "Quota periods in which the cgroup's processes were throttled.",
);
pub(crate) const CGROUP_CPU_THROTTLED_TIME: Metric = def(
    "stoker.cgroup.cpu.throttled.time",
    "s",
    Counter,
    "stoker_cgroup_cpu_throttled_time_seconds_total",
    "Time the cgroup's processes were kept off the CPU by the quota.",
);
pub(crate) const CGROUP_CPU_PRESSURE: Metric = def(
    "stoker.cgroup.cpu.pressure",
    "1",
    Gauge,
    "stoker_cgroup_cpu_pressure_ratio",
    "Share of the last 10 s some of the cgroup's tasks waited for a CPU (cgroup v2).",
);
pub(crate) const CGROUP_MEMORY_USAGE: Metric = def(
    "stoker.cgroup.memory.usage",
    "By",
    Gauge,
    "stoker_cgroup_memory_usage_bytes",
    "Memory the cgroup uses (anon and page cache).",
);
pub(crate) const CGROUP_MEMORY_PEAK: Metric = def(
    "stoker.cgroup.memory.peak",
    "By",
    Gauge,
    "stoker_cgroup_memory_peak_bytes",
    "The cgroup's peak memory use.",
);
pub(crate) const CGROUP_MEMORY_LIMIT: Metric = def(
    "stoker.cgroup.memory.limit",
    "By",
    Gauge,
    "stoker_cgroup_memory_limit_bytes",
    "The cgroup's memory limit; absent when unlimited.",
);
pub(crate) const CGROUP_MEMORY_ANON: Metric = def(
    "stoker.cgroup.memory.anon",
    "By",
    Gauge,
    "stoker_cgroup_memory_anon_bytes",
    "The cgroup's anonymous memory.",
);
pub(crate) const CGROUP_MEMORY_FILE: Metric = def(
    "stoker.cgroup.memory.file",
    "By",
    Gauge,
    "stoker_cgroup_memory_file_bytes",
    "The cgroup's page cache.",
);
pub(crate) const CGROUP_OOM_KILLS: Metric = def(
    "stoker.cgroup.memory.oom_kills",
    "{kill}",
    Counter,
    "stoker_cgroup_memory_oom_kills_total",
    "Processes of the cgroup killed for running out of memory.",
);
pub(crate) const CGROUP_MEMORY_PRESSURE: Metric = def(
    "stoker.cgroup.memory.pressure",
    "1",
    Gauge,
    "stoker_cgroup_memory_pressure_ratio",
    "Share of the last 10 s some of the cgroup's tasks waited for memory (cgroup v2).",
);

/// The cgroup metrics a process has (those its cgroup version and limits give).
pub(crate) fn cgroup_values(c: &crate::sys::cgroup::CgroupStats) -> Vec<(&'static Metric, f64)> {
    let pressure = |p: Option<crate::sys::cgroup::Pressure>| p.map(|p| p.some_avg10 / 100.0);
    let bytes = |b: Option<u64>| b.map(|b| b as f64);
    [
        (&CGROUP_CPU_QUOTA, c.cpu_quota),
        (&CGROUP_CPU_PERIODS, c.periods.map(|n| n as f64)),
        (&CGROUP_CPU_THROTTLED_PERIODS, c.throttled_periods.map(|n| n as f64)),
        (&CGROUP_CPU_THROTTLED_TIME, c.throttled_time),
        (&CGROUP_CPU_PRESSURE, pressure(c.cpu_pressure)),
        (&CGROUP_MEMORY_USAGE, bytes(c.memory_current)),
        (&CGROUP_MEMORY_PEAK, bytes(c.memory_peak)),
        (&CGROUP_MEMORY_LIMIT, bytes(c.memory_limit)),
        (&CGROUP_MEMORY_ANON, bytes(c.memory_anon)),
        (&CGROUP_MEMORY_FILE, bytes(c.memory_file)),
        (&CGROUP_OOM_KILLS, bytes(c.oom_kills)),
        (&CGROUP_MEMORY_PRESSURE, pressure(c.memory_pressure)),
    ]
    .into_iter()
    .filter_map(|(m, v)| Some((m, v?)))
    .collect()
}

/// Every per-process cgroup metric, in export order.
pub(crate) const CGROUP_METRICS: [&Metric; 12] = [
    &CGROUP_CPU_QUOTA,
    &CGROUP_CPU_PERIODS,
    &CGROUP_CPU_THROTTLED_PERIODS,
    &CGROUP_CPU_THROTTLED_TIME,
    &CGROUP_CPU_PRESSURE,
    &CGROUP_MEMORY_USAGE,
    &CGROUP_MEMORY_PEAK,
    &CGROUP_MEMORY_LIMIT,
    &CGROUP_MEMORY_ANON,
    &CGROUP_MEMORY_FILE,
    &CGROUP_OOM_KILLS,
    &CGROUP_MEMORY_PRESSURE,
];

// A container's requests and limits, from its pod's spec.
pub(crate) const DECLARED_CPU_REQUEST: Metric = def(
    "k8s.container.cpu.request",
    "{cpu}",
    Gauge,
    "k8s_container_cpu_request",
    "CPU request of the process's container, from its pod's spec.",
);
pub(crate) const DECLARED_CPU_LIMIT: Metric = def(
    "k8s.container.cpu.limit",
    "{cpu}",
    Gauge,
    "k8s_container_cpu_limit",
    "CPU limit of the process's container, from its pod's spec.",
);
pub(crate) const DECLARED_MEMORY_REQUEST: Metric = def(
    "k8s.container.memory.request",
    "By",
    Gauge,
    "k8s_container_memory_request_bytes",
    "Memory request of the process's container, from its pod's spec.",
);
pub(crate) const DECLARED_MEMORY_LIMIT: Metric = def(
    "k8s.container.memory.limit",
    "By",
    Gauge,
    "k8s_container_memory_limit_bytes",
    "Memory limit of the process's container, from its pod's spec.",
);
/// Every declared figure, in export order.
pub(crate) const DECLARED: [&Metric; 4] =
    [&DECLARED_CPU_REQUEST, &DECLARED_CPU_LIMIT, &DECLARED_MEMORY_REQUEST, &DECLARED_MEMORY_LIMIT];

/// The requests and limits a pod spec declares for a process's container.
pub(crate) fn declared_values(r: &crate::k8s::pods::Resources) -> Vec<(&'static Metric, f64)> {
    let bytes = |b: Option<u64>| b.map(|b| b as f64);
    [
        (&DECLARED_CPU_REQUEST, r.cpu_request),
        (&DECLARED_CPU_LIMIT, r.cpu_limit),
        (&DECLARED_MEMORY_REQUEST, bytes(r.memory_request)),
        (&DECLARED_MEMORY_LIMIT, bytes(r.memory_limit)),
    ]
    .into_iter()
    .filter_map(|(m, v)| Some((m, v?)))
    .collect()
}

pub(crate) const REC_CPU_REQUEST: Metric = def(
    "stoker.recommendation.cpu.request",
    "{cpu}",
    Gauge,
    "stoker_recommendation_cpu_request",
    "CPU request the advice recommends (cpu-saturated, cpu-overprovisioned), over advice.window.",
);
pub(crate) const REC_CPU_LIMIT: Metric = def(
    "stoker.recommendation.cpu.limit",
    "{cpu}",
    Gauge,
    "stoker_recommendation_cpu_limit",
    "CPU limit the advice recommends (cpu-throttled), over advice.window.",
);
pub(crate) const REC_MEMORY_REQUEST: Metric = def(
    "stoker.recommendation.memory.request",
    "By",
    Gauge,
    "stoker_recommendation_memory_request_bytes",
    "Memory request the advice recommends (memory-overprovisioned), over advice.window.",
);
pub(crate) const REC_MEMORY_LIMIT: Metric = def(
    "stoker.recommendation.memory.limit",
    "By",
    Gauge,
    "stoker_recommendation_memory_limit_bytes",
    "Memory limit the advice recommends (memory-near-limit), over advice.window.",
);
pub(crate) const REC_WORKERS: Metric = def(
    "stoker.recommendation.workers",
    "{worker}",
    Gauge,
    "stoker_recommendation_workers",
    "Worker processes the advice recommends (gil-bound, workers-mismatch), over advice.window.",
);
/// Every recommendation, in export order.
pub(crate) const RECOMMENDATIONS: [&Metric; 5] =
    [&REC_CPU_REQUEST, &REC_CPU_LIMIT, &REC_MEMORY_REQUEST, &REC_MEMORY_LIMIT, &REC_WORKERS];
pub(crate) const ADVICE_ACTIVE: Metric = def(
    "stoker.advice.active",
    "{finding}",
    Gauge,
    "stoker_advice_active",
    "1 for each finding of the advice over advice.window, by stoker.advice.rule and stoker.advice.severity.",
);

pub(crate) const OFF_CPU_TIME: Metric = def(
    "stoker.process.off_cpu.time",
    "s",
    Counter,
    "stoker_process_off_cpu_time_seconds_total",
    "Time the process's threads spent off the CPU, by state: runqueue, throttled, gil, lock, socket, poll, disk, sleep, other (with off_cpu.enabled).",
);
pub(crate) const GIL_HELD_TIME: Metric = def(
    "stoker.process.gil.held.time",
    "s",
    Counter,
    "stoker_process_gil_held_time_seconds_total",
    "Time the process's threads ran holding the GIL, from CPU samples of the holder (with off_cpu.enabled); its rate is the share of wall time the GIL was in use.",
);
pub(crate) const FUNCTION_CPU_TIME: Metric = def(
    "stoker.function.cpu.time",
    "s",
    Counter,
    "stoker_function_cpu_time_seconds_total",
    "CPU time of a Python function (self time), top functions per process.",
);

// The agent's own health.
pub(crate) const SAMPLES: Metric =
    def("stoker.samples", "{sample}", Counter, "stoker_samples_total", "Samples taken in sampled processes.");
pub(crate) const SAMPLES_LOST: Metric = def(
    "stoker.samples.lost",
    "{sample}",
    Counter,
    "stoker_samples_lost_total",
    "Samples lost in the kernel.",
);
pub(crate) const EXPORT_FAILURES: Metric = def(
    "stoker.export.failures",
    "{failure}",
    Counter,
    "stoker_export_failures_total",
    "Failed export attempts.",
);
pub(crate) const EXPORT_DROPPED: Metric = def(
    "stoker.export.dropped_batches",
    "{batch}",
    Counter,
    "stoker_export_dropped_batches_total",
    "Export batches dropped from a full queue.",
);
pub(crate) const PROCESSES_TRACKED: Metric = def(
    "stoker.processes.tracked",
    "{process}",
    Gauge,
    "stoker_processes_tracked",
    "Python processes with series in this export: those sampled, and those that exited since the last export (reported once more).",
);
pub(crate) const NET_EVENTS_LOST: Metric = def(
    "stoker.net.events.lost",
    "{event}",
    Counter,
    "stoker_net_events_lost_total",
    "Network events lost in the kernel.",
);
pub(crate) const SPANS_DROPPED: Metric = def(
    "stoker.spans.dropped",
    "{span}",
    Counter,
    "stoker_spans_dropped_total",
    "Request spans not sent: over the per-interval bound.",
);

pub(crate) const KERNEL_LOSSES: Metric = def(
    "stoker.kernel.losses",
    "{event}",
    Counter,
    "stoker_kernel_losses_total",
    "Events the kernel programs lost or cut, by reason (maps or rings full, stacks cut, memory unreadable).",
);

/// Bucket bounds (seconds) the semantic conventions advise for request durations.
const REQUEST_BOUNDS: &[f64] = &crate::net::hist::OTEL_BOUNDS_S;
/// Finer bounds for connect times and round trips, which are often sub-millisecond.
const TCP_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

// Per process, from the network programs.
pub(crate) const HTTP_SERVER: Metric = def(
    "http.server.request.duration",
    "s",
    Histogram(REQUEST_BOUNDS),
    "http_server_request_duration_seconds",
    "Duration of HTTP server requests, first request byte read to last response byte written.",
);
pub(crate) const HTTP_CLIENT: Metric = def(
    "http.client.request.duration",
    "s",
    Histogram(REQUEST_BOUNDS),
    "http_client_request_duration_seconds",
    "Duration of HTTP client requests, request written to last response byte read.",
);
pub(crate) const CLIENT_TTFB: Metric = def(
    "stoker.net.client.ttfb",
    "s",
    Histogram(REQUEST_BOUNDS),
    "stoker_net_client_ttfb_seconds",
    "Client requests' time to first byte: request written to first response byte read.",
);
pub(crate) const SERVER_QUEUE: Metric = def(
    "stoker.http.server.queue.duration",
    "s",
    Histogram(REQUEST_BOUNDS),
    "stoker_http_server_queue_duration_seconds",
    "Time HTTP server requests waited in their socket, bytes arrived to the first read.",
);
pub(crate) const STALL: Metric = def(
    "stoker.net.stall.duration",
    "s",
    Histogram(REQUEST_BOUNDS),
    "stoker_net_stall_duration_seconds",
    "Requests whose bytes waited in the kernel 1 ms or more after the code wrote them (server responses, client requests, client responses held by Nagle), by stoker.stall.cause.",
);
pub(crate) const ACCEPT_QUEUE: Metric = def(
    "stoker.tcp.accept.queue.duration",
    "s",
    Histogram(TCP_BOUNDS),
    "stoker_tcp_accept_queue_duration_seconds",
    "Time accepted TCP connections waited in the accept queue, handshake done to accept().",
);
pub(crate) const NET_REQUEST: Metric = def(
    "stoker.net.request.duration",
    "s",
    Histogram(REQUEST_BOUNDS),
    "stoker_net_request_duration_seconds",
    "Duration of request/response exchanges of other protocols over TCP.",
);
pub(crate) const CONNECT: Metric = def(
    "stoker.tcp.connect.duration",
    "s",
    Histogram(TCP_BOUNDS),
    "stoker_tcp_connect_duration_seconds",
    "TCP connect time, SYN sent to established.",
);
pub(crate) const RTT: Metric = def(
    "stoker.tcp.rtt",
    "s",
    Histogram(TCP_BOUNDS),
    "stoker_tcp_rtt_seconds",
    "The kernel's smoothed round-trip time of connections, read when they close.",
);
pub(crate) const CONNECT_FAILURES: Metric = def(
    "stoker.tcp.connect.failures",
    "{connect}",
    Counter,
    "stoker_tcp_connect_failures_total",
    "TCP connects that failed.",
);
pub(crate) const RETRANSMITS: Metric = def(
    "stoker.tcp.retransmits",
    "{segment}",
    Counter,
    "stoker_tcp_retransmits_total",
    "TCP segments retransmitted, on connections this process opened.",
);
pub(crate) const ACCEPTS: Metric = def(
    "stoker.tcp.accepts",
    "{connection}",
    Counter,
    "stoker_tcp_accepts_total",
    "TCP connections accepted.",
);

/// The network metrics, in the order they are rendered.
/// Stretches on which an event loop did not go back to waiting for events for longer than
/// the threshold (kept with the network series, which hold the per-process histograms).
pub(crate) const LOOP_BLOCKED: Metric = def(
    "stoker.event_loop.blocked.duration",
    "s",
    Histogram(LOOP_BOUNDS),
    "stoker_event_loop_blocked_duration_seconds",
    "Stretches over off_cpu.loop_block_threshold on which an event-loop thread (asyncio, gevent) did not wait for events.",
);
const LOOP_BOUNDS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub(crate) const NETWORK: [&Metric; 13] = [
    &HTTP_SERVER,
    &SERVER_QUEUE,
    &HTTP_CLIENT,
    &CLIENT_TTFB,
    &NET_REQUEST,
    &CONNECT,
    &RTT,
    &CONNECT_FAILURES,
    &RETRANSMITS,
    &ACCEPTS,
    &ACCEPT_QUEUE,
    &STALL,
    &LOOP_BLOCKED,
];

/// Every metric the agent exports.
fn all() -> Vec<&'static Metric> {
    let mut all = vec![&CPU_TIME, &CPU_UTILIZATION, &MEMORY_USAGE];
    all.extend(CGROUP_METRICS);
    all.extend(DECLARED);
    all.extend(RECOMMENDATIONS);
    all.extend([&ADVICE_ACTIVE, &OFF_CPU_TIME, &GIL_HELD_TIME, &FUNCTION_CPU_TIME]);
    all.extend([&SAMPLES, &SAMPLES_LOST, &EXPORT_FAILURES, &EXPORT_DROPPED, &PROCESSES_TRACKED]);
    all.extend([&NET_EVENTS_LOST, &SPANS_DROPPED, &KERNEL_LOSSES]);
    all.extend(NETWORK);
    all
}

/// The Prometheus names of every series the agent exports (a histogram's `_bucket`, `_sum`
/// and `_count`), sorted: what a dashboard may query.
pub(crate) fn prometheus_series() -> Vec<String> {
    let mut names: Vec<String> = all()
        .into_iter()
        .flat_map(|m| match m.instrument {
            Instrument::Histogram(_) => {
                ["bucket", "sum", "count"].iter().map(|part| format!("{}_{part}", m.prometheus)).collect()
            }
            _ => vec![m.prometheus.to_string()],
        })
        .collect();
    names.sort();
    names
}

/// The name a Collector's Prometheus exporters (and stores that translate OTLP the same
/// way, such as VictoriaMetrics with `-opentelemetry.usePrometheusNaming`) give a metric:
/// dots to underscores, the unit as a suffix unless a word of the name is it (`s` seconds,
/// `By` bytes, `1` ratio for gauges, annotations in braces dropped), `_total` for counters.
#[cfg(test)]
fn translated(m: &Metric) -> String {
    let mut words: Vec<String> =
        m.name.split(['.', '_']).filter(|w| !w.is_empty()).map(String::from).collect();
    let unit = match (m.unit, m.instrument) {
        ("s", _) => Some("seconds"),
        ("By", _) => Some("bytes"),
        ("1", Gauge) => Some("ratio"),
        ("1", _) => None,
        (u, _) if u.starts_with('{') => None,
        (u, _) => panic!("{}: unit {u} has no translation here", m.name),
    };
    if let Some(unit) = unit
        && !words.iter().any(|w| w == unit)
    {
        words.push(unit.into());
    }
    if m.instrument == Counter {
        words.retain(|w| w != "total");
        words.push("total".into());
    }
    words.join("_")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /metrics carries the names the OTLP path gives in Prometheus-compatible stores, so
    /// one dashboard reads both.
    #[test]
    fn prometheus_names_are_the_otlp_names_translated() {
        let wrong: Vec<String> = all()
            .into_iter()
            .filter(|m| m.prometheus != translated(m))
            .map(|m| format!("{} ({}): {} here, {} translated", m.name, m.unit, m.prometheus, translated(m)))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
