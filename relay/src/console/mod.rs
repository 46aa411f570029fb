//! The web console: a browser front end served by the relay on a listener, port and origin of
//! its own (`[console] listen`), beside the API's.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | / and /static/… | the page, its script and its style (compiled into the relay) |
//! | POST | /session | log in `{"name", "password"}`: sets the session cookie, returns the CSRF token |
//! | GET | /session | who is logged in, and the CSRF token (401 when no one is) |
//! | POST | /session/logout | log out: the session's key is revoked, the cookie cleared |
//! | … | /api/v1/… | the control API ([`crate::api`]), authenticated by the session |
//!
//! A session is a login key ([`crate::access::Access::login`]: 12 h, failed logins limited per
//! source address) held in a cookie `Secure; HttpOnly; SameSite=Strict`, so the page's script
//! never sees it. A session unused for `idle_minutes` ends: its key is revoked. Every request
//! that changes something must come from the console's own origin (`Origin`, and
//! `Sec-Fetch-Site` when the browser sends it) and carry the session's CSRF token in
//! `X-CSRF-Token`; the token is an HMAC of the key's id under a secret of this process. Every
//! response carries a strict Content-Security-Policy (scripts and styles from this origin only,
//! no inline code, no framing), and the API's answers are not cached.
//!
//! What an operator may do is exactly what their API key may do: the console calls the same
//! handlers, which check the same roles and grants and write the same audit trail.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::access::Principal;

pub mod ssh;
pub mod terminal;
use crate::reply::error;
use crate::state::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "culvert_session";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Default idle time after which a session ends.
pub const DEFAULT_IDLE_MINUTES: u64 = 30;
/// Browser connections at once (a console has a few operators, each with a few tabs).
const MAX_CONNECTIONS: usize = 512;
/// Largest request body (the API's own limit).
const MAX_BODY: usize = 64 * 1024;
/// Sessions whose last use is remembered (older ones are forgotten first; a forgotten one
/// counts as used now, as after a restart).
const MAX_TRACKED: usize = 10_000;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The page's policy: as [`CSP`], and `<style>` elements carrying this response's nonce (the
/// terminal, xterm.js, writes its colours and cell sizes into style elements; the page's
/// script gives them the nonce, so no other style element applies).
fn page_csp(nonce: &str) -> String {
    CSP.replace(
        "style-src 'self';",
        &format!("style-src 'self' 'nonce-{nonce}';"),
    )
}

/// `Set-Cookie` for the session: `value` for `max_age` seconds (0 clears it).
macro_rules! concat_cookie {
    ($value:expr, $max_age:expr) => {
        concat!(
            "culvert_session=",
            $value,
            "; Path=/; Max-Age=",
            $max_age,
            "; Secure; HttpOnly; SameSite=Strict"
        )
    };
}
const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");
// From the npm registry at build time (relay/build.rs, relay/console-web).
const XTERM_JS: &str = include_str!(concat!(
    env!("CULVERT_CONSOLE_MODULES"),
    "/@xterm/xterm/lib/xterm.js"
));
const XTERM_CSS: &str = include_str!(concat!(
    env!("CULVERT_CONSOLE_MODULES"),
    "/@xterm/xterm/css/xterm.css"
));
const XTERM_FIT_JS: &str = include_str!(concat!(
    env!("CULVERT_CONSOLE_MODULES"),
    "/@xterm/addon-fit/lib/addon-fit.js"
));

/// `[console]` after validation.
#[derive(Clone, Debug)]
pub struct ConsoleSettings {
    pub listen: SocketAddr,
    /// A session unused this long ends.
    pub idle: Duration,
    /// Where SSH consoles pin devices' host keys ([`ssh::KnownHosts`]).
    pub known_hosts: std::path::PathBuf,
}

/// The host-key pins' file in the state directory.
pub const KNOWN_HOSTS_FILE: &str = "console-known-hosts";

/// The console's own state beside the relay's.
pub struct Console {
    relay: Arc<AppState>,
    /// Key of the CSRF tokens' HMAC (new each run: a page asks for its token again).
    csrf_key: ring::hmac::Key,
    idle_ms: i64,
    sessions: Mutex<LastUse>,
    /// Terminals open at once ([`terminal::MAX_TERMINALS`]).
    terminals: Arc<tokio::sync::Semaphore>,
    pins: ssh::KnownHosts,
}

/// Each session's (login key id's) last use, for the idle timeout; at most [`MAX_TRACKED`].
#[derive(Default)]
struct LastUse(HashMap<String, i64>);

impl LastUse {
    /// Note a use of session `key_id` at `now`; false when it had been idle longer than
    /// `idle_ms` (it is then forgotten).
    fn touch(&mut self, key_id: &str, now: i64, idle_ms: i64) -> bool {
        let last = &mut self.0;
        if let Some(&t) = last.get(key_id)
            && now.saturating_sub(t) > idle_ms
        {
            last.remove(key_id);
            return false;
        }
        if last.len() >= MAX_TRACKED && !last.contains_key(key_id) {
            last.retain(|_, t| now.saturating_sub(*t) <= idle_ms);
            if last.len() >= MAX_TRACKED
                && let Some(oldest) = last.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone())
            {
                last.remove(&oldest);
            }
        }
        last.insert(key_id.to_owned(), now);
        true
    }
}

