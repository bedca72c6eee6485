//! Sends batches (OTLP over gRPC or http/protobuf, Pyroscope pushes) from a thread of its
//! own: a queue bounded in batches and bytes (the oldest batch is dropped and counted when
//! full) and retries with backoff, so an unreachable or slow endpoint never blocks sampling.
use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message;

use super::{
    endpoints::Target,
    split::split,
    transport::{Destination, Failure},
};

/// Counters the exporter shares with the agent's health metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Failed attempts (each retry counts).
    pub failures: AtomicU64,
    /// Batches lost: pushed out of a full queue, refused by the receiver, a resource over
    /// the request size limit, or still queued when the shutdown deadline passed.
    pub dropped: AtomicU64,
    pub sent: AtomicU64,
}

/// How much an exporter holds and sends at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Batches queued at most.
    pub max_batches: usize,
    /// Bytes queued at most (encoded, before compression).
    pub max_bytes: usize,
    /// Largest request the receiver takes; larger OTLP requests are split by resource.
    /// None: sent whole (Pyroscope's JSON pushes).
    pub max_request_bytes: Option<usize>,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
}

impl Queue {
    fn pop_front(&mut self) -> Option<Vec<u8>> {
        let batch = self.batches.pop_front()?;
        self.bytes -= batch.len();
        Some(batch)
    }

    fn clear(&mut self) -> usize {
        let n = self.batches.len();
        self.batches.clear();
        self.bytes = 0;
        n
    }
}

/// Handle to the exporting thread.
pub struct Exporter {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    limits: Limits,
    pub stats: Arc<ExportStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest wait a receiver's Retry-After or RetryInfo is followed for.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

impl Exporter {
    /// Starts sending an OTLP signal to its target.
    pub fn otlp(target: &Target, limits: Limits) -> std::io::Result<Self> {
        Self::start(Destination::otlp(target), limits)
    }

