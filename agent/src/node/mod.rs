//! The node agent (`stoker agent`): samples a node's CPython processes continuously and
//! exports per-process CPU, memory, top functions and network metrics as OTLP and on /metrics.
mod advice;
mod agent;
pub mod config;
mod encode;
pub mod export;
mod http;
mod interval;
mod metric;
mod netstate;
mod prometheus;
mod resource;
mod select;
mod state;

pub use self::agent::run;

/// The Prometheus names of every series the agent exports, sorted (`stoker agent
/// --list-metrics`).
pub fn prometheus_series() -> Vec<String> {
    metric::prometheus_series()
}
