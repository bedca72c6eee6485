//! Kernel side of the network programs: their offsets, TCP sockets and peers, the per-CPU
//! event rings, the HTTP/1.x recognizer that keeps only method, path (up to `?`) and status.
use agent_ebpf::{
    NAGLE_GAP_MAX_NS, NAGLE_GAP_MIN_NS, NET_EVENT_ACCEPT, NET_FRAMING_CHUNKED, NET_FRAMING_HEAD,
    NET_FRAMING_LENGTH, NET_FRAMING_NONE, NET_HEAD_BUF, NET_HEAD_LEN, NET_HEAD_MAX, NET_PATH_LEN,
    NET_PEEK_LEN, NET_RING_BUSY, NET_RING_HEAD, NET_RING_SLOTS, NET_RING_TAIL, NET_ROLE_CLIENT,
    NET_ROLE_SERVER, NetConn, NetEvent, NetOffsets, NetSkState, http_method, stall_cause, stat,
};
use aya_ebpf::{
    helpers::generated::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::maps::{
    NET_EVENTS, NET_HEAD, NET_HEAD_SCAN, NET_SK_STATE, bump, ready_slot, sk_mark_stall, sk_maybe_stalled,
    sk_maybe_tracked,
};

/// Offsets set by the loader (see `NetOffsets`).
#[unsafe(no_mangle)]
pub static NET_OFFSETS: NetOffsets = NetOffsets::CURRENT_KERNELS;

/// Set by the loader (`agent_ebpf::GLOBAL_NET_WORK`): what the network programs do.
#[unsafe(no_mangle)]
static NET_WORK: u32 = agent_ebpf::NET_WORK_FULL;

/// Whether the network programs do their work (else each returns as it starts). The
/// verifier knows the value (read-only data) and drops the branch not taken.
#[inline(always)]
pub fn working() -> bool {
    crate::programs::loader_global(&NET_WORK) != agent_ebpf::NET_WORK_EMPTY
}

/// Whether socket queues and stalls are timed too (not requests and connections alone).
#[inline(always)]
pub fn full_detail() -> bool {
    crate::programs::loader_global(&NET_WORK) == agent_ebpf::NET_WORK_FULL
}

/// Reads one offset of `NET_OFFSETS` (see `loader_global`).
macro_rules! offset {
    ($field:ident) => {
        crate::programs::loader_global(&crate::programs::net::NET_OFFSETS.$field) as usize
    };
}
pub(crate) use offset;

/// A connection's remote end, as `NetConn` and `NetEvent` store it. Aligned to 8 so its
/// address can be copied a word at a time (`copy_words`).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Peer {
    /// IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`; 0 when unknown.
    pub family: u16,
    pub _pad: u32,
}

impl Peer {
    /// A peer whose address is not known.
    pub const UNKNOWN: Self = Self { addr: [0; 16], port: 0, family: 0, _pad: 0 };
}

/// A TCP socket of a target process, from SYN sent until it leaves ESTABLISHED.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NetSock {
    pub tgid: u32,
    pub retransmits: u32,
    pub syn_ns: u64,
    pub est_ns: u64,
    pub peer: Peer,
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Reads a user sockaddr: an IPv4 or IPv6 peer, None for other families.
#[inline(always)]
pub fn read_sockaddr(ptr: u64) -> Option<Peer> {
    if ptr == 0 {
        return None;
    }
    let mut head = [0u8; 8];
    // SAFETY: the helper writes at most 8 bytes into `head`, which has 8; it checks the user
    // address itself and fails rather than faulting.
    if unsafe { bpf_probe_read_user(head.as_mut_ptr().cast(), 8, ptr as *const _) } != 0 {
        return None;
    }
    let family = u16::from_le_bytes([head[0], head[1]]);
    let port = u16::from_be_bytes([head[2], head[3]]);
    let mut peer = Peer { family, port, ..Peer::UNKNOWN };
    match family {
        AF_INET => peer.addr[..4].copy_from_slice(&head[4..8]),
        AF_INET6 => {
            // SAFETY: as above, 16 bytes into the 16 of `peer.addr`.
            if unsafe { bpf_probe_read_user(peer.addr.as_mut_ptr().cast(), 16, (ptr + 8) as *const _) } != 0 {
                return None;
            }
        }
        _ => return None,
    }
    Some(peer)
}

