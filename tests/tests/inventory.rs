//! The certificate inventory `meshd init` issues, checked row by row against
//! `cert-inventory.md` by verifiers that share no code with meshd: openssl (chains, purposes, subject,
//! SANs, EKU, basic constraints, keys) and rustls-webpki (chain and EKU as a TLS peer checks them,
//! server names). Then `meshd certs check`, the idempotence of `meshd init`, what init and check do
//! with damaged data directories (`faults.md`: a clear error naming the file, nothing lost), and CSR
//! signing under policy with requests made by openssl.
//!
//! Every test has its own data directory; nothing is mocked.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshd_e2e::{meshd, require_tool, run};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// The data directory under test
// ---------------------------------------------------------------------------------------------

const NODE: &str = "cp1";
const ADDR: &str = "127.0.0.1";
/// An address etcd peers connect from (`--etcd-peer-addresses`): only in the peer certificate.
const PEER_FROM: &str = "192.0.2.7";
const DAY: i64 = 86400;

fn tools() {
    require_tool("openssl", "openssl");
    require_tool("date", "coreutils");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// stdout and stderr together: where a message is printed is not the point.
fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A temp directory with its canonical path (meshd reports canonical paths).
struct Dir {
    _tmp: TempDir,
    path: PathBuf,
}

fn new_dir(prefix: &str) -> Dir {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let path = tmp.path().canonicalize().expect("canonical tempdir");
    Dir { _tmp: tmp, path }
}

fn init_args(d: &Path) -> Vec<String> {
    [
        "init",
        "--data-dir",
        path_str(d),
        "--node-name",
        NODE,
        "--advertise-address",
        ADDR,
        "--apiserver-cert-sans",
        "api.example.com,10.1.2.3",
        "--service-cidr",
        "10.96.0.0/12",
        "--etcd-peer-addresses",
        PEER_FROM,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `meshd init` with the standard arguments (plus `extra`).
fn init(d: &Path, extra: &[&str]) -> Output {
    let mut args = init_args(d);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    meshd(&args)
}

/// `meshd init --output json`, asserting success; returns the report.
fn init_json(d: &Path) -> serde_json::Value {
    let out = init(d, &["--output", "json"]);
    assert!(
        out.status.success(),
        "meshd init failed: {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("init report is not JSON ({e}): {}", describe(&out)))
}

/// A fresh data directory made by `meshd init`.
fn fresh() -> Dir {
    let d = new_dir("meshd-inv-");
    let out = init(&d.path, &[]);
    assert!(
        out.status.success(),
        "meshd init failed: {}",
        describe(&out)
    );
    d
}

fn certs_check(d: &Path, json: bool) -> Output {
    let mut args = vec!["certs", "check", "--data-dir", path_str(d)];
    if json {
        args.extend(["--output", "json"]);
    }
    meshd(&args)
}

fn check_rows(d: &Path) -> (Output, Vec<serde_json::Value>) {
    let out = certs_check(d, true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("certs check JSON ({e}): {}", describe(&out)));
    let rows = v.as_array().expect("certs check JSON is an array").clone();
    (out, rows)
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name:?} in {rows:#?}"))
}

fn report_item<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no item {name:?} in {report:#}"))
}

// ---------------------------------------------------------------------------------------------
// The inventory, as cert-inventory.md states it for the arguments above
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ca {
    Cluster,
    Etcd,
    FrontProxy,
}

impl Ca {
    const ALL: [Ca; 3] = [Ca::Cluster, Ca::Etcd, Ca::FrontProxy];

    /// meshd's (kubeadm's) name, as `certs check` reports it.
    fn name(self) -> &'static str {
        match self {
            Ca::Cluster => "ca",
            Ca::Etcd => "etcd-ca",
            Ca::FrontProxy => "front-proxy-ca",
        }
    }

    fn cn(self) -> &'static str {
        match self {
            Ca::Cluster => "kubernetes",
            Ca::Etcd => "etcd-ca",
            Ca::FrontProxy => "front-proxy-ca",
        }
    }

    fn cert(self) -> &'static str {
        match self {
            Ca::Cluster => "pki/ca.crt",
            Ca::Etcd => "pki/etcd/ca.crt",
            Ca::FrontProxy => "pki/front-proxy-ca.crt",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Ca::Cluster => "pki/ca.key",
            Ca::Etcd => "pki/etcd/ca.key",
            Ca::FrontProxy => "pki/front-proxy-ca.key",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Usage {
    Server,
    Client,
    Both,
}

impl Usage {
    fn server(self) -> bool {
        matches!(self, Usage::Server | Usage::Both)
    }
    fn client(self) -> bool {
        matches!(self, Usage::Client | Usage::Both)
    }
    fn ekus(self) -> BTreeSet<String> {
        let mut s = BTreeSet::new();
        if self.server() {
            s.insert("serverAuth".to_string());
        }
        if self.client() {
            s.insert("clientAuth".to_string());
        }
        s
    }
}

/// Where a row's certificate lives.
#[derive(Clone, Debug)]
enum Src {
    /// `cert` and `key` files.
    Pair(&'static str, &'static str),
    /// A component kubeconfig referencing one PEM that holds cert and key.
    Referenced {
        kubeconfig: &'static str,
        pem: &'static str,
    },
    /// A kubeconfig for people, with cert and key embedded.
    Embedded(&'static str),
}

#[derive(Clone, Debug)]
struct Row {
    /// meshd's inventory name (the `name` of `certs check` rows).
    name: &'static str,
    src: Src,
    ca: Ca,
    cn: String,
    o: BTreeSet<String>,
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
    usage: Usage,
}

impl Row {
    fn new(name: &'static str, src: Src, ca: Ca, cn: &str, o: &[&str], usage: Usage) -> Row {
        Row {
            name,
            src,
            ca,
            cn: cn.to_string(),
            o: o.iter().map(|s| s.to_string()).collect(),
            dns: BTreeSet::new(),
            ips: BTreeSet::new(),
            usage,
        }
    }
    fn dns(mut self, names: &[&str]) -> Row {
        self.dns = names.iter().map(|s| s.to_string()).collect();
        self
    }
    fn ips(mut self, ips: &[&str]) -> Row {
        self.ips = ips.iter().map(|s| s.parse().expect("IP literal")).collect();
        self
    }
    /// The file `certs check` reports for the row.
    fn main_file(&self) -> &'static str {
        match self.src {
            Src::Pair(c, _) => c,
            Src::Referenced { pem, .. } => pem,
            Src::Embedded(kc) => kc,
        }
    }
}

/// Every leaf `meshd init` issues for [`init_args`], per cert-inventory.md.
fn inventory() -> Vec<Row> {
    use Ca::*;
    use Usage::*;
    let node_cn = format!("system:node:{NODE}");
    vec![
        Row::new(
            "apiserver",
            Src::Pair("pki/apiserver.crt", "pki/apiserver.key"),
            Cluster,
            "kube-apiserver",
            &[],
            Server,
        )
        .dns(&[
            NODE,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "api.example.com",
        ])
        .ips(&["10.96.0.1", ADDR, "10.1.2.3"]),
        Row::new(
            "apiserver-kubelet-client",
            Src::Pair(
                "pki/apiserver-kubelet-client.crt",
                "pki/apiserver-kubelet-client.key",
            ),
            Cluster,
            "kube-apiserver-kubelet-client",
            &["kubeadm:cluster-admins"],
            Client,
        ),
        Row::new(
            "apiserver-etcd-client",
            Src::Pair(
                "pki/apiserver-etcd-client.crt",
                "pki/apiserver-etcd-client.key",
            ),
            Etcd,
            "kube-apiserver-etcd-client",
            &[],
            Client,
        ),
        Row::new(
            "front-proxy-client",
            Src::Pair("pki/front-proxy-client.crt", "pki/front-proxy-client.key"),
            FrontProxy,
            "front-proxy-client",
            &[],
            Client,
        ),
        Row::new(
            "etcd-server",
            Src::Pair("pki/etcd/server.crt", "pki/etcd/server.key"),
            Etcd,
            NODE,
            &[],
            Both,
        )
        .dns(&[NODE, "localhost"])
        .ips(&[ADDR, "127.0.0.1", "::1"]),
        Row::new(
            "etcd-peer",
            Src::Pair("pki/etcd/peer.crt", "pki/etcd/peer.key"),
            Etcd,
            NODE,
            &[],
            Both,
        )
        .dns(&[NODE, "localhost"])
        .ips(&[ADDR, "127.0.0.1", "::1", PEER_FROM]),
        Row::new(
            "etcd-healthcheck-client",
            Src::Pair(
                "pki/etcd/healthcheck-client.crt",
                "pki/etcd/healthcheck-client.key",
            ),
            Etcd,
            "kube-etcd-healthcheck-client",
            &[],
            Client,
        ),
        Row::new(
            "admin.conf",
            Src::Embedded("admin.conf"),
            Cluster,
            "kubernetes-admin",
            &["kubeadm:cluster-admins"],
            Client,
        ),
        Row::new(
            "super-admin.conf",
            Src::Embedded("super-admin.conf"),
            Cluster,
            "kubernetes-super-admin",
            &["system:masters"],
            Client,
        ),
        Row::new(
            "controller-manager.conf",
            Src::Referenced {
                kubeconfig: "controller-manager.conf",
                pem: "pki/controller-manager-client-current.pem",
            },
            Cluster,
            "system:kube-controller-manager",
            &[],
            Client,
        ),
        Row::new(
            "scheduler.conf",
            Src::Referenced {
                kubeconfig: "scheduler.conf",
                pem: "pki/scheduler-client-current.pem",
            },
            Cluster,
            "system:kube-scheduler",
            &[],
            Client,
        ),
        // Serving pairs of the controller-manager (10257) and the scheduler (10259), bound to
        // 127.0.0.1: CA-signed instead of the self-signed ones they would make.
        Row::new(
            "controller-manager-serving",
            Src::Pair(
                "pki/controller-manager-server.crt",
                "pki/controller-manager-server.key",
            ),
            Cluster,
            "kube-controller-manager",
            &[],
            Server,
        )
        .dns(&["localhost", NODE])
        .ips(&["127.0.0.1"]),
        Row::new(
            "scheduler-serving",
            Src::Pair("pki/scheduler-server.crt", "pki/scheduler-server.key"),
            Cluster,
            "kube-scheduler",
            &[],
            Server,
        )
        .dns(&["localhost", NODE])
        .ips(&["127.0.0.1"]),
        Row::new(
            "kubelet.conf",
            Src::Referenced {
                kubeconfig: "kubelet.conf",
                pem: "kubelet/pki/kubelet-client-current.pem",
            },
            Cluster,
            &node_cn,
            &["system:nodes"],
            Client,
        ),
        Row::new(
            "kubelet-serving",
            Src::Pair("kubelet/pki/kubelet.crt", "kubelet/pki/kubelet.key"),
            Cluster,
            &node_cn,
            &["system:nodes"],
            Server,
        )
        .dns(&[NODE])
        .ips(&[ADDR]),
        Row::new(
            "kube-proxy.conf",
            Src::Referenced {
                kubeconfig: "kube-proxy.conf",
                pem: "pki/kube-proxy-client-current.pem",
            },
            Cluster,
            "system:kube-proxy",
            &["system:node-proxier"],
            Client,
        ),
        // meshd's API server certificate: CN is meshd's choice, SANs the addresses nodes dial (the
        // operator's extra API server names and addresses included: a NAT address, a DNS name).
        Row::new(
            "meshd-api",
            Src::Pair("pki/meshd/api-server.crt", "pki/meshd/api-server.key"),
            Cluster,
            "meshd-api",
            &[],
            Server,
        )
        .dns(&[NODE, "localhost", "api.example.com"])
        .ips(&[ADDR, "127.0.0.1", "10.1.2.3"]),
        // meshd's own admin client for its API (meshd's row, not kubeadm's).
        Row::new(
            "meshd-admin",
            Src::Pair("pki/meshd/admin-client.crt", "pki/meshd/admin-client.key"),
            Cluster,
            "meshd-admin",
            &["meshd:admins"],
            Client,
        ),
        // etcd clients of meshd itself and of the flannel-style overlay.
        Row::new(
            "meshd-etcd-client",
            Src::Pair("pki/etcd/meshd-client.crt", "pki/etcd/meshd-client.key"),
            Etcd,
            "meshd",
            &[],
            Client,
        ),
        Row::new(
            "flannel-etcd-client",
            Src::Pair("pki/etcd/flannel-client.crt", "pki/etcd/flannel-client.key"),
            Etcd,
            "flannel",
            &[],
            Client,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// openssl as the independent reader
// ---------------------------------------------------------------------------------------------

fn openssl(args: &[&str]) -> Output {
    run(Command::new("openssl").args(args))
}

fn openssl_ok(args: &[&str]) -> String {
    let out = openssl(args);
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Seconds since the epoch of a date as openssl or meshd prints it, parsed by GNU date.
fn epoch_of(date: &str) -> i64 {
    let out = run(Command::new("date").args(["-u", "-d", date, "+%s"]));
    assert!(
        out.status.success(),
        "date cannot parse {date:?}: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("epoch seconds")
}

/// What openssl reads from a certificate.
#[derive(Debug)]
struct Facts {
    subject: Vec<(String, String)>,
    issuer: Vec<(String, String)>,
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
    eku: BTreeSet<String>,
    key_usage: BTreeSet<String>,
    /// The basic constraints value (`CA:FALSE`, `CA:TRUE, pathlen:0`) and whether it is critical.
    basic_constraints: Option<(String, bool)>,
    not_before: i64,
    not_after: i64,
    /// Upper-case hex without leading zeros.
    serial: String,
    /// `PUBLIC KEY` PEM.
    pubkey: String,
    text: String,
}

impl Facts {
    fn attr(dn: &[(String, String)], key: &str) -> Vec<String> {
        dn.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn cn(&self) -> Vec<String> {
        Self::attr(&self.subject, "CN")
    }
    fn o(&self) -> BTreeSet<String> {
        Self::attr(&self.subject, "O").into_iter().collect()
    }
    fn is_ca(&self) -> Option<bool> {
        self.basic_constraints.as_ref().map(|(v, _)| {
            if v.starts_with("CA:TRUE") {
                true
            } else {
                assert_eq!(v, "CA:FALSE", "unexpected basic constraints");
                false
            }
        })
    }
    fn is_p256(&self) -> bool {
        self.text.contains("Public Key Algorithm: id-ecPublicKey")
            && self.text.contains("NIST CURVE: P-256")
    }
}

fn parse_dn(out: &str) -> Vec<(String, String)> {
    out.lines()
        .skip(1) // "subject=" / "issuer="
        .filter_map(|l| {
            l.trim()
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn eku_name(openssl_name: &str) -> String {
    match openssl_name {
        "TLS Web Server Authentication" => "serverAuth".into(),
        "TLS Web Client Authentication" => "clientAuth".into(),
        "Code Signing" => "codeSigning".into(),
        other => other.into(),
    }
}

fn facts(cert: &Path) -> Facts {
    let p = path_str(cert);
    let x = |extra: &[&str]| {
        let mut a = vec!["x509", "-in", p, "-noout"];
        a.extend_from_slice(extra);
        openssl_ok(&a)
    };
    let subject = parse_dn(&x(&["-subject", "-nameopt", "sep_multiline,sname"]));
    let issuer = parse_dn(&x(&["-issuer", "-nameopt", "sep_multiline,sname"]));
    let ext = x(&[
        "-ext",
        "subjectAltName,extendedKeyUsage,keyUsage,basicConstraints",
    ]);
    let (mut dns, mut ips, mut eku, mut key_usage) = (
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
    );
    let mut basic_constraints = None;
    let (mut section, mut critical) = (String::new(), false);
    for line in ext.lines() {
        if !line.starts_with(' ') {
            section = line.split(':').next().unwrap_or("").trim().to_string();
            critical = line.contains("critical");
            continue;
        }
        let v = line.trim();
        match section.as_str() {
            "X509v3 Subject Alternative Name" => {
                for part in v.split(", ") {
                    if let Some(d) = part.strip_prefix("DNS:") {
                        assert!(dns.insert(d.to_string()), "duplicate DNS SAN {d}");
                    } else if let Some(ip) = part.strip_prefix("IP Address:") {
                        let ip: IpAddr = ip.parse().expect("IP SAN");
                        assert!(ips.insert(ip), "duplicate IP SAN {ip}");
                    } else {
                        panic!("{p}: unexpected SAN {part:?}");
                    }
                }
            }
            "X509v3 Extended Key Usage" => eku.extend(v.split(", ").map(eku_name)),
            "X509v3 Key Usage" => key_usage.extend(v.split(", ").map(str::to_string)),
            "X509v3 Basic Constraints" => basic_constraints = Some((v.to_string(), critical)),
            other => panic!("{p}: unexpected extension section {other:?}"),
        }
    }
    let dates = x(&["-startdate", "-enddate"]);
    let date = |key: &str| {
        let v = dates
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {dates}"));
        epoch_of(v)
    };
    let serial = x(&["-serial"])
        .trim()
        .strip_prefix("serial=")
        .expect("serial=")
        .trim_start_matches('0')
        .to_ascii_uppercase();
    Facts {
        subject,
        issuer,
        dns,
        ips,
        eku,
        key_usage,
        basic_constraints,
        not_before: date("notBefore="),
        not_after: date("notAfter="),
        serial,
        pubkey: x(&["-pubkey"]),
        text: x(&["-text"]),
    }
}

/// The public half of a private key file (a PEM that may also hold a certificate), as openssl
/// derives it.
fn key_pubout(key: &Path) -> String {
    openssl_ok(&["pkey", "-in", path_str(key), "-pubout"])
}

fn assert_key_is_p256(key: &Path) {
    let text = openssl_ok(&["pkey", "-in", path_str(key), "-noout", "-text"]);
    assert!(
        text.contains("Private-Key: (256 bit") && text.contains("NIST CURVE: P-256"),
        "{}: not an ECDSA P-256 key:\n{text}",
        key.display()
    );
}

/// `openssl verify` of `cert` against `ca` (optionally for a purpose).
fn openssl_verify(ca: &Path, cert: &Path, purpose: Option<&str>) -> Output {
    let mut args = vec!["verify", "-x509_strict", "-CAfile", path_str(ca)];
    if let Some(p) = purpose {
        args.extend(["-purpose", p]);
    }
    args.push(path_str(cert));
    openssl(&args)
}

// ---------------------------------------------------------------------------------------------
// The files of each row, as a consumer finds them
// ---------------------------------------------------------------------------------------------

/// A row with the files that hold its certificate and key (embedded ones extracted to scratch).
struct Leaf {
    row: Row,
    cert: PathBuf,
    key: PathBuf,
}

/// The value of `key:` in a block-style kubeconfig (meshd quotes scalars JSON-style).
fn kubeconfig_value(text: &str, key: &str) -> String {
    let prefix = format!("{key}:");
    let v = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key} in kubeconfig:\n{text}"));
    v.trim().trim_matches('"').to_string()
}

/// Base64 from a kubeconfig, decoded by openssl into `out`.
fn decode_b64(b64: &str, out: &Path) {
    let src = out.with_extension("b64");
    fs::write(&src, b64).expect("write b64");
    openssl_ok(&[
        "base64",
        "-d",
        "-A",
        "-in",
        path_str(&src),
        "-out",
        path_str(out),
    ]);
}

fn leaves(d: &Path, scratch: &Path) -> Vec<Leaf> {
    let ca_bytes = fs::read(d.join(Ca::Cluster.cert())).expect("ca.crt");
    inventory()
        .into_iter()
        .map(|row| {
            let (cert, key) = match row.src {
                Src::Pair(c, k) => (d.join(c), d.join(k)),
                Src::Referenced { kubeconfig, pem } => {
                    let kc = fs::read_to_string(d.join(kubeconfig)).expect("kubeconfig");
                    let pem = d.join(pem);
                    for k in ["client-certificate", "client-key"] {
                        assert_eq!(
                            kubeconfig_value(&kc, k),
                            path_str(&pem),
                            "{kubeconfig}: {k}"
                        );
                    }
                    assert_eq!(
                        kubeconfig_value(&kc, "certificate-authority"),
                        path_str(&d.join(Ca::Cluster.cert())),
                        "{kubeconfig}: certificate-authority"
                    );
                    assert_eq!(
                        kubeconfig_value(&kc, "server"),
                        format!("https://{ADDR}:6443")
                    );
                    (pem.clone(), pem)
                }
                Src::Embedded(kubeconfig) => {
                    let kc = fs::read_to_string(d.join(kubeconfig)).expect("kubeconfig");
                    let cert = scratch.join(format!("{}.crt", row.name));
                    let key = scratch.join(format!("{}.key", row.name));
                    let ca = scratch.join(format!("{}.ca", row.name));
                    decode_b64(&kubeconfig_value(&kc, "client-certificate-data"), &cert);
                    decode_b64(&kubeconfig_value(&kc, "client-key-data"), &key);
                    decode_b64(&kubeconfig_value(&kc, "certificate-authority-data"), &ca);
                    assert_eq!(
                        fs::read(&ca).expect("embedded CA"),
                        ca_bytes,
                        "{kubeconfig}: certificate-authority-data is not pki/ca.crt"
                    );
                    assert_eq!(
                        kubeconfig_value(&kc, "server"),
                        format!("https://{ADDR}:6443")
                    );
                    (cert, key)
                }
            };
            Leaf { row, cert, key }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Every leaf, checked independently
// ---------------------------------------------------------------------------------------------

/// (a) openssl: each leaf chains to its own CA, to neither of the other two, nor to a CA of the same
/// name from another cluster; and openssl's purpose check agrees with the row's EKU.
#[test]
fn openssl_verifies_every_leaf_against_its_own_ca_only() {
    tools();
    let d = fresh();
    let other = fresh(); // another cluster: same CA names, other keys
    let scratch = new_dir("meshd-inv-scratch-");
    let leaves = leaves(&d.path, &scratch.path);
    for l in &leaves {
        let what = format!("{} ({})", l.row.name, l.cert.display());
        for ca in Ca::ALL {
            let out = openssl_verify(&d.path.join(ca.cert()), &l.cert, None);
            if ca == l.row.ca {
                assert!(
                    out.status.success(),
                    "{what} must verify against {}: {}",
                    ca.cert(),
                    describe(&out)
                );
            } else {
                assert!(
                    !out.status.success(),
                    "{what} must not verify against {}",
                    ca.cert()
                );
            }
        }
        let foreign = openssl_verify(&other.path.join(l.row.ca.cert()), &l.cert, None);
        assert!(
            !foreign.status.success(),
            "{what} must not verify against another cluster's {}",
            l.row.ca.cert()
        );
        let ca = d.path.join(l.row.ca.cert());
        for (purpose, allowed) in [
            ("sslserver", l.row.usage.server()),
            ("sslclient", l.row.usage.client()),
        ] {
            let out = openssl_verify(&ca, &l.cert, Some(purpose));
            assert_eq!(
                out.status.success(),
                allowed,
                "{what}: openssl verify -purpose {purpose}: {}",
                describe(&out)
            );
        }
    }
}

fn der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path)
        .unwrap_or_else(|e| panic!("{}: no certificate: {e:?}", path.display()))
}

fn webpki_verify(
    leaf: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
    usage: webpki::KeyUsage,
) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(ca).expect("CA is a trust anchor");
    let ee = webpki::EndEntityCert::try_from(leaf).expect("leaf parses");
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

/// (b) rustls-webpki: each leaf verifies for its EKU against its CA as trust anchor, not against
/// another CA, not for the usage it lacks; server certificates are valid for exactly their SANs.
#[test]
fn webpki_verifies_every_leaf_for_its_usage_and_names() {
    tools();
    let d = fresh();
    let other = fresh();
    let scratch = new_dir("meshd-inv-scratch-");
    let server = webpki::KeyUsage::server_auth();
    let client = webpki::KeyUsage::client_auth();
    for l in leaves(&d.path, &scratch.path) {
        let what = format!("{} ({})", l.row.name, l.cert.display());
        let leaf = der(&l.cert);
        for ca in Ca::ALL {
            let anchor = der(&d.path.join(ca.cert()));
            for (usage, allowed, uname) in [
                (server, l.row.usage.server(), "server"),
                (client, l.row.usage.client(), "client"),
            ] {
                let r = webpki_verify(&leaf, &anchor, usage);
                if ca == l.row.ca && allowed {
                    assert!(
                        r.is_ok(),
                        "{what}: {uname} usage under {}: {r:?}",
                        ca.cert()
                    );
                } else {
                    assert!(
                        r.is_err(),
                        "{what}: {uname} usage under {} must fail",
                        ca.cert()
                    );
                }
                if ca == l.row.ca && !allowed {
                    assert!(
                        matches!(r, Err(webpki::Error::RequiredEkuNotFoundContext(_))),
                        "{what}: {uname} usage must fail for the EKU, got {r:?}"
                    );
                }
            }
        }
        let foreign = der(&other.path.join(l.row.ca.cert()));
        let usage = if l.row.usage.server() { server } else { client };
        assert!(
            webpki_verify(&leaf, &foreign, usage).is_err(),
            "{what}: another cluster's {} must not be trusted",
            l.row.ca.cert()
        );

        let ee = webpki::EndEntityCert::try_from(&leaf).expect("leaf parses");
        if l.row.usage.server() {
            for dns in &l.row.dns {
                let name = ServerName::try_from(dns.as_str()).expect("DNS name");
                assert!(
                    ee.verify_is_valid_for_subject_name(&name).is_ok(),
                    "{what} must be valid for {dns}"
                );
            }
            for ip in &l.row.ips {
                let name = ServerName::IpAddress((*ip).into());
                assert!(
                    ee.verify_is_valid_for_subject_name(&name).is_ok(),
                    "{what} must be valid for {ip}"
                );
            }
            for bad in [
                "evil.example.com",
                "kubernetes.default.svc.other",
                "10.96.0.2",
            ] {
                let name = ServerName::try_from(bad).expect("name");
                assert!(
                    ee.verify_is_valid_for_subject_name(&name).is_err(),
                    "{what} must not be valid for {bad}"
                );
            }
        }
    }
}

/// (c) CN, O, SANs (exact sets), EKU (exact), CA:FALSE, key usage, validity window, ECDSA P-256 and
/// cert/key match of every row, read by openssl.
#[test]
fn every_leaf_matches_its_inventory_row() {
    tools();
    let d = fresh();
    let scratch = new_dir("meshd-inv-scratch-");
    let now = now_secs();
    let ca_not_after: BTreeMap<&str, i64> = Ca::ALL
        .iter()
        .map(|ca| (ca.name(), facts(&d.path.join(ca.cert())).not_after))
        .collect();
    for l in leaves(&d.path, &scratch.path) {
        let r = &l.row;
        let what = format!("{} ({})", r.name, l.cert.display());
        let f = facts(&l.cert);
        assert_eq!(f.cn(), vec![r.cn.clone()], "{what}: CN");
        assert_eq!(f.o(), r.o, "{what}: O");
        assert_eq!(
            f.subject.len(),
            1 + r.o.len(),
            "{what}: subject holds only CN and O: {:?}",
            f.subject
        );
        assert_eq!(
            f.issuer,
            vec![("CN".to_string(), r.ca.cn().to_string())],
            "{what}: issuer"
        );
        assert_eq!(f.dns, r.dns, "{what}: DNS SANs");
        assert_eq!(f.ips, r.ips, "{what}: IP SANs");
        assert_eq!(f.eku, r.usage.ekus(), "{what}: EKU");
        assert_eq!(f.is_ca(), Some(false), "{what}: basic constraints CA:FALSE");
        assert_eq!(
            f.key_usage,
            BTreeSet::from(["Digital Signature".to_string()]),
            "{what}: key usage"
        );
        // Backdated by 5 minutes against clock skew; 90 days by default; never past the CA.
        assert!(
            (290..=900).contains(&(now - f.not_before)),
            "{what}: NotBefore {}s before now, want about 300",
            now - f.not_before
        );
        let life = f.not_after - f.not_before;
        assert!(
            (90 * DAY..=90 * DAY + 900).contains(&life),
            "{what}: lifetime {life}s, want 90 days (plus the backdate)"
        );
        assert!(
            f.not_after <= ca_not_after[r.ca.name()],
            "{what}: outlives its CA"
        );
        assert!(f.is_p256(), "{what}: not ECDSA P-256:\n{}", f.text);
        assert_key_is_p256(&l.key);
        assert_eq!(
            key_pubout(&l.key),
            f.pubkey,
            "{what}: key {} does not match the certificate",
            l.key.display()
        );
    }
    // kubelet's serving pair is also exposed as one file holding both, kubelet-style.
    let both = d.path.join("kubelet/pki/kubelet-server-current.pem");
    let f = facts(&both);
    assert_eq!(
        f.serial,
        facts(&d.path.join("kubelet/pki/kubelet.crt")).serial
    );
    assert_eq!(key_pubout(&both), f.pubkey);
}

/// The three CAs: CA:TRUE (critical), self-signed, their CNs, 10 years (kubeadm's 3650 days),
/// certificate signing allowed, ECDSA P-256, matching keys, three distinct keys.
#[test]
fn cas_are_distinct_self_signed_ten_year_roots() {
    tools();
    let d = fresh();
    let now = now_secs();
    let mut keys = BTreeSet::new();
    for ca in Ca::ALL {
        let cert = d.path.join(ca.cert());
        let key = d.path.join(ca.key());
        let f = facts(&cert);
        let cn = vec![("CN".to_string(), ca.cn().to_string())];
        assert_eq!(f.subject, cn, "{}: subject", ca.cert());
        assert_eq!(f.issuer, cn, "{}: issuer (self-signed)", ca.cert());
        let (bc, critical) = f.basic_constraints.clone().expect("basic constraints");
        assert!(
            bc.starts_with("CA:TRUE") && critical,
            "{}: basic constraints {bc} (critical: {critical})",
            ca.cert()
        );
        assert!(
            f.key_usage.contains("Certificate Sign"),
            "{}: key usage {:?}",
            ca.cert(),
            f.key_usage
        );
        // Self-signed: its own key verifies it.
        let out = openssl_verify(&cert, &cert, None);
        assert!(
            out.status.success(),
            "{}: not self-signed: {}",
            ca.cert(),
            describe(&out)
        );
        let life = f.not_after - f.not_before;
        assert!(
            (life - 3650 * DAY).abs() <= DAY,
            "{}: lifetime {} days, want 10 years (3650 days) ± 1 day",
            ca.cert(),
            life as f64 / DAY as f64
        );
        assert!(f.not_before <= now && now < f.not_after);
        assert!(f.is_p256(), "{}: not ECDSA P-256", ca.cert());
        assert_key_is_p256(&key);
        assert_eq!(key_pubout(&key), f.pubkey, "{}: key mismatch", ca.key());
        assert!(keys.insert(f.pubkey), "{}: CA key shared", ca.cert());
    }
}

/// Private keys (anything holding one) are 0600, following the public symlinks; directories are
/// 0700; certificates are not writable by others.
#[test]
fn keys_are_0600_and_directories_0700() {
    tools();
    let d = fresh();
    let mut key_files: Vec<PathBuf> = Ca::ALL.iter().map(|c| d.path.join(c.key())).collect();
    for r in inventory() {
        match r.src {
            Src::Pair(c, k) => {
                key_files.push(d.path.join(k));
                let m = fs::metadata(d.path.join(c)).expect(c).mode() & 0o777;
                assert_eq!(m & 0o022, 0, "{c}: mode {m:04o} is writable by others");
            }
            Src::Referenced { kubeconfig, pem } => {
                key_files.push(d.path.join(kubeconfig));
                key_files.push(d.path.join(pem));
            }
            Src::Embedded(kc) => key_files.push(d.path.join(kc)),
        }
    }
    key_files.push(d.path.join("pki/sa.key"));
    key_files.push(d.path.join("kubelet/pki/kubelet-server-current.pem"));
    for k in &key_files {
        let m = fs::metadata(k)
            .unwrap_or_else(|e| panic!("{}: {e}", k.display()))
            .mode()
            & 0o7777;
        assert_eq!(m, 0o600, "{}: mode {m:04o}", k.display());
    }
    // Every directory meshd made, the version directories of the store included.
    let mut dirs = vec![d.path.join("pki")];
    let mut seen = 0;
    while let Some(dir) = dirs.pop() {
        let m = fs::symlink_metadata(&dir).expect("dir").mode() & 0o7777;
        assert_eq!(m, 0o700, "{}: mode {m:04o}", dir.display());
        seen += 1;
        for e in fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            let meta = fs::symlink_metadata(&p).expect("metadata");
            if meta.is_dir() {
                dirs.push(p);
            } else if meta.is_file() && p.file_name().is_some_and(|n| n == "tls.key") {
                assert_eq!(meta.mode() & 0o7777, 0o600, "{}", p.display());
            }
        }
    }
    for extra in ["kubelet", "kubelet/pki"] {
        let m = fs::metadata(d.path.join(extra)).expect(extra).mode() & 0o7777;
        assert_eq!(m, 0o700, "{extra}: mode {m:04o}");
    }
    assert!(seen > 20, "only {seen} directories under pki/");
}

/// sa.key and sa.pub: an ECDSA P-256 pair whose halves match.
#[test]
fn service_account_keys_are_a_matching_pair() {
    tools();
    let d = fresh();
    let key = d.path.join("pki/sa.key");
    let pubf = d.path.join("pki/sa.pub");
    assert_key_is_p256(&key);
    let from_key = key_pubout(&key);
    let from_pub = openssl_ok(&["pkey", "-pubin", "-in", path_str(&pubf), "-pubout"]);
    assert_eq!(
        from_key, from_pub,
        "sa.pub is not the public half of sa.key"
    );
    assert!(from_pub.starts_with("-----BEGIN PUBLIC KEY-----"));
}

// ---------------------------------------------------------------------------------------------
// 2. certs check, and init run twice
// ---------------------------------------------------------------------------------------------

#[test]
fn certs_check_reports_every_ca_and_certificate() {
    tools();
    let d = fresh();
    let scratch = new_dir("meshd-inv-scratch-");
    let (out, rows) = check_rows(&d.path);
    assert!(
        out.status.success(),
        "certs check on a fresh dir: {}",
        describe(&out)
    );
    let now = now_secs();
    let inv = leaves(&d.path, &scratch.path);
    let mut want: BTreeSet<String> = Ca::ALL.iter().map(|c| c.name().to_string()).collect();
    want.extend(inv.iter().map(|l| l.row.name.to_string()));
    let got: BTreeSet<String> = rows
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(got, want, "one row per CA and certificate");
    assert_eq!(rows.len(), want.len(), "no duplicate rows");

    // (name, file, is_ca, ca, the certificate openssl reads)
    let mut expect: Vec<(String, PathBuf, bool, &str, PathBuf)> = Ca::ALL
        .iter()
        .map(|c| {
            let p = d.path.join(c.cert());
            (c.name().to_string(), p.clone(), true, c.name(), p)
        })
        .collect();
    for l in &inv {
        expect.push((
            l.row.name.to_string(),
            d.path.join(l.row.main_file()),
            false,
            l.row.ca.name(),
            l.cert.clone(),
        ));
    }
    for (name, file, is_ca, ca, cert) in expect {
        let r = row(&rows, &name);
        let f = facts(&cert);
        assert_eq!(r["path"], path_str(&file), "{name}: path");
        assert_eq!(r["is_ca"], is_ca, "{name}: is_ca");
        assert_eq!(r["ca"], ca, "{name}: ca");
        assert_eq!(r["status"], "ok", "{name}: status in {r:#}");
        let subject = r["subject"].as_str().expect("subject");
        assert!(subject.contains(&f.cn()[0]), "{name}: subject {subject}");
        let issuer = r["issuer"].as_str().expect("issuer");
        assert!(
            issuer.contains(&Facts::attr(&f.issuer, "CN")[0]),
            "{name}: issuer {issuer}"
        );
        let not_after = r["not_after"].as_str().expect("not_after");
        assert!(
            not_after.len() == 20 && not_after.ends_with('Z') && not_after.as_bytes()[10] == b'T',
            "{name}: not_after {not_after:?} is not RFC 3339 UTC"
        );
        assert_eq!(epoch_of(not_after), f.not_after, "{name}: not_after");
        let residual = r["residual_seconds"].as_i64().expect("residual_seconds");
        assert!(residual > 0, "{name}: residual {residual}");
        assert!(
            (residual - (f.not_after - now)).abs() <= 120,
            "{name}: residual {residual}s, openssl says {}s",
            f.not_after - now
        );
        let serial = r["serial"].as_str().expect("serial");
        assert_eq!(
            serial.trim_start_matches('0').to_ascii_uppercase(),
            f.serial,
            "{name}: serial"
        );
    }

    let out = certs_check(&d.path, false);
    assert!(out.status.success(), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for name in &want {
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "table has no row for {name}:\n{table}"
        );
    }
}

/// What is in a directory tree: symlink targets, file bytes and modes (not `.lock`).
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir(u32),
    Link(PathBuf),
    File(Vec<u8>, u32),
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, (Node, u64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("under root").to_path_buf();
            if rel == Path::new(".lock") {
                continue;
            }
            let m = fs::symlink_metadata(&p).expect("metadata");
            let node = if m.file_type().is_symlink() {
                Node::Link(fs::read_link(&p).expect("readlink"))
            } else if m.is_dir() {
                todo.push(p.clone());
                Node::Dir(m.mode() & 0o7777)
            } else {
                Node::File(fs::read(&p).expect("read"), m.mode() & 0o7777)
            };
            out.insert(rel, (node, m.ino()));
        }
    }
    out
}

/// Paths whose content differs between two snapshots (inodes ignored).
fn changed(a: &BTreeMap<PathBuf, (Node, u64)>, b: &BTreeMap<PathBuf, (Node, u64)>) -> Vec<PathBuf> {
    let keys: BTreeSet<&PathBuf> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k).map(|x| &x.0) != b.get(*k).map(|x| &x.0))
        .cloned()
        .collect()
}

fn serials(d: &Path, scratch: &Path) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = Ca::ALL
        .iter()
        .map(|c| (c.name().to_string(), facts(&d.join(c.cert())).serial))
        .collect();
    for l in leaves(d, scratch) {
        m.insert(l.row.name.to_string(), facts(&l.cert).serial);
    }
    m
}

#[test]
fn second_init_keeps_everything() {
    tools();
    let d = new_dir("meshd-inv-");
    let first = init_json(&d.path);
    assert!(
        first["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|i| i["action"] == "created"),
        "a fresh init creates everything: {first:#}"
    );
    let s1 = new_dir("meshd-inv-scratch-");
    let s2 = new_dir("meshd-inv-scratch-");
    let before = snapshot(&d.path);
    let serials_before = serials(&d.path, &s1.path);

    let report = init_json(&d.path);
    let items = report["items"].as_array().expect("items");
    assert_eq!(
        items.len(),
        3 + inventory().len() + 2,
        "CAs, leaves, sa, wireguard"
    );
    for i in items {
        assert_eq!(i["action"], "kept", "second init: {i}");
    }
    assert_eq!(report["cleaned_up"], 0);
    assert_eq!(report["ca_hash"], first["ca_hash"]);

    let after = snapshot(&d.path);
    assert_eq!(
        changed(&before, &after),
        Vec::<PathBuf>::new(),
        "files changed"
    );
    // Not even rewritten with the same bytes (the settings file aside).
    for (p, (_, ino)) in &before {
        if p != Path::new("meshd.json") {
            assert_eq!(after[p].1, *ino, "{} was rewritten", p.display());
        }
    }
    assert_eq!(serials(&d.path, &s2.path), serials_before);
    let out = certs_check(&d.path, true);
    assert!(out.status.success(), "{}", describe(&out));
}

// ---------------------------------------------------------------------------------------------
// 3. Bad input: a clear error naming the file, nothing lost
// ---------------------------------------------------------------------------------------------

fn replace_with_file(p: &Path, bytes: &[u8], mode: u32) {
    fs::remove_file(p).expect("remove");
    fs::write(p, bytes).expect("write");
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn corrupt_certificate_is_reported_and_left_alone() {
    tools();
    let d = fresh();
    let crt = d.path.join("pki/apiserver.crt");
    let garbage =
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    replace_with_file(&crt, garbage, 0o644);

    let (out, rows) = check_rows(&d.path);
    assert!(!out.status.success(), "certs check must fail");
    let r = row(&rows, "apiserver");
    assert_ne!(r["status"], "ok");
    assert!(
        r["problems"].to_string().contains("pki/apiserver.crt"),
        "the problem names the file: {r:#}"
    );
    for other in rows.iter().filter(|r| r["name"] != "apiserver") {
        assert_eq!(other["status"], "ok", "{other:#}");
    }
    let out = certs_check(&d.path, false);
    assert!(!out.status.success());
    assert!(
        all_output(&out)
            .lines()
            .any(|l| l.contains("pki/apiserver.crt") && l.contains("cannot parse")),
        "{}",
        describe(&out)
    );

    let before = snapshot(&d.path);
    let out = init(&d.path, &[]);
    assert!(
        !out.status.success(),
        "init must refuse: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(path_str(&crt)),
        "init names the file: {}",
        describe(&out)
    );
    assert_eq!(fs::read(&crt).expect("still there"), garbage);
    assert!(!crt.is_symlink(), "not replaced by a link");
    assert_eq!(changed(&before, &snapshot(&d.path)), Vec::<PathBuf>::new());
}

#[test]
fn ca_key_readable_by_others_is_refused_with_path_and_mode() {
    tools();
    let d = fresh();
    let target = fs::canonicalize(d.path.join("pki/ca.key")).expect("ca.key target");
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).expect("chmod");
    let before = snapshot(&d.path);

    let out = init(&d.path, &[]);
    assert!(!out.status.success(), "init must refuse");
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains(path_str(&d.path.join("pki/ca.key"))) && msg.contains("0644"),
        "init names the key and its mode: {}",
        describe(&out)
    );
    assert_eq!(changed(&before, &snapshot(&d.path)), Vec::<PathBuf>::new());

    let out = certs_check(&d.path, false);
    assert!(!out.status.success(), "certs check must fail");
    let msg = all_output(&out);
    assert!(
        msg.contains(path_str(&d.path.join("pki/ca.key"))) && msg.contains("0644"),
        "certs check names the key and its mode: {}",
        describe(&out)
    );
    let (_, rows) = check_rows(&d.path);
    assert_ne!(row(&rows, "ca")["status"], "ok");
}

#[test]
fn key_not_matching_its_certificate_is_refused() {
    tools();
    let d = fresh();
    let key = d.path.join("pki/front-proxy-client.key");
    let other = fs::read(d.path.join("pki/etcd/healthcheck-client.key")).expect("other key");
    replace_with_file(&key, &other, 0o600);

    let out = certs_check(&d.path, false);
    assert!(!out.status.success(), "certs check must fail");
    let text = all_output(&out);
    assert!(
        text.lines().any(|l| l.starts_with("front-proxy-client ")
            && l.contains("pki/front-proxy-client.crt")
            && l.contains("do not match")),
        "{}",
        describe(&out)
    );
    let (_, rows) = check_rows(&d.path);
    assert_eq!(row(&rows, "front-proxy-client")["status"], "key-mismatch");

    let before = snapshot(&d.path);
    let out = init(&d.path, &[]);
    assert!(
        !out.status.success(),
        "init must refuse: {}",
        describe(&out)
    );
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("pki/front-proxy-client") && msg.contains("do not match"),
        "{}",
        describe(&out)
    );
    assert_eq!(fs::read(&key).expect("key"), other, "key overwritten");
    assert_eq!(changed(&before, &snapshot(&d.path)), Vec::<PathBuf>::new());
}

#[test]
fn interrupted_directory_is_completed_without_touching_the_cas() {
    tools();
    let d = fresh();
    let p = |rel: &str| d.path.join(rel);
    let ca_files: Vec<(String, Vec<u8>)> = Ca::ALL
        .iter()
        .flat_map(|c| [c.cert(), c.key()])
        .map(|f| (f.to_string(), fs::read(p(f)).expect("CA file")))
        .collect();
    let sa_key = fs::read(p("pki/sa.key")).expect("sa.key");
    let apiserver = fs::read(p("pki/apiserver.crt")).expect("apiserver.crt");
    for f in [
        "pki/etcd/peer.crt",
        "admin.conf",
        "pki/sa.pub",
        "kubelet/pki/kubelet-client-current.pem",
    ] {
        fs::remove_file(p(f)).expect(f);
    }
    fs::write(p("pki/.tmp-foo-1-0"), "half").expect("stray file");
    fs::write(p("pki/etcd/.tmp-server.key-1-1"), "half").expect("stray file");
    let stage = p("pki/.store/apiserver/.tmp-stage-1-0");
    fs::create_dir(&stage).expect("stray dir");
    fs::write(stage.join("tls.crt"), "half").expect("stray file");

    let out = certs_check(&d.path, false);
    assert!(!out.status.success(), "certs check sees the damage");

    let report = init_json(&d.path);
    assert!(
        report["cleaned_up"].as_u64().expect("cleaned_up") >= 3,
        "{report:#}"
    );
    for gone in [
        p("pki/.tmp-foo-1-0"),
        p("pki/etcd/.tmp-server.key-1-1"),
        stage.clone(),
    ] {
        assert!(!gone.exists(), "{} left behind", gone.display());
    }
    for c in Ca::ALL {
        assert_eq!(report_item(&report, c.name())["action"], "kept");
    }
    for (f, bytes) in &ca_files {
        assert_eq!(&fs::read(p(f)).expect("CA file"), bytes, "{f} changed");
    }
    assert_eq!(
        fs::read(p("pki/sa.key")).expect("sa.key"),
        sa_key,
        "sa.key changed"
    );
    assert_eq!(
        fs::read(p("pki/apiserver.crt")).expect("apiserver.crt"),
        apiserver
    );
    for name in ["etcd-peer", "admin.conf", "kubelet.conf", "sa"] {
        assert_ne!(report_item(&report, name)["action"], "kept", "{name}");
    }
    for i in report["items"].as_array().expect("items") {
        let name = i["name"].as_str().expect("name");
        if !["etcd-peer", "admin.conf", "kubelet.conf", "sa"].contains(&name) {
            assert_eq!(i["action"], "kept", "{i}");
        }
    }
    // The restored files are whole and consistent.
    assert_eq!(
        key_pubout(&p("pki/etcd/peer.key")),
        facts(&p("pki/etcd/peer.crt")).pubkey
    );
    assert_eq!(
        key_pubout(&p("pki/sa.key")),
        openssl_ok(&[
            "pkey",
            "-pubin",
            "-in",
            path_str(&p("pki/sa.pub")),
            "-pubout"
        ])
    );
    let out = openssl_verify(
        &p(Ca::Cluster.cert()),
        &p("kubelet/pki/kubelet-client-current.pem"),
        Some("sslclient"),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let out = certs_check(&d.path, false);
    assert!(out.status.success(), "after init: {}", describe(&out));
}

/// A CA key that is really gone (a plain-file directory, as kubeadm leaves it; or the versioned
/// store's own copy) is never replaced by a new CA.
#[test]
fn missing_ca_key_is_never_replaced() {
    tools();
    let managed = fresh();
    let d = plain_copy(&managed.path);
    let ca_crt = fs::read(d.path.join("pki/ca.crt")).expect("ca.crt");
    fs::remove_file(d.path.join("pki/ca.key")).expect("remove ca.key");
    let before = snapshot(&d.path);

    let out = init(&d.path, &[]);
    assert!(!out.status.success(), "init must refuse");
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains(path_str(&d.path.join("pki/ca.key"))) && msg.contains("never replaces a CA"),
        "{}",
        describe(&out)
    );
    assert_eq!(fs::read(d.path.join("pki/ca.crt")).expect("ca.crt"), ca_crt);
    assert!(!d.path.join("pki/ca.key").exists());
    assert_eq!(changed(&before, &snapshot(&d.path)), Vec::<PathBuf>::new());

    let out = certs_check(&d.path, false);
    assert!(!out.status.success());
    assert!(
        all_output(&out).contains("pki/ca.key"),
        "{}",
        describe(&out)
    );

    // In a meshd directory the link alone is only a pointer (see
    // `links_missing_after_an_interrupted_run_are_restored`); with the stored key gone as well, init
    // refuses, naming the file, and creates no CA.
    let d = managed;
    let ca_crt = fs::read(d.path.join("pki/ca.crt")).expect("ca.crt");
    let stored = fs::canonicalize(d.path.join("pki/ca.key")).expect("stored ca key");
    fs::remove_file(d.path.join("pki/ca.key")).expect("remove ca.key");
    fs::remove_file(&stored).expect("remove the stored key");
    let before = snapshot(&d.path);
    let out = init(&d.path, &[]);
    assert!(
        !out.status.success(),
        "init must refuse: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(path_str(&stored)),
        "{}",
        describe(&out)
    );
    assert_eq!(fs::read(d.path.join("pki/ca.crt")).expect("ca.crt"), ca_crt);
    assert_eq!(changed(&before, &snapshot(&d.path)), Vec::<PathBuf>::new());
    assert!(!certs_check(&d.path, false).status.success());
}

/// A front-proxy client certificate that expired in 2020, signed by meshd's front-proxy CA with
/// `openssl ca` (which, unlike `openssl x509` in OpenSSL 3.0, takes explicit dates).
#[test]
fn expired_leaf_fails_the_check_and_is_reissued() {
    tools();
    let d = fresh();
    let scratch = new_dir("meshd-inv-scratch-");
    let s = &scratch.path;
    fs::write(s.join("index.txt"), "").expect("index");
    fs::write(
        s.join("ca.cnf"),
        "[ca]\ndefault_ca = t\n[t]\ndatabase = index.txt\nnew_certs_dir = .\nrand_serial = yes\n\
         default_md = sha256\npolicy = any\nunique_subject = no\ncopy_extensions = none\n\
         x509_extensions = leaf\n[any]\ncommonName = supplied\n[leaf]\n\
         basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = clientAuth\n",
    )
    .expect("ca.cnf");
    let run_in = |args: &[&str]| {
        let out = run(Command::new("openssl").args(args).current_dir(s));
        assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    };
    run_in(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "old.key",
        "-subj",
        "/CN=front-proxy-client",
        "-out",
        "old.csr",
    ]);
    run_in(&[
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-cert",
        path_str(&d.path.join("pki/front-proxy-ca.crt")),
        "-keyfile",
        path_str(&d.path.join("pki/front-proxy-ca.key")),
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200201000000Z",
        "-notext",
        "-in",
        "old.csr",
        "-out",
        "old.crt",
    ]);
    let crt = d.path.join("pki/front-proxy-client.crt");
    let key = d.path.join("pki/front-proxy-client.key");
    replace_with_file(&crt, &fs::read(s.join("old.crt")).expect("old.crt"), 0o644);
    replace_with_file(&key, &fs::read(s.join("old.key")).expect("old.key"), 0o600);
    assert!(facts(&crt).not_after < now_secs());
    let fp_ca = fs::read(d.path.join("pki/front-proxy-ca.crt")).expect("front-proxy-ca");

    let (out, rows) = check_rows(&d.path);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let r = row(&rows, "front-proxy-client");
    assert_eq!(r["status"], "expired", "{r:#}");
    assert!(r["residual_seconds"].as_i64().expect("residual") < 0);
    let out = certs_check(&d.path, false);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("front-proxy-client ") && l.contains("expired")),
        "{}",
        describe(&out)
    );

    let report = init_json(&d.path);
    let item = report_item(&report, "front-proxy-client");
    assert_eq!(item["action"], "reissued", "{item}");
    assert!(
        item["reason"].as_str().unwrap_or("").contains("expired"),
        "{item}"
    );
    let f = facts(&crt);
    assert!(f.not_after > now_secs() + 80 * DAY);
    assert_eq!(f.cn(), vec!["front-proxy-client".to_string()]);
    assert_eq!(key_pubout(&key), f.pubkey);
    let out = openssl_verify(
        &d.path.join("pki/front-proxy-ca.crt"),
        &crt,
        Some("sslclient"),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        fs::read(d.path.join("pki/front-proxy-ca.crt")).expect("front-proxy-ca"),
        fp_ca
    );
    let out = certs_check(&d.path, false);
    assert!(out.status.success(), "after reissue: {}", describe(&out));
}

// ---------------------------------------------------------------------------------------------
// 3b. Re-runs: plain files read in place, links restored, settings kept, kubeconfigs refreshed
// ---------------------------------------------------------------------------------------------

/// A copy of `d` as a kubeadm directory holds it: plain files (every link followed), no versioned
/// store.
fn plain_copy(d: &Path) -> Dir {
    let c = new_dir("meshd-inv-plain-");
    let out = run(Command::new("cp")
        .arg("-rL")
        .arg(format!("{}/.", path_str(d)))
        .arg(&c.path));
    assert!(out.status.success(), "cp -rL: {}", describe(&out));
    fs::remove_dir_all(c.path.join("pki/.store")).expect("remove pki/.store");
    c
}

/// `meshd init` with the standard arguments, some of their values replaced (`--node-name cp2`),
/// plus `extra`.
fn init_replacing(d: &Path, replace: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut args = init_args(d);
    for (flag, value) in replace {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} is not a standard init argument"));
        args[i + 1] = value.to_string();
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    meshd(&args)
}

fn settings_json(d: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(d.join("meshd.json")).expect("meshd.json")).expect("JSON")
}

fn actions(report: &serde_json::Value) -> BTreeMap<String, String> {
    report["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["name"].as_str().expect("name").to_string(),
                i["action"].as_str().expect("action").to_string(),
            )
        })
        .collect()
}

