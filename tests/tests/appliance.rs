//! culvertd as a systemd service: graceful drain on SIGTERM, the sd_notify protocol (READY,
//! STATUS, WATCHDOG, STOPPING) on a notify socket of the test's own, and the metrics endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use culvert_e2e::*;

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("culvertd.toml");
    std::fs::write(&p, format!("{LOOPBACK_ACL}{text}")).unwrap();
    p
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn sigterm_lets_a_running_scp_finish_then_exits_0() {
    let dir = scratch("drain");
    let sshd = Sshd::start(&dir);
    let scp = require_tool("scp", "openssh-client");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-drain", &["SSH"]);
    // The bandwidth cap keeps the copy in flight for seconds, so the signal surely lands mid-way.
    let rules = write_config(
        &dir,
        &format!(
            "[daemon]\nshutdown_grace_secs = 120\n\n[services.SSH]\ntarget = \"127.0.0.1:{}\"\nmax_bytes_per_sec = 10000000\n",
            sshd.port
        ),
    );
    let mut gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["SSH"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let port = ports["SSH"].to_string();

    let data = random_bytes(40 * 1024 * 1024);
    let src = dir.join("payload.bin");
    let dst = dir.join("payload-copy.bin");
    std::fs::write(&src, &data).unwrap();
    let mut copy = Command::new(&scp)
        .args(sshd.client_opts())
        .args(["-q", "-P", &port])
        .arg(&src)
        .arg(format!("{}@127.0.0.1:{}", Sshd::user(), dst.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the copy to be under way", || {
        (file_len(&dst) > 1024 * 1024).then_some(())
    });
    gw.signal("TERM");
    let at_signal = file_len(&dst);
    assert!(
        at_signal < data.len() as u64,
        "the copy must still be running at SIGTERM"
    );
    wait_log(&gw, "draining");
    // No new connections while draining.
    expect_refused(ports["SSH"]);
    let status = copy.wait().unwrap();
    let mut err = String::new();
    copy.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "scp failed after SIGTERM: {err}");
    assert_eq!(
        sha256(&std::fs::read(&dst).unwrap()),
        sha256(&data),
        "the copy finished after SIGTERM differs"
    );
    assert_eq!(gw.wait_exit(), 0, "culvertd log:\n{}", gw.log_text());
    println!(
        "SIGTERM at {at_signal} of {} bytes; the copy completed and culvertd exited 0",
        data.len()
    );
}

/// Read notifications until `n` of them carry a line starting with `what`.
fn recv_until(sock: &UnixDatagram, seen: &mut Vec<String>, what: &str, n: usize) {
    let mut buf = [0u8; 4096];
    wait_for(&format!("{n} × {what} on the notify socket"), || {
        let count = seen
            .iter()
            .filter(|m| m.lines().any(|l| l.starts_with(what)))
            .count();
        if count >= n {
            return Some(());
        }
        let k = sock.recv(&mut buf).ok()?;
        seen.push(String::from_utf8_lossy(&buf[..k]).into_owned());
        None
    });
}

#[test]
fn notify_socket_gets_ready_status_watchdog_and_stopping() {
    let dir = scratch("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-notify", &["ECHO"]);
    let rules = write_config(&dir, &format!("[services.ECHO]\ntarget = \"{echo}\"\n"));
    let sock_env = sock_path.to_str().unwrap();
    let mut gw = relay.gateway_with_env(
        &dir,
        &rules,
        &t.destination,
        &[("NOTIFY_SOCKET", sock_env), ("WATCHDOG_USEC", "400000")],
    );
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    assert!(echo_works(ports["ECHO"], b"through"));
    let mut seen = Vec::<String>::new();
    recv_until(&sock, &mut seen, "READY=1", 1);
    // The watchdog keeps pinging, with the current status.
    recv_until(
        &sock,
        &mut seen,
        "STATUS=1 tunnel(s), 0 connection(s) open",
        1,
    );
    let watchdogs = seen.iter().filter(|m| m.starts_with("WATCHDOG=1")).count();
    recv_until(&sock, &mut seen, "WATCHDOG=1", watchdogs + 2);
    gw.signal("TERM");
    recv_until(&sock, &mut seen, "STOPPING=1", 1);
    assert_eq!(gw.wait_exit(), 0, "{}", gw.log_text());
}

