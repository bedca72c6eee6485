//! A finished profile as data: stacks of typed frames with their sample counts, and the
//! session's title, rate and time. Output formats and exporters read it.
pub mod frame;

use std::time::{Duration, SystemTime};

pub use self::frame::{Frame, FrameKind, Marker};

/// A finished profile: stacks root to leaf with their sample counts.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Shown as the flamegraph's title.
    pub title: String,
    /// Shown under the title: the session's parameters.
    pub subtitle: String,
    pub stacks: Vec<(Vec<Frame>, u64)>,
    /// Samples per second per CPU (pprof's period is 1e9 / rate_hz ns).
    pub rate_hz: u64,
    /// When sampling started.
    pub start: Option<SystemTime>,
    /// How long it sampled.
    pub duration: Duration,
    /// What the stacks' values count.
    pub unit: Unit,
}

/// What a profile's values count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Unit {
    /// CPU samples (one stands for 1 / rate_hz seconds of CPU time).
    #[default]
    Samples,
    /// Microseconds of thread time (wall-clock and off-CPU profiles).
    Microseconds,
}

impl Profile {
    pub fn total(&self) -> u64 {
        self.stacks.iter().map(|(_, n)| n).sum()
    }

    /// Python frames without their lines (`--nolineno`): the lines of a function are one
    /// frame, and stacks that differed only in lines are one stack.
    pub fn without_lines(&mut self) {
        let mut index: std::collections::HashMap<Vec<Frame>, usize> = std::collections::HashMap::new();
        let mut stacks: Vec<(Vec<Frame>, u64)> = Vec::new();
        for (frames, n) in self.stacks.drain(..) {
            let frames: Vec<Frame> = frames.iter().map(Frame::function_level).collect();
            match index.get(&frames) {
                Some(&i) => stacks[i].1 += n,
                None => {
                    index.insert(frames.clone(), stacks.len());
                    stacks.push((frames, n));
                }
            }
        }
        self.stacks = stacks;
    }

    /// The weight (samples, or microseconds) of stacks holding a Python code object that was
    /// gone before it could be read, and the weight of all stacks.
    pub fn unreadable_code(&self) -> (u64, u64) {
        let unreadable =
            |frames: &[Frame]| frames.iter().any(|f| matches!(f, Frame::PythonUnreadable { .. }));
        let total = self.stacks.iter().map(|(_, n)| n).sum();
        (self.stacks.iter().filter(|(f, _)| unreadable(f)).map(|(_, n)| n).sum(), total)
    }

    /// Leaf functions by sample count, largest first: a Python function's lines count
    /// together (its frame is given with line 0, see `Frame::function_label`).
    pub fn top_leaves(&self, n: usize) -> Vec<(Frame, u64)> {
        let mut by_leaf: std::collections::HashMap<Frame, u64> = Default::default();
        for (frames, count) in &self.stacks {
            if let Some(leaf) = frames.last() {
                *by_leaf.entry(leaf.function_level()).or_default() += count;
            }
        }
        let mut leaves: Vec<(Frame, u64)> = by_leaf.into_iter().collect();
        leaves.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.to_string().cmp(&b.0.to_string())));
        leaves.truncate(n);
        leaves
    }
}
