//! Where a process runs: its container (from cgroups) and, on Kubernetes, its pod,
//! namespace and container names, looked up from the API server for this node only.
pub mod cgroup;
pub mod client;
pub mod config;
pub mod lookup;
pub mod pods;
