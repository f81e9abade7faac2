//! Certificate rotation end to end, with the real `meshd` binary, a real etcd and openssl:
//!
//! * `meshd run` renews 30-second leaves on its own, at least three times each, while a long-lived
//!   mTLS client of the meshd API (one keep-alive connection, a request every ~100 ms) and an etcd
//!   client using the rotated `apiserver-etcd-client` certificate (a new connection every ~2 s, each
//!   with the version live at that moment) see zero failed requests; afterwards etcd serves the new
//!   server certificate (openssl s_client) and `meshd certs check` shows the new expiry.
//! * Two `meshd rotate` at once: one renews, the other waits for the lock and finds nothing due; a
//!   held lock makes `meshd rotate` wait, or exit 3 after `--lock-timeout`; `--dry-run` changes
//!   nothing.
//! * A joined node renews its certificates through the API with `meshd rotate`, authenticated by its
//!   current identity; the old identity is refused afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_e2e::{free_port, meshd, meshd_bin, meshd_ok, require_tool, run, wait_for, ChildGuard};

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `meshd init` with 30-second leaves and the meshd API on `port`.
fn init_30s(dir: &Path, port: u16) {
    meshd_ok(&[
        "init",
        "--data-dir",
        path_str(dir),
        "--node-name",
        "cp1",
        "--advertise-address",
        "127.0.0.1",
        "--api-port",
        &port.to_string(),
        "--cert-lifetime",
        "30s",
        "--output",
        "json",
    ]);
}

/// `meshd run --no-mesh`, waited for until it serves.
fn start_run(dir: &Path, log: &Path) -> ChildGuard {
    let mut g = ChildGuard::spawn(
        "meshd run",
        Command::new(meshd_bin()).args(["run", "--no-mesh", "--data-dir", path_str(dir)]),
        log,
    );
    let up = wait_for(Duration::from_secs(20), || {
        if !g.alive() {
            return Some(false);
        }
        read(log).contains("meshd API listening on").then_some(true)
    });
    assert_eq!(up, Some(true), "meshd run did not serve:\n{}", read(log));
    g
}

/// The live version of every stored pair (`pki/.store/<id>/current`).
fn versions(dir: &Path) -> BTreeMap<String, u64> {
    let store = pki::store::PairStore::new(dir);
    let mut out = BTreeMap::new();
    for ent in std::fs::read_dir(dir.join("pki/.store")).expect("store") {
        let id = ent
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(v) = store.current_version(&id).expect("current") {
            out.insert(id, v);
        }
    }
    out
}

/// Every file under `dir` (links as their target, files by content), for "nothing changed" checks.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for ent in std::fs::read_dir(&d).expect("read_dir") {
            let p = ent.expect("entry").path();
            let meta = std::fs::symlink_metadata(&p).expect("meta");
            let v = if meta.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).expect("link").display())
            } else if meta.is_dir() {
                stack.push(p.clone());
                continue;
            } else {
                String::from_utf8_lossy(&std::fs::read(&p).expect("read")).into_owned()
            };
            out.insert(p, v);
        }
    }
    out
}

/// The serial (upper-case hex, as openssl prints it) of the certificate in `pem`.
fn openssl_serial_of_file(cert: &Path) -> String {
    let out =
        run(Command::new("openssl").args(["x509", "-noout", "-serial", "-in", path_str(cert)]));
    assert!(out.status.success(), "openssl x509: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_owned()
}

/// The serial of the certificate a TLS server at `addr` presents, as `openssl s_client` shows it.
fn served_serial(addr: &str, cert: &Path, key: &Path, ca: &Path) -> String {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl s_client -connect {addr} -cert {} -key {} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
        path_str(cert),
        path_str(key),
        path_str(ca)
    )));
    assert!(out.status.success(), "s_client: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_owned()
}

/// A single-member etcd serving with the etcd server and peer certificates of a meshd data directory.
fn start_etcd(dir: &Path, root: &Path) -> (ChildGuard, String) {
    require_tool("etcd", "etcd-server");
    let pki = dir.join("pki/etcd");
    let p = |f: &str| path_str(&pki.join(f)).to_owned();
    for attempt in 0..3 {
        let client = format!("https://127.0.0.1:{}", free_port());
        let peer = format!("https://127.0.0.1:{}", free_port());
        let log = root.join(format!("etcd-{attempt}.log"));
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "cp1", "--data-dir"])
            .arg(root.join(format!("etcd-data-{attempt}")))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("cp1={peer}")])
            .args([
                "--cert-file",
                &p("server.crt"),
                "--key-file",
                &p("server.key"),
            ])
            .args(["--trusted-ca-file", &p("ca.crt"), "--client-cert-auth"])
            .args([
                "--peer-cert-file",
                &p("peer.crt"),
                "--peer-key-file",
                &p("peer.key"),
            ])
            .args([
                "--peer-trusted-ca-file",
                &p("ca.crt"),
                "--peer-client-cert-auth",
            ]);
        let mut g = ChildGuard::spawn("etcd", &mut cmd, &log);
        let ok = wait_for(Duration::from_secs(30), || {
            if !g.alive() {
                return Some(false);
            }
            let out = run(Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &client, "--dial-timeout", "2s"])
                .args(["--cacert", &p("ca.crt")])
                .args(["--cert", &p("healthcheck-client.crt")])
                .args(["--key", &p("healthcheck-client.key")])
                .args(["endpoint", "health"]));
            out.status.success().then_some(true)
        });
        match ok {
            Some(true) => return (g, client),
            _ if read(&log).contains("address already in use") => continue,
            _ => panic!("etcd did not become healthy:\n{}", read(&log)),
        }
    }
    panic!("etcd could not bind free ports three times");
}

