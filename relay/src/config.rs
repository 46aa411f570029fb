//! Relay configuration: a TOML file read in two stages — a raw serde struct that refuses unknown
//! keys, then [`RawConfig::validate`] into typed values with errors that name the key and say
//! what to do.
//!
//! ```toml
//! listen = "0.0.0.0:443"
//! state_dir = "/var/lib/culvert-relay"
//! # store = "postgres://culvert-relay@db.internal:5432/culvert"   # default: tunnels.redb in state_dir
//! # store_password_file = "/etc/culvert/store-password"
//! # store_ca_file = "/etc/culvert/db-ca.pem"   # TLS to the database: its server's CA
//! api_key_file = "/etc/culvert/relay-api-key"   # or: api_key = "..."
//! flow_control = true               # offer culvert's flow control (false: exactly as AWS's relay)
//! # audit_file = "/var/log/culvert/relay-audit.jsonl"   # default: audit.jsonl in state_dir
//!
//! [access]
//! require_reason = false            # opening a tunnel needs a reason (operators' keys and the bootstrap key)
//!
//! [aws]                             # AWS's control API (aws iotsecuretunneling …) on the same port
//! region = "us-east-1"              # the region clients sign for, and ARNs name
//! account_id = "000000000000"       # the account ARNs name
//! # key_file = "/var/lib/culvert-relay/aws-signing.key"  # AWS secrets derive from it (made if absent)
//!
//! [tls]
//! cert = "/etc/culvert/relay.pem"      # certificate chain, PEM
//! key = "/etc/culvert/relay-key.pem"   # private key, PEM
//!
//! [limits]
//! max_services = 8                  # services per tunnel
//! closed_retention_minutes = 1440   # closed tunnels stay visible this long
//! # The HTTPS listener (API and data plane); defaults fit the open-file limit:
//! # max_connections = 100000         # open at once, all sources
//! # max_connections_per_source = 1024
//! # max_handshakes = 512             # not yet past TLS and the first request, all sources
//! # max_handshakes_per_source = 32
//! # handshake_timeout_secs = 10      # TLS, then the request head; also idle keep-alive
//!
//! [mqtt]                            # device notification (all keys optional)
//! listen = "0.0.0.0:8883"           # embedded broker's TLS listener (when no broker is set)
//! # broker = "mqtts://broker.example.com:8883"   # an external broker instead
//! # username = "culvert-relay"
//! # password_file = "/etc/culvert/mqtt-password"
//! # ca = "/etc/culvert/broker-ca.pem"
//! topic = "$aws/things/{thing}/tunnels/notify"
//! region = "culvert"
//! # max_connections = 10000          # embedded broker: device connections at once
//! # max_connections_per_source = 1024
//!
//! # [cluster]                       # a node of a cluster (needs store and mqtt.broker)
//! # node = "relay-a"
//! # listen = "0.0.0.0:8444"          # node links (mTLS)
//! # advertise = "relay-a.internal:8444"
//! # ca = "/etc/culvert/cluster/ca.pem"
//! # cert = "/etc/culvert/cluster/relay-a.pem"
//! # key = "/etc/culvert/cluster/relay-a-key.pem"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::registry::Limits;
use crate::slots::ListenerLimits;
use crate::tokens::Secret;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: String,
    pub state_dir: PathBuf,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Announce culvert's flow-control extension to peers (default true).
    #[serde(default)]
    pub flow_control: Option<bool>,
    pub tls: RawTls,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub daemon: RawDaemon,
    /// The hash-chained audit trail (default: `audit.jsonl` in the state directory).
    #[serde(default)]
    pub audit_file: Option<PathBuf>,
    #[serde(default)]
    pub access: RawAccess,
    #[serde(default)]
    pub aws: RawAws,
    /// Where tunnels, devices and operators live: absent for the embedded redb file, or a
    /// `postgres://` URL for a database several relays share.
    #[serde(default)]
    pub store: Option<String>,
    /// The database password, read from this file (instead of the URL).
    #[serde(default)]
    pub store_password_file: Option<PathBuf>,
    /// The CA (PEM) the database server's TLS certificate must chain to (default: the
    /// system's roots).
    #[serde(default)]
    pub store_ca_file: Option<PathBuf>,
    /// This relay is a node of a cluster ([`crate::cluster`]).
    #[serde(default)]
    pub cluster: Option<crate::cluster::RawCluster>,
    /// The web console ([`crate::console`]), on a listener of its own.
    #[serde(default)]
    pub console: Option<RawConsole>,
}

