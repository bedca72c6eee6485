//! Helpers for the agent's end-to-end tests: free ports, the agent process, the
//! Prometheus endpoint, a busy CPython workload, the oteltap and opentelemetry-proto receivers.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{STOKER, python, workload};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

pub fn oteltap(port: u16, out: &std::path::Path) -> Child {
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
pub fn busy_python(dir: &std::path::Path) -> Child {
    Command::new(python("3.12.1"))
        .args([workload().to_str().unwrap(), "shares", "30", dir.join("r.json").to_str().unwrap()])
        .spawn()
        .unwrap()
}

/// Writes an agent configuration (sample rate 99 Hz, /metrics on `http`) plus `extra`.
pub fn agent_config(dir: &std::path::Path, http: u16, extra: &str) -> std::path::PathBuf {
    let config = dir.join("agent.yaml");
    let yaml = format!("sample_rate_hz: 99\nprometheus:\n  listen: 127.0.0.1:{http}\n{extra}");
    std::fs::write(&config, yaml).unwrap();
    config
}

pub fn agent(config: &std::path::Path, otlp_port: u16) -> Child {
    Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp_port}"))
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The agent with exactly the OTEL_* variables `vars` (none of the test's own).
pub fn agent_with_env(config: &std::path::Path, vars: &[(&str, String)]) -> Child {
    let mut command = Command::new(STOKER);
    command.args(["agent", "--config", config.to_str().unwrap()]);
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            command.env_remove(k);
        }
    }
    command.envs(vars.iter().map(|(k, v)| (k, v))).spawn().unwrap()
}

/// The agent with no OTLP endpoint (its other outputs only).
pub fn agent_without_otlp(config: &std::path::Path) -> Child {
    Command::new(STOKER)
        .args(["agent", "--config", config.to_str().unwrap()])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .spawn()
        .unwrap()
}

pub fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "the agent did not become ready");
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn metric_value(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && l.contains(label))?.rsplit(' ').next()?.parse().ok()
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

pub fn stop(mut child: Child) -> std::process::ExitStatus {
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

/// Kills and reaps helper processes (receivers, workloads).
pub fn kill(children: &mut [&mut Child]) {
    for child in children.iter_mut() {
        child.kill().ok();
    }
    for child in children.iter_mut() {
        child.wait().ok();
    }
}

/// The OTLP receiver on the official opentelemetry-proto package
/// (tests/fixtures/otlp_receiver.py), serving `mode` (`grpc` or `http`) on `port` and
/// writing what it decodes to `dir`/{metrics,traces,profiles}.ndjson; returns once it listens.
pub fn otlp_receiver(mode: &str, port: u16, dir: &std::path::Path) -> Child {
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

/// The JSON lines of an ndjson file written so far (a line being written is skipped).
pub fn ndjson(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A CPython 3.12 `shares` workload that spends `cpu_seconds` of CPU once it gets a line
/// on stdin (see `start_when_exported`), reporting to `dir`/`name`.json.
pub fn waiting_python(dir: &std::path::Path, name: &str, cpu_seconds: &str) -> Child {
    let report = dir.join(format!("{name}.json"));
    Command::new(python("3.12.1"))
        .args([
            workload().to_str().unwrap(),
            "shares",
            cpu_seconds,
            report.to_str().unwrap(),
            "--cpu",
            "--wait",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the agent exports process `pid` (it is sampled from then on).
pub fn wait_exported(http: u16, pid: u32) {
    let label = format!("process_pid=\"{pid}\"");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(http, "/metrics").is_some_and(|(_, t)| t.contains(&label)) {
        assert!(Instant::now() < deadline, "the agent did not pick up process {pid}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Lets a `waiting_python` workload start once the agent samples it.
pub fn start_when_exported(http: u16, workload: &mut Child) {
    wait_exported(http, workload.id());
    writeln!(workload.stdin.take().unwrap(), "go").unwrap();
}

/// What a workload spent: the CPU seconds of the work it measured itself (all of it
/// watched) and of its whole life from /proc, read while it is a zombie (its start, before
/// the agent watched it, included).
pub struct Spent {
    pub work: f64,
    pub life: f64,
}

/// True once child `pid` has exited (a zombie: the kernel keeps it until it is reaped).
pub fn has_ended(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
}

/// Waits for a `waiting_python` workload to end and reaps it.
pub fn wait_spent(workload: &mut Child, report: &std::path::Path) -> Spent {
    let pid = workload.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_ended(pid) {
        assert!(Instant::now() < deadline, "the workload did not end");
        thread::sleep(Duration::from_millis(10));
    }
    let life = cpu_seconds(pid);
    assert!(workload.wait().unwrap().success(), "the workload failed");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    Spent { work: report["cpu_seconds"].as_f64().unwrap(), life }
}

/// The last `process_cpu_time_seconds_total` the agent reports for `pid`, once the
/// process has exited and the agent has stopped reporting it.
pub fn final_cpu_time(http: u16, pid: u32) -> (f64, String) {
    final_cpu_time_after(http, pid, None)
}

/// `final_cpu_time` for a test that may poll only after the process left the export:
/// `seen` is the last value the test itself saw in the agent's `/metrics` (see `cpu_time_in`).
pub fn final_cpu_time_after(http: u16, pid: u32, seen: Option<(f64, String)>) -> (f64, String) {
    let label = format!("process_pid=\"{pid}\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = seen;
    loop {
        let (_, text) = http_get(http, "/metrics").unwrap_or_default();
        match metric_value(&text, "process_cpu_time_seconds_total", &label) {
            Some(v) => last = Some((v, text)),
            None if text.contains("stoker_samples_total") => {
                return last.unwrap_or_else(|| panic!("the agent never reported process {pid}"));
            }
            None => {}
        }
        assert!(Instant::now() < deadline, "the agent still reports process {pid} 30 s on");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The `process_cpu_time_seconds_total` of `pid` in one `/metrics` text, with the text.
pub fn cpu_time_in(text: &str, pid: u32) -> Option<(f64, String)> {
    metric_value(text, "process_cpu_time_seconds_total", &format!("process_pid=\"{pid}\""))
        .map(|v| (v, text.to_string()))
}

/// Asserts the CPU time the agent reported for a workload is what it spent: at least its
/// measured work and at most its whole life, each widened by the sampling tolerance of
/// that many samples at `hz`.
pub fn assert_cpu_time(what: &str, reported: f64, spent: &Spent, hz: f64) {
    let tolerance = |s: f64| super::sampling_tolerance(s * hz) / hz;
    let (lo, hi) = (spent.work - tolerance(spent.work), spent.life + tolerance(spent.life));
    eprintln!(
        "{what}: agent {reported:.3} s; the workload's work {:.3} s, its life {:.3} s (/proc): {lo:.3}..{hi:.3}",
        spent.work, spent.life
    );
    assert!(
        (lo..=hi).contains(&reported),
        "{what}: the agent reported {reported:.3} s of CPU; the workload worked {:.3} s and lived {:.3} s \
         (allowed {lo:.3}..{hi:.3} at {hz} Hz)",
        spent.work,
        spent.life
    );
}
