//! One tunnel connection, from arrival to its audit record: find the rule, admit it under the
//! tunnel's and the rule's limits, resolve and check the target against the rule's ACL, connect,
//! and carry bytes (bandwidth-limited, idle-timed) until either side ends.
//!
//! A refused connection is reset (the AWS protocol carries no reason); the reason goes to the
//! log and to the audit trail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use culvert_protocol::message::MAX_PAYLOAD;
use culvert_protocol::session::{Connection, GrowBuf};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tracing::{debug, info, warn};

use crate::audit::{EndReason, Record};
use crate::config::Kind;
use crate::consent;
use crate::limits::Bandwidth;
use crate::metrics::Metrics;
use crate::rules::{Gateway, TunnelState};
use crate::target::{Local, Refusal, connect};
use culvert_appliance::metrics::prometheus_client::metrics::counter::Counter;

/// Serve one tunnel connection under the rules in force when it arrived.
pub async fn handle(gw: Arc<Gateway>, tunnel: Arc<TunnelState>, stream: Connection) {
    let started = Instant::now();
    let rules = gw.rules();
    let service = stream.service().to_owned();
    let mut rec = Record {
        tunnel: tunnel.label.clone(),
        operator: tunnel.identity.operator.clone(),
        operator_reason: tunnel.identity.reason.clone(),
        service: service.clone(),
        conn: stream.id().to_string(),
        rule: format!("services.{service}"),
        ..Record::default()
    };
    let refuse = |rec: Record, r: Refusal, stream: Connection| {
        let gw = gw.clone();
        async move {
            warn!(service = %rec.service, conn = %rec.conn, reason = r.reason.as_str(), address = ?r.address, "connection refused: {}", r.detail);
            gw.metrics
                .refused
                .get_or_create(&Metrics::label("reason", r.reason.as_str()))
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
        return refuse(rec, Refusal::new(EndReason::NoRule, detail), stream).await;
    };
    if !*gw.consent.borrow() {
        let switch = rules
            .config
            .consent_switch
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let detail = format!(
            "remote access is switched off on site ({switch} does not read 1/on); someone at the \
             site must turn it on"
        );
        return refuse(rec, Refusal::new(EndReason::NoConsent, detail), stream).await;
    }
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
        Err(why) => return refuse(rec, Refusal::new(EndReason::Limit, why), stream).await,
    };
    // Held here, in its slot and before any target is contacted, until the site decides.
    if let Some(rx) = tunnel.approval.clone() {
        if *rx.borrow() == crate::approval::State::Waiting {
            info!(service = %service, conn = %rec.conn, "connection waits for on-site approval of its tunnel");
        }
        let refusal = tokio::select! {
            r = crate::approval::approved(rx) => r.err().map(|why| Refusal::new(EndReason::RefusedOnSite, why)),
            reason = consent::withdrawn(&gw) => Some(Refusal::new(
                reason,
                "remote access was switched off on site while it waited for approval".into(),
            )),
        };
        if let Some(refusal) = refusal {
            return refuse(rec, refusal, stream).await;
        }
    }
    // One statement each: get_or_create hands out a lock guard, and a second call while the
    // first guard lives would wait for itself.
    let to_target = Metrics::label("direction", "to_target");
    let from_target = Metrics::label("direction", "from_target");
    let to_counter = gw.metrics.bytes.get_or_create(&to_target).clone();
    let from_counter = gw.metrics.bytes.get_or_create(&from_target).clone();
    let carrying = Carrying {
        to: [&tl.to_target, &rl.to_target]
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
        from: [&tl.from_target, &rl.from_target]
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
        counted: (to_counter, from_counter),
    };
    let outcome = match &svc.kind {
        Kind::Forward(target) => {
            rec.target = Some(target.to_string());
            match connect(svc, target).await {
                Ok(Local::Tcp(tcp, addr)) => {
                    rec.address = Some(addr.to_string());
                    start(&gw, &rec);
                    carrying.carry(&gw, svc, &rec, tcp, stream).await
                }
                Ok(Local::Udp(udp, addr)) => {
                    rec.address = Some(addr.to_string());
                    start(&gw, &rec);
                    let flow = crate::udp::bridge(udp, rec.conn.clone());
                    carrying.carry(&gw, svc, &rec, flow, stream).await
                }
                Ok(Local::Unix(sock)) => {
                    start(&gw, &rec);
                    carrying.carry(&gw, svc, &rec, sock, stream).await
                }
                Ok(Local::Serial(port, _claim)) => {
                    let settings = svc.serial.clone().unwrap_or_default();
                    if !settings.rfc2217 {
                        start(&gw, &rec);
                        carrying.carry(&gw, svc, &rec, port, stream).await
                    } else {
                        match crate::serial::rfc2217_bridge(port, &settings, rec.conn.clone()) {
                            Ok(session) => {
                                start(&gw, &rec);
                                carrying.carry(&gw, svc, &rec, session, stream).await
                            }
                            Err(e) => {
                                let detail = format!("{target}: {e}");
                                let r = Refusal::new(EndReason::ConnectFailed, detail);
                                return refuse(rec, r, stream).await;
                            }
                        }
                    }
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
            carrying.carry(&gw, svc, &rec, local, stream).await
        }
        #[cfg(not(feature = "http"))]
        Kind::Http(_) => {
            let r = Refusal::new(
                EndReason::NoRule,
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
        reason = outcome.reason.as_str(),
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

/// What a started connection is carried under: its bandwidth limits each way and the
/// gateway's byte counters.
struct Carrying {
    to: Vec<Arc<Bandwidth>>,
    from: Vec<Arc<Bandwidth>>,
    counted: (Counter, Counter),
}

impl Carrying {
    /// Carry bytes between `local` and the tunnel connection ([`pump`]) until either ends,
    /// through the rule's read-only Modbus filter when it has one ([`crate::modbus`]; refused
    /// requests go to the audit trail as `request` records of this connection).
    async fn carry<L>(
        &self,
        gw: &Arc<Gateway>,
        svc: &crate::config::Service,
        rec: &Record,
        local: L,
        stream: Connection,
    ) -> Outcome
    where
        L: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stop = consent::withdrawn(gw);
        let (to, from) = (&self.to[..], &self.from[..]);
        let ends = Ends {
            idle: svc.idle_timeout,
            // A serial line has no FIN to pass on, nor anything to wait for after one.
            on_client_fin: matches!(
                svc.kind,
                crate::config::Kind::Forward(crate::config::Target::Serial(_))
            ),
        };
        let Some(policy) = &svc.modbus else {
            return pump(local, stream, to, from, ends, &self.counted, stop).await;
        };
        let gw = gw.clone();
        let filtered = crate::modbus::filter(
            local,
            policy.clone(),
            crate::modbus::Audited {
                record: Box::new(move |r| gw.audit.record(r)),
                conn: rec.clone(),
            },
        );
        pump(filtered, stream, to, from, ends, &self.counted, stop).await
    }
}

/// What ends a connection besides either side closing.
#[derive(Clone, Copy, Debug)]
pub struct Ends {
    /// Nothing moved either way for this long.
    pub idle: Option<Duration>,
    /// The client's end (its FIN, or the tunnel connection's reset) ends the connection at
    /// once, for a target that cannot be half-closed and never closes by itself (a serial
    /// port).
    pub on_client_fin: bool,
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

/// Bytes carried, and why it ended.
pub struct Outcome {
    pub to_target: u64,
    pub from_target: u64,
    pub reason: EndReason,
}

/// Carry bytes between the target and the tunnel connection under bandwidth limits, until one
/// side ends, `ends` says so (idle), or `stop` resolves (with its reason); `counted` (to
/// target, from target) follow as they go.
///
/// With half-close negotiated (culvert's extension), a FIN from either side reaches the other as
/// a FIN and the reverse direction goes on (until it ends too, or the idle timeout). Without it
/// (the AWS protocol has no half-close), ending either way resets the tunnel connection and
/// closes the target socket, after at most 5 s for what is still in flight.
pub async fn pump<L>(
    local: L,
    tunnel: Connection,
    to_limits: &[Arc<Bandwidth>],
    from_limits: &[Arc<Bandwidth>],
    ends: Ends,
    counted: &(Counter, Counter),
    stop: impl std::future::Future<Output = EndReason>,
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
    let half_close = tw.can_half_close();
    let down = async {
        // Tunnel → target: the tunnel reader hands out its chunks without a copy.
        let why = loop {
            let chunk = match tr.fill_buf().await {
                Ok([]) | Err(_) => break EndReason::ClientClosed,
                Ok(c) => c,
            };
            let n = chunk.len().min(to_cap);
            // Data waiting for bandwidth is not idleness.
            touch();
            for b in to_limits {
                b.take(n).await;
            }
            if lw.write_all(&chunk[..n]).await.is_err() {
                break EndReason::TargetClosed;
            }
            tr.consume(n);
            to_n.fetch_add(n as u64, Ordering::Relaxed);
            counted.0.inc_by(n as u64);
            touch();
        };
        let _ = lw.shutdown().await;
        let why = if why == EndReason::ClientClosed && tr.tunnel_lost() {
            EndReason::TunnelLost
        } else {
            why
        };
        (why, tr.peer_finished())
    };
    let up = async {
        // Small while the connection is quiet, a full payload while it is busy.
        let mut buf = GrowBuf::new(from_cap);
        let mut why = EndReason::TargetClosed;
        let eof = loop {
            let n = match lr.read(buf.space()).await {
                Ok(0) => break true,
                Err(_) => break false,
                Ok(n) => n,
            };
            if why == EndReason::ClientClosed {
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
                why = EndReason::ClientClosed;
                continue;
            }
            from_n.fetch_add(n as u64, Ordering::Relaxed);
            counted.1.inc_by(n as u64);
            touch();
        };
        if eof {
            // The target's FIN: a FIN to the client where half-close is negotiated, else the
            // reset.
            let _ = tw.shutdown().await;
        } else {
            tw.reset();
        }
        why
    };
    let idle = async {
        let Some(idle) = ends.idle else {
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
    // What ends the connection from outside: idleness, or `stop`.
    let idle_watch = async {
        tokio::select! {
            () = idle => EndReason::IdleTimeout,
            why = stop => why,
        }
    };
    tokio::pin!(down, up, idle_watch);
    let reason = tokio::select! {
        (why, finished) = &mut down => {
            if ends.on_client_fin {
                why
            } else if finished {
                // The client finished sending (half-close): the target may answer at leisure.
                tokio::select! {
                    _ = &mut up => why,
                    why = &mut idle_watch => why,
                }
            } else {
                // Our FIN is queued to the target; let it read the rest and close (bounded).
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut up).await;
                why
            }
        }
        why = &mut up => {
            if half_close && why == EndReason::TargetClosed {
                // The target finished sending: the client may still send to it.
                tokio::select! {
                    _ = &mut down => why,
                    why = &mut idle_watch => why,
                }
            } else {
                if why == EndReason::TargetClosed {
                    // The reset is queued; the peer's earlier bytes drain, then the reader ends.
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
                }
                why
            }
        }
        why = &mut idle_watch => why,
    };
    Outcome {
        to_target: to_n.load(Ordering::Relaxed),
        from_target: from_n.load(Ordering::Relaxed),
        reason,
    }
}
