//! The shared store: PostgreSQL (`store = "postgres://…"`), for several relays on one state.
//!
//! The tables are the embedded store's ([`super::redb`]): records as JSON, and the indexes
//! [`super::ops`] derives from them (migrations in `relay/migrations/postgres/`, applied in
//! order on open, under an advisory lock so that relays starting together migrate once). Every
//! change is one `SERIALIZABLE` transaction running the same [`ops`] code as the other stores,
//! retried when PostgreSQL reports a serialization failure: two relays admitting the same
//! single-use token at once are ordered by the database, and one of them is refused.
//!
//! The `postgres` crate (the blocking client over `tokio-postgres`, from the rust-postgres
//! project) runs on tokio's blocking pool, as redb does, because [`ops`] is synchronous. The
//! relay keeps a few connections ([`CONNECTIONS`]) and reconnects one that broke. Connections
//! are TLS (rustls) unless the database is on this machine or the URL says `sslmode=disable`
//! ([`PostgresStore::open`]).

use std::cell::{Cell, RefCell};

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use culvert_protocol::Mode;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, IsolationLevel, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::ops::{self, Reads, Tables, TokenRef};
use super::{
    AdmitError, Admitted, ChangeError, CloseReason, Closed, DeviceRecord, Due, Handshake,
    ListQuery, NewTokens, OnSite, Store, StoreError, TagChange, TunnelRecord,
};
use crate::access::OperatorRecord;
use crate::tokens::TokenHash;

/// The schema migrations, in order: (version, SQL).
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/postgres/001_tables.sql")),
    (2, include_str!("../../migrations/postgres/002_cluster.sql")),
];

/// The channel every change that must reach the node holding a tunnel's peers (a close, a
/// rotation) is announced on, with the tunnel id as payload ([`PostgresStore::listen`]).
pub const CHANGES: &str = "culvert_tunnels";

/// Where a side of a tunnel is to attach ([`PostgresStore::place`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On this node: it now holds the side's lease.
    Here,
    /// On another node, which holds the tunnel: forward to it.
    At { node: String, addr: String },
}

/// A live side lease of another node, as [`PostgresStore::placements`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub tunnel: String,
    pub mode: Mode,
    pub node: String,
    pub since_ms: i64,
}

/// Connections this relay keeps to the database.
pub const CONNECTIONS: usize = 4;

/// A change that keeps meeting serialization failures is given up after this many tries.
const TRIES: usize = 20;

/// Any 64-bit number, the same in every relay: the advisory lock migrations run under.
const MIGRATION_LOCK: i64 = 0x6375_6c76_6572_7401;

