//! Where CPython keeps what stoker reads: struct offsets per minor version (3.8-3.14, checked against the
//! local builds' DWARF) and, from 3.13 on, the offsets the target publishes itself in `_Py_DebugOffsets`.

/// The newest CPython minor release (3.x) stoker knows the layout of.
pub const LATEST_MINOR: u8 = 15;

/// A CPython version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    pub patch: u8,
}

/// Where a CPython version keeps its GIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gil {
    /// 3.8-3.11: in `_PyRuntime` (`ceval.gil`), at this offset.
    Runtime(u64),
    /// 3.12+: in each interpreter (`_gil`), at this offset of `PyInterpreterState`; the main
    /// interpreter uses its own.
    Interpreter(u64),
    /// Not known (GIL waits then show as lock waits).
    Unknown,
}

/// How a frame records the instruction it is executing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstrKind {
    /// 3.8-3.9: `int f_lasti`, a byte offset into `co_code`.
    LastiBytes,
    /// 3.10: `int f_lasti`, an index in 2-byte code units.
    LastiUnits,
    /// 3.11-3.12: `_Py_CODEUNIT *prev_instr`, the last instruction started.
    PrevInstr,
    /// 3.13+: `_Py_CODEUNIT *instr_ptr`, the instruction executing or about to.
    InstrPtr,
}

/// Byte offsets into CPython's runtime structures. `None` where a version has no such field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    // _PyRuntimeState
    pub runtime_interpreters_head: u64,
    /// Where the GIL (`struct _gil_runtime_state`) is.
    pub gil: Gil,
    // PyInterpreterState
    pub interp_next: u64,
    pub interp_threads_head: u64,
    // PyThreadState
    pub tstate_next: u64,
    pub tstate_thread_id: u64,
    pub tstate_native_thread_id: Option<u64>,
    /// 3.8-3.10 `frame`, 3.11-3.12 `cframe`, 3.13+ `current_frame`.
    pub tstate_frame: u64,
    /// 3.11-3.12: `_PyCFrame.current_frame`.
    pub cframe_current_frame: Option<u64>,
    // PyFrameObject (3.8-3.10) or _PyInterpreterFrame (3.11+)
    pub frame_previous: u64,
    /// `f_code` (3.8-3.12) or `f_executable` (3.13+).
    pub frame_code: u64,
    /// `f_lasti`, `prev_instr` or `instr_ptr`, as `instr_kind` says.
    pub frame_instr: u64,
    pub instr_kind: InstrKind,
    /// 3.11+: `owner` (a char).
    pub frame_owner: Option<u64>,
    /// 3.11: `is_entry` (a bool).
    pub frame_is_entry: Option<u64>,
    /// 3.12+: value of `owner` for shim frames owned by the C stack.
    ///
    /// That is the entry frame `_PyEval_EvalFrameDefault` pushes: `FRAME_OWNED_BY_CSTACK` (3) in
    /// 3.12-3.13, `FRAME_OWNED_BY_INTERPRETER` (also 3) in 3.14, whose `FRAME_OWNED_BY_CSTACK` (4) is
    /// never assigned. `owner >= owner_cstack` is "not a Python frame" on all of them.
    pub owner_cstack: Option<u8>,
    /// 3.14+: low bits of `f_executable` (a `_PyStackRef`) to clear to get the pointer.
    pub executable_tag_mask: u64,
    // PyCodeObject
    pub code_name: u64,
    pub code_qualname: Option<u64>,
    pub code_filename: u64,
    pub code_firstlineno: u64,
    /// `co_lnotab` (3.8-3.9) or `co_linetable` (3.10+), a bytes object.
    pub code_linetable: u64,
    /// 3.11+: offset of `co_code_adaptive`, the bytecode inline in the code object.
    pub code_adaptive: Option<u64>,
    // Strings
    /// `PyASCIIObject.state` (bit fields: kind, compact, ascii).
    pub unicode_state: u64,
    /// `PyASCIIObject.length`.
    pub unicode_length: u64,
    /// sizeof(PyASCIIObject): where a compact ASCII string's characters start.
    pub unicode_ascii_data: u64,
    /// sizeof(PyCompactUnicodeObject): where a compact non-ASCII string's data starts.
    pub unicode_compact_data: u64,
    /// `PyVarObject.ob_size` of a bytes object.
    pub bytes_size: u64,
    /// `PyBytesObject.ob_sval`.
    pub bytes_data: u64,
}

