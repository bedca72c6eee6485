//! Sends one encoded request to its destination: an HTTP POST (ureq) or a unary gRPC
//! call (tonic on a current-thread runtime owned by the calling export thread).
use std::{io::Write, time::Duration};

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

/// Why a send failed: worth retrying (unreachable, overloaded) or not (refused).
#[derive(Debug)]
pub enum Failure {
    Retry(String),
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
                        Ok(r) if r.status().is_success() => Ok(()),
                        // The statuses OTLP/HTTP says to retry.
                        Ok(r) if [429, 502, 503, 504].contains(&r.status().as_u16()) => {
                            Err(Failure::Retry(format!("HTTP status {}", r.status())))
                        }
                        Ok(r) => Err(Failure::Permanent(format!("HTTP status {}", r.status()))),
                        Err(e) => Err(Failure::Retry(e.to_string())),
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
        Code,
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
            // The codes OTLP/gRPC says not to retry (the request itself is refused).
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument
                        | Code::NotFound
                        | Code::AlreadyExists
                        | Code::PermissionDenied
                        | Code::Unauthenticated
                        | Code::FailedPrecondition
                        | Code::Unimplemented
                ) =>
            {
                Err(Failure::Permanent(format!("gRPC {:?}: {}", s.code(), s.message())))
            }
            Err(s) => Err(Failure::Retry(format!("gRPC {:?}: {}", s.code(), s.message()))),
        }
    }))
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
