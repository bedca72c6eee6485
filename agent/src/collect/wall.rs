//! Wall-clock and off-CPU profiles: CPU samples and the kernel's off-CPU times as one
//! profile in microseconds of thread time, each stack ending with the thread's state.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use agent_ebpf::{LoopBlock, OffKey, reason};

use super::{Collector, Tracker, View};
use crate::{
    profile::{Frame, Marker, Profile, Unit},
    programs::KernelPrograms,
    python::detect::PythonProcess,
};

/// What a profile shows (`stoker record --mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Where the CPU time goes: CPU samples.
    #[default]
    Cpu,
    /// Where the threads' time goes: CPU samples and waits, each with its state.
    Wall,
    /// Where the threads wait: waits alone, each with its reason.
    OffCpu,
}

/// How wall-clock and off-CPU modes measure the waits (`stoker record --waits`,
/// `off_cpu.waits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Waits {
    /// The time off the CPU of every target thread sampled by the clock at the sampling
    /// rate (as py-spy's --idle does), with its state and stacks: nothing runs on context
    /// switches. A program on every context switch of the host costs a thread-per-connection
    /// server about 3% of its throughput, where this target is 2%.
    #[default]
    Sampled,
    /// Every switch off the CPU of a target thread followed, each wait exact, while the
    /// thread keeps within the switch budget: a program runs on every context switch of
    /// the host.
    Followed,
}

/// The state frame's name for a reason (`[gil]`, `[socket]`...), without the peer.
pub fn reason_name(r: u32) -> &'static str {
    match r {
        reason::RUNNING => "running",
        reason::RUNQUEUE => "runqueue",
        reason::THROTTLED => "throttled",
        reason::GIL => "gil",
        reason::LOCK => "lock",
        reason::SOCKET => "socket",
        reason::POLL => "poll",
        reason::DISK => "disk",
        reason::SLEEP => "sleep",
        _ => "other",
    }
}

/// The peer of a socket wait, when the kernel found one.
pub fn peer(key: &OffKey) -> Option<(IpAddr, u16)> {
    let ip = match key.family {
        2 => IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]]),
        10 => IpAddr::from(key.addr),
        _ => return None,
    };
    Some((ip.to_canonical(), key.port))
}

/// A wait's reason, refined from its kernel stack when the system call did not tell.
fn refined(key: &OffKey, kernel: Option<&[Frame]>) -> u32 {
    if key.reason != reason::OTHER {
        return key.reason;
    }
    let Some(frames) = kernel else { return key.reason };
    let has = |parts: &[&str]| {
        frames.iter().filter_map(Frame::function).any(|f| parts.iter().any(|p| f.contains(p)))
    };
    if has(&["futex"]) {
        reason::LOCK
    } else if has(&["sock_", "tcp_", "inet_", "unix_stream", "unix_dgram", "udp_", "sk_wait"]) {
        reason::SOCKET
    } else if has(&["ep_poll", "do_select", "do_sys_poll", "do_poll"]) {
        reason::POLL
    } else if has(&["nanosleep"]) {
        reason::SLEEP
    } else if has(&["io_schedule", "folio_wait", "wait_on_page", "blk_", "ext4_", "xfs_", "jbd2", "filemap_"])
    {
        reason::DISK
    } else {
        reason::OTHER
    }
}

/// Which threads of a process run Python. The kernel counts a blocked stretch for any
/// thread of a target that waits for events and then stays away from that wait: so does a
/// native runtime's worker (tokio's, gRPC's) in a Python process, which waits for events
/// and parks on a lock in turn. Such a thread runs no event loop of Python's, and its
/// stretches are left out (counted in `native`).
#[derive(Debug, Default)]
pub struct PythonThreads {
    /// Per process: its CPython as the tracker knew it at its first stretch (None: not
    /// walkable), and the ids of its Python threads as last read.
    known: HashMap<u32, (Option<Arc<PythonProcess>>, HashSet<u32>)>,
    /// Stretches of threads that run no Python, left out.
    pub native: u64,
}

