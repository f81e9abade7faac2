//! One conformance suite for every [`Store`] backend.
//!
//! Each case is an async function taking an `Arc<dyn Store>` and working under its own key prefix.
//! The embedded store runs each case as its own test on a fresh file (plus a restart test); etcd runs
//! them all, in order, against one real etcd (`etcd` from Debian's etcd-server) started with TLS and
//! client-certificate authentication, using certificates issued by meshd's own PKI. The compaction
//! case is last: compaction is store-wide.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::embedded::EmbeddedStore;
use super::etcd::{EtcdStore, EtcdTls};
use super::{Compare, Event, KeyValue, Store, StoreError, TxnOp, Watch};

/// How long a lease-based case waits for expiry before failing.
const EXPIRY_WAIT: Duration = Duration::from_secs(8);
/// How long to wait for one watch event.
const EVENT_WAIT: Duration = Duration::from_secs(5);

/// A unique prefix for one case, so cases can share a store.
fn ns(case: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("/conformance/{case}/{nanos}/")
}

async fn recv(w: &mut Watch) -> Result<Event, StoreError> {
    match tokio::time::timeout(EVENT_WAIT, w.events.recv()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("watch ended while an event was expected"),
        Err(_) => panic!("no watch event within {EVENT_WAIT:?}"),
    }
}

async fn recv_event(w: &mut Watch) -> Event {
    match recv(w).await {
        Ok(e) => e,
        Err(e) => panic!("watch error: {e}"),
    }
}

/// Asserts nothing arrives for a short while.
async fn assert_quiet(w: &mut Watch) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), w.events.recv()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

fn put_of(e: &Event) -> &KeyValue {
    match e {
        Event::Put(kv) => kv,
        Event::Delete { key, .. } => panic!("expected a put, got the deletion of {key}"),
    }
}

