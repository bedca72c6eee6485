//! Folds the kernel's network events into per-endpoint latency histograms and per-peer
//! connection statistics; `NetMetrics` is one interval's (or one session's) result.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use agent_ebpf::{
    NET_EVENT_ACCEPT, NET_EVENT_CLOSE, NET_EVENT_CONNECT, NET_EVENT_REQUEST, NET_PATH_LEN, NET_QUEUE_UNKNOWN,
    NET_ROLE_SERVER, NetEvent, http_method,
};
use serde::Serialize;

use super::{hist::Histogram, route::Routes, spans::SpanSampler};

/// Which side of the request the process is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The process accepted the connection and answers requests.
    Server,
    /// The process connected and sends requests.
    Client,
}

impl Direction {
    /// As the tables and the JSON name it.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Server => "server",
            Direction::Client => "client",
        }
    }
}

/// What a request histogram is about. Servers are keyed by route (their clients'
/// addresses are not kept); clients by the peer they call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RequestKey {
    pub pid: u32,
    pub direction: Direction,
    /// The upstream (clients only).
    pub peer: Option<SocketAddr>,
    /// HTTP method, `None` for other protocols.
    pub method: Option<&'static str>,
    /// Route template (HTTP only).
    pub route: Option<String>,
    /// HTTP status, 0 when none was seen.
    pub status: u16,
}

impl RequestKey {
    /// HTTP 5xx answers count as errors.
    pub fn is_error(&self) -> bool {
        self.status >= 500
    }
}

/// Requests of one key.
#[derive(Debug, Clone, Default)]
pub struct RequestStats {
    pub latency: Histogram,
    /// Clients: request written to the first byte of the response read.
    pub ttfb: Histogram,
    /// Servers: the request's bytes arrived to its first read (socket queue), and that plus
    /// the connection's accept queue (its first request) and the request itself.
    pub queue: Histogram,
    pub total: Histogram,
    /// Requests whose bytes waited in the kernel for `STALL_MIN_NS` or more (a server's
    /// response, a client's request, or a client's response that came in parts a delayed
    /// ACK apart), by the cause of their longest wait (`stall_cause::*`).
    pub stalls: BTreeMap<u32, Histogram>,
    pub req_bytes: u64,
    pub resp_bytes: u64,
}

/// TCP connects of one process to one peer, and what their connections saw.
#[derive(Debug, Clone, Default)]
pub struct ConnectStats {
    pub attempts: u64,
    pub failures: u64,
    /// SYN sent to established.
    pub latency: Histogram,
    /// Connections closed (left ESTABLISHED) and what they carried.
    pub closed: u64,
    pub retransmits: u64,
    /// Smoothed RTT at close, per connection, in ns.
    pub rtt: Histogram,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// Time from established to close.
    pub lifetime: Histogram,
}

/// Aggregated network metrics of one interval: what the node agent exports and what
/// `record --net` reports.
#[derive(Debug, Clone, Default)]
pub struct NetMetrics {
    pub requests: BTreeMap<RequestKey, RequestStats>,
    pub connects: BTreeMap<(u32, SocketAddr), ConnectStats>,
    /// Connections accepted per process.
    pub accepted: BTreeMap<u32, u64>,
    /// Per process, how long accepted connections waited to be accepted (from the
    /// handshake's end).
    pub accept_queue: BTreeMap<u32, Histogram>,
    /// Process names seen.
    pub comms: HashMap<u32, String>,
}

/// A response held in the kernel this long or more counts as stalled: shorter holds are
/// the normal wait for an acknowledgement on a fast network (one round trip).
pub const STALL_MIN_NS: u64 = 1_000_000;

