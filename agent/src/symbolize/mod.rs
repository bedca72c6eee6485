//! Turns sampled addresses into frames: user addresses through a snapshot of the
//! process's mappings and the mapped files' symbol tables (read, never mapped: see
//! `sys::elf`), kernel addresses through kallsyms (blazesym).
pub mod maps;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::{
    MaybeDefault,
    symbolize::{
        Input, Symbolized, Symbolizer as Blaze,
        source::{Kernel, Source},
    },
};

use self::maps::{Mapping, ProcMaps};
use crate::{
    profile::Frame,
    sys::{elf::FunctionSymbols, maps as sys_maps},
};

struct ProcState {
    maps: ProcMaps,
    /// Prefix that reaches the process's files from our mount namespace.
    root: Option<PathBuf>,
    /// When the mappings were read and how long that took: an address outside them reads
    /// them again only after ten times as long, so a process whose maps cost a quarter
    /// second to read (65,530 long-named mappings) cannot keep us reading them.
    read_at: Instant,
    read_took: Duration,
}

/// Native frames cached by (file, offset) before the cache starts over.
const MAX_NAMES: usize = 100_000;
/// Symbol tables kept (by file), and the bytes they may hold, before the cache starts over.
const MAX_FILES: usize = 256;
const MAX_FILE_BYTES: usize = 256 << 20;

