//! Loading and attaching the object's programs: the one way every tracepoint program is
//! loaded and attached, and the sentences loading and attaching failures become.
use aya::{Ebpf, programs::TracePoint};

use super::KernelPrograms;
use crate::error::{Error, Result, errno_of, one_line};

/// Tracepoint program `name` of `ebpf`, loaded (the verifier accepted it); `loading`
/// names the step in the error.
pub(crate) fn load_tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    loading: &'static str,
) -> Result<&'a mut TracePoint> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::Ebpf { what: "kernel program missing", detail: name.into() })?;
    prog.load().map_err(|e| load_error(loading, &e))?;
    Ok(prog)
}

/// Loads tracepoint program `name` and attaches it to each `(category, event)` of `points`;
/// `feature` names what is missing when the kernel refuses an attachment. The links are
/// kept in `programs` (detached together: see its `Drop`).
pub(crate) fn tracepoint(
    programs: &mut KernelPrograms,
    name: &'static str,
    points: &[(&str, &str)],
    feature: &'static str,
    loading: &'static str,
) -> Result<()> {
    let prog = load_tracepoint(&mut programs.ebpf, name, loading)?;
    for (category, event) in points {
        let link = prog.attach(category, event).map_err(|e| Error::KernelFeature {
            feature,
            detail: format!("{category}:{event}: {}", one_line(&e)),
        })?;
        programs.tracepoint_links.push((name, link));
    }
    Ok(())
}

pub(crate) fn load_error(what: &'static str, err: &(dyn std::error::Error + 'static)) -> Error {
    let privileged = crate::sys::caps::can_sample(crate::sys::caps::effective());
    match errno_of(err) {
        // EACCES with privileges is the verifier's refusal, reported with its log below.
        Some(libc::EPERM | libc::EACCES) if !privileged => {
            Error::Permission { what: "loading eBPF programs", needs: "CAP_BPF and CAP_PERFMON" }
        }
        Some(libc::ENOSYS) => {
            Error::KernelFeature { feature: "the bpf() system call", detail: one_line(err) }
        }
        _ => Error::Ebpf { what, detail: one_line(err) },
    }
}

pub(crate) fn perf_error(err: &(dyn std::error::Error + 'static)) -> Error {
    match errno_of(err) {
        Some(libc::EPERM | libc::EACCES) => {
            Error::Permission { what: "system-wide CPU sampling", needs: "CAP_PERFMON" }
        }
        Some(libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP | libc::ENOSYS) => {
            Error::KernelFeature { feature: "perf events (software cpu-clock)", detail: one_line(err) }
        }
        _ => Error::Ebpf { what: "attaching the CPU sampling program", detail: one_line(err) },
    }
}
