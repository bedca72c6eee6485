//! Off-CPU time, shared with userspace: why a target thread left the CPU and for how long,
//! aggregated in the kernel per (thread, stacks, reason) by the `sched_switch` program.
use crate::SampleKey;

/// Off-CPU time aggregated in the kernel: `OffKey` -> per-CPU `OffTime`.
pub const MAP_OFF_COUNTS: &str = "OFF_COUNTS";
/// Target threads off the CPU or last seen leaving it: tid -> `OffThread` (LRU).
pub const MAP_OFF_THREADS: &str = "OFF_THREADS";
/// One bit per tid: the thread's `OFF_THREADS` entry holds a wait not counted yet. Mapped
/// by userspace, which enters the waits under way as a session starts (a thread blocked
/// since before it, seen by no switch yet).
pub const MAP_OFF_PENDING: &str = "OFF_PENDING";
/// The context-switch program (raw tracepoint `sched_switch`: no trace record is built
/// for it, which the switches of every other thread on the host would pay for). It is the
/// only off-CPU program: a wait's end and its time in the run queue are what the scheduler
/// itself recorded (`sched_info`), read at the thread's next switch off the CPU or its next
/// CPU sample, so neither wake-ups nor switches in need a program.
pub const PROG_SCHED_SWITCH: &str = "sched_switch";
/// The wall-clock sampler: a sleepable task iterator (see `programs::offcpu`).
pub const PROG_OFF_CPU_SAMPLE: &str = "off_cpu_sample";
/// Two `u64`s set by userspace. First, the switch budget: the switches off the CPU of one
/// target thread on one CPU per window of `OFF_WINDOW_NS` (from the per-second budget, see
/// `budget_per_window`; 0: no limit). A thread that switched more often in its previous
/// window, or has in its current one, is fast: its switches are not followed (a bit test, a slot of a per-CPU array
/// and a count), and the wall-clock sampler counts its time off the CPU instead
/// (`PROG_OFF_CPU_SAMPLE`). Second, the time since the sampler's previous run, which each of
/// its samples counts. Third, set by the sampler: the fast threads it has met (on the CPU
/// or off), which userspace reads after each process's run.
pub const MAP_OFF_BUDGET: &str = "OFF_BUDGET";
/// Target processes a thread of which turned fast (see `MAP_OFF_BUDGET`), one bit per tgid,
/// memory-mappable: set by the switch program as a thread turns fast, tested and cleared by
/// the wall-clock sampler's thread. The sampler visits a process while its previous visit
/// met fast threads or its bit is set: one whose threads all keep within the budget costs
/// it nothing.
pub const MAP_OFF_FAST_PROCS: &str = "OFF_FAST_PROCS";
/// What `MAP_OFF_BUDGET`'s first slot holds when no switch is followed (`--waits sampled`,
/// the switch program not attached): the wall-clock sampler counts the time off the CPU of
/// every target thread, not only the fast ones.
pub const SAMPLE_EVERY_THREAD: u64 = u64::MAX;
/// Length of the windows in which a thread's switches are counted.
pub const OFF_WINDOW_NS: u64 = 1_000_000_000;

/// What `MAP_OFF_BUDGET` holds for a budget of `per_second` switches (0: no limit).
pub const fn budget_per_window(per_second: u32) -> u64 {
    if per_second == 0 {
        return 0;
    }
    let allowed = per_second as u64 * OFF_WINDOW_NS / 1_000_000_000;
    if allowed == 0 { 1 } else { allowed }
}

/// The time of the waits of one `OffKey`: for its reason, and in the run queue after they
/// ended (that of `OffKey::queued`, kept here so that a wait is added with one lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffTime {
    pub waited: u64,
    pub queued: u64,
}

// SAFETY: `repr(C)`, two integers, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for OffTime {}

