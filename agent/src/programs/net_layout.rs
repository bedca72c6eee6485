//! Where the network programs find their data in this kernel (tracepoint record fields,
//! `tcp_sock` members) and how large their event rings are: set when the object loads.
use agent_ebpf::{NET_RING_SLOTS, NetOffsets};

use crate::sys::{btf::Btf, tracefs};

/// The kernel structs whose member offsets the network programs need.
pub(crate) const BTF_STRUCTS: &[&str] = &["tcp_sock", "sock"];

/// Record field offsets from the tracepoints' format files and `tcp_sock` member offsets
/// from BTF. Unknown record fields keep the layout of current kernels; unknown members are
/// 0 (RTT and bytes are then not read).
pub(crate) fn offsets(btf: Option<&Btf>) -> NetOffsets {
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
        // Stalls are looked for only when every member is known.
        let stalls = ["write_seq", "snd_nxt", "snd_una", "snd_wnd", "snd_cwnd", "packets_out", "mss_cache"]
            .map(member);
        if stalls.iter().all(|&off| off > 0) {
            [
                o.tcp_write_seq,
                o.tcp_snd_nxt,
                o.tcp_snd_una,
                o.tcp_snd_wnd,
                o.tcp_snd_cwnd,
                o.tcp_packets_out,
                o.tcp_mss_cache,
            ] = stalls;
            // Written bytes not sent yet, seen with one read (0: the sequence numbers say).
            o.sk_write_queue = btf.member_offset("sock", "sk_write_queue").unwrap_or(0);
            // Writes that wait for room in the send buffer, likewise.
            let buffer = ["sk_wmem_queued", "sk_sndbuf"].map(|m| btf.member_offset("sock", m).unwrap_or(0));
            if buffer.iter().all(|&off| off > 0) {
                [o.sk_wmem_queued, o.sk_sndbuf] = buffer;
            }
        }
    }
    o
}

/// Elements of the `NET_EVENTS` array for `cpus` CPU ids: a header and the slots per CPU.
pub fn event_slots(cpus: u32) -> u32 {
    cpus * (NET_RING_SLOTS + 1)
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
        assert!(o.tcp_write_seq > 1000 && o.tcp_snd_nxt > 1000 && o.tcp_mss_cache > 1000, "{o:?}");
        assert!(o.sk_wmem_queued > 100 && o.sk_sndbuf > 100 && o.sk_wmem_queued < 1000, "{o:?}");
        assert!(o.sk_write_queue > 100 && o.sk_write_queue < 1000, "{o:?}");
    }
}
