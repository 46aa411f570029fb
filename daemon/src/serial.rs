//! A serial rule's connection: one user at a time on a serial port, carrying raw bytes, or
//! speaking RFC 2217 (Telnet COM Port Control) so that the operator's tools set the line
//! themselves.
//!
//! - The port is opened when a tunnel connection arrives, with the rule's settings, in raw
//!   mode, and closed when the connection ends. While one connection holds it, another (from
//!   any rule naming the same device) is refused with the reason `in_use`: two users typing on
//!   one console, or two programs sending to one controller, would corrupt each other.
//! - Raw (the default): the bytes are the port's, both ways, as `nc`, `telnet` or a web
//!   terminal expect.
//! - RFC 2217 (`rfc2217 = true`): the connection is a Telnet session with COM-PORT-OPTION
//!   (pyserial's `rfc2217://`, ser2net's clients, Windows com0com/HW VSP bridges). Baud rate,
//!   data bits, parity, stop bits and flow control the client asks for are applied to the
//!   port; DTR, RTS and break are driven; the port's CTS, DSR, RI and CD are reported once a
//!   second when they change. The protocol is the `rfc2217` crate's sans-io server; this
//!   module is its I/O. A value the port refuses (1.5 stop bits on Linux, mark parity) is
//!   logged and leaves the port as it was; rfc2217 0.1 acknowledges the request anyway, so
//!   the log is where the operator learns of it.
//!
//! serial2 does not take the device exclusively (TIOCEXCL): other programs on the gateway that
//! open it (a getty, ModemManager) are the gateway's configuration to keep off the port.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rfc2217::{ModemState, Server, ServerEvent};
use serial2_tokio::{CharSize, SerialPort, Settings, StopBits};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tracing::{debug, info, warn};

use crate::config::{FlowControl, Parity, SerialSettings};

/// The serial devices held by a connection now.
static IN_USE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// A device held by one connection; released when dropped.
#[derive(Debug)]
pub struct Claim(PathBuf);

