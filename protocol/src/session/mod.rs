//! The tokio shell around [`Mux`]: runs one tunnel session over one WebSocket and exposes each
//! tunnel connection as a [`Connection`] (`AsyncRead + AsyncWrite`).
//!
//! Two tasks per session, so that reading never waits on writing (a relay forwarding both ways
//! would otherwise deadlock the two ends under bidirectional load):
//! - the **reader** decodes frames, feeds the mux under a short lock (never held across an
//!   `.await`), and delivers data into each connection's queue. With culvert's flow control
//!   ([`crate::flow`]) a connection's queue is bounded by the credit it was granted, so the
//!   reader never waits: a slow local reader stalls only its own connection. Without it (AWS
//!   peers and relays) the queue is bounded and the reader waits when it is full: the AWS
//!   protocol has no flow control, so a slow local reader holds back the whole session rather
//!   than losing bytes or buffering without bound.
//! - the **writer** owns the WebSocket sink and schedules what goes out: control messages
//!   (starts, credit, negotiation) first, then one DATA frame per connection in turn (round
//!   robin), so an interactive connection's keystrokes overtake a bulk transfer's backlog. Frames
//!   are coalesced into WebSocket messages of at most [`crate::message::MAX_WS_MESSAGE`] bytes. It pings every
//!   [`SessionConfig::ping_interval`].
//!
//! The session ends when the peer closes, on a transport or protocol error, when nothing is heard
//! for [`SessionConfig::idle_timeout`], or when [`SessionHandle::close`] is called. Then every
//! connection reads EOF and fails writes with `BrokenPipe`.
//!
//! With resumable connections ([`crate::ext::RESUME_TOKEN`], [`SessionConfig::resume_hold`]) a
//! WebSocket that drops (not closed for good by the relay) does not end the session if it holds
//! connections that can be resumed: they wait, their local sockets open, for
//! [`SessionHandle::reattach`] with a new WebSocket (the application reconnects when
//! [`SessionHandle::link_down`] says so), and end after the hold time if none comes.

//!
//! The parts, one file each: [`sched`] (what the writer sends next, and in which order),
//! `inbox` (received bytes on their way to a connection's reader, bounded without flow control),
//! `pool` (reused buffers), `reader` and `writer` (the two tasks), `connection` (the
//! application's [`Connection`]) and `splice` (a connection joined to a local socket).

mod connection;
mod inbox;
mod pool;
mod reader;
mod sched;
mod splice;
mod writer;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use connection::{Connection, ConnectionReader, ConnectionWriter};
pub use splice::{GrowBuf, Spliced, splice};

use crate::flow::FlowConfig;
use crate::frame::{self, FrameError};
use crate::mux::{ConnId, Event, Mux, MuxError, Output};
use inbox::Inbox;
use pool::Pool;
use sched::Sched;

/// Space reserved at a time for encoding control frames.
const CONTROL_BUFFER: usize = 8 * 1024;
/// New streams waiting for the application to take them (destination).
const INCOMING_QUEUE: usize = 128;

/// How long connections wait for the tunnel to come back by default.
pub const DEFAULT_RESUME_HOLD: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// WebSocket ping period (the localproxy uses 20 s).
    pub ping_interval: Duration,
    /// End the session when nothing at all arrives for this long (pings are answered, so a live
    /// relay is never idle this long).
    pub idle_timeout: Duration,
    /// Offer culvert's flow-control extension (used only when the relay and the peer offer it).
    pub flow_control: Option<FlowConfig>,
    /// Offer resumable connections (with flow control, when the relay accepted `resume/1`),
    /// held this long while the tunnel is down.
    pub resume_hold: Option<Duration>,
}

impl SessionConfig {
    /// Keep only the extensions the relay accepted in the handshake
    /// ([`crate::client::Connected::extensions`]): against AWS's relay, none.
    pub fn for_relay(mut self, accepted: crate::ext::Extensions) -> SessionConfig {
        if !accepted.flow_control {
            self.flow_control = None;
        }
        if !accepted.resume || self.flow_control.is_none() {
            self.resume_hold = None;
        }
        self
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(65),
            flow_control: Some(FlowConfig::default()),
            resume_hold: Some(DEFAULT_RESUME_HOLD),
        }
    }
}

