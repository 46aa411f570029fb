//! culvert's flow-control extension: credit windows per connection and a budget per tunnel, so
//! that a connection whose reader is slow stalls itself and not the whole tunnel.
//!
//! The AWS protocol has no flow control. The extension travels as two message types of our own,
//! always sent with `ignorable = true`, and is switched on only after the relay and both ends
//! have said they support it:
//!
//! - [`HELLO`] carries a [`Hello`] (protobuf, in `payload`). culvert-relay sends one (`from:
//!   "relay"`) to each peer when it attaches, and again whenever the *other* side (re)attaches.
//!   An end sends its own HELLO only in answer to the relay's, so against AWS's relay (which sends
//!   none) nothing but AWS messages ever leaves it. The relay forwards the ends' HELLOs verbatim.
//! - The **source** decides when the extension starts: on a destination HELLO it switches flow
//!   control on for connections it starts from then on, and sends a HELLO with `confirm = true`.
//!   The destination applies flow control to the connections started after that confirmation
//!   (the relay keeps each direction in order, so both ends agree on every connection). A
//!   relay HELLO (a peer came or went) or a source HELLO without `confirm` switches it off again
//!   for new connections until the next confirmation. A destination answers every source HELLO
//!   without `confirm` with its own HELLO (`reply = true`), so the source hears of the
//!   destination whichever of them connected first.
//! - [`WINDOW_UPDATE`] names a connection as DATA does (stream id, service id, connection id)
//!   and carries a 4-byte big-endian credit increment in `payload`.
//!
//! Credit: each end announces in its HELLO the window it grants every connection it receives on
//! (`window`) and the most it will buffer over all of them (`budget`). A sender may have at most
//! `window` bytes of a connection, and `budget` bytes of all connections, sent and not yet
//! credited back. The receiver returns credit as the application *consumes* the bytes, batched
//! (every quarter window). Sending past either limit is a protocol error that ends the session.
//! A connection that closes gives its outstanding bytes back to the budget on both ends.

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;

use crate::message::Message;

/// Message type of [`Hello`] (culvert extension; not an AWS type).
pub const HELLO: i32 = 0x4355_0001;
/// Message type of a credit update (culvert extension; not an AWS type).
pub const WINDOW_UPDATE: i32 = 0x4355_0002;
/// Message type of a window resize: "your window on this connection is now N bytes" (4-byte
/// big-endian payload, at least [`MIN_WINDOW`]); only to a peer that listed [`AUTOTUNE`].
pub const WINDOW_SIZE: i32 = 0x4355_0004;

/// Message type of a round-trip probe: the peer answers with [`PONG`] and the same 8-byte
/// payload, at once (auto-tuning's round trip; only to a peer that listed [`AUTOTUNE`]).
pub const PING: i32 = 0x4355_0005;
/// Message type of the answer to a [`PING`].
pub const PONG: i32 = 0x4355_0006;

/// A [`PING`] (or, `pong`, its answer) carrying `nonce`.
pub fn ping(nonce: u64, pong: bool) -> Message {
    Message {
        r#type: if pong { PONG } else { PING },
        ignorable: true,
        payload: Bytes::copy_from_slice(&nonce.to_be_bytes()),
        ..Default::default()
    }
}

/// The feature name of auto-tuned windows in [`Hello::features`].
pub const AUTOTUNE: &str = "window-autotune/1";
/// Round-trip samples kept ([`Credit::min_rtt`] is the shortest of them).
pub const RTT_SAMPLES: usize = 4;

/// The most an auto-tuned window grows to (it is also held to half the budget, and to a fair
/// share of it while several connections have grown).
pub const MAX_AUTO_WINDOW: u64 = 16 * 1024 * 1024;

/// The feature name of this extension in [`Hello::features`].
pub const FEATURE: &str = "flow-control/1";

/// Window granted to each connection by default: enough for a loopback or LAN relay to run at
/// full speed, small enough that an interactive connection is not queued behind much bulk data.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;
/// Bytes buffered over all connections of a tunnel by default (32 stalled connections' worth).
pub const DEFAULT_BUDGET: u64 = 8 * 1024 * 1024;
/// Smallest window or budget a peer may announce (one full DATA payload).
pub const MIN_WINDOW: u32 = crate::message::MAX_PAYLOAD as u32;

/// The payload of a [`HELLO`] message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// "relay", "source" or "destination".
    #[prost(string, tag = "1")]
    pub from: String,
    /// Extensions the sender supports, e.g. [`FEATURE`].
    #[prost(string, repeated, tag = "2")]
    pub features: Vec<String>,
    /// Credit the sender grants each connection it receives on.
    #[prost(uint32, tag = "3")]
    pub window: u32,
    /// Bytes the sender buffers over all connections it receives on.
    #[prost(uint64, tag = "4")]
    pub budget: u64,
    /// Source: flow control applies to the connections it starts after this message.
    #[prost(bool, tag = "5")]
    pub confirm: bool,
    /// Destination: this HELLO answers the source's.
    #[prost(bool, tag = "6")]
    pub reply: bool,
    /// Relay: numbers this announcement. An end echoes the number of the last relay HELLO it
    /// has seen in every HELLO it sends, so the relay knows which of its frames were sent after
    /// it learned of a peer change (0: an end that does not echo).
    #[prost(uint64, tag = "7")]
    pub epoch: u64,
}

