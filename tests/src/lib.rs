//! Test harness for culvert's end-to-end tests: starts the real programs (`culvert-relay`,
//! `culvertd`, `culvert`) as separate processes on loopback, with ports chosen by the OS, plus
//! real OpenSSH, mosquitto and simple in-process TCP targets. What the demo and the benchmark
//! also need (building the binaries, processes, sshd) is in `culvert-devkit`, re-exported here.
//!
//! Every wait is bounded and fails with a message saying what did not happen; nothing asserts
//! on elapsed time. A missing tool (sshd, ssh, scp, ssh-keygen) fails the test with the Debian
//! package to install.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use culvert_devkit::{
    KillOnDrop, Proc, Sshd, WAIT, free_port, require_tool, scratch, wait_for, workspace,
};
pub use serde_json::Value;

pub mod browser;

/// The directory holding the built binaries (building them once per test process).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // culvert-devkit: the WAN emulator (culvert-wanem) of tests/tests/wan.rs.
        culvert_devkit::build_binaries(&["culvert-demo", "culvert-devkit"])
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// A command running `program` with its open-file limit (soft and hard) set to `open_files`.
pub fn prlimit(open_files: u32, program: &Path) -> Command {
    let mut c = Command::new(require_tool("prlimit", "util-linux"));
    c.arg(format!("--nofile={open_files}:{open_files}"))
        .arg("--")
        .arg(program);
    c
}

/// A running `culvert-relay --dev`.
pub struct Relay {
    pub proc: Proc,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub api_key: String,
    pub ca: PathBuf,
    /// The embedded MQTT broker's TLS address (absent with an external broker).
    pub mqtt: Option<SocketAddr>,
    /// The web console's URL (`https://127.0.0.1:PORT/`).
    pub console: Option<String>,
}

impl Relay {
    pub fn start(dir: &Path) -> Relay {
        Relay::start_on(dir, "127.0.0.1:0".parse().unwrap())
    }

    /// Start (or restart, reusing the state directory) on a given address.
    pub fn start_on(dir: &Path, listen: SocketAddr) -> Relay {
        Relay::start_with(dir, listen, &[])
    }

    /// Start with extra command-line arguments (e.g. an external MQTT broker).
    pub fn start_with(dir: &Path, listen: SocketAddr, extra: &[String]) -> Relay {
        Relay::start_full(dir, listen, extra, &[])
    }

