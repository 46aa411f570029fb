//! The README's quick-start command (`cargo run -p culvert-demo`) brings the system up and
//! carries traffic; `--once` makes it stop after its own check. Stopped by SIGTERM it takes
//! everything it started with it, and a relay left holding its state is named, not waited for.
//! (One test: every run of the demo uses the same target ports.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use culvert_e2e::*;

fn demo(dir: &std::path::Path) -> Command {
    let mut c = Command::new(bin("culvert-demo"));
    c.env("CULVERT_DEMO_DIR", dir);
    c
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for this purpose: it holds no port, no lock.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn quick_start_demo_comes_up_carries_traffic_and_stops_cleanly() {
    let dir = scratch("demo");
    let out = demo(&dir).arg("--once").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        stderr_of(&out)
    );
    assert!(stdout.contains("came back through the tunnel"), "{stdout}");
    assert!(stdout.contains("curl http://127.0.0.1:"), "{stdout}");

    // In the foreground until a signal; SIGTERM stops it and every process it started.
    let mut run = demo(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = run.id();
    let stdout = BufReader::new(run.stdout.take().unwrap());
    let lines: Vec<String> = stdout
        .lines()
        .map_while(Result::ok)
        .take(100)
        .take_while(|l| !l.starts_with("Press Ctrl-C"))
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("Checked:")),
        "the demo did not come up: {lines:#?}"
    );
    // The commands it prints work as printed, pasted into a shell.
    let printed = |start: &str| -> String {
        lines
            .iter()
            .find_map(|l| Some(l[l.find(start)?..].split("   (").next()?.trim().to_owned()))
            .unwrap_or_else(|| panic!("no `{start}` command printed: {lines:#?}"))
    };
    let shell = |cmd: &str| run_ok(cmd, Command::new("sh").args(["-c", cmd]));
    require_tool("curl", "curl");
    let page = shell(&printed("curl http://"));
    assert!(page.contains("Hello from robot cell 7"), "{page}");
    let ssh = format!("{} echo through the tunnel", printed("ssh -p"));
    assert_eq!(shell(&ssh).trim(), "through the tunnel");
    let list = shell(&printed(". /"));
    assert!(list.contains("robot-cell-7"), "{list}");
    let devices = lines
        .iter()
        .find_map(|l| Some(l[l.find(". /")?..].to_owned()).filter(|_| l.contains("device list")))
        .unwrap_or_else(|| panic!("no `device list` command printed: {lines:#?}"));
    let devices = shell(devices.trim());
    assert!(
        devices.contains("robot-cell-7") && devices.contains("online"),
        "{devices}"
    );
    // The web console it prints: its page, and a login with the password it prints.
    let console = lines
        .iter()
        .find(|l| l.contains("web console"))
        .unwrap_or_else(|| panic!("no web console printed: {lines:#?}"));
    let url = console
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap();
    let password = console
        .split("password ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap();
    let ca = dir.join("ca.pem");
    let login = run_ok(
        "curl (console login)",
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .args(["-X", "POST", "-H", "content-type: application/json", "-H"])
            .arg(format!("origin: {}", url.trim_end_matches('/')))
            .arg("--data")
            .arg(format!(r#"{{"name":"demo","password":"{password}"}}"#))
            .arg(format!("{url}session")),
    );
    assert_eq!(login.trim(), "201", "{console}");
    let started = children(pid);
    assert!(
        started.len() >= 3,
        "relay, gateway and proxy should be children of the demo: {started:?}"
    );
    run_ok(
        "kill -TERM",
        Command::new("kill").args(["-TERM", &pid.to_string()]),
    );
    let status = run.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("stopping the relay, gateway and proxy"),
        "{status}: {err}"
    );
    wait_for("the demo's children to stop", || {
        started.iter().all(|&p| !alive(p)).then_some(())
    });

    // A relay still holding the demo's state directory: the demo says what stopped its own relay
    // at once instead of timing out.
    let _stale = Proc::spawn(
        "stale-relay",
        Command::new(bin("culvert-relay"))
            .args(["--dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&dir)
            .stdout(Stdio::null()),
        &dir,
    );
    wait_for("the stale relay to start", || {
        std::fs::read_to_string(dir.join("client.env")).ok()
    });
    let out = demo(&dir).arg("--once").output().unwrap();
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("culvert-relay stopped before it was ready")
            && err.contains("is another culvert-relay using this state directory?"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
