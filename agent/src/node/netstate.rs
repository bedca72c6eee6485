//! The node agent's network metrics: each process's request latency histograms and TCP
//! counters, accumulated over intervals, as OTLP metrics and Prometheus text.
use std::{collections::BTreeMap, net::SocketAddr};

use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram as OtlpHistogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
    metric, number_data_point,
};

use super::{
    encode::{attribute, escape, label_name},
    metric::{
        ACCEPT_QUEUE, ACCEPTS, CLIENT_TTFB, CONNECT, CONNECT_FAILURES, HTTP_CLIENT, HTTP_SERVER, Instrument,
        LOOP_BLOCKED, Metric as Def, NET_REQUEST, NETWORK, RETRANSMITS, RTT, SERVER_QUEUE, STALL,
    },
};
use crate::net::{Direction, NetMetrics, hist::Histogram};

/// Series kept per process; while that many are live, new ones are folded into one
/// overflow series.
const MAX_SERIES: usize = 1000;
/// A series not updated for this many intervals goes (its slot is free again); one that
/// comes back starts anew, with its own start time.
const IDLE_INTERVALS: u64 = 10;
/// The attribute of the overflow series (as the OpenTelemetry SDKs name it).
const OVERFLOW: (&str, &str) = ("otel.metric.overflow", "true");

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

/// A series' cumulative value, since when (Unix ns), the fold that made it and the one
/// that last updated it.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    value: Value,
    start_ns: u64,
    born: u64,
    updated: u64,
}

/// One process's network series, cumulative since each appeared; idle ones expire.
#[derive(Debug, Clone, Default)]
pub struct NetSeries {
    series: BTreeMap<(&'static str, Attributes), Series>,
    /// Intervals folded so far.
    folds: u64,
}

impl NetSeries {
    /// Adds process `pid`'s part of one interval's metrics, then drops the series idle for
    /// `IDLE_INTERVALS`.
    pub fn fold(&mut self, pid: u32, m: &NetMetrics) {
        self.folds += 1;
        self.fold_interval(pid, m);
        let now = self.folds;
        self.series.retain(|_, s| now - s.updated < IDLE_INTERVALS);
    }

    fn fold_interval(&mut self, pid: u32, m: &NetMetrics) {
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
            if key.direction == Direction::Client && stats.ttfb.count > 0 {
                self.add_histogram(&CLIENT_TTFB, attrs.clone(), &stats.ttfb);
            }
            if key.method.is_some() && key.direction == Direction::Server && stats.queue.count > 0 {
                self.add_histogram(&SERVER_QUEUE, attrs.clone(), &stats.queue);
            }
            for (&cause, h) in &stats.stalls {
                let mut attrs = attrs.clone();
                attrs.push(("stoker.stall.cause", agent_ebpf::stall_cause::name(cause).to_string()));
                self.add_histogram(&STALL, attrs, h);
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
            self.add_counter(&CONNECT_FAILURES, attrs.clone(), c.failures);
            self.add_counter(&RETRANSMITS, attrs, c.retransmits);
        }
        if let Some(&n) = m.accepted.get(&pid) {
            self.add_counter(&ACCEPTS, Vec::new(), n);
        }
        if let Some(h) = m.accept_queue.get(&pid) {
            self.add_histogram(&ACCEPT_QUEUE, Vec::new(), h);
        }
    }

    /// Adds blocked event-loop stretches (nanoseconds) to the process's histogram.
    pub fn add_loop_blocks(&mut self, durations_ns: &[u64]) {
        if durations_ns.is_empty() {
            return;
        }
        let mut h = Histogram::default();
        for &ns in durations_ns {
            h.record(ns);
        }
        self.add_histogram(&LOOP_BLOCKED, Vec::new(), &h);
    }

    /// The series slot for `attrs`, or the overflow series once `MAX_SERIES` exist.
    fn slot(&mut self, kind: &'static Def, attrs: Attributes, empty: Value) -> &mut Value {
        let key = if self.series.len() >= MAX_SERIES && !self.series.contains_key(&(kind.name, attrs.clone()))
        {
            (kind.name, vec![(OVERFLOW.0, OVERFLOW.1.to_string())])
        } else {
            (kind.name, attrs)
        };
        let updated = self.folds;
        let series = self.series.entry(key).or_insert_with(|| Series {
            value: empty,
            start_ns: now_ns(),
            born: updated,
            updated,
        });
        series.updated = updated;
        &mut series.value
    }

    fn add_histogram(&mut self, kind: &'static Def, attrs: Attributes, h: &Histogram) {
        let bounds = bounds(kind);
        let empty = Value::Histogram(Buckets { counts: vec![0; bounds.len() + 1], ..Default::default() });
        if let Value::Histogram(b) = self.slot(kind, attrs, empty) {
            for (total, n) in b.counts.iter_mut().zip(h.bucket_counts(bounds)) {
                *total += n;
            }
            b.count += h.count;
            b.sum_s += h.sum_ns as f64 / 1e9;
        }
    }

    fn add_counter(&mut self, kind: &'static Def, attrs: Attributes, n: u64) {
        if let Value::Counter(c) = self.slot(kind, attrs, Value::Counter(0)) {
            *c += n;
        }
    }

