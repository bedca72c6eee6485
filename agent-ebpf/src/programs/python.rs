//! The CPython frame walker used by the sampler: finds the sampled thread's
//! `PyThreadState` (matching `thread_id`, i.e. `pthread_self()`, against the task's fs base)
//! and records its frames, leaf first, into the per-CPU scratch stack.
use agent_ebpf::{
    NO_FIELD, PY_FRAME_CHUNK, PY_FRAME_ENTRY, PY_GIL_LAST_HOLDER, PY_GIL_LOCKED, PY_MAX_FRAMES,
    PY_MAX_THREADS, PY_PAGE, PY_STACK_READ_ERROR, PY_STACK_TRUNCATED, PY_WINDOW, PyOffsets, PyProc, PyStack,
    instr_kind, stat,
};
use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_ktime_get_ns, bpf_loop, bpf_probe_read_user, bpf_probe_read_user_buf,
    generated::bpf_copy_from_user_task,
};

use super::{Plain, loader_global};
use crate::maps::{FRAME_BUF, PY_CODE_LINES, PY_SCRATCH, PY_THREADS, PY_WINDOW_BUF, bump};

/// Offset of `thread.fsbase` in `task_struct`, set by the loader from the kernel's BTF.
#[unsafe(no_mangle)]
static FSBASE_OFFSET: u32 = 0;

/// Interpreters searched per process (subinterpreters beyond the first few are rare).
const MAX_INTERPRETERS: u32 = 4;

/// Whose memory the walker reads (its `REMOTE` parameter): the current task's, in any
/// program, or (`REMOTE`) that of the task it is given, which may be off the CPU, in a
/// sleepable program only (`bpf_copy_from_user_task` may fault pages in).
pub const LOCAL: bool = false;
pub const REMOTE: bool = true;

/// Copies `len` bytes at user address `addr` of `task` (a BTF-typed task pointer, which may
/// be off the CPU) to `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
#[inline(always)]
unsafe fn copy_from_task(task: *const u8, addr: u64, dst: *mut c_void, len: u32) -> Result<(), i32> {
    // SAFETY: the helper checks the user address of `task` and fails rather than faulting
    // (zeroing `dst`); it writes at most `len` bytes, which the caller has made room for.
    let r = unsafe { bpf_copy_from_user_task(dst, len, addr as *const c_void, task as *mut _, 0) };
    if r == 0 { Ok(()) } else { Err(r as i32) }
}

/// Reads `dst.len()` bytes at user address `addr` of `task` (see `REMOTE`).
#[inline(always)]
fn read_buf<const REMOTE: bool>(task: *const u8, addr: u64, dst: &mut [u8]) -> Result<(), i32> {
    if REMOTE {
        // SAFETY: `dst` is a slice of `dst.len()` writable bytes.
        unsafe { copy_from_task(task, addr, dst.as_mut_ptr().cast(), dst.len() as u32) }
    } else {
        // SAFETY: the helper checks the user address and fails rather than faulting.
        unsafe { bpf_probe_read_user_buf(addr as *const u8, dst) }
    }
}

/// Reads a value of the memory of the sampled process (`task`'s, see `REMOTE`).
#[inline(always)]
pub(super) fn read<const REMOTE: bool, T: Plain>(task: *const u8, addr: u64) -> Result<T, i32> {
    if REMOTE {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: `value` has room for `size_of::<T>()` bytes.
        unsafe { copy_from_task(task, addr, value.as_mut_ptr().cast(), core::mem::size_of::<T>() as u32)? };
        // SAFETY: the helper filled `value`; any bits are a valid `T` (`Plain`).
        Ok(unsafe { value.assume_init() })
    } else {
        // SAFETY: the helper checks the user address and fails rather than faulting; any bits
        // are a valid `T` (`Plain`).
        unsafe { bpf_probe_read_user(addr as *const T) }
    }
}

#[inline(always)]
fn field<const REMOTE: bool, T: Plain>(task: *const u8, base: u64, offset: u32) -> Result<T, i32> {
    read::<REMOTE, T>(task, base.wrapping_add(u64::from(offset)))
}

