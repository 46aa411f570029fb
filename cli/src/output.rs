//! Human output on stdout, safe for a terminal, and `--json` output.

use std::borrow::Cow;
use std::io::Write;

use serde_json::Value;

pub fn emit(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("culvert: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Text from the relay, safe to show on a terminal: control characters and bidirectional
/// overrides are shown escaped instead of acting on the terminal.
pub fn shown(text: &str) -> Cow<'_, str> {
    use culvert_protocol::is_unsafe_char as unsafe_char;
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if unsafe_char(c) {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

pub fn s<'a>(v: &'a Value, k: &str) -> Cow<'a, str> {
    shown(v[k].as_str().unwrap_or("-"))
}

pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}
