//! A stack frame as data: what kind of code it is, its function, file and line, or the
//! module and offset of an address nothing names. Text is made from it only at the edge.
use std::{borrow::Cow, fmt, sync::Arc};

/// Suffix that marks kernel frames in text, as in perf's and inferno's folded stacks.
pub const KERNEL_SUFFIX: &str = "_[k]";
/// Text of a frame nothing is known about.
pub const UNKNOWN: &str = "[unknown]";

/// What kind of code a frame is, as profile formats type it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKind {
    Python,
    Native,
    Kernel,
    /// Not code: a root (process, thread) or a marker (truncated, dropped).
    Synthetic,
}

/// One frame of a stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    /// A Python function (`co_qualname`, or `co_name` before 3.11) at a line of its file.
    Python { function: Arc<str>, file: Arc<str>, line: u32 },
    /// A Python code object that could not be read (freed before it was read).
    PythonUnreadable { code: u64 },
    /// A native function, by its symbol.
    Native { function: Arc<str> },
    /// A native address no symbol covers: the mapping's name and the offset (in the file,
    /// or from the mapping's start when the mapping has no file).
    NativeUnnamed { module: Arc<str>, offset: u64 },
    /// A kernel function.
    Kernel { function: Arc<str> },
    /// An address nothing is known about, in user space or in the kernel.
    Unknown { kernel: bool },
    /// Root or marker frames that are not code.
    Marker(Marker),
}

/// Frames that are not code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Marker {
    /// The Python stack was deeper than the kernel walks: its root end is missing.
    Truncated,
    /// The user stack could not be stored in the kernel.
    UserStackDropped,
    /// The kernel stack could not be stored in the kernel.
    KernelStackDropped,
    /// The root of a process's stacks when a profile has several processes.
    Process { comm: Arc<str>, pid: u32 },
    /// The root of a thread's stacks (`--threads`).
    Thread { name: Arc<str>, tid: u32 },
    /// The leaf of wall-clock and off-CPU stacks: what the thread was doing (`[running]`,
    /// `[socket 10.0.0.7:5432]`...), in brackets.
    State(Arc<str>),
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Python { .. } | Frame::PythonUnreadable { .. } => FrameKind::Python,
            Frame::Native { .. } | Frame::NativeUnnamed { .. } | Frame::Unknown { kernel: false } => {
                FrameKind::Native
            }
            Frame::Kernel { .. }
            | Frame::Unknown { kernel: true }
            | Frame::Marker(Marker::KernelStackDropped) => FrameKind::Kernel,
            Frame::Marker(_) => FrameKind::Synthetic,
        }
    }

    /// The function's name where it has one (Python, native and kernel functions).
    pub fn function(&self) -> Option<&str> {
        match self {
            Frame::Python { function, .. } | Frame::Native { function } | Frame::Kernel { function } => {
                Some(function)
            }
            _ => None,
        }
    }

    /// The source file of a Python frame.
    pub fn file(&self) -> Option<&str> {
        match self {
            Frame::Python { file, .. } => Some(file),
            _ => None,
        }
    }

    /// The source line of a Python frame.
    pub fn line(&self) -> Option<u32> {
        match self {
            Frame::Python { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// The function's name, or what stands for one: `[unknown]`, a marker's text; kernel
    /// frames without their text's suffix. Formats that type frames (OTLP profiles) show it.
    pub fn name(&self) -> Cow<'_, str> {
        match self {
            Frame::Python { function, .. } | Frame::Native { function } | Frame::Kernel { function } => {
                function.as_ref().into()
            }
            Frame::Unknown { .. } => UNKNOWN.into(),
            Frame::Marker(Marker::KernelStackDropped) => "[kernel stack dropped]".into(),
            other => other.to_string().into(),
        }
    }

    /// The frame with a Python frame's line set to 0: every line of a function as one.
    pub fn function_level(&self) -> Frame {
        match self {
            Frame::Python { function, file, .. } => {
                Frame::Python { function: function.clone(), file: file.clone(), line: 0 }
            }
            other => other.clone(),
        }
    }

    /// A function as summaries list it: `function (file)` for Python, else as displayed.
    pub fn function_label(&self) -> String {
        match self {
            Frame::Python { function, file, .. } => format!("{function} ({file})"),
            other => other.to_string(),
        }
    }

    /// The name formats with separate file and line fields but no frame type show (pprof,
    /// speedscope): a Python frame's function, every other frame's text.
    pub fn symbol(&self) -> Cow<'_, str> {
        match self {
            Frame::Python { function, .. } => function.as_ref().into(),
            other => other.to_string().into(),
        }
    }
}

/// The frame as folded stacks and flamegraphs show it: `function (file:line)` for Python
/// (`function (file)` without a line: `--nolineno`, or a line not known),
/// `function_[k]` in the kernel, `module+0xoffset` where no symbol names an address.
impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Python { function, file, line: 0 } => write!(f, "{function} ({file})"),
            Frame::Python { function, file, line } => write!(f, "{function} ({file}:{line})"),
            Frame::PythonUnreadable { code } => write!(f, "<unknown code {code:#x}>"),
            Frame::Native { function } => f.write_str(function),
            Frame::NativeUnnamed { module, offset } => write!(f, "{module}+{offset:#x}"),
            Frame::Kernel { .. } | Frame::Unknown { kernel: true } => {
                write!(f, "{}{KERNEL_SUFFIX}", self.name())
            }
            Frame::Unknown { kernel: false } => f.write_str(UNKNOWN),
            Frame::Marker(Marker::Truncated) => f.write_str("[truncated]"),
            Frame::Marker(Marker::UserStackDropped) => f.write_str("[user stack dropped]"),
            Frame::Marker(Marker::KernelStackDropped) => write!(f, "{}{KERNEL_SUFFIX}", self.name()),
            Frame::Marker(Marker::Process { comm, pid }) => write!(f, "{comm} [pid {pid}]"),
            Frame::Marker(Marker::Thread { name, tid }) => write!(f, "{name} (tid {tid})"),
            Frame::Marker(Marker::State(state)) => f.write_str(state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_parts() {
        let py = Frame::Python { function: "Foo.bar".into(), file: "app/x.py".into(), line: 12 };
        assert_eq!(
            (py.kind(), py.function(), py.file(), py.line()),
            (FrameKind::Python, Some("Foo.bar"), Some("app/x.py"), Some(12))
        );
        assert_eq!(py.to_string(), "Foo.bar (app/x.py:12)");
        let k = Frame::Kernel { function: "read_zero".into() };
        assert_eq!(
            (k.kind(), k.name().as_ref(), k.symbol().as_ref()),
            (FrameKind::Kernel, "read_zero", "read_zero_[k]")
        );
        assert_eq!(k.to_string(), "read_zero_[k]");
        let unnamed = Frame::NativeUnnamed { module: "libfoo.so".into(), offset: 0x1234 };
        assert_eq!((unnamed.kind(), unnamed.function()), (FrameKind::Native, None));
        assert_eq!(unnamed.to_string(), "libfoo.so+0x1234");
        assert_eq!(Frame::Marker(Marker::Truncated).kind(), FrameKind::Synthetic);
    }
}
