//! Request/response timing per (process, socket) from the socket system calls of target
//! processes: accept/connect make a socket tracked, reads and writes move its request state.
use agent_ebpf::{
    NET_CONN_PROBES, NET_EVENT_ACCEPT, NET_FRAMING_CHUNKED, NET_FRAMING_HEAD, NET_FRAMING_LENGTH,
    NET_FRAMING_NONE, NET_PHASE_IDLE, NET_PHASE_REQUEST, NET_PHASE_RESPONSE, NET_QUEUE_UNKNOWN,
    NET_ROLE_CLIENT, NET_ROLE_SERVER, NET_SK_ADOPTED, NET_SLOT_BUSY, NET_SLOT_FREE, NetConn, NetSkState,
    conn_slot, http_method, stat,
};
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_task_pt_regs},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

use super::net::{
    Peer, after_write, client_request, copy_words, emit_conn, emit_request, ends_chunked, full_detail,
    parse_request, parse_response_head, parse_status, put, read_sockaddr, start_response_head, take_stalls,
    zero_words,
};
use super::{
    offcpu::{fd_sock, task_ids},
    sysno,
};
use crate::maps::{
    NET_ACCEPTING, NET_CONN_SLOTS, NET_SK_STATE, bump, is_target, ready_slot, sk_mark, sk_mark_stall,
    sk_maybe_tracked,
};

const EINPROGRESS: i64 = 115;
/// Offset of `msg_iov` in `struct user_msghdr`.
const MSGHDR_IOV: u64 = 16;

#[inline(always)]
fn conn_key(tgid: u32, fd: u32) -> u64 {
    (u64::from(tgid) << 32) | u64::from(fd)
}

/// The key word and state of connection `key`'s slot, if it is followed.
#[inline(always)]
fn slot_of(key: u64) -> Option<(*mut u64, *mut NetConn)> {
    for probe in 0..NET_CONN_PROBES {
        let (k, c) = slot(key, probe)?;
        // SAFETY: the key word of an array element (`slot`); it changes only atomically
        // (compare-and-exchange, or the store of its key by the one that took it), which the
        // volatile load (one aligned word) sees before or after.
        if unsafe { core::ptr::read_volatile(k) } == key {
            return Some((k, c));
        }
    }
    None
}

/// Takes a slot for connection `key` to write its state: the one it still holds (a
/// descriptor number reused, the close of the last connection with it missed), else the
/// first free one. Its key word says `NET_SLOT_BUSY` until the writer stores `key`
/// (`slot_of` finds nobody meanwhile).
#[inline(always)]
fn claim_slot(key: u64) -> Option<(*mut u64, *mut NetConn)> {
    if let Some((k, c)) = slot_of(key)
        && swap_key(k, key, NET_SLOT_BUSY)
    {
        return Some((k, c));
    }
    for probe in 0..NET_CONN_PROBES {
        let (k, c) = slot(key, probe)?;
        if swap_key(k, NET_SLOT_FREE, NET_SLOT_BUSY) {
            return Some((k, c));
        }
    }
    None
}

/// The key word and state of slot `probe` of `key` (`conn_slot`), whoever holds it.
#[inline(always)]
fn slot(key: u64, probe: u32) -> Option<(*mut u64, *mut NetConn)> {
    let s = NET_CONN_SLOTS.get_ptr_mut(conn_slot(key, probe))?;
    // SAFETY: an element of the array (index checked by the lookup), live and aligned while
    // the program is loaded: its fields' addresses, not read here.
    unsafe { Some((core::ptr::addr_of_mut!((*s).key), core::ptr::addr_of_mut!((*s).conn))) }
}

/// Sets key word `k` to `new` if it is `old`; whether it did.
#[inline(always)]
fn swap_key(k: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: `k` is a slot's key word (`slot`): live and aligned. Every change of it on
    // other CPUs and from stoker is atomic, as this compare-and-exchange.
    unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::Relaxed },
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(k, old, new)
    }
    .1
}

