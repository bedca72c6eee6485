//! Reads the kernel's aggregation while targets run and turns it into named stacks,
//! resolving each new stack (native and Python) while its process still lives.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_ebpf::{DROPPED_STACK, OffKey, SampleKey};

use crate::{
    error::Result,
    profile::{Frame, Marker, Profile},
    programs::KernelPrograms,
    python::{PyFrames, PySymbolizer},
    symbolize::Symbolizer,
    sys::process,
};

/// A thread name the kernel copied (`comm`, NUL-padded); None when it sent none.
fn comm_name(comm: &[u8; 16]) -> Option<String> {
    let len = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    (len > 0).then(|| String::from_utf8_lossy(&comm[..len]).into_owned())
}

/// Frames of `frames` whose code could not be read.
fn unreadable_frames(frames: &PyFrames) -> usize {
    frames.frames.iter().filter(|f| matches!(f.frame, Frame::PythonUnreadable { .. })).count()
}

/// How stacks are drawn.
#[derive(Debug, Clone, Copy, Default)]
pub struct View {
    /// Each stack starts with its process.
    pub root_per_process: bool,
    /// Each stack starts (after the process) with its thread.
    pub threads: bool,
    /// Python processes: native frames too, eval loops replaced by the Python frames they run.
    pub native: bool,
}

/// The ids of Python stacks walked in userspace (see `add_walked_stack`): this high half,
/// the thread's id in the low one. The kernel's are hashes of their frames, as likely to
/// clash with these as with each other.
const WALKED_HERE: u64 = 0x5eed_0000_0000_0000;

/// A Python stack named with frames whose code could not be read is named again at each
/// collection for this long after. The kernel's stacks are keyed by code addresses and
/// offsets, so code made alike at a freed address (module bodies imported one after the
/// other) counts under the stack first seen there: named once from a read that came too
/// late, all of them would stay `<unknown code>`.
const RENAME_UNREADABLE_FOR: Duration = Duration::from_secs(2);
const WALKED_MASK: u64 = 0xffff_ffff_0000_0000;

/// Accumulated, symbolized view of the kernel's counts.
pub struct Collector {
    symbolizer: Symbolizer,
    pub python: PySymbolizer,
    user_stacks: HashMap<(u32, i32), Arc<[Frame]>>,
    kernel_stacks: HashMap<i32, Arc<[Frame]>>,
    py_stacks: HashMap<(u32, u64), Arc<PyFrames>>,
    /// Python stacks named with unreadable frames, and when first (see
    /// `RENAME_UNREADABLE_FOR`).
    unreadable: HashMap<(u32, u64), Instant>,
    counts: Vec<(SampleKey, u64)>,
    /// Off-CPU nanoseconds by key, as last read (`collect` with `final_read`).
    pub(crate) off: Vec<(OffKey, u64)>,
    /// Entries of the kernel's off-CPU counts map at that read.
    off_entries: usize,
    /// CPU samples of each process's GIL holder, as last read (`collect` with `final_read`).
    gil_held: Vec<(u32, u64)>,
    /// Keys whose stacks were resolved.
    seen: HashSet<SampleKey>,
    /// Native stack ids seen since the kernel's maps were last emptied: how full the
    /// stack map is (ids are shared between processes and cannot be freed one by one).
    native_ids: HashSet<i32>,
    comms: HashMap<u32, String>,
    threads: HashMap<u32, String>,
}

impl Collector {
    pub fn new(full_filenames: bool) -> Self {
        Self {
            symbolizer: Symbolizer::new(),
            python: PySymbolizer::new(full_filenames),
            user_stacks: HashMap::new(),
            kernel_stacks: HashMap::new(),
            py_stacks: HashMap::new(),
            unreadable: HashMap::new(),
            counts: Vec::new(),
            off: Vec::new(),
            off_entries: 0,
            gil_held: Vec::new(),
            seen: HashSet::new(),
            native_ids: HashSet::new(),
            comms: HashMap::new(),
            threads: HashMap::new(),
        }
    }

