//! The relay is killed mid-tunnel and restarted: both ends reconnect by themselves with their
//! client tokens, and new connections work.

use culvert_e2e::*;

#[test]
fn relay_restart_mid_tunnel() {
    let dir = scratch("restart");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cafe-cell-7", &["ECHO"]);
    let rules = rules(&dir, &[("ECHO", echo.to_string())]);
    let mut gw = relay.gateway(&dir, &rules, &t.destination);
    let (mut px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"before the crash"));

    let addr = relay.addr;
    let mut relay = relay;
    relay.proc.signal("KILL");
    let _ = relay.proc.wait_exit();
    drop(relay);
    let relay = Relay::start_on(&dir, addr);
    assert_eq!(
        relay.describe(&t.id)["status"],
        "OPEN",
        "the tunnel survived the restart"
    );
    relay.wait_side(&t.id, "destination", "CONNECTED");
    relay.wait_side(&t.id, "source", "CONNECTED");
    assert!(echo_works(ports["ECHO"], b"after the restart"));
    let data = random_bytes(256 * 1024);
    assert!(round_trip(connect_local(ports["ECHO"]), data.clone()) == data);
    assert!(gw.is_running() && px.is_running());
    let _ = std::fs::remove_dir_all(&dir);
}
