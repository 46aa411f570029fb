//! Waiting for tunnels: culvertd as an MQTT client of the broker the relay notifies through.
//!
//! - Connects with the device identity from its config (username/password and/or a client
//!   certificate, TLS), with a persistent session (`clean_session = false`, QoS 1), so a
//!   notification published while the gateway was offline is delivered when it comes back.
//! - Subscribes to its own notify topic only.
//! - Validates every payload (size, JSON, `clientMode`, token, services known to the rules);
//!   a bad one is logged with the reason and ignored.
//! - Each valid notification starts a destination session for that token; several run at once.
//!   A duplicate delivery of a token already seen is ignored; a notification for a tunnel that
//!   is no longer open ends at the relay's 4xx, logged. A rotation arrives as a new token: the
//!   relay disconnects the old session, whose reconnect is refused, so it ends by itself.
//! - Reconnects to the broker with exponential backoff and jitter; tunnels already up do not
//!   depend on the broker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use culvert_protocol::client::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode, Transport};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{Config, MqttConfig};
use crate::gateway::{RelayLink, Shutdown, TunnelArgs, TunnelError, run_tunnel};
use crate::rules::{Gateway, token_label};

/// Largest notification payload accepted (the AWS payload is a few hundred bytes).
pub const MAX_NOTIFICATION: usize = 8 * 1024;
/// Largest MQTT packet read from the broker; bigger payloads are read, then refused by size
/// (refusing them at the MQTT layer would drop the connection and have the broker redeliver).
const MAX_MQTT_PACKET: usize = 2 * 1024 * 1024;
/// Tokens remembered for duplicate detection.
const SEEN_TOKENS: usize = 1024;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    /// culvert-relay adds the tunnel id (AWS does not); used only to label the audit trail.
    tunnel_id: Option<String>,
    client_access_token: String,
    client_mode: String,
    #[serde(default)]
    services: Vec<String>,
    /// culvert-relay adds who opened the tunnel and why (for the audit trail).
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// A notification that passed validation.
#[derive(Debug, PartialEq, Eq)]
pub struct Valid {
    pub tunnel_id: Option<String>,
    pub token: culvert_protocol::Secret,
    pub services: Vec<String>,
    pub identity: crate::rules::Identity,
}

/// Check a notification payload against the rules; the error says why it is ignored.
pub fn validate(payload: &[u8], cfg: &Config) -> Result<Valid, String> {
    if payload.len() > MAX_NOTIFICATION {
        return Err(format!(
            "payload of {} bytes is larger than {MAX_NOTIFICATION}",
            payload.len()
        ));
    }
    let n: Notification = serde_json::from_slice(payload)
        .map_err(|e| format!("not a tunnel notification (JSON): {e}"))?;
    if n.client_mode != "destination" {
        return Err(format!(
            "clientMode is {:?}; a gateway only acts on \"destination\"",
            n.client_mode
        ));
    }
    let t = &n.client_access_token;
    if t.is_empty() || t.len() > 4096 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("clientAccessToken is empty, too long or not printable".into());
    }
    if n.services.is_empty() {
        return Err("services is empty".into());
    }
    if let Some(s) = n.services.iter().find(|s| !cfg.services.contains_key(*s)) {
        return Err(format!(
            "service {s:?} has no rule in this gateway's configuration (it has: {})",
            cfg.service_names().join(", ")
        ));
    }
    Ok(Valid {
        // A label only: kept when it looks like an id, dropped otherwise.
        tunnel_id: n.tunnel_id.filter(|t| culvert_protocol::valid_name(t)),
        token: n.client_access_token.into(),
        services: n.services,
        identity: crate::rules::Identity {
            operator: n.operator.filter(|o| culvert_protocol::valid_name(o)),
            // Text for an audit line: bounded, and without what could forge or hide a line.
            reason: n.reason.filter(|r| {
                r.chars().count() <= 1024 && !r.chars().any(culvert_protocol::is_unsafe_char)
            }),
        },
    })
}

