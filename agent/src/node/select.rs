//! Which processes the agent samples by where they run: `select.namespaces`,
//! `select.pod_labels` and `select.containers`, decided from the cgroup and the pod lookup.
use std::collections::BTreeMap;

use super::config::Select;
use crate::k8s::pods::{Found, Placement};

/// What to do with a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Take,
    Skip,
    /// It runs in a pod the lookup does not know yet: ask again later.
    Later,
}

/// The placement part of the configuration's selection (all given criteria must hold).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    namespaces: Vec<String>,
    pod_labels: BTreeMap<String, String>,
    containers: Vec<String>,
}

impl Selection {
    pub fn new(select: &Select) -> Self {
        Self {
            namespaces: select.namespaces.clone(),
            pod_labels: select.pod_labels.clone(),
            containers: select.containers.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.pod_labels.is_empty() && self.containers.is_empty()
    }

    /// Namespaces and labels can only be decided from the pod lookup.
    pub fn needs_pods(&self) -> bool {
        !self.namespaces.is_empty() || !self.pod_labels.is_empty()
    }

    /// `found`: the process's pod from the lookup; `lookup`: whether a lookup runs (a
    /// process in an unknown pod is then `Later`, not `Skip`).
    pub fn verdict(&self, placement: &Placement, found: Option<Found<'_>>, lookup: bool) -> Verdict {
        let mut later = false;
        let mut undecided = || {
            if lookup && placement.in_pod() {
                later = true;
                Ok(())
            } else {
                Err(Verdict::Skip)
            }
        };
        let mut check = || -> Result<(), Verdict> {
            if !self.containers.is_empty() {
                let id = placement.container_id.as_deref().unwrap_or_default();
                let by_id = !id.is_empty()
                    && self.containers.iter().any(|c| is_id_prefix(c) && id.starts_with(c.as_str()));
                let name = found.and_then(|f| f.container);
                match name {
                    _ if by_id => {}
                    Some(name) if self.containers.iter().any(|c| c == name) => {}
                    Some(_) => return Err(Verdict::Skip),
                    None => undecided()?,
                }
            }
            if self.needs_pods() {
                match found {
                    Some(f) => {
                        let ns = self.namespaces.is_empty() || self.namespaces.contains(&f.pod.namespace);
                        let labels = self.pod_labels.iter().all(|(k, v)| f.pod.labels.get(k) == Some(v));
                        if !(ns && labels) {
                            return Err(Verdict::Skip);
                        }
                    }
                    None => undecided()?,
                }
            }
            Ok(())
        };
        match check() {
            Err(v) => v,
            Ok(()) if later => Verdict::Later,
            Ok(()) => Verdict::Take,
        }
    }
}

/// A container-id prefix: 12 (Docker's short ids) to 64 lowercase hex digits.
fn is_id_prefix(s: &str) -> bool {
    (12..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::pods::Pod;

    const ID: &str = "3f4a1c2b9d8e7f60a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abcdef01";
    const UID: &str = "8b3c4d5e-6f70-4182-93a4-b5c6d7e8f901";

    fn pod(namespace: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: "p".into(),
            uid: UID.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            containers: vec![("web".into(), Some(ID.into()))],
            resources: Default::default(),
        }
    }

    fn selection(yaml: &str) -> Selection {
        let config = crate::node::config::AgentConfig::parse(&format!("select:\n{yaml}")).unwrap();
        Selection::new(&config.select)
    }

    fn in_pod() -> Placement {
        Placement { container_id: Some(ID.into()), pod_uid: Some(UID.into()) }
    }

    #[test]
    fn namespaces_and_labels_all_match() {
        let s = selection("  namespaces: [shop, cart]\n  pod_labels: {app: checkout, tier: web}\n");
        let shop = pod("shop", &[("app", "checkout"), ("tier", "web"), ("extra", "x")]);
        let found = |p| Some(Found { pod: p, container: Some("web") });
        assert_eq!(s.verdict(&in_pod(), found(&shop), true), Verdict::Take);
        let other_ns = pod("batch", &[("app", "checkout"), ("tier", "web")]);
        assert_eq!(s.verdict(&in_pod(), found(&other_ns), true), Verdict::Skip);
        let one_label = pod("shop", &[("app", "checkout")]);
        assert_eq!(s.verdict(&in_pod(), found(&one_label), true), Verdict::Skip);
        let wrong_value = pod("cart", &[("app", "checkout"), ("tier", "db")]);
        assert_eq!(s.verdict(&in_pod(), found(&wrong_value), true), Verdict::Skip);
    }

    #[test]
    fn unknown_pods_wait_and_host_processes_are_skipped() {
        let s = selection("  namespaces: [shop]\n");
        assert_eq!(s.verdict(&in_pod(), None, true), Verdict::Later);
        assert_eq!(s.verdict(&in_pod(), None, false), Verdict::Skip);
        assert_eq!(s.verdict(&Placement::default(), None, true), Verdict::Skip);
        // A plain Docker container on the node is in no pod.
        let docker = Placement { container_id: Some(ID.into()), pod_uid: None };
        assert_eq!(s.verdict(&docker, None, true), Verdict::Skip);
        assert_eq!(selection("").verdict(&Placement::default(), None, false), Verdict::Take);
    }

    #[test]
    fn containers_by_name_or_id_prefix() {
        let s = selection("  containers: [web, 3f4a1c2b9d8e]\n");
        let shop = pod("shop", &[]);
        let named = |name| Some(Found { pod: &shop, container: Some(name) });
        assert_eq!(s.verdict(&in_pod(), named("web"), true), Verdict::Take);
        let other_id = Placement { container_id: Some("0".repeat(64)), pod_uid: Some(UID.into()) };
        assert_eq!(s.verdict(&other_id, named("envoy"), true), Verdict::Skip);
        // The id prefix needs no pod: a Docker container, or no lookup at all.
        let docker = Placement { container_id: Some(ID.into()), pod_uid: None };
        assert_eq!(s.verdict(&docker, None, false), Verdict::Take);
        assert_eq!(s.verdict(&other_id, None, false), Verdict::Skip);
        // Its pod is known but not yet its container: later.
        assert_eq!(s.verdict(&other_id, Some(Found { pod: &shop, container: None }), true), Verdict::Later);
        // Short or non-hex entries are names only.
        let short = selection("  containers: [3f4a]\n");
        assert_eq!(short.verdict(&docker, None, false), Verdict::Skip);
    }

    #[test]
    fn every_criterion_must_hold() {
        let s = selection("  namespaces: [shop]\n  containers: [web]\n");
        let shop = pod("shop", &[]);
        assert_eq!(
            s.verdict(&in_pod(), Some(Found { pod: &shop, container: Some("envoy") }), true),
            Verdict::Skip
        );
        let batch = pod("batch", &[]);
        assert_eq!(
            s.verdict(&in_pod(), Some(Found { pod: &batch, container: Some("web") }), true),
            Verdict::Skip
        );
    }
}