/// Resolves addresses to names, caching by file offset and keeping mapping snapshots
/// of processes that have since exited.
pub struct Symbolizer {
    blaze: Blaze,
    procs: HashMap<u32, ProcState>,
    /// By (path, inode, file offset): one path names different files in different containers.
    user_names: HashMap<(Arc<PathBuf>, u64, u64), Frame>,
    /// Symbol tables by (path, inode); None: not a file we could read (a FIFO or device in a
    /// library's place, a swapped file, no ELF, tables over our limits).
    files: HashMap<(Arc<PathBuf>, u64), Option<Arc<FunctionSymbols>>>,
    file_bytes: usize,
    kernel_names: HashMap<u64, Frame>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        let blaze = Blaze::builder().enable_code_info(false).enable_inlined_fns(false).build();
        Self {
            blaze,
            procs: HashMap::new(),
            user_names: HashMap::new(),
            files: HashMap::new(),
            file_bytes: 0,
            kernel_names: HashMap::new(),
        }
    }

    /// Drops the mapping snapshots of the processes not in `live` (they exited and their
    /// stacks were named), and the name cache when it has grown past `MAX_NAMES`.
    pub fn forget_exited(&mut self, live: &[u32]) {
        self.procs.retain(|pid, _| live.contains(pid));
        if self.user_names.len() > MAX_NAMES {
            self.user_names.clear();
        }
    }

    /// Drops the mapping snapshot of process `pid` (a new process took its pid).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// Re-reads a live process's mappings (unless read so recently that reading again would
    /// spend over a tenth of our time on it); keeps the last snapshot when it has exited.
    pub fn refresh(&mut self, pid: u32) {
        if self.procs.get(&pid).is_some_and(|p| p.read_at.elapsed() < p.read_took * 10) {
            return; // read moments ago, for a tenth of the time since at most
        }
        let started = Instant::now();
        if let Ok(maps) = ProcMaps::read(pid) {
            if maps.is_empty() {
                return; // a zombie shows no mappings: keep what we had
            }
            let (read_at, read_took) = (Instant::now(), started.elapsed());
            let state = ProcState { maps, root: sys_maps::root_of(pid), read_at, read_took };
            self.procs.insert(pid, state);
        }
    }

    /// Frames of a user stack given leaf first; returned leaf first. The kernel unwinds
    /// user stacks by frame pointers, which code built without them leaves as whatever the
    /// register held: an address outside every mapping ends the trustworthy part, so the
    /// stack ends there in one `[unknown]` frame (not a chain of them, each a frame pointer
    /// followed into garbage).
    pub fn user_frames(&mut self, pid: u32, ips: &[u64]) -> Vec<Frame> {
        if !self.procs.contains_key(&pid) {
            self.refresh(pid);
        }
        let mut out = Vec::with_capacity(ips.len());
        let mut refreshed = false;
        for (i, &ip) in ips.iter().enumerate() {
            // Return addresses point after the call: step back into the calling instruction.
            let addr = if i == 0 { ip } else { ip.saturating_sub(1) };
            let mut mapping = self.procs.get(&pid).and_then(|p| p.maps.find(addr)).cloned();
            if mapping.is_none() && !refreshed {
                // A library loaded after the last snapshot: look again once.
                refreshed = true;
                self.refresh(pid);
                mapping = self.procs.get(&pid).and_then(|p| p.maps.find(addr)).cloned();
            }
            match mapping {
                Some(m) => out.push(self.user_name(pid, &m, addr)),
                None => {
                    out.push(Frame::Unknown { kernel: false });
                    break;
                }
            }
        }
        out
    }

    fn user_name(&mut self, pid: u32, m: &Mapping, addr: u64) -> Frame {
        let file_offset = addr - m.start + m.file_offset;
        let Some(path) = &m.path else {
            return Frame::NativeUnnamed { module: m.name.clone(), offset: addr - m.start };
        };
        let key = (path.clone(), m.inode, file_offset);
        if let Some(name) = self.user_names.get(&key) {
            return name.clone();
        }
        let unnamed = Frame::NativeUnnamed { module: m.name.clone(), offset: file_offset };
        let Some(root) = self.procs.get(&pid).map(|p| p.root.clone()) else { return unnamed };
        let name = match self.symbols(root.as_deref(), path, m.inode) {
            Some(symbols) => match symbols.name_at(file_offset) {
                Some(function) => Frame::Native { function },
                None => unnamed,
            },
            None => unnamed,
        };
        self.user_names.insert(key, name.clone());
        name
    }

    /// The symbol table of the file mapped from `path` with `inode`, read once. Only a
    /// regular file that is still the one mapped is read (a FIFO or device named like a
    /// library would block, another file would lie), through the descriptor that checked it.
    fn symbols(
        &mut self,
        root: Option<&std::path::Path>,
        path: &Arc<PathBuf>,
        inode: u64,
    ) -> Option<Arc<FunctionSymbols>> {
        let key = (path.clone(), inode);
        if let Some(known) = self.files.get(&key) {
            return known.clone();
        }
        let read =
            sys_maps::open_mapped(root, path, inode).ok().and_then(FunctionSymbols::read).map(Arc::new);
        let bytes = read.as_ref().map_or(0, |s| s.bytes());
        if self.files.len() >= MAX_FILES || self.file_bytes + bytes > MAX_FILE_BYTES {
            self.files.clear();
            self.file_bytes = 0;
        }
        self.file_bytes += bytes;
        self.files.insert(key, read.clone());
        read
    }

    /// Frames of a kernel stack given leaf first.
    pub fn kernel_frames(&mut self, ips: &[u64]) -> Vec<Frame> {
        let missing: Vec<u64> =
            ips.iter().copied().filter(|ip| !self.kernel_names.contains_key(ip)).collect();
        if !missing.is_empty() {
            let src = Source::Kernel(Kernel { vmlinux: MaybeDefault::None, ..Kernel::default() });
            let resolved = self.blaze.symbolize(&src, Input::AbsAddr(&missing)).unwrap_or_default();
            for (i, ip) in missing.iter().enumerate() {
                let frame = match resolved.get(i) {
                    Some(Symbolized::Sym(sym)) => Frame::Kernel { function: Arc::from(sym.name.as_ref()) },
                    _ => Frame::Unknown { kernel: true },
                };
                self.kernel_names.insert(*ip, frame);
            }
        }
        ips.iter().map(|ip| self.kernel_names[ip].clone()).collect()
    }
}
