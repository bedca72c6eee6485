//! Keeps track of the processes a session samples: recognizes Python processes (also
//! after an exec), finds followed children and, with --all-python, every CPython process.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_ebpf::{TARGET_INHERIT, TARGET_SAMPLE};

use super::stacks::Collector;
use crate::{
    error::Result,
    programs::KernelPrograms,
    python::{
        self,
        detect::{Detected, PythonProcess},
    },
    sys::process,
};

/// How often a process that is not (yet) Python is looked at again.
const RECHECK: Duration = Duration::from_millis(500);
/// The same for a process whose executable is named python: its libpython may be
/// about to be mapped (a command just launched), so it is looked at every tick at first,
/// then twice as late after each miss, up to `RECHECK_NAMED_SLOWEST`: a process named python
/// that is not CPython (or maps 65,530 long-named files to make each look cost) is not
/// read again and again.
const RECHECK_PYTHON_NAMED: Duration = Duration::from_millis(50);
const RECHECK_NAMED_SLOWEST: Duration = Duration::from_secs(5);
/// How often /proc is scanned for new Python processes with --all-python.
const SCAN: Duration = Duration::from_secs(1);
/// After an exec into a program named python, or one that ran CPython before, the process
/// is looked at every `FRESH_EVERY` for `FRESH_FOR`: the dynamic loader maps its libpython
/// within milliseconds, and the interpreter is walked from its first samples, not from the
/// next tick.
const FRESH_EVERY: Duration = Duration::from_millis(2);
const FRESH_FOR: Duration = Duration::from_millis(250);
/// With `name_early`, new stacks are named as they come while the targets run code not seen
/// before (their code objects may be freed moments later), for `NEW_CODE_FOR` after code was
/// last read, and while a process is fresh (see `FRESH_FOR`); otherwise, as the targets run
/// what they ran (a server's steady state, whose new stacks are known code at new lines or
/// in new waits), at most every `KNOWN_CODE_EVERY`: each wake-up costs the agent more than
/// naming what it woke for.
const NEW_CODE_FOR: Duration = Duration::from_secs(1);
const KNOWN_CODE_EVERY: Duration = Duration::from_millis(20);
/// Executables remembered as having run CPython (device, inode): a program that embeds
/// libpython under another name is looked at as closely as one named python.
const PYTHON_EXES_MAX: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Unknown,
    NotPython,
    Python,
    Unsupported,
    /// Gone: removed from the kernel's maps, so a reused PID is not taken for it.
    Exited,
}

struct Tracked {
    exe: Option<PathBuf>,
    kind: Kind,
    checked: Option<Instant>,
    /// Found by --all-python (not a target until recognized as Python).
    scanned: bool,
    /// Looks that found no CPython since the last exec.
    misses: u32,
    /// When the process started: a live process with another start time reuses the pid.
    start: Option<u64>,
    /// Forked by a scanned Python process: the kernel made it a target with its parent's
    /// Python layout (`TARGET_INHERIT`) before userspace looked at it.
    inherited: bool,
    /// When it exec'd into a program that may be CPython (see `FRESH_EVERY`).
    fresh: Option<Instant>,
    /// When its last exec was, as the kernel saw it (`CLOCK_MONOTONIC` ns).
    exec_ns: Option<u64>,
    /// Given by pid: the user is told at once when it is not a CPython stoker walks.
    announce: bool,
}

impl Tracked {
    fn new(pid: u32, scanned: bool) -> Self {
        let start = process::start_time(pid);
        Self {
            exe: None,
            kind: Kind::Unknown,
            checked: None,
            scanned,
            misses: 0,
            start,
            inherited: false,
            fresh: None,
            exec_ns: None,
            announce: false,
        }
    }

    /// Just exec'd into a program that may be CPython, and not recognized yet.
    fn is_fresh(&self, now: Instant) -> bool {
        matches!(self.kind, Kind::Unknown | Kind::NotPython)
            && self.fresh.is_some_and(|at| now.duration_since(at) < FRESH_FOR)
    }

    /// A target in the kernel: given or launched, recognized as Python, or forked by a
    /// scanned Python process.
    fn in_kernel(&self) -> bool {
        !self.scanned || self.kind == Kind::Python || self.inherited
    }
}

