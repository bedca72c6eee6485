//! This node's pods as the Kubernetes API lists them (only the fields stoker uses), and
//! the index that maps a process's container id or pod UID to its pod and container.
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// A pod running on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// (container name, container id without its `runtime://` prefix); a container not
    /// started yet has no id.
    pub containers: Vec<(String, Option<String>)>,
    /// The requests and limits its spec declares, by container name.
    pub resources: BTreeMap<String, Resources>,
}

/// A container's CPU and memory requests and limits, as its pod spec declares them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    pub cpu_request: Option<f64>,
    pub cpu_limit: Option<f64>,
    pub memory_request: Option<u64>,
    pub memory_limit: Option<u64>,
}

impl Resources {
    /// Any of them declared.
    pub fn any(&self) -> bool {
        self.cpu_request.is_some()
            || self.cpu_limit.is_some()
            || self.memory_request.is_some()
            || self.memory_limit.is_some()
    }
}

/// A Kubernetes quantity (`500m`, `1.5`, `128Mi`, `1G`, `2e3`) as a number; None when it
/// does not parse.
pub fn quantity(text: &str) -> Option<f64> {
    let t = text.trim();
    let split =
        t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let n: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        // A decimal exponent: 1e3, 1E3.
        s if s.len() > 1 && (s.starts_with('e') || s.starts_with('E')) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let v = n * scale;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// Parses a `PodList` (the body of `GET /api/v1/pods`).
pub fn parse_pod_list(body: &[u8]) -> Result<Vec<Pod>, serde_json::Error> {
    let list: PodList = serde_json::from_slice(body)?;
    Ok(list
        .items
        .into_iter()
        .map(|item| {
            let status = item.status.unwrap_or_default();
            let containers = status
                .container_statuses
                .into_iter()
                .chain(status.init_container_statuses)
                .map(|c| (c.name, c.container_id.as_deref().and_then(strip_runtime).map(String::from)))
                .collect();
            let resources = item
                .spec
                .unwrap_or_default()
                .containers
                .into_iter()
                .map(|c| {
                    let (requests, limits) = (c.resources.requests, c.resources.limits);
                    let cpu = |m: &BTreeMap<String, String>| m.get("cpu").and_then(|q| quantity(q));
                    let memory = |m: &BTreeMap<String, String>| {
                        m.get("memory").and_then(|q| quantity(q)).map(|b| b.round() as u64)
                    };
                    let r = Resources {
                        cpu_request: cpu(&requests),
                        cpu_limit: cpu(&limits),
                        memory_request: memory(&requests),
                        memory_limit: memory(&limits),
                    };
                    // Kubernetes sets a request left out to its limit.
                    let r = Resources {
                        cpu_request: r.cpu_request.or(r.cpu_limit),
                        memory_request: r.memory_request.or(r.memory_limit),
                        ..r
                    };
                    (c.name, r)
                })
                .filter(|(_, r)| r.any())
                .collect();
            Pod {
                namespace: item.metadata.namespace,
                name: item.metadata.name,
                uid: item.metadata.uid,
                labels: item.metadata.labels,
                containers,
                resources,
            }
        })
        .collect())
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` -> `<id>`; empty -> None.
fn strip_runtime(id: &str) -> Option<&str> {
    let id = id.split_once("://").map_or(id, |(_, rest)| rest);
    (!id.is_empty()).then_some(id)
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<PodItem>,
}

#[derive(Deserialize)]
struct PodItem {
    metadata: Metadata,
    spec: Option<Spec>,
    status: Option<Status>,
}

#[derive(Deserialize, Default)]
struct Spec {
    #[serde(default)]
    containers: Vec<SpecContainer>,
}

#[derive(Deserialize)]
struct SpecContainer {
    name: String,
    #[serde(default)]
    resources: SpecResources,
}

/// Quantities as strings (the API server writes them so; a number is taken too).
#[derive(Deserialize, Default)]
struct SpecResources {
    #[serde(default, deserialize_with = "quantities")]
    requests: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "quantities")]
    limits: BTreeMap<String, String>,
}

fn quantities<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, serde_json::Value> = Deserialize::deserialize(d)?;
    Ok(raw
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            serde_json::Value::Number(n) => Some((k, n.to_string())),
            _ => None,
        })
        .collect())
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    namespace: String,
    name: String,
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Status {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    name: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

/// Where a process runs, from its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

impl Placement {
    /// Reads /proc/PID/cgroup once.
    pub fn of(pid: u32) -> Self {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        Self {
            container_id: super::cgroup::container_id_from(&text),
            pod_uid: super::cgroup::pod_uid_from(&text),
        }
    }

    /// A process in a pod's cgroup: the pod lookup can name it.
    pub fn in_pod(&self) -> bool {
        self.pod_uid.is_some()
    }
}

/// The pod (and container, when known) of a process.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    pub pod: &'a Pod,
    pub container: Option<&'a str>,
}

/// This node's pods by container id and by pod UID.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: Vec<Pod>,
    by_uid: HashMap<String, usize>,
    /// container id -> (pod, container name)
    by_container: HashMap<String, (usize, String)>,
}

impl PodIndex {
    pub fn new(pods: Vec<Pod>) -> Self {
        let mut index = Self::default();
        for (i, pod) in pods.iter().enumerate() {
            index.by_uid.insert(pod.uid.clone(), i);
            for (name, id) in &pod.containers {
                if let Some(id) = id {
                    index.by_container.insert(id.clone(), (i, name.clone()));
                }
            }
        }
        index.pods = pods;
        index
    }

    /// Matches by container id first (this also finds static pods, whose cgroup carries
    /// a UID other than their mirror pod's), then by the pod UID from the cgroup.
    pub fn find(&self, placement: &Placement) -> Option<Found<'_>> {
        if let Some((i, name)) = placement.container_id.as_ref().and_then(|id| self.by_container.get(id)) {
            return Some(Found { pod: &self.pods[*i], container: Some(name) });
        }
        let i = *self.by_uid.get(placement.pod_uid.as_ref()?)?;
        Some(Found { pod: &self.pods[i], container: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "3f4a1c2b9d8e7f60a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abcdef01";
    const ID_B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Shaped like `kubectl get --raw '/api/v1/pods?fieldSelector=spec.nodeName=n1'`,
    /// trimmed: a running pod with a sidecar, a pending pod whose containers have no id,
    /// and a CRI-O pod.
    fn body() -> String {
        format!(
            r#"{{
  "kind": "PodList", "apiVersion": "v1",
  "metadata": {{"resourceVersion": "918273"}},
  "items": [
    {{
      "metadata": {{
        "name": "checkout-7d9f8b6c5-x2x7q", "generateName": "checkout-7d9f8b6c5-",
        "namespace": "shop", "uid": "8b3c4d5e-6f70-4182-93a4-b5c6d7e8f901",
        "resourceVersion": "918001", "creationTimestamp": "2024-05-01T10:00:00Z",
        "labels": {{"app": "checkout", "pod-template-hash": "7d9f8b6c5"}},
        "ownerReferences": [{{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-7d9f8b6c5", "uid": "aaaa", "controller": true}}]
      }},
      "spec": {{"nodeName": "n1", "containers": [
        {{"name": "web", "image": "shop/checkout:1.2", "resources": {{"requests": {{"cpu": "250m", "memory": "256Mi"}}, "limits": {{"cpu": "1500m", "memory": "1Gi"}}}}}},
        {{"name": "envoy", "image": "envoy", "resources": {{"limits": {{"cpu": 2, "memory": "128M"}}}}}}
      ]}},
      "status": {{
        "phase": "Running", "podIP": "10.0.0.7",
        "initContainerStatuses": [{{"name": "migrate", "ready": false, "restartCount": 0, "image": "m", "imageID": "", "containerID": "containerd://{ID_B}", "state": {{"terminated": {{"exitCode": 0}}}}}}],
        "containerStatuses": [
          {{"name": "web", "ready": true, "restartCount": 0, "image": "shop/checkout:1.2", "imageID": "sha256:1", "containerID": "containerd://{ID_A}", "started": true, "state": {{"running": {{"startedAt": "2024-05-01T10:00:05Z"}}}}}},
          {{"name": "envoy", "ready": true, "restartCount": 1, "image": "envoy", "imageID": "sha256:2", "containerID": "cri-o://cccc", "state": {{"running": {{}}}}}}
        ]
      }}
    }},
    {{
      "metadata": {{"name": "batch-1", "namespace": "jobs", "uid": "11111111-2222-3333-4444-555555555555"}},
      "spec": {{"nodeName": "n1", "containers": [{{"name": "worker", "image": "w"}}]}},
      "status": {{"phase": "Pending", "containerStatuses": [{{"name": "worker", "ready": false, "restartCount": 0, "image": "w", "imageID": "", "state": {{"waiting": {{"reason": "ContainerCreating"}}}}}}]}}
    }},
    {{
      "metadata": {{"name": "just-scheduled", "namespace": "jobs", "uid": "66666666-2222-3333-4444-555555555555"}},
      "spec": {{"nodeName": "n1"}},
      "status": {{"phase": "Pending"}}
    }}
  ]
}}"#
        )
    }

    #[test]
    fn parses_a_pod_list() {
        let pods = parse_pod_list(body().as_bytes()).unwrap();
        assert_eq!(pods.len(), 3);
        let p = &pods[0];
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "checkout-7d9f8b6c5-x2x7q"));
        assert_eq!(p.uid, "8b3c4d5e-6f70-4182-93a4-b5c6d7e8f901");
        assert_eq!(p.labels.get("app").map(String::as_str), Some("checkout"));
        assert_eq!(
            p.containers,
            vec![
                ("web".into(), Some(ID_A.into())),
                ("envoy".into(), Some("cccc".into())),
                ("migrate".into(), Some(ID_B.into())),
            ]
        );
        let web = Resources {
            cpu_request: Some(0.25),
            cpu_limit: Some(1.5),
            memory_request: Some(256 << 20),
            memory_limit: Some(1 << 30),
        };
        assert_eq!(p.resources.get("web"), Some(&web));
        // Requests left out are the limits.
        let envoy = Resources {
            cpu_request: Some(2.0),
            cpu_limit: Some(2.0),
            memory_request: Some(128_000_000),
            memory_limit: Some(128_000_000),
        };
        assert_eq!(p.resources.get("envoy"), Some(&envoy));
        assert!(pods[1].resources.is_empty());
        assert_eq!(pods[1].containers, vec![("worker".into(), None)]);
        assert!(pods[1].labels.is_empty());
        assert!(pods[2].containers.is_empty());
        assert!(parse_pod_list(br#"{"kind":"PodList","items":[]}"#).unwrap().is_empty());
        assert!(parse_pod_list(br#"{"kind":"Status","status":"Failure","code":403}"#).unwrap().is_empty());
        assert!(parse_pod_list(b"<html>").is_err());
    }

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        let close = |q: &str, v: f64| (quantity(q).unwrap() - v).abs() < 1e-9 * v.max(1.0);
        assert!(close("500m", 0.5) && close("1", 1.0) && close("1.5", 1.5) && close("2000m", 2.0));
        assert!(close("128Mi", 134_217_728.0) && close("1Gi", 1_073_741_824.0) && close("1G", 1e9));
        assert!(close("1e3", 1000.0) && close("1E3", 1000.0) && close("2E", 2e18) && close("100k", 1e5));
        for bad in ["", "lots", "1x", "-1", "1Zi"] {
            assert_eq!(quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn runtime_prefixes_are_stripped() {
        assert_eq!(strip_runtime("containerd://abc"), Some("abc"));
        assert_eq!(strip_runtime("cri-o://abc"), Some("abc"));
        assert_eq!(strip_runtime("docker://abc"), Some("abc"));
        assert_eq!(strip_runtime("abc"), Some("abc"));
        assert_eq!(strip_runtime(""), None);
        assert_eq!(strip_runtime("containerd://"), None);
    }

    #[test]
    fn finds_by_container_id_then_pod_uid() {
        let index = PodIndex::new(parse_pod_list(body().as_bytes()).unwrap());
        let by_id = Placement { container_id: Some(ID_A.into()), pod_uid: Some("other".into()) };
        let found = index.find(&by_id).unwrap();
        assert_eq!((found.pod.name.as_str(), found.container), ("checkout-7d9f8b6c5-x2x7q", Some("web")));
        // A container the list does not name yet (just started): its pod, no container.
        let by_uid = Placement {
            container_id: Some("f".repeat(64)),
            pod_uid: Some("11111111-2222-3333-4444-555555555555".into()),
        };
        let found = index.find(&by_uid).unwrap();
        assert_eq!((found.pod.name.as_str(), found.container), ("batch-1", None));
        assert!(index.find(&Placement { container_id: None, pod_uid: Some("nope".into()) }).is_none());
        assert!(index.find(&Placement::default()).is_none());
    }
}