/// Why a session ended.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The relay closed the WebSocket (with the close frame's code and reason, if it sent one).
    #[error("the relay closed the session{}", .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    PeerClosed {
        code: Option<u16>,
        reason: Option<String>,
    },
    #[error("protocol error from the peer: {0}")]
    Protocol(PeerError),
    #[error("connection to the relay failed: {0}")]
    Transport(String),
    #[error("nothing heard from the relay for {0:?}")]
    Idle(Duration),
    #[error("session closed locally")]
    Cancelled,
}

/// What the peer sent that breaks the protocol; it ends the session (reconnecting may help,
/// the same bytes again would not).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Message(#[from] crate::mux::ProtocolError),
    #[error("text WebSocket frame (only binary is allowed)")]
    TextFrame,
}

impl SessionEnd {
    /// The relay is restarting or draining and asked us to come back
    /// ([`crate::close::RESTART`]); the tunnel and its tokens are still valid.
    /// Whether the session's connections may be resumed on a new WebSocket after this end
    /// (the relay did not end the session for good, and the peer broke no rule).
    pub fn is_resumable(&self) -> bool {
        match self {
            SessionEnd::PeerClosed { code, .. } => !matches!(
                code,
                Some(crate::close::NORMAL | crate::close::POLICY | crate::close::TOO_BIG)
            ),
            SessionEnd::Transport(_) | SessionEnd::Idle(_) => true,
            SessionEnd::Protocol(_) | SessionEnd::Cancelled => false,
        }
    }

