//! `meshd run` on a control-plane node: open the store, make sure the network configuration is in it,
//! and serve the meshd API until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use pki::ca::CertificateAuthority;
use pki::csr::CsrLimits;
use pki::inventory::CaId;
use pki::keys::PrivateKey;
use tokio::sync::watch;

use crate::api::server::{self, log, ApiState};
use crate::material::{self, Found};
use crate::mesh::{Mesh, MeshOptions};
use crate::settings::{self, MeshdConfig, Role, StoreKind};
use crate::store::{
    embedded::EmbeddedStore,
    etcd::{EtcdStore, EtcdTls},
    Store,
};

/// Opens the store a control plane's settings name.
pub async fn open_store(data_dir: &Path, cfg: &MeshdConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(open_store_with_handle(data_dir, cfg).await?.0)
}

/// meshd's etcd client credentials from the data directory (the live `meshd-etcd-client` pair).
pub fn etcd_tls(data_dir: &Path) -> anyhow::Result<EtcdTls> {
    let ca_pem = pki::store::read_text(&data_dir.join("pki/etcd/ca.crt"))?;
    let cert_pem = pki::store::read_text(&data_dir.join("pki/etcd/meshd-client.crt"))?;
    let key = pki::store::read_key_file(&data_dir.join("pki/etcd/meshd-client.key"))?;
    Ok(EtcdTls {
        ca_pem,
        cert_pem,
        key_pem: zeroize::Zeroizing::new(key.expose().to_owned()),
    })
}

/// [`open_store`], and the etcd store itself when it is one (to reload its client certificate).
async fn open_store_with_handle(
    data_dir: &Path,
    cfg: &MeshdConfig,
) -> anyhow::Result<(Arc<dyn Store>, Option<EtcdStore>)> {
    Ok(match cfg.store.kind {
        StoreKind::Embedded => (
            Arc::new(EmbeddedStore::open(&data_dir.join("state.redb"))?),
            None,
        ),
        StoreKind::Etcd => {
            let tls = etcd_tls(data_dir)?;
            let etcd = EtcdStore::connect(&cfg.store.etcd_endpoints, Some(tls)).await?;
            (Arc::new(etcd.clone()), Some(etcd))
        }
    })
}

/// Makes sure `<prefix>/config` holds the network configuration for `cluster_cidr`, and returns it.
pub async fn ensure_network_config(
    store: &dyn Store,
    prefix: &str,
    cluster_cidr: ipnet::IpNet,
) -> anyhow::Result<overlay::NetworkConfig> {
    let ipnet::IpNet::V4(net) = cluster_cidr else {
        bail!("the cluster CIDR {cluster_cidr} is IPv6; meshd's overlay is IPv4 for now");
    };
    let key = format!("{}/config", prefix.trim_end_matches('/'));
    let want = overlay::NetworkConfig::with_defaults(
        net,
        overlay::Backend {
            kind: "wireguard".into(),
            listen_port: 51820,
            persistent_keepalive_interval: 25,
            mtu: 0,
        },
    )?;
    if let Some(kv) = store.get(&key).await? {
        let have: overlay::NetworkConfig = serde_json::from_slice(&kv.value)
            .with_context(|| format!("{key} in the store is not a valid network config"))?;
        have.validate()
            .with_context(|| format!("{key} in the store"))?;
        if have.network != want.network {
            bail!(
                "the store's network config ({key}) is for {}, but this control plane's cluster CIDR is {}: refusing to mix them",
                have.network,
                want.network
            );
        }
        return Ok(have);
    }
    let bytes = serde_json::to_vec(&want)?;
    if store.create(&key, &bytes, None).await?.is_none() {
        // Someone else wrote it meanwhile: use theirs.
        let kv = store.get(&key).await?.context("network config vanished")?;
        return Ok(serde_json::from_slice(&kv.value)?);
    }
    Ok(want)
}

fn load_ca(data_dir: &Path) -> anyhow::Result<CertificateAuthority> {
    match material::read_ca(data_dir, CaId::Cluster)? {
        Found::Present(m) => {
            let key = PrivateKey::from_pem_bundle(m.key_pem.expose())
                .with_context(|| m.key_path.display().to_string())?;
            Ok(CertificateAuthority::from_parts(m.cert_pem, key)
                .with_context(|| m.cert_path.display().to_string())?)
        }
        _ => bail!(
            "{}: the cluster CA is missing; run `meshd init`",
            data_dir.join("pki/ca.crt").display()
        ),
    }
}

