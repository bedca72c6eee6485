//! Types shared between stoker's kernel programs and its userspace agent.
//! Every type is `#[repr(C)]`, `Copy`, padded explicitly and size-checked.
#![no_std]

/// Map of target processes: tgid -> `TARGET_*` flag bits.
pub const MAP_TARGETS: &str = "TARGETS";
/// The same set as one bit per tgid (word `tgid / 64`, bit `tgid % 64`): the programs that
/// run on every call of every process test it first, at the cost of an array index instead
/// of a hash lookup. Memory-mappable, so userspace flips bits atomically.
pub const MAP_TARGET_BITS: &str = "TARGET_BITS";
/// Stack-trace map holding user and kernel stacks by id.
pub const MAP_STACKS: &str = "STACKS";
/// Sample counts aggregated in the kernel: `SampleKey` -> per-CPU count.
pub const MAP_COUNTS: &str = "COUNTS";
/// Per-CPU counters, indexed by the `stat` constants.
pub const MAP_STATS: &str = "STATS";
/// Python processes to walk: tgid -> `PyProc`.
pub const MAP_PY_PROCS: &str = "PY_PROCS";
/// Python stacks by hash: u64 -> `PyStack`.
pub const MAP_PY_STACKS: &str = "PY_STACKS";
/// Cache of each Python thread's `PyThreadState`: tid -> address.
pub const MAP_PY_THREADS: &str = "PY_THREADS";
/// The CPU-sampling perf-event program.
pub const PROG_PERF_SAMPLE: &str = "perf_sample";
/// Processes that called exec since userspace last looked: tgid -> 0.
pub const MAP_EXECS: &str = "EXECS";
/// The exec-watching tracepoint program (`sched:sched_process_exec`).
pub const PROG_SCHED_EXEC: &str = "sched_exec";
/// Global set by the loader: offset of `thread.fsbase` in `task_struct` (from BTF).
pub const GLOBAL_FSBASE_OFFSET: &str = "FSBASE_OFFSET";
/// Global set by the loader: 1 to time each target sample (`stat::TARGET_NS`).
pub const GLOBAL_MEASURE_COST: &str = "MEASURE_COST";
/// An empty program, run to measure what the run-time statistics add to each run.
pub const PROG_STATS_FLOOR: &str = "stats_floor";
/// The child-following tracepoint program (`task:task_newtask`).
pub const PROG_TASK_NEWTASK: &str = "task_newtask";
/// Globals set by the loader: field offsets of the `task_newtask` record (format file).
pub const GLOBAL_NEWTASK_PID_OFFSET: &str = "NEWTASK_PID_OFFSET";
pub const GLOBAL_NEWTASK_FLAGS_OFFSET: &str = "NEWTASK_FLAGS_OFFSET";

/// Network: per-connection request state, (tgid << 32 | fd) -> `NetConn`.
pub const MAP_NET_CONNS: &str = "NET_CONNS";
/// Network: completed requests, connects and closes, as `NetEvent`s in one ring per CPU
/// (see `NET_RING_SLOTS`).
pub const MAP_NET_EVENTS: &str = "NET_EVENTS";
/// The network programs: one for the socket system calls' exits, one per TCP tracepoint.
pub const PROG_NET_SYS_EXIT: &str = "net_sys_exit";
pub const PROG_NET_SOCK_STATE: &str = "net_sock_state";
pub const PROG_NET_RETRANSMIT: &str = "net_retransmit";
/// Global set by the loader: record field offsets and kernel struct offsets (`NetOffsets`).
pub const GLOBAL_NET_OFFSETS: &str = "NET_OFFSETS";

/// `TARGETS` flag: sample this process.
pub const TARGET_SAMPLE: u32 = 1;
/// `TARGETS` flag: processes it creates become targets with the same flags.
pub const TARGET_FOLLOW: u32 = 2;

/// Capacity of the stack-trace map (unique stacks).
pub const STACKS_CAPACITY: u32 = 16 * 1024;
/// Capacity of the counts map (unique thread/stack pairs).
pub const COUNTS_CAPACITY: u32 = 64 * 1024;
/// Capacity of the targets map (processes sampled at once).
pub const TARGETS_CAPACITY: u32 = 8 * 1024;
/// Words of `TARGET_BITS`: one bit for every possible tgid (`PID_MAX_LIMIT` on 64-bit
/// kernels is 4 Mi), 512 KiB.
pub const TARGET_BITS_WORDS: u32 = 4 * 1024 * 1024 / 64;
/// Capacity of the exec notification set (execs between two userspace ticks).
pub const EXECS_CAPACITY: u32 = 4 * 1024;
/// Capacity of the Python stacks map (unique Python stacks).
pub const PY_STACKS_CAPACITY: u32 = 8 * 1024;
/// Capacity of the Python thread-state cache.
pub const PY_THREADS_CAPACITY: u32 = 16 * 1024;
/// Python frames kept per sample; deeper stacks lose their root end and are marked.
pub const PY_MAX_FRAMES: usize = 128;
const _: () = assert!(PY_MAX_FRAMES.is_power_of_two(), "the walker masks frame indexes");
/// Threads of one interpreter searched for the sampled thread's `PyThreadState`.
pub const PY_MAX_THREADS: u32 = 128;
/// Offset value meaning "this CPython version has no such field".
pub const NO_FIELD: u32 = u32::MAX;

