//! End-to-end tests of the agent's Kubernetes pod lookup and selectors, on kubelet-shaped
//! cgroups and a stand-in API server (there is no cluster). Run as root.
mod common;

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{agent::*, *};

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
    // Three more exports (the selected process's CPU time grows at each): the other
    // namespace's process stays out of every one.
    let cpu_of_selected =
        |t: &str| metric_value(t, "process_cpu_time_seconds_total", &format!("process_pid=\"{selected}\""));
    let mut exports = vec![text.clone()];
    while exports.len() < 4 {
        let last = cpu_of_selected(exports.last().unwrap());
        exports.push(wait_metrics(http, "no further export", |t| cpu_of_selected(t) != last));
    }
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
    for t in &exports {
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

/// A process in a pod whose spec requests 1.5 CPUs and 512 MiB (limits 2 CPUs, 1 GiB)
/// and uses about 0.2 CPUs and 80 MiB: the agent reads the requests and limits from the
/// pod spec it lists (this node's cgroup v2 has no cpu or memory controller, so the spec
/// is the only source), exports them as `k8s.container.*`, and advises lower requests
/// from what the process used: CPU against the process's own CPU time (the kernel's
/// accounting, read by the test over the same stretch), memory against its resident set.
/// The recommendations carry the pod's k8s.* attributes.
#[test]
fn agent_advises_requests_from_the_pod_spec() {
    require_root();
    use common::k8s::*;
    use serde_json::Value;
    let dir = scratch("k8s-advice");
    let (api_port, http) = (free_port(), free_port());
    let mut pod = FakePod::new(4, "shop", "search-6b5a4c3d2-q1w2e", "search", true);
    pod.resources = serde_json::json!({
        "requests": {"cpu": "1500m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "1Gi"},
    });
    let api = ApiServer::start(&dir, api_port, &pod_list(&[&pod]));
    let mut node = Node::new();
    // 20 ms of CPU every 100 ms, beside 64 MiB of touched memory.
    let script = "import time\nballast = bytearray(b'x' * (64 << 20))\nwhile True:\n    end = time.process_time() + 0.02\n    while time.process_time() < end:\n        pass\n    time.sleep(0.08)\n";
    let pid = node.run_in(&pod, &python("3.12.1"), &["-c", script]);
    let config = agent_config(
        &dir,
        http,
        &format!(
            "export_interval: 1s
advice:
  window: 60s
kubernetes:
  api_url: {}
  token_path: {}
  node_name: test-node
",
            api.url,
            api.token.display()
        ),
    );
    let log = dir.join("agent.log");
    let agent = agent_logging_to(&config, &log);
    wait_ready(http);
    let finding = |rule: &str| -> Option<Value> {
        let advice: Value = serde_json::from_str(&http_get(http, "/advice")?.1).ok()?;
        let process = advice["processes"].as_array()?.iter().find(|p| p["pid"] == pid)?.clone();
        process["findings"].as_array()?.iter().find(|f| f["rule"] == rule).cloned()
    };
    let number =
        |f: &Value, key: &str| f["numbers"][key].as_f64().unwrap_or_else(|| panic!("{key} in {f:#}"));
    // The process's own CPU time from the first finding on, over at least 10 s of window.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(f) = finding("cpu-overprovisioned") {
            break f;
        }
        assert!(Instant::now() < deadline, "no cpu-overprovisioned advice for pid {pid}");
        thread::sleep(Duration::from_millis(200));
    };
    let (cpu0, t0, e0) = (cpu_seconds(pid), Instant::now(), number(&first, "elapsed_s"));
    let deadline = Instant::now() + Duration::from_secs(40);
    let cpu = loop {
        let f = finding("cpu-overprovisioned").unwrap();
        if number(&f, "elapsed_s") >= e0 + 10.0 {
            break f;
        }
        assert!(Instant::now() < deadline, "the window stopped growing: {f:#}");
        thread::sleep(Duration::from_millis(200));
    };
    let own_cpus = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let memory = finding("memory-overprovisioned").expect("memory-overprovisioned");
    let status_text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_mib = status_text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0;
    let text = http_get(http, "/metrics").unwrap().1;
    let status = agent.stop();
    drop(node);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}\n{stderr}");
    eprintln!("own {own_cpus:.3} CPUs, RSS {rss_mib:.1} MiB\n{cpu:#}\n{memory:#}");

    // Against the pod spec's request; the mean use is the process's own (the window holds
    // a few seconds more than the test's stretch, at the same duty cycle).
    assert_eq!(number(&cpu, "reference_cpus"), 1.5);
    let used = number(&cpu, "cpus_used");
    assert!((used - own_cpus).abs() <= 0.3 * own_cpus + 0.02, "used {used} vs the process's own {own_cpus}");
    // The request: the 90th percentile of the per-interval use x 1.15, at least the
    // mean's x 1.15 less rounding, and not far above (a steady duty cycle).
    let request = number(&cpu, "recommended_request_cpus");
    assert!(
        request >= 0.85 * 1.15 * own_cpus && request <= 1.6 * 1.15 * own_cpus + 0.02,
        "request {request} for {own_cpus} CPUs used"
    );
    assert_eq!(number(&memory, "request_mib"), 512.0);
    let mib = number(&memory, "recommended_request_mib");
    assert!(
        (mib - 1.15 * rss_mib).abs() <= 0.1 * 1.15 * rss_mib + 2.0,
        "{mib} MiB for a {rss_mib:.1} MiB RSS"
    );

    // Declared and recommended, under the pod's attributes.
    let line = |name: &str| {
        let pid_label = format!("process_pid=\"{pid}\"");
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&pid_label))
            .unwrap_or_else(|| panic!("no {name} for pid {pid} on /metrics"))
            .to_string()
    };
    for (name, value) in [
        ("k8s_container_cpu_request", 1.5),
        ("k8s_container_cpu_limit", 2.0),
        ("k8s_container_memory_request_bytes", 536870912.0),
        ("k8s_container_memory_limit_bytes", 1073741824.0),
    ] {
        let l = line(name);
        assert_eq!(l.rsplit(' ').next().unwrap().parse::<f64>().unwrap(), value, "{l}");
    }
    for name in ["stoker_recommendation_cpu_request", "stoker_recommendation_memory_request_bytes"] {
        let l = line(name);
        for attr in [format!("k8s_pod_name=\"{}\"", pod.name), "k8s_container_name=\"search\"".into()] {
            assert!(l.contains(&attr), "missing {attr} in {l}");
        }
    }
    assert!(!stderr.contains("WARN"), "unexpected warnings: {stderr}");
}
