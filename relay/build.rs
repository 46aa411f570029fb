//! The web console's front-end dependencies (xterm.js for its terminals) come from the npm
//! registry at build time, pinned by `console-web/package-lock.json`, and are compiled into
//! the relay; nothing of them is in the repository.
//!
//! `npm ci` runs once per build directory (in `OUT_DIR`), again only when the package files
//! change. For a build without the registry (a distribution's offline build), run `npm ci` in
//! a copy of `console-web/` beforehand and point `CULVERT_CONSOLE_WEB` at that directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files the relay serves, under `node_modules/`.
const FILES: [&str; 3] = [
    "@xterm/xterm/lib/xterm.js",
    "@xterm/xterm/css/xterm.css",
    "@xterm/addon-fit/lib/addon-fit.js",
];

fn main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("console-web");
    println!("cargo:rerun-if-changed=console-web/package.json");
    println!("cargo:rerun-if-changed=console-web/package-lock.json");
    println!("cargo:rerun-if-env-changed=CULVERT_CONSOLE_WEB");
    let dir = match std::env::var_os("CULVERT_CONSOLE_WEB") {
        Some(d) => PathBuf::from(d),
        None => fetch(&src),
    };
    let modules = dir.join("node_modules");
    for f in FILES {
        let p = modules.join(f);
        if !p.is_file() {
            fail(&format!(
                "{} is missing: run `npm ci` in {} (a copy of relay/console-web)",
                p.display(),
                dir.display()
            ));
        }
    }
    println!(
        "cargo:rustc-env=CULVERT_CONSOLE_MODULES={}",
        modules.display()
    );
}

/// `npm ci` into `OUT_DIR/console-web`, unless what is there was installed from the same lock.
fn fetch(src: &Path) -> PathBuf {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out.join("console-web");
    let lock = std::fs::read(src.join("package-lock.json"))
        .unwrap_or_else(|e| fail(&format!("cannot read console-web/package-lock.json: {e}")));
    let stamp = dir.join("installed-from.lock");
    if std::fs::read(&stamp).ok().as_deref() == Some(&lock[..])
        && FILES
            .iter()
            .all(|f| dir.join("node_modules").join(f).is_file())
    {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&e.to_string()));
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(src.join(f), dir.join(f))
            .unwrap_or_else(|e| fail(&format!("cannot copy console-web/{f}: {e}")));
    }
    let status = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .unwrap_or_else(|e| {
            fail(&format!(
                "cannot run npm ({e}): the web console's terminal (xterm.js) comes from the npm \
                 registry at build time. Install Node.js and npm (apt-get install npm), or set \
                 CULVERT_CONSOLE_WEB to a directory where `npm ci` was run on a copy of relay/console-web"
            ))
        });
    if !status.success() {
        fail(&format!(
            "`npm ci` in {} failed ({status}): is the npm registry reachable? Or set \
             CULVERT_CONSOLE_WEB to a directory where `npm ci` was run on a copy of relay/console-web",
            dir.display()
        ));
    }
    std::fs::write(&stamp, &lock).unwrap_or_else(|e| fail(&e.to_string()));
    dir
}

fn fail(msg: &str) -> ! {
    eprintln!("culvert-relay build: {msg}");
    panic!("culvert-relay build: {msg}");
}
