//! The relay is stopped mid-tunnel, gracefully (SIGTERM) or by a crash (SIGKILL), and started
//! again on the same address and state: both of culvert's ends reconnect by themselves with
//! their client tokens, new connections work, and the connections that were open carry on
//! (resumable connections): a session that keeps typing, and a bulk transfer both ways, lose
//! and repeat no byte, and the target still sees exactly one connection each. (The AWS
//! localproxy's side of this is in `localproxy.rs`.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use culvert_e2e::*;

/// An echo target that counts the connections it accepted (a controller whose session must
/// not be cut and opened again).
fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, count)
}

/// Open connections carry on across a relay restart: what was typed before, during and
/// after it comes back in order, a transfer running through it completes intact, and the
/// target saw one connection per session.
fn connections_resume_across_a_relay_restart(name: &str, signal: &str) {
    let dir = scratch(name);
    let (target, accepted) = counting_echo();
    let grace = vec!["--shutdown-grace-secs".to_owned(), "1".to_owned()];
    let relay = Relay::start_with(&dir, "127.0.0.1:0".parse().unwrap(), &grace);
    let t = relay.open_tunnel("robot-cell-2", &["TELNET"]);
    let rules = rules(&dir, &[("TELNET", target.to_string())]);
    let mut gw = relay.gateway(&dir, &rules, &t.destination);
    let (mut px, ports) = relay.proxy(&dir, &t.source, &["TELNET"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    let port = ports["TELNET"];
    let mut session = connect_local(port);
    type_line(&mut session, "AS terminal: HERE #0\r\n");
    // A transfer both ways through the same tunnel, in the middle of it when the relay goes
    // away: its reader stops after a quarter until then, so every window and buffer on the
    // way is full of bytes in flight.
    let data = random_bytes(32 * 1024 * 1024);
    let expect = sha256(&data);
    let mut bulk = connect_local(port);
    let mut bulk_w = bulk.try_clone().unwrap();
    let (quarter_tx, quarter) = std::sync::mpsc::channel();
    let (go_on_tx, go_on) = std::sync::mpsc::channel::<()>();
    let n = data.len();
    let writer = std::thread::spawn(move || bulk_w.write_all(&data).expect("writing the transfer"));
    let transfer = std::thread::spawn(move || {
        let mut got = vec![0u8; n];
        bulk.read_exact(&mut got[..n / 4])
            .expect("reading the transfer back");
        let _ = quarter_tx.send(());
        go_on.recv().expect("told to go on reading");
        bulk.read_exact(&mut got[n / 4..])
            .expect("reading the transfer back");
        sha256(&got)
    });
    quarter.recv().expect("a quarter of the transfer echoed");
    std::thread::sleep(std::time::Duration::from_millis(300));

    let addr = relay.addr;
    let mut relay = relay;
    relay.proc.signal(signal);
    relay.proc.wait_exit();
    wait_log(&gw, "reconnecting to resume the open connections");
    wait_log(&px, "reconnecting to resume the open connections");
    go_on_tx.send(()).unwrap();
    // Typed while the relay is down: it waits, and arrives.
    session.write_all(b"typed during the outage\r\n").unwrap();
    drop(relay);
    let relay = Relay::start_with(&dir, addr, &grace);
    wait_log(&gw, "resuming connections");
    wait_log(&px, "resuming connections");
    for p in [&gw, &px] {
        let log = p.log_text();
        assert!(
            log.contains("resuming connections") && log.contains("connections=2"),
            "{} held both connections:\n{log}",
            p.name
        );
    }
    let mut got = vec![0u8; "typed during the outage\r\n".len()];
    session
        .read_exact(&mut got)
        .expect("the line typed during the outage");
    assert_eq!(got, b"typed during the outage\r\n");
    type_line(&mut session, "AS terminal: HERE #1\r\n");
    writer.join().expect("the transfer's writer");
    assert_eq!(
        transfer.join().expect("the transfer across the restart"),
        expect,
        "the transfer arrived intact"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the target saw each connection once: nothing was cut and opened again"
    );
    // New connections work as well.
    assert!(echo_works(port, b"a new connection"));
    assert!(gw.is_running() && px.is_running());
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn connections_resume_after_a_relay_crash() {
    connections_resume_across_a_relay_restart("resume-kill", "KILL");
}

#[test]
fn connections_resume_after_a_graceful_relay_restart() {
    connections_resume_across_a_relay_restart("resume-term", "TERM");
}

fn ends_survive_a_relay_restart(name: &str, signal: &str, relay_args: &[&str]) {
    let dir = scratch(name);
    let echo = echo_server();
    let mut grace = vec!["--shutdown-grace-secs".to_owned(), "1".to_owned()];
    grace.extend(relay_args.iter().map(|a| a.to_string()));
    let relay = Relay::start_with(&dir, "127.0.0.1:0".parse().unwrap(), &grace);
    let t = relay.open_tunnel("cafe-cell-7", &["ECHO"]);
    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let mut gw = relay.gateway(&dir, &rules, &t.destination);
    let (mut px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"before the stop"));

    let addr = relay.addr;
    let mut relay = relay;
    relay.proc.signal(signal);
    let code = relay.proc.wait_exit();
    if signal == "TERM" {
        assert_eq!(code, 0, "graceful stop:\n{}", relay.proc.log_text());
        // The relay said "come back" (close code 1012) and both ends understood it.
        wait_log(&gw, "the relay is restarting; reconnecting");
        wait_log(&px, "the relay is restarting; reconnecting");
    }
    drop(relay);
    let relay = Relay::start_with(&dir, addr, &grace);
    assert_eq!(
        relay.describe(&t.id)["status"],
        "OPEN",
        "the tunnel survived the restart"
    );
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"after the restart"));
    let data = random_bytes(256 * 1024);
    assert_eq!(
        sha256(&round_trip(connect_local(ports["ECHO"]), data.clone())),
        sha256(&data)
    );
    assert!(gw.is_running() && px.is_running());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn relay_crash_mid_tunnel() {
    ends_survive_a_relay_restart("restart-kill", "KILL", &[]);
}

#[test]
fn graceful_relay_restart_mid_tunnel() {
    ends_survive_a_relay_restart("restart-term", "TERM", &[]);
}

/// "Come back" (1012) does not depend on flow control being offered.
#[test]
fn graceful_restart_of_a_relay_without_flow_control() {
    ends_survive_a_relay_restart("restart-term-nofc", "TERM", &["--no-flow-control"]);
}

/// `culvert connect --resume-hold 0`: open connections end with the tunnel, as they do
/// against AWS's relay; the ends still reconnect and new connections work.
#[test]
fn without_a_hold_time_connections_end_with_the_tunnel() {
    let dir = scratch("resume-off");
    let (target, accepted) = counting_echo();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("robot-cell-3", &["TELNET"]);
    let rules = rules(&dir, &[("TELNET", target.to_string())]);
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (px, ports) = relay.proxy_with(&dir, &t.source, &["TELNET"], &["--resume-hold", "0"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    let mut session = connect_local(ports["TELNET"]);
    type_line(&mut session, "before\r\n");
    let addr = relay.addr;
    let mut relay = relay;
    relay.proc.signal("KILL");
    relay.proc.wait_exit();
    wait_log(&px, "relay session ended; reconnecting");
    let mut rest = Vec::new();
    // The connection ends (EOF or a reset) instead of waiting.
    let _ = session.read_to_end(&mut rest);
    assert!(rest.is_empty());
    drop(relay);
    let _relay = Relay::start_on(&dir, addr);
    assert!(echo_works(ports["TELNET"], b"a new connection"));
    for p in [&gw, &px] {
        assert!(
            !p.log_text().contains("resuming connections"),
            "{} resumed nothing",
            p.name
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay that stays away longer than the hold time: both ends give up on the connection
/// then (the operator's socket ends, culvertd closes the target's), and culvertd's audit trail
/// says why: `tunnel_lost`.
#[test]
fn connections_end_with_the_reason_when_the_hold_time_runs_out() {
    let dir = scratch("resume-expired");
    let (target, _) = counting_echo();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("robot-cell-5", &["TELNET"]);
    let rules = rules(&dir, &[("TELNET", target.to_string())]);
    let audit = dir.join("audit.jsonl");
    let mut config = std::fs::read_to_string(&rules).unwrap();
    config.insert_str(
        0,
        &format!(
            "[daemon]\nresume_hold_secs = 2\n\n[audit]\nfile = \"{}\"\n\n",
            audit.display()
        ),
    );
    std::fs::write(&rules, config).unwrap();
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (px, ports) = relay.proxy_with(&dir, &t.source, &["TELNET"], &["--resume-hold", "2"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    let mut session = connect_local(ports["TELNET"]);
    type_line(&mut session, "before\r\n");
    let mut relay = relay;
    relay.proc.signal("KILL");
    relay.proc.wait_exit();
    wait_log(&px, "reconnecting to resume the open connections");
    let mut rest = Vec::new();
    let _ = session.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the connection ended after the hold time");
    wait_log(&px, "connections not resumed within the hold time");
    wait_log(&gw, "connections not resumed within the hold time");
    let end = wait_audit(&audit, "the connection's end", |r| r["event"] == "end");
    assert_eq!(end["reason"], "tunnel_lost", "{end}");
    let _ = std::fs::remove_dir_all(&dir);
}
