//! Connecting to a relay's data plane as source or destination: culvert-relay or AWS's
//! `data.tunneling.iot.<region>.amazonaws.com`. TLS 1.2+ with rustls, the system trust store
//! plus an optional extra CA file, the AWS handshake headers, and a classification of failures
//! into "refused, do not retry" (4xx, as AWS defines it) and "try again later".

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::ext::{self, Extensions};
use crate::message::MAX_WS_MESSAGE;
use crate::{Format, Mode, SUBPROTOCOLS, Secret};

/// Time allowed for TCP connect + TLS + WebSocket upgrade.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

pub type RelayStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where the relay is: `host[:port]`, optionally with a `wss://` prefix. Port 443 by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        Endpoint::parse_with_port(s, 443)
    }

    /// An MQTT broker: `mqtts://host[:port]` or `host[:port]`, port 8883 by default. TLS only.
    pub fn parse_mqtt(s: &str) -> Result<Endpoint, String> {
        if s.starts_with("mqtt://") || s.starts_with("tcp://") {
            return Err(format!(
                "{s:?}: culvert talks to MQTT brokers over TLS only (mqtts://)"
            ));
        }
        let rest = s
            .strip_prefix("mqtts://")
            .or_else(|| s.strip_prefix("ssl://"))
            .unwrap_or(s);
        Endpoint::parse_with_port(rest, 8883)
    }

    fn parse_with_port(s: &str, default_port: u16) -> Result<Endpoint, String> {
        let rest = s.strip_prefix("wss://").unwrap_or(s);
        if rest.starts_with("ws://") || rest.starts_with("http://") {
            return Err(format!(
                "{s:?}: the data plane is TLS only; use wss://host:port or host:port"
            ));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed [ in IPv6 address"))?;
            (h.to_owned(), p.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h.to_owned(), Some(p)),
                _ => (rest.to_owned(), None),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("{s:?}: expected host[:port]"));
        }
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| format!("{s:?}: port {p:?} is not a number 1-65535"))?,
            None => default_port,
        };
        Ok(Endpoint { host, port })
    }

    /// AWS's data-plane endpoint for a region.
    pub fn aws_region(region: &str) -> Endpoint {
        let suffix = if region.starts_with("cn-") {
            ".amazonaws.com.cn"
        } else {
            ".amazonaws.com"
        };
        Endpoint {
            host: format!("data.tunneling.iot.{region}{suffix}"),
            port: 443,
        }
    }

    fn url(&self, mode: Mode) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "wss://{host}:{}/tunnel?local-proxy-mode={}",
            self.port,
            mode.as_str()
        )
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A TLS client configuration trusting the system's roots plus, optionally, a PEM CA file
/// (for a relay with a private CA, such as `culvert-relay --dev`).
pub fn tls_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = root_store(extra_ca)?;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The system's trusted roots plus, optionally, the certificates of a PEM CA file, or of
/// every PEM file in a CA directory (the localproxy's `-c DIR`, as `openssl rehash` leaves it:
/// its hash-named links are the same files and add nothing twice).
pub fn root_store(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let n = if path.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| format!("cannot read CA directory {}: {e}", path.display()))?;
            let mut files: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            let mut n = 0;
            for file in files.iter().take(1000) {
                // Other files may sit beside the certificates (CRLs, a README): skipped.
                n += add_pem_certs(&mut roots, file).unwrap_or(0);
            }
            n
        } else {
            add_pem_certs(&mut roots, path)?
        };
        if n == 0 {
            return Err(format!(
                "CA {} {} holds no PEM certificate",
                if path.is_dir() { "directory" } else { "file" },
                path.display()
            ));
        }
    }
    if roots.is_empty() {
        return Err("no trusted CA certificates: install ca-certificates or pass a CA file".into());
    }
    Ok(roots)
}

/// The access token given directly (flag or environment) or in a file (trimmed).
pub fn access_token(direct: Option<String>, file: Option<&Path>) -> Result<Secret, String> {
    let token = match (direct, file) {
        (Some(t), _) => t,
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read the token file {}: {e}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => return Err("no access token given".into()),
    };
    if token.is_empty() {
        return Err("the access token is empty".into());
    }
    Ok(Secret::new(token))
}

