//! Output formats of a recorded profile: collapsed stacks ("folded"), flamegraph SVGs,
//! pprof (gzipped `profile.proto`) and speedscope JSON.
pub mod folded;
pub mod pprof;
pub mod speedscope;

use std::{
    io::Write,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::error::{Error, Result};

/// A finished profile: stacks root to leaf with their sample counts.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Shown as the flamegraph's title.
    pub title: String,
    /// Shown under the title: the session's parameters.
    pub subtitle: String,
    pub stacks: Vec<(Vec<Arc<str>>, u64)>,
    /// Samples per second per CPU (pprof's period is 1e9 / rate_hz ns).
    pub rate_hz: u64,
    /// When sampling started.
    pub start: Option<SystemTime>,
    /// How long it sampled.
    pub duration: Duration,
}

impl Profile {
    pub fn total(&self) -> u64 {
        self.stacks.iter().map(|(_, n)| n).sum()
    }

    /// Leaf functions by sample count, largest first.
    pub fn top_leaves(&self, n: usize) -> Vec<(Arc<str>, u64)> {
        let mut by_leaf: std::collections::HashMap<Arc<str>, u64> = Default::default();
        for (frames, count) in &self.stacks {
            if let Some(leaf) = frames.last() {
                *by_leaf.entry(leaf.clone()).or_default() += count;
            }
        }
        let mut leaves: Vec<_> = by_leaf.into_iter().collect();
        leaves.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        leaves.truncate(n);
        leaves
    }
}

/// The file formats `stoker record` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An interactive SVG flamegraph.
    Flamegraph,
    /// Collapsed stacks, one line per stack: `root;...;leaf count`.
    Folded,
    /// pprof's gzipped `profile.proto` (go tool pprof, Grafana Pyroscope).
    Pprof,
    /// speedscope's JSON file format (https://www.speedscope.app).
    Speedscope,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Flamegraph => "svg",
            Format::Folded => "folded",
            Format::Pprof => "pb.gz",
            Format::Speedscope => "speedscope.json",
        }
    }
}

/// Writes the profile in `format`.
pub fn write(profile: &Profile, format: Format, out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        Format::Folded => {
            for line in folded::lines(profile) {
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        Format::Flamegraph => flamegraph(profile, out),
        Format::Pprof => {
            let meta = pprof::PprofMeta {
                rate_hz: profile.rate_hz,
                start: profile.start.unwrap_or_else(SystemTime::now),
                duration: profile.duration,
            };
            out.write_all(&pprof::encode(profile, &meta))
        }
        Format::Speedscope => speedscope::write(profile, out),
    }
}

fn flamegraph(profile: &Profile, out: &mut dyn Write) -> std::io::Result<()> {
    let lines = folded::lines(profile);
    let mut options = inferno::flamegraph::Options::default();
    options.title = profile.title.clone();
    options.subtitle = Some(profile.subtitle.clone());
    options.count_name = "samples".into();
    if lines.is_empty() {
        // inferno refuses empty input; an empty profile is still a valid SVG.
        return write!(
            out,
            "<?xml version=\"1.0\" standalone=\"no\"?><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"60\"><text x=\"10\" y=\"30\">{}: no samples</text></svg>",
            xml_escape(&profile.title)
        );
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
        .map_err(std::io::Error::other)
}

/// Writes the profile to a file created beforehand.
pub fn write_file(
    profile: &Profile,
    format: Format,
    path: &std::path::Path,
    file: std::fs::File,
) -> Result<()> {
    let mut w = std::io::BufWriter::new(file);
    write(profile, format, &mut w)
        .and_then(|_| w.flush())
        .map_err(|source| Error::Output { path: path.to_path_buf(), source })
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
