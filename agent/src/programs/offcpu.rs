//! The off-CPU programs: where they find what they read in this kernel (record fields,
//! BTF members), attaching them, and reading the waits they aggregated.
use agent_ebpf::{
    MAP_OFF_BUDGET, MAP_OFF_COUNTS, MAP_OFF_THREADS, NO_OFFSET, OffConfig, OffKey, OffThread,
    PROG_SCHED_SWITCH, PROG_SCHED_WAKEUP, budget_per_window, reason, weighted,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    programs::RawTracePoint,
};

use super::{KernelPrograms, attach};
use crate::{
    error::{Error, Result, one_line},
    sys::btf::Btf,
};

/// GIL and lock waits (they come in storms: every GIL hand-over is one) take the
/// thread's stack read at a switch less than this long before.
pub const RECENT: std::time::Duration = std::time::Duration::from_millis(10);

/// Switches off the CPU per second of one thread followed in full by default: all of them
/// (0), so that every wait is measured. A budget (`--switch-budget`, `off_cpu.switch_budget`)
/// bounds the cost on threads that switch thousands of times a second: beyond it their
/// switches are sampled at random and the waits followed weighted for the others.
pub const DEFAULT_SWITCH_BUDGET: u32 = 0;

/// The kernel structs whose member offsets the off-CPU programs need.
pub(crate) const BTF_STRUCTS: &[&str] =
    &["task_struct", "sched_entity", "cfs_rq", "files_struct", "fdtable", "file", "inode", "socket"];

/// Struct member offsets from BTF; what is not found stays `NO_OFFSET` (that detail is
/// then not read; without `task_struct.pid` the programs are not attached).
pub(crate) fn config(btf: Option<&Btf>, measure_cost: bool) -> OffConfig {
    let mut c = OffConfig::UNKNOWN;
    c.measure_cost = u32::from(measure_cost);
    c.recent_us = RECENT.as_micros() as u32;
    let Some(btf) = btf else { return c };
    let member = |ty: &str, m: &str| btf.member_offset(ty, m).unwrap_or(NO_OFFSET);
    let sum = |a: u32, b: u32| if a == NO_OFFSET || b == NO_OFFSET { NO_OFFSET } else { a + b };
    c.task_pid = member("task_struct", "pid");
    c.task_throttled = member("task_struct", "throttled");
    c.task_cfs_rq = sum(member("task_struct", "se"), member("sched_entity", "cfs_rq"));
    c.task_sum_exec = sum(member("task_struct", "se"), member("sched_entity", "sum_exec_runtime"));
    c.task_prev_sum_exec = sum(member("task_struct", "se"), member("sched_entity", "prev_sum_exec_runtime"));
    c.cfs_rq_throttle_count = member("cfs_rq", "throttle_count");
    c.task_files = member("task_struct", "files");
    c.files_fdt = member("files_struct", "fdt");
    c.fdt_max_fds = member("fdtable", "max_fds");
    c.fdt_fd = member("fdtable", "fd");
    c.file_private_data = member("file", "private_data");
    c.file_inode = member("file", "f_inode");
    c.inode_mode = member("inode", "i_mode");
    c.socket_sk = member("socket", "sk");
    c
}

impl KernelPrograms {
    /// Starts following target threads off the CPU (raw tracepoints `sched_switch` and
    /// `sched_wakeup`): every switch of a thread that switches at most `budget` times a
    /// second (0: no limit), a random share of them beyond it.
    pub fn watch_off_cpu(&mut self, budget: u32) -> Result<()> {
        let feature = "the sched_switch and sched_wakeup raw tracepoints (Linux 5.18+)";
        if self.off_config.task_pid == NO_OFFSET {
            return Err(Error::KernelFeature {
                feature: "kernel BTF",
                detail: "task_struct.pid not found".into(),
            });
        }
        let mut limit: Array<&mut MapData, u64> = self.map_mut(MAP_OFF_BUDGET)?;
        limit
            .set(0, budget_per_window(budget), 0)
            .map_err(|e| Error::Ebpf { what: "setting the switch budget", detail: one_line(&e) })?;
        for name in [PROG_SCHED_WAKEUP, PROG_SCHED_SWITCH] {
            let prog: &mut RawTracePoint = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(Error::Ebpf { what: "kernel program missing", detail: name.into() })?;
            prog.load().map_err(|e| attach::load_error("loading the off-CPU programs", &e))?;
            prog.attach(name)
                .map_err(|e| Error::KernelFeature { feature, detail: format!("{name}: {}", one_line(&e)) })?;
        }
        self.watching_off_cpu = true;
        Ok(())
    }