pub struct PostgresStore {
    config: Arc<postgres::Config>,
    /// How connections are made (TLS unless `sslmode=disable`; see [`PostgresStore::open`]).
    tls: MakeRustlsConnect,
    /// Where errors say the store is: the URL without its password.
    shown: Arc<str>,
    pool: Arc<Vec<Mutex<Option<Client>>>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

fn fail(path: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// `postgres://user:secret@host/db` → `postgres://user@host/db`.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..s + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn is_serialization_failure(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
            || *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// What one transaction sees and changes.
struct Set<'a, 'b> {
    tx: RefCell<&'a mut Transaction<'b>>,
    path: &'a str,
    /// A statement failed because a concurrent transaction got in the way: try again.
    conflict: &'a Cell<bool>,
}

impl Set<'_, '_> {
    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        fail(self.path, e)
    }

    fn db_err(&self, e: postgres::Error) -> StoreError {
        if is_serialization_failure(&e) {
            self.conflict.set(true);
        }
        self.err(e)
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, key: &str, v: &str) -> Result<T, StoreError> {
        serde_json::from_str(v).map_err(|e| self.err(format!("record {key:?} is corrupt: {e}")))
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, StoreError> {
        self.tx
            .borrow_mut()
            .query(sql, params)
            .map_err(|e| self.db_err(e))
    }

    fn exec(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<(), StoreError> {
        self.tx
            .borrow_mut()
            .execute(sql, params)
            .map(|_| ())
            .map_err(|e| self.db_err(e))
    }

    /// Tell every relay listening on [`CHANGES`] that tunnel `id` changed (delivered when,
    /// and only if, the transaction commits).
    fn announce(&self, id: &str) -> Result<(), StoreError> {
        self.exec("SELECT pg_notify($1, $2)", &[&CHANGES, &id])
    }

    fn ids(&self, sql: &str, param: i64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .query(sql, &[&param])?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect())
    }
}

impl Reads for Set<'_, '_> {
    fn tunnel(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError> {
        match self
            .query("SELECT rec FROM tunnels WHERE id = $1", &[&id])?
            .first()
        {
            Some(r) => Ok(Some(self.decode(id, r.get(0))?)),
            None => Ok(None),
        }
    }

    fn token(&self, h: &TokenHash) -> Result<Option<TokenRef>, StoreError> {
        match self
            .query("SELECT ref FROM tokens WHERE hash = $1", &[&&h.0[..]])?
            .first()
        {
            Some(r) => Ok(Some(self.decode("token", r.get(0))?)),
            None => Ok(None),
        }
    }

    fn client_token(&self, h: &TokenHash) -> Result<Option<String>, StoreError> {
        Ok(self
            .query(
                "SELECT tunnel FROM client_tokens WHERE hash = $1",
                &[&&h.0[..]],
            )?
            .first()
            .map(|r| r.get(0)))
    }

    fn each_tunnel(&self, f: &mut dyn FnMut(TunnelRecord)) -> Result<(), StoreError> {
        for r in self.query("SELECT id, rec FROM tunnels", &[])? {
            f(self.decode(r.get(0), r.get(1))?);
        }
        Ok(())
    }

    fn open_until(&self, until_ms: i64) -> Result<Vec<String>, StoreError> {
        self.ids(
            "SELECT id FROM open_by_expiry WHERE expires_ms <= $1 ORDER BY expires_ms, id",
            until_ms,
        )
    }

    fn closed_before(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        self.ids(
            "SELECT id FROM closed_by_time WHERE closed_ms < $1 ORDER BY closed_ms, id",
            before_ms,
        )
    }

    fn count_open(&self) -> Result<usize, StoreError> {
        let n: i64 = self
            .query("SELECT count(*) FROM open_by_expiry", &[])?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

impl Tables for Set<'_, '_> {
    fn put_tunnel(&mut self, rec: &TunnelRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec).map_err(|e| self.err(e))?;
        self.exec(
            "INSERT INTO tunnels (id, rec) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET rec = EXCLUDED.rec",
            &[&rec.id, &json],
        )
    }

    fn remove_tunnel(&mut self, id: &str) -> Result<(), StoreError> {
        self.exec("DELETE FROM tunnels WHERE id = $1", &[&id])
    }

    fn put_token(&mut self, h: &TokenHash, r: &TokenRef) -> Result<(), StoreError> {
        let json = serde_json::to_string(r).map_err(|e| self.err(e))?;
        self.exec(
            "INSERT INTO tokens (hash, ref) VALUES ($1, $2) \
             ON CONFLICT (hash) DO UPDATE SET ref = EXCLUDED.ref",
            &[&&h.0[..], &json],
        )
    }

    fn remove_token(&mut self, h: &TokenHash) -> Result<(), StoreError> {
        self.exec("DELETE FROM tokens WHERE hash = $1", &[&&h.0[..]])
    }

    fn put_client_token(&mut self, h: &TokenHash, tunnel: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO client_tokens (hash, tunnel) VALUES ($1, $2) \
             ON CONFLICT (hash) DO UPDATE SET tunnel = EXCLUDED.tunnel",
            &[&&h.0[..], &tunnel],
        )
    }

    fn remove_client_token(&mut self, h: &TokenHash) -> Result<(), StoreError> {
        self.exec("DELETE FROM client_tokens WHERE hash = $1", &[&&h.0[..]])
    }

    fn put_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO open_by_expiry (expires_ms, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&expires_ms, &id],
        )
    }

    fn remove_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM open_by_expiry WHERE expires_ms = $1 AND id = $2",
            &[&expires_ms, &id],
        )
    }

    fn put_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO closed_by_time (closed_ms, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&closed_ms, &id],
        )
    }

    fn remove_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM closed_by_time WHERE closed_ms = $1 AND id = $2",
            &[&closed_ms, &id],
        )
    }
}

/// Apply the migrations this database lacks, once, whoever else is starting.
fn migrate(client: &mut Client, shown: &str) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(|e| fail(shown, e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| fail(shown, e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS culvert_schema (version integer PRIMARY KEY, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .map_err(|e| fail(shown, e))?;
    let have: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM culvert_schema", &[])
        .map_err(|e| fail(shown, e))?
        .get(0);
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if have > known {
        return Err(fail(
            shown,
            format!(
                "written by a newer culvert-relay (schema {have}, this one knows {known}); upgrade this relay"
            ),
        ));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > have) {
        tx.batch_execute(sql)
            .map_err(|e| fail(shown, format!("migration {version}: {e}")))?;
        tx.execute(
            "INSERT INTO culvert_schema (version) VALUES ($1)",
            &[version],
        )
        .map_err(|e| fail(shown, e))?;
        tracing::info!(store = %shown, version, "applied a store migration");
    }
    tx.commit().map_err(|e| fail(shown, e))
}

/// Whether every host of `config` is this machine (a loopback address, `localhost`, or a
/// Unix socket).
fn local_only(config: &postgres::Config) -> bool {
    use postgres::config::Host;
    !config.get_hosts().is_empty()
        && config.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        })
}

/// The TLS connector for the database: its server certificate must chain to `ca` if given
/// (that CA alone), else to the system's roots, and name the host the URL connects to.
fn connector(ca: Option<&std::path::Path>) -> Result<MakeRustlsConnect, String> {
    let roots = match ca {
        None => culvert_protocol::client::root_store(None)?,
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in crate::config::pem_certs("store_ca_file", path)? {
                roots
                    .add(c)
                    .map_err(|e| format!("store_ca_file: {}: {e}", path.display()))?;
            }
            roots
        }
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(tls))
}

