//! Kubeconfig rendering (what kubectl and the components accept) and the small reader `certs check`
//! uses to find the client certificate a kubeconfig holds.
//!
//! Scalars are written as double-quoted strings with JSON escaping, which YAML reads identically, so no
//! value (a cluster name, a path) can break the document.

use std::path::{Path, PathBuf};

use base64::Engine;

use crate::error::{PkiError, Result};
use crate::keys::SecretPem;

/// Where a PEM object comes from in a kubeconfig.
#[derive(Clone, Debug)]
pub enum PemSource<'a> {
    /// Embedded as `*-data` (base64 of the PEM): kubeconfigs handed to people.
    Embedded(&'a str),
    /// Referenced by path: kubeconfigs used by components, so a renewal needs no rewrite.
    File(&'a Path),
}

/// The client credential of a kubeconfig user.
#[derive(Clone, Debug)]
pub enum ClientCredential<'a> {
    /// Certificate and key embedded.
    Embedded {
        /// Certificate PEM.
        cert_pem: &'a str,
        /// Key PEM.
        key_pem: &'a SecretPem,
    },
    /// Certificate and key by path (they may be the same file holding both).
    Files {
        /// Certificate file.
        cert: &'a Path,
        /// Key file.
        key: &'a Path,
    },
}

/// One kubeconfig: a cluster, a user, a context joining them.
#[derive(Clone, Debug)]
pub struct KubeconfigSpec<'a> {
    /// Cluster name (`kubernetes` by default).
    pub cluster_name: &'a str,
    /// API server URL.
    pub server: &'a str,
    /// The CA that signs the API server certificate.
    pub ca: PemSource<'a>,
    /// The user name (the certificate's CN, by convention).
    pub user: &'a str,
    /// The user's client credential.
    pub credential: ClientCredential<'a>,
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// Renders a kubeconfig. The result may hold a private key, hence [`SecretPem`].
pub fn render(spec: &KubeconfigSpec<'_>) -> SecretPem {
    let context = format!("{}@{}", spec.user, spec.cluster_name);
    let ca_line = match &spec.ca {
        PemSource::Embedded(pem) => format!("certificate-authority-data: {}", q(&b64(pem))),
        PemSource::File(p) => format!("certificate-authority: {}", q(&p.to_string_lossy())),
    };
    let cred = match &spec.credential {
        ClientCredential::Embedded { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            q(&b64(cert_pem)),
            q(&b64(key_pem.expose()))
        ),
        ClientCredential::Files { cert, key } => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            q(&cert.to_string_lossy()),
            q(&key.to_string_lossy())
        ),
    };
    SecretPem::new(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    {ca_line}\n    server: {server}\ncontexts:\n- name: {ctx}\n  context:\n    cluster: {cluster}\n    user: {user}\ncurrent-context: {ctx}\npreferences: {{}}\nusers:\n- name: {user}\n  user:\n{cred}",
        cluster = q(spec.cluster_name),
        server = q(spec.server),
        ctx = q(&context),
        user = q(spec.user),
    ))
}

/// The client certificate a kubeconfig holds for its (first) user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCertRef {
    /// Embedded PEM.
    Embedded(String),
    /// A file path (resolved against the kubeconfig's directory when relative).
    File(PathBuf),
}

/// Finds the first user's client certificate in a kubeconfig written in block style (as kubectl,
/// kubeadm and meshd write them).
pub fn client_cert_of(kubeconfig: &str, kubeconfig_path: &Path) -> Result<ClientCertRef> {
    let bad = |reason: &str| PkiError::bad_file(kubeconfig_path, reason.to_string());
    for line in kubeconfig.lines() {
        let t = line.trim_start();
        if let Some(v) = t.strip_prefix("client-certificate-data:") {
            let v = scalar(v).ok_or_else(|| bad("unreadable client-certificate-data"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .map_err(|e| bad(&format!("client-certificate-data is not base64: {e}")))?;
            let pem = String::from_utf8(bytes)
                .map_err(|_| bad("client-certificate-data is not PEM text"))?;
            return Ok(ClientCertRef::Embedded(pem));
        }
        if let Some(v) = t.strip_prefix("client-certificate:") {
            let v = scalar(v).ok_or_else(|| bad("unreadable client-certificate"))?;
            let p = PathBuf::from(v);
            let p = if p.is_relative() {
                kubeconfig_path.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p
            };
            return Ok(ClientCertRef::File(p));
        }
    }
    Err(bad(
        "no client-certificate or client-certificate-data in the kubeconfig",
    ))
}

/// The first user's embedded client key (`client-key-data`), if the kubeconfig embeds one.
pub fn client_key_data_of(kubeconfig: &str, kubeconfig_path: &Path) -> Result<Option<SecretPem>> {
    for line in kubeconfig.lines() {
        if let Some(v) = line.trim_start().strip_prefix("client-key-data:") {
            let bad = |reason: &str| PkiError::bad_file(kubeconfig_path, reason.to_string());
            let v = zeroize::Zeroizing::new(
                scalar(v).ok_or_else(|| bad("unreadable client-key-data"))?,
            );
            let bytes = zeroize::Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .map_err(|_| bad("client-key-data is not base64"))?,
            );
            let text =
                std::str::from_utf8(&bytes).map_err(|_| bad("client-key-data is not PEM text"))?;
            return Ok(Some(SecretPem::new(text.to_owned())));
        }
    }
    Ok(None)
}

fn scalar(v: &str) -> Option<String> {
    let v = v.trim();
    if v.starts_with('"') {
        serde_json::from_str::<String>(v).ok()
    } else if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        Some(inner.replace("''", "'"))
    } else if v.is_empty() {
        None
    } else {
        Some(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_reads_back_embedded_and_file_forms() {
        let key =
            SecretPem::new("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n".into());
        let spec = KubeconfigSpec {
            cluster_name: "kubernetes",
            server: "https://10.0.0.1:6443",
            ca: PemSource::Embedded("CA"),
            user: "kubernetes-admin",
            credential: ClientCredential::Embedded {
                cert_pem: "CERT",
                key_pem: &key,
            },
        };
        let out = render(&spec);
        assert!(out
            .expose()
            .contains("current-context: \"kubernetes-admin@kubernetes\""));
        assert_eq!(
            client_cert_of(out.expose(), Path::new("/x/admin.conf")).unwrap(),
            ClientCertRef::Embedded("CERT".into())
        );
        let spec = KubeconfigSpec {
            credential: ClientCredential::Files {
                cert: Path::new("pki/a \"b\".pem"),
                key: Path::new("pki/a.pem"),
            },
            ..spec
        };
        let out = render(&spec);
        assert_eq!(
            client_cert_of(out.expose(), Path::new("/x/c.conf")).unwrap(),
            ClientCertRef::File(PathBuf::from("/x/pki/a \"b\".pem"))
        );
        assert!(client_cert_of("apiVersion: v1\n", Path::new("/x")).is_err());
    }
}
