//! culvertd's MQTT connection through the site's proxy (`relay.proxy`, or `HTTPS_PROXY` /
//! `ALL_PROXY` for the broker's host): HTTP CONNECT or SOCKS5, as for the relay.
//!
//! rumqttc dials its broker itself and knows no SOCKS. So rumqttc is pointed at a Unix socket
//! of culvertd's own, in a directory only culvertd's user can enter, and every connection it
//! makes there is carried from here: through the proxy ([`culvert_protocol::proxy`]) to the
//! broker, with TLS to the broker done here, end to end, with the broker's real name (for SNI
//! and the certificate check) and the device's client certificate when it has one. What
//! crosses the socket is rumqttc's MQTT, inside this process's user.
//!
//! A proxy that refuses is logged with its answer and the connection is closed: rumqttc backs
//! off and tries again, as it does for a broker that is down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use culvert_protocol::proxy::Proxy;
use tokio::net::UnixListener;
use tracing::{debug, warn};

use culvert_protocol::client::Endpoint;

/// The bridge's socket: rumqttc connects to [`Bridge::path`]; dropped, it removes its
/// directory.
pub struct Bridge {
    pub path: PathBuf,
    dir: PathBuf,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = remove_stale(&self.dir);
    }
}

/// Start the bridge.
pub fn start(
    proxy: Proxy,
    broker: Endpoint,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Bridge, String> {
    let dir = private_dir().map_err(|e| format!("the MQTT proxy bridge's directory: {e}"))?;
    let path = dir.join("mqtt.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("the MQTT proxy bridge's socket {}: {e}", path.display()))?;
    let name = rustls::pki_types::ServerName::try_from(broker.host.clone())
        .map_err(|e| format!("mqtt.broker {}: {e}", broker.host))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((mut local, _)) = listener.accept().await else {
                continue;
            };
            let (proxy, broker, name, connector) = (
                proxy.clone(),
                broker.clone(),
                name.clone(),
                connector.clone(),
            );
            tokio::spawn(async move {
                let tcp = match proxy.connect(&broker.host, broker.port).await {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        warn!(broker = %broker, "cannot reach the MQTT broker through the proxy: {e}");
                        return;
                    }
                };
                let mut tls = match connector.connect(name, tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(broker = %broker, proxy = %proxy, "TLS to the MQTT broker (through the proxy) failed: {e}");
                        return;
                    }
                };
                let r = tokio::io::copy_bidirectional(&mut local, &mut tls).await;
                debug!(broker = %broker, result = ?r, "MQTT connection through the proxy ended");
            });
        }
    });
    Ok(Bridge { path, dir })
}

/// A new directory only this user may enter: under systemd's RuntimeDirectory when there is
/// one, else the temporary directory.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("culvertd-mqtt-{}", std::process::id()));
    if dir.exists() {
        remove_stale(&dir)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn remove_stale(dir: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(dir.join("mqtt.sock"));
    std::fs::remove_dir(dir)
}
