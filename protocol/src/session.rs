//! The tokio shell around [`Mux`]: runs one tunnel session over one WebSocket and exposes each
//! tunnel connection as a [`TunnelStream`] (`AsyncRead + AsyncWrite`).
//!
//! Two tasks per session, so that reading never waits on writing (a relay forwarding both ways
//! would otherwise deadlock the two ends under bidirectional load):
//! - the **reader** decodes frames, feeds the mux under a short lock (never held across an
//!   `.await`), and delivers data into each connection's bounded queue, waiting when a queue is
//!   full: without flow control in the AWS protocol, a slow local reader holds back the whole
//!   session rather than losing bytes or buffering without bound;
//! - the **writer** owns the WebSocket sink, coalesces queued frames into WebSocket messages of
//!   at most [`MAX_WS_MESSAGE`] bytes, and pings every [`SessionConfig::ping_interval`].
//!
//! The session ends when the peer closes, on a transport or protocol error, when nothing is heard
//! for [`SessionConfig::idle_timeout`], or when [`SessionHandle::close`] is called. Then every
//! connection reads EOF and fails writes with `BrokenPipe`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::{CancellationToken, PollSender};
use tracing::{debug, trace, warn};

use crate::frame::{self, FrameError, FrameReader};
use crate::message::{MAX_PAYLOAD, MAX_WS_MESSAGE, Message};
use crate::mux::{ConnId, Event, Mux, MuxError, Output};

/// Frames queued towards the WebSocket writer (each at most ~64 KiB).
const WRITE_QUEUE_FRAMES: usize = 32;
/// Payload chunks queued towards one local connection.
const CONN_QUEUE_CHUNKS: usize = 16;
/// New streams waiting for the application to take them (destination).
const INCOMING_QUEUE: usize = 128;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// WebSocket ping period (the localproxy uses 20 s).
    pub ping_interval: Duration,
    /// End the session when nothing at all arrives for this long (pings are answered, so a live
    /// relay is never idle this long).
    pub idle_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(65),
        }
    }
}

/// Why a session ended.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("the relay closed the session{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    PeerClosed(Option<String>),
    #[error("protocol error from the peer: {0}")]
    Protocol(String),
    #[error("connection to the relay failed: {0}")]
    Transport(String),
    #[error("nothing heard from the relay for {0:?}")]
    Idle(Duration),
    #[error("session closed locally")]
    Cancelled,
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
    conns: std::collections::HashMap<ConnId, mpsc::Sender<Bytes>>,
}

struct Shared {
    inner: Mutex<Inner>,
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
}

/// A cloneable handle to a running session.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Bytes>,
}

/// What the application receives from a session: streams the peer opened (destination).
pub struct Incoming {
    pub streams: mpsc::Receiver<TunnelStream>,
}

/// Start a session over an established WebSocket.
pub fn spawn<S>(ws: WebSocketStream<S>, mux: Mux, cfg: SessionConfig) -> (SessionHandle, Incoming)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let (wtx, wrx) = mpsc::channel::<Bytes>(WRITE_QUEUE_FRAMES);
    let (itx, irx) = mpsc::channel(INCOMING_QUEUE);
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            mux,
            conns: Default::default(),
        }),
        cancel: CancellationToken::new(),
        service_ids: watch::channel(None).0,
        end: watch::channel(None).0,
    });
    let handle = SessionHandle {
        shared: shared.clone(),
        writer: wtx.clone(),
    };
    tokio::spawn(writer_task(sink, wrx, shared.clone(), cfg.clone()));
    tokio::spawn(reader_task(stream, shared, wtx, itx, cfg));
    (handle, Incoming { streams: irx })
}

