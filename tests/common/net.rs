//! Helpers for the network tests: a child's stdout read with deadlines, and requests as
//! the fixture processes timed them themselves (tests/fixtures/net/timed_socket.py).
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Child,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn net_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/net").join(name)
}

/// Lines a child prints on stdout, read on a thread so waits can have deadlines (and the
/// child never blocks on a full pipe).
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    pub fn of(child: &mut Child) -> Self {
        let out = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self(rx)
    }

    pub fn next(&self, what: &str, within: Duration) -> String {
        self.0.recv_timeout(within).unwrap_or_else(|_| panic!("no {what} within {within:?}"))
    }

    /// The next `n` request timings a `--timings` server prints (one JSON line each).
    pub fn timings(&self, n: usize) -> Vec<Timed> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.0.recv_timeout(left) else {
                panic!("the server timed {} of the {n} requests within 30 s", got.len())
            };
            got.push(Timed::parse(&serde_json::from_str(&line).expect("a timing line is JSON")));
        }
        got
    }
}

/// One request as the process that served or made it timed it: brackets (CLOCK_MONOTONIC
/// ns, the kernel's clock) around the system calls whose exits stoker takes as the
/// request's start and end.
#[derive(Debug, Clone)]
pub struct Timed {
    pub method: Option<String>,
    pub path: Option<String>,
    pub status: Option<u64>,
    /// The peer's port: the client's for a server, the server's for a client.
    pub port: u16,
    pub start: [u64; 2],
    pub end: [u64; 2],
}

impl Timed {
    pub fn parse(v: &Value) -> Self {
        let pair = |key: &str| -> [u64; 2] {
            let a = v[key].as_array().unwrap_or_else(|| panic!("no {key} in {v}"));
            [a[0].as_u64().unwrap(), a[1].as_u64().unwrap()]
        };
        Self {
            method: v["method"].as_str().map(String::from),
            path: v["path"].as_str().map(String::from),
            status: v["status"].as_u64(),
            port: v["port"].as_u64().unwrap() as u16,
            start: pair("start"),
            end: pair("end"),
        }
    }

    pub fn list(v: &Value) -> Vec<Self> {
        v.as_array().unwrap_or_else(|| panic!("not a list of timings: {v}")).iter().map(Self::parse).collect()
    }

    /// The shortest duration the brackets allow, in ns.
    pub fn min_ns(&self) -> u64 {
        self.end[0].saturating_sub(self.start[1])
    }

    /// The longest duration the brackets allow, in ns.
    pub fn max_ns(&self) -> u64 {
        self.end[1] - self.start[0]
    }

    pub fn path_starts_with(&self, prefix: &str) -> bool {
        self.path.as_deref().is_some_and(|p| p.starts_with(prefix))
    }
}

/// stoker's quantiles come from log buckets 2% wide, each value within 1% of its bucket's
/// middle (agent/src/net/hist.rs).
pub const QUANTILE_ERROR: f64 = 0.01;

/// Nearest-rank quantile, as stoker ranks them.
fn nearest_rank(mut values: Vec<u64>, q: f64) -> u64 {
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// The range in which the `q` quantile of the requests' true durations lies, in ms: each
/// order statistic lies between those of the shortest and of the longest durations.
pub fn quantile_range_ms(timed: &[&Timed], q: f64) -> (f64, f64) {
    assert!(!timed.is_empty(), "no requests to take a quantile of");
    let lo = nearest_rank(timed.iter().map(|t| t.min_ns()).collect(), q);
    let hi = nearest_rank(timed.iter().map(|t| t.max_ns()).collect(), q);
    (lo as f64 / 1e6, hi as f64 / 1e6)
}

/// Asserts stoker's `q` quantile (ms) is the process's own: inside the range its brackets
/// allow, widened only by stoker's bucket error.
pub fn assert_quantile(what: &str, stoker_ms: f64, timed: &[&Timed], q: f64) {
    let (lo, hi) = quantile_range_ms(timed, q);
    eprintln!(
        "{what}: stoker {stoker_ms:.3} ms, the process's own {lo:.3}..{hi:.3} ms ({} requests)",
        timed.len()
    );
    assert!(
        (lo * (1.0 - QUANTILE_ERROR)..=hi * (1.0 + QUANTILE_ERROR)).contains(&stoker_ms),
        "{what}: stoker {stoker_ms:.3} ms, the process's own measurement {lo:.3}..{hi:.3} ms \
         (+-{QUANTILE_ERROR} for stoker's quantile buckets)"
    );
}

/// The range of the sum of the requests' true durations, in seconds.
pub fn sum_range_s(timed: &[&Timed]) -> (f64, f64) {
    let lo: u64 = timed.iter().map(|t| t.min_ns()).sum();
    let hi: u64 = timed.iter().map(|t| t.max_ns()).sum();
    (lo as f64 / 1e9, hi as f64 / 1e9)
}

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's timestamps and the fixtures').
pub fn monotonic_ns() -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}