    /// Start with extra command-line arguments and environment variables.
    pub fn start_full(
        dir: &Path,
        listen: SocketAddr,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Relay {
        Relay::start_under(dir, listen, extra, env, None)
    }

    /// Start with the open-file limit (soft and hard) set to `open_files`, as under a unit's
    /// `LimitNOFILE=` (with util-linux's prlimit).
    pub fn start_with_open_files(dir: &Path, open_files: u32) -> Relay {
        Relay::start_under(
            dir,
            "127.0.0.1:0".parse().unwrap(),
            &[],
            &[],
            Some(open_files),
        )
    }

    fn start_under(
        dir: &Path,
        listen: SocketAddr,
        extra: &[String],
        env: &[(&str, &str)],
        open_files: Option<u32>,
    ) -> Relay {
        let state = dir.join("relay-state");
        std::fs::create_dir_all(dir).unwrap();
        let env_file = state.join("client.env");
        let _ = std::fs::remove_file(&env_file);
        let mut cmd = match open_files {
            None => Command::new(bin("culvert-relay")),
            Some(n) => prlimit(n, &bin("culvert-relay")),
        };
        let proc = Proc::spawn(
            "culvert-relay",
            cmd.args(["--dev", "--state-dir"])
                .arg(&state)
                .args(["--listen", &listen.to_string()])
                .args(extra)
                .env("RUST_LOG", "info,culvert_relay=debug")
                .envs(env.iter().copied())
                .stdout(Stdio::null()),
            dir,
        );
        let env = wait_for("the relay to write client.env", || {
            let t = std::fs::read_to_string(&env_file).ok()?;
            let vars: HashMap<String, String> = t
                .lines()
                .filter_map(|l| l.strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            (vars.len() >= 3).then_some(vars)
        });
        let addr: SocketAddr = env["CULVERT_RELAY"].parse().unwrap();
        wait_for("the relay to accept connections", || {
            TcpStream::connect(addr).ok()
        });
        Relay {
            proc,
            dir: dir.to_owned(),
            addr,
            api_key: env["CULVERT_API_KEY"].clone(),
            ca: PathBuf::from(&env["CULVERT_CA"]),
            mqtt: env.get("CULVERT_MQTT").map(|a| a.parse().unwrap()),
            console: env.get("CULVERT_CONSOLE").cloned(),
        }
    }

    /// Start with device notification through an external broker, as `culvert-relay` with the
    /// given password (and the broker's CA, if it is not the dev CA).
    pub fn start_with_broker(
        dir: &Path,
        broker: SocketAddr,
        password: &str,
        ca: Option<&Path>,
    ) -> Relay {
        let pw = dir.join("relay-mqtt-password");
        std::fs::write(&pw, password).unwrap();
        let mut args = vec![
            "--mqtt-broker".to_owned(),
            format!("mqtts://{broker}"),
            "--mqtt-username".into(),
            "culvert-relay".into(),
            "--mqtt-password-file".into(),
            pw.display().to_string(),
        ];
        if let Some(ca) = ca {
            args.extend(["--mqtt-ca".into(), ca.display().to_string()]);
        }
        let relay = Relay::start_with(dir, "127.0.0.1:0".parse().unwrap(), &args);
        assert!(
            relay.mqtt.is_none(),
            "no embedded broker with an external one"
        );
        relay
    }

    /// Register a device on the embedded broker; returns its password.
    pub fn add_device(&self, thing: &str) -> String {
        let v = self.api(&["device", "add", "--thing", thing]);
        v["password"].as_str().unwrap().to_owned()
    }

    /// Start `culvertd` waiting for MQTT notifications (no token).
    pub fn mqtt_gateway(&self, dir: &Path, rules: &Path) -> Proc {
        self.mqtt_gateway_with(dir, rules, "culvertd-mqtt", None)
    }

    /// [`Relay::mqtt_gateway`] with its own log name, optionally under an open-file limit.
    pub fn mqtt_gateway_with(
        &self,
        dir: &Path,
        rules: &Path,
        name: &str,
        open_files: Option<u32>,
    ) -> Proc {
        let mut cmd = match open_files {
            None => Command::new(bin("culvertd")),
            Some(n) => prlimit(n, &bin("culvertd")),
        };
        Proc::spawn(
            name,
            cmd.arg("--config")
                .arg(rules)
                .args(["--relay", &self.addr.to_string()])
                .arg("--ca")
                .arg(&self.ca)
                .env_remove("CULVERT_DESTINATION_TOKEN")
                .env("RUST_LOG", "info,culvertd=debug")
                .stdout(Stdio::null()),
            dir,
        )
    }

    /// A `culvert` command with this relay's settings in its environment.
    pub fn culvert(&self) -> Command {
        let mut c = Command::new(bin("culvert"));
        c.env("CULVERT_RELAY", self.addr.to_string())
            .env("CULVERT_API_KEY", &self.api_key)
            .env("CULVERT_CA", &self.ca)
            // Never what a `culvert login` on this machine saved.
            .env(
                "CULVERT_CREDENTIALS",
                self.dir.join("no-saved-credentials.json"),
            )
            .env_remove("RUST_LOG");
        c
    }

    /// Run `culvert --json <args>` and parse its output; panics on failure.
    pub fn api(&self, args: &[&str]) -> Value {
        let out = self.culvert().arg("--json").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "culvert {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("culvert --json prints JSON")
    }

    pub fn open_tunnel(&self, thing: &str, services: &[&str]) -> Tunnel {
        let svc = services.join(",");
        let v = self.api(&["tunnel", "open", "--thing", thing, "--service", &svc]);
        Tunnel {
            id: v["tunnelId"].as_str().unwrap().to_owned(),
            source: v["sourceAccessToken"].as_str().unwrap().to_owned(),
            destination: v["destinationAccessToken"].as_str().unwrap().to_owned(),
        }
    }

    pub fn describe(&self, id: &str) -> Value {
        self.api(&["tunnel", "describe", id])
    }

    /// Wait until a side of a tunnel shows `status` (CONNECTED / DISCONNECTED).
    pub fn wait_side(&self, id: &str, side: &str, status: &str) {
        wait_for(&format!("tunnel {id} {side} to be {status}"), || {
            let v = self.describe(id);
            (v[format!("{side}ConnectionState")]["status"] == status).then_some(())
        });
    }

    /// Start `culvertd` for a tunnel with a rules file.
    pub fn gateway(&self, dir: &Path, rules: &Path, token: &str) -> Proc {
        self.gateway_with_env(dir, rules, token, &[])
    }

    /// Start `culvertd` for a tunnel with a rules file and extra environment variables.
    pub fn gateway_with_env(
        &self,
        dir: &Path,
        rules: &Path,
        token: &str,
        env: &[(&str, &str)],
    ) -> Proc {
        Proc::spawn(
            "culvertd",
            Command::new(bin("culvertd"))
                .arg("--config")
                .arg(rules)
                .args(["--relay", &self.addr.to_string()])
                .arg("--ca")
                .arg(&self.ca)
                .env("CULVERT_DESTINATION_TOKEN", token)
                .env("RUST_LOG", "info,culvertd=debug")
                .envs(env.iter().copied())
                .stdout(Stdio::null()),
            dir,
        )
    }

    /// Start `culvert connect` with `services` mapped to OS-chosen ports; returns the ports.
    pub fn proxy(
        &self,
        dir: &Path,
        token: &str,
        services: &[&str],
    ) -> (Proc, HashMap<String, u16>) {
        self.proxy_with(dir, token, services, &[])
    }

    /// [`Relay::proxy`] with extra arguments for `culvert connect` (e.g. `--format V2`). A
    /// service given as a whole mapping (`DNS=udp:0`) is passed as it is.
    pub fn proxy_with(
        &self,
        dir: &Path,
        token: &str,
        services: &[&str],
        extra: &[&str],
    ) -> (Proc, HashMap<String, u16>) {
        let map: Vec<String> = services
            .iter()
            .map(|s| match s.contains('=') {
                true => s.to_string(),
                false => format!("{s}=0"),
            })
            .collect();
        let mut cmd = self.culvert();
        cmd.args(["connect", "-s", &map.join(",")])
            .args(extra)
            .env("CULVERT_ACCESS_TOKEN", token)
            .env("RUST_LOG", "info,culvert_cli=debug")
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn("culvert-connect", &mut cmd, dir);
        let stdout = proc.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut ports = HashMap::new();
        while ports.len() < services.len() {
            let line = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
                panic!(
                    "culvert connect did not report its ports; log:\n{}",
                    proc.log_text()
                )
            });
            // "culvert: service SSH listening on 127.0.0.1:PORT"
            if let Some(rest) = line.strip_prefix("culvert: service ") {
                let mut it = rest.split_whitespace();
                let name = it.next().unwrap().to_owned();
                let addr: SocketAddr = it.last().unwrap().parse().unwrap();
                ports.insert(name, addr.port());
            }
        }
        (proc, ports)
    }
}

