//! HTTP routing to device web UIs, with pingora embedded (cargo feature `http`).
//!
//! Each tunnel connection of an `http` rule is served by pingora's HTTP proxy over an in-memory
//! pipe: [`crate::forward::pump`] carries the tunnel side (limits, idle timeout, byte counts,
//! exactly as for tcp rules) and pingora reads requests from the other end. No listener, no
//! loopback hop. pingora's `Server` is not used (it owns its runtime and the process); its proxy
//! app is driven per connection, as its docs describe for custom accept loops.
//!
//! Per request: the route is chosen by Host and path prefix (an exact host beats `*.domain`,
//! which beats a route without host; then the longest prefix wins), the upstream name is
//! resolved and every address checked against the rule's ACL (403 with the reason when denied),
//! and pingora connects to the checked address itself. WebSocket upgrades pass through.
//! Upstream failures become 502 (refused, reset, bad response) or 504 (connect or response
//! timeout) pages that say which upstream and why. Each request is one `request` audit record.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::ServerApp;
use pingora::connectors::L4Connect;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, OkOrErr, OrErr};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tracing::{info, warn};

use crate::audit::{EndReason, Record};
use crate::config::{HttpService, Route, Service};
use crate::rules::Gateway;
use crate::target;

/// Start serving HTTP for one tunnel connection; returns the end to pump the tunnel into.
pub fn serve(
    gw: Arc<Gateway>,
    svc: Service,
    http: HttpService,
    conn: Record,
    relay_ip: Option<IpAddr>,
) -> DuplexStream {
    static CONF: OnceLock<Arc<ServerConf>> = OnceLock::new();
    let conf = CONF.get_or_init(|| Arc::new(ServerConf::default()));
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let shutdown = gw.http_shutdown.subscribe();
    let logged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let app = App {
        gw: gw.clone(),
        svc: svc.clone(),
        http,
        conn: conn.clone(),
        relay_ip,
        logged: logged.clone(),
    };
    let proxy = Arc::new(pingora::proxy::http_proxy(conf, app));
    tokio::spawn(async move {
        let sniff = Arc::new(std::sync::Mutex::new(Sniff::default()));
        let sock = VirtualSocketStream::new(Box::new(Pipe(theirs, sniff.clone())));
        let mut io: Option<pingora::protocols::Stream> = Some(Box::new(L4Stream::from(sock)));
        // Keep-alive: pingora hands the connection back after each reusable exchange.
        while let Some(s) = io.take() {
            let before = logged.load(std::sync::atomic::Ordering::Acquire);
            lock(&sniff).reset();
            io = proxy.process_new(s, &shutdown).await;
            let seen = std::mem::take(&mut *lock(&sniff));
            if logged.load(std::sync::atomic::Ordering::Acquire) == before
                && let Some(rec) = seen.rejected(&svc.name, &conn)
            {
                // pingora refused the request itself (malformed, oversized, CONNECT): none of
                // our callbacks saw it, so it is recorded here.
                warn!(service = %svc.name, status = ?rec.status, "http request rejected by the HTTP parser");
                gw.audit.record(rec);
            }
        }
    });
    ours
}

fn lock(s: &std::sync::Mutex<Sniff>) -> std::sync::MutexGuard<'_, Sniff> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// What crossed the pipe during one exchange: whether the client sent anything, and the start
/// of what pingora answered (its status line).
#[derive(Default)]
struct Sniff {
    read: u64,
    answer: Vec<u8>,
}

impl Sniff {
    /// The status line is all that is kept.
    const KEEP: usize = 16;

    fn reset(&mut self) {
        *self = Sniff::default();
    }

