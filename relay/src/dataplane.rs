//! The data plane: `GET /tunnel?local-proxy-mode=source|destination` upgraded to a WebSocket,
//! exactly as AWS IoT Secure Tunneling defines it, and the forwarding of tunnel frames between
//! the two peers of a tunnel.
//!
//! Frames are validated ([`FrameRules`](culvert_protocol::rules::FrameRules)) and forwarded
//! verbatim, re-encoded only where a V1 peer meets a V2/V3 peer and the formats differ
//! ([`crate::bridge`]). A peer that breaks the rules is closed with a reason; the other side
//! and other tunnels carry on.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::metrics::{METRICS, label};
use culvert_protocol::ext::{self, Extensions};
use culvert_protocol::flow::Hello;
use culvert_protocol::frame::{self, MessageBatch};
use culvert_protocol::message::{MAX_WS_MESSAGE, Message};
use culvert_protocol::{Format, Mode, SUBPROTOCOLS, valid_client_token};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cluster::{Cluster, LinkRequest};
use crate::registry::{Admission, AdmitError, Kick, KickReason, NewPeer};
use crate::reply::error;
use crate::state::{AppState, ConnectionSlots};
use crate::store::Placement;
use crate::tokens::TokenHash;
use culvert_protocol::forward::{Chunk, Inbound};

/// Frames queued towards one peer.
const PEER_QUEUE: usize = 64;

/// Largest upgrade request (AWS: "must not exceed 4k bytes").
const MAX_UPGRADE_REQUEST: usize = 4096;

/// Whether a WebSocket read failed because the peer's message (or frame) is over the limit.
pub(crate) fn is_too_big(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<Error>())
        .is_some_and(|t| matches!(t, Error::Capacity(_)))
}

/// Time allowed to deliver a close frame to a peer that is being disconnected.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    slots: Option<axum::Extension<ConnectionSlots>>,
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
    // culvert's extensions: only for a peer that offered them (never an AWS client).
    let offered: Vec<&str> = headers
        .get_all(ext::HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let extensions = Extensions::parse(&offered.join(",")).intersect(enabled(&state));
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return bad(format!("not a WebSocket upgrade: {}", e.body_text())),
    };
    let ws = ws
        .protocols(SUBPROTOCOLS)
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .read_buffer_size(culvert_protocol::client::WS_READ_CHUNK);
    let subprotocol = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Some(format) = Format::from_subprotocol(&subprotocol) else {
        return bad(format!(
            "Sec-WebSocket-Protocol must offer one of {}",
            SUBPROTOCOLS.join(", ")
        ));
    };
    let admitted = state
        .registry
        .admit(&token, mode, client_token.as_deref())
        .await;
    let adm = match admitted {
        Ok(a) => a,
        Err(AdmitError::Refused(r)) => {
            let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN);
            state.audit.refusal(
                "attach_refused",
                serde_json::json!({"mode": mode.to_string(), "channel": channel, "code": r.code(), "message": r.to_string()}),
            );
            return refuse(status, r.code(), r.to_string(), &channel);
        }
        Err(AdmitError::Store(e)) => {
            tracing::error!(error = %e, "tunnel store failed during handshake");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the relay could not record the connection; retry later",
                &channel,
            );
        }
    };
    audit_attach(
        &state,
        &adm,
        &channel,
        format,
        ("first_use", adm.first_use.into()),
    );
    let span = info_span!("peer", tunnel = %adm.live.id, mode = %mode, channel = %channel);
    let tracker = state.tasks.clone();
    let release = adm
        .first_use
        .then(|| (state.registry.clone(), adm.live.id.clone(), mode, adm.token));
    // In a cluster the peer attaches on the node that holds the tunnel: this one, or that
    // one through a node link.
    let mut link = None;
    if let Some(cluster) = &state.cluster {
        let unavailable = |m: String| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unavailable",
                m,
                &channel,
            )
        };
        match cluster.place(&adm.live.id, mode).await {
            Ok(Placement::Here) => {}
            Ok(Placement::At { node, addr }) => {
                let req = LinkRequest {
                    tunnel: adm.live.id.clone(),
                    mode: mode.as_str().to_owned(),
                    generation: adm.generation,
                    extensions: extensions.header_value().unwrap_or_default(),
                    subprotocol: subprotocol.clone(),
                    from: cluster.node.clone(),
                    channel: channel.clone(),
                };
                match cluster.dial(&node, &addr, &req).await {
                    Ok(l) => {
                        debug!(tunnel = %adm.live.id, %node, "forwarding the peer to the node that holds its tunnel");
                        link = Some(l);
                    }
                    Err(e) => {
                        warn!(tunnel = %adm.live.id, %node, %addr, error = %e, "cannot reach the node that holds this tunnel");
                        release_use(release).await;
                        return unavailable(format!(
                            "the relay node that holds this tunnel ({node}) cannot be reached; retry in a few seconds"
                        ));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "tunnel store failed while placing a peer");
                release_use(release).await;
                return unavailable(
                    "the relay could not record the connection; retry later".into(),
                );
            }
        }
    }
    // Placed here: the side's lease goes if the upgrade fails.
    let placed_here = state
        .cluster
        .clone()
        .filter(|_| link.is_none())
        .map(|c| (c, adm.live.id.clone()));
    let cluster = state.cluster.clone();
    let mut resp = ws
        .on_failed_upgrade(move |e| {
            warn!(error = %e, "WebSocket upgrade failed");
            // The handshake did not complete: the token is not spent.
            tokio::spawn(release_use(release));
            if let Some((c, tunnel)) = placed_here {
                c.unplace(&tunnel, mode);
            }
        })
        .on_upgrade(move |socket| {
            // A tunnel session now: the connection's HTTP write-stall limit no longer applies.
            if let Some(axum::Extension(s)) = slots {
                s.0.upgraded();
            }
            async move {
                match (link, cluster) {
                    (Some(link), Some(c)) => {
                        tracker.spawn(c.forward(socket, link, extensions).instrument(span));
                    }
                    (_, cluster) => {
                        tracker.spawn(
                            run_peer(socket, adm, format, extensions, cluster).instrument(span),
                        );
                    }
                }
            }
        })
        .into_response();
    if let Ok(v) = channel.parse() {
        resp.headers_mut().insert("channel-id", v);
    }
    if let Some(v) = extensions.header_value().and_then(|v| v.parse().ok()) {
        resp.headers_mut().insert(ext::HEADER, v);
    }
    resp
}

