//! Network latency of watched processes: attaches the socket system call and TCP
//! tracepoint programs, drains their events and aggregates them into `NetMetrics`.
pub mod aggregate;
pub mod existing;
pub mod hist;
pub mod report;
pub mod route;
pub mod slots;
pub mod spans;

use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use agent_ebpf::{
    MAP_NET_EVENTS, MAP_NET_SK_STATE, NET_PATH_LEN, NET_RING_HEAD, NET_RING_SLOTS, NET_RING_TAIL, NetEvent,
    PROG_NET_DATA_READY, PROG_NET_RETRANSMIT, PROG_NET_SOCK_DATA, PROG_NET_SOCK_STATE, PROG_NET_SYS_EXIT,
    PROG_NET_TCP_PROBE, PROG_NET_TCP_SENDMSG,
};
use aya::programs::{RawTracePoint, TracePoint};

pub use self::aggregate::{Aggregator, Direction, NetMetrics};
use crate::{
    error::{Error, Result},
    programs::{KernelPrograms, attach::tracepoint as attach_tracepoint, net_layout::event_slots},
    sys::{mmap::MappedArray, tracefs},
};

/// The socket system calls followed at their exit (`sys_exit_*`), where the return value and
/// the arguments (from the saved registers) are both at hand: the data calls, and the calls
/// that open and close a connection (`CONN_SYSCALLS`).
pub const SYSCALLS: [&str; 12] = [
    "read", "readv", "write", "writev", "sendto", "recvfrom", "sendmsg", "recvmsg", "accept", "accept4",
    "connect", "close",
];
/// The calls of `SYSCALLS` that open and close a connection; the data calls are followed at
/// `SOCKET_IO` instead where the kernel has it.
pub const CONN_SYSCALLS: [&str; 4] = ["accept", "accept4", "connect", "close"];
/// The raw tracepoints of a socket's receive and send (Linux 6.3+): they run for socket I/O
/// alone, not for every read and write of every file and pipe on the host.
pub const SOCKET_IO: [&str; 2] = ["sock_recv_length", "sock_send_length"];

/// The network programs attached to raw tracepoints (the others are classic tracepoints').
const RAW_PROGRAMS: [&str; 4] =
    [PROG_NET_SOCK_DATA, PROG_NET_DATA_READY, PROG_NET_TCP_PROBE, PROG_NET_TCP_SENDMSG];

/// How often the event rings are drained while a session or the agent waits for its next
/// tick: a CPU's ring holds `NET_RING_SLOTS` events, so this bounds the requests one CPU can
/// complete before events are lost (2048 in 25 ms: 80,000 per second).
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(25);

/// The attached network programs and their event stream.
pub struct NetTracer {
    /// `NET_EVENTS`, the per-CPU event rings, mapped here.
    events: MappedArray,
    cpus: u32,
    /// Attached program names, for run-time statistics.
    programs: Vec<&'static str>,
    /// `sk_data_ready` is attached (socket-queue times).
    socket_queue: bool,
    detail: NetDetail,
}

/// Whether reads and writes may be followed at `SOCKET_IO`: `STOKER_NET_HOOKS` (`auto`, the
/// default: where the kernel has them; `syscalls`: at the system call exits in any case,
/// as on kernels before 6.3).
fn socket_io_wanted() -> Result<bool> {
    switch(NET_HOOKS_ENV, ("auto", "syscalls"))
}

/// The environment variable that chooses where reads and writes are followed.
pub const NET_HOOKS_ENV: &str = "STOKER_NET_HOOKS";

/// The environment variable that empties the network programs, for benchmarks.
pub const NET_PROGRAMS_ENV: &str = "STOKER_NET_PROGRAMS";

/// Whether the network programs do their work: `STOKER_NET_PROGRAMS` (`full`, the default;
/// `empty`: each returns as it starts, so a benchmark measures what the attach points cost
/// alone; nothing is timed).
pub fn programs_work() -> Result<bool> {
    switch(NET_PROGRAMS_ENV, ("full", "empty"))
}

