//! The forwarding hot path allocates nothing per DATA frame once it is warm: bytes written to a
//! tunnel connection reach the other end's reader through two sessions and a forwarding relay
//! (both ends WebSocket clients, as in production) without a heap allocation per frame.
//!
//! A counting global allocator (this test binary only) counts allocations while a measured
//! amount of data moves; the figure is allocations per DATA frame, which counts and not time,
//! so it does not depend on the machine's load.

use culvert_protocol::Format;
use culvert_protocol::flow::Hello;
use culvert_protocol::frame;
use culvert_protocol::message::{MAX_PAYLOAD, Message};
use culvert_protocol::mux::{Mux, Output};
use culvert_protocol::session::{self, SessionConfig, SessionHandle};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::Role;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn allocs() -> u64 {
    dhat::HeapStats::get().total_blocks
}

/// Forwards WebSocket messages between two peers verbatim, after announcing culvert's
/// extensions to both (what culvert-relay does, minus checking).
fn relay(
    a: WebSocketStream<tokio::io::DuplexStream>,
    b: WebSocketStream<tokio::io::DuplexStream>,
    flow_control: bool,
) {
    let (mut a_tx, mut a_rx) = a.split();
    let (mut b_tx, mut b_rx) = b.split();
    tokio::spawn(async move {
        if flow_control {
            let mut hello = bytes::BytesMut::new();
            frame::encode(&Hello::relay().to_message(), &mut hello).unwrap();
            let hello = hello.freeze();
            a_tx.send(WsMessage::Binary(hello.clone())).await.unwrap();
            b_tx.send(WsMessage::Binary(hello)).await.unwrap();
        }
        let ab = async move {
            while let Some(Ok(m)) = a_rx.next().await {
                if b_tx.send(m).await.is_err() {
                    break;
                }
            }
        };
        let ba = async move {
            while let Some(Ok(m)) = b_rx.next().await {
                if a_tx.send(m).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(ab, ba);
    });
}

async fn tunnel(flow_control: bool) -> (SessionHandle, session::Incoming, SessionHandle) {
    let (src_io, relay_a) = tokio::io::duplex(256 * 1024);
    let (dst_io, relay_b) = tokio::io::duplex(256 * 1024);
    let (ws_src, ws_a, ws_dst, ws_b) = tokio::join!(
        WebSocketStream::from_raw_socket(src_io, Role::Client, None),
        WebSocketStream::from_raw_socket(relay_a, Role::Server, None),
        WebSocketStream::from_raw_socket(dst_io, Role::Client, None),
        WebSocketStream::from_raw_socket(relay_b, Role::Server, None),
    );
    relay(ws_a, ws_b, flow_control);
    let ids = vec!["BULK".to_owned()];
    let mut src = Mux::source(Format::V3);
    src.handle(Message::service_ids(&ids), &mut Output::default())
        .unwrap();
    let cfg = SessionConfig {
        flow_control: flow_control.then(Default::default),
        ..Default::default()
    };
    let (src, _) = session::spawn(ws_src, src, cfg.clone());
    let (dst, incoming) = session::spawn(ws_dst, Mux::destination(Some(ids)), cfg);
    if flow_control {
        // Both ends have negotiated once the source confirms; wait for it.
        while !src.flow_control_active() {
            tokio::task::yield_now().await;
        }
    }
    (src, incoming, dst)
}

/// Allocations per DATA frame while `total` bytes cross the tunnel in `write`-sized writes,
/// measured after a warm-up of the same size.
async fn allocs_per_frame(flow_control: bool, write: usize, total: usize) -> f64 {
    let (src, mut incoming, _dst) = tunnel(flow_control).await;
    let conn = src.open("BULK").await.unwrap();
    assert_eq!(conn.is_flow_controlled(), flow_control);
    let mut far = incoming.streams.recv().await.unwrap();
    let (_r, mut w) = conn.into_split();
    // Warm-up, then the measured run, told apart by the reader.
    let writes = total / write;
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a_u8; write];
        for _ in 0..2 * writes {
            w.write_all(&chunk).await.unwrap();
        }
        w
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    let mut start = None;
    while got < 2 * writes * write {
        let n = far.read(&mut buf).await.unwrap();
        assert!(n > 0, "tunnel connection ended after {got} bytes");
        assert!(buf[..n].iter().all(|&b| b == 0x5a), "bytes changed");
        got += n;
        if start.is_none() && got >= writes * write {
            start = Some((allocs(), got));
        }
    }
    let (a0, g0) = start.unwrap();
    let measured = allocs() - a0;
    let frames = (got - g0).div_ceil(write.min(MAX_PAYLOAD));
    drop(writer.await.unwrap());
    let per_frame = measured as f64 / frames as f64;
    println!(
        "flow control {flow_control}, {write}-byte writes: {measured} allocations over {frames} \
         frames = {per_frame:.3} per frame"
    );
    per_frame
}

fn rt() -> tokio::runtime::Runtime {
    // One thread, as culvertd and `culvert connect` run.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Amortised allocations per frame allowed: growing a buffer or a queue block now and then is
/// fine, one per frame (or per message) is not.
const LIMIT: f64 = 0.05;

/// One test: dhat's profiler runs once per process.
#[test]
fn forwarding_does_not_allocate_per_frame() {
    let _profiler = if std::env::var_os("NO_DHAT").is_some() {
        None
    } else if std::env::var_os("DHAT_JSON").is_some() {
        Some(dhat::Profiler::builder().build())
    } else {
        Some(dhat::Profiler::builder().testing().build())
    };
    let rt = rt();
    let mut failed = Vec::new();
    for (write, total) in [(MAX_PAYLOAD, 64 << 20), (200, 4 << 20)] {
        for fc in [true, false] {
            let per_frame = rt.block_on(allocs_per_frame(fc, write, total));
            if per_frame > LIMIT {
                failed.push(format!(
                    "flow control {fc}, {write}-byte writes: {per_frame:.3} allocations per \
                     DATA frame"
                ));
            }
        }
    }
    assert!(failed.is_empty(), "over {LIMIT} per frame: {failed:#?}");
}
