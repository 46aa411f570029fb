//! The stream multiplexer: one tunnel session carries many TCP connections, each named on the
//! wire by `(service id, stream id, connection id)`. [`Mux`] keeps that table for one end of one
//! WebSocket session and translates between wire messages and local connection handles
//! ([`ConnId`]).
//!
//! No sockets, no clock, no async: every call takes an [`Output`] to which it appends the
//! messages to transmit and the events for the application, so the whole state machine runs as
//! an in-memory pair in tests.
//!
//! Formats, as the AWS localproxy 3.x speaks them:
//! - **V3**: the first connection of a service sends `STREAM_START` (connection id 1); later ones,
//!   while the stream lives, `CONNECTION_START` with the next connection id; a closed connection
//!   sends `CONNECTION_RESET` and leaves the stream alive.
//! - **V2**: one connection per stream: every connection gets a new stream id and `STREAM_START`
//!   without connection id; a close sends `STREAM_RESET`. A new connection on a service replaces
//!   the previous one (that is how the format works).
//! - **V1**: like V2 without a service id; only for tunnels with one service.
//!
//! A destination detects the format per stream from the `STREAM_START` it receives and answers in
//! the same format. Data for a stream or connection that is no longer current is dropped (and
//! counted): with no acknowledgements in the protocol, late frames after a reset are normal.
//!
//! Flow control ([`crate::flow`], culvert's extension) lives here too: once negotiated, each new
//! connection gets credit windows both ways. [`Mux::encode_data`] charges the send window,
//! [`Mux::handle`] charges the receive window and rejects DATA past it, and [`Mux::consumed`]
//! (called as the application reads) returns credit through the same [`Output`].
//!
//! So does half-close ([`crate::ext::HALF_CLOSE`]): on a connection whose both ends listed it
//! in their HELLOs, [`Mux::finish`] sends a FIN instead of a reset, and a FIN received is
//! [`Event::Finished`]; a connection whose FINs went both ways is over.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::flow::{self, ConnCredit, Credit, CreditError, FlowConfig, Hello};
use crate::message::{MAX_PAYLOAD, MAX_SERVICES, Message, MessageRef, MessageType};
use crate::{Format, Mode, valid_name};

/// How often auto-tuning measures the round trip again (while data is consumed): with
/// [`flow::RTT_SAMPLES`] kept, a path that changed is followed within about 40 s.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// A local handle for one tunnel connection, unique for the lifetime of a [`Mux`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// Why a connection ended from the peer's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// `CONNECTION_RESET`, or `STREAM_RESET` of a one-connection (V1/V2) stream.
    ConnectionReset,
    /// `STREAM_RESET` of the stream the connection belonged to.
    StreamReset,
    /// `SESSION_RESET` from the relay.
    SessionReset,
    /// A new stream started on the same service and replaced this one.
    Replaced,
    /// The other side went away, and the connection could not be resumed (it was not
    /// resumable, the hold time ran out, or the other side no longer had it).
    NotResumed,
}

#[derive(Debug, PartialEq)]
pub enum Event {
    /// The relay told us which services the tunnel has (first `SERVICE_IDS` of the session).
    ServiceIds(Vec<String>),
    /// Destination: the source started a connection to `service`.
    Opened { id: ConnId, service: String },
    /// Bytes for a connection, in order.
    Data { id: ConnId, payload: Bytes },
    /// The peer ended a connection; no more data will arrive for it.
    Closed { id: ConnId, cause: CloseCause },
    /// The peer finished sending on a connection (half-close): no more data will arrive for
    /// it, but it still reads what this end sends.
    Finished { id: ConnId },
    /// The peer returned send credit for a connection (flow control): writers waiting for
    /// credit may go on. `budget` is set when the tunnel budget was what held them.
    Credit { id: ConnId, budget: bool },
    /// Flow control was switched on or off for connections started from now on.
    FlowControl(bool),
    /// The other side went away: the connection sends nothing until it is resumed, and what
    /// it had queued to send is dropped (it is sent again from where the peer says it is).
    Suspended { id: ConnId },
    /// The connection was resumed: its writer may go on.
    Resumed { id: ConnId },
}

/// What one call produced: messages to send (in order), credit to return, and events for the
/// application. Keep one and [`Output::clear`] it between calls: its vectors are reused.
#[derive(Debug, Default)]
pub struct Output {
    pub transmit: Vec<Message>,
    /// Flow-control credit to return: `(connection, increment)`, each sent as a WINDOW_UPDATE
    /// ([`Mux::encode_window_update`]) after `transmit`. Kept apart from `transmit` so that
    /// returning credit, which happens about once per DATA frame, allocates nothing.
    pub credit: Vec<(ConnId, u32)>,
    pub events: Vec<Event>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.transmit.is_empty() && self.credit.is_empty() && self.events.is_empty()
    }

    pub fn clear(&mut self) {
        self.transmit.clear();
        self.credit.clear();
        self.events.clear();
    }

    /// Everything to send as messages, window updates last (for callers off the hot path).
    pub fn take_messages(&mut self, mux: &Mux) -> Vec<Message> {
        let mut msgs = std::mem::take(&mut self.transmit);
        msgs.extend(
            self.credit
                .drain(..)
                .filter_map(|(id, inc)| mux.window_update(id, inc)),
        );
        msgs
    }
}

/// The peer broke the protocol: the session must end (reconnecting is allowed).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message type {0} is unknown and not marked ignorable")]
    UnknownType(i32),
    #[error("{kind:?} is not valid for a {role} to receive")]
    Unexpected { kind: MessageType, role: Mode },
    #[error("SERVICE_IDS lists {0} services (at most {MAX_SERVICES} are accepted)")]
    TooManyServices(usize),
    #[error("SERVICE_IDS contains an invalid service id {0:?}")]
    BadServiceId(String),
    #[error("{0:?} with stream id {1} (stream ids must be positive)")]
    BadStreamId(MessageType, i32),
    #[error(
        "flow control: {got} bytes of DATA for connection {conn} with only {credit} bytes of credit left"
    )]
    CreditExceeded {
        conn: ConnId,
        got: usize,
        credit: u64,
    },
    #[error("flow control: {0} bytes buffered for the tunnel, over the announced budget of {1}")]
    BudgetExceeded(u64, u64),
    #[error("flow control: malformed WINDOW_UPDATE (stream id {0}, payload of {1} bytes)")]
    BadWindowUpdate(i32, usize),
    #[error(
        "flow control: malformed WINDOW_SIZE (stream id {0}, payload of {1} bytes, or a window under the minimum)"
    )]
    BadWindowSize(i32, usize),
    #[error("resume: malformed RESUME (stream id {0}, payload of {1} bytes)")]
    BadResume(i32, usize),
}

/// A local call that cannot be carried out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MuxError {
    #[error("the relay has not sent the tunnel's service ids yet")]
    NoServiceIds,
    #[error("service {0:?} is not one of this tunnel's services ({1})")]
    UnknownService(String, String),
    #[error("the V1 format carries one service only, but this tunnel has {0}")]
    V1NeedsOneService(usize),
    #[error("connection {0} is not open")]
    NotOpen(ConnId),
    #[error("connection {0} has finished sending (half-closed)")]
    Finished(ConnId),
    #[error("only a source starts connections")]
    NotSource,
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}; split it")]
    PayloadTooLarge(usize),
    #[error("payload of {0} bytes exceeds the {1} bytes of flow-control credit left")]
    NoCredit(usize, u64),
}

#[derive(Debug)]
struct Conn {
    service: String,
    stream_id: i32,
    /// The connection id on the wire; 1 for V1/V2 streams (they carry none).
    connection_id: u32,
    format: Format,
    /// Set when the connection uses flow control (decided when it starts).
    credit: Option<ConnCredit>,
    /// Set when it can be half-closed (decided when it starts, with flow control).
    half: Option<Half>,
    /// Set when it can be resumed (decided when it starts, with flow control).
    retx: Option<Retx>,
}

/// The resume state of a resumable connection ([`crate::ext::RESUME_TOKEN`]).
#[derive(Clone, Debug, Default)]
struct Retx {
    /// Bytes sent and not yet known to have reached the peer (credited back, or counted in
    /// its RESUME): what a resume may have to send again. At most the peer's window.
    unacked: std::collections::VecDeque<u8>,
    /// The number (from the start of the connection) of the first byte of `unacked`.
    base: u64,
    /// Waiting for the peer's RESUME: sends nothing, and drops DATA and FINs received (the
    /// peer sends them again from where this end says it is).
    suspended: bool,
    /// When it was suspended (for the hold time).
    since: Option<std::time::Instant>,
}

impl Retx {
    /// Forget the bytes before byte number `upto` (the peer has them).
    fn drop_until(&mut self, upto: u64) {
        let n = upto
            .saturating_sub(self.base)
            .min(self.unacked.len() as u64);
        self.unacked.drain(..n as usize);
        self.base += n;
    }
}

/// Which FINs of a half-closable connection went which way.
#[derive(Clone, Copy, Debug, Default)]
struct Half {
    sent: bool,
    received: bool,
}

#[derive(Debug)]
struct Stream {
    id: i32,
    format: Format,
    next_connection_id: u32,
    conns: BTreeMap<u32, ConnId>,
}

#[derive(Debug, Default)]
struct ServiceState {
    /// Source: the id the next STREAM_START uses (starts at 1, wraps at `i32::MAX` to 1).
    next_stream_id: i32,
    active: Option<Stream>,
}

/// Counters of things dropped or refused, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxStats {
    /// DATA for a stream or connection that is not (or no longer) open.
    pub stale_data: u64,
    /// Resets and starts that named nothing we know, answered or ignored.
    pub stale_control: u64,
    /// Ignorable messages of unknown type that were skipped.
    pub ignored: u64,
    /// Connections started with flow control.
    pub flow_controlled: u64,
}

/// Flow-control state of a session (see [`crate::flow`]): the negotiation's state here, the
/// credit arithmetic in [`Credit`].
#[derive(Debug, Default)]
struct Flow {
    /// `None`: this end does not offer the extension.
    credit: Option<Credit>,
    /// The relay announced the extension in this session.
    relay: bool,
    /// The number of the relay's last HELLO, echoed in ours.
    epoch: u64,
    /// This end offers half-close (with flow control).
    offer_half_close: bool,
    /// This end offers auto-tuned windows (with flow control).
    offer_autotune: bool,
    /// The clock as last set ([`Mux::tick`]).
    now: Option<std::time::Instant>,
    /// The PING waiting for its answer: its nonce and when it went out.
    ping: Option<(u64, std::time::Instant)>,
    /// When the last PING went out, and the nonce of the next.
    last_ping: Option<std::time::Instant>,
    next_nonce: u64,
    /// Connections started from now on can be half-closed (both ends listed it).
    half_close: bool,
    /// This end offers resumable connections (the relay accepted `resume/1`).
    offer_resume: bool,
    /// Connections started from now on can be resumed (both ends listed it).
    resume: bool,
    /// Source: its connections were suspended and it owes their RESUMEs at the next
    /// confirmation.
    resume_round: bool,
    /// A relay HELLO came on this WebSocket (the first one greets this end: connections it
    /// opened before it are with the peer there now, not an old one).
    greeted: bool,
}

/// One end of one tunnel session.
#[derive(Debug)]
pub struct Mux {
    role: Mode,
    /// Source: the format it speaks. Destination: unused (detected per stream).
    format: Format,
    /// Destination: the service names it can serve (its rules). `None`: anything, the
    /// application decides and closes what it cannot serve.
    local_services: Option<Vec<String>>,
    service_ids: Option<Vec<String>>,
    /// The service a V1 (service-id-less) stream maps to.
    v1_service: Option<String>,
    services: HashMap<String, ServiceState>,
    conns: HashMap<ConnId, Conn>,
    next_id: u64,
    stats: MuxStats,
    flow: Flow,
}

impl Mux {
    /// A source speaking `format` (normally the one the subprotocol negotiated).
    pub fn source(format: Format) -> Mux {
        Mux::new(Mode::Source, format, None)
    }

    /// A destination. `local_services` are the services it has rules for, if known: a V1
    /// stream (which names no service) maps to the single one. Streams of a service without a
    /// rule are handed up all the same; refusing them (and saying why) is the application's job,
    /// whose rules may change while the session lives.
    pub fn destination(local_services: Option<Vec<String>>) -> Mux {
        Mux::new(Mode::Destination, Format::V3, local_services)
    }

