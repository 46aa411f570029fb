//! Every misuse of an access token is refused with a 4xx and a message that says why; the right
//! client token is accepted for a reconnect.

use culvert_e2e::raw::{self, closed_with, refused};
use culvert_e2e::*;
use culvert_protocol::Mode;

#[test]
fn token_misuse_is_refused_with_a_reason() {
    let dir = scratch("tokens");
    let relay = Relay::start(&dir);
    let rt = raw::runtime();
    let t = relay.open_tunnel("door-1", &["SSH"]);
    let ct = culvert_protocol::new_client_token();
    rt.block_on(async {
        let (s, m) = refused(&relay, "not-a-token", Mode::Source, None).await;
        assert_eq!(s, 403);
        assert!(m.contains("unknown access token"), "{m}");

        let (s, m) = refused(&relay, &t.source, Mode::Destination, None).await;
        assert_eq!(s, 400);
        assert!(m.contains("source access token"), "{m}");

        // First use binds the client token; a reconnect must present it.
        let mut first = raw::connect(&relay, &t.source, Mode::Source, Some(&ct))
            .await
            .expect("first use of the source token");
        let (s, m) = refused(&relay, &t.source, Mode::Source, None).await;
        assert_eq!(s, 403);
        assert!(
            m.contains("already used") && m.contains("client-token"),
            "{m}"
        );
        let other = culvert_protocol::new_client_token();
        let (s, m) = refused(&relay, &t.source, Mode::Source, Some(&other)).await;
        assert_eq!(s, 403);
        assert!(m.contains("does not match"), "{m}");
        let _second = raw::connect(&relay, &t.source, Mode::Source, Some(&ct))
            .await
            .expect("a reconnect with the right client token is accepted");
        let (_, reason) = closed_with(&mut first).await;
        assert!(
            reason.contains("replaced"),
            "the replaced peer is told why: {reason}"
        );

        // Without a client token the token is single-use.
        let _d = raw::connect(&relay, &t.destination, Mode::Destination, None)
            .await
            .expect("first use of the destination token");
        let (s, m) = refused(&relay, &t.destination, Mode::Destination, None).await;
        assert_eq!(s, 403);
        assert!(m.contains("cannot be used again"), "{m}");
    });

    // Rotation: the old token is refused as rotated, the new one works.
    let rotated = relay.api(&["tunnel", "rotate", &t.id, "--mode", "destination"]);
    let new_dst = rotated["destinationAccessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(rotated.get("sourceAccessToken").is_none());
    rt.block_on(async {
        let (s, m) = refused(&relay, &t.destination, Mode::Destination, None).await;
        assert_eq!(s, 403);
        assert!(m.contains("rotated"), "{m}");
        raw::connect(&relay, &new_dst, Mode::Destination, None)
            .await
            .expect("the rotated-in token works");
    });

    // Closed tunnel.
    relay.api(&["tunnel", "close", &t.id]);
    rt.block_on(async {
        let (s, m) = refused(&relay, &t.source, Mode::Source, Some(&ct)).await;
        assert_eq!(s, 410);
        assert!(m.contains("closed"), "{m}");
    });

    // The CLI proxy reports a refusal and exits with code 3.
    let out = relay
        .culvert()
        .args(["connect", "-s", "SSH=0", "--token", "not-a-token"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("unknown access token"),
        "{}",
        stderr_of(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn expired_tunnel_refuses_its_tokens() {
    let dir = scratch("expiry");
    let relay = Relay::start(&dir);
    let v = relay.api(&[
        "tunnel",
        "open",
        "--thing",
        "door-2",
        "--service",
        "SSH",
        "--lifetime",
        "1",
    ]);
    let id = v["tunnelId"].as_str().unwrap().to_owned();
    let src = v["sourceAccessToken"].as_str().unwrap().to_owned();
    // The shortest lifetime is one minute; wait (bounded) for the relay to expire it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let d = relay.describe(&id);
        if d["status"] == "CLOSED" {
            assert_eq!(d["closeReason"], "expired");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tunnel did not expire: {d}"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    raw::runtime().block_on(async {
        let (s, m) = refused(&relay, &src, Mode::Source, None).await;
        assert_eq!(s, 410);
        assert!(m.contains("expired"), "{m}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
