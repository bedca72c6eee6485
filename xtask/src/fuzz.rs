//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` on the stable toolchain and runs
//! each for a bounded time from its committed seeds, reporting executions and crashes per target.
use std::{ffi::OsString, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

use crate::{root, sh};

/// Set (to any value) in the environment of the fuzz build, where cargo runs xtask itself as
/// `RUSTC_WORKSPACE_WRAPPER`: see [`rustc_wrapper`].
pub const WRAPPER_ENV: &str = "STOKER_FUZZ_RUSTC_WRAPPER";

/// What cargo-fuzz passes rustc for libFuzzer with no sanitizer: edge coverage as inline 8-bit
/// counters with a PC table, comparison tracing (so the fuzzer learns magic numbers and
/// keywords) and stack depth, plus `--cfg fuzzing`. All of it is stable `-C` flags.
const COVERAGE_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "--cfg",
    "fuzzing",
];

/// The crate whose code is instrumented: the agent's library, where the parsers are.
const INSTRUMENTED_CRATE: &str = "stoker";

/// rustc as cargo runs it for the fuzz build (`xtask <rustc> <args>`): the coverage flags are
/// added for the agent's library only. Its dependencies are built exactly as for the tests,
/// so the fuzz build reuses them; build scripts and dependencies would not link the flags'
/// callbacks, which only libFuzzer defines.
pub fn rustc_wrapper() -> ! {
    let mut args = std::env::args_os().skip(1);
    let rustc = args.next().expect("cargo passes rustc as the wrapper's first argument");
    let args: Vec<OsString> = args.collect();
    let crate_name = args.windows(2).find(|w| w[0] == "--crate-name").map(|w| w[1].clone());
    let mut cmd = Command::new(rustc);
    cmd.args(&args);
    if crate_name.as_deref() == Some(INSTRUMENTED_CRATE.as_ref()) {
        cmd.args(COVERAGE_FLAGS);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        eprintln!("xtask: cannot run rustc: {e}");
        std::process::exit(1)
    });
    std::process::exit(status.code().unwrap_or(1))
}

/// Builds the fuzz targets and runs `targets` (all when empty) for `seconds` each, one after
/// the other. New inputs and crash reproducers go under the target directory, never into the
/// committed corpus. Fails when a target crashed.
pub fn run(seconds: u32, targets: &[String]) -> Result<()> {
    let root = root();
    let all = target_names(&root)?;
    for t in targets {
        if !all.contains(t) {
            bail!("no fuzz target `{t}`; the targets are: {}", all.join(", "));
        }
    }
    let targets = if targets.is_empty() { all } else { targets.to_vec() };

    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::path::absolute(dir)?,
        None => root.join("target"),
    };
    println!("fuzz: building the fuzz targets (libFuzzer, coverage of the `{INSTRUMENTED_CRATE}` library)");
    sh(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--package", "stoker-fuzz", "--bins"])
        .env("RUSTC_WORKSPACE_WRAPPER", std::env::current_exe()?)
        .env(WRAPPER_ENV, "1"))?;

    let work = target_dir.join("fuzz");
    let mut results = Vec::new();
    for target in &targets {
        let result = run_target(&target_dir.join("debug").join(target), &root, &work, target, seconds)?;
        println!(
            "fuzz: {target:<14} {:>10} executions in {:>3} s, {} new inputs, crashes: {}",
            result.executions,
            result.seconds,
            result.new_inputs,
            u32::from(result.crash.is_some())
        );
        if let Some(crash) = &result.crash {
            println!("{crash}");
        }
        results.push((target, result));
    }

    println!("\n| target | executions | crashes |\n|---|---:|---:|");
    for (target, r) in &results {
        println!("| {target} | {} | {} |", r.executions, u32::from(r.crash.is_some()));
    }
    let crashed: Vec<&str> =
        results.iter().filter(|(_, r)| r.crash.is_some()).map(|(t, _)| t.as_str()).collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {}; run {}/debug/<target> <reproducer> to reproduce",
            crashed.join(", "),
            target_dir.display()
        );
    }
    Ok(())
}

/// The fuzz targets: one file each in `fuzz/fuzz_targets/`.
fn target_names(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

struct Outcome {
    executions: u64,
    new_inputs: u64,
    seconds: u64,
    /// What the crash was and where its reproducer is.
    crash: Option<String>,
}

fn run_target(binary: &Path, root: &Path, work: &Path, target: &str, seconds: u32) -> Result<Outcome> {
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let seeds = root.join("fuzz/corpus").join(target);
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut artifact_prefix = artifacts.clone().into_os_string();
    artifact_prefix.push("/");
    let started = Instant::now();
    // New inputs go to the first corpus directory (under the target directory); the committed
    // seeds are only read. A single input running 10 s is a hang; 1 GiB of memory a leak.
    let status = Command::new(binary)
        .arg(format!("-max_total_time={seconds}"))
        .args(["-timeout=10", "-rss_limit_mb=1024", "-print_final_stats=1"])
        .arg(concat_os("-artifact_prefix=", &artifact_prefix))
        .arg(&corpus)
        .arg(&seeds)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot run {} (build it with `cargo xtask fuzz`)", binary.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let crash = (!status.success()).then(|| {
        // The panic and its message (the next line), libFuzzer's verdict, the reproducer.
        let lines: Vec<&str> = text.lines().collect();
        let what: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                l.contains("panicked at")
                    || (*i > 0 && lines[i - 1].contains("panicked at"))
                    || l.starts_with("==")
                    || l.contains("Test unit written to")
            })
            .map(|(_, l)| *l)
            .take(8)
            .collect();
        format!("  {status}; log {}\n  {}", log_path.display(), what.join("\n  "))
    });
    Ok(Outcome {
        executions: stat("number_of_executed_units"),
        new_inputs: stat("new_units_added"),
        seconds: started.elapsed().as_secs(),
        crash,
    })
}

fn concat_os(a: &str, b: &std::ffi::OsStr) -> OsString {
    let mut s = OsString::from(a);
    s.push(b);
    s
}