/// The sampled task's fs base: `pthread_self()` of the thread on x86-64 glibc and musl.
#[inline(always)]
fn fs_base(task: *const u8) -> Result<u64, i32> {
    let offset = loader_global(&FSBASE_OFFSET);
    if offset == 0 {
        return Err(0);
    }
    super::typed_field(task, offset).map_err(|e| e as i32)
}

/// State of the thread-list search, shared with its `bpf_loop` callback.
#[repr(C)]
struct ThreadSearch {
    task: *const u8,
    proc: *const PyProc,
    me: u64,
    interp: u64,
    tstate: u64,
    found: u64,
}

/// One step of the search: checks one thread state, or moves to the next interpreter.
extern "C" fn thread_step<const REMOTE: bool>(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `ThreadSearch` that `thread_state` hands `bpf_loop`, which calls
    // this function synchronously, one step at a time, while that search lives on its stack.
    let search = unsafe { &mut *(ctx as *mut ThreadSearch) };
    // SAFETY: `proc` comes from the `&PyProc` given to `thread_state`, a `PY_PROCS` value,
    // which outlives this program run (see `perf_sample`).
    let off = unsafe { &(*search.proc).offsets };
    let task = search.task;
    if search.tstate == 0 {
        // This interpreter's list is done: go to the next one.
        search.interp = field::<REMOTE, u64>(task, search.interp, off.interp_next).unwrap_or(0);
        if search.interp == 0 {
            return 1;
        }
        search.tstate = field::<REMOTE, u64>(task, search.interp, off.interp_threads_head).unwrap_or(0);
        return 0;
    }
    match field::<REMOTE, u64>(task, search.tstate, off.tstate_thread_id) {
        Ok(id) if id == search.me => {
            search.found = search.tstate;
            return 1;
        }
        Ok(_) => {}
        Err(_) => return 1,
    }
    search.tstate = field::<REMOTE, u64>(task, search.tstate, off.tstate_next).unwrap_or(0);
    0
}

/// Finds the `PyThreadState` of thread `tid` (cached, and validated on every use).
#[inline(always)]
fn thread_state<const REMOTE: bool>(task: *const u8, tid: u32, proc: &PyProc) -> Result<u64, i32> {
    let off = &proc.offsets;
    let me = fs_base(task)?;
    // SAFETY: the value is copied at once: a `u64`, valid for any bits, in a preallocated hash
    // map, which keeps it allocated even if userspace removes the entry meanwhile.
    if let Some(&cached) = unsafe { PY_THREADS.get(tid) }
        && field::<REMOTE, u64>(task, cached, off.tstate_thread_id) == Ok(me)
    {
        return Ok(cached);
    }
    let interp: u64 = read::<REMOTE, u64>(task, proc.interp_head_addr)?;
    if interp == 0 {
        return Err(0);
    }
    let tstate = field::<REMOTE, u64>(task, interp, off.interp_threads_head)?;
    let mut search = ThreadSearch { task, proc, me, interp, tstate, found: 0 };
    let steps = MAX_INTERPRETERS * (PY_MAX_THREADS + 1);
    // SAFETY: `thread_step` has the callback signature `bpf_loop` calls and reads its context
    // as the `ThreadSearch` passed here, which outlives the call.
    unsafe {
        bpf_loop(steps, thread_step::<REMOTE> as *mut c_void, (&mut search as *mut ThreadSearch).cast(), 0)
    };
    if search.found == 0 {
        return Err(0);
    }
    let _ = PY_THREADS.insert(tid, search.found, 0);
    Ok(search.found)
}

/// The innermost frame of a thread state (0 when the thread runs no Python code).
#[inline(always)]
fn current_frame<const REMOTE: bool>(task: *const u8, tstate: u64, off: &PyOffsets) -> Result<u64, i32> {
    let frame: u64 = field::<REMOTE, u64>(task, tstate, off.tstate_frame)?;
    if off.cframe_current_frame == NO_FIELD || frame == 0 {
        return Ok(frame);
    }
    field::<REMOTE, u64>(task, frame, off.cframe_current_frame)
}

/// The slot of the per-CPU scratch maps (`PY_SCRATCH`, `FRAME_BUF`) a walk uses: a walk of
/// another task's memory may sleep, and a sampling program on its CPU meanwhile must not
/// write over its scratch.
#[inline(always)]
const fn scratch<const REMOTE: bool>() -> u32 {
    REMOTE as u32
}

