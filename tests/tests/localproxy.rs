//! Interoperability with the real AWS IoT Secure Tunneling localproxy v3.3.1, in both modes and
//! all three message formats, against culvert-relay in its default configuration (flow control
//! on), culvertd and `culvert connect`. Every transfer is checked by SHA-256.
//!
//! The localproxy is a test peer, not part of the project: it is taken from
//! `../shared/peers/aws-localproxy/localproxy` (relative to the workspace) or from
//! `CULVERT_LOCALPROXY`. Without it every test here fails and says so: a compatibility claim
//! that is not checked is not a claim.
//!
//! What the localproxy needs from a test (`../shared/peers/aws-localproxy/README.md`): a hashed
//! CA directory; connections to a source localproxy opened one at a time (its listen backlog
//! is 0); and no more than its 128 KiB buffer unanswered towards a slow local reader, so every
//! echo here is paced.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use culvert_e2e::*;

/// Echo `n` random bytes through `port` in 32 KiB steps (never more than that unanswered) and
/// check what came back by SHA-256.
fn checked_echo(port: u16, n: usize) {
    let data = random_bytes(n);
    let mut s = connect_local(port);
    let mut back = Vec::with_capacity(n);
    for chunk in data.chunks(32 * 1024) {
        s.write_all(chunk).unwrap();
        let mut got = vec![0u8; chunk.len()];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("echo through port {port} stopped: {e}"));
        back.extend_from_slice(&got);
    }
    assert_eq!(sha256(&back), sha256(&data), "echoed bytes differ");
}

