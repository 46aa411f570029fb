//! culvert's extensions are negotiated in the WebSocket handshake (`culvert-extensions`
//! header, answered in the 101): a peer that did not offer them, as no AWS client does, never
//! receives an extension message, whichever side connects first; culvert's own ends get them
//! only from a relay that accepted their offer, and only from each other.

use bytes::Bytes;
use culvert_e2e::raw::{self, Extensions, Ws};
use culvert_e2e::*;
use culvert_protocol::client::RelayStream;
use culvert_protocol::ext::is_extension_type;
use culvert_protocol::flow::{self, Hello};
use culvert_protocol::frame::{FrameError, FrameReader, decode, encode_to_bytes};
use culvert_protocol::{Message, MessageType, Mode};
use futures_util::StreamExt;

/// Read messages until one of type `until` arrives; returns every message read, in order.
async fn read_until(ws: &mut RelayStream, until: MessageType) -> Vec<Message> {
    let mut reader = FrameReader::new();
    let mut got: Vec<Message> = Vec::new();
    while !got.iter().any(|m| m.kind() == Some(until)) {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {until:?} arrived; got {got:?}"))
            .expect("the relay kept the connection open")
            .expect("a valid WebSocket message");
        let Ws::Binary(data) = m else { continue };
        reader
            .feed::<FrameError>(data, |body| {
                got.push(decode(body)?);
                Ok(())
            })
            .unwrap();
    }
    got
}

