//! culvertd's configuration file. The full reference, with every key, is docs/configuration.md.
//!
//! ```toml
//! [relay]
//! endpoint = "relay.example.com:443"   # host:port of culvert-relay, or AWS's data endpoint
//!
//! [acl]                                # default deny: a target must be in an allowed network
//! allow = ["192.168.10.0/24"]
//! deny = ["192.168.10.1/32"]
//!
//! [tunnel_limits]                      # each tunnel, all its connections together
//! max_connections = 64
//!
//! [audit]
//! file = "/var/log/culvert/audit.jsonl"
//!
//! [services.SSH]                       # a tcp rule: the service name operators ask for …
//! target = "192.168.10.21:22"          # … and where its connections go (or unix:/path)
//! max_connections = 4
//!
//! [services.HMI]                       # an http rule: route by Host and path prefix
//! routes = [
//!   { host = "press2.local", upstream = "192.168.10.40:80" },
//!   { path = "/camera", upstream = "192.168.10.41:8080", strip_prefix = true },
//! ]
//! ```
//!
//! Reading happens in three passes so that one run reports every problem, each with file, line
//! and key: TOML syntax (all errors, duplicate tables included), then the typed structure (unknown
//! keys are collected rather than fatal), then validation (targets, networks, limits, and every
//! literal target address checked against the ACL).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use culvert_protocol::client::Endpoint;

use crate::acl::{self, Policy};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// A UDP flow that carried no datagram either way for this long ends (UDP has no close): as
/// long as `culvert connect` keeps a flow by default, and between Linux conntrack's 30 s for a
/// one-way flow and its 120 s for a stream.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Ports of the gateway itself that no rule reaches unless one allows them explicitly.
const DEFAULT_MANAGEMENT_PORTS: &[u16] = &[22];

#[derive(Deserialize)]
struct RawConfig {
    relay: Option<RawRelay>,
    mqtt: Option<RawMqtt>,
    acl: Option<RawAcl>,
    tunnel_limits: Option<RawLimits>,
    audit: Option<RawAudit>,
    daemon: Option<RawDaemon>,
    consent: Option<RawConsent>,
    /// Read service by service from the document (see `parse`); skipped here.
    #[serde(default, skip_deserializing)]
    services: BTreeMap<String, RawService>,
}

