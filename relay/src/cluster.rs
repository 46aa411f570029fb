//! culvert-relay as a cluster: several nodes on one PostgreSQL store behind a load balancer,
//! so that a tunnel's two ends may land on different nodes.
//!
//! Each tunnel is *held* by one node at a time: the one where its first side attached. The
//! store records, for every side, the node it is attached on, as a lease the node renews
//! every [`RENEW`] ([`PostgresStore::heartbeat`]); a node that dies stops renewing and its
//! leases run out after [`LEASE`]. A peer that arrives at another node is admitted there
//! (its token is checked and spent in the store, exactly as on one relay), and that node then
//! opens a *node link* to the holder: a WebSocket over mutually authenticated TLS (the
//! cluster's own CA), on which the holder runs the peer as if it had connected directly. The
//! frames pass both hops verbatim, so culvert's flow control and resume stay end to end and an
//! AWS peer sees AWS's protocol. A close or rotation on any node reaches the holder through
//! PostgreSQL's LISTEN/NOTIFY ([`PostgresStore::listen`]), and the holder's close frame
//! reaches the peer through the link.
//!
//! A draining node (SIGTERM) gives its leases up first, then disconnects its peers as a
//! restarting relay does: they reconnect through the load balancer and are placed on the
//! nodes that remain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use culvert_protocol::ext::Extensions;
use culvert_protocol::{Format, Mode};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as LinkMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as LinkCloseFrame;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{pem_certs, pem_key};
use crate::dataplane::is_too_big;
use crate::registry::{Kick, KickReason, Registry, now_ms};
use crate::store::{Placement, PostgresStore, StoreError};

/// How long a lease lasts without renewal: a node that died is forgotten this long after.
pub const LEASE: Duration = Duration::from_secs(10);

/// How often a node renews its leases.
pub const RENEW: Duration = Duration::from_secs(2);

/// Time allowed to open a node link (TCP, TLS and the WebSocket handshake).
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// A node link that carries nothing for this long is pinged (the holder drops a peer that is
/// silent for 90 s).
const LINK_PING: Duration = Duration::from_secs(20);

/// A forwarded peer that sends nothing at all for this long is dropped, as on the holder.
const PEER_IDLE: Duration = Duration::from_secs(90);

/// The node link's path on the holder.
pub const LINK_PATH: &str = "/node/v1/peer";

/// `[cluster]` of the configuration file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// This node's name, unique in the cluster: lower-case letters, digits and `-`. Its
    /// certificate must be issued for it (subjectAltName DNS:<node>).
    pub node: String,
    /// Where this node accepts node links from the others (mTLS).
    pub listen: String,
    /// host:port the other nodes reach that listener at (default: `listen`, which must then
    /// be a specific address).
    #[serde(default)]
    pub advertise: Option<String>,
    /// The cluster CA (PEM): node certificates are issued by it, and only by it.
    pub ca: PathBuf,
    /// This node's certificate chain and key (PEM), for both ends of node links.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated `[cluster]` settings.
#[derive(Clone)]
pub struct ClusterSettings {
    pub node: String,
    pub listen: SocketAddr,
    pub advertise: String,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub client_tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("node", &self.node)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

/// A node name: a DNS label (it is the name node certificates are checked against).
pub fn valid_node_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl RawCluster {
    pub fn validate(self, resolve: impl Fn(&Path) -> PathBuf) -> Result<ClusterSettings, String> {
        if !valid_node_name(&self.node) {
            return Err(format!(
                "cluster.node: {:?} is not a node name: 1-63 lower-case letters, digits and '-' (the name its certificate is issued for)",
                self.node
            ));
        }
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "cluster.listen: {:?} is not an address:port such as \"0.0.0.0:8444\"",
                self.listen
            )
        })?;
        let advertise = match self.advertise {
            Some(a) => {
                let ok = a
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    return Err(format!(
                        "cluster.advertise: {a:?} is not host:port (how the other nodes reach cluster.listen)"
                    ));
                }
                a
            }
            None if listen.ip().is_unspecified() || listen.port() == 0 => {
                return Err(format!(
                    "cluster.advertise is needed: the other nodes cannot reach {listen}; give the host:port they dial"
                ));
            }
            None => listen.to_string(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs("cluster.ca", &resolve(&self.ca))? {
            roots
                .add(c)
                .map_err(|e| format!("cluster.ca: not a usable CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        let certs = pem_certs("cluster.cert", &resolve(&self.cert))?;
        let key = pem_key("cluster.key", &resolve(&self.key))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("cluster.ca: {e}"))?;
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("cluster: certificate and key do not fit together: {e}"))?;
        server_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("cluster: certificate and key do not fit together: {e}"))?;
        Ok(ClusterSettings {
            node: self.node,
            listen,
            advertise,
            server_tls: Arc::new(server_tls),
            client_tls: Arc::new(client_tls),
        })
    }
}

