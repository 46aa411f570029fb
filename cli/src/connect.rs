//! `culvert connect`: the source-side local proxy.
//!
//! Listens on local ports mapped to the tunnel's services (`-s SSH=5555,HMI=8080`), carries each
//! accepted connection through the tunnel (many at once per service with the V3 format; a
//! `udp:PORT` mapping carries UDP flows instead, [`crate::udp`]), and
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
//! `ProxyCommand` (`culvert ssh` uses it). [`Local::Destination`] is the localproxy's
//! destination mode (`-d SSH=127.0.0.1:22`): connections from the tunnel go to the mapped
//! addresses, with no rules, ACL or audit; on a gateway, culvertd is the program for that.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use culvert_protocol::client::{self, Backoff, ConnectOptions, Endpoint};
use culvert_protocol::ext::Extensions;
use culvert_protocol::mux::Mux;
use culvert_protocol::session::{self, SessionConfig, SessionHandle};
use culvert_protocol::{Format, Mode};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
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
/// How long a new session waits for flow control to come on before the first connections.
const FLOW_CONTROL_WAIT: Duration = Duration::from_secs(2);

/// One `-s` mapping: a service (or none, the V1 single-service form) and a local port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub service: Option<String>,
    pub port: u16,
    /// A UDP port (`udp:PORT`), for a gateway rule with a udp target.
    pub udp: bool,
}

/// Parse `SSH=5555,HMI=8080,DNS=udp:5353` (or a bare `5555` for a one-service tunnel).
pub fn parse_mappings(s: &str) -> Result<Vec<Mapping>, String> {
    let usage = "-s SERVICE=PORT[,SERVICE=PORT…] (udp:PORT for a UDP service)";
    let pairs = service_pairs(s, "port", usage, |v| {
        let (udp, port) = match v.strip_prefix("udp:") {
            Some(p) => (true, p),
            None => (false, v),
        };
        let port = port.parse::<u16>().map_err(|_| {
            format!("{port:?} is not a port number (0 picks a free one; udp:PORT for UDP)")
        })?;
        Ok((udp, port))
    })?;
    Ok(pairs
        .into_iter()
        .map(|(service, (udp, port))| Mapping { service, port, udp })
        .collect())
}

/// The form `-s` and `-d` share: `SERVICE=VALUE[,SERVICE=VALUE…]`, or one bare `VALUE` for a
/// one-service tunnel; each service once. `what` names the value and `usage` the option's form,
/// in messages.
fn service_pairs<T>(
    s: &str,
    what: &str,
    usage: &str,
    value: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<(Option<String>, T)>, String> {
    let mut out: Vec<(Option<String>, T)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (service, v) = match part.split_once('=') {
            Some((svc, v)) => {
                if !culvert_protocol::valid_name(svc) {
                    return Err(format!(
                        "{part:?}: service name {svc:?} must be 1-128 characters of A-Z a-z 0-9 : _ -"
                    ));
                }
                (Some(svc.to_owned()), v)
            }
            None => (None, part),
        };
        let v = value(v).map_err(|e| format!("{part:?}: {e}"))?;
        if out.iter().any(|(s, _)| *s == service) {
            return Err(format!("{part:?}: service mapped twice"));
        }
        out.push((service, v));
    }
    if out.is_empty() {
        return Err(format!("no mapping given: use {usage}"));
    }
    if out.len() > 1 && out.iter().any(|(s, _)| s.is_none()) {
        return Err(format!(
            "a bare {what} (no SERVICE=) is only valid as the only mapping"
        ));
    }
    Ok(out)
}

/// Where the relay is, from what the user gave: `-e` or `--relay` typed on the command line,
/// `-r`, and `CULVERT_RELAY` from the environment. What was typed wins over the environment (a
/// sourced `client.env` does not stand in the way of `-r`); a relay and a region typed together
/// are an error, as the localproxy's `-e` and `-r` are exclusive.
pub fn endpoint(
    typed_relay: Option<&str>,
    proxy_endpoint: Option<&str>,
    region: Option<&str>,
    env_relay: Option<&str>,
) -> Result<Endpoint, String> {
    if let (Some(a), Some(b)) = (typed_relay, proxy_endpoint)
        && a != b
    {
        return Err(format!(
            "--relay {a} and -e {b} name different relays: give one"
        ));
    }
    match (proxy_endpoint.or(typed_relay), region) {
        (Some(relay), Some(region)) => Err(format!(
            "-r {region} (AWS's endpoint) and -e/--relay {relay} name different relays: give one"
        )),
        (Some(relay), None) => Endpoint::parse(relay),
        (None, Some(region)) => Ok(Endpoint::aws_region(region)),
        (None, None) => match env_relay {
            Some(relay) => Endpoint::parse(relay),
            None => Err(
                "no relay given: pass -e HOST:PORT (or --relay), -r REGION for AWS, or set \
                 CULVERT_RELAY"
                    .into(),
            ),
        },
    }
}

