//! Device notification: on open, and on every rotation that includes the destination, publish
//! the destination token to the thing's notify topic with QoS 1, in the AWS payload shape:
//! `{"clientAccessToken", "clientMode": "destination", "region", "services": [...]}` on
//! `$aws/things/<thing>/tunnels/notify` (the topic template is configurable).
//!
//! With an external broker the relay is its MQTT client (rumqttc over TLS), which reconnects by
//! itself with exponential backoff and jitter. With the embedded broker it publishes through
//! an in-process link ([`crate::broker::Publisher`]): no network, no port.

use std::sync::Arc;
use std::time::Duration;

use culvert_protocol::client::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::registry::{Registry, TunnelView};
use crate::topic::topic_for;

/// How to reach an external broker as the relay.
#[derive(Clone)]
pub struct BrokerClient {
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub client_id: String,
    pub username: String,
    pub password: culvert_protocol::Secret,
}

#[derive(Clone)]
pub struct Notifier {
    sink: Sink,
    topic_template: String,
    region: String,
}

/// Where notifications are published.
#[derive(Clone)]
enum Sink {
    External(AsyncClient),
    Embedded(crate::broker::Publisher),
}

impl Notifier {
    /// Publish into the embedded broker.
    pub fn embedded(
        publisher: crate::broker::Publisher,
        topic_template: String,
        region: String,
    ) -> Notifier {
        Notifier {
            sink: Sink::Embedded(publisher),
            topic_template,
            region,
        }
    }

    /// Start the MQTT client of an external broker; its event loop runs until `shutdown`.
    pub fn external(
        b: BrokerClient,
        topic_template: String,
        region: String,
        shutdown: CancellationToken,
    ) -> Notifier {
        let mut opts = MqttOptions::new(b.client_id.clone(), b.host.clone(), b.port);
        opts.set_credentials(b.username.clone(), b.password.expose())
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        opts.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(b.tls),
        ));
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let endpoint = format!("{}:{}", b.host, b.port);
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        info!(broker = %endpoint, "connected to MQTT broker");
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        debug!(pkid = a.pkid, "notification acknowledged by the broker");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let delay = backoff.next_delay();
                        warn!(broker = %endpoint, error = %e, retry_in = ?delay, "MQTT broker connection failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        });
        Notifier {
            sink: Sink::External(client),
            topic_template,
            region,
        }
    }

    /// Announce tunnel `view`'s new destination token to its device, and note the time in the
    /// registry (before publishing: a subscription confirmed after that instant may have
    /// missed it, and is re-announced; see [`crate::reannounce`]).
    pub async fn announce(&self, registry: &Registry, view: &TunnelView, token: &str) {
        registry.mark_notified(&view.rec.id);
        self.notify(
            &view.rec.thing_name,
            &view.rec.id,
            token,
            &view.rec.services,
            Identity {
                operator: view.rec.opened_by.as_deref(),
                reason: view.rec.reason.as_deref(),
            },
        )
        .await;
    }

    /// Queue the notification (QoS 1: the client retransmits until the broker acknowledges).
    /// `tunnelId`, `operator` and `reason` are culvert additions AWS payloads do not carry
    /// (JSON readers ignore them): culvertd puts them in its audit trail, so the trail matches
    /// `culvert tunnel list` and names who opened the tunnel and why — as the relay, not the
    /// source side, says.
    pub async fn notify(
        &self,
        thing: &str,
        tunnel_id: &str,
        token: &str,
        services: &[String],
        who: Identity<'_>,
    ) {
        let topic = topic_for(&self.topic_template, thing);
        let mut payload = serde_json::json!({
            "tunnelId": tunnel_id,
            "clientAccessToken": token,
            "clientMode": "destination",
            "region": self.region,
            "services": services,
        });
        if let Some(o) = who.operator {
            payload["operator"] = serde_json::json!(o);
        }
        if let Some(r) = who.reason {
            payload["reason"] = serde_json::json!(r);
        }
        let payload = payload.to_string();
        let r = match &self.sink {
            Sink::Embedded(p) => p.publish(&topic, payload).await,
            Sink::External(client) => {
                let queued = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.publish(topic.clone(), QoS::AtLeastOnce, false, payload),
                );
                match queued.await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("MQTT client busy".into()),
                }
            }
        };
        match r {
            Ok(()) => info!(%thing, %topic, "device notified"),
            Err(e) => warn!(%thing, error = %e, "could not queue the device notification"),
        }
    }
}

/// Who opened a tunnel, and why, for the device's audit trail.
#[derive(Clone, Copy, Default)]
pub struct Identity<'a> {
    pub operator: Option<&'a str>,
    pub reason: Option<&'a str>,
}