// Bit fields of the 32-bit `PyASCIIObject.state` word, read little-endian, numbered from its least
// significant bit: `interned` 0-1, `kind` 2-4, `compact` 5, `ascii` 6. The same in every default build
// of 3.8-3.14 (DWARF of 3.8-3.13, `Include/cpython/unicodeobject.h` of 3.14.0); free-threaded 3.14
// builds differ (`interned` is a whole byte there), which is one reason they are refused below.
/// First bit of `state.kind` (1, 2 or 4: bytes per character).
pub const UNICODE_STATE_KIND_SHIFT: u32 = 2;
/// `state.kind`, in place: `(state & MASK) >> SHIFT`.
pub const UNICODE_STATE_KIND_MASK: u32 = 0b111 << UNICODE_STATE_KIND_SHIFT;
/// Bit of `state.compact`: the characters follow the header.
pub const UNICODE_STATE_COMPACT_SHIFT: u32 = 5;
pub const UNICODE_STATE_COMPACT_MASK: u32 = 1 << UNICODE_STATE_COMPACT_SHIFT;
/// Bit of `state.ascii`: all characters are ASCII (data at `unicode_ascii_data`).
pub const UNICODE_STATE_ASCII_SHIFT: u32 = 6;
pub const UNICODE_STATE_ASCII_MASK: u32 = 1 << UNICODE_STATE_ASCII_SHIFT;

// Values of `owner` in `_PyInterpreterFrame` (enum _frameowner): THREAD 0, GENERATOR 1, FRAME_OBJECT 2
// in 3.11-3.14; 3.11 has nothing more (the first frame of an eval loop has `is_entry` set); 3.12-3.13
// add CSTACK 3, the owner of the eval loop's entry (shim) frame; 3.14 inserts INTERPRETER 3, moves
// CSTACK to 4, and gives the entry frame INTERPRETER (CPython's `_PyFrame_IsIncomplete` tests
// `owner >= FRAME_OWNED_BY_INTERPRETER`), hence `owner_cstack` 3 there too.

/// 3.8 (checked against 3.8.18's DWARF).
const PY38: Layout = Layout {
    runtime_interpreters_head: 32,
    gil: Gil::Runtime(1152),
    interp_next: 0,
    interp_threads_head: 8, // tstate_head
    tstate_next: 8,
    tstate_thread_id: 176,
    tstate_native_thread_id: None,
    tstate_frame: 24,
    cframe_current_frame: None,
    frame_previous: 24, // f_back
    frame_code: 32,
    frame_instr: 104,
    instr_kind: InstrKind::LastiBytes,
    frame_owner: None,
    frame_is_entry: None,
    owner_cstack: None,
    executable_tag_mask: 0,
    code_name: 112,
    code_qualname: None,
    code_filename: 104,
    code_firstlineno: 40,
    code_linetable: 120, // co_lnotab
    code_adaptive: None,
    unicode_state: 32,
    unicode_length: 16,
    unicode_ascii_data: 48, // PyASCIIObject still has `wchar_t *wstr` up to 3.11
    unicode_compact_data: 72,
    bytes_size: 16,
    bytes_data: 32,
};

/// 3.9 (3.9.18): every field stoker reads sits where it did in 3.8.
const PY39: Layout = Layout { gil: Gil::Runtime(352), ..PY38 };

/// 3.10 (3.10.13): `f_lasti` moved and counts code units; `co_lnotab` became `co_linetable`, same place.
const PY310: Layout = Layout { frame_instr: 96, instr_kind: InstrKind::LastiUnits, ..PY39 };

