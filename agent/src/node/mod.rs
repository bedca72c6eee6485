//! The node agent (`stoker agent`): continuous sampling of a node's Python processes,
//! exported as OTLP metrics and profiles. Configuration first; the loop builds on it.
pub mod config;
pub mod resource;
