//! One tunnel connection, from arrival to its audit record: find the rule, admit it under the
//! tunnel's and the rule's limits, resolve and check the target against the rule's ACL, connect,
//! and carry bytes (bandwidth-limited, idle-timed) until either side ends.
//!
//! A refused connection is reset (the AWS protocol carries no reason); the reason goes to the
//! log and to the audit trail.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use culvert_protocol::message::MAX_PAYLOAD;
use culvert_protocol::session::{GrowBuf, TunnelStream};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tracing::{debug, info, warn};

use crate::acl;
use crate::audit::Record;
use crate::config::{HostPort, Kind, Service, Target};
use crate::limits::Bandwidth;
use crate::metrics::Metrics;
use crate::rules::{Gateway, TunnelState};
use culvert_appliance::metrics::prometheus_client::metrics::counter::Counter;

/// Why a connection could not be made.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
    pub address: Option<String>,
}

impl Refusal {
    fn new(reason: &'static str, detail: String) -> Refusal {
        Refusal {
            reason,
            detail,
            address: None,
        }
    }
}

/// Serve one tunnel connection under the rules in force when it arrived.
pub async fn handle(gw: Arc<Gateway>, tunnel: Arc<TunnelState>, stream: TunnelStream) {
    let started = Instant::now();
    let rules = gw.rules();
    let service = stream.service().to_owned();
    let mut rec = Record {
        tunnel: tunnel.label.clone(),
        service: service.clone(),
        conn: stream.id().to_string(),
        rule: format!("services.{service}"),
        ..Record::default()
    };
    let refuse = |rec: Record, r: Refusal, stream: TunnelStream| {
        let gw = gw.clone();
        async move {
            warn!(service = %rec.service, conn = %rec.conn, reason = r.reason, address = ?r.address, "connection refused: {}", r.detail);
            gw.metrics
                .refused
                .get_or_create(&Metrics::label("reason", r.reason))
                .inc();
            gw.audit.record(
                Record {
                    event: "end",
                    reason: Some(r.reason),
                    detail: Some(r.detail),
                    address: r.address,
                    ..rec
                }
                .duration(started.elapsed()),
            );
            stream.reset().await;
        }
    };
    let Some(svc) = rules.config.services.get(&service) else {
        rec.rule = String::new();
        let detail = format!(
            "no rule for service {service:?} (this gateway has: {})",
            rules.config.service_names().join(", ")
        );
        return refuse(rec, Refusal::new("no_rule", detail), stream).await;
    };
    let tl = tunnel.limiters(&rules.config.tunnel_limits);
    let rl = rules.limiters[&service].clone();
    // Slots first, rates last: a connection refused for a slot spends no rate token. The
    // gateway's own slot comes first of all: one tunnel cannot take every file descriptor.
    let what = format!("rule {service}");
    let admitted = gw
        .connections
        .try_take(Some(gw.max_connections))
        .ok_or_else(|| {
            format!(
                "the gateway already has {} connection(s) open (daemon.max_connections)",
                gw.max_connections
            )
        })
        .and_then(|g| {
            let t = tl.slot("this tunnel")?;
            let r = rl.slot(&what)?;
            rl.rate(&what)?;
            tl.rate("this tunnel")?;
            Ok((g, t, r))
        });
    let _slots = match admitted {
        Ok(s) => s,
        Err(why) => return refuse(rec, Refusal::new("limit", why), stream).await,
    };
    let bw_to: Vec<Arc<Bandwidth>> = [&tl.to_target, &rl.to_target]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let bw_from: Vec<Arc<Bandwidth>> = [&tl.from_target, &rl.from_target]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    // One statement each: get_or_create hands out a lock guard, and a second call while the
    // first guard lives would wait for itself.
    let to_target = Metrics::label("direction", "to_target");
    let from_target = Metrics::label("direction", "from_target");
    let to_counter = gw.metrics.bytes.get_or_create(&to_target).clone();
    let from_counter = gw.metrics.bytes.get_or_create(&from_target).clone();
    let counted = (to_counter, from_counter);
    let outcome = match &svc.kind {
        Kind::Tcp(target) => {
            rec.target = Some(target.to_string());
            match connect(svc, target).await {
                Ok(Local::Tcp(tcp, addr)) => {
                    rec.address = Some(addr.to_string());
                    start(&gw, &rec);
                    pump(tcp, stream, &bw_to, &bw_from, svc.idle_timeout, &counted).await
                }
                Ok(Local::Unix(sock)) => {
                    start(&gw, &rec);
                    pump(sock, stream, &bw_to, &bw_from, svc.idle_timeout, &counted).await
                }
                Err(r) => return refuse(rec, r, stream).await,
            }
        }
        #[cfg(feature = "http")]
        Kind::Http(http) => {
            rec.target = Some("http".into());
            let relay_ip = *tunnel.relay_ip.lock().unwrap_or_else(|p| p.into_inner());
            let local =
                crate::http::serve(gw.clone(), svc.clone(), http.clone(), rec.clone(), relay_ip);
            start(&gw, &rec);
            pump(local, stream, &bw_to, &bw_from, svc.idle_timeout, &counted).await
        }
        #[cfg(not(feature = "http"))]
        Kind::Http(_) => {
            let r = Refusal::new(
                "no_rule",
                "this culvertd was built without HTTP routing".into(),
            );
            return refuse(rec, r, stream).await;
        }
    };
    gw.metrics.connections.dec();
    debug!(
        service = %service,
        conn = %rec.conn,
        to_target = outcome.to_target,
        from_target = outcome.from_target,
        reason = outcome.reason,
        "connection ended"
    );
    gw.audit.record(
        Record {
            event: "end",
            bytes_to_target: Some(outcome.to_target),
            bytes_from_target: Some(outcome.from_target),
            reason: Some(outcome.reason),
            ..rec
        }
        .duration(started.elapsed()),
    );
}