/// Distinct peers kept per process and interval; the others are counted under `OTHER_PEER`.
pub const MAX_PEERS: usize = 256;
/// Where the peers over `MAX_PEERS` go: the unspecified address, port 0.
pub const OTHER_PEER: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Turns kernel events into `NetMetrics`.
#[derive(Debug, Default)]
pub struct Aggregator {
    current: NetMetrics,
    routes: Routes,
    /// The peers of each process in this interval (capped at `MAX_PEERS`).
    peers: HashMap<u32, std::collections::HashSet<SocketAddr>>,
    /// Events processed since the start.
    pub events: u64,
    /// Picks HTTP server requests to export as spans (the node agent).
    pub spans: Option<SpanSampler>,
    /// The kernel cannot see bytes arrive (no `sk_data_ready`): servers' socket-queue times
    /// are unknown, not 0, and are not recorded.
    pub no_socket_queue: bool,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, e: &NetEvent) {
        self.events += 1;
        let queue_seen = !self.no_socket_queue;
        let m = &mut self.current;
        m.comms.entry(e.tgid).or_insert_with(|| crate::sys::process::comm(e.tgid));
        let peer = self.capped_peer(e.tgid, peer(e));
        let m = &mut self.current;
        match e.kind {
            NET_EVENT_REQUEST => {
                let direction = if e.role == NET_ROLE_SERVER { Direction::Server } else { Direction::Client };
                // A request lasts until the last byte of its response is written (server)
                // or read (client).
                let end = e.resp_last_ns;
                let method = http_method::NAMES.get(e.method as usize).copied().filter(|m| !m.is_empty());
                let route = method.map(|_| {
                    let len = (e.path_len as usize).min(NET_PATH_LEN);
                    self.routes.route(e.tgid, &String::from_utf8_lossy(&e.path[..len]))
                });
                let key = RequestKey {
                    pid: e.tgid,
                    direction,
                    peer: (direction == Direction::Client).then_some(peer),
                    method,
                    route,
                    status: u16::try_from(e.status).unwrap_or(0),
                };
                if let (Some(spans), Direction::Server, Some(method), Some(route)) =
                    (self.spans.as_mut(), direction, key.method, key.route.as_deref())
                {
                    spans.offer(e, end, method, route, peer);
                }
                let stats = m.requests.entry(key).or_default();
                stats.latency.record(end.saturating_sub(e.start_ns));
                if e.stall_ns >= STALL_MIN_NS && e.stall_cause != 0 {
                    stats.stalls.entry(e.stall_cause).or_default().record(e.stall_ns);
                }
                match direction {
                    Direction::Client => stats.ttfb.record(e.resp_first_ns.saturating_sub(e.start_ns)),
                    // (A request whose wait in the socket is not known has no total either.)
                    Direction::Server if queue_seen && e.queue_ns != NET_QUEUE_UNKNOWN => {
                        stats.queue.record(e.queue_ns);
                        let waited = e.queue_ns.saturating_add(e.accept_ns);
                        stats.total.record(end.saturating_sub(e.start_ns).saturating_add(waited));
                    }
                    Direction::Server => {}
                }
                // The kernel's counters are trusted to be sane, not to be small: sums saturate.
                stats.req_bytes = stats.req_bytes.saturating_add(e.req_bytes);
                stats.resp_bytes = stats.resp_bytes.saturating_add(e.resp_bytes);
            }
            NET_EVENT_CONNECT => {
                let c = m.connects.entry((e.tgid, peer)).or_default();
                c.attempts += 1;
                if e.status == 0 {
                    c.latency.record(e.resp_first_ns.saturating_sub(e.start_ns));
                } else {
                    c.failures += 1;
                }
            }
            NET_EVENT_CLOSE => {
                let c = m.connects.entry((e.tgid, peer)).or_default();
                c.closed += 1;
                c.retransmits = c.retransmits.saturating_add(u64::from(e.retransmits));
                if e.srtt_us > 0 {
                    c.rtt.record(u64::from(e.srtt_us) * 1000);
                }
                c.bytes_received = c.bytes_received.saturating_add(e.req_bytes);
                c.bytes_acked = c.bytes_acked.saturating_add(e.resp_bytes);
                c.lifetime.record(e.resp_first_ns.saturating_sub(e.start_ns));
            }
            NET_EVENT_ACCEPT => {
                *m.accepted.entry(e.tgid).or_default() += 1;
                m.accept_queue.entry(e.tgid).or_default().record(e.accept_ns);
            }
            _ => {}
        }
    }

    /// Everything aggregated so far.
    pub fn metrics(&self) -> &NetMetrics {
        &self.current
    }

    /// This interval's metrics; the next interval starts empty (route templates are kept
    /// while in use).
    pub fn take_interval(&mut self) -> NetMetrics {
        self.routes.end_interval();
        self.peers.clear();
        std::mem::take(&mut self.current)
    }

    /// `peer`, or the overflow address once process `pid` has `MAX_PEERS` others in this
    /// interval (a client calling thousands of addresses, a scan).
    fn capped_peer(&mut self, pid: u32, peer: SocketAddr) -> SocketAddr {
        let peers = self.peers.entry(pid).or_default();
        if peers.len() < MAX_PEERS || peers.contains(&peer) {
            peers.insert(peer);
            peer
        } else {
            OTHER_PEER
        }
    }
}