/// How to reach and authenticate to a relay.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub endpoint: Endpoint,
    pub mode: Mode,
    pub access_token: Secret,
    /// Binds the first connection and allows reconnecting with the same access token.
    pub client_token: Option<Secret>,
    pub tls: Arc<rustls::ClientConfig>,
    /// culvert extensions to offer in the handshake ([`crate::ext`]); a relay that does not
    /// accept them (AWS's) never sees one used.
    pub extensions: Extensions,
    /// The proxy to reach the relay through, if any ([`crate::proxy`]).
    pub proxy: Option<crate::proxy::Proxy>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The relay refused the token or the request (HTTP 4xx). Retrying cannot help.
    #[error("relay refused the connection (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// The relay is there but not able to serve now (HTTP 5xx). Retry with backoff.
    #[error("relay unavailable (HTTP {status}): {message}")]
    Unavailable { status: u16, message: String },
    /// TCP, TLS or WebSocket failure. Retry with backoff.
    #[error("cannot reach relay {endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    /// The relay's certificate failed verification: a configuration problem on this side (the
    /// CA is missing, or the name connected to is not the certificate's). An operator at a
    /// terminal should be told; an unattended gateway keeps retrying (it may be the relay's
    /// certificate that is being fixed).
    #[error(
        "the certificate of relay {endpoint} is not trusted ({reason}): pass the CA that signed it \
         with --ca FILE (or CULVERT_CA; for culvert-relay --dev, its state directory's ca.pem), \
         or connect by the name the certificate was issued for"
    )]
    Untrusted { endpoint: String, reason: String },
    /// The proxy in between could not be reached (retry), or refused (do not).
    #[error("{0}")]
    Proxy(#[from] crate::proxy::ProxyError),
}

impl ConnectError {
    /// Whether retrying can succeed (AWS: 5xx and transport errors yes, 4xx no; a proxy that
    /// refused, no).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ConnectError::Refused { .. }
                | ConnectError::Proxy(crate::proxy::ProxyError::Refused { .. })
        )
    }
}

/// The certificate verification failure inside a TLS handshake error, if that is what it is.
fn certificate_error(e: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    let tokio_tungstenite::tungstenite::Error::Io(io) = e else {
        return None;
    };
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(c) => Some(format!("{c:?}")),
        _ => None,
    }
}

/// Bytes read from the TLS stream at a time by the WebSocket layer. tungstenite's default
/// (128 KiB) is allocated per connection up front; a TLS record carries at most 16 KiB, so
/// reading more at once gains nothing, and idle tunnels stay small.
pub const WS_READ_CHUNK: usize = 16 * 1024;

/// WebSocket limits of the AWS protocol.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
        .read_buffer_size(WS_READ_CHUNK)
}

/// An open data-plane WebSocket and what its handshake negotiated.
pub struct Connected {
    pub ws: RelayStream,
    /// The message format the negotiated subprotocol implies.
    pub format: Format,
    /// The culvert extensions the relay accepted (none from AWS's relay).
    pub extensions: Extensions,
}

/// The data plane's upgrade request to `url`: the subprotocols, the access token, the client
/// token if any, and the culvert extensions offered.
pub fn upgrade_request(
    url: &str,
    access_token: &str,
    client_token: Option<&str>,
    offer: Extensions,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let headers = req.headers_mut();
    let hv = |v: &str, what: &str| {
        HeaderValue::from_str(v).map_err(|_| format!("{what} contains invalid characters"))
    };
    headers.insert(
        "sec-websocket-protocol",
        hv(&SUBPROTOCOLS.join(", "), "protocol")?,
    );
    headers.insert("access-token", hv(access_token, "access token")?);
    if let Some(ct) = client_token {
        headers.insert("client-token", hv(ct, "client token")?);
    }
    if let Some(o) = offer.header_value() {
        headers.insert(ext::HEADER, hv(&o, "extensions")?);
    }
    Ok(req)
}

/// What a relay's answer to [`upgrade_request`] negotiated: the message format, and the
/// extensions accepted (only what was offered counts, whatever the relay answers).
pub fn negotiated(
    resp: &tokio_tungstenite::tungstenite::handshake::client::Response,
    offer: Extensions,
) -> Result<(Format, Extensions), String> {
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_subprotocol)
        .ok_or_else(|| "relay returned no tunnel subprotocol".to_owned())?;
    let answered: Vec<&str> = resp
        .headers()
        .get_all(ext::HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    Ok((
        chosen,
        Extensions::parse(&answered.join(",")).intersect(offer),
    ))
}

/// Open the data-plane WebSocket.
pub async fn connect(opts: &ConnectOptions) -> Result<Connected, ConnectError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_inner(opts))
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Transport {
                endpoint: opts.endpoint.to_string(),
                message: format!("handshake took longer than {HANDSHAKE_TIMEOUT:?}"),
            })
        })
}

