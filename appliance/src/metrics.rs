//! The metrics endpoint: `GET /metrics` on an opt-in listen address, in the OpenMetrics text
//! format (prometheus-client), which Prometheus scrapes natively. Anything else is a 404.
//! Metrics are for monitoring on a management network: no TLS, no authentication — bind it to
//! loopback or a management interface.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

pub use prometheus_client;

/// A label set of one `key="value"` pair, the only kind culvert's metric families use.
pub type Labels = Vec<(&'static str, String)>;

pub fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_owned())]
}

/// Serve `registry` on `listener` until the runtime ends.
pub fn spawn(listener: TcpListener, registry: Arc<Registry>) {
    if let Ok(a) = listener.local_addr() {
        info!(listen = %a, "metrics endpoint: http://{a}/metrics");
    }
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let registry = registry.clone();
                        async move { Ok::<_, Infallible>(answer(req.uri().path(), &registry)) }
                    },
                );
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc);
                let timed = tokio::time::timeout(std::time::Duration::from_secs(30), conn);
                if let Ok(Err(e)) = timed.await {
                    debug!(%peer, error = %e, "metrics connection ended with an error");
                }
            });
        }
    });
}

fn answer(path: &str, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if path == "/metrics" {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, registry) {
            Ok(()) => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "cannot encode metrics\n".into(),
            ),
        }
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".into(),
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}
