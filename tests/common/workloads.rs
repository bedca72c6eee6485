//! Python workloads with a known cause, shared by the advice and metric-store tests: a
//! spinner under a CPU quota, a process growing to its memory limit, http.server and its
//! timed caller, a server started inside a cgroup.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

use super::{QuotaCgroup, net::Lines, python};

/// tests/fixtures/DIR/NAME.
pub fn fixture(dir: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(dir).join(name)
}

/// `spin.py CPU_SECONDS` (spinning once told to go) in a new cgroup allowed 0.3 CPU.
pub fn spinner(name: &str, cpu_seconds: &str) -> (QuotaCgroup, Child) {
    let cgroup = QuotaCgroup::new(name, 30000);
    let spin = Command::new(python("3.12.1"))
        .args([fixture("offcpu", "spin.py").to_str().unwrap(), cpu_seconds])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cgroup.add(spin.id());
    (cgroup, spin)
}

/// `python ARGS` started inside the v1 `cpu` cgroup at `cgroup` (moved there before the
/// interpreter starts, so its forks are there too); returns it and the port it prints.
pub fn python_in(cgroup: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new("sh")
        .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", cgroup.to_str().unwrap()])
        .arg(python("3.12.1"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let port =
        Lines::of(&mut child).next("server port", std::time::Duration::from_secs(10)).trim().to_string();
    (child, port)
}

/// Runs the http.client caller fixture: `count` GETs of /sleep/5 on one keep-alive
/// connection; returns its JSON.
pub fn call(port: &str, count: u32) -> Value {
    let plan = serde_json::json!([{"port": port.parse::<u16>().unwrap(), "path": "/sleep/5", "count": count, "how": "http.client"}]);
    let out = Command::new(python("3.12.1"))
        .args([fixture("net", "caller_client.py").to_str().unwrap(), &plan.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "the caller failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// tests/fixtures/net/http_server.py ARGS; returns it and its port.
pub fn http_server(args: &[&str]) -> (Child, String) {
    let mut server = Command::new(python("3.12.1"))
        .arg(fixture("net", "http_server.py"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let port =
        Lines::of(&mut server).next("server port", std::time::Duration::from_secs(10)).trim().to_string();
    (server, port)
}

/// A v1 `memory` cgroup with a limit (and a `cpu` cgroup of the same name without a quota,
/// where stoker finds a v1 process's cgroup); removed when dropped.
pub struct MemoryCgroup {
    pub dirs: [PathBuf; 2],
}

impl MemoryCgroup {
    /// `/sys/fs/cgroup/{cpu,memory}/<name>-<pid of the test>`, `limit` bytes of memory.
    pub fn new(name: &str, limit: u64) -> Self {
        let name = format!("{name}-{}", std::process::id());
        let dirs =
            [Path::new("/sys/fs/cgroup/cpu").join(&name), Path::new("/sys/fs/cgroup/memory").join(&name)];
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(dirs[1].join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        Self { dirs }
    }

    /// A CPU quota of `quota_us` per 100 ms period too.
    pub fn with_quota(self, quota_us: u32) -> Self {
        std::fs::write(self.dirs[0].join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(self.dirs[0].join("cpu.cfs_quota_us"), quota_us.to_string()).unwrap();
        self
    }

    pub fn add(&self, pid: u32) {
        for d in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string()).unwrap();
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Grows until its cgroup's memory use reaches 92% of the limit, prints the use, idles.
pub const GROWER: &str = r#"
import sys, time
sys.stdin.readline()
d = [l.split(":")[2].strip() for l in open("/proc/self/cgroup") if ":memory:" in l][0]
base = "/sys/fs/cgroup/memory" + d
limit = int(open(base + "/memory.limit_in_bytes").read())
hold = []
while int(open(base + "/memory.usage_in_bytes").read()) < 0.92 * limit:
    hold.append(b"x" * (1 << 20))
print(int(open(base + "/memory.max_usage_in_bytes").read()), flush=True)
time.sleep(60)
"#;

/// `GROWER` in a new memory cgroup limited to 96 MiB, waiting to be told to grow.
pub fn grower() -> (MemoryCgroup, Child) {
    let cgroup = MemoryCgroup::new("stoker-grower", 96 << 20);
    let grower = Command::new(python("3.12.1"))
        .args(["-c", GROWER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cgroup.add(grower.id());
    (cgroup, grower)
}
