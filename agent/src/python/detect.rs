//! Recognizes CPython processes: finds the interpreter's ELF (libpython or a statically
//! linked python), `_PyRuntime` and the version, and picks the structure layout.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::Path,
    sync::{Arc, Mutex},
};

use object::{Object, ObjectSegment, ObjectSymbol};

use super::{
    layout::{self, DebugOffsetsError, Layout, PyVersion},
    mem::{Memory, ReadMemory},
};
use crate::sys::maps::{self, MapName};

/// A CPython process stoker can walk.
#[derive(Debug, Clone)]
pub struct PythonProcess {
    pub pid: u32,
    pub version: PyVersion,
    pub layout: Layout,
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// A release newer than stoker knows, walked with the latest layout it knows: the
    /// address of `PyCode_Type`, which the first code objects read must point to.
    pub check_code_type: Option<u64>,
    /// The release as far as it is known: `3.12.1` from `Py_Version` (3.11+), `3.10` from
    /// the file's name before (not `3.10.0`: the patch level is not known).
    pub release: String,
}

/// What a process turned out to be.
#[derive(Debug, Clone)]
pub enum Detected {
    Python(Box<PythonProcess>),
    /// CPython, but a version stoker has no layout for (e.g. "3.7" or "3.15").
    Unsupported(String),
    NotPython,
    /// No CPython in the part of its maps read, which stopped at the size cap (65,530
    /// mappings with 4 KiB names): not worth reading again until it execs.
    TooManyMappings,
}

/// Looks at a live process. Errors reading /proc mean it is gone or not ours to read.
pub fn detect(pid: u32) -> Detected {
    let interpreter = |m: &maps::MapEntry| match &m.name {
        MapName::File { path, deleted: false } => {
            path.file_name().and_then(|n| n.to_str()).is_some_and(is_interpreter_name)
        }
        _ => false,
    };
    let Ok(maps) = maps::read_filtered(pid, interpreter) else {
        return Detected::NotPython;
    };
    let (cut, maps) = (maps.cut, maps.entries);
    let root = maps::root_of(pid);
    // (start, file offset, inode, path) of every mapping of an interpreter-named file.
    let mut candidates: Vec<(u64, u64, u64, &Path)> = maps
        .iter()
        .filter_map(|m| match &m.name {
            MapName::File { path, .. } => Some((m.start, m.offset, m.inode, path.as_path())),
            _ => None,
        })
        .collect();
    // libpython first: a python executable linked to it has no _PyRuntime of its own.
    let libpython = |p: &Path| p.to_string_lossy().contains("libpython");
    candidates.sort_by_key(|&(start, _, _, path)| (!libpython(path), start));
    let mut seen: Vec<&Path> = Vec::new();
    for &(_, _, _, path) in &candidates {
        if seen.contains(&path) {
            continue;
        }
        seen.push(path);
        let lowest = candidates.iter().filter(|c| c.3 == path).min_by_key(|c| c.0).copied();
        if let Some((start, offset, inode, _)) = lowest
            && let Some(found) = inspect(pid, root.as_deref(), path, inode, start, offset)
        {
            return found;
        }
    }
    if cut { Detected::TooManyMappings } else { Detected::NotPython }
}

/// `python3`, `python3.11`, `libpython3.11.so.1.0`, `python3.12d`...
pub fn is_interpreter_name(name: &str) -> bool {
    let rest = name.strip_prefix("lib").unwrap_or(name);
    rest.starts_with("python")
}

/// What the symbol tables of an interpreter file say, the same for every process that maps
/// it: its link addresses of `_PyRuntime` and `Py_Version`, and its segments.
#[derive(Debug)]
struct ElfFacts {
    /// None: a CPython before 3.7 (it has `Py_Initialize` but no `_PyRuntime`).
    runtime: Option<u64>,
    py_version: Option<u64>,
    code_type: Option<u64>,
    /// (file offset, file size, link address) of each segment.
    segments: Vec<(u64, u64, u64)>,
}

/// A file as it is on disk: device, inode, size and modification time (seconds and
/// nanoseconds). A file rewritten in place gets another.
type FileId = (u64, u64, u64, i64, i64);

