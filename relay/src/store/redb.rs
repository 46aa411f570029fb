//! Persistent tunnel metadata. The embedded default is a redb file in the state directory
//! (`tunnels.redb`): one record per tunnel, written on open, close, rotation and when a token is
//! first used, so a relay restart loses no open tunnel and no single-use token comes back to life.
//! Connection state (who is connected right now) is not persisted: after a restart everyone is
//! disconnected until they reconnect.
//!
//! The [`Store`] is deliberately a small interface (put / remove / load) so a PostgreSQL
//! implementation can replace it for several relay nodes.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::tokens::TokenHash;

const TUNNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("tunnels");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");

/// A device allowed on the embedded MQTT broker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub thing_name: String,
    pub password: TokenHash,
    pub created_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Open,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Closed through the API.
    Closed,
    /// The lifetime ran out.
    Expired,
}

/// Token state of one side (source or destination) of a tunnel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SideRecord {
    pub token: TokenHash,
    /// Set on the first successful handshake that presented a client token.
    pub client_token: Option<TokenHash>,
    /// The token has completed a handshake (without a client token it is now spent).
    pub used: bool,
    /// Tokens rotated away (newest last), kept to tell their holders why they are refused.
    pub rotated: Vec<TokenHash>,
    /// Last time this side connected or disconnected (unix ms).
    pub last_change_ms: i64,
}

impl SideRecord {
    pub fn new(token: TokenHash, now_ms: i64) -> SideRecord {
        SideRecord {
            token,
            client_token: None,
            used: false,
            rotated: Vec::new(),
            last_change_ms: now_ms,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TunnelRecord {
    pub id: String,
    pub thing_name: String,
    pub services: Vec<String>,
    pub description: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub created_ms: i64,
    pub lifetime_minutes: u32,
    pub expires_ms: i64,
    pub status: Status,
    pub closed_ms: Option<i64>,
    pub close_reason: Option<CloseReason>,
    pub source: SideRecord,
    pub destination: SideRecord,
}

#[derive(Debug, thiserror::Error)]
#[error("tunnel store {path}: {message}")]
pub struct StoreError {
    pub path: String,
    pub message: String,
}

pub struct Store {
    db: redb::Database,
    path: String,
}

impl Store {
    /// Open (or create) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |m: String| StoreError {
            path: path.display().to_string(),
            message: m,
        };
        let db = redb::Database::create(path).map_err(|e| {
            err(format!(
                "{e} (is another culvert-relay using this state directory?)"
            ))
        })?;
        let s = Store {
            db,
            path: path.display().to_string(),
        };
        // Make sure the table exists so reads of an empty store work.
        let tx = s.db.begin_write().map_err(|e| err(e.to_string()))?;
        tx.open_table(TUNNELS).map_err(|e| err(e.to_string()))?;
        tx.open_table(DEVICES).map_err(|e| err(e.to_string()))?;
        tx.commit().map_err(|e| err(e.to_string()))?;
        Ok(s)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn put_in<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        rec: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| self.err(e))?;
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(table).map_err(|e| self.err(e))?;
            t.insert(key, bytes.as_slice()).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn remove_in(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(table).map_err(|e| self.err(e))?;
            t.remove(key).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every record of a table. A record that does not parse is reported, not silently dropped.
    fn load_in<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let rec: T = serde_json::from_slice(v.value())
                .map_err(|e| self.err(format!("record {:?} is corrupt: {e}", k.value())))?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Write one tunnel record durably.
    pub fn put(&self, rec: &TunnelRecord) -> Result<(), StoreError> {
        self.put_in(TUNNELS, &rec.id, rec)
    }

    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.remove_in(TUNNELS, id)
    }

    pub fn load_all(&self) -> Result<Vec<TunnelRecord>, StoreError> {
        self.load_in(TUNNELS)
    }

    pub fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.put_in(DEVICES, &rec.thing_name, rec)
    }

    pub fn remove_device(&self, thing: &str) -> Result<(), StoreError> {
        self.remove_in(DEVICES, thing)
    }

    pub fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.load_in(DEVICES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("culvert-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.redb");
        let rec = TunnelRecord {
            id: "t1".into(),
            thing_name: "cell-7".into(),
            services: vec!["SSH".into()],
            description: None,
            tags: Default::default(),
            created_ms: 1,
            lifetime_minutes: 720,
            expires_ms: 2,
            status: Status::Open,
            closed_ms: None,
            close_reason: None,
            source: SideRecord::new(TokenHash::of("a"), 1),
            destination: SideRecord::new(TokenHash::of("b"), 1),
        };
        {
            let s = Store::open(&path).unwrap();
            s.put(&rec).unwrap();
            s.put(&TunnelRecord {
                id: "t2".into(),
                ..rec.clone()
            })
            .unwrap();
            s.remove("t2").unwrap();
        }
        let s = Store::open(&path).unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].destination.token, TokenHash::of("b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
