//! stoker: an eBPF profiling agent for Python services. The library behind the `stoker`
//! binary: kernel sampling, symbolization, recording sessions, output formats, diagnostics.
pub mod advise;
pub(crate) mod collect;
pub mod doctor;
pub mod dump;
pub mod error;
pub mod export;
/// Entry points for the fuzz targets in `fuzz/`.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub(crate) mod k8s;
pub(crate) mod net;
pub mod node;
pub(crate) mod profile;
pub(crate) mod programs;
pub(crate) mod python;
pub mod record;
pub(crate) mod symbolize;
pub(crate) mod sys;
pub mod top;

pub use error::{Error, Result};