pub struct Tunnel {
    pub id: String,
    pub source: String,
    pub destination: String,
}

/// The ACL of the test gateways: loopback, where the tests' LAN hosts live.
pub const LOOPBACK_ACL: &str = "[acl]\nallow = [\"127.0.0.0/8\", \"::1\"]\n\n";

/// Write a culvertd rules file mapping services to targets (loopback allowed).
pub fn rules(dir: &Path, services: &[(&str, String)]) -> PathBuf {
    let mut t = LOOPBACK_ACL.to_owned();
    for (name, target) in services {
        t.push_str(&format!("[services.{name}]\ntarget = \"{target}\"\n\n"));
    }
    let p = dir.join("culvertd.toml");
    std::fs::write(&p, t).unwrap();
    p
}

/// Write a culvertd rules file with an `[mqtt]` section.
pub fn mqtt_rules(
    dir: &Path,
    broker: SocketAddr,
    thing: &str,
    password: &str,
    services: &[(&str, String)],
) -> PathBuf {
    let pw = dir.join(format!("{thing}.password"));
    std::fs::write(&pw, password).unwrap();
    let mut t = format!(
        "{LOOPBACK_ACL}[mqtt]\nbroker = \"mqtts://{broker}\"\nthing_name = \"{thing}\"\npassword_file = \"{}\"\n\n",
        pw.display()
    );
    for (name, target) in services {
        t.push_str(&format!("[services.{name}]\ntarget = \"{target}\"\n\n"));
    }
    let p = dir.join(format!("culvertd-{thing}.toml"));
    std::fs::write(&p, t).unwrap();
    p
}

