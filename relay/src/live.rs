//! The live half of a tunnel: which peer is connected on each side, how to reach it, how to
//! disconnect it (and with which close frame), and the frame rules both sides share. The
//! registry owns one per tunnel; the data plane works on it under its own lock, never the
//! registry's.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use culvert_protocol::Format;
use culvert_protocol::ext::Extensions;
use culvert_protocol::message::MAX_WS_MESSAGE;
use culvert_protocol::rules::FrameRules;
use culvert_protocol::{Mode, close, frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::registry::now_ms;
use crate::store::TunnelRecord;
use culvert_protocol::forward::Chunk;

/// Why the relay disconnects a peer. It decides the peer's close frame, and so whether the
/// peer comes back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KickReason {
    /// The side's token was revoked: rotated, or the tunnel closed or expired. Final: the
    /// reconnect is refused with the reason.
    Revoked(&'static str),
    /// A newer connection with the same token took this one's place.
    Replaced,
    /// The peer broke the protocol's rules.
    Violation(String),
    /// The peer sent a WebSocket message over the protocol's limit.
    TooBig,
    /// The relay is stopping (or draining): the peer should reconnect, to it or another node.
    Restart,
    /// The connection has already ended: nothing is sent.
    Gone,
}

impl KickReason {
    /// The close frame (code, reason) for a peer that did or did not negotiate culvert's
    /// extensions; `None`: end the connection without one.
    ///
    /// A restart is told to culvert's programs with [`close::RESTART`]; an AWS peer gets no
    /// close frame at all, since the localproxy exits for good on any close frame but retries
    /// a connection that simply ends.
    pub fn close_frame(&self, extensions: Extensions) -> Option<(u16, String)> {
        let (code, reason) = match self {
            KickReason::Revoked(why) => (close::NORMAL, (*why).to_owned()),
            KickReason::Replaced => (
                close::NORMAL,
                "replaced by a new connection with the same access token".to_owned(),
            ),
            KickReason::Violation(v) => (close::POLICY, format!("protocol violation: {v}")),
            KickReason::TooBig => (
                close::TOO_BIG,
                format!(
                    "message too big: WebSocket messages are limited to {MAX_WS_MESSAGE} bytes"
                ),
            ),
            KickReason::Restart if extensions.restart => (
                close::RESTART,
                "relay restarting: reconnect with the same tokens".to_owned(),
            ),
            KickReason::Restart | KickReason::Gone => return None,
        };
        Some((code, truncate_reason(reason)))
    }
}

impl std::fmt::Display for KickReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.close_frame(Extensions::ALL) {
            Some((_, reason)) => f.write_str(&reason),
            None => f.write_str("connection ended"),
        }
    }
}

