//! Off-CPU time of target threads: as one leaves the CPU, `sched_switch` takes its stacks
//! and why it stopped running; at its next switch off the CPU (or its next CPU sample) the
//! wait is added to its (stacks, reason) in `OFF_COUNTS`, ended when the scheduler gave it
//! the CPU again and split at the time it spent in the run queue (both as the scheduler
//! recorded them in the task's `sched_info`). Switches of other threads cost one bit test.
use agent_ebpf::{
    NO_OFFSET, NO_STACK, OFF_BRIEF_SLEEP_NS, OFF_PACE_SLOTS, OFF_TAKE_ALL, OFF_WEIGHT_ONE, OFF_WINDOW_NS,
    OffConfig, OffKey, OffPace, OffThread, OffTime, PY_GIL_SIZE, SampleKey, reason, split_wait, stat,
    weighted,
};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use super::{
    Plain, current_task, loader_global,
    net::{AF_INET, AF_INET6},
    net_syscalls::entry_regs_of,
    perf_sample::{kernel_stack, python_stack, user_stack},
    python, sysno, typed_field,
};
use crate::maps::{
    OFF_BUDGET, OFF_COUNTS, OFF_PACE, OFF_THREADS, PY_PROCS, add, bump, is_pending, is_target, new_key,
    set_pending,
};

/// Where the programs find what they read (set by the loader).
#[unsafe(no_mangle)]
static OFF_CONFIG: OffConfig = OffConfig::UNKNOWN;

// `prev_state`: the task's state as it leaves (`TASK_RUNNING` 0, bits otherwise).
const TASK_INTERRUPTIBLE: u64 = 1;
const TASK_UNINTERRUPTIBLE: u64 = 2;

// File types (`S_IFMT` bits of `i_mode`).
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const S_IFREG: u16 = 0o100000;

// `struct sock_common`: `skc_daddr` 0, `skc_dport` 12, `skc_family` 16, `skc_v6_daddr` 56,
// unchanged since Linux 4.x (members of anonymous unions, which the loader's BTF reader does
// not descend into).
const SKC_DADDR: usize = 0;
const SKC_DPORT: usize = 12;
const SKC_FAMILY: usize = 16;
const SKC_V6_DADDR: u64 = 56;
/// Bytes of `sock_common` read for its first three.
const SKC_HEAD: usize = 24;

#[inline(always)]
fn config(field: &u32) -> u32 {
    loader_global(field)
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments and only reads the clock.
    unsafe { bpf_ktime_get_ns() }
}

/// `now_ns()`, read into `now` the first time (0: not read yet).
#[inline(always)]
fn clock(now: &mut u64) -> u64 {
    if *now == 0 {
        *now = now_ns();
    }
    *now
}

/// While a thread's switches are sampled, the clock is read to see whether its pace window
/// ended at every this many of them (and at each followed one).
const PACE_CHECK_EVERY: u64 = 16;

/// Reads kernel memory at `addr`.
#[inline(always)]
fn kread<T: Plain>(addr: u64) -> Result<T, i64> {
    // SAFETY: the helper checks the kernel address and fails rather than faulting; any bits
    // are a valid `T` (`Plain`).
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(i64::from)
}

