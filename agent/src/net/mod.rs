//! Network latency of watched processes: attaches the socket system call and TCP
//! tracepoint programs, drains their events and aggregates them into `NetMetrics`.
pub mod aggregate;
pub mod existing;
pub mod hist;
pub mod report;
pub mod route;
pub mod spans;

use agent_ebpf::{
    MAP_NET_EVENTS, NetOffsets, PROG_NET_RETRANSMIT, PROG_NET_SOCK_STATE, PROG_NET_SYS_ENTER,
    PROG_NET_SYS_EXIT,
};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::TracePoint,
};

pub use self::aggregate::{Aggregator, Direction, NetMetrics, RequestKey};
use crate::{
    error::{Error, Result, one_line},
    sys::{btf::Btf, tracefs},
};

/// The socket system calls followed at their exit (`sys_exit_*`), where the return value and
/// the arguments (from the saved registers) are both at hand.
pub const SYSCALLS: [&str; 12] = [
    "read", "readv", "write", "writev", "sendto", "recvfrom", "sendmsg", "recvmsg", "accept", "accept4",
    "connect", "close",
];

/// The calls also followed at their entry (`sys_enter_*`): a client's request starts when
/// its first write is entered.
pub const WRITE_SYSCALLS: [&str; 4] = ["write", "writev", "sendto", "sendmsg"];

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

/// The attached network programs and their event stream.
pub struct NetTracer {
    events: RingBuf<MapData>,
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
        attach(PROG_NET_SYS_ENTER, &sys("enter", &WRITE_SYSCALLS))?;
        attach(PROG_NET_SYS_EXIT, &sys("exit", &SYSCALLS))?;
        attach(PROG_NET_SOCK_STATE, &[("sock", "inet_sock_set_state".into())])?;
        attach(PROG_NET_RETRANSMIT, &[("tcp", "tcp_retransmit_skb".into())])?;
        let map = ebpf
            .take_map(MAP_NET_EVENTS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_NET_EVENTS.into() })?;
        let events = RingBuf::try_from(map)
            .map_err(|e| Error::Ebpf { what: "kernel map has the wrong type", detail: one_line(&e) })?;
        Ok(Self {
            events,
            programs: vec![PROG_NET_SYS_ENTER, PROG_NET_SYS_EXIT, PROG_NET_SOCK_STATE, PROG_NET_RETRANSMIT],
        })
    }

    /// Moves every pending event into `agg`; returns how many.
    pub fn drain(&mut self, agg: &mut Aggregator) -> usize {
        let mut n = 0;
        while let Some(item) = self.events.next() {
            agg.add_bytes(&item);
            n += 1;
        }
        n
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
