//! meshd's certificates and kubeconfigs as their real consumers see them: a real etcd 3.4 running with
//! meshd's etcd server and peer certificates and client-certificate auth (reached through the
//! `etcd-client` crate, `etcdctl` and `openssl s_client`), and kubectl talking mTLS to a TLS server
//! that serves meshd's API server certificate and verifies client certificates against the cluster CA.
//!
//! Nothing is mocked: etcd, etcdctl, kubectl and openssl are the installed programs. Every test has its
//! own data directory and free ports; every child process is killed when its guard drops, even when an
//! assertion fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use meshd_e2e::{free_port, init_dir, require_tool, run, wait_for, ChildGuard};
use rustls::crypto::ring;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a request that etcd should refuse may take before we call it refused (etcd answers a
/// refused client only with a timeout).
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Common name of the (first) certificate in a PEM file.
fn cn_of_pem_file(p: &Path) -> String {
    pki::inspect::inspect_pem(&read(p))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .common_name
        .unwrap_or_else(|| panic!("{}: no CN", p.display()))
}

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

/// A single-member etcd started with meshd's certificates; killed on drop.
struct Etcd {
    guard: ChildGuard,
    client_url: String,
    peer_port: u16,
    log: PathBuf,
}

impl Etcd {
    /// The etcd log so far (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 5 s) until the log written after byte `mark` contains `needle`.
    fn wait_log_since(&self, mark: usize, needle: &str) {
        let found = wait_for(Duration::from_secs(5), || {
            self.log()
                .get(mark..)
                .is_some_and(|tail| tail.contains(needle))
                .then_some(())
        });
        assert!(
            found.is_some(),
            "etcd's log does not say {needle:?} after the refused attempt:\n{}",
            self.log().get(mark..).unwrap_or_default()
        );
    }
}

/// Starts etcd in `data_dir` (a meshd data directory) on free loopback ports, with client and peer
/// mTLS, and waits until `etcdctl endpoint health` with the healthcheck client certificate passes.
fn start_etcd(data_dir: &Path) -> Etcd {
    let pki = data_dir.join("pki/etcd");
    let p = |f: &str| path_str(&pki.join(f)).to_owned();
    // A port can be taken between free_port and etcd's bind: retry with new ports.
    for attempt in 0..3 {
        let client_port = free_port();
        let mut peer_port = free_port();
        while peer_port == client_port {
            peer_port = free_port();
        }
        let client_url = format!("https://127.0.0.1:{client_port}");
        let peer_url = format!("https://127.0.0.1:{peer_port}");
        let etcd_data = data_dir.join(format!("etcd-data-{attempt}"));
        let log = data_dir.join(format!("etcd-{attempt}.log"));
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "cp1", "--data-dir", path_str(&etcd_data)])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("cp1={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--cert-file",
                &p("server.crt"),
                "--key-file",
                &p("server.key"),
            ])
            .args(["--trusted-ca-file", &p("ca.crt"), "--client-cert-auth"])
            .args(["--peer-cert-file", &p("peer.crt")])
            .args(["--peer-key-file", &p("peer.key")])
            .args(["--peer-trusted-ca-file", &p("ca.crt")])
            .arg("--peer-client-cert-auth");
        let mut guard = ChildGuard::spawn("etcd", &mut cmd, &log);
        let healthy = wait_for(Duration::from_secs(30), || {
            if !guard.alive() {
                return Some(false);
            }
            let out = etcdctl(
                &client_url,
                data_dir,
                Some((
                    "pki/etcd/healthcheck-client.crt",
                    "pki/etcd/healthcheck-client.key",
                )),
                &["endpoint", "health"],
            );
            // etcdctl 3.4 prints the health line on stderr.
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success() && text.contains("is healthy")).then_some(true)
        });
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        match healthy {
            Some(true) => {
                return Etcd {
                    guard,
                    client_url,
                    peer_port,
                    log,
                }
            }
            Some(false) if log_text.contains("address already in use") => continue,
            _ => panic!("etcd did not become healthy within 30 s; its log:\n{log_text}"),
        }
    }
    panic!("etcd could not bind free ports in 3 attempts");
}

