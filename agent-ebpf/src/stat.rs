//! The per-CPU counters every kernel program bumps for what it sampled, dropped or lost,
//! reported to the user; one index per counter.

/// Per-CPU counters, indexed by the constants of this module.
pub const MAP_STATS: &str = "STATS";

/// Samples taken in a target process.
pub const SAMPLES: u32 = 0;
/// Samples whose user stack could not be read (no frames reachable).
pub const USER_STACK_MISSING: u32 = 1;
/// Samples whose user or kernel stack was dropped: stack map bucket taken or full.
pub const STACK_DROPPED: u32 = 2;
/// Samples dropped because the counts map was full.
pub const COUNTS_FULL: u32 = 3;
/// Samples of a Python process whose thread state was not found (thread not running Python).
pub const PY_NO_THREAD: u32 = 4;
/// Python stacks deeper than `PY_MAX_FRAMES`, cut at the root end.
pub const PY_TRUNCATED: u32 = 5;
/// Python frames whose memory could not be read (the walk stopped there).
pub const PY_READ_ERROR: u32 = 6;
/// Python stacks dropped because the Python stacks map was full.
pub const PY_STACKS_FULL: u32 = 7;
/// Samples with a Python stack.
pub const PY_SAMPLES: u32 = 8;
/// Children not followed because the targets map was full.
pub const TARGETS_FULL: u32 = 9;
/// Nanoseconds spent handling target samples, from entry to exit (with `MEASURE_COST`).
pub const TARGET_NS: u32 = 10;
/// Python frames whose prefix could not be read at once (read field by field instead).
pub const PY_FRAME_SLOW_READS: u32 = 11;
/// Network events lost because their CPU's event ring was full.
pub const NET_EVENTS_LOST: u32 = 12;
/// Connections not tracked because the connections map was full.
pub const NET_CONNS_FULL: u32 = 13;
/// TCP connects not tracked because the sockets map was full.
pub const NET_SOCKS_FULL: u32 = 14;
/// Exec notifications lost because the set was full (found by the next /proc scan).
pub const EXECS_FULL: u32 = 15;
/// Keys the sampling program added to the counts map: when it moves, there are new
/// stacks for userspace to name while their processes live.
pub const NEW_KEYS: u32 = 16;
/// Target threads' switches off the CPU followed (`sched_switch`).
pub const OFF_SWITCHES: u32 = 17;
/// Nanoseconds spent on those switches, from entry to exit (with `OffConfig::measure_cost`).
pub const OFF_NS: u32 = 18;
/// Off-CPU waits not counted because the off-CPU counts map was full.
pub const OFF_COUNTS_FULL: u32 = 19;
/// Target threads' switches whose Python stack was the one walked at the thread's previous
/// switch (its fingerprint unchanged): not walked again.
pub const OFF_STACKS_REUSED: u32 = 20;
/// Target threads' GIL and lock waits that took the stack read at the thread's
/// switch less than `OffConfig::recent_us` before (not read again).
pub const OFF_STACKS_RECENT: u32 = 21;
/// Waits whose end the scheduler's `sched_info` did not record (the thread got the CPU
/// without passing through a run queue it counts): closed from the CPU time the thread
/// used since.
pub const OFF_FROM_RUN_TIME: u32 = 22;
/// CPU samples of Python threads not holding the GIL, not counted (`PY_PROC_GIL_ONLY`).
pub const GIL_NOT_HELD: u32 = 23;
/// Blocked event-loop stretches lost because their ring was full.
pub const LOOP_BLOCKS_LOST: u32 = 24;
/// Target threads' switches off the CPU not followed: their threads were over the switch
/// budget (`MAP_OFF_BUDGET`).
pub const OFF_SAMPLED_OUT: u32 = 25;
/// New keys not sent to userspace because the new-key ring was full (`MAP_NEW_KEYS`).
pub const NEW_KEYS_UNSENT: u32 = 26;
/// Waits of fast-switching threads sampled by the wall-clock sampler (`off_cpu_sample`).
pub const OFF_TIME_SAMPLES: u32 = 27;
/// Of those, the samples whose Python stack was walked (not found unchanged).
pub const OFF_SAMPLE_WALKS: u32 = 28;
/// Number of counters.
pub const COUNT: u32 = 29;