/// What a node link asks the holder for: run this peer, admitted by the calling node.
#[derive(Clone, Debug, serde::Serialize, Deserialize)]
pub struct LinkRequest {
    pub tunnel: String,
    pub mode: String,
    /// The side's generation the peer was admitted under.
    pub generation: u64,
    /// The extensions negotiated with the peer (`Extensions::header_value`), empty for none.
    #[serde(default)]
    pub extensions: String,
    /// The peer's subprotocol.
    pub subprotocol: String,
    /// The calling node, and the peer's channel id there (for the logs).
    pub from: String,
    pub channel: String,
}

/// A node link, as the calling node holds it.
pub type Link = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// This node's part in the cluster.
pub struct Cluster {
    pub node: String,
    advertise: String,
    client_tls: Arc<rustls::ClientConfig>,
    store: Arc<PostgresStore>,
    /// Peers connected here and forwarded to another node, to disconnect when draining.
    forwarded: Mutex<HashMap<u64, Kick>>,
    next: AtomicU64,
}

impl Cluster {
    pub fn new(settings: &ClusterSettings, store: Arc<PostgresStore>) -> Cluster {
        Cluster {
            node: settings.node.clone(),
            advertise: settings.advertise.clone(),
            client_tls: settings.client_tls.clone(),
            store,
            forwarded: Mutex::default(),
            next: AtomicU64::new(1),
        }
    }

    fn lease_until(now: i64) -> i64 {
        now + LEASE.as_millis() as i64
    }

    /// Where side `mode` of `tunnel` attaches (see [`PostgresStore::place`]).
    pub async fn place(&self, tunnel: &str, mode: Mode) -> Result<Placement, StoreError> {
        let now = now_ms();
        self.store
            .place(tunnel, mode, &self.node, now, Cluster::lease_until(now))
            .await
    }

    /// Side `mode` of `tunnel` is no longer attached here (in the background: the lease
    /// runs out anyway if this fails).
    pub fn unplace(self: &Arc<Self>, tunnel: &str, mode: Mode) {
        let (me, tunnel) = (self.clone(), tunnel.to_owned());
        tokio::spawn(async move {
            if let Err(e) = me.store.unplace(&tunnel, mode, &me.node).await {
                warn!(tunnel = %tunnel, %mode, error = %e, "could not give up a side's lease");
            }
        });
    }

    /// Renew this node's leases, and give up the tunnels another node took first.
    pub async fn heartbeat(&self, registry: &Registry) {
        let now = now_ms();
        let sides = registry.attached_sides();
        match self
            .store
            .heartbeat(
                &self.node,
                &self.advertise,
                sides,
                now,
                Cluster::lease_until(now),
            )
            .await
        {
            Ok(losers) => {
                for id in losers {
                    warn!(tunnel = %id, "another node holds this tunnel too, and took it first: its peers here reconnect");
                    registry.kick_tunnel(&id, KickReason::Restart);
                }
            }
            Err(e) => warn!(error = %e, "could not renew this node's leases"),
        }
    }

    /// Leave the cluster: the leases end now, so that reconnecting peers go to other nodes.
    pub async fn leave(&self) {
        match self.store.leave(&self.node).await {
            Ok(()) => {
                info!(node = %self.node, "left the cluster: other nodes take this node's tunnels")
            }
            Err(e) => {
                warn!(error = %e, "could not give up this node's leases; they run out in {LEASE:?}")
            }
        }
    }

