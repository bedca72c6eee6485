//! TCP connections of target processes from their state changes: connect latency and
//! failures, then retransmits, smoothed RTT and bytes when the connection leaves ESTABLISHED.
use agent_ebpf::{NET_EVENT_CLOSE, NET_EVENT_CONNECT, stall_cause, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::{
    net::{AF_INET, AF_INET6, NetSock, Peer, emit_conn, kernel_u64, offset},
    record,
};
use crate::maps::{NET_ACCEPTING, NET_SK_STATE, NET_SOCKS, bump, is_target, sk_mark_stall, sk_maybe_tracked};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const IPPROTO_TCP: u16 = 6;

#[tracepoint]
pub fn net_sock_state(ctx: TracePointContext) -> u32 {
    if !super::net::working() {
        return 0;
    }
    try_sock_state(&ctx).unwrap_or(0)
}

fn try_sock_state(ctx: &TracePointContext) -> Result<u32, i64> {
    if record::<u16>(ctx, offset!(sk_protocol))? != IPPROTO_TCP {
        return Ok(0);
    }
    let skaddr: u64 = record(ctx, offset!(sk_skaddr))?;
    let old: i32 = record(ctx, offset!(sk_oldstate))?;
    let new: i32 = record(ctx, offset!(sk_newstate))?;
    // SAFETY: the helper takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };

    if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
        // A connection to a listening socket completed its handshake: it waits in the
        // accept queue from now (softirq context: any listener of the host; the accept of
        // a target's socket takes the entry).
        let _ = NET_ACCEPTING.insert(skaddr, now, 0);
        return Ok(0);
    }

    if new == TCP_SYN_SENT {
        // Entering SYN_SENT runs in connect(), in the connecting process.
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if !is_target(tgid) {
            return Ok(0);
        }
        let family: u16 = record(ctx, offset!(sk_family))?;
        let mut peer = Peer { family, port: record(ctx, offset!(sk_dport))?, ..Peer::UNKNOWN };
        match family {
            AF_INET => peer.addr[..4].copy_from_slice(&record::<[u8; 4]>(ctx, offset!(sk_daddr))?),
            AF_INET6 => peer.addr = record(ctx, offset!(sk_daddr_v6))?,
            _ => return Ok(0),
        }
        let sock = NetSock { tgid, retransmits: 0, syn_ns: now, est_ns: 0, peer };
        if NET_SOCKS.insert(skaddr, sock, 0).is_err() {
            bump(stat::NET_SOCKS_FULL);
        }
        return Ok(0);
    }

    // Other changes may run in softirq context: the socket, not the current task, says
    // whose connection it is.
    let Some(s) = NET_SOCKS.get_ptr_mut(skaddr) else { return Ok(0) };
    // SAFETY: a value from a successful lookup in the preallocated `NET_SOCKS`: it stays
    // allocated as long as the map, even if its entry is removed meanwhile, and is aligned plain
    // integers, valid for any bits. Only this socket's state changes and retransmits update it;
    // two of them at the same instant on two CPUs can mix up that connection's figures, never
    // reach memory outside the value.
    let s = unsafe { &mut *s };
    let peer = s.peer;
    if old == TCP_SYN_SENT {
        if new == TCP_ESTABLISHED {
            s.est_ns = now;
            emit_conn(NET_EVENT_CONNECT, s.tgid, 0, (s.syn_ns, now), (0, 0), peer, (0, 0));
        } else {
            emit_conn(NET_EVENT_CONNECT, s.tgid, 1, (s.syn_ns, now), (0, 0), peer, (0, 0));
            let _ = NET_SOCKS.remove(skaddr);
        }
    } else if old == TCP_ESTABLISHED {
        // `srtt_us` holds the smoothed RTT in microseconds, shifted left by 3.
        let srtt = (kernel_u64(skaddr, offset!(tcp_srtt_us)) & 0xffff_ffff) as u32 >> 3;
        let received = kernel_u64(skaddr, offset!(tcp_bytes_received));
        let acked = kernel_u64(skaddr, offset!(tcp_bytes_acked));
        emit_conn(
            NET_EVENT_CLOSE,
            s.tgid,
            0,
            (s.est_ns, now),
            (received, acked),
            peer,
            (s.retransmits, srtt),
        );
        let _ = NET_SOCKS.remove(skaddr);
    }
    Ok(0)
}

#[tracepoint]
pub fn net_retransmit(ctx: TracePointContext) -> u32 {
    if !super::net::working() {
        return 0;
    }
    let Ok(skaddr) = record::<u64>(&ctx, offset!(rt_skaddr)) else { return 0 };
    if let Some(s) = NET_SOCKS.get_ptr_mut(skaddr) {
        // SAFETY: as in `try_sock_state`.
        unsafe { (*s).retransmits += 1 };
    }
    // A server's socket: its bytes wait for the retransmission to be acknowledged.
    if super::net::full_detail()
        && sk_maybe_tracked(skaddr)
        && let Some(st) = NET_SK_STATE.get_ptr_mut(skaddr)
    {
        // SAFETY: a value of the preallocated LRU map from a successful lookup; plain
        // integers (see `net_data_ready`).
        let st = unsafe { &mut *st };
        // (During a write's wait for room the wait is the stall, and it goes on.)
        if st.write_full_ns == 0 {
            if st.hold_ns == 0 {
                // SAFETY: the helper takes no arguments and only reads the clock.
                st.hold_ns = unsafe { bpf_ktime_get_ns() };
            }
            st.hold_cause = stall_cause::RETRANSMIT;
            sk_mark_stall(skaddr, true);
        }
    }
    0
}