    pub fn is_relay_restart(&self) -> bool {
        matches!(
            self,
            SessionEnd::PeerClosed {
                code: Some(crate::close::RESTART),
                ..
            }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Mux(#[from] MuxError),
    #[error("the tunnel session has ended")]
    Ended,
}

struct Inner {
    mux: Mux,
    conns: HashMap<ConnId, Inbox>,
    sched: Sched,
    pool: Pool,
    /// Control frames are encoded here and split off (the writer copies them out and drops
    /// them, so the space is reused).
    ctl: BytesMut,
    /// Reused for the mux's output outside the session reader.
    scratch: Output,
}

impl Inner {
    /// Queue what the mux produced to send (messages, then credit), and wake writers waiting
    /// for the tunnel budget if a closed connection gave some back. Leaves `out.events`. The
    /// caller notifies the writer.
    fn queue_control(&mut self, out: &mut Output) {
        for m in out.transmit.drain(..) {
            self.reserve_ctl();
            if frame::encode(&m, &mut self.ctl).is_ok() {
                self.sched.push_control(self.ctl.split().freeze());
            }
        }
        for (id, inc) in out.credit.drain(..) {
            self.reserve_ctl();
            if self.mux.encode_window_update(id, inc, &mut self.ctl) {
                self.sched.push_control(self.ctl.split().freeze());
            }
        }
        if self.mux.take_budget_freed() {
            self.sched.wake_all();
        }
    }

    /// Room for a control frame in `ctl` without allocating per frame.
    fn reserve_ctl(&mut self) {
        if self.ctl.capacity() < 512 {
            self.ctl.reserve(CONTROL_BUFFER);
        }
    }

    /// The application consumed `n` bytes of connection `id`: return credit if it is due.
    fn consumed(&mut self, id: ConnId, n: usize) {
        let mut out = std::mem::take(&mut self.scratch);
        self.mux.tick(std::time::Instant::now());
        self.mux.consumed(id, n, &mut out);
        if out
            .transmit
            .iter()
            .any(|m| m.r#type == crate::flow::WINDOW_SIZE)
        {
            debug!(conn = %id, window = ?self.mux.granted_window(id), min_rtt = ?self.mux.min_rtt(), "window auto-tuned");
        }
        self.queue_control(&mut out);
        self.scratch = out;
    }

    /// No more bytes will come for connection `id`: its reader gets EOF once it has read
    /// what is buffered.
    fn close_inbox(&mut self, id: ConnId) {
        if let Some(ib) = self.conns.get_mut(&id)
            && ib.close()
        {
            self.remove_inbox(id);
        }
    }

    /// The peer finished sending on connection `id` (half-close): its reader gets EOF once
    /// it has read what is buffered, and knows the peer still reads.
    fn finish_inbox(&mut self, id: ConnId) {
        if let Some(ib) = self.conns.get_mut(&id)
            && ib.finish()
        {
            self.remove_inbox(id);
        }
    }

    /// Reset connection `id` from this side (no-op if it is over): its queued data, then the
    /// reset, go out ahead of anything charged against what it freed. The caller notifies the
    /// writer.
    fn reset(&mut self, id: ConnId) {
        let mut out = std::mem::take(&mut self.scratch);
        self.mux.close(id, &mut out);
        self.close_inbox(id);
        self.sched.drain_into_control(id, &mut self.pool);
        self.queue_control(&mut out);
        self.scratch = out;
    }

    /// Half-close connection `id` from this side, or reset it if it cannot be half-closed.
    /// True if it was half-closed. The caller notifies the writer.
    fn finish(&mut self, id: ConnId) -> bool {
        let mut out = std::mem::take(&mut self.scratch);
        let finished = self.mux.finish(id, &mut out);
        if finished {
            // Its data, then the FIN.
            self.sched.drain_into_control(id, &mut self.pool);
            self.queue_control(&mut out);
        }
        self.scratch = out;
        if !finished {
            self.reset(id);
        }
        finished
    }

    /// Carry out the events of a call made outside the reader (detach, hold time): ended
    /// connections read EOF, suspended ones lose what they had queued.
    fn apply_local_events(&mut self, out: &mut Output) {
        for ev in out.events.drain(..) {
            match ev {
                Event::Closed { id, cause } => {
                    debug!(conn = %id, ?cause, "connection ended");
                    self.lost(id, cause);
                    self.close_inbox(id);
                    self.sched.discard(id, &mut self.pool);
                }
                Event::Suspended { id } => self.sched.discard(id, &mut self.pool),
                Event::Resumed { id } => self.sched.wake(id),
                _ => {}
            }
        }
    }

    /// A connection that ends for `cause` ended with the tunnel if it could not be resumed.
    fn lost(&mut self, id: ConnId, cause: crate::mux::CloseCause) {
        if cause == crate::mux::CloseCause::NotResumed
            && let Some(ib) = self.conns.get_mut(&id)
        {
            ib.mark_lost();
        }
    }

    fn remove_inbox(&mut self, id: ConnId) {
        if let Some(ib) = self.conns.remove(&id) {
            self.pool.put(ib.into_buf());
        }
    }
}

/// The WebSocket a session runs on now: which one (counted from 1), and why it went down.
#[derive(Clone, Debug)]
struct LinkState {
    number: u64,
    down: Option<SessionEnd>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the writer: something was queued.
    work: Notify,
    /// Ends the whole session.
    cancel: CancellationToken,
    /// Ends the current WebSocket's tasks (a child of `cancel`).
    link_cancel: Mutex<CancellationToken>,
    link: watch::Sender<LinkState>,
    /// Wakes the hold timer: a connection was suspended.
    suspended: Notify,
    /// Flow control is on for new connections (as the reader last saw it).
    flow_on: watch::Sender<bool>,
    /// New streams for the application (taken at the end of the session).
    incoming: Mutex<Option<mpsc::Sender<Connection>>>,
    cfg: SessionConfig,
    service_ids: watch::Sender<Option<Vec<String>>>,
    end: watch::Sender<Option<SessionEnd>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; the state is still consistent enough to
        // tear down, so recover the guard rather than cascade panics through every connection.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until the control queue has room (a peer that provokes replies faster than the
    /// relay takes them is slowed down, not buffered without bound).
    async fn control_space(&self) {
        std::future::poll_fn(|cx| {
            if self.cancel.is_cancelled() || self.lock().sched.control_room(cx.waker()) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// A cloneable handle to a running session.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
}

/// What the application receives from a session: streams the peer opened (destination).
pub struct Incoming {
    pub streams: mpsc::Receiver<Connection>,
}

/// Start a session over an established WebSocket.
pub fn spawn<S>(ws: WebSocketStream<S>, mux: Mux, cfg: SessionConfig) -> (SessionHandle, Incoming)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (itx, irx) = mpsc::channel(INCOMING_QUEUE);
    let mux = match cfg.flow_control {
        Some(fc) => mux.with_flow_control(fc),
        None => mux,
    };
    let mux = if cfg.resume_hold.is_some() {
        mux.with_resume()
    } else {
        mux
    };
    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            mux,
            conns: Default::default(),
            sched: Sched::default(),
            pool: Pool::default(),
            ctl: BytesMut::new(),
            scratch: Output::default(),
        }),
        work: Notify::new(),
        link_cancel: Mutex::new(cancel.child_token()),
        cancel,
        link: watch::channel(LinkState {
            number: 0,
            down: None,
        })
        .0,
        suspended: Notify::new(),
        flow_on: watch::channel(false).0,
        incoming: Mutex::new(Some(itx)),
        cfg: cfg.clone(),
        service_ids: watch::channel(None).0,
        end: watch::channel(None).0,
    });
    let handle = SessionHandle {
        shared: shared.clone(),
    };
    if let Some(hold) = cfg.resume_hold {
        tokio::spawn(hold_timer(shared.clone(), hold));
    }
    start_link(&shared, ws);
    (handle, Incoming { streams: irx })
}

/// Run the session's two tasks on `ws`, as its next link.
fn start_link<S>(shared: &Arc<Shared>, ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let token = shared.cancel.child_token();
    *shared.link_cancel.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
    let mut number = 0;
    shared.link.send_modify(|l| {
        l.number += 1;
        l.down = None;
        number = l.number;
    });
    let link = Link {
        token,
        number,
        down: Default::default(),
    };
    let incoming = shared
        .incoming
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    tokio::spawn(writer::run(
        sink,
        shared.clone(),
        shared.cfg.clone(),
        link.clone(),
    ));
    tokio::spawn(reader::run(
        stream,
        shared.clone(),
        incoming,
        shared.cfg.clone(),
        link,
    ));
}

/// One WebSocket of a session, as its tasks know it.
#[derive(Clone)]
struct Link {
    /// Cancelled when this WebSocket is done with.
    token: CancellationToken,
    number: u64,
    /// Set by the first of its tasks to see it go down.
    down: Arc<std::sync::atomic::AtomicBool>,
}

/// The WebSocket of `link` is gone (the first reason wins). If the session can hold its
/// connections for a resume, they are suspended and the application is told to reconnect;
/// otherwise the session ends.
fn link_down(shared: &Shared, link: &Link, why: SessionEnd) {
    link.token.cancel();
    if link.down.swap(true, std::sync::atomic::Ordering::AcqRel) || shared.cancel.is_cancelled() {
        return;
    }
    let held = shared.cfg.resume_hold.is_some() && why.is_resumable() && {
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let mut out = Output::default();
        inner.mux.tick(std::time::Instant::now());
        let held = inner.mux.detach(&mut out);
        inner.sched.discard_all(&mut inner.pool);
        inner.apply_local_events(&mut out);
        held
    };
    // Renegotiated on the next WebSocket.
    shared.flow_on.send_replace(false);
    if held {
        debug!(reason = %why, "tunnel WebSocket lost; holding connections for a resume");
        // Told only now, so that whoever waits for it sees the session held (not ended).
        shared.link.send_if_modified(|l| {
            let news = l.number == link.number && l.down.is_none();
            if news {
                l.down = Some(why.clone());
            }
            news
        });
        shared.suspended.notify_one();
        shared.work.notify_one();
    } else {
        finish(shared, why);
    }
}

/// Ends suspended connections whose hold time ran out; ends the session once the WebSocket is
/// down and nothing is left to resume.
async fn hold_timer(shared: Arc<Shared>, hold: Duration) {
    loop {
        let (next, nothing_held) = {
            let mut inner = shared.lock();
            let inner = &mut *inner;
            let mut out = Output::default();
            inner.mux.tick(std::time::Instant::now());
            let next = inner.mux.expire_suspended(hold, &mut out);
            if !out.events.is_empty() {
                tracing::warn!(
                    hold = ?hold,
                    ended = out.events.len(),
                    "connections not resumed within the hold time: ended"
                );
            }
            inner.apply_local_events(&mut out);
            (next, inner.mux.suspended_connections() == 0)
        };
        let down = shared.link.borrow().down.clone();
        if let (Some(why), true) = (down, nothing_held) {
            finish(&shared, why);
            return;
        }
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = shared.suspended.notified() => {}
            _ = sleep => {}
        }
    }
}

impl SessionHandle {
    /// Source: open a connection to `service`. Queues the start; does not wait for the peer.
    pub async fn open(&self, service: &str) -> Result<Connection, SessionError> {
        let mut out = Output::default();
        let (id, credited) = {
            let mut inner = self.shared.lock();
            let inner = &mut *inner;
            if self.shared.cancel.is_cancelled() {
                return Err(SessionError::Ended);
            }
            let id = inner.mux.open(service, &mut out)?;
            let credited = inner.mux.is_flow_controlled(id);
            inner.conns.insert(id, Inbox::new(credited));
            for ev in out.events.drain(..) {
                if let Event::Closed { id, .. } = ev {
                    // V1/V2: the stream it replaces delivers its last bytes first.
                    inner.close_inbox(id);
                    inner.sched.drain_into_control(id, &mut inner.pool);
                }
            }
            inner.queue_control(&mut out);
            (id, credited)
        };
        self.shared.work.notify_one();
        Ok(Connection::new(
            id,
            service.to_owned(),
            &self.shared,
            credited,
        ))
    }

