//! What each side of a tunnel may send, as a relay enforces it before forwarding a frame
//! verbatim. A [`Violation`] closes only the peer that sent the frame.
//!
//! The relay also tracks which streams the source has started, so it can refuse frames for a
//! stream that never existed and tell a surviving peer which streams died when the other side
//! went away or was replaced.

use std::collections::HashMap;

use crate::Mode;
use crate::message::{Message, MessageRef, MessageType};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Violation {
    #[error("message type {0} is unknown and not marked ignorable")]
    UnknownType(i32),
    #[error("{kind:?} may not be sent by a {from}")]
    NotAllowed { kind: MessageType, from: Mode },
    #[error("{0:?} with stream id {1}: stream ids must be positive")]
    BadStreamId(MessageType, i32),
    #[error("service id {0:?} is not one of this tunnel's services ({1})")]
    UnknownService(String, String),
    #[error(
        "a message without service id is only valid in a tunnel with one service (this one has {0})"
    )]
    MissingServiceId(usize),
    #[error("{kind:?} for stream {stream} of service {service:?}, which was never started")]
    UnknownStream {
        kind: MessageType,
        stream: i32,
        service: String,
    },
}

/// Per-tunnel frame rules; one instance shared by both sides of a tunnel.
#[derive(Debug)]
pub struct FrameRules {
    services: Vec<String>,
    /// Highest stream id the source has started, per wire service id ("" for V1).
    max_started: HashMap<String, i32>,
    /// The stream the source started last, per wire service id, until it is reset.
    active: HashMap<String, i32>,
}

impl FrameRules {
    pub fn new(services: Vec<String>) -> FrameRules {
        FrameRules {
            services,
            max_started: HashMap::new(),
            active: HashMap::new(),
        }
    }

