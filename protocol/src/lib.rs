//! culvert-protocol: everything both ends of a tunnel share.
//!
//! # Layout
//! - [`message`]: the AWS IoT Secure Tunneling protobuf `Message` and its limits.
//! - [`frame`]: the byte-stream framing (2-byte big-endian length + message), independent of
//!   WebSocket message boundaries. Every length is checked before anything is allocated.
//! - [`mux`]: the multiplexer state machine that maps `(service, stream id, connection id)` to
//!   local connections, speaking the V1, V2 and V3 message formats. It has no sockets, no clock and
//!   no async: feed it messages and calls, it hands back messages to send and events.
//! - [`rules`]: what each side of a tunnel may send, as the relay enforces it; [`forward`]: a
//!   relay's forwarding of one peer's frames (checks, chunks, resets), without I/O.
//! - [`session`]: the tokio shell that runs a [`mux::Mux`] over a WebSocket and exposes each tunnel
//!   connection as an `AsyncRead + AsyncWrite` [`session::Connection`].
//! - [`client`]: connecting to a relay (AWS's or ours) as source or destination, TLS included.
//! - [`secret`]: the one type for credentials, never shown in `Debug` or logs.
//! - [`datagram`]: UDP datagrams inside a tunnel connection's byte stream (a length each).
//! - [`ext`]: which culvert extensions a session may use, negotiated in the handshake so that
//!   AWS peers never see one; [`flow`] is the first of them: its negotiation in `mux`, its
//!   credit arithmetic in [`flow::Credit`].
//!
//! The core modules (`message`, `frame`, `mux`, `flow`, `ext`, `rules`, `forward`, `secret`,
//! `datagram`) are deterministic, use no I/O (`tests/core_has_no_io.rs` checks it) and are
//! tested in memory, by property tests and by the fuzz targets; only `session` and `client`
//! touch the runtime.

pub mod client;
pub mod datagram;
pub mod ext;
pub mod flow;
pub mod forward;
pub mod frame;
pub mod message;
pub mod mux;
pub mod proxy;
pub mod rules;
pub mod secret;
pub mod session;

pub use message::{Message, MessageType};
pub use secret::Secret;

/// WebSocket close codes culvert-relay sends (RFC 6455 §7.4), and what they tell a client.
pub mod close {
    /// The relay ended the session for good: the token was revoked (rotation), the tunnel
    /// closed or expired, or a newer connection replaced this one. A reconnect is refused
    /// with the reason.
    pub const NORMAL: u16 = 1000;
    /// The peer broke the protocol's rules (the reason says which).
    pub const POLICY: u16 = 1008;
    /// A WebSocket message over the protocol's limit.
    pub const TOO_BIG: u16 = 1009;
    /// "Service Restart": the relay is stopping or draining; reconnect (to it or another node)
    /// with the same tokens. Sent only to peers that negotiated culvert's extensions: the AWS
    /// localproxy exits for good on any close frame, so those peers see the connection end
    /// without one, which it retries.
    pub const RESTART: u16 = 1012;
}

/// Which end of a tunnel a program is. AWS calls this the local proxy mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The operator's side: accepts local TCP connections and starts streams.
    Source,
    /// The device side: receives streams and connects them to local targets.
    Destination,
}

impl Mode {
    /// The spelling used in the `local-proxy-mode` query parameter and in notifications.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Source => "source",
            Mode::Destination => "destination",
        }
    }

    pub fn other(self) -> Mode {
        match self {
            Mode::Source => Mode::Destination,
            Mode::Destination => Mode::Source,
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "source" | "src" => Ok(Mode::Source),
            "destination" | "dst" => Ok(Mode::Destination),
            other => Err(format!(
                "unknown mode {other:?}: expected \"source\" or \"destination\""
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The WebSocket subprotocols of the AWS tunnel protocol, newest first (the order a server
/// prefers them in).
pub const SUBPROTOCOLS: [&str; 3] = [
    "aws.iot.securetunneling-3.0",
    "aws.iot.securetunneling-2.0",
    "aws.iot.securetunneling-1.0",
];

/// The message format a peer uses. Negotiated through the subprotocol, and on the destination
/// side detected per stream from what the source sends (as the AWS localproxy does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    /// One stream per tunnel, no service id.
    V1,
    /// Several services, one connection per service at a time.
    V2,
    /// Several services, several simultaneous connections per service (`connectionId`).
    V3,
}

impl Format {
    /// The format that belongs to a negotiated subprotocol name.
    pub fn from_subprotocol(p: &str) -> Option<Format> {
        match p {
            "aws.iot.securetunneling-3.0" => Some(Format::V3),
            "aws.iot.securetunneling-2.0" => Some(Format::V2),
            "aws.iot.securetunneling-1.0" => Some(Format::V1),
            _ => None,
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "V1" => Ok(Format::V1),
            "V2" => Ok(Format::V2),
            "V3" => Ok(Format::V3),
            _ => Err(format!(
                "unknown protocol format {s:?}: expected V1, V2 or V3"
            )),
        }
    }
}

/// The MQTT topic on which culvertd tells culvert-relay where a tunnel stands with the site's
/// approval (`[consent] approve_tunnels`): a culvert extension, published only to a culvert
/// relay's broker (the tunnel's notification named its id), which lets a device publish on its
/// own topic and nowhere else.
pub fn on_site_topic(thing: &str) -> String {
    format!("culvert/things/{thing}/tunnels/on-site")
}

/// The topic a gateway reports its rules' targets on (`[mqtt] health_report_secs`): a culvert
/// extension like [`on_site_topic`], taken by a culvert relay's broker from that thing only.
/// The payload is JSON: `{"services": [{"name", "kind", "target", "state", "detail"}]}`, with
/// `kind` one of tcp, udp, unix, serial, http and `state` one of up, down, unchecked.
pub fn health_topic(thing: &str) -> String {
    format!("culvert/things/{thing}/health")
}

/// Characters that make text lie when a terminal, browser or log reader shows it: controls
/// (NUL, CR/LF, ESC sequences) and the bidirectional overrides and isolates ("Trojan Source").
/// The relay refuses them in stored text, culvertd in what it writes to its audit trail, and
/// the CLI shows them escaped.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// Text from a peer (a site's approval, a device's report), made safe to store and show:
/// [`is_unsafe_char`]s become `?`, it is trimmed and cut to at most `max_bytes` (at a
/// character boundary).
pub fn tidy_text(s: &str, max_bytes: usize) -> String {
    let s: String = s
        .chars()
        .map(|c| if is_unsafe_char(c) { '?' } else { c })
        .collect();
    let s = s.trim();
    let mut end = s.len().min(max_bytes);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].trim_end().to_owned()
}

/// Is `name` a valid service id or thing name as AWS allows them (`[A-Za-z0-9:_-]`, 1–128 chars)?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// Is `token` a valid client token (`^[A-Za-z0-9-]{32,128}$`)?
pub fn valid_client_token(token: &str) -> bool {
    (32..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A fresh random client token (a UUIDv4-shaped string, as AWS recommends).
pub fn new_client_token() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Cases for a property test: `default`, or `PROPTEST_CASES` when set (scripts/arm64 runs
/// fewer under emulation, where the full count takes minutes and checks the same logic the
/// native run checks in full).
#[cfg(test)]
pub(crate) fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_client_tokens() {
        assert!(valid_name("SSH"));
        assert!(valid_name("robot:3_hmi-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(129)));
        let t = new_client_token();
        assert!(valid_client_token(&t), "{t}");
        assert!(!valid_client_token("short"));
        assert!(!valid_client_token(&format!("{}_", "a".repeat(40))));
    }
}
