//! The end-of-session network report: a latency table per process, direction and
//! endpoint, connect statistics, and the same as JSON.
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use serde::Serialize;

use super::{
    NetDetail,
    aggregate::{Direction, NetMetrics},
    hist::{Histogram, OTEL_BOUNDS_S, Quantiles},
};

/// Requests of one endpoint (all statuses together).
#[derive(Debug, Clone, Serialize)]
pub struct EndpointRow {
    pub pid: u32,
    pub process: String,
    pub direction: Direction,
    pub peer: Option<SocketAddr>,
    /// `http` or `tcp` (a generic request/response protocol).
    pub protocol: &'static str,
    pub method: Option<&'static str>,
    pub route: Option<String>,
    pub count: u64,
    /// HTTP 5xx responses.
    pub errors: u64,
    pub statuses: BTreeMap<u16, u64>,
    #[serde(flatten)]
    pub latency: Quantiles,
    /// Clients: request written to the first response byte read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfb: Option<Quantiles>,
    /// Servers: time in the socket queue before the first read, and the whole time in the
    /// server (accept queue of a connection's first request, socket queue, request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<Quantiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<Quantiles>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Counts per OpenTelemetry advised bucket (`bucket_bounds_s`, then above the last).
    pub bucket_counts: Vec<u64>,
}

/// Responses of one endpoint whose bytes were held in the kernel after the code wrote
/// them, by cause.
#[derive(Debug, Clone, Serialize)]
pub struct StallRow {
    pub pid: u32,
    pub process: String,
    pub side: Direction,
    pub endpoint: String,
    pub cause: &'static str,
    pub count: u64,
    pub mean_ms: f64,
    pub p99_ms: f64,
}

/// TCP connects of one process to one peer.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectRow {
    pub pid: u32,
    pub process: String,
    pub peer: SocketAddr,
    pub attempts: u64,
    pub failures: u64,
    pub connect_p50_ms: f64,
    pub connect_p99_ms: f64,
    pub closed: u64,
    pub retransmits: u64,
    /// Mean smoothed RTT of the closed connections.
    pub rtt_mean_ms: Option<f64>,
    pub bytes_received: u64,
    pub bytes_acked: u64,
}

/// Kernel-side losses.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Drops {
    pub events_lost: u64,
    pub connections_untracked: u64,
    pub connects_untracked: u64,
}

