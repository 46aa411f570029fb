//! A WAN on this machine, for tests and the benchmark: three network namespaces, operator,
//! relay and site, joined by two `culvert-wanem` links (operator ↔ relay, relay ↔ site), and a
//! culvert-relay in the middle one with a CA of its own.
//!
//! ```text
//!  operator 10.201.1.1 ──wan── 10.201.1.2  relay  10.201.2.1 ──wan── 10.201.2.2 site
//! ```
//!
//! The relay namespace also routes between the two, so plain TCP from the operator to the site
//! crosses exactly the links culvert's path crosses: the baseline. Impairments apply to each
//! direction of each link, so a round trip operator → site → operator crosses four delays:
//! [`Wan::set_rtt`] divides by four.
//!
//! Needs root (namespaces, TUN devices), `ip` (iproute2) and /dev/net/tun. Everything it made
//! goes when it is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{KillOnDrop, WAIT};

pub const OPERATOR_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
/// The relay as the operator reaches it.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
/// The relay as the site reaches it.
pub const RELAY_SITE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
pub const SITE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
/// The relay's port (TLS: API and data plane), by default.
pub const RELAY_PORT: u16 = 8443;

/// The three namespaces and the emulator between them.
pub struct Wan {
    pub operator: String,
    pub relay: String,
    pub site: String,
    emulator: Option<Child>,
    control: Option<ChildStdin>,
    answers: mpsc::Receiver<String>,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let what = format!("{cmd:?}");
    match cmd.stdout(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{what} failed ({s})")),
        Err(e) => Err(format!("{what}: {e} (apt-get install iproute2)")),
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

impl Wan {
    /// Create the namespaces and start `culvert-wanem` (from `bins`) between them with
    /// `impair` (its options: `--delay`, `--rate`, `--queue` …).
    pub fn start(bins: &Path, impair: &[&str]) -> Result<Wan, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the WAN emulator needs root (network namespaces, TUN devices)".into());
        }
        // Namespaces are per process and per WAN: tests in one binary run side by side.
        static WANS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = WANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id());
        let names = ["op", "relay", "site"].map(|n| format!("cw-{n}-{tag}"));
        for n in &names {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", n])?;
        }
        let [op, relay, site] = names;
        let mut wan = Wan {
            operator: op.clone(),
            relay: relay.clone(),
            site: site.clone(),
            emulator: None,
            control: None,
            answers: mpsc::channel().1,
        };
        let mut child = Command::new(bins.join("culvert-wanem"))
            .args(["--link", &format!("{op}:{relay}:10.201.1")])
            .args(["--link", &format!("{relay}:{site}:10.201.2")])
            .args(impair)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start culvert-wanem: {e}"))?;
        wan.control = child.stdin.take();
        let out = child.stdout.take().unwrap();
        wan.emulator = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        wan.answers = rx;
        match wan.answers.recv_timeout(WAIT) {
            Ok(l) if l.contains("ready") => {}
            other => return Err(format!("culvert-wanem did not come up: {other:?}")),
        }
        // Routes across the relay namespace, which forwards: the plain-TCP baseline.
        ip(&[
            "-n",
            &op,
            "route",
            "add",
            "10.201.2.0/24",
            "via",
            "10.201.1.2",
        ])?;
        ip(&[
            "-n",
            &site,
            "route",
            "add",
            "10.201.1.0/24",
            "via",
            "10.201.2.1",
        ])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &relay,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]))?;
        Ok(wan)
    }

    /// Send one command to the emulator (`delay MS`, `loss PCT`, `rate MBIT`, `blackhole SECS`).
    pub fn control(&mut self, line: &str) {
        let c = self.control.as_mut().expect("the emulator runs");
        writeln!(c, "{line}").expect("the emulator takes commands");
        c.flush().unwrap();
        match self.answers.recv_timeout(WAIT) {
            Ok(a) if a == "ok" => {}
            other => panic!("culvert-wanem refused {line:?}: {other:?}"),
        }
    }

    /// Set the impairments so that a round trip operator → site → operator (four link
    /// crossings) takes `rtt` more than without, with `loss` percent lost per crossing.
    pub fn set_rtt(&mut self, rtt: Duration, loss: f64) {
        self.control(&format!("delay {}", rtt.as_secs_f64() * 1000.0 / 4.0));
        self.control(&format!("loss {loss}"));
    }

    /// A command running `program` in namespace `ns`.
    pub fn exec(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Run `f` on a thread inside namespace `ns`: sockets it creates (connected or listening)
    /// belong to that namespace, and can be used from any thread after.
    pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/var/run/netns").join(ns);
        std::thread::spawn(move || {
            let file =
                std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
        .join()
        .expect("the namespaced thread panicked")
    }

    /// The address of a relay on `port` as seen from the operator's side.
    pub fn relay_addr(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(RELAY_IP), port)
    }

    /// The address of a relay on `port` as seen from the site.
    pub fn relay_site_addr(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(RELAY_SITE_IP), port)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        drop(self.control.take());
        if let Some(c) = self.emulator.take() {
            drop(KillOnDrop(c));
        }
        for n in [&self.operator, &self.relay, &self.site] {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// What a relay in the WAN's relay namespace needs, written to `dir`: a CA (`ca.pem`), a server
/// certificate for both of its addresses, an API key, and a configuration file
/// (`relay.toml`: listening on `port`, its embedded MQTT broker on `port + 1000`, flow control
/// on or off). Returns (config, CA, API key).
pub fn relay_files(dir: &Path, port: u16, flow_control: bool) -> (PathBuf, PathBuf, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "culvert WAN test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(RELAY_IP)),
        SanType::IpAddress(IpAddr::V4(RELAY_SITE_IP)),
    ];
    p.distinguished_name.push(DnType::CommonName, "relay");
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("relay.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("relay-key.pem"), key.serialize_pem()).unwrap();
    let api_key: String = (0..32)
        .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
        .collect();
    std::fs::write(dir.join("relay-api-key"), &api_key).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"0.0.0.0:{port}\"\nstate_dir = \"state\"\napi_key_file = \"relay-api-key\"\nflow_control = {flow_control}\n\n[tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\n\n[mqtt]\nlisten = \"0.0.0.0:{}\"\n",
            port + 1000
        ),
    )
    .unwrap();
    (config, dir.join("ca.pem"), api_key)
}

