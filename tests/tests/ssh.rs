//! A real OpenSSH server reached with the real ssh and scp clients through the whole path:
//! culvert connect → culvert-relay → culvertd → sshd.

use std::process::{Command, Stdio};

use culvert_e2e::*;

#[test]
fn ssh_command_and_50_mb_scp_through_the_tunnel() {
    let dir = scratch("ssh");
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let scp = require_tool("scp", "openssh-client");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("robot-3", &["SSH"]);
    let rules = rules(&dir, &[("SSH", format!("127.0.0.1:{}", sshd.port))]);
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["SSH"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    let port = ports["SSH"].to_string();
    let target = format!("{}@127.0.0.1", Sshd::user());

    let out = Command::new(&ssh)
        .args(sshd.client_opts())
        .args(["-p", &port, &target, "echo culvert-$((6*7)); uname -s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh failed: {}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "culvert-42\nLinux\n");

    let data = random_bytes(50 * 1024 * 1024);
    let src = dir.join("payload.bin");
    let dst = dir.join("payload-copy.bin");
    std::fs::write(&src, &data).unwrap();
    let out = Command::new(&scp)
        .args(sshd.client_opts())
        .args(["-q", "-P", &port])
        .arg(&src)
        .arg(format!("{target}:{}", dst.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "scp failed: {}", stderr_of(&out));
    let copy = std::fs::read(&dst).unwrap();
    assert_eq!(copy.len(), data.len());
    assert_eq!(
        sha256(&copy),
        sha256(&data),
        "scp copy differs from the original"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay crashes (SIGKILL) or restarts (SIGTERM) in the middle of an interactive ssh
/// session and of a 200 MB scp: both carry on once it is back (resumable connections), the
/// session never notices, and the copy is intact.
fn an_ssh_session_and_a_200_mb_scp_survive_a_relay_restart(name: &str, signal: &str) {
    let dir = scratch(name);
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let scp = require_tool("scp", "openssh-client");
    let grace = ["--shutdown-grace-secs".to_owned(), "1".to_owned()];
    let relay = Relay::start_with(&dir, "127.0.0.1:0".parse().unwrap(), &grace);
    let t = relay.open_tunnel("robot-4", &["SSH"]);
    let rules = rules(&dir, &[("SSH", format!("127.0.0.1:{}", sshd.port))]);
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (px, ports) = relay.proxy(&dir, &t.source, &["SSH"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    let port = ports["SSH"].to_string();
    let target = format!("{}@127.0.0.1", Sshd::user());

    // An operator's session: every line typed comes back from the far side.
    let mut cmd = Command::new(&ssh);
    cmd.args(sshd.client_opts())
        .args(["-T", "-p", &port, &target]);
    let mut session = SshSession::start(&mut cmd);
    session.exchange("status");

    let data = numbered_mibs(200);
    let src = dir.join("payload.bin");
    let dst = dir.join("payload-copy.bin");
    std::fs::write(&src, &data).unwrap();
    // Limited to 400 Mbit/s so that it is under way when the relay dies.
    let copy = Command::new(&scp)
        .args(sshd.client_opts())
        .args(["-q", "-l", "400000", "-P", &port])
        .arg(&src)
        .arg(format!("{target}:{}", dst.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the copy to be under way", || {
        let len = std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
        (len > 16 * 1024 * 1024).then_some(())
    });
    let addr = relay.addr;
    let mut relay = relay;
    relay.proc.signal(signal);
    relay.proc.wait_exit();
    wait_log(&px, "reconnecting to resume the open connections");
    wait_log(&gw, "reconnecting to resume the open connections");
    drop(relay);
    let _relay = Relay::start_with(&dir, addr, &grace);
    wait_log(&px, "resuming connections");
    session.exchange("still there?");
    let out = copy.wait_with_output().unwrap();
    assert!(out.status.success(), "scp failed: {}", stderr_of(&out));
    let copy = std::fs::read(&dst).unwrap();
    assert_eq!(copy.len(), data.len());
    assert_eq!(sha256(&copy), sha256(&data), "the copy differs");
    session.exchange("bye");
    session.end();
    let log = sshd.proc.log_text();
    assert_eq!(
        log.matches("Accepted publickey").count(),
        2,
        "sshd saw the session and the copy once each:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_ssh_session_and_a_200_mb_scp_survive_a_relay_crash() {
    an_ssh_session_and_a_200_mb_scp_survive_a_relay_restart("ssh-resume-kill", "KILL");
}

#[test]
fn an_ssh_session_and_a_200_mb_scp_survive_a_graceful_relay_restart() {
    an_ssh_session_and_a_200_mb_scp_survive_a_relay_restart("ssh-resume-term", "TERM");
}

/// ssh with `culvert connect --stdio` as its ProxyCommand (what `culvert ssh` runs): the
/// session goes on across a relay crash too.
#[test]
fn an_ssh_session_through_the_stdio_proxy_survives_a_relay_crash() {
    let dir = scratch("ssh-stdio-resume");
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("robot-6", &["SSH"]);
    let rules = rules(&dir, &[("SSH", format!("127.0.0.1:{}", sshd.port))]);
    let gw = relay.gateway(&dir, &rules, &t.destination);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let log = dir.join("stdio-proxy.log");
    let proxy = format!(
        "{} connect --stdio SSH 2>>{}",
        bin("culvert").display(),
        log.display()
    );
    let mut cmd = Command::new(&ssh);
    cmd.args(sshd.client_opts())
        .args(["-T", "-o", &format!("ProxyCommand={proxy}")])
        .arg(format!("{}@robot-6", Sshd::user()))
        .env("CULVERT_RELAY", relay.addr.to_string())
        .env("CULVERT_CA", &relay.ca)
        .env("CULVERT_ACCESS_TOKEN", &t.source)
        .env("RUST_LOG", "info");
    let mut session = SshSession::start(&mut cmd);
    session.exchange("status");
    let addr = relay.addr;
    let mut relay = relay;
    relay.proc.signal("KILL");
    relay.proc.wait_exit();
    wait_log(&gw, "reconnecting to resume the open connections");
    drop(relay);
    let _relay = Relay::start_on(&dir, addr);
    session.exchange("still there?");
    let proxy_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        proxy_log.contains("resuming connections"),
        "the stdio proxy resumed:\n{proxy_log}"
    );
    session.end();
    let _ = std::fs::remove_dir_all(&dir);
}
