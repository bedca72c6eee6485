//! End-to-end tests of the agent's metrics in real stores: OTLP into VictoriaMetrics, and
//! Prometheus scraping `/metrics`, each queried with PromQL as a dashboard would. The
//! stores are Debian's builds, unpacked by `cargo xtask setup` into /opt/stoker-stores.
//! Run as root.
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{agent::*, *};
use serde_json::Value;

const STORES: &str = "/opt/stoker-stores";

/// A store's program, or a panic saying how to install it.
fn store_program(package: &str) -> PathBuf {
    let path = Path::new(STORES).join(package).join("usr/bin").join(package);
    assert!(path.is_file(), "{} is missing: `cargo xtask setup` installs {package}", path.display());
    path
}

/// A store listening on `port`, stopped when dropped.
struct Store {
    child: Child,
    port: u16,
    /// `/internal/force_flush` makes what was just ingested searchable (VictoriaMetrics).
    flushes: bool,
}

impl Drop for Store {
    fn drop(&mut self) {
        kill(&mut [&mut self.child]);
    }
}

impl Store {
    /// VictoriaMetrics with its OTLP endpoint storing Prometheus-style names, and no
    /// latency offset (what was ingested is queryable at once).
    fn victoria_metrics(dir: &Path) -> Self {
        let port = free_port();
        let child = Command::new(store_program("victoria-metrics"))
            .arg(format!("-storageDataPath={}", dir.join("vm").display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .args(["-opentelemetry.usePrometheusNaming", "-search.latencyOffset=0s", "-search.disableCache"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self::ready(Self { child, port, flushes: true })
    }

    /// Prometheus scraping the agent's `/metrics` on `target` every second.
    fn prometheus(dir: &Path, target: u16) -> Self {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: stoker\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let child = Command::new(store_program("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prom").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self::ready(Self { child, port, flushes: false })
    }

    fn ready(store: Self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(store.port, "/-/ready").map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "the store on port {} did not start", store.port);
            thread::sleep(Duration::from_millis(100));
        }
        store
    }

    /// The instant vector of PromQL `query`: each series' labels and value.
    fn query(&self, query: &str) -> Vec<(serde_json::Map<String, Value>, f64)> {
        if self.flushes {
            http_get(self.port, "/internal/force_flush");
        }
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={}", encode(query)))
            .expect("the store answers");
        assert_eq!(status, 200, "{query}: {body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        answer["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                (r["metric"].as_object().cloned().unwrap_or_default(), value)
            })
            .collect()
    }

    /// The value of the one series `query` gives, once there is one.
    fn one(&self, query: &str) -> Option<f64> {
        match self.query(query).as_slice() {
            [(_, v)] => Some(*v),
            [] => None,
            more => panic!("{query}: one series expected, got {more:?}"),
        }
    }
}

/// The agent, stopped when dropped (a failed test leaves none running); it must exit 0.
struct Agent(Option<Child>);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            let status = stop(child);
            if !thread::panicking() {
                assert!(status.success(), "the agent exited with {status}");
            }
        }
    }
}

/// The agent exporting OTLP into `vm` every second, and Prometheus scraping its
/// `/metrics` (on the port returned) every second.
fn agent_into(dir: &Path, vm: &Store) -> (Agent, u16, Store) {
    let http = free_port();
    let config = agent_config(dir, http, "export_interval: 1s\n");
    let endpoint = format!("http://127.0.0.1:{}/opentelemetry/v1/metrics", vm.port);
    let agent = Agent(Some(agent_with_env(&config, &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)])));
    wait_ready(http);
    (agent, http, Store::prometheus(dir, http))
}