fn extension_messages(msgs: &[Message]) -> Vec<&Message> {
    msgs.iter()
        .filter(|m| is_extension_type(m.r#type) || m.ignorable)
        .collect()
}

/// What a culvert source sends: its own HELLO and a credit update around a stream start and a
/// DATA frame, all in one WebSocket message, so the relay must cut the extension messages out
/// of the middle of a message for an AWS peer.
fn culvert_source_burst() -> Bytes {
    let hello = Hello {
        from: "source".into(),
        features: vec![flow::FEATURE.into()],
        window: flow::DEFAULT_WINDOW,
        budget: flow::DEFAULT_BUDGET,
        confirm: false,
        reply: false,
        epoch: 0,
    }
    .to_message();
    let mut b = Vec::new();
    for m in [
        hello.clone(),
        flow::window_update(1, "SSH", 1, 65_536),
        Message::stream_start(1, "SSH", 1),
        hello,
        culvert_protocol::ext::fin(1, "SSH", 1),
        Message::data(1, "SSH", 1, Bytes::from_static(b"after the hello")),
    ] {
        b.extend_from_slice(&encode_to_bytes(&m).unwrap());
    }
    Bytes::from(b)
}

/// An AWS destination and a culvert source, in either order of connection.
fn aws_peer_sees_no_extension(destination_first: bool) {
    let dir = scratch("ext-aws");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("ext-aws", &["SSH"]);
    let log = || relay.proc.log_text();
    raw::runtime().block_on(async {
        let ct = culvert_protocol::new_client_token();
        let connect_dst = || {
            raw::connect_offering(
                &relay,
                &t.destination,
                Mode::Destination,
                None,
                Extensions::NONE,
            )
        };
        let connect_src =
            || raw::connect_offering(&relay, &t.source, Mode::Source, Some(&ct), Extensions::ALL);
        let (dst, src) = if destination_first {
            let d = connect_dst().await.unwrap();
            relay.wait_side(&t.id, "destination", "CONNECTED");
            (d, connect_src().await.unwrap())
        } else {
            let s = connect_src().await.unwrap();
            relay.wait_side(&t.id, "source", "CONNECTED");
            (connect_dst().await.unwrap(), s)
        };
        assert_eq!(
            dst.extensions,
            Extensions::NONE,
            "nothing offered, nothing accepted"
        );
        assert_eq!(
            src.extensions,
            Extensions::ALL,
            "the relay accepted the culvert source's offer"
        );
        let (mut dst, mut src) = (dst.ws, src.ws);
        relay.wait_side(&t.id, "destination", "CONNECTED");
        relay.wait_side(&t.id, "source", "CONNECTED");

        raw::send(&mut src, Ws::Binary(culvert_source_burst())).await;
        let got = read_until(&mut dst, MessageType::Data).await;
        assert!(
            extension_messages(&got).is_empty(),
            "the AWS destination received extension messages: {got:?}\nrelay log:\n{}",
            log()
        );
        let kinds: Vec<_> = got.iter().map(Message::kind).collect();
        assert_eq!(
            kinds,
            [
                MessageType::ServiceIds,
                MessageType::StreamStart,
                MessageType::Data
            ]
            .map(Some),
            "SERVICE_IDS first, then exactly what the source sent, extensions cut out"
        );
        assert_eq!(&got[2].payload[..], b"after the hello");

        // The culvert source did hear the relay's HELLO; the AWS destination's answer reaches it.
        raw::send(
            &mut dst,
            Ws::Binary(
                encode_to_bytes(&Message::data(1, "SSH", 1, Bytes::from_static(b"back"))).unwrap(),
            ),
        )
        .await;
        let got = read_until(&mut src, MessageType::Data).await;
        assert!(
            got.iter()
                .any(|m| Hello::from_message(m).is_some_and(|h| h.from == "relay")),
            "the culvert source was offered flow control: {got:?}"
        );
        assert_eq!(&got.last().unwrap().payload[..], b"back");
    });
    assert!(!log().contains("protocol violation"), "{}", log());
}

#[test]
fn an_aws_destination_that_connects_first_never_sees_an_extension_message() {
    aws_peer_sees_no_extension(true);
}

#[test]
fn an_aws_destination_that_connects_second_never_sees_an_extension_message() {
    aws_peer_sees_no_extension(false);
}

#[test]
fn culvert_peers_exchange_extension_messages_through_the_relay() {
    let dir = scratch("ext-culvert");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("ext-culvert", &["SSH"]);
    raw::runtime().block_on(async {
        let ct = culvert_protocol::new_client_token();
        let dst = raw::connect_offering(
            &relay,
            &t.destination,
            Mode::Destination,
            None,
            Extensions::ALL,
        )
        .await
        .unwrap();
        relay.wait_side(&t.id, "destination", "CONNECTED");
        let src =
            raw::connect_offering(&relay, &t.source, Mode::Source, Some(&ct), Extensions::ALL)
                .await
                .unwrap();
        assert_eq!(
            (dst.extensions, src.extensions),
            (Extensions::ALL, Extensions::ALL)
        );
        let (mut dst, mut src) = (dst.ws, src.ws);
        relay.wait_side(&t.id, "source", "CONNECTED");
        raw::send(&mut src, Ws::Binary(culvert_source_burst())).await;
        let got = read_until(&mut dst, MessageType::Data).await;
        let hellos: Vec<_> = got.iter().filter_map(Hello::from_message).collect();
        assert!(hellos.iter().any(|h| h.from == "relay"), "{got:?}");
        assert_eq!(
            hellos.iter().filter(|h| h.from == "source").count(),
            2,
            "the source's HELLOs were forwarded: {got:?}"
        );
        assert!(
            got.iter().any(|m| m.r#type == flow::WINDOW_UPDATE),
            "{got:?}"
        );
        drop(src);
    });
}

#[test]
fn a_relay_without_flow_control_accepts_only_restart_and_announces_nothing() {
    let dir = scratch("ext-off");
    let relay = Relay::start_with(
        &dir,
        "127.0.0.1:0".parse().unwrap(),
        &["--no-flow-control".into()],
    );
    let t = relay.open_tunnel("ext-off", &["SSH"]);
    let restart_only = Extensions {
        flow_control: false,
        restart: true,
        resume: false,
    };
    raw::runtime().block_on(async {
        let ct = culvert_protocol::new_client_token();
        let dst = raw::connect_offering(
            &relay,
            &t.destination,
            Mode::Destination,
            None,
            Extensions::ALL,
        )
        .await
        .unwrap();
        let src =
            raw::connect_offering(&relay, &t.source, Mode::Source, Some(&ct), Extensions::ALL)
                .await
                .unwrap();
        assert_eq!(
            (dst.extensions, src.extensions),
            (restart_only, restart_only)
        );
        let (mut dst, mut src) = (dst.ws, src.ws);
        relay.wait_side(&t.id, "source", "CONNECTED");
        relay.wait_side(&t.id, "destination", "CONNECTED");
        raw::send(&mut src, Ws::Binary(culvert_source_burst())).await;
        let got = read_until(&mut dst, MessageType::Data).await;
        assert!(extension_messages(&got).is_empty(), "{got:?}");
        raw::send(
            &mut dst,
            Ws::Binary(
                encode_to_bytes(&Message::data(1, "SSH", 1, Bytes::from_static(b"back"))).unwrap(),
            ),
        )
        .await;
        let got = read_until(&mut src, MessageType::Data).await;
        assert!(extension_messages(&got).is_empty(), "{got:?}");
    });
}