/// Runs etcdctl (API v3) against `endpoint` with the etcd CA and, if given, a client cert and key
/// (paths relative to `data_dir`). Short dial and command timeouts: a refused client only times out.
fn etcdctl(endpoint: &str, data_dir: &Path, cert: Option<(&str, &str)>, args: &[&str]) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint])
        .args(["--dial-timeout", "2s", "--command-timeout", "3s"])
        .args(["--cacert", path_str(&data_dir.join("pki/etcd/ca.crt"))]);
    if let Some((c, k)) = cert {
        cmd.args(["--cert", path_str(&data_dir.join(c))])
            .args(["--key", path_str(&data_dir.join(k))]);
    }
    run(cmd.args(args))
}

/// TLS options for the etcd-client crate: the etcd CA, and the client identity if given.
fn etcd_tls(data_dir: &Path, identity: Option<(&str, &str)>) -> TlsOptions {
    let ca = Certificate::from_pem(read(&data_dir.join("pki/etcd/ca.crt")));
    let tls = TlsOptions::new().ca_certificate(ca);
    match identity {
        Some((c, k)) => tls.identity(Identity::from_pem(
            read(&data_dir.join(c)),
            read(&data_dir.join(k)),
        )),
        None => tls,
    }
}

/// Connects with `tls` and gets `key`, all within [`REFUSAL_TIMEOUT`]. `Ok(value)` only when etcd
/// served the read; otherwise the error or "timed out".
async fn etcd_get(url: &str, tls: TlsOptions, key: &str) -> Result<Option<String>, String> {
    let opts = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3));
    let attempt = async {
        let mut c = Client::connect([url], Some(opts))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let r = c.get(key, None).await.map_err(|e| format!("get: {e}"))?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    };
    match tokio::time::timeout(REFUSAL_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {REFUSAL_TIMEOUT:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_serves_meshd_certs_and_admits_only_etcd_ca_clients() {
    require_tool("etcd", "etcd-server");
    require_tool("etcdctl", "etcd-client");
    require_tool("openssl", "openssl");
    let dir = init_dir("cp1", "127.0.0.1", &[]);
    let d = dir.path();
    let mut etcd = tokio::task::block_in_place(|| start_etcd(d));
    let url = etcd.client_url.clone();

    // (a) apiserver-etcd-client puts and gets a key through the etcd-client crate.
    let key = "/meshd-e2e/consumers";
    let value = format!("written-by-apiserver-etcd-client-{}", std::process::id());
    let good = etcd_tls(
        d,
        Some((
            "pki/apiserver-etcd-client.crt",
            "pki/apiserver-etcd-client.key",
        )),
    );
    let opts = ConnectOptions::new()
        .with_tls(good.clone())
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    let mut client = tokio::time::timeout(
        Duration::from_secs(15),
        Client::connect([url.as_str()], Some(opts)),
    )
    .await
    .expect("connect timed out")
    .unwrap_or_else(|e| panic!("apiserver-etcd-client cannot connect: {e}\n{}", etcd.log()));
    client
        .put(key, value.as_str(), None)
        .await
        .unwrap_or_else(|e| panic!("put refused: {e}\n{}", etcd.log()));
    assert_eq!(
        etcd_get(&url, good, key).await,
        Ok(Some(value.clone())),
        "apiserver-etcd-client must read back the value it wrote"
    );

    // etcdctl with the same client certificate sees the same value (independent client).
    let out = tokio::task::block_in_place(|| {
        etcdctl(
            &url,
            d,
            Some((
                "pki/apiserver-etcd-client.crt",
                "pki/apiserver-etcd-client.key",
            )),
            &["get", key, "--print-value-only"],
        )
    });
    assert!(out.status.success(), "etcdctl get: {}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), value);

    // (b) a client certificate from the cluster CA is refused, and etcd says why.
    let foreign = (
        "pki/apiserver-kubelet-client.crt",
        "pki/apiserver-kubelet-client.key",
    );
    let mark = etcd.log().len();
    let r = etcd_get(&url, etcd_tls(d, Some(foreign)), key).await;
    assert!(
        r.is_err(),
        "etcd served a client whose certificate comes from the cluster CA: {r:?}"
    );
    eprintln!("cluster-CA client cert refused: {r:?}");
    tokio::task::block_in_place(|| {
        etcd.wait_log_since(mark, "certificate signed by unknown authority")
    });
    // (c) no client certificate is refused, and etcd says why.
    let mark = etcd.log().len();
    let r = etcd_get(&url, etcd_tls(d, None), key).await;
    assert!(
        r.is_err(),
        "etcd served a client without a certificate: {r:?}"
    );
    eprintln!("client without a cert refused: {r:?}");
    tokio::task::block_in_place(|| {
        etcd.wait_log_since(mark, "client didn't provide a certificate")
    });

    // The same refusals through etcdctl, and the healthcheck certificate still admitted.
    tokio::task::block_in_place(|| {
        let out = etcdctl(&url, d, Some(foreign), &["get", key, "--print-value-only"]);
        assert!(
            !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(&value),
            "etcdctl with a cluster-CA client cert must be refused: {}",
            describe(&out)
        );
        let out = etcdctl(&url, d, None, &["get", key, "--print-value-only"]);
        assert!(
            !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(&value),
            "etcdctl without a client cert must be refused: {}",
            describe(&out)
        );
        let out = etcdctl(
            &url,
            d,
            Some((
                "pki/etcd/healthcheck-client.crt",
                "pki/etcd/healthcheck-client.key",
            )),
            &["get", key, "--print-value-only"],
        );
        assert!(
            out.status.success(),
            "healthcheck client: {}",
            describe(&out)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), value);
    });

    // The peer listener serves meshd's peer certificate and accepts meshd's peer cert as a client.
    let peer = tokio::task::block_in_place(|| {
        run(Command::new("openssl")
            .arg("s_client")
            .args(["-connect", &format!("127.0.0.1:{}", etcd.peer_port)])
            .args(["-CAfile", path_str(&d.join("pki/etcd/ca.crt"))])
            .args(["-cert", path_str(&d.join("pki/etcd/peer.crt"))])
            .args(["-key", path_str(&d.join("pki/etcd/peer.key"))])
            .args([
                "-verify_return_error",
                "-verify_ip",
                "127.0.0.1",
                "-showcerts",
            ])
            .stdin(std::process::Stdio::null()))
    });
    let text = String::from_utf8_lossy(&peer.stdout);
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "peer listener: {}",
        describe(&peer)
    );
    let served = pki::inspect::pem_to_ders(&text).expect("certificates in s_client output");
    let peer_der = pki::inspect::pem_to_der(&read(&d.join("pki/etcd/peer.crt"))).expect("peer.crt");
    let server_der =
        pki::inspect::pem_to_der(&read(&d.join("pki/etcd/server.crt"))).expect("server.crt");
    let serial = |der: &[u8]| {
        pki::inspect::inspect_der(der)
            .map(|i| i.serial)
            .unwrap_or_else(|e| e.to_string())
    };
    assert!(
        served.first() == Some(&peer_der),
        "the peer listener must serve pki/etcd/peer.crt (serial {}), it served serial {:?} \
         (server.crt has {})",
        serial(&peer_der),
        served.first().map(|d| serial(d)),
        serial(&server_der)
    );
    assert_ne!(
        peer_der, server_der,
        "peer and server certificates are distinct"
    );

    assert!(etcd.guard.alive(), "etcd died:\n{}", etcd.log());
}

// ---------------------------------------------------------------------------------------------
// kubectl and an mTLS server with meshd's API server certificate
// ---------------------------------------------------------------------------------------------

/// What the test TLS server saw.
#[derive(Default, Debug)]
struct Seen {
    /// Client certificate CN of each completed handshake.
    client_cns: Vec<String>,
    /// Failed handshakes.
    handshake_errors: Vec<String>,
    /// Request lines served (`GET /version?timeout=10s HTTP/1.1`).
    requests: Vec<String>,
}

/// A TLS server on 127.0.0.1 that requires a client certificate from `client_ca`, answers every HTTP
/// request with 200 and a small JSON body, and records what it saw. Stops when dropped.
struct TestApiServer {
    seen: Arc<Mutex<Seen>>,
    /// Connections accepted and not finished yet.
    in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Decrements a connection counter when the connection's task ends, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestApiServer {
    /// Waits until every connection made so far is finished (kubectl may leave a side connection
    /// behind when it exits), then returns what the server saw since the last call.
    async fn take(&self) -> Seen {
        let mut idle = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                idle += 1;
                if idle == 4 {
                    break;
                }
            } else {
                idle = 0;
            }
        }
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

fn start_api_server(
    listener: TcpListener,
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> TestApiServer {
    let provider = Arc::new(ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(client_ca).expect("client CA") {
        roots.add(c.expect("client CA PEM")).expect("client CA");
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("server cert")
        .collect::<Result<_, _>>()
        .expect("server cert PEM");
    let key = PrivateKeyDer::from_pem_file(key).expect("server key");
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server cert and key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (seen2, in_flight2) = (seen.clone(), in_flight.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            in_flight2.fetch_add(1, Ordering::SeqCst);
            let guard = InFlight(in_flight2.clone());
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        seen.lock()
                            .expect("lock")
                            .handshake_errors
                            .push(e.to_string());
                        return;
                    }
                };
                let cn = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| {
                        pki::inspect::inspect_der(c)
                            .ok()
                            .and_then(|i| i.common_name)
                            .unwrap_or_else(|| "<no CN>".into())
                    })
                    .unwrap_or_else(|| "<no client certificate>".into());
                seen.lock().expect("lock").client_cns.push(cn);
                // Serve requests on this connection until the client closes it.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| p + 4)
                        .unwrap_or(buf.len());
                    let head: Vec<u8> = buf.drain(..end).collect();
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock().expect("lock").requests.push(line);
                    let body = r#"{"major":"1","minor":"32","gitVersion":"v1.32.0-meshd-e2e","status":"ok"}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tls.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = tls.flush().await;
                }
            });
        }
    });
    TestApiServer {
        seen,
        in_flight,
        task,
    }
}

