//! The Yocto layer (yocto/meta-culvert): its crates include matches Cargo.lock, and oelint-adv
//! (from PyPI, installed into target/tools/venv on first use) finds nothing in its recipes.
//! A bitbake build needs oe-core and fetches, which this machine cannot do; these are the
//! checks that can run here.

use std::path::PathBuf;
use std::process::Command;

use culvert_e2e::*;

const OELINT: &str = "oelint-adv==9.11.2";

#[test]
fn crates_include_matches_cargo_lock() {
    let ws = workspace();
    let python = require_tool("python3", "python3");
    let out = Command::new(&python)
        .arg(ws.join("scripts/yocto-crates"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // And the check does catch a stale include: a copy whose Cargo.lock gained a crate.
    let dir = scratch("yocto-stale");
    let inc = "yocto/meta-culvert/recipes-connectivity/culvert/culvert-crates.inc";
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::create_dir_all(dir.join(inc).parent().unwrap()).unwrap();
    std::fs::copy(
        ws.join("scripts/yocto-crates"),
        dir.join("scripts/yocto-crates"),
    )
    .unwrap();
    std::fs::copy(ws.join(inc), dir.join(inc)).unwrap();
    let lock = std::fs::read_to_string(ws.join("Cargo.lock")).unwrap()
        + "\n[[package]]\nname = \"zz-new\"\nversion = \"1.0.0\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"00\"\n";
    std::fs::write(dir.join("Cargo.lock"), lock).unwrap();
    let out = Command::new(&python)
        .arg(dir.join("scripts/yocto-crates"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a stale include must fail the check");
    assert!(
        stderr_of(&out).contains("run scripts/yocto-crates"),
        "{}",
        stderr_of(&out)
    );
}

fn oelint() -> PathBuf {
    let venv = workspace().join("target/tools/venv");
    let bin = venv.join("bin/oelint-adv");
    if !bin.exists() {
        let python = require_tool("python3", "python3 python3-venv");
        let st = Command::new(python)
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "python3 -m venv failed: apt-get install python3-venv"
        );
        let out = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", OELINT])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install {OELINT}: {}",
            stderr_of(&out)
        );
    }
    bin
}

#[test]
fn layer_passes_oelint_adv() {
    let layer = workspace().join("yocto/meta-culvert");
    let conf = std::fs::read_to_string(layer.join("conf/layer.conf")).unwrap();
    assert!(
        conf.contains("LAYERSERIES_COMPAT_culvert = \"wrynose\""),
        "{conf}"
    );
    let mut recipes: Vec<PathBuf> = Vec::new();
    let mut dirs = vec![layer.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "bb" || x == "bbappend") {
                recipes.push(p);
            }
        }
    }
    recipes.sort();
    assert!(recipes.len() >= 3, "{recipes:?}");
    // homepageping would fetch the HOMEPAGE: no network here. Everything else counts.
    let out = Command::new(oelint())
        .current_dir(&layer)
        .args([
            "--release",
            "wrynose",
            "--quiet",
            "--suppress",
            "oelint.vars.homepageping",
        ])
        .args(&recipes)
        .output()
        .unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "oelint-adv findings:\n{findings}"
    );
}
