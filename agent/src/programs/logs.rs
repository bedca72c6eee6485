//! Routes the kernel programs' aya-log records into `tracing` at debug level: they
//! describe rare kernel-side paths, useful when diagnosing, noise otherwise.
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "stoker::kernel", "{}", record.args());
    }

    fn flush(&self) {}
}
