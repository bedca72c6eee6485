//! TCP connections a process already had when it started being watched (a node agent
//! starting beside long-lived keep-alive connections): found in /proc and handed to the
//! kernel programs, which otherwise learn sockets from accept and connect.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use agent_ebpf::{NET_ROLE_CLIENT, NET_ROLE_SERVER, NET_SK_ADOPTED, NetConn};

use crate::{error::Result, programs::KernelPrograms};

/// One established TCP connection of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Established {
    pub fd: u32,
    /// `NET_ROLE_SERVER` when its local port is one the process's network namespace listens
    /// on, else `NET_ROLE_CLIENT`.
    pub role: u32,
    pub peer: SocketAddr,
}

/// A row of /proc/PID/net/tcp{,6}.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    local_port: u16,
    peer: SocketAddr,
    state: u8,
    inode: u64,
}

/// Adopts the established connections of each watched process once.
#[derive(Debug, Default)]
pub struct Adopter {
    done: HashSet<u32>,
}

impl Adopter {
    /// Adopts the connections of the processes in `live` not seen before; forgets those
    /// that are gone (a reused PID is a new process).
    pub fn adopt_new(&mut self, programs: &mut KernelPrograms, live: &[u32]) {
        let alive: HashSet<u32> = live.iter().copied().collect();
        self.done.retain(|pid| alive.contains(pid));
        for &pid in live {
            if self.done.insert(pid) {
                match adopt(programs, pid, &established(pid)) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!("pid {pid}: following {n} connections opened before it was watched")
                    }
                    Err(e) => tracing::warn!("pid {pid}: its open connections are not followed: {e}"),
                }
            }
        }
    }
}

/// Hands process `pid`'s already established connections to the network programs
/// (which otherwise learn sockets from accept and connect); returns how many.
fn adopt(programs: &mut KernelPrograms, pid: u32, found: &[Established]) -> Result<usize> {
    let Some(conns) = programs.net_slots() else { return Ok(0) };
    let mut adopted = 0;
    for e in found {
        let (family, addr) = match e.peer.ip() {
            std::net::IpAddr::V4(ip) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&ip.octets());
                (libc::AF_INET as u16, addr)
            }
            std::net::IpAddr::V6(ip) => (libc::AF_INET6 as u16, ip.octets()),
        };
        let conn = NetConn {
            start_ns: 0,
            resp_first_ns: 0,
            resp_last_ns: 0,
            req_bytes: 0,
            resp_bytes: 0,
            // Opened before the session: its first request's wait in the socket is not known.
            opened_ns: 0,
            addr,
            port: e.peer.port(),
            family,
            role: e.role,
            phase: agent_ebpf::NET_PHASE_IDLE,
            status: 0,
            method: agent_ebpf::http_method::NONE,
            path_len: 0,
            resp_expect: 0,
            head_length: 0,
            head_seen: 0,
            framing: agent_ebpf::NET_FRAMING_NONE,
            head_state: [0; 8],
            // Not known from /proc: the program looks the socket up at the connection's first
            // data call (its arrivals and stalls are followed from then on).
            sk: NET_SK_ADOPTED,
            queue_ns: 0,
            accept_ns: 0,
            path: [0; agent_ebpf::NET_PATH_LEN],
        };
        let key = u64::from(pid) << 32 | u64::from(e.fd);
        // A socket the programs already follow is left as it is.
        if conns.add(key, &conn) {
            adopted += 1;
        }
    }
    Ok(adopted)
}

const ESTABLISHED: u8 = 0x01;
const LISTEN: u8 = 0x0a;

/// The established TCP connections of process `pid` (empty when /proc cannot be read).
pub fn established(pid: u32) -> Vec<Established> {
    let fds: HashMap<u64, u32> = crate::sys::process::fd_links(pid)
        .filter_map(|(fd, link)| Some((crate::sys::process::socket_inode(&link)?, fd)))
        .collect();
    if fds.is_empty() {
        return Vec::new();
    }
    classify(&TcpTable::read(pid).0, &fds)
}

