//! `stoker top`: a live view, refreshed every second, of the functions the targets spend
//! their CPU in, as py-spy's `top` shows it: own and total shares of the last second, own
//! and total CPU time since the start, sorted by a column the keys choose. The same kernel
//! sampling as `record` (no ptrace stop).
use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent_ebpf::TARGET_SAMPLE;

use crate::{
    collect::{Collector, Tracker, View},
    error::Result,
    profile::{Frame, Profile},
    programs::KernelPrograms,
    record::target::Target,
};

const TICK: Duration = Duration::from_millis(100);
const REFRESH: Duration = Duration::from_secs(1);

/// What `stoker top` watches.
#[derive(Debug, Clone)]
pub struct TopOptions {
    pub pids: Vec<u32>,
    pub all_python: bool,
    pub rate_hz: u64,
    /// Stop after this long (default: when the targets exit, `q` or Ctrl-C).
    pub duration: Option<Duration>,
}

/// The column rows are sorted by (keys 1 to 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    OwnShare,
    TotalShare,
    OwnTime,
    TotalTime,
}

impl Sort {
    fn name(self) -> &'static str {
        match self {
            Sort::OwnShare => "%own",
            Sort::TotalShare => "%total",
            Sort::OwnTime => "own time",
            Sort::TotalTime => "total time",
        }
    }
}

/// Samples of a function as the leaf (own) and anywhere in the stack (total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    own: u64,
    total: u64,
}

/// Every function's counts in `profile` (Python functions as one over their lines).
fn by_function(profile: &Profile) -> HashMap<Frame, Counts> {
    let mut out: HashMap<Frame, Counts> = HashMap::new();
    for (frames, n) in &profile.stacks {
        let mut seen: Vec<Frame> = Vec::new();
        for frame in frames {
            let f = frame.function_level();
            if !seen.contains(&f) {
                out.entry(f.clone()).or_default().total += n;
                seen.push(f);
            }
        }
        if let Some(leaf) = frames.last() {
            out.entry(leaf.function_level()).or_default().own += n;
        }
    }
    out
}

/// The terminal in non-canonical mode without echo (keys arrive one by one, unseen) and on
/// its alternate screen, restored when dropped; nothing when stdin is not a terminal.
struct Terminal {
    saved: Option<libc::termios>,
}

impl Terminal {
    fn open() -> Self {
        // SAFETY: an all-zero termios is a valid value to be overwritten by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid, writable termios.
        if unsafe { libc::isatty(0) } != 1 || unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Self { saved: None };
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 0;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd 0 and a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        print!("\x1b[?1049h\x1b[?25l");
        Self { saved: Some(saved) }
    }

    /// Keys pressed since the last call.
    fn keys(&self) -> Vec<u8> {
        if self.saved.is_none() {
            return Vec::new();
        }
        let mut buf = [0u8; 32];
        // SAFETY: reads at most `buf.len()` bytes into `buf`; VMIN 0 makes it return at once.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        buf[..n.max(0) as usize].to_vec()
    }

    /// Rows of the terminal (40 when unknown).
    fn rows(&self) -> usize {
        // SAFETY: an all-zero winsize is valid; the ioctl only writes it.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ on stdout with a valid, writable winsize.
        let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut size) } == 0;
        if ok && size.ws_row > 0 { usize::from(size.ws_row) } else { 40 }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            print!("\x1b[?25h\x1b[?1049l");
            let _ = std::io::stdout().flush();
            // SAFETY: fd 0 and the termios read at the start.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
        }
    }
}

