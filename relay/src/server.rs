//! The relay's one HTTPS listener: rustls (TLS 1.2+) in front of an axum router that serves the
//! control API under `/api/v1` and the data plane at `/tunnel`, plus the periodic sweeper that
//! expires tunnels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::access::Access;
use crate::audit::Audit;
use crate::broker;
use crate::cluster::Cluster;
use crate::config::StoreSettings;
use crate::config::{BrokerMode, RelayConfig};
use crate::devices::Devices;
use crate::notify::Notifier;
use crate::registry::Registry;
use crate::slots::{Gate, Guarded, RefusalLog};
use crate::state::{AppState, ConnectionSlots};
use crate::store::{PostgresStore, RedbStore, Store};
use crate::{api, aws, dataplane, reannounce};

/// Largest API request body.
const MAX_API_BODY: usize = 64 * 1024;

/// The control API's routes (under `/api/v1`), without the layer that authenticates them: the
/// API key on the relay's listener, the session cookie on the web console's.
pub fn api_routes() -> Router<Arc<AppState>> {
    use api::operators as ops;
    Router::new()
        .route("/tunnels", post(api::open).get(api::list))
        .route("/tunnels/{id}", get(api::describe))
        .route("/tunnels/{id}/close", post(api::close))
        .route("/tunnels/{id}/rotate", post(api::rotate))
        .route("/devices", post(api::add_device).get(api::list_devices))
        .route(
            "/devices/{thing}",
            axum::routing::delete(api::remove_device),
        )
        .route("/devices/{thing}/tags", post(api::set_device_tags))
        .route("/operators", post(ops::add).get(ops::list))
        .route("/operators/me", get(ops::me))
        .route("/operators/{name}/disable", post(ops::disable))
        .route("/operators/{name}/enable", post(ops::enable))
        .route("/operators/{name}/keys", post(ops::create_key))
        .route("/operators/{name}/password", post(ops::set_password))
        .route("/operators/{name}/keys/{id}/revoke", post(ops::revoke_key))
        .route("/operators/{name}/grants", post(ops::add_grant))
        .route(
            "/operators/{name}/grants/{id}/revoke",
            post(ops::revoke_grant),
        )
        .route(
            "/requests",
            post(api::requests::file).get(api::requests::list),
        )
        .route("/requests/{id}/approve", post(api::requests::approve))
        .route("/requests/{id}/refuse", post(api::requests::refuse))
        .route("/audit", get(api::audit::list))
}

pub fn router(state: Arc<AppState>) -> Router {
    // The API key is checked before anything else of a request is read.
    let api = api_routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        api::require_api_key,
    ));
    Router::new()
        // AWS's control API: AWS JSON 1.1, signed with SigV4 (checked by the handler).
        .route("/", post(aws::handle).fallback(not_found))
        .route("/tunnel", get(dataplane::handshake))
        // The one API call without a key: it trades a password for one.
        .route("/api/v1/login", post(api::operators::login))
        .nest("/api/v1", api)
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_API_BODY))
        .with_state(state)
}

/// Any other request: where things are.
async fn not_found() -> axum::response::Response {
    crate::reply::error(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint: the data plane is GET /tunnel, the API is under /api/v1/tunnels, AWS's API is POST / (aws iotsecuretunneling --endpoint-url https://this-relay)",
    )
}

/// Close the open tunnels whose operator may no longer reach them.
async fn enforce_grants(state: &AppState) {
    match state.access.close_revoked(&state.registry, None).await {
        Ok(closed) if !closed.is_empty() => state.audit.record(
            "access_expired",
            serde_json::json!({"tunnels_closed": closed}),
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not check tunnels against grants"),
    }
}

/// Operators and devices as the shared store has them now.
async fn reload_shared(state: &AppState) {
    if let Err(e) = state.access.reload().await {
        warn!(error = %e, "could not read operators from the shared store");
    }
    if let Err(e) = state.devices.reload().await {
        warn!(error = %e, "could not read devices from the shared store");
    }
}

/// Serve node links ([`crate::cluster`]) until `shutdown`: TLS with a client certificate the
/// cluster CA issued, then `GET /node/v1/peer` upgraded to a WebSocket.
async fn serve_links(
    listener: TcpListener,
    tls: TlsAcceptor,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route(crate::cluster::LINK_PATH, get(dataplane::link_handshake))
        .fallback(not_found)
        .with_state(state);
    // Node links are few (one per forwarded peer); bound them anyway.
    let slots = Arc::new(tokio::sync::Semaphore::new(100_000));
    let timeout = Duration::from_secs(10);
    while let Some((tcp, peer)) = crate::slots::accept(&listener, &shutdown, "node link").await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "too many node links; closing this one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(timeout, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, "node link refused: TLS (is its certificate from the cluster CA?)");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "node link TLS handshake timed out");
                    return;
                }
            };
            let svc = TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "node link ended with an error");
            }
        });
    }
}

