//! stoker: an eBPF profiling agent for Python services. The library behind the `stoker`
//! binary: kernel sampling, symbolization, recording sessions, output formats, diagnostics.
pub mod collect;
pub mod doctor;
pub mod error;
pub mod export;
pub mod k8s;
pub mod net;
pub mod node;
pub mod profile;
pub mod programs;
pub mod python;
pub mod record;
pub mod symbolize;
pub mod sys;

pub use error::{Error, Result};
