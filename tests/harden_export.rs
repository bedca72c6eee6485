//! End-to-end tests of the exporter's limits against a real HTTP receiver on a real
//! socket: requests over the receiver's size limit, throttling, the queue's bounds.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::ResourceMetrics,
    resource::v1::Resource,
};
use prost::Message;
use stoker::node::export::{
    exporter::{Exporter, Limits},
    transport::Destination,
};

/// What the receiver took: each accepted request's service names, and when it came.
type Received = Arc<Mutex<Vec<(Instant, Vec<String>)>>>;

/// An OTLP/HTTP receiver refusing bodies over `limit` bytes with 413 (as a Collector
/// does), answering its first request with 503 and `Retry-After: 1`.
fn receiver(limit: usize) -> (u16, Received, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (received, refused): (Received, Arc<Mutex<usize>>) = Default::default();
    let (r, f) = (received.clone(), refused.clone());
    thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let answer = if n == 0 {
                "503 Service Unavailable\r\nRetry-After: 1"
            } else if length > limit {
                *f.lock().unwrap() += 1;
                "413 Payload Too Large"
            } else {
                let request = ExportMetricsServiceRequest::decode(&body[..]).unwrap();
                let names = request.resource_metrics.iter().map(service_name).collect();
                r.lock().unwrap().push((Instant::now(), names));
                "200 OK"
            };
            let _ = write!(stream, "HTTP/1.1 {answer}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, received, refused)
}

fn service_name(r: &ResourceMetrics) -> String {
    match &r.resource.as_ref().unwrap().attributes[0].value {
        Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) => s.clone(),
        other => panic!("expected a service.name string, got {other:?}"),
    }
}

/// A metrics request with one resource per (name, attribute padding).
fn request(resources: &[(&str, usize)]) -> ExportMetricsServiceRequest {
    let resource_metrics = resources
        .iter()
        .map(|&(name, pad)| {
            let value = format!("{name}{}", " ".repeat(pad));
            let attribute = KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.trim().into())) }),
                ..Default::default()
            };
            let padding = KeyValue {
                key: "padding".into(),
                value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }),
                ..Default::default()
            };
            let resource = Resource { attributes: vec![attribute, padding], ..Default::default() };
            ResourceMetrics { resource: Some(resource), ..Default::default() }
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

fn destination(port: u16) -> Destination {
    Destination::Http {
        url: format!("http://127.0.0.1:{port}/v1/metrics"),
        content_type: "application/x-protobuf",
        headers: Vec::new(),
        gzip: false,
        timeout: Duration::from_secs(5),
    }
}

/// A request over the receiver's limit arrives as several requests within it, each
/// resource once; a resource alone over the limit is dropped and counted, not retried;
/// the receiver's Retry-After is waited out.
#[test]
fn oversized_requests_are_split_by_resource() {
    let (port, received, refused) = receiver(2048);
    let limits = Limits { max_batches: 64, max_bytes: 1 << 20, max_request_bytes: Some(2048) };
    let exporter = Exporter::start(destination(port), limits).unwrap();
    let start = Instant::now();
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut resources: Vec<(&str, usize)> = names.iter().map(|n| (*n, 700)).collect();
    resources.push(("huge", 5000));
    exporter.push(&request(&resources));
    let stats = exporter.stats.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.sent.load(std::sync::atomic::Ordering::Relaxed) < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    exporter.shutdown(Duration::from_secs(2));
    let received = received.lock().unwrap();
    let mut got: Vec<String> = received.iter().flat_map(|(_, n)| n.clone()).collect();
    got.sort();
    assert_eq!(got, names, "every resource but the oversized one, once each; got {received:?}");
    assert!(
        received.len() >= 3,
        "expected at least 3 requests of at most 2 resources, got {}",
        received.len()
    );
    assert_eq!(*refused.lock().unwrap(), 0, "no request over the receiver's limit was sent");
    let first = received.iter().map(|(t, _)| *t).min().unwrap();
    assert!(
        first - start >= Duration::from_millis(950),
        "the first accepted request came {:?} after the 503 with Retry-After: 1",
        first - start
    );
    assert_eq!(
        stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the oversized resource is counted"
    );
}

/// A receiver that refuses everything as too large (413) gets each batch once: it is
/// dropped and counted, never retried.
#[test]
fn refused_requests_are_not_retried() {
    let (port, received, refused) = receiver(10);
    // The size limit is the receiver's only: stoker's own is larger.
    let limits = Limits { max_batches: 64, max_bytes: 1 << 20, max_request_bytes: Some(1 << 20) };
    let exporter = Exporter::start(destination(port), limits).unwrap();
    exporter.push(&request(&[("a", 100)]));
    exporter.push(&request(&[("b", 100)]));
    let stats = exporter.stats.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.dropped.load(std::sync::atomic::Ordering::Relaxed) < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    exporter.shutdown(Duration::from_secs(1));
    assert_eq!(*refused.lock().unwrap(), 2, "each refused batch sent once");
    assert!(received.lock().unwrap().is_empty());
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// Paths with an e-mail address, a user handle, a home directory and a JWT, served and
/// requested by a real CPython process watched by `stoker record --net`: the report shows
/// only their templates, ordinary routes unchanged, and none of the personal data.
#[test]
fn routes_hide_people_and_tokens() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test loads eBPF programs: run it as root");
    let script = r#"
import http.server, threading, urllib.request
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=s.serve_forever, daemon=True).start()
paths = ["/users/jane.doe@example.com/orders", "/@jane_doe/posts", "/~jane/files",
         "/verify/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJqYW5lIn0.c2lnbmF0dXJlMTIz",
         "/reset/Zk9aQmR4TnBxV2tLc0x0", "/api/v1/users", "/healthz"]
