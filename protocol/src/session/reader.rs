//! The session reader: decodes frames, feeds the mux under a short lock (never held across an
//! `.await`), queues the replies, and delivers what the mux produced: data into each
//! connection's inbox, new connections to the application.

use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{debug, info, trace, warn};

use super::inbox::{Inbox, Push};
use super::{
    Connection, Link, PeerError, SessionConfig, SessionEnd, SessionError, Shared, link_down,
};
use crate::frame::{self, FrameError, FrameReader};
use crate::mux::{Event, Output};

pub(super) async fn run<S>(
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    shared: Arc<Shared>,
    incoming: Option<mpsc::Sender<Connection>>,
    cfg: SessionConfig,
    link: Link,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut frames = FrameReader::new();
    let mut bodies: Vec<Bytes> = Vec::new();
    // Reused for every message: the hot path allocates nothing per frame.
    let mut out = Output::default();
    let why = loop {
        let next = tokio::select! {
            _ = link.token.cancelled() => break SessionEnd::Cancelled,
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
        // One clock reading per WebSocket message: auto-tuned windows time the credit loop.
        let now = std::time::Instant::now();
        for body in bodies.drain(..) {
            // Room for the replies first; then handle the message and queue its replies under
            // one lock, so that no start queued by another task can slip between a state
            // change (say, flow control switched on) and the message announcing it.
            tokio::select! {
                _ = shared.control_space() => {}
                _ = link.token.cancelled() => {
                    failed = Some(SessionEnd::Cancelled);
                    break;
                }
            }
            {
                let mut inner = shared.lock();
                inner.mux.tick(now);
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
                _ = link.token.cancelled() => false,
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
    link_down(&shared, &link, why);
}

/// Carry out what one message produced. Fails only when the session is going away.
async fn deliver(
    shared: &Arc<Shared>,
    events: &mut Vec<Event>,
    incoming: &Option<mpsc::Sender<Connection>>,
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
                let Some(incoming) = incoming else {
                    drop(s);
                    continue;
                };
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
                    match ib.push(&payload, &mut inner.pool, cx.waker()) {
                        Push::Stored | Push::Closed => Poll::Ready(()),
                        Push::Full => Poll::Pending,
                        Push::Unread => {
                            // Nobody will read it: discarded, but the credit goes back.
                            inner.consumed(id, payload.len());
                            shared.work.notify_one();
                            Poll::Ready(())
                        }
                    }
                })
                .await;
            }
            Event::Closed { id, cause } => {
                debug!(conn = %id, ?cause, "closed by peer");
                let mut inner = shared.lock();
                let inner = &mut *inner;
                inner.lost(id, cause);
                inner.close_inbox(id);
                // What it still had queued would be stale on arrival; its writer fails now.
                inner.sched.discard(id, &mut inner.pool);
            }
            Event::Finished { id } => {
                debug!(conn = %id, "peer finished sending (half-close)");
                shared.lock().finish_inbox(id);
            }
            Event::Credit { id, budget } => {
                let mut inner = shared.lock();
                if budget {
                    inner.sched.wake_all();
                } else {
                    inner.sched.wake(id);
                }
            }
            Event::FlowControl(on) => {
                shared.flow_on.send_replace(on);
                if on {
                    info!(
                        "flow control on for new connections (the relay and the peer support it)"
                    );
                } else {
                    info!("flow control off for new connections (peer changed; renegotiating)");
                }
            }
            Event::Suspended { id } => {
                debug!(conn = %id, "suspended until the peer resumes it");
                {
                    let mut inner = shared.lock();
                    let inner = &mut *inner;
                    inner.sched.discard(id, &mut inner.pool);
                }
                shared.suspended.notify_one();
            }
            Event::Resumed { id } => {
                debug!(conn = %id, "resumed");
                shared.lock().sched.wake(id);
            }
        }
    }
    Ok(())
}
