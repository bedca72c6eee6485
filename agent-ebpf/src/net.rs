//! Network, shared with userspace: the per-connection request state and the events the
//! network programs (`programs/net*.rs`, `programs/tcp_state.rs`) send through per-CPU rings.

/// Network: per-connection request state, `NetConnSlot`s of key (tgid << 32 | fd) in an
/// open-addressed table: the first of the slots `conn_slot(key, 0..NET_CONN_PROBES)` that
/// holds the key. A read or write finds its connection with array look-ups the verifier
/// inlines (a hash map's look-up cost each of them as much as the rest of its run).
pub const MAP_NET_CONN_SLOTS: &str = "NET_CONN_SLOTS";
/// Network: completed requests, connects and closes, as `NetEvent`s in one ring per CPU
/// (see `NET_RING_SLOTS`).
pub const MAP_NET_EVENTS: &str = "NET_EVENTS";
/// The network programs: one for the socket system calls' exits, one per TCP tracepoint.
pub const PROG_NET_SYS_EXIT: &str = "net_sys_exit";
/// Raw tracepoints `sock_recv_length` and `sock_send_length` (Linux 6.3+): a socket's data
/// call returns; where they exist they time reads and writes in place of the system call
/// exits, which then follow accept, connect and close alone.
pub const PROG_NET_SOCK_DATA: &str = "net_sock_data";
pub const PROG_NET_SOCK_STATE: &str = "net_sock_state";
pub const PROG_NET_RETRANSMIT: &str = "net_retransmit";
/// Raw tracepoint `sk_data_ready`: when bytes arrive on a server's socket, the start of
/// the time they wait to be read.
pub const PROG_NET_DATA_READY: &str = "net_data_ready";
/// Raw tracepoint `tcp_probe`: a segment arrived on a TCP socket; on a server's, it ends a
/// stall (bytes the server wrote, held in the kernel until an acknowledgement).
pub const PROG_NET_TCP_PROBE: &str = "net_tcp_probe";
/// Raw tracepoint `tcp_sendmsg_locked`: a write to a TCP socket is about to queue bytes; on
/// a tracked socket whose send buffer is full, the write waits from here.
pub const PROG_NET_TCP_SENDMSG: &str = "net_tcp_sendmsg";
/// Servers' sockets: `struct sock` address -> `NetSkState`. LRU: a socket whose close was
/// not seen (its process exited) makes room in time.
pub const MAP_NET_SK_STATE: &str = "NET_SK_STATE";

/// `NetSkState::*_cause`, `NetEvent::stall_cause`: why bytes a server wrote waited in the
/// kernel. 0: no stall.
pub mod stall_cause {
    /// A segment smaller than the MSS held by Nagle's algorithm while earlier data was
    /// unacknowledged; the peer's delayed ACK (40 ms or more on Linux) releases it.
    pub const NAGLE: u32 = 1;
    /// A segment was retransmitted.
    pub const RETRANSMIT: u32 = 2;
    /// The peer's receive window was full (it does not read fast enough).
    pub const ZERO_WINDOW: u32 = 3;
    /// The congestion window was full.
    pub const CONGESTION: u32 = 4;
    /// The local send buffer was full while the peer's window and the congestion window had
    /// room (a buffer smaller than the path's bandwidth times its delay).
    pub const SEND_BUFFER: u32 = 5;
    /// Names, by cause.
    pub const NAMES: [&str; 6] =
        ["", "nagle-delayed-ack", "retransmit", "zero-window", "congestion", "send-buffer"];

    /// The name of `cause` (`other` for one this build does not know).
    pub fn name(cause: u32) -> &'static str {
        NAMES.get(cause as usize).copied().unwrap_or("other")
    }
}

/// A client's response that arrived in two parts, the rest this long after the first
/// (`NetSkState::gap_ns`), waited for the client's delayed acknowledgement: Linux delays an
/// ACK 40 ms at least and 200 ms at most, and the rest then takes a round trip. The 40 ms
/// are counted in timer ticks from within one: the ACK goes up to a tick early, 36 ms after
/// the first part at 250 Hz, 30 ms at 100 Hz (the lowest `CONFIG_HZ`). (A server that
/// pauses between two writes that long looks the same from the client's side.)
pub const NAGLE_GAP_MIN_NS: u64 = 30_000_000;
pub const NAGLE_GAP_MAX_NS: u64 = 220_000_000;