/// TLS towards the broker (its CA, and the client certificate if any), built before privileges
/// are dropped.
pub fn tls_config(
    m: &MqttConfig,
    relay_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca = m.ca.as_deref().or(relay_ca);
    let Some((cert, key)) = &m.client_cert else {
        return culvert_protocol::client::tls_config(ca);
    };
    let certs = rustls_pemfile::certs(
        &mut &std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?[..],
    )
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = rustls_pemfile::private_key(
        &mut &std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?[..],
    )
    .map_err(|e| format!("{}: {e}", key.display()))?
    .ok_or_else(|| format!("{}: no private key", key.display()))?;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(culvert_protocol::client::root_store(ca)?)
    .with_client_auth_cert(certs, key)
    .map_err(|e| format!("client certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

/// Serve notifications until `shutdown`.
pub async fn run(
    gw: Arc<Gateway>,
    relay: RelayLink,
    tls: Arc<rustls::ClientConfig>,
    shutdown: Shutdown,
) -> Result<(), String> {
    let m = gw
        .config()
        .mqtt
        .clone()
        .ok_or("no [mqtt] section in the configuration")?;
    // The broker through the site's proxy, as the relay (relay.proxy, else the environment's
    // for the broker's host).
    let proxy =
        culvert_protocol::proxy::Proxy::choose(gw.config().proxy.as_deref(), &m.broker.host)
            .map_err(|e| format!("relay.proxy: {e}"))?;
    // The bridge is kept until this function returns: its directory goes with it.
    let (mut opts, _bridge) = match proxy {
        None => {
            let mut o = MqttOptions::new(m.client_id.clone(), m.broker.host.clone(), m.broker.port);
            o.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
            (o, None)
        }
        Some(p) => {
            info!(proxy = %p, broker = %m.broker, "reaching the MQTT broker through a proxy");
            let b = crate::mqtt_proxy::start(p, m.broker.clone(), tls)?;
            let mut o = MqttOptions::new(m.client_id.clone(), b.path.to_string_lossy(), 0);
            o.set_transport(Transport::Unix);
            (o, Some(b))
        }
    };
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_max_packet_size(MAX_MQTT_PACKET, 64 * 1024);
    if let Some(u) = &m.username {
        let password = m.password.as_ref().map(|p| p.expose().to_owned());
        opts.set_credentials(u.clone(), password.unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    if let Some(every) = m.health_every {
        tokio::spawn(crate::health::run(
            gw.clone(),
            client.clone(),
            m.thing_name.clone(),
            every,
            shutdown.drain.clone(),
        ));
    }
    let tunnels = TaskTracker::new();
    let mut seen: (HashSet<String>, VecDeque<String>) = Default::default();
    // The tunnels served now, by tunnel id (or token fingerprint): each task's stop, and a token
    // cancelled when the task ends.
    let mut served: HashMap<String, (Shutdown, CancellationToken)> = Default::default();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    info!(broker = %m.broker, thing = %m.thing_name, topic = %m.topic, "waiting for tunnel notifications");
    loop {
        let ev = tokio::select! {
            _ = shutdown.drain.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                info!(
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                if let Err(e) = client.try_subscribe(m.topic.clone(), QoS::AtLeastOnce) {
                    warn!(error = %e, "cannot queue the subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    error!(topic = %m.topic, "the broker refused the subscription: check its ACL for this device");
                } else {
                    info!(topic = %m.topic, "subscribed to tunnel notifications");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic != m.topic {
                    warn!(topic = %p.topic, "message on an unexpected topic ignored");
                    continue;
                }
                let n = match validate(&p.payload, &gw.config()) {
                    Ok(n) => n,
                    Err(why) => {
                        warn!(reason = %why, "notification ignored");
                        continue;
                    }
                };
                if seen.0.contains(n.token.expose()) {
                    debug!("duplicate notification ignored");
                    continue;
                }
                // A new token for a tunnel already served (rotation, re-announcement) replaces
                // that tunnel's task: its old token no longer works, and it does not count twice.
                let key = n
                    .tunnel_id
                    .clone()
                    .unwrap_or_else(|| token_label(n.token.expose()));
                served.retain(|_, (_, done)| !done.is_cancelled());
                let max_tunnels = gw.config().daemon.max_tunnels;
                let replaced = served.remove(&key);
                if replaced.is_none() && served.len() >= max_tunnels {
                    // Not marked as seen: a redelivery after a tunnel ended may still be served.
                    warn!(tunnel = ?n.tunnel_id, max_tunnels, "tunnel notification ignored: this gateway already serves daemon.max_tunnels tunnels");
                    continue;
                }
                if let Some((old, _)) = replaced {
                    info!(tunnel = %key, "a new token for a tunnel already served: the old session stops");
                    old.drain.cancel();
                }
                seen.0.insert(n.token.expose().to_owned());
                seen.1.push_back(n.token.expose().to_owned());
                if seen.1.len() > SEEN_TOKENS
                    && let Some(old) = seen.1.pop_front()
                {
                    seen.0.remove(&old);
                }
                info!(tunnel = ?n.tunnel_id, services = ?n.services, "tunnel notification: connecting to the relay");
                let args = TunnelArgs {
                    relay: relay.clone(),
                    access_token: n.token,
                    client_token: None,
                    // Only a culvert relay names the tunnel, and only its broker takes reports.
                    reporter: n.tunnel_id.is_some().then(|| crate::approval::Reporter {
                        client: client.clone(),
                        thing: m.thing_name.clone(),
                    }),
                    tunnel_id: n.tunnel_id,
                    identity: n.identity,
                };
                // Its own stop: the gateway's, or a newer token for the same tunnel.
                let stop = Shutdown {
                    drain: shutdown.drain.child_token(),
                    hard: shutdown.hard.child_token(),
                };
                let done = CancellationToken::new();
                served.insert(key, (stop.clone(), done.clone()));
                let gw = gw.clone();
                let span = info_span!("tunnel", n = %tunnels.len());
                tunnels.spawn(
                    async move {
                        let _done = done.drop_guard();
                        match run_tunnel(args, gw, stop).await {
                            Ok(()) => {}
                            Err(TunnelError::Refused { status, message }) => {
                                info!(status, reason = %message, "tunnel ended: the relay no longer accepts its token");
                            }
                            Err(e) => warn!(error = %e, "tunnel ended"),
                        }
                    }
                    .instrument(span),
                );
            }
            Ok(_) => {}
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(broker = %m.broker, error = %e, retry_in = ?delay, "MQTT broker connection failed");
                tokio::select! {
                    _ = shutdown.drain.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // No new tunnels; the running ones drain (or end at the hard stop).
    let _ = client.try_disconnect();
    tunnels.close();
    tunnels.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        crate::config::parse(
            "[services.SSH]\ntarget = \"127.0.0.1:2222\"\nallow = [\"127.0.0.1\"]\n",
            std::path::Path::new("."),
        )
        .unwrap()
    }

    #[test]
    fn notifications_are_validated() {
        let c = cfg();
        let ok = br#"{"clientAccessToken":"abc","clientMode":"destination","region":"x","services":["SSH"]}"#;
        assert_eq!(
            validate(ok, &c),
            Ok(Valid {
                tunnel_id: None,
                token: "abc".into(),
                services: vec!["SSH".into()],
                identity: Default::default(),
            })
        );
        let with_id = br#"{"tunnelId":"t-1","clientAccessToken":"abc","clientMode":"destination","services":["SSH"]}"#;
        assert_eq!(
            validate(with_id, &c).unwrap().tunnel_id.as_deref(),
            Some("t-1")
        );
        // Who and why, from culvert-relay: kept when they are fit for an audit line.
        let who = br#"{"clientAccessToken":"abc","clientMode":"destination","services":["SSH"],"operator":"alice","reason":"ticket 4711"}"#;
        assert_eq!(
            validate(who, &c).unwrap().identity,
            crate::rules::Identity {
                operator: Some("alice".into()),
                reason: Some("ticket 4711".into())
            }
        );
        let forged = br#"{"clientAccessToken":"abc","clientMode":"destination","services":["SSH"],"operator":"a b","reason":"x\n{\"event\":\"end\"}"}"#;
        assert_eq!(validate(forged, &c).unwrap().identity, Default::default());
        let err = |p: &[u8]| validate(p, &c).unwrap_err();
        assert!(err(b"not json").contains("JSON"));
        assert!(err(&vec![b' '; 1 << 20]).contains("larger than"));
        assert!(
            err(br#"{"clientAccessToken":"a","clientMode":"source","services":["SSH"]}"#)
                .contains("clientMode")
        );
        assert!(
            err(br#"{"clientAccessToken":"a","clientMode":"destination","services":["VNC"]}"#)
                .contains("no rule")
        );
        assert!(
            err(br#"{"clientAccessToken":"a","clientMode":"destination","services":[]}"#)
                .contains("empty")
        );
        assert!(
            err(br#"{"clientAccessToken":"","clientMode":"destination","services":["SSH"]}"#)
                .contains("clientAccessToken")
        );
    }
}