impl PostgresStore {
    /// Connect to `url` (`postgres://user@host:port/database`, or libpq's `key=value` form),
    /// with `password` if given (else the URL's), and bring its schema up to date.
    ///
    /// TLS: the URL's `sslmode` decides (`disable`, `prefer`, `require`); without one, a
    /// database on this machine is reached over plain TCP and any other over TLS only
    /// (`require`: a server that does not offer TLS is refused, never silently used in
    /// clear). The server's certificate is always verified, against `ca` (a PEM file) if
    /// given, else the system's roots, and must name the URL's host.
    pub async fn open(
        url: &str,
        password: Option<String>,
        ca: Option<std::path::PathBuf>,
    ) -> Result<PostgresStore, StoreError> {
        let shown = without_password(url);
        let mut config: postgres::Config = url.parse().map_err(|e| {
            fail(
                &shown,
                format!("not a PostgreSQL URL ({e}): write postgres://USER@HOST:PORT/DATABASE"),
            )
        })?;
        if let Some(p) = password {
            config.password(p);
        }
        let explicit = url.contains("sslmode=");
        if !explicit {
            config.ssl_mode(if local_only(&config) {
                postgres::config::SslMode::Disable
            } else {
                postgres::config::SslMode::Require
            });
        } else if config.get_ssl_mode() == postgres::config::SslMode::Prefer && !local_only(&config)
        {
            tracing::warn!(store = %shown, "sslmode=prefer: if the database does not offer TLS the relay connects in clear; use sslmode=require");
        }
        config.application_name("culvert-relay");
        let tls = connector(ca.as_deref()).map_err(|e| fail(&shown, e))?;
        tokio::task::spawn_blocking(move || PostgresStore::open_blocking(config, tls, shown.into()))
            .await
            .map_err(|e| fail(&without_password(url), format!("store task failed: {e}")))?
    }

    fn open_blocking(
        config: postgres::Config,
        tls: MakeRustlsConnect,
        shown: Arc<str>,
    ) -> Result<PostgresStore, StoreError> {
        let mut first = config.connect(tls.clone()).map_err(|e| {
            let hint = if config.get_ssl_mode() == postgres::config::SslMode::Disable {
                "is PostgreSQL running, and are the URL's user, password and database right?"
            } else {
                "is PostgreSQL running with TLS, is its certificate issued for the URL's host by store_ca_file's CA (or a system root), and are the URL's user, password and database right?"
            };
            fail(&shown, format!("cannot connect: {e} ({hint})"))
        })?;
        migrate(&mut first, &shown)?;
        let pool: Vec<Mutex<Option<Client>>> = std::iter::once(Some(first))
            .chain((1..CONNECTIONS).map(|_| None))
            .map(Mutex::new)
            .collect();
        Ok(PostgresStore {
            config: Arc::new(config),
            tls,
            shown,
            pool: Arc::new(pool),
            next: Default::default(),
        })
    }

