//! The node agent's metrics: per-process CPU (from samples), memory and top Python
//! functions, plus the agent's own health; rendered for Prometheus and as OTLP.
use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use super::netstate::NetSeries;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric,
        number_data_point,
    },
    resource::v1::Resource,
};

/// One sampled process.
#[derive(Debug, Clone, Default)]
pub struct ProcessMetrics {
    /// Resource attributes (`service.name`, `process.pid`, ...), sorted by key.
    pub resource: BTreeMap<String, String>,
    pub cpu_seconds: f64,
    pub utilization: f64,
    pub memory_bytes: u64,
    /// CPU seconds per function (leaf Python frame, without its line), cumulative.
    pub functions: HashMap<String, f64>,
    /// Request latencies and TCP counters, cumulative.
    pub net: NetSeries,
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

impl Snapshot {
    /// Prometheus text exposition (version 0.0.4).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let labels = |p: &ProcessMetrics, extra: Option<(&str, &str)>| {
            let mut parts = vec![resource_labels(p)];
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{}\"", escape(v)));
            }
            format!("{{{}}}", parts.join(","))
        };
        let per = |f: &dyn Fn(&ProcessMetrics) -> f64| -> Vec<(String, f64)> {
            self.processes.values().map(|p| (labels(p, None), f(p))).collect()
        };
        family(
            "process_cpu_time_seconds_total",
            "counter",
            "CPU time of the process, from samples.",
            per(&|p| p.cpu_seconds),
        );
        family(
            "process_cpu_utilization_ratio",
            "gauge",
            "CPU time over the last interval divided by its length and the CPUs.",
            per(&|p| p.utilization),
        );
        family(
            "process_memory_usage_bytes",
            "gauge",
            "Resident memory of the process.",
            per(&|p| p.memory_bytes as f64),
        );
        let functions = self
            .processes
            .values()
            .flat_map(|p| {
                p.top(self.top_functions).into_iter().map(move |(f, v)| (labels(p, Some(("function", f))), v))
            })
            .collect();
        family(
            "stoker_function_cpu_time_seconds_total",
            "counter",
            "CPU time of a Python function (self time), top functions per process.",
            functions,
        );
        let h = &self.health;
        let one = |v: u64| vec![(String::new(), v as f64)];
        family("stoker_samples_total", "counter", "Samples taken in sampled processes.", one(h.samples));
        family("stoker_samples_lost_total", "counter", "Samples lost in the kernel.", one(h.lost));
        family("stoker_export_failures_total", "counter", "Failed export attempts.", one(h.export_failures));
        family(
            "stoker_export_dropped_batches_total",
            "counter",
            "Export batches dropped from a full queue.",
            one(h.dropped_batches),
        );
        family("stoker_processes_tracked", "gauge", "Python processes being sampled.", one(h.processes));
        family(
            "stoker_net_events_lost_total",
            "counter",
            "Network events lost in the kernel.",
            one(h.net_lost),
        );
        family(
            "stoker_spans_dropped_total",
            "counter",
            "Request spans not sent: over the per-interval bound.",
            one(h.spans_dropped),
        );
        super::netstate::prometheus(&mut out, self.processes.values().map(|p| (&p.net, resource_labels(p))));
        out
    }

    /// The snapshot as one OTLP export request: a resource per process, and the agent's.
    pub fn otlp(&self) -> ExportMetricsServiceRequest {
        let start = nanos(self.start);
        let time = nanos(self.time);
        let point = |value: f64, attributes: Vec<KeyValue>| NumberDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: time,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..Default::default()
        };
        let sum = |name: &str, unit: &str, points: Vec<NumberDataPoint>| Metric {
            name: name.into(),
            unit: unit.into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        };
        let gauge = |name: &str, unit: &str, points: Vec<NumberDataPoint>| Metric {
            name: name.into(),
            unit: unit.into(),
            data: Some(metric::Data::Gauge(Gauge { data_points: points })),
            ..Default::default()
        };
        let scope = |metrics: Vec<Metric>| ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: "stoker".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            }),
            metrics,
            ..Default::default()
        };
        let mut resource_metrics: Vec<ResourceMetrics> = self
            .processes
            .values()
            .map(|p| {
                let functions = p
                    .top(self.top_functions)
                    .into_iter()
                    .map(|(f, v)| point(v, vec![kv("function", f)]))
                    .collect();
                ResourceMetrics {
                    resource: Some(Resource {
                        attributes: p.resource.iter().map(|(k, v)| kv(k, v)).collect(),
                        ..Default::default()
                    }),
                    scope_metrics: vec![scope(
                        vec![
                            sum("process.cpu.time", "s", vec![point(p.cpu_seconds, vec![])]),
                            gauge("process.cpu.utilization", "1", vec![point(p.utilization, vec![])]),
                            gauge("process.memory.usage", "By", vec![point(p.memory_bytes as f64, vec![])]),
                            sum("stoker.function.cpu.time", "s", functions),
                        ]
                        .into_iter()
                        .chain(p.net.otlp(start, time))
                        .collect(),
                    )],
                    ..Default::default()
                }
            })
            .collect();
        let h = &self.health;
        resource_metrics.push(ResourceMetrics {
            resource: Some(Resource {
                attributes: {
                    let mut attrs: Vec<(&str, &str)> =
                        vec![("service.name", "stoker-agent"), ("host.name", &self.host)];
                    for (k, v) in &self.agent_attributes {
                        attrs.retain(|(key, _)| key != k);
                        attrs.push((k, v));
                    }
                    attrs.into_iter().map(|(k, v)| kv(k, v)).collect()
                },
                ..Default::default()
            }),
            scope_metrics: vec![scope(vec![
                sum("stoker.samples", "{sample}", vec![point(h.samples as f64, vec![])]),
                sum("stoker.samples.lost", "{sample}", vec![point(h.lost as f64, vec![])]),
                sum("stoker.export.failures", "{failure}", vec![point(h.export_failures as f64, vec![])]),
                sum(
                    "stoker.export.dropped_batches",
                    "{batch}",
                    vec![point(h.dropped_batches as f64, vec![])],
                ),
                gauge("stoker.processes.tracked", "{process}", vec![point(h.processes as f64, vec![])]),
                sum("stoker.net.events.lost", "{event}", vec![point(h.net_lost as f64, vec![])]),
                sum("stoker.spans.dropped", "{span}", vec![point(h.spans_dropped as f64, vec![])]),
            ])],
            ..Default::default()
        });
        ExportMetricsServiceRequest { resource_metrics }
    }
}

/// Attributes the conventions type as integers.
const INT_ATTRIBUTES: [&str; 5] = [
    "http.response.status_code",
    "server.port",
    "client.port",
    "http.request.body.size",
    "http.response.body.size",
];

/// An attribute, an integer for the keys the conventions type so, else a string.
pub(crate) fn attribute(key: &str, value: &str) -> KeyValue {
    match value.parse::<i64>() {
        Ok(n) if INT_ATTRIBUTES.contains(&key) => KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::IntValue(n)) }),
            ..Default::default()
        },
        _ => kv(key, value),
    }
}

pub(crate) fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

pub(crate) fn nanos(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64)
}

/// A process's resource attributes as Prometheus labels (`k="v",...`, no braces).
fn resource_labels(p: &ProcessMetrics) -> String {
    let parts: Vec<String> =
        p.resource.iter().map(|(k, v)| format!("{}=\"{}\"", k.replace('.', "_"), escape(v))).collect();
    parts.join(",")
}

pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
