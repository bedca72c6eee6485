//! Kernel programs, one module per hook.
pub mod net_syscalls;
pub mod perf_sample;
pub mod sched_exec;
pub mod stats_floor;
pub mod task_newtask;
pub mod tcp_state;