/// Copies `N` bytes (a multiple of 8) a word at a time: on this target a plain array copy or
/// fill is a byte loop in a called subprogram. Volatile, so the compiler cannot turn the
/// words back into such a call.
///
/// # Safety
///
/// `dst` and `src` are 8-byte aligned: the `addr` and `path` fields of `NetConn` and
/// `NetEvent` (their offsets are asserted multiples of 8 in structs aligned to 8) and
/// `Peer::addr` are.
#[inline(always)]
pub unsafe fn copy_words<const N: usize>(dst: &mut [u8; N], src: &[u8; N]) {
    let (d, s) = (dst.as_mut_ptr().cast::<u64>(), src.as_ptr().cast::<u64>());
    for i in 0..N / 8 {
        // SAFETY: word `i` lies inside both arrays (`i < N / 8`), and both are 8-byte aligned
        // (the caller's promise); any bits are a valid `u64`.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
}

/// Zeroes `N` bytes (a multiple of 8) a word at a time (see `copy_words`).
///
/// # Safety
///
/// `dst` is 8-byte aligned (see `copy_words`).
#[inline(always)]
pub unsafe fn zero_words<const N: usize>(dst: &mut [u8; N]) {
    let d = dst.as_mut_ptr().cast::<u64>();
    for i in 0..N / 8 {
        // SAFETY: word `i` lies inside the array (`i < N / 8`), which is 8-byte aligned (the
        // caller's promise).
        unsafe { core::ptr::write_volatile(d.add(i), 0) };
    }
}

/// Stores `value` in `*dst` as a store of its own. LLVM merges plain stores of zeros into
/// neighbouring fields into a call of `memset`, which for BPF is a loop storing a byte at a
/// time (aya-ebpf's): 16 bytes cost some 80 instructions instead of 2. A volatile store is
/// never merged.
#[inline(always)]
pub fn put<T: Copy>(dst: &mut T, value: T) {
    // SAFETY: a reference is valid and aligned for a write of its type.
    unsafe { core::ptr::write_volatile(dst, value) }
}

/// Zeroes `words` in place a word at a time and returns where it starts. `[0; N]` would be
/// a call of the byte loop (see `put`), and so would a copy of the array: it is used in
/// place, through the pointer.
#[inline(always)]
pub fn zeroed<const N: usize>(words: &mut core::mem::MaybeUninit<[u64; N]>) -> *mut u64 {
    let w = words.as_mut_ptr().cast::<u64>();
    for i in 0..N {
        // SAFETY: word `i` lies inside the array (`i < N`), aligned for a u64.
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
    }
    w
}

/// Reads a kernel value at `base + off`, 0 when the offset is unknown or unreadable.
#[inline(always)]
pub fn kernel_u64(base: u64, off: usize) -> u64 {
    if off == 0 {
        return 0;
    }
    let mut v = 0u64;
    // SAFETY: the helper writes at most 8 bytes into `v`, a u64; it checks the kernel address
    // itself and fails rather than faulting.
    let ret =
        unsafe { bpf_probe_read_kernel((&mut v as *mut u64).cast(), 8, (base + off as u64) as *const _) };
    if ret == 0 { v } else { 0 }
}

/// Recognizes an HTTP/1.x request line in the `len` bytes at user address `buf` and stores
/// its method and path (cut at `?`, `#` or the end of the path, at most `NET_PATH_LEN`
/// bytes) in `conn`, whose path is all zeros (`finish` leaves it so). Its first
/// `NET_PEEK_LEN` bytes are read onto this program's stack: no map value to look up, and the
/// raw bytes (query string, headers) stay in no map, which root could dump.
#[inline(always)]
pub fn parse_request(conn: &mut NetConn, buf: u64, len: u64) {
    conn.method = http_method::NONE;
    conn.path_len = 0;
    let n = if len < NET_PEEK_LEN as u64 { len as u32 } else { NET_PEEK_LEN as u32 };
    if n < 8 || buf == 0 {
        return;
    }
    let mut words = core::mem::MaybeUninit::<[u64; NET_PEEK_LEN / 8]>::uninit();
    let w = zeroed(&mut words);
    // SAFETY: the helper writes `n` bytes, at most `NET_PEEK_LEN`, into `words`, which has
    // as many; it checks the user address and fails rather than faulting.
    if unsafe { bpf_probe_read_user(w.cast(), n, buf as *const _) } != 0 {
        return;
    }
    // SAFETY: the array, every word of which `zeroed` wrote; any byte is a valid `u8`.
    let p: &[u8; NET_PEEK_LEN] = unsafe { &*w.cast() };
    let n = n as usize;
    let word = u64::from_le_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
    let (method, skip) = if word & 0xffff_ffff == u32::from_le_bytes(*b"GET ") as u64 {
        (http_method::GET, 4)
    } else if word & 0xff_ffff_ffff == u64::from_le_bytes(*b"POST \0\0\0") {
        (http_method::POST, 5)
    } else if word & 0xffff_ffff == u32::from_le_bytes(*b"PUT ") as u64 {
        (http_method::PUT, 4)
    } else if word & 0xff_ffff_ffff == u64::from_le_bytes(*b"HEAD \0\0\0") {
        (http_method::HEAD, 5)
    } else if word & 0x00ff_ffff_ffff_ffff == u64::from_le_bytes(*b"DELETE \0") {
        (http_method::DELETE, 7)
    } else if word & 0xffff_ffff_ffff == u64::from_le_bytes(*b"PATCH \0\0") {
        (http_method::PATCH, 6)
    } else if word == u64::from_le_bytes(*b"OPTIONS ") {
        (http_method::OPTIONS, 8)
    } else {
        return;
    };
    if skip >= n || p.get(skip).copied() != Some(b'/') {
        return;
    }
    let mut path_len = 0usize;
    for i in 0..NET_PATH_LEN {
        if skip + i >= n {
            break;
        }
        let Some(&c) = p.get(skip + i) else { break };
        if c == b' ' || c == b'?' || c == b'#' || c == b'\r' || c == b'\n' || c == 0 {
            break;
        }
        if let Some(slot) = conn.path.get_mut(i) {
            *slot = c;
        }
        path_len = i + 1;
    }
    conn.method = method;
    conn.path_len = path_len as u32;
}

/// Index mask of the header buffer.
const HEAD_MASK: usize = NET_HEAD_BUF - 1;

/// Header names looked for, lower case, with their colon; a table indexed by a line's
/// column (masked).
static CONTENT_LENGTH: [u8; 32] = *b"content-length:\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
static TRANSFER_ENCODING: [u8; 32] = *b"transfer-encoding:\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
static CHUNKED: [u8; 8] = *b"chunked\0";
const CONTENT_LENGTH_LEN: u64 = 15;
const TRANSFER_ENCODING_LEN: u64 = 18;
/// `HeadScan::value`: the bytes are a value of no interest, of `Content-Length`, of
/// `Transfer-Encoding`.
const VALUE_NONE: u64 = 0;
const VALUE_LENGTH: u64 = 1;
const VALUE_ENCODING: u64 = 2;

/// A response head being scanned by `head_step`; kept in `NetConn`
/// (`head_*`) between the reads a head arrives in.
///
/// During a scan it lives in this CPU's `NET_HEAD_SCAN`, not on the stack: the verifier
/// follows the values of stack slots, and would check the loop's body once for each column
/// and state it could reach.
#[repr(C)]
pub struct HeadScan {
    /// Bytes of this call in `NET_HEAD`, and the next one to look at.
    n: u64,
    pos: u64,
    /// Bytes of the head seen, this call's included.
    seen: u64,
    /// `Content-Length` (`u64::MAX`: none).
    length: u64,
    /// How much of `\r\n\r\n` the last bytes were (4: the head is complete).
    tail: u64,
    /// Column in the current line, and whether the line can still start with each name.
    col: u64,
    length_name: u64,
    encoding_name: u64,
    value: u64,
    /// How much of `chunked` the last bytes of a `Transfer-Encoding` value were; 7: seen.
    chunked: u64,
}

impl HeadScan {
    #[inline(always)]
    fn load(conn: &NetConn, n: u64) -> Self {
        let st = conn.head_state;
        Self {
            n,
            pos: 0,
            seen: u64::from(conn.head_seen),
            length: conn.head_length,
            tail: u64::from(st[0]),
            col: u64::from(st[1]),
            length_name: u64::from(st[2]),
            encoding_name: u64::from(st[3]),
            value: u64::from(st[4]),
            chunked: u64::from(st[5]),
        }
    }

    #[inline(always)]
    fn store(&self, conn: &mut NetConn) {
        conn.head_seen = self.seen as u32;
        conn.head_length = self.length;
        conn.head_state = [
            self.tail as u8,
            self.col as u8,
            self.length_name as u8,
            self.encoding_name as u8,
            self.value as u8,
            self.chunked as u8,
            0,
            0,
        ];
    }
}

/// Starts following the head of a response to an HTTP/1.x request on `conn`.
#[inline(always)]
pub fn start_response_head(conn: &mut NetConn) {
    conn.framing = NET_FRAMING_HEAD;
    conn.head_seen = 0;
    conn.head_length = u64::MAX;
    // At the start of the status line: no name can match it.
    conn.head_state = [0; 8];
}

/// Reads the next `len` bytes of a response's head at user address `buf` (the start of a
/// read or write of it): on its first bytes the status (`conn.status`, 0 when it is not an
/// HTTP/1.x status line), and once the head is complete how the response's end will be
/// recognized (`conn.framing`, `conn.resp_expect`). Only the status line and the
/// `Content-Length` and `Transfer-Encoding` headers are looked at, and the copy is cleared
/// before returning.
#[inline(never)]
pub fn parse_response_head(conn: &mut NetConn, buf: u64, len: u64) {
    let Some(p) = NET_HEAD.get_ptr_mut(0) else { return };
    let n = (if len < NET_HEAD_LEN as u64 { len as u32 } else { NET_HEAD_LEN as u32 }) & HEAD_MASK as u32;
    // SAFETY: `p` is this CPU's `NET_HEAD` buffer of `NET_HEAD_BUF` bytes and `n` is at most
    // `NET_HEAD_LEN`, below that; the helper checks the user address and fails rather than
    // faulting.
    if n == 0 || buf == 0 || unsafe { bpf_probe_read_user(p.cast(), n, buf as *const _) } != 0 {
        conn.framing = NET_FRAMING_NONE;
        return;
    }
    // SAFETY: a per-CPU array value lives as long as the program is loaded, and only this run
    // uses this CPU's buffer (only the data-call programs use it, which run in a task's
    // system call and so never on top of each other); plain bytes.
    let head = unsafe { &*p };
    if conn.head_seen == 0 {
        conn.status = status_line(head, n as usize);
    }
    let Some(scan) = NET_HEAD_SCAN.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scan state, used only by this run (as `NET_HEAD`) and the loop
    // below; plain integers.
    unsafe { *scan = HeadScan::load(conn, u64::from(n)) };
    // A `bpf_loop` callback: the verifier checks its body once, where a loop over hundreds
    // of bytes with a branch per byte would exceed what it explores. It gets both buffers
    // through `ctx` (two pointers on this stack): no map lookup per step.
    let mut ctx = HeadLoop { head: p, scan };
    // SAFETY: `head_step` has the callback signature the helper expects and `ctx` outlives
    // the call; the helper runs it at most `NET_HEAD_LEN` times.
    unsafe {
        bpf_loop(
            NET_HEAD_LEN as u32,
            head_step as *mut core::ffi::c_void,
            (&mut ctx as *mut HeadLoop).cast(),
            0,
        )
    };
    // SAFETY: as above.
    let scan = unsafe { &*scan };
    scan.store(conn);
    if scan.tail == 4 {
        framing(conn, scan.seen, scan.length, scan.chunked == 7);
    } else if u64::from(n) < len || scan.seen >= u64::from(NET_HEAD_MAX) {
        // The head goes on past what is looked at.
        conn.framing = NET_FRAMING_NONE;
    }
    // The headers do not stay in the buffer, which root could dump.
    let words = p.cast::<u64>();
    for i in 0..NET_HEAD_LEN / 8 {
        if i * 8 >= n as usize {
            break;
        }
        // SAFETY: word `i` lies in the first half of the 8-byte aligned buffer.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// The status of the HTTP/1.x status line the `n` bytes of `p` start with, 0 when there is
/// none (or fewer than its first 12 bytes).
#[inline(always)]
fn status_line(p: &[u8; NET_HEAD_BUF], n: usize) -> u32 {
    if n < 12 {
        return 0;
    }
    let word = |at: usize| {
        let mut w = 0u64;
        for k in 0..8 {
            w |= u64::from(p[at + k]) << (8 * k);
        }
        w
    };
    status_code([word(0), word(8)])
}

/// How the end of a response whose head of `head_len` bytes is complete will be recognized.
#[inline(always)]
fn framing(conn: &mut NetConn, head_len: u64, length: u64, chunked: bool) {
    let status = conn.status;
    conn.framing = NET_FRAMING_NONE;
    // An interim (1xx) response, whose final response follows, or no status: the end is
    // the last bytes before the next request.
    if status < 200 {
        return;
    }
    if conn.method == http_method::HEAD || status == 204 || status == 304 {
        conn.framing = NET_FRAMING_LENGTH;
        conn.resp_expect = head_len;
    } else if chunked {
        conn.framing = NET_FRAMING_CHUNKED;
    } else if length != u64::MAX {
        conn.framing = NET_FRAMING_LENGTH;
        conn.resp_expect = head_len + length;
    }
}

/// What `head_step` works on: this CPU's `NET_HEAD` and `NET_HEAD_SCAN`.
#[repr(C)]
struct HeadLoop {
    head: *mut [u8; NET_HEAD_BUF],
    scan: *mut HeadScan,
}

/// Whether any byte of `word` is `byte`.
#[inline(always)]
fn has_byte(word: u64, byte: u8) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & (ONES << 7) != 0
}

/// `bpf_loop` callback: the next bytes of the head in `NET_HEAD` into its `HeadScan`, one
/// at a time where a header name or value or the head's end may be, eight at a time through
/// the rest of a line. Returns 1 to stop (the head is complete, or the call's bytes are done).
#[inline(never)]
extern "C" fn head_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `HeadLoop` of `parse_response_head`, which waits for the loop; its
    // pointers are this CPU's map values, used by this run only.
    let (p, s) = unsafe {
        let l = &*(ctx as *const HeadLoop);
        (&*l.head, &mut *l.scan)
    };
    let pos = s.pos;
    if pos >= s.n {
        return 1;
    }
    let at = pos as usize & HEAD_MASK;
    // Inside a line that can be no header of interest, nor the head's end: skip to its end.
    if s.length_name == 0 && s.encoding_name == 0 && s.value == VALUE_NONE && s.tail == 0 && pos + 8 <= s.n {
        let mut word = 0u64;
        for k in 0..8 {
            word |= u64::from(p[(at + k) & HEAD_MASK]) << (8 * k);
        }
        if !has_byte(word, b'\n') && !has_byte(word, b'\r') {
            s.pos += 8;
            s.seen += 8;
            s.col = if s.col < 247 { s.col + 8 } else { 255 };
            return 0;
        }
    }
    let b = p[at];
    s.pos += 1;
    s.seen += 1;
    // The head ends with an empty line.
    s.tail = match (b, s.tail) {
        (b'\r', 2) => 3,
        (b'\r', _) => 1,
        (b'\n', 1) => 2,
        (b'\n', 3) => 4,
        _ => 0,
    };
    if s.tail == 4 {
        return 1;
    }
    if b == b'\n' {
        s.col = 0;
        s.length_name = 1;
        s.encoding_name = 1;
        s.value = VALUE_NONE;
        return 0;
    }
    let folded = b | 0x20;
    match s.value {
        VALUE_LENGTH => {
            if b.is_ascii_digit() {
                let so_far = if s.length == u64::MAX { 0 } else { s.length };
                s.length = so_far.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
            } else if b != b' ' && b != b'\t' {
                s.value = VALUE_NONE;
            }
        }
        VALUE_ENCODING => {
            let k = s.chunked & 7;
            if k < 7 {
                s.chunked = if folded == CHUNKED[k as usize] {
                    k + 1
                } else if folded == b'c' {
                    1
                } else {
                    0
                };
            }
        }
        _ => {
            let col = s.col & 31;
            if s.length_name != 0 {
                if col >= CONTENT_LENGTH_LEN || folded != CONTENT_LENGTH[col as usize] {
                    s.length_name = 0;
                } else if col + 1 == CONTENT_LENGTH_LEN {
                    s.value = VALUE_LENGTH;
                }
            }
            if s.encoding_name != 0 {
                if col >= TRANSFER_ENCODING_LEN || folded != TRANSFER_ENCODING[col as usize] {
                    s.encoding_name = 0;
                } else if col + 1 == TRANSFER_ENCODING_LEN {
                    s.value = VALUE_ENCODING;
                }
            }
        }
    }
    if s.col < 255 {
        s.col += 1;
    }
    0
}

/// The status code of an HTTP/1.x status line in `buf`, 0 when it is not one. Reads its
/// first 12 bytes (`HTTP/1.x NNN`) onto the stack, as two words (a server's response: its
/// framing is not read, see `net_syscalls::data`).
#[inline(always)]
pub fn parse_status(buf: u64, len: u64) -> u32 {
    if buf == 0 || len < 12 {
        return 0;
    }
    let mut words = core::mem::MaybeUninit::<[u64; 2]>::uninit();
    let w = zeroed(&mut words);
    // SAFETY: the helper writes 12 bytes into `words`, which has 16; it checks the user address
    // and fails rather than faulting.
    if unsafe { bpf_probe_read_user(w.cast(), 12, buf as *const _) } != 0 {
        return 0;
    }
    // SAFETY: both words lie in the array, which `zeroed` wrote.
    status_code(unsafe { [core::ptr::read_volatile(w), core::ptr::read_volatile(w.add(1))] })
}

/// The status code of the status line whose first 12 bytes are in `words` (`HTTP/1.x NNN`,
/// little-endian; bytes past the 12th are ignored), 0 when it is not one.
#[inline(always)]
fn status_code(words: [u64; 2]) -> u32 {
    // "HTTP/1." then any minor version digit.
    if words[0] & 0x00ff_ffff_ffff_ffff != u64::from_le_bytes(*b"HTTP/1.\0") {
        return 0;
    }
    let [space, d0, d1, d2, ..] = words[1].to_le_bytes();
    if space != b' ' || !d0.is_ascii_digit() || !d1.is_ascii_digit() || !d2.is_ascii_digit() {
        return 0;
    }
    u32::from(d0 - b'0') * 100 + u32::from(d1 - b'0') * 10 + u32::from(d2 - b'0')
}

/// Whether the `ret` bytes just read or written at user address `buf` (of a buffer of `len`)
/// end a chunked body: their last five are the last chunk's `0\r\n\r\n`.
#[inline(always)]
pub fn ends_chunked(buf: u64, len: u64, ret: u64) -> bool {
    if buf == 0 || ret < 5 || ret > len {
        return false;
    }
    let mut word = 0u64;
    // SAFETY: the helper writes 5 bytes into `word`, which has 8; it checks the user address
    // and fails rather than faulting.
    if unsafe { bpf_probe_read_user((&mut word as *mut u64).cast(), 5, (buf + ret - 5) as *const _) } != 0 {
        return false;
    }
    word == u64::from_le_bytes(*b"0\r\n\r\n\0\0\0")
}

/// The next free slot of this CPU's event ring, and the header word to publish it with
/// (`publish`, which must follow); None when the ring is full or another run on this CPU is
/// writing a slot (this one interrupted it: the event is counted as lost).
#[inline(always)]
fn reserve() -> Option<(*mut NetEvent, *mut u64, u64)> {
    // SAFETY: the helper takes no arguments and only reads the current CPU's id.
    let base = unsafe { bpf_get_smp_processor_id() } * (NET_RING_SLOTS + 1);
    let header = NET_EVENTS.get_ptr_mut(base)? as *mut u64;
    // SAFETY: the three words lie inside the header element (a `NetEvent`, 160 bytes; the
    // words are at bytes 0, 64 and 128) and are aligned (array values are 8-aligned). The
    // head and the busy word are written only by programs on this CPU, one at a time: a run
    // that starts on top of another finds the busy word set and writes nothing (one that
    // comes between the read and the write of the busy word ends before this one reads the
    // head). The tail is written by userspace through its mapping of the array. Read
    // volatile, any value is a valid `u64`.
    unsafe {
        let busy = header.add(NET_RING_BUSY);
        if core::ptr::read_volatile(busy) != 0 {
            return None;
        }
        core::ptr::write_volatile(busy, 1);
        let head = core::ptr::read_volatile(header.add(NET_RING_HEAD));
        let tail = core::ptr::read_volatile(header.add(NET_RING_TAIL));
        let slot = if head.wrapping_sub(tail) >= u64::from(NET_RING_SLOTS) {
            None
        } else {
            NET_EVENTS.get_ptr_mut(base + 1 + (head as u32 & (NET_RING_SLOTS - 1)))
        };
        match slot {
            Some(slot) => Some((slot, header, head)),
            None => {
                core::ptr::write_volatile(busy, 0);
                None
            }
        }
    }
}

/// Makes the slot `reserve` gave visible to userspace: the head moves past it only after
/// the event's own stores (x86-64 keeps stores in order; the fence keeps the compiler from
/// moving them); then frees the ring for the next run on this CPU.
#[inline(always)]
fn publish(header: *mut u64, head: u64) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
    // SAFETY: `header` is this CPU's ring header from `reserve` (the head and busy words in
    // bounds and aligned), which this run holds (`NET_RING_BUSY`).
    unsafe {
        core::ptr::write_volatile(header.add(NET_RING_HEAD), head + 1);
        core::ptr::write_volatile(header.add(NET_RING_BUSY), 0);
    }
}

