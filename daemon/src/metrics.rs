//! culvertd's Prometheus metrics (served by `culvert_appliance::metrics` when
//! `daemon.metrics_listen` is set; always kept, as they also feed systemd's STATUS line).

use std::sync::Arc;

use culvert_appliance::metrics::prometheus_client::metrics::counter::Counter;
use culvert_appliance::metrics::prometheus_client::metrics::family::Family;
use culvert_appliance::metrics::prometheus_client::metrics::gauge::Gauge;
use culvert_appliance::metrics::prometheus_client::registry::Registry;

use culvert_appliance::metrics::Labels;

pub struct Metrics {
    pub registry: Arc<Registry>,
    /// Tunnels served now (destination sessions, connected or reconnecting).
    pub tunnels: Gauge,
    /// Tunnel connections open now.
    pub connections: Gauge,
    /// Tunnel connections that reached their target, by service.
    pub connections_total: Family<Labels, Counter>,
    /// Tunnel connections refused, by reason (denied, limit, no_rule, connect_failed, …).
    pub refused: Family<Labels, Counter>,
    /// Bytes carried, by direction (to_target, from_target).
    pub bytes: Family<Labels, Counter>,
    /// Reconnects to the relay after a session ended.
    pub relay_reconnects: Counter,
    /// SIGHUP reloads, by result (applied, refused).
    pub reloads: Family<Labels, Counter>,
    /// Whether each rule's target answered its last health probe (1 up, 0 down), by
    /// service; only with health reports on, and only for targets that are probed.
    pub target_up: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = Registry::with_prefix("culvertd");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            tunnels: Gauge::default(),
            connections: Gauge::default(),
            connections_total: Family::default(),
            refused: Family::default(),
            bytes: Family::default(),
            relay_reconnects: Counter::default(),
            reloads: Family::default(),
            target_up: Family::default(),
        };
        r.register("tunnels", "Tunnels served now", m.tunnels.clone());
        r.register(
            "open_connections",
            "Tunnel connections open now",
            m.connections.clone(),
        );
        r.register(
            "connections",
            "Tunnel connections that reached their target",
            m.connections_total.clone(),
        );
        r.register(
            "connections_refused",
            "Tunnel connections refused, by reason",
            m.refused.clone(),
        );
        r.register("bytes", "Bytes carried, by direction", m.bytes.clone());
        r.register(
            "relay_reconnects",
            "Reconnects to the relay after a session ended",
            m.relay_reconnects.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            m.reloads.clone(),
        );
        r.register(
            "target_up",
            "Whether each rule's target answered its last health probe, by service",
            m.target_up.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }
}

impl Metrics {
    pub fn label(key: &'static str, value: &str) -> Labels {
        culvert_appliance::metrics::label(key, value)
    }

    /// The one-line status systemd shows.
    pub fn status(&self) -> String {
        format!(
            "{} tunnel(s), {} connection(s) open",
            self.tunnels.get(),
            self.connections.get()
        )
    }
}
