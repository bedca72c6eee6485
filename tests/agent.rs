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
/// Prometheus endpoint carries the resource attributes; a workload's CPU time is what it
/// spent (see `assert_cpu_time`).
#[test]
fn agent_exports_metrics() {
    require_root();
    let dir = scratch("agent");
    let (otlp, http) = (free_port(), free_port());
    let received = dir.join("otlp.ndjson");
    let receiver = oteltap(otlp, &received);
    let config = agent_config(&dir, http, "export_interval: 1s\n");
    let mut agent = agent(&config, otlp);
    wait_ready(http);
    assert_capabilities_dropped(agent.id());
    let mut log = agent.stderr.take().unwrap();
    // Started after the drop: adding it to the kernel's maps needs no capability.
    let mut busy = waiting_python(&dir, "busy", "3");
    start_when_exported(http, &mut busy);
    let pid = format!("process_pid=\"{}\"", busy.id());
    // Exports while it works: each interval's utilization is its CPU time (the growth of
    // the counter from one export to the next) over the interval's wall time and the CPUs.
    // An export is where the agent's sample count moves (before its first export, the
    // process's counter also grows between exports). Exports keep to a 1 s grid, each a few
    // milliseconds late at most: an interval is at least 0.95 s.
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let (mut previous, mut text) = (None, String::new());
    let mut intervals = 0;
    while !has_ended(busy.id()) {
        let (_, now) = http_get(http, "/metrics").expect("scrape /metrics");
        let samples = metric_value(&now, "stoker_samples_total", "").unwrap();
        let cpu = metric_value(&now, "process_cpu_time_seconds_total", &pid);
        // (samples, CPU time, whether that CPU time was seen first after an export).
        match (previous, cpu) {
            (None, Some(cpu)) => previous = Some((samples, cpu, false)),
            (Some((exported, before, at_export)), Some(cpu)) if samples != exported => {
                if at_export {
                    let utilization = metric_value(&now, "process_cpu_utilization_ratio", &pid).unwrap();
                    let most = (cpu - before) / 0.95 / cpus;
                    assert!(
                        utilization > 0.0 && utilization <= most * (1.0 + 1e-9),
                        "utilization {utilization} for {:.3} s of CPU in an interval of at least 0.95 s on {cpus} CPUs",
                        cpu - before
                    );
                    intervals += 1;
                    text = now.clone();
                }
                previous = Some((samples, cpu, true));
            }
            _ => {}
        }
        thread::sleep(Duration::from_millis(20));
    }
    let spent = wait_spent(&mut busy, &dir.join("busy.json"));
    let (reported, last) = final_cpu_time(http, busy.id());
    let status = stop(agent);
    // At the default log level, one line says what it watches and where it exports.
    let mut logged = String::new();
    std::io::Read::read_to_string(&mut log, &mut logged).unwrap();
    let start = logged
        .lines()
        .find(|l| l.starts_with("stoker: agent sampling"))
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(
        start.starts_with("stoker: agent sampling every CPython process on this node at 99 Hz; every 1s: "),
        "{start}"
    );
    assert!(start.contains(&format!("metrics to http://127.0.0.1:{otlp}")), "{start}");
    assert!(start.ends_with(&format!("/metrics on 127.0.0.1:{http}")), "{start}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&received).unwrap_or_default().contains("stoker.processes.tracked") {
        assert!(Instant::now() < deadline, "the receiver wrote no metrics");
        thread::sleep(Duration::from_millis(100));
    }
    let mut receiver = receiver;
    receiver.kill().ok();
    receiver.wait().ok();
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");

    assert_cpu_time("the workload's CPU time", reported, &spent, 99.0);
    assert!(intervals >= 1, "no export while the workload worked");
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
    // burn is the leaf of most of the workload's samples (tests/python.rs checks how many).
    // This process's line: other Python processes on the machine may run the same workload.
    let burn = last
        .lines()
        .find(|l| {
            l.starts_with("stoker_function_cpu_time_seconds_total")
                && l.contains("function=\"burn (workload.py)\"")
                && l.contains(&pid)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(burn * 2.0 > reported, "burn: {burn} s of the workload's {reported} s");
    // The agent's sample count includes every sample of the workload: its CPU time (the
    // kernel's accounting) at 99 Hz, within the sampling tolerance.
    let samples = metric_value(&last, "stoker_samples_total", "").unwrap_or(0.0);
    let expected = reported * 99.0;
    assert!(
        samples >= expected - sampling_tolerance(expected),
        "{samples} samples, the workload alone had {reported} s at 99 Hz"
    );
    assert_eq!(metric_value(&last, "stoker_export_failures_total", ""), Some(0.0));

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

/// Once loaded, no thread of the agent holds CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN or
/// CAP_SYS_NICE in its effective or permitted set; CAP_SYS_PTRACE (reading other processes)
/// stays.
fn assert_capabilities_dropped(agent: u32) {
    const SYS_PTRACE: u64 = 1 << 19;
    const GONE: [(u64, &str); 4] = [
        (1 << 21, "CAP_SYS_ADMIN"),
        (1 << 23, "CAP_SYS_NICE"),
        (1 << 38, "CAP_PERFMON"),
        (1 << 39, "CAP_BPF"),
    ];
    let tasks = std::fs::read_dir(format!("/proc/{agent}/task")).unwrap();
    let mut threads = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let set = |name: &str| {
            let line =
                status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {status}"));
            u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
        };
        for name in ["CapEff:", "CapPrm:"] {
            let mask = set(name);
            for (bit, cap) in GONE {
                assert_eq!(
                    mask & bit,
                    0,
                    "thread {:?} of the agent still holds {cap} ({name} {mask:x})",
                    task.file_name()
                );
            }
        }
        assert_ne!(
            set("CapEff:") & SYS_PTRACE,
            0,
            "the agent dropped CAP_SYS_PTRACE, which reading processes needs"
        );
        threads += 1;
    }
    assert!(threads >= 2, "the agent runs its HTTP server on a thread of its own: {threads} threads");
}

/// With the receiver down the agent keeps sampling (a workload's CPU time is what it
/// spent), counts failures and drops, stays small, and delivers once the receiver is back.
#[test]
fn agent_survives_a_receiver_outage() {
    require_root();
    let dir = scratch("outage");
    let (otlp, http) = (free_port(), free_port());
    let config = agent_config(&dir, http, "export_interval: 1s\nqueue:\n  max_batches: 2\n");
    let agent = agent(&config, otlp);
    wait_ready(http);
    let mut busy = waiting_python(&dir, "busy", "2");
    start_when_exported(http, &mut busy);
    // Down until a batch was dropped from the full queue. The workload may end meanwhile
    // and leave the export, so its value is kept as it is seen.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    let down = loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        seen = cpu_time_in(&text, busy.id()).or(seen);
        if metric_value(&text, "stoker_export_dropped_batches_total", "").unwrap_or(0.0) >= 1.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "no batch dropped in 30 s with the receiver down: {text}");
        thread::sleep(Duration::from_millis(100));
    };
    let spent = wait_spent(&mut busy, &dir.join("busy.json"));
    let (reported, _) = final_cpu_time_after(http, busy.id(), seen);
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
    kill(&mut [&mut receiver]);
    assert!(status.success());
    assert!(metric_value(&down, "stoker_export_failures_total", "").unwrap_or(0.0) >= 1.0, "{down}");
    assert_cpu_time("sampled during the outage", reported, &spent, 99.0);
    eprintln!("agent peak RSS {rss_kb} kB");
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
/// labelled like its metrics; the pprof decodes with an independent decoder, and the
/// pushes of a workload hold the samples of the CPU time it spent.
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
    let config = agent_config(
        &dir,
        http,
        &format!("export_interval: 2s\npyroscope:\n  url: http://127.0.0.1:{port}\n"),
    );
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let mut busy = waiting_python(&dir, "busy", "2");
    start_when_exported(http, &mut busy);
    let spent = wait_spent(&mut busy, &dir.join("busy.json"));
    // Its last interval exported; SIGTERM then flushes the pushes under way.
    final_cpu_time(http, busy.id());
    let status = stop(agent);
    kill(&mut [&mut server]);
    assert!(status.success());
    let busy_pid = busy.id().to_string();
    let mut raws = Vec::new();
    for entry in std::fs::read_dir(&pushes).unwrap().flatten() {
        assert!(entry.file_name().to_string_lossy().ends_with("_push.v1.PusherService_Push"), "{entry:?}");
        let body: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
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
                raws.push(series["samples"][0]["rawProfile"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(!raws.is_empty(), "no profile of the workload was pushed");
    use base64::Engine;
    let (mut samples, mut functions) = (0, std::collections::BTreeSet::new());
    for (i, raw) in raws.iter().enumerate() {
        let pb = dir.join(format!("pushed-{i}.pb.gz"));
        std::fs::write(&pb, base64::engine::general_purpose::STANDARD.decode(raw).unwrap()).unwrap();
        let p = decode_pprof(&pb);
        samples += p["samples"].as_i64().unwrap();
        functions
            .extend(p["functions"].as_array().unwrap().iter().filter_map(|f| f.as_str()).map(String::from));
    }
    for f in ["func_a", "burn", "shares"] {
        assert!(functions.contains(f), "{f} missing from the pushed profiles: {functions:?}");
    }
    // Each push holds one interval's samples: together, the workload's CPU time.
    assert_cpu_time("pushed samples", samples as f64 / 99.0, &spent, 99.0);
}

/// A process that exits between two exports still reports the CPU of its last interval:
/// its CPU time is what it spent.
#[test]
fn agent_reports_a_process_that_exits_mid_interval() {
    require_root();
    let dir = scratch("exits");
    let http = free_port();
    let config = agent_config(&dir, http, "export_interval: 3s\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let mut short = waiting_python(&dir, "short", "2");
    start_when_exported(http, &mut short);
    let spent = wait_spent(&mut short, &dir.join("short.json"));
    let (reported, last) = final_cpu_time(http, short.id());
    assert!(stop(agent).success());
    assert_cpu_time("exited process", reported, &spent, 99.0);
    // Its last report still says how big it was, and it is counted among the processes.
    let label = format!("process_pid=\"{}\"", short.id());
    let memory = metric_value(&last, "process_memory_usage_bytes", &label).unwrap();
    assert!(memory > 1e6, "the exited process's last report gives {memory} bytes of memory");
    assert_counts_agree(&last);
}

/// `stoker_processes_tracked` in a `/metrics` text is the number of processes it has series of.
fn assert_counts_agree(text: &str) {
    let pids: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("process_cpu_time_seconds_total{"))
        .filter_map(|l| l.split("process_pid=\"").nth(1)?.split('"').next())
        .collect();
    let tracked = metric_value(text, "stoker_processes_tracked", "").unwrap();
    assert_eq!(tracked as usize, pids.len(), "stoker_processes_tracked {tracked}, series of {pids:?}");
}

/// A process started beside a running agent is on `/metrics` before the agent's first
/// export (a minute away), with the CPU time and memory the kernel accounts of it, kept
/// current until that export, and counted.
#[test]
fn agent_lists_a_new_process_before_its_first_export() {
    require_root();
    let dir = scratch("early");
    let http = free_port();
    let config = agent_config(&dir, http, "export_interval: 60s\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    // Listed as it starts (a CPython's start may take less CPU than the kernel's 10 ms
    // accounting step), then it spends 0.5 s of CPU: the figure shown grows.
    let mut early = waiting_python(&dir, "early", "0.5");
    start_when_exported(http, &mut early);
    let label = format!("process_pid=\"{}\"", early.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, cpu) = loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        let cpu = metric_value(&text, "process_cpu_time_seconds_total", &label).unwrap_or(0.0);
        if cpu > 0.0 || Instant::now() > deadline {
            break (text, cpu);
        }
        thread::sleep(Duration::from_millis(50));
    };
    kill(&mut [&mut early]);
    assert!(stop(agent).success());
    // No export yet: the agent's sample count is still the one it starts with.
    assert_eq!(metric_value(&text, "stoker_samples_total", "").unwrap(), 0.0, "{text}");
    assert!(cpu > 0.0, "a CPython spending CPU before the first export; the agent lists {cpu} s");
    let memory = metric_value(&text, "process_memory_usage_bytes", &label).unwrap();
    assert!(memory > 1e6, "a started CPython holds megabytes; the agent lists {memory} bytes");
    assert_counts_agree(&text);
}

/// A duty-cycled process (10 ms of CPU every 50 ms) sampled at 19 Hz: the CPU time the
/// agent exports is the kernel's accounting of the process, not samples over the rate
/// (which miss such a process by 15% and more an interval). Each exported value is at most
/// what /proc says right after it is seen, and once the process idles the two agree
/// within 2% (the clock-tick resolution of /proc is 10 ms of some 0.8 s).
#[test]
fn agent_exports_the_kernels_cpu_time_of_a_duty_cycled_process() {
    require_root();
    let dir = scratch("duty");
    let http = free_port();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!("sample_rate_hz: 19\nexport_interval: 1s\nprometheus:\n  listen: 127.0.0.1:{http}\n"),
    )
    .unwrap();
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let code = "import sys, time\n\
                def duty(seconds, busy, period):\n\
                \x20   end = time.monotonic() + seconds\n\
                \x20   while time.monotonic() < end:\n\
                \x20       t = time.monotonic()\n\
                \x20       while time.monotonic() - t < busy: pass\n\
                \x20       time.sleep(period - busy)\n\
                sys.stdin.readline()\n\
                duty(4.0, 0.010, 0.050)\n\
                print('done', flush=True)\n\
                sys.stdin.readline()\n";
    let mut duty = Command::new(python("3.12.1"))
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = duty.id();
    wait_exported(http, pid);
    let mut stdin = duty.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    let label = format!("process_pid=\"{pid}\"");
    let mut out = std::io::BufReader::new(duty.stdout.take().unwrap());
    let reader = thread::spawn(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    });
    // While it works: each new value is at most what /proc says once it is seen.
    let (mut last, mut checked) = (None, 0);
    while !reader.is_finished() {
        let (_, text) = http_get(http, "/metrics").unwrap();
        let after = cpu_seconds(pid);
        let value = metric_value(&text, "process_cpu_time_seconds_total", &label);
        if let Some(v) = value
            && Some(v) != last
        {
            assert!(v <= after + 0.01, "the agent exported {v:.3} s; /proc says {after:.3} s after");
            last = Some(v);
            checked += 1;
        }
        thread::sleep(Duration::from_millis(20));
    }
    reader.join().unwrap();
    // Idle now: its /proc figure stays; the agent's reaches it at the next export.
    let spent = cpu_seconds(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reported = loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        let v = metric_value(&text, "process_cpu_time_seconds_total", &label).unwrap_or(0.0);
        if (v - spent).abs() <= 0.02 * spent || Instant::now() > deadline {
            break v;
        }
        thread::sleep(Duration::from_millis(100));
    };
    drop(stdin);
    let _ = duty.wait();
    assert!(stop(agent).success());
    eprintln!("duty-cycled process: agent {reported:.3} s, /proc {spent:.3} s; {checked} exports checked");
    assert!(checked >= 2, "fewer than 2 exports while the process worked");
    assert!(
        (reported - spent).abs() <= 0.02 * spent,
        "the agent exported {reported:.3} s of CPU; /proc says {spent:.3} s"
    );
}

/// A process in a v1 cgroup with a 0.3 CPU quota spends 0.6 s of CPU and idles: the agent
/// exports the cgroup's quota and, once the cgroup is quiet, exactly the throttling its own
/// `cpu.stat` counted.
#[test]
fn agent_exports_the_cgroup_quota_and_throttling() {
    require_root();
    let dir = scratch("cgroup");
    let http = free_port();
    let config = agent_config(&dir, http, "export_interval: 1s\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let cgroup = QuotaCgroup::new("stoker-agent-quota", 30000);
    let code = "import sys, time\nsys.stdin.readline()\nend = time.process_time() + 0.6\n\
                while time.process_time() < end: pass\nprint('done', flush=True)\nsys.stdin.readline()\n";
    let mut busy = Command::new(python("3.12.1"))
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cgroup.add(busy.id());
    wait_exported(http, busy.id());
    // Kept open: the process idles on its stdin once done.
    let mut stdin = busy.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(busy.stdout.take().unwrap()), &mut line)
        .unwrap();
    // Quiet: the period timer stops counting once the cgroup idles; the agent's next export
    // then reads what the test read.
    let stat = cgroup.settled();
    let label = format!("process_pid=\"{}\"", busy.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        let throttled = metric_value(&text, "stoker_cgroup_cpu_throttled_periods_total", &label);
        let periods = metric_value(&text, "stoker_cgroup_cpu_periods_total", &label);
        if (throttled, periods) == (Some(stat.1 as f64), Some(stat.0 as f64)) || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(100));
    };
    drop(stdin);
    kill(&mut [&mut busy]);
    assert!(stop(agent).success());
    let value = |name: &str| metric_value(&text, name, &label);
    eprintln!(
        "cgroup: agent {:?} throttled of {:?} periods, {:?} s; cpu.stat {stat:?}",
        value("stoker_cgroup_cpu_throttled_periods_total"),
        value("stoker_cgroup_cpu_periods_total"),
        value("stoker_cgroup_cpu_throttled_time_seconds_total")
    );
    assert!(stat.1 > 0, "0.6 s of CPU at a 0.3 CPU quota was not throttled: {stat:?}");
    assert_eq!(value("stoker_cgroup_cpu_quota"), Some(0.3));
    assert_eq!(value("stoker_cgroup_cpu_throttled_periods_total"), Some(stat.1 as f64));
    assert_eq!(value("stoker_cgroup_cpu_periods_total"), Some(stat.0 as f64));
    let time = value("stoker_cgroup_cpu_throttled_time_seconds_total").unwrap();
    assert!((time - stat.2).abs() < 1e-6, "throttled {time} s; cpu.stat {} s", stat.2);
}