/// Interpreter files already parsed (None: not CPython), so a new process of a known binary
/// is recognized with a read of its maps and a few words of its memory: a process that lives
/// a second is walked from its first samples. Bounded: emptied when full.
static KNOWN_FILES: Mutex<Option<HashMap<FileId, Option<Arc<ElfFacts>>>>> = Mutex::new(None);
const KNOWN_FILES_MAX: usize = 256;

fn inspect(
    pid: u32,
    root: Option<&Path>,
    path: &Path,
    inode: u64,
    map_start: u64,
    map_offset: u64,
) -> Option<Detected> {
    let on_disk = maps::open_mapped(root, path, inode).ok()?;
    let meta = on_disk.metadata().ok()?;
    let id = (meta.dev(), meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
    let known = KNOWN_FILES.lock().ok().and_then(|k| k.as_ref()?.get(&id).cloned());
    let facts = match known {
        Some(facts) => facts,
        None => {
            // Read on demand, not mapped: only the headers and symbol tables are read, not
            // the (often tens of megabytes of) code and debug information, and a file the
            // target truncates meanwhile gives read errors, not SIGBUS.
            let data = object::ReadCache::new(on_disk);
            // The parser reads the symbol tables whole: only at sizes we accept.
            let facts = crate::sys::elf::sane(&data).then(|| elf_facts(&data)).flatten().map(Arc::new);
            if let Ok(mut known) = KNOWN_FILES.lock() {
                let known = known.get_or_insert_with(HashMap::new);
                if known.len() >= KNOWN_FILES_MAX {
                    known.clear();
                }
                known.insert(id, facts.clone());
            }
            facts
        }
    };
    from_facts(pid, facts?.as_ref(), path, map_start, map_offset, &Memory::new(pid))
}

/// What the interpreter ELF `data` (the file at `path`), whose lowest mapping in process
/// `pid` starts at `map_start` with file offset `map_offset`, makes of the process whose
/// memory is `mem`. None when it is not a CPython stoker can recognize (the fuzz target's
/// entry point: one file, no cache).
#[cfg(any(test, feature = "fuzzing"))]
pub fn inspect_elf<'d, R: object::ReadRef<'d>>(
    pid: u32,
    data: R,
    path: &Path,
    map_start: u64,
    map_offset: u64,
    mem: &impl ReadMemory,
) -> Option<Detected> {
    from_facts(pid, &elf_facts(data)?, path, map_start, map_offset, mem)
}

/// The symbols and segments of an interpreter ELF; None when it is not CPython (neither
/// `_PyRuntime` nor, before 3.7, `Py_Initialize` defined in it).
fn elf_facts<'d, R: object::ReadRef<'d>>(data: R) -> Option<ElfFacts> {
    let file = object::File::parse(data).ok()?;
    let runtime = find_symbol(&file, "_PyRuntime");
    if runtime.is_none() {
        find_symbol(&file, "Py_Initialize")?;
    }
    let py_version = find_symbol(&file, "Py_Version");
    let code_type = find_symbol(&file, "PyCode_Type");
    let segments = file
        .segments()
        .map(|s| {
            let (off, size) = s.file_range();
            (off, size, s.address())
        })
        .collect();
    Some(ElfFacts { runtime, py_version, code_type, segments })
}

fn from_facts(
    pid: u32,
    facts: &ElfFacts,
    path: &Path,
    map_start: u64,
    map_offset: u64,
    mem: &impl ReadMemory,
) -> Option<Detected> {
    let Some(runtime) = facts.runtime else {
        // 2.7 to 3.6: recognized, to be refused with their version.
        let shown = version_from_name(path.file_name()?.to_str()?)
            .map_or("older than 3.7".to_string(), |v| format!("{}.{}", v.major, v.minor));
        return Some(Detected::Unsupported(shown));
    };
    // Load bias: where the segment holding `map_offset` was mapped, minus its link address.
    // The file's offsets and addresses are the target's to choose: no sum may overflow, and
    // addresses wrap as the loader's would.
    let &(seg_off, _, seg_addr) =
        facts.segments.iter().find(|&&(off, size, _)| off <= map_offset && map_offset - off < size.max(1))?;
    let link_addr = seg_addr.wrapping_sub(seg_off).wrapping_add(map_offset);
    let bias = map_start.wrapping_sub(link_addr & !0xfff);
    let runtime = runtime.wrapping_add(bias);

    // `Py_Version` (3.11+) gives the exact release; older builds only their file name.
    let (version, shown) = match facts.py_version {
        Some(addr) => {
            let hex = mem.u32(addr.wrapping_add(bias)).ok()?;
            let v = PyVersion { major: (hex >> 24) as u8, minor: (hex >> 16) as u8, patch: (hex >> 8) as u8 };
            (v, format!("{}.{}.{}", v.major, v.minor, v.patch))
        }
        None => {
            let v = version_from_name(path.file_name()?.to_str()?)?;
            (v, format!("{}.{}", v.major, v.minor))
        }
    };
    let layout = if version >= (PyVersion { major: 3, minor: 13, patch: 0 }) {
        // CPython's own description of itself comes first; the table only stands in when
        // it cannot be read. A build the table does not describe (free-threaded, or other
        // than it claims) is not walked at all.
        match mem
            .bytes(runtime, layout::DEBUG_OFFSETS_LEN)
            .map(|b| layout::layout_from_debug_offsets(version, &b))
        {
            Ok(Ok(layout)) => Some(layout),
            Ok(Err(DebugOffsetsError::FreeThreaded)) => {
                return Some(Detected::Unsupported(format!("{shown} (free-threaded)")));
            }
            Ok(Err(DebugOffsetsError::VersionMismatch { .. })) => None,
            Ok(Err(e)) => match layout::layout_for(version) {
                Some(table) => {
                    tracing::debug!("pid {pid}: _Py_DebugOffsets unusable ({e}); using the built-in table");
                    Some(table)
                }
                // No table to fall back on: the warning says what did not check out.
                None => {
                    let why = e.to_string();
                    return Some(Detected::Unsupported(format!("{shown} ({})", why.trim_end_matches('.'))));
                }
            },
            Err(_) => layout::layout_for(version),
        }
    } else {
        layout::layout_for(version)
    };
    let newer = version.major == 3 && version.minor > layout::LATEST_MINOR;
    let check_code_type = match (newer, facts.code_type) {
        (false, _) => None,
        (true, Some(at)) => Some(at.wrapping_add(bias)),
        (true, None) => {
            return Some(Detected::Unsupported(format!(
                "{shown} (no PyCode_Type symbol to check its layout by)"
            )));
        }
    };
    Some(match layout {
        Some(layout) => Detected::Python(Box::new(PythonProcess {
            pid,
            version,
            layout,
            runtime,
            check_code_type,
            release: shown,
        })),
        None => Detected::Unsupported(shown),
    })
}

fn find_symbol<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>, name: &str) -> Option<u64> {
    file.dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok(name) && s.address() != 0)
        .map(|s| s.address())
}

