//! The etcd store: etcd's v3 API over gRPC (`etcd-client`), with mutual TLS.
//!
//! Every operation maps onto one etcd request, so etcd gives the semantics of [`Store`] directly:
//! * `get`, `list`: linearizable range reads (`list` with a prefix, in key order, with the header's
//!   revision);
//! * `create`, `compare_and_swap`, conditional `delete`: one transaction comparing the key's
//!   `create_revision` (absent) or `mod_revision`, whose success branch also reads the key back;
//! * `txn`: one etcd transaction, its compares on `create_revision` (absent) or `mod_revision`, its
//!   writes in the success branch;
//! * leases: etcd's own (etcd may raise a short TTL to its minimum, about 2 s by default);
//! * `watch`: one gRPC watch stream per watch, forwarded by a task that ends with
//!   [`StoreError::Compacted`] when etcd reports the start revision compacted.
//!
//! Unary calls are bounded by [`REQUEST_TIMEOUT`]; connecting (which includes a first read, so a
//! refused TLS handshake is reported at once) by [`CONNECT_TIMEOUT`].
//!
//! Client certificate rotation: the gRPC channel keeps the TLS identity it was built with and
//! presents it again whenever it reconnects, so after the certificate expired a reconnect would be
//! refused. [`EtcdStore::reload_tls`] builds a client with the renewed pair, checks that etcd
//! accepts it, and swaps it in for every clone of the store: new requests and watches use it,
//! streams already open stay on the old connection until it ends (a watch then resumes on the new
//! one). `meshd run` calls it when the `meshd-etcd-client` entry renews ([`follow_rotation`]).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, EventType,
    GetOptions, Identity, PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions, WatchResponse,
};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::{Event, KeyValue, LeaseId, Listing, Store, StoreError, Watch};

/// How long [`EtcdStore::connect`] waits for etcd to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Capacity of each watch's channel (events).
const WATCH_BUFFER: usize = 256;

// gRPC status codes (tonic::Code), compared as numbers so tonic need not be a direct dependency.
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_NOT_FOUND: i32 = 5;
const CODE_FAILED_PRECONDITION: i32 = 9;
const CODE_OUT_OF_RANGE: i32 = 11;

/// Client credentials for etcd: the CA that signed etcd's server certificate, and meshd's client
/// certificate and key (etcd runs with `--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    /// The etcd CA certificate (PEM).
    pub ca_pem: String,
    /// The client certificate (PEM).
    pub cert_pem: String,
    /// The client's private key (PEM).
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl EtcdTls {
    fn options(&self, handshake_timeout: Duration) -> TlsOptions {
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(self.ca_pem.as_bytes()))
            .identity(Identity::from_pem(
                self.cert_pem.as_bytes(),
                self.key_pem.as_bytes(),
            ))
            .timeout(handshake_timeout)
    }
}

/// The etcd state store. See the [module documentation](self).
#[derive(Clone)]
pub struct EtcdStore {
    /// Shared by every clone, swapped by [`EtcdStore::reload_tls`].
    client: std::sync::Arc<std::sync::RwLock<Client>>,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`https://host:port`), authenticating with `tls`, and checks
    /// that etcd answers within [`CONNECT_TIMEOUT`]. Without `tls`, plain `http://` endpoints only.
    pub async fn connect(endpoints: &[String], tls: Option<EtcdTls>) -> Result<Self, StoreError> {
        Self::connect_with_timeout(endpoints, tls, CONNECT_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with another connect timeout.
    pub async fn connect_with_timeout(
        endpoints: &[String],
        tls: Option<EtcdTls>,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let tls = tls.map(|t| t.options(timeout));
        Self::connect_with_options(endpoints, tls, timeout).await
    }

    /// Connects with raw TLS options (tests use it to try clients etcd must refuse).
    pub(crate) async fn connect_with_options(
        endpoints: &[String],
        tls: Option<TlsOptions>,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Other("no etcd endpoints given".into()));
        }
        let shown = endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        let connecting = async {
            let mut client = Client::connect(endpoints, Some(options)).await?;
            // Connections are made lazily: a first request proves etcd answers and accepts us.
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(client)) => Ok(EtcdStore {
                client: std::sync::Arc::new(std::sync::RwLock::new(client)),
                endpoints: endpoints.to_vec(),
            }),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "cannot connect to etcd at {shown}: {e}"
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd at {shown} did not answer within {timeout:?}: it is down or unreachable, or \
                 it refused the TLS handshake (check the etcd CA and the client certificate)"
            ))),
        }
    }
}

