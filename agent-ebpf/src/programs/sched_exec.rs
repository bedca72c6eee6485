//! Tells userspace which processes just called exec, so the node agent looks at a new
//! Python process right away instead of at its next /proc scan.
use agent_ebpf::stat;
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use crate::maps::{EXECS, bump};

#[tracepoint]
pub fn sched_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if EXECS.insert(tgid, 0, 0).is_err() {
        bump(stat::EXECS_FULL);
    }
    0
}