    /// The series as OTLP metrics with cumulative temporality.
    pub fn otlp(&self, start: u64, time: u64) -> Vec<Metric> {
        let mut metrics = Vec::new();
        for kind in NETWORK {
            let series = self.series.iter().filter(|((name, _), _)| *name == kind.name);
            let attributes = |attrs: &Attributes| attrs.iter().map(|(k, v)| attribute(k, v)).collect();
            let data = match kind.instrument {
                Instrument::Histogram(bounds) => {
                    let points: Vec<HistogramDataPoint> = series
                        .filter_map(|((_, attrs), s)| match &s.value {
                            Value::Histogram(b) => Some(HistogramDataPoint {
                                attributes: attributes(attrs),
                                start_time_unix_nano: start.max(s.start_ns),
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
                Instrument::Counter | Instrument::Gauge => {
                    let points: Vec<NumberDataPoint> = series
                        .filter_map(|((_, attrs), s)| match &s.value {
                            Value::Counter(n) => Some(NumberDataPoint {
                                attributes: attributes(attrs),
                                start_time_unix_nano: start.max(s.start_ns),
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
/// labels (`k="v",...`, without braces) and whether the process still runs.
///
/// A running process's series made in the last interval read zero until the next export:
/// a scraper's `rate()` sees the increase only between two scrapes of a series, so one that
/// first appeared already counting would never show its first interval's requests (on a
/// route called now and then, none of them). A process that exited shows its last figures.
pub fn prometheus<'a>(
    out: &mut String,
    processes: impl Iterator<Item = (&'a NetSeries, String, bool)> + Clone,
) {
    use std::fmt::Write;
    for kind in NETWORK {
        let mut header = false;
        for (net, resource, running) in processes.clone() {
            for ((name, attrs), series) in &net.series {
                if *name != kind.name {
                    continue;
                }
                let newborn = running && series.born == net.folds;
                if !header {
                    let _ = writeln!(
                        out,
                        "# HELP {} {}\n# TYPE {} {}",
                        kind.prometheus,
                        kind.help,
                        kind.prometheus,
                        kind.prometheus_type()
                    );
                    header = true;
                }
                let mut labels: Vec<String> = vec![resource.clone()];
                labels.extend(attrs.iter().map(|(k, v)| format!("{}=\"{}\"", label_name(k), escape(v))));
                labels.retain(|l| !l.is_empty());
                let labels = labels.join(",");
                match &series.value {
                    Value::Counter(n) => {
                        let n = if newborn { 0 } else { *n };
                        let _ = writeln!(out, "{}{{{labels}}} {n}", kind.prometheus);
                    }
                    Value::Histogram(b) => {
                        let zero;
                        let b = if newborn {
                            zero = Buckets { counts: vec![0; b.counts.len()], ..Default::default() };
                            &zero
                        } else {
                            b
                        };
                        let base = kind.prometheus;
                        let mut cumulative = 0;
                        let bounds = bounds(kind);
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

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// `server.address` and `server.port` of an upstream.
fn server(peer: SocketAddr) -> Attributes {
    vec![("server.address", peer.ip().to_string()), ("server.port", peer.port().to_string())]
}

/// A histogram metric's bucket bounds (none for the others).
fn bounds(kind: &Def) -> &'static [f64] {
    match kind.instrument {
        Instrument::Histogram(bounds) => bounds,
        Instrument::Counter | Instrument::Gauge => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::aggregate::{RequestKey, RequestStats};

    /// One interval in which process 7 served one request on each of `routes`.
    fn interval(routes: impl Iterator<Item = String>) -> NetMetrics {
        let mut m = NetMetrics::default();
        for route in routes {
            let key = RequestKey {
                pid: 7,
                direction: Direction::Server,
                peer: None,
                method: Some("GET"),
                route: Some(route),
                status: 200,
            };
            let mut stats = RequestStats::default();
            stats.latency.record(1_000_000);
            m.requests.insert(key, stats);
        }
        m
    }

    /// The `_count` of the http.server histogram on /metrics.
    fn scraped_count(net: &NetSeries, running: bool) -> String {
        let mut out = String::new();
        prometheus(&mut out, std::iter::once((net, "process_pid=\"7\"".to_string(), running)));
        out.lines().find(|l| l.starts_with("http_server_request_duration_seconds_count")).unwrap().to_string()
    }

    #[test]
    fn a_new_series_reads_zero_on_metrics_until_the_next_export() {
        let mut net = NetSeries::default();
        net.fold(7, &interval(std::iter::once("/a".to_string())));
        assert!(scraped_count(&net, true).ends_with("} 0"), "{}", scraped_count(&net, true));
        // A process that exited shows its last figures at once: there is no next export.
        assert!(scraped_count(&net, false).ends_with("} 1"));
        net.fold(7, &NetMetrics::default());
        assert!(scraped_count(&net, true).ends_with("} 1"));
        // The OTLP export is not delayed.
        let mut fresh = NetSeries::default();
        fresh.fold(7, &interval(std::iter::once("/a".to_string())));
        let otlp = fresh.otlp(0, 1);
        let Some(metric::Data::Histogram(h)) = &otlp[0].data else { panic!("{otlp:?}") };
        assert_eq!(h.data_points[0].count, 1);
    }

    #[test]
    fn series_are_capped_and_idle_ones_expire() {
        let mut net = NetSeries::default();
        // 3,000 distinct routes at once: at most MAX_SERIES live, the rest in the overflow series.
        net.fold(7, &interval((0..3000).map(|i| format!("/r{i}"))));
        assert_eq!(net.series.len(), MAX_SERIES + 1);
        let overflow = net.series.keys().filter(|(_, a)| a.iter().any(|(k, _)| *k == OVERFLOW.0)).count();
        assert_eq!(overflow, 1);
        // One route stays busy; the others go idle and expire, freeing their slots.
        for _ in 0..IDLE_INTERVALS {
            net.fold(7, &interval(std::iter::once("/busy".to_string())));
        }
        assert_eq!(net.series.len(), 1, "only the busy route is left");
        net.fold(7, &interval((0..10).map(|i| format!("/new{i}"))));
        assert_eq!(net.series.len(), 11, "new routes get series again");
        let start = net.series.values().map(|s| s.start_ns).min().unwrap();
        assert!(start > 0);
    }
}
