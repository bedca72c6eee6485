//! End-to-end tests of `stoker record` and `stoker doctor`: real programs loaded into the
//! real kernel, sampling real processes. Run as root.
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// What a native fixture printed about itself (one JSON line on stdout).
fn own_report(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout)
        .unwrap_or_else(|_| panic!("the fixture printed no report: {}", String::from_utf8_lossy(stdout)))
}

/// Seconds field `key` of a fixture's report.
fn secs(report: &Value, key: &str) -> f64 {
    report[key].as_f64().unwrap_or_else(|| panic!("no {key} in {report}"))
}

/// `hot` started by the test, waiting for a line on stdin to start its work.
fn hot_waiting(hot: &std::path::Path, seconds: &str) -> std::process::Child {
    Command::new(hot)
        .args([seconds, "wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fixture")
}

/// `stoker record` on an existing process until it exits; returns once sampling runs.
fn record_pid(pid: u32, extra: &[&str], output: &std::path::Path) -> (std::process::Child, Stderr) {
    let mut stoker = Command::new(STOKER)
        .args(["record", "-p", &pid.to_string(), "-f", "folded", "-o", output.to_str().unwrap()])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stoker");
    let mut err = Stderr::of(&mut stoker);
    err.wait_for("sampling at");
    (stoker, err)
}

/// Two hot functions under one parent: stoker counts the CPU time hot measured in each,
/// its split matches what perf sees on the same run, and the callers appear in the stacks.
#[test]
fn native_split_matches_perf() {
    require_root();
    let hot = build_c("hot");
    let dir = scratch("split");
    // 999 Hz over 3 s: some 3,000 samples each, so that the two shares can be held to
    // +-0.045 (4 standard deviations of the difference of two binomial shares at 75%).
    let hz = 999.0;
    let mut target = hot_waiting(&hot, "3");
    let pid = target.id().to_string();
    let perf_data = dir.join("perf.data");
    // perf ends when the target does; it is compared by share only, so when it starts
    // does not matter.
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-p", &pid, "-o"])
        .arg(&perf_data)
        .spawn()
        .expect("perf must be installed (cargo xtask setup installs linux-perf)");
    let folded = dir.join("hot.folded");
    let (mut stoker, err) = record_pid(target.id(), &["-r", "999"], &folded);
    writeln!(target.stdin.take().unwrap(), "go").unwrap();
    let own = own_report(&target.wait_with_output().unwrap().stdout);
    let status = wait_exit(&mut stoker, "stoker");
    let err = err.rest();
    assert!(status.success(), "stoker failed: {err}");
    assert!(wait_exit(&mut perf, "perf").success(), "perf record failed");

    let profile = Folded::read(&folded);
    let total = profile.total();
    let a = profile.with_frame(|f| f == "hot_a");
    let b = profile.with_frame(|f| f == "hot_b");
    assert_samples("hot_a", a, secs(&own, "hot_a"), hz);
    assert_samples("hot_b", b, secs(&own, "hot_b"), hz);
    assert!(a + b >= total * 95 / 100, "hot_a + hot_b should hold nearly all samples: {a} + {b} of {total}");
    // The callers are in the stacks: main;parent;hot_x, except for a sample taken at the
    // leaf's first instruction, before it pushes its frame pointer, which frame pointers
    // cannot attribute to its caller (main;hot_x). Such samples are rarer than the
    // instruction's share suggests but not negligible (the first instruction after a call
    // waits for its fetch); perf, unwinding the same way, sees them at the same rate.
    let mut unattributed = 0;
    for leaf in ["hot_a", "hot_b"] {
        for stack in profile.stacks_with(leaf) {
            let joined = stack.join(";");
            if !joined.contains(&format!("main;parent;{leaf}")) {
                assert!(
                    joined.ends_with(&format!("main;{leaf}")),
                    "{leaf} stack lacks main and parent: {joined}"
                );
                unattributed += profile.0[stack];
            }
        }
    }
    let stoker_share = a as f64 / (a + b) as f64;

    let perf_samples = perf_samples(&perf_data);
    let pa = perf_samples.iter().filter(|s| s.iter().any(|f| f == "hot_a")).count() as u64;
    let pb = perf_samples.iter().filter(|s| s.iter().any(|f| f == "hot_b")).count() as u64;
    assert!(pa + pb > 0, "perf saw no samples of hot_a or hot_b");
    let perf_unattributed = perf_samples
        .iter()
        .filter(|s| s.iter().any(|f| f == "hot_a" || f == "hot_b") && !s.iter().any(|f| f == "parent"))
        .count();
    // At perf's rate, scaled to stoker's sample count, within 4 Poisson deviations.
    let expected = perf_unattributed as f64 * (a + b) as f64 / (pa + pb) as f64;
    eprintln!("stacks without parent: stoker {unattributed}, perf {perf_unattributed}");
    assert!(
        unattributed as f64 <= expected + sampling_tolerance(expected.max(1.0)),
        "{unattributed} hot samples without their caller; perf had {perf_unattributed} of {}",
        pa + pb
    );
    let perf_share = pa as f64 / (pa + pb) as f64;
    let p = secs(&own, "hot_a") / (secs(&own, "hot_a") + secs(&own, "hot_b"));
    // The two shares are independent binomial estimates of p (hot's own).
    let tolerance = share_tolerance(p, a + b).hypot(share_tolerance(p, pa + pb));
    eprintln!(
        "hot_a share: stoker {:.1}% of {} samples, perf {:.1}% of {} samples, hot's own {:.1}%",
        100.0 * stoker_share,
        a + b,
        100.0 * perf_share,
        pa + pb,
        100.0 * p
    );
    assert!(
        (stoker_share - perf_share).abs() <= tolerance,
        "hot_a share differs from perf's: stoker {stoker_share:.3}, perf {perf_share:.3} (+-{tolerance:.3})"
    );
    assert!(err.contains("lost 0"), "samples were lost: {err}");
}

/// Time spent in system calls shows kernel frames under the user frames.
#[test]
fn syscall_heavy_program_shows_kernel_frames() {
    require_root();
    let prog = build_c("syscalls");
    let folded = scratch("kernel").join("sys.folded");
    let out = record_folded(&folded, &["--", prog.to_str().unwrap(), "3"]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let profile = Folded::read(&folded);
    let total = profile.total();
    let kernel = profile.with_frame(|f| f.ends_with("_[k]"));
    // Sampled from its first instruction to its exit: the CPU time it measured at its end.
    assert_samples("the process", total, secs(&own_report(&out.stdout), "process_cpu"), 99.0);
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

    // Attached PID, no duration: the session ends when the process does, with the samples
    // of the work hot did once it was watched.
    let mut target = hot_waiting(&hot, "2");
    let folded = dir.join("attached.folded");
    let (mut stoker, err) = record_pid(target.id(), &[], &folded);
    writeln!(target.stdin.take().unwrap(), "go").unwrap();
    let own = own_report(&target.wait_with_output().unwrap().stdout);
    let status = wait_exit(&mut stoker, "stoker (its target exited)");
    let err = err.rest();
    assert!(status.success(), "stoker failed: {err}");
    assert!(err.contains("target exited"), "the session should end with its target: {err}");
    let profile = Folded::read(&folded);
    assert_samples("attached hot_a", profile.with_frame(|f| f == "hot_a"), secs(&own, "hot_a"), 99.0);
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
    assert_samples("the late thread", late, secs(&own_report(&out.stdout), "late_thread"), 99.0);
}

/// CPU seconds of process `pid` from /proc (user + system, in 1/100 s ticks).
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// Ctrl-C ends the session early and the output is still written, with at least the
/// samples of the CPU time the command had used when the signal was sent.
#[test]
fn interrupt_writes_output() {
    require_root();
    let hot = build_c("hot");
    let folded = scratch("sigint").join("int.folded");
    let mut child = Command::new(STOKER)
        .args(["record", "-f", "folded", "-o", folded.to_str().unwrap(), "--", hot.to_str().unwrap(), "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = Stderr::of(&mut child);
    err.wait_for("sampling at");
    // The launched command is stoker's only child; interrupt once it has run a second.
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let hot_pid: u32 =
        std::fs::read_to_string(&children).unwrap().trim().parse().expect("the launched command");
    let deadline = Instant::now() + Duration::from_secs(20);
    while proc_cpu_seconds(hot_pid) < 1.0 {
        assert!(Instant::now() < deadline, "the command used less than a second of CPU in 20 s");
        thread::sleep(Duration::from_millis(50));
    }
    // A tick less: /proc counts whole ticks.
    let used = proc_cpu_seconds(hot_pid) - 0.01;
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut child, "stoker");
    let err = err.rest();
    assert!(status.success(), "stoker failed: {err}");
    assert!(err.contains("interrupted"), "{err}");
    let profile = Folded::read(&folded);
    let got = profile.with_frame(|f| f == "hot_a" || f == "hot_b");
    let expected = used * 99.0;
    eprintln!("interrupted: {got} samples in hot_a and hot_b, the command had used {used:.2} s of CPU");
    assert!(
        got as f64 >= expected - sampling_tolerance(expected),
        "{got} samples in hot_a and hot_b; the command had used {used:.2} s of CPU before the interrupt"
    );
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
    assert_one_line_error(&out, "cannot write /nonexistent/dir/x.svg");
    // The network report's path is checked before the session too: nothing is left behind.
    let net_dir = scratch("bad-net");
    std::fs::create_dir_all(net_dir.join("n.net.json")).unwrap();
    let profile = net_dir.join("n.folded");
    let out =
        stoker(&["record", "-p", &pid, "--net", "-d", "1", "-f", "folded", "-o", profile.to_str().unwrap()]);
    sleeper.kill().ok();
    sleeper.wait().ok();
    assert_one_line_error(&out, &format!("cannot write {}", net_dir.join("n.net.json").display()));
    assert!(!profile.exists(), "a failed run left {}", profile.display());

    // A thread's id is no process's: its process is named.
    let mut threaded = Command::new("/usr/bin/python3")
        .args(["-c", "import threading, time\nt = threading.Thread(target=time.sleep, args=(30,))\nt.start()\nprint(t.native_id, flush=True)\nt.join()"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tid = String::new();
    BufReader::new(threaded.stdout.take().unwrap()).read_line(&mut tid).unwrap();
    let out = stoker(&["record", "-p", tid.trim(), "-d", "1", "-o", out_path.to_str().unwrap()]);
    threaded.kill().ok();
    threaded.wait().ok();
    assert_one_line_error(
        &out,
        &format!(
            "{} is a thread of process {}, not a process: give the process's PID",
            tid.trim(),
            threaded.id()
        ),
    );

    let out = stoker(&["record", "-d", "1", "-o", out_path.to_str().unwrap(), "--", "/nonexistent/program"]);
    assert_one_line_error(&out, "cannot start `/nonexistent/program`");

    // Without privileges: an unprivileged user with no capabilities. The output file it
    // could create is not left behind, empty.
    let open_dir = scratch("unpriv");
    std::fs::set_permissions(&open_dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let unpriv_out = open_dir.join("unpriv.svg");
    let unpriv = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(STOKER)
        .args(["record", "-d", "1", "-o", unpriv_out.to_str().unwrap(), "--", "true"])
        .output()
        .expect("setpriv (util-linux) must be installed");
    assert_one_line_error(&unpriv, "missing privileges");
    assert!(stderr(&unpriv).contains("CAP_BPF"), "the error should name the capability: {}", stderr(&unpriv));
    assert!(!unpriv_out.exists(), "a failed run left {}", unpriv_out.display());

    // A kernel thread has no user code to sample.
    let out = stoker(&["record", "-p", "2", "-d", "1", "-o", out_path.to_str().unwrap()]);
    assert_one_line_error(&out, "pid 2 (kthreadd) is a kernel thread");

    // Command-line mistakes: one line naming the help to read, exit status 2 as clap's.
    for (args, expected) in [
        (&["record", "-r", "-5"][..], "unexpected argument '-5' found (see `stoker record --help`)"),
        (&["record", "--bogus"][..], "unexpected argument '--bogus' found (see `stoker record --help`)"),
        (&["record", "-r", "0"][..], "invalid value '0' for '--rate <RATE>'"),
        (&["record", "-p", "0"][..], "invalid value '0' for '--pid <PID>'"),
        (&["record"][..], "nothing to record: give --pid PID, --all-python or a command after `--`"),
        (&["advise"][..], "nothing to watch: give --pid PID, --all-python or a command after `--`"),
        (&["recrod"][..], "unrecognized subcommand 'recrod'; did you mean record? (see `stoker --help`)"),
    ] {
        let out = stoker(args);
        assert_one_line_error(&out, expected);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

/// A launched command's exit status is stoker's (as when it runs alone), its profile
/// still written.
#[test]
fn a_launched_command_exit_status_is_stokers() {
    require_root();
    let folded = scratch("status").join("s.folded");
    let run = record_folded(&folded, &["--", "sh", "-c", "exit 3"]);
    assert_eq!(run.status.code(), Some(3), "{}", stderr(&run));
    assert!(stderr(&run).contains("stoker: wrote"), "{}", stderr(&run));
    let run = record_folded(&folded, &["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(run.status.code(), Some(128 + 15), "killed by SIGTERM: {}", stderr(&run));
    let run = record_folded(&folded, &["--", "true"]);
    assert!(run.status.success(), "{}", stderr(&run));
}

/// A target that is not CPython and does not run: one line says it is not CPython when it
/// is given, and the summary says why there are no samples (its CPU time, and what shows
/// where an idle process waits).
#[test]
fn an_idle_native_target_is_told_apart() {
    require_root();
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let folded = scratch("idle").join("i.folded");
    let out = record_folded(&folded, &["-p", &sleeper.id().to_string(), "-d", "1"]);
    sleeper.kill().ok();
    sleeper.wait().ok();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let warning = format!(
        "stoker: warning: process {} (sleep) is not a CPython process stoker recognizes",
        sleeper.id()
    );
    assert_eq!(err.lines().filter(|l| l.starts_with(&warning)).count(), 1, "{err}");
    assert!(err.contains("0 samples in"), "{err}");
    assert!(err.contains("no samples: the targets used 0.000 s of CPU during the session"), "{err}");
    assert!(err.contains("`--mode wall` shows where"), "{err}");
    assert!(err.contains("no CPython process stoker walks was found"), "{err}");
}

/// Code built without frame pointers leaves the frame-pointer register holding anything:
/// here a chain of 39 made-up frames whose return addresses lie outside every mapping.
/// The stack ends at the first of them in one `[unknown]` frame, not 39; every sample of
/// the command's CPU time (the kernel's accounting) is still there.
#[test]
fn garbage_frame_pointers_end_the_stack_in_one_unknown_frame() {
    require_root();
    let exe = build_c("garbage_frames");
    let folded = scratch("garbage").join("g.folded");
    let run = record_folded(&folded, &["--", exe.to_str().unwrap(), "2000000000"]);
    let err = stderr(&run);
    assert!(run.status.success(), "{err}");
    let profile = Folded::read(&folded);
    for (stack, n) in &profile.0 {
        let unknown = stack.iter().filter(|f| *f == "[unknown]").count();
        assert!(unknown <= 1, "{n} samples with {unknown} unknown frames: {stack:?}");
        if unknown == 1 {
            assert_eq!(stack[0], "[unknown]", "the unknown frame ends the stack at its root: {stack:?}");
        }
    }
    let in_main = profile.with_frame(|f| f == "main");
    let cpu = summary_cpu_seconds(&err);
    assert_samples("main", in_main, cpu, 99.0);
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
    let started = Instant::now();
    let out =
        stoker(&["record", "-f", "pprof", "-o", pb.to_str().unwrap(), "--", hot.to_str().unwrap(), "2"]);
    let elapsed = started.elapsed().as_nanos() as i64;
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let own = own_report(&out.stdout);
    let p = decode_pprof(&pb);

    assert_eq!(p["gzip"], true, "the file must be gzipped");
    assert_eq!(p["string0"], "", "string_table[0] must be empty");
    let sample_type = p["sample_type"].as_array().unwrap();
    assert!(sample_type.contains(&serde_json::json!(["cpu", "nanoseconds"])), "sample_type: {sample_type:?}");
    assert_eq!(p["period_type"], serde_json::json!(["cpu", "nanoseconds"]));
    let period = p["period"].as_i64().unwrap();
    assert_eq!(period, 1_000_000_000 / 99, "default rate is 99 Hz");
    let samples = p["samples"].as_i64().unwrap();
    // Sampled from its first instruction to its exit.
    assert_samples("pprof samples", samples as u64, secs(&own, "process_cpu"), 99.0);
    assert_eq!(p["cpu_nanos"].as_i64().unwrap(), samples * period, "cpu ns = count x period");
    // The session lasts at most as long as stoker ran, and at least as long as its
    // command, less the 200 ms stoker may wait for a launched command to map its
    // interpreter before its session clock starts (LAUNCH_SETTLE in agent/src/record).
    let duration = p["duration_nanos"].as_i64().unwrap();
    let hot_wall = (secs(&own, "wall") * 1e9) as i64;
    eprintln!("duration_nanos {duration}, hot's own wall time {hot_wall} ns, stoker's run {elapsed} ns");
    assert!(
        (hot_wall - 200_000_000..=elapsed).contains(&duration),
        "duration_nanos {duration}: hot ran {hot_wall} ns, stoker {elapsed} ns"
    );
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
    assert_samples("pprof leaf hot_a", leaf("hot_a") as u64, secs(&own, "hot_a"), 99.0);
    assert_samples("pprof leaf hot_b", leaf("hot_b") as u64, secs(&own, "hot_b"), 99.0);
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
        "-f",
        "speedscope",
        "-o",
        path.to_str().unwrap(),
        "--",
        hot.to_str().unwrap(),
        "2",
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
    assert_samples("speedscope samples", total, secs(&own_report(&out.stdout), "process_cpu"), 99.0);
    assert_eq!(p["endValue"].as_u64(), Some(total));
    assert!(frames.iter().any(|f| f["name"] == "hot_a"), "hot_a missing from the frames");
}

/// The summary gives the CPU time a launched command used by the kernel's accounting: what
/// the command measured of itself (`time.process_time()`, all of its CPU until then),
/// plus its interpreter's shutdown after that (at most 50 ms), less 20 ms (/proc gives
/// user and system time each in whole 10 ms ticks, rounded down).
#[test]
fn summary_gives_the_kernels_cpu_time_of_a_launched_command() {
    require_root();
    let out = scratch("cputime").join("p.folded");
    let code = "import time\nend = time.process_time() + 0.7\nwhile time.process_time() < end: pass\nprint(time.process_time(), flush=True)";
    let run = Command::new(STOKER)
        .args(["record", "-f", "folded", "-o", out.to_str().unwrap(), "--"])
        .arg(python("3.12.1"))
        .args(["-c", code])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stoker failed: {err}");
    let own: f64 = String::from_utf8_lossy(&run.stdout).trim().parse().expect("the command's own CPU time");
    let got = summary_cpu_seconds(&err);
    eprintln!("launched command: {got:.3} s by the summary, {own:.3} s by itself");
    assert!(
        got >= own - 0.021 && got <= own + 0.05,
        "the summary gave {got:.3} s; the command measured {own:.3} s"
    );
}

/// A v1 `cpu` cgroup made by the test, with a quota of 0.3 CPU: a process in it that spends
/// 0.8 s of CPU is throttled, and the summary's cgroup line gives the quota and what the
/// cgroup's own `cpu.stat` counted during the session (read by the test just before the
/// session and after it, with the process idle outside the session, so the two windows
/// hold the same throttling, but for the last period, see below).
#[test]
fn summary_gives_the_cgroup_quota_and_throttling() {
    require_root();
    let cgroup = QuotaCgroup::new("stoker-quota", 30000);
    let code = "import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n\
                end = time.process_time() + 0.8\nwhile time.process_time() < end: pass\n";
    let mut busy = Command::new(python("3.12.1"))
        .args(["-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cgroup.add(busy.id());
    // The interpreter's start-up may run in the cgroup: the window opens once it is idle.
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(busy.stdout.take().unwrap()), &mut ready)
        .unwrap();
    let before = cgroup.settled();
    let out = scratch("quota").join("q.folded");
    let mut session = Command::new(STOKER)
        .args(["record", "--pid", &busy.id().to_string(), "-f", "folded", "-o", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = Stderr::of(&mut session);
    err.wait_for("sampling at");
    std::io::Write::write_all(busy.stdin.as_mut().unwrap(), b"go\n").unwrap();
    assert!(busy.wait().unwrap().success());
    let status = wait_exit(&mut session, "stoker");
    let err = err.rest();
    let after = cgroup.settled();
    assert!(status.success(), "stoker failed: {err}");
    let line =
        err.lines().find(|l| l.contains("cgroup v1")).unwrap_or_else(|| panic!("no cgroup line: {err}"));
    eprintln!("{line}");
    let (periods, throttled, time) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    assert!(throttled > 0, "0.8 s of CPU at a 0.3 CPU quota was not throttled: {after:?}");
    assert!(line.contains(&format!("/{}", cgroup.name)), "{line}");
    assert!(line.contains("CPU quota 0.30 CPUs per 100 ms"), "{line}");
    // The kernel counts a period when its timer fires (kernel/sched/fair.c,
    // do_sched_cfs_period_timer: `nr_periods += overrun` before it looks for idleness), and
    // the timer stays armed until a whole period passes idle. stoker's last read follows the
    // exit it sees (pidfd), but the exiting task still runs its last instructions, charged
    // to the cgroup, after that: if they cross a period's end, the period under way at the
    // read, the next (active) one and the idle one that stops the timer are counted after
    // it. Up to three periods, one of them throttled (100 ms of throttling at most).
    let counted = line.split("throttled ").nth(1).unwrap();
    let words: Vec<&str> = counted.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let (got_throttled, got_periods): (u64, u64) = (words[0].parse().unwrap(), words[2].parse().unwrap());
    let got_time: f64 = words[4].parse().unwrap();
    assert!(
        got_throttled + 1 >= throttled && got_throttled <= throttled,
        "{line}; cpu.stat: {throttled} of {periods} periods, {time:.3} s"
    );
    assert!(got_periods + 3 >= periods && got_periods <= periods, "{line}; cpu.stat: {periods} periods");
    assert!((got_time - time).abs() <= 0.1 + 1e-9, "{line}; cpu.stat: {time:.3} s throttled");
}

/// The demo's flamegraph is as tall as its deepest real stack: a native stack the kernel
/// could not follow (a thread's start, `clone3` -> `ret_from_fork`) ends in one `[unknown]`
/// frame, not a chain of them. The demo service under its own load, as `cargo xtask demo`
/// records it; depths are read from the SVG's frames (16 px apart).
#[test]
fn demo_flamegraph_is_as_tall_as_its_deepest_real_stack() {
    require_root();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/demo");
    let port = common::agent::free_port().to_string();
    let mut service =
        Command::new("/usr/bin/python3").arg(demo.join("service.py")).arg(&port).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
        assert!(Instant::now() < deadline, "the demo service did not listen");
        thread::sleep(Duration::from_millis(50));
    }
    let mut load = Command::new("/usr/bin/python3")
        .arg(demo.join("load.py"))
        .args([&port, "6"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let svg = scratch("demo-svg").join("demo.svg");
    let pid = service.id().to_string();
    let out = stoker(&["record", "--pid", &pid, "-d", "4", "-o", svg.to_str().unwrap()]);
    load.wait().unwrap();
    common::agent::kill(&mut [&mut service]);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let text = std::fs::read_to_string(&svg).unwrap();
    // (frame name, y) of every drawn frame: `<title>NAME (N samples, P%)</title><rect x=".." y="Y"`.
    let frames: Vec<(&str, f64)> = text
        .split("<g><title>")
        .skip(1)
        .filter_map(|g| {
            let (title, rest) = g.split_once("</title>")?;
            let name = title.rsplit_once(" (").map_or(title, |(n, _)| n);
            let y = rest.split("y=\"").nth(1)?.split('"').next()?.parse().ok()?;
            Some((name, y))
        })
        .collect();
    let root = frames.iter().find(|(n, _)| *n == "all").expect("the root frame").1;
    let depth = |y: f64| ((root - y) / 16.0).round() as i64;
    let deepest = frames.iter().map(|(_, y)| depth(*y)).max().unwrap();
    let deepest_real =
        frames.iter().filter(|(n, _)| *n != "[unknown]").map(|(_, y)| depth(*y)).max().unwrap();
    let height: f64 = text.split("height=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    eprintln!(
        "demo.svg: {} frames, deepest {deepest}, deepest real {deepest_real}, {height} px",
        frames.len()
    );
    assert!(deepest_real >= 5, "the demo's Python stacks are drawn: {deepest_real} deep");
    assert!(
        deepest <= deepest_real + 1,
        "frames {deepest} deep where the deepest real one is {deepest_real} deep: a chain of [unknown] frames"
    );
    // The picture ends where the frames do: its title and footer take a few rows at most.
    assert!(height <= (deepest + 8) as f64 * 16.0, "{height} px for {deepest} rows of frames");
}
