//! Blocking client of the relay's control API (`/api/v1/tunnels`).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// A failed API call, with the relay's own message when it gave one.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("relay answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("cannot reach the relay API at {url}: {message}")]
    Transport { url: String, message: String },
    /// Refused here, before asking the relay (e.g. `tunnel open --strict`).
    #[error("{0}")]
    Refused(String),
}

pub struct ApiClient {
    base: String,
    key: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// `relay` is `host:port` (or `https://host:port`); `ca` an extra PEM CA (e.g. the dev CA);
    /// `proxy` the one to reach the relay through.
    pub fn new(
        relay: &str,
        key: &str,
        ca: Option<&Path>,
        proxy: Option<&culvert_protocol::proxy::Proxy>,
    ) -> anyhow::Result<ApiClient> {
        let host = relay
            .trim_start_matches("https://")
            .trim_start_matches("wss://")
            .trim_end_matches('/');
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca)
                .map_err(|e| anyhow::anyhow!("cannot read CA file {}: {e}", ca.display()))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                anyhow::bail!("CA file {} holds no PEM certificate", ca.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        // ureq speaks both HTTP CONNECT and SOCKS5; culvert decides which (and NO_PROXY).
        let proxy = proxy
            .map(|p| ureq::Proxy::new(p.url_with_credentials().expose()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("proxy: {e}"))?;
        let agent = ureq::Agent::config_builder()
            .proxy(proxy)
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Ok(ApiClient {
            base: format!("https://{host}/api/v1"),
            key: key.to_owned(),
            agent,
        })
    }

    fn finish(
        &self,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ApiError> {
        let mut resp = r.map_err(|e| ApiError::Transport {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            Ok(json)
        } else {
            let message = json["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| text.trim().chars().take(300).collect());
            Err(ApiError::Status { status, message })
        }
    }

    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .get(&url)
            .header("authorization", &format!("Bearer {}", self.key));
        for (k, v) in query {
            req = req.query(k, v);
        }
        self.finish(&url, req.call())
    }

    pub fn delete(&self, path: &str) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let r = self
            .agent
            .delete(&url)
            .header("authorization", &format!("Bearer {}", self.key))
            .call();
        self.finish(&url, r)
    }

    /// `POST /login`: a password for a key (the one call made without a key).
    pub fn login(&self, name: &str, password: &str) -> Result<Value, ApiError> {
        let url = format!("{}/login", self.base);
        let r = self
            .agent
            .post(&url)
            .send_json(serde_json::json!({"name": name, "password": password}));
        self.finish(&url, r)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let r = self
            .agent
            .post(&url)
            .header("authorization", &format!("Bearer {}", self.key))
            .send_json(body);
        self.finish(&url, r)
    }
}
