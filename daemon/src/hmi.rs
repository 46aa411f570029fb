//! On-site approval from a local HMI over HTTP (`[consent] hmi_listen`, `hmi_token_file`):
//! the operator panel beside the machine shows the waiting tunnels and has an Approve and a
//! Refuse button.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | /approvals | `{"waiting": [{tunnel, operator, reason, since, until}]}`, oldest first |
//! | POST | /approvals/{tunnel}/approve | `{"by": "..."}` (optional) |
//! | POST | /approvals/{tunnel}/refuse | `{"by": "...", "why": "..."}` (optional) |
//!
//! Every request carries `Authorization: Bearer <token>` (the token file's content); a
//! decision is a decision file dropped in the approval directory, exactly as `culvertd consent`
//! drops it, so the audit trail and the relay see no difference. Plain HTTP, for a listener on
//! the HMI's own network segment or loopback: the token is the panel's, not an operator's.
//! Bounded: 8 connections at once, 10 s for a request head, 30 s per connection, 4 KiB bodies.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::rules::Gateway;

const MAX_CONNECTIONS: usize = 8;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BODY: usize = 4096;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    why: Option<String>,
}

fn digest(s: &str) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
}

/// Serve the HMI on `listener`. The approval directory and the token are the configuration's
/// in force at each request (a reload changes them); the address is the one bound at start.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    if let Ok(a) = listener.local_addr() {
        info!(listen = %a, "on-site approval HMI listening");
    }
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "HMI listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "HMI listener full; connection closed");
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&gw, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "HMI connection failed"),
                Err(_) => debug!(%peer, "HMI connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    reply(
        status,
        serde_json::json!({"error": code, "message": message.into()}),
    )
}

async fn handle(gw: &Gateway, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some((dir, token)) = gw
        .config()
        .approval
        .as_ref()
        .and_then(|a| Some((a.dir.clone(), digest(&a.hmi.as_ref()?.token.0))))
    else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "on-site approval from an HMI is off in the configuration in force",
        );
    };
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| digest(t.trim()).as_ref() == token.as_ref());
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <token>` with the token of consent.hmi_token_file",
        );
    }
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, ["approvals"]) => match crate::approval::waiting_in(&dir) {
            Ok(w) => reply(StatusCode::OK, serde_json::json!({ "waiting": w })),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
        },
        (Method::POST, ["approvals", tunnel, verb @ ("approve" | "refuse")]) => {
            let tunnel = (*tunnel).to_owned();
            let approve = *verb == "approve";
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!("a decision is at most {MAX_BODY} bytes of JSON"),
                    );
                }
            };
            let d: DecisionBody = if body.iter().all(u8::is_ascii_whitespace) {
                DecisionBody::default()
            } else {
                match serde_json::from_slice(&body) {
                    Ok(d) => d,
                    Err(e) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            format!("the body is JSON {{\"by\": ..., \"why\": ...}}: {e}"),
                        );
                    }
                }
            };
            let waiting = match crate::approval::waiting_in(&dir) {
                Ok(w) => w,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
            };
            let by = d.by.or_else(|| Some("the HMI".into()));
            match crate::approval::write_decision(&dir, &waiting, &tunnel, approve, by, d.why) {
                Ok(decision) => reply(
                    StatusCode::OK,
                    serde_json::json!({"tunnel": tunnel, "decision": decision}),
                ),
                Err(e) if waiting.iter().all(|w| w.tunnel != tunnel) => {
                    error(StatusCode::NOT_FOUND, "not_waiting", e)
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "GET /approvals, POST /approvals/{tunnel}/approve or /refuse",
        ),
    }
}