    /// Run `f` with one of the pool's connections (connecting it if needed), on the blocking
    /// pool. A connection that failed is dropped, to be made again by the next call.
    async fn with_client<T, E>(
        &self,
        f: impl FnOnce(&mut Client, &str) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (pool, config, shown) = (self.pool.clone(), self.config.clone(), self.shown.clone());
        let tls = self.tls.clone();
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % pool.len();
        let job = move || {
            let mut slot = pool[i].lock().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = Some(
                    config
                        .connect(tls)
                        .map_err(|e| fail(&shown, format!("cannot connect: {e}")))?,
                );
            }
            let client = slot.as_mut().expect("connected above");
            let out = f(client, &shown);
            if client.is_closed() {
                *slot = None;
            }
            out
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(r) => r,
            Err(e) => Err(fail(&self.shown, format!("store task failed: {e}")).into()),
        }
    }

    /// Run `f` in a SERIALIZABLE transaction and commit, trying again (from the start) when
    /// PostgreSQL reports that a concurrent transaction got in the way.
    async fn write<T, E>(
        &self,
        f: impl Fn(&mut Set<'_, '_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.write_at(IsolationLevel::Serializable, f).await
    }

    /// [`PostgresStore::write`] at another isolation level: READ COMMITTED for the cluster's
    /// leases, which order themselves with explicit locks (many nodes renewing many rows at
    /// once would otherwise keep failing each other's serializable transactions).
    async fn write_at<T, E>(
        &self,
        level: IsolationLevel,
        f: impl Fn(&mut Set<'_, '_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.with_client(move |client, shown| {
            let mut last = String::new();
            for _ in 0..TRIES {
                let mut tx = client
                    .build_transaction()
                    .isolation_level(level)
                    .start()
                    .map_err(|e| fail(shown, e))?;
                let conflict = Cell::new(false);
                let out = {
                    let mut set = Set {
                        tx: RefCell::new(&mut tx),
                        path: shown,
                        conflict: &conflict,
                    };
                    f(&mut set)
                };
                let v = match out {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.rollback();
                        if conflict.get() {
                            last = "a statement met a concurrent change".into();
                            continue;
                        }
                        return Err(e);
                    }
                };
                match tx.commit() {
                    Ok(()) => return Ok(v),
                    Err(e) if is_serialization_failure(&e) => last = e.to_string(),
                    Err(e) => return Err(fail(shown, e).into()),
                }
            }
            Err(fail(
                shown,
                format!("gave up after {TRIES} serialization failures: {last}"),
            )
            .into())
        })
        .await
    }

    /// Run `f` in a read-only REPEATABLE READ transaction (one consistent snapshot).
    async fn read<T, E>(
        &self,
        f: impl FnOnce(&Set<'_, '_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.with_client(move |client, shown| {
            let mut tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(|e| fail(shown, e))?;
            let conflict = Cell::new(false);
            let out = {
                let set = Set {
                    tx: RefCell::new(&mut tx),
                    path: shown,
                    conflict: &conflict,
                };
                f(&set)
            };
            let _ = tx.commit();
            out
        })
        .await
    }
}

/// The leases of a cluster (relay/src/cluster.rs): which nodes serve, and which node each
/// side of a tunnel is attached on. Every node renews its rows ([`PostgresStore::heartbeat`]);
/// rows past their lease, or of a node past its own, count for nothing.
impl PostgresStore {
    /// Where side `mode` of `tunnel` attaches, decided for `node` at `now_ms`: on the node
    /// that already holds a live lease for either side of the tunnel (the earliest, if a
    /// split left two), else here, taking the side's lease until `until_ms`. Two nodes
    /// placing one tunnel at once are ordered by the database: one of them forwards.
    pub async fn place(
        &self,
        tunnel: &str,
        mode: Mode,
        node: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Placement, StoreError> {
        let (tunnel, node) = (tunnel.to_owned(), node.to_owned());
        self.write_at(IsolationLevel::ReadCommitted, move |t| {
            // Placements of one tunnel, from any node, one after the other: each sees what
            // the one before committed.
            t.exec(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&tunnel],
            )?;
            let holder = t.query(
                "SELECT p.node, n.addr FROM peers p JOIN nodes n ON n.name = p.node \
                 WHERE p.tunnel = $1 AND p.node <> $2 AND p.until_ms > $3 AND n.until_ms > $3 \
                 ORDER BY p.since_ms, p.node LIMIT 1",
                &[&tunnel, &node, &now_ms],
            )?;
            if let Some(r) = holder.first() {
                return Ok(Placement::At {
                    node: r.get(0),
                    addr: r.get(1),
                });
            }
            // Whatever other nodes left for this tunnel is dead.
            t.exec(
                "DELETE FROM peers WHERE tunnel = $1 AND node <> $2",
                &[&tunnel, &node],
            )?;
            t.exec(
                "INSERT INTO peers (tunnel, mode, node, since_ms, until_ms) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (tunnel, mode) DO UPDATE SET until_ms = EXCLUDED.until_ms",
                &[&tunnel, &mode.as_str(), &node, &now_ms, &until_ms],
            )?;
            Ok(Placement::Here)
        })
        .await
    }

    /// Side `mode` of `tunnel` is no longer attached on `node`.
    pub async fn unplace(&self, tunnel: &str, mode: Mode, node: &str) -> Result<(), StoreError> {
        let (tunnel, node) = (tunnel.to_owned(), node.to_owned());
        self.write_at(IsolationLevel::ReadCommitted, move |t| {
            t.exec(
                "DELETE FROM peers WHERE tunnel = $1 AND mode = $2 AND node = $3",
                &[&tunnel, &mode.as_str(), &node],
            )
        })
        .await
    }

    /// Renew `node`'s lease (reachable at `addr`) and those of the sides attached on it now,
    /// `sides`, until `until_ms` (making a row again for an attached side whose row went).
    /// Rows of sides no longer attached are not renewed: [`PostgresStore::unplace`] removes
    /// them, or they run out (a side placed a moment ago may not be in `sides` yet, and must
    /// keep its row). Returns the tunnels this node must give up: another live node holds
    /// them too, and took them first (a split, which a node cut off from the database for
    /// longer than a lease can cause); their peers here reconnect and are placed again.
    pub async fn heartbeat(
        &self,
        node: &str,
        addr: &str,
        sides: Vec<(String, Mode)>,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let (node, addr) = (node.to_owned(), addr.to_owned());
        let tunnels: Vec<String> = sides.iter().map(|(t, _)| t.clone()).collect();
        let modes: Vec<String> = sides.iter().map(|(_, m)| m.as_str().to_owned()).collect();
        self.write_at(IsolationLevel::ReadCommitted, move |t| {
            t.exec(
                "INSERT INTO nodes (name, addr, until_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET addr = EXCLUDED.addr, until_ms = EXCLUDED.until_ms",
                &[&node, &addr, &until_ms],
            )?;
            t.exec(
                "INSERT INTO peers (tunnel, mode, node, since_ms, until_ms) \
                 SELECT x.t, x.m, $1, $4, $5 FROM unnest($2::text[], $3::text[]) AS x(t, m) \
                 ON CONFLICT (tunnel, mode) DO UPDATE SET until_ms = EXCLUDED.until_ms \
                 WHERE peers.node = EXCLUDED.node",
                &[&node, &tunnels, &modes, &now_ms, &until_ms],
            )?;
            // Leases long dead are forgotten.
            t.exec(
                "DELETE FROM peers WHERE until_ms < $1",
                &[&(now_ms - 3_600_000)],
            )?;
            let losers = t.query(
                "SELECT DISTINCT mine.tunnel FROM peers mine \
                 JOIN peers other ON other.tunnel = mine.tunnel AND other.node <> mine.node \
                 JOIN nodes n ON n.name = other.node \
                 WHERE mine.node = $1 AND other.until_ms > $2 AND n.until_ms > $2 \
                 AND (other.since_ms, other.node) < (mine.since_ms, mine.node)",
                &[&node, &now_ms],
            )?;
            Ok(losers.iter().map(|r| r.get(0)).collect())
        })
        .await
    }

    /// `node` leaves the cluster (it is draining): its leases end now, so that its peers'
    /// reconnections are placed on the other nodes at once.
    pub async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let node = node.to_owned();
        self.write_at(IsolationLevel::ReadCommitted, move |t| {
            t.exec("DELETE FROM peers WHERE node = $1", &[&node])?;
            t.exec("DELETE FROM nodes WHERE name = $1", &[&node])
        })
        .await
    }

    /// The live side leases of `tunnels` at `now_ms`, on any node.
    pub async fn placements(
        &self,
        tunnels: Vec<String>,
        now_ms: i64,
    ) -> Result<Vec<Placed>, StoreError> {
        self.read(move |t| {
            let rows = t.query(
                "SELECT p.tunnel, p.mode, p.node, p.since_ms FROM peers p \
                 JOIN nodes n ON n.name = p.node \
                 WHERE p.tunnel = ANY($1) AND p.until_ms > $2 AND n.until_ms > $2",
                &[&tunnels, &now_ms],
            )?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    Some(Placed {
                        tunnel: r.get(0),
                        mode: r.get::<_, String>(1).parse().ok()?,
                        node: r.get(2),
                        since_ms: r.get(3),
                    })
                })
                .collect())
        })
        .await
    }

    /// The ids of tunnels changed by any relay on this database (closed, rotated), as
    /// PostgreSQL's LISTEN delivers them, on a thread with a connection of its own. After a
    /// lost connection, `"*"`: changes may have been missed, look at every tunnel again.
    /// Ends when the receiver is dropped.
    pub fn listen(&self) -> tokio::sync::mpsc::Receiver<String> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (config, shown, tls) = (self.config.clone(), self.shown.clone(), self.tls.clone());
        let run = move || {
            let mut first = true;
            while !tx.is_closed() {
                let mut client = match config.connect(tls.clone()) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(store = %shown, error = %e, "cannot listen for tunnel changes; retrying");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        continue;
                    }
                };
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANGES}")) {
                    tracing::warn!(store = %shown, error = %e, "LISTEN failed; retrying");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    continue;
                }
                if !first && tx.blocking_send("*".into()).is_err() {
                    return;
                }
                first = false;
                loop {
                    // A fresh iterator each time: one whose wait ran out returns at once.
                    let next = client
                        .notifications()
                        .timeout_iter(std::time::Duration::from_secs(1))
                        .next();
                    match next {
                        Ok(Some(note)) => {
                            if tx.blocking_send(note.payload().to_owned()).is_err() {
                                return;
                            }
                        }
                        Ok(None) if tx.is_closed() => return,
                        Ok(None) if client.is_closed() => {
                            tracing::warn!(store = %shown, "lost the connection that listens for tunnel changes; reconnecting");
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(store = %shown, error = %e, "lost the connection that listens for tunnel changes; reconnecting");
                            break;
                        }
                    }
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("store-listen".into())
            .spawn(run)
        {
            tracing::error!(error = %e, "cannot start the thread that listens for tunnel changes");
        }
        rx
    }
}

