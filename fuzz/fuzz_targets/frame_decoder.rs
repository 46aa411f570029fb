//! The frame reader and decoder on arbitrary bytes, cut into WebSocket messages at arbitrary
//! points: never a panic; every frame comes out once, whole, whatever the cuts; and the
//! allocation-free decoder agrees with prost's wherever it gives an answer.
#![no_main]

use bytes::Bytes;
use culvert_protocol::frame::{self, FrameError, FrameReader};
use culvert_protocol::message::MessageRef;
use libfuzzer_sys::fuzz_target;

fn frames(data: &[u8], cuts: &[u8]) -> (Vec<Bytes>, Option<FrameError>) {
    let mut reader = FrameReader::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut cuts = cuts.iter().map(|c| *c as usize + 1);
    while at < data.len() {
        let n = cuts.next().unwrap_or(data.len()).min(data.len() - at);
        let piece = Bytes::copy_from_slice(&data[at..at + n]);
        at += n;
        let fed = reader.feed::<FrameError>(piece, |body| {
            out.push(body);
            Ok(())
        });
        if let Err(e) = fed {
            return (out, Some(e));
        }
    }
    (out, None)
}

fuzz_target!(|input: &[u8]| {
    // The first byte says where the stream is cut into WebSocket messages (every n+1 bytes),
    // the rest is the stream: the seed corpus is plain encoded frames behind one byte.
    let Some((&step, data)) = input.split_first() else {
        return;
    };
    let cuts = vec![step; data.len()];
    let (whole, err_whole) = frames(data, &[]);
    let (cut, err_cut) = frames(data, &cuts);
    assert_eq!(
        whole, cut,
        "the same frames whatever the WebSocket message boundaries"
    );
    assert_eq!(err_whole.is_some(), err_cut.is_some());
    for body in whole {
        let full = frame::decode(body.clone());
        if let Ok(Some(r)) = frame::decode_ref(&body) {
            let full = full.expect("what the fast decoder accepts, prost accepts");
            assert!(r == MessageRef::from(&full), "both decoders agree");
        }
    }
});