    /// Forgets the stacks resolved so far, after the kernel's maps were emptied (their
    /// ids are then reused for other stacks); `forget_exited` drops the exited processes.
    /// The Python stacks walked here stay: no map holds them, and a wait under way since
    /// before the start may still be in one.
    pub fn forget_stacks(&mut self) {
        self.seen.clear();
        self.native_ids.clear();
        self.user_stacks.clear();
        self.kernel_stacks.clear();
        self.py_stacks.retain(|(_, id), _| id & WALKED_MASK == WALKED_HERE);
        self.unreadable.clear();
        self.counts.clear();
    }

    /// Drops the per-process state of processes not in `live` (the agent, once their last
    /// interval went out): mapping snapshots, code-object readers, names.
    pub fn forget_exited(&mut self, live: &[u32]) {
        self.symbolizer.forget_exited(live);
        self.python.forget_exited(live);
        self.comms.retain(|pid, _| live.contains(pid));
        self.threads.retain(|tid, _| process::is_alive(*tid));
    }

    /// Python stacks in the kernel's map that the stacks named so far use.
    pub fn py_stacks(&self) -> usize {
        self.seen.iter().filter(|k| k.py_stack != 0).map(|k| k.py_stack).collect::<HashSet<_>>().len()
    }

    /// Native stack ids in the kernel's stack map since it was last emptied, at most.
    pub fn native_stacks(&self) -> usize {
        self.native_ids.len()
    }

    /// Frees what exited processes hold in the kernel's counts and Python stacks and here
    /// (after their last interval was reported): under process churn the maps keep room for
    /// the processes that live. A Python stack that a live process shares (a fork of the
    /// same parent) stays.
    pub fn evict_exited(&mut self, kernel: &mut KernelPrograms, live: &[u32]) -> Result<()> {
        let live: HashSet<u32> = live.iter().copied().collect();
        let gone_off: Vec<OffKey> =
            self.off.iter().map(|(k, _)| *k).filter(|k| !live.contains(&k.sample.tgid)).collect();
        kernel.remove_off(&gone_off)?;
        self.off.retain(|(k, _)| live.contains(&k.sample.tgid));
        let gone_gil: Vec<u32> =
            self.gil_held.iter().map(|(pid, _)| *pid).filter(|p| !live.contains(p)).collect();
        kernel.remove_gil_held(&gone_gil)?;
        self.gil_held.retain(|(pid, _)| live.contains(pid));
        let (gone, kept): (Vec<SampleKey>, Vec<SampleKey>) =
            self.seen.iter().partition(|k| !live.contains(&k.tgid));
        if gone.is_empty() {
            return Ok(());
        }
        let shared: HashSet<u64> = kept.iter().map(|k| k.py_stack).collect();
        let hashes: HashSet<u64> =
            gone.iter().map(|k| k.py_stack).filter(|h| *h != 0 && !shared.contains(h)).collect();
        kernel.remove_counts(&gone)?;
        kernel.remove_py_stacks(&hashes)?;
        self.seen.retain(|k| live.contains(&k.tgid));
        self.user_stacks.retain(|(tgid, _), _| live.contains(tgid));
        self.py_stacks.retain(|(tgid, _), _| live.contains(tgid));
        self.unreadable.retain(|(tgid, _), _| live.contains(tgid));
        self.counts.retain(|(k, _)| live.contains(&k.tgid));
        Ok(())
    }

    /// Drops what was read of process `pid`, whose pid a new process took: the new one is
    /// read afresh (its stacks already named keep their names).
    pub fn forget_process(&mut self, pid: u32) {
        self.symbolizer.forget(pid);
        self.python.forget(pid);
        self.comms.remove(&pid);
    }