/// Runs the control plane until `shutdown` resolves. `listen` overrides the advertise address and
/// API port.
pub async fn run_control_plane(
    data_dir: &Path,
    listen: Option<SocketAddr>,
    mesh: Option<MeshOptions>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = settings::require_config(data_dir)?;
    // Start-up check: every live pair valid, else back to the previous one (a crash mid-rotation).
    let recovered = crate::recover::recover_locked(data_dir)?;
    crate::recover::log_all("run", &recovered);
    if cfg.role != Role::ControlPlane {
        return run_node(data_dir, mesh, shutdown).await;
    }
    let s = cfg
        .cluster
        .clone()
        .context("meshd.json: no cluster settings")?;
    let ca = load_ca(data_dir)?;
    let api = match material::read_pair(
        data_dir,
        "meshd-api",
        &pki::store::PairLinks {
            cert: Some("pki/meshd/api-server.crt".into()),
            key: Some("pki/meshd/api-server.key".into()),
            combined: None,
        },
    )? {
        Found::Present(m) => m,
        _ => bail!("pki/meshd/api-server.crt is missing; run `meshd init` again to complete the data directory"),
    };
    let chain = format!("{}{}", api.cert_pem, ca.cert_pem());
    let tls = crate::tls::server_config(&chain, api.key_pem.expose(), ca.cert_pem())?;
    let (store, etcd) = open_store_with_handle(data_dir, &cfg).await?;
    let network = ensure_network_config(store.as_ref(), &cfg.store.prefix, s.cluster_cidr).await?;
    let (wg_public, _) = crate::wgkey::ensure(data_dir)?;
    let me = register_self(store.as_ref(), &cfg.store.prefix, &network, &s, &wg_public).await?;
    log(format!(
        "control plane {} registered in the mesh: subnet {}, endpoint {}",
        me.name, me.subnet, me.endpoint
    ));
    // The control plane's own mesh follows the store directly.
    let mesh_task = match &mesh {
        Some(opts) => {
            let ipnet::IpNet::V4(net) = s.cluster_cidr else {
                bail!("the cluster CIDR must be IPv4");
            };
            let (private, _) = crate::wgkey::load(data_dir)?;
            let key = overlay::wg::PrivateKey::from_base64(private.expose().trim())
                .context("wireguard/private.key")?;
            let m = Mesh::start(opts, key, &me, net, s.advertise_address)?;
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(crate::api::server::peer_feed(store.clone(), None, tx));
            Some(tokio::spawn(follow(m, rx)))
        }
        None => None,
    };
    let addr = listen.unwrap_or(SocketAddr::new(s.advertise_address, s.api_port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let state = Arc::new(ApiState {
        store: store.clone(),
        ca,
        settings: s.clone(),
        network,
        prefix: cfg.store.prefix.clone(),
        // What nodes dial (the bind address may be a wildcard).
        server_addr: SocketAddr::new(s.advertise_address, s.api_port).to_string(),
        csr_limits: CsrLimits::default(),
    });
    log(format!(
        "meshd API listening on https://{local} (store: {})",
        store.describe()
    ));
    // Keep the control plane's own subnet lease alive.
    let renew_store = store.clone();
    let renew_prefix = cfg.store.prefix.clone();
    let renew_network = state.network.clone();
    let renew_settings = s.clone();
    let renewer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE_RENEW_EVERY).await;
            if let Err(e) = register_self(
                renew_store.as_ref(),
                &renew_prefix,
                &renew_network,
                &renew_settings,
                &wg_public,
            )
            .await
            {
                log(format!(
                    "renewing the control plane's own lease failed: {e:#}"
                ));
            }
        }
    });
    let (tls_tx, tls_rx) = watch::channel(tls);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Rotation: the planner renews what is due and publishes the renewed entry ids; the API listener
    // reloads its certificate from them (subscribe to `rotation` for other consumers).
    let (rotation, _) = tokio::sync::broadcast::channel(16);
    let reloader = tokio::spawn(crate::rotate::reload_api_listener(
        data_dir.to_path_buf(),
        state.ca.cert_pem().to_owned(),
        rotation.subscribe(),
        tls_tx,
    ));
    // meshd's own etcd client picks up its renewed certificate (a reconnect after the first one
    // expired would be refused).
    let etcd_reloader = etcd.map(|e| {
        let dir = data_dir.to_path_buf();
        tokio::spawn(crate::store::etcd::follow_rotation(
            e,
            "meshd-etcd-client",
            move || etcd_tls(&dir),
            rotation.subscribe(),
            log,
        ))
    });
    let rotator = tokio::spawn(crate::rotate::daemon(
        data_dir.to_path_buf(),
        rotation.clone(),
        stop_rx.clone(),
    ));
    let server = tokio::spawn(server::serve(listener, tls_rx, state, stop_rx));
    // The Kubernetes components (when components.json asks for them), restarted or left alone
    // after their certificates renew, as each reloads.
    let components = crate::components::start(data_dir, Some(rotation.subscribe())).await?;
    shutdown.await;
    log("shutting down");
    components.stop().await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = rotator.await;
    reloader.abort();
    if let Some(t) = etcd_reloader {
        t.abort();
    }
    renewer.abort();
    if let Some(t) = mesh_task {
        t.abort();
        // Dropping the mesh removes the interface and its route.
        let _ = t.await;
    }
    Ok(())
}

