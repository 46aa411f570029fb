//! culvertd's rules engine end to end, with the real binaries: LAN hosts are listeners on
//! 127.0.0.2 … 127.0.0.60; ACL, limits, audit trail, HTTP routing (pingora) and SIGHUP reload.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use culvert_e2e::*;
use serde_json::Value;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("culvertd.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Connect, read the server's greeting line; retried while the tunnel comes up.
fn greeting(port: u16) -> (TcpStream, String) {
    wait_for(&format!("a greeting through port {port}"), || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let line = read_line(&mut s)?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Some((s, line))
    })
}

fn echo_once(s: &mut TcpStream, msg: &str) -> bool {
    let mut got = vec![0u8; msg.len()];
    s.write_all(msg.as_bytes()).is_ok() && s.read_exact(&mut got).is_ok() && got == msg.as_bytes()
}

fn ends(audit: &Path, service: &str) -> Vec<Value> {
    audit_records(audit)
        .into_iter()
        .filter(|r| r["event"] == "end" && r["service"] == service)
        .collect()
}

fn wait_ends(audit: &Path, service: &str, n: usize) {
    wait_for(&format!("{n} end record(s) for {service}"), || {
        (ends(audit, service).len() >= n).then_some(())
    });
}

#[test]
fn fifty_rules_reach_fifty_hosts_through_one_tunnel() {
    let dir = scratch("fifty");
    let relay = Relay::start_with(
        &dir,
        "127.0.0.1:0".parse().unwrap(),
        &["--max-services".into(), "50".into()],
    );
    let mut cfg = LOOPBACK_ACL.to_owned();
    let mut names = Vec::new();
    for k in 0..50 {
        let ip = format!("127.0.0.{}", k + 2);
        let addr = tagged_server(&ip, &format!("I am {ip}"));
        let name = format!("HOST{k:02}");
        cfg.push_str(&format!("[services.{name}]\ntarget = \"{addr}\"\n\n"));
        names.push(name);
    }
    let rules = write_config(&dir, &cfg);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let t = relay.open_tunnel("site-50", &names);
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &names);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    for (k, name) in names.iter().enumerate() {
        let ip = format!("127.0.0.{}", k + 2);
        let (mut s, hello) = greeting(ports[*name]);
        assert_eq!(hello, format!("I am {ip}"), "{name} reached the wrong host");
        assert!(
            echo_once(&mut s, &format!("ping {name}\n")),
            "{name}: no echo"
        );
    }
}

