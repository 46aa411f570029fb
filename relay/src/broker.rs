//! The embedded MQTT broker for single-machine deployments: rumqttd's router (MQTT 3.1.1)
//! in-process, with no network port of its own. Gateways reach it only through the TLS listener
//! here, which culvert terminates with rustls; each device connection becomes one in-process
//! link to the router, and the relay publishes through another. There is no internal port, so
//! there is nothing on the host another process could connect to, or take before rumqttd.
//!
//! The listener enforces what rumqttd cannot:
//!
//! - a device authenticates with its thing name as username and client id, and the password
//!   issued by `POST /api/v1/devices` (stored as a hash);
//! - a device may subscribe only to its own notify topic; any other filter is refused with a
//!   SUBACK failure (0x80) and logged;
//! - devices may not publish (notifications come from the relay), nor leave a last will, with
//!   two exceptions: a device's on-site approval reports ([`crate::onsite`]) and health
//!   reports ([`crate::health`]), at QoS 0 on its own [`culvert_protocol::on_site_topic`] and
//!   [`culvert_protocol::health_topic`], which the relay takes itself (they never reach the
//!   router);
//! - removing a device, or issuing it a new password, cuts its current connection;
//! - connections are limited overall and per source address ([`crate::slots`]); a connection
//!   holds a handshake slot only until its CONNECT is accepted, and at most
//!   [`ListenerLimits::handshake_timeout`] for TLS and the CONNECT.
//!
//! Packets are read and written with rumqttd's own MQTT 3.1.1 codec, as its network links do.
//!
//! rumqttd refuses topics starting with `$` (reserved for brokers), but AWS's notify topic is
//! `$aws/things/<thing>/tunnels/notify`. Inside rumqttd such topics are therefore stored as
//! `culvert-dollar/…` ([`crate::topic::internal_topic`]); SUBSCRIBE / UNSUBSCRIBE filters are rewritten on the
//! way in and PUBLISH topics on the way out, so devices only ever see the AWS names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet, Protocol, Publish,
    SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::devices::Devices;
use crate::slots::{Admitted, Gate, ListenerLimits, RefusalLog};
use crate::topic::{external_topic, internal_topic, topic_for};

/// Largest MQTT packet accepted from a device.
const MAX_PACKET: usize = 256 * 1024;
/// Read timeout for a device that asked for no keep-alive.
const MAX_SILENCE: Duration = Duration::from_secs(900);
/// A device that does not take what it is sent for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Confirmed subscriptions waiting for the re-announcement task; beyond this they are dropped
/// (they are only hints: the task re-announces per thing, at most once per interval).
pub const SUBSCRIBED_QUEUE: usize = 1024;
/// The client id of the relay's own publishing link (not a valid thing name, so no device can
/// take it over).
const RELAY_CLIENT_ID: &str = "culvert.relay";

/// Builds an in-process link to the router: (client id, clean session). rumqttd's own error
/// (800 bytes of channel types) is turned into its message.
type LinkFactory =
    Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync>;

/// A device's subscription to its notify topic, confirmed by the broker at `at`.
#[derive(Clone, Debug)]
pub struct Subscribed {
    pub thing: String,
    pub at: tokio::time::Instant,
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// Where gateways connect (TLS).
    pub listen: SocketAddr,
    /// The relay's own link, for publishing notifications.
    pub publisher: Publisher,
}

/// The relay's in-process link into the embedded broker.
#[derive(Clone)]
pub struct Publisher {
    tx: Arc<tokio::sync::Mutex<LinkTx>>,
}

impl Publisher {
    /// Publish `payload` on `topic` (its AWS name). The router delivers it to the subscriber
    /// with the subscription's QoS (1 for culvertd), retransmitting to a persistent session.
    pub async fn publish(&self, topic: &str, payload: String) -> Result<(), String> {
        let publish = Publish::new(
            Bytes::from(internal_topic(topic)),
            Bytes::from(payload),
            false,
        );
        let mut tx = self.tx.lock().await;
        to_router(&mut tx, Packet::Publish(publish, None))
            .await
            .map_err(|e| format!("embedded broker: {e}"))
    }
}

