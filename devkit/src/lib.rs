//! What the tests, the quick-start demo and the benchmark share to run culvert's real programs:
//! building the binaries once, child processes that die with their owner (with or without a
//! log file), a real OpenSSH server, bounded waits, scratch directories, free ports, and
//! failing with the Debian package to install when a tool is missing.
//!
//! Every wait is bounded and fails with a message saying what did not happen.

pub mod pg;
pub mod wan;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any one wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Build culvert's programs (`culvert-relay`, `culvertd`, `culvert`, and the packages in
/// `extra`) in the profile of the running executable, and return the directory they are in:
/// the caller's own `target/<profile>`. Cargo does nothing if they are up to date.
pub fn build_binaries(extra: &[&str]) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/<program>, or target/<profile>/deps/<test binary>
    let dir = exe
        .ancestors()
        .find(|d| {
            d.file_name()
                .is_some_and(|n| n == "release" || n == "debug")
        })
        .ok_or_else(|| format!("{} is not in a target/<profile> directory", exe.display()))?
        .to_owned();
    let release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace()).args(["build", "--bins"]);
    // What cargo set for the running program (`cargo run`, `cargo test`) describes that
    // program, not the build: ring's build script reruns when CARGO_PKG_NAME or
    // CARGO_MANIFEST_DIR change, which rebuilt ring, rustls and every binary on each switch
    // between `cargo run -p culvert-demo` and `cargo build`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_BIN_")
            || matches!(
                &*name,
                "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            cmd.env_remove(&*name);
        }
    }
    for p in ["culvert-relay", "culvertd", "culvert-cli"]
        .iter()
        .chain(extra)
    {
        cmd.args(["-p", p]);
    }
    if release {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok(dir),
        Ok(s) => Err(format!("cargo build of the culvert binaries failed ({s})")),
        Err(e) => Err(format!("cannot run cargo: {e}")),
    }
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A cluster CA and one certificate per node in `dir` (`ca.pem`, `<node>.pem`,
/// `<node>-key.pem`), made by running the `<!-- cluster-pki -->` block of docs/operations.md
/// with OpenSSL: what the docs tell operators to run is what the tests and the bench use.
pub fn cluster_pki(dir: &Path, nodes: &[&str]) -> Result<(), String> {
    let doc = std::fs::read_to_string(workspace().join("docs/operations.md"))
        .map_err(|e| format!("docs/operations.md: {e}"))?;
    let block = doc
        .split("<!-- cluster-pki -->\n```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .ok_or("docs/operations.md has no cluster-pki block")?;
    require_tool("openssl", "openssl");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .env("NODES", nodes.join(" "))
        .current_dir(dir)
        .output()
        .map_err(|e| format!("bash: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the cluster PKI commands of docs/operations.md failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Fail with an install hint when a system tool is missing.
pub fn require_tool(path_or_name: &str, package: &str) -> PathBuf {
    let candidates: Vec<PathBuf> = if path_or_name.contains('/') {
        vec![PathBuf::from(path_or_name)]
    } else {
        std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/sbin", "/sbin"])
            .map(|d| Path::new(d).join(path_or_name))
            .collect()
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{path_or_name} is required for this test: install it with `apt-get install {package}`")
        })
}

/// A fresh scratch directory for one test.
///
/// A run keeps its scratch directories (their logs explain a failure); the first call of a run
/// deletes those of earlier runs whose process is gone, so that repeated runs do not fill the
/// disk (a full disk once failed a whole CI run with unrelated-looking timeouts).
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_dead_scratch);
    let d = std::env::temp_dir().join(format!(
        "culvert-e2e-{}-{}-{}",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Delete `culvert-e2e-<name>-<pid>-<n>` directories whose process no longer runs.
fn sweep_dead_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("culvert-e2e-")) else {
            continue;
        };
        // <name>-<pid>-<n>: the pid is the second part from the end.
        let pid = rest.rsplit('-').nth(1);
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Poll `f` until it returns `Some`, or fail after [`WAIT`] saying `what` did not happen.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped, with its stderr kept in a log file for diagnostics.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        Proc::start(name, cmd, dir, false)
    }

    /// Like [`Proc::spawn`], with stdout going to the same log (for programs that log there,
    /// such as the AWS localproxy).
    pub fn spawn_logging_stdout(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        Proc::start(name, cmd, dir, true)
    }

    fn start(name: &str, cmd: &mut Command, dir: &Path, stdout_too: bool) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).unwrap();
        if stdout_too {
            cmd.stdout(err.try_clone().unwrap());
        }
        let child = cmd
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A real OpenSSH server on 127.0.0.1 with its own host key and one authorized client key.
pub struct Sshd {
    pub proc: Proc,
    pub port: u16,
    pub client_key: PathBuf,
    pub dir: PathBuf,
}

impl Sshd {
    pub fn start(dir: &Path) -> Sshd {
        let sshd = require_tool("/usr/sbin/sshd", "openssh-server");
        let keygen = require_tool("ssh-keygen", "openssh-client");
        let d = dir.join("sshd");
        std::fs::create_dir_all(&d).unwrap();
        // sshd refuses to start without its privilege-separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        // Keys from an earlier start in the same directory are kept (the demo prints the
        // client key's path; a user's known_hosts may hold the host key).
        for (name, kind) in [("host_key", "ed25519"), ("client_key", "ed25519")] {
            if d.join(name).exists() && d.join(format!("{name}.pub")).exists() {
                continue;
            }
            let _ = std::fs::remove_file(d.join(name));
            let st = Command::new(&keygen)
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(d.join(name))
                .stdin(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "ssh-keygen failed");
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let user = Sshd::user();
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nAllowUsers {user}\n\
                 Subsystem sftp internal-sftp\nLogLevel VERBOSE\n",
                hk = d.join("host_key").display(),
                ak = d.join("authorized_keys").display(),
                pid = d.join("sshd.pid").display(),
            ),
        )
        .unwrap();
        // sshd needs a port in its configuration: take one the OS hands out, retrying if
        // another process grabs it first.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut proc = Proc::spawn(
                "sshd",
                Command::new(&sshd)
                    .args(["-D", "-e", "-f"])
                    .arg(&config)
                    .args(["-p", &port.to_string()])
                    .stdout(Stdio::null()),
                dir,
            );
            let up = wait_for("sshd to listen or exit", || {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    Some(true)
                } else if !proc.is_running() {
                    Some(false)
                } else {
                    None
                }
            });
            if up {
                return Sshd {
                    proc,
                    port,
                    client_key: d.join("client_key"),
                    dir: d,
                };
            }
        }
        panic!("sshd did not start; see its log under {}", dir.display());
    }

    /// Common options for ssh/scp to reach this server through `port`.
    pub fn client_opts(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.client_key.display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-o".into(),
            "ConnectTimeout=20".into(),
        ]
    }

    /// The user this process runs as (the one sshd lets in): `$USER`, or `id -un` where the
    /// environment has none (containers, cron, systemd services).
    pub fn user() -> String {
        std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| {
                let out = Command::new("id").arg("-un").output().ok()?;
                let name = String::from_utf8(out.stdout).ok()?.trim().to_owned();
                (out.status.success() && !name.is_empty()).then_some(name)
            })
            .unwrap_or_else(|| "root".into())
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for programs that need a port in their
/// configuration; bind-and-release, so a race with another process is possible but rare).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