impl SessionHandle {
    /// Source: open a connection to `service`. Waits for queue space, not for the peer.
    pub async fn open(&self, service: &str) -> Result<TunnelStream, SessionError> {
        let (tx, rx) = mpsc::channel(CONN_QUEUE_CHUNKS);
        let mut out = Output::default();
        let id = {
            let mut inner = self.shared.lock();
            if self.shared.cancel.is_cancelled() {
                return Err(SessionError::Ended);
            }
            let id = inner.mux.open(service, &mut out)?;
            inner.conns.insert(id, tx);
            for ev in out.events.drain(..) {
                if let Event::Closed { id, .. } = ev {
                    inner.conns.remove(&id);
                }
            }
            id
        };
        send_all(&self.writer, &out.transmit).await?;
        Ok(TunnelStream::new(id, service.to_owned(), self, rx))
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

async fn send_all(writer: &mpsc::Sender<Bytes>, msgs: &[Message]) -> Result<(), SessionError> {
    for m in msgs {
        let f = frame::encode_to_bytes(m).map_err(|_| SessionError::Ended)?;
        writer.send(f).await.map_err(|_| SessionError::Ended)?;
    }
    Ok(())
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
    shared.lock().conns.clear();
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
    writer: mpsc::Sender<Bytes>,
    incoming: mpsc::Sender<TunnelStream>,
    cfg: SessionConfig,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handle = SessionHandle {
        shared: shared.clone(),
        writer,
    };
    let mut frames = FrameReader::new();
    let mut msgs = Vec::new();
    let why = loop {
        let next = tokio::select! {
            _ = shared.cancel.cancelled() => break SessionEnd::Cancelled,
            r = tokio::time::timeout(cfg.idle_timeout, stream.next()) => r,
        };
        let ws_msg = match next {
            Err(_) => break SessionEnd::Idle(cfg.idle_timeout),
            Ok(None) => break SessionEnd::PeerClosed(None),
            Ok(Some(Err(e))) => break SessionEnd::Transport(e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        let data = match ws_msg {
            WsMessage::Binary(b) => b,
            WsMessage::Text(_) => {
                break SessionEnd::Protocol("text WebSocket frame (only binary is allowed)".into());
            }
            WsMessage::Close(f) => {
                break SessionEnd::PeerClosed(
                    f.map(|f| f.reason.to_string()).filter(|r| !r.is_empty()),
                );
            }
            _ => continue, // ping / pong: tungstenite answers pings itself
        };
        msgs.clear();
        let fed = frames.feed::<FrameError>(data, |body| {
            msgs.push(frame::decode(body)?);
            Ok(())
        });
        if let Err(e) = fed {
            break SessionEnd::Protocol(e.to_string());
        }
        let mut failed = None;
        for m in msgs.drain(..) {
            trace!(msg = %m, "received");
            let mut out = Output::default();
            if let Err(e) = shared.lock().mux.handle(m, &mut out) {
                failed = Some(SessionEnd::Protocol(e.to_string()));
                break;
            }
            // Delivery waits on slow local readers; a close must still get through.
            let delivered = tokio::select! {
                r = deliver(&handle, out, &incoming) => r.is_ok(),
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
    handle: &SessionHandle,
    out: Output,
    incoming: &mpsc::Sender<TunnelStream>,
) -> Result<(), SessionError> {
    send_all(&handle.writer, &out.transmit).await?;
    for ev in out.events {
        match ev {
            Event::ServiceIds(ids) => {
                handle.shared.service_ids.send_replace(Some(ids));
            }
            Event::Opened { id, service } => {
                let (tx, rx) = mpsc::channel(CONN_QUEUE_CHUNKS);
                handle.shared.lock().conns.insert(id, tx);
                let s = TunnelStream::new(id, service, handle, rx);
                if incoming.send(s).await.is_err() {
                    // Nobody takes streams: the TunnelStream's drop already reset it.
                    warn!("stream opened by the peer but this end accepts none");
                }
            }
            Event::Data { id, payload } => {
                let tx = handle.shared.lock().conns.get(&id).cloned();
                if let Some(tx) = tx {
                    // Waits while the local side is slow (no flow control in the protocol).
                    let _ = tx.send(payload).await;
                }
            }
            Event::Closed { id, cause } => {
                debug!(conn = %id, ?cause, "closed by peer");
                handle.shared.lock().conns.remove(&id);
            }
        }
    }
    Ok(())
}

async fn writer_task<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    mut rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    cfg: SessionConfig,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut ping = tokio::time::interval(cfg.ping_interval);
    let mut batch = BytesMut::new();
    let err = loop {
        let first = tokio::select! {
            _ = shared.cancel.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
                return;
            }
            _ = ping.tick() => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                if let Err(e) = sink.send(WsMessage::Ping(Bytes::from(now.to_be_bytes().to_vec()))).await {
                    break e;
                }
                continue;
            }
            f = rx.recv() => match f {
                Some(f) => f,
                None => return,
            },
        };
        // Coalesce what is already queued into one WebSocket message, ending the message after
        // a start frame (see `frame::is_start_frame`).
        let msg = if frame::is_start_frame(&first) {
            first
        } else {
            match rx.try_recv() {
                Err(_) => first,
                Ok(second) => {
                    batch.clear();
                    batch.extend_from_slice(&first);
                    let mut next = Some(second);
                    while let Some(f) = next.take() {
                        if batch.len() + f.len() > MAX_WS_MESSAGE {
                            let full = batch.split().freeze();
                            if let Err(e) = sink.feed(WsMessage::Binary(full)).await {
                                finish(&shared, SessionEnd::Transport(e.to_string()));
                                return;
                            }
                        }
                        batch.extend_from_slice(&f);
                        if frame::is_start_frame(&f) {
                            break;
                        }
                        next = rx.try_recv().ok();
                    }
                    batch.split().freeze()
                }
            }
        };
        if let Err(e) = sink.send(WsMessage::Binary(msg)).await {
            break e;
        }
    };
    finish(&shared, SessionEnd::Transport(err.to_string()));
}

/// One tunnel connection. Reading yields the peer's bytes in order and EOF when the peer resets
/// the connection or the session ends. Writing sends DATA; shutting down (or dropping) sends the
/// reset that closes the connection on the other end: the AWS protocol has no half-close.
#[derive(Debug)]
pub struct TunnelStream {
    reader: TunnelReader,
    writer: TunnelWriter,
}

/// The receiving half of a [`TunnelStream`]; also an `AsyncBufRead` that hands out the peer's
/// chunks without copying.
pub struct TunnelReader {
    rx: mpsc::Receiver<Bytes>,
    pending: Bytes,
}

/// The sending half of a [`TunnelStream`]. Dropping it resets the connection.
pub struct TunnelWriter {
    id: ConnId,
    service: String,
    shared: Arc<Shared>,
    writer: PollSender<Bytes>,
    closed_local: bool,
}

impl std::fmt::Debug for TunnelReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelReader").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TunnelWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelWriter")
            .field("id", &self.id)
            .field("service", &self.service)
            .finish()
    }
}

impl TunnelStream {
    fn new(id: ConnId, service: String, h: &SessionHandle, rx: mpsc::Receiver<Bytes>) -> Self {
        TunnelStream {
            reader: TunnelReader {
                rx,
                pending: Bytes::new(),
            },
            writer: TunnelWriter {
                id,
                service,
                shared: h.shared.clone(),
                writer: PollSender::new(h.writer.clone()),
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

    pub fn into_split(self) -> (TunnelReader, TunnelWriter) {
        (self.reader, self.writer)
    }

    /// Refuse or end this connection (e.g. the LAN target refused): sends the reset now.
    pub async fn reset(mut self) {
        let msgs = self.writer.take_close();
        if let Some(tx) = self.writer.writer.get_ref().cloned() {
            let _ = send_all(&tx, &msgs).await;
        }
    }
}

impl TunnelWriter {
    fn take_close(&mut self) -> Vec<Message> {
        if self.closed_local {
            return Vec::new();
        }
        self.closed_local = true;
        let mut out = Output::default();
        let mut inner = self.shared.lock();
        inner.mux.close(self.id, &mut out);
        inner.conns.remove(&self.id);
        out.transmit
    }
}

impl AsyncRead for TunnelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(b) => self.pending = b,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncBufRead for TunnelReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pending.is_empty()
            && let Some(b) = ready!(this.rx.poll_recv(cx))
        {
            this.pending = b;
        }
        Poll::Ready(Ok(&this.pending))
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        let n = amt.min(self.pending.len());
        let _ = self.pending.split_to(n);
    }
}

impl AsyncWrite for TunnelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed_local {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if ready!(self.writer.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(MAX_PAYLOAD);
        // One copy: the payload goes straight into its frame.
        let mut f = BytesMut::with_capacity(n + 32);
        let encoded = self
            .shared
            .lock()
            .mux
            .encode_data(self.id, &buf[..n], &mut f);
        if encoded.is_err() {
            self.writer.abort_send();
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        self.writer
            .send_item(f.freeze())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed_local {
            return Poll::Ready(Ok(()));
        }
        if ready!(self.writer.poll_reserve(cx)).is_err() {
            self.closed_local = true;
            return Poll::Ready(Ok(()));
        }
        let msgs = self.take_close();
        match msgs.first().map(frame::encode_to_bytes) {
            Some(Ok(f)) => {
                let _ = self.writer.send_item(f);
            }
            _ => {
                self.writer.abort_send();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelWriter {
    fn drop(&mut self) {
        let msgs = self.take_close();
        if msgs.is_empty() {
            return;
        }
        let Some(tx) = self.writer.get_ref().cloned() else {
            return;
        };
        let mut frames = msgs.iter().filter_map(|m| frame::encode_to_bytes(m).ok());
        // Queue the reset behind this connection's data; never block in drop.
        while let Some(f) = frames.next() {
            if let Err(mpsc::error::TrySendError::Full(f)) = tx.try_send(f) {
                let later: Vec<Bytes> = std::iter::once(f).chain(frames).collect();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        for f in later {
                            let _ = tx.send(f).await;
                        }
                    });
                }
                return;
            }
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
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
pub async fn splice<L>(local: L, tunnel: TunnelStream) -> Spliced
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncWriteExt, BufReader, copy_buf};
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (lr, lw) = tokio::io::split(local);
    let (mut tr, tw) = tunnel.into_split();
    let mut lr = BufReader::with_capacity(MAX_PAYLOAD, lr);
    let mut tw = Counting {
        inner: tw,
        n: &sent,
    };
    let mut lw = Counting {
        inner: lw,
        n: &received,
    };
    let up = async {
        let _ = copy_buf(&mut lr, &mut tw).await;
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
            // The reset is queued; the peer's earlier bytes drain, then the channel ends.
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
    //! verbatim relay amounts to): the tokio shell, `TunnelStream` and `splice`, without sockets.
    use super::*;
    use crate::Format;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (SessionHandle, Incoming) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let ws_src = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let ws_dst = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let ids = vec!["ECHO".to_owned()];
        let mut out = Output::default();
        let mut src = Mux::source(Format::V3);
        src.handle(Message::service_ids(&ids), &mut out).unwrap();
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