fn curl(port: u16, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let curl = require_tool("curl", "curl");
    let out = Command::new(curl)
        .args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-H", &format!("Host: {host}")])
        .args(extra)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn http_routes_by_host_and_path_with_websocket_and_error_pages() {
    let dir = scratch("http");
    let audit = dir.join("audit.jsonl");
    let press1 = http_server("127.0.0.2", "press1 web UI");
    let press2 = http_server("127.0.0.3", "press2 web UI");
    let robot3 = http_server("127.0.0.4", "robot3 web UI");
    let ws = ws_echo_server("127.0.0.5");
    let down = closed_port("127.0.0.6");
    let slow = silent_server("127.0.0.7");
    let rules = write_config(
        &dir,
        &format!(
            "{LOOPBACK_ACL}[audit]\nfile = \"{}\"\n\n[services.WEB]\nresponse_timeout_secs = 2\nroutes = [\n\
             {{ host = \"press1.local\", upstream = \"{press1}\" }},\n\
             {{ host = \"press2.local\", upstream = \"{press2}\" }},\n\
             {{ host = \"robot3.local\", upstream = \"{robot3}\" }},\n\
             {{ path = \"/ws\", upstream = \"{ws}\" }},\n\
             {{ host = \"down.local\", upstream = \"{down}\" }},\n\
             {{ host = \"slow.local\", upstream = \"{slow}\" }},\n\
             {{ host = \"robot3.local\", path = \"/camera\", upstream = \"{robot3}\", strip_prefix = true }},\n]\n",
            audit.display()
        ),
    );
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("line-2", &["WEB"]);
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["WEB"]);
    let port = ports["WEB"];
    relay.wait_side(&t.id, "destination", "CONNECTED");

    // Three device web UIs behind one service, told apart by Host.
    let body = wait_for("press1's page through the tunnel", || {
        let (code, body) = curl(port, "press1.local", "/", &[]);
        (code == 200).then_some(body)
    });
    assert!(body.starts_with("press1 web UI\n"), "{body}");
    for (host, name) in [("press2.local", "press2"), ("robot3.local:8080", "robot3")] {
        let (code, body) = curl(port, host, "/status", &[]);
        assert_eq!(code, 200, "{host}: {body}");
        assert!(
            body.starts_with(&format!("{name} web UI\n")),
            "{host}: {body}"
        );
        assert!(
            body.starts_with(&format!("{name} web UI\nGET /status ")),
            "{body}"
        );
    }
    // Forwarding headers: the relay is the hop the request came from; a client's own
    // X-Forwarded-For is not passed on.
    let (_, body) = curl(
        port,
        "press1.local",
        "/",
        &["-H", "X-Forwarded-For: 6.6.6.6"],
    );
    let head = body.to_ascii_lowercase();
    assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{body}");
    assert!(head.contains("x-forwarded-proto: http\r\n"), "{body}");
    assert!(
        head.contains("x-forwarded-host: press1.local\r\n"),
        "{body}"
    );
    assert!(!head.contains("6.6.6.6"), "{body}");
    // A path-prefix route with the prefix stripped.
    let (code, body) = curl(port, "robot3.local", "/camera/live.jpg?q=1", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\nGET /live.jpg?q=1 HTTP/1.1"), "{body}");
    // Errors are pages that say what went wrong.
    let (code, body) = curl(port, "nobody.local", "/", &[]);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no route"), "{body}");
    let (code, body) = curl(port, "down.local", "/", &[]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains(&down.to_string()), "{body}");
    let (code, body) = curl(port, "slow.local", "/", &[]);
    assert_eq!(code, 504, "{body}");
    // After the errors, the service still works.
    assert_eq!(curl(port, "press2.local", "/", &[]).0, 200);

    // A WebSocket upgrade passes through to the upstream, both ways.
    let rt = raw::runtime();
    rt.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/ws"), tcp)
                .await
                .expect("WebSocket handshake through the tunnel");
        assert_eq!(resp.status(), 101);
        for i in 0..20 {
            let msg = format!("frame {i} through culvert");
            ws.send(Message::text(msg.clone())).await.unwrap();
            let got = ws.next().await.unwrap().unwrap();
            assert_eq!(got.into_text().unwrap().as_str(), msg);
        }
        let big = vec![7u8; 300_000];
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_data(), big);
        ws.close(None).await.unwrap();
    });

    // One audit record per request, with rule, upstream and status.
    let req = |status: u64| {
        wait_audit(&audit, &format!("a request with status {status}"), |r| {
            r["event"] == "request" && r["status"] == status
        })
    };
    let ok = req(200);
    assert_eq!(ok["service"], "WEB");
    assert!(
        ok["rule"]
            .as_str()
            .unwrap()
            .starts_with("services.WEB.routes[")
    );
    assert!(ok["tunnel"].as_str().unwrap().starts_with("token:"), "{ok}");
    assert_eq!(req(502)["target"], down.to_string());
    assert_eq!(req(504)["target"], slow.to_string());
    assert_eq!(req(404)["reason"], "no_route");
    assert_eq!(req(101)["address"], ws.to_string());
    assert!(gw.log_text().contains("culvertd::audit"));

    // Requests pingora refuses itself, before any rule sees them, are audited too.
    for (raw, status) in [
        (
            &b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"[..],
            400u64,
        ),
        (
            &b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: 10.0.0.1:22\r\n\r\n"[..],
            405,
        ),
    ] {
        let mut s = connect_local(port);
        s.write_all(raw).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer:?}"
        );
        let r = wait_audit(&audit, &format!("the rejected request ({status})"), |r| {
            r["event"] == "request" && r["reason"] == "rejected" && r["status"] == status
        });
        assert_eq!(r["service"], "WEB");
    }
}

