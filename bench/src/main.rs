//! `cargo run --release -p culvert-bench`: culvert against the tunnels people use today, in one
//! run on loopback. Routes measured side by side:
//! - **direct**: client → target (the baseline);
//! - **culvert**: client → `culvert connect` → `culvert-relay` → `culvertd` → target, TLS
//!   (WebSocket) on both hops, flow control on;
//! - **rathole (ws+tls)** and **rathole (tcp)**: `cargo install rathole` (crates.io), its
//!   server and client with the websocket+TLS transport and with plain TCP;
//! - **stunnel**: a client stunnel and a server stunnel (Debian's stunnel4), TLS between them;
//! - **ssh -L**: OpenSSH port forwarding to a throwaway sshd on loopback.
//!
//! For each: single-stream and 8-stream throughput (N bytes written, counted by a sink that
//! acknowledges the last byte, so buffering is not mistaken for delivery); 64-byte round trip
//! p50 / p99 (ping-pong against an echo server); the round trip of an interactive connection
//! while a bulk transfer runs through the same tunnel; the tool's processes' RSS idle and with
//! 1 000 idle connections; their CPU seconds per GB carried. Then culvert's scaling: aggregate
//! throughput at 1 / 8 / 64 / 512 concurrent connections. A tool that is not installed is
//! reported as such (with the command that installs it), not silently left out.
//!
//! Options: `--bytes N` (per throughput round, default 1 GiB), `--rounds N` (default 3, the
//! median is reported), `--pings N` (default 20000), `--only` (culvert and direct only),
//! `--no-flow-control` (culvert without its extension, as over AWS's relay),
//! `--max-idle-tunnels N` (default 9000; 0 skips the relay's idle-tunnel memory),
//! `--baseline DIR` (also measure the `culvert`, `culvert-relay` and `culvertd` binaries in DIR,
//! say an earlier commit's `target/release`, as route "culvert (baseline)", and report this
//! build's ratios to it).
//! The routes take turns, round by round (throughput, then round trips in `--rounds` slices), so
//! a slow minute of a shared machine is shared by all of them and same-run ratios stay fair.
//! Every loop is bounded by a count; nothing runs open-ended.
//!
//! `--instructions [--bytes N] [--baseline DIR]` counts instead, with callgrind, the CPU
//! instructions culvert's three processes spend per byte carried (see [`instructions`]).
//!
//! `--wan [--seconds S] [--rate-mbit R]` measures instead culvert over an emulated WAN (see
//! [`wan`]; needs root).
//!
//! `--cluster [--bytes N] [--rounds N] [--pings N]` measures instead the hop between two relay
//! nodes of a cluster: same-node against cross-node routes, in one run (see [`cluster`]).
//!
//! `--open-latency [--tunnels N]` measures instead, with the embedded MQTT broker, the time from
//! `culvert tunnel open` returning to the first byte echoed through a new connection of that
//! tunnel (the gateway learns of the tunnel only through its notification; the operator proxy
//! is started after the open returns, as an operator would), median and p95 over N tunnels
//! (default 20).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use culvert_devkit::KillOnDrop as Kill;

mod cluster;
mod wan;

/// Report and stop. Unwinds (rather than `exit`) so the `Kill` guards stop the children.
fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("culvert-bench: {msg}");
    std::panic::resume_unwind(Box::new(()))
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            let (num, mult) = match v.chars().last() {
                Some('G') => (&v[..v.len() - 1], 1 << 30),
                Some('M') => (&v[..v.len() - 1], 1 << 20),
                Some('K') => (&v[..v.len() - 1], 1 << 10),
                _ => (v.as_str(), 1),
            };
            num.parse::<u64>()
                .unwrap_or_else(|_| die(format!("{name} {v}: not a number")))
                * mult
        })
        .unwrap_or(default)
}

/// A sink: reads until it has `n` bytes (the first 8 bytes of the stream announce n), then
/// answers one byte.
fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut hdr = [0u8; 8];
                if s.read_exact(&mut hdr).is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(hdr);
                let mut buf = vec![0u8; 256 * 1024];
                while left > 0 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left = left.saturating_sub(n as u64),
                    }
                }
                let _ = s.write_all(b"!");
            });
        }
    });
    addr
}

fn echo_server() -> SocketAddr {
    echo_server_on([127, 0, 0, 1].into())
}

/// An echo server on `ip` (any free port).
fn echo_server_on(ip: std::net::IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Gbit/s for one transfer of `n` bytes to a sink reached at `port`.
fn throughput(port: u16, n: u64) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| die(e));
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    s.write_all(&n.to_be_bytes()).unwrap();
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k])
            .unwrap_or_else(|e| die(format!("write: {e}")));
        left -= k as u64;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)
        .unwrap_or_else(|e| die(format!("no acknowledgement: {e}")));
    (n as f64 * 8.0) / start.elapsed().as_secs_f64() / 1e9
}

/// (p50, p99) in µs of `count` 64-byte round trips through `port`.
/// Round trips before those [`latency`] counts.
const WARM_UP: usize = 1000;

/// `count` 64-byte round trips through `port` after a warm-up, in µs.
fn latency(port: u16, count: usize) -> Vec<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| die(e));
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + WARM_UP {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back)
            .unwrap_or_else(|e| die(format!("echo: {e}")));
        if i >= WARM_UP {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples
}

/// p50 and p99 of round-trip samples.
fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    (samples[n / 2], samples[n * 99 / 100])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The value after `name`, if given.
fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    match args.get(i + 1) {
        Some(v) => Some(v.clone()),
        None => die(format!("{name} needs a value")),
    }
}

