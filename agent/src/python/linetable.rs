//! Decoding of CPython line tables (`co_lnotab` / `co_linetable`, 3.8-3.14): maps an instruction's
//! byte offset to the source line CPython's own `PyCode_Addr2Line` reports for it.

// 3.14: the location table format is unchanged from 3.11-3.13 (same entry header, codes 0-15,
// 6-bit varints; `Objects/locations.md` still describes it and `codeobject.c`'s reader is the same),
// so `Locations` covers it. Caveat for 3.12+: while a code object has LINE monitoring active
// (`sys.settrace`, `sys.monitoring`), `PyCode_Addr2Line` answers from the instrumentation data
// instead; that data is derived from this same table.

/// Which encoding a code object's line table uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineTableFormat {
    /// 3.8-3.9: `co_lnotab`, (byte increment, signed line increment) pairs.
    Lnotab,
    /// 3.10: `co_linetable`, (byte delta, signed line delta; -128 = no line) pairs.
    Linetable310,
    /// 3.11+: the location table (varint-encoded entries measured in code units).
    Locations,
}

/// The line table format of CPython 3.`minor` (3.8 and later).
pub fn format_for(minor: u8) -> LineTableFormat {
    match minor {
        0..=9 => LineTableFormat::Lnotab,
        10 => LineTableFormat::Linetable310,
        _ => LineTableFormat::Locations,
    }
}

/// Line of the instruction at `byte_offset` (a byte offset into the bytecode, i.e. code units * 2),
/// given the code object's `co_firstlineno` and raw line table bytes. None when the table says
/// the instruction has no line or the offset is past the table.
///
/// `Lnotab` has no end marker and no "no line" value: as in CPython, offsets after its last entry
/// (including offsets past the end of the bytecode) get the last line, and an empty table means
/// every instruction is on `first_line`. Work is linear in `table.len()`; nothing is allocated.
pub fn line_for(format: LineTableFormat, table: &[u8], first_line: u32, byte_offset: u32) -> Option<u32> {
    let line = match format {
        LineTableFormat::Lnotab => lnotab_line(table, first_line, byte_offset),
        LineTableFormat::Linetable310 => linetable310_line(table, first_line, byte_offset)?,
        LineTableFormat::Locations => locations_line(table, first_line, byte_offset)?,
    };
    // Only a malformed table can drive the line below zero or past u32.
    u32::try_from(line).ok()
}

