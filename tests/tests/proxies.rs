//! The relay through the proxies of corporate networks and sites: a real squid (HTTP CONNECT,
//! basic auth) and a real dante (SOCKS5, user name and password), each with authentication on.
//! `culvert connect`, the CLI's API calls and culvertd reach the relay through them, from flags,
//! configuration and the usual environment variables; a wrong password is reported as the
//! proxy's refusal, and `NO_PROXY` goes direct.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use culvert_e2e::*;

/// A squid on 127.0.0.1 that asks for `operator` / `password` (basic auth).
struct Squid {
    proc: Proc,
    port: u16,
    dir: PathBuf,
}

impl Squid {
    fn start(dir: &Path, password: &str) -> Squid {
        let squid = require_tool("/usr/sbin/squid", "squid");
        let helper = require_tool("/usr/lib/squid/basic_ncsa_auth", "squid");
        let openssl = require_tool("openssl", "openssl");
        let d = dir.join("squid");
        std::fs::create_dir_all(&d).unwrap();
        // squid runs as its own user (proxy): its logs and password file must be open to it.
        let open_to_all = |p: &Path, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        open_to_all(dir, 0o755);
        open_to_all(&d, 0o777);
        let hash = run_ok(
            "openssl passwd",
            Command::new(openssl).args(["passwd", "-apr1", password]),
        );
        std::fs::write(d.join("passwd"), format!("operator:{}\n", hash.trim())).unwrap();
        open_to_all(&d.join("passwd"), 0o644);
        let port = free_port();
        let conf = d.join("squid.conf");
        std::fs::write(
            &conf,
            format!(
                "http_port 127.0.0.1:{port}\n\
                 auth_param basic program {helper} {dir}/passwd\n\
                 auth_param basic realm culvert-test\n\
                 acl authenticated proxy_auth REQUIRED\n\
                 http_access allow authenticated\n\
                 http_access deny all\n\
                 pid_filename {dir}/squid.pid\n\
                 cache_log {dir}/cache.log\n\
                 access_log stdio:{dir}/access.log\n\
                 cache deny all\n\
                 coredump_dir {dir}\n\
                 shutdown_lifetime 0 seconds\n",
                helper = helper.display(),
                dir = d.display(),
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            "squid",
            Command::new(squid)
                .args(["-N", "-f"])
                .arg(&conf)
                .stdout(Stdio::null()),
            dir,
        );
        wait_for("squid to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Squid { proc, port, dir: d }
    }

    fn url(&self, password: &str) -> String {
        format!("http://operator:{password}@127.0.0.1:{}", self.port)
    }

    /// squid's access log: one line per finished transaction.
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// The system user dante checks SOCKS5 user names and passwords against.
const SOCKS_USER: &str = "culvert-socks";

/// A dante SOCKS5 server on 127.0.0.1 that asks for [`SOCKS_USER`] / `password`.
struct Dante {
    proc: Proc,
    port: u16,
    log: PathBuf,
}

impl Dante {
    fn start(dir: &Path, password: &str) -> Dante {
        let danted = require_tool("/usr/sbin/danted", "dante-server");
        // dante's `username` method is the system's password database: the test's own user.
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the SOCKS test needs root, to add the system user dante authenticates"
        );
        if Command::new("id")
            .arg(SOCKS_USER)
            .output()
            .is_ok_and(|o| !o.status.success())
        {
            run_ok(
                "useradd",
                Command::new("useradd").args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SOCKS_USER,
                ]),
            );
        }
        let mut chpasswd = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .expect("chpasswd (package passwd)");
        std::io::Write::write_all(
            chpasswd.stdin.as_mut().unwrap(),
            format!("{SOCKS_USER}:{password}\n").as_bytes(),
        )
        .unwrap();
        drop(chpasswd.stdin.take());
        assert!(chpasswd.wait().unwrap().success(), "chpasswd failed");

        let d = dir.join("dante");
        std::fs::create_dir_all(&d).unwrap();
        let port = free_port();
        let log = d.join("danted.log");
        let conf = d.join("danted.conf");
        std::fs::write(
            &conf,
            format!(
                "logoutput: {log}\n\
                 internal: 127.0.0.1 port = {port}\n\
                 external: 127.0.0.1\n\
                 socksmethod: username\n\
                 clientmethod: none\n\
                 user.privileged: root\n\
                 user.unprivileged: nobody\n\
                 client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}}\n\
                 socks pass {{\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n  command: connect\n  log: connect disconnect error\n}}\n",
                log = log.display(),
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            "danted",
            Command::new(danted)
                .arg("-f")
                .arg(&conf)
                .arg("-p")
                .arg(d.join("danted.pid"))
                .stdout(Stdio::null()),
            dir,
        );
        wait_for("dante to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Dante { proc, port, log }
    }

    fn url(&self, scheme: &str, password: &str) -> String {
        format!("{scheme}://{SOCKS_USER}:{password}@127.0.0.1:{}", self.port)
    }

    /// The connections dante passed on to `port`, as its log tells them.
    fn passed_to(&self, port: u16) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("pass(1): tcp/connect [")
                    && l.contains(&format!("username%{SOCKS_USER}@"))
                    && l.ends_with(&format!("127.0.0.1.{port}"))
            })
            .count()
    }
}

