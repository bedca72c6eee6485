//! End-to-end tests of `stoker agent`: a busy CPython process, the real kernel program,
//! a real OTLP receiver (oteltap, from PyPI) and the Prometheus endpoint. Run as root.
mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

fn oteltap(port: u16, out: &std::path::Path) -> Child {
    let file = std::fs::File::create(out).unwrap();
    // As a module: a console script installed by pip may have no pyenv shim yet.
    Command::new("python3")
        .args(["-m", "oteltap", "--port", &port.to_string()])
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .expect("oteltap (pip install oteltap) must be installed; cargo xtask setup installs it")
}

/// A CPython 3.12 process busy in the workload's func_a/b/c for 30 s.
fn busy_python(dir: &std::path::Path) -> Child {
    Command::new(python("3.12.1"))
        .args([workload().to_str().unwrap(), "shares", "30", dir.join("r.json").to_str().unwrap()])
        .spawn()
        .unwrap()
}

/// Writes an agent configuration (sample rate 99 Hz, /metrics on `http`) plus `extra`.
fn agent_config(dir: &std::path::Path, http: u16, extra: &str) -> std::path::PathBuf {
    let config = dir.join("agent.yaml");
    let yaml = format!("sample_rate_hz: 99\nprometheus:\n  listen: 127.0.0.1:{http}\n{extra}");
    std::fs::write(&config, yaml).unwrap();
    config
}

fn agent(config: &std::path::Path, otlp_port: u16) -> Child {
    Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp_port}"))
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The agent with no OTLP endpoint (its other outputs only).
fn agent_without_otlp(config: &std::path::Path) -> Child {
    Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .spawn()
        .unwrap()
}

fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "the agent did not become ready");
        thread::sleep(Duration::from_millis(100));
    }
}

fn metric_value(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && l.contains(label))?.rsplit(' ').next()?.parse().ok()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn stop(mut child: Child) -> std::process::ExitStatus {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the agent did not exit within 10 s of SIGTERM");
        thread::sleep(Duration::from_millis(50));
    }
}

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
    receiver.kill().ok();
    receiver.wait().ok();
    busy.kill().ok();
    busy.wait().ok();
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
    server.kill().ok();
    server.wait().ok();
    busy.kill().ok();
    busy.wait().ok();
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

/// The OTLP receiver on the official opentelemetry-proto package
/// (tests/fixtures/otlp_receiver.py), serving `mode` (`grpc` or `http`) on `port` and
/// writing what it decodes to `dir`/{metrics,profiles}.ndjson; returns once it listens.
fn otlp_receiver(mode: &str, port: u16, dir: &std::path::Path) -> Child {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/otlp_receiver.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([mode, &port.to_string(), dir.to_str().unwrap()])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the OTLP receiver exited ({status}): it needs grpcio and opentelemetry-proto \
                 (cargo xtask setup installs them)"
            );
        }
        assert!(Instant::now() < deadline, "the OTLP receiver did not listen on {port} within 20 s");
        thread::sleep(Duration::from_millis(100));
    }
    child
}

/// The agent with only the given OTEL_EXPORTER_OTLP_* variables set.
fn agent_with_env(config: &std::path::Path, vars: &[(&str, String)]) -> Child {
    let mut command = Command::new(STOKER);
    command.args(["agent", "--config", config.to_str().unwrap()]);
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            command.env_remove(k);
        }
    }
    command.envs(vars.iter().map(|(k, v)| (k, v))).spawn().unwrap()
}