/// Hand a packet to the router. `LinkTx::send` is declared async but blocks on the router's
/// bounded channel when the router falls behind; on a multi-threaded runtime that wait is
/// moved off the worker, so the rest of the relay goes on.
async fn to_router(tx: &mut LinkTx, p: Packet) -> Result<(), String> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let text = |e: LinkError| e.to_string();
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| {
            Handle::current()
                .block_on(tx.send(p))
                .map(|_| ())
                .map_err(text)
        }),
        _ => tx.send(p).await.map(|_| ()).map_err(text),
    }
}

/// One device connection at a time per thing. rumqttd's router would take a second connection
/// with the same client id over itself, and a link that is woken after such a takeover panics
/// its thread; so a new connection first ends the thing's current one and waits until that
/// has left the router. The newest connection wins.
#[derive(Default)]
struct Turns {
    things: std::sync::Mutex<HashMap<String, Arc<Turn>>>,
}

#[derive(Default)]
struct Turn {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Bumped by every connection that wants the turn.
    wanted: std::sync::atomic::AtomicU64,
    /// Cancelled to end the connection that holds the turn.
    holder: std::sync::Mutex<CancellationToken>,
}

impl Turns {
    /// Wait for `thing`'s turn, ending the connection that holds it. `None`: a newer
    /// connection of the same thing came while waiting, and takes the turn instead.
    async fn take(
        &self,
        thing: &str,
    ) -> Option<(tokio::sync::OwnedMutexGuard<()>, CancellationToken)> {
        use std::sync::atomic::Ordering;
        let turn = self
            .things
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(thing.to_owned())
            .or_default()
            .clone();
        let me = turn.wanted.fetch_add(1, Ordering::AcqRel) + 1;
        turn.holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
        let guard = turn.lock.clone().lock_owned().await;
        if turn.wanted.load(Ordering::Acquire) != me {
            return None;
        }
        let token = CancellationToken::new();
        *turn.holder.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
        Some((guard, token))
    }
}

/// Start rumqttd's router and the TLS listener; what devices do that the relay acts on goes
/// to `to_relay`.
pub async fn start(
    listen: SocketAddr,
    limits: ListenerLimits,
    tls: Arc<rustls::ServerConfig>,
    devices: Arc<Devices>,
    topic_template: String,
    to_relay: ToRelay,
    shutdown: CancellationToken,
) -> anyhow::Result<EmbeddedBroker> {
    let router = rumqttd::Router::new(
        0,
        rumqttd::RouterConfig {
            max_connections: limits.max_connections + 10,
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
    let links: LinkFactory = Arc::new(move |client_id, clean| {
        LinkBuilder::new(client_id, router_tx.clone())
            .clean_session(clean)
            .dynamic_filters(true)
            .build()
            .map_err(|e: LinkError| e.to_string())
    });

    // The relay's own link. Building waits for the router's answer (a blocking channel read).
    let build = links.clone();
    let (tx, rx, _) = tokio::task::spawn_blocking(move || build(RELAY_CLIENT_ID, true))
        .await?
        .map_err(|e| anyhow::anyhow!("embedded MQTT broker: {e}"))?;
    tokio::spawn(drain(rx, shutdown.clone()));
    let publisher = Publisher {
        tx: Arc::new(tokio::sync::Mutex::new(tx)),
    };

    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for MQTT on {listen}: {e}"))?;
    let listen = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls);
    info!(%listen, max_connections = limits.max_connections, "embedded MQTT broker listening (TLS)");
    let gate = Arc::new(Gate::new(limits));
    let refusals = RefusalLog::new("mqtt");
    let turns = Arc::new(Turns::default());
    tokio::spawn(async move {
        while let Some((tcp, peer)) = crate::slots::accept(&listener, &shutdown, "MQTT").await {
            let admitted = match gate.admit(peer.ip()) {
                Ok(a) => a,
                Err((pool, full)) => {
                    refusals.refused(peer, pool, full, &gate.limits);
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let ctx = GuardContext {
                devices: devices.clone(),
                template: topic_template.clone(),
                links: links.clone(),
                turns: turns.clone(),
                to_relay: to_relay.clone(),
                handshake_timeout: gate.limits.handshake_timeout,
            };
            tokio::spawn(async move {
                // TLS and the CONNECT share one deadline.
                let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
                let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    _ => {
                        debug!(%peer, "MQTT TLS handshake failed or timed out");
                        return;
                    }
                };
                if let Err(why) = guard(tls, ctx, &admitted, deadline).await {
                    info!(%peer, reason = %why, "MQTT client disconnected");
                }
            });
        }
    });
    Ok(EmbeddedBroker { listen, publisher })
}

/// Take (and drop) what the router sends the relay's publishing link, so it never piles up.
async fn drain(mut rx: LinkRx, shutdown: CancellationToken) {
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.next() => n,
        };
        match n {
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "the embedded MQTT broker's router stopped");
                return;
            }
        }
    }
}

