//! Cluster state: a small key-value [`Store`] trait with two backends, an embedded single-file
//! database ([`embedded::EmbeddedStore`], redb) and etcd ([`etcd::EtcdStore`], `etcd-client` over
//! mTLS). Semantics follow etcd's, so the two are interchangeable and one conformance suite runs
//! against both:
//!
//! * every write bumps a store-wide `revision`; each key carries `create_revision`, `mod_revision` and
//!   `version` (number of writes since creation);
//! * conditional writes compare a key's `mod_revision` (0 = the key must not exist);
//! * a transaction ([`Store::txn`]) applies several writes atomically, in one revision, when all of
//!   its comparisons hold;
//! * leases have a TTL; when a lease expires (or is revoked) every key attached to it is deleted;
//! * a watch streams the events of a prefix from a revision on; asking for a revision older than the
//!   compacted history yields [`StoreError::Compacted`], and the caller re-lists.

use std::time::Duration;

use async_trait::async_trait;

#[cfg(test)]
mod conformance;
pub mod embedded;
pub mod etcd;

/// A lease id (etcd's, or the embedded store's own).
pub type LeaseId = i64;

/// One key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: i64,
    /// Revision of the last write to the key.
    pub mod_revision: i64,
    /// Number of writes since creation (1 after creation).
    pub version: i64,
    /// The lease the key is attached to (0 = none).
    pub lease: LeaseId,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A key was created or updated (its new state).
    Put(KeyValue),
    /// A key was deleted (explicitly, or because its lease expired), at `mod_revision`.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

impl Event {
    /// The key concerned.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// A condition of a transaction ([`Store::txn`]): the key's `mod_revision` equals `mod_revision`
/// (0 = the key must not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// The `mod_revision` the key must have; 0: the key must not exist.
    pub mod_revision: i64,
}

impl Compare {
    /// The key's `mod_revision` must be `mod_revision` (0: the key must not exist).
    pub fn mod_revision(key: impl Into<String>, mod_revision: i64) -> Self {
        Compare {
            key: key.into(),
            mod_revision,
        }
    }

    /// The key must not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Self::mod_revision(key, 0)
    }
}

/// A write of a transaction ([`Store::txn`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// Writes `key` (creating it or updating it), attached to `lease` (`None` or `Some(0)`: no
    /// lease; like etcd, rewriting a key without a lease detaches it from its old one).
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// The lease to attach the key to.
        lease: Option<LeaseId>,
    },
    /// Deletes `key` (nothing happens when it does not exist).
    Delete {
        /// The key.
        key: String,
    },
}

impl TxnOp {
    /// A [`TxnOp::Put`].
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: Option<LeaseId>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    /// A [`TxnOp::Delete`].
    pub fn delete(key: impl Into<String>) -> Self {
        TxnOp::Delete { key: key.into() }
    }

    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
        }
    }
}

/// A prefix listing with the store revision it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store's revision at the time of the read (watch from `revision + 1` to follow on).
    pub revision: i64,
}

/// A stream of watch events. Dropping it cancels the watch.
pub struct Watch {
    /// Events in revision order. The channel closes when the watch ends; an `Err` item
    /// (e.g. [`StoreError::Compacted`]) ends it too.
    pub events: tokio::sync::mpsc::Receiver<Result<Event, StoreError>>,
}

/// Errors of the stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested watch revision was compacted away; re-list and watch from the listing's revision.
    #[error(
        "revision {requested} has been compacted (oldest available: {compact_revision}); re-list"
    )]
    Compacted {
        /// What was asked for.
        requested: i64,
        /// The compaction point.
        compact_revision: i64,
    },
    /// The lease does not exist (expired or revoked).
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The store could not be reached or answered with an error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's data is corrupt or not meshd's.
    #[error("store corrupt: {0}")]
    Corrupt(String),
    /// Any other failure, with context.
    #[error("{0}")]
    Other(String),
}

/// The operations the rest of meshd needs from its state store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key (a linearizable read on etcd).
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Lists every key starting with `prefix`, in key order, with the revision of the read.
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;

    /// Creates `key` only if it does not exist: `Ok(Some(kv))` with the created key, or `Ok(None)`
    /// when it already existed.
    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<KeyValue>, StoreError> {
        self.compare_and_swap(key, 0, value, lease).await
    }

    /// Writes `key` only if its `mod_revision` is `expected` (0: only if absent). Returns the new
    /// state on success, `Ok(None)` when the comparison failed.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: i64,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<KeyValue>, StoreError>;

    /// Deletes `key` only if its `mod_revision` is `expected` (`None`: unconditionally). Returns
    /// whether a key was deleted.
    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<bool, StoreError>;

    /// Applies every op of `ops` atomically, in one revision, if every compare of `compares` holds
    /// (etcd's `Txn`, success branch only). `Ok(Some(revision))` when applied: the store's revision
    /// after the transaction, which is the `mod_revision` of every key it wrote (and of its delete
    /// events); a watch sees the transaction's events in the order of `ops`, all with that
    /// revision. A transaction that changed nothing (no ops, or only deletions of missing keys)
    /// does not create a revision and returns the current one. `Ok(None)` when a compare failed:
    /// nothing was written.
    ///
    /// Errors: [`StoreError::LeaseNotFound`] when a put's lease does not exist (nothing written;
    /// only checked when the compares hold); [`StoreError::Other`] for an empty key or a key
    /// written by more than one op (etcd refuses duplicate keys in a transaction), and on etcd for
    /// more compares or ops than its `--max-txn-ops` (128 by default).
    async fn txn(&self, compares: &[Compare], ops: &[TxnOp]) -> Result<Option<i64>, StoreError>;

    /// Grants a lease with `ttl` (rounded up to whole seconds, at least 1 s).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease for its full TTL. [`StoreError::LeaseNotFound`] when it already expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Revokes a lease, deleting its keys. Revoking an unknown lease is not an error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Watches `prefix` from `from_revision` (inclusive; 0 = from now on).
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, StoreError>;

    /// Discards history before `revision` (watches from older revisions then fail with
    /// [`StoreError::Compacted`]).
    async fn compact(&self, revision: i64) -> Result<(), StoreError>;

    /// A short description for logs and `meshd status` (`embedded:/path`, `etcd:https://...`).
    fn describe(&self) -> String;
}
