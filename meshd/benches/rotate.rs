//! Rotation cost: the whole control-plane inventory renewed locally, and node bundles (four
//! certificates each) renewed through the meshd API.
//!
//! `cargo bench -p meshd --bench rotate` (env: ROUNDS=20 NODES=100 CONCURRENCY=16).
//!
//! * `control-plane`: `rotate::rotate(--force all)` on a fresh `meshd init` directory, ROUNDS times:
//!   18 new keys and certificates, each verified and written through the versioned store (three files
//!   fsynced, a directory rename, the `current` switch, directory fsyncs), plus the two embedded
//!   kubeconfigs. Also the same as a process (`meshd rotate --force all`), start-up included.
//! * `nodes`: NODES nodes joined to an in-process control plane (embedded store), then each renews its
//!   bundle with `POST /v1/certs/renew`, authenticated by its identity certificate (new mTLS
//!   connection), CONCURRENCY at a time. The node side's key generation and CSRs happen before the
//!   clock starts; what is timed is the handshakes and the control plane's work (four CSRs verified
//!   and signed, the registration switched to the new identity by compare-and-swap).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use meshd::api::client::ApiClient;
use meshd::api::{JoinRequest, JoinResponse, NodeCerts, NodeCsrs, TokenCreateRequest};
use pki::keys::{KeyAlgorithm, PrivateKey};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn meshd_init(dir: &Path, api_port: u16) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(["init", "--data-dir"])
        .arg(dir)
        .args(["--node-name", "cp1", "--advertise-address", "127.0.0.1"])
        .args(["--cluster-cidr", "172.16.0.0/12", "--api-port"])
        .arg(api_port.to_string())
        .output()
        .expect("meshd init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    format!(
        "median {:.1} ms, mean {:.1} ms, min {:.1} ms, max {:.1} ms ({} rounds)",
        v[v.len() / 2],
        mean,
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

async fn control_plane(rounds: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    meshd_init(dir.path(), free_port());
    let opts = meshd::rotate::Options {
        force: meshd::rotate::Force::All,
        ..Default::default()
    };
    let mut times = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let r = meshd::rotate::rotate(dir.path(), &opts)
            .await
            .expect("rotate");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.renewed().len(), 18, "{:?}", r.summary_lines());
    }
    println!(
        "rotate[control-plane, in process]: 18 leaves: {}",
        stats(times)
    );
    let mut times = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_meshd"))
            .args(["rotate", "--force", "all", "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("meshd rotate");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success());
    }
    println!(
        "rotate[control-plane, `meshd rotate --force all`]: 18 leaves: {}",
        stats(times)
    );
}

struct Node {
    client: ApiClient,
    csrs: NodeCsrs,
}

fn csrs(name: &str, addr: std::net::IpAddr) -> NodeCsrs {
    let entries = pki::inventory::node_entries(name, &[addr]);
    let csr = |id: &str| {
        let e = entries.iter().find(|e| e.id == id).expect("entry");
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        (pki::csr::build_csr(&e.profile, &k).expect("csr"), k)
    };
    let (kc, _) = csr("kubelet.conf");
    let (ks, _) = csr("kubelet-serving");
    let (kp, _) = csr("kube-proxy.conf");
    let (ni, _) = csr("meshd-node");
    NodeCsrs {
        kubelet_client: kc,
        kubelet_serving: ks,
        kube_proxy: kp,
        node_identity: ni,
    }
}

async fn nodes(n: usize, concurrency: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    meshd_init(dir.path(), port);
    let data = dir.path().to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cp = tokio::spawn(async move {
        meshd::run::run_control_plane(&data, None, None, async {
            let _ = rx.await;
        })
        .await
    });
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = meshd::join::node_client(dir.path()).expect("admin client");
    let t: meshd::api::TokenCreateResponse = admin
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&TokenCreateRequest {
                ttl_secs: 3600,
                uses: Some(n as u32),
                description: "bench".into(),
            }),
        )
        .await
        .expect("token");
    let ca_pem = std::fs::read_to_string(dir.path().join("pki/ca.crt")).expect("ca");
    let verifier = Arc::new(meshd::tls::PinnedCaVerifier::new(&t.ca_hash).expect("pin"));
    let pinned = ApiClient::new(
        &addr,
        meshd::tls::pinned_client_config(verifier).expect("tls"),
    )
    .expect("client");
    // Join every node (not timed), keeping the identity key to authenticate its renewal.
    let mut ready = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("bench-{i}");
        let ip: std::net::IpAddr = format!("10.9.{}.{}", i / 250, i % 250 + 1)
            .parse()
            .expect("addr");
        let entries = pki::inventory::node_entries(&name, &[ip]);
        let id_entry = entries
            .iter()
            .find(|e| e.id == "meshd-node")
            .expect("entry");
        let id_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let mut join_csrs = csrs(&name, ip);
        join_csrs.node_identity = pki::csr::build_csr(&id_entry.profile, &id_key).expect("csr");
        let r: JoinResponse = pinned
            .call(
                Method::POST,
                "/v1/join",
                Some(&JoinRequest {
                    token: t.token.clone(),
                    node_name: name.clone(),
                    addresses: vec![ip],
                    wireguard_public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                    endpoint: SocketAddr::new(ip, 51820),
                    csrs: join_csrs,
                }),
            )
            .await
            .expect("join");
        let tls =
            meshd::tls::client_config(&ca_pem, &r.certs.node_identity, id_key.to_pem().expose())
                .expect("tls");
        ready.push(Node {
            client: ApiClient::new(&addr, tls).expect("client"),
            csrs: csrs(&name, ip),
        });
    }
    let queue = Arc::new(tokio::sync::Mutex::new(ready));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let q = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let Some(node) = q.lock().await.pop() else {
                    break;
                };
                let _: NodeCerts = node
                    .client
                    .call(Method::POST, "/v1/certs/renew", Some(&node.csrs))
                    .await
                    .expect("renew");
                done += 1;
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("task");
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(done, n);
    println!(
        "rotate[nodes, API]: {n} node bundles (4 certificates each), concurrency {concurrency}: {:.0} ms in all, {:.0} bundles/s",
        secs * 1000.0,
        n as f64 / secs
    );
    let _ = tx.send(());
    let _ = cp.await;
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(control_plane(env("ROUNDS", 20)));
    rt.block_on(nodes(env("NODES", 100), env("CONCURRENCY", 16)));
}
