//! Sends batches (OTLP over gRPC or http/protobuf, Pyroscope pushes) from a thread of its
//! own: a bounded queue (the oldest batch is dropped and counted when full) and retries
//! with backoff, so an unreachable or slow endpoint never blocks sampling.
use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prost::Message;

use super::{
    endpoints::Target,
    transport::{Destination, Failure},
};

/// Counters the exporter shares with the agent's health metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Failed attempts (each retry counts).
    pub failures: AtomicU64,
    /// Batches lost: pushed out of a full queue, or refused by the receiver.
    pub dropped: AtomicU64,
    pub sent: AtomicU64,
}

struct Queue {
    batches: VecDeque<Vec<u8>>,
    closed: bool,
}

/// Handle to the exporting thread.
pub struct Exporter {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    capacity: usize,
    pub stats: Arc<ExportStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Exporter {
    /// Starts sending an OTLP signal to its target.
    pub fn otlp(target: &Target, capacity: usize) -> std::io::Result<Self> {
        Self::start(Destination::otlp(target), capacity)
    }

    /// Starts the thread sending to `destination`.
    pub fn start(destination: Destination, capacity: usize) -> std::io::Result<Self> {
        let queue = Arc::new((Mutex::new(Queue { batches: VecDeque::new(), closed: false }), Condvar::new()));
        let stats = Arc::new(ExportStats::default());
        let (q, s) = (queue.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("export".into())
            .spawn(move || send_loop(&destination, &q, &s))?;
        Ok(Self { queue, capacity, stats, thread: Some(thread) })
    }

    /// Queues a protobuf request; never blocks on the network.
    pub fn push(&self, request: &impl Message) {
        self.push_bytes(request.encode_to_vec());
    }

    /// Queues an encoded request; never blocks on the network.
    pub fn push_bytes(&self, body: Vec<u8>) {
        let (lock, cond) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        if q.batches.len() >= self.capacity {
            q.batches.pop_front();
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.batches.push_back(body);
        cond.notify_one();
    }

    /// Sends what is queued within `deadline`, then stops the thread.
    pub fn shutdown(mut self, deadline: Duration) {
        let (lock, cond) = &*self.queue;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cond.notify_one();
        let start = std::time::Instant::now();
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && start.elapsed() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
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
                q.batches.pop_front();
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
            Err(Failure::Retry(e)) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("export to {url} failed: {e}; retrying in {backoff:?}");
                // Wait out the backoff: new batches do not cut it short, closing does.
                let until = std::time::Instant::now() + backoff;
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
        stats.dropped.fetch_add(q.batches.len() as u64, Ordering::Relaxed);
        q.batches.clear();
        if q.closed {
            return;
        }
        q = cond.wait(q).unwrap_or_else(|e| e.into_inner());
    }
}
