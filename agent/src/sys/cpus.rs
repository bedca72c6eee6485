//! Where a real-time thread of stoker's own runs: on the CPU it may use that was idle
//! longest lately (/proc/stat), since the kernel leaves it where it last ran.
use std::{fs, io};

/// The CPUs stoker may run on (its main thread's affinity, which it never narrows: the
/// process's cpuset), in order; empty when unknown.
fn allowed() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is a plain bit array, valid zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `getpid` has no preconditions; `sched_getaffinity` reads that thread's affinity
    // into `set`, of the size passed.
    if unsafe { libc::sched_getaffinity(libc::getpid(), std::mem::size_of_val(&set), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: `CPU_ISSET` reads a bit of `set` (the index is below `CPU_SETSIZE`).
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Restricts the calling thread to `cpus`.
fn set_allowed(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: as in `allowed`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: sets a bit of `set`; the CPUs came from `allowed`, below `CPU_SETSIZE`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sets the calling thread's affinity from `set`, of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The idle time so far (idle and I/O wait, in clock ticks) of each CPU in /proc/stat.
fn idle_ticks(stat: &str) -> Vec<(usize, u64)> {
    stat.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cpu")?;
            let (cpu, fields) = rest.split_once(' ')?;
            let cpu = cpu.parse().ok()?;
            let mut f = fields.split_whitespace().skip(3).map(|v| v.parse::<u64>().unwrap_or(0));
            Some((cpu, f.next()? + f.next().unwrap_or(0)))
        })
        .collect()
}

/// Keeps the calling thread on the CPU, of those it may use, that was idle longest since
/// the last look. A real-time thread that wakes preempts whatever runs on the CPU it ran on
/// last, rather than move to an idle one: a target thread, maybe, holding its GIL while
/// every other thread waits.
pub struct IdlestCpu {
    cpus: Vec<usize>,
    /// Each of `cpus`' idle ticks at the last look.
    idle: Vec<u64>,
    /// The CPU the thread is kept on (None: any of `cpus`).
    on: Option<usize>,
}

impl IdlestCpu {
    /// For the calling thread; None when it may run on one CPU only (nothing to choose).
    pub fn new() -> Option<Self> {
        let cpus = allowed();
        if cpus.len() < 2 {
            return None;
        }
        let mut this = IdlestCpu { idle: vec![0; cpus.len()], cpus, on: None };
        this.idle = this.read()?;
        Some(this)
    }

    fn read(&self) -> Option<Vec<u64>> {
        let now = idle_ticks(&fs::read_to_string("/proc/stat").ok()?);
        self.cpus.iter().map(|c| now.iter().find(|(cpu, _)| cpu == c).map(|&(_, t)| t)).collect()
    }

    /// Looks again: moves the calling thread to the idlest CPU if that is not where it is
    /// kept. Returns the CPU it is kept on now.
    pub fn update(&mut self) -> Option<usize> {
        let Some(now) = self.read() else { return self.on };
        let deltas: Vec<u64> = now.iter().zip(&self.idle).map(|(n, p)| n.saturating_sub(*p)).collect();
        self.idle = now;
        let Some(best) = choose(&deltas, self.cpus.iter().position(|&c| Some(c) == self.on)) else {
            return self.on;
        };
        let cpu = self.cpus[best];
        if Some(cpu) != self.on {
            match set_allowed(&[cpu]) {
                Ok(()) => self.on = Some(cpu),
                Err(e) => {
                    // The CPUs allowed changed (a cpuset): any of them, as the kernel likes.
                    tracing::debug!("cannot move to CPU {cpu}: {e}");
                    self.cpus = allowed();
                    let _ = set_allowed(&self.cpus);
                    self.on = None;
                }
            }
        }
        self.on
    }
}

/// Of CPUs idle for `deltas` ticks each since the last look, the index of the one to be
/// on; `on` is the current one's. A move needs a clear difference (a quarter more idle time
/// and two ticks), so that two CPUs about as idle do not trade it back and forth; none when
/// no CPU was idle at all.
fn choose(deltas: &[u64], on: Option<usize>) -> Option<usize> {
    let (best, &most) = deltas.iter().enumerate().max_by_key(|&(i, d)| (*d, std::cmp::Reverse(i)))?;
    match on {
        Some(i) if deltas[i] + deltas[i] / 4 + 2 > most => Some(i),
        _ if most == 0 => on,
        _ => Some(best),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  2255 34 2290 22625563 6290 127 456 0 0 0
cpu0 1132 34 1441 11311718 3675 127 438 0 0 0
cpu1 1123 0 849 11313845 2615 0 18 0 0 0
intr 114930548 113199788 3 0 5 263 0 4 [... lots more numbers ...]
ctxt 1990473
btime 1062191376
";

    #[test]
    fn idle_ticks_add_io_wait_per_cpu_and_skip_the_total() {
        assert_eq!(idle_ticks(STAT), vec![(0, 11311718 + 3675), (1, 11313845 + 2615)]);
    }

    #[test]
    fn the_idlest_cpu_is_chosen_and_kept_while_about_as_idle() {
        assert_eq!(choose(&[10, 80], None), Some(1));
        assert_eq!(choose(&[10, 80], Some(0)), Some(1));
        // Within a quarter and two ticks: it stays.
        assert_eq!(choose(&[70, 80], Some(0)), Some(0));
        assert_eq!(choose(&[60, 80], Some(0)), Some(1));
        // No CPU idle: no move, and no choice to make when on none.
        assert_eq!(choose(&[0, 0], Some(1)), Some(1));
        assert_eq!(choose(&[0, 0], None), None);
        // Ties go to the first.
        assert_eq!(choose(&[50, 50], None), Some(0));
    }
}
