//! Follows children: when a target marked `TARGET_FOLLOW` or `TARGET_INHERIT` creates a
//! process (not a thread), the child becomes a target before it first runs, with its
//! parent's Python layout (a fork runs the same program).
use agent_ebpf::{TARGET_FOLLOW, TARGET_INHERIT, stat};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use super::{loader_global, record};
use crate::maps::{FORKED_FROM, PY_PROCS, TARGETS, bump, is_target, mark_target};

/// Offsets of `pid` and `clone_flags` in the tracepoint record, from its format file.
#[unsafe(no_mangle)]
static NEWTASK_PID_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static NEWTASK_FLAGS_OFFSET: u32 = 32;

const CLONE_THREAD: u64 = 0x0001_0000;

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    try_task_newtask(&ctx).unwrap_or(0)
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, i64> {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_target(parent) {
        return Ok(0);
    }
    // SAFETY: the value is copied at once: a `u32`, valid for any bits, in a preallocated hash
    // map, which keeps it allocated even if userspace removes the entry meanwhile.
    let Some(&flags) = (unsafe { TARGETS.get(parent) }) else {
        return Ok(0);
    };
    if flags & (TARGET_FOLLOW | TARGET_INHERIT) == 0 {
        return Ok(0);
    }
    let pid_offset = loader_global(&NEWTASK_PID_OFFSET) as usize;
    let flags_offset = loader_global(&NEWTASK_FLAGS_OFFSET) as usize;
    let clone_flags: u64 = record(ctx, flags_offset)?;
    if clone_flags & CLONE_THREAD != 0 {
        return Ok(0);
    }
    let child: i32 = record(ctx, pid_offset)?;
    if TARGETS.insert(child as u32, flags, 0).is_err() {
        bump(stat::TARGETS_FULL);
        return Ok(0);
    }
    // A fork runs its parent's program at the same addresses: it is walked with the parent's
    // Python layout from its first sample, and named through the parent if it is gone before
    // userspace looks at it.
    // SAFETY: a value of the preallocated `PY_PROCS`, copied by the update from its address
    // (kept allocated as long as the map, see `perf_sample`).
    if let Some(proc) = unsafe { PY_PROCS.get(parent) } {
        let _ = FORKED_FROM.insert(child as u32, parent, 0);
        if PY_PROCS.insert(child as u32, proc, 0).is_err() {
            bump(stat::TARGETS_FULL);
        }
    }
    mark_target(child as u32);
    Ok(0)
}
