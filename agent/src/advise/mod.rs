//! `stoker advise`: a recording session (wall-clock profile, network timing, cgroup
//! readings) whose end is advice per process: findings, worst first, each with its
//! evidence, the action and the numbers behind it (`rules`).
mod html;
pub mod rules;

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use serde::Serialize;

use self::rules::{CgroupFacts, Facts, Finding};
use crate::{
    error::{Error, Result},
    export::Format,
    net::aggregate::Direction,
    record::{self, Mode, RecordOptions, Summary},
};

/// How the advice is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AdviceFormat {
    Text,
    Json,
    /// One self-contained page: findings, CPU and memory over time, latency histograms,
    /// the wall-clock flamegraph.
    Html,
}

/// What to watch and where the advice goes.
#[derive(Debug, Clone)]
pub struct AdviseOptions {
    pub pids: Vec<u32>,
    pub command: Vec<String>,
    pub all_python: bool,
    pub duration: Option<Duration>,
    pub format: AdviceFormat,
    /// The advice's file (default: standard output); the session's wall-clock flamegraph and
    /// network report are written beside it.
    pub output: Option<PathBuf>,
}

/// The advice of a session, per process.
#[derive(Debug, Serialize)]
pub struct Advice {
    pub duration_s: f64,
    /// The wall-clock flamegraph the evidence comes from (with `output`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flamegraph: Option<PathBuf>,
    pub processes: Vec<ProcessAdvice>,
    /// What the HTML page draws.
    #[serde(skip)]
    pub charts: Charts,
}

/// The series the HTML page draws.
#[derive(Debug, Default)]
pub struct Charts {
    /// Per process: (seconds, CPUs used over the last step), and its quota.
    pub cpu: Vec<Series<f64>>,
    /// Per process: (seconds, bytes its cgroup used), and the limit.
    pub memory: Vec<Series<u64>>,
    /// Per process and endpoint: bucket upper bounds (s) and counts (one more: above).
    pub latency: Vec<(u32, String, Vec<f64>, Vec<u64>)>,
    /// The wall-clock flamegraph (SVG).
    pub flamegraph: Option<Vec<u8>>,
}

/// One process's values over the session, and the limit they are held against.
#[derive(Debug)]
pub struct Series<L> {
    pub pid: u32,
    pub points: Vec<(f64, f64)>,
    pub limit: Option<L>,
}

#[derive(Debug, Serialize)]
pub struct ProcessAdvice {
    pub pid: u32,
    pub service: String,
    pub cgroup: Option<String>,
    pub findings: Vec<Finding>,
}

/// Runs the session and gives the advice; with `output`, the flamegraph and network report
/// stay beside it, without, they go to a directory removed at the end.
pub fn run(opts: &AdviseOptions) -> Result<Advice> {
    let scratch = match &opts.output {
        Some(_) => None,
        None => Some(Scratch::new()?),
    };
    let profile = match (&opts.output, &scratch) {
        (Some(out), _) => {
            let stem =
                out.file_stem().map_or_else(|| "stoker-advice".into(), |s| s.to_string_lossy().into_owned());
            out.with_file_name(format!("{stem}.wall.svg"))
        }
        (None, Some(dir)) => dir.0.join("advise.svg"),
        (None, None) => unreachable!("a scratch directory without an output"),
    };
    let record = RecordOptions {
        pids: opts.pids.clone(),
        command: opts.command.clone(),
        duration: opts.duration,
        rate_hz: 99,
        format: Format::Flamegraph,
        output: Some(profile.clone()),
        all_python: opts.all_python,
        subprocesses: true,
        native: false,
        threads: false,
        nolineno: false,
        full_filenames: false,
        kernel_stats: false,
        net: true,
        net_detail: crate::net::NetDetail::Full,
        mode: Mode::Wall,
        gil: false,
        loop_block_threshold: Some(Duration::from_millis(100)),
        switch_budget: record::DEFAULT_SWITCH_BUDGET,
        waits: crate::collect::Waits::default(),
    };
    let summary = record::run(&record)?;
    let mut advice = advise(&summary);
    advice.charts.flamegraph = std::fs::read(&profile).ok();
    advice.flamegraph = opts.output.as_ref().map(|_| profile);
    Ok(advice)
}

