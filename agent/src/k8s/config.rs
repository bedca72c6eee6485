//! The pod lookup's configuration (the agent file's `kubernetes:` section).
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Kubernetes {
    /// Look up this node's pods for k8s.* attributes and selectors (when in a cluster or
    /// `api_url` is set).
    pub enabled: bool,
    /// API server base URL; default: in-cluster (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_url: Option<String>,
    /// Bearer token file; default: the service account's token.
    pub token_path: Option<PathBuf>,
    /// CA bundle (PEM) for an https `api_url`; default: the service account's ca.crt.
    pub ca_path: Option<PathBuf>,
    /// This node's name; default: `NODE_NAME`.
    pub node_name: Option<String>,
    /// How often the pod list is refreshed (also soon after an unknown pod's process appears).
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for Kubernetes {
    fn default() -> Self {
        Self {
            enabled: true,
            api_url: None,
            token_path: None,
            ca_path: None,
            node_name: None,
            refresh_interval: Duration::from_secs(30),
        }
    }
}
