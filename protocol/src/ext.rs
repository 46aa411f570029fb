//! Negotiating culvert's protocol extensions in the WebSocket handshake, so that AWS peers
//! never see a byte they do not expect.
//!
//! A culvert end offers its extensions in a request header on the upgrade,
//! `culvert-extensions: flow-control/1`. culvert-relay answers, in the 101, with the ones it
//! accepts for that session (the same header; absent: none). AWS's relay and the AWS
//! localproxy ignore unknown headers, so:
//!
//! - a culvert end talking to AWS's relay gets no header back and uses no extension: it sends
//!   nothing but AWS messages, and ignores any extension message it might receive;
//! - culvert-relay sends its own extension messages (the flow-control HELLO) only to peers it
//!   accepted flow control from, and forwards extension messages only between two such peers:
//!   a peer that did not offer it (the localproxy, the Device Client, a browser) never receives
//!   one, in any order of connection;
//! - a relay that stops sends close code 1012 only to peers that offered `restart/1`; any other
//!   peer's connection ends without a close frame (the localproxy exits for good on one).
//!
//! Extension messages are message types in culvert's own range (`0x4355_xxxx`, "CU"), always
//! sent with `ignorable = true`; the protocol's fields are never extended.
//!
//! Half-close (`half-close/1`) rides on flow control: it is not a handshake token but a feature
//! the two ends name in their flow-control HELLOs, so it is on for exactly the connections that
//! use flow control and whose both ends listed it (both decide at the same confirmation; see
//! [`crate::flow`]). On such a connection, an end whose application finished sending (a FIN on
//! its socket) sends [`FIN`] after its last DATA instead of a reset, and goes on reading. The
//! other end gives its application a FIN and goes on sending. Once an end has both sent and
//! received a FIN, the connection is over for it and nothing more is sent for it: no reset
//! (which the peer would count as stale). A reset still ends a half-closed connection at once,
//! both ways. Without the feature (an AWS peer, an older culvert), a FIN is a reset, as the
//! AWS protocol has it.
//!
//! Resumable connections (`resume/1`) are both: a handshake token, because the relay must then
//! keep a tunnel's streams when a peer goes away (no resets to the other side, a relay HELLO to
//! it instead), and a HELLO feature, because only connections whose both ends listed it are
//! resumed. When an end's WebSocket drops it keeps those connections (and their local sockets)
//! for a hold time and reconnects; when an end hears of a new peer on the other side (a relay
//! HELLO) it suspends them. Once flow control is confirmed again, the source sends one
//! [`RESUME`] per connection it still holds, then [`RESUME_END`]; the destination answers each
//! with its own [`RESUME`] and resets what it holds that was not named. A [`RESUME`] says how
//! many bytes of the connection its sender has received and how much credit it has returned,
//! so each end retransmits exactly what the other has not received, from a buffer that the
//! credit window bounds (bytes are kept until they are credited back). See [`crate::mux`].

/// The request and response header carrying the extensions offered and accepted.
pub const HEADER: &str = "culvert-extensions";

/// The token for the flow-control extension ([`crate::flow`]).
pub const FLOW_CONTROL: &str = crate::flow::FEATURE;
/// The token for "a relay that stops asks me to come back with close code 1012"
/// ([`crate::close::RESTART`]): no message of its own, only what the relay does on a stop.
pub const RESTART: &str = "restart/1";

/// The feature name of half-close in the flow-control HELLO's `features`.
pub const HALF_CLOSE: &str = "half-close/1";
/// Message type of a half-close: "no more DATA from me on this connection" (names the
/// connection as DATA does; empty payload).
pub const FIN: i32 = 0x4355_0003;

/// The token (and HELLO feature) of resumable connections.
pub const RESUME_TOKEN: &str = "resume/1";
/// Message type of a resume: "here is where I am on this connection" (names the connection as
/// DATA does; payload [`ResumePoint`]).
pub const RESUME: i32 = 0x4355_0007;
/// Message type of the end of a source's resumes (names nothing; empty payload).
pub const RESUME_END: i32 = 0x4355_0008;

/// Where one end is on a resumed connection: what its [`RESUME`] carries (21 bytes,
/// big-endian: received, returned, window, flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// DATA bytes of this connection received, in all.
    pub received: u64,
    /// Of those, bytes credited back (WINDOW_UPDATE increments sent), in all.
    pub returned: u64,
    /// The window the sender grants now.
    pub window: u32,
    /// The sender has received the other end's FIN.
    pub fin_received: bool,
}

impl ResumePoint {
    pub const LEN: usize = 21;

    pub fn encode(&self) -> bytes::Bytes {
        let mut b = Vec::with_capacity(Self::LEN);
        b.extend_from_slice(&self.received.to_be_bytes());
        b.extend_from_slice(&self.returned.to_be_bytes());
        b.extend_from_slice(&self.window.to_be_bytes());
        b.push(u8::from(self.fin_received));
        b.into()
    }