// The AWS localproxy v3.3.1, the interop peer: a test peer, not part of the project. It is taken
// from `../shared/peers/aws-localproxy/localproxy` (relative to the workspace) or from
// `CULVERT_LOCALPROXY`; without it the tests that need it fail and say so.

/// The localproxy binary; fails the test with how to provide it.
pub fn localproxy() -> PathBuf {
    let path = std::env::var_os("CULVERT_LOCALPROXY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/peers/aws-localproxy/localproxy"));
    assert!(
        path.is_file(),
        "the AWS localproxy v3.3.1 is needed for the interop suite and is not at {}: \
         set CULVERT_LOCALPROXY=/path/to/localproxy (build it from \
         aws-samples/aws-iot-securetunneling-localproxy v3.3.1, see \
         ../shared/peers/aws-localproxy/README.md)",
        path.display()
    );
    path
}

/// The localproxy wants an OpenSSL hashed CA directory (made in `dir` from the relay's CA).
pub fn localproxy_ca_dir(relay: &Relay, dir: &Path) -> PathBuf {
    let d = dir.join("cadir");
    if !d.exists() {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(&relay.ca, d.join("ca.pem")).unwrap();
        let openssl = require_tool("openssl", "openssl");
        run_ok(
            "openssl rehash",
            Command::new(openssl).arg("rehash").arg(&d),
        );
    }
    d
}

/// A running localproxy (`args` are its mode and mappings), optionally with a client token.
pub fn spawn_localproxy(
    relay: &Relay,
    dir: &Path,
    token: &str,
    client_token: Option<&str>,
    args: &[&str],
    name: &str,
) -> Proc {
    let cadir = localproxy_ca_dir(relay, dir);
    let mut cmd = Command::new(localproxy());
    cmd.arg("-e")
        .arg(relay.addr.to_string())
        .arg("-c")
        .arg(&cadir)
        .args(args)
        .env("AWSIOT_TUNNEL_ACCESS_TOKEN", token);
    if let Some(ct) = client_token {
        cmd.env("AWSIOT_TUNNEL_CLIENT_TOKEN", ct);
    }
    Proc::spawn_logging_stdout(name, &mut cmd, dir)
}

/// Wait until a process's log contains `text`.
pub fn wait_log(p: &Proc, text: &str) {
    wait_log_count(p, text, 1);
}

/// Wait until a process's log contains `text` at least `n` times.
pub fn wait_log_count(p: &Proc, text: &str, n: usize) {
    wait_for(&format!("{} to log {text:?} {n} time(s)", p.name), || {
        (p.log_text().matches(text).count() >= n).then_some(())
    });
}

/// A TCP echo server on 127.0.0.1 (threads; lives as long as the test process).
pub fn echo_server() -> SocketAddr {
    transform_server(|b| b.to_vec())
}

/// An echo server that counts the connections it accepted.
pub fn counting_echo_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let addr = serve(|b| b.to_vec(), Some(count.clone()));
    (addr, count)
}

/// A TCP server that answers every read with `f(bytes)`.
pub fn transform_server(f: fn(&[u8]) -> Vec<u8>) -> SocketAddr {
    serve(f, None)
}

fn serve(
    f: fn(&[u8]) -> Vec<u8>,
    count: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            if let Some(c) = &count {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&f(&buf[..n])).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A target on `ip` that reads each connection to EOF, then answers "<bytes> <sha256>\n" and
/// closes: what arrived before the client's FIN, checked in one line.
pub fn digest_at_eof(ip: std::net::IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).is_ok() {
                    let _ = writeln!(s, "{} {}", got.len(), sha256(&got));
                }
            });
        }
    });
    addr
}

