//! A read-only Modbus/TCP rule, end to end: pymodbus's server as the PLC behind culvertd, and
//! pymodbus's client (an integrator's tool) through `culvert connect` and the relay. Reads
//! pass and return the device's registers; writes, a read outside the allowed registers and a
//! request for another unit get Modbus exception responses on the same connection, never
//! reach the device (a read afterwards shows its registers unchanged), and are each audited.
//! Bytes that are not Modbus/TCP end the connection, audited too.
//!
//! Needs python3 with venv (Debian: python3-venv) and the PyPI registry on first use:
//! pymodbus is pinned in tests/modbus/requirements.txt.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use culvert_e2e::*;

#[test]
fn a_read_only_modbus_rule_passes_reads_and_answers_writes_with_exceptions() {
    let dir = scratch("modbus");
    let venv = python_venv("modbus-venv", "tests/modbus/requirements.txt");
    let python = venv.join("bin/python");
    let plc_port = free_port();
    let plc = Proc::spawn(
        "plc",
        Command::new(&python)
            .arg(workspace().join("tests/modbus/plc.py"))
            .arg(plc_port.to_string())
            .stdout(Stdio::null()),
        &dir,
    );
    wait_for("the Modbus device to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", plc_port))
            .ok()
            .map(|_| ())
    });

    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("press-line-4", &["PLC"]);
    let audit = dir.join("audit.jsonl");
    let config = dir.join("culvertd.toml");
    std::fs::write(
        &config,
        format!(
            "{LOOPBACK_ACL}[audit]\nfile = \"{}\"\n\n[services.PLC]\ntarget = \"127.0.0.1:{plc_port}\"\n\n\
             [services.PLC.modbus]\nread_only = true\nunits = [1]\nregisters = [\"0-99\"]\n",
            audit.display()
        ),
    )
    .unwrap();
    let _gw = relay.gateway(&dir, &config, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["PLC"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    let port = ports["PLC"];

    let answers = python_json_lines(&python, "tests/modbus/client.py", &[&port.to_string()]);
    let expect = [
        (
            "read holding 10-14",
            "registers",
            serde_json::json!([110, 111, 112, 113, 114]),
        ),
        ("write register 10", "exception", serde_json::json!(1)),
        ("write coil 3", "exception", serde_json::json!(1)),
        // The writes never reached the device.
        (
            "read holding 10-14",
            "registers",
            serde_json::json!([110, 111, 112, 113, 114]),
        ),
        ("read holding 500", "exception", serde_json::json!(2)),
        (
            "read coils 0-3",
            "bits",
            serde_json::json!([false, false, false, false]),
        ),
        ("read unit 2", "exception", serde_json::json!(10)),
    ];
    assert_eq!(answers.len(), expect.len(), "{answers:?}");
    for (got, (what, key, value)) in answers.iter().zip(expect) {
        assert_eq!(got["what"], what, "{answers:?}");
        assert_eq!(got[key], value, "{what}: {got}");
    }

    // Each refusal is in the audit trail, with what was asked.
    let refused = wait_for("four refused requests in the audit trail", || {
        let r: Vec<_> = audit_records(&audit)
            .into_iter()
            .filter(|r| r["event"] == "request" && r["reason"] == "refused")
            .collect();
        (r.len() == 4).then_some(r)
    });
    let write = &refused[0];
    assert_eq!(
        write["method"], "modbus 6 (write single register)",
        "{write}"
    );
    assert_eq!(write["unit"], 1, "{write}");
    assert_eq!(write["register"], serde_json::Value::Null, "{write}");
    assert_eq!(write["status"], 1, "{write}");
    assert_eq!(write["service"], "PLC", "{write}");
    assert_eq!(refused[1]["method"], "modbus 5 (write single coil)");
    assert_eq!(refused[2]["register"], 500, "{}", refused[2]);
    assert_eq!(refused[2]["status"], 2);
    assert_eq!(refused[3]["unit"], 2, "{}", refused[3]);
    assert_eq!(refused[3]["status"], 10);

    // Something that is not Modbus/TCP ends its connection, and says why.
    let mut other = connect_local(port);
    other.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = other.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    let rejected = wait_audit(&audit, "the foreign bytes", |r| {
        r["event"] == "request" && r["reason"] == "rejected"
    });
    assert!(
        rejected["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not Modbus/TCP")),
        "{rejected}"
    );
    drop(plc);
    let _ = std::fs::remove_dir_all(&dir);
}
