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
    let config = agent_config(
        &dir,
        http,
        "export_interval: 1s
",
    );
    let agent = agent(&config, otlp);
    wait_ready(http);
    thread::sleep(Duration::from_secs(3));
    let (c1, t1) = (cpu_seconds(busy.id()), Instant::now());
    thread::sleep(Duration::from_secs(4));
    let (c2, t2) = (cpu_seconds(busy.id()), Instant::now());
    let (_, text) = http_get(http, "/metrics").expect("scrape /metrics");
    let status = stop(agent);
    busy.kill().ok();
    busy.wait().ok();
    thread::sleep(Duration::from_millis(500));
    let mut receiver = receiver;
    receiver.kill().ok();
    receiver.wait().ok();
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");

    let pid = format!("process_pid=\"{}\"", busy.id());
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let measured = (c2 - c1) / (t2 - t1).as_secs_f64() / cpus;
    let reported =
        metric_value(&text, "process_cpu_utilization_ratio", &pid).expect("utilization of the busy process");
    eprintln!("utilization: agent {reported:.3}, /proc {measured:.3}");
    assert!((reported - measured).abs() <= 0.1 * measured, "agent {reported:.3} vs /proc {measured:.3}");
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
    let agent = Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .spawn()
        .unwrap();
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

/// An agent killed when dropped, so a failed assertion leaves none running.
struct Running(Option<Child>);

