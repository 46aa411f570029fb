//! Tunnels reach the gateway by themselves through the relay's embedded MQTT broker: no token
//! handled by hand.

use std::process::Command;
use std::time::Duration;

use culvert_e2e::raw::{self, refused};
use culvert_e2e::*;
use culvert_protocol::Mode;

#[test]
fn open_with_the_cli_and_ssh_through_the_notified_gateway() {
    let dir = scratch("mqtt-ssh");
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let relay = Relay::start(&dir);
    let broker = relay.mqtt.expect("--dev runs the embedded broker");
    let password = relay.add_device("robot-3");
    let rules = mqtt_rules(
        &dir,
        broker,
        "robot-3",
        &password,
        &[("SSH", format!("127.0.0.1:{}", sshd.port))],
    );
    let gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");

    let t = relay.open_tunnel("robot-3", &["SSH"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["SSH"]);
    let out = Command::new(&ssh)
        .args(sshd.client_opts())
        .args([
            "-p",
            &ports["SSH"].to_string(),
            &format!("{}@127.0.0.1", Sshd::user()),
            "echo notified-$((6*7))",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh failed: {}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "notified-42\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `culvert-relay --dev` chooses its ports once: after a restart the gateway configured from
/// `culvert device add` hears the relay again and the shell's `client.env` still points at it.
#[test]
fn a_restarted_dev_relay_keeps_its_ports_and_its_gateways() {
    let dir = scratch("mqtt-dev-ports");
    let echo = echo_server();
    let grace = ["--shutdown-grace-secs".to_owned(), "1".to_owned()];
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut relay = Relay::start_with(&dir, any, &grace);
    let (addr, mqtt) = (relay.addr, relay.mqtt.unwrap());
    let password = relay.add_device("coffee-robot-3");
    let rules = mqtt_rules(
        &dir,
        mqtt,
        "coffee-robot-3",
        &password,
        &[("ECHO", echo.to_string())],
    );
    let gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");

    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(), 0, "{}", relay.proc.log_text());
    drop(relay);
    // Asked for any port again, as the first time.
    let relay = Relay::start_with(&dir, any, &grace);
    assert_eq!(relay.addr, addr, "the API port changed across the restart");
    assert_eq!(
        relay.mqtt,
        Some(mqtt),
        "the MQTT port changed across the restart"
    );
    wait_log_count(&gw, "subscribed", 2);
    let t = relay.open_tunnel("coffee-robot-3", &["ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    assert!(echo_works(ports["ECHO"], b"heard after the restart"));

    // A kept port another process holds: the relay says so and what to do, not a new port.
    let mut relay = relay;
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(), 0);
    drop(relay);
    let _squatter = std::net::TcpListener::bind(mqtt).unwrap();
    let out = Command::new(bin("culvert-relay"))
        .args(["--dev", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.join("relay-state"))
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot listen for MQTT on {mqtt}"))
            && err.contains("keeps the ports of its first start")
            && err.contains("relay-state/ports"),
        "{err}"
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gateway_offline_at_open_time_still_gets_the_tunnel() {
    let dir = scratch("mqtt-offline");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let password = relay.add_device("door-7");
    let rules = mqtt_rules(
        &dir,
        relay.mqtt.unwrap(),
        "door-7",
        &password,
        &[("ECHO", echo.to_string())],
    );
    // The gateway has been online once (its persistent session exists), then goes offline.
    let mut gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");
    gw.kill();

    let t = relay.open_tunnel("door-7", &["ECHO"]);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        relay.describe(&t.id)["destinationConnectionState"]["status"],
        "DISCONNECTED"
    );
    let gw = relay.mqtt_gateway(&dir, &rules);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    assert!(echo_works(
        ports["ECHO"],
        b"delivered after the gateway came back"
    ));
    assert!(
        gw.log_text().contains("tunnel notification"),
        "{}",
        gw.log_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gateway_started_for_the_first_time_after_the_open_gets_the_tunnel() {
    let dir = scratch("mqtt-first");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let password = relay.add_device("new-cell");
    let t = relay.open_tunnel("new-cell", &["ECHO"]);
    // The notification went out before this gateway ever subscribed. Either the broker still
    // delivers it, or the relay re-announces the unclaimed tunnel once the device subscribes:
    // what counts is that the tunnel comes up.
    let rules = mqtt_rules(
        &dir,
        relay.mqtt.unwrap(),
        "new-cell",
        &password,
        &[("ECHO", echo.to_string())],
    );
    let _gw = relay.mqtt_gateway(&dir, &rules);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    assert!(echo_works(ports["ECHO"], b"first start after the open"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new password, or removing the device, cuts the gateway's broker connection at once, and its
/// old password no longer gets it back in.
#[test]
fn a_new_password_or_removing_the_device_cuts_its_broker_connection() {
    let dir = scratch("mqtt-revoke");
    let relay = Relay::start(&dir);
    let mut gateways = Vec::new();
    for thing in ["kiosk-9", "kiosk-10"] {
        let password = relay.add_device(thing);
        let rules = mqtt_rules(
            &dir,
            relay.mqtt.unwrap(),
            thing,
            &password,
            &[("ECHO", echo_server().to_string())],
        );
        let gw = relay.mqtt_gateway_with(&dir, &rules, &format!("culvertd-{thing}"), None);
        wait_log(&gw, "subscribed");
        gateways.push(gw);
    }
    relay.add_device("kiosk-9");
    wait_log(
        &relay.proc,
        "device kiosk-9 was removed or got a new password",
    );
    // Its reconnect, with the old password, is refused.
    wait_log(&gateways[0], "BadUserNamePassword");
    relay.api(&["device", "remove", "kiosk-10"]);
    wait_log(
        &relay.proc,
        "device kiosk-10 was removed or got a new password",
    );
    wait_log(&gateways[1], "BadUserNamePassword");
    drop(gateways);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rotation_moves_the_gateway_to_the_new_token() {
    let dir = scratch("mqtt-rotate");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let password = relay.add_device("plc-2");
    let rules = mqtt_rules(
        &dir,
        relay.mqtt.unwrap(),
        "plc-2",
        &password,
        &[("ECHO", echo.to_string())],
    );
    let gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");
    let t = relay.open_tunnel("plc-2", &["ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    assert!(echo_works(ports["ECHO"], b"before rotation"));

    relay.api(&["tunnel", "rotate", &t.id, "--mode", "destination"]);
    // The old session ends: replaced by the new token's, or refused first (whichever is first).
    wait_for("the old token's session to end", || {
        let log = gw.log_text();
        (log.contains("no longer accepts its token") || log.contains("the old session stops"))
            .then_some(())
    });
    assert!(echo_works(
        ports["ECHO"],
        b"after rotation, through the new token"
    ));
    raw::runtime().block_on(async {
        let (status, msg) = refused(&relay, &t.destination, Mode::Destination, None).await;
        assert_eq!(status, 403);
        assert!(msg.contains("rotated"), "{msg}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_device_cannot_read_another_devices_notifications() {
    let dir = scratch("mqtt-acl");
    let relay = Relay::start(&dir);
    let broker = relay.mqtt.unwrap();
    let _pa = relay.add_device("device-a");
    let pb = relay.add_device("device-b");
    let tls = culvert_protocol::client::tls_config(Some(&relay.ca)).unwrap();
    raw::runtime().block_on(async {
        use rumqttc::{
            AsyncClient, ConnectReturnCode, MqttOptions, QoS, SubscribeReasonCode,
            TlsConfiguration, Transport,
        };
        let connect = |client_id: &str, user: &str, pass: &str| {
            let mut o = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
            o.set_credentials(user, pass)
                .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    tls.clone(),
                )));
            AsyncClient::new(o, 10)
        };
        // Device B's credentials, subscribing to device A's notify topic: refused.
        let (client, mut ev) = connect("device-b", "device-b", &pb);
        client
            .subscribe("$aws/things/device-a/tunnels/notify", QoS::AtLeastOnce)
            .await
            .unwrap();
        let code = next_suback(&mut ev).await;
        assert_eq!(code, vec![SubscribeReasonCode::Failure]);
        // Its own topic is fine.
        client
            .subscribe("$aws/things/device-b/tunnels/notify", QoS::AtLeastOnce)
            .await
            .unwrap();
        let code = next_suback(&mut ev).await;
        assert_eq!(code, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

        // B's credentials with A's client id (to take over A's session): refused.
        let (_c, mut ev) = connect("device-a", "device-b", &pb);
        let r = tokio::time::timeout(WAIT, ev.poll()).await.unwrap();
        match r {
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::BadClientId)
            }
            other => panic!("expected a refused connection, got {other:?}"),
        }
        // A wrong password: refused.
        let (_c, mut ev) = connect("device-a", "device-a", "wrong");
        let r = tokio::time::timeout(WAIT, ev.poll()).await.unwrap();
        assert!(
            matches!(
                r,
                Err(rumqttc::ConnectionError::ConnectionRefused(
                    ConnectReturnCode::BadUserNamePassword
                ))
            ),
            "{r:?}"
        );
    });
    assert!(relay.proc.log_text().contains("subscription refused"));
    // A device with a last will (which the broker would publish for it) is refused.
    raw::runtime().block_on(async {
        use rumqttc::{
            AsyncClient, ConnectReturnCode, LastWill, MqttOptions, QoS, TlsConfiguration, Transport,
        };
        let mut o = MqttOptions::new("device-b", broker.ip().to_string(), broker.port());
        o.set_credentials("device-b", &pb)
            .set_last_will(LastWill::new(
                "$aws/things/device-a/tunnels/notify",
                "forged",
                QoS::AtLeastOnce,
                true,
            ))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        let (_c, mut ev) = AsyncClient::new(o, 10);
        let r = tokio::time::timeout(WAIT, ev.poll()).await.unwrap();
        assert!(
            matches!(
                r,
                Err(rumqttc::ConnectionError::ConnectionRefused(
                    ConnectReturnCode::NotAuthorized
                ))
            ),
            "{r:?}"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway with health reports on tells the relay which services it has rules for and
/// whether their targets answer; `device list` and `tunnel describe` show it, `tunnel open`
/// warns of a service with no rule and `--strict` refuses to open one.
#[test]
fn health_reports_show_each_target_and_strict_open_refuses_a_service_without_a_rule() {
    let dir = scratch("mqtt-health");
    let relay = Relay::start(&dir);
    let password = relay.add_device("press-2");
    let plc = closed_port("127.0.0.1");
    let rules = mqtt_rules(
        &dir,
        relay.mqtt.unwrap(),
        "press-2",
        &password,
        &[
            ("SSH", echo_server().to_string()),
            ("PLC", plc.to_string()),
            ("SNMP", "udp:127.0.0.1:161".into()),
        ],
    );
    let text = std::fs::read_to_string(&rules)
        .unwrap()
        .replace("[mqtt]\n", "[mqtt]\nhealth_report_secs = 1\n");
    std::fs::write(&rules, text).unwrap();
    let gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");

    let device = |relay: &Relay| {
        let v = relay.api(&["device", "list"]);
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["thingName"] == "press-2")
            .cloned()
            .unwrap()
    };
    let state = |d: &serde_json::Value, name: &str| {
        d["health"]["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .map(|s| s["state"].as_str().unwrap().to_owned())
    };
    let d = wait_for("press-2's first health report", || {
        let d = device(&relay);
        d["health"].is_object().then_some(d)
    });
    assert_eq!(d["online"], true, "{d}");
    assert_eq!(state(&d, "SSH").as_deref(), Some("up"), "{d}");
    assert_eq!(state(&d, "PLC").as_deref(), Some("down"), "{d}");
    assert_eq!(state(&d, "SNMP").as_deref(), Some("unchecked"), "{d}");
    let plc_line = d["health"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "PLC")
        .unwrap()
        .to_string();
    assert!(plc_line.contains("refused"), "{d}");
    let human = run_ok("device list", relay.culvert().args(["device", "list"]));
    assert!(
        human.contains("press-2") && human.contains("online"),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.contains("PLC") && l.contains(&plc.to_string()) && l.contains("DOWN")),
        "{human}"
    );
    wait_log(&gw, "target does not answer");

    // --strict opens nothing for a service the gateway has no rule for...
    let out = relay
        .culvert()
        .args([
            "tunnel",
            "open",
            "--thing",
            "press-2",
            "--service",
            "SSH,VNC",
            "--strict",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("press-2 has no rule for VNC") && err.contains("SNMP"),
        "{err}"
    );
    let list = relay.api(&["tunnel", "list"]);
    assert_eq!(list["tunnels"].as_array().unwrap().len(), 0, "{list}");
    // ...and without it, opens with a warning; the description shows each service.
    let out = relay
        .culvert()
        .args([
            "tunnel",
            "open",
            "--thing",
            "press-2",
            "--service",
            "PLC,VNC",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("warning: press-2 has no rule for VNC"),
        "{err}"
    );
    assert!(err.contains("target for PLC"), "{err}");
    let id = relay.api(&["tunnel", "list"])["tunnels"][0]["tunnelId"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = relay.describe(&id);
    assert_eq!(v["health"]["services"][0]["state"], "down", "{v}");
    assert_eq!(v["health"]["services"][1]["state"], "no_rule", "{v}");
    let human = run_ok(
        "describe",
        relay.culvert().args(["tunnel", "describe", &id]),
    );
    assert!(
        human.contains("VNC") && human.contains("NO RULE"),
        "{human}"
    );

    // The PLC comes up: the next report says so.
    let _listening = std::net::TcpListener::bind(plc).unwrap();
    wait_for("the PLC reported up", || {
        (state(&device(&relay), "PLC").as_deref() == Some("up")).then_some(())
    });
    // The gateway goes away: offline, with when it was last seen.
    drop(gw);
    let d = wait_for("press-2 offline", || {
        let d = device(&relay);
        (d["online"] == false).then_some(d)
    });
    assert!(d["lastSeen"].is_string(), "{d}");
    let _ = std::fs::remove_dir_all(&dir);
}
