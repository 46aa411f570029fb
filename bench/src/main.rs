//! `cargo run --release -p culvert-bench`: measures, in one run on loopback,
//! - single-stream throughput: N bytes written by a client, counted by a sink that acknowledges
//!   the last byte (so buffering is not mistaken for delivery);
//! - 64-byte round-trip latency: ping-pong against an echo server, p50 / p99;
//!
//! once directly (client → target) and once through culvert's full path (client →
//! `culvert connect` → `culvert-relay` → `culvertd` → target, TLS on both hops), and prints the
//! ratios. Every loop is bounded by a count; nothing runs open-ended.
//!
//! Options: `--bytes N` (per throughput round, default 1 GiB), `--rounds N` (default 3, the
//! median is reported), `--pings N` (default 20000).
//!
//! `--open-latency [--tunnels N]` measures instead, with the embedded MQTT broker, the time from
//! `culvert tunnel open` returning to the first byte echoed through a new connection of that
//! tunnel (the gateway learns of the tunnel only through its notification; the operator proxy
//! is started after the open returns, as an operator would), median and p95 over N tunnels
//! (default 20).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
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
fn latency(port: u16, count: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| die(e));
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + 1000 {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back)
            .unwrap_or_else(|e| die(format!("echo: {e}")));
        if i >= 1000 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    (samples[count / 2], samples[count * 99 / 100])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--bins",
            "-p",
            "culvert-relay",
            "-p",
            "culvertd",
            "-p",
            "culvert-cli",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        die("building the release binaries failed");
    }
    root.join("target/release")
}

fn main() {
    if std::env::args().any(|a| a == "--open-latency") {
        return open_latency(arg("--tunnels", 20).max(2) as usize);
    }
    let bytes = arg("--bytes", 1 << 30);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let pings = arg("--pings", 20_000).max(100) as usize;
    let bins = build();
    let dir = std::env::temp_dir().join(format!("culvert-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let sink = sink_server();
    let echo = echo_server();
    let (_relay, env) = start_relay(&bins, &dir);
    let out = Command::new(bins.join("culvert"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args([
            "--json",
            "tunnel",
            "open",
            "--thing",
            "bench",
            "--service",
            "SINK,ECHO",
        ])
        .output()
        .unwrap();
    let t: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| die(String::from_utf8_lossy(&out.stderr)));
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        format!("[acl]\nallow = [\"127.0.0.0/8\"]\n[services.SINK]\ntarget = \"{sink}\"\n[services.ECHO]\ntarget = \"{echo}\"\n"),
    )
    .unwrap();
    let _gw = Kill(
        Command::new(bins.join("culvertd"))
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
        Command::new(bins.join("culvert"))
            .envs(env.iter().map(|(k, v)| (k, v)))
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
    // Wait for the whole path: a small transfer must be acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::panic::catch_unwind(|| throughput(ports["SINK"], 1024)).is_err() {
        if Instant::now() > deadline {
            die("the tunnel did not come up");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    eprintln!("measuring: {rounds} round(s) of {bytes} bytes, {pings} pings each way …");
    let direct_tp = median(
        (0..rounds)
            .map(|_| throughput(sink.port(), bytes))
            .collect(),
    );
    let tunnel_tp = median(
        (0..rounds)
            .map(|_| throughput(ports["SINK"], bytes))
            .collect(),
    );
    let (d50, d99) = latency(echo.port(), pings);
    let (t50, t99) = latency(ports["ECHO"], pings);

    println!();
    println!(
        "culvert full path (culvert connect → relay → culvertd, TLS on both hops) vs direct loopback"
    );
    println!(
        "{:<32} {:>14} {:>14} {:>10}",
        "", "direct", "culvert", "ratio"
    );
    println!(
        "{:<32} {:>11.2} Gb {:>11.2} Gb {:>9.2}×",
        "1-stream throughput (Gbit/s)",
        direct_tp,
        tunnel_tp,
        tunnel_tp / direct_tp
    );
    println!(
        "{:<32} {:>11.1} µs {:>11.1} µs {:>9.2}×",
        "64-byte round trip p50",
        d50,
        t50,
        t50 / d50
    );
    println!(
        "{:<32} {:>11.1} µs {:>11.1} µs {:>9.2}×",
        "64-byte round trip p99",
        d99,
        t99,
        t99 / d99
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dev relay in `dir/relay`, and the client settings it wrote.
fn start_relay(bins: &Path, dir: &Path) -> (Kill, Vec<(String, String)>) {
    let relay = Kill(
        Command::new(bins.join("culvert-relay"))
            .args(["--dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join("relay"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| die(e)),
    );
    (relay, env_of(&dir.join("relay/client.env")))
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