/// The processes of a session and what they run.
pub struct Tracker {
    procs: HashMap<u32, Tracked>,
    all_python: bool,
    /// What the kernel does with Python samples besides walking their stacks.
    sampling: python::SampleOptions,
    last_scan: Option<Instant>,
    me: u32,
    warned_no_python: bool,
    /// Which scanned processes to take (the node agent's selection); all when None.
    filter: Option<Box<dyn Fn(u32) -> bool>>,
    /// CPython version of each recognized process.
    versions: HashMap<u32, String>,
    /// The CPython of each process recognized as one (not of forks sampled with their
    /// parent's), as found: what readers of its memory need, found once.
    pythons: HashMap<u32, Arc<PythonProcess>>,
    /// Pids a new process took since the last update's look.
    reused: Vec<u32>,
    /// Forks of scanned Python processes found by the last update: (child, parent).
    forks: Vec<(u32, u32)>,
    /// Executables that ran CPython (see `PYTHON_EXES_MAX`).
    python_exes: HashSet<(u64, u64)>,
    /// Some process was recognized as a CPython stoker walks.
    found_python: bool,
    /// New stacks are named soon after the kernel reports them (see `name_early`).
    name_early: bool,
    /// Python code objects read so far, and when that count last grew (see `NEW_CODE_FOR`).
    code_read: u64,
    new_code_at: Instant,
    /// When the last early naming ended.
    named_at: Instant,
}

impl Tracker {
    /// From now on, CPU samples of Python threads count only while they hold the GIL.
    pub fn gil_only(&mut self) {
        self.sampling.gil_only = true;
    }

    /// From now on, the CPU samples of each Python process's GIL holder are counted (the
    /// agent's GIL-held time).
    pub fn count_gil(&mut self) {
        self.sampling.gil_count = true;
    }

    /// `native`: Python samples also record native stacks (for `--native`).
    pub fn new(all_python: bool, native: bool) -> Self {
        Self {
            procs: HashMap::new(),
            all_python,
            sampling: python::SampleOptions { native, ..Default::default() },
            last_scan: None,
            me: std::process::id(),
            warned_no_python: false,
            filter: None,
            versions: HashMap::new(),
            pythons: HashMap::new(),
            reused: Vec::new(),
            forks: Vec::new(),
            python_exes: HashSet::new(),
            found_python: false,
            name_early: false,
            code_read: 0,
            new_code_at: Instant::now(),
            named_at: Instant::now(),
        }
    }

    /// From now on, `wait` names new stacks as soon as the kernel reports them, not at the
    /// next tick: short-lived code objects (a module's body while it is imported) are read
    /// while they live. Once no new code has come for a while, at most every
    /// `KNOWN_CODE_EVERY`. A session's choice; the agent names on its own pace.
    pub fn name_early(&mut self) {
        self.name_early = true;
    }

    /// Only scanned processes for which `filter` holds are sampled.
    pub fn set_filter(&mut self, filter: Box<dyn Fn(u32) -> bool>) {
        self.filter = Some(filter);
    }

    /// Pids whose process was replaced by a new one with the same pid in the last update.
    pub fn reused(&self) -> &[u32] {
        &self.reused
    }

    /// Forks of scanned Python processes the last update found, with their parents: a fork
    /// that already exited is named after its parent (it ran the same program).
    pub fn forks(&self) -> &[(u32, u32)] {
        &self.forks
    }

    /// The CPython of a process recognized as one, as found when it was.
    pub fn python(&self, pid: u32) -> Option<Arc<PythonProcess>> {
        self.pythons.get(&pid).cloned()
    }

    /// The CPython version of a recognized process (`3.12.1`).
    pub fn version(&self, pid: u32) -> Option<&str> {
        self.versions.get(&pid).map(String::as_str)
    }

    /// A process sampled from the start (given PID or launched command).
    pub fn add(&mut self, pid: u32) {
        self.procs.insert(pid, Tracked::new(pid, false));
    }

    /// A running process given by pid: told at once when it is not a CPython stoker walks.
    pub fn add_attached(&mut self, pid: u32) {
        let mut t = Tracked::new(pid, false);
        t.announce = true;
        self.procs.insert(pid, t);
    }

    /// True once some process was recognized as a CPython stoker walks.
    pub fn found_python(&self) -> bool {
        self.found_python
    }