/// A `postgres::Client` blocks on its own runtime when dropped, which tokio forbids on a
/// thread that drives async tasks: the last handle closes the connections on a thread of
/// their own.
impl Drop for PostgresStore {
    fn drop(&mut self) {
        let clients: Vec<Client> = self
            .pool
            .iter()
            .filter_map(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take())
            .collect();
        if !clients.is_empty() {
            let _ = std::thread::Builder::new()
                .name("store-close".into())
                .spawn(move || drop(clients));
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create(&self, rec: &TunnelRecord) -> Result<(), StoreError> {
        let rec = rec.clone();
        self.write(move |t| ops::create(t, &rec)).await
    }

    async fn get(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |t| t.tunnel(&id)).await
    }

    async fn list(&self, q: &ListQuery) -> Result<(Vec<TunnelRecord>, bool), StoreError> {
        let q = q.clone();
        self.read(move |t| ops::list(t, &q)).await
    }

    async fn admit(&self, h: &Handshake) -> Result<Admitted, AdmitError> {
        let h = h.clone();
        self.write(move |t| ops::admit(t, &h)).await
    }

    async fn release(&self, id: &str, mode: Mode, token: TokenHash) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |t| ops::release(t, &id, mode, token)).await
    }

    async fn rotate(&self, id: &str, new: &NewTokens) -> Result<TunnelRecord, ChangeError> {
        let (id, new) = (id.to_owned(), new.clone());
        self.write(move |t| {
            let rec = ops::rotate(t, &id, &new)?;
            t.announce(&id)?;
            Ok(rec)
        })
        .await
    }

    async fn close(
        &self,
        id: &str,
        reason: CloseReason,
        now_ms: i64,
    ) -> Result<Closed, ChangeError> {
        let id = id.to_owned();
        self.write(move |t| {
            let c = ops::close(t, &id, reason, now_ms)?;
            if c.changed {
                t.announce(&id)?;
            }
            Ok(c)
        })
        .await
    }

    async fn retag(&self, id: &str, change: &TagChange) -> Result<TunnelRecord, ChangeError> {
        let (id, change) = (id.to_owned(), change.clone());
        self.write(move |t| ops::retag(t, &id, &change)).await
    }

    async fn set_on_site(&self, id: &str, on_site: &OnSite) -> Result<TunnelRecord, ChangeError> {
        let (id, on_site) = (id.to_owned(), on_site.clone());
        self.write(move |t| ops::set_on_site(t, &id, &on_site))
            .await
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(move |t| ops::delete(t, &id)).await
    }

    async fn due(&self, now_ms: i64, purge_before_ms: i64) -> Result<Due, StoreError> {
        self.read(move |t| ops::due(t, now_ms, purge_before_ms))
            .await
    }

    async fn unclaimed(&self, thing: &str, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let thing = thing.to_owned();
        self.read(move |t| ops::unclaimed(t, &thing, now_ms)).await
    }

    async fn count_open(&self) -> Result<usize, StoreError> {
        self.read(|t| t.count_open()).await
    }

    async fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec).map_err(|e| fail(&self.shown, e))?;
        let thing = rec.thing_name.clone();
        self.write(move |t| {
            t.exec(
                "INSERT INTO devices (thing, rec) VALUES ($1, $2) \
                 ON CONFLICT (thing) DO UPDATE SET rec = EXCLUDED.rec",
                &[&thing, &json],
            )
        })
        .await
    }

    async fn remove_device(&self, thing: &str) -> Result<(), StoreError> {
        let thing = thing.to_owned();
        self.write(move |t| t.exec("DELETE FROM devices WHERE thing = $1", &[&thing]))
            .await
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(|t| {
            t.query("SELECT thing, rec FROM devices ORDER BY thing", &[])?
                .iter()
                .map(|r| t.decode(r.get(0), r.get(1)))
                .collect()
        })
        .await
    }

    async fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec).map_err(|e| fail(&self.shown, e))?;
        let name = rec.name.clone();
        self.write(move |t| {
            t.exec(
                "INSERT INTO operators (name, rec) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET rec = EXCLUDED.rec",
                &[&name, &json],
            )
        })
        .await
    }

    async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.read(|t| {
            t.query("SELECT name, rec FROM operators ORDER BY name", &[])?
                .iter()
                .map(|r| t.decode(r.get(0), r.get(1)))
                .collect()
        })
        .await
    }

    async fn swap_operator(
        &self,
        before: Option<&OperatorRecord>,
        after: &OperatorRecord,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(after).map_err(|e| fail(&self.shown, e))?;
        let (before, name) = (before.cloned(), after.name.clone());
        self.write(move |t| {
            let stored: Option<OperatorRecord> = match t
                .query("SELECT rec FROM operators WHERE name = $1", &[&name])?
                .first()
            {
                Some(r) => Some(t.decode(&name, r.get(0))?),
                None => None,
            };
            if !super::same_operator(stored.as_ref(), before.as_ref()) {
                return Ok(false);
            }
            t.exec(
                "INSERT INTO operators (name, rec) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET rec = EXCLUDED.rec",
                &[&name, &json],
            )?;
            Ok(true)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{hs, rec, tok};
    use crate::store::{Refusal, Status};
    use culvert_devkit::pg;

    /// Two relays on one database (two stores, each with its own connections) race to admit
    /// the same single-use token: the database orders them, and exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_relays_on_one_database_admit_a_token_once() {
        let url = tokio::task::spawn_blocking(pg::database).await.unwrap();
        let a = Arc::new(PostgresStore::open(&url, None, None).await.unwrap());
        let b = Arc::new(PostgresStore::open(&url, None, None).await.unwrap());
        for i in 0..20 {
            let id = format!("t{i}");
            a.create(&rec(&id, "cell-7", i)).await.unwrap();
            let h = hs(tok(&id, Mode::Source), Mode::Source, None);
            let (ra, rb) = tokio::join!(
                {
                    let (a, h) = (a.clone(), h.clone());
                    tokio::spawn(async move { a.admit(&h).await })
                },
                {
                    let (b, h) = (b.clone(), h.clone());
                    tokio::spawn(async move { b.admit(&h).await })
                }
            );
            let results = [ra.unwrap(), rb.unwrap()];
            let won = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(won, 1, "round {i}: {results:?}");
            assert!(
                results
                    .iter()
                    .any(|r| matches!(r, Err(AdmitError::Refused(Refusal::Spent { .. })))),
                "round {i}: {results:?}"
            );
        }
        // What one relay wrote, the other reads.
        assert_eq!(b.count_open().await.unwrap(), 20);
        let t = b.get("t3").await.unwrap().unwrap();
        assert_eq!(t.status, Status::Open);
        assert!(t.source.used);
    }

    /// The cluster's leases: the first node to place a tunnel holds it, others forward to it;
    /// a node that leaves (or stops renewing) gives it up; a split is resolved for the node
    /// that took the tunnel first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_node_to_place_a_tunnel_holds_it_until_it_leaves_or_lapses() {
        let url = tokio::task::spawn_blocking(pg::database).await.unwrap();
        let s = PostgresStore::open(&url, None, None).await.unwrap();
        let (t0, lease) = (1_000_000, 10_000);
        let beat = |node: &'static str, sides: Vec<(String, Mode)>, now: i64| {
            let s = &s;
            async move {
                s.heartbeat(node, &format!("{node}:8444"), sides, now, now + lease)
                    .await
                    .unwrap()
            }
        };
        beat("a", vec![], t0).await;
        beat("b", vec![], t0).await;
        assert_eq!(
            s.place("t1", Mode::Source, "a", t0, t0 + lease)
                .await
                .unwrap(),
            Placement::Here
        );
        let at_a = Placement::At {
            node: "a".into(),
            addr: "a:8444".into(),
        };
        assert_eq!(
            s.place("t1", Mode::Destination, "b", t0, t0 + lease)
                .await
                .unwrap(),
            at_a,
            "the other side goes where the tunnel is held"
        );
        let placed = s.placements(vec!["t1".into()], t0).await.unwrap();
        assert_eq!(placed.len(), 1);
        assert_eq!(
            (placed[0].mode, placed[0].node.as_str()),
            (Mode::Source, "a")
        );

        // A renews; B, which never held it, has nothing to give up.
        let a_sides = vec![("t1".to_owned(), Mode::Source)];
        assert!(beat("a", a_sides.clone(), t0 + 1).await.is_empty());
        assert!(beat("b", vec![], t0 + 1).await.is_empty());
        // A side placed but not attached yet (a renewal's list of attached sides was taken
        // just before) keeps its row: the renewal does not take it away.
        assert_eq!(
            s.place("t2", Mode::Destination, "a", t0 + 1, t0 + 1 + lease)
                .await
                .unwrap(),
            Placement::Here
        );
        beat("a", a_sides.clone(), t0 + 2).await;
        assert_eq!(
            s.place("t2", Mode::Source, "b", t0 + 2, t0 + 2 + lease)
                .await
                .unwrap(),
            at_a
        );

        // A lapses (its node lease runs out): B takes the tunnel.
        let later = t0 + lease + 3;
        beat("b", vec![], later).await;
        assert_eq!(
            s.place("t1", Mode::Destination, "b", later, later + lease)
                .await
                .unwrap(),
            Placement::Here
        );
        // A comes back and renews what it still has attached: both hold t1 now. B's place
        // removed A's dead row, so A's renewal makes a new one, later than B's: A gives the
        // tunnel up.
        let losers = beat("a", a_sides.clone(), later + 1).await;
        assert_eq!(losers, vec!["t1".to_owned()]);
        assert!(
            beat("b", vec![("t1".into(), Mode::Destination)], later + 1)
                .await
                .is_empty()
        );

        // B leaves: its leases go at once, and A may place the tunnel.
        s.leave("b").await.unwrap();
        beat("a", vec![], later + 2).await;
        assert_eq!(
            s.place("t1", Mode::Source, "a", later + 3, later + 3 + lease)
                .await
                .unwrap(),
            Placement::Here
        );
        // A side given up is no longer placed.
        s.unplace("t1", Mode::Source, "a").await.unwrap();
        assert!(
            s.placements(vec!["t1".into()], later + 4)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A close or rotation is announced to every relay listening on the database.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closes_and_rotations_are_announced_to_listening_relays() {
        let url = tokio::task::spawn_blocking(pg::database).await.unwrap();
        let a = PostgresStore::open(&url, None, None).await.unwrap();
        let b = PostgresStore::open(&url, None, None).await.unwrap();
        let mut changes = b.listen();
        // The listener is up once it hears something: announce until it does.
        a.create(&rec("t0", "cell-7", 0)).await.unwrap();
        let heard = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                a.rotate("t0", &NewTokens::default()).await.unwrap();
                if let Ok(Some(id)) =
                    tokio::time::timeout(std::time::Duration::from_millis(200), changes.recv())
                        .await
                {
                    return id;
                }
            }
        })
        .await
        .expect("a rotation is heard");
        assert_eq!(heard, "t0");
        while let Ok(Some(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(300), changes.recv()).await
        {
        }
        a.create(&rec("t1", "cell-7", 1)).await.unwrap();
        a.close("t1", CloseReason::Closed, 5).await.unwrap();
        let id = tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv())
            .await
            .unwrap();
        assert_eq!(id.as_deref(), Some("t1"));
        // A close that changes nothing is not announced.
        a.close("t1", CloseReason::Closed, 6).await.unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(500), changes.recv())
                .await
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_of_a_newer_schema_is_refused_and_a_wrong_url_says_what_to_check() {
        let url = tokio::task::spawn_blocking(pg::database).await.unwrap();
        drop(PostgresStore::open(&url, None, None).await.unwrap());
        let u = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = Client::connect(&u, postgres::NoTls).unwrap();
            c.execute("INSERT INTO culvert_schema (version) VALUES (99)", &[])
                .unwrap();
        })
        .await
        .unwrap();
        let e = PostgresStore::open(&url, None, None).await.err().unwrap();
        assert!(e.message.contains("newer culvert-relay"), "{e}");
        let e = PostgresStore::open("postgres://culvert:pw@127.0.0.1:1/none", None, None)
            .await
            .err()
            .unwrap();
        assert!(e.message.contains("cannot connect"), "{e}");
        assert!(
            !e.to_string().contains(":pw@"),
            "the password is not shown: {e}"
        );
    }

    /// Over TLS (the test server offers it, its certificate from a CA of its own): with that
    /// CA the relay connects, and its connections are TLS; with the system's roots only, the
    /// server's certificate is refused, and the error says what to check.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_database_is_reached_over_verified_tls() {
        let url = tokio::task::spawn_blocking(pg::tls_database).await.unwrap();
        let s = PostgresStore::open(&url, None, Some(pg::ca()))
            .await
            .unwrap();
        s.create(&rec("t1", "cell-7", 1)).await.unwrap();
        assert!(s.get("t1").await.unwrap().is_some());
        let db = url
            .rsplit('/')
            .next()
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        let base = pg::server().to_owned();
        let (tls, plain): (i64, i64) = tokio::task::spawn_blocking(move || {
            let mut c = Client::connect(&format!("{base}/postgres"), postgres::NoTls).unwrap();
            let row = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
                     FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.application_name = 'culvert-relay' AND a.datname = $1",
                    &[&db],
                )
                .unwrap();
            (row.get(0), row.get(1))
        })
        .await
        .unwrap();
        assert!(tls >= 1 && plain == 0, "TLS {tls}, plain {plain}");
        drop(s);
        let e = PostgresStore::open(&url, None, None).await.err().unwrap();
        assert!(e.message.contains("cannot connect"), "{e}");
        assert!(e.message.contains("store_ca_file"), "{e}");
    }

    #[test]
    fn only_a_database_on_this_machine_is_reached_in_clear_by_default() {
        let local = |u: &str| local_only(&u.parse().unwrap());
        assert!(local("postgres://relay@127.0.0.1:5432/culvert"));
        assert!(local("postgres://relay@localhost/culvert"));
        assert!(local("host=/run/postgresql user=relay dbname=culvert"));
        assert!(!local("postgres://relay@db.internal:5432/culvert"));
        assert!(!local("postgres://relay@10.0.0.5/culvert"));
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            without_password("postgres://relay:s3cret@db.example:5432/culvert"),
            "postgres://relay@db.example:5432/culvert"
        );
        assert_eq!(
            without_password("postgres://db.example/culvert"),
            "postgres://db.example/culvert"
        );
    }
}
