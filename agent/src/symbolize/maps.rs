//! Snapshots of a process's executable memory mappings (/proc/PID/maps), kept so that
//! addresses can still be resolved to (file, offset) after the process has exited.
use std::{io, path::PathBuf, sync::Arc};

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

impl ProcMaps {
    pub fn read(pid: u32) -> io::Result<Self> {
        Ok(Self::from_entries(maps::read(pid)?))
    }

    fn from_entries(entries: Vec<MapEntry>) -> Self {
        let mut mappings: Vec<Mapping> = entries.into_iter().filter_map(mapping).collect();
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

fn mapping(e: MapEntry) -> Option<Mapping> {
    if !e.executable {
        return None;
    }
    let (path, name): (Option<Arc<PathBuf>>, Arc<str>) = match e.name {
        MapName::File { path, .. } => {
            let base: Arc<str> = path.file_name().map_or("?".into(), |n| n.to_string_lossy().into());
            (Some(Arc::new(path)), base)
        }
        MapName::Special(name) => (None, name.into()),
        MapName::Anonymous => (None, "[anon]".into()),
    };
    Some(Mapping { start: e.start, end: e.end, file_offset: e.offset, path, name, inode: e.inode })
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
}
