//! `cargo run --release -p culvert-bench -- --wan [--seconds 8] [--rate-mbit 100]`: culvert over
//! an emulated WAN (`culvert-wanem`, devkit's `wan`: operator, relay and site namespaces), in
//! one run against plain TCP over the same links and against culvert with its flow-control
//! extension off. Needs root.
//!
//! First the emulator's own ceiling: plain TCP through both links with nothing added. Then, with
//! the rate capped, for each round trip (0, 50, 150 ms, with and without 1 % loss each way):
//! the throughput of one connection for `--seconds`, counted by what the sink at the site
//! received (it reports its count as it goes), and at 0 and 50 ms the 64-byte round trip, idle
//! and while a bulk transfer runs on another connection of the same route.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use culvert_devkit::wan::{SITE_IP, Wan};

/// A sink that reports, as 8 big-endian bytes, how much it has received so far, every 256 KiB.
fn progress_sink(ip: IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                let (mut total, mut reported) = (0u64, 0u64);
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                    if total - reported >= 256 * 1024 {
                        reported = total;
                        if s.write_all(&total.to_be_bytes()).is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Mbit/s delivered to the sink at `addr` by one connection writing for `secs` (or until
/// `stop`), counted up to the sink's last report.
fn timed_throughput(addr: SocketAddr, secs: f64, stop: Option<Arc<AtomicBool>>) -> f64 {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut r = s.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let last = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let seen = last.clone();
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        while r.read_exact(&mut b).is_ok() {
            seen.0.store(u64::from_be_bytes(b), Ordering::SeqCst);
            seen.1
                .store(start.elapsed().as_micros() as u64, Ordering::SeqCst);
        }
    });
    let mut w = s;
    let buf = vec![0x5au8; 64 * 1024];
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end && !stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
        if w.write_all(&buf).is_err() {
            break;
        }
    }
    // What is still in flight drains; the sink's last report comes within its read timeout.
    let _ = w.shutdown(std::net::Shutdown::Write);
    let _ = reader.join();
    let (bytes, at_us) = (last.0.load(Ordering::SeqCst), last.1.load(Ordering::SeqCst));
    if at_us == 0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / (at_us as f64 / 1e6) / 1e6
}

/// Median 64-byte round trip in ms through the echo at `addr`, over `count` exchanges.
fn round_trip_ms(addr: SocketAddr, count: usize) -> f64 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (msg, mut back) = ([7u8; 64], [0u8; 64]);
    let mut v = Vec::with_capacity(count);
    for i in 0..count + 3 {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).expect("echo");
        if i >= 3 {
            v.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The round trip while a bulk transfer runs on another connection of the same route.
fn round_trip_under_bulk_ms(sink: SocketAddr, echo: SocketAddr, count: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let bulk = std::thread::spawn(move || timed_throughput(sink, 120.0, Some(s2)));
    std::thread::sleep(Duration::from_secs(2)); // the bulk transfer fills its window first
    let rtt = round_trip_ms(echo, count);
    stop.store(true, Ordering::SeqCst);
    let _ = bulk.join();
    rtt
}

struct Route {
    name: &'static str,
    sink: SocketAddr,
    echo: SocketAddr,
}

pub fn run(bins: &Path, secs: f64, rate_mbit: u64) {
    let mut wan = Wan::start(bins, &["--queue", "512"]).unwrap_or_else(|e| crate::die(e));
    let site = wan.site.clone();
    let (sink, echo_addr) = Wan::within(&site, || {
        (
            progress_sink(IpAddr::V4(SITE_IP)),
            crate::echo_server_on(IpAddr::V4(SITE_IP)),
        )
    });
    let dir = std::env::temp_dir().join(format!("culvert-bench-wan-{}", std::process::id()));
    let services = [("SINK", sink), ("ECHO", echo_addr)];
    let op = wan.operator.clone();
    let in_op = |f: Box<dyn FnOnce() -> f64 + Send>| Wan::within(&op, f);

    let ceiling = in_op(Box::new(move || timed_throughput(sink, secs, None)));
    println!();
    println!("emulator ceiling (plain TCP through both links, nothing added): {ceiling:.0} Mbit/s");
    wan.control(&format!("rate {rate_mbit}"));
    println!(
        "rate cap {rate_mbit} Mbit/s each way per link, 512 KiB queue; one connection for {secs} s"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>16} {:>14} {:>14}",
        "round trip, loss", "plain TCP", "culvert", "culvert (no fc)", "vs plain TCP", "vs no fc"
    );
    let mut latency_rows = Vec::new();
    for (i, (rtt_ms, loss)) in [(0u64, 0.0), (50, 0.0), (150, 0.0), (50, 1.0), (150, 1.0)]
        .into_iter()
        .enumerate()
    {
        // Loss is per direction of the path: two link crossings.
        wan.set_rtt(Duration::from_millis(rtt_ms), loss / 2.0);
        // Sessions set up over this WAN, as they would be (their round-trip samples are of it).
        let port = 8443 + 2 * i as u16;
        let fc = wan
            .culvert_path(bins, &dir.join(format!("fc-{i}")), port, true, &services)
            .unwrap_or_else(|e| crate::die(e));
        let nofc = wan
            .culvert_path(
                bins,
                &dir.join(format!("nofc-{i}")),
                port + 1,
                false,
                &services,
            )
            .unwrap_or_else(|e| crate::die(e));
        let local = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let routes = [
            Route {
                name: "plain TCP",
                sink,
                echo: echo_addr,
            },
            Route {
                name: "culvert",
                sink: local(fc.ports["SINK"]),
                echo: local(fc.ports["ECHO"]),
            },
            Route {
                name: "culvert (no fc)",
                sink: local(nofc.ports["SINK"]),
                echo: local(nofc.ports["ECHO"]),
            },
        ];
        let tp: Vec<f64> = routes
            .iter()
            .map(|r| {
                let s = r.sink;
                in_op(Box::new(move || timed_throughput(s, secs, None)))
            })
            .collect();
        println!(
            "{:<22} {:>12.1} {:>12.1} {:>16.1} {:>13.2}× {:>13.2}×",
            format!("{rtt_ms} ms, {loss} % loss"),
            tp[0],
            tp[1],
            tp[2],
            tp[1] / tp[0].max(1e-9),
            tp[1] / tp[2].max(1e-9)
        );
        if loss == 0.0 && rtt_ms <= 50 {
            let count = if rtt_ms == 0 { 200 } else { 20 };
            for r in &routes {
                let (e, s) = (r.echo, r.sink);
                let idle = in_op(Box::new(move || round_trip_ms(e, count)));
                let bulk = in_op(Box::new(move || round_trip_under_bulk_ms(s, e, count)));
                latency_rows.push((rtt_ms, r.name, idle, bulk));
            }
        }
        drop((fc, nofc));
    }
    println!("64-byte round trip, idle and while a bulk transfer shares the route (p50, ms):");
    for (rtt, name, idle, bulk) in latency_rows {
        println!(
            "  {rtt:>3} ms  {name:<16} idle {idle:>8.2}   under bulk {bulk:>8.2}   ({:.2}× idle)",
            bulk / idle
        );
    }
    drop(wan);
    if std::env::var_os("CULVERT_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("logs kept in {}", dir.display());
    }
}
