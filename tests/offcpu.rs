//! End-to-end tests of wall-clock and off-CPU profiles (`stoker record --mode`): real
//! CPython processes waiting on a slow upstream, on the GIL, on a CPU quota and on a busy
//! run queue; what stoker attributes to each state against what the workload measured.
mod common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use common::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/offcpu").join(name)
}

/// Microseconds by state frame (the leaf of every wall-clock and off-CPU stack), over the
/// stacks that contain a frame starting with `function`.
fn states(folded: &Folded, function: &str) -> HashMap<String, f64> {
    let mut by_state: HashMap<String, f64> = HashMap::new();
    for (stack, us) in &folded.0 {
        let leaf = stack.last().expect("a stack has frames");
        assert!(leaf.starts_with('[') && leaf.ends_with(']'), "stack without a state frame: {stack:?}");
        if stack.iter().any(|f| f.starts_with(function)) {
            *by_state.entry(leaf.clone()).or_default() += *us as f64 / 1e6;
        }
    }
    by_state
}

fn get(states: &HashMap<String, f64>, state: &str) -> f64 {
    states.get(state).copied().unwrap_or(0.0)
}

/// "cpu X wall Y" (or "waited X") as printed by a fixture: the value after `key`.
fn reported(line: &str, key: &str) -> f64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == key).unwrap_or_else(|| panic!("no {key} in {line:?}"));
    words[at + 1].parse().unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

/// `stoker record` of a launched command in `mode`, with `extra` options; its folded
/// output, its summary, the command's stdout and the steal during the session (see
/// `steal_seconds`).
fn record_command(mode: &str, rate: &str, extra: &[&str], command: &[&str]) -> (Folded, String, String, f64) {
    let out = scratch("offcpu").join("p.folded");
    let mut args = vec!["record", "-m", mode, "-r", rate, "-f", "folded", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let steal = steal_seconds();
    let run = Command::new(STOKER).args(&args).stdin(Stdio::null()).output().expect("run stoker");
    let steal = steal_seconds() - steal;
    let (stdout, err) = (String::from_utf8_lossy(&run.stdout).into_owned(), stderr(&run));
    assert!(run.status.success(), "stoker failed: {err}");
    eprintln!("{err}\nsteal during the session: {steal:.3} s");
    (Folded::read(&out), err, stdout, steal)
}

/// A caller blocked on an upstream that answers after 100 ms: the time stoker puts on
/// `[socket 127.0.0.1:PORT]` (and the run queue after each answer, and any other wait in
/// its calls, such as a page read from the disk) is the time the caller
/// measured around its requests less the CPU time they used (its own thread's clock), within
/// 1 ms for clock reads on either side (and the hypervisor's steal, see `steal_seconds`). Half the requests read a blocking socket, half poll a
/// socket with a timeout first. All but the first two at most are in Python stacks (a
/// launched process's interpreter is found after its first moments).
fn socket_wait_is_the_callers_wait(version: &str) {
    require_root();
    let py = python(version);
    let (mut upstream, port) = slow_upstream(&py);
    let (folded, err, stdout, steal) = record_command(
        "off-cpu",
        "99",
        &FOLLOWED,
        &[py.to_str().unwrap(), fixture("upstream.py").to_str().unwrap(), "call", &port, "8"],
    );
    let _ = upstream.kill();
    let _ = upstream.wait();
    let (waited, cpu) = (reported(&stdout, "waited"), reported(&stdout, "cpu"));
    let by_state = states(&folded, "call_upstream");
    // A launched process's first waits can come before its interpreter is found (its
    // stacks are then native); they count all the same, with the run queue after them (tens
    // of microseconds, inside the tolerance).
    let peer = format!("[socket 127.0.0.1:{port}]");
    let in_python = get(&by_state, &peer);
    let socket = get(&states(&folded, ""), &peer);
    let queued = get(&by_state, "[runqueue]");
    let other: f64 =
        by_state.iter().filter(|(state, _)| **state != peer && *state != "[runqueue]").map(|(_, s)| s).sum();
    eprintln!(
        "{version}: caller waited {waited:.4} s, ran {cpu:.4} s of it; stoker: {by_state:?}, {socket:.4} s on the socket in all"
    );
    assert!(
        in_python >= 14.0 * 0.1 * 0.98,
        "16 answers 100 ms apart, {in_python:.4} s on the socket in call_upstream: {by_state:?}"
    );
    assert!(
        (socket + queued + other - (waited - cpu)).abs() <= 1e-3 + steal,
        "the caller waited {waited:.4} s and ran {cpu:.4} s of it; stoker saw {socket:.4} s on the socket, {queued:.4} s queued and {other:.4} s otherwise: {by_state:?}\n{err}"
    );
}

/// The summary's line on the switch budget: "... sampled: SKIPPED of ALL switches were not
/// followed (...) ... (SAMPLES samples, ...; LEFT of VISITS process visits left out, ...;
/// RUNS runs GAP ms apart on average, ...".
struct Budget<'a> {
    /// The target threads' switches not followed (their threads were over the budget), and
    /// all their switches.
    skipped: f64,
    all: f64,
    /// The wall-clock sampler's samples, its process visits left out and all of them.
    samples: f64,
    left_out: f64,
    visits: f64,
    /// The mean time between its runs, in seconds.
    gap: f64,
    line: &'a str,
}