/// The tracing filter for the localproxy's `-v LEVEL`.
pub fn log_filter(verbose: u8) -> &'static str {
    match verbose {
        0 => "off",
        1 | 2 => "error",
        3 => "warn",
        4 => "info",
        5 => "debug",
        _ => "trace",
    }
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
    /// The destination side: carry each connection from the tunnel to its service's address.
    Destination { targets: Vec<Target> },
}

/// One `-d` mapping: a service (or none, for a one-service tunnel) and the address it reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: Option<String>,
    pub addr: String,
}

/// Parse the localproxy's `-d`: `SSH=127.0.0.1:22,HMI=80`, or a bare `host:port` or `port`
/// for a one-service tunnel; a bare port is on localhost.
pub fn parse_targets(s: &str) -> Result<Vec<Target>, String> {
    let usage = "-d SERVICE=HOST:PORT[,SERVICE=HOST:PORT…]";
    let pairs = service_pairs(s, "address", usage, |addr| {
        if addr.parse::<u16>().is_ok() {
            return Ok(format!("localhost:{addr}"));
        }
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(addr.to_owned())
            }
            _ => Err(format!("{addr:?} is not HOST:PORT or PORT")),
        }
    })?;
    Ok(pairs
        .into_iter()
        .map(|(service, addr)| Target { service, addr })
        .collect())
}

pub struct ConnectArgs {
    pub endpoint: Endpoint,
    /// The proxy to reach the relay through, if any.
    pub proxy: Option<culvert_protocol::proxy::Proxy>,
    pub access_token: culvert_protocol::Secret,
    pub client_token: Option<String>,
    pub ca: Option<PathBuf>,
    pub local: Local,
    /// Message format to speak; by default the one the negotiated subprotocol implies.
    pub format: Option<Format>,
    /// How long open connections wait for a dropped tunnel to come back (`None`: they end
    /// with it).
    pub resume_hold: Option<Duration>,
    /// A UDP flow that carried no datagram either way for this long ends.
    pub udp_idle: Duration,
}

/// How long a UDP flow lives without a datagram by default: as long as culvertd keeps one.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);

/// The relay session, as the local connections see it.
#[derive(Clone)]
pub(crate) enum Relay {
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

impl ConnectArgs {
    /// Where the relay is, and through which proxy, for messages.
    fn relay_shown(&self) -> String {
        match &self.proxy {
            Some(p) => format!("{} (through {p})", self.endpoint),
            None => self.endpoint.to_string(),
        }
    }
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
        mode: if matches!(args.local, Local::Destination { .. }) {
            Mode::Destination
        } else {
            Mode::Source
        },
        access_token: args.access_token.clone(),
        client_token: Some(client_token.into()),
        tls,
        // Resume offered only by an end that holds connections for it.
        extensions: Extensions {
            resume: args.resume_hold.is_some(),
            ..Extensions::ALL
        },
        proxy: args.proxy.clone(),
    };

