//! `culvert-relay --dev`: everything a local trial needs, generated on first start and reused
//! after: a private CA and a server certificate for localhost / 127.0.0.1 / ::1, an API key, a
//! state directory, and `client.env` with what a client needs to reach this relay.
//!
//! A port given as 0 is chosen freely on the first start and then kept (in `ports` in the state
//! directory): a gateway configured from `culvert device add`, or a shell that sourced
//! `client.env`, must still reach the relay after it restarts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::config::{MqttSettings, RelayConfig, server_tls};
use crate::registry::Limits;
use crate::tokens::{Secret, new_secret};

pub struct DevFiles {
    pub dir: PathBuf,
    pub ca: PathBuf,
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

/// Create (or reuse) the dev state directory and return a relay configuration for it.
pub fn prepare(
    dir: &Path,
    listen: SocketAddr,
    mqtt: impl FnOnce(&Path) -> Result<MqttSettings, String>,
) -> anyhow::Result<(RelayConfig, DevFiles)> {
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "--dev serves only on loopback (it uses a throwaway CA and key); got {listen}. \
             Use a configuration file for anything else."
        );
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let ca = dir.join("ca.pem");
    let cert = dir.join("server.pem");
    let key = dir.join("server-key.pem");
    if !(ca.exists() && cert.exists() && key.exists()) {
        generate_pki(&ca, &cert, &key)?;
    }
    let key_file = dir.join("api-key");
    let api_key = match std::fs::read_to_string(&key_file) {
        Ok(k) if k.trim().len() >= 16 => k.trim().to_owned(),
        _ => {
            let k = new_secret();
            write_private(&key_file, &format!("{k}\n"))?;
            k
        }
    };
    let tls = server_tls(&cert, &key).map_err(|e| anyhow::anyhow!(e))?;
    let mqtt = mqtt(&ca).map_err(|e| anyhow::anyhow!(e))?;
    Ok((
        RelayConfig {
            listen,
            state_dir: dir.clone(),
            api_key: Secret::new(api_key),
            tls,
            limits: Limits::default(),
            listener: crate::config::FdBudget::from_limit().https(),
            mqtt,
            daemon: crate::config::DaemonSettings::default(),
            flow_control: true,
            audit_file: dir.join("audit.jsonl"),
            require_reason: false,
            aws: crate::config::AwsSettings {
                bootstrap_pair: true,
                ..crate::config::AwsSettings::defaults(&dir)
            },
            store: Default::default(),
            cluster: None,
            console: None,
        },
        DevFiles { dir, ca },
    ))
}

fn generate_pki(ca_path: &Path, cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "culvert dev CA (local use only)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "culvert-relay (dev)");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(ca_path, ca_cert.pem())?;
    std::fs::write(cert_path, format!("{}{}", cert.pem(), ca_cert.pem()))?;
    write_private(key_path, &key.serialize_pem())?;
    Ok(())
}

/// Ports chosen on an earlier start, kept so that clients configured for them keep working.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeptPorts {
    pub https: Option<u16>,
    pub mqtt: Option<u16>,
    pub console: Option<u16>,
}

const PORTS_FILE: &str = "ports";

impl KeptPorts {
    /// What an earlier start wrote in `dir` (nothing, if it never ran or the file is unreadable:
    /// then ports are chosen afresh).
    pub fn read(dir: &Path) -> KeptPorts {
        let text = std::fs::read_to_string(dir.join(PORTS_FILE)).unwrap_or_default();
        let get = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .and_then(|(_, v)| v.trim().parse::<u16>().ok())
                .filter(|&p| p != 0)
        };
        KeptPorts {
            https: get("https"),
            mqtt: get("mqtt"),
            console: get("console"),
        }
    }

    /// `addr` itself, or with the kept port when `addr` asks for any port (0).
    pub fn apply(addr: SocketAddr, kept: Option<u16>) -> SocketAddr {
        match kept {
            Some(p) if addr.port() == 0 => SocketAddr::new(addr.ip(), p),
            _ => addr,
        }
    }
}

/// The dev relay's AWS settings for `client.env`.
pub struct AwsEnv<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub region: &'a str,
}