#[derive(Deserialize)]
struct RawRelay {
    endpoint: Option<Spanned<String>>,
    region: Option<String>,
    ca: Option<Spanned<PathBuf>>,
    proxy: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawMqtt {
    broker: Spanned<String>,
    thing_name: Spanned<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<Spanned<PathBuf>>,
    client_id: Option<String>,
    client_cert: Option<Spanned<PathBuf>>,
    client_key: Option<Spanned<PathBuf>>,
    ca: Option<Spanned<PathBuf>>,
    topic: Option<Spanned<String>>,
    health_report_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
struct RawAcl {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    management_ports: Option<Vec<u16>>,
}

#[derive(Deserialize, Default)]
struct RawLimits {
    max_connections: Option<Spanned<u64>>,
    connection_rate: Option<Spanned<String>>,
    max_bytes_per_sec: Option<Spanned<u64>>,
    max_bytes_per_sec_to_target: Option<Spanned<u64>>,
    max_bytes_per_sec_from_target: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
struct RawDaemon {
    shutdown_grace_secs: Option<Spanned<u64>>,
    metrics_listen: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
    max_tunnels: Option<Spanned<u64>>,
    resume_hold_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
struct RawAudit {
    file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
struct RawConsent {
    switch_file: Option<Spanned<PathBuf>>,
    approve_tunnels: Option<Spanned<bool>>,
    approval_dir: Option<Spanned<PathBuf>>,
    approval_timeout_secs: Option<Spanned<u64>>,
    hmi_listen: Option<Spanned<String>>,
    hmi_token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
struct RawService {
    target: Option<Spanned<String>>,
    routes: Option<Spanned<Vec<RawRoute>>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    connect_timeout_secs: Option<Spanned<u64>>,
    idle_timeout_secs: Option<Spanned<u64>>,
    response_timeout_secs: Option<Spanned<u64>>,
    // The keys of RawLimits (serde's flatten would lose the line numbers).
    max_connections: Option<Spanned<u64>>,
    connection_rate: Option<Spanned<String>>,
    max_bytes_per_sec: Option<Spanned<u64>>,
    max_bytes_per_sec_to_target: Option<Spanned<u64>>,
    max_bytes_per_sec_from_target: Option<Spanned<u64>>,
    modbus: Option<Spanned<RawModbus>>,
    serial: Option<Spanned<RawSerial>>,
    probe: Option<bool>,
}

/// `[services.NAME.serial]`: a serial rule's line settings.
#[derive(Deserialize)]
struct RawSerial {
    baud: Option<Spanned<u64>>,
    data_bits: Option<Spanned<u64>>,
    parity: Option<Spanned<String>>,
    stop_bits: Option<Spanned<u64>>,
    flow_control: Option<Spanned<String>>,
    rfc2217: Option<bool>,
}

/// `[services.NAME.modbus]`: a Modbus/TCP rule's filter.
#[derive(Deserialize)]
struct RawModbus {
    read_only: Option<Spanned<bool>>,
    #[serde(default)]
    units: Vec<Spanned<i64>>,
    #[serde(default)]
    registers: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    upstream: Spanned<String>,
    #[serde(default)]
    strip_prefix: bool,
}

/// How culvertd receives tunnel notifications.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttConfig {
    pub broker: Endpoint,
    pub thing_name: String,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<culvert_protocol::Secret>,
    /// PEM certificate chain and key for TLS client authentication.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub ca: Option<PathBuf>,
    pub topic: String,
    /// Probe every rule's target this often and report the results to the relay
    /// ([`crate::health`]; culvert relays only: AWS IoT Core would refuse the topic).
    pub health_every: Option<Duration>,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("broker", &self.broker)
            .field("thing_name", &self.thing_name)
            .field("password", &self.password)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Where a forwarding rule's connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `host:port`; the host may be a name, resolved (and checked) at connect time.
    Tcp(HostPort),
    /// `udp:host:port`: each tunnel connection is one UDP flow, its datagrams framed in the
    /// stream ([`culvert_protocol::datagram`]) and sent from a socket connected to the target.
    Udp(HostPort),
    /// A Unix stream socket.
    Unix(PathBuf),
    /// `serial:/dev/ttyUSB0`: a serial port, one connection at a time ([`crate::serial`]).
    Serial(PathBuf),
}

/// A serial rule's line settings (`[services.NAME.serial]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialSettings {
    pub baud: u32,
    /// 5-8.
    pub data_bits: u8,
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
    pub flow_control: FlowControl,
    /// The connection speaks RFC 2217 (the operator's tool sets baud, data bits, parity, stop
    /// bits, flow control, DTR, RTS and break) instead of carrying raw bytes.
    pub rfc2217: bool,
}

impl Default for SerialSettings {
    fn default() -> SerialSettings {
        SerialSettings {
            baud: 9600,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow_control: FlowControl::None,
            rfc2217: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parity {
    None,
    Odd,
    Even,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowControl {
    None,
    RtsCts,
    XonXoff,
}

/// A host (name or address literal) and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            rest.split_once("]:")
                .ok_or_else(|| format!("{s:?}: expected [IPv6]:port"))?
        } else {
            s.rsplit_once(':')
                .filter(|(h, _)| !h.contains(':'))
                .ok_or_else(|| format!("{s:?} needs a port (host:port)"))?
        };
        if host.is_empty() {
            return Err(format!("{s:?}: the host is empty"));
        }
        // `[fe80::1%eth0]`: a scoped address is resolved (and ACL-checked) like a name.
        let (addr, scope) = host.split_once('%').unwrap_or((host, "x"));
        if s.starts_with('[')
            && (addr.parse::<std::net::Ipv6Addr>().is_err()
                || scope.is_empty()
                || !scope
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(format!("{s:?}: {host:?} is not an IPv6 address"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port 1-65535"))?;
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }

    /// The host as an address, when it is written as one.
    pub fn literal(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(hp) => hp.fmt(f),
            Target::Udp(hp) => write!(f, "udp:{hp}"),
            Target::Serial(p) => write!(f, "serial:{}", p.display()),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Target::unix(p);
        }
        if s.starts_with('/') {
            return Target::unix(s);
        }
        if let Some(hp) = s.strip_prefix("udp:") {
            return HostPort::parse(hp).map(Target::Udp);
        }
        if let Some(p) = s.strip_prefix("serial:") {
            if !p.starts_with('/') {
                return Err(format!(
                    "serial device {p:?} must be an absolute path (serial:/dev/ttyUSB0)"
                ));
            }
            return Ok(Target::Serial(PathBuf::from(p)));
        }
        HostPort::parse(s).map(Target::Tcp).map_err(|e| {
            format!(
                "{e}, udp:host:port for UDP, unix:/path for a socket, or serial:/dev/… for a \
                     serial port"
            )
        })
    }

    fn unix(p: &str) -> Result<Target, String> {
        if !p.starts_with('/') {
            return Err(format!("unix socket path {p:?} must be absolute"));
        }
        Ok(Target::Unix(PathBuf::from(p)))
    }
}

/// `n` events per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub n: u32,
    pub per: Duration,
}

impl Rate {
    /// `"30/min"`, `"5/s"`, `"100/hour"`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad =
            || format!("{s:?}: expected a count per unit, e.g. \"30/min\", \"5/s\", \"100/hour\"");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { n, per })
    }
}

/// Limits for a rule (all its connections, whichever tunnel) or for each tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: Option<usize>,
    /// New connections accepted per interval (bursts up to the count).
    pub connection_rate: Option<Rate>,
    /// Bytes per second from the tunnel to the target.
    pub bytes_per_sec_to_target: Option<u32>,
    /// Bytes per second from the target into the tunnel.
    pub bytes_per_sec_from_target: Option<u32>,
}

/// One HTTP route: requests whose Host and path match go to `upstream`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Lower-case host name without port; `*.example` matches any subdomain; `None`: any host.
    pub host: Option<String>,
    /// Path prefix, matched on whole segments (`/hmi` matches `/hmi` and `/hmi/x`, not `/hmix`).
    pub path: String,
    pub upstream: HostPort,
    /// Remove `path` from the request before forwarding (`/camera/x` → `/x`).
    pub strip_prefix: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpService {
    pub routes: Vec<Route>,
    /// How long an upstream may take to answer (each read); not applied to WebSocket upgrades.
    pub response_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every connection goes to one target (`target = ...`).
    Forward(Target),
    /// HTTP requests go by their Host and path (`routes = [...]`).
    Http(HttpService),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub kind: Kind,
    /// The ACL for this rule: the global one plus the rule's own allow / deny.
    pub policy: Policy,
    pub limits: Limits,
    pub connect_timeout: Duration,
    /// Close a connection that carried no byte either way for this long.
    pub idle_timeout: Option<Duration>,
    /// A read-only Modbus/TCP rule: what its requests may do ([`crate::modbus`]), shared
    /// by its connections' filters.
    pub modbus: Option<std::sync::Arc<crate::modbus::Policy>>,
    /// Whether health reports probe this rule's target (`probe = false`: a device that
    /// counts or logs every connection).
    pub probe: bool,
    /// A serial rule's line settings (the defaults when it has no `serial` table).
    pub serial: Option<SerialSettings>,
}

/// How the process itself runs (`[daemon]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSettings {
    /// On SIGTERM, how long live connections may take to finish before they are cut.
    pub shutdown_grace: Duration,
    /// The Prometheus endpoint's address, if enabled.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Started as root outside systemd: the user to become once the keys are read.
    pub user: Option<String>,
    /// Connections to targets open at once, all tunnels together: each holds a file
    /// descriptor, and the gateway must keep some for its relay and broker connections.
    pub max_connections: usize,
    /// Tunnels served at once (each holds a relay connection).
    pub max_tunnels: usize,
    /// How long connections wait for a dropped tunnel to come back and resume (`None`: they
    /// end with the tunnel, as with an AWS relay).
    pub resume_hold: Option<Duration>,
}

/// Connections each tunnel may have open at once unless `tunnel_limits.max_connections` says
/// otherwise (the AWS localproxy caps a tunnel at 128).
pub const DEFAULT_TUNNEL_MAX_CONNECTIONS: usize = 256;
/// Tunnels served at once unless `daemon.max_tunnels` says otherwise.
pub const DEFAULT_MAX_TUNNELS: usize = 64;
/// File descriptors kept back from `daemon.max_connections`'s default, for the relay sessions,
/// the broker, the audit file, the metrics port and HTTP upstreams.
const FD_RESERVE: usize = 256;

/// The default of `daemon.max_connections`: half of what the open-file limit leaves after the
/// reserve (an HTTP rule may hold a second descriptor per connection upstream), at most 4096.
pub fn default_max_connections(open_files: usize) -> usize {
    (open_files.saturating_sub(FD_RESERVE) / 2).clamp(16, 4096)
}

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoint: Option<Endpoint>,
    pub ca: Option<PathBuf>,
    /// `relay.proxy` as written (checked): a proxy URL, or `none`; absent, the environment's.
    pub proxy: Option<String>,
    pub mqtt: Option<MqttConfig>,
    pub daemon: DaemonSettings,
    pub tunnel_limits: Limits,
    pub audit_file: Option<PathBuf>,
    /// The on-site "remote access allowed" switch (`[consent] switch_file`): a file (or a GPIO
    /// line's sysfs `value`) reading 1 / on / yes / true / allowed. Missing or anything else:
    /// off. None: no switch, access is always allowed.
    pub consent_switch: Option<PathBuf>,
    /// Every tunnel waits for someone on site to approve it (`[consent] approve_tunnels`).
    pub approval: Option<Approval>,
    pub services: BTreeMap<String, Service>,
}

/// On-site approval of each tunnel ([`crate::approval`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    /// Where waiting tunnels are listed and decisions are dropped (`approval_dir`).
    pub dir: PathBuf,
    /// A tunnel nobody decides on within this is refused (`approval_timeout_secs`).
    pub timeout: Duration,
    /// A local HMI decides over HTTP ([`crate::hmi`]).
    pub hmi: Option<Hmi>,
}

/// `[consent] hmi_listen` and `hmi_token_file`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hmi {
    pub listen: std::net::SocketAddr,
    pub token: HmiToken,
}

/// The HMI's bearer token (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct HmiToken(pub String);

impl std::fmt::Debug for HmiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmiToken(..)")
    }
}

/// Shortest HMI token accepted.
pub const MIN_HMI_TOKEN: usize = 16;

/// Where culvertd lists the tunnels waiting for approval, unless `approval_dir` says otherwise
/// (the systemd unit's RuntimeDirectory).
pub const DEFAULT_APPROVAL_DIR: &str = "/run/culvertd/consent";
/// How long a tunnel waits for someone on site, unless `approval_timeout_secs` says otherwise.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

impl Config {
    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

/// All problems found in a file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(l) => write!(f, "{}:{l}: ", self.file)?,
                None => write!(f, "{}: ", self.file)?,
            }
            if p.key.is_empty() {
                write!(f, "{}", p.message)?;
            } else {
                write!(f, "{}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Read and validate a configuration file; relative paths in it are relative to its directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![Problem {
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
        .map_err(|problems| ConfigError { file, problems })
}

/// `services.WEB.routes.0` → `services.WEB.routes[0]`, as the other messages write it.
fn shown_key(dotted: &str) -> String {
    let parts: Vec<String> = dotted
        .split('.')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.parse::<usize>().is_ok() {
                format!("[{s}]")
            } else {
                format!(".{s}")
            }
        })
        .collect();
    parts.concat().trim_start_matches('.').to_owned()
}

