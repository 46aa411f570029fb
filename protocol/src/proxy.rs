//! Reaching the relay through a proxy: HTTP CONNECT (with basic auth) and SOCKS5 (with a user
//! name and password), the way operators' networks and gateways' sites require.
//!
//! A proxy is named by a URL: `http://[user:password@]host[:port]` (port 80 by default),
//! `socks5://…` (the relay's name is resolved here) or `socks5h://…` (the proxy resolves it;
//! port 1080 by default). User and password are percent-decoded. From the environment, as curl
//! reads it: `HTTPS_PROXY`, then `ALL_PROXY` (either case), unless `NO_PROXY` names the host.
//! The proxy only carries TCP: TLS to the relay, and its certificate check, stay end to end.
//!
//! SOCKS5 is tokio-socks's; the CONNECT exchange is a request and a bounded read of the
//! answer's head, small enough to write here.

use std::fmt;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Secret;

/// Longest answer head taken from an HTTP proxy.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    /// SOCKS5; `remote_dns`: the proxy resolves the relay's name (`socks5h://`).
    Socks5 {
        remote_dns: bool,
    },
}

/// A proxy to reach the relay through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub kind: Kind,
    pub host: String,
    pub port: u16,
    pub auth: Option<(String, Secret)>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// The proxy's URL without its password.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            Kind::Http => "http",
            Kind::Socks5 { remote_dns: false } => "socks5",
            Kind::Socks5 { remote_dns: true } => "socks5h",
        };
        let user = self
            .auth
            .as_ref()
            .map(|(u, _)| format!("{u}:***@"))
            .unwrap_or_default();
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "{scheme}://{user}{host}:{}", self.port)
    }
}