async fn connect_inner(opts: &ConnectOptions) -> Result<Connected, ConnectError> {
    let transport = |message: String| ConnectError::Transport {
        endpoint: opts.endpoint.to_string(),
        message,
    };
    let req = upgrade_request(
        &opts.endpoint.url(opts.mode),
        opts.access_token.expose(),
        opts.client_token.as_ref().map(Secret::expose),
        opts.extensions,
    )
    .map_err(transport)?;
    let tcp = match &opts.proxy {
        Some(proxy) => {
            proxy
                .connect(&opts.endpoint.host, opts.endpoint.port)
                .await?
        }
        None => TcpStream::connect((opts.endpoint.host.as_str(), opts.endpoint.port))
            .await
            .map_err(|e| transport(e.to_string()))?,
    };
    let _ = tcp.set_nodelay(true);
    let result = tokio_tungstenite::client_async_tls_with_config(
        req,
        tcp,
        Some(ws_config()),
        Some(Connector::Rustls(opts.tls.clone())),
    )
    .await;
    let (ws, resp) = match result {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let message = error_message(resp.body().as_deref().unwrap_or_default())
                .unwrap_or_else(|| resp.status().canonical_reason().unwrap_or("").to_owned());
            return Err(if resp.status().is_client_error() {
                ConnectError::Refused { status, message }
            } else {
                ConnectError::Unavailable { status, message }
            });
        }
        Err(e) => {
            return Err(match certificate_error(&e) {
                Some(reason) => ConnectError::Untrusted {
                    endpoint: opts.endpoint.to_string(),
                    reason,
                },
                None => transport(e.to_string()),
            });
        }
    };
    let (chosen, accepted) = negotiated(&resp, opts.extensions).map_err(transport)?;
    Ok(Connected {
        ws,
        format: chosen,
        extensions: accepted,
    })
}

/// Connect, retrying transport failures and 5xx answers with `backoff` (logging each), until
/// it succeeds, the relay refuses (a 4xx, returned as `Err`), or `shutdown` is cancelled
/// (`Ok(None)`).
pub async fn connect_retrying(
    opts: &ConnectOptions,
    backoff: &mut Backoff,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Option<Connected>, ConnectError> {
    connect_retrying_until(opts, backoff, shutdown, |e| !e.is_retryable()).await
}

/// [`connect_retrying`], giving up on the errors `is_final` picks (besides refusals).
pub async fn connect_retrying_until(
    opts: &ConnectOptions,
    backoff: &mut Backoff,
    shutdown: &tokio_util::sync::CancellationToken,
    is_final: fn(&ConnectError) -> bool,
) -> Result<Option<Connected>, ConnectError> {
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = connect(opts) => r,
        };
        match attempt {
            Ok(x) => return Ok(Some(x)),
            Err(e) if !e.is_retryable() || is_final(&e) => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot connect to relay");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The human message in an error body: a JSON `{"message": ...}` (culvert-relay), or the text.
pub fn error_message(body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(body);
    // Avoid a JSON dependency for one field: look for "message":"...".
    if let Some(i) = text.find("\"message\"") {
        let rest = &text[i + 9..];
        if let Some(start) = rest.find('"') {
            let rest = &rest[start + 1..];
            let mut out = String::new();
            let mut esc = false;
            for ch in rest.chars() {
                match (esc, ch) {
                    (true, c) => {
                        out.push(c);
                        esc = false;
                    }
                    (false, '\\') => esc = true,
                    (false, '"') => return Some(out),
                    (false, c) => out.push(c),
                }
            }
        }
    }
    Some(text.trim().chars().take(500).collect())
}

/// Add the certificates of one PEM file; how many.
fn add_pem_certs(roots: &mut rustls::RootCertStore, path: &Path) -> Result<usize, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    let mut n = 0;
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Exponential backoff with full jitter, for reconnecting to a relay or broker.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [base/2, min(max, base·2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let lo = (self.base / 2).min(cap);
        let span = cap.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(if span == 0 {
            0
        } else {
            rand::random::<u64>() % (span + 1)
        })
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("wss://relay.example:8443").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("relay.example", 8443));
        assert_eq!(Endpoint::parse("relay.example").unwrap().port, 443);
        let v6 = Endpoint::parse("[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(
            v6.url(Mode::Source),
            "wss://[::1]:9000/tunnel?local-proxy-mode=source"
        );
        assert!(Endpoint::parse("ws://x:1").is_err());
        assert!(Endpoint::parse("x:notaport").is_err());
        assert_eq!(
            Endpoint::parse_mqtt("mqtts://b.example").unwrap().port,
            8883
        );
        assert_eq!(Endpoint::parse_mqtt("b.example:1883").unwrap().port, 1883);
        assert!(Endpoint::parse_mqtt("mqtt://b.example").is_err());
        assert_eq!(
            Endpoint::aws_region("cn-north-1").host,
            "data.tunneling.iot.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            error_message(br#"{"error":"token_reused","message":"access token \"x\" was used"}"#),
            Some("access token \"x\" was used".into())
        );
        assert_eq!(error_message(b"plain"), Some("plain".into()));
        assert_eq!(error_message(b""), None);
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
