//! The wall-clock sampler's userspace side: a thread that runs the kernel's task iterator
//! (`off_cpu_sample`) over each target process's threads at the sampling rate, telling it
//! how long it has been since the previous run, so that the time off the CPU of threads
//! that switch faster than the budget is counted as a clock samples it.
use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};

use super::bits::TargetBits;
use crate::{
    error::{Error, Result, one_line},
    sys::cpus::IdlestCpu,
};

/// `bpf(2)` commands and the task iterator's attach type (uapi `linux/bpf.h`).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;
/// How often the set of target processes is looked at again.
const TARGETS_EVERY: Duration = Duration::from_millis(250);
/// The share of one CPU the sampler may take: when its runs take longer (many threads
/// switching fast), it samples less often than the rate asks. Each sample counts the time
/// since the one before, so the estimates stay unbiased; they only spread wider.
const MAX_SHARE: f64 = 0.02;
/// How much run time beyond its share the sampler may spend at once (`Allowance`): a single
/// slow run (a new target linked, its first visit) delays no sample, where it would have
/// left a gap fifty times its length (a run of 5.9 ms once left 295 ms unsampled, in which
/// the wait a sample then met took the time of the waits around it).
const BURST: Duration = Duration::from_millis(20);
/// How often the sampler looks for the idlest CPU to run on.
const PLACE_EVERY: Duration = Duration::from_secs(1);

/// A descriptor of its own of map `map`, for the sampler's thread.
pub(crate) fn map_fd(map: &Map) -> Result<OwnedFd> {
    let data: &MapData = match map {
        Map::Array(d) | Map::HashMap(d) => d,
        _ => {
            return Err(Error::Ebpf { what: "kernel map has the wrong type", detail: "wall sampler".into() });
        }
    };
    std::os::fd::AsFd::as_fd(data.fd())
        .try_clone_to_owned()
        .map_err(|e| Error::Ebpf { what: "duplicating a kernel map's descriptor", detail: e.to_string() })
}

/// The running sampler; stops when dropped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    visits: Arc<Visits>,
}

/// What the sampler did with the target processes at its runs: visited them (ran their
/// iterator), or left them out, no thread of theirs being fast; and how its runs kept time.
#[derive(Default)]
pub struct Visits {
    pub made: AtomicU64,
    pub skipped: AtomicU64,
    runs: AtomicU64,
    gaps_ns: AtomicU64,
    longest_ns: AtomicU64,
    realtime: AtomicBool,
    /// Set as a target is added: the targets map is read again at the next run, not up to
    /// `TARGETS_EVERY` later (a process found while it runs, as the agent finds them, has its
    /// waits sampled from then on).
    new_targets: AtomicBool,
}

/// How the sampler's runs kept time: each sample weighs the time since the run before, so
/// the spread of its estimates grows with these gaps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    pub runs: u64,
    /// The mean and the longest time between runs.
    pub mean_gap: Duration,
    pub longest_gap: Duration,
    /// Whether its thread is in the real-time class (else its runs are late while the CPUs
    /// are busy).
    pub realtime: bool,
}

/// A target process the sampler visits: its iterator link, whether it is to be visited at
/// the next run (its last visit met a fast thread), and when it was last visited.
struct Target {
    link: OwnedFd,
    fast: bool,
    visited: Option<Instant>,
}

/// The longest a target process goes without a visit: in case a thread of it is fast and its
/// process's bit was missed (a thread id reused while its bit was set).
const VISIT_AT_LEAST: Duration = Duration::from_secs(1);

