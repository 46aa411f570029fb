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
            let mut check = Command::new(bin("culvertd"));
            check.args(["--check-config", "--config"]).arg(&path);
            check.env_remove("CULVERT_RELAY");
            if name == "culvertd-demo.toml" {
                // The demo's rules leave the relay to the environment it starts culvertd in.
                check.env("CULVERT_RELAY", "127.0.0.1:8443");
            }
            check.output().unwrap()
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

/// Every file under tests/fixtures/broken-configs is refused by `culvertd --check-config` with
/// exit code 64, and every problem its `# expect: LINE: TEXT` comments name is reported on that
/// line (all of them in one run).
#[test]
fn broken_configs_name_every_problem_with_line_and_key() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/broken-configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|e| {
                let (line, what) = e.split_once(": ").expect("# expect: LINE: TEXT");
                (line.to_owned(), what.to_owned())
            })
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no # expect: lines",
            path.display()
        );
        let out = Command::new(bin("culvertd"))
            .args(["--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(64), "{}: {err}", path.display());
        for (line, what) in &expected {
            let prefix = format!("{}:{line}: ", path.display());
            assert!(
                err.lines()
                    .any(|l| l.starts_with(&prefix) && l.contains(what.as_str())),
                "{}: expected a problem on line {line} containing {what:?}; got:\n{err}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "expected broken configs under {}",
        root.display()
    );
}