    /// Run time and run count of the context-switch and wake-up programs, when the run-time
    /// statistics are on and the programs attached.
    pub fn off_kernel_cost(&mut self) -> Option<[(std::time::Duration, u64); 2]> {
        if !self.watching_off_cpu {
            return None;
        }
        self.stats_fd.as_ref()?;
        let mut cost = [(std::time::Duration::ZERO, 0); 2];
        for (slot, name) in cost.iter_mut().zip([PROG_SCHED_SWITCH, PROG_SCHED_WAKEUP]) {
            let Some(prog) = self.ebpf.program_mut(name) else {
                tracing::warn!("{name}: missing");
                return None;
            };
            let prog: &mut RawTracePoint = match prog.try_into() {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("{name}: {e}");
                    return None;
                }
            };
            let info = prog.info().inspect_err(|e| tracing::warn!("{name}: {e}")).ok()?;
            *slot = (info.run_time(), info.run_count());
        }
        Some(cost)
    }

    /// Off-CPU nanoseconds by (thread, stacks, reason), waits that ended so far.
    pub fn off_counts(&self) -> Result<Vec<(OffKey, u64)>> {
        if !self.watching_off_cpu {
            return Ok(Vec::new());
        }
        let counts: PerCpuHashMap<_, OffKey, u64> = self.map(MAP_OFF_COUNTS)?;
        Ok(counts.iter().filter_map(|r| r.ok()).map(|(key, per_cpu)| (key, per_cpu.iter().sum())).collect())
    }

    /// Removes these keys from the off-CPU counts (their processes exited, or all of them
    /// when the map is close to full).
    pub fn remove_off(&mut self, keys: &[OffKey]) -> Result<()> {
        if !self.watching_off_cpu {
            return Ok(());
        }
        let mut counts: PerCpuHashMap<_, OffKey, u64> = self.map_mut(MAP_OFF_COUNTS)?;
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
        let counts: PerCpuHashMap<_, OffKey, u64> = self.map(MAP_OFF_COUNTS)?;
        Ok(counts.keys().filter_map(|r| r.ok()).collect())
    }

    /// Waits still under way at `now_ns` (CLOCK_MONOTONIC) of threads of `pids`: what they
    /// add up to so far, split and weighted as the kernel would when the thread runs again.
    pub fn off_in_flight(&self, pids: &[u32], now_ns: u64) -> Result<Vec<(OffKey, u64)>> {
        if !self.watching_off_cpu {
            return Ok(Vec::new());
        }
        let threads: HashMap<&MapData, u32, OffThread> = self.map(MAP_OFF_THREADS)?;
        let mut out = Vec::new();
        for (_, t) in threads.iter().filter_map(|r| r.ok()) {
            if t.off_ns == 0 || t.off_ns > now_ns || !pids.contains(&t.key.sample.tgid) {
                continue;
            }
            let weighted = |ns| weighted(ns, t.weight);
            if t.wake_ns > t.off_ns && t.wake_ns <= now_ns {
                out.push((t.key, weighted(t.wake_ns - t.off_ns)));
                let queued = OffKey { reason: reason::RUNQUEUE, port: 0, family: 0, addr: [0; 16], ..t.key };
                out.push((queued, weighted(now_ns - t.wake_ns)));
            } else {
                out.push((t.key, weighted(now_ns - t.off_ns)));
            }
        }
        Ok(out)
    }
}
