//! CFG-01 … CFG-13 over a neutral input, [`ComponentConfig`], built from the command lines of
//! running processes (`/proc/*/cmdline`), systemd units (`ExecStart=` with `\` continuations) and
//! static pod manifests (`spec.containers[].command/args`). A rendered directory
//! (`meshd render --out DIR`) is read with [`read_dir`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::catalog::*;
use super::model::{Finding, Status};

/// A component whose configuration the audit judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// etcd.
    Etcd,
    /// kube-apiserver.
    Apiserver,
    /// kube-controller-manager.
    ControllerManager,
    /// kube-scheduler.
    Scheduler,
    /// kubelet.
    Kubelet,
}

impl Kind {
    /// From a program name (`/usr/bin/etcd`, `kube-apiserver`).
    pub fn from_program(p: &str) -> Option<Kind> {
        let base = p.rsplit('/').next().unwrap_or(p);
        Some(match base {
            "etcd" => Kind::Etcd,
            "kube-apiserver" => Kind::Apiserver,
            "kube-controller-manager" => Kind::ControllerManager,
            "kube-scheduler" => Kind::Scheduler,
            "kubelet" => Kind::Kubelet,
            _ => return None,
        })
    }

    /// The program name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::Apiserver => "kube-apiserver",
            Kind::ControllerManager => "kube-controller-manager",
            Kind::Scheduler => "kube-scheduler",
            Kind::Kubelet => "kubelet",
        }
    }
}

/// One component's configuration, wherever it came from.
#[derive(Clone, Debug)]
pub struct ComponentConfig {
    /// Which component.
    pub kind: Kind,
    /// Its arguments (after the program name).
    pub args: Vec<String>,
    /// Where it came from: `pid 123`, a unit file, a manifest.
    pub source: String,
    /// A kubelet `--config` file's flattened keys (`authentication.anonymous.enabled` → `false`).
    pub file: BTreeMap<String, String>,
}

impl ComponentConfig {
    /// From an argv (program first). `None` when the program is not a known component.
    pub fn from_argv(argv: &[String], source: &str) -> Option<ComponentConfig> {
        let (prog, rest) = argv.split_first()?;
        let kind = Kind::from_program(prog)?;
        let mut c = ComponentConfig {
            kind,
            args: rest.to_vec(),
            source: source.to_owned(),
            file: BTreeMap::new(),
        };
        if kind == Kind::Kubelet {
            if let Some(p) = c.flag("config") {
                if let Ok(text) = std::fs::read_to_string(&p) {
                    c.file = flatten_yaml(&text);
                }
            }
        }
        Some(c)
    }

    /// The value of `--name` (`--name=v`, `--name v`; a bare `--name` is `"true"`). The last one
    /// wins, as with Go's flag package.
    pub fn flag(&self, name: &str) -> Option<String> {
        let mut found = None;
        let mut i = 0;
        while i < self.args.len() {
            let a = self.args[i].trim_start_matches('-');
            if self.args[i].starts_with('-') {
                if let Some((k, v)) = a.split_once('=') {
                    if k == name {
                        found = Some(v.to_owned());
                    }
                } else if a == name {
                    match self.args.get(i + 1) {
                        Some(n) if !n.starts_with('-') => {
                            found = Some(n.clone());
                            i += 1;
                        }
                        _ => found = Some("true".into()),
                    }
                }
            }
            i += 1;
        }
        found
    }

    fn is_true(&self, name: &str) -> Option<bool> {
        self.flag(name).map(|v| v.eq_ignore_ascii_case("true"))
    }

    /// A flag, or else the kubelet config file's key.
    fn setting(&self, flag: &str, key: &str) -> Option<String> {
        self.flag(flag).or_else(|| self.file.get(key).cloned())
    }
}

