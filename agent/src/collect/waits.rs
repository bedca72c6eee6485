//! Waits under way as a session starts, of threads blocked since before the off-CPU program
//! was attached (seen by no switch yet): entered in the kernel's map from /proc.
use std::net::{IpAddr, SocketAddr};

use agent_ebpf::{NO_STACK, OffKey, OffThread, SampleKey, reason};

use super::{Collector, Tracker};
use crate::{
    net::existing::TcpTable,
    programs::KernelPrograms,
    python::{
        self,
        mem::{Memory, ReadMemory},
    },
    sys::process,
};

/// Enters the waits under way of the threads of processes `pids`; returns how many. A
/// thread stuck on a lock or a read the whole session would otherwise show nothing: each
/// blocked one gets the reason its system call gives (as the program tells it at a switch)
/// and its Python stack walked here (with the CPython `tracker` found), and the kernel
/// counts the wait as one of its own.
pub fn enter(
    kernel: &mut KernelPrograms,
    collector: &mut Collector,
    tracker: &Tracker,
    pids: &[u32],
) -> usize {
    let mut entered = 0;
    for &pid in pids {
        let python = tracker.python(pid);
        let stacks = python.as_deref().map(crate::dump::thread_stacks).unwrap_or_default();
        let gil = python.as_deref().map(python::gil_addr).filter(|&g| g != 0);
        // The process's TCP sockets, read at its first thread blocked on one.
        let mut tcp = None;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for tid in tasks.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
            let Some((why, peer)) = blocked(pid, tid, gil, &mut tcp) else { continue };
            let Some(sched) = process::schedstat(pid, tid) else { continue };
            let py_stack = match stacks.iter().find(|(t, s)| *t == tid && s.len > 0) {
                Some((_, stack)) => collector.add_walked_stack(pid, tid, stack),
                None => 0,
            };
            let mut key = OffKey {
                sample: SampleKey {
                    tgid: pid,
                    tid,
                    user_stack_id: NO_STACK,
                    kernel_stack_id: NO_STACK,
                    py_stack,
                },
                reason: why,
                port: 0,
                family: 0,
                addr: [0; 16],
            };
            if let Some(peer) = peer {
                key.port = peer.port();
                match peer.ip() {
                    IpAddr::V4(ip) => {
                        key.family = libc::AF_INET as u16;
                        key.addr[..4].copy_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        key.family = libc::AF_INET6 as u16;
                        key.addr = ip.octets();
                    }
                }
            }
            // No run-queue clock: the kernel ends the wait where the thread's CPU time since
            // says, as for a thread the scheduler recorded no arrival of.
            let wait = OffThread {
                key,
                off_ns: process::monotonic_ns(),
                off_clock: 0,
                queued_before: sched.queued_ns,
                arrivals_before: sched.arrivals,
                ran_before: sched.ran_ns,
                py_signature: 0,
                walked_ns: 0,
                prev_signature: 0,
                prev_py_stack: 0,
                prev_user_stack_id: NO_STACK,
                _pad: 0,
            };
            match kernel.enter_wait(tid, &wait) {
                Ok(true) => entered += 1,
                Ok(false) => {}
                Err(e) => tracing::debug!("thread {tid}: its wait under way not entered: {e}"),
            }
        }
    }
    entered
}

/// Why thread `tid` of `pid` waits, if it is blocked (and the peer of the socket it waits
/// on): what the kernel program finds at a switch, from its system call (`/proc`'s view of
/// it); `gil`: the process's GIL, when it is CPython; `tcp`: its TCP sockets, once read.
fn blocked(
    pid: u32,
    tid: u32,
    gil: Option<u64>,
    tcp: &mut Option<TcpTable>,
) -> Option<(u32, Option<SocketAddr>)> {
    let wait = process::thread_wait(pid, tid)?;
    match wait.state {
        'D' => return Some((reason::DISK, None)),
        'S' => {}
        _ => return None,
    }
    let Some((nr, args)) = wait.syscall.filter(|(nr, _)| *nr >= 0) else {
        return Some((reason::OTHER, None));
    };
    let arg = |i: usize| args[i];
    let mut fd = |fd: u64, otherwise: u32| fd_reason(pid, fd, otherwise, tcp);
    Some(match nr {
        libc::SYS_futex => {
            let uaddr = arg(0);
            match gil {
                Some(g) if uaddr >= g && uaddr < g + agent_ebpf::PY_GIL_SIZE => (reason::GIL, None),
                _ => (reason::LOCK, None),
            }
        }
        libc::SYS_futex_waitv => (reason::LOCK, None),
        libc::SYS_read
        | libc::SYS_write
        | libc::SYS_readv
        | libc::SYS_writev
        | libc::SYS_recvfrom
        | libc::SYS_sendto
        | libc::SYS_recvmsg
        | libc::SYS_sendmsg
        | libc::SYS_connect
        | libc::SYS_recvmmsg
        | libc::SYS_sendmmsg => fd(arg(0), reason::OTHER),
        libc::SYS_accept
        | libc::SYS_accept4
        | libc::SYS_epoll_wait
        | libc::SYS_epoll_pwait
        | libc::SYS_epoll_pwait2 => (reason::POLL, None),
        // A poll of one socket is how CPython waits on a socket with a timeout.
        libc::SYS_poll | libc::SYS_ppoll if arg(1) == 1 => match Memory::new(pid).u32(arg(0)) {
            Ok(fd_) if (fd_ as i32) >= 0 => fd(u64::from(fd_), reason::POLL),
            _ => (reason::POLL, None),
        },
        // `select` of no descriptors is a sleep (`time.sleep` before 3.11).
        libc::SYS_select | libc::SYS_pselect6 if arg(0) == 0 => (reason::SLEEP, None),
        libc::SYS_poll | libc::SYS_ppoll | libc::SYS_select | libc::SYS_pselect6 => (reason::POLL, None),
        libc::SYS_nanosleep | libc::SYS_clock_nanosleep => (reason::SLEEP, None),
        _ => (reason::OTHER, None),
    })
}

/// A wait on descriptor `fd` of `pid`: a socket (with its peer when it is TCP, from `tcp`,
/// read now if it was not yet), a regular file (the disk), or `otherwise`.
fn fd_reason(pid: u32, fd: u64, otherwise: u32, tcp: &mut Option<TcpTable>) -> (u32, Option<SocketAddr>) {
    let path = format!("/proc/{pid}/fd/{fd}");
    let Ok(link) = std::fs::read_link(&path) else { return (otherwise, None) };
    if let Some(inode) = process::socket_inode(&link) {
        return match tcp.get_or_insert_with(|| TcpTable::read(pid)).peer(inode) {
            Some(Some(peer)) => (reason::SOCKET, Some(peer)),
            // A listening socket: waiting on it is waiting for any client, as `accept` is.
            Some(None) if otherwise == reason::POLL => (reason::POLL, None),
            _ => (reason::SOCKET, None),
        };
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => (reason::DISK, None),
        _ => (otherwise, None),
    }
}
