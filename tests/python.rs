//! End-to-end tests of Python stacks: real CPython processes of every local build,
//! sampled by the real kernel program. Run as root.
mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use common::*;
use serde_json::Value;

/// Records the workload (`MODE SECONDS [FLAGS]`) under `python` and returns the folded
/// profile, the workload's own report (shares and threads modes) and stoker's stderr.
fn record_workload(python: &std::path::Path, args: &[&str], extra: &[&str]) -> (Folded, Value, String) {
    let dir = scratch("py");
    let folded = dir.join("out.folded");
    let report = dir.join("report.json");
    let mut cmd: Vec<String> = vec!["record".into(), "-f".into(), "folded".into(), "-o".into()];
    cmd.push(folded.to_str().unwrap().into());
    cmd.extend(extra.iter().map(|s| s.to_string()));
    cmd.push("--".into());
    cmd.push(python.to_str().unwrap().into());
    cmd.push(workload().to_str().unwrap().into());
    cmd.extend(args[..2].iter().map(|s| s.to_string()));
    if args[0] == "shares" || args[0] == "threads" {
        cmd.push(report.to_str().unwrap().into());
    }
    cmd.extend(args[2..].iter().map(|s| s.to_string()));
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = stoker(&cmd);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let report =
        std::fs::read_to_string(&report).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or_default();
    (Folded::read(&folded), report, stderr(&out))
}

/// CPU seconds a `shares` workload measured in `function`.
fn seconds_in(report: &Value, function: &str) -> f64 {
    report["seconds"][function].as_f64().unwrap_or_else(|| panic!("no seconds for {function} in {report}"))
}

/// Known functions appear with the right file and line, as many samples as the CPU time
/// the workload measured in them and the shares it measured, and a 200-deep recursion
/// keeps at least 128 frames.
fn check_build(version: &str) {
    require_root();
    let python = python(version);
    // 4 s of CPU at 499 Hz: some 2,000 samples, which pin a share to +-0.045 (4 standard
    // deviations of a binomial share).
    let hz = 499.0;
    let (profile, truth, _) = record_workload(&python, &["shares", "4", "--cpu"], &["-r", "499"]);
    let frames: Vec<(String, String)> =
        ["func_a", "func_b", "func_c"].iter().map(|f| (f.to_string(), workload_frame(f, f))).collect();
    let in_funcs: u64 = frames.iter().map(|(_, frame)| profile.with_frame(|f| f == frame)).sum();
    let seconds: f64 = frames.iter().map(|(name, _)| seconds_in(&truth, name)).sum();
    assert_samples(&format!("{version}: func_a/b/c at their marked lines"), in_funcs, seconds, hz);
    for (name, frame) in &frames {
        let share = profile.with_frame(|f| f == frame) as f64 / in_funcs as f64;
        let expected = truth[name].as_f64().unwrap();
        let tolerance = share_tolerance(expected, in_funcs);
        eprintln!(
            "{version}: {frame}: {:.1}% (workload measured {:.1}%, +-{:.1})",
            100.0 * share,
            100.0 * expected,
            100.0 * tolerance
        );
        assert!(
            (share - expected).abs() <= tolerance,
            "{version}: {name} share {share:.3} of {in_funcs} samples, the workload measured {expected:.3} (+-{tolerance:.3})"
        );
    }
    let burn = workload_frame("burn", "burn_loop");
    assert!(
        profile.with_frame(|f| f == burn) * 2 > in_funcs,
        "{version}: leaf frame `{burn}` should dominate"
    );

    let (deep, _, _) = record_workload(&python, &["deep", "2", "200"], &[]);
    let recurse = workload_frame("recurse", "recurse");
    // Python frames of the deepest stack through `recurse` (less the `[truncated]` marker).
    let deepest = deep.0.keys().filter(|s| s.contains(&recurse)).map(|s| s.len() - 1).max().unwrap_or(0);
    assert!(deepest >= 128, "{version}: a 200-deep recursion should show >= 128 frames, saw {deepest}");
    assert!(
        deep.0.keys().any(|s| s.first().map(String::as_str) == Some("[truncated]")),
        "{version}: the cut root end should be marked [truncated]"
    );
}