/// Splits a shell-like command line (single and double quotes, backslash escapes).
pub fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut any = false;
    let mut chars = s.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    if n != '\n' {
                        cur.push(n);
                        any = true;
                    }
                }
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The argv of a systemd unit's `ExecStart=` (continuation lines joined; the `-@:+!` prefixes
/// dropped). `None` when the unit has none.
pub fn parse_systemd_unit(text: &str) -> Option<Vec<String>> {
    let mut joined = String::new();
    let mut cont = false;
    let mut exec = None;
    for line in text.lines() {
        let l = line.trim_end();
        if cont {
            let (body, more) = match l.strip_suffix('\\') {
                Some(b) => (b, true),
                None => (l, false),
            };
            joined.push(' ');
            joined.push_str(body.trim());
            cont = more;
            if !cont {
                exec = Some(std::mem::take(&mut joined));
            }
            continue;
        }
        let t = l.trim_start();
        if t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(v) = t.strip_prefix("ExecStart=") {
            if v.trim().is_empty() {
                exec = None; // a reset, as in drop-ins
                continue;
            }
            match v.strip_suffix('\\') {
                Some(b) => {
                    joined = b.trim().to_owned();
                    cont = true;
                }
                None => exec = Some(v.trim().to_owned()),
            }
        }
    }
    if cont {
        exec = Some(joined);
    }
    let exec = exec?;
    let exec = exec.trim_start_matches(['-', '@', ':', '+', '!']);
    let words = split_words(exec);
    (!words.is_empty()).then_some(words)
}

/// The argv (`command` then `args`) of each container of a static pod manifest. Handles the YAML
/// Kubernetes and kubeadm write: block sequences (`- item`, plain or quoted scalars) and flow
/// sequences (`[a, "b"]`) under `command:` / `args:`.
pub fn parse_static_pod(text: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut pods: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let raw = lines[i];
        let indent = raw.len() - raw.trim_start().len();
        let mut t = raw.trim_start();
        let mut item_start = false;
        if let Some(r) = t.strip_prefix("- ") {
            t = r.trim_start();
            item_start = true;
        }
        let key = if let Some(r) = t.strip_prefix("command:") {
            Some(("command", r))
        } else {
            t.strip_prefix("args:").map(|r| ("args", r))
        };
        if item_start && (t.starts_with("name:") || key.is_some()) {
            pods.push((Vec::new(), Vec::new()));
        }
        if let Some((k, rest)) = key {
            let mut vals = Vec::new();
            let rest = rest.trim();
            if rest.starts_with('[') {
                let inner = rest.trim_start_matches('[').trim_end_matches(']');
                vals.extend(inner.split(',').map(unquote).filter(|s| !s.is_empty()));
            } else {
                let mut j = i + 1;
                while j < lines.len() {
                    let l = lines[j];
                    let ind = l.len() - l.trim_start().len();
                    let lt = l.trim_start();
                    if lt.is_empty() || lt.starts_with('#') {
                        j += 1;
                        continue;
                    }
                    if ind < indent
                        || !lt.starts_with('-')
                        || (ind == indent && !lt.starts_with("- ") && lt != "-")
                    {
                        break;
                    }
                    if ind == indent && item_start {
                        break;
                    }
                    vals.push(unquote(lt.trim_start_matches('-')));
                    j += 1;
                }
                i = j - 1;
            }
            if pods.is_empty() {
                pods.push((Vec::new(), Vec::new()));
            }
            if let Some(last) = pods.last_mut() {
                if k == "command" {
                    last.0 = vals;
                } else {
                    last.1 = vals;
                }
            }
        }
        i += 1;
    }
    pods.into_iter()
        .filter(|(c, a)| !c.is_empty() || !a.is_empty())
        .map(|(mut c, a)| {
            c.extend(a);
            c
        })
        .collect()
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    let s = s.split(" #").next().unwrap_or(s).trim();
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')))
    {
        s[1..s.len() - 1].to_owned()
    } else {
        s.to_owned()
    }
}

