//! `--cluster`: what the hop between two relay nodes costs. Two `culvert-relay` nodes of one
//! cluster (a private PostgreSQL server, mosquitto for device notification, node certificates
//! from the commands in docs/operations.md), and in the same run, taking turns round by round:
//! - **direct**: client → target;
//! - **same node**: `culvert connect` and `culvertd` both on node A;
//! - **cross node**: `culvertd` on node A, `culvert connect` on node B, which carries the
//!   source to A over a node link (mTLS WebSocket).
//!
//! Single-stream throughput and 64-byte round trips (p50 / p99) for each, and the cross-node
//! route's ratios to the same-node one.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{
    Kill, Route, arg, die, echo_server, latency, median, percentiles, relay_command, sink_server,
    start_relay, throughput, tunnel_route, wait_route, which,
};

const NODES: [&str; 2] = ["relay-a", "relay-b"];

fn wait_port(what: &str, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            die(format!("{what} did not start"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(bins: &Path, bytes: u64, rounds: usize, pings: usize) {
    let dir = std::env::temp_dir().join(format!("culvert-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A dev relay started once makes the PKI and the API key the nodes share.
    let (dev, _) = start_relay(bins, &dir);
    drop(dev);
    let d = dir.join("relay");
    let url = culvert_devkit::pg::database();
    let mosquitto = which("mosquitto")
        .or_else(|| Some("/usr/sbin/mosquitto".into()).filter(|p: &std::path::PathBuf| p.exists()))
        .unwrap_or_else(|| die("mosquitto is missing: apt-get install mosquitto"));
    let broker = SocketAddr::from(([127, 0, 0, 1], culvert_devkit::free_port()));
    let mconf = dir.join("mosquitto.conf");
    std::fs::write(
        &mconf,
        format!(
            "user root\npersistence false\nallow_anonymous true\nlistener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            broker.port(),
            d.join("ca.pem").display(),
            d.join("server.pem").display(),
            d.join("server-key.pem").display(),
        ),
    )
    .unwrap();
    let _broker = Kill(
        Command::new(&mosquitto)
            .arg("-c")
            .arg(&mconf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| die(format!("mosquitto: {e}"))),
    );
    wait_port("mosquitto", broker);
    let pki = dir.join("cluster-pki");
    culvert_devkit::cluster_pki(&pki, &NODES).unwrap_or_else(|e| die(e));
    let mut nodes = Vec::new();
    let mut envs = Vec::new();
    for name in NODES {
        let (port, link) = (culvert_devkit::free_port(), culvert_devkit::free_port());
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nstate_dir = {state:?}\napi_key_file = {key:?}\nstore = \"{url}\"\n\
                 [aws]\nkey_file = {aws:?}\n\
                 [tls]\ncert = {cert:?}\nkey = {tls_key:?}\n\
                 [mqtt]\nbroker = \"mqtts://{broker}\"\nca = {ca:?}\n\
                 [cluster]\nnode = \"{name}\"\nlisten = \"127.0.0.1:{link}\"\nca = {cca:?}\ncert = {ccert:?}\nkey = {ckey:?}\n",
                state = dir.join(name),
                key = d.join("api-key"),
                aws = dir.join("aws-signing.key"),
                cert = d.join("server.pem"),
                tls_key = d.join("server-key.pem"),
                ca = d.join("ca.pem"),
                cca = pki.join("ca.pem"),
                ccert = pki.join(format!("{name}.pem")),
                ckey = pki.join(format!("{name}-key.pem")),
            ),
        )
        .unwrap();
        nodes.push(Kill(
            relay_command(bins)
                .arg("--config")
                .arg(&config)
                .spawn()
                .unwrap_or_else(|e| die(e)),
        ));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_port(name, addr);
        let key = std::fs::read_to_string(d.join("api-key")).unwrap();
        envs.push(vec![
            ("CULVERT_RELAY".to_owned(), addr.to_string()),
            ("CULVERT_API_KEY".to_owned(), key.trim().to_owned()),
            (
                "CULVERT_CA".to_owned(),
                d.join("ca.pem").display().to_string(),
            ),
        ]);
    }
    let sink = sink_server();
    let echo = echo_server();
    let cross_id;
    let routes = [
        Route::direct(sink, echo),
        tunnel_route(
            bins,
            &dir.join("same"),
            &envs[0],
            &envs[0],
            sink,
            echo,
            "same node",
        )
        .0,
        {
            let (r, id) = tunnel_route(
                bins,
                &dir.join("cross"),
                &envs[0],
                &envs[1],
                sink,
                echo,
                "cross node",
            );
            cross_id = id;
            r
        },
    ];
    for r in &routes {
        wait_route(r.name, r.sink);
    }
    // The cross-node route really crosses: its source connected to B is attached on A.
    let o = Command::new(bins.join("culvert"))
        .envs(envs[1].iter().map(|(k, v)| (k, v)))
        .args(["--json", "tunnel", "describe", &cross_id])
        .output()
        .unwrap_or_else(|e| die(e));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| die(String::from_utf8_lossy(&o.stderr)));
    if v["sourceConnectionState"]["node"] != "relay-a" {
        die(format!(
            "the cross-node route's source is not attached on relay-a: {v}"
        ));
    }
    let mut tp: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    let mut rtt: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    for _ in 0..rounds {
        for (i, r) in routes.iter().enumerate() {
            tp[i].push(throughput(r.sink, bytes));
        }
        for (i, r) in routes.iter().enumerate() {
            rtt[i].extend(latency(r.echo, pings / rounds));
        }
    }
    println!(
        "culvert-relay cluster: the cross-node hop (2 nodes, PostgreSQL, mosquitto; {} MiB x {rounds} rounds, {pings} round trips)",
        bytes >> 20
    );
    println!(
        "{:<12} {:>14} {:>10} {:>10}",
        "route", "1 stream Gbit/s", "p50 µs", "p99 µs"
    );
    let mut figures = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let t = median(tp[i].clone());
        let (p50, p99) = percentiles(rtt[i].clone());
        println!("{:<12} {t:>14.2} {p50:>10.0} {p99:>10.0}", r.name);
        figures.push((t, p50, p99));
    }
    let (same, cross) = (figures[1], figures[2]);
    println!(
        "cross node / same node: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
        cross.0 / same.0,
        cross.1 / same.1,
        cross.2 / same.2
    );
    drop(routes);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--cluster [--bytes N] [--rounds N] [--pings N]`.
pub fn main(bins: &Path) {
    run(
        bins,
        arg("--bytes", 256 << 20),
        arg("--rounds", 3).max(1) as usize,
        arg("--pings", 20_000).max(100) as usize,
    );
}
