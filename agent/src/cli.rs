//! Command-line types of the `stoker` binary (clap derive only).
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use stoker::{advise::AdviceFormat, export::Format, record::Mode};

#[derive(Debug, Parser)]
#[command(
    name = "stoker",
    version,
    about = "eBPF profiler for Python services",
    arg_required_else_help = true
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample processes and write a flamegraph or folded stacks.
    Record(RecordArgs),
    /// Watch processes for a while and advise: CPU and memory limits, workers, the code or
    /// upstream that is the bottleneck, with the evidence and the numbers.
    Advise(AdviseArgs),
    /// A live view of the functions the targets spend their CPU in, refreshed every second
    /// (keys 1-4 sort, q quits).
    Top(TopArgs),
    /// Print the current Python stack of every thread of a process, with thread names, what
    /// each waits on and which holds the GIL (read from its memory: the process is not paused).
    Dump(DumpArgs),
    /// Check whether this kernel and this process can run stoker.
    Doctor,
    /// Run as a node agent: sample every CPython process, export metrics continuously.
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Process to watch (all its threads); repeatable.
    #[arg(short, long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Every CPython process on the host, also those started while it runs.
    #[arg(long)]
    pub all_python: bool,
    /// Samples per second per CPU.
    #[arg(short, long, default_value_t = 99, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub rate: u64,
    /// Stop after this many seconds (default: when the targets exit, q or Ctrl-C).
    #[arg(short, long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<f64>,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Process to dump.
    #[arg(short, long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: u32,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Configuration file (YAML); defaults apply without one.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override a configuration key: `--set network.enabled=false`, `--set
    /// select.namespaces=[shop,cart]` (repeatable; after the file, before OTEL_* variables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Print the Prometheus name of every series the agent exports, one per line, and exit.
    #[arg(long)]
    pub list_metrics: bool,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Process to sample (all its threads); repeat for several.
    #[arg(short, long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Stop after this many seconds (default: when the targets exit or on Ctrl-C).
    #[arg(short, long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<f64>,
    /// Samples per second per CPU.
    #[arg(short, long, default_value_t = 99, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub rate: u64,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Flamegraph)]
    pub format: Format,
    /// Output file (default: stoker-<name>-<time>.<svg|folded|pb.gz|speedscope.json> in the current directory).
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Sample every CPython process on the host, also those started during the session.
    #[arg(long)]
    pub all_python: bool,
    /// Also sample the targets' child processes: those running at the start (a pre-fork
    /// server's workers, under `--pid` of its master) and those started during the session.
    #[arg(short, long)]
    pub subprocesses: bool,
    /// Python: interleave native frames, the interpreter's eval loop replaced by Python frames.
    #[arg(short, long)]
    pub native: bool,
    /// Add each thread's name and id: a root frame per thread, or `thread` and `thread_id`
    /// labels in pprof output.
    #[arg(short, long)]
    pub threads: bool,
    /// Python frames without line numbers: one frame per function, as py-spy's --nolineno
    /// (default: a frame per line, as py-spy draws them; summaries always count functions).
    #[arg(long)]
    pub nolineno: bool,
    /// Show whole paths in Python frames (default: short, relative to site-packages).
    #[arg(long)]
    pub full_filenames: bool,
    /// Measure and report the sampling program's own run time in the kernel.
    #[arg(long)]
    pub kernel_stats: bool,
    /// Also time network requests (HTTP/1.x and other request/response TCP traffic) and TCP
    /// connects; writes <output stem>.net.json beside the profile.
    #[arg(long)]
    pub net: bool,
    /// With --net: `full` times requests, connections, socket and accept queues and stalls;
    /// `requests` times requests, connections and accept queues only, without the programs
    /// that run for every TCP segment and write of the host (see the README for both costs).
    #[arg(long, value_enum, default_value_t, requires = "net")]
    pub net_detail: stoker::record::NetDetail,
    /// What the profile shows: `cpu` (CPU samples), `wall` (CPU samples and waits, in
    /// microseconds of thread time) or `off-cpu` (waits alone); wall and off-CPU stacks end
    /// with the thread's state: [running], [runqueue], [throttled], [gil], [lock],
    /// [socket ADDR:PORT], [poll], [disk], [sleep] or [other].
    #[arg(short, long, value_enum, default_value_t = Mode::Cpu)]
    pub mode: Mode,
    /// Python: count CPU samples only of the thread holding the GIL (what the GIL-bound part
    /// of a program runs), and report per process how long the GIL was held and how long
    /// threads waited for it.
    #[arg(long)]
    pub gil: bool,
    /// Report every stretch this long (or longer) on which a thread running an event loop
    /// (asyncio, gevent) did not go back to waiting for events, with the Python stack seen
    /// most in it (`100ms`, `0.5s`, or a bare number of seconds); 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_threshold)]
    pub loop_block_threshold: std::time::Duration,
    /// Wall-clock and off-CPU modes with `--waits followed`: follow every switch off the CPU
    /// of a target thread (each wait exact) while it has at most this many a second on a
    /// CPU; a thread that switches faster has its time off the CPU sampled by the clock at
    /// the sampling rate instead, as py-spy's --idle does (the summary says when); 0: every
    /// switch.
    #[arg(long, value_name = "PER_SECOND", default_value_t = stoker::record::DEFAULT_SWITCH_BUDGET)]
    pub switch_budget: u32,
    /// Wall-clock and off-CPU modes: `sampled` samples every target thread's time off the
    /// CPU by the clock at the sampling rate, with its state and stacks, and runs nothing on
    /// context switches; `followed` follows every switch off the CPU of a target thread
    /// (within --switch-budget), each wait exact, with a program on every context switch of
    /// the host (see the README for both costs).
    #[arg(long, value_enum, default_value_t)]
    pub waits: stoker::record::Waits,
    /// Command to launch and profile, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AdviseArgs {
    /// Process to watch; repeat for several.
    #[arg(short, long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Watch every CPython process on the host.
    #[arg(long)]
    pub all_python: bool,
    /// Stop after this many seconds (default: when the targets exit or on Ctrl-C).
    #[arg(short, long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<f64>,
    /// How the advice is written.
    #[arg(short, long, value_enum, default_value_t = AdviceFormat::Text)]
    pub format: AdviceFormat,
    /// Write the advice to this file (default: standard output); the wall-clock flamegraph
    /// (<stem>.wall.svg) and network report (<stem>.wall.net.json) go beside it.
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Command to launch and watch, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// A duration like `100ms`, `0.5s` or `2s` (a bare number is seconds).
fn parse_threshold(s: &str) -> Result<std::time::Duration, String> {
    let (number, scale) = match s.trim() {
        t if t.ends_with("ms") => (&t[..t.len() - 2], 1e-3),
        t if t.ends_with('s') => (&t[..t.len() - 1], 1.0),
        t => (t, 1.0),
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&(v * scale)) => {
            Ok(std::time::Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!("{s:?} is not a duration like 100ms or 0.5s (at most an hour)")),
    }
}

fn parse_duration(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}