/// Base and length of the first element of a user iovec array.
#[inline(always)]
fn first_iovec(iov: u64) -> (u64, u64) {
    if iov == 0 {
        return (0, 0);
    }
    // SAFETY: the helper checks the user address and fails rather than faulting; any bits are
    // a valid `u64`.
    let base = unsafe { bpf_probe_read_user(iov as *const u64) }.unwrap_or(0);
    // SAFETY: as above.
    let len = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.unwrap_or(0);
    (base, len)
}

/// Exit of every followed call. Its arguments are still in the registers saved at entry.
#[tracepoint]
pub fn net_sys_exit(_ctx: TracePointContext) -> u32 {
    if !super::net::working() {
        return 0;
    }
    try_sys_exit().unwrap_or(0)
}

/// Raw tracepoints `sock_recv_length` and `sock_send_length` (Linux 6.3+): a socket's
/// receive or send returns `ret` bytes (or an error), inside the system call of the current
/// task. Where they exist they time the data calls in place of the system call exits: they
/// run for socket I/O only (not for every file and pipe read or write on the host), are
/// cheaper to run than a system call tracepoint, and name the socket. The call's number and
/// arguments are in the registers saved at its entry, as at its exit (I/O the kernel does
/// for the task outside its own call, io_uring's, is told apart by its socket).
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn net_sock_data(ctx: RawTracePointContext) -> u32 {
    if !super::net::working() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let ret: u64 = ctx.arg(1);
    let task = super::current_task();
    let (tgid, _) = task_ids(task);
    if !is_target(tgid) {
        return 0;
    }
    let regs = entry_regs_of(task);
    // `ret` is an `int`: its upper half is not to be trusted.
    data_call(task, tgid, regs, i64::from(ret as u32 as i32), sk);
    0
}

fn try_sys_exit() -> Result<u32, i64> {
    let task = super::current_task();
    let (tgid, _) = task_ids(task);
    if !is_target(tgid) {
        return Ok(0);
    }
    // The system call's number and arguments as it entered, its return value in `rax`.
    let regs = entry_regs_of(task);
    let ret = regs.rax as i64;
    let fd = regs.rdi as u32;
    match regs.orig_rax {
        sysno::ACCEPT | sysno::ACCEPT4 => {
            if ret >= 0 {
                open(task, tgid, ret as u32, NET_ROLE_SERVER, regs.rsi, bpf_now());
            }
        }
        sysno::CONNECT => {
            if ret == 0 || ret == -EINPROGRESS {
                open(task, tgid, fd, NET_ROLE_CLIENT, regs.rsi, bpf_now());
            }
        }
        sysno::CLOSE => close(task, tgid, fd, ret),
        _ => data_call(task, tgid, regs, ret, 0),
    }
    Ok(0)
}

/// A data call (a read or write of any kind) of target `tgid` (`task`, its current thread)
/// that returned `ret`, with the registers it entered with; `sk` is its socket when the
/// caller knows it (0: not known). Only calls on sockets already tracked count (files and
/// pipes cost one lookup).
#[inline(always)]
fn data_call(task: *const u8, tgid: u32, regs: &pt_regs, ret: i64, sk: u64) {
    let (inbound, buf) = match regs.orig_rax {
        sysno::READ | sysno::RECVFROM => (true, Buf::new(FLAT, regs.rsi, regs.rdx)),
        sysno::WRITE | sysno::SENDTO => (false, Buf::new(FLAT, regs.rsi, regs.rdx)),
        sysno::READV => (true, Buf::new(IOVEC, regs.rsi, 0)),
        sysno::WRITEV => (false, Buf::new(IOVEC, regs.rsi, 0)),
        sysno::RECVMSG => (true, Buf::new(MSGHDR, regs.rsi, 0)),
        sysno::SENDMSG => (false, Buf::new(MSGHDR, regs.rsi, 0)),
        // Others (sendfile, io_uring_enter) were never followed.
        _ => return,
    };
    let fd = regs.rdi as u32;
    let Some((_, c)) = slot_of(conn_key(tgid, fd)) else { return };
    // SAFETY: a connection's state in its slot: an array element, allocated as long as the
    // map even if the connection leaves it meanwhile, aligned plain integers, valid for any
    // bits. Only the threads of this process that use this socket update it; two of them
    // doing so at the same instant on two CPUs can mix up that request's figures, never
    // reach memory outside the value.
    let c = unsafe { &mut *c };
    if c.sk == NET_SK_ADOPTED {
        // A connection adopted from /proc: its socket, now that its owner uses it.
        c.sk = if sk != 0 { track(sk, c.role) } else { track_sock(task, fd, c.role) };
    } else if sk != 0 && c.sk != 0 && c.sk != sk {
        // Another socket's I/O in this call: io_uring's work run as a system call returns,
        // or an io_uring worker, whose saved registers are its creator's. Not this call's.
        return;
    }
    data(c, tgid, inbound, buf, ret);
}

