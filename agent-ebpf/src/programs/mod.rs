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

/// The current task as the kernel's BTF types it. Its fields, at offsets the loader took
/// from the same BTF (globals in read-only data, whose values the verifier knows), are read
/// with plain loads (`typed_field`) that the verifier checks against the type: no helper
/// call, which costs more than the rest of a context switch that is not followed.
#[inline(always)]
pub fn current_task() -> *const u8 {
    // SAFETY: the helper takes no arguments and only returns the current task's address.
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() as *const u8 }
}

/// The `T` at `offset` (`NO_OFFSET`: unknown) in the kernel structure at BTF-typed `base`
/// (null: none), read with a plain load. The null test comes before the offset is added:
/// a pointer the verifier marks as maybe null (an RCU-protected member) admits no
/// arithmetic until it is tested.
#[inline(always)]
pub fn typed_field<T: Plain>(base: *const u8, offset: u32) -> Result<T, i64> {
    if offset == agent_ebpf::NO_OFFSET || base.is_null() {
        return Err(0);
    }
    // SAFETY: `base` is a pointer the verifier types from BTF and `offset` a member of that
    // type (from the same BTF): the verifier admits the load only within that member (a
    // pointer member read whole) and makes it one that cannot fault (a bad address reads as
    // zero). Any bits are a valid `T` (`Plain`).
    Ok(unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize) as *const T) })
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
// SAFETY: an address, never dereferenced as a Rust reference: any bits are a valid value.
unsafe impl Plain for *const u8 {}
// SAFETY: bytes: any bits are a valid value.
unsafe impl<const N: usize> Plain for [u8; N] {}
// SAFETY: integers: any bits are a valid value.
unsafe impl<const N: usize> Plain for [u64; N] {}