/// Runs kubectl with `kubeconfig` and `args` (own HOME and cache dir, killed after 20 s).
async fn kubectl(home: &Path, kubeconfig: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.env("HOME", home)
        .env_remove("KUBECONFIG")
        .args(["--kubeconfig", path_str(kubeconfig)])
        .args(["--cache-dir", path_str(&home.join("kube-cache"))])
        .args(["--request-timeout", "10s"])
        .args(args)
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(20), cmd.output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("cannot run kubectl: {e}")),
        Err(_) => panic!("kubectl {args:?} with {} hung", kubeconfig.display()),
    }
}

/// Every kubeconfig meshd writes and the user (certificate CN) it holds.
const KUBECONFIGS: [(&str, &str); 6] = [
    ("admin.conf", "kubernetes-admin"),
    ("super-admin.conf", "kubernetes-super-admin"),
    ("controller-manager.conf", "system:kube-controller-manager"),
    ("scheduler.conf", "system:kube-scheduler"),
    ("kubelet.conf", "system:node:cp1"),
    ("kube-proxy.conf", "system:kube-proxy"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_accepts_meshd_kubeconfigs_and_authenticates_over_mtls() {
    require_tool("kubectl", "kubernetes-client");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let port_s = port.to_string();
    let dir = tokio::task::block_in_place(|| {
        init_dir("cp1", "127.0.0.1", &["--apiserver-port", &port_s])
    });
    let d = dir.path();
    let home = d.join("home");
    std::fs::create_dir_all(&home).expect("home");
    let server_url = format!("https://127.0.0.1:{port}");
    // Up before kubectl first runs: kubectl 1.32 dials the server (GET /version) even for
    // `config view`, and must not find a listener that never answers.
    let server = start_api_server(
        listener,
        &d.join("pki/apiserver.crt"),
        &d.join("pki/apiserver.key"),
        &d.join("pki/ca.crt"),
    );

    // kubectl parses every kubeconfig and shows the expected user and server.
    for (file, user) in KUBECONFIGS {
        let kc = d.join(file);
        let out = kubectl(&home, &kc, &["config", "view", "-o", "json"]).await;
        assert!(
            out.status.success(),
            "config view {file}: {}",
            describe(&out)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{file}: config view is not JSON ({e}): {}", describe(&out))
        });
        let users: Vec<&str> = v["users"]
            .as_array()
            .map(|a| a.iter().filter_map(|u| u["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(users, vec![user], "{file}: users");
        let servers: Vec<&str> = v["clusters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["cluster"]["server"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(servers, vec![server_url.as_str()], "{file}: server");
        let ctx = v["current-context"].as_str().unwrap_or_default().to_owned();
        let ctx_user = v["contexts"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == ctx.as_str()))
            .and_then(|c| c["context"]["user"].as_str())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(ctx_user, user, "{file}: the current context uses the user");
    }
    // The component kubeconfigs reference their credential by path (a `*-current.pem`).
    let cm = read(&d.join("controller-manager.conf"));
    assert!(
        cm.contains("controller-manager-client-current.pem") && !cm.contains("client-key-data"),
        "controller-manager.conf must reference its credential file:\n{cm}"
    );
    assert_eq!(
        cn_of_pem_file(&d.join("pki/controller-manager-client-current.pem")),
        "system:kube-controller-manager"
    );

    // Each kubeconfig completes the mTLS handshake (kubectl verifies apiserver.crt against ca.crt for
    // 127.0.0.1; the server verifies the client cert against ca.crt) and presents its own identity.
    for (file, user) in KUBECONFIGS {
        server.take().await;
        let out = kubectl(&home, &d.join(file), &["get", "--raw", "/version"]).await;
        let seen = server.take().await;
        assert!(
            out.status.success(),
            "kubectl get --raw /version with {file}: {}\nserver saw: {seen:?}",
            describe(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("v1.32.0-meshd-e2e"),
            "kubectl did not print the server's answer: {}",
            describe(&out)
        );
        assert!(
            !seen.client_cns.is_empty() && seen.client_cns.iter().all(|cn| cn == user),
            "{file}: the server must have seen only CN {user}: {seen:?}"
        );
        assert!(seen.handshake_errors.is_empty(), "{file}: {seen:?}");
        assert!(
            seen.requests.iter().any(|r| r.starts_with("GET /version")),
            "{file}: {seen:?}"
        );
    }
    let out = kubectl(&home, &d.join("admin.conf"), &["get", "--raw", "/healthz"]).await;
    let seen = server.take().await;
    assert!(out.status.success(), "/healthz: {}", describe(&out));
    assert!(
        seen.requests.iter().any(|r| r.starts_with("GET /healthz"))
            && !seen.client_cns.is_empty()
            && seen.client_cns.iter().all(|cn| cn == "kubernetes-admin"),
        "{seen:?}"
    );

    // A client certificate from the etcd CA fails the handshake.
    let etcd_cred = d.join("etcd-cred.conf");
    std::fs::copy(d.join("admin.conf"), &etcd_cred).expect("copy admin.conf");
    let cert_arg = format!(
        "--client-certificate={}",
        path_str(&d.join("pki/apiserver-etcd-client.crt"))
    );
    let key_arg = format!(
        "--client-key={}",
        path_str(&d.join("pki/apiserver-etcd-client.key"))
    );
    let out = kubectl(
        &home,
        &etcd_cred,
        &[
            "config",
            "set-credentials",
            "kubernetes-admin",
            &cert_arg,
            &key_arg,
            "--embed-certs=true",
        ],
    )
    .await;
    assert!(out.status.success(), "set-credentials: {}", describe(&out));
    assert_ne!(
        read(&etcd_cred),
        read(&d.join("admin.conf")),
        "set-credentials changed nothing"
    );
    server.take().await;
    let out = kubectl(&home, &etcd_cred, &["get", "--raw", "/version"]).await;
    let seen = server.take().await;
    assert!(
        !out.status.success(),
        "kubectl with an etcd-CA client cert must be refused: {}",
        describe(&out)
    );
    assert!(
        seen.client_cns.is_empty() && !seen.handshake_errors.is_empty(),
        "the server must have refused the handshake (and only that): {seen:?}\n{}",
        describe(&out)
    );
    assert!(
        seen.handshake_errors
            .iter()
            .all(|e| e.contains("UnknownIssuer") || e.contains("unknown issuer")),
        "refused for another reason than the issuer: {seen:?}"
    );
    eprintln!("etcd-CA client cert refused by the server: {seen:?}");

    // And kubectl refuses the server when told to trust the etcd CA instead of the cluster CA.
    let wrong_ca = d.join("wrong-ca.conf");
    std::fs::copy(d.join("admin.conf"), &wrong_ca).expect("copy admin.conf");
    let ca_arg = format!(
        "--certificate-authority={}",
        path_str(&d.join("pki/etcd/ca.crt"))
    );
    let out = kubectl(
        &home,
        &wrong_ca,
        &[
            "config",
            "set-cluster",
            "kubernetes",
            &ca_arg,
            "--embed-certs=true",
        ],
    )
    .await;
    assert!(out.status.success(), "set-cluster: {}", describe(&out));
    let out = kubectl(&home, &wrong_ca, &["get", "--raw", "/version"]).await;
    let seen = server.take().await;
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("x509"),
        "kubectl must refuse apiserver.crt under the etcd CA: {}",
        describe(&out)
    );
    assert!(seen.client_cns.is_empty(), "{seen:?}");
}