/// Set by `--instructions`: where callgrind writes its counts.
static CALLGRIND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A command for one of culvert's long-running programs in `bins`: under callgrind with
/// `--instructions`, as itself otherwise.
fn program(bins: &Path, name: &str) -> Command {
    match CALLGRIND.get() {
        None => Command::new(bins.join(name)),
        Some(out) => {
            let mut c = Command::new("valgrind");
            // Valgrind counts every iteration of `rep stosb` / `rep movsb` as an instruction,
            // so glibc's ERMS memset and memcpy (which zero or copy a byte per iteration) would
            // dominate the counts out of all proportion to their cost: one 16 KiB read-buffer
            // clear in tungstenite counted as ~16 000 instructions. glibc's vector loops
            // instead (32 bytes an instruction) count about what the hardware does.
            c.env(
                "GLIBC_TUNABLES",
                "glibc.cpu.x86_rep_stosb_threshold=0xffffffff:glibc.cpu.x86_rep_movsb_threshold=0xffffffff",
            )
            .args(["--tool=callgrind", "--quiet"])
                .arg(format!(
                    "--callgrind-out-file={}/{name}.%p.callgrind",
                    out.display()
                ))
                .arg(bins.join(name));
            c
        }
    }
}

/// `--instructions`: the CPU instructions each of culvert's three processes spends per byte
/// carried, counted by callgrind (`valgrind`, Debian's package). Unlike seconds, instruction
/// counts do not depend on what else this shared machine is doing, so a build compared with
/// `--baseline` shows a change of a few percent that the timed rounds cannot resolve. Counters
/// are zeroed once the route is up (setup and TLS handshakes excluded), then `--bytes` (default
/// 64 MiB) go through once; the processes stop gracefully so callgrind writes its totals.
const ROUND_TRIPS: usize = 5000;

fn instructions() {
    culvert_devkit::require_tool("valgrind", "valgrind");
    culvert_devkit::require_tool("callgrind_control", "valgrind");
    let bytes = arg("--bytes", 64 << 20);
    let bins = build();
    let dir = std::env::temp_dir().join(format!("culvert-bench-insn-{}", std::process::id()));
    let sink = sink_server();
    let echo = echo_server();
    let mut sets = vec![("culvert", bins)];
    if let Some(base) = arg_str("--baseline") {
        sets.push(("culvert (baseline)", PathBuf::from(base)));
    }
    std::fs::create_dir_all(&dir).unwrap();
    let _ = CALLGRIND.set(dir.clone());
    let mut results = Vec::new();
    // One route after the other: each process's counts are in a file named by its pid.
    for (i, (name, bins)) in sets.iter().enumerate() {
        let out = dir.join(format!("route{i}"));
        let route = culvert_route(bins, &out, sink, echo, name, true);
        wait_route(name, route.sink);
        let control = |what: &str| {
            for pid in &route.pids {
                let ok = Command::new("callgrind_control")
                    .args([what, &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    die(format!("callgrind_control {what} {pid} failed"));
                }
            }
        };
        control("--zero");
        eprintln!("  {name}: {bytes} bytes, then {ROUND_TRIPS} round trips, under callgrind");
        throughput(route.sink, bytes);
        // The bulk transfer's counts go to a numbered file of their own; the round trips' are
        // in the one written at exit.
        control("--dump");
        latency(route.echo, ROUND_TRIPS);
        // SIGTERM and wait, so each writes its counts: proxy, gateway, then the relay (which
        // would otherwise give its connected peers their grace period).
        let Route { pids, _procs, .. } = route;
        let mut procs: Vec<Option<Kill>> = _procs.into_iter().map(Some).collect();
        for i in [0, 2, 1] {
            let _ = Command::new("kill")
                .args(["-TERM", &pids[i].to_string()])
                .status();
            if let Some(mut p) = procs[i].take() {
                let _ = p.0.wait();
            }
        }
        let total = |file: PathBuf| -> u64 {
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| die(format!("no callgrind output {}: {e}", file.display())));
            text.lines()
                .rev()
                .filter_map(|l| l.strip_prefix("totals: ").or(l.strip_prefix("summary: ")))
                .find_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or_else(|| die(format!("no totals in {}", file.display())))
        };
        // Proxy, relay, gateway, in the order of `pids`.
        let counts: Vec<(u64, u64)> = ["culvert", "culvert-relay", "culvertd"]
            .iter()
            .zip(&pids)
            .map(|(prog, pid)| {
                let base = format!("{prog}.{pid}.callgrind");
                (total(dir.join(format!("{base}.1"))), total(dir.join(base)))
            })
            .collect();
        results.push((*name, counts));
    }
    let table = |what: &str, per: f64, pick: fn(&(u64, u64)) -> u64| {
        println!();
        println!("instructions {what} (callgrind):");
        println!(
            "{:<20} {:>10} {:>14} {:>10} {:>10}",
            "route", "culvert", "culvert-relay", "culvertd", "all three"
        );
        for (name, c) in &results {
            let v: Vec<f64> = c.iter().map(|x| pick(x) as f64 / per).collect();
            println!(
                "{:<20} {:>10.2} {:>14.2} {:>10.2} {:>10.2}",
                name,
                v[0],
                v[1],
                v[2],
                v.iter().sum::<f64>()
            );
        }
        if let [(_, now), (_, base)] = &results[..] {
            let r = |i: usize| pick(&now[i]) as f64 / pick(&base[i]) as f64;
            let all = now.iter().map(pick).sum::<u64>() as f64
                / base.iter().map(pick).sum::<u64>() as f64;
            println!(
                "this build vs the baseline: culvert {:.3}×   culvert-relay {:.3}×   culvertd {:.3}×   all three {all:.3}×",
                r(0),
                r(1),
                r(2)
            );
        }
    };
    table(&format!("per byte of {bytes} carried"), bytes as f64, |c| {
        c.0
    });
    let trips = ROUND_TRIPS + WARM_UP;
    table(
        &format!("per 64-byte round trip ({trips})"),
        trips as f64,
        |c| c.1,
    );
    println!();
    println!(
        "callgrind's files (for callgrind_annotate; .1: the bulk transfer) are in {}",
        dir.display()
    );
}

