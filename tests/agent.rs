//! End-to-end tests of `stoker agent`: a busy CPython process, the real kernel program,
//! a real OTLP receiver (oteltap, from PyPI) and the Prometheus endpoint. Run as root.
mod common;

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{agent::*, *};

/// Metrics reach a real OTLP receiver with semantic-convention names and units; the
/// Prometheus endpoint carries the resource attributes; CPU matches /proc within 10 %.
#[test]
fn agent_exports_metrics() {
    require_root();
    let dir = scratch("agent");
    let (otlp, http) = (free_port(), free_port());
    let received = dir.join("otlp.ndjson");
    let receiver = oteltap(otlp, &received);
    let mut busy = busy_python(&dir);
    let config = agent_config(&dir, http, "export_interval: 1s\n");
    let agent = agent(&config, otlp);
    wait_ready(http);
    // /proc is read right after each export, so both sides cover the same intervals.
    let pid = format!("process_pid=\"{}\"", busy.id());
    let after_export = |previous: f64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, text) = http_get(http, "/metrics").expect("scrape /metrics");
            let reported = metric_value(&text, "process_cpu_time_seconds_total", &pid).unwrap_or(0.0);
            if reported != previous {
                return (reported, cpu_seconds(busy.id()), text);
            }
            assert!(Instant::now() < deadline, "no new export of the busy process");
            thread::sleep(Duration::from_millis(10));
        }
    };
    // The first export may cover less than an interval of the process.
    let (first, _, _) = after_export(0.0);
    let (a1, c1, _) = after_export(first);
    let (mut a2, mut c2) = (a1, c1);
    let mut text = String::new();
    for _ in 0..4 {
        (a2, c2, text) = after_export(a2);
    }
    let status = stop(agent);
    busy.kill().ok();
    busy.wait().ok();
    thread::sleep(Duration::from_millis(500));
    let mut receiver = receiver;
    receiver.kill().ok();
    receiver.wait().ok();
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");

    eprintln!("CPU over 4 exports: agent {:.3} s, /proc {:.3} s", a2 - a1, c2 - c1);
    assert!(((a2 - a1) - (c2 - c1)).abs() <= 0.1 * (c2 - c1), "agent {a2} - {a1} vs /proc {c2} - {c1}");
    let utilization =
        metric_value(&text, "process_cpu_utilization_ratio", &pid).expect("utilization of the busy process");
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(utilization > 0.0 && utilization <= 1.0 / cpus + 0.05, "utilization {utilization}");
    let line =
        text.lines().find(|l| l.starts_with("process_cpu_time_seconds_total") && l.contains(&pid)).unwrap();
    for attr in [
        "service_name=\"workload\"",
        "process_runtime_name=\"CPython\"",
        "process_runtime_version=\"3.12.1\"",
        "host_name=",
    ] {
        assert!(line.contains(attr), "missing {attr} in {line}");
    }
    assert!(
        metric_value(&text, "stoker_function_cpu_time_seconds_total", "function=\"burn (workload.py)\"")
            .unwrap_or(0.0)
            > 1.0
    );
    assert!(metric_value(&text, "stoker_samples_total", "").unwrap_or(0.0) > 300.0, "{text}");
    assert_eq!(metric_value(&text, "stoker_export_failures_total", ""), Some(0.0));

    let ndjson = std::fs::read_to_string(&received).unwrap();
    let metrics: Vec<serde_json::Value> =
        ndjson.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    for (name, unit, kind) in [
        ("process.cpu.time", "s", "sum"),
        ("process.cpu.utilization", "1", "gauge"),
        ("process.memory.usage", "By", "gauge"),
        ("stoker.function.cpu.time", "s", "sum"),
        ("stoker.samples", "{sample}", "sum"),
        ("stoker.export.failures", "{failure}", "sum"),
        ("stoker.processes.tracked", "{process}", "gauge"),
    ] {
        let m = metrics.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} not received"));
        assert_eq!(m["unit"], unit, "{name}");
        assert!(m.get(kind).is_some(), "{name} should be a {kind}: {m}");
    }
}

/// With the receiver down the agent keeps sampling, counts failures and drops, stays
/// small, and delivers once the receiver is back.
#[test]
fn agent_survives_a_receiver_outage() {
    require_root();
    let dir = scratch("outage");
    let (otlp, http) = (free_port(), free_port());
    let mut busy = busy_python(&dir);
    let config = agent_config(&dir, http, "export_interval: 1s\nqueue:\n  max_batches: 2\n");
    let agent = agent(&config, otlp);
    wait_ready(http);
    thread::sleep(Duration::from_secs(6));
    let (_, down) = http_get(http, "/metrics").unwrap();
    let received = dir.join("otlp.ndjson");
    let mut receiver = oteltap(otlp, &received);
    let deadline = Instant::now() + Duration::from_secs(45);
    while !std::fs::read_to_string(&received).unwrap_or_default().contains("process.cpu.time") {
        assert!(Instant::now() < deadline, "no delivery after the receiver came back");
        thread::sleep(Duration::from_millis(200));
    }
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", agent.id()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    let status = stop(agent);
    kill(&mut [&mut receiver, &mut busy]);
    assert!(status.success());
    assert!(metric_value(&down, "stoker_export_failures_total", "").unwrap_or(0.0) >= 1.0, "{down}");
    assert!(metric_value(&down, "stoker_export_dropped_batches_total", "").unwrap_or(0.0) >= 1.0, "{down}");
    assert!(
        metric_value(&down, "stoker_samples_total", "").unwrap_or(0.0) > 300.0,
        "sampling stopped: {down}"
    );
    assert!(rss_kb < 100 * 1024, "agent peak RSS {rss_kb} kB");
}

