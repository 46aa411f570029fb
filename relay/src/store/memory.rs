//! A store that keeps everything in memory, behind one mutex (each operation is atomic because
//! it holds it throughout). For tests, and for a relay that may forget its tunnels on restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use culvert_protocol::Mode;

use super::ops::{self, Reads, Tables, TokenRef};
use super::{
    AdmitError, Admitted, ChangeError, CloseReason, Closed, DeviceRecord, Due, Handshake,
    ListQuery, NewTokens, OnSite, Store, StoreError, TagChange, TunnelRecord,
};
use crate::access::OperatorRecord;
use crate::tokens::TokenHash;

#[derive(Default)]
struct Mem {
    tunnels: HashMap<String, TunnelRecord>,
    tokens: HashMap<TokenHash, TokenRef>,
    client_tokens: HashMap<TokenHash, String>,
    open: BTreeSet<(i64, String)>,
    closed: BTreeSet<(i64, String)>,
    devices: BTreeMap<String, DeviceRecord>,
    operators: BTreeMap<String, OperatorRecord>,
}

/// Each operation holds the mutex throughout and changes the tables in place, so an operation
/// must not write before it has decided (true of every one in [`ops`]: they check first and
/// write last).
#[derive(Default)]
pub struct MemoryStore {
    mem: Mutex<Mem>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reads for Mem {
    fn tunnel(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError> {
        Ok(self.tunnels.get(id).cloned())
    }

    fn token(&self, h: &TokenHash) -> Result<Option<TokenRef>, StoreError> {
        Ok(self.tokens.get(h).cloned())
    }

    fn client_token(&self, h: &TokenHash) -> Result<Option<String>, StoreError> {
        Ok(self.client_tokens.get(h).cloned())
    }

    fn each_tunnel(&self, f: &mut dyn FnMut(TunnelRecord)) -> Result<(), StoreError> {
        self.tunnels.values().cloned().for_each(f);
        Ok(())
    }

    fn open_until(&self, until_ms: i64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .open
            .iter()
            .take_while(|(e, _)| *e <= until_ms)
            .map(|(_, id)| id.clone())
            .collect())
    }

    fn closed_before(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .closed
            .iter()
            .take_while(|(c, _)| *c < before_ms)
            .map(|(_, id)| id.clone())
            .collect())
    }

    fn count_open(&self) -> Result<usize, StoreError> {
        Ok(self.open.len())
    }
}

impl Tables for Mem {
    fn put_tunnel(&mut self, rec: &TunnelRecord) -> Result<(), StoreError> {
        self.tunnels.insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    fn remove_tunnel(&mut self, id: &str) -> Result<(), StoreError> {
        self.tunnels.remove(id);
        Ok(())
    }

    fn put_token(&mut self, h: &TokenHash, r: &TokenRef) -> Result<(), StoreError> {
        self.tokens.insert(*h, r.clone());
        Ok(())
    }

    fn remove_token(&mut self, h: &TokenHash) -> Result<(), StoreError> {
        self.tokens.remove(h);
        Ok(())
    }

    fn put_client_token(&mut self, h: &TokenHash, tunnel: &str) -> Result<(), StoreError> {
        self.client_tokens.insert(*h, tunnel.to_owned());
        Ok(())
    }

    fn remove_client_token(&mut self, h: &TokenHash) -> Result<(), StoreError> {
        self.client_tokens.remove(h);
        Ok(())
    }

    fn put_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError> {
        self.open.insert((expires_ms, id.to_owned()));
        Ok(())
    }

    fn remove_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError> {
        self.open.remove(&(expires_ms, id.to_owned()));
        Ok(())
    }

    fn put_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError> {
        self.closed.insert((closed_ms, id.to_owned()));
        Ok(())
    }

    fn remove_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError> {
        self.closed.remove(&(closed_ms, id.to_owned()));
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create(&self, rec: &TunnelRecord) -> Result<(), StoreError> {
        ops::create(&mut *self.lock(), rec)
    }

    async fn get(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError> {
        self.lock().tunnel(id)
    }

    async fn list(&self, q: &ListQuery) -> Result<(Vec<TunnelRecord>, bool), StoreError> {
        ops::list(&*self.lock(), q)
    }

    async fn admit(&self, h: &Handshake) -> Result<Admitted, AdmitError> {
        ops::admit(&mut *self.lock(), h)
    }

    async fn release(&self, id: &str, mode: Mode, token: TokenHash) -> Result<(), StoreError> {
        ops::release(&mut *self.lock(), id, mode, token)
    }

    async fn rotate(&self, id: &str, new: &NewTokens) -> Result<TunnelRecord, ChangeError> {
        ops::rotate(&mut *self.lock(), id, new)
    }

    async fn close(
        &self,
        id: &str,
        reason: CloseReason,
        now_ms: i64,
    ) -> Result<Closed, ChangeError> {
        ops::close(&mut *self.lock(), id, reason, now_ms)
    }

    async fn retag(&self, id: &str, change: &TagChange) -> Result<TunnelRecord, ChangeError> {
        ops::retag(&mut *self.lock(), id, change)
    }

    async fn set_on_site(&self, id: &str, on_site: &OnSite) -> Result<TunnelRecord, ChangeError> {
        ops::set_on_site(&mut *self.lock(), id, on_site)
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        ops::delete(&mut *self.lock(), id)
    }

    async fn due(&self, now_ms: i64, purge_before_ms: i64) -> Result<Due, StoreError> {
        ops::due(&*self.lock(), now_ms, purge_before_ms)
    }

    async fn unclaimed(&self, thing: &str, now_ms: i64) -> Result<Vec<String>, StoreError> {
        ops::unclaimed(&*self.lock(), thing, now_ms)
    }

    async fn count_open(&self) -> Result<usize, StoreError> {
        self.lock().count_open()
    }

    async fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.lock()
            .devices
            .insert(rec.thing_name.clone(), rec.clone());
        Ok(())
    }

    async fn remove_device(&self, thing: &str) -> Result<(), StoreError> {
        self.lock().devices.remove(thing);
        Ok(())
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        Ok(self.lock().devices.values().cloned().collect())
    }

    async fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError> {
        self.lock().operators.insert(rec.name.clone(), rec.clone());
        Ok(())
    }

    async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        Ok(self.lock().operators.values().cloned().collect())
    }

    async fn swap_operator(
        &self,
        before: Option<&OperatorRecord>,
        after: &OperatorRecord,
    ) -> Result<bool, StoreError> {
        let mut st = self.lock();
        if !super::same_operator(st.operators.get(&after.name), before) {
            return Ok(false);
        }
        st.operators.insert(after.name.clone(), after.clone());
        Ok(true)
    }
}
