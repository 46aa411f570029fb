//! Serial-port services end to end: a device program on the far side of a pty pair
//! (`tests/serial/device.py`) stands in for a controller's console; culvertd's serial rules
//! open the pty as their port, through `culvert connect` and the relay.
//!
//! - A raw rule carries bytes both ways, with the line set as the rule says (the device reads
//!   the settings culvertd applied).
//! - One user at a time: while a connection holds the port, a second one, to the same rule or
//!   to another rule on the same device, is refused and audited `in_use`.
//! - An RFC 2217 rule, driven by pyserial's `rfc2217://` client (an operator's tool, from
//!   PyPI): the baud rate and stop bits the client sets reach the device's line; a parity the
//!   port cannot take (a pty keeps 8N) leaves the line as it was and is logged; bytes pass
//!   both ways, 0xFF (Telnet's IAC) included.
//!
//! Needs python3 with venv (Debian: python3-venv) and the PyPI registry on first use: pyserial
//! is pinned in tests/serial/requirements.txt.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use culvert_e2e::*;

#[test]
fn serial_rules_carry_a_console_one_user_at_a_time_and_speak_rfc_2217() {
    let dir = scratch("serial");
    let venv = python_venv("serial-venv", "tests/serial/requirements.txt");
    let python = venv.join("bin/python");
    let mut device = Proc::spawn(
        "device",
        Command::new(&python)
            .arg(workspace().join("tests/serial/device.py"))
            .stdout(Stdio::piped()),
        &dir,
    );
    let mut tty = String::new();
    BufReader::new(device.child.stdout.take().unwrap())
        .read_line(&mut tty)
        .unwrap();
    let tty = tty.trim().to_owned();
    assert!(tty.starts_with("/dev/pts/"), "the device printed {tty:?}");

    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("press-7", &["CONSOLE", "RFC"]);
    let audit = dir.join("audit.jsonl");
    let config = dir.join("culvertd.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\nfile = \"{}\"\n\n\
             [services.CONSOLE]\ntarget = \"serial:{tty}\"\n\
             [services.CONSOLE.serial]\nbaud = 19200\nstop_bits = 2\n\n\
             [services.RFC]\ntarget = \"serial:{tty}\"\n\
             [services.RFC.serial]\nrfc2217 = true\n",
            audit.display()
        ),
    )
    .unwrap();
    let gw = relay.gateway(&dir, &config, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["CONSOLE", "RFC"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");

    // Raw: the line as the rule sets it, bytes both ways.
    let mut console = connect_local(ports["CONSOLE"]);
    console.write_all(b"LINE?\n").unwrap();
    assert_eq!(read_line(&mut console).as_deref(), Some("LINE 19200 8N2\r"));
    console.write_all(b"status\n").unwrap();
    assert_eq!(read_line(&mut console).as_deref(), Some("DEVICE: STATUS\r"));

    // A second user, of this rule or of the other one on the same device, is refused.
    for service in ["CONSOLE", "RFC"] {
        let mut second = connect_local(ports[service]);
        let _ = second.write_all(b"LINE?\n");
        assert_eq!(
            read_line(&mut second),
            None,
            "{service}: a second user got an answer"
        );
    }
    let refused = wait_for("two in_use refusals in the audit trail", || {
        let r: Vec<_> = audit_records(&audit)
            .into_iter()
            .filter(|r| r["reason"] == "in_use")
            .collect();
        (r.len() == 2).then_some(r)
    });
    assert!(
        refused[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&tty) && d.contains("one user at a time")),
        "{}",
        refused[0]
    );
    // The first user is still there.
    console.write_all(b"still here\n").unwrap();
    assert_eq!(
        read_line(&mut console).as_deref(),
        Some("DEVICE: STILL HERE\r")
    );
    drop(console);
    wait_audit(&audit, "the console connection's end", |r| {
        r["event"] == "end" && r["service"] == "CONSOLE" && r["reason"] != "in_use"
    });

    // RFC 2217: pyserial sets the line, the device sees it.
    let rfc = ports["RFC"].to_string();
    let answers = python_json_lines(&python, "tests/serial/client.py", &[&rfc]);
    let expect = [
        ("as opened", "LINE 9600 8N1\r\n"),
        ("after the change", "LINE 115200 8N2\r\n"),
        ("after a refused change", "LINE 115200 8N2\r\n"),
        ("bytes", "DEVICE: AB\u{ff}CD\r\n"),
    ];
    assert_eq!(answers.len(), expect.len(), "{answers:?}");
    for (got, (what, answer)) in answers.iter().zip(expect) {
        assert_eq!(got["what"], what, "{answers:?}");
        assert_eq!(got["answer"], answer, "{what}");
    }
    // The refused parity is in culvertd's log, with the port's reason.
    wait_log(&gw, "RFC 2217: a request could not be applied to the port");
    drop(device);
    let _ = std::fs::remove_dir_all(&dir);
}