/// Write `client.env` (shell syntax) for clients of the running dev relay: culvert's settings,
/// and the aws CLI's and the AWS SDKs' (credentials, region, CA, endpoint).
pub fn write_client_env(
    files: &DevFiles,
    addr: SocketAddr,
    api_key: &Secret,
    mqtt: Option<SocketAddr>,
    console: Option<SocketAddr>,
    aws: Option<AwsEnv>,
) -> std::io::Result<PathBuf> {
    let path = files.dir.join("client.env");
    let mut text = format!(
        "# written by culvert-relay --dev; source it: . {}\nexport CULVERT_RELAY={addr}\nexport CULVERT_API_KEY={}\nexport CULVERT_CA={}\n",
        path.display(),
        api_key.expose(),
        files.ca.display()
    );
    if let Some(m) = mqtt {
        text.push_str(&format!("export CULVERT_MQTT={m}\n"));
    }
    if let Some(c) = console {
        text.push_str(&format!("export CULVERT_CONSOLE=https://{c}/\n"));
    }
    if let Some(a) = aws {
        // AWS_ENDPOINT_URL_IOTSECURETUNNELING is the SDKs' own per-service endpoint variable;
        // CULVERT_AWS_ENDPOINT is for --endpoint-url.
        text.push_str(&format!(
            "# the aws CLI and AWS SDKs: aws iotsecuretunneling list-tunnels --endpoint-url \"$CULVERT_AWS_ENDPOINT\"\n\
             export AWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY={}\nexport AWS_DEFAULT_REGION={}\n\
             export AWS_CA_BUNDLE={}\nexport CULVERT_AWS_ENDPOINT=https://{addr}\n\
             export AWS_ENDPOINT_URL_IOTSECURETUNNELING=https://{addr}\n",
            a.access_key_id,
            a.secret_access_key,
            a.region,
            files.ca.display()
        ));
    }
    let mut ports = format!(
        "# ports this dev relay chose on its first start; it keeps them (delete to choose anew)\nhttps={}\n",
        addr.port()
    );
    if let Some(m) = mqtt {
        ports.push_str(&format!("mqtt={}\n", m.port()));
    }
    if let Some(c) = console {
        ports.push_str(&format!("console={}\n", c.port()));
    }
    let tmp = files.dir.join("ports.tmp");
    std::fs::write(&tmp, ports)?;
    std::fs::rename(&tmp, files.dir.join(PORTS_FILE))?;
    // Written whole, then renamed into place, so a reader never sees half of it.
    let tmp = files.dir.join("client.env.tmp");
    write_private(&tmp, &text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_asked_as_any_is_the_kept_one_and_an_explicit_port_wins() {
        let dir = std::env::temp_dir().join(format!("culvert-dev-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            KeptPorts::read(&dir),
            KeptPorts::default(),
            "nothing kept yet"
        );
        let files = DevFiles {
            dir: dir.clone(),
            ca: dir.join("ca.pem"),
        };
        let key = Secret::new("k".repeat(32));
        write_client_env(
            &files,
            "127.0.0.1:40001".parse().unwrap(),
            &key,
            Some("127.0.0.1:40002".parse().unwrap()),
            Some("127.0.0.1:40003".parse().unwrap()),
            Some(AwsEnv {
                access_key_id: "CKID000000000000",
                secret_access_key: "s/+cret",
                region: "us-east-1",
            }),
        )
        .unwrap();
        let env = std::fs::read_to_string(dir.join("client.env")).unwrap();
        for line in [
            "export AWS_ACCESS_KEY_ID=CKID000000000000\n",
            "export AWS_SECRET_ACCESS_KEY=s/+cret\n",
            "export AWS_DEFAULT_REGION=us-east-1\n",
            "export CULVERT_AWS_ENDPOINT=https://127.0.0.1:40001\n",
            "export CULVERT_CONSOLE=https://127.0.0.1:40003/\n",
        ] {
            assert!(env.contains(line), "{line:?} missing from:\n{env}");
        }
        let kept = KeptPorts::read(&dir);
        assert_eq!(
            (kept.https, kept.mqtt, kept.console),
            (Some(40001), Some(40002), Some(40003))
        );
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(KeptPorts::apply(any, kept.mqtt).port(), 40002);
        let explicit: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        assert_eq!(KeptPorts::apply(explicit, kept.https), explicit);
        // A damaged file is ignored: ports are chosen afresh.
        std::fs::write(dir.join(PORTS_FILE), "https=banana\nmqtt=0\n").unwrap();
        assert_eq!(KeptPorts::read(&dir), KeptPorts::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