/// When the unread bytes of a server's socket first arrived (0: none since its last read),
/// kept in a slot chosen by the socket's address (`NET_READY`) where `sk_data_ready` and the
/// server's reads find it without a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NetReady {
    /// The socket whose slot it is (0: none).
    pub sk: u64,
    pub ready_ns: u64,
}
/// Slots of `NET_READY` (a power of two): 64 KiB.
pub const NET_READY_SLOTS: u32 = 4096;

/// What the programs keep per tracked socket (a server's or a client's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NetSkState {
    /// When bytes first arrived since the server's last read of the socket (0: none).
    pub ready_ns: u64,
    /// When bytes last arrived (0: none since the client's request), and the longest gap
    /// between two arrivals since then: a client's response that came in parts.
    pub last_ns: u64,
    pub gap_ns: u64,
    /// A write under way that found the send buffer full: since when (0: none); why the
    /// buffer was full the last time the write found it so, and since when; how long each
    /// cause held it full so far (zero window, congestion, send buffer).
    pub write_full_ns: u64,
    pub write_mark_ns: u64,
    pub write_by_cause: [u64; 3],
    pub write_cause: u32,
    pub _pad: u32,
    /// A stall under way: since when (0: none), and why: bytes written and held back.
    pub hold_ns: u64,
    /// Stalls that ended since the last request was reported: their time, and the cause of
    /// the longest.
    pub stall_ns: u64,
    pub longest_ns: u64,
    pub hold_cause: u32,
    pub stall_cause: u32,
}

// SAFETY: `repr(C)`, integers only, no padding: any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetSkState {}
/// Connections the kernel completed on a listening socket and nobody accepted yet:
/// `struct sock` address -> when the handshake completed (LRU).
pub const MAP_NET_ACCEPTING: &str = "NET_ACCEPTING";
/// Words of the filter in front of `MAP_NET_SK_STATE` (a power of two): 1 Mi bits, 128 KiB.
pub const NET_SK_BITS_WORDS: u32 = 16 * 1024;
const _: () = assert!(NET_SK_BITS_WORDS.is_power_of_two(), "indexed by masking");
/// Capacity of `MAP_NET_ACCEPTING`: connections waiting to be accepted on the host.
pub const NET_ACCEPTING_CAPACITY: u32 = 8 * 1024;
/// Global set by the loader: record field offsets and kernel struct offsets (`NetOffsets`).
pub const GLOBAL_NET_OFFSETS: &str = "NET_OFFSETS";
/// Global set by the loader: what the network programs do (`NET_WORK_*`).
pub const GLOBAL_NET_WORK: &str = "NET_WORK";
/// `GLOBAL_NET_WORK`: each network program returns as it starts (what the attach points cost
/// alone, for benchmarks: nothing is timed).
pub const NET_WORK_EMPTY: u32 = 0;
/// `GLOBAL_NET_WORK`: requests, socket queues and stalls are timed.
pub const NET_WORK_FULL: u32 = 1;
/// `GLOBAL_NET_WORK`: requests, connections and accept queues only: no socket-queue times
/// (their programs are not attached) and no stalls (reads, writes and retransmits look at
/// no socket state).
pub const NET_WORK_REQUESTS: u32 = 2;

/// Capacity of the per-socket state map (`MAP_NET_SK_STATE`): as many as connections.
pub const NET_SK_STATE_CAPACITY: u32 = NET_CONN_SLOT_COUNT;
/// Capacity of the connecting/established TCP sockets map (client connections).
pub const NET_SOCKS_CAPACITY: u32 = 16 * 1024;
/// Events each CPU's ring holds between two drains. `NET_EVENTS` is a memory-mappable array
/// of `NetEvent`s sized at load to `NET_RING_SLOTS + 1` elements per possible CPU: the first
/// element of a CPU's region is its header (`NET_RING_HEAD`, `NET_RING_TAIL`), the others its
/// slots. Only programs on that CPU write it (one at a time: `NET_RING_BUSY`) and only
/// userspace consumes it, so neither side takes a lock or shares a cache line with another
/// CPU; a full ring drops the event and counts it.
pub const NET_RING_SLOTS: u32 = 2048;
const _: () = assert!(NET_RING_SLOTS.is_power_of_two(), "slots are indexed by masking");
/// Header words of a CPU's ring: events written so far (kernel), events consumed (userspace).
/// A cache line apart.
pub const NET_RING_HEAD: usize = 0;
pub const NET_RING_TAIL: usize = 8;
/// Header word set while a program of that CPU writes a slot (kernel only): a program that
/// runs on top of it (a classic tracepoint's in a softirq, while a raw tracepoint's run was
/// under way) drops its event rather than write the same slot.
pub const NET_RING_BUSY: usize = 16;
/// Bytes of an HTTP request path kept (cut at `?`, never a query string).
pub const NET_PATH_LEN: usize = 64;
const _: () = assert!(NET_PATH_LEN.is_multiple_of(8), "paths are copied a word at a time");
/// Bytes read at the start of a request to recognize an HTTP/1.x request line (onto the
/// program's stack: a multiple of 8).
pub const NET_PEEK_LEN: usize = 80;
const _: () = assert!(NET_PEEK_LEN.is_multiple_of(8), "read into words");

