//! A process's memory mappings (/proc/PID/maps) read defensively, and the files they name
//! opened so that a target's special files, odd names or swapped files cannot block or fool us.
use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// Longest maps line kept: the fixed fields and a path of PATH_MAX (4 KiB). Longer lines
/// (none the kernel writes) are skipped.
const MAX_LINE: u64 = 4096 + 256;
/// Most maps lines read of one process: above the kernel's default `vm.max_map_count`.
const MAX_ENTRIES: usize = 1 << 17;
/// Most maps bytes read of one process: 65,530 mappings of 250-byte paths. The kernel spends
/// about 1 ms per 64 KiB writing maps of long paths, so a target with 65,530 mappings of 4 KiB
/// names (256 MiB) costs at most a quarter second per read, and its mappings past the cap
/// (often its libraries: they sit above its later mappings) are not seen.
const MAX_BYTES: u64 = 16 << 20;

/// What a mapping maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapName {
    /// A file by its path; `deleted` when the kernel marked it ` (deleted)`.
    File { path: PathBuf, deleted: bool },
    /// A named region that is not a file path: `[vdso]`, `[heap]`, `[stack]`.
    Special(String),
    /// No name at all.
    Anonymous,
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub inode: u64,
    pub name: MapName,
}

/// The mappings of process `pid` that `keep` accepts, in the kernel's order (by address): a process's 65,530 mappings with
/// 4 KiB names are looked at one by one, and only those kept take memory.
pub fn read_filtered(pid: u32, keep: impl FnMut(&MapEntry) -> bool) -> io::Result<Mappings> {
    parse_filtered(File::open(format!("/proc/{pid}/maps"))?, keep)
}

/// Parses maps text from `reader`, line by line, each line capped at `MAX_LINE`.
#[cfg(any(test, feature = "fuzzing"))]
pub fn parse_from(reader: impl Read) -> io::Result<Vec<MapEntry>> {
    Ok(parse_filtered(reader, |_| true)?.entries)
}

/// The mappings read of a process.
#[derive(Debug, Default)]
pub struct Mappings {
    pub entries: Vec<MapEntry>,
    /// Reading stopped at `MAX_BYTES` or `MAX_ENTRIES`: mappings past those were not seen.
    pub cut: bool,
}

/// As `parse_from`, keeping the entries `keep` accepts; at most `MAX_ENTRIES` lines and
/// `MAX_BYTES` bytes are read.
pub fn parse_filtered(reader: impl Read, mut keep: impl FnMut(&MapEntry) -> bool) -> io::Result<Mappings> {
    let mut reader = BufReader::new(reader.take(MAX_BYTES));
    let mut entries = Vec::new();
    let mut line = Vec::new();
    for _ in 0..MAX_ENTRIES {
        line.clear();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(Mappings { entries, cut: false });
        }
        if line.last() != Some(&b'\n') {
            if reader.get_ref().limit() == 0 {
                break; // cut by MAX_BYTES: not a whole line
            }
            if n as u64 == MAX_LINE {
                // Over-long: skip the rest of this line.
                line.clear();
                reader.read_until(b'\n', &mut line)?;
                continue;
            }
        }
        if let Some(entry) = std::str::from_utf8(&line).ok().and_then(parse_line)
            && keep(&entry)
        {
            entries.push(entry);
        }
    }
    Ok(Mappings { entries, cut: true })
}

/// `start-end perms offset dev inode [name]`: the name is the rest of the line after the
/// inode and its padding, spaces included.
pub fn parse_line(line: &str) -> Option<MapEntry> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let (f, r) = rest.split_once(' ').unwrap_or((rest, ""));
        rest = r;
        Some(f)
    };
    let (range, perms, offset, _dev, inode) = (field()?, field()?, field()?, field()?, field()?);
    let (start, end) = range.split_once('-')?;
    let name = rest.trim_start_matches(' ');
    let name = if name.is_empty() {
        MapName::Anonymous
    } else if name.starts_with('/') {
        match name.strip_suffix(" (deleted)") {
            Some(path) => MapName::File { path: PathBuf::from(path), deleted: true },
            None => MapName::File { path: PathBuf::from(name), deleted: false },
        }
    } else {
        MapName::Special(name.to_string())
    };
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        name,
    })
}

