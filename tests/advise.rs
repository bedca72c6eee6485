//! End-to-end tests of `stoker advise`: small Python services with one known cause each
//! (a tight CPU quota, the GIL, a blocked event loop, a slow upstream, Nagle's algorithm, a
//! memory limit, nothing), watched by the real kernel programs; the top finding's rule and
//! the direction and size of its numbers are checked against what the workload measured
//! of itself or was built to need. Run as root.
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use common::{agent as agent_harness, net::Lines, workloads::*, *};
use serde_json::Value;

/// A running `stoker advise -f json -o <scratch>/advice.json ARGS`, sampling.
struct Session {
    child: Child,
    err: Stderr,
    out: PathBuf,
}

impl Session {
    fn start(name: &str, args: &[&str]) -> Self {
        let out = scratch(name).join("advice.json");
        let mut child = Command::new(STOKER)
            .args(["advise", "-f", "json", "-o", out.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = Stderr::of(&mut child);
        err.wait_for("sampling at");
        Self { child, err, out }
    }

    /// Ends the session (Ctrl-C with `interrupt`, else it ends by itself) and reads the advice.
    fn finish(mut self, interrupt: bool) -> Value {
        if interrupt {
            // SAFETY: signals a child this test spawned and has not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        }
        let status = wait_exit(&mut self.child, "stoker advise");
        let err = self.err.rest();
        assert!(status.success(), "stoker advise failed: {err}");
        let advice: Value = serde_json::from_str(&std::fs::read_to_string(&self.out).unwrap()).unwrap();
        eprintln!("{err}\n{advice:#}");
        advice
    }
}

/// The findings for process `pid` (the only process when `pid` is None).
fn findings(advice: &Value, pid: Option<u32>) -> Vec<Value> {
    let processes = advice["processes"].as_array().unwrap();
    let p = match pid {
        Some(pid) => processes.iter().find(|p| p["pid"] == pid).unwrap_or_else(|| panic!("no process {pid}")),
        None => {
            assert_eq!(processes.len(), 1, "one process: {advice:#}");
            &processes[0]
        }
    };
    let f = p["findings"].as_array().unwrap().clone();
    assert!(!f.is_empty(), "every process gets a finding");
    for x in &f {
        for key in ["rule", "severity", "title", "evidence", "action", "numbers"] {
            assert!(!x[key].is_null(), "a finding has {key}: {x:#}");
        }
    }
    f
}

fn number(finding: &Value, key: &str) -> f64 {
    finding["numbers"][key].as_f64().unwrap_or_else(|| panic!("no {key} in {finding:#}"))
}

/// A single-threaded CPU-bound process in a cgroup allowed 0.3 CPU: the top finding is
/// `cpu-throttled`, and the limit it asks for is what the process would use unthrottled:
/// one CPU (0.8 s of CPU in a session of about 2.9 s, its idle start included: 0.9 to 1.0
/// CPU), with VPA's 15% margin, rounded up to 0.1: between 1.0 and 1.3 CPUs.
#[test]
fn a_tight_cpu_quota_is_named_with_the_limit_to_set() {
    require_root();
    let (_cgroup, mut spin) = spinner("stoker-advise-quota", "0.8");
    let pid = spin.id();
    let session = Session::start("advise-quota", &["--pid", &pid.to_string()]);
    spin.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert!(spin.wait().unwrap().success());
    let advice = session.finish(false);
    let top = &findings(&advice, Some(pid))[0];
    assert_eq!(top["rule"], "cpu-throttled", "{top:#}");
    let limit = number(top, "recommended_limit_cpus");
    assert!((1.0..=1.3).contains(&limit), "limit {limit} CPUs for a process that wants one: {top:#}");
    assert_eq!(number(top, "quota_cpus"), 0.3);
}

/// Four threads of pure-Python CPU work: the top finding is `gil-bound`, asking for worker
/// processes instead: at least 2, at most the host's CPUs.
#[test]
fn gil_bound_threads_are_told_to_use_processes() {
    require_root();
    let script = fixture("offcpu", "gil_threads.py");
    let python = python("3.12.1");
    let session =
        Session::start("advise-gil", &["--", python.to_str().unwrap(), script.to_str().unwrap(), "4", "1.5"]);
    let advice = session.finish(false);
    let top = &findings(&advice, None)[0];
    assert_eq!(top["rule"], "gil-bound", "{top:#}");
    let workers = number(top, "recommended_workers");
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert!((2.0..=cpus.max(2.0)).contains(&workers), "{workers} workers on {cpus} CPUs");
    assert!(number(top, "gil_share") >= 0.5, "four threads share one GIL: {top:#}");
}

/// The asyncio server fixture (300 ms of Python in `crunch` per `slow` line), its output
/// (a line per slow request, with the handler's own time) and a connection to it.
fn asyncio_server() -> (Child, BufReader<std::process::ChildStdout>, std::net::TcpStream) {
    let mut server = Command::new(python("3.12.1"))
        .arg(fixture("offcpu", "asyncio_server.py"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut port = String::new();
    out.read_line(&mut port).unwrap();
    let conn = std::net::TcpStream::connect(("127.0.0.1", port.trim().parse::<u16>().unwrap())).unwrap();
    (server, out, conn)
}

/// An asyncio server whose handler runs 300 ms of Python for each `slow` line: the top
/// finding is `loop-blocked`, naming the function, with one block per slow request, the
/// longest as long as the handler measured itself (and at most 50 ms more: the loop's own
/// work around it).
#[test]
fn a_blocked_event_loop_names_its_function() {
    require_root();
    let (mut server, mut out, conn) = asyncio_server();
    let session = Session::start("advise-loop", &["--pid", &server.id().to_string()]);
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut handler: Vec<f64> = Vec::new();
    for request in ["fast", "slow", "fast", "slow", "fast", "slow"] {
        (&conn).write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        if request == "slow" {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            handler.push(line.split_whitespace().nth(1).unwrap().parse().unwrap());
        }
    }
    let advice = session.finish(true);
    let _ = server.kill();
    let _ = server.wait();
    let top = &findings(&advice, Some(server.id()))[0];
    assert_eq!(top["rule"], "loop-blocked", "{top:#}");
    assert!(top["title"].as_str().unwrap().contains("crunch"), "names the function: {top:#}");
    assert_eq!(number(top, "blocks"), 3.0);
    let (longest, own) = (number(top, "longest_ms"), handler.iter().copied().fold(0.0, f64::max) * 1e3);
    assert!(
        longest >= 0.95 * own && longest <= own + 50.0,
        "longest block {longest} ms, the handler measured {own:.1} ms"
    );
}

/// The upstream of `upstream.py` (`script`), answering each request after 50 ms, and its port.
fn slow_upstream(script: &Path) -> (Child, String) {
    let mut upstream = Command::new(python("3.12.1"))
        .args([script.to_str().unwrap(), "serve", "0.05"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let port =
        Lines::of(&mut upstream).next("upstream port", std::time::Duration::from_secs(10)).trim().to_string();
    (upstream, port)
}

/// A client making 40 requests to an upstream that answers each after 50 ms: the top
/// finding is `upstream-bound`, naming the upstream's address, with most of the busy time
/// waiting on it.
#[test]
fn a_slow_upstream_is_named_and_cpu_is_not_asked_for() {
    require_root();
    let script = fixture("offcpu", "upstream.py");
    let (mut upstream, port) = slow_upstream(&script);
    let python = python("3.12.1");
    let session = Session::start(
        "advise-upstream",
        &["--", python.to_str().unwrap(), script.to_str().unwrap(), "call", &port, "20"],
    );
    let advice = session.finish(false);
    let _ = upstream.kill();
    let _ = upstream.wait();
    let top = &findings(&advice, None)[0];
    assert_eq!(top["rule"], "upstream-bound", "{top:#}");
    assert!(top["title"].as_str().unwrap().contains(&format!("127.0.0.1:{port}")), "names the peer: {top:#}");
    assert!(number(top, "share") >= 0.5);
}

/// A pre-fork server with 8 workers in a cgroup allowed 0.5 CPU: the top finding of its
/// parent is `workers-mismatch`, asking for 2 x ceil(0.5) + 1 = 3 workers.
#[test]
fn prefork_workers_beyond_the_quota_are_named() {
    require_root();
    let cgroup = QuotaCgroup::new("stoker-advise-prefork", 50000);
    let (mut server, _) =
        python_in(&cgroup.path, &[fixture("net", "prefork_server.py").to_str().unwrap(), "8"]);
    let session = Session::start("advise-prefork", &["--pid", &server.id().to_string(), "-d", "1.5"]);
    let advice = session.finish(false);
    // SIGTERM: the parent ends its workers.
    // SAFETY: signals a child this test spawned and has not reaped.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    // The workers end after their parent: the cgroup is removed once they have.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read_to_string(cgroup.path.join("cgroup.procs")).unwrap_or_default().trim().is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let top = &findings(&advice, Some(server.id()))[0];
    assert_eq!(top["rule"], "workers-mismatch", "{top:#}");
    assert_eq!((number(top, "workers"), number(top, "recommended_workers")), (8.0, 3.0));
    // The same server launched by `advise -- CMD`: its workers are counted before the
    // session stops it.
    let python = python("3.12.1");
    let server_script = fixture("net", "prefork_server.py");
    let session = Session::start(
        "advise-prefork-launched",
        &[
            "-d",
            "2",
            "--",
            "sh",
            "-c",
            "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"",
            cgroup.path.to_str().unwrap(),
            python.to_str().unwrap(),
            server_script.to_str().unwrap(),
            "8",
        ],
    );
    let advice = session.finish(false);
    // The master and its workers (followed): the master's top finding is the mismatch.
    let processes = advice["processes"].as_array().unwrap();
    let masters: Vec<&Value> =
        processes.iter().filter(|p| p["findings"][0]["rule"] == "workers-mismatch").collect();
    assert_eq!(masters.len(), 1, "{advice:#}");
    let top = &masters[0]["findings"][0];
    assert_eq!((number(top, "workers"), number(top, "recommended_workers")), (8.0, 3.0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read_to_string(cgroup.path.join("cgroup.procs")).unwrap_or_default().trim().is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A pre-fork server with 2 workers, watched by its master's pid, and 6 clients at once,
/// each request on a new connection: requests wait in the accept queue for a free worker.
/// Each worker's top finding is `queueing`; its time in the server with the queues is what
/// the clients measured from before `connect()` to the end of the response, within 3%, and
/// its handling time is the handler's 20 ms (within 10%: a worker's wake-up and parsing);
/// the workers use little CPU, so it asks for workers, not CPU.
#[test]
fn requests_waiting_for_a_worker_ask_for_workers() {
    require_root();
    let (mut server, port) = {
        let mut child = Command::new(python("3.12.1"))
            .args([fixture("net", "prefork_server.py").to_str().unwrap(), "2"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let port = Lines::of(&mut child).next("server port", std::time::Duration::from_secs(10));
        (child, port.trim().to_string())
    };
    let session = Session::start("advise-queueing", &["--pid", &server.id().to_string()]);
    let (threads, each) = (6, 5);
    let out = Command::new(python("3.12.1"))
        .args([fixture("net", "burst_client.py").to_str().unwrap(), &port, "6", "5", "/sleep/20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "the client failed");
    let advice = session.finish(true);
    // SAFETY: signals a child this test spawned and has not reaped (the parent ends its workers).
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    let durations: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    let client_ms = durations.iter().sum::<f64>() / durations.len() as f64 / 1e6;
    let tops: Vec<Value> = advice["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["pid"] != server.id())
        .map(|p| p["findings"][0].clone())
        .collect();
    assert_eq!(tops.len(), 2, "two workers: {advice:#}");
    let mut requests = 0.0;
    for top in &tops {
        assert_eq!(top["rule"], "queueing", "{top:#}");
        requests += number(top, "requests");
        let (total, own) = (number(top, "total_ms"), number(top, "request_ms"));
        eprintln!("worker: total {total:.3} ms, request {own:.3} ms; clients {client_ms:.3} ms");
        assert!(
            (total - client_ms).abs() <= 0.03 * client_ms,
            "total {total:.3} ms, clients {client_ms:.3} ms"
        );
        assert!((own - 20.0).abs() <= 2.0, "request {own:.3} ms, the handler sleeps 20 ms");
        assert!(top["action"].as_str().unwrap().starts_with("Add workers"), "{top:#}");
    }
    assert_eq!(requests, (threads * each) as f64);
}

/// An HTTP server called a few times in a cgroup allowed 2 CPUs: the top finding is
/// `cpu-overprovisioned`, asking for a request of what it used (the kernel's accounting
/// over the session) plus 15%, far under the quota.
#[test]
fn an_idle_service_with_a_large_quota_is_told_to_ask_less() {
    require_root();
    let cgroup = QuotaCgroup::new("stoker-advise-idle", 200000);
    let (mut server, port) = python_in(&cgroup.path, &[fixture("net", "http_server.py").to_str().unwrap()]);
    let session = Session::start("advise-idle", &["--pid", &server.id().to_string(), "-d", "2"]);
    call(&port, 5);
    let advice = session.finish(false);
    let _ = server.kill();
    let _ = server.wait();
    let top = &findings(&advice, Some(server.id()))[0];
    assert_eq!(top["rule"], "cpu-overprovisioned", "{top:#}");
    let (used, request) = (number(top, "cpus_used"), number(top, "recommended_request_cpus"));
    assert_eq!(number(top, "quota_cpus"), 2.0);
    assert!(used < 0.2 && request >= used * 1.15 - 0.01 && request <= used * 1.15 + 0.011, "{top:#}");
}

/// http.server with Nagle's algorithm on, called by http.client: the top finding is
/// `nagle-stall`, counting the responses whose body the caller waited 20 ms or more for.
/// The same server with Nagle off, lightly called, is `healthy` and nothing else (its
/// threads' waits on their clients' sockets between requests are not an upstream's).
#[test]
fn nagle_stalls_are_advised_and_a_healthy_server_is_left_alone() {
    require_root();
    for nagle in [true, false] {
        let (mut server, port) = http_server(if nagle { &["--nagle"] } else { &[] });
        let session = Session::start("advise-nagle", &["--pid", &server.id().to_string()]);
        let caller = call(&port, if nagle { 10 } else { 50 });
        let advice = session.finish(true);
        let _ = server.kill();
        let _ = server.wait();
        let all = findings(&advice, Some(server.id()));
        if !nagle {
            assert_eq!(all.len(), 1, "{all:#?}");
            assert_eq!(all[0]["rule"], "healthy");
            continue;
        }
        let waited = caller["body_reads"][0]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w.as_u64().unwrap() >= 20_000_000)
            .count();
        let top = &all[0];
        assert_eq!(top["rule"], "nagle-stall", "{top:#}");
        assert_eq!(number(top, "stalled"), waited as f64, "{top:#}");
        assert_eq!(number(top, "requests"), 10.0);
    }
}

/// A process that grows to 92% of its cgroup's 96 MiB memory limit: the top finding is
/// `memory-near-limit`, asking for its peak (as the cgroup counted it) plus 15%.
#[test]
fn memory_near_its_limit_is_raised_from_the_peak() {
    require_root();
    let (_cgroup, mut grower) = grower();
    let session = Session::start("advise-memory", &["--pid", &grower.id().to_string(), "-d", "2"]);
    grower.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    BufReader::new(grower.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let peak: f64 = line.trim().parse::<f64>().unwrap() / (1u64 << 20) as f64;
    let advice = session.finish(false);
    let _ = grower.kill();
    let _ = grower.wait();
    let top = &findings(&advice, Some(grower.id()))[0];
    assert_eq!(top["rule"], "memory-near-limit", "{top:#}");
    let recommended = number(top, "recommended_limit_mib");
    assert!(
        recommended >= (peak * 1.15).floor() && recommended <= (peak * 1.15).ceil() + 1.0,
        "recommended {recommended} MiB for a peak of {peak:.1} MiB"
    );
    assert!(recommended > 96.0, "above the limit it hit");
}

/// `--format html` on the GIL-bound workload: one page that Debian's chromium renders
/// headless without an error on its console, whose DOM has the findings, the CPU chart and
/// the flamegraph, and whose screenshot is a picture (not a blank page: many colours).
#[test]
fn the_html_report_renders_in_a_real_browser() {
    require_root();
    let browser = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("this test needs chromium (cargo xtask setup installs it)");
    let dir = scratch("advise-html");
    let page = dir.join("advice.html");
    let python = python("3.12.1");
    let script = fixture("offcpu", "gil_threads.py");
    let out = Command::new(STOKER)
        .args(["advise", "-f", "html", "-o", page.to_str().unwrap(), "--"])
        .args([python.to_str().unwrap(), script.to_str().unwrap(), "3", "1.5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stoker advise failed: {}", stderr(&out));
    let url = format!("file://{}", page.display());
    let chrome = |extra: &[&str]| {
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    let dom = chrome(&["--dump-dom"]);
    let (html, log) = (String::from_utf8_lossy(&dom.stdout), String::from_utf8_lossy(&dom.stderr));
    assert!(dom.status.success(), "chromium failed: {log}");
    assert!(!log.contains("Uncaught") && !log.contains(":CONSOLE("), "console errors: {log}");
    for needle in ["gil-bound", "Action:", "Math:", "CPU used", "<polyline", "data:image/svg+xml;base64,"] {
        assert!(html.contains(needle), "the rendered page has no {needle}");
    }
    let shot = dir.join("advice.png");
    let png = chrome(&["--window-size=1280,1600", &format!("--screenshot={}", shot.display())]);
    assert!(png.status.success(), "chromium screenshot failed: {}", String::from_utf8_lossy(&png.stderr));
    let bytes = std::fs::read(&shot).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
    // A blank or near-blank page compresses to a few KiB; text, charts and a flamegraph do not.
    assert!(bytes.len() > 40_000, "screenshot of {} bytes: {}", bytes.len(), shot.display());
}

/// The agent (off-CPU on, a 30 s advice window, 1 s intervals) beside four GIL-bound
/// threads: `GET /advice` gives the process `gil-bound` with 2 workers, `/metrics` and the
/// OTLP export carry `stoker.recommendation.workers` 2 and the finding as
/// `stoker.advice.active` (rule and severity), under the process's resource; the finding
/// goes once as an OTLP log record (event `stoker.advice`) while it stays active.
#[test]
fn the_agent_advises_over_its_window() {
    require_root();
    use agent_harness::*;
    let dir = scratch("advise-agent");
    let (otlp, http) = (free_port(), free_port());
    let mut receiver = otlp_receiver("http", otlp, &dir);
    let config =
        agent_config(&dir, http, "export_interval: 1s\noff_cpu:\n  enabled: true\nadvice:\n  window: 30s\n");
    let agent = agent(&config, otlp);
    wait_ready(http);
    let mut gil = Command::new(python("3.12.1"))
        .args([fixture("offcpu", "gil_threads.py").to_str().unwrap(), "4", "4"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = gil.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let finding = loop {
        let advice: Option<Value> =
            http_get(http, "/advice").and_then(|(_, body)| serde_json::from_str(&body).ok());
        let top = advice.as_ref().and_then(|a| {
            a["processes"].as_array()?.iter().find(|p| p["pid"] == pid)?["findings"]
                .as_array()?
                .first()
                .cloned()
        });
        if let Some(top) = top.filter(|t| t["rule"] == "gil-bound") {
            break top;
        }
        assert!(std::time::Instant::now() < deadline, "no gil-bound advice for pid {pid}: {advice:?}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert_eq!(number(&finding, "recommended_workers"), 2.0, "{finding:#}");
    let (_, text) = http_get(http, "/metrics").unwrap();
    let label = format!("process_pid=\"{pid}\"");
    assert!(
        text.lines().any(|l| l.starts_with("stoker_recommendation_workers{")
            && l.contains(&label)
            && l.ends_with(" 2")),
        "no workers recommendation on /metrics"
    );
    assert!(
        text.lines().any(|l| l.starts_with("stoker_advice_active{")
            && l.contains(&label)
            && l.contains("stoker_advice_rule=\"gil-bound\"")
            && l.contains("stoker_advice_severity=\"high\"")),
        "no gil-bound finding on /metrics"
    );
    // The same over OTLP, decoded by the official protos.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = ndjson(&dir.join("metrics.ndjson"));
        let exported = metrics
            .iter()
            .flat_map(|r| r["resources"].as_array().unwrap().iter())
            .filter(|r| r["attributes"]["process.pid"] == pid.to_string().as_str())
            .flat_map(|r| r["data"].as_array().unwrap().iter())
            .filter(|m| m["name"] == "stoker.recommendation.workers")
            .flat_map(|m| m["points"].as_array().unwrap().iter())
            .any(|p| p["value"].as_f64() == Some(2.0));
        if exported {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "stoker.recommendation.workers not exported over OTLP");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // The finding as one log record, event stoker.advice, under the process's resource.
    let pid_records = || -> Vec<Value> {
        ndjson(&dir.join("logs.ndjson"))
            .iter()
            .flat_map(|l| l["records"].as_array().unwrap().clone())
            .filter(|r| r["resource"]["process.pid"] == pid.to_string().as_str())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pid_records().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no advice log record for pid {pid}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // Two more exports while the finding stays active: still one record.
    let exports = ndjson(&dir.join("metrics.ndjson")).len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ndjson(&dir.join("metrics.ndjson")).len() < exports + 2 {
        assert!(std::time::Instant::now() < deadline, "the agent stopped exporting");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let records = pid_records();
    let _ = gil.kill();
    let _ = gil.wait();
    let status = stop(agent);
    kill(&mut [&mut receiver]);
    assert!(status.success());
    eprintln!("{records:#?}");
    let r = &records[0];
    assert_eq!(
        (r["event_name"].as_str(), r["attributes"]["stoker.advice.rule"].as_str()),
        (Some("stoker.advice"), Some("gil-bound"))
    );
    assert_eq!(r["attributes"]["stoker.advice.recommended_workers"], "2.0");
    assert_eq!(
        records.iter().filter(|r| r["attributes"]["stoker.advice.rule"] == "gil-bound").count(),
        1,
        "sent once while active"
    );
}

/// The agent (off-CPU and network on) beside an asyncio server whose handler runs 300 ms
/// of Python per `slow` line, and a client of an upstream that answers after 50 ms: its
/// `/advice` names the function that blocked the loop (`crunch`, named while the process
/// lives) and the upstream's address, as `stoker advise` does.
#[test]
fn the_agent_names_blocked_loops_and_upstreams() {
    require_root();
    use agent_harness::*;
    let (agent, http) = advising_agent("advise-agent-names");
    let script = fixture("offcpu", "upstream.py");
    let (mut upstream, port) = slow_upstream(&script);
    let mut client = Command::new(python("3.12.1"))
        .args([script.to_str().unwrap(), "call", &port, "400"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (mut server, mut out, conn) = asyncio_server();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let finding = |pid: u32, rule: &str| finding_of(&agent_findings(http, pid)?, rule);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let (mut blocked, mut bound) = (None, None);
    while blocked.is_none() || bound.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "loop-blocked {blocked:?}, upstream-bound {bound:?}; /advice: {:?}",
            http_get(http, "/advice")
        );
        (&conn).write_all(b"slow\n").unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        blocked = blocked.or_else(|| finding(server.id(), "loop-blocked"));
        bound = bound.or_else(|| finding(client.id(), "upstream-bound"));
    }
    for child in [&mut server, &mut client, &mut upstream] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(stop(agent).success());
    let (blocked, bound) = (blocked.unwrap(), bound.unwrap());
    eprintln!("{blocked:#}\n{bound:#}");
    assert!(blocked["title"].as_str().unwrap().contains("crunch"), "names the function: {blocked:#}");
    assert!(
        bound["title"].as_str().unwrap().contains(&format!("127.0.0.1:{port}")),
        "names the peer: {bound:#}"
    );
}

/// An agent with off-CPU on, 1 s intervals and a 60 s advice window (no OTLP receiver
/// listening), ready; and its HTTP port.
fn advising_agent(name: &str) -> (Child, u16) {
    use agent_harness::*;
    let (dir, http) = (scratch(name), free_port());
    let config =
        agent_config(&dir, http, "export_interval: 1s\noff_cpu:\n  enabled: true\nadvice:\n  window: 60s\n");
    let agent = agent(&config, free_port());
    wait_ready(http);
    (agent, http)
}

/// The findings the agent's `/advice` gives process `pid` now (None: none yet).
fn agent_findings(http: u16, pid: u32) -> Option<Vec<Value>> {
    let (_, body) = agent_harness::http_get(http, "/advice")?;
    let advice: Value = serde_json::from_str(&body).ok()?;
    advice["processes"].as_array()?.iter().find(|p| p["pid"] == pid)?["findings"].as_array().cloned()
}

/// Polls the agent's `/advice` until `found` picks something out of process `pid`'s findings.
fn wait_advice<T>(http: u16, pid: u32, what: &str, found: impl Fn(&[Value]) -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let all = agent_findings(http, pid);
        if let Some(t) = all.as_deref().and_then(&found) {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "{what} for pid {pid}: {all:#?}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// The finding of `rule` among `all`.
fn finding_of(all: &[Value], rule: &str) -> Option<Value> {
    all.iter().find(|f| f["rule"] == rule).cloned()
}

/// The agent (off-CPU on, a 60 s window, 1 s intervals) beside the known-cause workloads of
/// the tests above, all at once, each in a cgroup of its own where it needs one: it gives
/// each the finding `stoker advise` gives, with the same numbers, checked against what the
/// workload measured of itself where it can (the grower's peak, the caller's waits). A
/// process's window starts when the agent first sees it: the grower grows and the servers
/// are called only after that.
#[test]
fn the_agent_advises_every_known_cause() {
    require_root();
    use agent_harness::*;
    let (agent, http) = advising_agent("advise-agent-known");
    // A CPU-bound process under 0.3 CPU (spinning from its start), a pre-fork server with 8
    // workers under 0.5, a process to grow to 92% of 96 MiB, http.server with and without
    // Nagle, an idle server under 2 CPUs.
    let (_quota, mut spin) = spinner("stoker-agent-quota", "120");
    spin.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let prefork_cgroup = QuotaCgroup::new("stoker-agent-prefork", 50000);
    let (mut prefork, _) =
        python_in(&prefork_cgroup.path, &[fixture("net", "prefork_server.py").to_str().unwrap(), "8"]);
    let (_memory, mut grower) = grower();
    let (mut nagle, nagle_port) = http_server(&["--nagle"]);
    let (mut healthy, healthy_port) = http_server(&[]);
    let idle_cgroup = QuotaCgroup::new("stoker-agent-idle", 200000);
    let (mut idle, idle_port) =
        python_in(&idle_cgroup.path, &[fixture("net", "http_server.py").to_str().unwrap()]);
    for pid in [grower.id(), nagle.id(), healthy.id(), idle.id()] {
        wait_advice(http, pid, "not seen", |_| Some(()));
    }
    grower.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let caller = call(&nagle_port, 10);
    call(&healthy_port, 50);
    call(&idle_port, 5);
    let mut line = String::new();
    BufReader::new(grower.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let peak = line.trim().parse::<f64>().unwrap() / (1u64 << 20) as f64;

    // cpu-throttled once the window holds 10 s of spinning: a limit of what one spinning
    // thread wants (the first interval, part of which it was not yet seen, counts a little
    // less), with the margin.
    let throttled = wait_advice(http, spin.id(), "no cpu-throttled over 10 s", |all| {
        finding_of(all, "cpu-throttled").filter(|f| number(f, "elapsed_s") >= 10.0)
    });
    let limit = number(&throttled, "recommended_limit_cpus");
    assert!((1.0..=1.3).contains(&limit), "limit {limit} CPUs for a process that wants one: {throttled:#}");
    // Its samples are all in its loop, as `stoker advise` would say.
    assert!(
        throttled["evidence"].to_string().contains("hottest: <module> (spin.py) ("),
        "the spinner's hottest function: {throttled:#}"
    );
    let workers =
        wait_advice(http, prefork.id(), "no workers-mismatch", |all| finding_of(all, "workers-mismatch"));
    assert_eq!((number(&workers, "workers"), number(&workers, "recommended_workers")), (8.0, 3.0));
    let near =
        wait_advice(http, grower.id(), "no memory-near-limit", |all| finding_of(all, "memory-near-limit"));
    let recommended = number(&near, "recommended_limit_mib");
    assert!(
        recommended >= (peak * 1.15).floor() && recommended <= (peak * 1.15).ceil() + 1.0,
        "recommended {recommended} MiB for a peak of {peak:.1} MiB: {near:#}"
    );
    let stall = wait_advice(http, nagle.id(), "no nagle-stall over the 10 requests", |all| {
        finding_of(all, "nagle-stall").filter(|f| number(f, "requests") == 10.0)
    });
    let waited =
        caller["body_reads"][0].as_array().unwrap().iter().filter(|w| w.as_u64().unwrap() >= 20_000_000);
    assert_eq!(number(&stall, "stalled"), waited.count() as f64, "{stall:#}");
    let over =
        wait_advice(http, idle.id(), "no cpu-overprovisioned", |all| finding_of(all, "cpu-overprovisioned"));
    let (used, request) = (number(&over, "cpus_used"), number(&over, "recommended_request_cpus"));
    assert_eq!(number(&over, "quota_cpus"), 2.0);
    assert!(used < 0.2 && (0.01..=0.2).contains(&request), "{over:#}");
    // Two exports after its calls (the spinner's window grew 2 s more): still healthy alone.
    let elapsed = number(&throttled, "elapsed_s");
    wait_advice(http, spin.id(), "the agent stopped exporting", |all| {
        finding_of(all, "cpu-throttled").filter(|f| number(f, "elapsed_s") >= elapsed + 2.0)
    });
    let all = agent_findings(http, healthy.id()).unwrap();
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["rule"], "healthy", "{all:#?}");

    // SIGTERM: the pre-fork parent ends its workers; every cgroup empties before it goes.
    // SAFETY: signals a child this test spawned and has not reaped.
    unsafe { libc::kill(prefork.id() as i32, libc::SIGTERM) };
    let _ = prefork.wait();
    for child in [&mut spin, &mut grower, &mut nagle, &mut healthy, &mut idle] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read_to_string(prefork_cgroup.path.join("cgroup.procs"))
        .unwrap_or_default()
        .trim()
        .is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(stop(agent).success());
}
