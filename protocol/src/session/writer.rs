//! The session writer: owns the WebSocket sink, fills each message from the scheduler
//! ([`super::sched`]), and pings.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{Link, SessionConfig, SessionEnd, Shared, link_down};
use crate::frame::MessageBatch;

pub(super) async fn run<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    shared: Arc<Shared>,
    cfg: SessionConfig,
    link: Link,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut ping = tokio::time::interval(cfg.ping_interval);
    let mut batch = MessageBatch::default();
    let err = loop {
        if link.token.is_cancelled() {
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
            _ = link.token.cancelled() => {}
            _ = shared.work.notified() => {}
            _ = ping.tick() => {
                {
                    let mut inner = shared.lock();
                    inner.pool.trim_if_idle();
                    inner.mux.trim_buffers();
                }
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
    link_down(&shared, &link, SessionEnd::Transport(err.to_string()));
}
