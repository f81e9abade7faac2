//! The API server: TLS accept, identity from the client certificate, routing, and the handlers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use pki::ca::{CertificateAuthority, Usage};
use pki::csr::{self, CsrLimits, SigningPolicy};
use pki::inventory::ClusterSettings;
use rustls::ServerConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;
use crate::leases::{self, LeaseAttrs};
use crate::registry::{self, NodeRecord};
use crate::store::Store;
use crate::tokens::{self, Token, TokenRecord};

mod rejoin;

/// Everything the handlers need.
pub struct ApiState {
    /// The cluster state.
    pub store: Arc<dyn Store>,
    /// The cluster CA, which signs node certificates.
    pub ca: CertificateAuthority,
    /// Cluster settings.
    pub settings: ClusterSettings,
    /// The overlay network configuration.
    pub network: overlay::NetworkConfig,
    /// The flannel prefix in the store.
    pub prefix: String,
    /// The address nodes join (`host:port`), for token output.
    pub server_addr: String,
    /// CSR limits.
    pub csr_limits: CsrLimits,
}

/// Who is calling, from the verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No (usable) client certificate.
    Anonymous,
    /// `system:node:<name>` in `system:nodes`, with the SHA-256 of its certificate's public key
    /// (checked against the node's registration before anything is done for it).
    Node {
        /// Node name.
        name: String,
        /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex.
        spki_sha256: String,
    },
    /// A member of `meshd:admins`.
    Admin(String),
}

fn identity_of(cert_der: Option<&[u8]>) -> Identity {
    let Some(der) = cert_der else {
        return Identity::Anonymous;
    };
    let Ok(info) = pki::inspect::inspect_der(der) else {
        return Identity::Anonymous;
    };
    if !info.has_client_auth() {
        return Identity::Anonymous;
    }
    let cn = info.common_name.unwrap_or_default();
    if info.organizations.iter().any(|o| o == ADMIN_GROUP) {
        return Identity::Admin(cn);
    }
    if info.organizations.iter().any(|o| o == "system:nodes") {
        if let Some(name) = cn.strip_prefix("system:node:") {
            return Identity::Node {
                name: name.to_owned(),
                spki_sha256: info.spki_sha256,
            };
        }
    }
    Identity::Anonymous
}

/// Writes a log line to stderr. Never pass secrets.
pub fn log(msg: impl std::fmt::Display) {
    eprintln!("{} meshd: {msg}", pki::time::rfc3339(SystemTime::now()));
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        log(format!("internal error: {e}"));
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the control plane's log",
        )
    }
}

type HttpResponse = Response<BoxBody<Bytes, Infallible>>;

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 4096;
/// Longest a request (reading its body included) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A peer stream whose reader does not take an event for this long is dropped.
const STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(30);

fn json<T: Serialize>(status: StatusCode, v: &T) -> HttpResponse {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error_response(e: ApiError) -> HttpResponse {
    json(e.status, &ErrorBody { error: e.message })
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    if let Some(len) = req.headers().get(hyper::header::CONTENT_LENGTH) {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        if len > MAX_BODY {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body of {len} bytes exceeds the {MAX_BODY}-byte limit"),
            ));
        }
    }
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the {MAX_BODY}-byte limit"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("malformed JSON request: {e}")))
}

/// Serves the API on `listener` until `shutdown` turns true. The TLS configuration is read from
/// `tls` for every new connection, so a renewed server certificate is used without a restart.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    state: Arc<ApiState>,
    mut shutdown: watch::Receiver<bool>,
) {
    // At most this many connections at once; more are closed at once (peer streams count too).
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                log(format!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log(format!(
                "refusing {peer}: {MAX_CONNECTIONS} connections already open"
            ));
            continue;
        };
        // Small request/response exchanges: without this, Nagle + delayed ACK stall each call ~40 ms.
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls_stream = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    log(format!("TLS handshake with {peer} failed: {e}"));
                    return;
                }
                Err(_) => {
                    log(format!("TLS handshake with {peer} timed out"));
                    return;
                }
            };
            let id = identity_of(
                tls_stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref()),
            );
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let id = id.clone();
                async move {
                    // Bounds a slow body or a stuck store; peer streams return once their first
                    // snapshot is ready and stream on afterwards.
                    let res = tokio::time::timeout(REQUEST_TIMEOUT, route(&state, &id, peer, req))
                        .await
                        .unwrap_or_else(|_| {
                            error_response(ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "the request took too long",
                            ))
                        });
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls_stream), svc)
                .await;
        });
    }
}

