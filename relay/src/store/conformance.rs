//! What every [`Store`] must do, run against each one: the rules of tokens (single use, client
//! tokens, rotation, close, expiry), the indexes, paging, and atomicity under concurrent
//! handshakes. Every store is in the macro at the bottom; PostgreSQL's runs against a real
//! server the tests start (`culvert_devkit::pg`).

use std::sync::Arc;

use culvert_protocol::Mode;

use super::*;
use crate::tokens::TokenHash;

const NOW: i64 = 1_000_000;

/// A store for one test, and what to clean up after it.
pub(super) struct Fixture {
    pub store: Arc<dyn Store>,
    dir: Option<std::path::PathBuf>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub(super) fn memory() -> Fixture {
    Fixture {
        store: Arc::new(MemoryStore::new()),
        dir: None,
    }
}

pub(super) fn redb() -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "culvert-conformance-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    Fixture {
        store: Arc::new(RedbStore::open(&dir.join("t.redb")).unwrap()),
        dir: Some(dir),
    }
}

/// A database of its own on this test process's PostgreSQL server.
pub(super) async fn postgres() -> Fixture {
    let url = tokio::task::spawn_blocking(culvert_devkit::pg::database)
        .await
        .unwrap();
    Fixture {
        store: Arc::new(PostgresStore::open(&url, None, None).await.unwrap()),
        dir: None,
    }
}

pub(super) fn rec(id: &str, thing: &str, created_ms: i64) -> TunnelRecord {
    TunnelRecord {
        id: id.into(),
        thing_name: thing.into(),
        services: vec!["SSH".into()],
        description: None,
        tags: Default::default(),
        created_ms,
        lifetime_minutes: 720,
        expires_ms: NOW + 3_600_000,
        status: Status::Open,
        closed_ms: None,
        close_reason: None,
        source: SideRecord::new(tok(id, Mode::Source), created_ms),
        destination: SideRecord::new(tok(id, Mode::Destination), created_ms),
        opened_by: None,
        opened_key: None,
        reason: None,
        on_site: None,
    }
}

pub(super) fn tok(id: &str, mode: Mode) -> TokenHash {
    TokenHash::of(&format!("{id}/{mode}"))
}

pub(super) fn hs(token: TokenHash, mode: Mode, ct: Option<&str>) -> Handshake {
    Handshake {
        token,
        mode,
        client_token: ct.map(TokenHash::of),
        now_ms: NOW,
    }
}

async fn refused(s: &dyn Store, h: Handshake) -> Refusal {
    match s.admit(&h).await {
        Err(AdmitError::Refused(r)) => r,
        Err(e) => panic!("store failed: {e}"),
        Ok(_) => panic!("admitted"),
    }
}

async fn tokens_are_single_use_without_a_client_token(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t", "a", 1)).await.unwrap();
    let a = s
        .admit(&hs(tok("t", Mode::Destination), Mode::Destination, None))
        .await
        .unwrap();
    assert!(a.first_use);
    assert!(a.rec.destination.used);
    assert_eq!(
        refused(s, hs(tok("t", Mode::Destination), Mode::Destination, None)).await,
        Refusal::Spent {
            mode: Mode::Destination,
            tunnel: "t".into()
        }
    );
    assert_eq!(
        refused(s, hs(TokenHash::of("never issued"), Mode::Source, None)).await,
        Refusal::UnknownToken
    );
    assert_eq!(
        refused(s, hs(tok("t", Mode::Source), Mode::Destination, None)).await,
        Refusal::WrongMode {
            token: Mode::Source,
            asked: Mode::Destination
        }
    );
}

