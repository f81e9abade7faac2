//! The embedded store: one redb file in the data directory, for single-node clusters and tests.
//!
//! Tables of the file:
//! * `kv`: key → record (value, create and mod revision, version, lease), in a versioned binary
//!   encoding (a version byte first);
//! * `meta`: the format version, the current revision, the compact revision (oldest revision still in
//!   the history) and the next lease id;
//! * `leases`: lease id → TTL (seconds) and absolute expiry (unix milliseconds), so a lease survives a
//!   restart;
//! * `lease_keys`: lease id → the keys attached to it, so expiry finds them without a scan;
//! * `events`: revision → the events of that revision (the watch history), trimmed by
//!   [`Store::compact`] and automatically to the last [`DEFAULT_HISTORY`] revisions.
//!
//! Writes go through one writer thread, with group commit. Every mutating call becomes a job (a
//! re-runnable closure over the write transaction) sent to the thread, which drains up to
//! [`MAX_BATCH`] pending jobs and runs them in arrival order inside one redb write transaction, each
//! job in its own revision (as in etcd, every mutating call is one revision; a job sees the writes
//! of the jobs before it), commits once, durably, answers every job, and then publishes each job's
//! events on a broadcast channel in revision order. Concurrent writers so share one fsync instead
//! of queueing for one each. Writers are serialized (a compare-and-swap or a transaction is
//! atomic) and live watchers see commits in revision order. A job that fails after writing aborts
//! the whole transaction, and the batch's jobs are then run again one by one, each in its own
//! transaction: one bad request never fails the others and no partial job is ever committed (a job
//! that fails before writing anything, e.g. a keep-alive of an unknown lease, just answers its
//! error and the batch goes on). No write is acknowledged before its durable commit.
//!
//! A watch replays the history from its start revision, then follows the broadcast (it subscribes
//! before reading the history and skips what it already delivered, so there is no gap and no
//! duplicate; a watcher that falls behind the broadcast goes back to the history).
//!
//! A background task (stopped when the store is dropped or [`EmbeddedStore::close`]d) deletes the
//! keys of expired leases every [`REAP_INTERVAL`], one writer job (one revision) per lease. Like etcd
//! after a leader change, opening the store renews every lease for its full TTL, so clients get the
//! chance to keep their leases alive after a restart instead of losing their keys to the downtime.
//!
//! Reads run in `tokio::task::spawn_blocking`.

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    Database, MultimapTableDefinition, MultimapTableHandle, ReadableDatabase, ReadableTable,
    TableDefinition, TableHandle, WriteTransaction,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{Compare, Event, KeyValue, LeaseId, Listing, Store, StoreError, TxnOp, Watch};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, &[u8]> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<i64, &str> = MultimapTableDefinition::new("lease_keys");
const EVENTS: TableDefinition<i64, &[u8]> = TableDefinition::new("events");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_COMPACT: &str = "compact_revision";
const META_NEXT_LEASE: &str = "next_lease";

/// The file format this code writes and reads.
const FORMAT: i64 = 1;
/// Version byte of every encoded record.
const RECORD_V1: u8 = 1;

/// How many revisions of history the store keeps for watches by default.
pub const DEFAULT_HISTORY: i64 = 10_000;
/// How often expired leases are looked for.
pub const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// How long [`EmbeddedStore::open`] waits for a previous holder of the file (e.g. a meshd that is
/// still exiting) before reporting it as in use.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// Capacity of the live event broadcast (commits); a watcher that falls further behind replays from
/// the history.
const BROADCAST_CAPACITY: usize = 1024;
/// Capacity of each watch's channel (events).
const WATCH_BUFFER: usize = 256;
/// Commits read from the history per read transaction when replaying.
const REPLAY_CHUNK: usize = 256;
/// At most this many jobs share one write transaction (one durable commit).
pub const MAX_BATCH: usize = 128;

/// The embedded state store. See the [module documentation](self).
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// Feeds the writer thread (the lease-expiry task holds a weak reference); dropping it lets
    /// the thread finish the queued jobs and exit.
    committer: Option<Arc<Committer>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Dropping it stops the lease-expiry task.
    shutdown: Option<oneshot::Sender<()>>,
    reaper: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// One committed revision and its events, as broadcast to live watchers.
#[derive(Debug)]
struct Commit {
    revision: i64,
    events: Vec<Event>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// The committed revisions, published by the writer thread in revision order.
    events: broadcast::Sender<Arc<Commit>>,
    history: i64,
}