async fn route(
    state: &Arc<ApiState>,
    id: &Identity,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> HttpResponse {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let res = match (&method, path.as_str()) {
        (&Method::GET, "/v1/info") => Ok(json(
            StatusCode::OK,
            &InfoResponse {
                cluster_name: state.settings.cluster_name.clone(),
                server_time: unix(SystemTime::now()),
                api_version: "v1".into(),
            },
        )),
        (&Method::POST, "/v1/join") => match body::<JoinRequest>(req).await {
            Ok(r) => join(state, r, peer).await.map(|r| json(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (&Method::POST, "/v1/join/rejoin") => match body::<crate::rejoin::RejoinRequest>(req).await
        {
            Ok(r) => rejoin::rejoin(state, r, peer)
                .await
                .map(|r| json(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (&Method::POST, "/v1/lease/renew") => match need_node(id) {
            Ok((node, spki)) => match body::<RenewLeaseRequest>(req).await {
                Ok(r) => renew_lease(state, &node, &spki, r)
                    .await
                    .map(|r| json(StatusCode::OK, &r)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (&Method::POST, "/v1/certs/renew") => match need_node(id) {
            Ok((node, spki)) => match body::<NodeCsrs>(req).await {
                Ok(r) => renew_certs(state, &node, &spki, r)
                    .await
                    .map(|r| json(StatusCode::OK, &r)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (&Method::GET, "/v1/certs/last") => match need_node(id) {
            Ok((node, spki)) => last_renewal(state, &node, &spki)
                .await
                .map(|r| json(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (&Method::GET, "/v1/peers/watch") => match id {
            Identity::Anonymous => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a node or admin client certificate is required",
            )),
            Identity::Node { name, spki_sha256 } => {
                match authorize_node(state, name, spki_sha256).await {
                    Ok(_) => watch_peers(state.clone()).await,
                    Err(e) => Err(e),
                }
            }
            Identity::Admin(_) => watch_peers(state.clone()).await,
        },
        (&Method::GET, "/v1/nodes") => match id {
            Identity::Anonymous => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a node or admin client certificate is required",
            )),
            Identity::Node { name, spki_sha256 } => {
                match authorize_node(state, name, spki_sha256).await {
                    Ok(_) => list_nodes(state).await.map(|r| json(StatusCode::OK, &r)),
                    Err(e) => Err(e),
                }
            }
            Identity::Admin(_) => list_nodes(state).await.map(|r| json(StatusCode::OK, &r)),
        },
        (&Method::POST, "/v1/tokens") => match need_admin(id) {
            Ok(()) => match body::<TokenCreateRequest>(req).await {
                Ok(r) => create_token(state, r)
                    .await
                    .map(|r| json(StatusCode::OK, &r)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (&Method::GET, "/v1/tokens") => match need_admin(id) {
            Ok(()) => list_tokens(state).await.map(|r| json(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (&Method::DELETE, p) if p.starts_with("/v1/tokens/") => match need_admin(id) {
            Ok(()) => revoke_token(state, &p["/v1/tokens/".len()..])
                .await
                .map(|()| json(StatusCode::OK, &serde_json::json!({}))),
            Err(e) => Err(e),
        },
        (&Method::DELETE, p) if p.starts_with("/v1/nodes/") => match need_admin(id) {
            Ok(()) => remove_node(state, &p["/v1/nodes/".len()..])
                .await
                .map(|()| json(StatusCode::OK, &serde_json::json!({}))),
            Err(e) => Err(e),
        },
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such call: {method} {path}"),
        )),
    };
    res.unwrap_or_else(error_response)
}

fn need_node(id: &Identity) -> Result<(String, String), ApiError> {
    match id {
        Identity::Node { name, spki_sha256 } => Ok((name.clone(), spki_sha256.clone())),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this call needs the node's client certificate",
        )),
    }
}

fn need_admin(id: &Identity) -> Result<(), ApiError> {
    match id {
        Identity::Admin(_) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this call needs an admin client certificate (O={ADMIN_GROUP})"),
        )),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn token_rejected() -> ApiError {
    // One message for every token failure: the caller learns nothing about which tokens exist.
    ApiError::new(
        StatusCode::FORBIDDEN,
        "join refused: the token is invalid, expired, revoked or used up",
    )
}

fn node_policy(
    state: &ApiState,
    cn: &str,
    org: &str,
    usage: Usage,
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
) -> SigningPolicy {
    let lifetime = Duration::from_secs(state.settings.leaf_lifetime_secs);
    SigningPolicy {
        common_name: cn.to_owned(),
        organizations: vec![org.to_owned()],
        allowed_dns_names: dns,
        allowed_ip_addresses: ips,
        usage,
        require_san: usage == Usage::Server,
        lifetime,
        max_lifetime: lifetime,
        backdate: pki::ca::DEFAULT_BACKDATE,
    }
}

/// Signs the four node certificates under the node policy (identity from `name`, never from the CSR).
pub fn sign_node_csrs(
    state: &ApiState,
    name: &str,
    addresses: &[std::net::IpAddr],
    csrs: &NodeCsrs,
    now: SystemTime,
) -> Result<NodeCerts, ApiError> {
    let node_cn = format!("system:node:{name}");
    let sign = |what: &str, pem: &str, policy: SigningPolicy| -> Result<String, ApiError> {
        let csr = csr::parse_csr_pem(pem, &state.csr_limits).map_err(|e| {
            log(format!("node {name}: {what} refused: {e}"));
            ApiError::bad(format!("{what}: {e}"))
        })?;
        let cert = csr::sign_csr(&state.ca, &csr, &policy, now).map_err(|e| match e {
            pki::PkiError::PolicyViolation { .. } | pki::PkiError::BadCsr(_) => {
                log(format!("node {name}: {what} refused: {e}"));
                ApiError::new(StatusCode::FORBIDDEN, format!("{what}: {e}"))
            }
            other => ApiError::internal(other),
        })?;
        Ok(cert.pem)
    };
    Ok(NodeCerts {
        kubelet_client: sign(
            "kubelet client CSR",
            &csrs.kubelet_client,
            node_policy(
                state,
                &node_cn,
                "system:nodes",
                Usage::Client,
                vec![],
                vec![],
            ),
        )?,
        kubelet_serving: sign(
            "kubelet serving CSR",
            &csrs.kubelet_serving,
            node_policy(
                state,
                &node_cn,
                "system:nodes",
                Usage::Server,
                vec![name.to_owned()],
                addresses.to_vec(),
            ),
        )?,
        kube_proxy: sign(
            "kube-proxy CSR",
            &csrs.kube_proxy,
            node_policy(
                state,
                "system:kube-proxy",
                "system:node-proxier",
                Usage::Client,
                vec![],
                vec![],
            ),
        )?,
        node_identity: sign(
            "node identity CSR",
            &csrs.node_identity,
            node_policy(
                state,
                &node_cn,
                "system:nodes",
                Usage::Client,
                vec![],
                vec![],
            ),
        )?,
    })
}

fn validate_join(r: &JoinRequest) -> Result<(), ApiError> {
    registry::validate_node_name(&r.node_name)
        .map_err(|e| ApiError::bad(format!("node_name: {e}")))?;
    registry::validate_wireguard_key(&r.wireguard_public_key)
        .map_err(|e| ApiError::bad(format!("wireguard_public_key: {e}")))?;
    if r.addresses.is_empty() || r.addresses.len() > 8 {
        return Err(ApiError::bad("addresses: give 1 to 8 addresses"));
    }
    for a in &r.addresses {
        if a.is_unspecified() || a.is_multicast() {
            return Err(ApiError::bad(format!(
                "addresses: {a} is not a unicast address"
            )));
        }
    }
    if r.endpoint.ip().is_unspecified() || r.endpoint.port() == 0 {
        return Err(ApiError::bad(format!(
            "endpoint: {} is not a usable address and port",
            r.endpoint
        )));
    }
    Ok(())
}

/// Names and addresses no node may claim: a node's serving certificate names them, so a node
/// holding one could impersonate the API server, the meshd API, etcd or the control plane.
fn check_claims(s: &ClusterSettings, r: &JoinRequest) -> Result<(), ApiError> {
    let refuse = |field: &str, what: String| {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{field}: {what}"),
        ))
    };
    let name = r.node_name.as_str();
    let domain = s.cluster_domain.as_str();
    let mut reserved_names: Vec<String> = vec![s.node_name.clone(), "localhost".into()];
    let mut reserved_ips: Vec<std::net::IpAddr> = vec![s.advertise_address];
    reserved_ips.extend(s.etcd_peer_addresses.iter().copied());
    if let Ok(entries) = pki::inventory::control_plane_entries(s) {
        for e in entries.iter().filter(|e| {
            matches!(
                e.id,
                "apiserver" | "meshd-api" | "etcd-server" | "etcd-peer"
            )
        }) {
            reserved_names.extend(e.profile.dns_names.iter().cloned());
            reserved_ips.extend(e.profile.ip_addresses.iter().copied());
        }
    }
    if reserved_names.iter().any(|n| n.eq_ignore_ascii_case(name))
        || name == "kubernetes"
        || name.starts_with("kubernetes.")
        || name == domain
        || name.ends_with(&format!(".{domain}"))
        || name.ends_with(".svc")
    {
        return refuse(
            "node_name",
            format!("{name:?} is reserved for the control plane or cluster services"),
        );
    }
    // A control plane on a loopback address is a single-machine trial: its nodes live on loopback too.
    let loopback_ok = s.advertise_address.is_loopback();
    for a in &r.addresses {
        let link_local = match a {
            std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        if link_local || (a.is_loopback() && !loopback_ok) {
            return refuse("addresses", format!("{a} cannot identify a node"));
        }
        if s.service_cidr.contains(a) || s.cluster_cidr.contains(a) {
            return refuse(
                "addresses",
                format!("{a} lies in the cluster's service or pod network"),
            );
        }
        if reserved_ips.contains(a) {
            return refuse("addresses", format!("{a} belongs to the control plane"));
        }
    }
    Ok(())
}

/// Reads the token's record and checks that `token` may join now, without consuming a use. Every
/// refusal is logged with its reason; the caller gets the generic [`token_rejected`].
async fn admit_token(
    store: &dyn Store,
    token: &Token,
    now: SystemTime,
) -> Result<(crate::store::KeyValue, TokenRecord), ApiError> {
    let Some(kv) = store
        .get(&tokens::key(&token.id))
        .await
        .map_err(ApiError::internal)?
    else {
        log(format!(
            "join refused: token {}: {}",
            token.id,
            tokens::Refusal::Unknown
        ));
        return Err(token_rejected());
    };
    let rec: TokenRecord = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
    if let Err(why) = rec.admit(token, now) {
        log(format!("join refused: token {}: {why}", token.id));
        return Err(token_rejected());
    }
    Ok((kv, rec))
}

/// Registers a node. Every refusal happens before any state changes, and the registration itself is
/// one store transaction: the token use, the node record and the subnet lease are written together
/// or not at all (a single-use token can never admit two nodes, a subnet is never leased twice, a
/// name is never registered twice, however the joins race).
async fn join(
    state: &ApiState,
    r: JoinRequest,
    peer: SocketAddr,
) -> Result<JoinResponse, ApiError> {
    let now = SystemTime::now();
    let token = Token::parse(&r.token).map_err(|_| {
        log(format!("join refused from {peer}: malformed token"));
        token_rejected()
    })?;
    log(format!(
        "join request from {peer}: node {:?}, token {}",
        r.node_name, token.id
    ));
    validate_join(&r)?;
    let store = state.store.as_ref();
    // The token is checked (not consumed) before anything else: a caller without a valid token
    // learns nothing about the cluster (not even which node names are taken) and costs no
    // signatures.
    admit_token(store, &token, now).await?;
    check_claims(&state.settings, &r)?;
    // Sign before registering: a CSR for another identity is refused before anything is written.
    let certs = sign_node_csrs(state, &r.node_name, &r.addresses, &r.csrs, now)?;
    if store
        .get(&registry::key(&r.node_name))
        .await
        .map_err(ApiError::internal)?
        .is_some()
    {
        return Err(name_taken(&r.node_name));
    }
    let attrs = leases::attrs_for(
        &r.node_name,
        &r.addresses,
        &r.wireguard_public_key,
        r.endpoint,
    );
    let store_lease = store
        .grant_lease(leases::LEASE_TTL)
        .await
        .map_err(ApiError::internal)?;
    let identity = identity_hash(&certs)?;
    let registered = register(state, &r, &token, &attrs, store_lease, &identity, now).await;
    let record = match registered {
        Ok(rec) => rec,
        Err(e) => {
            let _ = store.revoke_lease(store_lease).await;
            return Err(e);
        }
    };
    log(format!(
        "node {} joined from {peer}: subnet {}, token {}",
        r.node_name, record.subnet, token.id
    ));
    Ok(JoinResponse {
        subnet: record.subnet,
        node: record,
        certs,
        ca_pem: state.ca.cert_pem().to_owned(),
        network: state.network.clone(),
        apiserver_url: state.settings.apiserver_url(),
        cluster_name: state.settings.cluster_name.clone(),
    })
}

fn name_taken(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "node_name: {name:?} is already registered to another node (if this node's earlier \
             join was interrupted, remove it with `meshd node remove {name}` on the control plane \
             and join with a new token)"
        ),
    )
}

fn random_seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

/// The registration transaction, retried on conflict: compare the token's revision, the absence of
/// the node and of the chosen subnet's lease; put the consumed token, the node record, the lease.
async fn register(
    state: &ApiState,
    r: &JoinRequest,
    token: &Token,
    attrs: &LeaseAttrs,
    store_lease: crate::store::LeaseId,
    identity: &str,
    now: SystemTime,
) -> Result<NodeRecord, ApiError> {
    use crate::store::{Compare, TxnOp};
    let identity = identity.to_owned();
    let store = state.store.as_ref();
    let node_key = registry::key(&r.node_name);
    let lease_value = serde_json::to_vec(attrs).map_err(ApiError::internal)?;
    for _ in 0..64 {
        let (tkv, rec) = admit_token(store, token, now).await?;
        let taken = leases::taken_subnets(store, &state.prefix)
            .await
            .map_err(ApiError::internal)?;
        let subnet = state
            .network
            .choose_subnet(&taken, None, random_seed())
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
        let record = NodeRecord {
            version: registry::RECORD_VERSION,
            name: r.node_name.clone(),
            addresses: r.addresses.clone(),
            wireguard_public_key: r.wireguard_public_key.clone(),
            endpoint: r.endpoint,
            subnet,
            control_plane: false,
            registered: unix(now),
            identity_sha256: identity.clone(),
            last_renewal: None,
        };
        let lease_key = overlay::lease_key(&state.prefix, subnet);
        let mut compares = vec![
            Compare {
                key: tkv.key.clone(),
                mod_revision: tkv.mod_revision,
            },
            Compare {
                key: node_key.clone(),
                mod_revision: 0,
            },
            Compare {
                key: lease_key.clone(),
                mod_revision: 0,
            },
        ];
        let mut ops = vec![
            TxnOp::Put {
                key: tkv.key.clone(),
                value: serde_json::to_vec(&rec.consumed()).map_err(ApiError::internal)?,
                lease: (tkv.lease != 0).then_some(tkv.lease),
            },
            TxnOp::Put {
                key: node_key.clone(),
                value: serde_json::to_vec(&record).map_err(ApiError::internal)?,
                lease: None,
            },
            TxnOp::Put {
                key: lease_key,
                value: lease_value.clone(),
                lease: Some(store_lease),
            },
        ];
        // Each address belongs to one node: its serving certificate names it.
        for a in &r.addresses {
            compares.push(Compare {
                key: registry::address_key(a),
                mod_revision: 0,
            });
            ops.push(TxnOp::Put {
                key: registry::address_key(a),
                value: r.node_name.as_bytes().to_vec(),
                lease: None,
            });
        }
        if store
            .txn(&compares, &ops)
            .await
            .map_err(ApiError::internal)?
            .is_some()
        {
            return Ok(record);
        }
        // Lost a race: for the name (final), or for the token or the subnet (try again).
        if store
            .get(&node_key)
            .await
            .map_err(ApiError::internal)?
            .is_some()
        {
            return Err(name_taken(&r.node_name));
        }
        for a in &r.addresses {
            if let Some(kv) = store
                .get(&registry::address_key(a))
                .await
                .map_err(ApiError::internal)?
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "addresses: {a} is registered to node {:?}",
                        String::from_utf8_lossy(&kv.value)
                    ),
                ));
            }
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too much contention registering the node; retry",
    ))
}

async fn get_node(
    store: &dyn Store,
    name: &str,
) -> Result<(NodeRecord, crate::store::KeyValue), ApiError> {
    let kv = store
        .get(&registry::key(name))
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!("node {name:?} is not registered"),
            )
        })?;
    let rec = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
    Ok((rec, kv))
}

/// The registration of `name`, if `spki_sha256` is its registered identity key.
async fn authorize_node(
    state: &ApiState,
    name: &str,
    spki_sha256: &str,
) -> Result<(NodeRecord, crate::store::KeyValue), ApiError> {
    let (rec, kv) = get_node(state.store.as_ref(), name).await.map_err(|_| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("node {name:?} is not registered (was it removed?)"),
        )
    })?;
    let ok = !rec.identity_sha256.is_empty()
        && subtle::ConstantTimeEq::ct_eq(rec.identity_sha256.as_bytes(), spki_sha256.as_bytes())
            .unwrap_u8()
            == 1;
    if !ok {
        log(format!(
            "refused a certificate for node {name}: its key is not the node's registered identity"
        ));
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("this certificate is not the registered meshd identity of node {name:?}"),
        ));
    }
    Ok((rec, kv))
}