/// A bound relay, ready to serve.
pub struct Relay {
    listener: TcpListener,
    /// A cluster node's node-link listener and its (mTLS) acceptor.
    links: Option<(TcpListener, TlsAcceptor)>,
    /// On a shared store: the tunnels other relays changed.
    changes: Option<tokio::sync::mpsc::Receiver<String>>,
    tls: TlsAcceptor,
    state: Arc<AppState>,
    /// Stops the MQTT client and the embedded broker.
    background: CancellationToken,
    /// The web console's listener and settings, when it is served.
    console: Option<(TcpListener, crate::console::ConsoleSettings)>,
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
        let (store, shared): (Arc<dyn Store>, Option<Arc<PostgresStore>>) = match &cfg.store {
            StoreSettings::Embedded => (
                Arc::new(RedbStore::open(&cfg.state_dir.join("tunnels.redb"))?),
                None,
            ),
            StoreSettings::Postgres { url, password, ca } => {
                let pg = Arc::new(PostgresStore::open(url, password.clone(), ca.clone()).await?);
                (pg.clone(), Some(pg))
            }
        };
        let registry = Arc::new(Registry::new(store.clone(), cfg.limits.clone()).await?);
        let cluster = match (&cfg.cluster, &shared) {
            (Some(c), Some(pg)) => {
                registry.set_cluster(pg.clone(), c.node.clone());
                let links = TcpListener::bind(c.listen).await.map_err(|e| {
                    anyhow::anyhow!("cluster.listen: cannot listen on {}: {e}", c.listen)
                })?;
                let cluster = Arc::new(Cluster::new(c, pg.clone()));
                // In the cluster before the first peer is placed.
                cluster.heartbeat(&registry).await;
                info!(node = %c.node, links = %c.listen, advertise = %c.advertise, "cluster node");
                Some((cluster, links, TlsAcceptor::from(c.server_tls.clone())))
            }
            _ => None,
        };
        let devices = Arc::new(Devices::load(store.clone()).await?);
        let mut aws_keys =
            aws::keys::AwsKeys::load_or_create(&cfg.aws.key_file).map_err(anyhow::Error::msg)?;
        if cfg.aws.bootstrap_pair {
            aws_keys = aws_keys.with_bootstrap(cfg.api_key.expose());
        }
        let access = Arc::new(
            Access::load(
                store,
                devices.clone(),
                cfg.api_key.clone(),
                Arc::new(crate::registry::now_ms),
                cfg.require_reason,
            )
            .await?
            .with_aws_keys(Arc::new(aws_keys)),
        );
        let audit = Arc::new(Audit::open(&cfg.audit_file).map_err(anyhow::Error::msg)?);
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let console = match &cfg.console {
            None => None,
            Some(c) => Some((
                TcpListener::bind(c.listen).await.map_err(|e| {
                    anyhow::anyhow!("console.listen: cannot listen on {}: {e}", c.listen)
                })?,
                c.clone(),
            )),
        };
        let background = CancellationToken::new();
        let (notifier, mqtt_listen) = match &cfg.mqtt.mode {
            BrokerMode::Embedded { listen } => {
                let (subscribed_tx, subscribed_rx) =
                    tokio::sync::mpsc::channel(broker::SUBSCRIBED_QUEUE);
                let b = broker::start(
                    *listen,
                    cfg.mqtt.listener.clone(),
                    cfg.tls.clone(),
                    devices.clone(),
                    cfg.mqtt.topic_template.clone(),
                    broker::ToRelay {
                        subscribed: subscribed_tx,
                        registry: registry.clone(),
                        audit: audit.clone(),
                    },
                    background.clone(),
                )
                .await?;
                let notifier = Notifier::embedded(
                    b.publisher,
                    cfg.mqtt.topic_template.clone(),
                    cfg.mqtt.region.clone(),
                );
                tokio::spawn(reannounce::run(
                    subscribed_rx,
                    registry.clone(),
                    notifier.clone(),
                    background.clone(),
                ));
                (notifier, Some(b.listen))
            }
            BrokerMode::External(c) => {
                let notifier = Notifier::external(
                    c.clone(),
                    cfg.mqtt.topic_template.clone(),
                    cfg.mqtt.region.clone(),
                    background.clone(),
                );
                (notifier, None)
            }
        };
        let (cluster, links) = match cluster {
            Some((c, l, tls)) => (Some(c), Some((l, tls))),
            None => (None, None),
        };
        Ok(Relay {
            listener,
            links,
            changes: shared.map(|pg| pg.listen()),
            tls: TlsAcceptor::from(cfg.tls.clone()),
            state: Arc::new(AppState {
                registry,
                devices,
                notifier,
                mqtt_listen,
                access,
                audit,
                tasks: TaskTracker::new(),
                flow_control: cfg.flow_control,
                listener: cfg.listener.clone(),
                aws: Arc::new(aws::AwsApi::new(
                    cfg.aws.region.clone(),
                    cfg.aws.account_id.clone(),
                )),
                shared_store: matches!(cfg.store, StoreSettings::Postgres { .. }),
                cluster,
            }),
            background,
            console,
        })
    }

    /// The web console's address, when it is served.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The embedded MQTT broker's TLS address, when it runs.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.state.mqtt_listen
    }

    /// The dev relay's bootstrap AWS pair (access key id, secret), if it has one.
    pub fn aws_bootstrap(&self) -> Option<(String, String)> {
        self.state.access.aws_bootstrap()
    }

    /// The region AWS clients sign for.
    pub fn aws_region(&self) -> &str {
        &self.state.aws.region
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
            links,
            changes,
            tls,
            state,
            background,
            console,
        } = self;
        let app = router(state.clone());
        if let Some((listener, settings)) = console {
            let c = Arc::new(crate::console::Console::new(state.clone(), &settings));
            tokio::spawn(crate::console::serve(
                listener,
                tls.clone(),
                c,
                shutdown.clone(),
                state.listener.handshake_timeout,
            ));
        }
        if let Some(mut changes) = changes {
            let state = state.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let id = tokio::select! {
                        _ = stop.cancelled() => break,
                        id = changes.recv() => match id { Some(id) => id, None => break },
                    };
                    state.registry.changed_elsewhere(&id).await;
                }
            });
        }
        if let (Some((links, tls)), Some(cluster)) = (links, state.cluster.clone()) {
            tokio::spawn(serve_links(links, tls, state.clone(), shutdown.clone()));
            let registry = state.registry.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::cluster::RENEW);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => cluster.heartbeat(&registry).await,
                    }
                }
            });
        }
        let sweeper = {
            let state = state.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => state.registry.sweep().await,
                    }
                    // Grants that ran out close the tunnels they allowed (every 5 s: it reads
                    // every open tunnel). On a shared store, what other relays changed about
                    // operators and devices is read first.
                    n += 1;
                    if n.is_multiple_of(5) {
                        if state.shared_store {
                            reload_shared(&state).await;
                        }
                        enforce_grants(&state).await;
                    }
                }
            })
        };
        let conns = TaskTracker::new();
        let gate = Arc::new(Gate::new(state.listener.clone()));
        let refusals = RefusalLog::new("https");
        let timeout = gate.limits.handshake_timeout;
        while let Some((tcp, peer)) = crate::slots::accept(&listener, &shutdown, "HTTPS").await {
            // A slot first: a full pool closes the connection before any TLS work.
            let admitted = match gate.admit(peer.ip()) {
                Ok(a) => Arc::new(a),
                Err((pool, full)) => {
                    refusals.refused(peer, pool, full, &gate.limits);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let app = app.clone();
            let stop = shutdown.clone();
            conns.spawn(async move {
                let stream = match tokio::time::timeout(timeout, tls.accept(tcp)).await {
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
                // The first request head read ends the handshake: its slot is given back. The
                // data plane marks the connection upgraded through the request's extensions.
                let slots = admitted.clone();
                let app = tower::ServiceExt::map_request(
                    app,
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        slots.handshake_done();
                        req.extensions_mut().insert(ConnectionSlots(slots.clone()));
                        req.extensions_mut().insert(crate::state::Peer(peer));
                        req
                    },
                );
                // The socket holds the connection's slots for as long as it lives, WebSocket
                // session included.
                let stream = Guarded::new(stream, admitted, timeout);
                let svc = TowerToHyperService::new(app);
                // The header timeout also ends a keep-alive connection that sits idle.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
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
        if let Some(cluster) = &state.cluster {
            // A node drains at once: its peers reconnect, through the load balancer, to the
            // nodes that remain, which may take its tunnels as soon as its leases are gone.
            info!(
                peers,
                forwarded = cluster.forwarded_count(),
                "leaving the cluster: peers reconnect to the other nodes"
            );
            cluster.leave().await;
            cluster.kick_forwarded(crate::registry::KickReason::Restart);
        } else {
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