/// 3.11 (3.11.7): `_PyInterpreterFrame` reached through `tstate->cframe->current_frame`.
const PY311: Layout = Layout {
    runtime_interpreters_head: 40,
    gil: Gil::Runtime(360),
    interp_next: 0,
    interp_threads_head: 16, // threads.head
    tstate_next: 8,
    tstate_thread_id: 152,
    tstate_native_thread_id: Some(160),
    tstate_frame: 56, // cframe
    cframe_current_frame: Some(8),
    frame_previous: 48,
    frame_code: 32,
    frame_instr: 56, // prev_instr
    instr_kind: InstrKind::PrevInstr,
    frame_owner: Some(69),
    frame_is_entry: Some(68),
    owner_cstack: None,
    executable_tag_mask: 0,
    code_name: 120,
    code_qualname: Some(128),
    code_filename: 112,
    code_firstlineno: 72,
    code_linetable: 136,
    code_adaptive: Some(184),
    unicode_state: 32,
    unicode_length: 16,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    bytes_size: 16,
    bytes_data: 32,
};

/// 3.12 (3.12.1): `wstr` gone from strings; shim frames owned by the C stack.
const PY312: Layout = Layout {
    runtime_interpreters_head: 40,
    gil: Gil::Interpreter(1040),
    interp_next: 0,
    interp_threads_head: 72,
    tstate_next: 8,
    tstate_thread_id: 136,
    tstate_native_thread_id: Some(144),
    tstate_frame: 56, // cframe
    cframe_current_frame: Some(0),
    frame_previous: 8,
    frame_code: 0,
    frame_instr: 56, // prev_instr
    instr_kind: InstrKind::PrevInstr,
    frame_owner: Some(70),
    frame_is_entry: None,
    owner_cstack: Some(3),
    executable_tag_mask: 0,
    code_name: 120,
    code_qualname: Some(128),
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    code_adaptive: Some(192),
    unicode_state: 32,
    unicode_length: 16,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    bytes_size: 16,
    bytes_data: 32,
};

/// 3.13 (3.13.0): `_PyCFrame` gone, `tstate->current_frame`; `_Py_DebugOffsets` (584 bytes) heads
/// `_PyRuntime`, and `PyInterpreterState` starts with `struct _ceval_state` (7264 bytes).
const PY313: Layout = Layout {
    runtime_interpreters_head: 632,
    gil: Gil::Interpreter(7752),
    interp_next: 7264,
    interp_threads_head: 7344,
    tstate_next: 8,
    tstate_thread_id: 152,
    tstate_native_thread_id: Some(160),
    tstate_frame: 72, // current_frame
    cframe_current_frame: None,
    frame_previous: 8,
    frame_code: 0,   // f_executable
    frame_instr: 56, // instr_ptr
    instr_kind: InstrKind::InstrPtr,
    frame_owner: Some(70),
    frame_is_entry: None,
    owner_cstack: Some(3),
    executable_tag_mask: 0,
    code_name: 120,
    code_qualname: Some(128),
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    code_adaptive: Some(200),
    ..PY312 // strings and bytes as in 3.12
};

