//! Sequences of multiplexer operations on a source and a destination joined by a relay made of
//! the relay's own forwarding code (`protocol::forward`, its frame rules and its HELLOs), in the
//! V1, V2 and V3 formats with flow control on or off at either end, with peers that reconnect
//! while frames are in flight, half-closes, and with arbitrary messages injected: never a panic; frames the
//! muxes make themselves pass the relay's rules; and an end that respects its credit is never
//! refused for it by the other end.
#![no_main]

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use culvert_protocol::ext::Extensions;
use culvert_protocol::flow::{FlowConfig, Hello, MIN_WINDOW};
use culvert_protocol::forward::Inbound;
use culvert_protocol::frame::{self, FrameError, FrameReader};
use culvert_protocol::message::MAX_PAYLOAD;
use culvert_protocol::mux::{ConnId, Event, Mux, Output, ProtocolError};
use culvert_protocol::rules::FrameRules;
use culvert_protocol::{Format, Message, Mode};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Open(u8),
    Write {
        on_dst: bool,
        conn: u8,
        len: u16,
    },
    Close {
        on_dst: bool,
        conn: u8,
    },
    /// Half-close (a reset where it cannot be half-closed).
    Finish {
        on_dst: bool,
        conn: u8,
    },
    Consume {
        conn: u8,
        n: u32,
    },
    /// The relay forwards what one end sent.
    Relay {
        from_dst: bool,
        count: u8,
    },
    /// An end handles what the relay delivered to it.
    Deliver {
        to_dst: bool,
        count: u8,
    },
    /// A message no compliant end would send, into the relay (the sender may be closed).
    Inject {
        from_dst: bool,
        msg: Raw,
    },
    /// A side's peer goes away and a new one (a fresh session) attaches.
    Reconnect {
        dst: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Raw {
    r#type: i32,
    stream_id: i32,
    ignorable: bool,
    payload: Vec<u8>,
    service: u8,
    connection_id: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    format: u8,
    services: u8,
    flow_src: bool,
    flow_dst: bool,
    ops: Vec<Op>,
}

const FLOW: FlowConfig = FlowConfig {
    window: MIN_WINDOW,
    budget: 4 * MIN_WINDOW as u64,
};

/// One end, and the relay's view of its peer.
struct End {
    mux: Mux,
    conns: Vec<ConnId>,
    /// Frames it sent, not yet through the relay: (frame, made by the mux).
    sent: VecDeque<(Bytes, bool)>,
    /// Frames the relay delivered to it: (frame, from a compliant end or the relay).
    inbox: VecDeque<(Bytes, bool)>,
    inbound: Inbound,
    awaiting: Option<u64>,
    extensions: Extensions,
    /// The relay closed this peer (it broke a rule with an injected message).
    closed: bool,
}

fn new_end(mode: Mode, format: Format, services: &[String], flow: bool, epoch: &mut u64) -> End {
    let mux = match mode {
        Mode::Source => Mux::source(format),
        Mode::Destination => Mux::destination(Some(services.to_vec())),
    };
    let mux = if flow {
        mux.with_flow_control(FLOW)
    } else {
        mux
    };
    let extensions = if flow {
        Extensions::ALL
    } else {
        Extensions::NONE
    };
    let mut inbox = VecDeque::new();
    if format != Format::V1 {
        inbox.push_back((
            frame::encode_to_bytes(&Message::service_ids(services)).unwrap(),
            true,
        ));
    }
    if flow {
        // Every relay HELLO is numbered (relay::live::LiveInner::next_hello).
        *epoch += 1;
        let hello = Hello::relay_epoch(*epoch).to_message();
        inbox.push_back((frame::encode_to_bytes(&hello).unwrap(), true));
    }
    End {
        mux,
        conns: Vec::new(),
        sent: VecDeque::new(),
        inbox,
        inbound: Inbound::new(mode, extensions),
        awaiting: None,
        extensions,
        closed: false,
    }
}

/// What a mux call produced: into its `sent` queue; connections it opened, remembered.
fn collect(end: &mut End, out: &mut Output) {
    for m in out.take_messages(&end.mux) {
        end.sent
            .push_back((frame::encode_to_bytes(&m).unwrap(), true));
    }
    for ev in out.events.drain(..) {
        match ev {
            Event::Opened { id, .. } => end.conns.push(id),
            Event::Closed { id, .. } => end.conns.retain(|c| *c != id),
            _ => {}
        }
    }
}

fn decode_all(bytes: Bytes) -> Vec<Bytes> {
    let mut reader = FrameReader::new();
    let mut out = Vec::new();
    reader
        .feed::<FrameError>(bytes, |b| {
            let mut f = BytesMut::new();
            f.extend_from_slice(&(b.len() as u16).to_be_bytes());
            f.extend_from_slice(&b);
            out.push(f.freeze());
            Ok(())
        })
        .unwrap();
    out
}

fuzz_target!(|input: Input| {
    let format = match input.format % 3 {
        0 => Format::V1,
        1 => Format::V2,
        _ => Format::V3,
    };
    let n = if format == Format::V1 {
        1
    } else {
        input.services % 3 + 1
    };
    let services: Vec<String> = (0..n).map(|i| format!("S{i}")).collect();
    let mut rules = FrameRules::new(services.clone());
    let mut epoch = 0;
    let mut src = new_end(Mode::Source, format, &services, input.flow_src, &mut epoch);
    let mut dst = new_end(
        Mode::Destination,
        format,
        &services,
        input.flow_dst,
        &mut epoch,
    );
    let mut out = Output::default();
    // An injected message an end accepted may have misled it (say, a forged credit): from then
    // on only "no panic" is checked.
    let mut tainted = false;
    for op in input.ops.into_iter().take(300) {
        out.clear();
        match op {
            Op::Open(s) => {
                let service = &services[s as usize % services.len()];
                if let Ok(id) = src.mux.open(service, &mut out) {
                    src.conns.push(id);
                }
                collect(&mut src, &mut out);
            }
            Op::Write { on_dst, conn, len } => {
                let end = if on_dst { &mut dst } else { &mut src };
                let Some(&id) = end.conns.get(conn as usize % end.conns.len().max(1)) else {
                    continue;
                };
                let Ok(credit) = end.mux.send_credit(id) else {
                    continue;
                };
                let len = (len as usize)
                    .min(MAX_PAYLOAD)
                    .min(credit.unwrap_or(usize::MAX));
                if len == 0 {
                    end.mux.wait_for_credit(id);
                    continue;
                }
                let mut f = BytesMut::new();
                end.mux
                    .encode_data(id, &vec![0x5a; len], &mut f)
                    .expect("within its credit");
                end.sent.push_back((f.freeze(), true));
            }
            Op::Close { on_dst, conn } => {
                let end = if on_dst { &mut dst } else { &mut src };
                if end.conns.is_empty() {
                    continue;
                }
                let id = end.conns.remove(conn as usize % end.conns.len());
                end.mux.close(id, &mut out);
                collect(end, &mut out);
            }
            Op::Finish { on_dst, conn } => {
                let end = if on_dst { &mut dst } else { &mut src };
                if end.conns.is_empty() {
                    continue;
                }
                let id = end.conns.remove(conn as usize % end.conns.len());
                if !end.mux.finish(id, &mut out) {
                    end.mux.close(id, &mut out);
                }
                collect(end, &mut out);
            }
            Op::Consume { conn, n } => {
                let Some(&id) = dst.conns.get(conn as usize % dst.conns.len().max(1)) else {
                    continue;
                };
                dst.mux.consumed(id, n as usize, &mut out);
                collect(&mut dst, &mut out);
            }
            Op::Relay { from_dst, count } => {
                let (from, to) = if from_dst {
                    (&mut dst, &mut src)
                } else {
                    (&mut src, &mut dst)
                };
                for _ in 0..count % 16 + 1 {
                    let Some((f, made)) = from.sent.pop_front() else {
                        break;
                    };
                    if from.closed {
                        continue;
                    }
                    let other = (!to.closed).then_some(to.extensions);
                    match from.inbound.feed(f, &mut rules, other, &mut from.awaiting) {
                        Ok(fwd) => {
                            for c in fwd.chunks() {
                                for frame in decode_all(c.bytes) {
                                    to.inbox.push_back((frame, made));
                                }
                            }
                            for r in fwd.replies {
                                from.inbox
                                    .push_back((frame::encode_to_bytes(r).unwrap(), true));
                            }
                        }
                        Err(e) => {
                            assert!(!made, "a frame the mux made broke the relay's rules: {e}");
                            from.closed = true;
                        }
                    }
                }
            }
            Op::Deliver { to_dst, count } => {
                let end = if to_dst { &mut dst } else { &mut src };
                for _ in 0..count % 16 + 1 {
                    let Some((f, compliant)) = end.inbox.pop_front() else {
                        break;
                    };
                    if end.closed {
                        continue;
                    }
                    out.clear();
                    let handled = match frame::decode(f.slice(2..)) {
                        Ok(m) => end.mux.handle(m, &mut out),
                        Err(_) => continue,
                    };
                    match handled {
                        Ok(()) => {
                            tainted |= !compliant;
                            collect(end, &mut out);
                        }
                        Err(e) => {
                            assert!(
                                !(compliant
                                    && !tainted
                                    && matches!(
                                        e,
                                        ProtocolError::CreditExceeded { .. }
                                            | ProtocolError::BudgetExceeded(..)
                                    )),
                                "an end that kept to its credit was refused for it: {e}"
                            );
                            end.closed = true; // its session ends
                        }
                    }
                }
            }
            Op::Inject { from_dst, msg } => {
                let m = Message {
                    r#type: msg.r#type,
                    stream_id: msg.stream_id,
                    ignorable: msg.ignorable,
                    payload: Bytes::from(msg.payload),
                    service_id: services
                        .get(msg.service as usize)
                        .cloned()
                        .unwrap_or_default(),
                    connection_id: msg.connection_id,
                    ..Default::default()
                };
                if let Ok(f) = frame::encode_to_bytes(&m) {
                    let end = if from_dst { &mut dst } else { &mut src };
                    end.sent.push_back((f, false));
                }
            }
            Op::Reconnect { dst: on_dst } => {
                // What the relay does when a side's peer is replaced (relay::live, dataplane):
                // the surviving side hears of the streams that died and, if it negotiated flow
                // control, gets a numbered HELLO it must answer before its starts count.
                let flow = if on_dst {
                    input.flow_dst
                } else {
                    input.flow_src
                };
                let mode = if on_dst {
                    Mode::Destination
                } else {
                    Mode::Source
                };
                let (new, survivor) = if on_dst {
                    (&mut dst, &mut src)
                } else {
                    (&mut src, &mut dst)
                };
                *new = new_end(mode, format, &services, flow, &mut epoch);
                for r in rules.peer_gone() {
                    survivor
                        .inbox
                        .push_back((frame::encode_to_bytes(&r).unwrap(), true));
                }
                if survivor.extensions.flow_control && !survivor.closed {
                    epoch += 1;
                    survivor.awaiting = Some(epoch);
                    let hello = Hello::relay_epoch(epoch).to_message();
                    survivor
                        .inbox
                        .push_back((frame::encode_to_bytes(&hello).unwrap(), true));
                }
            }
        }
    }
});
