//! The rules in force, swapped whole on reload.
//!
//! Every new tunnel connection takes the current [`Rules`] once and keeps them for its life, so
//! a reload (SIGHUP) applies to new connections and leaves live ones as they are. Connection
//! counters survive a reload by rule name, so live connections keep counting against a changed
//! `max_connections`; rate and bandwidth limiters are rebuilt only for rules whose limits
//! changed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use tracing::info;

use crate::audit::Audit;
use crate::config::{Config, Limits};
use crate::limits::{Gauge, Limiters};

/// One configuration generation.
pub struct Rules {
    pub config: Arc<Config>,
    /// Per-rule limiters, by service name.
    pub limiters: HashMap<String, Arc<Limiters>>,
}

/// culvertd's shared state: the rules in force and the audit trail.
pub struct Gateway {
    current: RwLock<Arc<Rules>>,
    /// Open-connection counts by rule name, kept for the life of the process: a rule removed
    /// and added back still counts the connections it left running.
    gauges: Mutex<HashMap<String, Gauge>>,
    pub audit: Audit,
    pub metrics: crate::metrics::Metrics,
    /// Connections open to targets, all tunnels together, and their ceiling
    /// (`daemon.max_connections`, fixed at start like the rest of `[daemon]`).
    pub connections: Gauge,
    pub max_connections: usize,
    /// Tells embedded HTTP servers to stop keeping connections alive at shutdown.
    pub http_shutdown: tokio::sync::watch::Sender<bool>,
    /// The metrics port actually bound: a management port of this gateway whatever the
    /// configuration says now (its `[daemon]` changes apply only at restart).
    metrics_port: Mutex<Option<u16>>,
    /// The site's consent switch as last read: true while remote access is allowed
    /// ([`crate::consent`] keeps it current).
    pub consent: tokio::sync::watch::Sender<bool>,
}

fn protect(mut config: Config, port: Option<u16>) -> Config {
    if let Some(p) = port {
        for svc in config.services.values_mut() {
            if !svc.policy.management_ports.contains(&p) {
                svc.policy.management_ports.push(p);
            }
        }
    }
    config
}

impl Gateway {
    pub fn new(config: Config) -> Arc<Gateway> {
        let audit = Audit::new(config.audit_file.as_deref());
        // Fail closed from the first instant: a switch that is not read yet is off.
        let consent_at_start = config
            .consent_switch
            .as_deref()
            .is_none_or(crate::consent::reads_on);
        let max_connections = config.daemon.max_connections;
        let gauges = Mutex::new(HashMap::new());
        let rules = build(config, None, &gauges);
        Arc::new(Gateway {
            current: RwLock::new(Arc::new(rules)),
            gauges,
            audit,
            metrics: crate::metrics::Metrics::default(),
            connections: Gauge::default(),
            max_connections,
            metrics_port: Mutex::new(None),
            http_shutdown: tokio::sync::watch::channel(false).0,
            consent: tokio::sync::watch::channel(consent_at_start).0,
        })
    }

    pub fn rules(&self) -> Arc<Rules> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn config(&self) -> Arc<Config> {
        self.rules().config.clone()
    }

    /// The metrics endpoint is bound to `port`: no rule may reach it.
    pub fn protect_metrics_port(&self, port: u16) {
        *self.metrics_port.lock().unwrap_or_else(|p| p.into_inner()) = Some(port);
        let old = self.rules();
        let config = protect((*old.config).clone(), Some(port));
        let rules = build(config, Some(&old), &self.gauges);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    }

    /// Put a new, already validated configuration in force for new connections.
    pub fn reload(&self, config: Config) {
        let port = *self.metrics_port.lock().unwrap_or_else(|p| p.into_inner());
        let config = protect(config, port);
        let old = self.rules();
        let (before, after) = (&old.config.services, &config.services);
        let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        let changed: Vec<&String> = after
            .iter()
            .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
            .map(|(k, _)| k)
            .collect();
        info!(
            ?added,
            ?removed,
            ?changed,
            "configuration reloaded; it applies to new connections"
        );
        if old.config.endpoint != config.endpoint
            || old.config.mqtt != config.mqtt
            || old.config.daemon != config.daemon
        {
            tracing::warn!(
                "[relay], [mqtt] or [daemon] settings changed; they take effect at the next restart of culvertd"
            );
        }
        self.audit.set_file(config.audit_file.as_deref());
        let rules = build(config, Some(&old), &self.gauges);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    }
}

fn build(config: Config, old: Option<&Rules>, gauges: &Mutex<HashMap<String, Gauge>>) -> Rules {
    let mut gauges = gauges.lock().unwrap_or_else(|p| p.into_inner());
    let limiters = config
        .services
        .iter()
        .map(|(name, svc)| {
            let prev = old.and_then(|o| o.limiters.get(name));
            let l = match prev {
                Some(p) if p.limits == svc.limits => p.clone(),
                Some(p) => Arc::new(p.update(&svc.limits)),
                None => {
                    let open = gauges.entry(name.clone()).or_default().clone();
                    Arc::new(Limiters::new(&svc.limits, open))
                }
            };
            (name.clone(), l)
        })
        .collect();
    Rules {
        config: Arc::new(config),
        limiters,
    }
}

/// What culvertd knows of one tunnel it serves.
/// Who opened a tunnel and why: from culvert-relay's notification (the relay's record, never
/// what the source side claims); empty with `--token` or another relay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub operator: Option<String>,
    pub reason: Option<String>,
}

pub struct TunnelState {
    /// For logs and the audit trail: the tunnel id if the notification named it, else a
    /// fingerprint of the destination token (never the token).
    pub label: String,
    /// For the audit trail.
    pub identity: Identity,
    /// The relay's address as this gateway sees it: the hop HTTP requests arrive from.
    pub relay_ip: Mutex<Option<IpAddr>>,
    /// The site's answer, when it approves each tunnel (`[consent] approve_tunnels`).
    pub approval: Option<tokio::sync::watch::Receiver<crate::approval::State>>,
    open: Gauge,
    limiters: Mutex<Arc<Limiters>>,
}

impl TunnelState {
    pub fn new(label: String) -> TunnelState {
        let open = Gauge::default();
        TunnelState {
            label,
            identity: Identity::default(),
            relay_ip: Mutex::new(None),
            approval: None,
            limiters: Mutex::new(Arc::new(Limiters::new(&Limits::default(), open.clone()))),
            open,
        }
    }

    /// The tunnel's limiters under the current `tunnel_limits` (rebuilt if those changed).
    pub fn limiters(&self, limits: &Limits) -> Arc<Limiters> {
        let mut l = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        if l.limits != *limits {
            *l = Arc::new(l.update(limits));
        }
        l.clone()
    }

    pub fn open_connections(&self) -> usize {
        self.open.current()
    }
}

/// The audit label of a tunnel known only by its destination token.
pub fn token_label(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = d.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("token:{hex}")
}