impl EtcdStore {
    /// The client in use (cheap: the gRPC channel is shared).
    fn client(&self) -> Client {
        match self.client.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Connects again with `tls` (a renewed client certificate) and, once etcd accepted it, uses
    /// the new client for everything that follows, in this store and every clone of it. On error
    /// the store keeps the client it has.
    pub async fn reload_tls(&self, tls: EtcdTls) -> Result<(), StoreError> {
        let fresh = Self::connect(&self.endpoints, Some(tls)).await?;
        let client = fresh.client();
        match self.client.write() {
            Ok(mut c) => *c = client,
            Err(poisoned) => *poisoned.into_inner() = client,
        }
        Ok(())
    }
}

/// Swaps the client of `store` for one with the renewed pair whenever the rotation events name
/// `entry` (`meshd-etcd-client`), with the credentials `load` reads from the data directory. A
/// failure is logged with `log` and the store keeps its client; it is tried again on the next event.
pub async fn follow_rotation(
    store: EtcdStore,
    entry: &'static str,
    load: impl Fn() -> anyhow::Result<EtcdTls>,
    mut events: tokio::sync::broadcast::Receiver<Vec<String>>,
    log: impl Fn(String),
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let reload = match events.recv().await {
            Ok(ids) => ids.iter().any(|i| i == entry),
            Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => return,
        };
        if !reload {
            continue;
        }
        let r = match load() {
            Ok(tls) => store.reload_tls(tls).await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => log(format!(
                "etcd store: reconnected with the renewed {entry} certificate"
            )),
            Err(e) => log(format!(
                "etcd store: keeping the current client, the renewed {entry} certificate cannot be used: {e:#}"
            )),
        }
    }
}

/// Runs one unary request within [`REQUEST_TIMEOUT`].
async fn call<T>(
    what: &str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| map_error(what, e)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd {what}: no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// The gRPC status code and message of an error, when it is one.
fn status(e: &etcd_client::Error) -> Option<(i32, &str)> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some((s.code() as i32, s.message())),
        _ => None,
    }
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => status(e).is_some_and(|(code, msg)| {
            code == CODE_NOT_FOUND || msg.contains("requested lease not found")
        }),
    }
}

fn map_error(what: &str, e: etcd_client::Error) -> StoreError {
    match &e {
        etcd_client::Error::GRpcStatus(s) => {
            let code = s.code() as i32;
            let msg = format!("etcd {what}: {} ({:?})", s.message(), s.code());
            if matches!(
                code,
                CODE_INVALID_ARGUMENT | CODE_FAILED_PRECONDITION | CODE_OUT_OF_RANGE
            ) {
                StoreError::Other(msg)
            } else {
                StoreError::Unavailable(msg)
            }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            StoreError::Unavailable(format!("etcd {what}: {e}"))
        }
        _ => StoreError::Other(format!("etcd {what}: {e}")),
    }
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv.key_str().map_err(|_| {
        StoreError::Corrupt(format!(
            "etcd key {:?} is not UTF-8 (not written by meshd)",
            String::from_utf8_lossy(kv.key())
        ))
    })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Other("empty key".into()));
    }
    Ok(())
}

