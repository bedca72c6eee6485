//! Fuzzes a target's `_Py_DebugOffsets` (3.13+), as read from its `_PyRuntime`.
//! Input format: `stoker::fuzzing::debug_offsets`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::debug_offsets(data));
