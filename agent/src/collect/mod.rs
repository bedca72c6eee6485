//! What `record` and the node agent share between the kernel programs and their outputs:
//! which processes are targets (and which are Python), and their stacks, named.
pub mod stacks;
pub mod tracker;

pub use self::{
    stacks::{Collector, View},
    tracker::Tracker,
};
