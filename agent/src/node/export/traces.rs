//! HTTP server requests as OTLP spans (for Tempo): one resource per process, the same
//! attributes as its metrics, span names and attributes after the HTTP conventions.
use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};

use crate::net::spans::RequestSpan;
use crate::node::{
    encode::{attribute, stoker_scope},
    state::ProcessMetrics,
};

/// The spans of processes with a known resource, grouped by process. `mono_to_unix_ns`
/// turns the kernel's monotonic times into Unix times.
pub fn request(
    spans: &[RequestSpan],
    processes: &BTreeMap<u32, ProcessMetrics>,
    mono_to_unix_ns: i128,
) -> Option<ExportTraceServiceRequest> {
    let mut by_pid: BTreeMap<u32, Vec<Span>> = BTreeMap::new();
    let unix = |ns: u64| u64::try_from(i128::from(ns) + mono_to_unix_ns).unwrap_or(0);
    for s in spans.iter().filter(|s| processes.contains_key(&s.pid)) {
        let mut attributes = vec![
            attribute("http.request.method", s.method),
            attribute("http.route", &s.route),
            attribute("network.protocol.name", "http"),
            attribute("client.address", &s.peer.ip().to_string()),
            attribute("client.port", &s.peer.port().to_string()),
            attribute("http.request.size", &s.request_bytes.to_string()),
            attribute("http.response.size", &s.response_bytes.to_string()),
        ];
        if s.status > 0 {
            attributes.push(attribute("http.response.status_code", &s.status.to_string()));
        }
        let error = s.status >= 500;
        if error {
            attributes.push(attribute("error.type", &s.status.to_string()));
        }
        by_pid.entry(s.pid).or_default().push(Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            name: format!("{} {}", s.method, s.route),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: unix(s.start_ns),
            end_time_unix_nano: unix(s.end_ns),
            attributes,
            status: Some(Status {
                code: if error { StatusCode::Error } else { StatusCode::Unset } as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if by_pid.is_empty() {
        return None;
    }
    let resource_spans = by_pid
        .into_iter()
        .map(|(pid, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: processes[&pid].resource.iter().map(|(k, v)| attribute(k, v)).collect(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans { scope: Some(stoker_scope()), spans, ..Default::default() }],
            ..Default::default()
        })
        .collect();
    Some(ExportTraceServiceRequest { resource_spans })
}

/// Unix time minus the monotonic clock (which the kernel's timestamps use), in ns.
pub fn mono_to_unix_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: ts is a valid timespec to write into.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}