/// The address a process logged for its metrics endpoint.
fn metrics_addr(p: &Proc) -> String {
    wait_log(p, "metrics endpoint: http://");
    p.log_text()
        .split("metrics endpoint: http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned()
}

fn scrape(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn metrics_endpoint_counts_tunnels_connections_bytes_and_refusals() {
    let dir = scratch("metrics");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-metrics", &["ECHO", "NOPE"]);
    let rules = write_config(
        &dir,
        &format!(
            "[daemon]\nmetrics_listen = \"127.0.0.1:0\"\n\n[services.ECHO]\ntarget = \"{echo}\"\n\n\
             [services.NOPE]\ntarget = \"localhost:9\"\ndeny = [\"127.0.0.1\", \"::1\"]\n"
        ),
    );
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO", "NOPE"]);
    let addr = metrics_addr(&gw);
    assert!(echo_works(ports["ECHO"], b"0123456789"));
    expect_refused(ports["NOPE"]);
    let text = wait_for("the metrics to show the refusal", || {
        let t = scrape(&addr, "/metrics");
        t.contains("culvertd_connections_refused_total{reason=\"denied\"} 1")
            .then_some(t)
    });
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");
    assert!(text.contains("\nculvertd_tunnels 1\n"), "{text}");
    assert!(
        text.contains("culvertd_connections_total{service=\"ECHO\"} 1"),
        "{text}"
    );
    let to_target: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("culvertd_bytes_total{direction=\"to_target\"} "))
        .unwrap_or_else(|| panic!("no bytes counter: {text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(to_target >= 10, "{text}");
    assert!(scrape(&addr, "/").starts_with("HTTP/1.1 404"));
}

#[test]
fn relay_notifies_systemd_drains_peers_and_serves_metrics() {
    let dir = scratch("relay-appliance");
    let sock_path = dir.join("notify.sock");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut relay = Relay::start_full(
        &dir,
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--shutdown-grace-secs".into(),
            "3".into(),
        ],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    recv_until(&sock, &mut seen, "READY=1", 1);
    let echo = echo_server();
    let t = relay.open_tunnel("cell-relay", &["ECHO"]);
    let rules = write_config(&dir, &format!("[services.ECHO]\ntarget = \"{echo}\"\n"));
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    assert!(echo_works(ports["ECHO"], b"hello"));
    let mut live = connect_local(ports["ECHO"]);
    live.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    live.read_exact(&mut b).unwrap();
    // The status follows the peers: wait for the line, not for a count of watchdog
    // messages (the first ones may all predate the peers).
    recv_until(
        &sock,
        &mut seen,
        "STATUS=1 tunnel(s) open, 2 peer(s) connected",
        1,
    );
    let watchdogs = seen.iter().filter(|m| m.starts_with("WATCHDOG=1")).count();
    recv_until(&sock, &mut seen, "WATCHDOG=1", watchdogs + 1);
    let addr = metrics_addr(&relay.proc);
    let text = scrape(&addr, "/metrics");
    assert!(text.contains("\nculvert_relay_peers 2\n"), "{text}");
    assert!(text.contains("\nculvert_relay_tunnels 1\n"), "{text}");
    assert!(
        text.contains("culvert_relay_peer_connects_total{mode=\"destination\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("culvert_relay_forwarded_bytes_total "),
        "{text}"
    );

    // SIGTERM: connected peers go on during the grace period, then the relay exits 0.
    relay.proc.signal("TERM");
    recv_until(&sock, &mut seen, "STOPPING=1", 1);
    live.write_all(b"y").unwrap();
    live.read_exact(&mut b).unwrap();
    assert_eq!(
        &b, b"y",
        "a live connection keeps working while the relay drains"
    );
    assert_eq!(relay.proc.wait_exit(), 0, "{}", relay.proc.log_text());
}