/// 3.14, computed by hand from the v3.14.0 headers (x86-64: pointers and `long` 8 bytes, `int` 4,
/// default build: no `Py_GIL_DISABLED`, no `Py_DEBUG`). No 3.14 build was at hand to check it; the
/// values agree with offsets other profilers generated from the v3.14.0 headers. Later 3.14.x
/// releases changed the GC state inside `PyInterpreterState`, moving the fields behind it; stoker
/// reads none of those.
const PY314: Layout = Layout {
    // pycore_runtime_structs.h: _Py_DebugOffsets debug_offsets (760 bytes, see FORMAT_314) 0;
    // int _initialized, preinitializing, preinitialized, core_initialized, initialized 760..780;
    // PyThreadState *_finalizing 784; unsigned long _finalizing_id 792;
    // struct pyinterpreters { PyMutex mutex 800; PyInterpreterState *head 808; ... }.
    runtime_interpreters_head: 808,
    // From `_Py_DebugOffsets` (`interpreter_state.gil_runtime_state`).
    gil: Gil::Unknown,
    // pycore_interp_structs.h, struct _is: struct _ceval_state ceval 0 (7264 bytes, as in 3.13:
    // instrumentation_version 0, recursion_limit 8, gil 16, own_gil 24, _pending_calls 32..7264);
    // void *_malloced 7264; PyInterpreterState *next 7272; int64_t id 7280; Py_ssize_t id_refcount 7288;
    // int requires_idref 7296; long _whence 7304; int _initialized, _ready, finalizing 7312..7324;
    // uintptr_t last_restart_version 7328; struct pythreads { uint64_t next_unique_id 7336;
    // PyThreadState *head 7344; ... }.
    interp_next: 7272,
    interp_threads_head: 7344,
    // cpython/pystate.h, struct _ts: prev 0, next 8, interp 16, uintptr_t eval_breaker 24, _status 32
    // (4 bytes), int holds_gil 36, _whence 40, state 44, py_recursion_remaining 48,
    // py_recursion_limit 52, recursion_headroom 56, tracing 60, what_event 64;
    // _PyInterpreterFrame *current_frame 72; c_profilefunc 80, c_tracefunc 88, c_profileobj 96,
    // c_traceobj 104, current_exception 112, exc_info 120, dict 128, int gilstate_counter 136,
    // async_exc 144, unsigned long thread_id 152, unsigned long native_thread_id 160.
    tstate_next: 8,
    tstate_thread_id: 152,
    tstate_native_thread_id: Some(160),
    tstate_frame: 72,
    cframe_current_frame: None,
    // pycore_interpframe_structs.h: _PyStackRef f_executable 0; previous 8; _PyStackRef f_funcobj 16;
    // f_globals 24, f_builtins 32, f_locals 40, frame_obj 48; _Py_CODEUNIT *instr_ptr 56;
    // _PyStackRef *stackpointer 64; uint16_t return_offset 72; char owner 74; uint8_t visited 75;
    // localsplus 80. The entry frame (owner FRAME_OWNED_BY_INTERPRETER = 3) has f_executable None.
    frame_previous: 8,
    frame_code: 0,
    frame_instr: 56,
    instr_kind: InstrKind::InstrPtr,
    frame_owner: Some(74),
    frame_is_entry: None,
    owner_cstack: Some(3),
    // pycore_stackref.h (default build): Py_TAG_BITS 3; Py_TAG_REFCNT (bit 0) marks immortal or
    // borrowed references and is what PyStackRef_AsPyObjectBorrow clears; bit 1 is only set on tagged
    // ints (Py_INT_TAG 3), never in f_executable. Clearing both, as CPython's own remote unwinder does,
    // is safe for an object pointer.
    executable_tag_mask: 0b11,
    // cpython/code.h, _PyCode_DEF: PyVarObject 0..24; co_consts 24, co_names 32, co_exceptiontable 40;
    // int co_flags 48, co_argcount 52, co_posonlyargcount 56, co_kwonlyargcount 60, co_stacksize 64,
    // co_firstlineno 68, co_nlocalsplus 72, co_framesize 76, co_nlocals 80, co_ncellvars 84,
    // co_nfreevars 88, uint32_t co_version 92; co_localsplusnames 96, co_localspluskinds 104,
    // co_filename 112, co_name 120, co_qualname 128, co_linetable 136, co_weakreflist 144,
    // co_executors 152, _co_cached 160, _co_instrumentation_version 168, _co_monitoring 176,
    // Py_ssize_t _co_unique_id 184 (new in 3.14), int _co_firsttraceable 192, co_extra 200;
    // char co_code_adaptive[] 208.
    code_name: 120,
    code_qualname: Some(128),
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    code_adaptive: Some(208),
    // cpython/unicodeobject.h: PyASCIIObject { PyObject 0..16; length 16; hash 24; state 32 (4 bytes,
    // padded) } = 40; PyCompactUnicodeObject { PyASCIIObject; utf8_length 40; utf8 48 } = 56.
    // cpython/bytesobject.h: PyBytesObject { PyVarObject (ob_size 16); ob_shash 24; ob_sval 32 }.
    ..PY312
};

/// The offset table for `version` (x86-64 Linux, default build), or `None` outside 3.8-3.14.
pub fn layout_for(version: PyVersion) -> Option<Layout> {
    match (version.major, version.minor) {
        (3, 8) => Some(PY38),
        (3, 9) => Some(PY39),
        (3, 10) => Some(PY310),
        (3, 11) => Some(PY311),
        (3, 12) => Some(PY312),
        (3, 13) => Some(PY313),
        (3, 14) => Some(PY314),
        _ => None,
    }
}

