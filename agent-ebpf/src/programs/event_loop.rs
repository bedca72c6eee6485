//! Blocked event loops: a thread that waits for events (`epoll_wait` and kin: asyncio,
//! gevent, uvloop) is busy from each wait's return to the next wait's call; a stretch longer
//! than the threshold goes to userspace with the Python stack its CPU samples saw most.
use agent_ebpf::{LOOP_STACK_SLOTS, LoopBlock, LoopThread, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{LOOP_BLOCKS, LOOP_THRESHOLD, LOOPS, bump, is_target};

/// The threshold in nanoseconds (0: loops are not watched).
#[inline(always)]
fn threshold() -> u64 {
    LOOP_THRESHOLD.get(0).copied().unwrap_or(0)
}

/// Entry of an event wait: the stretch since the last one returned ends.
#[tracepoint]
pub fn loop_enter(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !is_target(tgid) {
        return 0;
    }
    let Some(t) = LOOPS.get_ptr_mut(tid) else { return 0 };
    // SAFETY: a value of the preallocated LRU map from a successful lookup: it stays
    // allocated as long as the map; plain integers. Only this thread's calls (in its own
    // context) and its CPU samples touch it.
    let t = unsafe { &mut *t };
    let since = t.busy_since;
    t.busy_since = 0;
    if since == 0 {
        return 0;
    }
    // SAFETY: the helper takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let duration = now.saturating_sub(since);
    if duration < threshold() {
        return 0;
    }
    // The stack sampled most in the stretch.
    let (mut best, mut best_count) = (0u64, 0u32);
    let mut total = 0u32;
    for i in 0..LOOP_STACK_SLOTS {
        total += t.counts[i];
        if t.counts[i] > best_count {
            best = t.stacks[i];
            best_count = t.counts[i];
        }
    }
    let block = LoopBlock {
        tgid,
        tid,
        start_ns: since,
        duration_ns: duration,
        py_stack: best,
        samples: total,
        _pad: 0,
    };
    if LOOP_BLOCKS.output::<LoopBlock>(block, 0).is_err() {
        bump(stat::LOOP_BLOCKS_LOST);
    }
    0
}

/// Return of an event wait: the thread is busy from now on.
#[tracepoint]
pub fn loop_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: the helper takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    match LOOPS.get_ptr_mut(tid) {
        Some(t) => {
            // SAFETY: as in `loop_enter`.
            let t = unsafe { &mut *t };
            t.busy_since = now;
            t.stacks = [0; LOOP_STACK_SLOTS];
            t.counts = [0; LOOP_STACK_SLOTS];
        }
        None => {
            let t =
                LoopThread { busy_since: now, stacks: [0; LOOP_STACK_SLOTS], counts: [0; LOOP_STACK_SLOTS] };
            let _ = LOOPS.insert(tid, t, 0);
        }
    }
    0
}

/// A CPU sample of thread `tid` with Python stack `hash`: counted in its stretch if it is an
/// event-loop thread away from its wait (one lookup otherwise; none when loops are off).
#[inline(always)]
pub fn sampled(tid: u32, hash: u64) {
    if hash == 0 || threshold() == 0 {
        return;
    }
    let Some(t) = LOOPS.get_ptr_mut(tid) else { return };
    // SAFETY: as in `loop_enter`; the sample interrupts the thread itself.
    let t = unsafe { &mut *t };
    if t.busy_since == 0 {
        return;
    }
    // The same stack, an empty slot, or else the least counted slot's place (the counts
    // are approximate then, the most sampled stack still wins).
    let mut slot = 0;
    let mut least = u32::MAX;
    for i in 0..LOOP_STACK_SLOTS {
        if t.stacks[i] == hash || t.counts[i] == 0 {
            slot = i;
            break;
        }
        if t.counts[i] < least {
            least = t.counts[i];
            slot = i;
        }
    }
    if t.stacks[slot] != hash {
        t.stacks[slot] = hash;
    }
    t.counts[slot] = t.counts[slot].saturating_add(1);
}