/// What network tracing times (`stoker record --net-detail`, `network.detail`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NetDetail {
    /// Requests and connections, and where their time went: the socket and accept queues,
    /// and stalls (bytes the kernel held back). Programs run for every TCP segment and
    /// write of the host.
    #[default]
    Full,
    /// Requests, connections and accept queues only: no socket-queue times and no stalls,
    /// and none of the programs that run for every TCP segment and write of the host.
    Requests,
}

impl NetDetail {
    /// The kernel programs' `NET_WORK` for this detail (`empty`: see `programs_work`).
    pub fn work(self, programs_work: bool) -> u32 {
        match (programs_work, self) {
            (false, _) => agent_ebpf::NET_WORK_EMPTY,
            (true, Self::Full) => agent_ebpf::NET_WORK_FULL,
            (true, Self::Requests) => agent_ebpf::NET_WORK_REQUESTS,
        }
    }
}

/// Environment variable `name` as a switch: true when unset or `on`, false when `off`; any
/// other value is refused.
fn switch(name: &str, (on, off): (&str, &str)) -> Result<bool> {
    match std::env::var(name) {
        Err(_) => Ok(true),
        Ok(v) if v == on => Ok(true),
        Ok(v) if v == off => Ok(false),
        Ok(v) => Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name} is `{v}`: expected `{on}` or `{off}`"),
        ))),
    }
}

/// Loads program `name` and attaches it to raw tracepoint `point`.
fn attach_raw(ebpf: &mut aya::Ebpf, name: &str, point: &str) -> Result<()> {
    attach_raw_all(ebpf, name, &[point])
}

/// Loads program `name` and attaches it to each raw tracepoint of `points`.
fn attach_raw_all(ebpf: &mut aya::Ebpf, name: &str, points: &[&str]) -> Result<()> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::Ebpf { what: "kernel program missing", detail: name.into() })?;
    prog.load().map_err(|e| crate::programs::attach::load_error("loading a network program", &e))?;
    for point in points {
        prog.attach(point).map_err(|e| Error::KernelFeature {
            feature: "a raw tracepoint",
            detail: format!("{point}: {}", crate::error::one_line(&e)),
        })?;
    }
    Ok(())
}

/// `attach_raw`, of a program without which `what` is unavailable (and stoker says so):
/// whether it is attached.
fn attach_optional(ebpf: &mut aya::Ebpf, name: &str, point: &str, what: &str) -> bool {
    match attach_raw(ebpf, name, point) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("{what} unavailable: {e}");
            false
        }
    }
}

/// Detaches and unloads raw tracepoint program `name`, if it is loaded.
fn unload(ebpf: &mut aya::Ebpf, name: &str) {
    if let Some(prog) = ebpf.program_mut(name).and_then(|p| <&mut RawTracePoint>::try_from(p).ok()) {
        let _ = prog.unload();
    }
}

