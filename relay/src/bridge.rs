//! Protocol-version bridging between the two peers of a tunnel, so that a V1 peer and a V2/V3
//! peer work together without `--destination-client-type V1` on either.
//!
//! Frames are forwarded verbatim (see [`crate::dataplane`]) except where the peers' message
//! formats differ, and then only the fields that differ are rewritten:
//!
//! - **A peer that speaks V1 to a V2/V3 peer, in a tunnel of one service.** A V1-format peer
//!   (subprotocol 1.0, or a 2.0/3.0 session whose first STREAM_START has no service id, as the
//!   localproxy's `-y V1` and AWS's V1-only clients send) sends no `serviceId`. A V3 localproxy
//!   throws on such a STREAM_START and reconnects. The relay fills in the tunnel's one service,
//!   and, when the V2/V3 side chose the stream's connection id, that id (a V3 localproxy drops
//!   DATA for connection 0 on a stream it started as connection 1).
//! - **Towards a peer that negotiated subprotocol 1.0.** Its messages have no `serviceId` and no
//!   `connectionId`, so the relay clears them. A V1 session carries one connection at a time: a
//!   CONNECTION_START (a second simultaneous connection of a V3 source) cannot be expressed.
//!   The relay answers it with CONNECTION_RESET, and logs that the source should pass
//!   `--destination-client-type V1` (`-y V1`). The connection is refused, not lost unseen.
//!
//! A tunnel of several services cannot be bridged to V1 (V1 has no service ids). Its
//! service-less frames are forwarded as they are, and the V2/V3 peer decides.

use std::sync::atomic::{AtomicU32, Ordering};

use bytes::{Bytes, BytesMut};
use culvert_protocol::Format;
use culvert_protocol::forward::Chunk;
use culvert_protocol::frame;
use culvert_protocol::message::{Message, MessageType};

/// What frames from one peer need on their way to the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bridge {
    /// Nothing: forwarded verbatim.
    None,
    /// Give service-less frames the tunnel's one service.
    FillService(String),
    /// Clear service and connection ids (towards a 1.0 peer).
    ToV1,
}

impl Bridge {
    /// What frames from a peer that speaks V1 (`from_v1`) need to reach a peer that negotiated
    /// `to`, in a tunnel of `services`.
    pub fn between(from_v1: bool, to: Format, services: &[String]) -> Bridge {
        match (to, services) {
            (Format::V1, _) => Bridge::ToV1,
            (_, [one]) if from_v1 => Bridge::FillService(one.clone()),
            _ => Bridge::None,
        }
    }
}

/// Whether a chunk ends with a STREAM_START without a service id: its sender speaks V1. (A
/// start frame always ends its chunk, so only the last frame is looked at.)
pub fn starts_v1_stream(chunk: &Chunk) -> bool {
    if !chunk.ends_message {
        return false;
    }
    // Walk the length prefixes to the last frame: nothing is decoded or allocated before it.
    let b = &chunk.bytes;
    let (mut at, mut last) = (0, None);
    while at + 2 <= b.len() {
        let end = at + 2 + usize::from(u16::from_be_bytes([b[at], b[at + 1]]));
        if end > b.len() {
            break;
        }
        last = Some(b.slice(at + 2..end));
        at = end;
    }
    let Some(last) = last else {
        return false;
    };
    matches!(
        frame::decode(last),
        Ok(m) if m.r#type == MessageType::StreamStart as i32 && m.service_id.is_empty()
    )
}

/// The frame bodies of a chunk (each after its 2-byte length prefix).
fn frames(bytes: &Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let len = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
        if at + 2 + len > bytes.len() {
            break;
        }
        out.push(bytes.slice(at + 2..at + 2 + len));
        at += 2 + len;
    }
    out
}

