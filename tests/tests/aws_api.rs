//! AWS's own control API on culvert-relay, driven by the real aws CLI and boto3 from PyPI
//! (pinned in `tests/aws/requirements.txt`, installed into a venv this test makes), unmodified,
//! with the settings a dev relay writes to `client.env`:
//!
//! - the AWS tutorial's commands: `open-tunnel` → the real AWS localproxy as source and
//!   culvertd (notified over MQTT) as destination → a real ssh session through it;
//!   `rotate-tunnel-access-token --client-mode DESTINATION --destination-config …` re-delivers
//!   the token over MQTT to another gateway, which takes the tunnel over; `close-tunnel`, then
//!   `--delete true`;
//! - boto3 (tests/aws/boto3_checks.py): tags round-trip, paging by nextToken, timestamps, and the
//!   refusals AWS gives for a missing tunnel, a wrong secret, an unknown key, a skewed clock, a
//!   replayed signature and an operator outside their grant.
//!
//! Needs python3 with venv and pip (Debian: python3-venv), and the PyPI registry on first run;
//! without them the tests fail and say so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use culvert_e2e::*;

/// The venv holding the pinned aws CLI and boto3.
fn aws_venv() -> PathBuf {
    python_venv("aws-venv", "tests/aws/requirements.txt")
}

/// What the dev relay's `client.env` exports.
fn client_env(relay: &Relay) -> HashMap<String, String> {
    let text = std::fs::read_to_string(relay.dir.join("relay-state/client.env")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A command of the venv (`aws`, `python`) with exactly `client.env`'s settings: no AWS
/// configuration or credentials of this machine's user.
fn venv_command(relay: &Relay, program: &str) -> Command {
    let mut c = Command::new(aws_venv().join("bin").join(program));
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            c.env_remove(k);
        }
    }
    c.envs(client_env(relay))
        .env("AWS_CONFIG_FILE", relay.dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            relay.dir.join("no-aws-credentials"),
        )
        .env("AWS_PAGER", "");
    c
}

/// `aws iotsecuretunneling <args> --endpoint-url $CULVERT_AWS_ENDPOINT`.
fn aws(relay: &Relay, args: &[&str]) -> Output {
    let endpoint = client_env(relay)["CULVERT_AWS_ENDPOINT"].clone();
    venv_command(relay, "aws")
        .arg("iotsecuretunneling")
        .args(args)
        .args(["--endpoint-url", &endpoint, "--output", "json"])
        .output()
        .unwrap()
}

