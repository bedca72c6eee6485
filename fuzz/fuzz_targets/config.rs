//! Fuzzes the agent's configuration file and its `--set` overrides.
//! Input format: `stoker::fuzzing::config`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::config(data));