impl Running {
    fn stop(mut self) -> std::process::ExitStatus {
        stop(self.0.take().unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Runs the agent with `config` and no OTLP endpoint; its stderr goes to `stderr`.
fn agent_logging_to(config: &std::path::Path, stderr: &std::path::Path) -> Running {
    let child = Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("NODE_NAME")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    Running(Some(child))
}

/// A CPython 3.12 process busy for 90 s in `pod`'s container cgroup.
fn busy_in(node: &mut common::k8s::Node, pod: &common::k8s::FakePod, dir: &std::path::Path) -> u32 {
    let (workload, out) = (workload(), dir.join(format!("{}.json", pod.name)));
    let args = [workload.to_str().unwrap(), "shares", "90", out.to_str().unwrap()];
    node.run_in(pod, &python("3.12.1"), &args)
}

/// The `process_cpu_time_seconds_total` line of process `pid` on /metrics, once there.
fn cpu_line(text: &str, pid: u32) -> Option<String> {
    let pid = format!("process_pid=\"{pid}\"");
    text.lines()
        .find(|l| l.starts_with("process_cpu_time_seconds_total{") && l.contains(&pid))
        .map(String::from)
}

/// Polls /metrics until `until` holds for it.
fn wait_metrics(http: u16, what: &str, until: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let text = http_get(http, "/metrics").map(|(_, t)| t).unwrap_or_default();
        if until(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}; last /metrics:\n{text}");
        thread::sleep(Duration::from_millis(250));
    }
}

/// Kubernetes without a cluster: two busy CPython processes in kubelet-shaped cgroup v2
/// hierarchies (systemd and cgroupfs drivers), this node's PodList from a stand-in API
/// server that checks the field selector and the bearer token. The pods are listed only
/// after the processes started, and the periodic refresh is 10 minutes away, so the
/// process in the selected namespace is picked up by the refresh its unknown pod asks
/// for; it is exported with its pod's k8s.* attributes and its container's name as
/// service.name, and the same container in another namespace is never exported.
#[test]
fn agent_selects_kubernetes_pods() {
    require_root();
    use common::k8s::*;
    let dir = scratch("k8s");
    let (api_port, http) = (free_port(), free_port());
    let mut shop = FakePod::new(1, "shop", "checkout-7d9f8b6c5-x2x7q", "web", true);
    shop.labels = &[("app", "checkout"), ("pod-template-hash", "7d9f8b6c5")];
    let mut batch = FakePod::new(2, "batch", "report-28591", "web", false);
    batch.labels = &[("app", "checkout")];
    let api = ApiServer::start(&dir, api_port, &pod_list(&[]));
    let mut node = Node::new();
    let selected = busy_in(&mut node, &shop, &dir);
    let other = busy_in(&mut node, &batch, &dir);
    let config = agent_config(
        &dir,
        http,
        &format!(
            "export_interval: 1s
select:
  namespaces: [shop]
  pod_labels: {{app: checkout}}
  containers: [web]
kubernetes:
  enabled: true
  api_url: {}
  token_path: {}
  node_name: test-node
  refresh_interval: 10m
",
            api.url,
            api.token.display()
        ),
    );
    let log = dir.join("agent.log");
    let agent = agent_logging_to(&config, &log);
    wait_ready(http);
    // The agent has listed the (still empty) pods; now the pods "start".
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.requests().is_empty() {
        assert!(Instant::now() < deadline, "the agent never listed the pods");
        thread::sleep(Duration::from_millis(100));
    }
    api.set_pods(&pod_list(&[&shop, &batch]));
    let text = wait_metrics(http, "the process in namespace shop was not exported", |t| {
        cpu_line(t, selected).is_some()
    });
    // A few more intervals: the other namespace's process stays out.
    thread::sleep(Duration::from_secs(3));
    let (_, later) = http_get(http, "/metrics").unwrap();
    let status = agent.stop();
    let requests = api.requests();
    drop(node);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}\n{stderr}");

    let line = cpu_line(&text, selected).unwrap();
    for attr in [
        "k8s_namespace_name=\"shop\"".to_string(),
        format!("k8s_pod_name=\"{}\"", shop.name),
        format!("k8s_pod_uid=\"{}\"", shop.uid),
        "k8s_container_name=\"web\"".into(),
        "k8s_node_name=\"test-node\"".into(),
        "service_name=\"web\"".into(),
        format!("container_id=\"{}\"", shop.container_id),
    ] {
        assert!(line.contains(&attr), "missing {attr} in {line}");
    }
    for t in [&text, &later] {
        assert!(cpu_line(t, other).is_none(), "pid {other} in namespace batch was exported:\n{t}");
        assert!(!t.contains("k8s_namespace_name=\"batch\""), "namespace batch was exported:\n{t}");
    }
    assert!(requests.len() >= 2, "expected the initial list and one asked for by the new pod: {requests:?}");
    assert!(requests.iter().all(|r| r == "ok"), "the agent's requests were refused: {requests:?}");
    assert!(!stderr.contains("WARN"), "unexpected warnings: {stderr}");
}

/// Without selectors every process is sampled; one whose pod is listed only later gets
/// its k8s.* attributes then. An API server that refuses the token is warned about once
/// and the agent keeps sampling.
#[test]
fn agent_names_pods_listed_late_and_survives_a_refusing_api_server() {
    require_root();
    use common::k8s::*;
    let dir = scratch("k8s-late");
    let (api_port, http) = (free_port(), free_port());
    let pod = FakePod::new(3, "shop", "cart-5c4b3a2d1-abcde", "cart", true);
    let api = ApiServer::start(&dir, api_port, &pod_list(&[]));
    let mut node = Node::new();
    let pid = busy_in(&mut node, &pod, &dir);
    let bad_token = dir.join("bad-token");
    std::fs::write(&bad_token, "expired").unwrap();
    let config = agent_config(
        &dir,
        http,
        &format!(
            "export_interval: 1s
kubernetes:
  api_url: {}
  token_path: {}
  node_name: test-node
  refresh_interval: 2s
",
            api.url,
            bad_token.display()
        ),
    );
    let log = dir.join("agent.log");
    let agent = agent_logging_to(&config, &log);
    wait_ready(http);
    let unnamed = wait_metrics(http, "the process was not exported while the API server refused", |t| {
        cpu_line(t, pid).is_some()
    });
    // Refused (401) at least twice, but warned about once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.requests().iter().filter(|r| r.starts_with("authorization")).count() < 2 {
        assert!(Instant::now() < deadline, "the agent did not retry: {:?}", api.requests());
        thread::sleep(Duration::from_millis(100));
    }
    // The token rotates to a good one, and the pod gets listed.
    std::fs::write(&bad_token, "test-token").unwrap();
    api.set_pods(&pod_list(&[&pod]));
    let named = wait_metrics(http, "the process never got its pod's attributes", |t| {
        cpu_line(t, pid).is_some_and(|l| l.contains("k8s_pod_name="))
    });
    let status = agent.stop();
    drop(node);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}\n{stderr}");

    let before = cpu_line(&unnamed, pid).unwrap();
    assert!(!before.contains("k8s_pod_name"), "{before}");
    assert!(before.contains("service_name=\"workload\""), "{before}");
    let after = cpu_line(&named, pid).unwrap();
    for attr in [
        format!("k8s_pod_name=\"{}\"", pod.name),
        "k8s_namespace_name=\"shop\"".into(),
        "k8s_container_name=\"cart\"".into(),
        "service_name=\"cart\"".into(),
    ] {
        assert!(after.contains(&attr), "missing {attr} in {after}");
    }
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    let refused: Vec<&&str> = warnings.iter().filter(|l| l.contains("answered 401")).collect();
    assert_eq!(refused.len(), 1, "expected one warning about the refusal: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The API server is verified against the cluster CA (`kubernetes.ca_path`): with the
/// CA that signed its certificate the agent lists the pods over HTTPS; with another CA
/// it refuses the server, warns once and keeps running.
#[test]
fn agent_verifies_the_api_server_with_the_cluster_ca() {
    require_root();
    use common::k8s::*;
    let dir = scratch("k8s-tls");
    let (ca, cert, key) = cluster_ca(&dir, "cluster");
    let (other_ca, _, _) = cluster_ca(&dir, "other");
    let api = ApiServer::start_tls(&dir, free_port(), &pod_list(&[]), (&cert, &key));
    let ok_requests = || api.requests().iter().filter(|r| *r == "ok").count();
    for (trusted, ca) in [(true, &ca), (false, &other_ca)] {
        let run = dir.join(if trusted { "trusted" } else { "untrusted" });
        std::fs::create_dir_all(&run).unwrap();
        let http = free_port();
        let config = agent_config(
            &run,
            http,
            &format!(
                "kubernetes:\n  api_url: {}\n  token_path: {}\n  ca_path: {}\n  node_name: test-node\n",
                api.url,
                api.token.display(),
                ca.display()
            ),
        );
        let log = run.join("agent.log");
        let before = ok_requests();
        let agent = agent_logging_to(&config, &log);
        wait_ready(http);
        let deadline = Instant::now() + Duration::from_secs(20);
        let stderr = loop {
            let stderr = std::fs::read_to_string(&log).unwrap();
            if (trusted && ok_requests() > before) || (!trusted && stderr.contains("WARN")) {
                break stderr;
            }
            assert!(Instant::now() < deadline, "trusted={trusted}: no list and no warning: {stderr}");
            thread::sleep(Duration::from_millis(100));
        };
        let status = agent.stop();
        assert!(status.success(), "{status}: {stderr}");
        if trusted {
            assert!(!stderr.contains("WARN"), "{stderr}");
        } else {
            assert_eq!(ok_requests(), before, "a server the CA did not sign was trusted");
            let warning = stderr.lines().find(|l| l.contains("WARN")).unwrap();
            assert!(
                warning.contains("cannot list pods from the Kubernetes API server at https://127.0.0.1:"),
                "{warning}"
            );
        }
    }
}
