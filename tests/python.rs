//! End-to-end tests of Python stacks: real CPython processes of every local build,
//! sampled by the real kernel program. Run as root.
mod common;

use std::{collections::HashMap, process::Command, thread, time::Duration};

use common::*;

/// Records the workload in `mode` under `python` and returns the folded profile, the
/// workload's own report (shares mode) and stoker's stderr.
fn record_workload(python: &std::path::Path, args: &[&str], extra: &[&str]) -> (Folded, String, String) {
    let dir = scratch("py");
    let folded = dir.join("out.folded");
    let report = dir.join("report.json");
    let mut cmd: Vec<String> = vec!["record".into(), "-f".into(), "folded".into(), "-o".into()];
    cmd.push(folded.to_str().unwrap().into());
    cmd.extend(extra.iter().map(|s| s.to_string()));
    cmd.push("--".into());
    cmd.push(python.to_str().unwrap().into());
    cmd.push(workload().to_str().unwrap().into());
    cmd.extend(args.iter().map(|s| s.to_string()));
    if args[0] == "shares" {
        cmd.push(report.to_str().unwrap().into());
    }
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = stoker(&cmd);
    assert!(out.status.success(), "stoker failed: {}", stderr(&out));
    let report = std::fs::read_to_string(&report).unwrap_or_default();
    (Folded::read(&folded), report, stderr(&out))
}

/// Samples a `shares` workload's `function` should get at `hz`, from its own report
/// (its share of the CPU time the process spent).
fn expected_samples(report: &str, function: &str, hz: f64) -> f64 {
    let truth: HashMap<String, f64> = serde_json::from_str(report).expect("workload report");
    let expected = truth[function] * truth["cpu_seconds"] * hz;
    assert!(expected > 20.0, "the workload ran too little to compare: {report}");
    expected
}

/// Known functions appear with the right file and line and about the right CPU share,
/// and a 200-deep recursion keeps at least 128 frames.
fn check_build(version: &str) {
    require_root();
    let python = python(version);
    let (profile, report, _) = record_workload(&python, &["shares", "4"], &["-r", "199"]);
    let truth: HashMap<String, f64> = serde_json::from_str(&report).expect("workload report");
    let frames: Vec<(String, String)> =
        ["func_a", "func_b", "func_c"].iter().map(|f| (f.to_string(), workload_frame(f, f))).collect();
    let in_funcs: u64 = frames.iter().map(|(_, frame)| profile.with_frame(|f| f == frame)).sum();
    // 199 Hz over the CPU time the workload spent (less than its 4 s when CPUs are shared).
    let expected = truth["cpu_seconds"] * 199.0;
    assert!(
        in_funcs as f64 >= 0.8 * expected && expected > 200.0,
        "{version}: expected ~{expected:.0} samples in func_a/b/c at their marked lines, got {in_funcs}"
    );
    for (name, frame) in &frames {
        let share = profile.with_frame(|f| f == frame) as f64 / in_funcs as f64;
        let expected = truth[name];
        eprintln!("{version}: {frame}: {:.1}% (workload measured {:.1}%)", 100.0 * share, 100.0 * expected);
        assert!(
            (share - expected).abs() <= 0.05,
            "{version}: {name} share {share:.3}, the workload measured {expected:.3}"
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

/// Four threads, each busy in its own function: every function appears, and --threads
/// roots each under its thread.
#[test]
fn four_threads_each_in_its_own_function() {
    require_root();
    for version in ["3.8.18", "3.12.1"] {
        let (profile, _, _) = record_workload(&python(version), &["threads", "3"], &["--threads"]);
        let total = profile.total();
        let mut thread_roots = Vec::new();
        for name in ["thread_one", "thread_two", "thread_three", "thread_four"] {
            let frame = workload_frame(name, name);
            let n = profile.with_frame(|f| f == frame);
            assert!(n * 10 >= total, "{version}: {frame} has {n} of {total} samples");
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

/// A Python target that exits mid-session ends it, and its stacks are still named.
#[test]
fn python_target_exiting_mid_session() {
    require_root();
    let (profile, report, err) = record_workload(&python("3.11.7"), &["shares", "2"], &["-d", "60"]);
    assert!(err.contains("target exited"), "{err}");
    let expected = expected_samples(&report, "func_a", 99.0);
    let got = profile.with_frame(|f| f == workload_frame("func_a", "func_a"));
    assert!(got as f64 >= 0.7 * expected, "func_a after exit: {got} samples, expected ~{expected:.0}");
}

/// A process that execs into Python is recognized after the exec.
#[test]
fn target_execs_into_python() {
    require_root();
    let dir = scratch("exec");
    let folded = dir.join("exec.folded");
    let script = format!(
        "sleep 0.5; exec {} {} shares 2 {}",
        python("3.12.1").display(),
        workload().display(),
        dir.join("r.json").display()
    );
    let out = stoker(&["record", "-f", "folded", "-o", folded.to_str().unwrap(), "--", "sh", "-c", &script]);
    assert!(out.status.success(), "{}", stderr(&out));
    let profile = Folded::read(&folded);
    let expected = expected_samples(&std::fs::read_to_string(dir.join("r.json")).unwrap(), "func_a", 99.0);
    let got = profile.with_frame(|f| f == workload_frame("func_a", "func_a"));
    assert!(got as f64 >= 0.7 * expected, "func_a after exec: {got} samples, expected ~{expected:.0}");
}

/// Two Python versions at once with --all-python: each stack rooted at its process.
#[test]
fn all_python_profiles_two_versions() {
    require_root();
    let dir = scratch("all");
    let mut old = Command::new(python("3.8.18"))
        .args([workload().to_str().unwrap(), "shares", "5", dir.join("a.json").to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut new = Command::new(python("3.13.0"))
        .args([workload().to_str().unwrap(), "shares", "5", dir.join("b.json").to_str().unwrap()])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let folded = dir.join("all.folded");
    let out = stoker(&["record", "--all-python", "-d", "3", "-f", "folded", "-o", folded.to_str().unwrap()]);
    old.wait().unwrap();
    new.wait().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let profile = Folded::read(&folded);
    let func_a = workload_frame("func_a", "func_a");
    for (child, comm) in [(&old, "python3.8"), (&new, "python3.13")] {
        let root = format!("{comm} [pid {}]", child.id());
        let n: u64 =
            profile.0.iter().filter(|(s, _)| s[0] == root && s.contains(&func_a)).map(|(_, n)| n).sum();
        assert!(n > 30, "expected func_a samples under `{root}`, got {n}");
    }
}

/// --subprocesses follows children forked during the session, each rooted at its process.
#[test]
fn subprocesses_are_followed() {
    require_root();
    let dir = scratch("sub");
    let folded = dir.join("sub.folded");
    let code = format!(
        "import os, subprocess, sys, time\n\
         time.sleep(0.3)\n\
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
    let (profile, _, err) = record_workload(&py37, &["threads", "2"], &[]);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "expected one warning: {err}");
    assert!(warnings[0].contains("CPython 3.7,"), "{}", warnings[0]);
    assert!(
        profile.with_frame(|f| f.starts_with("_PyEval_EvalFrame")) > 0,
        "expected native interpreter frames"
    );
    assert!(profile.total() > 100);
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
