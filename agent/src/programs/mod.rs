//! Loads stoker's kernel programs, attaches CPU sampling to every online CPU and reads
//! the kernel-side aggregation (stack ids + counts) and the per-CPU drop counters.
pub(crate) mod attach;
mod bits;
mod logs;
pub mod loops;
pub mod net_layout;
pub mod offcpu;
pub mod sizing;
pub mod wall;

use agent_ebpf::{
    GLOBAL_FSBASE_OFFSET, GLOBAL_MEASURE_COST, GLOBAL_NET_OFFSETS, GLOBAL_NET_WORK,
    GLOBAL_NEWTASK_FLAGS_OFFSET, GLOBAL_NEWTASK_PID_OFFSET, GLOBAL_OFF_CONFIG, MAP_COUNTS, MAP_EXEC_ALL,
    MAP_EXECS, MAP_FORKED_FROM, MAP_NET_EVENTS, MAP_NEW_KEYS, MAP_PY_PROCS, MAP_PY_STACKS, MAP_STACKS,
    MAP_STATS, MAP_TARGET_BITS, MAP_TARGETS, NewKey, PROG_PERF_SAMPLE, PROG_SCHED_EXEC, PROG_STATS_FLOOR,
    PROG_TASK_NEWTASK, PyProc, PyStack, SampleKey, stat,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    programs::{
        PerfEvent,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};

use self::attach::{load_error, perf_error};
use crate::error::{Error, Result, one_line};

/// The kernel object built from agent-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stoker-ebpf"));

/// Whether a map update failed because the map is full (a hash map answers E2BIG).
fn map_full(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::E2BIG),
        _ => false,
    }
}

/// Drop and loss counters summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Samples the kernel program took in target processes.
    pub samples: u64,
    /// Samples with no readable user stack.
    pub user_stack_missing: u64,
    /// Stacks that could not be stored (stack map bucket taken or full).
    pub stacks_dropped: u64,
    /// Samples lost because the counts map was full.
    pub lost: u64,
    /// Samples with a Python stack.
    pub py_samples: u64,
    /// Samples of Python processes in threads without a Python thread state.
    pub py_no_thread: u64,
    /// Python stacks cut at `PY_MAX_FRAMES`.
    pub py_truncated: u64,
    /// Python walks stopped by an unreadable frame.
    pub py_read_errors: u64,
    /// Python stacks dropped because their map was full.
    pub py_stacks_full: u64,
    /// Nanoseconds the sampling program spent on target samples (when measured).
    pub target_ns: u64,
    /// Python frames read field by field because their prefix could not be read at once.
    pub py_frame_slow_reads: u64,
    /// Exec notifications lost to a full set (those processes wait for the /proc scan).
    pub execs_missed: u64,
    /// Network events lost because their CPU's event ring was full.
    pub net_events_lost: u64,
    /// Sockets and TCP connects not tracked because their map was full.
    pub net_conns_full: u64,
    pub net_socks_full: u64,
    /// Processes not sampled because the targets map was full (children the kernel could
    /// not follow, processes stoker could not add).
    pub targets_full: u64,
    /// Target threads' switches off the CPU followed, the nanoseconds spent on them (when
    /// measured), and waits lost to a full off-CPU map.
    pub off_switches: u64,
    pub off_ns: u64,
    pub off_counts_full: u64,
    /// Target threads' switches whose Python stack was not walked again (unchanged).
    pub off_stacks_reused: u64,
    /// Target threads' GIL and lock waits that took the stack read at a recent
    /// switch (see `offcpu::RECENT`).
    pub off_stacks_recent: u64,
    /// Waits whose end the scheduler did not record: closed from the CPU time the thread
    /// used since.
    pub off_from_run_time: u64,
    /// Target threads' switches off the CPU not followed: their threads were over the switch
    /// budget (the wall-clock sampler counts their time off the CPU).
    pub off_sampled_out: u64,
    /// Waits of fast-switching threads counted by the wall-clock sampler.
    pub off_time_samples: u64,
    /// Of those, the samples whose Python stack was walked (not found unchanged).
    pub off_sample_walks: u64,
    /// The wall-clock sampler's visits of target processes made, and left out (no thread of
    /// the process was fast).
    pub wall_visits: u64,
    pub wall_visits_skipped: u64,
    /// How the wall-clock sampler's runs kept time.
    pub wall_timing: wall::Timing,
    /// Blocked event-loop stretches lost to a full ring.
    pub loop_blocks_lost: u64,
}

