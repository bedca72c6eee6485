//! Kernel programs, one module per hook.
pub mod perf_sample;
pub mod task_newtask;
