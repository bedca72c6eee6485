//! The off-CPU programs: where they find what they read in this kernel (record fields,
//! BTF members), attaching them, and reading the waits they aggregated.
use agent_ebpf::{
    MAP_OFF_BUDGET, MAP_OFF_COUNTS, MAP_OFF_PENDING, MAP_OFF_THREADS, NO_OFFSET, OffConfig, OffKey,
    OffThread, OffTime, PROG_OFF_CPU_SAMPLE, PROG_SCHED_SWITCH, SAMPLE_EVERY_THREAD, budget_per_window,
    split_wait,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    programs::RawTracePoint,
};

use super::{KernelPrograms, attach, bits::TargetBits};
use crate::{
    collect::Waits,
    error::{Error, Result, one_line},
    sys::btf::Btf,
};

/// GIL and lock waits (they come in storms: every GIL hand-over is one) take the
/// thread's stack read at a switch less than this long before.
pub const RECENT: std::time::Duration = std::time::Duration::from_millis(10);

/// Switches off the CPU per second of one thread on a CPU followed in full by default
/// (`--switch-budget`, `off_cpu.switch_budget`): a thread-per-connection server hands the
/// GIL over thousands of times a second, and following each costs it an eighth of its
/// throughput. A thread that switched faster in its previous second on a CPU (or has in
/// the current one) is not followed: the wall-clock sampler counts its time off the CPU at
/// the sampling rate instead (the summary says so). 0 follows every switch.
pub const DEFAULT_SWITCH_BUDGET: u32 = 100;

/// The kernel structs whose member offsets the off-CPU programs need.
pub(crate) const BTF_STRUCTS: &[&str] = &[
    "task_struct",
    "thread_info",
    "sched_entity",
    "sched_info",
    "cfs_rq",
    "rq",
    "files_struct",
    "fdtable",
    "file",
    "inode",
    "socket",
];

/// Struct member offsets from BTF; what is not found stays `NO_OFFSET` (that detail is
/// then not read; without the scheduler's figures `watch_off_cpu` needs the program is not
/// attached).
pub(crate) fn config(btf: Option<&Btf>, measure_cost: bool) -> OffConfig {
    let mut c = OffConfig::UNKNOWN;
    c.measure_cost = u32::from(measure_cost);
    c.recent_us = RECENT.as_micros() as u32;
    let Some(btf) = btf else { return c };
    let member = |ty: &str, m: &str| btf.member_offset(ty, m).unwrap_or(NO_OFFSET);
    let sum = |a: u32, b: u32| if a == NO_OFFSET || b == NO_OFFSET { NO_OFFSET } else { a + b };
    c.task_throttled = member("task_struct", "throttled");
    c.task_cfs_rq = sum(member("task_struct", "se"), member("sched_entity", "cfs_rq"));
    c.task_sum_exec = sum(member("task_struct", "se"), member("sched_entity", "sum_exec_runtime"));
    let info = |m: &str| sum(member("task_struct", "sched_info"), member("sched_info", m));
    c.task_pcount = info("pcount");
    c.task_run_delay = info("run_delay");
    c.task_last_arrival = info("last_arrival");
    c.task_last_queued = info("last_queued");
    c.cfs_rq_rq = member("cfs_rq", "rq");
    c.rq_clock = member("rq", "clock");
    c.cfs_rq_throttle_count = member("cfs_rq", "throttle_count");
    c.task_files = member("task_struct", "files");
    c.files_fdt = member("files_struct", "fdt");
    c.fdt_max_fds = member("fdtable", "max_fds");
    c.fdt_fd = member("fdtable", "fd");
    c.file_private_data = member("file", "private_data");
    c.file_inode = member("file", "f_inode");
    c.inode_mode = member("inode", "i_mode");
    c.socket_sk = member("socket", "sk");
    c.task_pid = member("task_struct", "pid");
    c.task_tgid = member("task_struct", "tgid");
    c.task_state = member("task_struct", "__state");
    c.task_on_cpu = member("task_struct", "on_cpu");
    c.task_cpu = sum(member("task_struct", "thread_info"), member("thread_info", "cpu"));
    c
}

