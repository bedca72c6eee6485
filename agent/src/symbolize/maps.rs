//! Snapshots of a process's executable memory mappings (/proc/PID/maps), kept so that
//! addresses can still be resolved to (file, offset) after the process has exited.
use std::{collections::HashMap, io, path::PathBuf, sync::Arc};

use crate::sys::maps::{self, MapEntry, MapName};

/// One executable mapping of a file (or of an anonymous region such as [vdso]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// The mapped file's path; `None` for anonymous regions.
    pub path: Option<Arc<PathBuf>>,
    /// Short name for unknown frames: the file's base name or the region name.
    pub name: Arc<str>,
    /// The mapped file's inode (it is opened only while it is still that file).
    pub inode: u64,
}

/// The executable mappings of one process, sorted by start address.
#[derive(Debug, Clone, Default)]
pub struct ProcMaps {
    mappings: Vec<Mapping>,
}

/// Executable mappings kept per process (a Python process with many C extensions has a few
/// hundred); a process that makes more gets unknown frames in the rest.
const MAX_MAPPINGS: usize = 16 << 10;
/// Bytes of distinct file paths kept per process, each path once however often it is
/// mapped; files past it are named by their mapping only (unnamed frames).
const MAX_PATH_BYTES: usize = 1 << 20;

impl ProcMaps {
    pub fn read(pid: u32) -> io::Result<Self> {
        let mut kept = 0;
        let entries = maps::read_filtered(pid, |e| {
            kept += usize::from(e.executable);
            e.executable && kept <= MAX_MAPPINGS
        })?;
        Ok(Self::from_entries(entries.entries))
    }

    fn from_entries(entries: Vec<MapEntry>) -> Self {
        let mut paths: HashMap<PathBuf, Arc<PathBuf>> = HashMap::new();
        let mut path_bytes = 0;
        let mut mappings: Vec<Mapping> = entries
            .into_iter()
            .filter(|e| e.executable)
            .take(MAX_MAPPINGS)
            .map(|e| mapping(e, &mut paths, &mut path_bytes))
            .collect();
        mappings.sort_by_key(|m| m.start);
        Self { mappings }
    }

    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }
}

/// An executable mapping, its path shared with the process's other mappings of that file.
fn mapping(e: MapEntry, paths: &mut HashMap<PathBuf, Arc<PathBuf>>, path_bytes: &mut usize) -> Mapping {
    let (path, name): (Option<Arc<PathBuf>>, Arc<str>) = match e.name {
        MapName::File { path, .. } => {
            let base: Arc<str> = path.file_name().map_or("?".into(), |n| n.to_string_lossy().into());
            let shared = match paths.get(&path) {
                Some(shared) => Some(shared.clone()),
                None if *path_bytes + path.as_os_str().len() <= MAX_PATH_BYTES => {
                    *path_bytes += path.as_os_str().len();
                    let shared = Arc::new(path.clone());
                    paths.insert(path, shared.clone());
                    Some(shared)
                }
                None => None,
            };
            (shared, base)
        }
        MapName::Special(name) => (None, name.into()),
        MapName::Anonymous => (None, "[anon]".into()),
    };
    Mapping { start: e.start, end: e.end, file_offset: e.offset, path, name, inode: e.inode }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c1a00000-55d0c1a01000 r--p 00000000 fd:01 1234   /usr/bin/prog
55d0c1a01000-55d0c1a02000 r-xp 00001000 fd:01 1234   /usr/bin/prog
7f00aa000000-7f00aa100000 r-xp 00028000 fd:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
7f00ab000000-7f00ab001000 r-xp 00000000 00:00 0      [vdso]
7f00ac000000-7f00ac001000 r-xp 00000000 00:01 77     /memfd:jit (deleted)
";

    #[test]
    fn keeps_executable_mappings_and_finds_addresses() {
        let maps = ProcMaps::from_entries(maps::parse_from(MAPS.as_bytes()).unwrap());
        let m = maps.find(0x55d0c1a01234).unwrap();
        assert_eq!(m.file_offset, 0x1000);
        assert_eq!(&*m.name, "prog");
        assert!(maps.find(0x55d0c1a00010).is_none(), "non-executable mapping must be skipped");
        let libc = maps.find(0x7f00aa000010).unwrap();
        assert_eq!(libc.path.as_deref().unwrap().to_str().unwrap(), "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(&*maps.find(0x7f00ab000100).unwrap().name, "[vdso]");
        assert!(maps.find(0x7f00ab001000).is_none(), "end is exclusive");
        assert!(maps.find(0x10).is_none());
    }

    #[test]
    fn paths_are_shared_and_bounded() {
        let line = |i: u64, path: &str| {
            format!("{:x}-{:x} r-xp 00000000 fd:01 {i} {path}\n", i << 12, (i + 1) << 12)
        };
        // One path mapped 20,000 times: kept once, the mappings capped.
        let text: String = (1..=20_000).map(|i| line(i, "/opt/lib/libx.so")).collect();
        let maps = ProcMaps::from_entries(maps::parse_from(text.as_bytes()).unwrap());
        assert_eq!(maps.mappings.len(), MAX_MAPPINGS);
        let first = maps.mappings[0].path.clone().unwrap();
        assert!(maps.mappings.iter().all(|m| m.path.as_ref().is_some_and(|p| Arc::ptr_eq(p, &first))));
        // Distinct long paths: named until their bytes reach the budget, unnamed after.
        let long = format!("/{}", "d/".repeat(2000));
        let text: String = (1..=1000).map(|i| line(i, &format!("{long}{i}"))).collect();
        let maps = ProcMaps::from_entries(maps::parse_from(text.as_bytes()).unwrap());
        let named = maps.mappings.iter().filter(|m| m.path.is_some()).count();
        assert!(named > 0 && named * long.len() <= MAX_PATH_BYTES && named < 1000, "{named} named");
        assert_eq!(&*maps.mappings[999].name, "1000", "an unnamed mapping still has its file's base name");
    }
}
