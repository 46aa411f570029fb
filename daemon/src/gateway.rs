//! The destination side: one relay session per tunnel, kept up with reconnects, each incoming
//! tunnel connection handed to [`forward::handle`] under the rules in force when it arrives. A
//! connection that is refused or whose target cannot be reached is reset alone; the tunnel and
//! every other connection carry on.

use std::sync::Arc;
use std::time::Duration;

use culvert_protocol::Mode;
use culvert_protocol::client::{self, Backoff, ConnectOptions, Endpoint};
use culvert_protocol::ext::Extensions;
use culvert_protocol::mux::Mux;
use culvert_protocol::session::{self, Incoming, SessionConfig, SessionHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::audit::EndReason;
use crate::forward;
use crate::metrics::Metrics;
use crate::rules::{Gateway, TunnelState, token_label};

/// Why a tunnel stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the relay refused the destination token (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    Fatal(String),
}

/// How this gateway reaches the relay: where it is, the TLS to speak (built, CA files read,
/// before privileges were dropped), and the proxy in between, if any.
#[derive(Clone)]
pub struct RelayLink {
    pub endpoint: Endpoint,
    pub tls: Arc<rustls::ClientConfig>,
    pub proxy: Option<culvert_protocol::proxy::Proxy>,
}

pub struct TunnelArgs {
    pub relay: RelayLink,
    pub access_token: culvert_protocol::Secret,
    pub client_token: Option<culvert_protocol::Secret>,
    /// The tunnel's id, when known (culvert-relay's notifications carry it), for the audit trail.
    pub tunnel_id: Option<String>,
    /// Who opened it and why, as the relay's notification said.
    pub identity: crate::rules::Identity,
    /// Tells a culvert relay where the tunnel stands with on-site approval.
    pub reporter: Option<crate::approval::Reporter>,
}

/// The relay's IP address as seen on this connection.
fn relay_ip(ws: &client::RelayStream) -> Option<std::net::IpAddr> {
    use tokio_tungstenite::MaybeTlsStream;
    let tcp = match ws.get_ref() {
        MaybeTlsStream::Plain(t) => t,
        MaybeTlsStream::Rustls(t) => t.get_ref().0,
        _ => return None,
    };
    tcp.peer_addr().ok().map(|a| a.ip().to_canonical())
}

/// Two-stage shutdown: `drain` stops new connections (and reconnects) and lets live ones finish;
/// `hard` ends everything (the grace period is over, or a second signal came).
#[derive(Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub hard: CancellationToken,
}

/// Serve one tunnel as its destination until shutdown or until the relay refuses the token
/// (tunnel closed, expired, or token rotated).
pub async fn run_tunnel(
    args: TunnelArgs,
    gw: Arc<Gateway>,
    shutdown: Shutdown,
) -> Result<(), TunnelError> {
    gw.metrics.tunnels.inc();
    let r = serve_tunnel(args, &gw, shutdown).await;
    gw.metrics.tunnels.dec();
    r
}