/// Sends the request completed on `conn` to userspace.
#[inline(always)]
pub fn emit_request(conn: &NetConn, tgid: u32, stall: (u64, u32)) {
    let Some((e, header, head)) = reserve() else {
        bump(stat::NET_EVENTS_LOST);
        return;
    };
    // SAFETY: `e` is a slot of this CPU's ring from `reserve`: a live, aligned array value that
    // userspace does not read before `publish` moves the head past it, and that no other
    // run writes meanwhile (`reserve`). `addr` and `path` are 8-byte aligned in both
    // structs (see `copy_words`).
    unsafe {
        (*e).kind = agent_ebpf::NET_EVENT_REQUEST;
        (*e).tgid = tgid;
        (*e).role = conn.role;
        (*e).status = conn.status;
        (*e).start_ns = conn.start_ns;
        (*e).resp_first_ns = conn.resp_first_ns;
        (*e).resp_last_ns = conn.resp_last_ns;
        (*e).req_bytes = conn.req_bytes;
        (*e).resp_bytes = conn.resp_bytes;
        copy_words(&mut (*e).addr, &conn.addr);
        (*e).port = conn.port;
        (*e).family = conn.family;
        (*e).method = conn.method;
        (*e).path_len = conn.path_len;
        (*e).retransmits = 0;
        (*e).srtt_us = 0;
        (*e).stall_cause = stall.1;
        (*e).queue_ns = conn.queue_ns;
        (*e).accept_ns = conn.accept_ns;
        (*e).stall_ns = stall.0;
        copy_words(&mut (*e).path, &conn.path);
    }
    publish(header, head);
}