/// `culvert connect` for `token` with the given environment, logging stdout and stderr.
fn connect_with(relay: &Relay, dir: &Path, token: &str, env: &[(&str, &str)], name: &str) -> Proc {
    let mut cmd = relay.culvert();
    cmd.args(["connect", "-s", "ECHO=0"])
        .env("CULVERT_ACCESS_TOKEN", token)
        .envs(env.iter().copied());
    Proc::spawn_logging_stdout(name, &mut cmd, dir)
}

fn listening_port(p: &Proc) -> u16 {
    wait_log(p, "listening on");
    let log = p.log_text();
    let line = log.lines().find(|l| l.contains("listening on")).unwrap();
    line.rsplit(':').next().unwrap().trim().parse().unwrap()
}

/// Through squid with basic auth: the CLI's API calls (HTTPS_PROXY) and `culvert connect`
/// (`--proxy`) reach the relay, squid's log shows each CONNECT under the operator's name, a
/// wrong password ends `connect` with the proxy's 407 and what to check, and NO_PROXY goes
/// direct past a proxy that is not there.
#[test]
fn the_cli_reaches_the_relay_through_squid_with_basic_auth() {
    let dir = scratch("proxy-squid");
    let squid = Squid::start(&dir, "s3cret");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let relay_at = format!("127.0.0.1:{}", relay.addr.port());

    let out = relay
        .culvert()
        .args([
            "--json",
            "tunnel",
            "open",
            "--thing",
            "cell-1",
            "--service",
            "ECHO",
        ])
        .env("HTTPS_PROXY", squid.url("s3cret"))
        .output()
        .unwrap();
    assert!(out.status.success(), "through squid: {}", stderr_of(&out));
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let source = t["sourceAccessToken"].as_str().unwrap().to_owned();
    let destination = t["destinationAccessToken"].as_str().unwrap().to_owned();
    wait_for("squid to log the API call", || {
        let log = squid.access_log();
        log.lines()
            .any(|l| l.contains(&format!("CONNECT {relay_at}")) && l.contains(" operator "))
            .then_some(())
    });

    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let _gw = relay.gateway(&dir, &rules, &destination);
    let mut px = connect_with(
        &relay,
        &dir,
        &source,
        &[("CULVERT_PROXY", &squid.url("s3cret"))],
        "connect-squid",
    );
    let port = listening_port(&px);
    let data = random_bytes(512 * 1024);
    assert_eq!(
        sha256(&round_trip(connect_local(port), data.clone())),
        sha256(&data)
    );
    assert!(
        px.log_text()
            .contains("(through http://operator:***@127.0.0.1:")
    );
    assert!(
        !px.log_text().contains("s3cret"),
        "the password is never logged"
    );
    px.signal("TERM");
    assert_eq!(px.wait_exit(), 0);
    // squid logs a CONNECT when it ends: the API call's, then the data plane's.
    wait_for("squid to log the data-plane CONNECT", || {
        (squid
            .access_log()
            .matches(&format!("CONNECT {relay_at}"))
            .count()
            >= 2)
            .then_some(())
    });

    // A wrong password: the proxy's refusal, what to check, and no "listening".
    let rotated = relay.api(&[
        "tunnel",
        "rotate",
        t["tunnelId"].as_str().unwrap(),
        "--mode",
        "source",
    ]);
    let out = relay
        .culvert()
        .args(["connect", "-s", "ECHO=0", "--proxy", &squid.url("wrong")])
        .env(
            "CULVERT_ACCESS_TOKEN",
            rotated["sourceAccessToken"].as_str().unwrap(),
        )
        .output()
        .unwrap();
    let said = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("the proxy http://operator:***@127.0.0.1:")
            && said.contains("407")
            && said.contains("check the user and password"),
        "{said}"
    );
    assert!(
        !said.contains("wrong"),
        "the password is never shown: {said}"
    );
    assert!(out.stdout.is_empty());

    // NO_PROXY names the relay: direct, though HTTPS_PROXY points at nothing.
    let out = relay
        .culvert()
        .args(["tunnel", "list"])
        .env(
            "HTTPS_PROXY",
            format!("http://127.0.0.1:{}", closed_port("127.0.0.1").port()),
        )
        .env("NO_PROXY", "localhost,127.0.0.1")
        .output()
        .unwrap();
    assert!(out.status.success(), "NO_PROXY: {}", stderr_of(&out));
    drop(squid.proc);
}