/// A directory of this process's own, removed with everything in it when dropped.
struct Scratch(PathBuf);

impl Scratch {
    /// A new directory (never one that exists: another user could have made it).
    fn new() -> Result<Self> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("stoker-advise-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|source| Error::Output { path: dir.clone(), source })?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The advice for what a session measured.
pub fn advise(summary: &Summary) -> Advice {
    let processes = facts(summary)
        .into_iter()
        .map(|f| ProcessAdvice {
            pid: f.pid,
            service: f.service.clone(),
            cgroup: f.cgroup.as_ref().map(|c| c.path.clone()),
            findings: rules::findings(&f),
        })
        .collect();
    Advice { duration_s: summary.elapsed.as_secs_f64(), flamegraph: None, processes, charts: charts(summary) }
}

/// CPU and memory over time, and latency histograms, per process.
fn charts(s: &Summary) -> Charts {
    let mut pids: Vec<u32> = s.timeline.iter().map(|p| p.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    let mut charts = Charts::default();
    for pid in pids {
        let points: Vec<_> = s.timeline.iter().filter(|p| p.pid == pid).collect();
        let cpu: Vec<(f64, f64)> = points
            .windows(2)
            .filter_map(|w| {
                let (a, b) = (w[0], w[1]);
                Some((b.t, (b.cpu_s? - a.cpu_s?) / (b.t - a.t).max(1e-9)))
            })
            .collect();
        let cgroup = s.cgroups.iter().find(|c| c.pids.contains(&pid));
        if !cpu.is_empty() {
            charts.cpu.push(Series { pid, points: cpu, limit: cgroup.and_then(|c| c.last.cpu_quota) });
        }
        let memory: Vec<(f64, f64)> = points.iter().filter_map(|p| Some((p.t, p.memory? as f64))).collect();
        if !memory.is_empty() {
            charts.memory.push(Series {
                pid,
                points: memory,
                limit: cgroup.and_then(|c| c.last.memory_limit),
            });
        }
    }
    if let Some((report, _)) = &s.net {
        for e in report.endpoints.iter().filter(|e| e.count > 0) {
            let name = format!("{} {}", e.direction.name(), endpoint(e));
            charts.latency.push((e.pid, name, report.bucket_bounds_s.clone(), e.bucket_counts.clone()));
        }
    }
    charts
}

/// Per process: what the session measured of it.
fn facts(s: &Summary) -> Vec<Facts> {
    let children = children();
    let elapsed_s = s.elapsed.as_secs_f64();
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut pids: Vec<u32> =
        s.cpu.iter().map(|(pid, _)| *pid).chain(s.states.iter().map(|(pid, _)| *pid)).collect();
    pids.sort_unstable();
    pids.dedup();
    let samples: u64 = s.top.iter().map(|(_, n)| n).sum::<u64>().max(1);
    let top: Vec<(String, f64)> = s
        .top
        .iter()
        .take(3)
        .map(|(f, n)| (f.function_label(), 100.0 * *n as f64 / s.samples.max(samples) as f64))
        .collect();
    pids.into_iter()
        .map(|pid| {
            let cgroup = s.cgroups.iter().find(|c| c.pids.contains(&pid)).map(|span| {
                let readings = s.timeline.iter().filter(|p| p.pid == pid).filter_map(|p| p.memory);
                CgroupFacts::between(&span.first, &span.last, readings.max())
            });
            let net = s.net.as_ref().map(|(report, _)| report);
            let servers = net
                .map(|r| {
                    r.endpoints
                        .iter()
                        .filter(|e| e.pid == pid && e.direction == Direction::Server)
                        .map(|e| rules::Server {
                            name: endpoint(e),
                            count: e.count,
                            own_ms: e.latency.mean_ms,
                            total_ms: e.total.map(|t| t.mean_ms),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let stalls = net
                .map(|r| {
                    r.stalls
                        .iter()
                        .filter(|st| st.pid == pid)
                        .map(|st| {
                            let requests = r
                                .endpoints
                                .iter()
                                .filter(|e| {
                                    e.pid == pid && e.direction == st.side && endpoint(e) == st.endpoint
                                })
                                .map(|e| e.count)
                                .sum();
                            rules::Stall {
                                side: st.side.name(),
                                endpoint: st.endpoint.clone(),
                                cause: st.cause,
                                count: st.count,
                                mean_ms: st.mean_ms,
                                requests,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut upstreams: Vec<String> = net
                .map(|r| {
                    let clients =
                        r.endpoints.iter().filter(|e| e.pid == pid && e.direction == Direction::Client);
                    let connects = r.connects.iter().filter(|c| c.pid == pid).map(|c| c.peer.to_string());
                    clients.filter_map(|e| e.peer.map(|p| p.to_string())).chain(connects).collect()
                })
                .unwrap_or_default();
            upstreams.sort();
            upstreams.dedup();
            Facts {
                pid,
                upstreams,
                workers: s
                    .workers
                    .iter()
                    .find(|(p, _)| *p == pid)
                    .map_or_else(|| workers(pid, &children), |(_, n)| *n),
                service: s
                    .comms
                    .iter()
                    .find(|(p, _)| *p == pid)
                    .map_or_else(|| crate::sys::process::comm(pid), |(_, c)| c.clone()),
                elapsed_s,
                cpu_s: s.cpu.iter().find(|(p, _)| *p == pid).map(|(_, c)| *c),
                host_cpus,
                cgroup,
                states: s
                    .states
                    .iter()
                    .find(|(p, _)| *p == pid)
                    .map(|(_, st)| st.clone())
                    .unwrap_or_default(),
                loop_blocks: s
                    .loop_blocks
                    .iter()
                    .filter(|b| b.pid == pid)
                    .map(|b| {
                        let function =
                            b.stack.last().map_or_else(|| "code not sampled".into(), ToString::to_string);
                        (b.seconds, function)
                    })
                    .collect(),
                servers,
                stalls,
                top: top.clone(),
                ..Default::default()
            }
        })
        .collect()
}

/// Every process's children, from one scan of /proc.
pub(crate) fn children() -> std::collections::HashMap<u32, Vec<u32>> {
    let mut out: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    for pid in crate::sys::process::all_pids() {
        if let Some(parent) = crate::sys::process::parent(pid) {
            out.entry(parent).or_default().push(pid);
        }
    }
    out
}

/// Children of `pid` running its program in its cgroup: a pre-fork server's workers.
pub(crate) fn workers(pid: u32, children: &std::collections::HashMap<u32, Vec<u32>>) -> u32 {
    use crate::sys::{cgroup::Cgroup, process};
    let Some(kids) = children.get(&pid) else { return 0 };
    let (exe, cgroup) = (process::exe(pid), Cgroup::of(pid));
    if exe.is_none() {
        return 0;
    }
    kids.iter().filter(|&&c| process::exe(c) == exe && Cgroup::of(c) == cgroup).count() as u32
}

/// An endpoint as the stalls table names it.
fn endpoint(e: &crate::net::report::EndpointRow) -> String {
    crate::net::report::endpoint_name(e.peer, e.method, e.route.as_deref())
}

impl Advice {
    pub fn render(&self, format: AdviceFormat) -> String {
        match format {
            AdviceFormat::Json => serde_json::to_string_pretty(self).unwrap_or_default() + "\n",
            AdviceFormat::Text => self.text(),
            AdviceFormat::Html => html::render(self, &self.charts),
        }
    }

    fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "stoker advise: {:.1} s watched", self.duration_s);
        if let Some(svg) = &self.flamegraph {
            let _ = writeln!(s, "wall-clock flamegraph: {}", svg.display());
        }
        for p in &self.processes {
            let cgroup = p.cgroup.as_deref().map_or(String::new(), |c| format!(", cgroup {c}"));
            let _ = writeln!(s, "\n{} (pid {}{cgroup})", p.service, p.pid);
            for f in &p.findings {
                let severity = serde_json::to_value(f.severity).ok();
                let severity = severity.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
                let _ = writeln!(s, "  [{severity}] {}: {}", f.rule, f.title);
                for e in &f.evidence {
                    let _ = writeln!(s, "      evidence: {e}");
                }
                let _ = writeln!(s, "      action:   {}", f.action);
                if let Some(math) = f.numbers.get("math").and_then(|m| m.as_str()) {
                    let _ = writeln!(s, "      math:     {math}");
                }
            }
        }
        s
    }
}