/// Sends a connection-level event (`NET_EVENT_CONNECT`, `_CLOSE`, `_ACCEPT`) to userspace.
/// Connects and closes are the client's (only connecting sockets are followed through their
/// TCP states), accepts the server's.
#[inline(always)]
pub fn emit_conn(
    kind: u32,
    tgid: u32,
    status: u32,
    times: (u64, u64),
    bytes: (u64, u64),
    peer: Peer,
    tcp: (u32, u32),
) {
    let Some((e, header, head)) = reserve() else {
        bump(stat::NET_EVENTS_LOST);
        return;
    };
    let role = if kind == NET_EVENT_ACCEPT { NET_ROLE_SERVER } else { NET_ROLE_CLIENT };
    // SAFETY: as in `emit_request`; `Peer::addr` is 8-byte aligned too.
    unsafe {
        (*e).kind = kind;
        (*e).tgid = tgid;
        (*e).role = role;
        (*e).status = status;
        (*e).start_ns = times.0;
        (*e).resp_first_ns = times.1;
        (*e).resp_last_ns = times.1;
        (*e).req_bytes = bytes.0;
        (*e).resp_bytes = bytes.1;
        (*e).family = peer.family;
        (*e).port = peer.port;
        copy_words(&mut (*e).addr, &peer.addr);
        (*e).method = 0;
        (*e).path_len = 0;
        (*e).retransmits = tcp.0;
        (*e).srtt_us = tcp.1;
        (*e).stall_cause = 0;
        (*e).stall_ns = 0;
        (*e).queue_ns = 0;
        (*e).accept_ns = if kind == NET_EVENT_ACCEPT { times.1 - times.0 } else { 0 };
        zero_words(&mut (*e).path);
    }
    publish(header, head);
}