#[test]
fn acl_escape_attempts_are_denied_and_audited() {
    let dir = scratch("acl");
    let audit = dir.join("audit.jsonl");
    let ok = tagged_server("127.0.0.17", "allowed host");
    // Listeners on the forbidden addresses: if the ACL let a connection through, the greeting
    // would arrive and the test fail.
    let local = tagged_server("127.0.0.1", "gateway itself");
    let denied = tagged_server("127.0.0.25", "denied host");
    let p = denied.port();
    let rules = write_config(
        &dir,
        &format!(
            "[acl]\nallow = [\"127.0.0.16/28\"]\ndeny = [\"127.0.0.24/29\"]\n\n\
             [audit]\nfile = \"{}\"\n\n\
             [services.OK]\ntarget = \"{ok}\"\n\n\
             # A name that resolves outside the allowed networks.\n\
             [services.NAME]\ntarget = \"localhost:{}\"\n\n\
             # 127.0.0.25 in decimal and hex: names to Rust, addresses to the resolver.\n\
             [services.DECIMAL]\ntarget = \"2130706457:{p}\"\n\n\
             [services.HEX]\ntarget = \"0x7f000019:{p}\"\n\n\
             # ::ffff:127.0.0.25 with a scope: resolved, then checked as 127.0.0.25.\n\
             [services.MAPPED]\ntarget = \"[::ffff:7f00:19%1]:{p}\"\n\n\
             # 169.254.169.254 in decimal, under a rule that allows everything else.\n\
             [services.META]\nallow = [\"0.0.0.0/0\"]\ntarget = \"2852039166:80\"\n",
            audit.display(),
            local.port()
        ),
    );
    let services = ["OK", "NAME", "DECIMAL", "HEX", "MAPPED", "META"];
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-acl", &services);
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &services);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (mut s, hello) = greeting(ports["OK"]);
    assert_eq!(hello, "allowed host");
    assert!(echo_once(&mut s, "fine\n"));
    for (svc, address, why) in [
        ("NAME", "127.0.0.1", "in no allowed network"),
        (
            "DECIMAL",
            "127.0.0.25",
            "denied network 127.0.0.24/29 (acl.deny)",
        ),
        ("HEX", "127.0.0.25", "denied network 127.0.0.24/29"),
        ("MAPPED", "127.0.0.25", "denied network 127.0.0.24/29"),
        ("META", "169.254.169.254", "cloud metadata"),
    ] {
        expect_refused(ports[svc]);
        let r = wait_audit(&audit, &format!("{svc} denied"), |r| {
            r["event"] == "end" && r["service"] == svc
        });
        assert_eq!(r["reason"], "denied", "{r}");
        let detail = r["detail"].as_str().unwrap();
        assert!(detail.contains(why), "{svc}: {detail}");
        assert!(r["address"].as_str().unwrap().contains(address), "{r}");
        assert!(
            audit_records(&audit)
                .iter()
                .all(|r| !(r["service"] == svc && r["event"] == "start")),
            "{svc} must never start"
        );
    }
    let log = gw.log_text();
    assert_eq!(log.matches("connection refused").count(), 5, "{log}");
    assert!(log.contains("resolves to 127.0.0.25"), "{log}");
}

/// A server that sends bytes to every connection until it goes away.
fn source_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let chunk = vec![0x5au8; 16 * 1024];
                while s.write_all(&chunk).is_ok() {}
            });
        }
    });
    addr
}

