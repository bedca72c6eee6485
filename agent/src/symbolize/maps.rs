//! Snapshots of a process's executable memory mappings (/proc/PID/maps), kept so that
//! addresses can still be resolved to (file, offset) after the process has exited.
use std::{fs, io, path::PathBuf, sync::Arc};

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
}

/// The executable mappings of one process, sorted by start address.
#[derive(Debug, Clone, Default)]
pub struct ProcMaps {
    mappings: Vec<Mapping>,
}

impl ProcMaps {
    pub fn read(pid: u32) -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string(format!("/proc/{pid}/maps"))?))
    }

    pub fn parse(text: &str) -> Self {
        let mut mappings: Vec<Mapping> = text.lines().filter_map(parse_line).collect();
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

fn parse_line(line: &str) -> Option<Mapping> {
    // start-end perms offset dev inode [path]
    let mut fields = line.splitn(6, ' ');
    let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
    if !perms.contains('x') {
        return None;
    }
    let (_dev, _inode) = (fields.next()?, fields.next()?);
    let path = fields.next().map(str::trim).unwrap_or("");
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let file_offset = u64::from_str_radix(offset, 16).ok()?;
    let (path, name): (Option<Arc<PathBuf>>, Arc<str>) = if path.starts_with('/') {
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        let base = path.rsplit('/').next().unwrap_or(path);
        (Some(Arc::new(PathBuf::from(path))), Arc::from(base))
    } else if path.is_empty() {
        (None, Arc::from("[anon]"))
    } else {
        (None, Arc::from(path))
    };
    Some(Mapping { start, end, file_offset, path, name })
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
        let maps = ProcMaps::parse(MAPS);
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