/// Record field offsets of the TCP tracepoints and `tcp_sock` member offsets (from BTF; 0 when
/// unknown) the network programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetOffsets {
    /// `sock:inet_sock_set_state` fields.
    pub sk_skaddr: u32,
    pub sk_oldstate: u32,
    pub sk_newstate: u32,
    pub sk_dport: u32,
    pub sk_family: u32,
    pub sk_protocol: u32,
    pub sk_daddr: u32,
    pub sk_daddr_v6: u32,
    /// `tcp:tcp_retransmit_skb` field `skaddr`.
    pub rt_skaddr: u32,
    /// `struct tcp_sock` members.
    pub tcp_srtt_us: u32,
    pub tcp_bytes_received: u32,
    pub tcp_bytes_acked: u32,
    /// Where a server's written bytes are: last byte written, next to send, oldest
    /// unacknowledged; the peer's window, the congestion window, segments in flight and
    /// the MSS (`tcp_sock` members).
    pub tcp_write_seq: u32,
    pub tcp_snd_nxt: u32,
    pub tcp_snd_una: u32,
    pub tcp_snd_wnd: u32,
    pub tcp_snd_cwnd: u32,
    pub tcp_packets_out: u32,
    pub tcp_mss_cache: u32,
    /// Bytes queued for sending and the send buffer's size (`struct sock` members).
    pub sk_wmem_queued: u32,
    pub sk_sndbuf: u32,
    /// The queue of a socket's written bytes not sent yet (`struct sock` member, an
    /// `sk_buff_head`: its first word points to itself when the queue is empty).
    pub sk_write_queue: u32,
}
const _: () = assert!(core::mem::size_of::<NetOffsets>() == 88);

// SAFETY: `repr(C)`, integers only, no padding (size asserted): any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetOffsets {}

impl NetOffsets {
    /// The record layout of current kernels, kept where a format file cannot be read;
    /// no `tcp_sock` members (RTT and bytes are not read without BTF).
    pub const CURRENT_KERNELS: Self = Self {
        sk_skaddr: 8,
        sk_oldstate: 16,
        sk_newstate: 20,
        sk_dport: 26,
        sk_family: 28,
        sk_protocol: 30,
        sk_daddr: 36,
        sk_daddr_v6: 56,
        rt_skaddr: 16,
        tcp_srtt_us: 0,
        tcp_bytes_received: 0,
        tcp_bytes_acked: 0,
        tcp_write_seq: 0,
        tcp_snd_nxt: 0,
        tcp_snd_una: 0,
        tcp_snd_wnd: 0,
        tcp_snd_cwnd: 0,
        tcp_packets_out: 0,
        tcp_mss_cache: 0,
        sk_wmem_queued: 0,
        sk_sndbuf: 0,
        sk_write_queue: 0,
    };
}

/// `NetConn::role` / `NetEvent::role`: the process accepted the connection (it serves).
pub const NET_ROLE_SERVER: u32 = 1;
/// The process connected (it is the client).
pub const NET_ROLE_CLIENT: u32 = 2;