/// The key (`services.SSH.max_connections`) whose value holds `span`, as deep as it goes. (Tables
/// made by `[a.b]` headers do not span their contents, so every branch is searched.)
fn key_at(doc: &DeTable, span: Option<Range<usize>>) -> String {
    fn walk(value: &DeValue, at: usize, path: &str, best: &mut String) {
        let mut visit = |child: &Spanned<DeValue>, key_span: Option<Range<usize>>, p: String| {
            let hit = child.span().contains(&at) || key_span.is_some_and(|k| k.contains(&at));
            if hit && p.len() > best.len() {
                *best = p.clone();
            }
            walk(child.get_ref(), at, &p, best);
        };
        match value {
            DeValue::Table(t) => {
                for (k, v) in t {
                    visit(v, Some(k.span()), format!("{path}.{}", k.get_ref()));
                }
            }
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    visit(v, None, format!("{path}[{i}]"));
                }
            }
            _ => {}
        }
    }
    let Some(span) = span else {
        return String::new();
    };
    let mut best = String::new();
    walk(&DeValue::Table(doc.clone()), span.start, "", &mut best);
    best.trim_start_matches('.').to_owned()
}

/// The keys and indexes of a path, without serde's wrappers (`Option`, `Spanned`).
fn segments(path: &serde_ignored::Path) -> Vec<String> {
    use serde_ignored::Path;
    let mut v = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => v.push(index.to_string()),
        Path::Map { key, .. } if !key.starts_with("$__serde_spanned") => v.push(key.clone()),
        _ => {}
    }
    v
}

/// The span of the key at `path` (`services.SSH.colour`, `services.WEB.routes.0.hots`).
fn key_span(doc: &DeTable, path: &str) -> Option<Range<usize>> {
    let mut segs = path.split('.').peekable();
    let mut table = doc;
    let mut span = None;
    while let Some(seg) = segs.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == seg)?;
        span = Some(k.span());
        let mut value = v.get_ref();
        // Array elements: the next segment is an index.
        while let (DeValue::Array(a), true) = (value, segs.peek().is_some()) {
            let i: usize = segs.next()?.parse().ok()?;
            let el = a.get(i)?;
            span = Some(el.span());
            value = el.get_ref();
        }
        match value {
            DeValue::Table(t) => table = t,
            _ if segs.peek().is_some() => return span,
            _ => {}
        }
    }
    span
}

/// Parse and validate configuration text.
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let problem = |span: Option<Range<usize>>, key: String, message: String| Problem {
        line: span.map(|s| line_of(text, s.start)),
        key,
        message,
    };
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // TOML's messages are terse ("duplicate key"): quote the offending line.
        return Err(syntax
            .iter()
            .map(|e| {
                let quoted = e
                    .span()
                    .and_then(|s| text.get(..s.start))
                    .map(|before| {
                        let start = before.rfind('\n').map_or(0, |i| i + 1);
                        let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
                        format!(" in `{}`", text[start..end].trim())
                    })
                    .unwrap_or_default();
                problem(
                    e.span(),
                    String::new(),
                    format!("{}{quoted}", e.message().trim()),
                )
            })
            .collect());
    }
    // Typed pass. Each service is read on its own, so one service's wrong type does not hide
    // the problems of the others; unknown keys are collected, not fatal.
    let mut unknown = Vec::new();
    let mut typing = Vec::new();
    let typed: Result<RawConfig, _> =
        serde_ignored::deserialize(toml::de::Deserializer::from(doc.clone()), |path| {
            let segs = segments(&path);
            // `services` is read below, service by service.
            if segs.first().is_none_or(|s| s != "services") {
                unknown.push(segs.join("."))
            }
        });
    let mut services = BTreeMap::new();
    let service_tables = doc
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == "services")
        .map(|(_, v)| v);
    if let Some(DeValue::Table(t)) = service_tables.map(|v| v.get_ref()) {
        for (name, v) in t {
            let name = name.get_ref().as_ref();
            let DeValue::Table(table) = v.get_ref() else {
                typing.push((
                    Some(v.span()),
                    format!("services.{name}"),
                    "must be a table ([services.NAME])".to_owned(),
                ));
                continue;
            };
            let de = toml::de::Deserializer::from(Spanned::new(v.span(), table.clone()));
            let r: Result<RawService, _> = serde_ignored::deserialize(de, |path| {
                unknown.push(format!("services.{name}.{}", segments(&path).join(".")))
            });
            match r {
                Ok(svc) => {
                    services.insert(name.to_owned(), svc);
                }
                Err(e) => typing.push((
                    e.span(),
                    key_at(doc.get_ref(), e.span()),
                    e.message().trim().to_owned(),
                )),
            }
        }
    }
    let mut problems: Vec<Problem> = unknown
        .iter()
        .map(|path| {
            let (parent, key) = path.rsplit_once('.').unwrap_or(("", path));
            problem(
                key_span(doc.get_ref(), path),
                shown_key(parent),
                format!("unknown key {key:?} (see docs/configuration.md for the keys)"),
            )
        })
        .collect();
    for (span, key, message) in typing {
        problems.push(problem(span, key, message));
    }
    let mut raw = match typed {
        Ok(raw) => raw,
        Err(e) => {
            let key = key_at(doc.get_ref(), e.span());
            // A service's own type error is already reported above.
            if !key.starts_with("services.") {
                problems.push(problem(e.span(), key, e.message().trim().to_owned()));
            }
            problems.sort_by_key(|p| p.line);
            return Err(problems);
        }
    };
    raw.services = services;
    if !problems.is_empty() {
        // Still validate, so every problem shows in one run.
        let mut v = Validator {
            own: acl::own_addresses(),
            text,
            base,
            doc: doc.get_ref(),
            problems,
        };
        let _ = v.config(raw);
        v.problems.sort_by_key(|p| p.line);
        return Err(v.problems);
    }
    let mut v = Validator {
        own: acl::own_addresses(),
        text,
        base,
        doc: doc.get_ref(),
        problems,
    };
    let config = v.config(raw);
    if v.problems.is_empty() {
        Ok(config)
    } else {
        v.problems.sort_by_key(|p| p.line);
        Err(v.problems)
    }
}

