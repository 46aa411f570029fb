//! Head-of-line blocking, end to end (culvert connect → culvert-relay → culvertd, real
//! processes): one tunnel connection's LAN target stops reading while another connection on
//! the same tunnel runs an exchange.
//!
//! - With culvert's flow-control extension (negotiated by relay, culvertd and culvert), the
//!   stalled connection stalls alone: the other one's 1 MiB echo completes while the first is
//!   still stuck.
//! - With the extension off (the relay started with `--no-flow-control`, so the tunnel behaves
//!   exactly as the AWS protocol does), the same stall freezes the whole tunnel: the other
//!   connection's bytes do not come back until the stalled target reads again.
//!
//! In both cases, once the target reads again, every byte of the stalled connection arrives in
//! order (checked by length and SHA-256) and the other connection's echo completes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use culvert_e2e::*;

/// Most bytes the stalled connection's writer offers; far more than every buffer on the path
/// (kernel socket buffers, queues) can hold, so the writer must block.
const STALL_MAX: usize = 512 * 1024 * 1024;
/// What the stalled target reads, once released: its count and SHA-256.
type Drained = mpsc::Receiver<(u64, String)>;

/// A LAN target that accepts one connection and reads nothing until `release` is set, then
/// reads to EOF and reports what it got.
fn stalled_target(release: Arc<AtomicBool>) -> (SocketAddr, Drained) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        while !release.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    ctx.update(&buf[..k]);
                    n += k as u64;
                }
            }
        }
        let hex: String = ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let _ = tx.send((n, hex));
    });
    (addr, rx)
}

/// The byte at offset `i` of the stalled connection's stream (a pattern, so nothing is kept).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

/// Write the pattern into `s` until `stop` or STALL_MAX, counting what was accepted.
fn bulk_writer(mut s: TcpStream, written: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while !stop.load(Ordering::SeqCst) && (off as usize) < STALL_MAX {
            for (k, b) in buf.iter_mut().enumerate() {
                *b = pattern(off + k as u64);
            }
            if s.write_all(&buf).is_err() {
                break;
            }
            off += buf.len() as u64;
            written.store(off, Ordering::SeqCst);
        }
        // EOF: the target reads to the end.
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Keep the socket until the tunnel has carried everything (dropping would reset it).
        let mut sink = [0u8; 16];
        let _ = s.read(&mut sink);
    });
}

fn pattern_sha256(n: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = (n - off).min(buf.len() as u64) as usize;
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(off + j as u64);
        }
        ctx.update(&buf[..k]);
        off += k as u64;
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Wait until the writer has made no progress for two seconds: the path is full and stalled.
/// Bounded: fails if the writer is still moving after a minute or reaches STALL_MAX.
fn wait_until_stalled(written: &AtomicU64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = written.load(Ordering::SeqCst);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = written.load(Ordering::SeqCst);
        assert!(
            (now as usize) < STALL_MAX,
            "the stalled connection's writer never blocked: {now} bytes went into a tunnel \
             whose target reads nothing (unbounded buffering somewhere on the path)"
        );
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_secs(2) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the writer kept moving for a minute"
        );
    }
}

struct Scenario {
    _relay: Relay,
    gw: Proc,
    px: Proc,
    fast: TcpStream,
    release: Arc<AtomicBool>,
    drained: Drained,
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    stalled_at: u64,
}

fn scenario(name: &str, relay_args: &[String]) -> Scenario {
    let dir = scratch(name);
    let release = Arc::new(AtomicBool::new(false));
    let (slow_target, drained) = stalled_target(release.clone());
    let echo = echo_server();
    let relay = Relay::start_with(&dir, "127.0.0.1:0".parse().unwrap(), relay_args);
    let t = relay.open_tunnel("plc-cell", &["SLOW", "FAST"]);
    let rules = rules(
        &dir,
        &[
            ("SLOW", slow_target.to_string()),
            ("FAST", echo.to_string()),
        ],
    );
    let gw = relay.gateway(&dir, &rules, &t.destination);
    let (px, ports) = relay.proxy(&dir, &t.source, &["SLOW", "FAST"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(
        echo_works(ports["FAST"], b"warm-up"),
        "no echo through the tunnel"
    );
    let flow_control = relay_args.is_empty();
    if flow_control {
        wait_log(&gw, "flow control on");
        wait_log(&px, "flow control on");
    }

    let slow = connect_local(ports["SLOW"]);
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    bulk_writer(slow, written.clone(), stop.clone());
    let stalled_at = wait_until_stalled(&written);
    println!("{name}: the SLOW connection's writer blocked after {stalled_at} bytes");
    let fast = connect_local(ports["FAST"]);
    Scenario {
        _relay: relay,
        gw,
        px,
        fast,
        release,
        drained,
        written,
        stop,
        stalled_at,
    }
}

impl Scenario {
    /// Release the target; every byte of the stalled connection must arrive, in order.
    fn release_and_check_stalled_connection(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release.store(true, Ordering::SeqCst);
        let (n, sha) = self
            .drained
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!(
                    "the released target did not get its data; culvertd's log:\n{}",
                    self.gw.log_text()
                )
            });
        let sent = self.written.load(Ordering::SeqCst);
        assert!(sent >= self.stalled_at);
        assert_eq!(n, sent, "the stalled connection lost or gained bytes");
        assert_eq!(
            sha,
            pattern_sha256(n),
            "the stalled connection's bytes changed"
        );
    }
}

#[test]
fn with_flow_control_a_stalled_target_does_not_hold_up_other_connections() {
    let mut s = scenario("flow-on", &[]);
    // While SLOW is stuck, FAST moves a megabyte both ways.
    let data = random_bytes(1024 * 1024);
    let fast = s.fast.try_clone().unwrap();
    let back = round_trip(fast, data.clone());
    assert!(back == data, "FAST's echo came back changed");
    assert_eq!(
        s.written.load(Ordering::SeqCst),
        s.stalled_at,
        "SLOW moved while its target read nothing"
    );
    s.fast.write_all(b"still here").unwrap();
    let mut b = [0u8; 10];
    s.fast.read_exact(&mut b).unwrap();
    s.release_and_check_stalled_connection();
}

#[test]
fn without_flow_control_the_same_stall_freezes_the_tunnel_as_in_aws() {
    let s = scenario("flow-off", &["--no-flow-control".to_string()]);
    assert!(!s.gw.log_text().contains("flow control on"));
    assert!(!s.px.log_text().contains("flow control on"));
    // The AWS protocol has no flow control: the stalled connection holds the whole session.
    let mut fast = s.fast.try_clone().unwrap();
    fast.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    fast.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    let frozen = fast.read_exact(&mut b).is_err();
    assert!(
        frozen,
        "FAST got its echo while SLOW's target read nothing: the tunnel is not the AWS protocol's"
    );
    // Released, the tunnel drains: FAST's echo arrives and SLOW's bytes are all there.
    let mut fast2 = s.fast.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        fast2
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut b = [0u8; 4];
        fast2.read_exact(&mut b).map(|_| b)
    });
    s.release_and_check_stalled_connection();
    let got = reader
        .join()
        .unwrap()
        .expect("FAST's echo after the release");
    assert_eq!(&got, b"ping");
}
