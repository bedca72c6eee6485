//! `stoker dump`: the current Python stack of every thread of a process, read from its
//! memory with process_vm_readv (no ptrace stop: a stuck process stays as it is), with each
//! thread's name, what the kernel says it is doing, and whether it holds the GIL.
use std::{fmt::Write, fs};

use agent_ebpf::{PY_MAX_FRAMES, PY_STACK_READ_ERROR, PY_STACK_TRUNCATED, PyFrame, PyStack};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    python::{
        self,
        code::CodeReader,
        detect::{self, Detected, PythonProcess},
        layout::InstrKind,
        mem::{Memory, ReadMemory},
    },
    sys::process,
};

/// Threads and frames read at most (a loop in a corrupt or changing list ends here).
const MAX_THREADS: usize = 4096;
const MAX_FRAMES: usize = 1024;
/// Offsets in CPython's `struct _gil_runtime_state` (3.8-3.15): `last_holder`, `locked`.
const GIL_LAST_HOLDER: u64 = agent_ebpf::PY_GIL_LAST_HOLDER;
const GIL_LOCKED: u64 = agent_ebpf::PY_GIL_LOCKED;

/// A process's Python threads as dumped.
#[derive(Debug, Serialize)]
pub struct Dump {
    pub pid: u32,
    pub command: String,
    pub version: String,
    pub threads: Vec<ThreadDump>,
}

/// One Python thread: its id and name, its state, its frames innermost first.
#[derive(Debug, Serialize)]
pub struct ThreadDump {
    /// The kernel's thread id (0 when the interpreter does not record it: before 3.8).
    pub tid: u32,
    /// `/proc/PID/task/TID/comm`: the name the thread set (Python 3.14+ names threads after
    /// their `threading.Thread`), else the process's.
    pub name: String,
    /// `running`, `runnable`, `sleeping`, `disk sleep`, `stopped`...: the kernel's state.
    pub state: String,
    /// For a sleeping thread, the system call it waits in and what that means
    /// (`futex: a lock or condition`, `clock_nanosleep: time.sleep`, `epoll_wait: I/O`).
    pub waiting: Option<String>,
    /// The thread holds the GIL (None: the GIL cannot be read on this version).
    pub holds_gil: Option<bool>,
    pub frames: Vec<DumpFrame>,
}

#[derive(Debug, Serialize)]
pub struct DumpFrame {
    pub function: String,
    pub file: String,
    pub line: u32,
}

/// Reads every Python thread's stack of process `pid`.
pub fn dump(pid: u32) -> Result<Dump> {
    if process::is_kernel_thread(pid) {
        return Err(Error::KernelThread(pid, process::comm(pid)));
    }
    if !process::is_alive(pid) {
        return Err(Error::NoSuchProcess(pid));
    }
    let p = match detect::detect(pid) {
        Detected::Python(p) => p,
        Detected::Unsupported(version) => {
            return Err(Error::NotDumpable(pid, format!("runs CPython {version}, which stoker cannot walk")));
        }
        Detected::NotPython | Detected::TooManyMappings => {
            return Err(Error::NotDumpable(
                pid,
                format!("({}) is not a CPython process", process::comm(pid)),
            ));
        }
    };
    let version = p.release.clone();
    let mem = Memory::new(pid);
    let mut codes = CodeReader::new(pid, p.version, p.layout, p.check_code_type);
    let read = |what: &str, e: std::io::Error| {
        Error::NotDumpable(pid, format!("could not be read ({what}: {e}); it may have exited"))
    };
    let (states, failed) = thread_states(&p, &mem);
    if let Some((what, e)) = failed {
        return Err(read(what, e));
    }
    let mut threads = Vec::new();
    let mut gil = (0, None);
    for (interp, tstate) in states {
        if gil.0 != interp {
            gil = (interp, gil_holder(&p, &mem, interp));
        }
        threads.push(thread(&p, &mem, &mut codes, tstate, gil.1));
    }
    let command = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Ok(Dump { pid, command, version, threads })
}