/// Runs the live view until the targets exit, the duration passes, `q` or Ctrl-C.
pub fn run(opts: &TopOptions) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let mut targets = opts.pids.iter().map(|&pid| Target::attach(pid)).collect::<Result<Vec<_>>>()?;
    let mut kernel = KernelPrograms::load(false)?;
    if let Err(e) = kernel.watch_execs(opts.all_python) {
        tracing::warn!("a target that execs is looked at again within 500 ms only: {e}");
    }
    kernel.start(opts.rate_hz)?;
    let mut tracker = Tracker::new(opts.all_python, false);
    tracker.name_early();
    let mut collector = Collector::new(false);
    for target in &targets {
        kernel.add_target(target.pid(), TARGET_SAMPLE)?;
        tracker.add_attached(target.pid());
    }
    let what = match opts.all_python {
        true => "every CPython process".to_string(),
        false => {
            let each: Vec<String> =
                opts.pids.iter().map(|&p| format!("pid {p} ({})", crate::sys::process::comm(p))).collect();
            each.join(", ")
        }
    };
    let terminal = Terminal::open();
    let mut sort = Sort::OwnShare;
    let mut last: HashMap<Frame, Counts> = HashMap::new();
    let started = Instant::now();
    let mut next = started + REFRESH;
    let mut shown = String::from("waiting for the first samples...\n");
    loop {
        tracker.update(&mut kernel, &mut collector)?;
        tracker.wait(TICK, &mut kernel, &mut collector)?;
        for key in terminal.keys() {
            match key {
                b'1' => sort = Sort::OwnShare,
                b'2' => sort = Sort::TotalShare,
                b'3' => sort = Sort::OwnTime,
                b'4' => sort = Sort::TotalTime,
                b'q' | b'Q' => stop.store(true, Ordering::Relaxed),
                _ => continue,
            }
            next = Instant::now();
        }
        let exited = !targets.is_empty() && targets.iter_mut().all(Target::has_exited);
        if stop.load(Ordering::Relaxed) || exited || opts.duration.is_some_and(|d| started.elapsed() >= d) {
            drop(terminal);
            if exited {
                eprintln!("stoker: the target exited");
            }
            print!("{shown}");
            return Ok(());
        }
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + REFRESH;
        let live = tracker.live_targets();
        collector.collect(&kernel, &live, true)?;
        let view = View { root_per_process: false, threads: false, native: false };
        let now = by_function(&collector.profile(view));
        let header =
            format!("stoker top: {what}, {} Hz, {:.0} s", opts.rate_hz, started.elapsed().as_secs_f64());
        shown = render(&header, &now, &last, sort, opts.rate_hz, terminal.rows());
        print!("\x1b[H\x1b[2J{shown}");
        let _ = std::io::stdout().flush();
        // Keys pressed since change only the order: the counts stay those of this second.
        if !now.is_empty() {
            last = now;
        }
    }
}

/// The screen: a header, the column names and a row per function, at most `rows` lines.
fn render(
    header: &str,
    now: &HashMap<Frame, Counts>,
    last: &HashMap<Frame, Counts>,
    sort: Sort,
    rate_hz: u64,
    rows: usize,
) -> String {
    let delta = |f: &Frame, c: &Counts| {
        let before = last.get(f).copied().unwrap_or_default();
        Counts { own: c.own.saturating_sub(before.own), total: c.total.saturating_sub(before.total) }
    };
    let interval: u64 = now.iter().map(|(f, c)| delta(f, c).own).sum();
    let all: u64 = now.values().map(|c| c.own).sum();
    let share = |n: u64| 100.0 * n as f64 / interval.max(1) as f64;
    let seconds = |n: u64| n as f64 / rate_hz.max(1) as f64;
    let mut rows_of: Vec<(&Frame, Counts, Counts)> = now.iter().map(|(f, c)| (f, delta(f, c), *c)).collect();
    rows_of.sort_by(|a, b| {
        let key = |r: &(&Frame, Counts, Counts)| match sort {
            Sort::OwnShare => (r.1.own, r.2.own),
            Sort::TotalShare => (r.1.total, r.2.total),
            Sort::OwnTime => (r.2.own, r.1.own),
            Sort::TotalTime => (r.2.total, r.1.total),
        };
        key(b).cmp(&key(a)).then_with(|| a.0.function_label().cmp(&b.0.function_label()))
    });
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{header}; sorted by {} (keys: 1 %own, 2 %total, 3 own time, 4 total time; q quits)",
        sort.name()
    );
    let _ = writeln!(
        s,
        "last second: {interval} samples ({:.2} CPUs); since the start: {all} samples ({:.1} s of CPU)",
        seconds(interval),
        seconds(all)
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "  %Own  %Total  OwnTime  TotalTime  Function (file)");
    for (frame, d, c) in rows_of.iter().take(rows.saturating_sub(5).max(1)) {
        let _ = writeln!(
            s,
            "{:5.1}%  {:5.1}%  {:6.2}s  {:8.2}s  {}",
            share(d.own),
            share(d.total),
            seconds(c.own),
            seconds(c.total),
            frame.function_label()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py(function: &str, line: u32) -> Frame {
        Frame::Python { function: function.into(), file: "app.py".into(), line }
    }

    /// Own counts a function as the leaf, total anywhere in the stack (once per stack, a
    /// recursion too), every line of a function as one.
    #[test]
    fn own_and_total_by_function() {
        let profile = Profile {
            stacks: vec![
                (vec![py("main", 1), py("work", 5)], 3),
                (vec![py("main", 2), py("work", 6), py("work", 7)], 2),
                (vec![py("main", 1)], 1),
            ],
            ..Default::default()
        };
        let counts = by_function(&profile);
        assert_eq!(counts[&py("main", 0)], Counts { own: 1, total: 6 });
        assert_eq!(counts[&py("work", 0)], Counts { own: 5, total: 5 });
    }
}
