//! Reads struct member offsets from the kernel's BTF (/sys/kernel/btf/vmlinux), enough to
//! find `task_struct.thread.fsbase` for the Python walker. A small reader: aya keeps its
//! BTF type accessors private, and the offsets needed are two member look-ups.
use std::{collections::HashMap, fs, io};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// Members of the named structs and unions of a BTF blob: (type name) -> [(member name,
/// bit offset)]. Only the types asked for are kept: the kernel's BTF describes tens of
/// thousands of types.
pub struct Btf {
    structs: HashMap<String, Vec<(String, u32)>>,
}

impl Btf {
    /// The kernel's own BTF, keeping the structs named in `wanted`.
    pub fn from_sys_fs(wanted: &[&str]) -> io::Result<Self> {
        Self::parse(&fs::read("/sys/kernel/btf/vmlinux")?, wanted)
    }

    pub fn parse(data: &[u8], wanted: &[&str]) -> io::Result<Self> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("BTF: {what}"));
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(BTF_MAGIC) {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(4).ok_or_else(|| bad("short header"))? as usize;
        let field = |i: usize| u32_at(8 + 4 * i).map(|v| v as usize).ok_or_else(|| bad("short header"));
        let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let types = hdr_len + type_off;
        let strings =
            data.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or_else(|| bad("strings"))?;
        let name = |off: u32| -> String {
            let s = strings.get(off as usize..).unwrap_or(&[]);
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };

        let mut structs = HashMap::new();
        let mut pos = types;
        while pos + 12 <= types + type_len {
            let name_off = u32_at(pos).ok_or_else(|| bad("type"))?;
            let info = u32_at(pos + 4).ok_or_else(|| bad("type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31;
            pos += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 19 | 15 => vlen * 12, // STRUCT, UNION, ENUM64, DATASEC
                6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
                _ => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            };
            if (kind == KIND_STRUCT || kind == KIND_UNION)
                && name_off != 0
                && wanted.contains(&name(name_off).as_str())
            {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let base = pos + 12 * m;
                    let m_name = u32_at(base).ok_or_else(|| bad("member"))?;
                    let m_off = u32_at(base + 8).ok_or_else(|| bad("member"))?;
                    // With kind_flag set the offset word holds a bitfield size in its top byte.
                    let bits = if kind_flag == 1 { m_off & 0x00ff_ffff } else { m_off };
                    members.push((name(m_name), bits));
                }
                structs.entry(name(name_off)).or_insert(members);
            }
            pos += extra;
        }
        Ok(Self { structs })
    }

    /// Byte offset of `member` in struct `ty` (a direct member).
    pub fn member_offset(&self, ty: &str, member: &str) -> Option<u32> {
        let members = self.structs.get(ty)?;
        members.iter().find(|(n, _)| n == member).map(|(_, bits)| bits / 8)
    }
}

/// The structs `fsbase_offset` needs.
pub const FSBASE_STRUCTS: &[&str] = &["task_struct", "thread_struct"];

/// Offset of `thread.fsbase` in `task_struct`: where the kernel keeps a task's fs base
/// (x86-64), which is `pthread_self()` of a user thread.
pub fn fsbase_offset(btf: &Btf) -> Option<u32> {
    Some(btf.member_offset("task_struct", "thread")? + btf.member_offset("thread_struct", "fsbase")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_fsbase_in_this_kernel() {
        let btf = Btf::from_sys_fs(&["task_struct", "thread_struct", "list_head"])
            .expect("this kernel exposes BTF");
        let thread = btf.member_offset("task_struct", "thread").expect("task_struct.thread");
        let off = fsbase_offset(&btf).expect("thread_struct.fsbase");
        assert!(off > thread && off < thread + 256, "fsbase at {off}, thread at {thread}");
        assert_eq!(btf.member_offset("list_head", "next"), Some(0));
        assert_eq!(btf.member_offset("list_head", "prev"), Some(8));
    }
}