/// Read one MQTT packet from `r`, buffering in `buf`; `None` at a clean end of stream.
async fn next_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Packet>, String> {
    loop {
        match V4.read_mut(buf, MAX_PACKET) {
            Ok(p) => return Ok(Some(p)),
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed MQTT packet: {e:?}")),
        }
        match r.read_buf(buf).await.map_err(|e| e.to_string())? {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err("connection closed in the middle of a packet".into()),
            _ => {}
        }
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(w: &mut W, p: Packet) -> Result<(), String> {
    let mut out = BytesMut::new();
    V4.write(p, &mut out)
        .map_err(|e| format!("cannot encode a packet: {e:?}"))?;
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&out)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("the device took nothing for {WRITE_TIMEOUT:?}")),
    }
}

/// What a guard needs besides its connection.
struct GuardContext {
    devices: Arc<Devices>,
    template: String,
    links: LinkFactory,
    turns: Arc<Turns>,
    to_relay: ToRelay,
    handshake_timeout: Duration,
}

/// What the broker tells the relay about its devices.
#[derive(Clone)]
pub struct ToRelay {
    /// Every subscription to a notify topic the broker confirms (for re-announcement).
    pub subscribed: tokio::sync::mpsc::Sender<Subscribed>,
    /// On-site approval reports ([`crate::onsite`]) go to the registry and the audit trail.
    pub registry: Arc<crate::registry::Registry>,
    pub audit: Arc<crate::audit::Audit>,
}

/// A SUBACK return code that grants the subscription (rumqttd answers MQTT 3.1.1 clients
/// with `QoS0`/`QoS1`/`QoS2`).
fn granted(code: &SubscribeReasonCode) -> bool {
    matches!(
        code,
        SubscribeReasonCode::QoS0
            | SubscribeReasonCode::QoS1
            | SubscribeReasonCode::QoS2
            | SubscribeReasonCode::Success(_)
    )
}

/// Peer-supplied text for a log field: quoted and escaped, cut to a sane length.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(200).collect();
    format!("{cut:?}")
}

