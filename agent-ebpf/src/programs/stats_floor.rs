//! An empty program. Attached only while the kernel's run-time statistics are measured, it
//! shows what the statistics add to every run on their own (a clock read on each side), so
//! reported program costs can be told apart from it.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

#[tracepoint]
pub fn stats_floor(_ctx: TracePointContext) -> u32 {
    0
}