/// `conns` connections opened one after the other (the localproxy's backlog is 0), then
/// `bytes` echoed on each at the same time, checked by SHA-256.
fn concurrent_checked_echo(ports: &[u16], conns: usize, bytes: usize) {
    let streams: Vec<(u16, TcpStream)> = (0..conns)
        .map(|i| {
            let port = ports[i % ports.len()];
            let s = connect_local(port);
            // The connection is carried end to end before the next one is opened.
            let mut s2 = s.try_clone().unwrap();
            s2.write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            s2.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            (port, s)
        })
        .collect();
    let workers: Vec<_> = streams
        .into_iter()
        .map(|(port, mut s)| {
            std::thread::spawn(move || {
                let data = random_bytes(bytes);
                let mut back = Vec::with_capacity(bytes);
                for chunk in data.chunks(32 * 1024) {
                    s.write_all(chunk).unwrap();
                    let mut got = vec![0u8; chunk.len()];
                    s.read_exact(&mut got)
                        .unwrap_or_else(|e| panic!("echo through port {port} stopped: {e}"));
                    back.extend_from_slice(&got);
                }
                assert_eq!(sha256(&back), sha256(&data), "port {port}: bytes differ");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a concurrent connection failed");
    }
}

/// The relay log must not warn about the IP address the localproxy sends as SNI.
fn assert_no_sni_warning(relay: &Relay) {
    let log = relay.proc.log_text();
    assert!(
        !log.contains("Illegal SNI"),
        "the relay warned about an IP-address SNI:\n{log}"
    );
}

/// localproxy source (`source_args`) → culvert-relay → culvertd, echo targets behind it.
/// Returns the relay, the gateway and the localproxy (they stop when dropped).
fn localproxy_source_to_culvertd(
    name: &str,
    services: &[&str],
    source_args: &[&str],
) -> (Relay, Proc, Proc) {
    let dir = scratch(name);
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel(name, services);
    let targets: Vec<(&str, String)> = services.iter().map(|s| (*s, echo.to_string())).collect();
    let rules = rules(&dir, &targets);
    let gw = relay.gateway(&dir, &rules, &t.destination);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let lp = spawn_localproxy(&relay, &dir, &t.source, None, source_args, "localproxy-src");
    relay.wait_side(&t.id, "source", "CONNECTED");
    (relay, gw, lp)
}

#[test]
fn localproxy_source_v3_two_services_to_culvertd() {
    let (p1, p2) = (free_port(), free_port());
    let map = format!("ECHO={p1},OTHER={p2}");
    let (relay, _gw, _lp) =
        localproxy_source_to_culvertd("lp-src-v3", &["ECHO", "OTHER"], &["-s", &map]);
    for port in [p1, p2] {
        for _ in 0..3 {
            checked_echo(port, 256 * 1024);
        }
    }
    assert_no_sni_warning(&relay);
}

#[test]
fn localproxy_source_v2_format_to_culvertd() {
    let (p1, p2) = (free_port(), free_port());
    let map = format!("ECHO={p1},OTHER={p2}");
    let (relay, _gw, _lp) =
        localproxy_source_to_culvertd("lp-src-v2", &["ECHO", "OTHER"], &["-s", &map, "-y", "V2"]);
    // V2: one connection per service at a time; each new one is a new stream.
    for port in [p1, p2, p1] {
        checked_echo(port, 256 * 1024);
    }
    assert_no_sni_warning(&relay);
}

#[test]
fn localproxy_source_v1_format_single_service_to_culvertd() {
    let port = free_port();
    let (relay, _gw, _lp) = localproxy_source_to_culvertd(
        "lp-src-v1",
        &["ECHO"],
        &["-s", &port.to_string(), "-y", "V1"],
    );
    for _ in 0..3 {
        checked_echo(port, 128 * 1024);
    }
    assert_no_sni_warning(&relay);
}

#[test]
fn twenty_concurrent_connections_from_a_localproxy_source_on_two_services() {
    let (p1, p2) = (free_port(), free_port());
    let map = format!("ECHO={p1},OTHER={p2}");
    let _running = localproxy_source_to_culvertd("lp-src-20", &["ECHO", "OTHER"], &["-s", &map]);
    concurrent_checked_echo(&[p1, p2], 20, 1024 * 1024);
}

/// culvert connect (`connect_args`) → culvert-relay → localproxy destination
/// (`destination_args`); returns the relay, the proxy and its ports.
fn culvert_connect_to_localproxy(
    dir: &Path,
    services: &[&str],
    destination_args: &[String],
    connect_args: &[&str],
) -> (Relay, Proc, Proc, std::collections::HashMap<String, u16>) {
    let relay = Relay::start(dir);
    let t = relay.open_tunnel("lp-dst", services);
    let args: Vec<&str> = destination_args.iter().map(String::as_str).collect();
    let lp = spawn_localproxy(&relay, dir, &t.destination, None, &args, "localproxy-dst");
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (px, ports) = relay.proxy_with(dir, &t.source, services, connect_args);
    relay.wait_side(&t.id, "source", "CONNECTED");
    (relay, lp, px, ports)
}

#[test]
fn culvert_connect_v3_to_localproxy_destination_two_services() {
    let dir = scratch("lp-dst-v3");
    let echo = echo_server();
    let d = vec!["-d".to_owned(), format!("ECHO={echo},OTHER={echo}")];
    let (relay, _lp, px, ports) = culvert_connect_to_localproxy(&dir, &["ECHO", "OTHER"], &d, &[]);
    for _ in 0..3 {
        checked_echo(ports["ECHO"], 256 * 1024);
        checked_echo(ports["OTHER"], 256 * 1024);
    }
    assert!(
        !px.log_text().contains("flow control on"),
        "flow control must stay off with an AWS destination:\n{}",
        px.log_text()
    );
    assert_no_sni_warning(&relay);
}

#[test]
fn culvert_connect_v2_format_to_localproxy_destination() {
    let dir = scratch("lp-dst-v2");
    let echo = echo_server();
    let d = vec!["-d".to_owned(), format!("ECHO={echo},OTHER={echo}")];
    let (_relay, _lp, _px, ports) =
        culvert_connect_to_localproxy(&dir, &["ECHO", "OTHER"], &d, &["--format", "V2"]);
    for port in [ports["ECHO"], ports["OTHER"], ports["ECHO"]] {
        checked_echo(port, 256 * 1024);
    }
}

#[test]
fn culvert_connect_v1_format_to_localproxy_destination_single_service() {
    let dir = scratch("lp-dst-v1");
    let echo = echo_server();
    // A V1 destination: its single target without a service id, and `-y V1`, which a
    // localproxy 3.x needs to accept V1-format streams (without it, it throws on the first
    // STREAM_START that names no service, as it does against AWS).
    let d = vec![
        "-d".to_owned(),
        echo.to_string(),
        "-y".to_owned(),
        "V1".to_owned(),
    ];
    let (_relay, _lp, _px, ports) =
        culvert_connect_to_localproxy(&dir, &["ECHO"], &d, &["--format", "V1"]);
    for _ in 0..3 {
        checked_echo(ports["ECHO"], 128 * 1024);
    }
}

#[test]
fn twenty_concurrent_connections_to_a_localproxy_destination_on_two_services() {
    let dir = scratch("lp-dst-20");
    let echo = echo_server();
    let d = vec!["-d".to_owned(), format!("ECHO={echo},OTHER={echo}")];
    let (_relay, _lp, _px, ports) =
        culvert_connect_to_localproxy(&dir, &["ECHO", "OTHER"], &d, &[]);
    concurrent_checked_echo(&[ports["ECHO"], ports["OTHER"]], 20, 1024 * 1024);
}

/// Two localproxies through culvert-relay, each holding a client token.
struct LpPair {
    dir: PathBuf,
    relay: Relay,
    tunnel: Tunnel,
    src: Proc,
    dst: Proc,
    port: u16,
}

fn localproxy_pair(name: &str, destination_first: bool, relay_args: &[String]) -> LpPair {
    let dir = scratch(name);
    let echo = echo_server();
    let relay = Relay::start_with(&dir, "127.0.0.1:0".parse().unwrap(), relay_args);
    let t = relay.open_tunnel(name, &["ECHO"]);
    let port = free_port();
    let (src_ct, dst_ct) = (
        culvert_protocol::new_client_token(),
        culvert_protocol::new_client_token(),
    );
    let dst_args = ["-d".to_owned(), format!("ECHO={echo}")];
    let src_args = ["-s".to_owned(), format!("ECHO={port}")];
    let start = |mode: &str| {
        let (token, ct, args, name) = if mode == "destination" {
            (&t.destination, &dst_ct, &dst_args, "localproxy-dst")
        } else {
            (&t.source, &src_ct, &src_args, "localproxy-src")
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = spawn_localproxy(&relay, &dir, token, Some(ct), &args, name);
        relay.wait_side(&t.id, mode, "CONNECTED");
        p
    };
    let (src, dst) = if destination_first {
        let d = start("destination");
        (start("source"), d)
    } else {
        let s = start("source");
        (s, start("destination"))
    };
    LpPair {
        dir,
        relay,
        tunnel: t,
        src,
        dst,
        port,
    }
}

#[test]
fn localproxy_to_localproxy_destination_first_as_the_aws_tutorial_does() {
    let mut p = localproxy_pair("lp-lp-dst-first", true, &[]);
    checked_echo(p.port, 512 * 1024);
    checked_echo(p.port, 64 * 1024);
    assert_no_sni_warning(&p.relay);
    // Closing the tunnel ends both localproxies with status 0, as against AWS.
    p.relay.api(&["tunnel", "close", &p.tunnel.id]);
    assert_eq!(p.src.wait_exit(), 0, "{}", p.src.log_text());
    assert_eq!(p.dst.wait_exit(), 0, "{}", p.dst.log_text());
}

#[test]
fn localproxy_to_localproxy_source_first() {
    let p = localproxy_pair("lp-lp-src-first", false, &[]);
    checked_echo(p.port, 512 * 1024);
    checked_echo(p.port, 64 * 1024);
}

/// Stop the relay with `signal` mid-tunnel and start it again on the same address and state:
/// both localproxies stay up, reconnect with their client tokens, and new connections work.
fn localproxies_survive_a_relay_restart(name: &str, signal: &str) {
    let grace = ["--shutdown-grace-secs".to_owned(), "1".to_owned()];
    let mut p = localproxy_pair(name, true, &grace);
    checked_echo(p.port, 256 * 1024);
    let addr = p.relay.addr;
    p.relay.proc.signal(signal);
    let code = p.relay.proc.wait_exit();
    if signal == "TERM" {
        assert_eq!(code, 0, "graceful stop:\n{}", p.relay.proc.log_text());
    }
    assert!(
        p.src.is_running() && p.dst.is_running(),
        "a localproxy quit when the relay stopped ({signal}):\nsource:\n{}\ndestination:\n{}",
        p.src.log_text(),
        p.dst.log_text()
    );
    p.relay = Relay::start_with(&p.dir, addr, &grace);
    p.relay.wait_side(&p.tunnel.id, "destination", "CONNECTED");
    p.relay.wait_side(&p.tunnel.id, "source", "CONNECTED");
    checked_echo(p.port, 256 * 1024);
    checked_echo(p.port, 64 * 1024);
    assert!(p.src.is_running() && p.dst.is_running());
}

#[test]
fn localproxies_survive_a_graceful_relay_restart() {
    localproxies_survive_a_relay_restart("lp-restart-term", "TERM");
}

#[test]
fn localproxies_survive_a_relay_crash() {
    localproxies_survive_a_relay_restart("lp-restart-kill", "KILL");
}

/// The localproxy is refused (4xx) and exits without ever listening on its port.
fn refused_localproxy_exits_without_listening(
    name: &str,
    args: &[&str],
    token: &str,
    relay: &Relay,
    dir: &Path,
    port: u16,
) {
    let mut lp = spawn_localproxy(relay, dir, token, None, args, name);
    wait_for(&format!("{name} to exit after the refusal"), || {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{name} opened its listener although its token was refused:\n{}",
            lp.log_text()
        );
        (!lp.is_running()).then_some(())
    });
    assert_eq!(lp.wait_exit(), 0, "{}", lp.log_text());
}

#[test]
fn wrong_tokens_make_the_localproxy_exit_without_a_listener() {
    let dir = scratch("lp-wrong");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-wrong", &["ECHO"]);
    let port = free_port();
    let map = format!("ECHO={port}");
    // A token the relay never issued.
    refused_localproxy_exits_without_listening(
        "lp-unknown",
        &["-s", &map],
        "not-a-token",
        &relay,
        &dir,
        port,
    );
    // The destination's token used as a source.
    refused_localproxy_exits_without_listening(
        "lp-wrong-mode",
        &["-s", &map],
        &t.destination,
        &relay,
        &dir,
        port,
    );
    // A rotated token.
    let old = t.source.clone();
    relay.api(&["tunnel", "rotate", &t.id, "--mode", "source"]);
    refused_localproxy_exits_without_listening(
        "lp-rotated",
        &["-s", &map],
        &old,
        &relay,
        &dir,
        port,
    );
    let log = relay.proc.log_text();
    assert!(!log.contains("peer connected"), "{log}");
}

/// A script written for the localproxy runs with `culvert connect` in its place: the same
/// arguments and environment (`-e HOST:PORT -c DIR -s/-d … -v 5`, AWSIOT_TUNNEL_ACCESS_TOKEN and
/// AWSIOT_TUNNEL_CLIENT_TOKEN, none of culvert's own settings), as the tunnel's destination with
/// the real localproxy as its source, and as the source with the localproxy as the destination.
#[test]
fn culvert_connect_runs_the_localproxy_command_line_on_either_side() {
    let dir = scratch("lp-command-line");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let cadir = localproxy_ca_dir(&relay, &dir);
    let culvert = bin("culvert");
    let lp = localproxy();
    let run = |program: &Path, token: &str, mapping: [String; 2], name: &str| {
        let mut cmd = Command::new(program);
        if program == culvert {
            cmd.arg("connect");
        }
        cmd.arg("-e")
            .arg(relay.addr.to_string())
            .arg("-c")
            .arg(&cadir)
            .args(&mapping)
            .args(["-v", "5"])
            .env("AWSIOT_TUNNEL_ACCESS_TOKEN", token)
            .env(
                "AWSIOT_TUNNEL_CLIENT_TOKEN",
                culvert_protocol::new_client_token(),
            );
        for var in [
            "CULVERT_RELAY",
            "CULVERT_CA",
            "CULVERT_ACCESS_TOKEN",
            "CULVERT_CLIENT_TOKEN",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        Proc::spawn_logging_stdout(name, &mut cmd, &dir)
    };
    let destination = || ["-d".to_owned(), format!("ECHO={echo}")];
    for (i, (dst_program, src_program)) in
        [(&culvert, &lp), (&lp, &culvert)].into_iter().enumerate()
    {
        let t = relay.open_tunnel(&format!("lp-command-line-{i}"), &["ECHO"]);
        let dst = run(dst_program, &t.destination, destination(), "destination");
        relay.wait_side(&t.id, "destination", "CONNECTED");
        let port = free_port();
        let src = run(
            src_program,
            &t.source,
            ["-s".to_owned(), format!("ECHO={port}")],
            "source",
        );
        relay.wait_side(&t.id, "source", "CONNECTED");
        checked_echo(port, 1024 * 1024);
        let ours = if dst_program == &culvert { &dst } else { &src };
        assert!(
            ours.log_text().contains("DEBUG"),
            "-v 5 is debug logging:\n{}",
            ours.log_text()
        );
        drop((src, dst));
    }
    assert_no_sni_warning(&relay);
}

/// A V1-format source (`-y V1`, as for the AWS console's browser SSH or the Device Client)
/// against a default (V3) localproxy destination: no flag on the destination, the relay
/// translates.
#[test]
fn a_v1_format_localproxy_source_reaches_a_v3_localproxy_destination_without_a_flag() {
    let dir = scratch("lp-v1-v3");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-v1-v3", &["SSH"]);
    let dst_args = ["-d".to_owned(), format!("SSH={echo}")];
    let args: Vec<&str> = dst_args.iter().map(String::as_str).collect();
    let _dst = spawn_localproxy(&relay, &dir, &t.destination, None, &args, "localproxy-dst");
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let port = free_port();
    let _src = spawn_localproxy(
        &relay,
        &dir,
        &t.source,
        None,
        &["-s", &port.to_string(), "-y", "V1"],
        "localproxy-src",
    );
    relay.wait_side(&t.id, "source", "CONNECTED");
    for _ in 0..3 {
        checked_echo(port, 128 * 1024);
    }
}

/// A peer that offers only subprotocol 1.0 (as AWS's V1-only clients do) as the destination,
/// and a default (V3) localproxy source: the relay strips what V1 has no field for, and gives
/// the V1 side's answers the tunnel's service.
#[test]
fn a_v1_only_destination_answers_a_default_v3_localproxy_source() {
    use culvert_protocol::frame::{FrameReader, decode, encode_to_bytes};
    use culvert_protocol::{Message, MessageType};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let dir = scratch("lp-v3-v1");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("lp-v3-v1", &["SSH"]);
    let port = free_port();
    let rt = culvert_e2e::raw::runtime();
    let mut dst = rt.block_on(async {
        let mut req = format!("wss://{}/tunnel?local-proxy-mode=destination", relay.addr)
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert("access-token", t.destination.parse().unwrap());
        h.insert(
            "sec-websocket-protocol",
            "aws.iot.securetunneling-1.0".parse().unwrap(),
        );
        let tls = culvert_protocol::client::tls_config(Some(&relay.ca)).unwrap();
        let (ws, resp) = tokio_tungstenite::connect_async_tls_with_config(
            req,
            None,
            false,
            Some(tokio_tungstenite::Connector::Rustls(tls)),
        )
        .await
        .unwrap();
        assert_eq!(
            resp.headers()["sec-websocket-protocol"],
            "aws.iot.securetunneling-1.0"
        );
        ws
    });
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let _src = spawn_localproxy(
        &relay,
        &dir,
        &t.source,
        None,
        &["-s", &format!("SSH={port}")],
        "localproxy-src",
    );
    relay.wait_side(&t.id, "source", "CONNECTED");
    let mut app = connect_local(port);
    app.write_all(b"ping").unwrap();
    // What the V1 side receives: a V1 STREAM_START and DATA, without service or connection ids.
    let got: Vec<Message> = rt.block_on(async {
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = tokio::time::timeout(WAIT, dst.next())
                .await
                .expect("the V1 destination heard from the source")
                .unwrap()
                .unwrap();
            let Ws::Binary(data) = m else { continue };
            reader
                .feed::<culvert_protocol::frame::FrameError>(data, |body| {
                    got.push(decode(body)?);
                    Ok(())
                })
                .unwrap();
        }
        got
    });
    assert_eq!(got[0].kind(), Some(MessageType::StreamStart), "{got:?}");
    assert_eq!(got[1].kind(), Some(MessageType::Data), "{got:?}");
    for m in &got {
        assert_eq!((m.service_id.as_str(), m.connection_id), ("", 0), "{m:?}");
    }
    assert_eq!(&got[1].payload[..], b"ping");
    // The V1 side answers as V1 does; the localproxy's client reads the answer.
    let stream = got[0].stream_id;
    rt.block_on(async {
        let f = encode_to_bytes(&Message {
            r#type: MessageType::Data as i32,
            stream_id: stream,
            payload: bytes::Bytes::from_static(b"pong"),
            ..Message::default()
        })
        .unwrap();
        dst.send(Ws::Binary(f)).await.unwrap();
    });
    let mut answer = [0u8; 4];
    app.read_exact(&mut answer)
        .expect("the V1 answer reached the localproxy's client");
    assert_eq!(&answer, b"pong");
}
