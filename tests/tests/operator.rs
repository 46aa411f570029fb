//! The operator's commands, as an operator runs them: `culvert ssh` with the real ssh and sshd,
//! `culvert open`, and when `culvert connect` says it is ready and what a local client gets while
//! the relay is away. Real processes throughout: culvert-relay with its embedded broker, culvertd
//! notified over MQTT, the system's ssh, and an sshd of the test's own.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use culvert_e2e::*;

/// A relay, and a gateway for `thing` serving `services`, notified through the broker.
fn site(dir: &std::path::Path, thing: &str, services: &[(&str, String)]) -> (Relay, Proc) {
    let relay = Relay::start(dir);
    let password = relay.add_device(thing);
    let rules = mqtt_rules(dir, relay.mqtt.unwrap(), thing, &password, services);
    let gw = relay.mqtt_gateway(dir, &rules);
    wait_log(&gw, "subscribed");
    (relay, gw)
}

/// Every tunnel of `thing`: (status, description).
fn tunnels_of(relay: &Relay, thing: &str) -> Vec<(String, String)> {
    relay.api(&["tunnel", "list", "--thing", thing])["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let id = t["tunnelId"].as_str().unwrap();
            let d = relay.describe(id);
            (
                d["status"].as_str().unwrap().to_owned(),
                d["description"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// `culvert ssh USER@THING` logs in with the real ssh, runs a command that reads its stdin, and
/// exits with ssh's code; each run's tunnel is closed when ssh exits.
#[test]
fn culvert_ssh_runs_a_command_on_the_device_and_closes_its_tunnel() {
    let dir = scratch("operator-ssh");
    let sshd = Sshd::start(&dir);
    require_tool("ssh", "openssh-client");
    let (relay, _gw) = site(
        &dir,
        "cell-7",
        &[("SSH", format!("127.0.0.1:{}", sshd.port))],
    );
    let target = format!("{}@cell-7", Sshd::user());
    let data = random_bytes(1024 * 1024);
    let mut child = relay
        .culvert()
        .args(["ssh", &target])
        .args(sshd.client_opts())
        .arg("echo culvert-$((6*7)); sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || stdin.write_all(&data))
    };
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "culvert ssh failed: {}",
        stderr_of(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("culvert-42\n{}  -\n", sha256(&data)),
        "the command's output, over the tunnel: {}",
        stderr_of(&out)
    );
    let said = stderr_of(&out);
    assert!(said.contains("waiting for its gateway"), "{said}");
    assert!(said.contains("closed"), "{said}");

    // ssh's exit code is culvert's.
    let out = relay
        .culvert()
        .args(["ssh", &target])
        .args(sshd.client_opts())
        .arg("exit 7")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr_of(&out));

    let tunnels = tunnels_of(&relay, "cell-7");
    assert_eq!(tunnels.len(), 2, "one tunnel per run: {tunnels:?}");
    for (status, description) in &tunnels {
        assert_eq!(status, "CLOSED", "{tunnels:?}");
        assert!(description.starts_with("culvert ssh by "), "{tunnels:?}");
    }
}

/// A thing whose gateway never connects: `culvert ssh` says what to check, exits 1, and closes
/// the tunnel it opened.
#[test]
fn culvert_ssh_says_what_to_check_when_the_gateway_never_connects() {
    let dir = scratch("operator-ssh-nogw");
    let relay = Relay::start(&dir);
    relay.add_device("cell-9");
    let out = relay
        .culvert()
        .args(["ssh", "--wait", "1", "cell-9", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = stderr_of(&out);
    assert!(
        said.contains("the gateway of cell-9 did not connect")
            && said.contains("culvert device add --thing cell-9"),
        "{said}"
    );
    let tunnels = tunnels_of(&relay, "cell-9");
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0].0, "CLOSED");
}

/// `culvert open THING --service ECHO` prints its local endpoint, carries connections until
/// SIGTERM, then closes its tunnel and exits 0.
#[test]
fn culvert_open_serves_until_sigterm_and_closes_its_tunnel() {
    let dir = scratch("operator-open");
    let echo = echo_server();
    let (relay, _gw) = site(&dir, "door-2", &[("ECHO", echo.to_string())]);
    let mut open = Proc::spawn_logging_stdout(
        "culvert-open",
        relay
            .culvert()
            .args(["open", "door-2", "--service", "ECHO"]),
        &dir,
    );
    wait_log(&open, "listening on");
    let port = listening_port(&open, "ECHO");
    let data = random_bytes(256 * 1024);
    assert_eq!(
        sha256(&round_trip(connect_local(port), data.clone())),
        sha256(&data)
    );
    open.signal("TERM");
    assert_eq!(open.wait_exit(), 0, "{}", open.log_text());
    let tunnels = tunnels_of(&relay, "door-2");
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0].0, "CLOSED", "{}", open.log_text());
    assert!(tunnels[0].1.starts_with("culvert open by "));
}

/// The port a `culvert connect`/`open` printed for `service`.
fn listening_port(p: &Proc, service: &str) -> u16 {
    let log = p.log_text();
    let line = log
        .lines()
        .find(|l| l.starts_with(&format!("culvert: service {service} listening on ")))
        .unwrap_or_else(|| panic!("no listening line for {service}:\n{log}"));
    let addr: SocketAddr = line.rsplit(' ').next().unwrap().parse().unwrap();
    addr.port()
}

/// `culvert connect` says "listening" only once the relay has taken the token: not while the
/// relay is down (it says it is retrying), and never when the token is refused. A local client
/// that connects while the relay is unreachable is closed at once, with the reason in the log;
/// once the relay is back, connections work again on the same port.
#[test]
fn connect_is_ready_only_when_the_relay_took_the_token_and_refuses_locally_while_it_is_away() {
    let dir = scratch("operator-ready");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let addr = relay.addr;
    let t = relay.open_tunnel("cell-3", &["ECHO"]);
    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let _gw = relay.gateway(&dir, &rules, &t.destination);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (ca, api_key) = (relay.ca.clone(), relay.api_key.clone());
    let mut relay = relay;
    relay.proc.kill();

    // The relay is down: retries, visibly, and no "listening".
    let mut px = Proc::spawn_logging_stdout(
        "culvert-connect",
        Command::new(bin("culvert"))
            .args(["connect", "-s", "ECHO=0", "--relay", &addr.to_string()])
            .arg("--ca")
            .arg(&ca)
            .env("CULVERT_ACCESS_TOKEN", &t.source)
            .env_remove("RUST_LOG"),
        &dir,
    );
    wait_log_count(&px, "cannot connect to relay", 2);
    assert!(
        !px.log_text().contains("listening"),
        "ready before the relay took the token:\n{}",
        px.log_text()
    );

    // The relay is back: ready, and the tunnel carries.
    let relay = Relay::start_on(&dir, addr);
    assert_eq!(relay.api_key, api_key, "the same relay state");
    wait_log(&px, "listening on");
    let port = listening_port(&px, "ECHO");
    assert!(echo_works(port, b"after the relay came up"));

    // The relay vanishes: a local client is closed at once, and told why in the log.
    let mut relay = relay;
    relay.proc.kill();
    wait_log_count(&px, "cannot connect to relay", 3);
    let mut s = connect_local(port);
    let mut buf = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut s, &mut buf).unwrap_or(0),
        0,
        "closed, not carried"
    );
    wait_log(&px, "the relay is unreachable");

    // And back again: the same port works.
    let _relay = Relay::start_on(&dir, addr);
    wait_log(&px, "reconnected to relay");
    assert!(echo_works(port, b"after the relay came back"));
    px.signal("TERM");
    assert_eq!(px.wait_exit(), 0);

    // A refused token: exit 3, and never a "listening" line.
    let out = Command::new(bin("culvert"))
        .args(["connect", "-s", "ECHO=0", "--relay", &addr.to_string()])
        .arg("--ca")
        .arg(&ca)
        .env("CULVERT_ACCESS_TOKEN", "not-a-token-of-this-relay")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "nothing on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// What `culvert device add` prints is a gateway's configuration as it stands: with the
