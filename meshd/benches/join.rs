//! Joins per second at the control plane: TLS handshake (CA-pinned), four CSRs verified and signed,
//! the token consumed with compare-and-swap, a subnet lease and a node record created — on the
//! embedded store and on a real etcd with mTLS.
//!
//! `cargo bench -p meshd --bench join` (env: JOINS=500 CONCURRENCY=16 STORES=embedded,etcd).
//! The client side's key generation and CSR building happen before the clock starts; what is timed
//! is the control plane's work plus the client's handshakes, on the same 2 cores.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use meshd::api::client::ApiClient;
use meshd::api::{JoinRequest, JoinResponse, NodeCsrs, TokenCreateRequest, TokenCreateResponse};
use pki::keys::{KeyAlgorithm, PrivateKey};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn meshd_init(dir: &Path, api_port: u16, extra: &[&str]) {
    let bin = env!("CARGO_BIN_EXE_meshd");
    let out = Command::new(bin)
        .args(["init", "--data-dir"])
        .arg(dir)
        .args(["--node-name", "cp1", "--advertise-address", "127.0.0.1"])
        // 4096 /24 subnets: room for every benchmark join.
        .args(["--cluster-cidr", "172.16.0.0/12", "--api-port"])
        .arg(api_port.to_string())
        .args(extra)
        .output()
        .expect("meshd init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_etcd(dir: &Path) -> (Kill, String) {
    let (cp, pp) = (free_port(), free_port());
    let pki = dir.join("pki/etcd");
    let data = dir.join("etcd-data");
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(&data)
        .args(["--listen-client-urls", &format!("https://127.0.0.1:{cp}")])
        .args([
            "--advertise-client-urls",
            &format!("https://127.0.0.1:{cp}"),
        ])
        .args(["--listen-peer-urls", &format!("https://127.0.0.1:{pp}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("https://127.0.0.1:{pp}"),
        ])
        .args([
            "--initial-cluster",
            &format!("bench=https://127.0.0.1:{pp}"),
        ])
        .args([
            "--initial-cluster-state",
            "new",
            "--client-cert-auth",
            "--peer-client-cert-auth",
        ])
        .arg("--cert-file")
        .arg(pki.join("server.crt"))
        .arg("--key-file")
        .arg(pki.join("server.key"))
        .arg("--trusted-ca-file")
        .arg(pki.join("ca.crt"))
        .arg("--peer-cert-file")
        .arg(pki.join("peer.crt"))
        .arg("--peer-key-file")
        .arg(pki.join("peer.key"))
        .arg("--peer-trusted-ca-file")
        .arg(pki.join("ca.crt"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (apt-get install etcd-server)");
    (Kill(child), format!("https://127.0.0.1:{cp}"))
}

struct Prepared {
    req: JoinRequest,
}

fn prepare(i: usize, token: String) -> Prepared {
    let name = format!("bench-{i}");
    let addr: std::net::IpAddr = format!(
        "10.{}.{}.{}",
        1 + i / 62500 % 200,
        i / 250 % 250,
        i % 250 + 1
    )
    .parse()
    .expect("addr");
    let entries = pki::inventory::node_entries(&name, &[addr]);
    let csr = |id: &str| {
        let e = entries.iter().find(|e| e.id == id).expect("entry");
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        pki::csr::build_csr(&e.profile, &k).expect("csr")
    };
    Prepared {
        req: JoinRequest {
            token,
            node_name: name,
            addresses: vec![addr],
            wireguard_public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            endpoint: SocketAddr::new(addr, 51820),
            csrs: NodeCsrs {
                kubelet_client: csr("kubelet.conf"),
                kubelet_serving: csr("kubelet-serving"),
                kube_proxy: csr("kube-proxy.conf"),
                node_identity: csr("meshd-node"),
            },
        },
    }
}

async fn bench_store(kind: &str, joins: usize, concurrency: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut _etcd = None;
    if kind == "etcd" {
        // init first (it writes the etcd certificates), then start etcd with them.
        let placeholder = format!("https://127.0.0.1:{}", free_port());
        meshd_init(
            dir.path(),
            port,
            &["--store", "etcd", "--etcd-endpoints", &placeholder],
        );
        let (k, url) = start_etcd(dir.path());
        _etcd = Some(k);
        meshd_init(
            dir.path(),
            port,
            &["--store", "etcd", "--etcd-endpoints", &url],
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    } else {
        meshd_init(dir.path(), port, &[]);
    }
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
    let mut prepared = Vec::with_capacity(joins);
    let mut ca_hash = String::new();
    for i in 0..joins {
        let t: TokenCreateResponse = admin
            .call(
                Method::POST,
                "/v1/tokens",
                Some(&TokenCreateRequest {
                    ttl_secs: 3600,
                    uses: Some(1),
                    description: "bench".into(),
                }),
            )
            .await
            .expect("token");
        ca_hash = t.ca_hash.clone();
        prepared.push(prepare(i, t.token));
    }
    let verifier = Arc::new(meshd::tls::PinnedCaVerifier::new(&ca_hash).expect("pin"));
    let client = ApiClient::new(
        &addr,
        meshd::tls::pinned_client_config(verifier).expect("tls"),
    )
    .expect("client");
    let queue = Arc::new(tokio::sync::Mutex::new(prepared));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let q = queue.clone();
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Some(p) = q.lock().await.pop() else { break };
                let r: JoinResponse = c
                    .call(Method::POST, "/v1/join", Some(&p.req))
                    .await
                    .expect("join");
                assert_eq!(r.node.name, p.req.node_name);
                n += 1;
            }
            n
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("task");
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(done, joins);
    let _ = tx.send(());
    let _ = cp.await;
    joins as f64 / secs
}

fn main() {
    let joins: usize = std::env::var("JOINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let conc: usize = std::env::var("CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let stores = std::env::var("STORES").unwrap_or_else(|_| "embedded,etcd".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for kind in stores.split(',') {
        let rate = rt.block_on(bench_store(kind, joins, conc));
        let target = if kind == "etcd" { 200.0 } else { 500.0 };
        println!(
            "join[{kind}]: {joins} joins, concurrency {conc}: {rate:.0} joins/s (target >= {target:.0}: {})",
            if rate >= target { "met" } else { "NOT met" }
        );
    }
}