/// Bytes of the target's memory, from `&_PyRuntime` on, to pass to [`layout_from_debug_offsets`]:
/// sizeof(`_Py_DebugOffsets`) in 3.15 (888; it is 760 in 3.14 and 584 in 3.13). `_PyRuntime` is far larger in all,
/// so the read stays inside the object.
pub const DEBUG_OFFSETS_LEN: usize = 888;

/// Why `_Py_DebugOffsets` could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebugOffsetsError {
    #[error("CPython {major}.{minor} has no _Py_DebugOffsets layout that stoker knows.")]
    UnsupportedVersion { major: u8, minor: u8 },
    #[error("Got {got} bytes of _PyRuntime but _Py_DebugOffsets needs {need}.")]
    TooShort { need: usize, got: usize },
    #[error("The bytes at _PyRuntime do not start with the \"xdebugpy\" cookie.")]
    BadCookie,
    #[error("_Py_DebugOffsets is from CPython version {found:#010x}, not {major}.{minor}.")]
    VersionMismatch { major: u8, minor: u8, found: u64 },
    #[error("The target is a free-threaded CPython build, which stoker does not support.")]
    FreeThreaded,
    #[error("The _Py_DebugOffsets entry for {field} is implausible ({value}).")]
    Implausible { field: &'static str, value: u64 },
}

/// Where the sections of `_Py_DebugOffsets` that stoker reads start, and its size.
struct DebugOffsetsFormat {
    len: usize,
    /// Index of `gil_runtime_state` in `interpreter_state` (3.14 inserted `threads_main`).
    gil_index: usize,
    sections: [(&'static str, usize); 8],
    /// Fields whose index in their section differs from `USED_FIELDS`'.
    moved: &'static [(&'static str, usize)],
    /// Index of `compactunicodeobject_size` in `unicode_object` (3.15 on), the start of a
    /// compact string's characters.
    compact_size_index: Option<usize>,
}

/// 3.13 (`Include/internal/pycore_runtime.h`), checked against 3.13.0's DWARF.
const FORMAT_313: DebugOffsetsFormat = DebugOffsetsFormat {
    len: 584,
    gil_index: 9,
    sections: [
        ("runtime_state", 24),
        ("interpreter_state", 48),
        ("thread_state", 152),
        ("interpreter_frame", 224),
        ("code_object", 272),
        ("pyobject", 352),
        ("bytes_object", 512),
        ("unicode_object", 536),
    ],
    moved: &[],
    compact_size_index: None,
};

/// 3.14 (`Include/internal/pycore_debug_offsets.h` of v3.14.0): after cookie, version and
/// free_threaded come runtime_state (3 words), interpreter_state (16: 3.13's 13 plus threads_main,
/// code_object_generation, tlbc_generation), thread_state (9), interpreter_frame (8: + stackpointer,
/// tlbc_index), code_object (11: + co_tlbc), pyobject (2), type_object (4), tuple_object (3),
/// list_object (3), set_object (4, new), dict_object (3), float_object (2), long_object (3),
/// bytes_object (3), unicode_object (4), gc (2), gen_object (4), llist_node (2), debugger_support (6).
const FORMAT_314: DebugOffsetsFormat = DebugOffsetsFormat {
    len: 760,
    gil_index: 10,
    sections: [
        ("runtime_state", 24),
        ("interpreter_state", 48),
        ("thread_state", 176),
        ("interpreter_frame", 248),
        ("code_object", 312),
        ("pyobject", 400),
        ("bytes_object", 592),
        ("unicode_object", 616),
    ],
    moved: &[],
    compact_size_index: None,
};

/// 3.15 (`Include/internal/pycore_debug_offsets.h` of v3.15.2): as 3.14, but thread_state has 16
/// entries (base_frame, last_profiled_frame and last_profiled_frame_seq after current_frame, so
/// thread_id and native_thread_id are 8 and 9; holds_gil, gil_requested, current_exception and
/// exc_state at its end), err_stackitem (1) follows it, type_object has 6 (+ tp_basicsize,
/// tp_dictoffset), heap_type_object (2) is new, unicode_object has 5 (+ compactunicodeobject_size)
/// and gc 5 (+ frame, generation_stats_size, generation_stats).
const FORMAT_315: DebugOffsetsFormat = DebugOffsetsFormat {
    len: 888,
    gil_index: 10,
    sections: [
        ("runtime_state", 24),
        ("interpreter_state", 48),
        ("thread_state", 176),
        ("interpreter_frame", 312),
        ("code_object", 376),
        ("pyobject", 464),
        ("bytes_object", 688),
        ("unicode_object", 712),
    ],
    moved: &[("thread_state.thread_id", 8), ("thread_state.native_thread_id", 9)],
    compact_size_index: Some(4),
};

