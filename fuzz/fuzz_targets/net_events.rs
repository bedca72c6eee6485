//! Fuzzes the network event aggregator, on any bytes as kernel events.
//! Input format: `stoker::fuzzing::net_events`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::net_events(data));
