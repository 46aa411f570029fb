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
//! are plain TCP: keep the database on loopback or a private network until TLS lands.

use std::cell::{Cell, RefCell};

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use culvert_protocol::Mode;
use postgres::{Client, IsolationLevel, NoTls, Transaction};

use super::ops::{self, Reads, Tables, TokenRef};
use super::{
    AdmitError, Admitted, ChangeError, CloseReason, Closed, DeviceRecord, Due, Handshake,
    ListQuery, NewTokens, OnSite, Store, StoreError, TagChange, TunnelRecord,
};
use crate::access::OperatorRecord;
use crate::tokens::TokenHash;

/// The schema migrations, in order: (version, SQL).
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../migrations/postgres/001_tables.sql"))];

/// Connections this relay keeps to the database.
pub const CONNECTIONS: usize = 4;

/// A change that keeps meeting serialization failures is given up after this many tries.
const TRIES: usize = 20;

/// Any 64-bit number, the same in every relay: the advisory lock migrations run under.
const MIGRATION_LOCK: i64 = 0x6375_6c76_6572_7401;

pub struct PostgresStore {
    config: Arc<postgres::Config>,
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

impl PostgresStore {
    /// Connect to `url` (`postgres://user@host:port/database`, or libpq's `key=value` form),
    /// with `password` if given (else the URL's), and bring its schema up to date.
    pub async fn open(url: &str, password: Option<String>) -> Result<PostgresStore, StoreError> {
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
        tokio::task::spawn_blocking(move || PostgresStore::open_blocking(config, shown.into()))
            .await
            .map_err(|e| fail(&without_password(url), format!("store task failed: {e}")))?
    }

    fn open_blocking(
        config: postgres::Config,
        shown: Arc<str>,
    ) -> Result<PostgresStore, StoreError> {
        let mut first = config.connect(NoTls).map_err(|e| {
            fail(
                &shown,
                format!("cannot connect: {e} (is PostgreSQL running, and are the URL's user, password and database right?)"),
            )
        })?;
        migrate(&mut first, &shown)?;
        let pool: Vec<Mutex<Option<Client>>> = std::iter::once(Some(first))
            .chain((1..CONNECTIONS).map(|_| None))
            .map(Mutex::new)
            .collect();
        Ok(PostgresStore {
            config: Arc::new(config),
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
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % pool.len();
        let job = move || {
            let mut slot = pool[i].lock().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = Some(
                    config
                        .connect(NoTls)
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
        self.with_client(move |client, shown| {
            let mut last = String::new();
            for _ in 0..TRIES {
                let mut tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
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
        self.write(move |t| ops::rotate(t, &id, &new)).await
    }

    async fn close(
        &self,
        id: &str,
        reason: CloseReason,
        now_ms: i64,
    ) -> Result<Closed, ChangeError> {
        let id = id.to_owned();
        self.write(move |t| ops::close(t, &id, reason, now_ms))
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
        let a = Arc::new(PostgresStore::open(&url, None).await.unwrap());
        let b = Arc::new(PostgresStore::open(&url, None).await.unwrap());
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_of_a_newer_schema_is_refused_and_a_wrong_url_says_what_to_check() {
        let url = tokio::task::spawn_blocking(pg::database).await.unwrap();
        drop(PostgresStore::open(&url, None).await.unwrap());
        let u = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = Client::connect(&u, NoTls).unwrap();
            c.execute("INSERT INTO culvert_schema (version) VALUES (99)", &[])
                .unwrap();
        })
        .await
        .unwrap();
        let e = PostgresStore::open(&url, None).await.err().unwrap();
        assert!(e.message.contains("newer culvert-relay"), "{e}");
        let e = PostgresStore::open("postgres://culvert:pw@127.0.0.1:1/none", None)
            .await
            .err()
            .unwrap();
        assert!(e.message.contains("cannot connect"), "{e}");
        assert!(
            !e.to_string().contains(":pw@"),
            "the password is not shown: {e}"
        );
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