/// Polls `key` until it is gone; false after `limit`.
async fn wait_gone(store: &dyn Store, key: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if store.get(key).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// get, list and create-if-absent.
pub(crate) async fn get_list_create(store: Arc<dyn Store>) {
    let p = ns("get_list_create");
    let dir = format!("{p}dir/");
    assert_eq!(store.get(&format!("{dir}a")).await.unwrap(), None);

    let a = store
        .create(&format!("{dir}a"), b"one", None)
        .await
        .unwrap()
        .expect("created");
    assert_eq!(a.key, format!("{dir}a"));
    assert_eq!(a.value, b"one");
    assert_eq!(a.version, 1);
    assert_eq!(a.create_revision, a.mod_revision);
    assert_eq!(a.lease, 0);
    assert_eq!(store.get(&a.key).await.unwrap().as_ref(), Some(&a));

    // A second create of the same key loses and changes nothing.
    assert_eq!(store.create(&a.key, b"two", None).await.unwrap(), None);
    assert_eq!(store.get(&a.key).await.unwrap().as_ref(), Some(&a));

    // Listed in key order whatever the creation order; neighbours outside the prefix are not.
    let c = store
        .create(&format!("{dir}c"), b"", None)
        .await
        .unwrap()
        .unwrap();
    let b = store
        .create(&format!("{dir}b"), &[0, 255, 1], None)
        .await
        .unwrap()
        .unwrap();
    store
        .create(&format!("{p}dir"), b"outside", None)
        .await
        .unwrap()
        .unwrap();
    store
        .create(&format!("{p}dis"), b"outside", None)
        .await
        .unwrap()
        .unwrap();
    let listing = store.list(&dir).await.unwrap();
    assert_eq!(listing.kvs, vec![a, b.clone(), c]);
    assert!(listing.revision >= b.mod_revision);

    let empty = store.list(&format!("{p}nothing/")).await.unwrap();
    assert!(empty.kvs.is_empty());
    assert!(empty.revision >= listing.revision);
}

/// compare-and-swap: success, stale revision, 0 on an existing key, a revision on a missing key.
pub(crate) async fn compare_and_swap(store: Arc<dyn Store>) {
    let p = ns("cas");
    let key = format!("{p}k");
    assert_eq!(
        store.compare_and_swap(&key, 5, b"x", None).await.unwrap(),
        None,
        "a revision on a missing key must fail"
    );
    let v1 = store
        .compare_and_swap(&key, 0, b"v1", None)
        .await
        .unwrap()
        .expect("0 on a missing key creates it");
    assert_eq!(v1.version, 1);
    assert_eq!(
        store.compare_and_swap(&key, 0, b"v2", None).await.unwrap(),
        None,
        "0 on an existing key must fail"
    );
    let v2 = store
        .compare_and_swap(&key, v1.mod_revision, b"v2", None)
        .await
        .unwrap()
        .expect("current revision wins");
    assert_eq!(v2.value, b"v2");
    assert_eq!(v2.version, 2);
    assert_eq!(v2.create_revision, v1.create_revision);
    assert!(v2.mod_revision > v1.mod_revision);
    assert_eq!(
        store
            .compare_and_swap(&key, v1.mod_revision, b"v3", None)
            .await
            .unwrap(),
        None,
        "a stale revision must fail"
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(v2));
}

/// delete: missing key, stale and current revision, unconditional; re-creation starts over.
pub(crate) async fn delete(store: Arc<dyn Store>) {
    let p = ns("delete");
    let key = format!("{p}k");
    assert!(!store.delete(&key, None).await.unwrap());
    assert!(!store.delete(&key, Some(3)).await.unwrap());

    let v1 = store.create(&key, b"1", None).await.unwrap().unwrap();
    let v2 = store
        .compare_and_swap(&key, v1.mod_revision, b"2", None)
        .await
        .unwrap()
        .unwrap();
    assert!(!store.delete(&key, Some(v1.mod_revision)).await.unwrap());
    assert!(!store.delete(&key, Some(0)).await.unwrap());
    assert_eq!(store.get(&key).await.unwrap().as_ref(), Some(&v2));
    assert!(store.delete(&key, Some(v2.mod_revision)).await.unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None);

    let again = store.create(&key, b"3", None).await.unwrap().unwrap();
    assert_eq!(again.version, 1);
    assert!(again.create_revision > v2.mod_revision);
    assert!(store.delete(&key, None).await.unwrap());
    assert!(!store.delete(&key, None).await.unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None);
}

/// Revisions increase with every write, store-wide; versions count the writes of a key.
pub(crate) async fn revisions_and_versions(store: Arc<dyn Store>) {
    let p = ns("revisions");
    let key = format!("{p}k");
    let other = format!("{p}other");
    let start = store.list(&p).await.unwrap().revision;
    let mut last = store.create(&key, b"0", None).await.unwrap().unwrap();
    assert!(last.mod_revision > start);
    for i in 1..10i64 {
        // Interleave writes to another key: they bump the store revision too.
        let o = store
            .compare_and_swap(
                &other,
                store
                    .get(&other)
                    .await
                    .unwrap()
                    .map_or(0, |kv| kv.mod_revision),
                b"o",
                None,
            )
            .await
            .unwrap()
            .unwrap();
        assert!(o.mod_revision > last.mod_revision);
        let next = store
            .compare_and_swap(&key, last.mod_revision, i.to_string().as_bytes(), None)
            .await
            .unwrap()
            .unwrap();
        assert!(
            next.mod_revision > o.mod_revision,
            "revisions must increase"
        );
        assert_eq!(next.version, i + 1);
        assert_eq!(next.create_revision, last.create_revision);
        last = next;
    }
    let listing = store.list(&p).await.unwrap();
    assert!(listing.revision >= last.mod_revision);
    // A deletion is a write too.
    assert!(store.delete(&other, None).await.unwrap());
    let after = store.list(&p).await.unwrap();
    assert!(after.revision > listing.revision);
    assert_eq!(after.kvs, vec![last]);
}

/// A lease's expiry deletes its keys (seen by a watch), and only those.
pub(crate) async fn lease_expiry(store: Arc<dyn Store>) {
    let p = ns("lease_expiry");
    let start = store.list(&p).await.unwrap().revision;
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    let k1 = store
        .create(&format!("{p}k1"), b"1", Some(lease))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(k1.lease, lease);
    let k2 = store
        .compare_and_swap(&format!("{p}k2"), 0, b"2", Some(lease))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(k2.lease, lease);
    let plain = store
        .create(&format!("{p}plain"), b"p", None)
        .await
        .unwrap()
        .unwrap();
    let mut w = store.watch(&p, start + 1).await.unwrap();

    assert!(
        wait_gone(store.as_ref(), &k1.key, EXPIRY_WAIT).await,
        "leased key still there {EXPIRY_WAIT:?} after a 1 s lease"
    );
    assert!(wait_gone(store.as_ref(), &k2.key, Duration::from_secs(2)).await);
    assert_eq!(store.get(&plain.key).await.unwrap(), Some(plain));

    let mut deleted = Vec::new();
    let mut last = 0;
    while deleted.len() < 2 {
        let e = recv_event(&mut w).await;
        assert!(e.revision() >= last);
        last = e.revision();
        if let Event::Delete { key, mod_revision } = e {
            assert!(mod_revision > k2.mod_revision);
            deleted.push(key);
        }
    }
    deleted.sort();
    assert_eq!(deleted, vec![k1.key, k2.key]);
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
}

/// keep_alive renews a lease: its key outlives the TTL several times over, then expires.
pub(crate) async fn keep_alive_extends(store: Arc<dyn Store>) {
    let p = ns("keep_alive");
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    let key = format!("{p}k");
    store
        .create(&key, b"v", Some(lease))
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let ttl = store.keep_alive(lease).await.unwrap();
        assert!(ttl >= Duration::from_secs(1), "ttl {ttl:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            store.get(&key).await.unwrap().is_some(),
            "key gone {:?} after grant despite keep-alives",
            started.elapsed()
        );
    }
    assert!(wait_gone(store.as_ref(), &key, EXPIRY_WAIT).await);
}

