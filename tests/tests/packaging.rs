//! The Debian packages, end to end: built with cargo-deb, checked with lintian, installed with
//! dpkg into a fresh Debian root made by debootstrap (never onto this machine), inspected (files,
//! user, conffiles, unit enabled, `systemd-analyze verify`, `--check-config` on the installed
//! default), run — the installed culvertd, as its packaged user, carries a tunnel — then purged
//! with nothing left behind.
//!
//! Needs root (chroot, dpkg in the root), debootstrap, lintian and network access to Debian's
//! archive; cargo-deb is installed into target/tools on first use. The Debian root is cached as
//! a tarball under target/debootstrap and unpacked fresh for each run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use culvert_e2e::*;

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// What a gateway's Debian has besides minbase: the packages' dependencies (adduser, procps,
/// ca-certificates: the system's trusted roots, for a relay with a public certificate) and
/// systemd (for `systemd-analyze verify` in the root).
const INCLUDE: &str = "adduser,procps,ca-certificates,systemd";
const PACKAGES: [(&str, &str); 3] = [
    ("culvertd", "culvertd"),
    ("culvert-relay", "culvert-relay"),
    ("culvert-cli", "culvert"),
];

/// cargo-deb, installed into target/tools once (crates.io).
fn cargo_deb() -> PathBuf {
    let root = workspace().join("target/tools");
    let bin = root.join("bin/cargo-deb");
    if !bin.exists() {
        run_ok(
            "cargo install cargo-deb",
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "install",
                    "cargo-deb",
                    "--version",
                    "3.8.0",
                    "--locked",
                    "--root",
                ])
                .arg(&root),
        );
    }
    bin
}

/// Build the release binaries once, then the three .debs; returns their paths.
fn build_debs() -> Vec<PathBuf> {
    let ws = workspace();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_ok(
        "cargo build --release",
        Command::new(&cargo).current_dir(&ws).args([
            "build",
            "--release",
            "--locked",
            "-p",
            "culvertd",
            "-p",
            "culvert-relay",
            "-p",
            "culvert-cli",
        ]),
    );
    let deb = cargo_deb();
    PACKAGES
        .iter()
        .map(|(krate, _)| {
            let out = run_ok(
                &format!("cargo deb -p {krate}"),
                Command::new(&deb)
                    .current_dir(&ws)
                    .args(["deb", "--no-build", "-p", krate]),
            );
            PathBuf::from(
                out.lines()
                    .last()
                    .expect("cargo deb prints the .deb path")
                    .trim(),
            )
        })
        .collect()
}