/// `sk_data_ready(struct sock *sk)`: bytes arrived on `sk`. For a server's socket, the first
/// arrival since its last read is when the next request started to wait; for a
/// client's, the gaps between arrivals show a response that came in parts. Runs for every
/// socket of the host (in softirq context, where the current task is anyone): one bit test
/// (`NET_SK_BITS`), then for the targets' sockets their `NET_READY` slot (a server's) or a
/// lookup of their state (a client's, or a server's whose slot another took).
#[raw_tracepoint(tracepoint = "sk_data_ready")]
pub fn net_data_ready(ctx: RawTracePointContext) -> u32 {
    if !working() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if !sk_maybe_tracked(sk) {
        return 0;
    }
    // SAFETY: the helper takes no arguments and only reads the clock.
    let now = || unsafe { bpf_ktime_get_ns() };
    // A server's socket in its slot: only the first arrival matters.
    if let Some(r) = ready_slot(sk)
        && r.sk == sk
    {
        if r.ready_ns == 0 {
            r.ready_ns = now();
        }
        return 0;
    }
    if let Some(st) = NET_SK_STATE.get_ptr_mut(sk) {
        // SAFETY: a value of the preallocated LRU map from a successful lookup: it stays
        // allocated as long as the map; plain integers. A read racing on another CPU sees
        // the old or the new value of each.
        let st = unsafe { &mut *st };
        let now = now();
        if st.ready_ns == 0 {
            st.ready_ns = now;
        }
        if st.last_ns != 0 && now > st.last_ns && now - st.last_ns > st.gap_ns {
            st.gap_ns = now - st.last_ns;
        }
        st.last_ns = now;
    }
    0
}