/// Indexes into the per-CPU stats array.
pub mod stat {
    /// Samples taken in a target process.
    pub const SAMPLES: u32 = 0;
    /// Samples whose user stack could not be read (no frames reachable).
    pub const USER_STACK_MISSING: u32 = 1;
    /// Samples whose user or kernel stack was dropped: stack map bucket taken or full.
    pub const STACK_DROPPED: u32 = 2;
    /// Samples dropped because the counts map was full.
    pub const COUNTS_FULL: u32 = 3;
    /// Samples of a Python process whose thread state was not found (thread not running Python).
    pub const PY_NO_THREAD: u32 = 4;
    /// Python stacks deeper than `PY_MAX_FRAMES`, cut at the root end.
    pub const PY_TRUNCATED: u32 = 5;
    /// Python frames whose memory could not be read (the walk stopped there).
    pub const PY_READ_ERROR: u32 = 6;
    /// Python stacks dropped because the Python stacks map was full.
    pub const PY_STACKS_FULL: u32 = 7;
    /// Samples with a Python stack.
    pub const PY_SAMPLES: u32 = 8;
    /// Children not followed because the targets map was full.
    pub const TARGETS_FULL: u32 = 9;
    /// Nanoseconds spent handling target samples, from entry to exit (with `MEASURE_COST`).
    pub const TARGET_NS: u32 = 10;
    /// Python frames whose prefix could not be read at once (read field by field instead).
    pub const PY_FRAME_SLOW_READS: u32 = 11;
    /// Network events lost because their CPU's event ring was full.
    pub const NET_EVENTS_LOST: u32 = 12;
    /// Connections not tracked because the connections map was full.
    pub const NET_CONNS_FULL: u32 = 13;
    /// TCP connects not tracked because the sockets map was full.
    pub const NET_SOCKS_FULL: u32 = 14;
    /// Exec notifications lost because the set was full (found by the next /proc scan).
    pub const EXECS_FULL: u32 = 15;
    /// Number of counters.
    pub const COUNT: u32 = 16;
}

/// Key of the kernel-side aggregation: one thread, one user stack, one kernel stack, one
/// Python stack. A stack id is negative when that stack is absent (`NO_STACK`) or was
/// dropped; `py_stack` is 0 when there is no Python stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub tgid: u32,
    pub tid: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
    pub py_stack: u64,
}
const _: () = assert!(core::mem::size_of::<SampleKey>() == 24);

/// How a CPython frame records its current instruction (`PyOffsets::instr_kind`).
pub mod instr_kind {
    /// 3.8-3.9: `int f_lasti`, bytes.
    pub const LASTI_BYTES: u32 = 0;
    /// 3.10: `int f_lasti`, 2-byte code units.
    pub const LASTI_UNITS: u32 = 1;
    /// 3.11+: a pointer to the instruction (`prev_instr` or `instr_ptr`).
    pub const POINTER: u32 = 2;
}

/// CPython structure offsets the kernel walker needs, from userspace (`NO_FIELD` = absent).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyOffsets {
    pub interp_next: u32,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_thread_id: u32,
    /// `frame` (3.8-3.10), `cframe` (3.11-3.12), `current_frame` (3.13+).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame` (3.11-3.12).
    pub cframe_current_frame: u32,
    pub frame_previous: u32,
    pub frame_code: u32,
    pub frame_instr: u32,
    /// `instr_kind::*`.
    pub instr_kind: u32,
    pub frame_owner: u32,
    pub frame_is_entry: u32,
    /// Lowest `owner` value of shim frames that are not Python frames (3.12+), or `NO_FIELD`.
    pub owner_cstack: u32,
    pub code_firstlineno: u32,
    /// Offset of the bytecode inside the code object (3.11+).
    pub code_adaptive: u32,
    /// 1 when every frame is evaluated by its own C call (3.8-3.10).
    pub every_frame_entry: u32,
    /// Bytes from a frame's start that cover every field read (at most `PY_FRAME_CHUNK`;
    /// 0: read fields one by one). One read of them replaces several small ones.
    pub frame_read_size: u32,
    pub _pad: u32,
    /// Bits to clear from `f_executable` (3.14 stack references).
    pub executable_tag_mask: u64,
}
const _: () = assert!(core::mem::size_of::<PyOffsets>() == 80);

/// Largest frame prefix the walker reads at once.
pub const PY_FRAME_CHUNK: usize = 128;

/// `PyProc::flags` bit: also record native (user and kernel) stacks of samples that
/// have a Python stack. Without it those samples cost only the Python walk.
pub const PY_PROC_NATIVE: u32 = 1;

