//! The same relay and gateway against an external broker: mosquitto (Debian package) with TLS
//! and an ACL that confines each device to its own topic. Bad notifications are ignored with a
//! reason, and a broker restart does not touch a live SSH session.

use std::io::Read;
use std::process::{Command, Stdio};

use culvert_e2e::raw;
use culvert_e2e::*;

const ACL: &str = "user culvert-relay\ntopic write $aws/things/+/tunnels/notify\n\n\
                   user admin\ntopic readwrite $aws/#\n\n\
                   pattern read $aws/things/%u/tunnels/notify\n";

#[test]
fn mosquitto_notifications_bad_payloads_and_broker_restart() {
    let dir = scratch("mosquitto");
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let echo = echo_server();
    let state = dev_pki(&dir);
    let mut broker = Mosquitto::start(
        &dir,
        &state,
        &[
            ("culvert-relay", "relay-secret"),
            ("cell-9", "cell-9-secret"),
            ("cell-10", "cell-10-secret"),
            ("admin", "admin-secret"),
        ],
        ACL,
    );
    let relay = Relay::start_with_broker(&dir, broker.addr(), "relay-secret", None);
    let rules = mqtt_rules(
        &dir,
        broker.addr(),
        "cell-9",
        "cell-9-secret",
        &[
            ("SSH", format!("127.0.0.1:{}", sshd.port)),
            ("ECHO", echo.to_string()),
        ],
    );
    let mut gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");

    // Open → the gateway connects by itself → ssh runs a command.
    let t = relay.open_tunnel("cell-9", &["SSH"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["SSH"]);
    let ssh_args = |cmd: &str| {
        let mut a = sshd.client_opts();
        a.extend([
            "-p".into(),
            ports["SSH"].to_string(),
            format!("{}@127.0.0.1", Sshd::user()),
            cmd.into(),
        ]);
        a
    };
    let out = Command::new(&ssh)
        .args(ssh_args("echo via-mosquitto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh failed: {}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-mosquitto\n");

    // Another device's credentials cannot read this device's topic. mosquitto 2.0 answers the
    // SUBSCRIBE (success or 0x80) and enforces its ACL at delivery; so: cell-10 subscribes to
    // cell-9's topic and its own, a message goes to cell-9's topic and then a marker to
    // cell-10's, and the first message cell-10 receives must be the marker.
    raw::runtime().block_on(async {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
        let tls = culvert_protocol::client::tls_config(Some(&relay.ca)).unwrap();
        let mut o = MqttOptions::new("cell-10", "127.0.0.1", broker.port);
        o.set_credentials("cell-10", "cell-10-secret")
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (c, mut ev) = AsyncClient::new(o, 10);
        c.subscribe("$aws/things/cell-9/tunnels/notify", QoS::AtLeastOnce)
            .await
            .unwrap();
        c.subscribe("$aws/things/cell-10/tunnels/notify", QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut subacks = 0;
        while subacks < 2 {
            if let Event::Incoming(Packet::SubAck(_)) = tokio::time::timeout(WAIT, ev.poll())
                .await
                .unwrap()
                .unwrap()
            {
                subacks += 1;
            }
        }
        let (ca, addr) = (relay.ca.clone(), broker.addr());
        std::thread::spawn(move || {
            mqtt_publish(
                addr,
                &ca,
                "admin",
                "admin-secret",
                "$aws/things/cell-9/tunnels/notify",
                b"for cell-9 only".to_vec(),
            );
            mqtt_publish(
                addr,
                &ca,
                "admin",
                "admin-secret",
                "$aws/things/cell-10/tunnels/notify",
                b"marker".to_vec(),
            );
        })
        .join()
        .unwrap();
        let first = tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = ev.poll().await.expect("connection") {
                    return p;
                }
            }
        })
        .await
        .expect("cell-10 receives its own marker");
        assert_eq!(
            first.topic, "$aws/things/cell-10/tunnels/notify",
            "cell-10 read cell-9's topic"
        );
        assert_eq!(&first.payload[..], b"marker");
    });
    wait_log(&gw, "not a tunnel notification");

    // Bad notifications are logged with the reason and ignored.
    let topic = "$aws/things/cell-9/tunnels/notify";
    let closed = relay.open_tunnel("elsewhere", &["SSH"]);
    relay.api(&["tunnel", "close", &closed.id]);
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not a tunnel notification"),
        (vec![b' '; 1 << 20], "larger than"),
        (br#"{"clientAccessToken":"x","clientMode":"source","services":["SSH"]}"#.to_vec(), "clientMode is \"source\""),
        (br#"{"clientAccessToken":"x","clientMode":"destination","services":["VNC"]}"#.to_vec(), "service \"VNC\" has no rule"),
        (
            format!(r#"{{"clientAccessToken":"{}","clientMode":"destination","region":"x","services":["SSH"]}}"#, closed.destination).into_bytes(),
            "no longer accepts its token",
        ),
    ];
    for (payload, reason) in bad {
        mqtt_publish(
            broker.addr(),
            &relay.ca,
            "admin",
            "admin-secret",
            topic,
            payload,
        );
        wait_log(&gw, reason);
    }
    // A duplicate delivery of the live tunnel's notification is harmless.
    let dup = format!(
        r#"{{"clientAccessToken":"{}","clientMode":"destination","region":"x","services":["SSH"]}}"#,
        t.destination
    );
    mqtt_publish(
        broker.addr(),
        &relay.ca,
        "admin",
        "admin-secret",
        topic,
        dup.into_bytes(),
    );
    wait_log(&gw, "duplicate notification ignored");
    assert!(gw.is_running(), "culvertd keeps running");
    let out = Command::new(&ssh)
        .args(ssh_args("echo still-serving"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "still-serving\n",
        "{}",
        stderr_of(&out)
    );

    // Broker restart while an SSH session is carrying output: the session survives.
    let mut session = Command::new(&ssh)
        .args(ssh_args(
            "for i in $(seq 1 25); do echo line-$i; sleep 0.2; done",
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 7];
    session
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"line-1\n");
    broker.restart();
    let out = session.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the SSH session died: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("line-25\n"), "{text}");
    assert_eq!(
        text.lines().count(),
        24,
        "every line after the first arrived: {text}"
    );

    // A tunnel opened after the broker is back still reaches the gateway.
    wait_log(&gw, "connected to MQTT broker session_present=false");
    let t2 = relay.open_tunnel("cell-9", &["ECHO"]);
    relay.wait_side(&t2.id, "destination", "CONNECTED");
    let (_px2, ports2) = relay.proxy(&dir, &t2.source, &["ECHO"]);
    assert!(echo_works(ports2["ECHO"], b"after the broker restart"));
    assert!(gw.is_running());
    gw.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gateway_authenticated_by_client_certificate() {
    let dir = scratch("mosquitto-cert");
    let echo = echo_server();
    let pki = test_pki(&dir, "cell-cert");
    let cert_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = Mosquitto::start_with(
        &dir,
        &pki,
        &[("culvert-relay", "relay-secret")],
        ACL,
        Some(cert_port),
    );
    let relay = Relay::start_with_broker(
        &dir,
        broker.addr(),
        "relay-secret",
        Some(&pki.join("ca.pem")),
    );
    // No password: the gateway's identity is its certificate (CN = thing name).
    let rules = dir.join("culvertd-cert.toml");
    std::fs::write(
        &rules,
        format!(
            "{LOOPBACK_ACL}[mqtt]\nbroker = \"mqtts://127.0.0.1:{cert_port}\"\nthing_name = \"cell-cert\"\n\
             client_cert = \"{}\"\nclient_key = \"{}\"\nca = \"{}\"\n\n[services.ECHO]\ntarget = \"{echo}\"\n",
            pki.join("client.pem").display(),
            pki.join("client-key.pem").display(),
            pki.join("ca.pem").display(),
        ),
    )
    .unwrap();
    let gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed to tunnel notifications");
    let t = relay.open_tunnel("cell-cert", &["ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    assert!(echo_works(
        ports["ECHO"],
        b"certificate-authenticated gateway"
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
