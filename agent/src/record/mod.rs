//! `stoker record`: an on-demand sampling session over given PIDs or a launched command,
//! ending at a deadline, on Ctrl-C or when the targets exit, and always writing its output.
mod status;
pub mod target;

use std::{
    collections::HashSet,
    fs::File,
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use agent_ebpf::{TARGET_FOLLOW, TARGET_SAMPLE};

pub use crate::collect::{Mode, Waits};
pub use crate::net::NetDetail;
pub use crate::programs::offcpu::DEFAULT_SWITCH_BUDGET;

use self::{status::StatusLine, target::Target};
use crate::{
    collect::{Collector, NamingPace, Tracker, View},
    error::{Error, Result},
    export::{self, Format},
    net::{Aggregator, Drainer, NetTracer, existing::Adopter, report::NetReport},
    profile::Frame,
    programs::{KernelPrograms, Stats, loops::LoopWatch},
    sys::{
        cgroup::{Cgroup, CgroupStats},
        process,
    },
};

/// What to record and where to write it.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub pids: Vec<u32>,
    /// Command and arguments to launch and profile.
    pub command: Vec<String>,
    pub duration: Option<Duration>,
    pub rate_hz: u64,
    pub format: Format,
    pub output: Option<PathBuf>,
    /// Every CPython process on the host, also those started during the session.
    pub all_python: bool,
    /// Also the targets' child processes, including those created during the session.
    pub subprocesses: bool,
    /// Python processes: interleave native frames.
    pub native: bool,
    /// A root frame per thread.
    pub threads: bool,
    /// Python frames without their line numbers (one frame per function).
    pub nolineno: bool,
    /// Whole paths in Python frames.
    pub full_filenames: bool,
    /// Measure the sampling program's own time in the kernel.
    pub kernel_stats: bool,
    /// Also time the targets' network requests and TCP connects.
    pub net: bool,
    /// With `net`: what is timed.
    pub net_detail: NetDetail,
    /// CPU, wall-clock or off-CPU profile.
    pub mode: Mode,
    /// Python: CPU samples only of the thread holding the GIL; GIL figures in the summary.
    pub gil: bool,
    /// Report event-loop stretches at least this long without a wait for events (None: off).
    pub loop_block_threshold: Option<Duration>,
    /// Wall-clock and off-CPU modes: a target thread's GIL hand-overs, preemptions and sleeps
    /// under 1 ms per second (per CPU) followed in full (0: every one); beyond it they are
    /// sampled. Other waits are always followed.
    pub switch_budget: u32,
    /// Wall-clock and off-CPU modes: waits followed switch by switch, or sampled by the clock.
    pub waits: crate::collect::Waits,
}

/// The output file of a session that failed before writing it: removed, not left empty.
struct Unwritten(Option<PathBuf>);

impl Drop for Unwritten {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && std::fs::metadata(&path).is_ok_and(|m| m.len() == 0)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Duration,
    Interrupted,
    TargetsExited,
}

/// What a finished session reports.
#[derive(Debug)]
pub struct Summary {
    pub output: PathBuf,
    pub samples: u64,
    pub elapsed: Duration,
    pub stats: Stats,
    pub end: EndReason,
    pub top: Vec<(Frame, u64)>,
    /// The profile's weight in stacks with a Python code object gone before it was read
    /// (`<unknown code>` frames), and its whole weight.
    pub unreadable_code: (u64, u64),
    /// Exit status of a launched command that ended on its own.
    pub command_status: Option<i32>,
    /// Some target was a CPython stoker walks.
    pub python_found: bool,
    pub mode: Mode,
    /// Sampling program's total kernel time and run count (with `kernel_stats`).
    pub kernel_cost: Option<(Duration, u64)>,
    /// Network report (with `net`) and where its JSON was written.
    pub net: Option<(NetReport, PathBuf)>,
    /// Network programs' total kernel time and run count (with `net` and `kernel_stats`).
    pub net_kernel_cost: Option<(Duration, u64)>,
    /// Nanoseconds the run-time statistics add to each run (with `kernel_stats`).
    pub stats_floor: Option<f64>,
    /// The context-switch program's total kernel time and run count (wall-clock and
    /// off-CPU modes, with `kernel_stats`).
    pub off_kernel_cost: Option<(Duration, u64)>,
    /// The wall-clock sampler's program's total kernel time and run count (with
    /// `kernel_stats`, when threads over the switch budget were sampled).
    pub sampler_kernel_cost: Option<(Duration, u64)>,
    /// The switch budget the off-CPU program kept to (0: none).
    pub switch_budget: u32,
    /// No switch was followed: every target thread's time off the CPU was sampled by the
    /// clock (`--waits sampled`).
    pub sampled_waits: bool,
    /// The sampling rate asked for.
    pub rate_hz: u64,
    /// CPU seconds each given or launched process used during the session, by the kernel's
    /// accounting (exact, where samples / rate is an estimate).
    pub cpu: Vec<(u32, f64)>,
    /// The cgroups of the given and launched processes: what each said when first seen
    /// in the session and at its end, and the processes in it.
    pub cgroups: Vec<CgroupSpan>,
    /// Wall-clock and off-CPU modes: per process, seconds of thread time by state.
    pub states: Vec<(u32, Vec<(String, f64)>)>,
    /// `--gil`: per process, seconds the GIL was held on a CPU and seconds waited for it.
    pub gil: Vec<(u32, f64, f64)>,
    /// Blocked event-loop stretches: (pid, tid, seconds, the stack sampled most in it).
    pub loop_blocks: Vec<LoopBlockReport>,
    pub loop_threshold: Option<Duration>,
    /// Stretches of threads that run no Python (a native runtime's workers), left out.
    pub native_loop_blocks: u64,
    /// Wall-clock and off-CPU modes: threads of the given processes already waiting as the
    /// session began, their waits counted from its start.
    pub waits_entered: usize,
    /// The names of the processes sampled, as read while they lived.
    pub comms: Vec<(u32, String)>,
    /// Every `TIMELINE_EVERY` of the session, per given or launched process: seconds since
    /// the start, its CPU seconds since the start (the kernel's accounting), and the memory
    /// its cgroup used.
    pub timeline: Vec<TimelinePoint>,
    /// Per given or launched process, its children running its program in its cgroup at
    /// the end (a pre-fork server's workers), counted before a launched command is stopped.
    pub workers: Vec<(u32, u32)>,
}