/// A server that reads everything and reports how many bytes arrived in the `window` after the
/// first one.
fn sink_server(ip: &str, window: Duration) -> (SocketAddr, mpsc::Receiver<(u64, Duration)>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 64 * 1024];
                let (mut n, mut first) = (0u64, None::<Instant>);
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    let t0 = *first.get_or_insert_with(Instant::now);
                    if t0.elapsed() >= window {
                        let _ = tx.send((n, t0.elapsed()));
                        return;
                    }
                    n += k as u64;
                }
            });
        }
    });
    (addr, rx)
}

#[test]
fn limits_hold_per_rule_and_per_tunnel() {
    const CAP: f64 = 1_000_000.0;
    let window = Duration::from_secs(5);
    let dir = scratch("limits");
    let audit = dir.join("audit.jsonl");
    let echo = echo_server();
    let source = source_server("127.0.0.8");
    let (sink, sink_report) = sink_server("127.0.0.9", window);
    let rules = write_config(
        &dir,
        &format!(
            "{LOOPBACK_ACL}[audit]\nfile = \"{}\"\n\n[tunnel_limits]\nmax_connections = 3\n\n\
             [services.ECHO]\ntarget = \"{echo}\"\nmax_connections = 2\n\n\
             [services.OTHER]\ntarget = \"{echo}\"\n\n\
             [services.RATE]\ntarget = \"{echo}\"\nconnection_rate = \"2/hour\"\n\n\
             [services.IDLE]\ntarget = \"{echo}\"\nidle_timeout_secs = 2\n\n\
             [services.DOWN]\ntarget = \"{source}\"\nmax_bytes_per_sec = {CAP}\n\n\
             [services.UP]\ntarget = \"{sink}\"\nmax_bytes_per_sec = {CAP}\n",
            audit.display()
        ),
    );
    let services = ["ECHO", "OTHER", "RATE", "IDLE", "DOWN", "UP"];
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-limits", &services);
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &services);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(echo_works(ports["OTHER"], b"path is up"));
    wait_ends(&audit, "OTHER", 1);

    // max_connections of a rule: the third concurrent connection is refused.
    let mut a = connect_local(ports["ECHO"]);
    assert!(echo_once(&mut a, "a"));
    let mut b = connect_local(ports["ECHO"]);
    assert!(echo_once(&mut b, "b"));
    expect_refused(ports["ECHO"]);
    let r = ends(&audit, "ECHO").pop().unwrap();
    assert_eq!(r["reason"], "limit", "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .contains("rule ECHO already has 2"),
        "{r}"
    );
    assert!(echo_once(&mut a, "a still works"));

    // max_connections of the tunnel: 2 open on ECHO, one more on OTHER, then no more.
    let mut d = connect_local(ports["OTHER"]);
    assert!(echo_once(&mut d, "d"));
    expect_refused(ports["OTHER"]);
    let r = ends(&audit, "OTHER").pop().unwrap();
    assert_eq!(r["reason"], "limit", "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .contains("this tunnel already has 3"),
        "{r}"
    );
    drop((a, b, d));
    wait_ends(&audit, "ECHO", 3);
    wait_ends(&audit, "OTHER", 3);

    // connection_rate: two per hour, the third is refused.
    for i in 0..2 {
        let mut s = connect_local(ports["RATE"]);
        assert!(echo_once(&mut s, "r"), "rate connection {i}");
    }
    wait_ends(&audit, "RATE", 2);
    expect_refused(ports["RATE"]);
    let r = ends(&audit, "RATE").pop().unwrap();
    assert!(
        r["detail"].as_str().unwrap().contains("connection_rate"),
        "{r}"
    );

    // idle_timeout_secs: a quiet connection is closed, and the audit says why.
    let mut s = connect_local(ports["IDLE"]);
    assert!(echo_once(&mut s, "then silence"));
    let mut buf = [0u8; 8];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "an idle connection must be closed");
    wait_ends(&audit, "IDLE", 1);
    assert_eq!(ends(&audit, "IDLE")[0]["reason"], "idle_timeout");

    // Bandwidth, from the target: measured at the operator's end over 5 s.
    let mut s = connect_local(ports["DOWN"]);
    let mut buf = vec![0u8; 64 * 1024];
    let k = s.read(&mut buf).unwrap();
    let (t0, mut n) = (Instant::now(), 0u64);
    assert!(k > 0);
    while t0.elapsed() < window {
        n += s.read(&mut buf).unwrap() as u64;
    }
    let down_rate = n as f64 / t0.elapsed().as_secs_f64();
    drop(s);
    // Bandwidth, to the target: measured at the target over 5 s.
    let mut s = connect_local(ports["UP"]);
    let writer = std::thread::spawn(move || {
        let chunk = vec![0xa5u8; 64 * 1024];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) && s.write_all(&chunk).is_ok() {}
    });
    let (n, took) = sink_report.recv_timeout(WAIT).expect("the sink's report");
    let up_rate = n as f64 / took.as_secs_f64();
    writer.join().unwrap();
    println!(
        "bandwidth cap {CAP} B/s: from target {down_rate:.0} B/s ({:.3}x), to target {up_rate:.0} B/s ({:.3}x)",
        down_rate / CAP,
        up_rate / CAP
    );
    // The upper bound is the limiter's guarantee (not a timing race): never more than 10% over.
    assert!(down_rate <= CAP * 1.10, "from target: {down_rate:.0} B/s");
    assert!(up_rate <= CAP * 1.10, "to target: {up_rate:.0} B/s");
    assert!(down_rate > 0.0 && up_rate > 0.0);
}

