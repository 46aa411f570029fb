//! The embedded store: a redb file (`tunnels.redb` in the state directory). Each operation is
//! one redb write transaction, committed durably before it returns; reads use snapshots and
//! never wait for a writer. The blocking work runs on tokio's blocking pool.
//!
//! Tables: `tunnels` (id → JSON record), `devices`, `operators` (name → JSON record with keys
//! and grants), and the indexes [`super::ops`] derives from
//! the records: `tokens` (token hash → tunnel, side, current?), `client_tokens` (bound client
//! token → open tunnel), `open_by_expiry` and `closed_by_time`. The indexes are rebuilt from
//! the records every time the file is opened (milliseconds for thousands of tunnels), so a file
//! from before they existed, or one an older relay wrote to, is always consistent.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use culvert_protocol::Mode;
use redb::{ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::ops::{self, Reads, Tables, TokenRef};
use super::{
    AdmitError, Admitted, ChangeError, CloseReason, Closed, DeviceRecord, Due, Handshake,
    ListQuery, NewTokens, OnSite, Store, StoreError, TagChange, TunnelRecord,
};
use crate::access::OperatorRecord;
use crate::tokens::TokenHash;

const TUNNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("tunnels");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const OPERATORS: TableDefinition<&str, &[u8]> = TableDefinition::new("operators");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
const CLIENT_TOKENS: TableDefinition<&[u8], &str> = TableDefinition::new("client_tokens");
const OPEN: TableDefinition<(i64, &str), ()> = TableDefinition::new("open_by_expiry");
const CLOSED: TableDefinition<(i64, &str), ()> = TableDefinition::new("closed_by_time");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// 1: tunnels and devices only. 2: the indexes.
const SCHEMA: u64 = 2;

pub struct RedbStore {
    db: Arc<redb::Database>,
    path: Arc<str>,
}

fn fail(path: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// The tables of one transaction: read-only ones in a snapshot, writable ones in a write
/// transaction.
struct Set<A, B, C, D, E> {
    tunnels: A,
    tokens: B,
    client_tokens: C,
    open: D,
    closed: E,
    path: Arc<str>,
}

type ReadSet = Set<
    redb::ReadOnlyTable<&'static str, &'static [u8]>,
    redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    redb::ReadOnlyTable<&'static [u8], &'static str>,
    redb::ReadOnlyTable<(i64, &'static str), ()>,
    redb::ReadOnlyTable<(i64, &'static str), ()>,
>;

type WriteSet<'t> = Set<
    redb::Table<'t, &'static str, &'static [u8]>,
    redb::Table<'t, &'static [u8], &'static [u8]>,
    redb::Table<'t, &'static [u8], &'static str>,
    redb::Table<'t, (i64, &'static str), ()>,
    redb::Table<'t, (i64, &'static str), ()>,
>;

impl<A, B, C, D, E> Set<A, B, C, D, E> {
    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        fail(&self.path, e)
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, key: &str, v: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(v).map_err(|e| self.err(format!("record {key:?} is corrupt: {e}")))
    }
}

impl<A, B, C, D, E> Reads for Set<A, B, C, D, E>
where
    A: ReadableTable<&'static str, &'static [u8]>,
    B: ReadableTable<&'static [u8], &'static [u8]>,
    C: ReadableTable<&'static [u8], &'static str>,
    D: ReadableTable<(i64, &'static str), ()>,
    E: ReadableTable<(i64, &'static str), ()>,
{
    fn tunnel(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError> {
        match self.tunnels.get(id).map_err(|e| self.err(e))? {
            Some(v) => Ok(Some(self.decode(id, v.value())?)),
            None => Ok(None),
        }
    }

    fn token(&self, h: &TokenHash) -> Result<Option<TokenRef>, StoreError> {
        match self.tokens.get(&h.0[..]).map_err(|e| self.err(e))? {
            Some(v) => Ok(Some(self.decode("token", v.value())?)),
            None => Ok(None),
        }
    }

    fn client_token(&self, h: &TokenHash) -> Result<Option<String>, StoreError> {
        Ok(self
            .client_tokens
            .get(&h.0[..])
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_owned()))
    }

    fn each_tunnel(&self, f: &mut dyn FnMut(TunnelRecord)) -> Result<(), StoreError> {
        for row in self.tunnels.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            f(self.decode(k.value(), v.value())?);
        }
        Ok(())
    }

    fn open_until(&self, until_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = match until_ms.checked_add(1) {
            Some(end) => self.open.range(..(end, "")),
            None => self.open.range::<(i64, &str)>(..),
        }
        .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (k, _) = row.map_err(|e| self.err(e))?;
            out.push(k.value().1.to_owned());
        }
        Ok(out)
    }

    fn closed_before(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for row in self
            .closed
            .range(..(before_ms, ""))
            .map_err(|e| self.err(e))?
        {
            let (k, _) = row.map_err(|e| self.err(e))?;
            out.push(k.value().1.to_owned());
        }
        Ok(out)
    }

    fn count_open(&self) -> Result<usize, StoreError> {
        Ok(self.open.len().map_err(|e| self.err(e))? as usize)
    }
}

impl Tables for WriteSet<'_> {
    fn put_tunnel(&mut self, rec: &TunnelRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| self.err(e))?;
        self.tunnels
            .insert(rec.id.as_str(), bytes.as_slice())
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn remove_tunnel(&mut self, id: &str) -> Result<(), StoreError> {
        self.tunnels.remove(id).map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn put_token(&mut self, h: &TokenHash, r: &TokenRef) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(r).map_err(|e| self.err(e))?;
        self.tokens
            .insert(&h.0[..], bytes.as_slice())
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn remove_token(&mut self, h: &TokenHash) -> Result<(), StoreError> {
        self.tokens
            .remove(&h.0[..])
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn put_client_token(&mut self, h: &TokenHash, tunnel: &str) -> Result<(), StoreError> {
        self.client_tokens
            .insert(&h.0[..], tunnel)
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn remove_client_token(&mut self, h: &TokenHash) -> Result<(), StoreError> {
        self.client_tokens
            .remove(&h.0[..])
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn put_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError> {
        self.open
            .insert((expires_ms, id), ())
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn remove_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError> {
        self.open
            .remove((expires_ms, id))
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn put_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError> {
        self.closed
            .insert((closed_ms, id), ())
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }

    fn remove_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError> {
        self.closed
            .remove((closed_ms, id))
            .map_err(|e| fail(&self.path, e))?;
        Ok(())
    }
}

fn read_set(tx: &ReadTransaction, path: &Arc<str>) -> Result<ReadSet, StoreError> {
    let e = |e| fail(path, e);
    Ok(Set {
        tunnels: tx.open_table(TUNNELS).map_err(e)?,
        tokens: tx.open_table(TOKENS).map_err(e)?,
        client_tokens: tx.open_table(CLIENT_TOKENS).map_err(e)?,
        open: tx.open_table(OPEN).map_err(e)?,
        closed: tx.open_table(CLOSED).map_err(e)?,
        path: path.clone(),
    })
}

fn write_set<'t>(tx: &'t WriteTransaction, path: &Arc<str>) -> Result<WriteSet<'t>, StoreError> {
    let e = |e| fail(path, e);
    Ok(Set {
        tunnels: tx.open_table(TUNNELS).map_err(e)?,
        tokens: tx.open_table(TOKENS).map_err(e)?,
        client_tokens: tx.open_table(CLIENT_TOKENS).map_err(e)?,
        open: tx.open_table(OPEN).map_err(e)?,
        closed: tx.open_table(CLOSED).map_err(e)?,
        path: path.clone(),
    })
}

impl RedbStore {
    /// Open (or create) the store at `path`, and rebuild its indexes.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let p: Arc<str> = path.display().to_string().into();
        let db = redb::Database::create(path).map_err(|e| {
            fail(
                &p,
                format!("{e} (is another culvert-relay using this state directory?)"),
            )
        })?;
        let tx = db.begin_write().map_err(|e| fail(&p, e))?;
        {
            tx.open_table(DEVICES).map_err(|e| fail(&p, e))?;
            tx.open_table(OPERATORS).map_err(|e| fail(&p, e))?;
            let mut meta = tx.open_table(META).map_err(|e| fail(&p, e))?;
            let schema = meta
                .get("schema")
                .map_err(|e| fail(&p, e))?
                .map(|v| v.value())
                .unwrap_or(1);
            if schema > SCHEMA {
                return Err(fail(
                    &p,
                    format!(
                        "written by a newer culvert-relay (schema {schema}, this one knows {SCHEMA}); upgrade this relay"
                    ),
                ));
            }
            tx.delete_table(TOKENS).map_err(|e| fail(&p, e))?;
            tx.delete_table(CLIENT_TOKENS).map_err(|e| fail(&p, e))?;
            for index in [OPEN, CLOSED] {
                tx.delete_table(index).map_err(|e| fail(&p, e))?;
            }
            let mut set = write_set(&tx, &p)?;
            let mut all = Vec::new();
            set.each_tunnel(&mut |r| all.push(r))?;
            for rec in &all {
                ops::write(&mut set, None, Some(rec))?;
            }
            meta.insert("schema", SCHEMA).map_err(|e| fail(&p, e))?;
        }
        tx.commit().map_err(|e| fail(&p, e))?;
        Ok(RedbStore {
            db: Arc::new(db),
            path: p,
        })
    }

    /// Run `f` on a snapshot, on the blocking pool.
    async fn read<T, E>(
        &self,
        f: impl FnOnce(&ReadSet) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (db, path) = (self.db.clone(), self.path.clone());
        self.blocking(move || {
            let tx = db.begin_read().map_err(|e| fail(&path, e))?;
            f(&read_set(&tx, &path)?)
        })
        .await
    }

    /// Run `f` in a write transaction, on the blocking pool; commit (durably) if it succeeds.
    async fn write<T, E>(
        &self,
        f: impl FnOnce(&mut WriteSet<'_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (db, path) = (self.db.clone(), self.path.clone());
        self.blocking(move || {
            let tx = db.begin_write().map_err(|e| fail(&path, e))?;
            let out = {
                let mut set = write_set(&tx, &path)?;
                f(&mut set)
            };
            match out {
                Ok(v) => {
                    tx.commit().map_err(|e| fail(&path, e))?;
                    Ok(v)
                }
                Err(e) => {
                    let _ = tx.abort();
                    Err(e)
                }
            }
        })
        .await
    }

    async fn blocking<T, E>(
        &self,
        f: impl FnOnce() -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) => Err(fail(&self.path, format!("store task failed: {e}")).into()),
        }
    }
}

#[async_trait]
impl Store for RedbStore {
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
        self.put_json(DEVICES, rec.thing_name.clone(), rec).await
    }

    async fn remove_device(&self, thing: &str) -> Result<(), StoreError> {
        let (db, path) = (self.db.clone(), self.path.clone());
        let thing = thing.to_owned();
        self.blocking(move || {
            let tx = db.begin_write().map_err(|e| fail(&path, e))?;
            tx.open_table(DEVICES)
                .map_err(|e| fail(&path, e))?
                .remove(thing.as_str())
                .map_err(|e| fail(&path, e))?;
            tx.commit().map_err(|e| fail(&path, e))
        })
        .await
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.all_json(DEVICES, "device").await
    }

    async fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError> {
        self.put_json(OPERATORS, rec.name.clone(), rec).await
    }

    async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.all_json(OPERATORS, "operator").await
    }

    async fn swap_operator(
        &self,
        before: Option<&OperatorRecord>,
        after: &OperatorRecord,
    ) -> Result<bool, StoreError> {
        let (db, path) = (self.db.clone(), self.path.clone());
        let bytes = serde_json::to_vec(after).map_err(|e| fail(&path, e))?;
        let (before, name) = (before.cloned(), after.name.clone());
        self.blocking(move || {
            let tx = db.begin_write().map_err(|e| fail(&path, e))?;
            {
                let mut t = tx.open_table(OPERATORS).map_err(|e| fail(&path, e))?;
                let stored: Option<OperatorRecord> =
                    match t.get(name.as_str()).map_err(|e| fail(&path, e))? {
                        Some(v) => Some(serde_json::from_slice(v.value()).map_err(|e| {
                            fail(&path, format!("operator {name:?} is corrupt: {e}"))
                        })?),
                        None => None,
                    };
                if !super::same_operator(stored.as_ref(), before.as_ref()) {
                    return Ok(false);
                }
                t.insert(name.as_str(), bytes.as_slice())
                    .map_err(|e| fail(&path, e))?;
            }
            tx.commit().map_err(|e| fail(&path, e))?;
            Ok(true)
        })
        .await
    }
}