async fn renew_lease(
    state: &ApiState,
    node: &str,
    spki: &str,
    r: RenewLeaseRequest,
) -> Result<RenewLeaseResponse, ApiError> {
    let store = state.store.as_ref();
    let (mut rec, kv) = authorize_node(state, node, spki).await?;
    if r.subnet != rec.subnet {
        return Err(ApiError::bad(format!(
            "subnet: {} is not this node's subnet {}",
            r.subnet, rec.subnet
        )));
    }
    let attrs = leases::attrs_for(
        node,
        &rec.addresses,
        &rec.wireguard_public_key,
        rec.endpoint,
    );
    let lease = leases::renew(store, &state.prefix, &state.network, &attrs, rec.subnet)
        .await
        .map_err(ApiError::internal)?;
    if lease.subnet != rec.subnet {
        log(format!(
            "node {node}: lease of {} had expired and was reassigned; new subnet {}",
            rec.subnet, lease.subnet
        ));
        rec.subnet = lease.subnet;
        let bytes = serde_json::to_vec(&rec).map_err(ApiError::internal)?;
        if store
            .compare_and_swap(&kv.key, kv.mod_revision, &bytes, None)
            .await
            .map_err(ApiError::internal)?
            .is_none()
        {
            // The record changed meanwhile (a removal, a concurrent renewal): the node retries.
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the node's registration changed during the renewal; retry",
            ));
        }
    }
    Ok(RenewLeaseResponse {
        subnet: lease.subnet,
    })
}