/// Records every POST body it receives into a directory: a plain local HTTP endpoint
/// standing in for Pyroscope's push API.
const CAPTURE_SERVER: &str = r#"
import http.server, pathlib, sys, itertools
out = pathlib.Path(sys.argv[2]); n = itertools.count()
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        (out / f"{next(n):04}{self.path.replace('/', '_')}").write_bytes(body)
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// Each interval's profiles go to Pyroscope's push API as pprof, one series per process
/// labelled like its metrics; the pprof decodes with an independent decoder.
#[test]
fn agent_pushes_profiles_to_pyroscope() {
    require_root();
    let dir = scratch("pyroscope");
    let pushes = dir.join("pushes");
    std::fs::create_dir_all(&pushes).unwrap();
    let (port, http) = (free_port(), free_port());
    let mut server = Command::new("python3")
        .args(["-c", CAPTURE_SERVER, &port.to_string(), pushes.to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut busy = busy_python(&dir);
    let config = agent_config(
        &dir,
        http,
        &format!("export_interval: 2s\npyroscope:\n  url: http://127.0.0.1:{port}\n"),
    );
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let deadline = Instant::now() + Duration::from_secs(30);
    let busy_pid = busy.id().to_string();
    let found = loop {
        let mut hit = None;
        for entry in std::fs::read_dir(&pushes).unwrap().flatten() {
            assert!(
                entry.file_name().to_string_lossy().ends_with("_push.v1.PusherService_Push"),
                "{entry:?}"
            );
            let body: serde_json::Value =
                serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
            for series in body["series"].as_array().unwrap() {
                let label = |name: &str| {
                    series["labels"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|l| l["name"] == name)
                        .map(|l| l["value"].clone())
                };
                if label("process_pid") == Some(serde_json::json!(busy_pid)) {
                    assert_eq!(label("__name__"), Some(serde_json::json!("process_cpu")));
                    assert_eq!(label("service_name"), Some(serde_json::json!("workload")));
                    hit = Some(series["samples"][0]["rawProfile"].as_str().unwrap().to_string());
                }
            }
        }
        if let Some(raw) = hit {
            break raw;
        }
        assert!(Instant::now() < deadline, "no profile of the busy process was pushed");
        thread::sleep(Duration::from_millis(300));
    };
    let status = stop(agent);
    kill(&mut [&mut server, &mut busy]);
    assert!(status.success());
    use base64::Engine;
    let pb = dir.join("pushed.pb.gz");
    std::fs::write(&pb, base64::engine::general_purpose::STANDARD.decode(found).unwrap()).unwrap();
    let p = decode_pprof(&pb);
    let functions: Vec<&str> = p["functions"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
    for f in ["func_a", "burn", "shares"] {
        assert!(functions.contains(&f), "{f} missing from the pushed profile: {functions:?}");
    }
    assert!(p["samples"].as_i64().unwrap() > 20, "{p}");
}

/// A process that exits between two exports still reports the CPU of its last interval.
#[test]
fn agent_reports_a_process_that_exits_mid_interval() {
    require_root();
    let dir = scratch("exits");
    let http = free_port();
    let config = agent_config(&dir, http, "export_interval: 3s\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let mut short = Command::new(python("3.12.1"))
        .args([workload().to_str().unwrap(), "shares", "2", dir.join("r.json").to_str().unwrap()])
        .spawn()
        .unwrap();
    // Its CPU time, read while it is a zombie (the kernel keeps it until it is reaped).
    let deadline = Instant::now() + Duration::from_secs(20);
    let zombie = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
    };
    while !zombie(short.id()) {
        assert!(Instant::now() < deadline, "the short workload did not end");
        thread::sleep(Duration::from_millis(10));
    }
    let used = cpu_seconds(short.id());
    short.wait().unwrap();
    let pid = format!("process_pid=\"{}\"", short.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reported = 0.0;
    while Instant::now() < deadline && (reported - used).abs() > 0.1 * used {
        thread::sleep(Duration::from_millis(100));
        let (_, text) = http_get(http, "/metrics").unwrap_or_default();
        reported = metric_value(&text, "process_cpu_time_seconds_total", &pid).unwrap_or(reported);
    }
    assert!(stop(agent).success());
    eprintln!("exited process: agent {reported:.2} s, /proc {used:.2} s");
    assert!((reported - used).abs() <= 0.1 * used, "agent {reported:.2} s vs /proc {used:.2} s");
}