struct Validator<'a> {
    /// This gateway's addresses, read once per file (literal targets are checked against them).
    own: Vec<std::net::IpAddr>,
    text: &'a str,
    base: &'a Path,
    doc: &'a DeTable<'a>,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn push(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            line: Some(line_of(self.text, span.start)),
            key: key.into(),
            message: message.into(),
        });
    }

    fn path(&mut self, key: &str, p: &Spanned<PathBuf>) -> PathBuf {
        let path = if p.get_ref().is_absolute() {
            p.get_ref().clone()
        } else {
            self.base.join(p.get_ref())
        };
        if !path.is_file() {
            self.push(
                p.span(),
                key,
                format!("{} does not exist or is not a file", path.display()),
            );
        }
        path
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let (endpoint, ca, proxy) = match raw.relay {
            Some(r) => self.relay(r),
            None => (None, None, None),
        };
        let mqtt = raw.mqtt.and_then(|m| self.mqtt(m));
        let acl = raw.acl.unwrap_or_default();
        let global_allow = self.nets("acl.allow", &acl.allow);
        let global_deny = self.nets("acl.deny", &acl.deny);
        let mut management_ports = acl
            .management_ports
            .unwrap_or_else(|| DEFAULT_MANAGEMENT_PORTS.to_vec());
        let daemon = self.daemon(raw.daemon.unwrap_or_default());
        // culvertd's own metrics port is one of this gateway's management ports.
        if let Some(m) = daemon.metrics_listen
            && m.port() != 0
        {
            management_ports.push(m.port());
        }
        let mut tunnel_limits =
            self.limits("tunnel_limits", &raw.tunnel_limits.unwrap_or_default());
        tunnel_limits
            .max_connections
            .get_or_insert(DEFAULT_TUNNEL_MAX_CONNECTIONS);
        let audit_file = raw.audit.and_then(|a| a.file).map(|f| self.audit_file(&f));
        let consent = raw.consent.unwrap_or_default();
        let consent_switch = consent.switch_file.map(|f| self.relative(f));
        let hmi = self.hmi(consent.hmi_listen, consent.hmi_token_file);
        let approval = self.approval(
            consent.approve_tunnels,
            consent.approval_dir,
            consent.approval_timeout_secs,
            hmi,
        );
        let mut services = BTreeMap::new();
        for (name, svc) in raw.services {
            let key = format!("services.{name}");
            if !culvert_protocol::valid_name(&name) {
                let span = key_span(self.doc, &key).unwrap_or(0..0);
                self.push(
                    span,
                    key,
                    "service names are 1-128 characters of A-Z a-z 0-9 : _ -",
                );
                continue;
            }
            let mut allow = global_allow.clone();
            allow.extend(self.nets(&format!("{key}.allow"), &svc.allow));
            let mut deny = global_deny.clone();
            deny.extend(self.nets(&format!("{key}.deny"), &svc.deny));
            let policy = Policy {
                allow,
                deny,
                management_ports: management_ports.clone(),
            };
            if let Some(s) = self.service(&key, &name, svc, policy) {
                services.insert(s.name.clone(), s);
            }
        }
        if services.is_empty() && self.problems.is_empty() {
            self.problems.push(Problem {
                line: None,
                key: "services".into(),
                message: "no service defined: add e.g. [services.SSH] target = \"127.0.0.1:22\""
                    .into(),
            });
        }
        Config {
            endpoint,
            ca,
            proxy,
            mqtt,
            daemon,
            tunnel_limits,
            audit_file,
            consent_switch,
            approval,
            services,
        }
    }

    /// A path as written, relative to the configuration file's directory.
    fn relative(&self, f: Spanned<PathBuf>) -> PathBuf {
        if f.get_ref().is_absolute() {
            f.into_inner()
        } else {
            self.base.join(f.get_ref())
        }
    }

    fn approval(
        &mut self,
        on: Option<Spanned<bool>>,
        dir: Option<Spanned<PathBuf>>,
        timeout: Option<Spanned<u64>>,
        hmi: Option<(Range<usize>, Hmi)>,
    ) -> Option<Approval> {
        let timeout = self.secs("consent.approval_timeout_secs".into(), &timeout, 86_400);
        if !on.as_ref().is_some_and(|o| *o.get_ref()) {
            if let Some(d) = &dir {
                self.push(
                    d.span(),
                    "consent.approval_dir",
                    "has no effect without consent.approve_tunnels = true",
                );
            }
            if let Some((span, _)) = hmi {
                self.push(
                    span,
                    "consent.hmi_listen",
                    "has no effect without consent.approve_tunnels = true",
                );
            }
            return None;
        }
        Some(Approval {
            dir: dir
                .map(|d| self.relative(d))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_APPROVAL_DIR)),
            timeout: timeout.unwrap_or(DEFAULT_APPROVAL_TIMEOUT),
            hmi: hmi.map(|(_, h)| h),
        })
    }

    /// `hmi_listen` with its `hmi_token_file` (both, or neither).
    fn hmi(
        &mut self,
        listen: Option<Spanned<String>>,
        token_file: Option<Spanned<PathBuf>>,
    ) -> Option<(Range<usize>, Hmi)> {
        let listen = match (listen, &token_file) {
            (None, None) => return None,
            (None, Some(f)) => {
                self.push(
                    f.span(),
                    "consent.hmi_token_file",
                    "needs consent.hmi_listen",
                );
                return None;
            }
            (Some(l), None) => {
                self.push(
                    l.span(),
                    "consent.hmi_listen",
                    "needs consent.hmi_token_file: the HMI proves itself with that token",
                );
                return None;
            }
            (Some(l), Some(_)) => l,
        };
        let span = listen.span();
        let addr = match listen.get_ref().parse::<std::net::SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    span.clone(),
                    "consent.hmi_listen",
                    "an IP address and port, e.g. \"192.168.10.5:9180\" (the HMI's network only)",
                );
                None
            }
        };
        let f = token_file?;
        let path = self.path("consent.hmi_token_file", &f);
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if t.trim().chars().count() >= MIN_HMI_TOKEN => Some(t.trim().to_owned()),
            Ok(_) => {
                self.push(
                    f.span(),
                    "consent.hmi_token_file",
                    format!(
                        "{} holds fewer than {MIN_HMI_TOKEN} characters: write a long random token (openssl rand -hex 24)",
                        path.display()
                    ),
                );
                None
            }
            Err(e) if path.is_file() => {
                self.push(
                    f.span(),
                    "consent.hmi_token_file",
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
            Err(_) => None,
        };
        Some((
            span,
            Hmi {
                listen: addr?,
                token: HmiToken(token?),
            },
        ))
    }

    fn daemon(&mut self, d: RawDaemon) -> DaemonSettings {
        let shutdown_grace = match &d.shutdown_grace_secs {
            Some(g) if *g.get_ref() > 3600 => {
                self.push(g.span(), "daemon.shutdown_grace_secs", "must be 0-3600");
                DEFAULT_SHUTDOWN_GRACE
            }
            Some(g) => Duration::from_secs(*g.get_ref()),
            None => DEFAULT_SHUTDOWN_GRACE,
        };
        let resume_hold = match &d.resume_hold_secs {
            Some(h) if *h.get_ref() > 86_400 => {
                self.push(h.span(), "daemon.resume_hold_secs", "must be 0-86400");
                Some(culvert_protocol::session::DEFAULT_RESUME_HOLD)
            }
            Some(h) => (*h.get_ref() > 0).then(|| Duration::from_secs(*h.get_ref())),
            None => Some(culvert_protocol::session::DEFAULT_RESUME_HOLD),
        };
        let metrics_listen = d.metrics_listen.and_then(|m| {
            m.get_ref()
                .parse()
                .map_err(|_| {
                    self.push(
                        m.span(),
                        "daemon.metrics_listen",
                        format!(
                            "{:?} is not an address:port (e.g. \"127.0.0.1:9477\")",
                            m.get_ref()
                        ),
                    )
                })
                .ok()
        });
        let user = d.user.and_then(|u| {
            if u.get_ref().is_empty() {
                self.push(u.span(), "daemon.user", "empty user name");
                None
            } else {
                Some(u.into_inner())
            }
        });
        let open_files = culvert_appliance::limits::open_file_hard_limit();
        let max_connections = self
            .count("daemon.max_connections".into(), &d.max_connections, 1 << 20)
            .map(|n| n as usize)
            .unwrap_or_else(|| default_max_connections(open_files));
        let max_tunnels = self
            .count("daemon.max_tunnels".into(), &d.max_tunnels, 1 << 16)
            .map_or(DEFAULT_MAX_TUNNELS, |n| n as usize);
        DaemonSettings {
            shutdown_grace,
            metrics_listen,
            user,
            max_connections,
            max_tunnels,
            resume_hold,
        }
    }

    fn relay(&mut self, r: RawRelay) -> (Option<Endpoint>, Option<PathBuf>, Option<String>) {
        let endpoint = match (r.endpoint, r.region) {
            (Some(e), None) => match Endpoint::parse(e.get_ref()) {
                Ok(ep) => Some(ep),
                Err(m) => {
                    self.push(e.span(), "relay.endpoint", m);
                    None
                }
            },
            (None, Some(region)) => Some(Endpoint::aws_region(&region)),
            (Some(e), Some(_)) => {
                self.push(
                    e.span(),
                    "relay.endpoint",
                    "set either relay.endpoint or relay.region, not both",
                );
                None
            }
            (None, None) => None,
        };
        let ca = r.ca.map(|c| self.path("relay.ca", &c));
        let proxy = r.proxy.and_then(|p| {
            match culvert_protocol::proxy::Proxy::choose(Some(p.get_ref()), "") {
                Ok(_) => Some(p.get_ref().clone()),
                Err(m) => {
                    self.push(p.span(), "relay.proxy", m);
                    None
                }
            }
        });
        (endpoint, ca, proxy)
    }

    fn mqtt(&mut self, m: RawMqtt) -> Option<MqttConfig> {
        let broker = match Endpoint::parse_mqtt(m.broker.get_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                self.push(m.broker.span(), "mqtt.broker", e);
                None
            }
        };
        if !culvert_protocol::valid_name(m.thing_name.get_ref()) {
            self.push(
                m.thing_name.span(),
                "mqtt.thing_name",
                "thing names are 1-128 characters of A-Z a-z 0-9 : _ -",
            );
        }
        let password = match (&m.password, &m.password_file) {
            (Some(_), Some(f)) => {
                self.push(
                    f.span(),
                    "mqtt.password_file",
                    "set password or password_file, not both",
                );
                None
            }
            (Some(p), None) => Some(p.as_str().into()),
            (None, Some(f)) => {
                let path = self.path("mqtt.password_file", f);
                match std::fs::read_to_string(&path) {
                    Ok(p) => Some(p.trim().into()),
                    Err(e) if path.is_file() => {
                        self.push(
                            f.span(),
                            "mqtt.password_file",
                            format!("cannot read {}: {e}", path.display()),
                        );
                        None
                    }
                    Err(_) => None,
                }
            }
            (None, None) => None,
        };
        let client_cert = match (&m.client_cert, &m.client_key) {
            (Some(c), Some(k)) => Some((
                self.path("mqtt.client_cert", c),
                self.path("mqtt.client_key", k),
            )),
            (Some(c), None) => {
                self.push(c.span(), "mqtt.client_key", "client_cert needs client_key");
                None
            }
            (None, Some(k)) => {
                self.push(k.span(), "mqtt.client_cert", "client_key needs client_cert");
                None
            }
            (None, None) => None,
        };
        if password.is_none() && client_cert.is_none() && m.password_file.is_none() {
            self.push(
                m.thing_name.span(),
                "mqtt",
                "give the device identity: password_file (or password) and/or client_cert + client_key",
            );
        }
        let ca = m.ca.as_ref().map(|c| self.path("mqtt.ca", c));
        let health_every = self.secs(
            "mqtt.health_report_secs".into(),
            &m.health_report_secs,
            3600,
        );
        let thing = m.thing_name.get_ref().clone();
        let topic = match &m.topic {
            Some(t) if t.get_ref().contains(['+', '#']) => {
                self.push(
                    t.span(),
                    "mqtt.topic",
                    "the notify topic may not contain wildcards",
                );
                String::new()
            }
            Some(t) => t.get_ref().replace("{thing}", &thing),
            None => format!("$aws/things/{thing}/tunnels/notify"),
        };
        Some(MqttConfig {
            broker: broker?,
            client_id: m.client_id.unwrap_or_else(|| thing.clone()),
            username: m
                .username
                .or_else(|| password.is_some().then(|| thing.clone())),
            thing_name: thing,
            password,
            client_cert,
            ca,
            topic,
            health_every,
        })
    }

    fn audit_file(&mut self, f: &Spanned<PathBuf>) -> PathBuf {
        let path = if f.get_ref().is_absolute() {
            f.get_ref().clone()
        } else {
            self.base.join(f.get_ref())
        };
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => self.push(
                f.span(),
                "audit.file",
                format!("directory {} does not exist", dir.display()),
            ),
            _ => {}
        }
        path
    }

    fn nets(&mut self, key: &str, list: &[Spanned<String>]) -> Vec<(IpNet, String)> {
        let mut out = Vec::new();
        for n in list {
            match acl::parse_net(n.get_ref()) {
                Ok(net) => out.push((net, key.to_owned())),
                Err(e) => self.push(n.span(), key, e),
            }
        }
        out
    }

    fn count(&mut self, key: String, v: &Option<Spanned<u64>>, max: u64) -> Option<u64> {
        let v = v.as_ref()?;
        if *v.get_ref() == 0 || *v.get_ref() > max {
            self.push(v.span(), key, format!("must be 1-{max}"));
            return None;
        }
        Some(*v.get_ref())
    }

    fn limits(&mut self, key: &str, raw: &RawLimits) -> Limits {
        let max_connections = self
            .count(
                format!("{key}.max_connections"),
                &raw.max_connections,
                1 << 20,
            )
            .map(|n| n as usize);
        let connection_rate = raw.connection_rate.as_ref().and_then(|r| {
            Rate::parse(r.get_ref())
                .map_err(|e| self.push(r.span(), format!("{key}.connection_rate"), e))
                .ok()
        });
        let max = u32::MAX as u64;
        let both = self.count(
            format!("{key}.max_bytes_per_sec"),
            &raw.max_bytes_per_sec,
            max,
        );
        let to = self.count(
            format!("{key}.max_bytes_per_sec_to_target"),
            &raw.max_bytes_per_sec_to_target,
            max,
        );
        let from = self.count(
            format!("{key}.max_bytes_per_sec_from_target"),
            &raw.max_bytes_per_sec_from_target,
            max,
        );
        Limits {
            max_connections,
            connection_rate,
            bytes_per_sec_to_target: to.or(both).map(|n| n as u32),
            bytes_per_sec_from_target: from.or(both).map(|n| n as u32),
        }
    }

    fn secs(&mut self, key: String, v: &Option<Spanned<u64>>, max: u64) -> Option<Duration> {
        self.count(key, v, max).map(Duration::from_secs)
    }

    /// A literal address must pass the rule's ACL now; names are checked when resolved.
    fn check_literal(&mut self, span: Range<usize>, key: &str, hp: &HostPort, policy: &Policy) {
        if let Some(ip) = hp.literal()
            && let Err(why) = policy.check(std::net::SocketAddr::new(ip, hp.port), &self.own)
        {
            self.push(
                span,
                key,
                format!("{hp} is not reachable under the ACL: {why}"),
            );
        }
    }

    fn service(
        &mut self,
        key: &str,
        name: &str,
        svc: RawService,
        policy: Policy,
    ) -> Option<Service> {
        let raw_limits = RawLimits {
            max_connections: svc.max_connections,
            connection_rate: svc.connection_rate,
            max_bytes_per_sec: svc.max_bytes_per_sec,
            max_bytes_per_sec_to_target: svc.max_bytes_per_sec_to_target,
            max_bytes_per_sec_from_target: svc.max_bytes_per_sec_from_target,
        };
        let limits = self.limits(key, &raw_limits);
        let connect_timeout = self
            .secs(
                format!("{key}.connect_timeout_secs"),
                &svc.connect_timeout_secs,
                300,
            )
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let idle_timeout = self.secs(
            format!("{key}.idle_timeout_secs"),
            &svc.idle_timeout_secs,
            7 * 24 * 3600,
        );
        let kind = match (svc.target, svc.routes) {
            (Some(t), None) => {
                if let Some(r) = &svc.response_timeout_secs {
                    self.push(
                        r.span(),
                        format!("{key}.response_timeout_secs"),
                        "only http rules (routes) have a response timeout",
                    );
                }
                match Target::parse(t.get_ref()) {
                    Ok(target) => {
                        if let Target::Tcp(hp) | Target::Udp(hp) = &target {
                            self.check_literal(t.span(), &format!("{key}.target"), hp, &policy);
                        }
                        Kind::Forward(target)
                    }
                    Err(m) => {
                        self.push(t.span(), format!("{key}.target"), m);
                        return None;
                    }
                }
            }
            (None, Some(routes)) => {
                let response_timeout = self
                    .secs(
                        format!("{key}.response_timeout_secs"),
                        &svc.response_timeout_secs,
                        24 * 3600,
                    )
                    .unwrap_or(DEFAULT_RESPONSE_TIMEOUT);
                Kind::Http(HttpService {
                    routes: self.routes(key, routes, &policy)?,
                    response_timeout,
                })
            }
            (Some(t), Some(_)) => {
                self.push(
                    t.span(),
                    key,
                    "a rule has either a target (tcp) or routes (http), not both",
                );
                return None;
            }
            (None, None) => {
                let span = key_span(self.doc, key).unwrap_or(0..0);
                self.push(
                    span,
                    key,
                    "needs a target = \"host:port\" (tcp) or routes = [...] (http)",
                );
                return None;
            }
        };
        let serial = match (svc.serial, matches!(kind, Kind::Forward(Target::Serial(_)))) {
            (None, false) => None,
            (None, true) => Some(SerialSettings::default()),
            (Some(raw), true) => Some(self.serial(&format!("{key}.serial"), raw.into_inner())),
            (Some(raw), false) => {
                self.push(
                    raw.span(),
                    format!("{key}.serial"),
                    "serial settings need a serial target (target = \"serial:/dev/ttyUSB0\")",
                );
                None
            }
        };
        let udp = matches!(kind, Kind::Forward(Target::Udp(_)));
        let serial_port = matches!(kind, Kind::Forward(Target::Serial(_)));
        let modbus = match svc.modbus {
            None => None,
            Some(m) if matches!(kind, Kind::Http(_)) || udp || serial_port => {
                self.push(
                    m.span(),
                    format!("{key}.modbus"),
                    "a Modbus filter needs a tcp target (Modbus/TCP), not routes, udp or serial",
                );
                None
            }
            Some(m) => self
                .modbus(&format!("{key}.modbus"), m)
                .map(std::sync::Arc::new),
        };
        Some(Service {
            name: name.to_owned(),
            kind,
            policy,
            limits,
            connect_timeout,
            idle_timeout: idle_timeout.or(udp.then_some(DEFAULT_UDP_IDLE_TIMEOUT)),
            modbus,
            probe: svc.probe.unwrap_or(true),
            serial,
        })
    }

    fn serial(&mut self, key: &str, raw: RawSerial) -> SerialSettings {
        let mut out = SerialSettings {
            rfc2217: raw.rfc2217.unwrap_or(false),
            ..SerialSettings::default()
        };
        if let Some(b) = &raw.baud {
            match u32::try_from(*b.get_ref()) {
                Ok(b @ 50..=4_000_000) => out.baud = b,
                _ => self.push(b.span(), format!("{key}.baud"), "a baud rate is 50-4000000"),
            }
        }
        if let Some(d) = &raw.data_bits {
            match *d.get_ref() {
                d @ 5..=8 => out.data_bits = d as u8,
                _ => self.push(
                    d.span(),
                    format!("{key}.data_bits"),
                    "data bits are 5, 6, 7 or 8",
                ),
            }
        }
        if let Some(s) = &raw.stop_bits {
            match *s.get_ref() {
                s @ (1 | 2) => out.stop_bits = s as u8,
                _ => self.push(s.span(), format!("{key}.stop_bits"), "stop bits are 1 or 2"),
            }
        }
        if let Some(p) = &raw.parity {
            match p.get_ref().as_str() {
                "none" => out.parity = Parity::None,
                "odd" => out.parity = Parity::Odd,
                "even" => out.parity = Parity::Even,
                other => self.push(
                    p.span(),
                    format!("{key}.parity"),
                    format!("parity {other:?}: expected \"none\", \"odd\" or \"even\""),
                ),
            }
        }
        if let Some(f) = &raw.flow_control {
            match f.get_ref().as_str() {
                "none" => out.flow_control = FlowControl::None,
                "rts/cts" => out.flow_control = FlowControl::RtsCts,
                "xon/xoff" => out.flow_control = FlowControl::XonXoff,
                other => self.push(
                    f.span(),
                    format!("{key}.flow_control"),
                    format!(
                        "flow control {other:?}: expected \"none\", \"rts/cts\" or \"xon/xoff\""
                    ),
                ),
            }
        }
        out
    }

    fn modbus(&mut self, key: &str, m: Spanned<RawModbus>) -> Option<crate::modbus::Policy> {
        let span = m.span();
        let m = m.into_inner();
        match &m.read_only {
            Some(r) if *r.get_ref() => {}
            Some(r) => {
                self.push(
                    r.span(),
                    format!("{key}.read_only"),
                    "only read-only Modbus rules exist: set read_only = true, or remove the \
                     modbus table for a plain tcp rule",
                );
                return None;
            }
            None => {
                self.push(
                    span,
                    key,
                    "needs read_only = true (the filter lets only reads through)",
                );
                return None;
            }
        }
        let mut policy = crate::modbus::Policy::default();
        for u in &m.units {
            match u8::try_from(*u.get_ref()) {
                Ok(id) => policy.units.push(id),
                Err(_) => self.push(
                    u.span(),
                    format!("{key}.units"),
                    format!("unit id {} is not 0-255", u.get_ref()),
                ),
            }
        }
        for r in &m.registers {
            let text = r.get_ref().trim();
            let (lo, hi) = text.split_once('-').unwrap_or((text, text));
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) if lo <= hi => policy.ranges.push((lo, hi)),
                _ => self.push(
                    r.span(),
                    format!("{key}.registers"),
                    format!(
                        "{text:?} is not an address range: \"FIRST-LAST\" or \"ADDRESS\", \
                         0-65535, FIRST not above LAST"
                    ),
                ),
            }
        }
        Some(policy)
    }

    fn routes(
        &mut self,
        key: &str,
        routes: Spanned<Vec<RawRoute>>,
        policy: &Policy,
    ) -> Option<Vec<Route>> {
        if !cfg!(feature = "http") {
            self.push(
                routes.span(),
                format!("{key}.routes"),
                "this culvertd was built without HTTP routing (cargo feature \"http\"); \
                 use a tcp target or the standard build",
            );
            return None;
        }
        if routes.get_ref().is_empty() {
            self.push(routes.span(), format!("{key}.routes"), "no route given");
            return None;
        }
        let mut out: Vec<Route> = Vec::new();
        let before = self.problems.len();
        for (i, r) in routes.into_inner().into_iter().enumerate() {
            let rkey = format!("{key}.routes[{i}]");
            let host = r.host.as_ref().and_then(|h| {
                let v = h.get_ref().to_ascii_lowercase();
                let bare = v.strip_prefix("*.").unwrap_or(&v);
                let ok = !bare.is_empty()
                    && bare.len() <= 253
                    && bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
                if ok {
                    Some(v)
                } else {
                    self.push(
                        h.span(),
                        format!("{rkey}.host"),
                        format!(
                            "{:?} is not a host name (without port), nor *.domain",
                            h.get_ref()
                        ),
                    );
                    None
                }
            });
            let path = match &r.path {
                Some(p) if !p.get_ref().starts_with('/') => {
                    self.push(
                        p.span(),
                        format!("{rkey}.path"),
                        "a path prefix starts with /",
                    );
                    continue;
                }
                Some(p) => {
                    let t = p.get_ref().trim_end_matches('/');
                    if t.is_empty() {
                        "/".to_owned()
                    } else {
                        t.to_owned()
                    }
                }
                None => "/".to_owned(),
            };
            let upstream = match HostPort::parse(r.upstream.get_ref()) {
                Ok(u) => u,
                Err(e) => {
                    self.push(r.upstream.span(), format!("{rkey}.upstream"), e);
                    continue;
                }
            };
            self.check_literal(
                r.upstream.span(),
                &format!("{rkey}.upstream"),
                &upstream,
                policy,
            );
            let route = Route {
                host,
                path,
                upstream,
                strip_prefix: r.strip_prefix,
            };
            if let Some(j) = out
                .iter()
                .position(|o| o.host == route.host && o.path == route.path)
            {
                self.push(
                    r.upstream.span(),
                    rkey,
                    format!(
                        "duplicate route: routes[{j}] already matches host {} and path {}",
                        route.host.as_deref().unwrap_or("(any)"),
                        route.path
                    ),
                );
                continue;
            }
            out.push(route);
        }
        (self.problems.len() == before).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        parse(text, Path::new(".")).unwrap_err()
    }

    const ALLOW: &str = "[acl]\nallow = [\"127.0.0.0/8\"]\n";

    #[test]
    fn on_site_approval_has_defaults_and_refuses_half_settings() {
        let svc = "[services.SSH]\ntarget = \"127.0.0.1:22\"\n";
        let cfg = parse(
            &format!("{ALLOW}{svc}[consent]\napprove_tunnels = true\n"),
            Path::new("/etc/culvert"),
        )
        .unwrap();
        assert_eq!(
            cfg.approval,
            Some(Approval {
                dir: DEFAULT_APPROVAL_DIR.into(),
                timeout: DEFAULT_APPROVAL_TIMEOUT,
                hmi: None,
            })
        );
        let cfg = parse(
            &format!("{ALLOW}{svc}[consent]\napprove_tunnels = true\napproval_dir = \"consent\"\napproval_timeout_secs = 60\n"),
            Path::new("/etc/culvert"),
        )
        .unwrap();
        let a = cfg.approval.unwrap();
        assert_eq!(
            (a.dir.as_path(), a.timeout),
            (Path::new("/etc/culvert/consent"), Duration::from_secs(60))
        );
        let off = parse(
            &format!("{ALLOW}{svc}[consent]\napprove_tunnels = false\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(off.approval, None);
        let p = problems(&format!(
            "{ALLOW}{svc}[consent]\napproval_dir = \"/run/x\"\n"
        ));
        assert!(
            p.iter()
                .any(|p| p.key == "consent.approval_dir" && p.message.contains("approve_tunnels")),
            "{p:?}"
        );
        let p = problems(&format!(
            "{ALLOW}{svc}[consent]\napprove_tunnels = true\napproval_timeout_secs = 0\n"
        ));
        assert!(
            p.iter().any(|p| p.key == "consent.approval_timeout_secs"),
            "{p:?}"
        );
    }

    #[test]
    fn an_hmi_needs_an_address_and_a_long_token() {
        let dir = std::env::temp_dir().join(format!("culvertd-hmi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("long"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(dir.join("short"), "abc\n").unwrap();
        let svc = "[services.SSH]\ntarget = \"127.0.0.1:22\"\n";
        let on = "[consent]\napprove_tunnels = true\n";
        let cfg = parse(
            &format!(
                "{ALLOW}{svc}{on}hmi_listen = \"127.0.0.1:9180\"\nhmi_token_file = \"long\"\n"
            ),
            &dir,
        )
        .unwrap();
        let hmi = cfg.approval.unwrap().hmi.unwrap();
        assert_eq!(hmi.listen, "127.0.0.1:9180".parse().unwrap());
        assert_eq!(hmi.token.0, "0123456789abcdef0123");
        assert!(
            !format!("{hmi:?}").contains("0123"),
            "the token is never printed"
        );
        for (extra, key, says) in [
            (
                "hmi_listen = \"127.0.0.1:9180\"\n",
                "consent.hmi_listen",
                "hmi_token_file",
            ),
            (
                "hmi_token_file = \"long\"\n",
                "consent.hmi_token_file",
                "hmi_listen",
            ),
            (
                "hmi_listen = \"127.0.0.1:9180\"\nhmi_token_file = \"short\"\n",
                "consent.hmi_token_file",
                "fewer than 16",
            ),
            (
                "hmi_listen = \"panel:80\"\nhmi_token_file = \"long\"\n",
                "consent.hmi_listen",
                "IP address and port",
            ),
        ] {
            let p = match parse(&format!("{ALLOW}{svc}{on}{extra}"), &dir) {
                Err(p) => p,
                Ok(_) => panic!("{extra} accepted"),
            };
            assert!(
                p.iter().any(|p| p.key == key && p.message.contains(says)),
                "{extra}: {p:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("10.0.0.5:502").unwrap(),
            Target::Tcp(HostPort {
                host: "10.0.0.5".into(),
                port: 502
            })
        );
        assert_eq!(
            Target::parse("[fd00::1]:22").unwrap().to_string(),
            "[fd00::1]:22"
        );
        assert_eq!(
            Target::parse("unix:/run/x.sock").unwrap(),
            Target::Unix("/run/x.sock".into())
        );
        assert!(Target::parse("robot").unwrap_err().contains("needs a port"));
        assert!(Target::parse("robot:0").is_err());
        assert!(Target::parse("[robot]:22").is_err());
        let scoped = Target::parse("[fe80::1%eth0]:22").unwrap();
        assert_eq!(scoped.to_string(), "[fe80::1%eth0]:22");
        assert!(Target::parse("unix:relative").is_err());
        let udp = Target::parse("udp:[fd00::5]:161").unwrap();
        assert_eq!(
            udp,
            Target::Udp(HostPort {
                host: "fd00::5".into(),
                port: 161
            })
        );
        assert_eq!(udp.to_string(), "udp:[fd00::5]:161");
        assert!(
            Target::parse("udp:dns")
                .unwrap_err()
                .contains("needs a port")
        );
    }

    #[test]
    fn serial_rules_take_line_settings_and_name_bad_ones() {
        let console = "[services.CONSOLE]\ntarget = \"serial:/dev/ttyUSB0\"\n";
        let cfg = parse(console, Path::new(".")).unwrap();
        assert_eq!(
            cfg.services["CONSOLE"].serial,
            Some(SerialSettings::default())
        );
        let cfg = parse(
            &format!(
                "{console}[services.CONSOLE.serial]\nbaud = 115200\ndata_bits = 7\nparity = \"even\"\n\
                 stop_bits = 2\nflow_control = \"rts/cts\"\nrfc2217 = true\n"
            ),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            cfg.services["CONSOLE"].serial,
            Some(SerialSettings {
                baud: 115_200,
                data_bits: 7,
                parity: Parity::Even,
                stop_bits: 2,
                flow_control: FlowControl::RtsCts,
                rfc2217: true,
            })
        );
        let p = problems(&format!(
            "{console}[services.CONSOLE.serial]\nbaud = 0\ndata_bits = 9\nparity = \"mark\"\n\
             stop_bits = 3\nflow_control = \"dtr\"\n"
        ));
        for key in ["baud", "data_bits", "parity", "stop_bits", "flow_control"] {
            let key = format!("services.CONSOLE.serial.{key}");
            assert!(p.iter().any(|p| p.key == key), "{key}: {p:?}");
        }
        let p = problems(&format!(
            "{ALLOW}[services.SSH]\ntarget = \"127.0.0.1:22\"\n[services.SSH.serial]\nbaud = 9600\n"
        ));
        assert!(p.iter().any(|p| p.key == "services.SSH.serial"), "{p:?}");
        assert!(
            Target::parse("serial:ttyUSB0")
                .unwrap_err()
                .contains("absolute")
        );
    }

    #[test]
    fn udp_rules_have_an_idle_timeout_and_no_modbus_filter() {
        let dns = "[services.DNS]\ntarget = \"udp:127.0.0.1:53\"\n";
        let cfg = parse(&format!("{ALLOW}{dns}"), Path::new(".")).unwrap();
        assert_eq!(
            cfg.services["DNS"].idle_timeout,
            Some(DEFAULT_UDP_IDLE_TIMEOUT)
        );
        let cfg = parse(
            &format!("{ALLOW}{dns}idle_timeout_secs = 5\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            cfg.services["DNS"].idle_timeout,
            Some(Duration::from_secs(5))
        );
        let p = problems(&format!(
            "{ALLOW}{dns}[services.DNS.modbus]\nread_only = true\n"
        ));
        assert!(p.iter().any(|p| p.key == "services.DNS.modbus"), "{p:?}");
        // The ACL applies to udp targets as to tcp ones.
        let p = problems("[services.DNS]\ntarget = \"udp:192.0.2.1:53\"\n");
        assert!(p.iter().any(|p| p.key == "services.DNS.target"), "{p:?}");
    }

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("30/min").unwrap(),
            Rate {
                n: 30,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(Rate::parse("5 / s").unwrap().per, Duration::from_secs(1));
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("5/fortnight").is_err());
        assert!(Rate::parse("5").is_err());
    }

    #[test]
    fn errors_name_line_and_key() {
        let p = problems(&format!(
            "{ALLOW}[services.SSH]\ntarget = \"127.0.0.1:22\"\n\n[services.HMI]\ntarget = \"hmi\"\n"
        ));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, Some(7));
        assert_eq!(p[0].key, "services.HMI.target");
        let p = problems("[services.SSH]\ntarget = \"127.0.0.1:22\"\ncolour = \"blue\"\n");
        assert!(p.iter().any(|p| p.line == Some(3)
            && p.key == "services.SSH"
            && p.message.contains("unknown key \"colour\"")));
        let p = problems("[services.SSH]\ntarget = \"a:1\"\n[services.SSH]\ntarget = \"b:2\"\n");
        assert_eq!(p[0].line, Some(3), "{p:?}");
        let p = problems("");
        assert_eq!(p[0].key, "services");
    }

    #[test]
    fn modbus_rules_are_read_only_and_name_their_bad_values() {
        let plc = "[services.PLC]\ntarget = \"127.0.0.1:502\"\n";
        let cfg = parse(
            &format!(
                "{ALLOW}{plc}[services.PLC.modbus]\nread_only = true\nunits = [1, 247]\nregisters = [\"0-99\", \" 400 \"]\n"
            ),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            cfg.services["PLC"].modbus.as_deref(),
            Some(&crate::modbus::Policy {
                units: vec![1, 247],
                ranges: vec![(0, 99), (400, 400)],
            })
        );
        let p = problems(&format!("{ALLOW}{plc}[services.PLC.modbus]\nunits = [1]\n"));
        assert!(
            p.iter()
                .any(|p| p.key == "services.PLC.modbus" && p.message.contains("read_only = true")),
            "{p:?}"
        );
        let p = problems(&format!(
            "{ALLOW}{plc}[services.PLC.modbus]\nread_only = false\n"
        ));
        assert!(
            p.iter().any(|p| p.key == "services.PLC.modbus.read_only"),
            "{p:?}"
        );
        let p = problems(&format!(
            "{ALLOW}{plc}[services.PLC.modbus]\nread_only = true\nunits = [256]\nregisters = [\"99-0\", \"x\"]\nwrite = true\n"
        ));
        assert!(
            p.iter()
                .any(|p| p.key == "services.PLC.modbus.units" && p.message.contains("256")),
            "{p:?}"
        );
        assert_eq!(
            p.iter()
                .filter(|p| p.key == "services.PLC.modbus.registers")
                .count(),
            2,
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|p| p.message.contains("unknown key \"write\"")),
            "{p:?}"
        );
        if cfg!(feature = "http") {
            let p = problems(&format!(
                "{ALLOW}[services.HMI]\nroutes = [{{ upstream = \"127.0.0.1:80\" }}]\n[services.HMI.modbus]\nread_only = true\n"
            ));
            assert!(p.iter().any(|p| p.key == "services.HMI.modbus"), "{p:?}");
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let p = problems(
            "[acl]\nallow = [\"10.0.0.0/8\", \"banana\"]\nmystery = 1\n\
             [services.A]\ntarget = \"192.168.1.1:22\"\n\
             [services.B]\ntarget = \"10.0.0.1:22\"\nmax_connections = 0\n\
             [services.C]\nroutes = [{ hots = \"x\", upstream = \"10.0.0.2:80\" }]\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"acl.allow"), "{p:#?}");
        assert!(keys.contains(&"acl"), "{p:#?}");
        assert!(keys.contains(&"services.A.target"), "{p:#?}");
        assert!(keys.contains(&"services.B.max_connections"), "{p:#?}");
        assert!(keys.contains(&"services.C.routes[0]"), "{p:#?}");
        assert!(p.iter().all(|p| p.line.is_some()), "{p:#?}");
    }

    #[test]
    fn type_errors_name_their_keys_and_do_not_hide_others() {
        let p = problems(
            "[acl]\nallow = [\"10.0.0.0/8\"]\n[services.A]\ntarget = \"10.0.0.1:1\"\nmax_connections = \"4\"\n\
             [services.B]\ntarget = \"10.0.0.2:1\"\nmax_connections = \"5\"\n\
             [services.C]\nroutes = [{ host = \"x\" }]\n[services.D]\ntarget = \"10.0.0.3:1\"\ncolour = 1\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"services.A.max_connections"), "{p:#?}");
        assert!(keys.contains(&"services.B.max_connections"), "{p:#?}");
        assert!(
            keys.iter().any(|k| k.starts_with("services.C.routes")),
            "{p:#?}"
        );
        assert!(keys.contains(&"services.D"), "{p:#?}");
        let p = problems("[acl]\nallow = \"10.0.0.0/8\"\n[services.A]\ntarget = \"10.0.0.1:1\"\n");
        assert_eq!(p[0].key, "acl.allow", "{p:#?}");
        assert_eq!(p[0].line, Some(2));
    }

    #[test]
    fn literal_targets_are_checked_against_the_acl() {
        let p = problems(
            "[acl]\nallow = [\"10.0.0.0/8\"]\ndeny = [\"10.9.0.0/16\"]\n[services.A]\ntarget = \"10.9.0.1:80\"\n",
        );
        assert_eq!(p[0].key, "services.A.target");
        assert!(p[0].message.contains("10.9.0.0/16"), "{p:?}");
        // A rule's own allow extends the global one for that rule only.
        parse(
            "[services.A]\ntarget = \"10.9.0.1:80\"\nallow = [\"10.9.0.1\"]\n",
            Path::new("."),
        )
        .unwrap();
        // Names are checked at connect time.
        parse("[services.A]\ntarget = \"plc.local:502\"\n", Path::new(".")).unwrap();
    }

    #[test]
    fn http_routes() {
        let c = parse(
            &format!(
                "{ALLOW}[services.WEB]\nroutes = [\n  {{ host = \"Press1.local\", upstream = \"127.0.0.2:80\" }},\n  \
                 {{ path = \"/cam/\", upstream = \"127.0.0.3:80\", strip_prefix = true }},\n]\n"
            ),
            Path::new("."),
        );
        if !cfg!(feature = "http") {
            assert!(c.unwrap_err()[0].message.contains("without HTTP"));
            return;
        }
        let c = c.unwrap();
        let Kind::Http(h) = &c.services["WEB"].kind else {
            panic!()
        };
        assert_eq!(h.routes[0].host.as_deref(), Some("press1.local"));
        assert_eq!(h.routes[1].path, "/cam");
        let p = problems(&format!(
            "{ALLOW}[services.WEB]\nroutes = [\n {{ host = \"a\", upstream = \"127.0.0.2:80\" }},\n {{ host = \"a\", upstream = \"127.0.0.3:80\" }},\n]\n"
        ));
        assert_eq!(p[0].key, "services.WEB.routes[1]");
        assert!(p[0].message.contains("duplicate"), "{p:?}");
    }

    #[test]
    fn good_config() {
        let c = parse(
            &format!("[relay]\nendpoint = \"127.0.0.1:8443\"\n{ALLOW}[tunnel_limits]\nmax_connections = 8\n[services.SSH]\ntarget = \"127.0.0.1:22\"\nconnect_timeout_secs = 3\nmax_bytes_per_sec = 1000\nconnection_rate = \"10/min\"\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.endpoint.unwrap().port, 8443);
        let s = &c.services["SSH"];
        assert_eq!(s.connect_timeout, Duration::from_secs(3));
        assert_eq!(s.limits.bytes_per_sec_to_target, Some(1000));
        assert_eq!(s.limits.bytes_per_sec_from_target, Some(1000));
        assert_eq!(c.tunnel_limits.max_connections, Some(8));
    }
}
