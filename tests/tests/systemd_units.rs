//! The systemd units under packaging/systemd pass `systemd-analyze verify` without a warning, and
//! keep their hardening (`systemd-analyze security` exposure "OK", at most 2.0), checked offline
//! against a root holding the built binaries where the units expect them. The drop-in
//! docs/configuration.md gives for serial rules verifies too, and stays "OK".

use std::path::Path;
use std::process::Command;

use culvert_e2e::*;

fn unit_root() -> std::path::PathBuf {
    let root = scratch("unit-root");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    for d in ["usr/bin", "bin", "etc/systemd/system", "lib/systemd"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // systemd's own units (sysinit.target, …), for the dependencies to resolve.
    let system = ["/lib/systemd/system", "/usr/lib/systemd/system"]
        .into_iter()
        .find(|p| Path::new(p).join("sysinit.target").exists())
        .expect("systemd's unit directory: apt-get install systemd");
    let st = Command::new("cp")
        .args(["-r", system])
        .arg(root.join("lib/systemd/system"))
        .status()
        .unwrap();
    assert!(st.success());
    for b in ["culvertd", "culvert-relay"] {
        std::fs::copy(bin(b), root.join("usr/bin").join(b)).unwrap();
    }
    std::fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    for e in std::fs::read_dir(&units).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(
            &p,
            root.join("etc/systemd/system").join(p.file_name().unwrap()),
        )
        .unwrap();
    }
    root
}

#[test]
fn units_verify_cleanly_and_stay_hardened() {
    let analyze = require_tool("systemd-analyze", "systemd");
    let root = unit_root();
    verify(&analyze, &root);
    // The serial rules' drop-in, as docs/configuration.md prints it.
    let docs = std::fs::read_to_string(workspace().join("docs/configuration.md")).unwrap();
    let at = docs
        .find("systemctl edit culvertd")
        .expect("the serial drop-in in docs/configuration.md");
    let block = docs[at..]
        .split("```ini\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("an ini block after `systemctl edit culvertd`");
    let dropin = root.join("etc/systemd/system/culvertd.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(dropin.join("serial.conf"), block).unwrap();
    verify(&analyze, &root);
}

fn verify(analyze: &Path, root: &Path) {
    for unit in ["culvertd.service", "culvert-relay.service"] {
        let path = root.join("etc/systemd/system").join(unit);
        let out = Command::new(analyze)
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(&path)
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze verify {unit}: {err}"
        );
        let out = Command::new(analyze)
            .args(["security", "--offline=yes"])
            .arg(format!("--root={}", root.display()))
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let level: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {unit}: {text}{}", stderr_of(&out)));
        println!("{unit}: systemd-analyze security exposure {level}");
        assert!(
            level <= 2.0,
            "{unit} exposure {level} (want <= 2.0, \"OK\"):\n{text}"
        );
    }
}

#[test]
fn both_units_give_the_daemons_room_for_their_connections() {
    // Each connection holds a descriptor; the daemons derive their connection limits from
    // this limit (docs/operations.md, "Limits").
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    for (unit, at_least) in [
        ("culvertd.service", 16_384),
        ("culvert-relay.service", 65_536),
    ] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .unwrap_or_else(|| panic!("{unit} sets no LimitNOFILE"))
            .trim()
            .parse()
            .unwrap();
        assert!(
            n >= at_least,
            "{unit}: LimitNOFILE={n}, want at least {at_least}"
        );
    }
}