/// The statuses of one endpoint merged.
#[derive(Default)]
struct Group {
    stalls: BTreeMap<u32, Histogram>,
    latency: Histogram,
    ttfb: Histogram,
    queue: Histogram,
    total: Histogram,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    req_bytes: u64,
    resp_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetReport {
    pub duration_s: f64,
    pub bucket_bounds_s: Vec<f64>,
    pub endpoints: Vec<EndpointRow>,
    /// Stalls: responses held in the kernel 1 ms or more, per endpoint and cause.
    pub stalls: Vec<StallRow>,
    pub connects: Vec<ConnectRow>,
    pub accepted: BTreeMap<u32, u64>,
    /// Per process, how long its accepted connections waited to be accepted.
    pub accept_queue: BTreeMap<u32, Quantiles>,
    /// Whether socket-queue times were measured (`sock:sk_data_ready`).
    pub socket_queue: bool,
    /// What was timed: `full`, or `requests` (no socket-queue times and no stalls).
    pub detail: NetDetail,
    /// Where reads and writes were followed: `socket tracepoints` (`sock_recv_length` and
    /// `sock_send_length`, Linux 6.3+) or `system call exits`.
    pub data_calls: &'static str,
    pub drops: Drops,
}

impl NetReport {
    pub fn new(
        m: &NetMetrics,
        duration_s: f64,
        drops: Drops,
        socket_queue: bool,
        detail: NetDetail,
        data_calls: &'static str,
    ) -> Self {
        let comm = |pid: u32| m.comms.get(&pid).cloned().unwrap_or_else(|| "?".into());
        let mut groups: BTreeMap<_, Group> = BTreeMap::new();
        for (k, s) in &m.requests {
            let g = groups.entry((k.pid, k.direction, k.peer, k.method, k.route.clone())).or_default();
            g.latency.merge(&s.latency);
            g.ttfb.merge(&s.ttfb);
            g.queue.merge(&s.queue);
            for (cause, h) in &s.stalls {
                g.stalls.entry(*cause).or_default().merge(h);
            }
            g.total.merge(&s.total);
            if k.is_error() {
                g.errors += s.latency.count;
            }
            *g.statuses.entry(k.status).or_default() += s.latency.count;
            g.req_bytes += s.req_bytes;
            g.resp_bytes += s.resp_bytes;
        }
        let mut stalls = Vec::new();
        for ((pid, direction, peer, method, route), g) in &groups {
            for (&cause, h) in &g.stalls {
                let q = h.quantiles();
                stalls.push(StallRow {
                    pid: *pid,
                    process: comm(*pid),
                    side: *direction,
                    endpoint: endpoint_name(*peer, *method, route.as_deref()),
                    cause: agent_ebpf::stall_cause::name(cause),
                    count: h.count,
                    mean_ms: q.mean_ms,
                    p99_ms: q.p99_ms,
                });
            }
        }
        let endpoints = groups
            .into_iter()
            .map(|((pid, direction, peer, method, route), g)| EndpointRow {
                pid,
                process: comm(pid),
                direction,
                peer,
                protocol: if method.is_some() { "http" } else { "tcp" },
                method,
                route,
                count: g.latency.count,
                errors: g.errors,
                statuses: g.statuses,
                latency: g.latency.quantiles(),
                ttfb: (g.ttfb.count > 0).then(|| g.ttfb.quantiles()),
                queue: (socket_queue && g.queue.count > 0).then(|| g.queue.quantiles()),
                total: (socket_queue && g.total.count > 0).then(|| g.total.quantiles()),
                request_bytes: g.req_bytes,
                response_bytes: g.resp_bytes,
                bucket_counts: g.latency.otel.to_vec(),
            })
            .collect();
        let connects = m
            .connects
            .iter()
            .map(|(&(pid, peer), c)| {
                let q = c.latency.quantiles();
                ConnectRow {
                    pid,
                    process: comm(pid),
                    peer,
                    attempts: c.attempts,
                    failures: c.failures,
                    connect_p50_ms: q.p50_ms,
                    connect_p99_ms: q.p99_ms,
                    closed: c.closed,
                    retransmits: c.retransmits,
                    rtt_mean_ms: (c.rtt.count > 0).then(|| c.rtt.quantiles().mean_ms),
                    bytes_received: c.bytes_received,
                    bytes_acked: c.bytes_acked,
                }
            })
            .collect();
        Self {
            duration_s,
            bucket_bounds_s: OTEL_BOUNDS_S.to_vec(),
            endpoints,
            stalls,
            connects,
            accepted: m.accepted.clone(),
            accept_queue: m.accept_queue.iter().map(|(&pid, h)| (pid, h.quantiles())).collect(),
            socket_queue,
            detail,
            data_calls,
            drops,
        }
    }

