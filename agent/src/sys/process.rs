//! Facts about a process from /proc, and pidfds that tell reliably when it has exited.
use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
};

/// A handle on a running process that is immune to PID reuse.
#[derive(Debug)]
pub struct PidFd {
    pid: u32,
    fd: OwnedFd,
}

impl PidFd {
    /// Opens a pidfd; `Ok(None)` when no such process exists.
    pub fn open(pid: u32) -> io::Result<Option<Self>> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(err),
            };
        }
        // SAFETY: rc is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(rc as i32) };
        Ok(Some(Self { pid, fd }))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True once the process has exited (a zombie counts as exited).
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc > 0 && pfd.revents & libc::POLLIN != 0
    }
}

/// The process's command name (`comm`), or "?" when it is gone.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// The thread's name (`comm` of the task).
pub fn thread_name(pid: u32, tid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// Path of the process's executable, as the process sees it.
pub fn exe(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Device and inode of the process's executable: the same program under any path.
pub fn exe_id(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// True when the process sees the same filesystem root as we do, so paths from its
/// memory maps can be opened directly.
pub fn same_root(pid: u32) -> bool {
    match (fs::metadata(format!("/proc/{pid}/root/")), fs::metadata("/")) {
        (Ok(a), Ok(b)) => {
            use std::os::unix::fs::MetadataExt;
            a.dev() == b.dev() && a.ino() == b.ino()
        }
        _ => true,
    }
}

/// True while the process exists and has not exited (a zombie has exited).
pub fn is_alive(pid: u32) -> bool {
    start_time(pid).is_some()
}

/// When the live process `pid` started (clock ticks since boot, /proc/PID/stat field 22):
/// with the pid, what tells a process from a later one that reuses its pid. None when it
/// does not exist or has exited (a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// When the live process `pid` started, in nanoseconds since the Unix epoch (the boot time
/// in /proc/stat plus its start in clock ticks).
pub fn started_unix_ns(pid: u32) -> Option<u64> {
    let ticks = start_time(pid)?;
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let boot: u64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&hz| hz > 0)?;
    Some(boot * 1_000_000_000 + ticks * (1_000_000_000 / hz))
}

/// The fields of a /proc/PID/stat (or /proc/PID/task/TID/stat) line from field 3, the
/// state, on: those after the command name, which is in parentheses and may hold anything.
/// Field n is `nth(n - 3)`.
pub fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat.rsplit_once(')')?.1.split_whitespace())
}

/// True for a kernel thread (`PF_KTHREAD` in the flags, field 9, of /proc/PID/stat).
pub fn is_kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let flags = stat_fields(&stat).and_then(|mut f| f.nth(9 - 3)?.parse::<u64>().ok());
    flags.is_some_and(|f| f & PF_KTHREAD != 0)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let mut fields = stat_fields(stat)?;
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 3 was the state; the start time is field 22.
    fields.nth(22 - 4)?.parse().ok()
}

/// A thread's scheduler figures (/proc/PID/task/TID/schedstat): CPU time, time waiting in
/// run queues (both nanoseconds), and how many times it got a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedStat {
    pub ran_ns: u64,
    pub queued_ns: u64,
    pub arrivals: u64,
}

/// Thread `tid`'s scheduler figures (None when it is gone or the kernel keeps none).
pub fn schedstat(pid: u32, tid: u32) -> Option<SchedStat> {
    parse_schedstat(&fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?)
}

fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some(SchedStat { ran_ns: fields.next()??, queued_ns: fields.next()??, arrivals: fields.next()?? })
}

/// A thread's kernel state and, for one asleep, the system call it is blocked in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadWait {
    /// The state letter of /proc/PID/task/TID/stat (`R`, `S`, `D`, ...).
    pub state: char,
    /// For a thread in `S` or `D`: the call's number (-1: in none) and its six arguments,
    /// from /proc/PID/task/TID/syscall (None when unreadable).
    pub syscall: Option<(i64, [u64; 6])>,
}

/// Thread `tid` of `pid`: its state and the system call it waits in (None when it is gone).
pub fn thread_wait(pid: u32, tid: u32) -> Option<ThreadWait> {
    let task = format!("/proc/{pid}/task/{tid}");
    let stat = fs::read_to_string(format!("{task}/stat")).ok()?;
    let state = stat_fields(&stat)?.next()?.chars().next()?;
    let syscall = match state {
        'S' | 'D' => fs::read_to_string(format!("{task}/syscall")).ok().and_then(|s| parse_syscall(&s)),
        _ => None,
    };
    Some(ThreadWait { state, syscall })
}

/// "NR ARG1 ... ARG6 SP PC" (arguments in hex) of /proc/PID/task/TID/syscall; "-1 SP PC"
/// out of a call ("running" for a thread on a CPU has no number).
fn parse_syscall(text: &str) -> Option<(i64, [u64; 6])> {
    let mut words = text.split_whitespace();
    let number = words.next()?.parse().ok()?;
    let mut args = [0; 6];
    if number >= 0 {
        for (arg, word) in args.iter_mut().zip(words) {
            *arg = u64::from_str_radix(word.trim_start_matches("0x"), 16).unwrap_or(0);
        }
    }
    Some((number, args))
}