/// `[console]`: the web console's listener and its sessions.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsole {
    pub listen: String,
    /// A session unused this long ends (default 30).
    #[serde(default)]
    pub idle_minutes: Option<u64>,
}

impl RawConsole {
    pub fn validate(
        self,
        relay_listen: SocketAddr,
        state_dir: &Path,
    ) -> Result<crate::console::ConsoleSettings, String> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "console.listen: {:?} is not an address:port such as \"0.0.0.0:8444\"",
                self.listen
            )
        })?;
        if listen == relay_listen {
            return Err(format!(
                "console.listen: {listen} is the relay's own listen address; the console needs a port (an origin) of its own"
            ));
        }
        let idle = self
            .idle_minutes
            .unwrap_or(crate::console::DEFAULT_IDLE_MINUTES);
        if !(1..=720).contains(&idle) {
            return Err(format!(
                "console.idle_minutes: {idle} is out of range: 1 to 720 (a session lives 12 h at most)"
            ));
        }
        Ok(crate::console::ConsoleSettings {
            listen,
            idle: Duration::from_secs(idle * 60),
            known_hosts: state_dir.join(crate::console::KNOWN_HOSTS_FILE),
        })
    }
}

/// Where the relay keeps its state.
#[derive(Clone, Debug, Default)]
pub enum StoreSettings {
    /// `tunnels.redb` in the state directory.
    #[default]
    Embedded,
    Postgres {
        url: String,
        password: Option<String>,
        /// The CA the server's certificate must chain to (`store_ca_file`).
        ca: Option<PathBuf>,
    },
}

impl StoreSettings {
    /// `store`, `store_password_file` and `store_ca_file` of a configuration (or the
    /// command line).
    pub fn parse(
        url: Option<String>,
        password_file: Option<&Path>,
        ca: Option<PathBuf>,
    ) -> Result<StoreSettings, String> {
        match url {
            None if password_file.is_some() => {
                Err("store_password_file is set, but store (a postgres:// URL) is not".into())
            }
            None if ca.is_some() => {
                Err("store_ca_file is set, but store (a postgres:// URL) is not".into())
            }
            None => Ok(StoreSettings::Embedded),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                let password = match password_file {
                    None => None,
                    Some(f) => Some(
                        std::fs::read_to_string(f)
                            .map_err(|e| {
                                format!("store_password_file: cannot read {}: {e}", f.display())
                            })?
                            .trim_end_matches(['\r', '\n'])
                            .to_owned(),
                    ),
                };
                if let Some(ca) = &ca
                    && !ca.is_file()
                {
                    return Err(format!("store_ca_file: {} is not a file", ca.display()));
                }
                Ok(StoreSettings::Postgres {
                    url: u,
                    password,
                    ca,
                })
            }
            Some(u) => Err(format!(
                "store: {:?} is not a postgres:// URL (leave store out for the embedded store)",
                u.split('@').next_back().unwrap_or_default()
            )),
        }
    }
}

/// `[aws]`: AWS's control API (JSON 1.1, SigV4) beside culvert's own.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: Option<String>,
    pub account_id: Option<String>,
    pub key_file: Option<PathBuf>,
}

pub const DEFAULT_AWS_REGION: &str = "us-east-1";
/// The account ARNs name when none is set (as AWS's local stand-ins use).
pub const DEFAULT_AWS_ACCOUNT: &str = "000000000000";

