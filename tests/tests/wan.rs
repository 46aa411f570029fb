//! culvert over an emulated WAN (devkit's `culvert-wanem` between three network namespaces:
//! operator, relay, site), with the real programs: `culvert connect` in the operator's
//! namespace, culvert-relay in the relay's, culvertd and the LAN targets at the site.
//!
//! At 50 ms round trip with 1 % loss each way:
//! - a 16 MiB transfer arrives whole (SHA-256), and the receiving end's window grew beyond its
//!   configured 256 KiB (auto-tuning, logged by culvertd);
//! - a FIN crosses the WAN as a FIN (half-close) and the answer comes back;
//! - a 5 s black hole of the links in the middle of a transfer: the transfer resumes and
//!   completes, byte for byte, on the same connection (TCP under the WebSocket retransmits; the
//!   session's idle timeout is 65 s).
//!
//! And at 50 ms round trip, a 20 s black hole of both links in the middle of an interactive
//! ssh session, a 200 MB scp and a telnet-style session, all three in one tunnel: lines typed
//! during the outage arrive after it, in order; the copy completes with the same SHA-256; the
//! telnet-style target and sshd each saw their connections exactly once; no end reconnected.
//!
//! Needs root (namespaces, TUN devices), iproute2, and OpenSSH (server and client); fails
//! saying so otherwise.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use culvert_devkit::wan::{SITE_IP, Wan};
use culvert_e2e::*;

