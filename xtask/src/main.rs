//! Developer tasks: `cargo xtask setup | lint | test | fuzz | demo`. Setup installs only what is
//! missing and says what it installs; the others build and run stoker.
mod fuzz;
mod lint;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools (Debian packages, rustup link, bpf-linker).
    Setup,
    /// Run every test: unit tests and the root-only end-to-end tests.
    Test {
        /// While the suite runs, keep CPU 1 busy with a CPU hog pinned to it
        /// (`taskset -c 1 /usr/bin/python3 -c 'while 1: pass'`), as a shared CI machine might.
        #[arg(long)]
        hog: bool,
        /// Run the suite this many times, stopping at the first failure.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        args: Vec<String>,
    },
    /// Build the fuzz targets (libFuzzer) and run each for a while from its committed corpus.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
        seconds: u32,
        /// Targets to run (the files of fuzz/fuzz_targets/); all when none is named.
        targets: Vec<String>,
    },
    /// Build stoker and profile the bundled Python demo service under load into a flamegraph.
    Demo,
    /// Run clippy with warnings denied on the host crates and on the kernel programs (BPF target).
    Lint,
}

fn main() {
    if std::env::var_os(fuzz::WRAPPER_ENV).is_some() {
        fuzz::rustc_wrapper();
    }
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args, hog, runs } => test(&args, hog, runs),
        Task::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Task::Demo => demo(),
        Task::Lint => lint::run(),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if effective_uid() != 0 {
        bail!("{what} loads eBPF programs into the kernel: run it as root");
    }
    Ok(())
}

fn effective_uid() -> u32 {
    // /proc/self/status avoids a libc dependency for one call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

fn test(args: &[String], hog: bool, runs: u32) -> Result<()> {
    require_root("the test suite")?;
    let _hog = if hog { Some(Hog::start()?) } else { None };
    for run in 1..=runs {
        if runs > 1 {
            println!("xtask: test run {run} of {runs}");
        }
        test_once(args).with_context(|| format!("test run {run} of {runs} failed"))?;
    }
    if runs > 1 {
        println!("xtask: {runs} test runs passed");
    }
    Ok(())
}

/// A CPU hog pinned to CPU 1, killed when dropped (on success, failure or panic) and, through
/// its parent-death signal, when xtask itself is killed (Ctrl-C).
struct Hog(std::process::Child);

impl Hog {
    fn start() -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            bail!("--hog pins a CPU hog to CPU 1 and needs at least 2 CPUs; this machine has {cpus}");
        }
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "taskset", "-c", "1", "/usr/bin/python3", "-c", "while 1: pass"])
            .spawn()
            .context("cannot start the CPU hog (setpriv, taskset and /usr/bin/python3 are needed)")?;
        println!("xtask: CPU hog running on CPU 1 (pid {})", child.id());
        Ok(Self(child))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn test_once(args: &[String]) -> Result<()> {
    // Where cargo builds the stoker binary that deploy/check.sh runs.
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::path::absolute(dir)?,
        None => root().join("target"),
    };
    // The end-to-end tests run one at a time: they measure CPU shares on a small machine.
    // Profile `suite`: optimized, with debug assertions (see Cargo.toml).
    sh(Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "--profile",
            "suite",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--exclude",
            "stoker-fuzz",
            "--",
        ])
        .arg("--test-threads=1")
        .args(args))?;
    // The deployment manifests, Dockerfile, dashboard and Collector config, checked by
    // their validators (and the ConfigMap's configuration by the agent itself).
    sh(Command::new("bash")
        .current_dir(root())
        .arg("deploy/check.sh")
        .env("STOKER_DEPLOY_VENV", setup::DEPLOY_VENV)
        .env("STOKER_BIN", target_dir.join("suite/stoker")))
}

fn demo() -> Result<()> {
    require_root("the demo")?;
    let root = root();
    sh(Command::new("cargo").current_dir(&root).args(["build", "--release", "--package", "stoker"]))?;
    let out_dir = root.join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("the demo needs python3 (apt-get install python3)")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port().to_string();
    let demo = root.join("xtask/demo");

    let mut service = Command::new(&python).arg(demo.join("service.py")).arg(&port).spawn()?;
    let result = (|| -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("the demo service did not start listening on port {port}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        println!("demo: service (pid {}) on 127.0.0.1:{port}, under load for 12 s", service.id());
        let mut load = Command::new(&python).arg(demo.join("load.py")).args([&port, "12"]).spawn()?;
        let svg = out_dir.join("demo.svg");
        let pid = service.id().to_string();
        sh(Command::new(root.join("target/release/stoker"))
            .args(["record", "--net", "--pid", &pid, "--duration", "10", "-o"])
            .arg(&svg))?;
        load.wait()?;
        println!("demo flamegraph: {}", svg.display());
        println!("demo network latency: {}", out_dir.join("demo.net.json").display());
        println!("demo: advice for the service under the same load (8 s)");
        let mut load = Command::new(&python).arg(demo.join("load.py")).args([&port, "10"]).spawn()?;
        sh(Command::new(root.join("target/release/stoker")).args([
            "advise",
            "--pid",
            &pid,
            "--duration",
            "8",
        ]))?;
        load.wait()?;
        Ok(())
    })();
    let _ = service.kill();
    let _ = service.wait();
    result
}
