//! Checks of the layout table: against the local builds' DWARF, against a live 3.13's
//! `_Py_DebugOffsets`, and the parser's handling of bad input.
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
            let bits = match (value(gimli::DW_AT_data_member_location), value(gimli::DW_AT_data_bit_offset)) {
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
        let e = self
            .children(unit, self.strip(unit, offset))
            .into_iter()
            .find(|e| e.tag() == gimli::DW_TAG_enumerator && self.name(unit, e).as_deref() == Some(name))?;
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
                Want::Enum(en, name) => (format!("{field} = enum {en}::{name}"), dwarf.enumerator(en, name)),
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
            check(format!("PyASCIIObject.state.{bit_field} width"), Some(width.into()), found.map(|f| f.1));
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

/// The 3.15 `_Py_DebugOffsets`, transcribed the same way from v3.15.2's header.
const STRUCT_315: &str = "
    : cookie version free_threaded
    runtime_state: size finalizing interpreters_head
    interpreter_state: size id next threads_head threads_main gc imports_modules sysdict builtins
        ceval_gil gil_runtime_state gil_runtime_state_enabled gil_runtime_state_locked
        gil_runtime_state_holder code_object_generation tlbc_generation
    thread_state: size prev next interp current_frame base_frame last_profiled_frame
        last_profiled_frame_seq thread_id native_thread_id datastack_chunk status holds_gil
        gil_requested current_exception exc_state
    err_stackitem: exc_value
    interpreter_frame: size previous executable instr_ptr localsplus owner stackpointer tlbc_index
    code_object: size filename name qualname linetable firstlineno argcount localsplusnames
        localspluskinds co_code_adaptive co_tlbc
    pyobject: size ob_type
    type_object: size tp_name tp_repr tp_flags tp_basicsize tp_dictoffset
    heap_type_object: size ht_cached_keys
    tuple_object: size ob_item ob_size
    list_object: size ob_item ob_size
    set_object: size used table mask
    dict_object: size ma_keys ma_values
    float_object: size ob_fval
    long_object: size lv_tag ob_digit
    bytes_object: size ob_size ob_sval
    unicode_object: size state length asciiobject_size compactunicodeobject_size
    gc: size collecting frame generation_stats_size generation_stats
    gen_object: size gi_name gi_iframe gi_frame_state
    llist_node: next prev
    debugger_support: eval_breaker remote_debugger_support remote_debugging_enabled
        debugger_pending_call debugger_script_path debugger_script_path_size";

/// Where the synthetic 3.14 build below says its GIL is.
const GIL_314: u64 = 7_800;

/// A 3.14 `_Py_DebugOffsets` as a 3.14 build would publish it, from the 3.14 table.
fn synthetic_314() -> Vec<u8> {
    synthetic(STRUCT_314, 0x030e_00f0, 56)
}

/// A `_Py_DebugOffsets` laid out as `description` says, with the 3.14 table's offsets, the
/// version `version_hex` and `compact` as the compact string's size (where it has one).
fn synthetic(description: &str, version_hex: u64, compact: u64) -> Vec<u8> {
    let l = PY314;
    let values: HashMap<&str, u64> = HashMap::from([
        (".version", version_hex),
        ("unicode_object.compactunicodeobject_size", compact),
        ("runtime_state.interpreters_head", l.runtime_interpreters_head),
        ("interpreter_state.next", l.interp_next),
        ("interpreter_state.threads_head", l.interp_threads_head),
        ("interpreter_state.gil_runtime_state", GIL_314),
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
    for word in description.split_whitespace() {
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
fn debug_offsets_315_layout() {
    let buf = synthetic(STRUCT_315, 0x030f_02f0, 64);
    assert_eq!(buf.len(), DEBUG_OFFSETS_LEN, "3.15 _Py_DebugOffsets is 888 bytes");
    let v315 = PyVersion { major: 3, minor: 15, patch: 2 };
    let layout = Layout { gil: Gil::Interpreter(GIL_314), unicode_compact_data: 64, ..PY314 };
    assert_eq!(layout_from_debug_offsets(v315, &buf), Ok(layout));
    // A 3.14 build's offsets read as 3.15's: refused by version, whatever the bytes.
    assert!(layout_from_debug_offsets(v315, &synthetic_314()).is_err());
}

#[test]
fn debug_offsets_314_layout() {
    let buf = synthetic_314();
    assert_eq!(buf.len(), 760, "3.14 _Py_DebugOffsets is 760 bytes");
    assert_eq!(PY314.runtime_interpreters_head, 760 + 48);
    let v314 = PyVersion { major: 3, minor: 14, patch: 0 };
    assert_eq!(layout_from_debug_offsets(v314, &buf), Ok(Layout { gil: Gil::Interpreter(GIL_314), ..PY314 }));
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
    let mut bad = good.clone();
    let (interp, _) = FORMAT_314.position("interpreter_state.next");
    let at = interp + 8 * FORMAT_314.gil_index;
    bad[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert_eq!(
        parse(v314, &bad),
        Err(Implausible { field: "interpreter_state.gil_runtime_state", value: 0 })
    );
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
    debug_offsets_match_table(version, &pyenv_root().join("versions/3.13.0/bin/python3.13"), &lib);
}

/// Debian unstable's 3.13 and 3.14 (their patch releases, with libpython3.X.so as `cargo
/// xtask setup` unpacks it): what they publish agrees with the table, so a drift between
/// patch releases is caught.
#[test]
fn debug_offsets_match_table_debian_unstable() {
    for minor in [13, 14] {
        let root = PathBuf::from(format!("/opt/stoker-pythons/3.{minor}/usr"));
        let lib = root.join(format!("lib/x86_64-linux-gnu/libpython3.{minor}.so.1.0"));
        let exe = root.join(format!("bin/python3.{minor}-shared"));
        debug_offsets_match_table(PyVersion { major: 3, minor, patch: 0 }, &exe, &lib);
    }
}

/// Starts `exe` (linked against `lib`), reads `_Py_DebugOffsets` from its `_PyRuntime` and
/// checks the layout they give against the table's for `version`.
fn debug_offsets_match_table(version: PyVersion, exe: &Path, lib: &Path) {
    let lib = lib.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
    let child = Command::new(exe)
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
    let symbol = file.dynamic_symbols().find(|s| s.name() == Ok("_PyRuntime")).expect("no _PyRuntime symbol");
    let first = file.segments().find(|s| s.file_range().0 == 0).expect("no segment at file offset 0");
    let address = start - first.address() + symbol.address();

    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut runtime = vec![0; DEBUG_OFFSETS_LEN];
    mem.read_exact_at(&mut runtime, address).unwrap();
    let layout = layout_from_debug_offsets(version, &runtime).unwrap();
    // The table has no GIL offset for 3.14: the target's own figure is what stoker uses.
    let table = layout_for(version).unwrap();
    let expected = match table.gil {
        Gil::Unknown => Layout { gil: layout.gil, ..table },
        _ => table,
    };
    assert!(matches!(layout.gil, Gil::Interpreter(_)), "3.{}: no GIL in {layout:?}", version.minor);
    assert_eq!(layout, expected, "3.{}", version.minor);
    drop(child);
}