    /// The tunnel's services, once the relay has sent them.
    pub fn service_ids(&self) -> Option<Vec<String>> {
        self.shared.service_ids.borrow().clone()
    }

    /// Wait for the relay's SERVICE_IDS (or the end of the session).
    pub async fn wait_service_ids(&self) -> Result<Vec<String>, SessionError> {
        let mut rx = self.shared.service_ids.subscribe();
        let ids = match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => return Err(SessionError::Ended),
        };
        // `finish` wakes waiters with an empty list; a real tunnel always has services.
        if ids.is_empty() && self.ended().is_some() {
            return Err(SessionError::Ended);
        }
        Ok(ids)
    }

    /// Number of open tunnel connections.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().mux.open_connections()
    }

    /// Whether connections opened now use culvert's flow control.
    pub fn flow_control_active(&self) -> bool {
        self.shared.lock().mux.flow_control_active()
    }

    /// Wait (at most `limit`) until connections opened now use flow control, and so can be
    /// half-closed and resumed: one round trip to the other end after the session starts.
    /// False if it did not come on (an AWS peer, or none connected yet).
    pub async fn wait_flow_control(&self, limit: Duration) -> bool {
        let mut rx = self.shared.flow_on.subscribe();
        let on = tokio::time::timeout(limit, rx.wait_for(|on| *on)).await;
        matches!(on, Ok(Ok(_)))
    }

    /// End the session: the WebSocket is closed and every connection ends.
    pub fn close(&self) {
        finish(&self.shared, SessionEnd::Cancelled);
    }

    /// Wait until the session's WebSocket is gone: why. The session may still hold
    /// connections for a resume ([`SessionHandle::reattach`]); [`SessionHandle::ended`] says
    /// whether it has ended instead.
    pub async fn link_down(&self) -> SessionEnd {
        let mut rx = self.shared.link.subscribe();
        match rx.wait_for(|l| l.down.is_some()).await {
            Ok(l) => l.down.clone().unwrap_or(SessionEnd::Cancelled),
            Err(_) => SessionEnd::Cancelled,
        }
    }

    /// Carry on the session on a new WebSocket (to the same tunnel, with the same tokens),
    /// after [`SessionHandle::link_down`]: the connections it holds resume. Fails, using
    /// nothing, when the session has ended (or its WebSocket is still up).
    pub fn reattach<S>(&self, ws: WebSocketStream<S>) -> Result<(), SessionError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if self.ended().is_some() || self.shared.link.borrow().down.is_none() {
            return Err(SessionError::Ended);
        }
        start_link(&self.shared, ws);
        Ok(())
    }

    /// Whether this session can go on over a new WebSocket whose relay accepted `accepted`
    /// (its own is down, it still holds connections, and the relay resumes them).
    pub fn can_resume_with(&self, accepted: crate::ext::Extensions) -> bool {
        accepted.resume
            && self.shared.cfg.resume_hold.is_some()
            && self.ended().is_none()
            && self.shared.link.borrow().down.is_some()
    }

    /// Connections waiting to be resumed.
    pub fn suspended_connections(&self) -> usize {
        self.shared.lock().mux.suspended_connections()
    }

    /// Why the session ended, if it has.
    pub fn ended(&self) -> Option<SessionEnd> {
        self.shared.end.borrow().clone()
    }

    /// Wait until the session ends.
    pub async fn closed(&self) -> SessionEnd {
        let mut rx = self.shared.end.subscribe();
        match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone().unwrap_or(SessionEnd::Cancelled),
            Err(_) => SessionEnd::Cancelled,
        }
    }
}