impl Stats {
    /// Every kind of loss the kernel counts, by the name reports and metrics give it.
    pub fn losses(&self) -> [(&'static str, u64); 14] {
        [
            ("counts_map_full", self.lost),
            ("stack_dropped", self.stacks_dropped),
            ("user_stack_missing", self.user_stack_missing),
            ("python_thread_not_found", self.py_no_thread),
            ("python_stack_truncated", self.py_truncated),
            ("python_memory_unreadable", self.py_read_errors),
            ("python_stacks_map_full", self.py_stacks_full),
            ("execs_missed", self.execs_missed),
            ("net_events_ring_full", self.net_events_lost),
            ("net_connections_map_full", self.net_conns_full),
            ("net_sockets_map_full", self.net_socks_full),
            ("targets_full", self.targets_full),
            ("off_cpu_map_full", self.off_counts_full),
            ("loop_blocks_ring_full", self.loop_blocks_lost),
        ]
    }
}

/// Kernel memory the BPF objects this process holds are charged for (their `memlock`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelMemory {
    pub maps: usize,
    pub map_bytes: u64,
    pub programs: usize,
    pub program_bytes: u64,
}

/// What this process's BPF maps and programs take in the kernel, from /proc/self/fdinfo
/// (the kernel charges it to the process's memory cgroup).
pub fn kernel_memory() -> KernelMemory {
    let mut m = KernelMemory::default();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else { return m };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let memlock: u64 = field("memlock:").and_then(|v| v.parse().ok()).unwrap_or(0);
        if field("map_type:").is_some() {
            m.maps += 1;
            m.map_bytes += memlock;
        } else if field("prog_type:").is_some() {
            m.programs += 1;
            m.program_bytes += memlock;
        }
    }
    m
}

/// Runs of the empty program that measure the run-time statistics' own cost.
const STATS_FLOOR_RUNS: u32 = 100_000;

/// What `KernelPrograms::wait_events` saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Events {
    /// Execs are waiting to be taken.
    pub exec: bool,
    /// New keys are waiting to be named.
    pub keys: bool,
}

/// The loaded kernel programs and their maps.
pub struct KernelPrograms {
    ebpf: Ebpf,
    // Must stay alive while the programs run: dropping it closes the log map.
    logger: Option<aya_log::EbpfLogger<logs::ToTracing>>,
    python_ready: bool,
    follow_ready: bool,
    /// The kernel adds children of targets to the target set (see `follow_children`).
    following: bool,
    /// Execs the kernel reports (see `watch_execs`).
    execs: Option<aya::maps::RingBuf<MapData>>,
    /// The off-CPU programs are attached (see `watch_off_cpu`), and what they were told.
    watching_off_cpu: bool,
    /// No switch is followed: the wall-clock sampler counts every target thread's time off
    /// the CPU (`Waits::Sampled`).
    sampled_waits: bool,
    off_config: agent_ebpf::OffConfig,
    /// Blocked event-loop stretches (see `watch_loops`).
    loop_blocks: Option<aya::maps::RingBuf<MapData>>,
    /// Keys the kernel added to the counts maps (see `MAP_NEW_KEYS`), and how many it could
    /// not send when last looked.
    new_keys: std::sync::Mutex<(aya::maps::RingBuf<MapData>, u64)>,
    /// Keeps the kernel's BPF run-time statistics on while held.
    stats_fd: Option<std::os::fd::OwnedFd>,
    /// The network programs' connection table, mapped once they are attached (none before:
    /// no connection is followed, and a process's exit has none to free).
    net_slots: Option<crate::net::slots::ConnSlots>,
    /// The network programs do their work (`crate::net::programs_work`, as loaded), and
    /// what they time (the kernel's `NET_WORK` is made of both: `NetDetail::work`).
    net_work: bool,
    net_detail: crate::net::NetDetail,
    /// `TARGETS` as a bitmap, mapped here.
    bits: bits::TargetBits,
    /// Processes not added because the targets or Python map was full.
    targets_refused: u64,
    sizes: sizing::MapSizes,
    /// `OFF_PENDING`, mapped here once the off-CPU program is attached.
    off_pending: Option<bits::TargetBits>,
    /// The wall-clock sampler's iterator program, once loaded (`watch_off_cpu`), and the
    /// sampler running it (`start`).
    wall_prog: Option<std::os::fd::OwnedFd>,
    wall: Option<wall::Sampler>,
    /// The CPU sampling rate, once started (the wall-clock sampler's too).
    rate_hz: Option<u64>,
    /// The tracepoint links made (detached together: see the `Drop` below).
    tracepoint_links: Vec<(&'static str, aya::programs::trace_point::TracePointLinkId)>,
}

/// Detaching a tracepoint waits for the kernel's RCU grace periods (about 75 ms each on a
/// small VM): one after the other, the network and event-loop programs' 20-odd links took
/// over a second to detach at the end of every session. Detached from threads of their
/// own, they wait for the same grace periods together.
impl Drop for KernelPrograms {
    fn drop(&mut self) {
        let mut links = Vec::new();
        for (name, id) in std::mem::take(&mut self.tracepoint_links) {
            let prog: Option<&mut aya::programs::TracePoint> =
                self.ebpf.program_mut(name).and_then(|p| p.try_into().ok());
            if let Some(link) = prog.and_then(|p| p.take_link(id).ok()) {
                links.push(link);
            }
        }
        std::thread::scope(|s| {
            for link in links {
                s.spawn(move || drop(link));
            }
        });
    }
}

impl KernelPrograms {
    /// Loads the kernel programs into the kernel (verifier included).
    /// `measure_cost`: time every target sample in the kernel (`Stats::target_ns`).
    pub fn load(measure_cost: bool) -> Result<Self> {
        Self::load_sized(measure_cost, sizing::DEFAULT_COUNTS_BYTES, crate::net::NetDetail::Full)
    }

