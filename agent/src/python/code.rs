//! Reads CPython code objects and strings out of a live process: the function's name,
//! file, first line and line table, cached per process by code address.
use std::{collections::HashMap, io, sync::Arc};

use super::{
    layout::{self, Layout, PyVersion},
    linetable::{self, LineTableFormat},
    mem::{Memory, ReadMemory},
};

/// Longest string read (names and paths).
const MAX_STRING: usize = 4096;
/// Longest line table kept: a function with a longer one is still named, at its first line.
const MAX_LINETABLE: usize = 64 << 10;
/// Bytes of code objects (names, file names, line tables) cached per process; past it the
/// least recently used half is dropped.
const CACHE_BUDGET: usize = 8 << 20;

/// What a code object says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeInfo {
    /// `co_qualname` (3.11+) or `co_name`.
    pub name: String,
    pub filename: String,
    pub first_line: u32,
    linetable: Vec<u8>,
    format: LineTableFormat,
    /// The file name as its `str` object holds it: where its characters start in the
    /// object, and their bytes (see `CodeReader::same_file`).
    filename_raw: RawStr,
}

/// A `str` object's characters as stored: offset of the first from the object's address,
/// and their bytes (one, two or four each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RawStr {
    data_at: u64,
    length: u64,
    bytes: Vec<u8>,
}

impl CodeInfo {
    /// Bytes it holds, roughly: what the cache budget counts.
    fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.name.len()
            + self.filename.len()
            + self.filename_raw.bytes.len()
            + self.linetable.len()
    }

    /// The source line of the instruction at `byte_offset`, or `first_line` when the
    /// table has none for it.
    pub fn line(&self, byte_offset: u32) -> u32 {
        linetable::line_for(self.format, &self.linetable, self.first_line, byte_offset)
            .unwrap_or(self.first_line)
    }
}

/// A cached code object (None: it could not be read), what its pointer fields held when
/// it was read (see `CodeReader::identity`), and the use count at its last use.
struct Cached {
    info: Option<Arc<CodeInfo>>,
    identity: Option<[u64; 3]>,
    used: u64,
}

/// Drops the least recently used half of `cache` (by entries); returns the bytes left.
fn evict_half<K>(cache: &mut HashMap<K, Cached>) -> usize {
    let mut uses: Vec<u64> = cache.values().map(|c| c.used).collect();
    if !uses.is_empty() {
        let middle = uses.len() / 2;
        let median = *uses.select_nth_unstable(middle).1;
        cache.retain(|_, c| c.used >= median);
    }
    cache.values().filter_map(|c| c.info.as_ref()).map(|c| c.size()).sum()
}

/// How an untried layout (a newer CPython) is judged on the first code objects its frames
/// point to. It holds once `CHECK_PASSES` read back as code objects (type `PyCode_Type`,
/// names and line table readable) and they outnumber the others two to one; it is refused
/// once `CHECK_WRONG` read as something else and they are at least as many. A code object
/// freed before it was read (the import machinery frees its code at once) proves nothing
/// when its memory is gone, and may be reused by another object when not: so a few wrong
/// ones are allowed, and unreadable ones count only when nothing else does.
const CHECK_PASSES: u32 = 4;
const CHECK_WRONG: u32 = 4;
const CHECK_UNREADABLE: u32 = 32;
/// Offset of `ob_type` in a `PyObject` (checked against the target's own debug offsets).
const OB_TYPE: u64 = 8;

/// The check of an untried layout on the first code objects read.
#[derive(Debug)]
enum Check {
    /// Being checked against `code_type` (see `CHECK_PASSES`).
    Running { code_type: u64, passed: u32, wrong: u32, unreadable: u32 },
    /// The layout read something else: why, and whether it was reported.
    Failed { why: String, reported: bool },
}

