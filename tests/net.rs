//! End-to-end tests of `stoker record --net`: real kernel programs watching real Python
//! HTTP and TCP servers and clients over real sockets. Run as root.
mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const PYTHON: &str = "3.12.1";

/// The tests compare latencies with the clients' own timings to a fraction of a
/// millisecond: they run one at a time, not competing for the CPUs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/net").join(name)
}

/// Lines a child prints on stdout, read on a thread so waits can have deadlines.
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn of(child: &mut Child) -> Self {
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

    fn next(&self, what: &str, within: Duration) -> String {
        self.0.recv_timeout(within).unwrap_or_else(|_| panic!("no {what} within {within:?}"))
    }
}

/// A Python server from the fixtures, not watched; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(script: &str) -> Self {
        let mut child = Command::new(python(PYTHON))
            .arg(fixture(script))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the Python server");
        let port = Lines::of(&mut child).next("server port", Duration::from_secs(10)).trim().parse().unwrap();
        Self { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit, killing it after `within`.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("stoker did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a Python fixture client (not watched) and returns what it prints as JSON.
fn run_client(args: &[&str]) -> Value {
    let out = Command::new(python(PYTHON)).args(args).output().expect("run the Python client");
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
}

/// Nearest-rank quantile of durations in seconds, in milliseconds.
fn quantile_ms(mut seconds: Vec<f64>, q: f64) -> f64 {
    seconds.sort_by(f64::total_cmp);
    let rank = ((q * seconds.len() as f64).ceil() as usize).clamp(1, seconds.len());
    seconds[rank - 1] * 1000.0
}

/// Asserts stoker's value is within 2% or 0.5 ms of the client's own measurement.
fn assert_close(what: &str, stoker_ms: f64, client_ms: f64) {
    let tolerance = (client_ms * 0.02).max(0.5);
    assert!(
        (stoker_ms - client_ms).abs() <= tolerance,
        "{what}: stoker {stoker_ms:.3} ms, client {client_ms:.3} ms (tolerance {tolerance:.3} ms)"
    );
}

fn endpoints<'a>(report: &'a Value, pred: impl Fn(&Value) -> bool + 'a) -> Vec<&'a Value> {
    report["endpoints"].as_array().expect("endpoints array").iter().filter(|e| pred(e)).collect()
}

fn one<'a>(report: &'a Value, what: &str, pred: impl Fn(&Value) -> bool + 'a) -> &'a Value {
    let found = endpoints(report, pred);
    assert_eq!(found.len(), 1, "expected one {what} row in {report:#}");
    found[0]
}

fn read_report(output: &Path) -> (Value, String) {
    let path = output.with_file_name(format!("{}.net.json", output.file_stem().unwrap().to_string_lossy()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    (serde_json::from_str(&text).expect("the network report is JSON"), text)
}

/// A server launched under `stoker record --net`; it prints its port on stdout.
struct Watched {
    stoker: Child,
    port: String,
    output: PathBuf,
}

impl Watched {
    fn start(python_version: &str, script: &str) -> Self {
        let output = scratch("net-server").join("server.folded");
        let mut stoker = Command::new(STOKER)
            .args(["record", "--net", "-f", "folded", "-o", output.to_str().unwrap(), "--"])
            .arg(python(python_version))
            .arg(fixture(script))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stoker");
        let port = Lines::of(&mut stoker).next("server port", Duration::from_secs(20)).trim().to_string();
        Self { stoker, port, output }
    }

    /// Ends the session (Ctrl-C) and returns the network report and its text.
    fn finish(mut self) -> (Value, String) {
        unsafe { libc::kill(self.stoker.id() as i32, libc::SIGINT) };
        let status = wait_exit(&mut self.stoker, Duration::from_secs(30));
        let mut err = String::new();
        std::io::Read::read_to_string(self.stoker.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "stoker failed: {err}");
        eprintln!("{err}");
        read_report(&self.output)
    }
}

/// Asserts the server-side GET /sleep/{id} row matches the client's own timings: exact
/// count, p50 and p99 within tolerance.
fn assert_sleeps_match(report: &Value, timed: &Value) {
    let sleeps =
        one(report, "GET /sleep/{id}", |e| e["direction"] == "server" && e["route"] == "/sleep/{id}");
    let client: Vec<f64> = timed
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/sleep/"))
        .map(|r| r["seconds"].as_f64().unwrap())
        .collect();
    assert_eq!(sleeps["count"].as_u64(), Some(client.len() as u64), "request count: {sleeps:#}");
    assert_eq!(sleeps["statuses"]["200"].as_u64(), Some(client.len() as u64), "statuses: {sleeps:#}");
    for (q, key) in [(0.5, "p50_ms"), (0.99, "p99_ms")] {
        let stoker_ms = sleeps[key].as_f64().unwrap();
        let client_ms = quantile_ms(client.clone(), q);
        eprintln!("GET /sleep/{{id}} {key}: stoker {stoker_ms:.3} ms, client {client_ms:.3} ms");
        assert_close(&format!("GET /sleep/{{id}} {key}"), stoker_ms, client_ms);
    }
}

/// Two keep-alive connections, 100 requests each: 5, 20 and 50 ms (60/35/5).
fn sleep_paths() -> Vec<String> {
    (0..100)
        .map(|i| {
            let ms = if i % 20 == 7 {
                50
            } else if i % 20 < 7 {
                20
            } else {
                5
            };
            if i == 3 { format!("/sleep/{ms}?token=secret") } else { format!("/sleep/{ms}") }
        })
        .collect()
}

/// A ThreadingHTTPServer under `stoker record --net`, driven by keep-alive HTTP/1.1
/// clients that time every request themselves.
#[test]
fn http_server_latency_matches_client() {
    require_root();
    let _serial = serial();
    let server = Watched::start(PYTHON, "http_server.py");
    let port = server.port.clone();

    // Two connections, 100 requests each: 5, 20 and 50 ms (60/35/5), one with a query string.
    let mut paths: Vec<String> = Vec::new();
    for i in 0..100 {
        let ms = if i % 20 == 7 {
            50
        } else if i % 20 < 7 {
            20
        } else {
            5
        };
        paths.push(if i == 3 { format!("/sleep/{ms}?token=secret") } else { format!("/sleep/{ms}") });
    }
    paths.push("/fail".into());
    let plan = serde_json::json!({ "connections": 2, "paths": paths, "split_posts": 5 }).to_string();
    let timed = run_client(&[fixture("http_client.py").to_str().unwrap(), &port, &plan]);
    // 50 connections at once, 4 requests each.
    let plan = serde_json::json!({ "connections": 50, "paths": vec!["/c/sleep/2"; 4] }).to_string();
    let concurrent = run_client(&[fixture("http_client.py").to_str().unwrap(), &port, &plan]);
    assert_eq!(concurrent.as_array().unwrap().len(), 200);

    let (report, text) = server.finish();
    assert!(!text.contains("secret") && !text.contains("token"), "the query string left the kernel: {text}");
    let server = |route: &'static str| {
        move |e: &Value| e["direction"] == "server" && e["method"] == "GET" && e["route"] == route
    };
    assert_sleeps_match(&report, &timed);

    let fail = one(&report, "GET /fail", server("/fail"));
    assert_eq!((fail["count"].as_u64(), fail["errors"].as_u64()), (Some(2), Some(2)), "{fail:#}");

    // The body arrives in 4 pieces 5 ms apart: one request each, from the first byte.
    let upload = one(&report, "POST /upload/{id}", |e| e["method"] == "POST");
    assert_eq!(upload["count"].as_u64(), Some(10), "split uploads: {upload:#}");
    assert!(upload["request_bytes"].as_u64().unwrap() >= 10 * 4000, "request bytes: {upload:#}");
    assert!(upload["p50_ms"].as_f64().unwrap() >= 15.0, "an upload ended before its body: {upload:#}");

    let conc = one(&report, "GET /c/sleep/{id}", server("/c/sleep/{id}"));
    assert_eq!(conc["count"].as_u64(), Some(200), "concurrent requests: {conc:#}");
    assert!(conc["p50_ms"].as_f64().unwrap() >= 2.0, "{conc:#}");
    let accepted: u64 = report["accepted"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(accepted, 52, "accepted connections");
    assert_eq!(report["drops"]["events_lost"].as_u64(), Some(0));
}

/// An asyncio server from PyPI (aiohttp, on the interpreter `cargo xtask setup` installs
/// it for): the same request counts and latencies as the client's.
#[test]
fn aiohttp_server_latency_matches_client() {
    require_root();
    let _serial = serial();
    let server = Watched::start("3.11.7", "aiohttp_server.py");
    // One connection: with several, a request can wait in its socket while the event loop
    // runs another handler, time the server never sees as its own (see the README).
    let plan = serde_json::json!({ "connections": 1, "paths": sleep_paths() }).to_string();
    let timed = run_client(&[fixture("http_client.py").to_str().unwrap(), &server.port, &plan]);
    let (report, _) = server.finish();
    assert_sleeps_match(&report, &timed);
}

/// The asyncio server at full speed under wrk (8 keep-alive connections, some 20,000
/// requests a second on one CPU): every request is counted and no event is lost.
#[test]
fn full_request_rate_loses_nothing() {
    require_root();
    let _serial = serial();
    let server = Watched::start("3.11.7", "aiohttp_server.py");
    let out = Command::new("wrk")
        .args(["-t1", "-c8", "-d3s", &format!("http://127.0.0.1:{}/sleep/0", server.port)])
        .output()
        .expect("run wrk (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed: {text}");
    let served: u64 = text
        .split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .find(|(_, next)| *next == "requests")
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output: {text}"));
    assert!(served > 10_000, "too few requests to stress the event rings: {text}");
    let (report, _) = server.finish();
    assert_eq!(report["drops"]["events_lost"].as_u64(), Some(0), "{:#}", report["drops"]);
    let sleeps =
        one(&report, "GET /sleep/{id}", |e| e["direction"] == "server" && e["route"] == "/sleep/{id}");
    let count = sleeps["count"].as_u64().unwrap();
    // wrk does not count the requests under way when it stops (at most one per connection).
    assert!((served..=served + 8).contains(&count), "stoker counted {count}, wrk {served}");
}

/// A watched Python client calling an HTTP upstream, a line-echo (non-HTTP) upstream and a
/// closed port: both upstreams appear with their addresses and latencies, the echo
/// traffic as generic TCP, and the refused connects as failures.
#[test]
fn client_upstreams_and_failed_connects() {
    require_root();
    let _serial = serial();
    let http = Server::start("http_server.py");
    let echo = Server::start("echo_server.py");
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let output = scratch("net-client").join("client.folded");
    let n = "20";
    let out = Command::new(STOKER)
        .args(["record", "--net", "-f", "folded", "-o", output.to_str().unwrap(), "--"])
        .arg(python(PYTHON))
        .arg(fixture("upstream_client.py"))
        .args([&http.port.to_string(), &echo.port.to_string(), &closed.to_string(), n])
        .stdin(Stdio::null())
        .output()
        .expect("run stoker");
    let err = stderr(&out);
    assert!(out.status.success(), "stoker failed: {err}");
    eprintln!("{err}");
    let timed: Value = serde_json::from_slice(&out.stdout).expect("client prints JSON");
    let (report, _) = read_report(&output);
    let seconds = |key: &str| -> Vec<f64> {
        timed[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };

    let http_peer = format!("127.0.0.1:{}", http.port);
    let row = one(&report, "HTTP upstream", |e| e["peer"] == http_peer.as_str());
    assert_eq!(row["direction"], "client");
    assert_eq!((row["method"].as_str(), row["route"].as_str()), (Some("GET"), Some("/sleep/{id}")));
    assert_eq!(row["count"].as_u64(), Some(20), "{row:#}");
    assert_eq!(row["statuses"]["200"].as_u64(), Some(20), "{row:#}");
    let (s, c) = (row["p50_ms"].as_f64().unwrap(), quantile_ms(seconds("http"), 0.5));
    eprintln!("HTTP upstream p50: stoker {s:.3} ms, client {c:.3} ms");
    assert_close("HTTP upstream p50", s, c);

    let echo_peer = format!("127.0.0.1:{}", echo.port);
    let row = one(&report, "echo upstream", |e| e["peer"] == echo_peer.as_str());
    assert_eq!(row["protocol"], "tcp", "echo traffic reported as HTTP: {row:#}");
    assert!(row["method"].is_null() && row["route"].is_null(), "{row:#}");
    assert_eq!(row["count"].as_u64(), Some(20), "{row:#}");
    let (s, c) = (row["p50_ms"].as_f64().unwrap(), quantile_ms(seconds("echo"), 0.5));
    eprintln!("echo upstream p50: stoker {s:.3} ms, client {c:.3} ms");
    assert_close("echo upstream p50", s, c);
    assert!(
        endpoints(&report, |e| e["protocol"] == "http").iter().all(|e| e["peer"] == http_peer.as_str()),
        "only the HTTP upstream is HTTP: {report:#}"
    );

    let connects = report["connects"].as_array().unwrap();
    let to = |port: u16| {
        let peer = format!("127.0.0.1:{port}");
        connects
            .iter()
            .find(|c| c["peer"] == peer.as_str())
            .unwrap_or_else(|| panic!("no connects to {peer}"))
    };
    let refused = to(closed);
    assert_eq!(timed["refused"].as_u64(), Some(20));
    assert_eq!((refused["attempts"].as_u64(), refused["failures"].as_u64()), (Some(20), Some(20)));
    let ok = to(http.port);
    assert_eq!((ok["attempts"].as_u64(), ok["failures"].as_u64()), (Some(1), Some(0)), "{ok:#}");
    let (s, c) = (ok["connect_p50_ms"].as_f64().unwrap(), quantile_ms(seconds("connect"), 0.5));
    eprintln!("connect latency: stoker {s:.3} ms, client {c:.3} ms");
    assert_close("connect latency", s, c);
    assert_eq!(ok["closed"].as_u64(), Some(1), "{ok:#}");
    assert_eq!(ok["retransmits"].as_u64(), Some(0), "{ok:#}");
    assert!(ok["bytes_received"].as_u64().unwrap() > 0, "{ok:#}");
    // RTT: the kernel's estimate when the connection closed, as the client's own TCP_INFO
    // showed it just before.
    let echo_rtt = to(echo.port)["rtt_mean_ms"].as_f64().expect("the echo connection's RTT");
    let client_rtt = timed["echo_rtt"].as_f64().unwrap() * 1000.0;
    eprintln!("echo RTT: stoker {echo_rtt:.3} ms, client's TCP_INFO {client_rtt:.3} ms");
    assert!(
        (echo_rtt - client_rtt).abs() <= (0.05 * client_rtt).max(0.05),
        "RTT: stoker {echo_rtt:.3} ms, client's TCP_INFO {client_rtt:.3} ms"
    );
}

/// A client that opens its keep-alive connection, makes one request, says `ready`, and
/// after a line on stdin makes 20 more on the same connection, timing them. The first
/// request after the line goes to /ping: the server's read of it has been waiting since
/// before the session, and is timed from its exit.
const LATE_CLIENT: &str = r#"
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from http_client import exchange
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
get = lambda path: exchange(sock, [f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()])
get("/sleep/1")
print("ready", flush=True)
sys.stdin.readline()
get("/ping")
timed = []
for _ in range(20):
    status, seconds = get("/sleep/5")
    timed.append({"method": "GET", "path": "/sleep/5", "status": status, "seconds": seconds})
print(json.dumps(timed), flush=True)
"#;

/// `record --net --pid` on a server whose keep-alive connection was opened before the
/// session: the connection is found in /proc and its requests are timed.
#[test]
fn connections_opened_before_the_session_are_followed() {
    require_root();
    let _serial = serial();
    let server = Server::start("http_server.py");
    let mut client = Command::new(python(PYTHON))
        .args(["-c", LATE_CLIENT, &server.port.to_string(), fixture("").to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(&mut client);
    assert_eq!(lines.next("client ready", Duration::from_secs(10)), "ready");
    let output = scratch("net-late").join("late.folded");
    let mut stoker = Command::new(STOKER)
        .args(["record", "--net", "-f", "folded", "-o", output.to_str().unwrap()])
        .args(["--pid", &server.child.id().to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, started) = mpsc::channel();
    let err = stoker.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("sampling at") {
                let _ = tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    started.recv_timeout(Duration::from_secs(20)).expect("stoker did not start");
    use std::io::Write;
    writeln!(client.stdin.as_mut().unwrap(), "go").unwrap();
    let timed: Value = serde_json::from_str(&lines.next("client timings", Duration::from_secs(20))).unwrap();
    let _ = client.wait();
    unsafe { libc::kill(stoker.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut stoker, Duration::from_secs(30));
    let err = reader.join().unwrap();
    assert!(status.success(), "stoker failed: {err}");
    let (report, _) = read_report(&output);
    // Count, statuses and median: with 20 requests the p99 is the maximum, which a
    // scheduling hiccup of the client alone (stoker symbolizing at its start, 2 CPUs) moves.
    let sleeps =
        one(&report, "GET /sleep/{id}", |e| e["direction"] == "server" && e["route"] == "/sleep/{id}");
    assert_eq!(sleeps["count"].as_u64(), Some(20), "request count: {sleeps:#}");
    assert_eq!(sleeps["statuses"]["200"].as_u64(), Some(20), "statuses: {sleeps:#}");
    let client: Vec<f64> = timed.as_array().unwrap().iter().map(|r| r["seconds"].as_f64().unwrap()).collect();
    assert_close("GET /sleep/{id} p50", sleeps["p50_ms"].as_f64().unwrap(), quantile_ms(client, 0.5));
    let ping = one(&report, "GET /ping", |e| e["route"] == "/ping");
    assert_eq!(ping["count"].as_u64(), Some(1), "the read waiting since before the session: {ping:#}");
}
