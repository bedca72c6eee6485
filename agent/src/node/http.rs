//! The agent's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` and `/readyz`
//! (honest: they fail when the main loop stops ticking); no client can hold it.
use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{prometheus, state::Snapshot};

/// How long a client may take to send its request or to read the response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed unanswered until one ends.
const MAX_CONNECTIONS: usize = 64;
/// Longest request head read.
const MAX_HEAD: usize = 8192;

/// The main loop's pulse, as the health endpoints see it.
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds from `start` to the end of the main loop's last tick.
    last_ms: AtomicU64,
    /// Ticks may be apart this long before the agent counts as stuck.
    stale_after: Duration,
    ready: AtomicBool,
}

impl Heartbeat {
    pub fn new(stale_after: Duration) -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0), stale_after, ready: AtomicBool::new(false) }
    }

    /// The main loop completed a tick.
    pub fn beat(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The agent has started (its programs are loaded and its exporters built).
    pub fn set_ready(&self) {
        self.beat();
        self.ready.store(true, Ordering::Relaxed);
    }

    /// None while alive, else how long since the last tick.
    fn stuck_for(&self) -> Option<Duration> {
        let since =
            self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)));
        (self.ready.load(Ordering::Relaxed) && since > self.stale_after).then_some(since)
    }
}

/// Serves on `listen` until the process exits (the threads are detached).
pub fn serve(listen: &str, snapshot: Arc<Mutex<Snapshot>>, heartbeat: Arc<Heartbeat>) -> io::Result<()> {
    let listener =
        TcpListener::bind(listen).map_err(|e| io::Error::other(format!("listen on {listen}: {e}")))?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("http".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: closed unanswered
            }
            let (snapshot, heartbeat, done) = (snapshot.clone(), heartbeat.clone(), active.clone());
            let spawned = std::thread::Builder::new().name("http-conn".into()).spawn(move || {
                let _ = handle(stream, &snapshot, &heartbeat);
                done.fetch_sub(1, Ordering::AcqRel);
            });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })?;
    Ok(())
}

/// Answers one request and closes the connection; every read and write is timed out.
fn handle(mut stream: TcpStream, snapshot: &Mutex<Snapshot>, heartbeat: &Heartbeat) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_HEAD || Instant::now() > deadline {
            return Ok(());
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body, kind) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let mut snapshot = snapshot.lock().unwrap_or_else(|e| e.into_inner());
            snapshot.scrapes += 1;
            let text = prometheus::render(&snapshot);
            ("200 OK", text, "text/plain; version=0.0.4")
        }
        ("GET" | "HEAD", "/advice") => {
            let snapshot = snapshot.lock().unwrap_or_else(|e| e.into_inner());
            match snapshot.advice_window {
                Some(window) => ("200 OK", super::advice::json(&snapshot, window), "application/json"),
                None => ("404 Not Found", "advice is off (advice.enabled)\n".into(), "text/plain"),
            }
        }
        ("GET" | "HEAD", "/healthz" | "/readyz") => match heartbeat.stuck_for() {
            Some(since) => (
                "503 Service Unavailable",
                format!("stuck: no tick for {:.0} s\n", since.as_secs_f64()),
                "text/plain",
            ),
            None if path == "/readyz" && !heartbeat.ready.load(Ordering::Relaxed) => {
                ("503 Service Unavailable", "starting\n".into(), "text/plain")
            }
            None if path == "/readyz" => ("200 OK", "ready\n".into(), "text/plain"),
            None => ("200 OK", "ok\n".into(), "text/plain"),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n".into(), "text/plain"),
        _ => ("405 Method Not Allowed", "only GET\n".into(), "text/plain"),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_loop_reads_as_stuck() {
        let h = Heartbeat::new(Duration::from_millis(20));
        assert_eq!(h.stuck_for(), None, "not ready yet: starting, not stuck");
        h.set_ready();
        assert_eq!(h.stuck_for(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert!(h.stuck_for().is_some());
        h.beat();
        assert_eq!(h.stuck_for(), None);
    }
}
