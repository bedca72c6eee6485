//! Kernel programs, one module per hook.
pub mod perf_sample;
pub mod sched_exec;
pub mod task_newtask;
