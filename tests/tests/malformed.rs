//! Malformed input closes only the peer that sent it, with a reason; other tunnels keep flowing
//! and the other side of the same tunnel stays connected.

use bytes::Bytes;
use culvert_e2e::raw::{self, Ws, closed_with, send};
use culvert_e2e::*;
use culvert_protocol::frame::encode_to_bytes;
use culvert_protocol::{Message, Mode};

fn frame(m: &Message) -> Bytes {
    encode_to_bytes(m).unwrap()
}

#[test]
fn malformed_input_closes_only_the_offender() {
    let dir = scratch("malformed");
    let echo = echo_server();
    let relay = Relay::start(&dir);

    // A healthy tunnel that must keep working throughout.
    let good = relay.open_tunnel("healthy", &["ECHO"]);
    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let _gw = relay.gateway(&dir, &rules, &good.destination);
    let (_px, ports) = relay.proxy(&dir, &good.source, &["ECHO"]);
    assert!(echo_works(ports["ECHO"], b"baseline"));

    // One byte over the DATA payload limit (the frame itself still fits the 2-byte length).
    let big_wire = frame(&Message::data(1, "SSH", 1, Bytes::from(vec![0u8; 64_513])));
    let cases: Vec<(&str, Mode, Vec<Ws>, &str)> = vec![
        (
            "garbage bytes",
            Mode::Source,
            vec![Ws::Binary(Bytes::from_static(&[0, 3, 0xff, 0xff, 0xff]))],
            "does not decode",
        ),
        (
            "oversized payload",
            Mode::Source,
            vec![
                Ws::Binary(frame(&Message::stream_start(1, "SSH", 1))),
                Ws::Binary(big_wire),
            ],
            "exceeds",
        ),
        (
            "oversized WebSocket message",
            Mode::Source,
            vec![Ws::Binary(Bytes::from(vec![0u8; 200_000]))],
            "message too big",
        ),
        (
            "text frame",
            Mode::Source,
            vec![Ws::Text("hello".into())],
            "text",
        ),
        (
            "destination sending STREAM_START",
            Mode::Destination,
            vec![Ws::Binary(frame(&Message::stream_start(1, "SSH", 1)))],
            "may not be sent by a destination",
        ),
        (
            "frame for an unknown stream",
            Mode::Source,
            vec![Ws::Binary(frame(&Message::data(
                7,
                "SSH",
                1,
                Bytes::from_static(b"x"),
            )))],
            "never started",
        ),
        (
            "unknown service",
            Mode::Source,
            vec![Ws::Binary(frame(&Message::stream_start(1, "VNC", 1)))],
            "not one of this tunnel's services",
        ),
    ];
    let rt = raw::runtime();
    for (what, offender, msgs, reason_has) in cases {
        let t = relay.open_tunnel("offender", &["SSH"]);
        let ct_src = culvert_protocol::new_client_token();
        let ct_dst = culvert_protocol::new_client_token();
        rt.block_on(async {
            let mut src = raw::connect(&relay, &t.source, Mode::Source, Some(&ct_src))
                .await
                .unwrap();
            let mut dst = raw::connect(&relay, &t.destination, Mode::Destination, Some(&ct_dst))
                .await
                .unwrap();
            relay.wait_side(&t.id, "destination", "CONNECTED");
            relay.wait_side(&t.id, "source", "CONNECTED");
            let (bad, survivor) = match offender {
                Mode::Source => (&mut src, "destination"),
                Mode::Destination => (&mut dst, "source"),
            };
            for m in msgs {
                send(bad, m).await;
            }
            let (code, reason) = closed_with(bad).await;
            let expected = if reason_has == "message too big" {
                1009
            } else {
                1008
            };
            assert_eq!(code, expected, "{what}: close code (reason {reason:?})");
            assert!(reason.contains(reason_has), "{what}: reason {reason:?}");
            let side = match offender {
                Mode::Source => "source",
                Mode::Destination => "destination",
            };
            relay.wait_side(&t.id, side, "DISCONNECTED");
            assert_eq!(
                relay.describe(&t.id)[format!("{survivor}ConnectionState")]["status"],
                "CONNECTED",
                "{what}: the other side of the tunnel stays connected"
            );
        });
        assert!(
            echo_works(ports["ECHO"], what.as_bytes()),
            "{what}: healthy tunnel broke"
        );
    }
    assert!(
        relay.proc.log_text().contains("protocol violation"),
        "violations are logged"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
