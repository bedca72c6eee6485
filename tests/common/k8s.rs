//! A Kubernetes node without a cluster: real cgroup v2 hierarchies shaped like kubelet's
//! with real CPython processes in them, and a local HTTP server serving the node's PodList.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
        })
        .expect("these tests need cgroup v2 mounted (a cgroup2 line in /proc/self/mountinfo)")
}

/// One pod with one container running a busy CPython process.
pub struct FakePod {
    pub namespace: &'static str,
    pub name: String,
    pub uid: String,
    pub container: &'static str,
    pub container_id: String,
    pub labels: &'static [(&'static str, &'static str)],
    /// systemd cgroup driver shape (`kubepods.slice/...-pod<uid_>.slice/cri-containerd-<id>.scope`),
    /// else the cgroupfs one (`kubepods/burstable/pod<uid>/<id>`).
    pub systemd: bool,
    /// The container's `resources` in the pod spec (`{"requests": {...}, "limits": {...}}`);
    /// null: none.
    pub resources: serde_json::Value,
}

impl FakePod {
    /// A pod whose UID and container id are unique to this test process and `n`.
    pub fn new(n: u32, namespace: &'static str, name: &str, container: &'static str, systemd: bool) -> Self {
        let me = std::process::id();
        Self {
            namespace,
            name: format!("{name}-{me}"),
            uid: format!("{me:08x}-{n:04x}-4000-8000-0000000000{n:02x}"),
            container,
            container_id: format!("{me:016x}{n:016x}{:032x}", 0xc0ffee),
            labels: &[],
            systemd,
            resources: serde_json::Value::Null,
        }
    }

    fn cgroup_dirs(&self) -> Vec<String> {
        if self.systemd {
            let uid = self.uid.replace('-', "_");
            vec![
                "kubepods.slice".into(),
                "kubepods.slice/kubepods-besteffort.slice".into(),
                format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"),
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{}.scope",
                    self.container_id
                ),
            ]
        } else {
            vec![
                "kubepods".into(),
                "kubepods/burstable".into(),
                format!("kubepods/burstable/pod{}", self.uid),
                format!("kubepods/burstable/pod{}/{}", self.uid, self.container_id),
            ]
        }
    }

    /// This pod as an item of the API server's PodList.
    pub fn json(&self) -> serde_json::Value {
        let labels: serde_json::Map<String, serde_json::Value> =
            self.labels.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
        let mut container = serde_json::json!({"name": self.container, "image": "python:3.12"});
        if !self.resources.is_null() {
            container["resources"] = self.resources.clone();
        }
        serde_json::json!({
            "metadata": {
                "name": self.name, "namespace": self.namespace, "uid": self.uid,
                "resourceVersion": "1001", "labels": labels,
            },
            "spec": {"nodeName": "test-node", "containers": [container]},
            "status": {
                "phase": "Running",
                "containerStatuses": [{
                    "name": self.container, "ready": true, "restartCount": 0,
                    "image": "python:3.12", "imageID": "sha256:0",
                    "containerID": format!("containerd://{}", self.container_id),
                    "state": {"running": {"startedAt": "2024-05-01T10:00:05Z"}},
                }],
            },
        })
    }
}

