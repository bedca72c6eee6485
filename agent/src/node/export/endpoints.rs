//! Where OTLP goes: each signal's endpoint, protocol, headers, compression and timeout,
//! resolved from the standard OTEL_EXPORTER_OTLP_* variables and checked at start.
use std::time::Duration;

/// An OTEL_EXPORTER_OTLP_* variable whose value cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {var}: {message}")]
pub struct InvalidVariable {
    pub var: String,
    pub message: String,
}

/// The OTLP wire protocols stoker speaks (OTEL_EXPORTER_OTLP_PROTOCOL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// The signals stoker exports over OTLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Profiles,
    Traces,
    /// The advice's findings as log records (for Loki).
    Logs,
}

impl Signal {
    /// The infix of the signal-specific variables (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`).
    fn var(self) -> &'static str {
        match self {
            Signal::Metrics => "METRICS",
            Signal::Profiles => "PROFILES",
            Signal::Traces => "TRACES",
            Signal::Logs => "LOGS",
        }
    }

    /// The path appended to OTEL_EXPORTER_OTLP_ENDPOINT for http/protobuf.
    pub fn http_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/v1/metrics",
            Signal::Profiles => "/v1development/profiles",
            Signal::Traces => "/v1/traces",
            Signal::Logs => "/v1/logs",
        }
    }

    /// The gRPC method the signal is exported with.
    pub fn grpc_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Profiles => {
                "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export"
            }
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        }
    }
}

/// One signal's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub signal: Signal,
    pub protocol: Protocol,
    /// http/protobuf: the URL requests are POSTed to; gRPC: the server's `http://host:port`.
    pub url: String,
    /// Sent with every request (HTTP headers or gRPC metadata); keys are lowercase.
    pub headers: Vec<(String, String)>,
    pub gzip: bool,
    pub timeout: Duration,
}

/// The spec's default timeout of an export request.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves `signal`'s destination from the environment; None when no endpoint and no
/// protocol variable is set (OTLP export is off). A protocol variable alone selects
/// the spec's default endpoint: http://localhost:4317 (grpc) or :4318 (http/protobuf).
pub fn resolve(
    signal: Signal,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Target>, InvalidVariable> {
    // The signal's own variable wins over the general one; empty counts as unset.
    let lookup = |suffix: &str| -> Option<(String, String)> {
        let specific = format!("OTEL_EXPORTER_OTLP_{}_{suffix}", signal.var());
        let general = format!("OTEL_EXPORTER_OTLP_{suffix}");
        [specific, general].into_iter().find_map(|var| {
            let value = env(&var)?.trim().to_string();
            (!value.is_empty()).then_some((var, value))
        })
    };
    let invalid = |var: &str, message: String| InvalidVariable { var: var.to_string(), message };

    let protocol = match lookup("PROTOCOL") {
        None => None,
        Some((_, p)) if p == "grpc" => Some(Protocol::Grpc),
        Some((_, p)) if p == "http/protobuf" => Some(Protocol::HttpProtobuf),
        Some((var, p)) => {
            return Err(invalid(&var, format!("`{p}` is not supported: use `grpc` or `http/protobuf`")));
        }
    };
    let specific_endpoint = format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.var());
    let endpoint = lookup("ENDPOINT");
    if endpoint.is_none() && protocol.is_none() {
        return Ok(None);
    }
    let protocol = protocol.unwrap_or(Protocol::HttpProtobuf);
    let (var, base) = endpoint.unwrap_or_else(|| {
        let port = if protocol == Protocol::Grpc { 4317 } else { 4318 };
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), format!("http://localhost:{port}"))
    });
    let scheme = ["http://", "https://"].into_iter().find(|s| base.starts_with(s));
    if scheme.is_none_or(|s| base.len() == s.len()) {
        return Err(invalid(&var, format!("`{base}` is not an http:// or https:// URL")));
    }
    if protocol == Protocol::Grpc && scheme == Some("https://") {
        return Err(invalid(
            &var,
            format!(
                "`{base}`: gRPC over TLS is not built in; use http/protobuf for an https:// endpoint, or a Collector on the node or in the cluster over http://"
            ),
        ));
    }
    let url = match protocol {
        // The signal's own endpoint is the whole URL; the general one is a base.
        Protocol::HttpProtobuf if var == specific_endpoint => base,
        Protocol::HttpProtobuf => format!("{}{}", base.trim_end_matches('/'), signal.http_path()),
        Protocol::Grpc => {
            if tonic::transport::Endpoint::from_shared(base.clone()).is_err() {
                return Err(invalid(&var, format!("`{base}` is not a valid gRPC endpoint URL")));
            }
            base
        }
    };
    let headers = match lookup("HEADERS") {
        Some((var, text)) => parse_headers(&text).map_err(|m| invalid(&var, m))?,
        None => Vec::new(),
    };
    let gzip = match lookup("COMPRESSION") {
        None => false,
        Some((_, c)) if c == "gzip" => true,
        Some((_, c)) if c == "none" => false,
        Some((var, c)) => return Err(invalid(&var, format!("`{c}` is not supported: use `gzip` or `none`"))),
    };
    let timeout = match lookup("TIMEOUT") {
        None => DEFAULT_TIMEOUT,
        Some((var, ms)) => match ms.parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => return Err(invalid(&var, format!("`{ms}` is not a positive number of milliseconds"))),
        },
    };
    Ok(Some(Target { signal, protocol, url, headers, gzip, timeout }))
}