fn build() -> PathBuf {
    culvert_devkit::build_binaries(&[]).unwrap_or_else(|e| die(e))
}

/// One way from a client to the sink and echo servers, and the processes that carry it.
struct Route {
    name: &'static str,
    sink: u16,
    echo: u16,
    pids: Vec<u32>,
    _procs: Vec<Kill>,
    _sshd: Option<culvert_devkit::Sshd>,
}

impl Route {
    /// The baseline: the client straight to the sink and echo servers.
    fn direct(sink: SocketAddr, echo: SocketAddr) -> Route {
        Route {
            name: "direct",
            sink: sink.port(),
            echo: echo.port(),
            pids: vec![],
            _procs: vec![],
            _sshd: None,
        }
    }
}

/// What was measured on one route.
#[derive(Default)]
struct Figures {
    tp1: f64,
    tp8: f64,
    p50: f64,
    p99: f64,
    bulk_p50: f64,
    rss_idle_kb: u64,
    rss_1000_kb: u64,
    /// culvertd alone (culvert's route).
    gw_idle_kb: u64,
    gw_1000_kb: u64,
    cpu_s_per_gb: f64,
}

/// culvertd's RSS on culvert's routes (its pids are proxy, relay, gateway); 0 elsewhere.
fn gateway_rss(r: &Route) -> u64 {
    if r.name.starts_with("culvert") {
        rss_kb(&r.pids[2..3])
    } else {
        0
    }
}

/// `pids` and all their descendants now alive.
fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        parent.push((pid, ppid));
    }
    let mut all = pids.to_vec();
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        all.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    all
}

/// Sum of VmRSS (KiB) over `pids` and their descendants.
fn rss_kb(pids: &[u32]) -> u64 {
    with_descendants(pids)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// CPU seconds (user + system, all threads) used so far by `pids` and their descendants.
fn cpu_s(pids: &[u32]) -> f64 {
    let ticks: u64 = with_descendants(pids)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / 100.0
}

/// Aggregate Gbit/s of `streams` concurrent transfers of `n / streams` bytes each.
fn throughput_n(port: u16, n: u64, streams: usize) -> f64 {
    let each = (n / streams as u64).max(1);
    let start = Instant::now();
    let threads: Vec<_> = (0..streams)
        .map(|_| std::thread::spawn(move || throughput(port, each)))
        .collect();
    for t in threads {
        let _ = t.join();
    }
    (each * streams as u64) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// 64-byte round trips through `echo` while a bulk transfer runs to `sink` on the same route.
fn latency_under_bulk(sink: u16, echo: u16, pings: usize) -> Vec<f64> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let bulk = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", sink)).unwrap_or_else(|e| die(e));
        let _ = s.write_all(&u64::MAX.to_be_bytes());
        let buf = vec![0x5au8; 256 * 1024];
        // Bounded: at most 1 TiB, and it stops as soon as the pings are done.
        for _ in 0..(1u64 << 22) {
            if flag.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = latency(echo, pings);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = bulk.join();
    r
}

/// Open `n` connections to `echo`, each carrying one byte there and back; returns them.
fn idle_connections(echo: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", echo))
                .unwrap_or_else(|e| die(format!("idle connection {i}: {e}")));
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut b = [0u8; 1];
            s.write_all(b"i").unwrap();
            s.read_exact(&mut b)
                .unwrap_or_else(|e| die(format!("idle connection {i}: {e}")));
            s
        })
        .collect()
}