/// `off_cpu.enabled`, `waits: followed`: a caller waiting on a slow upstream (100 ms an
/// answer, 16 answers). The agent's `socket` off-CPU time of the caller is the time the caller measured around
/// its requests less the CPU time they used, within what its wake-ups waited for a CPU
/// (counted as `runqueue`: 5% is generous) and 1 ms of clock reads.
#[test]
fn agent_exports_off_cpu_time_by_state() {
    agent_exports_socket_time("followed");
}

/// The same with `waits: sampled` (the default): the waits are the wall-clock sampler's
/// estimates at 99 Hz, within the sampling bound of 16 waits besides (4 deviations: 2
/// periods × √16, a period taken 10% longer than asked for the sampler's jitter and delays).
#[test]
fn agent_exports_sampled_off_cpu_time_by_state() {
    agent_exports_socket_time("sampled");
}

fn agent_exports_socket_time(waits: &str) {
    require_root();
    let dir = scratch("agent-offcpu");
    let http = free_port();
    let bound = if waits == "sampled" { 2.0 * 1.1 / 99.0 * 16f64.sqrt() } else { 0.0 };
    let config = agent_config(
        &dir,
        http,
        &format!("export_interval: 1s\noff_cpu:\n  enabled: true\n  waits: {waits}\n"),
    );
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    assert_sampler_policy(agent.id(), realtime_allowed());
    assert_capabilities_dropped(agent.id());
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/offcpu/upstream.py");
    let mut upstream = Command::new(python("3.12.1"))
        .args([fixture.to_str().unwrap(), "serve", "0.1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(upstream.stdout.as_mut().unwrap()), &mut port)
        .unwrap();
    let mut caller = Command::new(python("3.12.1"))
        .args([fixture.to_str().unwrap(), "call", port.trim(), "8", "wait"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_exported(http, caller.id());
    let mut stdin = caller.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(caller.stdout.take().unwrap()), &mut line)
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let (waited, cpu): (f64, f64) = (words[1].parse().unwrap(), words[3].parse().unwrap());
    let label = format!("process_pid=\"{}\"", caller.id());
    let socket_label = format!("{label},state=\"socket\"");
    // The caller now idles on its stdin: its socket time stops growing.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        let seen = off_cpu(&text, &label, "socket");
        if seen.is_some_and(|s| s >= 16.0 * 0.1 * 0.98 - bound) || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(200));
    };
    drop(stdin);
    kill(&mut [&mut caller, &mut upstream]);
    assert!(stop(agent).success());
    let socket = off_cpu(&text, &label, "socket").unwrap_or_else(|| panic!("no {socket_label}: {text}"));
    eprintln!("caller waited {waited:.4} s, ran {cpu:.4} s of it; agent ({waits}): socket {socket:.4} s");
    assert!(
        socket <= waited - cpu + 1e-3 + bound && socket >= 0.95 * (waited - cpu) - 1e-3 - bound,
        "the caller waited {waited:.4} s and ran {cpu:.4} s of it; the agent says {socket:.4} s on sockets"
    );
}

/// `off_cpu.enabled`: a process with a thread running Python (it holds the GIL whenever it
/// runs) and a thread hashing large buffers (hashlib lets the GIL go while it hashes). The
/// agent's GIL-held time is the Python thread's CPU time as it measured it, within the
/// sampling error at 499 Hz (4 standard deviations of the sample count), plus at most a
/// quarter of the hashing thread's CPU time (it holds the GIL between buffers) and the
/// hypervisor's steal (a sample's clock runs on through it, a thread's CPU time does not).
#[test]
fn agent_exports_gil_held_time() {
    require_root();
    let dir = scratch("agent-gil");
    let http = free_port();
    let config = dir.join("agent.yaml");
    let yaml = format!(
        "sample_rate_hz: 499\nexport_interval: 1s\nprometheus:\n  listen: 127.0.0.1:{http}\noff_cpu:\n  enabled: true\n"
    );
    std::fs::write(&config, yaml).unwrap();
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/offcpu/gil_mixed.py");
    let mut mixed = Command::new(python("3.12.1"))
        .args([fixture.to_str().unwrap(), "2", "wait"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_exported(http, mixed.id());
    let steal = steal_seconds();
    // Kept open: the process idles on its stdin once done.
    let mut stdin = mixed.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(mixed.stdout.take().unwrap()), &mut line)
        .unwrap();
    let steal = steal_seconds() - steal;
    let words: Vec<&str> = line.split_whitespace().collect();
    let (python_cpu, released_cpu): (f64, f64) = (words[1].parse().unwrap(), words[3].parse().unwrap());
    // The process idles now: its figure stops growing once an export after the end is out.
    let label = format!("process_pid=\"{}\"", mixed.id());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    let held = loop {
        thread::sleep(Duration::from_millis(1200));
        let (_, text) = http_get(http, "/metrics").unwrap();
        let now = metric_value(&text, "stoker_process_gil_held_time_seconds_total", &label);
        if (now.is_some() && now == last) || Instant::now() > deadline {
            break now.unwrap_or_else(|| panic!("no GIL-held time for {label}: {text}"));
        }
        last = now;
    };
    drop(stdin);
    kill(&mut [&mut mixed]);
    assert!(stop(agent).success());
    let sampling = 4.0 * (python_cpu * 499.0).sqrt() / 499.0;
    eprintln!(
        "threads measured: python {python_cpu:.3} s, hashing {released_cpu:.3} s of CPU; agent: GIL held {held:.3} s; {steal:.3} s stolen"
    );
    assert!(
        held >= python_cpu - sampling && held <= python_cpu + 0.25 * released_cpu + sampling + steal,
        "the Python thread ran {python_cpu:.3} s, the hashing thread {released_cpu:.3} s; the agent says the GIL was held {held:.3} s"
    );
}

/// `off_cpu.enabled`, `waits: followed`: a process whose threads blocked before the agent started
/// (blocked_before.py: the main thread asleep, one on a lock, one reading a silent peer).
/// No switch of theirs is ever seen, yet each wait counts from the agent's start: read
/// about 4 s after the agent was ready, each state has grown by at most the time since
/// then, and by at least that less 2 s (the exports are 1 s apart, the waits entered at
/// the first tick).
#[test]
fn waits_under_way_when_the_agent_starts_are_counted() {
    require_root();
    let dir = scratch("agent-waits");
    let http = free_port();
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/offcpu/blocked_before.py");
    let mut blocked =
        Command::new(python("3.12.1")).arg(fixture).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(blocked.stdout.take().unwrap()), &mut line)
        .unwrap();
    let config =
        agent_config(&dir, http, "export_interval: 1s\noff_cpu:\n  enabled: true\n  waits: followed\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let ready = Instant::now();
    thread::sleep(Duration::from_secs(4));
    let (_, text) = http_get(http, "/metrics").unwrap();
    let since = ready.elapsed().as_secs_f64();
    kill(&mut [&mut blocked]);
    assert!(stop(agent).success());
    let label = format!("process_pid=\"{}\"", blocked.id());
    for state in ["sleep", "lock", "socket"] {
        let waited = off_cpu(&text, &label, state).unwrap_or_else(|| panic!("no {state} time: {text}"));
        eprintln!("{state}: {waited:.3} s of {since:.3} s since the agent was ready");
        assert!(waited <= since && waited >= since - 2.0, "{state}: {waited:.3} s of {since:.3} s");
    }
}

/// The agent's wall-clock sampler thread (`stoker-wall`) is in the real-time class
/// (`SCHED_FIFO`, policy 1 in the 41st field of its `/proc/PID/task/TID/stat`) when
/// `realtime` (the tests may take it), so that it samples on time while the CPUs are busy;
/// else in the normal class (policy 0).
fn assert_sampler_policy(agent: u32, realtime: bool) {
    let tasks = std::fs::read_dir(format!("/proc/{agent}/task")).unwrap();
    let policies: Vec<(String, String)> = tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            Some((name.to_string(), rest.split_whitespace().nth(38)?.to_string()))
        })
        .collect();
    let sampler = policies.iter().find(|(name, _)| name == "stoker-wall");
    let want = if realtime { "1" } else { "0" };
    assert!(
        sampler.is_some_and(|(_, policy)| policy == want),
        "the agent's threads and their policies: {policies:?}"
    );
}