/// An expired lease is gone: keep_alive and writes report LeaseNotFound, as for unknown ids.
pub(crate) async fn keep_alive_expired(store: Arc<dyn Store>) {
    let p = ns("keep_alive_expired");
    let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    let key = format!("{p}k");
    store
        .create(&key, b"v", Some(lease))
        .await
        .unwrap()
        .unwrap();
    assert!(wait_gone(store.as_ref(), &key, EXPIRY_WAIT).await);
    match store.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(l)) => assert_eq!(l, lease),
        other => panic!("keep_alive of an expired lease: {other:?}"),
    }
    match store.create(&key, b"v", Some(lease)).await {
        Err(StoreError::LeaseNotFound(l)) => assert_eq!(l, lease),
        other => panic!("create with an expired lease: {other:?}"),
    }
    let unknown = 0x3fff_0000_1234_5678;
    assert!(matches!(
        store.keep_alive(unknown).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert_eq!(store.get(&key).await.unwrap(), None);
}

/// Revoking deletes the keys at once; revoking again (or an unknown lease) is fine.
pub(crate) async fn revoke(store: Arc<dyn Store>) {
    let p = ns("revoke");
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let a = store
        .create(&format!("{p}a"), b"a", Some(lease))
        .await
        .unwrap()
        .unwrap();
    let b = store
        .create(&format!("{p}b"), b"b", Some(lease))
        .await
        .unwrap()
        .unwrap();
    // Re-written without the lease: detached, survives.
    let c = store
        .create(&format!("{p}c"), b"c", Some(lease))
        .await
        .unwrap()
        .unwrap();
    let c = store
        .compare_and_swap(&c.key, c.mod_revision, b"c2", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.lease, 0);

    store.revoke_lease(lease).await.unwrap();
    assert_eq!(store.get(&a.key).await.unwrap(), None);
    assert_eq!(store.get(&b.key).await.unwrap(), None);
    assert_eq!(store.get(&c.key).await.unwrap(), Some(c));
    store.revoke_lease(lease).await.unwrap();
    store.revoke_lease(0x3fff_0000_8765_4321).await.unwrap();
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.create(&format!("{p}d"), b"d", Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// A watch from a past revision replays the history in order, then streams live events; a watch
/// from 0 sees only new events; keys outside the prefix never show.
pub(crate) async fn watch_replay_then_live(store: Arc<dyn Store>) {
    let p = ns("watch");
    let dir = format!("{p}w/");
    let a1 = store
        .create(&format!("{dir}a"), b"a1", None)
        .await
        .unwrap()
        .unwrap();
    let b = store
        .create(&format!("{dir}b"), b"b", None)
        .await
        .unwrap()
        .unwrap();
    store
        .create(&format!("{p}outside"), b"x", None)
        .await
        .unwrap()
        .unwrap();
    let a2 = store
        .compare_and_swap(&a1.key, a1.mod_revision, b"a2", None)
        .await
        .unwrap()
        .unwrap();
    assert!(store.delete(&b.key, None).await.unwrap());

    let mut w = store.watch(&dir, a1.mod_revision).await.unwrap();
    assert_eq!(put_of(&recv_event(&mut w).await), &a1);
    assert_eq!(put_of(&recv_event(&mut w).await), &b);
    assert_eq!(put_of(&recv_event(&mut w).await), &a2);
    let del = recv_event(&mut w).await;
    assert!(
        matches!(&del, Event::Delete { key, mod_revision } if *key == b.key && *mod_revision > a2.mod_revision),
        "{del:?}"
    );
    let mut last = del.revision();

    // From now on: a second watch from 0 sees a write made right after it returns, and nothing
    // from before.
    let mut now = store.watch(&dir, 0).await.unwrap();

    // Live, in order, on both.
    for i in 0..20 {
        let key = format!("{dir}live{i:02}");
        store.create(&key, b"l", None).await.unwrap().unwrap();
        store
            .create(&format!("{p}outside{i}"), b"x", None)
            .await
            .unwrap()
            .unwrap();
        let e = recv_event(&mut w).await;
        assert_eq!(e.key(), key);
        assert!(e.revision() > last, "revisions must increase");
        last = e.revision();
        let e2 = recv_event(&mut now).await;
        assert_eq!(e2, e);
    }
    assert_quiet(&mut w).await;
    assert_quiet(&mut now).await;

    // A watch from the middle of the history starts exactly there.
    let mut mid = store.watch(&dir, a2.mod_revision).await.unwrap();
    assert_eq!(put_of(&recv_event(&mut mid).await), &a2);
    assert!(matches!(recv_event(&mut mid).await, Event::Delete { .. }));
}

/// A watch from before a compaction fails with Compacted and ends; re-listing and watching on from
/// the listing's revision works.
pub(crate) async fn watch_after_compaction(store: Arc<dyn Store>) {
    let p = ns("compaction");
    let first = store
        .create(&format!("{p}a"), b"1", None)
        .await
        .unwrap()
        .unwrap();
    let mut last = first.clone();
    for i in 0..5 {
        last = store
            .compare_and_swap(
                &last.key,
                last.mod_revision,
                format!("{i}").as_bytes(),
                None,
            )
            .await
            .unwrap()
            .unwrap();
    }
    store
        .create(&format!("{p}b"), b"b", None)
        .await
        .unwrap()
        .unwrap();
    let rev = store.list(&p).await.unwrap().revision;
    store.compact(rev).await.unwrap();
    // Compacting again, or to an older revision, is not an error.
    store.compact(rev).await.unwrap();
    store.compact(first.mod_revision).await.unwrap();
    assert!(
        store.compact(rev + 1000).await.is_err(),
        "compacting in the future must fail"
    );

    let mut w = store.watch(&p, first.mod_revision).await.unwrap();
    match recv(&mut w).await {
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => {
            assert_eq!(requested, first.mod_revision);
            assert!(compact_revision > first.mod_revision);
            assert!(compact_revision <= rev);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let end = tokio::time::timeout(EVENT_WAIT, w.events.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "the watch must end after Compacted: {end:?}"
    );

    // Re-list, then watch on.
    let listing = store.list(&p).await.unwrap();
    assert_eq!(listing.kvs.len(), 2);
    assert_eq!(listing.kvs[0], last);
    let mut w = store.watch(&p, listing.revision + 1).await.unwrap();
    let c = store
        .create(&format!("{p}c"), b"c", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(put_of(&recv_event(&mut w).await), &c);
}

/// 50 concurrent create-if-absent on one key: exactly one wins.
pub(crate) async fn concurrent_create(store: Arc<dyn Store>) {
    let p = ns("race");
    let key = format!("{p}leader");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(
                async move { (i, store.create(&key, format!("{i}").as_bytes(), None).await) },
            )
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (i, res) = t.await.unwrap();
        if let Some(kv) = res.unwrap() {
            winners.push((i, kv));
        }
    }
    assert_eq!(winners.len(), 1, "exactly one creator must win");
    let (i, kv) = &winners[0];
    let stored = store.get(&key).await.unwrap().unwrap();
    assert_eq!(&stored, kv);
    assert_eq!(stored.value, format!("{i}").as_bytes());
    assert_eq!(stored.version, 1);
}

/// 50 concurrent read-modify-write increments with CAS retry loops: no update is lost.
pub(crate) async fn concurrent_cas_counter(store: Arc<dyn Store>) {
    let p = ns("counter");
    let key = format!("{p}n");
    store.create(&key, b"0", None).await.unwrap().unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut attempts = 0u32;
                loop {
                    attempts += 1;
                    assert!(attempts < 10_000, "CAS livelock");
                    let cur = store.get(&key).await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                    let next = (n + 1).to_string();
                    if store
                        .compare_and_swap(&key, cur.mod_revision, next.as_bytes(), None)
                        .await
                        .unwrap()
                        .is_some()
                    {
                        return attempts;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let kv = store.get(&key).await.unwrap().unwrap();
    assert_eq!(kv.value, b"50");
    assert_eq!(kv.version, 51);
}

/// A transaction with one failing compare writes nothing (no key, no revision, no event); with
/// every compare holding it writes everything.
pub(crate) async fn txn_all_or_nothing(store: Arc<dyn Store>) {
    let p = ns("txn_all_or_nothing");
    let a = store
        .create(&format!("{p}a"), b"a1", None)
        .await
        .unwrap()
        .unwrap();
    let b = store
        .create(&format!("{p}b"), b"b1", None)
        .await
        .unwrap()
        .unwrap();
    let new = format!("{p}new");
    let mut w = store.watch(&p, 0).await.unwrap();
    let writes = vec![
        TxnOp::put(a.key.clone(), b"a2".to_vec(), None),
        TxnOp::put(new.clone(), b"n".to_vec(), None),
        TxnOp::delete(b.key.clone()),
    ];
    // Each of these has exactly one failing compare.
    let failing = [
        vec![
            Compare::mod_revision(a.key.clone(), a.mod_revision),
            Compare::mod_revision(b.key.clone(), b.mod_revision + 1000),
        ],
        vec![
            Compare::mod_revision(a.key.clone(), a.mod_revision),
            Compare::absent(b.key.clone()),
        ],
        vec![
            Compare::mod_revision(new.clone(), 5),
            Compare::mod_revision(a.key.clone(), a.mod_revision),
        ],
        vec![
            Compare::absent(new.clone()),
            Compare::mod_revision(a.key.clone(), b.mod_revision),
        ],
    ];
    for compares in &failing {
        assert_eq!(
            store.txn(compares, &writes).await.unwrap(),
            None,
            "{compares:?} must fail"
        );
    }
    assert_eq!(store.get(&a.key).await.unwrap().as_ref(), Some(&a));
    assert_eq!(store.get(&b.key).await.unwrap().as_ref(), Some(&b));
    assert_eq!(store.get(&new).await.unwrap(), None);
    assert_quiet(&mut w).await;

    // Every compare holds (the same key compared twice is fine): everything is written.
    let compares = [
        Compare::mod_revision(a.key.clone(), a.mod_revision),
        Compare::mod_revision(b.key.clone(), b.mod_revision),
        Compare::absent(new.clone()),
        Compare::mod_revision(a.key.clone(), a.mod_revision),
    ];
    let rev = store
        .txn(&compares, &writes)
        .await
        .unwrap()
        .expect("applied");
    let a2 = store.get(&a.key).await.unwrap().unwrap();
    assert_eq!(
        (a2.value.as_slice(), a2.version, a2.mod_revision),
        (&b"a2"[..], 2, rev)
    );
    assert_eq!(store.get(&b.key).await.unwrap(), None);
    assert_eq!(store.get(&new).await.unwrap().unwrap().mod_revision, rev);
    // The same transaction again: its compares no longer hold.
    assert_eq!(store.txn(&compares, &writes).await.unwrap(), None);

    // Refusals write nothing either: a duplicate key, an empty key.
    let dup = [
        TxnOp::put(format!("{p}dup"), b"1".to_vec(), None),
        TxnOp::delete(format!("{p}dup")),
    ];
    assert!(matches!(
        store.txn(&[], &dup).await,
        Err(StoreError::Other(_))
    ));
    let empty = [
        TxnOp::put(format!("{p}e"), b"1".to_vec(), None),
        TxnOp::put("", b"1".to_vec(), None),
    ];
    assert!(matches!(
        store.txn(&[], &empty).await,
        Err(StoreError::Other(_))
    ));
    assert_eq!(store.get(&format!("{p}dup")).await.unwrap(), None);
    assert_eq!(store.get(&format!("{p}e")).await.unwrap(), None);
}

/// Every key written by one transaction gets the same revision, a new one; creations and updates
/// keep etcd's create_revision and version rules.
pub(crate) async fn txn_one_revision(store: Arc<dyn Store>) {
    let p = ns("txn_one_revision");
    let old = store
        .create(&format!("{p}old"), b"o1", None)
        .await
        .unwrap()
        .unwrap();
    let gone = store
        .create(&format!("{p}gone"), b"g", None)
        .await
        .unwrap()
        .unwrap();
    let before = store.list(&p).await.unwrap().revision;
    let ops: Vec<TxnOp> = (0..5)
        .map(|i| TxnOp::put(format!("{p}k{i}"), format!("v{i}").into_bytes(), None))
        .chain([
            TxnOp::put(old.key.clone(), b"o2".to_vec(), None),
            TxnOp::delete(gone.key.clone()),
        ])
        .collect();
    let rev = store
        .txn(
            &[Compare::mod_revision(old.key.clone(), old.mod_revision)],
            &ops,
        )
        .await
        .unwrap()
        .expect("applied");
    assert!(rev > before);
    let listing = store.list(&p).await.unwrap();
    assert!(listing.revision >= rev);
    assert_eq!(listing.kvs.len(), 6);
    for i in 0..5 {
        let kv = store.get(&format!("{p}k{i}")).await.unwrap().unwrap();
        assert_eq!(kv.value, format!("v{i}").as_bytes());
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (rev, rev, 1)
        );
    }
    let old2 = store.get(&old.key).await.unwrap().unwrap();
    assert_eq!(old2.value, b"o2");
    assert_eq!(
        (old2.create_revision, old2.mod_revision, old2.version),
        (old.create_revision, rev, 2)
    );
    assert_eq!(store.get(&gone.key).await.unwrap(), None);
    // The next write gets a later revision.
    let after = store
        .create(&format!("{p}after"), b"x", None)
        .await
        .unwrap()
        .unwrap();
    assert!(after.mod_revision > rev);
}

/// A watch sees every event of a transaction, in the order of its ops, all with its revision.
pub(crate) async fn txn_watch(store: Arc<dyn Store>) {
    let p = ns("txn_watch");
    let x = store
        .create(&format!("{p}x"), b"x", None)
        .await
        .unwrap()
        .unwrap();
    let mut live = store.watch(&p, 0).await.unwrap();
    let ops = [
        TxnOp::put(format!("{p}c"), b"c".to_vec(), None),
        TxnOp::delete(x.key.clone()),
        TxnOp::put(format!("{p}a"), b"a".to_vec(), None),
        TxnOp::delete(format!("{p}missing")),
        TxnOp::put(format!("{p}b"), b"b".to_vec(), None),
    ];
    let rev = store.txn(&[], &ops).await.unwrap().expect("applied");
    let follow = store
        .create(&format!("{p}z"), b"z", None)
        .await
        .unwrap()
        .unwrap();
    // Live, and replayed from the history.
    let mut replay = store.watch(&p, rev).await.unwrap();
    for w in [&mut live, &mut replay] {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let e = recv_event(w).await;
            assert_eq!(e.revision(), rev, "{e:?}");
            seen.push(match &e {
                Event::Put(kv) => format!("put {}", kv.key),
                Event::Delete { key, .. } => format!("delete {key}"),
            });
        }
        assert_eq!(
            seen,
            vec![
                format!("put {p}c"),
                format!("delete {}", x.key),
                format!("put {p}a"),
                format!("put {p}b"),
            ]
        );
        assert_eq!(put_of(&recv_event(w).await), &follow);
        assert_quiet(w).await;
    }
}

/// A put of a transaction attaches the key to its lease (revoking it deletes the key); an unknown
/// lease refuses the whole transaction.
pub(crate) async fn txn_lease(store: Arc<dyn Store>) {
    let p = ns("txn_lease");
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let (leased, plain) = (format!("{p}leased"), format!("{p}plain"));
    let rev = store
        .txn(
            &[Compare::absent(leased.clone())],
            &[
                TxnOp::put(leased.clone(), b"l".to_vec(), Some(lease)),
                TxnOp::put(plain.clone(), b"p".to_vec(), None),
            ],
        )
        .await
        .unwrap()
        .expect("applied");
    let kv = store.get(&leased).await.unwrap().unwrap();
    assert_eq!((kv.lease, kv.mod_revision), (lease, rev));
    assert_eq!(store.get(&plain).await.unwrap().unwrap().lease, 0);

    store.revoke_lease(lease).await.unwrap();
    assert_eq!(store.get(&leased).await.unwrap(), None);
    assert!(store.get(&plain).await.unwrap().is_some());

    // The lease is gone: a transaction using it is refused, and writes nothing.
    let other = format!("{p}other");
    match store
        .txn(
            &[],
            &[
                TxnOp::put(other.clone(), b"o".to_vec(), None),
                TxnOp::put(leased.clone(), b"l".to_vec(), Some(lease)),
            ],
        )
        .await
    {
        Err(StoreError::LeaseNotFound(l)) => assert_eq!(l, lease),
        r => panic!("txn with a revoked lease: {r:?}"),
    }
    assert_eq!(store.get(&other).await.unwrap(), None);
    assert_eq!(store.get(&leased).await.unwrap(), None);
}

/// Deleting a missing key in a transaction is fine; a transaction that changes nothing makes no
/// revision.
pub(crate) async fn txn_delete_missing(store: Arc<dyn Store>) {
    let p = ns("txn_delete_missing");
    let missing = format!("{p}missing");
    let before = store.list(&p).await.unwrap().revision;
    let mut w = store.watch(&p, 0).await.unwrap();
    let rev = store
        .txn(
            &[Compare::absent(missing.clone())],
            &[TxnOp::delete(missing.clone())],
        )
        .await
        .unwrap()
        .expect("applied");
    assert!(rev >= before);
    assert_quiet(&mut w).await;
    assert_eq!(store.get(&missing).await.unwrap(), None);
    // With a put beside it, the put happens.
    let k = format!("{p}k");
    let rev = store
        .txn(
            &[],
            &[
                TxnOp::delete(missing.clone()),
                TxnOp::put(k.clone(), b"k".to_vec(), None),
            ],
        )
        .await
        .unwrap()
        .expect("applied");
    let e = recv_event(&mut w).await;
    assert_eq!((e.key(), e.revision()), (k.as_str(), rev));
    assert_quiet(&mut w).await;
    // No compares and no ops: applied, nothing changes.
    assert!(store.txn(&[], &[]).await.unwrap().unwrap() >= rev);
}

/// 50 concurrent "compare the token, bump it, write my node" transactions with retries on one
/// shared token key: each applies exactly once, and no update is lost.
pub(crate) async fn txn_concurrent(store: Arc<dyn Store>) {
    let p = ns("txn_concurrent");
    let token = format!("{p}token");
    store.create(&token, b"0", None).await.unwrap().unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            let (token, node) = (token.clone(), format!("{p}nodes/{i:02}"));
            tokio::spawn(async move {
                let mut attempts = 0u32;
                loop {
                    attempts += 1;
                    assert!(attempts < 10_000, "txn livelock");
                    let cur = store.get(&token).await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                    let ops = [
                        TxnOp::put(token.clone(), (n + 1).to_string().into_bytes(), None),
                        TxnOp::put(node.clone(), n.to_string().into_bytes(), None),
                    ];
                    let compares = [
                        Compare::mod_revision(token.clone(), cur.mod_revision),
                        Compare::absent(node.clone()),
                    ];
                    if let Some(rev) = store.txn(&compares, &ops).await.unwrap() {
                        return (n, rev);
                    }
                }
            })
        })
        .collect();
    let mut applied = Vec::new();
    for t in tasks {
        applied.push(t.await.unwrap());
    }
    let kv = store.get(&token).await.unwrap().unwrap();
    assert_eq!(kv.value, b"50");
    assert_eq!(kv.version, 51);
    // Each task saw a different count (0..50) and got a different revision; its node key has
    // that count and that revision.
    let nodes = store.list(&format!("{p}nodes/")).await.unwrap().kvs;
    assert_eq!(nodes.len(), 50);
    let mut counts: Vec<u64> = applied.iter().map(|(n, _)| *n).collect();
    counts.sort_unstable();
    assert_eq!(counts, (0..50).collect::<Vec<_>>());
    let mut revs: Vec<i64> = applied.iter().map(|(_, r)| *r).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 50);
    for (i, node) in nodes.iter().enumerate() {
        let (n, rev) = applied[i];
        assert_eq!(node.key, format!("{p}nodes/{i:02}"));
        assert_eq!(node.value, n.to_string().as_bytes());
        assert_eq!((node.mod_revision, node.version), (rev, 1));
    }
}

type Case = fn(Arc<dyn Store>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        /// Every case, in the order a shared store runs them (compaction last).
        const CASES: &[(&str, Case)] = &[$((stringify!($name), |s| Box::pin($name(s)))),*];

        /// Each case on its own embedded store.
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _dir) = super::embedded_store();
                    super::$name(store).await;
                }
            )*
        }
    };
}