/// Connect to a local port (the proxy's), retrying while the tunnel comes up.
pub fn connect_local(port: u16) -> TcpStream {
    let s = wait_for(&format!("a connection to 127.0.0.1:{port}"), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Send `data` and read back exactly `data.len()` bytes, writing from a second thread so large
/// payloads cannot deadlock on socket buffers.
pub fn round_trip(mut s: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let n = data.len();
    let writer = std::thread::spawn(move || w.write_all(&data));
    let mut got = vec![0u8; n];
    s.read_exact(&mut got).expect("reading the echo");
    writer.join().unwrap().unwrap();
    got
}

/// One echo exchange through the tunnel, retried until the whole path is up (the first
/// connections may be reset while the gateway is still connecting).
pub fn echo_works(port: u16, msg: &[u8]) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0u8; msg.len()];
            if s.write_all(msg).is_ok() && s.read_exact(&mut got).is_ok() && got == msg {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// One typed line and its echo, on a connection to an echo target that stays open.
pub fn type_line(s: &mut TcpStream, line: &str) {
    s.write_all(line.as_bytes()).unwrap();
    let mut got = vec![0u8; line.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("the echo of {line:?} did not come back: {e}"));
    assert_eq!(String::from_utf8_lossy(&got), line);
}

/// An interactive ssh session to a far side that answers every line typed with
/// "robot says <line>".
pub struct SshSession {
    child: std::process::Child,
    typed: std::process::ChildStdin,
    answers: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl SshSession {
    /// `ssh` with its options and destination; the far side's command is added here.
    pub fn start(ssh: &mut Command) -> SshSession {
        let mut child = ssh
            .arg("while read l; do echo \"robot says $l\"; done")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let typed = child.stdin.take().unwrap();
        let answers = BufReader::new(child.stdout.take().unwrap()).lines();
        SshSession {
            child,
            typed,
            answers,
        }
    }

    /// Type a line (its answer is read by [`SshSession::answer`]).
    pub fn type_line(&mut self, line: &str) {
        writeln!(self.typed, "{line}").unwrap();
    }

    /// Read the answer to `line`, typed earlier.
    pub fn answer(&mut self, line: &str) {
        let got = self.answers.next().expect("the session ended").unwrap();
        assert_eq!(got, format!("robot says {line}"));
    }

    /// Type a line and read its answer.
    pub fn exchange(&mut self, line: &str) {
        self.type_line(line);
        self.answer(line);
    }

    pub fn end(self) {
        let SshSession {
            mut child, typed, ..
        } = self;
        drop(typed);
        let _ = child.wait();
    }
}

/// A Python venv under target/NAME holding the packages pinned in `requirements` (a path in
/// the workspace), made once per test process, and again only when the pins change. Needs
/// python3 with venv and pip (Debian: python3-venv) and the PyPI registry on first use.
pub fn python_venv(name: &str, requirements: &str) -> PathBuf {
    static MADE: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, v)) = made.iter().find(|(n, _)| n == name) {
        return v.clone();
    }
    let pins = workspace().join(requirements);
    let wanted = std::fs::read_to_string(&pins).unwrap();
    let venv = workspace().join("target").join(name);
    let stamp = venv.join("culvert-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let python = require_tool("python3", "python3 and python3-venv");
        let _ = std::fs::remove_dir_all(&venv);
        run_ok(
            "python3 -m venv (Debian: apt-get install python3-venv)",
            Command::new(python).args(["-m", "venv"]).arg(&venv),
        );
        run_ok(
            &format!("pip install -r {requirements} (the PyPI registry must answer)"),
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&pins),
        );
        std::fs::write(&stamp, &wanted).unwrap();
    }
    made.push((name.to_owned(), venv.clone()));
    venv
}

/// Run a test's Python client (`python SCRIPT ARGS`, from the workspace) that prints one JSON
/// object per line; its lines, parsed. Fails with the client's stderr if it fails.
pub fn python_json_lines(python: &Path, script: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(python)
        .arg(workspace().join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script} failed: {}", stderr_of(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{script}: {l:?}: {e}")))
        .collect()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

