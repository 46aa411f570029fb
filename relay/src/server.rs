//! The relay's one HTTPS listener: rustls (TLS 1.2+) in front of an axum router that serves the
//! control API under `/api/v1` and the data plane at `/tunnel`, plus the periodic sweeper that
//! expires tunnels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker;
use crate::config::{BrokerMode, RelayConfig};
use crate::devices::Devices;
use crate::notify::{BrokerClient, Notifier};
use crate::registry::Registry;
use crate::store::Store;
use crate::tokens::Secret;
use crate::{api, dataplane};

/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest API request body.
const MAX_API_BODY: usize = 64 * 1024;

pub struct AppState {
    pub registry: Arc<Registry>,
    /// Devices allowed on the embedded broker.
    pub devices: Arc<Devices>,
    pub notifier: Notifier,
    /// The embedded broker's TLS listener, if it runs.
    pub mqtt_listen: Option<SocketAddr>,
    pub api_key: Secret,
    /// Every peer task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Announce culvert's flow-control extension to peers.
    pub flow_control: bool,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/tunnel", get(dataplane::handshake))
        .route("/api/v1/tunnels", post(api::open).get(api::list))
        .route("/api/v1/tunnels/{id}", get(api::describe))
        .route("/api/v1/tunnels/{id}/close", post(api::close))
        .route("/api/v1/tunnels/{id}/rotate", post(api::rotate))
        .route(
            "/api/v1/devices",
            post(api::add_device).get(api::list_devices),
        )
        .route(
            "/api/v1/devices/{thing}",
            axum::routing::delete(api::remove_device),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async {
            api::error(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint: the data plane is GET /tunnel, the API is under /api/v1/tunnels",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_API_BODY))
        .with_state(state)
}

/// A bound relay, ready to serve.
pub struct Relay {
    listener: TcpListener,
    tls: TlsAcceptor,
    state: Arc<AppState>,
    /// Stops the MQTT client and the embedded broker.
    background: CancellationToken,
}

impl Relay {
    /// Open the store, load the tunnels, and bind the listener.
    pub async fn bind(cfg: &RelayConfig) -> anyhow::Result<Relay> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create state directory {}: {e}",
                cfg.state_dir.display()
            )
        })?;
        let store = Arc::new(Store::open(&cfg.state_dir.join("tunnels.redb"))?);
        let registry = Arc::new(Registry::load(store.clone(), cfg.limits.clone())?);
        let devices = Arc::new(Devices::load(store)?);
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let background = CancellationToken::new();
        let (subscribed_tx, subscribed_rx) = tokio::sync::mpsc::unbounded_channel();
        let (client, mqtt_listen) = match &cfg.mqtt.mode {
            BrokerMode::Embedded { listen } => {
                let b = broker::start(
                    *listen,
                    cfg.tls.clone(),
                    devices.clone(),
                    cfg.mqtt.topic_template.clone(),
                    subscribed_tx,
                    background.clone(),
                )
                .await?;
                let client = BrokerClient {
                    host: b.internal.ip().to_string(),
                    port: b.internal.port(),
                    tls: None,
                    client_id: b.relay_username.clone(),
                    username: b.relay_username,
                    password: b.relay_password,
                };
                (client, Some(b.listen))
            }
            BrokerMode::External(c) => (c.clone(), None),
        };
        let notifier = Notifier::start(
            client,
            cfg.mqtt.topic_template.clone(),
            cfg.mqtt.region.clone(),
            mqtt_listen.is_some(),
            background.clone(),
        );
        tokio::spawn(renotify_unclaimed(
            subscribed_rx,
            registry.clone(),
            notifier.clone(),
        ));
        Ok(Relay {
            listener,
            tls: TlsAcceptor::from(cfg.tls.clone()),
            state: Arc::new(AppState {
                registry,
                devices,
                notifier,
                mqtt_listen,
                api_key: cfg.api_key.clone(),
                tasks: TaskTracker::new(),
                flow_control: cfg.flow_control,
            }),
            background,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The embedded MQTT broker's TLS address, when it runs.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.state.mqtt_listen
    }

    /// The tunnel registry (for status lines).
    pub fn registry(&self) -> Arc<Registry> {
        self.state.registry.clone()
    }

    /// Serve until `shutdown` is cancelled. Then stop accepting, let connected peers go on for
    /// up to `grace` (or until `hard` is cancelled), disconnect the rest and return.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        grace: Duration,
        hard: CancellationToken,
    ) -> anyhow::Result<()> {
        let Relay {
            listener,
            tls,
            state,
            background,
        } = self;
        let app = router(state.clone());
        let sweeper = {
            let registry = state.registry.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {
                            let r = registry.clone();
                            let _ = tokio::task::spawn_blocking(move || r.sweep()).await;
                        }
                    }
                }
            })
        };
        let conns = TaskTracker::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let app = app.clone();
            let stop = shutdown.clone();
            conns.spawn(async move {
                let stream =
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let svc = TowerToHyperService::new(app);
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(%peer, error = %e, "HTTP connection ended with an error");
                        }
                    }
                    _ = stop.cancelled() => {
                        // Let a request in flight finish (hyper must keep polling the
                        // connection until its graceful shutdown completes), within limits.
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(10), conn.as_mut()).await;
                    }
                }
            });
        }
        drop(listener);
        state.tasks.close();
        conns.close();
        let (_, peers) = state.registry.counts();
        info!(
            peers,
            ?grace,
            "shutting down: no new connections; connected peers may go on for the grace period"
        );
        let drained = tokio::select! {
            r = tokio::time::timeout(grace, state.tasks.wait()) => r.is_ok(),
            _ = hard.cancelled() => false,
        };
        if !drained {
            info!("disconnecting the remaining peers");
        }
        state
            .registry
            .kick_all(crate::registry::KickReason::Restart);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            state.tasks.wait().await;
            conns.wait().await;
        })
        .await;
        sweeper.abort();
        background.cancel();
        Ok(())
    }
}

/// How long after a device subscribes its tunnels may stay unclaimed before they are re-issued.
const CLAIM_GRACE: Duration = Duration::from_secs(2);

/// A device that subscribes may have missed notifications: one published before it ever
/// subscribed (the embedded broker keeps nothing for unknown subscribers) or lost with a
/// restart. Tunnels of that thing whose destination token is still unused a moment later get a
/// new destination token, announced again.
async fn renotify_unclaimed(
    mut subscribed: tokio::sync::mpsc::UnboundedReceiver<String>,
    registry: Arc<Registry>,
    notifier: Notifier,
) {
    while let Some(thing) = subscribed.recv().await {
        let (registry, notifier) = (registry.clone(), notifier.clone());
        tokio::spawn(async move {
            tokio::time::sleep(CLAIM_GRACE).await;
            for id in registry.unclaimed_destinations(&thing) {
                let r = registry.clone();
                let tid = id.clone();
                let rotated = tokio::task::spawn_blocking(move || {
                    r.rotate(&tid, crate::registry::RotateWhich::Destination)
                })
                .await;
                if let (Ok(Ok(tokens)), Ok(view)) = (rotated, registry.describe(&id))
                    && let Some(token) = tokens.destination
                {
                    info!(tunnel = %id, %thing, "re-announcing an unclaimed tunnel to its device");
                    notifier
                        .notify(&thing, &id, &token, &view.rec.services)
                        .await;
                }
            }
        });
    }
}