    /// The audit record of an exchange that produced no `logging` callback: bytes arrived
    /// (a request was attempted, not just a closed connection), and pingora answered with a
    /// status or nothing at all.
    fn rejected(&self, service: &str, conn: &Record) -> Option<Record> {
        if self.read == 0 {
            return None;
        }
        let status = std::str::from_utf8(&self.answer)
            .ok()
            .and_then(|l| {
                l.strip_prefix("HTTP/1.1 ")
                    .or_else(|| l.strip_prefix("HTTP/1.0 "))
            })
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok());
        Some(Record {
            event: "request",
            rule: format!("services.{service}"),
            status,
            reason: Some(EndReason::Rejected),
            detail: Some(
                "the HTTP parser refused the request (malformed or oversized head, or CONNECT)"
                    .into(),
            ),
            ..conn.clone()
        })
    }
}

/// The in-memory pipe as pingora's virtual socket, noting what crosses it ([`Sniff`]).
struct Pipe(DuplexStream, Arc<std::sync::Mutex<Sniff>>);

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipe")
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            lock(&self.1).read += n as u64;
        }
        r
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            let mut sniff = lock(&self.1);
            let room = Sniff::KEEP.saturating_sub(sniff.answer.len());
            sniff.answer.extend_from_slice(&buf[..n.min(room)]);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl VirtualSocket for Pipe {
    fn set_socket_option(&self, _opt: VirtualSockOpt) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects to the addresses `request_filter` resolved and checked, in order, with a plain tokio
/// connect under the rule's connect timeout. (pingora's own connector would try only one address,
/// and sets socket options qemu-user rejects, which breaks emulated test runs.)
#[derive(Debug)]
struct DirectConnect {
    addrs: Vec<SocketAddr>,
    timeout: std::time::Duration,
}

#[async_trait]
impl L4Connect for DirectConnect {
    async fn connect(&self, _addr: &PeerAddr) -> pingora::Result<L4Stream> {
        let deadline = Instant::now() + self.timeout;
        let mut last = None;
        for a in &self.addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, tokio::net::TcpStream::connect(a)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp.into());
                }
                Ok(Err(e)) => last = Some((*a, e)),
                Err(_) => {
                    return Error::e_explain(
                        ErrorType::ConnectTimedout,
                        format!("{a} did not answer within {:?}", self.timeout),
                    );
                }
            }
        }
        match last {
            Some((a, e)) => {
                Err(e).or_err_with(ErrorType::ConnectRefused, || format!("connecting to {a}"))
            }
            None => Error::e_explain(ErrorType::ConnectError, "no upstream address"),
        }
    }
}

struct App {
    gw: Arc<Gateway>,
    svc: Service,
    http: HttpService,
    /// The tunnel connection these requests arrive on (tunnel, service, conn).
    conn: Record,
    relay_ip: Option<IpAddr>,
    /// Requests recorded by [`ProxyHttp::logging`]: one that pingora refused before any
    /// callback ran leaves it unchanged, and is recorded by [`serve`] instead.
    logged: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
pub struct Ctx {
    started: Option<Instant>,
    route: Option<usize>,
    /// The upstream's addresses, resolved and checked against the ACL; tried in order.
    addrs: Vec<SocketAddr>,
    /// The first of them, for pingora's peer key and for the records.
    upstream: Option<SocketAddr>,
    host: String,
    /// Set when the request was answered here (no route, denied) with this reason.
    answered: Option<EndReason>,
    detail: Option<String>,
}

/// Host of a request, lower-case, without port.
fn request_host(req: &RequestHeader) -> String {
    let raw = req
        .uri
        .host()
        .map(str::to_owned)
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let host = if raw.starts_with('[') {
        raw.split_inclusive(']').next().unwrap_or("").to_owned()
    } else {
        raw.split(':').next().unwrap_or("").to_owned()
    };
    host.to_ascii_lowercase()
}

fn path_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The route for `host` and `path`: exact host > `*.domain` > any host; then longest prefix.
pub fn select(routes: &[Route], host: &str, path: &str) -> Option<usize> {
    let host_rank = |r: &Route| match &r.host {
        None => Some(0),
        Some(h) if h == host => Some(2),
        Some(h) => h
            .strip_prefix("*.")
            .filter(|d| {
                host.len() > d.len()
                    && host.ends_with(*d)
                    && host[..host.len() - d.len()].ends_with('.')
            })
            .map(|_| 1),
    };
    routes
        .iter()
        .enumerate()
        .filter(|(_, r)| path_matches(&r.path, path))
        .filter_map(|(i, r)| host_rank(r).map(|rank| ((rank, r.path.len()), i)))
        .max_by_key(|(k, _)| *k)
        .map(|(_, i)| i)
}

impl App {
    fn rule(&self, ctx: &Ctx) -> String {
        match ctx.route {
            Some(i) => format!("services.{}.routes[{i}]", self.svc.name),
            None => format!("services.{}", self.svc.name),
        }
    }