/// services added, `culvertd --check-config` accepts it, and culvertd started with nothing but
/// `--config` serves a tunnel. Without its `[relay]` section, `--check-config` refuses it, as a
/// start would.
#[test]
fn the_settings_device_add_prints_make_a_working_gateway() {
    let dir = scratch("operator-device-add");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let out = relay
        .culvert()
        .args(["device", "add", "--thing", "cell-5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    let settings = &printed[printed
        .find("[relay]")
        .unwrap_or_else(|| panic!("no [relay] section:\n{printed}"))..];
    assert!(settings.contains("[mqtt]"), "{printed}");
    // The operator copies the relay's CA where the printed line says.
    let ca = dir.join("relay-ca.pem");
    std::fs::copy(&relay.ca, &ca).unwrap();
    let services = format!("\n{LOOPBACK_ACL}[services.ECHO]\ntarget = \"{echo}\"\n");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        settings.replace("/etc/culvert/relay-ca.pem", &ca.display().to_string()) + &services,
    )
    .unwrap();
    run_ok(
        "culvertd --check-config on the printed settings",
        Command::new(bin("culvertd"))
            .args(["--check-config", "--config"])
            .arg(&config),
    );

    let no_relay = dir.join("no-relay.toml");
    std::fs::write(
        &no_relay,
        settings[settings.find("[mqtt]").unwrap()..].to_owned() + &services,
    )
    .unwrap();
    let out = Command::new(bin("culvertd"))
        .args(["--check-config", "--config"])
        .arg(&no_relay)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("no relay: set relay.endpoint"));

    let gw = Proc::spawn(
        "culvertd",
        Command::new(bin("culvertd"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("CULVERT_DESTINATION_TOKEN")
            .stdout(Stdio::null()),
        &dir,
    );
    wait_log(&gw, "subscribed");
    let mut open = Proc::spawn_logging_stdout(
        "culvert-open",
        relay
            .culvert()
            .args(["open", "cell-5", "--service", "ECHO"]),
        &dir,
    );
    wait_log(&open, "listening on");
    assert!(echo_works(listening_port(&open, "ECHO"), b"as printed"));
    open.signal("TERM");
    assert_eq!(open.wait_exit(), 0, "{}", open.log_text());
}
