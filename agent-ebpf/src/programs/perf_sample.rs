//! CPU sampling: a perf-event program on the cpu-clock of every CPU. Samples of target
//! processes are aggregated in the kernel as (thread, user stack, kernel stack, Python
//! stack) -> per-CPU count.
use agent_ebpf::{
    DROPPED_STACK, NO_STACK, PY_PROC_GIL_COUNT, PY_PROC_GIL_ONLY, PY_PROC_NATIVE, PyProc, SampleKey, stat,
};
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::perf_event,
    programs::{PerfEventContext, tracing::StackIdContext},
};
use aya_log_ebpf::warn;

use super::{
    current_task, event_loop, loader_global, offcpu,
    python::{self, LOCAL},
};
use crate::maps::{COUNTS, GIL_HELD, PY_PROCS, PY_STACKS, STACKS, add, bump, is_target, new_key};

const EFAULT: i32 = 14;

/// 1 to time each target sample into `stat::TARGET_NS` (set by the loader; read-only, so
/// the verifier drops the timing code when it is 0).
#[unsafe(no_mangle)]
static MEASURE_COST: u32 = 0;

#[perf_event]
pub fn perf_sample(ctx: PerfEventContext) -> u32 {
    let measure = loader_global(&MEASURE_COST) != 0;
    // SAFETY: the helper takes no arguments and only reads the clock.
    let start = if measure { unsafe { bpf_ktime_get_ns() } } else { 0 };
    if let Ok(true) = try_perf_sample(&ctx)
        && measure
    {
        // SAFETY: as above.
        add(stat::TARGET_NS, unsafe { bpf_ktime_get_ns() }.wrapping_sub(start));
    }
    0
}

/// Handles one sample; true when it was a target's.
fn try_perf_sample(ctx: &PerfEventContext) -> Result<bool, i32> {
    let task = current_task();
    let (tgid, tid) = offcpu::task_ids(task);
    // The filter comes first: non-target tasks (and the idle task) cost one lookup.
    if tid == 0 || !is_target(tgid) {
        return Ok(false);
    }
    bump(stat::SAMPLES);
    // A wait of this thread that ended since it last left the CPU counts from now on.
    offcpu::sampled(task, tgid, tid);

    // SAFETY: as in `python_stack`.
    if let Some(proc) = unsafe { PY_PROCS.get(tgid) } {
        // `--gil`: only the samples of the thread that holds the GIL count.
        if proc.flags & PY_PROC_GIL_ONLY != 0 && !python::holds_gil(task, tid, proc) {
            bump(stat::GIL_NOT_HELD);
            return Ok(true);
        }
        // The agent's GIL-held time: the samples of the holder, per process.
        if proc.flags & PY_PROC_GIL_COUNT != 0 && python::gil_holder(task, tid, proc) == Some(true) {
            add_gil_held(tgid);
        }
    }

    // Python first: a sample with a Python stack needs no native stacks unless asked.
    let (py_stack, want_native) = python_stack(task, tgid, tid);
    if py_stack != 0 {
        bump(stat::PY_SAMPLES);
        event_loop::sampled(tid, py_stack);
    }
    let (user_stack_id, kernel_stack_id) =
        if want_native { (user_stack(ctx), kernel_stack(ctx)) } else { (NO_STACK, NO_STACK) };

    let key = SampleKey { tgid, tid, user_stack_id, kernel_stack_id, py_stack };
    // Per-CPU values: this CPU's slot is only ever touched here, so no atomics needed.
    if let Some(count) = COUNTS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU hash map entry: live and aligned (preallocated
        // map), and only this run touches it (tracing programs never nest on one CPU).
        unsafe { *count += 1 };
    } else if COUNTS.insert(key, 1, u64::from(BPF_NOEXIST)).is_ok() {
        new_key(&key);
    } else if let Some(count) = COUNTS.get_ptr_mut(key) {
        // Another CPU created the key just now: add to this CPU's slot.
        // SAFETY: as above.
        unsafe { *count += 1 };
    } else if bump(stat::COUNTS_FULL) == 0 {
        // The map is full.
        warn!(ctx, "counts map full: further new stacks are dropped on this CPU");
    }
    Ok(true)
}

/// One more CPU sample of process `tgid`'s GIL holder.
#[inline(always)]
fn add_gil_held(tgid: u32) {
    if let Some(count) = GIL_HELD.get_ptr_mut(tgid) {
        // SAFETY: this CPU's value of a per-CPU hash map entry, as for `COUNTS` below.
        unsafe { *count += 1 };
    } else if GIL_HELD.insert(tgid, 1, u64::from(BPF_NOEXIST)).is_err()
        && let Some(count) = GIL_HELD.get_ptr_mut(tgid)
    {
        // Another CPU created the entry just now.
        // SAFETY: as above.
        unsafe { *count += 1 };
    }
}

/// Walks and stores the current thread's Python stack (`task`, as `current_task` gave it):
/// its hash (0: none) and whether the native stacks are wanted too (no Python stack, or the
/// process asked for them).
#[inline(always)]
fn python_stack(task: *const u8, tgid: u32, tid: u32) -> (u64, bool) {
    // SAFETY: a value of the preallocated `PY_PROCS`, which keeps it allocated as long as the
    // map even if userspace removes or rewrites the entry meanwhile; `PyProc` is plain integers,
    // so any bytes it then holds are a valid value, and the walker uses them only as addresses
    // for probe reads, which check them, and as sizes it clamps.
    match unsafe { PY_PROCS.get(tgid) } {
        Some(proc) => {
            python_stack_from::<LOCAL>(task, tgid, proc, python::innermost::<LOCAL>(task, tid, proc))
        }
        None => (0, true),
    }
}

/// Walks and stores the Python stack of a thread (`task`, see `python::REMOTE`) of process
/// `proc` from its innermost frame, found already (`python::innermost`); as `python_stack`.
#[inline(always)]
pub(super) fn python_stack_from<const REMOTE: bool>(
    task: *const u8,
    tgid: u32,
    proc: &PyProc,
    innermost: Option<u64>,
) -> (u64, bool) {
    if let Some((stack, hash)) = python::walk::<REMOTE>(task, tgid, proc, innermost) {
        let stored = PY_STACKS.get_ptr(hash).is_some()
            || PY_STACKS.insert(hash, stack, u64::from(BPF_NOEXIST)).is_ok()
            // Another CPU may have stored the same stack in between.
            || PY_STACKS.get_ptr(hash).is_some();
        if stored {
            return (hash, proc.flags & PY_PROC_NATIVE != 0);
        }
        bump(stat::PY_STACKS_FULL);
    }
    (0, true)
}

/// Stores the current thread's user stack; returns its id (negative: absent or dropped).
#[inline(always)]
pub(super) fn user_stack<C: StackIdContext>(ctx: &C) -> i32 {
    match ctx.get_stackid(&STACKS, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id as i32,
        Err(err) if -err == EFAULT => {
            bump(stat::USER_STACK_MISSING);
            NO_STACK
        }
        Err(_) => {
            bump(stat::STACK_DROPPED);
            DROPPED_STACK
        }
    }
}

/// Stores the current kernel stack; returns its id (negative: absent or dropped).
#[inline(always)]
pub(super) fn kernel_stack<C: StackIdContext>(ctx: &C) -> i32 {
    // A sample taken in user mode has no kernel frames: that is not a loss.
    match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(err) if -err == EFAULT => NO_STACK,
        Err(_) => {
            bump(stat::STACK_DROPPED);
            DROPPED_STACK
        }
    }
}
