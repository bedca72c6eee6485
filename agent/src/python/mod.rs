//! CPython support: recognizing Python processes, configuring the kernel walker for
//! their version, and turning sampled frames into Python frames (qualname, file, line).
pub mod code;
pub mod detect;
pub mod layout;
pub mod linetable;
pub mod mem;

use std::collections::HashMap;

use agent_ebpf::{
    NO_FIELD, PY_FRAME_CHUNK, PY_FRAME_ENTRY, PY_PROC_GIL_COUNT, PY_PROC_GIL_ONLY, PY_PROC_NATIVE,
    PY_STACK_READ_ERROR, PY_STACK_TRUNCATED, PyOffsets, PyProc, PyStack, instr_kind,
};

use self::mem::ReadMemory;
use self::{
    code::CodeReader,
    detect::PythonProcess,
    layout::{Gil, InstrKind, Layout},
};
use crate::profile::Frame;

/// What the kernel does with a Python process's CPU samples besides walking its stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleOptions {
    /// Record native stacks of samples that have Python frames too (`--native`).
    pub native: bool,
    /// Count only the samples of the thread holding the GIL (`--gil`).
    pub gil_only: bool,
    /// Count the samples of the thread holding the GIL per process (the agent's GIL-held time).
    pub gil_count: bool,
}

/// The kernel walker's configuration for one process.
pub fn kernel_config(p: &PythonProcess, options: SampleOptions) -> PyProc {
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    PyProc {
        interp_head_addr: p.runtime + p.layout.runtime_interpreters_head,
        offsets: offsets(&p.layout),
        flags: flag(options.native, PY_PROC_NATIVE)
            | flag(options.gil_only, PY_PROC_GIL_ONLY)
            | flag(options.gil_count, PY_PROC_GIL_COUNT),
        _pad: 0,
        gil_addr: gil_addr(p),
    }
}

/// The GIL's address in the process: in `_PyRuntime` (3.8-3.11), or in the main
/// interpreter (3.12+), read now from the process (0 when unreadable: the kernel then reads
/// the interpreter's address itself at each GIL wait).
pub fn gil_addr(p: &PythonProcess) -> u64 {
    let interp = match p.layout.gil {
        Gil::Interpreter(_) => {
            let mut word = [0u8; 8];
            match mem::Memory::new(p.pid).read(p.runtime + p.layout.runtime_interpreters_head, &mut word) {
                Ok(()) if u64::from_le_bytes(word) != 0 => u64::from_le_bytes(word),
                _ => return 0,
            }
        }
        _ => 0,
    };
    gil_of(p, interp).unwrap_or(0)
}

/// The address of the GIL of interpreter `interp` (at that address in the process): in
/// `_PyRuntime` (3.8-3.11, one for all) or in the interpreter (3.12+); None when unknown.
pub fn gil_of(p: &PythonProcess, interp: u64) -> Option<u64> {
    match p.layout.gil {
        Gil::Runtime(offset) => Some(p.runtime + offset),
        Gil::Interpreter(offset) => Some(interp + offset),
        Gil::Unknown => None,
    }
}

fn offsets(l: &Layout) -> PyOffsets {
    let opt = |v: Option<u64>| v.map_or(NO_FIELD, |v| v as u32);
    PyOffsets {
        interp_next: l.interp_next as u32,
        interp_threads_head: l.interp_threads_head as u32,
        tstate_next: l.tstate_next as u32,
        tstate_thread_id: l.tstate_thread_id as u32,
        tstate_frame: l.tstate_frame as u32,
        cframe_current_frame: opt(l.cframe_current_frame),
        frame_previous: l.frame_previous as u32,
        frame_code: l.frame_code as u32,
        frame_instr: l.frame_instr as u32,
        instr_kind: match l.instr_kind {
            InstrKind::LastiBytes => instr_kind::LASTI_BYTES,
            InstrKind::LastiUnits => instr_kind::LASTI_UNITS,
            InstrKind::PrevInstr | InstrKind::InstrPtr => instr_kind::POINTER,
        },
        frame_owner: opt(l.frame_owner),
        frame_is_entry: opt(l.frame_is_entry),
        owner_cstack: l.owner_cstack.map_or(NO_FIELD, u32::from),
        code_firstlineno: l.code_firstlineno as u32,
        code_adaptive: opt(l.code_adaptive),
        every_frame_entry: u32::from(matches!(l.instr_kind, InstrKind::LastiBytes | InstrKind::LastiUnits)),
        frame_read_size: frame_read_size(l),
        interp_gil: match l.gil {
            Gil::Interpreter(offset) => offset as u32,
            Gil::Runtime(_) | Gil::Unknown => NO_FIELD,
        },
        executable_tag_mask: l.executable_tag_mask,
    }
}