/// Reads code objects of one process, by layout.
pub struct CodeReader {
    mem: Memory,
    layout: Layout,
    format: LineTableFormat,
    /// By (address, co_firstlineno as the kernel saw it), each entry checked against the
    /// code object's pointer fields when used: a freed address reused by a code object
    /// with the same first line (module bodies all start at line 1) is read afresh.
    cache: HashMap<(u64, u32), Cached>,
    /// Bytes the cache holds, as `CodeInfo::size` counts them.
    cached_bytes: usize,
    uses: u64,
    /// Code objects read so far (not found in the cache).
    read: u64,
    /// The layout is being checked (`check_code_type` of the process), or failed.
    check: Option<Check>,
}

impl CodeReader {
    /// `check_code_type`: the address of `PyCode_Type` when the layout is untried (see
    /// `Check`).
    pub fn new(pid: u32, version: PyVersion, layout: Layout, check_code_type: Option<u64>) -> Self {
        Self {
            mem: Memory::new(pid),
            layout,
            format: linetable::format_for(version.minor),
            cache: HashMap::new(),
            cached_bytes: 0,
            uses: 0,
            read: 0,
            check: check_code_type.map(|code_type| Check::Running {
                code_type,
                passed: 0,
                wrong: 0,
                unreadable: 0,
            }),
        }
    }

    /// Why the layout failed its check, once (None while it holds or is still checked).
    pub fn take_refusal(&mut self) -> Option<String> {
        match &mut self.check {
            Some(Check::Failed { why, reported }) if !*reported => {
                *reported = true;
                Some(why.clone())
            }
            _ => None,
        }
    }

    /// Counts the code object at `addr` (read as `info`) for or against an untried layout.
    fn check(&mut self, addr: u64, info: Option<&CodeInfo>) {
        let Some(Check::Running { code_type, passed, wrong, unreadable }) = &mut self.check else { return };
        let why = match self.mem.u64(addr.wrapping_add(OB_TYPE)) {
            Ok(t) if t == *code_type && info.is_some() => {
                *passed += 1;
                None
            }
            Ok(t) if t == *code_type => {
                *wrong += 1;
                Some(format!("a frame's code object at {addr:#x} has no readable name or line table"))
            }
            Ok(t) => {
                *wrong += 1;
                Some(format!(
                    "a frame's code object at {addr:#x} has type {t:#x}, not PyCode_Type at {code_type:#x}"
                ))
            }
            Err(_) => {
                *unreadable += 1;
                Some(format!(
                    "none of the first {CHECK_UNREADABLE} code objects its frames point to could be read"
                ))
            }
        };
        let (passed, wrong, unreadable) = (*passed, *wrong, *unreadable);
        if passed >= CHECK_PASSES && passed > 2 * wrong {
            tracing::info!(
                "pid {}: the untried layout holds: {passed} code objects read back as code objects, {wrong} did not",
                self.mem.pid()
            );
            self.check = None;
        } else if (wrong >= CHECK_WRONG && wrong >= passed) || (unreadable >= CHECK_UNREADABLE && passed == 0)
        {
            let why = why.unwrap_or_default();
            self.check = Some(Check::Failed { why, reported: false });
        }
    }