/// Close-frame reasons are limited to 123 bytes (RFC 6455 §5.5).
fn truncate_reason(mut s: String) -> String {
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

/// A disconnect request with the reason that decides the peer's close frame. The first reason
/// given wins.
#[derive(Clone, Default)]
pub struct Kick {
    token: CancellationToken,
    reason: Arc<OnceLock<KickReason>>,
}

impl Kick {
    pub fn kick(&self, reason: KickReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
    pub async fn kicked(&self) -> KickReason {
        self.token.cancelled().await;
        self.reason.get().cloned().unwrap_or(KickReason::Gone)
    }
}

/// One connected peer as the data path sees it.
pub struct PeerSlot {
    pub peer_id: u64,
    /// Frames towards this peer (bounded: a slow peer holds back its sender).
    pub tx: mpsc::Sender<Chunk>,
    pub kick: Kick,
    /// The culvert extensions this peer negotiated in its handshake: extension messages reach
    /// it only if it did.
    pub extensions: Extensions,
    /// The message format of its subprotocol ([`crate::bridge`]).
    pub format: Format,
    /// The side's generation it was admitted under.
    pub generation: u64,
}

/// A peer about to attach: how to reach it.
pub struct NewPeer {
    pub tx: mpsc::Sender<Chunk>,
    pub kick: Kick,
    pub extensions: Extensions,
    pub format: Format,
}

/// The other side of a tunnel as a forwarding peer sees it.
#[derive(Clone)]
pub struct Target {
    pub tx: mpsc::Sender<Chunk>,
    pub kick: Kick,
    pub extensions: Extensions,
    pub format: Format,
}

#[derive(Default)]
struct Side {
    peer: Option<PeerSlot>,
    changed_ms: i64,
    /// The newest generation of this side's token seen here (it moves on with every
    /// rotation and close, in the store): a handshake admitted under an older one may not
    /// attach.
    generation: u64,
    /// The relay HELLO that told this side's peer of a new peer on the other side, until the
    /// peer answers it (see `culvert_protocol::forward::Inbound::feed`).
    awaiting: Option<u64>,
    /// This side's peer went away with connections to resume: the other side holds them, and
    /// the streams were kept (see [`Live::detach`]).
    held: bool,
}

pub struct LiveInner {
    pub rules: FrameRules,
    source: Side,
    destination: Side,
    next_peer: u64,
    /// Numbers the relay's HELLOs in this tunnel.
    next_epoch: u64,
}

impl LiveInner {
    fn side(&mut self, mode: Mode) -> &mut Side {
        match mode {
            Mode::Source => &mut self.source,
            Mode::Destination => &mut self.destination,
        }
    }

    fn peer(&self, mode: Mode) -> Option<&PeerSlot> {
        match mode {
            Mode::Source => &self.source,
            Mode::Destination => &self.destination,
        }
        .peer
        .as_ref()
    }

    /// The sender towards the peer of `mode`, if connected.
    pub fn tx(&self, mode: Mode) -> Option<mpsc::Sender<Chunk>> {
        self.peer(mode).map(|p| p.tx.clone())
    }

    /// The peer of `mode`, if connected: its queue, its kick and its extensions.
    pub fn target(&self, mode: Mode) -> Option<Target> {
        self.peer(mode).map(|p| Target {
            tx: p.tx.clone(),
            kick: p.kick.clone(),
            extensions: p.extensions,
            format: p.format,
        })
    }

    /// What checking a frame from `mode` needs: the tunnel's rules, the HELLO that side's
    /// peer has not answered yet, and whether the other side's connections are held for a
    /// resume.
    pub fn check_context(&mut self, mode: Mode) -> (&mut FrameRules, &mut Option<u64>, bool) {
        let held = self.side(mode.other()).held;
        let side = match mode {
            Mode::Source => &mut self.source,
            Mode::Destination => &mut self.destination,
        };
        (&mut self.rules, &mut side.awaiting, held)
    }

    /// Do the peers on both sides, the one gone and the one staying, resume connections?
    fn both_resume(&self, gone: &PeerSlot, stays: Mode) -> bool {
        gone.extensions.resume && self.peer(stays).is_some_and(|p| p.extensions.resume)
    }

    /// The number of the next relay HELLO. Every one is numbered from 1: an end echoes the
    /// last it saw, so 0 can only come from an end that does not echo.
    pub fn next_hello(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    /// A relay HELLO is about to tell `mode`'s peer of a new peer on the other side: its
    /// number. Until that peer answers it, what it sends about connections is stale
    /// (`culvert_protocol::forward::Inbound::feed`).
    pub fn announce_peer_change(&mut self, mode: Mode) -> u64 {
        let epoch = self.next_hello();
        self.side(mode).awaiting = Some(epoch);
        epoch
    }

    /// Is `peer_id` still the attached peer of `mode`? (A replaced peer must stop forwarding.)
    pub fn is_current(&self, mode: Mode, peer_id: u64) -> bool {
        self.peer(mode).is_some_and(|p| p.peer_id == peer_id)
    }
}

/// The live half of a tunnel: who is connected, and the frame rules.
pub struct Live {
    pub id: String,
    pub services: Vec<String>,
    /// The connection id of the stream a V2/V3 peer runs with a V1 peer ([`crate::bridge`]).
    pub bridged_connection: std::sync::atomic::AtomicU32,
    inner: Mutex<LiveInner>,
}

impl Live {
    pub(crate) fn new(rec: &TunnelRecord) -> Live {
        Live {
            id: rec.id.clone(),
            services: rec.services.clone(),
            bridged_connection: Default::default(),
            inner: Mutex::new(LiveInner {
                rules: FrameRules::new(rec.services.clone()),
                source: Side {
                    peer: None,
                    changed_ms: rec.source.last_change_ms,
                    generation: rec.source.generation,
                    awaiting: None,
                    held: false,
                },
                destination: Side {
                    peer: None,
                    changed_ms: rec.destination.last_change_ms,
                    generation: rec.destination.generation,
                    awaiting: None,
                    held: false,
                },
                next_peer: 1,
                next_epoch: 0,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, LiveInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a new peer for `mode`, replacing (and kicking) any previous one. The surviving
    /// other side is told which streams died, unless the old peer, the new one and the
    /// survivor all resume connections (then the two ends resume them). `None` if the side's
    /// token was revoked after the handshake was admitted under `generation`.
    pub fn attach(&self, mode: Mode, generation: u64, new: NewPeer) -> Option<u64> {
        let mut g = self.lock();
        let side = g.side(mode);
        if generation < side.generation {
            return None;
        }
        side.generation = generation;
        let peer_id = g.next_peer;
        g.next_peer += 1;
        let old = g.side(mode).peer.take();
        let keep = match &old {
            Some(old) => new.extensions.resume && g.both_resume(old, mode.other()),
            // Streams kept for a resume (or none): a peer that cannot resume ends them.
            None => new.extensions.resume,
        };
        if let Some(old) = old {
            old.kick.kick(KickReason::Replaced);
        }
        if !keep {
            let resets = g.rules.peer_gone();
            send_resets(g.tx(mode.other()), resets);
        }
        let side = g.side(mode);
        side.held = false;
        side.peer = Some(PeerSlot {
            peer_id,
            tx: new.tx,
            kick: new.kick,
            extensions: new.extensions,
            format: new.format,
            generation,
        });
        side.changed_ms = now_ms();
        Some(peer_id)
    }

    /// A side's token was revoked, moving it to `generation`: handshakes admitted under an
    /// older one may no longer attach, and a peer connected under one is disconnected with
    /// `reason`. (Revocations may arrive out of order; an older one changes nothing.)
    pub fn revoke(&self, mode: Mode, generation: u64, reason: &'static str) {
        let mut g = self.lock();
        let side = g.side(mode);
        side.generation = side.generation.max(generation);
        if let Some(p) = &side.peer
            && p.generation < generation
        {
            p.kick.kick(KickReason::Revoked(reason));
        }
    }

    /// A peer's session ended. Returns whether it was still the registered one. The other
    /// side is told which streams died; or, if both peers resume connections, it is told
    /// (with a relay HELLO) that its peer is gone, and holds its connections for a resume.
    pub fn detach(&self, mode: Mode, peer_id: u64) -> bool {
        let mut g = self.lock();
        if g.side(mode).peer.as_ref().map(|p| p.peer_id) != Some(peer_id) {
            return false;
        }
        let side = g.side(mode);
        let gone = side.peer.take();
        side.changed_ms = now_ms();
        let held = gone
            .as_ref()
            .is_some_and(|gone| g.both_resume(gone, mode.other()));
        g.side(mode).held = held;
        if held {
            let epoch = g.announce_peer_change(mode.other());
            let hello = culvert_protocol::flow::Hello::relay_epoch(epoch).to_message();
            send_resets(g.tx(mode.other()), vec![hello]);
        } else {
            let resets = g.rules.peer_gone();
            send_resets(g.tx(mode.other()), resets);
        }
        true
    }

    pub fn kick(&self, mode: Mode, reason: KickReason) {
        if let Some(p) = &self.lock().side(mode).peer {
            p.kick.kick(reason);
        }
    }

    /// (connected, last change ms) for a side.
    pub fn state(&self, mode: Mode) -> (bool, i64) {
        let mut g = self.lock();
        let s = g.side(mode);
        (s.peer.is_some(), s.changed_ms)
    }
}

/// Queue STREAM_RESETs (or a relay HELLO) towards a peer without waiting (spawning if its
/// queue is full).
fn send_resets(tx: Option<mpsc::Sender<Chunk>>, resets: Vec<culvert_protocol::Message>) {
    let Some(tx) = tx else { return };
    for m in resets {
        let Ok(f) = frame::encode_to_bytes(&m).map(Chunk::new) else {
            continue;
        };
        if let Err(mpsc::error::TrySendError::Full(f)) = tx.try_send(f) {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(f).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_tell_culvert_peers_to_come_back_and_leave_aws_peers_none() {
        // A restart: culvert's programs get "Service Restart"; the localproxy exits for good on
        // any close frame, so an AWS peer gets none and reconnects.
        assert_eq!(
            KickReason::Restart
                .close_frame(Extensions::ALL)
                .map(|f| f.0),
            Some(close::RESTART)
        );
        assert_eq!(KickReason::Restart.close_frame(Extensions::NONE), None);
        assert_eq!(KickReason::Gone.close_frame(Extensions::ALL), None);
        // Final ends are told to everyone, with the reason.
        for ext in [Extensions::ALL, Extensions::NONE] {
            assert_eq!(
                KickReason::Revoked("tunnel closed").close_frame(ext),
                Some((close::NORMAL, "tunnel closed".to_owned()))
            );
            assert_eq!(
                KickReason::Violation("x".into())
                    .close_frame(ext)
                    .unwrap()
                    .0,
                close::POLICY
            );
            assert_eq!(
                KickReason::TooBig.close_frame(ext).unwrap().0,
                close::TOO_BIG
            );
        }
        let long = KickReason::Violation("é".repeat(100));
        let (_, reason) = long.close_frame(Extensions::NONE).unwrap();
        assert!(reason.len() <= 123 && reason.starts_with("protocol violation: é"));
    }
}
