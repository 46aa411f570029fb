//! The README's quick-start command (`cargo run -p culvert-demo`) brings the system up and
//! carries traffic; `--once` makes it stop after its own check.

use std::process::Command;

use culvert_e2e::*;

#[test]
fn quick_start_demo_comes_up_and_carries_traffic() {
    let dir = scratch("demo");
    let out = Command::new(bin("culvert-demo"))
        .arg("--once")
        .env("CULVERT_DEMO_DIR", &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        stderr_of(&out)
    );
    assert!(stdout.contains("came back through the tunnel"), "{stdout}");
    assert!(stdout.contains("curl http://127.0.0.1:"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