/// Flattens a YAML block mapping into dotted keys (`a.b.c` → scalar). Sequences become comma-joined.
pub fn flatten_yaml(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut last_key: Option<(usize, String)> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') || t == "---" {
            continue;
        }
        let indent = line.len() - t.len();
        if let Some(item) = t.strip_prefix("- ") {
            if let Some((_, k)) = &last_key {
                let e = out.entry(k.clone()).or_insert_with(String::new);
                if !e.is_empty() {
                    e.push(',');
                }
                e.push_str(&unquote(item));
            }
            continue;
        }
        let Some((k, v)) = t.split_once(':') else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let path = stack
            .iter()
            .map(|(_, k)| k.as_str())
            .chain([k.trim()])
            .collect::<Vec<_>>()
            .join(".");
        let v = v.trim();
        if v.is_empty() {
            stack.push((indent, k.trim().to_owned()));
            last_key = Some((indent, path));
        } else if v.starts_with('[') {
            let inner = v.trim_start_matches('[').trim_end_matches(']');
            let items: Vec<String> = inner
                .split(',')
                .map(unquote)
                .filter(|s| !s.is_empty())
                .collect();
            out.insert(path, items.join(","));
        } else {
            out.insert(path, unquote(v));
        }
    }
    out
}

/// The components of a rendered directory: `*.service` units and `*.yaml` / `*.yml` manifests,
/// searched recursively. Unreadable files are returned as errors beside the configs.
pub fn read_dir(dir: &Path) -> (Vec<ComponentConfig>, Vec<(PathBuf, String)>) {
    let mut configs = Vec::new();
    let mut errors = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(r) => r,
            Err(e) => {
                errors.push((d.clone(), e.to_string()));
                continue;
            }
        };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "service" | "yaml" | "yml" | "conf") {
                continue;
            }
            let text = match std::fs::read_to_string(&p) {
                Ok(t) => t,
                Err(e) => {
                    errors.push((p.clone(), e.to_string()));
                    continue;
                }
            };
            let src = p.display().to_string();
            let argvs = if ext == "yaml" || ext == "yml" {
                parse_static_pod(&text)
            } else {
                parse_systemd_unit(&text).into_iter().collect()
            };
            for argv in argvs {
                if let Some(c) = ComponentConfig::from_argv(&argv, &src) {
                    configs.push(c);
                }
            }
        }
    }
    (configs, errors)
}

/// The components running on this node, from `/proc/*/cmdline`: the processes in the audit's own
/// network namespace (a node's components share the host's network namespace, static pods included
/// with `hostNetwork: true`; a process in another namespace serves another network, e.g. another
/// node of a namespace lab, and its configuration is audited there). Where the namespace of a
/// process cannot be read, it is included.
pub fn running() -> Vec<ComponentConfig> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    let own_net = std::fs::read_link("/proc/self/ns/net").ok();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let (Some(own), Ok(net)) = (&own_net, std::fs::read_link(e.path().join("ns/net"))) {
            if &net != own {
                continue;
            }
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(c) = ComponentConfig::from_argv(&argv, &format!("pid {pid}")) {
            out.push(c);
        }
    }
    out.sort_by(|a, b| (a.kind, &a.source).cmp(&(b.kind, &b.source)));
    out
}

fn fp(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let der = pki::inspect::pem_to_der(&text).ok()?;
    Some(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &der,
    )))
}

