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
    "Python processes being sampled.",
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
    "Duration of HTTP client requests, request written to first response byte read.",
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
pub(crate) const NETWORK: [&Metric; 8] =
    [&HTTP_SERVER, &HTTP_CLIENT, &NET_REQUEST, &CONNECT, &RTT, &CONNECT_FAILURES, &RETRANSMITS, &ACCEPTS];
