//! Small wrappers over Linux interfaces stoker needs: capabilities, pidfds, tracefs,
//! and facts about processes read from /proc.
pub mod btf;
pub mod caps;
pub mod cgroup;
pub mod cpus;
pub mod elf;
pub mod maps;
pub mod mmap;
pub mod process;
pub mod tracefs;