/// The culvert extensions this relay accepts. `restart/1` costs an AWS peer nothing (it never
/// offers it): always accepted. `resume/1` rides on flow control.
fn enabled(state: &AppState) -> Extensions {
    Extensions {
        flow_control: state.flow_control,
        restart: true,
        resume: state.flow_control,
    }
}

/// The audit record of an admitted peer, with one more field.
fn audit_attach(
    state: &AppState,
    adm: &Admission,
    channel: &str,
    format: Format,
    (key, value): (&str, serde_json::Value),
) {
    let mut rec = serde_json::json!({
        "tunnel": adm.live.id,
        "thing": adm.thing_name,
        "mode": adm.mode.to_string(),
        "channel": channel,
        "format": format!("{format:?}"),
    });
    rec[key] = value;
    state.audit.record("attach", rec);
}

/// Give back the first use of a token whose handshake did not complete.
async fn release_use(release: Option<(Arc<crate::registry::Registry>, String, Mode, TokenHash)>) {
    let Some((registry, tunnel, mode, token)) = release else {
        return;
    };
    if let Err(e) = registry.release(&tunnel, mode, token).await {
        warn!(error = %e, "could not release the token of a failed upgrade");
    }
}

/// `GET /node/v1/peer` on the node link listener: another node of the cluster admitted a
/// peer of a tunnel this node holds, and carries it here ([`crate::cluster`]). The caller is
/// a node (its certificate was checked against the cluster CA); the peer's token was checked
/// and spent there, so here only the side's generation is: a rotation or close since then
/// refuses it.
pub async fn link_handshake(
    State(state): State<Arc<AppState>>,
    Query(req): Query<LinkRequest>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let channel = req.channel.clone();
    let Some(cluster) = state.cluster.clone() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "not a cluster node",
            &channel,
        );
    };
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, "bad_request", m, &channel);
    let mode: Mode = match req.mode.parse() {
        Ok(m) => m,
        Err(e) => return bad(format!("mode: {e}")),
    };
    let Some(format) = crate::cluster::link_format(&req) else {
        return bad(format!("unknown subprotocol {:?}", req.subprotocol));
    };
    let extensions = Extensions::parse(&req.extensions).intersect(enabled(&state));
    let ws = match ws {
        Ok(ws) => ws
            .max_message_size(MAX_WS_MESSAGE)
            .max_frame_size(MAX_WS_MESSAGE)
            .read_buffer_size(culvert_protocol::client::WS_READ_CHUNK),
        Err(e) => return bad(format!("not a WebSocket upgrade: {}", e.body_text())),
    };
    match cluster.place(&req.tunnel, mode).await {
        Ok(Placement::Here) => {}
        Ok(Placement::At { node, .. }) => {
            return refuse(
                StatusCode::CONFLICT,
                "held_elsewhere",
                format!("node {node} holds this tunnel now"),
                &channel,
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "tunnel store failed while placing a forwarded peer");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the relay could not record the connection; retry later",
                &channel,
            );
        }
    }
    let adm = match state
        .registry
        .admit_forwarded(&req.tunnel, mode, req.generation)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            cluster.unplace(&req.tunnel, mode);
            return refuse(StatusCode::FORBIDDEN, "revoked", e.to_string(), &channel);
        }
    };
    audit_attach(
        &state,
        &adm,
        &channel,
        format,
        ("via_node", req.from.clone().into()),
    );
    let span = info_span!("peer", tunnel = %adm.live.id, mode = %mode, channel = %channel, via = %req.from);
    let tracker = state.tasks.clone();
    let tunnel = req.tunnel.clone();
    let c = cluster.clone();
    ws.on_failed_upgrade(move |e| {
        warn!(error = %e, "node link upgrade failed");
        c.unplace(&tunnel, mode);
    })
    .on_upgrade(move |socket| {
        let fut = run_peer(socket, adm, format, extensions, Some(cluster)).instrument(span);
        async move {
            tracker.spawn(fut);
        }
    })
    .into_response()
}

