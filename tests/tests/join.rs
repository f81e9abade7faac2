//! `meshd join` end to end, with real processes: the control plane is `meshd run` (on the embedded
//! store, or on a real etcd 3.4 with client and peer mTLS started by the test), nodes join with
//! `meshd join` child processes, and the API is also driven directly with meshd's own client
//! (`meshd::api::client::ApiClient` behind a CA pin) for forged CSRs, malformed requests and
//! concurrent joins. The issued certificates are checked with openssl, the kubeconfigs with kubectl.
//!
//! Every test has its own temporary directories and free loopback ports; every child process is
//! killed when its guard drops, even when an assertion fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::Method;
use ipnet::Ipv4Net;
use meshd::api::client::{ApiClient, ClientError};
use meshd::api::{
    JoinRequest, JoinResponse, NodeCerts, NodeCsrs, PeerEvent, RenewLeaseRequest,
    RenewLeaseResponse, TokenCreateRequest, TokenCreateResponse, TokenInfo,
};
use meshd::leases::LeaseAttrs;
use meshd::registry::NodeRecord;
use meshd::tls::{pinned_client_config, PinnedCaVerifier};
use meshd_e2e::{free_port, meshd, meshd_bin, meshd_ok, require_tool, run, wait_for, ChildGuard};
use pki::ca::LeafProfile;
use pki::keys::{KeyAlgorithm, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the caller of a refused join sees, whatever was wrong with the token.
const GENERIC_REFUSAL: &str = "join refused: the token is invalid, expired, revoked or used up";
/// The pod network `meshd init` configures by default.
const CLUSTER_CIDR: &str = "10.244.0.0/16";

// ---------------------------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------------------------

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

/// Sends `sig` (`TERM`, `KILL`) to `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let out = run(Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]));
    assert!(
        out.status.success(),
        "kill -{sig} {pid}: {}",
        describe(&out)
    );
}

