//! A private PostgreSQL server for tests: Debian's `postgresql` binaries, a cluster made by
//! initdb under a temp directory (never the system's cluster), run as `nobody` when the tests
//! run as root (PostgreSQL refuses root), on a free loopback port, trusting local connections
//! as user `culvert`, over plain TCP or TLS ([`tls_database`]). One per test process, started on first use; it lives as long as the
//! process: a shell starts it and, when the process's end closes the shell's stdin, stops it
//! and removes its directory. Each caller gets a database of its own ([`database`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// This process's server (started on first use): its URL and its directory.
fn running() -> &'static (String, PathBuf) {
    static SERVER: OnceLock<(String, PathBuf)> = OnceLock::new();
    SERVER.get_or_init(|| start().unwrap_or_else(|e| panic!("{e}")))
}

/// `postgres://culvert@127.0.0.1:PORT` of this process's server (started on first use).
pub fn server() -> &'static str {
    &running().0
}

/// The CA that issued the server's TLS certificate (for `localhost` and `127.0.0.1`): the
/// server accepts TLS and plain TCP alike.
pub fn ca() -> PathBuf {
    running().1.join("ca.pem")
}

/// A new, empty database on [`server`], reached over TLS: its URL (host `localhost`, which
/// the server's certificate names, and `sslmode=require`).
pub fn tls_database() -> String {
    let url = database();
    format!(
        "{}?sslmode=require",
        url.replacen("@127.0.0.1:", "@localhost:", 1)
    )
}

/// A new, empty database on [`server`]: its URL.
pub fn database() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let base = server();
    let out = Command::new(binary("psql").unwrap_or_else(|e| panic!("{e}")))
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-d"])
        .arg(format!("{base}/postgres"))
        .args(["-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "CREATE DATABASE {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{base}/{name}")
}

/// A PostgreSQL program: on PATH, or where Debian's `postgresql` package puts it.
fn binary(name: &str) -> Result<PathBuf, String> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("bin").join(name))
        .collect();
    debian.sort();
    debian.reverse(); // the newest major version first
    on_path
        .into_iter()
        .chain(debian)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "PostgreSQL's {name} is needed for the PostgreSQL store's tests: install it with \
                 `apt-get install postgresql` (the tests run a server of their own; the system's \
                 cluster is not used)"
            )
        })
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program`, as nobody when we are root.
fn command(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A CA and a server certificate for `localhost` / `127.0.0.1` in `dir` (`ca.pem`,
/// `server.pem`, `server-key.pem`), readable by the server's user.
fn server_pki(dir: &Path, root: bool) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.distinguished_name
        .push(DnType::CommonName, "culvert test PostgreSQL CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(e)?;
    let params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).map_err(e)?;
    let cert = params.signed_by(&key, &issuer).map_err(e)?;
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    write("ca.pem", ca_cert.pem())?;
    write("server.pem", cert.pem())?;
    write("server-key.pem", key.serialize_pem())?;
    // PostgreSQL insists on a key only its user can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .map_err(|e| format!("server-key.pem: {e}"))?;
    if root {
        let ok = Command::new("chown")
            .arg("65534:65534")
            .arg(dir.join("server.pem"))
            .arg(dir.join("server-key.pem"))
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("cannot chown the server's certificate to nobody".into());
        }
    }
    Ok(())
}

fn start() -> Result<(String, PathBuf), String> {
    let (initdb, postgres) = (binary("initdb")?, binary("postgres")?);
    let root = as_root();
    let dir = std::env::temp_dir().join(format!("culvert-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if root {
        let ok = Command::new("chown")
            .arg("65534:65534")
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("cannot chown {} to nobody", dir.display()));
        }
    }
    server_pki(&dir, root)?;
    let data = dir.join("data");
    let out = command(&initdb, root)
        .args([
            "-U",
            "culvert",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let log = dir.join("server.log");
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    // The shell waits on stdin; EOF (this process ended) stops the server fast and cleans up.
    let script = "\"$@\" & pid=$!; read _; kill -INT $pid; wait $pid; rm -rf \"$PG_TEST_DIR\"";
    let mut shell = command(Path::new("/bin/sh"), root)
        .args(["-c", script, "pg-test-server"])
        .arg(&postgres)
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(&dir)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .args(["-c", "max_connections=300", "-c", "ssl=on"])
        .arg("-c")
        .arg(format!(
            "ssl_cert_file={}",
            dir.join("server.pem").display()
        ))
        .arg("-c")
        .arg(format!(
            "ssl_key_file={}",
            dir.join("server-key.pem").display()
        ))
        .env("PG_TEST_DIR", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(|e| format!("starting postgres: {e}"))?;
    // Held open, never written, for the rest of this process.
    std::mem::forget(shell.stdin.take());
    std::mem::forget(shell);
    for _ in 0..300 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("ready to accept connections")
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            return Ok((format!("postgres://culvert@127.0.0.1:{port}"), dir));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the test PostgreSQL server did not start within 30 s; its log, {}:\n{}",
        log.display(),
        std::fs::read_to_string(&log).unwrap_or_default()
    ))
}
