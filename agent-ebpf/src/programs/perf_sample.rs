//! CPU sampling: a perf-event program on the cpu-clock of every CPU. Samples of target
//! processes are aggregated in the kernel as (thread, user stack, kernel stack) -> per-CPU count.
use agent_ebpf::{DROPPED_STACK, NO_STACK, SampleKey, stat};
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_get_current_pid_tgid,
    macros::perf_event,
    programs::{PerfEventContext, tracing::StackIdContext},
};
use aya_log_ebpf::warn;

use crate::{
    maps::{COUNTS, PY_PROCS, PY_STACKS, STACKS, TARGETS, bump},
    python,
};

const EFAULT: i32 = 14;

#[perf_event]
pub fn perf_sample(ctx: PerfEventContext) -> u32 {
    try_perf_sample(&ctx).unwrap_or(0)
}

fn try_perf_sample(ctx: &PerfEventContext) -> Result<u32, i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // The filter comes first: non-target tasks (and the idle task) cost one lookup.
    if tid == 0 || TARGETS.get_ptr(tgid).is_none() {
        return Ok(0);
    }
    bump(stat::SAMPLES);

    let user_stack_id = match ctx.get_stackid(&STACKS, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id as i32,
        Err(err) if -err == EFAULT => {
            bump(stat::USER_STACK_MISSING);
            NO_STACK
        }
        Err(_) => {
            bump(stat::STACK_DROPPED);
            DROPPED_STACK
        }
    };
    // A sample taken in user mode has no kernel frames: that is not a loss.
    let kernel_stack_id = match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(err) if -err == EFAULT => NO_STACK,
        Err(_) => {
            bump(stat::STACK_DROPPED);
            DROPPED_STACK
        }
    };

    let mut py_stack = 0;
    if let Some(proc) = unsafe { PY_PROCS.get(&tgid) }
        && let Some((stack, hash)) = python::walk(tid, proc)
    {
        bump(stat::PY_SAMPLES);
        if PY_STACKS.get_ptr(&hash).is_some()
            || PY_STACKS.insert(&hash, stack, u64::from(BPF_NOEXIST)).is_ok()
        {
            py_stack = hash;
        } else if PY_STACKS.get_ptr(&hash).is_some() {
            py_stack = hash; // another CPU stored the same stack first
        } else {
            bump(stat::PY_STACKS_FULL);
        }
    }

    let key = SampleKey { tgid, tid, user_stack_id, kernel_stack_id, py_stack };
    // Per-CPU values: this CPU's slot is only ever touched here, so no atomics needed.
    if let Some(count) = COUNTS.get_ptr_mut(&key) {
        unsafe { *count += 1 };
    } else if COUNTS.insert(&key, &1, u64::from(BPF_NOEXIST)).is_err() {
        // Either another CPU created the key just now (add to our slot), or the map is full.
        if let Some(count) = COUNTS.get_ptr_mut(&key) {
            unsafe { *count += 1 };
        } else if bump(stat::COUNTS_FULL) == 0 {
            warn!(ctx, "counts map full: further new stacks are dropped on this CPU");
        }
    }
    Ok(0)
}
