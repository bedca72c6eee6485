//! CPU sampling, shared with userspace: which processes are targets, the stack and count
//! maps the `perf_sample` program aggregates into, and the programs that keep the targets.

/// Map of target processes: tgid -> `TARGET_*` flag bits.
pub const MAP_TARGETS: &str = "TARGETS";
/// The same set as one bit per tgid (word `tgid / 64`, bit `tgid % 64`): the programs that
/// run on every call of every process test it first, at the cost of an array index instead
/// of a hash lookup. Memory-mappable, so userspace flips bits atomically.
pub const MAP_TARGET_BITS: &str = "TARGET_BITS";
/// Stack-trace map holding user and kernel stacks by id.
pub const MAP_STACKS: &str = "STACKS";
/// Sample counts aggregated in the kernel: `SampleKey` -> per-CPU count.
pub const MAP_COUNTS: &str = "COUNTS";
/// Keys the programs add to the counts and off-CPU counts maps, as `NewKey`s, for
/// userspace to name without walking the maps (a ring: when it was full, `stat::NEW_KEYS_UNSENT`
/// moves and userspace walks the maps once).
pub const MAP_NEW_KEYS: &str = "NEW_KEY_RING";
/// Bytes of `MAP_NEW_KEYS`: 10,922 keys (40 bytes and the ring's 8-byte header each).
pub const NEW_KEYS_RING_BYTES: u32 = 512 * 1024;

/// One item of `MAP_NEW_KEYS`: a key just added, and the name (`comm`) of its thread as
/// the kernel knew it then, when the program ran in that thread (else zeros). A thread
/// that exits before userspace reads the key is still named.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NewKey {
    pub key: SampleKey,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<NewKey>() == 40);
/// The CPU-sampling perf-event program.
pub const PROG_PERF_SAMPLE: &str = "perf_sample";
/// Processes that called exec, for userspace (a ring of `[tgid, CLOCK_MONOTONIC ns]`, `u64`
/// each): a target's exec,
/// or every exec when `MAP_EXEC_ALL` holds 1. It wakes userspace, which looks at the new
/// program at once: a short-lived process is walked from its first samples.
pub const MAP_EXECS: &str = "EXEC_RING";
/// One `u32`, set by userspace: 1 to report every exec on the machine, 0 targets' only.
pub const MAP_EXEC_ALL: &str = "EXEC_ALL";
/// The exec-watching tracepoint program (`sched:sched_process_exec`).
pub const PROG_SCHED_EXEC: &str = "sched_exec";
/// Global set by the loader: 1 to time each target sample (`stat::TARGET_NS`).
pub const GLOBAL_MEASURE_COST: &str = "MEASURE_COST";
/// An empty program, run to measure what the run-time statistics add to each run.
pub const PROG_STATS_FLOOR: &str = "stats_floor";
/// The child-following tracepoint program (`task:task_newtask`).
pub const PROG_TASK_NEWTASK: &str = "task_newtask";
/// Globals set by the loader: field offsets of the `task_newtask` record (format file).
pub const GLOBAL_NEWTASK_PID_OFFSET: &str = "NEWTASK_PID_OFFSET";
pub const GLOBAL_NEWTASK_FLAGS_OFFSET: &str = "NEWTASK_FLAGS_OFFSET";

/// Forks of Python targets, walked with the parent's layout: child tgid -> parent tgid (LRU: entries
/// userspace never took make room). What the child runs is named through the parent if the
/// child is gone before userspace reads it: a fork has its parent's code at the same addresses.
pub const MAP_FORKED_FROM: &str = "FORKED_FROM";

/// `TARGETS` flag: sample this process.
pub const TARGET_SAMPLE: u32 = 1;
/// `TARGETS` flag: processes it creates become targets with the same flags.
pub const TARGET_FOLLOW: u32 = 2;
/// `TARGETS` flag of a Python process found by scanning: a process it forks (a pre-fork
/// server's worker) is the same program, so it becomes a target with the same flags and
/// Python layout before it first runs; an exec ends both (the program changed: userspace
/// looks at the new one).
pub const TARGET_INHERIT: u32 = 4;

/// Capacity of the stack-trace map (unique stacks).
pub const STACKS_CAPACITY: u32 = 16 * 1024;
/// Capacity of the counts map (unique thread/stack pairs).
pub const COUNTS_CAPACITY: u32 = 64 * 1024;
/// Capacity of the targets map (processes sampled at once).
pub const TARGETS_CAPACITY: u32 = 8 * 1024;
/// Words of `TARGET_BITS`: one bit for every possible tgid (`PID_MAX_LIMIT` on 64-bit
/// kernels is 4 Mi), 512 KiB.
pub const TARGET_BITS_WORDS: u32 = 4 * 1024 * 1024 / 64;
/// Bytes of the exec ring: 4,096 execs between two reads (16 bytes and the ring's 8-byte
/// header each).
pub const EXECS_RING_BYTES: u32 = 128 * 1024;

/// Stack id recorded when there is no stack of that kind (e.g. no kernel frames).
pub const NO_STACK: i32 = -1;
/// Stack id recorded when the stack existed but could not be stored.
pub const DROPPED_STACK: i32 = -2;

/// Key of the kernel-side aggregation: one thread, one user stack, one kernel stack, one
/// Python stack. A stack id is negative when that stack is absent (`NO_STACK`) or was
/// dropped; `py_stack` is 0 when there is no Python stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub tgid: u32,
    pub tid: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
    pub py_stack: u64,
}
const _: () = assert!(core::mem::size_of::<SampleKey>() == 24);

// SAFETY: `repr(C)`, integers only, no padding (size asserted): any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SampleKey {}
