//! Per-target health: with `[mqtt] health_report_secs`, culvertd probes every rule's target at
//! that interval and publishes the results to its relay on
//! [`culvert_protocol::health_topic`], so that `culvert device list`, `culvert tunnel describe`
//! and `culvert tunnel open` can say which services this gateway has and whether their
//! targets answer, before anyone opens a session.
//!
//! A probe sends no application data:
//! - tcp and unix targets: the connection a tunnel connection would make (name resolved, every
//!   address checked against the rule's ACL, the rule's connect timeout), closed at once;
//! - http rules: the same for each route's upstream; down when any is;
//! - udp targets: resolved and checked only, and reported `unchecked` (UDP has no handshake:
//!   a probe would mean sending a datagram the device has to interpret);
//! - serial targets: `up` when the device node exists (opening the port would raise DTR,
//!   which resets some devices);
//! - a rule with `probe = false` (a device that logs or counts every connection, or has few
//!   connection slots): `unchecked`.
//!
//! Changes are logged (a target going down is a warning), each result is the
//! `culvertd_target_up{service}` gauge, and reports are QoS 0: one lost is repaired by the
//! next.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Kind, Service, Target};
use crate::metrics::Metrics;
use crate::rules::Gateway;
use crate::target;

/// What a probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Up,
    Down,
    Unchecked,
}

/// One rule's line in a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub name: String,
    pub kind: &'static str,
    pub target: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Probe `svc`'s target as a connection to it would reach it, sending nothing.