/// A frame index the verifier can see is in bounds: black_box hides the value's
/// known range from LLVM, so the mask survives optimisation and bounds the access.
#[inline(always)]
fn slot(index: usize) -> usize {
    core::hint::black_box(index) & (PY_MAX_FRAMES - 1)
}

/// State of the frame walk, shared with its `bpf_loop` callback. The frame count and flags
/// live in the scratch stack (a map value): a counter on the BPF stack would be tracked
/// precisely by the verifier, which then re-verifies the callback for every value.
#[repr(C)]
struct FrameWalk {
    task: *const u8,
    proc: *const PyProc,
    stack: *mut PyStack,
    frame: u64,
    hash: u64,
    /// The process and the clock's second, for `first_line`'s cache (remote walks).
    tgid: u32,
    epoch: u32,
}

/// One step of the walk: records one frame (or skips a shim) and moves out one level.
extern "C" fn frame_step<const REMOTE: bool>(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `FrameWalk` that `walk` hands `bpf_loop`, which calls this function
    // synchronously, one step at a time, while that walk lives on its stack.
    let walk = unsafe { &mut *(ctx as *mut FrameWalk) };
    if walk.frame == 0 {
        return 1;
    }
    // SAFETY: as in `thread_step`.
    let off = unsafe { &(*walk.proc).offsets };
    // SAFETY: `stack` is this CPU's `PY_SCRATCH` slot (see `walk`), not otherwise referenced
    // while `bpf_loop` runs.
    let stack = unsafe { &mut *walk.stack };
    let len = stack.len as usize;
    match read_frame::<REMOTE>(walk.task, walk.frame, off, walk.tgid, walk.epoch) {
        Ok(Step::Frame(record, previous)) => {
            if len >= PY_MAX_FRAMES {
                stack.flags |= PY_STACK_TRUNCATED;
                return 1;
            }
            stack.frames[slot(len)] = record;
            let mut hash = (walk.hash ^ record.code ^ (u64::from(record.instr_offset) << 40))
                .wrapping_mul(0x100_0000_01b3);
            hash = hash.rotate_left(17) ^ u64::from(record.line_flags);
            walk.hash = hash;
            stack.len = len as u32 + 1;
            walk.frame = previous;
        }
        Ok(Step::Shim(previous)) => {
            // The frame after a C-stack shim was entered by its own eval call.
            if len > 0 && len <= PY_MAX_FRAMES {
                let last = &mut stack.frames[slot(len - 1)];
                last.line_flags |= PY_FRAME_ENTRY << 24;
                walk.hash ^= 0x9e37_79b9;
            }
            walk.frame = previous;
        }
        Err(_) => {
            stack.flags |= PY_STACK_READ_ERROR;
            return 1;
        }
    }
    0
}

/// The innermost Python frame of thread `tid` (`task`): None when its thread state is not
/// found, 0 when it runs no Python code (or the frame could not be read). `signature` and
/// `walk` start from it, so a thread whose stack is fingerprinted and then walked has it
/// found once.
#[inline(always)]
pub fn innermost<const REMOTE: bool>(task: *const u8, tid: u32, proc: &PyProc) -> Option<u64> {
    if REMOTE {
        // A new thread: the window holds another's memory, or another process's.
        if let Some(window) = PY_WINDOW_BUF.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array, used only by remote walks (one at a
            // time on a CPU, as `PY_SCRATCH`'s remote slot); plain integers.
            unsafe { (*window).len = 0 };
        }
    }
    let tstate = thread_state::<REMOTE>(task, tid, proc).ok()?;
    Some(current_frame::<REMOTE>(task, tstate, &proc.offsets).unwrap_or(0))
}