/// etcd's comparison for "the key's `mod_revision` is `expected`" (0: the key does not exist).
fn revision_compare(key: &str, expected: i64) -> Compare {
    if expected == 0 {
        Compare::create_revision(key, CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key, CompareOp::Equal, expected)
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease
        .filter(|l| *l != 0)
        .map(|l| PutOptions::new().with_lease(l))
}

/// The key read back by the `get` that follows the write in a successful transaction.
fn written_kv(resp: &TxnResponse, key: &str) -> Result<Option<KeyValue>, StoreError> {
    if !resp.succeeded() {
        return Ok(None);
    }
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            return match get.kvs().first() {
                Some(kv) => convert(kv).map(Some),
                None => Err(StoreError::Other(format!(
                    "etcd: {key:?} missing right after writing it"
                ))),
            };
        }
    }
    Err(StoreError::Other(format!(
        "etcd: the transaction writing {key:?} returned no read-back"
    )))
}

/// Forwards the events of one watch response. `Some(error)` ends the watch (compaction,
/// cancellation, an undecodable key); a closed receiver just stops the forwarding.
async fn forward(
    tx: &mpsc::Sender<Result<Event, StoreError>>,
    resp: &WatchResponse,
    from_revision: i64,
) -> Option<StoreError> {
    if resp.compact_revision() > 0 {
        return Some(StoreError::Compacted {
            requested: from_revision,
            compact_revision: resp.compact_revision(),
        });
    }
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let event = match ev.event_type() {
            EventType::Put => convert(kv).map(Event::Put),
            EventType::Delete => convert(kv).map(|kv| Event::Delete {
                key: kv.key,
                mod_revision: kv.mod_revision,
            }),
        };
        match event {
            Ok(e) => {
                if tx.send(Ok(e)).await.is_err() {
                    return None;
                }
            }
            Err(e) => return Some(e),
        }
    }
    if resp.canceled() {
        return Some(StoreError::Unavailable(format!(
            "etcd canceled the watch: {}",
            resp.cancel_reason()
        )));
    }
    None
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let mut kv = self.client().kv_client();
        let resp = call("get", kv.get(key, None)).await?;
        resp.kvs().first().map(convert).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let mut kv = self.client().kv_client();
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let resp = call("list", kv.get(prefix, Some(opts))).await?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Other("etcd list: response without header".into()))?;
        let kvs = resp
            .kvs()
            .iter()
            .map(convert)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Listing { kvs, revision })
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: i64,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let txn = Txn::new()
            .when([revision_compare(key, expected)])
            .and_then([
                TxnOp::put(key, value, put_options(lease)),
                TxnOp::get(key, None),
            ]);
        let mut kv = self.client().kv_client();
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(txn)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if lease.is_some() && is_lease_not_found(&e) => {
                return Err(StoreError::LeaseNotFound(lease.unwrap_or(0)))
            }
            Ok(Err(e)) => return Err(map_error("write", e)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd write: no answer within {REQUEST_TIMEOUT:?}"
                )))
            }
        };
        written_kv(&resp, key)
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<bool, StoreError> {
        check_key(key)?;
        let mut kv = self.client().kv_client();
        match expected {
            None => {
                let resp = call("delete", kv.delete(key, None)).await?;
                Ok(resp.deleted() > 0)
            }
            Some(rev) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(key, None)]);
                let resp = call("delete", kv.txn(txn)).await?;
                Ok(resp.succeeded()
                    && resp
                        .op_responses()
                        .iter()
                        .any(|op| matches!(op, TxnOpResponse::Delete(d) if d.deleted() > 0)))
            }
        }
    }

    async fn txn(
        &self,
        compares: &[super::Compare],
        ops: &[super::TxnOp],
    ) -> Result<Option<i64>, StoreError> {
        for key in compares
            .iter()
            .map(|c| c.key.as_str())
            .chain(ops.iter().map(|op| op.key()))
        {
            check_key(key)?;
        }
        let when: Vec<Compare> = compares
            .iter()
            .map(|c| revision_compare(&c.key, c.mod_revision))
            .collect();
        let then: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                super::TxnOp::Put { key, value, lease } => {
                    TxnOp::put(key.as_str(), value.as_slice(), put_options(*lease))
                }
                super::TxnOp::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        // The lease named by a "lease not found" error (etcd does not say which, when several).
        let lease = ops.iter().find_map(|op| match op {
            super::TxnOp::Put { lease: Some(l), .. } if *l != 0 => Some(*l),
            _ => None,
        });
        let txn = Txn::new().when(when).and_then(then);
        let mut kv = self.client().kv_client();
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(txn)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if lease.is_some() && is_lease_not_found(&e) => {
                return Err(StoreError::LeaseNotFound(lease.unwrap_or(0)))
            }
            Ok(Err(e)) => return Err(map_error("transaction", e)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd transaction: no answer within {REQUEST_TIMEOUT:?}"
                )))
            }
        };
        if !resp.succeeded() {
            return Ok(None);
        }
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Other("etcd transaction: response without header".into()))?;
        Ok(Some(revision))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let mut lease = self.client().lease_client();
        let resp = call("lease grant", lease.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Other(format!(
                "etcd lease grant: {}",
                resp.error()
            )));
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let mut lease = self.client().lease_client();
        let renew = async {
            // The client sends one keep-alive and reads its answer (TTL 0: no such lease), then we
            // read the TTL from a second answer on the same stream.
            let (mut keeper, mut answers) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            let ttl = answers.message().await?.map(|a| a.ttl()).unwrap_or(0);
            Ok::<_, etcd_client::Error>(ttl)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, renew).await {
            Ok(Ok(ttl)) if ttl > 0 => Ok(Duration::from_secs(ttl.unsigned_abs())),
            Ok(Ok(_)) => Err(StoreError::LeaseNotFound(id)),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
            Ok(Err(e)) => Err(map_error("lease keep-alive", e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd lease keep-alive: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.client().lease_client();
        match tokio::time::timeout(REQUEST_TIMEOUT, lease.revoke(id)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_lease_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(map_error("lease revoke", e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd lease revoke: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, StoreError> {
        let mut opts = WatchOptions::new().with_prefix();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let mut client = self.client().watch_client();
        // Wait for etcd's "created" answer, so that "from now on" (0) means from this call's
        // return: a write made after it is seen.
        let establish = async {
            let stream = client.watch(prefix, Some(opts)).await?;
            let (requests, mut responses) = stream.split();
            let first = responses.message().await?;
            Ok::<_, etcd_client::Error>((requests, responses, first))
        };
        let (requests, mut responses, first) = call("watch", establish).await?;
        let (tx, events) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            // The request half must stay open: etcd ends the watch when the client closes it.
            let _requests = requests;
            let mut pending = Some(Ok(first));
            loop {
                let message = match pending.take() {
                    Some(m) => m,
                    None => tokio::select! {
                        _ = tx.closed() => return,
                        m = responses.message() => m,
                    },
                };
                let end = match message {
                    Ok(Some(resp)) => forward(&tx, &resp, from_revision).await,
                    Ok(None) => Some(StoreError::Unavailable(
                        "etcd ended the watch stream; re-list and watch again".into(),
                    )),
                    Err(e) => Some(map_error("watch", e)),
                };
                if let Some(err) = end {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Watch { events })
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut kv = self.client().kv_client();
        let opts = CompactionOptions::new().with_physical();
        match tokio::time::timeout(REQUEST_TIMEOUT, kv.compact(revision, Some(opts))).await {
            Ok(Ok(_)) => Ok(()),
            // Already compacted that far: nothing to do (the embedded store agrees).
            Ok(Err(e))
                if status(&e)
                    .is_some_and(|(_, m)| m.contains("required revision has been compacted")) =>
            {
                Ok(())
            }
            Ok(Err(e)) => Err(map_error("compact", e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd compact: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints.join(","))
    }
}