/// kubeadm's layout, plain files and no `pki/.store`: init reads every file in place and changes
/// nothing (no file turned into a link, no kubeconfig rewritten), and the check passes.
#[test]
fn plain_file_directory_is_read_in_place() {
    tools();
    let managed = fresh();
    let d = plain_copy(&managed.path);
    let before = snapshot(&d.path);
    assert!(
        before.values().all(|(n, _)| !matches!(n, Node::Link(_))),
        "the copy holds no links"
    );

    let report = init_json(&d.path);
    for (name, action) in actions(&report) {
        assert_eq!(action, "kept", "{name}: {report:#}");
    }
    assert_eq!(
        changed(&before, &snapshot(&d.path)),
        Vec::<PathBuf>::new(),
        "init changed files of a plain-file directory"
    );
    assert!(
        !d.path.join("pki/.store").exists(),
        "init made a versioned store for files it keeps"
    );
    let out = certs_check(&d.path, false);
    assert!(out.status.success(), "{}", describe(&out));
}

/// A crash between the cert and key link of a pair (or a link removed by hand) leaves the pair in the
/// store: `certs check` reports the missing path, init restores the link (the pair, a CA's above
/// all, unchanged) and the check passes again.
#[test]
fn links_missing_after_an_interrupted_run_are_restored() {
    tools();
    for (link, name) in [("pki/ca.key", "ca"), ("pki/apiserver.key", "apiserver")] {
        let d = fresh();
        let p = d.path.join(link);
        let target = fs::read_link(&p).expect("a link");
        let cert = p.with_extension("crt");
        let (cert_bytes, key_bytes) = (fs::read(&cert).expect("crt"), fs::read(&p).expect("key"));
        let ca = fs::read(d.path.join("pki/ca.crt")).expect("ca.crt");
        fs::remove_file(&p).expect("remove the link");

        let (out, rows) = check_rows(&d.path);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let r = row(&rows, name);
        assert_eq!(r["status"], "missing", "{r:#}");
        assert!(r["problems"].to_string().contains(path_str(&p)), "{r:#}");

        let report = init_json(&d.path);
        let item = report_item(&report, name);
        assert_eq!(item["action"], "updated", "{item}");
        assert!(
            item["reason"].as_str().unwrap_or("").contains(link),
            "{item}"
        );
        for (other, action) in actions(&report) {
            if other != name {
                assert_eq!(action, "kept", "{other}: {report:#}");
            }
        }
        assert_eq!(fs::read_link(&p).expect("link restored"), target);
        assert_eq!(fs::read(&p).expect("key"), key_bytes, "{link}: other key");
        assert_eq!(
            fs::read(&cert).expect("crt"),
            cert_bytes,
            "{link}: other cert"
        );
        assert_eq!(
            fs::read(d.path.join("pki/ca.crt")).expect("ca.crt"),
            ca,
            "the CA changed"
        );
        let out = certs_check(&d.path, false);
        assert!(out.status.success(), "after init: {}", describe(&out));
    }
}