/// A fresh Debian root: debootstrap once (cached as a tarball), unpacked into `dir`.
fn debian_root(dir: &Path) -> PathBuf {
    let cache = workspace().join("target/debootstrap");
    let tarball = cache.join(format!("{SUITE}-minbase-{}.tar", INCLUDE.replace(',', "-")));
    if !tarball.exists() {
        let debootstrap = require_tool("debootstrap", "debootstrap");
        std::fs::create_dir_all(&cache).unwrap();
        let build = cache.join("build");
        let _ = std::fs::remove_dir_all(&build);
        run_ok(
            "debootstrap",
            Command::new(debootstrap)
                .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
                .arg(&build)
                .arg(MIRROR),
        );
        run_ok(
            "packing the Debian root",
            Command::new("tar")
                .arg("-C")
                .arg(&build)
                .arg("-cf")
                .arg(&tarball)
                .arg("."),
        );
        let _ = std::fs::remove_dir_all(&build);
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    run_ok(
        "unpacking the Debian root",
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-xf")
            .arg(&tarball),
    );
    root
}

fn chroot(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("chroot");
    c.arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    c
}

/// /proc mounted in the root while it lives (systemd-analyze wants it).
struct ProcMount(PathBuf);

impl Drop for ProcMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn debs_install_run_a_tunnel_and_purge_cleanly_in_a_fresh_debian_root() {
    assert!(
        nix_is_root(),
        "this test installs packages into a chroot: run it as root (CI does)"
    );
    require_tool("lintian", "lintian"); // fail before the long build if it is missing
    let dir = scratch("packaging");
    let debs = build_debs();

    // lintian: no errors; every warning is one packaging/README.md justifies.
    for deb in &debs {
        assert_lintian_clean(deb);
    }

    let root = debian_root(&dir);
    for deb in &debs {
        std::fs::copy(deb, root.join("tmp").join(deb.file_name().unwrap())).unwrap();
    }
    let names: Vec<String> = debs
        .iter()
        .map(|d| format!("/tmp/{}", d.file_name().unwrap().to_string_lossy()))
        .collect();
    let mut install = vec!["dpkg", "-i"];
    install.extend(names.iter().map(String::as_str));
    run_ok("dpkg -i", &mut chroot(&root, &install));

    // Files, user, conffiles, permissions, the unit enabled (not started: nothing runs here).
    let files = run_ok(
        "dpkg -L culvertd",
        &mut chroot(&root, &["dpkg", "-L", "culvertd"]),
    );
    for f in [
        "/usr/bin/culvertd",
        "/etc/culvert/culvertd.toml",
        "/usr/lib/systemd/system/culvertd.service",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} not installed:\n{files}");
    }
    for (_, pkg) in PACKAGES {
        let status = run_ok(
            "dpkg-query",
            &mut chroot(&root, &["dpkg-query", "-W", "-f=${Status}", pkg]),
        );
        assert_eq!(status, "install ok installed", "{pkg}");
    }
    for (user, conf) in [
        ("culvert", "culvertd.toml"),
        ("culvert-relay", "relay.toml"),
    ] {
        let pw = run_ok("getent", &mut chroot(&root, &["getent", "passwd", user]));
        assert!(pw.contains("/usr/sbin/nologin"), "{user}: {pw}");
        let st = run_ok(
            "stat",
            &mut chroot(
                &root,
                &["stat", "-c", "%a %G", &format!("/etc/culvert/{conf}")],
            ),
        );
        assert_eq!(st.trim(), format!("640 {user}"), "{conf}");
    }
    let conffiles = run_ok(
        "dpkg-query conffiles",
        &mut chroot(
            &root,
            &[
                "dpkg-query",
                "-W",
                "-f=${Conffiles}",
                "culvertd",
                "culvert-relay",
            ],
        ),
    );
    assert!(
        conffiles.contains("/etc/culvert/culvertd.toml"),
        "{conffiles}"
    );
    assert!(conffiles.contains("/etc/culvert/relay.toml"), "{conffiles}");
    for unit in ["culvertd.service", "culvert-relay.service"] {
        let wants = root
            .join("etc/systemd/system/multi-user.target.wants")
            .join(unit);
        assert!(wants.symlink_metadata().is_ok(), "{unit} is not enabled");
    }
    {
        std::fs::create_dir_all(root.join("proc")).unwrap();
        run_ok(
            "mount /proc",
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(root.join("proc")),
        );
        let _proc = ProcMount(root.join("proc"));
        for unit in ["culvertd.service", "culvert-relay.service"] {
            let out = chroot(
                &root,
                &[
                    "systemd-analyze",
                    "verify",
                    &format!("/usr/lib/systemd/system/{unit}"),
                ],
            )
            .output()
            .unwrap();
            let err = stderr_of(&out);
            assert!(
                out.status.success() && err.trim().is_empty(),
                "systemd-analyze verify {unit} in the root: {err}"
            );
        }
    }
    run_ok(
        "culvertd --check-config on the installed default",
        &mut chroot(
            &root,
            &[
                "culvertd",
                "--check-config",
                "--config",
                "/etc/culvert/culvertd.toml",
            ],
        ),
    );

    // The installed culvertd, as its packaged user, serves a tunnel from the host's relay.
    let echo = echo_server();
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("debian-root", &["ECHO"]);
    std::fs::copy(&relay.ca, root.join("tmp/relay-ca.pem")).unwrap();
    std::fs::write(
        root.join("etc/culvert/test.toml"),
        format!("{LOOPBACK_ACL}[services.ECHO]\ntarget = \"{echo}\"\n"),
    )
    .unwrap();
    let relay_addr = relay.addr.to_string();
    let gw = Proc::spawn(
        "installed-culvertd",
        Command::new("chroot")
            .arg("--userspec=culvert:culvert")
            .arg(&root)
            .arg("/usr/bin/culvertd")
            .args(["--config", "/etc/culvert/test.toml", "--relay", &relay_addr])
            .args(["--ca", "/tmp/relay-ca.pem"])
            .env("CULVERT_DESTINATION_TOKEN", &t.destination)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null()),
        &dir,
    );
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    relay.wait_side(&t.id, "destination", "CONNECTED");
    assert!(
        echo_works(ports["ECHO"], b"through the packaged culvertd"),
        "no echo; installed culvertd's log:\n{}",
        gw.log_text()
    );
    drop(gw);
    std::fs::remove_file(root.join("etc/culvert/test.toml")).unwrap();

    // Purge: nothing of the packages is left.
    run_ok(
        "dpkg -P",
        &mut chroot(
            &root,
            &["dpkg", "-P", "culvertd", "culvert-relay", "culvert"],
        ),
    );
    for gone in [
        "usr/bin/culvertd",
        "usr/bin/culvert-relay",
        "usr/bin/culvert",
        "etc/culvert",
        "usr/lib/systemd/system/culvertd.service",
        "etc/systemd/system/multi-user.target.wants/culvertd.service",
        "etc/systemd/system/multi-user.target.wants/culvert-relay.service",
        "var/log/culvert",
        "var/lib/culvert-relay",
        "usr/share/doc/culvertd",
    ] {
        assert!(
            root.join(gone).symlink_metadata().is_err(),
            "{gone} is left after purge"
        );
    }
    for user in ["culvert", "culvert-relay"] {
        let st = chroot(&root, &["getent", "passwd", user]).status().unwrap();
        assert!(!st.success(), "user {user} is left after purge");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
