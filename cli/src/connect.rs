//! `culvert connect`: the source-side local proxy.
//!
//! Listens on local ports mapped to the tunnel's services (`-s SSH=5555,HMI=8080`), carries each
//! accepted connection through the tunnel (many at once per service with the V3 format), and
//! keeps the relay session up: when it drops, reconnect with the same access token and client
//! token, with exponential backoff. The listeners stay bound across reconnects, so
//! `ssh -p 5555 localhost` keeps working once the relay is back. A 4xx from the relay (token
//! refused, tunnel closed or expired) ends the proxy with [`ConnectError::Refused`].
//!
//! Readiness: the ports are bound at once (a port in use is an error before anything else), but
//! "listening" is printed, and connections accepted, only once the relay has accepted the token
//! and named the tunnel's services. While the relay is unreachable, a new local connection is
//! closed at once rather than left hanging; during a reconnect that is still in its first
//! attempt (a relay restart), it waits for the new session.
//!
//! [`Local::Stdio`] carries one connection over stdin and stdout instead, for ssh's
//! `ProxyCommand` (`culvert ssh` uses it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use culvert_protocol::client::{self, Backoff, ConnectOptions, Endpoint};
use culvert_protocol::ext::Extensions;
use culvert_protocol::mux::Mux;
use culvert_protocol::session::{self, SessionConfig, SessionHandle};
use culvert_protocol::{Format, Mode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Most simultaneous local connections the proxy carries (the localproxy caps at 128).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most an accepted connection waits for a reconnect in progress before it is dropped.
const WAIT_FOR_SESSION: Duration = Duration::from_secs(20);
/// How long to wait for the relay's SERVICE_IDS after connecting.
const WAIT_FOR_SERVICE_IDS: Duration = Duration::from_secs(20);
/// How long the stdio mode tries to reach the relay before it gives up (ssh is waiting).
const STDIO_GIVE_UP: Duration = Duration::from_secs(30);

/// One `-s` mapping: a service (or none, the V1 single-service form) and a local port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub service: Option<String>,
    pub port: u16,
}

/// Parse `SSH=5555,HMI=8080` (or a bare `5555` for a one-service tunnel).
pub fn parse_mappings(s: &str) -> Result<Vec<Mapping>, String> {
    let mut out: Vec<Mapping> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (service, port) = match part.split_once('=') {
            Some((svc, port)) => {
                if !culvert_protocol::valid_name(svc) {
                    return Err(format!(
                        "{part:?}: service name {svc:?} must be 1-128 characters of A-Z a-z 0-9 : _ -"
                    ));
                }
                (Some(svc.to_owned()), port)
            }
            None => (None, part),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{part:?}: {port:?} is not a port number (0 picks a free one)"))?;
        if out.iter().any(|m| m.service == service) {
            return Err(format!("{part:?}: service mapped twice"));
        }
        out.push(Mapping { service, port });
    }
    if out.is_empty() {
        return Err("no service mapping given: use -s SERVICE=PORT[,SERVICE=PORT…]".into());
    }
    if out.len() > 1 && out.iter().any(|m| m.service.is_none()) {
        return Err("a bare port (no SERVICE=) is only valid as the only mapping".into());
    }
    Ok(out)
}

/// What the proxy carries on this machine.
pub enum Local {
    /// Listen on `bind`, a port per mapping, and carry every connection accepted there.
    Listen {
        mappings: Vec<Mapping>,
        bind: String,
    },
    /// Carry one connection to `service` over stdin and stdout, then end.
    Stdio { service: String },
}

pub struct ConnectArgs {
    pub endpoint: Endpoint,
    pub access_token: culvert_protocol::Secret,
    pub client_token: Option<String>,
    pub ca: Option<PathBuf>,
    pub local: Local,
    /// Message format to speak; by default the one the negotiated subprotocol implies.
    pub format: Option<Format>,
}

/// The relay session, as the local connections see it.
#[derive(Clone)]
enum Relay {
    Up(SessionHandle),
    /// The session ended and the first attempt to reconnect is under way: a relay restart
    /// usually ends here, so new connections wait for it.
    Reconnecting,
    /// An attempt to reconnect failed: new connections are closed at once.
    Unreachable,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The relay refused the token, or the tunnel is closed or expired.
    #[error("the relay refused the connection (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// The relay's certificate is not trusted (the CA is missing or wrong).
    #[error("{0}")]
    Untrusted(String),
    #[error("{0}")]
    Fatal(String),
}

