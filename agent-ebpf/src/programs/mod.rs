//! Kernel programs, one module per hook, and the kernel side of the concerns they share:
//! `python` (the CPython frame walker) and `net` (offsets, event rings, HTTP recognizer).
pub mod net;
pub mod net_syscalls;
pub mod perf_sample;
pub mod python;
pub mod sched_exec;
pub mod stats_floor;
pub mod task_newtask;
pub mod tcp_state;