#[test]
fn cpython_3_8() {
    check_build("3.8.18");
}

#[test]
fn cpython_3_9() {
    check_build("3.9.18");
}

#[test]
fn cpython_3_10() {
    check_build("3.10.13");
}

#[test]
fn cpython_3_11() {
    check_build("3.11.7");
}

#[test]
fn cpython_3_12() {
    check_build("3.12.1");
}

#[test]
fn cpython_3_13() {
    check_build("3.13.0");
}

#[test]
fn cpython_3_11_debian_static() {
    check_build("debian-3.11");
}

// Debian unstable's builds, each with its own glibc (cargo xtask setup): the interpreter
// linked statically into pythonX.Y, and a program calling Py_BytesMain in libpythonX.Y.so.

#[test]
fn cpython_3_13_debian_unstable_static() {
    check_build("sid-3.13");
}

#[test]
fn cpython_3_13_debian_unstable_shared() {
    check_build("sid-3.13-shared");
}

#[test]
fn cpython_3_14_debian_unstable_static() {
    check_build("sid-3.14");
}

#[test]
fn cpython_3_14_debian_unstable_shared() {
    check_build("sid-3.14-shared");
}

/// 3.15 has no table of its own: it is walked from its `_Py_DebugOffsets` alone.
#[test]
fn cpython_3_15_debian_unstable_static() {
    check_build("sid-3.15");
}

#[test]
fn cpython_3_15_debian_unstable_shared() {
    check_build("sid-3.15-shared");
}

/// Four threads, each busy in its own function: each has the samples of the CPU time it
/// measured itself, and --threads roots each under its thread.
#[test]
fn four_threads_each_in_its_own_function() {
    require_root();
    for version in ["3.8.18", "3.12.1"] {
        let (profile, report, _) = record_workload(&python(version), &["threads", "3"], &["--threads"]);
        let mut thread_roots = Vec::new();
        for name in ["thread_one", "thread_two", "thread_three", "thread_four"] {
            let frame = workload_frame(name, name);
            let n = profile.with_frame(|f| f == frame);
            assert_samples(&format!("{version}: {frame}"), n, report[name].as_f64().unwrap(), 99.0);
            let mut roots: Vec<&str> =
                profile.0.keys().filter(|s| s.contains(&frame)).map(|s| s[0].as_str()).collect();
            roots.sort();
            roots.dedup();
            assert!(
                roots.len() == 1 && roots[0].contains(" (tid "),
                "{version}: {frame} should sit under one thread root `name (tid N)`, found {roots:?}"
            );
            thread_roots.push(roots[0].to_string());
        }
        thread_roots.sort();
        thread_roots.dedup();
        assert_eq!(
            thread_roots.len(),
            4,
            "{version}: each function should run in its own thread: {thread_roots:?}"
        );
    }
}

/// A Python target that exits mid-session ends it, and its stacks are still named: as
/// many samples in func_a as the CPU time the workload measured there.
#[test]
fn python_target_exiting_mid_session() {
    require_root();
    let (profile, report, err) = record_workload(&python("3.11.7"), &["shares", "2", "--cpu"], &["-d", "60"]);
    assert!(err.contains("target exited"), "{err}");
    let got = profile.with_frame(|f| f == workload_frame("func_a", "func_a"));
    assert_samples("func_a after exit", got, seconds_in(&report, "func_a"), 99.0);
}