/// Renews a node's certificates: authenticated by its current node certificate (no token), new keys
/// and CSRs from the node, identity and SANs from its registration.
async fn renew_certs(
    state: &ApiState,
    node: &str,
    spki: &str,
    csrs: NodeCsrs,
) -> Result<NodeCerts, ApiError> {
    let (mut rec, kv) = authorize_node(state, node, spki).await?;
    let now = SystemTime::now();
    let certs = sign_node_csrs(state, node, &rec.addresses, &csrs, now)?;
    // From now on the new identity key speaks for the node; the bundle is kept for a node that
    // crashes before writing it (`GET /v1/certs/last`).
    rec.last_renewal = Some(Box::new(registry::LastRenewal {
        previous_identity_sha256: rec.identity_sha256.clone(),
        certs: certs.clone(),
        issued: unix(now),
    }));
    rec.identity_sha256 = identity_hash(&certs)?;
    let bytes = serde_json::to_vec(&rec).map_err(ApiError::internal)?;
    if state
        .store
        .compare_and_swap(&kv.key, kv.mod_revision, &bytes, None)
        .await
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's registration changed during the renewal; retry",
        ));
    }
    log(format!("node {node}: certificates renewed"));
    Ok(certs)
}

fn same_hash(a: &str, b: &str) -> bool {
    !a.is_empty() && subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()).unwrap_u8() == 1
}

