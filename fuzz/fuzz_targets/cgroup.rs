//! Fuzzes /proc/PID/cgroup parsing (container id, pod UID).
//! Input format: `stoker::fuzzing::cgroup`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::cgroup(data));