    if let Local::Destination { targets } = &args.local {
        return serve_destination(&args.endpoint, &opts, targets, args.resume_hold, shutdown).await;
    }
    // Bind every listener first: a port that cannot be bound is a fatal, local error. They
    // accept nothing until the relay has taken the token.
    let mut listeners = Vec::new();
    if let Local::Listen { mappings, bind } = &args.local {
        for m in mappings {
            let cannot = |e: std::io::Error| {
                let udp = if m.udp { "udp " } else { "" };
                ConnectError::Fatal(format!("cannot listen on {udp}{bind}:{}: {e}", m.port))
            };
            let listener = if m.udp {
                Listener::Udp(
                    UdpSocket::bind((bind.as_str(), m.port))
                        .await
                        .map_err(cannot)?,
                )
            } else {
                Listener::Tcp(
                    TcpListener::bind((bind.as_str(), m.port))
                        .await
                        .map_err(cannot)?,
                )
            };
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
    // A session whose WebSocket dropped, holding connections to resume on the next one.
    let mut held: Option<SessionHandle> = None;
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
        // The relay took the token: connections that arrive while the session starts (or
        // resumes) wait for it, rather than being told the relay is unreachable.
        state_tx.send_if_modified(|s| {
            let unreachable = matches!(s, Relay::Unreachable);
            if unreachable {
                *s = Relay::Reconnecting;
            }
            unreachable
        });
        match held.take() {
            Some(h) if h.can_resume_with(c.extensions) => {
                let n = h.suspended_connections();
                if h.reattach(c.ws).is_ok() {
                    info!(relay = %args.endpoint, connections = n, "reconnected to relay; resuming connections");
                    backoff.reset();
                    // New connections after the resumes (and with flow control, if the other
                    // end is back).
                    h.wait_flow_control(FLOW_CONTROL_WAIT).await;
                    state_tx.send_replace(Relay::Up(h.clone()));
                    match wait_for_link_down(&h, &shutdown).await {
                        Some(true) => held = Some(h),
                        Some(false) => {}
                        None => return Ok(()),
                    }
                    state_tx.send_replace(Relay::Reconnecting);
                }
                continue;
            }
            Some(h) => {
                warn!(
                    connections = h.suspended_connections(),
                    "the relay no longer resumes connections: they end"
                );
                h.close();
            }
            None => {}
        }
        let format = args.format.map_or(c.format, |f| f.min(c.format));
        let cfg = session_config(args.resume_hold).for_relay(c.extensions);
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
                udp: false,
            }],
            Local::Destination { .. } => unreachable!("served above"),
        };
        check_mappings(&mappings, &ids, &v1_service)?;
        if c.extensions.flow_control {
            // Connections opened before flow control is on can be neither half-closed nor
            // resumed: give the other end one round trip to answer, if it is there.
            handle.wait_flow_control(FLOW_CONTROL_WAIT).await;
        }
        if let Local::Stdio { service } = &args.local {
            debug!(relay = %args.endpoint, %service, ?format, "connected to relay");
            return carry_stdio(&handle, service, &opts, &mut backoff, &shutdown, &state_tx).await;
        }
        if first {
            info!(relay = %args.relay_shown(), services = ?ids, ?format, "connected to relay");
            first = false;
        } else {
            info!(relay = %args.endpoint, "reconnected to relay");
        }
        backoff.reset();
        state_tx.send_replace(Relay::Up(handle.clone()));
        // Ready: the relay took the token and the services are there.
        for (listener, service) in listeners.take().into_iter().flatten() {
            let name = service
                .clone()
                .unwrap_or_else(|| "(the tunnel's service)".into());
            let local_addr =
                |a: std::io::Result<SocketAddr>| a.map_err(|e| ConnectError::Fatal(e.to_string()));
            match listener {
                Listener::Tcp(listener) => {
                    let addr = local_addr(listener.local_addr())?;
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
                Listener::Udp(socket) => {
                    let addr = local_addr(socket.local_addr())?;
                    println!("culvert: service {name} listening on udp {addr}");
                    let port = crate::udp::Port {
                        socket: Arc::new(socket),
                        service,
                        v1_service: v1_service.clone(),
                        current: state.clone(),
                        limit: limit.clone(),
                        idle: args.udp_idle,
                    };
                    tokio::spawn(crate::udp::serve(port, shutdown.clone()));
                }
            }
        }
        match wait_for_link_down(&handle, &shutdown).await {
            Some(true) => held = Some(handle),
            Some(false) => {}
            None => return Ok(()),
        }
        state_tx.send_replace(Relay::Reconnecting);
    }
}

/// A bound local port of a `-s` mapping.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// The session settings of this end: connections held for `resume_hold` when the tunnel
/// drops.
fn session_config(resume_hold: Option<Duration>) -> SessionConfig {
    SessionConfig {
        resume_hold,
        ..SessionConfig::default()
    }
}