    /// Resolves stacks not seen before, while their processes live. With `final_read` it
    /// also reads the counts (the end of a session); otherwise only the keys. A process's
    /// mappings are read again only when it has a new native stack to name.
    pub fn collect(&mut self, kernel: &KernelPrograms, live_pids: &[u32], final_read: bool) -> Result<()> {
        for &pid in live_pids {
            self.comms.entry(pid).or_insert_with(|| process::comm(pid));
        }
        let mut refreshed = HashSet::new();
        // The kernel names each new key's thread as it was then: a thread that exited
        // since (a thread per request) keeps its name.
        let (sent, complete) = kernel.take_new_keys();
        for new in &sent {
            if let Some(name) = comm_name(&new.comm) {
                self.threads.insert(new.key.tid, name);
            }
        }
        // Off-CPU waits: their stacks are named the same way; at the end, with the waits
        // still under way. Between, only the keys the kernel says are new (walking the maps,
        // one system call per key, costs more than everything else userspace does).
        let keys = if final_read {
            self.counts = kernel.counts()?;
            (self.off, self.off_entries) = kernel.off_counts()?;
            self.off.extend(kernel.off_in_flight(live_pids, process::monotonic_ns())?);
            self.gil_held = kernel.gil_held()?;
            let mut keys: Vec<SampleKey> = self.counts.iter().map(|(k, _)| *k).collect();
            keys.extend(self.off.iter().map(|(k, _)| k.sample));
            keys
        } else if complete {
            sent.iter().map(|new| new.key).collect()
        } else {
            let mut keys = kernel.count_keys()?;
            keys.extend(kernel.off_keys()?.iter().map(|k| k.sample));
            keys
        };
        for key in keys {
            if !self.seen.insert(key) {
                continue;
            }
            self.native_ids
                .extend([key.user_stack_id, key.kernel_stack_id].into_iter().filter(|id| *id >= 0));
            if key.user_stack_id >= 0 && !self.user_stacks.contains_key(&(key.tgid, key.user_stack_id)) {
                if live_pids.contains(&key.tgid) && refreshed.insert(key.tgid) {
                    self.symbolizer.refresh(key.tgid);
                }
                let ips = kernel.stack(key.user_stack_id as u32).unwrap_or_default();
                let frames = self.symbolizer.user_frames(key.tgid, &ips);
                self.user_stacks.insert((key.tgid, key.user_stack_id), frames.into());
            }
            if key.kernel_stack_id >= 0 && !self.kernel_stacks.contains_key(&key.kernel_stack_id) {
                let ips = kernel.stack(key.kernel_stack_id as u32).unwrap_or_default();
                let frames = self.symbolizer.kernel_frames(&ips);
                self.kernel_stacks.insert(key.kernel_stack_id, frames.into());
            }
            if key.py_stack != 0
                && !self.py_stacks.contains_key(&(key.tgid, key.py_stack))
                && let Some(stack) = kernel.py_stack(key.py_stack)
            {
                let frames = self.python.stack(key.tgid, &stack);
                if unreadable_frames(&frames) > 0 {
                    self.unreadable.insert((key.tgid, key.py_stack), Instant::now());
                }
                self.py_stacks.insert((key.tgid, key.py_stack), Arc::new(frames));
            }
            if !self.threads.contains_key(&key.tid)
                && let Some(name) = process::thread_name(key.tgid, key.tid)
            {
                self.threads.insert(key.tid, name);
            }
        }
        self.rename_unreadable(kernel, live_pids);
        Ok(())
    }

    /// Names again the Python stacks named with unreadable frames lately (see
    /// `RENAME_UNREADABLE_FOR`), keeping what reads more of them.
    fn rename_unreadable(&mut self, kernel: &KernelPrograms, live_pids: &[u32]) {
        if self.unreadable.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut retry: Vec<(u32, u64)> = Vec::new();
        self.unreadable.retain(|&(tgid, id), since| {
            let keep = now.duration_since(*since) < RENAME_UNREADABLE_FOR && live_pids.contains(&tgid);
            if keep {
                retry.push((tgid, id));
            }
            keep
        });
        for (tgid, id) in retry {
            let Some(stack) = kernel.py_stack(id) else {
                self.unreadable.remove(&(tgid, id));
                continue;
            };
            let before = self.py_stacks.get(&(tgid, id)).map_or(usize::MAX, |f| unreadable_frames(f));
            let frames = self.python.stack(tgid, &stack);
            let after = unreadable_frames(&frames);
            if after < before {
                self.py_stacks.insert((tgid, id), Arc::new(frames));
            }
            if after == 0 {
                self.unreadable.remove(&(tgid, id));
            }
        }
    }

