//! Devices (gateways) allowed on the embedded MQTT broker: a thing name and a password issued
//! once by the API (`POST /api/v1/devices`), stored only as a SHA-256 hash and compared in
//! constant time. With an external broker, device identities live in that broker instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::store::{DeviceRecord, Store, StoreError};

use crate::tokens::{TokenHash, new_secret};

pub struct Devices {
    store: Arc<dyn Store>,
    map: Mutex<BTreeMap<String, DeviceRecord>>,
    /// Cancelled when a device is removed or gets a new password: its connections end.
    sessions: Mutex<HashMap<String, CancellationToken>>,
    /// Serializes changes and [`Devices::reload`], so a reload never undoes a change made here.
    writes: tokio::sync::Mutex<()>,
    /// What this relay's broker has seen of each device (not stored: it is rebuilt as
    /// devices connect and report).
    presence: Mutex<HashMap<String, Presence>>,
}

/// A device as this relay's embedded broker sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Presence {
    /// Broker connections open now (more than one only while a reconnect replaces one).
    pub connections: usize,
    /// When it last connected, disconnected or reported.
    pub last_seen_ms: Option<i64>,
    /// Its last health report ([`crate::health`]).
    pub health: Option<crate::health::Health>,
}

/// Held while a device's broker connection is open.
pub struct Online {
    devices: Arc<Devices>,
    thing: String,
}

impl Drop for Online {
    fn drop(&mut self) {
        let mut p = self.devices.presence();
        if let Some(e) = p.get_mut(&self.thing) {
            e.connections = e.connections.saturating_sub(1);
            e.last_seen_ms = Some(crate::registry::now_ms());
        }
    }
}

impl Devices {
    /// Every device from `store`, kept in memory: the broker checks passwords on every
    /// connection, synchronously.
    pub async fn load(store: Arc<dyn Store>) -> Result<Devices, StoreError> {
        let map = store
            .devices()
            .await?
            .into_iter()
            .map(|d| (d.thing_name.clone(), d))
            .collect();
        Ok(Devices {
            store,
            map: Mutex::new(map),
            sessions: Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            presence: Mutex::new(HashMap::new()),
        })
    }

    /// Take the store's devices as they are now: another relay sharing the store may have
    /// changed them. A device removed, or given a new password, there loses its broker
    /// connections here too.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.writes.lock().await;
        let fresh: BTreeMap<String, DeviceRecord> = self
            .store
            .devices()
            .await?
            .into_iter()
            .map(|d| (d.thing_name.clone(), d))
            .collect();
        let gone: Vec<String> = {
            let mut map = self.lock();
            let gone = map
                .iter()
                .filter(|(thing, d)| fresh.get(*thing).is_none_or(|f| f.password != d.password))
                .map(|(thing, _)| thing.clone())
                .collect();
            *map = fresh;
            gone
        };
        for thing in gone {
            self.revoke(&thing);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DeviceRecord>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn presence(&self) -> std::sync::MutexGuard<'_, HashMap<String, Presence>> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `thing`'s broker connection is open until the guard is dropped.
    pub fn online(self: &Arc<Self>, thing: &str) -> Online {
        let mut p = self.presence();
        let e = p.entry(thing.to_owned()).or_default();
        e.connections += 1;
        e.last_seen_ms = Some(crate::registry::now_ms());
        Online {
            devices: self.clone(),
            thing: thing.to_owned(),
        }
    }

    /// Keep `thing`'s latest health report.
    pub fn set_health(&self, thing: &str, services: Vec<crate::health::ServiceHealth>) {
        let now = crate::registry::now_ms();
        let mut p = self.presence();
        let e = p.entry(thing.to_owned()).or_default();
        e.last_seen_ms = Some(now);
        e.health = Some(crate::health::Health {
            at_ms: now,
            services,
        });
    }

    /// What this relay's broker has seen of `thing` (nothing, for a device it never saw).
    pub fn seen(&self, thing: &str) -> Presence {
        self.presence().get(thing).cloned().unwrap_or_default()
    }

    /// Create the device, or issue it a new password. Returns the password (shown once). Its
    /// tags become `tags`, or stay as they were when that is None.
    pub async fn issue(
        &self,
        thing: &str,
        tags: Option<BTreeMap<String, String>>,
    ) -> Result<String, StoreError> {
        let _one_at_a_time = self.writes.lock().await;
        let password = new_secret();
        let rec = DeviceRecord {
            thing_name: thing.to_owned(),
            password: TokenHash::of(&password),
            created_ms: crate::registry::now_ms(),
            tags: tags.unwrap_or_else(|| self.tags(thing)),
        };
        self.store.put_device(&rec).await?;
        self.lock().insert(thing.to_owned(), rec);
        self.revoke(thing);
        Ok(password)
    }

    /// Replace a device's tags (its password and connection stay). None: no such device.
    pub async fn set_tags(
        &self,
        thing: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let _one_at_a_time = self.writes.lock().await;
        let Some(mut rec) = self.lock().get(thing).cloned() else {
            return Ok(None);
        };
        rec.tags = tags;
        self.store.put_device(&rec).await?;
        self.lock().insert(thing.to_owned(), rec.clone());
        Ok(Some(rec))
    }

    /// A device's tags (none for a thing that is not registered here).
    pub fn tags(&self, thing: &str) -> BTreeMap<String, String> {
        self.lock()
            .get(thing)
            .map(|d| d.tags.clone())
            .unwrap_or_default()
    }

    pub async fn remove(&self, thing: &str) -> Result<bool, StoreError> {
        let _one_at_a_time = self.writes.lock().await;
        self.store.remove_device(thing).await?;
        self.revoke(thing);
        self.presence().remove(thing);
        Ok(self.lock().remove(thing).is_some())
    }

    /// The token a device's broker connections watch; cancelled by `issue` and `remove`.
    pub fn session(&self, thing: &str) -> CancellationToken {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|_, t| !t.is_cancelled());
        s.entry(thing.to_owned()).or_default().clone()
    }

    fn revoke(&self, thing: &str) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = s.remove(thing) {
            t.cancel();
        }
    }

    pub fn list(&self) -> Vec<DeviceRecord> {
        self.lock().values().cloned().collect()
    }

    /// Does `password` belong to device `thing`?
    pub fn verify(&self, thing: &str, password: &str) -> bool {
        let presented = TokenHash::of(password);
        self.lock()
            .get(thing)
            .is_some_and(|d| d.password.matches(&presented))
    }
}
