//! Every example configuration under config/ is accepted by the program it is for.

use std::process::Command;

use culvert_e2e::*;

#[test]
fn every_example_config_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let out = if name.starts_with("relay") {
            // The relay example names its key and certificate files next to it: supply them.
            let dir = scratch("relay-example");
            std::fs::copy(&path, dir.join(&name)).unwrap();
            let dev = dir.join("dev");
            let relay = Relay::start(&dev);
            std::fs::copy(
                relay.dir.join("relay-state/server.pem"),
                dir.join("relay.pem"),
            )
            .unwrap();
            std::fs::copy(
                relay.dir.join("relay-state/server-key.pem"),
                dir.join("relay-key.pem"),
            )
            .unwrap();
            std::fs::write(dir.join("relay-api-key"), &relay.api_key).unwrap();
            Command::new(bin("culvert-relay"))
                .args(["--check-config", "--config"])
                .arg(dir.join(&name))
                .output()
                .unwrap()
        } else {
            Command::new(bin("culvertd"))
                .args(["--check-config", "--config"])
                .arg(&path)
                .output()
                .unwrap()
        };
        assert!(
            out.status.success(),
            "{name} is rejected: {}",
            stderr_of(&out)
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected example configs under {}",
        root.display()
    );
}

#[test]
fn broken_configs_name_the_line_and_key() {
    let dir = scratch("broken");
    let cases = [
        (
            "[services.SSH]\ntarget = \"robot\"\n",
            "services.SSH.target",
            ":2:",
        ),
        (
            "[services.SSH]\ntarget = \"127.0.0.1:22\"\ntimeout = 5\n",
            "unknown field",
            ":3:",
        ),
        (
            "[relay]\nendpoint = \"ws://x:1\"\n[services.SSH]\ntarget = \"127.0.0.1:22\"\n",
            "relay.endpoint",
            ":2:",
        ),
    ];
    for (i, (text, key, line)) in cases.iter().enumerate() {
        let p = dir.join(format!("broken{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let out = Command::new(bin("culvertd"))
            .args(["--check-config", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = stderr_of(&out);
        assert!(err.contains(key) && err.contains(line), "case {i}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