/// `mib` MiB for a large transfer: one random MiB, numbered in each copy (so a MiB out of
/// place shows), since generating that much at random takes a debug build longer than the
/// copy.
pub fn numbered_mibs(mib: u64) -> Vec<u8> {
    let block = random_bytes(1024 * 1024);
    (0..mib)
        .flat_map(|i| {
            let mut b = block.clone();
            b[..8].copy_from_slice(&i.to_be_bytes());
            b
        })
        .collect()
}

pub fn sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Raw data-plane access for tests that must send exactly what they choose.
pub mod raw {
    use super::*;
    use culvert_protocol::Mode;
    use culvert_protocol::client::{self, ConnectError, ConnectOptions, Endpoint, RelayStream};
    pub use culvert_protocol::ext::Extensions;
    use futures_util::{SinkExt, StreamExt};
    pub use tokio_tungstenite::tungstenite::Message as Ws;

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Open a data-plane WebSocket to `relay` with exactly these credentials, as a plain AWS
    /// client (no culvert extension offered).
    pub async fn connect(
        relay: &Relay,
        token: &str,
        mode: Mode,
        client_token: Option<&str>,
    ) -> Result<RelayStream, ConnectError> {
        connect_offering(relay, token, mode, client_token, Extensions::NONE)
            .await
            .map(|c| c.ws)
    }

    /// Open a data-plane WebSocket offering culvert's `extensions` in the handshake; the
    /// result says which the relay accepted.
    pub async fn connect_offering(
        relay: &Relay,
        token: &str,
        mode: Mode,
        client_token: Option<&str>,
        extensions: Extensions,
    ) -> Result<client::Connected, ConnectError> {
        let opts = ConnectOptions {
            endpoint: Endpoint::parse(&relay.addr.to_string()).unwrap(),
            mode,
            access_token: token.into(),
            client_token: client_token.map(Into::into),
            tls: tls_for(&relay.ca),
            extensions,
            proxy: None,
        };
        client::connect(&opts).await
    }

    /// A client TLS configuration trusting `ca`, made once per CA file (making one reads the
    /// system's CA store, which tests that connect often would otherwise spend their time on).
    pub fn tls_for(ca: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};
        static MADE: Mutex<Option<HashMap<std::path::PathBuf, Arc<rustls::ClientConfig>>>> =
            Mutex::new(None);
        let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
        made.get_or_insert_with(HashMap::new)
            .entry(ca.to_owned())
            .or_insert_with(|| client::tls_config(Some(ca)).unwrap())
            .clone()
    }

    /// The status and message of a refused handshake.
    pub async fn refused(
        relay: &Relay,
        token: &str,
        mode: Mode,
        client_token: Option<&str>,
    ) -> (u16, String) {
        match connect(relay, token, mode, client_token).await {
            Err(ConnectError::Refused { status, message }) => (status, message),
            Err(e) => panic!("expected a 4xx refusal, got {e}"),
            Ok(_) => panic!("expected a refusal, but the relay accepted the connection"),
        }
    }

    /// Read until the relay closes the socket; returns the close code and reason.
    pub async fn closed_with(ws: &mut RelayStream) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, ws.next())
                .await
                .expect("the relay did not close the connection");
            match next {
                Some(Ok(Ws::Close(Some(f)))) => return (f.code.into(), f.reason.to_string()),
                Some(Ok(Ws::Close(None))) | None => return (0, String::new()),
                Some(Err(e)) => return (0, e.to_string()),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Send one WebSocket message (errors ignored: the relay may already have closed).
    pub async fn send(ws: &mut RelayStream, m: Ws) {
        let _ = ws.send(m).await;
    }
}

/// A real mosquitto broker on 127.0.0.1 with TLS, a password file and an ACL file.
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    config: PathBuf,
    dir: PathBuf,
}

