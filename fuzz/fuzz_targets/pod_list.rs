//! Fuzzes the Kubernetes API's pod list and the index built from it.
//! Input format: `stoker::fuzzing::pod_list`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::pod_list(data));
