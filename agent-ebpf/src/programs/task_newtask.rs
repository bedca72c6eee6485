//! Follows children: when a target marked `TARGET_FOLLOW` creates a process (not a
//! thread), the child becomes a target before it first runs.
use agent_ebpf::{TARGET_FOLLOW, stat};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use crate::maps::{TARGETS, bump, is_target, mark_target};

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
    let Some(&flags) = (unsafe { TARGETS.get(parent) }) else {
        return Ok(0);
    };
    if flags & TARGET_FOLLOW == 0 {
        return Ok(0);
    }
    let pid_offset = unsafe { core::ptr::read_volatile(&NEWTASK_PID_OFFSET) } as usize;
    let flags_offset = unsafe { core::ptr::read_volatile(&NEWTASK_FLAGS_OFFSET) } as usize;
    let clone_flags: u64 = unsafe { ctx.read_at(flags_offset)? };
    if clone_flags & CLONE_THREAD != 0 {
        return Ok(0);
    }
    let child: i32 = unsafe { ctx.read_at(pid_offset)? };
    if TARGETS.insert(child as u32, flags, 0).is_err() {
        bump(stat::TARGETS_FULL);
        return Ok(0);
    }
    mark_target(child as u32);
    Ok(0)
}
