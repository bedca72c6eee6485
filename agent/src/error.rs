//! The library's error type: every variant reads as one sentence that says what failed
//! and, where there is one, what to do about it.
use std::{io, path::PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no process with PID {0}")]
    NoSuchProcess(u32),
    #[error("{tid} is a thread of process {pid}, not a process: give the process's PID ({pid})")]
    ThreadId { tid: u32, pid: u32 },
    #[error("process {0} exited before sampling started")]
    ExitedBeforeAttach(u32),
    #[error("pid {0} ({1}) is a kernel thread: it runs no user code to sample; give a user process's pid")]
    KernelThread(u32, String),
    #[error("process {0} {1}")]
    NotDumpable(u32, String),
    #[error("cannot start `{command}`: {source}")]
    Launch { command: String, source: io::Error },
    #[error("missing privileges: {what} needs {needs}; run as root or grant it")]
    Permission { what: &'static str, needs: &'static str },
    #[error("this kernel lacks {feature}: {detail}")]
    KernelFeature { feature: &'static str, detail: String },
    #[error("cannot write {}: {source}", path.display())]
    Output { path: PathBuf, source: io::Error },
    #[error("{what}: {detail}")]
    Ebpf { what: &'static str, detail: String },
    #[error("the Kubernetes pod lookup cannot start: {0}")]
    Kubernetes(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The errno of the first `io::Error` in an error's source chain, if any.
pub fn errno_of(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        cur = e.source();
    }
    None
}

/// Renders an error and its sources as one line.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !line.contains(&s) {
            line.push_str(": ");
            line.push_str(&s);
        }
        cur = e.source();
    }
    line
}
