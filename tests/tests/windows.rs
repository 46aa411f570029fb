//! culvert for Windows: culvert.exe, cross-built with Debian's mingw-w64 (scripts/windows) and
//! run under Wine, opens and lists tunnels through the relay's API and, as `culvert connect`,
//! carries a real ssh session and a checked 20 MB scp to a real sshd behind culvertd.
//!
//! Needs the Debian packages gcc-mingw-w64-x86-64 and wine64, and the x86_64-pc-windows-gnu
//! Rust standard library (`rustup target add x86_64-pc-windows-gnu`): scripts/windows says
//! which is missing.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use culvert_e2e::*;

/// culvert.exe, built once per test process.
fn culvert_exe() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let out = run_ok(
            "scripts/windows build",
            Command::new(workspace().join("scripts/windows"))
                .current_dir(workspace())
                .arg("build"),
        );
        let exe = workspace().join(out.lines().last().expect("the path").trim());
        assert!(exe.is_file(), "no {}", exe.display());
        exe
    })
    .clone()
}

/// `culvert.exe ARGS` under Wine, with the relay's settings in its environment (as `culvert`
/// gets them in the other tests).
fn windows_culvert(relay: &Relay) -> Command {
    let native = relay.culvert();
    let mut c = Command::new(workspace().join("scripts/windows"));
    c.current_dir(workspace()).arg("wine").arg(culvert_exe());
    for (k, v) in native.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

#[test]
fn culvert_exe_opens_tunnels_and_carries_ssh_and_a_checked_scp_under_wine() {
    let dir = scratch("windows");
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let scp = require_tool("scp", "openssh-client");
    let relay = Relay::start(&dir);

    let out = run_ok(
        "culvert.exe tunnel open",
        windows_culvert(&relay).args([
            "--json",
            "tunnel",
            "open",
            "--thing",
            "kide-cell",
            "--service",
            "SSH",
        ]),
    );
    let opened: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let id = opened["tunnelId"].as_str().unwrap().to_owned();
    let source = opened["sourceAccessToken"].as_str().unwrap().to_owned();
    let destination = opened["destinationAccessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = run_ok(
        "culvert.exe tunnel list",
        windows_culvert(&relay).args(["tunnel", "list"]),
    );
    assert!(
        listed.contains(&id) && listed.contains("kide-cell"),
        "{listed}"
    );

    let rules = rules(&dir, &[("SSH", format!("127.0.0.1:{}", sshd.port))]);
    let _gw = relay.gateway(&dir, &rules, &destination);
    let port = free_port();
    let proxy = Proc::spawn_logging_stdout(
        "culvert-exe-connect",
        windows_culvert(&relay)
            .args(["connect", "-s", &format!("SSH={port}")])
            .env("CULVERT_ACCESS_TOKEN", &source)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null()),
        &dir,
    );
    wait_log(&proxy, "listening on");
    relay.wait_side(&id, "source", "CONNECTED");
    relay.wait_side(&id, "destination", "CONNECTED");

    let target = format!("{}@127.0.0.1", Sshd::user());
    let out = Command::new(&ssh)
        .args(sshd.client_opts())
        .args([
            "-p",
            &port.to_string(),
            &target,
            "echo through-windows-$((6*7))",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh failed: {}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through-windows-42\n");

    let data = random_bytes(20 * 1024 * 1024);
    let (src, dst) = (dir.join("payload.bin"), dir.join("payload-copy.bin"));
    std::fs::write(&src, &data).unwrap();
    let out = Command::new(&scp)
        .args(sshd.client_opts())
        .args(["-q", "-P", &port.to_string()])
        .arg(&src)
        .arg(format!("{target}:{}", dst.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "scp failed: {}", stderr_of(&out));
    assert_eq!(sha256(&std::fs::read(&dst).unwrap()), sha256(&data));
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