impl Console {
    pub fn new(relay: Arc<AppState>, settings: &ConsoleSettings) -> Console {
        let rng = ring::rand::SystemRandom::new();
        Console {
            relay,
            csrf_key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .expect("the system's random number generator works"),
            idle_ms: i64::try_from(settings.idle.as_millis()).unwrap_or(i64::MAX),
            sessions: Mutex::new(LastUse::default()),
            terminals: Arc::new(tokio::sync::Semaphore::new(terminal::MAX_TERMINALS)),
            pins: ssh::KnownHosts::new(settings.known_hosts.clone()),
        }
    }

    fn csrf_token(&self, key_id: &str) -> String {
        let tag = ring::hmac::sign(&self.csrf_key, key_id.as_bytes());
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The request carries session `key_id`'s CSRF token.
    fn csrf_ok(&self, headers: &HeaderMap, key_id: &str) -> bool {
        let presented = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        self.csrf_matches(presented, key_id)
    }

    /// `presented` is session `key_id`'s CSRF token (compared in constant time).
    fn csrf_matches(&self, presented: &str, key_id: &str) -> bool {
        let expected = self.csrf_token(key_id);
        bool::from(subtle::ConstantTimeEq::ct_eq(
            presented.as_bytes(),
            expected.as_bytes(),
        ))
    }

    /// Note a use of session `key_id` now; false when it had been idle too long.
    fn touch(&self, key_id: &str, now: i64) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .touch(key_id, now, self.idle_ms)
    }
}

pub fn router(console: Arc<Console>) -> Router {
    let api = crate::server::api_routes()
        .route_layer(axum::middleware::from_fn_with_state(
            console.clone(),
            require_session,
        ))
        .with_state(console.relay.clone());
    Router::new()
        .route("/", get(index))
        .route("/static/{file}", get(asset))
        .route("/terminal", get(terminal::terminal))
        .route("/session", post(login).get(session))
        .route("/session/logout", post(logout))
        .with_state(console)
        .nest("/api/v1", api)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such page: the console is at /",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
}

/// The page, with a style nonce of its own in its policy and in a meta element.
async fn index() -> Response {
    let nonce = crate::tokens::new_secret();
    let mut r = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML.replace("{{style-nonce}}", &nonce),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&page_csp(&nonce)) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

/// The page's script and styles, and xterm.js's: name, content, type.
const ASSETS: [(&str, &str, &str); 5] = [
    ("console.js", CONSOLE_JS, "text/javascript; charset=utf-8"),
    ("console.css", CONSOLE_CSS, "text/css; charset=utf-8"),
    ("xterm.js", XTERM_JS, "text/javascript; charset=utf-8"),
    ("xterm.css", XTERM_CSS, "text/css; charset=utf-8"),
    (
        "addon-fit.js",
        XTERM_FIT_JS,
        "text/javascript; charset=utf-8",
    ),
];

/// `GET /static/{file}`: one of [`ASSETS`].
async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, body, content_type)) => {
            ([(header::CONTENT_TYPE, *content_type)], *body).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such file: the console is at /",
        ),
    }
}

/// On every response: the Content-Security-Policy and its companions, and no caching.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// The session key in the request's cookies.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// A request that changes something must come from the console's own page: its `Origin` is
/// this origin (browsers send it on every POST), and `Sec-Fetch-Site`, when sent, says so.
fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (host, origin) {
        (Some(h), Some(o)) if o.strip_prefix("https://") == Some(h) => {}
        (_, None) => return Err("the request has no Origin header: use the console's page"),
        _ => return Err("the request comes from another site's page"),
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        None | Some("same-origin") => Ok(()),
        Some(_) => Err("the request comes from another site's page"),
    }
}