/// Bytes from a frame's start covering every frame field the walker reads, rounded up to
/// 8; 0 when they do not fit in one `PY_FRAME_CHUNK` read.
fn frame_read_size(l: &Layout) -> u32 {
    let widths = [(Some(l.frame_previous), 8), (Some(l.frame_code), 8), (Some(l.frame_instr), 8)];
    let small = [(l.frame_owner, 1), (l.frame_is_entry, 1)];
    let end = widths.iter().chain(small.iter()).filter_map(|(o, w)| o.map(|o| o + w)).max().unwrap_or(0);
    let size = end.div_ceil(8) * 8;
    if size as usize <= PY_FRAME_CHUNK { size as u32 } else { 0 }
}

/// A symbolized Python frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyFrame {
    pub frame: Frame,
    /// First frame of its own C-level eval call (where `--native` splices it in).
    pub entry: bool,
}

/// Symbolized Python stack, leaf first, and whether its root end is missing.
#[derive(Debug, Clone, Default)]
pub struct PyFrames {
    pub frames: Vec<PyFrame>,
    pub truncated: bool,
}

/// Bytes of code objects cached over all processes (each has its own budget too): past it,
/// the largest caches drop their least recently used half.
const TOTAL_CODE_BUDGET: usize = 64 << 20;
/// Stacks named between two checks of the total.
const CHECK_TOTAL_EVERY: u32 = 256;

/// Symbolizes Python stacks of any number of processes.
pub struct PySymbolizer {
    readers: HashMap<u32, CodeReader>,
    /// A forked process's parent, whose reader names what the fork's own cannot (the fork
    /// exited, or was not yet recognized): a fork has its parent's code at the same addresses.
    parents: HashMap<u32, u32>,
    full_filenames: bool,
    since_check: u32,
    /// Code objects read so far, of all processes (see `code_read`).
    code_read: u64,
}

impl PySymbolizer {
    pub fn new(full_filenames: bool) -> Self {
        Self {
            readers: HashMap::new(),
            parents: HashMap::new(),
            full_filenames,
            since_check: 0,
            code_read: 0,
        }
    }

    /// Halves the largest caches until all of them hold at most `budget` bytes.
    fn trim_to(&mut self, budget: usize) {
        let mut total: usize = self.readers.values().map(CodeReader::cached_bytes).sum();
        while total > budget {
            let Some(largest) = self.readers.values_mut().max_by_key(|r| r.cached_bytes()) else { break };
            let before = largest.cached_bytes();
            largest.evict_half();
            if largest.cached_bytes() >= before {
                break;
            }
            total -= before - largest.cached_bytes();
        }
    }

    pub fn add_process(&mut self, p: &PythonProcess) {
        self.readers.insert(p.pid, CodeReader::new(p.pid, p.version, p.layout, p.check_code_type));
    }

    /// Processes whose untried layout (a CPython newer than stoker knows) failed its check
    /// since the last call, and why: they are to be sampled without Python stacks.
    pub fn take_refused(&mut self) -> Vec<(u32, String)> {
        self.readers.iter_mut().filter_map(|(&pid, r)| Some((pid, r.take_refusal()?))).collect()
    }

    /// Process `pid` was forked by `parent` (see `parents`).
    pub fn set_parent(&mut self, pid: u32, parent: u32) {
        self.parents.insert(pid, parent);
    }

