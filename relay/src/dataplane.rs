//! The data plane: `GET /tunnel?local-proxy-mode=source|destination` upgraded to a WebSocket,
//! exactly as AWS IoT Secure Tunneling defines it, and the forwarding of tunnel frames between
//! the two peers of a tunnel.
//!
//! Frames are validated ([`TunnelRules`](culvert_protocol::rules::TunnelRules)) and forwarded
//! verbatim, never re-encoded; the relay does not translate between protocol versions. A peer
//! that breaks the rules is closed with a reason; the other side and other tunnels carry on.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;

use crate::metrics::{METRICS, label};
use culvert_protocol::flow::Hello;
use culvert_protocol::frame::{self, FrameError, FrameReader};
use culvert_protocol::message::{MAX_WS_MESSAGE, Message, MessageRef, MessageType};
use culvert_protocol::rules::Violation;
use culvert_protocol::{Format, Mode, SUBPROTOCOLS, valid_client_token};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api::error;
use crate::registry::{Admission, AdmitError, Chunk, Kick};
use crate::server::AppState;

/// Frames queued towards one peer.
const PEER_QUEUE: usize = 64;

/// Largest upgrade request (AWS: "must not exceed 4k bytes").
const MAX_UPGRADE_REQUEST: usize = 4096;

/// A peer that sends nothing at all for this long is dropped (the localproxy and culvert ping
/// every 20 s), so a half-open connection does not stay CONNECTED forever.
const PEER_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

#[derive(Deserialize)]
pub struct TunnelQuery {
    #[serde(rename = "local-proxy-mode")]
    mode: Option<String>,
}

/// One value of a header, refusing duplicates.
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    let mut vals = headers.get_all(name).iter();
    let first = vals.next();
    if vals.next().is_some() {
        return Err(format!("the {name} header was sent more than once"));
    }
    match first {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| format!("the {name} header is not valid text")),
    }
}

/// The access token from the `access-token` header or the `awsiot-tunnel-token` cookie;
/// exactly one must be present.
fn access_token(headers: &HeaderMap) -> Result<String, String> {
    let header = single_header(headers, "access-token")?;
    let mut cookies = headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("awsiot-tunnel-token="));
    let cookie = cookies.next();
    if cookies.next().is_some() {
        return Err("the awsiot-tunnel-token cookie was sent more than once".into());
    }
    match (header, cookie) {
        (Some(_), Some(_)) => Err(
            "send the access token once: either the access-token header or the awsiot-tunnel-token cookie"
                .into(),
        ),
        (Some(t), None) | (None, Some(t)) if !t.is_empty() && t.len() <= 4096 => Ok(t.to_owned()),
        (Some(_), None) | (None, Some(_)) => Err("the access token is empty or too long".into()),
        (None, None) => Err(
            "missing access token: send it in the access-token header (or the awsiot-tunnel-token cookie)"
                .into(),
        ),
    }
}

fn refuse(status: StatusCode, code: &str, msg: impl Into<String>, channel: &str) -> Response {
    METRICS
        .refused
        .get_or_create(&label("status", status.as_str()))
        .inc();
    let msg = msg.into();
    debug!(channel, status = status.as_u16(), code, %msg, "handshake refused");
    let mut r = error(status, code, msg);
    if let Ok(v) = channel.parse() {
        r.headers_mut().insert("channel-id", v);
    }
    r
}