suite!(
    get_list_create,
    compare_and_swap,
    delete,
    revisions_and_versions,
    lease_expiry,
    keep_alive_extends,
    keep_alive_expired,
    revoke,
    watch_replay_then_live,
    concurrent_create,
    concurrent_cas_counter,
    txn_all_or_nothing,
    txn_one_revision,
    txn_watch,
    txn_lease,
    txn_delete_missing,
    txn_concurrent,
    watch_after_compaction,
);

fn embedded_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    (Arc::new(store), dir)
}

// ---------------------------------------------------------------------------------------------
// The embedded store across a restart.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let lease = store.grant_lease(Duration::from_secs(3)).await.unwrap();
    let leased = store
        .create("/r/leased", b"l", Some(lease))
        .await
        .unwrap()
        .unwrap();
    let plain = store.create("/r/plain", b"p", None).await.unwrap().unwrap();
    store.close().await.unwrap();

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get("/r/leased").await.unwrap(), Some(leased.clone()));
    assert_eq!(store.get("/r/plain").await.unwrap(), Some(plain.clone()));
    // The history survived too, and revisions go on from where they were.
    let mut w = store.watch("/r/", leased.mod_revision).await.unwrap();
    assert_eq!(put_of(&recv_event(&mut w).await), &leased);
    assert_eq!(put_of(&recv_event(&mut w).await), &plain);
    let after = store.create("/r/after", b"a", None).await.unwrap().unwrap();
    assert!(after.mod_revision > plain.mod_revision);
    assert_eq!(put_of(&recv_event(&mut w).await), &after);
    // The lease is still alive, and still expires when not kept alive.
    assert_eq!(
        store.keep_alive(lease).await.unwrap(),
        Duration::from_secs(3)
    );
    assert!(wait_gone(&store, "/r/leased", EXPIRY_WAIT).await);
    assert!(matches!(
        recv_event(&mut w).await,
        Event::Delete { key, .. } if key == "/r/leased"
    ));
    assert_eq!(store.get("/r/plain").await.unwrap(), Some(plain));
    // Dropped (not closed), then reopened: the file is released.
    drop(w);
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    assert!(store.get("/r/after").await.unwrap().is_some());
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// etcd, with certificates from meshd's PKI.