async fn a_client_token_binds_the_token_for_reconnects(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t", "a", 1)).await.unwrap();
    let src = tok("t", Mode::Source);
    assert!(
        s.admit(&hs(src, Mode::Source, Some("ct")))
            .await
            .unwrap()
            .first_use
    );
    assert!(
        !s.admit(&hs(src, Mode::Source, Some("ct")))
            .await
            .unwrap()
            .first_use
    );
    assert!(matches!(
        refused(s, hs(src, Mode::Source, None)).await,
        Refusal::NeedsClientToken {
            mode: Mode::Source,
            ..
        }
    ));
    assert!(matches!(
        refused(s, hs(src, Mode::Source, Some("other"))).await,
        Refusal::ClientTokenMismatch {
            mode: Mode::Source,
            ..
        }
    ));
}

async fn a_client_token_is_bound_to_one_open_tunnel_at_a_time(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t1", "a", 1)).await.unwrap();
    s.create(&rec("t2", "a", 2)).await.unwrap();
    s.admit(&hs(tok("t1", Mode::Source), Mode::Source, Some("ct")))
        .await
        .unwrap();
    assert_eq!(
        refused(s, hs(tok("t2", Mode::Source), Mode::Source, Some("ct"))).await,
        Refusal::ClientTokenInUse
    );
    s.close("t1", CloseReason::Closed, NOW).await.unwrap();
    s.admit(&hs(tok("t2", Mode::Source), Mode::Source, Some("ct")))
        .await
        .expect("free once its tunnel closed");
    // Deleting the closed tunnel must not unbind the token from the open one.
    s.delete("t1").await.unwrap();
    s.create(&rec("t3", "a", 3)).await.unwrap();
    assert_eq!(
        refused(s, hs(tok("t3", Mode::Source), Mode::Source, Some("ct"))).await,
        Refusal::ClientTokenInUse
    );
}