    /// The point in a payload; `None` if it is malformed (wrong length, credit returned for
    /// bytes never received, a window below [`crate::flow::MIN_WINDOW`], unknown flags).
    pub fn decode(p: &[u8]) -> Option<ResumePoint> {
        if p.len() != Self::LEN || p[20] > 1 {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        let r = ResumePoint {
            received: u64_at(0),
            returned: u64_at(8),
            window: u32::from_be_bytes(p[16..20].try_into().expect("4 bytes")),
            fin_received: p[20] == 1,
        };
        (r.returned <= r.received && r.window >= crate::flow::MIN_WINDOW).then_some(r)
    }
}

/// The RESUME of the connection a DATA message with the same names would reach.
pub fn resume(
    stream_id: i32,
    service_id: &str,
    connection_id: u32,
    at: ResumePoint,
) -> crate::Message {
    crate::Message {
        r#type: RESUME,
        payload: at.encode(),
        ..fin(stream_id, service_id, connection_id)
    }
}

/// The end of a source's RESUMEs.
pub fn resume_end() -> crate::Message {
    crate::Message {
        r#type: RESUME_END,
        ignorable: true,
        ..Default::default()
    }
}

/// The half-close of the connection a DATA message with the same names would reach.
pub fn fin(stream_id: i32, service_id: &str, connection_id: u32) -> crate::Message {
    crate::Message {
        r#type: FIN,
        stream_id,
        ignorable: true,
        service_id: service_id.to_owned(),
        connection_id,
        ..Default::default()
    }
}

/// Does an extension message of type `t` name one connection (as DATA does)? The relay treats
/// these like the AWS messages that do (dropped when they belong to a peer that is gone).
pub fn names_connection(t: i32) -> bool {
    t == crate::flow::WINDOW_UPDATE || t == crate::flow::WINDOW_SIZE || t == FIN || t == RESUME
}

/// Is `t` a message type of culvert's own range (an extension message)?
pub fn is_extension_type(t: i32) -> bool {
    (t as u32) >> 16 == 0x4355
}

/// A set of extensions: what an end offers, or what the relay accepted for one session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Per-connection credit windows and a per-tunnel budget ([`crate::flow`]); its messages
    /// are the only extension messages so far.
    pub flow_control: bool,
    /// The peer reconnects on close code 1012 instead of ending for good.
    pub restart: bool,
    /// The peer resumes its connections after a reconnect ([`RESUME_TOKEN`]); only with flow
    /// control.
    pub resume: bool,
}

impl Extensions {
    /// No extension: exactly the AWS protocol.
    pub const NONE: Extensions = Extensions {
        flow_control: false,
        restart: false,
        resume: false,
    };
    /// Every extension this build implements.
    pub const ALL: Extensions = Extensions {
        flow_control: true,
        restart: true,
        resume: true,
    };

    pub fn is_empty(self) -> bool {
        self == Extensions::NONE
    }

    /// The extensions named in a header value (comma-separated tokens; unknown ones are
    /// skipped, so a newer peer can offer more than this build knows).
    pub fn parse(value: &str) -> Extensions {
        let mut e = Extensions::NONE;
        for token in value.split(',').map(str::trim) {
            match token {
                FLOW_CONTROL => e.flow_control = true,
                RESTART => e.restart = true,
                RESUME_TOKEN => e.resume = true,
                _ => {}
            }
        }
        e
    }

    /// Extensions in both sets.
    pub fn intersect(self, other: Extensions) -> Extensions {
        Extensions {
            flow_control: self.flow_control && other.flow_control,
            restart: self.restart && other.restart,
            resume: self.resume && other.resume && self.flow_control && other.flow_control,
        }
    }

    /// The header value naming these extensions, `None` when there are none (then the header
    /// is not sent at all).
    pub fn header_value(self) -> Option<String> {
        let mut tokens = Vec::new();
        if self.flow_control {
            tokens.push(FLOW_CONTROL);
        }
        if self.restart {
            tokens.push(RESTART);
        }
        if self.resume {
            tokens.push(RESUME_TOKEN);
        }
        (!tokens.is_empty()).then(|| tokens.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_skips_unknown_tokens() {
        assert_eq!(
            Extensions::parse(&Extensions::ALL.header_value().unwrap()),
            Extensions::ALL
        );
        assert_eq!(Extensions::NONE.header_value(), None);
        assert_eq!(
            Extensions::parse(" resume/1 , flow-control/1,half-close/1, restart/1"),
            Extensions::ALL
        );
        assert_eq!(
            Extensions::parse("resume/1").intersect(Extensions::ALL),
            Extensions::NONE,
            "resume only with flow control"
        );
        assert_eq!(Extensions::parse("flow-control/2"), Extensions::NONE);
        assert_eq!(
            Extensions::parse("restart/1"),
            Extensions {
                flow_control: false,
                restart: true,
                resume: false,
            }
        );
        assert_eq!(Extensions::parse(""), Extensions::NONE);
        assert!(Extensions::ALL.intersect(Extensions::NONE).is_empty());
    }

    #[test]
    fn resume_points_round_trip_and_malformed_ones_are_refused() {
        let at = ResumePoint {
            received: 1 << 40,
            returned: 1 << 39,
            window: 256 * 1024,
            fin_received: true,
        };
        assert_eq!(ResumePoint::decode(&at.encode()), Some(at));
        let mut bad = at.encode().to_vec();
        bad[20] = 2;
        assert_eq!(ResumePoint::decode(&bad), None);
        assert_eq!(ResumePoint::decode(&bad[..20]), None);
        let over = ResumePoint {
            returned: at.received + 1,
            ..at
        };
        assert_eq!(ResumePoint::decode(&over.encode()), None);
        let tiny = ResumePoint { window: 1, ..at };
        assert_eq!(ResumePoint::decode(&tiny.encode()), None);
        assert!(names_connection(RESUME) && !names_connection(RESUME_END));
    }

    #[test]
    fn culvert_types_are_recognised() {
        assert!(is_extension_type(crate::flow::HELLO));
        assert!(is_extension_type(crate::flow::WINDOW_UPDATE));
        assert!(is_extension_type(FIN));
        assert!(names_connection(FIN) && names_connection(crate::flow::WINDOW_UPDATE));
        assert!(!names_connection(crate::flow::HELLO));
        for aws in 0..=7 {
            assert!(!is_extension_type(aws));
        }
        assert!(!is_extension_type(-1));
        assert!(!is_extension_type(0x4356_0001));
    }
}
