//! The agent's metrics as one OTLP export request: a resource per process with its
//! metrics, and the agent's own resource with its health, from the metric definitions.
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::KeyValue,
    metrics::v1::{
        AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric,
        number_data_point,
    },
    resource::v1::Resource,
};

use crate::node::{
    encode::{kv, nanos, stoker_scope},
    metric::{self as def, Instrument},
    state::Snapshot,
};

/// The snapshot as an export request (cumulative temporality since the agent started).
pub fn request(snapshot: &Snapshot) -> ExportMetricsServiceRequest {
    let start = nanos(snapshot.start);
    let time = nanos(snapshot.time);
    let point = |value: f64, attributes: Vec<KeyValue>| NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    };
    let mut resource_metrics: Vec<ResourceMetrics> = snapshot
        .processes
        .values()
        .map(|p| {
            let functions = p
                .top(snapshot.top_functions)
                .into_iter()
                .map(|(f, v)| point(v, vec![kv("function", f)]))
                .collect();
            let mut metrics = vec![
                // The kernel's figure counts from the process's start, not the agent's.
                number(
                    &def::CPU_TIME,
                    vec![NumberDataPoint {
                        start_time_unix_nano: p.started_ns.unwrap_or(start),
                        ..point(p.cpu_seconds, vec![])
                    }],
                ),
                number(&def::CPU_UTILIZATION, vec![point(p.utilization, vec![])]),
                number(&def::MEMORY_USAGE, vec![point(p.memory_bytes as f64, vec![])]),
                number(&def::FUNCTION_CPU_TIME, functions),
            ];
            if !p.off_cpu.is_empty() {
                let states = p.off_cpu.iter().map(|(state, v)| point(*v, vec![kv("state", state)])).collect();
                metrics.push(number(&def::OFF_CPU_TIME, states));
            }
            if let Some(held) = p.gil_held_seconds {
                metrics.push(number(&def::GIL_HELD_TIME, vec![point(held, vec![])]));
            }
            if let Some(cgroup) = &p.cgroup {
                metrics.extend(
                    def::cgroup_values(cgroup).into_iter().map(|(m, v)| number(m, vec![point(v, vec![])])),
                );
            }
            if let Some(declared) = &p.declared {
                metrics.extend(
                    def::declared_values(declared)
                        .into_iter()
                        .map(|(m, v)| number(m, vec![point(v, vec![])])),
                );
            }
            metrics.extend(
                crate::node::advice::recommendations(&p.advice)
                    .into_iter()
                    .map(|(m, v)| number(m, vec![point(v, vec![])])),
            );
            if !p.advice.is_empty() {
                let findings = p
                    .advice
                    .iter()
                    .map(|f| {
                        let severity = serde_json::to_value(f.severity).ok();
                        let severity = severity.as_ref().and_then(|v| v.as_str()).unwrap_or("");
                        point(
                            1.0,
                            vec![kv("stoker.advice.rule", f.rule), kv("stoker.advice.severity", severity)],
                        )
                    })
                    .collect();
                metrics.push(number(&def::ADVICE_ACTIVE, findings));
            }
            ResourceMetrics {
                resource: Some(Resource {
                    attributes: p.resource.iter().map(|(k, v)| kv(k, v)).collect(),
                    ..Default::default()
                }),
                scope_metrics: vec![scope(metrics.into_iter().chain(p.net.otlp(start, time)).collect())],
                ..Default::default()
            }
        })
        .collect();
    let attrs = snapshot.agent_resource();
    let losses = snapshot
        .health
        .losses
        .iter()
        .map(|(why, n)| point(*n as f64, vec![kv("stoker.loss.reason", why)]))
        .collect();
    let health = snapshot
        .health
        .values()
        .into_iter()
        .map(|(m, v)| number(m, vec![point(v as f64, vec![])]))
        .chain([number(&def::KERNEL_LOSSES, losses)]);
    resource_metrics.push(ResourceMetrics {
        resource: Some(Resource {
            attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
            ..Default::default()
        }),
        scope_metrics: vec![scope(health.collect())],
        ..Default::default()
    });
    ExportMetricsServiceRequest { resource_metrics }
}

/// A counter (cumulative monotonic sum) or gauge of `points`, as `m` defines it.
fn number(m: &def::Metric, points: Vec<NumberDataPoint>) -> Metric {
    let data = match m.instrument {
        Instrument::Gauge => metric::Data::Gauge(Gauge { data_points: points }),
        Instrument::Counter | Instrument::Histogram(_) => metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
    };
    Metric {
        name: m.name.into(),
        unit: m.unit.into(),
        description: m.help.into(),
        data: Some(data),
        ..Default::default()
    }
}

fn scope(metrics: Vec<Metric>) -> ScopeMetrics {
    ScopeMetrics { scope: Some(stoker_scope()), metrics, ..Default::default() }
}
