//! culvertd for 64-bit ARM gateways, cross-built (scripts/arm64) and run under qemu-user:
//! its unit tests, and the arm64 package's own binary carrying an ssh session and a checked
//! 1 MiB echo through a real tunnel from the (amd64) relay.
//!
//! Needs the Debian packages gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and
//! qemu-user-static, and an aarch64 Rust standard library (rustup's, or Debian's
//! libstd-rust-web-dev:arm64): scripts/arm64 says which is missing and how to install it.

use std::process::{Command, Stdio};
use std::sync::Mutex;

use culvert_e2e::*;

/// The two tests each run a cross build; one at a time on a 2-core machine.
static BUILD: Mutex<()> = Mutex::new(());

fn arm64(args: &[&str]) -> Command {
    let mut c = Command::new(workspace().join("scripts/arm64"));
    c.current_dir(workspace()).args(args);
    c
}

#[test]
fn unit_tests_pass_under_qemu() {
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    println!("{}", run_ok("scripts/arm64 env", &mut arm64(&["env"])));
    let out = run_ok("scripts/arm64 test", &mut arm64(&["test"]));
    // Every test binary's summary; together they must have run tests, none failed.
    let mut passed = 0;
    for line in out.lines().filter(|l| l.starts_with("test result:")) {
        assert!(line.starts_with("test result: ok."), "{line}\n{out}");
        let n: usize = line
            .split(". ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected summary: {line}"));
        passed += n;
    }
    println!("aarch64 under qemu-user: {passed} tests passed");
    assert!(passed >= 40, "only {passed} tests ran under qemu:\n{out}");
}

#[test]
fn arm64_package_carries_ssh_and_a_checked_echo_under_qemu() {
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("arm64");
    let out = run_ok("scripts/arm64 build", &mut arm64(&["build"]));
    let deb = workspace().join(
        out.lines()
            .last()
            .expect("cargo deb prints the path")
            .trim(),
    );
    assert!(
        deb.to_string_lossy().ends_with("_arm64.deb"),
        "not an arm64 package: {}",
        deb.display()
    );

    // Control fields: arm64, and the dependencies the variant names (not the build machine's).
    let field = |f: &str| {
        run_ok(
            "dpkg-deb -f",
            Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f),
        )
    };
    assert_eq!(field("Architecture").trim(), "arm64");
    let depends = field("Depends");
    assert_eq!(
        depends.trim(),
        "adduser, ca-certificates, libc6 (>= 2.34), procps"
    );

    // lintian: no errors; the warnings are the ones packaging/README.md justifies for amd64.
    assert_lintian_clean(&deb);

    // The package's own binary: an aarch64 executable needing no glibc newer than Depends says.
    let unpacked = dir.join("deb");
    run_ok(
        "dpkg-deb -x",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
    );
    let culvertd = unpacked.join("usr/bin/culvertd");
    let objdump = require_tool("aarch64-linux-gnu-objdump", "binutils-aarch64-linux-gnu");
    let symbols = run_ok("objdump -T", Command::new(objdump).arg("-T").arg(&culvertd));
    assert!(
        symbols.contains("GLIBC_2.17"),
        "not an aarch64 glibc binary"
    );
    let newest = symbols
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next().flatten().unwrap_or(0)))
        })
        .max()
        .unwrap();
    assert!(
        newest <= (2, 34),
        "culvertd needs glibc {}.{}, but the package depends on libc6 (>= 2.34)",
        newest.0,
        newest.1
    );

    // ... under qemu-user, as a gateway: a real sshd and a checked echo behind one tunnel.
    let sshd = Sshd::start(&dir);
    let ssh = require_tool("ssh", "openssh-client");
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("pi-arm64", &["SSH", "ECHO"]);
    let rules = rules(
        &dir,
        &[
            ("SSH", format!("127.0.0.1:{}", sshd.port)),
            ("ECHO", echo.to_string()),
        ],
    );
    let relay_addr = relay.addr.to_string();
    let gw = Proc::spawn(
        "culvertd-arm64",
        arm64(&["qemu"])
            .arg(&culvertd)
            .arg("--config")
            .arg(&rules)
            .args(["--relay", &relay_addr])
            .arg("--ca")
            .arg(&relay.ca)
            .env("CULVERT_DESTINATION_TOKEN", &t.destination)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null()),
        &dir,
    );
    let (_px, ports) = relay.proxy(&dir, &t.source, &["SSH", "ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(
        echo_works(ports["ECHO"], b"through culvertd on aarch64"),
        "no echo; the aarch64 culvertd's log:\n{}",
        gw.log_text()
    );
    let data = random_bytes(1024 * 1024);
    let back = round_trip(connect_local(ports["ECHO"]), data.clone());
    assert_eq!(sha256(&back), sha256(&data), "1 MiB echo came back changed");

    let target = format!("{}@127.0.0.1", Sshd::user());
    let out = Command::new(&ssh)
        .args(sshd.client_opts())
        .args(["-p", &ports["SSH"].to_string(), &target])
        .arg("echo culvert-$((6*7))")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh through the aarch64 culvertd failed: {}\nculvertd's log:\n{}",
        stderr_of(&out),
        gw.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "culvert-42\n");
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