/// Walks the sampled thread's Python frames, from its innermost one (`innermost`), into
/// the per-CPU scratch stack. Returns the stack and a hash of its frames, or None when the
/// thread has no Python frames.
#[inline(always)]
pub fn walk<const REMOTE: bool>(
    task: *const u8,
    tgid: u32,
    proc: &PyProc,
    innermost: Option<u64>,
) -> Option<(&'static mut PyStack, u64)> {
    let Some(frame) = innermost else {
        bump(stat::PY_NO_THREAD);
        return None;
    };
    if frame == 0 {
        return None;
    }
    // SAFETY: this CPU's slot of a per-CPU array: live and aligned while the program is loaded,
    // and used only by this run (tracing programs never nest on one CPU: the kernel skips one
    // that would); `PyStack` is plain integers.
    let stack = unsafe { &mut *PY_SCRATCH.get_ptr_mut(scratch::<REMOTE>())? };
    stack.len = 0;
    stack.flags = 0;
    let epoch = if REMOTE { code_line_epoch() } else { 0 };
    let mut walk = FrameWalk { task, proc, stack, frame, hash: 0xcbf2_9ce4_8422_2325, tgid, epoch };
    // A few extra steps for shim frames, which are skipped rather than recorded.
    let steps = (PY_MAX_FRAMES + PY_MAX_FRAMES / 4) as u32;
    // SAFETY: as in `thread_state`, with `frame_step` and this `FrameWalk`.
    unsafe { bpf_loop(steps, frame_step::<REMOTE> as *mut c_void, (&mut walk as *mut FrameWalk).cast(), 0) };
    // SAFETY: the scratch slot again, now that `bpf_loop` has returned.
    let stack = unsafe { &mut *walk.stack };
    if stack.len == 0 {
        return None;
    }
    if walk.frame != 0 && stack.flags & PY_STACK_READ_ERROR == 0 {
        stack.flags |= PY_STACK_TRUNCATED;
    }
    if stack.flags & PY_STACK_TRUNCATED != 0 {
        bump(stat::PY_TRUNCATED);
    }
    if stack.flags & PY_STACK_READ_ERROR != 0 {
        bump(stat::PY_READ_ERROR);
    }
    let hash = walk.hash ^ (u64::from(stack.flags) << 56 | u64::from(stack.len));
    Some((stack, if hash == 0 { 1 } else { hash }))
}

/// The address of process `proc`'s GIL (0: unknown).
#[inline(always)]
pub fn gil_address<const REMOTE: bool>(task: *const u8, proc: &PyProc) -> u64 {
    if proc.gil_addr != 0 {
        return proc.gil_addr;
    }
    if proc.offsets.interp_gil == NO_FIELD {
        return 0;
    }
    match read::<REMOTE, u64>(task, proc.interp_head_addr) {
        Ok(interp) if interp != 0 => interp + u64::from(proc.offsets.interp_gil),
        _ => 0,
    }
}

/// True when thread `tid` holds its process's GIL (or when that cannot be told: the GIL's
/// address is unknown or unreadable).
#[inline(always)]
pub fn holds_gil(task: *const u8, tid: u32, proc: &PyProc) -> bool {
    gil_holder(task, tid, proc).unwrap_or(true)
}

/// Whether thread `tid` holds its process's GIL; None when that cannot be told.
#[inline(always)]
pub fn gil_holder(task: *const u8, tid: u32, proc: &PyProc) -> Option<bool> {
    let gil = gil_address::<LOCAL>(task, proc);
    if gil == 0 {
        return None;
    }
    let (Ok(locked), Ok(holder)) =
        (read::<LOCAL, i32>(task, gil + PY_GIL_LOCKED), read::<LOCAL, u64>(task, gil + PY_GIL_LAST_HOLDER))
    else {
        return None;
    };
    Some(locked != 0 && thread_state::<LOCAL>(task, tid, proc).is_ok_and(|tstate| tstate == holder))
}

/// Frames `signature` reads: it tells stacks apart that differ in their innermost
/// `SIGNATURE_FRAMES` frames, or in where those frames are.
const SIGNATURE_FRAMES: usize = 3;

