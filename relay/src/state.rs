//! What every request handler shares: the registry, the device list, the notifier and the
//! relay's settings; and what a request carries about its connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::audit::Audit;
use crate::devices::Devices;
use crate::notify::Notifier;
use crate::registry::Registry;
use crate::slots::ListenerLimits;

pub struct AppState {
    pub registry: Arc<Registry>,
    /// Devices allowed on the embedded broker.
    pub devices: Arc<Devices>,
    pub notifier: Notifier,
    /// The embedded broker's TLS listener, if it runs.
    pub mqtt_listen: Option<SocketAddr>,
    /// Operators, keys and grants; the bootstrap API key.
    pub access: Arc<Access>,
    pub audit: Arc<Audit>,
    /// Every peer task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Announce culvert's flow-control extension to peers.
    pub flow_control: bool,
    /// Connection limits of the HTTPS listener.
    pub listener: ListenerLimits,
    /// AWS's control API (region, account, replayed signatures).
    pub aws: Arc<crate::aws::AwsApi>,
    /// The store is shared with other relays (PostgreSQL): operators and devices are read
    /// from it again every few seconds.
    pub shared_store: bool,
    /// This node's part in a cluster ([`crate::cluster`]), if it is one.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The slots of the connection a request arrived on (a request extension).
#[derive(Clone)]
pub struct ConnectionSlots(pub Arc<crate::slots::Admitted>);

/// The address a request came from (a request extension, as [`ConnectionSlots`]).
#[derive(Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);
