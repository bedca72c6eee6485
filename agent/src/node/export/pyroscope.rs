//! Pushes each interval's profiles to Grafana Pyroscope: one pprof profile per process,
//! labelled like its metrics, through Pyroscope's push API (Connect, JSON encoding).
use std::{collections::HashMap, time::Duration};

use base64::Engine;

use super::{
    exporter::{Exporter, Limits},
    transport::Destination,
};
use crate::{
    export::pprof::{self, PprofMeta},
    node::state::Snapshot,
    profile::Profile,
};

/// The exporter for a Pyroscope server at `url`.
pub fn exporter(url: &str, limits: Limits) -> std::io::Result<Exporter> {
    let push = format!("{}/push.v1.PusherService/Push", url.trim_end_matches('/'));
    let destination = Destination::Http {
        url: push,
        content_type: "application/json",
        headers: Vec::new(),
        gzip: false,
        timeout: Duration::from_secs(10),
    };
    Exporter::start(destination, Limits { max_request_bytes: None, ..limits })
}

/// The push request for this interval's profiles; None when there are none.
pub fn push_request(
    profiles: &HashMap<u32, Profile>,
    snapshot: &Snapshot,
    rate_hz: u64,
    interval: Duration,
) -> Option<Vec<u8>> {
    let start = snapshot.time.unwrap_or_else(std::time::SystemTime::now) - interval;
    let meta = PprofMeta { rate_hz, start, duration: interval };
    let series: Vec<serde_json::Value> = profiles
        .iter()
        .filter_map(|(pid, profile)| {
            let process = snapshot.processes.get(pid)?;
            let raw = pprof::encode(profile, &meta);
            let mut labels = vec![serde_json::json!({"name": "__name__", "value": "process_cpu"})];
            for (k, v) in &process.resource {
                labels.push(serde_json::json!({"name": k.replace('.', "_"), "value": v}));
            }
            Some(serde_json::json!({
                "labels": labels,
                "samples": [{"rawProfile": base64::engine::general_purpose::STANDARD.encode(raw)}],
            }))
        })
        .collect();
    (!series.is_empty()).then(|| serde_json::json!({ "series": series }).to_string().into_bytes())
}