    fn new(role: Mode, format: Format, local_services: Option<Vec<String>>) -> Mux {
        Mux {
            role,
            format,
            local_services,
            service_ids: None,
            v1_service: None,
            services: HashMap::new(),
            conns: HashMap::new(),
            next_id: 1,
            stats: MuxStats::default(),
            flow: Flow::default(),
        }
    }

    /// Offer culvert's flow-control extension (used only if the relay and the peer offer it
    /// too; see [`crate::flow`]).
    /// The window is raised to at least [`flow::MIN_WINDOW`] and the budget to at least the
    /// window, as the peer would refuse anything less.
    pub fn with_flow_control(mut self, cfg: FlowConfig) -> Mux {
        self.flow.credit = Some(Credit::new(cfg));
        self.flow.offer_half_close = true;
        self.flow.offer_autotune = true;
        self
    }

    /// Offer resumable connections (with flow control; only when the relay accepted
    /// `resume/1` for this session, since it must then keep streams across a peer change).
    pub fn with_resume(mut self) -> Mux {
        self.flow.offer_resume = self.flow.credit.is_some();
        self
    }

    /// Give back the space of resume buffers that are empty (a connection that was busy and
    /// is idle now): called when the session is idle, not as buffers empty, which a bulk
    /// transfer does once per window.
    pub fn trim_buffers(&mut self) {
        for r in self.conns.values_mut().filter_map(|c| c.retx.as_mut()) {
            if r.unacked.is_empty() && r.unacked.capacity() > 64 * 1024 {
                r.unacked.shrink_to(0);
            }
        }
    }