/// The registers saved when the current system call of `task` (the current task, as
/// `current_task` gave it, or a task the wall-clock sampler found blocked in one) entered,
/// read in place (no copy): its number, its arguments (unchanged until it returns) and, at
/// the exit, its return value.
#[inline(always)]
pub(super) fn entry_regs_of(task: *const u8) -> &'static pt_regs {
    // SAFETY: `bpf_task_pt_regs` of a task (a trusted BTF pointer) is its saved user
    // registers, valid and aligned; the current task's are unchanged while it is in this
    // system call, which outlasts the program run. Another task's may change as it returns
    // meanwhile: the verifier makes loads through the pointer ones that cannot fault, and
    // `pt_regs` is plain integers, valid for any bits.
    unsafe { &*(bpf_task_pt_regs(task as *mut _) as *const pt_regs) }
}

#[inline(always)]
fn bpf_now() -> u64 {
    // SAFETY: the helper takes no arguments and only reads the clock.
    unsafe { bpf_ktime_get_ns() }
}

/// Where a data call's bytes are: at `addr`, a buffer of `len` bytes (`FLAT`), an iovec
/// array (`IOVEC`) or a msghdr (`MSGHDR`). Resolved to the first buffer only when the bytes
/// are looked at. A struct rather than an enum: with an enum, the payload a variant lacks
/// can reach the verifier as a register never written, and the program is rejected.
#[derive(Clone, Copy)]
struct Buf {
    kind: u32,
    addr: u64,
    len: u64,
}

const FLAT: u32 = 0;
const IOVEC: u32 = 1;
const MSGHDR: u32 = 2;

impl Buf {
    #[inline(always)]
    fn new(kind: u32, addr: u64, len: u64) -> Self {
        Self { kind, addr, len }
    }

    #[inline(always)]
    fn first(self) -> (u64, u64) {
        match self.kind {
            FLAT => (self.addr, self.len),
            IOVEC => first_iovec(self.addr),
            _ => {
                // SAFETY: as in `first_iovec`.
                let iov = unsafe { bpf_probe_read_user((self.addr + MSGHDR_IOV) as *const u64) }.unwrap_or(0);
                first_iovec(iov)
            }
        }
    }
}