/// The prefix that reaches process `pid`'s files from our mount namespace: None when it
/// sees the same root as we do, else its /proc/PID/root.
pub fn root_of(pid: u32) -> Option<PathBuf> {
    (!super::process::same_root(pid)).then(|| PathBuf::from(format!("/proc/{pid}/root")))
}

/// `path` as seen by a process whose files `root` reaches (see `root_of`).
pub fn in_root(root: Option<&Path>, path: &Path) -> PathBuf {
    match root {
        Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

/// The mapped file at `path` (under `root`, see `root_of`) as mapped with `inode`: opened
/// without following a final symlink and without blocking (a FIFO or device in its place
/// cannot hang us), and only when it is a regular file with that inode (0: any), so a file
/// swapped in since it was mapped is refused.
pub fn open_mapped(root: Option<&Path>, path: &Path, inode: u64) -> io::Result<File> {
    let full = in_root(root, path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(full)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if inode != 0 && meta.ino() != inode {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not the file that was mapped"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_deleted_files_and_regions() {
        let text = "\
55d0c1a01000-55d0c1a02000 r-xp 00001000 fd:01 1234                       /opt/my app/python3 x
7f00ac000000-7f00ac001000 r-xp 00000000 00:01 77                         /memfd:jit (deleted)
7f00ab000000-7f00ab001000 r-xp 00000000 00:00 0                          [vdso]
7f00ab002000-7f00ab003000 rw-p 00000000 00:00 0 \n";
        let maps = parse_from(text.as_bytes()).unwrap();
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].name, MapName::File { path: "/opt/my app/python3 x".into(), deleted: false });
        assert_eq!(
            (maps[0].start, maps[0].end, maps[0].offset, maps[0].inode),
            (0x55d0c1a01000, 0x55d0c1a02000, 0x1000, 1234)
        );
        assert!(maps[0].executable && !maps[3].executable);
        assert_eq!(maps[1].name, MapName::File { path: "/memfd:jit".into(), deleted: true });
        assert_eq!(maps[2].name, MapName::Special("[vdso]".into()));
        assert_eq!(maps[3].name, MapName::Anonymous);
    }

    #[test]
    fn skips_over_long_lines_and_garbage() {
        let long = format!("7f00ab000000-7f00ab001000 r-xp 00000000 00:00 0 /{}\n", "a".repeat(10_000));
        let text = format!("{long}not a maps line\n7f00ab000000-7f00ab001000 r-xp 00000000 00:00 5 /ok\n");
        let maps = parse_from(text.as_bytes()).unwrap();
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].inode, 5);
    }

    #[test]
    fn reading_stops_at_the_byte_cap_on_a_whole_line() {
        let path = format!("/{}", "p".repeat(4000));
        let line = |i: u64| format!("{:x}-{:x} r-xp 00000000 fd:01 {i} {path}\n", i << 12, (i + 1) << 12);
        let (mut text, mut whole) = (String::new(), 0);
        for i in 1.. {
            text.push_str(&line(i));
            if text.len() as u64 <= MAX_BYTES {
                whole = i;
            } else if text.len() as u64 > MAX_BYTES + 10_000 {
                break;
            }
        }
        let maps = parse_from(text.as_bytes()).unwrap();
        assert_eq!(maps.len() as u64, whole, "every whole line under the cap, no cut one");
        assert!(maps.iter().all(|m| m.name == MapName::File { path: path.clone().into(), deleted: false }));
        let kept = parse_filtered(text.as_bytes(), |m| m.inode % 2 == 0).unwrap();
        assert_eq!(kept.entries.len() as u64, whole / 2);
        assert!(kept.cut);
        assert!(!parse_filtered(line(1).as_bytes(), |_| true).unwrap().cut);
    }

    #[test]
    fn refuses_fifos_and_swapped_files() {
        let dir = std::env::temp_dir().join(format!("stoker-maps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("python3");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_mapped(None, &fifo, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        let file = dir.join("lib.so");
        std::fs::write(&file, b"x").unwrap();
        let inode = std::fs::metadata(&file).unwrap().ino();
        assert!(open_mapped(None, &file, inode).is_ok());
        assert!(open_mapped(None, &file, inode + 1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
