//! Terminals in the browser: `GET /terminal?tunnel=ID&service=NAME&kind=telnet|raw`, a
//! WebSocket from the console's page to the relay, which attaches to the tunnel as its source
//! and opens one tunnel connection to the service.
//!
//! The page opens the tunnel first (the API's `POST /api/v1/tunnels`: grants, reason, audit
//! as ever), then this WebSocket, and sends the tunnel's source token and the session's CSRF
//! token as its first message: `{"token": "…", "csrf": "…"}` (the token never goes in a URL).
//! Then binary messages carry the operator's keystrokes one way and the device's output the
//! other; text messages from the relay are status, as JSON: `{"status": "waiting"|"connected"}`,
//! `{"error": "…"}`, `{"closed": "…"}`.
//!
//! The relay attaches to its own data plane in-process (an HTTP connection over an in-memory
//! pipe into the same router a network peer reaches, so the handshake, token checks, limits
//! and audit are the ones every peer gets), as a source that offers flow control. The device
//! sees an ordinary source.
//!
//! `telnet`: the relay is the telnet client: it agrees to the server's echo and
//! suppress-go-ahead (character at a time, the server echoing, as consoles expect), refuses
//! every other option, takes negotiation and subnegotiation out of what the browser gets, and
//! sends Enter as CR LF and a 0xFF byte as IAC IAC. `raw`: bytes unchanged both ways (a
//! controller's text console on a TCP port). `ssh`: the relay is the SSH client
//! ([`super::ssh`]); the first message also carries `user` and `password` or `key`
//! (`passphrase`), and `cols`/`rows`; text messages `{"resize": [cols, rows]}` follow the
//! page's size. Serial consoles are not served yet.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use culvert_protocol::client::{error_message, negotiated, upgrade_request, ws_config};
use culvert_protocol::ext::Extensions;
use culvert_protocol::mux::Mux;
use culvert_protocol::session::{self, SessionConfig, SessionHandle};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Console, same_origin};
use crate::reply::error;
use crate::state::AppState;

/// Terminals open at once on this relay.
pub const MAX_TERMINALS: usize = 64;
/// The largest message the page may send (a paste).
const MAX_MESSAGE: usize = 64 * 1024;
/// The page's first message must come this soon.
const FIRST_MESSAGE: Duration = Duration::from_secs(10);
/// How long the terminal waits for the device's gateway to attach to the tunnel.
const GATEWAY_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Telnet,
    Raw,
    Ssh,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalQuery {
    tunnel: String,
    service: String,
    kind: Kind,
}

#[derive(Deserialize)]
struct First {
    token: String,
    csrf: String,
    /// For an SSH console: how to log in.
    #[serde(flatten)]
    login: super::ssh::Login,
}

/// `GET /terminal`: the session, the origin and the tunnel are checked before the upgrade.
pub async fn terminal(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    q: Result<Query<TerminalQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let state = console.relay.clone();
    let principal = match super::authenticate(&console, &headers).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Err(m) = same_origin(&headers) {
        state.audit.refusal(
            "console_refused",
            json!({"method": "GET", "path": "/terminal", "status": 403, "message": m}),
        );
        return error(StatusCode::FORBIDDEN, "forbidden", m);
    }
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "query: expected tunnel, service and kind (ssh, telnet or raw)",
        );
    };
    let Ok(ws) = ws else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a terminal is a WebSocket: open it from the console's page",
        );
    };
    let view = match state.registry.describe(&q.tunnel).await {
        Ok(v) if state.access.may_see(&principal, &v.rec.thing_name) => v,
        Ok(_) => {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("you may not reach tunnel {}", q.tunnel),
            );
        }
        Err(e) => return e.into_response(),
    };
    if !view.rec.services.contains(&q.service) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "tunnel {} has no service {:?} (it has {})",
                q.tunnel,
                q.service,
                view.rec.services.join(", ")
            ),
        );
    }
    let Ok(permit) = console.terminals.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "{MAX_TERMINALS} terminals are open on this relay: close one, or try again later"
            ),
        );
    };
    let operator = principal.label().to_owned();
    let key = principal.key_id().unwrap_or_default().to_owned();
    let thing = view.rec.thing_name.clone();
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            state.audit.record(
                "console_terminal",
                json!({"operator": operator, "tunnel": q.tunnel, "thing": thing, "service": q.service, "kind": q.kind_str()}),
            );
            // An open terminal is a session in use: it does not end by the idle timeout
            // (whose revocation would close the terminal's tunnel) while the operator types.
            let why = {
                let terminal = run(&console, socket, &q, &key, &thing);
                tokio::pin!(terminal);
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tokio::select! {
                        why = &mut terminal => break why,
                        _ = tick.tick() => {
                            console.touch(&key, state.access.now());
                        }
                    }
                }
            };
            state.audit.record(
                "console_terminal_end",
                json!({"operator": operator, "tunnel": q.tunnel, "thing": thing, "service": q.service, "why": why}),
            );
        })
}