/// A wait of `total` ns that ended, of which the thread spent `queued` ns in the run queue
/// (as the scheduler counted it), split into (its reason's part, the run queue's part). A
/// thread that left the CPU runnable (`RUNQUEUE`, `THROTTLED`) waited for the CPU all along.
#[inline(always)]
pub fn split_wait(reason: u32, total: u64, queued: u64) -> (u64, u64) {
    if matches!(reason, reason::RUNQUEUE | reason::THROTTLED) {
        return (total, 0);
    }
    let queued = queued.min(total);
    (total - queued, queued)
}

/// Global set by the loader: `OffConfig`.
pub const GLOBAL_OFF_CONFIG: &str = "OFF_CONFIG";

/// Capacity of the off-CPU counts map (unique thread/stack/reason keys, each with the
/// run-queue time after its waits).
pub const OFF_COUNTS_CAPACITY: u32 = 16 * 1024;
/// Capacity of the per-thread state map.
pub const OFF_THREADS_CAPACITY: u32 = 16 * 1024;

/// Why a thread was not running (`OffKey::reason`), each shown as a state frame.
pub mod reason {
    /// On the CPU (CPU samples in wall-clock profiles; never in the kernel's map).
    pub const RUNNING: u32 = 0;
    /// Runnable, waiting for a CPU.
    pub const RUNQUEUE: u32 = 1;
    /// Runnable, but its cgroup's CPU quota for the period is spent.
    pub const THROTTLED: u32 = 2;
    /// Waiting for CPython's global interpreter lock.
    pub const GIL: u32 = 3;
    /// Waiting on another lock, condition or semaphore (a futex).
    pub const LOCK: u32 = 4;
    /// Blocked on a socket (its peer in the key when it is TCP/UDP over IP).
    pub const SOCKET: u32 = 5;
    /// Waiting for any of several events (select, poll, epoll, accept): idle.
    pub const POLL: u32 = 6;
    /// Uninterruptible waits: disk and file system I/O, page faults.
    pub const DISK: u32 = 7;
    /// Sleeping for a time (`time.sleep`).
    pub const SLEEP: u32 = 8;
    /// Anything else (pipes, child processes, signals, terminals).
    pub const OTHER: u32 = 9;
    /// Number of reasons.
    pub const COUNT: usize = 10;
}

/// Key of the off-CPU aggregation: the thread and its stacks as it left the CPU (a
/// `SampleKey`), why, and for `reason::SOCKET` the socket's peer (`family` 0: unknown).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OffKey {
    pub sample: SampleKey,
    pub reason: u32,
    /// Peer port, host order.
    pub port: u16,
    /// `AF_INET`, `AF_INET6` or 0.
    pub family: u16,
    /// Peer address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<OffKey>() == 48);

impl OffKey {
    /// The key of the thread's time in the run queue after this wait: its stacks, no peer.
    #[inline(always)]
    pub fn queued(&self) -> OffKey {
        OffKey { reason: reason::RUNQUEUE, port: 0, family: 0, addr: [0; 16], ..*self }
    }
}

// SAFETY: `repr(C)`, integers, a `SampleKey` (itself `Pod`) and bytes, no padding (size
// asserted): any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for OffKey {}

/// A target thread's wait under way: what it was doing as it left the CPU, when it left
/// (`off_ns`, CLOCK_MONOTONIC; 0 once the wait is counted), and the scheduler's figures of
/// the thread then (`task_struct.sched_info`, `sched_entity`), from which the wait's end
/// and its time in the run queue follow once it ran again.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OffThread {
    pub key: OffKey,
    pub off_ns: u64,
    /// The run queue's clock as the thread left (the scheduler's clock, `rq->clock`: the one
    /// `sched_info.last_arrival` is read on).
    pub off_clock: u64,
    /// `sched_info.run_delay` (nanoseconds it waited in run queues so far) as it left.
    pub queued_before: u64,
    /// `sched_info.pcount` (times it got a CPU so far) as it left.
    pub arrivals_before: u64,
    /// `sched_entity.sum_exec_runtime` (its CPU time so far) as it left.
    pub ran_before: u64,
    /// Fingerprint of the Python stack in `key` (0: none): while the thread's stack has the
    /// same, it is not walked again (see `programs::python::signature`).
    pub py_signature: u64,
    /// When that stack was read (walked, or found unchanged).
    pub walked_ns: u64,
    /// The stack the thread had before its current one (fingerprint, Python stack, whether
    /// native frames were taken): a thread that alternates between two waits (a server's
    /// read of the next request and a call in its handler) has neither walked again.
    pub prev_signature: u64,
    pub prev_py_stack: u64,
    pub prev_user_stack_id: i32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OffThread>() == 128);