/// How often a node renews its subnet lease (the lease lives 24 h).
pub const LEASE_RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Runs a joined node until `shutdown` resolves: renews its subnet lease through the API well before
/// it expires, retrying with jittered backoff while the control plane is unreachable, and records a
/// new subnet should the old lease have expired meanwhile.
pub async fn run_node(
    data_dir: &Path,
    mesh: Option<MeshOptions>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use std::time::Duration;
    let mut cfg = settings::require_config(data_dir)?;
    // Checked once here; every call makes a new client with the identity certificate live at that
    // moment, so a renewed certificate is used from the next connection on.
    crate::join::node_client(data_dir)?;
    let name = cfg
        .joined
        .as_ref()
        .map(|j| j.name.clone())
        .unwrap_or_default();
    let mesh_task = match (&mesh, &cfg.joined) {
        (Some(opts), Some(j)) => {
            let (private, public) = crate::wgkey::load(data_dir)?;
            let key = overlay::wg::PrivateKey::from_base64(private.expose().trim())
                .context("wireguard/private.key")?;
            let me = crate::registry::NodeRecord {
                version: crate::registry::RECORD_VERSION,
                name: j.name.clone(),
                addresses: j.addresses.clone(),
                wireguard_public_key: public,
                endpoint: j.endpoint,
                subnet: j.subnet,
                control_plane: false,
                registered: 0,
                identity_sha256: String::new(),
                last_renewal: None,
            };
            let server_ip = server_ip(&j.server)?;
            let m = Mesh::start(opts, key, &me, j.network.network, server_ip)?;
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(stream_peers(data_dir.to_path_buf(), tx));
            Some(tokio::spawn(follow(m, rx)))
        }
        _ => None,
    };
    log(format!(
        "node {name}: running; subnet lease renewed every {}h",
        LEASE_RENEW_EVERY.as_secs() / 3600
    ));
    let (rotation, _) = tokio::sync::broadcast::channel(16);
    let components = crate::components::start(data_dir, Some(rotation.subscribe())).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let rotator = tokio::spawn(crate::rotate::daemon(
        data_dir.to_path_buf(),
        rotation,
        stop_rx,
    ));
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(5);
    loop {
        let Some(j) = cfg.joined.clone() else {
            bail!("meshd.json: a node without its join record");
        };
        let req = crate::api::RenewLeaseRequest { subnet: j.subnet };
        let call = async {
            crate::join::node_client(data_dir)
                .map_err(|e| format!("{e:#}"))?
                .call::<crate::api::RenewLeaseResponse>(
                    hyper::Method::POST,
                    "/v1/lease/renew",
                    Some(&req),
                )
                .await
                .map_err(|e| e.to_string())
        };
        let wait = match call.await {
            Ok(r) => {
                backoff = Duration::from_secs(5);
                if r.subnet != j.subnet {
                    log(format!("node {name}: the lease of {} had expired and was given away; new subnet {}", j.subnet, r.subnet));
                    if let Some(jj) = cfg.joined.as_mut() {
                        jj.subnet = r.subnet;
                    }
                    settings::save_config(data_dir, &cfg)?;
                }
                LEASE_RENEW_EVERY
            }
            Err(e) => {
                log(format!(
                    "node {name}: lease renewal failed ({e}); retrying in {}s",
                    backoff.as_secs()
                ));
                let w = backoff + Duration::from_millis(u64::from(rand_u16()) % 1000);
                backoff = (backoff * 2).min(Duration::from_secs(300));
                w
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    log(format!("node {name}: shutting down"));
    let _ = stop_tx.send(true);
    let _ = rotator.await;
    components.stop().await;
    if let Some(t) = mesh_task {
        t.abort();
        let _ = t.await;
    }
    Ok(())
}

/// The control plane's address from `host:port` (a name is resolved).
fn server_ip(server: &str) -> anyhow::Result<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .map(|a| a.ip())
        .with_context(|| format!("{server} resolves to no address"))
}

/// Applies registry events to the mesh until the feed ends.
async fn follow(mut mesh: Mesh, mut rx: tokio::sync::mpsc::Receiver<crate::api::PeerEvent>) {
    while let Some(ev) = rx.recv().await {
        if let Err(e) = mesh.handle(&ev) {
            log(format!("mesh: {e:#}"));
        }
    }
}

/// Streams the registry from the control plane into `tx`, reconnecting with jittered backoff. The
/// peers stay as they are while the control plane is unreachable: a broken watch never removes a
/// peer.
async fn stream_peers(
    data_dir: std::path::PathBuf,
    tx: tokio::sync::mpsc::Sender<crate::api::PeerEvent>,
) {
    use std::time::Duration;
    let mut backoff = Duration::from_millis(500);
    loop {
        // A new client per connection: the identity certificate live now (it may have been renewed).
        let watch = match crate::join::node_client(&data_dir) {
            Ok(client) => client.watch_peers().await,
            Err(e) => Err(crate::api::client::ClientError::Other(format!("{e:#}"))),
        };
        match watch {
            Ok(mut rx) => {
                backoff = Duration::from_millis(500);
                while let Some(ev) = rx.recv().await {
                    match ev {
                        Ok(e) => {
                            if tx.send(e).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            log(format!("mesh: peer stream ended ({e}); reconnecting"));
                            break;
                        }
                    }
                }
            }
            Err(e) => log(format!(
                "mesh: cannot reach the control plane ({e}); retrying"
            )),
        }
        tokio::time::sleep(backoff + Duration::from_millis(u64::from(rand_u16()) % 250)).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn rand_u16() -> u16 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u16::from_le_bytes(b)
}

/// Registers (or refreshes) the control plane itself as a mesh node: its WireGuard key, endpoint and
/// a subnet lease, keeping the subnet it had.
pub async fn register_self(
    store: &dyn Store,
    prefix: &str,
    network: &overlay::NetworkConfig,
    s: &pki::inventory::ClusterSettings,
    wireguard_public_key: &str,
) -> anyhow::Result<crate::registry::NodeRecord> {
    use crate::registry::{self, NodeRecord};
    let key = registry::key(&s.node_name);
    let existing = store.get(&key).await?;
    let previous: Option<NodeRecord> = match &existing {
        Some(kv) => Some(
            serde_json::from_slice(&kv.value)
                .with_context(|| format!("{key} in the store is not a node record"))?,
        ),
        None => None,
    };
    if let Some(p) = &previous {
        if !p.control_plane && p.wireguard_public_key != wireguard_public_key {
            bail!(
                "node name {:?} is registered to a joined node (key {}); this control plane cannot take it over",
                s.node_name,
                p.wireguard_public_key
            );
        }
    }
    let endpoint = SocketAddr::new(s.advertise_address, network.backend.listen_port);
    let addresses = vec![s.advertise_address];
    let attrs = crate::leases::attrs_for(&s.node_name, &addresses, wireguard_public_key, endpoint);
    let lease = crate::leases::acquire(
        store,
        prefix,
        network,
        &attrs,
        previous.as_ref().map(|p| p.subnet),
    )
    .await?;
    let record = NodeRecord {
        version: registry::RECORD_VERSION,
        name: s.node_name.clone(),
        addresses,
        wireguard_public_key: wireguard_public_key.to_owned(),
        endpoint,
        subnet: lease.subnet,
        control_plane: true,
        // The control plane does not call its own API as a node.
        identity_sha256: String::new(),
        last_renewal: None,
        registered: previous.as_ref().map(|p| p.registered).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }),
    };
    let bytes = serde_json::to_vec(&record)?;
    match (&existing, &previous) {
        (Some(_), Some(p)) if *p == record => {}
        (Some(kv), _) => {
            if store
                .compare_and_swap(&key, kv.mod_revision, &bytes, None)
                .await?
                .is_none()
            {
                bail!("{key} changed while this control plane registered itself; restart meshd");
            }
        }
        (None, _) => {
            if store.create(&key, &bytes, None).await?.is_none() {
                bail!("{key} appeared while this control plane registered itself; restart meshd");
            }
        }
    }
    Ok(record)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