/// The JSON lines of an ndjson file written so far (a line being written is skipped).
fn ndjson(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Metrics reach a gRPC receiver that is not stoker's code (grpcio and the official
/// opentelemetry-proto servicer), gzip-compressed, with the configured headers, under
/// each process's resource.
#[test]
fn agent_exports_metrics_over_grpc() {
    require_root();
    let dir = scratch("grpc");
    let (otlp, http) = (free_port(), free_port());
    let mut receiver = otlp_receiver("grpc", otlp, &dir);
    let mut busy = busy_python(&dir);
    let config = agent_config(&dir, http, "export_interval: 1s\notlp:\n  profiles: true\n");
    let agent = agent_with_env(
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}")),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-tenant=team%20a,Authorization=Bearer%20t0k".into()),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000".into()),
        ],
    );
    wait_ready(http);
    let pid = busy.id().to_string();
    let received = dir.join("metrics.ndjson");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (request, process) = loop {
        let hit = ndjson(&received).into_iter().find_map(|r| {
            let p =
                r["resources"].as_array()?.iter().find(|p| p["attributes"]["process.pid"] == pid)?.clone();
            Some((r, p))
        });
        if let Some(hit) = hit {
            break hit;
        }
        assert!(Instant::now() < deadline, "no metrics of the busy process arrived over gRPC");
        thread::sleep(Duration::from_millis(200));
    };
    // Profiles take the same way (ProfilesService/Export) with the general headers.
    let profiles = dir.join("profiles.ndjson");
    let profile = loop {
        let hit = ndjson(&profiles).into_iter().find(|r| {
            r["profiles"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["attributes"]["process.pid"] == pid))
        });
        if let Some(hit) = hit {
            break hit;
        }
        assert!(Instant::now() < deadline, "no profile of the busy process arrived over gRPC");
        thread::sleep(Duration::from_millis(200));
    };
    let (_, text) = http_get(http, "/metrics").expect("scrape /metrics");
    let status = stop(agent);
    busy.kill().ok();
    busy.wait().ok();
    receiver.kill().ok();
    receiver.wait().ok();
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");

    // The metrics' own header list replaces the general one; profiles have none set.
    assert!(profile["headers"].get("x-tenant").is_none(), "{}", profile["headers"]);
    assert_eq!(request["headers"]["x-tenant"], "team a", "{request}");
    assert_eq!(request["headers"]["authorization"], "Bearer t0k", "{request}");
    let names: Vec<&str> = process["metrics"].as_array().unwrap().iter().filter_map(|m| m.as_str()).collect();
    for name in
        ["process.cpu.time", "process.cpu.utilization", "process.memory.usage", "stoker.function.cpu.time"]
    {
        assert!(names.contains(&name), "{name} missing: {names:?}");
    }
    let attrs = &process["attributes"];
    assert_eq!(attrs["service.name"], "workload", "{attrs}");
    assert_eq!(attrs["process.runtime.name"], "CPython", "{attrs}");
    assert_eq!(attrs["process.runtime.version"], "3.12.1", "{attrs}");
    assert!(attrs["host.name"].as_str().is_some_and(|h| !h.is_empty()), "{attrs}");
    let agent_resource = request["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["attributes"]["service.name"] == "stoker-agent")
        .expect("the agent's own resource");
    assert!(
        agent_resource["metrics"].as_array().unwrap().iter().any(|m| m == "stoker.samples"),
        "{agent_resource}"
    );
    assert_eq!(metric_value(&text, "stoker_export_failures_total", ""), Some(0.0), "{text}");
}

/// Over gRPC too, an agent started before its receiver keeps sampling, counts the
/// failed attempts, and delivers once the receiver listens.
#[test]
fn agent_grpc_export_recovers_from_an_outage() {
    require_root();
    let dir = scratch("grpc-outage");
    let (otlp, http) = (free_port(), free_port());
    let mut busy = busy_python(&dir);
    let config = agent_config(&dir, http, "export_interval: 1s\n");
    let agent = agent_with_env(
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc".into()),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", format!("http://127.0.0.1:{otlp}")),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1000".into()),
        ],
    );
    wait_ready(http);
    let deadline = Instant::now() + Duration::from_secs(20);
    let failures = loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        match metric_value(&text, "stoker_export_failures_total", "") {
            Some(n) if n >= 2.0 => break text,
            _ => assert!(Instant::now() < deadline, "no failed gRPC attempt was counted: {text}"),
        }
        thread::sleep(Duration::from_millis(200));
    };
    let mut receiver = otlp_receiver("grpc", otlp, &dir);
    let pid = busy.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(45);
    while !ndjson(&dir.join("metrics.ndjson")).iter().any(|r| {
        r["resources"].as_array().is_some_and(|rs| rs.iter().any(|p| p["attributes"]["process.pid"] == pid))
    }) {
        assert!(Instant::now() < deadline, "no delivery over gRPC after the receiver came up");
        thread::sleep(Duration::from_millis(200));
    }
    let status = stop(agent);
    receiver.kill().ok();
    receiver.wait().ok();
    busy.kill().ok();
    busy.wait().ok();
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");
    assert!(metric_value(&failures, "stoker_samples_total", "").unwrap_or(0.0) > 100.0, "{failures}");
}