    /// Looks at a just-launched process until its interpreter is mapped (or `limit`
    /// passes), so its first samples already have Python frames.
    pub fn settle(
        &mut self,
        pid: u32,
        limit: Duration,
        kernel: &mut KernelPrograms,
        collector: &mut Collector,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(t) = self.procs.get_mut(&pid) {
                t.checked = None;
            }
            self.update(kernel, collector)?;
            match self.procs.get(&pid).map(|t| &t.kind) {
                Some(Kind::Python | Kind::Unsupported) | None => break,
                Some(_) if !process::is_alive(pid) => break,
                Some(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        Ok(())
    }

    /// Pids sampled (known targets and recognized Python processes) that are still alive.
    pub fn live_targets(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|(_, t)| t.in_kernel())
            .map(|(&pid, _)| pid)
            .filter(|&pid| process::is_alive(pid))
            .collect()
    }

    /// Discovers new processes and recognizes Python ones; called every tick.
    pub fn update(&mut self, kernel: &mut KernelPrograms, collector: &mut Collector) -> Result<()> {
        // Targets that exited leave the kernel's maps, and so does a process whose pid a new
        // one took since the last look (its start time differs): what was known of the old
        // one (Python layout, code objects, mappings, name) goes, and a process found by
        // scanning is looked at afresh.
        self.reused.clear();
        self.forks.clear();
        let (mut fresh, mut gone) = (Vec::new(), Vec::new());
        for (&pid, t) in self.procs.iter_mut() {
            let start = process::start_time(pid);
            if t.kind == Kind::Exited {
                // Kept while the pid is taken, so that an exited target's pid is not taken
                // for it; a scanned one is not needed once the pid is free or reused.
                if t.scanned && (start.is_none() || start != t.start) {
                    gone.push(pid);
                }
                continue;
            }
            let reused = start.is_some() && t.start.is_some() && start != t.start;
            if start.is_some() && !reused {
                continue;
            }
            let in_kernel = t.in_kernel();
            if in_kernel {
                kernel.remove_target(pid)?;
                crate::net::forget_process(kernel, pid)?;
            }
            if reused {
                tracing::info!("pid {pid}: a new process took the pid");
                collector.forget_process(pid);
                self.versions.remove(&pid);
                self.pythons.remove(&pid);
                self.reused.push(pid);
                if t.scanned {
                    fresh.push(pid);
                }
            }
            if in_kernel || reused {
                t.kind = Kind::Exited;
            }
        }
        for pid in gone {
            self.procs.remove(&pid);
            self.versions.remove(&pid);
            self.pythons.remove(&pid);
        }
        for pid in fresh {
            self.procs.insert(pid, Tracked::new(pid, true));
        }
        // Children the kernel started following (a new process may reuse an old PID).
        let followed = if kernel.follows_children() { kernel.targets()? } else { Vec::new() };
        for (pid, flags) in followed {
            if !matches!(self.procs.get(&pid).map(|t| &t.kind), None | Some(Kind::Exited)) {
                continue;
            }
            if flags & TARGET_INHERIT == 0 {
                self.add(pid);
                // A fork of a Python target: named through its parent if gone before it is
                // looked at.
                if let Some(parent) = kernel.take_parent(pid) {
                    collector.python.set_parent(pid, parent);
                }
            } else if self.filter.as_ref().is_none_or(|f| f(pid)) {
                // A fork of a scanned Python process: sampled with its parent's layout
                // already, and recognized as Python on this tick.
                let mut t = Tracked::new(pid, true);
                t.inherited = true;
                self.procs.insert(pid, t);
                if let Some(parent) = kernel.take_parent(pid) {
                    collector.python.set_parent(pid, parent);
                    self.forks.push((pid, parent));
                    // Its code may differ from its parent's from now on.
                    self.new_code_at = Instant::now();
                    if let Some(v) = self.versions.get(&parent).cloned() {
                        self.versions.insert(pid, v);
                    }
                }
            } else {
                kernel.remove_target(pid)?;
            }
        }
        self.note_execs(kernel, collector)?;
        if self.all_python && self.last_scan.is_none_or(|t| t.elapsed() >= SCAN) {
            self.last_scan = Some(Instant::now());
            for pid in process::all_pids() {
                if pid != self.me
                    && !self.procs.contains_key(&pid)
                    && self.filter.as_ref().is_none_or(|f| f(pid))
                {
                    self.procs.insert(pid, Tracked::new(pid, true));
                }
            }
        }
        self.refuse_untried(kernel, collector)?;
        self.look(kernel, collector, false)
    }

    /// Processes of a CPython newer than stoker knows whose layout failed its check on the
    /// first code objects: sampled with native stacks from now on, with one warning each.
    fn refuse_untried(&mut self, kernel: &mut KernelPrograms, collector: &mut Collector) -> Result<()> {
        for (pid, why) in collector.python.take_refused() {
            let Some(t) = self.procs.get_mut(&pid).filter(|t| t.kind == Kind::Python) else { continue };
            let version = self.versions.remove(&pid).unwrap_or_default();
            self.pythons.remove(&pid);
            if t.scanned && !t.inherited {
                kernel.remove_target(pid)?;
                crate::net::forget_process(kernel, pid)?;
            } else {
                kernel.remove_python(pid)?;
            }
            t.kind = Kind::Unsupported;
            eprintln!(
                "stoker: warning: process {pid} runs CPython {version}, newer than stoker knows, and its layout did not check out ({why}); its samples show native stacks"
            );
        }
        Ok(())
    }

    /// Waits for `tick`, looking at processes as they exec meanwhile (see `FRESH_EVERY`)
    /// and, with `name_early`, naming new stacks as they come.
    pub fn wait(
        &mut self,
        tick: Duration,
        kernel: &mut KernelPrograms,
        collector: &mut Collector,
    ) -> Result<()> {
        let deadline = Instant::now() + tick;
        // Looked up once a tick, not at every wake-up: reading a process's /proc/PID/stat sums
        // the CPU time of all its threads. A target that exits meanwhile is taken for live
        // until the next tick, which costs a vain read of its mappings at most.
        let mut live = None;
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Ok(());
            }
            // Code read by any naming counts, the tick's included.
            if collector.code_read() != self.code_read {
                self.code_read = collector.code_read();
                self.new_code_at = now;
            }
            let fresh = self.procs.values().any(|t| t.is_fresh(now));
            let mut timeout = if fresh { left.min(FRESH_EVERY) } else { left };
            let mut keys = self.name_early;
            if keys && !fresh && now.duration_since(self.new_code_at) >= NEW_CODE_FOR {
                let next = self.named_at + KNOWN_CODE_EVERY;
                if now < next {
                    keys = false;
                    timeout = timeout.min(next - now);
                }
            }
            let events = kernel.wait_events(timeout, keys);
            if events.keys {
                let live = live.get_or_insert_with(|| self.live_targets());
                collector.collect(kernel, live, false)?;
                self.named_at = Instant::now();
            }
            if events.exec || fresh {
                self.note_execs(kernel, collector)?;
                self.look(kernel, collector, true)?;
                live = None;
            }
        }
    }

    /// Processes that just exec'd (when the kernel reports them): looked at now, the new
    /// program's Python layout (if any) found afresh: the kernel dropped the old one.
    fn note_execs(&mut self, kernel: &mut KernelPrograms, collector: &mut Collector) -> Result<()> {
        let now = Instant::now();
        for (pid, exec_ns) in kernel.take_execs() {
            if pid == self.me {
                continue;
            }
            let t = match self.procs.get_mut(&pid) {
                Some(t) if t.kind != Kind::Exited => {
                    if t.scanned && t.in_kernel() {
                        // What the old program had open is not the new one's.
                        kernel.remove_target(pid)?;
                        crate::net::forget_process(kernel, pid)?;
                    }
                    if t.kind == Kind::Python || t.inherited {
                        collector.forget_process(pid);
                        self.versions.remove(&pid);
                        self.pythons.remove(&pid);
                    }
                    t.kind = Kind::Unknown;
                    t.inherited = false;
                    t.misses = 0;
                    t.checked = None;
                    t
                }
                // A target the kernel follows (a child not seen yet): sampled as given.
                _ if kernel.target_flags(pid).is_some_and(|f| f & TARGET_INHERIT == 0) => {
                    self.add(pid);
                    self.procs.get_mut(&pid).expect("just added")
                }
                _ if self.all_python && self.filter.as_ref().is_none_or(|f| f(pid)) => {
                    self.procs.insert(pid, Tracked::new(pid, true));
                    self.procs.get_mut(&pid).expect("just added")
                }
                _ => continue,
            };
            let exe = process::exe(pid);
            let known = process::exe_id(pid).is_some_and(|id| self.python_exes.contains(&id));
            t.fresh = (known || named_python(exe.as_deref())).then_some(now);
            t.exec_ns = Some(exec_ns);
        }
        Ok(())
    }

    /// Recognizes the processes due for a look (with `fresh_only`, the ones that just exec'd).
    fn look(
        &mut self,
        kernel: &mut KernelPrograms,
        collector: &mut Collector,
        fresh_only: bool,
    ) -> Result<()> {
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut found = false;
        for (&pid, t) in self.procs.iter_mut() {
            if matches!(t.kind, Kind::Python | Kind::Unsupported | Kind::Exited) {
                continue;
            }
            let fresh = t.is_fresh(now);
            if fresh_only && !fresh {
                continue;
            }
            let recheck = match named_python(t.exe.as_deref()) {
                _ if fresh => FRESH_EVERY,
                true => (RECHECK_PYTHON_NAMED * (1 << t.misses.min(8))).min(RECHECK_NAMED_SLOWEST),
                false => RECHECK,
            };
            if t.checked.is_some_and(|c| now.duration_since(c) < recheck) {
                continue;
            }
            let exe = process::exe(pid);
            if exe.is_none() && !process::is_alive(pid) {
                // An inherited target leaves the kernel first (on the next update, as a
                // target that exited).
                if !t.inherited {
                    gone.push(pid);
                }
                continue;
            }
            // A process that is not Python is looked at again only when it execs, or while
            // its executable is named python (its libpython may not be mapped yet) and its
            // maps could be read whole.
            let unreadable = t.misses == u32::MAX;
            if t.kind == Kind::NotPython
                && t.exe == exe
                && !fresh
                && (unreadable || !named_python(exe.as_deref()))
            {
                t.checked = Some(now);
                continue;
            }
            if t.exe != exe {
                t.misses = 0;
            }
            t.exe = exe;
            t.checked = Some(now);
            match python::detect::detect(pid) {
                Detected::Python(p) => {
                    if !kernel.python_ready() {
                        if !self.warned_no_python {
                            self.warned_no_python = true;
                            eprintln!(
                                "stoker: warning: kernel BTF is unavailable, so Python stacks cannot be read; showing native stacks"
                            );
                        }
                        t.kind = Kind::Unsupported;
                        continue;
                    }
                    if t.scanned {
                        kernel.add_target(pid, TARGET_SAMPLE | TARGET_INHERIT)?;
                    }
                    if p.check_code_type.is_some() && (!t.scanned || self.all_python) {
                        eprintln!(
                            "stoker: warning: process {pid} runs CPython {}, newer than stoker knows: walked with CPython 3.{}'s layout, checked on its first samples",
                            p.release,
                            python::layout::LATEST_MINOR
                        );
                    }
                    kernel.add_python(pid, &python::kernel_config(&p, self.sampling))?;
                    collector.python.add_process(&p);
                    if let Some(id) = process::exe_id(pid) {
                        if self.python_exes.len() >= PYTHON_EXES_MAX {
                            self.python_exes.clear();
                        }
                        self.python_exes.insert(id);
                    }
                    let version = p.release.clone();
                    match t.exec_ns.take() {
                        Some(ns) => {
                            let ms = process::monotonic_ns().saturating_sub(ns) as f64 / 1e6;
                            tracing::info!("pid {pid}: CPython {version}, walked {ms:.1} ms after its exec");
                        }
                        None => tracing::info!("pid {pid}: CPython {version}"),
                    }
                    self.versions.insert(pid, version);
                    self.pythons.insert(pid, Arc::from(p));
                    self.found_python = true;
                    found = true;
                    t.kind = Kind::Python;
                }
                Detected::Unsupported(version) => {
                    if !t.scanned || self.all_python {
                        eprintln!(
                            "stoker: warning: process {pid} runs CPython {version}, which stoker cannot walk; its samples show native stacks"
                        );
                    }
                    t.kind = Kind::Unsupported;
                }
                Detected::NotPython => {
                    if std::mem::take(&mut t.announce) && !named_python(t.exe.as_deref()) {
                        eprintln!(
                            "stoker: warning: process {pid} ({}) is not a CPython process stoker recognizes; its samples show native stacks",
                            process::comm(pid)
                        );
                    }
                    t.kind = Kind::NotPython;
                    // Misses while the loader maps libpython do not slow later looks.
                    if !fresh {
                        t.misses = t.misses.saturating_add(1);
                    }
                }
                Detected::TooManyMappings => {
                    tracing::info!("pid {pid}: maps too large to read whole, no CPython in the part read");
                    t.kind = Kind::NotPython;
                    t.misses = u32::MAX;
                }
            }
            if t.inherited && t.kind != Kind::Python {
                // Not a CPython stoker walks after all: the kernel stops sampling it.
                kernel.remove_target(pid)?;
                t.inherited = false;
            }
        }
        if found {
            // A new Python process runs code not read yet: named early (see `NEW_CODE_FOR`).
            self.new_code_at = now;
        }
        for pid in gone {
            if self.procs.get(&pid).is_some_and(|t| t.scanned) {
                self.procs.remove(&pid);
                self.versions.remove(&pid);
                self.pythons.remove(&pid);
            }
        }
        Ok(())
    }
}

/// True when an executable's file name is an interpreter's (`python3`, `python3.12`).
fn named_python(exe: Option<&std::path::Path>) -> bool {
    exe.and_then(|e| e.file_name()?.to_str()).is_some_and(python::detect::is_interpreter_name)
}
