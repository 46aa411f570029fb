//! `culvert-wanem`: a WAN between network namespaces, for culvert's tests and benchmark.
//!
//! This kernel has no netem, so the WAN is emulated in user space: for each link between two
//! existing namespaces, a TUN device in each, and the packets one side sends are read, held
//! and written into the other side's device, with
//!
//! - a one-way **delay** per link (each direction) and uniform **jitter** around it (packets
//!   keep their order, as on one path);
//! - random **loss** (a percentage, each packet alike);
//! - a **rate** cap per direction (serialisation at that rate) with a bounded **queue** in front
//!   of it: past it, packets are dropped (tail drop, as a router does);
//! - a **black hole**: every packet dropped, both ways, for N seconds (a WAN outage).
//!
//! ```text
//! culvert-wanem --link NS_A:NS_B:10.201.1 [--link ...] [--delay MS] [--jitter MS]
//!               [--loss PCT] [--rate MBIT] [--queue KB] [--mtu BYTES]
//! ```
//!
//! `--link A:B:P` puts `P.1` in namespace `A` and `P.2` in `B`, point to point. The namespaces
//! must exist (the caller creates and deletes them); the devices go when this program ends. It
//! prints `culvert-wanem: ready` once every link is up, then reads commands on stdin, one per
//! line, each answered `ok` (or `error: ...`): `delay MS`, `jitter MS`, `loss PCT`, `rate MBIT`
//! (0: no cap), `blackhole SECS`. End of stdin ends it.

use std::collections::VecDeque;
use std::io::{BufRead, Read, Write};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What every direction of every link applies, changed by commands on stdin.
#[derive(Clone, Copy, Debug)]
struct Impair {
    delay: Duration,
    jitter: Duration,
    /// 0.0 ..= 1.0
    loss: f64,
    /// Bytes per second; 0: no cap.
    rate: u64,
    /// Bytes waiting for the rate cap before packets are dropped.
    queue: u64,
    blackhole_until: Option<Instant>,
}

struct Link {
    a: String,
    b: String,
    prefix: String,
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("culvert-wanem: {msg}");
    std::process::exit(2)
}

fn ip(args: &[&str]) {
    match Command::new("ip").args(args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => die(format!("`ip {}` failed ({s})", args.join(" "))),
        Err(e) => die(format!(
            "cannot run `ip` ({e}): apt-get install iproute2 (and run as root)"
        )),
    }
}

fn parse_args() -> (Vec<Link>, Impair, u16) {
    let mut links = Vec::new();
    let mut imp = Impair {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
        rate: 0,
        queue: 1 << 20,
        blackhole_until: None,
    };
    let mut mtu = 1500u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| die(format!("{a} needs a value")))
        };
        match a.as_str() {
            "--link" => {
                let v = val();
                let parts: Vec<&str> = v.split(':').collect();
                let [a, b, prefix] = parts[..] else {
                    die(format!(
                        "--link {v}: expected NS_A:NS_B:PREFIX (e.g. op:relay:10.201.1)"
                    ))
                };
                links.push(Link {
                    a: a.into(),
                    b: b.into(),
                    prefix: prefix.into(),
                });
            }
            "--delay" => imp.delay = ms(&val()),
            "--jitter" => imp.jitter = ms(&val()),
            "--loss" => imp.loss = pct(&val()),
            "--rate" => imp.rate = mbit(&val()),
            "--queue" => imp.queue = num(&val()) * 1024,
            "--mtu" => mtu = num(&val()).clamp(576, 65_000) as u16,
            "-h" | "--help" => {
                println!(
                    "culvert-wanem --link NS_A:NS_B:PREFIX [--link ...] [--delay MS] [--jitter MS] [--loss PCT] [--rate MBIT] [--queue KB] [--mtu BYTES]"
                );
                std::process::exit(0)
            }
            other => die(format!("unknown argument {other} (see --help)")),
        }
    }
    if links.is_empty() {
        die("no --link given (see --help)");
    }
    (links, imp, mtu)
}

fn num(v: &str) -> u64 {
    v.parse()
        .unwrap_or_else(|_| die(format!("{v:?} is not a number")))
}

fn float(v: &str) -> f64 {
    v.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .unwrap_or_else(|| die(format!("{v:?} is not a non-negative number")))
}

fn ms(v: &str) -> Duration {
    Duration::from_secs_f64(float(v) / 1000.0)
}

fn pct(v: &str) -> f64 {
    (float(v) / 100.0).min(1.0)
}

fn mbit(v: &str) -> u64 {
    (float(v) * 1e6 / 8.0) as u64
}