/// The TCP sockets of the network namespace of a process (/proc/PID/net/tcp and tcp6;
/// empty when they cannot be read).
pub struct TcpTable(Vec<Row>);

impl TcpTable {
    pub fn read(pid: u32) -> Self {
        Self(
            ["tcp", "tcp6"]
                .iter()
                .flat_map(|t| {
                    parse_table(&std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).unwrap_or_default())
                })
                .collect(),
        )
    }

    /// The peer of socket `inode`: Some(None) for one with no peer (a listening socket),
    /// None when it is no TCP socket of the table.
    pub fn peer(&self, inode: u64) -> Option<Option<SocketAddr>> {
        self.0.iter().find(|r| r.inode == inode).map(|r| (r.peer.port() != 0).then_some(r.peer))
    }
}

fn classify(rows: &[Row], fds: &HashMap<u64, u32>) -> Vec<Established> {
    let listening: HashSet<u16> = rows.iter().filter(|r| r.state == LISTEN).map(|r| r.local_port).collect();
    let mut found: Vec<Established> = rows
        .iter()
        .filter(|r| r.state == ESTABLISHED)
        .filter_map(|r| {
            let role = if listening.contains(&r.local_port) { NET_ROLE_SERVER } else { NET_ROLE_CLIENT };
            Some(Established { fd: *fds.get(&r.inode)?, role, peer: r.peer })
        })
        .collect();
    found.sort_by_key(|e| e.fd);
    found
}

/// Parses /proc/net/tcp or tcp6 text; rows that do not parse are skipped.
fn parse_table(text: &str) -> Vec<Row> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = address(f.get(1)?)?;
            let (ip, port) = address(f.get(2)?)?;
            Some(Row {
                local_port,
                peer: SocketAddr::new(ip, port),
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host (little-endian)
/// order, and a big-endian port.
fn address(text: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::swap_bytes))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [a] => IpAddr::V4(Ipv4Addr::from(a.to_be_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D432 0A00020A:0050 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:D433 0100007F:1F90 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:1F91 0000000000000000FFFF00000100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 20 4 30 10 -1
   1: 000080FE00000000FF030201FFFEFDFC:D434 B80D0120000000000000000001000000:01BB 01 00000000:00000000 00:00000000 00000000     0        0 1005 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn servers_clients_and_families() {
        let rows: Vec<Row> = parse_table(TCP).into_iter().chain(parse_table(TCP6)).collect();
        assert_eq!(rows.len(), 6);
        let fds: HashMap<u64, u32> = [(1001, 3), (1002, 7), (1003, 8), (1004, 9), (1005, 10)].into();
        let found = classify(&rows, &fds);
        let peer = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            found,
            vec![
                Established { fd: 7, role: NET_ROLE_SERVER, peer: peer("127.0.0.1:54321") },
                Established { fd: 8, role: NET_ROLE_CLIENT, peer: peer("10.2.0.10:80") },
                Established { fd: 9, role: NET_ROLE_CLIENT, peer: peer("127.0.0.1:50000") },
                Established { fd: 10, role: NET_ROLE_CLIENT, peer: peer("[2001:db8::1]:443") },
            ]
        );
    }

    #[test]
    fn this_process_sees_its_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, from) = listener.accept().unwrap();
        let found = established(std::process::id());
        use std::os::fd::AsRawFd;
        let by_fd = |fd: i32| found.iter().find(|e| e.fd == fd as u32).copied();
        assert_eq!(by_fd(server.as_raw_fd()).map(|e| (e.role, e.peer)), Some((NET_ROLE_SERVER, from)));
        let client_side = by_fd(client.as_raw_fd()).expect("the client socket");
        assert_eq!((client_side.role, client_side.peer), (NET_ROLE_CLIENT, listener.local_addr().unwrap()));
    }
}