impl EmbeddedStore {
    /// Opens (or creates, mode `0600`) the store file at `path`, e.g. `<data dir>/state.redb`.
    ///
    /// Blocking: call it at startup (it reads the whole file to verify it). It must be called within
    /// a tokio runtime, which runs the lease-expiry task; writes are made by a thread of the store's
    /// own (see the [module documentation](self)).
    ///
    /// Errors: [`StoreError::Corrupt`] (naming the path) when the file is damaged or not a meshd
    /// store — it is never replaced by an empty one; [`StoreError::Unavailable`] when another process
    /// (another meshd) holds the file; [`StoreError::Other`] for a file readable by group or others.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_history(path, DEFAULT_HISTORY)
    }

    /// [`open`](Self::open), keeping `history` revisions of watch history (at least 1).
    pub fn open_with_history(path: &Path, history: i64) -> Result<Self, StoreError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Other(format!(
                "{}: the embedded store must be opened within a tokio runtime",
                path.display()
            ))
        })?;
        let db = open_database(path)?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let inner = Arc::new(Inner {
            db,
            path: path.to_path_buf(),
            events,
            history: history.max(1),
        });
        inner.init(now_ms())?;
        let (jobs, queue) = std_mpsc::channel();
        let weak = Arc::downgrade(&inner);
        let writer = std::thread::Builder::new()
            .name("meshd-store-writer".into())
            .spawn(move || writer_thread(weak, queue))
            .map_err(|e| {
                StoreError::Other(format!("cannot start the store's writer thread: {e}"))
            })?;
        let committer = Arc::new(Committer { jobs });
        let (shutdown, stop) = oneshot::channel();
        let reaper = handle.spawn(reap_leases(
            Arc::downgrade(&inner),
            Arc::downgrade(&committer),
            stop,
        ));
        Ok(EmbeddedStore {
            inner,
            committer: Some(committer),
            writer: Some(writer),
            shutdown: Some(shutdown),
            reaper: Some(reaper),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops the lease-expiry task and the writer thread (once the writes already queued are
    /// committed) and closes the file, waiting (up to 5 s) for operations still in flight. Watches
    /// end. Dropping the store does the same without waiting.
    pub async fn close(mut self) -> Result<(), StoreError> {
        drop(self.shutdown.take());
        if let Some(reaper) = self.reaper.take() {
            let _ = reaper.await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        // The writer thread finishes the queued jobs, then exits.
        drop(self.committer.take());
        if let Some(writer) = self.writer.take() {
            while !writer.is_finished() {
                if Instant::now() > deadline {
                    return Err(StoreError::Other(format!(
                        "{}: store writes still in progress after 5 s; not closed",
                        self.inner.path.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if writer.join().is_err() {
                return Err(StoreError::Other(format!(
                    "{}: the store's writer thread failed",
                    self.inner.path.display()
                )));
            }
        }
        let mut inner = self.inner;
        loop {
            match Arc::try_unwrap(inner) {
                Ok(inner) => {
                    let path = inner.path.clone();
                    return inner.db.close().map_err(|e| db_error(&path, e));
                }
                Err(still_shared) => {
                    if Instant::now() > deadline {
                        return Err(StoreError::Other(format!(
                            "{}: store still in use after 5 s; not closed",
                            still_shared.path.display()
                        )));
                    }
                    inner = still_shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Runs `op` as one writer job: its own revision, in a durable commit shared with the jobs
    /// queued beside it. `op` may run more than once (a batch that fails is run again job by job);
    /// only one run is ever committed.
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let committer = self
            .committer
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        committer.submit(op)?.get().await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Other(format!("store task failed: {e}")))?
    }
}

/// Creates the file `0600` if needed, checks its mode and opens it with redb (integrity checked).
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let shown = path.display();
    let created = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {
            // Make the new directory entry durable, like the commits that will fill the file.
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StoreError::Other(format!("{}: fsync: {e}", dir.display())))?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Err(StoreError::Other(format!(
                "{shown}: cannot create the store file: {e}"
            )))
        }
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| StoreError::Other(format!("{shown}: cannot read the store file: {e}")))?;
    if !meta.is_file() {
        return Err(StoreError::Other(format!("{shown}: not a regular file")));
    }
    if !created && meta.len() == 0 {
        // redb would initialize an empty file: never start over silently on a store that was
        // truncated. (A crash right after the very first creation also leaves this.)
        return Err(StoreError::Corrupt(format!(
            "{shown} is empty; if this data directory never held cluster state, delete the file; \
             otherwise restore it from a backup"
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Other(format!(
            "{shown}: the store file has mode {mode:04o}; it must not be accessible by group or \
             others (chmod 600 {shown})"
        )));
    }
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(true);
        // redb may panic (debug assertions) on a file damaged outside redb: report it as corrupt.
        let opened = std::panic::catch_unwind(AssertUnwindSafe(|| builder.create(path)));
        match opened {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen))
            | Ok(Err(redb::DatabaseError::LockProtocolMismatch)) => {
                if Instant::now() >= deadline {
                    return Err(StoreError::Unavailable(format!(
                        "{shown} is in use by another process (another meshd running with this \
                         data directory?); stop it, or use another data directory"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(Err(e)) => return Err(db_error(path, e)),
            Err(_) => {
                return Err(StoreError::Corrupt(format!(
                    "{shown}: the store file is damaged (the database could not be opened); \
                     restore it from a backup or move it aside to start empty"
                )))
            }
        }
    }
}

/// Maps a redb error: damage to [`StoreError::Corrupt`], I/O to [`StoreError::Unavailable`].
fn db_error(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    let shown = path.display();
    match e {
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. } => StoreError::Corrupt(format!(
            "{shown}: {e}; restore the file from a backup or move it aside to start empty"
        )),
        redb::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Corrupt(format!(
                "{shown}: {io}; restore the file from a backup or move it aside to start empty"
            ))
        }
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            StoreError::Unavailable(format!(
                "{shown} is in use by another process (another meshd?): {e}"
            ))
        }
        redb::Error::Io(_) | redb::Error::PreviousIo => {
            StoreError::Unavailable(format!("{shown}: I/O error: {e}"))
        }
        other => StoreError::Other(format!("{shown}: {other}")),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// TTL in whole seconds: rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX / 1000)
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Other("empty key".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encodings. Every record starts with a version byte; anything read from disk is checked.

/// The stored state of one key (its name is the table key).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: LeaseId,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(33 + self.value.len());
        out.push(RECORD_V1);
        for n in [
            self.create_revision,
            self.mod_revision,
            self.version,
            self.lease,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        r.version()?;
        let create_revision = r.i64()?;
        let mod_revision = r.i64()?;
        let version = r.i64()?;
        let lease = r.i64()?;
        Ok(Record {
            value: r.rest().to_vec(),
            create_revision,
            mod_revision,
            version,
            lease,
        })
    }

    fn into_kv(self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// A lease: its TTL and absolute expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LeaseRecord {
    ttl_secs: i64,
    expiry_ms: i64,
}

impl LeaseRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.ttl_secs.to_le_bytes());
        out.extend_from_slice(&self.expiry_ms.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        r.version()?;
        let ttl_secs = r.i64()?;
        let expiry_ms = r.i64()?;
        r.end()?;
        if ttl_secs < 1 {
            return Err(format!("lease TTL {ttl_secs} s"));
        }
        Ok(LeaseRecord {
            ttl_secs,
            expiry_ms,
        })
    }

    fn expired(&self, now_ms: i64) -> bool {
        self.expiry_ms <= now_ms
    }
}

const EVENT_PUT: u8 = 0;
const EVENT_DELETE: u8 = 1;

fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = vec![RECORD_V1];
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        match e {
            Event::Put(kv) => {
                out.push(EVENT_PUT);
                put_bytes(&mut out, kv.key.as_bytes());
                for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
                put_bytes(&mut out, &kv.value);
            }
            Event::Delete { key, mod_revision } => {
                out.push(EVENT_DELETE);
                put_bytes(&mut out, key.as_bytes());
                out.extend_from_slice(&mod_revision.to_le_bytes());
            }
        }
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn decode_events(bytes: &[u8]) -> Result<Vec<Event>, String> {
    let mut r = Reader::new(bytes);
    r.version()?;
    let n = r.u32()? as usize;
    // Each event takes at least 13 bytes: never trust the count for an allocation.
    let mut events = Vec::with_capacity(n.min(bytes.len() / 13));
    for _ in 0..n {
        let tag = r.take(1)?[0];
        let key = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "key not UTF-8")?;
        match tag {
            EVENT_PUT => {
                let create_revision = r.i64()?;
                let mod_revision = r.i64()?;
                let version = r.i64()?;
                let lease = r.i64()?;
                let value = r.bytes()?.to_vec();
                events.push(Event::Put(KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision,
                    version,
                    lease,
                }));
            }
            EVENT_DELETE => {
                let mod_revision = r.i64()?;
                events.push(Event::Delete { key, mod_revision });
            }
            t => return Err(format!("unknown event type {t}")),
        }
    }
    r.end()?;
    Ok(events)
}

/// A bounds-checked reader over a stored record.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!(
                "record truncated ({} bytes left, {n} needed)",
                self.buf.len()
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn version(&mut self) -> Result<(), String> {
        match self.take(1)?[0] {
            RECORD_V1 => Ok(()),
            v => Err(format!(
                "record version {v} (this meshd reads version {RECORD_V1}; newer meshd?)"
            )),
        }
    }

    fn i64(&mut self) -> Result<i64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(u32::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> Result<(), String> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.buf.len()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transactions.

/// What a replay read of the history found.
enum LogRead {
    /// Commits from the requested revision on (possibly none).
    Commits(Vec<Commit>),
    /// The requested revision is older than the history; the compact revision.
    Compacted(i64),
}

/// One write transaction in progress, running one job after another: stages the events of the
/// current job's revision.
///
/// Every change to the transaction goes through a method of `Writer` that marks the job as having
/// written ([`Writer::wrote`]), so that a job failing after a change aborts the transaction.
struct Writer<'a> {
    inner: &'a Inner,
    txn: &'a WriteTransaction,
    /// The store's revision before the current job (its events get the next one).
    revision: i64,
    /// The time of the current job (unix milliseconds).
    now_ms: i64,
    /// The events of the current job.
    events: Vec<Event>,
    /// Something other than events changed (leases, compaction) and must be committed.
    dirty: bool,
    /// The current job changed the transaction.
    wrote: bool,
}

// ---------------------------------------------------------------------------------------------
// The writer thread and its jobs.

/// A job's operation: re-runnable, since a failed batch runs its jobs again one by one.
type Op<T> = Box<dyn Fn(&mut Writer<'_>) -> Result<T, StoreError> + Send>;

/// One mutating call waiting for the writer thread, with the channel its caller awaits.
struct Job<T> {
    op: Op<T>,
    /// The result of the last run.
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

/// A [`Job`] of any result type.
trait AnyJob: Send {
    /// Runs the operation (again, after a failed batch), keeping its result. False when it failed
    /// after changing the transaction, which must then be aborted.
    fn run(&mut self, w: &mut Writer<'_>) -> bool;
    /// Replaces the kept result with `e` (the transaction was not committed).
    fn fail(&mut self, e: StoreError);
    /// Answers the caller with the kept result.
    fn reply(self: Box<Self>);
}

impl<T: Send + 'static> AnyJob for Job<T> {
    fn run(&mut self, w: &mut Writer<'_>) -> bool {
        w.wrote = false;
        let result = (self.op)(w);
        let clean = result.is_ok() || !w.wrote;
        self.result = Some(result);
        clean
    }

    fn fail(&mut self, e: StoreError) {
        self.result = Some(Err(e));
    }

    fn reply(self: Box<Self>) {
        let result = self
            .result
            .unwrap_or_else(|| Err(StoreError::Other("store write not run".into())));
        // The caller may have gone (a cancelled request): the write stands, like etcd's.
        let _ = self.reply.send(result);
    }
}

/// Sends jobs to the writer thread.
struct Committer {
    jobs: std_mpsc::Sender<Box<dyn AnyJob>>,
}

impl Committer {
    /// Queues `op`; the returned future gets its result once it is durably committed (or failed).
    fn submit<T, F>(&self, op: F) -> Result<Answer<T>, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            op: Box::new(op),
            result: None,
            reply,
        };
        self.jobs
            .send(Box::new(job))
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        Ok(Answer(answer))
    }
}

/// The answer to a queued job.
struct Answer<T>(oneshot::Receiver<Result<T, StoreError>>);

impl<T> Answer<T> {
    async fn get(self) -> Result<T, StoreError> {
        self.0.await.unwrap_or_else(|_| {
            Err(StoreError::Other(
                "the store's writer stopped before answering".into(),
            ))
        })
    }
}

/// The writer thread: drains up to [`MAX_BATCH`] queued jobs, runs them in one transaction, answers
/// them and publishes their commits; runs the jobs of a failed batch one by one. Ends when every
/// [`Committer`] is gone (or the store is).
fn writer_thread(store: Weak<Inner>, queue: std_mpsc::Receiver<Box<dyn AnyJob>>) {
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else {
            for mut job in batch {
                job.fail(StoreError::Unavailable("the store is closed".into()));
                job.reply();
            }
            continue;
        };
        if batch.len() > 1 {
            let ran = std::panic::catch_unwind(AssertUnwindSafe(|| inner.run_batch(&mut batch)));
            if let Ok(Ok(commits)) = ran {
                inner.finish(batch, commits);
                continue;
            }
        }
        for job in batch {
            inner.run_alone(job);
        }
    }
}

impl Inner {
    /// Runs `jobs` in order in one write transaction, each in its own revision, and commits it
    /// (durably) when something changed. The commits to publish, in revision order. `Err(None)`
    /// when a job failed after writing (its result says why), `Err(Some(_))` when the database
    /// failed: the transaction is aborted, nothing of it is written.
    fn run_batch(&self, jobs: &mut [Box<dyn AnyJob>]) -> Result<Vec<Commit>, Option<StoreError>> {
        let txn = self.db.begin_write().map_err(|e| Some(self.err(e)))?;
        let start = read_meta(self, &txn, META_REVISION).map_err(Some)?;
        let mut w = Writer {
            inner: self,
            txn: &txn,
            revision: start,
            now_ms: 0,
            events: Vec::new(),
            dirty: false,
            wrote: false,
        };
        let mut commits = Vec::new();
        for job in jobs.iter_mut() {
            w.now_ms = now_ms();
            if !job.run(&mut w) {
                drop(w);
                // The job's error is what matters; a failing abort shows on the next write.
                let _ = txn.abort();
                return Err(None);
            }
            if !w.events.is_empty() {
                let events = std::mem::take(&mut w.events);
                w.revision += 1;
                let mut log = txn.open_table(EVENTS).map_err(|e| Some(self.err(e)))?;
                log.insert(w.revision, encode_events(&events).as_slice())
                    .map_err(|e| Some(self.err(e)))?;
                commits.push(Commit {
                    revision: w.revision,
                    events,
                });
            }
        }
        let (revision, dirty) = (w.revision, w.dirty);
        drop(w);
        if commits.is_empty() && !dirty {
            txn.abort().map_err(|e| Some(self.err(e)))?;
            return Ok(commits);
        }
        if revision > start {
            self.advance(&txn, revision).map_err(Some)?;
        }
        txn.commit().map_err(|e| Some(self.err(e)))?;
        Ok(commits)
    }

    /// Records `revision` as the current one and trims the history to the last `history`
    /// revisions.
    fn advance(&self, txn: &WriteTransaction, revision: i64) -> Result<(), StoreError> {
        let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
        meta.insert(META_REVISION, revision)
            .map_err(|e| self.err(e))?;
        let oldest = revision - self.history + 1;
        let compact = meta
            .get(META_COMPACT)
            .map_err(|e| self.err(e))?
            .map(|g| g.value())
            .unwrap_or(0);
        if oldest > compact {
            let mut log = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
            log.retain_in(..oldest, |_, _| false)
                .map_err(|e| self.err(e))?;
            meta.insert(META_COMPACT, oldest).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Runs one job in its own transaction, answers it and publishes its commit.
    fn run_alone(&self, mut job: Box<dyn AnyJob>) {
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.run_batch(std::slice::from_mut(&mut job))
        }));
        let commits = match ran {
            Ok(Ok(commits)) => commits,
            // The job failed: its result says why.
            Ok(Err(None)) => Vec::new(),
            Ok(Err(Some(e))) => {
                job.fail(e);
                Vec::new()
            }
            Err(_) => {
                job.fail(StoreError::Other(format!(
                    "{}: internal error: a store write panicked (nothing was written)",
                    self.path.display()
                )));
                Vec::new()
            }
        };
        self.finish(vec![job], commits);
    }

    /// Answers `jobs` (committed), then publishes `commits` in revision order.
    fn finish(&self, jobs: Vec<Box<dyn AnyJob>>, commits: Vec<Commit>) {
        for job in jobs {
            job.reply();
        }
        for commit in commits {
            // No receivers is fine: nobody watches.
            let _ = self.events.send(Arc::new(commit));
        }
    }
}

impl Inner {
    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        db_error(&self.path, e)
    }

    fn corrupt(&self, what: &str, why: String) -> StoreError {
        StoreError::Corrupt(format!(
            "{}: {what}: {why}; restore the file from a backup or move it aside to start empty",
            self.path.display()
        ))
    }

    /// Creates the tables of a new file, checks an existing one is meshd's, and renews the leases.
    fn init(&self, now_ms: i64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let names: Vec<String> = txn
            .list_tables()
            .map_err(|e| self.err(e))?
            .map(|t| t.name().to_string())
            .collect();
        let multimaps: Vec<String> = txn
            .list_multimap_tables()
            .map_err(|e| self.err(e))?
            .map(|t| t.name().to_string())
            .collect();
        let fresh = names.is_empty() && multimaps.is_empty();
        if !fresh && !names.iter().any(|n| n == META.name()) {
            return Err(self.corrupt(
                "not a meshd state store",
                format!("it holds tables {names:?} {multimaps:?}"),
            ));
        }
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            if fresh {
                meta.insert(META_FORMAT, FORMAT).map_err(|e| self.err(e))?;
                // Like etcd, an empty store is at revision 1; the first write makes revision 2.
                meta.insert(META_REVISION, 1).map_err(|e| self.err(e))?;
                meta.insert(META_COMPACT, 0).map_err(|e| self.err(e))?;
                meta.insert(META_NEXT_LEASE, 1).map_err(|e| self.err(e))?;
            } else {
                let format = meta
                    .get(META_FORMAT)
                    .map_err(|e| self.err(e))?
                    .map(|g| g.value());
                match format {
                    Some(FORMAT) => {}
                    Some(f) => {
                        return Err(self.corrupt(
                            "unsupported format",
                            format!("format {f}, this meshd reads format {FORMAT}"),
                        ))
                    }
                    None => return Err(self.corrupt("not a meshd state store", "no format".into())),
                }
                for k in [META_REVISION, META_COMPACT, META_NEXT_LEASE] {
                    if meta.get(k).map_err(|e| self.err(e))?.is_none() {
                        return Err(self.corrupt("metadata", format!("{k} missing")));
                    }
                }
            }
        }
        txn.open_table(KV).map_err(|e| self.err(e))?;
        txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        txn.open_multimap_table(LEASE_KEYS)
            .map_err(|e| self.err(e))?;
        {
            let mut leases = txn.open_table(LEASES).map_err(|e| self.err(e))?;
            let mut renewed = Vec::new();
            for item in leases.iter().map_err(|e| self.err(e))? {
                let (id, rec) = item.map_err(|e| self.err(e))?;
                let (id, rec) = (id.value(), rec.value());
                let mut lease = LeaseRecord::decode(rec)
                    .map_err(|why| self.corrupt(&format!("lease {id}"), why))?;
                let renewed_expiry = now_ms.saturating_add(lease.ttl_secs.saturating_mul(1000));
                if renewed_expiry > lease.expiry_ms {
                    lease.expiry_ms = renewed_expiry;
                    renewed.push((id, lease));
                }
            }
            for (id, lease) in renewed {
                leases
                    .insert(id, lease.encode().as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The current and compact revisions.
    fn revisions(&self) -> Result<(i64, i64), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let get = |k: &str| -> Result<i64, StoreError> {
            meta.get(k)
                .map_err(|e| self.err(e))?
                .map(|g| g.value())
                .ok_or_else(|| self.corrupt("metadata", format!("{k} missing")))
        };
        Ok((get(META_REVISION)?, get(META_COMPACT)?))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let kv = txn.open_table(KV).map_err(|e| self.err(e))?;
        let found = kv.get(key).map_err(|e| self.err(e))?;
        match found {
            None => Ok(None),
            Some(g) => {
                let rec = Record::decode(g.value())
                    .map_err(|why| self.corrupt(&format!("key {key:?}"), why))?;
                Ok(Some(rec.into_kv(key)))
            }
        }
    }

    fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let revision = meta
            .get(META_REVISION)
            .map_err(|e| self.err(e))?
            .map(|g| g.value())
            .ok_or_else(|| self.corrupt("metadata", "revision missing".into()))?;
        let kv = txn.open_table(KV).map_err(|e| self.err(e))?;
        let mut kvs = Vec::new();
        for item in kv.range(prefix..).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let rec = Record::decode(v.value())
                .map_err(|why| self.corrupt(&format!("key {key:?}"), why))?;
            kvs.push(rec.into_kv(key));
        }
        Ok(Listing { kvs, revision })
    }

    /// Up to `limit` commits of the history from revision `from` on.
    fn read_log(&self, from: i64, limit: usize) -> Result<LogRead, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let compact = meta
            .get(META_COMPACT)
            .map_err(|e| self.err(e))?
            .map(|g| g.value())
            .ok_or_else(|| self.corrupt("metadata", "compact revision missing".into()))?;
        if from < compact {
            return Ok(LogRead::Compacted(compact));
        }
        let log = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        let mut commits = Vec::new();
        for item in log.range(from..).map_err(|e| self.err(e))?.take(limit) {
            let (rev, bytes) = item.map_err(|e| self.err(e))?;
            let revision = rev.value();
            let events = decode_events(bytes.value())
                .map_err(|why| self.corrupt(&format!("history at revision {revision}"), why))?;
            commits.push(Commit { revision, events });
        }
        Ok(LogRead::Commits(commits))
    }

    /// The leases that expired by `now_ms`.
    fn expired_leases(&self, now_ms: i64) -> Result<Vec<LeaseId>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let leases = txn.open_table(LEASES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in leases.iter().map_err(|e| self.err(e))? {
            let (id, rec) = item.map_err(|e| self.err(e))?;
            let id = id.value();
            let lease = LeaseRecord::decode(rec.value())
                .map_err(|why| self.corrupt(&format!("lease {id}"), why))?;
            if lease.expired(now_ms) {
                out.push(id);
            }
        }
        Ok(out)
    }
}

fn read_meta(inner: &Inner, txn: &WriteTransaction, key: &str) -> Result<i64, StoreError> {
    let meta = txn.open_table(META).map_err(|e| inner.err(e))?;
    let v = meta
        .get(key)
        .map_err(|e| inner.err(e))?
        .map(|g| g.value())
        .ok_or_else(|| inner.corrupt("metadata", format!("{key} missing")))?;
    Ok(v)
}

impl Writer<'_> {
    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        self.inner.err(e)
    }

    /// The revision this transaction's events get.
    fn pending_revision(&self) -> i64 {
        self.revision + 1
    }

    fn record(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let kv = self.txn.open_table(KV).map_err(|e| self.err(e))?;
        let found = kv.get(key).map_err(|e| self.err(e))?;
        match found {
            None => Ok(None),
            Some(g) => Record::decode(g.value())
                .map(Some)
                .map_err(|why| self.inner.corrupt(&format!("key {key:?}"), why)),
        }
    }

    fn lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        let leases = self.txn.open_table(LEASES).map_err(|e| self.err(e))?;
        let found = leases.get(id).map_err(|e| self.err(e))?;
        match found {
            None => Ok(None),
            Some(g) => LeaseRecord::decode(g.value())
                .map(Some)
                .map_err(|why| self.inner.corrupt(&format!("lease {id}"), why)),
        }
    }

    fn set_lease(&mut self, id: LeaseId, lease: LeaseRecord) -> Result<(), StoreError> {
        self.wrote = true;
        let mut leases = self.txn.open_table(LEASES).map_err(|e| self.err(e))?;
        leases
            .insert(id, lease.encode().as_slice())
            .map_err(|e| self.err(e))?;
        self.dirty = true;
        Ok(())
    }

    /// Writes `key` (whose current state is `prev`) attached to `lease` (0: none).
    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
        prev: Option<Record>,
    ) -> Result<KeyValue, StoreError> {
        self.check_lease(lease)?;
        self.wrote = true;
        let rev = self.pending_revision();
        let (create_revision, version) = match &prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (rev, 1),
        };
        let rec = Record {
            value: value.to_vec(),
            create_revision,
            mod_revision: rev,
            version,
            lease,
        };
        {
            let mut index = self
                .txn
                .open_multimap_table(LEASE_KEYS)
                .map_err(|e| self.err(e))?;
            if let Some(p) = &prev {
                if p.lease != 0 && p.lease != lease {
                    index.remove(p.lease, key).map_err(|e| self.err(e))?;
                }
            }
            if lease != 0 {
                index.insert(lease, key).map_err(|e| self.err(e))?;
            }
        }
        let mut kv = self.txn.open_table(KV).map_err(|e| self.err(e))?;
        kv.insert(key, rec.encode().as_slice())
            .map_err(|e| self.err(e))?;
        let kv = rec.into_kv(key);
        self.events.push(Event::Put(kv.clone()));
        Ok(kv)
    }

    /// A transaction ([`Store::txn`]): checks every compare, then every lease, and only then
    /// writes, so a refused transaction writes nothing.
    fn apply_txn(
        &mut self,
        compares: &[Compare],
        ops: &[TxnOp],
    ) -> Result<Option<i64>, StoreError> {
        for c in compares {
            let current = self.record(&c.key)?.map_or(0, |r| r.mod_revision);
            if current != c.mod_revision {
                return Ok(None);
            }
        }
        for op in ops {
            if let TxnOp::Put {
                lease: Some(lease), ..
            } = op
            {
                self.check_lease(*lease)?;
            }
        }
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let prev = self.record(key)?;
                    self.put(key, value, lease.unwrap_or(0), prev)?;
                }
                TxnOp::Delete { key } => {
                    if let Some(prev) = self.record(key)? {
                        self.delete(key, &prev)?;
                    }
                }
            }
        }
        // The revision the events get, or the current one when nothing changed.
        Ok(Some(if self.events.is_empty() {
            self.revision
        } else {
            self.pending_revision()
        }))
    }

    /// [`StoreError::LeaseNotFound`] unless lease `id` (0: none) exists and has not expired.
    fn check_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        if id == 0 {
            return Ok(());
        }
        match self.lease(id)? {
            Some(l) if !l.expired(self.now_ms) => Ok(()),
            _ => Err(StoreError::LeaseNotFound(id)),
        }
    }

    /// Sets the metadata entry `key`.
    fn set_meta(&mut self, key: &str, value: i64) -> Result<(), StoreError> {
        self.wrote = true;
        let mut meta = self.txn.open_table(META).map_err(|e| self.err(e))?;
        meta.insert(key, value).map_err(|e| self.err(e))?;
        self.dirty = true;
        Ok(())
    }

    /// Discards the history before `revision` ([`Store::compact`]).
    fn compact(&mut self, revision: i64) -> Result<(), StoreError> {
        if revision > self.revision {
            return Err(StoreError::Other(format!(
                "cannot compact at revision {revision}: it is in the future (current revision {})",
                self.revision
            )));
        }
        let compact = read_meta(self.inner, self.txn, META_COMPACT)?;
        if revision <= compact {
            return Ok(());
        }
        self.wrote = true;
        let mut log = self.txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        log.retain_in(..revision, |_, _| false)
            .map_err(|e| self.err(e))?;
        drop(log);
        self.set_meta(META_COMPACT, revision)
    }

    /// Deletes `key`, whose current state is `prev`.
    fn delete(&mut self, key: &str, prev: &Record) -> Result<(), StoreError> {
        self.wrote = true;
        if prev.lease != 0 {
            let mut index = self
                .txn
                .open_multimap_table(LEASE_KEYS)
                .map_err(|e| self.err(e))?;
            index.remove(prev.lease, key).map_err(|e| self.err(e))?;
        }
        let mut kv = self.txn.open_table(KV).map_err(|e| self.err(e))?;
        kv.remove(key).map_err(|e| self.err(e))?;
        self.events.push(Event::Delete {
            key: key.to_string(),
            mod_revision: self.pending_revision(),
        });
        Ok(())
    }

    /// Removes lease `id` and deletes its keys. Whether the lease existed.
    fn revoke(&mut self, id: LeaseId) -> Result<bool, StoreError> {
        self.wrote = true;
        let existed = {
            let mut leases = self.txn.open_table(LEASES).map_err(|e| self.err(e))?;
            let removed = leases.remove(id).map_err(|e| self.err(e))?;
            removed.is_some()
        };
        let keys: Vec<String> = {
            let mut index = self
                .txn
                .open_multimap_table(LEASE_KEYS)
                .map_err(|e| self.err(e))?;
            let mut keys = Vec::new();
            for k in index.remove_all(id).map_err(|e| self.err(e))? {
                keys.push(k.map_err(|e| self.err(e))?.value().to_string());
            }
            keys
        };
        for key in keys {
            if let Some(rec) = self.record(&key)? {
                if rec.lease == id {
                    let mut kv = self.txn.open_table(KV).map_err(|e| self.err(e))?;
                    kv.remove(key.as_str()).map_err(|e| self.err(e))?;
                    self.events.push(Event::Delete {
                        key,
                        mod_revision: self.pending_revision(),
                    });
                }
            }
        }
        self.dirty |= existed;
        Ok(existed)
    }
}

