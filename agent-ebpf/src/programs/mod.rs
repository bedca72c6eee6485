//! Kernel programs, one module per hook.
pub mod perf_sample;
