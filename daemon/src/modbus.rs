//! Read-only Modbus/TCP (`[services.NAME.modbus]`): a filter between a tunnel connection and
//! a PLC that lets through only the requests that read, optionally only to some unit ids and
//! register ranges. Anything else is answered with a Modbus exception response, as the device
//! itself would answer a request it cannot serve, and audited; the connection stays up.
//!
//! The framing is the MBAP header: transaction id (2 bytes), protocol id (2, always 0), length
//! (2: the bytes that follow, unit id and PDU, at most 254), unit id (1); then the function
//! code and its data. Every length is checked before it is used. Bytes that are not Modbus/TCP
//! (another protocol id, a length out of range) end the connection: a byte stream cannot be
//! re-synchronised, and guessing would let a write through.
//!
//! Read-only means the function codes the industrial firewalls call read-only: 1 read coils,
//! 2 read discrete inputs, 3 read holding registers, 4 read input registers, 7 read exception
//! status, 11 get comm event counter, 12 get comm event log, 17 report server id, 20 read file
//! record, 24 read FIFO queue. Register ranges apply to the functions that name addresses
//! (1–4: start and quantity; 24: the FIFO's pointer address); the others name none.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::audit::{EndReason, Record};

/// The function codes that only read.
pub const READ_FUNCTIONS: [u8; 10] = [1, 2, 3, 4, 7, 11, 12, 17, 20, 24];

/// The MBAP header's size, unit id included.
pub const MBAP: usize = 7;
/// The largest Modbus/TCP ADU: the header and a 253-byte PDU.
pub const MAX_ADU: usize = 260;

/// Exception codes (Modbus application protocol v1.1b3, section 7).
pub const ILLEGAL_FUNCTION: u8 = 0x01;
pub const ILLEGAL_DATA_ADDRESS: u8 = 0x02;
pub const ILLEGAL_DATA_VALUE: u8 = 0x03;
pub const GATEWAY_PATH_UNAVAILABLE: u8 = 0x0A;

/// What a rule lets through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Unit ids requests may address (empty: any).
    pub units: Vec<u8>,
    /// Register (or coil) address ranges, inclusive, that reads may touch (empty: any).
    pub ranges: Vec<(u16, u16)>,
}

/// The bytes are not Modbus/TCP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("protocol id {0} in the MBAP header (Modbus/TCP is 0): not Modbus/TCP")]
    Protocol(u16),
    #[error("MBAP length {0} (unit id and PDU: 2 to 254 bytes): not Modbus/TCP")]
    Length(u16),
}

/// The length of the ADU at the start of `buf`: `None` while it is incomplete.
pub fn adu_len(buf: &[u8]) -> Result<Option<usize>, FramingError> {
    if buf.len() < MBAP {
        return Ok(None);
    }
    let protocol = u16::from_be_bytes([buf[2], buf[3]]);
    if protocol != 0 {
        return Err(FramingError::Protocol(protocol));
    }
    let length = u16::from_be_bytes([buf[4], buf[5]]);
    if !(2..=254).contains(&length) {
        return Err(FramingError::Length(length));
    }
    let total = 6 + length as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// A request the rule refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub unit: u8,
    pub function: u8,
    /// The first address the request names, where it names one.
    pub address: Option<u16>,
    /// The exception code it is answered with.
    pub code: u8,
    pub why: String,
}

/// The name of a function code, for logs and the audit trail.
pub fn function_name(fc: u8) -> &'static str {
    match fc {
        1 => "read coils",
        2 => "read discrete inputs",
        3 => "read holding registers",
        4 => "read input registers",
        5 => "write single coil",
        6 => "write single register",
        7 => "read exception status",
        8 => "diagnostics",
        11 => "get comm event counter",
        12 => "get comm event log",
        15 => "write multiple coils",
        16 => "write multiple registers",
        17 => "report server id",
        20 => "read file record",
        21 => "write file record",
        22 => "mask write register",
        23 => "read/write multiple registers",
        24 => "read FIFO queue",
        43 => "encapsulated interface transport",
        _ => "unknown function",
    }
}

