//! Fuzzes CPython line tables (co_lnotab, 3.10 co_linetable, 3.11+ locations) of any format.
//! Input format: `stoker::fuzzing::linetable`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::linetable(data));
