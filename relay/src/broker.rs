//! The embedded MQTT broker for single-machine deployments: rumqttd (MQTT 3.1.1) in-process on
//! an internal loopback port, never exposed directly. Gateways reach it only through the TLS
//! listener here, which culvert terminates with rustls and which enforces what rumqttd cannot:
//!
//! - a device authenticates with its thing name as username and client id, and the password
//!   issued by `POST /api/v1/devices` (stored as a hash);
//! - a device may subscribe only to its own notify topic; any other filter is refused with a
//!   SUBACK failure (0x80) and logged;
//! - devices may not publish (notifications come from the relay), nor leave a last will (which
//!   rumqttd would publish on their behalf);
//! - removing a device, or issuing it a new password, cuts its current connection.
//!
//! rumqttd checks credentials again itself (the relay's own, or a registered device's), so the
//! internal port, which listens on loopback only, admits nobody else.
//!
//! Packets from the device are parsed (rumqttc's MQTT 3.1.1 codec) and forwarded when allowed;
//! packets from the broker are forwarded whole, so a refusal can be injected between them.
//!
//! rumqttd refuses topics starting with `$` (reserved for brokers), but AWS's notify topic is
//! `$aws/things/<thing>/tunnels/notify`. Inside rumqttd such topics are therefore stored as
//! `culvert-dollar/…` ([`internal_topic`]); the guard rewrites SUBSCRIBE / UNSUBSCRIBE filters
//! on the way in and PUBLISH topics on the way out, so devices only ever see the AWS names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, SubAck, SubscribeReasonCode};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::devices::Devices;
use crate::notify::topic_for;

/// Inside rumqttd, `$…` topics carry this prefix instead of the `$`.
const DOLLAR: &str = "culvert-dollar/";

/// The name rumqttd stores a topic under.
pub fn internal_topic(t: &str) -> String {
    match t.strip_prefix('$') {
        Some(rest) => format!("{DOLLAR}{rest}"),
        None => t.to_owned(),
    }
}

/// The name a device sees for a topic rumqttd stores.
fn external_topic(t: &str) -> String {
    match t.strip_prefix(DOLLAR) {
        Some(rest) => format!("${rest}"),
        None => t.to_owned(),
    }
}

/// Largest MQTT packet accepted from a device or the broker.
const MAX_PACKET: usize = 256 * 1024;
/// Time allowed for TLS and the CONNECT packet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most simultaneous device connections.
const MAX_DEVICE_CONNECTIONS: usize = 10_000;
/// Read timeout for a device that asked for no keep-alive.
const MAX_SILENCE: Duration = Duration::from_secs(900);

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// Where gateways connect (TLS).
    pub listen: SocketAddr,
    /// rumqttd's internal plain port on loopback (for the relay's own client).
    pub internal: SocketAddr,
    /// The relay's own credentials on the internal port (the username is not a valid thing
    /// name, so no device can take over the relay's session).
    pub relay_username: String,
    pub relay_password: String,
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Start rumqttd and the TLS front listener.
/// Start rumqttd and the TLS front listener. `subscribed` receives the thing name of every
/// device whose subscription to its notify topic the broker has confirmed.
pub async fn start(
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    devices: Arc<Devices>,
    topic_template: String,
    subscribed: tokio::sync::mpsc::UnboundedSender<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<EmbeddedBroker> {
    let internal = free_loopback_port()?;
    // Not a valid thing name, so no device can be registered under it.
    let relay_username = "culvert.relay".to_owned();
    let relay_password = crate::tokens::new_secret();

    let router = rumqttd::Router::new(
        0,
        rumqttd::RouterConfig {
            max_connections: 100_010,
            max_outgoing_packet_count: 200,
            // Notifications are small and short-lived: keep little of them per topic.
            max_segment_size: 1024 * 1024,
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
    );
    let router_tx = router.spawn();
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PACKET,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    // Defence in depth: even on loopback, only the relay and registered devices get in.
    let (ru, rp, devs) = (
        relay_username.clone(),
        relay_password.clone(),
        devices.clone(),
    );
    connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let ok = (user == ru && bool::from(pass.as_bytes().ct_eq(rp.as_bytes())))
            || (client_id == user && devs.verify(&user, &pass));
        async move { ok }
    });
    let settings = rumqttd::ServerSettings {
        name: "culvert-embedded".into(),
        listen: internal,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let mut server = rumqttd::Server::new(settings, router_tx, rumqttd::protocol::v4::V4);
    tokio::spawn(async move {
        if let Err(e) = server.start(rumqttd::LinkType::Remote).await {
            tracing::error!(error = %e, "embedded MQTT broker stopped");
        }
    });

    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for MQTT on {listen}: {e}"))?;
    let listen = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls);
    info!(%listen, "embedded MQTT broker listening (TLS)");
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_DEVICE_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                warn!(%peer, max = MAX_DEVICE_CONNECTIONS, "too many MQTT connections; refusing");
                continue;
            };
            let acceptor = acceptor.clone();
            let ctx = GuardContext {
                devices: devices.clone(),
                template: topic_template.clone(),
                internal,
                subscribed: subscribed.clone(),
            };
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    _ => {
                        debug!(%peer, "MQTT TLS handshake failed");
                        return;
                    }
                };
                if let Err(why) = guard(tls, ctx).await {
                    info!(%peer, reason = %why, "MQTT client disconnected");
                }
                drop(permit);
            });
        }
    });
    Ok(EmbeddedBroker {
        listen,
        internal,
        relay_username,
        relay_password,
    })
}