/// With `otlp.profiles: true` each interval's profile of the busy process arrives as
/// OTLP profiles (http/protobuf, /v1development/profiles), decodes with the official
/// opentelemetry-proto package, and shows its Python functions with files, lines, the
/// workload's 50/30/20 split and about one sample per period of CPU time.
#[test]
fn agent_exports_otlp_profiles() {
    require_root();
    let dir = scratch("profiles");
    let (otlp, http) = (free_port(), free_port());
    let mut receiver = otlp_receiver("http", otlp, &dir);
    let mut busy = busy_python(&dir);
    let config = agent_config(&dir, http, "export_interval: 2s\notlp:\n  profiles: true\n");
    let agent =
        agent_with_env(&config, &[("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))]);
    wait_ready(http);
    let pid = busy.id().to_string();
    let received = dir.join("profiles.ndjson");
    let deadline = Instant::now() + Duration::from_secs(40);
    // The busy process's CPU time from /proc over wall-clock time, to check each profile.
    let mut cpu_readings: Vec<(f64, f64)> = Vec::new();
    // Profiles of the busy process, until they hold 600 samples (about three intervals).
    let profiles = loop {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        cpu_readings.push((now.as_secs_f64(), cpu_seconds(busy.id())));
        let profiles: Vec<serde_json::Value> = ndjson(&received)
            .iter()
            .flat_map(|r| r["profiles"].as_array().cloned().unwrap_or_default())
            .filter(|p| p["attributes"]["process.pid"] == pid)
            .collect();
        let total: i64 = profiles
            .iter()
            .flat_map(|p| p["samples"].as_array().unwrap().iter())
            .map(|s| s["values"][0].as_i64().unwrap())
            .sum();
        if total >= 600 {
            break profiles;
        }
        assert!(Instant::now() < deadline, "fewer than 600 samples of the busy process arrived: {total}");
        thread::sleep(Duration::from_millis(100));
    };
    let status = stop(agent);
    busy.kill().ok();
    busy.wait().ok();
    receiver.kill().ok();
    receiver.wait().ok();
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");

    let (mut total, mut with) = (0i64, std::collections::HashMap::<&str, i64>::new());
    let (mut leaf_burn, mut leaf_loop, mut checked) = (0, 0, 0);
    for p in &profiles {
        let attrs = &p["attributes"];
        assert_eq!(attrs["service.name"], "workload", "{attrs}");
        assert_eq!(attrs["process.runtime.version"], "3.12.1", "{attrs}");
        assert_eq!(p["sample_type"], serde_json::json!(["samples", "count"]));
        assert_eq!(p["period_type"], serde_json::json!(["cpu", "nanoseconds"]));
        assert_eq!(p["period"], 1_000_000_000 / 99);
        // Samples x period is the CPU time /proc saw in the profile's time window (for
        // windows the readings cover; the first one starts before the process was found).
        let samples: i64 =
            p["samples"].as_array().unwrap().iter().map(|s| s["values"][0].as_i64().unwrap()).sum();
        let start = p["time_unix_nano"].as_f64().unwrap() / 1e9;
        let end = start + p["duration_nano"].as_f64().unwrap() / 1e9;
        if let (Some(c0), Some(c1)) = (cpu_at(&cpu_readings, start), cpu_at(&cpu_readings, end)) {
            let profiled = samples as f64 * p["period"].as_f64().unwrap() / 1e9;
            assert!(
                (profiled - (c1 - c0)).abs() <= 0.15 * (c1 - c0) + 0.05,
                "{samples} samples ({profiled:.2} s) in a window where /proc counted {:.2} s",
                c1 - c0
            );
            checked += 1;
        }
        for s in p["samples"].as_array().unwrap() {
            let n = s["values"][0].as_i64().unwrap();
            let stack = s["stack"].as_array().unwrap();
            total += n;
            let leaf = &stack[0];
            if leaf["function"] == "burn" {
                assert_eq!(leaf["file"], "workload.py", "{leaf}");
                assert_eq!(leaf["type"], "cpython", "{leaf}");
                leaf_burn += n;
                if leaf["line"] == workload_line("burn_loop") as i64 {
                    leaf_loop += n;
                }
            }
            for f in ["func_a", "func_b", "func_c"] {
                if let Some(frame) = stack.iter().find(|fr| fr["function"] == f) {
                    assert_eq!(frame["line"], workload_line(f) as i64, "{frame}");
                    *with.entry(f).or_default() += n;
                }
            }
        }
    }
    assert!(leaf_burn as f64 > 0.8 * total as f64, "burn is the leaf of {leaf_burn} of {total} samples");
    assert!(checked >= 1, "no profile's window was covered by the /proc readings");
    // The loop's body line dominates (the `for` line gets the rest).
    assert!(
        leaf_loop * 2 > leaf_burn,
        "burn's loop body is the leaf line of {leaf_loop} of {leaf_burn} samples"
    );
    for (f, share) in [("func_a", 0.5), ("func_b", 0.3), ("func_c", 0.2)] {
        let got = *with.get(f).unwrap_or(&0) as f64 / total as f64;
        assert!((got - share).abs() < 0.1, "{f}: {got:.2} of the samples, expected about {share}");
    }
}

/// CPU seconds at wall-clock time `t`, interpolated between (time, cpu) readings.
fn cpu_at(readings: &[(f64, f64)], t: f64) -> Option<f64> {
    let after = readings.iter().position(|&(time, _)| time >= t)?;
    let (t1, c1) = readings[after];
    let (t0, c0) = *readings.get(after.checked_sub(1)?)?;
    Some(c0 + (c1 - c0) * (t - t0) / (t1 - t0).max(1e-9))
}