    /// Whether connection `id` can be resumed.
    pub fn is_resumable(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|c| c.retx.is_some())
    }

    /// Connections waiting to be resumed.
    pub fn suspended_connections(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.retx.as_ref().is_some_and(|r| r.suspended))
            .count()
    }

    /// The WebSocket to the relay is gone: connections that can be resumed are suspended
    /// (and kept for the next session on a new WebSocket), the others end. True if some are
    /// kept. Flow control is off until the new session renegotiates it.
    pub fn detach(&mut self, out: &mut Output) -> bool {
        self.flow.relay = false;
        self.flow.ping = None;
        self.flow.greeted = false;
        self.set_peer_flow(None, out);
        self.suspend_all(out, true);
        self.suspended_connections() > 0
    }

    /// Suspend every resumable connection and (`end_others`) end the others: the other side
    /// went away, or this end's WebSocket did. A stream left with no connection is forgotten:
    /// the next connection starts a new one, which a new peer knows.
    fn suspend_all(&mut self, out: &mut Output, end_others: bool) {
        let now = self.flow.now;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            match self.conns.get_mut(&id).and_then(|c| c.retx.as_mut()) {
                Some(r) if !r.suspended => {
                    r.suspended = true;
                    r.since = now;
                    out.events.push(Event::Suspended { id });
                }
                Some(_) => {}
                None if end_others => {
                    self.forget(id);
                    out.events.push(Event::Closed {
                        id,
                        cause: CloseCause::NotResumed,
                    });
                }
                None => {}
            }
        }
        for st in self.services.values_mut() {
            if st.active.as_ref().is_some_and(|s| s.conns.is_empty()) {
                st.active = None;
            }
        }
        if self.role == Mode::Source {
            self.flow.resume_round = true;
        }
    }

    /// End the suspended connections that have waited `hold` or longer (by the clock of
    /// [`Mux::tick`]); none is sent anything (the peer may not know them any more). Returns
    /// when the next of the others runs out, if any.
    pub fn expire_suspended(
        &mut self,
        hold: std::time::Duration,
        out: &mut Output,
    ) -> Option<std::time::Instant> {
        let now = self.flow.now?;
        let mut next = None;
        let mut expired = Vec::new();
        for (&id, c) in &self.conns {
            if let Some(since) = c
                .retx
                .as_ref()
                .filter(|r| r.suspended)
                .and_then(|r| r.since)
            {
                let due = since + hold;
                if due <= now {
                    expired.push(id);
                } else {
                    next = Some(next.map_or(due, |n: std::time::Instant| n.min(due)));
                }
            }
        }
        for id in expired {
            self.forget(id);
            out.events.push(Event::Closed {
                id,
                cause: CloseCause::NotResumed,
            });
        }
        next
    }

    /// End every suspended connection without sending anything (the peer cannot resume
    /// them).
    fn drop_suspended(&mut self, out: &mut Output) {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.retx.as_ref().is_some_and(|r| r.suspended))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.forget(id);
            out.events.push(Event::Closed {
                id,
                cause: CloseCause::NotResumed,
            });
        }
    }

    /// Source, at a confirmation: the RESUMEs it owes (one per suspended connection, then
    /// RESUME_END), or, when the destination cannot resume, the end of those connections.
    fn send_resumes(&mut self, peer_resumes: bool, out: &mut Output) {
        if !std::mem::take(&mut self.flow.resume_round) {
            return;
        }
        if !peer_resumes {
            self.drop_suspended(out);
            return;
        }
        for c in self.conns.values() {
            if let (Some(r), Some(cc)) = (&c.retx, &c.credit)
                && r.suspended
            {
                let fin = c.half.is_some_and(|h| h.received);
                let (service, cid) = wire_names(c);
                out.transmit.push(crate::ext::resume(
                    c.stream_id,
                    service,
                    cid,
                    cc.resume_point(fin),
                ));
            }
        }
        out.transmit.push(crate::ext::resume_end());
    }

    /// A RESUME from the peer: resume the connection it names from where the peer is, or end
    /// it (with a reset) if that cannot be done.
    fn on_resume(&mut self, msg: &MessageRef<'_>, out: &mut Output) -> Result<(), ProtocolError> {
        let Some(at) = crate::ext::ResumePoint::decode(&msg.payload).filter(|_| msg.stream_id > 0)
        else {
            return Err(ProtocolError::BadResume(msg.stream_id, msg.payload.len()));
        };
        if !self.flow.offer_resume {
            self.stats.ignored += 1;
            return Ok(());
        }
        let Some(id) = self.lookup(msg.service_id, msg.stream_id, msg.connection_id) else {
            self.stats.stale_control += 1;
            if self.role == Mode::Destination {
                // Not ours (this end restarted, or it ended here meanwhile).
                let v3_stream_known = self
                    .resolve_service(msg.service_id)
                    .and_then(|s| self.services.get(&s))
                    .and_then(|st| st.active.as_ref())
                    .is_some_and(|st| st.id == msg.stream_id && st.format == Format::V3);
                out.transmit.push(if v3_stream_known {
                    Message::connection_reset(msg.stream_id, msg.service_id, msg.connection_id)
                } else {
                    Message::stream_reset(msg.stream_id, msg.service_id)
                });
            }
            return Ok(());
        };
        let role = self.role;
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        let resumed = match (
            c.retx.as_mut().filter(|r| r.suspended),
            c.credit.as_mut(),
            self.flow.credit.as_mut(),
        ) {
            (Some(r), Some(cc), Some(credit)) => {
                // Ours first (the destination answers), then what the peer has not received.
                let own = cc.resume_point(c.half.is_some_and(|h| h.received));
                credit.resumed(cc, &at).map(|received| {
                    r.drop_until(received);
                    r.suspended = false;
                    r.since = None;
                    (own, std::mem::take(&mut r.unacked))
                })
            }
            _ => None,
        };
        let Some((own, pending)) = resumed else {
            // Live already, not resumable, or an impossible point: end it on both ends.
            self.stats.stale_control += 1;
            self.close(id, out);
            out.events.push(Event::Closed {
                id,
                cause: CloseCause::NotResumed,
            });
            return Ok(());
        };
        let c = &self.conns[&id];
        let (service, cid) = wire_names(c);
        if role == Mode::Destination {
            out.transmit
                .push(crate::ext::resume(c.stream_id, service, cid, own));
        }
        let (a, b) = pending.as_slices();
        let mut bytes = Vec::with_capacity(pending.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        let bytes = Bytes::from(bytes);
        let mut at_byte = 0;
        while at_byte < bytes.len() {
            let end = (at_byte + MAX_PAYLOAD).min(bytes.len());
            out.transmit.push(Message::data(
                c.stream_id,
                service,
                cid,
                bytes.slice(at_byte..end),
            ));
            at_byte = end;
        }
        if c.half.is_some_and(|h| h.sent) && !at.fin_received {
            out.transmit
                .push(crate::ext::fin(c.stream_id, service, cid));
        }
        if let Some(r) = self.conns.get_mut(&id).and_then(|c| c.retx.as_mut()) {
            r.unacked = pending;
        }
        out.events.push(Event::Resumed { id });
        Ok(())
    }

    /// Destination: the source named every connection it resumes; those still suspended
    /// here it no longer has.
    fn on_resume_end(&mut self, out: &mut Output) {
        if self.role == Mode::Destination && self.flow.offer_resume {
            self.drop_suspended(out);
        } else {
            self.stats.ignored += 1;
        }
    }

    /// Keep every window at its configured size (as a culvert end older than auto-tuning
    /// does), though flow control is offered.
    pub fn without_autotune(mut self) -> Mux {
        self.flow.offer_autotune = false;
        self
    }

    /// The time now, for auto-tuned windows: the session sets it before handing in what it
    /// received or what its application consumed. Without it, windows keep their size.
    pub fn tick(&mut self, now: std::time::Instant) {
        self.flow.now = Some(now);
        if let Some(c) = self.flow.credit.as_mut() {
            c.tick(now);
        }
    }

    /// Measure the round trip with a PING, if auto-tuning is on and the last one is older
    /// than [`PING_INTERVAL`] (or its answer never came).
    fn maybe_ping(&mut self, out: &mut Output) {
        let (Some(now), Some(credit)) = (self.flow.now, self.flow.credit.as_ref()) else {
            return;
        };
        if !credit.autotune()
            || self
                .flow
                .last_ping
                .is_some_and(|t| now.saturating_duration_since(t) < PING_INTERVAL)
        {
            return;
        }
        self.flow.next_nonce += 1;
        let nonce = self.flow.next_nonce;
        self.flow.ping = Some((nonce, now));
        self.flow.last_ping = Some(now);
        out.transmit.push(flow::ping(nonce, false));
    }

    /// A PING (answered at once) or the answer to ours (a round-trip sample).
    fn on_ping(&mut self, msg: &MessageRef<'_>, out: &mut Output) {
        let Ok(b) = <[u8; 8]>::try_from(&msg.payload[..]) else {
            self.stats.ignored += 1;
            return;
        };
        let nonce = u64::from_be_bytes(b);
        if msg.r#type == flow::PING {
            out.transmit.push(flow::ping(nonce, true));
            return;
        }
        match (self.flow.ping, self.flow.now, self.flow.credit.as_mut()) {
            (Some((n, sent)), Some(now), Some(credit)) if n == nonce => {
                credit.rtt_sample(now.saturating_duration_since(sent));
                self.flow.ping = None;
            }
            _ => self.stats.stale_control += 1,
        }
    }

    /// The shortest round trip measured to the peer (auto-tuning), if any.
    pub fn min_rtt(&self) -> Option<std::time::Duration> {
        self.flow.credit.as_ref()?.min_rtt()
    }

    /// The window connection `id` grants the peer now, if it uses flow control.
    pub fn granted_window(&self, id: ConnId) -> Option<u64> {
        self.conns.get(&id)?.credit.map(|c| c.granted())
    }

    /// Do not offer half-close (as a culvert end older than it behaves), though flow control
    /// is offered.
    pub fn without_half_close(mut self) -> Mux {
        self.flow.offer_half_close = false;
        self
    }

    /// Whether connections started from now on use flow control.
    pub fn flow_control_active(&self) -> bool {
        self.flow
            .credit
            .as_ref()
            .is_some_and(|c| c.peer().is_some())
    }

    /// Whether connection `id` uses flow control.
    pub fn is_flow_controlled(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|c| c.credit.is_some())
    }

    /// Whether connection `id` can be half-closed ([`Mux::finish`]).
    pub fn is_half_closable(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|c| c.half.is_some())
    }

    /// Credit for a new connection, if flow control is on, and its half-close state, if both
    /// ends offer that too.
    fn new_credit(&mut self) -> (Option<ConnCredit>, Option<Half>, Option<Retx>) {
        let Some(c) = self.flow.credit.as_ref().and_then(Credit::open) else {
            return (None, None, None);
        };
        self.stats.flow_controlled += 1;
        (
            Some(c),
            self.flow.half_close.then(Half::default),
            self.flow.resume.then(Retx::default),
        )
    }

    pub fn role(&self) -> Mode {
        self.role
    }

    pub fn service_ids(&self) -> Option<&[String]> {
        self.service_ids.as_deref()
    }

    pub fn stats(&self) -> MuxStats {
        self.stats
    }

    /// Number of open connections.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// The service a connection belongs to.
    pub fn service_of(&self, id: ConnId) -> Option<&str> {
        self.conns.get(&id).map(|c| c.service.as_str())
    }

    pub fn is_open(&self, id: ConnId) -> bool {
        self.conns.contains_key(&id)
    }

    fn alloc(&mut self) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Handle one message decoded without allocation ([`crate::frame::decode_ref`]): DATA and
    /// credit updates are handled in place, anything else as [`Mux::handle`].
    pub fn handle_ref(
        &mut self,
        msg: MessageRef<'_>,
        out: &mut Output,
    ) -> Result<(), ProtocolError> {
        if msg.r#type == MessageType::Data as i32 {
            if msg.stream_id <= 0 {
                return Err(ProtocolError::BadStreamId(MessageType::Data, msg.stream_id));
            }
            return self.on_data(&msg, out);
        }
        if msg.r#type == flow::WINDOW_UPDATE && self.flow.credit.is_some() {
            return self.on_window_update(&msg, out);
        }
        if msg.r#type == flow::WINDOW_SIZE && self.flow.credit.is_some() {
            return self.on_window_size(&msg, out);
        }
        if (msg.r#type == flow::PING || msg.r#type == flow::PONG) && self.flow.credit.is_some() {
            self.on_ping(&msg, out);
            return Ok(());
        }
        if msg.r#type == crate::ext::FIN && self.flow.credit.is_some() {
            self.on_fin(&msg, out);
            return Ok(());
        }
        if msg.r#type == crate::ext::RESUME && self.flow.credit.is_some() {
            return self.on_resume(&msg, out);
        }
        self.handle(msg.to_message(), out)
    }

    /// Handle one message received from the peer (through the relay).
    pub fn handle(&mut self, msg: Message, out: &mut Output) -> Result<(), ProtocolError> {
        if self.flow.credit.is_some() {
            match msg.r#type {
                flow::HELLO => {
                    self.on_hello(&msg, out);
                    return Ok(());
                }
                flow::WINDOW_UPDATE => return self.on_window_update(&(&msg).into(), out),
                flow::WINDOW_SIZE => return self.on_window_size(&(&msg).into(), out),
                flow::PING | flow::PONG => {
                    self.on_ping(&(&msg).into(), out);
                    return Ok(());
                }
                crate::ext::FIN => {
                    self.on_fin(&(&msg).into(), out);
                    return Ok(());
                }
                crate::ext::RESUME => return self.on_resume(&(&msg).into(), out),
                crate::ext::RESUME_END => {
                    self.on_resume_end(out);
                    return Ok(());
                }
                _ => {}
            }
        }
        let Some(kind) = msg.kind() else {
            if msg.ignorable {
                self.stats.ignored += 1;
                return Ok(());
            }
            return Err(ProtocolError::UnknownType(msg.r#type));
        };
        if kind.is_stream_bound() && msg.stream_id <= 0 {
            return Err(ProtocolError::BadStreamId(kind, msg.stream_id));
        }
        match kind {
            MessageType::Unknown => Err(ProtocolError::UnknownType(0)),
            MessageType::ServiceIds => self.on_service_ids(msg, out),
            MessageType::SessionReset => {
                self.close_all(CloseCause::SessionReset, out);
                Ok(())
            }
            MessageType::StreamStart if self.role == Mode::Destination => {
                self.on_stream_start(msg, out);
                Ok(())
            }
            MessageType::ConnectionStart if self.role == Mode::Destination => {
                self.on_connection_start(msg, out);
                Ok(())
            }
            MessageType::StreamStart | MessageType::ConnectionStart => {
                Err(ProtocolError::Unexpected {
                    kind,
                    role: self.role,
                })
            }
            MessageType::Data => self.on_data(&(&msg).into(), out),
            MessageType::StreamReset => {
                let service = self.resolve_service(&msg.service_id);
                let current = service
                    .as_deref()
                    .and_then(|s| self.services.get(s))
                    .and_then(|st| st.active.as_ref())
                    .is_some_and(|stream| stream.id == msg.stream_id);
                match (current, service) {
                    (true, Some(s)) => self.end_stream(&s, CloseCause::StreamReset, out),
                    _ => self.stats.stale_control += 1,
                }
                Ok(())
            }
            MessageType::ConnectionReset => {
                match self.lookup(&msg.service_id, msg.stream_id, msg.connection_id) {
                    Some(id) => {
                        self.forget(id);
                        out.events.push(Event::Closed {
                            id,
                            cause: CloseCause::ConnectionReset,
                        });
                    }
                    None => self.stats.stale_control += 1,
                }
                Ok(())
            }
        }
    }

    fn on_data(&mut self, msg: &MessageRef<'_>, out: &mut Output) -> Result<(), ProtocolError> {
        match self.lookup(msg.service_id, msg.stream_id, msg.connection_id) {
            Some(id) if self.conns[&id].half.is_some_and(|h| h.received) => {
                // Past the peer's own FIN: its bug, counted like data after a reset.
                self.stats.stale_data += 1
            }
            Some(id) if self.conns[&id].retx.as_ref().is_some_and(|r| r.suspended) => {
                // Sent again after the resume, from where this end says it is.
                self.stats.stale_data += 1
            }
            Some(id) => {
                self.charge_received(id, msg.payload.len())?;
                self.flush_if_budget_tight(out);
                out.events.push(Event::Data {
                    id,
                    payload: msg.payload.clone(),
                })
            }
            None => self.stats.stale_data += 1,
        }
        Ok(())
    }

    /// A HELLO from the relay or the peer: negotiate flow control (see [`crate::flow`]).
    fn on_hello(&mut self, msg: &Message, out: &mut Output) {
        let Some(own) = self.flow.credit.as_ref().map(Credit::own) else {
            return;
        };
        let Some(h) = Hello::from_message(msg) else {
            self.stats.ignored += 1;
            return;
        };
        let me = self.role.as_str();
        if h.from == "relay" {
            self.flow.epoch = h.epoch;
        }
        let epoch = self.flow.epoch;
        let (offer_half_close, offer_autotune, offer_resume) = (
            self.flow.offer_half_close,
            self.flow.offer_autotune,
            self.flow.offer_resume,
        );
        let lists = |f: &str| h.features.iter().any(|x| x == f);
        let half_close = offer_half_close && lists(crate::ext::HALF_CLOSE);
        let autotune = offer_autotune && lists(flow::AUTOTUNE);
        let resume = offer_resume && lists(crate::ext::RESUME_TOKEN);
        let hello = |confirm: bool, reply: bool| {
            let mut features = vec![flow::FEATURE.to_owned()];
            if offer_half_close {
                features.push(crate::ext::HALF_CLOSE.to_owned());
            }
            if offer_autotune {
                features.push(flow::AUTOTUNE.to_owned());
            }
            if offer_resume {
                features.push(crate::ext::RESUME_TOKEN.to_owned());
            }
            Hello {
                from: me.into(),
                features,
                window: own.window,
                budget: own.budget,
                confirm,
                reply,
                epoch,
            }
            .to_message()
        };
        // What the peer grants, if its announcement is usable.
        let grants = || {
            (h.supports_flow_control()
                && h.window >= flow::MIN_WINDOW
                && h.budget >= h.window as u64)
                .then_some(FlowConfig {
                    window: h.window,
                    budget: h.budget,
                })
        };
        match (self.role, h.from.as_str()) {
            (_, "relay") => {
                // Start of the session, or the peer came or went: off until renegotiated.
                self.flow.relay = h.supports_flow_control();
                self.set_peer_flow(None, out);
                if offer_resume {
                    // The relay keeps the streams for a resume instead of resetting them. The
                    // first HELLO on a WebSocket greets this end: what it opened on it before
                    // is with the peer there now.
                    let greeted = std::mem::replace(&mut self.flow.greeted, true);
                    self.suspend_all(out, greeted);
                }
                if self.flow.relay {
                    out.transmit.push(hello(false, false));
                }
            }
            (Mode::Source, "destination") if self.flow.relay => {
                if let Some(g) = grants() {
                    // Confirm first: connections started after it use flow control.
                    out.transmit.push(hello(true, false));
                    self.set_peer_flow(Some(g), out);
                    self.flow.half_close = half_close;
                    self.flow.resume = resume;
                    self.set_autotune(autotune);
                    self.send_resumes(resume, out);
                    self.maybe_ping(out);
                }
            }
            (Mode::Destination, "source") if self.flow.relay => {
                if h.confirm {
                    let g = grants();
                    self.flow.half_close = g.is_some() && half_close;
                    self.flow.resume = g.is_some() && resume;
                    self.set_autotune(g.is_some() && autotune);
                    self.set_peer_flow(g, out);
                    if !self.flow.resume {
                        // Its RESUMEs would follow; a source that cannot resume sends none.
                        self.drop_suspended(out);
                    }
                    self.maybe_ping(out);
                } else {
                    self.set_peer_flow(None, out);
                    if grants().is_some() {
                        out.transmit.push(hello(false, true));
                    }
                }
            }
            _ => self.stats.ignored += 1,
        }
    }

    fn set_autotune(&mut self, on: bool) {
        if let Some(c) = self.flow.credit.as_mut() {
            c.set_autotune(on);
        }
    }

    fn set_peer_flow(&mut self, peer: Option<FlowConfig>, out: &mut Output) {
        let on = peer.is_some();
        if !on {
            self.flow.half_close = false;
            self.flow.resume = false;
            self.set_autotune(false);
        }
        if let Some(credit) = self.flow.credit.as_mut()
            && credit.set_peer(peer)
        {
            out.events.push(Event::FlowControl(on));
        }
    }

    fn on_window_update(
        &mut self,
        msg: &MessageRef<'_>,
        out: &mut Output,
    ) -> Result<(), ProtocolError> {
        let inc = match flow::increment(&msg.payload) {
            Some(inc) if msg.stream_id > 0 => inc as u64,
            _ => {
                return Err(ProtocolError::BadWindowUpdate(
                    msg.stream_id,
                    msg.payload.len(),
                ));
            }
        };
        // Credit for a connection that has ended is stale: its bytes were given back on close.
        let Some((id, credit, c)) = self.credit_named(msg) else {
            return Ok(());
        };
        let budget = credit.credited(c, inc);
        let acked = c.sent_all().1;
        if let Some(r) = self.conns.get_mut(&id).and_then(|c| c.retx.as_mut()) {
            r.drop_until(acked);
        }
        out.events.push(Event::Credit { id, budget });
        Ok(())
    }

    /// The flow-controlled connection a credit message names, with the tunnel's credit state;
    /// `None` (counted as stale) for one that has ended or has no flow control.
    fn credit_named(
        &mut self,
        msg: &MessageRef<'_>,
    ) -> Option<(ConnId, &mut Credit, &mut ConnCredit)> {
        let id = self.lookup(msg.service_id, msg.stream_id, msg.connection_id);
        let found = id.and_then(|id| {
            let c = self.conns.get_mut(&id)?.credit.as_mut()?;
            Some((id, self.flow.credit.as_mut()?, c))
        });
        if found.is_none() {
            self.stats.stale_control += 1;
        }
        found
    }

    /// The peer resized our window on a connection (auto-tuning).
    fn on_window_size(
        &mut self,
        msg: &MessageRef<'_>,
        out: &mut Output,
    ) -> Result<(), ProtocolError> {
        let Some(window) = flow::size(&msg.payload).filter(|_| msg.stream_id > 0) else {
            return Err(ProtocolError::BadWindowSize(
                msg.stream_id,
                msg.payload.len(),
            ));
        };
        let Some((id, credit, c)) = self.credit_named(msg) else {
            return Ok(());
        };
        if credit.resized(c, window) {
            out.events.push(Event::Credit { id, budget: false });
        }
        Ok(())
    }

    /// A FIN from the peer: it finished sending on a connection. One for a connection that
    /// cannot be half-closed (or a second one) changes nothing and is counted.
    fn on_fin(&mut self, msg: &MessageRef<'_>, out: &mut Output) {
        let Some(id) = self.lookup(msg.service_id, msg.stream_id, msg.connection_id) else {
            self.stats.stale_control += 1;
            return;
        };
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.retx.as_ref().is_some_and(|r| r.suspended) {
            // Sent again after the resume (its RESUME says whether it arrived).
            self.stats.stale_control += 1;
            return;
        }
        let Some(half) = c.half.as_mut() else {
            self.stats.stale_control += 1;
            return;
        };
        if std::mem::replace(&mut half.received, true) {
            self.stats.stale_control += 1;
            return;
        }
        let over = half.sent;
        out.events.push(Event::Finished { id });
        if over {
            self.forget(id);
        }
    }

    /// Half-close connection `id` from our side (the local application finished sending):
    /// the FIN goes out after its DATA, and the connection still reads. False, sending
    /// nothing, when it cannot be half-closed ([`Mux::is_half_closable`]): then
    /// [`Mux::close`] it. A connection whose FINs have gone both ways is over.
    pub fn finish(&mut self, id: ConnId, out: &mut Output) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return false;
        };
        let Some(half) = c.half.as_mut() else {
            return false;
        };
        if std::mem::replace(&mut half.sent, true) {
            return true;
        }
        let over = half.received;
        if c.retx.as_ref().is_some_and(|r| r.suspended) {
            // Sent with the resume, after the data the peer has not received.
            return true;
        }
        let (service, cid) = wire_names(c);
        out.transmit
            .push(crate::ext::fin(c.stream_id, service, cid));
        if over {
            self.forget(id);
        }
        true
    }

    /// Account for `n` bytes of DATA received on `id`; past the credit is a protocol error.
    fn charge_received(&mut self, id: ConnId, n: usize) -> Result<(), ProtocolError> {
        let (Some(credit), Some(c)) = (
            self.flow.credit.as_mut(),
            self.conns.get_mut(&id).and_then(|c| c.credit.as_mut()),
        ) else {
            return Ok(());
        };
        credit.received(c, n as u64).map_err(|e| match e {
            CreditError::Window { credit, .. } => ProtocolError::CreditExceeded {
                conn: id,
                got: n,
                credit,
            },
            CreditError::Budget { total, budget } => ProtocolError::BudgetExceeded(total, budget),
        })
    }

    /// The application consumed `n` bytes received on `id`: return credit to the peer, in
    /// batches of a quarter window, and every connection's batch when they could hold up the
    /// peer's budget ([`Credit::must_flush`]). No-op for connections without flow control.
    pub fn consumed(&mut self, id: ConnId, n: usize, out: &mut Output) {
        let (Some(credit), Some(c)) = (
            self.flow.credit.as_mut(),
            self.conns.get_mut(&id).and_then(|c| c.credit.as_mut()),
        ) else {
            return;
        };
        if let Some(inc) = credit.consumed(c, n as u64) {
            out.credit.push((id, inc));
        }
        if let Some(window) = credit.retune(c) {
            let conn = &self.conns[&id];
            let (service, cid) = wire_names(conn);
            out.transmit
                .push(flow::window_size(conn.stream_id, service, cid, window));
        }
        self.maybe_ping(out);
        self.flush_if_budget_tight(out);
    }

    /// Return every connection's batched credit if [`Credit::must_flush`] says so.
    fn flush_if_budget_tight(&mut self, out: &mut Output) {
        let Some(credit) = self.flow.credit.as_mut() else {
            return;
        };
        if !credit.must_flush() {
            return;
        }
        for (&id, conn) in self.conns.iter_mut() {
            if let Some(inc) = conn.credit.as_mut().and_then(|c| credit.take_return(c)) {
                out.credit.push((id, inc));
            }
        }
    }

    /// Whether writers waiting for the tunnel budget should look again: a connection that
    /// ended gave its bytes back. Clears the flag (call after closing connections).
    pub fn take_budget_freed(&mut self) -> bool {
        self.flow
            .credit
            .as_mut()
            .is_some_and(Credit::take_budget_freed)
    }

    /// The WINDOW_UPDATE returning `inc` bytes of credit for connection `id` (from
    /// [`Output::credit`]); `None` if it has closed since (its credit went with it).
    pub fn window_update(&self, id: ConnId, inc: u32) -> Option<Message> {
        let c = self.conns.get(&id)?;
        let (service, cid) = wire_names(c);
        Some(flow::window_update(c.stream_id, service, cid, inc))
    }

    /// Append the frame of [`Mux::window_update`] to `out` without building a message;
    /// false (nothing appended) if the connection has closed since.
    pub fn encode_window_update(
        &self,
        id: ConnId,
        inc: u32,
        out: &mut impl crate::frame::FrameBuf,
    ) -> bool {
        let Some(c) = self.conns.get(&id) else {
            return false;
        };
        let (service, cid) = wire_names(c);
        crate::frame::encode_window_update(c.stream_id, service, cid, inc, out).is_ok()
    }

    /// How many bytes connection `id` may send now: `None` without flow control (no limit).
    pub fn send_credit(&self, id: ConnId) -> Result<Option<usize>, MuxError> {
        let c = self.conns.get(&id).ok_or(MuxError::NotOpen(id))?;
        if c.retx.as_ref().is_some_and(|r| r.suspended) {
            return Ok(Some(0));
        }
        Ok(match (&self.flow.credit, &c.credit) {
            (Some(credit), Some(cc)) => {
                Some(credit.available(cc).bytes.min(usize::MAX as u64) as usize)
            }
            _ => None,
        })
    }

    /// A writer of `id` found no credit and waits: if the tunnel budget is what holds it,
    /// the next credit for any connection wakes every writer ([`Event::Credit`]).
    pub fn wait_for_credit(&mut self, id: ConnId) {
        if let (Some(credit), Some(cc)) = (
            self.flow.credit.as_mut(),
            self.conns.get(&id).and_then(|c| c.credit.as_ref()),
        ) {
            credit.waiting(cc);
        }
    }

    fn on_service_ids(&mut self, msg: Message, out: &mut Output) -> Result<(), ProtocolError> {
        if self.service_ids.is_some() {
            // The localproxy ignores later SERVICE_IDS during a session; so do we.
            self.stats.stale_control += 1;
            return Ok(());
        }
        if msg.available_service_ids.len() > MAX_SERVICES {
            return Err(ProtocolError::TooManyServices(
                msg.available_service_ids.len(),
            ));
        }
        let mut ids: Vec<String> = Vec::new();
        for id in msg.available_service_ids {
            if !valid_name(&id) {
                return Err(ProtocolError::BadServiceId(id));
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        self.service_ids = Some(ids.clone());
        out.events.push(Event::ServiceIds(ids));
        Ok(())
    }

    /// The service a message names; the empty id (V1) maps to the tunnel's single service.
    fn resolve_service(&self, service_id: &str) -> Option<String> {
        if !service_id.is_empty() {
            return Some(service_id.to_owned());
        }
        if let Some(s) = &self.v1_service {
            return Some(s.clone());
        }
        let single = |v: &Vec<String>| (v.len() == 1).then(|| v[0].clone());
        self.local_services
            .as_ref()
            .and_then(single)
            .or_else(|| self.service_ids.as_ref().and_then(single))
    }

    fn lookup(&self, service_id: &str, stream_id: i32, connection_id: u32) -> Option<ConnId> {
        let service: &str = if service_id.is_empty() {
            self.v1_service.as_deref()?
        } else {
            service_id
        };
        let stream = self.services.get(service)?.active.as_ref()?;
        if stream.id != stream_id {
            return None;
        }
        let cid = if stream.format == Format::V3 {
            connection_id.max(1)
        } else {
            1
        };
        stream.conns.get(&cid).copied()
    }

    fn on_stream_start(&mut self, msg: Message, out: &mut Output) {
        let format = if msg.service_id.is_empty() {
            Format::V1
        } else if msg.connection_id == 0 {
            Format::V2
        } else {
            Format::V3
        };
        let service = match self.resolve_service(&msg.service_id) {
            Some(s) => s,
            _ => {
                self.stats.stale_control += 1;
                out.transmit
                    .push(Message::stream_reset(msg.stream_id, &msg.service_id));
                return;
            }
        };
        if format == Format::V1 {
            self.v1_service = Some(service.clone());
        }
        self.end_stream(&service, CloseCause::Replaced, out);
        let cid = msg.connection_id.max(1);
        let id = self.alloc();
        let (credit, half, retx) = self.new_credit();
        let mut conns = BTreeMap::new();
        conns.insert(cid, id);
        self.services.entry(service.clone()).or_default().active = Some(Stream {
            id: msg.stream_id,
            format,
            next_connection_id: cid.wrapping_add(1).max(1),
            conns,
        });
        self.conns.insert(
            id,
            Conn {
                service: service.clone(),
                stream_id: msg.stream_id,
                connection_id: cid,
                format,
                credit,
                half,
                retx,
            },
        );
        out.events.push(Event::Opened { id, service });
    }

    fn on_connection_start(&mut self, msg: Message, out: &mut Output) {
        let cid = msg.connection_id;
        let id = self.alloc();
        let (credit, half, retx) = self.new_credit();
        let service = self.resolve_service(&msg.service_id);
        let stream = service
            .as_deref()
            .and_then(|s| self.services.get_mut(s))
            .and_then(|st| st.active.as_mut())
            .filter(|s| s.id == msg.stream_id && s.format == Format::V3);
        match (stream, service) {
            (Some(stream), Some(service)) if cid != 0 && !stream.conns.contains_key(&cid) => {
                stream.conns.insert(cid, id);
                self.conns.insert(
                    id,
                    Conn {
                        service: service.clone(),
                        stream_id: msg.stream_id,
                        connection_id: cid,
                        format: Format::V3,
                        credit,
                        half,
                        retx,
                    },
                );
                out.events.push(Event::Opened { id, service });
            }
            _ => {
                // Unknown stream, or a connection id already in use: refuse this connection.
                self.stats.stale_control += 1;
                out.transmit.push(Message::connection_reset(
                    msg.stream_id,
                    &msg.service_id,
                    cid,
                ));
            }
        }
    }

    /// End the active stream of `service` (if any), reporting its connections as closed.
    fn end_stream(&mut self, service: &str, cause: CloseCause, out: &mut Output) {
        let Some(stream) = self.services.get_mut(service).and_then(|s| s.active.take()) else {
            return;
        };
        for id in stream.conns.into_values() {
            if let Some(c) = self.conns.remove(&id) {
                self.release_credit(&c);
            }
            let cause = if stream.format == Format::V3 {
                cause
            } else if cause == CloseCause::StreamReset {
                CloseCause::ConnectionReset
            } else {
                cause
            };
            out.events.push(Event::Closed { id, cause });
        }
    }

    fn close_all(&mut self, cause: CloseCause, out: &mut Output) {
        let services: Vec<String> = self.services.keys().cloned().collect();
        for s in services {
            self.end_stream(&s, cause, out);
        }
    }

    /// Remove a connection from the tables; ends a V1/V2 stream with it.
    fn forget(&mut self, id: ConnId) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        self.release_credit(&conn);
        if let Some(state) = self.services.get_mut(&conn.service)
            && let Some(stream) = state.active.as_mut().filter(|s| s.id == conn.stream_id)
        {
            stream.conns.remove(&conn.connection_id);
            if stream.format != Format::V3 {
                state.active = None;
            }
        }
        Some(conn)
    }

    /// A connection ended: what it had in flight or buffered no longer counts against the
    /// tunnel budget, on either end.
    fn release_credit(&mut self, conn: &Conn) {
        if let (Some(credit), Some(c)) = (self.flow.credit.as_mut(), conn.credit) {
            credit.closed(c);
        }
    }

    /// Source: start a new connection to `service`.
    pub fn open(&mut self, service: &str, out: &mut Output) -> Result<ConnId, MuxError> {
        if self.role != Mode::Source {
            return Err(MuxError::NotSource);
        }
        let ids = self.service_ids.as_ref().ok_or(MuxError::NoServiceIds)?;
        if !ids.iter().any(|s| s == service) {
            return Err(MuxError::UnknownService(service.to_owned(), ids.join(", ")));
        }
        if self.format == Format::V1 {
            if ids.len() > 1 {
                return Err(MuxError::V1NeedsOneService(ids.len()));
            }
            self.v1_service = Some(service.to_owned());
        }
        let format = self.format;
        let id = self.alloc();
        let (credit, half, retx) = self.new_credit();
        let state = self.services.entry(service.to_owned()).or_default();
        let wire_service = if format == Format::V1 { "" } else { service };
        if format == Format::V3
            && let Some(stream) = state.active.as_mut()
        {
            let cid = stream.next_connection_id;
            stream.next_connection_id = cid.wrapping_add(1).max(1);
            stream.conns.insert(cid, id);
            out.transmit
                .push(Message::connection_start(stream.id, wire_service, cid));
            let stream_id = stream.id;
            self.conns.insert(
                id,
                Conn {
                    service: service.to_owned(),
                    stream_id,
                    connection_id: cid,
                    format,
                    credit,
                    half,
                    retx,
                },
            );
            return Ok(id);
        }
        // A new stream. In V1/V2 it replaces the service's current connection, if any.
        let old = state.active.take();
        let old_stream = old.as_ref().map(|s| s.id);
        let replaced: Vec<ConnId> = old
            .map(|s| s.conns.into_values().collect())
            .unwrap_or_default();
        let stream_id = state.next_stream_id.max(1);
        state.next_stream_id = if stream_id == i32::MAX {
            1
        } else {
            stream_id + 1
        };
        let wire_cid = if format == Format::V3 { 1 } else { 0 };
        let mut conns = BTreeMap::new();
        conns.insert(1, id);
        state.active = Some(Stream {
            id: stream_id,
            format,
            next_connection_id: 2,
            conns,
        });
        for old in &replaced {
            if let Some(c) = self.conns.remove(old) {
                self.release_credit(&c);
            }
            out.events.push(Event::Closed {
                id: *old,
                cause: CloseCause::Replaced,
            });
        }
        if let (Some(old), false) = (old_stream, replaced.is_empty()) {
            // The old connection ends first, as the localproxy does it: a localproxy
            // destination resets a new stream that starts while one is open.
            out.transmit.push(Message::stream_reset(old, wire_service));
        }
        out.transmit
            .push(Message::stream_start(stream_id, wire_service, wire_cid));
        self.conns.insert(
            id,
            Conn {
                service: service.to_owned(),
                stream_id,
                connection_id: 1,
                format,
                credit,
                half,
                retx,
            },
        );
        Ok(id)
    }

    /// A DATA message carrying `payload` (at most [`MAX_PAYLOAD`] bytes) for connection `id`.
    /// Charged against flow-control credit like [`Mux::encode_data`].
    pub fn data(&mut self, id: ConnId, payload: Bytes) -> Result<Message, MuxError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(MuxError::PayloadTooLarge(payload.len()));
        }
        self.charge_send(id, &payload)?;
        let c = self.conns.get(&id).ok_or(MuxError::NotOpen(id))?;
        let (service, cid) = wire_names(c);
        Ok(Message::data(c.stream_id, service, cid, payload))
    }

    /// Append the DATA frame carrying `payload` (at most [`MAX_PAYLOAD`] bytes) for connection
    /// `id` to `out`, without building a [`Message`]: what writers use per write. With flow
    /// control, fails with [`MuxError::NoCredit`] (sending nothing) past the credit
    /// ([`Mux::send_credit`] says how much there is).
    pub fn encode_data(
        &mut self,
        id: ConnId,
        payload: &[u8],
        out: &mut impl crate::frame::FrameBuf,
    ) -> Result<(), MuxError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(MuxError::PayloadTooLarge(payload.len()));
        }
        self.charge_send(id, payload)?;
        let c = self.conns.get(&id).ok_or(MuxError::NotOpen(id))?;
        let (service, cid) = wire_names(c);
        crate::frame::encode_data(c.stream_id, service, cid, payload, out)
            .map_err(|_| MuxError::PayloadTooLarge(payload.len()))
    }

    /// Charge `payload` against the connection's credit, and keep it until the peer has it if
    /// the connection can be resumed.
    fn charge_send(&mut self, id: ConnId, payload: &[u8]) -> Result<(), MuxError> {
        let n = payload.len();
        let c = self.conns.get_mut(&id).ok_or(MuxError::NotOpen(id))?;
        if c.half.is_some_and(|h| h.sent) {
            return Err(MuxError::Finished(id));
        }
        if c.retx.as_ref().is_some_and(|r| r.suspended) {
            return Err(MuxError::NoCredit(n, 0));
        }
        if let (Some(credit), Some(cc)) = (self.flow.credit.as_mut(), c.credit.as_mut()) {
            credit
                .sent(cc, n as u64)
                .map_err(|avail| MuxError::NoCredit(n, avail.bytes))?;
        }
        if let Some(r) = c.retx.as_mut() {
            r.unacked.extend(payload);
        }
        Ok(())
    }

    /// Close connection `id` from our side (local EOF, error, or a target that refused).
    /// Closing a connection that is already gone is a no-op.
    pub fn close(&mut self, id: ConnId, out: &mut Output) {
        let Some(c) = self.forget(id) else { return };
        if c.retx.as_ref().is_some_and(|r| r.suspended) {
            // The peer (perhaps a new one, or a relay that restarted) may not know it: it
            // learns at the resume that this end no longer has it.
            return;
        }
        let (service, cid) = wire_names(&c);
        out.transmit.push(match c.format {
            Format::V3 => Message::connection_reset(c.stream_id, service, cid),
            Format::V1 | Format::V2 => Message::stream_reset(c.stream_id, service),
        });
    }
}