/// Wait until a 1 KiB transfer through `port` is acknowledged (the route is up).
fn wait_route(name: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = std::panic::catch_unwind(|| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(&1024u64.to_be_bytes()).ok()?;
            s.write_all(&[0u8; 1024]).ok()?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).ok()
        });
        if matches!(ok, Ok(Some(()))) {
            return;
        }
        if Instant::now() > deadline {
            die(format!("{name}: the route did not come up"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Kill {
    Kill(
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| die(format!("{name}: {e}"))),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--wan") {
        let bins = culvert_devkit::build_binaries(&["culvert-devkit"]).unwrap_or_else(|e| die(e));
        let secs = arg("--seconds", 8).max(1) as f64;
        return wan::run(&bins, secs, arg("--rate-mbit", 100).max(1));
    }
    if std::env::args().any(|a| a == "--open-latency") {
        return open_latency(arg("--tunnels", 20).max(2) as usize);
    }
    if std::env::args().any(|a| a == "--instructions") {
        return instructions();
    }
    if std::env::args().any(|a| a == "--cluster") {
        return cluster::main(&build());
    }
    let bytes = arg("--bytes", 1 << 30);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let pings = arg("--pings", 20_000).max(100) as usize;
    let only_culvert = std::env::args().any(|a| a == "--only");
    let bins = build();
    let dir = std::env::temp_dir().join(format!("culvert-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sink = sink_server();
    let echo = echo_server();

    let mut routes = vec![Route::direct(sink, echo)];
    let mut missing: Vec<String> = Vec::new();
    let flow_control = !std::env::args().any(|a| a == "--no-flow-control");
    routes.push(culvert_route(
        &bins,
        &dir,
        sink,
        echo,
        "culvert",
        flow_control,
    ));
    if flow_control {
        // The same path with the extension off (the AWS protocol as it is), for the same-run
        // ratio of what flow control costs or buys.
        routes.push(culvert_route(
            &bins,
            &dir.join("no-flow-control"),
            sink,
            echo,
            "culvert (no fc)",
            false,
        ));
    }
    if let Some(base) = arg_str("--baseline") {
        let base = PathBuf::from(base);
        for b in ["culvert", "culvert-relay", "culvertd"] {
            if !base.join(b).is_file() {
                die(format!("--baseline {}: no {b} there", base.display()));
            }
        }
        routes.push(culvert_route(
            &base,
            &dir.join("baseline"),
            sink,
            echo,
            "culvert (baseline)",
            flow_control,
        ));
    }
    if !only_culvert {
        for r in [
            rathole_route(&dir, sink, echo, true),
            rathole_route(&dir, sink, echo, false),
            stunnel_route(&dir, sink, echo),
            ssh_route(&dir, sink, echo),
        ] {
            match r {
                Ok(r) => routes.push(r),
                Err(e) => missing.push(e),
            }
        }
    }
    for r in &routes {
        wait_route(r.name, r.sink);
    }

    eprintln!(
        "measuring {} route(s): {rounds} round(s) of {bytes} bytes, {pings} pings …",
        routes.len()
    );
    // Memory first, before any bulk traffic has grown the processes' heaps.
    let mut memory = Vec::new();
    for r in &routes {
        let rss_idle_kb = rss_kb(&r.pids);
        let gw_idle_kb = gateway_rss(r);
        let idle = idle_connections(r.echo, 1000);
        std::thread::sleep(Duration::from_millis(500));
        memory.push((rss_idle_kb, gw_idle_kb, rss_kb(&r.pids), gateway_rss(r)));
        drop(idle);
    }
    std::thread::sleep(Duration::from_millis(500));
    // Rounds take turns between the routes, so a slower minute of this shared machine falls on
    // all of them alike rather than on whichever route was measuring (same-run ratios stay fair).
    let n = routes.len();
    let (mut tp1, mut tp8, mut cpu) = (vec![vec![]; n], vec![vec![]; n], vec![0.0; n]);
    for round in 0..rounds {
        eprintln!("  round {}/{rounds}", round + 1);
        for (i, r) in routes.iter().enumerate() {
            let cpu0 = cpu_s(&r.pids);
            tp1[i].push(throughput(r.sink, bytes));
            cpu[i] += cpu_s(&r.pids) - cpu0;
            tp8[i].push(throughput_n(r.sink, bytes, 8));
        }
    }
    // Round trips too, in turns: idle, then under a bulk transfer.
    let (mut idle_rtt, mut bulk_rtt) = (vec![vec![]; n], vec![vec![]; n]);
    eprintln!("  round trips");
    for _ in 0..rounds {
        for (i, r) in routes.iter().enumerate() {
            idle_rtt[i].extend(latency(r.echo, pings.div_ceil(rounds)));
            bulk_rtt[i].extend(latency_under_bulk(
                r.sink,
                r.echo,
                (pings / 10).max(100).div_ceil(rounds),
            ));
        }
    }
    let mut figures = Vec::new();
    for i in 0..n {
        let (p50, p99) = percentiles(std::mem::take(&mut idle_rtt[i]));
        let (bulk_p50, _) = percentiles(std::mem::take(&mut bulk_rtt[i]));
        let (rss_idle_kb, gw_idle_kb, rss_1000_kb, gw_1000_kb) = memory[i];
        figures.push(Figures {
            tp1: median(std::mem::take(&mut tp1[i])),
            tp8: median(std::mem::take(&mut tp8[i])),
            p50,
            p99,
            bulk_p50,
            rss_idle_kb,
            rss_1000_kb,
            gw_idle_kb,
            gw_1000_kb,
            cpu_s_per_gb: cpu[i] / (rounds as f64 * bytes as f64 / 1e9),
        });
    }
    // culvert's own pieces, idle, and its scaling.
    let culvert = &routes[1];
    let scaling: Vec<(usize, f64)> = [1usize, 8, 64, 512]
        .iter()
        .map(|&n| {
            (
                n,
                throughput_n(culvert.sink, bytes.max(n as u64 * 1024 * 1024), n),
            )
        })
        .collect();
    eprintln!("  relay idle tunnels");
    let max_idle = arg("--max-idle-tunnels", 9000) as usize;
    let mut idle_steps: Vec<usize> = [100usize, 1000, max_idle]
        .into_iter()
        .filter(|&n| n > 0 && n <= max_idle)
        .collect();
    idle_steps.dedup();
    let idle = relay_idle(&bins, &dir, &idle_steps);

    println!();
    println!(
        "{} bytes per throughput round, median of {rounds}; {pings} pings",
        bytes
    );
    println!(
        "{:<18} {:>10} {:>10} {:>9} {:>9} {:>11} {:>10} {:>11} {:>8}",
        "route",
        "1-str Gb/s",
        "8-str Gb/s",
        "p50 µs",
        "p99 µs",
        "bulk p50 µs",
        "RSS idle",
        "RSS +1000c",
        "CPU s/GB"
    );
    for (r, f) in routes.iter().zip(&figures) {
        let rss = |kb: u64| {
            if r.pids.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1} MB", kb as f64 / 1024.0)
            }
        };
        let cpu = if r.pids.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", f.cpu_s_per_gb)
        };
        println!(
            "{:<18} {:>10.2} {:>10.2} {:>9.1} {:>9.1} {:>11.1} {:>10} {:>11} {:>8}",
            r.name,
            f.tp1,
            f.tp8,
            f.p50,
            f.p99,
            f.bulk_p50,
            rss(f.rss_idle_kb),
            rss(f.rss_1000_kb),
            cpu
        );
    }
    for m in &missing {
        println!("{m}");
    }
    println!();
    let c = &figures[1];
    let ratio = |name: &str, f: &dyn Fn(&Figures) -> f64| {
        routes
            .iter()
            .zip(&figures)
            .find(|(r, _)| r.name == name)
            .map(|(_, other)| f(c) / f(other))
    };
    println!("culvert ratios (same run):");
    if let Some(cpu) = ratio("culvert (baseline)", &|f| f.cpu_s_per_gb) {
        let (t1, t8) = (
            ratio("culvert (baseline)", &|f| f.tp1).unwrap_or_default(),
            ratio("culvert (baseline)", &|f| f.tp8).unwrap_or_default(),
        );
        let (l, l99, lb) = (
            ratio("culvert (baseline)", &|f| f.p50).unwrap_or_default(),
            ratio("culvert (baseline)", &|f| f.p99).unwrap_or_default(),
            ratio("culvert (baseline)", &|f| f.bulk_p50).unwrap_or_default(),
        );
        println!(
            "  this build vs the baseline: 1-stream {t1:.2}×   8-stream {t8:.2}×   p50 {l:.2}×   p99 {l99:.2}×   p50 under bulk {lb:.2}×   CPU per GB {cpu:.2}×"
        );
    }
    for name in [
        "direct",
        "culvert (no fc)",
        "rathole (ws+tls)",
        "rathole (tcp)",
        "stunnel",
        "ssh -L",
    ] {
        if let (Some(t1), Some(t8), Some(l)) = (
            ratio(name, &|f| f.tp1),
            ratio(name, &|f| f.tp8),
            ratio(name, &|f| f.p50),
        ) {
            println!(
                "  vs {name:<17} 1-stream {t1:>5.2}×   8-stream {t8:>5.2}×   p50 round trip {l:>5.2}×"
            );
        }
    }
    println!(
        "  interactive round trip under bulk: {:.2}× its idle p50",
        c.bulk_p50 / c.p50
    );
    println!(
        "  RSS: culvertd {:.1} MB idle, +{:.1} KB per idle connection; culvert's three processes {:.1} MB idle, +{:.1} KB per idle connection",
        c.gw_idle_kb as f64 / 1024.0,
        c.gw_1000_kb.saturating_sub(c.gw_idle_kb) as f64 / 1000.0,
        c.rss_idle_kb as f64 / 1024.0,
        c.rss_1000_kb.saturating_sub(c.rss_idle_kb) as f64 / 1000.0
    );
    println!("culvert scaling (aggregate Gbit/s by concurrent connections):");
    for (n, tp) in scaling {
        println!("  {n:>4} connections: {tp:.2}");
    }
    println!("culvert-relay RSS with idle tunnels (both sides connected):");
    for (n, kb) in &idle {
        println!(
            "  {n:>6} tunnels: {:>8.1} MB  ({:.1} KB per tunnel)",
            *kb as f64 / 1024.0,
            *kb as f64 / *n as f64
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// culvert's full path: relay, culvertd and culvert connect, one tunnel with SINK and ECHO.
fn culvert_route(
    bins: &Path,
    dir: &Path,
    sink: SocketAddr,
    echo: SocketAddr,
    name: &'static str,
    flow_control: bool,
) -> Route {
    std::fs::create_dir_all(dir).unwrap();
    let (relay, env) = start_relay_with(bins, dir, flow_control);
    let (mut route, _) = tunnel_route(bins, dir, &env, &env, sink, echo, name);
    route.pids.insert(1, relay.0.id());
    route._procs.push(relay);
    route
}

/// A tunnel with SINK and ECHO through relays already running: `culvertd` on the relay
/// `gw_env` names (which also opens the tunnel), `culvert connect` on the one `px_env` names.
/// Its pids are proxy and gateway; also returns the tunnel's id.
#[allow(clippy::too_many_arguments)]
fn tunnel_route(
    bins: &Path,
    dir: &Path,
    gw_env: &[(String, String)],
    px_env: &[(String, String)],
    sink: SocketAddr,
    echo: SocketAddr,
    name: &'static str,
) -> (Route, String) {
    std::fs::create_dir_all(dir).unwrap();
    let env = gw_env;
    let t = open_tunnel(bins, env, "bench", "SINK,ECHO");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        // 1 000 idle connections and 512 concurrent ones in this one tunnel: above the default
        // per-tunnel limit (256).
        format!("[acl]\nallow = [\"127.0.0.0/8\"]\n[tunnel_limits]\nmax_connections = 2048\n[services.SINK]\ntarget = \"{sink}\"\n[services.ECHO]\ntarget = \"{echo}\"\n"),
    )
    .unwrap();
    let gw = Kill(
        program(bins, "culvertd")
            .arg("--config")
            .arg(&rules)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "CULVERT_DESTINATION_TOKEN",
                t["destinationAccessToken"].as_str().unwrap(),
            )
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap_or_else(|e| die(e)),
    );
    let mut px = Kill(
        program(bins, "culvert")
            .envs(px_env.iter().map(|(k, v)| (k, v)))
            .args(["connect", "-s", "SINK=0,ECHO=0"])
            .env(
                "CULVERT_ACCESS_TOKEN",
                t["sourceAccessToken"].as_str().unwrap(),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| die(e)),
    );
    let mut ports = std::collections::HashMap::new();
    for line in BufReader::new(px.0.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(rest) = line.strip_prefix("culvert: service ") {
            let mut it = rest.split_whitespace();
            let name = it.next().unwrap().to_owned();
            let port: u16 = it
                .last()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            ports.insert(name, port);
        }
        if ports.len() == 2 {
            break;
        }
    }
    let route = Route {
        name,
        sink: ports["SINK"],
        echo: ports["ECHO"],
        pids: vec![px.0.id(), gw.0.id()],
        _sshd: None,
        _procs: vec![px, gw],
    };
    (route, t["tunnelId"].as_str().unwrap_or_default().to_owned())
}

/// A self-signed certificate for "localhost" (cert.pem, key.pem, identity.pfx) made with openssl.
fn self_signed(dir: &Path) -> Result<(), String> {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("openssl: {e} (apt-get install openssl)"))
            .and_then(|s| {
                s.success()
                    .then_some(())
                    .ok_or_else(|| format!("openssl {} failed", args[0]))
            })
    };
    if dir.join("identity.pfx").exists() {
        return Ok(());
    }
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ])?;
    run(&[
        "pkcs12",
        "-export",
        "-out",
        "identity.pfx",
        "-inkey",
        "key.pem",
        "-in",
        "cert.pem",
        "-passout",
        "pass:bench",
    ])
}

