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

/// `assert_samples` for `got` samples of `function` in a `shares` workload's `report`, at
/// 99 Hz, allowing for its stalled calls.
fn assert_samples_in(what: &str, got: u64, report: &Value, function: &str) {
    assert_samples_stalled(what, got, seconds_in(report, function), stalled_in(report, function), 99.0);
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
    let stalled = stalled_seconds(&truth);
    assert_samples_stalled(
        &format!("{version}: func_a/b/c at their marked lines"),
        in_funcs,
        seconds,
        stalled,
        hz,
    );
    for (name, frame) in &frames {
        let share = profile.with_frame(|f| f == frame) as f64 / in_funcs as f64;
        let (expected, stalls) = measured_share(&truth, name);
        let tolerance = share_tolerance(expected, in_funcs) + stalls;
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

/// Line of the `# line: NAME` marker in tests/fixtures/python/dump_target.py.
fn dump_target_line(name: &str) -> u64 {
    let text = std::fs::read_to_string(workload().with_file_name("dump_target.py")).unwrap();
    let marker = format!("# line: {name}");
    text.lines().position(|l| l.trim_end().ends_with(&marker)).expect("marker") as u64 + 1
}

/// `stoker top` in a real terminal (a tmux pane) on a `shares` workload: once 400 samples
/// are in, each of func_a, func_b and func_c has the share of their total time (they call
/// `burn`, the leaf) that the workload measured in it, within the sampling tolerance; key 2
/// sorts by %total, and q quits.
#[test]
fn top_shows_live_functions_and_follows_keys() {
    require_root();
    let dir = scratch("top");
    let report = dir.join("r.json");
    let mut target = Command::new(python("3.12.1"))
        .args([workload().to_str().unwrap(), "shares", "120", report.to_str().unwrap(), "--cpu"])
        .spawn()
        .unwrap();
    let session = format!("stoker-top-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux").args(args).output().expect("tmux (cargo xtask setup installs it)")
    };
    let command = format!("{STOKER} top --pid {}", target.id());
    let started = tmux(&["new-session", "-d", "-s", &session, "-x", "160", "-y", "40", &command]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let pane = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned();
    let until = |what: &str, ok: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let screen = pane();
            if ok(&screen) {
                return screen;
            }
            assert!(std::time::Instant::now() < deadline, "{what} never showed: {screen}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let since_start = |screen: &str| -> u64 {
        let at = screen.find("since the start: ").map(|i| &screen[i + 17..]);
        at.and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    let screen = until("400 samples", &|s| since_start(s) >= 400 && s.contains("sorted by %own"));
    let total = |function: &str| -> f64 {
        let row = screen.lines().find(|l| l.ends_with(&format!(" {function} (workload.py)")));
        let row = row.unwrap_or_else(|| panic!("no row for {function}: {screen}"));
        row.split_whitespace().nth(3).unwrap().trim_end_matches('s').parse::<f64>().unwrap() * 99.0
    };
    let measured: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let functions = ["func_a", "func_b", "func_c"];
    let n: f64 = functions.iter().map(|f| total(f)).sum();
    for f in functions {
        let share = total(f) / n;
        let (truth, stalls) = measured_share(&measured, f);
        let tolerance = share_tolerance(truth, n as u64) + stalls;
        eprintln!(
            "{f}: {share:.3} of the three's time in top, {truth:.3} by the workload (+- {tolerance:.3})"
        );
        assert!((share - truth).abs() <= tolerance, "{f}: {share:.3} vs {truth:.3}: {screen}");
    }
    tmux(&["send-keys", "-t", &session, "2"]);
    until("sorting by %total", &|s| s.contains("sorted by %total"));
    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tmux(&["has-session", "-t", &session]).status.success() {
        assert!(std::time::Instant::now() < deadline, "q did not quit: {}", pane());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    target.kill().unwrap();
    target.wait().unwrap();
}

/// Waits until thread `tid` of `pid` has run 20 ms in user mode (2 clock ticks) from now:
/// a Python thread does so only holding the GIL. The main thread of dump_target.py takes
/// the GIL from the spinner to print, and the spinner takes it back only once it runs
/// again after the main thread's sleep began (a moment, or longer on a busy CPU).
fn runs_python(pid: u32, tid: u32) {
    let utime = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
        // Fields after the command's closing parenthesis: utime is the 14th field overall.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap()
    };
    let (start, deadline) = (utime(), std::time::Instant::now() + std::time::Duration::from_secs(30));
    while utime() < start + 2 {
        assert!(std::time::Instant::now() < deadline, "thread {tid} did not run");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits until thread `tid` of `pid` is blocked in one of the system calls `numbers`
/// (x86-64), as /proc/PID/task/TID/syscall shows.
fn in_syscall(pid: u32, tid: u32, numbers: &[i64]) {
    let path = format!("/proc/{pid}/task/{tid}/syscall");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let number = text.split_whitespace().next().and_then(|n| n.parse::<i64>().ok());
        if number.is_some_and(|n| numbers.contains(&n)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "thread {tid} never blocked in {numbers:?}: {text}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `stoker dump` on a process whose threads are in known states (dump_target.py): the main
/// thread asleep in time.sleep, one waiting on a lock, one spinning. Each thread's innermost
/// Python frame is the function and line it is at, its state is the kernel's, the lock
/// waiter waits in futex, and the spinner alone holds the GIL; on each interpreter layout
/// (frame objects up to 3.10, interpreter frames since 3.11, debug offsets since 3.13).
#[test]
fn dump_shows_each_threads_stack_state_and_gil() {
    require_root();
    for build in ["3.8.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0", "sid-3.14", "sid-3.15-shared"] {
        let mut target = Command::new(python(build))
            .arg(workload().with_file_name("dump_target.py"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(target.stdout.take().unwrap()), &mut line)
            .unwrap();
        let tids: Value = serde_json::from_str(&line).unwrap();
        // The main thread prints before it sleeps, and the waiter lists itself before it
        // blocks: each is dumped once the kernel shows it in that system call (sleeps:
        // select on 3.8-3.10, clock_nanosleep since; the lock: futex).
        let tid = |role: &str| tids[role].as_u64().unwrap() as u32;
        in_syscall(target.id(), tid("main"), &[23, 35, 230, 270]);
        in_syscall(target.id(), tid("locked"), &[202]);
        runs_python(target.id(), tid("spinning"));
        let out = stoker(&["dump", "--pid", &target.id().to_string(), "--json"]);
        let text = stoker(&["dump", "--pid", &target.id().to_string()]);
        target.kill().unwrap();
        target.wait().unwrap();
        assert!(out.status.success(), "{build}: {}", stderr(&out));
        let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
        // The release as far as it is known: 3.11+ say it (`Py_Version`), older builds only
        // their major and minor version (the file's name), not a patch level of 0.
        let release = match build {
            "3.8.18" => Some("3.8"),
            "3.10.13" => Some("3.10"),
            b if !b.starts_with("sid-") => Some(b),
            _ => None,
        };
        if let Some(release) = release {
            assert_eq!(dump["version"], release, "{build}");
        }
        let threads = dump["threads"].as_array().unwrap();
        assert_eq!(threads.len(), 3, "{build}: {dump:#}");
        let thread = |role: &str| {
            let tid = tids[role].as_u64().unwrap();
            threads
                .iter()
                .find(|t| t["tid"].as_u64() == Some(tid))
                .unwrap_or_else(|| panic!("{build}: no {role} thread {tid}: {dump:#}"))
        };
        for (role, function, marker) in [
            ("main", "main", "main_sleep"),
            ("locked", "wait_on_lock", "lock_wait"),
            ("spinning", "spin", "spin"),
        ] {
            let t = thread(role);
            let leaf = &t["frames"][0];
            assert_eq!(
                (leaf["function"].as_str(), leaf["line"].as_u64()),
                (Some(function), Some(dump_target_line(marker))),
                "{build}: {role}: {t:#}"
            );
            assert!(leaf["file"].as_str().unwrap().ends_with("dump_target.py"), "{build}: {t:#}");
            assert_eq!(t["holds_gil"].as_bool(), Some(role == "spinning"), "{build}: {role}: {t:#}");
        }
        assert_eq!(thread("spinning")["state"], "running", "{build}");
        assert_eq!(thread("locked")["state"], "sleeping", "{build}");
        assert!(thread("locked")["waiting"].as_str().unwrap().starts_with("futex"), "{build}: {dump:#}");
        assert_eq!(thread("main")["state"], "sleeping", "{build}");
        let text = String::from_utf8_lossy(&text.stdout);
        let header = format!("Thread {} \"", tids["locked"]);
        assert!(
            text.contains(&header) && text.contains("wait_on_lock (") && text.contains("holds the GIL"),
            "{build}: {text}"
        );
    }
    // Not CPython, and a kernel thread: one line each.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let out = stoker(&["dump", "--pid", &sleeper.id().to_string()]);
    sleeper.kill().ok();
    sleeper.wait().ok();
    assert_one_line_error(&out, "(sleep) is not a CPython process");
    assert_one_line_error(&stoker(&["dump", "--pid", "2"]), "pid 2 (kthreadd) is a kernel thread");
}

/// CPython 2.7 and 3.6 (no `_PyRuntime` before 3.7) are recognized by `Py_Initialize` in
/// their libpython and refused with their version, as 3.7 is, in one warning. No such
/// build installs here: the test builds a library of that name exporting `Py_Initialize`
/// and a program that calls it, then waits.
#[test]
fn python_2_7_and_3_6_are_refused_with_their_version() {
    require_root();
    let dir = scratch("old");
    for version in ["2.7", "3.6"] {
        let lib = dir.join(format!("libpython{version}.so.1.0"));
        let (lib_c, main_c, exe) =
            (dir.join("lib.c"), dir.join("main.c"), dir.join(format!("embed{version}")));
        std::fs::write(&lib_c, "void Py_Initialize(void) {}\n").unwrap();
        std::fs::write(&main_c, "#include <unistd.h>\nvoid Py_Initialize(void);\nint main(void) { Py_Initialize(); pause(); return 0; }\n").unwrap();
        let cc =
            |args: &[&std::ffi::OsStr]| assert!(Command::new("cc").args(args).status().unwrap().success());
        cc(&["-shared".as_ref(), "-fPIC".as_ref(), "-o".as_ref(), lib.as_os_str(), lib_c.as_os_str()]);
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        cc(&["-o".as_ref(), exe.as_os_str(), main_c.as_os_str(), lib.as_os_str(), rpath.as_ref()]);
        let mut embed = Command::new(&exe).spawn().unwrap();
        // Until the library is mapped (the loader maps it before main runs).
        while !std::fs::read_to_string(format!("/proc/{}/maps", embed.id())).unwrap().contains("libpython") {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let folded = dir.join("old.folded");
        let out = record_folded(&folded, &["-p", &embed.id().to_string(), "-d", "1"]);
        embed.kill().unwrap();
        embed.wait().unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("stoker: warning")).collect();
        assert_eq!(
            warnings,
            [format!(
                "stoker: warning: process {} runs CPython {version}, which stoker cannot walk; its samples show native stacks",
                embed.id()
            )],
            "{err}"
        );
    }
}

/// A copy of Debian unstable's static 3.15 (beside it, so it finds its standard library)
/// that says it is 3.16.0: in `Py_Version` and in its `_Py_DebugOffsets` (the first words of
/// `_PyRuntime`), both in the file's data. `patch` changes the debug offsets further (byte
/// offset from `_PyRuntime`, new value). Removed when dropped.
struct NewerPython(std::path::PathBuf);

impl NewerPython {
    fn new(patch: &[(u64, u64)]) -> Self {
        use object::{Object, ObjectSection, ObjectSymbol};
        let original = python("sid-3.15");
        let mut data = std::fs::read(&original).unwrap();
        let file_offset = |data: &[u8], name: &str| {
            let file = object::File::parse(data).unwrap();
            let symbol = file.dynamic_symbols().chain(file.symbols()).find(|s| s.name() == Ok(name)).unwrap();
            let section = file.section_by_index(symbol.section_index().unwrap()).unwrap();
            (symbol.address() - section.address() + section.file_range().unwrap().0) as usize
        };
        let version = file_offset(&data, "Py_Version");
        let runtime = file_offset(&data, "_PyRuntime");
        let hex = u32::from_le_bytes(data[version..version + 4].try_into().unwrap());
        assert_eq!(hex >> 16, 0x030f, "Py_Version of 3.15: {hex:#x}");
        assert_eq!(&data[runtime..runtime + 8], b"xdebugpy", "_PyRuntime starts with the debug offsets");
        let newer: u32 = 0x0310_00f0;
        data[version..version + 4].copy_from_slice(&newer.to_le_bytes());
        data[runtime + 8..runtime + 16].copy_from_slice(&u64::from(newer).to_le_bytes());
        for &(at, value) in patch {
            let at = runtime + at as usize;
            data[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = original.with_file_name(format!("python3.16-test-{}-{n}", std::process::id()));
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Self(path)
    }
}

impl Drop for NewerPython {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A release newer than stoker knows, whose debug offsets pass validation, is walked with
/// the latest layout stoker knows once its first code objects read back as code objects:
/// its functions get the samples of the CPU time it measured in them.
#[test]
fn a_newer_cpython_is_walked_after_its_layout_checks_out() {
    require_root();
    let newer = NewerPython::new(&[]);
    let (profile, report, err) =
        record_workload(&newer.0, &["shares", "2", "--cpu"], &["--log-level", "info"]);
    assert!(
        err.contains("runs CPython 3.16.0, newer than stoker knows: walked with CPython 3.15's layout"),
        "{err}"
    );
    assert!(err.contains("the untried layout holds: "), "{err}");
    let got = profile.with_frame(|f| f == workload_frame("func_a", "func_a"));
    assert_samples_in("func_a on 3.16", got, &report, "func_a");
}

/// A newer release whose debug offsets do not check out (here `runtime_state`'s size, the
/// word after the cookie, version and free-threading flag, is 0) is refused with one line
/// saying what did not, and sampled with native stacks; nothing else fails.
#[test]
fn a_newer_cpython_whose_offsets_do_not_check_out_is_refused() {
    require_root();
    let newer = NewerPython::new(&[(24, 0)]);
    let (profile, _, err) = record_workload(&newer.0, &["shares", "1", "--cpu"], &[]);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("stoker: warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("runs CPython 3.16.0 (The _Py_DebugOffsets entry for runtime_state.interpreters_head is implausible (0))"),
        "{err}"
    );
    assert!(profile.with_frame(|f| f.contains("workload.py")) == 0, "Python frames from a refused layout");
    assert!(profile.total() > 0, "the process is still sampled");
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

/// Records `python(version)` running tests/fixtures/python/`script` `count` REPORT with
/// stoker's `flags` into `output`; returns stoker's stderr and the script's JSON report.
fn record_fixture(
    version: &str,
    script: &str,
    count: &str,
    flags: &[&str],
    output: &std::path::Path,
) -> (String, Value) {
    let report = output.with_file_name("report.json");
    let (py, script) = (python(version), workload().with_file_name(script));
    let mut args = vec!["record", "-o", output.to_str().unwrap()];
    args.extend(flags);
    args.extend(["--", py.to_str().unwrap(), script.to_str().unwrap(), count, report.to_str().unwrap()]);
    let out = stoker(&args);
    let err = stderr(&out);
    assert!(out.status.success(), "{version}: stoker failed: {err}");
    (err, serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap())
}

/// A thread per request (30 threads, one after another, each exiting at once): with
/// `--threads`, every handler sample sits under its own thread's name and id, as the kernel
/// read them while the thread lived: root frames in folded output, `thread` and `thread_id`
/// labels in pprof (and no thread frames). The handler's samples are the CPU time the
/// threads measured. On 3.12 the threads name themselves; 3.14 names them from `Thread.name`.
#[test]
fn thread_per_request_threads_keep_their_names() {
    require_root();
    for version in ["3.12.1", "sid-3.14"] {
        for format in ["folded", "pprof"] {
            let out_path = scratch("thread-names").join(format!("out.{format}"));
            let (_, threads) = record_fixture(
                version,
                "thread_per_request.py",
                "30",
                &["--threads", "-f", format],
                &out_path,
            );
            let threads = threads.as_object().unwrap();
            let cpu: f64 = threads.values().map(|t| t["seconds"].as_f64().unwrap()).sum();
            // (thread name, tid, samples) of the stacks whose leaf is the handler.
            let mut handler: Vec<(String, String, u64)> = Vec::new();
            if format == "folded" {
                for (stack, n) in &Folded::read(&out_path).0 {
                    if !stack.last().is_some_and(|f| f.starts_with("handle_request ")) {
                        continue;
                    }
                    let (name, tid) = stack[0].rsplit_once(" (tid ").unwrap_or((&stack[0], ")"));
                    handler.push((name.to_string(), tid.trim_end_matches(')').to_string(), *n));
                }
            } else {
                let p = decode_pprof(&out_path);
                let functions = p["functions"].as_array().unwrap();
                assert!(
                    !functions.iter().any(|f| f.as_str().unwrap().contains("(tid ")),
                    "{version}: threads are labels, not frames: {functions:?}"
                );
                for (key, n) in p["threads"].as_object().unwrap() {
                    let parts: Vec<&str> = key.splitn(3, '|').collect();
                    if parts[2].starts_with("handle_request") {
                        handler.push((parts[0].to_string(), parts[1].to_string(), n.as_u64().unwrap()));
                    }
                }
            }
            for (name, tid, n) in &handler {
                let expected = threads.get(tid).and_then(|t| t["name"].as_str());
                assert_eq!(
                    Some(name.as_str()),
                    expected,
                    "{version} {format}: {n} handler samples of thread {tid} named {name:?}; the thread was {expected:?}"
                );
            }
            let samples = handler.iter().map(|(_, _, n)| n).sum();
            assert_samples(&format!("{version} {format}: handler"), samples, cpu, 99.0);
        }
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
    assert_samples_in("func_a after exit", got, &report, "func_a");
}

/// `--nolineno`: Python frames name functions without lines, each function one frame
/// however many of its lines ran; a function's samples are still its CPU time.
#[test]
fn nolineno_gives_one_frame_per_function() {
    require_root();
    let (profile, report, _) = record_workload(&python("3.12.1"), &["shares", "2", "--cpu"], &["--nolineno"]);
    let with_lines: Vec<&String> = profile.0.keys().flatten().filter(|f| f.contains(".py:")).collect();
    assert!(with_lines.is_empty(), "frames with a line: {with_lines:?}");
    let got = profile.with_frame(|f| f == "func_a (workload.py)");
    assert_samples_in("func_a without lines", got, &report, "func_a");
    // `burn` runs on several lines: one frame names it.
    let mut burn: Vec<&String> = profile.0.keys().flatten().filter(|f| f.starts_with("burn (")).collect();
    burn.sort();
    burn.dedup();
    assert_eq!(burn, ["burn (workload.py)"], "burn's frames");
}

/// Imports of modules whose bodies run 30 ms each, between modules whose bodies run none
/// (code objects freed once the import is done, their memory taken by the next): stoker
/// reads a new stack's code objects as soon as the kernel reports it, so the bodies are
/// named as module bodies that burn. Their samples (named, named after an idle module whose
/// code took the address, or `<unknown code>`) are the CPU time they measured of
/// themselves, at most 10% of them not named (a body's last millisecond or so, between a
/// sample and its reading); the summary gives the unknown share when there is one. Which
/// burning module a sample names is not checked: these bodies are alike, so a later one
/// can get the same code address, and the same instruction offsets, as an earlier one, and
/// its samples then count under the stack the kernel keyed for the earlier one.
#[test]
fn module_bodies_are_named_while_they_are_imported() {
    require_root();
    for version in ["3.8.18", "3.12.1", "sid-3.14"] {
        let folded = scratch("imports").join("out.folded");
        let (err, report) = record_fixture(version, "imports.py", "120", &["-f", "folded"], &folded);
        let cpu = report["module_cpu"].as_f64().unwrap();
        let profile = Folded::read(&folded);
        // `<module> (mod_7.py:3)`: the module's number, and whether its body burns.
        let module = |f: &str| f.strip_prefix("<module> (mod_")?.split('.').next()?.parse::<u32>().ok();
        let named = profile.with_frame(|f| module(f).is_some_and(|i| i % 2 == 0));
        let misnamed = profile.with_frame(|f| module(f).is_some_and(|i| i % 2 == 1));
        let unknown = profile.with_frame(|f| f.starts_with("<unknown code"));
        eprintln!("{version}: {named} module samples named, {misnamed} in idle modules, {unknown} unknown");
        assert_samples(&format!("{version}: module bodies"), named + misnamed + unknown, cpu, 99.0);
        // A body read late is another module's, or none: the idle ones have no samples of
        // their own (their bodies take microseconds).
        assert!(
            (misnamed + unknown) as f64 <= 0.1 * cpu * 99.0,
            "{version}: of {} module samples, {misnamed} named an idle module and {unknown} no code",
            named + misnamed + unknown
        );
        let said = err.contains("shows <unknown code> frames");
        assert_eq!(said, unknown > 0, "{version}: the summary on {unknown} unknown samples: {err}");
    }
}

/// Stacks of process `pid` in `profile` (a profile of several processes roots each stack at
/// `NAME [pid N]`), or all of them.
fn stacks_of(profile: &Folded, pid: Option<u32>) -> impl Iterator<Item = (&Vec<String>, &u64)> {
    let root = pid.map(|pid| format!("[pid {pid}]"));
    profile
        .0
        .iter()
        .filter(move |(s, _)| root.as_ref().is_none_or(|r| s.first().is_some_and(|f| f.ends_with(r))))
}

/// Samples of process `pid` (see `stacks_of`) whose stack has no Python frame (a frame such
/// as `func_a (workload.py:40)` or `<module> (<frozen importlib._bootstrap>:1)`).
fn without_python_frames(profile: &Folded, pid: Option<u32>) -> u64 {
    let python_frame = |f: &str| {
        f.ends_with(')') && f.rsplit_once(':').is_some_and(|(_, l)| l[..l.len() - 1].parse::<u32>().is_ok())
    };
    stacks_of(profile, pid).filter(|(s, _)| !s.iter().any(|f| python_frame(f))).map(|(_, n)| n).sum()
}

/// A process walked from its first samples: the samples of it that have no Python frame
/// are no more than the CPU time it spent before its script's first line (which it measured
/// itself) gives, within the sampling tolerance; its loop's samples match the CPU time it
/// measured there. Before that first line, the interpreter starts (no Python frame exists
/// yet) and the frozen import machinery runs (Python frames), so the bound is loose on that
/// side only; a process walked 100 ms late loses about ten samples, twice the tolerance.
fn assert_walked_from_start(what: &str, profile: &Folded, pid: Option<u32>, report: &Value) {
    let startup = report["startup_cpu_seconds"].as_f64().expect("startup_cpu_seconds");
    let missing = without_python_frames(profile, pid);
    let bound = startup * 99.0 + sampling_tolerance(startup * 99.0).max(2.0);
    eprintln!(
        "{what}: {missing} samples without Python frames; start-up took {startup:.3} s of CPU, at most {bound:.1}"
    );
    assert!(
        missing as f64 <= bound,
        "{what}: {missing} samples without Python frames, more than the {startup:.3} s of CPU before its first line gives ({bound:.1})"
    );
    let in_loop =
        stacks_of(profile, pid).filter(|(s, _)| s.iter().any(|f| f.starts_with("shares (workload.py:")));
    let got: u64 = in_loop.map(|(_, n)| n).sum();
    let cpu = report["cpu_seconds"].as_f64().expect("cpu_seconds");
    assert_samples(&format!("{what}: its loop"), got, cpu, 99.0);
}

/// A process that execs into Python is walked as the new program starts: the kernel tells
/// stoker of the target's exec, and it looks at the new program at once. The shell waits
/// for a line before it execs (by then stoker has seen it is not Python); the workload then
/// runs at once, and its samples are counted as in `assert_walked_from_start`.
#[test]
fn target_execs_into_python() {
    require_root();
    let dir = scratch("exec");
    let folded = dir.join("exec.folded");
    let report = dir.join("r.json");
    let script = format!(
        "read line; exec {} {} shares 1 {} --cpu",
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
    let status = wait_exit(&mut stoker, "stoker");
    let err = err.rest();
    assert!(status.success(), "{err}");
    assert!(err.contains("after its exec"), "the exec was not seen: {err}");
    let profile = Folded::read(&folded);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // The shell's samples (it waits for its line) count as not Python: there are few.
    assert_walked_from_start("after exec", &profile, None, &report);
}

/// `stoker record --all-python` writing folded stacks to `folded`, logging at info level.
fn record_all_python(folded: &std::path::Path) -> (std::process::Child, Stderr) {
    let mut stoker = Command::new(STOKER)
        .args(["record", "--all-python", "--log-level", "info", "-f", "folded", "-o"])
        .arg(folded)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stoker");
    let err = Stderr::of(&mut stoker);
    (stoker, err)
}

/// Processes that live a second, started while `--all-python` runs (a CLI tool, a cron job):
/// each is walked from its first samples, whether its interpreter binary is new to stoker
/// or known, linked statically or to libpython (mapped by the loader after the exec).
#[test]
fn short_lived_processes_walked_from_their_start() {
    require_root();
    let dir = scratch("short");
    let folded = dir.join("short.folded");
    let (mut stoker, mut err) = record_all_python(&folded);
    err.wait_for("sampling at");
    let builds = ["3.12.1", "3.12.1", "sid-3.15", "sid-3.15", "sid-3.14-shared"];
    let mut runs = Vec::new();
    for (i, build) in builds.iter().enumerate() {
        let report = dir.join(format!("r{i}.json"));
        let mut child = Command::new(python(build))
            .args([workload().to_str().unwrap(), "shares", "1", report.to_str().unwrap(), "--cpu"])
            .spawn()
            .unwrap();
        assert!(wait_exit(&mut child, build).success());
        runs.push((build, child.id(), report));
    }
    unsafe { libc::kill(stoker.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut stoker, "stoker");
    let err = err.rest();
    assert!(status.success(), "{err}");
    let profile = Folded::read(&folded);
    for (i, (build, pid, report)) in runs.iter().enumerate() {
        let report: Value = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
        let seen = if builds[..i].contains(build) { "known" } else { "new" };
        assert_walked_from_start(&format!("{build} ({seen} binary)"), &profile, Some(*pid), &report);
    }
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
    let (mut stoker, mut err) = record_all_python(&folded);
    err.wait_for(&format!("pid {}: CPython 3.8", old.id()));
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
        assert_samples_in(&format!("func_a under `{root}`"), n, &report, "func_a");
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
    // The exec'd child's CPU time in the summary (the kernel's accounting of its life as
    // last read) is what it measured of itself (its start-up and its work): plus its imports
    // and exit, which it does not time (at most 0.15 s more), less what it ran after the
    // last reading before it exited (readings are a 100 ms tick apart; 0.25 s on a loaded
    // machine).
    let pid: u32 = exec_child[0].rsplit("[pid ").next().unwrap().trim_end_matches(']').parse().unwrap();
    let err = stderr(&out);
    let line =
        err.lines().find(|l| l.contains("CPU time during the session")).unwrap_or_else(|| panic!("{err}"));
    let accounted: f64 = line
        .split(", ")
        .find_map(|part| part.rsplit_once(&format!("pid {pid} "))?.1.strip_suffix(" s")?.parse().ok())
        .unwrap_or_else(|| panic!("pid {pid} not in {line}"));
    let own: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("r.json")).unwrap()).unwrap();
    let measured = own["cpu_seconds"].as_f64().unwrap() + own["startup_cpu_seconds"].as_f64().unwrap();
    eprintln!("exec'd child: accounted {accounted:.3} s, measured itself {measured:.3} s");
    assert!(
        accounted >= measured - 0.25 && accounted <= measured + 0.15,
        "pid {pid}: {accounted:.3} s accounted, {measured:.3} s measured: {line}"
    );
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
