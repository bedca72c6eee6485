//! Python, shared with userspace: the CPython offsets and processes userspace hands the
//! kernel frame walker (`programs/python.rs`), and the Python stacks it records.

/// Python processes to walk: tgid -> `PyProc`.
pub const MAP_PY_PROCS: &str = "PY_PROCS";
/// Python stacks by hash: u64 -> `PyStack`.
pub const MAP_PY_STACKS: &str = "PY_STACKS";
/// Cache of each Python thread's `PyThreadState`: tid -> address.
pub const MAP_PY_THREADS: &str = "PY_THREADS";
/// Global set by the loader: offset of `thread.fsbase` in `task_struct` (from BTF).
pub const GLOBAL_FSBASE_OFFSET: &str = "FSBASE_OFFSET";

/// Capacity of the Python stacks map (unique Python stacks).
pub const PY_STACKS_CAPACITY: u32 = 8 * 1024;
/// Capacity of the Python thread-state cache.
pub const PY_THREADS_CAPACITY: u32 = 16 * 1024;
/// Code objects whose first line the wall-clock sampler keeps (see the kernel's `PY_CODE_LINES`).
pub const PY_CODE_LINES_CAPACITY: u32 = 16 * 1024;
/// Python frames kept per sample; deeper stacks lose their root end and are marked.
pub const PY_MAX_FRAMES: usize = 128;
const _: () = assert!(PY_MAX_FRAMES.is_power_of_two(), "the walker masks frame indexes");
/// Threads of one interpreter searched for the sampled thread's `PyThreadState`.
pub const PY_MAX_THREADS: u32 = 128;
/// Offset value meaning "this CPython version has no such field".
pub const NO_FIELD: u32 = u32::MAX;

/// How a CPython frame records its current instruction (`PyOffsets::instr_kind`).
pub mod instr_kind {
    /// 3.8-3.9: `int f_lasti`, bytes.
    pub const LASTI_BYTES: u32 = 0;
    /// 3.10: `int f_lasti`, 2-byte code units.
    pub const LASTI_UNITS: u32 = 1;
    /// 3.11+: a pointer to the instruction (`prev_instr` or `instr_ptr`).
    pub const POINTER: u32 = 2;
}

/// CPython structure offsets the kernel walker needs, from userspace (`NO_FIELD` = absent).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyOffsets {
    pub interp_next: u32,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_thread_id: u32,
    /// `frame` (3.8-3.10), `cframe` (3.11-3.12), `current_frame` (3.13+).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame` (3.11-3.12).
    pub cframe_current_frame: u32,
    pub frame_previous: u32,
    pub frame_code: u32,
    pub frame_instr: u32,
    /// `instr_kind::*`.
    pub instr_kind: u32,
    pub frame_owner: u32,
    pub frame_is_entry: u32,
    /// Lowest `owner` value of shim frames that are not Python frames (3.12+), or `NO_FIELD`.
    pub owner_cstack: u32,
    pub code_firstlineno: u32,
    /// Offset of the bytecode inside the code object (3.11+).
    pub code_adaptive: u32,
    /// 1 when every frame is evaluated by its own C call (3.8-3.10).
    pub every_frame_entry: u32,
    /// Bytes from a frame's start that cover every field read (at most `PY_FRAME_CHUNK`;
    /// 0: read fields one by one). One read of them replaces several small ones.
    pub frame_read_size: u32,
    /// Offset of the GIL (`_gil`) in the main interpreter (3.12+), or `NO_FIELD` when the GIL
    /// is at `PyProc::gil_addr` (3.8-3.11: in `_PyRuntime`).
    pub interp_gil: u32,
    /// Bits to clear from `f_executable` (3.14 stack references).
    pub executable_tag_mask: u64,
}
const _: () = assert!(core::mem::size_of::<PyOffsets>() == 80);

// SAFETY: `repr(C)`, integers only, the padding an explicit field (size asserted): any bit
// pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PyOffsets {}

/// Largest frame prefix the walker reads at once.
pub const PY_FRAME_CHUNK: usize = 128;

/// The page size the window (`PyWindow`) reads whole pages of (x86-64's).
pub const PY_PAGE: usize = 4096;
/// Bytes of a walk's window (`PyWindow`): a page, and a frame prefix that may cross out of it.
pub const PY_WINDOW: usize = PY_PAGE + PY_FRAME_CHUNK;