/// `k=v,k=v` with percent-encoded keys and values, as in OTEL_EXPORTER_OTLP_HEADERS.
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut headers = Vec::new();
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("`{}` is not key=value", pair.trim()));
        };
        let key = percent_decode(k.trim()).to_ascii_lowercase();
        let value = percent_decode(v.trim());
        let key_ok = !key.is_empty()
            && !key.ends_with("-bin")
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !key_ok {
            return Err(format!("`{key}` is not a usable header name"));
        }
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(format!("the value of header `{key}` must be printable ASCII"));
        }
        headers.push((key, value));
    }
    Ok(headers)
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) =
                (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_with(signal: Signal, vars: &[(&str, &str)]) -> Result<Option<Target>, String> {
        let env = |k: &str| vars.iter().find(|(name, _)| *name == k).map(|(_, v)| v.to_string());
        resolve(signal, &env).map_err(|e| e.to_string())
    }

    #[test]
    fn nothing_set_means_no_export() {
        assert_eq!(resolve_with(Signal::Metrics, &[]).unwrap(), None);
    }

    #[test]
    fn http_appends_the_signal_path_to_the_base_endpoint() {
        let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")];
        let t = resolve_with(Signal::Metrics, &vars).unwrap().unwrap();
        assert_eq!(
            (t.protocol, t.url.as_str()),
            (Protocol::HttpProtobuf, "http://collector:4318/v1/metrics")
        );
        let t = resolve_with(Signal::Profiles, &vars).unwrap().unwrap();
        assert_eq!(t.url, "http://collector:4318/v1development/profiles");
        assert_eq!(t.timeout, Duration::from_secs(10));
        let vars = [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://c:9000/custom")];
        assert_eq!(resolve_with(Signal::Metrics, &vars).unwrap().unwrap().url, "http://c:9000/custom");
    }

    #[test]
    fn grpc_with_the_signal_settings_winning() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "Authorization=Bearer%20x%2Cy, x-tenant = acme"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2500"),
        ];
        let t = resolve_with(Signal::Metrics, &vars).unwrap().unwrap();
        assert_eq!(t.protocol, Protocol::Grpc);
        assert_eq!(t.url, "http://collector:4317");
        assert_eq!(
            t.headers,
            vec![("authorization".into(), "Bearer x,y".into()), ("x-tenant".into(), "acme".into())]
        );
        assert!(t.gzip);
        assert_eq!(t.timeout, Duration::from_millis(2500));
        let p = resolve_with(Signal::Profiles, &vars).unwrap().unwrap();
        assert_eq!((p.protocol, p.headers.len()), (Protocol::HttpProtobuf, 1));
    }

    #[test]
    fn a_protocol_alone_selects_the_default_endpoint() {
        let t = resolve_with(Signal::Metrics, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap().unwrap();
        assert_eq!(t.url, "http://localhost:4317");
        let t = resolve_with(Signal::Profiles, &[("OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL", "http/protobuf")])
            .unwrap()
            .unwrap();
        assert_eq!(t.url, "http://localhost:4318/v1development/profiles");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let check = |vars: &[(&str, &str)], var: &str| {
            let err = resolve_with(Signal::Metrics, vars).unwrap_err();
            assert!(err.contains(var), "{vars:?}: {err}");
        };
        check(&[("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json")], "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL");
        check(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")], "OTEL_EXPORTER_OTLP_PROTOCOL");
        check(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")], "OTEL_EXPORTER_OTLP_ENDPOINT");
        let grpc = ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        check(&[grpc, ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317")], "OTEL_EXPORTER_OTLP_ENDPOINT");
        check(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://")], "OTEL_EXPORTER_OTLP_ENDPOINT");
        let tls = resolve_with(Signal::Metrics, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]);
        assert_eq!(tls.unwrap().unwrap().url, "https://c:4318/v1/metrics");
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        check(&[base, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")], "OTEL_EXPORTER_OTLP_HEADERS");
        check(&[base, ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")], "OTEL_EXPORTER_OTLP_COMPRESSION");
        check(&[base, ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "soon")], "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT");
    }

    #[test]
    fn percent_decoding_leaves_stray_percents() {
        assert_eq!(percent_decode("a%3Db%2c%zz%"), "a=b,%zz%");
    }
}