/// Bytes below the smallest send buffer the kernel keeps (`SOCK_MIN_SNDBUF`).
const SNDBUF_FLOOR: i32 = 4096;

/// `tcp_sendmsg_locked(struct sock *sk, ...)`: a write is about to queue bytes on `sk`. On a
/// tracked socket whose send buffer is full, the write will wait for room: that wait starts
/// (`after_write` ends it, and a hold under way ends here: the wait takes over), with why the
/// buffer is full. Runs for every TCP write of the host: one bit test, then a read of the
/// socket (two when more than `SNDBUF_FLOOR` bytes are queued).
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn net_tcp_sendmsg(ctx: RawTracePointContext) -> u32 {
    if !working() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if !sk_maybe_tracked(sk) || offset!(sk_sndbuf) == 0 || offset!(tcp_write_seq) == 0 {
        return 0;
    }
    // A send buffer is never below `SOCK_MIN_SNDBUF` (4,608 bytes on x86-64, whatever
    // `SO_SNDBUF` or memory pressure asks): fewer bytes queued cannot fill it, and the
    // buffer's size is read only when more are.
    let queued = kernel_u64(sk, offset!(sk_wmem_queued)) as i32;
    if queued < SNDBUF_FLOOR || queued < kernel_u64(sk, offset!(sk_sndbuf)) as i32 {
        return 0;
    }
    if let Some(st) = NET_SK_STATE.get_ptr_mut(sk) {
        // SAFETY: as in `net_data_ready`.
        let st = unsafe { &mut *st };
        // SAFETY: the helper takes no arguments and only reads the clock.
        let now = unsafe { bpf_ktime_get_ns() };
        if st.write_full_ns == 0 {
            end_stall(st, now);
            st.write_full_ns = now;
            for cause in &mut st.write_by_cause {
                put(cause, 0);
            }
            sk_mark_stall(sk, true);
        } else {
            write_time(st, now);
        }
        // Why, as of now: a long transfer's first moments are bound by the congestion
        // window, its steady state by what limits it; the wait is named after the cause
        // that held the buffer full longest.
        st.write_mark_ns = now;
        st.write_cause = match held_cause(sk) {
            Some(c @ (stall_cause::ZERO_WINDOW | stall_cause::CONGESTION)) => c,
            _ => stall_cause::SEND_BUFFER,
        };
    }
    0
}