#[test]
fn sighup_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one() {
    let dir = scratch("reload");
    let audit = dir.join("audit.jsonl");
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let echo = echo_server();
    let base = format!(
        "{LOOPBACK_ACL}[audit]\nfile = \"{}\"\n\n[services.SSH]\ntarget = \"127.0.0.1:{}\"\n\n",
        audit.display(),
        sshd.port
    );
    let rules = write_config(&dir, &base);
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-reload", &["SSH", "NEW"]);
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["SSH", "NEW"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");

    // A live interactive session: lines typed into a remote `cat` come back.
    let mut session = Command::new(&ssh)
        .args(sshd.client_opts())
        .args(["-p", &ports["SSH"].to_string()])
        .arg(format!("{}@127.0.0.1", Sshd::user()))
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let mut output = BufReader::new(session.stdout.take().unwrap());
    let mut typed = |line: &str| {
        writeln!(input, "{line}").unwrap();
        input.flush().unwrap();
        let mut got = String::new();
        output.read_line(&mut got).unwrap();
        assert_eq!(got.trim_end(), line, "the live ssh session");
    };
    typed("before the reload");
    expect_refused(ports["NEW"]);
    assert_eq!(ends(&audit, "NEW")[0]["reason"], "no_rule");

    // A good config: the new rule works, the live session is untouched.
    write_config(
        &dir,
        &format!("{base}[services.NEW]\ntarget = \"{echo}\"\n"),
    );
    gw.signal("HUP");
    wait_log(&gw, "configuration reloaded");
    assert!(echo_works(ports["NEW"], b"new rule"));
    typed("after a good reload");

    // A bad config: refused with the key named; the rules in force stay.
    write_config(
        &dir,
        &format!(
            "{base}[services.NEW]\ntarget = \"{echo}\"\ncolour = \"blue\"\n[services.X]\ntarget = \"10.0.0.1:80\"\n"
        ),
    );
    gw.signal("HUP");
    wait_log(&gw, "configuration not reloaded");
    let log = gw.log_text();
    assert!(
        log.contains("services.NEW: unknown key \"colour\""),
        "{log}"
    );
    assert!(log.contains("services.X.target"), "{log}");
    assert!(echo_works(ports["NEW"], b"old rules still in force"));
    typed("after a bad reload");

    drop(input);
    let status = session.wait().unwrap();
    assert!(status.success(), "ssh session ended with {status}");
}
