//! End-to-end tests of `stoker record` and `stoker doctor`: real programs loaded into the
//! real kernel, sampling real processes. Run as root.
mod common;

use std::{process::Command, thread, time::Duration};

use common::*;

/// Two hot functions under one parent: stoker's split matches what perf sees on the same
/// run, and the callers appear in the stacks.
#[test]
fn native_split_matches_perf() {
    require_root();
    let hot = build_c("hot");
    let dir = scratch("split");
    let mut target = spawn(&hot, &["8"]);
    let pid = target.id().to_string();
    thread::sleep(Duration::from_millis(300));
    let perf_data = dir.join("perf.data");
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "99", "-g", "-p", &pid, "-o"])
        .arg(&perf_data)
        .args(["--", "sleep", "5"])
        .spawn()
        .expect("perf must be installed (cargo xtask setup installs linux-perf)");
    let folded = dir.join("hot.folded");
    let out = stoker(&["record", "--pid", &pid, "-d", "5", "-f", "folded", "-o", folded.to_str().unwrap()]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    assert!(perf.wait().unwrap().success(), "perf record failed");
    target.kill().ok();
    target.wait().ok();

    let profile = Folded::read(&folded);
    let total = profile.total();
    assert!(total >= 400, "expected about 495 samples at 99 Hz over 5 s, got {total}");
    let a = profile.with_frame(|f| f == "hot_a");
    let b = profile.with_frame(|f| f == "hot_b");
    assert!(a + b >= total * 95 / 100, "hot_a + hot_b should hold nearly all samples: {a} + {b} of {total}");
    for leaf in ["hot_a", "hot_b"] {
        for stack in profile.stacks_with(leaf) {
            let joined = stack.join(";");
            assert!(joined.contains("main;parent;"), "{leaf} stack lacks main and parent: {joined}");
        }
    }
    let stoker_share = a as f64 / (a + b) as f64;

    let perf_samples = perf_samples(&perf_data);
    let pa = perf_samples.iter().filter(|s| s.iter().any(|f| f == "hot_a")).count();
    let pb = perf_samples.iter().filter(|s| s.iter().any(|f| f == "hot_b")).count();
    assert!(pa + pb >= 300, "perf saw too few samples: {pa} + {pb}");
    let perf_share = pa as f64 / (pa + pb) as f64;
    eprintln!(
        "hot_a share: stoker {:.1}% of {} samples, perf {:.1}% of {} samples",
        100.0 * stoker_share,
        a + b,
        100.0 * perf_share,
        pa + pb
    );
    assert!(
        (stoker_share - perf_share).abs() <= 0.05,
        "hot_a share differs from perf's: stoker {stoker_share:.3}, perf {perf_share:.3}"
    );
    assert!(stderr(&out).contains("lost 0"), "samples were lost: {}", stderr(&out));
}