/// `tcp_probe(struct sock *sk, const struct sk_buff *skb)`: a segment arrived on `sk` (an
/// acknowledgement, a window update, data). For a server's socket whose written bytes the
/// kernel holds (`after_write`), this is what releases them: the stall ends. Runs for every
/// segment of the host: one bit test first, as `net_data_ready`.
#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn net_tcp_probe(ctx: RawTracePointContext) -> u32 {
    if !working() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if !sk_maybe_stalled(sk) {
        return 0;
    }
    if let Some(st) = NET_SK_STATE.get_ptr_mut(sk) {
        // SAFETY: as in `net_data_ready`.
        let st = unsafe { &mut *st };
        // (While a write waits for room, the wait is the stall: `after_write` ends it.)
        if st.hold_ns != 0 && st.write_full_ns == 0 {
            // SAFETY: the helper takes no arguments and only reads the clock.
            let now = unsafe { bpf_ktime_get_ns() };
            let cause = st.hold_cause;
            end_stall(st, now);
            // A full window opens a little with each acknowledgement: the bytes still held
            // (as of before this segment is processed) go on waiting, until a segment finds
            // them all sent. (Nagle's hold ends with the first acknowledgement.)
            if cause != stall_cause::NAGLE
                && let Some(still) = held_cause(sk)
            {
                st.hold_ns = now;
                st.hold_cause = if still == stall_cause::NAGLE { cause } else { still };
            }
        }
    }
    0
}

/// Ends the stall under way on a socket at `now`: adds it to the stalls since the last
/// request was reported.
#[inline(always)]
pub fn end_stall(st: &mut NetSkState, now: u64) {
    let (since, cause) = (st.hold_ns, st.hold_cause);
    st.hold_ns = 0;
    add_stall(st, since, now, cause);
}

/// Adds the time since the write's wait last found the buffer full to the cause it found.
#[inline(always)]
fn write_time(st: &mut NetSkState, now: u64) {
    let d = now.saturating_sub(st.write_mark_ns);
    match st.write_cause {
        stall_cause::ZERO_WINDOW => st.write_by_cause[0] += d,
        stall_cause::CONGESTION => st.write_by_cause[1] += d,
        _ => st.write_by_cause[2] += d,
    }
    st.write_mark_ns = now;
}

/// Adds a stall from `since` to `now` (none when `since` is 0) to the socket's stalls.
#[inline(always)]
fn add_stall(st: &mut NetSkState, since: u64, now: u64, cause: u32) {
    if since == 0 || now < since {
        return;
    }
    let d = now - since;
    st.stall_ns += d;
    if d >= st.longest_ns {
        st.longest_ns = d;
        st.stall_cause = cause;
    }
}

