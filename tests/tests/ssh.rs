//! A real OpenSSH server reached with the real ssh and scp clients through the whole path:
//! culvert connect → culvert-relay → culvertd → sshd.

use std::process::Command;

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