/// The connection is up: count it (`handle` counts it down when it ends) and record it.
fn start(gw: &Gateway, rec: &Record) {
    gw.metrics.connections.inc();
    gw.metrics
        .connections_total
        .get_or_create(&Metrics::label("service", &rec.service))
        .inc();
    info!(service = %rec.service, conn = %rec.conn, target = ?rec.target, address = ?rec.address, "connection started");
    gw.audit.record(Record {
        event: "start",
        ..rec.clone()
    });
}

enum Local {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

/// Resolve `hp` (literal addresses as they are, names now), within `timeout`.
pub async fn resolve(hp: &HostPort, timeout: Duration) -> Result<Vec<SocketAddr>, Refusal> {
    if let Some(ip) = hp.literal() {
        return Ok(vec![SocketAddr::new(ip, hp.port)]);
    }
    match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((hp.host.as_str(), hp.port)),
    )
    .await
    {
        Ok(Ok(addrs)) => {
            let v: Vec<SocketAddr> = addrs.collect();
            if v.is_empty() {
                Err(Refusal::new(
                    "connect_failed",
                    format!("{} resolves to no address", hp.host),
                ))
            } else {
                Ok(v)
            }
        }
        Ok(Err(e)) => Err(Refusal::new(
            "connect_failed",
            format!("cannot resolve {}: {e}", hp.host),
        )),
        Err(_) => Err(Refusal::new(
            "connect_timeout",
            format!("resolving {} took longer than {timeout:?}", hp.host),
        )),
    }
}

/// Every address must pass the rule's ACL: a name that resolves to one denied address is refused
/// as a whole (it is either misconfigured or being used to reach around the ACL).
pub fn check_all(svc: &Service, hp: &HostPort, addrs: &[SocketAddr]) -> Result<(), Refusal> {
    let own = acl::own_addresses();
    for a in addrs {
        if let Err(why) = svc.policy.check(*a, &own) {
            let detail = if hp.literal().is_some() {
                format!("{hp} denied: {why}")
            } else {
                format!("{hp} resolves to {a}, denied: {why}")
            };
            return Err(Refusal {
                reason: "denied",
                detail,
                address: Some(a.to_string()),
            });
        }
    }
    Ok(())
}

