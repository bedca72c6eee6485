//! The Kubernetes API client of the pod lookup: where the API server is (in-cluster or
//! configured), and one request, listing this node's pods.
use std::{path::PathBuf, time::Duration};

use super::config::Kubernetes;
use super::pods::{Pod, parse_pod_list};

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const TIMEOUT: Duration = Duration::from_secs(10);
/// A node's pod list with full specs runs to a few MB; this bounds a broken answer.
const MAX_BODY: u64 = 256 << 20;

/// Why a pod lookup failed, in one sentence.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("cannot read the Kubernetes CA bundle {path}: {detail}")]
    Ca { path: String, detail: String },
    #[error("cannot list pods from the Kubernetes API server at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the Kubernetes API server answered {status} to listing this node's pods{hint}")]
    Status { status: u16, hint: &'static str },
    #[error("the Kubernetes API server's pod list is not a PodList: {0}")]
    Parse(#[from] serde_json::Error),
}

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// Base URL, `https://host:port`, without a trailing slash.
    pub url: String,
    /// Bearer token file, read before every request (projected tokens rotate).
    pub token_path: PathBuf,
    /// PEM CA bundle for an https URL; None: the system's public roots.
    pub ca_path: Option<PathBuf>,
    pub node: String,
}

impl ApiConfig {
    /// The configured API server, else the in-cluster one (`KUBERNETES_SERVICE_HOST`,
    /// `_PORT`, the service account's token and CA); Err says why there is none.
    pub fn resolve(k: &Kubernetes, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let url = match (&k.api_url, env("KUBERNETES_SERVICE_HOST")) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(host)) => {
                let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                format!("https://{host}:{port}")
            }
            (None, None) => {
                return Err(
                    "KUBERNETES_SERVICE_HOST is unset (not in a cluster) and kubernetes.api_url is not set"
                        .into(),
                );
            }
        };
        let node = k.node_name.clone().or_else(|| env("NODE_NAME")).filter(|n| !n.is_empty()).ok_or(
            "the node name is unknown: set NODE_NAME (downward API, spec.nodeName) or kubernetes.node_name",
        )?;
        let default_ca = PathBuf::from(SERVICE_ACCOUNT).join("ca.crt");
        let ca_path = match &k.ca_path {
            Some(p) => Some(p.clone()),
            None => default_ca.exists().then_some(default_ca),
        };
        let token_path = k.token_path.clone().unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT).join("token"));
        Ok(Self { url, token_path, ca_path, node })
    }
}

/// Lists this node's pods.
pub struct Client {
    agent: ureq::Agent,
    config: ApiConfig,
}

impl Client {
    pub fn new(config: ApiConfig) -> Result<Self, K8sError> {
        let mut builder =
            ureq::Agent::config_builder().timeout_global(Some(TIMEOUT)).http_status_as_error(false);
        if let Some(path) = config.ca_path.as_ref().filter(|_| config.url.starts_with("https://")) {
            let ca_error = |detail: String| K8sError::Ca { path: path.display().to_string(), detail };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("it holds no PEM certificate".into()));
            }
            let tls = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                .build();
            builder = builder.tls_config(tls);
        }
        Ok(Self { agent: builder.build().into(), config })
    }

    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`, served from the API
    /// server's cache (`resourceVersion=0`).
    pub fn list_pods(&self) -> Result<Vec<Pod>, K8sError> {
        let url = format!("{}/api/v1/pods", self.config.url);
        let mut request = self
            .agent
            .get(&url)
            .query("fieldSelector", format!("spec.nodeName={}", self.config.node))
            .query("resourceVersion", "0")
            .header("Accept", "application/json");
        // A missing token file is no error: a proxy (`kubectl proxy`) needs none.
        if let Ok(token) = std::fs::read_to_string(&self.config.token_path) {
            request = request.header("Authorization", format!("Bearer {}", token.trim()));
        }
        let unreachable = |e: ureq::Error| K8sError::Unreachable { url: url.clone(), detail: e.to_string() };
        let mut response = request.call().map_err(unreachable)?;
        let status = response.status().as_u16();
        if status != 200 {
            let hint = match status {
                401 => ": the service account token was refused",
                403 => ": the service account may not list pods (deploy/kubernetes/rbac.yaml grants it)",
                _ => "",
            };
            return Err(K8sError::Status { status, hint });
        }
        let body = response.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(unreachable)?;
        Ok(parse_pod_list(&body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn in_cluster_from_the_environment() {
        let k = Kubernetes::default();
        let c = ApiConfig::resolve(
            &k,
            &env(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
                ("NODE_NAME", "n1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.url, "https://10.96.0.1:443");
        assert_eq!(c.node, "n1");
        assert_eq!(c.token_path, PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"));
        let v6 = ApiConfig::resolve(&k, &env(&[("KUBERNETES_SERVICE_HOST", "fd00::1"), ("NODE_NAME", "n1")]))
            .unwrap();
        assert_eq!(v6.url, "https://[fd00::1]:443");
    }

    #[test]
    fn configuration_overrides_and_missing_pieces() {
        let k = Kubernetes {
            api_url: Some("http://127.0.0.1:8001/".into()),
            node_name: Some("n2".into()),
            token_path: Some("/tmp/t".into()),
            ..Default::default()
        };
        let c =
            ApiConfig::resolve(&k, &env(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1"), ("NODE_NAME", "n1")]))
                .unwrap();
        assert_eq!((c.url.as_str(), c.node.as_str()), ("http://127.0.0.1:8001", "n2"));
        assert_eq!(c.token_path, PathBuf::from("/tmp/t"));
        let err = ApiConfig::resolve(&Kubernetes::default(), &env(&[("NODE_NAME", "n1")])).unwrap_err();
        assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");
        let err = ApiConfig::resolve(&Kubernetes::default(), &env(&[("KUBERNETES_SERVICE_HOST", "h")]))
            .unwrap_err();
        assert!(err.contains("NODE_NAME"), "{err}");
    }

    #[test]
    fn an_unreachable_server_is_one_sentence() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = ApiConfig {
            url: format!("http://127.0.0.1:{port}"),
            token_path: "/nonexistent".into(),
            ca_path: None,
            node: "n1".into(),
        };
        let err = Client::new(config).unwrap().list_pods().unwrap_err().to_string();
        assert!(
            err.starts_with("cannot list pods from the Kubernetes API server at http://127.0.0.1:"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_ca_bundle_is_named() {
        let dir = std::env::temp_dir().join(format!("stoker-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let config = ApiConfig {
            url: "https://10.96.0.1:443".into(),
            token_path: "/nonexistent".into(),
            ca_path: Some(ca.clone()),
            node: "n1".into(),
        };
        let err = Client::new(config).err().expect("a CA without certificates is refused").to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(err.contains(&ca.display().to_string()), "{err}");
    }
}