/// Wait until the session's WebSocket drops, and say why. `Some(true)`: it holds connections
/// to resume on the next one; `Some(false)`: it ended; `None`: `shutdown` came first (the
/// session is closed).
async fn wait_for_link_down(handle: &SessionHandle, shutdown: &CancellationToken) -> Option<bool> {
    let why = tokio::select! {
        _ = shutdown.cancelled() => {
            handle.close();
            return None;
        }
        why = handle.link_down() => why,
    };
    let held = handle.ended().is_none();
    if held {
        warn!(reason = %why, connections = handle.suspended_connections(), "relay connection lost; reconnecting to resume the open connections");
    } else if why.is_relay_restart() {
        info!("the relay is restarting; reconnecting");
    } else {
        warn!(reason = %why, "relay session ended; reconnecting");
    }
    Some(held)
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

/// The destination mode: connect as the tunnel's destination and carry each connection from
/// the tunnel to its service's address, reconnecting as the source side does.
async fn serve_destination(
    endpoint: &Endpoint,
    opts: &ConnectOptions,
    targets: &[Target],
    resume_hold: Option<Duration>,
    shutdown: CancellationToken,
) -> Result<(), ConnectError> {
    let (state, _) = watch::channel(Relay::Reconnecting);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut first = true;
    let mut held: Option<(SessionHandle, session::Incoming)> = None;
    loop {
        let Some(c) = reconnect(opts, &mut backoff, &shutdown, &state).await? else {
            return Ok(());
        };
        backoff.reset();
        let (handle, mut incoming) = match held.take() {
            Some((h, incoming)) if h.can_resume_with(c.extensions) => {
                let n = h.suspended_connections();
                if h.reattach(c.ws).is_err() {
                    continue;
                }
                info!(relay = %endpoint, connections = n, "reconnected to relay; resuming connections");
                (h, incoming)
            }
            other => {
                if let Some((h, _)) = other {
                    h.close();
                }
                // A V1 stream names no service: it maps to the one mapping when there is one.
                let named: Vec<String> = targets.iter().filter_map(|t| t.service.clone()).collect();
                let mux = Mux::destination((named.len() == 1).then_some(named));
                let cfg = session_config(resume_hold).for_relay(c.extensions);
                session::spawn(c.ws, mux, cfg)
            }
        };
        if first {
            info!(relay = %endpoint, "connected to relay as destination");
            for t in targets {
                let name = t.service.as_deref().unwrap_or("(the tunnel's service)");
                println!("culvert: service {name} forwarded to {}", t.addr);
            }
            first = false;
        }
        let why = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    handle.close();
                    return Ok(());
                }
                why = handle.link_down() => break why,
                s = incoming.streams.recv() => match s {
                    Some(stream) => {
                        let target = match targets {
                            [only] => Some(only),
                            all => all.iter().find(|t| t.service.as_deref() == Some(stream.service())),
                        };
                        let (Some(target), Ok(permit)) = (target, limit.clone().try_acquire_owned()) else {
                            warn!(service = %stream.service(), "no -d mapping for this service, or too many connections; connection refused");
                            tokio::spawn(stream.reset());
                            continue;
                        };
                        let addr = target.addr.clone();
                        tokio::spawn(async move {
                            carry_to(&addr, stream).await;
                            drop(permit);
                        });
                    }
                    None => break handle.link_down().await,
                },
            }
        };
        if handle.ended().is_none() {
            warn!(reason = %why, connections = handle.suspended_connections(), "relay connection lost; reconnecting to resume the open connections");
            held = Some((handle, incoming));
        } else if why.is_relay_restart() {
            info!("the relay is restarting; reconnecting");
        } else {
            warn!(reason = %why, "relay session ended; reconnecting");
        }
    }
}

/// How long a destination connection may take to reach its address.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn carry_to(addr: &str, stream: session::Connection) {
    let service = stream.service().to_owned();
    let tcp = match tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            warn!(%service, %addr, error = %e, "cannot reach the destination; connection reset");
            stream.reset().await;
            return;
        }
        Err(_) => {
            warn!(%service, %addr, "the destination did not answer within {TARGET_CONNECT_TIMEOUT:?}; connection reset");
            stream.reset().await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let id = stream.id();
    let r = session::splice(tcp, stream).await;
    debug!(%service, conn = %id, sent = r.sent, received = r.received, peer_closed = r.peer_closed, "connection closed");
}