/// The service id and connection id a connection's messages carry on the wire.
fn wire_names(c: &Conn) -> (&str, u32) {
    match c.format {
        Format::V1 => ("", 0),
        Format::V2 => (&c.service, 0),
        Format::V3 => (&c.service, c.connection_id),
    }
}

#[cfg(test)]
mod tests {
    //! The multiplexer as an in-memory pair: a source and a destination wired through a
    //! "relay" that passes messages verbatim, as culvert-relay and AWS's service do.
    use super::*;

    struct Pair {
        src: Mux,
        dst: Mux,
        /// Events seen by each side, drained by the tests.
        src_events: Vec<Event>,
        dst_events: Vec<Event>,
    }

    impl Pair {
        fn new(format: Format, services: &[&str]) -> Pair {
            let ids: Vec<String> = services.iter().map(|s| s.to_string()).collect();
            let mut p = Pair {
                src: Mux::source(format),
                dst: Mux::destination(Some(ids.clone())),
                src_events: vec![],
                dst_events: vec![],
            };
            let mut out = Output::default();
            p.src.handle(Message::service_ids(&ids), &mut out).unwrap();
            p.dst.handle(Message::service_ids(&ids), &mut out).unwrap();
            assert!(out.transmit.is_empty());
            p
        }

        /// Deliver messages produced by one side to the other until both are quiet.
        fn pump(&mut self, mut from_src: Vec<Message>, mut from_dst: Vec<Message>) {
            while !from_src.is_empty() || !from_dst.is_empty() {
                for m in std::mem::take(&mut from_src) {
                    let mut out = Output::default();
                    self.dst.handle(m, &mut out).unwrap();
                    from_dst.extend(out.take_messages(&self.dst));
                    self.dst_events.extend(out.events);
                }
                for m in std::mem::take(&mut from_dst) {
                    let mut out = Output::default();
                    self.src.handle(m, &mut out).unwrap();
                    from_src.extend(out.take_messages(&self.src));
                    self.src_events.extend(out.events);
                }
            }
        }