/// Waits up to 15 s for `guard`'s process to exit; returns its exit status.
fn wait_exit(guard: &mut ChildGuard) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = guard.child.try_wait().expect("try_wait") {
            return st;
        }
        assert!(
            Instant::now() < end,
            "{} did not exit within 15 s",
            guard.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sha256:<hex>` of the SubjectPublicKeyInfo of the certificate in `cert`, computed by openssl
/// (independently of meshd): the `--ca-hash` form.
fn openssl_spki_hash(cert: &Path) -> String {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl x509 -in '{}' -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -r",
        path_str(cert)
    )));
    assert!(out.status.success(), "{}", describe(&out));
    let hex = stdout(&out)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned();
    assert_eq!(hex.len(), 64, "openssl digest {hex:?}");
    format!("sha256:{hex}")
}

/// Every file (not following symlinks) under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A snapshot of a directory tree: every entry (not following symlinks) with its kind, mode,
/// contents or link target.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).expect("metadata");
            let mode = md.permissions().mode();
            let desc = if md.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else if md.file_type().is_symlink() {
                format!(
                    "link -> {}",
                    std::fs::read_link(&p).expect("link").display()
                )
            } else {
                let bytes = std::fs::read(&p).expect("read");
                format!("file {mode:o} {}", base64_std(&bytes))
            };
            out.insert(p, desc);
        }
    }
    out
}

fn base64_std(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether any file under `dir` contains `needle`; returns the first such file.
fn find_in_tree(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    files_under(dir)
        .into_iter()
        .find(|f| std::fs::read(f).is_ok_and(|b| contains_bytes(&b, needle)))
}

/// The PEM blocks of private keys in `text`: (whole block, base64 body without line breaks).
fn private_key_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let Some(end_hdr) = block[11..].find("-----") else {
            break;
        };
        let label = &block[11..11 + end_hdr];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = block.find(&end_marker) else {
            break;
        };
        if label.ends_with("PRIVATE KEY") {
            let body: String = block[11 + end_hdr + 5..end]
                .lines()
                .map(str::trim)
                .collect();
            out.push(body);
        }
        rest = &block[end + end_marker.len()..];
    }
    out
}

/// The subnet's lease key in the flannel layout.
fn lease_key(subnet: Ipv4Net) -> String {
    format!(
        "/coreos.com/network/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

fn cluster_cidr() -> Ipv4Net {
    CLUSTER_CIDR.parse().expect("cidr")
}

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

/// A single-member etcd with client and peer mTLS from a meshd data directory's `pki/etcd`.
struct Etcd {
    guard: Option<ChildGuard>,
    client_url: String,
    peer_url: String,
    data: PathBuf,
    pki: PathBuf,
    logs: PathBuf,
    starts: u32,
}

impl Etcd {
    fn new(meshd_dir: &Path, logs: &Path) -> Etcd {
        let client_port = free_port();
        let mut peer_port = free_port();
        while peer_port == client_port {
            peer_port = free_port();
        }
        Etcd {
            guard: None,
            client_url: format!("https://127.0.0.1:{client_port}"),
            peer_url: format!("https://127.0.0.1:{peer_port}"),
            data: logs.join("etcd-data"),
            pki: meshd_dir.join("pki/etcd"),
            logs: logs.to_path_buf(),
            starts: 0,
        }
    }

    /// Starts etcd and waits until it is healthy. `Err(log)` when it could not bind its ports.
    fn start(&mut self) -> Result<(), String> {
        let p = |f: &str| path_str(&self.pki.join(f)).to_owned();
        self.starts += 1;
        let log = self.logs.join(format!("etcd-{}.log", self.starts));
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "cp1", "--data-dir", path_str(&self.data)])
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("cp1={}", self.peer_url)])
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
            let out = self.ctl(&["endpoint", "health"]);
            let text = format!("{}{}", stdout(&out), stderr(&out));
            (out.status.success() && text.contains("is healthy")).then_some(true)
        });
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        match healthy {
            Some(true) => {
                self.guard = Some(guard);
                Ok(())
            }
            Some(false) if log_text.contains("address already in use") => Err(log_text),
            _ => panic!("etcd did not become healthy within 30 s; its log:\n{log_text}"),
        }
    }

    /// Stops etcd with SIGTERM and waits for it to exit.
    fn stop(&mut self) {
        let mut g = self.guard.take().expect("etcd is running");
        signal(g.child.id(), "TERM");
        wait_exit(&mut g);
    }

    /// etcdctl (API v3) with meshd's etcd client certificate.
    fn ctl(&self, args: &[&str]) -> Output {
        let p = |f: &str| path_str(&self.pki.join(f)).to_owned();
        run(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.client_url])
            .args(["--dial-timeout", "2s", "--command-timeout", "5s"])
            .args(["--cacert", &p("ca.crt")])
            .args([
                "--cert",
                &p("meshd-client.crt"),
                "--key",
                &p("meshd-client.key"),
            ])
            .args(args))
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", describe(&out));
        stdout(&out)
    }

    /// The keys under `prefix`.
    fn keys(&self, prefix: &str) -> BTreeSet<String> {
        self.ctl_ok(&["get", "--prefix", prefix, "--keys-only"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `key`'s revisions, lease and value as etcd reports them (`None`: absent).
    fn lease_state(&self, key: &str) -> Option<LeaseState> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ctl_ok(&["get", key, "-w", "json"])).expect("etcdctl json");
        let kv = v["kvs"].as_array()?.first()?;
        let value = base64::engine::general_purpose::STANDARD
            .decode(kv["value"].as_str().expect("value"))
            .expect("base64 value");
        Some(LeaseState {
            create_revision: kv["create_revision"].as_i64().expect("create_revision"),
            mod_revision: kv["mod_revision"].as_i64().expect("mod_revision"),
            lease: kv["lease"].as_i64().unwrap_or(0),
            attrs: serde_json::from_slice(&value).expect("lease value is LeaseAttrs"),
        })
    }

    /// The granted and remaining TTL of etcd lease `id`, seconds.
    fn lease_ttl(&self, id: i64) -> (u64, u64) {
        let text = self.ctl_ok(&["lease", "timetolive", &format!("{id:x}")]);
        let num = |tag: &str| -> u64 {
            let i = text
                .find(tag)
                .unwrap_or_else(|| panic!("etcdctl lease timetolive: {text}"));
            text[i + tag.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or_else(|_| panic!("etcdctl lease timetolive: {text}"))
        };
        (num("TTL("), num("remaining("))
    }
}

/// A lease key as stored: what must not change when the control plane restarts and the node renews.
#[derive(Clone, Debug, PartialEq)]
struct LeaseState {
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
    attrs: LeaseAttrs,
}

// ---------------------------------------------------------------------------------------------
// the control plane
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Embedded,
    Etcd,
}

/// `meshd init` + `meshd run` (and etcd for [`Backend::Etcd`]) in a temp dir: `<root>/cp` is the
/// data directory, logs are beside it in `<root>`.
struct ControlPlane {
    // Declared first: dropped (killed) before etcd and before the directory goes.
    run: Option<ChildGuard>,
    etcd: Option<Etcd>,
    dir: PathBuf,
    port: u16,
    starts: u32,
    root: tempfile::TempDir,
}

/// `meshd token create --output json`.
#[derive(Debug)]
struct NewToken {
    token: String,
    id: String,
    ca_hash: String,
    server: String,
}

impl ControlPlane {
    fn new(backend: Backend) -> ControlPlane {
        let root = tempdir("meshd-join-cp-");
        let dir = root.path().join("cp");
        let port = free_port();
        let port_s = port.to_string();
        let mut args = vec![
            "init",
            "--data-dir",
            path_str(&dir),
            "--node-name",
            "cp1",
            "--advertise-address",
            "127.0.0.1",
            "--api-port",
            &port_s,
            "--output",
            "json",
        ];
        let mut etcd = None;
        let url;
        if backend == Backend::Etcd {
            let e = Etcd::new(&dir, root.path());
            url = e.client_url.clone();
            args.extend(["--store", "etcd", "--etcd-endpoints", &url]);
            etcd = Some(e);
        }
        meshd_ok(&args);
        if let Some(e) = etcd.as_mut() {
            // A port can be taken between free_port and etcd's bind: retry on new ports, and point
            // meshd at them.
            let mut attempts = 0;
            while let Err(log) = e.start() {
                attempts += 1;
                assert!(attempts < 3, "etcd could not bind free ports:\n{log}");
                let starts = e.starts;
                *e = Etcd::new(&dir, root.path());
                e.starts = starts;
                let mut cfg = meshd::settings::require_config(&dir).expect("meshd.json");
                cfg.store.etcd_endpoints = vec![e.client_url.clone()];
                meshd::settings::save_config(&dir, &cfg).expect("meshd.json");
            }
        }
        let mut cp = ControlPlane {
            run: None,
            etcd,
            dir,
            port,
            starts: 0,
            root,
        };
        cp.start();
        cp
    }

    fn etcd(&self) -> &Etcd {
        self.etcd.as_ref().expect("an etcd control plane")
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts `meshd run` and waits until it serves.
    fn start(&mut self) {
        assert!(self.run.is_none(), "meshd run is already running");
        self.starts += 1;
        let log = self.root.path().join(format!("run-{}.log", self.starts));
        let mut g = ChildGuard::spawn(
            "meshd run",
            Command::new(meshd_bin()).args(["run", "--no-mesh", "--data-dir", path_str(&self.dir)]),
            &log,
        );
        let up = wait_for(Duration::from_secs(20), || {
            if !g.alive() {
                return Some(false);
            }
            read(&log)
                .contains("meshd API listening on")
                .then_some(true)
        });
        assert_eq!(
            up,
            Some(true),
            "meshd run did not start serving; its log:\n{}",
            read(&log)
        );
        self.run = Some(g);
    }

    /// Stops `meshd run` gracefully (SIGTERM) and checks it exited cleanly.
    fn stop(&mut self) {
        let mut g = self.run.take().expect("meshd run is running");
        signal(g.child.id(), "TERM");
        let st = wait_exit(&mut g);
        assert!(
            st.success(),
            "meshd run exited with {st} on SIGTERM; log:\n{}",
            self.log()
        );
        assert!(self.log().contains("shutting down"), "{}", self.log());
    }

    /// Kills `meshd run` with SIGKILL (a crash).
    fn kill(&mut self) {
        let mut g = self.run.take().expect("meshd run is running");
        signal(g.child.id(), "KILL");
        wait_exit(&mut g);
    }

    /// Everything `meshd run` logged, over all its starts.
    fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.root.path().join(format!("run-{i}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Waits (up to 5 s) until the log contains `needle`, and returns the log.
    fn wait_log(&self, needle: &str) -> String {
        wait_for(Duration::from_secs(5), || {
            let l = self.log();
            l.contains(needle).then_some(l)
        })
        .unwrap_or_else(|| {
            panic!(
                "the control plane's log never said {needle:?}:\n{}",
                self.log()
            )
        })
    }

    /// `meshd token create --output json` with `extra` options.
    fn token(&self, extra: &[&str]) -> NewToken {
        let mut args = vec![
            "token",
            "create",
            "--data-dir",
            path_str(&self.dir),
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&meshd_ok(&args)).expect("token json");
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("{k} in {v}"))
                .to_owned()
        };
        let token = s("token");
        NewToken {
            id: token.split('.').next().expect("id").to_owned(),
            token,
            ca_hash: s("ca_hash"),
            server: s("server"),
        }
    }

    fn tokens(&self) -> Vec<TokenInfo> {
        serde_json::from_str(&meshd_ok(&[
            "token",
            "list",
            "--data-dir",
            path_str(&self.dir),
            "--output",
            "json",
        ]))
        .expect("token list json")
    }

    fn token_info(&self, id: &str) -> TokenInfo {
        self.tokens()
            .into_iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("token {id} is not listed"))
    }

    /// The joined nodes (the control plane registers itself too: see [`Self::all_nodes`]).
    fn nodes(&self) -> Vec<NodeRecord> {
        self.all_nodes()
            .into_iter()
            .filter(|n| !n.control_plane)
            .collect()
    }

    /// Every registered node, the control plane included.
    fn all_nodes(&self) -> Vec<NodeRecord> {
        serde_json::from_str(&meshd_ok(&[
            "node",
            "list",
            "--data-dir",
            path_str(&self.dir),
            "--output",
            "json",
        ]))
        .expect("node list json")
    }

    fn node(&self, name: &str) -> Option<NodeRecord> {
        self.nodes().into_iter().find(|n| n.name == name)
    }

    /// The admin client (`meshd-admin` certificate of the control plane).
    fn admin(&self) -> ApiClient {
        meshd::join::node_client(&self.dir).expect("admin client")
    }

    /// A client that trusts only the CA pinned by `ca_hash` and presents no certificate.
    fn pinned(&self, ca_hash: &str) -> ApiClient {
        let v = Arc::new(PinnedCaVerifier::new(ca_hash).expect("pin"));
        ApiClient::new(&self.server(), pinned_client_config(v).expect("tls")).expect("client")
    }

    /// `meshd join` as a process (JSON output).
    fn join(&self, node_dir: &Path, name: &str, addr: &str, token: &str, ca_hash: &str) -> Output {
        meshd(&[
            "join",
            "--data-dir",
            path_str(node_dir),
            "--server",
            &self.server(),
            "--token",
            token,
            "--ca-hash",
            ca_hash,
            "--node-name",
            name,
            "--advertise-address",
            addr,
            "--output",
            "json",
        ])
    }

    /// `meshd join` that must succeed; returns the node's subnet.
    fn join_ok(&self, node_dir: &Path, name: &str, addr: &str, t: &NewToken) -> Ipv4Net {
        let out = self.join(node_dir, name, addr, &t.token, &t.ca_hash);
        assert!(
            out.status.success(),
            "join of {name} failed: {}\ncontrol plane log:\n{}",
            describe(&out),
            self.log()
        );
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("join json");
        v["subnet"]
            .as_str()
            .expect("subnet")
            .parse()
            .expect("subnet")
    }
}

// ---------------------------------------------------------------------------------------------
// joins through the API
// ---------------------------------------------------------------------------------------------

/// A CSR for `profile` with a fresh key.
fn csr_for(profile: &LeafProfile) -> String {
    let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
    pki::csr::build_csr(profile, &k).expect("csr")
}

/// The inventory profile `id` of node `name` at `addr`.
fn profile(name: &str, addr: IpAddr, id: &str) -> LeafProfile {
    pki::inventory::node_entries(name, &[addr])
        .into_iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("no node entry {id}"))
        .profile
}

/// The four CSRs an honest node `name` at `addr` sends.
fn node_csrs(name: &str, addr: IpAddr) -> NodeCsrs {
    NodeCsrs {
        kubelet_client: csr_for(&profile(name, addr, "kubelet.conf")),
        kubelet_serving: csr_for(&profile(name, addr, "kubelet-serving")),
        kube_proxy: csr_for(&profile(name, addr, "kube-proxy.conf")),
        node_identity: csr_for(&profile(name, addr, "meshd-node")),
    }
}

/// A well-formed (not secret: the test never uses it for WireGuard) public key unique to `name`.
fn wg_key(name: &str) -> String {
    let mut b = [0x5au8; 32];
    for (i, c) in name.bytes().enumerate() {
        b[i % 31] ^= c.rotate_left(i as u32 % 8);
    }
    b[31] = name.len() as u8;
    base64_std(&b)
}

fn join_request(token: &str, name: &str, addr: IpAddr) -> JoinRequest {
    JoinRequest {
        token: token.to_owned(),
        node_name: name.to_owned(),
        addresses: vec![addr],
        wireguard_public_key: wg_key(name),
        endpoint: SocketAddr::new(addr, 51820),
        csrs: node_csrs(name, addr),
    }
}

async fn api_join(client: &ApiClient, req: &JoinRequest) -> Result<JoinResponse, ClientError> {
    client.call(Method::POST, "/v1/join", Some(req)).await
}

/// Expects an error answer with `status`; returns its message.
fn expect_status<T>(r: Result<T, ClientError>, status: u16, what: &str) -> String {
    match r {
        Err(ClientError::Status { status: s, message }) if s == status => message,
        Err(e) => panic!("{what}: expected an error answer with status {status}, got: {e}"),
        Ok(_) => panic!("{what}: expected an error answer with status {status}, got a success"),
    }
}

/// One raw HTTP/1.1 request over TLS (pinned CA): for bodies meshd's client would never send.
/// The body is written concurrently with reading the answer (the server may answer and close before
/// reading it). Returns the status and the answer's body.
async fn raw_request(server: &str, ca_hash: &str, head: String, body: Vec<u8>) -> (u16, String) {
    let cfg =
        pinned_client_config(Arc::new(PinnedCaVerifier::new(ca_hash).expect("pin"))).expect("tls");
    let tcp = tokio::net::TcpStream::connect(server)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        for chunk in body.chunks(4096) {
            if wr.write_all(chunk).await.is_err() {
                break;
            }
        }
        let _ = wr.flush().await;
        wr
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    // The server answers with a Content-Length: stop once the body is complete.
                    let text = String::from_utf8_lossy(&answer);
                    if let Some((h, b)) = text.split_once("\r\n\r\n") {
                        let len = h
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if b.len() >= len {
                            break;
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no answer within 10 s");
    writer.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------------------------------------
// 1. join end to end
// ---------------------------------------------------------------------------------------------

/// Runs openssl and returns (success, stdout + stderr).
fn openssl(args: &[&str]) -> (bool, String) {
    let out = run(Command::new("openssl").args(args));
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// The SAN entries of the certificate in `cert`, as openssl prints them.
fn openssl_sans(cert: &Path) -> BTreeSet<String> {
    let (ok, text) = openssl(&[
        "x509",
        "-in",
        path_str(cert),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(ok, "{text}");
    text.lines()
        .skip_while(|l| !l.contains("Subject Alternative Name"))
        .skip(1)
        .flat_map(|l| l.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn openssl_subject(cert: &Path) -> String {
    let (ok, text) = openssl(&[
        "x509",
        "-in",
        path_str(cert),
        "-noout",
        "-subject",
        "-nameopt",
        "RFC2253",
    ]);
    assert!(ok, "{text}");
    text.trim().trim_start_matches("subject=").to_owned()
}

#[test]
fn join_end_to_end_on_loopback() {
    require_tool("openssl", "openssl");
    require_tool("kubectl", "kubernetes-client");
    let cp = ControlPlane::new(Backend::Embedded);
    let nodes_root = tempdir("meshd-join-nodes-");
    let n1 = nodes_root.path().join("n1");
    let ca = cp.dir.join("pki/ca.crt");

    // The token and its pin, as `meshd token create` prints them.
    let t = cp.token(&[]);
    let (id, secret) = t.token.split_once('.').expect("id.secret");
    let alnum = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    assert!(
        id.len() == 6 && secret.len() == 16 && alnum(id) && alnum(secret),
        "token {:?} is not of kubeadm's form",
        t.token
    );
    assert_eq!(
        t.ca_hash,
        openssl_spki_hash(&ca),
        "--ca-hash must be the SHA-256 of the cluster CA's SubjectPublicKeyInfo"
    );
    assert_eq!(t.server, cp.server());

    let subnet = cp.join_ok(&n1, "n1", "127.0.0.2", &t);
    assert!(cluster_cidr().contains(&subnet) && subnet.prefix_len() == 24);

    // The registry has the node as it joined.
    // The control plane is a mesh node too, registered by `meshd run`.
    let cps: Vec<NodeRecord> = cp
        .all_nodes()
        .into_iter()
        .filter(|n| n.control_plane)
        .collect();
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert_eq!(cps[0].name, "cp1");
    let nodes = cp.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let rec = &nodes[0];
    assert_eq!(rec.name, "n1");
    assert_eq!(rec.subnet, subnet);
    assert_eq!(rec.addresses, vec!["127.0.0.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(rec.endpoint, "127.0.0.2:51820".parse().unwrap());
    assert_eq!(
        rec.wireguard_public_key,
        read(&n1.join("wireguard/public.key")).trim()
    );
    let joined = meshd::settings::require_config(&n1)
        .expect("node meshd.json")
        .joined
        .expect("joined record");
    assert_eq!((joined.name.as_str(), joined.subnet), ("n1", subnet));
    cp.wait_log("node n1 joined from 127.0.0.1:");

    // Every issued certificate chains to the cluster CA, for its purpose; a foreign CA refuses them.
    let certs = [
        (
            "kubelet/pki/kubelet.crt",
            "sslserver",
            "CN=system:node:n1,O=system:nodes",
        ),
        (
            "pki/meshd/node.crt",
            "sslclient",
            "CN=system:node:n1,O=system:nodes",
        ),
        (
            "kubelet/pki/kubelet-client-current.pem",
            "sslclient",
            "CN=system:node:n1,O=system:nodes",
        ),
        (
            "pki/kube-proxy-client-current.pem",
            "sslclient",
            "CN=system:kube-proxy,O=system:node-proxier",
        ),
    ];
    for (rel, purpose, subject) in certs {
        let f = n1.join(rel);
        let (ok, text) = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            path_str(&ca),
            path_str(&f),
        ]);
        assert!(ok && text.contains(": OK"), "openssl verify {rel}: {text}");
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            path_str(&cp.dir.join("pki/front-proxy-ca.crt")),
            path_str(&f),
        ]);
        assert!(!ok, "{rel} verified under a foreign CA: {text}");
        assert_eq!(openssl_subject(&f), subject, "{rel}");
    }
    // The serving certificate names exactly this node.
    assert_eq!(
        openssl_sans(&n1.join("kubelet/pki/kubelet.crt")),
        BTreeSet::from(["DNS:n1".to_owned(), "IP Address:127.0.0.2".to_owned()])
    );
    // Client certificates name nobody.
    assert!(openssl_sans(&n1.join("pki/meshd/node.crt")).is_empty());

    // kubectl accepts the kubeconfigs and can read the credentials they point at.
    for (conf, user) in [
        ("kubelet.conf", "system:node:n1"),
        ("kube-proxy.conf", "system:kube-proxy"),
    ] {
        let k = n1.join(conf);
        let out = run(Command::new("kubectl").args([
            "--kubeconfig",
            path_str(&k),
            "config",
            "view",
            "--flatten",
            "-o",
            "json",
        ]));
        assert!(
            out.status.success(),
            "kubectl config view {conf}: {}",
            describe(&out)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("kubectl json");
        assert_eq!(v["users"][0]["name"], user, "{conf}: {v}");
        let cert = v["users"][0]["user"]["client-certificate-data"]
            .as_str()
            .unwrap_or_default();
        let key = v["users"][0]["user"]["client-key-data"]
            .as_str()
            .unwrap_or_default();
        assert!(
            !cert.is_empty() && !key.is_empty(),
            "{conf}: credentials not readable: {v}"
        );
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"]
                .as_str()
                .map(|s| base64::engine::general_purpose::STANDARD.decode(s).unwrap()),
            Some(std::fs::read(&ca).unwrap()),
            "{conf}: the cluster CA"
        );
    }

    // meshd's own check of the node.
    let out = meshd(&["certs", "check", "--data-dir", path_str(&n1)]);
    assert!(
        out.status.success(),
        "certs check on the node: {}",
        describe(&out)
    );

    // Private keys never left the node: four distinct keys (one per certificate) and the WireGuard
    // key are in the node's directory, private to their owner, and nowhere in the control plane's
    // directory (store, log, anything). The search does find what the control plane does hold: the
    // node's WireGuard public key in its store.
    use std::os::unix::fs::PermissionsExt;
    let mut bodies = BTreeSet::new();
    for f in files_under(&n1) {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let blocks = private_key_blocks(&text);
        if !blocks.is_empty() {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "{} holds a key and has mode {mode:o}",
                f.display()
            );
        }
        bodies.extend(blocks);
    }
    assert_eq!(bodies.len(), 4, "distinct private keys on the node");
    let cp_root = cp.root.path();
    for body in &bodies {
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("key base64");
        assert_eq!(
            find_in_tree(cp_root, body.as_bytes()),
            None,
            "a node key (PEM) on the control plane"
        );
        assert_eq!(
            find_in_tree(cp_root, &body.as_bytes()[..64]),
            None,
            "a node key line on the control plane"
        );
        assert_eq!(
            find_in_tree(cp_root, &der),
            None,
            "a node key (DER) on the control plane"
        );
    }
    let wg_private = read(&n1.join("wireguard/private.key")).trim().to_owned();
    let wg_raw = base64::engine::general_purpose::STANDARD
        .decode(&wg_private)
        .expect("wg key");
    assert_eq!(wg_raw.len(), 32);
    assert_eq!(find_in_tree(cp_root, wg_private.as_bytes()), None);
    assert_eq!(find_in_tree(cp_root, &wg_raw), None);
    assert!(
        find_in_tree(cp_root, rec.wireguard_public_key.as_bytes()).is_some(),
        "the search must find the public key the store holds"
    );

    // Joining again on the joined node's directory: a clear error, nothing changed anywhere.
    let t2 = cp.token(&[]);
    let before = snapshot(&n1);
    let out = cp.join(&n1, "n1", "127.0.0.2", &t2.token, &t2.ca_hash);
    assert!(
        !out.status.success(),
        "a second join on a joined node succeeded"
    );
    assert!(
        stderr(&out).contains(&format!("{} already belongs to node \"n1\"", n1.display()))
            && stderr(&out).contains("nothing done"),
        "{}",
        describe(&out)
    );
    assert_eq!(snapshot(&n1), before, "the node's directory changed");
    assert_eq!(cp.nodes(), nodes, "the registry changed");
    assert_eq!(cp.token_info(&t2.id).used, 0, "the token was spent");
    assert!(!cp.log().contains(&format!("token {}\n", t2.id)));

    // Another machine with the same name is refused (409, naming node_name); its token is not spent.
    let n1b = nodes_root.path().join("n1b");
    let out = cp.join(&n1b, "n1", "127.0.0.3", &t2.token, &t2.ca_hash);
    assert!(!out.status.success(), "a second node named n1 was admitted");
    assert!(
        stderr(&out).contains("409") && stderr(&out).contains("node_name: \"n1\""),
        "{}",
        describe(&out)
    );
    assert!(!n1b.join("meshd.json").exists());
    assert!(files_under(&n1b)
        .iter()
        .all(|f| private_key_blocks(&std::fs::read_to_string(f).unwrap_or_default()).is_empty()));
    assert_eq!(cp.nodes(), nodes, "the registry changed");
    assert_eq!(
        cp.token_info(&t2.id).used,
        0,
        "the token was spent on a refused join"
    );

    // Without a valid token, the same attempt learns nothing (not even that n1 exists).
    let rt = runtime();
    let bogus = format!("{}.{}", t2.id, "0".repeat(16));
    let r = rt.block_on(api_join(
        &cp.pinned(&t2.ca_hash),
        &join_request(&bogus, "n1", "127.0.0.3".parse().unwrap()),
    ));
    assert_eq!(
        expect_status(r, 403, "bad token, taken name"),
        GENERIC_REFUSAL
    );

    // The unspent token still admits a node with a name of its own.
    let s2 = cp.join_ok(&n1b, "n2", "127.0.0.3", &t2);
    assert_ne!(s2, subnet);
    assert_eq!(cp.nodes().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 2. CSRs for another node
// ---------------------------------------------------------------------------------------------

#[test]
fn csr_for_another_node_is_refused_and_the_token_kept() {
    let cp = ControlPlane::new(Backend::Embedded);
    let rt = runtime();
    let n1_addr: IpAddr = "127.0.0.2".parse().unwrap();
    let n2_addr: IpAddr = "127.0.0.3".parse().unwrap();
    let t1 = cp.token(&[]);
    let client = cp.pinned(&t1.ca_hash);
    rt.block_on(api_join(&client, &join_request(&t1.token, "n1", n1_addr)))
        .expect("n1 joins");

    // n2, with one single-use token, asks for certificates that belong to n1.
    let t = cp.token(&["--uses", "1"]);
    let serving_with = |dns: Vec<String>, ips: Vec<IpAddr>| {
        let mut p = profile("n2", n2_addr, "kubelet-serving");
        p.dns_names = dns;
        p.ip_addresses = ips;
        csr_for(&p)
    };
    let honest = node_csrs("n2", n2_addr);
    let cases: Vec<(&str, NodeCsrs, &str, &str)> = vec![
        (
            "serving cert with n1's name",
            NodeCsrs {
                kubelet_serving: serving_with(vec!["n1".into()], vec![n2_addr]),
                ..honest.clone()
            },
            "kubelet serving CSR",
            "DNS SAN",
        ),
        (
            "serving cert with n1's address",
            NodeCsrs {
                kubelet_serving: serving_with(vec!["n2".into()], vec![n1_addr]),
                ..honest.clone()
            },
            "kubelet serving CSR",
            "IP SAN",
        ),
        (
            "n1's serving cert",
            NodeCsrs {
                kubelet_serving: csr_for(&profile("n1", n1_addr, "kubelet-serving")),
                ..honest.clone()
            },
            "kubelet serving CSR",
            "subject CN",
        ),
        (
            "n1's kubelet client cert",
            NodeCsrs {
                kubelet_client: csr_for(&profile("n1", n1_addr, "kubelet.conf")),
                ..honest.clone()
            },
            "kubelet client CSR",
            "subject CN",
        ),
        (
            "n1's meshd identity",
            NodeCsrs {
                node_identity: csr_for(&profile("n1", n1_addr, "meshd-node")),
                ..honest.clone()
            },
            "node identity CSR",
            "subject CN",
        ),
        (
            "a node identity in the kube-proxy slot",
            NodeCsrs {
                kube_proxy: csr_for(&profile("n1", n1_addr, "meshd-node")),
                ..honest.clone()
            },
            "kube-proxy CSR",
            "subject CN",
        ),
    ];
    for (what, csrs, slot, field) in cases {
        let req = JoinRequest {
            csrs,
            ..join_request(&t.token, "n2", n2_addr)
        };
        let msg = expect_status(rt.block_on(api_join(&client, &req)), 403, what);
        assert!(
            msg.contains(slot) && msg.contains(field),
            "{what}: the refusal must name {slot:?} and {field:?}: {msg}"
        );
        if field == "DNS SAN" {
            assert!(msg.contains("\"n1\""), "{what}: {msg}");
        }
    }
    // Nothing changed: no n2, the token has its one use left.
    let names: Vec<String> = cp.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["n1"]);
    let info = cp.token_info(&t.id);
    assert_eq!(
        (info.uses_left, info.used),
        (Some(1), 0),
        "the token was spent"
    );
    assert!(!cp.log().contains("node n2 joined"));

    // The same single-use token then admits n2 when it asks only for its own certificates.
    let nodes_root = tempdir("meshd-join-nodes-");
    let s2 = cp.join_ok(&nodes_root.path().join("n2"), "n2", "127.0.0.3", &t);
    assert_eq!(cp.node("n2").map(|n| n.subnet), Some(s2));
    let info = cp.token_info(&t.id);
    assert_eq!((info.uses_left, info.used), (Some(0), 1));
}

// ---------------------------------------------------------------------------------------------
// 3. tokens, the CA pin, malformed requests
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_tokens_are_refused_alike_and_logged_apart() {
    let cp = ControlPlane::new(Backend::Embedded);
    let nodes_root = tempdir("meshd-join-nodes-");
    let dir = |n: &str| nodes_root.path().join(n);

    let good = cp.token(&[]);
    let expired = cp.token(&["--ttl", "1s"]);
    let expired_at = Instant::now();
    let revoked = cp.token(&[]);
    meshd_ok(&[
        "token",
        "revoke",
        "--data-dir",
        path_str(&cp.dir),
        &revoked.id,
    ]);
    // Revoked tokens stay listed, marked, until they expire.
    assert!(cp.tokens().iter().any(|t| t.id == revoked.id && t.revoked));
    assert!(cp.tokens().iter().any(|t| t.id == good.id && !t.revoked));
    let reused = cp.token(&[]);
    cp.join_ok(&dir("first"), "first", "127.0.0.2", &reused);

    let (gid, gsecret) = good.token.split_once('.').unwrap();
    let first = if gsecret.starts_with('a') { 'b' } else { 'a' };
    let wrong_secret = format!("{gid}.{first}{}", &gsecret[1..]);
    let unknown_id = if good.id == "zz0000" {
        "zz0001"
    } else {
        "zz0000"
    };
    let unknown = format!("{unknown_id}.0123456789abcdef");
    if let Some(wait) = Duration::from_millis(2100).checked_sub(expired_at.elapsed()) {
        std::thread::sleep(wait);
    }
    let cases = [
        (
            "wrong-secret",
            wrong_secret.as_str(),
            gid,
            "wrong token secret",
        ),
        ("unknown", unknown.as_str(), unknown_id, "unknown token"),
        (
            "expired",
            expired.token.as_str(),
            expired.id.as_str(),
            "expired token",
        ),
        (
            "revoked",
            revoked.token.as_str(),
            revoked.id.as_str(),
            "revoked token",
        ),
        (
            "reused",
            reused.token.as_str(),
            reused.id.as_str(),
            "token already used up",
        ),
    ];
    let mut messages = BTreeSet::new();
    for (i, (name, token, id, reason)) in cases.into_iter().enumerate() {
        let d = dir(name);
        let out = cp.join(
            &d,
            name,
            &format!("127.0.0.{}", 10 + i),
            token,
            &good.ca_hash,
        );
        assert!(!out.status.success(), "{name}: the join succeeded");
        assert!(
            stderr(&out).contains(GENERIC_REFUSAL),
            "{name}: {}",
            describe(&out)
        );
        messages.insert(stderr(&out));
        cp.wait_log(&format!("join refused: token {id}: {reason}\n"));
        assert!(
            !d.join("meshd.json").exists(),
            "{name}: the node wrote its settings"
        );
    }
    assert_eq!(
        messages.len(),
        1,
        "the caller must not learn why a token was refused: {messages:?}"
    );
    // The wrong secret did not spend the real token.
    cp.join_ok(&dir("good"), "good", "127.0.0.20", &good);
    let names: BTreeSet<String> = cp.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(
        names,
        BTreeSet::from(["first".to_owned(), "good".to_owned()])
    );
}

#[test]
fn wrong_ca_hash_stops_the_join_before_the_token_is_sent() {
    require_tool("openssl", "openssl");
    let cp = ControlPlane::new(Backend::Embedded);
    let nodes_root = tempdir("meshd-join-nodes-");
    let t = cp.token(&[]);
    let request_line = format!("token {}\n", t.id);
    // Another real CA of this very cluster, and a made-up pin.
    let wrong = [
        openssl_spki_hash(&cp.dir.join("pki/front-proxy-ca.crt")),
        format!("sha256:{}", "ab".repeat(32)),
    ];
    for (i, pin) in wrong.iter().enumerate() {
        assert_ne!(pin, &t.ca_hash);
        let handshakes = cp.log().matches("TLS handshake with").count();
        let d = nodes_root.path().join(format!("n{i}"));
        let out = cp.join(&d, "n1", "127.0.0.2", &t.token, pin);
        assert!(!out.status.success(), "joined with a wrong --ca-hash");
        assert!(stderr(&out).contains("--ca-hash"), "{}", describe(&out));
        // The server saw a connection that ended in the handshake...
        wait_for(Duration::from_secs(5), || {
            (cp.log().matches("TLS handshake with").count() > handshakes).then_some(())
        })
        .unwrap_or_else(|| panic!("no failed handshake logged:\n{}", cp.log()));
        // ...and never a request carrying the token.
        let log = cp.log();
        assert!(
            !log.contains("join request") && !log.contains(&request_line),
            "the server saw the token:\n{log}"
        );
        assert!(!d.join("meshd.json").exists());
    }
    // A malformed pin is refused before any connection.
    let out = cp.join(
        &nodes_root.path().join("x"),
        "n1",
        "127.0.0.2",
        &t.token,
        "sha256:xyz",
    );
    assert!(
        !out.status.success() && stderr(&out).contains("--ca-hash"),
        "{}",
        describe(&out)
    );

    assert_eq!(cp.token_info(&t.id).used, 0);
    assert!(cp.nodes().is_empty());
    // With the right pin the same token joins, and the log does show the request this time.
    cp.join_ok(&nodes_root.path().join("ok"), "n1", "127.0.0.2", &t);
    let log = cp.wait_log(&request_line);
    assert!(log.contains("join request from"), "{log}");
}

#[test]
fn oversized_and_malformed_requests_change_nothing() {
    let cp = ControlPlane::new(Backend::Embedded);
    let rt = runtime();
    let t1 = cp.token(&[]);
    let client = cp.pinned(&t1.ca_hash);
    rt.block_on(api_join(
        &client,
        &join_request(&t1.token, "n1", "127.0.0.2".parse().unwrap()),
    ))
    .expect("n1 joins");
    let t = cp.token(&[]);
    let nodes = cp.nodes();
    let tokens = serde_json::to_value(cp.tokens()).unwrap();
    let server = cp.server();
    let head = |extra: &str| {
        format!("POST /v1/join HTTP/1.1\r\nhost: {server}\r\ncontent-type: application/json\r\n{extra}\r\n")
    };

    // Over 64 KiB, declared up front (meshd's own client, a valid token inside).
    let mut big = join_request(&t.token, "big", "127.0.0.3".parse().unwrap());
    big.csrs.kubelet_client = "A".repeat(70 * 1024);
    // Sent raw, reading the answer while writing: the server answers 413 as soon as it sees the
    // declared length and closes, so a client that only reads after writing may see a reset instead.
    let big_json = serde_json::to_vec(&big).unwrap();
    let (status, msg) = rt.block_on(raw_request(
        &server,
        &t.ca_hash,
        head(&format!("content-length: {}\r\n", big_json.len())),
        big_json,
    ));
    assert_eq!(status, 413, "oversized body: {msg}");
    assert!(msg.contains("65536-byte limit"), "{msg}");
    // meshd's own client gets an error, never a success.
    assert!(rt.block_on(api_join(&client, &big)).is_err());
    // Declared, but not sent at all.
    let (status, body) = rt.block_on(raw_request(
        &server,
        &t.ca_hash,
        head("content-length: 70000\r\n"),
        vec![],
    ));
    assert_eq!(status, 413, "{body}");
    // Chunked, so only counting the bytes can stop it.
    let payload = serde_json::to_vec(&big).unwrap();
    let mut chunked = Vec::new();
    for c in payload.chunks(8192) {
        chunked.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        chunked.extend_from_slice(c);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, body) = rt.block_on(raw_request(
        &server,
        &t.ca_hash,
        head("transfer-encoding: chunked\r\n"),
        chunked,
    ));
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("65536-byte limit"), "{body}");

    // Malformed JSON (truncated, with a real token in it), and JSON of the wrong shape.
    let ok_body = serde_json::to_string(&join_request(
        &t.token,
        "trunc",
        "127.0.0.4".parse().unwrap(),
    ))
    .unwrap();
    for body in [
        ok_body[..ok_body.len() / 2].to_owned(),
        "{not json".to_owned(),
        format!("{{\"token\": \"{}\"}}", t.token),
        "[1, 2, 3]".to_owned(),
    ] {
        let (status, answer) = rt.block_on(raw_request(
            &server,
            &t.ca_hash,
            head(&format!("content-length: {}\r\n", body.len())),
            body.clone().into_bytes(),
        ));
        assert_eq!(status, 400, "{body:?}: {answer}");
        assert!(
            answer.contains("malformed JSON request"),
            "{body:?}: {answer}"
        );
    }

    // The store is unchanged, and the token untouched.
    assert_eq!(cp.nodes(), nodes);
    assert_eq!(serde_json::to_value(cp.tokens()).unwrap(), tokens);
    assert!(!cp.log().contains(&format!("token {}\n", t.id)));
    // The server still serves.
    let s = rt
        .block_on(api_join(
            &client,
            &join_request(&t.token, "n2", "127.0.0.5".parse().unwrap()),
        ))
        .expect("a normal join after the bad requests")
        .subnet;
    assert_eq!(cp.node("n2").map(|n| n.subnet), Some(s));
}

// ---------------------------------------------------------------------------------------------
// 4. concurrency
// ---------------------------------------------------------------------------------------------

fn concurrent_joins(backend: Backend) {
    const N: usize = 50;
    const ROUNDS: usize = 10;
    let cp = ControlPlane::new(backend);
    let rt = runtime();
    let admin = cp.admin();
    let started = Instant::now();
    rt.block_on(async {
        // 50 tokens, then 50 joins at once, each with its own token.
        let mut tokens: Vec<TokenCreateResponse> = Vec::new();
        for _ in 0..N {
            let req = TokenCreateRequest {
                ttl_secs: 600,
                uses: Some(1),
                description: "concurrency".into(),
            };
            tokens.push(
                admin
                    .call(Method::POST, "/v1/tokens", Some(&req))
                    .await
                    .expect("token create"),
            );
        }
        let client = cp.pinned(&tokens[0].ca_hash);
        let barrier = Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let name = format!("node-{i:02}");
            let addr = IpAddr::V4(Ipv4Addr::new(127, 0, 1, i as u8 + 1));
            let req = join_request(&t.token, &name, addr);
            let client = client.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                (name, api_join(&client, &req).await)
            }));
        }
        let mut got: BTreeMap<String, Ipv4Net> = BTreeMap::new();
        let mut failures = Vec::new();
        for task in tasks {
            let (name, r) = task.await.expect("task");
            match r {
                Ok(resp) => {
                    assert_eq!(resp.node.name, name);
                    assert_eq!(resp.node.subnet, resp.subnet);
                    got.insert(name, resp.subnet);
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {N} joins failed: {failures:#?}\nlog:\n{}",
            failures.len(),
            cp.log()
        );
        let subnets: BTreeSet<Ipv4Net> = got.values().copied().collect();
        assert_eq!(subnets.len(), N, "subnets given twice: {got:?}");
        let all: Vec<Ipv4Net> = subnets.iter().copied().collect();
        for (i, a) in all.iter().enumerate() {
            assert!(cluster_cidr().contains(a), "{a} is outside {CLUSTER_CIDR}");
            assert_eq!(a.prefix_len(), 24, "{a}");
            for b in &all[i + 1..] {
                assert!(
                    !a.contains(&b.network()) && !b.contains(&a.network()),
                    "{a} and {b} overlap"
                );
            }
        }
        // The registry agrees, and (on etcd) so do the lease keys.
        let listed: BTreeMap<String, Ipv4Net> =
            cp.nodes().into_iter().map(|n| (n.name, n.subnet)).collect();
        assert_eq!(listed, got, "node list");
        if backend == Backend::Etcd {
            let keys = cp.etcd().keys("/coreos.com/network/subnets/");
            // Every joined node's lease, and the control plane's own.
            let want: BTreeSet<String> = cp
                .all_nodes()
                .into_iter()
                .map(|n| lease_key(n.subnet))
                .collect();
            assert_eq!(want.len(), subnets.len() + 1);
            assert_eq!(keys, want, "lease keys in etcd");
        }
        for t in &tokens {
            let id = t.token.split('.').next().unwrap();
            assert!(cp.log().contains(&format!(", token {id}\n")));
        }
        eprintln!(
            "{backend:?}: {N} concurrent joins done in {:?}",
            started.elapsed()
        );

        // Two joins racing for one single-use token: exactly one is admitted, every round.
        for round in 0..ROUNDS {
            let req = TokenCreateRequest {
                ttl_secs: 600,
                uses: Some(1),
                description: format!("race {round}"),
            };
            let t: TokenCreateResponse = admin
                .call(Method::POST, "/v1/tokens", Some(&req))
                .await
                .expect("token create");
            let id = t.token.split('.').next().unwrap().to_owned();
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let mut tasks = Vec::new();
            for (j, side) in ["a", "b"].into_iter().enumerate() {
                let name = format!("race-{round}-{side}");
                let addr = IpAddr::V4(Ipv4Addr::new(127, 0, 2, (round * 2 + j) as u8 + 1));
                let req = join_request(&t.token, &name, addr);
                let client = client.clone();
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    (name, api_join(&client, &req).await)
                }));
            }
            let mut admitted = Vec::new();
            for task in tasks {
                let (name, r) = task.await.expect("task");
                match r {
                    Ok(_) => admitted.push(name),
                    Err(e) => {
                        assert_eq!(expect_status(Err::<(), _>(e), 403, &name), GENERIC_REFUSAL)
                    }
                }
            }
            assert_eq!(admitted.len(), 1, "round {round}: admitted {admitted:?}");
            let racers: Vec<String> = cp
                .nodes()
                .into_iter()
                .filter(|n| n.name.starts_with(&format!("race-{round}-")))
                .map(|n| n.name)
                .collect();
            assert_eq!(racers, admitted, "round {round}: registry");
            let info = cp.token_info(&id);
            assert_eq!((info.uses_left, info.used), (Some(0), 1), "round {round}");
            cp.wait_log(&format!(
                "join refused: token {id}: token already used up\n"
            ));
        }
    });
    assert_eq!(cp.nodes().len(), N + ROUNDS);
}

#[test]
fn concurrent_joins_embedded() {
    concurrent_joins(Backend::Embedded);
}

#[test]
fn concurrent_joins_etcd() {
    require_tool("etcd", "etcd-server");
    require_tool("etcdctl", "etcd-client");
    concurrent_joins(Backend::Etcd);
}

// ---------------------------------------------------------------------------------------------
// 5. leases across restarts
// ---------------------------------------------------------------------------------------------

/// The lease key's state in the embedded store of a stopped control plane.
fn embedded_lease_state(
    rt: &tokio::runtime::Runtime,
    cp: &ControlPlane,
    key: &str,
) -> Option<LeaseState> {
    use meshd::store::Store;
    assert!(cp.run.is_none(), "stop the control plane first");
    rt.block_on(async {
        let store = meshd::store::embedded::EmbeddedStore::open(&cp.dir.join("state.redb"))
            .expect("open the embedded store");
        let kv = store.get(key).await.expect("get");
        let st = kv.map(|kv| LeaseState {
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
            attrs: serde_json::from_slice(&kv.value).expect("lease value is LeaseAttrs"),
        });
        store.close().await.expect("close");
        st
    })
}

/// After a restart: n1 is registered with `subnet`, and its renewal keeps it.
fn check_n1_kept(rt: &tokio::runtime::Runtime, cp: &ControlPlane, n1_dir: &Path, subnet: Ipv4Net) {
    assert_eq!(
        cp.node("n1").map(|n| n.subnet),
        Some(subnet),
        "n1 after the restart"
    );
    let node = meshd::join::node_client(n1_dir).expect("node client");
    let r: RenewLeaseResponse = rt
        .block_on(node.call(
            Method::POST,
            "/v1/lease/renew",
            Some(&RenewLeaseRequest { subnet }),
        ))
        .expect("lease renewal");
    assert_eq!(r.subnet, subnet, "the renewal moved n1");
    assert!(
        !cp.log().contains("had expired and was reassigned"),
        "{}",
        cp.log()
    );
}

fn lease_survives_restart(backend: Backend) {
    let mut cp = ControlPlane::new(backend);
    let rt = runtime();
    let nodes_root = tempdir("meshd-join-nodes-");
    let n1 = nodes_root.path().join("n1");
    let t = cp.token(&["--uses", "3"]);
    let subnet = cp.join_ok(&n1, "n1", "127.0.0.2", &t);
    let key = lease_key(subnet);

    // The lease as stored before any restart.
    let before = match backend {
        Backend::Etcd => cp.etcd().lease_state(&key),
        Backend::Embedded => {
            cp.stop();
            let st = embedded_lease_state(&rt, &cp, &key);
            cp.start();
            st
        }
    }
    .unwrap_or_else(|| panic!("{key} is not in the store"));
    assert_ne!(before.lease, 0, "the lease key has no store lease");
    assert_eq!(before.attrs.public_ip, Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(
        before.attrs.meshd.as_ref().map(|m| m.node.as_str()),
        Some("n1")
    );

    // 1: a graceful restart of meshd run.
    cp.stop();
    cp.start();
    check_n1_kept(&rt, &cp, &n1, subnet);
    let n2 = cp.join_ok(&nodes_root.path().join("n2"), "n2", "127.0.0.3", &t);
    assert_ne!(n2, subnet, "a new join after the restart got n1's subnet");

    // 2: a crash of meshd run (and, on etcd, a restart of etcd as well).
    cp.kill();
    if let Some(e) = cp.etcd.as_mut() {
        e.stop();
        e.start().expect("etcd restarts on its ports");
    }
    let after_kill = match backend {
        Backend::Embedded => embedded_lease_state(&rt, &cp, &key),
        Backend::Etcd => cp.etcd().lease_state(&key),
    };
    cp.start();
    check_n1_kept(&rt, &cp, &n1, subnet);
    let n3 = cp.join_ok(&nodes_root.path().join("n3"), "n3", "127.0.0.4", &t);
    assert!(
        n3 != subnet && n3 != n2,
        "n3 got {n3}, n1 has {subnet}, n2 {n2}"
    );

    // The lease key is the very same one: same revisions and store lease (renewals kept it alive,
    // nothing re-created it).
    let now = match backend {
        Backend::Etcd => cp.etcd().lease_state(&key),
        Backend::Embedded => {
            cp.stop();
            embedded_lease_state(&rt, &cp, &key)
        }
    };
    assert_eq!(after_kill.as_ref(), Some(&before), "{key} after the crash");
    assert_eq!(now.as_ref(), Some(&before), "{key} at the end");
    if backend == Backend::Etcd {
        let (granted, remaining) = cp.etcd().lease_ttl(before.lease);
        assert_eq!(granted, 24 * 3600, "lease TTL");
        assert!(
            remaining > 24 * 3600 - 120,
            "lease not renewed: {remaining} s left"
        );
    }
    if cp.run.is_none() {
        cp.start();
    }
    let names: BTreeSet<String> = cp.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(
        names,
        BTreeSet::from(["n1".to_owned(), "n2".to_owned(), "n3".to_owned()])
    );
}

#[test]
fn lease_survives_restart_embedded() {
    lease_survives_restart(Backend::Embedded);
}

#[test]
fn lease_survives_restart_etcd() {
    require_tool("etcd", "etcd-server");
    require_tool("etcdctl", "etcd-client");
    lease_survives_restart(Backend::Etcd);
}

/// A node renews its own certificates with its current node certificate (no token): new keys, new
/// CSRs, identity and SANs from its registration; another node's identity or no certificate at all
/// is refused.
#[test]
fn node_renews_its_own_certificates_with_its_node_certificate() {
    require_tool("openssl", "openssl");
    let cp = ControlPlane::new(Backend::Embedded);
    let rt = runtime();
    let nodes_root = tempdir("meshd-renew-nodes-");
    let n1 = nodes_root.path().join("n1");
    let t = cp.token(&[]);
    cp.join_ok(&n1, "n1", "127.0.0.2", &t);
    let addr: IpAddr = "127.0.0.2".parse().unwrap();
    let node = meshd::join::node_client(&n1).expect("node client");

    // Honest renewal: fresh keys, certificates for n1 only.
    let keys: Vec<PrivateKey> = (0..4)
        .map(|_| PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key"))
        .collect();
    let ids = [
        "kubelet.conf",
        "kubelet-serving",
        "kube-proxy.conf",
        "meshd-node",
    ];
    let csr = |i: usize| pki::csr::build_csr(&profile("n1", addr, ids[i]), &keys[i]).expect("csr");
    let req = NodeCsrs {
        kubelet_client: csr(0),
        kubelet_serving: csr(1),
        kube_proxy: csr(2),
        node_identity: csr(3),
    };
    let certs: NodeCerts = rt
        .block_on(node.call(Method::POST, "/v1/certs/renew", Some(&req)))
        .expect("renewal with the node certificate");
    let work = tempdir("meshd-renew-certs-");
    for (i, pem) in [
        &certs.kubelet_client,
        &certs.kubelet_serving,
        &certs.kube_proxy,
        &certs.node_identity,
    ]
    .into_iter()
    .enumerate()
    {
        let p = work.path().join(format!("{i}.crt"));
        std::fs::write(&p, pem).unwrap();
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            path_str(&cp.dir.join("pki/ca.crt")),
            path_str(&p),
        ]);
        assert!(ok, "{}: {text}", ids[i]);
        let der = pki::inspect::pem_to_der(pem).unwrap();
        assert!(
            pki::inspect::key_matches(&der, &keys[i]).unwrap(),
            "{} carries the new key",
            ids[i]
        );
    }
    assert_eq!(
        openssl_sans(&work.path().join("1.crt")),
        BTreeSet::from(["DNS:n1".to_owned(), "IP Address:127.0.0.2".to_owned()])
    );
    assert_eq!(
        openssl_subject(&work.path().join("3.crt")),
        "CN=system:node:n1,O=system:nodes"
    );

    // The renewal moved n1's identity to the new key: the old certificate no longer speaks for it.
    expect_status(
        rt.block_on(node.call::<NodeCerts>(Method::POST, "/v1/certs/renew", Some(&req))),
        401,
        "renewal with the replaced certificate",
    );
    let ca_pem = read(&cp.dir.join("pki/ca.crt"));
    let node = ApiClient::new(
        &cp.server(),
        meshd::tls::client_config(&ca_pem, &certs.node_identity, keys[3].to_pem().expose())
            .expect("tls"),
    )
    .expect("client");
    // A CSR for another node, authenticated as n1: refused, naming the field.
    let mut bad = req.clone();
    bad.kubelet_serving =
        pki::csr::build_csr(&profile("n2", addr, "kubelet-serving"), &keys[1]).unwrap();
    let msg = expect_status(
        rt.block_on(node.call::<NodeCerts>(Method::POST, "/v1/certs/renew", Some(&bad))),
        403,
        "renewal for another node",
    );
    assert!(
        msg.contains("kubelet serving CSR") && msg.contains("subject CN"),
        "{msg}"
    );

    // Without a node certificate (the pinned, anonymous client): refused.
    let anon = cp.pinned(&t.ca_hash);
    expect_status(
        rt.block_on(anon.call::<NodeCerts>(Method::POST, "/v1/certs/renew", Some(&req))),
        401,
        "anonymous renewal",
    );
    // With the admin certificate: not a node, refused.
    let admin = cp.admin();
    expect_status(
        rt.block_on(admin.call::<NodeCerts>(Method::POST, "/v1/certs/renew", Some(&req))),
        401,
        "admin renewal",
    );
}

/// The next event of a peer stream that is not a heartbeat (5 s at most).
async fn next_event(
    rx: &mut tokio::sync::mpsc::Receiver<Result<PeerEvent, ClientError>>,
) -> PeerEvent {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Ok(PeerEvent::Heartbeat))) => continue,
            Ok(Some(Ok(e))) => return e,
            other => panic!("no event: {other:?}"),
        }
    }
}

/// The peer stream: a snapshot of the registry, then every registration and removal as it happens;
/// a caller without a client certificate is refused.
#[test]
fn peer_stream_follows_the_registry() {
    let cp = ControlPlane::new(Backend::Embedded);
    let rt = runtime();
    let nodes_root = tempdir("meshd-watch-nodes-");
    let t1 = cp.token(&[]);
    cp.join_ok(&nodes_root.path().join("n1"), "n1", "127.0.0.2", &t1);
    let node = meshd::join::node_client(&nodes_root.path().join("n1")).expect("node client");
    rt.block_on(async {
        let mut rx = node.watch_peers().await.expect("watch");
        match next_event(&mut rx).await {
            PeerEvent::Snapshot { nodes, .. } => {
                assert_eq!(
                    nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
                    vec!["cp1", "n1"]
                );
            }
            other => panic!("expected a snapshot first, got {other:?}"),
        }
        let t2 = cp.token(&[]);
        let started = Instant::now();
        cp.join_ok(&nodes_root.path().join("n2"), "n2", "127.0.0.3", &t2);
        match next_event(&mut rx).await {
            PeerEvent::Put { node, .. } => assert_eq!(node.name, "n2"),
            other => panic!("expected n2's registration, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        meshd_ok(&["node", "remove", "--data-dir", path_str(&cp.dir), "n1"]);
        match next_event(&mut rx).await {
            PeerEvent::Delete { name, .. } => assert_eq!(name, "n1"),
            other => panic!("expected n1's removal, got {other:?}"),
        }
        let anon = cp.pinned(&t1.ca_hash);
        match anon.watch_peers().await {
            Err(ClientError::Status { status: 401, .. }) => {}
            Err(e) => panic!("anonymous watch: expected 401, got {e}"),
            Ok(_) => panic!("anonymous watch: expected 401, got a stream"),
        }
    });
}

/// What a node may claim: never the control plane's or the cluster services' names and addresses,
/// never another node's address; a removed node's certificate no longer speaks for it; and a node's
/// own serving certificate (signed by the same CA) cannot stand in for the meshd API.
#[test]
fn nodes_cannot_claim_what_is_not_theirs() {
    let cp = ControlPlane::new(Backend::Embedded);
    let rt = runtime();
    let t = cp.token(&["--uses", "20"]);
    let client = cp.pinned(&t.ca_hash);
    let refused = |name: &str, addr: &str, status: u16, field: &str| {
        let req = join_request(&t.token, name, addr.parse().unwrap());
        let msg = expect_status(
            rt.block_on(api_join(&client, &req)),
            status,
            &format!("{name}@{addr}"),
        );
        assert!(msg.contains(field), "{name}@{addr}: {msg}");
    };
    for name in [
        "cp1",
        "kubernetes",
        "kubernetes.default",
        "localhost",
        "api.cluster.local",
        "x.svc",
    ] {
        refused(name, "127.0.0.50", 403, "node_name");
    }
    for addr in ["127.0.0.1", "10.96.0.1", "10.244.3.7", "169.254.10.10"] {
        refused("n9", addr, 403, "addresses");
    }
    let nodes_root = tempdir("meshd-claims-nodes-");
    let n1 = nodes_root.path().join("n1");
    let t1 = cp.token(&[]);
    cp.join_ok(&n1, "n1", "127.0.0.2", &t1);
    refused(
        "n2",
        "127.0.0.2",
        409,
        "addresses: 127.0.0.2 is registered to node \"n1\"",
    );
    assert_eq!(cp.token_info(&t.id).used, 0, "no refused join spent a use");
    // Only the exact reserved names are refused: an ordinary name that merely starts alike is fine.
    rt.block_on(api_join(
        &client,
        &join_request(
            &t.token,
            "kubernetes-worker-1",
            "127.0.0.61".parse().unwrap(),
        ),
    ))
    .expect("kubernetes-worker-1 joins");

    // A node's serving certificate is signed by the cluster CA and names 127.0.0.2: served by an
    // impostor there, it must not pass a joining node's pin check, and no token may reach it.
    let chain = format!(
        "{}{}",
        read(&n1.join("kubelet/pki/kubelet.crt")),
        read(&cp.dir.join("pki/ca.crt"))
    );
    let key = read(&n1.join("kubelet/pki/kubelet.key"));
    let cfg = meshd::tls::server_config(&chain, &key, &read(&cp.dir.join("pki/ca.crt")))
        .expect("impostor tls");
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.2:0"))
        .expect("bind");
    let impostor = listener.local_addr().unwrap();
    let seen2 = seen.clone();
    rt.spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            let seen = seen2.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let mut buf = [0u8; 1024];
                    if let Ok(n) = tls.read(&mut buf).await {
                        if n > 0 {
                            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });
    let victim = nodes_root.path().join("victim");
    let t2 = cp.token(&[]);
    let out = run(Command::new(meshd_bin()).args([
        "join",
        "--data-dir",
        path_str(&victim),
        "--server",
        &impostor.to_string(),
        "--token",
        &t2.token,
        "--ca-hash",
        &t2.ca_hash,
        "--node-name",
        "victim",
        "--advertise-address",
        "127.0.0.9",
    ]));
    assert!(!out.status.success(), "the join went through an impostor");
    assert!(
        stderr(&out).contains("not the meshd API"),
        "{}",
        describe(&out)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the impostor received a request"
    );

    // Removed: n1's certificate no longer opens the API.
    let node = meshd::join::node_client(&n1).expect("node client");
    assert!(rt
        .block_on(node.call::<Vec<NodeRecord>>(Method::GET, "/v1/nodes", None::<&()>))
        .is_ok());
    meshd_ok(&["node", "remove", "--data-dir", path_str(&cp.dir), "n1"]);
    expect_status(
        rt.block_on(node.call::<Vec<NodeRecord>>(Method::GET, "/v1/nodes", None::<&()>)),
        401,
        "a removed node",
    );
    // Its address is free again.
    let t3 = cp.token(&[]);
    cp.join_ok(&nodes_root.path().join("n3"), "n3", "127.0.0.2", &t3);
}
