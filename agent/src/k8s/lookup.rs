//! The node-local pod lookup: a background thread keeps this node's pods cached, refreshing
//! on a period and soon after a process shows up in a pod it does not know yet.
use std::{
    collections::HashMap,
    sync::{
        Arc, Condvar, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{client::Client, pods::PodIndex};

/// Shortest gap between two lists of the pods.
const MIN_GAP: Duration = Duration::from_secs(2);
/// First wait before an unknown pod UID may trigger another list; doubles per ask.
const ASK_BACKOFF: Duration = Duration::from_secs(4);

/// A handle on the lookup; clones share one cache and one thread.
#[derive(Clone)]
pub struct PodLookup {
    shared: Arc<Shared>,
}

struct Shared {
    index: RwLock<Arc<PodIndex>>,
    /// Successful lists so far.
    generation: AtomicU64,
    /// Lists tried so far.
    attempts: AtomicU64,
    /// A refresh was asked for.
    wake: Mutex<bool>,
    cv: Condvar,
    /// Pod UID -> (when it may ask again, asks so far).
    asked: Mutex<HashMap<String, (Instant, u32)>>,
    period: Duration,
}

impl PodLookup {
    /// Starts the thread; waits up to `first` for the first list (successful or not) so
    /// the first processes found are already named.
    pub fn start(client: Client, period: Duration, first: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            index: RwLock::new(Arc::new(PodIndex::default())),
            generation: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            wake: Mutex::new(false),
            cv: Condvar::new(),
            asked: Mutex::new(HashMap::new()),
            period,
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("stoker-k8s".into())
            .spawn(move || refresh_loop(&client, &thread_shared))?;
        let lookup = Self { shared };
        let deadline = Instant::now() + first;
        while lookup.shared.attempts.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(lookup)
    }

    /// The pods as of the last successful list.
    pub fn index(&self) -> Arc<PodIndex> {
        self.shared.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes after every successful list.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Relaxed)
    }

    /// A process runs in pod `uid`, which the cache does not know: list the pods soon.
    /// Each UID asks with a doubling backoff (capped at the period), so a pod the API
    /// server never names costs no more than the periodic refresh.
    pub fn want(&self, uid: &str) {
        let now = Instant::now();
        {
            let mut asked = self.shared.asked.lock().unwrap_or_else(|e| e.into_inner());
            if asked.len() > 4096 {
                asked.clear();
            }
            let (next, n) = asked.entry(uid.to_string()).or_insert((now, 0));
            if now < *next {
                return;
            }
            *next = now + (ASK_BACKOFF * 2u32.saturating_pow(*n)).min(self.shared.period);
            *n = n.saturating_add(1);
        }
        *self.shared.wake.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.cv.notify_one();
    }
}

fn refresh_loop(client: &Client, shared: &Shared) {
    let mut failing = false;
    loop {
        let started = Instant::now();
        match client.list_pods() {
            Ok(pods) => {
                let count = pods.len();
                *shared.index.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(PodIndex::new(pods));
                shared.generation.fetch_add(1, Ordering::Relaxed);
                if failing {
                    tracing::warn!(
                        "Kubernetes pod lookup works again: {count} pods on node {}",
                        client.node()
                    );
                } else {
                    tracing::debug!("{count} pods on node {}", client.node());
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "{e}; sampling goes on without k8s.* attributes and retries every {:?} (and when a new pod's process appears)",
                        shared.period
                    );
                } else {
                    tracing::debug!("{e}");
                }
                failing = true;
            }
        }
        shared.attempts.fetch_add(1, Ordering::Relaxed);
        // Until the period is over, or a refresh is asked for and MIN_GAP has passed.
        let periodic = started + shared.period;
        let mut wake = shared.wake.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            if now >= periodic || (*wake && now >= started + MIN_GAP) {
                break;
            }
            let until = if *wake { started + MIN_GAP } else { periodic };
            wake = shared.cv.wait_timeout(wake, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        *wake = false;
    }
}