impl TerminalQuery {
    fn kind_str(&self) -> &'static str {
        match self.kind {
            Kind::Telnet => "telnet",
            Kind::Raw => "raw",
            Kind::Ssh => "ssh",
        }
    }
}

async fn status(socket: &mut WebSocket, v: serde_json::Value) -> bool {
    socket
        .send(Message::Text(v.to_string().into()))
        .await
        .is_ok()
}

/// The terminal's life: the first message, the attach, the connection, then bytes both ways
/// until either end closes. Returns why it ended (for the audit trail).
async fn run(
    console: &Console,
    mut socket: WebSocket,
    q: &TerminalQuery,
    key: &str,
    thing: &str,
) -> String {
    let first = match tokio::time::timeout(FIRST_MESSAGE, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<First>(&t).ok(),
        _ => None,
    };
    let Some(first) = first else {
        let m = "the page sent no token: reload it";
        status(&mut socket, json!({"error": m})).await;
        return m.into();
    };
    if !console.csrf_matches(&first.csrf, key) {
        let m = "missing or wrong CSRF token: reload the console's page";
        status(&mut socket, json!({"error": m})).await;
        return m.into();
    }
    let state = console.relay.clone();
    // The gateway attaches once the relay's notification reaches it.
    status(&mut socket, json!({"status": "waiting"})).await;
    let deadline = tokio::time::Instant::now() + GATEWAY_WAIT;
    loop {
        match state.registry.describe(&q.tunnel).await {
            Ok(v) if v.destination_connected => break,
            Ok(v) if v.rec.closed_ms.is_some() => {
                let m = "the tunnel was closed";
                status(&mut socket, json!({"error": m})).await;
                return m.into();
            }
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(_) => {
                let m = format!(
                    "the device's gateway did not connect to the tunnel within {GATEWAY_WAIT:?}: is it online (Devices)?"
                );
                status(&mut socket, json!({"error": m})).await;
                return m;
            }
            Err(e) => {
                let m = e.to_string();
                status(&mut socket, json!({"error": m})).await;
                return m;
            }
        }
    }
    let handle = match attach_source(state, &first.token).await {
        Ok(h) => h,
        Err(m) => {
            status(&mut socket, json!({"error": m})).await;
            return m;
        }
    };
    // The relay names the tunnel's services first (SERVICE_IDS).
    match tokio::time::timeout(Duration::from_secs(10), handle.wait_service_ids()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            handle.close();
            let m = format!("the tunnel session ended at once: {e}");
            status(&mut socket, json!({"error": m})).await;
            return m;
        }
        Err(_) => {
            handle.close();
            let m = "the relay did not name the tunnel's services".to_owned();
            status(&mut socket, json!({"error": m})).await;
            return m;
        }
    }
    let conn = match handle.open(&q.service).await {
        Ok(c) => c,
        Err(e) => {
            handle.close();
            let m = format!("cannot open a connection to {}: {e}", q.service);
            status(&mut socket, json!({"error": m})).await;
            return m;
        }
    };
    let why = if q.kind == Kind::Ssh {
        let (local, remote) = tokio::io::duplex(64 * 1024);
        let splice = tokio::spawn(session::splice(remote, conn));
        let why =
            super::ssh::run(socket, local, first.login, &console.pins, thing, &q.service).await;
        splice.abort();
        why
    } else {
        status(&mut socket, json!({"status": "connected"})).await;
        carry(socket, conn, q.kind).await
    };
    handle.close();
    why
}