fn aws_ok(relay: &Relay, args: &[&str]) -> Value {
    let out = aws(relay, args);
    assert!(
        out.status.success(),
        "aws iotsecuretunneling {args:?} failed: {}",
        stderr_of(&out)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(&out.stdout).expect("the aws CLI prints JSON")
}

fn ssh_echo(sshd: &Sshd, port: u16, word: &str) {
    let ssh = require_tool("ssh", "openssh-client");
    let out = Command::new(ssh)
        .args(sshd.client_opts())
        .args(["-p", &port.to_string()])
        .arg(format!("{}@127.0.0.1", Sshd::user()))
        .arg(format!("echo {word}-$((6*7))"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh failed: {}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{word}-42\n"));
}

#[test]
fn the_aws_tutorial_commands_reach_sshd_through_the_localproxy_and_culvertd() {
    let dir = scratch("aws-cli");
    let sshd = Sshd::start(&dir);
    let relay = Relay::start(&dir);
    let broker = relay.mqtt.expect("the dev relay runs its broker");
    let ssh_target = vec![("SSH", format!("127.0.0.1:{}", sshd.port))];
    let gateway = |thing: &str| {
        let d = dir.join(thing);
        std::fs::create_dir_all(&d).unwrap();
        let rules = mqtt_rules(&d, broker, thing, &relay.add_device(thing), &ssh_target);
        let gw = relay.mqtt_gateway_with(&d, &rules, &format!("culvertd-{thing}"), None);
        wait_log(&gw, "subscribed");
        gw
    };
    let gw1 = gateway("robot-1");

    // The tutorial: open a tunnel to the thing, hand the source token to a localproxy.
    let t = aws_ok(
        &relay,
        &[
            "open-tunnel",
            "--destination-config",
            "thingName=robot-1,services=SSH",
            "--timeout-config",
            "maxLifetimeTimeoutMinutes=30",
        ],
    );
    let id = t["tunnelId"].as_str().unwrap().to_owned();
    assert_eq!(
        t["tunnelArn"],
        format!("arn:aws:iot:us-east-1:000000000000:tunnel/{id}")
    );
    relay.wait_side(&id, "destination", "CONNECTED");
    let port = free_port();
    let _lp = spawn_localproxy(
        &relay,
        &dir,
        t["sourceAccessToken"].as_str().unwrap(),
        None,
        &["-s", &port.to_string()],
        "localproxy-src",
    );
    relay.wait_side(&id, "source", "CONNECTED");
    ssh_echo(&sshd, port, "robot-1");

    // Without --endpoint-url: the SDKs' own per-service endpoint variable from client.env.
    let listed = venv_command(&relay, "aws")
        .args(["iotsecuretunneling", "list-tunnels", "--output", "json"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", stderr_of(&listed));
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["tunnelSummaries"][0]["tunnelId"], id.as_str());
    assert_eq!(listed["tunnelSummaries"][0]["status"], "OPEN");

    let d = aws_ok(&relay, &["describe-tunnel", "--tunnel-id", &id])["tunnel"].clone();
    assert_eq!(d["sourceConnectionState"]["status"], "CONNECTED");
    assert_eq!(d["destinationConnectionState"]["status"], "CONNECTED");
    assert_eq!(d["destinationConfig"]["thingName"], "robot-1");
    assert_eq!(d["timeoutConfig"]["maxLifetimeTimeoutMinutes"], 30);

    // The destination moves to another gateway: the new token goes out over MQTT to robot-2,
    // robot-1's connection is cut, and the localproxy's next session lands on robot-2.
    let gw2 = gateway("robot-2");
    let r = aws_ok(
        &relay,
        &[
            "rotate-tunnel-access-token",
            "--tunnel-id",
            &id,
            "--client-mode",
            "DESTINATION",
            "--destination-config",
            "thingName=robot-2,services=SSH",
        ],
    );
    assert!(r["destinationAccessToken"].is_string());
    assert!(r.get("sourceAccessToken").is_none(), "{r}");
    wait_log(&gw2, "connected to relay as destination");
    wait_for("robot-2 to take the tunnel over", || {
        let d = aws_ok(&relay, &["describe-tunnel", "--tunnel-id", &id])["tunnel"].clone();
        (d["destinationConfig"]["thingName"] == "robot-2"
            && d["destinationConnectionState"]["status"] == "CONNECTED")
            .then_some(())
    });
    ssh_echo(&sshd, port, "robot-2");
    drop(gw1);

    // close-tunnel, then --delete true: the tunnel is gone, AWS's way.
    // An empty answer ({}), which the CLI prints as nothing.
    assert_eq!(
        aws_ok(&relay, &["close-tunnel", "--tunnel-id", &id]),
        Value::Null
    );
    let d = aws_ok(&relay, &["describe-tunnel", "--tunnel-id", &id])["tunnel"].clone();
    assert_eq!(d["status"], "CLOSED");
    aws_ok(&relay, &["close-tunnel", "--tunnel-id", &id, "--delete"]);
    let gone = aws(&relay, &["describe-tunnel", "--tunnel-id", &id]);
    assert!(!gone.status.success());
    assert!(
        stderr_of(&gone).contains("(ResourceNotFoundException)"),
        "{}",
        stderr_of(&gone)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn boto3_tags_pages_and_is_refused_the_aws_way() {
    let dir = scratch("aws-boto3");
    let relay = Relay::start(&dir);
    relay.api(&["operator", "add", "alice", "--role", "operator"]);
    relay.api(&[
        "operator",
        "grant",
        "add",
        "alice",
        "--thing",
        "cell-1",
        "--service",
        "SSH",
    ]);
    let key = relay.api(&["operator", "key", "create", "alice", "--aws"]);
    let key_id = key["accessKeyId"].as_str().unwrap();
    assert!(key_id.starts_with("CKIA"), "{key}");
    let out = venv_command(&relay, "python")
        .arg(workspace().join("tests/aws/boto3_checks.py"))
        .env("THING", "cell-1")
        .env("OTHER_THING", "cell-2")
        .env("OPERATOR_KEY_ID", key_id)
        .env("OPERATOR_SECRET", key["secretAccessKey"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3_checks.py failed: {}",
        stderr_of(&out)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();

    // Pages of 2 by nextToken, newest first, nothing missed (botocore has no paginator for
    // this service, so scripts follow nextToken as this one does).
    let opened: Vec<&str> = seen["opened"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let pages = seen["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 3, "{pages:?}");
    let walked: Vec<&str> = pages
        .iter()
        .flat_map(|p| p.as_array().unwrap().iter().map(|v| v.as_str().unwrap()))
        .collect();
    let newest_first: Vec<&str> = opened.iter().rev().copied().collect();
    assert_eq!(walked, newest_first);

    assert_eq!(seen["created_at_is_a_datetime"], true);
    assert_eq!(seen["lifetime"], 30);
    let tags = serde_json::json!([["owner", "équipe maintenance"], ["site", "lab-2"]]);
    assert_eq!(seen["tags"], tags);
    assert_eq!(seen["described_tags"], tags);

    let refused = |what: &str, code: &str, status: u16, says: &str| {
        let e = &seen[what];
        assert_eq!(e["code"], code, "{what}: {e}");
        assert_eq!(e["status"], status, "{what}: {e}");
        let m = e["message"].as_str().unwrap();
        assert!(m.contains(says), "{what}: {m:?} does not say {says:?}");
    };
    refused(
        "missing",
        "ResourceNotFoundException",
        404,
        "no-such-tunnel",
    );
    refused(
        "wrong_secret",
        "InvalidSignatureException",
        403,
        "The request signature we calculated does not match",
    );
    refused(
        "unknown_key",
        "UnrecognizedClientException",
        403,
        "The security token included in the request is invalid",
    );
    refused(
        "skewed",
        "InvalidSignatureException",
        403,
        "Signature expired",
    );
    assert_eq!(seen["replay"]["first"], 200);
    assert_eq!(seen["replay"]["again"], 403);
    assert_eq!(
        seen["replay"]["again_body"]["__type"],
        "InvalidSignatureException"
    );
    refused(
        "operator_outside_grant",
        "AccessDeniedException",
        403,
        "is not authorized to perform: iot:OpenTunnel",
    );
    refused(
        "operator_other_service",
        "AccessDeniedException",
        403,
        "VNC",
    );
    refused(
        "operator_closes_outside_grant",
        "AccessDeniedException",
        403,
        "iot:CloseTunnel",
    );
    // The operator sees the tunnels of the thing their grant names, not the other one.
    let sees: Vec<&str> = seen["operator_sees"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(sees.contains(&seen["operator_inside_grant"].as_str().unwrap()));
    assert!(!sees.contains(&seen["other_tunnel"].as_str().unwrap()));
    assert_eq!(
        sees.len(),
        6,
        "5 of the admin's and their own on cell-1: {sees:?}"
    );

    // Revoked (named by its access key id), the pair stops working at once.
    relay.api(&["operator", "key", "revoke", "alice", key_id]);
    let endpoint = client_env(&relay)["CULVERT_AWS_ENDPOINT"].clone();
    let out = venv_command(&relay, "aws")
        .env("AWS_ACCESS_KEY_ID", key_id)
        .env(
            "AWS_SECRET_ACCESS_KEY",
            key["secretAccessKey"].as_str().unwrap(),
        )
        .args([
            "iotsecuretunneling",
            "list-tunnels",
            "--endpoint-url",
            &endpoint,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("(UnrecognizedClientException)") && err.contains("was revoked"),
        "{err}"
    );

    // Every refusal is in the audit trail, and the operator's calls are under their name.
    let audit = audit_records(&relay.dir.join("relay-state/audit.jsonl"));
    assert!(audit.iter().any(|r| {
        r["event"] == "api_refused"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("Signature expired"))
    }));
    assert!(audit.iter().any(|r| r["event"] == "denied"
        && r["operator"] == "alice"
        && r["action"] == "OpenTunnel"));
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "tunnel_open" && r["operator"] == "alice")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay's CA must be what AWS_CA_BUNDLE names; a client without it is refused by TLS,
/// not answered; a GET of / is told where things are.
#[test]
fn the_dev_client_env_names_the_ca_region_and_endpoint() {
    let dir = scratch("aws-env");
    let relay = Relay::start(&dir);
    let env = client_env(&relay);
    assert_eq!(Path::new(&env["AWS_CA_BUNDLE"]), relay.ca.as_path());
    assert_eq!(env["AWS_DEFAULT_REGION"], "us-east-1");
    assert_eq!(
        env["CULVERT_AWS_ENDPOINT"],
        format!("https://{}", relay.addr)
    );
    assert_eq!(
        env["AWS_ENDPOINT_URL_IOTSECURETUNNELING"],
        env["CULVERT_AWS_ENDPOINT"]
    );
    let out = venv_command(&relay, "aws")
        .env_remove("AWS_CA_BUNDLE")
        .args(["iotsecuretunneling", "list-tunnels"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        stderr_of(&out)
    );
    // Anything but POST / there is culvert's JSON 404 saying where things are.
    let curl = require_tool("curl", "curl");
    let got = run_ok(
        "curl GET /",
        Command::new(curl)
            .args(["-s", "-w", "\n%{http_code}", "--cacert"])
            .arg(&relay.ca)
            .arg(format!("https://{}/", relay.addr)),
    );
    assert!(
        got.ends_with("\n404") && got.contains("AWS's API is POST /"),
        "{got}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
