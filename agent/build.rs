//! Builds the kernel programs (agent-ebpf) for the BPF target with aya-build and the
//! `debian-web` toolchain set up by `cargo xtask setup`; the object is embedded in `stoker`.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // `-Z build-std=core` needs unstable flags on the stable Debian toolchain.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = Package {
        name: "agent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom("debian-web"))
        .context("building the kernel programs failed; run `cargo xtask setup` to install the eBPF toolchain")
}