    /// Open a node link to `node` at `addr` for a peer admitted here.
    pub async fn dial(&self, node: &str, addr: &str, req: &LinkRequest) -> Result<Link, String> {
        let query = serde_urlencoded::to_string(req).map_err(|e| e.to_string())?;
        // The URL names the node (its certificate is checked against that name); the
        // connection goes to its address.
        let request = format!("wss://{node}{LINK_PATH}?{query}")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot reach {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            tokio_tungstenite::client_async_tls_with_config(
                request,
                tcp,
                Some(culvert_protocol::client::ws_config()),
                Some(Connector::Rustls(self.client_tls.clone())),
            )
            .await
            .map(|(ws, _)| ws)
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => format!(
                    "{} {}",
                    r.status(),
                    String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
                ),
                e => e.to_string(),
            })
        };
        tokio::time::timeout(LINK_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {LINK_TIMEOUT:?}")))
    }

    /// Carry `peer`'s WebSocket to the holder over `link` until either ends, or this node
    /// disconnects the peer (draining). Messages pass verbatim both ways; a close frame from
    /// the holder reaches the peer as it was sent.
    pub async fn forward(self: Arc<Self>, peer: WebSocket, link: Link, extensions: Extensions) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let kick = Kick::default();
        self.lock().insert(id, kick.clone());
        let (mut psink, mut pstream) = peer.split();
        let (mut lsink, mut lstream) = link.split();
        let done = CancellationToken::new();
        let up = async {
            let mut ping = tokio::time::interval(LINK_PING);
            ping.tick().await;
            // Anything from the peer (its pings included) counts; the link's pings do not.
            let mut heard = tokio::time::Instant::now();
            loop {
                let m = tokio::select! {
                    biased;
                    _ = done.cancelled() => break,
                    _ = tokio::time::sleep_until(heard + PEER_IDLE) => {
                        info!("forwarded peer silent for {PEER_IDLE:?}; dropping it");
                        break;
                    }
                    _ = ping.tick() => LinkMessage::Ping(Default::default()),
                    m = pstream.next() => {
                        heard = tokio::time::Instant::now();
                        match m {
                            None => break,
                            Some(Err(e)) => {
                                if is_too_big(&e) {
                                    kick.kick(KickReason::TooBig);
                                }
                                break;
                            }
                            Some(Ok(WsMessage::Binary(b))) => LinkMessage::Binary(b),
                            Some(Ok(WsMessage::Text(t))) => LinkMessage::Text(t.as_str().into()),
                            Some(Ok(WsMessage::Close(f))) => {
                                let f = f.map(|f| LinkCloseFrame { code: f.code.into(), reason: f.reason.as_str().into() });
                                let _ = tokio::time::timeout(LINK_TIMEOUT, lsink.send(LinkMessage::Close(f))).await;
                                break;
                            }
                            Some(Ok(_)) => continue,
                        }
                    }
                };
                tokio::select! {
                    biased;
                    _ = done.cancelled() => break,
                    r = lsink.send(m) => if r.is_err() { break },
                }
            }
            done.cancel();
            let _ = tokio::time::timeout(LINK_TIMEOUT, lsink.close()).await;
        };
        let down = async {
            loop {
                let m = tokio::select! {
                    biased;
                    reason = kick.kicked() => {
                        if let Some((code, reason)) = reason.close_frame(extensions) {
                            let close = WsMessage::Close(Some(CloseFrame { code, reason: reason.into() }));
                            let _ = tokio::time::timeout(LINK_TIMEOUT, psink.send(close)).await;
                        }
                        break;
                    }
                    _ = done.cancelled() => break,
                    m = lstream.next() => match m {
                        None | Some(Err(_)) => break,
                        Some(Ok(LinkMessage::Binary(b))) => WsMessage::Binary(b),
                        Some(Ok(LinkMessage::Text(t))) => WsMessage::Text(t.as_str().into()),
                        Some(Ok(LinkMessage::Close(f))) => {
                            // The holder's close frame, as it sent it: the peer's final word.
                            let f = f.map(|f| CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() });
                            let _ = tokio::time::timeout(LINK_TIMEOUT, psink.send(WsMessage::Close(f))).await;
                            break;
                        }
                        Some(Ok(_)) => continue,
                    },
                };
                tokio::select! {
                    biased;
                    _ = kick.kicked() => {}
                    _ = done.cancelled() => break,
                    r = psink.send(m) => if r.is_err() { break },
                }
            }
            done.cancel();
        };
        tokio::join!(up, down);
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Kick>> {
        self.forwarded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Disconnect every forwarded peer (draining).
    pub fn kick_forwarded(&self, reason: KickReason) {
        for k in self.lock().values() {
            k.kick(reason.clone());
        }
    }

    /// Forwarded peers connected here now.
    pub fn forwarded_count(&self) -> usize {
        self.lock().len()
    }
}

/// The format a link request's subprotocol names.
pub fn link_format(req: &LinkRequest) -> Option<Format> {
    Format::from_subprotocol(&req.subprotocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels() {
        for ok in ["relay-a", "r1", "eu-west-1-node-3"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Relay", "a.b", "a_b", &"x".repeat(64)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_link_request_survives_its_query_string() {
        let req = LinkRequest {
            tunnel: "t-1".into(),
            mode: "source".into(),
            generation: 3,
            extensions: "flow/1, resume/1".into(),
            subprotocol: "aws.iot.securetunneling-3.0".into(),
            from: "relay-b".into(),
            channel: "c&d=e".into(),
        };
        let q = serde_urlencoded::to_string(&req).unwrap();
        let back: LinkRequest =
            axum::extract::Query::try_from_uri(&format!("/x?{q}").parse().unwrap())
                .unwrap()
                .0;
        assert_eq!(back.channel, "c&d=e");
        assert_eq!(back.extensions, "flow/1, resume/1");
        assert_eq!(back.generation, 3);
    }
}
