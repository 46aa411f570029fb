//! culvert-relay's Prometheus metrics, process-wide (served when `daemon.metrics_listen` is set;
//! also the source of systemd's STATUS line).

use std::sync::{Arc, LazyLock};

use culvert_appliance::metrics::prometheus_client::metrics::counter::Counter;
use culvert_appliance::metrics::prometheus_client::metrics::family::Family;
use culvert_appliance::metrics::prometheus_client::metrics::gauge::Gauge;
use culvert_appliance::metrics::prometheus_client::registry::Registry;

pub use culvert_appliance::metrics::{Labels, label};

pub struct Metrics {
    pub registry: Arc<Registry>,
    /// Open tunnels (refreshed with the status line).
    pub tunnels: Gauge,
    /// Peers (source or destination WebSockets) connected now.
    pub peers: Gauge,
    /// Successful data-plane handshakes, by mode: first connections and reconnects alike.
    pub peer_connects: Family<Labels, Counter>,
    /// Refused data-plane handshakes, by HTTP status.
    pub refused: Family<Labels, Counter>,
    /// Bytes of frames forwarded from one peer to the other.
    pub bytes_forwarded: Counter,
    /// Connections closed at accept because a limit was reached, by listener and limit.
    pub connections_refused: Family<Labels, Counter>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut r = Registry::with_prefix("culvert_relay");
    let m = Metrics {
        registry: Arc::new(Registry::default()),
        tunnels: Gauge::default(),
        peers: Gauge::default(),
        peer_connects: Family::default(),
        refused: Family::default(),
        bytes_forwarded: Counter::default(),
        connections_refused: Family::default(),
    };
    r.register("tunnels", "Open tunnels", m.tunnels.clone());
    r.register("peers", "Peers connected now", m.peers.clone());
    r.register(
        "peer_connects",
        "Successful data-plane handshakes, by mode (reconnects included)",
        m.peer_connects.clone(),
    );
    r.register(
        "handshakes_refused",
        "Refused data-plane handshakes, by HTTP status",
        m.refused.clone(),
    );
    r.register(
        "forwarded_bytes",
        "Bytes of frames forwarded between peers",
        m.bytes_forwarded.clone(),
    );
    r.register(
        "connections_refused",
        "Connections closed at accept because a limit was reached, by listener and limit",
        m.connections_refused.clone(),
    );
    Metrics {
        registry: Arc::new(r),
        ..m
    }
});
