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
//! Needs root (namespaces, TUN devices) and iproute2; fails saying so otherwise.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
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