/// The `_Py_DebugOffsets` entries stoker reads, as `section.field` and the index of the field in its
/// section (a run of `uint64_t`s, the first being the struct's size). The indexes are the same in
/// 3.13 and 3.14; only where the sections start moved.
const USED_FIELDS: [(&str, usize); 23] = [
    ("runtime_state.interpreters_head", 2),
    ("interpreter_state.next", 2),
    ("interpreter_state.threads_head", 3),
    ("thread_state.next", 2),
    ("thread_state.current_frame", 4),
    ("thread_state.thread_id", 5),
    ("thread_state.native_thread_id", 6),
    ("interpreter_frame.previous", 1),
    ("interpreter_frame.executable", 2),
    ("interpreter_frame.instr_ptr", 3),
    ("interpreter_frame.owner", 5),
    ("code_object.filename", 1),
    ("code_object.name", 2),
    ("code_object.qualname", 3),
    ("code_object.linetable", 4),
    ("code_object.firstlineno", 5),
    ("code_object.co_code_adaptive", 9),
    ("pyobject.ob_type", 1),
    ("bytes_object.ob_size", 1),
    ("bytes_object.ob_sval", 2),
    ("unicode_object.state", 1),
    ("unicode_object.length", 2),
    ("unicode_object.asciiobject_size", 3),
];

impl DebugOffsetsFormat {
    /// Byte positions, in `_Py_DebugOffsets`, of the section of `field` (one of `USED_FIELDS`) and
    /// of the field itself.
    fn position(&self, field: &str) -> (usize, usize) {
        let (section, _) = field.split_once('.').expect("section.field");
        let start = self.sections.iter().find(|s| s.0 == section).expect("known section").1;
        let index = self.moved.iter().chain(&USED_FIELDS).find(|f| f.0 == field).expect("known field").1;
        (start, start + 8 * index)
    }
}