/// `GET /v1/certs/last`: the bundle the node's last renewal issued ([`registry::LastRenewal`]), for
/// a node that crashed before writing it. Served to the identity that renewal replaced (the one
/// such a node still holds) and to the new one (a node killed half-way through writing it), and
/// only while the bundle's identity certificate is valid. Nothing else accepts the previous
/// identity: it can no longer renew, register a lease or watch peers. 404 when the caller is the
/// registered identity and no renewal is kept; 401 for any other certificate.
async fn last_renewal(state: &ApiState, node: &str, spki: &str) -> Result<NodeCerts, ApiError> {
    let refused = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("this certificate is not the registered meshd identity of node {node:?}"),
        )
    };
    let (rec, _) = get_node(state.store.as_ref(), node)
        .await
        .map_err(|_| refused())?;
    let current = same_hash(&rec.identity_sha256, spki);
    let Some(last) = rec.last_renewal else {
        return Err(if current {
            ApiError::new(StatusCode::NOT_FOUND, "no renewal of this node is kept")
        } else {
            refused()
        });
    };
    if !current && !same_hash(&last.previous_identity_sha256, spki) {
        log(format!(
            "refused a certificate for node {node}: neither its registered identity nor the one its last renewal replaced"
        ));
        return Err(refused());
    }
    let valid = pki::inspect::inspect_pem(&last.certs.node_identity)
        .map(|i| i.not_after > SystemTime::now())
        .unwrap_or(false);
    if !valid {
        return Err(if current {
            ApiError::new(StatusCode::NOT_FOUND, "no renewal of this node is kept")
        } else {
            log(format!(
                "node {node}: its previous identity asked for a renewal that has expired"
            ));
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!("the last renewal of node {node:?} has expired: join again (`meshd join --rejoin`)"),
            )
        });
    }
    if !current {
        log(format!(
            "node {node}: handed its last renewal to its previous identity (it did not write the answer)"
        ));
    }
    Ok(last.certs)
}