fn peer(e: &NetEvent) -> SocketAddr {
    let ip = if e.family == 10 {
        let v6 = Ipv6Addr::from(e.addr);
        v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
    } else {
        IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]))
    };
    SocketAddr::new(ip, e.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u32, role: u32, path: &str) -> NetEvent {
        let mut p = [0u8; NET_PATH_LEN];
        p[..path.len()].copy_from_slice(path.as_bytes());
        NetEvent {
            kind,
            tgid: 1,
            role,
            status: 200,
            start_ns: 1_000_000,
            resp_first_ns: 3_000_000,
            resp_last_ns: 11_000_000,
            req_bytes: 10,
            resp_bytes: 20,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 8080,
            family: 2,
            method: if path.is_empty() { 0 } else { http_method::GET },
            path_len: path.len() as u32,
            retransmits: 0,
            srtt_us: 0,
            stall_cause: 0,
            queue_ns: 0,
            accept_ns: 0,
            stall_ns: 0,
            path: p,
        }
    }

    #[test]
    fn requests_end_at_the_last_response_byte_clients_keep_their_first() {
        let mut a = Aggregator::new();
        a.add(&event(NET_EVENT_REQUEST, NET_ROLE_SERVER, "/sleep/10"));
        a.add(&event(NET_EVENT_REQUEST, agent_ebpf::NET_ROLE_CLIENT, ""));
        let m = a.take_interval();
        let (server, s) = m.requests.iter().find(|(k, _)| k.direction == Direction::Server).unwrap();
        assert_eq!(server.route.as_deref(), Some("/sleep/{id}"));
        assert_eq!(server.peer, None);
        assert_eq!(s.latency.max_ns, 10_000_000);
        let (client, c) = m.requests.iter().find(|(k, _)| k.direction == Direction::Client).unwrap();
        assert_eq!(client.method, None);
        assert_eq!(client.peer, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!((c.latency.max_ns, c.ttfb.max_ns), (10_000_000, 2_000_000));
        assert_eq!(s.ttfb.count, 0);
        assert!(a.take_interval().requests.is_empty());
    }

    #[test]
    fn stalls_count_on_both_sides_and_unseen_queues_are_not_zeros() {
        let mut a = Aggregator::new();
        let mut e = event(NET_EVENT_REQUEST, NET_ROLE_SERVER, "/sleep/10");
        (e.stall_ns, e.stall_cause, e.queue_ns) = (STALL_MIN_NS, agent_ebpf::stall_cause::SEND_BUFFER, 5);
        a.add(&e);
        let mut c = event(NET_EVENT_REQUEST, agent_ebpf::NET_ROLE_CLIENT, "");
        (c.stall_ns, c.stall_cause) = (40_000_000, agent_ebpf::stall_cause::NAGLE);
        a.add(&c);
        // Under the threshold: not a stall.
        c.stall_ns = STALL_MIN_NS - 1;
        a.add(&c);
        let m = a.take_interval();
        let stalls: Vec<_> = m
            .requests
            .iter()
            .flat_map(|(k, s)| s.stalls.iter().map(move |(c, h)| (k.direction, *c, h.count)))
            .collect();
        assert_eq!(stalls.len(), 2, "{stalls:?}");
        assert!(stalls.contains(&(Direction::Server, agent_ebpf::stall_cause::SEND_BUFFER, 1)));
        assert!(stalls.contains(&(Direction::Client, agent_ebpf::stall_cause::NAGLE, 1)));
        let (_, s) = m.requests.iter().find(|(k, _)| k.direction == Direction::Server).unwrap();
        assert_eq!((s.queue.count, s.total.count), (1, 1));

        // Without `sk_data_ready` a queue of 0 means unknown: nothing is recorded.
        a.no_socket_queue = true;
        a.add(&e);
        let m = a.take_interval();
        let (_, s) = m.requests.iter().next().unwrap();
        assert_eq!((s.latency.count, s.queue.count, s.total.count), (1, 0, 0));
    }

    #[test]
    fn byte_counts_saturate_instead_of_overflowing() {
        let mut a = Aggregator::new();
        let mut e = event(NET_EVENT_REQUEST, NET_ROLE_SERVER, "/upload");
        e.req_bytes = u64::MAX - 1;
        e.start_ns = 0;
        e.resp_last_ns = u64::MAX;
        a.add(&e);
        a.add(&e);
        let mut close = event(NET_EVENT_CLOSE, agent_ebpf::NET_ROLE_CLIENT, "");
        close.req_bytes = u64::MAX;
        close.retransmits = u32::MAX;
        a.add(&close);
        a.add(&close);
        let m = a.take_interval();
        let (_, s) = m.requests.iter().next().unwrap();
        assert_eq!((s.req_bytes, s.resp_bytes, s.latency.sum_ns), (u64::MAX, 40, u64::MAX));
        let (_, c) = m.connects.iter().next().unwrap();
        assert_eq!((c.closed, c.bytes_received, c.retransmits), (2, u64::MAX, 2 * u64::from(u32::MAX)));
    }
}