    /// Names Python stack `stack` of thread `tid` of process `tgid`, walked in userspace
    /// rather than by the kernel (a wait under way as the session started); returns the id
    /// its keys are to carry.
    pub fn add_walked_stack(&mut self, tgid: u32, tid: u32, stack: &agent_ebpf::PyStack) -> u64 {
        let id = WALKED_HERE | u64::from(tid);
        let frames = self.python.stack(tgid, stack);
        self.py_stacks.insert((tgid, id), Arc::new(frames));
        id
    }

    /// Builds the profile as `view` says.
    pub fn profile(&self, view: View) -> Profile {
        self.profile_of(&self.counts, view)
    }

    /// CPU samples of each process's GIL holder, as last read (`collect` with `final_read`).
    pub fn gil_held(&self) -> &[(u32, u64)] {
        &self.gil_held
    }

    /// The off-CPU times last read (`collect` with `final_read`), waits under way included;
    /// a key may appear more than once (its ended waits, one under way, and a run-queue key
    /// as the queued part of each key with the same stacks).
    pub fn off(&self) -> &[(OffKey, u64)] {
        &self.off
    }

    /// Entries the kernel's off-CPU counts map held at the last read (`collect` with
    /// `final_read`): how full it is.
    pub fn off_entries(&self) -> usize {
        self.off_entries
    }

    /// The last counts read (`collect` with `final_read`).
    pub fn counts(&self) -> &[(SampleKey, u64)] {
        &self.counts
    }

    /// A profile of `counts` (keys already resolved by `collect`), as `view` says.
    pub fn profile_of(&self, counts: &[(SampleKey, u64)], view: View) -> Profile {
        let stacks = counts.iter().map(|(key, count)| (self.frames(key, view), *count)).collect();
        Profile { stacks, ..Default::default() }
    }

    /// The named stack of `key` (resolved by `collect`), root first, as `view` says.
    pub(crate) fn frames(&self, key: &SampleKey, view: View) -> Vec<Frame> {
        let mut frames: Vec<Frame> = Vec::new();
        if view.root_per_process {
            let comm = self.comms.get(&key.tgid).map(String::as_str).unwrap_or("?");
            frames.push(Frame::Marker(Marker::Process { comm: comm.into(), pid: key.tgid }));
        }
        if view.threads {
            let name = self.threads.get(&key.tid).map(String::as_str).unwrap_or("?");
            frames.push(Frame::Marker(Marker::Thread { name: name.into(), tid: key.tid }));
        }
        let roots = frames.len();
        let user = self.user_stacks.get(&(key.tgid, key.user_stack_id));
        let py = self.py_stacks.get(&(key.tgid, key.py_stack)).filter(|p| !p.frames.is_empty());
        match (py, view.native) {
            (Some(py), false) => {
                if py.truncated {
                    frames.push(Frame::Marker(Marker::Truncated));
                }
                frames.extend(py.frames.iter().rev().map(|f| f.frame.clone()));
            }
            (Some(py), true) => {
                let native: Vec<Frame> = user.map(|u| u.iter().rev().cloned().collect()).unwrap_or_default();
                frames.extend(interleave(&native, py));
                self.push_kernel(&mut frames, key);
            }
            (None, _) => {
                match user {
                    Some(user) => frames.extend(user.iter().rev().cloned()),
                    None if key.user_stack_id == DROPPED_STACK => {
                        frames.push(Frame::Marker(Marker::UserStackDropped))
                    }
                    None => {}
                }
                self.push_kernel(&mut frames, key);
            }
        }
        if frames.len() == roots {
            frames.push(Frame::Unknown { kernel: false });
        }
        frames
    }

    /// The kernel frames of stack `id`, leaf first, if named.
    pub(crate) fn kernel_stack(&self, id: i32) -> Option<&[Frame]> {
        self.kernel_stacks.get(&id).map(|s| &s[..])
    }