/// Read one whole MQTT packet (raw bytes) from `r`, buffering in `buf`.
async fn next_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Bytes>, String> {
    loop {
        match rumqttc::mqttbytes::check(buf.iter(), MAX_PACKET) {
            Ok(h) => return Ok(Some(buf.split_to(h.frame_length()).freeze())),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed MQTT packet: {e:?}")),
        }
        if r.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Ok(None);
        }
    }
}

type SharedWriter<W> = Arc<tokio::sync::Mutex<W>>;

/// What a guard needs besides its connection.
struct GuardContext {
    devices: Arc<Devices>,
    template: String,
    /// rumqttd's internal port.
    internal: SocketAddr,
    subscribed: tokio::sync::mpsc::UnboundedSender<String>,
}

/// Carry one device connection, enforcing authentication and topic rules.
async fn guard<S>(client: S, ctx: GuardContext) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut cr, cw) = tokio::io::split(client);
    let cw: SharedWriter<_> = Arc::new(tokio::sync::Mutex::new(cw));
    let mut buf = BytesMut::with_capacity(4096);

    // The first packet must be a CONNECT from a registered device.
    let first = tokio::time::timeout(CONNECT_TIMEOUT, next_packet(&mut cr, &mut buf))
        .await
        .map_err(|_| "no CONNECT within 10 s".to_owned())??
        .ok_or("closed before CONNECT")?;
    let Ok(Packet::Connect(connect)) = Packet::read(&mut BytesMut::from(&first[..]), MAX_PACKET)
    else {
        return Err("first packet is not CONNECT".into());
    };
    let Some(login) = connect.login else {
        refuse_connect(&cw, ConnectReturnCode::NotAuthorized).await;
        return Err("CONNECT without username/password".into());
    };
    if connect.client_id != login.username {
        refuse_connect(&cw, ConnectReturnCode::BadClientId).await;
        return Err(format!(
            "client id {:?} differs from username {:?} (a device connects as its thing name)",
            connect.client_id, login.username
        ));
    }
    if !ctx.devices.verify(&login.username, &login.password) {
        refuse_connect(&cw, ConnectReturnCode::BadUserNamePassword).await;
        return Err(format!("bad credentials for device {:?}", login.username));
    }
    if connect.last_will.is_some() {
        refuse_connect(&cw, ConnectReturnCode::NotAuthorized).await;
        return Err(format!(
            "device {:?} asked for a last will; devices may not publish",
            login.username
        ));
    }
    let thing = login.username;
    let upstream = TcpStream::connect(ctx.internal)
        .await
        .map_err(|e| format!("cannot reach the embedded broker: {e}"))?;
    let (mut ur, mut uw) = upstream.into_split();
    uw.write_all(&first).await.map_err(|e| e.to_string())?;
    let revoked = ctx.devices.session(&thing);
    let silence = match connect.keep_alive {
        0 => MAX_SILENCE,
        k => Duration::from_secs(u64::from(k) * 3 / 2 + 1),
    };
    let own_topic = topic_for(&ctx.template, &thing);
    debug!(%thing, "device connected to the embedded broker");

    // Broker → device: whole packets, so refusals can be interleaved safely; PUBLISH topics
    // get their external names back. A confirmed subscription is reported.
    let down_writer = cw.clone();
    let (down_thing, subscribed) = (thing.clone(), ctx.subscribed.clone());
    let mut down = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(4096);
        while let Ok(Some(p)) = next_packet(&mut ur, &mut buf).await {
            let p = match Packet::read(&mut BytesMut::from(&p[..]), MAX_PACKET) {
                Ok(Packet::Publish(mut publish)) if publish.topic.starts_with(DOLLAR) => {
                    publish.topic = external_topic(&publish.topic);
                    let mut out = BytesMut::new();
                    if publish.write(&mut out).is_err() {
                        break;
                    }
                    out.freeze()
                }
                Ok(Packet::SubAck(ack)) => {
                    if ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                    {
                        let _ = subscribed.send(down_thing.clone());
                    }
                    p
                }
                _ => p,
            };
            if down_writer.lock().await.write_all(&p).await.is_err() {
                break;
            }
        }
        let _ = down_writer.lock().await.shutdown().await;
    });

    let result = loop {
        let raw = tokio::select! {
            _ = revoked.cancelled() => break Err(format!("device {thing} was removed or got a new password")),
            _ = &mut down => break Ok(()),
            r = tokio::time::timeout(silence, next_packet(&mut cr, &mut buf)) => match r {
                Err(_) => break Err(format!("nothing from {thing} for {silence:?}")),
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None)) => break Ok(()),
                Ok(Err(e)) => break Err(e),
            },
        };
        let packet = match Packet::read(&mut BytesMut::from(&raw[..]), MAX_PACKET) {
            Ok(p) => p,
            Err(e) => break Err(format!("malformed MQTT packet from {thing}: {e:?}")),
        };
        let mut rewritten = BytesMut::new();
        match packet {
            Packet::Subscribe(mut s) => {
                if let Some(bad) = s.filters.iter().find(|f| f.path != own_topic) {
                    warn!(%thing, filter = %bad.path, allowed = %own_topic, "subscription refused: a device may only subscribe to its own notify topic");
                    let ack =
                        SubAck::new(s.pkid, vec![SubscribeReasonCode::Failure; s.filters.len()]);
                    let mut out = BytesMut::new();
                    if ack.write(&mut out).is_ok() && cw.lock().await.write_all(&out).await.is_err()
                    {
                        break Ok(());
                    }
                    continue;
                }
                for f in &mut s.filters {
                    f.path = internal_topic(&f.path);
                }
                if s.write(&mut rewritten).is_err() {
                    break Err("cannot re-encode SUBSCRIBE".into());
                }
            }
            Packet::Unsubscribe(mut u) => {
                for t in &mut u.topics {
                    *t = internal_topic(t);
                }
                if u.write(&mut rewritten).is_err() {
                    break Err("cannot re-encode UNSUBSCRIBE".into());
                }
            }
            Packet::Publish(p) => {
                break Err(format!(
                    "device {thing} tried to publish to {:?}; devices may not publish",
                    p.topic
                ));
            }
            Packet::Connect(_) => break Err(format!("second CONNECT from {thing}")),
            _ => {}
        }
        let out = if rewritten.is_empty() {
            &raw[..]
        } else {
            &rewritten[..]
        };
        if uw.write_all(out).await.is_err() {
            break Err("embedded broker closed the connection".into());
        }
    };
    down.abort();
    result
}

async fn refuse_connect<W: AsyncWrite + Unpin>(w: &tokio::sync::Mutex<W>, code: ConnectReturnCode) {
    let mut out = BytesMut::new();
    if ConnAck::new(code, false).write(&mut out).is_ok() {
        let mut w = w.lock().await;
        let _ = w.write_all(&out).await;
        let _ = w.shutdown().await;
    }
}
