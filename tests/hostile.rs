//! Targets that try to stop or fool stoker with the files they name: the session still
//! ends when asked and still profiles the real Python processes beside them.
mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// A process running a copy of `sleep` named `python3 x` in a directory that also holds a
/// FIFO named `python3`: split on spaces, its maps line names the FIFO, and opening that
/// blocks forever. The session must end at its deadline and still hold the real Python
/// process's samples.
#[test]
fn a_fifo_named_like_the_interpreter_cannot_block_a_session() {
    require_root();
    let dir = scratch("fifo");
    let fifo = dir.join("python3");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let fake = dir.join("python3 x");
    std::fs::copy("/bin/sleep", &fake).unwrap();
    let mut decoy = Command::new(&fake).arg("60").spawn().expect("start the decoy");
    let mut busy = Command::new(python("3.12.1"))
        .args(["-c", "def spin():\n    while True: pass\nspin()"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start python");

    let out = dir.join("out.folded");
    let mut session = Command::new(STOKER)
        .args(["record", "--all-python", "-d", "3", "-f", "folded", "-o", out.to_str().unwrap()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stoker");
    // A blocked session never ends; one that works ends 3 s after it started sampling. The
    // minute allowed is not a measurement, only how long a test waits before calling it stuck.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = session.kill();
    let output = session.wait_with_output().unwrap();
    for child in [&mut decoy, &mut busy] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = String::from_utf8_lossy(&output.stderr);
    let status = status.unwrap_or_else(|| panic!("the session did not end within a minute; stderr: {err}"));
    assert!(status.success(), "stoker failed: {err}");
    // Other Python processes on the machine are sampled too: look at this one's stacks.
    let root = format!("[pid {}]", busy.id());
    let folded = Folded::read(&out);
    let mine: Vec<(&Vec<String>, u64)> =
        folded.0.iter().filter(|(s, _)| s[0].ends_with(&root)).map(|(s, n)| (s, *n)).collect();
    let total: u64 = mine.iter().map(|(_, n)| n).sum();
    let spin: u64 =
        mine.iter().filter(|(s, _)| s.iter().any(|f| f.starts_with("spin ("))).map(|(_, n)| n).sum();
    // It spins all session long; only samples taken before it was recognized as Python
    // (at most a scan interval) lack the frame.
    assert!(
        total > 0 && spin * 2 > total,
        "`spin` should hold most of the busy process's {total} samples: {spin}"
    );
}

/// Clients that connect and say nothing, and one that asks for /metrics thousands of times
/// on one connection and never reads the answers (more than the sockets' buffers hold):
/// the agent's endpoint still answers /healthz and /metrics to others.
#[test]
fn slow_http_clients_cannot_hold_the_agent_endpoint() {
    use std::{io::Write, net::TcpStream};

    use common::agent::*;
    require_root();
    let dir = scratch("slow-http");
    let http = free_port();
    let config = agent_config(&dir, http, "export_interval: 1s\n");
    let agent = agent_without_otlp(&config);
    wait_ready(http);
    let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(("127.0.0.1", http)).unwrap()).collect();
    let mut greedy = TcpStream::connect(("127.0.0.1", http)).unwrap();
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(5000);
    // The server may close the connection after the first answer: later writes may fail.
    let _ = greedy.write_all(request.as_bytes());
    for path in ["/healthz", "/readyz", "/metrics"] {
        let answer = http_get(http, path);
        assert_eq!(
            answer.as_ref().map(|(s, _)| *s),
            Some(200),
            "{path} while clients hold connections: {answer:?}"
        );
    }
    drop((silent, greedy));
    let status = stop(agent);
    assert!(status.success(), "agent exit: {status}");
}
