//! `cargo run -p culvert-demo`: the whole system on this machine, no setup.
//!
//! 1. builds `culvert-relay`, `culvertd` and `culvert`;
//! 2. starts `culvert-relay --dev` (CA, certificate, API key in `.culvert-dev/`);
//! 3. starts a demo "robot cell": a web page on 127.0.0.1:18080 and an echo service on
//!    127.0.0.1:18007 (the targets in `config/culvertd-demo.toml`), and an sshd of its own on a
//!    free loopback port with a throwaway key (when openssh-server is installed);
//! 4. opens a tunnel with `culvert tunnel open`, starts `culvertd` with the demo rules and the
//!    destination token, and `culvert connect` with the source token;
//! 5. checks that the web page and the echo come back through the tunnel, then prints what to
//!    connect to. `--once` stops after the check (used by the test suite).
//!
//! SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop the demo and every process it started, at any step.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use culvert_devkit::KillOnDrop as Kill;

/// Report and stop. Unwinds (rather than `exit`) so the `Kill` guards stop the children.
fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("culvert-demo: {msg}");
    std::panic::resume_unwind(Box::new(()))
}

/// Set when SIGTERM, SIGINT or SIGHUP arrives. Every wait checks it and unwinds, so the `Kill`
/// guards stop the children (a demo killed by SIGTERM used to leave its relay running, and the
/// next run found the relay's database locked).
static STOP: AtomicBool = AtomicBool::new(false);

fn stop_on_signals() {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap_or_else(|e| die(format!("cannot start the signal thread: {e}")));
    // Registered here, before any child exists; awaited on a thread of their own.
    let mut signals = {
        let _entered = rt.enter();
        [
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
        ]
        .map(|k| signal(k).unwrap_or_else(|e| die(format!("cannot handle signals: {e}"))))
    };
    std::thread::spawn(move || {
        rt.block_on(async {
            let [t, i, h] = &mut signals;
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
                _ = h.recv() => {}
            }
        });
        STOP.store(true, Ordering::SeqCst);
    });
}

fn stop_requested() {
    if STOP.load(Ordering::SeqCst) {
        die("stopped by a signal; the relay, gateway and proxy are stopped too");
    }
}