/// No struct stoker reads through these offsets is anywhere near this big (`_PyRuntimeState`, the
/// largest, is under 0.5 MiB in 3.8-3.13).
const MAX_STRUCT_SIZE: u64 = 1 << 24;

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The layout of a 3.13+ target, from its own `_Py_DebugOffsets`: `runtime` is memory read from
/// `&_PyRuntime` on, at least [`DEBUG_OFFSETS_LEN`] bytes (3.13 needs only 584). Fields that
/// `_Py_DebugOffsets` does not carry (`instr_kind`, `owner_cstack`, `executable_tag_mask`,
/// `unicode_compact_data`, the `None`s) come from [`layout_for`]. Supports 3.13 and 3.14, default
/// (not free-threaded) builds; every offset used is checked to fall inside the struct it indexes.
pub fn layout_from_debug_offsets(version: PyVersion, runtime: &[u8]) -> Result<Layout, DebugOffsetsError> {
    let (format, table) = match (version.major, version.minor) {
        (3, 13) => (&FORMAT_313, PY313),
        (3, 14) => (&FORMAT_314, PY314),
        // No table of its own: what `_Py_DebugOffsets` does not carry (the instruction pointer
        // kind, the entry frame's owner FRAME_OWNED_BY_INTERPRETER = 3, the stack reference
        // tag bits Py_TAG_BITS = 3) is as in 3.14 (pycore_interpframe_structs.h and
        // pycore_stackref.h of v3.15.2).
        (3, 15) => (&FORMAT_315, Layout { gil: Gil::Unknown, ..PY314 }),
        // A release newer than any stoker knows: read as the latest it knows, the checks
        // below and the code-object check on its first samples (`CodeReader`) telling
        // whether that still holds.
        (3, minor) if minor > LATEST_MINOR => (&FORMAT_315, Layout { gil: Gil::Unknown, ..PY314 }),
        (major, minor) => return Err(DebugOffsetsError::UnsupportedVersion { major, minor }),
    };
    if runtime.len() < format.len {
        return Err(DebugOffsetsError::TooShort { need: format.len, got: runtime.len() });
    }
    if &runtime[..8] != b"xdebugpy" {
        return Err(DebugOffsetsError::BadCookie);
    }
    // PY_VERSION_HEX: major << 24 | minor << 16 | micro << 8 | level << 4 | serial.
    let found = read_u64(runtime, 8);
    if (found >> 24, (found >> 16) & 0xff) != (u64::from(version.major), u64::from(version.minor)) {
        return Err(DebugOffsetsError::VersionMismatch { major: version.major, minor: version.minor, found });
    }
    if read_u64(runtime, 16) != 0 {
        return Err(DebugOffsetsError::FreeThreaded);
    }

    // A field, checked to lie inside the struct whose size heads its section.
    let field = |name: &'static str| {
        let (section, at) = format.position(name);
        let size = read_u64(runtime, section);
        if size == 0 || size > MAX_STRUCT_SIZE {
            return Err(DebugOffsetsError::Implausible { field: name, value: size });
        }
        let value = read_u64(runtime, at);
        if value >= size {
            return Err(DebugOffsetsError::Implausible { field: name, value });
        }
        Ok(value)
    };
    // A default build's PyObject is 16 bytes with ob_type at 8: a misread layout would not say so.
    let (pyobject, ob_type) = format.position("pyobject.ob_type");
    for (at, want, name) in [(pyobject, 16, "pyobject.size"), (ob_type, 8, "pyobject.ob_type")] {
        let value = read_u64(runtime, at);
        if value != want {
            return Err(DebugOffsetsError::Implausible { field: name, value });
        }
    }

    // The GIL's offset in the interpreter, checked like the fields above.
    let (interp, _) = format.position("interpreter_state.next");
    let interp_size = read_u64(runtime, interp);
    let gil = read_u64(runtime, interp + 8 * format.gil_index);
    if gil == 0 || gil >= interp_size {
        return Err(DebugOffsetsError::Implausible {
            field: "interpreter_state.gil_runtime_state",
            value: gil,
        });
    }

    // Where a compact string's characters start, where the target says so.
    let unicode_compact_data = match format.compact_size_index {
        Some(index) => {
            let (unicode, _) = format.position("unicode_object.state");
            let value = read_u64(runtime, unicode + 8 * index);
            if value == 0 || value > 256 {
                return Err(DebugOffsetsError::Implausible {
                    field: "unicode_object.compactunicodeobject_size",
                    value,
                });
            }
            value
        }
        None => table.unicode_compact_data,
    };

    Ok(Layout {
        unicode_compact_data,
        runtime_interpreters_head: field("runtime_state.interpreters_head")?,
        gil: Gil::Interpreter(gil),
        interp_next: field("interpreter_state.next")?,
        interp_threads_head: field("interpreter_state.threads_head")?,
        tstate_next: field("thread_state.next")?,
        tstate_thread_id: field("thread_state.thread_id")?,
        tstate_native_thread_id: Some(field("thread_state.native_thread_id")?),
        tstate_frame: field("thread_state.current_frame")?,
        frame_previous: field("interpreter_frame.previous")?,
        frame_code: field("interpreter_frame.executable")?,
        frame_instr: field("interpreter_frame.instr_ptr")?,
        frame_owner: Some(field("interpreter_frame.owner")?),
        code_name: field("code_object.name")?,
        code_qualname: Some(field("code_object.qualname")?),
        code_filename: field("code_object.filename")?,
        code_firstlineno: field("code_object.firstlineno")?,
        code_linetable: field("code_object.linetable")?,
        code_adaptive: Some(field("code_object.co_code_adaptive")?),
        unicode_state: field("unicode_object.state")?,
        unicode_length: field("unicode_object.length")?,
        unicode_ascii_data: field("unicode_object.asciiobject_size")?,
        bytes_size: field("bytes_object.ob_size")?,
        bytes_data: field("bytes_object.ob_sval")?,
        ..table
    })
}

#[cfg(test)]
#[path = "layout_tests.rs"]
mod tests;