/// SHA-256 of the public key of the node identity certificate in `certs`.
fn identity_hash(certs: &NodeCerts) -> Result<String, ApiError> {
    pki::inspect::inspect_pem(&certs.node_identity)
        .map(|i| i.spki_sha256)
        .map_err(ApiError::internal)
}

/// How often the peer stream says it is alive when nothing happens.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// `GET /v1/peers/watch`: a snapshot of the registry, then every change, as newline-delimited JSON.
/// The control plane watches the store; when the store's history no longer reaches back (compaction)
/// or the store watch breaks, it re-lists and sends a new snapshot. A client that stops reading for
/// longer than [`STREAM_SEND_TIMEOUT`] is dropped.
async fn watch_peers(state: Arc<ApiState>) -> Result<HttpResponse, ApiError> {
    use hyper::body::Frame;
    let first = snapshot(state.store.as_ref()).await?;
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel::<PeerEvent>(64);
    tokio::spawn(peer_feed(state.store.clone(), Some(first), events_tx));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        while let Some(e) = events_rx.recv().await {
            let mut v = serde_json::to_vec(&e).unwrap_or_default();
            v.push(b'\n');
            if tx
                .send_timeout(Ok(Frame::data(Bytes::from(v))), STREAM_SEND_TIMEOUT)
                .await
                .is_err()
            {
                // Dropping `events_rx` ends the feed too.
                return;
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed(body))
        .map_err(ApiError::internal)
}

/// Feeds `tx` with the registry: a snapshot (`first`, or a fresh listing), then every change from the
/// store's watch, heartbeats while nothing happens, and a new snapshot whenever the watch breaks or
/// its history was compacted. Ends when the receiver is gone or stops taking events for
/// [`STREAM_SEND_TIMEOUT`]. Used by the peer stream and by the control plane's own mesh.
pub async fn peer_feed(
    store: Arc<dyn Store>,
    first: Option<(i64, PeerEvent)>,
    tx: tokio::sync::mpsc::Sender<PeerEvent>,
) {
    let mut snap = first;
    loop {
        let (revision, event) = match snap.take() {
            Some(s) => s,
            None => match snapshot(store.as_ref()).await {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        if tx.send_timeout(event, STREAM_SEND_TIMEOUT).await.is_err() {
            return;
        }
        let mut watch = match store.watch(registry::PREFIX, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                log(format!("peer stream: store watch failed ({e}); re-listing"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let next = tokio::time::timeout(HEARTBEAT, watch.events.recv()).await;
            let ev = match next {
                Err(_) => PeerEvent::Heartbeat,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    log(format!("peer stream: {e}; re-listing"));
                    break;
                }
                Ok(Some(Ok(crate::store::Event::Put(kv)))) => {
                    match serde_json::from_slice::<NodeRecord>(&kv.value) {
                        Ok(node) => PeerEvent::Put {
                            revision: kv.mod_revision,
                            node: node.for_peers(),
                        },
                        Err(e) => {
                            log(format!(
                                "peer stream: skipping corrupt node record {}: {e}",
                                kv.key
                            ));
                            continue;
                        }
                    }
                }
                Ok(Some(Ok(crate::store::Event::Delete { key, mod_revision }))) => {
                    PeerEvent::Delete {
                        revision: mod_revision,
                        name: key.trim_start_matches(registry::PREFIX).to_owned(),
                    }
                }
            };
            if tx.send_timeout(ev, STREAM_SEND_TIMEOUT).await.is_err() {
                return;
            }
        }
    }
}

async fn snapshot(store: &dyn Store) -> Result<(i64, PeerEvent), ApiError> {
    let listing = store
        .list(registry::PREFIX)
        .await
        .map_err(ApiError::internal)?;
    let mut nodes = Vec::with_capacity(listing.kvs.len());
    for kv in &listing.kvs {
        match serde_json::from_slice::<NodeRecord>(&kv.value) {
            Ok(n) => nodes.push(n.for_peers()),
            Err(e) => log(format!("skipping corrupt node record {}: {e}", kv.key)),
        }
    }
    Ok((
        listing.revision,
        PeerEvent::Snapshot {
            revision: listing.revision,
            nodes,
        },
    ))
}

async fn list_nodes(state: &ApiState) -> Result<Vec<NodeRecord>, ApiError> {
    let listing = state
        .store
        .list(registry::PREFIX)
        .await
        .map_err(ApiError::internal)?;
    listing
        .kvs
        .iter()
        .map(|kv| {
            serde_json::from_slice::<NodeRecord>(&kv.value)
                .map(NodeRecord::for_peers)
                .map_err(ApiError::internal)
        })
        .collect()
}

async fn remove_node(state: &ApiState, name: &str) -> Result<(), ApiError> {
    let store = state.store.as_ref();
    let (rec, kv) = get_node(store, name).await.map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("node {name:?} is not registered"),
        )
    })?;
    if rec.control_plane {
        return Err(ApiError::bad(format!(
            "{name:?} is the control plane itself; it cannot be removed through its own API"
        )));
    }
    // The record and the address claims go together.
    use crate::store::{Compare, TxnOp};
    let mut ops = vec![TxnOp::Delete {
        key: kv.key.clone(),
    }];
    for a in &rec.addresses {
        let k = registry::address_key(a);
        if let Some(c) = store.get(&k).await.map_err(ApiError::internal)? {
            if c.value == name.as_bytes() {
                ops.push(TxnOp::Delete { key: k });
            }
        }
    }
    let cmp = [Compare {
        key: kv.key.clone(),
        mod_revision: kv.mod_revision,
    }];
    if store
        .txn(&cmp, &ops)
        .await
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's registration changed meanwhile; retry",
        ));
    }
    let _ = leases::release(store, &state.prefix, rec.subnet, name).await;
    log(format!(
        "node {name} removed; subnet {} released",
        rec.subnet
    ));
    Ok(())
}