        fn open(&mut self, service: &str) -> (ConnId, ConnId) {
            let mut out = Output::default();
            let s = self.src.open(service, &mut out).unwrap();
            self.src_events.extend(out.events);
            self.pump(out.transmit, vec![]);
            let d = match self.dst_events.pop() {
                Some(Event::Opened { id, service: got }) => {
                    assert_eq!(got, service);
                    id
                }
                other => panic!("expected Opened, got {other:?}"),
            };
            (s, d)
        }

        fn send_src(&mut self, id: ConnId, data: &'static [u8]) {
            let m = self.src.data(id, Bytes::from_static(data)).unwrap();
            self.pump(vec![m], vec![]);
        }

        fn send_dst(&mut self, id: ConnId, data: &'static [u8]) {
            let m = self.dst.data(id, Bytes::from_static(data)).unwrap();
            self.pump(vec![], vec![m]);
        }
    }

    /// Flow control (culvert's extension), negotiated through a relay that announces it.
    mod flow_control {
        use super::*;
        use crate::flow::{self, FlowConfig, Hello};

        const CFG: FlowConfig = FlowConfig {
            window: 100_000,
            budget: 250_000,
        };

        /// A pair whose ends offer flow control (`None`: an AWS end), after the relay's HELLOs
        /// (`relay`: false for AWS's relay, which sends none). Returns what the ends sent.
        fn pair(src: Option<FlowConfig>, dst: Option<FlowConfig>, relay: bool) -> (Pair, usize) {
            let mut p = Pair::new(Format::V3, &["A", "B"]);
            if let Some(c) = src {
                p.src = std::mem::replace(&mut p.src, Mux::source(Format::V3)).with_flow_control(c);
            }
            if let Some(c) = dst {
                p.dst = std::mem::replace(&mut p.dst, Mux::destination(None)).with_flow_control(c);
            }
            let mut sent = 0;
            if relay {
                // The destination attached first (its HELLO to an absent source is dropped),
                // then the source: the relay greets it, and greets the destination again.
                let mut out = Output::default();
                p.dst.handle(Hello::relay().to_message(), &mut out).unwrap();
                sent += out.transmit.len();
                let (mut a, mut b) = (Output::default(), Output::default());
                p.src.handle(Hello::relay().to_message(), &mut a).unwrap();
                p.dst.handle(Hello::relay().to_message(), &mut b).unwrap();
                sent += a.transmit.len() + b.transmit.len();
                p.src_events.extend(a.events);
                p.dst_events.extend(b.events);
                p.pump(a.transmit, b.transmit);
            }
            (p, sent)
        }

        /// Send `n` bytes from the source on `id` in full payloads; how many went out before
        /// credit ran out.
        fn send_until_blocked(p: &mut Pair, id: ConnId, n: usize) -> usize {
            let mut sent = 0;
            while sent < n {
                let k = (n - sent).min(MAX_PAYLOAD);
                let avail = p.src.send_credit(id).unwrap().unwrap_or(usize::MAX);
                let k = k.min(avail);
                if k == 0 {
                    // As a writer does when it parks.
                    p.src.wait_for_credit(id);
                    break;
                }
                let mut f = bytes::BytesMut::new();
                p.src.encode_data(id, &vec![7u8; k], &mut f).unwrap();
                let m = crate::frame::decode(f.freeze().slice(2..)).unwrap();
                p.pump(vec![m], vec![]);
                sent += k;
            }
            sent
        }

        /// The destination's application consumes `n` bytes of `id`; the credit that returns
        /// (if a batch is due) reaches the source.
        fn consume(p: &mut Pair, id: ConnId, n: usize) {
            let mut out = Output::default();
            p.dst.consumed(id, n, &mut out);
            p.pump(vec![], out.take_messages(&p.dst));
        }

        fn received(p: &mut Pair, id: ConnId) -> usize {
            let n = p
                .dst_events
                .iter()
                .map(|e| match e {
                    Event::Data { id: i, payload } if *i == id => payload.len(),
                    _ => 0,
                })
                .sum();
            p.dst_events
                .retain(|e| !matches!(e, Event::Data { id: i, .. } if *i == id));
            n
        }

        #[test]
        fn negotiated_only_when_the_relay_and_both_ends_offer_it() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            assert!(p.src.flow_control_active() && p.dst.flow_control_active());
            let (s, d) = p.open("A");
            assert!(p.src.is_flow_controlled(s) && p.dst.is_flow_controlled(d));

            // AWS's relay announces nothing: the ends send nothing of their own.
            let (mut p, sent) = pair(Some(CFG), Some(CFG), false);
            assert_eq!(sent, 0);
            let (s, d) = p.open("A");
            assert!(!p.src.is_flow_controlled(s) && !p.dst.is_flow_controlled(d));

