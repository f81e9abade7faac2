//! A node whose certificates expired while it was offline, end to end: the real `meshd run` control
//! plane (embedded store), nodes joined with `meshd join`, certificates made expired for real
//! (CA-signed with the control plane's CA key, written through the pair store), and
//! `meshd join --rejoin`.

use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use hyper::Method;
use meshd::api::client::{ApiClient, ClientError};
use meshd::api::{NodeCerts, NodeCsrs, TokenInfo};
use meshd::registry::NodeRecord;
use meshd_e2e::{free_port, meshd, meshd_bin, meshd_ok, require_tool, run, wait_for, ChildGuard};
use pki::ca::{CertificateAuthority, Validity};
use pki::inventory::{self, Output as EntryOutput};
use pki::keys::{KeyAlgorithm, PrivateKey};
use pki::store::PairStore;

/// What the caller of a refused join sees, whatever was wrong with the token.
const GENERIC_REFUSAL: &str = "join refused: the token is invalid, expired, revoked or used up";

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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `meshd init` + `meshd run --no-mesh` on loopback, embedded store.
struct ControlPlane {
    run: Option<ChildGuard>,
    dir: PathBuf,
    port: u16,
    starts: u32,
    root: tempfile::TempDir,
}

struct NewToken {
    token: String,
    id: String,
    ca_hash: String,
}

impl ControlPlane {
    fn new() -> ControlPlane {
        let root = tempfile::Builder::new()
            .prefix("meshd-rejoin-")
            .tempdir()
            .expect("tempdir");
        let dir = root.path().join("cp");
        let port = free_port();
        meshd_ok(&[
            "init",
            "--data-dir",
            path_str(&dir),
            "--node-name",
            "cp1",
            "--advertise-address",
            "127.0.0.1",
            "--api-port",
            &port.to_string(),
        ]);
        let mut cp = ControlPlane {
            run: None,
            dir,
            port,
            starts: 0,
            root,
        };
        cp.start();
        cp
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.root.path().join(format!("run-{i}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    fn start(&mut self) {
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
        assert_eq!(up, Some(true), "meshd run did not start:\n{}", read(&log));
        self.run = Some(g);
    }

    fn stop(&mut self) {
        let mut g = self.run.take().expect("running");
        let _ = g.child.kill();
        let _ = g.child.wait();
    }

    fn token(&self) -> NewToken {
        let v: serde_json::Value = serde_json::from_str(&meshd_ok(&[
            "token",
            "create",
            "--data-dir",
            path_str(&self.dir),
            "--output",
            "json",
        ]))
        .expect("token json");
        let token = v["token"].as_str().expect("token").to_owned();
        NewToken {
            id: token.split('.').next().expect("id").to_owned(),
            token,
            ca_hash: v["ca_hash"].as_str().expect("ca_hash").to_owned(),
        }
    }

    fn token_info(&self, id: &str) -> TokenInfo {
        let list: Vec<TokenInfo> = serde_json::from_str(&meshd_ok(&[
            "token",
            "list",
            "--data-dir",
            path_str(&self.dir),
            "--output",
            "json",
        ]))
        .expect("token list");
        list.into_iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("token {id} not listed"))
    }

    fn node(&self, name: &str) -> NodeRecord {
        let list: Vec<NodeRecord> = serde_json::from_str(&meshd_ok(&[
            "node",
            "list",
            "--data-dir",
            path_str(&self.dir),
            "--output",
            "json",
        ]))
        .expect("node list");
        list.into_iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("node {name} not registered"))
    }

    fn join(&self, dir: &Path, name: &str, addr: &str) {
        let t = self.token();
        let out = meshd(&[
            "join",
            "--data-dir",
            path_str(dir),
            "--server",
            &self.server(),
            "--token",
            &t.token,
            "--ca-hash",
            &t.ca_hash,
            "--node-name",
            name,
            "--advertise-address",
            addr,
        ]);
        assert!(out.status.success(), "join {name}: {}", describe(&out));
    }