/// Through dante's SOCKS5 with a user name and password: culvertd from its `relay.proxy`
/// setting and `culvert connect` from ALL_PROXY (socks5h: the proxy resolves the relay's name)
/// carry a tunnel, and dante's log shows both; a wrong password is the proxy's refusal.
#[test]
fn culvertd_and_culvert_connect_reach_the_relay_through_dante_socks5_with_auth() {
    let dir = scratch("proxy-dante");
    let dante = Dante::start(&dir, "s0cks-pw");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-2", &["ECHO"]);
    let config = dir.join("culvertd-socks.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\nproxy = \"{}\"\n\n{LOOPBACK_ACL}[services.ECHO]\ntarget = \"{echo}\"\n",
            dante.url("socks5", "s0cks-pw")
        ),
    )
    .unwrap();
    run_ok(
        "culvertd --check-config with relay.proxy",
        Command::new(bin("culvertd"))
            .args([
                "--check-config",
                "--relay",
                &relay.addr.to_string(),
                "--config",
            ])
            .arg(&config),
    );
    let gw = relay.gateway(&dir, &config, &t.destination);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(gw.log_text().contains("reaching the relay through a proxy"));
    let mut px = connect_with(
        &relay,
        &dir,
        &t.source,
        &[("ALL_PROXY", &dante.url("socks5h", "s0cks-pw"))],
        "connect-socks",
    );
    let port = listening_port(&px);
    let data = random_bytes(512 * 1024);
    assert_eq!(
        sha256(&round_trip(connect_local(port), data.clone())),
        sha256(&data)
    );
    assert_eq!(
        dante.passed_to(relay.addr.port()),
        2,
        "both ends through dante:\n{}",
        std::fs::read_to_string(&dante.log).unwrap_or_default()
    );
    px.signal("TERM");
    assert_eq!(px.wait_exit(), 0);

    let rotated = relay.api(&["tunnel", "rotate", &t.id, "--mode", "source"]);
    let out = relay
        .culvert()
        .args(["connect", "-s", "ECHO=0"])
        .env("ALL_PROXY", dante.url("socks5h", "not-it"))
        .env(
            "CULVERT_ACCESS_TOKEN",
            rotated["sourceAccessToken"].as_str().unwrap(),
        )
        .output()
        .unwrap();
    let said = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("the proxy socks5h://{SOCKS_USER}:***@127.0.0.1:"))
            && said.contains("check the user and password"),
        "{said}"
    );
    drop(dante.proc);
}

/// culvertd waiting for notifications behind a proxy: its MQTT connection to the relay's
/// broker goes through the proxy too (squid's CONNECT with basic auth for one gateway, dante's
/// SOCKS5 with a user name and password for another), so a tunnel opened for it reaches it and
/// carries data, and each proxy's log shows the broker's port as well as the relay's.
#[test]
fn culvertd_hears_its_notifications_through_squid_and_through_dante() {
    let dir = scratch("proxy-mqtt");
    let squid = Squid::start(&dir, "squid-pw");
    let dante = Dante::start(&dir, "s0cks-pw");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let broker = relay.mqtt.expect("--dev runs the embedded broker");
    let mut gateways = Vec::new();
    for (thing, proxy) in [
        ("cell-http", squid.url("squid-pw")),
        ("cell-socks", dante.url("socks5", "s0cks-pw")),
    ] {
        let password = relay.add_device(thing);
        let rules = mqtt_rules(
            &dir,
            broker,
            thing,
            &password,
            &[("ECHO", echo.to_string())],
        );
        let text = std::fs::read_to_string(&rules).unwrap();
        std::fs::write(&rules, format!("[relay]\nproxy = \"{proxy}\"\n\n{text}")).unwrap();
        let gw = relay.mqtt_gateway_with(&dir, &rules, &format!("culvertd-{thing}"), None);
        wait_log(&gw, "reaching the MQTT broker through a proxy");
        wait_log(&gw, "subscribed");
        let t = relay.open_tunnel(thing, &["ECHO"]);
        relay.wait_side(&t.id, "destination", "CONNECTED");
        let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
        assert!(echo_works(ports["ECHO"], thing.as_bytes()), "{thing}");
        gateways.push(gw);
    }
    // squid logs a CONNECT when it ends: stopping the gateways ends theirs.
    drop(gateways);
    wait_for("squid's CONNECTs to the broker and to the relay", || {
        let log = squid.access_log();
        let connected = |port: u16| {
            log.lines().any(|l| {
                l.contains("CONNECT")
                    && l.contains(&format!("127.0.0.1:{port}"))
                    && l.contains("operator")
            })
        };
        (connected(broker.port()) && connected(relay.addr.port())).then_some(())
    });
    assert!(
        dante.passed_to(broker.port()) >= 1,
        "the SOCKS gateway's broker connection through dante:\n{}",
        std::fs::read_to_string(&dante.log).unwrap_or_default()
    );
    assert!(dante.passed_to(relay.addr.port()) >= 1);
    drop(dante.proc);
    drop(squid.proc);
    let _ = std::fs::remove_dir_all(&dir);
}