/// One point of `Summary::timeline`.
#[derive(Debug, Clone, Copy)]
pub struct TimelinePoint {
    pub t: f64,
    pub pid: u32,
    pub cpu_s: Option<f64>,
    pub memory: Option<u64>,
}

/// How often the timeline is read.
const TIMELINE_EVERY: Duration = Duration::from_millis(500);

/// A blocked event-loop stretch, named.
#[derive(Debug, Clone)]
pub struct LoopBlockReport {
    pub pid: u32,
    pub tid: u32,
    pub seconds: f64,
    /// The Python stack its CPU samples saw most, root first (empty: none sampled).
    pub stack: Vec<Frame>,
}

/// A cgroup over a session.
#[derive(Debug)]
pub struct CgroupSpan {
    pub pids: Vec<u32>,
    pub first: CgroupStats,
    pub last: CgroupStats,
}

const TICK: Duration = Duration::from_millis(100);
/// How long a launched command may take to map its interpreter before sampling goes on
/// without knowing it is Python.
const LAUNCH_SETTLE: Duration = Duration::from_millis(200);

/// Runs a session to its end and writes the output.
pub fn run(opts: &RecordOptions) -> Result<Summary> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }

    let mut targets = opts.pids.iter().map(|&pid| Target::attach(pid)).collect::<Result<Vec<_>>>()?;
    let main_pid = opts.pids.first().copied();
    let main_comm = main_pid.map(crate::sys::process::comm);
    let output = opts.output.clone().unwrap_or_else(|| default_output(opts, main_comm.as_deref(), main_pid));
    // Fail on an unwritable path now, not after the session.
    let file = File::create(&output).map_err(|source| Error::Output { path: output.clone(), source })?;
    let mut unwritten = Unwritten(Some(output.clone()));
    // So is the network report's.
    let net_path = net_output(&output);
    let mut net_file = match opts.net {
        true => {
            Some(File::create(&net_path).map_err(|source| Error::Output { path: net_path.clone(), source })?)
        }
        false => None,
    };
    let mut net_unwritten = Unwritten(net_file.is_some().then(|| net_path.clone()));

    let mut kernel = KernelPrograms::load_sized(
        opts.kernel_stats,
        crate::programs::sizing::DEFAULT_COUNTS_BYTES,
        opts.net_detail,
    )?;
    if opts.subprocesses {
        kernel.follow_children()?;
    } else if opts.all_python
        && let Err(e) = kernel.follow_children()
    {
        tracing::warn!("forked workers are found by scanning /proc only: {e}");
    }
    if opts.kernel_stats {
        kernel.enable_kernel_stats()?;
    }
    // `--gil` measures the waits for the GIL too.
    if opts.mode != Mode::Cpu || opts.gil {
        kernel.watch_off_cpu(opts.waits, opts.switch_budget)?;
    }
    // A target that execs is looked at as the new program starts; with --all-python so is
    // every new process.
    if let Err(e) = kernel.watch_execs(opts.all_python) {
        match opts.all_python {
            true => tracing::warn!("new processes are found by scanning /proc only: {e}"),
            false => tracing::warn!("a target that execs is looked at again within 500 ms only: {e}"),
        }
    }
    // Attached once a target has an event loop (see `LoopWatch`).
    let mut loops = opts.loop_block_threshold.map(LoopWatch::new);
    kernel.start(opts.rate_hz)?;
    let mut net = match opts.net {
        true => {
            Some((Drainer::start(NetTracer::attach(&mut kernel)?, Aggregator::new())?, Adopter::default()))
        }
        false => None,
    };
    let flags = if opts.subprocesses { TARGET_SAMPLE | TARGET_FOLLOW } else { TARGET_SAMPLE };
    let mut tracker = Tracker::new(opts.all_python, opts.native);
    tracker.name_early();
    if opts.gil {
        tracker.gil_only();
    }
    let mut collector = Collector::new(opts.full_filenames);
    // With --subprocesses, a running target's children already forked are targets too (a
    // pre-fork server's workers, under `--pid` of its master), and theirs in turn.
    let children = if opts.subprocesses { crate::advise::children() } else { Default::default() };
    let mut descendants = Vec::new();
    for target in &mut targets {
        kernel.add_target(target.pid(), flags)?;
        if target.has_exited() {
            return Err(Error::ExitedBeforeAttach(target.pid()));
        }
        tracker.add_attached(target.pid());
        let mut below: Vec<u32> = children.get(&target.pid()).cloned().unwrap_or_default();
        while let Some(child) = below.pop() {
            kernel.add_target(child, flags)?;
            tracker.add(child);
            descendants.push(child);
            below.extend(children.get(&child).into_iter().flatten());
        }
    }
    if !opts.command.is_empty() {
        let mut launched = target::Launched::spawn(&opts.command)?;
        kernel.add_target(launched.pid, flags)?;
        launched.release()?;
        tracker.add(launched.pid);
        tracker.settle(launched.pid, LAUNCH_SETTLE, &mut kernel, &mut collector)?;
        targets.push(Target::Launched(launched));
    }

    let live = tracker.live_targets();
    if let Some(loops) = loops.as_mut() {
        loops.update(&mut kernel, &live);
    }
    if let Some((_, adopter)) = net.as_mut() {
        adopter.adopt_new(&mut kernel, &live);
    }
    // The kernel's accounting of the given and launched processes (and with --subprocesses
    // their children, those forked during the session added as they are found): at the
    // start (a launched command's whole life is the session's), as last read.
    let mut cpu: Vec<(u32, Option<f64>, Option<f64>)> = targets
        .iter()
        .map(|t| {
            let now = process::cpu_time(t.pid());
            let start = if matches!(t, Target::Launched(_)) { Some(0.0) } else { now };
            (t.pid(), start, now)
        })
        .chain(descendants.iter().map(|&pid| (pid, process::cpu_time(pid), process::cpu_time(pid))))
        .collect();
    // The processes in `cpu`, for finding new children at each tick.
    let mut counted: HashSet<u32> = cpu.iter().map(|&(pid, _, _)| pid).collect();
    let mut cgroups: Vec<(Cgroup, CgroupStats, Vec<u32>)> = Vec::new();
    for (pid, _, _) in &cpu {
        note_cgroup(&mut cgroups, *pid);
    }
    // The threads blocked since before the session (seen by no switch yet) of the given
    // processes, and with --all-python of the Python processes running: their waits count
    // from now, each with its reason and Python stack.
    let waits_entered = if opts.mode != Mode::Cpu && !kernel.sampled_waits() {
        tracker.update(&mut kernel, &mut collector)?;
        let mut given: Vec<u32> = targets
            .iter()
            .filter(|t| !matches!(t, Target::Launched(_)))
            .map(|t| t.pid())
            .chain(descendants.iter().copied())
            .collect();
        if opts.all_python {
            given.extend(tracker.live_targets());
            given.sort_unstable();
            given.dedup();
        }
        crate::collect::waits::enter(&mut kernel, &mut collector, &tracker, &given)
    } else {
        0
    };
    let started = Instant::now();
    let started_at = SystemTime::now();
    let mut status = StatusLine::new();
    status.started(opts.rate_hz, opts.net);
    // New stacks are named soon after they appear (code objects and mappings are read while
    // their processes live; a starting interpreter frees its import-time code): as they come
    // while new code runs, at most every 20 ms once it is known (see `Tracker::name_early`).
    let mut naming = NamingPace::new();
    let mut loop_blocks: Vec<LoopBlockReport> = Vec::new();
    let mut loop_threads = crate::collect::PythonThreads::default();
    let mut timeline: Vec<TimelinePoint> = Vec::new();
    let mut next_point = Duration::ZERO;
    let end = loop {
        tracker.update(&mut kernel, &mut collector)?;
        tracker.wait(TICK, &mut kernel, &mut collector)?;
        let elapsed = started.elapsed();
        // Read before `has_exited` reaps a launched command: a zombie still has its figure.
        for (pid, _, last) in &mut cpu {
            if let Some(now) = process::cpu_time(*pid) {
                *last = Some(now);
            }
            // Its cgroup (a command may move itself at its start): counters from when seen.
            note_cgroup(&mut cgroups, *pid);
        }
        if elapsed >= next_point {
            next_point = elapsed + TIMELINE_EVERY;
            for (pid, start, last) in &cpu {
                let memory = cgroups
                    .iter()
                    .find(|(_, _, pids)| pids.contains(pid))
                    .and_then(|(c, _, _)| c.memory_current());
                let cpu_s = last.zip(*start).map(|(l, s)| l - s);
                timeline.push(TimelinePoint { t: elapsed.as_secs_f64(), pid: *pid, cpu_s, memory });
            }
        }
        let explicit_live = targets.iter_mut().map(|t| t.has_exited()).filter(|exited| !exited).count();
        let end = if stop.load(Ordering::Relaxed) {
            Some(EndReason::Interrupted)
        } else if !targets.is_empty() && explicit_live == 0 {
            Some(EndReason::TargetsExited)
        } else if opts.duration.is_some_and(|d| elapsed >= d) {
            Some(EndReason::Duration)
        } else {
            None
        };
        let live = tracker.live_targets();
        if let Some(loops) = loops.as_mut() {
            loops.update(&mut kernel, &live);
        }
        if let Some((_, adopter)) = net.as_mut() {
            adopter.adopt_new(&mut kernel, &live);
        }
        // With --subprocesses, the children forked since the start: all their CPU time is the
        // session's (read at each tick from the next one on, as the others' is).
        if opts.subprocesses {
            for &pid in &live {
                if counted.insert(pid) {
                    cpu.push((pid, Some(0.0), process::cpu_time(pid)));
                }
            }
        }
        // Blocked loops' stacks are named as they come, while their processes live.
        for block in kernel.take_loop_blocks() {
            if !loop_threads.runs_python(&tracker, block.tgid, block.tid) {
                continue;
            }
            let stack = collector.loop_block_stack(&kernel, &block);
            let seconds = block.duration_ns as f64 / 1e9;
            loop_blocks.push(LoopBlockReport { pid: block.tgid, tid: block.tid, seconds, stack });
        }
        naming.name(&kernel, end.is_some(), || collector.collect(&kernel, &live, end.is_some()))?;
        kernel.flush_logs();
        let stats = kernel.stats().unwrap_or_default();
        status.show(elapsed, stats.samples, stats);
        if let Some(end) = end {
            break end;
        }
    };
    let elapsed = started.elapsed();
    status.clear();
    let children = crate::advise::children();
    let workers = cpu.iter().map(|(pid, _, _)| (*pid, crate::advise::workers(*pid, &children))).collect();
    // A launched command that ended on its own: its exit status is stoker's (as a shell
    // running it would report).
    let command_status = targets.iter().find_map(|t| match t {
        Target::Launched(l) if end == EndReason::TargetsExited => l.status,
        _ => None,
    });
    // Samples stop counting once the targets leave the filter; the launched command
    // is not left running on its own.
    for target in &mut targets {
        if let Target::Launched(l) = target {
            l.terminate(Duration::from_secs(1));
        }
    }
    let stats = kernel.stats()?;
    let kernel_cost = kernel.kernel_cost();
    let off_kernel_cost = kernel.off_kernel_cost();
    let sampler_kernel_cost = kernel.sampler_kernel_cost();
    let net_kernel_cost = match (&net, opts.kernel_stats) {
        (Some((drainer, _)), true) => drainer.kernel_cost(&mut kernel),
        _ => None,
    };
    // Measured after the programs' own statistics were read, so it adds no runs to them.
    let stats_floor = match opts.kernel_stats {
        true => kernel.stats_floor().inspect_err(|e| tracing::warn!("{e}")).ok(),
        false => None,
    };
    let net = match net.as_mut() {
        Some((drainer, _)) => {
            drainer.finish();
            let report = NetReport::new(
                drainer.aggregator().metrics(),
                elapsed.as_secs_f64(),
                net_drops(&stats),
                drainer.socket_queue(),
                drainer.detail(),
                drainer.data_calls(),
            );
            let json = serde_json::to_vec_pretty(&report).map_err(std::io::Error::other);
            let file = net_file.take().ok_or_else(|| std::io::Error::other("the report's file is not open"));
            json.and_then(|j| file?.write_all(&j))
                .map_err(|source| Error::Output { path: net_path.clone(), source })?;
            Some((report, net_path))
        }
        None => None,
    };

    let processes = collector.processes();
    let view = View {
        root_per_process: processes > 1 || opts.all_python || opts.subprocesses,
        threads: opts.threads,
        native: opts.native,
    };
    let mut profile = match opts.mode {
        Mode::Cpu => collector.profile(view),
        mode => collector.time_profile(view, mode, opts.rate_hz),
    };
    if opts.nolineno {
        profile.without_lines();
    }
    let name = match (main_pid, targets.first()) {
        (Some(pid), _) => format!("{} (pid {pid})", main_comm.as_deref().unwrap_or("?")),
        (None, Some(t)) => {
            format!("{} (pid {})", collector.comm(t.pid()).unwrap_or(&opts.command[0]), t.pid())
        }
        (None, None) => "all Python processes".to_string(),
    };
    let extra =
        if processes > 1 && !targets.is_empty() { format!(", {processes} processes") } else { String::new() };
    profile.title = format!("stoker: {name}{extra}");
    profile.rate_hz = opts.rate_hz;
    profile.start = Some(started_at);
    profile.duration = elapsed;
    let samples = collector.counts().iter().map(|(_, n)| n).sum::<u64>();
    let values = match opts.mode {
        Mode::Cpu => String::new(),
        Mode::Wall => format!(
            "wall-clock: microseconds of thread time (a CPU sample stands for {:.0} µs), ",
            1e6 / opts.rate_hz as f64
        ),
        Mode::OffCpu => "off-CPU: microseconds of thread time waiting, ".to_string(),
    };
    profile.subtitle = format!(
        "{values}{} Hz, {:.1} s, {samples} samples, {} lost, {} stacks dropped, {} Python stacks truncated",
        opts.rate_hz,
        elapsed.as_secs_f64(),
        stats.lost,
        stats.stacks_dropped,
        stats.py_truncated
    );
    export::write_file(&profile, opts.format, &output, file)?;
    let states = match opts.mode {
        Mode::Cpu => Vec::new(),
        Mode::Wall => collector.states_by_process(Some(opts.rate_hz)),
        Mode::OffCpu => collector.states_by_process(None),
    };
    let top = match opts.mode {
        Mode::Cpu => profile.top_leaves(10),
        _ => collector.profile(view).top_leaves(10),
    };
    let unreadable_code = profile.unreadable_code();
    let gil = if opts.gil { collector.gil_by_process(opts.rate_hz) } else { Vec::new() };
    let comms = cpu
        .iter()
        .map(|(pid, _, _)| *pid)
        .chain(states.iter().map(|(pid, _)| *pid))
        .filter_map(|pid| collector.comm(pid).map(|c| (pid, c.to_string())))
        .collect();
    unwritten.0 = None;
    net_unwritten.0 = None;
    Ok(Summary {
        output,
        samples,
        elapsed,
        stats,
        end,
        top,
        unreadable_code,
        command_status,
        python_found: tracker.found_python(),
        mode: opts.mode,
        kernel_cost,
        net,
        net_kernel_cost,
        stats_floor,
        off_kernel_cost,
        sampler_kernel_cost,
        switch_budget: opts.switch_budget,
        sampled_waits: kernel.sampled_waits(),
        rate_hz: opts.rate_hz,
        cpu: cpu.into_iter().filter_map(|(pid, start, last)| Some((pid, last? - start?))).collect(),
        cgroups: cgroups
            .into_iter()
            .map(|(cgroup, first, pids)| CgroupSpan { pids, last: cgroup.read(), first })
            .collect(),
        states,
        gil,
        loop_blocks,
        loop_threshold: opts.loop_block_threshold,
        native_loop_blocks: loop_threads.native,
        waits_entered,
        comms,
        timeline,
        workers,
    })
}

