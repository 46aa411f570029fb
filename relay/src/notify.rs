//! Device notification: on open, and on every rotation that includes the destination, publish
//! the destination token to the thing's notify topic with QoS 1, in the AWS payload shape:
//! `{"clientAccessToken", "clientMode": "destination", "region", "services": [...]}` on
//! `$aws/things/<thing>/tunnels/notify` (the topic template is configurable).
//!
//! The relay is an MQTT client (rumqttc over TLS) of either the embedded broker or an external
//! one; the client reconnects by itself with exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use culvert_protocol::client::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How to reach the broker as the relay.
#[derive(Clone)]
pub struct BrokerClient {
    pub host: String,
    pub port: u16,
    /// `None`: plain TCP (only for the embedded broker's internal loopback port).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub username: String,
    pub password: String,
}

#[derive(Clone)]
pub struct Notifier {
    client: AsyncClient,
    topic_template: String,
    region: String,
    /// Publishing into the embedded broker, which stores `$` topics under another name.
    embedded: bool,
}

/// The notify topic of a thing.
pub fn topic_for(template: &str, thing: &str) -> String {
    template.replace("{thing}", thing)
}

impl Notifier {
    /// Start the MQTT client; its event loop runs until `shutdown`.
    pub fn start(
        b: BrokerClient,
        topic_template: String,
        region: String,
        embedded: bool,
        shutdown: CancellationToken,
    ) -> Notifier {
        let mut opts = MqttOptions::new(b.client_id.clone(), b.host.clone(), b.port);
        opts.set_credentials(b.username.clone(), b.password.clone())
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        if let Some(tls) = b.tls {
            opts.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
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
            client,
            topic_template,
            region,
            embedded,
        }
    }

    /// Queue the notification (QoS 1: the client retransmits until the broker acknowledges).
    /// `tunnelId` is a culvert addition AWS payloads do not carry (JSON readers ignore it):
    /// culvertd puts it in its audit trail, so the trail matches `culvert tunnel list`.
    pub async fn notify(&self, thing: &str, tunnel_id: &str, token: &str, services: &[String]) {
        let topic = topic_for(&self.topic_template, thing);
        let payload = serde_json::json!({
            "tunnelId": tunnel_id,
            "clientAccessToken": token,
            "clientMode": "destination",
            "region": self.region,
            "services": services,
        })
        .to_string();
        let wire_topic = if self.embedded {
            crate::broker::internal_topic(&topic)
        } else {
            topic.clone()
        };
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            self.client
                .publish(wire_topic, QoS::AtLeastOnce, false, payload),
        )
        .await;
        match r {
            Ok(Ok(())) => info!(%thing, %topic, "device notified"),
            Ok(Err(e)) => warn!(%thing, error = %e, "could not queue the device notification"),
            Err(_) => warn!(%thing, "could not queue the device notification: MQTT client busy"),
        }
    }
}