// ---------------------------------------------------------------------------------------------
// Background tasks.

/// Deletes the keys of expired leases every [`REAP_INTERVAL`] until `stop` fires or the store is gone.
async fn reap_leases(
    store: Weak<Inner>,
    committer: Weak<Committer>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let err = match reap_once(&store, &committer).await {
            Ok(true) => None,
            Ok(false) => return,
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = &err {
            if last_error.as_ref() != Some(e) {
                eprintln!("meshd: embedded store: expiring leases failed (will retry): {e}");
            }
        }
        last_error = err;
    }
}

/// Revokes the leases expired by now, each by its own writer job (its own revision, as etcd does;
/// the jobs share a commit). False when the store is gone.
async fn reap_once(store: &Weak<Inner>, committer: &Weak<Committer>) -> Result<bool, StoreError> {
    let Some(inner) = store.upgrade() else {
        return Ok(false);
    };
    let now = now_ms();
    let expired = tokio::task::spawn_blocking(move || inner.expired_leases(now))
        .await
        .map_err(|e| StoreError::Other(format!("task failed: {e}")))??;
    if expired.is_empty() {
        return Ok(true);
    }
    let answers = {
        // Not held across an await: dropping the store stops the writer without waiting for us.
        let Some(committer) = committer.upgrade() else {
            return Ok(false);
        };
        let mut answers = Vec::with_capacity(expired.len());
        for id in expired {
            // Re-checked by the job: a keep-alive may have come in between.
            answers.push(committer.submit(move |w| match w.lease(id)? {
                Some(l) if l.expired(w.now_ms) => w.revoke(id),
                _ => Ok(false),
            })?);
        }
        answers
    };
    let mut first_error = None;
    for answer in answers {
        if let Err(e) = answer.get().await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(true), Err)
}