/// A cheap fingerprint of a thread's Python stack, from its innermost frame (`innermost`):
/// the addresses, code objects and instructions of its innermost frames (a few reads, where
/// a walk reads one or two per frame).
/// Equal fingerprints of one thread at two moments mean the same stack unless it returned
/// below those frames and came back to the same code at the same places and addresses.
/// None when a read failed.
#[inline(always)]
pub fn signature<const REMOTE: bool>(task: *const u8, mut frame: u64, off: &PyOffsets) -> Option<u64> {
    let mut sig: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..SIGNATURE_FRAMES {
        if frame == 0 {
            break;
        }
        let f = FrameFields::<REMOTE>::read(task, frame, off)?;
        let code: u64 = f.get(off.frame_code).ok()?;
        let instr: u64 = match off.instr_kind {
            instr_kind::LASTI_BYTES | instr_kind::LASTI_UNITS => f.get::<i32>(off.frame_instr).ok()? as u64,
            _ => f.get(off.frame_instr).ok()?,
        };
        sig = (sig ^ frame).wrapping_mul(0x100_0000_01b3);
        sig = (sig ^ code).wrapping_mul(0x100_0000_01b3);
        sig = (sig ^ instr).wrapping_mul(0x100_0000_01b3);
        frame = f.get(off.frame_previous).ok()?;
    }
    Some(if sig == 0 { 1 } else { sig })
}

/// The clock's second, roughly (2^30 ns), that `PY_CODE_LINES` entries are stamped with.
#[inline(always)]
fn code_line_epoch() -> u32 {
    // SAFETY: reads the monotonic clock; no arguments.
    (unsafe { bpf_ktime_get_ns() } >> 30) as u32
}

/// `co_firstlineno` of code object `code` (24 bits): for a walk of the current task's
/// memory read from it, where a read is cheap; for a remote walk from `PY_CODE_LINES` when
/// read there in the same second (`epoch`) for this process, else read and kept.
#[inline(always)]
fn first_line<const REMOTE: bool>(
    task: *const u8,
    code: u64,
    off: &PyOffsets,
    tgid: u32,
    epoch: u32,
) -> Result<u32, i32> {
    let key = [code, u64::from(tgid)];
    if REMOTE {
        // SAFETY: the value is copied at once: a `u64`, valid for any bits, in a preallocated
        // LRU map, which keeps it allocated even if the entry is evicted meanwhile.
        if let Some(&kept) = unsafe { PY_CODE_LINES.get(key) }
            && (kept >> 32) as u32 == epoch
        {
            return Ok(kept as u32);
        }
    }
    let line = field::<REMOTE, i32>(task, code, off.code_firstlineno)?.max(0) as u32 & 0x00ff_ffff;
    if REMOTE {
        let _ = PY_CODE_LINES.insert(key, u64::from(epoch) << 32 | u64::from(line), 0);
    }
    Ok(line)
}

enum Step {
    /// A frame to record, and the next one out.
    Frame(agent_ebpf::PyFrame, u64),
    /// A shim frame owned by the C stack: not recorded.
    Shim(u64),
}

/// A frame's fields: from one read of its prefix (or of its page, `windowed`) when that
/// succeeded, else one read each.
struct FrameFields<const REMOTE: bool> {
    task: *const u8,
    addr: u64,
    buf: *const u8,
}

impl<const REMOTE: bool> FrameFields<REMOTE> {
    #[inline(always)]
    fn read(task: *const u8, addr: u64, off: &PyOffsets) -> Option<Self> {
        let size = (off.frame_read_size as usize).min(PY_FRAME_CHUNK);
        if REMOTE
            && off.instr_kind == instr_kind::POINTER
            && size != 0
            && let Some(buf) = windowed(task, addr, size)
        {
            return Some(Self { task, addr, buf });
        }
        let buf = FRAME_BUF.get_ptr_mut(scratch::<REMOTE>())?;
        // SAFETY: this CPU's `FRAME_BUF` slot, used only by this run (as `PY_SCRATCH` in
        // `walk`); `size` is at most `PY_FRAME_CHUNK`, inside it.
        let dst = unsafe { &mut (&mut *buf)[..size] };
        // SAFETY: the helper checks the user address and fails rather than faulting; it writes
        // at most `dst.len()` bytes.
        if size == 0 || read_buf::<REMOTE>(task, addr, dst).is_err() {
            bump(stat::PY_FRAME_SLOW_READS);
            return Some(Self { task, addr, buf: core::ptr::null() });
        }
        Some(Self { task, addr, buf: buf as *const u8 })
    }

