//! culvert-relay as a cluster: three real relay nodes on one PostgreSQL server
//! (`culvert_devkit::pg`), notifying devices through mosquitto, behind HAProxy in TCP mode,
//! with node certificates made by the commands in docs/operations.md.
//!
//! - a tunnel whose source and destination are forced onto different nodes carries ssh and a
//!   100 MB checked transfer, and `describe` says which node holds it;
//! - its source token, replayed to a third node, is refused;
//! - a close through a third node disconnects both peers, with the reason, at once;
//! - AWS's localproxy as source and destination on different nodes;
//! - a device notified through the shared broker connects through HAProxy; the node holding
//!   its tunnel is SIGKILLed; the peers reconnect through HAProxy and a survivor takes the
//!   tunnel over;
//! - a node drained with SIGTERM: its peers move to the others and the tunnel works again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use culvert_e2e::raw;
use culvert_e2e::*;
use culvert_protocol::Mode;

const NODES: [&str; 3] = ["relay-a", "relay-b", "relay-c"];

/// The cluster CA and node certificates, made by the commands in docs/operations.md.
fn cluster_pki(dir: &Path) -> PathBuf {
    let d = dir.join("cluster-pki");
    culvert_devkit::cluster_pki(&d, &NODES).unwrap_or_else(|e| panic!("{e}"));
    d
}

struct Node {
    name: &'static str,
    config: PathBuf,
    relay: Relay,
    /// Stopped (killed or drained), until restarted.
    stopped: bool,
    /// Starts so far (each start logs to a file of its own).
    starts: u32,
}

struct Cluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// HAProxy in front of the nodes: the address every client is given.
    front: Relay,
    pki: PathBuf,
}

impl Cluster {
    fn start(dir: &Path, broker: std::net::SocketAddr, pki: &Path) -> Cluster {
        let url = culvert_devkit::pg::database();
        let cluster_pki = cluster_pki(dir);
        let api_key = "cluster-test-api-key-0123456789";
        std::fs::write(dir.join("api-key"), api_key).unwrap();
        let mut nodes = Vec::new();
        let mut servers = String::new();
        for name in NODES {
            let (port, link) = (free_port(), free_port());
            let state = dir.join(name);
            std::fs::create_dir_all(&state).unwrap();
            std::fs::write(dir.join(format!("{name}-mqtt-password")), "relay-secret").unwrap();
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"listen = "127.0.0.1:{port}"
state_dir = "{state}"
api_key_file = "{dir}/api-key"
store = "{url}"

[aws]
key_file = "{dir}/aws-signing.key"

[tls]
cert = "{pki}/server.pem"
key = "{pki}/server-key.pem"

[mqtt]
broker = "mqtts://{broker}"
username = "{name}"
password_file = "{dir}/{name}-mqtt-password"
ca = "{pki}/ca.pem"

[cluster]
node = "{name}"
listen = "127.0.0.1:{link}"
ca = "{cpki}/ca.pem"
cert = "{cpki}/{name}.pem"
key = "{cpki}/{name}-key.pem"
"#,
                    state = state.display(),
                    dir = dir.display(),
                    pki = pki.display(),
                    cpki = cluster_pki.display(),
                ),
            )
            .unwrap();
            let relay = Cluster::spawn(dir, name, &config, api_key, pki);
            servers += &format!(
                "  server {name} {} check inter 500ms fall 1 rise 1\n",
                relay.addr
            );
            nodes.push(Node {
                name,
                config,
                relay,
                stopped: false,
                starts: 1,
            });
        }
        let front = haproxy(dir, &servers, api_key, pki);
        Cluster {
            dir: dir.to_owned(),
            nodes,
            front,
            pki: pki.to_owned(),
        }
    }

    fn spawn(dir: &Path, name: &str, config: &Path, api_key: &str, pki: &Path) -> Relay {
        let text = std::fs::read_to_string(config).unwrap();
        let addr: std::net::SocketAddr = text
            .lines()
            .next()
            .and_then(|l| l.split('"').nth(1))
            .unwrap()
            .parse()
            .unwrap();
        let proc = Proc::spawn(
            name,
            Command::new(bin("culvert-relay"))
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "info,culvert_relay=debug")
                .stdout(Stdio::null()),
            dir,
        );
        endpoint(name, proc, dir, addr, api_key, pki)
    }

    fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.stopped)
    }

    fn node(&self, name: &str) -> &Relay {
        &self
            .running()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("{name} is not running"))
            .relay
    }

    fn index(name: &str) -> usize {
        NODES.iter().position(|n| *n == name).unwrap()
    }

    /// Stop a node: SIGKILL (it dies) or SIGTERM (it drains); returns its log.
    fn stop(&mut self, name: &str, signal: &str) -> String {
        let n = &mut self.nodes[Cluster::index(name)];
        n.relay.proc.signal(signal);
        n.relay.proc.wait_exit();
        n.stopped = true;
        n.relay.proc.log_text()
    }

    /// Start a stopped node again, as it was configured.
    fn restart(&mut self, name: &str) {
        let i = Cluster::index(name);
        assert!(self.nodes[i].stopped, "{name} is running");
        let config = self.nodes[i].config.clone();
        self.nodes[i].starts += 1;
        let log_name = format!("{name}.{}", self.nodes[i].starts);
        let relay = Cluster::spawn(
            &self.dir,
            &log_name,
            &config,
            &self.front.api_key,
            &self.pki,
        );
        self.nodes[i].relay = relay;
        self.nodes[i].stopped = false;
    }

    /// Any running node other than `but`.
    fn other(&self, but: &str) -> &Relay {
        &self
            .running()
            .find(|n| n.name != but)
            .expect("another node runs")
            .relay
    }
}