/// After a write to `sk` returned at `now`: its wait for room in the send buffer, if it
/// had one, ends; when the kernel holds bytes of it back (written but not sent), a stall
/// starts, with its cause: the peer's window full, the congestion window full, or Nagle's
/// algorithm (less than a segment, earlier data unacknowledged).
#[inline(always)]
pub fn after_write(sk: u64, now: u64) {
    if !full_detail() || offset!(tcp_write_seq) == 0 {
        return;
    }
    // Bytes held or not first (one read; the sequence numbers and why only when some are),
    // and a bit test: the socket's state only when either says there is something to do.
    let held = if unsent(sk) { held_cause(sk) } else { None };
    if held.is_none() && !sk_maybe_stalled(sk) {
        return;
    }
    let st = match NET_SK_STATE.get_ptr_mut(sk) {
        Some(st) => st,
        None => {
            // A state evicted from the full map is kept again.
            let _ = NET_SK_STATE.insert(sk, NetSkState::default(), 0);
            let Some(st) = NET_SK_STATE.get_ptr_mut(sk) else { return };
            st
        }
    };
    // SAFETY: as in `net_data_ready`.
    let st = unsafe { &mut *st };
    if st.write_full_ns != 0 {
        write_time(st, now);
        let t = st.write_by_cause;
        let cause = if t[0] >= t[1] && t[0] >= t[2] {
            stall_cause::ZERO_WINDOW
        } else if t[1] >= t[2] {
            stall_cause::CONGESTION
        } else {
            stall_cause::SEND_BUFFER
        };
        let since = st.write_full_ns;
        st.write_full_ns = 0;
        add_stall(st, since, now, cause);
    }
    if let Some(cause) = held
        && st.hold_ns == 0
    {
        st.hold_ns = now;
        st.hold_cause = cause;
        sk_mark_stall(sk, true);
    }
}

/// Whether bytes written to `sk` may wait unsent: its write queue is not empty, or that is
/// not known.
#[inline(always)]
fn unsent(sk: u64) -> bool {
    let off = offset!(sk_write_queue);
    if off == 0 {
        return true;
    }
    // (0, an unreadable word, is not the queue's own address either.)
    kernel_u64(sk, off) != sk + off as u64
}

/// Why the kernel holds bytes written to `sk` (written, not sent), if it does.
#[inline(always)]
fn held_cause(sk: u64) -> Option<u32> {
    let field = |off: usize| kernel_u64(sk, off) as u32;
    let (written, next) = (field(offset!(tcp_write_seq)), field(offset!(tcp_snd_nxt)));
    let held = written.wrapping_sub(next);
    if held == 0 || held > 1 << 30 {
        return None;
    }
    let (una, window) = (field(offset!(tcp_snd_una)), field(offset!(tcp_snd_wnd)));
    if una.wrapping_add(window).wrapping_sub(next) as i32 <= 0 {
        Some(stall_cause::ZERO_WINDOW)
    } else if field(offset!(tcp_packets_out)) >= field(offset!(tcp_snd_cwnd)) {
        Some(stall_cause::CONGESTION)
    } else if held < field(offset!(tcp_mss_cache)) && una != next {
        Some(stall_cause::NAGLE)
    } else {
        // Queued for a moment (small queues, pacing): sent without waiting for the peer.
        None
    }
}

/// The stalls of `sk` since its last reported request, as of `now` (a stall still under way
/// counts until now and goes on from there); resets them. A client's response that came in
/// two parts a delayed ACK apart (`NAGLE_GAP_MIN_NS`) counts as a Nagle stall of that gap.
#[inline(always)]
pub fn take_stalls(sk: u64, now: u64, client: bool) -> (u64, u32) {
    if !full_detail() || (!client && !sk_maybe_stalled(sk)) {
        return (0, 0);
    }
    let Some(st) = NET_SK_STATE.get_ptr_mut(sk) else { return (0, 0) };
    // SAFETY: as in `net_data_ready`.
    let st = unsafe { &mut *st };
    if st.hold_ns != 0 {
        let cause = st.hold_cause;
        end_stall(st, now);
        st.hold_ns = now;
        st.hold_cause = cause;
    }
    if client && (NAGLE_GAP_MIN_NS..=NAGLE_GAP_MAX_NS).contains(&st.gap_ns) {
        let gap = st.gap_ns;
        add_stall(st, now - gap, now, stall_cause::NAGLE);
    }
    put(&mut st.gap_ns, 0);
    let taken = (st.stall_ns, st.stall_cause);
    put(&mut st.stall_ns, 0);
    put(&mut st.longest_ns, 0);
    put(&mut st.stall_cause, 0);
    if st.hold_ns == 0 && st.write_full_ns == 0 {
        sk_mark_stall(sk, false);
    }
    taken
}

/// A client's request starts on `sk`: the gaps in its response are timed from its first
/// arriving bytes.
#[inline(always)]
pub fn client_request(sk: u64) {
    if let Some(st) = NET_SK_STATE.get_ptr_mut(sk) {
        // SAFETY: as in `net_data_ready`.
        let st = unsafe { &mut *st };
        put(&mut st.last_ns, 0);
        put(&mut st.gap_ns, 0);
    }
}