/// A process that execs into Python is recognized after the exec, and from then on its
/// Python functions get the samples of their CPU time.
///
/// stoker looks at a target it knows is not Python again every 500 ms (its tracker's
/// RECHECK), so the interpreter runs with native stacks until then; how soon that is
/// is not this test's subject (samples before recognition are lost, a limit tracked
/// apart). The shell waits for a line before it execs (by then stoker has seen it is
/// not Python), and the workload spends its measured CPU time only once stoker says it
/// recognized it, so the count compares with exactly the work stoker could see as Python.
#[test]
fn target_execs_into_python() {
    require_root();
    let dir = scratch("exec");
    let folded = dir.join("exec.folded");
    let report = dir.join("r.json");
    let script = format!(
        "read line; exec {} {} shares 2 {} --cpu --wait",
        python("3.12.1").display(),
        workload().display(),
        report.display()
    );
    let mut stoker = Command::new(STOKER)
        .args(["record", "--log-level", "info", "-f", "folded", "-o", folded.to_str().unwrap()])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stoker");
    let mut err = Stderr::of(&mut stoker);
    let mut stdin = stoker.stdin.take().unwrap();
    err.wait_for("sampling at");
    writeln!(stdin, "exec").unwrap();
    let exec = std::time::Instant::now();
    err.wait_for("CPython 3.12.1");
    eprintln!("recognized as CPython {:?} after the shell was let exec", exec.elapsed());
    writeln!(stdin, "go").unwrap();
    let status = wait_exit(&mut stoker, "stoker");
    let err = err.rest();
    assert!(status.success(), "{err}");
    let profile = Folded::read(&folded);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let got = profile.with_frame(|f| f == workload_frame("func_a", "func_a"));
    assert_samples("func_a after exec", got, seconds_in(&report, "func_a"), 99.0);
}

