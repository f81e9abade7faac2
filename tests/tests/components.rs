//! The Kubernetes components meshd drives.
//!
//! * `meshd run` supervises a real etcd (Debian's `etcd-server`) with the flags meshd renders: the
//!   apiserver's etcd client certificate works against it and a client without a certificate is
//!   refused (etcdctl), `kill -9` of etcd is followed by a restart, `meshd status` shows it and its
//!   log, a renewed serving certificate is served on the next connection without a restart (openssl
//!   s_client), and shutdown stops it.
//! * `meshd render` (systemd units and static pods) is checked against each component's real flag
//!   set (`tests/data/flags/`, sources cited there), every path it names exists in the data
//!   directory with the right mode and owner, and the CFG rules of `audit-checks.md` hold.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshd_e2e::{
    free_port, init_dir, meshd_bin, meshd_ok, require_tool, run, wait_for, ChildGuard,
};

const WAIT: Duration = Duration::from_secs(60);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A `meshd run` with supervision on. Dropping it stops meshd with SIGTERM (so it stops its
/// components), then kills every component process it recorded, should one be left.
struct Supervised {
    run: Option<ChildGuard>,
    dir: tempfile::TempDir,
    pids: Vec<u32>,
}

impl Supervised {
    fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.path().join("components/status.json"))
            .unwrap_or_else(|_| "{}".into());
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    fn component(&self, name: &str) -> serde_json::Value {
        self.status()["components"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits until etcd runs, is healthy and its pid is not `not`; returns the pid.
    fn wait_healthy_etcd(&mut self, not: Option<u32>) -> u32 {
        let pid = wait_for(WAIT, || {
            let c = self.component("etcd");
            let pid = c["pid"].as_u64()? as u32;
            (c["state"] == "running" && c["healthy"] == true && Some(pid) != not).then_some(pid)
        });
        match pid {
            Some(p) => {
                self.pids.push(p);
                p
            }
            None => panic!(
                "etcd did not become healthy: {}\netcd log:\n{}",
                self.status(),
                std::fs::read_to_string(self.dir.path().join("components/etcd/etcd.log"))
                    .unwrap_or_default()
            ),
        }
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut g = self.run.take()?;
        let pid = rustix::process::Pid::from_child(&g.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let st = wait_for(Duration::from_secs(30), || {
            g.child.try_wait().ok().flatten()
        });
        drop(g);
        st
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
        for p in &self.pids {
            if let Some(pid) = i32::try_from(*p)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn etcdctl(url: &str, d: &Path, cert: Option<(&str, &str)>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .args(["--endpoints", url])
        .args(["--dial-timeout", "2s", "--command-timeout", "3s"])
        .args(["--cacert", path_str(&d.join("pki/etcd/ca.crt"))]);
    if let Some((c, k)) = cert {
        cmd.args(["--cert", path_str(&d.join(c))])
            .args(["--key", path_str(&d.join(k))]);
    }
    run(cmd.args(args))
}

/// The certificate etcd serves on a new connection (openssl s_client, with the healthcheck client
/// certificate), as DER.
fn served_cert(d: &Path, port: u16) -> Vec<u8> {
    let out = run(Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-CAfile", path_str(&d.join("pki/etcd/ca.crt"))])
        .args([
            "-cert",
            path_str(&d.join("pki/etcd/healthcheck-client.crt")),
        ])
        .args(["-key", path_str(&d.join("pki/etcd/healthcheck-client.key"))])
        .arg("-verify_return_error")
        .arg("-showcerts")
        .stdin(std::process::Stdio::null()));
    let text = String::from_utf8_lossy(&out.stdout);
    let pem = text
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|s| s.split("-----END CERTIFICATE-----").next())
        .unwrap_or_else(|| {
            panic!(
                "no certificate from s_client:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    pki::inspect::pem_to_der(&format!(
        "-----BEGIN CERTIFICATE-----{pem}-----END CERTIFICATE-----\n"
    ))
    .expect("PEM from s_client")
}

/// Issues a new etcd serving certificate from the data directory's etcd CA and makes it current,
/// the way rotation does; returns it as DER.
fn renew_etcd_server(d: &Path) -> Vec<u8> {
    use pki::inventory::{control_plane_entries, issue_entry, CaId, CaSet, Output};
    let s = meshd::settings::load(d)
        .expect("meshd.json")
        .expect("cluster");
    let load = |id| match meshd::material::read_ca(d, id).expect("read CA") {
        meshd::material::Found::Present(m) => pki::ca::CertificateAuthority::from_parts(
            m.cert_pem,
            pki::keys::PrivateKey::from_pem_bundle(m.key_pem.expose()).expect("CA key"),
        )
        .expect("CA"),
        _ => panic!("CA missing"),
    };
    let cas = CaSet {
        cluster: load(CaId::Cluster),
        etcd: load(CaId::Etcd),
        front_proxy: load(CaId::FrontProxy),
    };
    let entries = control_plane_entries(&s).expect("entries");
    let e = entries
        .iter()
        .find(|e| e.id == "etcd-server")
        .expect("etcd-server");
    let issued = issue_entry(
        e,
        &cas,
        s.key_algorithm,
        s.leaf_validity(),
        std::time::SystemTime::now(),
    )
    .expect("issue");
    let Output::Pair(links) = &e.output else {
        panic!("etcd-server is a pair")
    };
    pki::store::PairStore::new(d)
        .write_pair(e.id, &issued.cert.pem, &issued.key.to_pem(), links)
        .expect("write pair");
    issued.cert.der
}

#[test]
fn meshd_run_supervises_etcd_on_mtls_restarts_it_and_shows_it() {
    require_tool("etcd", "etcd-server");
    require_tool("etcdctl", "etcd-client");
    require_tool("openssl", "openssl");
    let api_port = free_port().to_string();
    let dir = init_dir("cp1", "127.0.0.1", &["--api-port", &api_port]);
    let d = dir.path().to_path_buf();
    let (cport, pport) = (free_port(), free_port());
    // Every Kubernetes binary is configured to a path that does not exist: reported as missing,
    // whatever this machine has on PATH.
    let mut binaries = serde_json::Map::new();
    for c in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
    ] {
        binaries.insert(c.into(), format!("/nonexistent/{c}").into());
    }
    let cfg = serde_json::json!({
        "etcd_client_port": cport,
        "etcd_peer_port": pport,
        "backoff_initial_ms": 200,
        "probe_interval_secs": 1,
        "binaries": binaries,
    });
    std::fs::write(d.join("components.json"), cfg.to_string()).expect("components.json");
    let mut cmd = Command::new(meshd_bin());
    cmd.args(["run", "--no-mesh", "--data-dir", path_str(&d)]);
    let run = ChildGuard::spawn("meshd run", &mut cmd, &d.join("run.log"));
    let mut sup = Supervised {
        run: Some(run),
        dir,
        pids: vec![],
    };

    // etcd comes up healthy (meshd's probe: /health over mTLS with the healthcheck client).
    let pid1 = sup.wait_healthy_etcd(None);
    let url = format!("https://127.0.0.1:{cport}");
    let cmdline = read(Path::new(&format!("/proc/{pid1}/cmdline"))).replace('\0', " ");
    for want in [
        "--client-cert-auth=true",
        "--peer-client-cert-auth=true",
        "--auto-tls=false",
        "--peer-auto-tls=false",
    ] {
        assert!(
            cmdline.contains(want),
            "{want} missing from etcd's command line: {cmdline}"
        );
    }

    // The apiserver's etcd client certificate works; no certificate, no access.
    let apiserver = Some((
        "pki/apiserver-etcd-client.crt",
        "pki/apiserver-etcd-client.key",
    ));
    let put = etcdctl(&url, &d, apiserver, &["put", "/e2e/components", "v1"]);
    assert!(
        put.status.success(),
        "put: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = etcdctl(
        &url,
        &d,
        apiserver,
        &["get", "--print-value-only", "/e2e/components"],
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");
    let anon = etcdctl(&url, &d, None, &["get", "/e2e/components"]);
    assert!(
        !anon.status.success(),
        "etcd served a client without a certificate"
    );
    assert!(!String::from_utf8_lossy(&anon.stdout).contains("v1"));
    // A client certificate from another CA (the cluster CA's apiserver-kubelet-client) is refused.
    let foreign = etcdctl(
        &url,
        &d,
        Some((
            "pki/apiserver-kubelet-client.crt",
            "pki/apiserver-kubelet-client.key",
        )),
        &["get", "/e2e/components"],
    );
    assert!(!foreign.status.success(), "etcd served a cluster-CA client");

    // meshd status shows etcd, its pid and its log; the other components are reported missing.
    let st = meshd_ok(&["status", "--data-dir", path_str(&d), "--output", "json"]);
    let st: serde_json::Value = serde_json::from_str(&st).expect("status JSON");
    let comps = st["components"]["components"]
        .as_array()
        .expect("components");
    let etcd = comps
        .iter()
        .find(|c| c["name"] == "etcd")
        .expect("etcd in status");
    assert_eq!(etcd["pid"].as_u64(), Some(u64::from(pid1)));
    let log = PathBuf::from(etcd["log"].as_str().expect("log path"));
    assert_eq!(log, d.join("components/etcd/etcd.log"));
    assert!(
        read(&log).contains("serving client requests"),
        "etcd's log is where status says"
    );
    for c in comps.iter().filter(|c| c["name"] != "etcd") {
        assert_eq!(c["state"], "missing", "{c}");
        assert!(
            c["detail"].as_str().unwrap_or("").contains("/nonexistent/"),
            "{c}"
        );
    }
    let table = meshd_ok(&["status", "--data-dir", path_str(&d)]);
    assert!(
        table.contains(&format!("log: {}", log.display())),
        "{table}"
    );

    // kill -9: meshd restarts it, with the data intact.
    let pid = rustix::process::Pid::from_raw(pid1 as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill -9 etcd");
    let pid2 = sup.wait_healthy_etcd(Some(pid1));
    assert!(sup.component("etcd")["restarts"].as_u64() >= Some(1));
    assert!(
        sup.component("etcd")["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{}",
        sup.component("etcd")
    );
    let get = etcdctl(
        &url,
        &d,
        apiserver,
        &["get", "--print-value-only", "/e2e/components"],
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");

    // Rotation of etcd's serving certificate: served on the next connection, no restart needed.
    let before = served_cert(&d, cport);
    assert_eq!(
        before,
        pki::inspect::pem_to_der(&read(&d.join("pki/etcd/server.crt"))).expect("PEM")
    );
    let renewed = renew_etcd_server(&d);
    assert_ne!(before, renewed);
    assert_eq!(
        served_cert(&d, cport),
        renewed,
        "etcd serves the renewed certificate"
    );
    assert!(alive(pid2));
    assert_eq!(sup.component("etcd")["pid"].as_u64(), Some(u64::from(pid2)));

    // Shutdown stops etcd.
    let st = sup.stop().expect("meshd run exits on SIGTERM");
    assert!(
        st.success(),
        "meshd run: {st}\n{}",
        read(&d.join("run.log"))
    );
    assert!(
        wait_for(Duration::from_secs(15), || (!alive(pid2)).then_some(())).is_some(),
        "etcd still runs after meshd stopped"
    );
    assert_eq!(sup.component("etcd")["state"], "stopped");
    let runlog = read(&d.join("run.log"));
    assert!(runlog.contains("components: stopping etcd"), "{runlog}");
}

/// The arguments of every `.service` file's `ExecStart=` (binary first) and of every static pod's
/// `command:`.
fn unit_args(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_exec = false;
    for line in text.lines() {
        let l = line.trim();
        let l = if let Some(rest) = l.strip_prefix("ExecStart=") {
            in_exec = true;
            rest
        } else if in_exec {
            l
        } else {
            continue;
        };
        let cont = l.ends_with('\\');
        out.push(
            l.trim_end_matches('\\')
                .trim()
                .trim_matches('"')
                .to_string(),
        );
        if !cont {
            break;
        }
    }
    out
}

fn pod_args(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_cmd = false;
    for line in text.lines() {
        if line.trim() == "command:" {
            in_cmd = true;
            continue;
        }
        if in_cmd {
            match line.trim().strip_prefix("- ") {
                Some(v) if line.starts_with("    - ") => {
                    out.push(serde_json::from_str::<String>(v).expect("quoted arg"))
                }
                _ => break,
            }
        }
    }
    out
}

/// `--name=value` → (name, value).
fn flags(args: &[String]) -> BTreeMap<String, String> {
    args.iter()
        .skip(1)
        .map(|a| {
            let a = a
                .strip_prefix("--")
                .unwrap_or_else(|| panic!("not a long flag: {a}"));
            let (k, v) = a.split_once('=').unwrap_or((a, "true"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The flag set of `component` from `tests/data/flags/<component>.txt`.
fn known_flags(component: &str) -> BTreeSet<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/flags")
        .join(format!("{component}.txt"));
    let text = read(&p);
    let mut out = BTreeSet::new();
    for l in text.lines().map(str::trim) {
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (flag, source) = l.split_once('#').unwrap_or((l, ""));
        // Every hand-listed flag says where it was seen (tests/data/flags/SOURCES.md); etcd's list
        // is the whole output of `etcd --help`.
        assert!(
            component == "etcd" || component.ends_with("-1.31") || !source.trim().is_empty(),
            "{}: {flag} has no source",
            p.display()
        );
        out.insert(flag.trim().trim_start_matches("--").to_string());
    }
    out
}

/// A YAML `key: value` of a rendered config file (meshd's own simple YAML).
fn yaml_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim_start().strip_prefix(&format!("{key}:"))?.trim();
        Some(v.trim_matches('"').to_string())
    })
}

fn yaml_list(text: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}:"));
    lines.next();
    for l in lines {
        match l.trim().strip_prefix("- ") {
            Some(v) => out.push(v.trim_matches('"').to_string()),
            None => break,
        }
    }
    out
}

/// The dotted key paths of meshd's own simple YAML (two-space indentation, `- ` list items skipped).
fn yaml_paths(text: &str) -> Vec<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = Vec::new();
    for l in text.lines() {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') || t.starts_with("- ") {
            continue;
        }
        let indent = l.len() - t.len();
        let Some((key, _)) = t.split_once(':') else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let path = match stack.last() {
            Some((_, p)) => format!("{p}.{key}"),
            None => key.to_string(),
        };
        stack.push((indent, path.clone()));
        out.push(path);
    }
    out
}

/// ECDHE key exchange and AEAD only (TLS-03 / CFG-09).
fn cipher_ok(s: &str) -> bool {
    s.starts_with("TLS_ECDHE_") && (s.contains("_GCM_") || s.contains("CHACHA20_POLY1305"))
}

fn cert_der(p: &Path) -> Vec<u8> {
    pki::inspect::pem_to_der(&read(p)).expect("PEM")
}

fn signed_by(cert: &Path, ca: &Path) -> bool {
    matches!(
        pki::inspect::verify_signed_by(&cert_der(cert), &cert_der(ca)),
        Ok(Ok(()))
    )
}

/// `meshd audit --config-dir <dir> --no-processes --no-registry` on data directory `d`, JSON: asserts
/// exit 0, no FAIL/WARN/ERROR, and that every CFG check in `want` PASSes on every component of
/// `dir` that it applies to. Returns the report.
fn audit_rendered(d: &Path, dir: &Path, want: &[(&str, &str)]) -> serde_json::Value {
    let out = run(Command::new(meshd_bin()).args([
        "audit",
        "--data-dir",
        path_str(d),
        "--config-dir",
        path_str(dir),
        "--no-processes",
        "--no-registry",
        "--output",
        "json",
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "audit of {}: not JSON ({e}): {text}\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings = r["findings"].as_array().expect("findings");
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| !matches!(f["status"].as_str(), Some("PASS") | Some("SKIP")))
        .map(|f| {
            format!(
                "{} {} {}: {}",
                f["status"], f["id"], f["target"], f["observed"]
            )
        })
        .collect();
    assert!(bad.is_empty(), "audit of {}: {bad:#?}", dir.display());
    // The NET checks are skipped (--no-registry); nothing else may be.
    let skipped: Vec<String> = findings
        .iter()
        .filter(|f| f["status"] == "SKIP" && !f["id"].as_str().unwrap_or("").starts_with("NET-"))
        .map(|f| format!("{} {}: {}", f["id"], f["target"], f["observed"]))
        .collect();
    assert!(
        skipped.is_empty(),
        "audit of {}: {skipped:#?}",
        dir.display()
    );
    assert_eq!(out.status.code(), Some(0), "audit of {}", dir.display());
    for (id, component) in want {
        let hit = findings.iter().any(|f| {
            f["id"] == *id
                && f["status"] == "PASS"
                && f["target"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{component} ("))
                && f["target"].as_str().unwrap_or("").contains(path_str(dir))
        });
        assert!(hit, "{id} did not PASS on {component} of {}", dir.display());
    }
    r
}

/// The CFG checks a control plane's rendered configuration must pass, per component.
const CP_CFG: [(&str, &str); 17] = [
    ("CFG-01", "etcd"),
    ("CFG-02", "etcd"),
    ("CFG-03", "etcd"),
    ("CFG-04", "etcd"),
    ("CFG-05", "etcd"),
    ("CFG-06", "kube-apiserver"),
    ("CFG-07", "kube-apiserver"),
    ("CFG-08", "kube-apiserver"),
    ("CFG-09", "kube-apiserver"),
    ("CFG-10", "kube-apiserver"),
    ("CFG-11", "kube-apiserver"),
    ("CFG-09", "kubelet"),
    ("CFG-10", "kubelet"),
    ("CFG-11", "kubelet"),
    ("CFG-12", "kubelet"),
    ("CFG-13", "kube-controller-manager"),
    ("CFG-13", "kube-scheduler"),
];

#[test]
fn rendered_units_and_static_pods_use_real_flags_existing_files_and_pass_cfg_checks() {
    require_tool("openssl", "openssl");
    let dir = init_dir("cp1", "127.0.0.1", &[]);
    let d = dir.path();
    let out = tempfile::tempdir().expect("tempdir");
    let units = out.path().join("systemd");
    let pods = out.path().join("static-pods");
    meshd_ok(&[
        "render",
        "--data-dir",
        path_str(d),
        "--format",
        "systemd",
        "--out",
        path_str(&units),
    ]);
    meshd_ok(&[
        "render",
        "--data-dir",
        path_str(d),
        "--format",
        "static-pods",
        "--out",
        path_str(&pods),
    ]);

    let components = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
    ];
    let mut all: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    for c in components {
        let unit = read(&units.join(format!("{c}.service")));
        let args = unit_args(&unit);
        assert!(
            args[0].ends_with(&format!("/{c}")),
            "{c}: binary {}",
            args[0]
        );
        // The static pod runs the same command line (kubelet stays a systemd unit).
        if c == "kubelet" {
            assert_eq!(unit, read(&pods.join("kubelet.service")));
        } else {
            let pod = read(&pods.join(format!("{c}.yaml")));
            let pargs = pod_args(&pod);
            assert_eq!(pargs[0], c);
            assert_eq!(&pargs[1..], &args[1..], "{c}: static pod and unit differ");
            // Every hostPath it mounts exists.
            for l in pod.lines().filter(|l| l.trim_start().starts_with("path: ")) {
                let p = l.trim().trim_start_matches("path: ").trim_matches('"');
                if p.starts_with(path_str(d)) && !p.ends_with("/data") {
                    assert!(Path::new(p).exists(), "{c}: hostPath {p} missing");
                }
            }
        }
        let f = flags(&args);
        // Every flag exists in the component's real flag set (tests/data/flags/, sources there).
        let known = known_flags(c);
        // The complete v1.31 set, where one was available (tests/data/flags/SOURCES.md).
        let v131 = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/flags")
            .join(format!("{c}-1.31.txt"));
        let full = v131.exists().then(|| known_flags(&format!("{c}-1.31")));
        for k in f.keys() {
            assert!(
                known.contains(k),
                "{c}: --{k} is not a flag of {c} in every targeted version"
            );
            if let Some(full) = &full {
                assert!(
                    full.contains(k),
                    "{c}: --{k} is not in {c}'s v1.31 flag set"
                );
            }
        }
        all.insert(c, f);
    }

    // Every file the rendered output names exists, with the right mode and owner (CFG-14).
    let uid = rustix::process::geteuid().as_raw();
    let kubelet_cfg = PathBuf::from(&all["kubelet"]["config"]);
    let proxy_cfg = PathBuf::from(&all["kube-proxy"]["config"]);
    let kubelet_yaml = read(&kubelet_cfg);
    let proxy_yaml = read(&proxy_cfg);
    let mut paths: Vec<String> = all
        .values()
        .flat_map(|f| f.values().cloned())
        .filter(|v| v.starts_with(path_str(d)))
        .collect();
    for y in [&kubelet_yaml, &proxy_yaml] {
        for l in y.lines() {
            if let Some((_, v)) = l.split_once(": ") {
                let v = v.trim_matches('"');
                if v.starts_with(path_str(d)) {
                    paths.push(v.to_string());
                }
            }
        }
    }
    // The kubeconfigs' credential files too.
    for kc in [
        "controller-manager.conf",
        "scheduler.conf",
        "kubelet.conf",
        "kube-proxy.conf",
    ] {
        for l in read(&d.join(kc)).lines() {
            if let Some(v) = l.trim().strip_prefix("client-key: ") {
                paths.push(v.trim_matches('"').to_string());
            }
        }
    }
    let etcd_data = all["etcd"]["data-dir"].clone();
    let m = std::fs::metadata(&etcd_data).expect("render makes etcd's data directory");
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o777, 0o700, "etcd's data directory");
    paths.retain(|p| *p != etcd_data);
    paths.sort();
    paths.dedup();
    assert!(paths.len() > 25, "{paths:?}");
    for p in &paths {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(m.is_file(), "{p} is not a file");
        assert_eq!(m.uid(), uid, "{p}: owner");
        let secret = p.ends_with(".key")
            || p.ends_with(".pem")
            || p.ends_with(".conf")
            || p.ends_with(".yaml");
        if secret {
            assert_eq!(m.mode() & 0o777, 0o600, "{p}: mode {:o}", m.mode() & 0o777);
        } else {
            assert_eq!(m.mode() & 0o022, 0, "{p}: writable by others");
        }
    }

    let ca = d.join("pki/ca.crt");
    let etcd_ca = d.join("pki/etcd/ca.crt");
    let etcd = &all["etcd"];
    // CFG-01..05: etcd.
    assert!(signed_by(Path::new(&etcd["cert-file"]), &etcd_ca), "CFG-01");
    assert!(Path::new(&etcd["key-file"]).exists(), "CFG-01");
    assert_eq!(etcd["client-cert-auth"], "true", "CFG-02");
    assert_eq!(etcd["trusted-ca-file"], path_str(&etcd_ca), "CFG-02");
    assert_ne!(
        etcd.get("auto-tls").map(String::as_str),
        Some("true"),
        "CFG-03"
    );
    assert_ne!(
        etcd.get("peer-auto-tls").map(String::as_str),
        Some("true"),
        "CFG-03"
    );
    assert!(
        signed_by(Path::new(&etcd["peer-cert-file"]), &etcd_ca),
        "CFG-04"
    );
    assert_eq!(etcd["peer-client-cert-auth"], "true", "CFG-04");
    assert_eq!(etcd["peer-trusted-ca-file"], path_str(&etcd_ca), "CFG-04");
    assert_ne!(
        cert_der(&etcd_ca),
        cert_der(&ca),
        "CFG-05: etcd CA differs from the cluster CA"
    );
    for k in [
        "listen-client-urls",
        "advertise-client-urls",
        "listen-peer-urls",
        "initial-advertise-peer-urls",
    ] {
        for u in etcd[k].split(',') {
            assert!(u.starts_with("https://"), "{k}: {u}");
        }
    }
    // CFG-06..11: the API server.
    let api = &all["kube-apiserver"];
    for u in api["etcd-servers"].split(',') {
        assert!(u.starts_with("https://"), "CFG-06: {u}");
    }
    assert_eq!(api["etcd-cafile"], path_str(&etcd_ca), "CFG-06");
    assert!(
        signed_by(Path::new(&api["etcd-certfile"]), &etcd_ca),
        "CFG-06"
    );
    assert!(Path::new(&api["etcd-keyfile"]).exists(), "CFG-06");
    assert!(
        signed_by(Path::new(&api["kubelet-client-certificate"]), &ca),
        "CFG-07"
    );
    assert!(Path::new(&api["kubelet-client-key"]).exists(), "CFG-07");
    assert_eq!(
        api["kubelet-certificate-authority"],
        path_str(&ca),
        "CFG-07"
    );
    assert!(signed_by(Path::new(&api["tls-cert-file"]), &ca), "CFG-08");
    assert_eq!(api["client-ca-file"], path_str(&ca), "CFG-08");
    assert_eq!(api["anonymous-auth"], "false", "CFG-10");
    let modes: Vec<&str> = api["authorization-mode"].split(',').collect();
    assert!(
        modes.contains(&"Node") && modes.contains(&"RBAC") && !modes.contains(&"AlwaysAllow"),
        "CFG-11"
    );
    assert!(
        api["enable-admission-plugins"]
            .split(',')
            .any(|p| p == "NodeRestriction"),
        "CFG-11"
    );
    assert!(Path::new(&api["service-account-key-file"]).exists());
    assert!(Path::new(&api["service-account-signing-key-file"]).exists());
    assert!(signed_by(
        Path::new(&api["proxy-client-cert-file"]),
        &d.join("pki/front-proxy-ca.crt")
    ));
    assert_eq!(
        api["requestheader-client-ca-file"],
        path_str(&d.join("pki/front-proxy-ca.crt"))
    );
    assert_eq!(api["requestheader-allowed-names"], "front-proxy-client");
    // CFG-09: TLS policy everywhere a component serves.
    for c in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        assert_eq!(all[c]["tls-min-version"], "VersionTLS12", "CFG-09 {c}");
        for s in all[c]["tls-cipher-suites"].split(',') {
            assert!(cipher_ok(s), "CFG-09 {c}: {s}");
        }
    }
    for s in etcd["cipher-suites"].split(',') {
        assert!(cipher_ok(s), "CFG-09 etcd: {s}");
    }
    assert_eq!(
        yaml_value(&kubelet_yaml, "tlsMinVersion").as_deref(),
        Some("VersionTLS12")
    );
    let suites = yaml_list(&kubelet_yaml, "tlsCipherSuites");
    assert!(
        !suites.is_empty() && suites.iter().all(|s| cipher_ok(s)),
        "CFG-09 kubelet: {suites:?}"
    );
    // Every KubeletConfiguration and KubeProxyConfiguration field is a real one
    // (tests/data/kubelet-config-fields.txt, tests/data/kube-proxy-config-fields.txt).
    for (file, yaml, kind, min) in [
        (
            "kubelet-config-fields.txt",
            &kubelet_yaml,
            "KubeletConfiguration",
            20,
        ),
        (
            "kube-proxy-config-fields.txt",
            &proxy_yaml,
            "KubeProxyConfiguration",
            8,
        ),
    ] {
        let fields = read(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("data")
                .join(file),
        );
        let fields: BTreeSet<&str> = fields
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let paths = yaml_paths(yaml);
        assert!(paths.len() > min, "{paths:?}");
        for p in &paths {
            assert!(fields.contains(p.as_str()), "{kind} has no field {p}");
        }
    }
    // CFG-10..12: kubelet.
    assert!(
        kubelet_yaml.contains("  anonymous:\n    enabled: false\n"),
        "CFG-10 kubelet"
    );
    assert!(
        kubelet_yaml.contains("  webhook:\n    enabled: true\n"),
        "webhook authn"
    );
    assert_eq!(
        yaml_value(&kubelet_yaml, "mode").as_deref(),
        Some("Webhook"),
        "CFG-11 kubelet"
    );
    assert_eq!(
        yaml_value(&kubelet_yaml, "clientCAFile").as_deref(),
        Some(path_str(&ca)),
        "CFG-12"
    );
    let tls_cert = yaml_value(&kubelet_yaml, "tlsCertFile").expect("CFG-12 tlsCertFile");
    assert!(
        signed_by(Path::new(&tls_cert), &ca),
        "CFG-12: kubelet serving cert is CA-signed"
    );
    assert!(
        yaml_value(&kubelet_yaml, "tlsPrivateKeyFile").is_some(),
        "CFG-12"
    );
    assert_eq!(
        yaml_value(&kubelet_yaml, "readOnlyPort").as_deref(),
        Some("0"),
        "CFG-12"
    );
    assert_eq!(
        yaml_value(&kubelet_yaml, "serverTLSBootstrap").as_deref(),
        Some("false")
    );
    // CFG-13: controller-manager and scheduler.
    for (c, kc) in [
        ("kube-controller-manager", "controller-manager.conf"),
        ("kube-scheduler", "scheduler.conf"),
    ] {
        assert_eq!(all[c]["bind-address"], "127.0.0.1", "CFG-13 {c}");
        assert_eq!(all[c]["kubeconfig"], path_str(&d.join(kc)), "CFG-13 {c}");
        assert_eq!(all[c]["authentication-kubeconfig"], path_str(&d.join(kc)));
        assert_eq!(all[c]["authorization-kubeconfig"], path_str(&d.join(kc)));
    }
    assert_eq!(
        all["kube-controller-manager"]["root-ca-file"],
        path_str(&ca),
        "CFG-13"
    );
    // kube-proxy: its kubeconfig, nothing listening beyond loopback but the proxy itself.
    assert_eq!(
        yaml_value(&proxy_yaml, "kubeconfig").as_deref(),
        Some(path_str(&d.join("kube-proxy.conf")))
    );
    assert_eq!(
        yaml_value(&proxy_yaml, "healthzBindAddress").as_deref(),
        Some("127.0.0.1:10256")
    );
    assert_eq!(
        yaml_value(&proxy_yaml, "metricsBindAddress").as_deref(),
        Some("127.0.0.1:10249")
    );
    // The controller-manager and the scheduler serve the inventory's CA-signed pairs, not a
    // certificate they make themselves (TLS-06 of a live probe).
    for (c, pair) in [
        ("kube-controller-manager", "controller-manager-server"),
        ("kube-scheduler", "scheduler-server"),
    ] {
        let cert = d.join(format!("pki/{pair}.crt"));
        assert_eq!(all[c]["tls-cert-file"], path_str(&cert), "{c}");
        assert_eq!(
            all[c]["tls-private-key-file"],
            path_str(&d.join(format!("pki/{pair}.key"))),
            "{c}"
        );
        let v = run(Command::new("openssl").args([
            "verify",
            "-CAfile",
            path_str(&ca),
            "-purpose",
            "sslserver",
            "-verify_ip",
            "127.0.0.1",
            path_str(&cert),
        ]));
        assert!(
            v.status.success(),
            "{c}: {}",
            String::from_utf8_lossy(&v.stdout)
        );
    }
    // openssl agrees that the kubelet serving certificate chains to the cluster CA.
    let v = run(Command::new("openssl").args(["verify", "-CAfile", path_str(&ca), &tls_cert]));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));

    // meshd's own audit agrees: every CFG check passes on both forms, exit 0.
    audit_rendered(d, &units, &CP_CFG);
    audit_rendered(d, &pods, &CP_CFG);
}

#[test]
fn a_bad_components_json_stops_meshd_run_with_every_problem() {
    let api_port = free_port().to_string();
    let dir = init_dir("cp1", "127.0.0.1", &["--api-port", &api_port]);
    let d = dir.path();
    std::fs::write(
        d.join("components.json"),
        r#"{"etcd_client_port": 0, "binaries": {"kubectl": "/usr/bin/kubectl"}}"#,
    )
    .expect("write");
    let out = meshd_e2e::meshd(&["run", "--no-mesh", "--data-dir", path_str(d)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd_client_port must be non-zero"), "{err}");
    assert!(err.contains("unknown component \"kubectl\""), "{err}");
}

/// Every path inside `d` that the rendered units, config files or kubeconfigs name.
fn named_paths(d: &Path, texts: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for t in texts {
        for w in t.split(|c: char| c.is_whitespace() || c == '"' || c == '=' || c == ',') {
            if w.starts_with(path_str(d)) {
                out.push(w.to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn a_joined_node_renders_kubelet_and_kube_proxy_from_its_own_files() {
    let api_port = free_port().to_string();
    let cp = init_dir("cp1", "127.0.0.1", &["--api-port", &api_port]);
    let c = cp.path();
    // No components.json: meshd run leaves the components alone and says so.
    let log = c.join("run.log");
    let mut cmd = Command::new(meshd_bin());
    cmd.args(["run", "--no-mesh", "--data-dir", path_str(c)]);
    let mut run = ChildGuard::spawn("meshd run", &mut cmd, &log);
    let up = wait_for(WAIT, || {
        if !run.alive() {
            return Some(false);
        }
        read(&log)
            .contains("meshd API listening on")
            .then_some(true)
    });
    assert_eq!(up, Some(true), "meshd run did not serve:\n{}", read(&log));
    // The components' status file may be written just after the API listens: wait for it.
    let status = || -> serde_json::Value {
        serde_json::from_str(&meshd_ok(&[
            "status",
            "--data-dir",
            path_str(c),
            "--output",
            "json",
        ]))
        .expect("status json")
    };
    let st = wait_for(WAIT, || {
        let st = status();
        (!st["components"].is_null()).then_some(st)
    })
    .unwrap_or_else(|| panic!("meshd status never showed the components: {}", status()));
    assert_eq!(st["components"]["supervised"], false, "{st}");
    assert!(
        st["components"]["note"]
            .as_str()
            .unwrap_or("")
            .contains("components.json"),
        "{st}"
    );

    let t: serde_json::Value = serde_json::from_str(&meshd_ok(&[
        "token",
        "create",
        "--data-dir",
        path_str(c),
        "--output",
        "json",
    ]))
    .expect("token json");
    let node = tempfile::tempdir().expect("tempdir");
    let n = node.path().join("node1");
    meshd_ok(&[
        "join",
        "--data-dir",
        path_str(&n),
        "--server",
        t["server"].as_str().expect("server"),
        "--token",
        t["token"].as_str().expect("token"),
        "--ca-hash",
        t["ca_hash"].as_str().expect("ca_hash"),
        "--node-name",
        "node1",
        "--advertise-address",
        "127.0.0.2",
    ]);
    let out = node.path().join("units");
    meshd_ok(&[
        "render",
        "--data-dir",
        path_str(&n),
        "--format",
        "systemd",
        "--out",
        path_str(&out),
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["kube-proxy.service", "kubelet.service"]);

    let kubelet = read(&out.join("kubelet.service"));
    let f = flags(&unit_args(&kubelet));
    for k in f.keys() {
        assert!(known_flags("kubelet").contains(k), "kubelet: --{k}");
    }
    assert_eq!(f["node-ip"], "127.0.0.2");
    assert_eq!(f["hostname-override"], "node1");
    let kcfg = read(Path::new(&f["config"]));
    let proxy = read(&out.join("kube-proxy.service"));
    let pcfg = read(Path::new(&flags(&unit_args(&proxy))["config"]));
    assert!(kcfg.contains("clusterDNS: []\n"), "{kcfg}");
    assert!(pcfg.contains("hostnameOverride: \"node1\"\n"), "{pcfg}");
    // Every file they name exists on the node, secrets 0600; the kubelet's serving certificate
    // chains to the cluster CA the node pinned.
    let paths = named_paths(
        &n,
        &[
            kubelet,
            kcfg.clone(),
            proxy,
            pcfg,
            read(&n.join("kubelet.conf")),
            read(&n.join("kube-proxy.conf")),
        ],
    );
    assert!(paths.len() >= 8, "{paths:?}");
    for p in &paths {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        if p.ends_with(".key")
            || p.ends_with(".pem")
            || p.ends_with(".conf")
            || p.ends_with(".yaml")
        {
            assert_eq!(m.mode() & 0o777, 0o600, "{p}");
        }
    }
    let cert = yaml_value(&kcfg, "tlsCertFile").expect("tlsCertFile");
    assert!(signed_by(Path::new(&cert), &n.join("pki/ca.crt")));
    assert_eq!(
        cert_der(&n.join("pki/ca.crt")),
        cert_der(&c.join("pki/ca.crt"))
    );

    // meshd's own audit of the node's rendered units (and its static-pods form: kube-proxy's
    // manifest and kubelet's unit) passes every kubelet CFG check, exit 0.
    let kubelet_cfg = [
        ("CFG-09", "kubelet"),
        ("CFG-10", "kubelet"),
        ("CFG-11", "kubelet"),
        ("CFG-12", "kubelet"),
    ];
    audit_rendered(&n, &out, &kubelet_cfg);
    let pods = node.path().join("pods");
    meshd_ok(&[
        "render",
        "--data-dir",
        path_str(&n),
        "--format",
        "static-pods",
        "--out",
        path_str(&pods),
    ]);
    audit_rendered(&n, &pods, &kubelet_cfg);
}

/// Starts `meshd run --no-mesh` on `d` with its output in `d/<log>`.
fn start_run(d: &Path, log: &str) -> ChildGuard {
    let mut cmd = Command::new(meshd_bin());
    cmd.args(["run", "--no-mesh", "--data-dir", path_str(d)]);
    ChildGuard::spawn("meshd run", &mut cmd, &d.join(log))
}

#[test]
fn components_left_by_a_killed_meshd_are_stopped_by_the_next_one() {
    require_tool("etcd", "etcd-server");
    let api_port = free_port().to_string();
    let dir = init_dir("cp1", "127.0.0.1", &["--api-port", &api_port]);
    let d = dir.path().to_path_buf();
    let cfg = serde_json::json!({
        "etcd_client_port": free_port(),
        "etcd_peer_port": free_port(),
        "supervise": ["etcd"],
        "backoff_initial_ms": 200,
        "probe_interval_secs": 1,
    });
    std::fs::write(d.join("components.json"), cfg.to_string()).expect("components.json");
    let mut sup = Supervised {
        run: Some(start_run(&d, "run-1.log")),
        dir,
        pids: vec![],
    };
    let pid1 = sup.wait_healthy_etcd(None);
    // meshd dies without a chance to stop etcd.
    if let Some(mut g) = sup.run.take() {
        let _ = g.child.kill();
        let _ = g.child.wait();
    }
    assert!(alive(pid1), "etcd went down with meshd");
    // The next meshd stops the leftover (it holds etcd's ports) and starts its own.
    sup.run = Some(start_run(&d, "run-2.log"));
    let pid2 = sup.wait_healthy_etcd(Some(pid1));
    assert!(!alive(pid1), "the leftover etcd still runs");
    assert!(alive(pid2));
    let log = read(&d.join("run-2.log"));
    assert!(
        log.contains(&format!(
            "etcd (pid {pid1}) of an earlier meshd run still runs"
        )),
        "{log}"
    );
    assert_eq!(
        sup.component("etcd")["restarts"].as_u64(),
        Some(0),
        "{}",
        sup.status()
    );
    let st = sup.stop().expect("meshd run exits");
    assert!(st.success());
    assert!(wait_for(Duration::from_secs(15), || (!alive(pid2)).then_some(())).is_some());
}

/// `meshd init --components` opts the control plane into supervision: it writes `components.json`
/// with the defaults, and a re-run keeps an edited file (and refuses an invalid one).
#[test]
fn init_with_components_writes_the_defaults_and_keeps_an_edited_file() {
    let dir = init_dir("cp1", "127.0.0.1", &["--components"]);
    let d = dir.path().to_path_buf();
    let file = d.join("components.json");
    let text = read(&file);
    assert_eq!(text.trim(), "{}", "{text}");
    let again = |d: &Path| {
        Command::new(meshd_bin())
            .args([
                "init",
                "--data-dir",
                path_str(d),
                "--node-name",
                "cp1",
                "--advertise-address",
                "127.0.0.1",
                "--components",
            ])
            .output()
            .expect("meshd init")
    };
    std::fs::write(&file, r#"{"etcd_client_port": 23790}"#).expect("edit");
    let out = again(&d);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(read(&file), r#"{"etcd_client_port": 23790}"#);
    std::fs::write(&file, r#"{"no_such_setting": 1}"#).expect("edit");
    let out = again(&d);
    assert!(
        !out.status.success(),
        "an invalid components.json passed: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no_such_setting"),
        "{out:?}"
    );
}