/// A chunk as `bridge` makes it, and the answers its sender gets for what cannot be carried.
/// `connection` is the tunnel's bridged connection id: frames towards a V1 peer record it,
/// frames from one get it.
pub fn translate(
    bridge: &Bridge,
    chunk: Chunk,
    connection: &AtomicU32,
    replies: &mut Vec<Message>,
) -> Option<Chunk> {
    if *bridge == Bridge::None {
        return Some(chunk);
    }
    let mut out = BytesMut::with_capacity(chunk.bytes.len() + 16);
    let mut changed = false;
    for body in frames(&chunk.bytes) {
        // Frames were checked when they arrived; one that does not decode goes as it came.
        let Ok(mut m) = frame::decode(body.clone()) else {
            out.extend_from_slice(&(body.len() as u16).to_be_bytes());
            out.extend_from_slice(&body);
            continue;
        };
        let keep = match bridge {
            Bridge::None => true,
            Bridge::FillService(s) => {
                if m.service_id.is_empty() && carries_service(m.r#type) {
                    m.service_id = s.clone();
                    if m.connection_id == 0 {
                        m.connection_id = connection.load(Ordering::Relaxed);
                    }
                    changed = true;
                }
                true
            }
            Bridge::ToV1 => {
                if m.r#type == MessageType::ConnectionStart as i32 {
                    tracing::warn!(
                        stream = m.stream_id,
                        connection = m.connection_id,
                        "a second simultaneous connection towards a V1 peer cannot be carried: \
                         reset; pass --destination-client-type V1 (-y V1) to the source"
                    );
                    replies.push(Message {
                        r#type: MessageType::ConnectionReset as i32,
                        stream_id: m.stream_id,
                        service_id: m.service_id.clone(),
                        connection_id: m.connection_id,
                        ..Message::default()
                    });
                    changed = true;
                    false
                } else {
                    if m.r#type == MessageType::StreamStart as i32 {
                        connection.store(m.connection_id, Ordering::Relaxed);
                    }
                    if !m.service_id.is_empty() || m.connection_id != 0 {
                        changed = true;
                    }
                    m.service_id.clear();
                    m.connection_id = 0;
                    if m.r#type == MessageType::ConnectionReset as i32 {
                        // The one connection of a V1 stream: its end is the stream's end.
                        m.r#type = MessageType::StreamReset as i32;
                    }
                    true
                }
            }
        };
        if keep && frame::encode(&m, &mut out).is_err() {
            return Some(chunk);
        }
    }
    if !changed {
        return Some(chunk);
    }
    if out.is_empty() {
        return None;
    }
    Some(Chunk {
        bytes: out.freeze(),
        ends_message: chunk.ends_message,
    })
}

