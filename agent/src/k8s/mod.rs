//! Where a process runs: its container (from cgroups) and, on Kubernetes, its pod,
//! namespace and container names, and the resource attributes derived from them.
pub mod cgroup;