/// A running etcd, killed when dropped (also when the test fails).
struct EtcdProcess {
    child: std::process::Child,
    endpoint: String,
    dir: tempfile::TempDir,
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EtcdProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

/// PEM files issued by meshd's PKI for etcd and its clients.
struct EtcdPki {
    dir: PathBuf,
    /// The client credentials etcd accepts.
    client: EtcdTls,
    /// A client certificate from another CA (with that CA).
    foreign: EtcdTls,
}

fn write_pem(path: &Path, text: &str, mode: u32) {
    pki::store::write_atomic(path, text.as_bytes(), mode).unwrap();
}

fn issue_etcd_pki(dir: &Path) -> EtcdPki {
    use pki::inventory::{control_plane_entries, issue_entry, CaSet, ClusterSettings};
    use pki::keys::KeyAlgorithm;

    let now = SystemTime::now();
    let alg = KeyAlgorithm::EcdsaP256;
    let settings = ClusterSettings {
        cluster_name: "conformance".into(),
        node_name: "etcd-test".into(),
        advertise_address: "127.0.0.1".parse().unwrap(),
        apiserver_port: 6443,
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        cluster_domain: "cluster.local".into(),
        apiserver_cert_sans: vec![],
        etcd_peer_addresses: vec![],
        api_port: 7443,
        key_algorithm: alg,
        leaf_lifetime_secs: 86_400,
        ca_lifetime_secs: 2 * 86_400,
    };
    let entries = control_plane_entries(&settings).unwrap();
    let entry = |id: &str| {
        entries
            .iter()
            .find(|e| e.id == id)
            .unwrap_or_else(|| panic!("no inventory entry {id}"))
    };
    let lifetime = Duration::from_secs(settings.ca_lifetime_secs);
    let cas = CaSet::create(alg, lifetime, now).unwrap();
    let ca_pem = cas.etcd.cert_pem().to_string();
    write_pem(&dir.join("ca.crt"), &ca_pem, pki::store::CERT_MODE);
    let mut client = None;
    for (id, base) in [
        ("etcd-server", "server"),
        ("etcd-peer", "peer"),
        ("meshd-etcd-client", "client"),
    ] {
        let issued = issue_entry(entry(id), &cas, alg, settings.leaf_validity(), now).unwrap();
        let key = issued.key.to_pem();
        write_pem(
            &dir.join(format!("{base}.crt")),
            &issued.cert.pem,
            pki::store::CERT_MODE,
        );
        write_pem(
            &dir.join(format!("{base}.key")),
            key.expose(),
            pki::store::KEY_MODE,
        );
        if base == "client" {
            client = Some(EtcdTls {
                ca_pem: ca_pem.clone(),
                cert_pem: issued.cert.pem.clone(),
                key_pem: zeroize::Zeroizing::new(key.expose().to_string()),
            });
        }
    }
    let other = CaSet::create(alg, lifetime, now).unwrap();
    let issued = issue_entry(
        entry("meshd-etcd-client"),
        &other,
        alg,
        settings.leaf_validity(),
        now,
    )
    .unwrap();
    EtcdPki {
        dir: dir.to_path_buf(),
        client: client.unwrap(),
        foreign: EtcdTls {
            ca_pem: other.etcd.cert_pem().to_string(),
            cert_pem: issued.cert.pem,
            key_pem: zeroize::Zeroizing::new(issued.key.to_pem().expose().to_string()),
        },
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts etcd with client and peer mTLS on free loopback ports and waits until it answers.
async fn start_etcd(pki: &EtcdPki) -> EtcdProcess {
    use std::process::{Command, Stdio};
    if Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        panic!("etcd is not installed: install Debian's etcd-server (deploy/install-deps.sh)");
    }
    let f = |name: &str| pki.dir.join(name).display().to_string();
    let mut last_log = String::new();
    for _attempt in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (client_port, peer_port) = (free_port(), free_port());
        let client_url = format!("https://127.0.0.1:{client_port}");
        let peer_url = format!("https://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "conformance"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("conformance={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--cert-file",
                &f("server.crt"),
                "--key-file",
                &f("server.key"),
            ])
            .args(["--trusted-ca-file", &f("ca.crt"), "--client-cert-auth"])
            .args([
                "--peer-cert-file",
                &f("peer.crt"),
                "--peer-key-file",
                &f("peer.key"),
            ])
            .args([
                "--peer-trusted-ca-file",
                &f("ca.crt"),
                "--peer-client-cert-auth",
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let mut etcd = EtcdProcess {
            child,
            endpoint: client_url,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if etcd.child.try_wait().unwrap().is_some() {
                break; // exited: a port was taken in between, most likely; try again
            }
            let connected = EtcdStore::connect_with_timeout(
                std::slice::from_ref(&etcd.endpoint),
                Some(pki.client.clone()),
                Duration::from_secs(2),
            )
            .await;
            // Up, and a linearizable read works (a leader is elected).
            if let Ok(store) = connected {
                if store.get("/ready").await.is_ok() {
                    return etcd;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        last_log = etcd.log();
    }
    panic!("etcd did not start; its log:\n{last_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_conformance() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = issue_etcd_pki(pki_dir.path());
    let key_mode = std::os::unix::fs::MetadataExt::mode(
        &std::fs::metadata(pki_dir.path().join("client.key")).unwrap(),
    ) & 0o777;
    assert_eq!(key_mode, 0o600);
    let etcd = start_etcd(&pki).await;
    let endpoints = vec![etcd.endpoint.clone()];

    let store = EtcdStore::connect(&endpoints, Some(pki.client.clone()))
        .await
        .unwrap();
    assert_eq!(store.describe(), format!("etcd:{}", etcd.endpoint));
    let store: Arc<dyn Store> = Arc::new(store);
    for (name, case) in CASES {
        eprintln!("etcd conformance: {name}");
        let started = Instant::now();
        case(store.clone()).await;
        eprintln!("etcd conformance: {name} ok ({:?})", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_refuses_clients_without_the_right_certificate() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = issue_etcd_pki(pki_dir.path());
    let etcd = start_etcd(&pki).await;
    let endpoints = vec![etcd.endpoint.clone()];
    let short = Duration::from_secs(2);
    let refused = |what: &str, r: Result<EtcdStore, StoreError>, started: Instant| {
        match r {
            Err(StoreError::Unavailable(_)) => {}
            Err(e) => panic!("{what}: expected Unavailable, got {e}"),
            Ok(_) => panic!("{what}: etcd accepted the client"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{what}: took {:?}",
            started.elapsed()
        );
    };

    // The etcd CA, but no client certificate.
    let ca_only = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(&pki.client.ca_pem))
        .timeout(short);
    let t = Instant::now();
    let r = EtcdStore::connect_with_options(&endpoints, Some(ca_only), short).await;
    refused("no client certificate", r, t);

    // A client certificate from another CA.
    let foreign_client = EtcdTls {
        ca_pem: pki.client.ca_pem.clone(),
        ..pki.foreign.clone()
    };
    let t = Instant::now();
    let r = EtcdStore::connect_with_timeout(&endpoints, Some(foreign_client), short).await;
    refused("foreign client certificate", r, t);

    // The right client, but trusting another CA for the server: meshd refuses etcd.
    let wrong_trust = EtcdTls {
        ca_pem: pki.foreign.ca_pem.clone(),
        ..pki.client.clone()
    };
    let t = Instant::now();
    let r = EtcdStore::connect_with_timeout(&endpoints, Some(wrong_trust), short).await;
    refused("server from an untrusted CA", r, t);

    // Plain HTTP to the TLS port.
    let plain = vec![etcd.endpoint.replace("https://", "http://")];
    let t = Instant::now();
    let r = EtcdStore::connect_with_timeout(&plain, None, short).await;
    refused("plain HTTP", r, t);

    // And the right client still gets in.
    EtcdStore::connect_with_timeout(&endpoints, Some(pki.client.clone()), short)
        .await
        .unwrap();
}
