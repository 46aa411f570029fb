//! The relay's forwarding of frames from both sides of a tunnel (rules, chunking, extension
//! messages, resets for an absent side) on arbitrary input: never a panic; every chunk is whole
//! frames within one WebSocket message, and ends its message exactly when its last frame is a
//! start; a peer that did not negotiate extensions never gets an extension message.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use culvert_protocol::Mode;
use culvert_protocol::ext::{self, Extensions};
use culvert_protocol::forward::Inbound;
use culvert_protocol::frame::{self, FrameError, FrameReader};
use culvert_protocol::message::{MAX_WS_MESSAGE, MessageType};
use culvert_protocol::rules::FrameRules;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Step {
    from_source: bool,
    /// The other side is connected.
    other_there: bool,
    /// The other side was just replaced: this peer is told, and must answer.
    peer_changed: bool,
    data: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    services: u8,
    src_ext: bool,
    dst_ext: bool,
    steps: Vec<Step>,
}

fn ext(on: bool) -> Extensions {
    if on {
        Extensions::ALL
    } else {
        Extensions::NONE
    }
}

fuzz_target!(|input: Input| {
    let services: Vec<String> = (0..input.services % 4 + 1)
        .map(|i| format!("S{i}"))
        .collect();
    let mut rules = FrameRules::new(services);
    let mut src = Inbound::new(Mode::Source, ext(input.src_ext));
    let mut dst = Inbound::new(Mode::Destination, ext(input.dst_ext));
    let mut dead = (false, false);
    let mut awaiting = (None, None);
    let mut epoch = 0;
    for step in input.steps.into_iter().take(64) {
        let (side, other_ext, dead, awaiting) = if step.from_source {
            (&mut src, ext(input.dst_ext), &mut dead.0, &mut awaiting.0)
        } else {
            (&mut dst, ext(input.src_ext), &mut dead.1, &mut awaiting.1)
        };
        if step.peer_changed {
            epoch += 1;
            *awaiting = Some(epoch);
        }
        let was_awaiting = awaiting.is_some();
        if *dead {
            continue;
        }
        let other = step.other_there.then_some(other_ext);
        match side.feed(Bytes::from(step.data), &mut rules, other, awaiting) {
            Err(_) => *dead = true, // the relay closes this peer
            Ok(f) => {
                if other.is_none() {
                    assert_eq!(f.chunks().count(), 0, "nothing for an absent side");
                }
                // Until the peer answered, no start of its reaches the other side.
                let still_awaiting = was_awaiting && awaiting.is_some();
                let mut reader = FrameReader::new();
                for c in f.chunks() {
                    assert!(c.bytes.len() <= MAX_WS_MESSAGE);
                    let mut last_start = false;
                    reader
                        .feed::<FrameError>(c.bytes.clone(), |body| {
                            let m = frame::decode(body).expect("forwarded frames were checked");
                            if other == Some(Extensions::NONE) {
                                assert!(
                                    !ext::is_extension_type(m.r#type),
                                    "extension to an AWS peer"
                                );
                            }
                            last_start = matches!(
                                m.kind(),
                                Some(MessageType::StreamStart | MessageType::ConnectionStart)
                            );
                            assert!(
                                !(last_start && still_awaiting),
                                "a stale start was forwarded"
                            );
                            Ok(())
                        })
                        .expect("chunks are whole frames");
                    assert_eq!(
                        c.ends_message, last_start,
                        "a chunk ends its message after a start frame"
                    );
                }
            }
        }
    }
});
