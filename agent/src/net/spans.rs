//! Chooses which HTTP server requests become trace spans: a random share of them plus
//! every request slower than a threshold, at most a bounded number per interval.
use std::net::SocketAddr;

use agent_ebpf::NetEvent;

/// One HTTP server request kept as a span (times from the kernel's monotonic clock).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpan {
    pub pid: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub method: &'static str,
    pub route: String,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// Random ids: 16 bytes of trace id, 8 of span id.
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// The sampling decision and the spans kept since the last `take`.
#[derive(Debug)]
pub struct SpanSampler {
    ratio: f64,
    slow_ns: u64,
    max: usize,
    rng: SplitMix,
    kept: Vec<RequestSpan>,
    /// Spans chosen but not kept because `max` were already waiting.
    pub dropped: u64,
}

impl SpanSampler {
    /// Keeps a `ratio` (0..=1) of requests and every one lasting `slow_ns` or more, at
    /// most `max` between two `take`s.
    pub fn new(ratio: f64, slow_ns: u64, max: usize) -> Self {
        Self { ratio, slow_ns, max, rng: SplitMix::seeded(), kept: Vec::new(), dropped: 0 }
    }

    /// Offers a completed server request; `end_ns` is its last response byte.
    pub fn offer(&mut self, e: &NetEvent, end_ns: u64, method: &'static str, route: &str, peer: SocketAddr) {
        let duration = end_ns.saturating_sub(e.start_ns);
        let chosen = duration >= self.slow_ns || self.rng.unit() < self.ratio;
        if !chosen {
            return;
        }
        if self.kept.len() >= self.max {
            self.dropped += 1;
            return;
        }
        let (a, b, c) = (self.rng.next(), self.rng.next(), self.rng.next());
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&a.to_be_bytes());
        trace_id[8..].copy_from_slice(&b.to_be_bytes());
        self.kept.push(RequestSpan {
            pid: e.tgid,
            start_ns: e.start_ns,
            end_ns,
            method,
            route: route.to_string(),
            status: u16::try_from(e.status).unwrap_or(0),
            request_bytes: e.req_bytes,
            response_bytes: e.resp_bytes,
            peer,
            trace_id,
            span_id: c.to_be_bytes(),
        });
    }

    /// The spans kept since the last call.
    pub fn take(&mut self) -> Vec<RequestSpan> {
        std::mem::take(&mut self.kept)
    }
}

/// splitmix64: fast, and good enough for sampling decisions and span ids (which need to
/// be unique, not secret).
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn seeded() -> Self {
        let mut seed = [0u8; 8];
        let from_kernel = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .is_ok();
        let fallback = || {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
        };
        Self(if from_kernel { u64::from_ne_bytes(seed) } else { fallback() })
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ms: u64) -> NetEvent {
        NetEvent {
            kind: agent_ebpf::NET_EVENT_REQUEST,
            tgid: 7,
            role: agent_ebpf::NET_ROLE_SERVER,
            status: 200,
            start_ns: 1_000_000_000,
            resp_first_ns: 0,
            resp_last_ns: 1_000_000_000 + ms * 1_000_000,
            req_bytes: 0,
            resp_bytes: 0,
            addr: [0; 16],
            port: 0,
            family: 2,
            method: 0,
            path_len: 0,
            retransmits: 0,
            srtt_us: 0,
            stall_cause: 0,
            queue_ns: 0,
            accept_ns: 0,
            stall_ns: 0,
            path: [0; agent_ebpf::NET_PATH_LEN],
        }
    }

    #[test]
    fn keeps_slow_requests_and_about_the_ratio_of_the_rest() {
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let mut s = SpanSampler::new(0.1, 500_000_000, 100_000);
        for _ in 0..20_000 {
            let e = request(1);
            s.offer(&e, e.resp_last_ns, "GET", "/a", peer);
        }
        let slow = request(600);
        s.offer(&slow, slow.resp_last_ns, "GET", "/slow", peer);
        let kept = s.take();
        let sampled = kept.iter().filter(|k| k.route == "/a").count();
        assert!((1700..2300).contains(&sampled), "10 % of 20000 sampled: {sampled}");
        assert!(kept.iter().any(|k| k.route == "/slow" && k.end_ns - k.start_ns == 600_000_000));
        let ids: std::collections::HashSet<_> = kept.iter().map(|k| k.span_id).collect();
        assert_eq!(ids.len(), kept.len(), "span ids are unique");
        assert!(s.take().is_empty());
    }

    #[test]
    fn bounded_per_interval() {
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let mut s = SpanSampler::new(1.0, u64::MAX, 10);
        for _ in 0..25 {
            let e = request(1);
            s.offer(&e, e.resp_last_ns, "GET", "/a", peer);
        }
        assert_eq!(s.take().len(), 10);
        assert_eq!(s.dropped, 15);
    }
}