impl Policy {
    /// Whether the request `adu` (one whole ADU, as [`adu_len`] cut it) may pass.
    pub fn check(&self, adu: &[u8]) -> Result<(), Refused> {
        let (unit, function) = (adu[6], adu[7]);
        let data = &adu[8..];
        let refuse = |address, code, why: String| {
            Err(Refused {
                unit,
                function,
                address,
                code,
                why,
            })
        };
        if !READ_FUNCTIONS.contains(&function) {
            return refuse(
                None,
                ILLEGAL_FUNCTION,
                format!(
                    "function {function} ({}) is not a read, and this rule is read-only",
                    function_name(function)
                ),
            );
        }
        if !self.units.is_empty() && !self.units.contains(&unit) {
            return refuse(
                None,
                GATEWAY_PATH_UNAVAILABLE,
                format!("unit {unit} is not one this rule lets requests reach"),
            );
        }
        let span = match function {
            1..=4 => match data {
                [a, b, c, d, ..] => {
                    let start = u16::from_be_bytes([*a, *b]);
                    let count = u16::from_be_bytes([*c, *d]);
                    if count == 0 {
                        return refuse(
                            Some(start),
                            ILLEGAL_DATA_VALUE,
                            "a read of 0 addresses".into(),
                        );
                    }
                    match start.checked_add(count - 1) {
                        Some(end) => Some((start, end)),
                        None => {
                            return refuse(
                                Some(start),
                                ILLEGAL_DATA_ADDRESS,
                                format!("{count} addresses from {start} run past 65535"),
                            );
                        }
                    }
                }
                _ => {
                    return refuse(
                        None,
                        ILLEGAL_DATA_VALUE,
                        "a read without its start address and quantity".into(),
                    );
                }
            },
            24 => match data {
                [a, b, ..] => {
                    let at = u16::from_be_bytes([*a, *b]);
                    Some((at, at))
                }
                _ => {
                    return refuse(
                        None,
                        ILLEGAL_DATA_VALUE,
                        "a FIFO read without its pointer address".into(),
                    );
                }
            },
            _ => None,
        };
        if let Some((start, end)) = span
            && !self.ranges.is_empty()
            && !self.ranges.iter().any(|&(lo, hi)| lo <= start && end <= hi)
        {
            return refuse(
                Some(start),
                ILLEGAL_DATA_ADDRESS,
                format!("addresses {start}-{end} are outside the ranges this rule allows"),
            );
        }
        Ok(())
    }
}

/// The exception response to the request `adu`: same transaction and unit, the function code
/// with its high bit set, and `code`.
pub fn exception(adu: &[u8], code: u8) -> [u8; 9] {
    [adu[0], adu[1], 0, 0, 0, 3, adu[6], adu[7] | 0x80, code]
}

/// Where refused requests are recorded: the connection's audit record, to copy, and the
/// trail it goes to.
pub struct Audited {
    pub record: Box<dyn Fn(Record) + Send + Sync>,
    pub conn: Record,
}

/// Put the filter between the tunnel connection and `target`: returns the end the tunnel's
/// bytes go to (hand it to [`crate::forward::pump`] as the local side). Requests are checked
/// one ADU at a time and passed on in order; a refused one is answered at once. Responses
/// from the device are passed back whole, so an exception never lands inside one. Holds at
/// most one ADU in each direction besides the pipe's own buffer.
pub fn filter<T>(target: T, policy: Arc<Policy>, audited: Audited) -> DuplexStream
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(16 * 1024);
    let (mut from_tunnel, to_tunnel) = tokio::io::split(ours);
    let (mut from_target, mut to_target) = tokio::io::split(target);
    let to_tunnel = Arc::new(Mutex::new(to_tunnel));
    let responses = {
        let to_tunnel = to_tunnel.clone();
        let service = audited.conn.service.clone();
        async move {
            let mut buf = Vec::with_capacity(MAX_ADU);
            loop {
                match read_adu(&mut from_target, &mut buf).await {
                    Ok(Some(n)) => {
                        let mut w = to_tunnel.lock().await;
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        buf.drain(..n);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(service = %service, "the Modbus device answered with bytes that are not Modbus/TCP ({e}); ending the connection");
                        break;
                    }
                }
            }
            let _ = to_tunnel.lock().await.shutdown().await;
        }
    };
    let requests = async move {
        let mut buf = Vec::with_capacity(MAX_ADU);
        loop {
            match read_adu(&mut from_tunnel, &mut buf).await {
                Ok(Some(n)) => {
                    let adu = &buf[..n];
                    match policy.check(adu) {
                        Ok(()) => {
                            if to_target.write_all(adu).await.is_err() {
                                break;
                            }
                        }
                        Err(r) => {
                            refused(&audited, &r);
                            let answer = exception(adu, r.code);
                            if to_tunnel.lock().await.write_all(&answer).await.is_err() {
                                break;
                            }
                        }
                    }
                    buf.drain(..n);
                }
                Ok(None) => break,
                Err(e) => {
                    let detail = format!("{e}; the connection was ended");
                    warn!(service = %audited.conn.service, conn = %audited.conn.conn, "{detail}");
                    (audited.record)(Record {
                        event: "request",
                        reason: Some(EndReason::Rejected),
                        detail: Some(detail),
                        ..audited.conn.clone()
                    });
                    // Both ways: nothing more goes to the device, and the operator's side ends.
                    let _ = to_tunnel.lock().await.shutdown().await;
                    break;
                }
            }
        }
        let _ = to_target.shutdown().await;
    };
    tokio::spawn(async move {
        tokio::join!(requests, responses);
    });
    theirs
}