/// A TUN device named `name`, moved into namespace `ns` with `addr` peer `peer`, up.
fn device(name: &str, ns: &str, addr: &str, peer: &str, mtu: u16) -> tun::Device {
    let mut config = tun::Configuration::default();
    config.tun_name(name).mtu(mtu);
    let dev = tun::create(&config).unwrap_or_else(|e| {
        die(format!(
            "cannot create TUN device {name} ({e}): needs root and /dev/net/tun"
        ))
    });
    ip(&["link", "set", name, "netns", ns]);
    ip(&["-n", ns, "addr", "add", addr, "peer", peer, "dev", name]);
    ip(&["-n", ns, "link", "set", name, "up"]);
    ip(&["-n", ns, "link", "set", "lo", "up"]);
    dev
}

/// Packets held for their time, in order, with their bytes counted for the queue bound.
#[derive(Default)]
struct Line {
    packets: VecDeque<(Instant, Vec<u8>)>,
    closed: bool,
}

/// One direction: read from `from`, impair, and write into `to` when due.
fn direction(
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    imp: Arc<Mutex<Impair>>,
    mtu: u16,
) {
    let line = Arc::new((Mutex::new(Line::default()), Condvar::new()));
    let writer_line = line.clone();
    std::thread::spawn(move || {
        let (lock, cv) = &*writer_line;
        loop {
            let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (due, pkt) = loop {
                if let Some((due, _)) = g.packets.front() {
                    let now = Instant::now();
                    if *due <= now {
                        break g.packets.pop_front().unwrap();
                    }
                    let wait = *due - now;
                    g = cv
                        .wait_timeout(g, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                } else if g.closed {
                    return;
                } else {
                    g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            };
            drop(g);
            let _ = due;
            // A packet the other side's kernel refuses (say, it went down) is lost, as on a
            // real link.
            let _ = to.write(&pkt);
        }
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; mtu as usize + 64];
        // When the rate-capped link is free again, and when the last packet is due (order).
        let (mut link_free, mut last_due) = (Instant::now(), Instant::now());
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = Instant::now();
            let imp = *imp.lock().unwrap_or_else(|p| p.into_inner());
            if imp.blackhole_until.is_some_and(|t| now < t) {
                continue;
            }
            if imp.loss > 0.0 && rand::random::<f64>() < imp.loss {
                continue;
            }
            let mut sent = now;
            if imp.rate > 0 {
                let start = link_free.max(now);
                let backlog = (start - now).as_secs_f64() * imp.rate as f64;
                if backlog > imp.queue as f64 {
                    continue; // tail drop
                }
                link_free = start + Duration::from_secs_f64(n as f64 / imp.rate as f64);
                sent = link_free;
            }
            let jitter = if imp.jitter.is_zero() {
                Duration::ZERO
            } else {
                imp.jitter.mul_f64(rand::random::<f64>() * 2.0)
            };
            let due = (sent + imp.delay.saturating_sub(imp.jitter) + jitter).max(last_due);
            last_due = due;
            let (lock, cv) = &*line;
            lock.lock()
                .unwrap_or_else(|p| p.into_inner())
                .packets
                .push_back((due, buf[..n].to_vec()));
            cv.notify_one();
        }
        let (lock, cv) = &*line;
        lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        cv.notify_one();
    });
}

fn main() {
    let (links, imp, mtu) = parse_args();
    let imp = Arc::new(Mutex::new(imp));
    let tag = std::process::id() % 100_000;
    for (i, l) in links.iter().enumerate() {
        let (na, nb) = (format!("wa{tag}l{i}"), format!("wb{tag}l{i}"));
        let (aa, ab) = (format!("{}.1", l.prefix), format!("{}.2", l.prefix));
        let a = device(&na, &l.a, &aa, &ab, mtu);
        let b = device(&nb, &l.b, &ab, &aa, mtu);
        let (ar, aw) = a.split();
        let (br, bw) = b.split();
        direction(ar, bw, imp.clone(), mtu);
        direction(br, aw, imp.clone(), mtu);
    }
    println!("culvert-wanem: ready");
    let _ = std::io::stdout().flush();
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let mut it = line.split_whitespace();
        let (Some(cmd), Some(v)) = (it.next(), it.next()) else {
            println!("error: expected COMMAND VALUE");
            continue;
        };
        let parsed = v.parse::<f64>().ok().filter(|f| f.is_finite() && *f >= 0.0);
        let Some(f) = parsed else {
            println!("error: {v:?} is not a non-negative number");
            continue;
        };
        let mut g = imp.lock().unwrap_or_else(|p| p.into_inner());
        match cmd {
            "delay" => g.delay = Duration::from_secs_f64(f / 1000.0),
            "jitter" => g.jitter = Duration::from_secs_f64(f / 1000.0),
            "loss" => g.loss = (f / 100.0).min(1.0),
            "rate" => g.rate = (f * 1e6 / 8.0) as u64,
            "blackhole" => {
                g.blackhole_until = Some(Instant::now() + Duration::from_secs_f64(f));
            }
            other => {
                println!("error: unknown command {other:?}");
                continue;
            }
        }
        drop(g);
        println!("ok");
        let _ = std::io::stdout().flush();
    }
}
