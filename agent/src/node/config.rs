//! The node agent's configuration: a YAML file, overridden by the standard OTEL_*
//! variables, validated at start with errors that name the offending key.
use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use serde::Deserialize;

use super::export::{
    endpoints::{self, InvalidVariable, Signal, Target},
    exporter::Limits,
};
use crate::k8s::config::Kubernetes;

/// Why a configuration was refused: one sentence naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(transparent)]
    Env(#[from] InvalidVariable),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Samples per second per CPU (a prime, so it does not beat with 10 ms timers).
    pub sample_rate_hz: u64,
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
    pub select: Select,
    pub metrics: Metrics,
    pub otlp: Otlp,
    pub pyroscope: Pyroscope,
    pub prometheus: Prometheus,
    pub queue: Queue,
    pub kubernetes: Kubernetes,
    pub network: Network,
    pub off_cpu: OffCpu,
    pub advice: AdviceConfig,
    pub kernel: Kernel,
    /// OTLP destinations, from the OTEL_EXPORTER_OTLP_* variables (not the file).
    #[serde(skip)]
    pub export: Exports,
}

/// The kernel programs' maps.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Kernel {
    /// Bytes the sample counts map may take: it has a counter per CPU for each entry, so
    /// on a node with many CPUs it gets fewer entries (between 4,096 and 65,536).
    pub counts_max_bytes: u64,
}

impl Default for Kernel {
    fn default() -> Self {
        Self { counts_max_bytes: crate::programs::sizing::DEFAULT_COUNTS_BYTES }
    }
}

/// Where each OTLP signal goes; None: not exported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exports {
    pub metrics: Option<Target>,
    pub profiles: Option<Target>,
    /// HTTP server request spans (with `network.enabled`).
    pub traces: Option<Target>,
    /// The advice's findings as log records (with `advice.enabled`).
    pub logs: Option<Target>,
}

/// Which processes to sample; empty lists select every CPython process on the node.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Select {
    /// Regexes matched against the process name and executable path.
    pub process_names: Vec<String>,
    /// Kubernetes namespaces (needs the pod lookup).
    pub namespaces: Vec<String>,
    /// Pod label selector: every pair must match (needs the pod lookup).
    pub pod_labels: BTreeMap<String, String>,
    /// Kubernetes container names, or container-id prefixes of at least 12 hex digits
    /// (which need no pod lookup).
    pub containers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Python functions reported per process (bounds the metric's cardinality).
    pub top_functions: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Otlp {
    /// Also send OTLP profiles (v1development).
    pub profiles: bool,
    /// Largest request the receiver takes (the Collector's gRPC default is 4 MiB); larger
    /// requests are split by resource, and a resource alone over it is dropped and counted.
    pub max_request_bytes: usize,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pyroscope {
    /// Base URL of a Pyroscope server (`/ingest` is appended); none: no push.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Prometheus {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Queue {
    /// Export batches kept while an endpoint is unreachable; the oldest go first.
    pub max_batches: usize,
    /// Bytes of export batches kept, per exporter; the oldest go first.
    pub max_bytes: usize,
}

/// Network latency of the sampled processes (socket system calls and TCP tracepoints).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Time requests and TCP connects of the sampled processes.
    pub enabled: bool,
    /// `full` (requests, connections, socket and accept queues, stalls) or `requests`
    /// (requests, connections and accept queues only: none of the programs that run for
    /// every TCP segment and write of the node).
    pub detail: crate::net::NetDetail,
    pub spans: Spans,
}

/// Advice per process (`stoker advise`'s rules) over a sliding window of intervals.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdviceConfig {
    pub enabled: bool,
    /// How much of the past the advice weighs: the intervals of this last stretch.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Within the window, an interval this much older weighs half as much in the
    /// percentiles of CPU and memory use (VPA's decaying histograms); 0: all weigh the same.
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
}

impl Default for AdviceConfig {
    fn default() -> Self {
        Self { enabled: true, window: Duration::from_secs(3600), half_life: Duration::from_secs(900) }
    }
}

/// Off-CPU time of the sampled processes' threads, by reason (scheduler tracepoints).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OffCpu {
    /// Follow every switch of their threads off the CPU (see the README for the cost).
    pub enabled: bool,
    /// With `enabled`: event-loop stretches at least this long without a wait for events
    /// go into `stoker.event_loop.blocked.duration` (0s: not watched).
    #[serde(with = "humantime_serde")]
    pub loop_block_threshold: Duration,
    /// Switches off the CPU per second of one thread on a CPU followed in full; a thread
    /// that switches faster has its time off the CPU sampled by the clock at the sampling
    /// rate instead (0: every switch).
    pub switch_budget: u32,
    /// `sampled` (every thread's time off the CPU sampled by the clock; no program on
    /// switches) or `followed` (every switch off the CPU within `switch_budget`, each wait
    /// exact).
    pub waits: crate::collect::Waits,
}