async fn create_token(
    state: &ApiState,
    r: TokenCreateRequest,
) -> Result<TokenCreateResponse, ApiError> {
    if r.ttl_secs == 0 || r.ttl_secs > 30 * 86400 {
        return Err(ApiError::bad("ttl: must be between 1 second and 30 days"));
    }
    if r.uses == Some(0) {
        return Err(ApiError::bad("uses: must be at least 1"));
    }
    if r.description.len() > 256 {
        return Err(ApiError::bad("description: at most 256 characters"));
    }
    let now = SystemTime::now();
    let store = state.store.as_ref();
    for _ in 0..8 {
        let token = Token::generate().map_err(ApiError::internal)?;
        let rec = TokenRecord::new(
            &token,
            Duration::from_secs(r.ttl_secs),
            r.uses,
            &r.description,
            now,
        );
        let bytes = serde_json::to_vec(&rec).map_err(ApiError::internal)?;
        // The record disappears on its own shortly after it expires.
        let lease = store
            .grant_lease(Duration::from_secs(r.ttl_secs + 60))
            .await
            .map_err(ApiError::internal)?;
        if store
            .create(&tokens::key(&token.id), &bytes, Some(lease))
            .await
            .map_err(ApiError::internal)?
            .is_some()
        {
            log(format!(
                "token {} created ({} uses, expires {})",
                token.id,
                r.uses.map(|u| u.to_string()).unwrap_or("unlimited".into()),
                pki::time::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(rec.expires))
            ));
            return Ok(TokenCreateResponse {
                token: token.expose().to_string(),
                ca_hash: format!("sha256:{}", state.ca.spki_sha256()),
                server: state.server_addr.clone(),
                expires: pki::time::rfc3339(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(rec.expires),
                ),
            });
        }
        let _ = store.revoke_lease(lease).await;
    }
    Err(ApiError::internal("could not find a free token id"))
}