    /// Starts the thread sending to `destination`.
    pub fn start(destination: Destination, limits: Limits) -> std::io::Result<Self> {
        let queue = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
        let stats = Arc::new(ExportStats::default());
        let (q, s) = (queue.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("export".into())
            .spawn(move || send_loop(&destination, &q, &s))?;
        Ok(Self { queue, limits, stats, thread: Some(thread) })
    }

    /// Queues a protobuf request; never blocks on the network.
    pub fn push(&self, request: &impl Message) {
        self.push_bytes(request.encode_to_vec());
    }

    /// Queues an encoded request (split by resource when over the request size limit);
    /// never blocks on the network.
    pub fn push_bytes(&self, body: Vec<u8>) {
        let parts = match self.limits.max_request_bytes {
            Some(limit) => {
                let out = split(body, limit);
                if out.dropped > 0 {
                    tracing::warn!(
                        "{} resource(s) over the {limit}-byte request limit dropped (otlp.max_request_bytes)",
                        out.dropped
                    );
                    self.stats.dropped.fetch_add(out.dropped as u64, Ordering::Relaxed);
                }
                out.parts
            }
            None => vec![body],
        };
        let (lock, cond) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        for part in parts {
            if part.len() > self.limits.max_bytes {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            while q.batches.len() >= self.limits.max_batches || q.bytes + part.len() > self.limits.max_bytes {
                if q.pop_front().is_none() {
                    break;
                }
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            q.bytes += part.len();
            q.batches.push_back(part);
        }
        cond.notify_one();
    }

    /// Sends what is queued within `deadline`, then stops the thread; what is still
    /// queued then is counted as dropped.
    /// Takes no more batches: the sending thread sends what is queued and ends.
    pub fn close(&self) {
        let (lock, cond) = &*self.queue;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cond.notify_one();
    }

    /// `shutdown_by` `deadline` from now.
    pub fn shutdown(self, deadline: Duration) {
        self.shutdown_by(Instant::now() + deadline);
    }

    /// Closes the queue and waits until `by` for what is queued to go out; what is left
    /// then is dropped and counted (the sending thread, perhaps inside a request or a
    /// backoff, is left to end with the process).
    pub fn shutdown_by(self, by: Instant) {
        self.close();
        if let Some(t) = &self.thread {
            while !t.is_finished() && Instant::now() < by {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let (lock, _) = &*self.queue;
        let left = lock.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if left > 0 {
            self.stats.dropped.fetch_add(left as u64, Ordering::Relaxed);
            tracing::warn!("{left} export batch(es) not sent before the shutdown deadline were dropped");
        }
    }
}

fn send_loop(destination: &Destination, queue: &(Mutex<Queue>, Condvar), stats: &ExportStats) {
    let url = destination.url();
    let mut send = match destination.connect() {
        Ok(send) => send,
        Err(e) => {
            // Checked at start, so unexpected: say so once and count what is lost.
            tracing::error!("cannot export to {url}: {e}");
            return discard(queue, stats);
        }
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        let batch = {
            let (lock, cond) = queue;
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            while q.batches.is_empty() && !q.closed {
                q = cond.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            match q.batches.front() {
                Some(b) => b.clone(),
                None => return, // closed and drained
            }
        };
        let sent = send(&batch);
        let (lock, cond) = queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        // The batch may have been dropped from a full queue meanwhile.
        let mut done = || {
            if q.batches.front() == Some(&batch) {
                q.pop_front();
            }
        };
        match sent {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                done();
                backoff = Duration::from_millis(500);
            }
            Err(Failure::Permanent(e)) => {
                // Sending it again would be refused again: drop it, keep the queue moving.
                stats.failures.fetch_add(1, Ordering::Relaxed);
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("export to {url} refused: {e}; the batch is dropped");
                done();
            }
            Err(Failure::Retry(e, after)) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                // The receiver's own delay when it gave one, else ours.
                let wait = after.map_or(backoff, |a| a.min(RETRY_AFTER_MAX));
                tracing::warn!("export to {url} failed: {e}; retrying in {wait:?}");
                // Wait it out: new batches do not cut it short, closing does.
                let until = std::time::Instant::now() + wait;
                loop {
                    if q.closed {
                        return;
                    }
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    q = cond.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Counts every batch pushed as dropped until the queue is closed.
fn discard(queue: &(Mutex<Queue>, Condvar), stats: &ExportStats) {
    let (lock, cond) = queue;
    let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let n = q.clear();
        stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
        if q.closed {
            return;
        }
        q = cond.wait(q).unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination that refuses connections: every send is retried.
    fn unreachable() -> Destination {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Destination::Http {
            url: format!("http://127.0.0.1:{port}/v1/metrics"),
            content_type: "application/x-protobuf",
            headers: Vec::new(),
            gzip: false,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_shutdown_counts_what_is_left() {
        let limits = Limits { max_batches: 64, max_bytes: 1000, max_request_bytes: None };
        let exporter = Exporter::start(unreachable(), limits).unwrap();
        for _ in 0..5 {
            exporter.push_bytes(vec![0; 400]);
        }
        exporter.push_bytes(vec![0; 2000]);
        let stats = exporter.stats.clone();
        {
            let q = exporter.queue.0.lock().unwrap();
            assert_eq!((q.batches.len(), q.bytes), (2, 800), "two 400-byte batches fit in 1000 bytes");
        }
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 4, "3 pushed out, 1 larger than the queue");
        exporter.shutdown(Duration::from_millis(200));
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 6, "the 2 left at shutdown are counted");
        assert_eq!(stats.sent.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_queue_is_bounded_in_batches() {
        let limits = Limits { max_batches: 3, max_bytes: 1 << 20, max_request_bytes: None };
        let exporter = Exporter::start(unreachable(), limits).unwrap();
        for _ in 0..10 {
            exporter.push_bytes(vec![1; 10]);
        }
        assert_eq!(exporter.queue.0.lock().unwrap().batches.len(), 3);
        assert_eq!(exporter.stats.dropped.load(Ordering::Relaxed), 7);
    }
}
