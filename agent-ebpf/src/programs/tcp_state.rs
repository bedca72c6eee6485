//! TCP connections of target processes from their state changes: connect latency and
//! failures, then retransmits, smoothed RTT and bytes when the connection leaves ESTABLISHED.
use agent_ebpf::{NET_EVENT_CLOSE, NET_EVENT_CONNECT, NET_ROLE_CLIENT, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::net::{AF_INET, AF_INET6, NetSock, emit_conn, kernel_u64, offset};
use crate::maps::{NET_SOCKS, bump, is_target};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const IPPROTO_TCP: u16 = 6;

#[tracepoint]
pub fn net_sock_state(ctx: TracePointContext) -> u32 {
    try_sock_state(&ctx).unwrap_or(0)
}

fn try_sock_state(ctx: &TracePointContext) -> Result<u32, i64> {
    let read_u16 = |off: usize| unsafe { ctx.read_at::<u16>(off) }.map_err(|e| e as i64);
    let read_i32 = |off: usize| unsafe { ctx.read_at::<i32>(off) }.map_err(|e| e as i64);
    if read_u16(offset!(sk_protocol))? != IPPROTO_TCP {
        return Ok(0);
    }
    let skaddr: u64 = unsafe { ctx.read_at(offset!(sk_skaddr)) }.map_err(|e| e as i64)?;
    let old = read_i32(offset!(sk_oldstate))?;
    let new = read_i32(offset!(sk_newstate))?;
    let now = unsafe { bpf_ktime_get_ns() };

    if new == TCP_SYN_SENT {
        // Entering SYN_SENT runs in connect(), in the connecting process.
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if !is_target(tgid) {
            return Ok(0);
        }
        let family = read_u16(offset!(sk_family))?;
        let mut addr = [0u8; 16];
        match family {
            AF_INET => addr[..4].copy_from_slice(
                &unsafe { ctx.read_at::<[u8; 4]>(offset!(sk_daddr)) }.map_err(|e| e as i64)?,
            ),
            AF_INET6 => {
                addr = unsafe { ctx.read_at::<[u8; 16]>(offset!(sk_daddr_v6)) }.map_err(|e| e as i64)?
            }
            _ => return Ok(0),
        }
        let sock = NetSock {
            tgid,
            retransmits: 0,
            syn_ns: now,
            est_ns: 0,
            addr,
            port: read_u16(offset!(sk_dport))?,
            family,
            _pad: 0,
        };
        if NET_SOCKS.insert(skaddr, sock, 0).is_err() {
            bump(stat::NET_SOCKS_FULL);
        }
        return Ok(0);
    }

    // Other changes may run in softirq context: the socket, not the current task, says
    // whose connection it is.
    let Some(s) = NET_SOCKS.get_ptr_mut(skaddr) else { return Ok(0) };
    let s = unsafe { &mut *s };
    let peer = (s.family, s.port, s.addr);
    if old == TCP_SYN_SENT {
        if new == TCP_ESTABLISHED {
            s.est_ns = now;
            emit_conn(NET_EVENT_CONNECT, s.tgid, NET_ROLE_CLIENT, 0, (s.syn_ns, now), (0, 0), peer, (0, 0));
        } else {
            emit_conn(NET_EVENT_CONNECT, s.tgid, NET_ROLE_CLIENT, 1, (s.syn_ns, now), (0, 0), peer, (0, 0));
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
            NET_ROLE_CLIENT,
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
    let Ok(skaddr) = (unsafe { ctx.read_at::<u64>(offset!(rt_skaddr)) }) else { return 0 };
    if let Some(s) = NET_SOCKS.get_ptr_mut(skaddr) {
        unsafe { (*s).retransmits += 1 };
    }
    0
}
