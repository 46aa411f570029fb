//! Frames split across WebSocket messages are reassembled by the relay and forwarded in
//! WebSocket messages that respect the protocol's 131 076-byte limit, frames intact.

use bytes::Bytes;
use culvert_e2e::raw::{self, Ws};
use culvert_e2e::*;
use culvert_protocol::frame::{FrameError, FrameReader, decode, encode_to_bytes};
use culvert_protocol::message::{MAX_PAYLOAD, MAX_WS_MESSAGE};
use culvert_protocol::{Message, MessageType, Mode};
use futures_util::StreamExt;

#[test]
fn split_frames_are_forwarded_within_the_message_limit() {
    let dir = scratch("framing");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("framing", &["SSH"]);
    raw::runtime().block_on(async {
        let ct = culvert_protocol::new_client_token();
        let mut src = raw::connect(&relay, &t.source, Mode::Source, Some(&ct))
            .await
            .unwrap();
        let mut dst = raw::connect(&relay, &t.destination, Mode::Destination, None)
            .await
            .unwrap();
        relay.wait_side(&t.id, "source", "CONNECTED");
        let payloads: Vec<Bytes> = (0..3u8)
            .map(|i| Bytes::from(vec![i; MAX_PAYLOAD]))
            .collect();
        let frames: Vec<Bytes> = payloads
            .iter()
            .map(|p| encode_to_bytes(&Message::data(1, "SSH", 1, p.clone())).unwrap())
            .collect();
        // Message A: the start and all but the last 100 bytes of frame 0. Message B: the rest
        // of frame 0 and frames 1 and 2 whole, so that one WebSocket message completes three
        // full frames (more than 131 076 bytes together).
        let cut = frames[0].len() - 100;
        let mut a = encode_to_bytes(&Message::stream_start(1, "SSH", 1))
            .unwrap()
            .to_vec();
        a.extend_from_slice(&frames[0][..cut]);
        let mut b = frames[0][cut..].to_vec();
        b.extend_from_slice(&frames[1]);
        b.extend_from_slice(&frames[2]);
        assert!(
            b.len() <= MAX_WS_MESSAGE
                && frames.iter().map(|f| f.len()).sum::<usize>() > MAX_WS_MESSAGE
        );
        raw::send(&mut src, Ws::Binary(Bytes::from(a))).await;
        raw::send(&mut src, Ws::Binary(Bytes::from(b))).await;

        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        while got.len() < 4 {
            let m = tokio::time::timeout(WAIT, dst.next())
                .await
                .expect("the destination received everything")
                .expect("stream open")
                .expect("every WebSocket message the relay sends fits the limit");
            let Ws::Binary(data) = m else { continue };
            assert!(
                data.len() <= MAX_WS_MESSAGE,
                "message of {} bytes",
                data.len()
            );
            reader
                .feed::<FrameError>(data, |body| {
                    let msg = decode(body)?;
                    // A plain AWS client: SERVICE_IDS first, and never an extension message.
                    assert!(!msg.ignorable, "an AWS client got {msg:?}");
                    if msg.kind() != Some(MessageType::ServiceIds) {
                        got.push(msg);
                    }
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(got[0].kind(), Some(MessageType::StreamStart));
        for (i, p) in payloads.iter().enumerate() {
            assert_eq!(&got[i + 1].payload, p, "frame {i} arrived intact");
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
