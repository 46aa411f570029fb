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

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use crate::flow::FlowConfig;
use crate::frame::{self, FrameError, FrameReader, MessageBatch};
use crate::message::MAX_PAYLOAD;
use crate::mux::{ConnId, Event, Mux, MuxError, Output};

/// DATA frames queued per connection towards the writer (each at most ~64 KiB): enough to keep
/// the writer busy, little enough that a turn of the round robin is short.
const CONN_SEND_FRAMES: usize = 2;
/// Control messages queued towards the writer before the reader waits for them to drain.
const CONTROL_QUEUE: usize = 256;
/// Bytes waiting for one local connection without flow control before the session reader
/// waits for it (and with it the whole tunnel: the AWS protocol has no flow control).
const INBOX_LIMIT: usize = 256 * 1024;
/// Bytes of buffers a session keeps for reuse, and the largest buffer it keeps (a connection's
/// inbox grows to what it buffers, at most its window with flow control).
const POOL_BYTES: usize = 2 * 1024 * 1024;
const POOL_BUFFER_MAX: usize = 1024 * 1024;
/// Space reserved at a time for encoding control frames.
const CONTROL_BUFFER: usize = 8 * 1024;
/// New streams waiting for the application to take them (destination).
const INCOMING_QUEUE: usize = 128;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// WebSocket ping period (the localproxy uses 20 s).
    pub ping_interval: Duration,
    /// End the session when nothing at all arrives for this long (pings are answered, so a live
    /// relay is never idle this long).
    pub idle_timeout: Duration,
    /// Offer culvert's flow-control extension (used only when the relay and the peer offer it).
    pub flow_control: Option<FlowConfig>,
}