/// `base + offset`, or an error when the offset is not known.
#[inline(always)]
fn at(base: u64, offset: u32) -> Result<u64, i64> {
    if offset == NO_OFFSET || base == 0 {
        return Err(0);
    }
    Ok(base.wrapping_add(u64::from(offset)))
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)` (the last argument since Linux 5.18; older kernels refuse to
/// attach a program that reads it).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> u32 {
    let _ = try_sched_switch(&ctx);
    0
}

fn try_sched_switch(ctx: &RawTracePointContext) -> Result<(), i64> {
    // The thread going out is the current one: one bit test unless it is a target's.
    let task = current_task();
    let (tgid, tid) = task_ids(task);
    if tid == 0 || !is_target(tgid) {
        return Ok(());
    }
    let preempt: u64 = ctx.arg(0);
    let state: u64 = ctx.arg::<u64>(3) & 0xffff_ffff;
    if let Some(start) = switched_out(ctx, task, tgid, tid, preempt & 1 != 0 || state == 0, state)
        && config(&OFF_CONFIG.measure_cost) != 0
    {
        add(stat::OFF_NS, now_ns().wrapping_sub(start));
    }
    Ok(())
}

/// The process and thread ids of `task`, the current task as `current_task` gave it: two
/// loads where the offsets are known, else the helper.
#[inline(always)]
pub(super) fn task_ids(task: *const u8) -> (u32, u32) {
    match (
        typed_field::<u32>(task, config(&OFF_CONFIG.task_tgid)),
        typed_field::<u32>(task, config(&OFF_CONFIG.task_pid)),
    ) {
        (Ok(tgid), Ok(tid)) => (tgid, tid),
        _ => {
            let pid_tgid = bpf_get_current_pid_tgid();
            ((pid_tgid >> 32) as u32, pid_tgid as u32)
        }
    }
}

/// A CPU sample of target thread `tid` of process `tgid` (`task`, as `current_task` gave
/// it): a wait of it that ended since its last switch off the CPU is counted now (a thread
/// that runs on without leaving the CPU would otherwise hold it back).
#[inline(always)]
pub(super) fn sampled(task: *const u8, tgid: u32, tid: u32) {
    if is_pending(tid) {
        count_pending(task, tgid, tid);
    }
}

/// Counts the pending wait of thread `tid` of process `tgid` (the current task, which ran
/// since): its `OFF_THREADS` entry, if it still has one.
#[inline(always)]
fn count_pending(task: *const u8, tgid: u32, tid: u32) -> Option<*mut OffThread> {
    set_pending(tid, false);
    let entry = OFF_THREADS.get_ptr_mut(tid)?;
    // SAFETY: a value of the preallocated LRU map from a successful lookup: it stays
    // allocated as long as the map; plain integers. Only this thread's switches and CPU
    // samples touch it, and the thread is on this CPU.
    let t = unsafe { &mut *entry };
    // (An entry of another process is a thread that exited unseen: its id was reused.)
    if t.off_ns != 0 && t.key.sample.tgid == tgid {
        ran_again(t, task);
    }
    Some(entry)
}

/// This CPU's pace slot of thread `tid` of process `tgid`, taken over when another thread
/// had it.
#[inline(always)]
fn pace_of(tgid: u32, tid: u32) -> Option<&'static mut OffPace> {
    let pace = OFF_PACE.get_ptr_mut(tid & (OFF_PACE_SLOTS - 1))?;
    // SAFETY: this CPU's slot of a per-CPU array (index checked by the lookup): live and
    // aligned while the program is loaded, plain integers; only programs on this CPU touch
    // it, and they do not nest.
    let pace = unsafe { &mut *pace };
    if pace.tid != tid || pace.tgid != tgid {
        *pace = OffPace {
            tid,
            tgid,
            gil: 0,
            window_ns: 0,
            window_count: 0,
            take_below: 0,
            weight: OFF_WEIGHT_ONE,
            // SAFETY: the helper takes no arguments and only returns a pseudo-random number.
            rng: u64::from(unsafe { bpf_get_prandom_u32() }) << 32 | u64::from(tid) | 1,
        };
    }
    Some(pace)
}

/// The pace slot of the thread of a switch, looked up (`pace_of`) at its first use in the
/// switch: a GIL wait needs it twice (the GIL's address, then the budget), other waits not
/// at all.
struct LazyPace {
    tgid: u32,
    tid: u32,
    looked: bool,
    slot: Option<&'static mut OffPace>,
}

impl LazyPace {
    #[inline(always)]
    fn new(tgid: u32, tid: u32) -> Self {
        LazyPace { tgid, tid, looked: false, slot: None }
    }

    #[inline(always)]
    fn get(&mut self) -> Option<&mut OffPace> {
        if !self.looked {
            self.looked = true;
            self.slot = pace_of(self.tgid, self.tid);
        }
        self.slot.as_deref_mut()
    }
}

/// A target thread leaves the CPU, `runnable` or blocked in `state`: notes why and with
/// which stacks. The time it left when its wait is followed.
#[inline(always)]
fn switched_out(
    ctx: &RawTracePointContext,
    task: *const u8,
    tgid: u32,
    tid: u32,
    runnable: bool,
    state: u64,
) -> Option<u64> {
    // Its previous wait (followed) ended when it got the CPU: counted now.
    let mut entry = if is_pending(tid) { count_pending(task, tgid, tid) } else { None };
    // Stopped, traced and exiting threads are not waiting for anything.
    if !runnable && state & (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE) == 0 {
        return None;
    }
    let mut key = OffKey {
        sample: SampleKey { tgid, tid, user_stack_id: NO_STACK, kernel_stack_id: NO_STACK, py_stack: 0 },
        reason: reason::OTHER,
        port: 0,
        family: 0,
        addr: [0; 16],
    };
    let mut now = 0;
    // A sleep asked for under `OFF_BRIEF_SLEEP_NS`.
    let mut brief = false;
    let mut pace = LazyPace::new(tgid, tid);
    key.reason = if runnable {
        if throttled(task) { reason::THROTTLED } else { reason::RUNQUEUE }
    } else if state & TASK_UNINTERRUPTIBLE != 0 {
        reason::DISK
    } else {
        blocked_reason(&mut key, task, tgid, &mut pace, entry_regs_of(task), &mut brief, &mut now)
    };
    // The budget samples the waits that come in storms, brief each (GIL hand-overs,
    // preemptions, sleeps asked for under `OFF_BRIEF_SLEEP_NS`); every other wait (a socket,
    // a poll, a longer sleep, a lock, the disk, a spent CPU quota) is followed, however fast
    // the thread switches.
    let stormy = match key.reason {
        reason::GIL | reason::RUNQUEUE => true,
        reason::SLEEP => brief,
        _ => false,
    };
    let weight = if stormy {
        let pace = pace.get()?;
        if !followed(pace, &mut now) {
            bump(stat::OFF_SAMPLED_OUT);
            return None;
        }
        bump(stat::OFF_BUDGET_FOLLOWED);
        pace.weight
    } else {
        OFF_WEIGHT_ONE
    };
    let now = clock(&mut now);
    if entry.is_none() {
        entry = OFF_THREADS.get_ptr_mut(tid);
    }
    bump(stat::OFF_SWITCHES);

    // The stack the thread had at its previous switch, and when it was last read; the one
    // it had before that.
    let (last, prev) = match entry {
        // SAFETY: as above. The fields are copied out at once.
        Some(t) => unsafe {
            (
                ((*t).key.sample.py_stack, (*t).key.sample.user_stack_id, (*t).py_signature, (*t).walked_ns),
                ((*t).prev_py_stack, (*t).prev_user_stack_id, (*t).prev_signature),
            )
        },
        None => ((0, NO_STACK, 0, 0), (0, NO_STACK, 0)),
    };
    let (last_stack, last_user, last_signature, last_walked) = last;
    let (prev_stack, prev_user, prev_signature) = prev;
    // GIL and lock waits come in storms (every GIL hand-over is one): a thread's stack read
    // less than `recent_us` ago stands for them. Every other wait (a preempted thread was
    // running, its stack moved) has its stack read, or found unchanged, as the thread leaves.
    let frequent = matches!(key.reason, reason::GIL | reason::LOCK);
    let recent = u64::from(config(&OFF_CONFIG.recent_us)) * 1_000;
    let (py_stack, want_native, signature, walked) =
        if frequent && last_stack != 0 && now.wrapping_sub(last_walked) < recent {
            bump(stat::OFF_STACKS_RECENT);
            (last_stack, last_user != NO_STACK, last_signature, last_walked)
        } else {
            // The Python stack: the one read last time when the thread is still in it (the same
            // socket read, the same wait in the same loop), else walked.
            // SAFETY: as in `perf_sample::python_stack`.
            let signature = match unsafe { PY_PROCS.get(tgid) } {
                Some(proc) => python::signature(task, tid, proc).unwrap_or(0),
                None => 0,
            };
            if signature != 0 && signature == last_signature && last_stack != 0 {
                bump(stat::OFF_STACKS_REUSED);
                (last_stack, last_user != NO_STACK, signature, now)
            } else if signature != 0 && signature == prev_signature && prev_stack != 0 {
                bump(stat::OFF_STACKS_REUSED);
                (prev_stack, prev_user != NO_STACK, signature, now)
            } else {
                let (py_stack, want_native) = python_stack(task, tgid, tid);
                (py_stack, want_native, if py_stack != 0 { signature } else { 0 }, now)
            }
        };
    key.sample.py_stack = py_stack;
    if want_native {
        key.sample.user_stack_id = user_stack(ctx);
    }
    // The kernel stack shows where a thread waits that the system call did not say.
    if want_native || key.reason == reason::OTHER {
        key.sample.kernel_stack_id = kernel_stack(ctx);
    }
    let sched = Sched::of(task);
    match entry {
        Some(t) => {
            // SAFETY: as above.
            let t = unsafe { &mut *t };
            if signature != last_signature {
                t.prev_signature = last_signature;
                t.prev_py_stack = last_stack;
                t.prev_user_stack_id = last_user;
            }
            t.key = key;
            t.py_signature = signature;
            t.walked_ns = walked;
            t.weight = weight;
            sched.left(t, task, now);
            set_pending(tid, true);
        }
        None => {
            let mut t = OffThread {
                key,
                off_ns: 0,
                off_clock: 0,
                queued_before: 0,
                arrivals_before: 0,
                ran_before: 0,
                py_signature: signature,
                walked_ns: walked,
                weight,
                prev_signature: 0,
                prev_py_stack: 0,
                prev_user_stack_id: NO_STACK,
                _pad: 0,
            };
            sched.left(&mut t, task, now);
            if OFF_THREADS.insert(tid, t, 0).is_ok() {
                set_pending(tid, true);
            } else {
                bump(stat::OFF_COUNTS_FULL);
            }
        }
    }
    Some(now)
}

/// The scheduler's figures of the current task (0 where unreadable).
struct Sched {
    /// `sched_info.pcount`, `.run_delay`, `.last_arrival`.
    arrivals: u64,
    queued: u64,
    arrived: u64,
}

impl Sched {
    #[inline(always)]
    fn of(task: *const u8) -> Self {
        Sched {
            arrivals: task_u64(task, &OFF_CONFIG.task_pcount),
            queued: task_u64(task, &OFF_CONFIG.task_run_delay),
            arrived: task_u64(task, &OFF_CONFIG.task_last_arrival),
        }
    }

    /// Notes in `t` that its thread (the current task) leaves the CPU now.
    #[inline(always)]
    fn left(&self, t: &mut OffThread, task: *const u8, now: u64) {
        t.off_ns = now;
        t.off_clock = rq_clock(task).unwrap_or(0);
        t.queued_before = self.queued;
        t.arrivals_before = self.arrivals;
        t.ran_before = task_u64(task, &OFF_CONFIG.task_sum_exec);
    }
}

/// The `u64` of `task` at offset `offset` (0 when unknown).
#[inline(always)]
fn task_u64(task: *const u8, offset: &u32) -> u64 {
    typed_field(task, config(offset)).unwrap_or(0)
}

/// The clock of this CPU's run queue (`rq->clock`, updated as the scheduler started the
/// switch under way; the clock of `sched_info.last_arrival`), reached from the current task.
#[inline(always)]
fn rq_clock(task: *const u8) -> Result<u64, i64> {
    let cfs_rq: *const u8 = typed_field(task, config(&OFF_CONFIG.task_cfs_rq))?;
    let rq: *const u8 = typed_field(cfs_rq, config(&OFF_CONFIG.cfs_rq_rq))?;
    typed_field(rq, config(&OFF_CONFIG.rq_clock))
}

/// The thread of `t`, the current task, got the CPU since its wait began (it is on it
/// now): the wait is counted, from when it left to when the scheduler gave it the CPU
/// again, the time it spent in the run queue since apart.
#[inline(always)]
fn ran_again(t: &mut OffThread, task: *const u8) {
    let off = t.off_ns;
    t.off_ns = 0;
    let sched = Sched::of(task);
    let total = if sched.arrivals != t.arrivals_before && t.off_clock != 0 && sched.arrived >= t.off_clock {
        sched.arrived - t.off_clock
    } else {
        // No arrival recorded (the scheduler counts one only for a task it queued): the
        // thread has run since its wait ended for the CPU time it used since.
        bump(stat::OFF_FROM_RUN_TIME);
        let ran = task_u64(task, &OFF_CONFIG.task_sum_exec).saturating_sub(t.ran_before);
        now_ns().saturating_sub(off).saturating_sub(ran)
    };
    let (waited, queued) = split_wait(t.key.reason, total, sched.queued.saturating_sub(t.queued_before));
    add_off(&t.key, OffTime { waited: weighted(waited, t.weight), queued: weighted(queued, t.weight) });
}

/// Whether the switch now under way of the thread of pace `t`, a GIL hand-over or a
/// preemption, is followed (the weight of its wait is then `t.weight`): all are, weighing
/// one, while the thread switches so at most `OFF_BUDGET` times a second; at a faster pace
/// in its previous window, each is taken with the chance that keeps to the budget, weighing
/// its inverse. Threads that switch that often wait briefly each time, so one wait weighs
/// little in the total.
///
/// `now` is the clock, read here (into `now`) only when needed: a read costs more than
/// the rest of a switch that is not followed, so while a thread is sampled its window's end
/// is looked for at every `PACE_CHECK_EVERY`-th switch.
#[inline(always)]
fn followed(t: &mut OffPace, now: &mut u64) -> bool {
    // What the budget allows in one window.
    let allowed = match OFF_BUDGET.get(0) {
        Some(&b) if b > 0 => b,
        _ => {
            t.weight = OFF_WEIGHT_ONE;
            return true;
        }
    };
    let sampled = t.take_below != 0 && t.take_below < OFF_TAKE_ALL;
    let elapsed = if !sampled || t.window_count.is_multiple_of(PACE_CHECK_EVERY) {
        clock(now).wrapping_sub(t.window_ns)
    } else {
        0
    };
    // A window ends after its length, or as soon as a thread followed in full has used up
    // what it allows (a thread that starts to switch fast is sampled from then on).
    if elapsed >= OFF_WINDOW_NS
        || t.take_below == 0
        || (t.take_below >= OFF_TAKE_ALL && t.window_count >= allowed)
    {
        // The finished window's pace, per window length (its count is far below 2^32).
        let pace = t.window_count.min(u64::from(u32::MAX)).wrapping_mul(OFF_WINDOW_NS) / elapsed.max(1);
        if pace <= allowed {
            t.take_below = OFF_TAKE_ALL;
            t.weight = OFF_WEIGHT_ONE;
        } else {
            // (`allowed` is at most a u32's tenth: the shift fits.)
            t.take_below = ((allowed.min(u64::from(u32::MAX)) << 32) / pace).max(1);
            t.weight = pace * OFF_WEIGHT_ONE / allowed;
        }
        t.window_ns = clock(now);
        t.window_count = 0;
    }
    t.window_count += 1;
    if t.take_below >= OFF_TAKE_ALL {
        return true;
    }
    // xorshift64 (Marsaglia): a full period over the non-zero states; its high half is the
    // draw of 2^32.
    let mut x = t.rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    t.rng = x;
    (x >> 32) < t.take_below
}

#[inline(always)]
fn add_off(key: &OffKey, time: OffTime) {
    let add = |total: *mut OffTime| {
        // SAFETY: this CPU's value of a per-CPU hash map entry: live and aligned (preallocated
        // map), and only this run touches it (tracing programs never nest on one CPU).
        unsafe {
            (*total).waited += time.waited;
            (*total).queued += time.queued;
        }
    };
    if let Some(total) = OFF_COUNTS.get_ptr_mut(key) {
        add(total);
    } else if OFF_COUNTS.insert(key, time, u64::from(BPF_NOEXIST)).is_ok() {
        // A new stack for userspace to name.
        new_key(&key.sample);
    } else {
        match OFF_COUNTS.get_ptr_mut(key) {
            // Another CPU created the key just now.
            Some(total) => add(total),
            None => {
                bump(stat::OFF_COUNTS_FULL);
            }
        }
    }
}

/// True when the current task's cgroup has spent its CPU quota (the task was dequeued by
/// the throttle, or its group or an ancestor is throttled).
#[inline(always)]
fn throttled(task: *const u8) -> bool {
    // Kernels that throttle per task (6.18+) mark the task once it is taken off its run
    // queue; until then (and on older kernels) its group's throttle count says it.
    if typed_field::<u8>(task, config(&OFF_CONFIG.task_throttled)).unwrap_or(0) & 1 != 0 {
        return true;
    }
    let count = || -> Result<i32, i64> {
        let cfs_rq: *const u8 = typed_field(task, config(&OFF_CONFIG.task_cfs_rq))?;
        typed_field(cfs_rq, config(&OFF_CONFIG.cfs_rq_throttle_count))
    };
    count().unwrap_or(0) > 0
}

/// Whether a sleep of the `struct timespec` at user address `timespec` was asked for less
/// than `OFF_BRIEF_SLEEP_NS`: relative, or until that `CLOCK_MONOTONIC` time (`absolute`,
/// CPython's `time.sleep`), whose time is read into `now`. Sleeps that cannot be told are
/// not brief.
#[inline(always)]
fn brief_timespec(timespec: u64, absolute: bool, now: &mut u64) -> bool {
    if timespec == 0 {
        return false;
    }
    // SAFETY: the helper checks the user address and fails rather than faulting.
    let Ok([secs, nanos]) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user(timespec as *const [i64; 2]) })
    else {
        return false;
    };
    // (Seconds bounded first: a product that could overflow is a 128-bit call BPF lacks.)
    if !(0..1 << 32).contains(&secs) || !(0..1_000_000_000).contains(&nanos) {
        return false;
    }
    let asked = secs as u64 * 1_000_000_000 + nanos as u64;
    let asked = if absolute { asked.saturating_sub(clock(now)) } else { asked };
    asked < OFF_BRIEF_SLEEP_NS
}

/// Whether a `clock_nanosleep` (the system call `regs` entered) was asked for less than
/// `OFF_BRIEF_SLEEP_NS` (see `brief_timespec`); a deadline on another clock is not brief.
#[inline(always)]
fn brief_clock_nanosleep(regs: &pt_regs, now: &mut u64) -> bool {
    const TIMER_ABSTIME: u64 = 1;
    const CLOCK_MONOTONIC: u64 = 1;
    let absolute = regs.rsi & TIMER_ABSTIME != 0;
    !(absolute && regs.rdi != CLOCK_MONOTONIC) && brief_timespec(regs.rdx, absolute, now)
}

/// Whether a `select` of no descriptors waits less than `OFF_BRIEF_SLEEP_NS` for the
/// `struct timeval` (seconds, microseconds) at user address `timeval`.
#[inline(always)]
fn brief_timeval(timeval: u64) -> bool {
    // SAFETY: the helper checks the user address and fails rather than faulting.
    match unsafe { aya_ebpf::helpers::bpf_probe_read_user(timeval as *const [i64; 2]) } {
        Ok([0, us]) => (0..OFF_BRIEF_SLEEP_NS as i64 / 1000).contains(&us),
        _ => false,
    }
}

/// Why a thread that blocks in its current system call (the one `regs` entered) waits;
/// fills the peer of a socket. For a sleep, sets `brief` when it was asked for under
/// `OFF_BRIEF_SLEEP_NS` (the time, when read, goes into `now`). `pace`: the thread's.
#[inline(always)]
fn blocked_reason(
    key: &mut OffKey,
    task: *const u8,
    tgid: u32,
    pace: &mut LazyPace,
    regs: &pt_regs,
    brief: &mut bool,
    now: &mut u64,
) -> u32 {
    let (nr, arg0, arg1) = (regs.orig_rax, regs.rdi, regs.rsi);
    match nr {
        sysno::FUTEX => {
            if is_gil(tgid, pace, arg0) {
                reason::GIL
            } else {
                reason::LOCK
            }
        }
        sysno::FUTEX_WAITV => reason::LOCK,
        sysno::READ
        | sysno::WRITE
        | sysno::READV
        | sysno::WRITEV
        | sysno::RECVFROM
        | sysno::SENDTO
        | sysno::RECVMSG
        | sysno::SENDMSG
        | sysno::CONNECT
        | sysno::RECVMMSG
        | sysno::SENDMMSG => fd_reason(key, task, arg0, reason::OTHER),
        sysno::ACCEPT | sysno::ACCEPT4 | sysno::EPOLL_WAIT | sysno::EPOLL_PWAIT | sysno::EPOLL_PWAIT2 => {
            reason::POLL
        }
        // A poll of one socket is how CPython waits on a socket with a timeout.
        sysno::POLL | sysno::PPOLL if arg1 == 1 => {
            // SAFETY: the helper checks the user address and fails rather than faulting.
            match unsafe { aya_ebpf::helpers::bpf_probe_read_user(arg0 as *const i32) } {
                Ok(fd) if fd >= 0 => fd_reason(key, task, fd as u64, reason::POLL),
                _ => reason::POLL,
            }
        }
        sysno::POLL | sysno::PPOLL => reason::POLL,
        // `select` of no descriptors is a sleep (`time.sleep` before 3.11).
        sysno::SELECT if arg0 == 0 => {
            *brief = brief_timeval(regs.r8);
            reason::SLEEP
        }
        sysno::PSELECT6 if arg0 == 0 => {
            *brief = brief_timespec(regs.r8, false, now);
            reason::SLEEP
        }
        sysno::SELECT | sysno::PSELECT6 => reason::POLL,
        sysno::NANOSLEEP => {
            *brief = brief_timespec(arg0, false, now);
            reason::SLEEP
        }
        sysno::CLOCK_NANOSLEEP => {
            *brief = brief_clock_nanosleep(regs, now);
            reason::SLEEP
        }
        _ => reason::OTHER,
    }
}

/// The file behind the current task's descriptor `fd`.
#[inline(always)]
fn fd_file(task: *const u8, fd: u64) -> Result<u64, i64> {
    let files: *const u8 = typed_field(task, config(&OFF_CONFIG.task_files))?;
    let fdt: *const u8 = typed_field(files, config(&OFF_CONFIG.files_fdt))?;
    let max: u32 = typed_field(fdt, config(&OFF_CONFIG.fdt_max_fds))?;
    if fd >= u64::from(max) {
        return Err(0);
    }
    // (An array of pointers to pointers, which the verifier does not type as structs: its
    // element is read with the helper.)
    let fds: u64 = typed_field(fdt, config(&OFF_CONFIG.fdt_fd))?;
    kread(fds.wrapping_add(fd * 8))
}

/// The type (`S_IFMT` bits) of `file` and its private data (a socket's `struct socket`):
/// one read of both fields where they lie side by side (since Linux 6.12), two otherwise.
#[inline(always)]
fn file_kind(file: u64) -> Result<(u16, u64), i64> {
    let (data, inode) = (config(&OFF_CONFIG.file_private_data), config(&OFF_CONFIG.file_inode));
    let (private, inode): (u64, u64) = if data != NO_OFFSET && inode == data.wrapping_add(8) {
        let [private, inode] = kread::<[u64; 2]>(at(file, data)?)?;
        (private, inode)
    } else {
        (kread(at(file, data)?)?, kread(at(file, inode)?)?)
    };
    let mode: u16 = kread(at(inode, config(&OFF_CONFIG.inode_mode))?)?;
    Ok((mode & S_IFMT, private))
}

/// The `struct sock` of socket descriptor `fd` of `task` (the current task, as
/// `current_task` gave it); 0 when it is no socket or cannot be read.
#[inline(always)]
pub(super) fn fd_sock(task: *const u8, fd: u64) -> u64 {
    let sock = || -> Result<u64, i64> {
        let (kind, socket) = file_kind(fd_file(task, fd)?)?;
        if kind != S_IFSOCK {
            return Err(0);
        }
        kread(at(socket, config(&OFF_CONFIG.socket_sk))?)
    };
    sock().unwrap_or(0)
}

/// True when `uaddr` is in the GIL of Python process `tgid`. The GIL's address is kept in
/// the thread's pace slot `pace`: a GIL hand-over is the switch that comes in storms, and
/// the slot is in this CPU's cache where the process's entry is not (its lookup made a
/// switch that is not followed an eighth slower). An exec forgets it (`forget_pace`).
#[inline(always)]
fn is_gil(tgid: u32, pace: &mut LazyPace, uaddr: u64) -> bool {
    let gil = match pace.get() {
        Some(pace) if pace.gil != 0 => pace.gil,
        pace => {
            // SAFETY: as in `perf_sample::python_stack`.
            let Some(proc) = (unsafe { PY_PROCS.get(tgid) }) else { return false };
            let gil = python::gil_address(proc);
            if let Some(pace) = pace {
                pace.gil = gil;
            }
            gil
        }
    };
    gil != 0 && uaddr >= gil && uaddr < gil + PY_GIL_SIZE
}

/// The wait on file descriptor `fd` of the current task: a socket (with its peer when it is
/// TCP/UDP over IP), a regular file (disk), or `otherwise`.
#[inline(always)]
fn fd_reason(key: &mut OffKey, task: *const u8, fd: u64, otherwise: u32) -> u32 {
    let Ok((kind, socket)) = fd_file(task, fd).and_then(file_kind) else { return otherwise };
    match kind {
        S_IFSOCK => {
            // The peer, when the socket has one (a listening socket has none: waiting on it
            // is waiting for any client, as `accept` is).
            let mut peer = || -> Result<bool, i64> {
                let sk: u64 = kread(at(socket, config(&OFF_CONFIG.socket_sk))?)?;
                // The address, port and family, read in one go.
                let common: [u8; SKC_HEAD] = kread(sk)?;
                let at = |i: usize| [common[i], common[i + 1]];
                let (family, port) = (u16::from_ne_bytes(at(SKC_FAMILY)), u16::from_be_bytes(at(SKC_DPORT)));
                if port == 0 {
                    return Ok(false);
                }
                if family == AF_INET {
                    key.addr[..4].copy_from_slice(&common[SKC_DADDR..SKC_DADDR + 4]);
                } else if family == AF_INET6 {
                    key.addr = kread(sk + SKC_V6_DADDR)?;
                } else {
                    return Ok(true);
                }
                key.family = family;
                key.port = port;
                Ok(true)
            };
            match peer() {
                Ok(false) if otherwise == reason::POLL => reason::POLL,
                _ => reason::SOCKET,
            }
        }
        S_IFREG => reason::DISK,
        _ => otherwise,
    }
}