/// The store kind, the etcd endpoints, the node name and the cluster CIDR of an initialized
/// directory are never changed by a re-run: refused with the setting and both values named, nothing
/// changed. `--store` and `--etcd-endpoints` may be left out: the recorded ones are kept.
#[test]
fn rerun_refuses_to_change_the_store_node_name_or_cluster_cidr() {
    tools();
    let d = new_dir("meshd-inv-");
    let etcd = "https://127.0.0.1:2379";
    let out = init(&d.path, &["--store", "etcd", "--etcd-endpoints", etcd]);
    assert!(out.status.success(), "{}", describe(&out));
    let settings = fs::read(d.path.join("meshd.json")).expect("meshd.json");
    assert_eq!(settings_json(&d.path)["store"]["kind"], "etcd");

    // Left out: kept (not switched back to the embedded store).
    let out = init(&d.path, &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        fs::read(d.path.join("meshd.json")).expect("meshd.json"),
        settings,
        "meshd.json rewritten"
    );
    // Given again, unchanged: fine.
    let out = init(&d.path, &["--store", "etcd", "--etcd-endpoints", etcd]);
    assert!(out.status.success(), "{}", describe(&out));

    let before = snapshot(&d.path);
    /// (replaced standard arguments, extra arguments, what the refusal must name)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a [&'a str]);
    let cases: [Case; 5] = [
        (
            &[],
            &["--store", "embedded"],
            &["store kind", "etcd", "embedded"],
        ),
        (
            &[],
            &["--etcd-endpoints", "https://127.0.0.9:2379"],
            &["etcd endpoints", etcd, "https://127.0.0.9:2379"],
        ),
        (&[("--node-name", "cp2")], &[], &["node name", "cp1", "cp2"]),
        (
            &[],
            &["--cluster-cidr", "10.245.0.0/16"],
            &["cluster CIDR", "10.244.0.0/16", "10.245.0.0/16"],
        ),
        (
            &[("--node-name", "cp2")],
            &["--store", "embedded", "--cluster-cidr", "10.245.0.0/16"],
            &["store kind", "node name", "cluster CIDR"],
        ),
    ];
    for (replace, extra, want) in cases {
        let out = init_replacing(&d.path, replace, extra);
        let what = format!("{replace:?} {extra:?}");
        assert_eq!(out.status.code(), Some(1), "{what}: {}", describe(&out));
        let msg = String::from_utf8_lossy(&out.stderr);
        for w in want {
            assert!(msg.contains(w), "{what}: no {w:?} in {}", describe(&out));
        }
        assert!(msg.contains("meshd.json"), "{}", describe(&out));
        assert_eq!(
            changed(&before, &snapshot(&d.path)),
            Vec::<PathBuf>::new(),
            "{what}: files changed"
        );
    }

    // An embedded store by default on a first init, and then kept.
    let e = new_dir("meshd-inv-");
    let out = init(&e.path, &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(settings_json(&e.path)["store"]["kind"], "embedded");
    let out = init(&e.path, &["--store", "etcd", "--etcd-endpoints", etcd]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(settings_json(&e.path)["store"]["kind"], "embedded");
}

/// A changed API server port and cluster name: the kept admin kubeconfigs are re-rendered with their
/// own credential (no reissue), and so are the component kubeconfigs; a third run keeps everything.
#[test]
fn kept_kubeconfigs_follow_the_server_url_and_cluster_name() {
    tools();
    let d = fresh();
    let read = |f: &str| fs::read_to_string(d.path.join(f)).expect(f);
    let creds: Vec<(String, String)> = ["admin.conf", "super-admin.conf"]
        .iter()
        .map(|f| {
            let kc = read(f);
            (
                kubeconfig_value(&kc, "client-certificate-data"),
                kubeconfig_value(&kc, "client-key-data"),
            )
        })
        .collect();

    let out = init(
        &d.path,
        &[
            "--apiserver-port",
            "7000",
            "--cluster-name",
            "prod",
            "--output",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    for (f, (cert, key)) in ["admin.conf", "super-admin.conf"].iter().zip(&creds) {
        let item = report_item(&report, f);
        assert_eq!(item["action"], "updated", "{item}");
        let why = item["reason"].as_str().unwrap_or("");
        assert!(
            why.contains("server URL changed") && why.contains("cluster name changed"),
            "{item}"
        );
        let kc = read(f);
        assert_eq!(
            kubeconfig_value(&kc, "server"),
            format!("https://{ADDR}:7000")
        );
        assert!(kc.contains("\"prod\""), "{kc}");
        assert_eq!(
            &kubeconfig_value(&kc, "client-certificate-data"),
            cert,
            "{f}: reissued"
        );
        assert_eq!(
            &kubeconfig_value(&kc, "client-key-data"),
            key,
            "{f}: new key"
        );
        assert_eq!(
            fs::metadata(d.path.join(f)).expect(f).mode() & 0o7777,
            0o600
        );
    }
    for f in [
        "controller-manager.conf",
        "scheduler.conf",
        "kubelet.conf",
        "kube-proxy.conf",
    ] {
        assert_eq!(report_item(&report, f)["action"], "updated", "{f}");
        assert_eq!(
            kubeconfig_value(&read(f), "server"),
            format!("https://{ADDR}:7000")
        );
    }
    for (name, action) in actions(&report) {
        assert_ne!(action, "reissued", "{name} was reissued");
        assert_ne!(action, "created", "{name} was created");
    }
    assert_eq!(settings_json(&d.path)["cluster"]["apiserver_port"], 7000);

    let before = snapshot(&d.path);
    let out = init(
        &d.path,
        &[
            "--apiserver-port",
            "7000",
            "--cluster-name",
            "prod",
            "--output",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    for (name, action) in actions(&report) {
        assert_eq!(action, "kept", "{name}");
    }
    assert_eq!(changed(&before, &snapshot(&d.path)), Vec::<PathBuf>::new());
    let out = certs_check(&d.path, false);
    assert!(out.status.success(), "{}", describe(&out));
}

/// Several unusable leaves: init completes every other item (a missing one is made, new settings
/// applied), then fails listing each refused file with its reason; those files and meshd.json are
/// left exactly as they were.
#[test]
fn init_completes_the_rest_and_lists_every_refused_file() {
    tools();
    let d = fresh();
    let crt = d.path.join("pki/apiserver.crt");
    let garbage =
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    replace_with_file(&crt, garbage, 0o644);
    let key = d.path.join("pki/front-proxy-client.key");
    let other = fs::read(d.path.join("pki/etcd/healthcheck-client.key")).expect("other key");
    replace_with_file(&key, &other, 0o600);
    fs::remove_file(d.path.join("admin.conf")).expect("remove admin.conf");
    let settings = fs::read(d.path.join("meshd.json")).expect("meshd.json");

    // A new cluster name too: applied to what init completes, but not recorded (init fails).
    let out = init(&d.path, &["--cluster-name", "prod"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("refused to touch 2 file(s)"),
        "{}",
        describe(&out)
    );
    let lines: Vec<&str> = msg
        .lines()
        .filter(|l| l.trim_start().starts_with("- "))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(path_str(&crt)) && l.contains("cannot parse")),
        "{}",
        describe(&out)
    );
    assert!(
        lines.iter().any(|l| l.contains("pki/front-proxy-client")
            && l.contains("do not match")
            && l.contains(path_str(&key))),
        "{}",
        describe(&out)
    );
    assert_eq!(fs::read(&crt).expect("crt"), garbage);
    assert!(!crt.is_symlink());
    assert_eq!(fs::read(&key).expect("key"), other);
    assert_eq!(
        fs::read(d.path.join("meshd.json")).expect("meshd.json"),
        settings,
        "a failed init rewrote meshd.json"
    );
    // The rest was completed: admin.conf is back, and every kubeconfig names the new cluster.
    let admin = fs::read_to_string(d.path.join("admin.conf")).expect("admin.conf made");
    assert!(admin.contains("\"prod\""), "{admin}");
    let kc = fs::read_to_string(d.path.join("scheduler.conf")).expect("scheduler.conf");
    assert!(kc.contains("\"prod\""), "{kc}");

    let (_, rows) = check_rows(&d.path);
    for r in &rows {
        let name = r["name"].as_str().expect("name");
        if name != "apiserver" && name != "front-proxy-client" {
            assert_eq!(r["status"], "ok", "{r:#}");
        }
    }
}

/// `certs check` on a directory that is not meshd's: a clear error and exit 1, no table.
#[test]
fn certs_check_of_a_non_meshd_directory_is_an_error() {
    tools();
    let empty = new_dir("meshd-inv-empty-");
    let gone = empty.path.join("nothing-here");
    for dir in [&empty.path, &gone] {
        let out = certs_check(dir, false);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(
            msg.contains(path_str(dir)) && msg.contains("is not a meshd data directory"),
            "{}",
            describe(&out)
        );
        assert!(out.stdout.is_empty(), "{}", describe(&out));
    }
    assert!(!gone.exists(), "certs check created the directory");
}

// ---------------------------------------------------------------------------------------------
// 4. CSRs made by openssl, signed under policy
// ---------------------------------------------------------------------------------------------

fn node_policy(usage: pki::ca::Usage) -> pki::csr::SigningPolicy {
    pki::csr::SigningPolicy {
        common_name: "system:node:n1".into(),
        organizations: vec!["system:nodes".into()],
        allowed_dns_names: vec!["n1".into()],
        allowed_ip_addresses: vec!["192.0.2.1".parse().expect("ip")],
        usage,
        require_san: true,
        lifetime: Duration::from_secs(DAY as u64),
        max_lifetime: Duration::from_secs(30 * DAY as u64),
        backdate: pki::ca::DEFAULT_BACKDATE,
    }
}

/// An openssl-made CSR for `/O=system:nodes/CN=<cn>` with `newkey` and extra `-addext`s.
fn openssl_csr(dir: &Path, name: &str, newkey: &[&str], cn: &str, addext: &[&str]) -> String {
    let csr = dir.join(format!("{name}.csr"));
    let key = dir.join(format!("{name}.key"));
    let subj = format!("/O=system:nodes/CN={cn}");
    let mut args = vec!["req", "-new", "-nodes", "-newkey"];
    args.extend_from_slice(newkey);
    args.extend([
        "-keyout",
        path_str(&key),
        "-subj",
        &subj,
        "-addext",
        "subjectAltName=DNS:n1,IP:192.0.2.1",
        "-out",
        path_str(&csr),
    ]);
    for e in addext {
        args.extend(["-addext", e]);
    }
    openssl_ok(&args);
    fs::read_to_string(&csr).expect("csr")
}

#[test]
fn csrs_from_openssl_are_signed_only_under_policy() {
    tools();
    let scratch = new_dir("meshd-inv-scratch-");
    let dir = &scratch.path;
    let limits = pki::csr::CsrLimits::default();
    let ca = pki::ca::CertificateAuthority::create(
        "kubernetes",
        pki::keys::KeyAlgorithm::EcdsaP256,
        pki::ca::DEFAULT_CA_LIFETIME,
        SystemTime::now(),
    )
    .expect("CA");
    let ca_file = dir.join("ca.crt");
    fs::write(&ca_file, ca.cert_pem()).expect("ca.crt");
    let server = node_policy(pki::ca::Usage::Server);

    // RSA-1024: refused, and the refusal names the public key.
    let pem = openssl_csr(dir, "rsa1024", &["rsa:1024"], "system:node:n1", &[]);
    let refused =
        pki::csr::parse_csr_pem(&pem, &limits).and_then(|csr| pki::csr::authorize(&csr, &server));
    match refused {
        Err(e) => assert!(e.to_string().contains("public key"), "{e}"),
        Ok(p) => panic!("RSA-1024 accepted: {p:?}"),
    }

    // RSA-2048: accepted; RSA leaves get keyEncipherment too.
    let pem = openssl_csr(dir, "rsa2048", &["rsa:2048"], "system:node:n1", &[]);
    let csr = pki::csr::parse_csr_pem(&pem, &limits).expect("RSA-2048 CSR parses");
    assert_eq!((csr.key.algorithm.as_str(), csr.key.bits), ("rsa", 2048));
    let cert = pki::csr::sign_csr(&ca, &csr, &server, SystemTime::now()).expect("signed");
    let crt = dir.join("rsa2048.crt");
    fs::write(&crt, &cert.pem).expect("write");
    let f = facts(&crt);
    assert_eq!(f.is_ca(), Some(false));
    assert_eq!(f.eku, Usage::Server.ekus());
    assert_eq!(
        f.key_usage,
        BTreeSet::from(["Digital Signature".into(), "Key Encipherment".into()])
    );
    assert_eq!(key_pubout(&dir.join("rsa2048.key")), f.pubkey);
    let out = openssl_verify(&ca_file, &crt, Some("sslserver"));
    assert!(out.status.success(), "{}", describe(&out));

    // A request asking for CA:TRUE, certificate signing and extra EKUs gets the profile only.
    let pem = openssl_csr(
        dir,
        "greedy",
        &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "system:node:n1",
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "extendedKeyUsage=codeSigning,clientAuth,serverAuth",
        ],
    );
    let csr = pki::csr::parse_csr_pem(&pem, &limits).expect("CSR parses");
    let cert = pki::csr::sign_csr(&ca, &csr, &server, SystemTime::now()).expect("signed");
    let crt = dir.join("greedy.crt");
    fs::write(&crt, &cert.pem).expect("write");
    let f = facts(&crt);
    let (bc, critical) = f.basic_constraints.clone().expect("basic constraints");
    assert_eq!((bc.as_str(), critical), ("CA:FALSE", true));
    assert_eq!(f.eku, Usage::Server.ekus(), "only the policy's EKU");
    assert_eq!(
        f.key_usage,
        BTreeSet::from(["Digital Signature".to_string()])
    );
    assert_eq!(f.cn(), vec!["system:node:n1".to_string()]);
    assert_eq!(f.o(), BTreeSet::from(["system:nodes".to_string()]));
    assert_eq!(f.dns, BTreeSet::from(["n1".to_string()]));
    assert_eq!(f.ips, BTreeSet::from(["192.0.2.1".parse().expect("ip")]));
    assert_eq!(key_pubout(&dir.join("greedy.key")), f.pubkey);
    assert!(openssl_verify(&ca_file, &crt, Some("sslserver"))
        .status
        .success());
    assert!(
        !openssl_verify(&ca_file, &crt, Some("sslclient"))
            .status
            .success(),
        "clientAuth from the request must not be granted"
    );
    // The same request under a client policy gets clientAuth only.
    let cert = pki::csr::sign_csr(
        &ca,
        &csr,
        &node_policy(pki::ca::Usage::Client),
        SystemTime::now(),
    )
    .expect("signed");
    fs::write(&crt, &cert.pem).expect("write");
    assert_eq!(facts(&crt).eku, Usage::Client.ekus());

    // Another node's name, from an otherwise valid openssl CSR: refused, naming the field.
    let pem = openssl_csr(
        dir,
        "other",
        &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "system:node:n2",
        &[],
    );
    let csr = pki::csr::parse_csr_pem(&pem, &limits).expect("CSR parses");
    let e = pki::csr::authorize(&csr, &server).expect_err("other node's CN");
    assert!(e.to_string().contains("subject CN"), "{e}");
}