/// rathole's server and client (`cargo install rathole`), websocket+TLS or plain TCP transport.
fn rathole_route(
    dir: &Path,
    sink: SocketAddr,
    echo: SocketAddr,
    ws: bool,
) -> Result<Route, String> {
    let name = if ws {
        "rathole (ws+tls)"
    } else {
        "rathole (tcp)"
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/rathole/bin/rathole");
    let bin = if root.exists() {
        root
    } else {
        which("rathole").ok_or_else(|| {
            format!(
                "{name}: not measured: rathole is not installed (cargo install rathole --root target/tools/rathole; needs apt-get install libssl-dev pkg-config)"
            )
        })?
    };
    let d = dir.join(if ws { "rathole-ws" } else { "rathole-tcp" });
    std::fs::create_dir_all(&d).unwrap();
    self_signed(&d)?;
    let (control, sink_port, echo_port) = (
        culvert_devkit::free_port(),
        culvert_devkit::free_port(),
        culvert_devkit::free_port(),
    );
    let (server_transport, client_transport) = if ws {
        (
            format!(
                "[server.transport]\ntype = \"websocket\"\n[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n[server.transport.websocket]\ntls = true\n",
                d.join("identity.pfx").display()
            ),
            format!(
                "[client.transport]\ntype = \"websocket\"\n[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n[client.transport.websocket]\ntls = true\n",
                d.join("cert.pem").display()
            ),
        )
    } else {
        (
            "[server.transport]\ntype = \"tcp\"\n".to_string(),
            "[client.transport]\ntype = \"tcp\"\n".to_string(),
        )
    };
    std::fs::write(
        d.join("server.toml"),
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n{server_transport}\
             [server.services.sink]\nbind_addr = \"127.0.0.1:{sink_port}\"\n\
             [server.services.echo]\nbind_addr = \"127.0.0.1:{echo_port}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("client.toml"),
        format!(
            "[client]\nremote_addr = \"localhost:{control}\"\ndefault_token = \"bench\"\n{client_transport}\
             [client.services.sink]\nlocal_addr = \"{sink}\"\n[client.services.echo]\nlocal_addr = \"{echo}\"\n"
        ),
    )
    .unwrap();
    two_process_route(
        name,
        Command::new(&bin)
            .arg("--server")
            .arg(d.join("server.toml"))
            .env("RUST_LOG", "error"),
        Command::new(&bin)
            .arg("--client")
            .arg(d.join("client.toml"))
            .env("RUST_LOG", "error"),
        &d,
        (sink_port, echo_port),
    )
}

/// A route carried by a tool's server and client processes (logs `server.log`, `client.log` in
/// `dir`), entered at `ports` (sink, echo).
fn two_process_route(
    name: &'static str,
    server: &mut Command,
    client: &mut Command,
    dir: &Path,
    ports: (u16, u16),
) -> Result<Route, String> {
    let server = spawn(name, server, &dir.join("server.log"));
    // The client connects to the server: give it a moment to listen (the route is then
    // waited for end to end before anything is measured).
    std::thread::sleep(Duration::from_millis(300));
    let client = spawn(name, client, &dir.join("client.log"));
    Ok(Route {
        name,
        sink: ports.0,
        echo: ports.1,
        pids: vec![server.0.id(), client.0.id()],
        _sshd: None,
        _procs: vec![server, client],
    })
}

/// A client stunnel accepting plaintext, TLS to a server stunnel that connects to the targets.
fn stunnel_route(dir: &Path, sink: SocketAddr, echo: SocketAddr) -> Result<Route, String> {
    let bin = which("stunnel4")
        .or_else(|| which("stunnel"))
        .ok_or("stunnel: not measured: not installed (apt-get install stunnel4)")?;
    let d = dir.join("stunnel");
    std::fs::create_dir_all(&d).unwrap();
    self_signed(&d)?;
    let (tls_sink, tls_echo, sink_port, echo_port) = (
        culvert_devkit::free_port(),
        culvert_devkit::free_port(),
        culvert_devkit::free_port(),
        culvert_devkit::free_port(),
    );
    let common = "foreground = yes\npid =\nsyslog = no\ndebug = 3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    std::fs::write(
        d.join("server.conf"),
        format!(
            "{common}cert = {c}\nkey = {k}\n[sink]\naccept = 127.0.0.1:{tls_sink}\nconnect = {sink}\n[echo]\naccept = 127.0.0.1:{tls_echo}\nconnect = {echo}\n",
            c = d.join("cert.pem").display(),
            k = d.join("key.pem").display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("client.conf"),
        format!(
            "{common}client = yes\n[sink]\naccept = 127.0.0.1:{sink_port}\nconnect = 127.0.0.1:{tls_sink}\n[echo]\naccept = 127.0.0.1:{echo_port}\nconnect = 127.0.0.1:{tls_echo}\n"
        ),
    )
    .unwrap();
    two_process_route(
        "stunnel",
        Command::new(&bin).arg(d.join("server.conf")),
        Command::new(&bin).arg(d.join("client.conf")),
        &d,
        (sink_port, echo_port),
    )
}

/// `ssh -N -L` to a throwaway sshd on loopback (the test harness's), both ports in one session.
fn ssh_route(dir: &Path, sink: SocketAddr, echo: SocketAddr) -> Result<Route, String> {
    let (Some(ssh), true) = (which("ssh"), Path::new("/usr/sbin/sshd").exists()) else {
        return Err(
            "ssh -L: not measured: OpenSSH is not installed (apt-get install openssh-server openssh-client)"
                .into(),
        );
    };
    let d = dir.join("ssh");
    std::fs::create_dir_all(&d).unwrap();
    let sshd = culvert_devkit::Sshd::start(&d);
    let (sink_port, echo_port) = (culvert_devkit::free_port(), culvert_devkit::free_port());
    let client = spawn(
        "ssh",
        Command::new(ssh)
            .args(sshd.client_opts())
            .args(["-N", "-p", &sshd.port.to_string()])
            .args(["-L", &format!("127.0.0.1:{sink_port}:{sink}")])
            .args(["-L", &format!("127.0.0.1:{echo_port}:{echo}")])
            .arg(format!("{}@127.0.0.1", culvert_devkit::Sshd::user())),
        &d.join("ssh.log"),
    );
    // sshd forks a process per session: it is counted as a descendant of the listener.
    let server_pid = sshd.proc.child.id();
    Ok(Route {
        name: "ssh -L",
        sink: sink_port,
        echo: echo_port,
        pids: vec![client.0.id(), server_pid],
        _procs: vec![client],
        _sshd: Some(sshd),
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// A dev relay in `dir/relay`, and the client settings it wrote.
/// `culvert --json tunnel open` against the relay `env` points to: the tunnel's JSON.
fn open_tunnel(
    bins: &Path,
    env: &[(String, String)],
    thing: &str,
    services: &str,
) -> serde_json::Value {
    let o = Command::new(bins.join("culvert"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args([
            "--json",
            "tunnel",
            "open",
            "--thing",
            thing,
            "--service",
            services,
        ])
        .output()
        .unwrap_or_else(|e| die(e));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| die(String::from_utf8_lossy(&o.stderr)))
}

/// `culvert-relay` as the bench runs it: quiet, and without flow control if the bench is.
fn relay_command(bins: &Path) -> Command {
    relay_command_with(bins, !std::env::args().any(|a| a == "--no-flow-control"))
}

fn relay_command_with(bins: &Path, flow_control: bool) -> Command {
    let mut c = program(bins, "culvert-relay");
    c.args((!flow_control).then_some("--no-flow-control"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    c
}

fn start_relay(bins: &Path, dir: &Path) -> (Kill, Vec<(String, String)>) {
    start_relay_with(
        bins,
        dir,
        !std::env::args().any(|a| a == "--no-flow-control"),
    )
}

fn start_relay_with(bins: &Path, dir: &Path, flow_control: bool) -> (Kill, Vec<(String, String)>) {
    let relay = Kill(
        relay_command_with(bins, flow_control)
            .args(["--dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join("relay"))
            .spawn()
            .unwrap_or_else(|e| die(e)),
    );
    (relay, env_of(&dir.join("relay/client.env")))
}

/// A relay for thousands of tunnels from one address: `--dev` generates the CA, certificate and
/// API key, then the relay restarts from a configuration file that lifts the per-source connection
/// limits (they protect a public relay; here every tunnel comes from 127.0.0.1).
fn start_relay_unlimited(bins: &Path, dir: &Path) -> (Kill, Vec<(String, String)>) {
    let (dev, mut env) = start_relay(bins, dir);
    drop(dev);
    let port = culvert_devkit::free_port();
    let config = dir.join("relay.toml");
    let d = dir.join("relay");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = {state:?}\napi_key_file = {key:?}\n\
             [tls]\ncert = {cert:?}\nkey = {tls_key:?}\n\
             [limits]\nmax_connections_per_source = 100000\nmax_handshakes_per_source = 512\n\
             [mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n",
            state = d,
            key = d.join("api-key"),
            cert = d.join("server.pem"),
            tls_key = d.join("server-key.pem"),
            mqtt = culvert_devkit::free_port(),
        ),
    )
    .unwrap();
    let relay = Kill(
        relay_command(bins)
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap_or_else(|e| die(e)),
    );
    for (k, v) in &mut env {
        if k == "CULVERT_RELAY" {
            *v = format!("127.0.0.1:{port}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            die("the relay did not start from its configuration file");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (relay, env)
}

fn env_of(file: &Path) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Vec<(String, String)> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if v.len() >= 3 {
            return v;
        }
        if Instant::now() > deadline {
            die("the relay did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Open → first byte through the tunnel, with the gateway notified over the embedded broker.
fn open_latency(tunnels: usize) {
    let bins = build();
    let dir = std::env::temp_dir().join(format!("culvert-bench-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let echo = echo_server();
    let (_relay, env) = start_relay(&bins, &dir);
    let mqtt = env
        .iter()
        .find(|(k, _)| k == "CULVERT_MQTT")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| die("the relay runs no embedded broker"));
    let culvert = || {
        let mut c = Command::new(bins.join("culvert"));
        c.envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn");
        c
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let out = culvert().arg("--json").args(args).output().unwrap();
        if !out.status.success() {
            die(String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| die(e))
    };
    let dev = json(&["device", "add", "--thing", "bench-gw"]);
    let rules = dir.join("gw.toml");
    std::fs::write(
        &rules,
        format!(
            "[acl]\nallow = [\"127.0.0.0/8\"]\n[mqtt]\nbroker = \"mqtts://{mqtt}\"\nthing_name = \"bench-gw\"\npassword = \"{}\"\n\n[services.ECHO]\ntarget = \"{echo}\"\n",
            dev["password"].as_str().unwrap_or_default()
        ),
    )
    .unwrap();
    let gw_log = dir.join("culvertd.log");
    let _gw = Kill(
        Command::new(bins.join("culvertd"))
            .arg("--config")
            .arg(&rules)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&gw_log).unwrap())
            .spawn()
            .unwrap_or_else(|e| die(e)),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&gw_log)
        .unwrap_or_default()
        .contains("connected to MQTT broker")
    {
        if Instant::now() > deadline {
            die("culvertd did not reach the broker");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    eprintln!("measuring open → first byte over {tunnels} tunnels …");
    let mut samples = Vec::new();
    for i in 0..tunnels {
        let t = json(&["tunnel", "open", "--thing", "bench-gw", "--service", "ECHO"]);
        let t0 = Instant::now();
        let mut px = Kill(
            culvert()
                .args(["connect", "-s", "ECHO=0"])
                .env(
                    "CULVERT_ACCESS_TOKEN",
                    t["sourceAccessToken"].as_str().unwrap(),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        BufReader::new(px.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| die(&line));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = TcpStream::connect(("127.0.0.1", port))
                .ok()
                .is_some_and(|mut s| {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut b = [0u8; 1];
                    s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok()
                });
            if ok {
                break;
            }
            if Instant::now() > deadline {
                die(format!("tunnel {i} never carried a byte"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        json(&["tunnel", "close", t["tunnelId"].as_str().unwrap()]);
    }
    samples.sort_by(f64::total_cmp);
    let p95 = samples[((samples.len() as f64 * 0.95).ceil() as usize).min(samples.len()) - 1];
    println!();
    println!(
        "open → first byte through a new tunnel (embedded MQTT broker, {} tunnels)",
        samples.len()
    );
    println!(
        "  median {:.1} ms   p95 {:.1} ms   min {:.1} ms   max {:.1} ms",
        samples[samples.len() / 2],
        p95,
        samples[0],
        samples[samples.len() - 1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Relay RSS with `steps` idle tunnels, both sides connected (cumulative). Tunnels are opened
/// through the CLI (8 at a time) and held by WebSocket clients in this process, which ping
/// every 20 s as culvert and the localproxy do.
fn relay_idle(bins: &Path, dir: &Path, steps: &[usize]) -> Vec<(usize, u64)> {
    use culvert_protocol::Mode;
    use culvert_protocol::client::{self, ConnectOptions, Endpoint};
    use futures_util::{SinkExt, StreamExt};

    let (relay, env) = start_relay_unlimited(bins, &dir.join("idle"));
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| die(format!("{k} missing from the relay's client.env")))
    };
    let (addr, ca) = (get("CULVERT_RELAY"), PathBuf::from(get("CULVERT_CA")));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tls = client::tls_config(Some(&ca)).unwrap_or_else(|e| die(e));
    let endpoint = Endpoint::parse(addr.trim_start_matches("https://")).unwrap_or_else(|e| die(e));
    let mut held = 0usize;
    let mut out = Vec::new();
    for &target in steps {
        let need = target.saturating_sub(held);
        // Open `need` tunnels, 8 CLI processes at a time.
        let tokens: Vec<(String, String)> = std::thread::scope(|s| {
            let per = need.div_ceil(8);
            let handles: Vec<_> = (0..8)
                .map(|w| {
                    let env = &env;
                    s.spawn(move || {
                        let n = per.min(need.saturating_sub(w * per));
                        (0..n)
                            .map(|_| {
                                let t = open_tunnel(bins, env, "idle", "SSH");
                                (
                                    t["sourceAccessToken"].as_str().unwrap().to_owned(),
                                    t["destinationAccessToken"].as_str().unwrap().to_owned(),
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        // Connect both sides of each and keep them idle (reading, pinging).
        rt.block_on(async {
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
            let mut joins = Vec::new();
            for (src, dst) in tokens {
                for (mode, token) in [(Mode::Destination, dst), (Mode::Source, src)] {
                    let opts = ConnectOptions {
                        endpoint: endpoint.clone(),
                        mode,
                        access_token: token.into(),
                        client_token: None,
                        tls: tls.clone(),
                        extensions: Default::default(),
                        proxy: None,
                    };
                    let permit = sem.clone().acquire_owned().await.unwrap();
                    joins.push(tokio::spawn(async move {
                        let ws = client::connect(&opts).await.unwrap_or_else(|e| die(e)).ws;
                        drop(permit);
                        let (mut sink, mut stream) = ws.split();
                        tokio::spawn(async move {
                            let mut ping = tokio::time::interval(Duration::from_secs(20));
                            loop {
                                tokio::select! {
                                    m = stream.next() => if m.is_none() { break },
                                    _ = ping.tick() => {
                                        let p = tokio_tungstenite::tungstenite::Message::Ping(Default::default());
                                        if sink.send(p).await.is_err() { break }
                                    }
                                }
                            }
                        });
                    }));
                }
            }
            for j in joins {
                let _ = j.await;
            }
        });
        held = target.max(held);
        std::thread::sleep(Duration::from_secs(2));
        out.push((held, rss_kb(&[relay.0.id()])));
        eprintln!(
            "  relay with {held} idle tunnels: {} KB",
            out.last().unwrap().1
        );
    }
    drop(relay);
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}
