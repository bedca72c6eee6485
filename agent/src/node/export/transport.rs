//! Sends one encoded request to its destination: an HTTP POST (ureq) or a unary gRPC
//! call (tonic on a current-thread runtime owned by the calling export thread).
use std::{io::Write, time::Duration};

use prost::Message;

use super::endpoints::{Protocol, Target};

/// Where and how batches are sent.
#[derive(Debug, Clone)]
pub enum Destination {
    Http {
        url: String,
        content_type: &'static str,
        headers: Vec<(String, String)>,
        gzip: bool,
        timeout: Duration,
    },
    Grpc {
        url: String,
        /// The method, `/package.Service/Method`.
        path: &'static str,
        headers: Vec<(String, String)>,
        gzip: bool,
        timeout: Duration,
    },
}

/// Why a send failed: worth retrying (unreachable, overloaded; after the delay the
/// receiver asked for, if it did) or not (refused).
#[derive(Debug, PartialEq)]
pub enum Failure {
    Retry(String, Option<Duration>),
    Permanent(String),
}

/// Sends one encoded batch.
pub type Send = Box<dyn FnMut(&[u8]) -> Result<(), Failure>>;

impl Destination {
    /// The destination of an OTLP signal.
    pub fn otlp(target: &Target) -> Self {
        let (headers, gzip, timeout) = (target.headers.clone(), target.gzip, target.timeout);
        match target.protocol {
            Protocol::HttpProtobuf => Destination::Http {
                url: target.url.clone(),
                content_type: "application/x-protobuf",
                headers,
                gzip,
                timeout,
            },
            Protocol::Grpc => Destination::Grpc {
                url: target.url.clone(),
                path: target.signal.grpc_path(),
                headers,
                gzip,
                timeout,
            },
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Destination::Http { url, .. } | Destination::Grpc { url, .. } => url,
        }
    }

    /// A sender for this destination; called on the thread that will use it.
    pub fn connect(&self) -> Result<Send, String> {
        match self.clone() {
            Destination::Http { url, content_type, headers, gzip, timeout } => {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(timeout))
                    .http_status_as_error(false)
                    .build()
                    .into();
                Ok(Box::new(move |body| {
                    let mut request = agent.post(&url).header("Content-Type", content_type);
                    for (k, v) in &headers {
                        request = request.header(k, v);
                    }
                    let response = if gzip {
                        request.header("Content-Encoding", "gzip").send(&gzipped(body)[..])
                    } else {
                        request.send(body)
                    };
                    match response {
                        Ok(r) => {
                            let retry_after = r.headers().get("Retry-After").and_then(|v| v.to_str().ok());
                            http_result(r.status().as_u16(), retry_after)
                        }
                        Err(e) => Err(Failure::Retry(e.to_string(), None)),
                    }
                }))
            }
            Destination::Grpc { url, path, headers, gzip, timeout } => {
                grpc(url, path, headers, gzip, timeout)
            }
        }
    }
}

fn grpc(
    url: String,
    path: &'static str,
    headers: Vec<(String, String)>,
    gzip: bool,
    timeout: Duration,
) -> Result<Send, String> {
    use tonic::{
        codec::CompressionEncoding,
        metadata::{MetadataKey, MetadataValue},
        transport::Endpoint,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("start the gRPC runtime: {e}"))?;
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| format!("`{url}`: {e}"))?;
    let channel = {
        let _context = runtime.enter();
        endpoint.connect_timeout(timeout).timeout(timeout).connect_lazy()
    };
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (k, v) in &headers {
        let key = MetadataKey::from_bytes(k.as_bytes()).map_err(|e| format!("header `{k}`: {e}"))?;
        let value = MetadataValue::try_from(v.as_str()).map_err(|e| format!("header `{k}`: {e}"))?;
        metadata.insert(key, value);
    }
    let path = http::uri::PathAndQuery::from_static(path);
    Ok(Box::new(move |body| {
        let mut client = tonic::client::Grpc::new(channel.clone());
        if gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let mut request = tonic::Request::new(body.to_vec());
        *request.metadata_mut() = metadata.clone();
        let sent = runtime.block_on(async {
            client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            client.unary(request, path.clone(), RawCodec).await
        });
        match sent {
            Ok(_) => Ok(()),
            Err(s) => Err(status_failure(&s)),
        }
    }))
}

/// A failed gRPC call: a status the receiver sent by the OTLP rules (`grpc_failure`), but a
/// status tonic made of a transport error (the connection reset mid-request as the receiver
/// went down: code UNKNOWN with the error as its source) is retried like an unreachable one.
fn status_failure(status: &tonic::Status) -> Failure {
    if status.code() == tonic::Code::Unknown && std::error::Error::source(status).is_some() {
        return Failure::Retry(format!("gRPC transport error: {}", status.message()), None);
    }
    grpc_failure(status.code(), status.message(), status.details())
}

