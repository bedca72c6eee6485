//! Tells userspace which processes just called exec, so the node agent looks at a new
//! Python process right away instead of at its next /proc scan; a target marked
//! `TARGET_INHERIT` stops being one (its Python layout was the old program's).
use agent_ebpf::{TARGET_INHERIT, stat};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use crate::maps::{EXECS, PY_PROCS, TARGETS, bump, is_target, unmark_target};

#[tracepoint]
pub fn sched_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if EXECS.insert(tgid, 0, 0).is_err() {
        bump(stat::EXECS_FULL);
    }
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: the value is copied at once: a `u32`, valid for any bits, in a preallocated
    // hash map, which keeps it allocated even if userspace removes the entry meanwhile.
    let flags = unsafe { TARGETS.get(tgid) }.copied().unwrap_or(0);
    if flags & TARGET_INHERIT != 0 {
        let _ = TARGETS.remove(tgid);
        unmark_target(tgid);
        let _ = PY_PROCS.remove(tgid);
    }
    0
}