/// A link of the thread list that could not be read: what it was, and why.
type Unreadable = (&'static str, std::io::Error);

/// Every thread state of `p`'s interpreters (at most `MAX_THREADS`) and the interpreter it
/// belongs to; the walk ends at the first link that cannot be read, which is said.
fn thread_states(p: &PythonProcess, mem: &Memory) -> (Vec<(u64, u64)>, Option<Unreadable>) {
    let l = &p.layout;
    let mut out = Vec::new();
    let mut interp = match mem.u64(p.runtime + l.runtime_interpreters_head) {
        Ok(interp) => interp,
        Err(e) => return (out, Some(("interpreters", e))),
    };
    let mut interpreters = 0;
    while interp != 0 && interpreters < 64 {
        interpreters += 1;
        let mut tstate = mem.u64(interp + l.interp_threads_head);
        while let Ok(t) = tstate
            && t != 0
            && out.len() < MAX_THREADS
        {
            out.push((interp, t));
            tstate = mem.u64(t + l.tstate_next);
        }
        if let Err(e) = tstate {
            return (out, Some(("threads", e)));
        }
        interp = mem.u64(interp + l.interp_next).unwrap_or(0);
    }
    (out, None)
}

/// The kernel thread ids of process `p`'s Python threads (0 for those whose CPython does
/// not record it), without their stacks; None when its thread list cannot be read.
pub fn thread_ids(p: &PythonProcess) -> Option<Vec<u32>> {
    let mem = Memory::new(p.pid);
    match thread_states(p, &mem) {
        (states, None) => Some(states.into_iter().map(|(_, tstate)| tid_of(p, &mem, tstate)).collect()),
        (_, Some(_)) => None,
    }
}

/// Each Python thread's kernel id and stack as the kernel's walker stores one (code objects
/// and instruction offsets, leaf first), for threads the kernel has not walked: those
/// blocked since before a session.
pub fn thread_stacks(p: &PythonProcess) -> Vec<(u32, PyStack)> {
    let mem = Memory::new(p.pid);
    let (states, _) = thread_states(p, &mem);
    let mut out = Vec::new();
    for (_, tstate) in states {
        let mut stack = PyStack {
            len: 0,
            flags: 0,
            frames: [PyFrame { code: 0, instr_offset: 0, line_flags: 0 }; PY_MAX_FRAMES],
        };
        let mut frame = innermost_frame(p, &mem, tstate);
        while frame != 0 {
            let Some((code, instr, previous)) = read_frame(p, &mem, frame) else {
                stack.flags |= PY_STACK_READ_ERROR;
                break;
            };
            frame = previous;
            let Some(code) = code else { continue };
            if stack.len as usize == PY_MAX_FRAMES {
                stack.flags |= PY_STACK_TRUNCATED;
                break;
            }
            let line_flags = first_line(p, &mem, code);
            stack.frames[stack.len as usize] = PyFrame { code, instr_offset: instr, line_flags };
            stack.len += 1;
        }
        out.push((tid_of(p, &mem, tstate), stack));
    }
    out
}

/// The frame thread state `tstate` runs now (0: none).
fn innermost_frame(p: &PythonProcess, mem: &Memory, tstate: u64) -> u64 {
    let l = &p.layout;
    let frame = mem.u64(tstate + l.tstate_frame).unwrap_or(0);
    match l.cframe_current_frame {
        Some(current) if frame != 0 => mem.u64(frame + current).unwrap_or(0),
        _ => frame,
    }
}

/// `co_firstlineno` of code object `code` (24 bits, as the kernel's walker keeps it).
fn first_line(p: &PythonProcess, mem: &Memory, code: u64) -> u32 {
    mem.u32(code + p.layout.code_firstlineno).unwrap_or(0) & 0x00ff_ffff
}

/// The kernel thread id of thread state `tstate` (0 when not recorded).
fn tid_of(p: &PythonProcess, mem: &Memory, tstate: u64) -> u32 {
    match p.layout.tstate_native_thread_id {
        Some(o) => mem.u64(tstate + o).unwrap_or(0) as u32,
        None => tid_of_pthread(p.pid, mem, mem.u64(tstate + p.layout.tstate_thread_id).unwrap_or(0)),
    }
}

/// The thread state that holds the GIL of interpreter `interp`: Some(0) when none does,
/// None when it cannot be told.
fn gil_holder(p: &PythonProcess, mem: &Memory, interp: u64) -> Option<u64> {
    let gil = python::gil_of(p, interp)?;
    let locked = mem.u32(gil + GIL_LOCKED).ok()?;
    let holder = mem.u64(gil + GIL_LAST_HOLDER).ok()?;
    Some(if locked != 0 { holder } else { 0 })
}

fn thread(
    p: &PythonProcess,
    mem: &Memory,
    codes: &mut CodeReader,
    tstate: u64,
    gil: Option<u64>,
) -> ThreadDump {
    let tid = tid_of(p, mem, tstate);
    let task = format!("/proc/{}/task/{tid}", p.pid);
    let name =
        fs::read_to_string(format!("{task}/comm")).map(|n| n.trim_end().to_string()).unwrap_or_default();
    let (state, waiting) = thread_state(p.pid, tid);
    let mut frames = Vec::new();
    let mut frame = innermost_frame(p, mem, tstate);
    while frame != 0 && frames.len() < MAX_FRAMES {
        let Some((code, instr, previous)) = read_frame(p, mem, frame) else { break };
        frame = previous;
        let Some(code) = code else { continue };
        frames.push(match codes.code(code, first_line(p, mem, code)) {
            Some(info) => {
                DumpFrame { function: info.name.clone(), file: info.filename.clone(), line: info.line(instr) }
            }
            None => DumpFrame { function: format!("<unknown code {code:#x}>"), file: String::new(), line: 0 },
        });
    }
    ThreadDump { tid, name, state, waiting, holds_gil: gil.map(|holder| holder == tstate), frames }
}

/// The kernel thread id of a thread by its `pthread_t` (CPython before 3.11 records only
/// that): glibc's `struct pthread`, which `pthread_t` points to, holds the tid at byte 720 on
/// x86-64 (glibc 2.26 to today). Accepted only when the process has a thread of that id.
fn tid_of_pthread(pid: u32, mem: &Memory, pthread: u64) -> u32 {
    const PTHREAD_TID: u64 = 720;
    let tid = mem.u32(pthread.wrapping_add(PTHREAD_TID)).unwrap_or(0);
    let exists = tid != 0 && fs::metadata(format!("/proc/{pid}/task/{tid}")).is_ok();
    if exists { tid } else { 0 }
}

/// A frame's code object (None for a shim frame owned by the C stack), the byte offset of
/// its instruction in the bytecode, and the next frame out.
fn read_frame(p: &PythonProcess, mem: &Memory, frame: u64) -> Option<(Option<u64>, u32, u64)> {
    let l = &p.layout;
    let previous = mem.u64(frame + l.frame_previous).ok()?;
    if let (Some(owner), Some(cstack)) = (l.frame_owner, l.owner_cstack) {
        let mut byte = [0u8];
        mem.read(frame + owner, &mut byte).ok()?;
        if byte[0] >= cstack {
            return Some((None, 0, previous));
        }
    }
    let code = mem.u64(frame + l.frame_code).ok()? & !l.executable_tag_mask;
    let instr = match l.instr_kind {
        InstrKind::LastiBytes => (mem.u32(frame + l.frame_instr).ok()? as i32).max(0) as u32,
        InstrKind::LastiUnits => (mem.u32(frame + l.frame_instr).ok()? as i32).max(0) as u32 * 2,
        InstrKind::PrevInstr | InstrKind::InstrPtr => {
            let at = mem.u64(frame + l.frame_instr).ok()?;
            let start = code.wrapping_add(l.code_adaptive.unwrap_or(0));
            at.checked_sub(start).map_or(0, |d| d.min(u64::from(u32::MAX)) as u32)
        }
    };
    Some((Some(code), instr, previous))
}

/// The kernel's state of thread `tid` of `pid`, and for one asleep, the system call it
/// waits in.
fn thread_state(pid: u32, tid: u32) -> (String, Option<String>) {
    let wait = process::thread_wait(pid, tid);
    let state = match wait.as_ref().map_or('?', |w| w.state) {
        'R' => "running",
        'S' => "sleeping",
        'D' => "disk sleep",
        'T' | 't' => "stopped",
        'Z' | 'X' => "exited",
        'I' => "idle",
        _ => "unknown",
    };
    let waiting = wait.and_then(|w| w.syscall).map(|(number, _)| waiting_in(number));
    (state.to_string(), waiting)
}

/// What a thread blocked in system call `number` (x86-64) waits for.
fn waiting_in(number: i64) -> String {
    let (name, meaning) = match number {
        0 => ("read", "input"),
        1 => ("write", "output"),
        7 => ("poll", "I/O"),
        23 => ("select", "I/O"),
        35 => ("nanosleep", "time.sleep"),
        43 => ("accept", "a connection"),
        45 => ("recvfrom", "input"),
        47 => ("recvmsg", "input"),
        61 => ("wait4", "a child process"),
        202 => ("futex", "a lock or condition (or the GIL)"),
        230 => ("clock_nanosleep", "time.sleep"),
        232 => ("epoll_wait", "I/O"),
        270 => ("pselect6", "I/O"),
        271 => ("ppoll", "I/O"),
        281 => ("epoll_pwait", "I/O"),
        288 => ("accept4", "a connection"),
        441 => ("epoll_pwait2", "I/O"),
        -1 => return "not in a system call".into(),
        n => return format!("system call {n}"),
    };
    format!("{name}: {meaning}")
}

impl Dump {
    /// py-spy's dump layout: a header, then each thread and its frames, innermost first.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Process {}: {}", self.pid, self.command);
        let _ = writeln!(s, "Python v{}", self.version);
        for t in &self.threads {
            let mut what = t.state.clone();
            if let Some(w) = &t.waiting {
                let _ = write!(what, " in {w}");
            }
            if t.holds_gil == Some(true) {
                what.push_str(", holds the GIL");
            }
            let _ = writeln!(s, "\nThread {} \"{}\" ({what})", t.tid, t.name);
            if t.frames.is_empty() {
                let _ = writeln!(s, "    (no Python frames)");
            }
            for f in &t.frames {
                let _ = writeln!(s, "    {} ({}:{})", f.function, f.file, f.line);
            }
        }
        s
    }
}
