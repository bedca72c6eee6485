//! End-to-end tests of the agent's OTLP export over gRPC and of OTLP profiles, received
//! by a server built on the official opentelemetry-proto package. Run as root.
mod common;

use std::{
    thread,
    time::{Duration, Instant},
};

use common::{agent::*, *};

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
    kill(&mut [&mut busy, &mut receiver]);
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
    let mut busy = waiting_python(&dir, "busy", "2");
    start_when_exported(http, &mut busy);
    let deadline = Instant::now() + Duration::from_secs(20);
    // The workload may end and leave the export meanwhile: its value is kept as seen.
    let mut seen = None;
    loop {
        let (_, text) = http_get(http, "/metrics").unwrap();
        seen = cpu_time_in(&text, busy.id()).or(seen);
        match metric_value(&text, "stoker_export_failures_total", "") {
            Some(n) if n >= 2.0 => break,
            _ => assert!(Instant::now() < deadline, "no failed gRPC attempt was counted: {text}"),
        }
        thread::sleep(Duration::from_millis(200));
    }
    // Sampling goes on while the exports fail: the workload's CPU time is what it spent.
    let spent = wait_spent(&mut busy, &dir.join("busy.json"));
    let (reported, _) = final_cpu_time_after(http, busy.id(), seen);
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
    kill(&mut [&mut receiver]);
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");
    assert_cpu_time("sampled while exports failed", reported, &spent, 99.0);
}

/// With `otlp.profiles: true` each interval's profile of a workload arrives as OTLP
/// profiles (http/protobuf, /v1development/profiles), decodes with the official
/// opentelemetry-proto package, and shows its Python functions with files and lines; all
/// its profiles together hold the samples of the CPU time it spent, split between its
/// functions as it measured.
#[test]
fn agent_exports_otlp_profiles() {
    require_root();
    let dir = scratch("profiles");
    let (otlp, http) = (free_port(), free_port());
    let mut receiver = otlp_receiver("http", otlp, &dir);
    let config = agent_config(&dir, http, "export_interval: 2s\notlp:\n  profiles: true\n");
    let agent =
        agent_with_env(&config, &[("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))]);
    wait_ready(http);
    // 6 s of CPU: some 600 samples, which hold a share to +-0.08 (4 binomial deviations).
    let mut busy = waiting_python(&dir, "busy", "6");
    start_when_exported(http, &mut busy);
    let spent = wait_spent(&mut busy, &dir.join("busy.json"));
    let own: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("busy.json")).unwrap()).unwrap();
    // Its last interval exported; SIGTERM then flushes the requests under way.
    final_cpu_time(http, busy.id());
    let status = stop(agent);
    let pid = busy.id().to_string();
    let received = dir.join("profiles.ndjson");
    let profiles_of_busy = || -> Vec<serde_json::Value> {
        ndjson(&received)
            .iter()
            .flat_map(|r| r["profiles"].as_array().cloned().unwrap_or_default())
            .filter(|p| p["attributes"]["process.pid"] == pid)
            .collect()
    };
    // The receiver writes what it got; the agent's last request is answered once written.
    let profiles = profiles_of_busy();
    kill(&mut [&mut receiver]);
    assert!(status.success(), "the agent should exit 0 on SIGTERM: {status}");
    assert!(!profiles.is_empty(), "no profile of the workload arrived");

    let (mut total, mut with) = (0i64, std::collections::HashMap::<&str, i64>::new());
    let (mut leaf_burn, mut leaf_loop) = (0, 0);
    for p in &profiles {
        let attrs = &p["attributes"];
        assert_eq!(attrs["service.name"], "workload", "{attrs}");
        assert_eq!(attrs["process.runtime.version"], "3.12.1", "{attrs}");
        assert_eq!(p["sample_type"], serde_json::json!(["samples", "count"]));
        assert_eq!(p["period_type"], serde_json::json!(["cpu", "nanoseconds"]));
        assert_eq!(p["period"], 1_000_000_000 / 99);
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
                    // The call line, or the `def` line for a sample at the function's entry.
                    let call = workload_line(f) as i64;
                    assert!(frame["line"] == call || frame["line"] == call - 1, "{frame}");
                    *with.entry(f).or_default() += n;
                }
            }
        }
    }
    // Samples x period: the CPU time it spent.
    assert_cpu_time("samples in its profiles", total as f64 / 99.0, &spent, 99.0);
    assert!(leaf_burn as f64 > 0.8 * total as f64, "burn is the leaf of {leaf_burn} of {total} samples");
    // The loop's body line dominates (the `for` line gets the rest).
    assert!(
        leaf_loop * 2 > leaf_burn,
        "burn's loop body is the leaf line of {leaf_loop} of {leaf_burn} samples"
    );
    let in_funcs: i64 = with.values().sum();
    for f in ["func_a", "func_b", "func_c"] {
        let got = *with.get(f).unwrap_or(&0) as f64 / in_funcs as f64;
        let (share, stalls) = measured_share(&own, f);
        let tolerance = share_tolerance(share, in_funcs as u64) + stalls;
        eprintln!("{f}: {got:.3} of {in_funcs} samples, the workload measured {share:.3} (+-{tolerance:.3})");
        assert!(
            (got - share).abs() <= tolerance,
            "{f}: {got:.3} of the samples, the workload measured {share:.3}"
        );
    }
}
