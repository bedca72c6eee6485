//! Where the node agent's data goes: OTLP metrics, profiles, traces and logs, Pyroscope pushes,
//! each through a bounded queue and a transport, to endpoints resolved at start.
pub mod endpoints;
pub mod exporter;
pub mod logs;
pub mod metrics;
pub mod profiles;
pub mod pyroscope;
pub mod split;
pub mod traces;
pub mod transport;