impl Proxy {
    /// Parse a proxy URL (see the module's documentation).
    pub fn parse(s: &str) -> Result<Proxy, String> {
        let bad = |why: &str| format!("proxy {:?}: {why}", redact(s));
        let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        let kind = match url.scheme() {
            "http" => Kind::Http,
            "socks5" => Kind::Socks5 { remote_dns: false },
            "socks5h" => Kind::Socks5 { remote_dns: true },
            "https" => {
                return Err(bad(
                    "https:// proxies are not supported; name it http:// (the tunnel through it \
                     carries TLS end to end to the relay)",
                ));
            }
            other => {
                return Err(bad(&format!(
                    "{other}:// is not a proxy kind culvert speaks: use http://, socks5:// or socks5h://"
                )));
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err(bad("no host")),
        };
        let port = url
            .port()
            .unwrap_or(if kind == Kind::Http { 80 } else { 1080 });
        let decode = |p: &str| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("the user or password is not UTF-8"))
        };
        let auth = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((decode(user)?, Secret::new(decode(password.unwrap_or(""))?))),
        };
        if url.path() != "/" && !url.path().is_empty() {
            return Err(bad("a proxy URL has no path"));
        }
        Ok(Proxy {
            kind,
            host,
            port,
            auth,
        })
    }

    /// The proxy for `host` from a setting as users write it: a URL, `none` (never a proxy,
    /// whatever the environment says), or no setting (the environment's).
    pub fn choose(setting: Option<&str>, host: &str) -> Result<Option<Proxy>, String> {
        match setting.map(str::trim) {
            Some("none" | "direct") => Ok(None),
            Some(url) => Proxy::parse(url).map(Some),
            None => Proxy::from_env(host),
        }
    }

    /// The proxy's URL with its credentials, percent-encoded, for another HTTP client.
    pub fn url_with_credentials(&self) -> Secret {
        let scheme = match self.kind {
            Kind::Http => "http",
            Kind::Socks5 { remote_dns: false } => "socks5",
            Kind::Socks5 { remote_dns: true } => "socks5h",
        };
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let user = self
            .auth
            .as_ref()
            .map(|(u, p)| format!("{}:{}@", enc(u), enc(p.expose())))
            .unwrap_or_default();
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        Secret::new(format!("{scheme}://{user}{host}:{}", self.port))
    }

    /// The proxy the environment names for `host`, if any (`HTTPS_PROXY`, then `ALL_PROXY`,
    /// either case; none when `NO_PROXY` covers `host`).
    pub fn from_env(host: &str) -> Result<Option<Proxy>, String> {
        Proxy::from_vars(host, |name| std::env::var(name).ok())
    }

    fn from_vars(
        host: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, String> {
        let get = |upper: &str| {
            var(upper)
                .or_else(|| var(&upper.to_ascii_lowercase()))
                .filter(|v| !v.trim().is_empty())
        };
        if let Some(list) = get("NO_PROXY")
            && no_proxy_covers(&list, host)
        {
            return Ok(None);
        }
        match get("HTTPS_PROXY").or_else(|| get("ALL_PROXY")) {
            // A bare host:port in these variables means an HTTP proxy, as curl takes it.
            Some(v) if !v.contains("://") => Proxy::parse(&format!("http://{v}")).map(Some),
            Some(v) => Proxy::parse(&v).map(Some),
            None => Ok(None),
        }
    }

    /// A TCP connection to `host:port` through this proxy.
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let refused = |message: String| ProxyError::Refused {
            proxy: self.to_string(),
            message,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ProxyError::Unreachable {
                proxy: self.to_string(),
                message: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        match self.kind {
            Kind::Http => self.http_connect(tcp, host, port).await,
            Kind::Socks5 { remote_dns } => {
                let target: (String, u16) = if remote_dns {
                    (host.to_owned(), port)
                } else {
                    let addr = tokio::net::lookup_host((host, port))
                        .await
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or_else(|| {
                            refused(format!(
                                "cannot resolve {host} here (socks5h:// lets the proxy resolve it)"
                            ))
                        })?;
                    (addr.ip().to_string(), port)
                };
                let target = (target.0.as_str(), target.1);
                let r = match &self.auth {
                    Some((user, password)) => {
                        tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(
                            tcp,
                            target,
                            user,
                            password.expose(),
                        )
                        .await
                    }
                    None => tokio_socks::tcp::Socks5Stream::connect_with_socket(tcp, target).await,
                };
                r.map(|s| s.into_inner()).map_err(|e| match e {
                    tokio_socks::Error::Io(e) => ProxyError::Unreachable {
                        proxy: self.to_string(),
                        message: e.to_string(),
                    },
                    tokio_socks::Error::PasswordAuthFailure(_)
                    | tokio_socks::Error::NoAcceptableAuthMethods => {
                        refused(format!("{e}: check the user and password in the proxy URL"))
                    }
                    e => refused(e.to_string()),
                })
            }
        }
    }

    async fn http_connect(
        &self,
        mut tcp: TcpStream,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, ProxyError> {
        let io = |e: std::io::Error| ProxyError::Unreachable {
            proxy: self.to_string(),
            message: e.to_string(),
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some((user, password)) = &self.auth {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", password.expose()));
            req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await.map_err(io)?;
        // The answer's head, byte by byte: nothing past it may be taken from the socket, it
        // is the relay's TLS.
        let mut head = Vec::with_capacity(256);
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_HEAD {
                return Err(ProxyError::Refused {
                    proxy: self.to_string(),
                    message: format!("its answer's head is longer than {MAX_HEAD} bytes"),
                });
            }
            let b = tcp.read_u8().await.map_err(io)?;
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head);
        let status_line = head.lines().next().unwrap_or("");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(200..=299) => Ok(tcp),
            Some(407) => Err(ProxyError::Refused {
                proxy: self.to_string(),
                message: format!(
                    "{}: {}",
                    status_line.trim(),
                    if self.auth.is_some() {
                        "check the user and password in the proxy URL"
                    } else {
                        "it wants a user and password: http://USER:PASSWORD@HOST:PORT"
                    }
                ),
            }),
            _ => Err(ProxyError::Refused {
                proxy: self.to_string(),
                message: format!("CONNECT {authority} answered {:?}", status_line.trim()),
            }),
        }
    }
}

/// Whether a `NO_PROXY` list covers `host`: `*`, the host itself, or a domain it is in
/// (`example.com` and `.example.com` both cover `relay.example.com`).
fn no_proxy_covers(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        let entry = entry.split_once(':').map_or(entry, |(h, _)| h);
        entry == "*"
            || (!entry.is_empty()
                && (host.eq_ignore_ascii_case(entry)
                    || host
                        .to_ascii_lowercase()
                        .ends_with(&format!(".{}", entry.to_ascii_lowercase()))))
    })
}