async fn connect(svc: &Service, target: &Target) -> Result<Local, Refusal> {
    let deadline = Instant::now() + svc.connect_timeout;
    let timed_out = || {
        Refusal::new(
            "connect_timeout",
            format!("{target} did not answer within {:?}", svc.connect_timeout),
        )
    };
    match target {
        Target::Unix(path) => {
            match tokio::time::timeout(svc.connect_timeout, UnixStream::connect(path)).await {
                Ok(Ok(s)) => Ok(Local::Unix(s)),
                Ok(Err(e)) => Err(Refusal::new("connect_failed", format!("{target}: {e}"))),
                Err(_) => Err(timed_out()),
            }
        }
        Target::Tcp(hp) => {
            let addrs = resolve(hp, svc.connect_timeout).await?;
            check_all(svc, hp, &addrs)?;
            let mut last = None;
            for a in &addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, TcpStream::connect(a)).await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok(Local::Tcp(tcp, *a));
                    }
                    Ok(Err(e)) => last = Some((*a, e)),
                    Err(_) => {
                        let mut r = timed_out();
                        r.address = Some(a.to_string());
                        return Err(r);
                    }
                }
            }
            let (a, e) = last.expect("at least one address");
            Err(Refusal {
                reason: "connect_failed",
                detail: format!("{target} ({a}): {e}"),
                address: Some(a.to_string()),
            })
        }
    }
}

/// Bytes carried, and why it ended.
pub struct Outcome {
    pub to_target: u64,
    pub from_target: u64,
    pub reason: &'static str,
}

/// Carry bytes between the target and the tunnel connection under bandwidth limits, until one
/// side ends or nothing moved for `idle`; `counted` (to target, from target) follow as they go. Ending either way resets the tunnel connection and
/// closes the target socket (the AWS protocol has no half-close).
pub async fn pump<L>(
    local: L,
    tunnel: TunnelStream,
    to_limits: &[Arc<Bandwidth>],
    from_limits: &[Arc<Bandwidth>],
    idle: Option<Duration>,
    counted: &(Counter, Counter),
) -> Outcome
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (to_n, from_n) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut tr, mut tw) = tunnel.into_split();
    let (mut lr, mut lw) = tokio::io::split(local);
    let cap =
        |limits: &[Arc<Bandwidth>]| limits.iter().map(|b| b.burst).fold(MAX_PAYLOAD, usize::min);
    let (to_cap, from_cap) = (cap(to_limits), cap(from_limits));
    let down = async {
        // Tunnel → target: the tunnel reader hands out its chunks without a copy.
        let why = loop {
            let chunk = match tr.fill_buf().await {
                Ok([]) | Err(_) => break "client_closed",
                Ok(c) => c,
            };
            let n = chunk.len().min(to_cap);
            // Data waiting for bandwidth is not idleness.
            touch();
            for b in to_limits {
                b.take(n).await;
            }
            if lw.write_all(&chunk[..n]).await.is_err() {
                break "target_closed";
            }
            tr.consume(n);
            to_n.fetch_add(n as u64, Ordering::Relaxed);
            counted.0.inc_by(n as u64);
            touch();
        };
        let _ = lw.shutdown().await;
        why
    };
    let up = async {
        // Small while the connection is quiet, a full payload while it is busy.
        let mut buf = GrowBuf::new(from_cap);
        let mut why = "target_closed";
        loop {
            let n = match lr.read(buf.space()).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if why == "client_closed" {
                // The tunnel side is gone: read and discard until the target closes, so that
                // closing our socket does not turn into a reset that discards what we still
                // had to deliver to it.
                continue;
            }
            touch();
            for b in from_limits {
                b.take(n).await;
            }
            if tw.write_all(buf.filled(n)).await.is_err() {
                why = "client_closed";
                continue;
            }
            from_n.fetch_add(n as u64, Ordering::Relaxed);
            counted.1.inc_by(n as u64);
            touch();
        }
        let _ = tw.shutdown().await;
        why
    };
    let idle_watch = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let quiet = epoch.elapsed().saturating_sub(since);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::pin!(down, up, idle_watch);
    let reason = tokio::select! {
        why = &mut down => {
            // Our FIN is queued to the target; let it read the rest and close (bounded).
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut up).await;
            why
        }
        why = &mut up => {
            if why == "target_closed" {
                // The reset is queued; the peer's earlier bytes drain, then the reader ends.
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
            }
            why
        }
        _ = &mut idle_watch => "idle_timeout",
    };
    Outcome {
        to_target: to_n.load(Ordering::Relaxed),
        from_target: from_n.load(Ordering::Relaxed),
        reason,
    }
}
