//! The destination side: one relay session per tunnel, kept up with reconnects, each incoming
//! tunnel connection forwarded to its service's target. A target that cannot be reached resets
//! that one connection; the tunnel and every other connection carry on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use culvert_protocol::Mode;
use culvert_protocol::client::{self, Backoff, ConnectOptions, Endpoint};
use culvert_protocol::mux::Mux;
use culvert_protocol::session::{self, SessionConfig, TunnelStream};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{Config, Service, Target};

/// Why a tunnel stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the relay refused the destination token (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    Fatal(String),
}

pub struct TunnelArgs {
    pub endpoint: Endpoint,
    pub ca: Option<PathBuf>,
    pub access_token: String,
    pub client_token: Option<String>,
}

/// Serve one tunnel as its destination until `shutdown` or until the relay refuses the token
/// (tunnel closed, expired, or token rotated).
pub async fn run_tunnel(
    args: TunnelArgs,
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> Result<(), TunnelError> {
    let tls = client::tls_config(args.ca.as_deref()).map_err(TunnelError::Fatal)?;
    let opts = ConnectOptions {
        endpoint: args.endpoint.clone(),
        mode: Mode::Destination,
        access_token: args.access_token,
        client_token: Some(
            args.client_token
                .unwrap_or_else(culvert_protocol::new_client_token),
        ),
        tls,
    };
    let conns = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let result = loop {
        let (ws, format) = match client::connect_retrying(&opts, &mut backoff, &shutdown).await {
            Ok(Some(x)) => x,
            Ok(None) => break Ok(()),
            Err(client::ConnectError::Refused { status, message }) => {
                break Err(TunnelError::Refused { status, message });
            }
            Err(e) => break Err(TunnelError::Fatal(e.to_string())),
        };
        backoff.reset();
        let mux = Mux::destination(Some(config.service_names()));
        let (handle, mut incoming) = session::spawn(ws, mux, SessionConfig::default());
        info!(relay = %args.endpoint, subprotocol = ?format, "connected to relay as destination");
        let ids_handle = handle.clone();
        let cfg = config.clone();
        tokio::spawn(async move {
            if let Ok(ids) = ids_handle.wait_service_ids().await {
                for id in ids.iter().filter(|id| !cfg.services.contains_key(*id)) {
                    warn!(service = %id, "the tunnel offers a service no rule maps; its connections will be refused");
                }
            }
        });
        let why = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    handle.close();
                    break None;
                }
                why = handle.closed() => break Some(why),
                s = incoming.streams.recv() => match s {
                    Some(stream) => {
                        let Some(svc) = config.services.get(stream.service()).cloned() else {
                            warn!(service = stream.service(), "no rule for this service; refusing the connection");
                            stream.reset().await;
                            continue;
                        };
                        let span = info_span!("conn", service = %svc.name, conn = %stream.id());
                        conns.spawn(forward(stream, svc).instrument(span));
                    }
                    None => break Some(handle.closed().await),
                },
            }
        };
        match why {
            None => break Ok(()),
            Some(why) => warn!(reason = %why, "relay session ended; reconnecting"),
        }
    };
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
    result
}

/// Connect one tunnel connection to its target and carry bytes until either side ends.
async fn forward(stream: TunnelStream, svc: Service) {
    let started = std::time::Instant::now();
    let r = match &svc.target {
        Target::Tcp { host, port } => {
            match tokio::time::timeout(
                svc.connect_timeout,
                TcpStream::connect((host.as_str(), *port)),
            )
            .await
            {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    debug!(target = %svc.target, "connected");
                    Ok(session::splice(tcp, stream).await)
                }
                Ok(Err(e)) => Err((stream, e.to_string())),
                Err(_) => Err((
                    stream,
                    format!("no answer within {:?}", svc.connect_timeout),
                )),
            }
        }
        Target::Unix(path) => {
            match tokio::time::timeout(svc.connect_timeout, UnixStream::connect(path)).await {
                Ok(Ok(sock)) => Ok(session::splice(sock, stream).await),
                Ok(Err(e)) => Err((stream, e.to_string())),
                Err(_) => Err((
                    stream,
                    format!("no answer within {:?}", svc.connect_timeout),
                )),
            }
        }
    };
    match r {
        Ok(s) => debug!(
            target = %svc.target,
            sent = s.sent,
            received = s.received,
            peer_closed = s.peer_closed,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection ended"
        ),
        Err((stream, why)) => {
            warn!(target = %svc.target, error = %why, "cannot reach target; resetting this connection");
            stream.reset().await;
        }
    }
}
