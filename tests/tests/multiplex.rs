//! Several services in one tunnel, many simultaneous connections on one service, and a target
//! that refuses: only that connection is reset.

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};

use culvert_e2e::*;

#[test]
fn two_services_and_100_simultaneous_connections() {
    let dir = scratch("mux");
    let echo = echo_server();
    let upper = transform_server(|b| b.to_ascii_uppercase());
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-7", &["ECHO", "UPPER"]);
    let rules = rules(
        &dir,
        &[("ECHO", echo.to_string()), ("UPPER", upper.to_string())],
    );
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO", "UPPER"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(
        echo_works(ports["ECHO"], b"warm-up"),
        "the ECHO service never answered"
    );

    // Two services, each reaching its own target.
    let got = round_trip(connect_local(ports["UPPER"]), b"plc says hello".to_vec());
    assert_eq!(got, b"PLC SAYS HELLO");
    let got = round_trip(connect_local(ports["ECHO"]), b"robot says hello".to_vec());
    assert_eq!(got, b"robot says hello");

    // 100 connections open at once on one service, each echoing its own random data.
    let n = 100;
    let barrier = Arc::new(Barrier::new(n));
    let port = ports["ECHO"];
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = connect_local(port);
                barrier.wait();
                let data = random_bytes(16 * 1024 + i * 997);
                let got = round_trip(s, data.clone());
                assert!(got == data, "connection {i}: echoed bytes differ");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a connection failed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_refusing_target_resets_only_its_connection() {
    let dir = scratch("refuse");
    let echo = echo_server();
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-8", &["ECHO", "DEAD"]);
    let rules = rules(
        &dir,
        &[("ECHO", echo.to_string()), ("DEAD", dead.to_string())],
    );
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO", "DEAD"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"before"));
    let mut live = connect_local(ports["ECHO"]);
    live.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    live.read_exact(&mut b).unwrap();

    let mut s = connect_local(ports["DEAD"]);
    s.write_all(b"anyone there?").unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a connection to a refusing target must be closed");
    wait_for("culvertd to log the refused target", || {
        gw.log_text()
            .contains("reason=\"connect_failed\"")
            .then_some(())
    });

    // The tunnel and the connection opened before are untouched.
    live.write_all(b"y").unwrap();
    live.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y");
    assert!(echo_works(ports["ECHO"], b"after"));
    assert_eq!(
        relay.describe(&t.id)["destinationConnectionState"]["status"],
        "CONNECTED"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
