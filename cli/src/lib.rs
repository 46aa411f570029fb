//! culvert, the operator's tool.
//!
//! # Layout
//! - [`api`]: a small blocking client of culvert-relay's control API.
//! - [`tunnel`]: `culvert tunnel open|list|describe|close|rotate` and their output.
//! - [`operator`]: `culvert operator …` (operators, keys, grants) and `culvert whoami`;
//!   [`credentials`]: `culvert login`'s saved relay and key.
//! - [`output`]: terminal-safe human output and `--json`.
//! - [`connect`]: `culvert connect`, the source-side local proxy (listen on local ports, carry
//!   each connection through the tunnel, reconnect with the client token when the relay drops),
//!   or one connection over stdin and stdout (`--stdio`, ssh's ProxyCommand); [`udp`]: its
//!   UDP ports (`-s DNS=udp:5353`), a tunnel connection per client flow.
//! - [`reach`]: `culvert ssh` and `culvert open`, one command to a device: a tunnel of their
//!   own, opened, waited for, carried and closed.
//!
//! Exit codes: 0 success; 1 an error (message on stderr); 2 bad usage; 3 the relay refused
//! the token or the tunnel is closed/expired (`connect`), so scripts can tell "gone" from "broken";
//! 4 the relay's certificate is not trusted (`connect`: pass its CA). `culvert ssh` exits with
//! ssh's own code once ssh ran (255 for ssh's own errors), and 1 when no tunnel could be opened
//! or its gateway never connected.

pub mod api;
pub mod connect;
pub mod udp;

// Before the modules that print their output, so that they all print through it (not
// `connect`, whose stdout may be the data: `--stdio`).
/// Print a line on stdout. A reader that went away (`culvert tunnel list | head`) ends the
/// program quietly, as it would a C tool; any other failure to write ends it with an error.
macro_rules! println {
    () => { $crate::output::emit(format_args!("")) };
    ($($arg:tt)*) => { $crate::output::emit(format_args!($($arg)*)) };
}

pub mod credentials;
pub mod operator;
pub mod output;
pub mod reach;
pub mod tunnel;

/// Exit code for "the relay refused us / the tunnel is gone".
pub const EXIT_REFUSED: u8 = 3;
/// Exit code for "the relay's certificate is not trusted".
pub const EXIT_UNTRUSTED: u8 = 4;