impl Hello {
    pub fn supports_flow_control(&self) -> bool {
        self.features.iter().any(|f| f == FEATURE)
    }

    pub fn to_message(&self) -> Message {
        Message {
            r#type: HELLO,
            ignorable: true,
            payload: Bytes::from(self.encode_to_vec()),
            ..Default::default()
        }
    }

    /// The HELLO in `msg`, if it is one and it parses.
    pub fn from_message(msg: &Message) -> Option<Hello> {
        (msg.r#type == HELLO)
            .then(|| Hello::decode(msg.payload.clone()).ok())
            .flatten()
    }

    /// What culvert-relay sends to each peer.
    pub fn relay() -> Hello {
        Hello::relay_epoch(0)
    }

    /// What culvert-relay sends to a peer, numbered.
    pub fn relay_epoch(epoch: u64) -> Hello {
        Hello {
            from: "relay".into(),
            features: vec![FEATURE.into()],
            epoch,
            ..Default::default()
        }
    }
}

/// Flow-control settings of one end: what it grants the peer for sending to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowConfig {
    pub window: u32,
    pub budget: u64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            window: DEFAULT_WINDOW,
            budget: DEFAULT_BUDGET,
        }
    }
}

/// A credit update for the connection a DATA message with the same names would reach.
pub fn window_update(stream_id: i32, service_id: &str, connection_id: u32, inc: u32) -> Message {
    Message {
        r#type: WINDOW_UPDATE,
        stream_id,
        ignorable: true,
        payload: Bytes::copy_from_slice(&inc.to_be_bytes()),
        service_id: service_id.to_owned(),
        connection_id,
        ..Default::default()
    }
}

/// A window resize for the connection a DATA message with the same names would reach.
pub fn window_size(stream_id: i32, service_id: &str, connection_id: u32, window: u32) -> Message {
    Message {
        r#type: WINDOW_SIZE,
        payload: Bytes::copy_from_slice(&window.to_be_bytes()),
        ..window_update(stream_id, service_id, connection_id, 1)
    }
}

/// The window a WINDOW_SIZE payload carries: 4 bytes, big-endian, at least [`MIN_WINDOW`].
pub fn size(payload: &[u8]) -> Option<u32> {
    let b: [u8; 4] = payload.try_into().ok()?;
    Some(u32::from_be_bytes(b)).filter(|&n| n >= MIN_WINDOW)
}

/// The increment a WINDOW_UPDATE carries, if its payload is well formed.
pub fn window_increment(msg: &Message) -> Option<u32> {
    increment(&msg.payload)
}

/// The increment in a WINDOW_UPDATE payload: 4 bytes, big-endian, not zero.
pub fn increment(payload: &[u8]) -> Option<u32> {
    let b: [u8; 4] = payload.try_into().ok()?;
    Some(u32::from_be_bytes(b)).filter(|&n| n > 0)
}

/// The credit of one connection that uses flow control, both ways. Its fields change only
/// through [`Credit`], which holds the tunnel's totals they add up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnCredit {
    /// The window the peer grants us: at most this many bytes in flight.
    window: u64,
    /// Bytes we sent that the peer has not credited back.
    in_flight: u64,
    /// The window we grant the peer now.
    granted: u64,
    /// The largest window we ever granted it: what we hold it to, since a smaller one may not
    /// have reached it yet.
    limit: u64,
    /// Bytes received and not yet consumed by the application.
    buffered: u64,
    /// Bytes consumed and not yet credited back (batched).
    unreturned: u64,
    /// Auto-tuning ([`Credit::retune`]): on for this connection (both ends listed
    /// [`AUTOTUNE`] when it started).
    tuned: bool,
    tune: Tune,
    /// Totals since the connection started, for resuming it ([`crate::ext::ResumePoint`]):
    /// bytes sent, credit received back, bytes received, credit returned.
    sent_all: u64,
    acked_all: u64,
    received_all: u64,
    returned_all: u64,
}

/// What auto-tuning measures of one connection, per window's worth of bytes consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tune {
    /// When the current measurement began.
    since: Option<Instant>,
    /// Bytes consumed since then.
    consumed: u64,
}

impl ConnCredit {
    /// Bytes sent on this connection and not yet credited back.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Bytes received on it and not yet consumed.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// The window this end grants the peer now (auto-tuned).
    pub fn granted(&self) -> u64 {
        self.granted
    }

    /// The window the peer grants this end now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Bytes sent on this connection in all, and of those, bytes credited back in all.
    pub fn sent_all(&self) -> (u64, u64) {
        (self.sent_all, self.acked_all)
    }

    /// Where this end is on the connection, for a RESUME.
    pub fn resume_point(&self, fin_received: bool) -> crate::ext::ResumePoint {
        crate::ext::ResumePoint {
            received: self.received_all,
            returned: self.returned_all,
            window: self.granted.min(u32::MAX as u64) as u32,
            fin_received,
        }
    }

    /// Bytes received and not yet credited back.
    fn held(&self) -> u64 {
        self.buffered + self.unreturned
    }
}

/// How much a connection may send now ([`Credit::available`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    /// The tunnel budget, not the connection's own window, is what limits it (less than a
    /// frame's worth left): a writer that waits must be woken when any connection's credit
    /// comes back, not only its own.
    pub budget_bound: bool,
}