/// HAProxy (Debian's) in TCP mode in front of `servers`, as a [`Relay`] clients can use.
fn haproxy(dir: &Path, servers: &str, api_key: &str, pki: &Path) -> Relay {
    let bin = require_tool("haproxy", "haproxy");
    let port = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n\n\
             frontend relays\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\n\
             backend nodes\n  balance roundrobin\n  option redispatch\n  retries 3\n{servers}"
        ),
    )
    .unwrap();
    let check = Command::new(&bin)
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "haproxy -c: {}", stderr_of(&check));
    let proc = Proc::spawn(
        "haproxy",
        Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null()),
        dir,
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    endpoint("haproxy", proc, dir, addr, api_key, pki)
}

/// `proc` serving the relay API and data plane at `addr` (a node, or HAProxy in front of
/// them), once it accepts connections, as a [`Relay`] clients can use.
fn endpoint(
    name: &str,
    proc: Proc,
    dir: &Path,
    addr: std::net::SocketAddr,
    api_key: &str,
    pki: &Path,
) -> Relay {
    wait_for(&format!("{name} to accept connections"), || {
        std::net::TcpStream::connect(addr).ok()
    });
    Relay {
        proc,
        dir: dir.to_owned(),
        addr,
        api_key: api_key.to_owned(),
        ca: pki.join("ca.pem"),
        mqtt: None,
        console: None,
    }
}

const ACL: &str = "user relay-a\ntopic write $aws/things/+/tunnels/notify\n\n\
                   user relay-b\ntopic write $aws/things/+/tunnels/notify\n\n\
                   user relay-c\ntopic write $aws/things/+/tunnels/notify\n\n\
                   pattern read $aws/things/%u/tunnels/notify\n";

/// The node a side of a tunnel is attached on, as `describe` says.
fn holder(relay: &Relay, id: &str, side: &str) -> Option<String> {
    relay.describe(id)[format!("{side}ConnectionState")]["node"]
        .as_str()
        .map(str::to_owned)
}