impl Mosquitto {
    /// `users`: (name, password); `acl`: mosquitto ACL file text; TLS from a dev relay's state.
    pub fn start(dir: &Path, tls_dir: &Path, users: &[(&str, &str)], acl: &str) -> Mosquitto {
        Mosquitto::start_with(dir, tls_dir, users, acl, None)
    }

    /// As [`Mosquitto::start`], plus a second listener on `cert_port` that requires a client
    /// certificate signed by `tls_dir/ca.pem` and takes its CN as the username.
    pub fn start_with(
        dir: &Path,
        tls_dir: &Path,
        users: &[(&str, &str)],
        acl: &str,
        cert_port: Option<u16>,
    ) -> Mosquitto {
        let bin = require_tool("/usr/sbin/mosquitto", "mosquitto");
        let passwd_tool = require_tool("mosquitto_passwd", "mosquitto");
        let d = dir.join("mosquitto");
        std::fs::create_dir_all(&d).unwrap();
        let passwd = d.join("passwd");
        let _ = std::fs::remove_file(&passwd);
        for (i, (u, p)) in users.iter().enumerate() {
            let mut c = Command::new(&passwd_tool);
            if i == 0 {
                c.arg("-c");
            }
            let st = c.arg("-b").arg(&passwd).args([u, p]).status().unwrap();
            assert!(st.success(), "mosquitto_passwd failed");
        }
        std::fs::write(d.join("acl"), acl).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = d.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "user root\nper_listener_settings false\nallow_anonymous false\npersistence false\n\
                 password_file {}\nacl_file {}\nlistener {port} 127.0.0.1\nuse_username_as_clientid true\ncafile {}\ncertfile {}\nkeyfile {}\n",
                passwd.display(),
                d.join("acl").display(),
                tls_dir.join("ca.pem").display(),
                tls_dir.join("server.pem").display(),
                tls_dir.join("server-key.pem").display(),
            ),
        )
        .unwrap();
        if let Some(p) = cert_port {
            let mut c = std::fs::OpenOptions::new()
                .append(true)
                .open(&config)
                .unwrap();
            writeln!(
                c,
                "listener {p} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nuse_username_as_clientid true",
                tls_dir.join("ca.pem").display(),
                tls_dir.join("server.pem").display(),
                tls_dir.join("server-key.pem").display(),
            )
            .unwrap();
        }
        let mut m = Mosquitto {
            proc: Mosquitto::spawn(&bin, &config, dir),
            port,
            config,
            dir: dir.to_owned(),
        };
        m.wait_up();
        m
    }

    fn spawn(bin: &Path, config: &Path, dir: &Path) -> Proc {
        Proc::spawn(
            "mosquitto",
            Command::new(bin)
                .arg("-c")
                .arg(config)
                .stdout(Stdio::null()),
            dir,
        )
    }

    fn wait_up(&mut self) {
        let port = self.port;
        let up = wait_for("mosquitto to listen or exit", || {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                Some(true)
            } else if !self.proc.is_running() {
                Some(false)
            } else {
                None
            }
        });
        assert!(up, "mosquitto did not start:\n{}", self.proc.log_text());
    }

    /// Kill the broker and start it again on the same port.
    pub fn restart(&mut self) {
        self.proc.kill();
        let bin = require_tool("/usr/sbin/mosquitto", "mosquitto");
        self.proc = Mosquitto::spawn(&bin, &self.config, &self.dir);
        self.wait_up();
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// Generate a dev relay's PKI in `dir/relay-state` without starting it (for brokers that need
/// the certificate before the relay runs).
pub fn dev_pki(dir: &Path) -> PathBuf {
    let state = dir.join("relay-state");
    let out = Command::new(bin("culvert-relay"))
        .args(["--dev", "--check-config", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    state
}

/// The return codes of the next SUBACK on an MQTT event loop.
pub async fn next_suback(ev: &mut rumqttc::EventLoop) -> Vec<rumqttc::SubscribeReasonCode> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) =
                ev.poll().await.expect("broker connection")
            {
                return a.return_codes;
            }
        }
    })
    .await
    .expect("a SUBACK from the broker")
}