/// Time spent in system calls shows kernel frames under the user frames.
#[test]
fn syscall_heavy_program_shows_kernel_frames() {
    require_root();
    let prog = build_c("syscalls");
    let folded = scratch("kernel").join("sys.folded");
    let out = stoker(&[
        "record",
        "-d",
        "3",
        "-f",
        "folded",
        "-o",
        folded.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
        "4",
    ]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let profile = Folded::read(&folded);
    let total = profile.total();
    let kernel = profile.with_frame(|f| f.ends_with("_[k]"));
    assert!(total >= 200, "too few samples: {total}");
    assert!(kernel * 2 >= total, "expected most samples in the kernel, got {kernel} of {total}");
    let reads = profile.with_frame(|f| f == "ksys_read_[k]" || f == "read_zero_[k]");
    assert!(reads * 2 >= total, "expected the read path in kernel frames: {reads} of {total}");
    let joined: Vec<String> = profile.0.keys().map(|s| s.join(";")).collect();
    assert!(
        joined.iter().any(|s| s.contains("main;") && s.contains("_[k]")),
        "kernel frames should sit under the user frames: {joined:?}"
    );
}

/// A target that exits mid-session ends it; the output is still written and the SVG is
/// well-formed XML that names the hot functions.
#[test]
fn target_exiting_mid_session_still_writes_output() {
    require_root();
    let hot = build_c("hot");
    let dir = scratch("exit");

    // Launched command.
    let svg = dir.join("launched.svg");
    let out = stoker(&["record", "-d", "60", "-o", svg.to_str().unwrap(), "--", hot.to_str().unwrap(), "2"]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    assert!(stderr(&out).contains("target exited"), "session should end with the target: {}", stderr(&out));
    let text = std::fs::read_to_string(&svg).unwrap();
    let options = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    let doc =
        roxmltree::Document::parse_with_options(&text, options).expect("the flamegraph must be valid XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert!(text.contains("hot_a") && text.contains("parent"), "flamegraph lacks the hot functions");

    // Attached PID, no duration: the session ends when the process does.
    let mut target = spawn(&hot, &["2"]);
    let pid = target.id().to_string();
    let folded = dir.join("attached.folded");
    let started = std::time::Instant::now();
    let out = stoker(&["record", "-p", &pid, "-f", "folded", "-o", folded.to_str().unwrap()]);
    target.wait().unwrap();
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(10), "session outlived its target");
    let profile = Folded::read(&folded);
    assert!(profile.with_frame(|f| f == "hot_a") > 50, "attached profile lacks hot_a");
}

/// Threads started after the session began are sampled too.
#[test]
fn threads_started_during_session_are_sampled() {
    require_root();
    let prog = build_c("threads");
    let folded = scratch("threads").join("threads.folded");
    let out = stoker(&[
        "record",
        "-f",
        "folded",
        "-o",
        folded.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
        "2",
    ]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let profile = Folded::read(&folded);
    let late = profile.with_frame(|f| f == "late_thread_work");
    assert!(late >= 150, "the late thread's function should hold ~198 samples, got {late}");
}

/// Ctrl-C ends the session early and the output is still written.
#[test]
fn interrupt_writes_output() {
    require_root();
    let hot = build_c("hot");
    let folded = scratch("sigint").join("int.folded");
    let child = Command::new(STOKER)
        .args(["record", "-f", "folded", "-o", folded.to_str().unwrap(), "--", hot.to_str().unwrap(), "30"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    assert!(Folded::read(&folded).with_frame(|f| f == "hot_a") > 50, "interrupted profile lacks hot_a");
}

/// Bad input: one clear line, non-zero exit, no panic.
#[test]
fn bad_input_gets_one_line_errors() {
    require_root();
    let dir = scratch("bad");
    let out_path = dir.join("x.svg");
    let out = stoker(&["record", "-p", "4000000", "-d", "1", "-o", out_path.to_str().unwrap()]);
    assert_one_line_error(&out, "no process with PID 4000000");

    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let out = stoker(&["record", "-p", &pid, "-d", "1", "-o", "/nonexistent/dir/x.svg"]);
    sleeper.kill().ok();
    sleeper.wait().ok();
    assert_one_line_error(&out, "cannot write /nonexistent/dir/x.svg");

    let out = stoker(&["record", "-d", "1", "-o", out_path.to_str().unwrap(), "--", "/nonexistent/program"]);
    assert_one_line_error(&out, "cannot start `/nonexistent/program`");

    // Without privileges: an unprivileged user with no capabilities.
    let unpriv = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(STOKER)
        .args(["record", "-d", "1", "-o", "/tmp/stoker-unpriv.svg", "--", "true"])
        .output()
        .expect("setpriv (util-linux) must be installed");
    assert_one_line_error(&unpriv, "missing privileges");
    assert!(stderr(&unpriv).contains("CAP_BPF"), "the error should name the capability: {}", stderr(&unpriv));
}

/// `stoker doctor` loads the real programs and reports what works; without privileges it
/// fails and says why.
#[test]
fn doctor_reports_capabilities() {
    require_root();
    let out = stoker(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "doctor failed as root:\n{text}");
    for name in
        ["capabilities", "eBPF programs", "perf events", "new processes", "network", "BTF", "tracepoints"]
    {
        let line =
            text.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("no {name} line:\n{text}"));
        assert!(line.starts_with("ok"), "{name} should be ok as root: {line}");
    }
    assert!(text.lines().any(|l| l.contains("kprobes")), "kprobes line missing:\n{text}");
    assert!(text.lines().any(|l| l.contains("uprobes")), "uprobes line missing:\n{text}");

    let unpriv = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .args([STOKER, "doctor"])
        .output()
        .expect("setpriv (util-linux) must be installed");
    let text = String::from_utf8_lossy(&unpriv.stdout).into_owned();
    assert!(!unpriv.status.success(), "doctor should fail without privileges:\n{text}");
    let caps = text.lines().find(|l| l.contains("capabilities")).unwrap();
    assert!(caps.starts_with("FAIL") && caps.contains("CAP_BPF"), "{caps}");
}

/// `--format pprof` writes a gzipped profile.proto that protobuf's own Python runtime
/// decodes (classes generated by grpcio-tools' protoc from the published .proto).
#[test]
fn pprof_output_decodes_with_protoc_generated_code() {
    require_root();
    let hot = build_c("hot");
    let dir = scratch("pprof");
    let pb = dir.join("hot.pb.gz");
    let out = stoker(&[
        "record",
        "-d",
        "3",
        "-f",
        "pprof",
        "-o",
        pb.to_str().unwrap(),
        "--",
        hot.to_str().unwrap(),
        "30",
    ]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let p = decode_pprof(&pb);

    assert_eq!(p["gzip"], true, "the file must be gzipped");
    assert_eq!(p["string0"], "", "string_table[0] must be empty");
    let sample_type = p["sample_type"].as_array().unwrap();
    assert!(sample_type.contains(&serde_json::json!(["cpu", "nanoseconds"])), "sample_type: {sample_type:?}");
    assert_eq!(p["period_type"], serde_json::json!(["cpu", "nanoseconds"]));
    let period = p["period"].as_i64().unwrap();
    assert_eq!(period, 1_000_000_000 / 99, "default rate is 99 Hz");
    let samples = p["samples"].as_i64().unwrap();
    assert!(samples > 200, "expected about 297 samples at 99 Hz over 3 s, got {samples}");
    assert_eq!(p["cpu_nanos"].as_i64().unwrap(), samples * period, "cpu ns = count x period");
    let duration = p["duration_nanos"].as_i64().unwrap();
    assert!((2_500_000_000..5_000_000_000).contains(&duration), "duration_nanos {duration}");
    assert!(p["time_nanos"].as_i64().unwrap() > 1_600_000_000_000_000_000, "time_nanos: {}", p["time_nanos"]);
    let functions: Vec<&str> = p["functions"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
    for f in ["hot_a", "hot_b", "parent", "main"] {
        assert!(functions.contains(&f), "{f} missing from the functions: {functions:?}");
    }
    assert_eq!(
        p["distinct_functions"].as_u64().unwrap() as usize,
        functions.len(),
        "functions must be unique"
    );
    // Leaf first: the hot functions are the samples' first locations.
    let leaf = |f: &str| p["leaf"][f].as_i64().unwrap_or(0);
    assert!(leaf("hot_a") + leaf("hot_b") >= samples * 9 / 10, "leaves: {}", p["leaf"]);
    assert!(leaf("hot_a") > leaf("hot_b"), "hot_a burns 3x hot_b's CPU: {}", p["leaf"]);
    assert!(p["inclusive"]["main"].as_i64().unwrap() >= samples * 9 / 10, "main under the hot functions");
}

/// `--format speedscope` writes speedscope's JSON file format.
#[test]
fn speedscope_output_follows_the_file_format() {
    require_root();
    let hot = build_c("hot");
    let path = scratch("speedscope").join("hot.speedscope.json");
    let out = stoker(&[
        "record",
        "-d",
        "3",
        "-f",
        "speedscope",
        "-o",
        path.to_str().unwrap(),
        "--",
        hot.to_str().unwrap(),
        "30",
    ]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let text = std::fs::read_to_string(&path).unwrap();
    let file: serde_json::Value = serde_json::from_str(&text).expect("speedscope output must be JSON");
    assert_eq!(file["$schema"], "https://www.speedscope.app/file-format-schema.json");
    assert!(file["exporter"].as_str().unwrap().starts_with("stoker "), "exporter: {}", file["exporter"]);
    assert!(file["name"].as_str().unwrap().starts_with("stoker: hot"), "name: {}", file["name"]);
    let frames = file["shared"]["frames"].as_array().expect("shared.frames");
    let profiles = file["profiles"].as_array().expect("profiles");
    assert_eq!(profiles.len(), 1, "one profile");
    let p = &profiles[0];
    assert_eq!(p["type"], "sampled");
    let samples = p["samples"].as_array().unwrap();
    let weights = p["weights"].as_array().unwrap();
    assert_eq!(samples.len(), weights.len(), "one weight per sample");
    for sample in samples {
        for i in sample.as_array().unwrap() {
            assert!(
                (i.as_u64().unwrap() as usize) < frames.len(),
                "frame index {i} out of {} frames",
                frames.len()
            );
        }
    }
    let total: u64 = weights.iter().map(|w| w.as_u64().unwrap()).sum();
    assert!(total > 200, "expected about 297 samples at 99 Hz over 3 s, got {total}");
    assert_eq!(p["endValue"].as_u64(), Some(total));
    assert!(frames.iter().any(|f| f["name"] == "hot_a"), "hot_a missing from the frames");
}
