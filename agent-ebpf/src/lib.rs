//! Types and names shared between stoker's kernel programs and its userspace agent, one
//! module per concern; every item is re-exported here, so users write `agent_ebpf::NAME`.
//! Every type is `#[repr(C)]`, `Copy`, padded explicitly and size-checked.
#![no_std]

pub mod net;
pub mod offcpu;
pub mod python;
pub mod sampling;
pub mod stat;

pub use net::*;
pub use offcpu::*;
pub use python::*;
pub use sampling::*;
pub use stat::MAP_STATS;
