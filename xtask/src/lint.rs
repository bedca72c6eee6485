//! `cargo xtask lint`: clippy with warnings denied, on the host crates and on the kernel
//! programs compiled for the BPF target (which a host `cargo clippy` never compiles).
use std::process::Command;

use anyhow::{Result, bail};

use crate::{root, setup::TOOLCHAIN, sh};

pub fn run() -> Result<()> {
    // The agent, xtask, the fuzz targets and the shared types (agent-ebpf's library, as the
    // agent builds it).
    sh(Command::new("cargo").current_dir(root()).args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    bpf()
}

/// The kernel crate as `agent/build.rs` builds it: Debian's rustc-web with its own clippy
/// (`rust-web-clippy`), `core` built from source for `bpfel-unknown-none`. The unstable
/// `-Z build-std` needs `RUSTC_BOOTSTRAP` on this stable toolchain.
fn bpf() -> Result<()> {
    let clippy = Command::new("cargo").arg(format!("+{TOOLCHAIN}")).args(["clippy", "--version"]).output();
    if !clippy.is_ok_and(|o| o.status.success()) {
        bail!(
            "no clippy for the `{TOOLCHAIN}` toolchain: run `cargo xtask setup` (it installs rust-web-clippy)"
        );
    }
    println!("lint: clippy on agent-ebpf for bpfel-unknown-none (toolchain {TOOLCHAIN})");
    sh(Command::new("cargo")
        .current_dir(root())
        .arg(format!("+{TOOLCHAIN}"))
        .args(["clippy", "--package", "agent-ebpf", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1"))
}
