//! Loads stoker's kernel programs, attaches CPU sampling to every online CPU and reads
//! the kernel-side aggregation (stack ids + counts) and the per-CPU drop counters.
mod logs;

use agent_ebpf::{MAP_COUNTS, MAP_STACKS, MAP_STATS, MAP_TARGETS, PROG_PERF_SAMPLE, SampleKey, stat};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    programs::{
        PerfEvent,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};

use crate::error::{Error, Result, errno_of, one_line};

/// The kernel object built from agent-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stoker-ebpf"));

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
}

/// The loaded kernel programs and their maps.
pub struct Sampler {
    ebpf: Ebpf,
    // Must stay alive while the programs run: dropping it closes the log map.
    logger: Option<aya_log::EbpfLogger<logs::ToTracing>>,
}

impl Sampler {
    /// Loads the kernel programs into the kernel (verifier included).
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| load_error("loading the kernel programs", &e))?;
        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, logs::ToTracing) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("kernel logs unavailable: {e}");
                None
            }
        };
        let prog: &mut PerfEvent = program(&mut ebpf)?;
        prog.load().map_err(|e| load_error("loading the CPU sampling program", &e))?;
        Ok(Self { ebpf, logger })
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
        Ok(())
    }

    /// Samples the process `pid` (all its threads) from now on.
    pub fn add_target(&mut self, pid: u32) -> Result<()> {
        let mut targets: HashMap<_, u32, u32> = self.map_mut(MAP_TARGETS)?;
        targets
            .insert(pid, 1, 0)
            .map_err(|e| Error::Ebpf { what: "cannot add a target process", detail: one_line(&e) })
    }

    /// Every (thread, user stack, kernel stack) seen so far with its sample count.
    pub fn counts(&self) -> Result<Vec<(SampleKey, u64)>> {
        let counts: PerCpuHashMap<_, SampleKey, u64> = self.map(MAP_COUNTS)?;
        // An entry deleted between iteration steps is skipped, not an error.
        Ok(counts.iter().filter_map(|r| r.ok()).map(|(key, per_cpu)| (key, per_cpu.iter().sum())).collect())
    }

    /// The instruction pointers of a stored stack, leaf first.
    pub fn stack(&self, stack_id: u32) -> Option<Vec<u64>> {
        let stacks: StackTraceMap<&MapData> = self.map(MAP_STACKS).ok()?;
        let trace = stacks.get(&stack_id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }

    /// The kernel's counters summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let array: PerCpuArray<_, u64> = self.map(MAP_STATS)?;
        let sum = |index: u32| -> u64 { array.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        Ok(Stats {
            samples: sum(stat::SAMPLES),
            user_stack_missing: sum(stat::USER_STACK_MISSING),
            stacks_dropped: sum(stat::STACK_DROPPED),
            lost: sum(stat::COUNTS_FULL),
        })
    }

    /// Forwards pending kernel log lines to `tracing` (debug level).
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map>,
        T::Error: std::error::Error + 'static,
    {
        let map =
            self.ebpf.map(name).ok_or(Error::Ebpf { what: "kernel map missing", detail: name.into() })?;
        T::try_from(map)
            .map_err(|e| Error::Ebpf { what: "kernel map has the wrong type", detail: one_line(&e) })
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T>
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

fn load_error(what: &'static str, err: &(dyn std::error::Error + 'static)) -> Error {
    match errno_of(err) {
        Some(libc::EPERM | libc::EACCES) => {
            Error::Permission { what: "loading eBPF programs", needs: "CAP_BPF and CAP_PERFMON" }
        }
        Some(libc::ENOSYS) => {
            Error::KernelFeature { feature: "the bpf() system call", detail: one_line(err) }
        }
        _ => Error::Ebpf { what, detail: one_line(err) },
    }
}

fn perf_error(err: &(dyn std::error::Error + 'static)) -> Error {
    match errno_of(err) {
        Some(libc::EPERM | libc::EACCES) => {
            Error::Permission { what: "system-wide CPU sampling", needs: "CAP_PERFMON" }
        }
        Some(libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP | libc::ENOSYS) => {
            Error::KernelFeature { feature: "perf events (software cpu-clock)", detail: one_line(err) }
        }
        _ => Error::Ebpf { what: "attaching the CPU sampling program", detail: one_line(err) },
    }
}