/// Send `data` through the operator's local `port`, finish sending, and return the answer.
fn send_and_digest(port: u16, data: Vec<u8>, on_half: Option<mpsc::Sender<()>>) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let half = data.len() / 2;
    c.write_all(&data[..half]).unwrap();
    if let Some(tx) = on_half {
        let _ = tx.send(());
    }
    c.write_all(&data[half..]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn over_a_lossy_50_ms_wan_transfers_arrive_whole_windows_grow_and_a_black_hole_is_survived() {
    let dir = scratch("wan");
    let bins = bin_dir();
    let mut wan = Wan::start(bins, &["--rate", "100", "--queue", "512"])
        .unwrap_or_else(|e| panic!("{e} (this test needs root and iproute2)"));
    wan.set_rtt(Duration::from_millis(50), 0.5);
    let site = wan.site.clone();
    let target = Wan::within(&site, || digest_at_eof(IpAddr::V4(SITE_IP)));
    let path = wan
        .culvert_path(bins, &dir, 8443, true, &[("DATA", target)])
        .unwrap_or_else(|e| panic!("{e}"));
    let port = path.ports["DATA"];
    let op = wan.operator.clone();

    // A transfer, whole; culvertd's window for it grew.
    let data = random_bytes(16 << 20);
    let expect = format!("{} {}\n", data.len(), sha256(&data));
    let sent = data.clone();
    let answer = Wan::within(&op, move || send_and_digest(port, sent, None));
    assert_eq!(answer, expect, "the transfer over the WAN arrived altered");
    let gw_log = std::fs::read_to_string(dir.join("culvertd.log")).unwrap();
    assert!(
        gw_log.contains("window auto-tuned"),
        "the receiving window never grew over a 50 ms path; culvertd's log:\n{gw_log}"
    );

    // Half-close across the WAN: the command's answer comes back after our FIN.
    let answer = Wan::within(&op, move || send_and_digest(port, b"cmd\n".to_vec(), None));
    assert_eq!(answer, format!("4 {}\n", sha256(b"cmd\n")));

    // A 5 s outage in the middle of a transfer.
    let data = random_bytes(4 << 20);
    let expect = format!("{} {}\n", data.len(), sha256(&data));
    let (tx, rx) = mpsc::channel();
    let transfer =
        std::thread::spawn(move || Wan::within(&op, move || send_and_digest(port, data, Some(tx))));
    rx.recv_timeout(WAIT).expect("the transfer started");
    wan.control("blackhole 5");
    let answer = transfer.join().unwrap();
    assert_eq!(
        answer, expect,
        "a transfer through a 5 s outage did not complete whole"
    );
    let px_log = std::fs::read_to_string(dir.join("culvert-connect.log")).unwrap();
    assert!(
        !px_log.contains("reconnecting"),
        "the session should ride out a 5 s outage without reconnecting:\n{px_log}"
    );
    drop(path);
}

#[test]
fn a_20_s_black_hole_under_ssh_scp_and_a_telnet_session_goes_unnoticed() {
    let dir = scratch("wan-outage");
    let bins = bin_dir();
    let ssh = require_tool("ssh", "openssh-client");
    let scp = require_tool("scp", "openssh-client");
    let mut wan =
        Wan::start(bins, &[]).unwrap_or_else(|e| panic!("{e} (this test needs root and iproute2)"));
    wan.set_rtt(Duration::from_millis(50), 0.0);
    let site = wan.site.clone();
    let op = wan.operator.clone();
    // sshd and a controller that counts its connections, on the site's loopback.
    let sshd = {
        let dir = dir.clone();
        Wan::within(&site, move || Sshd::start(&dir))
    };
    let (controller, accepted) = Wan::within(&site, counting_echo_server);
    let sshd_addr = format!("127.0.0.1:{}", sshd.port).parse().unwrap();
    let path = wan
        .culvert_path(
            bins,
            &dir,
            8443,
            true,
            &[("SSH", sshd_addr), ("TELNET", controller)],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let (ssh_port, telnet_port) = (path.ports["SSH"].to_string(), path.ports["TELNET"]);
    let target = format!("{}@127.0.0.1", Sshd::user());
    // A session that truly died ends ssh within two minutes instead of hanging the test.
    let alive = [
        "-o",
        "ServerAliveInterval=10",
        "-o",
        "ServerAliveCountMax=12",
    ];

    // The interactive session: every line typed comes back as "robot says <line>".
    let mut session = SshSession::start(
        wan.exec(&op, &ssh)
            .args(sshd.client_opts())
            .args(alive)
            .args(["-p", &ssh_port, &target]),
    );
    session.exchange("before the outage");
    let mut telnet = Wan::within(&op, move || connect_local(telnet_port));
    telnet
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    type_line(&mut telnet, "AS terminal: HERE #0\r\n");

    // The copy, and the outage when a fifth of it has arrived.
    let data = numbered_mibs(200);
    let expect = sha256(&data);
    let (src, dst) = (dir.join("payload.bin"), dir.join("payload-copy.bin"));
    std::fs::write(&src, &data).unwrap();
    drop(data);
    let copy = wan
        .exec(&op, &scp)
        .args(sshd.client_opts())
        .args(alive)
        .args(["-P", &ssh_port])
        .arg(&src)
        .arg(format!("{target}:{}", dst.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a fifth of the copy to arrive", || {
        let n = std::fs::metadata(&dst).map_or(0, |m| m.len());
        (n >= 40 * 1024 * 1024).then_some(())
    });
    wan.control("blackhole 20");
    let during = std::fs::metadata(&dst).map_or(0, |m| m.len());
    assert!(
        during < 200 * 1024 * 1024,
        "the copy was over before the outage began"
    );
    // Typed during the outage: they wait, and arrive.
    telnet.write_all(b"typed during the outage\r\n").unwrap();
    session.type_line("typed during the outage");
    session.type_line("and another line");
    session.answer("typed during the outage");
    session.answer("and another line");
    let mut got = vec![0u8; "typed during the outage\r\n".len()];
    telnet
        .read_exact(&mut got)
        .expect("the line typed into the telnet session during the outage");
    assert_eq!(got, b"typed during the outage\r\n");
    let out = copy.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "scp through the outage failed: {}",
        stderr_of(&out)
    );
    assert_eq!(
        sha256(&std::fs::read(&dst).unwrap()),
        expect,
        "the copy arrived altered"
    );
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);

    // Everything carries on, on the connections it had.
    session.exchange("after the outage");
    type_line(&mut telnet, "AS terminal: HERE #1\r\n");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the controller saw its session cut and opened again"
    );
    let sshd_log = sshd.proc.log_text();
    assert_eq!(
        sshd_log.matches("Accepted publickey").count(),
        2,
        "sshd saw the session and the copy once each:\n{sshd_log}"
    );
    for name in ["culvert-connect", "culvertd"] {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
        assert!(
            !log.contains("reconnecting"),
            "{name} should ride out a 20 s outage on its connection:\n{log}"
        );
    }
    session.end();
    drop(path);
}
