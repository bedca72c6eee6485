//! Output formats of a recorded profile: collapsed stacks ("folded"), flamegraph SVGs,
//! pprof (gzipped `profile.proto`) and speedscope JSON.
pub mod flamegraph;
pub mod folded;
pub mod pprof;
pub mod speedscope;

use std::{io::Write, time::SystemTime};

use crate::{
    error::{Error, Result},
    profile::Profile,
};

/// The file formats `stoker record` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An interactive SVG flamegraph.
    Flamegraph,
    /// Collapsed stacks, one line per stack: `root;...;leaf count`.
    Folded,
    /// pprof's gzipped `profile.proto` (go tool pprof, Grafana Pyroscope).
    Pprof,
    /// speedscope's JSON file format (https://www.speedscope.app).
    Speedscope,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Flamegraph => "svg",
            Format::Folded => "folded",
            Format::Pprof => "pb.gz",
            Format::Speedscope => "speedscope.json",
        }
    }
}

/// Writes the profile in `format`.
pub fn write(profile: &Profile, format: Format, out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        Format::Folded => {
            for line in folded::lines(profile) {
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        Format::Flamegraph => flamegraph::write(profile, out),
        Format::Pprof => {
            let meta = pprof::PprofMeta {
                rate_hz: profile.rate_hz,
                start: profile.start.unwrap_or_else(SystemTime::now),
                duration: profile.duration,
            };
            out.write_all(&pprof::encode(profile, &meta))
        }
        Format::Speedscope => speedscope::write(profile, out),
    }
}

/// Writes the profile to a file created beforehand.
pub fn write_file(
    profile: &Profile,
    format: Format,
    path: &std::path::Path,
    file: std::fs::File,
) -> Result<()> {
    let mut w = std::io::BufWriter::new(file);
    write(profile, format, &mut w)
        .and_then(|_| w.flush())
        .map_err(|source| Error::Output { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::profile::{Frame, Marker};

    /// A frame of every kind, as stacks of all shapes (roots, truncation, drops, unknowns).
    fn every_kind() -> Profile {
        let py = |function: &str, file: &str, line| Frame::Python {
            function: function.into(),
            file: file.into(),
            line,
        };
        let native = |f: &str| Frame::Native { function: f.into() };
        let kernel = |f: &str| Frame::Kernel { function: f.into() };
        let process = Frame::Marker(Marker::Process { comm: "python3.12".into(), pid: 1234 });
        let thread = |name: &str, tid| Frame::Marker(Marker::Thread { name: Arc::from(name), tid });
        Profile {
            title: "stoker: golden".into(),
            subtitle: "99 Hz, 1.0 s".into(),
            stacks: vec![
                (
                    vec![
                        process.clone(),
                        thread("MainThread", 1234),
                        py("<module>", "app.py", 3),
                        py("burn", "app.py", 10),
                        kernel("do_syscall_64"),
                        kernel("read_zero"),
                    ],
                    7,
                ),
                (
                    vec![
                        process,
                        thread("?", 1235),
                        Frame::Marker(Marker::Truncated),
                        py("f", "x;y.py", 2),
                        Frame::PythonUnreadable { code: 0x55f0aa12 },
                    ],
                    3,
                ),
                (
                    vec![
                        native("main"),
                        Frame::NativeUnnamed { module: "libfoo.so".into(), offset: 0x1234 },
                        Frame::Unknown { kernel: false },
                    ],
                    2,
                ),
                (vec![Frame::Marker(Marker::UserStackDropped), Frame::Marker(Marker::KernelStackDropped)], 1),
                (vec![Frame::Unknown { kernel: false }], 1),
                (
                    vec![native("main"), native("_PyEval_EvalFrameDefault"), Frame::Unknown { kernel: true }],
                    4,
                ),
                (vec![py("f", "/srv/a b/app.py", 12), py("g", "<frozen importlib._bootstrap>", 100)], 5),
            ],
            ..Default::default()
        }
    }

    /// The folded and SVG outputs are byte for byte those of the frame strings stoker
    /// wrote before frames were typed (testdata/golden.*, written from those strings).
    #[test]
    fn folded_and_svg_bytes_are_unchanged() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/export/testdata");
        for (format, file) in [(Format::Folded, "golden.folded"), (Format::Flamegraph, "golden.svg")] {
            let mut out = Vec::new();
            write(&every_kind(), format, &mut out).unwrap();
            let expected = std::fs::read(dir.join(file)).unwrap();
            assert!(out == expected, "{file} differs:\n{}", String::from_utf8_lossy(&out));
        }
    }
}