/// The CFG findings of one component. `cluster_ca` is the cluster CA's certificate file (CFG-05).
pub fn judge(c: &ComponentConfig, cluster_ca: Option<&Path>) -> Vec<Finding> {
    let t = format!("{} ({})", c.kind.name(), c.source);
    let mut v = Vec::new();
    let set = |f: &str| c.flag(f).filter(|s| !s.is_empty());
    let missing = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .filter(|n| set(n).is_none())
            .map(|n| format!("--{n}"))
            .collect()
    };
    let pf = |ok: bool| if ok { Status::Pass } else { Status::Fail };
    match c.kind {
        Kind::Etcd => {
            let m = missing(&["cert-file", "key-file"]);
            let urls = c.flag("listen-client-urls").unwrap_or_default();
            let plain: Vec<&str> = urls
                .split(',')
                .filter(|u| u.starts_with("http://"))
                .collect();
            let obs = if m.is_empty() && plain.is_empty() {
                format!(
                    "--cert-file {} --key-file set",
                    set("cert-file").unwrap_or_default()
                )
            } else {
                let mut s = Vec::new();
                if !m.is_empty() {
                    s.push(format!("{} not set", m.join(", ")));
                }
                if !plain.is_empty() {
                    s.push(format!("plaintext client URLs {}", plain.join(",")));
                }
                s.join("; ")
            };
            v.push(CFG_01.finding(
                pf(m.is_empty() && plain.is_empty()),
                &t,
                obs,
                "--cert-file and --key-file; https:// client URLs",
            ));
            let cca =
                c.is_true("client-cert-auth") == Some(true) && set("trusted-ca-file").is_some();
            v.push(CFG_02.finding(
                pf(cca),
                &t,
                format!(
                    "--client-cert-auth={} --trusted-ca-file={}",
                    c.flag("client-cert-auth").unwrap_or_else(|| "(unset)".into()),
                    c.flag("trusted-ca-file").unwrap_or_else(|| "(unset)".into())
                ),
                "--client-cert-auth=true with --trusted-ca-file",
            ));
            let auto: Vec<String> = ["auto-tls", "peer-auto-tls"]
                .iter()
                .filter(|f| c.is_true(f) == Some(true))
                .map(|f| format!("--{f}=true"))
                .collect();
            v.push(CFG_03.finding(
                pf(auto.is_empty()),
                &t,
                if auto.is_empty() {
                    "--auto-tls and --peer-auto-tls not set".to_string()
                } else {
                    format!("{} (self-signed, unauthenticated)", auto.join(" "))
                },
                "--auto-tls and --peer-auto-tls unset or false",
            ));
            let m = missing(&["peer-cert-file", "peer-key-file", "peer-trusted-ca-file"]);
            let pcca = c.is_true("peer-client-cert-auth") == Some(true);
            v.push(CFG_04.finding(
                pf(m.is_empty() && pcca),
                &t,
                format!(
                        "{}--peer-client-cert-auth={}",
                        if m.is_empty() {
                            String::new()
                        } else {
                            format!("{} not set; ", m.join(", "))
                        },
                        c.flag("peer-client-cert-auth")
                            .unwrap_or_else(|| "(unset)".into())
                    ),
                "peer cert/key/CA set and --peer-client-cert-auth=true",
            ));
            let exp = "a CA of its own (fingerprint differs from the cluster CA)";
            v.push(
                match (
                    set("trusted-ca-file").as_deref().and_then(fp),
                    cluster_ca.and_then(|p| fp(&p.display().to_string())),
                ) {
                    (Some(e), Some(k)) if e == k => CFG_05.finding(
                        Status::Fail,
                        &t,
                        format!("--trusted-ca-file is the cluster CA (sha256 {e})"),
                        exp,
                    ),
                    (Some(e), Some(_)) => CFG_05.finding(
                        Status::Pass,
                        &t,
                        format!("etcd CA sha256 {e} differs from the cluster CA"),
                        exp,
                    ),
                    (None, _) => CFG_05.finding(
                        Status::Skip,
                        &t,
                        "--trusted-ca-file not set or unreadable (see CFG-02)",
                        exp,
                    ),
                    (_, None) => CFG_05.finding(
                        Status::Skip,
                        &t,
                        "no cluster CA in the data directory to compare with",
                        exp,
                    ),
                },
            );
        }
        Kind::Apiserver => {
            let m = missing(&["etcd-cafile", "etcd-certfile", "etcd-keyfile"]);
            let servers = c.flag("etcd-servers").unwrap_or_default();
            let plain: Vec<&str> = servers
                .split(',')
                .filter(|u| u.starts_with("http://"))
                .collect();
            v.push(CFG_06.finding(
                pf(m.is_empty() && plain.is_empty()),
                &t,
                format!(
                    "--etcd-servers={servers}{}",
                    if m.is_empty() {
                        String::new()
                    } else {
                        format!("; {} not set", m.join(", "))
                    }
                ),
                "https:// etcd servers with --etcd-cafile/certfile/keyfile",
            ));
            let m = missing(&[
                "kubelet-client-certificate",
                "kubelet-client-key",
                "kubelet-certificate-authority",
            ]);
            v.push(CFG_07.finding(
                pf(m.is_empty()),
                &t,
                if m.is_empty() {
                    "kubelet client cert, key and CA set".into()
                } else {
                    format!("{} not set", m.join(", "))
                },
                "--kubelet-client-certificate/key and --kubelet-certificate-authority",
            ));
            let m = missing(&["tls-cert-file", "tls-private-key-file", "client-ca-file"]);
            v.push(CFG_08.finding(
                pf(m.is_empty()),
                &t,
                if m.is_empty() {
                    "serving cert/key and client CA set".into()
                } else {
                    format!("{} not set", m.join(", "))
                },
                "--tls-cert-file, --tls-private-key-file, --client-ca-file",
            ));
            v.push(ciphers(c, &t, c.flag("tls-cipher-suites")));
            v.push(anonymous(c, &t, c.flag("anonymous-auth")));
            let authz = c.flag("authorization-mode").unwrap_or_default();
            let adm = c.flag("enable-admission-plugins").unwrap_or_default();
            let modes: Vec<&str> = authz.split(',').collect();
            let ok = modes.contains(&"Node")
                && modes.contains(&"RBAC")
                && !modes.contains(&"AlwaysAllow")
                && adm.split(',').any(|a| a == "NodeRestriction");
            v.push(CFG_11.finding(
                pf(ok),
                &t,
                format!("--authorization-mode={authz} --enable-admission-plugins={adm}"),
                "Node,RBAC and NodeRestriction",
            ));
        }
        Kind::Kubelet => {
            v.push(ciphers(
                c,
                &t,
                c.setting("tls-cipher-suites", "tlsCipherSuites"),
            ));
            v.push(anonymous(
                c,
                &t,
                c.setting("anonymous-auth", "authentication.anonymous.enabled"),
            ));
            let mode = c
                .setting("authorization-mode", "authorization.mode")
                .unwrap_or_else(|| "AlwaysAllow (default)".into());
            v.push(CFG_11.finding(
                pf(!mode.starts_with("AlwaysAllow")),
                &t,
                format!("authorization mode {mode}"),
                "Webhook (not AlwaysAllow)",
            ));
            let ca = c.setting("client-ca-file", "authentication.x509.clientCAFile");
            let cert = c.setting("tls-cert-file", "tlsCertFile");
            let key = c.setting("tls-private-key-file", "tlsPrivateKeyFile");
            let ro = c
                .setting("read-only-port", "readOnlyPort")
                .unwrap_or_else(|| "10255 (default)".into());
            let ok = ca.is_some() && cert.is_some() && key.is_some() && ro == "0";
            v.push(CFG_12.finding(
                pf(ok),
                &t,
                format!(
                    "clientCAFile={} tlsCertFile={} tlsPrivateKeyFile={} readOnlyPort={ro}",
                    ca.unwrap_or_else(|| "(unset)".into()),
                    cert.unwrap_or_else(|| "(unset)".into()),
                    key.is_some()
                ),
                "client CA, serving cert/key set; readOnlyPort 0",
            ));
        }
        Kind::ControllerManager | Kind::Scheduler => {
            let bind = c
                .flag("bind-address")
                .unwrap_or_else(|| "0.0.0.0 (default)".into());
            let mut ok = bind == "127.0.0.1" || bind == "::1";
            let mut obs = format!("--bind-address={bind}");
            if c.kind == Kind::ControllerManager {
                let r = set("root-ca-file");
                ok &= r.is_some();
                obs.push_str(&format!(
                    " --root-ca-file={}",
                    r.unwrap_or_else(|| "(unset)".into())
                ));
            }
            v.push(CFG_13.finding(
                pf(ok),
                &t,
                obs,
                "--bind-address=127.0.0.1 (controller-manager: and --root-ca-file)",
            ));
        }
    }
    v
}

