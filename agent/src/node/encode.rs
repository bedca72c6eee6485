//! The encodings both metric renderings share: OTLP attributes and timestamps, and
//! Prometheus label escaping.
use std::{collections::BTreeMap, time::SystemTime};

use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};

/// Attributes the conventions type as integers.
const INT_ATTRIBUTES: [&str; 5] =
    ["http.response.status_code", "server.port", "client.port", "http.request.size", "http.response.size"];

/// An attribute, an integer for the keys the conventions type so, else a string.
pub(crate) fn attribute(key: &str, value: &str) -> KeyValue {
    match value.parse::<i64>() {
        Ok(n) if INT_ATTRIBUTES.contains(&key) => KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::IntValue(n)) }),
            ..Default::default()
        },
        _ => kv(key, value),
    }
}

pub(crate) fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// The instrumentation scope of everything the agent exports: stoker and its version.
pub(crate) fn stoker_scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "stoker".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

pub(crate) fn nanos(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64)
}

/// Resource attributes as Prometheus labels (`k="v",...`, no braces), named as a
/// Collector's Prometheus exporters name them: every character other than a letter, digit
/// or underscore becomes an underscore, and a leading digit gets `key_` before it.
pub(crate) fn resource_labels(resource: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> =
        resource.iter().map(|(k, v)| format!("{}=\"{}\"", label_name(k), escape(v))).collect();
    parts.join(",")
}

/// An attribute's key as a Prometheus label name.
pub(crate) fn label_name(key: &str) -> String {
    let name: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) { format!("key_{name}") } else { name }
}

pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
