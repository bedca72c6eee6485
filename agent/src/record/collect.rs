//! Reads the kernel's aggregation while targets run and turns it into named stacks,
//! resolving each new stack while its process still lives.
use std::{collections::HashMap, sync::Arc};

use agent_ebpf::{DROPPED_STACK, SampleKey};

use crate::{
    error::Result,
    export::Profile,
    sampling::Sampler,
    symbolize::{KERNEL_SUFFIX, Symbolizer, UNKNOWN},
    sys::process,
};

/// Accumulated, symbolized view of the kernel's counts.
#[derive(Default)]
pub struct Collector {
    symbolizer: Symbolizer,
    user_stacks: HashMap<(u32, i32), Arc<[Arc<str>]>>,
    kernel_stacks: HashMap<i32, Arc<[Arc<str>]>>,
    counts: Vec<(SampleKey, u64)>,
    comms: HashMap<u32, String>,
}

impl Collector {
    /// Reads the current counts and resolves stacks not seen before.
    pub fn collect(&mut self, sampler: &Sampler, live_pids: &[u32]) -> Result<()> {
        for &pid in live_pids {
            self.symbolizer.refresh(pid);
            self.comms.entry(pid).or_insert_with(|| process::comm(pid));
        }
        self.counts = sampler.counts()?;
        for i in 0..self.counts.len() {
            let key = self.counts[i].0;
            if key.user_stack_id >= 0 && !self.user_stacks.contains_key(&(key.tgid, key.user_stack_id)) {
                let ips = sampler.stack(key.user_stack_id as u32).unwrap_or_default();
                let names = self.symbolizer.user_frames(key.tgid, &ips);
                self.user_stacks.insert((key.tgid, key.user_stack_id), names.into());
            }
            if key.kernel_stack_id >= 0 && !self.kernel_stacks.contains_key(&key.kernel_stack_id) {
                let ips = sampler.stack(key.kernel_stack_id as u32).unwrap_or_default();
                let names = self.symbolizer.kernel_frames(&ips);
                self.kernel_stacks.insert(key.kernel_stack_id, names.into());
            }
        }
        Ok(())
    }

    /// Samples counted so far.
    pub fn samples(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }

    /// Builds the profile; with `root_per_process`, each stack starts at its process.
    pub fn profile(&self, root_per_process: bool) -> Profile {
        let mut stacks = Vec::with_capacity(self.counts.len());
        for (key, count) in &self.counts {
            let mut frames: Vec<Arc<str>> = Vec::new();
            if root_per_process {
                let comm = self.comms.get(&key.tgid).map(String::as_str).unwrap_or("?");
                frames.push(Arc::from(format!("{comm} [pid {}]", key.tgid)));
            }
            match self.user_stacks.get(&(key.tgid, key.user_stack_id)) {
                Some(user) => frames.extend(user.iter().rev().cloned()),
                None if key.user_stack_id == DROPPED_STACK => frames.push(Arc::from("[user stack dropped]")),
                None => {}
            }
            match self.kernel_stacks.get(&key.kernel_stack_id) {
                Some(kernel) => frames.extend(kernel.iter().rev().cloned()),
                None if key.kernel_stack_id == DROPPED_STACK => {
                    frames.push(Arc::from(format!("[kernel stack dropped]{KERNEL_SUFFIX}")))
                }
                None => {}
            }
            if frames.len() == usize::from(root_per_process) {
                frames.push(Arc::from(UNKNOWN));
            }
            stacks.push((frames, *count));
        }
        Profile { stacks, ..Default::default() }
    }

    pub fn comm(&self, pid: u32) -> Option<&str> {
        self.comms.get(&pid).map(String::as_str)
    }
}