/// `GET /tunnel`: authenticate, then upgrade.
pub async fn handshake(
    State(state): State<Arc<AppState>>,
    Query(q): Query<TunnelQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let channel = culvert_protocol::new_client_token();
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, "bad_request", m, &channel);
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_UPGRADE_REQUEST {
        return bad(format!(
            "upgrade request headers are {header_bytes} bytes; at most {MAX_UPGRADE_REQUEST} are accepted"
        ));
    }
    let mode: Mode = match q.mode.as_deref().map(str::parse) {
        Some(Ok(m)) => m,
        Some(Err(e)) => return bad(format!("local-proxy-mode: {e}")),
        None => return bad("missing query parameter local-proxy-mode=source|destination".into()),
    };
    let token = match access_token(&headers) {
        Ok(t) => t,
        Err(m) => {
            return refuse(StatusCode::UNAUTHORIZED, "missing_token", m, &channel);
        }
    };
    let client_token = match single_header(&headers, "client-token") {
        Err(m) => return bad(m),
        Ok(None) | Ok(Some("")) => None,
        Ok(Some(t)) if valid_client_token(t) => Some(t.to_owned()),
        Ok(Some(_)) => {
            return bad("client-token must be 32-128 characters of A-Z a-z 0-9 and -".into());
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return bad(format!("not a WebSocket upgrade: {}", e.body_text())),
    };
    let ws = ws
        .protocols(SUBPROTOCOLS)
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .read_buffer_size(culvert_protocol::client::WS_READ_CHUNK);
    let Some(format) = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .and_then(Format::from_subprotocol)
    else {
        return bad(format!(
            "Sec-WebSocket-Protocol must offer one of {}",
            SUBPROTOCOLS.join(", ")
        ));
    };
    let registry = state.registry.clone();
    let ct = client_token.clone();
    let admitted =
        tokio::task::spawn_blocking(move || registry.admit(&token, mode, ct.as_deref())).await;
    let adm = match admitted {
        Ok(Ok(a)) => a,
        Ok(Err(AdmitError::Refused(r))) => {
            let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN);
            return refuse(status, r.code(), r.to_string(), &channel);
        }
        Ok(Err(AdmitError::Store(e))) => {
            tracing::error!(error = %e, "tunnel store failed during handshake");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the relay could not record the connection; retry later",
                &channel,
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "handshake task failed");
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the relay's log",
                &channel,
            );
        }
    };
    let span = info_span!("peer", tunnel = %adm.live.id, mode = %mode, channel = %channel);
    let tracker = state.tasks.clone();
    let flow_control = state.flow_control;
    let release = adm
        .first_use
        .then(|| (state.registry.clone(), adm.live.id.clone(), adm.token));
    let mut resp = ws
        .on_failed_upgrade(move |e| {
            warn!(error = %e, "WebSocket upgrade failed");
            // The handshake did not complete: the token is not spent.
            if let Some((registry, tunnel, token)) = release {
                tokio::task::spawn_blocking(move || registry.release(&tunnel, mode, token));
            }
        })
        .on_upgrade(move |socket| {
            let fut = run_peer(socket, adm, format, flow_control).instrument(span);
            async move {
                tracker.spawn(fut);
            }
        })
        .into_response();
    if let Ok(v) = channel.parse() {
        resp.headers_mut().insert("channel-id", v);
    }
    resp
}

/// Why a peer's session ended (for the log and its close frame).
enum End {
    Closed,
    Kicked(String),
    Violation(String),
    /// A WebSocket message over the protocol's limit.
    TooBig(String),
    Transport(String),
}