/// The inode of the socket a descriptor's /proc/PID/fd link names (`socket:[INODE]`).
pub fn socket_inode(link: &std::path::Path) -> Option<u64> {
    link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The descriptors of process `pid` and what their /proc/PID/fd links name (none when it is
/// gone or cannot be read).
pub fn fd_links(pid: u32) -> impl Iterator<Item = (u32, PathBuf)> {
    fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten().filter_map(|entry| {
        let fd = entry.file_name().to_str()?.parse().ok()?;
        Some((fd, fs::read_link(entry.path()).ok()?))
    })
}

/// True when process `pid` holds an epoll instance (an `anon_inode:[eventpoll]` descriptor):
/// what an asyncio, gevent or uvloop event loop waits on. False when it is gone.
pub fn has_epoll(pid: u32) -> bool {
    fd_links(pid).any(|(_, link)| link.as_os_str() == "anon_inode:[eventpoll]")
}

/// The process (thread group) of task `tid`, a process or one of its threads (None when it
/// does not exist).
pub fn tgid(tid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// The parent of process `pid` (None when it does not exist).
pub fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 3 is the state, field 4 the parent.
    stat_fields(&stat)?.nth(1)?.parse().ok()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel programs' timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time the process has used, user and system, all its threads (those that ended
/// too), in seconds: the kernel's accounting (/proc/PID/stat fields 14 and 15, kept exact
/// in nanoseconds and given in clock ticks). Also for a zombie (its final figure).
pub fn cpu_time(pid: u32) -> Option<f64> {
    parse_cpu_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).map(|t| t as f64 / clock_ticks())
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat_fields(stat)?;
    // Field 3 is the state; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Every process id in /proc.
pub fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// This machine's host name (empty when unreadable).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_follows_the_command_name() {
        let stat = "42 (a) b (c) R 1 42 42 0 -1 4194304 100 0 0 0 5 3 0 0 20 0 1 0 123456 1000 10 0";
        assert_eq!(parse_start_time(stat), Some(123456));
        assert_eq!(parse_start_time(&stat.replace(" R ", " Z ")), None);
        assert_eq!(parse_start_time("42 (x"), None);
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(
            parse_schedstat("1234 56 7\n"),
            Some(SchedStat { ran_ns: 1234, queued_ns: 56, arrivals: 7 })
        );
        assert_eq!(parse_schedstat("1234 56"), None);
        let me = std::process::id();
        assert!(schedstat(me, me).is_some_and(|s| s.ran_ns > 0 && s.arrivals > 0));
        // This process started before now and after the machine booted.
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let started = started_unix_ns(std::process::id()).unwrap();
        assert!(started <= now && started > now - 30 * 86_400 * 1_000_000_000, "{started} {now}");
    }

    #[test]
    fn cpu_time_is_user_plus_system_also_for_a_zombie() {
        let stat = "42 (a) b (c) R 1 42 42 0 -1 4194304 100 0 0 0 5 3 0 0 20 0 1 0 123456 1000 10 0";
        assert_eq!(parse_cpu_ticks(stat), Some(8));
        assert_eq!(parse_cpu_ticks(&stat.replace(" R ", " Z ")), Some(8));
        assert_eq!(parse_cpu_ticks("42 (x) R 1"), None);
        assert!(cpu_time(std::process::id()).is_some());
    }

    #[test]
    fn an_epoll_instance_is_found_among_the_descriptors() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!has_epoll(child.id()), "sleep holds no epoll instance");
        let _ = child.kill();
        let _ = child.wait();
        // SAFETY: epoll_create1 takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is the descriptor just made, owned here.
        let _owned = unsafe { OwnedFd::from_raw_fd(fd) };
        assert!(has_epoll(std::process::id()));
        assert!(!has_epoll(u32::MAX), "no such process");
    }

    #[test]
    fn a_blocked_threads_system_call_is_read() {
        assert_eq!(
            parse_syscall("202 0x7f00aa 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f01\n"),
            Some((202, [0x7f00aa, 0x80, 2, 0, 0, 0]))
        );
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f01\n"), Some((-1, [0; 6])));
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(socket_inode(std::path::Path::new("socket:[12345]")), Some(12345));
        assert_eq!(socket_inode(std::path::Path::new("pipe:[12345]")), None);
        // A thread of this process blocked on a channel: asleep in `futex`.
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            go_rx.recv().unwrap();
        });
        let (pid, tid) = (std::process::id(), tid_rx.recv().unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let wait = loop {
            let wait = thread_wait(pid, tid).unwrap();
            if wait.state == 'S' || std::time::Instant::now() > deadline {
                break wait;
            }
            std::thread::yield_now();
        };
        go_tx.send(()).unwrap();
        thread.join().unwrap();
        assert_eq!(wait.state, 'S', "{wait:?}");
        assert_eq!(wait.syscall.map(|(nr, _)| nr), Some(libc::SYS_futex), "{wait:?}");
        assert_eq!(thread_wait(pid, u32::MAX), None);
    }
}