/// Starts tracking a socket accepted or connected by `tgid` (`task`, its current thread);
/// `sockaddr` is the peer's.
#[inline(always)]
fn open(task: *const u8, tgid: u32, fd: u32, role: u32, sockaddr: u64, now: u64) {
    // Only TCP/IP peers: Unix sockets and other families are left alone. A server that
    // does not ask for its peer's address (accept with NULL) is followed without it.
    let peer =
        if sockaddr == 0 && role == NET_ROLE_SERVER { Some(Peer::UNKNOWN) } else { read_sockaddr(sockaddr) };
    let Some(peer) = peer else { return };
    let key = conn_key(tgid, fd);
    let Some((k, c)) = claim_slot(key) else {
        bump(stat::NET_CONNS_FULL);
        return;
    };
    // SAFETY: the slot this run took (`claim_slot`: nobody else writes it until its key is
    // stored), live and aligned while the program is loaded; `NetConn` is plain integers.
    let c = unsafe { &mut *c };
    c.start_ns = 0;
    c.resp_first_ns = 0;
    c.resp_last_ns = 0;
    c.req_bytes = 0;
    c.resp_bytes = 0;
    c.opened_ns = now;
    // SAFETY: `NetConn::addr` and `Peer::addr` are 8-byte aligned (see `copy_words`).
    unsafe { copy_words(&mut c.addr, &peer.addr) };
    c.port = peer.port;
    c.family = peer.family;
    c.role = role;
    c.phase = NET_PHASE_IDLE;
    c.status = 0;
    c.method = http_method::NONE;
    c.path_len = 0;
    // A slot freed by stoker (its process exited) may hold a request's path still.
    // SAFETY: `NetConn::path` is 8-byte aligned (see `copy_words`).
    unsafe { zero_words(&mut c.path) };
    c.resp_expect = 0;
    c.framing = NET_FRAMING_NONE;
    c.head_length = 0;
    c.head_seen = 0;
    c.head_state = [0; 8];
    c.sk = 0;
    c.queue_ns = 0;
    c.accept_ns = 0;
    // The socket: a server's, to time how long each request waits in it (`net_data_ready`)
    // and how long the connection waited to be accepted; either side's, for its stalls.
    let sk = fd_sock(task, u64::from(fd));
    if sk != 0 && role == NET_ROLE_SERVER {
        // SAFETY: a value of the LRU map from a successful lookup, copied out at once.
        if let Some(&done) = unsafe { NET_ACCEPTING.get(sk) } {
            c.accept_ns = now.saturating_sub(done);
            let _ = NET_ACCEPTING.remove(sk);
        }
    }
    c.sk = if sk != 0 { track(sk, role) } else { 0 };
    // A reused fd whose close was missed is overwritten.
    let accept_ns = c.accept_ns;
    // The state's stores before the key's, which x86-64 keeps in order; the fence keeps the
    // compiler from moving them.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
    // SAFETY: the key word of the slot this run took (`claim_slot`), live and aligned; a
    // plain store: nobody else changes it while it says busy.
    unsafe { core::ptr::write_volatile(k, key) };
    if role == NET_ROLE_SERVER {
        emit_conn(NET_EVENT_ACCEPT, tgid, 0, (now - accept_ns, now), (0, 0), peer, (0, 0));
    }
}

/// Starts keeping the state of socket `sk` (its arrivals, its stalls) of a connection in
/// `role`; returns it, or 0 when its state cannot be kept. A server's socket takes its
/// `NET_READY` slot; a client's leaves it, if a socket at its address had it.
#[inline(always)]
fn track(sk: u64, role: u32) -> u64 {
    if NET_SK_STATE.insert(sk, NetSkState::default(), 0).is_err() {
        return 0;
    }
    if let Some(r) = ready_slot(sk) {
        if role == NET_ROLE_SERVER {
            r.ready_ns = 0;
            r.sk = sk;
        } else if r.sk == sk {
            r.sk = 0;
        }
    }
    sk_mark(sk, true);
    sk
}

/// `track` of the socket behind descriptor `fd` of `task`, the current task (0: none).
#[inline(always)]
fn track_sock(task: *const u8, fd: u32, role: u32) -> u64 {
    let sk = fd_sock(task, u64::from(fd));
    if sk != 0 { track(sk, role) } else { 0 }
}

