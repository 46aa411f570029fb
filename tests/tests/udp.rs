//! UDP services end to end: culvertd rules with `udp:` targets, `culvert connect` with
//! `udp:PORT` mappings, through the real relay.
//!
//! - A real DNS server (Debian's dnsmasq) answers a real client (dig) through the tunnel, two
//!   queries at once (two flows).
//! - Datagrams from 0 bytes to 65 507 (the largest IPv4 UDP payload) come back from an echo
//!   target whole, one for one and in order, on two flows at once.
//! - A flow that falls quiet for the rule's idle timeout ends (audited as `idle_timeout`); the
//!   client's next datagram starts a new flow and is answered.
//!
//! Needs dnsmasq (Debian: dnsmasq-base) and dig (Debian: bind9-dnsutils).

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;

use culvert_e2e::*;

/// A UDP target that sends every datagram back to where it came from; counts the flows
/// (source addresses) it has seen.
fn udp_echo() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = peers.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let mut seen = seen.lock().unwrap();
            if !seen.contains(&peer) {
                seen.push(peer);
            }
            drop(seen);
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    (addr, peers)
}

/// A client socket of its own (one flow), answers awaited for at most [`WAIT`].
fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Datagram `i` of a flow: its size varies, its bytes say which flow and which datagram.
fn datagram(flow: u8, i: usize) -> Vec<u8> {
    let len = [0, 1, 2, 3, 700, 1400, 1472, 4000][i % 8] + i;
    (0..len).map(|k| (k as u8) ^ flow ^ (i as u8)).collect()
}

fn dig(port: u16, name: &str, kind: &str) -> std::process::Child {
    Command::new(require_tool("dig", "bind9-dnsutils"))
        .args(["+short", "+tries=1", "+time=10", "-p", &port.to_string()])
        .args(["@127.0.0.1", name, kind])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn udp_services_carry_dns_and_keep_datagram_boundaries_and_order() {
    let dir = scratch("udp");
    let dns_port = free_port();
    let dnsmasq = Proc::spawn(
        "dnsmasq",
        Command::new(require_tool("dnsmasq", "dnsmasq-base"))
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--pid-file=",
            ])
            .arg(format!("--port={dns_port}"))
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--user=root",
            ])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--log-queries",
                "--log-facility=-",
            ])
            .args(["--address=/robot.lan/192.0.2.7"])
            .args(["--txt-record=cell4.robot.lan,press line 4"]),
        &dir,
    );
    let (echo, echo_flows) = udp_echo();

    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("campus-cell", &["DNS", "ECHO"]);
    let audit = dir.join("audit.jsonl");
    let config = dir.join("culvertd.toml");
    std::fs::write(
        &config,
        format!(
            "{LOOPBACK_ACL}[audit]\nfile = \"{}\"\n\n[services.DNS]\ntarget = \"udp:127.0.0.1:{dns_port}\"\n\n\
             [services.ECHO]\ntarget = \"udp:{echo}\"\nidle_timeout_secs = 3\n",
            audit.display()
        ),
    )
    .unwrap();
    let _gw = relay.gateway(&dir, &config, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["DNS=udp:0", "ECHO=udp:0"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");

    // A real resolver's queries, two at once.
    wait_for("dnsmasq to answer", || {
        dnsmasq.log_text().contains("started").then_some(())
    });
    let a = dig(ports["DNS"], "robot.lan", "A");
    let txt = dig(ports["DNS"], "cell4.robot.lan", "TXT");
    for (child, expect) in [(a, "192.0.2.7"), (txt, "\"press line 4\"")] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "dig failed: {}", stderr_of(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expect);
    }
    let log = dnsmasq.log_text();
    assert!(log.contains("query[A] robot.lan"), "{log}");
    assert!(log.contains("query[TXT] cell4.robot.lan"), "{log}");

    // Boundaries and order: each flow sends a burst of datagrams of many sizes (0 bytes
    // included) before reading, then one of the largest size; everything comes back whole, in
    // order, on its own flow.
    let echo_port = ports["ECHO"];
    let flows: Vec<_> = (1..=2u8)
        .map(|flow| {
            std::thread::spawn(move || {
                let c = client();
                let burst: Vec<Vec<u8>> = (0..40).map(|i| datagram(flow, i)).collect();
                for d in &burst {
                    c.send_to(d, ("127.0.0.1", echo_port)).unwrap();
                }
                let mut buf = vec![0u8; 65536];
                for (i, d) in burst.iter().enumerate() {
                    let n = c.recv(&mut buf).unwrap_or_else(|e| {
                        panic!(
                            "flow {flow}: datagram {i} of {} not echoed: {e}",
                            burst.len()
                        )
                    });
                    assert_eq!(n, d.len(), "flow {flow}: datagram {i}'s size");
                    assert!(
                        &buf[..n] == d.as_slice(),
                        "flow {flow}: datagram {i}'s bytes"
                    );
                }
                let largest = vec![flow; 65507];
                c.send_to(&largest, ("127.0.0.1", echo_port)).unwrap();
                let n = c.recv(&mut buf).unwrap();
                assert!(
                    n == largest.len() && buf[..n] == largest[..],
                    "flow {flow}: 65 507 bytes"
                );
                c
            })
        })
        .collect();
    let clients: Vec<UdpSocket> = flows.into_iter().map(|f| f.join().unwrap()).collect();
    assert_eq!(
        echo_flows.lock().unwrap().len(),
        2,
        "each client flow is its own flow at the target"
    );

    // Idle expiry: both flows end after the rule's 3 s without a datagram, and say so.
    wait_for("both echo flows to end as idle", || {
        let ended = audit_records(&audit)
            .into_iter()
            .filter(|r| {
                r["event"] == "end" && r["service"] == "ECHO" && r["reason"] == "idle_timeout"
            })
            .count();
        (ended == 2).then_some(())
    });
    let started = audit_records(&audit)
        .into_iter()
        .filter(|r| r["event"] == "start" && r["service"] == "ECHO")
        .collect::<Vec<_>>();
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(
        started[0]["target"],
        format!("udp:{echo}"),
        "{}",
        started[0]
    );
    // The client's next datagram opens a new flow, which is answered.
    let c = &clients[0];
    c.send_to(b"after the pause", ("127.0.0.1", echo_port))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = c.recv(&mut buf).expect("an answer on a new flow");
    assert_eq!(&buf[..n], b"after the pause");
    wait_for("a third echo flow in the audit trail", || {
        let started = audit_records(&audit)
            .into_iter()
            .filter(|r| r["event"] == "start" && r["service"] == "ECHO")
            .count();
        (started == 3).then_some(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}