/// Two Python versions at once with --all-python, found by its first scan: each stack
/// rooted at its process, with the samples of the CPU time each measured in func_a (the
/// workloads wait to start their work until stoker has recognized them).
#[test]
fn all_python_profiles_two_versions() {
    require_root();
    let dir = scratch("all");
    let start = |version: &str, report: &str| {
        Command::new(python(version))
            .args([workload().to_str().unwrap(), "shares", "2", dir.join(report).to_str().unwrap()])
            .args(["--cpu", "--wait"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut old = start("3.8.18", "a.json");
    let mut new = start("3.13.0", "b.json");
    let folded = dir.join("all.folded");
    let mut stoker = Command::new(STOKER)
        .args([
            "record",
            "--all-python",
            "--log-level",
            "info",
            "-f",
            "folded",
            "-o",
            folded.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stoker");
    let mut err = Stderr::of(&mut stoker);
    err.wait_for(&format!("pid {}: CPython 3.8.", old.id()));
    err.wait_for(&format!("pid {}: CPython 3.13.", new.id()));
    for child in [&mut old, &mut new] {
        writeln!(child.stdin.take().unwrap(), "go").unwrap();
    }
    assert!(wait_exit(&mut old, "the 3.8 workload").success());
    assert!(wait_exit(&mut new, "the 3.13 workload").success());
    unsafe { libc::kill(stoker.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut stoker, "stoker");
    let err = err.rest();
    assert!(status.success(), "{err}");
    let profile = Folded::read(&folded);
    let func_a = workload_frame("func_a", "func_a");
    for (child, comm, report) in [(&old, "python3.8", "a.json"), (&new, "python3.13", "b.json")] {
        let root = format!("{comm} [pid {}]", child.id());
        let n: u64 =
            profile.0.iter().filter(|(s, _)| s[0] == root && s.contains(&func_a)).map(|(_, n)| n).sum();
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(report)).unwrap()).unwrap();
        assert_samples(&format!("func_a under `{root}`"), n, seconds_in(&report, "func_a"), 99.0);
    }
}

/// --subprocesses follows children forked during the session, each rooted at its process.
#[test]
fn subprocesses_are_followed() {
    require_root();
    let dir = scratch("sub");
    let folded = dir.join("sub.folded");
    let code = format!(
        "import os, subprocess, sys\n\
         child = subprocess.Popen([sys.executable, {w:?}, 'shares', '2', {r:?}])\n\
         pid = os.fork()\n\
         if pid == 0:\n    sys.argv = ['w', 'threads', '2']\n    exec(open({w:?}).read())\n    os._exit(0)\n\
         child.wait(); os.waitpid(pid, 0)\n",
        w = workload().to_str().unwrap(),
        r = dir.join("r.json").to_str().unwrap()
    );
    let py = python("3.12.1");
    let out = stoker(&[
        "record",
        "--subprocesses",
        "-f",
        "folded",
        "-o",
        folded.to_str().unwrap(),
        "--",
        py.to_str().unwrap(),
        "-c",
        &code,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let profile = Folded::read(&folded);
    let roots: Vec<&String> = profile.0.keys().map(|s| &s[0]).collect();
    let with = |frame: &str| -> Vec<String> {
        let mut r: Vec<String> =
            profile.0.keys().filter(|s| s.iter().any(|f| f == frame)).map(|s| s[0].clone()).collect();
        r.sort();
        r.dedup();
        r
    };
    let exec_child = with(&workload_frame("func_a", "func_a"));
    let fork_child = with(&format!("thread_one (<string>:{})", workload_line("thread_one")));
    assert_eq!(
        exec_child.len(),
        1,
        "func_a should come from one child process: {exec_child:?} (roots {roots:?})"
    );
    assert_eq!(
        fork_child.len(),
        1,
        "the forked child's threads should appear: {fork_child:?} (roots {roots:?})"
    );
    assert_ne!(exec_child, fork_child);
}

/// An unsupported CPython version gets native stacks and one warning naming it.
#[test]
fn unsupported_version_gets_native_stacks_and_one_warning() {
    require_root();
    let root = python("3.8.18").ancestors().nth(3).unwrap().to_path_buf();
    let py37 = root.join("3.7.16/bin/python3.7");
    assert!(
        py37.is_file(),
        "CPython 3.7 (the unsupported version used here) is missing at {}",
        py37.display()
    );
    let (profile, report, err) = record_workload(&py37, &["threads", "2"], &[]);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "expected one warning: {err}");
    assert!(warnings[0].contains("CPython 3.7,"), "{}", warnings[0]);
    assert!(
        profile.with_frame(|f| f.starts_with("_PyEval_EvalFrame")) > 0,
        "expected native interpreter frames"
    );
    // Sampled from its first instruction: at least the CPU time the process measured up
    // to its report (its exit comes after, so only the lower side is known).
    let cpu = report["cpu_seconds"].as_f64().unwrap();
    let expected = cpu * 99.0;
    let total = profile.total();
    eprintln!("3.7: {total} samples, the process's {cpu:.3} s of CPU: at least {expected:.1}");
    assert!(
        total as f64 >= expected - sampling_tolerance(expected),
        "{total} samples of a process that measured {cpu:.3} s of CPU at 99 Hz"
    );
}

/// --native keeps the native frames the innermost Python frame called below it (the
/// default view has none), and --full-filenames shows whole paths.
#[test]
fn native_view_and_full_filenames() {
    require_root();
    let py = python("3.12.1");
    let (plain, _, _) = record_workload(&py, &["threads", "2"], &[]);
    // `name (file:line)`, or a code object that could not be read.
    let is_python = |f: &str| {
        let line = f.strip_suffix(')').and_then(|r| r.rsplit_once(':')).map(|(_, n)| n);
        line.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            || f.starts_with("<unknown code")
    };
    for stack in plain.0.keys().filter(|s| s.iter().any(|f| is_python(f))) {
        assert!(stack.iter().all(|f| is_python(f)), "default view should hold Python frames only: {stack:?}");
    }

    let (native, _, _) = record_workload(&py, &["threads", "2"], &["--native", "--full-filenames"]);
    let full = format!("thread_one ({}:{})", workload().display(), workload_line("thread_one"));
    let short = workload_frame("thread_one", "thread_one");
    assert!(native.with_frame(|f| f == full) > 0, "expected whole-path frame `{full}`");
    assert_eq!(native.with_frame(|f| f == short), 0, "--full-filenames should not shorten paths");
    let mixed: u64 = native
        .0
        .iter()
        .filter(|(s, _)| {
            let last_py = s.iter().rposition(|f| is_python(f));
            last_py.is_some_and(|i| i + 1 < s.len())
        })
        .map(|(_, n)| n)
        .sum();
    assert!(
        mixed * 10 >= native.total(),
        "--native should show native frames under Python frames: {mixed} of {}",
        native.total()
    );
}