/// Frames of another task's memory read a page at once: 3.11+ keeps a thread's frames one
/// below the other in its data stack, so a read from the start of a frame's page to its
/// end holds its callers on that page too, and a walk reads once per page rather than once
/// per frame. `len` 0: nothing read (each walk of a thread starts so).
#[repr(C)]
pub struct PyWindow {
    /// The user address of `bytes[0]`.
    pub base: u64,
    /// Bytes read from `base`.
    pub len: u64,
    /// 8 spare bytes let a masked offset read 8 bytes without a further bounds check.
    pub bytes: [u8; PY_WINDOW + 8],
}

/// `PyProc::flags` bit: also record native (user and kernel) stacks of samples that
/// have a Python stack. Without it those samples cost only the Python walk.
pub const PY_PROC_NATIVE: u32 = 1;
/// `PyProc::flags` bit: count CPU samples only of threads that hold the GIL (`--gil`).
pub const PY_PROC_GIL_ONLY: u32 = 2;
/// `PyProc::flags` bit: count the process's CPU samples of the thread that holds the GIL in
/// `GIL_HELD` (the agent's GIL-held time).
pub const PY_PROC_GIL_COUNT: u32 = 4;
/// CPU samples of a process's GIL holder: tgid -> per-CPU samples (`PY_PROC_GIL_COUNT`).
pub const MAP_GIL_HELD: &str = "GIL_HELD";
/// Offsets in CPython's `struct _gil_runtime_state` (3.8-3.14): `last_holder` (the thread
/// state that took it last) and `locked` (an int: 1 while held).
pub const PY_GIL_LAST_HOLDER: u64 = 8;
pub const PY_GIL_LOCKED: u64 = 16;

/// One Python process for the kernel walker.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyProc {
    /// Address of `_PyRuntime.interpreters.head` in the process.
    pub interp_head_addr: u64,
    pub offsets: PyOffsets,
    /// `PY_PROC_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// Address of the GIL (`struct _gil_runtime_state`) when it is in `_PyRuntime`, else 0
    /// (see `PyOffsets::interp_gil`).
    pub gil_addr: u64,
}
const _: () = assert!(core::mem::size_of::<PyProc>() == 104);

/// Size of CPython's `struct _gil_runtime_state` (3.8-3.14): a futex wait on an address in it
/// is a wait for the GIL.
pub const PY_GIL_SIZE: u64 = 208;

// SAFETY: `repr(C)`, integers and a `PyOffsets` (itself `Pod`), the padding an explicit field
// (size asserted): any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PyProc {}

/// `PyFrame::flags` bit: this frame was entered by its own C-level eval call.
pub const PY_FRAME_ENTRY: u32 = 1;

/// One Python frame as sampled: the code object, the instruction's byte offset in its
/// bytecode, and `co_firstlineno` to detect a code object freed and its address reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub code: u64,
    pub instr_offset: u32,
    /// Low 24 bits: `co_firstlineno`; high 8 bits: `PY_FRAME_*` flags.
    pub line_flags: u32,
}
const _: () = assert!(core::mem::size_of::<PyFrame>() == 16);

// SAFETY: `repr(C)`, integers only, no padding (size asserted): any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PyFrame {}

impl PyFrame {
    pub fn first_line(&self) -> u32 {
        self.line_flags & 0x00ff_ffff
    }

    pub fn flags(&self) -> u32 {
        self.line_flags >> 24
    }
}

/// `PyStack::flags` bit: the walk hit `PY_MAX_FRAMES`; the root end is missing.
pub const PY_STACK_TRUNCATED: u32 = 1;
/// `PyStack::flags` bit: a read failed; the root end is missing.
pub const PY_STACK_READ_ERROR: u32 = 2;

/// A Python stack, leaf first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStack {
    pub len: u32,
    pub flags: u32,
    pub frames: [PyFrame; PY_MAX_FRAMES],
}
const _: () = assert!(core::mem::size_of::<PyStack>() == 8 + 16 * PY_MAX_FRAMES);

// SAFETY: `repr(C)`, integers and an array of `PyFrame`s (itself `Pod`), no padding (size
// asserted): any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PyStack {}