    /// The code object at `addr`, read once; None when it cannot be read (the process
    /// exited, or the object was freed and the check below failed).
    pub fn code(&mut self, addr: u64, first_line: u32) -> Option<Arc<CodeInfo>> {
        if matches!(self.check, Some(Check::Failed { .. })) {
            return None;
        }
        self.uses += 1;
        let identity = self.identity(addr);
        let mut counted = false;
        if let Some(hit) = self.cache.get_mut(&(addr, first_line))
            && (identity.is_none() || hit.identity == identity)
        {
            // The same object as when it was read (or nothing readable is there now: what
            // was read then is the best there is). One that could not be read is read
            // again: a freed code object keeps its pointers until its memory is reused, and
            // a new one at its address can get the same ones (module bodies import alike,
            // and their strings take the freed ones' places), so a failed read kept would
            // leave every later body there unnamed.
            hit.used = self.uses;
            match (&hit.info, identity) {
                (None, Some(_)) => counted = true,
                // A code object freed and another made at its address by the same steps
                // (module bodies alike, imported one after the other) gets the same
                // pointers: its file name's text tells them apart.
                (Some(info), Some([_, file, _])) if !same_file(&self.mem, &self.layout, file, info) => {
                    counted = true;
                }
                _ => return hit.info.clone(),
            }
        }
        self.read += 1;
        let info =
            self.read_code(addr).ok().filter(|c| c.first_line & 0x00ff_ffff == first_line).map(Arc::new);
        if !counted {
            self.check(addr, info.as_deref());
        }
        if matches!(self.check, Some(Check::Failed { .. })) {
            return None;
        }
        self.cached_bytes += info.as_ref().map_or(0, |c| c.size());
        let cached = Cached { info: info.clone(), identity, used: self.uses };
        if let Some(old) = self.cache.insert((addr, first_line), cached) {
            self.cached_bytes -= old.info.map_or(0, |c| c.size());
        }
        if self.cached_bytes > CACHE_BUDGET {
            self.cached_bytes = evict_half(&mut self.cache);
        }
        info
    }

    /// Code objects read so far, not found in the cache (new code, or code that took the
    /// address of freed code).
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Bytes the cache holds.
    pub fn cached_bytes(&self) -> usize {
        self.cached_bytes
    }

    /// Drops the least recently used half of the cache.
    pub fn evict_half(&mut self) {
        self.cached_bytes = evict_half(&mut self.cache);
    }

    fn read_code(&self, addr: u64) -> io::Result<CodeInfo> {
        read_code(&self.mem, &self.layout, self.format, addr)
    }

    /// The name, file name and line table pointers of the code object at `addr`, in one
    /// read: another object there now has others (None when unreadable).
    fn identity(&self, addr: u64) -> Option<[u64; 3]> {
        let l = &self.layout;
        let fields = [l.code_qualname.unwrap_or(l.code_name), l.code_filename, l.code_linetable];
        let low = *fields.iter().min()?;
        let high = fields.iter().max()? + 8;
        let raw = self.mem.bytes(addr.wrapping_add(low), (high - low) as usize).ok()?;
        let word = |offset: u64| -> Option<u64> {
            let at = (offset - low) as usize;
            Some(u64::from_le_bytes(raw.get(at..at + 8)?.try_into().ok()?))
        };
        Some([word(fields[0])?, word(fields[1])?, word(fields[2])?])
    }
}

/// The code object at `addr` of `mem`, read with `layout`.
pub fn read_code(
    mem: &impl ReadMemory,
    l: &Layout,
    format: LineTableFormat,
    addr: u64,
) -> io::Result<CodeInfo> {
    let name_ptr = mem.u64(addr.wrapping_add(l.code_qualname.unwrap_or(l.code_name)))?;
    let filename_ptr = mem.u64(addr.wrapping_add(l.code_filename))?;
    let first_line = mem.u32(addr.wrapping_add(l.code_firstlineno))?;
    let table_ptr = mem.u64(addr.wrapping_add(l.code_linetable))?;
    let (filename, filename_raw) = string(mem, l, filename_ptr)?;
    Ok(CodeInfo {
        name: string(mem, l, name_ptr)?.0,
        filename,
        first_line,
        linetable: bytes(mem, l, table_ptr)?,
        format,
        filename_raw,
    })
}

/// Whether the `str` object at `addr` holds `info`'s file name, as it was read: its
/// length and characters, in one read.
fn same_file(mem: &impl ReadMemory, l: &Layout, addr: u64, info: &CodeInfo) -> bool {
    let raw = &info.filename_raw;
    let start = l.unicode_length;
    if raw.data_at < start + 8 {
        return false;
    }
    let Ok(now) = mem.bytes(addr.wrapping_add(start), (raw.data_at - start) as usize + raw.bytes.len())
    else {
        return false;
    };
    now[..8] == raw.length.to_le_bytes() && now[(raw.data_at - start) as usize..] == raw.bytes[..]
}