/// Attach to the relay's own data plane as the tunnel's source, in-process.
async fn attach_source(state: Arc<AppState>, token: &str) -> Result<SessionHandle, String> {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let app = crate::server::router(state);
    let loopback = crate::state::Peer((std::net::Ipv4Addr::LOCALHOST, 0).into());
    let app = tower::ServiceExt::map_request(
        app,
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(loopback);
            req
        },
    );
    tokio::spawn(async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), TowerToHyperService::new(app))
            .with_upgrades()
            .await;
    });
    let bad = |what: &str| format!("cannot attach the terminal to the tunnel: {what}");
    let offer = Extensions {
        // The connection lives in this process: nothing to resume it on.
        resume: false,
        restart: false,
        ..Extensions::ALL
    };
    let client_token = culvert_protocol::new_client_token();
    let req = upgrade_request(
        "ws://console.relay/tunnel?local-proxy-mode=source",
        token,
        Some(&client_token),
        offer,
    )
    .map_err(|e| bad(&e))?;
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, client, Some(ws_config()))
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => {
                bad(&error_message(r.body().as_deref().unwrap_or_default())
                    .unwrap_or_else(|| r.status().to_string()))
            }
            e => bad(&e.to_string()),
        })?;
    let (format, accepted) = negotiated(&resp, offer).map_err(|e| bad(&e))?;
    let cfg = SessionConfig {
        resume_hold: None,
        ..SessionConfig::default()
    }
    .for_relay(accepted);
    let (handle, _incoming) = session::spawn(ws, Mux::source(format), cfg);
    Ok(handle)
}