/// Carry one device connection, enforcing authentication and topic rules.
async fn guard<S>(
    client: S,
    ctx: GuardContext,
    admitted: &Admitted,
    deadline: tokio::time::Instant,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let mut buf = BytesMut::with_capacity(4096);

    // The first packet must be a CONNECT from a registered device.
    let first = tokio::time::timeout_at(deadline, next_packet(&mut cr, &mut buf))
        .await
        .map_err(|_| format!("no CONNECT within {:?}", ctx.handshake_timeout))??
        .ok_or("closed before CONNECT")?;
    let Packet::Connect(connect, _, last_will, _, login) = first else {
        return Err("first packet is not CONNECT".into());
    };
    let refuse = |code| {
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        )
    };
    let Some(login) = login else {
        let _ = write_packet(&mut cw, refuse(ConnectReturnCode::NotAuthorized)).await;
        return Err("CONNECT without username/password".into());
    };
    if connect.client_id != login.username {
        let _ = write_packet(&mut cw, refuse(ConnectReturnCode::ClientIdentifierNotValid)).await;
        return Err(format!(
            "client id {} differs from username {} (a device connects as its thing name)",
            shown(&connect.client_id),
            shown(&login.username)
        ));
    }
    if !ctx.devices.verify(&login.username, &login.password) {
        let _ = write_packet(&mut cw, refuse(ConnectReturnCode::BadUserNamePassword)).await;
        return Err(format!(
            "bad credentials for device {}",
            shown(&login.username)
        ));
    }
    if last_will.is_some() {
        let _ = write_packet(&mut cw, refuse(ConnectReturnCode::NotAuthorized)).await;
        return Err(format!(
            "device {} asked for a last will; devices may not publish",
            shown(&login.username)
        ));
    }
    // A registered device (its name was validated when it was registered).
    let thing = login.username;
    admitted.handshake_done();
    let revoked = ctx.devices.session(&thing);
    let _online = ctx.devices.online(&thing);
    let Some((_turn, replaced)) = ctx.turns.take(&thing).await else {
        return Err(format!(
            "{thing} connected again meanwhile; this connection is dropped"
        ));
    };
    let (build, id, clean) = (ctx.links.clone(), thing.clone(), connect.clean_session);
    let (mut link_tx, mut link_rx, connack) =
        tokio::task::spawn_blocking(move || build(&id, clean))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the embedded broker refused {thing}: {e}"))?;
    let link = Link {
        thing: &thing,
        own_topic: topic_for(&ctx.template, &thing),
        report_topic: culvert_protocol::on_site_topic(&thing),
        health_topic: culvert_protocol::health_topic(&thing),
        devices: &ctx.devices,
        to_relay: &ctx.to_relay,
        revoked,
        replaced,
    };
    let result = link
        .carry(
            &mut cr,
            &mut cw,
            &mut buf,
            &mut link_tx,
            &mut link_rx,
            connack,
            connect.keep_alive,
        )
        .await;
    // Whatever ended it, the device leaves the router (its persistent session is kept), with
    // no will, before the next connection of this thing may take its turn.
    let bye = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    let _ = to_router(&mut link_tx, Packet::Disconnect(bye, None)).await;
    let _ = cw.shutdown().await;
    result
}

/// One authenticated device connection and its link to the router.
struct Link<'a> {
    thing: &'a str,
    own_topic: String,
    /// The topics it may publish on: on-site reports and health reports.
    report_topic: String,
    health_topic: String,
    devices: &'a Devices,
    to_relay: &'a ToRelay,
    /// The device was removed or got a new password.
    revoked: CancellationToken,
    /// A newer connection of the same thing takes over.
    replaced: CancellationToken,
}

