//! Network latency of watched processes: attaches the socket system call and TCP
//! tracepoint programs, drains their events and aggregates them into `NetMetrics`.
pub mod aggregate;
pub mod existing;
pub mod hist;
pub mod report;
pub mod route;
pub mod spans;

use std::sync::atomic::{AtomicU64, Ordering};

use agent_ebpf::{
    MAP_NET_EVENTS, NET_RING_HEAD, NET_RING_SLOTS, NET_RING_TAIL, NetEvent, NetOffsets, PROG_NET_RETRANSMIT,
    PROG_NET_SOCK_STATE, PROG_NET_SYS_EXIT,
};
use aya::{Ebpf, programs::TracePoint};

pub use self::aggregate::{Aggregator, Direction, NetMetrics, RequestKey};
use crate::{
    error::{Error, Result, one_line},
    sys::{btf::Btf, mmap::MappedArray, tracefs},
};

/// The socket system calls followed at their exit (`sys_exit_*`), where the return value and
/// the arguments (from the saved registers) are both at hand.
pub const SYSCALLS: [&str; 12] = [
    "read", "readv", "write", "writev", "sendto", "recvfrom", "sendmsg", "recvmsg", "accept", "accept4",
    "connect", "close",
];

/// The kernel structs whose member offsets the network programs need.
pub const BTF_STRUCTS: &[&str] = &["tcp_sock"];

/// Record field offsets from the tracepoints' format files and `tcp_sock` member offsets
/// from BTF. Unknown record fields keep the layout of current kernels; unknown members are
/// 0 (RTT and bytes are then not read).
pub fn offsets(btf: Option<&Btf>) -> NetOffsets {
    let mut o = NetOffsets::CURRENT_KERNELS;
    let field = |cat: &str, event: &str, name: &str, slot: &mut u32| {
        if let Ok(off) = tracefs::field_offset(cat, event, name) {
            *slot = off;
        }
    };
    let sk = [
        ("skaddr", &mut o.sk_skaddr),
        ("oldstate", &mut o.sk_oldstate),
        ("newstate", &mut o.sk_newstate),
        ("dport", &mut o.sk_dport),
        ("family", &mut o.sk_family),
        ("protocol", &mut o.sk_protocol),
        ("daddr", &mut o.sk_daddr),
        ("daddr_v6", &mut o.sk_daddr_v6),
    ];
    for (name, slot) in sk {
        field("sock", "inet_sock_set_state", name, slot);
    }
    field("tcp", "tcp_retransmit_skb", "skaddr", &mut o.rt_skaddr);
    if let Some(btf) = btf {
        let member = |m: &str| btf.member_offset("tcp_sock", m).unwrap_or(0);
        o.tcp_srtt_us = member("srtt_us");
        o.tcp_bytes_received = member("bytes_received");
        o.tcp_bytes_acked = member("bytes_acked");
    }
    o
}

/// How often the event rings are drained while a session or the agent waits for its next
/// tick: a CPU's ring holds `NET_RING_SLOTS` events, so this bounds the requests one CPU can
/// complete before events are lost (2048 in 25 ms: 80,000 per second).
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(25);

/// Elements of the `NET_EVENTS` array for `cpus` CPU ids: a header and the slots per CPU.
pub fn event_slots(cpus: u32) -> u32 {
    cpus * (NET_RING_SLOTS + 1)
}

/// The attached network programs and their event stream.
pub struct NetTracer {
    /// `NET_EVENTS`, the per-CPU event rings, mapped here.
    events: MappedArray,
    cpus: u32,
    /// Attached program names, for run-time statistics.
    programs: Vec<&'static str>,
}

impl NetTracer {
    /// Loads and attaches the network programs of a loaded object (the `Sampler`'s, so they
    /// share its target filter and counters).
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self> {
        if !cfg!(target_arch = "x86_64") {
            return Err(Error::KernelFeature {
                feature: "network tracing",
                detail: "the kernel programs know x86-64 system call numbers only".into(),
            });
        }
        tracefs::ensure_mounted()
            .map_err(|e| Error::KernelFeature { feature: "tracefs (tracepoints)", detail: e.to_string() })?;
        let mut attach = |name: &'static str, points: &[(&str, String)]| -> Result<()> {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(Error::Ebpf { what: "kernel program missing", detail: name.into() })?;
            prog.load()
                .map_err(|e| Error::Ebpf { what: "loading a network program", detail: one_line(&e) })?;
            for (category, event) in points {
                prog.attach(category, event).map_err(|e| Error::KernelFeature {
                    feature: "the socket and TCP tracepoints",
                    detail: format!("{category}:{event}: {}", one_line(&e)),
                })?;
            }
            Ok(())
        };
        let sys = |dir: &str, calls: &[&str]| {
            calls.iter().map(|s| ("syscalls", format!("sys_{dir}_{s}"))).collect::<Vec<_>>()
        };
        attach(PROG_NET_SYS_EXIT, &sys("exit", &SYSCALLS))?;
        attach(PROG_NET_SOCK_STATE, &[("sock", "inet_sock_set_state".into())])?;
        attach(PROG_NET_RETRANSMIT, &[("tcp", "tcp_retransmit_skb".into())])?;
        let map = ebpf
            .map(MAP_NET_EVENTS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_NET_EVENTS.into() })?;
        let events = MappedArray::new(map, MAP_NET_EVENTS)?;
        // The loader sized the array for every possible CPU id (`event_slots`).
        let cpus = events.entries() / event_slots(1);
        Ok(Self { events, cpus, programs: vec![PROG_NET_SYS_EXIT, PROG_NET_SOCK_STATE, PROG_NET_RETRANSMIT] })
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
                    tail = tail.wrapping_add(1);
                    n += 1;
                }
                // Frees the slots read: the kernel reuses them only after this store.
                tail_word.store(tail, Ordering::Release);
            }
        }
        n
    }

    /// Sleeps for `total`, draining the rings into `agg` every `DRAIN_EVERY`.
    pub fn sleep_draining(&mut self, agg: &mut Aggregator, total: std::time::Duration) {
        let end = std::time::Instant::now() + total;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(DRAIN_EVERY));
            self.drain(agg);
        }
    }

    /// Total run time and run count of the network programs (with BPF statistics on).
    pub fn kernel_cost(&self, ebpf: &mut Ebpf) -> Option<(std::time::Duration, u64)> {
        let mut total = (std::time::Duration::ZERO, 0);
        for name in &self.programs {
            let prog: &mut TracePoint = ebpf.program_mut(name)?.try_into().ok()?;
            let info = prog.info().ok()?;
            total.0 += info.run_time();
            total.1 += info.run_count();
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcp_sock_members_in_this_kernel() {
        let btf = Btf::from_sys_fs(BTF_STRUCTS).expect("this kernel exposes BTF");
        let o = offsets(Some(&btf));
        assert!(o.tcp_srtt_us > 1000, "tcp_sock.srtt_us at {}", o.tcp_srtt_us);
        assert!(o.tcp_bytes_received > 1000 && o.tcp_bytes_acked > 1000, "{o:?}");
    }
}