/// "3.9" from `libpython3.9.so.1.0` or `python3.9`.
fn version_from_name(name: &str) -> Option<PyVersion> {
    let rest = name.strip_prefix("lib").unwrap_or(name).strip_prefix("python")?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(PyVersion { major, minor, patch: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_file_names() {
        let v = |s| version_from_name(s).map(|v| (v.major, v.minor));
        assert_eq!(v("libpython3.9.so.1.0"), Some((3, 9)));
        assert_eq!(v("python3.10"), Some((3, 10)));
        assert_eq!(v("python3"), None);
        assert!(is_interpreter_name("libpython3.12.so.1.0") && is_interpreter_name("python3.11"));
        assert!(!is_interpreter_name("libc.so.6"));
    }

    /// A program header whose offset and size run past 2^64 is a file the target crafted:
    /// it is not CPython, and looking at it must not overflow.
    #[test]
    fn segments_past_the_end_of_the_address_space() {
        let mut elf = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/detect_elf/libpython3.13-shared"
        ))[1..]
            .to_vec();
        let field = |elf: &[u8], at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
        let first_phdr = field(&elf, 0x20);
        // p_offset and p_filesz of the first program header (a PT_LOAD at 0).
        elf[first_phdr + 8..first_phdr + 16].copy_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
        elf[first_phdr + 32..first_phdr + 40].copy_from_slice(&0x2000u64.to_le_bytes());
        let memory = crate::python::mem::Image { base: 0, bytes: &[] };
        let path = Path::new("/usr/lib/libpython3.13.so.1.0");
        let found = inspect_elf(1, elf.as_slice(), path, 0x7f00_0000_0000, u64::MAX - 0x10, &memory);
        assert!(found.is_none(), "a crafted ELF was taken for CPython: {found:?}");
    }
}