/// 3.8/3.9 `PyCode_Addr2Line`: add up the line increments of every pair whose cumulative byte
/// offset is <= the target; a trailing odd byte is ignored.
fn lnotab_line(table: &[u8], first_line: u32, byte_offset: u32) -> i64 {
    let mut line = i64::from(first_line);
    let mut addr: u64 = 0;
    for pair in table.chunks_exact(2) {
        addr += u64::from(pair[0]);
        if addr > u64::from(byte_offset) {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    line
}

/// 3.10 `_PyCode_CheckLineNumber`: each pair covers `[end, end + byte delta)`; a line delta of
/// -128 marks "no line" without moving the running line. Zero-length pairs only move the line.
fn linetable310_line(table: &[u8], first_line: u32, byte_offset: u32) -> Option<i64> {
    let target = u64::from(byte_offset);
    let mut line = i64::from(first_line);
    let mut end: u64 = 0;
    for pair in table.chunks_exact(2) {
        end += u64::from(pair[0]);
        let delta = pair[1] as i8;
        if delta != -128 {
            line += i64::from(delta);
        }
        // Earlier pairs all ended at or before `target`, so this one starts at or before it.
        if target < end {
            return (delta != -128).then_some(line);
        }
    }
    None
}

/// Location entry codes (bits 3-6 of an entry's first byte), from `_PyCodeLocationInfoKind`.
const CODE_ONE_LINE1: u8 = 11;
const CODE_ONE_LINE2: u8 = 12;
const CODE_NO_COLUMNS: u8 = 13;
const CODE_LONG: u8 = 14;

/// 3.11+ `_PyCode_CheckLineNumber`: an entry starts with a byte with bit 7 set (bits 3-6 the code,
/// bits 0-2 the length in code units minus one) and runs to the next such byte. The running line
/// moves by each entry's start-line delta; code 15 ("no location") has no line and no delta.
fn locations_line(table: &[u8], first_line: u32, byte_offset: u32) -> Option<i64> {
    let target = u64::from(byte_offset);
    let mut line = i64::from(first_line);
    let mut end: u64 = 0;
    let mut pos = 0;
    while let Some(&head) = table.get(pos) {
        let code = (head >> 3) & 15;
        line += match code {
            CODE_NO_COLUMNS | CODE_LONG => read_svarint(table, pos + 1)?,
            CODE_ONE_LINE1 => 1,
            CODE_ONE_LINE2 => 2,
            // Short forms (0-9), one-line form 0 (10) and "no location" (15) keep the line.
            _ => 0,
        };
        end += (u64::from(head & 7) + 1) * 2;
        pos += 1;
        while table.get(pos).is_some_and(|b| b & 0x80 == 0) {
            pos += 1;
        }
        if target < end {
            // CPython's no-line test also requires bit 7 (it checks `head >> 3 == 0x1f`).
            return (head >> 3 != 0x1f).then_some(line);
        }
    }
    None
}

/// Unsigned varint at `pos`: 6-bit chunks, least significant first, bit 6 = more follow.
/// None if truncated or longer than a 32-bit value can hold (CPython would read on regardless).
fn read_varint(table: &[u8], mut pos: usize) -> Option<u32> {
    let mut value: u32 = 0;
    let mut shift: u32 = 0;
    loop {
        let byte = *table.get(pos)?;
        value |= u32::from(byte & 63).checked_shl(shift)?;
        if byte & 64 == 0 {
            return Some(value);
        }
        pos += 1;
        shift += 6;
    }
}

/// Signed varint: the low bit of the unsigned value is the sign, the rest the magnitude.
fn read_svarint(table: &[u8], pos: usize) -> Option<i64> {
    let raw = read_varint(table, pos)?;
    let magnitude = i64::from(raw >> 1);
    Some(if raw & 1 == 1 { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Compiles a fixture (plus the named stdlib modules), walks every code object and prints
    /// per code object its raw table, `co_firstlineno`, bytecode size and, for every 2-byte offset
    /// up to and including the end of the bytecode, `PyCode_Addr2Line` via ctypes (null for -1).
    /// It cross-checks that against `co_lines()` (3.10+) and `co_positions()` (3.11+).
    const ORACLE: &str = r##"
import ctypes, json, os, sys
A = ctypes.pythonapi.PyCode_Addr2Line
A.argtypes, A.restype = [ctypes.py_object, ctypes.c_int], ctypes.c_int
V = sys.version_info[:2]
FIX = '''import os, sys
def deco(*a, **k):
    return lambda f: f

@deco(1,
      2)
@deco()
def multi(a,
          b=(1 +
             2),
          *c, **d):
    x = (a
         + b
         * 3)
    f = lambda y: (y +
                   1)
    g = [i * x
         for i in range(b)
         if i % 2]
    h = {k: v for k, v in zip(g, g)}
    gen = (q for q in g if q)
    return [x, f, g, h, {z for z in g}, gen]

def trier(n):
    total = 0
    for i in range(n):
        try:
            if i % 3 == 0:
                raise ValueError(i)
            elif i % 3 == 1:
                continue
            total += i
        except ValueError as e:
            total -= 1
        except (TypeError,
                KeyError):
            pass
        else:
            total *= 2
        finally:
            total += 0
    while total > 100:
        total //= 2
        if total == 7:
            break
    else:
        total = -1
    with open(os.devnull) as fh, \\
         open(os.devnull) as gh:
        fh.read()
    return total

def outer():
    v = 1
    def inner(w):
        nonlocal v
        def innermost():
            return v + w
        return innermost
    return inner

class Klass(object):
    attr = [n for n in range(3)]

    def method(self):
        return super().__init__()

    @property
    def prop(self):
        return (self
                .method())

    @staticmethod
    async def coro(x):
        async with x as y:
            async for z in y:
                await z
        return [w async for w in x]

def gen_func():
    yield 1
    yield from range(3)
    x = yield
    return x
'''
B = ["def big(x):", "    acc = 0", "    for i in range(x):"]
B += ["        acc += i * %d" % k for k in range(150)] + [""] * 140 + ["        acc -= 1"]
B += [""] * 300 + ["        acc ^= 2", "    y = [" + ", ".join("x + %d" % k for k in range(120)) + "]"]
B += ["    z = (x +"] + ["         %d +" % k for k in range(200)] + ["         0)"]
B += ["    try:"] + ["        acc += %d" % k for k in range(130)] + ["    finally:", "        acc = -acc"]
B += ["    return acc, y, z", "", "", ""]
if V >= (3, 10):
    B += ["def matcher(p):", "    match p:", "        case [a, *rest] if a:", "            return rest",
          "        case {'k': v}:", "            return v", "        case _:", "            return None"]
SRC = [("fixture", FIX + "\n" * 400 + "\n".join(B) + "\nX = [big, 1]\n")]
for m in sys.argv[1:]:
    with open(os.path.join(os.path.dirname(os.__file__), m + ".py")) as fh:
        SRC.append((m, fh.read()))
def walk(co):
    yield co
    for c in co.co_consts:
        if isinstance(c, type(co)):
            yield from walk(c)
print(json.dumps({"minor": V[1]}))
for fname, src in SRC:
    for co in walk(compile(src, fname, "exec")):
        n = len(co.co_code)
        got = [A(co, o) for o in range(0, n + 2, 2)]
        got = [None if g < 0 else g for g in got]
        xs = []
        if V >= (3, 10):
            cl = ["?"] * (n // 2)
            for s, e, l in co.co_lines():
                for o in range(s, e, 2):
                    cl[o // 2] = l
            xs.append(("co_lines", cl))
        if V >= (3, 11):
            xs.append(("co_positions", [p[0] for p in co.co_positions()]))
        name = "%s:%s:%d" % (fname, co.co_name, co.co_firstlineno)
        for what, arr in xs:
            if arr != got[:-1]:
                sys.exit("%s disagrees with PyCode_Addr2Line in %s" % (what, name))
        tab = co.co_lnotab if V < (3, 10) else co.co_linetable
        print(json.dumps({"name": name, "table": tab.hex(), "first": co.co_firstlineno, "nbytes": n,
                          "lines": got}))
"##;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Runs the oracle under `python` and checks `line_for` against it at every offset.
    fn check_interpreter(python: &str, minor: u8) {
        assert!(std::path::Path::new(python).is_file(), "interpreter {python} is missing");
        let out = Command::new(python)
            .args(["-c", ORACLE, "argparse", "inspect", "typing"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{python} oracle failed: {stderr}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut rows = stdout.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        let header = rows.next().expect("oracle printed nothing");
        assert_eq!(header["minor"].as_u64(), Some(u64::from(minor)), "{python} is not 3.{minor}");
        let format = format_for(minor);
        let (mut code_objects, mut offsets) = (0, 0);
        for row in rows {
            let name = row["name"].as_str().unwrap();
            let table = unhex(row["table"].as_str().unwrap());
            let first = u32::try_from(row["first"].as_u64().unwrap()).unwrap();
            let nbytes = row["nbytes"].as_u64().unwrap();
            let lines = row["lines"].as_array().unwrap();
            assert_eq!(lines.len() as u64, nbytes / 2 + 1, "{python} {name}: bad oracle row");
            for (i, want) in lines.iter().enumerate() {
                let offset = u32::try_from(i * 2).unwrap();
                let want = want.as_u64().map(|l| u32::try_from(l).unwrap());
                let got = line_for(format, &table, first, offset);
                assert_eq!(
                    got, want,
                    "3.{minor} ({python}) code object {name}: offset {offset}: expected {want:?}, got {got:?}"
                );
                offsets += 1;
            }
            code_objects += 1;
        }
        assert!(code_objects > 100, "{python}: only {code_objects} code objects");
        println!("{python}: {code_objects} code objects, {offsets} offsets checked");
    }

    #[test]
    fn matches_cpython_3_8() {
        check_interpreter("/root/.pyenv/versions/3.8.18/bin/python3.8", 8);
    }

    #[test]
    fn matches_cpython_3_9() {
        check_interpreter("/root/.pyenv/versions/3.9.18/bin/python3.9", 9);
    }

    #[test]
    fn matches_cpython_3_10() {
        check_interpreter("/root/.pyenv/versions/3.10.13/bin/python3.10", 10);
    }

    #[test]
    fn matches_cpython_3_11() {
        check_interpreter("/root/.pyenv/versions/3.11.7/bin/python3.11", 11);
    }

    #[test]
    fn matches_debian_cpython_3_11() {
        check_interpreter("/usr/bin/python3.11", 11);
    }

    #[test]
    fn matches_cpython_3_12() {
        check_interpreter("/root/.pyenv/versions/3.12.1/bin/python3.12", 12);
    }

    #[test]
    fn matches_cpython_3_13() {
        check_interpreter("/root/.pyenv/versions/3.13.0/bin/python3.13", 13);
    }

    /// Debian unstable's builds, as `cargo xtask setup` unpacks them.
    #[test]
    fn matches_debian_unstable_cpython_3_13_to_3_15() {
        for minor in 13..=15 {
            check_interpreter(&format!("/opt/stoker-pythons/3.{minor}/usr/bin/python3.{minor}"), minor);
        }
    }

    #[test]
    fn format_per_version() {
        assert_eq!(format_for(8), LineTableFormat::Lnotab);
        assert_eq!(format_for(9), LineTableFormat::Lnotab);
        assert_eq!(format_for(10), LineTableFormat::Linetable310);
        for minor in 11..=15 {
            assert_eq!(format_for(minor), LineTableFormat::Locations);
        }
    }

    #[test]
    fn empty_tables() {
        // An empty lnotab is valid: everything is on co_firstlineno.
        assert_eq!(line_for(LineTableFormat::Lnotab, &[], 7, 0), Some(7));
        assert_eq!(line_for(LineTableFormat::Linetable310, &[], 7, 0), None);
        assert_eq!(line_for(LineTableFormat::Locations, &[], 7, 0), None);
    }

    #[test]
    fn past_the_table() {
        // 3.10: 4 bytes on line 8, then 2 bytes with no line.
        let t310 = [4, 1, 2, 0x80];
        assert_eq!(line_for(LineTableFormat::Linetable310, &t310, 7, 2), Some(8));
        assert_eq!(line_for(LineTableFormat::Linetable310, &t310, 7, 4), None);
        assert_eq!(line_for(LineTableFormat::Linetable310, &t310, 7, 6), None);
        assert_eq!(line_for(LineTableFormat::Linetable310, &t310, 7, u32::MAX), None);
        // 3.11+: no-columns entry of 2 units on line 8, then a one-line-form entry of 1 unit.
        let t311 = [0x80 | 13 << 3 | 1, 2, 0x80 | 11 << 3, 0, 5];
        assert_eq!(line_for(LineTableFormat::Locations, &t311, 7, 3), Some(8));
        assert_eq!(line_for(LineTableFormat::Locations, &t311, 7, 4), Some(9));
        assert_eq!(line_for(LineTableFormat::Locations, &t311, 7, 6), None);
        assert_eq!(line_for(LineTableFormat::Locations, &t311, 7, u32::MAX), None);
        // Lnotab keeps the last line, as CPython does.
        assert_eq!(line_for(LineTableFormat::Lnotab, &[2, 3], 7, u32::MAX), Some(10));
    }

    #[test]
    fn truncated_and_malformed() {
        let loc = LineTableFormat::Locations;
        // Varint with its continuation bit set but no next byte (no-columns and long forms).
        assert_eq!(line_for(loc, &[0x80 | 13 << 3, 0x41], 1, 0), None);
        assert_eq!(line_for(loc, &[0x80 | 14 << 3], 1, 0), None);
        // Long form truncated after the line delta still has its line.
        assert_eq!(line_for(loc, &[0x80 | 14 << 3, 4], 1, 0), Some(3));
        // Overlong varint (more than 32 bits) is rejected rather than overflowing.
        assert_eq!(line_for(loc, &[0x80 | 13 << 3, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 1], 1, 0), None);
        // Line driven below zero.
        assert_eq!(line_for(loc, &[0x80 | 13 << 3, 0x7f, 0x7f, 0x01], 1, 0), None);
        assert_eq!(line_for(LineTableFormat::Lnotab, &[0, 0x80, 0, 0x80], 5, 0), None);
        // Odd trailing bytes are ignored by the pair formats.
        assert_eq!(line_for(LineTableFormat::Linetable310, &[2, 1, 9], 1, 2), None);
        assert_eq!(line_for(LineTableFormat::Lnotab, &[2, 1, 9], 1, 4), Some(2));
    }

    #[test]
    fn garbage_never_panics() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = [0u8; 300];
        for round in 0..3000 {
            let len = round % buf.len();
            for b in buf.iter_mut().take(len) {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *b = (state >> 56) as u8;
            }
            for format in [LineTableFormat::Lnotab, LineTableFormat::Linetable310, LineTableFormat::Locations]
            {
                for offset in [0, 1, 2, 17, 600, 5000, u32::MAX] {
                    let _ = line_for(format, &buf[..len], u32::MAX, offset);
                    let _ = line_for(format, &buf[..len], 0, offset);
                }
            }
        }
        // Every byte a no-columns header (0xe8) whose bit 6 also reads as "varint continues".
        let all = [0xe8; 4096];
        let _ = line_for(LineTableFormat::Locations, &all, 1, u32::MAX);
    }
}