async fn rotation_replaces_tokens_and_says_so_to_old_holders(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t", "a", 1)).await.unwrap();
    let old = tok("t", Mode::Destination);
    s.admit(&hs(old, Mode::Destination, Some("ct")))
        .await
        .unwrap();
    let new = TokenHash::of("new");
    let r = s
        .rotate(
            "t",
            &NewTokens {
                destination: Some(new),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.destination.generation, 1);
    assert_eq!(r.source.generation, 0, "the source side was not rotated");
    assert_eq!(
        refused(s, hs(old, Mode::Destination, Some("ct"))).await,
        Refusal::Rotated(Mode::Destination)
    );
    assert!(
        s.admit(&hs(new, Mode::Destination, None))
            .await
            .unwrap()
            .first_use
    );
    // Only the last ROTATED_KEPT old tokens are remembered.
    for i in 0..ops::ROTATED_KEPT {
        s.rotate(
            "t",
            &NewTokens {
                destination: Some(TokenHash::of(&format!("n{i}"))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    assert_eq!(
        refused(s, hs(old, Mode::Destination, None)).await,
        Refusal::UnknownToken
    );
    assert_eq!(
        refused(s, hs(new, Mode::Destination, None)).await,
        Refusal::Rotated(Mode::Destination)
    );
    assert!(matches!(
        s.rotate("nope", &NewTokens::default()).await,
        Err(ChangeError::NotFound(_))
    ));
}

async fn closing_is_idempotent_and_refuses_everything_after(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t", "a", 1)).await.unwrap();
    let c = s.close("t", CloseReason::Closed, NOW).await.unwrap();
    assert!(c.changed);
    assert_eq!(c.rec.status, Status::Closed);
    assert_eq!(
        (c.rec.source.generation, c.rec.destination.generation),
        (1, 1)
    );
    let again = s.close("t", CloseReason::Expired, NOW + 1).await.unwrap();
    assert!(!again.changed);
    assert_eq!(again.rec.close_reason, Some(CloseReason::Closed));
    assert_eq!(
        refused(s, hs(tok("t", Mode::Source), Mode::Source, None)).await,
        Refusal::Closed("t".into())
    );
    assert!(matches!(
        s.rotate("t", &NewTokens::default()).await,
        Err(ChangeError::Closed(_))
    ));
    assert!(matches!(
        s.close("nope", CloseReason::Closed, NOW).await,
        Err(ChangeError::NotFound(_))
    ));
    assert_eq!(s.count_open().await.unwrap(), 0);
}

async fn expiry_and_retention_are_found_by_the_sweep(f: Fixture) {
    let s = &*f.store;
    let mut short = rec("short", "a", 1);
    short.expires_ms = NOW - 1;
    s.create(&short).await.unwrap();
    s.create(&rec("long", "a", 2)).await.unwrap();
    s.create(&rec("gone", "a", 3)).await.unwrap();
    s.close("gone", CloseReason::Closed, NOW - 10)
        .await
        .unwrap();
    assert_eq!(
        refused(s, hs(tok("short", Mode::Source), Mode::Source, None)).await,
        Refusal::Expired("short".into()),
        "past its expiry even before the sweep closed it"
    );
    let due = s.due(NOW, NOW - 5).await.unwrap();
    assert_eq!(due.expired, ["short"]);
    assert_eq!(due.purge, ["gone"]);
    assert!(s.due(NOW, NOW - 20).await.unwrap().purge.is_empty());
    s.close("short", CloseReason::Expired, NOW).await.unwrap();
    assert_eq!(
        refused(s, hs(tok("short", Mode::Source), Mode::Source, None)).await,
        Refusal::Expired("short".into())
    );
    assert!(s.due(NOW, 0).await.unwrap().expired.is_empty());
    assert!(s.delete("gone").await.unwrap());
    assert!(!s.delete("gone").await.unwrap());
    assert!(s.get("gone").await.unwrap().is_none());
    assert_eq!(
        refused(s, hs(tok("gone", Mode::Source), Mode::Source, None)).await,
        Refusal::UnknownToken
    );
    assert_eq!(s.count_open().await.unwrap(), 1);
}

async fn a_failed_upgrade_releases_the_first_use(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t", "a", 1)).await.unwrap();
    let t = tok("t", Mode::Source);
    s.admit(&hs(t, Mode::Source, Some("ct"))).await.unwrap();
    s.release("t", Mode::Source, t).await.unwrap();
    let again = s.admit(&hs(t, Mode::Source, Some("other"))).await.unwrap();
    assert!(again.first_use, "usable again, with any client token");
    // Releasing with a token that is not the current one changes nothing.
    s.release("t", Mode::Source, TokenHash::of("x"))
        .await
        .unwrap();
    assert!(
        !s.admit(&hs(t, Mode::Source, Some("other")))
            .await
            .unwrap()
            .first_use
    );
}

async fn lists_are_newest_first_filtered_and_paged(f: Fixture) {
    let s = &*f.store;
    for (i, thing) in ["a", "b", "a", "a", "b"].iter().enumerate() {
        s.create(&rec(&format!("t{i}"), thing, i as i64 + 1))
            .await
            .unwrap();
    }
    s.close("t2", CloseReason::Closed, NOW).await.unwrap();
    let ids = |v: &[TunnelRecord]| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let q = ListQuery {
        thing: Some("a".into()),
        max: 2,
        ..Default::default()
    };
    let (page, more) = s.list(&q).await.unwrap();
    assert_eq!(ids(&page), ["t3", "t2"]);
    assert!(more);
    let last = page.last().unwrap();
    let q = ListQuery {
        after: Some((last.created_ms, last.id.clone())),
        ..q
    };
    let (page, more) = s.list(&q).await.unwrap();
    assert_eq!(ids(&page), ["t0"]);
    assert!(!more);
    let open = ListQuery {
        status: Some(Status::Open),
        max: 10,
        ..Default::default()
    };
    assert_eq!(
        ids(&s.list(&open).await.unwrap().0),
        ["t4", "t3", "t1", "t0"]
    );
}

async fn unclaimed_tunnels_are_open_unexpired_and_never_used(f: Fixture) {
    let s = &*f.store;
    for id in ["used", "fresh", "closed"] {
        s.create(&rec(id, "cell", 1)).await.unwrap();
    }
    let mut late = rec("late", "cell", 1);
    late.expires_ms = NOW;
    s.create(&late).await.unwrap();
    s.create(&rec("other", "elsewhere", 1)).await.unwrap();
    s.admit(&hs(tok("used", Mode::Destination), Mode::Destination, None))
        .await
        .unwrap();
    s.close("closed", CloseReason::Closed, NOW).await.unwrap();
    assert_eq!(s.unclaimed("cell", NOW).await.unwrap(), ["fresh"]);
}

async fn devices_are_stored_and_removed(f: Fixture) {
    let s = &*f.store;
    let d = DeviceRecord {
        thing_name: "cell".into(),
        password: TokenHash::of("pw"),
        created_ms: 1,
        tags: [("line".to_owned(), "2".to_owned())].into(),
    };
    s.put_device(&d).await.unwrap();
    s.put_device(&DeviceRecord {
        password: TokenHash::of("pw2"),
        ..d.clone()
    })
    .await
    .unwrap();
    let all = s.devices().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].password, TokenHash::of("pw2"));
    assert_eq!(all[0].tags, d.tags);
    s.remove_device("cell").await.unwrap();
    assert!(s.devices().await.unwrap().is_empty());
}

async fn operators_are_stored_and_replaced(f: Fixture) {
    use crate::access::{OperatorRecord, Role};
    let s = &*f.store;
    let o = OperatorRecord {
        name: "alice".into(),
        role: Role::Operator,
        created_ms: 1,
        created_by: "bootstrap-admin".into(),
        disabled_ms: None,
        keys: Vec::new(),
        grants: Vec::new(),
        requests: Vec::new(),
        password: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
    };
    s.put_operator(&o).await.unwrap();
    s.put_operator(&OperatorRecord {
        disabled_ms: Some(2),
        ..o.clone()
    })
    .await
    .unwrap();
    let all = s.operators().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].disabled_ms, Some(2));
    assert_eq!(all[0].password, o.password, "the password hash is kept");

    // A compare-and-swap: against the stored record it lands, against a stale one it does
    // not (another writer got there first), and "absent" is a state it can expect.
    let stored = all[0].clone();
    let enabled = OperatorRecord {
        disabled_ms: None,
        ..stored.clone()
    };
    assert!(s.swap_operator(Some(&stored), &enabled).await.unwrap());
    let stale = OperatorRecord {
        disabled_ms: Some(3),
        ..stored.clone()
    };
    assert!(!s.swap_operator(Some(&stored), &stale).await.unwrap());
    assert_eq!(s.operators().await.unwrap()[0].disabled_ms, None);
    let bob = OperatorRecord {
        name: "bob".into(),
        ..o.clone()
    };
    assert!(
        !s.swap_operator(Some(&o), &bob).await.unwrap(),
        "bob was not there"
    );
    assert!(s.swap_operator(None, &bob).await.unwrap());
    assert!(
        !s.swap_operator(None, &bob).await.unwrap(),
        "bob is there now"
    );
}

/// Many handshakes with the same single-use token at once: exactly one gets in.
async fn concurrent_handshakes_spend_a_token_once(f: Fixture) {
    f.store.create(&rec("t", "a", 1)).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = f.store.clone();
        tasks.push(tokio::spawn(async move {
            s.admit(&hs(tok("t", Mode::Destination), Mode::Destination, None))
                .await
                .is_ok()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 1);
}

async fn the_sites_approval_is_kept_for_open_tunnels_only(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t", "a", 1)).await.unwrap();
    let waiting = OnSite {
        state: OnSiteState::Waiting,
        at_ms: 2,
        by: None,
        detail: Some("ask the shift lead".into()),
    };
    let r = s.set_on_site("t", &waiting).await.unwrap();
    assert_eq!(r.on_site.as_ref(), Some(&waiting));
    assert_eq!(s.get("t").await.unwrap().unwrap().on_site, Some(waiting));
    assert!(matches!(
        s.set_on_site(
            "nope",
            &OnSite {
                state: OnSiteState::Approved,
                at_ms: 3,
                by: None,
                detail: None
            }
        )
        .await,
        Err(ChangeError::NotFound(_))
    ));
    s.close("t", CloseReason::RefusedOnSite, 4).await.unwrap();
    assert!(matches!(
        s.set_on_site(
            "t",
            &OnSite {
                state: OnSiteState::Approved,
                at_ms: 5,
                by: None,
                detail: None
            }
        )
        .await,
        Err(ChangeError::Closed(_))
    ));
    assert!(matches!(
        refused(s, hs(tok("t", Mode::Destination), Mode::Destination, None)).await,
        Refusal::Closed(_)
    ));
}

async fn tags_change_in_one_step_on_any_tunnel_and_a_rotation_can_move_the_destination(f: Fixture) {
    let s = &*f.store;
    s.create(&rec("t", "a", 1)).await.unwrap();
    let tags: BTreeMap<String, String> = [("line".to_owned(), "2".to_owned())].into();
    let set = |tags: &BTreeMap<String, String>| TagChange {
        set: tags.clone(),
        remove: Vec::new(),
    };
    assert_eq!(s.retag("t", &set(&tags)).await.unwrap().tags, tags);
    // Two changes of different keys both land (each is one step on the stored tags).
    let owner: BTreeMap<String, String> = [("owner".to_owned(), "ops".to_owned())].into();
    let both = s.retag("t", &set(&owner)).await.unwrap().tags;
    assert_eq!(both.len(), 2, "{both:?}");
    let gone = TagChange {
        remove: vec!["owner".into()],
        ..TagChange::default()
    };
    assert_eq!(s.retag("t", &gone).await.unwrap().tags, tags);
    let new = NewTokens {
        destination: Some(tok("t2", Mode::Destination)),
        retarget: Some(Retarget {
            thing_name: "b".into(),
            services: vec!["RDP".into(), "SSH".into()],
        }),
        ..Default::default()
    };
    let r = s.rotate("t", &new).await.unwrap();
    assert_eq!((r.thing_name.as_str(), r.services.len()), ("b", 2));
    assert_eq!(r.tags, tags, "a rotation keeps the tags");
    assert_eq!(s.unclaimed("b", NOW).await.unwrap(), vec!["t".to_owned()]);
    assert!(s.unclaimed("a", NOW).await.unwrap().is_empty());
    s.close("t", CloseReason::Closed, 4).await.unwrap();
    let line = TagChange {
        remove: vec!["line".into()],
        ..TagChange::default()
    };
    assert!(
        s.retag("t", &line).await.unwrap().tags.is_empty(),
        "a closed tunnel's too"
    );
    assert!(matches!(
        s.retag("nope", &set(&tags)).await,
        Err(ChangeError::NotFound(_))
    ));
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::memory()).await
                }
            )*
        }
        mod redb_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::redb()).await
                }
            )*
        }
        mod postgres_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::postgres().await).await
                }
            )*
        }
    };
}

conformance!(
    tokens_are_single_use_without_a_client_token,
    a_client_token_binds_the_token_for_reconnects,
    a_client_token_is_bound_to_one_open_tunnel_at_a_time,
    rotation_replaces_tokens_and_says_so_to_old_holders,
    closing_is_idempotent_and_refuses_everything_after,
    expiry_and_retention_are_found_by_the_sweep,
    a_failed_upgrade_releases_the_first_use,
    lists_are_newest_first_filtered_and_paged,
    unclaimed_tunnels_are_open_unexpired_and_never_used,
    devices_are_stored_and_removed,
    operators_are_stored_and_replaced,
    concurrent_handshakes_spend_a_token_once,
    the_sites_approval_is_kept_for_open_tunnels_only,
    tags_change_in_one_step_on_any_tunnel_and_a_rotation_can_move_the_destination,
);
