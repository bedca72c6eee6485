//! Kernel side of the network programs: their offsets, TCP sockets and peers, the per-CPU
//! event rings, the HTTP/1.x recognizer that keeps only method, path (up to `?`) and status.
use agent_ebpf::{
    NET_EVENT_ACCEPT, NET_PATH_LEN, NET_PEEK_BUF, NET_PEEK_LEN, NET_RING_HEAD, NET_RING_SLOTS, NET_RING_TAIL,
    NET_ROLE_CLIENT, NET_ROLE_SERVER, NetConn, NetEvent, NetOffsets, http_method, stat,
};
use aya_ebpf::helpers::generated::{bpf_get_smp_processor_id, bpf_probe_read_kernel, bpf_probe_read_user};

use crate::maps::{NET_EVENTS, NET_PEEK, bump};

/// Offsets set by the loader (see `NetOffsets`).
#[unsafe(no_mangle)]
pub static NET_OFFSETS: NetOffsets = NetOffsets::CURRENT_KERNELS;

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

/// Copies the first bytes (at most `NET_PEEK_LEN`) of a user buffer of `len` bytes into the
/// per-CPU peek buffer; returns it and how many bytes are valid (the rest is stale).
#[inline(always)]
fn peek(buf: u64, len: u64) -> Option<(&'static [u8; NET_PEEK_BUF], usize)> {
    let p = NET_PEEK.get_ptr_mut(0)?;
    let n = if len < NET_PEEK_LEN as u64 { len as u32 } else { NET_PEEK_LEN as u32 };
    let n = n & (NET_PEEK_BUF as u32 - 1);
    if n == 0 || buf == 0 {
        return None;
    }
    // SAFETY: `p` is this CPU's `NET_PEEK` buffer of `NET_PEEK_BUF` bytes and `n` is masked
    // below that; the helper checks the user address and fails rather than faulting.
    if unsafe { bpf_probe_read_user(p.cast(), n, buf as *const _) } != 0 {
        return None;
    }
    // SAFETY: a per-CPU array value lives as long as the program is loaded, and only this run
    // uses this CPU's buffer (tracing programs never nest on one CPU: the kernel skips one that
    // would); the bytes are plain `u8`s.
    Some((unsafe { &*p }, n as usize))
}

/// Recognizes an HTTP/1.x request line in `buf` and stores its method and path (cut at
/// `?`, `#` or the end of the path, at most `NET_PATH_LEN` bytes) in `conn`; the raw bytes
/// read (query string, headers) do not stay in the peek buffer, which root could dump.
#[inline(always)]
pub fn parse_request(conn: &mut NetConn, buf: u64, len: u64) {
    recognize_request(conn, buf, len);
    if let Some(p) = NET_PEEK.get_ptr_mut(0) {
        // SAFETY: this CPU's peek buffer, 8-byte aligned (array values are), used only by
        // this run (see `peek`), whose borrow of it ended with `recognize_request`.
        unsafe { zero_words(&mut *p) };
    }
}

#[inline(always)]
fn recognize_request(conn: &mut NetConn, buf: u64, len: u64) {
    conn.method = http_method::NONE;
    conn.path_len = 0;
    let Some((p, n)) = peek(buf, len) else { return };
    if n < 8 {
        return;
    }
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
    // SAFETY: `NetConn::path` is 8-byte aligned (see `copy_words`).
    unsafe { zero_words(&mut conn.path) };
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

/// The status code of an HTTP/1.x status line in `buf`, 0 when it is not one. Reads its
/// first 12 bytes (`HTTP/1.x NNN`) onto the stack, as two words.
#[inline(always)]
pub fn parse_status(buf: u64, len: u64) -> u32 {
    if buf == 0 || len < 12 {
        return 0;
    }
    let mut words = [0u64; 2];
    // SAFETY: the helper writes 12 bytes into `words`, which has 16; it checks the user address
    // and fails rather than faulting.
    if unsafe { bpf_probe_read_user(words.as_mut_ptr().cast(), 12, buf as *const _) } != 0 {
        return 0;
    }
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

/// The next free slot of this CPU's event ring, and the header word to publish it with
/// (`publish`); None when the ring is full (the event is counted as lost).
#[inline(always)]
fn reserve() -> Option<(*mut NetEvent, *mut u64, u64)> {
    // SAFETY: the helper takes no arguments and only reads the current CPU's id.
    let base = unsafe { bpf_get_smp_processor_id() } * (NET_RING_SLOTS + 1);
    let header = NET_EVENTS.get_ptr_mut(base)? as *mut u64;
    // SAFETY: both words lie inside the header element (a `NetEvent`, 160 bytes; the words are
    // at bytes 0 and 64) and are aligned (array values are 8-aligned). The head is written only
    // by programs on this CPU, which never nest; the tail by userspace through its mapping of
    // the array: read volatile, any value is a valid `u64`.
    let head = unsafe { core::ptr::read_volatile(header.add(NET_RING_HEAD)) };
    // SAFETY: as above.
    let tail = unsafe { core::ptr::read_volatile(header.add(NET_RING_TAIL)) };
    if head.wrapping_sub(tail) >= u64::from(NET_RING_SLOTS) {
        return None;
    }
    let slot = NET_EVENTS.get_ptr_mut(base + 1 + (head as u32 & (NET_RING_SLOTS - 1)))?;
    Some((slot, header, head))
}

/// Makes the slot `reserve` gave visible to userspace: the head moves past it only after
/// the event's own stores (x86-64 keeps stores in order; the fence keeps the compiler from
/// moving them).
#[inline(always)]
fn publish(header: *mut u64, head: u64) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
    // SAFETY: `header` is this CPU's ring header from `reserve` (the head word in bounds and
    // aligned), written only by programs on this CPU, which never nest.
    unsafe { core::ptr::write_volatile(header.add(NET_RING_HEAD), head + 1) };
}

/// Sends the request completed on `conn` to userspace.
#[inline(always)]
pub fn emit_request(conn: &NetConn, tgid: u32) {
    let Some((e, header, head)) = reserve() else {
        bump(stat::NET_EVENTS_LOST);
        return;
    };
    // SAFETY: `e` is a slot of this CPU's ring from `reserve`: a live, aligned array value that
    // userspace does not read before `publish` moves the head past it, and that only programs
    // on this CPU write (they never nest). `addr` and `path` are 8-byte aligned in both
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
        (*e)._pad = 0;
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
        (*e)._pad = 0;
        zero_words(&mut (*e).path);
    }
    publish(header, head);
}
