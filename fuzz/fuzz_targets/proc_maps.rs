//! Fuzzes /proc/PID/maps parsing.
//! Input format: `stoker::fuzzing::proc_maps`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::proc_maps(data));