impl Link<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn carry<R, W>(
        &self,
        cr: &mut R,
        cw: &mut W,
        buf: &mut BytesMut,
        link_tx: &mut LinkTx,
        link_rx: &mut LinkRx,
        connack: Notification,
        keep_alive: u16,
    ) -> Result<(), String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let thing = self.thing;
        if let Some(p) = Option::<Packet>::from(connack) {
            write_packet(cw, p).await?;
        }
        let silence = match keep_alive {
            0 => MAX_SILENCE,
            k => Duration::from_secs(u64::from(k) * 3 / 2 + 1),
        };
        debug!(%thing, "device connected to the embedded broker");
        loop {
            tokio::select! {
                _ = self.revoked.cancelled() => return Err(format!("device {thing} was removed or got a new password")),
                _ = self.replaced.cancelled() => return Err(format!("{thing} connected again; the older connection is closed")),
                n = link_rx.next() => {
                    let notification = match n {
                        Ok(Some(n)) => n,
                        Ok(None) => continue,
                        Err(e) => return Err(format!("embedded broker link ended: {e}")),
                    };
                    if matches!(notification, Notification::Unschedule) {
                        if link_rx.wake().await.is_err() {
                            return Err("embedded broker link ended".into());
                        }
                        continue;
                    }
                    let Some(mut packet) = Option::<Packet>::from(notification) else { continue };
                    match &mut packet {
                        Packet::Publish(publish, _) => publish.topic = external_topic(&publish.topic),
                        Packet::SubAck(ack, _) if ack.return_codes.iter().all(granted) => {
                            let hint = Subscribed { thing: thing.to_owned(), at: tokio::time::Instant::now() };
                            if self.to_relay.subscribed.try_send(hint).is_err() {
                                debug!(%thing, "re-announcement queue full; subscription not reported");
                            }
                        }
                        // The router ended the session. MQTT 3.1.1 has no DISCONNECT from the
                        // server: the connection just closes.
                        Packet::Disconnect(..) => return Ok(()),
                        _ => {}
                    }
                    write_packet(cw, packet).await?;
                }
                r = tokio::time::timeout(silence, next_packet(cr, buf)) => {
                    let packet = match r {
                        Err(_) => return Err(format!("nothing from {thing} for {silence:?}")),
                        Ok(Ok(Some(p))) => p,
                        Ok(Ok(None)) => return Ok(()),
                        Ok(Err(e)) => return Err(format!("{thing}: {e}")),
                    };
                    let packet = match packet {
                        Packet::Subscribe(mut s, props) => {
                            if let Some(bad) = s.filters.iter().find(|f| f.path != self.own_topic) {
                                warn!(%thing, filter = %shown(&bad.path), allowed = %self.own_topic, "subscription refused: a device may only subscribe to its own notify topic");
                                let ack = SubAck { pkid: s.pkid, return_codes: vec![SubscribeReasonCode::Failure; s.filters.len()] };
                                write_packet(cw, Packet::SubAck(ack, None)).await?;
                                continue;
                            }
                            for f in &mut s.filters {
                                f.path = internal_topic(&f.path);
                            }
                            Packet::Subscribe(s, props)
                        }
                        Packet::Unsubscribe(mut u, props) => {
                            for f in &mut u.filters {
                                *f = internal_topic(f);
                            }
                            Packet::Unsubscribe(u, props)
                        }
                        Packet::Publish(p, _) if *p.topic == *self.report_topic.as_bytes() || *p.topic == *self.health_topic.as_bytes() => {
                            // rumqttd keeps the QoS to itself; its size estimate counts the
                            // packet id that only QoS 1 and 2 carry.
                            if p.len() != 2 + p.topic.len() + p.payload.len() {
                                return Err(format!("device {thing} published a report above QoS 0; culvertd sends them at QoS 0"));
                            }
                            if *p.topic == *self.health_topic.as_bytes() {
                                crate::health::report(self.devices, thing, &p.payload);
                            } else {
                                crate::onsite::report(&self.to_relay.registry, &self.to_relay.audit, thing, &p.payload).await;
                            }
                            continue;
                        }
                        Packet::Publish(p, _) => {
                            return Err(format!(
                                "device {thing} tried to publish to {}; devices may not publish",
                                shown(&String::from_utf8_lossy(&p.topic))
                            ));
                        }
                        Packet::Connect(..) => return Err(format!("second CONNECT from {thing}")),
                        p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubRel(..)
                            | Packet::PubComp(..) | Packet::PingReq(..)) => p,
                        Packet::Disconnect(..) => return Ok(()),
                        other => return Err(format!("{thing} sent a packet only a broker sends: {other:?}")),
                    };
                    if to_router(link_tx, packet).await.is_err() {
                        return Err("embedded broker link ended".into());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_in_logs_is_escaped_and_bounded() {
        let evil = "x\n2026-01-01T00:00:00Z ERROR forged\u{1b}[31m";
        let s = shown(evil);
        assert!(!s.contains('\n') && !s.contains('\u{1b}'), "{s}");
        assert!(shown(&"a".repeat(10_000)).len() < 300);
    }
}