/// A sender went past what it was granted: the session must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("{got} bytes of DATA with only {credit} bytes of the connection's credit left")]
    Window { got: u64, credit: u64 },
    #[error("{total} bytes buffered for the tunnel, over the announced budget of {budget}")]
    Budget { total: u64, budget: u64 },
}

/// The flow-control state of one end of a tunnel session: what it grants and is granted, the
/// tunnel budget's use in both directions, and the rules by which credit moves. A state
/// machine on its own: it knows nothing of services, streams or messages; the multiplexer keeps
/// one [`ConnCredit`] per flow-controlled connection and hands it in.
///
/// Invariants (held by property tests): a connection has at most the peer's window in flight;
/// all connections together at most the peer's budget; credit returned never exceeds what the
/// application consumed; and as long as bytes are consumable, credit keeps coming back.
#[derive(Debug)]
pub struct Credit {
    /// What this end grants.
    own: FlowConfig,
    /// What the peer grants, while flow control is on for new connections.
    peer: Option<FlowConfig>,
    /// Bytes sent on flow-controlled connections and not credited back.
    sent_total: u64,
    /// Bytes received on flow-controlled connections and not credited back.
    received_total: u64,
    /// Of those, bytes the application consumed (credit waiting for its batch).
    unreturned_total: u64,
    /// A writer waits for the tunnel budget.
    budget_blocked: bool,
    /// Auto-tuning: both ends listed [`AUTOTUNE`] (for connections started from now on).
    autotune: bool,
    /// The clock, as the caller last set it ([`Credit::tick`]); without it nothing is tuned.
    now: Option<Instant>,
    /// The last round trips measured ([`PING`] out, its answer back), newest last: tuning
    /// uses the shortest, so a path that changed is followed within a few samples.
    rtts: [Option<Duration>; RTT_SAMPLES],
    /// Connections whose granted window is above [`FlowConfig::window`].
    grown: usize,
}

impl Credit {
    /// An end that grants `own` (raised to at least [`MIN_WINDOW`], the budget to at least the
    /// window, as the peer would refuse less); off until the peer's grant is known.
    pub fn new(own: FlowConfig) -> Credit {
        let window = own.window.max(MIN_WINDOW);
        Credit {
            own: FlowConfig {
                window,
                budget: own.budget.max(window as u64),
            },
            peer: None,
            sent_total: 0,
            received_total: 0,
            unreturned_total: 0,
            budget_blocked: false,
            autotune: false,
            now: None,
            rtts: [None; RTT_SAMPLES],
            grown: 0,
        }
    }

    /// Auto-tune the windows of connections started from now on (both ends listed
    /// [`AUTOTUNE`]).
    pub fn set_autotune(&mut self, on: bool) {
        self.autotune = on;
    }

    /// The time now, for auto-tuning: the caller sets it before handing in what happened.
    pub fn tick(&mut self, now: Instant) {
        self.now = Some(now);
    }