/// The demo "robot cell": a web page and an echo service on the ports the demo rules name.
fn start_targets() {
    let web = TcpListener::bind("127.0.0.1:18080").unwrap_or_else(|e| {
        die(format!(
            "cannot start the demo web target on 127.0.0.1:18080 ({e}); is another demo running?"
        ))
    });
    let echo = TcpListener::bind("127.0.0.1:18007").unwrap_or_else(|e| {
        die(format!(
            "cannot start the demo echo target on 127.0.0.1:18007 ({e}); is another demo running?"
        ))
    });
    std::thread::spawn(move || {
        for s in web.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req);
                let body = "<!doctype html><title>robot cell 7</title>\
                    <h1>Hello from robot cell 7</h1>\
                    <p>This page travelled: browser &rarr; culvert connect &rarr; culvert-relay &rarr; culvertd &rarr; here.</p>\n";
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        stop_requested();
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            die(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: robot\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains("Hello from robot cell 7").then_some(out)
}

fn echo(port: u16, msg: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut got = vec![0u8; msg.len()];
    s.write_all(msg).is_ok() && s.read_exact(&mut got).is_ok() && got == msg
}

fn main() -> ExitCode {
    let once = std::env::args().any(|a| a == "--once");
    stop_on_signals();
    let root = culvert_devkit::workspace();
    let bins = culvert_devkit::build_binaries(&[]).unwrap_or_else(|e| die(e));
    stop_requested();
    let state = std::env::var_os("CULVERT_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".culvert-dev"));
    std::fs::create_dir_all(&state).unwrap_or_else(|e| die(e));
    let env_file = state.join("client.env");
    let _ = std::fs::remove_file(&env_file);

    start_targets();
    let log = |name: &str| {
        std::fs::File::create(state.join(format!("{name}.log"))).unwrap_or_else(|e| die(e))
    };
    let mut relay = Kill(
        Command::new(bins.join("culvert-relay"))
            .args(["--dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(log("relay"))
            .spawn()
            .unwrap_or_else(|e| die(format!("cannot start culvert-relay: {e}"))),
    );
    let relay_log = state.join("relay.log");
    let env: Vec<(String, String)> = wait("the relay to start", || {
        if let Ok(Some(status)) = relay.0.try_wait() {
            let log = std::fs::read_to_string(&relay_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            die(format!(
                "culvert-relay stopped before it was ready ({status}); the end of {}:\n  {}",
                relay_log.display(),
                tail.join("\n  ")
            ));
        }
        let t = std::fs::read_to_string(&env_file).ok()?;
        let v: Vec<(String, String)> = t
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        (v.len() >= 3).then_some(v)
    });
    let culvert = || {
        let mut c = Command::new(bins.join("culvert"));
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let out = culvert()
            .arg("--json")
            .args(args)
            .output()
            .unwrap_or_else(|e| die(e));
        if !out.status.success() {
            die(format!(
                "culvert {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| die(e))
    };
    // The gateway: its MQTT identity plus the demo rules, and no token.
    let device = json(&["device", "add", "--thing", "robot-cell-7"]);
    let broker = env
        .iter()
        .find(|(k, _)| k == "CULVERT_MQTT")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| die("the dev relay runs no embedded MQTT broker"));
    let password_file = state.join("robot-cell-7.mqtt-password");
    std::fs::write(
        &password_file,
        device["password"].as_str().unwrap_or_default(),
    )
    .unwrap_or_else(|e| die(e));
    // SSH: an sshd of the demo's own (the machine's port 22 may have none, or refuse keys).
    let sshd = std::path::Path::new("/usr/sbin/sshd")
        .exists()
        .then(|| culvert_devkit::Sshd::start(&state));
    let mut rules =
        std::fs::read_to_string(root.join("config/culvertd-demo.toml")).unwrap_or_else(|e| die(e));
    if let Some(sshd) = &sshd {
        rules = rules.replace(
            "target = \"127.0.0.1:22\"",
            &format!("target = \"127.0.0.1:{}\"", sshd.port),
        );
    }
    let gateway_config = state.join("culvertd.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "[mqtt]\nbroker = \"mqtts://{broker}\"\nthing_name = \"robot-cell-7\"\npassword_file = \"{}\"\nhealth_report_secs = 10\n\n{rules}",
            password_file.display()
        ),
    )
    .unwrap_or_else(|e| die(e));
    let gateway_log = state.join("culvertd.log");
    let _gateway = Kill(
        Command::new(bins.join("culvertd"))
            .arg("--config")
            .arg(&gateway_config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log("culvertd"))
            .spawn()
            .unwrap_or_else(|e| die(format!("cannot start culvertd: {e}"))),
    );
    wait("culvertd to subscribe to its notifications", || {
        std::fs::read_to_string(&gateway_log)
            .ok()?
            .contains("subscribed")
            .then_some(())
    });
    // Opening the tunnel is all it takes: the relay notifies the gateway.
    let t = json(&[
        "tunnel",
        "open",
        "--thing",
        "robot-cell-7",
        "--service",
        "WEB,ECHO,SSH",
    ]);
    let token = |k: &str| {
        t[k].as_str()
            .unwrap_or_else(|| die("no token in the answer"))
            .to_owned()
    };

    // An admin for the web console, with a password of this run (an earlier run's operator
    // gets the new one).
    let console = env
        .iter()
        .find(|(k, _)| k == "CULVERT_CONSOLE")
        .map(|(_, v)| v.clone());
    let console_password = {
        let mut raw = [0u8; 12];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .unwrap_or_else(|e| die(e));
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let _ = culvert()
        .args(["--json", "operator", "add", "demo", "--role", "admin"])
        .output();
    let out = culvert()
        .args(["--json", "operator", "password", "demo"])
        .env("CULVERT_PASSWORD", &console_password)
        .output()
        .unwrap_or_else(|e| die(e));
    if !out.status.success() {
        die(format!(
            "cannot set the console operator's password: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    let mut proxy = culvert();
    proxy
        .args(["connect", "-s", "WEB=0,ECHO=0,SSH=0"])
        .env("CULVERT_ACCESS_TOKEN", token("sourceAccessToken"))
        .stdout(Stdio::piped())
        .stderr(log("culvert-connect"));
    let mut proxy = Kill(
        proxy
            .spawn()
            .unwrap_or_else(|e| die(format!("cannot start culvert connect: {e}"))),
    );
    let stdout = proxy.0.stdout.take().unwrap_or_else(|| die("no stdout"));
    let mut ports = std::collections::HashMap::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("culvert: service ") {
            let mut it = rest.split_whitespace();
            let name = it.next().unwrap_or_default().to_owned();
            let port = it
                .last()
                .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
            if let Some(p) = port {
                ports.insert(name, p);
            }
        }
        if ports.len() == 3 {
            break;
        }
    }
    let (web, echo_port, ssh) = (ports["WEB"], ports["ECHO"], ports["SSH"]);
    wait("the web page through the tunnel", || http_get(web));
    wait("the echo through the tunnel", || {
        echo(echo_port, b"ping").then_some(())
    });

    println!();
    println!(
        "culvert is up: relay, gateway (culvertd) and operator proxy (culvert connect) are running."
    );
    println!(
        "Tunnel {} to thing robot-cell-7, services WEB, ECHO, SSH.",
        t["tunnelId"].as_str().unwrap_or("?")
    );
    println!();
    println!("  web page of the robot cell   curl http://127.0.0.1:{web}/   (an http rule)");
    println!("  echo service                 nc 127.0.0.1 {echo_port}");
    match &sshd {
        Some(sshd) => println!(
            "  SSH to the demo's sshd       ssh -p {ssh} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {}@127.0.0.1",
            sshd.client_key.display(),
            culvert_devkit::Sshd::user()
        ),
        None => println!(
            "  SSH                          not set up: install openssh-server for the demo's own sshd (apt-get install openssh-server)"
        ),
    }
    println!(
        "  manage tunnels               . {} && {} tunnel list",
        env_file.display(),
        bins.join("culvert").display()
    );
    println!(
        "  the gateway and its targets  . {} && {} device list",
        env_file.display(),
        bins.join("culvert").display()
    );
    if let Some(url) = &console {
        println!(
            "  web console                  {url}   (log in as demo, password {console_password}; the browser must trust {} or be told to accept it)",
            state.join("ca.pem").display()
        );
    }
    println!("  logs                         {}/*.log", state.display());
    println!(
        "  gateway audit trail          {}",
        state.join("audit.jsonl").display()
    );
    println!();
    println!("Checked: the web page and an echo came back through the tunnel.");
    if once {
        return ExitCode::SUCCESS;
    }
    println!("Press Ctrl-C (or send SIGTERM) to stop everything.");
    loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("culvert-demo: stopping the relay, gateway and proxy");
            break;
        }
        if let Ok(Some(status)) = proxy.0.try_wait() {
            eprintln!("culvert-demo: culvert connect ended ({status}); stopping the rest");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ExitCode::SUCCESS
}
