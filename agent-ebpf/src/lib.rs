//! Types shared between stoker's kernel programs and its userspace agent.
//! Every type is `#[repr(C)]`, `Copy`, padded explicitly and size-checked.
#![no_std]

/// Map of target processes: tgid -> `TargetFlags` bits.
pub const MAP_TARGETS: &str = "TARGETS";
/// Stack-trace map holding user and kernel stacks by id.
pub const MAP_STACKS: &str = "STACKS";
/// Sample counts aggregated in the kernel: `SampleKey` -> per-CPU count.
pub const MAP_COUNTS: &str = "COUNTS";
/// Per-CPU counters, indexed by the `stat` constants.
pub const MAP_STATS: &str = "STATS";
/// The CPU-sampling perf-event program.
pub const PROG_PERF_SAMPLE: &str = "perf_sample";

/// Capacity of the stack-trace map (unique stacks).
pub const STACKS_CAPACITY: u32 = 16 * 1024;
/// Capacity of the counts map (unique thread/stack pairs).
pub const COUNTS_CAPACITY: u32 = 64 * 1024;
/// Capacity of the targets map (processes sampled at once).
pub const TARGETS_CAPACITY: u32 = 8 * 1024;

/// Indexes into the per-CPU stats array.
pub mod stat {
    /// Samples taken in a target process.
    pub const SAMPLES: u32 = 0;
    /// Samples whose user stack could not be read (no frames reachable).
    pub const USER_STACK_MISSING: u32 = 1;
    /// Samples whose user or kernel stack was dropped: stack map bucket taken or full.
    pub const STACK_DROPPED: u32 = 2;
    /// Samples dropped because the counts map was full.
    pub const COUNTS_FULL: u32 = 3;
    /// Number of counters.
    pub const COUNT: u32 = 4;
}

/// Key of the kernel-side aggregation: one thread, one user stack, one kernel stack.
/// A stack id is negative when that stack is absent (`NO_STACK`) or was dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub tgid: u32,
    pub tid: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
}
const _: () = assert!(core::mem::size_of::<SampleKey>() == 16);

/// Stack id recorded when there is no stack of that kind (e.g. no kernel frames).
pub const NO_STACK: i32 = -1;
/// Stack id recorded when the stack existed but could not be stored.
pub const DROPPED_STACK: i32 = -2;

#[cfg(feature = "user")]
unsafe impl aya::Pod for SampleKey {}