impl Sampler {
    /// Starts sampling every `period` the processes in the targets map (`targets`, a
    /// descriptor of it) with the iterator program `prog` (the time since the previous run
    /// goes into slot 1 of the budget array `budget`), each while it has threads that switch
    /// faster than the budget (`fast_procs`, see `MAP_OFF_FAST_PROCS`). Its thread keeps the
    /// capabilities of the thread that starts it, which it needs to make links for new
    /// targets.
    pub(super) fn start(
        prog: OwnedFd,
        targets: OwnedFd,
        budget: OwnedFd,
        fast_procs: TargetBits,
        period: Duration,
    ) -> Result<Self> {
        let open = |fd| {
            MapData::from_fd(fd)
                .map_err(|e| Error::Ebpf { what: "opening a kernel map", detail: one_line(&e) })
        };
        let targets: BpfHashMap<MapData, u32, u32> = BpfHashMap::try_from(Map::HashMap(open(targets)?))
            .map_err(|e| Error::Ebpf { what: "kernel map has the wrong type", detail: one_line(&e) })?;
        let budget: Array<MapData, u64> = Array::try_from(Map::Array(open(budget)?))
            .map_err(|e| Error::Ebpf { what: "kernel map has the wrong type", detail: one_line(&e) })?;
        let stop = Arc::new(AtomicBool::new(false));
        let visits = Arc::new(Visits::default());
        let (flag, counts) = (stop.clone(), visits.clone());
        let thread = std::thread::Builder::new()
            .name("stoker-wall".into())
            .spawn(move || run(prog, targets, budget, &fast_procs, period, &flag, &counts))
            .map_err(|e| Error::Ebpf { what: "starting the wall-clock sampler", detail: e.to_string() })?;
        Ok(Sampler { stop, thread: Some(thread), visits })
    }

    /// A target was added: it is linked at the next run.
    pub fn targets_added(&self) {
        self.visits.new_targets.store(true, Ordering::Relaxed);
    }

    /// The process visits made and left out so far.
    pub fn visits(&self) -> (u64, u64) {
        (self.visits.made.load(Ordering::Relaxed), self.visits.skipped.load(Ordering::Relaxed))
    }

