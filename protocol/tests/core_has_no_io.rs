//! The protocol crate's core (docs/architecture.md) touches no runtime, socket or TLS: only
//! `session`, `client` and `proxy` do. Checked on the sources, so that the claim cannot rot.

const CORE: &[&str] = &[
    "message.rs",
    "frame.rs",
    "mux.rs",
    "flow.rs",
    "ext.rs",
    "rules.rs",
    "forward.rs",
    "secret.rs",
    "datagram.rs",
];

const IO: &[&str] = &[
    "tokio",
    "tungstenite",
    "rustls",
    "std::net",
    "std::fs",
    "crate::session",
    "crate::client",
    "crate::proxy",
];

#[test]
fn the_core_modules_use_no_io() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in CORE {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for io in IO {
                assert!(
                    !code.contains(io),
                    "protocol/src/{file}:{}: the I/O-free core uses {io}: {line}",
                    n + 1
                );
            }
        }
    }
    // Every module is either core or shell: a new one must be placed.
    let mut known: Vec<&str> = CORE.to_vec();
    known.extend(["lib.rs", "session", "client.rs", "proxy.rs"]);
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            known.contains(&name.as_str()),
            "protocol/src/{name}: core or shell? add it to this test"
        );
    }
}