/// Why a peer's session ended (for the log and its close frame).
enum End {
    Closed,
    Kicked(KickReason),
    Violation(String),
    /// A WebSocket message over the protocol's limit.
    TooBig(String),
    Transport(String),
}

async fn run_peer(
    socket: WebSocket,
    adm: Admission,
    format: Format,
    extensions: Extensions,
    cluster: Option<Arc<Cluster>>,
) {
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
    let new = NewPeer {
        tx: tx.clone(),
        kick: kick.clone(),
        extensions,
        format,
    };
    let Some(peer_id) = live.attach(mode, generation, new) else {
        info!("token revoked while connecting; closing");
        if let Some(c) = &cluster {
            c.unplace(&live.id, mode);
        }
        let (mut sink, _) = socket.split();
        let _ = sink
            .send(WsMessage::Close(Some(CloseFrame {
                code: culvert_protocol::close::NORMAL,
                reason: "access token revoked (rotated or tunnel closed) while connecting".into(),
            })))
            .await;
        return;
    };
    info!(thing = %thing_name, ?format, ?extensions, "peer connected");
    let (mut sink, mut stream) = socket.split();
    // Announce the flow-control extension (see culvert_protocol::flow) to this peer, and,
    // since its peer changed, to the other side, before anything this peer sends is forwarded
    // there; each only if it negotiated the extension in its handshake. The other side's peer
    // may have started connections on the old peer's terms: until it answers this HELLO, its
    // starts are reset (culvert_protocol::forward).
    if extensions.flow_control {
        let epoch = live.lock().next_hello();
        if let Ok(f) = frame::encode_to_bytes(&Hello::relay_epoch(epoch).to_message()) {
            let _ = tx.try_send(Chunk::new(f));
        }
    }
    let other = {
        let mut g = live.lock();
        g.target(mode.other())
            .filter(|to| to.extensions.flow_control)
            .map(|to| (to, g.announce_peer_change(mode.other())))
    };
    if let Some((to, epoch)) = other
        && let Ok(f) = frame::encode_to_bytes(&Hello::relay_epoch(epoch).to_message())
    {
        tokio::select! {
            biased;
            _ = kick.kicked() => {}
            _ = to.kick.kicked() => {}
            _ = to.tx.send(Chunk::new(f)) => {}
        }
    }

    // Writer: our queue → this peer, coalescing queued frames into one WebSocket message.
    let writer_kick = kick.clone();
    let writer = tokio::spawn(async move {
        let mut batch = MessageBatch::default();
        // A kick ends the loop with its reason, whether it came while the writer waited for
        // the queue or while it was sending: the close frame goes out in both cases.
        let kicked = loop {
            let first = tokio::select! {
                // A kick (with its close frame) wins over a queue that closed at the same time.
                biased;
                reason = writer_kick.kicked() => break Some(reason),
                f = rx.recv() => match f { Some(f) => f, None => break None },
            };
            // Coalesce queued chunks into WebSocket messages (frame::MessageBatch's rules); a lone
            // chunk goes out as it is, without a copy.
            let msg = if first.ends_message {
                first.bytes
            } else {
                match rx.try_recv() {
                    Err(_) => first.bytes,
                    Ok(second) => {
                        batch.begin();
                        batch.push(&first.bytes, false);
                        let mut next = Some(second);
                        let mut failed = false;
                        while let Some(c) = next.take() {
                            if !batch.fits(c.bytes.len())
                                && sink.feed(WsMessage::Binary(batch.take())).await.is_err()
                            {
                                failed = true;
                                break;
                            }
                            batch.push(&c.bytes, c.ends_message);
                            if batch.is_ended() {
                                break;
                            }
                            next = rx.try_recv().ok();
                        }
                        if failed {
                            break None;
                        }
                        batch.take()
                    }
                }
            };
            // A peer that stops reading must not keep this task (and its queue) alive after a kick.
            // A send interrupted after the WebSocket layer took its message leaves it in that
            // layer's buffer, which the close frame's send flushes first; one interrupted
            // before is dropped (the peer is being closed anyway).
            tokio::select! {
                biased;
                reason = writer_kick.kicked() => break Some(reason),
                r = sink.send(WsMessage::Binary(msg)) => if r.is_err() { break None },
            };
        };
        if let Some((code, reason)) = kicked.and_then(|r| r.close_frame(extensions)) {
            let close = WsMessage::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            // A peer that reads nothing does not keep this task.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(close)).await;
        }
    });

    let mut inbound = Inbound::new(mode, extensions);
    // This peer speaks V1: from its subprotocol, or from a first STREAM_START without a
    // service id (crate::bridge).
    let mut speaks_v1 = format == Format::V1;
    // Reused for every message: forwarding allocates nothing per frame.
    let (mut chunks, mut replies): (Vec<Chunk>, Vec<Message>) = (Vec::new(), Vec::new());
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
            Some(Err(e)) if is_too_big(&e) => break End::TooBig(e.to_string()),
            Some(Err(e)) => break End::Transport(e.to_string()),
            Some(Ok(WsMessage::Binary(b))) => b,
            Some(Ok(WsMessage::Text(_))) => {
                break End::Violation(
                    "text WebSocket frame (only binary frames are allowed)".into(),
                );
            }
            Some(Ok(WsMessage::Close(_))) => break End::Closed,
            Some(Ok(_)) => continue, // ping/pong: answered by the WebSocket layer
        };
        // Check every complete frame under the tunnel lock; forward them after, verbatim.
        let (to, forwarded) = {
            let mut g = live.lock();
            if !g.is_current(mode, peer_id) {
                break End::Kicked(KickReason::Replaced);
            }
            let to = g.target(mode.other());
            let other = to.as_ref().map(|t| t.extensions);
            let (rules, awaiting, held) = g.check_context(mode);
            match inbound.feed_held(data, rules, other, awaiting, held) {
                Ok(f) => {
                    chunks.extend(f.chunks());
                    replies.extend_from_slice(f.replies);
                    (to, f.forwarded())
                }
                Err(e) => break End::Violation(e.to_string()),
            }
        };
        if let Some(to) = to {
            if !speaks_v1 && chunks.iter().any(crate::bridge::starts_v1_stream) {
                info!("peer speaks V1 (a stream started without a service id): bridging");
                speaks_v1 = true;
            }
            let bridge = crate::bridge::Bridge::between(speaks_v1, to.format, &live.services);
            // Waits while the other peer is slow (back-pressure, never an unbounded queue), but
            // not past a kick of either side.
            METRICS.bytes_forwarded.inc_by(forwarded as u64);
            for chunk in chunks.drain(..) {
                let Some(chunk) = crate::bridge::translate(
                    &bridge,
                    chunk,
                    &live.bridged_connection,
                    &mut replies,
                ) else {
                    continue;
                };
                let sent = tokio::select! {
                    biased;
                    _ = kick.kicked() => false,
                    _ = to.kick.kicked() => false,
                    r = to.tx.send(chunk) => r.is_ok(),
                };
                if !sent {
                    break;
                }
            }
        }
        chunks.clear();
        if !replies.is_empty() {
            debug!(
                count = replies.len(),
                "answering for the other side (absent, or unable to carry it)"
            );
            for r in replies.drain(..) {
                let Ok(f) = frame::encode_to_bytes(&r) else {
                    continue;
                };
                // Our own queue: it drains unless this peer stops reading, and then a kick
                // (or the writer's end) must still end this loop.
                let sent = tokio::select! {
                    biased;
                    _ = kick.kicked() => false,
                    r = tx.send(Chunk::new(f)) => r.is_ok(),
                };
                if !sent {
                    break;
                }
            }
        }
        replies.clear();
    };
    match &end {
        End::Closed => info!("peer disconnected"),
        End::Kicked(r) => info!(reason = %r, "peer disconnected by the relay"),
        End::Violation(v) => {
            warn!(violation = %v, "closing peer: protocol violation");
            kick.kick(KickReason::Violation(v.clone()));
        }
        End::TooBig(e) => {
            warn!(error = %e, "closing peer: WebSocket message too big");
            kick.kick(KickReason::TooBig);
        }
        End::Transport(e) => info!(error = %e, "peer connection failed"),
    }
    if live.detach(mode, peer_id)
        && let Some(c) = &cluster
    {
        c.unplace(&live.id, mode);
    }
    // The writer ends with the first reason given: a kick's, else no close frame.
    kick.kick(KickReason::Gone);
    drop(tx);
    let _ = writer.await;
}