    #[inline(always)]
    fn get<T: Plain>(&self, offset: u32) -> Result<T, i32> {
        const { assert!(core::mem::size_of::<T>() <= 8, "the buffers have 8 spare bytes") };
        if self.buf.is_null() {
            return field::<REMOTE, T>(self.task, self.addr, offset);
        }
        // Masked into the buffer, whose 8 spare bytes cover the widest field.
        let at = offset as usize & (PY_FRAME_CHUNK - 1);
        // SAFETY: `buf` is this CPU's `FRAME_BUF` slot (`PY_FRAME_CHUNK + 8` bytes) or a place
        // in its window's page (`windowed`), with `PY_FRAME_CHUNK + 8` bytes after it, filled
        // by `read`; `at < PY_FRAME_CHUNK` and `T` has at most 8 bytes, so the read stays
        // inside; unaligned reads are allowed, and any bits are a valid `T` (`Plain`).
        Ok(unsafe { core::ptr::read_unaligned(self.buf.add(at) as *const T) })
    }
}

/// The `size` bytes at `addr` of `task`'s memory in this CPU's window (see `PyWindow`): read
/// with the rest of their page when the window does not hold them. None when that read
/// failed.
#[inline(always)]
fn windowed(task: *const u8, addr: u64, size: usize) -> Option<*const u8> {
    let window = PY_WINDOW_BUF.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot (see `innermost`), plain integers and bytes.
    let window = unsafe { &mut *window };
    // Held: in the window, and starting in its page (the offset is masked to the page).
    let held = window.len != 0
        && addr >= window.base
        && addr - window.base < PY_PAGE as u64
        && addr + size as u64 <= window.base + window.len;
    if !held {
        window.len = 0;
        let base = addr & !(PY_PAGE as u64 - 1);
        // At most a page and a frame prefix: within the window.
        let len = (addr - base) as usize + size;
        if len > PY_WINDOW {
            return None;
        }
        let dst = &mut window.bytes[..len];
        read_buf::<true>(task, base, dst).ok()?;
        window.base = base;
        window.len = len as u64;
    }
    // Masked into the page: the frame's prefix and the 8 spare bytes stay inside `bytes`
    // (`FrameFields::get` masks each field's offset into the prefix).
    let at = (addr - window.base) as usize & (PY_PAGE - 1);
    // SAFETY: `at` < `PY_PAGE`, and `bytes` has `PY_PAGE + PY_FRAME_CHUNK + 8` bytes.
    Some(unsafe { window.bytes.as_ptr().add(at) })
}

#[inline(always)]
fn read_frame<const REMOTE: bool>(
    task: *const u8,
    frame: u64,
    off: &PyOffsets,
    tgid: u32,
    epoch: u32,
) -> Result<Step, i32> {
    let f = FrameFields::<REMOTE>::read(task, frame, off).ok_or(0)?;
    let previous: u64 = f.get(off.frame_previous)?;
    if off.frame_owner != NO_FIELD && off.owner_cstack != NO_FIELD {
        let owner: u8 = f.get(off.frame_owner)?;
        // Owners from `owner_cstack` up are not Python frames (C-stack and interpreter shims).
        if u32::from(owner) >= off.owner_cstack {
            return Ok(Step::Shim(previous));
        }
    }
    let code = f.get::<u64>(off.frame_code)? & !off.executable_tag_mask;
    let instr_offset = match off.instr_kind {
        instr_kind::LASTI_BYTES => f.get::<i32>(off.frame_instr)?.max(0) as u32,
        instr_kind::LASTI_UNITS => f.get::<i32>(off.frame_instr)?.max(0) as u32 * 2,
        _ => {
            let instr: u64 = f.get(off.frame_instr)?;
            let start = code.wrapping_add(u64::from(off.code_adaptive));
            if instr >= start { (instr - start).min(u64::from(u32::MAX)) as u32 } else { 0 }
        }
    };
    let first_line = first_line::<REMOTE>(task, code, off, tgid, epoch)?;
    // Entered by its own eval call: every frame (3.8-3.10), or one whose `is_entry` says so.
    let entry = off.every_frame_entry != 0
        || (off.frame_is_entry != NO_FIELD && f.get::<u8>(off.frame_is_entry)? != 0);
    let flags = if entry { PY_FRAME_ENTRY } else { 0 };
    let record = agent_ebpf::PyFrame { code, instr_offset, line_flags: first_line | flags << 24 };
    Ok(Step::Frame(record, previous))
}