impl Default for OffCpu {
    fn default() -> Self {
        Self {
            enabled: false,
            loop_block_threshold: Duration::from_millis(100),
            switch_budget: crate::programs::offcpu::DEFAULT_SWITCH_BUDGET,
            waits: crate::collect::Waits::default(),
        }
    }
}

/// Which HTTP server requests go out as OTLP spans.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Spans {
    /// Share of requests sent (0 to 1), chosen at random.
    pub sample_ratio: f64,
    /// Requests at least this slow are always sent.
    #[serde(with = "humantime_serde")]
    pub slow_threshold: Duration,
    /// Spans sent per export interval at most; the rest are counted as dropped.
    pub max_per_interval: usize,
}

impl Default for Network {
    fn default() -> Self {
        Self { enabled: true, detail: crate::net::NetDetail::Full, spans: Spans::default() }
    }
}

impl Default for Spans {
    fn default() -> Self {
        Self { sample_ratio: 0.01, slow_threshold: Duration::from_millis(500), max_per_interval: 1000 }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            sample_rate_hz: 19,
            export_interval: Duration::from_secs(15),
            select: Select::default(),
            metrics: Metrics::default(),
            otlp: Otlp::default(),
            pyroscope: Pyroscope::default(),
            prometheus: Prometheus::default(),
            queue: Queue::default(),
            kubernetes: Kubernetes::default(),
            network: Network::default(),
            off_cpu: OffCpu::default(),
            advice: AdviceConfig::default(),
            kernel: Kernel::default(),
            export: Exports::default(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self { top_functions: 20 }
    }
}

impl Default for Prometheus {
    fn default() -> Self {
        Self { listen: "0.0.0.0:9464".into() }
    }
}

impl Default for Queue {
    fn default() -> Self {
        Self { max_batches: 64, max_bytes: 64 << 20 }
    }
}

impl Default for Otlp {
    fn default() -> Self {
        Self { profiles: false, max_request_bytes: 4 << 20 }
    }
}

impl AgentConfig {
    /// What each exporter queues and sends at most.
    pub fn export_limits(&self) -> Limits {
        Limits {
            max_batches: self.queue.max_batches,
            max_bytes: self.queue.max_bytes,
            max_request_bytes: Some(self.otlp.max_request_bytes),
        }
    }