fn budget_line(err: &str) -> Budget<'_> {
    let line = err
        .lines()
        .find(|l| l.contains("a second sampled: "))
        .unwrap_or_else(|| panic!("not sampled: {err}"));
    let words: Vec<&str> = line.split("sampled: ").nth(1).unwrap_or_default().split_whitespace().collect();
    let number =
        |i: usize| -> f64 { words.get(i).and_then(|w| w.trim_start_matches('(').parse().ok()).expect(line) };
    let before = |what: &[&str]| -> usize {
        words.windows(what.len()).position(|w| w == what).unwrap_or_else(|| panic!("no {what:?}: {line}"))
    };
    let visits = before(&["process", "visits"]);
    let runs = before(&["runs"]);
    Budget {
        skipped: number(0),
        all: number(2),
        samples: number(before(&["samples,"]) - 1),
        left_out: number(visits - 3),
        visits: number(visits - 1),
        gap: number(runs + 1) / 1e3,
        line,
    }
}

/// The summary's line on waits sampled by the clock (`--waits sampled`): "... (SAMPLES
/// samples, ...; RUNS runs GAP ms apart on average, ...": the samples, the mean time
/// between the sampler's runs in seconds, and the line.
fn sampled_line(err: &str) -> (f64, f64, &str) {
    let line = err
        .lines()
        .find(|l| l.contains("no switch followed (--waits sampled)"))
        .unwrap_or_else(|| panic!("no line on sampled waits: {err}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let number =
        |i: usize| -> f64 { words.get(i).and_then(|w| w.trim_start_matches('(').parse().ok()).expect(line) };
    let before =
        |what: &str| words.iter().position(|w| *w == what).unwrap_or_else(|| panic!("no {what}: {line}"));
    (number(before("samples,") - 1), number(before("runs") + 1) / 1e3, line)
}

/// How far the wall-clock sampler's estimate of the time of `waits` waits may lie from
/// their time, its runs `gap` seconds apart on average (a period drawn from 0.5-1.5 times
/// the one asked): a sample counts the time since the one before for the state it finds,
/// so a wait is counted for the samples that fall in it, off by at most a gap either way,
/// with a variance of about a quarter gap squared for a wait that begins at a random
/// moment. Four deviations of the sum: 2 gaps × √waits. (Many short waits are a share of
/// the samples that fall in their stretch instead, whose deviation has the same bound with
/// `waits` the samples in the stretch.)
fn sampling_bound(waits: f64, gap: f64) -> f64 {
    2.0 * gap * waits.sqrt()
}

/// `upstream.py serve 0.1` (answers 100 ms after each request) and its port.
fn slow_upstream(py: &std::path::Path) -> (Child, String) {
    let mut upstream = Command::new(py)
        .args([fixture("upstream.py").to_str().unwrap(), "serve", "0.1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(upstream.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    (upstream, line.trim().to_string())
}

/// Over a switch budget, a thread's waits are sampled by the clock: the caller and another
/// thread hand the GIL over hundreds of times a second each, far over a budget of 10, so
/// their switches are not followed (the summary says so), and the caller's 16 answers 100
/// ms apart are counted by the wall-clock sampler at 99 Hz. The time on
/// `[socket 127.0.0.1:PORT]` is within the sampling bound of 16 waits of the caller's own:
/// at least what 14 answers take in Python stacks (a launched process's interpreter is
/// found after its first moments), at most what it measured around its requests less their
/// CPU time (which includes its waits for the GIL after each answer), and the steal.
#[test]
fn socket_waits_over_a_switch_budget_are_sampled_by_the_clock() {
    socket_waits_sampled_by_the_clock(&["--waits", "followed", "--switch-budget", "10"]);
}

/// By default (`--waits sampled`) no switch is followed: every thread's time off the CPU
/// is the sampler's, within the same bounds, and the summary says so.
#[test]
fn socket_waits_are_sampled_by_the_clock_by_default() {
    socket_waits_sampled_by_the_clock(&[]);
}

fn socket_waits_sampled_by_the_clock(extra: &[&str]) {
    require_root();
    let py = python("3.12.1");
    let (mut upstream, port) = slow_upstream(&py);
    let (folded, err, stdout, steal) = record_command(
        "off-cpu",
        "99",
        extra,
        &[py.to_str().unwrap(), fixture("upstream.py").to_str().unwrap(), "call", &port, "8", "busy"],
    );
    let _ = upstream.kill();
    let _ = upstream.wait();
    let (gap, line) = if !extra.contains(&"followed") {
        let (samples, gap, line) = sampled_line(&err);
        assert!(samples > 0.0, "no samples: {line}");
        assert!(!err.contains("switches of target threads followed"), "no switch is followed: {err}");
        (gap, line)
    } else {
        let b = budget_line(&err);
        assert!(
            b.skipped >= 0.5 * b.all && b.samples > 0.0,
            "the threads' switches were not left to the clock: {}",
            b.line
        );
        (b.gap, b.line)
    };
    // Where the tests may, it samples at real-time priority: on time next to a CPU hog,
    // whose pull on a sampler of the normal class would make its samples fall on the
    // caller's waits more than their share (they come late while the caller runs); where
    // they may not, the summary says so.
    assert_eq!(!line.contains("no real-time priority"), realtime_allowed(), "{line}");
    let (waited, cpu) = (reported(&stdout, "waited"), reported(&stdout, "cpu"));
    let peer = format!("[socket 127.0.0.1:{port}]");
    let in_python = get(&states(&folded, "call_upstream"), &peer);
    let socket = get(&states(&folded, ""), &peer);
    let bound = sampling_bound(16.0, gap);
    eprintln!(
        "caller waited {waited:.4} s, ran {cpu:.4} s of it; stoker: {socket:.4} s on the socket, {in_python:.4} s in call_upstream (sampling bound {bound:.3} s)"
    );
    assert!(
        in_python >= 14.0 * 0.1 * 0.98 - bound,
        "16 answers 100 ms apart, {in_python:.4} s on the socket in call_upstream\n{err}"
    );
    assert!(
        socket <= waited - cpu + bound + steal,
        "the caller waited {waited:.4} s and ran {cpu:.4} s of it; stoker saw {socket:.4} s on the socket\n{err}"
    );
}

#[test]
fn socket_wait_is_the_callers_wait_3_9() {
    socket_wait_is_the_callers_wait("3.9.18");
}

#[test]
fn socket_wait_is_the_callers_wait_3_13() {
    socket_wait_is_the_callers_wait("3.13.0");
}

#[test]
fn socket_wait_is_the_callers_wait_debian_3_11() {
    socket_wait_is_the_callers_wait("debian-3.11");
}

/// A thread that switches faster than the budget has its time off the CPU sampled by the
/// clock, whatever it waits for: it takes 100 naps of 1 ms (about 950 a second, far over a
/// budget of 100), then rests 50 ms, forty times. Its rests' time (sleep and run queue
/// after it) is within the sampling bound of 40 waits of what it measured around them less
/// their CPU time; its naps' within that of the samples that fell in their stretch (at most
/// their time and their CPU time over the period), and the share of a nap that its timer
/// slack is (a sample is taken at a timer interrupt, which ends every sleep due within its
/// slack, 50 µs by default: such a nap is seen as over); each with the steal, and 2 ms for
/// clock reads on either side of the rests.
///
/// With `parent`, the napping process is the child of a process that checks on it 20 times
/// a second (`parent_of.py`, both targets with `--subprocesses`): a process whose threads
/// all keep within the budget costs the sampler nothing, so it is left out of all its
/// visits but its first and one a second. The child is visited at every run once its
/// thread turns fast: the parent's visits are about half of all, more before the child is
/// found; at least 40% are left out.
fn fast_threads_are_sampled_by_the_clock(version: &str, parent: bool) {
    require_root();
    let py = python(version);
    let (py, naps) = (py.to_str().unwrap(), fixture("naps.py"));
    let parent_of = fixture("parent_of.py");
    let mut command = vec![py, naps.to_str().unwrap(), "40", "100", "0.001"];
    if parent {
        command.splice(0..0, [py, parent_of.to_str().unwrap()]);
    }
    let extra: &[&str] = if parent { &["--waits", "followed", "--subprocesses"] } else { &FOLLOWED };
    let (folded, err, stdout, steal) = record_command("off-cpu", "99", extra, &command);
    let b = budget_line(&err);
    let (left_out, visits, line) = (b.left_out, b.visits, b.line);
    assert!(
        b.all >= 3_000.0 && b.skipped >= 0.5 * b.all && b.samples > 0.0,
        "4000 naps, over the budget: {line}"
    );
    if parent {
        assert!(left_out >= 0.4 * visits, "the parent's visits are left out: {line}");
    } else {
        // Left out only until its thread first turns fast (the interpreter's start and its
        // first 100 naps, a tenth of a second or two of a session of over six) and after it
        // exits (until the session's end is seen): about 5% here. A process wrongly left out
        // shows in the estimates below.
        assert!(left_out <= 0.25 * visits && visits > 0.0, "one process with a fast thread, visited: {line}");
    }
    let lines: Vec<&str> = stdout.lines().collect();
    let reported_by = |name: &str| -> (f64, f64) {
        let l = lines.iter().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {stdout}"));
        (reported(l, "waited"), reported(l, "cpu"))
    };
    let seen = |function: &str| -> f64 {
        let by_state = states(&folded, function);
        get(&by_state, "[sleep]") + get(&by_state, "[runqueue]")
    };
    let (rest, nap) = (seen("rest"), seen("nap"));
    let ((rest_waited, rest_cpu), (nap_waited, nap_cpu)) = (reported_by("rest"), reported_by("nap"));
    let (rest_own, nap_own) = (rest_waited - rest_cpu, nap_waited - nap_cpu);
    let rest_bound = sampling_bound(40.0, b.gap) + 2e-3 + steal;
    let slack = 50e-6 / (nap_waited / 4000.0);
    let nap_bound = sampling_bound((nap_waited + nap_cpu) / b.gap, b.gap) + slack * nap_own + steal;
    eprintln!(
        "{version}: rests {rest:.4} s (measured {rest_own:.4} s, bound {rest_bound:.3} s), naps {nap:.4} s (measured {nap_own:.4} s, bound {nap_bound:.3} s)"
    );
    assert!(
        (rest - rest_own).abs() <= rest_bound,
        "the thread rested {rest_own:.4} s off the CPU, stoker saw {rest:.4} s\n{err}"
    );
    assert!(
        (nap - nap_own).abs() <= nap_bound,
        "the thread napped {nap_own:.4} s off the CPU, stoker estimated {nap:.4} s\n{err}"
    );
}

#[test]
fn fast_threads_are_sampled_by_the_clock_3_12() {
    fast_threads_are_sampled_by_the_clock("3.12.1", false);
}

/// CPython 3.9 sleeps in `select` with no descriptors.
#[test]
fn fast_threads_are_sampled_by_the_clock_3_9() {
    fast_threads_are_sampled_by_the_clock("3.9.18", false);
}

#[test]
fn processes_within_the_budget_are_left_to_the_switches() {
    fast_threads_are_sampled_by_the_clock("3.12.1", true);
}

/// Three threads of pure-Python work: one runs while two wait for the GIL, so about 2/3 of
/// their time is `[gil]`. What stoker puts off the CPU (GIL and run queue) matches what
/// the threads measured (wall minus their own CPU time) within 5% of their time (and the
/// hypervisor's steal, see `steal_seconds`), the CPU samples standing for the rest; and the GIL is most of it (the run queue takes a share
/// when another process holds the CPU the GIL holder wants). `extra`: more `record` options;
/// without `--switch-budget 0` the default budget may sample the waits (wider bounds).
fn gil_wait_share(version: &str, extra: &[&str]) {
    require_root();
    let py = python(version);
    let (folded, err, stdout, steal) = record_command(
        "wall",
        "499",
        extra,
        &[py.to_str().unwrap(), fixture("gil_threads.py").to_str().unwrap(), "3", "2"],
    );
    let (cpu, wall) = (reported(&stdout, "cpu"), reported(&stdout, "wall"));
    let by_state = states(&folded, "burn");
    let total: f64 = by_state.values().sum();
    let waiting = total - get(&by_state, "[running]");
    let gil = get(&by_state, "[gil]");
    eprintln!("{version}: threads measured cpu {cpu:.3} s of wall {wall:.3} s; stoker: {by_state:?}");
    // Over a budget, the waits are the wall-clock sampler's estimates: about 2000 samples of
    // three threads here, whose share deviates by about 1%: 15% leaves room for the hog's
    // jitter on who holds the GIL.
    let exact = extra == EVERY_SWITCH;
    let tolerance = if exact { 0.05 } else { 0.15 };
    if !extra.contains(&"followed") {
        let (samples, _, line) = sampled_line(&err);
        assert!(samples > 0.0, "no samples: {line}");
    }
    if extra.contains(&"--switch-budget") && !exact {
        let b = budget_line(&err);
        assert!(
            b.skipped >= 0.2 * b.all && b.samples > 0.0,
            "a budget the threads exceed leaves switches to the clock: {}",
            b.line
        );
    }
    assert!(
        (total - wall).abs() <= tolerance * wall,
        "threads lived {wall:.3} s, stoker saw {total:.3} s\n{err}"
    );
    let (own, seen) = (1.0 - cpu / wall, waiting / total);
    assert!(
        (seen - own).abs() <= tolerance + steal / total,
        "threads waited {own:.3} of their time, stoker says {seen:.3} ({steal:.3} s stolen): {by_state:?}"
    );
    assert!(gil >= 0.6 * waiting, "of {waiting:.3} s waiting only {gil:.3} s was for the GIL: {by_state:?}");
    assert!(
        gil / total >= 0.4,
        "3 threads under one GIL: about 2/3 waiting for it, stoker says {:.3}",
        gil / total
    );
}

/// `record` options that follow every switch of the targets (no budget): every wait exact.
const EVERY_SWITCH: [&str; 4] = ["--waits", "followed", "--switch-budget", "0"];
/// `record` options that follow the switches of the targets within the default budget.
const FOLLOWED: [&str; 2] = ["--waits", "followed"];

#[test]
fn gil_wait_share_3_8() {
    gil_wait_share("3.8.18", &EVERY_SWITCH);
}

/// With the default switch budget (the threads may exceed it: their waits are then sampled).
#[test]
fn gil_wait_share_3_12() {
    gil_wait_share("3.12.1", &FOLLOWED);
}

/// The same with a switch budget the threads exceed (each hands the GIL over hundreds of
/// times a second): their switches are not followed, the wall-clock sampler counts their
/// waits, and the estimates meet the same bounds; the summary says the waits were sampled.
#[test]
fn gil_wait_share_sampled_over_a_switch_budget() {
    gil_wait_share("3.12.1", &["--waits", "followed", "--switch-budget", "50"]);
}

/// The same by default (`--waits sampled`): no switch followed, every wait the sampler's
/// estimate; the summary says so.
#[test]
fn gil_wait_share_with_waits_sampled() {
    gil_wait_share("3.12.1", &[]);
}

#[test]
fn gil_wait_share_3_13() {
    gil_wait_share("3.13.0", &EVERY_SWITCH);
}

/// A thread that calls exec keeps its id, and its GIL waits are then on the new program's
/// GIL. CPython 3.12 runs two threads, the main thread one of them, for half a second; the
/// main thread then execs CPython 3.9 running three, itself one, for 2 s. Of the new
/// program's time about 2/3 is `[gil]` and next to none `[lock]`: taken for another lock,
/// the main thread's waits would be 2/9 of it.
#[test]
fn gil_waits_after_an_exec_are_the_new_programs() {
    require_root();
    let (old, new) = (python("3.12.1"), python("3.9.18"));
    let (folded, err, stdout, _) = record_command(
        "wall",
        "499",
        &FOLLOWED,
        &[old.to_str().unwrap(), fixture("gil_exec.py").to_str().unwrap(), new.to_str().unwrap(), "3", "2"],
    );
    let by_state = states(&folded, "burn (gil_threads.py");
    let total: f64 = by_state.values().sum();
    let (gil, lock) = (get(&by_state, "[gil]"), get(&by_state, "[lock]"));
    eprintln!("after the exec: {stdout} stoker: {by_state:?}");
    assert!(total >= 0.8 * reported(&stdout, "wall"), "the new program's threads were not followed: {err}");
    assert!(
        gil / total >= 0.4,
        "3 threads under one GIL, stoker says {:.3} [gil]: {by_state:?}",
        gil / total
    );
    assert!(lock <= 0.05 * total, "GIL waits taken for another lock: {by_state:?}");
}

/// `spin.py` processes started by the test, waiting for a line on stdin.
fn spinners(n: usize, cpu_seconds: &str) -> Vec<Child> {
    (0..n)
        .map(|_| {
            Command::new(python("3.12.1"))
                .args([fixture("spin.py").to_str().unwrap(), cpu_seconds])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Records `pids` in `mode` until they exit, starting them once stoker samples; returns the
/// folded profile, stoker's summary and what each process reported (cpu, wall). Every
/// switch is followed (a spinner is preempted hundreds of times a second): the waits are
/// compared with the processes' own clocks, not estimated.
fn record_spinners(
    mode: &str,
    waits: &[&str],
    procs: &mut [Child],
) -> (Folded, String, Vec<(f64, f64)>, f64) {
    let out = scratch("offcpu").join("s.folded");
    let mut args = vec!["record".to_string(), "-m".into(), mode.into(), "-f".into(), "folded".into()];
    args.extend(waits.iter().map(|w| w.to_string()));
    args.extend(["-t".into(), "-o".into(), out.to_str().unwrap().into()]);
    for p in procs.iter() {
        args.extend(["--pid".into(), p.id().to_string()]);
    }
    let mut session =
        Command::new(STOKER).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = Stderr::of(&mut session);
    err.wait_for("sampling at");
    let steal = steal_seconds();
    for p in procs.iter_mut() {
        p.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    let reports: Vec<(f64, f64)> = procs
        .iter_mut()
        .map(|p| {
            let mut line = String::new();
            BufReader::new(p.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
            assert!(p.wait().unwrap().success());
            (reported(&line, "cpu"), reported(&line, "wall"))
        })
        .collect();
    let steal = steal_seconds() - steal;
    let status = wait_exit(&mut session, "stoker");
    let err = err.rest();
    assert!(status.success(), "stoker failed: {err}");
    eprintln!("{err}\nsteal during the session: {steal:.3} s");
    (Folded::read(&out), err, reports, steal)
}

/// Seconds per state of process `pid` (its stacks start with its process frame).
fn process_states(folded: &Folded, pid: u32) -> HashMap<String, f64> {
    states(folded, "")
        .into_keys()
        .map(|state| {
            let secs = folded
                .0
                .iter()
                .filter(|(s, _)| s.last() == Some(&state) && s[0].ends_with(&format!("[pid {pid}]")))
                .map(|(_, us)| *us as f64 / 1e6)
                .sum();
            (state, secs)
        })
        .collect()
}

/// A process in a cgroup allowed 0.3 CPU spins for 0.8 s of CPU: the time stoker puts on
/// `[throttled]` is the time the cgroup's `cpu.stat` says it was throttled, within 0.1 s
/// (a period's throttling may be counted after the process ended) and 10%; every switch
/// followed.
#[test]
fn throttled_time_is_what_the_cgroup_counted() {
    throttled_time(&EVERY_SWITCH);
}

/// The same with the waits sampled by the clock (the default): within the sampling bound
/// of the throttled stretches (one per throttled period) besides.
#[test]
fn throttled_time_sampled_is_what_the_cgroup_counted() {
    throttled_time(&[]);
}

fn throttled_time(waits: &[&str]) {
    require_root();
    let cgroup = QuotaCgroup::new("stoker-offcpu-quota", 30000);
    let mut procs = spinners(1, "0.8");
    cgroup.add(procs[0].id());
    // Its start-up may run in the cgroup: the window opens once it idles on its stdin.
    let before = cgroup.settled();
    let pid = procs[0].id();
    let (folded, err, reports, _) = record_spinners("off-cpu", waits, &mut procs);
    let after = cgroup.settled();
    let (counted, stretches) = (after.2 - before.2, (after.1 - before.1) as f64);
    assert!(
        folded.0.keys().all(|s| !s[0].contains(&format!("[pid {pid}]"))),
        "one process, no process frame"
    );
    let by_state = states(&folded, "");
    let throttled = get(&by_state, "[throttled]");
    let sampling = if waits.is_empty() { sampling_bound(stretches, sampled_line(&err).1) } else { 0.0 };
    eprintln!(
        "cpu.stat: {counted:.3} s throttled in {stretches} periods; process: {:?}; stoker: {by_state:?} (sampling bound {sampling:.3} s)",
        reports[0]
    );
    assert!(counted > 1.0, "0.8 s of CPU at a 0.3 CPU quota should be throttled over a second: {counted:.3}");
    assert!(
        (throttled - counted).abs() <= 0.1 + 0.1 * counted + sampling,
        "cpu.stat counted {counted:.3} s throttled, stoker {throttled:.3} s: {by_state:?}\n{err}"
    );
}

/// Three processes spinning on two CPUs: each waits in the run queue for about a third of
/// its time. Per process, stoker's `[runqueue]` is its wall time less its CPU time as it
/// measured them itself, within 5% of its wall time (the start and end of a session are
/// not in the same instant as the process's own clock reads) and the hypervisor's steal;
/// every switch followed.
#[test]
fn run_queue_time_is_wall_less_cpu() {
    run_queue_time(&EVERY_SWITCH);
}

/// The same with the waits sampled by the clock (the default): its preemptions, a few
/// milliseconds each, count as the share of the samples in its life that find it waiting,
/// within the sampling bound of those samples besides.
#[test]
fn run_queue_time_sampled_is_wall_less_cpu() {
    run_queue_time(&[]);
}

fn run_queue_time(waits: &[&str]) {
    require_root();
    let mut procs = spinners(3, "0.6");
    let pids: Vec<u32> = procs.iter().map(Child::id).collect();
    let (folded, err, reports, steal) = record_spinners("wall", waits, &mut procs);
    let gap = if waits.is_empty() { Some(sampled_line(&err).1) } else { None };
    for (pid, (cpu, wall)) in pids.iter().zip(&reports) {
        let by_state = process_states(&folded, *pid);
        let queued = get(&by_state, "[runqueue]");
        let sampling = gap.map_or(0.0, |gap| sampling_bound(wall / gap, gap));
        eprintln!(
            "pid {pid}: cpu {cpu:.3} s of wall {wall:.3} s; stoker: {by_state:?} (sampling bound {sampling:.3} s)"
        );
        assert!(
            (queued - (wall - cpu)).abs() <= 0.05 * wall + 0.02 + steal + sampling,
            "pid {pid} waited {:.3} s for a CPU, stoker says {queued:.3} s: {by_state:?}\n{err}",
            wall - cpu
        );
    }
}

/// `--gil` (in wall mode, so the waits are in the profile too): a thread running Python (it
/// holds the GIL) and a thread hashing large buffers (hashlib lets the GIL go while it
/// hashes). The CPU samples (`[running]`) are the Python thread's CPU time as it measured
/// it (within 10%, sampling error at 199 Hz) and hardly any of the hashing thread's (it holds
/// the GIL only between buffers). The threads' waits are their time off the CPU as they
/// measured it (wall less CPU, within 5% of their time); both allow for the hypervisor's
/// steal (see `steal_seconds`); the summary's wait for the GIL is
/// the profile's `[gil]` and most of those waits (the run queue takes a share when another
/// process holds a CPU).
#[test]
fn gil_samples_only_the_holder() {
    require_root();
    let py = python("3.12.1");
    let (folded, err, stdout, steal) = {
        let out = scratch("offcpu").join("gil.folded");
        let steal = steal_seconds();
        let run = Command::new(STOKER)
            .args(["record", "--gil"])
            .args(EVERY_SWITCH)
            .args(["-m", "wall", "-r", "199", "-f", "folded", "-o", out.to_str().unwrap(), "--"])
            .args([py.to_str().unwrap(), fixture("gil_mixed.py").to_str().unwrap(), "2"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let steal = steal_seconds() - steal;
        let (stdout, err) = (String::from_utf8_lossy(&run.stdout).into_owned(), stderr(&run));
        assert!(run.status.success(), "stoker failed: {err}");
        (Folded::read(&out), err, stdout, steal)
    };
    let (python_cpu, released_cpu) = (reported(&stdout, "python"), reported(&stdout, "released"));
    let (python, released) = (states(&folded, "python_loop"), states(&folded, "released_loop"));
    let (python_seen, released_seen) = (get(&python, "[running]"), get(&released, "[running]"));
    let waiting: f64 =
        python.iter().chain(&released).filter(|(s, _)| *s != "[running]").map(|(_, v)| v).sum();
    let gil = get(&python, "[gil]") + get(&released, "[gil]");
    eprintln!(
        "threads measured: python {python_cpu:.3} s, hashing {released_cpu:.3} s of CPU; stoker: {python:?} {released:?}; {steal:.3} s stolen\n{err}"
    );
    assert!(
        (python_seen - python_cpu).abs() <= 0.1 * python_cpu + steal,
        "python thread: {python_seen:.3} s sampled"
    );
    assert!(
        released_seen <= 0.25 * released_cpu,
        "hashing thread sampled {released_seen:.3} s of {released_cpu:.3}"
    );
    let off_cpu = 2.0 * 2.0 - python_cpu - released_cpu;
    assert!(
        (waiting - off_cpu).abs() <= 0.05 * 4.0 + steal,
        "threads were off the CPU {off_cpu:.3} s, stoker says {waiting:.3} s"
    );
    let line = err.lines().find(|l| l.contains("GIL: held")).unwrap_or_else(|| panic!("no GIL line: {err}"));
    let waited: f64 =
        line.split("waited ").nth(1).and_then(|w| w.split(' ').next()).unwrap().parse().unwrap();
    assert!(waited >= gil - 0.001, "[gil] in the profile {gil:.3} s, summary: {line}");
    assert!(waited >= 0.4 * waiting, "of {waiting:.3} s waiting, {waited:.3} s for the GIL: {line}");
}

/// An asyncio server whose handler runs 300 ms of Python on three of seven requests: the
/// summary reports three blocked stretches, none for the fast requests; each lasts what
/// the handler measured of itself, plus at most 20 ms of the loop's own work around it, and
/// names the handler's code.
#[test]
fn blocked_event_loop_names_the_slow_handler() {
    require_root();
    let mut server = Command::new(python("3.12.1"))
        .arg(fixture("asyncio_server.py"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut port = String::new();
    out.read_line(&mut port).unwrap();
    let folded = scratch("offcpu").join("loop.folded");
    let mut session = Command::new(STOKER)
        .args(["record", "--pid", &server.id().to_string(), "-f", "folded", "-o", folded.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = Stderr::of(&mut session);
    err.wait_for("sampling at");
    let conn = std::net::TcpStream::connect(("127.0.0.1", port.trim().parse::<u16>().unwrap())).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut handler = Vec::new();
    for request in ["fast", "slow", "fast", "fast", "slow", "fast", "slow"] {
        (&conn).write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        if request == "slow" {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            handler.push(reported(&line, "slow"));
        }
    }
    unsafe { libc::kill(session.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut session, "stoker");
    let err = err.rest();
    let _ = server.kill();
    let _ = server.wait();
    assert!(status.success(), "stoker failed: {err}");
    eprintln!("handler measured {handler:?}\n{err}");
    let head = err
        .lines()
        .find(|l| l.contains("event loop blocked"))
        .unwrap_or_else(|| panic!("no loop line: {err}"));
    assert!(head.contains("blocked 3 times 100 ms or longer"), "{head}");
    let blocks: Vec<&str> = err.lines().filter(|l| l.contains(" s  tid ")).collect();
    assert_eq!(blocks.len(), 3, "{err}");
    let mut seen: Vec<f64> =
        blocks.iter().map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
    seen.sort_by(f64::total_cmp);
    handler.sort_by(f64::total_cmp);
    for (stoker, own) in seen.iter().zip(&handler) {
        assert!(
            *stoker >= own - 0.001 && *stoker <= own + 0.02,
            "stretch {stoker:.3} s, handler {own:.3} s: {err}"
        );
    }
    for line in blocks {
        assert!(
            line.contains("crunch (asyncio_server.py:") && line.contains("<- handle (asyncio_server.py:"),
            "{line}"
        );
    }
}

/// A native thread of a Python process, as a Rust or gRPC runtime's worker: it waits for
/// events, then parks on a condition for 150 ms, over and over, never running Python.
const NATIVE_WORKER: &str = r#"
#include <pthread.h>
#include <sys/epoll.h>
#include <time.h>
int stretches = 0;
static void *run(void *arg) {
    int ep = epoll_create1(0);
    struct epoll_event ev;
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    (void)arg;
    for (;;) {
        epoll_wait(ep, &ev, 1, 0);
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_nsec += 150000000;
        if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
        pthread_mutex_lock(&m);
        pthread_cond_timedwait(&c, &m, &t);
        pthread_mutex_unlock(&m);
        __atomic_add_fetch(&stretches, 1, __ATOMIC_SEQ_CST);
    }
    return 0;
}
int start(void) { pthread_t t; return pthread_create(&t, 0, run, 0); }
"#;

/// Starts the native worker (a C library loaded with ctypes), sleeps 1.5 s, and prints
/// how many 150 ms parks the worker finished.
const WITH_NATIVE_WORKER: &str = r#"
import ctypes, sys, time
lib = ctypes.CDLL(sys.argv[1])
assert lib.start() == 0
time.sleep(1.5)
print("stretches", ctypes.c_int.in_dll(lib, "stretches").value, flush=True)
"#;

/// The stretches of a native thread between its waits for events are no Python event
/// loop's: none is reported as a blocked loop, and the summary counts them as left out,
/// as many as the thread finished, give or take one: one more under way as it counted, one
/// fewer when its first began before the session saw its epoll instance (the loop programs
/// are attached then, at the first tick after the thread makes it).
#[test]
fn native_threads_are_no_blocked_event_loops() {
    require_root();
    let dir = scratch("native-worker");
    let (source, lib) = (dir.join("worker.c"), dir.join("libworker.so"));
    std::fs::write(&source, NATIVE_WORKER).unwrap();
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o", lib.to_str().unwrap(), source.to_str().unwrap(), "-lpthread"])
        .status()
        .expect("a C compiler (cc)");
    assert!(cc.success(), "cc failed");
    let py = python("3.12.1");
    let (_, err, stdout, _) = record_command(
        "cpu",
        "99",
        &[],
        &[py.to_str().unwrap(), "-c", WITH_NATIVE_WORKER, lib.to_str().unwrap()],
    );
    let finished: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("stretches "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count: {stdout}"));
    assert!(!err.contains("event loop blocked"), "{err}");
    let line = err.lines().find(|l| l.contains("event loops: ")).unwrap_or_else(|| panic!("{err}"));
    let left_out: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(
        finished >= 5 && (finished - 1..=finished + 1).contains(&left_out),
        "{finished} finished: {line}"
    );
}

/// Threads blocked since before the session (blocked_before.py): the main thread asleep,
/// one waiting on a lock, one reading a connection whose peer never sends. None of them
/// runs during the session (their CPU time, the kernel's accounting, stays the same), so
/// each waits all of it: its state under its function (`[sleep]` under `main`, `[lock]`
/// under `wait_on_lock`, `[socket 127.0.0.1:PORT]` under `wait_on_peer`) weighs at least
/// the session's 2 s (their waits are entered before it starts) and at most 0.5 s more
/// (the session ends at the first 100 ms tick after 2 s; the waits are read after that).
/// On CPython 3.9 (frame objects, a sleep in `select`), found by `--all-python`, and 3.12
/// (interpreter frames), given by `--pid`.
#[test]
fn waits_under_way_at_the_start_are_counted() {
    require_root();
    for (version, all_python) in [("3.9.18", true), ("3.12.1", false)] {
        let mut target = Command::new(python(version))
            .arg(fixture("blocked_before.py"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(target.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ids: serde_json::Value = serde_json::from_str(&line).unwrap();
        let tid = |role: &str| ids[role].as_u64().unwrap() as u32;
        // The main thread prints before it sleeps: in `select` before 3.11 (glibc's is
        // `pselect6`), then in `clock_nanosleep`.
        let sleeping = |t: u32| {
            let call = std::fs::read_to_string(format!("/proc/{}/task/{t}/syscall", target.id())).unwrap();
            call.split_whitespace().next().is_some_and(|n| ["23", "270", "230"].contains(&n))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !sleeping(tid("main")) {
            assert!(std::time::Instant::now() < deadline, "{version}: the main thread never slept");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let ran = |t: u32| {
            let stat = std::fs::read_to_string(format!("/proc/{}/task/{t}/schedstat", target.id())).unwrap();
            stat.split_whitespace().next().unwrap().parse::<u64>().unwrap()
        };
        let roles = ["main", "locked", "reader"];
        let before: Vec<u64> = roles.iter().map(|r| ran(tid(r))).collect();
        let out = scratch("offcpu-before").join("p.folded");
        let pid = target.id().to_string();
        let which = if all_python { vec!["--all-python"] } else { vec!["--pid", &pid] };
        let run = Command::new(STOKER)
            .args(["record", "-m", "wall", "-d", "2", "-f", "folded", "-o", out.to_str().unwrap()])
            .args(FOLLOWED)
            .args(&which)
            .stdin(Stdio::null())
            .output()
            .expect("run stoker");
        let after: Vec<u64> = roles.iter().map(|r| ran(tid(r))).collect();
        target.kill().unwrap();
        target.wait().unwrap();
        let err = stderr(&run);
        assert!(run.status.success(), "{version}: stoker failed: {err}");
        eprintln!("{err}");
        assert_eq!(before, after, "{version}: a blocked thread ran during the session");
        // (With --all-python, other Python processes of the machine may have waits too.)
        let entered: u32 = err
            .lines()
            .find_map(|l| {
                l.trim().strip_suffix(
                    " threads were waiting as the session began: their waits count from its start",
                )
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{version}: no waits entered: {err}"));
        assert!(entered == 3 || (all_python && entered > 3), "{version}: {entered} waits entered: {err}");
        let mut folded = Folded::read(&out);
        if all_python {
            // Stacks start with `comm [pid N]`: the target's, without it.
            let root = format!("[pid {pid}]");
            folded.0 = folded
                .0
                .into_iter()
                .filter(|(stack, _)| stack[0].ends_with(&root))
                .map(|(stack, us)| (stack[1..].to_vec(), us))
                .collect();
        }
        let peer = format!("[socket 127.0.0.1:{}]", ids["port"]);
        for (function, state) in
            [("main (", "[sleep]"), ("wait_on_lock (", "[lock]"), ("wait_on_peer (", peer.as_str())]
        {
            let by_state = states(&folded, function);
            let waited = get(&by_state, state);
            eprintln!("{version}: {function}...) {state} {waited:.3} s");
            assert!((2.0..=2.5).contains(&waited), "{version}: {function}...): {by_state:?}");
            let others: f64 = by_state.iter().filter(|(s, _)| *s != state).map(|(_, v)| v).sum();
            assert!(others == 0.0, "{version}: {function}...): {by_state:?}");
        }
    }
}