/// A read (`inbound`) or write of `ret` bytes from or to `buf` on a tracked socket.
#[inline(always)]
fn data(c: &mut NetConn, tgid: u32, inbound: bool, buf: Buf, ret: i64) {
    if ret <= 0 {
        // End of stream: the response under way is complete. Errors (EAGAIN) change nothing.
        if ret == 0 && inbound {
            finish(c, tgid, bpf_now());
        }
        return;
    }
    let ret = ret as u64;
    let now = bpf_now();
    // A server reads its requests; a client writes them.
    let request_side = (c.role == NET_ROLE_SERVER) == inbound;
    if request_side {
        if c.phase == NET_PHASE_RESPONSE {
            finish(c, tgid, now);
        }
        // A server's socket: when the bytes this read takes arrived (and from now on,
        // arrivals are later bytes').
        let ready =
            if full_detail() && c.role == NET_ROLE_SERVER && c.sk != 0 { take_ready(c.sk) } else { 0 };
        if c.phase != NET_PHASE_REQUEST {
            if c.role == NET_ROLE_SERVER {
                c.queue_ns = if full_detail() { socket_queue(c, ready, now) } else { NET_QUEUE_UNKNOWN };
            }
            c.phase = NET_PHASE_REQUEST;
            // The server's request starts when its first bytes arrive; the client's when its
            // first write returns (timing the entry too would double the programs run per
            // request for a few microseconds of the write itself).
            // One store each (see `put`).
            put(&mut c.start_ns, now);
            put(&mut c.req_bytes, 0);
            put(&mut c.resp_bytes, 0);
            put(&mut c.resp_first_ns, 0);
            put(&mut c.resp_last_ns, 0);
            put(&mut c.status, 0);
            let (base, len) = buf.first();
            parse_request(c, base, if len < ret { len } else { ret });
            if full_detail() && c.role == NET_ROLE_CLIENT && c.sk != 0 {
                client_request(c.sk);
            }
        }
        c.req_bytes += ret;
        if !inbound && c.sk != 0 {
            after_write(c.sk, now);
        }
    } else {
        // Bytes before any request (a server greeting) are not a response.
        if c.phase == NET_PHASE_IDLE {
            return;
        }
        if c.phase == NET_PHASE_REQUEST {
            c.phase = NET_PHASE_RESPONSE;
            c.resp_first_ns = now;
            c.status = 0;
            c.framing = NET_FRAMING_NONE;
            c.resp_expect = 0;
            // Clients only: a server's response is complete when its next request begins,
            // which a keep-alive client sends at once, or its connection closes; reading the
            // heads of all its responses would cost every server request more.
            if c.method != http_method::NONE {
                if c.role == NET_ROLE_CLIENT {
                    start_response_head(c);
                } else {
                    let (base, len) = buf.first();
                    c.status = parse_status(base, if len < ret { len } else { ret });
                }
            }
        }
        // The head can come in several reads (a client reading a few bytes at a time).
        if c.framing == NET_FRAMING_HEAD {
            let (base, len) = buf.first();
            parse_response_head(c, base, if len < ret { len } else { ret });
        }
        c.resp_bytes += ret;
        c.resp_last_ns = now;
        if !inbound && c.sk != 0 {
            after_write(c.sk, now);
        }
        // A response whose framing says where it ends is reported as its last byte is read
        // or written: not later, when the connection is used again, nor never, when the
        // process exits first.
        let complete = match c.framing {
            NET_FRAMING_LENGTH => c.resp_bytes >= c.resp_expect,
            NET_FRAMING_CHUNKED => {
                let (base, len) = buf.first();
                ends_chunked(base, len, ret)
            }
            _ => false,
        };
        if complete {
            finish(c, tgid, now);
        }
    }
}

