//! Kernel programs, one module per hook, and the kernel side of the concerns they share:
//! `python` (the CPython frame walker) and `net` (offsets, event rings, HTTP recognizer).
pub mod event_loop;
pub mod net;
pub mod net_syscalls;
pub mod offcpu;
pub mod perf_sample;
pub mod python;
pub mod sched_exec;
pub mod stats_floor;
pub mod sysno;
pub mod task_newtask;
pub mod tcp_state;

use aya_ebpf::programs::TracePointContext;

/// The value of a global the loader sets before loading (`#[unsafe(no_mangle)] static`).
/// Read volatile: the compiler would otherwise use the initializer in the source.
#[inline(always)]
pub fn loader_global<T: Copy>(global: &T) -> T {
    // SAFETY: a reference is valid and aligned for a read; the loader writes the value before
    // the program is loaded, and nothing writes it afterwards.
    unsafe { core::ptr::read_volatile(global) }
}

/// Reads a field of a tracepoint record at `offset` (from the record's format file).
#[inline(always)]
pub fn record<T: Plain>(ctx: &TracePointContext, offset: usize) -> Result<T, i64> {
    // SAFETY: `read_at` is a `bpf_probe_read_kernel` of the record, which fails rather than
    // faulting when the offset is wrong; any bits are a valid `T` (`Plain`).
    unsafe { ctx.read_at::<T>(offset) }.map_err(i64::from)
}

/// Types that every bit pattern is a valid value of: what the programs read from memory they
/// do not own (user memory, tracepoint records, kernel structures) with the probe-read helpers.
///
/// # Safety
///
/// Any `size_of::<Self>()` bytes are a valid `Self`.
pub unsafe trait Plain: Copy {}
// SAFETY: an integer: any bits are a valid value.
unsafe impl Plain for u8 {}
// SAFETY: an integer: any bits are a valid value.
unsafe impl Plain for u16 {}
// SAFETY: an integer: any bits are a valid value.
unsafe impl Plain for i32 {}
// SAFETY: an integer: any bits are a valid value.
unsafe impl Plain for u32 {}
// SAFETY: an integer: any bits are a valid value.
unsafe impl Plain for u64 {}
// SAFETY: bytes: any bits are a valid value.
unsafe impl<const N: usize> Plain for [u8; N] {}
// SAFETY: integers: any bits are a valid value.
unsafe impl<const N: usize> Plain for [u64; N] {}