/// culvert's whole path across the WAN: a relay in the relay namespace, culvertd at the site
/// forwarding each service to its target there, and `culvert connect` at the operator's, one
/// tunnel. Every process goes when it is dropped.
pub struct CulvertPath {
    /// The local port (in the operator's namespace, on 127.0.0.1) of each service.
    pub ports: std::collections::HashMap<String, u16>,
    pub relay_pid: u32,
    _procs: Vec<KillOnDrop>,
}

impl Wan {
    /// Start culvert's path (binaries from `bins`, files and logs in `dir`): the relay on
    /// `port`, with flow control on or off, and a tunnel whose services go to `services`'
    /// targets at the site.
    pub fn culvert_path(
        &self,
        bins: &Path,
        dir: &Path,
        port: u16,
        flow_control: bool,
        services: &[(&str, SocketAddr)],
    ) -> Result<CulvertPath, String> {
        let (config, ca, api_key) = relay_files(dir, port, flow_control);
        let log = |name: &str| {
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())
        };
        let mut procs = Vec::new();
        let relay = self
            .exec(&self.relay, bins.join("culvert-relay"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log("relay")?)
            .spawn()
            .map_err(|e| format!("cannot start culvert-relay: {e}"))?;
        let relay_pid = relay.id();
        procs.push(KillOnDrop(relay));
        let addr = Wan::relay_addr(port);
        let deadline = std::time::Instant::now() + WAIT;
        while !Wan::within(&self.operator, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        }) {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "the relay in {} did not listen on {addr}; see {}",
                    self.relay,
                    dir.join("relay.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let names: Vec<&str> = services.iter().map(|(n, _)| *n).collect();
        let open = self
            .exec(&self.operator, bins.join("culvert"))
            .args([
                "--json",
                "tunnel",
                "open",
                "--thing",
                "wan-site",
                "--service",
            ])
            .arg(names.join(","))
            .env("CULVERT_RELAY", addr.to_string())
            .env("CULVERT_API_KEY", &api_key)
            .env("CULVERT_CA", &ca)
            .output()
            .map_err(|e| format!("culvert tunnel open: {e}"))?;
        let tunnel: serde_json::Value = serde_json::from_slice(&open.stdout).map_err(|_| {
            format!(
                "culvert tunnel open failed: {}",
                String::from_utf8_lossy(&open.stderr)
            )
        })?;
        let token = |k: &str| tunnel[k].as_str().unwrap_or_default().to_owned();
        let rules = dir.join("rules.toml");
        // The WAN's addresses, and the site's own loopback (a target on the gateway's host).
        let mut text = String::from("[acl]\nallow = [\"10.201.0.0/16\", \"127.0.0.0/8\"]\n");
        for (name, target) in services {
            text.push_str(&format!("[services.{name}]\ntarget = \"{target}\"\n"));
        }
        std::fs::write(&rules, text).map_err(|e| e.to_string())?;
        procs.push(KillOnDrop(
            self.exec(&self.site, bins.join("culvertd"))
                .arg("--config")
                .arg(&rules)
                .arg("--relay")
                .arg(Wan::relay_site_addr(port).to_string())
                .arg("--ca")
                .arg(&ca)
                .env("CULVERT_DESTINATION_TOKEN", token("destinationAccessToken"))
                .env("RUST_LOG", "info,culvert_protocol=debug")
                .stdout(Stdio::null())
                .stderr(log("culvertd")?)
                .spawn()
                .map_err(|e| format!("cannot start culvertd: {e}"))?,
        ));
        let map: Vec<String> = names.iter().map(|n| format!("{n}=0")).collect();
        let mut connect = self
            .exec(&self.operator, bins.join("culvert"))
            .args(["connect", "-s", &map.join(",")])
            .env("CULVERT_RELAY", addr.to_string())
            .env("CULVERT_CA", &ca)
            .env("CULVERT_ACCESS_TOKEN", token("sourceAccessToken"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log("culvert-connect")?)
            .spawn()
            .map_err(|e| format!("cannot start culvert connect: {e}"))?;
        let out = connect.stdout.take().unwrap();
        procs.push(KillOnDrop(connect));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut ports = std::collections::HashMap::new();
        while ports.len() < services.len() {
            let line = rx.recv_timeout(WAIT).map_err(|_| {
                format!(
                    "culvert connect did not report its ports; see {}",
                    dir.join("culvert-connect.log").display()
                )
            })?;
            // "culvert: service SSH listening on 127.0.0.1:PORT"
            if let Some(rest) = line.strip_prefix("culvert: service ") {
                let mut it = rest.split_whitespace();
                let name = it.next().unwrap_or_default().to_owned();
                if let Some(Ok(a)) = it.last().map(str::parse::<SocketAddr>) {
                    ports.insert(name, a.port());
                }
            }
        }
        Ok(CulvertPath {
            ports,
            relay_pid,
            _procs: procs,
        })
    }
}
