//! What each store operation decides, written once over the tables a store provides inside one
//! transaction ([`Reads`], [`Tables`]): token checks, single use, rotation, closing, and the
//! indexes derived from each record (token → tunnel, bound client token → open tunnel, open
//! tunnels by expiry, closed tunnels by close time), so every store keeps them the same way.

use culvert_protocol::Mode;
use serde::{Deserialize, Serialize};

use super::{
    AdmitError, Admitted, ChangeError, CloseReason, Closed, Due, Handshake, ListQuery, NewTokens,
    OnSite, Refusal, Status, StoreError, TagChange, TunnelRecord,
};
use crate::tokens::TokenHash;

/// Rotated-away tokens remembered per side, to tell their holders why they are refused.
pub(crate) const ROTATED_KEPT: usize = 8;

/// Where a token hash points.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TokenRef {
    pub tunnel: String,
    pub source: bool,
    /// False for a token rotated away.
    pub current: bool,
}

impl TokenRef {
    fn mode(&self) -> Mode {
        if self.source {
            Mode::Source
        } else {
            Mode::Destination
        }
    }
}

/// What a store reads inside a transaction.
pub(crate) trait Reads {
    fn tunnel(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError>;
    fn token(&self, h: &TokenHash) -> Result<Option<TokenRef>, StoreError>;
    /// The open tunnel a client token is bound to.
    fn client_token(&self, h: &TokenHash) -> Result<Option<String>, StoreError>;
    /// Every tunnel, in no particular order.
    fn each_tunnel(&self, f: &mut dyn FnMut(TunnelRecord)) -> Result<(), StoreError>;
    /// Ids of open tunnels expiring at or before `until_ms` (every open one with `i64::MAX`).
    fn open_until(&self, until_ms: i64) -> Result<Vec<String>, StoreError>;
    /// Ids of closed tunnels closed before `before_ms`.
    fn closed_before(&self, before_ms: i64) -> Result<Vec<String>, StoreError>;
    fn count_open(&self) -> Result<usize, StoreError>;
}

/// What a store writes inside a transaction. Only [`write`] calls these, so that the indexes
/// always follow the records.
pub(crate) trait Tables: Reads {
    fn put_tunnel(&mut self, rec: &TunnelRecord) -> Result<(), StoreError>;
    fn remove_tunnel(&mut self, id: &str) -> Result<(), StoreError>;
    fn put_token(&mut self, h: &TokenHash, r: &TokenRef) -> Result<(), StoreError>;
    fn remove_token(&mut self, h: &TokenHash) -> Result<(), StoreError>;
    fn put_client_token(&mut self, h: &TokenHash, tunnel: &str) -> Result<(), StoreError>;
    fn remove_client_token(&mut self, h: &TokenHash) -> Result<(), StoreError>;
    fn put_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError>;
    fn remove_open(&mut self, expires_ms: i64, id: &str) -> Result<(), StoreError>;
    fn put_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError>;
    fn remove_closed(&mut self, closed_ms: i64, id: &str) -> Result<(), StoreError>;
}

/// The index entries a record implies.
fn tokens_of(rec: &TunnelRecord) -> Vec<(TokenHash, TokenRef)> {
    let mut out = Vec::new();
    for mode in [Mode::Source, Mode::Destination] {
        let side = rec.side(mode);
        let r = |current| TokenRef {
            tunnel: rec.id.clone(),
            source: mode == Mode::Source,
            current,
        };
        out.push((side.token, r(true)));
        out.extend(side.rotated.iter().map(|h| (*h, r(false))));
    }
    out
}

/// Client tokens bound to `rec` (only while it is open: they are unique among open tunnels).
fn client_tokens_of(rec: &TunnelRecord) -> Vec<TokenHash> {
    if rec.status != Status::Open {
        return Vec::new();
    }
    [&rec.source, &rec.destination]
        .iter()
        .filter_map(|s| s.client_token)
        .collect()
}

/// Replace `old` by `new` (either absent for a create or a delete), indexes included.
pub(crate) fn write(
    t: &mut impl Tables,
    old: Option<&TunnelRecord>,
    new: Option<&TunnelRecord>,
) -> Result<(), StoreError> {
    if let Some(old) = old {
        for (h, _) in tokens_of(old) {
            t.remove_token(&h)?;
        }
        for h in client_tokens_of(old) {
            if t.client_token(&h)?.as_deref() == Some(old.id.as_str()) {
                t.remove_client_token(&h)?;
            }
        }
        match old.closed_ms {
            None => t.remove_open(old.expires_ms, &old.id)?,
            Some(c) => t.remove_closed(c, &old.id)?,
        }
    }
    match new {
        Some(new) => {
            for (h, r) in tokens_of(new) {
                t.put_token(&h, &r)?;
            }
            for h in client_tokens_of(new) {
                t.put_client_token(&h, &new.id)?;
            }
            match new.closed_ms {
                None => t.put_open(new.expires_ms, &new.id)?,
                Some(c) => t.put_closed(c, &new.id)?,
            }
            t.put_tunnel(new)
        }
        None => match old {
            Some(old) => t.remove_tunnel(&old.id),
            None => Ok(()),
        },
    }
}

pub(crate) fn create(t: &mut impl Tables, rec: &TunnelRecord) -> Result<(), StoreError> {
    write(t, None, Some(rec))
}

/// A handshake: the token must be the current one of an open, unexpired tunnel, in the mode
/// asked. The first use spends it (binding the client token, if one was presented, which must
/// not be bound to another open tunnel); later uses must present that client token.
pub(crate) fn admit(t: &mut impl Tables, h: &Handshake) -> Result<Admitted, AdmitError> {
    let Some(r) = t.token(&h.token)? else {
        return Err(Refusal::UnknownToken.into());
    };
    let Some(rec) = t.tunnel(&r.tunnel)? else {
        return Err(Refusal::UnknownToken.into());
    };
    let id = rec.id.clone();
    match rec.close_reason {
        Some(CloseReason::Expired) => return Err(Refusal::Expired(id).into()),
        Some(CloseReason::Closed | CloseReason::AccessRevoked | CloseReason::RefusedOnSite) => {
            return Err(Refusal::Closed(id).into());
        }
        None if rec.expires_ms <= h.now_ms => return Err(Refusal::Expired(id).into()),
        None => {}
    }
    if !r.current {
        return Err(Refusal::Rotated(r.mode()).into());
    }
    if !rec.side(r.mode()).token.matches(&h.token) {
        return Err(Refusal::UnknownToken.into());
    }
    if r.mode() != h.mode {
        return Err(Refusal::WrongMode {
            token: r.mode(),
            asked: h.mode,
        }
        .into());
    }
    let side = rec.side(h.mode);
    if side.used {
        return match (side.client_token, h.client_token) {
            (Some(bound), Some(ct)) if bound.matches(&ct) => Ok(Admitted {
                rec,
                first_use: false,
            }),
            (Some(_), Some(_)) => Err(Refusal::ClientTokenMismatch {
                mode: h.mode,
                tunnel: id,
            }
            .into()),
            (Some(_), None) => Err(Refusal::NeedsClientToken {
                mode: h.mode,
                tunnel: id,
            }
            .into()),
            (None, _) => Err(Refusal::Spent {
                mode: h.mode,
                tunnel: id,
            }
            .into()),
        };
    }
    if let Some(ct) = h.client_token
        && t.client_token(&ct)?.is_some_and(|owner| owner != id)
    {
        return Err(Refusal::ClientTokenInUse.into());
    }
    let mut new = rec.clone();
    let side = new.side_mut(h.mode);
    side.used = true;
    side.client_token = h.client_token;
    side.last_change_ms = h.now_ms;
    write(t, Some(&rec), Some(&new))?;
    Ok(Admitted {
        rec: new,
        first_use: true,
    })
}

/// Undo a first use (the upgrade after admission failed): the token is usable again.
pub(crate) fn release(
    t: &mut impl Tables,
    id: &str,
    mode: Mode,
    token: TokenHash,
) -> Result<(), StoreError> {
    let Some(rec) = t.tunnel(id)? else {
        return Ok(());
    };
    let side = rec.side(mode);
    if !side.used || !side.token.matches(&token) {
        return Ok(());
    }
    let mut new = rec.clone();
    let side = new.side_mut(mode);
    side.used = false;
    side.client_token = None;
    write(t, Some(&rec), Some(&new))
}

/// Tunnel `id`, if it is open.
fn open_tunnel(t: &impl Tables, id: &str) -> Result<TunnelRecord, ChangeError> {
    let rec = t
        .tunnel(id)?
        .ok_or_else(|| ChangeError::NotFound(id.to_owned()))?;
    if rec.status != Status::Open {
        return Err(ChangeError::Closed(id.to_owned()));
    }
    Ok(rec)
}

/// New tokens for the sides `new` names: the old ones are kept (at most [`ROTATED_KEPT`]) to
/// answer "rotated", the client-token binding goes, and the side's generation moves on.
pub(crate) fn rotate(
    t: &mut impl Tables,
    id: &str,
    new: &NewTokens,
) -> Result<TunnelRecord, ChangeError> {
    let rec = open_tunnel(t, id)?;
    let mut next = rec.clone();
    for mode in [Mode::Source, Mode::Destination] {
        let Some(token) = new.get(mode) else {
            continue;
        };
        let side = next.side_mut(mode);
        side.rotated.push(side.token);
        if side.rotated.len() > ROTATED_KEPT {
            side.rotated.remove(0);
        }
        side.token = token;
        side.client_token = None;
        side.used = false;
        side.generation += 1;
    }
    if let Some(r) = &new.retarget {
        next.thing_name = r.thing_name.clone();
        next.services = r.services.clone();
    }
    write(t, Some(&rec), Some(&next))?;
    Ok(next)
}

/// Change a tunnel's tags (a closed tunnel's too, as AWS tags any tunnel it still lists).
pub(crate) fn retag(
    t: &mut impl Tables,
    id: &str,
    change: &TagChange,
) -> Result<TunnelRecord, ChangeError> {
    let rec = t
        .tunnel(id)?
        .ok_or_else(|| ChangeError::NotFound(id.to_owned()))?;
    let mut next = rec.clone();
    for k in &change.remove {
        next.tags.remove(k);
    }
    next.tags
        .extend(change.set.iter().map(|(k, v)| (k.clone(), v.clone())));
    write(t, Some(&rec), Some(&next))?;
    Ok(next)
}

/// Close an open tunnel (both sides' generations move on); a closed one is left as it is.
pub(crate) fn close(
    t: &mut impl Tables,
    id: &str,
    reason: CloseReason,
    now_ms: i64,
) -> Result<Closed, ChangeError> {
    let rec = t
        .tunnel(id)?
        .ok_or_else(|| ChangeError::NotFound(id.to_owned()))?;
    if rec.status != Status::Open {
        return Ok(Closed {
            rec,
            changed: false,
        });
    }
    let mut next = rec.clone();
    next.status = Status::Closed;
    next.closed_ms = Some(now_ms);
    next.close_reason = Some(reason);
    next.source.generation += 1;
    next.destination.generation += 1;
    write(t, Some(&rec), Some(&next))?;
    Ok(Closed {
        rec: next,
        changed: true,
    })
}

/// Record the site's approval state of an open tunnel.
pub(crate) fn set_on_site(
    t: &mut impl Tables,
    id: &str,
    on_site: &OnSite,
) -> Result<TunnelRecord, ChangeError> {
    let rec = open_tunnel(t, id)?;
    let mut next = rec.clone();
    next.on_site = Some(on_site.clone());
    write(t, Some(&rec), Some(&next))?;
    Ok(next)
}

pub(crate) fn delete(t: &mut impl Tables, id: &str) -> Result<bool, StoreError> {
    let Some(rec) = t.tunnel(id)? else {
        return Ok(false);
    };
    write(t, Some(&rec), None)?;
    Ok(true)
}

/// Newest first, after the cursor, filtered.
pub(crate) fn list(t: &impl Reads, q: &ListQuery) -> Result<(Vec<TunnelRecord>, bool), StoreError> {
    let mut all = Vec::new();
    t.each_tunnel(&mut |rec| {
        let keep = q.thing.as_deref().is_none_or(|th| rec.thing_name == th)
            && q.status.is_none_or(|s| rec.status == s)
            && q.after
                .as_ref()
                .is_none_or(|(c, id)| (rec.created_ms, &rec.id) < (*c, id));
        if keep {
            all.push(rec);
        }
    })?;
    all.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    let more = all.len() > q.max;
    all.truncate(q.max);
    Ok((all, more))
}

pub(crate) fn due(t: &impl Reads, now_ms: i64, purge_before_ms: i64) -> Result<Due, StoreError> {
    Ok(Due {
        expired: t.open_until(now_ms)?,
        purge: t.closed_before(purge_before_ms)?,
    })
}

pub(crate) fn unclaimed(
    t: &impl Reads,
    thing: &str,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for id in t.open_until(i64::MAX)? {
        if let Some(rec) = t.tunnel(&id)?
            && rec.thing_name == thing
            && rec.status == Status::Open
            && rec.expires_ms > now_ms
            && !rec.destination.used
        {
            out.push(id);
        }
    }
    Ok(out)
}
