//! The processes a recording session samples: existing PIDs (watched through pidfds) and
//! a launched command, held at the door until the kernel filter knows its PID.
use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    sys::process::PidFd,
};

/// A process being sampled.
#[derive(Debug)]
pub enum Target {
    Attached(PidFd),
    Launched(Launched),
}

impl Target {
    pub fn attach(pid: u32) -> Result<Self> {
        // A thread's id (from `top -H`, a log line) names a task that /proc lists, but no
        // process: say whose thread it is.
        if let Some(tgid) = crate::sys::process::tgid(pid)
            && tgid != pid
        {
            return Err(Error::ThreadId { tid: pid, pid: tgid });
        }
        if crate::sys::process::is_kernel_thread(pid) {
            return Err(Error::KernelThread(pid, crate::sys::process::comm(pid)));
        }
        match PidFd::open(pid)? {
            Some(fd) => Ok(Target::Attached(fd)),
            None => Err(Error::NoSuchProcess(pid)),
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            Target::Attached(fd) => fd.pid(),
            Target::Launched(l) => l.pid,
        }
    }

    pub fn has_exited(&mut self) -> bool {
        match self {
            Target::Attached(fd) => fd.has_exited(),
            Target::Launched(l) => l.poll_exit(),
        }
    }
}

/// A command started by stoker. It waits before `exec` until `release` is called, so
/// no part of it runs unsampled.
#[derive(Debug)]
pub struct Launched {
    pub pid: u32,
    gate: Option<i32>,
    status_fd: i32,
    command: String,
    exited: bool,
    /// How it ended, as a shell's `$?` says it (128 + the signal when killed by one).
    pub status: Option<i32>,
}

impl Launched {
    pub fn spawn(argv: &[String]) -> Result<Self> {
        let command = argv.join(" ");
        let launch_err = |source: io::Error| Error::Launch { command: command.clone(), source };
        let program =
            resolve(&argv[0]).ok_or_else(|| launch_err(io::Error::from(io::ErrorKind::NotFound)))?;
        let c_program =
            CString::new(program.as_os_str().as_bytes()).map_err(|e| launch_err(io::Error::other(e)))?;
        let c_args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| launch_err(io::Error::other(e)))?;
        let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
        c_argv.push(std::ptr::null());

        let gate = pipe().map_err(launch_err)?;
        let status = pipe().map_err(launch_err)?;
        // SAFETY: between fork and exec the child only calls async-signal-safe functions
        // (close, read, write, execv, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(launch_err(io::Error::last_os_error()));
        }
        if pid == 0 {
            unsafe {
                libc::close(gate[1]);
                libc::close(status[0]);
                let mut byte = 0u8;
                libc::read(gate[0], (&mut byte as *mut u8).cast(), 1);
                libc::close(gate[0]);
                libc::execv(c_program.as_ptr(), c_argv.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(status[1], (&errno as *const i32).cast(), 4);
                libc::_exit(127);
            }
        }
        unsafe {
            libc::close(gate[0]);
            libc::close(status[1]);
        }
        Ok(Self {
            pid: pid as u32,
            gate: Some(gate[1]),
            status_fd: status[0],
            command,
            exited: false,
            status: None,
        })
    }

    /// Lets the command exec; fails when exec failed.
    pub fn release(&mut self) -> Result<()> {
        if let Some(fd) = self.gate.take() {
            unsafe {
                libc::write(fd, [1u8].as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        let mut errno = 0i32;
        // Blocks until exec succeeds (the CLOEXEC pipe closes) or fails (errno is written).
        let n = unsafe { libc::read(self.status_fd, (&mut errno as *mut i32).cast(), 4) };
        if n == 4 {
            self.poll_exit();
            return Err(Error::Launch {
                command: self.command.clone(),
                source: io::Error::from_raw_os_error(errno),
            });
        }
        Ok(())
    }

    /// Reaps the command if it has exited; true once it has.
    pub fn poll_exit(&mut self) -> bool {
        if !self.exited {
            let mut status = 0;
            let rc = unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) };
            self.exited = rc == self.pid as i32 || rc < 0;
            if rc == self.pid as i32 {
                self.status = Some(shell_status(status));
            }
        }
        self.exited
    }

    /// Asks the command to stop (SIGTERM) and reaps it, killing it after `grace`.
    pub fn terminate(&mut self, grace: std::time::Duration) {
        if self.poll_exit() {
            return;
        }
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while !self.poll_exit() {
            if std::time::Instant::now() >= deadline {
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                let mut status = 0;
                unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
                self.exited = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Some(fd) = self.gate.take() {
            unsafe { libc::close(fd) };
        }
        unsafe { libc::close(self.status_fd) };
    }
}

/// A wait status as a shell's `$?`: the exit code, or 128 + the signal that killed it.
fn shell_status(status: i32) -> i32 {
    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
}

fn pipe() -> io::Result<[i32; 2]> {
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fds)
}

/// Finds a program the way a shell does: a name with a slash is a path, others are
/// looked up in $PATH.
fn resolve(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
