//! culvertd's configuration file.
//!
//! ```toml
//! [relay]
//! endpoint = "relay.example.com:443"   # host:port of culvert-relay, or AWS's data endpoint
//! ca = "/etc/culvert/relay-ca.pem"     # optional extra CA to trust (besides the system's)
//!
//! [services.SSH]                       # the service name operators ask for
//! target = "127.0.0.1:22"              # host:port …
//!
//! [services.HMI]
//! target = "unix:/run/hmi/http.sock"   # … or a Unix socket
//! connect_timeout_secs = 5             # optional, default 10
//! ```
//!
//! With an `[mqtt]` section and no `--token`, culvertd waits for tunnel notifications instead:
//!
//! ```toml
//! [mqtt]
//! broker = "mqtts://relay.example.com:8883"  # the relay's embedded broker, or any MQTT broker
//! thing_name = "robot-cell-7"                # this gateway's identity
//! password_file = "/etc/culvert/mqtt-password"  # username defaults to thing_name
//! # client_cert = "/etc/culvert/device.pem"  # and/or a client certificate
//! # client_key = "/etc/culvert/device-key.pem"
//! # ca = "/etc/culvert/broker-ca.pem"        # default: relay.ca
//! # topic = "$aws/things/{thing}/tunnels/notify"
//! ```
//!
//! Errors name the file, the line and the key, e.g.
//! `gateway.toml:7: services.SSH.target: "10.0.0.5" needs a port (host:port)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use culvert_protocol::client::Endpoint;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    relay: Option<RawRelay>,
    mqtt: Option<RawMqtt>,
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    endpoint: Option<Spanned<String>>,
    region: Option<String>,
    ca: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
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
}

/// How culvertd receives tunnel notifications.
#[derive(Clone)]
pub struct MqttConfig {
    pub broker: Endpoint,
    pub thing_name: String,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM certificate chain and key for TLS client authentication.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub ca: Option<PathBuf>,
    pub topic: String,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("broker", &self.broker)
            .field("thing_name", &self.thing_name)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    target: Spanned<String>,
    connect_timeout_secs: Option<Spanned<u64>>,
}