/// `NetConn::framing`: the response's end is not known from its bytes: it ends with the
/// last bytes before the next request or the connection's close.
pub const NET_FRAMING_NONE: u32 = 0;
/// Complete once `NetConn::resp_expect` bytes (HTTP/1.x `Content-Length`, or headers alone
/// for a HEAD request, a 204 or a 304).
pub const NET_FRAMING_LENGTH: u32 = 1;
/// Complete with the last chunk (`0\r\n\r\n` ending a read or write of it).
pub const NET_FRAMING_CHUNKED: u32 = 2;
/// The response's head (status line and headers) is still being read: its framing is not
/// known yet.
pub const NET_FRAMING_HEAD: u32 = 3;
/// Bytes of one read or write searched for the end of a response's head and its framing
/// (`Content-Length`, `Transfer-Encoding: chunked`); a head that goes on past this in one
/// call, or past `NET_HEAD_MAX` in all, gives `NET_FRAMING_NONE`.
pub const NET_HEAD_LEN: usize = 512;
/// Longest response head followed over several reads.
pub const NET_HEAD_MAX: u32 = 8192;
/// Size of the per-CPU buffer the headers are copied to: twice `NET_HEAD_LEN`, so that a
/// masked index plus the few bytes compared after it stays inside.
pub const NET_HEAD_BUF: usize = 2 * NET_HEAD_LEN;

/// `NetConn::phase`: no request under way.
pub const NET_PHASE_IDLE: u32 = 0;
/// The request is being read (server) or written (client).
pub const NET_PHASE_REQUEST: u32 = 1;
/// The response is being written (server) or read (client).
pub const NET_PHASE_RESPONSE: u32 = 2;

/// State of one tracked socket of a target process, owned by the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetConn {
    /// What every read and write of the connection looks at or changes comes first, in
    /// as few cache lines as the map's element layout allows.
    pub role: u32,
    pub phase: u32,
    /// First and last response bytes: read returned (client) or written (server).
    pub resp_last_ns: u64,
    pub resp_bytes: u64,
    pub req_bytes: u64,
    /// Request start: first byte read (server) or first write returned (client).
    pub start_ns: u64,
    pub resp_first_ns: u64,
    /// HTTP status of the response, 0 when not HTTP.
    pub status: u32,
    /// `http_method::*` of the request, 0 when not HTTP.
    pub method: u32,
    pub path_len: u32,
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Remote address (IPv4 in the first 4 bytes) and port (host order).
    pub addr: [u8; 16],
    /// When the connection was accepted or connected; 0 for one adopted from /proc (opened
    /// before the session, when is not known).
    pub opened_ns: u64,
    /// Response bytes (status line and headers included) after which the response is
    /// complete, from its framing (`framing` is `NET_FRAMING_LENGTH`).
    pub resp_expect: u64,
    /// While the response's head is read (`NET_FRAMING_HEAD`): its `Content-Length` so far
    /// (`u64::MAX`: none), the head's bytes looked at, and the scan's state between reads.
    pub head_length: u64,
    pub head_seen: u32,
    /// `NET_FRAMING_*`: how the end of the response under way is recognized.
    pub framing: u32,
    pub head_state: [u8; 8],
    /// The socket's `struct sock` (0: unknown; `NET_SK_ADOPTED`: to be looked up at the
    /// connection's next data call). Server: how long the request under way waited in it
    /// before its first read (socket queue, `NET_QUEUE_UNKNOWN` when not known), and how
    /// long the connection waited to be accepted (accept queue; reported with its first
    /// request only).
    pub sk: u64,
    pub queue_ns: u64,
    pub accept_ns: u64,
    pub path: [u8; NET_PATH_LEN],
}
const _: () = assert!(core::mem::size_of::<NetConn>() == 48 + 16 + 4 + 20 + 32 + 24 + 64);

/// Slots of `MAP_NET_CONN_SLOTS` (a power of two): 3.4 MiB.
pub const NET_CONN_SLOT_COUNT: u32 = 16 * 1024;
const _: () = assert!(NET_CONN_SLOT_COUNT.is_power_of_two(), "indexed by masking");
/// Slots a connection may take, from `conn_slot(key, 0)` on: a connection that finds them
/// all taken is not followed (and counted, `stat::NET_CONNS_FULL`).
pub const NET_CONN_PROBES: u32 = 4;

/// `NetConnSlot::key` of a free slot.
pub const NET_SLOT_FREE: u64 = 0;
/// `NetConnSlot::key` of a slot whose connection is being written: nobody's until the
/// writer stores its key.
pub const NET_SLOT_BUSY: u64 = u64::MAX;

/// A connection's state in its slot: `key` (tgid << 32 | fd) says whose it is. Taken and
/// given back with compare-and-exchange on `key`: by the programs at accept, connect and
/// close, and by stoker for connections opened before the session and for a process that
/// exited.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetConnSlot {
    pub key: u64,
    pub conn: NetConn,
}
const _: () = assert!(core::mem::size_of::<NetConnSlot>() == 8 + core::mem::size_of::<NetConn>());