/// One Python process for the kernel walker.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyProc {
    /// Address of `_PyRuntime.interpreters.head` in the process.
    pub interp_head_addr: u64,
    pub offsets: PyOffsets,
    /// `PY_PROC_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PyProc>() == 96);

/// `PyFrame::flags` bit: this frame was entered by its own C-level eval call.
pub const PY_FRAME_ENTRY: u32 = 1;

/// One Python frame as sampled: the code object, the instruction's byte offset in its
/// bytecode, and `co_firstlineno` to detect a code object freed and its address reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub code: u64,
    pub instr_offset: u32,
    /// Low 24 bits: `co_firstlineno`; high 8 bits: `PY_FRAME_*` flags.
    pub line_flags: u32,
}
const _: () = assert!(core::mem::size_of::<PyFrame>() == 16);

impl PyFrame {
    pub fn first_line(&self) -> u32 {
        self.line_flags & 0x00ff_ffff
    }

    pub fn flags(&self) -> u32 {
        self.line_flags >> 24
    }
}

/// `PyStack::flags` bit: the walk hit `PY_MAX_FRAMES`; the root end is missing.
pub const PY_STACK_TRUNCATED: u32 = 1;
/// `PyStack::flags` bit: a read failed; the root end is missing.
pub const PY_STACK_READ_ERROR: u32 = 2;

/// A Python stack, leaf first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStack {
    pub len: u32,
    pub flags: u32,
    pub frames: [PyFrame; PY_MAX_FRAMES],
}
const _: () = assert!(core::mem::size_of::<PyStack>() == 8 + 16 * PY_MAX_FRAMES);

/// Stack id recorded when there is no stack of that kind (e.g. no kernel frames).
pub const NO_STACK: i32 = -1;
/// Stack id recorded when the stack existed but could not be stored.
pub const DROPPED_STACK: i32 = -2;

/// Capacity of the per-connection state map (open sockets of target processes).
pub const NET_CONNS_CAPACITY: u32 = 16 * 1024;
/// Capacity of the connecting/established TCP sockets map (client connections).
pub const NET_SOCKS_CAPACITY: u32 = 16 * 1024;
/// Events each CPU's ring holds between two drains. `NET_EVENTS` is a memory-mappable array
/// of `NetEvent`s sized at load to `NET_RING_SLOTS + 1` elements per possible CPU: the first
/// element of a CPU's region is its header (`NET_RING_HEAD`, `NET_RING_TAIL`), the others its
/// slots. Only programs on that CPU write it (they never nest on one CPU) and only userspace
/// consumes it, so neither side takes a lock or shares a cache line with another CPU; a
/// full ring drops the event and counts it.
pub const NET_RING_SLOTS: u32 = 2048;
const _: () = assert!(NET_RING_SLOTS.is_power_of_two(), "slots are indexed by masking");
/// Header words of a CPU's ring: events written so far (kernel), events consumed (userspace).
/// A cache line apart.
pub const NET_RING_HEAD: usize = 0;
pub const NET_RING_TAIL: usize = 8;
/// Bytes of an HTTP request path kept (cut at `?`, never a query string).
pub const NET_PATH_LEN: usize = 64;
/// Bytes peeked at the start of a request or response to recognize HTTP/1.x.
pub const NET_PEEK_LEN: usize = 80;
/// Size of the per-CPU peek buffer: a power of two above `NET_PEEK_LEN`, so masked
/// indexes stay inside it.
pub const NET_PEEK_BUF: usize = 128;

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
}
const _: () = assert!(core::mem::size_of::<NetOffsets>() == 48);

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
    };
}

/// `NetConn::role` / `NetEvent::role`: the process accepted the connection (it serves).
pub const NET_ROLE_SERVER: u32 = 1;
/// The process connected (it is the client).
pub const NET_ROLE_CLIENT: u32 = 2;

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
    /// When the connection was accepted or connected.
    pub opened_ns: u64,
    pub path: [u8; NET_PATH_LEN],
}
const _: () = assert!(core::mem::size_of::<NetConn>() == 48 + 16 + 4 + 20 + 64);
// The kernel copies these a word at a time.
const _: () =
    assert!(core::mem::offset_of!(NetConn, addr) % 8 == 0 && core::mem::offset_of!(NetConn, path) % 8 == 0);

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
    pub _pad: u32,
    pub path: [u8; NET_PATH_LEN],
}
const _: () = assert!(core::mem::size_of::<NetEvent>() == 56 + 16 + 4 + 20 + 64);
const _: () =
    assert!(core::mem::offset_of!(NetEvent, addr) % 8 == 0 && core::mem::offset_of!(NetEvent, path) % 8 == 0);
const _: () = assert!(NET_PATH_LEN.is_multiple_of(8));

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::NetOffsets {}
    unsafe impl aya::Pod for super::NetConn {}
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::PyProc {}
    unsafe impl aya::Pod for super::PyStack {}
}