/// A PodList body holding `pods`.
pub fn pod_list(pods: &[&FakePod]) -> String {
    serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1001"},
        "items": pods.iter().map(|p| p.json()).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Busy CPython processes moved into their pods' cgroups. Dropping it (also when a test
/// fails) kills them, moves anything left to the root cgroup and removes the cgroups
/// it created.
pub struct Node {
    root: PathBuf,
    created: Vec<PathBuf>,
    leaves: Vec<PathBuf>,
    pub children: Vec<Child>,
}

impl Node {
    pub fn new() -> Self {
        Self { root: cgroup2_root(), created: Vec::new(), leaves: Vec::new(), children: Vec::new() }
    }

    /// Starts `program args` (without OTEL_SERVICE_NAME) in `pod`'s container cgroup;
    /// returns its pid.
    pub fn run_in(&mut self, pod: &FakePod, program: &Path, args: &[&str]) -> u32 {
        for dir in pod.cgroup_dirs() {
            let path = self.root.join(dir);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
                self.created.push(path);
            }
        }
        let leaf = self.root.join(pod.cgroup_dirs().pop().unwrap());
        let child = Command::new(program)
            .args(args)
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_RESOURCE_ATTRIBUTES")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        self.leaves.push(leaf.clone());
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", leaf.display()));
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(cgroup.contains(&pod.container_id), "{pid} is not in its container's cgroup: {cgroup}");
        pid
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.children {
            child.kill().ok();
            child.wait().ok();
        }
        for leaf in &self.leaves {
            let procs = std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                std::fs::write(self.root.join("cgroup.procs"), pid).ok();
            }
        }
        for dir in self.created.iter().rev() {
            // A cgroup empties asynchronously after its last process exits.
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Stands in for the API server: `GET /api/v1/pods` answers the PodList in argv[2]
/// (read per request, so a test can change it) only with `fieldSelector=spec.nodeName=
/// test-node` and `Authorization: Bearer test-token`; every request is logged to argv[3]
/// as `ok` or why it was refused. Plain HTTP (the agent's `kubernetes.api_url` takes it),
/// or HTTPS with the certificate and key in argv[4] and argv[5].
const API_SERVER: &str = r#"
import http.server, ssl, sys, urllib.parse
port, body_file, log_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path != "/api/v1/pods":
            code, why = 404, f"path {url.path}"
        elif self.headers.get("Authorization") != "Bearer test-token":
            code, why = 401, f"authorization {self.headers.get('Authorization')}"
        elif query.get("fieldSelector") != ["spec.nodeName=test-node"]:
            code, why = 400, f"fieldSelector {query.get('fieldSelector')}"
        else:
            code, why = 200, "ok"
        body = open(body_file, "rb").read() if code == 200 else b'{"kind":"Status"}'
        with open(log_file, "a") as log:
            log.write(why + "\n")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
if len(sys.argv) > 5:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[4], sys.argv[5])
    server.socket = tls.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

pub struct ApiServer {
    child: Child,
    pub url: String,
    pub pods: PathBuf,
    pub log: PathBuf,
    pub token: PathBuf,
}

impl ApiServer {
    pub fn start(dir: &Path, port: u16, pods: &str) -> Self {
        Self::serve(dir, port, pods, None)
    }

    /// Serves HTTPS with `tls` = (certificate, key) files; `url` is `https://127.0.0.1:port`.
    pub fn start_tls(dir: &Path, port: u16, pods: &str, tls: (&Path, &Path)) -> Self {
        Self::serve(dir, port, pods, Some(tls))
    }

    fn serve(dir: &Path, port: u16, pods: &str, tls: Option<(&Path, &Path)>) -> Self {
        let (body, log, token) = (dir.join("pods.json"), dir.join("api.log"), dir.join("token"));
        std::fs::write(&body, pods).unwrap();
        std::fs::write(&log, "").unwrap();
        // A projected token file ends with no newline, a hand-made one often with one.
        std::fs::write(&token, "test-token\n").unwrap();
        let mut command = Command::new("python3");
        command.args(["-c", API_SERVER, &port.to_string(), body.to_str().unwrap(), log.to_str().unwrap()]);
        if let Some((cert, key)) = tls {
            command.arg(cert).arg(key);
        }
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the stand-in API server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        Self { child, url: format!("{scheme}://127.0.0.1:{port}"), pods: body, log, token }
    }

    /// The requests served so far: `ok` or why one was refused.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(String::from).collect()
    }

    pub fn set_pods(&self, body: &str) {
        let tmp = self.pods.with_extension("tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &self.pods).unwrap();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A cluster CA (`<name>-ca.crt`) and a server certificate it signed for 127.0.0.1
/// (`<name>.crt`, `<name>.key`), made with the openssl command; returns (ca, cert, key).
pub fn cluster_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let file = |ext: &str| dir.join(format!("{name}{ext}"));
    let (ca, ca_key, cert, key, csr, ext) =
        (file("-ca.crt"), file("-ca.key"), file(".crt"), file(".key"), file(".csr"), file(".ext"));
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let steps: [Vec<String>; 3] = [
        ["req", "-x509"]
            .into_iter()
            .chain(ec)
            .map(String::from)
            .chain([
                "-keyout".into(),
                p(&ca_key),
                "-out".into(),
                p(&ca),
                "-days".into(),
                "1".into(),
                "-subj".into(),
                format!("/CN={name}-ca"),
                "-addext".into(),
                "basicConstraints=critical,CA:TRUE".into(),
                "-addext".into(),
                "keyUsage=critical,keyCertSign".into(),
            ])
            .collect(),
        ["req"]
            .into_iter()
            .chain(ec)
            .map(String::from)
            .chain([
                "-keyout".into(),
                p(&key),
                "-out".into(),
                p(&csr),
                "-subj".into(),
                "/CN=kubernetes".into(),
            ])
            .collect(),
        ["x509", "-req", "-in", csr.to_str().unwrap(), "-CA", ca.to_str().unwrap(), "-CAkey"]
            .into_iter()
            .map(String::from)
            .chain([
                p(&ca_key),
                "-CAcreateserial".into(),
                "-out".into(),
                p(&cert),
                "-days".into(),
                "1".into(),
                "-extfile".into(),
                p(&ext),
            ])
            .collect(),
    ];
    for args in steps {
        let out =
            Command::new("openssl").args(&args).output().expect("the openssl command must be installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (ca, cert, key)
}
