//! End-to-end test of the agent's network metrics and request spans: a real Python HTTP
//! server and client, the real kernel programs, an OTLP receiver on the official
//! opentelemetry-proto package, and the Prometheus endpoint. Run as root.
mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{agent::*, net::*, *};
use serde_json::Value;

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

/// Waits until the agent exports process `pid` (then it is watched).
fn wait_exported(http: u16, pid: u32, what: &str) {
    let label = format!("process_pid=\"{pid}\"");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(http, "/metrics").is_some_and(|(_, t)| t.contains(&label)) {
        assert!(Instant::now() < deadline, "the agent did not pick up the {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts a histogram's sum (seconds, as exported) is the sum of the durations the
/// process measured itself: inside the range its brackets allow (a sum carries no
/// bucket error; 1 ns for the conversion to a double).
fn assert_sum(what: &str, point: &Value, own: &[Timed]) {
    let sum = point["sum"].as_f64().unwrap();
    let (lo, hi) = sum_range_s(&own.iter().collect::<Vec<_>>());
    eprintln!("{what}: sum {sum:.6} s, the process's own {lo:.6}..{hi:.6} s");
    assert!((lo - 1e-9..=hi + 1e-9).contains(&sum), "{what}: sum {sum} s, the process's own {lo}..{hi} s");
}

/// A watched ThreadingHTTPServer and a watched client: the server's and the client's
/// request counts are exact in `http.server.request.duration` and
/// `http.client.request.duration` (with route, method, status, server address and port)
/// and their sums are the durations each process measured itself; every request the
/// server measured over the span threshold, and none it measured under it, arrives as a
/// SERVER span with the process's resource and that request's duration; the Prometheus
/// endpoint carries the same histograms. A second server, with Nagle's algorithm on, has its
/// stalls exported by cause.
#[test]
fn agent_exports_request_metrics_and_spans() {
    require_root();
    let began = Instant::now();
    let dir = scratch("agent-net");
    let (otlp, http) = (free_port(), free_port());
    let mut receiver = otlp_receiver("http", otlp, &dir);
    let mut server = Command::new(python("3.12.1"))
        .args([net_fixture("http_server.py").to_str().unwrap(), "--timings"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let server_lines = Lines::of(&mut server);
    let port = server_lines.next("server port", Duration::from_secs(10)).trim().to_string();
    let spans = "network:\n  spans:\n    sample_ratio: 0\n    slow_threshold: 40ms\n";
    let slow_ns = 40_000_000;
    let config = agent_config(&dir, http, &format!("export_interval: 1s\n{spans}"));
    let agent = Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .spawn()
        .unwrap();
    wait_ready(http);
    wait_exported(http, server.id(), "server");
    // 30 fast and 10 slow requests on 2 keep-alive connections, sent once the agent
    // watches the client (it waits for a line on stdin).
    let paths: Vec<String> =
        (0..30).map(|_| "/sleep/5".to_string()).chain((0..10).map(|_| "/sleep/60".into())).collect();
    let plan = serde_json::json!({ "connections": 2, "paths": paths, "wait": true }).to_string();
    let mut client = Command::new(python("3.12.1"))
        .args([net_fixture("http_client.py").to_str().unwrap(), &port, &plan])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let client_pid = client.id();
    wait_exported(http, client_pid, "client");
    writeln!(client.stdin.take().unwrap(), "go").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "the client failed");
    let client_own = Timed::list(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(client_own.len(), 80);
    let server_own = server_lines.timings(80);

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
    // A server with Nagle's algorithm on, called by http.client: a stall per request whose
    // body the caller waited for 20 ms or more (`body_reads`), named nagle-delayed-ack.
    let mut nagle = Command::new(python("3.12.1"))
        .args([net_fixture("http_server.py").to_str().unwrap(), "--nagle"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let nagle_port = Lines::of(&mut nagle).next("server port", Duration::from_secs(10)).trim().to_string();
    wait_exported(http, nagle.id(), "Nagle server");
    let plan = serde_json::json!([{"port": nagle_port.parse::<u16>().unwrap(), "path": "/sleep/5", "count": 10, "how": "http.client"}]);
    let out = Command::new(python("3.12.1"))
        .args([net_fixture("caller_client.py").to_str().unwrap(), &plan.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "the caller failed");
    let caller: Value = serde_json::from_slice(&out.stdout).unwrap();
    let stalled = caller["body_reads"][0]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w.as_u64().unwrap() >= 20_000_000)
        .count();
    let nagle_cause = |p: &Value| p["attributes"]["stoker.stall.cause"] == "nagle-delayed-ack";
    let stall = loop {
        let metrics = ndjson(&metrics_path);
        let point = last_point(&metrics, nagle.id(), "stoker.net.stall.duration", nagle_cause).cloned();
        if let Some(p) = &point
            && p["count"] == stalled
        {
            break p.clone();
        }
        assert!(Instant::now() < deadline + Duration::from_secs(20), "{stalled} stalls expected: {point:?}");
        thread::sleep(Duration::from_millis(200));
    };
    let (_, text) = http_get(http, "/metrics").unwrap();
    let status = stop(agent);
    let traces = ndjson(&dir.join("traces.ndjson"));
    kill(&mut [&mut receiver, &mut server, &mut nagle]);
    assert!(status.success());
    assert!(stalled >= 5, "the caller waited for {stalled} of 10 bodies");
    assert_eq!(stall["attributes"]["http.route"], "/sleep/{id}", "{stall}");
    // The server with Nagle off has none.
    let metrics = ndjson(&metrics_path);
    assert!(last_point(&metrics, server.id(), "stoker.net.stall.duration", |_| true).is_none());

    assert_eq!(server_point["attributes"]["http.request.method"], "GET");
    assert_eq!(server_point["attributes"]["http.response.status_code"], 200);
    assert_eq!(client_point["attributes"]["server.address"], "127.0.0.1");
    assert_eq!(client_point["attributes"]["server.port"].to_string(), port);
    assert_eq!(
        server_point["buckets"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).sum::<u64>(),
        80
    );
    assert_sum("http.server.request.duration", &server_point, &server_own);
    assert_sum("http.client.request.duration", &client_point, &client_own);
    // Beside each request: the client's time to first byte (no longer than its request),
    // the server's socket queue per route, and each accepted connection's accept queue.
    let metrics = ndjson(&metrics_path);
    let ttfb =
        last_point(&metrics, client_pid, "stoker.net.client.ttfb", |_| true).expect("a ttfb histogram");
    assert_eq!(ttfb["count"], 80, "{ttfb}");
    assert!(ttfb["sum"].as_f64().unwrap() <= client_point["sum"].as_f64().unwrap(), "{ttfb}");
    let queue = last_point(&metrics, server.id(), "stoker.http.server.queue.duration", route)
        .expect("a queue histogram");
    assert_eq!(queue["count"], 80, "{queue}");
    let accept = last_point(&metrics, server.id(), "stoker.tcp.accept.queue.duration", |_| true)
        .expect("an accept histogram");
    assert_eq!(accept["count"], 2, "two connections: {accept}");
    let server_pid = format!("process_pid=\"{}\"", server.id());
    let bucket = format!("http_server_request_duration_seconds_bucket{{{}", "");
    let prom: Vec<&str> =
        text.lines().filter(|l| l.starts_with(&bucket) && l.contains(&server_pid)).collect();
    assert!(prom.iter().any(|l| l.contains("le=\"+Inf\"") && l.ends_with(" 80")), "{prom:#?}");

    // Spans carry wall-clock times: back to the monotonic clock with this process's own
    // offset. The agent read its offset at an export since `began`; the two differ by at
    // most what the kernel may slew the wall clock in that time (500 ppm).
    let (m0, real, m1) = (monotonic_ns(), unix_ns(), monotonic_ns());
    let slew = (began.elapsed().as_nanos() as f64 * 500e-6) as i128 + (m1 - m0);
    let to_mono = |unix: i128| unix - (real - m0);
    let spans: Vec<&Value> = traces.iter().flat_map(|t| t["spans"].as_array().unwrap().iter()).collect();
    let server_pid_attr = server.id().to_string();
    let slow: Vec<&&Value> =
        spans.iter().filter(|s| s["resource"]["process.pid"] == server_pid_attr.as_str()).collect();
    let mut matched = vec![false; server_own.len()];
    for s in &slow {
        assert_eq!(s["name"], "GET /sleep/{id}");
        assert_eq!(s["kind"], "SPAN_KIND_SERVER");
        assert_eq!(s["attributes"]["http.response.status_code"], 200);
        // Sizes on the wire, head and body, under the conventions' names for them.
        for size in ["http.request.size", "http.response.size"] {
            assert!(!s["attributes"][size].is_null(), "{size}: {s}");
        }
        assert_eq!(s["resource"]["service.name"], "http_server");
        let ns = |k: &str| s[k].as_str().unwrap().parse::<i128>().unwrap();
        let (start, end) = (ns("start_time_unix_nano"), ns("end_time_unix_nano"));
        let client_port = &s["attributes"]["client.port"];
        let client_port = client_port.as_str().map(|p| p.parse().unwrap()).or(client_port.as_u64()).unwrap();
        // The request of that connection that started nearest the span.
        let (i, own) = server_own
            .iter()
            .enumerate()
            .filter(|(_, t)| u64::from(t.port) == client_port)
            .min_by_key(|(_, t)| (i128::from(t.start[0]) - to_mono(start)).abs())
            .unwrap_or_else(|| panic!("the server timed no request from port {client_port}"));
        assert!(!matched[i], "two spans for one request: {s}");
        matched[i] = true;
        let d = (end - start) as u64;
        eprintln!(
            "span of {:.3} ms, the server's own {:.3}..{:.3} ms; start {} ns after the server's bracket opened",
            d as f64 / 1e6,
            own.min_ns() as f64 / 1e6,
            own.max_ns() as f64 / 1e6,
            to_mono(start) - i128::from(own.start[0])
        );
        assert!(
            (own.min_ns()..=own.max_ns()).contains(&d),
            "span of {d} ns, the server measured {}..{} ns for that request",
            own.min_ns(),
            own.max_ns()
        );
        let (lo, hi) = (i128::from(own.start[0]) - slew, i128::from(own.start[1]) + slew);
        assert!(
            (lo..=hi).contains(&to_mono(start)),
            "span start {} ns from the server's own {:?} (allowing {slew} ns of clock slew): wall-clock conversion",
            to_mono(start) - i128::from(own.start[0]),
            own.start
        );
    }
    for (t, spanned) in server_own.iter().zip(&matched) {
        if t.min_ns() >= slow_ns {
            assert!(spanned, "a request the server measured over 40 ms has no span: {t:?}");
        }
        if *spanned {
            assert!(t.max_ns() >= slow_ns, "a request the server measured under 40 ms is a span: {t:?}");
        }
    }
}

/// The wall clock now, in ns since the Unix epoch.
fn unix_ns() -> i128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128
}

/// Every byte string in a `bpftool -j map dump`: each array of "0x.." strings, in order.
fn dumped_bytes(v: &Value, out: &mut Vec<Vec<u8>>) {
    match v {
        Value::Array(items)
            if !items.is_empty() && items.iter().all(|i| i.as_str().is_some_and(|s| s.starts_with("0x"))) =>
        {
            out.push(items.iter().filter_map(|i| u8::from_str_radix(&i.as_str()?[2..], 16).ok()).collect());
        }
        Value::Array(items) => items.iter().for_each(|i| dumped_bytes(i, out)),
        Value::Object(fields) => fields.values().for_each(|f| dumped_bytes(f, out)),
        _ => {}
    }
}

/// Which of `needles` some BPF map on the machine holds, as root sees them with bpftool.
fn in_bpf_maps(needles: &[&str]) -> Vec<String> {
    let list =
        Command::new("bpftool").args(["-j", "map", "show"]).output().expect("bpftool (cargo xtask setup)");
    let maps: Value = serde_json::from_slice(&list.stdout).unwrap();
    let mut found = Vec::new();
    for map in maps.as_array().unwrap() {
        let id = map["id"].as_u64().unwrap().to_string();
        let dump = Command::new("bpftool").args(["-j", "map", "dump", "id", &id]).output().unwrap();
        let Ok(dump) = serde_json::from_slice::<Value>(&dump.stdout) else { continue };
        let mut bytes = Vec::new();
        dumped_bytes(&dump, &mut bytes);
        for needle in needles {
            if bytes.iter().any(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())) {
                found.push(format!("{needle} in map {id} ({})", map["name"]));
            }
        }
    }
    found
}

/// Once a request is reported, its raw bytes (path, query string) are in no BPF map that
/// root could dump: not in the peek buffer, the connection's state or the event ring.
#[test]
fn no_request_bytes_stay_in_kernel_maps() {
    require_root();
    let dir = scratch("agent-net-private");
    let http = free_port();
    let mut server = Command::new(python("3.12.1"))
        .arg(net_fixture("http_server.py"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let port: u16 =
        Lines::of(&mut server).next("server port", Duration::from_secs(10)).trim().parse().unwrap();
    let config = agent_config(&dir, http, "export_interval: 1s\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    wait_exported(http, server.id(), "server");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /SecretPathWord/sleep/1?token=QueryValueWord HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(s);
    // Reported: the route is on /metrics (the event was read from the ring).
    let route = "http_route=\"/SecretPathWord/sleep/{id}\"";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(http, "/metrics").is_some_and(|(_, t)| t.contains(route)) {
        assert!(Instant::now() < deadline, "the request was not reported");
        thread::sleep(Duration::from_millis(50));
    }
    let found = in_bpf_maps(&["SecretPathWord", "QueryValueWord"]);
    let status = stop(agent);
    let _ = server.kill();
    let _ = server.wait();
    assert!(status.success());
    assert!(found.is_empty(), "request bytes left in kernel maps: {found:?}");
}