/// Run the proxy until `shutdown` is cancelled or the relay refuses us.
pub async fn run(args: ConnectArgs, shutdown: CancellationToken) -> Result<(), ConnectError> {
    let tls = client::tls_config(args.ca.as_deref()).map_err(ConnectError::Fatal)?;
    let client_token = args
        .client_token
        .clone()
        .unwrap_or_else(culvert_protocol::new_client_token);
    if !culvert_protocol::valid_client_token(&client_token) {
        return Err(ConnectError::Fatal(
            "--client-token must be 32-128 characters of A-Z a-z 0-9 and -".into(),
        ));
    }
    let opts = ConnectOptions {
        endpoint: args.endpoint.clone(),
        mode: Mode::Source,
        access_token: args.access_token.clone(),
        client_token: Some(client_token.into()),
        tls,
        extensions: Extensions::ALL,
    };

    // Bind every listener first: a port that cannot be bound is a fatal, local error. They
    // accept nothing until the relay has taken the token.
    let mut listeners = Vec::new();
    if let Local::Listen { mappings, bind } = &args.local {
        for m in mappings {
            let listener = TcpListener::bind((bind.as_str(), m.port))
                .await
                .map_err(|e| {
                    ConnectError::Fatal(format!("cannot listen on {bind}:{}: {e}", m.port))
                })?;
            listeners.push((listener, m.service.clone()));
        }
    }
    let mut listeners = Some(listeners);
    let v1_service: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
    let (state_tx, state) = watch::channel(Relay::Reconnecting);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // The stdio mode gives up after a while: ssh is waiting for its banner.
    let give_up = shutdown.child_token();
    if matches!(args.local, Local::Stdio { .. }) {
        let give_up = give_up.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STDIO_GIVE_UP).await;
            give_up.cancel();
        });
    }

    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut first = true;
    loop {
        let c = match reconnect(&opts, &mut backoff, &give_up, &state_tx).await? {
            Some(c) => c,
            None if shutdown.is_cancelled() => return Ok(()),
            None => {
                return Err(ConnectError::Fatal(format!(
                    "could not reach the relay at {} within {STDIO_GIVE_UP:?}",
                    args.endpoint
                )));
            }
        };
        let format = args.format.map_or(c.format, |f| f.min(c.format));
        let cfg = SessionConfig::default().for_relay(c.extensions);
        let (handle, _incoming) = session::spawn(c.ws, Mux::source(format), cfg);
        let ids = match tokio::time::timeout(WAIT_FOR_SERVICE_IDS, handle.wait_service_ids()).await
        {
            Ok(Ok(ids)) => ids,
            Ok(Err(_)) | Err(_) => {
                let why = handle
                    .ended()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no SERVICE_IDS from the relay".into());
                handle.close();
                state_tx.send_replace(Relay::Unreachable);
                let delay = backoff.next_delay();
                warn!(reason = %why, retry_in = ?delay, "relay session failed to start");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let mappings = match &args.local {
            Local::Listen { mappings, .. } => mappings.clone(),
            Local::Stdio { service } => vec![Mapping {
                service: Some(service.clone()),
                port: 0,
            }],
        };
        check_mappings(&mappings, &ids, &v1_service)?;
        if let Local::Stdio { service } = &args.local {
            debug!(relay = %args.endpoint, %service, ?format, "connected to relay");
            return carry_stdio(&handle, service).await;
        }
        if first {
            info!(relay = %args.endpoint, services = ?ids, ?format, "connected to relay");
            first = false;
        } else {
            info!(relay = %args.endpoint, "reconnected to relay");
        }
        backoff.reset();
        state_tx.send_replace(Relay::Up(handle.clone()));
        // Ready: the relay took the token and the services are there.
        for (listener, service) in listeners.take().into_iter().flatten() {
            let addr = listener
                .local_addr()
                .map_err(|e| ConnectError::Fatal(e.to_string()))?;
            let name = service
                .clone()
                .unwrap_or_else(|| "(the tunnel's service)".into());
            println!("culvert: service {name} listening on {addr}");
            tokio::spawn(accept_loop(
                listener,
                service,
                v1_service.clone(),
                state.clone(),
                limit.clone(),
                shutdown.clone(),
            ));
        }
        let why = tokio::select! {
            _ = shutdown.cancelled() => {
                handle.close();
                return Ok(());
            }
            why = handle.closed() => why,
        };
        state_tx.send_replace(Relay::Reconnecting);
        if why.is_relay_restart() {
            info!("the relay is restarting; reconnecting");
        } else {
            warn!(reason = %why, "relay session ended; reconnecting");
        }
    }
}

/// Connect to the relay: one attempt, then (once it failed, and local connections are told
/// the relay is unreachable) retries with backoff. `None` when `stop` was cancelled.
async fn reconnect(
    opts: &ConnectOptions,
    backoff: &mut Backoff,
    stop: &CancellationToken,
    state: &watch::Sender<Relay>,
) -> Result<Option<client::Connected>, ConnectError> {
    // An operator at a terminal is told of an untrusted certificate at once: retrying cannot
    // fix it.
    let untrusted = |e: &client::ConnectError| matches!(e, client::ConnectError::Untrusted { .. });
    let first = tokio::select! {
        _ = stop.cancelled() => return Ok(None),
        r = client::connect(opts) => r,
    };
    let r = match first {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.is_retryable() && !untrusted(&e) => {
            state.send_replace(Relay::Unreachable);
            let delay = backoff.next_delay();
            warn!(error = %e, retry_in = ?delay, "cannot connect to relay");
            tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
            client::connect_retrying_until(opts, backoff, stop, untrusted).await
        }
        Err(e) => Err(e),
    };
    r.map_err(|e| match e {
        client::ConnectError::Refused { status, message } => {
            ConnectError::Refused { status, message }
        }
        e @ client::ConnectError::Untrusted { .. } => ConnectError::Untrusted(e.to_string()),
        e => ConnectError::Fatal(e.to_string()),
    })
}

/// The stdio mode: one connection to `service`, spliced to stdin and stdout.
async fn carry_stdio(handle: &SessionHandle, service: &str) -> Result<(), ConnectError> {
    let stream = handle
        .open(service)
        .await
        .map_err(|e| ConnectError::Fatal(format!("cannot open a connection to {service}: {e}")))?;
    let id = stream.id();
    let r = session::splice(
        tokio::io::join(tokio::io::stdin(), tokio::io::stdout()),
        stream,
    )
    .await;
    debug!(%service, conn = %id, sent = r.sent, received = r.received, peer_closed = r.peer_closed, "connection closed");
    handle.close();
    Ok(())
}

/// Every mapped service must exist in the tunnel (the localproxy refuses to run otherwise).
fn check_mappings(
    mappings: &[Mapping],
    ids: &[String],
    v1_service: &OnceLock<String>,
) -> Result<(), ConnectError> {
    for m in mappings {
        match &m.service {
            Some(s) if !ids.contains(s) => {
                return Err(ConnectError::Fatal(format!(
                    "service {s:?} is not in this tunnel; its services are: {}",
                    ids.join(", ")
                )));
            }
            Some(_) => {}
            None if ids.len() == 1 => {
                let _ = v1_service.set(ids[0].clone());
            }
            None => {
                return Err(ConnectError::Fatal(format!(
                    "a bare port needs a one-service tunnel; this one has {}: map each, e.g. -s {}",
                    ids.join(", "),
                    ids.iter()
                        .enumerate()
                        .map(|(i, s)| format!("{s}={}", 5555 + i))
                        .collect::<Vec<_>>()
                        .join(",")
                )));
            }
        }
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    service: Option<String>,
    v1_service: Arc<OnceLock<String>>,
    current: watch::Receiver<Relay>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, max = MAX_CONNECTIONS, "too many connections; refusing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let v1 = v1_service.clone();
        let current = current.clone();
        tokio::spawn(async move {
            carry(tcp, peer, service, v1, current).await;
            drop(permit);
        });
    }
}

async fn carry(
    tcp: TcpStream,
    peer: SocketAddr,
    service: Option<String>,
    v1: Arc<OnceLock<String>>,
    mut current: watch::Receiver<Relay>,
) {
    // A live session, a reconnect to wait for, or an unreachable relay.
    let settled = |r: &Relay| match r {
        Relay::Up(h) => h.ended().is_none(),
        Relay::Reconnecting => false,
        Relay::Unreachable => true,
    };
    let started = Instant::now();
    let state = match tokio::time::timeout(WAIT_FOR_SESSION, current.wait_for(settled)).await {
        Ok(Ok(r)) => r.clone(),
        _ => Relay::Reconnecting,
    };
    let handle = match state {
        Relay::Up(h) => h,
        Relay::Unreachable => {
            warn!(%peer, "the relay is unreachable (culvert connect keeps retrying); connection closed");
            return;
        }
        Relay::Reconnecting => {
            warn!(%peer, waited = ?started.elapsed(), "no relay session yet (culvert connect keeps retrying); connection closed");
            return;
        }
    };
    let Some(service) = service.or_else(|| v1.get().cloned()) else {
        return;
    };
    let stream = match handle.open(&service).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, %service, error = %e, "cannot open tunnel connection");
            return;
        }
    };
    let id = stream.id();
    debug!(%peer, %service, conn = %id, "connection opened");
    let r = session::splice(tcp, stream).await;
    debug!(%peer, %service, conn = %id, sent = r.sent, received = r.received, peer_closed = r.peer_closed, "connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings() {
        assert_eq!(
            parse_mappings("SSH=5555,HMI=0").unwrap(),
            vec![
                Mapping {
                    service: Some("SSH".into()),
                    port: 5555
                },
                Mapping {
                    service: Some("HMI".into()),
                    port: 0
                }
            ]
        );
        assert_eq!(parse_mappings("5555").unwrap()[0].service, None);
        assert!(parse_mappings("SSH=x").unwrap_err().contains("not a port"));
        assert!(parse_mappings("SSH=1,SSH=2").unwrap_err().contains("twice"));
        assert!(
            parse_mappings("5555,HMI=1")
                .unwrap_err()
                .contains("only mapping")
        );
        assert!(parse_mappings("bad name=1").is_err());
    }
}
