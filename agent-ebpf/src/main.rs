//! stoker's kernel programs. One module per hook under `programs/`, beside the kernel code of
//! each concern (`programs/python.rs`, `programs/net.rs`); maps in `maps.rs`.
//! On the host this compiles to an empty binary: kernel code is built only for `bpf*` targets.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `atomic_or` on map memory (see `maps::mark_target`).
#![cfg_attr(target_arch = "bpf", allow(internal_features), feature(core_intrinsics))]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