fn carries_service(t: i32) -> bool {
    [
        MessageType::Data,
        MessageType::StreamStart,
        MessageType::StreamReset,
        MessageType::ConnectionStart,
        MessageType::ConnectionReset,
    ]
    .iter()
    .any(|k| *k as i32 == t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as the relay's reader makes a chunk of them: ending its message if the last is
    /// a start frame.
    fn chunk(msgs: &[Message]) -> Chunk {
        let mut b = BytesMut::new();
        for m in msgs {
            frame::encode(m, &mut b).unwrap();
        }
        let starts = [MessageType::StreamStart, MessageType::ConnectionStart];
        Chunk {
            bytes: b.freeze(),
            ends_message: msgs
                .last()
                .is_some_and(|m| starts.iter().any(|s| *s as i32 == m.r#type)),
        }
    }

    fn decoded(c: &Chunk) -> Vec<Message> {
        frames(&c.bytes)
            .into_iter()
            .map(|f| frame::decode(f).unwrap())
            .collect()
    }

    fn msg(t: MessageType, service: &str, conn: u32) -> Message {
        Message {
            r#type: t as i32,
            stream_id: 1,
            service_id: service.into(),
            connection_id: conn,
            payload: if t == MessageType::Data {
                Bytes::from_static(b"hello")
            } else {
                Bytes::new()
            },
            ..Message::default()
        }
    }

    #[test]
    fn which_bridge_a_pair_of_peers_needs() {
        let one = vec!["SSH".to_owned()];
        let two = vec!["SSH".to_owned(), "RDP".to_owned()];
        assert_eq!(Bridge::between(false, Format::V3, &one), Bridge::None);
        assert_eq!(
            Bridge::between(true, Format::V3, &one),
            Bridge::FillService("SSH".into())
        );
        assert_eq!(Bridge::between(true, Format::V3, &two), Bridge::None);
        assert_eq!(Bridge::between(false, Format::V1, &one), Bridge::ToV1);
    }

    #[test]
    fn a_v1_stream_start_is_recognised_by_its_missing_service() {
        let v1 = chunk(&[msg(MessageType::StreamStart, "", 0)]);
        assert!(starts_v1_stream(&v1));
        let v3 = chunk(&[msg(MessageType::StreamStart, "SSH", 1)]);
        assert!(!starts_v1_stream(&v3));
        let data = chunk(&[msg(MessageType::Data, "", 0)]);
        assert!(!starts_v1_stream(&data));
    }

    #[test]
    fn service_less_frames_get_the_tunnels_one_service() {
        let mut replies = Vec::new();
        let c = chunk(&[
            msg(MessageType::Data, "", 0),
            msg(MessageType::StreamStart, "", 0),
        ]);
        let out = translate(
            &Bridge::FillService("SSH".into()),
            c,
            &AtomicU32::new(0),
            &mut replies,
        )
        .unwrap();
        let m = decoded(&out);
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|m| m.service_id == "SSH"));
        assert_eq!(m[0].payload, Bytes::from_static(b"hello"));
        assert!(out.ends_message, "a start frame still ends its message");
        assert!(replies.is_empty());
        // Frames that already name their service go as they came, byte for byte.
        let v3 = chunk(&[msg(MessageType::Data, "SSH", 1)]);
        let sent = v3.bytes.clone();
        let same = translate(
            &Bridge::FillService("SSH".into()),
            v3,
            &AtomicU32::new(0),
            &mut replies,
        )
        .unwrap();
        assert_eq!(same.bytes, sent);
    }

    #[test]
    fn towards_a_v1_peer_ids_go_and_a_second_connection_is_reset_back() {
        let mut replies = Vec::new();
        let c = chunk(&[
            msg(MessageType::Data, "SSH", 1),
            msg(MessageType::ConnectionReset, "SSH", 1),
        ]);
        let conn = AtomicU32::new(0);
        let start = chunk(&[msg(MessageType::StreamStart, "SSH", 1)]);
        let m = decoded(&translate(&Bridge::ToV1, start, &conn, &mut replies).unwrap());
        assert_eq!((m[0].service_id.as_str(), m[0].connection_id), ("", 0));
        assert_eq!(
            conn.load(Ordering::Relaxed),
            1,
            "the stream's connection is kept"
        );
        // The V1 side's answers get it back.
        let answer = chunk(&[msg(MessageType::Data, "", 0)]);
        let m = decoded(
            &translate(
                &Bridge::FillService("SSH".into()),
                answer,
                &conn,
                &mut replies,
            )
            .unwrap(),
        );
        assert_eq!((m[0].service_id.as_str(), m[0].connection_id), ("SSH", 1));
        let m = decoded(&translate(&Bridge::ToV1, c, &conn, &mut replies).unwrap());
        assert_eq!(m[0].service_id, "");
        assert_eq!(m[0].connection_id, 0);
        assert_eq!(m[1].r#type, MessageType::StreamReset as i32);
        assert!(replies.is_empty());
        let start = chunk(&[msg(MessageType::ConnectionStart, "SSH", 2)]);
        assert!(translate(&Bridge::ToV1, start, &conn, &mut replies).is_none());
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].r#type, MessageType::ConnectionReset as i32);
        assert_eq!(replies[0].connection_id, 2);
    }
}