    fn rejoin(&self, dir: &Path, t: &NewToken) -> Output {
        meshd(&[
            "join",
            "--rejoin",
            "--data-dir",
            path_str(dir),
            "--server",
            &self.server(),
            "--token",
            &t.token,
            "--ca-hash",
            &t.ca_hash,
            "--output",
            "json",
        ])
    }

    fn ca(&self) -> CertificateAuthority {
        let key = PrivateKey::from_pem(&read(&self.dir.join("pki/ca.key"))).expect("CA key");
        CertificateAuthority::from_parts(read(&self.dir.join("pki/ca.crt")), key).expect("CA")
    }
}

/// Replaces every certificate of node `name` in `dir` by a real one, signed by the cluster CA for
/// the node's current key, that expired an hour ago; written through the pair store as a renewal
/// would.
fn expire_node(cp: &ControlPlane, dir: &Path, name: &str, addr: IpAddr) {
    let ca = cp.ca();
    let st = PairStore::new(dir);
    let then = SystemTime::now() - Duration::from_secs(2 * 3600);
    for e in inventory::node_entries(name, &[addr]) {
        let cur = st
            .read_current(e.id)
            .expect("read")
            .expect("a current pair");
        let key = PrivateKey::from_pem(cur.key_pem.expose()).expect("key");
        let cert = ca
            .issue(
                &e.profile,
                &key.public_key_spki_der(),
                Validity {
                    lifetime: Duration::from_secs(3600),
                    backdate: Duration::from_secs(300),
                },
                then,
            )
            .expect("issue");
        let links = match &e.output {
            EntryOutput::Pair(l) | EntryOutput::Kubeconfig { links: l, .. } => l.clone(),
        };
        st.write_pair(e.id, &cert.pem, &key.to_pem(), &links)
            .expect("write");
        let info = pki::inspect::inspect_pem(&cert.pem).expect("parse");
        assert!(info.not_after < SystemTime::now(), "{} is expired", e.id);
    }
}

fn identity_cert(dir: &Path) -> String {
    read(&dir.join("pki/meshd/node.crt"))
}

/// Fresh keys and CSRs for node `name`, as a renewal makes them.
fn fresh_csrs(name: &str, addr: IpAddr) -> NodeCsrs {
    let entries = inventory::node_entries(name, &[addr]);
    let csr = |id: &str| {
        let e = entries.iter().find(|e| e.id == id).expect("entry");
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        pki::csr::build_csr(&e.profile, &k).expect("csr")
    };
    NodeCsrs {
        kubelet_client: csr("kubelet.conf"),
        kubelet_serving: csr("kubelet-serving"),
        kube_proxy: csr("kube-proxy.conf"),
        node_identity: csr("meshd-node"),
    }
}