/// An error naming the first of these members (offset, name) the kernel's BTF lacks.
fn require(needed: &[(u32, &str)]) -> Result<()> {
    match needed.iter().find(|(offset, _)| *offset == NO_OFFSET) {
        Some((_, what)) => {
            Err(Error::KernelFeature { feature: "kernel BTF", detail: format!("{what} not found") })
        }
        None => Ok(()),
    }
}

impl KernelPrograms {
    /// Starts following target threads off the CPU (raw tracepoint `sched_switch`): every
    /// wait, but of a thread that switched more than `budget` times a second (0: no limit)
    /// in its previous second on a CPU (or in the current one), whose time off the CPU the
    /// wall-clock sampler counts instead (started with the CPU sampling, `start`). With
    /// `Waits::Sampled`, no switch is followed: the sampler counts every target thread's.
    pub fn watch_off_cpu(&mut self, waits: Waits, budget: u32) -> Result<()> {
        if waits == Waits::Sampled {
            return self.sample_off_cpu();
        }
        let feature = "the sched_switch raw tracepoint (Linux 5.18+)";
        let c = &self.off_config;
        let needed = [
            (c.task_pcount, "task_struct.sched_info (CONFIG_SCHED_INFO)"),
            (c.task_run_delay, "sched_info.run_delay"),
            (c.task_last_arrival, "sched_info.last_arrival"),
            (c.task_sum_exec, "sched_entity.sum_exec_runtime"),
            (c.task_cfs_rq, "sched_entity.cfs_rq (CONFIG_FAIR_GROUP_SCHED)"),
            (c.cfs_rq_rq, "cfs_rq.rq (CONFIG_FAIR_GROUP_SCHED)"),
            (c.rq_clock, "rq.clock"),
        ];
        require(&needed)?;
        self.set_budget(budget_per_window(budget))?;
        let name = PROG_SCHED_SWITCH;
        let prog: &mut RawTracePoint = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(Error::Ebpf { what: "kernel program missing", detail: name.into() })?;
        prog.load().map_err(|e| attach::load_error("loading the off-CPU program", &e))?;
        prog.attach(name)
            .map_err(|e| Error::KernelFeature { feature, detail: format!("{name}: {}", one_line(&e)) })?;
        let pending = self
            .ebpf
            .map(MAP_OFF_PENDING)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_OFF_PENDING.into() })?;
        self.off_pending = Some(TargetBits::map_named(pending, MAP_OFF_PENDING)?);
        self.watching_off_cpu = true;
        if budget > 0 {
            // Threads over the budget are sampled by the clock instead (`wall`); without
            // the sampler, every switch is followed.
            match self.load_wall_sampler() {
                Ok(fd) => {
                    self.wall_prog = Some(fd);
                    self.start_wall_sampler()?;
                }
                Err(e) => {
                    tracing::warn!("threads that switch fast are followed in full: {e}");
                    self.set_budget(0)?;
                }
            }
        }
        Ok(())
    }

    /// Starts the wall-clock sampler over every target thread, with no program on context
    /// switches (`Waits::Sampled`).
    fn sample_off_cpu(&mut self) -> Result<()> {
        let c = &self.off_config;
        let needed = [
            (c.task_pid, "task_struct.pid"),
            (c.task_tgid, "task_struct.tgid"),
            (c.task_state, "task_struct.__state"),
            (c.task_on_cpu, "task_struct.on_cpu"),
            (c.task_sum_exec, "sched_entity.sum_exec_runtime"),
        ];
        require(&needed)?;
        self.set_budget(SAMPLE_EVERY_THREAD)?;
        let fd = self.load_wall_sampler()?;
        self.wall_prog = Some(fd);
        self.watching_off_cpu = true;
        self.sampled_waits = true;
        self.start_wall_sampler()
    }

    /// Sets the first slot of `MAP_OFF_BUDGET`: the switch budget per window, or
    /// `SAMPLE_EVERY_THREAD`.
    fn set_budget(&mut self, value: u64) -> Result<()> {
        let mut slot: Array<&mut MapData, u64> = self.map_mut(MAP_OFF_BUDGET)?;
        slot.set(0, value, 0)
            .map_err(|e| Error::Ebpf { what: "setting the switch budget", detail: one_line(&e) })
    }

    /// Whether waits are sampled by the clock only (`Waits::Sampled`).
    pub fn sampled_waits(&self) -> bool {
        self.sampled_waits
    }

    /// Loads the wall-clock sampler's task iterator (sleepable: Linux 5.18+ reads another
    /// task's memory); its program's descriptor.
    fn load_wall_sampler(&mut self) -> Result<std::os::fd::OwnedFd> {
        let feature = "sleepable task iterators (Linux 5.18+)";
        let btf = aya::Btf::from_sys_fs()
            .map_err(|e| Error::KernelFeature { feature: "kernel BTF", detail: one_line(&e) })?;
        let prog: &mut aya::programs::Iter = self
            .ebpf
            .program_mut(PROG_OFF_CPU_SAMPLE)
            .and_then(|p| p.try_into().ok())
            .ok_or(Error::Ebpf { what: "kernel program missing", detail: PROG_OFF_CPU_SAMPLE.into() })?;
        prog.load("task", &btf).map_err(|e| Error::KernelFeature { feature, detail: one_line(&e) })?;
        let fd =
            prog.fd().map_err(|e| Error::Ebpf { what: "the sampler's program", detail: one_line(&e) })?;
        use std::os::fd::AsFd;
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::Ebpf { what: "the sampler's program", detail: e.to_string() })
    }

    /// Enters a wait under way of thread `tid`, seen by no switch (it blocked before the
    /// programs were attached): the kernel counts it as its own at the thread's next switch
    /// or CPU sample, and the final read up to its end. False when the kernel already has a
    /// wait of the thread (it switched meanwhile), or off-CPU times are not watched.
    pub fn enter_wait(&mut self, tid: u32, wait: &OffThread) -> Result<bool> {
        // Sampled waits: the sampler counts a wait under way from its first run.
        if !self.watching_off_cpu || self.sampled_waits {
            return Ok(false);
        }
        let mut threads: HashMap<&mut MapData, u32, OffThread> = self.map_mut(MAP_OFF_THREADS)?;
        // BPF_NOEXIST: a wait the kernel entered meanwhile stays.
        if threads.insert(tid, *wait, 1).is_err() {
            return Ok(false);
        }
        if let Some(pending) = &self.off_pending {
            pending.set(tid);
        }
        Ok(true)
    }

    /// Run time and run count of the context-switch program, when the run-time statistics
    /// are on and the program attached.
    pub fn off_kernel_cost(&self) -> Option<(std::time::Duration, u64)> {
        if !self.watching_off_cpu {
            return None;
        }
        self.run_stats(PROG_SCHED_SWITCH)
    }

    /// Run time and run count of the wall-clock sampler's program (one run per thread of a
    /// target process per sample), when the run-time statistics are on and it runs.
    pub fn sampler_kernel_cost(&self) -> Option<(std::time::Duration, u64)> {
        self.wall.as_ref()?;
        self.run_stats(PROG_OFF_CPU_SAMPLE)
    }

    /// Run time and run count of loaded program `name`, when the run-time statistics are on.
    fn run_stats(&self, name: &str) -> Option<(std::time::Duration, u64)> {
        self.stats_fd.as_ref()?;
        let Some(prog) = self.ebpf.program(name) else {
            tracing::warn!("{name}: missing");
            return None;
        };
        let info = prog.info().inspect_err(|e| tracing::warn!("{name}: {e}")).ok()?;
        Some((info.run_time(), info.run_count()))
    }

    /// Off-CPU nanoseconds by (thread, stacks, reason), waits that ended so far (the
    /// run-queue time after them under `OffKey::queued`), and how many entries of the map
    /// they took.
    pub fn off_counts(&self) -> Result<(Vec<(OffKey, u64)>, usize)> {
        if !self.watching_off_cpu {
            return Ok((Vec::new(), 0));
        }
        let counts: PerCpuHashMap<_, OffKey, OffTime> = self.map(MAP_OFF_COUNTS)?;
        let (mut out, mut entries) = (Vec::new(), 0);
        for (key, per_cpu) in counts.iter().filter_map(|r| r.ok()) {
            entries += 1;
            let waited = per_cpu.iter().map(|t| t.waited).sum();
            let queued: u64 = per_cpu.iter().map(|t| t.queued).sum();
            out.push((key, waited));
            if queued > 0 {
                out.push((key.queued(), queued));
            }
        }
        Ok((out, entries))
    }

    /// Removes these keys from the off-CPU counts (their processes exited, or all of them
    /// when the map is close to full).
    pub fn remove_off(&mut self, keys: &[OffKey]) -> Result<()> {
        if !self.watching_off_cpu {
            return Ok(());
        }
        let mut counts: PerCpuHashMap<_, OffKey, OffTime> = self.map_mut(MAP_OFF_COUNTS)?;
        for key in keys {
            let _ = counts.remove(key);
        }
        Ok(())
    }

    /// Capacity of the off-CPU counts map.
    pub fn off_capacity(&self) -> u32 {
        agent_ebpf::OFF_COUNTS_CAPACITY
    }

    /// The keys of the off-CPU counts, without their times.
    pub fn off_keys(&self) -> Result<Vec<OffKey>> {
        if !self.watching_off_cpu {
            return Ok(Vec::new());
        }
        let counts: PerCpuHashMap<_, OffKey, OffTime> = self.map(MAP_OFF_COUNTS)?;
        Ok(counts.keys().filter_map(|r| r.ok()).collect())
    }

    /// Waits of threads of `pids` not counted yet at `now_ns` (CLOCK_MONOTONIC): what they
    /// add up to so far, split as the kernel does. A wait under way counts to
    /// now; one that ended since the thread's last switch (it has run since, and not left
    /// the CPU) ends where the CPU time it used since says.
    pub fn off_in_flight(&self, pids: &[u32], now_ns: u64) -> Result<Vec<(OffKey, u64)>> {
        if !self.watching_off_cpu {
            return Ok(Vec::new());
        }
        let threads: HashMap<&MapData, u32, OffThread> = self.map(MAP_OFF_THREADS)?;
        let mut out = Vec::new();
        for (tid, t) in threads.iter().filter_map(|r| r.ok()) {
            if t.off_ns == 0 || t.off_ns > now_ns || !pids.contains(&t.key.sample.tgid) {
                continue;
            }
            let mut total = now_ns - t.off_ns;
            let mut queued = 0;
            if let Some(s) = crate::sys::process::schedstat(t.key.sample.tgid, tid)
                && s.arrivals != t.arrivals_before
            {
                total = total.saturating_sub(s.ran_ns.saturating_sub(t.ran_before));
                queued = s.queued_ns.saturating_sub(t.queued_before);
            }
            let (waited, queued) = split_wait(t.key.reason, total, queued);
            out.push((t.key, waited));
            if queued > 0 {
                out.push((t.key.queued(), queued));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_switch_programs_members_in_this_kernel() {
        let btf = Btf::from_sys_fs(BTF_STRUCTS).expect("this kernel exposes BTF");
        let c = config(Some(&btf), false);
        // Who leaves the CPU, what the scheduler recorded of it, and its descriptor table.
        let needed = [
            c.task_pid,
            c.task_tgid,
            c.task_pcount,
            c.task_run_delay,
            c.task_last_arrival,
            c.task_sum_exec,
            c.task_cfs_rq,
            c.cfs_rq_rq,
            c.rq_clock,
            c.task_files,
            c.files_fdt,
            c.fdt_max_fds,
            c.fdt_fd,
            c.file_private_data,
            c.file_inode,
            c.inode_mode,
            c.socket_sk,
        ];
        assert!(needed.iter().all(|&o| o != NO_OFFSET), "{c:?}");
        assert_ne!(c.task_pid, c.task_tgid, "{c:?}");
    }
}
