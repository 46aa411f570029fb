//! Gateways' health reports: which services a gateway has rules for and whether their targets
//! answer, published by culvertd (`[mqtt] health_report_secs`) on its thing's
//! [`culvert_protocol::health_topic`] through the embedded broker, which takes that topic from
//! that device only. The relay keeps the latest report per device in memory (a report is
//! repeated every interval, so a restart loses at most one interval) and shows it in
//! `GET /api/v1/devices` and in a tunnel's description.
//!
//! A report is device input: bounded in size and count, every text made safe, names checked;
//! a malformed one is ignored with a log line and leaves the previous report in place.

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::devices::Devices;

/// Largest report accepted.
pub const MAX_REPORT: usize = 64 * 1024;
/// Most services a report may list.
const MAX_SERVICES: usize = 256;
/// Longest target or detail kept.
const MAX_TEXT: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Up,
    Down,
    Unchecked,
}

/// One service of a gateway, as its last report had it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A gateway's last report and when it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub at_ms: i64,
    pub services: Vec<ServiceHealth>,
}

#[derive(Deserialize)]
struct Report {
    services: Vec<ServiceHealth>,
}

/// A report checked and made safe to store and show; the error says why it is ignored.
pub fn parse(payload: &[u8]) -> Result<Vec<ServiceHealth>, String> {
    if payload.len() > MAX_REPORT {
        return Err(format!("{} bytes, over {MAX_REPORT}", payload.len()));
    }
    let r: Report = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    if r.services.len() > MAX_SERVICES {
        return Err(format!(
            "{} services, over {MAX_SERVICES}",
            r.services.len()
        ));
    }
    let mut out: Vec<ServiceHealth> = Vec::with_capacity(r.services.len());
    for s in r.services {
        if !culvert_protocol::valid_name(&s.name) {
            return Err("a service name that is not 1-128 of A-Z a-z 0-9 : _ -".into());
        }
        if !matches!(s.kind.as_str(), "tcp" | "udp" | "unix" | "serial" | "http") {
            return Err(format!(
                "service {}: kind is not tcp, udp, unix, serial or http",
                s.name
            ));
        }
        if out.iter().any(|o| o.name == s.name) {
            return Err(format!("service {} listed twice", s.name));
        }
        out.push(ServiceHealth {
            target: culvert_protocol::tidy_text(&s.target, MAX_TEXT),
            detail: s
                .detail
                .map(|d| culvert_protocol::tidy_text(&d, MAX_TEXT))
                .filter(|d| !d.is_empty()),
            ..s
        });
    }
    Ok(out)
}

/// Apply one report published by `thing`'s authenticated gateway.
pub fn report(devices: &Devices, thing: &str, payload: &[u8]) {
    match parse(payload) {
        Ok(services) => {
            debug!(%thing, services = services.len(), "health report");
            devices.set_health(thing, services);
        }
        Err(why) => warn!(%thing, reason = %why, "malformed health report ignored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_checked_and_their_text_made_safe() {
        let ok = br#"{"services":[{"name":"SSH","kind":"tcp","target":"10.0.0.5:22","state":"up"},
            {"name":"PLC","kind":"tcp","target":"10.0.0.6:502","state":"down","detail":"refused\u001b[2J"},
            {"name":"SNMP","kind":"udp","target":"udp:10.0.0.7:161","state":"unchecked","extra":1}]}"#;
        let s = parse(ok).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].state, State::Up);
        assert_eq!(s[1].detail.as_deref(), Some("refused?[2J"));
        assert_eq!(s[2].state, State::Unchecked);
        let bad = |p: &[u8]| parse(p).unwrap_err();
        assert!(bad(b"42").contains("invalid type"));
        assert!(
            bad(br#"{"services":[{"name":"a b","kind":"tcp","target":"","state":"up"}]}"#)
                .contains("name")
        );
        assert!(
            bad(br#"{"services":[{"name":"A","kind":"ftp","target":"","state":"up"}]}"#)
                .contains("kind")
        );
        assert!(
            bad(br#"{"services":[{"name":"A","kind":"tcp","target":"","state":"sideways"}]}"#)
                .contains("unknown variant")
        );
        let twice = br#"{"services":[{"name":"A","kind":"tcp","target":"","state":"up"},{"name":"A","kind":"tcp","target":"","state":"up"}]}"#;
        assert!(bad(twice).contains("twice"));
        assert!(bad(&vec![b' '; MAX_REPORT + 1]).contains("over"));
    }
}
