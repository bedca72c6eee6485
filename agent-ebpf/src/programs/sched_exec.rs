//! Tells userspace which processes just called exec, so it looks at the new program at
//! once (a short-lived process is walked from its first samples): a target's exec always,
//! every exec when userspace asked (the node agent, `--all-python`). A target's Python
//! layout was the old program's, so it goes (and the GIL address its switches keep); a
//! target marked `TARGET_INHERIT` stops being one.
use agent_ebpf::{TARGET_INHERIT, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{EXEC_ALL, EXEC_RING, PY_PROCS, TARGETS, bump, forget_pace, is_target, unmark_target};

#[tracepoint]
pub fn sched_exec(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let target = is_target(tgid);
    if target {
        // (The thread that called exec, the only one left, has taken the process's id.)
        forget_pace(pid_tgid as u32);
        // Gone before userspace hears of the exec: what it configures for the new program
        // is not removed after it.
        let _ = PY_PROCS.remove(tgid);
        // SAFETY: the value is copied at once: a `u32`, valid for any bits, in a preallocated
        // hash map, which keeps it allocated even if userspace removes the entry meanwhile.
        let flags = unsafe { TARGETS.get(tgid) }.copied().unwrap_or(0);
        if flags & TARGET_INHERIT != 0 {
            let _ = TARGETS.remove(tgid);
            unmark_target(tgid);
        }
    } else if EXEC_ALL.get(0).copied().unwrap_or(0) == 0 {
        return 0;
    }
    // Flags 0: userspace is woken when it waits on the ring.
    // SAFETY: a helper without arguments.
    let event = [u64::from(tgid), unsafe { bpf_ktime_get_ns() }];
    if EXEC_RING.output::<[u64; 2]>(&event, 0).is_err() {
        bump(stat::EXECS_FULL);
    }
    0
}