async fn run_peer(socket: WebSocket, adm: Admission, format: Format, flow_control: bool) {
    METRICS
        .peer_connects
        .get_or_create(&label("mode", &adm.mode.to_string()))
        .inc();
    METRICS.peers.inc();
    struct Connected;
    impl Drop for Connected {
        fn drop(&mut self) {
            METRICS.peers.dec();
        }
    }
    let _connected = Connected;
    let Admission {
        live,
        mode,
        thing_name,
        generation,
        ..
    } = adm;
    let (tx, mut rx) = mpsc::channel::<Chunk>(PEER_QUEUE);
    if format != Format::V1 {
        // SERVICE_IDS goes first, before anything forwarded (the channel is empty now).
        if let Ok(f) = frame::encode_to_bytes(&Message::service_ids(&live.services)) {
            let _ = tx.try_send(Chunk::new(f));
        }
    }
    let kick = Kick::default();
    let Some(peer_id) = live.attach(mode, generation, tx.clone(), kick.clone()) else {
        info!("token revoked while connecting; closing");
        let (mut sink, _) = socket.split();
        let _ = sink
            .send(WsMessage::Close(Some(CloseFrame {
                code: 1000,
                reason: "access token revoked (rotated or tunnel closed) while connecting".into(),
            })))
            .await;
        return;
    };
    info!(thing = %thing_name, ?format, "peer connected");
    let (mut sink, mut stream) = socket.split();
    if flow_control && let Ok(f) = frame::encode_to_bytes(&Hello::relay().to_message()) {
        // Announce culvert's extensions (ignorable: AWS clients skip it), to this peer and,
        // since its peer changed, to the other side, before anything this peer sends is
        // forwarded there (see culvert_protocol::flow).
        let _ = tx.try_send(Chunk::new(f.clone()));
        let other = live.lock().target(mode.other());
        if let Some((to, to_kick)) = other {
            tokio::select! {
                biased;
                _ = kick.kicked() => {}
                _ = to_kick.kicked() => {}
                _ = to.send(Chunk::new(f)) => {}
            }
        }
    }

    // Writer: our queue → this peer, coalescing queued frames into one WebSocket message.
    let writer_kick = kick.clone();
    let writer = tokio::spawn(async move {
        let mut batch = BytesMut::new();
        loop {
            let first = tokio::select! {
                // A kick (with its close frame) wins over a queue that closed at the same time.
                biased;
                reason = writer_kick.kicked() => {
                    if !reason.is_empty() {
                        let _ = sink.send(WsMessage::Close(Some(CloseFrame {
                            code: close_code(&reason),
                            reason: truncate(&reason).into(),
                        }))).await;
                    }
                    break;
                }
                f = rx.recv() => match f { Some(f) => f, None => break },
            };
            // Coalesce queued chunks into one WebSocket message, ending it after a start frame.
            let msg = if first.ends_message {
                first.bytes
            } else {
                match rx.try_recv() {
                    Err(_) => first.bytes,
                    Ok(second) => {
                        batch.clear();
                        batch.extend_from_slice(&first.bytes);
                        let mut next = Some(second);
                        let mut failed = false;
                        while let Some(c) = next.take() {
                            if batch.len() + c.bytes.len() > MAX_WS_MESSAGE {
                                let out = batch.split().freeze();
                                if sink.feed(WsMessage::Binary(out)).await.is_err() {
                                    failed = true;
                                    break;
                                }
                            }
                            batch.extend_from_slice(&c.bytes);
                            if c.ends_message {
                                break;
                            }
                            next = rx.try_recv().ok();
                        }
                        if failed {
                            break;
                        }
                        batch.split().freeze()
                    }
                }
            };
            // A peer that stops reading must not keep this task (and its queue) alive after a kick.
            let sent = tokio::select! {
                biased;
                _ = writer_kick.kicked() => false,
                r = sink.send(WsMessage::Binary(msg)) => r.is_ok(),
            };
            if !sent {
                break;
            }
        }
    });

    let mut frames = FrameReader::new();
    let mut replies: Vec<Message> = Vec::new();
    // End offset of each forwarded frame, and whether it is a start frame.
    let mut ends: Vec<(usize, bool)> = Vec::new();
    let end = loop {
        let next = tokio::select! {
            biased;
            reason = kick.kicked() => break End::Kicked(reason),
            n = tokio::time::timeout(PEER_IDLE_TIMEOUT, stream.next()) => n,
        };
        let data = match next {
            Err(_) => break End::Transport(format!("nothing received for {PEER_IDLE_TIMEOUT:?}")),
            Ok(next) => next,
        };
        let data = match data {
            None => break End::Closed,
            Some(Err(e)) => {
                let e = e.to_string();
                if e.contains("Message too long") || e.contains("Space limit") {
                    break End::TooBig(e);
                }
                break End::Transport(e);
            }
            Some(Ok(WsMessage::Binary(b))) => b,
            Some(Ok(WsMessage::Text(_))) => {
                break End::Violation(
                    "text WebSocket frame (only binary frames are allowed)".into(),
                );
            }
            Some(Ok(WsMessage::Close(_))) => break End::Closed,
            Some(Ok(_)) => continue, // ping/pong: answered by the WebSocket layer
        };
        // Validate every complete frame under the tunnel lock; forward them verbatim after.
        replies.clear();
        ends.clear();
        let (fwd, to) = {
            let mut g = live.lock();
            if !g.is_current(mode, peer_id) {
                break End::Kicked("replaced by a new connection".into());
            }
            let peer_there = g.tx(mode.other()).is_some();
            let mut offset = 0;
            let checked = frames.feed::<FwdError>(data, |body| {
                offset += frame::LENGTH_PREFIX + body.len();
                // Checked without allocating; the rare message off that path (SERVICE_IDS,
                // unknown fields, malformed) is decoded in full, for the check or its error.
                let owned;
                let msg = match frame::decode_ref(&body)? {
                    Some(m) => m,
                    None => {
                        owned = frame::decode(body.clone())?;
                        MessageRef::from(&owned)
                    }
                };
                g.rules.check(mode, msg.clone())?;
                let start = matches!(
                    msg.kind(),
                    Some(MessageType::StreamStart | MessageType::ConnectionStart)
                );
                ends.push((offset, start));
                if !peer_there
                    && let Some(r) = reset_for_absent_peer(&msg)
                    && !replies.contains(&r)
                {
                    replies.push(r);
                }
                Ok(())
            });
            match checked {
                Ok(fwd) => (fwd, g.target(mode.other())),
                Err(e) => break End::Violation(e.to_string()),
            }
        };
        if !replies.is_empty() {
            debug!(count = replies.len(), "other side not connected: resetting");
            for r in replies.drain(..) {
                if let Ok(f) = frame::encode_to_bytes(&r)
                    && tx.send(Chunk::new(f)).await.is_err()
                {
                    break;
                }
            }
        }
        if let (Some((to, to_kick)), false) = (to, fwd.is_empty()) {
            METRICS.bytes_forwarded.inc_by(fwd.len() as u64);
            // Whole frames, at most one WebSocket message each, ending after start frames.
            // Waits while the other peer is slow (back-pressure, never an unbounded queue), but
            // not past a kick of either side.
            let mut start = 0;
            for (i, &(end, is_start)) in ends.iter().enumerate() {
                let last = i + 1 == ends.len();
                let next_too_big = ends
                    .get(i + 1)
                    .is_some_and(|&(next, _)| next - start > MAX_WS_MESSAGE);
                if !(is_start || last || next_too_big) {
                    continue;
                }
                let chunk = Chunk {
                    bytes: fwd.slice(start..end),
                    ends_message: is_start,
                };
                start = end;
                let sent = tokio::select! {
                    biased;
                    _ = kick.kicked() => false,
                    _ = to_kick.kicked() => false,
                    r = to.send(chunk) => r.is_ok(),
                };
                if !sent {
                    break;
                }
            }
        }
    };
    match &end {
        End::Closed => info!("peer disconnected"),
        End::Kicked(r) => info!(reason = %r, "peer disconnected by the relay"),
        End::Violation(v) => {
            warn!(violation = %v, "closing peer: protocol violation");
            kick.kick(&format!("protocol violation: {v}"));
        }
        End::TooBig(e) => {
            warn!(error = %e, "closing peer: WebSocket message too big");
            kick.kick(&format!(
                "message too big: WebSocket messages are limited to {MAX_WS_MESSAGE} bytes"
            ));
        }
        End::Transport(e) => info!(error = %e, "peer connection failed"),
    }
    live.detach(mode, peer_id);
    if !matches!(end, End::Violation(_) | End::TooBig(_) | End::Kicked(_)) {
        kick.kick("");
    }
    drop(tx);
    let _ = writer.await;
}

/// The reset that tells a sender its stream cannot be carried: with the other side absent every
/// stream is dead, so the whole stream is reset (a CONNECTION_RESET would leave a V3 source
/// sending CONNECTION_STARTs on a stream the other side never saw).
fn reset_for_absent_peer(msg: &MessageRef<'_>) -> Option<Message> {
    match msg.kind()? {
        MessageType::StreamStart | MessageType::ConnectionStart | MessageType::Data => {
            Some(Message::stream_reset(msg.stream_id, msg.service_id))
        }
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
enum FwdError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Rule(#[from] Violation),
}

/// 1008 (policy violation) for rule breaks, 1009 (too big) for oversized messages, 1000
/// (normal) for closes the relay decided.
fn close_code(reason: &str) -> u16 {
    if reason.starts_with("protocol violation") {
        1008
    } else if reason.starts_with("message too big") {
        1009
    } else {
        1000
    }
}

/// Close-frame reasons are limited to 123 bytes.
fn truncate(s: &str) -> String {
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