/// Where a service's connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `host:port`; the host may be a name, resolved at connect time.
    Tcp { host: String, port: u16 },
    /// A Unix stream socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
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
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{s:?}: expected [IPv6]:port"))?;
            (h, p)
        } else {
            s.rsplit_once(':')
                .filter(|(h, _)| !h.contains(':'))
                .ok_or_else(|| {
                    format!("{s:?} needs a port (host:port), or unix:/path for a socket")
                })?
        };
        if host.is_empty() {
            return Err(format!("{s:?}: the host is empty"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port 1-65535"))?;
        Ok(Target::Tcp {
            host: host.to_owned(),
            port,
        })
    }

    fn unix(p: &str) -> Result<Target, String> {
        if !p.starts_with('/') {
            return Err(format!("unix socket path {p:?} must be absolute"));
        }
        Ok(Target::Unix(PathBuf::from(p)))
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub target: Target,
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoint: Option<Endpoint>,
    pub ca: Option<PathBuf>,
    pub mqtt: Option<MqttConfig>,
    pub services: BTreeMap<String, Service>,
}

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

/// Parse and validate configuration text.
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        vec![Problem {
            line,
            key: String::new(),
            message: e.message().trim().to_owned(),
        }]
    })?;
    let mut problems = Vec::new();
    let mut push = |span: std::ops::Range<usize>, key: String, message: String| {
        problems.push(Problem {
            line: Some(line_of(text, span.start)),
            key,
            message,
        })
    };
    let mut endpoint = None;
    let mut ca = None;
    if let Some(r) = raw.relay {
        match (r.endpoint, r.region) {
            (Some(e), None) => match Endpoint::parse(e.get_ref()) {
                Ok(ep) => endpoint = Some(ep),
                Err(m) => push(e.span(), "relay.endpoint".into(), m),
            },
            (None, Some(region)) => endpoint = Some(Endpoint::aws_region(&region)),
            (Some(e), Some(_)) => push(
                e.span(),
                "relay.endpoint".into(),
                "set either relay.endpoint or relay.region, not both".into(),
            ),
            (None, None) => {}
        }
        if let Some(c) = r.ca {
            let p = if c.get_ref().is_absolute() {
                c.get_ref().clone()
            } else {
                base.join(c.get_ref())
            };
            if !p.is_file() {
                push(
                    c.span(),
                    "relay.ca".into(),
                    format!("{} does not exist or is not a file", p.display()),
                );
            }
            ca = Some(p);
        }
    }
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let mut mqtt = None;
    if let Some(m) = raw.mqtt {
        let file =
            |key: &str,
             p: &Spanned<PathBuf>,
             push: &mut dyn FnMut(std::ops::Range<usize>, String, String)| {
                let path = resolve(p.get_ref());
                if !path.is_file() {
                    push(
                        p.span(),
                        format!("mqtt.{key}"),
                        format!("{} does not exist or is not a file", path.display()),
                    );
                }
                path
            };
        let broker = match Endpoint::parse_mqtt(m.broker.get_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                push(m.broker.span(), "mqtt.broker".into(), e);
                None
            }
        };
        if !culvert_protocol::valid_name(m.thing_name.get_ref()) {
            push(
                m.thing_name.span(),
                "mqtt.thing_name".into(),
                "thing names are 1-128 characters of A-Z a-z 0-9 : _ -".into(),
            );
        }
        let password = match (&m.password, &m.password_file) {
            (Some(_), Some(f)) => {
                push(
                    f.span(),
                    "mqtt.password_file".into(),
                    "set password or password_file, not both".into(),
                );
                None
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => {
                let path = file("password_file", f, &mut push);
                std::fs::read_to_string(&path)
                    .ok()
                    .map(|p| p.trim().to_owned())
            }
            (None, None) => None,
        };
        let client_cert = match (&m.client_cert, &m.client_key) {
            (Some(c), Some(k)) => Some((
                file("client_cert", c, &mut push),
                file("client_key", k, &mut push),
            )),
            (Some(c), None) => {
                push(
                    c.span(),
                    "mqtt.client_key".into(),
                    "client_cert needs client_key".into(),
                );
                None
            }
            (None, Some(k)) => {
                push(
                    k.span(),
                    "mqtt.client_cert".into(),
                    "client_key needs client_cert".into(),
                );
                None
            }
            (None, None) => None,
        };
        if password.is_none() && client_cert.is_none() && m.password_file.is_none() {
            push(
                m.thing_name.span(),
                "mqtt".into(),
                "give the device identity: password_file (or password) and/or client_cert + client_key".into(),
            );
        }
        let ca_path = m.ca.as_ref().map(|c| file("ca", c, &mut push));
        let thing = m.thing_name.get_ref().clone();
        let topic = match &m.topic {
            Some(t) if t.get_ref().contains(['+', '#']) => {
                push(
                    t.span(),
                    "mqtt.topic".into(),
                    "the notify topic may not contain wildcards".into(),
                );
                String::new()
            }
            Some(t) => t.get_ref().replace("{thing}", &thing),
            None => format!("$aws/things/{thing}/tunnels/notify"),
        };
        if let Some(broker) = broker {
            mqtt = Some(MqttConfig {
                broker,
                client_id: m.client_id.unwrap_or_else(|| thing.clone()),
                username: m
                    .username
                    .or_else(|| password.is_some().then(|| thing.clone())),
                thing_name: thing,
                password,
                client_cert,
                ca: ca_path,
                topic,
            });
        }
    }
    let mut services = BTreeMap::new();
    for (name, svc) in raw.services {
        let key = format!("services.{}", name.get_ref());
        if !culvert_protocol::valid_name(name.get_ref()) {
            push(
                name.span(),
                key.clone(),
                "service names are 1-128 characters of A-Z a-z 0-9 : _ -".into(),
            );
            continue;
        }
        let target = match Target::parse(svc.target.get_ref()) {
            Ok(t) => t,
            Err(m) => {
                push(svc.target.span(), format!("{key}.target"), m);
                continue;
            }
        };
        let connect_timeout = match svc.connect_timeout_secs {
            Some(t) if *t.get_ref() == 0 || *t.get_ref() > 300 => {
                push(
                    t.span(),
                    format!("{key}.connect_timeout_secs"),
                    "must be 1-300".into(),
                );
                continue;
            }
            Some(t) => Duration::from_secs(*t.get_ref()),
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        services.insert(
            name.get_ref().clone(),
            Service {
                name: name.into_inner(),
                target,
                connect_timeout,
            },
        );
    }
    if services.is_empty() && problems.is_empty() {
        problems.push(Problem {
            line: None,
            key: "services".into(),
            message: "no service defined: add e.g. [services.SSH] target = \"127.0.0.1:22\"".into(),
        });
    }
    if problems.is_empty() {
        Ok(Config {
            endpoint,
            ca,
            mqtt,
            services,
        })
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        parse(text, Path::new(".")).unwrap_err()
    }

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("10.0.0.5:502").unwrap(),
            Target::Tcp {
                host: "10.0.0.5".into(),
                port: 502
            }
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
        assert!(Target::parse("unix:relative").is_err());
    }

    #[test]
    fn errors_name_line_and_key() {
        let p = problems(
            "[services.SSH]\ntarget = \"127.0.0.1:22\"\n\n[services.HMI]\ntarget = \"hmi\"\n",
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, Some(5));
        assert_eq!(p[0].key, "services.HMI.target");
        let p = problems("[services.SSH]\ntarget = \"127.0.0.1:22\"\ncolour = \"blue\"\n");
        assert_eq!(p[0].line, Some(3));
        assert!(p[0].message.contains("unknown field"), "{:?}", p[0]);
        let p = problems("[services.SSH]\ntarget = \"a:1\"\n[services.SSH]\ntarget = \"b:2\"\n");
        assert!(
            p[0].message.contains("duplicate") || p[0].message.contains("redefin"),
            "{:?}",
            p[0]
        );
        let p = problems("");
        assert_eq!(p[0].key, "services");
    }

    #[test]
    fn good_config() {
        let c = parse(
            "[relay]\nendpoint = \"127.0.0.1:8443\"\n[services.SSH]\ntarget = \"127.0.0.1:22\"\nconnect_timeout_secs = 3\n",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.endpoint.unwrap().port, 8443);
        assert_eq!(c.services["SSH"].connect_timeout, Duration::from_secs(3));
    }
}
