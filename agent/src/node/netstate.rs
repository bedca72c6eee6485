//! The node agent's network metrics: each process's request latency histograms and TCP
//! counters, accumulated over intervals, as OTLP metrics and Prometheus text.
use std::{collections::BTreeMap, net::SocketAddr};

use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram as OtlpHistogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
    metric, number_data_point,
};

use super::state::{attribute, escape};
use crate::net::{Direction, NetMetrics, hist::Histogram};

/// Bucket bounds (seconds) the semantic conventions advise for request durations.
const REQUEST_BOUNDS: &[f64] = &crate::net::hist::OTEL_BOUNDS_S;
/// Finer bounds for connect times and round trips, which are often sub-millisecond.
const TCP_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Series kept per process; later ones are folded into one overflow series.
const MAX_SERIES: usize = 1000;
/// The attribute of the overflow series (as the OpenTelemetry SDKs name it).
const OVERFLOW: (&str, &str) = ("otel.metric.overflow", "true");

/// What a series measures: OTLP name, unit, Prometheus name and help.
struct Kind {
    name: &'static str,
    unit: &'static str,
    prometheus: &'static str,
    help: &'static str,
    bounds: Option<&'static [f64]>,
}

const HTTP_SERVER: Kind = Kind {
    name: "http.server.request.duration",
    unit: "s",
    prometheus: "http_server_request_duration_seconds",
    help: "Duration of HTTP server requests, first request byte read to last response byte written.",
    bounds: Some(REQUEST_BOUNDS),
};
const HTTP_CLIENT: Kind = Kind {
    name: "http.client.request.duration",
    unit: "s",
    prometheus: "http_client_request_duration_seconds",
    help: "Duration of HTTP client requests, request written to first response byte read.",
    bounds: Some(REQUEST_BOUNDS),
};
const NET_REQUEST: Kind = Kind {
    name: "stoker.net.request.duration",
    unit: "s",
    prometheus: "stoker_net_request_duration_seconds",
    help: "Duration of request/response exchanges of other protocols over TCP.",
    bounds: Some(REQUEST_BOUNDS),
};
const CONNECT: Kind = Kind {
    name: "stoker.tcp.connect.duration",
    unit: "s",
    prometheus: "stoker_tcp_connect_duration_seconds",
    help: "TCP connect time, SYN sent to established.",
    bounds: Some(TCP_BOUNDS),
};
const RTT: Kind = Kind {
    name: "stoker.tcp.rtt",
    unit: "s",
    prometheus: "stoker_tcp_rtt_seconds",
    help: "The kernel's smoothed round-trip time of connections, read when they close.",
    bounds: Some(TCP_BOUNDS),
};
const FAILURES: Kind = Kind {
    name: "stoker.tcp.connect.failures",
    unit: "{connect}",
    prometheus: "stoker_tcp_connect_failures_total",
    help: "TCP connects that failed.",
    bounds: None,
};
const RETRANSMITS: Kind = Kind {
    name: "stoker.tcp.retransmits",
    unit: "{segment}",
    prometheus: "stoker_tcp_retransmits_total",
    help: "TCP segments retransmitted, on connections this process opened.",
    bounds: None,
};
const ACCEPTS: Kind = Kind {
    name: "stoker.tcp.accepts",
    unit: "{connection}",
    prometheus: "stoker_tcp_accepts_total",
    help: "TCP connections accepted.",
    bounds: None,
};
const KINDS: [&Kind; 8] =
    [&HTTP_SERVER, &HTTP_CLIENT, &NET_REQUEST, &CONNECT, &RTT, &FAILURES, &RETRANSMITS, &ACCEPTS];

/// A cumulative histogram with fixed bounds (seconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_s: f64,
}

/// Cumulative value of one series.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Histogram(Buckets),
    Counter(u64),
}