/// A `str` object's text (compact strings: every string a code object holds), and its
/// characters as stored.
fn string(mem: &impl ReadMemory, l: &Layout, addr: u64) -> io::Result<(String, RawStr)> {
    let state = mem.u32(addr.wrapping_add(l.unicode_state))?;
    let length = mem.i64(addr.wrapping_add(l.unicode_length))?;
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, "not a compact str object");
    if !(0..=MAX_STRING as i64).contains(&length) {
        return Err(invalid());
    }
    let kind = (state & layout::UNICODE_STATE_KIND_MASK) >> layout::UNICODE_STATE_KIND_SHIFT;
    let compact = state & layout::UNICODE_STATE_COMPACT_MASK != 0;
    let ascii = state & layout::UNICODE_STATE_ASCII_MASK != 0;
    if !compact {
        return Err(invalid());
    }
    let length = length as usize;
    if ascii {
        let bytes = mem.bytes(addr.wrapping_add(l.unicode_ascii_data), length)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        return Ok((text, RawStr { data_at: l.unicode_ascii_data, length: length as u64, bytes }));
    }
    let width = match kind {
        1 | 2 | 4 => kind as usize,
        _ => return Err(invalid()),
    };
    let raw = mem.bytes(addr.wrapping_add(l.unicode_compact_data), length * width)?;
    let chars = raw.chunks_exact(width).map(|c| {
        let mut v = [0u8; 4];
        v[..width].copy_from_slice(c);
        char::from_u32(u32::from_le_bytes(v)).unwrap_or(char::REPLACEMENT_CHARACTER)
    });
    Ok((chars.collect(), RawStr { data_at: l.unicode_compact_data, length: length as u64, bytes: raw }))
}