/// Notes the cgroup process `pid` is in, read when first seen (not the root cgroup: it has
/// no limits, and its memory is the whole machine's).
fn note_cgroup(cgroups: &mut Vec<(Cgroup, CgroupStats, Vec<u32>)>, pid: u32) {
    let Some(cgroup) = Cgroup::of(pid).filter(|c| !c.is_root()) else { return };
    match cgroups.iter_mut().find(|(c, _, _)| *c == cgroup) {
        Some((_, _, pids)) if !pids.contains(&pid) => pids.push(pid),
        Some(_) => {}
        None => {
            let first = cgroup.read();
            cgroups.push((cgroup, first, vec![pid]));
        }
    }
}

/// `<output stem>.net.json` beside the profile.
fn net_output(output: &std::path::Path) -> PathBuf {
    let stem =
        output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "stoker".into());
    output.with_file_name(format!("{stem}.net.json"))
}

fn net_drops(stats: &Stats) -> crate::net::report::Drops {
    crate::net::report::Drops {
        events_lost: stats.net_events_lost,
        connections_untracked: stats.net_conns_full,
        connects_untracked: stats.net_socks_full,
    }
}

fn default_output(opts: &RecordOptions, comm: Option<&str>, pid: Option<u32>) -> PathBuf {
    let name = match (comm, pid) {
        (Some(comm), Some(pid)) => format!("{comm}-{pid}"),
        _ => opts
            .command
            .first()
            .map(|c| c.rsplit('/').next().unwrap_or(c).to_string())
            .unwrap_or_else(|| "all-python".into()),
    };
    let name: String =
        name.chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    PathBuf::from(format!("stoker-{name}-{stamp}.{}", opts.format.extension()))
}

