//! culvert-relay on PostgreSQL (`--store postgres://…`, a real server the test starts:
//! `culvert_devkit::pg`): two relays share the tunnels (one of them reaching the database over
//! TLS, `--store-ca`), a single-use token spent on one is
//! refused by the other, operators changed through one reach the other, the state outlives
//! both relays, and a tunnel carries traffic as on the embedded store. These relays are not a
//! cluster, so each tunnel's two ends use one relay; tests/tests/cluster.rs has nodes that
//! carry a peer to the node holding its tunnel.

use culvert_e2e::raw;
use culvert_e2e::*;
use culvert_protocol::Mode;

fn relay_on(dir: &std::path::Path, url: &str) -> Relay {
    Relay::start_with(
        dir,
        "127.0.0.1:0".parse().unwrap(),
        &["--store".to_owned(), url.to_owned()],
    )
}

#[test]
fn two_relays_share_tunnels_and_spend_each_token_once() {
    let url = culvert_devkit::pg::database();
    let (dir_a, dir_b) = (scratch("pg-a"), scratch("pg-b"));
    let a = relay_on(&dir_a, &url);
    // B reaches the same database over TLS, verifying the server's certificate.
    let tls_url = format!(
        "{}?sslmode=require",
        url.replacen("@127.0.0.1:", "@localhost:", 1)
    );
    let b = Relay::start_with(
        &dir_b,
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--store".to_owned(),
            tls_url,
            "--store-ca".to_owned(),
            culvert_devkit::pg::ca().display().to_string(),
        ],
    );
    let echo = echo_server();

    // Opened on A, seen on B.
    let t = a.open_tunnel("cell-7", &["ECHO"]);
    assert_eq!(b.describe(&t.id)["thingName"], "cell-7");
    let listed = b.api(&["tunnel", "list"]);
    assert!(
        listed.to_string().contains(&t.id),
        "B lists A's tunnel: {listed}"
    );

    // The source token, spent on A without a client token, is refused by B.
    let rt = raw::runtime();
    let _src = rt
        .block_on(raw::connect(&a, &t.source, Mode::Source, None))
        .expect("A admits the fresh token");
    let (status, message) = rt.block_on(raw::refused(&b, &t.source, Mode::Source, None));
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("already used"), "{message}");

    // An operator made through A can use B (each relay reads operators again every 5 s), and
    // one disabled through B is refused by A.
    let alice = a.api(&["operator", "add", "alice", "--role", "viewer"]);
    let key = alice["apiKey"].as_str().unwrap().to_owned();
    let whoami = |r: &Relay| {
        r.culvert()
            .env("CULVERT_API_KEY", &key)
            .args(["--json", "whoami"])
            .output()
            .unwrap()
    };
    wait_for("B to know the operator made through A", || {
        whoami(&b).status.success().then_some(())
    });
    b.api(&["operator", "disable", "alice"]);
    wait_for("A to refuse the operator disabled through B", || {
        let out = whoami(&a);
        (!out.status.success() && stderr_of(&out).contains("disabled")).then_some(())
    });

    // A tunnel works end to end on the PostgreSQL store.
    let t2 = b.open_tunnel("cell-8", &["ECHO"]);
    let rules = rules(&dir_b, &[("ECHO", echo.to_string())]);
    let _gw = b.gateway(&dir_b, &rules, &t2.destination);
    let (_px, ports) = b.proxy(&dir_b, &t2.source, &["ECHO"]);
    b.wait_side(&t2.id, "destination", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"through a relay on PostgreSQL"));

    // Nothing went to the state directories' embedded store, and the tunnels outlive both
    // relays.
    assert!(!dir_a.join("relay-state/tunnels.redb").exists());
    drop((a, b));
    let c = relay_on(&scratch("pg-c"), &url);
    assert_eq!(c.describe(&t.id)["status"], "OPEN");
    assert_eq!(c.describe(&t2.id)["thingName"], "cell-8");
    let (status, _) = rt.block_on(raw::refused(&c, &t.source, Mode::Source, None));
    assert_eq!(status, 403, "still spent after every relay restarted");
}

#[test]
fn a_relay_that_cannot_reach_its_database_says_so_and_exits() {
    let dir = scratch("pg-down");
    let port = free_port();
    let out = std::process::Command::new(bin("culvert-relay"))
        .args(["--dev", "--state-dir"])
        .arg(dir.join("state"))
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(format!("postgres://culvert:hunter2@127.0.0.1:{port}/none"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("hunter2"), "the password is not shown: {err}");
    let out = std::process::Command::new(bin("culvert-relay"))
        .args(["--dev", "--state-dir"])
        .arg(dir.join("state"))
        .args(["--store", "mysql://x@y/z"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("not a postgres:// URL"));
}
