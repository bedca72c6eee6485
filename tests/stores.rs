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

use common::{agent::*, k8s::*, workloads::*, *};
use serde_json::Value;

const STORES: &str = "/opt/stoker-stores";

/// A series' labels, as a store answers them.
type Labels = serde_json::Map<String, Value>;

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
    /// Its command line, to start it again.
    program: PathBuf,
    args: Vec<String>,
    /// `/internal/force_flush` makes what was just ingested searchable (VictoriaMetrics).
    flushes: bool,
}

impl Drop for Store {
    fn drop(&mut self) {
        kill(&mut [&mut self.child]);
    }
}

impl Store {
    fn start(program: PathBuf, args: Vec<String>, port: u16, flushes: bool) -> Self {
        let child =
            Command::new(&program).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        Self::ready(Self { child, port, program, args, flushes })
    }

    /// VictoriaMetrics with its OTLP endpoint storing Prometheus-style names, and no
    /// latency offset (what was ingested is queryable at once).
    fn victoria_metrics(dir: &Path) -> Self {
        let port = free_port();
        let args = vec![
            format!("-storageDataPath={}", dir.join("vm").display()),
            format!("-httpListenAddr=127.0.0.1:{port}"),
            "-opentelemetry.usePrometheusNaming".into(),
            "-search.latencyOffset=0s".into(),
            "-search.disableCache".into(),
        ];
        Self::start(store_program("victoria-metrics"), args, port, true)
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
        let args = vec![
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("prom").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        Self::start(store_program("prometheus"), args, port, false)
    }

    /// Stops the store (SIGTERM: it writes what it holds), keeps it down for `down`, and
    /// starts it again on the same port and data.
    fn restart(&mut self, down: Duration) {
        // SAFETY: signals a child this test spawned and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success() || status.code().is_none(), "the store exited with {status}");
        thread::sleep(down);
        let again = Self::start(self.program.clone(), self.args.clone(), self.port, self.flushes);
        *self = again;
    }

    fn ready(store: Self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(store.port, "/-/ready").map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "the store on port {} did not start", store.port);
            thread::sleep(Duration::from_millis(100));
        }
        store
    }

    /// The `data` of the store's answer to the API request `path` (what was ingested made
    /// searchable first).
    fn api(&self, path: &str) -> Value {
        if self.flushes {
            http_get(self.port, "/internal/force_flush");
        }
        let (status, body) = http_get(self.port, path).expect("the store answers");
        assert_eq!(status, 200, "{path}: {body}");
        let mut answer: Value = serde_json::from_str(&body).unwrap();
        answer["data"].take()
    }

    /// Each series of a query's result: its labels, and what `points` makes of its
    /// `value` or `values`.
    fn series<T>(data: &Value, points: impl Fn(&Value) -> T) -> Vec<(Labels, T)> {
        let series = data["result"].as_array().unwrap().iter();
        series.map(|r| (r["metric"].as_object().cloned().unwrap_or_default(), points(r))).collect()
    }

    /// The instant vector of PromQL `query`: each series' labels and value.
    fn query(&self, query: &str) -> Vec<(Labels, f64)> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(query)));
        Self::series(&data, |r| number(&r["value"]))
    }

    /// The range vector of PromQL `query` from `start` to `end` (Unix seconds) every `step`
    /// seconds, as Grafana asks for a time series panel: each series' labels and values.
    fn query_range(&self, query: &str, start: f64, end: f64, step: f64) -> Vec<(Labels, Vec<f64>)> {
        let path =
            format!("/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}", encode(query));
        Self::series(&self.api(&path), |r| r["values"].as_array().unwrap().iter().map(number).collect())
    }

    /// The raw samples of `selector` over the last `seconds`: each series' labels and
    /// (time, value) points.
    fn samples(&self, selector: &str, seconds: u64) -> Vec<(Labels, Vec<(f64, f64)>)> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(&format!("{selector}[{seconds}s]"))));
        Self::series(&data, |r| {
            r["values"].as_array().unwrap().iter().map(|v| (v[0].as_f64().unwrap(), number(v))).collect()
        })
    }

    /// The values of `label` on the series `selector` matches, as Grafana's
    /// `label_values(selector, label)` asks for them.
    fn label_values(&self, selector: &str, label: &str) -> Vec<String> {
        let data = self.api(&format!("/api/v1/label/{label}/values?match[]={}", encode(selector)));
        data.as_array().unwrap().iter().filter_map(|v| v.as_str().map(String::from)).collect()
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
    agent_with(dir, vm, "", &[])
}