async fn list_tokens(state: &ApiState) -> Result<Vec<TokenInfo>, ApiError> {
    let listing = state
        .store
        .list(tokens::PREFIX)
        .await
        .map_err(ApiError::internal)?;
    let mut out = Vec::new();
    for kv in listing.kvs {
        let rec: TokenRecord = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
        out.push(TokenInfo {
            id: rec.id,
            description: rec.description,
            expires: pki::time::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(rec.expires)),
            uses_left: rec.uses_left,
            used: rec.used,
            revoked: rec.revoked,
        });
    }
    Ok(out)
}

async fn revoke_token(state: &ApiState, id: &str) -> Result<(), ApiError> {
    if id.len() != 6
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(ApiError::bad(format!(
            "token id {id:?} is not of the form [a-z0-9]{{6}}"
        )));
    }
    // Kept as a revoked record until it expires, so a later join with it is logged as "revoked".
    let store = state.store.as_ref();
    for _ in 0..16 {
        let Some(kv) = store
            .get(&tokens::key(id))
            .await
            .map_err(ApiError::internal)?
        else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no token with id {id}"),
            ));
        };
        let mut rec: TokenRecord = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
        rec.revoked = true;
        let bytes = serde_json::to_vec(&rec).map_err(ApiError::internal)?;
        let lease = (kv.lease != 0).then_some(kv.lease);
        if store
            .compare_and_swap(&kv.key, kv.mod_revision, &bytes, lease)
            .await
            .map_err(ApiError::internal)?
            .is_some()
        {
            log(format!("token {id} revoked"));
            return Ok(());
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "token busy; retry",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        assert_eq!(identity_of(None), Identity::Anonymous);
        assert_eq!(identity_of(Some(b"junk")), Identity::Anonymous);
    }
}
