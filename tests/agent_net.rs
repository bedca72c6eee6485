//! End-to-end test of the agent's network metrics and request spans: a real Python HTTP
//! server and client, the real kernel programs, an OTLP receiver on the official
//! opentelemetry-proto package, and the Prometheus endpoint. Run as root.
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{agent::*, *};
use serde_json::Value;

fn net_fixture(name: &str) -> String {
    format!("{}/../tests/fixtures/net/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The last data point of `metric` under the resource of process `pid` matching `pred`.
fn last_point<'a>(
    metrics: &'a [Value],
    pid: u32,
    metric: &str,
    pred: impl Fn(&Value) -> bool,
) -> Option<&'a Value> {
    let pid = pid.to_string();
    metrics
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap().iter())
        .filter(|r| r["attributes"]["process.pid"] == pid.as_str())
        .flat_map(|r| r["data"].as_array().unwrap().iter())
        .filter(|m| m["name"] == metric)
        .flat_map(|m| m["points"].as_array().unwrap().iter())
        .filter(|p| pred(p))
        .last()
}

/// A watched ThreadingHTTPServer and a watched client: the server's and the client's
/// request counts are exact in `http.server.request.duration` and
/// `http.client.request.duration` (with route, method, status, server address and port),
/// their mean latency matches the client's own; every request slower than the span
/// threshold arrives as a SERVER span with the process's resource, and the Prometheus
/// endpoint carries the same histograms.
#[test]
fn agent_exports_request_metrics_and_spans() {
    require_root();
    let dir = scratch("agent-net");
    let (otlp, http) = (free_port(), free_port());
    let mut receiver = otlp_receiver("http", otlp, &dir);
    let mut server = Command::new(python("3.12.1"))
        .arg(net_fixture("http_server.py"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut port).unwrap();
    let port = port.trim().to_string();
    let spans = "network:\n  spans:\n    sample_ratio: 0\n    slow_threshold: 40ms\n";
    let config = agent_config(&dir, http, &format!("export_interval: 1s\n{spans}"));
    let agent = Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .spawn()
        .unwrap();
    wait_ready(http);
    // The server is watched once the agent exports it.
    let server_pid = format!("process_pid=\"{}\"", server.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(http, "/metrics").is_some_and(|(_, t)| t.contains(&server_pid)) {
        assert!(Instant::now() < deadline, "the agent did not pick up the server");
        thread::sleep(Duration::from_millis(100));
    }
    // 30 fast and 10 slow requests on 2 keep-alive connections; the client waits a second
    // so that the agent watches it before it connects.
    let paths: Vec<String> =
        (0..30).map(|_| "/sleep/5".to_string()).chain((0..10).map(|_| "/sleep/60".into())).collect();
    let plan = serde_json::json!({ "connections": 2, "paths": paths, "start_delay": 1.0 }).to_string();
    let client = Command::new(python("3.12.1"))
        .args([&net_fixture("http_client.py"), &port, &plan])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let client_pid = client.id();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "the client failed");
    let timed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let client_mean = timed.iter().map(|t| t["seconds"].as_f64().unwrap()).sum::<f64>() / timed.len() as f64;

    let route = |p: &Value| p["attributes"]["http.route"] == "/sleep/{id}";
    let metrics_path = dir.join("metrics.ndjson");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (server_point, client_point) = loop {
        let metrics = ndjson(&metrics_path);
        let s = last_point(&metrics, server.id(), "http.server.request.duration", route).cloned();
        let c = last_point(&metrics, client_pid, "http.client.request.duration", |_| true).cloned();
        if let (Some(s), Some(c)) = (&s, &c)
            && s["count"] == 80
            && c["count"] == 80
        {
            break (s.clone(), c.clone());
        }
        assert!(Instant::now() < deadline, "request counts did not reach 80: server {s:?}, client {c:?}");
        thread::sleep(Duration::from_millis(200));
    };
    let (_, text) = http_get(http, "/metrics").unwrap();
    let status = stop(agent);
    let traces = ndjson(&dir.join("traces.ndjson"));
    kill(&mut [&mut receiver, &mut server]);
    assert!(status.success());

    assert_eq!(server_point["attributes"]["http.request.method"], "GET");
    assert_eq!(server_point["attributes"]["http.response.status_code"], 200);
    assert_eq!(client_point["attributes"]["server.address"], "127.0.0.1");
    assert_eq!(client_point["attributes"]["server.port"].to_string(), port);
    assert_eq!(
        server_point["buckets"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).sum::<u64>(),
        80
    );
    let server_mean = server_point["sum"].as_f64().unwrap() / 80.0;
    eprintln!("mean latency: server {server_mean:.4} s, client's own {client_mean:.4} s");
    assert!((server_mean - client_mean).abs() <= 0.05 * client_mean + 0.0005, "{server_point}");
    let bucket = format!("http_server_request_duration_seconds_bucket{{{}", "");
    let prom: Vec<&str> =
        text.lines().filter(|l| l.starts_with(&bucket) && l.contains(&server_pid)).collect();
    assert!(prom.iter().any(|l| l.contains("le=\"+Inf\"") && l.ends_with(" 80")), "{prom:#?}");

    let spans: Vec<&Value> = traces.iter().flat_map(|t| t["spans"].as_array().unwrap().iter()).collect();
    let server_pid_attr = server.id().to_string();
    let slow: Vec<&&Value> =
        spans.iter().filter(|s| s["resource"]["process.pid"] == server_pid_attr.as_str()).collect();
    assert_eq!(slow.len(), 20, "every request over 40 ms, and only those, is a span: {spans:#?}");
    for s in slow {
        assert_eq!(s["name"], "GET /sleep/{id}");
        assert_eq!(s["kind"], "SPAN_KIND_SERVER");
        assert_eq!(s["attributes"]["http.response.status_code"], 200);
        assert_eq!(s["resource"]["service.name"], "http_server");
        let ns = |k: &str| s[k].as_str().unwrap().parse::<u64>().unwrap();
        let ms = (ns("end_time_unix_nano") - ns("start_time_unix_nano")) as f64 / 1e6;
        assert!((60.0..70.0).contains(&ms), "span of {ms} ms");
        let age = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            - ns("end_time_unix_nano");
        assert!(age < 60_000_000_000, "span end {age} ns ago: wall-clock conversion");
    }
}