    /// Reads, overrides from the environment and validates a configuration file.
    /// `path` (none: the defaults), then `overrides` (`key.path=value`, as from `--set`),
    /// then the environment.
    pub fn load(
        path: Option<&Path>,
        overrides: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let shown = path.map_or_else(|| "configuration".to_string(), |p| p.display().to_string());
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: shown.clone(), source })?,
            None => String::new(),
        };
        let mut config = Self::parse_with(&text, overrides)
            .map_err(|message| ConfigError::Parse { path: shown, message })?;
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML text with `key.path=value` overrides applied (values are YAML too:
    /// `network.enabled=false`, `select.namespaces=[shop, cart]`).
    pub fn parse_with(text: &str, overrides: &[String]) -> Result<Self, String> {
        if overrides.is_empty() {
            return Self::parse(text);
        }
        let mut doc: serde_norway::Value = match text.trim() {
            "" => serde_norway::Value::Mapping(Default::default()),
            t => serde_norway::from_str(t).map_err(|e| plain(&e))?,
        };
        for o in overrides {
            let (path, value) =
                o.split_once('=').ok_or_else(|| format!("--set `{o}`: expected key.path=value"))?;
            let value: serde_norway::Value =
                serde_norway::from_str(value).map_err(|e| format!("--set `{o}`: {}", plain(&e)))?;
            let mut node = &mut doc;
            for key in path.split('.') {
                let map = node
                    .as_mapping_mut()
                    .ok_or_else(|| format!("--set `{o}`: `{key}` is not in a section"))?;
                node = map.entry(key.into()).or_insert(serde_norway::Value::Mapping(Default::default()));
            }
            *node = value;
            // Checked one at a time, so that an error names the override that caused it.
            serde_norway::from_value::<Self>(doc.clone())
                .map_err(|e| format!("--set `{o}`: {}", plain(&e)))?;
        }
        serde_norway::from_value(doc).map_err(|e| plain(&e))
    }

    /// Parses YAML text; an empty document is the default configuration.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_norway::from_str(text).map_err(|e| plain(&e))
    }

    /// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds) overrides `export_interval`; the
    /// OTEL_EXPORTER_OTLP_* variables give the OTLP destinations (see `endpoints::resolve`).
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(ms) = env("OTEL_METRIC_EXPORT_INTERVAL") {
            let ms: u64 = ms.trim().parse().map_err(|_| ConfigError::Invalid {
                key: "OTEL_METRIC_EXPORT_INTERVAL",
                message: format!("`{ms}` is not a number of milliseconds"),
            })?;
            self.export_interval = Duration::from_millis(ms);
        }
        self.export.metrics = endpoints::resolve(Signal::Metrics, &env)?;
        self.export.profiles = match endpoints::resolve(Signal::Profiles, &env)? {
            Some(target) if self.otlp.profiles => Some(target),
            Some(_) => None,
            None if self.otlp.profiles => {
                return Err(ConfigError::Invalid {
                    key: "otlp.profiles",
                    message: "needs an OTLP destination: set OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                });
            }
            None => None,
        };
        self.export.traces = match self.network.enabled {
            true => endpoints::resolve(Signal::Traces, &env)?,
            false => None,
        };
        self.export.logs = match self.advice.enabled {
            true => endpoints::resolve(Signal::Logs, &env)?,
            false => None,
        };
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if !(1..=1000).contains(&self.sample_rate_hz) {
            return invalid("sample_rate_hz", format!("{} is outside 1..=1000", self.sample_rate_hz));
        }
        if self.export_interval < Duration::from_secs(1) {
            return invalid(
                "export_interval",
                format!("{} is shorter than 1s", seconds(self.export_interval)),
            );
        }
        if !(1..=1000).contains(&self.metrics.top_functions) {
            return invalid(
                "metrics.top_functions",
                format!("{} is outside 1..=1000", self.metrics.top_functions),
            );
        }
        if self.queue.max_batches == 0 {
            return invalid("queue.max_batches", "must be at least 1".into());
        }
        // Below 1 KiB not even one process's metrics fit.
        if self.otlp.max_request_bytes < 1024 {
            return invalid(
                "otlp.max_request_bytes",
                format!("{} is below 1024", self.otlp.max_request_bytes),
            );
        }
        if self.queue.max_bytes < self.otlp.max_request_bytes {
            return invalid(
                "queue.max_bytes",
                format!(
                    "{} is below otlp.max_request_bytes ({}): not one full request would fit",
                    self.queue.max_bytes, self.otlp.max_request_bytes
                ),
            );
        }
        for pattern in &self.select.process_names {
            if let Err(e) = regex::Regex::new(pattern) {
                return invalid("select.process_names", format!("`{pattern}` is not a regex: {e}"));
            }
        }
        let k = &self.kubernetes;
        if !k.enabled && !self.select.namespaces.is_empty() {
            return invalid("select.namespaces", "needs the pod lookup: set kubernetes.enabled: true".into());
        }
        if !k.enabled && !self.select.pod_labels.is_empty() {
            return invalid("select.pod_labels", "needs the pod lookup: set kubernetes.enabled: true".into());
        }
        if let Some(url) = &k.api_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid("kubernetes.api_url", format!("`{url}` is not an http(s) URL"));
        }
        if k.refresh_interval < Duration::from_secs(1) {
            return invalid(
                "kubernetes.refresh_interval",
                format!("{} is shorter than 1s", seconds(k.refresh_interval)),
            );
        }
        if self.select.containers.iter().any(|c| c.is_empty()) {
            return invalid("select.containers", "an entry is empty".into());
        }
        let spans = &self.network.spans;
        if !(0.0..=1.0).contains(&spans.sample_ratio) {
            return invalid("network.spans.sample_ratio", format!("{} is outside 0..=1", spans.sample_ratio));
        }
        if spans.max_per_interval > 100_000 {
            return invalid(
                "network.spans.max_per_interval",
                format!("{} is above 100000", spans.max_per_interval),
            );
        }
        if self.prometheus.listen.parse::<SocketAddr>().is_err() {
            return invalid(
                "prometheus.listen",
                format!("`{}` is not an address:port", self.prometheus.listen),
            );
        }
        if let Some(url) = &self.pyroscope.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid("pyroscope.url", format!("`{url}` is not an http(s) URL"));
        }
        if self.advice.enabled && self.advice.window < self.export_interval {
            return invalid(
                "advice.window",
                format!(
                    "{} is shorter than export_interval ({}): it would hold no whole interval",
                    seconds(self.advice.window),
                    seconds(self.export_interval)
                ),
            );
        }
        // Below this the map would get its floor of entries anyway (more than asked for).
        if self.kernel.counts_max_bytes < 1 << 20 {
            return invalid(
                "kernel.counts_max_bytes",
                format!("{} is below 1 MiB (1048576)", self.kernel.counts_max_bytes),
            );
        }
        Ok(())
    }
}