    /// The tables printed at the end of a session.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.endpoints.is_empty() {
            let _ = writeln!(s, "  network: no requests seen on connections opened during the session");
        } else {
            let _ = writeln!(
                s,
                "  network requests (ms; ttfb: a client's time to the first response byte; queue: a server's \
                 request waiting in its socket before the first read; total: a server's queue, request and, \
                 for a connection's first, accept queue):\n    {:<20} {:<6} {:<40} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6}",
                "process",
                "side",
                "endpoint",
                "count",
                "p50",
                "p90",
                "p99",
                "max",
                "ttfb p50",
                "queue p50",
                "total p50",
                "errors"
            );
            for e in &self.endpoints {
                let endpoint = endpoint_name(e.peer, e.method, e.route.as_deref());
                let side = e.direction.name();
                let p50 = |q: Option<Quantiles>| {
                    q.map(|t| format!("{:.2}", t.p50_ms)).unwrap_or_else(|| "-".into())
                };
                let (ttfb, queue, total) = (p50(e.ttfb), p50(e.queue), p50(e.total));
                let _ = writeln!(
                    s,
                    "    {:<20} {side:<6} {endpoint:<40} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {ttfb:>9} {queue:>9} {total:>9} {:>6}",
                    format!("{} ({})", e.process, e.pid),
                    e.count,
                    e.latency.p50_ms,
                    e.latency.p90_ms,
                    e.latency.p99_ms,
                    e.latency.max_ms,
                    e.errors
                );
            }
        }
        if !self.stalls.is_empty() {
            let _ = writeln!(
                s,
                "  stalls (requests whose bytes waited in the kernel 1 ms or more after the code wrote them):\n    {:<20} {:<6} {:<40} {:<18} {:>7} {:>9} {:>9}",
                "process", "side", "endpoint", "cause", "count", "mean ms", "p99 ms"
            );
            for r in &self.stalls {
                let side = r.side.name();
                let _ = writeln!(
                    s,
                    "    {:<20} {side:<6} {:<40} {:<18} {:>7} {:>9.2} {:>9.2}",
                    format!("{} ({})", r.process, r.pid),
                    r.endpoint,
                    r.cause,
                    r.count,
                    r.mean_ms,
                    r.p99_ms
                );
            }
        }
        if !self.connects.is_empty() {
            let _ = writeln!(
                s,
                "  TCP connects:\n    {:<20} {:<40} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
                "process", "peer", "count", "failed", "p50 ms", "p99 ms", "retrans", "rtt ms"
            );
            for c in &self.connects {
                let rtt = c.rtt_mean_ms.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    s,
                    "    {:<20} {:<40} {:>7} {:>8} {:>8.3} {:>8.3} {:>8} {rtt:>8}",
                    format!("{} ({})", c.process, c.pid),
                    c.peer.to_string(),
                    c.attempts,
                    c.failures,
                    c.connect_p50_ms,
                    c.connect_p99_ms,
                    c.retransmits,
                );
            }
        }
        for (pid, q) in &self.accept_queue {
            let _ = writeln!(
                s,
                "  accept queue of pid {pid} (ms, handshake done to accept() returned): {} connections, p50 {:.3}, p99 {:.3}, max {:.3}",
                self.accepted.get(pid).copied().unwrap_or(0),
                q.p50_ms,
                q.p99_ms,
                q.max_ms
            );
        }
        if self.detail == NetDetail::Requests {
            let _ = writeln!(
                s,
                "  network: requests only (--net-detail requests): no socket-queue times and no stalls; servers' requests are timed from their first read"
            );
        } else if !self.socket_queue {
            let _ = writeln!(
                s,
                "  network: socket-queue times unavailable (no sk_data_ready tracepoint): servers' requests are timed from their first read"
            );
        }
        let accepted: u64 = self.accepted.values().sum();
        let d = &self.drops;
        let _ = writeln!(
            s,
            "  network: {accepted} connections accepted; lost {} events (event rings full), untracked {} connections, {} connects (maps full)",
            d.events_lost, d.connections_untracked, d.connects_untracked
        );
        s
    }
}

/// How an endpoint is named in the tables: the upstream (clients), then method and route,
/// or `(tcp)` for other protocols.
pub(crate) fn endpoint_name(peer: Option<SocketAddr>, method: Option<&str>, route: Option<&str>) -> String {
    let mut endpoint = String::new();
    if let Some(peer) = peer {
        let _ = write!(endpoint, "{peer} ");
    }
    match (method, route) {
        (Some(m), Some(r)) => {
            let _ = write!(endpoint, "{m} {r}");
        }
        _ => endpoint.push_str("(tcp)"),
    }
    endpoint
}