pub async fn probe(svc: &Service) -> Probe {
    let (kind, shown) = match &svc.kind {
        Kind::Forward(t @ Target::Tcp(_)) => ("tcp", t.to_string()),
        Kind::Forward(t @ Target::Udp(_)) => ("udp", t.to_string()),
        Kind::Forward(t @ Target::Unix(_)) => ("unix", t.to_string()),
        Kind::Forward(t @ Target::Serial(_)) => ("serial", t.to_string()),
        Kind::Http(h) => (
            "http",
            h.routes
                .iter()
                .map(|r| r.upstream.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
    };
    let (state, detail) = if !svc.probe {
        (State::Unchecked, Some("not probed (probe = false)".into()))
    } else {
        match &svc.kind {
            Kind::Forward(Target::Udp(hp)) => {
                match target::resolve(hp, svc.connect_timeout)
                    .await
                    .and_then(|a| target::check_all(svc, hp, &a))
                {
                    Ok(()) => (
                        State::Unchecked,
                        Some("UDP is not probed (it would take sending a datagram)".into()),
                    ),
                    Err(r) => (State::Down, Some(r.detail)),
                }
            }
            // Opening a serial port raises DTR, which resets some devices (Arduinos, some
            // controllers): only the device node is looked at.
            Kind::Forward(Target::Serial(path)) => match std::fs::metadata(path) {
                Ok(_) => (
                    State::Up,
                    Some("the device exists (serial ports are not opened to probe them)".into()),
                ),
                Err(e) => (State::Down, Some(format!("{}: {e}", path.display()))),
            },
            Kind::Forward(t) => match target::connect(svc, t).await {
                Ok(_) => (State::Up, None),
                Err(r) => (State::Down, Some(r.detail)),
            },
            Kind::Http(h) => {
                let mut down = Vec::new();
                for r in &h.routes {
                    let t = Target::Tcp(r.upstream.clone());
                    if let Err(r) = target::connect(svc, &t).await {
                        down.push(r.detail);
                    }
                }
                match down.is_empty() {
                    true => (State::Up, None),
                    false => (State::Down, Some(down.join("; "))),
                }
            }
        }
    };
    Probe {
        name: svc.name.clone(),
        kind,
        target: shown,
        state,
        detail,
    }
}

/// Every rule probed at once (each bounded by its connect timeout), in the rules' order.
pub async fn probe_all(gw: &Gateway) -> Vec<Probe> {
    let rules = gw.rules();
    let mut set = tokio::task::JoinSet::new();
    for (i, svc) in rules.config.services.values().enumerate() {
        let svc = svc.clone();
        set.spawn(async move { (i, probe(&svc).await) });
    }
    let mut probes: Vec<(usize, Probe)> = set.join_all().await;
    probes.sort_by_key(|(i, _)| *i);
    probes.into_iter().map(|(_, p)| p).collect()
}

/// The report's payload (the format is in [`culvert_protocol::health_topic`]).
pub fn report(probes: &[Probe]) -> String {
    serde_json::json!({ "services": probes }).to_string()
}

/// Probe and report every `every` until `stop`.
pub async fn run(
    gw: Arc<Gateway>,
    client: AsyncClient,
    thing: String,
    every: Duration,
    stop: CancellationToken,
) {
    let topic = culvert_protocol::health_topic(&thing);
    let mut last: Vec<Probe> = Vec::new();
    loop {
        let probes = tokio::select! {
            _ = stop.cancelled() => return,
            p = probe_all(&gw) => p,
        };
        for p in &probes {
            let before = last.iter().find(|l| l.name == p.name).map(|l| l.state);
            if before != Some(p.state) {
                let detail = p.detail.as_deref().unwrap_or("");
                match p.state {
                    State::Down => {
                        warn!(service = %p.name, target = %p.target, "target does not answer: {detail}")
                    }
                    State::Up => info!(service = %p.name, target = %p.target, "target answers"),
                    State::Unchecked => {
                        debug!(service = %p.name, target = %p.target, "target not probed: {detail}")
                    }
                }
            }
            let up = Metrics::label("service", &p.name);
            match p.state {
                State::Up | State::Down => {
                    let answers = i64::from(p.state == State::Up);
                    gw.metrics.target_up.get_or_create(&up).set(answers);
                }
                State::Unchecked => {
                    gw.metrics.target_up.remove(&up);
                }
            }
        }
        // Rules removed by a reload leave the gauge too.
        for gone in last
            .iter()
            .filter(|l| !probes.iter().any(|p| p.name == l.name))
        {
            gw.metrics
                .target_up
                .remove(&Metrics::label("service", &gone.name));
        }
        if let Err(e) = client.try_publish(&topic, QoS::AtMostOnce, false, report(&probes)) {
            // The next round sends it again.
            debug!(error = %e, "health report not queued (the broker connection is down?)");
        }
        last = probes;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_say_up_down_or_unchecked_and_why() {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = up.local_addr().unwrap();
        let down = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let text = format!(
            "[acl]\nallow = [\"127.0.0.0/8\"]\n\
             [services.SSH]\ntarget = \"{up}\"\n\
             [services.PLC]\ntarget = \"{down}\"\n\
             [services.SNMP]\ntarget = \"udp:127.0.0.1:161\"\n\
             [services.CAM]\ntarget = \"{down}\"\nprobe = false\n"
        );
        let cfg = crate::config::parse(&text, std::path::Path::new(".")).unwrap();
        let p = |name: &str| {
            let svc = cfg.services[name].clone();
            async move { probe(&svc).await }
        };
        let ssh = p("SSH").await;
        assert_eq!(
            (ssh.kind, ssh.state, &ssh.detail),
            ("tcp", State::Up, &None)
        );
        let plc = p("PLC").await;
        assert_eq!(plc.state, State::Down);
        assert!(
            plc.detail.as_deref().unwrap().contains("refused"),
            "{plc:?}"
        );
        let snmp = p("SNMP").await;
        assert_eq!((snmp.kind, snmp.state), ("udp", State::Unchecked));
        assert_eq!(snmp.target, "udp:127.0.0.1:161");
        let cam = p("CAM").await;
        assert_eq!(cam.state, State::Unchecked);
        let json: serde_json::Value = serde_json::from_str(&report(&[ssh, plc])).unwrap();
        assert_eq!(json["services"][0]["state"], "up");
        assert_eq!(json["services"][0]["name"], "SSH");
        assert!(json["services"][0].get("detail").is_none());
        assert_eq!(json["services"][1]["state"], "down");
    }
}