// SAFETY: `repr(C)`, a `u64` and a `NetConn` (Pod, a multiple of 8 bytes), no padding (size
// asserted): any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetConnSlot {}

/// Slot `probe` (`0..NET_CONN_PROBES`) of connection `key` (tgid << 32 | fd): from the
/// descriptor spread by the process, on.
#[inline(always)]
pub fn conn_slot(key: u64, probe: u32) -> u32 {
    let (tgid, fd) = ((key >> 32) as u32, key as u32);
    fd.wrapping_add(tgid.wrapping_mul(0x9e37_79b1)).wrapping_add(probe) & (NET_CONN_SLOT_COUNT - 1)
}

/// `NetConn::sk` of a connection adopted from /proc, which does not say where its socket is:
/// the program looks it up at the connection's first data call, in the owner's context
/// (not a kernel address: those are far above).
pub const NET_SK_ADOPTED: u64 = 1;

/// `NetConn::queue_ns` and `NetEvent::queue_ns` of a request whose wait in the socket is
/// not known: its socket's arrivals were not followed (the first request read on a
/// connection adopted from /proc, a socket whose state could not be kept).
pub const NET_QUEUE_UNKNOWN: u64 = u64::MAX;
// The kernel copies these a word at a time.
const _: () =
    assert!(core::mem::offset_of!(NetConn, addr) % 8 == 0 && core::mem::offset_of!(NetConn, path) % 8 == 0);

// SAFETY: `repr(C)`, integers and byte arrays, no padding (size asserted): any bit pattern is a
// valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetConn {}

/// HTTP request methods recognized in the kernel (`NetConn::method`).
pub mod http_method {
    pub const NONE: u32 = 0;
    pub const GET: u32 = 1;
    pub const POST: u32 = 2;
    pub const PUT: u32 = 3;
    pub const DELETE: u32 = 4;
    pub const HEAD: u32 = 5;
    pub const PATCH: u32 = 6;
    pub const OPTIONS: u32 = 7;
    pub const NAMES: [&str; 8] = ["", "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"];
}

/// `NetEvent::kind`: a request and its response completed on a connection.
pub const NET_EVENT_REQUEST: u32 = 1;
/// A TCP connect finished (`status` 0: established, 1: failed).
pub const NET_EVENT_CONNECT: u32 = 2;
/// A tracked connection closed (client connections: lifetime, retransmits, RTT, bytes).
pub const NET_EVENT_CLOSE: u32 = 3;
/// A connection was accepted.
pub const NET_EVENT_ACCEPT: u32 = 4;

/// One event from the network programs. Requests carry only the method, the path up to
/// `?` (at most `NET_PATH_LEN` bytes), the status, sizes and times: never headers or bodies.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetEvent {
    pub kind: u32,
    pub tgid: u32,
    pub role: u32,
    /// Request: HTTP status (0 if none). Connect: 0 established, 1 failed.
    pub status: u32,
    /// Request: start, first and last response byte. Connect: SYN sent, then the outcome
    /// (both `resp_*`). Close: established, then closed.
    pub start_ns: u64,
    pub resp_first_ns: u64,
    pub resp_last_ns: u64,
    /// Request: request and response bytes. Close: bytes received and acknowledged.
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub method: u32,
    pub path_len: u32,
    /// Close: retransmitted segments and smoothed RTT in microseconds.
    pub retransmits: u32,
    pub srtt_us: u32,
    /// Server request: `stall_cause::*` of its longest stall (0: none).
    pub stall_cause: u32,
    /// Server request: socket queue (`NET_QUEUE_UNKNOWN`: not known), and accept queue
    /// (first request of a connection). Accept: the accept queue.
    pub queue_ns: u64,
    pub accept_ns: u64,
    /// Server request: time its response's bytes were held in the kernel (stalls).
    pub stall_ns: u64,
    pub path: [u8; NET_PATH_LEN],
}
const _: () = assert!(core::mem::size_of::<NetEvent>() == 56 + 16 + 4 + 20 + 24 + 64);
const _: () =
    assert!(core::mem::offset_of!(NetEvent, addr) % 8 == 0 && core::mem::offset_of!(NetEvent, path) % 8 == 0);

// SAFETY: `repr(C)`, integers and byte arrays, the padding an explicit field (size asserted): any
// bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetEvent {}