/// `agent_into` with `extra` configuration and `env` beside the OTLP endpoint.
fn agent_with(dir: &Path, vm: &Store, extra: &str, env: &[(&str, String)]) -> (Agent, u16, Store) {
    let http = free_port();
    let config = agent_config(dir, http, &format!("export_interval: 1s\n{extra}"));
    let agent = start_agent(&config, http, vm, env);
    let prometheus = Store::prometheus(dir, http);
    wait_scraped(&prometheus);
    (agent, http, prometheus)
}

/// The agent with `config` (its /metrics on `http`) exporting OTLP into `vm`, ready.
fn start_agent(config: &Path, http: u16, vm: &Store, env: &[(&str, String)]) -> Agent {
    let endpoint = format!("http://127.0.0.1:{}/opentelemetry/v1/metrics", vm.port);
    let mut vars = vec![("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)];
    vars.extend(env.iter().cloned());
    let agent = Agent(Some(agent_with_env(config, &vars)));
    wait_ready(http);
    agent
}

/// Once Prometheus has scraped the agent.
fn wait_scraped(prometheus: &Store) {
    // Its first scrape comes up to seconds after it is ready: what a workload does before
    // then is in no sample of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.one("up{job=\"stoker\"}") != Some(1.0) {
        assert!(Instant::now() < deadline, "Prometheus did not scrape the agent within 30 s");
        thread::sleep(Duration::from_millis(200));
    }
}

/// The number of a `[time, "value"]` pair (NaN for what is not one).
fn number(point: &Value) -> f64 {
    point[1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// CPython 3.12 running `args`, its stdin and stdout piped to the test, told to start (a
/// line on its stdin, which stays open) once the agent on `http` exports it.
fn started_when_exported(http: u16, args: &[&str]) -> Child {
    let mut child = Command::new(python("3.12.1"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_exported(http, child.id());
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    child
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
        // The same figure in both (the agent's export and its /metrics carry the same value),
        // once each holds the export after the work: VictoriaMetrics gets it at the export,
        // Prometheus at its next scrape.
        if let (Some(a), Some(b)) = both
            && (a - proc_cpu).abs() <= 0.02 * proc_cpu
            && (a - b).abs() < 1e-6
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
    let client =
        started_when_exported(http, &[net::net_fixture("http_client.py").to_str().unwrap(), &port, &plan]);
    let client_pid = client.id();
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

/// The dashboard's queries as Grafana sends them with every variable at its default (All:
/// `allValue`; Top N: its current value) and a range of `range_s` seconds at `step_s`, the
/// data source's scrape interval 1 s (the export interval here): `$__rate_interval` is
/// max(step + scrape interval, 4 x scrape interval), Grafana's rule.
struct Dashboard {
    /// Each query: its panel's title, the query, and the labels its legend names.
    targets: Vec<(String, String, Vec<String>, bool)>,
    /// Each query variable: name, the label it lists, the selector it lists it from.
    variables: Vec<(String, String, String)>,
    /// Each variable's value, longest names first.
    values: Vec<(String, String)>,
}

impl Dashboard {
    fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/stoker-dashboard.json");
        let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut values = Vec::new();
        let mut variables = Vec::new();
        for v in d["templating"]["list"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap().to_string();
            match v["type"].as_str().unwrap() {
                "query" => {
                    assert_eq!(v["includeAll"], true, "variable {name}: the test selects All");
                    values.push((name.clone(), v["allValue"].as_str().unwrap().to_string()));
                    let definition = v["definition"].as_str().unwrap();
                    let inner = definition
                        .strip_prefix("label_values(")
                        .and_then(|d| d.strip_suffix(')'))
                        .unwrap_or_else(|| panic!("variable {name}: {definition} is not label_values(...)"));
                    let (selector, label) = inner.rsplit_once(',').unwrap();
                    variables.push((name, label.trim().to_string(), selector.trim().to_string()));
                }
                "custom" => values.push((name, v["current"]["value"].as_str().unwrap().to_string())),
                "datasource" => {}
                other => panic!("variable {name}: type {other} is new to this test"),
            }
        }
        let mut targets = Vec::new();
        let mut panels: Vec<Value> = d["panels"].as_array().unwrap().clone();
        while let Some(p) = panels.pop() {
            panels.extend(p["panels"].as_array().cloned().unwrap_or_default());
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap().to_string();
            for t in p["targets"].as_array().unwrap() {
                let legend = t["legendFormat"].as_str().unwrap_or("");
                let labels = legend
                    .split("{{")
                    .skip(1)
                    .filter_map(|part| part.split_once("}}").map(|(l, _)| l.trim().to_string()))
                    .collect();
                let instant = t["instant"].as_bool().unwrap_or(false);
                targets.push((title.clone(), t["expr"].as_str().unwrap().to_string(), labels, instant));
            }
        }
        targets.reverse();
        // Longest names first: a name that begins another ($node, $nodes) is replaced after it.
        values.sort_by_key(|(name, _): &(String, String)| std::cmp::Reverse(name.len()));
        Self { targets, variables, values }
    }

    /// `expr` with the variables substituted, and nothing left to substitute.
    fn interpolate(&self, expr: &str, range_s: u64, step_s: u64) -> String {
        let mut out = expr
            .replace("$__rate_interval", &format!("{}s", (step_s + 1).max(4)))
            .replace("$__range", &format!("{range_s}s"));
        for (name, value) in &self.values {
            out = out.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
        }
        assert!(!out.contains('$'), "a variable this test does not know in {expr}");
        out
    }
}

/// An http.client caller of http.server on port ARGV[1], once told to (a line on stdin):
/// three keep-alive connections 1.5 s apart (an export or more), four GETs on each; then it
/// idles. It lives on, as a service calling an upstream does: a scraper's `rate()` sees
/// its series grow (a process that makes all its calls in its last interval leaves a
/// scraper one point of each series, and no rate).
const CALLER: &str = "import http.client, socket, sys, time\nport = int(sys.argv[1])\nsys.stdin.readline()\nfor _ in range(3):\n    conn = http.client.HTTPConnection('127.0.0.1', port)\n    conn.connect()\n    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n    for _ in range(4):\n        conn.request('GET', '/sleep/5')\n        conn.getresponse().read()\n    conn.close()\n    time.sleep(1.5)\nprint('done', flush=True)\nsys.stdin.readline()\n";

/// A Python process that connects `n` times to a port nothing listens on, once told to
/// (a line on stdin), then idles.
const REFUSED: &str = "import socket, sys\nn, port = int(sys.argv[1]), int(sys.argv[2])\nsys.stdin.readline()\nfor _ in range(n):\n    s = socket.socket()\n    s.connect_ex(('127.0.0.1', port))\n    s.close()\nprint('done', flush=True)\nsys.stdin.readline()\n";

/// Every panel of deploy/grafana/stoker-dashboard.json has data in both stores.
///
/// The agent (off-CPU on, a 60 s advice window, the pod lookup against a stand-in API
/// server, its own attributes as the DaemonSet sets them) watches workloads that between
/// them produce every metric the dashboard reads: a pod's container with requests in its
/// spec and its limits on its v1 cgroups, using far less (requests advised down); a
/// spinner under a 0.3 CPU quota (throttling, a limit advised up); a pre-fork server with 8
/// workers under 0.5 CPU (workers advised); a process growing to 92% of its memory
/// cgroup's limit; http.server with Nagle's algorithm on and its http.client caller (server
/// and client latency, time to first byte, queue and accept-queue times, stalls); an
/// asyncio server whose handler blocks its loop; a process whose connects are refused.
/// Each query of each panel, interpolated as Grafana does with every variable at All, runs
/// over the test's range in VictoriaMetrics (OTLP) and in Prometheus (scraping /metrics)
/// until every one returns a series with a number and the labels its legend shows; each
/// variable lists the values the workloads give it. A query that stays empty fails the
/// test with its panel's title.
#[test]
fn every_dashboard_panel_has_data_in_both_stores() {
    require_root();
    let dir = scratch("stores-dashboard");
    let dashboard = Dashboard::load();
    let vm = Store::victoria_metrics(&dir);
    let started = unix_now();

    // The pod: 20 ms of CPU every 100 ms beside 64 MiB, asking for 1.5 CPUs and 512 MiB.
    let mut pod = FakePod::new(7, "shop", "search-6b5a4c3d2-d4s8b", "search", true);
    pod.resources = serde_json::json!({
        "requests": {"cpu": "1500m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "1Gi"},
    });
    let api = ApiServer::start(&dir, free_port(), &pod_list(&[&pod]));
    let mut node = Node::new();
    let script = "import time\nballast = bytearray(b'x' * (64 << 20))\nwhile True:\n    end = time.process_time() + 0.02\n    while time.process_time() < end:\n        pass\n    time.sleep(0.08)\n";
    let pod_pid = node.run_in(&pod, &python("3.12.1"), &["-c", script]);
    // Its limits as those of its (v1) cpu and memory cgroups, as on a kubelet node.
    let pod_cgroup = MemoryCgroup::new("stoker-stores-pod", 1 << 30).with_quota(200000);
    pod_cgroup.add(pod_pid);

    let extra = format!(
        "off_cpu:\n  enabled: true\nadvice:\n  window: 60s\nkubernetes:\n  api_url: {}\n  token_path: {}\n  node_name: test-node\n",
        api.url,
        api.token.display()
    );
    let own = "service.name=stoker-agent,service.namespace=stoker,k8s.node.name=test-node".to_string();
    let (_agent, http, prometheus) = agent_with(&dir, &vm, &extra, &[("OTEL_RESOURCE_ATTRIBUTES", own)]);

    let (_quota, mut spin) = spinner("stoker-stores-quota", "300");
    let prefork_cgroup = QuotaCgroup::new("stoker-stores-prefork", 50000);
    let (mut prefork, _) =
        python_in(&prefork_cgroup.path, &[fixture("net", "prefork_server.py").to_str().unwrap(), "8"]);
    let (_memory, mut grower) = grower();
    let (mut nagle, nagle_port) = http_server(&["--nagle"]);
    let mut event_loop = Command::new(python("3.12.1"))
        .arg(fixture("offcpu", "asyncio_server.py"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let loop_lines = net::Lines::of(&mut event_loop);
    let loop_port: u16 =
        loop_lines.next("asyncio server port", Duration::from_secs(10)).trim().parse().unwrap();
    for pid in [spin.id(), grower.id(), nagle.id(), event_loop.id()] {
        wait_exported(http, pid);
    }
    for child in [&mut spin, &mut grower] {
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    }
    let mut refused = started_when_exported(http, &["-c", REFUSED, "3", &free_port().to_string()]);
    let mut caller = started_when_exported(http, &["-c", CALLER, &nagle_port]);
    let conn = std::net::TcpStream::connect(("127.0.0.1", loop_port)).unwrap();
    let mut answers = std::io::BufReader::new(conn.try_clone().unwrap());
    for request in ["slow", "fast", "slow"] {
        std::io::Write::write_all(&mut &conn, format!("{request}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut answers, &mut answer).unwrap();
    }

    // Until every query has data in both stores (the advice needs a few intervals of its
    // window), at most 90 s.
    let step = 2;
    let deadline = Instant::now() + Duration::from_secs(90);
    let empty = loop {
        let end = unix_now();
        let range_s = (end - started).ceil() as u64;
        let mut empty = Vec::new();
        for (store, name) in [(&vm, "VictoriaMetrics"), (&prometheus, "Prometheus")] {
            for (title, expr, legend, instant) in &dashboard.targets {
                let query = dashboard.interpolate(expr, range_s, step);
                let series: Vec<(Labels, Vec<f64>)> = if *instant {
                    store.query(&query).into_iter().map(|(labels, v)| (labels, vec![v])).collect()
                } else {
                    store.query_range(&query, started, end, step as f64)
                };
                let with_data: Vec<_> =
                    series.iter().filter(|(_, v)| v.iter().any(|x| x.is_finite())).collect();
                let unlabelled: Vec<&String> = legend
                    .iter()
                    .filter(|l| !with_data.iter().any(|(labels, _)| labels.contains_key(*l)))
                    .collect();
                if with_data.is_empty() {
                    empty.push(format!("{name}: panel {title:?}: no data for {query}"));
                } else if !unlabelled.is_empty() {
                    empty.push(format!(
                        "{name}: panel {title:?}: no series has the label(s) {unlabelled:?} its legend shows: {:?}",
                        with_data.iter().map(|(l, _)| l).collect::<Vec<_>>()
                    ));
                }
            }
            for (variable, label, selector) in &dashboard.variables {
                let selector = dashboard.interpolate(selector, range_s, step);
                let listed = store.label_values(&selector, label);
                let want = match variable.as_str() {
                    "namespace" => "shop".to_string(),
                    "service" => "search".to_string(),
                    "node" => "test-node".to_string(),
                    other => panic!("variable {other} is new to this test"),
                };
                if !listed.contains(&want) {
                    empty.push(format!("{name}: variable {variable} lists {listed:?}, not {want}"));
                }
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break empty;
        }
        thread::sleep(Duration::from_secs(2));
    };
    eprintln!(
        "{} queries of {} panels and {} variables checked in both stores over {:.0} s",
        dashboard.targets.len(),
        dashboard.targets.iter().map(|t| &t.0).collect::<std::collections::HashSet<_>>().len(),
        dashboard.variables.len(),
        unix_now() - started
    );
    // SIGTERM: the pre-fork parent ends its workers.
    // SAFETY: signals a child this test spawned and has not reaped.
    unsafe { libc::kill(prefork.id() as i32, libc::SIGTERM) };
    let _ = prefork.wait();
    kill(&mut [&mut spin, &mut grower, &mut nagle, &mut caller, &mut event_loop, &mut refused]);
    let procs = prefork_cgroup.path.join("cgroup.procs");
    let emptied = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&procs).unwrap_or_default().trim().is_empty() && Instant::now() < emptied {
        thread::sleep(Duration::from_millis(50));
    }
    drop(node);
    drop(pod_cgroup);
    assert!(empty.is_empty(), "{} queries without data:\n{}", empty.len(), empty.join("\n"));
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Restarts mid-run, with a process spinning under a 0.3 CPU quota throughout:
/// VictoriaMetrics stopped for 3 s and started again on its data, the same for Prometheus,
/// then the agent stopped and started again. In both stores the process's CPU time is one
/// series whose samples never decrease (the kernel's figure: no reset when the agent
/// restarts, so no bogus increase and no negative rate), its last sample between what /proc
/// said before and after it (within a clock tick); the agent's own sample counter is one
/// series that resets exactly once, at the agent's restart (`rate()` and `increase()` count
/// from 0 after it). VictoriaMetrics also holds CPU samples taken while it was down: the
/// agent's queue sent them once it was back.
#[test]
fn store_and_agent_restarts_keep_counters_whole() {
    require_root();
    let dir = scratch("stores-restart");
    let mut vm = Store::victoria_metrics(&dir);
    let http = free_port();
    let config = agent_config(&dir, http, "export_interval: 1s\n");
    let agent = start_agent(&config, http, &vm, &[]);
    let mut prometheus = Store::prometheus(&dir, http);
    wait_scraped(&prometheus);
    let started = Instant::now();
    let (_quota, mut spin) = spinner("stoker-stores-restart", "600");
    std::io::Write::write_all(spin.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let pid = spin.id();
    wait_exported(http, pid);
    let cpu = format!("process_cpu_time_seconds_total{{process_pid=\"{pid}\"}}");
    let samples = "stoker_samples_total";
    let settle = |what: &str| {
        // A few exports and scrapes in between.
        eprintln!("{what}");
        thread::sleep(Duration::from_secs(4));
    };
    settle("running");
    let down_from = unix_now();
    vm.restart(Duration::from_secs(3));
    let down_to = unix_now();
    settle("VictoriaMetrics restarted");
    prometheus.restart(Duration::from_secs(3));
    wait_scraped(&prometheus);
    settle("Prometheus restarted");
    drop(agent);
    let agent_restart = unix_now();
    let agent = start_agent(&config, http, &vm, &[]);
    wait_exported(http, pid);
    settle("agent restarted");
    let proc_cpu = cpu_seconds(pid);
    // Until both stores hold a figure from after that read (an export, and a scrape of it).
    let range = || started.elapsed().as_secs() + 5;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (store, name) in [(&vm, "VictoriaMetrics"), (&prometheus, "Prometheus")] {
        let last = || store.samples(&cpu, range()).first().and_then(|(_, p)| p.last()).map(|p| p.1);
        while last().is_none_or(|v| v < proc_cpu) {
            assert!(Instant::now() < deadline, "{name}: {cpu} {:?}, not yet /proc's {proc_cpu} s", last());
            thread::sleep(Duration::from_millis(200));
        }
    }
    let range = range();
    for (store, name) in [(&vm, "VictoriaMetrics"), (&prometheus, "Prometheus")] {
        let series = store.samples(&cpu, range);
        assert_eq!(series.len(), 1, "{name}: one series of {cpu}: {series:?}");
        let points = &series[0].1;
        let drops: Vec<_> = points.windows(2).filter(|w| w[1].1 < w[0].1).collect();
        assert!(drops.is_empty(), "{name}: {cpu} went down: {drops:?}");
        let last = points.last().unwrap().1;
        eprintln!("{name}: {} CPU samples, last {last:.3} s; /proc {proc_cpu:.3} s before it", points.len());
        let proc_after = cpu_seconds(pid);
        assert!(
            last >= proc_cpu - 0.02 && last <= proc_after + 0.02,
            "{name}: last {last} s, /proc {proc_cpu} s before and {proc_after} s after"
        );
        let own = store.samples(samples, range);
        assert_eq!(own.len(), 1, "{name}: one series of {samples}: {own:?}");
        let points = &own[0].1;
        let resets: Vec<f64> = points.windows(2).filter(|w| w[1].1 < w[0].1).map(|w| w[1].0).collect();
        assert_eq!(resets.len(), 1, "{name}: {samples} resets once, at the agent's restart: {points:?}");
        assert!(
            resets[0] >= agent_restart - 1.0,
            "{name}: {samples} reset at {} before the agent restarted at {agent_restart}",
            resets[0]
        );
    }
    let during = vm.samples(&cpu, range)[0].1.iter().filter(|(t, _)| *t > down_from && *t < down_to).count();
    eprintln!("VictoriaMetrics: {during} CPU samples from the {:.1} s it was down", down_to - down_from);
    assert!(during >= 1, "no samples from while VictoriaMetrics was down: the agent's queue lost them");
    drop(agent);
    kill(&mut [&mut spin]);
}

/// An http.client caller of http.server on port ARGV[1] that, once told to (a line on
/// stdin), starts a GET of /sleep/5 every 1/ARGV[2] s on one keep-alive connection for
/// ARGV[3] s (on a schedule: its rate is the same whatever the machine does), then prints
/// the Unix time each response was read, as a JSON list.
const PACED: &str = "import http.client, json, sys, time\nport, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])\nsys.stdin.readline()\nconn = http.client.HTTPConnection('127.0.0.1', port)\ndone = []\nstart = time.monotonic()\nfor i in range(int(rate * seconds)):\n    time.sleep(max(0.0, start + i / rate - time.monotonic()))\n    conn.request('GET', '/sleep/5')\n    conn.getresponse().read()\n    done.append(time.time())\nprint(json.dumps(done), flush=True)\n";

/// A caller paced at 40 requests a second for 14 s against http.server: in both stores,
/// `rate()` of the server's and of the client's request counts over 10 s, two seconds
/// before the end, is within 3% of the rate at which the client read its responses in those
/// 10 s (what a scraper's timestamps lag the counts by, up to a scrape interval, moves the
/// window, not its rate).
#[test]
fn request_rates_in_both_stores_are_the_callers_own() {
    require_root();
    let dir = scratch("stores-rate");
    let vm = Store::victoria_metrics(&dir);
    let (mut server, port) = http_server(&[]);
    let (_agent, http, prometheus) = agent_into(&dir, &vm);
    wait_exported(http, server.id());
    let client = started_when_exported(http, &["-c", PACED, &port, "40", "14"]);
    let client_pid = client.id();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "the client failed");
    let done: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done.len(), 560);
    let at = done.last().unwrap() - 2.0;
    let own = done.iter().filter(|&&t| t > at - 10.0 && t <= at).count() as f64 / 10.0;
    // Until both stores hold a count from after `at` (an export, and a scrape of it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let server_count =
        format!("http_server_request_duration_seconds_count{{process_pid=\"{}\"}}", server.id());
    for (store, name) in [(&vm, "VictoriaMetrics"), (&prometheus, "Prometheus")] {
        let last = || store.samples(&server_count, 60).first().and_then(|(_, p)| p.last()).map(|p| p.0);
        while last().is_none_or(|t| t <= at) {
            assert!(Instant::now() < deadline, "{name}: no {server_count} after {at}: {:?}", last());
            thread::sleep(Duration::from_millis(200));
        }
    }
    for (metric, pid) in [
        ("http_server_request_duration_seconds_count", server.id()),
        ("http_client_request_duration_seconds_count", client_pid),
    ] {
        let query = format!("sum(rate({metric}{{process_pid=\"{pid}\"}}[10s]))");
        for (store, name) in [(&vm, "VictoriaMetrics"), (&prometheus, "Prometheus")] {
            let data = store.api(&format!("/api/v1/query?query={}&time={at:.3}", encode(&query)));
            let rate = number(&data["result"][0]["value"]);
            eprintln!("{name}: {metric} {rate:.2}/s; the client read {own:.2} responses/s");
            assert!(
                (rate - own).abs() <= 0.03 * own,
                "{name}: {query} = {rate:.2}/s, the client's own {own:.2}/s"
            );
        }
    }
    kill(&mut [&mut server]);
}