#[test]
fn an_expired_node_is_refused_clearly_and_restored_by_rejoin() {
    require_tool("openssl", "openssl");
    let fp: serde_json::Value =
        serde_json::from_str(&meshd_ok(&["debug", "failpoints"])).expect("json");
    assert_eq!(
        fp["enabled"], true,
        "the meshd binary has no failpoints: build it with `cargo build -p meshd --features failpoints`"
    );
    let mut cp = ControlPlane::new();
    let rt = runtime();
    let nodes = tempfile::Builder::new()
        .prefix("meshd-rejoin-nodes-")
        .tempdir()
        .expect("tempdir");
    let (n1, n2) = (nodes.path().join("n1"), nodes.path().join("n2"));
    let a1: IpAddr = "127.0.0.2".parse().unwrap();
    cp.join(&n1, "n1", "127.0.0.2");
    cp.join(&n2, "n2", "127.0.0.3");
    let before = cp.node("n1");
    let n2_before = cp.node("n2");
    let old_identity = identity_cert(&n1);

    expire_node(&cp, &n1, "n1", a1);
    assert_eq!(
        identity_cert(&n1),
        read(&n1.join("pki/.store/meshd-node/current/tls.crt"))
    );
    assert_ne!(identity_cert(&n1), old_identity);

    // 1. The node says what is wrong before any network call: with the control plane down, the
    //    message is still the expiry, not a connection error.
    cp.stop();
    let out =
        run(Command::new(meshd_bin()).args(["run", "--no-mesh", "--data-dir", path_str(&n1)]));
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("your node certificate expired at")
            && err.contains("meshd join --rejoin")
            && err.contains(&cp.server())
            && !err.contains("cannot connect"),
        "{err}"
    );
    cp.start();

    // 2. The control plane refuses the expired certificate itself (rustls checks validity).
    let expired_client = ApiClient::new(
        &cp.server(),
        meshd::tls::client_config(
            &read(&n1.join("pki/ca.crt")),
            &identity_cert(&n1),
            read(&n1.join("pki/meshd/node.key")).as_str(),
        )
        .expect("tls"),
    )
    .expect("client");
    let r = rt.block_on(expired_client.call::<NodeCerts>(
        Method::POST,
        "/v1/certs/renew",
        Some(&fresh_csrs("n1", a1)),
    ));
    match r {
        // TLS 1.3: the client learns of the refusal of its certificate after its side of the
        // handshake, as a broken connection; the control plane logs why.
        Err(ClientError::Status { status, message }) => {
            panic!("expected a TLS refusal, got an answer: {status} {message}")
        }
        Err(_) => {}
        Ok(_) => panic!("the control plane renewed with an expired certificate"),
    }
    // The server logs the refusal on its own task: it may land just after the client gave up.
    let logged = wait_for(Duration::from_secs(10), || {
        cp.log()
            .lines()
            .any(|l| l.contains("TLS handshake with") && l.to_lowercase().contains("expired"))
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "the control plane logs the expired certificate:\n{}",
        cp.log()
    );

    // 3. A token alone does not take a node over: a machine with a valid token and a valid node
    //    key (n2's), claiming n1 (a copy of n1's directory with n2's identity pair), is refused,
    //    and nothing changes: not n1's registration, not the token.
    let evil = nodes.path().join("evil");
    let out = run(Command::new("cp").arg("-a").arg(&n1).arg(&evil));
    assert!(out.status.success(), "{}", describe(&out));
    let st2 = PairStore::new(&n2);
    let p2 = st2
        .read_current("meshd-node")
        .expect("read")
        .expect("n2 identity");
    let links = match inventory::node_identity_entry("n1").output {
        EntryOutput::Pair(l) => l,
        _ => unreachable!(),
    };
    PairStore::new(&evil)
        .write_pair("meshd-node", &p2.cert_pem, &p2.key_pem, &links)
        .expect("write");
    let t = cp.token();
    let out = cp.rejoin(&evil, &t);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rejoin refused") && err.contains("registered identity key"),
        "{err}"
    );
    assert_eq!(cp.node("n1"), before, "n1's registration changed");
    assert_eq!(cp.node("n2"), n2_before, "n2's registration changed");
    assert_eq!(cp.token_info(&t.id).used, 0, "the token was used");
    assert!(cp
        .log()
        .contains("rejoin refused: node n1: the key offered is not its registered identity"));
    // Nor does n1's public key (anyone can read it from a certificate) with a signature by another
    // key, straight through the API.
    {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let n1_spki = pki::inspect::inspect_pem(&identity_cert(&n1))
            .expect("parse")
            .spki_der;
        let csrs = fresh_csrs("n1", a1);
        let ca_pin = t.ca_hash.trim_start_matches("sha256:");
        let msg = meshd::rejoin::rejoin_message(ca_pin, &t.id, "n1", &csrs);
        let other = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let req = meshd::rejoin::RejoinRequest {
            token: t.token.clone(),
            node_name: "n1".into(),
            identity_spki: b64.encode(&n1_spki),
            proof: b64.encode(pki::proof::sign(&other, &msg).expect("sign")),
            csrs,
        };
        let anon = ApiClient::new(
            &cp.server(),
            meshd::tls::pinned_client_config(std::sync::Arc::new(
                meshd::tls::PinnedCaVerifier::new(&t.ca_hash).expect("pin"),
            ))
            .expect("tls"),
        )
        .expect("client");
        match rt.block_on(anon.call::<serde_json::Value>(
            Method::POST,
            "/v1/join/rejoin",
            Some(&req),
        )) {
            Err(ClientError::Status {
                status: 403,
                message,
            }) => {
                assert!(message.contains("rejoin refused"), "{message}")
            }
            other => panic!("a forged proof: expected 403, got {other:?}"),
        }
        assert!(cp
            .log()
            .contains("rejoin refused: node n1: the proof does not verify"));
        assert_eq!(cp.node("n1"), before);
        assert_eq!(cp.token_info(&t.id).used, 0);
    }

    // 4. The real n1 rejoins with that token, and crashes after the control plane bound it to its
    //    new identity key but before it wrote its certificates. The token is used up; the node
    //    still holds expired certificates and the new key (kept aside before the request).
    let out = run(Command::new(meshd_bin())
        .args([
            "join",
            "--rejoin",
            "--data-dir",
            path_str(&n1),
            "--server",
            &cp.server(),
        ])
        .args(["--token", &t.token, "--ca-hash", &t.ca_hash])
        .env("FAILPOINTS", "rejoin::before_write=panic"));
    assert_eq!(out.status.signal(), Some(6), "a crash: {}", describe(&out));
    let moved = cp.node("n1");
    assert_ne!(moved.identity_sha256, before.identity_sha256);
    assert_eq!(cp.token_info(&t.id).used, 1);
    assert!(meshd::rejoin::pending_identity_path(&n1).exists());
    // A new token: the proof with the expired pair's key is refused (the registry moved on), the
    // one with the kept key passes. Same name, subnet and WireGuard key, a new identity.
    let t = cp.token();
    let out = cp.rejoin(&n1, &t);
    assert!(out.status.success(), "{}\n{}", describe(&out), cp.log());
    assert!(!meshd::rejoin::pending_identity_path(&n1).exists());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["node_name"], "n1");
    assert_eq!(v["subnet"], before.subnet.to_string());
    assert_eq!(v["wireguard_public_key"], before.wireguard_public_key);
    let after = cp.node("n1");
    assert_eq!(
        (
            &after.name,
            after.subnet,
            &after.wireguard_public_key,
            &after.addresses,
            after.endpoint
        ),
        (
            &before.name,
            before.subnet,
            &before.wireguard_public_key,
            &before.addresses,
            before.endpoint
        )
    );
    assert_ne!(after.identity_sha256, before.identity_sha256);
    assert_eq!(cp.token_info(&t.id).used, 1);
    // Its certificates are valid again (openssl), for n1, chaining to the cluster CA.
    for f in [
        "pki/meshd/node.crt",
        "kubelet/pki/kubelet.crt",
        "kubelet/pki/kubelet-client-current.pem",
        "pki/kube-proxy-client-current.pem",
    ] {
        let out = run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(cp.dir.join("pki/ca.crt"))
            .arg(n1.join(f)));
        assert!(out.status.success(), "{f}: {}", describe(&out));
    }
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(n1.join("pki/meshd/node.crt")));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("system:node:n1"),
        "{}",
        describe(&out)
    );
    // The expired pair is kept as the previous version (nothing lost).
    let st1 = PairStore::new(&n1);
    let prev = st1
        .previous_version("meshd-node")
        .expect("read")
        .expect("a previous version");
    assert!(st1.read_version("meshd-node", prev).is_ok());

    // 5. A used token cannot be used again, and the refusal changes nothing.
    let before_retry = cp.node("n1");
    let out = cp.rejoin(&n1, &t);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(GENERIC_REFUSAL),
        "{}",
        describe(&out)
    );
    assert_eq!(cp.node("n1"), before_retry);

    // 6. It can renew again with its new certificate.
    let node = meshd::join::node_client(&n1).expect("node client");
    let certs: NodeCerts = rt
        .block_on(node.call(Method::POST, "/v1/certs/renew", Some(&fresh_csrs("n1", a1))))
        .expect("renewal after the rejoin");
    assert!(certs.node_identity.contains("BEGIN CERTIFICATE"));
}