/// When the unread bytes of a server's socket `sk` first arrived (0: unknown), as a read of
/// them returns; later arrivals are later bytes'. Its `NET_READY` slot has them, or its state
/// when another socket took the slot. A socket whose state was evicted, or whose filter bit a
/// colliding socket's close cleared, is tracked again.
#[inline(always)]
fn take_ready(sk: u64) -> u64 {
    if !sk_maybe_tracked(sk) {
        sk_mark(sk, true);
    }
    if let Some(r) = ready_slot(sk)
        && r.sk == sk
    {
        return core::mem::replace(&mut r.ready_ns, 0);
    }
    match NET_SK_STATE.get_ptr_mut(sk) {
        // SAFETY: a value of the preallocated LRU map from a successful lookup: it stays
        // allocated as long as the map; plain integers.
        Some(st) => unsafe { core::mem::replace(&mut (*st).ready_ns, 0) },
        None => {
            let _ = NET_SK_STATE.insert(sk, NetSkState::default(), 0);
            0
        }
    }
}

/// How long the request a server starts to read at `now` waited in its socket: since its
/// first bytes arrived (`ready`, from `take_ready`). Its connection's first request, if
/// nothing arrived since the accept, arrived before it: it waited since the accept. Not
/// known (`NET_QUEUE_UNKNOWN`) without the socket's state, or for the first request of a
/// connection adopted from /proc, whose bytes may have arrived before its socket was known.
#[inline(always)]
fn socket_queue(c: &NetConn, ready: u64, now: u64) -> u64 {
    if c.sk == 0 {
        return NET_QUEUE_UNKNOWN;
    }
    if ready != 0 && ready <= now {
        now - ready
    } else if ready == 0 && c.start_ns == 0 {
        if c.opened_ns == 0 { NET_QUEUE_UNKNOWN } else { now.saturating_sub(c.opened_ns) }
    } else {
        0
    }
}

/// Emits the request under way on `c` if its response has started, and goes idle; `now`
/// is the current time (read once per program run).
#[inline(always)]
fn finish(c: &mut NetConn, tgid: u32, now: u64) {
    if c.phase == NET_PHASE_RESPONSE {
        // How long its bytes waited in the kernel: a server's response's, a client's request's
        // and the gap in a client's response.
        let stalls = if c.sk != 0 { take_stalls(c.sk, now, c.role == NET_ROLE_CLIENT) } else { (0, 0) };
        emit_request(c, tgid, stalls);
    }
    put(&mut c.phase, NET_PHASE_IDLE);
    // The accept queue goes with the connection's first request only.
    put(&mut c.accept_ns, 0);
    put(&mut c.queue_ns, 0);
    // Reported: the path does not stay in the connections map.
    put(&mut c.path_len, 0);
    // SAFETY: `NetConn::path` is 8-byte aligned (see `copy_words`).
    unsafe { zero_words(&mut c.path) };
}

#[inline(always)]
fn close(task: *const u8, tgid: u32, fd: u32, ret: i64) {
    let key = conn_key(tgid, fd);
    if let Some((_, c)) = slot_of(key) {
        // SAFETY: as in `data_call`.
        let c = unsafe { &mut *c };
        // The descriptor is free as `close` returns, before this program runs: another
        // thread's `accept` or `connect` may have taken its number meanwhile, its own exit
        // program first. The entry is then that new connection's, whose socket the
        // descriptor names, and it stays.
        if ret == 0 && c.sk != 0 && c.sk != NET_SK_ADOPTED && fd_sock(task, u64::from(fd)) == c.sk {
            return;
        }
        if c.sk == NET_SK_ADOPTED {
            // Adopted and closed unused: no socket state was kept, and no bit is to clear.
            c.sk = 0;
        }
        finish(c, tgid, bpf_now());
        if c.sk != 0 {
            let _ = NET_SK_STATE.remove(c.sk);
            if let Some(r) = ready_slot(c.sk)
                && r.sk == c.sk
            {
                r.sk = 0;
            }
            sk_mark(c.sk, false);
            sk_mark_stall(c.sk, false);
        }
        // Every slot with its key: one stoker adopted from /proc as the programs took one
        // for the same connection too.
        for probe in 0..NET_CONN_PROBES {
            if let Some((k, _)) = slot(key, probe) {
                swap_key(k, key, NET_SLOT_FREE);
            }
        }
    }
}