/// Sends the events of `commit` under `prefix`. False when the watcher is gone.
async fn deliver(
    tx: &mpsc::Sender<Result<Event, StoreError>>,
    prefix: &str,
    commit: &Commit,
) -> bool {
    for e in &commit.events {
        if e.key().starts_with(prefix) && tx.send(Ok(e.clone())).await.is_err() {
            return false;
        }
    }
    true
}

/// Feeds one watch: replays the history from `start`, then follows the live commits.
async fn watch_task(
    store: Weak<Inner>,
    prefix: String,
    start: i64,
    mut live: broadcast::Receiver<Arc<Commit>>,
    tx: mpsc::Sender<Result<Event, StoreError>>,
) {
    // The next revision to deliver: everything before it was delivered or is before `start`.
    let mut next = start;
    loop {
        // Replay from the history.
        loop {
            let Some(inner) = store.upgrade() else { return };
            let from = next;
            let read = tokio::task::spawn_blocking(move || inner.read_log(from, REPLAY_CHUNK))
                .await
                .unwrap_or_else(|e| Err(StoreError::Other(format!("watch task failed: {e}"))));
            let commits = match read {
                Ok(LogRead::Commits(c)) => c,
                Ok(LogRead::Compacted(compact_revision)) => {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: from,
                            compact_revision,
                        }))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let full = commits.len() == REPLAY_CHUNK;
            for c in &commits {
                if !deliver(&tx, &prefix, c).await {
                    return;
                }
                next = c.revision + 1;
            }
            if !full {
                break;
            }
        }
        // Follow the live commits; back to the history after falling behind.
        loop {
            let received = tokio::select! {
                _ = tx.closed() => return,
                r = live.recv() => r,
            };
            match received {
                Ok(c) if c.revision < next => continue,
                Ok(c) if c.revision == next => {
                    if !deliver(&tx, &prefix, &c).await {
                        return;
                    }
                    next = c.revision + 1;
                }
                // A gap (cannot happen with consecutive revisions, but never skip events).
                Ok(_) => break,
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.get(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: i64,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let (key, value) = (key.to_string(), value.to_vec());
        let lease = lease.unwrap_or(0);
        self.write(move |w| {
            let prev = w.record(&key)?;
            let current = prev.as_ref().map(|p| p.mod_revision).unwrap_or(0);
            if current != expected {
                return Ok(None);
            }
            w.put(&key, &value, lease, prev).map(Some)
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<bool, StoreError> {
        check_key(key)?;
        let key = key.to_string();
        self.write(move |w| {
            let Some(prev) = w.record(&key)? else {
                return Ok(false);
            };
            if expected.is_some_and(|e| e != prev.mod_revision) {
                return Ok(false);
            }
            w.delete(&key, &prev)?;
            Ok(true)
        })
        .await
    }

    async fn txn(&self, compares: &[Compare], ops: &[TxnOp]) -> Result<Option<i64>, StoreError> {
        for key in compares
            .iter()
            .map(|c| c.key.as_str())
            .chain(ops.iter().map(|op| op.key()))
        {
            check_key(key)?;
        }
        let mut seen = std::collections::HashSet::with_capacity(ops.len());
        if let Some(dup) = ops.iter().map(|op| op.key()).find(|k| !seen.insert(*k)) {
            // As etcd: "duplicate key given in txn request".
            return Err(StoreError::Other(format!(
                "key {dup:?} is written more than once in one transaction"
            )));
        }
        let (compares, ops) = (compares.to_vec(), ops.to_vec());
        self.write(move |w| w.apply_txn(&compares, &ops)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_secs = ttl_secs(ttl);
        self.write(move |w| {
            let id = read_meta(w.inner, w.txn, META_NEXT_LEASE)?;
            w.set_meta(META_NEXT_LEASE, id + 1)?;
            let expiry_ms = w.now_ms.saturating_add(ttl_secs.saturating_mul(1000));
            w.set_lease(
                id,
                LeaseRecord {
                    ttl_secs,
                    expiry_ms,
                },
            )?;
            Ok(id)
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.write(move |w| match w.lease(lease)? {
            Some(mut l) if !l.expired(w.now_ms) => {
                l.expiry_ms = w.now_ms.saturating_add(l.ttl_secs.saturating_mul(1000));
                w.set_lease(lease, l)?;
                Ok(Duration::from_secs(l.ttl_secs.unsigned_abs()))
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.write(move |w| w.revoke(lease).map(|_| ())).await
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, StoreError> {
        // Subscribe before reading the history: every commit is in one or the other.
        let live = self.inner.events.subscribe();
        let (current, _) = self.blocking(|i| i.revisions()).await?;
        let start = if from_revision <= 0 {
            current + 1
        } else {
            from_revision
        };
        let (tx, events) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch_task(
            Arc::downgrade(&self.inner),
            prefix.to_string(),
            start,
            live,
            tx,
        ));
        Ok(Watch { events })
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.write(move |w| w.compact(revision)).await
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.inner.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_damage() {
        let rec = Record {
            value: b"hello".to_vec(),
            create_revision: 2,
            mod_revision: 7,
            version: 3,
            lease: 9,
        };
        let bytes = rec.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), rec);
        assert!(Record::decode(&bytes[..20]).is_err());
        let mut newer = bytes.clone();
        newer[0] = 2;
        assert!(Record::decode(&newer).unwrap_err().contains("version 2"));

        let lease = LeaseRecord {
            ttl_secs: 5,
            expiry_ms: 123,
        };
        assert_eq!(LeaseRecord::decode(&lease.encode()).unwrap(), lease);
        assert!(LeaseRecord::decode(&lease.encode()[..10]).is_err());

        let events = vec![
            Event::Put(KeyValue {
                key: "/a".into(),
                value: vec![1, 2, 3],
                create_revision: 2,
                mod_revision: 4,
                version: 2,
                lease: 0,
            }),
            Event::Delete {
                key: "/b".into(),
                mod_revision: 4,
            },
        ];
        let bytes = encode_events(&events);
        assert_eq!(decode_events(&bytes).unwrap(), events);
        for cut in 0..bytes.len() {
            assert!(decode_events(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A huge count does not allocate.
        let mut lying = vec![RECORD_V1];
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_events(&lying).is_err());
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::ZERO), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(3)), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_is_private_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("another meshd")),
            "{err}"
        );
        store.close().await.unwrap();
        // Released: opens again.
        EmbeddedStore::open(&path).unwrap().close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loose_mode_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        EmbeddedStore::open(&path).unwrap().close().await.unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_or_foreign_files_are_corrupt_never_emptied() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();

        // Not a database at all.
        let garbage = dir.path().join("garbage.redb");
        std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = EmbeddedStore::open(&garbage).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("garbage.redb")),
            "{err}"
        );
        assert_eq!(std::fs::read(&garbage).unwrap(), vec![0x5a; 64 * 1024]);

        // A real store, damaged in the middle.
        let path = dir.path().join("state.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        for i in 0..200 {
            store
                .create(&format!("/k/{i}"), &[7u8; 300], None)
                .await
                .unwrap();
        }
        store.close().await.unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        for b in &mut bytes[len / 3..len / 3 + 8192] {
            *b ^= 0xff;
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("state.redb")),
            "{err}"
        );

        // A store file truncated to nothing.
        let empty = dir.path().join("empty.redb");
        std::fs::File::create(&empty).unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = EmbeddedStore::open(&empty).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("empty.redb is empty")),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

        // Somebody else's redb file.
        let foreign = dir.path().join("foreign.redb");
        std::fs::File::create(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o600)).unwrap();
        {
            let db = Database::create(&foreign).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let def: TableDefinition<&str, &str> = TableDefinition::new("theirs");
                let mut t = txn.open_table(def).unwrap();
                t.insert("a", "b").unwrap();
            }
            txn.commit().unwrap();
        }
        let err = EmbeddedStore::open(&foreign).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("not a meshd state store")),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_is_trimmed_automatically() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with_history(&dir.path().join("s.redb"), 5).unwrap();
        let first = store.create("/h/0", b"0", None).await.unwrap().unwrap();
        for i in 1..10 {
            store
                .create(&format!("/h/{i}"), b"x", None)
                .await
                .unwrap()
                .unwrap();
        }
        let current = store.list("/h/").await.unwrap().revision;
        let mut w = store.watch("/h/", first.mod_revision).await.unwrap();
        match w.events.recv().await {
            Some(Err(StoreError::Compacted {
                requested,
                compact_revision,
            })) => {
                assert_eq!(requested, first.mod_revision);
                assert_eq!(compact_revision, current - 4);
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(w.events.recv().await.is_none());
        // The last five revisions replay.
        let mut w = store.watch("/h/", current - 4).await.unwrap();
        for rev in current - 4..=current {
            let e = w.events.recv().await.unwrap().unwrap();
            assert_eq!(e.revision(), rev);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_watcher_catches_up_from_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let mut w = store.watch("/slow/", 0).await.unwrap();
        // More commits than the broadcast holds, while the watcher does not read.
        let n = BROADCAST_CAPACITY + WATCH_BUFFER + 50;
        let key = "/slow/k";
        let mut rev = 0;
        for i in 0..n {
            let kv = store
                .compare_and_swap(key, rev, i.to_string().as_bytes(), None)
                .await
                .unwrap()
                .unwrap();
            rev = kv.mod_revision;
        }
        let mut last = 0;
        for i in 0..n {
            let e = w.events.recv().await.unwrap().unwrap();
            let Event::Put(kv) = e else {
                panic!("unexpected {e:?}")
            };
            assert_eq!(kv.value, i.to_string().as_bytes());
            assert!(kv.mod_revision > last);
            last = kv.mod_revision;
        }
        assert_eq!(last, rev);
    }

    /// Queues a job that holds the writer for a moment, so that the jobs queued behind it form one
    /// batch.
    fn hold_writer(store: &EmbeddedStore) -> Answer<()> {
        store
            .committer
            .as_ref()
            .unwrap()
            .submit(|_| {
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            })
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_failing_after_writing_fails_alone_and_leaves_nothing() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let start = store.list("/").await.unwrap().revision;
        let mut w = store.watch("/g/", 0).await.unwrap();
        let committer = store.committer.clone().unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let put = |key: &'static str| {
            let runs = runs.clone();
            committer
                .submit(move |w| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    w.put(key, b"v", 0, None)
                })
                .unwrap()
        };
        let held = hold_writer(&store);
        let a = put("/g/a");
        let bad = committer
            .submit(|w| {
                w.put("/g/bad", b"partial", 0, None)?;
                Err::<(), _>(StoreError::Other("failed after writing".into()))
            })
            .unwrap();
        let c = put("/g/c");
        held.get().await.unwrap();
        let (a, c) = (a.get().await.unwrap(), c.get().await.unwrap());
        assert!(
            matches!(bad.get().await, Err(StoreError::Other(m)) if m == "failed after writing")
        );
        // The batch was run again job by job: a twice (in the batch, then alone), c once (the
        // batch stopped at the failure).
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!((a.mod_revision, c.mod_revision), (start + 1, start + 2));
        assert_eq!(store.get("/g/bad").await.unwrap(), None);
        assert_eq!(store.get("/g/a").await.unwrap(), Some(a.clone()));
        assert_eq!(store.get("/g/c").await.unwrap(), Some(c.clone()));
        assert_eq!(w.events.recv().await.unwrap().unwrap(), Event::Put(a));
        assert_eq!(w.events.recv().await.unwrap().unwrap(), Event::Put(c));
        assert_eq!(store.list("/").await.unwrap().revision, start + 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_or_a_panic_does_not_disturb_the_batch() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let start = store.list("/").await.unwrap().revision;
        let committer = store.committer.clone().unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let put = |key: &'static str| {
            let runs = runs.clone();
            committer
                .submit(move |w| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    w.put(key, b"v", 0, None)
                })
                .unwrap()
        };

        // A refusal before writing (an unknown lease) is just that job's answer.
        let held = hold_writer(&store);
        let a = put("/r/a");
        let refused = store.keep_alive(424242);
        let leased = store.create("/r/leased", b"x", Some(434343));
        let c = put("/r/c");
        let (_, a, refused, leased, c) =
            tokio::join!(held.get(), a.get(), refused, leased, c.get());
        assert!(matches!(refused, Err(StoreError::LeaseNotFound(424242))));
        assert!(matches!(leased, Err(StoreError::LeaseNotFound(434343))));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "no re-run");
        assert_eq!(
            (a.unwrap().mod_revision, c.unwrap().mod_revision),
            (start + 1, start + 2)
        );

        // A panicking job fails alone.
        let held = hold_writer(&store);
        let d = put("/r/d");
        let boom = committer
            .submit(|w| -> Result<(), StoreError> {
                w.put("/r/boom", b"x", 0, None)?;
                panic!("job panicked on purpose (test)")
            })
            .unwrap();
        let e = put("/r/e");
        held.get().await.unwrap();
        assert!(matches!(boom.get().await, Err(StoreError::Other(m)) if m.contains("panicked")));
        assert_eq!(d.get().await.unwrap().mod_revision, start + 3);
        assert_eq!(e.get().await.unwrap().mod_revision, start + 4);
        assert_eq!(store.get("/r/boom").await.unwrap(), None);
        // The store goes on.
        assert_eq!(
            store
                .create("/r/f", b"f", None)
                .await
                .unwrap()
                .unwrap()
                .mod_revision,
            start + 5
        );
        drop(committer);
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_with_a_revision_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Arc::new(EmbeddedStore::open(&path).unwrap());
        let start = store.list("/").await.unwrap().revision;
        let mut w = store.watch("/c/", 0).await.unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .create(&format!("/c/{i:03}"), b"v", None)
                        .await
                        .unwrap()
                        .unwrap()
                })
            })
            .collect();
        let mut revs = Vec::new();
        for t in tasks {
            revs.push(t.await.unwrap().mod_revision);
        }
        revs.sort_unstable();
        assert_eq!(revs, (start + 1..=start + 200).collect::<Vec<_>>());
        for rev in start + 1..=start + 200 {
            let e = w.events.recv().await.unwrap().unwrap();
            assert_eq!(e.revision(), rev);
        }
        // Durable: everything is there after a reopen.
        drop(w);
        Arc::try_unwrap(store).unwrap().close().await.unwrap();
        let store = EmbeddedStore::open(&path).unwrap();
        let listing = store.list("/c/").await.unwrap();
        assert_eq!((listing.kvs.len(), listing.revision), (200, start + 200));
    }
}