/// A duration as the configuration writes one: `0s`, `0.5s`, `15s`.
fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// A YAML or type error in plain words: the Rust type names serde reports (`u64`,
/// `struct AgentConfig`) become what to write, and a string with spaces where a duration or
/// number belongs is likely a value and the next line's key, indented under it.
fn plain(e: &impl std::fmt::Display) -> String {
    let mut text = e.to_string();
    for (rust, words) in [
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a sequence", "expected a list ([a, b] or lines starting with -)"),
        ("expected struct AgentConfig", "expected a mapping of settings (key: value lines)"),
    ] {
        text = text.replace(rust, words);
    }
    if let Some(at) = text.find("expected struct ") {
        let name = text[at + 16..].chars().take_while(char::is_ascii_alphanumeric).count();
        text.replace_range(at..at + 16 + name, "expected a section (indented key: value lines)");
    }
    // `export_interval: 15s` with the next line's key indented under it reads as one string.
    let scalar =
        ["expected a duration", "expected a whole number", "expected a number", "expected a boolean"];
    let value = text.split_once("string \"").and_then(|(_, rest)| rest.split_once('"')).map(|(v, _)| v);
    if value.is_some_and(|v| v.trim().contains(char::is_whitespace))
        && scalar.iter().any(|s| text.contains(s))
    {
        text.push_str(" (is the next key indented under this one?)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
sample_rate_hz: 19
export_interval: 15s
select:
  process_names: ['^gunicorn', 'python3\\.1[12]']
  namespaces: [shop]
  pod_labels: {app: checkout}
  containers: [web]
metrics:
  top_functions: 20
otlp:
  profiles: true
  max_request_bytes: 4194304
pyroscope:
  url: http://pyroscope.stoker.svc:4040
prometheus:
  listen: 0.0.0.0:9464
queue:
  max_batches: 64
  max_bytes: 67108864
kubernetes:
  enabled: true
  api_url: https://10.96.0.1:443
  token_path: /var/run/secrets/kubernetes.io/serviceaccount/token
  ca_path: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
  node_name: node-1
  refresh_interval: 30s
network:
  enabled: true
  detail: requests
  spans:
    sample_ratio: 0.05
    slow_threshold: 250ms
    max_per_interval: 500
";

    #[test]
    fn parses_every_key() {
        let c = AgentConfig::parse(FULL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.export_interval, Duration::from_secs(15));
        assert_eq!(c.select.pod_labels.get("app").map(String::as_str), Some("checkout"));
        assert!(c.otlp.profiles);
        assert_eq!(c.export_limits(), AgentConfig::default().export_limits());
        assert_eq!(c.export_limits().max_bytes, 64 << 20);
        assert_eq!(c.export_limits().max_request_bytes, Some(4 << 20));
        assert_eq!(c.network.spans.slow_threshold, Duration::from_millis(250));
        assert_eq!(c.network.detail, crate::net::NetDetail::Requests);
        assert_eq!(AgentConfig::parse("").unwrap(), AgentConfig::default());
        let mut bad = AgentConfig::parse("network:\n  spans:\n    sample_ratio: 2\n").unwrap();
        bad.apply_env(|_| None).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("network.spans.sample_ratio"));
    }

    /// Mistakes read in plain words: no Rust type names, durations as written, and a hint
    /// where a key was indented under the line before.
    #[test]
    fn config_errors_in_plain_words() {
        let err = |text: &str| AgentConfig::parse(text).unwrap_err();
        let e = err("sample_rate_hz: lots\n");
        assert!(e.contains("expected a whole number") && !e.contains("u64"), "{e}");
        let e = err("- a\n- b\n");
        assert!(e.contains("expected a mapping of settings") && !e.contains("AgentConfig"), "{e}");
        let e = err("network: 3\n");
        assert!(e.contains("expected a section (indented key: value lines)") && !e.contains("struct"), "{e}");
        let e = err("export_interval: 15s\n  prometheus\n");
        assert!(
            e.contains("\"15s prometheus\"") && e.ends_with("(is the next key indented under this one?)"),
            "{e}"
        );
        let mut zero = AgentConfig::parse("export_interval: 0s\n").unwrap();
        zero.apply_env(|_| None).unwrap();
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("0s is shorter than 1s"), "{e}");
    }

    #[test]
    fn overrides_from_the_command_line() {
        let set = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            AgentConfig::parse_with("sample_rate_hz: 49\nselect:\n  process_names: [gunicorn]\n", &o)
        };
        let c =
            set(&["network.enabled=false", "select.namespaces=[shop, cart]", "export_interval=30s"]).unwrap();
        assert_eq!(c.sample_rate_hz, 49);
        assert!(!c.network.enabled);
        assert_eq!(c.select.namespaces, ["shop", "cart"]);
        assert_eq!(c.select.process_names, ["gunicorn"]);
        assert_eq!(c.export_interval, Duration::from_secs(30));
        assert_eq!(set(&["sample_rate_hz=7"]).unwrap().sample_rate_hz, 7);
        assert!(set(&["network.enable=false"]).unwrap_err().contains("--set `network.enable=false`"));
        assert!(set(&["network.enabled=nope"]).unwrap_err().contains("network.enabled"));
        assert!(set(&["sample_rate_hz"]).unwrap_err().contains("key.path=value"));
        assert!(set(&["sample_rate_hz.x=1"]).unwrap_err().contains("not in a section"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = AgentConfig::parse("select:\n  namespace: [shop]\n").unwrap_err();
        assert!(err.contains("namespace"), "{err}");
        let err = AgentConfig::parse("sample_rate: 19\n").unwrap_err();
        assert!(err.contains("sample_rate"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let check = |yaml: &str, key: &str| {
            let err = AgentConfig::parse(yaml).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        };
        check("sample_rate_hz: 0\n", "sample_rate_hz");
        check("export_interval: 100ms\n", "export_interval");
        check("select:\n  process_names: ['(']\n", "select.process_names");
        check("prometheus:\n  listen: nowhere\n", "prometheus.listen");
        check("pyroscope:\n  url: pyroscope:4040\n", "pyroscope.url");
        check("metrics:\n  top_functions: 0\n", "metrics.top_functions");
        check("kubernetes:\n  enabled: false\nselect:\n  namespaces: [shop]\n", "select.namespaces");
        check("kubernetes:\n  enabled: false\nselect:\n  pod_labels: {app: a}\n", "select.pod_labels");
        check("kubernetes:\n  api_url: 10.96.0.1\n", "kubernetes.api_url");
        check("kubernetes:\n  refresh_interval: 10ms\n", "kubernetes.refresh_interval");
        check("queue:\n  max_batches: 0\n", "queue.max_batches");
        check("otlp:\n  max_request_bytes: 100\n", "otlp.max_request_bytes");
        check("queue:\n  max_bytes: 1000000\n", "queue.max_bytes");
        check("advice:\n  window: 1s\n", "advice.window");
        check("kernel:\n  counts_max_bytes: 1\n", "kernel.counts_max_bytes");
        // Container-id prefixes work without the pod lookup.
        AgentConfig::parse("kubernetes:\n  enabled: false\nselect:\n  containers: [3f4a1c2b9d8e]\n")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn environment_overrides_the_interval() {
        let mut c = AgentConfig::default();
        c.apply_env(|k| (k == "OTEL_METRIC_EXPORT_INTERVAL").then(|| "5000".into())).unwrap();
        assert_eq!(c.export_interval, Duration::from_secs(5));
        let err = c.apply_env(|_| Some("soon".into())).unwrap_err().to_string();
        assert!(err.contains("OTEL_METRIC_EXPORT_INTERVAL"), "{err}");
    }

    #[test]
    fn profiles_need_a_destination() {
        let mut c = AgentConfig::parse("otlp:\n  profiles: true\n").unwrap();
        let err = c.apply_env(|_| None).unwrap_err().to_string();
        assert!(err.contains("otlp.profiles"), "{err}");
        let endpoint = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4318".to_string());
        c.apply_env(endpoint).unwrap();
        assert_eq!(c.export.profiles.unwrap().url, "http://c:4318/v1development/profiles");
        let mut off = AgentConfig::default();
        off.apply_env(endpoint).unwrap();
        assert!(off.export.metrics.is_some() && off.export.profiles.is_none());
    }
}
