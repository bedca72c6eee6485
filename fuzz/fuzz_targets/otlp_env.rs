//! Fuzzes the OTEL_EXPORTER_OTLP_* variables, OTEL_EXPORTER_OTLP_HEADERS included.
//! Input format: `stoker::fuzzing::otlp_env`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stoker::fuzzing::otlp_env(data));