/// Bytes between the page and the tunnel connection until one of them ends.
async fn carry(socket: WebSocket, conn: session::Connection, kind: Kind) -> String {
    let (local, remote) = tokio::io::duplex(64 * 1024);
    let splice = tokio::spawn(session::splice(remote, conn));
    let (mut from_device, mut to_device) = tokio::io::split(local);
    let (mut page_tx, mut page_rx) = socket.split();
    // What goes to the device: keystrokes, and the telnet client's answers.
    let (dev_tx, mut dev_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let writer = async move {
        while let Some(b) = dev_rx.recv().await {
            if to_device.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = to_device.shutdown().await;
    };
    let keys_tx = dev_tx.clone();
    let from_page = async move {
        while let Some(m) = page_rx.next().await {
            let bytes = match m {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Text(_)) => continue,
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let bytes = match kind {
                Kind::Telnet => telnet::encode_input(&bytes),
                Kind::Raw | Kind::Ssh => bytes,
            };
            if keys_tx.send(bytes).await.is_err() {
                break;
            }
        }
        "the operator closed the terminal".to_owned()
    };
    let to_page = async move {
        let mut decoder = telnet::Decoder::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_device.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let out = match kind {
                Kind::Telnet => {
                    let (out, replies) = decoder.feed(&buf[..n]);
                    if !replies.is_empty() && dev_tx.send(replies).await.is_err() {
                        break;
                    }
                    out
                }
                Kind::Raw | Kind::Ssh => buf[..n].to_vec(),
            };
            if !out.is_empty() && page_tx.send(Message::Binary(out.into())).await.is_err() {
                return "the page went away".to_owned();
            }
        }
        let m = "the device closed the connection";
        let _ = page_tx
            .send(Message::Text(json!({"closed": m}).to_string().into()))
            .await;
        let _ = page_tx.close().await;
        m.to_owned()
    };
    let why = tokio::select! {
        w = from_page => w,
        w = to_page => w,
        _ = writer => "the tunnel connection ended".to_owned(),
    };
    splice.abort();
    why
}

/// The telnet client's side of RFC 854/855, as little as a console needs.
pub mod telnet {
    const IAC: u8 = 255;
    const DONT: u8 = 254;
    const DO: u8 = 253;
    const WONT: u8 = 252;
    const WILL: u8 = 251;
    const SB: u8 = 250;
    const SE: u8 = 240;
    const ECHO: u8 = 1;
    const SGA: u8 = 3;
    /// Subnegotiation bytes kept at most (they are thrown away; this bounds a hostile server).
    const MAX_SB: usize = 4096;

    /// What the operator typed, as telnet sends it: Enter (CR) as CR LF, 0xFF doubled.
    pub fn encode_input(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(b.len() + 2);
        for &c in b {
            match c {
                b'\r' => out.extend_from_slice(b"\r\n"),
                IAC => out.extend_from_slice(&[IAC, IAC]),
                c => out.push(c),
            }
        }
        out
    }

    #[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
    enum St {
        #[default]
        Data,
        Iac,
        /// After WILL/WONT/DO/DONT: the option byte is next.
        Opt(u8),
        Sb,
        SbIac,
    }

    /// Takes the server's output apart: data for the terminal, and the answers to send back.
    #[derive(Default, Debug)]
    pub struct Decoder {
        st: St,
        sb_len: usize,
        /// Options already answered, so a server repeating itself gets no answer loop.
        /// Server options agreed to (WILL answered DO), refused (WILL answered DONT), and
        /// options of ours the server asked for and was told WONT.
        agreed: Options,
        refused: Options,
        declined: Options,
    }

    /// A set of telnet options.
    #[derive(Default, Debug)]
    struct Options([u64; 4]);

    impl Options {
        /// Add `opt`; false when it was there already.
        fn insert(&mut self, opt: u8) -> bool {
            let (w, b) = (usize::from(opt / 64), 1u64 << (opt % 64));
            let new = self.0[w] & b == 0;
            self.0[w] |= b;
            new
        }

        fn remove(&mut self, opt: u8) {
            self.0[usize::from(opt / 64)] &= !(1u64 << (opt % 64));
        }
    }

    impl Decoder {
        /// Feed bytes from the server: (data for the terminal, bytes to send to the server).
        pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, Vec<u8>) {
            let (mut out, mut reply) = (Vec::with_capacity(input.len()), Vec::new());
            for &c in input {
                self.st = match (self.st, c) {
                    (St::Data, IAC) => St::Iac,
                    (St::Data, c) => {
                        out.push(c);
                        St::Data
                    }
                    (St::Iac, IAC) => {
                        out.push(IAC);
                        St::Data
                    }
                    (St::Iac, WILL | WONT | DO | DONT) => St::Opt(c),
                    (St::Iac, SB) => {
                        self.sb_len = 0;
                        St::Sb
                    }
                    // NOP, GA, AYT, … : nothing for the terminal.
                    (St::Iac, _) => St::Data,
                    (St::Opt(verb), opt) => {
                        self.answer(verb, opt, &mut reply);
                        St::Data
                    }
                    (St::Sb, IAC) => St::SbIac,
                    (St::Sb, _) => {
                        self.sb_len += 1;
                        if self.sb_len > MAX_SB {
                            St::Data
                        } else {
                            St::Sb
                        }
                    }
                    (St::SbIac, SE) => St::Data,
                    (St::SbIac, _) => St::Sb,
                };
            }
            (out, reply)
        }

        fn answer(&mut self, verb: u8, opt: u8, reply: &mut Vec<u8>) {
            match verb {
                // The server echoing and no go-ahead: a console's character-at-a-time mode.
                WILL if opt == ECHO || opt == SGA => {
                    if self.agreed.insert(opt) {
                        reply.extend_from_slice(&[IAC, DO, opt]);
                    }
                }
                WILL => {
                    if self.refused.insert(opt) {
                        reply.extend_from_slice(&[IAC, DONT, opt]);
                    }
                }
                // This client offers no option of its own (terminal type, window size: not yet).
                DO => {
                    if self.declined.insert(opt) {
                        reply.extend_from_slice(&[IAC, WONT, opt]);
                    }
                }
                // WONT / DONT: nothing of ours was on, nothing to answer.
                _ => self.agreed.remove(opt),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn negotiation_is_answered_once_and_taken_out_of_the_data() {
            let mut d = Decoder::default();
            let (out, reply) = d.feed(&[
                IAC, WILL, ECHO, IAC, WILL, SGA, IAC, DO, 24, b'o', b'k', IAC, IAC,
            ]);
            assert_eq!(out, b"ok\xff");
            assert_eq!(reply, [IAC, DO, ECHO, IAC, DO, SGA, IAC, WONT, 24]);
            // Repeated offers get no second answer.
            let (_, reply) = d.feed(&[IAC, WILL, ECHO, IAC, DO, 24]);
            assert!(reply.is_empty(), "{reply:?}");
            // Other options the server offers are refused.
            let (_, reply) = d.feed(&[IAC, WILL, 31]);
            assert_eq!(reply, [IAC, DONT, 31]);
        }

        #[test]
        fn sequences_split_across_reads_and_subnegotiation_are_handled() {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            let mut reply = Vec::new();
            for b in [IAC, WILL, ECHO, b'a', IAC, SB, 24, 1, IAC, SE, b'b'] {
                let (o, r) = d.feed(&[b]);
                out.extend(o);
                reply.extend(r);
            }
            assert_eq!(out, b"ab");
            assert_eq!(reply, [IAC, DO, ECHO]);
            // A subnegotiation that never ends is bounded: data flows again after MAX_SB.
            let mut long = vec![IAC, SB, 24];
            long.extend(std::iter::repeat_n(b'x', MAX_SB));
            long.extend_from_slice(b"yz");
            let (o, _) = d.feed(&long);
            assert_eq!(o, b"yz");
        }

        #[test]
        fn enter_is_cr_lf_and_0xff_is_doubled() {
            assert_eq!(encode_input(b"ls\r"), b"ls\r\n");
            assert_eq!(encode_input(&[1, IAC, 2]), [1, IAC, IAC, 2]);
        }
    }
}
