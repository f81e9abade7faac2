//! The rendered components as files an operator installs: systemd units, or static pod manifests
//! (kubelet's `/etc/kubernetes/manifests` style, with kubelet itself as a systemd unit, since it is
//! the one that runs static pods). Pure: rendered components in, file names and contents out.

use std::path::{Path, PathBuf};

use super::render::{Health, Rendered};
use super::{Component, RenderContext};

/// The form `meshd render` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Form {
    /// One systemd unit per component.
    Systemd,
    /// Static pod manifests, plus kubelet's systemd unit.
    StaticPods,
}

/// An output file: name relative to the output directory, contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutFile {
    /// File name inside the output directory.
    pub name: String,
    /// Contents.
    pub contents: String,
}

/// Quotes one word of an `ExecStart=` line (systemd.service(5), "Command lines"): specifiers (`%`)
/// and variables (`$`) escaped, words with spaces or quotes double-quoted.
fn systemd_word(s: &str) -> String {
    let s = s.replace('%', "%%").replace('$', "$$");
    if s.chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\' || c == ';')
    {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

/// The systemd unit of `r`, running `binary`.
pub fn systemd_unit(r: &Rendered, binary: &Path) -> String {
    let c = r.component;
    let deps: Vec<String> = c
        .depends_on()
        .iter()
        .map(|d| format!("{}.service", d.name()))
        .collect();
    let after = std::iter::once("network-online.target".to_string())
        .chain(deps.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut exec = format!("ExecStart={}", systemd_word(&binary.to_string_lossy()));
    for a in &r.args {
        exec.push_str(" \\\n  ");
        exec.push_str(&systemd_word(a));
    }
    let env: String = r
        .env
        .iter()
        .map(|(k, v)| format!("Environment={}\n", systemd_word(&format!("{k}={v}"))))
        .collect();
    format!(
        "# Rendered by `meshd render`: every path is in meshd's data directory, every connection is TLS.\n\
         [Unit]\n\
         Description=Kubernetes {name} (configured by meshd)\n\
         Documentation={doc}\n\
         Wants=network-online.target{wants}\n\
         After={after}\n\
         \n\
         [Service]\n\
         {env}{exec}\n\
         Restart=always\n\
         RestartSec=5\n\
         LimitNOFILE=65536\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        name = c.name(),
        doc = match c {
            Component::Etcd => "https://etcd.io/docs/v3.5/op-guide/configuration/".to_string(),
            _ => format!(
                "https://kubernetes.io/docs/reference/command-line-tools-reference/{}/",
                c.name()
            ),
        },
        wants = if deps.is_empty() {
            String::new()
        } else {
            format!(" {}", deps.join(" "))
        },
    )
}

fn q(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn image(ctx: &RenderContext, c: Component) -> String {
    let reg = ctx.config.image_registry.trim_end_matches('/');
    match c {
        Component::Etcd => format!("{reg}/etcd:{}", ctx.config.etcd_image_tag),
        _ => format!("{reg}/{}:{}", c.name(), ctx.config.kubernetes_version),
    }
}

struct Volume {
    name: String,
    path: PathBuf,
    kind: &'static str,
    read_only: bool,
}

/// The static pod manifest of `r`. Volumes: the data directory's `pki/` read-only (certificates are
/// symlinks through `pki/.store/<id>/current`, so the directory is mounted, not the files, and a
/// rotation is visible inside the pod), each kubeconfig and config file outside it, and etcd's data.
///
/// Probes: the API server refuses anonymous requests and etcd requires a client certificate, so both
/// get TCP probes (meshd's own supervision probes them over mTLS); the controller-manager and the
/// scheduler answer `/healthz` over HTTPS to anyone.
pub fn static_pod(ctx: &RenderContext, r: &Rendered) -> String {
    let c = r.component;
    let pki = ctx.path("pki");
    let mut vols = vec![Volume {
        name: "pki".into(),
        path: pki.clone(),
        kind: "Directory",
        read_only: true,
    }];
    for i in &r.inputs {
        if i.path.starts_with(&pki) {
            continue;
        }
        vols.push(Volume {
            name: format!("file-{}", vols.len()),
            path: i.path.clone(),
            kind: "File",
            read_only: true,
        });
    }
    for d in &r.state_dirs {
        vols.push(Volume {
            name: "data".into(),
            path: d.clone(),
            kind: "DirectoryOrCreate",
            read_only: false,
        });
    }
    if c == Component::KubeProxy {
        vols.push(Volume {
            name: "xtables-lock".into(),
            path: "/run/xtables.lock".into(),
            kind: "FileOrCreate",
            read_only: false,
        });
        vols.push(Volume {
            name: "lib-modules".into(),
            path: "/lib/modules".into(),
            kind: "Directory",
            read_only: true,
        });
    }
    let mut command = format!("    - {}\n", q(c.name()));
    for a in &r.args {
        command.push_str(&format!("    - {}\n", q(a)));
    }
    let probe = match &r.health {
        // The kubelet's HTTPS probes present no client certificate: an httpGet only where none is
        // needed (the controller-manager's and scheduler's /healthz); a TCP check otherwise.
        Health::Https(p) if p.client.is_none() => format!(
            "    livenessProbe:\n      httpGet:\n        host: {}\n        path: {}\n        port: {}\n        scheme: HTTPS\n      initialDelaySeconds: 10\n      periodSeconds: 10\n      failureThreshold: 8\n",
            q(&p.addr.ip().to_string()),
            q(&p.path),
            p.addr.port()
        ),
        Health::Https(p) => format!(
            "    livenessProbe:\n      tcpSocket:\n        host: {}\n        port: {}\n      initialDelaySeconds: 10\n      periodSeconds: 10\n      failureThreshold: 8\n",
            q(&p.addr.ip().to_string()),
            p.addr.port()
        ),
        Health::Process => String::new(),
    };
    let mounts: String = vols
        .iter()
        .map(|v| {
            format!(
                "    - name: {}\n      mountPath: {}\n      readOnly: {}\n",
                v.name,
                q(&v.path.to_string_lossy()),
                v.read_only
            )
        })
        .collect();
    let volumes: String = vols
        .iter()
        .map(|v| {
            format!(
                "  - name: {}\n    hostPath:\n      path: {}\n      type: {}\n",
                v.name,
                q(&v.path.to_string_lossy()),
                v.kind
            )
        })
        .collect();
    let env: String = if r.env.is_empty() {
        String::new()
    } else {
        let items: String = r
            .env
            .iter()
            .map(|(k, v)| format!("    - name: {}\n      value: {}\n", q(k), q(v)))
            .collect();
        format!("    env:\n{items}")
    };
    let security = if c == Component::KubeProxy {
        "    securityContext:\n      privileged: true\n"
    } else {
        ""
    };
    format!(
        "# Rendered by `meshd render`: every path is in meshd's data directory, every connection is TLS.\n\
         apiVersion: v1\n\
         kind: Pod\n\
         metadata:\n\
         \x20 name: {name}\n\
         \x20 namespace: kube-system\n\
         \x20 labels:\n\
         \x20   component: {name}\n\
         \x20   tier: {tier}\n\
         spec:\n\
         \x20 hostNetwork: true\n\
         \x20 priorityClassName: system-node-critical\n\
         \x20 securityContext:\n\
         \x20   seccompProfile:\n\
         \x20     type: RuntimeDefault\n\
         \x20 containers:\n\
         \x20 - name: {name}\n\
         \x20   image: {image}\n\
         \x20   imagePullPolicy: IfNotPresent\n\
         \x20   command:\n{command}{env}{probe}{security}\
         \x20   volumeMounts:\n{mounts}\
         \x20 volumes:\n{volumes}",
        name = c.name(),
        tier = if c.control_plane_only() {
            "control-plane"
        } else {
            "node"
        },
        image = q(&image(ctx, c)),
    )
}

/// Every file of `form` for the rendered components; `binary` names each component's binary for
/// systemd units.
pub fn files(
    ctx: &RenderContext,
    rendered: &[Rendered],
    form: Form,
    binary: impl Fn(Component) -> PathBuf,
) -> Vec<OutFile> {
    rendered
        .iter()
        .map(|r| {
            let c = r.component;
            match form {
                Form::StaticPods if c != Component::Kubelet => OutFile {
                    name: format!("{}.yaml", c.name()),
                    contents: static_pod(ctx, r),
                },
                _ => OutFile {
                    name: format!("{}.service", c.name()),
                    contents: systemd_unit(r, &binary(c)),
                },
            }
        })
        .collect()
}

/// What `meshd render` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RenderReport {
    /// Units and manifests, in the output directory.
    pub written: Vec<PathBuf>,
    /// The components' config files, in the data directory (the units and manifests reference them
    /// there).
    pub config_files: Vec<PathBuf>,
}

/// `meshd render`: renders every component of the node in `data_dir` as `form` into `out`, and
/// writes the components' config files (KubeletConfiguration, KubeProxyConfiguration) into the data
/// directory, where the rendered command lines point, and makes etcd's data directory (0700).
/// Binaries in systemd units: the configured path, else the one on `PATH`, else
/// `/usr/local/bin/<name>`.
pub fn render_to(data_dir: &Path, form: Form, out: &Path) -> anyhow::Result<RenderReport> {
    use anyhow::Context;
    let ctx = RenderContext::load(data_dir)?;
    let rendered = super::render::render_all(&ctx).map_err(|e| anyhow::anyhow!(e))?;
    let files = files(&ctx, &rendered, form, |c| {
        ctx.binary(c)
            .unwrap_or_else(|_| PathBuf::from(format!("/usr/local/bin/{}", c.name())))
    });
    let mut config_files = Vec::new();
    for r in &rendered {
        for f in &r.files {
            if let Some(parent) = f.path.parent() {
                pki::store::ensure_dir(parent)?;
            }
            pki::store::write_atomic(&f.path, f.contents.as_bytes(), f.mode)?;
            config_files.push(f.path.clone());
        }
        // etcd's data directory, 0700 as etcd 3.5 requires (a hostPath DirectoryOrCreate would
        // make it 0755).
        for d in &r.state_dirs {
            pki::store::ensure_dir(d)?;
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut written = Vec::new();
    for f in files {
        let p = out.join(&f.name);
        pki::store::write_atomic(&p, f.contents.as_bytes(), 0o644)?;
        written.push(p);
    }
    Ok(RenderReport {
        written,
        config_files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::components::render::{render, render_all, tests::ctx};

    #[test]
    fn systemd_words_are_escaped() {
        assert_eq!(systemd_word("--a=b,c"), "--a=b,c");
        assert_eq!(systemd_word("--p=/x y/z"), "\"--p=/x y/z\"");
        assert_eq!(systemd_word("100%"), "100%%");
        assert_eq!(systemd_word("$HOME"), "$$HOME");
    }

    #[test]
    fn the_apiserver_unit_runs_after_etcd_with_every_flag() {
        let c = ctx();
        let r = render(&c, Component::KubeApiserver).unwrap();
        let u = systemd_unit(&r, Path::new("/usr/local/bin/kube-apiserver"));
        assert!(
            u.contains("After=network-online.target etcd.service\n"),
            "{u}"
        );
        assert!(u.contains(
            "ExecStart=/usr/local/bin/kube-apiserver \\\n  --advertise-address=192.0.2.10"
        ));
        for a in &r.args {
            assert!(u.contains(&format!("  {a}")), "{a} missing");
        }
    }

    #[test]
    fn static_pods_mount_pki_read_only_and_probe_without_anonymous_access() {
        let c = ctx();
        let all = render_all(&c).unwrap();
        let out = files(&c, &all, Form::StaticPods, |c| {
            PathBuf::from(format!("/usr/bin/{}", c.name()))
        });
        let names: Vec<_> = out.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "etcd.yaml",
                "kube-apiserver.yaml",
                "kube-controller-manager.yaml",
                "kube-scheduler.yaml",
                "kubelet.service",
                "kube-proxy.yaml"
            ]
        );
        let etcd = &out[0].contents;
        assert!(etcd.contains("      path: \"/var/lib/meshd/pki\"\n      type: Directory\n"));
        assert!(
            etcd.contains("      tcpSocket:\n        host: \"127.0.0.1\"\n        port: 2379\n")
        );
        assert!(etcd.contains("    - \"--client-cert-auth=true\"\n"));
        let kcm = &out[2].contents;
        assert!(kcm.contains("        scheme: HTTPS\n"));
        assert!(kcm.contains(
            "      path: \"/var/lib/meshd/controller-manager.conf\"\n      type: File\n"
        ));
    }
}