async fn serve_tunnel(
    args: TunnelArgs,
    gw: &Arc<Gateway>,
    shutdown: Shutdown,
) -> Result<(), TunnelError> {
    let label = args
        .tunnel_id
        .clone()
        .unwrap_or_else(|| token_label(args.access_token.expose()));
    let mut tunnel = TunnelState::new(label.clone());
    tunnel.identity = args.identity.clone();
    // Asked before the relay connection, so the operator sees "waiting" as soon as the gateway
    // is there. The asking (and its `.waiting` file) ends with this function.
    let _asking = gw.config().approval.clone().map(|settings| {
        let (rx, guard) = crate::approval::ask(
            gw.clone(),
            settings,
            label,
            args.identity.clone(),
            args.reporter.clone(),
        );
        tunnel.approval = Some(rx);
        guard
    });
    let tunnel = Arc::new(tunnel);
    let opts = ConnectOptions {
        endpoint: args.relay.endpoint.clone(),
        mode: Mode::Destination,
        access_token: args.access_token,
        client_token: Some(
            args.client_token
                .unwrap_or_else(|| culvert_protocol::new_client_token().into()),
        ),
        tls: args.relay.tls.clone(),
        // Resume offered only by an end that holds connections for it.
        extensions: Extensions {
            resume: gw.config().daemon.resume_hold.is_some(),
            ..Extensions::ALL
        },
        proxy: args.relay.proxy.clone(),
    };
    let conns = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut draining = false;
    let mut first = true;
    // A session whose WebSocket dropped, holding connections to resume on the next one.
    let mut held: Option<(SessionHandle, Incoming)> = None;
    let result = loop {
        if !first {
            gw.metrics.relay_reconnects.inc();
        }
        first = false;
        let c = match client::connect_retrying(&opts, &mut backoff, &shutdown.drain).await {
            Ok(Some(c)) => c,
            Ok(None) => break Ok(()),
            Err(client::ConnectError::Refused { status, message }) => {
                break Err(TunnelError::Refused { status, message });
            }
            Err(e) => break Err(TunnelError::Fatal(e.to_string())),
        };
        backoff.reset();
        *tunnel.relay_ip.lock().unwrap_or_else(|p| p.into_inner()) = relay_ip(&c.ws);
        let (handle, mut incoming) = match held.take() {
            Some((h, incoming)) if h.can_resume_with(c.extensions) => {
                let n = h.suspended_connections();
                if h.reattach(c.ws).is_err() {
                    continue;
                }
                info!(relay = %args.relay.endpoint, tunnel = %tunnel.label, connections = n, "reconnected to relay; resuming connections");
                (h, incoming)
            }
            other => {
                if let Some((h, _)) = other {
                    warn!(tunnel = %tunnel.label, connections = h.suspended_connections(), "the relay no longer resumes connections: they end");
                    h.close();
                }
                // A V1 stream names no service: it maps to the rule when there is exactly one.
                let names = gw.config().service_names();
                let mux = Mux::destination((names.len() == 1).then_some(names));
                let cfg = SessionConfig {
                    resume_hold: gw.config().daemon.resume_hold,
                    ..SessionConfig::default()
                }
                .for_relay(c.extensions);
                let (handle, incoming) = session::spawn(c.ws, mux, cfg);
                info!(relay = %args.relay.endpoint, subprotocol = ?c.format, extensions = ?c.extensions, tunnel = %tunnel.label, "connected to relay as destination");
                (handle, incoming)
            }
        };
        let ids_handle = handle.clone();
        let cfg = gw.config();
        tokio::spawn(async move {
            if let Ok(ids) = ids_handle.wait_service_ids().await {
                for id in ids.iter().filter(|id| !cfg.services.contains_key(*id)) {
                    warn!(service = %id, "the tunnel offers a service no rule maps; its connections will be refused");
                }
            }
        });
        let why = loop {
            tokio::select! {
                _ = shutdown.hard.cancelled() => {
                    handle.close();
                    break None;
                }
                _ = shutdown.drain.cancelled(), if !draining => {
                    draining = true;
                    conns.close();
                    info!(tunnel = %tunnel.label, open = tunnel.open_connections(), "draining: no new connections; waiting for the open ones to finish");
                }
                _ = conns.wait(), if draining => {
                    info!(tunnel = %tunnel.label, "drained; closing the tunnel session");
                    handle.close();
                    break None;
                }
                why = handle.link_down() => break Some(why),
                s = incoming.streams.recv() => match s {
                    Some(stream) if draining => {
                        info!(service = %stream.service(), "shutting down: new connection refused");
                        gw.metrics.refused.get_or_create(&Metrics::label("reason", EndReason::Shutdown.as_str())).inc();
                        // Not awaited here: a full write queue must not hold up the shutdown.
                        tokio::spawn(stream.reset());
                    }
                    Some(stream) => {
                        let span = info_span!("conn", tunnel = %tunnel.label, service = %stream.service(), conn = %stream.id());
                        conns.spawn(forward::handle(gw.clone(), tunnel.clone(), stream).instrument(span));
                    }
                    None => break Some(handle.link_down().await),
                },
            }
        };
        match why {
            None => break Ok(()),
            Some(why) if draining => {
                handle.close();
                info!(reason = %why, "relay session ended while draining; not reconnecting");
                break Ok(());
            }
            Some(why) if handle.ended().is_none() => {
                warn!(tunnel = %tunnel.label, reason = %why, connections = handle.suspended_connections(), "relay connection lost; reconnecting to resume the open connections");
                held = Some((handle, incoming));
            }
            Some(why) if why.is_relay_restart() => {
                info!(tunnel = %tunnel.label, "the relay is restarting; reconnecting");
            }
            Some(why) => warn!(reason = %why, "relay session ended; reconnecting"),
        }
    };
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
    result
}