impl SessionConfig {
    /// Keep only the extensions the relay accepted in the handshake
    /// ([`crate::client::Connected::extensions`]): against AWS's relay, none.
    pub fn for_relay(mut self, accepted: crate::ext::Extensions) -> SessionConfig {
        if !accepted.flow_control {
            self.flow_control = None;
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

/// Buffers of a session kept for reuse: a connection's inbox and send queue take one when they
/// start holding bytes and give it back once drained, so data flows without allocating and an
/// idle connection holds none. The writer empties the pool every ping interval in which it
/// was not used, so an idle session holds none either.
#[derive(Default)]
struct Pool {
    bufs: Vec<Vec<u8>>,
    /// Capacity of the buffers in `bufs`.
    bytes: usize,
    used: bool,
}

impl Pool {
    fn take(&mut self) -> Vec<u8> {
        self.used = true;
        let b = self.bufs.pop().unwrap_or_default();
        self.bytes -= b.capacity();
        b
    }

    fn put(&mut self, mut b: Vec<u8>) {
        let cap = b.capacity();
        if cap > 0 && cap <= POOL_BUFFER_MAX && self.bytes + cap <= POOL_BYTES {
            b.clear();
            self.bytes += cap;
            self.bufs.push(b);
        }
    }

    /// Free the pooled buffers if none was taken since the last call.
    fn trim_if_idle(&mut self) {
        if !std::mem::take(&mut self.used) {
            self.bufs = Vec::new();
            self.bytes = 0;
        }
    }
}

/// Bytes received for one connection, on their way to its [`ConnectionReader`].
///
/// The session reader copies each DATA payload in, so the WebSocket layer gets its read buffer
/// back at once (it never has to allocate another), and a stalled connection holds its own
/// bytes rather than whole WebSocket messages. The reader swaps the buffer for its own drained
/// one: bytes cross the lock in batches and neither side allocates while data flows.
struct Inbox {
    buf: Vec<u8>,
    /// Flow-controlled: bounded by the credit granted, never waited on. Otherwise the session
    /// reader waits while [`INBOX_LIMIT`] bytes are waiting.
    credited: bool,
    /// No more bytes will come (peer reset, local close, session end): EOF once drained.
    closed: bool,
    /// The connection's reader was dropped: what arrives is discarded (and credited).
    reader_gone: bool,
    reader: Option<Waker>,
    /// The session reader, waiting for room.
    space: Option<Waker>,
}

impl Inbox {
    fn new(credited: bool) -> Inbox {
        Inbox {
            buf: Vec::new(),
            credited,
            closed: false,
            reader_gone: false,
            reader: None,
            space: None,
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.space.take() {
            w.wake();
        }
    }
}

/// One connection's outgoing DATA frames, encoded back to back.
#[derive(Default)]
struct SendQueue {
    frames: Vec<u8>,
    /// Bytes of `frames` already sent.
    sent: usize,
    /// End offset of each queued frame.
    ends: VecDeque<usize>,
    /// The connection's writer, waiting for queue space or credit.
    waker: Option<Waker>,
}

impl SendQueue {
    /// The queued frames as separate buffers (a connection that is closing: they go out as
    /// control messages, ahead of what follows).
    fn take_frames(&mut self, pool: &mut Pool) -> impl Iterator<Item = Bytes> + use<> {
        let mut start = self.sent;
        let frames: Vec<Bytes> = self
            .ends
            .drain(..)
            .map(|end| {
                let f = Bytes::copy_from_slice(&self.frames[start..end]);
                start = end;
                f
            })
            .collect();
        self.sent = 0;
        pool.put(std::mem::take(&mut self.frames));
        frames.into_iter()
    }
}

/// What the writer sends next: control first, then connections in turn.
#[derive(Default)]
struct Sched {
    control: VecDeque<Bytes>,
    queues: HashMap<ConnId, SendQueue>,
    /// Connections with queued frames, in round-robin order.
    ready: VecDeque<ConnId>,
    /// The reader waits for the control queue to drain.
    control_space: Option<Waker>,
}

impl Sched {
    fn push_control(&mut self, f: Bytes) {
        self.control.push_back(f);
    }

    /// Append the next frame to `batch` if it fits there, waking whoever waits for the space it
    /// frees; false if none did.
    fn pop_into(&mut self, batch: &mut MessageBatch, pool: &mut Pool) -> bool {
        if let Some(f) = self.control.front() {
            if !batch.fits(f.len()) {
                return false;
            }
            batch.push_frame(f);
            self.control.pop_front();
            if self.control.len() < CONTROL_QUEUE / 2
                && let Some(w) = self.control_space.take()
            {
                w.wake();
            }
            return true;
        }
        while let Some(&id) = self.ready.front() {
            let Some(q) = self.queues.get_mut(&id) else {
                self.ready.pop_front();
                continue;
            };
            let Some(&end) = q.ends.front() else {
                self.ready.pop_front();
                continue;
            };
            if !batch.fits(end - q.sent) {
                return false;
            }
            self.ready.pop_front();
            batch.push_frame(&q.frames[q.sent..end]);
            q.sent = end;
            q.ends.pop_front();
            if q.ends.is_empty() {
                q.sent = 0;
                pool.put(std::mem::take(&mut q.frames));
            } else {
                self.ready.push_back(id);
            }
            if let Some(w) = q.waker.take() {
                w.wake();
            }
            return true;
        }
        false
    }

    /// Move a connection's queued frames to the end of the control queue, ahead of any DATA
    /// queued from now on: what follows them (its reset, or in V1/V2 the start of the stream
    /// that replaces it) then reaches the peer after them, and before other connections' bytes
    /// charged against the budget its close freed.
    fn drain_into_control(&mut self, id: ConnId, pool: &mut Pool) {
        if let Some(mut q) = self.queues.remove(&id) {
            self.control.extend(q.take_frames(pool));
            if let Some(w) = q.waker.take() {
                w.wake();
            }
        }
    }

    fn wake(&mut self, id: ConnId) {
        if let Some(w) = self.queues.get_mut(&id).and_then(|q| q.waker.take()) {
            w.wake();
        }
    }

    fn wake_all(&mut self) {
        for q in self.queues.values_mut() {
            if let Some(w) = q.waker.take() {
                w.wake();
            }
        }
        if let Some(w) = self.control_space.take() {
            w.wake();
        }
    }
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
        self.mux.consumed(id, n, &mut out);
        self.queue_control(&mut out);
        self.scratch = out;
    }

    /// No more bytes will come for connection `id`: its reader gets EOF once it has read
    /// what is buffered.
    fn close_inbox(&mut self, id: ConnId) {
        if let Some(ib) = self.conns.get_mut(&id) {
            ib.closed = true;
            ib.wake();
            if ib.reader_gone {
                self.remove_inbox(id);
            }
        }
    }

    fn remove_inbox(&mut self, id: ConnId) {
        if let Some(ib) = self.conns.remove(&id) {
            self.pool.put(ib.buf);
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the writer: something was queued.
    work: Notify,
    cancel: CancellationToken,
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
            let mut inner = self.lock();
            if inner.sched.control.len() < CONTROL_QUEUE || self.cancel.is_cancelled() {
                Poll::Ready(())
            } else {
                inner.sched.control_space = Some(cx.waker().clone());
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
    let (sink, stream) = ws.split();
    let (itx, irx) = mpsc::channel(INCOMING_QUEUE);
    let mux = match cfg.flow_control {
        Some(fc) => mux.with_flow_control(fc),
        None => mux,
    };
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
        cancel: CancellationToken::new(),
        service_ids: watch::channel(None).0,
        end: watch::channel(None).0,
    });
    let handle = SessionHandle {
        shared: shared.clone(),
    };
    tokio::spawn(writer_task(sink, shared.clone(), cfg.clone()));
    tokio::spawn(reader_task(stream, shared, itx, cfg));
    (handle, Incoming { streams: irx })
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

    /// End the session: the WebSocket is closed and every connection ends.
    pub fn close(&self) {
        finish(&self.shared, SessionEnd::Cancelled);
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
    {
        let mut inner = shared.lock();
        let ids: Vec<ConnId> = inner.conns.keys().copied().collect();
        for id in ids {
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

async fn reader_task<S>(
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    shared: Arc<Shared>,
    incoming: mpsc::Sender<Connection>,
    cfg: SessionConfig,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut frames = FrameReader::new();
    let mut bodies: Vec<Bytes> = Vec::new();
    // Reused for every message: the hot path allocates nothing per frame.
    let mut out = Output::default();
    let why = loop {
        let next = tokio::select! {
            _ = shared.cancel.cancelled() => break SessionEnd::Cancelled,
            r = tokio::time::timeout(cfg.idle_timeout, stream.next()) => r,
        };
        let ws_msg = match next {
            Err(_) => break SessionEnd::Idle(cfg.idle_timeout),
            Ok(None) => {
                break SessionEnd::PeerClosed {
                    code: None,
                    reason: None,
                };
            }
            Ok(Some(Err(e))) => break SessionEnd::Transport(e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        let data = match ws_msg {
            WsMessage::Binary(b) => b,
            WsMessage::Text(_) => {
                break SessionEnd::Protocol(PeerError::TextFrame);
            }
            WsMessage::Close(f) => {
                break SessionEnd::PeerClosed {
                    code: f.as_ref().map(|f| u16::from(f.code)),
                    reason: f.map(|f| f.reason.to_string()).filter(|r| !r.is_empty()),
                };
            }
            _ => continue, // ping / pong: tungstenite answers pings itself
        };
        bodies.clear();
        let fed = frames.feed::<FrameError>(data, |body| {
            bodies.push(body);
            Ok(())
        });
        if let Err(e) = fed {
            break SessionEnd::Protocol(e.into());
        }
        let mut failed = None;
        for body in bodies.drain(..) {
            // Room for the replies first; then handle the message and queue its replies under
            // one lock, so that no start queued by another task can slip between a state
            // change (say, flow control switched on) and the message announcing it.
            tokio::select! {
                _ = shared.control_space() => {}
                _ = shared.cancel.cancelled() => {
                    failed = Some(SessionEnd::Cancelled);
                    break;
                }
            }
            {
                let mut inner = shared.lock();
                let handled = match frame::decode_ref(&body) {
                    Ok(Some(m)) => {
                        trace!(
                            r#type = m.r#type,
                            stream = m.stream_id,
                            conn = m.connection_id,
                            len = m.payload.len(),
                            "received"
                        );
                        inner.mux.handle_ref(m, &mut out).map_err(PeerError::from)
                    }
                    Ok(None) => match frame::decode(body) {
                        Ok(m) => {
                            trace!(msg = %m, "received");
                            inner.mux.handle(m, &mut out).map_err(PeerError::from)
                        }
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = handled {
                    failed = Some(SessionEnd::Protocol(e));
                    break;
                }
                inner.queue_control(&mut out);
            }
            shared.work.notify_one();
            // Delivery waits on slow local readers (without flow control); a close must still
            // get through.
            let delivered = tokio::select! {
                r = deliver(&shared, &mut out.events, &incoming) => r.is_ok(),
                _ = shared.cancel.cancelled() => false,
            };
            if !delivered {
                failed = Some(SessionEnd::Cancelled);
                break;
            }
        }
        if let Some(why) = failed {
            break why;
        }
    };
    finish(&shared, why);
}

/// Carry out what one message produced. Fails only when the session is going away.
async fn deliver(
    shared: &Arc<Shared>,
    events: &mut Vec<Event>,
    incoming: &mpsc::Sender<Connection>,
) -> Result<(), SessionError> {
    // (Replies were queued with the message's handling.)
    for ev in events.drain(..) {
        match ev {
            Event::ServiceIds(ids) => {
                shared.service_ids.send_replace(Some(ids));
            }
            Event::Opened { id, service } => {
                let credited = {
                    let mut inner = shared.lock();
                    let credited = inner.mux.is_flow_controlled(id);
                    inner.conns.insert(id, Inbox::new(credited));
                    credited
                };
                let s = Connection::new(id, service, shared, credited);
                if incoming.send(s).await.is_err() {
                    // Nobody takes streams: the Connection's drop already reset it.
                    warn!("stream opened by the peer but this end accepts none");
                }
            }
            Event::Data { id, payload } => {
                // Without flow control this waits while the local side is slow (the AWS
                // protocol has none); with it, the credit granted bounds the inbox.
                std::future::poll_fn(|cx| {
                    let mut inner = shared.lock();
                    let inner = &mut *inner;
                    let Some(ib) = inner.conns.get_mut(&id) else {
                        return Poll::Ready(());
                    };
                    if ib.closed {
                        return Poll::Ready(());
                    }
                    if ib.reader_gone {
                        // Nobody will read it: discard, but give the credit back.
                        inner.consumed(id, payload.len());
                        shared.work.notify_one();
                        return Poll::Ready(());
                    }
                    if !ib.credited && ib.buf.len() >= INBOX_LIMIT {
                        ib.space = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    if ib.buf.capacity() == 0 {
                        ib.buf = inner.pool.take();
                    }
                    ib.buf.extend_from_slice(&payload);
                    if let Some(w) = ib.reader.take() {
                        w.wake();
                    }
                    Poll::Ready(())
                })
                .await;
            }
            Event::Closed { id, cause } => {
                debug!(conn = %id, ?cause, "closed by peer");
                let mut inner = shared.lock();
                let inner = &mut *inner;
                inner.close_inbox(id);
                // What it still had queued would be stale on arrival; its writer fails now.
                if let Some(mut q) = inner.sched.queues.remove(&id) {
                    inner.pool.put(std::mem::take(&mut q.frames));
                    if let Some(w) = q.waker.take() {
                        w.wake();
                    }
                }
            }
            Event::Credit { id, budget } => {
                let mut inner = shared.lock();
                if budget {
                    inner.sched.wake_all();
                } else {
                    inner.sched.wake(id);
                }
            }
            Event::FlowControl(true) => {
                info!("flow control on for new connections (the relay and the peer support it)");
            }
            Event::FlowControl(false) => {
                info!("flow control off for new connections (peer changed; renegotiating)");
            }
        }
    }
    Ok(())
}

async fn writer_task<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    shared: Arc<Shared>,
    cfg: SessionConfig,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut ping = tokio::time::interval(cfg.ping_interval);
    let mut batch = MessageBatch::default();
    let err = loop {
        if shared.cancel.is_cancelled() {
            let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
            return;
        }
        // Fill one WebSocket message: control first, then one frame per connection in turn,
        // ending the message after a start frame (see `frame::is_start_frame`).
        // The previous message's bytes were copied out by the WebSocket layer and dropped, so
        // this reuses the same space.
        batch.begin();
        {
            let mut inner = shared.lock();
            let inner = &mut *inner;
            while !batch.is_ended() && inner.sched.pop_into(&mut batch, &mut inner.pool) {}
        }
        if !batch.is_empty() {
            if let Err(e) = sink.send(WsMessage::Binary(batch.take())).await {
                break e;
            }
            continue;
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => {}
            _ = shared.work.notified() => {}
            _ = ping.tick() => {
                shared.lock().pool.trim_if_idle();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                if let Err(e) = sink.send(WsMessage::Ping(Bytes::from(now.to_be_bytes().to_vec()))).await {
                    break e;
                }
            }
        }
    };
    finish(&shared, SessionEnd::Transport(err.to_string()));
}

/// One tunnel connection. Reading yields the peer's bytes in order and EOF when the peer resets
/// the connection or the session ends. Writing sends DATA; shutting down (or dropping) sends the
/// reset that closes the connection on the other end: the AWS protocol has no half-close.
#[derive(Debug)]
pub struct Connection {
    reader: ConnectionReader,
    writer: ConnectionWriter,
}

/// The receiving half of a [`Connection`]; also an `AsyncBufRead` that hands out the peer's
/// bytes from its buffer without another copy.
pub struct ConnectionReader {
    id: ConnId,
    shared: Arc<Shared>,
    /// Bytes taken from the inbox; `pending[pos..]` are unread.
    pending: Vec<u8>,
    pos: usize,
    /// Flow-controlled: consumed bytes return credit to the peer.
    credited: bool,
    eof: bool,
}

/// The sending half of a [`Connection`]. Dropping it resets the connection.
pub struct ConnectionWriter {
    id: ConnId,
    service: String,
    shared: Arc<Shared>,
    closed_local: bool,
}

impl std::fmt::Debug for ConnectionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionReader")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ConnectionWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionWriter")
            .field("id", &self.id)
            .field("service", &self.service)
            .finish()
    }
}

impl Connection {
    fn new(id: ConnId, service: String, shared: &Arc<Shared>, credited: bool) -> Self {
        Connection {
            reader: ConnectionReader {
                id,
                shared: shared.clone(),
                pending: Vec::new(),
                pos: 0,
                credited,
                eof: false,
            },
            writer: ConnectionWriter {
                id,
                service,
                shared: shared.clone(),
                closed_local: false,
            },
        }
    }

    pub fn id(&self) -> ConnId {
        self.writer.id
    }

    pub fn service(&self) -> &str {
        &self.writer.service
    }

    /// Whether this connection uses culvert's flow control.
    pub fn is_flow_controlled(&self) -> bool {
        self.reader.credited
    }

    pub fn into_split(self) -> (ConnectionReader, ConnectionWriter) {
        (self.reader, self.writer)
    }

    /// Refuse or end this connection (e.g. the LAN target refused): sends the reset now.
    pub async fn reset(mut self) {
        self.writer.close_local();
    }
}

impl ConnectionReader {
    /// Make sure unread bytes are in `pending`, unless there are none yet (`Pending`) or
    /// none will come (`Ready` with nothing pending: EOF).
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pos < self.pending.len() || self.eof {
            return Poll::Ready(());
        }
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(ib) = inner.conns.get_mut(&self.id) else {
            self.eof = true;
            return Poll::Ready(());
        };
        self.pending.clear();
        self.pos = 0;
        if !ib.buf.is_empty() {
            // Take what arrived; the inbox gets our drained buffer to fill next.
            std::mem::swap(&mut self.pending, &mut ib.buf);
            if let Some(w) = ib.space.take() {
                w.wake();
            }
            return Poll::Ready(());
        }
        // Caught up: both buffers go back to the session (an idle connection holds none).
        inner.pool.put(std::mem::take(&mut self.pending));
        inner.pool.put(std::mem::take(&mut ib.buf));
        if ib.closed {
            inner.remove_inbox(self.id);
            self.eof = true;
            return Poll::Ready(());
        }
        ib.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The application took `n` bytes.
    fn consume_pending(&mut self, n: usize) {
        self.pos += n;
        if self.credited && n > 0 {
            let mut inner = self.shared.lock();
            inner.consumed(self.id, n);
            let queued = !inner.sched.control.is_empty();
            drop(inner);
            if queued {
                self.shared.work.notify_one();
            }
        }
    }
}

impl Drop for ConnectionReader {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let unread = self.pending.len() - self.pos;
        if let Some(ib) = inner.conns.get_mut(&self.id) {
            let unread = unread + ib.buf.len();
            if ib.closed {
                inner.remove_inbox(self.id);
            } else {
                ib.reader_gone = true;
                let buf = std::mem::take(&mut ib.buf);
                inner.pool.put(buf);
            }
            if self.credited && unread > 0 {
                // Bytes nobody will read: their credit goes back to the peer.
                inner.consumed(self.id, unread);
                drop(inner);
                self.shared.work.notify_one();
            }
        }
    }
}

impl ConnectionWriter {
    /// Close the connection from this side: the reset goes out after what is queued.
    fn close_local(&mut self) {
        if self.closed_local {
            return;
        }
        self.closed_local = true;
        let mut out = Output::default();
        {
            let mut inner = self.shared.lock();
            let inner = &mut *inner;
            inner.mux.close(self.id, &mut out);
            inner.close_inbox(self.id);
            // Its data, then its reset, ahead of anything charged against what it freed.
            inner.sched.drain_into_control(self.id, &mut inner.pool);
            inner.queue_control(&mut out);
        }
        self.shared.work.notify_one();
    }
}

impl AsyncRead for ConnectionReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx));
        let this = &mut *self;
        let n = (this.pending.len() - this.pos).min(buf.remaining());
        buf.put_slice(&this.pending[this.pos..this.pos + n]);
        this.consume_pending(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncBufRead for ConnectionReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx));
        Poll::Ready(Ok(&this.pending[this.pos..]))
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        let n = amt.min(self.pending.len() - self.pos);
        self.consume_pending(n);
    }
}

impl AsyncWrite for ConnectionWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed_local || self.shared.cancel.is_cancelled() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let id = self.id;
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let credit = match inner.mux.send_credit(id) {
            Ok(c) => c,
            Err(_) => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
        };
        let n = buf.len().min(MAX_PAYLOAD).min(credit.unwrap_or(usize::MAX));
        if n == 0 {
            // Out of credit: say so, so that credit for another connection wakes this writer
            // when the tunnel budget is what holds it.
            inner.mux.wait_for_credit(id);
        }
        let q = inner.sched.queues.entry(id).or_default();
        if q.ends.len() >= CONN_SEND_FRAMES || n == 0 {
            // Wait for the writer to take a frame, or for credit.
            q.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if q.frames.capacity() == 0 {
            q.frames = inner.pool.take();
        }
        // One copy: the payload goes straight into its frame, behind the queued ones.
        if inner.mux.encode_data(id, &buf[..n], &mut q.frames).is_err() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        q.ends.push_back(q.frames.len());
        if q.ends.len() == 1 {
            inner.sched.ready.push_back(id);
        }
        self.shared.work.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_local();
        Poll::Ready(Ok(()))
    }
}

impl Drop for ConnectionWriter {
    fn drop(&mut self) {
        // Queues the reset behind this connection's data; never blocks.
        self.close_local();
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
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

/// A read buffer that starts at 4 KiB and grows (up to `max`) while reads fill it: an idle
/// connection holds 4 KiB, a busy one up to a full DATA payload.
pub struct GrowBuf {
    buf: Vec<u8>,
    max: usize,
}

impl GrowBuf {
    const START: usize = 4096;

    pub fn new(max: usize) -> GrowBuf {
        GrowBuf {
            buf: vec![0; Self::START.min(max.max(1))],
            max: max.max(1),
        }
    }

    /// Where the next read goes.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The `n` bytes just read; a read that filled the buffer makes the next one larger.
    pub fn filled(&mut self, n: usize) -> &[u8] {
        let full = n == self.buf.len() && self.buf.len() < self.max;
        if full {
            let grown = (self.buf.len() * 4).min(self.max);
            self.buf.resize(grown, 0);
        }
        &self.buf[..n]
    }
}

/// Bytes carried by [`splice`], and who ended it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Local → tunnel.
    pub sent: u64,
    /// Tunnel → local.
    pub received: u64,
    /// The peer (or the session) ended the connection, rather than the local side.
    pub peer_closed: bool,
}

/// Counts bytes written through it.
struct Counting<'a, W> {
    inner: W,
    n: &'a std::sync::atomic::AtomicU64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        if let Ok(n) = &r {
            self.n
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Poll::Ready(r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Carry bytes both ways between a local socket and a tunnel connection until one side ends.
///
/// - Local EOF or error: the tunnel connection is reset (no half-close in the protocol); what
///   the peer had already sent is still written out locally.
/// - Peer reset or session end: everything received is written, then the local socket is shut
///   down.
pub async fn splice<L>(local: L, tunnel: Connection) -> Spliced
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, copy_buf};
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut lr, lw) = tokio::io::split(local);
    let (mut tr, tw) = tunnel.into_split();
    let mut tw = Counting {
        inner: tw,
        n: &sent,
    };
    let mut lw = Counting {
        inner: lw,
        n: &received,
    };
    let up = async {
        let mut buf = GrowBuf::new(MAX_PAYLOAD);
        loop {
            let n = match lr.read(buf.space()).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if tw.write_all(buf.filled(n)).await.is_err() {
                break;
            }
        }
        let _ = tw.shutdown().await;
    };
    let down = async {
        let _ = copy_buf(&mut tr, &mut lw).await;
        let _ = lw.shutdown().await;
    };
    tokio::pin!(up, down);
    let peer_closed = tokio::select! {
        _ = &mut down => true,
        _ = &mut up => {
            // The reset is queued; the peer's earlier bytes drain, then the connection reads EOF.
            down.await;
            false
        }
    };
    Spliced {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        peer_closed,
    }
}

#[cfg(test)]
mod tests {
    //! A source session and a destination session joined by an in-memory WebSocket (what a
    //! verbatim relay amounts to): the tokio shell, `Connection` and `splice`, without sockets.
    use super::*;
    use crate::Format;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

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