    /// `load`, with the sample counts map sized to take at most `counts_bytes` (see `sizing`)
    /// and the network programs, if attached later, timing `net`.
    pub fn load_sized(measure_cost: bool, counts_bytes: u64, net: crate::net::NetDetail) -> Result<Self> {
        // Where the kernel keeps a task's fs base: the Python walker matches it against
        // CPython's thread ids. Without BTF, Python stacks are unavailable.
        // The network programs read `tcp_sock` members found the same way.
        let structs =
            [crate::sys::btf::FSBASE_STRUCTS, net_layout::BTF_STRUCTS, offcpu::BTF_STRUCTS].concat();
        let btf = crate::sys::btf::Btf::from_sys_fs(&structs);
        let fsbase = match &btf {
            Ok(btf) => crate::sys::btf::fsbase_offset(btf).unwrap_or(0),
            Err(e) => {
                tracing::warn!("kernel BTF unreadable ({e}): Python stacks are unavailable");
                0
            }
        };
        let net_offsets = net_layout::offsets(btf.as_ref().ok());
        let net_work = crate::net::programs_work()?;
        let off_config = offcpu::config(btf.as_ref().ok(), measure_cost);
        // Field offsets of the child-following tracepoint's record (0 when unknown: the
        // program is then not attached).
        let newtask = |field| crate::sys::tracefs::field_offset("task", "task_newtask", field).unwrap_or(0);
        let (newtask_pid, newtask_flags) = (newtask("pid"), newtask("clone_flags"));
        // No kernel BTF for the loader: the programs use no CO-RE relocations, and parsing
        // it costs tens of megabytes.
        let possible = crate::sys::mmap::possible_cpu_ids()?;
        let online = crate::sys::mmap::online_cpu_ids().unwrap_or(possible);
        let sizes = sizing::MapSizes::plan(possible, online, counts_bytes);
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries(MAP_NET_EVENTS, net_layout::event_slots(sizes.event_cpus))
            .map_max_entries(MAP_COUNTS, sizes.counts)
            .override_global(GLOBAL_FSBASE_OFFSET, &fsbase, true)
            .override_global(GLOBAL_MEASURE_COST, &u32::from(measure_cost), true)
            .override_global(GLOBAL_NEWTASK_PID_OFFSET, &newtask_pid, true)
            .override_global(GLOBAL_NEWTASK_FLAGS_OFFSET, &newtask_flags, true)
            .override_global(GLOBAL_NET_OFFSETS, &net_offsets, true)
            .override_global(GLOBAL_NET_WORK, &net.work(net_work), true)
            .override_global(GLOBAL_OFF_CONFIG, &off_config, true)
            .load(OBJECT)
            .map_err(|e| load_error("loading the kernel programs", &e))?;
        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, logs::ToTracing) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("kernel logs unavailable: {e}");
                None
            }
        };
        let prog: &mut PerfEvent = program(&mut ebpf)?;
        prog.load().map_err(|e| load_error("loading the CPU sampling program", &e))?;
        let follow_ready = newtask_pid != 0 && newtask_flags != 0;
        let bits = bits::TargetBits::map(
            ebpf.map(MAP_TARGET_BITS)
                .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_TARGET_BITS.into() })?,
        )?;
        let new_keys = ebpf
            .take_map(MAP_NEW_KEYS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_NEW_KEYS.into() })
            .and_then(|map| {
                aya::maps::RingBuf::try_from(map)
                    .map_err(|e| Error::Ebpf { what: "mapping the new-key ring", detail: one_line(&e) })
            })?;
        Ok(Self {
            ebpf,
            logger,
            new_keys: std::sync::Mutex::new((new_keys, 0)),
            python_ready: fsbase != 0,
            follow_ready,
            following: false,
            execs: None,
            watching_off_cpu: false,
            sampled_waits: false,
            off_config,
            loop_blocks: None,
            stats_fd: None,
            net_slots: None,
            net_work,
            net_detail: net,
            bits,
            targets_refused: 0,
            sizes,
            off_pending: None,
            wall_prog: None,
            wall: None,
            rate_hz: None,
            tracepoint_links: Vec::new(),
        })
    }

    /// How large the CPU-count-dependent maps were made on this node.
    pub fn sizes(&self) -> sizing::MapSizes {
        self.sizes
    }

    /// Starts following children of targets flagged `TARGET_FOLLOW` or `TARGET_INHERIT`.
    pub fn follow_children(&mut self) -> Result<()> {
        if !self.follow_ready {
            return Err(Error::KernelFeature {
                feature: "the task:task_newtask tracepoint",
                detail: "its format file could not be read".into(),
            });
        }
        let feature = "the task:task_newtask tracepoint";
        let loading = "loading the child-following program";
        attach::tracepoint(self, PROG_TASK_NEWTASK, &[("task", "task_newtask")], feature, loading)?;
        self.following = true;
        Ok(())
    }

    /// Starts reporting the execs of targets, and with `all` every exec on the machine (the
    /// node agent, `--all-python`: a new process is looked at as it starts, not at the next
    /// /proc scan).
    pub fn watch_execs(&mut self, all: bool) -> Result<()> {
        let feature = "the sched:sched_process_exec tracepoint";
        let loading = "loading the exec-watching program";
        let mut every: Array<_, u32> = self.map_mut(MAP_EXEC_ALL)?;
        every.set(0, u32::from(all), 0).map_err(|e| Error::Ebpf {
            what: "configuring the exec-watching program",
            detail: one_line(&e),
        })?;
        attach::tracepoint(self, PROG_SCHED_EXEC, &[("sched", "sched_process_exec")], feature, loading)?;
        let map = self
            .ebpf
            .take_map(MAP_EXECS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_EXECS.into() })?;
        self.execs = Some(
            aya::maps::RingBuf::try_from(map)
                .map_err(|e| Error::Ebpf { what: "mapping the exec ring", detail: one_line(&e) })?,
        );
        Ok(())
    }

    /// Processes that called exec since the last call, each once with the time of its last
    /// exec (`CLOCK_MONOTONIC` ns; none unless `watch_execs`).
    pub fn take_execs(&mut self) -> Vec<(u32, u64)> {
        let Some(ring) = self.execs.as_mut() else { return Vec::new() };
        // By pid: a later exec of the same process replaces the earlier.
        let mut execs: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        while let Some(item) = ring.next() {
            let word = |i: usize| item.get(i * 8..i * 8 + 8).and_then(|b| <[u8; 8]>::try_from(b).ok());
            let (Some(pid), Some(ns)) = (word(0), word(1)) else { continue };
            execs.insert(u64::from_ne_bytes(pid) as u32, u64::from_ne_bytes(ns));
        }
        execs.into_iter().collect()
    }

    /// Whether the kernel adds targets of its own (children of followed targets).
    pub fn follows_children(&self) -> bool {
        self.following
    }

    /// The loaded object, for capabilities that attach further programs of it (network).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The network programs' connection table, once they are attached (`map_net_slots`).
    pub fn net_slots(&self) -> Option<&crate::net::slots::ConnSlots> {
        self.net_slots.as_ref()
    }

    /// Whether the network programs were loaded to do their work (else each returns as it
    /// starts: `STOKER_NET_PROGRAMS=empty`).
    pub fn net_work(&self) -> bool {
        self.net_work
    }

    /// What the network programs time (also when loaded empty: what they are attached for).
    pub fn net_detail(&self) -> crate::net::NetDetail {
        self.net_detail
    }

    /// Maps the network programs' connection table, as they are attached.
    pub(crate) fn map_net_slots(&mut self) -> Result<()> {
        self.net_slots = Some(crate::net::slots::ConnSlots::map(self)?);
        Ok(())
    }

    /// Turns on the kernel's run-time statistics of BPF programs (a little overhead per run).
    pub fn enable_kernel_stats(&mut self) -> Result<()> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| Error::KernelFeature { feature: "BPF run-time statistics", detail: one_line(&e) })?;
        self.stats_fd = Some(fd);
        Ok(())
    }

    /// Time the sampling program has run in the kernel and how many times it ran, when
    /// statistics are on.
    pub fn kernel_cost(&mut self) -> Option<(std::time::Duration, u64)> {
        self.stats_fd.as_ref()?;
        let info = program(&mut self.ebpf).ok()?.info().ok()?;
        Some((info.run_time(), info.run_count()))
    }

    /// Nanoseconds the run-time statistics add to every program run on their own: the
    /// average of an empty program attached to `getppid`'s exit and run by this process
    /// `STATS_FLOOR_RUNS` times (other callers of getppid only add runs of the same kind).
    pub fn stats_floor(&mut self) -> Result<f64> {
        crate::sys::tracefs::ensure_mounted()
            .map_err(|e| Error::KernelFeature { feature: "tracefs (tracepoints)", detail: e.to_string() })?;
        let prog =
            attach::load_tracepoint(&mut self.ebpf, PROG_STATS_FLOOR, "measuring the statistics' cost")?;
        let fail = |e: &(dyn std::error::Error + 'static)| Error::Ebpf {
            what: "measuring the statistics' cost",
            detail: one_line(e),
        };
        let link = prog.attach("syscalls", "sys_exit_getppid").map_err(|e| fail(&e))?;
        for _ in 0..STATS_FLOOR_RUNS {
            // SAFETY: getppid has no arguments and cannot fail.
            unsafe { libc::getppid() };
        }
        let info = prog.info().map_err(|e| fail(&e))?;
        prog.detach(link).map_err(|e| fail(&e))?;
        Ok(info.run_time().as_nanos() as f64 / info.run_count().max(1) as f64)
    }

    /// The `TARGET_*` flags of `pid` when the kernel samples it.
    pub fn target_flags(&self, pid: u32) -> Option<u32> {
        let targets: HashMap<_, u32, u32> = self.map(MAP_TARGETS).ok()?;
        targets.get(&pid, 0).ok()
    }

    /// Every process currently in the kernel's target set (including followed children).
    pub fn targets(&self) -> Result<Vec<(u32, u32)>> {
        let targets: HashMap<_, u32, u32> = self.map(MAP_TARGETS)?;
        Ok(targets.iter().filter_map(|k| k.ok()).collect())
    }

    /// The Python process that forked `pid` when the kernel made it a target with its
    /// parent's layout (asked once: the entry goes).
    pub fn take_parent(&mut self, pid: u32) -> Option<u32> {
        let mut forked: HashMap<_, u32, u32> = self.map_mut(MAP_FORKED_FROM).ok()?;
        let parent = forked.get(&pid, 0).ok()?;
        let _ = forked.remove(&pid);
        Some(parent)
    }

    /// Stops sampling `pid` (it exited) and forgets its Python configuration (the network
    /// side forgets its sockets: `net::forget_process`).
    pub fn remove_target(&mut self, pid: u32) -> Result<()> {
        let mut targets: HashMap<_, u32, u32> = self.map_mut(MAP_TARGETS)?;
        let _ = targets.remove(&pid);
        self.bits.clear(pid);
        self.remove_python(pid)
    }

    /// Stops walking the Python stacks of `pid` (it goes on being sampled).
    pub fn remove_python(&mut self, pid: u32) -> Result<()> {
        let mut procs: HashMap<_, u32, PyProc> = self.map_mut(MAP_PY_PROCS)?;
        let _ = procs.remove(&pid);
        Ok(())
    }

    /// True when the kernel can walk Python stacks (it found the task fs base offset).
    pub fn python_ready(&self) -> bool {
        self.python_ready
    }

    /// Attaches the sampling program to the cpu-clock of every online CPU at `rate_hz`.
    pub fn start(&mut self, rate_hz: u64) -> Result<()> {
        let cpus = aya::util::online_cpus().map_err(|(path, e)| Error::Ebpf {
            what: "cannot list online CPUs",
            detail: format!("{path}: {e}"),
        })?;
        let prog: &mut PerfEvent = program(&mut self.ebpf)?;
        for cpu in cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(rate_hz),
                false,
            )
            .map_err(|e| perf_error(&e))?;
        }
        self.rate_hz = Some(rate_hz);
        self.start_wall_sampler()
    }

    /// Starts the wall-clock sampler once its program is loaded (`watch_off_cpu`) and the
    /// sampling rate known (`start`), whichever comes last.
    pub(crate) fn start_wall_sampler(&mut self) -> Result<()> {
        let Some(rate_hz) = self.rate_hz else { return Ok(()) };
        let Some(prog) = self.wall_prog.take() else { return Ok(()) };
        let map = |name: &'static str| {
            self.ebpf
                .map(name)
                .ok_or(Error::Ebpf { what: "kernel map missing", detail: name.into() })
                .and_then(wall::map_fd)
        };
        let (targets, budget) = (map(MAP_TARGETS)?, map(agent_ebpf::MAP_OFF_BUDGET)?);
        let fast_procs = self
            .ebpf
            .map(agent_ebpf::MAP_OFF_FAST_PROCS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: agent_ebpf::MAP_OFF_FAST_PROCS.into() })
            .and_then(|m| bits::TargetBits::map_named(m, agent_ebpf::MAP_OFF_FAST_PROCS))?;
        let period = std::time::Duration::from_nanos(1_000_000_000 / rate_hz.max(1));
        self.wall = Some(wall::Sampler::start(prog, targets, budget, fast_procs, period)?);
        Ok(())
    }

    /// Samples the process `pid` (all its threads) from now on; `flags` are `TARGET_*` bits.
    pub fn add_target(&mut self, pid: u32, flags: u32) -> Result<()> {
        let mut targets: HashMap<_, u32, u32> = self.map_mut(MAP_TARGETS)?;
        match targets.insert(pid, flags, 0) {
            Ok(()) => {}
            Err(e) if map_full(&e) => {
                self.refuse(pid);
                return Ok(());
            }
            Err(e) => return Err(Error::Ebpf { what: "cannot add a target process", detail: one_line(&e) }),
        }
        self.bits.set(pid);
        if let Some(sampler) = &self.wall {
            sampler.targets_added();
        }
        Ok(())
    }

    /// Counts a process the kernel's maps had no room for (`Stats::targets_full`), and says
    /// so once: it is not sampled, the rest go on.
    fn refuse(&mut self, pid: u32) {
        if self.targets_refused == 0 {
            tracing::warn!(
                "pid {pid} and any further processes over {} at once are not sampled (counted as targets_full)",
                agent_ebpf::TARGETS_CAPACITY
            );
        }
        self.targets_refused += 1;
    }

    /// Walks the Python stacks of process `pid` from now on.
    pub fn add_python(&mut self, pid: u32, proc: &PyProc) -> Result<()> {
        let mut procs: HashMap<_, u32, PyProc> = self.map_mut(MAP_PY_PROCS)?;
        match procs.insert(pid, proc, 0) {
            Ok(()) => Ok(()),
            Err(e) if map_full(&e) => {
                self.refuse(pid);
                Ok(())
            }
            Err(e) => Err(Error::Ebpf { what: "cannot add a Python process", detail: one_line(&e) }),
        }
    }

    /// CPU samples of each process's GIL holder so far (processes with `PY_PROC_GIL_COUNT`).
    pub fn gil_held(&self) -> Result<Vec<(u32, u64)>> {
        let held: PerCpuHashMap<_, u32, u64> = self.map(agent_ebpf::MAP_GIL_HELD)?;
        Ok(held.iter().filter_map(|r| r.ok()).map(|(pid, per_cpu)| (pid, per_cpu.iter().sum())).collect())
    }

    /// Forgets the GIL-held samples of these processes (they exited).
    pub fn remove_gil_held(&mut self, pids: &[u32]) -> Result<()> {
        let mut held: PerCpuHashMap<_, u32, u64> = self.map_mut(agent_ebpf::MAP_GIL_HELD)?;
        for pid in pids {
            let _ = held.remove(pid);
        }
        Ok(())
    }

    /// A Python stack stored by the kernel, by hash.
    pub fn py_stack(&self, hash: u64) -> Option<PyStack> {
        let stacks: HashMap<_, u64, PyStack> = self.map(MAP_PY_STACKS).ok()?;
        stacks.get(&hash, 0).ok()
    }

    /// Every (thread, user stack, kernel stack) seen so far with its sample count.
    pub fn counts(&self) -> Result<Vec<(SampleKey, u64)>> {
        let counts: PerCpuHashMap<_, SampleKey, u64> = self.map(MAP_COUNTS)?;
        // An entry deleted between iteration steps is skipped, not an error.
        Ok(counts.iter().filter_map(|r| r.ok()).map(|(key, per_cpu)| (key, per_cpu.iter().sum())).collect())
    }

    /// Keys the kernel added to the counts and off-CPU counts maps since the last call (the
    /// same key again after it was removed), with their threads' names, and whether that is
    /// all of them: false when the kernel's ring was full meanwhile and some were not sent
    /// (`count_keys` and `off_keys` then give them all).
    pub fn take_new_keys(&self) -> (Vec<NewKey>, bool) {
        let unsent = self
            .map::<PerCpuArray<_, u64>>(MAP_STATS)
            .ok()
            .and_then(|a| a.get(&stat::NEW_KEYS_UNSENT, 0).ok())
            .map(|v| v.iter().sum::<u64>())
            .unwrap_or(0);
        let mut guard = self.new_keys.lock().unwrap_or_else(|e| e.into_inner());
        let (ring, seen_unsent) = &mut *guard;
        let mut keys = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<NewKey>() {
                // SAFETY: the kernel wrote a `NewKey` (plain integers and bytes, any bits
                // valid); the read is unaligned-safe and within the item.
                keys.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const NewKey) });
            }
        }
        let complete = unsent == *seen_unsent;
        *seen_unsent = unsent;
        (keys, complete)
    }

    /// Waits up to `timeout` for an exec (`watch_execs`) or, with `keys`, a new key in the
    /// counts maps (`take_new_keys`); says which came. A signal (Ctrl-C) ends the wait early.
    pub fn wait_events(&self, timeout: std::time::Duration, keys: bool) -> Events {
        use std::os::fd::AsRawFd;
        let mut fds = Vec::with_capacity(2);
        if let Some(ring) = self.execs.as_ref() {
            fds.push(libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let exec_fds = fds.len();
        if keys {
            let guard = self.new_keys.lock().unwrap_or_else(|e| e.into_inner());
            fds.push(libc::pollfd { fd: guard.0.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if fds.is_empty() {
            std::thread::sleep(timeout);
            return Events::default();
        }
        // Rounded up: a wait of less than a millisecond is not a poll that returns at once.
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: valid `pollfd`s for the duration of the call; the rings' descriptors stay
        // open while `self` is borrowed.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if ready <= 0 {
            return Events::default();
        }
        let ready = |f: &libc::pollfd| f.revents & libc::POLLIN != 0;
        Events { exec: fds[..exec_fds].iter().any(ready), keys: fds[exec_fds..].iter().any(ready) }
    }

    /// The keys of the counts map, without their counts: cheaper (one call per key) when
    /// only new stacks are of interest.
    pub fn count_keys(&self) -> Result<Vec<SampleKey>> {
        let counts: PerCpuHashMap<_, SampleKey, u64> = self.map(MAP_COUNTS)?;
        Ok(counts.keys().filter_map(|r| r.ok()).collect())
    }

    /// Empties the counts, Python stacks and native stacks maps (the node agent, between
    /// intervals, so they never fill). Increments between reading and clearing a key are lost.
    pub fn clear_counts(&mut self) -> Result<()> {
        let keys = self.count_keys()?;
        let mut counts: PerCpuHashMap<_, SampleKey, u64> = self.map_mut(MAP_COUNTS)?;
        for key in keys {
            let _ = counts.remove(&key);
        }
        let mut stacks: HashMap<_, u64, PyStack> = self.map_mut(MAP_PY_STACKS)?;
        let hashes: Vec<u64> = stacks.keys().filter_map(|k| k.ok()).collect();
        for hash in hashes {
            let _ = stacks.remove(&hash);
        }
        // Native stack ids are reused once freed: callers forget what they cached by id.
        let mut native: StackTraceMap<&mut MapData> = self.map_mut(MAP_STACKS)?;
        let ids: Vec<u32> = native.stack_ids().filter_map(|k| k.ok()).collect();
        for id in ids {
            let _ = native.remove(&id);
        }
        Ok(())
    }

    /// Removes these keys from the counts map (their processes exited).
    pub fn remove_counts(&mut self, keys: &[SampleKey]) -> Result<()> {
        let mut counts: PerCpuHashMap<_, SampleKey, u64> = self.map_mut(MAP_COUNTS)?;
        for key in keys {
            let _ = counts.remove(key);
        }
        Ok(())
    }

    /// Removes these Python stacks (no live process uses them).
    pub fn remove_py_stacks(&mut self, hashes: &std::collections::HashSet<u64>) -> Result<()> {
        let mut stacks: HashMap<_, u64, PyStack> = self.map_mut(MAP_PY_STACKS)?;
        for hash in hashes {
            let _ = stacks.remove(hash);
        }
        Ok(())
    }

    /// The instruction pointers of a stored stack, leaf first.
    pub fn stack(&self, stack_id: u32) -> Option<Vec<u64>> {
        let stacks: StackTraceMap<&MapData> = self.map(MAP_STACKS).ok()?;
        let trace = stacks.get(&stack_id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }

    /// The kernel's counters summed over CPUs.
    /// How many keys the sampling program has added to the counts map (see `stat::NEW_KEYS`).
    pub fn new_keys(&self) -> u64 {
        let Ok(array) = self.map::<PerCpuArray<_, u64>>(MAP_STATS) else { return 0 };
        array.get(&stat::NEW_KEYS, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    pub fn stats(&self) -> Result<Stats> {
        let array: PerCpuArray<_, u64> = self.map(MAP_STATS)?;
        let sum = |index: u32| -> u64 { array.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        let visits = self.wall.as_ref().map_or((0, 0), wall::Sampler::visits);
        let wall_timing = self.wall.as_ref().map(wall::Sampler::timing).unwrap_or_default();
        Ok(Stats {
            samples: sum(stat::SAMPLES),
            user_stack_missing: sum(stat::USER_STACK_MISSING),
            stacks_dropped: sum(stat::STACK_DROPPED),
            lost: sum(stat::COUNTS_FULL),
            py_samples: sum(stat::PY_SAMPLES),
            py_no_thread: sum(stat::PY_NO_THREAD),
            py_truncated: sum(stat::PY_TRUNCATED),
            py_read_errors: sum(stat::PY_READ_ERROR),
            py_stacks_full: sum(stat::PY_STACKS_FULL),
            target_ns: sum(stat::TARGET_NS),
            py_frame_slow_reads: sum(stat::PY_FRAME_SLOW_READS),
            execs_missed: sum(stat::EXECS_FULL),
            net_events_lost: sum(stat::NET_EVENTS_LOST),
            net_conns_full: sum(stat::NET_CONNS_FULL),
            net_socks_full: sum(stat::NET_SOCKS_FULL),
            targets_full: sum(stat::TARGETS_FULL) + self.targets_refused,
            off_switches: sum(stat::OFF_SWITCHES),
            off_ns: sum(stat::OFF_NS),
            off_counts_full: sum(stat::OFF_COUNTS_FULL),
            off_stacks_reused: sum(stat::OFF_STACKS_REUSED),
            off_stacks_recent: sum(stat::OFF_STACKS_RECENT),
            loop_blocks_lost: sum(stat::LOOP_BLOCKS_LOST),
            off_from_run_time: sum(stat::OFF_FROM_RUN_TIME),
            off_sampled_out: sum(stat::OFF_SAMPLED_OUT),
            off_time_samples: sum(stat::OFF_TIME_SAMPLES),
            off_sample_walks: sum(stat::OFF_SAMPLE_WALKS),
            wall_visits: visits.0,
            wall_visits_skipped: visits.1,
            wall_timing,
        })
    }

    /// Forwards pending kernel log lines to `tracing` (debug level).
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }

    pub(crate) fn map<'a, T>(&'a self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map>,
        T::Error: std::error::Error + 'static,
    {
        let map =
            self.ebpf.map(name).ok_or(Error::Ebpf { what: "kernel map missing", detail: name.into() })?;
        T::try_from(map)
            .map_err(|e| Error::Ebpf { what: "kernel map has the wrong type", detail: one_line(&e) })
    }

    pub(crate) fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map>,
        T::Error: std::error::Error + 'static,
    {
        let map =
            self.ebpf.map_mut(name).ok_or(Error::Ebpf { what: "kernel map missing", detail: name.into() })?;
        T::try_from(map)
            .map_err(|e| Error::Ebpf { what: "kernel map has the wrong type", detail: one_line(&e) })
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut PerfEvent> {
    let prog = ebpf
        .program_mut(PROG_PERF_SAMPLE)
        .ok_or(Error::Ebpf { what: "kernel program missing", detail: PROG_PERF_SAMPLE.into() })?;
    prog.try_into().map_err(|e: aya::programs::ProgramError| Error::Ebpf {
        what: "kernel program has the wrong type",
        detail: one_line(&e),
    })
}