    /// Check a message `from` one side. `Ok(())` means forward it verbatim.
    /// Takes a [`MessageRef`] (what the relay decodes, without allocating) or a `&Message`.
    pub fn check<'a>(
        &mut self,
        from: Mode,
        msg: impl Into<MessageRef<'a>>,
    ) -> Result<(), Violation> {
        self.check_inner(from, msg.into(), true)
    }

    /// Check a message the relay will not forward because it belongs to a peer that is gone
    /// (see `crate::forward::Inbound::feed`): the same rules, but it does not change which
    /// stream is active, since neither end shares that stream any more. (A stale start still
    /// counts as started, so the stale frames that follow it are legal.)
    pub fn check_stale<'a>(
        &mut self,
        from: Mode,
        msg: impl Into<MessageRef<'a>>,
    ) -> Result<(), Violation> {
        self.check_inner(from, msg.into(), false)
    }

    fn check_inner(
        &mut self,
        from: Mode,
        msg: MessageRef<'_>,
        track_active: bool,
    ) -> Result<(), Violation> {
        // A RESUME names a connection: from the source it (re)starts its stream here (a relay
        // that restarted knows no stream), from the destination it answers one.
        let kind = match msg.kind() {
            Some(kind) => kind,
            None if msg.r#type == crate::ext::RESUME && from == Mode::Source => {
                MessageType::StreamStart
            }
            None if msg.r#type == crate::ext::RESUME => MessageType::Data,
            // Extensions travel as new ignorable types; the receiver decides.
            None if msg.ignorable => return Ok(()),
            None => return Err(Violation::UnknownType(msg.r#type)),
        };
        match kind {
            MessageType::Unknown => return Err(Violation::UnknownType(0)),
            MessageType::SessionReset | MessageType::ServiceIds => {
                return Err(Violation::NotAllowed { kind, from });
            }
            MessageType::StreamStart | MessageType::ConnectionStart
                if from == Mode::Destination =>
            {
                return Err(Violation::NotAllowed { kind, from });
            }
            _ => {}
        }
        if msg.stream_id <= 0 {
            return Err(Violation::BadStreamId(kind, msg.stream_id));
        }
        if msg.service_id.is_empty() {
            if self.services.len() > 1 {
                return Err(Violation::MissingServiceId(self.services.len()));
            }
        } else if !self.services.iter().any(|s| s == msg.service_id) {
            return Err(Violation::UnknownService(
                msg.service_id.to_owned(),
                self.services.join(", "),
            ));
        }
        // In a one-service tunnel a V1 peer names the service "" while the other may name it:
        // both mean the same stream.
        let service = if msg.service_id.is_empty() && self.services.len() == 1 {
            self.services[0].as_str()
        } else {
            msg.service_id
        };
        if kind == MessageType::StreamStart {
            let max = self.max_started.entry(service.to_owned()).or_insert(0);
            *max = (*max).max(msg.stream_id);
            if track_active {
                self.active.insert(service.to_owned(), msg.stream_id);
            }
            return Ok(());
        }
        if kind == MessageType::ConnectionStart && !self.max_started.contains_key(service) {
            // A source carrying on a stream this relay never saw start: it restarted while
            // the stream's connections waited to resume (their RESUMEs may come after). A
            // source may start any stream anyway; this one is not made the active one.
            self.max_started.insert(service.to_owned(), msg.stream_id);
            return Ok(());
        }
        // Every other stream-bound message must name a stream the source has started. Stale
        // ids (lower than the newest) are legal: frames cross resets in flight.
        let started = self
            .max_started
            .get(service)
            .is_some_and(|max| msg.stream_id <= *max);
        if !started {
            return Err(Violation::UnknownStream {
                kind,
                stream: msg.stream_id,
                service: msg.service_id.to_owned(),
            });
        }
        if track_active
            && kind == MessageType::StreamReset
            && self.active.get(service) == Some(&msg.stream_id)
        {
            self.active.remove(service);
        }
        Ok(())
    }

    /// One side went away or was replaced: the streams it shared with the other side are dead.
    /// Returns the `STREAM_RESET`s to send to the surviving side.
    pub fn peer_gone(&mut self) -> Vec<Message> {
        self.active
            .drain()
            .map(|(service, stream)| Message::stream_reset(stream, &service))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rules() -> FrameRules {
        FrameRules::new(vec!["SSH".into(), "HMI".into()])
    }

    #[test]
    fn who_may_send_what() {
        let mut r = rules();
        assert_eq!(
            r.check(Mode::Destination, &Message::stream_start(1, "SSH", 1)),
            Err(Violation::NotAllowed {
                kind: MessageType::StreamStart,
                from: Mode::Destination
            })
        );
        assert!(matches!(
            r.check(Mode::Source, &Message::session_reset()),
            Err(Violation::NotAllowed { .. })
        ));
        assert!(matches!(
            r.check(Mode::Source, &Message::service_ids(&[])),
            Err(Violation::NotAllowed { .. })
        ));
        assert!(matches!(
            r.check(Mode::Source, &Message::stream_start(0, "SSH", 1)),
            Err(Violation::BadStreamId(..))
        ));
        assert!(matches!(
            r.check(Mode::Source, &Message::stream_start(1, "VNC", 1)),
            Err(Violation::UnknownService(..))
        ));
        assert_eq!(
            r.check(Mode::Source, &Message::stream_start(1, "", 0)),
            Err(Violation::MissingServiceId(2))
        );
        let ext = Message {
            r#type: 100,
            ignorable: true,
            ..Default::default()
        };
        assert_eq!(r.check(Mode::Source, &ext), Ok(()));
        assert_eq!(
            r.check(
                Mode::Source,
                &Message {
                    ignorable: false,
                    ..ext
                }
            ),
            Err(Violation::UnknownType(100))
        );
    }

    #[test]
    fn v1_and_named_service_are_the_same_stream_in_a_one_service_tunnel() {
        let mut r = FrameRules::new(vec!["SSH".into()]);
        r.check(Mode::Source, &Message::stream_start(1, "SSH", 1))
            .unwrap();
        let v1_reply = Message::data(1, "", 0, Bytes::from_static(b"x"));
        assert_eq!(r.check(Mode::Destination, &v1_reply), Ok(()));
    }

    #[test]
    fn frames_must_name_a_started_stream() {
        let mut r = rules();
        let data = |s| Message::data(s, "SSH", 1, Bytes::from_static(b"x"));
        assert!(matches!(
            r.check(Mode::Destination, &data(1)),
            Err(Violation::UnknownStream { .. })
        ));
        r.check(Mode::Source, &Message::stream_start(3, "SSH", 1))
            .unwrap();
        assert_eq!(r.check(Mode::Destination, &data(3)), Ok(()));
        assert_eq!(
            r.check(Mode::Destination, &data(2)),
            Ok(()),
            "stale is legal"
        );
        assert!(r.check(Mode::Destination, &data(4)).is_err());
        // A source's new connection on a stream started before this relay did.
        let mut fresh = rules();
        fresh
            .check(Mode::Source, &Message::connection_start(5, "SSH", 3))
            .unwrap();
        assert_eq!(fresh.check(Mode::Destination, &data(5)), Ok(()));
        assert!(fresh.peer_gone().is_empty(), "not made the active stream");
        assert_eq!(r.peer_gone(), vec![Message::stream_reset(3, "SSH")]);
        assert!(r.peer_gone().is_empty());
    }
}
