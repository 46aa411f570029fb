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
        let rotate = format!("culvert tunnel rotate {} --mode source", t.id);
        assert!(m.contains(&rotate), "{m}");
        let other = culvert_protocol::new_client_token();
        let (s, m) = refused(&relay, &t.source, Mode::Source, Some(&other)).await;
        assert_eq!(s, 403);
        assert!(m.contains("does not match") && m.contains(&rotate), "{m}");
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
        let rotate = format!("culvert tunnel rotate {} --mode destination", t.id);
        assert!(m.contains(&rotate), "{m}");
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

/// The newcomer's case: `culvert connect` killed (or started with a typo in `-s`) and run again
/// with the same token. The second run makes a new client token, so the relay refuses it; the
/// message names the command that helps, and following it works.
#[test]
fn a_restarted_connect_is_told_which_token_to_rotate_and_how() {
    let dir = scratch("tokens-restart");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("door-3", &["SSH"]);
    let (mut first, _) = relay.proxy(&dir, &t.source, &["SSH"]);
    relay.wait_side(&t.id, "source", "CONNECTED");
    first.kill();
    let again = relay
        .culvert()
        .args(["connect", "-s", "SSH=0"])
        .env("CULVERT_ACCESS_TOKEN", &t.source)
        .output()
        .unwrap();
    let err = stderr_of(&again);
    assert_eq!(again.status.code(), Some(3), "{err}");
    let advice = format!("culvert tunnel rotate {} --mode source", t.id);
    assert!(err.contains(&advice), "{err}");
    // As advised: rotate, then connect with the new source token.
    let args: Vec<&str> = advice.split_whitespace().skip(1).collect();
    let rotated = relay.api(&args);
    let token = rotated["sourceAccessToken"].as_str().unwrap();
    let (_px, _) = relay.proxy(&dir, token, &["SSH"]);
    relay.wait_side(&t.id, "source", "CONNECTED");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without the relay's CA, `culvert connect` does not retry forever: it ends at once, says what
/// to pass, and exits 4.
#[test]
fn an_untrusted_relay_certificate_ends_connect_with_what_to_pass() {
    let dir = scratch("tokens-untrusted");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("door-4", &["SSH"]);
    let out = relay
        .culvert()
        .env_remove("CULVERT_CA")
        .args(["connect", "-s", "SSH=0"])
        .env("CULVERT_ACCESS_TOKEN", &t.source)
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("is not trusted (UnknownIssuer)") && err.contains("--ca FILE"),
        "{err}"
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
