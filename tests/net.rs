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

use common::{net::*, *};
use serde_json::Value;

const PYTHON: &str = "3.12.1";

/// The tests run one at a time: a test's requests are the only ones its servers see.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A Python server from the fixtures, not watched; killed when dropped. Its stdout (the
/// port, then with `--timings` a line per request) stays read while it runs.
struct Server {
    child: Child,
    port: u16,
    lines: Lines,
}

impl Server {
    fn start(script: &str, args: &[&str]) -> Self {
        let mut child = Command::new(python(PYTHON))
            .arg(net_fixture(script))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the Python server");
        let lines = Lines::of(&mut child);
        let port = lines.next("server port", Duration::from_secs(10)).trim().parse().unwrap();
        Self { child, port, lines }
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

/// Runs the HTTP client fixture on `port` with `plan`; returns the requests it timed.
fn http_client(port: &str, plan: &Value) -> Vec<Timed> {
    Timed::list(&run_client(&[net_fixture("http_client.py").to_str().unwrap(), port, &plan.to_string()]))
}

fn endpoints(report: &Value, pred: impl Fn(&Value) -> bool) -> Vec<&Value> {
    report["endpoints"].as_array().expect("endpoints array").iter().filter(|e| pred(e)).collect()
}

fn one<'a>(report: &'a Value, what: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    let found = endpoints(report, pred);
    assert_eq!(found.len(), 1, "expected one {what} row in {report:#}");
    found[0]
}

fn read_report(output: &Path) -> (Value, String) {
    let path = output.with_file_name(format!("{}.net.json", output.file_stem().unwrap().to_string_lossy()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    (serde_json::from_str(&text).expect("the network report is JSON"), text)
}

/// Runs client fixture `script` with `args` under `stoker record --net` (writing `output`);
/// returns what the client printed (JSON) and stoker's network report.
fn record_client(output: &Path, script: &str, args: &[&str]) -> (Value, Value) {
    let out = Command::new(STOKER)
        .args(["record", "--net", "-f", "folded", "-o", output.to_str().unwrap(), "--"])
        .arg(python(PYTHON))
        .arg(net_fixture(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run stoker");
    let err = stderr(&out);
    assert!(out.status.success(), "stoker failed: {err}");
    eprintln!("{err}");
    let printed = serde_json::from_slice(&out.stdout).expect("the client prints JSON");
    (printed, read_report(output).0)
}

/// A server launched under `stoker record --net`; it prints its port on stdout, then
/// (with `--timings`) a line per request it timed itself.
struct Watched {
    stoker: Child,
    port: String,
    lines: Lines,
    output: PathBuf,
}

impl Watched {
    fn start(python_version: &str, script: &str, args: &[&str]) -> Self {
        Self::start_with(&[], python_version, script, args)
    }

    /// `start`, with more `record` options.
    fn start_with(options: &[&str], python_version: &str, script: &str, args: &[&str]) -> Self {
        Self::start_env(&[], options, python_version, script, args)
    }

    /// `start_with`, with more environment variables for stoker.
    fn start_env(
        env: &[(&str, &str)],
        options: &[&str],
        python_version: &str,
        script: &str,
        args: &[&str],
    ) -> Self {
        let output = scratch("net-server").join("server.folded");
        let mut stoker = Command::new(STOKER)
            .envs(env.iter().copied())
            .args(["record", "--net", "-f", "folded", "-o", output.to_str().unwrap()])
            .args(options)
            .arg("--")
            .arg(python(python_version))
            .arg(net_fixture(script))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stoker");
        let lines = Lines::of(&mut stoker);
        let port = lines.next("server port", Duration::from_secs(20)).trim().to_string();
        Self { stoker, port, lines, output }
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

fn server_row<'a>(report: &'a Value, method: &str, route: &str) -> &'a Value {
    one(report, &format!("server {method} {route}"), |e| {
        e["direction"] == "server" && e["method"] == method && e["route"] == route
    })
}

/// Asserts a server row counts exactly the requests the server timed itself, with their
/// statuses, and that its p50 and p99 are the server's own.
fn assert_row_matches(row: &Value, what: &str, own: &[&Timed]) {
    assert_eq!(row["count"].as_u64(), Some(own.len() as u64), "{what} count: {row:#}");
    let errors = own.iter().filter(|t| t.status.is_some_and(|s| s >= 500)).count();
    assert_eq!(row["errors"].as_u64(), Some(errors as u64), "{what} errors: {row:#}");
    for (q, key) in [(0.5, "p50_ms"), (0.99, "p99_ms")] {
        assert_quantile(&format!("{what} {key}"), row[key].as_f64().unwrap(), own, q);
    }
}

/// The server's GET /sleep/{id} row against the server's own timing of those requests.
fn assert_sleeps_match(report: &Value, own: &[Timed]) {
    let sleeps = server_row(report, "GET", "/sleep/{id}");
    let own: Vec<&Timed> = own.iter().filter(|t| t.path_starts_with("/sleep/")).collect();
    let ok = own.iter().filter(|t| t.status == Some(200)).count() as u64;
    assert_eq!(sleeps["statuses"]["200"].as_u64(), Some(ok), "statuses: {sleeps:#}");
    assert_row_matches(sleeps, "GET /sleep/{id}", &own);
}

/// 100 requests: 5, 20 and 50 ms (60/35/5), one with a query string.
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
/// clients; the server times every request itself, from the first byte of the request
/// read to the last byte of the response written, and stoker's figures are its own.
#[test]
fn http_server_latency_matches_the_servers_own() {
    // The default follows reads and writes at the socket tracepoints where the kernel has
    // them (6.3+; asked once stoker has mounted tracefs).
    http_server_latency(&[], || {
        let socket_io = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .any(|t| Path::new(t).join("events/sock/sock_recv_length").is_dir());
        if socket_io { "socket tracepoints" } else { "system call exits" }
    });
}

/// The same, with reads and writes followed at the system call exits (`STOKER_NET_HOOKS`),
/// as on kernels without the socket tracepoints (before 6.3).
#[test]
fn http_server_latency_at_the_system_call_exits() {
    http_server_latency(&[("STOKER_NET_HOOKS", "syscalls")], || "system call exits");
}

/// A bad `STOKER_NET_HOOKS` is refused in one line before anything starts.
#[test]
fn an_unknown_net_hooks_setting_is_refused() {
    require_root();
    assert_refused("STOKER_NET_HOOKS", "kprobes", "expected `auto` or `syscalls`");
}

/// `record --net` with environment variable `name` set to `value` fails with one line that
/// names them and says what is `expected`.
fn assert_refused(name: &str, value: &str, expected: &str) {
    let out = Command::new(STOKER)
        .env(name, value)
        .args(["record", "--net", "--duration", "1", "--", "true"])
        .output()
        .expect("run stoker");
    assert_one_line_error(&out, &format!("{name} is `{value}`: {expected}"));
}

/// `STOKER_NET_PROGRAMS=empty`, the benchmarks' measure of what the attach points cost
/// alone: the programs are attached as always and return as they start, so the server's
/// requests, all served, are not seen. A bad value is refused in one line.
#[test]
fn empty_network_programs_time_nothing() {
    require_root();
    let _serial = serial();
    let server = Watched::start_env(
        &[("STOKER_NET_PROGRAMS", "empty")],
        &[],
        PYTHON,
        "http_server.py",
        &["--timings"],
    );
    let sent =
        http_client(&server.port, &serde_json::json!({ "connections": 2, "paths": vec!["/sleep/1"; 10] }));
    assert_eq!(sent.len(), 20);
    let own = server.lines.timings(sent.len());
    assert!(own.iter().all(|t| t.status == Some(200)), "the server failed requests: {own:?}");
    let (report, _) = server.finish();
    assert_eq!(endpoints(&report, |_| true).len(), 0, "requests timed by empty programs: {report:#}");
    assert_eq!(accepted(&report), 0, "accepted connections");
    assert_refused("STOKER_NET_PROGRAMS", "none", "expected `full` or `empty`");
}

/// Connections accepted, all processes together, in a network report.
fn accepted(report: &Value) -> u64 {
    report["accepted"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum()
}

fn http_server_latency(env: &[(&str, &str)], data_calls: impl Fn() -> &'static str) {
    require_root();
    let _serial = serial();
    let server = Watched::start_env(env, &[], PYTHON, "http_server.py", &["--timings"]);
    let port = server.port.clone();

    // Two connections, the sleeps, a failure and 5 uploads each.
    let mut paths = sleep_paths();
    paths.push("/fail".into());
    let sequential =
        http_client(&port, &serde_json::json!({ "connections": 2, "paths": paths, "split_posts": 5 }));
    // 50 connections at once, 4 requests each.
    let concurrent =
        http_client(&port, &serde_json::json!({ "connections": 50, "paths": vec!["/c/sleep/2"; 4] }));
    assert_eq!(concurrent.len(), 200);
    let own = server.lines.timings(sequential.len() + concurrent.len());

    let (report, text) = server.finish();
    assert!(!text.contains("secret") && !text.contains("token"), "the query string left the kernel: {text}");
    assert_sleeps_match(&report, &own);
    let with_path =
        |prefix: &str| -> Vec<&Timed> { own.iter().filter(|t| t.path_starts_with(prefix)).collect() };

    assert_row_matches(server_row(&report, "GET", "/fail"), "GET /fail", &with_path("/fail"));

    // The body arrives in 4 pieces 5 ms apart: one request each, from its first byte.
    let upload = one(&report, "POST /upload/{id}", |e| e["method"] == "POST");
    assert!(upload["request_bytes"].as_u64().unwrap() >= 10 * 4000, "request bytes: {upload:#}");
    assert_row_matches(upload, "POST /upload/{id}", &with_path("/upload/"));

    assert_row_matches(
        server_row(&report, "GET", "/c/sleep/{id}"),
        "GET /c/sleep/{id}",
        &with_path("/c/sleep/"),
    );
    assert_eq!(accepted(&report), 52, "accepted connections");
    assert_eq!(report["drops"]["events_lost"].as_u64(), Some(0));
    assert_eq!(report["data_calls"], data_calls());
}

/// An asyncio server from PyPI (aiohttp, on the interpreter `cargo xtask setup` installs
/// it for), timing its own requests at the socket the event loop reads and writes: the
/// same request counts and latencies as stoker's. With two connections a request can
/// wait in its socket while the loop runs the other's handler; neither side counts that.
#[test]
fn aiohttp_server_latency_matches_the_servers_own() {
    require_root();
    let _serial = serial();
    let server = Watched::start("3.11.7", "aiohttp_server.py", &["--timings"]);
    let sent = http_client(&server.port, &serde_json::json!({ "connections": 2, "paths": sleep_paths() }));
    let own = server.lines.timings(sent.len());
    let (report, _) = server.finish();
    assert_sleeps_match(&report, &own);
}

/// The asyncio server at full speed under wrk (8 keep-alive connections, as fast as the
/// machine serves them): every request is counted and no event is lost.
#[test]
fn full_request_rate_loses_nothing() {
    require_root();
    let _serial = serial();
    let server = Watched::start("3.11.7", "aiohttp_server.py", &[]);
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
    // How hard the event rings are pressed depends on the machine's speed; what must hold
    // at any speed is the count. (About 20,000 requests a second on one CPU of the
    // development machine, where 2048 slots drained every 100 ms lost a tenth.)
    eprintln!("wrk: {served} requests in 3 s");
    assert!(served > 0, "wrk served nothing: {text}");
    let (report, _) = server.finish();
    assert_eq!(report["drops"]["events_lost"].as_u64(), Some(0), "{:#}", report["drops"]);
    let sleeps = server_row(&report, "GET", "/sleep/{id}");
    let count = sleeps["count"].as_u64().unwrap();
    // wrk does not count the requests under way when it stops (at most one per connection).
    assert!((served..=served + 8).contains(&count), "stoker counted {count}, wrk {served}");
}

/// A watched Python client calling an HTTP upstream, a line-echo (non-HTTP) upstream and a
/// closed port: both upstreams appear with their addresses and the latencies the client
/// measured itself, the echo traffic as generic TCP, and the refused connects as failures.
#[test]
fn client_upstreams_and_failed_connects() {
    require_root();
    let _serial = serial();
    let http = Server::start("http_server.py", &[]);
    let echo = Server::start("echo_server.py", &[]);
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let output = scratch("net-client").join("client.folded");
    let n = "20";
    let (timed, report) = record_client(
        &output,
        "upstream_client.py",
        &[&http.port.to_string(), &echo.port.to_string(), &closed.to_string(), n],
    );
    let own = |key: &str| Timed::list(&timed[key]);

    let http_peer = format!("127.0.0.1:{}", http.port);
    let row = one(&report, "HTTP upstream", |e| e["peer"] == http_peer.as_str());
    assert_eq!(row["direction"], "client");
    assert_eq!((row["method"].as_str(), row["route"].as_str()), (Some("GET"), Some("/sleep/{id}")));
    assert_eq!(row["statuses"]["200"].as_u64(), Some(20), "{row:#}");
    let http_own = own("http");
    assert_row_matches(row, "HTTP upstream", &http_own.iter().collect::<Vec<_>>());

    let echo_peer = format!("127.0.0.1:{}", echo.port);
    let row = one(&report, "echo upstream", |e| e["peer"] == echo_peer.as_str());
    assert_eq!(row["protocol"], "tcp", "echo traffic reported as HTTP: {row:#}");
    assert!(row["method"].is_null() && row["route"].is_null(), "{row:#}");
    let echo_own = own("echo");
    assert_row_matches(row, "echo upstream", &echo_own.iter().collect::<Vec<_>>());
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
    // The handshake (SYN sent to established) happens inside the client's connect() call:
    // it can be no longer than the call as the client timed it.
    let connect = timed["connect"].as_array().unwrap();
    let call_ms = (connect[1].as_u64().unwrap() - connect[0].as_u64().unwrap()) as f64 / 1e6;
    let s = ok["connect_p50_ms"].as_f64().unwrap();
    eprintln!("connect latency: stoker {s:.3} ms, the client's connect() call {call_ms:.3} ms");
    assert!(
        s > 0.0 && s <= call_ms * (1.0 + QUANTILE_ERROR),
        "connect: stoker {s:.3} ms, connect() {call_ms:.3} ms"
    );
    assert_eq!(ok["closed"].as_u64(), Some(1), "{ok:#}");
    assert_eq!(ok["retransmits"].as_u64(), Some(0), "{ok:#}");
    assert!(ok["bytes_received"].as_u64().unwrap() > 0, "{ok:#}");
    // RTT: the kernel's estimate when the connection closed, as the client's own TCP_INFO
    // showed it just before: the same field (srtt_us >> 3, whole microseconds), and no
    // acknowledgement arrives between the last echo and the close, so the same value
    // (up to the conversion to milliseconds as a double).
    let echo_rtt = to(echo.port)["rtt_mean_ms"].as_f64().expect("the echo connection's RTT");
    let client_rtt = timed["echo_rtt"].as_f64().unwrap() * 1000.0;
    eprintln!("echo RTT: stoker {echo_rtt:.3} ms, client's TCP_INFO {client_rtt:.3} ms");
    assert!(
        (echo_rtt - client_rtt).abs() <= 1e-6,
        "RTT: stoker {echo_rtt:.6} ms, client's TCP_INFO {client_rtt:.6} ms"
    );
}

/// The requests' durations (each the middle of what its brackets allow), ms.
fn middles_ms(timed: &[Timed]) -> Vec<f64> {
    timed.iter().map(|t| (t.min_ns() + t.max_ns()) as f64 / 2e6).collect()
}

/// A fixture's list of durations in ns (JSON), in ms.
fn list_ms(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of durations: {v}"))
        .iter()
        .map(|d| d.as_f64().unwrap() / 1e6)
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The mean of the requests' durations (each the middle of what its brackets allow), ms.
fn mean_ms(timed: &[Timed]) -> f64 {
    mean(&middles_ms(timed))
}

/// An asyncio server whose handler blocks the event loop (`time.sleep`, 20 ms), under 4
/// keep-alive clients at once: while the loop is blocked, the other requests wait in their
/// sockets. The server's own timing (first read to last write) is stoker's request time;
/// the time before the first read (socket queue) is part of what the clients saw beyond it,
/// and queue plus request (`total`) is the clients' own time within 3% (the clients'
/// brackets also hold the delivery of the bytes, microseconds here).
#[test]
fn blocked_event_loop_requests_wait_in_the_socket_queue() {
    require_root();
    let _serial = serial();
    let server = Watched::start("3.11.7", "aiohttp_server.py", &["--timings"]);
    let paths: Vec<String> = (0..10).map(|_| "/block/20".to_string()).collect();
    let sent = http_client(&server.port, &serde_json::json!({ "connections": 4, "paths": paths }));
    let own = server.lines.timings(sent.len());
    let (report, _) = server.finish();
    let row = server_row(&report, "GET", "/block/{id}");
    assert_row_matches(row, "GET /block/{id}", &own.iter().collect::<Vec<_>>());
    let (client, handled) = (mean_ms(&sent), mean_ms(&own));
    let queue = row["queue"]["mean_ms"].as_f64().expect("a server row has its socket queue");
    let total = row["total"]["mean_ms"].as_f64().expect("a server row has its total");
    eprintln!(
        "blocked loop: clients {client:.3} ms, server's own {handled:.3} ms; stoker queue {queue:.3} ms, total {total:.3} ms"
    );
    assert!(
        (total - client).abs() <= 0.03 * client,
        "total {total:.3} ms, the clients measured {client:.3} ms"
    );
    // The socket queue ends at the first read; what the clients waited beyond the server's
    // own handling also holds the time from that read to the handler's start (aiohttp
    // parses the request, then the handler waits its turn behind blocked handlers). So the
    // queue is at most that difference (within 3% of the clients' time), not equal to it.
    assert!(
        queue <= client - handled + 0.03 * client,
        "queue {queue:.3} ms, more than the clients' time less the server's: {:.3} ms",
        client - handled
    );
    // Three requests ahead of each, 20 ms of blocked loop each: part of that wait falls
    // after the first read, and at least one other handler's block, on average, before it.
    assert!(queue >= 20.0, "queue {queue:.3} ms: the loop's blocks were not seen as waiting");
}

/// A pre-fork server with 2 workers and 6 clients at once, each request on a new
/// connection: while both workers are busy, connections wait in the listening socket's
/// accept queue. Every connection is counted with its wait, and a request's total (accept
/// queue, socket queue, request) is what its client measured from before `connect()` to
/// the end of the response, within 3%.
#[test]
fn prefork_connections_wait_in_the_accept_queue() {
    require_root();
    let _serial = serial();
    let server = Watched::start_with(&["--subprocesses"], PYTHON, "prefork_server.py", &["2"]);
    let (threads, each) = (6, 5);
    let client = run_client(&[
        net_fixture("burst_client.py").to_str().unwrap(),
        &server.port,
        &threads.to_string(),
        &each.to_string(),
        "/sleep/20",
    ]);
    let (report, _) = server.finish();
    let n = (threads * each) as f64;
    let client_ms = mean(&list_ms(&client));
    let rows = endpoints(&report, |e| e["direction"] == "server" && e["route"] == "/sleep/{id}");
    let count: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(count, threads * each, "requests: {report:#}");
    let weighted = |key: &str, field: &str| {
        rows.iter()
            .map(|r| {
                r["count"].as_f64().unwrap()
                    * if key.is_empty() { r[field].as_f64() } else { r[key][field].as_f64() }.unwrap()
            })
            .sum::<f64>()
            / n
    };
    let (request, total) = (weighted("", "mean_ms"), weighted("total", "mean_ms"));
    assert_eq!(accepted(&report), threads * each, "accepted: {report:#}");
    let accept_queue = report["accept_queue"].as_object().unwrap();
    let accept_ms = accept_queue
        .iter()
        .map(|(pid, q)| report["accepted"][pid].as_f64().unwrap() * q["mean_ms"].as_f64().unwrap())
        .sum::<f64>()
        / n;
    eprintln!(
        "pre-fork: clients {client_ms:.3} ms; stoker accept queue {accept_ms:.3} ms, request {request:.3} ms, total {total:.3} ms"
    );
    assert!((total - client_ms).abs() <= 0.03 * client_ms, "total {total:.3} ms, clients {client_ms:.3} ms");
    // Six connections for two workers: most of the wait is for a worker to accept.
    assert!(accept_ms >= 0.8 * (client_ms - request), "accept queue {accept_ms:.3} ms of {client_ms:.3} ms");
}

/// A keep-alive http.server with Nagle's algorithm on (its default), called by http.client:
/// each response's body, written after its headers, is held by Nagle until the client's
/// delayed ACK of the headers. stoker names the stall `nagle-delayed-ack` on the server's
/// endpoint, for every request whose client waited 20 ms or more beyond what the server
/// measured itself, and its mean is that difference within 3% of the client's time (and the
/// client's wake-up, see below). The
/// same server with Nagle off has no stalls.
#[test]
fn nagle_stalls_are_named_on_the_server() {
    require_root();
    let _serial = serial();
    for nagle in [true, false] {
        let args: &[&str] = if nagle { &["--timings", "--nagle"] } else { &["--timings"] };
        let server = Watched::start(PYTHON, "http_server.py", args);
        let port: u16 = server.port.parse().unwrap();
        let plan = serde_json::json!([{"port": port, "path": "/sleep/5", "count": 10, "how": "http.client"}]);
        let client = run_client(&[net_fixture("caller_client.py").to_str().unwrap(), &plan.to_string()]);
        let own = server.lines.timings(10);
        let (report, _) = server.finish();
        let (caller, handled) = (list_ms(&client["steps"][0]), middles_ms(&own));
        // Requests complete in order on the one connection: the i-th of each list is one request.
        let beyond: Vec<f64> = caller.iter().zip(&handled).map(|(c, h)| c - h).collect();
        let stalled: Vec<f64> = beyond.iter().copied().filter(|d| *d >= 20.0).collect();
        let stalls = report["stalls"].as_array().unwrap();
        eprintln!("Nagle {nagle}: the client waited beyond the server {beyond:.1?} ms; stoker {stalls:#?}");
        if !nagle {
            assert!(stalls.is_empty() && stalled.is_empty(), "no stalls with Nagle off: {stalls:#?}");
            continue;
        }
        assert_eq!(stalls.len(), 1, "{stalls:#?}");
        let row = &stalls[0];
        assert_eq!(
            (row["side"].as_str(), row["cause"].as_str()),
            (Some("server"), Some("nagle-delayed-ack"))
        );
        assert_eq!(row["endpoint"], "GET /sleep/{id}");
        assert_eq!(row["count"].as_u64(), Some(stalled.len() as u64), "{row:#}");
        let (expected, client_mean) = (mean(&stalled), mean(&caller));
        let mean = row["mean_ms"].as_f64().unwrap();
        // What the client waited beyond the server also holds its own wake-up once the
        // held bytes arrive: with a CPU hog on one of the two CPUs that wake-up may wait a
        // scheduler slice (EEVDF's base slice, 0.75 ms x (1 + log2 of 2 CPUs) = 1.5 ms),
        // which no kernel-side measure of the stall includes.
        const WAKE_UP_MS: f64 = 1.5;
        assert!(
            (mean - expected).abs() <= 0.03 * client_mean + WAKE_UP_MS,
            "stall {mean:.3} ms, the client waited {expected:.3} ms beyond the server"
        );
    }
}

/// `--net-detail requests`: the same http.server with Nagle on, whose client waits a delayed
/// ACK on most requests, is timed as in full (counts and latencies the server's own, the
/// accept queue) but without socket-queue times or stalls, which the report says. Without
/// `--net` the option is refused in one line.
#[test]
fn requests_only_detail_times_requests_without_queues_or_stalls() {
    require_root();
    let _serial = serial();
    let options = ["--net-detail", "requests"];
    let server = Watched::start_with(&options, PYTHON, "http_server.py", &["--timings", "--nagle"]);
    let port: u16 = server.port.parse().unwrap();
    let plan = serde_json::json!([{"port": port, "path": "/sleep/5", "count": 10, "how": "http.client"}]);
    let client = run_client(&[net_fixture("caller_client.py").to_str().unwrap(), &plan.to_string()]);
    let own = server.lines.timings(10);
    let (report, _) = server.finish();
    // Held bytes the full detail names as stalls (`nagle_stalls_are_named_on_the_server`).
    let beyond: Vec<f64> =
        list_ms(&client["steps"][0]).iter().zip(middles_ms(&own)).map(|(c, h)| c - h).collect();
    assert!(beyond.iter().any(|d| *d >= 20.0), "no request waited for a delayed ACK: {beyond:.1?} ms");
    assert_sleeps_match(&report, &own);
    assert_eq!(report["detail"], "requests");
    assert_eq!(report["socket_queue"], false);
    assert_eq!(report["stalls"].as_array().map(Vec::len), Some(0), "stalls: {report:#}");
    assert!(server_row(&report, "GET", "/sleep/{id}")["queue"].is_null(), "{report:#}");
    assert_eq!(accepted(&report), 1, "accepted connections");
    assert_eq!(report["accept_queue"].as_object().map(|q| q.len()), Some(1), "accept queue: {report:#}");
    let out = Command::new(STOKER)
        .args(["record"])
        .args(options)
        .args(["--", "true"])
        .output()
        .expect("run stoker");
    assert_one_line_error(&out, "the following required arguments were not provided: --net");
}

/// A client with a 4 KiB receive buffer that reads a 256 KiB response 4 KiB at a time,
/// 10 ms apart: the server's write waits for room in its send buffer, and the bytes left in
/// it when the write returns wait for the client's window. stoker names the stall
/// `zero-window`, and its length is what the client waited beyond the server's own work
/// before that write, within 3% of the client's time (the last bytes travel after the
/// window opens, microseconds here).
#[test]
fn zero_window_stalls_are_named_on_the_server() {
    require_root();
    let _serial = serial();
    let server = Watched::start(PYTHON, "http_server.py", &["--timings"]);
    let client = run_client(&[net_fixture("slow_reader.py").to_str().unwrap(), &server.port, "/big/256"]);
    let own = server.lines.timings(1);
    let (report, _) = server.finish();
    let client_ms = client.as_f64().unwrap() / 1e6;
    let before_write = before_last_write_ms(&own[0]);
    let stalls = report["stalls"].as_array().unwrap();
    eprintln!(
        "slow reader: client {client_ms:.3} ms, the server's own work before its write {before_write:.3} ms; stoker {stalls:#?}"
    );
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let row = &stalls[0];
    assert_eq!((row["cause"].as_str(), row["count"].as_u64()), (Some("zero-window"), Some(1)), "{row:#}");
    let mean = row["mean_ms"].as_f64().unwrap();
    assert!(
        (mean - (client_ms - before_write)).abs() <= 0.03 * client_ms,
        "stall {mean:.3} ms, the client waited {:.3} ms beyond the server's work",
        client_ms - before_write
    );
}

/// A server's time from its request's first read to the start of its response's last
/// write (the middle of what the brackets allow), in ms.
fn before_last_write_ms(t: &Timed) -> f64 {
    (t.end[0] as f64 - (t.start[0] + t.start[1]) as f64 / 2.0) / 1e6
}

/// A link of `RATE` between this namespace (10.213.0.1) and a network namespace of its own
/// (10.213.0.2): a veth pair whose outbound end here is shaped by a token bucket. Removed
/// on drop.
struct SlowLink {
    ns: String,
    dev: String,
}

impl SlowLink {
    const HERE: &str = "10.213.0.1";
    const RATE: &str = "8mbit";

    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let link = Self { ns: format!("stoker-test-{id}"), dev: format!("stk{id}a") };
        let peer = format!("stk{id}b");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &link.ns]);
        ip(&["link", "add", &link.dev, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &link.ns]);
        ip(&["addr", "add", &format!("{}/24", Self::HERE), "dev", &link.dev]);
        ip(&["link", "set", &link.dev, "up"]);
        ip(&["netns", "exec", &link.ns, "ip", "addr", "add", "10.213.0.2/24", "dev", &peer]);
        ip(&["netns", "exec", &link.ns, "ip", "link", "set", &peer, "up"]);
        let out = Command::new("tc")
            .args(["qdisc", "add", "dev", &link.dev, "root", "tbf", "rate", Self::RATE])
            .args(["burst", "16kbit", "latency", "200ms"])
            .output()
            .expect("run tc (iproute2)");
        assert!(out.status.success(), "tc: {}", String::from_utf8_lossy(&out.stderr));
        link
    }

    /// Runs Python fixture `args` in the far namespace; returns what it prints as JSON.
    fn run_client(&self, args: &[&str]) -> Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(python(PYTHON))
            .args(args)
            .output()
            .expect("run the Python client");
        assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("client prints JSON")
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.dev]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A server with a 16 KiB send buffer answers 512 KiB over an 8 Mbit/s link to a client
/// that reads at once: its write waits for room while the client's window is open, the
/// send buffer being smaller than what the link holds. stoker names the stall
/// `send-buffer`; it covers the server's own time blocked in that write (within 3% of the
/// client's time), and is no longer than the client waited beyond the server's work before
/// the write (the bytes in flight when it ends take their time on the link).
#[test]
fn send_buffer_stalls_are_named_on_the_server() {
    require_root();
    let _serial = serial();
    let link = SlowLink::new();
    let server = Watched::start(
        PYTHON,
        "http_server.py",
        &["--timings", "--sndbuf", "16384", "--host", SlowLink::HERE],
    );
    let reader = net_fixture("slow_reader.py");
    let client = link.run_client(&[
        reader.to_str().unwrap(),
        &server.port,
        "/big/512",
        "--host",
        SlowLink::HERE,
        "--fast",
    ]);
    let own = server.lines.timings(1);
    let (report, _) = server.finish();
    drop(link);
    let client_ms = client.as_f64().unwrap() / 1e6;
    let write_ms = (own[0].end[1] - own[0].end[0]) as f64 / 1e6;
    let beyond = client_ms - before_last_write_ms(&own[0]);
    let stalls = report["stalls"].as_array().unwrap();
    eprintln!(
        "client {client_ms:.3} ms, {beyond:.3} ms beyond the server's work; its write {write_ms:.3} ms; stoker {stalls:#?}"
    );
    // The server's own requests (the process may also make calls of its own, such as a
    // resolver's TCP query: those are its client side).
    let served: Vec<_> = stalls.iter().filter(|r| r["side"] == "server").collect();
    assert_eq!(served.len(), 1, "{stalls:#?}");
    let row = served[0];
    assert_eq!((row["cause"].as_str(), row["count"].as_u64()), (Some("send-buffer"), Some(1)), "{row:#}");
    let mean = row["mean_ms"].as_f64().unwrap();
    assert!(mean >= write_ms - 0.03 * client_ms, "stall {mean:.3} ms, the write waited {write_ms:.3} ms");
    assert!(mean <= beyond + 0.01 * client_ms, "stall {mean:.3} ms, the client waited {beyond:.3} ms");
}

/// Client requests end at the last byte of their response, as the calling code measures
/// them around `request()` and `read()`: http.client against http.server with Nagle's
/// algorithm on (a body written after its headers waits for the client's delayed ACK) and
/// off, a chunked response, and a client that reads 16 bytes at a time and exits without
/// closing its connection (its last response is complete by its framing). Counts are exact;
/// each row's mean is the caller's own within 3% (the caller's clock reads also cover the
/// interpreter's work around the calls: building the request, parsing the response). The
/// Nagle stall is named from the client's side alone (the server is not watched).
#[test]
fn client_requests_end_at_the_last_response_byte() {
    require_root();
    let _serial = serial();
    let nagle = Server::start("http_server.py", &["--nagle"]);
    let plain = Server::start("http_server.py", &[]);
    let n = 10;
    let step = |port: u16, path: &str, how: &str| serde_json::json!({"port": port, "path": path, "count": n, "how": how});
    let plan = serde_json::json!([
        step(nagle.port, "/nagle/sleep/40", "http.client"),
        step(plain.port, "/sleep/40", "http.client"),
        step(plain.port, "/chunked/4", "http.client"),
        step(plain.port, "/small/sleep/20", "small-reads"),
    ]);
    let output = scratch("net-caller").join("caller.folded");
    let (own, report) = record_client(&output, "caller_client.py", &[&plan.to_string()]);
    let rows = [
        (nagle.port, "/nagle/sleep/{id}"),
        (plain.port, "/sleep/{id}"),
        (plain.port, "/chunked/{id}"),
        (plain.port, "/small/sleep/{id}"),
    ];
    let mut ttfb = Vec::new();
    for (i, (port, route)) in rows.into_iter().enumerate() {
        let peer = format!("127.0.0.1:{port}");
        let row = one(&report, route, |e| {
            e["direction"] == "client" && e["peer"] == peer.as_str() && e["route"] == route
        });
        assert_eq!(row["count"].as_u64(), Some(n), "{route} count: {row:#}");
        let own_mean = mean(&list_ms(&own["steps"][i]));
        let mean = row["mean_ms"].as_f64().unwrap();
        let first = row["ttfb"]["p50_ms"].as_f64().expect("a client row has its time to first byte");
        eprintln!(
            "{route}: stoker mean {mean:.3} ms (ttfb p50 {first:.3} ms), the caller's own {own_mean:.3} ms"
        );
        assert!(
            (mean - own_mean).abs() <= 0.03 * own_mean,
            "{route}: stoker's mean {mean:.3} ms, the caller measured {own_mean:.3} ms"
        );
        ttfb.push((first, row["p50_ms"].as_f64().unwrap()));
    }
    // With Nagle on, the body arrives a delayed ACK (40 ms or more) after the headers; off,
    // right after them.
    let ((nagle_first, nagle_p50), (plain_first, plain_p50)) = (ttfb[0], ttfb[1]);
    assert!(nagle_p50 - nagle_first >= 30.0, "Nagle on: ttfb {nagle_first:.3} ms of {nagle_p50:.3} ms");
    assert!(plain_p50 - plain_first < 5.0, "Nagle off: ttfb {plain_first:.3} ms of {plain_p50:.3} ms");
    // Seen from the client alone, the Nagle stall is the body's arrival a delayed ACK after
    // the headers': one stall per request whose `read()` of the body waited 20 ms or more
    // (a new connection's first responses are acknowledged at once), its mean that wait's
    // within 3% of the caller's request time. No other step has one.
    let stalls = report["stalls"].as_array().unwrap();
    let waits: Vec<f64> = list_ms(&own["body_reads"][0]).into_iter().filter(|&w| w >= 20.0).collect();
    eprintln!("body reads waiting 20 ms or more {waits:.2?}; stoker {stalls:#?}");
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let row = &stalls[0];
    let endpoint = format!("127.0.0.1:{} GET /nagle/sleep/{{id}}", nagle.port);
    assert_eq!(
        (row["side"].as_str(), row["endpoint"].as_str(), row["cause"].as_str()),
        (Some("client"), Some(endpoint.as_str()), Some("nagle-delayed-ack"))
    );
    assert_eq!(row["count"].as_u64(), Some(waits.len() as u64), "{row:#}");
    let (stall, expected) = (row["mean_ms"].as_f64().unwrap(), mean(&waits));
    let caller = mean(&list_ms(&own["steps"][0]));
    assert!(
        (stall - expected).abs() <= 0.03 * caller,
        "stall {stall:.3} ms, the caller's body reads waited {expected:.3} ms (requests {caller:.3} ms)"
    );
}

/// A client that opens its keep-alive connection, makes one request, says `ready`, and
/// after a line on stdin makes 20 more on the same connection, each timed from before its
/// write to after its response's last byte (printed in ms after `done`). The first request
/// after the line goes to /ping: the server's read of it has been waiting since before the
/// session, and is timed from its exit.
const LATE_CLIENT: &str = r#"
import json, socket, sys, time
sys.path.insert(0, sys.argv[2])
from http_client import exchange
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
get = lambda path: exchange(sock, [f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()])
get("/sleep/1")
print("ready", flush=True)
sys.stdin.readline()
get("/ping")
times = []
for _ in range(20):
    start = time.monotonic()
    get("/sleep/5")
    times.append((time.monotonic() - start) * 1e3)
sock.close()
print("done", json.dumps(times), flush=True)
"#;

/// `record --net --pid` on a server whose keep-alive connection was opened before the
/// session: the connection is found in /proc and its requests are timed as the server
/// timed them itself. The server keeps Nagle's algorithm on: the stalls of that connection
/// are named too (its socket is found at its first read in the session), as in
/// `nagle_stalls_are_named_on_the_server`. The first request read in the session has no
/// socket-queue time (its bytes may have arrived before the socket was known); the later
/// ones have.
#[test]
fn connections_opened_before_the_session_are_followed() {
    require_root();
    let _serial = serial();
    let server = Server::start("http_server.py", &["--timings", "--nagle"]);
    let mut client = Command::new(python(PYTHON))
        .args(["-c", LATE_CLIENT, &server.port.to_string(), net_fixture("").to_str().unwrap()])
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
    let done = lines.next("client done", Duration::from_secs(20));
    let caller: Vec<f64> = serde_json::from_str(done.strip_prefix("done ").expect("done and times")).unwrap();
    let _ = client.wait();
    // /sleep/1, /ping and the 20 others, each printed once its connection moved on.
    let own = server.lines.timings(22);
    unsafe { libc::kill(stoker.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut stoker, Duration::from_secs(30));
    let err = reader.join().unwrap();
    assert!(status.success(), "stoker failed: {err}");
    let (report, _) = read_report(&output);
    let sleeps = server_row(&report, "GET", "/sleep/{id}");
    let own: Vec<&Timed> = own.iter().filter(|t| t.path.as_deref() == Some("/sleep/5")).collect();
    assert_row_matches(sleeps, "GET /sleep/{id}", &own);
    assert!(sleeps["queue"].is_object(), "socket-queue times of the later requests: {sleeps:#}");
    let ping = one(&report, "GET /ping", |e| e["route"] == "/ping");
    assert_eq!(ping["count"].as_u64(), Some(1), "the read waiting since before the session: {ping:#}");
    assert!(ping["queue"].is_null() && ping["total"].is_null(), "its wait is not known: {ping:#}");
    // Requests complete in order on the one connection: the i-th of each list is one request.
    let handled = own.iter().map(|t| (t.min_ns() + t.max_ns()) as f64 / 2e6);
    let beyond: Vec<f64> = caller.iter().zip(handled).map(|(c, h)| c - h).collect();
    let stalled: Vec<f64> = beyond.iter().copied().filter(|d| *d >= 20.0).collect();
    let stalls = report["stalls"].as_array().unwrap();
    eprintln!("the client waited beyond the server {beyond:.1?} ms; stoker {stalls:#?}");
    assert!(!stalled.is_empty(), "Nagle held no response: {beyond:.1?}");
    let rows: Vec<&Value> = stalls.iter().filter(|s| s["endpoint"] == "GET /sleep/{id}").collect();
    assert_eq!(rows.len(), 1, "{stalls:#?}");
    let row = rows[0];
    assert_eq!((row["side"].as_str(), row["cause"].as_str()), (Some("server"), Some("nagle-delayed-ack")));
    assert_eq!(row["count"].as_u64(), Some(stalled.len() as u64), "{row:#}");
    // As in `nagle_stalls_are_named_on_the_server`: 3% of the client's time, and the
    // client's wake-up once the held bytes arrive.
    const WAKE_UP_MS: f64 = 1.5;
    let (mean_ms, expected, client_mean) = (row["mean_ms"].as_f64().unwrap(), mean(&stalled), mean(&caller));
    assert!(
        (mean_ms - expected).abs() <= 0.03 * client_mean + WAKE_UP_MS,
        "stall {mean_ms:.3} ms, the client waited {expected:.3} ms beyond the server"
    );
}
