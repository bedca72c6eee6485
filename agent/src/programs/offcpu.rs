//! The off-CPU programs: where they find what they read in this kernel (record fields,
//! BTF members), attaching them, and reading the waits they aggregated.
use agent_ebpf::{
    MAP_OFF_COUNTS, MAP_OFF_THREADS, NO_OFFSET, OffConfig, OffKey, OffThread, PROG_SCHED_SWITCH,
    PROG_SCHED_WAKEUP, reason,
};
use aya::maps::{HashMap, MapData, PerCpuHashMap};

use super::{KernelPrograms, attach};
use crate::{
    error::{Error, Result},
    sys::{btf::Btf, tracefs},
};

/// The kernel structs whose member offsets the off-CPU programs need.
pub(crate) const BTF_STRUCTS: &[&str] =
    &["task_struct", "sched_entity", "cfs_rq", "files_struct", "fdtable", "file", "inode", "socket"];

/// Record field offsets from the scheduler tracepoints' format files and struct member
/// offsets from BTF; what is not found stays `NO_OFFSET` (that detail is then not read).
pub(crate) fn config(btf: Option<&Btf>, measure_cost: bool) -> OffConfig {
    let mut c = OffConfig::UNKNOWN;
    let field = |event: &str, name: &str| tracefs::field_offset("sched", event, name).unwrap_or(NO_OFFSET);
    c.switch_prev_state = field("sched_switch", "prev_state");
    c.switch_next_pid = field("sched_switch", "next_pid");
    c.wakeup_pid = field("sched_wakeup", "pid");
    c.measure_cost = u32::from(measure_cost);
    let Some(btf) = btf else { return c };
    let member = |ty: &str, m: &str| btf.member_offset(ty, m).unwrap_or(NO_OFFSET);
    let sum = |a: u32, b: u32| if a == NO_OFFSET || b == NO_OFFSET { NO_OFFSET } else { a + b };
    c.task_throttled = member("task_struct", "throttled");
    c.task_cfs_rq = sum(member("task_struct", "se"), member("sched_entity", "cfs_rq"));
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
    /// Starts following target threads off the CPU (`sched:sched_switch` and
    /// `sched:sched_wakeup`).
    pub fn watch_off_cpu(&mut self) -> Result<()> {
        let feature = "the sched:sched_switch and sched:sched_wakeup tracepoints";
        if self.off_config.switch_prev_state == NO_OFFSET
            || self.off_config.switch_next_pid == NO_OFFSET
            || self.off_config.wakeup_pid == NO_OFFSET
        {
            return Err(Error::KernelFeature {
                feature,
                detail: "their format files could not be read".into(),
            });
        }
        let loading = "loading the off-CPU programs";
        attach::tracepoint(
            &mut self.ebpf,
            PROG_SCHED_WAKEUP,
            &[("sched", "sched_wakeup")],
            feature,
            loading,
        )?;
        attach::tracepoint(
            &mut self.ebpf,
            PROG_SCHED_SWITCH,
            &[("sched", "sched_switch")],
            feature,
            loading,
        )?;
        self.watching_off_cpu = true;
        Ok(())
    }

    /// Off-CPU nanoseconds by (thread, stacks, reason), waits that ended so far.
    pub fn off_counts(&self) -> Result<Vec<(OffKey, u64)>> {
        if !self.watching_off_cpu {
            return Ok(Vec::new());
        }
        let counts: PerCpuHashMap<_, OffKey, u64> = self.map(MAP_OFF_COUNTS)?;
        Ok(counts.iter().filter_map(|r| r.ok()).map(|(key, per_cpu)| (key, per_cpu.iter().sum())).collect())
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
    /// add up to so far, split as the kernel would split them when the thread runs again.
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
            if t.wake_ns > t.off_ns && t.wake_ns <= now_ns {
                out.push((t.key, t.wake_ns - t.off_ns));
                let queued = OffKey { reason: reason::RUNQUEUE, port: 0, family: 0, addr: [0; 16], ..t.key };
                out.push((queued, now_ns - t.wake_ns));
            } else {
                out.push((t.key, now_ns - t.off_ns));
            }
        }
        Ok(out)
    }
}