/// A line table (`bytes` object); empty when longer than `MAX_LINETABLE`.
fn bytes(mem: &impl ReadMemory, l: &Layout, addr: u64) -> io::Result<Vec<u8>> {
    let size = mem.i64(addr.wrapping_add(l.bytes_size))?;
    if size < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad bytes object size"));
    }
    if size as usize > MAX_LINETABLE {
        return Ok(Vec::new());
    }
    mem.bytes(addr.wrapping_add(l.bytes_data), size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_the_recently_used_half() {
        let info = |n: usize| {
            Some(Arc::new(CodeInfo {
                name: "f".repeat(n),
                filename: String::new(),
                first_line: 1,
                linetable: Vec::new(),
                format: linetable::format_for(12),
                filename_raw: RawStr::default(),
            }))
        };
        let mut cache: HashMap<u32, Cached> =
            (0..10).map(|i| (i, Cached { info: info(100), identity: None, used: u64::from(i) })).collect();
        let left = evict_half(&mut cache);
        let mut kept: Vec<u32> = cache.keys().copied().collect();
        kept.sort();
        assert_eq!(kept, [5, 6, 7, 8, 9]);
        assert_eq!(left, 5 * (std::mem::size_of::<CodeInfo>() + 100));
    }

    /// Four code objects (in this process's memory, as 3.12's layout places their fields)
    /// whose type is `code_type`: each with the name "f", first line 7 and no line table;
    /// and the str and bytes objects they point to.
    fn code_objects(code_type: u64) -> (Vec<Vec<u8>>, Vec<u8>, Vec<u8>) {
        let l = layout::layout_for(PyVersion { major: 3, minor: 12, patch: 0 }).unwrap();
        let put = |buf: &mut Vec<u8>, at: u64, bytes: &[u8]| {
            buf[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        // A compact ASCII str "f" and an empty bytes object.
        let mut name = vec![0u8; 128];
        let state = layout::UNICODE_STATE_COMPACT_MASK
            | layout::UNICODE_STATE_ASCII_MASK
            | (1 << layout::UNICODE_STATE_KIND_SHIFT);
        put(&mut name, l.unicode_state, &state.to_le_bytes());
        put(&mut name, l.unicode_length, &1u64.to_le_bytes());
        put(&mut name, l.unicode_ascii_data, b"f");
        let table = vec![0u8; 128];
        let objects = (0..4)
            .map(|_| {
                let mut code = vec![0u8; 512];
                put(&mut code, OB_TYPE, &code_type.to_le_bytes());
                put(&mut code, l.code_qualname.unwrap(), &(name.as_ptr() as u64).to_le_bytes());
                put(&mut code, l.code_filename, &(name.as_ptr() as u64).to_le_bytes());
                put(&mut code, l.code_linetable, &(table.as_ptr() as u64).to_le_bytes());
                put(&mut code, l.code_firstlineno, &7u32.to_le_bytes());
                code
            })
            .collect();
        (objects, name, table)
    }

    /// A layout stoker was not built for is trusted once the first code objects read back
    /// as code objects, and refused (once, with the reason) when they do not; code objects
    /// that cannot be read at all give no verdict.
    #[test]
    fn an_untried_layout_is_checked_on_the_first_code_objects() {
        let version = PyVersion { major: 3, minor: 12, patch: 0 };
        let l = layout::layout_for(version).unwrap();
        let code_type = 0x5555_0000_1230;
        let (objects, _name, _table) = code_objects(code_type);
        let mut reader = CodeReader::new(std::process::id(), version, l, Some(code_type));
        for code in &objects {
            let info = reader.code(code.as_ptr() as u64, 7).expect("a code object");
            assert_eq!((info.name.as_str(), info.filename.as_str(), info.first_line), ("f", "f", 7));
        }
        assert!(reader.check.is_none(), "four code objects passed: {:?}", reader.check);

        let mut reader = CodeReader::new(std::process::id(), version, l, Some(code_type + 0x40));
        // Code objects that cannot be read at all (freed): no verdict.
        for addr in 1..=16u64 {
            assert!(reader.code(addr * 8, 7).is_none());
        }
        assert!(matches!(reader.check, Some(Check::Running { unreadable: 16, .. })), "{:?}", reader.check);
        let refused: Vec<_> = objects.iter().map(|c| reader.code(c.as_ptr() as u64, 7)).collect();
        assert!(refused[..3].iter().all(Option::is_some), "under four of the wrong type: still named");
        assert!(refused[3].is_none(), "refused at the fourth of the wrong type");
        let why = reader.take_refusal().expect("a reason");
        assert!(why.contains("not PyCode_Type"), "{why}");
        assert_eq!(reader.take_refusal(), None, "reported once");
    }

    /// A code object freed and its address taken by another with the same first line (module
    /// bodies all start at line 1) is read afresh, not named from the cache; one that could
    /// not be read is tried again once something else is there. Each read counts (new code
    /// for the pace of naming), each use of the cache does not.
    #[test]
    fn a_reused_address_is_read_afresh() {
        let version = PyVersion { major: 3, minor: 12, patch: 0 };
        let l = layout::layout_for(version).unwrap();
        let (mut objects, name, _table) = code_objects(0x5555_0000_1230);
        let mut other = [0u8; 128];
        other[l.unicode_state as usize..][..4].copy_from_slice(&name[l.unicode_state as usize..][..4]);
        other[l.unicode_length as usize..][..8].copy_from_slice(&1u64.to_le_bytes());
        other[l.unicode_ascii_data as usize] = b'g';
        let mut reader = CodeReader::new(std::process::id(), version, l, None);
        let addr = objects[0].as_ptr() as u64;
        assert_eq!(reader.code(addr, 7).unwrap().name, "f");
        assert_eq!(reader.code(addr, 7).unwrap().name, "f");
        assert_eq!(reader.read(), 1, "read once, then from the cache");
        // Another code object at the same address: named "g", same first line.
        let name_at = l.code_qualname.unwrap() as usize;
        objects[0][name_at..name_at + 8].copy_from_slice(&(other.as_ptr() as u64).to_le_bytes());
        assert_eq!(reader.code(addr, 7).unwrap().name, "g");
        // Freed memory that reads as garbage: unnamed; then a code object again: named.
        objects[0][name_at..name_at + 8].copy_from_slice(&8u64.to_le_bytes());
        assert!(reader.code(addr, 7).is_none());
        objects[0][name_at..name_at + 8].copy_from_slice(&(other.as_ptr() as u64).to_le_bytes());
        assert_eq!(reader.code(addr, 7).unwrap().name, "g");
        assert_eq!(reader.read(), 4);
        // A code object read while its name was freed (unreadable), its pointers as they
        // were: unnamed; then another at the same address whose name took the freed one's
        // place, every pointer as before: named, not kept unnamed from the cache.
        let addr = objects[1].as_ptr() as u64;
        let state_at = l.unicode_state as usize;
        let state: [u8; 4] = other[state_at..state_at + 4].try_into().unwrap();
        objects[1][name_at..name_at + 8].copy_from_slice(&(other.as_ptr() as u64).to_le_bytes());
        other[state_at..state_at + 4].copy_from_slice(&[0; 4]);
        assert!(reader.code(addr, 7).is_none());
        assert!(reader.code(addr, 7).is_none());
        other[state_at..state_at + 4].copy_from_slice(&state);
        assert_eq!(reader.code(addr, 7).unwrap().name, "g");
        assert_eq!(reader.read(), 7);
    }

    /// Module bodies alike, imported one after the other, each freed after its import: the
    /// next one's code object, name, file name and line table can take the same addresses
    /// as the last one's. Its file name's text tells it apart, read at every use.
    #[test]
    fn code_made_alike_at_a_freed_address_is_told_apart_by_its_file() {
        let version = PyVersion { major: 3, minor: 12, patch: 0 };
        let l = layout::layout_for(version).unwrap();
        let (mut objects, name, _table) = code_objects(0x5555_0000_1230);
        let mut file = name.clone();
        let text = |file: &mut Vec<u8>, s: &str| {
            file[l.unicode_length as usize..][..8].copy_from_slice(&(s.len() as u64).to_le_bytes());
            file[l.unicode_ascii_data as usize..][..s.len()].copy_from_slice(s.as_bytes());
        };
        text(&mut file, "mod_0.py");
        let at = l.code_filename as usize;
        objects[0][at..at + 8].copy_from_slice(&(file.as_ptr() as u64).to_le_bytes());
        let mut reader = CodeReader::new(std::process::id(), version, l, None);
        let addr = objects[0].as_ptr() as u64;
        assert_eq!(reader.code(addr, 7).unwrap().filename, "mod_0.py");
        assert_eq!(reader.code(addr, 7).unwrap().filename, "mod_0.py");
        assert_eq!(reader.read(), 1, "the same object: from the cache");
        text(&mut file, "mod_2.py");
        assert_eq!(reader.code(addr, 7).unwrap().filename, "mod_2.py");
        text(&mut file, "mod_10.py");
        assert_eq!(reader.code(addr, 7).unwrap().filename, "mod_10.py");
        assert_eq!(reader.read(), 3);
    }

    impl CodeReader {
        /// A reader of this process whose cache holds `entries` names of `bytes` each.
        pub fn filled(entries: u32, bytes: usize) -> Self {
            let layout = layout::layout_for(PyVersion { major: 3, minor: 12, patch: 0 }).unwrap();
            let mut r =
                Self::new(std::process::id(), PyVersion { major: 3, minor: 12, patch: 0 }, layout, None);
            for i in 0..entries {
                r.uses += 1;
                let info = CodeInfo {
                    name: "f".repeat(bytes),
                    filename: String::new(),
                    first_line: 1,
                    linetable: Vec::new(),
                    format: r.format,
                    filename_raw: RawStr::default(),
                };
                r.cached_bytes += info.size();
                r.cache.insert(
                    (u64::from(i), 1),
                    Cached { info: Some(Arc::new(info)), identity: None, used: r.uses },
                );
            }
            r
        }
    }
}