fn forbidden(state: &AppState, req: &axum::extract::Request, message: &str) -> Response {
    state.audit.refusal(
        "console_refused",
        json!({"method": req.method().as_str(), "path": crate::audit::clip(req.uri().path()), "status": 403, "message": message}),
    );
    error(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The console's API calls: the session cookie names the operator; changes need the origin
/// check and the CSRF token. Then the same path as an API key ([`crate::api::run_as`]).
async fn require_session(
    State(console): State<Arc<Console>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let state = &console.relay;
    let principal = match authenticate(&console, req.headers()).await {
        Ok(p) => p,
        Err(r) => {
            state.audit.refusal(
                "console_refused",
                json!({"method": req.method().as_str(), "path": crate::audit::clip(req.uri().path()), "status": 401}),
            );
            return r;
        }
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        if let Err(m) = same_origin(req.headers()) {
            return forbidden(state, &req, m);
        }
        if !console.csrf_ok(req.headers(), principal.key_id().unwrap_or_default()) {
            return forbidden(
                state,
                &req,
                "missing or wrong CSRF token: reload the console's page",
            );
        }
    }
    crate::api::run_as(state, principal, req, next).await
}

fn not_logged_in(message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(concat_cookie!("", "0")),
    );
    r
}

/// The operator of the session cookie, if it is a live session: a login key that is valid
/// and has not been idle too long (an idle one is revoked here).
async fn authenticate(console: &Console, headers: &HeaderMap) -> Result<Principal, Response> {
    let state = &console.relay;
    let Some(secret) = session_cookie(headers) else {
        return Err(not_logged_in("not logged in: log in on the console's page"));
    };
    let principal = state.access.authenticate(secret).map_err(|_| {
        not_logged_in("the session has ended (expired, logged out or revoked): log in again")
    })?;
    let (Some(name), Some(key)) = (principal.operator(), principal.key_id()) else {
        // The bootstrap key is for the API, never a console session.
        return Err(not_logged_in("not logged in: log in on the console's page"));
    };
    if !console.touch(key, state.access.now()) {
        if let Err(e) = state.access.revoke_key(name, key).await {
            warn!(error = %e, operator = name, "could not revoke an idle console session's key");
        }
        // The tunnels opened in the session close with it, as with any revoked key.
        let closed = crate::api::operators::enforce(state, name).await;
        state.audit.record(
            "console_session_expired",
            json!({"operator": name, "key": key, "idleMinutes": console.idle_ms / 60_000, "tunnelsClosed": closed}),
        );
        return Err(not_logged_in(
            "the session ended after being idle: log in again",
        ));
    }
    Ok(principal)
}

fn session_cookie_header(secret: &str, max_age_secs: i64) -> String {
    format!("{COOKIE}={secret}; Path=/; Max-Age={max_age_secs}; Secure; HttpOnly; SameSite=Strict")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    name: String,
    password: String,
}

/// `POST /session`: a password login (the API's `/api/v1/login`, same limits and audit), kept
/// in the cookie.
async fn login(
    State(console): State<Arc<Console>>,
    peer: Option<Extension<crate::state::Peer>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let state = &console.relay;
    let from = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |Extension(p)| {
        p.0.ip()
    });
    if let Err(m) = same_origin(&headers) {
        state.audit.refusal(
            "console_refused",
            json!({"method": "POST", "path": "/session", "status": 403, "from": from.to_string(), "message": m}),
        );
        return error(StatusCode::FORBIDDEN, "forbidden", m);
    }
    let Ok(b) = serde_json::from_slice::<LoginBody>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected {\"name\": …, \"password\": …}",
        );
    };
    let name = crate::audit::clip(&b.name);
    match state.access.login(&b.name, b.password, from).await {
        Ok((o, key)) => {
            state.audit.record(
                "login",
                json!({"operator": o.name, "from": from.to_string(), "key": key.id, "console": true}),
            );
            console.touch(&key.id, state.access.now());
            let max_age = key
                .expires_ms
                .map_or(crate::access::LOGIN_KEY_LIFE_MS, |e| e - state.access.now())
                / 1000;
            let mut r = (
                StatusCode::CREATED,
                axum::Json(json!({
                    "name": o.name,
                    "role": o.role,
                    "csrfToken": console.csrf_token(&key.id),
                    "expiresAt": key.expires_ms.map(crate::api::rfc3339),
                    "idleMinutes": console.idle_ms / 60_000,
                })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&session_cookie_header(&key.secret, max_age)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => crate::api::operators::login_refused(state, &name, from, e, true),
    }
}

/// `GET /session`: who the session is, and its CSRF token (the page asks on every load).
async fn session(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match authenticate(&console, &headers).await {
        Ok(p) => axum::Json(json!({
            "name": p.label(),
            "role": p.role(),
            "csrfToken": console.csrf_token(p.key_id().unwrap_or_default()),
            "idleMinutes": console.idle_ms / 60_000,
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// `POST /session/logout`: the session's key is revoked and the cookie cleared.
async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let state = &console.relay;
    if let Err(m) = same_origin(&headers) {
        return error(StatusCode::FORBIDDEN, "forbidden", m);
    }
    let p = match authenticate(&console, &headers).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (Some(name), Some(key)) = (p.operator(), p.key_id()) else {
        return not_logged_in("not logged in");
    };
    if !console.csrf_ok(&headers, key) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "missing or wrong CSRF token: reload the console's page",
        );
    }
    if let Err(e) = state.access.revoke_key(name, key).await {
        warn!(error = %e, operator = name, "could not revoke a console session's key at logout");
        return e.into_response();
    }
    let closed = crate::api::operators::enforce(state, name).await;
    state.audit.record(
        "logout",
        json!({"operator": name, "key": key, "console": true, "tunnelsClosed": closed}),
    );
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(concat_cookie!("", "0")),
    );
    r
}

/// Serve the console on `listener` until `shutdown`: TLS (the relay's certificate), HTTP/1.1,
/// a bounded number of connections, each handshake and request head within `timeout`.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    console: Arc<Console>,
    shutdown: CancellationToken,
    timeout: Duration,
) {
    let app = router(console);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, peer)) = crate::slots::accept(&listener, &shutdown, "console").await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "console: {MAX_CONNECTIONS} connections are open; closing this one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tls, app, stop) = (tls.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(timeout, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "console: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "console: TLS handshake timed out");
                    return;
                }
            };
            let app = tower::ServiceExt::map_request(
                app,
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(crate::state::Peer(peer));
                    req
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                // The terminals' WebSockets.
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "console: connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_session_idle_too_long_ends_and_the_tracked_ones_stay_bounded() {
        let mut s = LastUse::default();
        let idle = 30 * 60_000;
        assert!(s.touch("k1", 0, idle), "a new session");
        assert!(s.touch("k1", idle, idle), "used within the idle time");
        assert!(
            s.touch("k1", 2 * idle, idle),
            "each use starts the idle time again"
        );
        assert!(
            !s.touch("k1", 3 * idle + 1, idle),
            "idle one millisecond too long"
        );
        assert!(
            s.touch("k1", 3 * idle + 2, idle),
            "forgotten, as after a restart"
        );
        for i in 0..MAX_TRACKED + 10 {
            assert!(s.touch(&format!("n{i}"), 4 * idle + i as i64, idle));
        }
        assert!(s.0.len() <= MAX_TRACKED, "{}", s.0.len());
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; culvert_session=abc; b=2")]);
        assert_eq!(session_cookie(&h), Some("abc"));
        assert_eq!(session_cookie(&headers(&[("cookie", "a=1")])), None);
    }

    #[test]
    fn only_the_consoles_own_origin_may_change_things() {
        let ok = headers(&[
            ("host", "127.0.0.1:8444"),
            ("origin", "https://127.0.0.1:8444"),
        ]);
        assert!(same_origin(&ok).is_ok());
        for bad in [
            headers(&[("host", "127.0.0.1:8444")]),
            headers(&[
                ("host", "127.0.0.1:8444"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[
                ("host", "127.0.0.1:8444"),
                ("origin", "http://127.0.0.1:8444"),
            ]),
            headers(&[
                ("host", "127.0.0.1:8444"),
                ("origin", "https://127.0.0.1:8444"),
                ("sec-fetch-site", "cross-site"),
            ]),
        ] {
            assert!(same_origin(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_cookie_is_secure_httponly_and_strict() {
        let c = session_cookie_header("s3cret", 600);
        assert_eq!(
            c,
            "culvert_session=s3cret; Path=/; Max-Age=600; Secure; HttpOnly; SameSite=Strict"
        );
        assert_eq!(
            concat_cookie!("", "0"),
            "culvert_session=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"
        );
    }
}
