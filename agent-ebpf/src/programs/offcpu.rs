//! Off-CPU time of target threads: as one leaves the CPU, `sched_switch` takes its stacks
//! and why it stopped running; at its next switch off the CPU (or its next CPU sample) the
//! wait is added to its (stacks, reason) in `OFF_COUNTS`, ended when the scheduler gave it
//! the CPU again and split at the time it spent in the run queue (both as the scheduler
//! recorded them in the task's `sched_info`). Switches of other threads cost one bit test.
//! A thread that switches faster than the budget is not followed: the wall-clock sampler
//! (`off_cpu_sample`, a task iterator userspace runs at the sampling rate) counts its time
//! off the CPU instead.
use agent_ebpf::{
    NO_OFFSET, NO_STACK, OFF_PACE_SLOTS, OFF_WINDOW_NS, OffConfig, OffKey, OffPace, OffThread, OffTime,
    PY_GIL_SIZE, PyProc, SAMPLE_EVERY_THREAD, SampleKey, SampledThread, reason, split_wait, stat,
};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use core::ffi::c_void;

use super::{
    Plain, current_task, loader_global,
    net::{AF_INET, AF_INET6},
    net_syscalls::entry_regs_of,
    perf_sample::{kernel_stack, python_stack_from, user_stack},
    python::{self, LOCAL, REMOTE},
    sysno, typed_field,
};
use crate::maps::{
    OFF_BUDGET, OFF_COUNTS, OFF_PACE, OFF_SAMPLED, OFF_THREADS, PY_PROCS, add, bump, is_fast, is_pending,
    is_target, new_key, set_fast, set_pending,
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
        *pace = OffPace { tid, tgid, gil: 0, window_ns: 0, window_count: 0, fast: 0 };
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

    /// None: for a thread that is not the current one (its pace is its own CPUs' to keep).
    #[inline(always)]
    fn none(tgid: u32, tid: u32) -> Self {
        LazyPace { tgid, tid, looked: true, slot: None }
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
    // A thread that switches faster than the budget is not followed: the wall-clock
    // sampler counts its time off the CPU (`off_cpu_sample`). This is decided before
    // anything else is read, so that its switches cost little.
    let mut pace = LazyPace::new(tgid, tid);
    let fast = fast(pace.get()?, task_u64(task, &OFF_CONFIG.task_last_arrival));
    set_fast(tgid, tid, fast);
    if fast {
        bump(stat::OFF_SAMPLED_OUT);
        return None;
    }
    let mut key = wait_key::<LOCAL>(task, tgid, tid, runnable, state, &mut pace);
    let now = now_ns();
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
            let (proc, innermost, signature) = fingerprint::<LOCAL>(task, tgid, tid);
            if signature != 0 && signature == last_signature && last_stack != 0 {
                bump(stat::OFF_STACKS_REUSED);
                (last_stack, last_user != NO_STACK, signature, now)
            } else if signature != 0 && signature == prev_signature && prev_stack != 0 {
                bump(stat::OFF_STACKS_REUSED);
                (prev_stack, prev_user != NO_STACK, signature, now)
            } else {
                let (py_stack, want_native) =
                    proc.map_or((0, true), |proc| python_stack_from::<LOCAL>(task, tgid, proc, innermost));
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
    add_off(&t.key, OffTime { waited, queued });
}

/// Whether the thread of pace `t`, switching off the CPU now, switches faster than the
/// budget (`OFF_BUDGET`, per window of `OFF_WINDOW_NS`) on this CPU: it did in its previous
/// window, or it has in its current one (a thread that starts to storm is sampled from
/// then on; a burst of a few dozen switches, as a process starts, is not a storm).
/// `arrived`: when the thread last got the CPU (`sched_info.last_arrival`, this CPU's run
/// queue clock), the window's clock: a plain load, where the clock is a helper call that
/// costs as much as the rest of a switch that is not followed.
#[inline(always)]
fn fast(t: &mut OffPace, arrived: u64) -> bool {
    let allowed = match OFF_BUDGET.get(0) {
        Some(&b) if b > 0 => b,
        _ => return false,
    };
    let elapsed = arrived.wrapping_sub(t.window_ns);
    if t.window_ns == 0 || elapsed >= OFF_WINDOW_NS {
        // The finished window's pace, per window length (its count is far below 2^32); a
        // window that ended long ago (the thread did not switch here since) was slow.
        let pace = t.window_count.min(u64::from(u32::MAX)).wrapping_mul(OFF_WINDOW_NS) / elapsed.max(1);
        t.fast = u64::from(t.window_ns != 0 && elapsed < 2 * OFF_WINDOW_NS && pace > allowed);
        t.window_ns = arrived;
        t.window_count = 0;
    }
    t.window_count += 1;
    if t.window_count > allowed {
        t.fast = 1;
    }
    t.fast != 0
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

/// The key of a wait of thread `tid` of process `tgid` (`task`) as it is now: `runnable`,
/// or blocked in `state` (a system call's), no stacks yet. `pace`: the thread's.
/// `REMOTE`: `task` is not the current task (see `python::REMOTE`).
#[inline(always)]
fn wait_key<const REMOTE: bool>(
    task: *const u8,
    tgid: u32,
    tid: u32,
    runnable: bool,
    state: u64,
    pace: &mut LazyPace,
) -> OffKey {
    let mut key = OffKey {
        sample: SampleKey { tgid, tid, user_stack_id: NO_STACK, kernel_stack_id: NO_STACK, py_stack: 0 },
        reason: reason::OTHER,
        port: 0,
        family: 0,
        addr: [0; 16],
    };
    key.reason = if runnable {
        if throttled(task) { reason::THROTTLED } else { reason::RUNQUEUE }
    } else if state & TASK_UNINTERRUPTIBLE != 0 {
        reason::DISK
    } else {
        blocked_reason::<REMOTE>(&mut key, task, tgid, pace, entry_regs_of(task))
    };
    key
}

/// Why `task`, which blocks in its current system call (the one `regs` entered), waits;
/// fills the peer of a socket. `pace`: the thread's. `REMOTE`: `task` is not the current
/// task (see `python::REMOTE`).
#[inline(always)]
fn blocked_reason<const REMOTE: bool>(
    key: &mut OffKey,
    task: *const u8,
    tgid: u32,
    pace: &mut LazyPace,
    regs: &pt_regs,
) -> u32 {
    let (nr, arg0, arg1) = (regs.orig_rax, regs.rdi, regs.rsi);
    match nr {
        sysno::FUTEX => {
            if is_gil::<REMOTE>(task, tgid, pace, arg0) {
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
        sysno::POLL | sysno::PPOLL if arg1 == 1 => match python::read::<REMOTE, i32>(task, arg0) {
            Ok(fd) if fd >= 0 => fd_reason(key, task, fd as u64, reason::POLL),
            _ => reason::POLL,
        },
        sysno::POLL | sysno::PPOLL => reason::POLL,
        // `select` of no descriptors is a sleep (`time.sleep` before 3.11).
        sysno::SELECT | sysno::PSELECT6 if arg0 == 0 => reason::SLEEP,
        sysno::SELECT | sysno::PSELECT6 => reason::POLL,
        sysno::NANOSLEEP | sysno::CLOCK_NANOSLEEP => reason::SLEEP,
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
fn is_gil<const REMOTE: bool>(task: *const u8, tgid: u32, pace: &mut LazyPace, uaddr: u64) -> bool {
    let gil = match pace.get() {
        Some(pace) if pace.gil != 0 => pace.gil,
        pace => {
            // SAFETY: as in `perf_sample::python_stack`.
            let Some(proc) = (unsafe { PY_PROCS.get(tgid) }) else { return false };
            let gil = python::gil_address::<REMOTE>(task, proc);
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

/// Thread `tid`'s process (its `PY_PROCS` entry), its innermost Python frame (see
/// `python::innermost`) and the fingerprint of its stack (`python::signature`; 0: none):
/// what tells whether its stack is the one read before, and where a walk starts if not.
#[inline(always)]
fn fingerprint<const REMOTE: bool>(
    task: *const u8,
    tgid: u32,
    tid: u32,
) -> (Option<&'static PyProc>, Option<u64>, u64) {
    // SAFETY: as in `perf_sample::python_stack`.
    let Some(proc) = (unsafe { PY_PROCS.get(tgid) }) else { return (None, None, 0) };
    let innermost = python::innermost::<REMOTE>(task, tid, proc);
    let signature = match innermost {
        Some(frame) => python::signature::<REMOTE>(task, frame, &proc.offsets).unwrap_or(0),
        None => 0,
    };
    (Some(proc), innermost, signature)
}

/// Whether runnable `task` was running on this CPU until the current task got it: queued
/// (`sched_info.last_queued`) on this CPU's run queue at the very moment (the run queue's
/// clock) the current task arrived (`sched_info.last_arrival`).
#[inline(always)]
fn displaced_by_current(task: *const u8) -> bool {
    // SAFETY: the helper takes no arguments and only returns this CPU's number.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    if typed_field::<u32>(task, config(&OFF_CONFIG.task_cpu)).ok() != Some(cpu) {
        return false;
    }
    let queued = task_u64(task, &OFF_CONFIG.task_last_queued);
    queued != 0 && queued == task_u64(current_task(), &OFF_CONFIG.task_last_arrival)
}

/// The context of a task iterator's program (`struct bpf_iter__task`): the task, null at
/// the end of the walk.
#[repr(C)]
pub struct IterTask {
    meta: *const c_void,
    task: *const u8,
}

/// The wall-clock sampler: a sleepable task iterator over a target process's threads, read
/// by userspace at the sampling rate. Each thread of it that switches faster than the
/// budget (`OFF_FAST`; its switches are not followed) and is off the CPU now counts the
/// time since the previous read (`OFF_BUDGET[1]`) under its Python stack and why it waits,
/// as the switch program would have read them: the time off the CPU of fast-switching
/// threads, sampled as a clock would (a long wait is seen in proportion to its length).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter.s/task")]
pub extern "C" fn off_cpu_sample(ctx: *const IterTask) -> i32 {
    // SAFETY: the kernel passes its `bpf_iter__task`, whose task member the verifier types.
    let task = unsafe { core::ptr::read_volatile(&(*ctx).task) };
    let _ = sample_thread(task);
    0
}

#[inline(always)]
fn sample_thread(task: *const u8) -> Result<(), i64> {
    let tgid: u32 = typed_field(task, config(&OFF_CONFIG.task_tgid))?;
    let tid: u32 = typed_field(task, config(&OFF_CONFIG.task_pid))?;
    if tid == 0 || !is_target(tgid) {
        return Ok(());
    }
    if !is_fast(tid) && OFF_BUDGET.get(0).is_none_or(|&b| b != SAMPLE_EVERY_THREAD) {
        return Ok(());
    }
    // Counted for userspace, which visits a process again while it has fast threads.
    if let Some(seen) = OFF_BUDGET.get_ptr_mut(2) {
        // SAFETY: a value of the array, live while the program is loaded; only the sampler's
        // runs write it, one at a time (userspace runs the iterators one after the other).
        unsafe { *seen += 1 };
    }
    // On the CPU: its CPU samples count it.
    if typed_field::<i32>(task, config(&OFF_CONFIG.task_on_cpu))? != 0 {
        return Ok(());
    }
    let state = u64::from(typed_field::<u32>(task, config(&OFF_CONFIG.task_state))?);
    let runnable = state == 0;
    if !runnable && state & (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE) == 0 {
        return Ok(());
    }
    // Put back in the run queue of the CPU the sampler runs on as the sampler got it: the
    // sampler took the CPU from it (it would run but for the sample), so it is not counted.
    if runnable && displaced_by_current(task) {
        return Ok(());
    }
    let period = match OFF_BUDGET.get(1) {
        Some(&p) if p > 0 => p,
        _ => return Ok(()),
    };
    let mut key = wait_key::<REMOTE>(task, tgid, tid, runnable, state, &mut LazyPace::none(tgid, tid));
    // The Python stack: the one of the thread's previous sample when it has not run since
    // or its innermost frames are where they were, else walked.
    let ran = task_u64(task, &OFF_CONFIG.task_sum_exec);
    let last = OFF_SAMPLED.get_ptr_mut(tid);
    // SAFETY: a value of the preallocated LRU map from a successful lookup: it stays
    // allocated as long as the map; plain integers. Only the sampler writes it, one run at
    // a time (userspace runs the iterators one after the other).
    let last = last.map(|l| unsafe { &mut *l }).filter(|l| l.tgid == tgid && l.py_stack != 0);
    match last {
        Some(l) if l.ran == ran && ran != 0 => key.sample.py_stack = l.py_stack,
        _ => {
            let (proc, innermost, signature) = fingerprint::<REMOTE>(task, tgid, tid);
            key.sample.py_stack = match last {
                Some(ref l) if signature != 0 && l.signature == signature => l.py_stack,
                _ => {
                    bump(stat::OFF_SAMPLE_WALKS);
                    proc.map_or(0, |proc| python_stack_from::<REMOTE>(task, tgid, proc, innermost).0)
                }
            };
            let entry = SampledThread { tgid, _pad: 0, ran, signature, py_stack: key.sample.py_stack };
            match last {
                Some(l) => *l = entry,
                None => {
                    let _ = OFF_SAMPLED.insert(tid, entry, 0);
                }
            }
        }
    }
    add_off(&key, OffTime { waited: period, queued: 0 });
    bump(stat::OFF_TIME_SAMPLES);
    Ok(())
}