    async fn answer(&self, session: &mut Session, code: u16, body: String) {
        let body = Bytes::from(format!("culvertd: {code} {body}\n"));
        if let Ok(mut resp) = ResponseHeader::build(code, Some(4)) {
            let _ = resp.insert_header("content-type", "text/plain; charset=utf-8");
            let _ = resp.insert_header("content-length", body.len().to_string());
            let _ = resp.insert_header("cache-control", "no-store");
            let _ = session
                .as_downstream_mut()
                .write_error_response(resp, body)
                .await;
        }
    }
}

#[async_trait]
impl ProxyHttp for App {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Some(Instant::now()),
            ..Ctx::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let req = session.req_header();
        ctx.host = request_host(req);
        let path = req.uri.path().to_owned();
        let Some(i) = select(&self.http.routes, &ctx.host, &path) else {
            ctx.answered = Some(EndReason::NoRoute);
            let d = format!(
                "no route of {} matches host {:?} and path {path:?}",
                self.svc.name, ctx.host
            );
            ctx.detail = Some(d.clone());
            self.answer(session, 404, d).await;
            return Ok(true);
        };
        ctx.route = Some(i);
        let route = &self.http.routes[i];
        let checked = match target::resolve(&route.upstream, self.svc.connect_timeout).await {
            Ok(addrs) => target::check_all(&self.svc, &route.upstream, &addrs).map(|_| addrs),
            Err(r) => Err(r),
        };
        match checked {
            Ok(addrs) => {
                ctx.upstream = addrs.first().copied();
                ctx.addrs = addrs;
                Ok(false)
            }
            Err(r) => {
                let code = if r.reason == EndReason::Denied {
                    403
                } else {
                    502
                };
                warn!(service = %self.svc.name, route = i, "request refused: {}", r.detail);
                self.gw
                    .metrics
                    .refused
                    .get_or_create(&crate::metrics::Metrics::label("reason", r.reason.as_str()))
                    .inc();
                ctx.answered = Some(r.reason);
                ctx.detail = Some(r.detail.clone());
                self.answer(session, code, r.detail).await;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let addr = ctx
            .upstream
            .or_err(ErrorType::InternalError, "no upstream chosen")?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.total_connection_timeout = Some(self.svc.connect_timeout);
        // A WebSocket may stay quiet for long once upgraded; its handshake is bounded by the
        // rule's idle timeout, if any, not by the response timeout.
        if !session.is_upgrade_req() {
            peer.options.read_timeout = Some(self.http.response_timeout);
        }
        // Each tunnel connection has its own pool: let an upstream connection it leaves behind
        // go soon, rather than hold one of a small device's few sockets.
        peer.options.idle_timeout = Some(std::time::Duration::from_secs(5));
        peer.options.custom_l4 = Some(Arc::new(DirectConnect {
            addrs: ctx.addrs.clone(),
            timeout: self.svc.connect_timeout,
        }));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let route = &self.http.routes[ctx.route.expect("route chosen")];
        if route.strip_prefix && route.path != "/" {
            let pq = req
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            let rest = pq.strip_prefix(route.path.as_str()).unwrap_or(&pq);
            let new = if rest.starts_with('/') {
                rest.to_owned()
            } else {
                format!("/{rest}")
            };
            let uri = http::Uri::builder()
                .path_and_query(new)
                .build()
                .or_err(ErrorType::InvalidHTTPHeader, "rewriting the path")?;
            req.set_uri(uri);
        }
        // The hop the request arrived from is the relay; what the operator's client sent in
        // these headers is not trusted and is replaced or removed.
        req.remove_header("forwarded");
        req.remove_header("x-real-ip");
        match self.relay_ip {
            Some(ip) => req.insert_header("x-forwarded-for", ip.to_string())?,
            None => {
                req.remove_header("x-forwarded-for");
            }
        }
        req.insert_header("x-forwarded-proto", "http")?;
        if !ctx.host.is_empty() {
            req.insert_header("x-forwarded-host", ctx.host.clone())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        use ErrorType::*;
        let upstream = ctx.upstream.map(|a| a.to_string()).unwrap_or_default();
        let code = match e.etype() {
            HTTPStatus(c) => *c,
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => 504,
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => 502,
                pingora::ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => 0,
                    _ => 400,
                },
                _ => match e.etype() {
                    ConnectRefused | ConnectError | ConnectNoRoute => 502,
                    _ => 500,
                },
            },
        };
        let detail = format!("upstream {upstream} ({}): {e}", self.rule(ctx));
        ctx.detail = Some(detail.clone());
        if code > 0 {
            warn!(service = %self.svc.name, code, "{detail}");
            self.answer(session, code, detail).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map(|r| r.status.as_u16());
        let req = session.req_header();
        let reason = ctx.answered.or(match (e, status) {
            (Some(_), _) => Some(EndReason::Error),
            (None, Some(101)) => Some(EndReason::Upgraded),
            _ => Some(EndReason::Ok),
        });
        let rec = Record {
            event: "request",
            rule: self.rule(ctx),
            target: ctx.route.map(|i| self.http.routes[i].upstream.to_string()),
            address: ctx.upstream.map(|a| a.to_string()),
            method: Some(req.method.to_string()),
            host: Some(ctx.host.clone()),
            path: Some(req.uri.path().to_owned()),
            status,
            reason,
            detail: ctx.detail.take(),
            ..self.conn.clone()
        };
        let rec = match ctx.started {
            Some(t) => rec.duration(t.elapsed()),
            None => rec,
        };
        info!(service = %self.svc.name, status = ?status, path = %req.uri.path(), "http request");
        self.logged
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.gw.audit.record(rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPort;

    fn route(host: Option<&str>, path: &str) -> Route {
        Route {
            host: host.map(str::to_owned),
            path: path.into(),
            upstream: HostPort {
                host: "127.0.0.1".into(),
                port: 80,
            },
            strip_prefix: false,
        }
    }

    #[test]
    fn route_selection() {
        let r = vec![
            route(None, "/"),
            route(Some("press1.local"), "/"),
            route(Some("*.cell.local"), "/"),
            route(None, "/camera"),
            route(Some("press1.local"), "/api"),
        ];
        assert_eq!(select(&r, "press1.local", "/"), Some(1));
        assert_eq!(select(&r, "press1.local", "/api/x"), Some(4));
        assert_eq!(select(&r, "press1.local", "/apix"), Some(1));
        assert_eq!(select(&r, "robot.cell.local", "/"), Some(2));
        assert_eq!(select(&r, "cell.local", "/"), Some(0));
        assert_eq!(select(&r, "xcell.local", "/"), Some(0));
        assert_eq!(select(&r, "other", "/camera/1"), Some(3));
        assert_eq!(select(&r, "other", "/cameras"), Some(0));
        assert_eq!(select(&r[1..2], "other", "/"), None);
    }
}