    /// Drops what was read of process `pid` (a new process took its pid).
    pub fn forget(&mut self, pid: u32) {
        self.readers.remove(&pid);
        self.parents.remove(&pid);
    }

    /// Drops what was read of the processes not in `live` (they exited).
    pub fn forget_exited(&mut self, live: &[u32]) {
        self.readers.retain(|pid, _| live.contains(pid));
        self.parents.retain(|pid, _| live.contains(pid));
    }

    /// Code objects read so far, of all processes: it grows while processes run code not
    /// seen before (they start, import, compile), and stays while they run what they ran.
    pub fn code_read(&self) -> u64 {
        self.code_read
    }

    pub fn stack(&mut self, pid: u32, stack: &PyStack) -> PyFrames {
        self.since_check += 1;
        if self.since_check >= CHECK_TOTAL_EVERY {
            self.since_check = 0;
            self.trim_to(TOTAL_CODE_BUDGET);
        }
        let len = (stack.len as usize).min(stack.frames.len());
        let truncated = stack.flags & (PY_STACK_TRUNCATED | PY_STACK_READ_ERROR) != 0;
        let parent = self.parents.get(&pid).copied();
        if !self.readers.contains_key(&pid) && parent.is_none_or(|p| !self.readers.contains_key(&p)) {
            return PyFrames::default();
        }
        let read = |readers: &HashMap<u32, CodeReader>| {
            [Some(pid), parent]
                .into_iter()
                .flatten()
                .filter_map(|p| readers.get(&p))
                .map(CodeReader::read)
                .sum::<u64>()
        };
        let read_before = read(&self.readers);
        let readers = &mut self.readers;
        let frames = stack.frames[..len]
            .iter()
            .map(|f| {
                let own = readers.get_mut(&pid).and_then(|r| r.code(f.code, f.first_line()));
                let code =
                    own.or_else(|| readers.get_mut(&parent?).and_then(|r| r.code(f.code, f.first_line())));
                let frame = match code {
                    Some(code) => {
                        let file =
                            if self.full_filenames { &code.filename } else { short_filename(&code.filename) };
                        Frame::Python {
                            function: code.name.as_str().into(),
                            file: file.into(),
                            line: code.line(f.instr_offset),
                        }
                    }
                    None => Frame::PythonUnreadable { code: f.code },
                };
                PyFrame { frame, entry: f.flags() & PY_FRAME_ENTRY != 0 }
            })
            .collect();
        self.code_read += read(&self.readers).saturating_sub(read_before);
        PyFrames { frames, truncated }
    }
}

/// A path shortened as py-spy does: the part after `site-packages/`, `dist-packages/` or
/// the standard library directory, else the file name.
pub fn short_filename(path: &str) -> &str {
    for marker in ["/site-packages/", "/dist-packages/"] {
        if let Some(i) = path.rfind(marker) {
            return &path[i + marker.len()..];
        }
    }
    if let Some(i) = path.find("/lib/python3")
        && let Some(j) = path[i + 5..].find('/')
    {
        return &path[i + 5 + j + 1..];
    }
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_caches_shrink_to_the_total_budget() {
        let mut py = PySymbolizer::new(false);
        py.readers.insert(1, CodeReader::filled(1000, 1000));
        py.readers.insert(2, CodeReader::filled(100, 1000));
        let (big, small) = (py.readers[&1].cached_bytes(), py.readers[&2].cached_bytes());
        py.trim_to(big / 2);
        let total: usize = py.readers.values().map(CodeReader::cached_bytes).sum();
        assert!(total <= big / 2, "{total} bytes left over a budget of {}", big / 2);
        assert_eq!(py.readers[&2].cached_bytes(), small, "the small cache is left alone");
    }

    #[test]
    fn shortens_filenames() {
        assert_eq!(short_filename("/srv/app/handlers/users.py"), "users.py");
        assert_eq!(short_filename("/venv/lib/python3.12/site-packages/flask/app.py"), "flask/app.py");
        assert_eq!(short_filename("/usr/lib/python3.11/json/decoder.py"), "json/decoder.py");
        assert_eq!(short_filename("<string>"), "<string>");
    }
}