/// Record the end (first reason wins), cancel both tasks, and end every connection.
fn finish(shared: &Shared, why: SessionEnd) {
    shared.end.send_if_modified(|e| {
        if e.is_none() {
            debug!(reason = %why, "tunnel session ended");
            *e = Some(why);
            true
        } else {
            false
        }
    });
    shared.cancel.cancel();
    shared.link.send_if_modified(|l| {
        if l.down.is_none() {
            l.down = shared.end.borrow().clone();
            true
        } else {
            false
        }
    });
    shared
        .incoming
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    {
        let mut inner = shared.lock();
        let ids: Vec<ConnId> = inner.conns.keys().copied().collect();
        let lost = !matches!(shared.end.borrow().as_ref(), Some(SessionEnd::Cancelled));
        for id in ids {
            if lost && let Some(ib) = inner.conns.get_mut(&id) {
                ib.mark_lost();
            }
            inner.close_inbox(id);
        }
        inner.sched.wake_all();
    }
    shared.work.notify_one();
    // Wake anyone waiting for service ids.
    shared.service_ids.send_if_modified(|v| {
        if v.is_none() {
            *v = Some(Vec::new());
            true
        } else {
            false
        }
    });
}

/// The runtime for a program at one end of a tunnel (`culvert connect`, culvertd): one worker
/// thread unless `TOKIO_WORKER_THREADS` says otherwise. Measured on loopback (docs/performance.md),
/// one worker per process cut the 64-byte round trip through the whole path from about 275 to
/// 171 µs and the CPU per GB by a sixth: every hand-over between a connection's task and the
/// session's tasks on another thread costs a cross-thread wake-up. The relay, which serves many
/// tunnels, keeps one worker per core.
pub fn end_runtime() -> io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        b.worker_threads(1);
    }
    b.enable_all().build()
}