// SAFETY: `repr(C)`, an `OffKey` (itself `Pod`) and integers, no padding (size asserted).
#[cfg(feature = "user")]
unsafe impl aya::Pod for OffThread {}

/// What the wall-clock sampler keeps of a thread it sampled: its process, its CPU time
/// then (`sched_entity.sum_exec_runtime`), and the fingerprint and hash of its Python stack
/// (see `OffThread::py_signature`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SampledThread {
    pub tgid: u32,
    pub _pad: u32,
    pub ran: u64,
    pub signature: u64,
    pub py_stack: u64,
}

/// Slots of `OffPace` per CPU, indexed by the low bits of a thread id (a power of two).
pub const OFF_PACE_SLOTS: u32 = 1024;

/// A target thread's pace of switches off one CPU, in slot `tid % OFF_PACE_SLOTS` of a
/// per-CPU array: what each of its switches consults and counts in, with no hash lookup and
/// no memory shared with other CPUs written. A thread whose id shares the slot takes it over
/// (the pace starts again: its switches are followed until it is known).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OffPace {
    pub tid: u32,
    /// The thread's process.
    pub tgid: u32,
    /// Where its process's GIL lies (0: not known yet), so that a GIL wait is told without
    /// a lookup of the process.
    pub gil: u64,
    /// When its current window began and its switches in it.
    pub window_ns: u64,
    pub window_count: u64,
    /// 1 while the thread switches faster than the budget (see `MAP_OFF_BUDGET`).
    pub fast: u64,
}
const _: () = assert!(core::mem::size_of::<OffPace>() == 40);

/// Where the programs find what they read, from the kernel's BTF (`NO_OFFSET`: unknown,
/// that detail is not read).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffConfig {
    /// `task_struct.throttled` (kernels that throttle per task, 6.18+).
    pub task_throttled: u32,
    /// `task_struct.se` + `sched_entity.cfs_rq`, and `cfs_rq.throttle_count`.
    pub task_cfs_rq: u32,
    pub cfs_rq_throttle_count: u32,
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    /// `file.private_data`, `file.f_inode`, `inode.i_mode`, `socket.sk`.
    pub file_private_data: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub socket_sk: u32,
    /// 1 to time each target switch into `stat::OFF_NS`.
    pub measure_cost: u32,
    /// GIL and lock waits take the thread's stack read at its previous switch
    /// when that was less than this long ago (microseconds; 0: every wait's stack is read).
    pub recent_us: u32,
    /// `task_struct.se` + `sched_entity.sum_exec_runtime`.
    pub task_sum_exec: u32,
    /// `task_struct.sched_info` + `sched_info.pcount`, `.run_delay` and `.last_arrival`.
    pub task_pcount: u32,
    pub task_run_delay: u32,
    pub task_last_arrival: u32,
    /// `cfs_rq.rq` and `rq.clock`: the run queue's clock.
    pub cfs_rq_rq: u32,
    pub rq_clock: u32,
    /// `task_struct.pid` and `.tgid`: the switch program reads who leaves the CPU from the
    /// task it has at hand for the saved registers, with no helper call of its own.
    pub task_pid: u32,
    pub task_tgid: u32,
    /// `task_struct.__state` and `.on_cpu`: what the wall-clock sampler reads of a thread
    /// it finds off the CPU.
    pub task_state: u32,
    pub task_on_cpu: u32,
    /// `task_struct.thread_info` + `thread_info.cpu`: the CPU whose run queue a runnable
    /// thread waits in.
    pub task_cpu: u32,
    /// `task_struct.sched_info` + `sched_info.last_queued`: when a runnable task was queued.
    pub task_last_queued: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OffConfig>() == 104);