impl PythonThreads {
    /// Whether thread `tid` of process `pid` runs Python. A thread not seen before has its
    /// process's thread list read again (a few words of its memory); a process that cannot
    /// be read now (it exited since the stretch) is judged by its last reading, and one
    /// never read (or whose CPython does not record thread ids) not at all: true.
    pub fn runs_python(&mut self, tracker: &Tracker, pid: u32, tid: u32) -> bool {
        let (process, tids) = self.known.entry(pid).or_insert_with(|| (tracker.python(pid), HashSet::new()));
        if tids.contains(&tid) {
            return true;
        }
        if let Some(read) = process.as_deref().and_then(crate::dump::thread_ids)
            && !read.is_empty()
            && read.iter().all(|&t| t != 0)
        {
            *tids = read.into_iter().collect();
        }
        let python = tids.is_empty() || tids.contains(&tid);
        if !python {
            self.native += 1;
        }
        python
    }

    /// Forgets the processes not in `live`.
    pub fn retain(&mut self, live: &HashSet<u32>) {
        self.known.retain(|pid, _| live.contains(pid));
    }
}

impl Collector {
    /// The Python stack (root first) of a blocked event-loop stretch, named now while its
    /// process lives (empty when no sample saw one).
    pub fn loop_block_stack(&mut self, kernel: &KernelPrograms, block: &LoopBlock) -> Vec<Frame> {
        match (block.py_stack, kernel.py_stack(block.py_stack)) {
            (0, _) | (_, None) => Vec::new(),
            (_, Some(stack)) => {
                let named = self.python.stack(block.tgid, &stack);
                named.frames.iter().rev().map(|f| f.frame.clone()).collect()
            }
        }
    }

    /// The state a wait's stack ends with: `[socket 10.0.0.7:5432]`, `[gil]`...
    pub fn state_of(&self, key: &OffKey) -> (u32, String) {
        let r = refined(key, self.kernel_stack(key.sample.kernel_stack_id));
        let name = reason_name(r);
        let text = match (r, peer(key)) {
            (reason::SOCKET, Some((IpAddr::V6(ip), port))) => format!("[{name} [{ip}]:{port}]"),
            (reason::SOCKET, Some((ip, port))) => format!("[{name} {ip}:{port}]"),
            _ => format!("[{name}]"),
        };
        (r, text)
    }

    /// A wall-clock (`Mode::Wall`) or off-CPU (`Mode::OffCpu`) profile of what was read at
    /// the end (`collect` with `final_read`): microseconds of thread time. A CPU sample
    /// stands for 1e6 / `rate_hz` microseconds.
    pub fn time_profile(&self, view: View, mode: Mode, rate_hz: u64) -> Profile {
        let mut stacks = Vec::new();
        if mode == Mode::Wall {
            let us = 1e6 / rate_hz.max(1) as f64;
            for (key, count) in self.counts() {
                let mut frames = self.frames(key, view);
                frames.push(Frame::Marker(Marker::State("[running]".into())));
                stacks.push((frames, (*count as f64 * us).round() as u64));
            }
        }
        for (key, ns) in &self.off {
            let us = ns / 1_000;
            if us == 0 {
                continue;
            }
            let mut frames = self.frames(&key.sample, view);
            frames.push(Frame::Marker(Marker::State(self.state_of(key).1.into())));
            stacks.push((frames, us));
        }
        Profile { stacks, unit: Unit::Microseconds, ..Default::default() }
    }