for _ in range(5):
    for p in paths:
        urllib.request.urlopen(f"http://127.0.0.1:{s.server_port}{p}").read()
s.shutdown()
"#;
    let dir = std::env::temp_dir().join(format!("stoker-routes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("routes.folded");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoker"))
        .args(["record", "--net", "-f", "folded", "-o", output.to_str().unwrap(), "--"])
        .args(["/usr/bin/python3.11", "-c", script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run stoker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stoker failed: {err}");
    let text = std::fs::read_to_string(dir.join("routes.net.json")).expect("the network report");
    let report: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");
    let mut routes: Vec<&str> = report["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| e["direction"] == "server")
        .filter_map(|e| e["route"].as_str())
        .collect();
    routes.sort();
    routes.dedup();
    let expected = [
        "/users/{id}/orders",
        "/{id}/posts",
        "/{id}/files",
        "/verify/{id}",
        "/reset/{id}",
        "/api/v1/users",
        "/healthz",
    ];
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(routes, expected, "server routes in {text}");
    for secret in ["jane", "@", "eyJ", "Zk9aQmR4"] {
        assert!(!text.contains(secret), "`{secret}` leaked into the network report: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The grpcio OTLP receiver of the other tests (official opentelemetry-proto servicer),
/// refusing messages over `max_receive` bytes; returns once it listens.
fn grpc_receiver(max_receive: usize, dir: &std::path::Path) -> (std::process::Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/otlp_receiver.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .args(["grpc", &port.to_string(), dir.to_str().unwrap(), &max_receive.to_string()])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the OTLP receiver exited ({status}): it needs grpcio and opentelemetry-proto");
        }
        assert!(Instant::now() < deadline, "the OTLP receiver did not listen on {port} within 20 s");
        thread::sleep(Duration::from_millis(100));
    }
    (child, port)
}

fn grpc_metrics(port: u16) -> Destination {
    Destination::Grpc {
        url: format!("http://127.0.0.1:{port}"),
        path: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        headers: Vec::new(),
        gzip: false,
        timeout: Duration::from_secs(5),
    }
}

/// Waits until `done` holds or 20 s pass.
fn wait_for(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
}

/// Over gRPC, against grpcio's own size limit: a request split to the limit is received
/// whole (every resource once); one over it is refused with RESOURCE_EXHAUSTED without
/// RetryInfo, which is final: sent once, dropped and counted, not retried.
#[test]
fn grpc_size_limit_is_respected_and_not_retried() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = std::env::temp_dir().join(format!("stoker-grpc-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut receiver, port) = grpc_receiver(4096, &dir);
    let names = ["a", "b", "c", "d", "e", "f"];
    let resources: Vec<(&str, usize)> = names.iter().map(|n| (*n, 900)).collect();
    let body = request(&resources);
    assert!(body.encoded_len() > 4096, "the request must be over the receiver's limit");

    let split = Limits { max_batches: 64, max_bytes: 1 << 20, max_request_bytes: Some(4096) };
    let exporter = Exporter::start(grpc_metrics(port), split).unwrap();
    exporter.push(&body);
    let stats = exporter.stats.clone();
    wait_for(|| stats.sent.load(Relaxed) + stats.dropped.load(Relaxed) >= 2);
    exporter.shutdown(Duration::from_secs(2));
    let text = std::fs::read_to_string(dir.join("metrics.ndjson")).unwrap_or_default();
    let mut got: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("an ndjson line"))
        .flat_map(|r| r["resources"].as_array().unwrap().clone())
        .map(|r| r["attributes"]["service.name"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, names, "every resource once; received {text}");
    assert_eq!((stats.dropped.load(Relaxed), stats.failures.load(Relaxed)), (0, 0));

    let whole = Limits { max_batches: 64, max_bytes: 1 << 20, max_request_bytes: Some(1 << 20) };
    let exporter = Exporter::start(grpc_metrics(port), whole).unwrap();
    exporter.push(&body);
    let stats = exporter.stats.clone();
    wait_for(|| stats.dropped.load(Relaxed) >= 1);
    thread::sleep(Duration::from_secs(2));
    let counts = (stats.failures.load(Relaxed), stats.dropped.load(Relaxed), stats.sent.load(Relaxed));
    exporter.shutdown(Duration::from_secs(1));
    let _ = receiver.kill();
    let _ = receiver.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(counts, (1, 1, 0), "(failures, dropped, sent): one refused attempt, no retry");
}