/// Read until `buf` starts with a whole ADU: its length, or `None` at the end of the stream
/// (a partial ADU left then is dropped with the connection).
async fn read_adu<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, FramingError> {
    let mut chunk = [0u8; MAX_ADU];
    loop {
        if let Some(n) = adu_len(buf)? {
            return Ok(Some(n));
        }
        // Never more than one ADU's worth: what is not yet framed stays in the pipe.
        let want = MAX_ADU - buf.len();
        match r.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn refused(audited: &Audited, r: &Refused) {
    let name = function_name(r.function);
    info!(service = %audited.conn.service, conn = %audited.conn.conn, unit = r.unit, function = r.function, "Modbus request refused: {}", r.why);
    (audited.record)(Record {
        event: "request",
        reason: Some(EndReason::Refused),
        detail: Some(r.why.clone()),
        method: Some(format!("modbus {} ({name})", r.function)),
        unit: Some(r.unit),
        register: r.address,
        status: Some(r.code as u16),
        ..audited.conn.clone()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut v = tid.to_be_bytes().to_vec();
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
        v.push(unit);
        v.extend_from_slice(pdu);
        v
    }

    #[test]
    fn framing_checks_every_length_before_use() {
        let r = req(7, 1, &[3, 0, 0, 0, 10]);
        assert_eq!(adu_len(&r), Ok(Some(12)));
        for cut in 0..r.len() {
            assert_eq!(adu_len(&r[..cut]), Ok(None), "{cut}");
        }
        let mut two = r.clone();
        two.extend_from_slice(&r);
        assert_eq!(adu_len(&two), Ok(Some(12)));
        let mut bad = r.clone();
        bad[2] = 1;
        assert_eq!(adu_len(&bad), Err(FramingError::Protocol(256)));
        let mut long = r.clone();
        long[4..6].copy_from_slice(&255u16.to_be_bytes());
        assert_eq!(adu_len(&long), Err(FramingError::Length(255)));
        let mut short = r;
        short[4..6].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(adu_len(&short), Err(FramingError::Length(1)));
    }

    #[test]
    fn reads_pass_and_everything_else_gets_the_right_exception() {
        let open = Policy::default();
        for fc in READ_FUNCTIONS {
            assert_eq!(open.check(&req(1, 1, &[fc, 0, 0, 0, 1])), Ok(()), "{fc}");
        }
        for fc in [5u8, 6, 8, 15, 16, 21, 22, 23, 43, 90, 0x80] {
            let e = open.check(&req(1, 1, &[fc, 0, 0, 0, 1])).unwrap_err();
            assert_eq!(e.code, ILLEGAL_FUNCTION, "{fc}");
        }
        let scoped = Policy {
            units: vec![1, 2],
            ranges: vec![(0, 99), (400, 499)],
        };
        assert_eq!(scoped.check(&req(1, 2, &[3, 0, 0, 0, 100])), Ok(()));
        assert_eq!(scoped.check(&req(1, 2, &[4, 1, 144, 0, 100])), Ok(())); // 400-499
        let e = scoped.check(&req(1, 3, &[3, 0, 0, 0, 1])).unwrap_err();
        assert_eq!(e.code, GATEWAY_PATH_UNAVAILABLE);
        // One past a range's end, and a read spanning two ranges' gap.
        let e = scoped.check(&req(1, 1, &[3, 0, 0, 0, 101])).unwrap_err();
        assert_eq!((e.code, e.address), (ILLEGAL_DATA_ADDRESS, Some(0)));
        let e = scoped.check(&req(1, 1, &[1, 0, 99, 1, 50])).unwrap_err();
        assert_eq!(e.code, ILLEGAL_DATA_ADDRESS);
        // Quantities that cannot be: zero, past the address space, or missing.
        let e = scoped.check(&req(1, 1, &[3, 0, 0, 0, 0])).unwrap_err();
        assert_eq!(e.code, ILLEGAL_DATA_VALUE);
        let e = open.check(&req(1, 1, &[3, 255, 255, 0, 2])).unwrap_err();
        assert_eq!(e.code, ILLEGAL_DATA_ADDRESS);
        let e = open.check(&req(1, 1, &[3, 0, 0])).unwrap_err();
        assert_eq!(e.code, ILLEGAL_DATA_VALUE);
        // A FIFO read is checked at its pointer address; functions without addresses pass.
        assert!(scoped.check(&req(1, 1, &[24, 1, 244])).is_err());
        assert_eq!(scoped.check(&req(1, 1, &[24, 0, 5])), Ok(()));
        assert_eq!(scoped.check(&req(1, 1, &[17])), Ok(()));
    }

    #[test]
    fn an_exception_answers_its_request() {
        let r = req(0x1234, 9, &[6, 0, 1, 0, 3]);
        assert_eq!(
            exception(&r, ILLEGAL_FUNCTION),
            [0x12, 0x34, 0, 0, 0, 3, 9, 0x86, 1]
        );
    }

    /// The filter as a whole, over in-memory pipes: a device that answers every request with
    /// its own echo stands in for the PLC.
    #[tokio::test]
    async fn the_filter_passes_reads_answers_writes_and_ends_on_foreign_bytes() {
        let (device, mut plc) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(Some(n)) = read_adu(&mut plc, &mut buf).await {
                let adu: Vec<u8> = buf.drain(..n).collect();
                if plc.write_all(&adu).await.is_err() {
                    break;
                }
            }
        });
        let dir = std::env::temp_dir().join(format!("culvertd-modbus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let audit = crate::audit::Audit::new(Some(&path));
        let conn = Record {
            service: "PLC".into(),
            conn: "s1/c1".into(),
            ..Record::default()
        };
        let mut tunnel = filter(
            device,
            Arc::new(Policy::default()),
            Audited {
                record: Box::new(move |r| audit.record(r)),
                conn,
            },
        );
        // A read and a write in one write: the read's answer (the echo), then the exception.
        let read = req(1, 1, &[3, 0, 0, 0, 2]);
        let write = req(2, 1, &[6, 0, 1, 0, 3]);
        tunnel
            .write_all(&[read.clone(), write.clone()].concat())
            .await
            .unwrap();
        let mut got = vec![0u8; read.len() + 9];
        tunnel.read_exact(&mut got).await.unwrap();
        // The exception may overtake the device's answer; each is whole.
        let exc = exception(&write, ILLEGAL_FUNCTION);
        let in_order = [read.clone(), exc.to_vec()].concat();
        let overtaken = [exc.to_vec(), read.clone()].concat();
        assert!(got == in_order || got == overtaken, "{got:?}");
        // Bytes that are not Modbus/TCP end it.
        tunnel.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["reason"], "refused");
        assert_eq!(lines[0]["method"], "modbus 6 (write single register)");
        assert_eq!(lines[1]["reason"], "rejected");
    }

    /// A device that answers with something other than Modbus/TCP: nothing of it reaches the
    /// operator, and the connection ends.
    #[tokio::test]
    async fn a_device_that_is_not_modbus_ends_the_connection_unforwarded() {
        let (device, mut other) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let _ = other.read(&mut buf).await;
            let _ = other.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            let _ = other.read(&mut buf).await; // stays open until the filter lets go
        });
        let mut tunnel = filter(
            device,
            Arc::new(Policy::default()),
            Audited {
                record: Box::new(|_| {}),
                conn: Record::default(),
            },
        );
        tunnel
            .write_all(&req(1, 1, &[3, 0, 0, 0, 1]))
            .await
            .unwrap();
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }
}
