//! One peer's inbound direction through a relay, with no I/O: a WebSocket message in; out,
//! the chunks to forward to the other side, the replies to send back to this peer, or the
//! violation that closes it. Tested in memory below and fuzzed; culvert-relay's data plane
//! drives it between the sockets.
//!
//! Every complete frame is checked against the tunnel's [`FrameRules`] and forwarded verbatim
//! (never re-encoded): in whole frames, at most one WebSocket message ([`MAX_WS_MESSAGE`]) per
//! chunk, each chunk ending after a start frame (see [`frame::is_start_frame`]). Extension
//! messages are cut out for a receiver that did not negotiate them. Frames sent while the other
//! side is absent are answered with a reset of their stream.

use std::ops::Range;

use bytes::Bytes;

use crate::Mode;
use crate::ext::{self, Extensions};
use crate::flow::{self, Hello};
use crate::frame::{self, FrameError, FrameReader};
use crate::message::{MAX_WS_MESSAGE, Message, MessageRef, MessageType};
use crate::rules::{FrameRules, Violation};
use prost::Message as _;

/// Whole frames on their way to a peer.
#[derive(Debug)]
pub struct Chunk {
    pub bytes: Bytes,
    /// The chunk ends with a start frame: it must end its WebSocket message
    /// (see `culvert_protocol::frame::is_start_frame`).
    pub ends_message: bool,
}

impl Chunk {
    pub fn new(bytes: Bytes) -> Chunk {
        let ends_message = frame::is_start_frame(&bytes);
        Chunk {
            bytes,
            ends_message,
        }
    }
}

/// Why a peer is closed for what it sent.
#[derive(Debug, thiserror::Error)]
pub enum FwdError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Rule(#[from] Violation),
}

/// The inbound state of one peer: frames split across WebSocket messages, and reused buffers.
pub struct Inbound {
    mode: Mode,
    extensions: Extensions,
    frames: FrameReader,
    /// End offset of each checked frame of the current message, and what to do with it.
    checked: Vec<(usize, Fwd)>,
    chunks: Vec<(Range<usize>, bool)>,
    replies: Vec<Message>,
}

/// What one WebSocket message gave: chunks for the other side and replies for this peer.
pub struct Forward<'a> {
    bytes: Bytes,
    chunks: &'a [(Range<usize>, bool)],
    /// Resets for the streams this message used while the other side is absent.
    pub replies: &'a [Message],
}

impl Forward<'_> {
    /// The chunks to send to the other side, in order (none if it is absent).
    pub fn chunks(&self) -> impl Iterator<Item = Chunk> + '_ {
        self.chunks.iter().map(|(r, ends)| Chunk {
            bytes: self.bytes.slice(r.clone()),
            ends_message: *ends,
        })
    }

    /// Bytes of frames forwarded.
    pub fn forwarded(&self) -> usize {
        self.chunks.iter().map(|(r, _)| r.len()).sum()
    }
}