    /// How its runs have kept time so far.
    pub fn timing(&self) -> Timing {
        let v = &self.visits;
        let runs = v.runs.load(Ordering::Relaxed);
        Timing {
            runs,
            mean_gap: Duration::from_nanos(v.gaps_ns.load(Ordering::Relaxed) / runs.max(1)),
            longest_gap: Duration::from_nanos(v.longest_ns.load(Ordering::Relaxed)),
            realtime: v.realtime.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    prog: OwnedFd,
    targets: BpfHashMap<MapData, u32, u32>,
    mut budget: Array<MapData, u64>,
    fast_procs: &TargetBits,
    period: Duration,
    stop: &AtomicBool,
    visits: &Visits,
) {
    // Its samples are taken when its timer fires, whatever the targets do: a thread of the
    // normal class wakes late when the CPUs are busy, that is when the targets run, so its
    // samples would fall on their waits more than their share (estimates of a wait's time
    // off by a sixth and a fifth were seen next to a CPU hog at nice 19). The lowest
    // real-time priority runs it at once, for its few tens of microseconds a run
    // (`MAX_SHARE` caps its runs' time); without the capability for it, the normal class it
    // stays in. A real-time thread wakes on the CPU it ran on last, whatever runs there and
    // whichever other is idle: it is kept on the one idle longest lately (`IdlestCpu`), not
    // on a busy target's (on a server pinned to one of two CPUs, it took 0.75% of that CPU
    // from the server, GIL holder and all, while the other was two-thirds idle).
    let mut placement = match realtime() {
        Ok(()) => {
            visits.realtime.store(true, Ordering::Relaxed);
            IdlestCpu::new()
        }
        Err(e) => {
            tracing::warn!("wall-clock sampler: {e}: its samples come late while the CPUs are busy");
            None
        }
    };
    // It needs no capability beyond what the agent keeps after loading (from Linux 6.5 the
    // kernel checks them as programs load, not as links and iterators are made): it drops
    // the rest, as the agent's own thread does.
    if crate::sys::caps::maps_usable_without_caps()
        && let Err(e) = crate::sys::caps::keep_only(&crate::sys::caps::AFTER_LOAD)
    {
        tracing::warn!("wall-clock sampler: cannot drop capabilities: {e}");
    }
    // Its wake-ups on time: the default timer slack (50 µs) would let the kernel fire its
    // timer with others'.
    // SAFETY: sets this thread's timer slack; no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let mut links: HashMap<u32, Target> = HashMap::new();
    // The kernel's count of fast threads met (slot 2 of `budget`) after the last run.
    let mut met = 0u64;
    let mut jitter = Jitter::new();
    let mut allowance = Allowance::new(MAX_SHARE, BURST);
    let mut looked = None::<Instant>;
    let mut placed = Instant::now();
    let mut last = Instant::now();
    let mut next = last + period;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // A period drawn around the one asked for, so that no periodic work of a target
        // keeps in step with the samples.
        next += period.mul_f64(jitter.next());
        let now = Instant::now();
        if next < now {
            // Fell behind (the machine was busy): the next run is a period from now.
            next = now + period;
        }
        if let Some(p) = &mut placement
            && now.duration_since(placed) >= PLACE_EVERY
        {
            placed = now;
            p.update();
        }
        let added = visits.new_targets.swap(false, Ordering::Relaxed);
        if added || looked.is_none_or(|t| now.duration_since(t) >= TARGETS_EVERY) {
            looked = Some(now);
            let pids: HashSet<u32> = targets.keys().filter_map(|k| k.ok()).collect();
            links.retain(|pid, _| pids.contains(pid));
            for pid in pids {
                if let std::collections::hash_map::Entry::Vacant(e) = links.entry(pid) {
                    match link(&prog, pid) {
                        // Visited at once: whether it has fast threads is not known yet.
                        Ok(fd) => {
                            e.insert(Target { link: fd, fast: true, visited: None });
                        }
                        Err(err) => tracing::debug!("wall-clock sampler: process {pid}: {err}"),
                    }
                }
            }
        }
        let elapsed = now.duration_since(last).as_nanos() as u64;
        last = now;
        visits.runs.fetch_add(1, Ordering::Relaxed);
        visits.gaps_ns.fetch_add(elapsed, Ordering::Relaxed);
        visits.longest_ns.fetch_max(elapsed, Ordering::Relaxed);
        // Given to the kernel before the first visit of the run (none when all are skipped).
        let mut told = false;
        for (pid, target) in &mut links {
            // Cleared before the run: a thread that turns fast during it sets it again.
            let turned = fast_procs.take(*pid);
            let due = target.visited.is_none_or(|t| now.duration_since(t) >= VISIT_AT_LEAST);
            if !target.fast && !turned && !due {
                visits.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !told {
                if budget.set(1, elapsed, 0).is_err() {
                    break;
                }
                told = true;
            }
            visits.made.fetch_add(1, Ordering::Relaxed);
            target.visited = Some(now);
            let ran = iterate(&target.link);
            if let Err(e) = &ran {
                tracing::debug!("wall-clock sampler: process {pid}: {e}");
            }
            // A run that failed part way may not have reached the fast threads, and a marked
            // process's threads may be seen fast only after the bit (the kernel sets the
            // thread's bit first, with no order between them on weakly ordered CPUs): both
            // are visited again at the next run.
            let now_met = budget.get(&2, 0).ok();
            target.fast = ran.is_err() || turned || now_met.is_none_or(|m| m != met);
            met = now_met.unwrap_or(met);
        }
        let end = Instant::now();
        if let Some(least) = allowance.spend(end, end.duration_since(now)) {
            next = next.max(least);
        }
    }
}

/// The run time the sampler may spend: `share` of the time that passes, kept up to `burst`
/// (a token bucket). Over a long time its runs take at most that share of a CPU; a short
/// stretch of slow runs is spent from what was kept.
struct Allowance {
    share: f64,
    burst: Duration,
    /// What is kept, and when it was last brought up to date.
    kept: Duration,
    at: Instant,
}

impl Allowance {
    fn new(share: f64, burst: Duration) -> Self {
        Allowance { share, burst, kept: burst, at: Instant::now() }
    }

    /// Spends `work`, a run that ended at `end`; returns when the next run may start if
    /// the allowance is overspent (it is then back to nothing at that time).
    fn spend(&mut self, end: Instant, work: Duration) -> Option<Instant> {
        let earned = end.saturating_duration_since(self.at).mul_f64(self.share);
        self.at = end;
        let kept = (self.kept + earned).min(self.burst);
        match kept.checked_sub(work) {
            Some(left) => {
                self.kept = left;
                None
            }
            None => {
                let owed = work - kept;
                self.kept = Duration::ZERO;
                let at = end + owed.div_f64(self.share);
                self.at = at;
                Some(at)
            }
        }
    }
}

/// Factors of the sampling period, uniform in [0.5, 1.5) (xorshift64).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Jitter(seed | 1)
    }