/// An HTTP answer by the OTLP/HTTP rules: 429, 502, 503 and 504 are retried (after
/// `Retry-After` seconds when given), any other failure is final.
fn http_result(status: u16, retry_after: Option<&str>) -> Result<(), Failure> {
    match status {
        200..=299 => Ok(()),
        429 | 502 | 503 | 504 => {
            // An HTTP-date instead of seconds is rare from a Collector: plain backoff then.
            let after = retry_after.and_then(|s| s.trim().parse().ok()).map(Duration::from_secs);
            Err(Failure::Retry(format!("HTTP status {status}"), after))
        }
        _ => Err(Failure::Permanent(format!("HTTP status {status}"))),
    }
}

/// A gRPC status by the OTLP/gRPC rules: CANCELLED, DEADLINE_EXCEEDED, ABORTED,
/// OUT_OF_RANGE, UNAVAILABLE and DATA_LOSS are retried, RESOURCE_EXHAUSTED only when the
/// status carries a `google.rpc.RetryInfo` (the receiver can recover), anything else is final.
fn grpc_failure(code: tonic::Code, message: &str, details: &[u8]) -> Failure {
    use tonic::Code;
    let shown = format!("gRPC {code:?}: {message}");
    let retry_info = retry_delay(details);
    match code {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Failure::Retry(shown, retry_info.flatten()),
        Code::ResourceExhausted if retry_info.is_some() => Failure::Retry(shown, retry_info.flatten()),
        _ => Failure::Permanent(shown),
    }
}

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// From a status's `grpc-status-details-bin` (a `google.rpc.Status`): None when it has no
/// RetryInfo, Some(delay) when it has one (a delay of None: the RetryInfo gave none).
fn retry_delay(details: &[u8]) -> Option<Option<Duration>> {
    let status = RpcStatus::decode(details).ok()?;
    let info = status.details.iter().find(|d| d.type_url == RETRY_INFO)?;
    let delay = RetryInfo::decode(&info.value[..]).ok().and_then(|r| r.retry_delay);
    Some(
        delay.map(|d| {
            Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
        }),
    )
}

/// `google.rpc.Status`, only as far as its details.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

fn gzipped(body: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    gz.write_all(body).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// Sends already-encoded protobuf messages and ignores the response's content: the queue
/// holds encoded batches, so nothing is decoded and re-encoded per attempt.
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        bytes::Buf::advance(src, n);
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn transport_errors_are_retried_but_a_receivers_unknown_is_final() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let local = tonic::Status::from_error(Box::new(reset));
        assert_eq!(local.code(), tonic::Code::Unknown);
        assert!(matches!(status_failure(&local), Failure::Retry(_, None)));
        let sent = tonic::Status::new(tonic::Code::Unknown, "the receiver says so");
        assert!(matches!(status_failure(&sent), Failure::Permanent(_)));
    }

    fn status_with_retry_info(delay: Option<ProtoDuration>) -> Vec<u8> {
        let info = RetryInfo { retry_delay: delay }.encode_to_vec();
        let any = ProtoAny { type_url: RETRY_INFO.into(), value: info };
        RpcStatus { code: 8, message: "slow down".into(), details: vec![any] }.encode_to_vec()
    }

    #[test]
    fn http_statuses_follow_otlp() {
        assert_eq!(http_result(200, None), Ok(()));
        assert_eq!(
            http_result(503, Some("7")),
            Err(Failure::Retry("HTTP status 503".into(), Some(Duration::from_secs(7))))
        );
        assert_eq!(http_result(429, None), Err(Failure::Retry("HTTP status 429".into(), None)));
        let date = http_result(502, Some("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(date, Err(Failure::Retry("HTTP status 502".into(), None)));
        for status in [400, 401, 404, 413, 500] {
            assert!(matches!(http_result(status, Some("1")), Err(Failure::Permanent(_))), "{status}");
        }
    }

    #[test]
    fn grpc_codes_follow_otlp() {
        for code in [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ] {
            assert!(matches!(grpc_failure(code, "", &[]), Failure::Retry(_, None)), "{code:?}");
        }
        for code in [
            Code::Unknown,
            Code::InvalidArgument,
            Code::Internal,
            Code::Unimplemented,
            Code::Unauthenticated,
            Code::ResourceExhausted,
        ] {
            assert!(matches!(grpc_failure(code, "", &[]), Failure::Permanent(_)), "{code:?}");
        }
    }

    #[test]
    fn resource_exhausted_is_retried_only_with_retry_info() {
        let delay = ProtoDuration { seconds: 2, nanos: 500_000_000 };
        let details = status_with_retry_info(Some(delay));
        assert_eq!(
            grpc_failure(Code::ResourceExhausted, "slow down", &details),
            Failure::Retry("gRPC ResourceExhausted: slow down".into(), Some(Duration::from_millis(2500)))
        );
        let no_delay = status_with_retry_info(None);
        assert!(matches!(grpc_failure(Code::ResourceExhausted, "", &no_delay), Failure::Retry(_, None)));
        let other = RpcStatus { code: 8, message: String::new(), details: vec![] }.encode_to_vec();
        assert!(matches!(grpc_failure(Code::ResourceExhausted, "", &other), Failure::Permanent(_)));
        assert_eq!(
            grpc_failure(Code::Unavailable, "", &details),
            Failure::Retry("gRPC Unavailable: ".into(), Some(Duration::from_millis(2500)))
        );
    }
}