/// The `apiserver-etcd-client` pair of one version: `current` is resolved once, so certificate and
/// key come from the same version.
fn etcd_client_pair(dir: &Path) -> (String, String, String) {
    let entry = dir.join("pki/.store/apiserver-etcd-client");
    let v = std::fs::read_link(entry.join("current")).expect("current");
    let vdir = entry.join(v);
    let cert = read(&vdir.join("tls.crt"));
    let key = read(&vdir.join("tls.key"));
    let serial = pki::inspect::inspect_pem(&cert).expect("cert").serial;
    (cert, key, serial)
}

/// Counters shared by the client loops.
#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.failures.lock().expect("lock").push(what);
    }
}

/// One keep-alive mTLS connection to the meshd API (admin certificate), `GET /v1/tokens` every 100 ms
/// until `stop`.
async fn api_client_loop(dir: PathBuf, addr: String, stop: Arc<AtomicBool>, c: Arc<Counters>) {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let ca = read(&dir.join("pki/ca.crt"));
    let cert = read(&dir.join("pki/meshd/admin-client.crt"));
    let key = read(&dir.join("pki/meshd/admin-client.key"));
    let tls = meshd::tls::client_config(&ca, &cert, &key).expect("client config");
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("http handshake");
    let conn_task = tokio::spawn(conn);
    while !stop.load(Ordering::SeqCst) {
        let req = hyper::Request::get("/v1/tokens")
            .header("host", addr.as_str())
            .body(Empty::<Bytes>::new())
            .expect("request");
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body.to_bytes())
                ))
            }
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()));
        match r {
            Ok(()) => {
                c.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                c.fail(format!("meshd API: {e}"));
                // The connection is gone: nothing more this client can prove.
                if sender.is_closed() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(sender);
    conn_task.abort();
}

/// An etcd client with the rotated `apiserver-etcd-client` certificate: a new connection every
/// ~2 s (with the version live at that moment), a put and a get every ~100 ms. Returns the client
/// certificate serials it connected with.
async fn etcd_client_loop(
    dir: PathBuf,
    endpoint: String,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
) -> Vec<String> {
    use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
    let ca = read(&dir.join("pki/etcd/ca.crt"));
    let mut serials = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let (cert, key, serial) = etcd_client_pair(&dir);
        if serials.last() != Some(&serial) {
            serials.push(serial.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5))
            .with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(ca.as_bytes()))
                    .identity(Identity::from_pem(cert.as_bytes(), key.as_bytes())),
            );
        let mut client = match Client::connect([endpoint.as_str()], Some(opts)).await {
            Ok(cl) => cl,
            Err(e) => {
                c.fail(format!("etcd connect with client cert {serial}: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            n += 1;
            let k = format!("/rotate-test/{}", n % 16);
            let r = async {
                client.put(k.as_str(), n.to_string(), None).await?;
                let got = client.get(k.as_str(), None).await?;
                Ok::<_, etcd_client::Error>(got.kvs().first().map(|kv| kv.value().to_vec()))
            }
            .await;
            match r {
                Ok(Some(v)) if v == n.to_string().as_bytes() => {
                    c.ok.fetch_add(1, Ordering::SeqCst);
                }
                Ok(other) => c.fail(format!("etcd get {k}: {other:?}, want {n}")),
                Err(e) => c.fail(format!("etcd (client cert {serial}): {e}")),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    serials
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn the_daemon_rotates_30s_leaves_three_times_without_a_failed_request() {
    require_tool("openssl", "openssl");
    require_tool("etcdctl", "etcd-client");
    let root = tempdir("meshd-rotate-");
    let dir = root.path().join("cp");
    let port = free_port();
    init_30s(&dir, port);
    let etcd_server_serial_0 = openssl_serial_of_file(&dir.join("pki/etcd/server.crt"));
    let api_serial_0 = openssl_serial_of_file(&dir.join("pki/meshd/api-server.crt"));
    let (_etcd, etcd_url) = start_etcd(&dir, root.path());
    let log = root.path().join("run.log");
    let mut run_guard = start_run(&dir, &log);
    let addr = format!("127.0.0.1:{port}");

    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let api = Arc::new(Counters::default());
    let etc = Arc::new(Counters::default());
    let api_task = rt.spawn(api_client_loop(
        dir.clone(),
        addr.clone(),
        stop.clone(),
        api.clone(),
    ));
    let etcd_task = rt.spawn(etcd_client_loop(
        dir.clone(),
        etcd_url.clone(),
        stop.clone(),
        etc.clone(),
    ));

    // Three rotations of every entry the clients depend on, driven by the daemon alone.
    let watched = [
        "renewed meshd-api:",
        "renewed meshd-admin:",
        "renewed etcd-server:",
        "renewed etcd-peer:",
        "renewed apiserver-etcd-client:",
    ];
    let done = wait_for(Duration::from_secs(150), || {
        let l = read(&log);
        watched.iter().all(|w| count(&l, w) >= 3).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    rt.block_on(api_task).expect("api client");
    let etcd_serials = rt.block_on(etcd_task).expect("etcd client");
    let l = read(&log);
    assert!(
        done.is_some(),
        "the daemon did not renew {watched:?} three times in 150 s:\n{l}"
    );
    assert!(run_guard.alive(), "meshd run died:\n{l}");
    assert!(
        count(&l, "meshd API: new connections get the renewed certificate") >= 3,
        "{l}"
    );

    let fails = |c: &Counters| c.failures.lock().expect("lock").clone();
    assert_eq!(
        api.failed.load(Ordering::SeqCst),
        0,
        "meshd API client: {:?}",
        fails(&api)
    );
    assert_eq!(
        etc.failed.load(Ordering::SeqCst),
        0,
        "etcd client: {:?}",
        fails(&etc)
    );
    // Enough requests to have spanned the rotations (about 10 a second each).
    assert!(
        api.ok.load(Ordering::SeqCst) > 300,
        "{}",
        api.ok.load(Ordering::SeqCst)
    );
    assert!(
        etc.ok.load(Ordering::SeqCst) > 100,
        "{}",
        etc.ok.load(Ordering::SeqCst)
    );
    // The etcd client really used the rotated certificates, and etcd accepted each of them.
    assert!(
        etcd_serials.len() >= 3,
        "the etcd client connected with only {etcd_serials:?}"
    );

    // The meshd API serves the live (renewed) certificate to new connections: read the live serial
    // before and after asking, so a renewal in between does not confuse the comparison.
    let api_file = dir.join("pki/meshd/api-server.crt");
    let admin = (
        dir.join("pki/meshd/admin-client.crt"),
        dir.join("pki/meshd/admin-client.key"),
    );
    let consistent = wait_for(Duration::from_secs(30), || {
        let before = openssl_serial_of_file(&api_file);
        let served = served_serial(&addr, &admin.0, &admin.1, &dir.join("pki/ca.crt"));
        let after = openssl_serial_of_file(&api_file);
        (before == after).then_some((served, after))
    })
    .expect("the API certificate kept changing");
    assert_eq!(
        consistent.0, consistent.1,
        "the meshd API serves an old certificate"
    );
    assert_ne!(consistent.1, api_serial_0);

    // Stop the renewals, then check what etcd serves: it re-reads its serving certificate on new
    // connections.
    run_guard.child.kill().expect("kill meshd run");
    run_guard.child.wait().expect("wait");
    let pki_dir = dir.join("pki/etcd");
    let etcd_live = openssl_serial_of_file(&pki_dir.join("server.crt"));
    assert_ne!(etcd_live, etcd_server_serial_0);
    let served = served_serial(
        etcd_url.trim_start_matches("https://"),
        &pki_dir.join("healthcheck-client.crt"),
        &pki_dir.join("healthcheck-client.key"),
        &pki_dir.join("ca.crt"),
    );
    assert_eq!(served, etcd_live, "etcd serves an old certificate");
    let api_live = openssl_serial_of_file(&dir.join("pki/meshd/api-server.crt"));
    assert_ne!(api_live, api_serial_0);
    // `meshd certs check` shows the new expiry (that of the live certificate) for every entry.
    let out = meshd(&[
        "certs",
        "check",
        "--data-dir",
        path_str(&dir),
        "--output",
        "json",
    ]);
    let rows: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(&out)));
    let row = |name: &str| {
        rows.as_array()
            .expect("rows")
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no row {name}"))
            .clone()
    };
    for (name, file) in [
        ("etcd-server", "pki/etcd/server.crt"),
        ("meshd-api", "pki/meshd/api-server.crt"),
        ("apiserver-etcd-client", "pki/apiserver-etcd-client.crt"),
    ] {
        let info = pki::inspect::inspect_pem(&read(&dir.join(file))).expect("cert");
        assert_eq!(
            row(name)["not_after"].as_str(),
            Some(pki::time::rfc3339(info.not_after).as_str()),
            "{name}"
        );
        assert_eq!(row(name)["serial"].as_str(), Some(info.serial.as_str()));
    }
}

#[test]
fn overlapping_runs_lock_and_dry_run_changes_nothing() {
    let root = tempdir("meshd-rotate-lock-");
    let dir = root.path().join("cp");
    init_30s(&dir, free_port());
    let d = path_str(&dir).to_owned();
    // The 20 leaves of a control plane; the three CAs are never rotated by `meshd rotate`.
    let leaves = 20;
    let cas = ["ca", "etcd-ca", "front-proxy-ca"];
    let leaf_versions = |dir: &Path| {
        let mut v = versions(dir);
        v.retain(|id, _| !cas.contains(&id.as_str()));
        v
    };

    // --dry-run changes nothing, even forced.
    let before = snapshot(&dir);
    let out = meshd(&["rotate", "--data-dir", &d, "--dry-run", "--force", "all"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.matches("would renew").count(), leaves, "{text}");
    assert_eq!(
        snapshot(&dir),
        before,
        "--dry-run changed the data directory"
    );

    // Nothing due right after init: quiet, exit 0, nothing changed.
    let out = meshd(&["rotate", "--data-dir", &d]);
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}",
        describe(&out)
    );
    assert_eq!(snapshot(&dir), before);

    // A usage error.
    let out = meshd(&["rotate", "--data-dir", &d, "--force", "no-such-cert"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    // The lock held by someone else: exit 3 after --lock-timeout, nothing touched.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(".lock"))
        .expect("lock file");
    lock.lock().expect("lock");
    let out = meshd(&[
        "rotate",
        "--data-dir",
        &d,
        "--force",
        "all",
        "--lock-timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still locked"),
        "{}",
        describe(&out)
    );
    assert_eq!(snapshot(&dir), before);
    // ... or it waits, and goes on once the lock is released.
    let mut waiting = ChildGuard::spawn(
        "meshd rotate",
        Command::new(meshd_bin()).args(["rotate", "--data-dir", &d, "--force", "all"]),
        &root.path().join("waiting.log"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        waiting.alive(),
        "{}",
        read(&root.path().join("waiting.log"))
    );
    assert_eq!(snapshot(&dir), before, "renewed while the lock was held");
    lock.unlock().expect("unlock");
    let st = wait_for(Duration::from_secs(30), || {
        waiting.child.try_wait().expect("wait")
    })
    .expect("meshd rotate did not finish after the lock was released");
    assert!(st.success(), "{}", read(&root.path().join("waiting.log")));
    let v1 = leaf_versions(&dir);
    assert!(v1.values().all(|v| *v == 2), "{v1:?}");
    // (admin.conf and super-admin.conf embed their credential: not in the store.)
    assert_eq!(v1.len(), leaves - 2);

    // Two forced runs at once: both succeed, one after the other (every entry exactly two versions
    // further), and every live pair is whole.
    let spawn = |name: &str| {
        ChildGuard::spawn(
            name,
            Command::new(meshd_bin()).args(["rotate", "--data-dir", &d, "--force", "all"]),
            &root.path().join(format!("{name}.log")),
        )
    };
    let (mut a, mut b) = (spawn("a"), spawn("b"));
    for g in [&mut a, &mut b] {
        let st = wait_for(Duration::from_secs(60), || {
            g.child.try_wait().expect("wait")
        })
        .expect("meshd rotate did not finish");
        assert!(st.success(), "{}", g.name);
    }
    let v2 = leaf_versions(&dir);
    assert!(v2.values().all(|v| *v == 4), "{v2:?}");
    meshd_ok(&["certs", "check", "--data-dir", &d]);

    // Two plain runs once everything is due: one renews each entry, the other waits, then finds
    // nothing due and exits 0 quietly.
    let due = wait_for(Duration::from_secs(40), || {
        let out = meshd(&["rotate", "--data-dir", &d, "--dry-run"]);
        (String::from_utf8_lossy(&out.stdout)
            .matches("would renew")
            .count()
            == leaves)
            .then_some(())
    });
    assert!(due.is_some(), "the leaves never came due");
    let plain = |name: &str| {
        ChildGuard::spawn(
            name,
            Command::new(meshd_bin()).args(["rotate", "--data-dir", &d]),
            &root.path().join(format!("{name}.log")),
        )
    };
    let before = leaf_versions(&dir);
    let (mut a, mut b) = (plain("e"), plain("f"));
    for g in [&mut a, &mut b] {
        let st = wait_for(Duration::from_secs(60), || {
            g.child.try_wait().expect("wait")
        })
        .expect("meshd rotate did not finish");
        assert!(st.success(), "{}", g.name);
    }
    let la = read(&root.path().join("e.log"));
    let lb = read(&root.path().join("f.log"));
    let renewed = la.matches("renewed ").count() + lb.matches("renewed ").count();
    let after = leaf_versions(&dir);
    for (id, v) in &after {
        assert_eq!(*v, before[id] + 1, "{id} renewed more or less than once");
    }
    assert_eq!(renewed, leaves, "each leaf renewed once:\n{la}\n---\n{lb}");
    // One run did the work; the other found nothing due.
    assert!(la.is_empty() || lb.is_empty(), "{la}\n---\n{lb}");
    meshd_ok(&["certs", "check", "--data-dir", &d]);
}

/// The meshd identity pair of a node (`pki/meshd/node.{crt,key}`), as it is now.
fn node_identity(dir: &Path) -> (String, String) {
    (
        read(&dir.join("pki/meshd/node.crt")),
        read(&dir.join("pki/meshd/node.key")),
    )
}

#[test]
fn a_joined_node_renews_through_the_api_with_its_current_identity() {
    let root = tempdir("meshd-rotate-node-");
    let cp = root.path().join("cp");
    let port = free_port();
    init_30s(&cp, port);
    let cp_log = root.path().join("cp-run.log");
    let _cp_run = start_run(&cp, &cp_log);
    let t: serde_json::Value = serde_json::from_str(&meshd_ok(&[
        "token",
        "create",
        "--data-dir",
        path_str(&cp),
        "--output",
        "json",
    ]))
    .expect("token json");
    let node = root.path().join("n1");
    let n = path_str(&node).to_owned();
    meshd_ok(&[
        "join",
        "--data-dir",
        &n,
        "--server",
        &format!("127.0.0.1:{port}"),
        "--token",
        t["token"].as_str().expect("token"),
        "--ca-hash",
        t["ca_hash"].as_str().expect("ca_hash"),
        "--node-name",
        "n1",
        "--advertise-address",
        "127.0.0.2",
        "--output",
        "json",
    ]);

    // Just joined: nothing due, nothing said.
    let out = meshd(&["rotate", "--data-dir", &n]);
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}",
        describe(&out)
    );

    // Forcing one entry renews the node's whole bundle (the control plane signs the four together
    // and registers the new identity key).
    let old = node_identity(&node);
    let out = meshd(&[
        "rotate",
        "--data-dir",
        &n,
        "--force",
        "kubelet-serving",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report json");
    let results: BTreeMap<String, String> = r["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().expect("id").to_owned(),
                e["result"].as_str().expect("result").to_owned(),
            )
        })
        .collect();
    assert_eq!(results.len(), 4, "{r}");
    assert!(results.values().all(|v| v == "renewed"), "{r}");
    let first = node_identity(&node);
    assert_ne!(first.0, old.0);
    meshd_ok(&["certs", "check", "--data-dir", &n]);

    // Once more, due or not (`all`): authenticated by the identity the last renewal gave it.
    let out = meshd(&["rotate", "--data-dir", &n, "--force", "all"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("renewed ")
            .count(),
        4
    );
    let new = node_identity(&node);
    assert!(new.0 != old.0 && new.0 != first.0);
    meshd_ok(&["certs", "check", "--data-dir", &n]);
    // Checked independently: the new identity chains to the cluster CA.
    let out = run(Command::new("openssl").args([
        "verify",
        "-CAfile",
        path_str(&node.join("pki/ca.crt")),
        path_str(&node.join("pki/meshd/node.crt")),
    ]));
    assert!(out.status.success(), "{}", describe(&out));

    // The old identity no longer speaks for the node; the new one does.
    let rt = runtime();
    let ca = read(&node.join("pki/ca.crt"));
    let call = |cert: &str, key: &str| {
        let tls = meshd::tls::client_config(&ca, cert, key).expect("tls");
        let c =
            meshd::api::client::ApiClient::new(&format!("127.0.0.1:{port}"), tls).expect("client");
        rt.block_on(c.call::<Vec<serde_json::Value>>(hyper::Method::GET, "/v1/nodes", None::<&()>))
    };
    for (what, pair) in [("old", &old), ("first renewal", &first)] {
        match call(&pair.0, &pair.1) {
            Err(meshd::api::client::ClientError::Status { status, .. }) => {
                assert_eq!(status, 401, "{what}")
            }
            other => panic!("the {what} identity was not refused: {other:?}"),
        }
    }
    assert!(call(&new.0, &new.1).is_ok());

    // The node's daemon renews on its own (30-second leaves), each time authenticated by the
    // identity the previous renewal gave it.
    let n_log = root.path().join("n1-run.log");
    let mut n_run = ChildGuard::spawn(
        "meshd run (node)",
        Command::new(meshd_bin()).args(["run", "--no-mesh", "--data-dir", &n]),
        &n_log,
    );
    let twice = wait_for(Duration::from_secs(90), || {
        (count(&read(&n_log), "renewed meshd-node:") >= 2).then_some(())
    });
    assert!(
        twice.is_some(),
        "node log:\n{}\ncontrol plane log:\n{}",
        read(&n_log),
        read(&cp_log)
    );
    assert!(n_run.alive(), "{}", read(&n_log));
    assert!(!read(&n_log).contains("FAILED"), "{}", read(&n_log));
    n_run.child.kill().expect("kill");
    let _ = n_run.child.wait();
    meshd_ok(&["certs", "check", "--data-dir", &n]);
}

#[test]
fn hooks_run_after_their_entry_renewed_and_their_failures_are_reported() {
    let root = tempdir("meshd-rotate-hooks-");
    let dir = root.path().join("cp");
    init_30s(&dir, free_port());
    let d = path_str(&dir).to_owned();
    let mark = root.path().join("hook.out");
    let mut cfg = meshd::settings::require_config(&dir).expect("meshd.json");
    cfg.hooks.insert(
        "apiserver".into(),
        format!("echo \"$MESHD_RENEWED\" >> {}", path_str(&mark)),
    );
    cfg.hooks.insert(
        "etcd-server".into(),
        "echo reload refused >&2; exit 7".into(),
    );
    meshd::settings::save_config(&dir, &cfg).expect("save");
    // A re-run of init keeps the operator's hooks.
    init_30s(&dir, cfg.cluster.as_ref().expect("cluster").api_port);
    assert_eq!(
        meshd::settings::require_config(&dir)
            .expect("meshd.json")
            .hooks,
        cfg.hooks
    );

    // Only the entries that renewed run their hook; a failing hook gives exit 4 and is named.
    let out = meshd(&["rotate", "--data-dir", &d, "--force", "apiserver"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(read(&mark), "apiserver\n");
    let out = meshd(&[
        "rotate",
        "--data-dir",
        &d,
        "--force",
        "apiserver,etcd-server",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hook of etcd-server failed") && text.contains("reload refused"),
        "{text}"
    );
    assert_eq!(read(&mark), "apiserver\napiserver\n");
    // The renewal itself stands.
    meshd_ok(&["certs", "check", "--data-dir", &d]);
    // --dry-run runs no hook.
    meshd_ok(&["rotate", "--data-dir", &d, "--force", "all", "--dry-run"]);
    assert_eq!(read(&mark), "apiserver\napiserver\n");
}

/// Fails clearly when the binary was built without failpoints.
fn require_failpoints() {
    let out = meshd(&["debug", "failpoints"]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        v["enabled"],
        true,
        "{} has no failpoints: build it with `cargo build -p meshd --features failpoints`",
        meshd_bin().display()
    );
}

/// A node killed between the control plane's answer to `POST /v1/certs/renew` (which binds it to
/// its new identity key) and writing that answer heals on its next pass: it fetches the bundle with
/// its previous identity (`GET /v1/certs/last`), installs it with the keys it kept aside, and renews
/// again later. The previous identity is refused for everything else. A crash before the request
/// (the keys kept aside, nothing bound to them) is undone the same way: the keys are discarded.
#[test]
fn a_node_killed_after_the_renewal_answer_heals_on_its_next_pass() {
    require_failpoints();
    let root = tempdir("meshd-rotate-heal-");
    let cp = root.path().join("cp");
    let port = free_port();
    meshd_ok(&[
        "init",
        "--data-dir",
        path_str(&cp),
        "--node-name",
        "cp1",
        "--advertise-address",
        "127.0.0.1",
        "--api-port",
        &port.to_string(),
        "--cert-lifetime",
        "1h",
        "--output",
        "json",
    ]);
    let cp_log = root.path().join("cp-run.log");
    let _cp_run = start_run(&cp, &cp_log);
    let t: serde_json::Value = serde_json::from_str(&meshd_ok(&[
        "token",
        "create",
        "--data-dir",
        path_str(&cp),
        "--output",
        "json",
    ]))
    .expect("token json");
    let node = root.path().join("n1");
    let n = path_str(&node).to_owned();
    meshd_ok(&[
        "join",
        "--data-dir",
        &n,
        "--server",
        &format!("127.0.0.1:{port}"),
        "--token",
        t["token"].as_str().expect("token"),
        "--ca-hash",
        t["ca_hash"].as_str().expect("ca_hash"),
        "--node-name",
        "n1",
        "--advertise-address",
        "127.0.0.2",
        "--output",
        "json",
    ]);
    let pending = node.join("pki/meshd/renew-pending.keys");
    let rt = runtime();
    let ca = read(&node.join("pki/ca.crt"));
    let client = |pair: &(String, String)| {
        let tls = meshd::tls::client_config(&ca, &pair.0, &pair.1).expect("tls");
        meshd::api::client::ApiClient::new(&format!("127.0.0.1:{port}"), tls).expect("client")
    };
    let status_of = |r: Result<serde_json::Value, meshd::api::client::ClientError>| match r {
        Ok(_) => 200,
        Err(meshd::api::client::ClientError::Status { status, .. }) => status,
        Err(e) => panic!("no answer: {e}"),
    };
    let get = |pair: &(String, String), path: &str| {
        status_of(rt.block_on(client(pair).call::<serde_json::Value>(
            hyper::Method::GET,
            path,
            None::<&()>,
        )))
    };
    // A well-formed renewal request, so that only the identity decides.
    let renew = |pair: &(String, String)| {
        let mut csrs = Vec::new();
        for e in pki::inventory::node_entries("n1", &["127.0.0.2".parse().expect("ip")]) {
            let k =
                pki::keys::PrivateKey::generate(pki::keys::KeyAlgorithm::EcdsaP256).expect("key");
            csrs.push((e.id, pki::csr::build_csr(&e.profile, &k).expect("csr")));
        }
        let csr = |id: &str| csrs.iter().find(|c| c.0 == id).expect("csr").1.clone();
        let req = meshd::api::NodeCsrs {
            kubelet_client: csr("kubelet.conf"),
            kubelet_serving: csr("kubelet-serving"),
            kube_proxy: csr("kube-proxy.conf"),
            node_identity: csr("meshd-node"),
        };
        status_of(rt.block_on(client(pair).call::<serde_json::Value>(
            hyper::Method::POST,
            "/v1/certs/renew",
            Some(&req),
        )))
    };

    // Just joined: no renewal kept.
    let joined = node_identity(&node);
    assert_eq!(get(&joined, "/v1/certs/last"), 404);

    // Killed right after the control plane's answer.
    let out = run(Command::new(meshd_bin())
        .args(["rotate", "--force", "all", "--data-dir", &n])
        .env("FAILPOINTS", "rotate::node_after_response=panic"));
    assert_eq!(out.status.code(), None, "a crash: {}", describe(&out));
    assert_eq!(node_identity(&node), joined, "nothing was written");
    assert!(pending.exists(), "the new keys are kept aside");
    // The identity the node holds no longer speaks for it...
    for path in ["/v1/nodes", "/v1/peers/watch"] {
        assert_eq!(get(&joined, path), 401, "{path}");
    }
    assert_eq!(renew(&joined), 401, "the previous identity renews again");
    // ...but may fetch the bundle it was issued (public certificates, useless without the keys).
    let bundle: meshd::api::NodeCerts = rt
        .block_on(client(&joined).call(hyper::Method::GET, "/v1/certs/last", None::<&()>))
        .expect("the previous identity fetches its last renewal");
    assert_ne!(bundle.node_identity, joined.0);

    // The next pass completes the renewal, without an operator.
    let out = meshd(&["rotate", "--data-dir", &n, "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report json");
    let recovered = r["recovered"].to_string();
    assert!(
        recovered.contains("completed a renewal interrupted after the control plane's answer")
            && recovered.contains("meshd-node"),
        "{r:#}"
    );
    assert!(!pending.exists(), "the kept keys are removed once live");
    let healed = node_identity(&node);
    assert_eq!(healed.0, bundle.node_identity);
    assert!(read(&node.join("kubelet/pki/kubelet-client-current.pem"))
        .contains(bundle.kubelet_client.trim()));
    meshd_ok(&["certs", "check", "--data-dir", &n]);
    assert_eq!(get(&healed, "/v1/nodes"), 200);
    assert_eq!(
        get(&joined, "/v1/nodes"),
        401,
        "the previous identity after healing"
    );
    assert_eq!(renew(&joined), 401);

    // It renews again, with the healed identity; then neither earlier identity gets anything,
    // not even the last bundle.
    let out = meshd(&["rotate", "--data-dir", &n, "--force", "all"]);
    assert!(out.status.success(), "{}", describe(&out));
    let again = node_identity(&node);
    assert_ne!(again.0, healed.0);
    for (what, pair) in [("joined", &joined), ("healed", &healed)] {
        for path in ["/v1/nodes", "/v1/peers/watch"] {
            assert_eq!(get(pair, path), 401, "{what} {path}");
        }
        assert_eq!(renew(pair), 401, "{what}");
    }
    assert_eq!(get(&joined, "/v1/certs/last"), 401, "an older identity");
    assert_eq!(get(&again, "/v1/nodes"), 200);

    // Killed before the request (the keys just kept aside): nothing was bound to them, and the
    // next pass discards them.
    let out = run(Command::new(meshd_bin())
        .args(["rotate", "--force", "all", "--data-dir", &n])
        .env("FAILPOINTS", "store::write_atomic::before_dir_fsync=panic"));
    assert_eq!(out.status.code(), None, "a crash: {}", describe(&out));
    assert!(pending.exists());
    assert_eq!(node_identity(&node), again);
    let out = meshd(&["rotate", "--data-dir", &n]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("discarded the keys of an interrupted renewal"),
        "{}",
        describe(&out)
    );
    assert!(!pending.exists());
    assert_eq!(node_identity(&node), again);
    assert_eq!(get(&again, "/v1/nodes"), 200);
    meshd_ok(&["certs", "check", "--data-dir", &n]);
}

/// One etcd process on fixed URLs and data directory (so that it can be restarted as it was), with
/// the etcd certificates of a meshd data directory; waits until etcd answers.
fn spawn_etcd(
    dir: &Path,
    data: &Path,
    client: &str,
    peer: &str,
    log: &Path,
) -> Result<ChildGuard, String> {
    let pki = dir.join("pki/etcd");
    let p = |f: &str| path_str(&pki.join(f)).to_owned();
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "cp1", "--data-dir"])
        .arg(data)
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("cp1={peer}")])
        .args([
            "--cert-file",
            &p("server.crt"),
            "--key-file",
            &p("server.key"),
        ])
        .args(["--trusted-ca-file", &p("ca.crt"), "--client-cert-auth"])
        .args([
            "--peer-cert-file",
            &p("peer.crt"),
            "--peer-key-file",
            &p("peer.key"),
        ])
        .args([
            "--peer-trusted-ca-file",
            &p("ca.crt"),
            "--peer-client-cert-auth",
        ]);
    let mut g = ChildGuard::spawn("etcd", &mut cmd, log);
    let ok = wait_for(Duration::from_secs(30), || {
        if !g.alive() {
            return Some(false);
        }
        let out = run(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", client, "--dial-timeout", "2s"])
            .args(["--cacert", &p("ca.crt")])
            .args(["--cert", &p("healthcheck-client.crt")])
            .args(["--key", &p("healthcheck-client.key")])
            .args(["endpoint", "health"]));
        out.status.success().then_some(true)
    });
    match ok {
        Some(true) => Ok(g),
        _ => Err(read(log)),
    }
}

/// `meshd run --store etcd` keeps working after its own etcd client certificate (`meshd-etcd-client`)
/// rotated and the first one expired, across an etcd restart that forces a new connection: the
/// store's client is rebuilt with the renewed pair on every rotation of that entry.
#[test]
fn the_etcd_store_reconnects_with_its_renewed_client_certificate() {
    require_tool("etcd", "etcd-server");
    require_tool("etcdctl", "etcd-client");
    let root = tempdir("meshd-rotate-etcd-client-");
    let cp = root.path().join("cp");
    let port = free_port();
    meshd_ok(&[
        "init",
        "--data-dir",
        path_str(&cp),
        "--node-name",
        "cp1",
        "--advertise-address",
        "127.0.0.1",
        "--api-port",
        &port.to_string(),
        "--cert-lifetime",
        "30s",
        "--store",
        "etcd",
        "--etcd-endpoints",
        "https://127.0.0.1:1",
        "--output",
        "json",
    ]);
    // etcd on free ports (retried when one was taken meanwhile); meshd pointed at it.
    let data = root.path().join("etcd-data");
    let mut started = None;
    for attempt in 0..3 {
        let client = format!("https://127.0.0.1:{}", free_port());
        let peer = format!("https://127.0.0.1:{}", free_port());
        let log = root.path().join(format!("etcd-{attempt}.log"));
        match spawn_etcd(&cp, &data, &client, &peer, &log) {
            Ok(g) => {
                started = Some((g, client, peer));
                break;
            }
            Err(l) if l.contains("address already in use") => {
                let _ = std::fs::remove_dir_all(&data);
            }
            Err(l) => panic!("etcd did not start:\n{l}"),
        }
    }
    let (etcd, client, peer) = started.expect("etcd could not bind free ports three times");
    let mut cfg = meshd::settings::require_config(&cp).expect("meshd.json");
    cfg.store.etcd_endpoints = vec![client.clone()];
    meshd::settings::save_config(&cp, &cfg).expect("meshd.json");

    let first =
        pki::inspect::inspect_pem(&read(&cp.join("pki/etcd/meshd-client.crt"))).expect("cert");
    let log = root.path().join("run.log");
    let mut g = start_run(&cp, &log);
    meshd_ok(&["node", "list", "--data-dir", path_str(&cp)]);
    // The first client certificate renewed and the store reconnected with the new one, at least
    // twice, and the first one has expired.
    let done = wait_for(Duration::from_secs(120), || {
        if !g.alive() {
            return Some(false);
        }
        let l = read(&log);
        (count(
            &l,
            "etcd store: reconnected with the renewed meshd-etcd-client certificate",
        ) >= 2
            && std::time::SystemTime::now() > first.not_after + Duration::from_secs(1))
        .then_some(true)
    });
    assert_eq!(done, Some(true), "meshd run:\n{}", read(&log));
    let live =
        pki::inspect::inspect_pem(&read(&cp.join("pki/etcd/meshd-client.crt"))).expect("cert");
    assert_ne!(live.serial, first.serial);

    // etcd restarts: every connection is new, and only a valid client certificate gets in.
    drop(etcd);
    let etcd = spawn_etcd(
        &cp,
        &data,
        &client,
        &peer,
        &root.path().join("etcd-restart.log"),
    )
    .unwrap_or_else(|l| panic!("etcd did not restart:\n{l}"));
    // The API reads the store: it answers again once the client reconnected.
    let back = wait_for(Duration::from_secs(30), || {
        run(Command::new(meshd_bin()).args(["node", "list", "--data-dir", path_str(&cp)]))
            .status
            .success()
            .then_some(())
    });
    assert!(
        back.is_some(),
        "the store did not come back after the etcd restart:\n{}",
        read(&log)
    );
    assert!(g.alive(), "{}", read(&log));
    assert!(!read(&log).contains("cannot be used"), "{}", read(&log));
    drop(g);
    drop(etcd);
}

/// A node killed after the renewal answer that stays down until the bundle kept for it expired
/// cannot heal on its own (its identity expired too); `meshd join --rejoin` restores it, proving with
/// the identity key the interrupted renewal had kept aside (the one the control plane registered).
#[test]
fn a_node_down_until_its_kept_renewal_expired_is_restored_by_rejoin() {
    require_failpoints();
    let root = tempdir("meshd-rotate-heal-expired-");
    let cp = root.path().join("cp");
    let port = free_port();
    meshd_ok(&[
        "init",
        "--data-dir",
        path_str(&cp),
        "--node-name",
        "cp1",
        "--advertise-address",
        "127.0.0.1",
        "--api-port",
        &port.to_string(),
        "--cert-lifetime",
        "10s",
        "--output",
        "json",
    ]);
    let cp_log = root.path().join("cp-run.log");
    let _cp_run = start_run(&cp, &cp_log);
    let token = || -> serde_json::Value {
        serde_json::from_str(&meshd_ok(&[
            "token",
            "create",
            "--data-dir",
            path_str(&cp),
            "--output",
            "json",
        ]))
        .expect("token json")
    };
    let t = token();
    let node = root.path().join("n1");
    let n = path_str(&node).to_owned();
    let server = format!("127.0.0.1:{port}");
    meshd_ok(&[
        "join",
        "--data-dir",
        &n,
        "--server",
        &server,
        "--token",
        t["token"].as_str().expect("token"),
        "--ca-hash",
        t["ca_hash"].as_str().expect("ca_hash"),
        "--node-name",
        "n1",
        "--advertise-address",
        "127.0.0.2",
        "--output",
        "json",
    ]);
    let pending = node.join("pki/meshd/renew-pending.keys");
    let out = run(Command::new(meshd_bin())
        .args(["rotate", "--force", "all", "--data-dir", &n])
        .env("FAILPOINTS", "rotate::node_after_response=panic"));
    assert_eq!(out.status.code(), None, "a crash: {}", describe(&out));
    assert!(pending.exists());
    let held = node_identity(&node);
    let rt = runtime();
    let ca = read(&node.join("pki/ca.crt"));
    let tls = meshd::tls::client_config(&ca, &held.0, &held.1).expect("tls");
    let c = meshd::api::client::ApiClient::new(&server, tls).expect("client");
    let bundle: meshd::api::NodeCerts = rt
        .block_on(c.call(hyper::Method::GET, "/v1/certs/last", None::<&()>))
        .expect("the kept bundle");
    // Down until both the identity it holds and the kept bundle expired.
    let end = [&held.0, &bundle.node_identity]
        .iter()
        .map(|p| pki::inspect::inspect_pem(p).expect("cert").not_after)
        .max()
        .expect("two");
    let expired = wait_for(Duration::from_secs(60), || {
        (std::time::SystemTime::now() > end + Duration::from_secs(1)).then_some(())
    });
    assert!(expired.is_some());
    // Its own pass cannot complete the renewal, says why, and keeps the keys.
    let out = meshd(&["rotate", "--data-dir", &n]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("meshd join --rejoin"),
        "{}",
        describe(&out)
    );
    assert!(pending.exists());
    // A rejoin proves with the kept identity key (the registered one) and restores the node.
    let t = token();
    let out = meshd(&[
        "join",
        "--rejoin",
        "--data-dir",
        &n,
        "--server",
        &server,
        "--token",
        t["token"].as_str().expect("token"),
        "--ca-hash",
        t["ca_hash"].as_str().expect("ca_hash"),
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}\ncontrol plane:\n{}",
        describe(&out),
        read(&cp_log)
    );
    assert!(!pending.exists(), "the renewal's keys are discarded");
    meshd_ok(&["certs", "check", "--data-dir", &n]);
    let now = node_identity(&node);
    let tls = meshd::tls::client_config(&ca, &now.0, &now.1).expect("tls");
    let c = meshd::api::client::ApiClient::new(&server, tls).expect("client");
    rt.block_on(c.call::<serde_json::Value>(hyper::Method::GET, "/v1/nodes", None::<&()>))
        .expect("the restored identity speaks for the node");
}
