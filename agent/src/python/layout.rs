//! Where CPython keeps what stoker reads: struct offsets per minor version (3.8-3.14, checked against the
//! local builds' DWARF) and, from 3.13 on, the offsets the target publishes itself in `_Py_DebugOffsets`.

/// A CPython version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    pub patch: u8,
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
const PY39: Layout = Layout { ..PY38 };

/// 3.10 (3.10.13): `f_lasti` moved and counts code units; `co_lnotab` became `co_linetable`, same place.
const PY310: Layout = Layout { frame_instr: 96, instr_kind: InstrKind::LastiUnits, ..PY39 };

/// 3.11 (3.11.7): `_PyInterpreterFrame` reached through `tstate->cframe->current_frame`.
const PY311: Layout = Layout {
    runtime_interpreters_head: 40,
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
/// sizeof(`_Py_DebugOffsets`) in 3.14 (760; it is 584 in 3.13). `_PyRuntime` is far larger in both,
/// so the read stays inside the object.
pub const DEBUG_OFFSETS_LEN: usize = 760;

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
    sections: [(&'static str, usize); 8],
}

/// 3.13 (`Include/internal/pycore_runtime.h`), checked against 3.13.0's DWARF.
const FORMAT_313: DebugOffsetsFormat = DebugOffsetsFormat {
    len: 584,
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
};

/// 3.14 (`Include/internal/pycore_debug_offsets.h` of v3.14.0): after cookie, version and
/// free_threaded come runtime_state (3 words), interpreter_state (16: 3.13's 13 plus threads_main,
/// code_object_generation, tlbc_generation), thread_state (9), interpreter_frame (8: + stackpointer,
/// tlbc_index), code_object (11: + co_tlbc), pyobject (2), type_object (4), tuple_object (3),
/// list_object (3), set_object (4, new), dict_object (3), float_object (2), long_object (3),
/// bytes_object (3), unicode_object (4), gc (2), gen_object (4), llist_node (2), debugger_support (6).
const FORMAT_314: DebugOffsetsFormat = DebugOffsetsFormat {
    len: 760,
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
        let index = USED_FIELDS.iter().find(|f| f.0 == field).expect("known field").1;
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

    Ok(Layout {
        runtime_interpreters_head: field("runtime_state.interpreters_head")?,
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
mod tests {
    use super::*;
    use gimli::{AttributeValue, EndianSlice, LittleEndian, UnitOffset};
    use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    type Slice = EndianSlice<'static, LittleEndian>;

    /// The local builds the table is checked against: `$(pyenv root)/versions/<v>`.
    const BUILDS: [&str; 6] = ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0"];

    fn pyenv_root() -> PathBuf {
        std::env::var_os("PYENV_ROOT").map_or_else(|| PathBuf::from("/root/.pyenv"), PathBuf::from)
    }

    /// `(version, libpython path)` of a local build.
    fn build(full: &str) -> (PyVersion, PathBuf) {
        let mut parts = full.split('.').map(|p| p.parse::<u8>().unwrap());
        let (major, minor, patch) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let lib = pyenv_root().join(format!("versions/{full}/lib/libpython{major}.{minor}.so.1.0"));
        (PyVersion { major, minor, patch }, lib)
    }

    /// A member of a struct: byte or bit position, bit width for bit fields, and type.
    struct Member {
        name: String,
        bits: u64,
        bit_size: Option<u64>,
        ty: Option<UnitOffset>,
    }

    /// The DWARF of one libpython, with where each named type of interest is defined.
    struct Dwarf {
        dwarf: gimli::Dwarf<Slice>,
        units: Vec<gimli::Unit<Slice>>,
        types: HashMap<String, (usize, UnitOffset)>,
    }

    impl Dwarf {
        /// Reads `path` and finds a full definition of each of `wanted` (struct, typedef or enum name).
        fn load(path: &Path, wanted: &[&str]) -> Dwarf {
            let data: &'static [u8] = std::fs::read(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e} (is the pyenv build there?)", path.display()))
                .leak();
            let file = object::File::parse(data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let dwarf = gimli::Dwarf::load(|id| {
                let data = file.section_by_name(id.name()).and_then(|s| s.data().ok()).unwrap_or(&[]);
                Ok::<_, gimli::Error>(EndianSlice::new(data, LittleEndian))
            })
            .unwrap();
            let mut me = Dwarf { dwarf, units: Vec::new(), types: HashMap::new() };
            let mut headers = me.dwarf.units();
            while me.types.len() < wanted.len()
                && let Some(header) = headers.next().unwrap()
            {
                let unit = me.dwarf.unit(header).unwrap();
                let mut found = Vec::new();
                let mut tree = unit.entries_tree(None).unwrap();
                let mut top = tree.root().unwrap().children();
                while let Some(node) = top.next().unwrap() {
                    let e = node.entry();
                    let kinds =
                        [gimli::DW_TAG_structure_type, gimli::DW_TAG_typedef, gimli::DW_TAG_enumeration_type];
                    if !kinds.contains(&e.tag()) || e.attr_value(gimli::DW_AT_declaration).is_some() {
                        continue;
                    }
                    let Some(name) = e.attr_value(gimli::DW_AT_name) else { continue };
                    let name = me.dwarf.attr_string(&unit, name).unwrap().to_string_lossy().into_owned();
                    if wanted.contains(&name.as_str()) && !me.types.contains_key(&name) {
                        found.push((name, e.offset()));
                    }
                }
                drop(tree);
                let index = me.units.len();
                me.units.push(unit);
                for (name, offset) in found {
                    // A typedef may name a struct this unit only declares: keep looking then.
                    let target = me.strip(index, offset);
                    if me.units[index].entry(target).unwrap().attr_value(gimli::DW_AT_declaration).is_none() {
                        me.types.insert(name, (index, offset));
                    }
                }
            }
            for name in wanted {
                assert!(me.types.contains_key(*name), "{}: no definition of {name} in DWARF", path.display());
            }
            me
        }

        /// Follows typedefs and qualifiers to the struct, union or enum they name.
        fn strip(&self, unit: usize, mut offset: UnitOffset) -> UnitOffset {
            loop {
                let e = self.units[unit].entry(offset).unwrap();
                if ![gimli::DW_TAG_typedef, gimli::DW_TAG_const_type, gimli::DW_TAG_volatile_type]
                    .contains(&e.tag())
                {
                    return offset;
                }
                match e.attr_value(gimli::DW_AT_type) {
                    Some(AttributeValue::UnitRef(to)) => offset = to,
                    other => panic!("unexpected type reference {other:?}"),
                }
            }
        }

        fn children(&self, unit: usize, offset: UnitOffset) -> Vec<gimli::DebuggingInformationEntry<Slice>> {
            let mut tree = self.units[unit].entries_tree(Some(offset)).unwrap();
            let mut iter = tree.root().unwrap().children();
            let mut out = Vec::new();
            while let Some(node) = iter.next().unwrap() {
                out.push(node.entry().clone());
            }
            out
        }

        fn name(&self, unit: usize, e: &gimli::DebuggingInformationEntry<Slice>) -> Option<String> {
            let name = e.attr_value(gimli::DW_AT_name)?;
            Some(self.dwarf.attr_string(&self.units[unit], name).unwrap().to_string_lossy().into_owned())
        }

        fn members(&self, unit: usize, offset: UnitOffset) -> Vec<Member> {
            let mut out = Vec::new();
            for e in self.children(unit, offset) {
                if e.tag() != gimli::DW_TAG_member {
                    continue;
                }
                let value = |at| e.attr_value(at).and_then(|v| v.udata_value());
                assert!(e.attr_value(gimli::DW_AT_bit_offset).is_none(), "DWARF 2-4 bit fields not handled");
                let bits =
                    match (value(gimli::DW_AT_data_member_location), value(gimli::DW_AT_data_bit_offset)) {
                        (Some(bytes), _) => bytes * 8,
                        (None, Some(bits)) => bits,
                        (None, None) => 0, // a union member
                    };
                let ty = match e.attr_value(gimli::DW_AT_type) {
                    Some(AttributeValue::UnitRef(to)) => Some(to),
                    _ => None,
                };
                let name = self.name(unit, &e).unwrap_or_default();
                out.push(Member { name, bits, bit_size: value(gimli::DW_AT_bit_size), ty });
            }
            out
        }

        /// Bit position of `path` (`a.b.c`) in type `ty`, and its width if it is a bit field.
        fn locate(&self, ty: &str, path: &str) -> Option<(u64, Option<u64>)> {
            let &(unit, offset) = self.types.get(ty).unwrap_or_else(|| panic!("type {ty} not loaded"));
            let mut offset = self.strip(unit, offset);
            let mut bits = 0;
            let mut segments = path.split('.').peekable();
            while let Some(segment) = segments.next() {
                let member = self.members(unit, offset).into_iter().find(|m| m.name == segment)?;
                bits += member.bits;
                if segments.peek().is_none() {
                    return Some((bits, member.bit_size));
                }
                offset = self.strip(unit, member.ty?);
            }
            None
        }

        fn offset_of(&self, ty: &str, path: &str) -> Option<u64> {
            self.locate(ty, path).map(|(bits, _)| bits / 8)
        }

        fn size_of(&self, ty: &str) -> Option<u64> {
            let &(unit, offset) = self.types.get(ty)?;
            let e = self.units[unit].entry(self.strip(unit, offset)).unwrap();
            e.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value())
        }

        fn enumerator(&self, en: &str, name: &str) -> Option<u64> {
            let &(unit, offset) = self.types.get(en)?;
            let e = self.children(unit, self.strip(unit, offset)).into_iter().find(|e| {
                e.tag() == gimli::DW_TAG_enumerator && self.name(unit, e).as_deref() == Some(name)
            })?;
            e.attr_value(gimli::DW_AT_const_value).and_then(|v| v.udata_value())
        }
    }

    /// Where DWARF says a `Layout` field should be.
    enum Want {
        /// Offset of a member (path) of a type; a `None` in the table means no such member.
        At(&'static str, &'static str),
        /// sizeof a type.
        Size(&'static str),
        /// Value of an enumerator; a `None` in the table means no such enumerator.
        Enum(&'static str, &'static str),
        /// Nothing of the kind in this version: the table must say `None`.
        Absent,
    }

    /// `(Layout field, table value, where DWARF has it)` for a minor version with a local build (3.8-3.13).
    fn expectations(minor: u8, l: &Layout) -> Vec<(&'static str, Option<u64>, Want)> {
        use Want::*;
        let fr = if minor <= 10 { "_frame" } else { "_PyInterpreterFrame" };
        let co = "PyCodeObject";
        let instr = match l.instr_kind {
            InstrKind::LastiBytes | InstrKind::LastiUnits => "f_lasti",
            InstrKind::PrevInstr => "prev_instr",
            InstrKind::InstrPtr => "instr_ptr",
        };
        let threads = if minor <= 10 { "tstate_head" } else { "threads.head" };
        let frame = match minor {
            ..=10 => "frame",
            11 | 12 => "cframe",
            _ => "current_frame",
        };
        let cframe = if matches!(minor, 11 | 12) { At("_PyCFrame", "current_frame") } else { Absent };
        let previous = if minor <= 10 { "f_back" } else { "previous" };
        let code = if minor <= 12 { "f_code" } else { "f_executable" };
        let cstack = if minor >= 11 { Enum("_frameowner", "FRAME_OWNED_BY_CSTACK") } else { Absent };
        let linetable = if minor <= 9 { "co_lnotab" } else { "co_linetable" };
        let tag_mask = Some(l.executable_tag_mask).filter(|&mask| mask != 0);
        vec![
            (
                "runtime_interpreters_head",
                Some(l.runtime_interpreters_head),
                At("pyruntimestate", "interpreters.head"),
            ),
            ("interp_next", Some(l.interp_next), At("_is", "next")),
            ("interp_threads_head", Some(l.interp_threads_head), At("_is", threads)),
            ("tstate_next", Some(l.tstate_next), At("_ts", "next")),
            ("tstate_thread_id", Some(l.tstate_thread_id), At("_ts", "thread_id")),
            ("tstate_native_thread_id", l.tstate_native_thread_id, At("_ts", "native_thread_id")),
            ("tstate_frame", Some(l.tstate_frame), At("_ts", frame)),
            ("cframe_current_frame", l.cframe_current_frame, cframe),
            ("frame_previous", Some(l.frame_previous), At(fr, previous)),
            ("frame_code", Some(l.frame_code), At(fr, code)),
            ("frame_instr", Some(l.frame_instr), At(fr, instr)),
            ("frame_owner", l.frame_owner, At(fr, "owner")),
            ("frame_is_entry", l.frame_is_entry, At(fr, "is_entry")),
            ("owner_cstack", l.owner_cstack.map(u64::from), cstack),
            ("executable_tag_mask", tag_mask, Absent),
            ("code_name", Some(l.code_name), At(co, "co_name")),
            ("code_qualname", l.code_qualname, At(co, "co_qualname")),
            ("code_filename", Some(l.code_filename), At(co, "co_filename")),
            ("code_firstlineno", Some(l.code_firstlineno), At(co, "co_firstlineno")),
            ("code_linetable", Some(l.code_linetable), At(co, linetable)),
            ("code_adaptive", l.code_adaptive, At(co, "co_code_adaptive")),
            ("unicode_state", Some(l.unicode_state), At("PyASCIIObject", "state")),
            ("unicode_length", Some(l.unicode_length), At("PyASCIIObject", "length")),
            ("unicode_ascii_data", Some(l.unicode_ascii_data), Size("PyASCIIObject")),
            ("unicode_compact_data", Some(l.unicode_compact_data), Size("PyCompactUnicodeObject")),
            ("bytes_size", Some(l.bytes_size), At("PyBytesObject", "ob_base.ob_size")),
            ("bytes_size", Some(l.bytes_size), At("PyVarObject", "ob_size")),
            ("bytes_data", Some(l.bytes_data), At("PyBytesObject", "ob_sval")),
        ]
    }

    #[test]
    fn table_matches_dwarf() {
        let mut errors = Vec::new();
        for full in BUILDS {
            let (version, lib) = build(full);
            let minor = version.minor;
            let layout = layout_for(version).unwrap_or_else(|| panic!("{full}: no table"));
            let rows = expectations(minor, &layout);
            let mut wanted: Vec<&str> = rows
                .iter()
                .filter_map(|(_, _, w)| match w {
                    Want::At(ty, _) | Want::Enum(ty, _) | Want::Size(ty) => Some(*ty),
                    Want::Absent => None,
                })
                .collect();
            if minor >= 13 {
                wanted.push("_Py_DebugOffsets");
            }
            wanted.sort_unstable();
            wanted.dedup();
            let dwarf = Dwarf::load(&lib, &wanted);
            let mut check = |what: String, table: Option<u64>, found: Option<u64>| {
                if table != found {
                    errors.push(format!("{full}: {what}: table {table:?}, DWARF {found:?}"));
                }
            };
            for (field, table, want) in rows {
                let (what, found) = match want {
                    Want::At(ty, path) => (format!("{field} = {ty}.{path}"), dwarf.offset_of(ty, path)),
                    Want::Size(ty) => (format!("{field} = sizeof({ty})"), dwarf.size_of(ty)),
                    Want::Enum(en, name) => {
                        (format!("{field} = enum {en}::{name}"), dwarf.enumerator(en, name))
                    }
                    Want::Absent => (format!("{field} (none in this version)"), None),
                };
                check(what, table, found);
            }
            // The unicode state bits, relative to the state word.
            let state = dwarf.offset_of("PyASCIIObject", "state").unwrap() * 8;
            for (bit_field, shift, width) in [
                ("kind", UNICODE_STATE_KIND_SHIFT, UNICODE_STATE_KIND_MASK.count_ones()),
                ("compact", UNICODE_STATE_COMPACT_SHIFT, UNICODE_STATE_COMPACT_MASK.count_ones()),
                ("ascii", UNICODE_STATE_ASCII_SHIFT, UNICODE_STATE_ASCII_MASK.count_ones()),
            ] {
                let found = dwarf.locate("PyASCIIObject", &format!("state.{bit_field}"));
                let found = found.map(|(bits, size)| (bits - state, size.unwrap_or(0)));
                check(format!("PyASCIIObject.state.{bit_field} bit"), Some(shift.into()), found.map(|f| f.0));
                check(
                    format!("PyASCIIObject.state.{bit_field} width"),
                    Some(width.into()),
                    found.map(|f| f.1),
                );
            }
            if minor >= 13 {
                let size = dwarf.size_of("_Py_DebugOffsets");
                check("sizeof(_Py_DebugOffsets)".into(), Some(FORMAT_313.len as u64), size);
                for (name, _) in USED_FIELDS {
                    let (section, at) = FORMAT_313.position(name);
                    let section_name = name.split_once('.').unwrap().0;
                    for (path, position) in [(section_name, section), (name, at)] {
                        let found = dwarf.offset_of("_Py_DebugOffsets", path);
                        check(format!("_Py_DebugOffsets.{path}"), Some(position as u64), found);
                    }
                }
            }
        }
        assert!(errors.is_empty(), "table and DWARF disagree:\n{}", errors.join("\n"));
    }

    /// The 3.14 `_Py_DebugOffsets`, section by section (`section: fields`), transcribed from
    /// `Include/internal/pycore_debug_offsets.h` of v3.14.0 independently of `FORMAT_314`.
    const STRUCT_314: &str = "
        : cookie version free_threaded
        runtime_state: size finalizing interpreters_head
        interpreter_state: size id next threads_head threads_main gc imports_modules sysdict builtins
            ceval_gil gil_runtime_state gil_runtime_state_enabled gil_runtime_state_locked
            gil_runtime_state_holder code_object_generation tlbc_generation
        thread_state: size prev next interp current_frame thread_id native_thread_id datastack_chunk status
        interpreter_frame: size previous executable instr_ptr localsplus owner stackpointer tlbc_index
        code_object: size filename name qualname linetable firstlineno argcount localsplusnames
            localspluskinds co_code_adaptive co_tlbc
        pyobject: size ob_type
        type_object: size tp_name tp_repr tp_flags
        tuple_object: size ob_item ob_size
        list_object: size ob_item ob_size
        set_object: size used table mask
        dict_object: size ma_keys ma_values
        float_object: size ob_fval
        long_object: size lv_tag ob_digit
        bytes_object: size ob_size ob_sval
        unicode_object: size state length asciiobject_size
        gc: size collecting
        gen_object: size gi_name gi_iframe gi_frame_state
        llist_node: next prev
        debugger_support: eval_breaker remote_debugger_support remote_debugging_enabled
            debugger_pending_call debugger_script_path debugger_script_path_size";

    /// A 3.14 `_Py_DebugOffsets` as a 3.14 build would publish it, from the 3.14 table.
    fn synthetic_314() -> Vec<u8> {
        let l = PY314;
        let values: HashMap<&str, u64> = HashMap::from([
            (".version", 0x030e_00f0),
            ("runtime_state.interpreters_head", l.runtime_interpreters_head),
            ("interpreter_state.next", l.interp_next),
            ("interpreter_state.threads_head", l.interp_threads_head),
            ("thread_state.next", l.tstate_next),
            ("thread_state.current_frame", l.tstate_frame),
            ("thread_state.thread_id", l.tstate_thread_id),
            ("thread_state.native_thread_id", l.tstate_native_thread_id.unwrap()),
            ("interpreter_frame.previous", l.frame_previous),
            ("interpreter_frame.executable", l.frame_code),
            ("interpreter_frame.instr_ptr", l.frame_instr),
            ("interpreter_frame.owner", l.frame_owner.unwrap()),
            ("code_object.filename", l.code_filename),
            ("code_object.name", l.code_name),
            ("code_object.qualname", l.code_qualname.unwrap()),
            ("code_object.linetable", l.code_linetable),
            ("code_object.firstlineno", l.code_firstlineno),
            ("code_object.co_code_adaptive", l.code_adaptive.unwrap()),
            ("pyobject.size", 16),
            ("pyobject.ob_type", 8),
            ("bytes_object.ob_size", l.bytes_size),
            ("bytes_object.ob_sval", l.bytes_data),
            ("unicode_object.state", l.unicode_state),
            ("unicode_object.length", l.unicode_length),
            ("unicode_object.asciiobject_size", l.unicode_ascii_data),
        ]);
        let mut out = Vec::new();
        let mut section = "";
        for word in STRUCT_314.split_whitespace() {
            if let Some(name) = word.strip_suffix(':') {
                section = name;
                continue;
            }
            let value = match values.get(format!("{section}.{word}").as_str()) {
                Some(&v) => v,
                None if word == "size" => 1 << 16,
                None => 0,
            };
            out.extend_from_slice(&value.to_le_bytes());
        }
        out[..8].copy_from_slice(b"xdebugpy");
        out
    }

    #[test]
    fn debug_offsets_314_layout() {
        let buf = synthetic_314();
        assert_eq!(buf.len(), DEBUG_OFFSETS_LEN, "3.14 _Py_DebugOffsets is 760 bytes");
        assert_eq!(PY314.runtime_interpreters_head, DEBUG_OFFSETS_LEN as u64 + 48);
        let v314 = PyVersion { major: 3, minor: 14, patch: 0 };
        assert_eq!(layout_from_debug_offsets(v314, &buf), Ok(PY314));
    }

    #[test]
    fn bad_debug_offsets_are_errors() {
        use DebugOffsetsError::*;
        let v313 = PyVersion { major: 3, minor: 13, patch: 0 };
        let v314 = PyVersion { major: 3, minor: 14, patch: 2 };
        let good = synthetic_314();
        let parse = |v, bytes: &[u8]| layout_from_debug_offsets(v, bytes);
        assert_eq!(parse(v313, &[]), Err(TooShort { need: 584, got: 0 }));
        assert_eq!(parse(v314, &good[..700]), Err(TooShort { need: 760, got: 700 }));
        assert_eq!(
            parse(PyVersion { major: 3, minor: 12, patch: 1 }, &good),
            Err(UnsupportedVersion { major: 3, minor: 12 })
        );
        let mut bad = good.clone();
        bad[..8].copy_from_slice(b"xdebugPY");
        assert_eq!(parse(v314, &bad), Err(BadCookie));
        assert_eq!(parse(v313, &good), Err(VersionMismatch { major: 3, minor: 13, found: 0x030e_00f0 }));
        let mut bad = good.clone();
        bad[16] = 1;
        assert_eq!(parse(v314, &bad), Err(FreeThreaded));
        let mut bad = good.clone();
        let at = FORMAT_314.position("pyobject.ob_type").0;
        bad[at..at + 8].copy_from_slice(&32u64.to_le_bytes());
        assert_eq!(parse(v314, &bad), Err(Implausible { field: "pyobject.size", value: 32 }));
        let mut bad = good.clone();
        let at = FORMAT_314.position("thread_state.thread_id").1;
        bad[at..at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert_eq!(parse(v314, &bad), Err(Implausible { field: "thread_state.thread_id", value: 1 << 20 }));
        assert!(parse(v314, &vec![0xff; 4096]).is_err());
        assert_eq!(layout_for(PyVersion { major: 3, minor: 7, patch: 16 }), None);
        assert_eq!(layout_for(PyVersion { major: 3, minor: 15, patch: 0 }), None);
    }

    /// Kills the child process when dropped, also when a test fails.
    struct Reaper(Child);

    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Start of the mapping of `lib`'s first page in process `pid`.
    fn mapped_at(pid: u32, lib: &Path) -> Option<u64> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        maps.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (range, offset, path) = (fields.first()?, fields.get(2)?, fields.get(5)?);
            let is_lib = Path::new(path) == lib && u64::from_str_radix(offset, 16).ok()? == 0;
            is_lib.then(|| u64::from_str_radix(range.split('-').next()?, 16).ok()).flatten()
        })
    }

    #[test]
    fn debug_offsets_match_table_313() {
        let (version, lib) = build("3.13.0");
        let exe = pyenv_root().join("versions/3.13.0/bin/python3.13");
        let lib = lib.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
        let child = Command::new(&exe)
            .args(["-c", "import time; time.sleep(30)"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let child = Reaper(child);
        let pid = child.0.id();
        let start = (0..500)
            .find_map(|_| {
                let start = mapped_at(pid, &lib);
                if start.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                start
            })
            .unwrap_or_else(|| panic!("{} never mapped {}", exe.display(), lib.display()));

        let data = std::fs::read(&lib).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let symbol =
            file.dynamic_symbols().find(|s| s.name() == Ok("_PyRuntime")).expect("no _PyRuntime symbol");
        let first = file.segments().find(|s| s.file_range().0 == 0).expect("no segment at file offset 0");
        let address = start - first.address() + symbol.address();

        let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        let mut runtime = vec![0; DEBUG_OFFSETS_LEN];
        mem.read_exact_at(&mut runtime, address).unwrap();
        let layout = layout_from_debug_offsets(version, &runtime).unwrap();
        assert_eq!(Some(layout), layout_for(version));
        drop(child);
    }
}