/// The stdio mode: one connection to `service`, spliced to stdin and stdout.
/// The stdio mode's one connection, kept across a dropped tunnel like the listeners' ones: the
/// session is reattached on a new WebSocket while the connection waits.
async fn carry_stdio(
    handle: &SessionHandle,
    service: &str,
    opts: &ConnectOptions,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
    state: &watch::Sender<Relay>,
) -> Result<(), ConnectError> {
    let stream = handle
        .open(service)
        .await
        .map_err(|e| ConnectError::Fatal(format!("cannot open a connection to {service}: {e}")))?;
    let id = stream.id();
    let splice = session::splice(
        tokio::io::join(tokio::io::stdin(), tokio::io::stdout()),
        stream,
    );
    tokio::pin!(splice);
    loop {
        tokio::select! {
            r = &mut splice => {
                debug!(%service, conn = %id, sent = r.sent, received = r.received, peer_closed = r.peer_closed, "connection closed");
                handle.close();
                return Ok(());
            }
            _ = shutdown.cancelled() => {
                handle.close();
                return Ok(());
            }
            why = handle.link_down(), if handle.ended().is_none() => {
                if handle.ended().is_some() {
                    // Not resumable: the connection ends with the session.
                    continue;
                }
                warn!(reason = %why, "relay connection lost; reconnecting to resume the connection");
                // The connection waits meanwhile (the splice is polled again afterwards), at
                // most for the hold time.
                let c = tokio::select! {
                    c = reconnect(opts, backoff, shutdown, state) => c?,
                    _ = handle.closed() => continue,
                };
                let Some(c) = c else {
                    handle.close();
                    return Ok(());
                };
                if handle.can_resume_with(c.extensions) && handle.reattach(c.ws).is_ok() {
                    backoff.reset();
                    info!(relay = %opts.endpoint, "reconnected to relay; resuming connections");
                } else {
                    warn!("the relay no longer resumes connections: the connection ends");
                    handle.close();
                }
            }
        }
    }
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

/// The session a new local connection (or UDP flow) from `peer` goes into: the live one, the
/// one a reconnect in its first attempt brings (waited for, at most [`WAIT_FOR_SESSION`]), or
/// none when the relay is unreachable (logged).
pub(crate) async fn session_for(
    peer: SocketAddr,
    mut current: watch::Receiver<Relay>,
) -> Option<SessionHandle> {
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
    match state {
        Relay::Up(h) => Some(h),
        Relay::Unreachable => {
            warn!(%peer, "the relay is unreachable (culvert connect keeps retrying); connection closed");
            None
        }
        Relay::Reconnecting => {
            warn!(%peer, waited = ?started.elapsed(), "no relay session yet (culvert connect keeps retrying); connection closed");
            None
        }
    }
}

async fn carry(
    tcp: TcpStream,
    peer: SocketAddr,
    service: Option<String>,
    v1: Arc<OnceLock<String>>,
    current: watch::Receiver<Relay>,
) {
    let Some(handle) = session_for(peer, current).await else {
        return;
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
                    port: 5555,
                    udp: false,
                },
                Mapping {
                    service: Some("HMI".into()),
                    port: 0,
                    udp: false,
                }
            ]
        );
        let dns = &parse_mappings("DNS=udp:5353").unwrap()[0];
        assert!(dns.udp && dns.port == 5353, "{dns:?}");
        assert!(parse_mappings("udp:53").unwrap()[0].udp);
        assert!(
            parse_mappings("DNS=udp:x")
                .unwrap_err()
                .contains("udp:PORT")
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

    #[test]
    fn what_is_typed_names_the_relay_and_the_environment_gives_way() {
        let host = |r: Result<Endpoint, String>| r.unwrap().to_string();
        let env = Some("relay.example.com:443");
        assert!(host(endpoint(None, None, Some("eu-west-1"), env)).contains("eu-west-1"));
        assert!(host(endpoint(None, Some("127.0.0.1:9"), None, env)).contains("127.0.0.1"));
        assert!(host(endpoint(Some("127.0.0.1:9"), None, None, env)).contains("127.0.0.1"));
        assert!(host(endpoint(None, None, None, env)).contains("relay.example.com"));
        assert!(
            endpoint(None, Some("a:1"), Some("eu-west-1"), None)
                .unwrap_err()
                .contains("give one")
        );
        assert!(
            endpoint(Some("a:1"), Some("b:1"), None, None)
                .unwrap_err()
                .contains("give one")
        );
        assert!(
            endpoint(None, None, None, None)
                .unwrap_err()
                .contains("CULVERT_RELAY")
        );
        assert_eq!(log_filter(0), "off");
        assert_eq!(log_filter(5), "debug");
        assert_eq!(log_filter(200), "trace");
    }

    #[test]
    fn destinations_as_the_localproxy_takes_them() {
        let t = |s: Option<&str>, a: &str| Target {
            service: s.map(str::to_owned),
            addr: a.to_owned(),
        };
        assert_eq!(
            parse_targets("SSH=127.0.0.1:22,HMI=80").unwrap(),
            vec![
                t(Some("SSH"), "127.0.0.1:22"),
                t(Some("HMI"), "localhost:80")
            ]
        );
        assert_eq!(parse_targets("22").unwrap(), vec![t(None, "localhost:22")]);
        assert_eq!(
            parse_targets("plc.local:502").unwrap(),
            vec![t(None, "plc.local:502")]
        );
        assert!(parse_targets("SSH=host").unwrap_err().contains("HOST:PORT"));
        assert!(
            parse_targets("22,HMI=80")
                .unwrap_err()
                .contains("only mapping")
        );
        assert!(parse_targets("SSH=1,SSH=2").unwrap_err().contains("twice"));
    }
}