impl Summary {
    /// The end-of-session report printed on stderr.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let why = match self.end {
            EndReason::Duration => "duration reached",
            EndReason::Interrupted => "interrupted",
            EndReason::TargetsExited => "target exited",
        };
        let _ = writeln!(s, "stoker: wrote {} ({why})", self.output.display());
        let _ = writeln!(
            s,
            "  {} samples in {:.1} s; lost {}, stacks dropped {}, no user stack {}",
            self.samples,
            self.elapsed.as_secs_f64(),
            self.stats.lost,
            self.stats.stacks_dropped,
            self.stats.user_stack_missing
        );
        if !self.cpu.is_empty() {
            let each: Vec<String> = self.cpu.iter().map(|(pid, s)| format!("pid {pid} {s:.3} s")).collect();
            let _ =
                writeln!(s, "  CPU time during the session (the kernel's accounting): {}", each.join(", "));
        }
        // (In the wall-clock modes, waits fill the profile without samples.)
        if self.samples == 0 && self.states.is_empty() {
            let cpu: f64 = self.cpu.iter().map(|(_, s)| s).sum();
            let why = match self.cpu.is_empty() {
                true => "no process was sampled".to_string(),
                false => format!("the targets used {cpu:.3} s of CPU during the session"),
            };
            let hint = match self.mode {
                Mode::Cpu => {
                    "; CPU samples are taken only while a target runs: `--mode wall` shows where an idle or sleeping process waits (a thread stuck since before the session too)"
                }
                _ => " and no thread of theirs waited",
            };
            let _ = writeln!(s, "  no samples: {why}{hint}");
        }
        if !self.python_found {
            let _ = writeln!(
                s,
                "  no CPython process stoker walks was found among the targets: the stacks are native"
            );
        }
        for span in &self.cgroups {
            let _ = writeln!(s, "{}", span.render());
        }
        for (pid, held, waited) in &self.gil {
            let _ = writeln!(
                s,
                "  pid {pid}, GIL: held on a CPU {:.0}% of the session ({held:.3} s, its holders' CPU samples); threads waited {waited:.3} s for it",
                100.0 * held / self.elapsed.as_secs_f64().max(1e-9)
            );
        }
        let mut pids: Vec<u32> = self.loop_blocks.iter().map(|b| b.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let mut blocks: Vec<&LoopBlockReport> =
                self.loop_blocks.iter().filter(|b| b.pid == pid).collect();
            blocks.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
            let total: f64 = blocks.iter().map(|b| b.seconds).sum();
            let threshold = self.loop_threshold.unwrap_or_default().as_secs_f64() * 1e3;
            let _ = writeln!(
                s,
                "  pid {pid}, event loop blocked {} {threshold:.0} ms or longer ({total:.3} s in all); the worst:",
                match blocks.len() {
                    1 => "once".to_string(),
                    n => format!("{n} times"),
                }
            );
            for b in blocks.iter().take(5) {
                let leaf =
                    b.stack.last().map_or("[no Python stack sampled]".to_string(), ToString::to_string);
                let callers: Vec<String> =
                    b.stack.iter().rev().skip(1).take(2).map(ToString::to_string).collect();
                let from =
                    if callers.is_empty() { String::new() } else { format!(" <- {}", callers.join(" <- ")) };
                let _ = writeln!(s, "    {:.3} s  tid {}  {leaf}{from}", b.seconds, b.tid);
            }
        }
        if self.native_loop_blocks > 0 {
            let _ = writeln!(
                s,
                "  event loops: {} stretches of threads that run no Python (a native runtime's workers, which wait for events and park in turn) left out",
                self.native_loop_blocks
            );
        }
        for (pid, states) in &self.states {
            let total: f64 = states.iter().map(|(_, secs)| secs).sum();
            let each: Vec<String> = states
                .iter()
                .take(8)
                .map(|(state, secs)| format!("{state} {secs:.3} s ({:.0}%)", 100.0 * secs / total.max(1e-9)))
                .collect();
            let _ = writeln!(s, "  pid {pid}, threads' time by state ({total:.3} s): {}", each.join(", "));
        }
        if self.waits_entered > 0 {
            let _ = writeln!(
                s,
                "  {} threads were waiting as the session began: their waits count from its start",
                self.waits_entered
            );
        }
        let losses: Vec<String> = self
            .stats
            .losses()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{what} {n}"))
            .collect();
        let _ = match losses.is_empty() {
            true => writeln!(s, "  kernel losses: none"),
            false => writeln!(s, "  kernel losses: {}", losses.join(", ")),
        };
        if self.stats.py_samples > 0 {
            let _ = writeln!(
                s,
                "  Python: {} samples with Python frames; {} stacks cut at {} frames, {} walks stopped by unreadable memory",
                self.stats.py_samples,
                self.stats.py_truncated,
                agent_ebpf::PY_MAX_FRAMES,
                self.stats.py_read_errors
            );
        }
        if let Some((time, runs)) = self.kernel_cost {
            let _ = writeln!(
                s,
                "  kernel: {:.0} ns per target sample (timed in the program); {:.0} ns per program run by the kernel's statistics ({runs} runs on all CPUs); {} frames read field by field",
                self.stats.target_ns as f64 / self.stats.samples.max(1) as f64,
                time.as_nanos() as f64 / runs.max(1) as f64,
                self.stats.py_frame_slow_reads,
            );
        }
        if self.stats.off_switches > 0 {
            let cost = match self.stats.off_ns {
                0 => String::new(),
                ns => format!(
                    ", {:.0} ns each (timed in the program)",
                    ns as f64 / self.stats.off_switches as f64
                ),
            };
            let _ = writeln!(
                s,
                "  off-CPU: {} switches of target threads followed ({} with the Python stack of the switch before, {} GIL and lock waits with the stack read under {} ms before, {} waits ended from the CPU time used since){cost}",
                self.stats.off_switches,
                self.stats.off_stacks_reused,
                self.stats.off_stacks_recent,
                crate::programs::offcpu::RECENT.as_millis(),
                self.stats.off_from_run_time
            );
        }
        if self.sampled_waits {
            let timing = self.stats.wall_timing;
            let _ = writeln!(
                s,
                "  off-CPU: waits sampled by the clock, no switch followed (--waits sampled): every target thread's time off the CPU taken at {} Hz ({} samples, {} with the Python stack walked; {} runs {:.1} ms apart on average, {:.1} ms at most{}); a wait shorter than that counts as the samples that fall in it (--waits followed times each one)",
                self.rate_hz,
                self.stats.off_time_samples,
                self.stats.off_sample_walks,
                timing.runs,
                timing.mean_gap.as_secs_f64() * 1e3,
                timing.longest_gap.as_secs_f64() * 1e3,
                if timing.realtime { "" } else { ", late while the CPUs were busy: no real-time priority" },
            );
        }
        if self.stats.off_sampled_out > 0 {
            let all = self.stats.off_switches + self.stats.off_sampled_out;
            let timing = self.stats.wall_timing;
            let _ = writeln!(
                s,
                "  off-CPU: threads switching over {} times a second sampled: {} of {all} switches were not followed ({:.1}%), their threads' time off the CPU taken by the clock instead ({} samples, {} with the Python stack walked; {} of {} process visits left out, no thread of theirs switching that fast; {} runs {:.1} ms apart on average, {:.1} ms at most{}); every other wait was followed (--switch-budget 0 follows every switch)",
                self.switch_budget,
                self.stats.off_sampled_out,
                100.0 * self.stats.off_sampled_out as f64 / all as f64,
                self.stats.off_time_samples,
                self.stats.off_sample_walks,
                self.stats.wall_visits_skipped,
                self.stats.wall_visits + self.stats.wall_visits_skipped,
                timing.runs,
                timing.mean_gap.as_secs_f64() * 1e3,
                timing.longest_gap.as_secs_f64() * 1e3,
                if timing.realtime { "" } else { ", late while the CPUs were busy: no real-time priority" },
            );
        }
        if let Some((switch_time, switches)) = self.off_kernel_cost {
            let _ = writeln!(
                s,
                "  kernel: sched_switch ran {switches} times for {} ns ({:.0} ns per run, every switch on the host)",
                switch_time.as_nanos(),
                switch_time.as_nanos() as f64 / switches.max(1) as f64
            );
        }
        if let Some((time, runs)) = self.sampler_kernel_cost {
            let _ = writeln!(
                s,
                "  kernel: off_cpu_sample ran {runs} times for {} ns ({:.0} ns per run, every thread of a target per sample)",
                time.as_nanos(),
                time.as_nanos() as f64 / runs.max(1) as f64
            );
        }
        if let Some((report, path)) = &self.net {
            s.push_str(&report.render());
            let _ = writeln!(s, "  network report: {}", path.display());
            if let Some((time, runs)) = self.net_kernel_cost {
                let _ = writeln!(
                    s,
                    "  kernel: network programs ran {runs} times for {} ns in all ({:.0} ns per run)",
                    time.as_nanos(),
                    time.as_nanos() as f64 / runs.max(1) as f64
                );
            }
        }
        if let Some(floor) = self.stats_floor {
            let _ = writeln!(
                s,
                "  kernel: the run-time statistics add {floor:.0} ns to every run on their own (an empty program, timed the same way)"
            );
        }
        if let (unreadable @ 1.., total) = self.unreadable_code {
            let share = 100.0 * unreadable as f64 / total.max(1) as f64;
            let share = if share < 0.1 { "under 0.1%".to_string() } else { format!("{share:.1}%") };
            let _ = writeln!(
                s,
                "  {share} of the profile shows <unknown code> frames: Python code objects freed before stoker could read them (short-lived code, such as a module's body during its import)"
            );
        }
        if !self.top.is_empty() {
            let _ = match self.mode {
                Mode::Cpu => writeln!(s, "  top functions (leaf, share of samples):"),
                // (The waits are in the profile and the states above.)
                _ => writeln!(s, "  top functions on the CPU (leaf, share of CPU samples):"),
            };
            for (frame, count) in &self.top {
                let share = 100.0 * *count as f64 / self.samples.max(1) as f64;
                let _ = writeln!(s, "    {share:5.1}%  {}", frame.function_label());
            }
        }
        s
    }
}