#[cfg(test)]
mod tests {
    //! A source session and a destination session joined by an in-memory WebSocket (what a
    //! verbatim relay amounts to): the tokio shell, `Connection` and `splice`, without sockets.
    use super::*;
    use crate::Format;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// How often a waker was woken (for the parts' unit tests).
    #[derive(Clone, Default)]
    pub(super) struct Woken(Arc<AtomicUsize>);

    impl Woken {
        pub(super) fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(super) fn counting_waker() -> (Waker, Woken) {
        let woken = Woken::default();
        (Waker::from(Arc::new(woken.clone())), woken)
    }

    async fn pair() -> (SessionHandle, Incoming) {
        pair_in(Format::V3).await
    }

    async fn pair_in(format: Format) -> (SessionHandle, Incoming) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let ws_src = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let ws_dst = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let ids = vec!["ECHO".to_owned()];
        let mut out = Output::default();
        let mut src = Mux::source(format);
        src.handle(crate::Message::service_ids(&ids), &mut out)
            .unwrap();
        let (src, _) = spawn(ws_src, src, SessionConfig::default());
        let (_dst, incoming) = spawn(
            ws_dst,
            Mux::destination(Some(ids)),
            SessionConfig::default(),
        );
        (src, incoming)
    }

    /// The destination side: every incoming stream is spliced to an in-memory echo.
    fn echo_all(mut incoming: Incoming) {
        tokio::spawn(async move {
            while let Some(stream) = incoming.streams.recv().await {
                tokio::spawn(async move {
                    let (near, mut far) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match far.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if far.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    });
                    splice(near, stream).await;
                });
            }
        });
    }

    #[tokio::test]
    async fn many_connections_echo_through_a_session_pair() {
        let (src, incoming) = pair().await;
        echo_all(incoming);
        let mut tasks = Vec::new();
        for i in 0..40usize {
            let src = src.clone();
            tasks.push(tokio::spawn(async move {
                let stream = src.open("ECHO").await.unwrap();
                let (mut r, mut w) = stream.into_split();
                // Larger than one frame, so DATA is split and reassembled.
                let data: Vec<u8> = (0..100_000 + i).map(|k| (k * 7 + i) as u8).collect();
                let expect = data.clone();
                let writer = tokio::spawn(async move {
                    w.write_all(&data).await.unwrap();
                    w
                });
                let mut got = vec![0u8; expect.len()];
                r.read_exact(&mut got).await.unwrap();
                assert!(got == expect, "connection {i} echoed different bytes");
                drop(writer.await.unwrap());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(src.ended().is_none());
    }

    #[tokio::test]
    async fn v2_a_connection_closed_then_replaced_delivers_all_its_bytes_first() {
        // V2 carries one connection per service: the next connection's STREAM_START replaces
        // the stream, and DATA of the old one arriving after it would be dropped as stale.
        let (src, mut incoming) = pair_in(Format::V2).await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13) as u8).collect();
        let mut first = src.open("ECHO").await.unwrap();
        first.write_all(&data).await.unwrap();
        drop(first);
        let _second = src.open("ECHO").await.unwrap();
        let mut far = incoming.streams.recv().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got.len(),
            data.len(),
            "bytes of the replaced stream were lost"
        );
        assert!(got == data);
    }

    #[tokio::test]
    async fn a_reset_reaches_the_other_side_as_eof() {
        let (src, mut incoming) = pair().await;
        let mut stream = src.open("ECHO").await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut far = incoming.streams.recv().await.unwrap();
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        drop(stream); // local close: a CONNECTION_RESET goes out
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        // Writing to a connection the peer reset fails instead of vanishing.
        let mut failed = false;
        for _ in 0..100 {
            if far.write_all(b"late").await.is_err() {
                failed = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(failed, "writes after the peer's reset must fail");
    }

    #[tokio::test]
    async fn closing_the_session_ends_every_connection() {
        let (src, mut incoming) = pair().await;
        let stream = src.open("ECHO").await.unwrap();
        let mut far = incoming.streams.recv().await.unwrap();
        src.close();
        let mut buf = Vec::new();
        far.read_to_end(&mut buf).await.unwrap();
        drop(stream);
        assert!(matches!(src.closed().await, SessionEnd::Cancelled));
    }
}