    fn next(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        0.5 + (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Puts the calling thread in the real-time class (`SCHED_FIFO`) at its lowest priority;
/// the error says what that needs.
pub(crate) fn realtime() -> Result<(), String> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets this thread's scheduling policy; `param` is alive across the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(format!(
            "no real-time priority ({}; it needs CAP_SYS_NICE and, under CONFIG_RT_GROUP_SCHED, real-time time in its cgroup)",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A link of the iterator program `prog` over the threads of process `pid`.
fn link(prog: &OwnedFd, pid: u32) -> io::Result<OwnedFd> {
    // `bpf_iter_link_info.task`: tid, pid, pid_fd.
    let info: [u32; 4] = [0, pid, 0, 0];
    // `bpf_attr.link_create`: prog_fd, target_fd, attach_type, flags, iter_info, iter_info_len.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TRACE_ITER.to_ne_bytes());
    attr[16..24].copy_from_slice(&(info.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes());
    // SAFETY: `attr` is a `bpf_attr` prefix of the size passed, whose pointer field points to
    // `info`, alive across the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the call returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs the iterator of `link` once: over the process's threads, to its end.
fn iterate(link: &OwnedFd) -> io::Result<()> {
    // `bpf_attr.iter_create`: link_fd, flags.
    let mut attr = [0u8; 8];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: `attr` is a `bpf_attr` prefix of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ITER_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as in `link`.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reads into `buf`, within its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Ok(()),
            n if n < 0 => return Err(io::Error::last_os_error()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slow_run_is_spent_from_what_was_kept() {
        let mut a = Allowance::new(0.02, Duration::from_millis(20));
        let start = a.at;
        assert_eq!(a.spend(start + Duration::from_millis(10), Duration::from_micros(5_900)), None);
        // Runs of 50 µs every 10 ms earn more than they spend: the next slow run is kept for too.
        let mut t = start + Duration::from_millis(10);
        for _ in 0..100 {
            t += Duration::from_millis(10);
            assert_eq!(a.spend(t, Duration::from_micros(50)), None);
        }
        assert_eq!(a.spend(t + Duration::from_millis(10), Duration::from_micros(5_900)), None);
    }

    #[test]
    fn slow_runs_take_the_share_over_time() {
        let mut a = Allowance::new(0.02, Duration::from_millis(20));
        let start = a.at;
        let (mut t, mut spent, mut delayed) = (start, Duration::ZERO, 0);
        let work = Duration::from_millis(5);
        for _ in 0..1_000 {
            // Each run starts 10 ms after the one before, or when the allowance says.
            let end = t + work;
            spent += work;
            t = match a.spend(end, work) {
                Some(at) => {
                    delayed += 1;
                    at.max(t + Duration::from_millis(10))
                }
                None => t + Duration::from_millis(10),
            };
        }
        let span = t.duration_since(start);
        // The share of the whole span, and the burst spent once.
        assert!(spent <= span.mul_f64(0.02) + Duration::from_millis(20), "{spent:?} of {span:?}");
        assert!(spent >= span.mul_f64(0.02) - work, "{spent:?} of {span:?}");
        assert!(delayed >= 990, "{delayed}");
    }
}