/// Publish one message as `user` (QoS 1) and wait for the broker's acknowledgement.
pub fn mqtt_publish(
    broker: SocketAddr,
    ca: &Path,
    user: &str,
    pass: &str,
    topic: &str,
    payload: Vec<u8>,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
    let tls = culvert_protocol::client::tls_config(Some(ca)).unwrap();
    raw::runtime().block_on(async {
        let mut o = MqttOptions::new(
            format!("{user}-pub"),
            broker.ip().to_string(),
            broker.port(),
        );
        o.set_credentials(user, pass)
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut ev) = AsyncClient::new(o, 10);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::PubAck(_)) =
                    ev.poll().await.expect("broker connection")
                {
                    return;
                }
            }
        })
        .await
        .expect("the broker acknowledged the publish");
    });
}

/// A private CA in `dir` with a server certificate for 127.0.0.1 (`ca.pem`, `server.pem`,
/// `server-key.pem`) and a client certificate whose CN is `client_cn` (`client.pem`,
/// `client-key.pem`).
pub fn test_pki(dir: &Path, client_cn: &str) -> PathBuf {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let d = dir.join("pki");
    std::fs::create_dir_all(&d).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "culvert test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "broker",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(vec![], client_cn, ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(d.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(d.join("server.pem"), server).unwrap();
    std::fs::write(d.join("server-key.pem"), server_key).unwrap();
    std::fs::write(d.join("client.pem"), client).unwrap();
    std::fs::write(d.join("client-key.pem"), client_key).unwrap();
    d
}

/// A TCP server on `ip` (a stand-in LAN host: 127.0.0.2, 127.0.0.3 …) that greets every
/// connection with `tag` and a newline, then echoes.
pub fn tagged_server(ip: &str, tag: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
    let addr = l.local_addr().unwrap();
    let tag = format!("{tag}\n");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tag = tag.clone();
            std::thread::spawn(move || {
                if s.write_all(tag.as_bytes()).is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Read one line (up to and without the newline), or None at EOF / reset / timeout.
pub fn read_line(s: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => return Some(String::from_utf8_lossy(&line).into_owned()),
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
}

/// A minimal HTTP/1.1 server on `ip` standing in for a device web UI: answers every request
/// with 200, a body of `name`, a newline and the request head it received.
pub fn http_server(ip: &str, name: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
    let addr = l.local_addr().unwrap();
    let name = name.to_owned();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let name = name.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let body = format!("{name}\n{head}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A server on `ip` that accepts connections and never answers (for response timeouts).
pub fn silent_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

/// A port on `ip` where nothing listens (bound, then released).
pub fn closed_port(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// A WebSocket echo server on `ip`.
pub fn ws_echo_server(ip: &str) -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    addr
}

/// The records of a culvertd audit file (none if it does not exist yet).
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// Wait for an audit record matching `pred`; returns it.
pub fn wait_audit(
    path: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(&format!("an audit record: {what}"), || {
        audit_records(path).into_iter().find(|r| pred(r))
    })
}

/// Connect to a local port and expect the tunnel to end the connection without a byte.
pub fn expect_refused(port: u16) {
    let mut s = connect_local(port);
    let _ = s.write_all(b"hello?\n");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e)
            if e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::TimedOut => {}
        Ok(n) => panic!(
            "expected the connection on port {port} to be refused, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!(
            "expected the connection on port {port} to be refused; still open after {WAIT:?} ({e})"
        ),
    }
}

/// Run a command that must succeed; its stdout. Fails the test with both outputs otherwise.
pub fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// lintian on a package: no errors, and every warning one packaging/README.md justifies.
pub fn assert_lintian_clean(deb: &Path) {
    let lintian = require_tool("lintian", "lintian");
    let readme = std::fs::read_to_string(workspace().join("packaging/README.md")).unwrap();
    let out = Command::new(&lintian).arg(deb).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in text.lines() {
        assert!(
            !line.starts_with("E: "),
            "lintian error on {}: {line}",
            deb.display()
        );
        if line.starts_with("W: ") {
            let tag = line
                .split(": ")
                .nth(2)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or(line);
            assert!(
                readme.contains(&format!("`{tag}`")),
                "lintian warning {tag} on {} is not justified in packaging/README.md",
                deb.display()
            );
        }
    }
}