impl CgroupSpan {
    /// One summary line: limits, what the counters grew by during the session, the
    /// latest memory figures.
    fn render(&self) -> String {
        let (a, b) = (&self.first, &self.last);
        let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
        let mut parts = Vec::new();
        parts.push(match (b.cpu_quota, b.cpu_period) {
            (Some(q), Some(p)) => format!("CPU quota {q:.2} CPUs per {:.0} ms", p * 1e3),
            _ => "no CPU quota".to_string(),
        });
        if let (Some(t1), Some(t0), Some(p1), Some(p0)) =
            (b.throttled_periods, a.throttled_periods, b.periods, a.periods)
        {
            let time = b.throttled_time.zip(a.throttled_time).map_or(0.0, |(x, y)| x - y);
            parts.push(format!(
                "throttled {} of {} periods, {time:.3} s",
                t1.saturating_sub(t0),
                p1.saturating_sub(p0)
            ));
        }
        if let (Some(u1), Some(u0)) = (b.cpu_usage, a.cpu_usage) {
            parts.push(format!("CPU used {:.3} s", u1 - u0));
        }
        if let Some(p) = b.cpu_pressure {
            parts.push(format!(
                "CPU pressure some {:.1}% full {:.1}% (last 10 s)",
                p.some_avg10, p.full_avg10
            ));
        }
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
        if let Some(current) = b.memory_current {
            let limit = b.memory_limit.map_or("none".to_string(), mib);
            let peak = b.memory_peak.map_or(String::new(), |p| format!(", peak {}", mib(p)));
            parts.push(format!("memory {}{peak}, limit {limit}", mib(current)));
        }
        if let (Some(anon), Some(file)) = (b.memory_anon, b.memory_file) {
            parts.push(format!("anon {}, file {}", mib(anon), mib(file)));
        }
        if let Some(kills) = b.oom_kills {
            parts.push(format!("OOM kills {}", kills.saturating_sub(a.oom_kills.unwrap_or(0))));
        }
        if let Some(p) = b.memory_pressure {
            parts.push(format!("memory pressure some {:.1}% full {:.1}%", p.some_avg10, p.full_avg10));
        }
        format!("  cgroup v{} {} (pid {}): {}", b.version, b.path, pids.join(", "), parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::cgroup::Pressure;

    #[test]
    fn cgroup_line_gives_limits_and_what_the_counters_grew_by() {
        let first = CgroupStats {
            version: 2,
            path: "/shop".into(),
            cpu_quota: Some(0.5),
            cpu_period: Some(0.1),
            cpu_usage: Some(10.0),
            periods: Some(100),
            throttled_periods: Some(40),
            throttled_time: Some(3.0),
            oom_kills: Some(1),
            ..Default::default()
        };
        let last = CgroupStats {
            cpu_usage: Some(10.8),
            periods: Some(131),
            throttled_periods: Some(67),
            throttled_time: Some(5.18),
            cpu_pressure: Some(Pressure { some_avg10: 42.5, full_avg10: 40.0, ..Default::default() }),
            memory_current: Some(12 << 20),
            memory_peak: Some(14 << 20),
            memory_limit: None,
            memory_anon: Some(9 << 20),
            memory_file: Some(3 << 20),
            oom_kills: Some(1),
            ..first.clone()
        };
        let line = CgroupSpan { pids: vec![4242, 4243], first, last }.render();
        assert_eq!(
            line,
            "  cgroup v2 /shop (pid 4242, 4243): CPU quota 0.50 CPUs per 100 ms; throttled 27 of 31 periods, 2.180 s; \
             CPU used 0.800 s; CPU pressure some 42.5% full 40.0% (last 10 s); memory 12.0 MiB, peak 14.0 MiB, \
             limit none; anon 9.0 MiB, file 3.0 MiB; OOM kills 0"
        );
        let unlimited = CgroupStats { version: 1, path: "/x".into(), ..Default::default() };
        let line = CgroupSpan { pids: vec![1], first: unlimited.clone(), last: unlimited }.render();
        assert_eq!(line, "  cgroup v1 /x (pid 1): no CPU quota");
    }
}
