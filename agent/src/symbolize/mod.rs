//! Turns sampled addresses into frames: user addresses through a snapshot of the
//! process's mappings and blazesym on the mapped files, kernel addresses through kallsyms.
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
        source::{Elf, Kernel, Source},
    },
};

use self::maps::{Mapping, ProcMaps};
use crate::{profile::Frame, sys::maps as sys_maps};

struct ProcState {
    maps: ProcMaps,
    /// Prefix that reaches the process's files from our mount namespace.
    root: Option<PathBuf>,
    /// Whether each mapped (file, inode) is still that regular file (checked once).
    usable: HashMap<(Arc<PathBuf>, u64), bool>,
    /// When the mappings were read and how long that took: an address outside them reads
    /// them again only after ten times as long, so a process whose maps cost a quarter
    /// second to read (65,530 long-named mappings) cannot keep us reading them.
    read_at: Instant,
    read_took: Duration,
}

/// Native frames cached by (file, offset) before the cache starts over.
const MAX_NAMES: usize = 100_000;

/// Resolves addresses to names, caching by file offset and keeping mapping snapshots
/// of processes that have since exited.
pub struct Symbolizer {
    blaze: Blaze,
    procs: HashMap<u32, ProcState>,
    /// By (path, inode, file offset): one path names different files in different containers.
    user_names: HashMap<(Arc<PathBuf>, u64, u64), Frame>,
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
        Self { blaze, procs: HashMap::new(), user_names: HashMap::new(), kernel_names: HashMap::new() }
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
            let usable = self.procs.remove(&pid).map(|p| p.usable).unwrap_or_default();
            let (read_at, read_took) = (Instant::now(), started.elapsed());
            let state = ProcState { maps, root: sys_maps::root_of(pid), usable, read_at, read_took };
            self.procs.insert(pid, state);
        }
    }

    /// Frames of a user stack given leaf first; returned leaf first.
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
            out.push(match mapping {
                Some(m) => self.user_name(pid, &m, addr),
                None => Frame::Unknown { kernel: false },
            });
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
        let Some(proc) = self.procs.get_mut(&pid) else { return unnamed };
        // Only a regular file that is still the one mapped goes to the ELF reader: a FIFO
        // or device named like a library would block it, another file would lie.
        let usable = *proc
            .usable
            .entry((path.clone(), m.inode))
            .or_insert_with(|| sys_maps::open_mapped(proc.root.as_deref(), path, m.inode).is_ok());
        if !usable {
            return unnamed;
        }
        let src = Source::Elf(Elf::new(sys_maps::in_root(proc.root.as_deref(), path)));
        let name = match self.blaze.symbolize_single(&src, Input::FileOffset(file_offset)) {
            // An address past the end of the nearest symbol (PLT stubs after `_init`, for
            // one) is not in that function.
            Ok(Symbolized::Sym(sym)) if sym.size.is_none_or(|size| sym.offset < size) => {
                Frame::Native { function: Arc::from(sym.name.as_ref()) }
            }
            _ => unnamed,
        };
        self.user_names.insert(key, name.clone());
        name
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
