//! A target's ELF files, read without mapping them (a file truncated under a mapping kills
//! the reader with SIGBUS) and within sizes we accept: function symbols for native frames.
use std::{fs::File, sync::Arc};

use object::{
    Endianness, ReadCache,
    elf::{self, FileHeader64},
    read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym},
};

/// Largest symbol or string table read: libpython's `.symtab` and `.strtab` are 1 to 2 MiB
/// each, a large C++ extension's tens of MiB.
pub const MAX_TABLE: u64 = 64 << 20;
/// Most function symbols kept of one file.
const MAX_SYMBOLS: usize = 1 << 20;

type Data = ReadCache<File>;

/// Whether the file's section table is one `object` may read without our trusting its
/// sizes: every section's data inside the file, and no symbol or string table over
/// `MAX_TABLE`. (The reader checks the file's bounds too; this bounds what it allocates.)
pub fn sane(data: &Data) -> bool {
    let Ok(header) = FileHeader64::<Endianness>::parse(data) else { return false };
    let Ok(endian) = header.endian() else { return false };
    let Ok(sections) = header.section_headers(endian, data) else { return false };
    let Ok(len) = object::ReadRef::len(data) else { return false };
    sections.iter().all(|s| match s.file_range(endian) {
        None => true, // SHT_NOBITS: no data in the file
        Some((offset, size)) => {
            let table = matches!(s.sh_type(endian), elf::SHT_SYMTAB | elf::SHT_DYNSYM | elf::SHT_STRTAB);
            offset.checked_add(size).is_some_and(|end| end <= len) && (!table || size <= MAX_TABLE)
        }
    })
}

/// One function symbol.
#[derive(Debug, Clone)]
struct Function {
    addr: u64,
    size: u64,
    name: Arc<str>,
}

/// The function symbols of one ELF file (`.symtab`, else `.dynsym`; no DWARF) and where
/// its loadable segments lie in the file.
#[derive(Debug, Default)]
pub struct FunctionSymbols {
    functions: Vec<Function>,
    /// (file offset, size in the file, address) of each `PT_LOAD` segment.
    segments: Vec<(u64, u64, u64)>,
}

impl FunctionSymbols {
    /// Reads `file`'s symbols; None when it is no 64-bit ELF file or its tables are
    /// larger than we read.
    pub fn read(file: File) -> Option<Self> {
        let data = ReadCache::new(file);
        if !sane(&data) {
            return None;
        }
        let header = FileHeader64::<Endianness>::parse(&data).ok()?;
        let endian = header.endian().ok()?;
        let segments = header
            .program_headers(endian, &data)
            .ok()?
            .iter()
            .filter(|p| p.p_type(endian) == elf::PT_LOAD)
            .map(|p| (p.p_offset(endian), p.p_filesz(endian), p.p_vaddr(endian)))
            .collect();
        let sections = header.sections(endian, &data).ok()?;
        let mut table = sections.symbols(endian, &data, elf::SHT_SYMTAB).ok()?;
        if table.is_empty() {
            table = sections.symbols(endian, &data, elf::SHT_DYNSYM).ok()?;
        }
        let strings = table.strings();
        let mut functions: Vec<Function> = table
            .iter()
            .filter(|s| matches!(s.st_type(), elf::STT_FUNC | elf::STT_GNU_IFUNC))
            .filter(|s| !s.is_undefined(endian) && s.st_value(endian) != 0)
            .take(MAX_SYMBOLS)
            .filter_map(|s| {
                let name = s.name(endian, strings).ok()?;
                Some(Function {
                    addr: s.st_value(endian),
                    size: s.st_size(endian),
                    name: demangle(name).into(),
                })
            })
            .collect();
        // Aliases share an address: keep the first (a global name before a local one).
        functions.sort_by_key(|f| f.addr);
        functions.dedup_by_key(|f| f.addr);
        Some(Self { functions, segments })
    }

    /// The function at `file_offset` of the file (as a mapping of it gives), if a symbol
    /// covers it.
    pub fn name_at(&self, file_offset: u64) -> Option<Arc<str>> {
        let &(offset, _, vaddr) =
            self.segments.iter().find(|&&(off, size, _)| off <= file_offset && file_offset < off + size)?;
        let addr = vaddr + (file_offset - offset);
        let i = self.functions.partition_point(|f| f.addr <= addr).checked_sub(1)?;
        let f = &self.functions[i];
        // An address past the end of the nearest symbol (PLT stubs after `_init`, for one)
        // is not in that function; a symbol of unknown size is taken as reaching the next.
        (f.size == 0 || addr - f.addr < f.size).then(|| f.name.clone())
    }

    /// Bytes held, roughly: what a cache of these counts.
    pub fn bytes(&self) -> usize {
        self.functions.iter().map(|f| size_of::<Function>() + f.name.len()).sum::<usize>()
            + self.segments.len() * 24
    }
}

/// A Rust or C++ symbol's readable name; any other as it is.
fn demangle(name: &[u8]) -> String {
    let raw = String::from_utf8_lossy(name);
    if let Ok(rust) = rustc_demangle::try_demangle(&raw) {
        return format!("{rust:#}");
    }
    if raw.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(raw.as_bytes())
        && let Ok(cpp) = sym.demangle()
    {
        return cpp;
    }
    raw.into_owned()
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    fn libc() -> std::path::PathBuf {
        ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .expect("libc")
    }

    #[test]
    fn names_functions_by_file_offset() {
        let syms = FunctionSymbols::read(File::open(libc()).unwrap()).unwrap();
        // getpid's own address maps back to getpid through the segments.
        let f = syms.functions.iter().find(|f| &*f.name == "getpid" || &*f.name == "__getpid").unwrap();
        let &(offset, _, vaddr) =
            syms.segments.iter().find(|&&(_, size, va)| va <= f.addr && f.addr < va + size).unwrap();
        let name = syms.name_at(f.addr - vaddr + offset).unwrap();
        assert!(name.contains("getpid"), "{name}");
        assert!(syms.bytes() > 0);
    }

    #[test]
    fn refuses_absurd_section_sizes_and_truncated_files() {
        let dir = std::env::temp_dir().join(format!("stoker-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = std::fs::read(libc()).unwrap();
        // Every section header's sh_size (at 32 in each 64-byte header) set to 2^40.
        let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap());
        let shnum = u16::from_le_bytes(bytes[0x3c..0x3e].try_into().unwrap());
        let absurd = dir.join("absurd.so");
        let mut f = File::create(&absurd).unwrap();
        f.write_all(&bytes).unwrap();
        for i in 1..u64::from(shnum) {
            f.seek(SeekFrom::Start(shoff + i * 64 + 32)).unwrap();
            f.write_all(&(1u64 << 40).to_le_bytes()).unwrap();
        }
        drop(f);
        assert!(FunctionSymbols::read(File::open(&absurd).unwrap()).is_none());
        // Cut in the middle: the section table is past the end.
        let cut = dir.join("cut.so");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(FunctionSymbols::read(File::open(&cut).unwrap()).is_none());
        std::fs::write(&cut, b"\x7fELF").unwrap();
        assert!(FunctionSymbols::read(File::open(&cut).unwrap()).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn demangles_rust_and_cpp() {
        assert_eq!(demangle(b"_ZN4core3fmt5write17h0123456789abcdefE"), "core::fmt::write");
        assert_eq!(demangle(b"_ZN3foo3barEv"), "foo::bar()");
        assert_eq!(demangle(b"PyEval_EvalCode"), "PyEval_EvalCode");
    }
}
