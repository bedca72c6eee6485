//! How large the maps whose memory grows with the CPU count are made on this node: the
//! sample counts (a per-CPU hash map) within a byte budget, the event ring per online CPU.
use agent_ebpf::{COUNTS_CAPACITY, NetEvent, SampleKey};

/// Default budget of the sample counts map: 0.5 MiB per CPU up to 64 CPUs.
pub const DEFAULT_COUNTS_BYTES: u64 = 32 << 20;
/// Fewest count entries, whatever the budget: a busy process has a few hundred stacks.
const MIN_COUNTS: u32 = 4096;
/// What a per-CPU hash element costs besides its per-CPU values: the element (key, hash,
/// list links, pointer to the values) and the per-CPU allocation's own bookkeeping.
const ELEMENT_OVERHEAD: u64 = 64;

/// Map sizes for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Entries of the sample counts map.
    pub counts: u32,
    /// CPU ids the event ring has a region for (the highest online id plus one).
    pub event_cpus: u32,
    /// CPU ids the kernel allocates per-CPU values for.
    pub possible_cpus: u32,
}

impl MapSizes {
    /// Sizes for `possible` and `online` CPU ids, the counts within `counts_bytes`.
    pub fn plan(possible: u32, online: u32, counts_bytes: u64) -> Self {
        let per_entry = size_of::<SampleKey>() as u64 + ELEMENT_OVERHEAD + 8 * u64::from(possible.max(1));
        let counts =
            (counts_bytes / per_entry).clamp(u64::from(MIN_COUNTS), u64::from(COUNTS_CAPACITY)) as u32;
        Self { counts, event_cpus: online.clamp(1, possible.max(1)), possible_cpus: possible }
    }

    /// Bytes the sample counts take, roughly.
    pub fn counts_bytes(&self) -> u64 {
        u64::from(self.counts)
            * (size_of::<SampleKey>() as u64 + ELEMENT_OVERHEAD + 8 * u64::from(self.possible_cpus))
    }

    /// Bytes the network event ring takes.
    pub fn ring_bytes(&self) -> u64 {
        u64::from(super::net_layout::event_slots(self.event_cpus)) * size_of::<NetEvent>() as u64
    }
}

#[cfg(test)]
mod tests {
    use agent_ebpf::NET_RING_SLOTS;

    use super::*;

    #[test]
    fn counts_fit_the_budget_and_the_ring_the_online_cpus() {
        let small = MapSizes::plan(2, 2, DEFAULT_COUNTS_BYTES);
        assert_eq!(small.counts, COUNTS_CAPACITY, "a small node keeps the full map");
        let big = MapSizes::plan(192, 192, DEFAULT_COUNTS_BYTES);
        assert!(big.counts < COUNTS_CAPACITY && big.counts_bytes() <= DEFAULT_COUNTS_BYTES);
        assert!(big.counts >= MIN_COUNTS);
        // Hot-pluggable VM: 240 possible, 8 online: the ring is for the 8.
        let vm = MapSizes::plan(240, 8, DEFAULT_COUNTS_BYTES);
        assert_eq!(vm.event_cpus, 8);
        assert_eq!(vm.ring_bytes(), u64::from(8 * (NET_RING_SLOTS + 1)) * size_of::<NetEvent>() as u64);
        assert_eq!(MapSizes::plan(4, 0, 1).counts, MIN_COUNTS);
    }
}
