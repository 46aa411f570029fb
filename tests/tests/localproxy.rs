//! Interoperability with the real AWS IoT Secure Tunneling localproxy (v3.x), in both modes,
//! against culvert-relay, culvertd and `culvert connect`.
//!
//! The localproxy is not packaged for Debian and cannot be built by this test suite, so these
//! tests are opt-in: build it from its public sources, then run
//! `CULVERT_LOCALPROXY=/path/to/localproxy cargo test -p culvert-e2e --test localproxy -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use culvert_e2e::*;

fn localproxy() -> PathBuf {
    let p = std::env::var("CULVERT_LOCALPROXY").unwrap_or_else(|_| {
        panic!("set CULVERT_LOCALPROXY to the AWS localproxy binary (build it from aws-samples/aws-iot-securetunneling-localproxy)")
    });
    require_tool(&p, "(build the AWS localproxy from source)")
}

/// The localproxy wants an OpenSSL hashed CA directory.
fn ca_dir(relay: &Relay, dir: &Path) -> PathBuf {
    let openssl = require_tool("openssl", "openssl");
    let d = dir.join("cadir");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(&relay.ca, d.join("ca.pem")).unwrap();
    let st = Command::new(openssl)
        .arg("rehash")
        .arg(&d)
        .status()
        .unwrap();
    assert!(st.success());
    d
}

fn spawn_localproxy(relay: &Relay, dir: &Path, token: &str, args: &[&str], name: &str) -> Proc {
    let cadir = ca_dir(relay, dir);
    Proc::spawn(
        name,
        Command::new(localproxy())
            .arg("-e")
            .arg(relay.addr.to_string())
            .arg("-c")
            .arg(&cadir)
            .args(args)
            .env("AWSIOT_TUNNEL_ACCESS_TOKEN", token)
            .stdout(Stdio::null()),
        dir,
    )
}

/// Echo `n` bytes through `port`, paced (the localproxy dies when more than its 128 KiB
/// buffer is outstanding towards a slow local reader).
fn paced_echo(port: u16, n: usize) {
    let data = random_bytes(n);
    let mut s = connect_local(port);
    for chunk in data.chunks(32 * 1024) {
        let got = {
            use std::io::{Read, Write};
            s.write_all(chunk).unwrap();
            let mut got = vec![0u8; chunk.len()];
            s.read_exact(&mut got).unwrap();
            got
        };
        assert!(got == chunk, "echoed bytes differ");
    }
}

#[test]
#[ignore = "needs the AWS localproxy: set CULVERT_LOCALPROXY and run with --ignored"]
fn localproxy_source_to_culvertd() {
    let dir = scratch("lp-src");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-src", &["ECHO"]);
    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let port = free_port();
    let _lp = spawn_localproxy(
        &relay,
        &dir,
        &t.source,
        &["-s", &format!("ECHO={port}")],
        "localproxy-src",
    );
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(port, b"localproxy source -> culvertd"));
    for _ in 0..5 {
        paced_echo(port, 256 * 1024);
    }
}

#[test]
#[ignore = "needs the AWS localproxy: set CULVERT_LOCALPROXY and run with --ignored"]
fn localproxy_v1_source_to_culvertd() {
    let dir = scratch("lp-v1");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-v1", &["ECHO"]);
    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let port = free_port();
    let _lp = spawn_localproxy(
        &relay,
        &dir,
        &t.source,
        &["-s", &port.to_string(), "-y", "V1"],
        "localproxy-v1",
    );
    assert!(echo_works(port, b"V1 format"));
    paced_echo(port, 128 * 1024);
}

#[test]
#[ignore = "needs the AWS localproxy: set CULVERT_LOCALPROXY and run with --ignored"]
fn culvert_connect_to_localproxy_destination() {
    let dir = scratch("lp-dst");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-dst", &["ECHO", "OTHER"]);
    let _lp = spawn_localproxy(
        &relay,
        &dir,
        &t.destination,
        &["-d", &format!("ECHO={echo},OTHER={echo}")],
        "localproxy-dst",
    );
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO", "OTHER"]);
    assert!(echo_works(
        ports["ECHO"],
        b"culvert connect -> localproxy destination"
    ));
    assert!(echo_works(ports["OTHER"], b"second service"));
    // Simultaneous V3 connections, paced.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let port = ports["ECHO"];
            std::thread::spawn(move || paced_echo(port, 256 * 1024))
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
#[ignore = "needs the AWS localproxy: set CULVERT_LOCALPROXY and run with --ignored"]
fn culvert_connect_v2_format_to_localproxy_destination() {
    let dir = scratch("lp-v2");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-v2", &["ECHO"]);
    let _lp = spawn_localproxy(
        &relay,
        &dir,
        &t.destination,
        &["-d", &format!("ECHO={echo}")],
        "localproxy-dst",
    );
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let mut cmd = relay.culvert();
    cmd.args(["connect", "--format", "V2", "-s", "ECHO=0"])
        .env("CULVERT_ACCESS_TOKEN", &t.source)
        .stdout(Stdio::piped());
    let mut px = Proc::spawn("culvert-connect", &mut cmd, &dir);
    let line = {
        use std::io::BufRead;
        let mut l = String::new();
        std::io::BufReader::new(px.child.stdout.take().unwrap())
            .read_line(&mut l)
            .unwrap();
        l
    };
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    for i in 0..3 {
        assert!(echo_works(port, format!("V2 connection {i}").as_bytes()));
    }
    paced_echo(port, 128 * 1024);
}

#[test]
#[ignore = "needs the AWS localproxy: set CULVERT_LOCALPROXY and run with --ignored"]
fn localproxy_to_localproxy_through_culvert_relay() {
    let dir = scratch("lp-lp");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-lp", &["ECHO"]);
    let _dst = spawn_localproxy(
        &relay,
        &dir,
        &t.destination,
        &["-d", &format!("ECHO={echo}")],
        "localproxy-dst",
    );
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let port = free_port();
    let _src = spawn_localproxy(
        &relay,
        &dir,
        &t.source,
        &["-s", &format!("ECHO={port}")],
        "localproxy-src",
    );
    assert!(echo_works(port, b"localproxy to localproxy"));
    paced_echo(port, 512 * 1024);
    // Closing the tunnel ends both localproxies with status 0, as against AWS.
    relay.api(&["tunnel", "close", &t.id]);
}
