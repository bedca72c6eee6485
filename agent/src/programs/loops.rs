//! Blocked event loops: the threshold the kernel programs use, attaching them to the
//! event-wait system calls, and the stretches they report.
use std::time::{Duration, Instant};

use agent_ebpf::{LoopBlock, MAP_LOOP_BLOCKS, MAP_LOOP_THRESHOLD, PROG_LOOP_ENTER, PROG_LOOP_EXIT};
use aya::maps::{Array, MapData, RingBuf};

use super::{KernelPrograms, attach};
use crate::{
    error::{Error, Result, one_line},
    sys::{process, tracefs},
};

/// The event-wait system calls of event loops: asyncio's and gevent's epoll, uvloop's.
const WAITS: [&str; 3] = ["epoll_wait", "epoll_pwait", "epoll_pwait2"];

impl KernelPrograms {
    /// Starts reporting stretches of at least `threshold` on which an event-loop thread of a
    /// target did not go back to waiting for events.
    pub fn watch_loops(&mut self, threshold: Duration) -> Result<()> {
        let feature = "the epoll system call tracepoints";
        tracefs::ensure_mounted().map_err(|e| Error::KernelFeature { feature, detail: e.to_string() })?;
        let mut config: Array<&mut MapData, u64> = self.map_mut(MAP_LOOP_THRESHOLD)?;
        config
            .set(0, threshold.as_nanos().max(1) as u64, 0)
            .map_err(|e| Error::Ebpf { what: "setting the event-loop threshold", detail: one_line(&e) })?;
        // epoll_pwait2 is Linux 5.11+: the calls this kernel has.
        let have = |event: &String| tracefs::field_offset("syscalls", event, "__syscall_nr").is_ok();
        for (prog, side) in [(PROG_LOOP_EXIT, "exit"), (PROG_LOOP_ENTER, "enter")] {
            let events: Vec<String> = WAITS.iter().map(|w| format!("sys_{side}_{w}")).filter(have).collect();
            if events.is_empty() {
                return Err(Error::KernelFeature {
                    feature,
                    detail: "no sys_*_epoll_wait tracepoint".into(),
                });
            }
            let points: Vec<(&str, &str)> = events.iter().map(|e| ("syscalls", e.as_str())).collect();
            attach::tracepoint(self, prog, &points, feature, "loading the event-loop programs")?;
        }
        let map = self
            .ebpf
            .take_map(MAP_LOOP_BLOCKS)
            .ok_or(Error::Ebpf { what: "kernel map missing", detail: MAP_LOOP_BLOCKS.into() })?;
        self.loop_blocks = Some(
            RingBuf::try_from(map)
                .map_err(|e| Error::Ebpf { what: "mapping the loop ring", detail: one_line(&e) })?,
        );
        Ok(())
    }

    /// The blocked stretches reported since the last call.
    pub fn take_loop_blocks(&mut self) -> Vec<LoopBlock> {
        let Some(ring) = self.loop_blocks.as_mut() else { return Vec::new() };
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<LoopBlock>() {
                // SAFETY: the kernel wrote a `LoopBlock` (plain integers, any bits valid);
                // the read is unaligned-safe and within the item.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const LoopBlock) });
            }
        }
        out
    }
}

/// Watching event loops, started once a target has an epoll instance. The programs hook
/// system-call tracepoints, and while any is attached the kernel sends every system call of
/// every thread on the host through its tracing path (about 40 ns more per call here, a
/// third of a short call): a session whose targets run no event loop does not pay that.
pub struct LoopWatch {
    threshold: Duration,
    /// Until the programs are attached (or failed to be): when the targets are looked at next.
    next_look: Option<Instant>,
}

impl LoopWatch {
    /// Looks at the targets' descriptors at most this share of the time: a target with many
    /// of them is looked at less often.
    const SHARE: u32 = 100;

    pub fn new(threshold: Duration) -> Self {
        Self { threshold, next_look: Some(Instant::now()) }
    }

    /// Attaches the programs once one of `pids` holds an epoll instance; a failure is a
    /// warning, and the session goes on without loop reports.
    pub fn update(&mut self, kernel: &mut KernelPrograms, pids: &[u32]) {
        let Some(next) = self.next_look else { return };
        let now = Instant::now();
        if now < next {
            return;
        }
        if !pids.iter().any(|&pid| process::has_epoll(pid)) {
            self.next_look = Some(Instant::now() + now.elapsed() * Self::SHARE);
            return;
        }
        self.next_look = None;
        if let Err(e) = kernel.watch_loops(self.threshold) {
            tracing::warn!("blocked event loops are not reported: {e}");
        }
    }
}
