//! Fuzzes the code-object reader over fake process memory, every CPython layout.
//! Input format: `stoker::fuzzing::code_object`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::code_object(data));
