//! Fuzzes CPython detection on any ELF file, the process's memory being its loaded segments.
//! Input format: `stoker::fuzzing::detect_elf`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::detect_elf(data));