/// `s` percent-encoded for a URL's query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A CPU-bound Python process, the agent exporting OTLP into VictoriaMetrics every second
/// and Prometheus scraping its `/metrics`: once the process idles, both stores give its CPU
/// time within 2% of what /proc says, the same in both, under the documented names and
/// labels (`service_name`, `process_pid`).
#[test]
fn cpu_time_lands_alike_in_victoria_metrics_and_prometheus() {
    require_root();
    let dir = scratch("stores-cpu");
    let vm = Store::victoria_metrics(&dir);
    let (_agent, _, prometheus) = agent_into(&dir, &vm);
    // 2 s of CPU, then idle on its stdin: its CPU time stops moving, /proc says what it is.
    let mut busy = Command::new(python("3.12.1"))
        .args(["-c", "import sys, time\nend = time.process_time() + 2\nwhile time.process_time() < end:\n    pass\nprint('done', flush=True)\nsys.stdin.read()"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(busy.stdout.take().unwrap()), &mut line)
        .unwrap();
    assert_eq!(line.trim(), "done");
    let pid = busy.id();
    let proc_cpu = cpu_seconds(pid);
    let query = format!("process_cpu_time_seconds_total{{process_pid=\"{pid}\"}}");
    // Both stores hold the figure of an export after the work ended (exports every second,
    // scrapes every second): at most a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (in_vm, in_prom) = loop {
        let both = (vm.one(&query), prometheus.one(&query));
        if let (Some(a), Some(b)) = both
            && (a - proc_cpu).abs() <= 0.02 * proc_cpu
            && (b - proc_cpu).abs() <= 0.02 * proc_cpu
        {
            break (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "{query}: VictoriaMetrics {:?}, Prometheus {:?}, /proc {proc_cpu:.3} s",
            both.0,
            both.1
        );
        thread::sleep(Duration::from_millis(500));
    };
    eprintln!("CPU time: /proc {proc_cpu:.3} s, VictoriaMetrics {in_vm:.3} s, Prometheus {in_prom:.3} s");
    // The same figure in both: the agent's export and its /metrics carry the same value.
    assert!((in_vm - in_prom).abs() < 1e-6, "VictoriaMetrics {in_vm}, Prometheus {in_prom}");
    for (store, name) in [(&vm, "VictoriaMetrics"), (&prometheus, "Prometheus")] {
        let series = store.query(&query);
        let labels = &series[0].0;
        for label in ["service_name", "process_pid", "process_executable_name"] {
            assert!(labels.contains_key(label), "{name}: {label} missing from {labels:?}");
        }
    }
    kill(&mut [&mut busy]);
}

/// A ThreadingHTTPServer and a client, both watched, 80 requests on 2 keep-alive
/// connections (on each, 30 of 5 ms and 10 of 60 ms): in VictoriaMetrics (OTLP) and in Prometheus
/// (scraping), the server's and the client's request counts are exactly 80, and the mean
/// latency (`_sum / _count`) is within 3% of the mean each process measured itself.
#[test]
fn request_counts_and_latency_land_alike_in_both_stores() {
    require_root();
    let dir = scratch("stores-http");
    let vm = Store::victoria_metrics(&dir);
    let mut server = Command::new(python("3.12.1"))
        .args([net::net_fixture("http_server.py").to_str().unwrap(), "--timings"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let server_lines = net::Lines::of(&mut server);
    let port = server_lines.next("server port", Duration::from_secs(10)).trim().to_string();
    let (_agent, http, prometheus) = agent_into(&dir, &vm);
    wait_exported(http, server.id());
    let paths: Vec<String> =
        (0..30).map(|_| "/sleep/5".to_string()).chain((0..10).map(|_| "/sleep/60".into())).collect();
    let plan = serde_json::json!({ "connections": 2, "paths": paths, "wait": true }).to_string();
    let mut client = Command::new(python("3.12.1"))
        .args([net::net_fixture("http_client.py").to_str().unwrap(), &port, &plan])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let client_pid = client.id();
    wait_exported(http, client_pid);
    std::io::Write::write_all(&mut client.stdin.take().unwrap(), b"go\n").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "the client failed");
    let client_own = net::Timed::list(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(client_own.len(), 80);
    let server_own = server_lines.timings(80);
    let mean = |own: &[net::Timed]| {
        let (lo, hi) = net::sum_range_s(&own.iter().collect::<Vec<_>>());
        (lo + hi) / 2.0 / own.len() as f64
    };
    let checks = [
        ("server", "http_server_request_duration_seconds", server.id(), mean(&server_own)),
        ("client", "http_client_request_duration_seconds", client_pid, mean(&client_own)),
    ];
    for (who, metric, pid, own_mean) in checks {
        // The last figure of each series: the client exited (Prometheus marks its series
        // stale), the server idles.
        let last = |part: &str| format!("sum(last_over_time({metric}_{part}{{process_pid=\"{pid}\"}}[10m]))");
        let deadline = Instant::now() + Duration::from_secs(30);
        for (store, name) in [(&prometheus, "Prometheus"), (&vm, "VictoriaMetrics")] {
            let (count, sum) = loop {
                let (count, sum) = (store.one(&last("count")), store.one(&last("sum")));
                if count == Some(80.0) {
                    break (80.0, sum.unwrap_or(f64::NAN));
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}: {who} count {count:?}, not 80: {:?}",
                    store.query(&format!("last_over_time({metric}_count{{process_pid=\"{pid}\"}}[10m])"))
                );
                thread::sleep(Duration::from_millis(500));
            };
            let stored_mean = sum / count;
            eprintln!("{name}: {who} 80 requests, mean {stored_mean:.6} s; its own {own_mean:.6} s");
            assert!(
                (stored_mean - own_mean).abs() <= 0.03 * own_mean,
                "{name}: {who} mean latency {stored_mean:.6} s, the process measured {own_mean:.6} s"
            );
        }
    }
    kill(&mut [&mut server]);
}