    fn push_kernel(&self, frames: &mut Vec<Frame>, key: &SampleKey) {
        match self.kernel_stacks.get(&key.kernel_stack_id) {
            Some(kernel) => frames.extend(kernel.iter().rev().cloned()),
            None if key.kernel_stack_id == DROPPED_STACK => {
                frames.push(Frame::Marker(Marker::KernelStackDropped))
            }
            None => {}
        }
    }

    /// Processes with samples.
    pub fn processes(&self) -> usize {
        let mut pids: Vec<u32> = self.counts.iter().map(|(k, _)| k.tgid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids.len()
    }

    pub fn comm(&self, pid: u32) -> Option<&str> {
        self.comms.get(&pid).map(String::as_str)
    }

    /// Python code objects read so far (see `PySymbolizer::code_read`).
    pub fn code_read(&self) -> u64 {
        self.python.code_read()
    }
}

/// Native frames (root to leaf) with each interpreter eval frame replaced by the Python
/// frames it runs. Python frames split into segments at each entry frame; segments and
/// eval frames pair up root first. Segments left over (native unwinding lost an eval
/// frame) go where the last eval frame was, or above all native frames when none was seen.
pub fn interleave(native: &[Frame], py: &PyFrames) -> Vec<Frame> {
    let mut segments: Vec<Vec<Frame>> = Vec::new();
    for f in py.frames.iter().rev() {
        if f.entry || segments.is_empty() {
            segments.push(Vec::new());
        }
        segments.last_mut().expect("pushed above").push(f.frame.clone());
    }
    let mut segments = segments.into_iter();
    let mut out = Vec::with_capacity(native.len() + py.frames.len() + 1);
    if py.truncated {
        out.push(Frame::Marker(Marker::Truncated));
    }
    let mut last_eval = None;
    for f in native {
        if is_eval_frame(f)
            && let Some(seg) = segments.next()
        {
            out.extend(seg);
            last_eval = Some(out.len());
        } else if !is_eval_frame(f) {
            out.push(f.clone());
        }
    }
    let rest: Vec<Frame> = segments.flatten().collect();
    // With no eval frame unwound (an interpreter built without frame pointers), the native
    // frames are the C code the innermost Python frame called: they go below it.
    let at = last_eval.unwrap_or(usize::from(py.truncated));
    out.splice(at..at, rest);
    out
}

/// CPython's bytecode evaluation loop, as native frames name it.
fn is_eval_frame(frame: &Frame) -> bool {
    let Frame::Native { function: name } = frame else { return false };
    matches!(
        name.as_ref(),
        "_PyEval_EvalFrameDefault" | "_PyEval_EvalFrame" | "PyEval_EvalFrameEx" | "_PyEval_Vector"
    ) || name.starts_with("_PyEval_EvalFrameDefault.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::PyFrame;

    fn natives(v: &[&str]) -> Vec<Frame> {
        v.iter().map(|s| Frame::Native { function: (*s).into() }).collect()
    }

    fn py(function: &str, entry: bool) -> PyFrame {
        PyFrame { frame: Frame::Python { function: function.into(), file: "a.py".into(), line: 1 }, entry }
    }

    fn functions(frames: &[Frame]) -> Vec<&str> {
        frames.iter().map(|f| f.function().unwrap()).collect()
    }

    #[test]
    fn interleaves_python_segments_into_eval_frames() {
        // Leaf first, as the kernel records them: c (entry), b, a (entry).
        let py = PyFrames { frames: vec![py("c", true), py("b", false), py("a", true)], truncated: false };
        let native =
            natives(&["main", "_PyEval_EvalFrameDefault", "call", "_PyEval_EvalFrameDefault", "hash"]);
        assert_eq!(functions(&interleave(&native, &py)), ["main", "a", "b", "call", "c", "hash"]);

        // Native unwinding reached no eval frame: the native frames are what c called.
        let out = interleave(&natives(&["PyObject_Malloc", "memset"]), &py);
        assert_eq!(functions(&out), ["a", "b", "c", "PyObject_Malloc", "memset"]);
    }
}