/// `OffConfig` value of an offset that is not known.
pub const NO_OFFSET: u32 = u32::MAX;

impl OffConfig {
    /// Nothing known: the programs then attribute waits to `reason::OTHER`.
    pub const UNKNOWN: Self = Self {
        task_throttled: NO_OFFSET,
        task_cfs_rq: NO_OFFSET,
        cfs_rq_throttle_count: NO_OFFSET,
        task_files: NO_OFFSET,
        files_fdt: NO_OFFSET,
        fdt_max_fds: NO_OFFSET,
        fdt_fd: NO_OFFSET,
        file_private_data: NO_OFFSET,
        file_inode: NO_OFFSET,
        inode_mode: NO_OFFSET,
        socket_sk: NO_OFFSET,
        measure_cost: 0,
        recent_us: 0,
        task_sum_exec: NO_OFFSET,
        task_pcount: NO_OFFSET,
        task_run_delay: NO_OFFSET,
        task_last_arrival: NO_OFFSET,
        cfs_rq_rq: NO_OFFSET,
        rq_clock: NO_OFFSET,
        task_pid: NO_OFFSET,
        task_tgid: NO_OFFSET,
        task_state: NO_OFFSET,
        task_on_cpu: NO_OFFSET,
        task_cpu: NO_OFFSET,
        task_last_queued: NO_OFFSET,
        _pad: 0,
    };
}

// SAFETY: `repr(C)`, integers only, no padding (size asserted).
#[cfg(feature = "user")]
unsafe impl aya::Pod for OffConfig {}

/// Threads that wait for events in an event loop (`epoll_wait` and kin): tid -> `LoopThread`.
pub const MAP_LOOPS: &str = "LOOPS";
/// Event-loop stretches longer than the threshold: a ring of `LoopBlock`s.
pub const MAP_LOOP_BLOCKS: &str = "LOOP_BLOCKS";
/// Programs on the entry and exit of the event-wait system calls.
pub const PROG_LOOP_ENTER: &str = "loop_enter";
pub const PROG_LOOP_EXIT: &str = "loop_exit";
/// The blocked-loop threshold in nanoseconds, one `u64` set by userspace (0: off).
pub const MAP_LOOP_THRESHOLD: &str = "LOOP_THRESHOLD";
/// Capacity of `LOOPS`.
pub const LOOPS_CAPACITY: u32 = 4 * 1024;
/// Stacks a loop thread keeps count of during one stretch (the most sampled one is kept).
pub const LOOP_STACK_SLOTS: usize = 4;

/// An event-loop thread: since when it has been busy (it left its last event wait; 0 while
/// it waits), and the Python stacks of its CPU samples since, with their counts.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopThread {
    pub busy_since: u64,
    pub stacks: [u64; LOOP_STACK_SLOTS],
    pub counts: [u32; LOOP_STACK_SLOTS],
}
const _: () = assert!(core::mem::size_of::<LoopThread>() == 8 + 8 * LOOP_STACK_SLOTS + 4 * LOOP_STACK_SLOTS);

// SAFETY: `repr(C)`, integers only, no padding (size asserted).
#[cfg(feature = "user")]
unsafe impl aya::Pod for LoopThread {}

/// A stretch on which an event-loop thread did not go back to waiting for events for longer
/// than the threshold: when it began, how long, and the Python stack sampled most in it (0:
/// none sampled).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopBlock {
    pub tgid: u32,
    pub tid: u32,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub py_stack: u64,
    pub samples: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<LoopBlock>() == 40);

// SAFETY: `repr(C)`, integers only, the padding an explicit field (size asserted).
#[cfg(feature = "user")]
unsafe impl aya::Pod for LoopBlock {}