type Attributes = Vec<(&'static str, String)>;

/// One process's network series, cumulative since the agent first saw it.
#[derive(Debug, Clone, Default)]
pub struct NetSeries {
    series: BTreeMap<(&'static str, Attributes), Value>,
}

impl NetSeries {
    /// Adds process `pid`'s part of one interval's metrics.
    pub fn fold(&mut self, pid: u32, m: &NetMetrics) {
        for (key, stats) in m.requests.iter().filter(|(k, _)| k.pid == pid) {
            let mut attrs: Attributes = Vec::new();
            let kind = match (key.method, key.direction) {
                (Some(method), direction) => {
                    attrs.push(("http.request.method", method.to_string()));
                    if key.status > 0 {
                        attrs.push(("http.response.status_code", key.status.to_string()));
                    }
                    if key.status >= 500 {
                        attrs.push(("error.type", key.status.to_string()));
                    }
                    match direction {
                        Direction::Server => {
                            attrs.push(("http.route", key.route.clone().unwrap_or_default()));
                            &HTTP_SERVER
                        }
                        Direction::Client => &HTTP_CLIENT,
                    }
                }
                (None, Direction::Server) => {
                    attrs.push(("stoker.net.role", "server".into()));
                    &NET_REQUEST
                }
                (None, Direction::Client) => {
                    attrs.push(("stoker.net.role", "client".into()));
                    &NET_REQUEST
                }
            };
            if let Some(peer) = key.peer {
                attrs.extend(server(peer));
            }
            self.add_histogram(kind, attrs, &stats.latency);
        }
        for ((_, peer), c) in m.connects.iter().filter(|((p, _), _)| *p == pid) {
            let attrs = server(*peer);
            if c.latency.count > 0 {
                self.add_histogram(&CONNECT, attrs.clone(), &c.latency);
            }
            if c.rtt.count > 0 {
                self.add_histogram(&RTT, attrs.clone(), &c.rtt);
            }
            self.add_counter(&FAILURES, attrs.clone(), c.failures);
            self.add_counter(&RETRANSMITS, attrs, c.retransmits);
        }
        if let Some(&n) = m.accepted.get(&pid) {
            self.add_counter(&ACCEPTS, Vec::new(), n);
        }
    }

    /// The series slot for `attrs`, or the overflow series once `MAX_SERIES` exist.
    fn slot(&mut self, kind: &'static Kind, attrs: Attributes, empty: Value) -> &mut Value {
        let key = if self.series.len() >= MAX_SERIES && !self.series.contains_key(&(kind.name, attrs.clone()))
        {
            (kind.name, vec![(OVERFLOW.0, OVERFLOW.1.to_string())])
        } else {
            (kind.name, attrs)
        };
        self.series.entry(key).or_insert(empty)
    }

    fn add_histogram(&mut self, kind: &'static Kind, attrs: Attributes, h: &Histogram) {
        let bounds = kind.bounds.unwrap_or_default();
        let empty = Value::Histogram(Buckets { counts: vec![0; bounds.len() + 1], ..Default::default() });
        if let Value::Histogram(b) = self.slot(kind, attrs, empty) {
            for (total, n) in b.counts.iter_mut().zip(h.bucket_counts(bounds)) {
                *total += n;
            }
            b.count += h.count;
            b.sum_s += h.sum_ns as f64 / 1e9;
        }
    }

    fn add_counter(&mut self, kind: &'static Kind, attrs: Attributes, n: u64) {
        if let Value::Counter(c) = self.slot(kind, attrs, Value::Counter(0)) {
            *c += n;
        }
    }

    /// The series as OTLP metrics with cumulative temporality.
    pub fn otlp(&self, start: u64, time: u64) -> Vec<Metric> {
        let mut metrics = Vec::new();
        for kind in KINDS {
            let series = self.series.iter().filter(|((name, _), _)| *name == kind.name);
            let attributes = |attrs: &Attributes| attrs.iter().map(|(k, v)| attribute(k, v)).collect();
            let data = match kind.bounds {
                Some(bounds) => {
                    let points: Vec<HistogramDataPoint> = series
                        .filter_map(|((_, attrs), v)| match v {
                            Value::Histogram(b) => Some(HistogramDataPoint {
                                attributes: attributes(attrs),
                                start_time_unix_nano: start,
                                time_unix_nano: time,
                                count: b.count,
                                sum: Some(b.sum_s),
                                bucket_counts: b.counts.clone(),
                                explicit_bounds: bounds.to_vec(),
                                ..Default::default()
                            }),
                            Value::Counter(_) => None,
                        })
                        .collect();
                    (!points.is_empty()).then_some({
                        metric::Data::Histogram(OtlpHistogram {
                            data_points: points,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        })
                    })
                }
                None => {
                    let points: Vec<NumberDataPoint> = series
                        .filter_map(|((_, attrs), v)| match v {
                            Value::Counter(n) => Some(NumberDataPoint {
                                attributes: attributes(attrs),
                                start_time_unix_nano: start,
                                time_unix_nano: time,
                                value: Some(number_data_point::Value::AsInt(*n as i64)),
                                ..Default::default()
                            }),
                            Value::Histogram(_) => None,
                        })
                        .collect();
                    (!points.is_empty()).then_some({
                        metric::Data::Sum(Sum {
                            data_points: points,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })
                    })
                }
            };
            if let Some(data) = data {
                metrics.push(Metric {
                    name: kind.name.into(),
                    unit: kind.unit.into(),
                    description: kind.help.into(),
                    data: Some(data),
                    ..Default::default()
                });
            }
        }
        metrics
    }
}

/// Prometheus text of every process's network series, each with its process's resource
/// labels (`k="v",...`, without braces).
pub fn prometheus<'a>(out: &mut String, processes: impl Iterator<Item = (&'a NetSeries, String)> + Clone) {
    use std::fmt::Write;
    for kind in KINDS {
        let mut header = false;
        for (net, resource) in processes.clone() {
            for ((name, attrs), value) in &net.series {
                if *name != kind.name {
                    continue;
                }
                if !header {
                    let kind_name = if kind.bounds.is_some() { "histogram" } else { "counter" };
                    let _ = writeln!(
                        out,
                        "# HELP {} {}\n# TYPE {} {kind_name}",
                        kind.prometheus, kind.help, kind.prometheus
                    );
                    header = true;
                }
                let mut labels: Vec<String> = vec![resource.clone()];
                labels
                    .extend(attrs.iter().map(|(k, v)| format!("{}=\"{}\"", k.replace('.', "_"), escape(v))));
                labels.retain(|l| !l.is_empty());
                let labels = labels.join(",");
                match value {
                    Value::Counter(n) => {
                        let _ = writeln!(out, "{}{{{labels}}} {n}", kind.prometheus);
                    }
                    Value::Histogram(b) => {
                        let base = kind.prometheus;
                        let mut cumulative = 0;
                        let bounds = kind.bounds.unwrap_or_default();
                        for (i, n) in b.counts.iter().enumerate() {
                            cumulative += n;
                            let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                            let _ = writeln!(out, "{base}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
                        }
                        let _ = writeln!(out, "{base}_sum{{{labels}}} {}", b.sum_s);
                        let _ = writeln!(out, "{base}_count{{{labels}}} {}", b.count);
                    }
                }
            }
        }
    }
}

/// `server.address` and `server.port` of an upstream.
fn server(peer: SocketAddr) -> Attributes {
    vec![("server.address", peer.ip().to_string()), ("server.port", peer.port().to_string())]
}
