//! Rotation and close disconnect the right peers, and the programs say so and exit non-zero.

use culvert_e2e::*;

#[test]
fn rotation_disconnects_only_the_rotated_side() {
    let dir = scratch("rotate");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("press-2", &["HMI"]);
    let rules = rules(&dir, &[("HMI", echo.to_string())]);
    let mut gw = relay.gateway(&dir, &rules, &t.destination);
    let (mut px, ports) = relay.proxy(&dir, &t.source, &["HMI"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(echo_works(ports["HMI"], b"before rotation"));

    let v = relay.api(&["tunnel", "rotate", &t.id, "--mode", "destination"]);
    let new_dst = v["destinationAccessToken"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.wait_exit(),
        3,
        "culvertd exits 3 when its token is rotated away"
    );
    assert!(gw.log_text().contains("rotated"), "{}", gw.log_text());
    assert!(px.is_running(), "the source proxy is not affected");
    assert_eq!(
        relay.describe(&t.id)["sourceConnectionState"]["status"],
        "CONNECTED"
    );

    // The gateway with the new token carries traffic again.
    let _gw2 = relay.gateway(&dir, &rules, &new_dst);
    assert!(echo_works(ports["HMI"], b"after rotation"));

    relay.api(&["tunnel", "rotate", &t.id, "--mode", "source"]);
    assert_eq!(
        px.wait_exit(),
        3,
        "culvert connect exits 3 when its token is rotated away"
    );
    assert!(px.log_text().contains("rotated"), "{}", px.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn close_disconnects_both_sides() {
    let dir = scratch("close");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("press-3", &["HMI"]);
    let rules = rules(&dir, &[("HMI", echo.to_string())]);
    let mut gw = relay.gateway(&dir, &rules, &t.destination);
    let (mut px, ports) = relay.proxy(&dir, &t.source, &["HMI"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(echo_works(ports["HMI"], b"open"));

    let out = relay
        .culvert()
        .args(["tunnel", "close", &t.id])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("closed"));
    assert_eq!(px.wait_exit(), 3);
    assert!(px.log_text().contains("is closed"), "{}", px.log_text());
    assert_eq!(gw.wait_exit(), 3);
    assert!(gw.log_text().contains("is closed"), "{}", gw.log_text());
    let d = relay.describe(&t.id);
    assert_eq!(d["status"], "CLOSED");
    assert_eq!(d["sourceConnectionState"]["status"], "DISCONNECTED");

    // Asking about a tunnel that does not exist is an error a script can see.
    let out = relay
        .culvert()
        .args(["tunnel", "describe", "no-such-tunnel"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("404"), "{}", stderr_of(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