    /// The shortest of the last round trips measured, if any.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.rtts.iter().flatten().min().copied()
    }

    /// A round trip to the peer and back was measured ([`PING`]).
    pub fn rtt_sample(&mut self, rtt: Duration) {
        self.rtts.rotate_left(1);
        self.rtts[RTT_SAMPLES - 1] = Some(rtt);
    }

    /// Whether auto-tuning is on for connections started now.
    pub fn autotune(&self) -> bool {
        self.autotune
    }

    /// What this end grants.
    pub fn own(&self) -> FlowConfig {
        self.own
    }

    /// What the peer grants, while flow control is on for new connections.
    pub fn peer(&self) -> Option<FlowConfig> {
        self.peer
    }

    /// Switch flow control on (with the peer's grant) or off, for connections started from
    /// now on; those already started keep what they have. True if it changed.
    pub fn set_peer(&mut self, peer: Option<FlowConfig>) -> bool {
        let changed = self.peer.is_some() != peer.is_some();
        self.peer = peer;
        changed
    }

    /// The credit of a connection starting now, if flow control is on.
    pub fn open(&self) -> Option<ConnCredit> {
        let peer = self.peer?;
        Some(ConnCredit {
            window: peer.window as u64,
            in_flight: 0,
            granted: self.own.window as u64,
            limit: self.own.window as u64,
            buffered: 0,
            unreturned: 0,
            tuned: self.autotune,
            tune: Tune::default(),
            sent_all: 0,
            acked_all: 0,
            received_all: 0,
            returned_all: 0,
        })
    }

    /// What `c` may send now: the smaller of what its window leaves and what is left of the
    /// budget.
    pub fn available(&self, c: &ConnCredit) -> Available {
        let budget = self.peer.map_or(0, |p| p.budget);
        let tunnel = budget.saturating_sub(self.sent_total);
        let send = c.window.saturating_sub(c.in_flight);
        Available {
            bytes: send.min(tunnel),
            budget_bound: tunnel < send && tunnel < crate::message::MAX_PAYLOAD as u64,
        }
    }

    /// A writer of `c` waits for credit: if the budget is what holds it, the next credit for
    /// any connection must wake every writer ([`Credit::credited`]).
    pub fn waiting(&mut self, c: &ConnCredit) {
        if self.available(c).budget_bound {
            self.budget_blocked = true;
        }
    }

    /// `n` bytes are sent on `c`. Fails, changing nothing, past what [`Credit::available`] says.
    pub fn sent(&mut self, c: &mut ConnCredit, n: u64) -> Result<(), Available> {
        let avail = self.available(c);
        if n > avail.bytes {
            return Err(avail);
        }
        c.in_flight += n;
        c.sent_all += n;
        self.sent_total += n;
        Ok(())
    }

    /// The peer returned `inc` bytes of credit for `c`. True if writers waiting for the budget
    /// should look again (clears that flag).
    pub fn credited(&mut self, c: &mut ConnCredit, inc: u64) -> bool {
        let back = inc.min(c.in_flight);
        c.in_flight -= back;
        c.acked_all += back;
        self.sent_total -= back.min(self.sent_total);
        std::mem::take(&mut self.budget_blocked)
    }

    /// `n` bytes of DATA arrived on `c`. Past the connection's credit or the tunnel budget is
    /// the peer's protocol error.
    pub fn received(&mut self, c: &mut ConnCredit, n: u64) -> Result<(), CreditError> {
        let credit = c.limit.saturating_sub(c.held());
        if n > credit {
            return Err(CreditError::Window { got: n, credit });
        }
        c.buffered += n;
        c.received_all += n;
        self.received_total += n;
        if self.received_total > self.own.budget {
            return Err(CreditError::Budget {
                total: self.received_total,
                budget: self.own.budget,
            });
        }
        Ok(())
    }

    /// The application consumed `n` bytes of `c` (at most what is buffered). Returns the
    /// credit to send back now: a quarter window's batch, or nothing yet. Then ask
    /// [`Credit::must_flush`].
    pub fn consumed(&mut self, c: &mut ConnCredit, n: u64) -> Option<u32> {
        let n = n.min(c.buffered);
        c.buffered -= n;
        c.unreturned += n;
        c.tune.consumed += n;
        self.unreturned_total += n;
        if c.unreturned >= c.granted / 4 {
            self.take_return(c)
        } else {
            None
        }
    }

    /// Whether every connection's batched credit must go back now ([`Credit::take_return`]
    /// for each): the batches add up to a quarter of the budget, or the budget is three
    /// quarters full (stalled connections' unread bytes count too, so batches must not take
    /// the rest). Otherwise many connections, each short of its batch, could keep the whole
    /// budget and stall the tunnel for good.
    pub fn must_flush(&self) -> bool {
        self.unreturned_total > 0
            && (self.unreturned_total >= self.own.budget / 4
                || self.received_total >= self.own.budget / 4 * 3)
    }

    /// `c`'s consumed-but-unreturned bytes, to send back as credit now.
    pub fn take_return(&mut self, c: &mut ConnCredit) -> Option<u32> {
        let inc = c.unreturned.min(u32::MAX as u64);
        if inc == 0 {
            return None;
        }
        c.unreturned -= inc;
        c.returned_all += inc;
        self.received_total -= inc.min(self.received_total);
        self.unreturned_total -= inc.min(self.unreturned_total);
        Some(inc as u32)
    }

    /// `c` has closed: what it had in flight or buffered no longer counts against the budget,
    /// on either end.
    pub fn closed(&mut self, c: ConnCredit) {
        if c.granted > self.own.window as u64 {
            self.grown -= 1.min(self.grown);
        }
        self.sent_total -= c.in_flight.min(self.sent_total);
        let held = c.buffered + c.unreturned;
        self.received_total -= held.min(self.received_total);
        self.unreturned_total -= c.unreturned.min(self.unreturned_total);
    }

    /// The peer resumed `c` at `at` ([`crate::ext::RESUME`]): the credit it returned that
    /// never arrived comes back, and its window is what it says. Returns how many of the bytes
    /// sent it has received (where to send again from); `None`, changing nothing, for a point
    /// that cannot be (bytes received that were never sent, less credit returned than came
    /// back): the connection cannot be resumed.
    pub fn resumed(&mut self, c: &mut ConnCredit, at: &crate::ext::ResumePoint) -> Option<u64> {
        if at.received > c.sent_all || at.returned < c.acked_all || at.returned > at.received {
            return None;
        }
        let back = at.returned - c.acked_all;
        c.acked_all = at.returned;
        c.in_flight -= back.min(c.in_flight);
        self.sent_total -= back.min(self.sent_total);
        c.window = at.window as u64;
        Some(at.received)
    }

    /// The peer resized `c`'s window ([`WINDOW_SIZE`]). True if it grew (a writer waiting for
    /// credit may go on).
    pub fn resized(&mut self, c: &mut ConnCredit, window: u32) -> bool {
        let grew = window as u64 > c.window;
        c.window = window as u64;
        grew
    }

    /// Auto-tuning, once the application of `c` has consumed a window's worth since the last
    /// look: the window to announce to the peer ([`WINDOW_SIZE`]) if it changes.
    ///
    /// It doubles when the window's worth went by in less than two of the shortest round trips
    /// measured and the application kept up (less than a quarter window unread): a sender
    /// limited by its window moves one window per round trip. Past that the path, not the
    /// window, sets the pace, and a larger window would only lengthen the queues (the shortest
    /// round trip leaves queueing out, so windows settle near twice the bandwidth-delay
    /// product, not at whatever the buffers on the path hold). It halves (not below [`FlowConfig::window`]) when the application is slow (more
    /// than half the window unread) or when the connection holds more than its fair share:
    /// half the budget, divided among the connections that have grown. So the budget stays
    /// the bound on what a tunnel buffers, whatever the windows.
    pub fn retune(&mut self, c: &mut ConnCredit) -> Option<u32> {
        let now = self.now?;
        if !c.tuned {
            return None;
        }
        let since = *c.tune.since.get_or_insert(now);
        if c.tune.consumed < c.granted {
            return None;
        }
        let base = self.own.window as u64;
        let others = self.grown - usize::from(c.granted > base).min(self.grown);
        let fair = (self.own.budget / 2 / (others as u64 + 1))
            .min(MAX_AUTO_WINDOW)
            .max(base);
        let window_bound = c.buffered <= c.granted / 4
            && self
                .min_rtt()
                .is_some_and(|rtt| now.saturating_duration_since(since) < rtt * 2);
        let next = if window_bound && c.granted < fair {
            (c.granted * 2).min(fair)
        } else if c.buffered > c.granted / 2 || c.granted > fair {
            (c.granted / 2).max(base)
        } else {
            c.granted
        };
        c.tune = Tune {
            since: Some(now),
            consumed: 0,
        };
        if next == c.granted {
            return None;
        }
        match (c.granted > base, next > base) {
            (false, true) => self.grown += 1,
            (true, false) => self.grown -= 1.min(self.grown),
            _ => {}
        }
        c.granted = next;
        c.limit = c.limit.max(next);
        Some(next.min(u32::MAX as u64) as u32)
    }

    /// Whether writers waiting for the budget should look again after connections closed
    /// (clears the flag).
    pub fn take_budget_freed(&mut self) -> bool {
        let free = self.peer.is_some_and(|p| self.sent_total < p.budget);
        free && std::mem::take(&mut self.budget_blocked)
    }

    /// Bytes sent and not credited back, over all connections.
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }

    /// Bytes received and not credited back, over all connections.
    pub fn received_total(&self) -> u64 {
        self.received_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_is_ignorable() {
        let h = Hello {
            from: "source".into(),
            features: vec![FEATURE.into()],
            window: 1000,
            budget: 5000,
            confirm: true,
            reply: false,
            epoch: 7,
        };
        let m = h.to_message();
        assert!(m.ignorable);
        assert!(m.kind().is_none(), "not an AWS type");
        assert_eq!(Hello::from_message(&m), Some(h));
    }

    #[test]
    fn window_updates_carry_a_positive_increment() {
        let m = window_update(3, "SSH", 2, 65536);
        assert!(m.ignorable);
        assert_eq!(window_increment(&m), Some(65536));
        let mut bad = m.clone();
        bad.payload = Bytes::from_static(&[0, 0, 0]);
        assert_eq!(window_increment(&bad), None);
        bad.payload = Bytes::from_static(&[0, 0, 0, 0]);
        assert_eq!(window_increment(&bad), None);
    }

    #[test]
    fn connections_short_of_their_batch_cannot_hold_the_budget() {
        let cfg = FlowConfig {
            window: MIN_WINDOW,
            budget: MIN_WINDOW as u64,
        };
        let (mut a, mut b) = (Credit::new(cfg), Credit::new(cfg));
        a.set_peer(Some(cfg));
        b.set_peer(Some(cfg));
        // Six connections, each sending less than a quarter window, fill the budget.
        let mut conns: Vec<(ConnCredit, ConnCredit)> = (0..6)
            .map(|_| (a.open().unwrap(), b.open().unwrap()))
            .collect();
        for (ac, bc) in &mut conns {
            let n = a.available(ac).bytes.min(12_000);
            a.sent(ac, n).unwrap();
            b.received(bc, n).unwrap();
        }
        assert_eq!(a.sent_total(), cfg.budget, "the budget is full");
        // The receiver consumes everything: no connection reaches its batch, yet the credit
        // must come back, or the tunnel stalls for good.
        let mut back = Vec::new();
        for (i, (_, bc)) in conns.iter_mut().enumerate() {
            if let Some(inc) = b.consumed(bc, u64::MAX) {
                back.push((i, inc));
            }
        }
        assert!(back.is_empty(), "no single connection reached its batch");
        assert!(b.must_flush());
        for (i, (_, bc)) in conns.iter_mut().enumerate() {
            if let Some(inc) = b.take_return(bc) {
                back.push((i, inc));
            }
        }
        for (i, inc) in back {
            a.credited(&mut conns[i].0, inc as u64);
        }
        for (ac, _) in &conns {
            assert!(a.available(ac).bytes > 0);
        }
    }

    /// One connection over a simulated path: a link of `rate` bytes per second and a round
    /// trip of `rtt`, a receiving application that consumes `app_rate` bytes per second (or at
    /// once), and a sender with unlimited data. Returns the throughput over the second half of
    /// `secs` (bytes per second), and the window the receiver ended up granting.
    fn simulate(
        autotune: bool,
        rtt: Duration,
        rate: u64,
        app_rate: Option<u64>,
        secs: u64,
    ) -> (f64, u64) {
        #[derive(Debug)]
        enum Back {
            Update(u32),
            Size(u32),
        }
        let cfg = FlowConfig::default();
        let (mut a, mut b) = (Credit::new(cfg), Credit::new(cfg));
        a.set_peer(Some(cfg));
        b.set_peer(Some(cfg));
        a.set_autotune(autotune);
        b.set_autotune(autotune);
        // As the first PING, before any data, measures it.
        b.rtt_sample(rtt);
        let (mut ac, mut bc) = (a.open().unwrap(), b.open().unwrap());
        let base = Instant::now();
        let step = 20u64; // µs
        let half = rtt.as_micros() as u64 / 2;
        let (mut data, mut back) = (
            std::collections::VecDeque::<(u64, u64)>::new(),
            std::collections::VecDeque::<(u64, Back)>::new(),
        );
        let (mut link_free, mut app_budget) = (0u64, 0f64);
        let (mut delivered_late, end) = (0u64, secs * 1_000_000);
        let mut t = 0u64;
        while t < end {
            let now = base + Duration::from_micros(t);
            // The sender: one frame at a time, as fast as the link takes them.
            if t >= link_free {
                let n = a
                    .available(&ac)
                    .bytes
                    .min(crate::message::MAX_PAYLOAD as u64);
                if n > 0 {
                    a.sent(&mut ac, n).unwrap();
                    let tx = n * 1_000_000 / rate;
                    link_free = t + tx.max(1);
                    data.push_back((t + tx + half, n));
                }
            }
            b.tick(now);
            while data.front().is_some_and(|(at, _)| *at <= t) {
                let (_, n) = data.pop_front().unwrap();
                b.received(&mut bc, n).expect("within the granted window");
                if t >= end / 2 {
                    delivered_late += n;
                }
            }
            let n = match app_rate {
                None => bc.buffered(),
                Some(r) => {
                    app_budget += r as f64 * step as f64 / 1e6;
                    let n = (app_budget as u64).min(bc.buffered());
                    app_budget -= n as f64;
                    n
                }
            };
            if n > 0 {
                if let Some(inc) = b.consumed(&mut bc, n) {
                    back.push_back((t + half, Back::Update(inc)));
                }
                if b.must_flush()
                    && let Some(inc) = b.take_return(&mut bc)
                {
                    back.push_back((t + half, Back::Update(inc)));
                }
                if let Some(w) = b.retune(&mut bc) {
                    back.push_back((t + half, Back::Size(w)));
                }
            }
            while back.front().is_some_and(|(at, _)| *at <= t) {
                match back.pop_front().unwrap().1 {
                    Back::Update(inc) => {
                        a.credited(&mut ac, inc as u64);
                    }
                    Back::Size(w) => {
                        a.resized(&mut ac, w);
                    }
                }
                assert!(
                    ac.in_flight() <= bc.limit,
                    "never more in flight than granted"
                );
                assert!(a.sent_total() <= cfg.budget);
            }
            t += step;
        }
        (delivered_late as f64 / (secs as f64 / 2.0), bc.granted())
    }

    #[test]
    fn an_auto_tuned_window_grows_to_what_the_round_trip_needs_and_no_further() {
        let rate = 100_000_000 / 8; // 100 Mbit/s
        for rtt_ms in [50u64, 150] {
            let rtt = Duration::from_millis(rtt_ms);
            let bdp = rate * rtt_ms / 1000;
            let (fixed, w) = simulate(false, rtt, rate, None, 8);
            assert_eq!(w, DEFAULT_WINDOW as u64);
            let fixed_expect = DEFAULT_WINDOW as f64 / rtt.as_secs_f64();
            assert!(
                fixed <= fixed_expect * 1.05,
                "{rtt_ms} ms: a fixed window carries at most window ÷ RTT ({fixed_expect:.0} B/s), got {fixed:.0}"
            );
            let (tuned, w) = simulate(true, rtt, rate, None, 8);
            println!(
                "{rtt_ms} ms, 100 Mbit/s: fixed {:.1} Mbit/s, tuned {:.1} Mbit/s, window {} KiB (BDP {} KiB)",
                fixed * 8e-6,
                tuned * 8e-6,
                w / 1024,
                bdp / 1024
            );
            assert!(
                tuned >= 0.9 * rate as f64,
                "{rtt_ms} ms: the tuned window reaches 90 % of the link ({tuned:.0} of {rate} B/s)"
            );
            assert!(
                w <= 4 * bdp.max(DEFAULT_WINDOW as u64),
                "{rtt_ms} ms: the window ({w}) stops within a few BDPs ({bdp})"
            );
        }
        // Loopback-like: a fast link and a short round trip need no more than the default.
        let (_, w) = simulate(true, Duration::from_micros(200), 1_000_000_000, None, 2);
        assert!(w <= 4 * DEFAULT_WINDOW as u64, "{w}");
    }

    #[test]
    fn a_slow_application_keeps_its_window_small() {
        // 50 ms, 100 Mbit/s, but the application reads 1 MB/s: the window must not grow.
        let (tp, w) = simulate(
            true,
            Duration::from_millis(50),
            100_000_000 / 8,
            Some(1_000_000),
            6,
        );
        assert_eq!(w, DEFAULT_WINDOW as u64, "the window stays at its base");
        assert!(tp <= 1_100_000.0, "{tp}");
    }

    #[test]
    fn grown_windows_shrink_back_to_a_fair_share_of_the_budget() {
        let cfg = FlowConfig::default();
        let mut b = Credit::new(cfg);
        b.set_peer(Some(cfg));
        b.set_autotune(true);
        let t0 = Instant::now();
        b.tick(t0);
        b.rtt_sample(Duration::from_millis(50));
        let mut conns: Vec<ConnCredit> = (0..3).map(|_| b.open().unwrap()).collect();
        // Each, alone, window-bound: grows; together they are held to half the budget.
        let mut t = t0;
        for _ in 0..12 {
            for c in conns.iter_mut() {
                let w = c.granted;
                b.received(c, w).unwrap();
                b.take_return(c); // nothing unreturned yet: marks nothing
                b.consumed(c, w);
                b.take_return(c);
                t += Duration::from_millis(10);
                b.tick(t);
                b.retune(c);
            }
        }
        let total: u64 = conns.iter().map(|c| c.granted).sum();
        assert!(
            conns.iter().all(|c| c.granted > cfg.window as u64),
            "{conns:?}"
        );
        assert!(
            total <= cfg.budget / 2 + 2 * cfg.window as u64,
            "grown windows add up to about half the budget: {total}"
        );
        // One closes: the others may take its share.
        let gone = conns.pop().unwrap();
        b.closed(gone);
        assert_eq!(b.grown, 2);
    }

    /// The credit machine of two ends, one direction (sender A, receiver B), driven by random
    /// operation sequences, against its invariants.
    mod machine {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::VecDeque;

        const CONNS: usize = 6;

        #[derive(Clone, Debug)]
        enum Op {
            Send(usize, u64),
            DeliverData,
            Consume(usize, u64),
            DeliverCredit,
            Close(usize),
            Reopen(usize),
            /// The clock moves (auto-tuning reads it), by microseconds.
            Tick(u64),
        }

        /// What travels back from B to A: credit, or a new window size.
        #[derive(Clone, Copy, Debug)]
        enum Back {
            Update(u64),
            Size(u32),
        }

        fn op() -> impl Strategy<Value = Op> {
            let conn = 0..CONNS;
            // Small sends too: many connections each short of a credit batch is the case
            // that once stalled a tunnel.
            let size = prop_oneof![1u64..2_000, 2_000u64..20_000, 20_000u64..70_000];
            prop_oneof![
                5 => (conn.clone(), size).prop_map(|(c, n)| Op::Send(c, n)),
                3 => Just(Op::DeliverData),
                3 => (conn.clone(), 1u64..200_000).prop_map(|(c, n)| Op::Consume(c, n)),
                3 => Just(Op::DeliverCredit),
                1 => conn.clone().prop_map(Op::Close),
                1 => conn.prop_map(Op::Reopen),
                2 => (0u64..20_000).prop_map(Op::Tick),
            ]
        }

        fn config() -> impl Strategy<Value = FlowConfig> {
            (1u32..5, 1u64..9).prop_map(|(w, b)| {
                let window = MIN_WINDOW * w;
                FlowConfig {
                    window,
                    budget: window as u64 * b,
                }
            })
        }

        struct World {
            a: Credit,
            b: Credit,
            /// A's and B's view of each connection; `None` while closed.
            conns: [Option<(ConnCredit, ConnCredit)>; CONNS],
            /// DATA on its way to B, and credit on its way back: (connection, generation, bytes).
            data: VecDeque<(usize, u32, u64)>,
            credit: VecDeque<(usize, u32, Back)>,
            now: Instant,
            /// A connection reopened is a new one: messages of an older generation are stale.
            generation: [u32; CONNS],
            consumed: [u64; CONNS],
            returned: [u64; CONNS],
        }

        impl World {
            fn new(ca: FlowConfig, cb: FlowConfig, autotune: bool) -> World {
                let (mut a, mut b) = (Credit::new(ca), Credit::new(cb));
                a.set_peer(Some(b.own()));
                b.set_peer(Some(a.own()));
                let now = Instant::now();
                if autotune {
                    a.set_autotune(true);
                    b.set_autotune(true);
                    b.tick(now);
                    b.rtt_sample(Duration::from_millis(1));
                }
                let mut w = World {
                    a,
                    b,
                    conns: [None; CONNS],
                    data: VecDeque::new(),
                    credit: VecDeque::new(),
                    now,
                    generation: [0; CONNS],
                    consumed: [0; CONNS],
                    returned: [0; CONNS],
                };
                for k in 0..CONNS {
                    w.open(k);
                }
                w
            }

            fn open(&mut self, k: usize) {
                self.conns[k] = Some((self.a.open().unwrap(), self.b.open().unwrap()));
                self.generation[k] += 1;
                self.consumed[k] = 0;
                self.returned[k] = 0;
            }

            fn give_back(&mut self, k: usize, inc: Option<u32>) {
                if let Some(inc) = inc {
                    self.returned[k] += inc as u64;
                    self.credit
                        .push_back((k, self.generation[k], Back::Update(inc as u64)));
                }
                if self.b.must_flush() {
                    for j in 0..CONNS {
                        if let Some((_, bc)) = self.conns[j].as_mut() {
                            let inc = self.b.take_return(bc);
                            if let Some(inc) = inc {
                                self.returned[j] += inc as u64;
                                self.credit.push_back((
                                    j,
                                    self.generation[j],
                                    Back::Update(inc as u64),
                                ));
                            }
                        }
                    }
                }
            }

            fn apply(&mut self, op: &Op) {
                match *op {
                    Op::Send(k, n) => {
                        let Some((ac, _)) = self.conns[k].as_mut() else {
                            return;
                        };
                        let avail = self.a.available(ac).bytes;
                        let n = n.min(avail).min(crate::message::MAX_PAYLOAD as u64);
                        assert!(
                            self.a.sent(&mut ac.clone(), avail + 1).is_err(),
                            "sending past the credit is refused"
                        );
                        if n > 0 {
                            self.a.sent(ac, n).unwrap();
                            self.data.push_back((k, self.generation[k], n));
                        } else {
                            self.a.waiting(ac);
                        }
                    }
                    Op::DeliverData => {
                        let Some((k, g, n)) = self.data.pop_front() else {
                            return;
                        };
                        if g != self.generation[k] {
                            return; // stale: its connection closed
                        }
                        let (_, bc) = self.conns[k].as_mut().unwrap();
                        self.b
                            .received(bc, n)
                            .expect("a sender within its credit is never refused");
                    }
                    Op::Consume(k, n) => {
                        let Some((_, bc)) = self.conns[k].as_mut() else {
                            return;
                        };
                        let n = n.min(bc.buffered());
                        self.consumed[k] += n;
                        let inc = self.b.consumed(bc, n);
                        let size = self.b.retune(bc);
                        self.give_back(k, inc);
                        if let Some(w) = size {
                            self.credit
                                .push_back((k, self.generation[k], Back::Size(w)));
                        }
                    }
                    Op::Tick(us) => {
                        self.now += Duration::from_micros(us);
                        self.b.tick(self.now);
                    }
                    Op::DeliverCredit => {
                        let Some((k, g, back)) = self.credit.pop_front() else {
                            return;
                        };
                        if g != self.generation[k] {
                            return;
                        }
                        let (ac, _) = self.conns[k].as_mut().unwrap();
                        match back {
                            Back::Update(inc) => {
                                self.a.credited(ac, inc);
                            }
                            Back::Size(w) => {
                                self.a.resized(ac, w);
                            }
                        }
                    }
                    Op::Close(k) => {
                        if let Some((ac, bc)) = self.conns[k].take() {
                            self.a.closed(ac);
                            self.b.closed(bc);
                            // What is still on the wire for it is stale from now on.
                            self.generation[k] += 1;
                        }
                    }
                    Op::Reopen(k) => {
                        if self.conns[k].is_none() {
                            self.open(k);
                        }
                    }
                }
            }

            fn check(&self) {
                let budget = self.b.own().budget;
                let mut sent = 0;
                let mut held = 0;
                for k in 0..CONNS {
                    let Some((ac, bc)) = &self.conns[k] else {
                        continue;
                    };
                    assert!(
                        ac.in_flight() <= bc.limit,
                        "in flight ≤ the largest window granted"
                    );
                    assert!(bc.granted >= self.b.own().window as u64 && bc.granted <= bc.limit);
                    assert!(self.returned[k] <= self.consumed[k], "returned ≤ consumed");
                    let g = self.generation[k];
                    let on_wire: u64 = self
                        .data
                        .iter()
                        .filter(|(j, gj, _)| *j == k && *gj == g)
                        .map(|(_, _, n)| n)
                        .sum::<u64>()
                        + self
                            .credit
                            .iter()
                            .filter(|(j, gj, _)| *j == k && *gj == g)
                            .map(|(_, _, b)| match b {
                                Back::Update(n) => *n,
                                Back::Size(_) => 0,
                            })
                            .sum::<u64>();
                    assert_eq!(
                        ac.in_flight(),
                        on_wire + bc.buffered + bc.unreturned,
                        "every byte in flight is on the wire, buffered, or awaiting its batch"
                    );
                    sent += ac.in_flight();
                    held += bc.buffered + bc.unreturned;
                }
                assert_eq!(self.a.sent_total(), sent);
                assert!(sent <= budget, "total ≤ budget");
                assert_eq!(self.b.received_total(), held);
            }

            /// Deliver everything, consume everything, deliver the credit: every open
            /// connection may send again.
            fn drain_and_check_liveness(&mut self) {
                for _ in 0..1000 {
                    let buffered = self.conns.iter().flatten().any(|(_, bc)| bc.buffered > 0);
                    if self.data.is_empty() && self.credit.is_empty() && !buffered {
                        break;
                    }
                    self.apply(&Op::DeliverData);
                    for k in 0..CONNS {
                        self.apply(&Op::Consume(k, u64::MAX));
                    }
                    self.apply(&Op::DeliverCredit);
                    self.check();
                }
                assert!(self.data.is_empty() && self.credit.is_empty());
                for (ac, _) in self.conns.iter().flatten() {
                    assert!(
                        self.a.available(ac).bytes > 0,
                        "nothing stalls once everything was consumed"
                    );
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(512)))]
            #[test]
            fn credit_keeps_its_invariants(
                ca in config(),
                cb in config(),
                autotune in any::<bool>(),
                ops in proptest::collection::vec(op(), 0..300),
            ) {
                let mut w = World::new(ca, cb, autotune);
                for o in &ops {
                    w.apply(o);
                    w.check();
                }
                w.drain_and_check_liveness();
            }
        }
    }
}