/// The value of `stoker_process_off_cpu_time_seconds_total` for the process labelled
/// `label` in `state`.
fn off_cpu(text: &str, label: &str, state: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with("stoker_process_off_cpu_time_seconds_total{")
                && l.contains(label)
                && l.contains(&format!("state=\"{state}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `off_cpu.enabled`: an asyncio server whose handler runs 300 ms of Python on two of four
/// requests. The agent's histogram of blocked loop stretches counts two, their sum what the
/// handler measured of itself plus at most 20 ms each of the loop's own work around it.
#[test]
fn agent_exports_blocked_event_loop_stretches() {
    require_root();
    let dir = scratch("agent-loop");
    let http = free_port();
    let config = agent_config(&dir, http, "export_interval: 1s\noff_cpu:\n  enabled: true\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/offcpu/asyncio_server.py");
    let mut server =
        Command::new(python("3.12.1")).arg(fixture).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut port = String::new();
    std::io::BufRead::read_line(&mut out, &mut port).unwrap();
    wait_exported(http, server.id());
    let conn = std::net::TcpStream::connect(("127.0.0.1", port.trim().parse::<u16>().unwrap())).unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut handler = 0.0;
    for request in ["slow", "fast", "slow", "fast"] {
        std::io::Write::write_all(&mut &conn, format!("{request}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut reader, &mut answer).unwrap();
        if request == "slow" {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            handler += line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap();
        }
    }
    let label = format!("process_pid=\"{}\"", server.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        let count = metric_value(&text, "stoker_event_loop_blocked_duration_seconds_count", &label);
        if count == Some(2.0) || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(200));
    };
    kill(&mut [&mut server]);
    assert!(stop(agent).success());
    let value = |name: &str| metric_value(&text, name, &label);
    let (count, sum) = (
        value("stoker_event_loop_blocked_duration_seconds_count"),
        value("stoker_event_loop_blocked_duration_seconds_sum"),
    );
    eprintln!("handler measured {handler:.4} s; agent: {count:?} stretches, {sum:?} s");
    assert_eq!(count, Some(2.0), "two slow requests");
    let sum = sum.unwrap();
    assert!(sum >= handler - 0.002 && sum <= handler + 0.04, "handler {handler:.4} s, stretches {sum:.4} s");
}