impl Drop for Claim {
    fn drop(&mut self) {
        IN_USE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// Hold `path` for one connection, or say that another holds it.
pub fn claim(path: &Path) -> Result<Claim, String> {
    let mut held = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
    if !held.insert(path.to_owned()) {
        return Err(format!(
            "{} is in use by another connection (a serial port takes one user at a time)",
            path.display()
        ));
    }
    Ok(Claim(path.to_owned()))
}

/// Apply `s` to serial2's settings, raw mode included.
fn apply(s: &SerialSettings, mut port: Settings) -> std::io::Result<Settings> {
    port.set_raw();
    port.set_baud_rate(s.baud)?;
    port.set_char_size(match s.data_bits {
        5 => CharSize::Bits5,
        6 => CharSize::Bits6,
        7 => CharSize::Bits7,
        _ => CharSize::Bits8,
    });
    port.set_parity(match s.parity {
        Parity::None => serial2_tokio::Parity::None,
        Parity::Odd => serial2_tokio::Parity::Odd,
        Parity::Even => serial2_tokio::Parity::Even,
    });
    port.set_stop_bits(if s.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    });
    port.set_flow_control(match s.flow_control {
        FlowControl::None => serial2_tokio::FlowControl::None,
        FlowControl::RtsCts => serial2_tokio::FlowControl::RtsCts,
        FlowControl::XonXoff => serial2_tokio::FlowControl::XonXoff,
    });
    Ok(port)
}

/// Open `path` with the rule's settings.
pub fn open(path: &Path, s: &SerialSettings) -> std::io::Result<SerialPort> {
    let s = s.clone();
    SerialPort::open(path, move |port: Settings| apply(&s, port))
}

/// The settings as RFC 2217 names them, for the server's first answers.
fn to_rfc(s: &SerialSettings) -> rfc2217::PortSettings {
    rfc2217::PortSettings {
        baud_rate: s.baud,
        data_bits: match s.data_bits {
            5 => rfc2217::DataBits::Five,
            6 => rfc2217::DataBits::Six,
            7 => rfc2217::DataBits::Seven,
            _ => rfc2217::DataBits::Eight,
        },
        parity: match s.parity {
            Parity::None => rfc2217::Parity::None,
            Parity::Odd => rfc2217::Parity::Odd,
            Parity::Even => rfc2217::Parity::Even,
        },
        stop_bits: if s.stop_bits == 2 {
            rfc2217::StopBits::Two
        } else {
            rfc2217::StopBits::One
        },
        flow_control: match s.flow_control {
            FlowControl::None => rfc2217::FlowControl::None,
            FlowControl::RtsCts => rfc2217::FlowControl::RtsCts,
            FlowControl::XonXoff => rfc2217::FlowControl::XonXoff,
        },
    }
}

/// What the client asked for, as the rule's settings; `Err` names what the port cannot do.
fn from_rfc(p: &rfc2217::PortSettings, rfc2217: bool) -> Result<SerialSettings, String> {
    Ok(SerialSettings {
        baud: p.baud_rate,
        data_bits: match p.data_bits {
            rfc2217::DataBits::Five => 5,
            rfc2217::DataBits::Six => 6,
            rfc2217::DataBits::Seven => 7,
            rfc2217::DataBits::Eight => 8,
        },
        parity: match p.parity {
            rfc2217::Parity::None => Parity::None,
            rfc2217::Parity::Odd => Parity::Odd,
            rfc2217::Parity::Even => Parity::Even,
            other => return Err(format!("parity {other:?} is not supported")),
        },
        stop_bits: match p.stop_bits {
            rfc2217::StopBits::One => 1,
            rfc2217::StopBits::Two => 2,
            other => return Err(format!("stop bits {other:?} are not supported")),
        },
        flow_control: match p.flow_control {
            rfc2217::FlowControl::None => FlowControl::None,
            rfc2217::FlowControl::RtsCts => FlowControl::RtsCts,
            rfc2217::FlowControl::XonXoff => FlowControl::XonXoff,
            other => return Err(format!("flow control {other:?} is not supported")),
        },
        rfc2217,
    })
}

/// The port's modem input lines, where the device has them (a pty has none).
fn modem_state(port: &SerialPort) -> Option<ModemState> {
    let mut m = ModemState::from_bits(0);
    for (line, flag) in [
        (port.read_cts(), ModemState::CTS),
        (port.read_dsr(), ModemState::DSR),
        (port.read_ri(), ModemState::RI),
        (port.read_cd(), ModemState::CD),
    ] {
        if line.ok()? {
            m |= flag;
        }
    }
    Some(m)
}

/// The stream side of an RFC 2217 session on `port`: what the tunnel connection sends is
/// Telnet with COM-PORT-OPTION, what it receives the port's bytes, escaped, and the answers.
/// Ends when the tunnel's side ends or the port fails.
pub fn rfc2217_bridge(
    mut port: SerialPort,
    settings: &SerialSettings,
    conn: String,
) -> std::io::Result<DuplexStream> {
    let control = port.try_clone()?;
    let (near, far) = tokio::io::duplex(64 * 1024);
    let mut server = Server::new(to_rfc(settings)).with_signature("culvertd");
    let mut current = settings.clone();
    tokio::spawn(async move {
        let (mut from_tunnel, mut to_tunnel) = tokio::io::split(far);
        let (mut input, mut payload, mut serial) = (vec![0u8; 4096], Vec::new(), vec![0u8; 4096]);
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        let why = 'session: loop {
            let out = server.take_output();
            if !out.is_empty() && to_tunnel.write_all(&out).await.is_err() {
                break "the tunnel connection ended";
            }
            tokio::select! {
                r = from_tunnel.read(&mut input) => {
                    let n = match r {
                        Ok(0) | Err(_) => break "the tunnel connection ended",
                        Ok(n) => n,
                    };
                    let mut rest = &input[..n];
                    while !rest.is_empty() {
                        let used = server.receive_until_event(rest, &mut payload);
                        rest = &rest[used..];
                        // The bytes before an event go out under the settings before it.
                        if !payload.is_empty() {
                            if let Err(e) = port.write_all(&payload).await {
                                warn!(%conn, error = %e, "cannot write to the serial port; the connection ends");
                                break 'session "the port failed";
                            }
                            payload.clear();
                        }
                        while let Some(event) = server.poll_event() {
                            handle(&mut port, &control, event, &mut current, &conn);
                        }
                    }
                }
                r = control.read(&mut serial) => match r {
                    Ok(0) => break "the serial port closed",
                    Ok(n) => server.write_data(&serial[..n]),
                    Err(e) => {
                        warn!(%conn, error = %e, "cannot read the serial port; the connection ends");
                        break "the port failed";
                    }
                },
                _ = poll.tick() => {
                    if let Some(m) = modem_state(&control) {
                        server.set_modem_state(m);
                    }
                }
            }
        };
        debug!(%conn, why, "RFC 2217 session ended");
        let _ = to_tunnel.shutdown().await;
    });
    Ok(near)
}