impl NetTracer {
    /// Loads and attaches the network programs of the loaded object (so they share its
    /// target filter and counters).
    pub fn attach(programs: &mut KernelPrograms) -> Result<Self> {
        if !cfg!(target_arch = "x86_64") {
            return Err(Error::KernelFeature {
                feature: "network tracing",
                detail: "the kernel programs know x86-64 system call numbers only".into(),
            });
        }
        tracefs::ensure_mounted()
            .map_err(|e| Error::KernelFeature { feature: "tracefs (tracepoints)", detail: e.to_string() })?;
        if !programs.net_work() {
            tracing::warn!(
                "{NET_PROGRAMS_ENV}=empty: the network programs return as they start; nothing is timed"
            );
        }
        // Socket queues and stalls: their programs run for every segment and write of the host.
        let detail = programs.net_detail();
        let full = detail == NetDetail::Full;
        let feature = "the socket and TCP tracepoints";
        let loading = "loading a network program";
        // Reads and writes at the socket's own tracepoints where the kernel has both, else (or
        // when they cannot be attached) at the system call exits.
        let socket_io = socket_io_wanted()?
            && SOCKET_IO.iter().all(|point| tracefs::has_event("sock", point))
            && match attach_raw_all(programs.ebpf_mut(), PROG_NET_SOCK_DATA, &SOCKET_IO) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("reads and writes are followed at the system call exits: {e}");
                    unload(programs.ebpf_mut(), PROG_NET_SOCK_DATA);
                    false
                }
            };
        let followed: &[&str] = if socket_io { &CONN_SYSCALLS } else { &SYSCALLS };
        let exits: Vec<String> = followed.iter().map(|s| format!("sys_exit_{s}")).collect();
        let exits: Vec<(&str, &str)> = exits.iter().map(|e| ("syscalls", e.as_str())).collect();
        let required: [(&'static str, &[(&str, &str)]); 3] = [
            (PROG_NET_SYS_EXIT, &exits),
            (PROG_NET_SOCK_STATE, &[("sock", "inet_sock_set_state")]),
            (PROG_NET_RETRANSMIT, &[("tcp", "tcp_retransmit_skb")]),
        ];
        let required = required
            .iter()
            .try_for_each(|&(name, points)| attach_tracepoint(programs, name, points, feature, loading));
        if let Err(e) = required {
            // Network tracing is off: nothing of it stays attached to every socket's I/O.
            unload(programs.ebpf_mut(), PROG_NET_SOCK_DATA);
            return Err(e);
        }
        let ebpf = programs.ebpf_mut();
        // Socket-queue times need `sk_data_ready` (Linux 6.4+); without it, requests are timed
        // from their first read as before.
        let data_ready =
            full && attach_optional(ebpf, PROG_NET_DATA_READY, "sk_data_ready", "socket-queue times");
        // Stalls end when a segment arrives (`tcp_probe`).
        let probe = full && attach_optional(ebpf, PROG_NET_TCP_PROBE, "tcp_probe", "stalls");
        // Writes that wait for room in the send buffer (`tcp_sendmsg_locked`, Linux 6.1+).
        let sendmsg =
            probe && attach_optional(ebpf, PROG_NET_TCP_SENDMSG, "tcp_sendmsg_locked", "send-buffer stalls");
        let map = ebpf
            .map(MAP_NET_EVENTS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_NET_EVENTS.into() })?;
        let events = MappedArray::new(map, MAP_NET_EVENTS)?;
        // The loader sized the array for every possible CPU id (`event_slots`).
        let cpus = events.entries() / event_slots(1);
        programs.map_net_slots()?;
        let mut programs = vec![PROG_NET_SYS_EXIT, PROG_NET_SOCK_STATE, PROG_NET_RETRANSMIT];
        if socket_io {
            programs.push(PROG_NET_SOCK_DATA);
        }
        if data_ready {
            programs.push(PROG_NET_DATA_READY);
        }
        if probe {
            programs.push(PROG_NET_TCP_PROBE);
        }
        if sendmsg {
            programs.push(PROG_NET_TCP_SENDMSG);
        }
        Ok(Self { events, cpus, programs, socket_queue: data_ready, detail })
    }

    /// Where reads and writes are followed (`data_calls`).
    pub fn data_calls(&self) -> &'static str {
        data_calls(&self.programs)
    }

    /// Moves every pending event of every CPU's ring into `agg`; returns how many.
    pub fn drain(&mut self, agg: &mut Aggregator) -> usize {
        let mut n = 0;
        for cpu in 0..self.cpus {
            // SAFETY: the region of `cpu` is inside the mapping (`event_slots`); its header
            // words are 8-byte aligned (the mapping is page-aligned, events are 160 bytes) and
            // only accessed atomically; slots below the head are not written by the kernel
            // until the tail passes them.
            unsafe {
                let region = self.events.as_ptr().cast::<NetEvent>().add(event_slots(cpu) as usize);
                let header = region.cast::<u64>();
                let head = AtomicU64::from_ptr(header.add(NET_RING_HEAD)).load(Ordering::Acquire);
                let tail_word = AtomicU64::from_ptr(header.add(NET_RING_TAIL));
                let mut tail = tail_word.load(Ordering::Relaxed);
                while tail != head {
                    let slot = region.add(1 + (tail & u64::from(NET_RING_SLOTS - 1)) as usize);
                    agg.add(&std::ptr::read_volatile(slot));
                    // The path read does not stay in the array, which root could dump.
                    std::ptr::write_volatile(&raw mut (*slot).path, [0; NET_PATH_LEN]);
                    tail = tail.wrapping_add(1);
                    n += 1;
                }
                // Frees the slots read: the kernel reuses them only after this store.
                tail_word.store(tail, Ordering::Release);
            }
        }
        n
    }
}