impl RedbStore {
    /// Insert or replace `key` → `rec` (as JSON) in a name-keyed table.
    async fn put_json<T: serde::Serialize>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
        rec: &T,
    ) -> Result<(), StoreError> {
        let (db, path) = (self.db.clone(), self.path.clone());
        let bytes = serde_json::to_vec(rec).map_err(|e| fail(&path, e))?;
        self.blocking(move || {
            let tx = db.begin_write().map_err(|e| fail(&path, e))?;
            tx.open_table(table)
                .map_err(|e| fail(&path, e))?
                .insert(key.as_str(), bytes.as_slice())
                .map_err(|e| fail(&path, e))?;
            tx.commit().map_err(|e| fail(&path, e))
        })
        .await
    }

    /// Every record of a name-keyed table.
    async fn all_json<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let (db, path) = (self.db.clone(), self.path.clone());
        self.blocking(move || {
            let tx = db.begin_read().map_err(|e| fail(&path, e))?;
            let t = tx.open_table(table).map_err(|e| fail(&path, e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| fail(&path, e))? {
                let (k, v) = row.map_err(|e| fail(&path, e))?;
                out.push(
                    serde_json::from_slice(v.value()).map_err(|e| {
                        fail(&path, format!("{what} {:?} is corrupt: {e}", k.value()))
                    })?,
                );
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SideRecord, Status};

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "culvert-store-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rec(id: &str, token: &str) -> TunnelRecord {
        TunnelRecord {
            id: id.into(),
            thing_name: "cell-7".into(),
            services: vec!["SSH".into()],
            description: None,
            tags: Default::default(),
            created_ms: 1,
            lifetime_minutes: 720,
            expires_ms: i64::MAX / 2,
            status: Status::Open,
            closed_ms: None,
            close_reason: None,
            source: SideRecord::new(TokenHash::of(&format!("{token}-src")), 1),
            destination: SideRecord::new(TokenHash::of(&format!("{token}-dst")), 1),
            opened_by: None,
            opened_key: None,
            reason: None,
            on_site: None,
        }
    }

    #[tokio::test]
    async fn records_and_indexes_survive_reopen() {
        let d = dir();
        let path = d.join("t.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.create(&rec("t1", "a")).await.unwrap();
            s.create(&rec("t2", "b")).await.unwrap();
            s.delete("t2").await.unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert!(s.get("t1").await.unwrap().is_some());
        assert!(s.get("t2").await.unwrap().is_none());
        let h = Handshake {
            token: TokenHash::of("a-dst"),
            mode: Mode::Destination,
            client_token: None,
            now_ms: 2,
        };
        assert!(s.admit(&h).await.unwrap().first_use);
        assert_eq!(s.count_open().await.unwrap(), 1);
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A state directory from before the indexes (schema 1: records only, no `generation`
    /// field) keeps its tunnels and tokens.
    #[tokio::test]
    async fn a_file_from_before_the_indexes_gets_them_built() {
        let d = dir();
        let path = d.join("t.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(TUNNELS).unwrap();
                let mut v = serde_json::to_value(rec("old", "o")).unwrap();
                v["source"].as_object_mut().unwrap().remove("generation");
                v["destination"]
                    .as_object_mut()
                    .unwrap()
                    .remove("generation");
                t.insert("old", serde_json::to_vec(&v).unwrap().as_slice())
                    .unwrap();
                tx.open_table(DEVICES).unwrap();
            }
            tx.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        let h = Handshake {
            token: TokenHash::of("o-src"),
            mode: Mode::Source,
            client_token: None,
            now_ms: 2,
        };
        let a = s.admit(&h).await.unwrap();
        assert_eq!(a.rec.id, "old");
        assert_eq!(s.count_open().await.unwrap(), 1);
        std::fs::remove_dir_all(d).unwrap();
    }
}
