//! The agent's HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use super::{prometheus, state::Snapshot};

/// Serves until the process exits (the thread is detached).
pub fn serve(listen: &str, snapshot: Arc<Mutex<Snapshot>>, ready: Arc<AtomicBool>) -> std::io::Result<()> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| std::io::Error::other(format!("listen on {listen}: {e}")))?;
    std::thread::Builder::new().name("http".into()).spawn(move || {
        for request in server.incoming_requests() {
            let (status, body, kind) = match request.url() {
                "/metrics" => {
                    let text = prometheus::render(&snapshot.lock().unwrap_or_else(|e| e.into_inner()));
                    (200, text, "text/plain; version=0.0.4")
                }
                "/healthz" => (200, "ok\n".to_string(), "text/plain"),
                "/readyz" if ready.load(Ordering::Relaxed) => (200, "ready\n".to_string(), "text/plain"),
                "/readyz" => (503, "starting\n".to_string(), "text/plain"),
                _ => (404, "not found\n".to_string(), "text/plain"),
            };
            let header = tiny_http::Header::from_bytes("Content-Type", kind).expect("static header");
            let _ = request
                .respond(tiny_http::Response::from_string(body).with_status_code(status).with_header(header));
        }
    })?;
    Ok(())
}