    /// `--gil`: per process, the seconds its threads held the GIL on a CPU (the CPU samples,
    /// which count only its holder) and the seconds they waited for it (off-CPU `[gil]`).
    pub fn gil_by_process(&self, rate_hz: u64) -> Vec<(u32, f64, f64)> {
        let mut by_pid: HashMap<u32, (f64, f64)> = HashMap::new();
        for (key, count) in self.counts() {
            by_pid.entry(key.tgid).or_default().0 += *count as f64 / rate_hz.max(1) as f64;
        }
        for (key, ns) in &self.off {
            if self.state_of(key).0 == reason::GIL {
                by_pid.entry(key.sample.tgid).or_default().1 += *ns as f64 / 1e9;
            }
        }
        let mut out: Vec<(u32, f64, f64)> = by_pid.into_iter().map(|(pid, (h, w))| (pid, h, w)).collect();
        out.sort_by_key(|(pid, _, _)| *pid);
        out
    }

    /// Per process, seconds of thread time by state (largest first): off-CPU waits, and
    /// with `rate_hz` the CPU samples as `[running]`.
    pub fn states_by_process(&self, rate_hz: Option<u64>) -> Vec<(u32, Vec<(String, f64)>)> {
        let mut by_pid: HashMap<u32, HashMap<String, f64>> = HashMap::new();
        if let Some(rate) = rate_hz {
            for (key, count) in self.counts() {
                *by_pid.entry(key.tgid).or_default().entry("[running]".into()).or_default() +=
                    *count as f64 / rate.max(1) as f64;
            }
        }
        for (key, ns) in &self.off {
            *by_pid.entry(key.sample.tgid).or_default().entry(self.state_of(key).1).or_default() +=
                *ns as f64 / 1e9;
        }
        let mut out: Vec<(u32, Vec<(String, f64)>)> = by_pid
            .into_iter()
            .map(|(pid, states)| {
                let mut states: Vec<(String, f64)> = states.into_iter().collect();
                states.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                (pid, states)
            })
            .collect();
        out.sort_by_key(|(pid, _)| *pid);
        out
    }
}

#[cfg(test)]
mod tests {
    use agent_ebpf::SampleKey;

    use super::*;

    fn key(r: u32) -> OffKey {
        let sample = SampleKey { tgid: 1, tid: 1, user_stack_id: -1, kernel_stack_id: -1, py_stack: 0 };
        OffKey { sample, reason: r, port: 0, family: 0, addr: [0; 16] }
    }

    #[test]
    fn socket_states_name_their_peer() {
        let c = Collector::new(false);
        let mut k = key(reason::SOCKET);
        assert_eq!(c.state_of(&k).1, "[socket]");
        k.family = 2;
        k.addr[..4].copy_from_slice(&[10, 0, 0, 7]);
        k.port = 5432;
        assert_eq!(c.state_of(&k).1, "[socket 10.0.0.7:5432]");
        k.family = 10;
        k.addr = "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(c.state_of(&k).1, "[socket [2001:db8::1]:5432]");
        // An IPv4 peer of an IPv6 socket reads as IPv4.
        k.addr = "::ffff:10.0.0.8".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(c.state_of(&k).1, "[socket 10.0.0.8:5432]");
        assert_eq!(c.state_of(&key(reason::GIL)).1, "[gil]");
        assert_eq!(c.state_of(&key(reason::OTHER)).1, "[other]");
    }

    #[test]
    fn other_waits_are_named_by_their_kernel_stack() {
        let k = key(reason::OTHER);
        let stack = |names: &[&str]| -> Vec<Frame> {
            names.iter().map(|n| Frame::Kernel { function: (*n).into() }).collect()
        };
        assert_eq!(
            refined(&k, Some(&stack(&["__schedule", "schedule", "unix_stream_read_generic"]))),
            reason::SOCKET
        );
        assert_eq!(
            refined(&k, Some(&stack(&["__schedule", "io_schedule", "folio_wait_bit_common"]))),
            reason::DISK
        );
        assert_eq!(refined(&k, Some(&stack(&["__schedule", "schedule", "pipe_read"]))), reason::OTHER);
        assert_eq!(refined(&key(reason::GIL), Some(&stack(&["futex_wait"]))), reason::GIL);
    }
}