/// Where the attached `programs` follow reads and writes: `socket tracepoints` or `system
/// call exits`.
fn data_calls(programs: &[&str]) -> &'static str {
    if programs.contains(&PROG_NET_SOCK_DATA) { "socket tracepoints" } else { "system call exits" }
}

/// Drains the network events on a thread of its own every `DRAIN_EVERY` into a shared
/// aggregator, so a long tick of the main loop (naming new stacks, exporting) cannot let
/// the rings fill.
pub struct Drainer {
    /// Locked before `aggregator` wherever both are.
    tracer: Arc<Mutex<NetTracer>>,
    aggregator: Arc<Mutex<Aggregator>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The attached programs' names, for run-time statistics.
    programs: Vec<&'static str>,
    socket_queue: bool,
    detail: NetDetail,
}

impl Drainer {
    pub fn start(tracer: NetTracer, aggregator: Aggregator) -> Result<Self> {
        let programs = tracer.programs.clone();
        let (socket_queue, detail) = (tracer.socket_queue, tracer.detail);
        let mut aggregator = aggregator;
        aggregator.no_socket_queue = !socket_queue;
        let aggregator = Arc::new(Mutex::new(aggregator));
        let tracer = Arc::new(Mutex::new(tracer));
        let stop = Arc::new(AtomicBool::new(false));
        let (rings, agg, done) = (tracer.clone(), aggregator.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("net-drain".into()).spawn(move || {
            loop {
                // Read before the drain: after `stop`, one last drain takes every event.
                let stopping = done.load(Ordering::Acquire);
                let mut tracer = rings.lock().unwrap_or_else(|e| e.into_inner());
                tracer.drain(&mut agg.lock().unwrap_or_else(|e| e.into_inner()));
                drop(tracer);
                if stopping {
                    break;
                }
                std::thread::sleep(DRAIN_EVERY);
            }
        })?;
        Ok(Self { tracer, aggregator, stop, thread: Some(thread), programs, socket_queue, detail })
    }

    /// Whether requests' time in their server's socket queue is measured.
    pub fn socket_queue(&self) -> bool {
        self.socket_queue
    }

    /// What is timed.
    pub fn detail(&self) -> NetDetail {
        self.detail
    }

    /// Where reads and writes are followed (`data_calls`).
    pub fn data_calls(&self) -> &'static str {
        data_calls(&self.programs)
    }

    /// The aggregator, locked (the drain waits meanwhile: keep it short), with every event
    /// the kernel wrote so far in it: the last requests of a process that closed its
    /// connections and exited just now are in the interval that reports its exit.
    pub fn aggregator(&self) -> MutexGuard<'_, Aggregator> {
        let mut tracer = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
        let mut aggregator = self.aggregator.lock().unwrap_or_else(|e| e.into_inner());
        tracer.drain(&mut aggregator);
        aggregator
    }

    /// Stops draining after a last drain of every ring.
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Total run time and run count of the network programs (with BPF statistics on).
    pub fn kernel_cost(&self, programs: &mut KernelPrograms) -> Option<(std::time::Duration, u64)> {
        let ebpf = programs.ebpf_mut();
        let mut total = (std::time::Duration::ZERO, 0);
        for name in &self.programs {
            let prog = ebpf.program_mut(name)?;
            let info = if RAW_PROGRAMS.contains(name) {
                <&mut RawTracePoint>::try_from(prog).ok()?.info().ok()?
            } else {
                <&mut TracePoint>::try_from(prog).ok()?.info().ok()?
            };
            total.0 += info.run_time();
            total.1 += info.run_count();
        }
        Some(total)
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Forgets the sockets process `pid` left open (it exited): a later process with its PID
/// starts with none.
pub fn forget_process(programs: &mut KernelPrograms, pid: u32) -> Result<()> {
    let Some(slots) = programs.net_slots() else { return Ok(()) };
    let stale = slots.free_process(pid);
    if stale.is_empty() {
        return Ok(());
    }
    let mut states: aya::maps::HashMap<_, u64, agent_ebpf::NetSkState> =
        programs.map_mut(MAP_NET_SK_STATE)?;
    for (_, sk) in stale.iter().filter(|(_, sk)| *sk != 0) {
        let _ = states.remove(sk);
    }
    Ok(())
}
