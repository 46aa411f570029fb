//! The relay is stopped mid-tunnel, gracefully (SIGTERM) or by a crash (SIGKILL), and started
//! again on the same address and state: both of culvert's ends reconnect by themselves with
//! their client tokens, and new connections work. (The AWS localproxy's side of this is in
//! `localproxy.rs`.)

use culvert_e2e::*;

fn ends_survive_a_relay_restart(name: &str, signal: &str, relay_args: &[&str]) {
    let dir = scratch(name);
    let echo = echo_server();
    let mut grace = vec!["--shutdown-grace-secs".to_owned(), "1".to_owned()];
    grace.extend(relay_args.iter().map(|a| a.to_string()));
    let relay = Relay::start_with(&dir, "127.0.0.1:0".parse().unwrap(), &grace);
    let t = relay.open_tunnel("cafe-cell-7", &["ECHO"]);
    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let mut gw = relay.gateway(&dir, &rules, &t.destination);
    let (mut px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"before the stop"));

    let addr = relay.addr;
    let mut relay = relay;
    relay.proc.signal(signal);
    let code = relay.proc.wait_exit();
    if signal == "TERM" {
        assert_eq!(code, 0, "graceful stop:\n{}", relay.proc.log_text());
        // The relay said "come back" (close code 1012) and both ends understood it.
        wait_log(&gw, "the relay is restarting; reconnecting");
        wait_log(&px, "the relay is restarting; reconnecting");
    }
    drop(relay);
    let relay = Relay::start_with(&dir, addr, &grace);
    assert_eq!(
        relay.describe(&t.id)["status"],
        "OPEN",
        "the tunnel survived the restart"
    );
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"after the restart"));
    let data = random_bytes(256 * 1024);
    assert_eq!(
        sha256(&round_trip(connect_local(ports["ECHO"]), data.clone())),
        sha256(&data)
    );
    assert!(gw.is_running() && px.is_running());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn relay_crash_mid_tunnel() {
    ends_survive_a_relay_restart("restart-kill", "KILL", &[]);
}

#[test]
fn graceful_relay_restart_mid_tunnel() {
    ends_survive_a_relay_restart("restart-term", "TERM", &[]);
}

/// "Come back" (1012) does not depend on flow control being offered.
#[test]
fn graceful_restart_of_a_relay_without_flow_control() {
    ends_survive_a_relay_restart("restart-term-nofc", "TERM", &["--no-flow-control"]);
}