/// The AWS control API's settings.
#[derive(Clone, Debug)]
pub struct AwsSettings {
    pub region: String,
    pub account_id: String,
    /// The relay AWS key ([`crate::aws::keys`]).
    pub key_file: PathBuf,
    /// The bootstrap admin gets an AWS pair (the dev relay only).
    pub bootstrap_pair: bool,
}

impl AwsSettings {
    /// The defaults for a state directory.
    pub fn defaults(state_dir: &Path) -> AwsSettings {
        AwsSettings {
            region: DEFAULT_AWS_REGION.into(),
            account_id: DEFAULT_AWS_ACCOUNT.into(),
            key_file: state_dir.join("aws-signing.key"),
            bootstrap_pair: false,
        }
    }
}

impl RawAws {
    fn validate(
        self,
        state_dir: &Path,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<AwsSettings, String> {
        let mut s = AwsSettings::defaults(state_dir);
        if let Some(r) = self.region {
            if r.is_empty()
                || r.len() > 32
                || !r
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!(
                    "aws.region: {r:?} is not a region name such as \"eu-west-1\" (a-z 0-9 -)"
                ));
            }
            s.region = r;
        }
        if let Some(a) = self.account_id {
            if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("aws.account_id: {a:?} is not 12 digits"));
            }
            s.account_id = a;
        }
        if let Some(f) = self.key_file {
            s.key_file = resolve(&f);
        }
        Ok(s)
    }
}

/// `[access]`: policy for operators.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    #[serde(default)]
    pub require_reason: bool,
}

/// How the process runs: `[daemon]`, the same keys as culvertd's.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// On SIGTERM, how long connected peers may stay before they are disconnected (default 30).
    pub shutdown_grace_secs: Option<u64>,
    /// The Prometheus endpoint, e.g. "127.0.0.1:9478" (default: none).
    pub metrics_listen: Option<String>,
    /// Started as root outside systemd: become this user after binding and reading keys.
    pub user: Option<String>,
}

/// Validated `[daemon]` settings.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    pub shutdown_grace: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub user: Option<String>,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            shutdown_grace: Duration::from_secs(30),
            metrics_listen: None,
            user: None,
        }
    }
}

