//! What `record` and the node agent share between the kernel programs and their outputs:
//! which processes are targets (and which are Python), and their stacks, named.
pub mod stacks;
pub mod tracker;
pub mod waits;
pub mod wall;

use std::time::{Duration, Instant};

use crate::programs::KernelPrograms;

pub use self::{
    stacks::{Collector, View},
    tracker::Tracker,
    wall::{Mode, PythonThreads, Waits},
};

/// When to name new stacks: as soon as the kernel added keys (a short-lived process's code
/// objects and mappings can be read only while it lives), at most every tick, with at most
/// a tenth of the time spent naming (a node full of new stacks is named less often), and
/// at least every `WAIT_AT_MOST` while there are new keys (one slow pass, such as the first
/// of a busy node, does not leave a short-lived process unnamed).
const WAIT_AT_MOST: Duration = Duration::from_millis(500);

pub struct NamingPace {
    named_keys: u64,
    last: Option<Instant>,
    took: Duration,
}

impl Default for NamingPace {
    fn default() -> Self {
        Self::new()
    }
}

impl NamingPace {
    pub fn new() -> Self {
        Self { named_keys: 0, last: None, took: Duration::ZERO }
    }

    /// Runs `collect` (which names new stacks) if it is time, or if `now`.
    pub fn name(
        &mut self,
        kernel: &KernelPrograms,
        now: bool,
        collect: impl FnOnce() -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        let keys = kernel.new_keys();
        let rested = self.last.is_none_or(|t| t.elapsed() >= (self.took * 10).min(WAIT_AT_MOST));
        if !now && (keys == self.named_keys || !rested) {
            return Ok(());
        }
        let started = Instant::now();
        collect()?;
        self.named_keys = keys;
        self.took = started.elapsed();
        self.last = Some(Instant::now());
        Ok(())
    }
}
