//! Fuzzes the BTF reader, on any blob standing in for /sys/kernel/btf/vmlinux.
//! Input format: `stoker::fuzzing::btf`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::btf(data));