            // An AWS destination (the localproxy) ignores the HELLOs: no flow control.
            let (mut p, _) = pair(Some(CFG), None, true);
            assert!(!p.src.flow_control_active());
            let (s, _) = p.open("A");
            assert_eq!(
                p.src.send_credit(s).unwrap(),
                None,
                "no limit without the extension"
            );
            assert!(
                p.dst.stats().ignored > 0,
                "the AWS end skipped the ignorable HELLOs"
            );

            // An AWS source: the destination never applies it either.
            let (mut p, _) = pair(None, Some(CFG), true);
            let (_, d) = p.open("A");
            assert!(!p.dst.is_flow_controlled(d));
        }

        #[test]
        fn a_stalled_receiver_bounds_the_sender_and_other_connections_flow() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            let (slow_s, slow_d) = p.open("A");
            let (fast_s, fast_d) = p.open("B");
            // The slow connection's reader never consumes: the sender stops at the window.
            let sent = send_until_blocked(&mut p, slow_s, 1_000_000);
            assert_eq!(sent, CFG.window as usize);
            assert_eq!(received(&mut p, slow_d), CFG.window as usize);
            assert!(matches!(
                p.src.encode_data(slow_s, b"x", &mut bytes::BytesMut::new()),
                Err(MuxError::NoCredit(1, 0))
            ));
            // The other connection still moves a megabyte, its reader consuming as it goes.
            let mut total = 0;
            while total < 1_000_000 {
                let n = send_until_blocked(&mut p, fast_s, 1_000_000 - total);
                assert!(n > 0, "the fast connection stalled after {total} bytes");
                let got = received(&mut p, fast_d);
                assert_eq!(got, n);
                consume(&mut p, fast_d, got);
                total += n;
            }
            // The slow reader wakes up: credit comes back and the sender may go on.
            let mut out = Output::default();
            p.dst.consumed(slow_d, CFG.window as usize, &mut out);
            assert_eq!(out.credit.len(), 1, "one batched WINDOW_UPDATE");
            p.pump(vec![], out.take_messages(&p.dst));
            assert!(
                p.src_events
                    .iter()
                    .any(|e| matches!(e, Event::Credit { id, .. } if *id == slow_s))
            );
            assert_eq!(
                p.src.send_credit(slow_s).unwrap(),
                Some(CFG.window as usize)
            );
        }

        #[test]
        fn the_tunnel_budget_bounds_all_connections_and_closing_returns_it() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            let ids: Vec<(ConnId, ConnId)> = (0..3).map(|_| p.open("A")).collect();
            let sent: usize = ids
                .iter()
                .map(|&(s, _)| send_until_blocked(&mut p, s, 1_000_000))
                .sum();
            assert_eq!(sent, CFG.budget as usize, "three windows exceed the budget");
            // Closing the first connection (at the receiver) gives its bytes back.
            let mut out = Output::default();
            p.dst.close(ids[0].1, &mut out);
            p.pump(vec![], out.take_messages(&p.dst));
            let more = send_until_blocked(&mut p, ids[2].0, 1_000_000);
            assert_eq!(more, CFG.window as usize * 3 - CFG.budget as usize);
        }

        #[test]
        fn many_connections_cannot_hold_the_budget_in_unreturned_credit() {
            // 40 connections each send a little less than the return batch (a quarter window)
            // and their readers consume it all: without a tunnel-wide flush, the consumed bytes
            // would sit unreturned, the sender's budget would stay spent, and the tunnel would
            // stall for good (seen with 512 connections in the benchmark).
            let cfg = FlowConfig {
                window: 100_000,
                budget: 1_000_000,
            };
            let (mut p, _) = pair(Some(cfg), Some(cfg), true);
            let ids: Vec<(ConnId, ConnId)> = (0..40).map(|_| p.open("A")).collect();
            let each = 24_000;
            for &(s, d) in &ids {
                assert_eq!(send_until_blocked(&mut p, s, each), each);
                let got = received(&mut p, d);
                consume(&mut p, d, got);
            }
            // 40 × 24 000 = 960 000 bytes consumed; the budget must be free again.
            let (s, _) = p.open("B");
            assert_eq!(
                send_until_blocked(&mut p, s, cfg.window as usize),
                cfg.window as usize,
                "the tunnel budget stayed spent on credit the receiver never returned"
            );
        }

        #[test]
        fn stalled_connections_and_batched_credit_cannot_take_the_budget_between_them() {
            // Stalled connections hold most of the budget unread; others consume theirs but
            // each stays short of its batch. The batches must go back once the budget is
            // three quarters full, or nothing moves again.
            let cfg = FlowConfig {
                window: 100_000,
                budget: 1_000_000,
            };
            let (mut p, _) = pair(Some(cfg), Some(cfg), true);
            for _ in 0..8 {
                let (s, _) = p.open("A");
                assert_eq!(send_until_blocked(&mut p, s, 100_000), 100_000);
            }
            p.dst_events.clear(); // never read: 800 000 bytes stay buffered
            // 8 × 24 000 consumed: under the quarter-budget batch total, over ¾ of the budget.
            let ids: Vec<(ConnId, ConnId)> = (0..8).map(|_| p.open("B")).collect();
            for &(s, d) in &ids {
                let n = send_until_blocked(&mut p, s, 24_000);
                let got = received(&mut p, d);
                assert_eq!(got, n);
                consume(&mut p, d, got);
            }
            let (s, _) = p.open("B");
            assert_eq!(
                send_until_blocked(&mut p, s, 100_000),
                100_000,
                "the budget stayed spent on stalled bytes plus batched credit"
            );
        }

        #[test]
        fn a_closed_connection_frees_budget_for_writers_waiting_on_it() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            let a = p.open("A");
            let b = p.open("A");
            send_until_blocked(&mut p, a.0, 100_000);
            send_until_blocked(&mut p, b.0, 100_000);
            let (c, _) = p.open("A");
            send_until_blocked(&mut p, c, 100_000); // 50 000: the budget's rest
            assert_eq!(p.src.send_credit(c).unwrap(), Some(0));
            assert!(!p.src.take_budget_freed(), "nothing freed yet");
            assert_eq!(p.src.send_credit(c).unwrap(), Some(0));
            // The receiver resets a stalled connection: its bytes return, and the waiting
            // writer is told to look again although no WINDOW_UPDATE comes.
            let mut out = Output::default();
            p.dst.close(a.1, &mut out);
            p.pump(vec![], out.transmit);
            assert!(p.src.take_budget_freed());
            assert_eq!(p.src.send_credit(c).unwrap(), Some(50_000));
        }

        /// `who` finishes `id` (half-close); what it sent reaches the other end.
        fn finish(p: &mut Pair, src: bool, id: ConnId) -> bool {
            let mut out = Output::default();
            let done = if src {
                p.src.finish(id, &mut out)
            } else {
                p.dst.finish(id, &mut out)
            };
            if src {
                p.pump(out.transmit, vec![]);
            } else {
                p.pump(vec![], out.transmit);
            }
            done
        }

        #[test]
        fn half_close_keeps_the_other_direction_until_both_have_finished() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            let (s, d) = p.open("A");
            assert!(p.src.is_half_closable(s) && p.dst.is_half_closable(d));
            p.dst_events.clear();
            p.send_src(s, b"cmd\n");
            assert!(finish(&mut p, true, s));
            assert_eq!(
                p.dst_events.drain(..).collect::<Vec<_>>(),
                vec![data(d, b"cmd\n"), Event::Finished { id: d }],
                "the FIN comes after the data"
            );
            assert_eq!(
                p.src.data(s, Bytes::from_static(b"x")).unwrap_err(),
                MuxError::Finished(s),
                "no DATA after our own FIN"
            );
            // The answer still flows back, then the destination finishes too.
            p.send_dst(d, b"answer");
            assert_eq!(p.src_events.pop(), Some(data(s, b"answer")));
            assert!(finish(&mut p, false, d));
            assert_eq!(p.src_events.pop(), Some(Event::Finished { id: s }));
            assert_eq!(
                p.src.open_connections(),
                0,
                "over both ways, without a reset"
            );
            assert_eq!(p.dst.open_connections(), 0);
            assert_eq!(p.src.stats().stale_control + p.dst.stats().stale_control, 0);
            // A reset after a FIN still ends a connection at once.
            let (s, d) = p.open("A");
            assert!(finish(&mut p, false, d));
            let mut out = Output::default();
            p.src.close(s, &mut out);
            p.pump(out.transmit, vec![]);
            assert_eq!(
                p.dst_events.pop(),
                Some(Event::Closed {
                    id: d,
                    cause: CloseCause::ConnectionReset
                })
            );
            assert_eq!(p.dst.open_connections(), 0);
        }

        #[test]
        fn data_after_a_fin_and_a_second_fin_are_dropped_and_counted() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            let (s, d) = p.open("A");
            assert!(finish(&mut p, true, s));
            p.dst_events.clear();
            let mut out = Output::default();
            p.dst
                .handle(
                    Message::data(1, "A", 1, Bytes::from_static(b"late")),
                    &mut out,
                )
                .unwrap();
            p.dst.handle(crate::ext::fin(1, "A", 1), &mut out).unwrap();
            assert!(out.is_empty(), "{out:?}");
            assert_eq!(p.dst.stats().stale_data, 1);
            assert_eq!(p.dst.stats().stale_control, 1);
            assert!(p.dst.is_open(d));
        }

        #[test]
        fn without_half_close_on_both_ends_a_finish_is_refused_and_no_fin_is_sent() {
            // An older culvert end (flow control, no half-close), either side.
            for older_src in [true, false] {
                let (mut p, _) = pair(None, None, false);
                p.src = Mux::source(Format::V3).with_flow_control(CFG);
                p.dst = Mux::destination(None).with_flow_control(CFG);
                if older_src {
                    p.src =
                        std::mem::replace(&mut p.src, Mux::source(Format::V3)).without_half_close();
                } else {
                    p.dst =
                        std::mem::replace(&mut p.dst, Mux::destination(None)).without_half_close();
                }
                let ids = vec!["A".to_string()];
                let mut out = Output::default();
                p.src.handle(Message::service_ids(&ids), &mut out).unwrap();
                p.dst.handle(Message::service_ids(&ids), &mut out).unwrap();
                let (mut a, mut b) = (Output::default(), Output::default());
                p.src.handle(Hello::relay().to_message(), &mut a).unwrap();
                p.dst.handle(Hello::relay().to_message(), &mut b).unwrap();
                p.pump(a.transmit, b.transmit);
                let (s, d) = p.open("A");
                assert!(p.src.is_flow_controlled(s), "flow control is still on");
                assert!(!p.src.is_half_closable(s) && !p.dst.is_half_closable(d));
                let mut out = Output::default();
                assert!(!p.src.finish(s, &mut out) && !p.dst.finish(d, &mut out));
                assert!(out.transmit.is_empty());
            }
            // Nor without flow control (an AWS peer or relay).
            let (mut p, _) = pair(Some(CFG), Some(CFG), false);
            let (s, _) = p.open("A");
            assert!(!finish(&mut p, true, s));
        }

        #[test]
        fn auto_tuning_measures_the_round_trip_and_grows_a_window_bound_connection() {
            for older in [false, true] {
                let t0 = std::time::Instant::now();
                let mut p = Pair::new(Format::V3, &["A"]);
                p.src = std::mem::replace(&mut p.src, Mux::source(Format::V3))
                    .with_flow_control(FlowConfig::default());
                p.dst = std::mem::replace(&mut p.dst, Mux::destination(None))
                    .with_flow_control(FlowConfig::default());
                if older {
                    p.src =
                        std::mem::replace(&mut p.src, Mux::source(Format::V3)).without_autotune();
                }
                let (mut a, mut b) = (Output::default(), Output::default());
                p.src.handle(Hello::relay().to_message(), &mut a).unwrap();
                p.dst.handle(Hello::relay().to_message(), &mut b).unwrap();
                p.pump(a.transmit, b.transmit);
                // The destination's PING goes out at t0 and its answer is back 10 ms later.
                p.dst.tick(t0);
                let mut out = Output::default();
                p.dst.maybe_ping(&mut out);
                p.dst.tick(t0 + std::time::Duration::from_millis(10));
                p.pump(vec![], out.transmit);
                assert_eq!(
                    p.dst.min_rtt().is_some(),
                    !older,
                    "a PING went out and its answer came back (older: {older})"
                );
                let (s, d) = p.open("A");
                // The destination's application consumes a window's worth in far less than
                // two round trips (here the clock barely moves; the round trip is taken as
                // 10 ms): its window doubles, and the source may send that much more.
                let window = flow::DEFAULT_WINDOW as usize;
                let mut sent = 0;
                let mut t = t0 + std::time::Duration::from_millis(10);
                while sent < window {
                    let m = p.src.data(s, Bytes::from(vec![1u8; MAX_PAYLOAD])).unwrap();
                    p.pump(vec![m], vec![]);
                    sent += MAX_PAYLOAD;
                    t += std::time::Duration::from_micros(100);
                    p.dst.tick(t);
                    let mut out = Output::default();
                    p.dst.consumed(d, MAX_PAYLOAD, &mut out);
                    p.pump(vec![], out.take_messages(&p.dst));
                }
                let grown = p.dst.granted_window(d).unwrap();
                if older {
                    assert_eq!(
                        grown, window as u64,
                        "an older end's windows keep their size"
                    );
                } else {
                    assert_eq!(grown, 2 * window as u64);
                    let credit = p.src.send_credit(s).unwrap().unwrap();
                    assert!(
                        credit > window + window / 2,
                        "the source heard of the larger window: {credit} bytes of credit"
                    );
                }
            }
        }

        #[test]
        fn sending_past_credit_is_a_protocol_error() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            let (s, _) = p.open("A");
            send_until_blocked(&mut p, s, CFG.window as usize);
            // A sender that ignores its credit (forged: the mux itself would refuse).
            let over = Message::data(1, "A", 1, Bytes::from_static(b"!"));
            let mut out = Output::default();
            assert!(matches!(
                p.dst.handle(over, &mut out),
                Err(ProtocolError::CreditExceeded {
                    got: 1,
                    credit: 0,
                    ..
                })
            ));
            // Over the tunnel budget, each connection within its own window.
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            let mut err = None;
            for cid in 1..=3u32 {
                if cid > 1 {
                    let mut out = Output::default();
                    p.src.open("A", &mut out).unwrap();
                    p.pump(out.transmit, vec![]);
                } else {
                    p.open("A");
                }
                for _ in 0..2 {
                    let m = Message::data(1, "A", cid, Bytes::from(vec![0u8; 50_000]));
                    let mut out = Output::default();
                    if let Err(e) = p.dst.handle(m, &mut out) {
                        err = Some(e);
                    }
                }
            }
            assert_eq!(err, Some(ProtocolError::BudgetExceeded(300_000, 250_000)));
            // A malformed credit update ends the session too.
            let mut bad = flow::window_update(1, "A", 1, 5);
            bad.payload = Bytes::from_static(b"xx");
            assert!(matches!(
                p.src.handle(bad, &mut Output::default()),
                Err(ProtocolError::BadWindowUpdate(1, 2))
            ));
        }

        #[test]
        fn a_peer_reconnecting_switches_it_off_until_renegotiated() {
            let (mut p, _) = pair(Some(CFG), Some(CFG), true);
            // The destination reconnects: the relay greets both again; until the new
            // destination's HELLO arrives, new connections go without flow control.
            let mut out = Output::default();
            p.src.handle(Hello::relay().to_message(), &mut out).unwrap();
            assert!(!p.src.flow_control_active());
            let mut new_dst = Mux::destination(None).with_flow_control(CFG);
            new_dst
                .handle(
                    Message::service_ids(&["A".into(), "B".into()]),
                    &mut Output::default(),
                )
                .unwrap();
            p.dst = new_dst;
            let mut d_out = Output::default();
            p.dst
                .handle(Hello::relay().to_message(), &mut d_out)
                .unwrap();
            p.pump(out.transmit, d_out.transmit);
            assert!(p.src.flow_control_active() && p.dst.flow_control_active());
            let (s, d) = p.open("B");
            assert!(p.src.is_flow_controlled(s) && p.dst.is_flow_controlled(d));
        }

        /// Resumable connections over a link that drops: the two muxes, what each side's
        /// application wrote and read, and the messages in flight each way (lost on a drop).
        mod resume {
            use super::*;
            use proptest::prelude::*;
            use std::collections::VecDeque;

            struct World {
                src: Mux,
                dst: Mux,
                ids: (ConnId, ConnId),
                to_dst: VecDeque<Message>,
                to_src: VecDeque<Message>,
                /// Bytes written by the source's and the destination's application.
                wrote: (u64, u64),
                /// Bytes each application read, and of those not yet consumed.
                got: (Vec<u8>, Vec<u8>),
                unread: (usize, usize),
                /// FINs sent (by the source's application) and received (by the destination's).
                fin: (bool, bool),
            }

            /// Byte `i` of what an application writes (different each way).
            fn byte(i: u64, from_src: bool) -> u8 {
                (i.wrapping_mul(31) ^ (i >> 8) ^ (u64::from(from_src) * 0x5a)) as u8
            }

            #[derive(Clone, Debug)]
            enum Op {
                Write(bool, usize),
                Deliver(bool, usize),
                Consume(bool),
                /// The link drops: everything in flight is lost. `true`: both ends' WebSockets
                /// dropped (a relay restart); `false`: the destination's only, the source hears
                /// of its return from the relay.
                Drop(bool),
                Fin,
            }

            fn op() -> impl Strategy<Value = Op> {
                prop_oneof![
                    4 => (any::<bool>(), 1..200_000usize).prop_map(|(s, n)| Op::Write(s, n)),
                    4 => (any::<bool>(), 1..40usize).prop_map(|(s, n)| Op::Deliver(s, n)),
                    3 => any::<bool>().prop_map(Op::Consume),
                    1 => any::<bool>().prop_map(Op::Drop),
                    1 => Just(Op::Fin),
                ]
            }

            impl World {
                fn new() -> World {
                    let (mut p, _) = pair(Some(CFG), Some(CFG), false);
                    p.src = std::mem::replace(&mut p.src, Mux::source(Format::V3)).with_resume();
                    p.dst = std::mem::replace(&mut p.dst, Mux::destination(None)).with_resume();
                    let mut w = World {
                        src: p.src,
                        dst: p.dst,
                        ids: (ConnId(0), ConnId(0)),
                        to_dst: VecDeque::new(),
                        to_src: VecDeque::new(),
                        wrote: (0, 0),
                        got: (Vec::new(), Vec::new()),
                        unread: (0, 0),
                        fin: (false, false),
                    };
                    w.relay_hello(false);
                    w.relay_hello(true);
                    w.settle();
                    let mut out = Output::default();
                    let s = w.src.open("A", &mut out).unwrap();
                    w.to_dst.extend(out.take_messages(&w.src));
                    w.settle();
                    assert!(w.src.is_resumable(s), "both ends offer resume");
                    w.ids.0 = s;
                    w
                }

                /// One message reaches the source (`to_src`) or the destination; what it
                /// sends back goes on the way to the other.
                fn feed(&mut self, to_src: bool, m: Message) {
                    let mut out = Output::default();
                    if to_src {
                        self.src.handle(m, &mut out).unwrap();
                        self.to_dst.extend(out.take_messages(&self.src));
                    } else {
                        self.dst.handle(m, &mut out).unwrap();
                        self.to_src.extend(out.take_messages(&self.dst));
                    }
                    self.events(to_src, out.events);
                }

                fn relay_hello(&mut self, to_src: bool) {
                    self.feed(to_src, Hello::relay().to_message());
                }

                fn events(&mut self, src: bool, events: Vec<Event>) {
                    for ev in events {
                        match ev {
                            Event::Data { payload, .. } => {
                                let (got, unread) = if src {
                                    (&mut self.got.0, &mut self.unread.0)
                                } else {
                                    (&mut self.got.1, &mut self.unread.1)
                                };
                                got.extend_from_slice(&payload);
                                *unread += payload.len();
                            }
                            Event::Opened { id, .. } => {
                                assert!(!src);
                                self.ids.1 = id;
                            }
                            Event::Finished { .. } => {
                                assert!(!src && !self.fin.1, "one FIN, at the destination");
                                self.fin.1 = true;
                            }
                            Event::Closed { cause, .. } => {
                                panic!("a resumable connection ended ({cause:?})")
                            }
                            _ => {}
                        }
                    }
                }

                fn deliver(&mut self, to_src: bool, n: usize) {
                    for _ in 0..n {
                        let Some(m) = (if to_src {
                            self.to_src.pop_front()
                        } else {
                            self.to_dst.pop_front()
                        }) else {
                            return;
                        };
                        self.feed(to_src, m);
                    }
                }

                fn write(&mut self, from_src: bool, n: usize) {
                    let (mux, id, wrote) = if from_src {
                        (&mut self.src, self.ids.0, &mut self.wrote.0)
                    } else {
                        (&mut self.dst, self.ids.1, &mut self.wrote.1)
                    };
                    if !mux.is_open(id) || (from_src && self.fin.0) {
                        return;
                    }
                    let mut left = n;
                    while left > 0 {
                        let avail = mux.send_credit(id).unwrap().unwrap_or(usize::MAX);
                        let k = left.min(MAX_PAYLOAD).min(avail);
                        if k == 0 {
                            return;
                        }
                        let payload: Vec<u8> = (*wrote..*wrote + k as u64)
                            .map(|i| byte(i, from_src))
                            .collect();
                        let m = mux.data(id, Bytes::from(payload)).unwrap();
                        *wrote += k as u64;
                        left -= k;
                        if from_src {
                            self.to_dst.push_back(m);
                        } else {
                            self.to_src.push_back(m);
                        }
                    }
                }

                fn consume(&mut self, src: bool) {
                    let mut out = Output::default();
                    if src {
                        let n = std::mem::take(&mut self.unread.0);
                        self.src.consumed(self.ids.0, n, &mut out);
                        self.to_dst.extend(out.take_messages(&self.src));
                    } else {
                        let n = std::mem::take(&mut self.unread.1);
                        self.dst.consumed(self.ids.1, n, &mut out);
                        self.to_src.extend(out.take_messages(&self.dst));
                    }
                }

                fn drop_link(&mut self, both: bool) {
                    self.to_dst.clear();
                    self.to_src.clear();
                    let mut out = Output::default();
                    assert!(self.dst.detach(&mut out), "the connection is held");
                    self.events(false, out.events);
                    if both {
                        let mut out = Output::default();
                        assert!(self.src.detach(&mut out));
                        self.events(true, out.events);
                    }
                    // The ends come back (the destination first): the relay greets each, and
                    // the first again when the second arrives.
                    self.relay_hello(false);
                    self.relay_hello(true);
                    if both {
                        self.relay_hello(false);
                    }
                }

                fn apply(&mut self, op: &Op) {
                    match *op {
                        Op::Write(s, n) => self.write(s, n),
                        Op::Deliver(s, n) => self.deliver(s, n),
                        Op::Consume(s) => self.consume(s),
                        Op::Drop(both) => self.drop_link(both),
                        Op::Fin => {
                            let mut out = Output::default();
                            if self.src.is_open(self.ids.0) && !self.fin.0 {
                                assert!(self.src.finish(self.ids.0, &mut out));
                                self.fin.0 = true;
                                self.to_dst.extend(out.take_messages(&self.src));
                            }
                        }
                    }
                }

                /// What each application read is a prefix of what the other wrote (nothing
                /// lost, duplicated or reordered), and what a sender keeps for a resume is
                /// bounded by its credit.
                fn check(&self) {
                    for (got, from_src) in [(&self.got.1, true), (&self.got.0, false)] {
                        assert!(
                            got.iter()
                                .enumerate()
                                .all(|(i, b)| *b == byte(i as u64, from_src)),
                            "bytes lost, duplicated or reordered"
                        );
                    }
                    for (mux, id) in [(&self.src, self.ids.0), (&self.dst, self.ids.1)] {
                        if let Some(c) = mux.conns.get(&id) {
                            let kept = c.retx.as_ref().map_or(0, |r| r.unacked.len()) as u64;
                            let (sent, acked) = c.credit.map_or((0, 0), |c| c.sent_all());
                            assert!(kept <= sent - acked && kept <= CFG.budget);
                        }
                    }
                }

                fn settle(&mut self) {
                    for _ in 0..10_000 {
                        if self.to_dst.is_empty() && self.to_src.is_empty() {
                            return;
                        }
                        self.deliver(false, usize::MAX);
                        self.deliver(true, usize::MAX);
                    }
                    panic!("the ends never go quiet");
                }

                /// Everything written arrives once the link stays up.
                fn finish_and_check(&mut self) {
                    for _ in 0..1_000 {
                        self.settle();
                        self.consume(true);
                        self.consume(false);
                        self.settle();
                        self.check();
                        if self.got.1.len() as u64 == self.wrote.0
                            && self.got.0.len() as u64 == self.wrote.1
                        {
                            assert_eq!(self.fin.0, self.fin.1, "the FIN arrives");
                            return;
                        }
                    }
                    panic!(
                        "bytes never arrived: source wrote {}, destination got {}; destination wrote {}, source got {}",
                        self.wrote.0,
                        self.got.1.len(),
                        self.wrote.1,
                        self.got.0.len()
                    );
                }
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(64)))]
                #[test]
                fn a_dropped_link_loses_nor_repeats_a_byte(ops in proptest::collection::vec(op(), 0..120)) {
                    let mut w = World::new();
                    for o in &ops {
                        w.apply(o);
                        w.check();
                    }
                    w.finish_and_check();
                }
            }

            #[test]
            fn a_destination_that_restarted_resets_what_it_no_longer_has() {
                let mut w = World::new();
                w.write(true, 1000);
                w.settle();
                let mut out = Output::default();
                assert!(w.src.detach(&mut out));
                // A new destination process, with nothing to resume.
                w.dst = Mux::destination(None).with_flow_control(CFG).with_resume();
                w.to_dst.clear();
                w.to_src.clear();
                w.relay_hello(false);
                let mut out = Output::default();
                w.src.handle(Hello::relay().to_message(), &mut out).unwrap();
                w.to_dst.extend(out.take_messages(&w.src));
                for _ in 0..100 {
                    let mut out = Output::default();
                    if let Some(m) = w.to_dst.pop_front() {
                        w.dst.handle(m, &mut out).unwrap();
                        w.to_src.extend(out.take_messages(&w.dst));
                    }
                    let mut out = Output::default();
                    if let Some(m) = w.to_src.pop_front() {
                        w.src.handle(m, &mut out).unwrap();
                        w.to_dst.extend(out.take_messages(&w.src));
                        if out.events.iter().any(|e| matches!(e, Event::Closed { .. })) {
                            assert!(!w.src.is_open(w.ids.0));
                            // The next connection starts a new stream the new peer knows.
                            let mut out = Output::default();
                            w.src.open("A", &mut out).unwrap();
                            assert_eq!(out.transmit[0].r#type, MessageType::StreamStart as i32);
                            return;
                        }
                    }
                }
                panic!("the source's connection was never ended");
            }
        }
    }

    fn data(id: ConnId, p: &'static [u8]) -> Event {
        Event::Data {
            id,
            payload: Bytes::from_static(p),
        }
    }

    #[test]
    fn v3_many_connections_per_service_and_two_services() {
        let mut p = Pair::new(Format::V3, &["SSH", "HMI"]);
        let (s1, d1) = p.open("SSH");
        let (s2, d2) = p.open("SSH");
        let (s3, d3) = p.open("HMI");
        p.send_src(s1, b"one");
        p.send_src(s2, b"two");
        p.send_src(s3, b"three");
        assert_eq!(
            p.dst_events,
            vec![data(d1, b"one"), data(d2, b"two"), data(d3, b"three")]
        );
        p.send_dst(d2, b"back");
        assert_eq!(p.src_events, vec![data(s2, b"back")]);
        // Closing one V3 connection leaves the others (and the stream) alive.
        let mut out = Output::default();
        p.src.close(s1, &mut out);
        assert_eq!(out.transmit[0].kind(), Some(MessageType::ConnectionReset));
        p.pump(out.transmit, vec![]);
        assert_eq!(
            p.dst_events.pop(),
            Some(Event::Closed {
                id: d1,
                cause: CloseCause::ConnectionReset
            })
        );
        p.dst_events.clear();
        p.send_src(s2, b"still");
        assert_eq!(p.dst_events, vec![data(d2, b"still")]);
        // The next connection uses CONNECTION_START on the same stream.
        let mut out = Output::default();
        p.src.open("SSH", &mut out).unwrap();
        assert_eq!(out.transmit[0].kind(), Some(MessageType::ConnectionStart));
        assert_eq!(out.transmit[0].stream_id, 1);
        assert_eq!(out.transmit[0].connection_id, 3);
    }

    #[test]
    fn v2_format_one_connection_per_stream() {
        let mut p = Pair::new(Format::V2, &["SSH", "HMI"]);
        let (s1, d1) = p.open("SSH");
        let mut out = Output::default();
        let m = p.src.data(s1, Bytes::from_static(b"x")).unwrap();
        assert_eq!((m.service_id.as_str(), m.connection_id), ("SSH", 0));
        // A second connection on the same service is a new stream that replaces the first,
        // which is reset first (a localproxy destination refuses a start during a stream).
        let s2 = p.src.open("SSH", &mut out).unwrap();
        assert_eq!(out.transmit[0], Message::stream_reset(1, "SSH"));
        assert_eq!(out.transmit[1].kind(), Some(MessageType::StreamStart));
        assert_eq!(out.transmit[1].stream_id, 2);
        assert_eq!(
            out.events,
            vec![Event::Closed {
                id: s1,
                cause: CloseCause::Replaced
            }]
        );
        p.pump(out.transmit, vec![]);
        assert!(matches!(p.dst_events[0], Event::Closed { id, .. } if id == d1));
        let Event::Opened { id: d2, .. } = p.dst_events[1] else {
            panic!("{:?}", p.dst_events)
        };
        p.dst_events.clear();
        // The destination answers in V2 format; a close is a STREAM_RESET.
        let back = p.dst.data(d2, Bytes::from_static(b"y")).unwrap();
        assert_eq!((back.service_id.as_str(), back.connection_id), ("SSH", 0));
        p.pump(vec![], vec![back]);
        assert_eq!(p.src_events.pop(), Some(data(s2, b"y")));
        let mut out = Output::default();
        p.dst.close(d2, &mut out);
        assert_eq!(out.transmit[0].kind(), Some(MessageType::StreamReset));
        p.pump(vec![], out.transmit);
        assert_eq!(
            p.src_events.pop(),
            Some(Event::Closed {
                id: s2,
                cause: CloseCause::ConnectionReset
            })
        );
        assert_eq!(p.src.open_connections(), 0);
    }

    #[test]
    fn v1_format_has_no_service_id() {
        let mut p = Pair::new(Format::V1, &["SSH"]);
        let (s, d) = p.open("SSH");
        let m = p.src.data(s, Bytes::from_static(b"hi")).unwrap();
        assert_eq!((m.service_id.as_str(), m.connection_id), ("", 0));
        p.pump(vec![m], vec![]);
        assert_eq!(p.dst_events, vec![data(d, b"hi")]);
        let back = p.dst.data(d, Bytes::from_static(b"ho")).unwrap();
        assert_eq!(back.service_id, "");
        p.pump(vec![], vec![back]);
        assert_eq!(p.src_events, vec![data(s, b"ho")]);
        // V1 cannot address one of several services.
        let mut two = Pair::new(Format::V1, &["A", "B"]);
        assert_eq!(
            two.src.open("A", &mut Output::default()),
            Err(MuxError::V1NeedsOneService(2))
        );
    }

    #[test]
    fn stale_data_after_reset_is_dropped_and_counted() {
        let mut p = Pair::new(Format::V3, &["SSH"]);
        let (s1, d1) = p.open("SSH");
        let late = p.dst.data(d1, Bytes::from_static(b"late")).unwrap();
        let mut out = Output::default();
        p.src.close(s1, &mut out);
        p.pump(out.transmit, vec![]);
        p.pump(vec![], vec![late]);
        assert!(p.src_events.is_empty(), "{:?}", p.src_events);
        assert_eq!(p.src.stats().stale_data, 1);
    }

    #[test]
    fn unruled_service_is_handed_up_and_duplicate_connection_refused() {
        // A service the destination has no rule for is the application's to refuse (its rules
        // may have changed since the session began); the mux hands the stream up.
        let mut p = Pair::new(Format::V3, &["SSH"]);
        let mut out = Output::default();
        p.dst
            .handle(Message::stream_start(1, "VNC", 1), &mut out)
            .unwrap();
        assert!(out.transmit.is_empty(), "{:?}", out.transmit);
        assert_eq!(out.events.len(), 1, "{:?}", out.events);
        let (_s, _d) = p.open("SSH");
        let mut out = Output::default();
        p.dst
            .handle(Message::connection_start(1, "SSH", 1), &mut out)
            .unwrap();
        assert_eq!(out.transmit, vec![Message::connection_reset(1, "SSH", 1)]);
    }

    #[test]
    fn new_stream_start_replaces_the_active_stream() {
        // A source that reconnected restarts stream ids; the destination takes the new stream.
        let mut p = Pair::new(Format::V3, &["SSH"]);
        let (_s, d1) = p.open("SSH");
        let mut out = Output::default();
        p.dst
            .handle(Message::stream_start(1, "SSH", 1), &mut out)
            .unwrap();
        assert_eq!(
            out.events[0],
            Event::Closed {
                id: d1,
                cause: CloseCause::Replaced
            }
        );
        assert!(matches!(out.events[1], Event::Opened { .. }));
    }

    #[test]
    fn stream_and_session_resets_close_everything_they_name() {
        let mut p = Pair::new(Format::V3, &["SSH", "HMI"]);
        let (_a, _) = p.open("SSH");
        let (_b, _) = p.open("SSH");
        let (c, _) = p.open("HMI");
        let mut out = Output::default();
        p.src
            .handle(Message::stream_reset(1, "SSH"), &mut out)
            .unwrap();
        assert_eq!(out.events.len(), 2);
        assert!(p.src.is_open(c));
        let mut out = Output::default();
        p.src.handle(Message::session_reset(), &mut out).unwrap();
        assert_eq!(
            out.events,
            vec![Event::Closed {
                id: c,
                cause: CloseCause::SessionReset
            }]
        );
        assert_eq!(p.src.open_connections(), 0);
    }

    #[test]
    fn protocol_violations() {
        let mut src = Mux::source(Format::V3);
        let mut out = Output::default();
        assert_eq!(
            src.handle(Message::stream_start(1, "SSH", 1), &mut out),
            Err(ProtocolError::Unexpected {
                kind: MessageType::StreamStart,
                role: Mode::Source
            })
        );
        let unknown = Message {
            r#type: 42,
            ..Default::default()
        };
        assert_eq!(
            src.handle(unknown.clone(), &mut out),
            Err(ProtocolError::UnknownType(42))
        );
        let ignorable = Message {
            ignorable: true,
            ..unknown
        };
        assert_eq!(src.handle(ignorable, &mut out), Ok(()));
        assert_eq!(src.stats().ignored, 1);
        assert_eq!(
            src.handle(Message::data(0, "SSH", 1, Bytes::new()), &mut out),
            Err(ProtocolError::BadStreamId(MessageType::Data, 0))
        );
        assert_eq!(
            src.open("SSH", &mut out),
            Err(MuxError::NoServiceIds),
            "a source cannot open before SERVICE_IDS"
        );
        src.handle(Message::service_ids(&["SSH".into()]), &mut out)
            .unwrap();
        assert!(matches!(
            src.open("VNC", &mut out),
            Err(MuxError::UnknownService(..))
        ));
        let bad = Message::service_ids(&["no spaces".into()]);
        assert!(matches!(
            Mux::source(Format::V3).handle(bad, &mut out),
            Err(ProtocolError::BadServiceId(_))
        ));
    }

    #[test]
    fn stream_ids_wrap_to_one() {
        let mut src = Mux::source(Format::V2);
        let mut out = Output::default();
        src.handle(Message::service_ids(&["S".into()]), &mut out)
            .unwrap();
        src.services.entry("S".into()).or_default().next_stream_id = i32::MAX;
        src.open("S", &mut out).unwrap();
        src.open("S", &mut out).unwrap();
        let ids: Vec<i32> = out
            .transmit
            .iter()
            .filter(|m| m.kind() == Some(MessageType::StreamStart))
            .map(|m| m.stream_id)
            .collect();
        assert_eq!(ids, vec![i32::MAX, 1]);
    }
}