/// ssh through `port`: run `cmd` with `input` on its stdin; its output.
fn ssh(sshd: &Sshd, port: u16, cmd: &str, input: &[u8]) -> String {
    let mut args = sshd.client_opts();
    args.extend([
        "-p".into(),
        port.to_string(),
        format!("{}@127.0.0.1", Sshd::user()),
        cmd.into(),
    ]);
    let mut child = Command::new(require_tool("ssh", "openssh-client"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "ssh {cmd} failed: {}",
        stderr_of(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn three_nodes_share_tunnels_forward_between_them_and_survive_losing_one() {
    let dir = scratch("cluster");
    let pki = test_pki(&dir, "unused");
    let sshd = Sshd::start(&dir);
    let echo = echo_server();
    let broker = Mosquitto::start(
        &dir,
        &pki,
        &[
            ("relay-a", "relay-secret"),
            ("relay-b", "relay-secret"),
            ("relay-c", "relay-secret"),
            ("cell-1", "cell-1-secret"),
        ],
        ACL,
    );
    let mut c = Cluster::start(&dir, broker.addr(), &pki);

    // 0. Node links take only certificates the cluster CA issued: none, or one from another
    //    CA, is refused in the TLS handshake; a node's own gets as far as HTTP.
    let link = |cert: Option<(&Path, &Path)>| {
        let text = std::fs::read_to_string(dir.join("relay-a.toml")).unwrap();
        let listen = text
            .split("[cluster]")
            .nth(1)
            .and_then(|s| s.lines().find(|l| l.starts_with("listen")))
            .and_then(|l| l.split('"').nth(1))
            .unwrap()
            .to_owned();
        let port = listen.rsplit(':').next().unwrap().to_owned();
        let mut cmd = Command::new(require_tool("curl", "curl"));
        cmd.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(dir.join("cluster-pki/ca.pem"))
        .args(["--resolve", &format!("relay-a:{port}:127.0.0.1")])
        .arg(format!("https://relay-a:{port}/node/v1/peer"));
        if let Some((cert, key)) = cert {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = cmd.output().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.success(),
        )
    };
    let cpki = dir.join("cluster-pki");
    assert_eq!(
        link(Some((
            &cpki.join("relay-c.pem"),
            &cpki.join("relay-c-key.pem")
        ))),
        ("400".to_owned(), true),
        "a node's certificate passes TLS"
    );
    for cert in [
        None,
        Some((&pki.join("client.pem"), &pki.join("client-key.pem"))),
    ] {
        let (code, ok) = link(cert.map(|(c, k)| (c.as_path(), k.as_path())));
        assert!(
            !ok && code == "000",
            "refused in TLS without a cluster certificate: {code}"
        );
    }

    // 1. Opened through node C; the destination connects to B, the source to A: A carries
    //    the source to B, which holds the tunnel.
    let t = c.node("relay-c").open_tunnel("cell-7", &["SSH", "ECHO"]);
    let rules = rules(
        &dir,
        &[
            ("SSH", format!("127.0.0.1:{}", sshd.port)),
            ("ECHO", echo.to_string()),
        ],
    );
    let gw = c.node("relay-b").gateway(&dir, &rules, &t.destination);
    c.front.wait_side(&t.id, "destination", "CONNECTED");
    let (px, ports) = c.node("relay-a").proxy(&dir, &t.source, &["SSH", "ECHO"]);
    c.front.wait_side(&t.id, "source", "CONNECTED");
    for side in ["source", "destination"] {
        assert_eq!(
            holder(c.node("relay-c"), &t.id, side).as_deref(),
            Some("relay-b"),
            "the {side} is attached on the node that holds the tunnel"
        );
    }
    assert_eq!(
        ssh(&sshd, ports["SSH"], "echo across-nodes", b""),
        "across-nodes\n"
    );
    let data = random_bytes(100 << 20);
    let digest = ssh(&sshd, ports["SSH"], "sha256sum", &data);
    assert_eq!(
        digest.split_whitespace().next(),
        Some(sha256(&data).as_str()),
        "100 MB through two nodes arrive intact"
    );
    drop(data);
    assert!(echo_works(ports["ECHO"], b"echo across nodes"));

    // 2. The source token, spent on A, is refused by C.
    let rt = raw::runtime();
    let (status, message) = rt.block_on(raw::refused(
        c.node("relay-c"),
        &t.source,
        Mode::Source,
        None,
    ));
    assert!((400..500).contains(&status), "{status} {message}");

    // 3. Closed through C: B (the holder) hears it and disconnects both peers, the source
    //    through A, with the reason.
    c.node("relay-c").api(&["tunnel", "close", &t.id]);
    wait_log(&px, "tunnel closed");
    wait_log(&gw, "tunnel closed");
    drop((px, gw));

    // 4. AWS's localproxy as destination on A and source on C.
    let t = c.node("relay-b").open_tunnel("lp", &["ECHO"]);
    let lp_dst = spawn_localproxy(
        c.node("relay-a"),
        &dir,
        &t.destination,
        None,
        &["-d", &format!("ECHO={echo}")],
        "localproxy-dst",
    );
    c.front.wait_side(&t.id, "destination", "CONNECTED");
    let port = free_port();
    let lp_src = spawn_localproxy(
        c.node("relay-c"),
        &dir,
        &t.source,
        None,
        &["-s", &format!("ECHO={port}")],
        "localproxy-src",
    );
    c.front.wait_side(&t.id, "source", "CONNECTED");
    assert_eq!(
        holder(c.node("relay-b"), &t.id, "source").as_deref(),
        Some("relay-a")
    );
    wait_for("the localproxy pair to carry an echo across nodes", || {
        echo_works(port, b"localproxy across nodes").then_some(())
    });
    drop((lp_src, lp_dst));

    // 5. A device notified through the shared broker, everything through HAProxy.
    let mqtt_rules = mqtt_rules(
        &dir,
        broker.addr(),
        "cell-1",
        "cell-1-secret",
        &[
            ("ECHO", echo.to_string()),
            ("SSH", format!("127.0.0.1:{}", sshd.port)),
        ],
    );
    let mgw = c.front.mqtt_gateway(&dir, &mqtt_rules);
    wait_log(&mgw, "subscribed");
    let t = c.node("relay-a").open_tunnel("cell-1", &["ECHO", "SSH"]);
    c.front.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = c.front.proxy(&dir, &t.source, &["ECHO", "SSH"]);
    c.front.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"through haproxy"));

    // The holder dies: its peers reconnect through HAProxy, and once its leases run out a
    // survivor takes the tunnel.
    let dead = holder(c.node("relay-a"), &t.id, "destination").expect("a holder");
    c.stop(&dead, "KILL");
    let survivor = c.other(&dead);
    wait_for("a survivor to hold the tunnel", || {
        let v = survivor.describe(&t.id);
        let node = |s: &str| {
            v[format!("{s}ConnectionState")]["node"]
                .as_str()
                .map(str::to_owned)
        };
        match (node("source"), node("destination")) {
            (Some(s), Some(d)) if s == d && s != dead => Some(()),
            _ => None,
        }
    });
    wait_for(
        "the tunnel to carry an echo again after the node died",
        || echo_works(ports["ECHO"], b"after a node died").then_some(()),
    );

    // 6. The new holder drains (SIGTERM): the peers move to the last node.
    let draining = holder(survivor, &t.id, "destination").unwrap();
    let log = c.stop(&draining, "TERM");
    assert!(log.contains("leaving the cluster"), "{log}");
    let last = c.other(&draining);
    wait_for("the last node to hold the tunnel", || {
        (holder(last, &t.id, "destination").as_deref() == Some(last_name(&c, &draining)))
            .then_some(())
    });
    wait_for("the tunnel to carry an echo after a drain", || {
        echo_works(ports["ECHO"], b"after a drain").then_some(())
    });

    // 7. A rolling restart of all three nodes, one by one, under an interactive ssh session:
    //    with culvert's resume extension at both ends, the session never notices.
    for n in NODES {
        if c.nodes[Cluster::index(n)].stopped {
            c.restart(n);
        }
    }
    let mut session = Session::start(&sshd, ports["SSH"]);
    session.line("before the rolling restart");
    for n in NODES {
        let log = c.stop(n, "TERM");
        assert!(log.contains("leaving the cluster"), "{log}");
        session.line(&format!("{n} is down"));
        c.restart(n);
        session.line(&format!("{n} is back"));
    }
    session.end();
    drop(mgw);

    // 8. A thousand tunnels spread over the nodes.
    fleet(&c.front, 1000);
}

/// Open `n` tunnels; connect each one's destination, then its source, through HAProxy (so
/// that they land on any node) as plain AWS clients; send a message through every tunnel;
/// then check that every node holds a share of them and each tunnel's two sides are on its
/// holder.
fn fleet(front: &Relay, n: usize) {
    use culvert_protocol::frame::{decode, encode_to_bytes};
    use culvert_protocol::{Message, MessageType};
    use futures_util::{SinkExt, StreamExt};
    culvert_appliance::limits::raise_open_file_limit();
    let t0 = std::time::Instant::now();
    let api = || {
        culvert_cli::api::ApiClient::new(
            &front.addr.to_string(),
            &front.api_key,
            Some(&front.ca),
            None,
        )
        .unwrap()
    };
    // Opened by 4 clients at once (each keeps its connection, so to one node).
    let tunnels: Vec<(String, String, String)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                scope.spawn(move || {
                    let api = api();
                    (0..n)
                        .filter(|i| i % 4 == w)
                        .map(|i| {
                            let v = api
                                .post(
                                    "/tunnels",
                                    &serde_json::json!({"thingName": format!("fleet-{i}"), "services": ["ECHO"]}),
                                )
                                .unwrap();
                            let s = |k: &str| v[k].as_str().unwrap().to_owned();
                            (
                                s("tunnelId"),
                                s("sourceAccessToken"),
                                s("destinationAccessToken"),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let api = api();
    println!("{n} tunnels opened in {:?}", t0.elapsed());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use culvert_protocol::client::{self, ConnectOptions, Endpoint};
        let tls = raw::tls_for(&front.ca);
        let connect = |token: String, mode: Mode| {
            let opts = ConnectOptions {
                endpoint: Endpoint::parse(&front.addr.to_string()).unwrap(),
                mode,
                access_token: token.into(),
                client_token: None,
                tls: tls.clone(),
                extensions: raw::Extensions::NONE,
                proxy: None,
            };
            async move {
                // A node that cannot reach a holder answers 503 (retry), as AWS's clients do.
                for _ in 0..20 {
                    match client::connect(&opts).await.map(|c| c.ws) {
                        Ok(ws) => return ws,
                        Err(e) if e.is_retryable() => {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await
                        }
                        Err(e) => panic!("{mode} refused: {e}"),
                    }
                }
                panic!("{mode} could not connect");
            }
        };
        let dsts: Vec<_> = futures_util::stream::iter(tunnels.iter())
            .map(|(_, _, d)| connect(d.clone(), Mode::Destination))
            .buffered(32)
            .collect()
            .await;
        println!("destinations connected at {:?}", t0.elapsed());
        let srcs: Vec<_> = futures_util::stream::iter(tunnels.iter())
            .map(|(_, s, _)| connect(s.clone(), Mode::Source))
            .buffered(32)
            .collect()
            .await;
        println!("sources connected at {:?}", t0.elapsed());
        let pairs = srcs.into_iter().zip(dsts).enumerate();
        let carried = futures_util::stream::iter(pairs)
            .map(|(i, (mut src, mut dst))| async move {
                let payload = format!("to fleet-{i}");
                for m in [
                    Message::stream_start(1, "ECHO", 1),
                    Message::data(1, "ECHO", 1, payload.clone().into_bytes().into()),
                ] {
                    src.send(raw::Ws::Binary(encode_to_bytes(&m).unwrap()))
                        .await
                        .unwrap();
                }
                // SERVICE_IDS first, then what the source sent.
                let got = tokio::time::timeout(std::time::Duration::from_secs(60), async {
                    loop {
                        let Some(Ok(raw::Ws::Binary(b))) = dst.next().await else {
                            panic!("fleet-{i}: the destination's connection ended");
                        };
                        let mut rest = b;
                        while rest.len() >= 2 {
                            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                            let m = decode(rest.slice(2..2 + len)).unwrap();
                            rest = rest.slice(2 + len..);
                            if m.r#type == MessageType::Data as i32 {
                                return m.payload;
                            }
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("fleet-{i}: nothing arrived"));
                assert_eq!(got, payload.as_bytes());
                (src, dst)
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        assert_eq!(carried.len(), n);
        println!("a message through each at {:?}", t0.elapsed());
        // Where they are: every tunnel's sides on one node, every node holding some.
        let mut held = std::collections::BTreeMap::<String, usize>::new();
        let mut next: Option<String> = None;
        loop {
            let mut q = vec![
                ("status", "OPEN".to_owned()),
                ("maxResults", "100".to_owned()),
            ];
            if let Some(t) = next.take() {
                q.push(("nextToken", t));
            }
            let page = api.get("/tunnels", &q).unwrap();
            for t in page["tunnels"].as_array().unwrap() {
                if !t["thingName"].as_str().unwrap().starts_with("fleet-") {
                    continue;
                }
                let node = |s: &str| {
                    t[format!("{s}ConnectionState")]["node"]
                        .as_str()
                        .map(str::to_owned)
                };
                let (s, d) = (node("source"), node("destination"));
                assert!(s.is_some() && s == d, "{t}");
                *held.entry(s.unwrap()).or_default() += 1;
            }
            match page["nextToken"].as_str() {
                Some(t) => next = Some(t.to_owned()),
                None => break,
            }
        }
        println!("{n} tunnels held per node: {held:?}");
        assert_eq!(held.values().sum::<usize>(), n);
        assert_eq!(held.len(), NODES.len(), "every node holds some: {held:?}");
        assert!(held.values().all(|&k| k >= n / 10), "{held:?}");
        drop(carried);
    });
}

/// An interactive ssh session running `cat`: every line typed comes back.
struct Session {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Session {
    fn start(sshd: &Sshd, port: u16) -> Session {
        use std::io::BufRead;
        let mut args = sshd.client_opts();
        args.extend([
            "-p".into(),
            port.to_string(),
            format!("{}@127.0.0.1", Sshd::user()),
            "cat".into(),
        ]);
        let mut child = Command::new(require_tool("ssh", "openssh-client"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(l);
            }
        });
        Session {
            child,
            stdin,
            lines,
        }
    }

    /// Type `text` and read it back.
    fn line(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").unwrap();
        self.stdin.flush().unwrap();
        let got = self
            .lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the ssh session did not echo {text:?}: {e}"));
        assert_eq!(got, text);
    }

    /// End the session (EOF): ssh exits 0.
    fn end(self) {
        let Session {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let st = child.wait().unwrap();
        assert!(st.success(), "ssh ended with {st}");
    }
}

/// The name of a node running besides `but`.
fn last_name<'a>(c: &'a Cluster, but: &str) -> &'a str {
    c.running().find(|n| n.name != but).unwrap().name
}

/// A cluster node's configuration is checked before it serves: it needs the shared store and
/// broker, a node name its certificate can carry, and a node-link port of its own.
#[test]
fn cluster_configs_say_what_a_node_needs() {
    let dir = scratch("cluster-config");
    let pki = test_pki(&dir, "unused");
    let cpki = cluster_pki(&dir);
    std::fs::write(dir.join("api-key"), "cluster-test-api-key-0123456789").unwrap();
    let check = |store: &str, mqtt: &str, cluster: &str| {
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:8443\"\nstate_dir = \"{d}/state\"\napi_key_file = \"{d}/api-key\"\n{store}\n\
                 [tls]\ncert = \"{p}/server.pem\"\nkey = \"{p}/server-key.pem\"\n\n{mqtt}\n\n[cluster]\n{cluster}\n",
                d = dir.display(),
                p = pki.display(),
            ),
        )
        .unwrap();
        let out = Command::new(bin("culvert-relay"))
            .args(["--check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (out.status.code(), stderr_of(&out))
    };
    let store = "store = \"postgres://culvert@127.0.0.1:1/culvert\"";
    let mqtt = "[mqtt]\nbroker = \"mqtts://127.0.0.1:8883\"";
    let node = |name: &str, listen: &str| {
        format!(
            "node = \"{name}\"\nlisten = \"{listen}\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/relay-a.pem\"\nkey = \"{c}/relay-a-key.pem\"",
            c = cpki.display()
        )
    };
    let good = node("relay-a", "127.0.0.1:8444");
    assert_eq!(check(store, mqtt, &good).0, Some(0));
    for (store, mqtt, cluster, says) in [
        ("", mqtt, good.clone(), "set store = \"postgres://"),
        (store, "", good.clone(), "set mqtt.broker"),
        (
            store,
            mqtt,
            node("Relay_A", "127.0.0.1:8444"),
            "is not a node name",
        ),
        (
            store,
            mqtt,
            node("relay-a", "0.0.0.0:8444"),
            "cluster.advertise is needed",
        ),
        (
            store,
            mqtt,
            node("relay-a", "127.0.0.1:8443"),
            "need a port of their own",
        ),
    ] {
        let (code, err) = check(store, mqtt, &cluster);
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains(says), "expected {says:?} in: {err}");
    }
}
