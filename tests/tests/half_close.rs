//! Half-close through the tunnel (culvert's `half-close/1`, negotiated with flow control), end
//! to end with the real programs: `culvert connect` → culvert-relay → culvertd → a LAN target.
//!
//! - A client's FIN (`nc -N`, `shutdown(SHUT_WR)`) reaches the target as a FIN, and the
//!   target's answer, written after it read EOF, comes back: the classic
//!   `printf 'cmd\n' | nc -N host port`.
//! - A target's FIN (a banner, then `shutdown(SHUT_WR)`) reaches the client as EOF, and what
//!   the client sends afterwards still reaches the target, every byte.
//! - Both in the V3 and the V2 format.
//! - Without the extension (the relay started with `--no-flow-control`: the AWS protocol, which
//!   has no half-close), the client's FIN resets the connection, as it does through AWS's
//!   service: the same `nc -N` gets no answer.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use culvert_e2e::*;

/// A target that sends a banner and finishes sending at once, then reads each connection to
/// EOF and reports what it read.
fn banner_then_listens() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = s.write_all(b"READY\n");
                let _ = s.shutdown(Shutdown::Write);
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                let _ = tx.send(got);
            });
        }
    });
    (addr, rx)
}

struct Scenario {
    _relay: Relay,
    _gw: Proc,
    _px: Proc,
    ports: std::collections::HashMap<String, u16>,
    heard: mpsc::Receiver<Vec<u8>>,
}

fn scenario(name: &str, relay_args: &[String], connect_args: &[&str]) -> Scenario {
    let dir = scratch(name);
    let answers = digest_at_eof([127, 0, 0, 1].into());
    let (banner, heard) = banner_then_listens();
    let relay = Relay::start_with(&dir, "127.0.0.1:0".parse().unwrap(), relay_args);
    let t = relay.open_tunnel("robot-cell", &["CMD", "BANNER"]);
    let rules = rules(
        &dir,
        &[("CMD", answers.to_string()), ("BANNER", banner.to_string())],
    );
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (px, ports) = relay.proxy_with(&dir, &t.source, &["CMD", "BANNER"], connect_args);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    if relay_args.is_empty() {
        // Half-close applies to connections started after flow control is negotiated.
        wait_log(&gw, "flow control on");
        wait_log(&px, "flow control on");
    }
    Scenario {
        _relay: relay,
        _gw: gw,
        _px: px,
        ports,
        heard,
    }
}

/// `printf 'cmd\n' | nc -N 127.0.0.1 PORT`: what nc printed.
fn nc_command(port: u16) -> String {
    let mut nc = Command::new("nc")
        .args(["-N", "127.0.0.1", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nc (Debian's netcat-openbsd) is needed: apt-get install netcat-openbsd");
    nc.stdin.take().unwrap().write_all(b"cmd\n").unwrap();
    let out = nc.wait_with_output().unwrap();
    assert!(out.status.success(), "nc failed: {}", stderr_of(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn client_fin_then_answer(s: &Scenario) {
    assert_eq!(
        nc_command(s.ports["CMD"]),
        format!("4 {}\n", sha256(b"cmd\n")),
        "the target's answer to `printf 'cmd\\n' | nc -N` did not come back"
    );
    // 1 MiB then shutdown(SHUT_WR): every byte reaches the target before its EOF.
    let data = random_bytes(1 << 20);
    let mut c = connect_local(s.ports["CMD"]);
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("{} {}\n", data.len(), sha256(&data)));
}

fn target_fin_then_client_sends(s: &Scenario) {
    let mut c = connect_local(s.ports["BANNER"]);
    let mut banner = String::new();
    c.read_to_string(&mut banner)
        .expect("the target's FIN reaches the client as EOF");
    assert_eq!(banner, "READY\n");
    // The target only finished sending: it still reads.
    let data = random_bytes(300_000);
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = s.heard.recv_timeout(WAIT).expect("the target read to EOF");
    assert_eq!(
        got.len(),
        data.len(),
        "bytes sent after the target's FIN were lost"
    );
    assert!(got == data);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_fin_either_way_reaches_the_other_side_and_the_reverse_direction_keeps_flowing() {
    for (name, args) in [
        ("half-close-v3", &[][..]),
        ("half-close-v2", &["--format", "V2"][..]),
    ] {
        let s = scenario(name, &[], args);
        client_fin_then_answer(&s);
        target_fin_then_client_sends(&s);
        // And again on the same tunnel: finished connections leave nothing behind.
        client_fin_then_answer(&s);
        println!("{name}: half-close both ways");
    }
}

#[test]
fn without_the_extension_a_fin_resets_the_connection_as_in_aws() {
    let s = scenario("half-close-off", &["--no-flow-control".to_owned()], &[]);
    assert_eq!(
        nc_command(s.ports["CMD"]),
        "",
        "without half-close the client's FIN must reset the connection (AWS behaviour)"
    );
    // Plain exchanges still work.
    let mut c = connect_local(s.ports["BANNER"]);
    let mut line = [0u8; 6];
    c.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"READY\n");
}
