//! This node's pods as the Kubernetes API lists them (only the fields stoker uses), and
//! the index that maps a process's container id or pod UID to its pod and container.
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// A pod running on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// (container name, container id without its `runtime://` prefix); a container not
    /// started yet has no id.
    pub containers: Vec<(String, Option<String>)>,
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
            Pod {
                namespace: item.metadata.namespace,
                name: item.metadata.name,
                uid: item.metadata.uid,
                labels: item.metadata.labels,
                containers,
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
    status: Option<Status>,
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
      "spec": {{"nodeName": "n1", "containers": [{{"name": "web", "image": "shop/checkout:1.2"}}, {{"name": "envoy", "image": "envoy"}}]}},
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
        assert_eq!(pods[1].containers, vec![("worker".into(), None)]);
        assert!(pods[1].labels.is_empty());
        assert!(pods[2].containers.is_empty());
        assert!(parse_pod_list(br#"{"kind":"PodList","items":[]}"#).unwrap().is_empty());
        assert!(parse_pod_list(br#"{"kind":"Status","status":"Failure","code":403}"#).unwrap().is_empty());
        assert!(parse_pod_list(b"<html>").is_err());
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
