//! Sends batches (OTLP metrics over http/protobuf, Pyroscope pushes) from a thread of its
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

/// Counters the exporter shares with the agent's health metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub failures: AtomicU64,
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

const TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Exporter {
    /// Starts sending OTLP metrics to `endpoint` (the base URL; `/v1/metrics` is appended).
    pub fn otlp_metrics(endpoint: &str, capacity: usize) -> Self {
        let url = format!("{}/v1/metrics", endpoint.trim_end_matches('/'));
        Self::start(url, "application/x-protobuf", capacity)
    }

    /// Starts sending to `url` with the given content type.
    pub fn start(url: String, content_type: &'static str, capacity: usize) -> Self {
        let queue = Arc::new((Mutex::new(Queue { batches: VecDeque::new(), closed: false }), Condvar::new()));
        let stats = Arc::new(ExportStats::default());
        let (q, s) = (queue.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || send_loop(&url, content_type, &q, &s))
            .expect("spawn the export thread");
        Self { queue, capacity, stats, thread: Some(thread) }
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

fn send_loop(url: &str, content_type: &str, queue: &(Mutex<Queue>, Condvar), stats: &ExportStats) {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(TIMEOUT)).build().into();
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
        let sent = agent.post(url).header("Content-Type", content_type).send(&batch[..]);
        let (lock, cond) = queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        match sent {
            Ok(_) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                // The batch may have been dropped from a full queue meanwhile.
                if q.batches.front() == Some(&batch) {
                    q.batches.pop_front();
                }
                backoff = Duration::from_millis(500);
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("export to {url} failed: {e}; retrying in {backoff:?}");
                if q.closed {
                    return;
                }
                let _ = cond.wait_timeout(q, backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