impl Inbound {
    /// A peer of `mode` that negotiated `extensions`.
    pub fn new(mode: Mode, extensions: Extensions) -> Inbound {
        Inbound {
            mode,
            extensions,
            frames: FrameReader::new(),
            checked: Vec::new(),
            chunks: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// Take one WebSocket message. `rules` are the tunnel's; `other` is the other side's
    /// negotiated extensions when it is connected, `None` when it is absent. `awaiting` is the
    /// number of a relay HELLO that told this peer of a new other side, until the peer has
    /// answered it ([`Inbound::feed`] clears it then). What it sent about connections before
    /// that answer belongs to the peer that is gone: its starts were made on that peer's terms
    /// (flow control on or off) and are answered with a reset, and its DATA, resets and credit
    /// are dropped, since the new peer may reuse the same stream ids for new connections.
    pub fn feed(
        &mut self,
        data: Bytes,
        rules: &mut FrameRules,
        other: Option<Extensions>,
        awaiting: &mut Option<u64>,
    ) -> Result<Forward<'_>, FwdError> {
        self.feed_held(data, rules, other, awaiting, false)
    }

    /// [`Inbound::feed`], where `held` says that the other side went away with connections
    /// to resume (both it and this peer negotiated `resume/1`): this peer's DATA for them is
    /// then dropped without a reset (it sends it again after the resume), and a new
    /// connection on a held stream is refused alone (a stream reset would end the held ones).
    pub fn feed_held(
        &mut self,
        data: Bytes,
        rules: &mut FrameRules,
        other: Option<Extensions>,
        awaiting: &mut Option<u64>,
        held: bool,
    ) -> Result<Forward<'_>, FwdError> {
        self.checked.clear();
        self.chunks.clear();
        self.replies.clear();
        // Extension messages (flow control's, so far) travel only between peers that both
        // negotiated it.
        let extensions_pass = self.extensions.flow_control && other.is_some_and(|o| o.flow_control);
        let (mode, checked, replies) = (self.mode, &mut self.checked, &mut self.replies);
        let mut offset = 0;
        let bytes = self.frames.feed::<FwdError>(data, |body| {
            offset += frame::LENGTH_PREFIX + body.len();
            // Checked without allocating; the rare message off that path (SERVICE_IDS,
            // unknown fields, malformed) is decoded in full, for the check or its error.
            let owned;
            let msg = match frame::decode_ref(&body)? {
                Some(m) => m,
                None => {
                    owned = frame::decode(body.clone())?;
                    MessageRef::from(&owned)
                }
            };
            if awaiting.is_some() && msg.r#type == flow::HELLO {
                let epoch = Hello::decode(msg.payload.clone()).map_or(0, |h| h.epoch);
                if epoch == 0 || Some(epoch) == *awaiting {
                    *awaiting = None;
                }
            }
            let start = matches!(
                msg.kind(),
                Some(MessageType::StreamStart | MessageType::ConnectionStart)
            );
            // Sent before the peer heard of the new other side: about connections of the old
            // one (whose stream ids the new one may reuse), on its terms. Checked, but it
            // changes no stream's state: the relay drops it.
            let stale = awaiting.is_some()
                && (msg.kind().is_some_and(MessageType::is_stream_bound)
                    || ext::names_connection(msg.r#type));
            if stale {
                rules.check_stale(mode, msg.clone())?;
            } else {
                rules.check(mode, msg.clone())?;
            }
            let what = match msg.kind() {
                _ if stale => Fwd::Skip,
                _ if start => Fwd::Start,
                None if ext::is_extension_type(msg.r#type) && !extensions_pass => Fwd::Skip,
                _ => Fwd::Frame,
            };
            checked.push((offset, what));
            if (other.is_none() || (stale && start))
                && let Some(r) = reset_for_absent_peer(&msg, held && other.is_none())
                && !replies.contains(&r)
            {
                replies.push(r);
            }
            Ok(())
        })?;
        if other.is_some() && !bytes.is_empty() {
            plan_chunks(&self.checked, &mut self.chunks);
        }
        Ok(Forward {
            bytes,
            chunks: &self.chunks,
            replies: &self.replies,
        })
    }
}

/// What the relay does with one checked frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fwd {
    /// Forward it.
    Frame,
    /// Forward it and end the WebSocket message after it (a start frame; see
    /// [`frame::is_start_frame`]).
    Start,
    /// Do not forward it: an extension message for a peer that did not negotiate extensions.
    Skip,
}

/// How to forward the checked frames of one received message: `frames` holds each frame's end
/// offset and what to do with it; the result is the byte ranges to send, each at most
/// [`MAX_WS_MESSAGE`] bytes of whole frames, and whether it must end its WebSocket message.
fn plan_chunks(frames: &[(usize, Fwd)], out: &mut Vec<(std::ops::Range<usize>, bool)>) {
    out.clear();
    let (mut start, mut end) = (0, 0);
    for (i, &(frame_end, what)) in frames.iter().enumerate() {
        if what == Fwd::Skip {
            if end > start {
                out.push((start..end, false));
            }
            (start, end) = (frame_end, frame_end);
            continue;
        }
        end = frame_end;
        let next_too_big = frames
            .get(i + 1)
            .is_some_and(|&(next, _)| next - start > MAX_WS_MESSAGE);
        if what == Fwd::Start || i + 1 == frames.len() || next_too_big {
            out.push((start..end, what == Fwd::Start));
            start = end;
        }
    }
}

/// The reset that tells a sender its stream cannot be carried: with the other side absent every
/// stream is dead, so the whole stream is reset (a CONNECTION_RESET would leave a V3 source
/// sending CONNECTION_STARTs on a stream the other side never saw).
/// While the other side's connections are held for a resume, only new connections are refused.
fn reset_for_absent_peer(msg: &MessageRef<'_>, held: bool) -> Option<Message> {
    match msg.kind()? {
        MessageType::ConnectionStart if held => Some(Message::connection_reset(
            msg.stream_id,
            msg.service_id,
            msg.connection_id,
        )),
        MessageType::Data if held => None,
        MessageType::StreamStart | MessageType::ConnectionStart | MessageType::Data => {
            Some(Message::stream_reset(msg.stream_id, msg.service_id))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{self, Hello};
    use crate::frame::encode_to_bytes;

    fn frames(msgs: &[Message]) -> Bytes {
        let mut b = Vec::new();
        for m in msgs {
            b.extend_from_slice(&encode_to_bytes(m).unwrap());
        }
        Bytes::from(b)
    }

    /// What the other side receives: the chunks' frames, decoded, and where messages end.
    fn delivered(f: &Forward<'_>) -> (Vec<Message>, Vec<bool>) {
        let mut reader = FrameReader::new();
        let (mut got, mut ends) = (Vec::new(), Vec::new());
        for c in f.chunks() {
            ends.push(c.ends_message);
            reader
                .feed::<FrameError>(c.bytes, |body| {
                    got.push(frame::decode(body)?);
                    Ok(())
                })
                .unwrap();
        }
        (got, ends)
    }

    fn data(conn: u32, payload: &'static [u8]) -> Message {
        Message::data(1, "SSH", conn, Bytes::from_static(payload))
    }

    #[test]
    fn a_message_is_checked_and_forwarded_with_starts_ending_their_chunk() {
        let mut rules = FrameRules::new(vec!["SSH".into()]);
        let mut src = Inbound::new(Mode::Source, Extensions::NONE);
        let msg = frames(&[
            Message::stream_start(1, "SSH", 1),
            data(1, b"one"),
            Message::connection_start(1, "SSH", 2),
            data(2, b"two"),
        ]);
        let f = src
            .feed(msg, &mut rules, Some(Extensions::NONE), &mut None)
            .unwrap();
        assert!(f.replies.is_empty());
        let (got, ends) = delivered(&f);
        assert_eq!(got.len(), 4);
        assert_eq!(
            ends,
            vec![true, true, false],
            "a chunk ends after each start"
        );
        assert_eq!(&got[3].payload[..], b"two");
    }

    #[test]
    fn extension_messages_reach_only_a_peer_that_negotiated_them() {
        let hello = Hello::relay().to_message();
        let wu = flow::window_update(1, "SSH", 1, 65_536);
        let msg = || {
            frames(&[
                Message::stream_start(1, "SSH", 1),
                hello.clone(),
                wu.clone(),
                data(1, b"x"),
            ])
        };
        for (other, expect) in [(Extensions::NONE, 2), (Extensions::ALL, 4)] {
            let mut rules = FrameRules::new(vec!["SSH".into()]);
            let mut src = Inbound::new(Mode::Source, Extensions::ALL);
            let f = src.feed(msg(), &mut rules, Some(other), &mut None).unwrap();
            let (got, _) = delivered(&f);
            assert_eq!(got.len(), expect, "to {other:?}: {got:?}");
            if other == Extensions::NONE {
                assert!(got.iter().all(|m| !ext::is_extension_type(m.r#type)));
            }
        }
        // A sender that did not negotiate them gets none through either.
        let mut rules = FrameRules::new(vec!["SSH".into()]);
        let mut aws = Inbound::new(Mode::Source, Extensions::NONE);
        let f = aws
            .feed(msg(), &mut rules, Some(Extensions::ALL), &mut None)
            .unwrap();
        assert_eq!(delivered(&f).0.len(), 2);
    }

    #[test]
    fn an_absent_other_side_gets_nothing_and_the_sender_a_reset_per_stream() {
        let mut rules = FrameRules::new(vec!["SSH".into()]);
        let mut src = Inbound::new(Mode::Source, Extensions::NONE);
        let msg = frames(&[
            Message::stream_start(1, "SSH", 1),
            data(1, b"a"),
            data(1, b"b"),
        ]);
        let f = src.feed(msg, &mut rules, None, &mut None).unwrap();
        assert_eq!(f.chunks().count(), 0);
        assert_eq!(
            f.replies,
            &[Message::stream_reset(1, "SSH")],
            "one reset for the stream"
        );
    }

    #[test]
    fn starts_sent_before_the_peer_heard_of_the_new_other_side_are_reset() {
        // The destination was replaced: the relay told the source (HELLO number 5). Until the
        // source answers it, its starts were made on the old destination's terms.
        let mut rules = FrameRules::new(vec!["SSH".into()]);
        let mut src = Inbound::new(Mode::Source, Extensions::ALL);
        let mut awaiting = Some(5);
        let stale = frames(&[Message::stream_start(1, "SSH", 1), data(1, b"old terms")]);
        let f = src
            .feed(stale, &mut rules, Some(Extensions::ALL), &mut awaiting)
            .unwrap();
        let (got, _) = delivered(&f);
        assert!(
            got.is_empty(),
            "neither the stale start nor its data reaches the new destination: {got:?}"
        );
        assert_eq!(f.replies, &[Message::stream_reset(1, "SSH")]);
        // An older answer does not count; the answer to number 5 does, and starts pass again.
        let answer = |epoch| {
            Hello {
                from: "source".into(),
                features: vec![flow::FEATURE.into()],
                epoch,
                ..Default::default()
            }
            .to_message()
        };
        let msg = frames(&[answer(4), Message::stream_start(2, "SSH", 1)]);
        let f = src
            .feed(msg, &mut rules, Some(Extensions::ALL), &mut awaiting)
            .unwrap();
        assert_eq!(awaiting, Some(5));
        assert_eq!(f.replies.len(), 1);
        let msg = frames(&[answer(5), Message::stream_start(3, "SSH", 1)]);
        let f = src
            .feed(msg, &mut rules, Some(Extensions::ALL), &mut awaiting)
            .unwrap();
        assert_eq!(awaiting, None);
        assert!(f.replies.is_empty());
        assert!(
            delivered(&f)
                .0
                .iter()
                .any(|m| m.kind() == Some(MessageType::StreamStart))
        );
    }

    /// Found by the `mux_sequences` fuzz target (V2): a stale reset from the destination, about
    /// the old source's stream 2, arrived after the new source had started its own stream 2 on
    /// the same service. Dropped, it must not close the new stream in the relay's books: when
    /// that source went away in turn, the destination was never told its stream 2 had died,
    /// kept writing on it, and its bytes landed on the next source's stream 2.
    #[test]
    fn a_stale_reset_does_not_hide_a_live_stream_from_the_next_peer_change() {
        let mut rules = FrameRules::new(vec!["S0".into(), "S1".into()]);
        let mut src = Inbound::new(Mode::Source, Extensions::ALL);
        let mut dst = Inbound::new(Mode::Destination, Extensions::ALL);
        // The new source starts stream 2 of S0; the destination has not yet answered the HELLO
        // that told it of the new source.
        let start = frames(&[Message::stream_start(2, "S0", 0)]);
        src.feed(start, &mut rules, Some(Extensions::ALL), &mut None)
            .unwrap();
        let mut awaiting = Some(7);
        let stale = frames(&[Message::stream_reset(2, "S0")]);
        let f = dst
            .feed(stale, &mut rules, Some(Extensions::ALL), &mut awaiting)
            .unwrap();
        assert!(delivered(&f).0.is_empty(), "the stale reset is dropped");
        assert_eq!(
            rules.peer_gone(),
            [Message::stream_reset(2, "S0")],
            "when the source goes, the destination hears that its stream 2 died"
        );
        // A stale start is answered, and does not become the active stream either.
        let mut awaiting = Some(8);
        let stale = frames(&[
            Message::stream_start(3, "S1", 0),
            Message::data(3, "S1", 0, Bytes::from_static(b"old terms")),
        ]);
        let f = src
            .feed(stale, &mut rules, Some(Extensions::ALL), &mut awaiting)
            .unwrap();
        assert_eq!(f.replies, &[Message::stream_reset(3, "S1")]);
        assert!(rules.peer_gone().is_empty());
    }

    #[test]
    fn frames_split_across_messages_are_forwarded_once_whole() {
        let mut rules = FrameRules::new(vec!["SSH".into()]);
        let mut src = Inbound::new(Mode::Source, Extensions::NONE);
        let all = frames(&[Message::stream_start(1, "SSH", 1), data(1, b"split me")]);
        let cut = all.len() - 3;
        let first = src
            .feed(
                all.slice(..cut),
                &mut rules,
                Some(Extensions::NONE),
                &mut None,
            )
            .unwrap();
        assert_eq!(
            delivered(&first).0.len(),
            1,
            "the complete start frame only"
        );
        let second = src
            .feed(
                all.slice(cut..),
                &mut rules,
                Some(Extensions::NONE),
                &mut None,
            )
            .unwrap();
        assert_eq!(&delivered(&second).0[0].payload[..], b"split me");
    }

    #[test]
    fn rule_breaks_and_malformed_frames_are_typed_violations() {
        let mut rules = FrameRules::new(vec!["SSH".into()]);
        let mut dst = Inbound::new(Mode::Destination, Extensions::NONE);
        let start = frames(&[Message::stream_start(1, "SSH", 1)]);
        assert!(matches!(
            dst.feed(start, &mut rules, Some(Extensions::NONE), &mut None),
            Err(FwdError::Rule(Violation::NotAllowed { .. }))
        ));
        let mut src = Inbound::new(Mode::Source, Extensions::NONE);
        let garbage = Bytes::from_static(&[0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            src.feed(garbage, &mut rules, Some(Extensions::NONE), &mut None),
            Err(FwdError::Frame(_))
        ));
    }

    fn plan(frames: &[(usize, Fwd)]) -> Vec<(std::ops::Range<usize>, bool)> {
        let mut out = Vec::new();
        plan_chunks(frames, &mut out);
        out
    }

    #[test]
    fn frames_go_out_whole_and_a_start_ends_its_message() {
        assert_eq!(
            plan(&[(10, Fwd::Frame), (30, Fwd::Frame)]),
            vec![(0..30, false)]
        );
        assert_eq!(
            plan(&[(10, Fwd::Frame), (20, Fwd::Start), (30, Fwd::Frame)]),
            vec![(0..20, true), (20..30, false)]
        );
        assert_eq!(plan(&[]), vec![]);
    }

    #[test]
    fn skipped_frames_are_cut_out_and_nothing_else_is_lost() {
        // An extension message between two frames, first, last, and alone.
        assert_eq!(
            plan(&[(10, Fwd::Frame), (16, Fwd::Skip), (30, Fwd::Frame)]),
            vec![(0..10, false), (16..30, false)]
        );
        assert_eq!(
            plan(&[(6, Fwd::Skip), (20, Fwd::Start), (30, Fwd::Frame)]),
            vec![(6..20, true), (20..30, false)]
        );
        assert_eq!(
            plan(&[(10, Fwd::Frame), (16, Fwd::Skip)]),
            vec![(0..10, false)]
        );
        assert_eq!(plan(&[(6, Fwd::Skip), (12, Fwd::Skip)]), vec![]);
    }

    #[test]
    fn no_chunk_exceeds_a_websocket_message() {
        let frame = 65_000;
        let frames: Vec<(usize, Fwd)> = (1..=5).map(|i| (i * frame, Fwd::Frame)).collect();
        let out = plan(&frames);
        assert_eq!(out.first().unwrap().0.start, 0);
        assert_eq!(out.last().unwrap().0.end, 5 * frame);
        for w in out.windows(2) {
            assert_eq!(w[0].0.end, w[1].0.start, "contiguous, nothing dropped");
        }
        assert!(out.iter().all(|(r, _)| r.len() <= MAX_WS_MESSAGE));
    }
}