/// A proxy URL with its password hidden, for messages.
fn redact(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(at)) if at > i => {
            let creds = &s[i + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &s[..i + 3], &s[at..])
        }
        _ => s.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy answered and said no (authentication, policy): retrying as is cannot help.
    #[error("the proxy {proxy} refused: {message}")]
    Refused { proxy: String, message: String },
    /// The proxy could not be reached, or dropped the connection.
    #[error("cannot reach the proxy {proxy}: {message}")]
    Unreachable { proxy: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_kind_the_address_and_the_credentials() {
        let p = Proxy::parse("http://op%40site:p%3Ass@proxy.example.com:3128").unwrap();
        assert_eq!(p.kind, Kind::Http);
        assert_eq!((p.host.as_str(), p.port), ("proxy.example.com", 3128));
        let (user, password) = p.auth.clone().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("op@site", "p:ss"));
        assert_eq!(p.to_string(), "http://op@site:***@proxy.example.com:3128");
        assert!(!format!("{p:?}").contains("p:ss"));
        assert_eq!(Proxy::parse("http://10.0.0.1").unwrap().port, 80);
        let s = Proxy::parse("socks5h://[::1]").unwrap();
        assert_eq!(s.kind, Kind::Socks5 { remote_dns: true });
        assert_eq!((s.host.as_str(), s.port), ("::1", 1080));
        assert!(
            Proxy::parse("https://p:1")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(Proxy::parse("ftp://p:1").unwrap_err().contains("socks5://"));
        let e = Proxy::parse("gopher://u:secret@p:1").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        // Handed to another client, the URL still names the same proxy.
        for url in [
            "http://op%40site:p%3Ass@proxy.example.com:3128",
            "socks5h://[::1]:9",
        ] {
            let p = Proxy::parse(url).unwrap();
            assert_eq!(Proxy::parse(p.url_with_credentials().expose()).unwrap(), p);
        }
        assert_eq!(Proxy::choose(Some("none"), "relay").unwrap(), None);
    }

    /// An environment of `pairs`.
    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let m: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| m.get(name).cloned()
    }

    #[test]
    fn the_environment_is_read_as_curl_reads_it() {
        let relay = "relay.example.com";
        let https = Proxy::from_vars(
            relay,
            vars(&[
                ("https_proxy", "10.1.1.1:3128"),
                ("ALL_PROXY", "socks5://s:1"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!((https.kind, https.port), (Kind::Http, 3128));
        let all = Proxy::from_vars(relay, vars(&[("ALL_PROXY", "socks5://s:1")]))
            .unwrap()
            .unwrap();
        assert_eq!(all.kind, Kind::Socks5 { remote_dns: false });
        for no in [
            "*",
            relay,
            ".example.com",
            "example.com",
            "x.org, example.com:443",
        ] {
            let env = vars(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", no)]);
            assert_eq!(Proxy::from_vars(relay, env).unwrap(), None, "{no}");
        }
        let env = vars(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "ample.com")]);
        assert!(Proxy::from_vars(relay, env).unwrap().is_some());
        assert_eq!(Proxy::from_vars(relay, vars(&[])).unwrap(), None);
    }
}