/// Apply one client request to the port.
fn handle(
    port: &mut SerialPort,
    control: &SerialPort,
    event: ServerEvent,
    current: &mut SerialSettings,
    conn: &str,
) {
    let result = match event {
        ServerEvent::ComPortActive => {
            debug!(%conn, "RFC 2217: COM-PORT-OPTION on");
            Ok(())
        }
        ServerEvent::SettingsChanged(p) => match from_rfc(&p, true) {
            Err(why) => Err(why),
            Ok(wanted) => {
                let applied = port
                    .get_configuration()
                    .and_then(|c| apply(&wanted, c))
                    .and_then(|c| port.set_configuration(&c));
                match applied {
                    Ok(()) => {
                        if wanted.baud != current.baud {
                            info!(%conn, baud = wanted.baud, "RFC 2217: the client set the baud rate");
                        }
                        *current = wanted;
                        Ok(())
                    }
                    Err(e) => Err(format!("{e}")),
                }
            }
        },
        ServerEvent::Dtr(on) => control.set_dtr(on).map_err(|e| format!("DTR: {e}")),
        ServerEvent::Rts(on) => control.set_rts(on).map_err(|e| format!("RTS: {e}")),
        ServerEvent::Break(on) => control.set_break(on).map_err(|e| format!("break: {e}")),
        ServerEvent::Purge(p) => {
            let r = match p {
                rfc2217::Purge::Receive => control.discard_input_buffer(),
                rfc2217::Purge::Transmit => control.discard_output_buffer(),
                rfc2217::Purge::Both => control.discard_buffers(),
            };
            r.map_err(|e| format!("purge: {e}"))
        }
        ServerEvent::ClientSignature(_) => Ok(()),
        other => {
            debug!(%conn, event = ?other, "RFC 2217 request not handled");
            Ok(())
        }
    };
    if let Err(why) = result {
        warn!(%conn, "RFC 2217: a request could not be applied to the port (it stays as it was): {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_holds_a_device_at_a_time() {
        let path = Path::new("/dev/ttyCULVERT-TEST");
        let first = claim(path).unwrap();
        let second = claim(path).unwrap_err();
        assert!(second.contains("in use by another connection"), "{second}");
        let other = claim(Path::new("/dev/ttyCULVERT-OTHER")).unwrap();
        drop(first);
        let again = claim(path).unwrap();
        drop((again, other));
    }

    #[test]
    fn settings_the_port_cannot_take_are_named() {
        let s = SerialSettings {
            baud: 115_200,
            data_bits: 7,
            parity: Parity::Even,
            stop_bits: 2,
            flow_control: FlowControl::RtsCts,
            rfc2217: true,
        };
        assert_eq!(from_rfc(&to_rfc(&s), true).unwrap(), s);
        let mark = rfc2217::PortSettings {
            parity: rfc2217::Parity::Mark,
            ..to_rfc(&s)
        };
        assert!(from_rfc(&mark, true).unwrap_err().contains("parity"));
        let one_and_a_half = rfc2217::PortSettings {
            stop_bits: rfc2217::StopBits::OnePointFive,
            ..to_rfc(&s)
        };
        assert!(
            from_rfc(&one_and_a_half, true)
                .unwrap_err()
                .contains("stop bits")
        );
    }
}