fn ciphers(_c: &ComponentConfig, t: &str, list: Option<String>) -> Finding {
    let exp = "ECDHE + AEAD suites only";
    match list {
        None => CFG_09.finding(
            Status::Fail,
            t,
            "no cipher list: Go's defaults include CBC suites",
            exp,
        ),
        Some(l) => {
            let weak: Vec<&str> = l
                .split(',')
                .map(str::trim)
                .filter(|s| {
                    !super::hello::is_strong(s)
                        && !s.starts_with("TLS_AES_")
                        && !s.starts_with("TLS_CHACHA20_")
                })
                .collect();
            if weak.is_empty() {
                CFG_09.finding(Status::Pass, t, l.clone(), exp)
            } else {
                CFG_09.finding(
                    Status::Fail,
                    t,
                    format!("outside the policy: {}", weak.join(",")),
                    exp,
                )
            }
        }
    }
}

fn anonymous(_c: &ComponentConfig, t: &str, v: Option<String>) -> Finding {
    let exp = "anonymous auth false";
    match v.as_deref() {
        Some("false") => CFG_10.finding(Status::Pass, t, "anonymous auth false", exp),
        Some(o) => CFG_10.finding(Status::Fail, t, format!("anonymous auth {o}"), exp),
        None => CFG_10.finding(
            Status::Fail,
            t,
            "anonymous auth not set (default true)",
            exp,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(t in "(\\PC|\n|\\\\|\"|'| |-){0,300}") {
            let _ = split_words(&t);
            let _ = parse_systemd_unit(&format!("ExecStart={t}"));
            let _ = parse_static_pod(&t);
            let _ = flatten_yaml(&t);
        }
    }

    #[test]
    fn systemd_continuations() {
        let u = "[Unit]\nDescription=etcd\n[Service]\nExecStart=/usr/bin/etcd --name cp1 \\\n  --cert-file=/p/server.crt \\\n  --peer-auto-tls\nRestart=always\n";
        let argv = parse_systemd_unit(u).unwrap();
        assert_eq!(
            argv,
            [
                "/usr/bin/etcd",
                "--name",
                "cp1",
                "--cert-file=/p/server.crt",
                "--peer-auto-tls"
            ]
        );
        let c = ComponentConfig::from_argv(&argv, "u").unwrap();
        assert_eq!(c.flag("name").as_deref(), Some("cp1"));
        assert_eq!(c.flag("peer-auto-tls").as_deref(), Some("true"));
        let f = judge(&c, None);
        assert!(f
            .iter()
            .any(|f| f.id == "CFG-03" && f.status == Status::Fail));
    }

    #[test]
    fn static_pod() {
        let y = "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - command:\n    - etcd\n    - --client-cert-auth=true\n    - \"--peer-auto-tls=true\"\n    image: etcd\n    name: etcd\n  - name: side\n    command: [\"kube-scheduler\", \"--bind-address=0.0.0.0\"]\n";
        let pods = parse_static_pod(y);
        assert_eq!(
            pods[0],
            ["etcd", "--client-cert-auth=true", "--peer-auto-tls=true"]
        );
        assert_eq!(pods[1], ["kube-scheduler", "--bind-address=0.0.0.0"]);
    }

    #[test]
    fn yaml_flatten() {
        let m = flatten_yaml("authentication:\n  anonymous:\n    enabled: false\n  x509:\n    clientCAFile: /ca.crt\nreadOnlyPort: 0\ntlsCipherSuites:\n- TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n");
        assert_eq!(m["authentication.anonymous.enabled"], "false");
        assert_eq!(m["authentication.x509.clientCAFile"], "/ca.crt");
        assert_eq!(m["readOnlyPort"], "0");
        assert_eq!(
            m["tlsCipherSuites"],
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        );
    }
}