impl RawDaemon {
    pub fn validate(self) -> Result<DaemonSettings, String> {
        let d = DaemonSettings::default();
        let shutdown_grace = match self.shutdown_grace_secs {
            Some(s) if s > 3600 => return Err("daemon.shutdown_grace_secs must be 0-3600".into()),
            Some(s) => Duration::from_secs(s),
            None => d.shutdown_grace,
        };
        let metrics_listen = match self.metrics_listen {
            Some(m) => Some(m.parse().map_err(|_| {
                format!(
                    "daemon.metrics_listen: {m:?} is not an address:port such as \"127.0.0.1:9478\""
                )
            })?),
            None => None,
        };
        if self.user.as_deref() == Some("") {
            return Err("daemon.user: empty user name".into());
        }
        Ok(DaemonSettings {
            shutdown_grace,
            metrics_listen,
            user: self.user,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub listen: Option<String>,
    pub broker: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub client_id: Option<String>,
    pub ca: Option<PathBuf>,
    pub topic: Option<String>,
    pub region: Option<String>,
    /// Embedded broker: device connections at once (all sources, and from one source).
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<usize>,
}

/// Where device notifications go.
#[derive(Clone)]
pub enum BrokerMode {
    /// Run rumqttd in-process; gateways connect to `listen` (TLS, the relay's certificate).
    Embedded { listen: SocketAddr },
    /// Publish to an external broker (mosquitto, EMQX, VerneMQ, HiveMQ …).
    External(crate::notify::BrokerClient),
}

#[derive(Clone)]
pub struct MqttSettings {
    pub mode: BrokerMode,
    /// The embedded broker's TLS listener.
    pub listener: ListenerLimits,
    /// `{thing}` is replaced by the thing name.
    pub topic_template: String,
    /// The `region` field of notifications.
    pub region: String,
}

pub const DEFAULT_TOPIC: &str = "$aws/things/{thing}/tunnels/notify";
pub const DEFAULT_REGION: &str = "culvert";

impl RawMqtt {
    pub fn validate(self, resolve: impl Fn(&Path) -> PathBuf) -> Result<MqttSettings, String> {
        let mut listener = FdBudget::from_limit().mqtt();
        listener.max_connections = positive("mqtt.max_connections", self.max_connections)?
            .unwrap_or(listener.max_connections);
        listener.max_connections_per_source = positive(
            "mqtt.max_connections_per_source",
            self.max_connections_per_source,
        )?
        .unwrap_or(listener.max_connections_per_source);
        let topic_template = self.topic.unwrap_or_else(|| DEFAULT_TOPIC.to_owned());
        if !topic_template.contains("{thing}") || topic_template.contains(['+', '#']) {
            return Err(format!(
                "mqtt.topic {topic_template:?} must contain {{thing}} and no wildcards"
            ));
        }
        let region = self.region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let mode = match self.broker {
            None => {
                if self.username.is_some() || self.password_file.is_some() || self.ca.is_some() {
                    return Err("mqtt.username/password_file/ca only apply with mqtt.broker".into());
                }
                let listen = self.listen.unwrap_or_else(|| "0.0.0.0:8883".into());
                let listen = listen.parse().map_err(|_| {
                    format!(
                        "mqtt.listen: {listen:?} is not an address:port such as \"0.0.0.0:8883\""
                    )
                })?;
                BrokerMode::Embedded { listen }
            }
            Some(url) => {
                if self.listen.is_some() {
                    return Err(
                        "mqtt.listen is for the embedded broker; remove it or mqtt.broker".into(),
                    );
                }
                let ep = culvert_protocol::client::Endpoint::parse_mqtt(&url)
                    .map_err(|e| format!("mqtt.broker: {e}"))?;
                let (host, port) = (ep.host, ep.port);
                let password = match &self.password_file {
                    Some(f) => std::fs::read_to_string(resolve(f))
                        .map_err(|e| {
                            format!("mqtt.password_file: cannot read {}: {e}", f.display())
                        })?
                        .trim()
                        .to_owned(),
                    None => String::new(),
                };
                let ca = self.ca.as_ref().map(|c| resolve(c));
                let tls = culvert_protocol::client::tls_config(ca.as_deref())
                    .map_err(|e| format!("mqtt.ca: {e}"))?;
                BrokerMode::External(crate::notify::BrokerClient {
                    host,
                    port,
                    tls,
                    client_id: self.client_id.unwrap_or_else(|| "culvert-relay".into()),
                    username: self.username.unwrap_or_else(|| "culvert-relay".into()),
                    password: password.into(),
                })
            }
        };
        let limits_set =
            self.max_connections.is_some() || self.max_connections_per_source.is_some();
        if matches!(mode, BrokerMode::External(_)) && limits_set {
            return Err(
                "mqtt.max_connections/max_connections_per_source apply to the embedded broker; with mqtt.broker set them on that broker".into(),
            );
        }
        Ok(MqttSettings {
            mode,
            listener,
            topic_template,
            region,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default = "default_max_services")]
    pub max_services: usize,
    #[serde(default = "default_retention")]
    pub closed_retention_minutes: u64,
    /// The HTTPS listener's connection limits (see [`ListenerLimits`]).
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub max_connections_per_source: Option<usize>,
    #[serde(default)]
    pub max_handshakes: Option<usize>,
    #[serde(default)]
    pub max_handshakes_per_source: Option<usize>,
    #[serde(default)]
    pub handshake_timeout_secs: Option<u64>,
}

/// A limit that must be at least 1 when given.
fn positive(key: &str, v: Option<usize>) -> Result<Option<usize>, String> {
    match v {
        Some(0) => Err(format!("{key} must be at least 1")),
        v => Ok(v),
    }
}

/// File descriptors this process may use, and how the listeners share them by default: a
/// quarter of the budget for the embedded broker's device connections, three quarters for the
/// HTTPS listener, after a reserve for the store, logs and the relay's own connections.
#[derive(Clone, Copy, Debug)]
pub struct FdBudget {
    pub open_files: usize,
}

impl FdBudget {
    /// Descriptors kept back from the listeners' defaults.
    const RESERVE: usize = 256;

    /// The budget of this process: its hard open-file limit, which the relay raises its soft
    /// limit to at start (culvert_appliance::limits).
    pub fn from_limit() -> FdBudget {
        FdBudget {
            open_files: culvert_appliance::limits::open_file_hard_limit(),
        }
    }

    fn usable(self) -> usize {
        self.open_files.saturating_sub(Self::RESERVE).max(64)
    }

    pub fn https(self) -> ListenerLimits {
        ListenerLimits::with_budget(self.usable() / 4 * 3, 100_000)
    }

    pub fn mqtt(self) -> ListenerLimits {
        ListenerLimits::with_budget(self.usable() / 4, 10_000)
    }
}

impl RawLimits {
    /// The HTTPS listener's limits: defaults from the descriptor budget, then what is set.
    pub fn listener(&self) -> Result<ListenerLimits, String> {
        let mut l = FdBudget::from_limit().https();
        let set = |key: &str, v: Option<usize>, into: &mut usize| -> Result<(), String> {
            if let Some(n) = positive(&format!("limits.{key}"), v)? {
                *into = n;
            }
            Ok(())
        };
        set(
            "max_connections",
            self.max_connections,
            &mut l.max_connections,
        )?;
        set(
            "max_connections_per_source",
            self.max_connections_per_source,
            &mut l.max_connections_per_source,
        )?;
        set("max_handshakes", self.max_handshakes, &mut l.max_handshakes)?;
        set(
            "max_handshakes_per_source",
            self.max_handshakes_per_source,
            &mut l.max_handshakes_per_source,
        )?;
        match self.handshake_timeout_secs {
            Some(s) if !(1..=300).contains(&s) => {
                return Err("limits.handshake_timeout_secs must be 1-300".into());
            }
            Some(s) => l.handshake_timeout = Duration::from_secs(s),
            None => {}
        }
        Ok(l)
    }
}

fn default_max_services() -> usize {
    Limits::default().max_services
}
fn default_retention() -> u64 {
    Limits::default().closed_retention.as_secs() / 60
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_services: default_max_services(),
            closed_retention_minutes: default_retention(),
            max_connections: None,
            max_connections_per_source: None,
            max_handshakes: None,
            max_handshakes_per_source: None,
            handshake_timeout_secs: None,
        }
    }
}

pub struct RelayConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub api_key: Secret,
    pub tls: Arc<rustls::ServerConfig>,
    pub limits: Limits,
    /// Connection limits of the HTTPS listener.
    pub listener: ListenerLimits,
    pub mqtt: MqttSettings,
    pub daemon: DaemonSettings,
    /// Announce culvert's flow-control extension (see culvert_protocol::flow).
    pub flow_control: bool,
    pub audit_file: PathBuf,
    /// Opening a tunnel needs a reason.
    pub require_reason: bool,
    pub aws: AwsSettings,
    pub store: StoreSettings,
    /// This relay is a node of a cluster on the (shared) store.
    pub cluster: Option<crate::cluster::ClusterSettings>,
    /// The web console, if it is served.
    pub console: Option<crate::console::ConsoleSettings>,
}

/// A configuration problem, naming the file and key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl RawConfig {
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        raw.validate(base)
            .map_err(|message| ConfigError { file, message })
    }

    /// Relative paths are taken relative to `base` (the config file's directory).
    pub fn validate(self, base: &Path) -> Result<RelayConfig, String> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "listen: {:?} is not an address:port such as \"0.0.0.0:443\"",
                self.listen
            )
        })?;
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let api_key = match (self.api_key, self.api_key_file) {
            (Some(k), None) => k,
            (None, Some(f)) => std::fs::read_to_string(resolve(&f))
                .map_err(|e| format!("api_key_file: cannot read {}: {e}", f.display()))?
                .trim()
                .to_owned(),
            (Some(_), Some(_)) => {
                return Err("set either api_key or api_key_file, not both".into());
            }
            (None, None) => {
                return Err(
                    "api_key_file (or api_key) is required: the control API needs a key".into(),
                );
            }
        };
        if api_key.len() < 16 {
            return Err("api_key: use at least 16 random characters".into());
        }
        if self.limits.max_services == 0 {
            return Err("limits.max_services must be at least 1".into());
        }
        let listener = self.limits.listener()?;
        let tls = server_tls(&resolve(&self.tls.cert), &resolve(&self.tls.key))?;
        let mut raw_mqtt = self.mqtt;
        if let Some(c) = &self.cluster {
            // Nodes share the broker: each needs a client id of its own.
            raw_mqtt
                .client_id
                .get_or_insert_with(|| format!("culvert-relay-{}", c.node));
        }
        let mqtt = raw_mqtt.validate(resolve)?;
        let daemon = self.daemon.validate()?;
        let state_dir = resolve(&self.state_dir);
        let aws = self.aws.validate(&state_dir, resolve)?;
        let store = StoreSettings::parse(
            self.store,
            self.store_password_file.map(|f| resolve(&f)).as_deref(),
            self.store_ca_file.map(|f| resolve(&f)),
        )?;
        let cluster = match self.cluster {
            None => None,
            Some(c) => {
                if !matches!(store, StoreSettings::Postgres { .. }) {
                    return Err(
                        "cluster: the nodes of a cluster share their state: set store = \"postgres://…\""
                            .into(),
                    );
                }
                if matches!(mqtt.mode, BrokerMode::Embedded { .. }) {
                    return Err(
                        "cluster: the nodes of a cluster notify devices through one broker: set mqtt.broker (an embedded broker would reach only the devices connected to its node)"
                            .into(),
                    );
                }
                let c = c.validate(resolve)?;
                if c.listen == listen {
                    return Err(format!(
                        "cluster.listen: {} is the relay's own listen address; node links need a port of their own",
                        c.listen
                    ));
                }
                Some(c)
            }
        };
        let console = self
            .console
            .map(|c| c.validate(listen, &state_dir))
            .transpose()?;
        Ok(RelayConfig {
            aws,
            store,
            cluster,
            console,
            listen,
            audit_file: self
                .audit_file
                .map(|f| resolve(&f))
                .unwrap_or_else(|| state_dir.join("audit.jsonl")),
            require_reason: self.access.require_reason,
            state_dir,
            api_key: Secret::new(api_key),
            tls,
            limits: Limits {
                max_services: self.limits.max_services,
                closed_retention: Duration::from_secs(self.limits.closed_retention_minutes * 60),
            },
            listener,
            mqtt,
            daemon,
            flow_control: self.flow_control.unwrap_or(true),
        })
    }
}

/// The certificates of PEM file `path`, at least one; errors name the configuration key.
pub fn pem_certs(
    key: &str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of PEM file `path`; errors name the configuration key.
pub fn pem_key(
    key: &str,
    path: &Path,
) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("{key}: {}: {e}", path.display()))?
        .ok_or_else(|| format!("{key}: {} holds no PEM private key", path.display()))
}

/// A rustls server configuration (TLS 1.2 and 1.3, ring) from PEM files.
pub fn server_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = pem_certs("tls.cert", cert)?;
    let key = pem_key("tls.key", key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("tls: certificate and key do not fit together: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
