//! What `meshd init` or `meshd join` records in `<data-dir>/meshd.json`, in a versioned format: the
//! node's role, the cluster settings (control plane), the store (control plane), and what a joined
//! node got (its name, server, subnet, network).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use pki::inventory::ClusterSettings;
use serde::{Deserialize, Serialize};

/// File name of the settings inside the data directory.
pub const SETTINGS_FILE: &str = "meshd.json";
/// Current format version.
pub const FORMAT_VERSION: u32 = 1;

/// The node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Holds the CAs and serves the meshd API (`meshd init`).
    #[default]
    ControlPlane,
    /// Joined through the API (`meshd join`).
    Node,
}

/// Which store holds the cluster state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// A single-file database in the data directory (`state.redb`).
    #[default]
    Embedded,
    /// etcd over mTLS with meshd's etcd client certificate.
    Etcd,
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Etcd => "etcd",
        })
    }
}

/// The store configuration of a control-plane node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StoreConfig {
    /// Backend.
    pub kind: StoreKind,
    /// etcd endpoints (`https://host:port`).
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of the flannel-compatible network state.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    overlay::DEFAULT_PREFIX.to_string()
}

/// What a joined node was given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinedNode {
    /// Its name.
    pub name: String,
    /// The meshd API it joined (`host:port`).
    pub server: String,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// Its WireGuard endpoint.
    pub endpoint: SocketAddr,
    /// Its pod subnet.
    pub subnet: Ipv4Net,
    /// The network configuration.
    pub network: overlay::NetworkConfig,
    /// The API server URL.
    pub apiserver_url: String,
    /// The cluster name.
    pub cluster_name: String,
}

/// Everything in `meshd.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshdConfig {
    /// Format version.
    pub version: u32,
    /// Role.
    #[serde(default)]
    pub role: Role,
    /// Cluster settings (control plane).
    #[serde(default)]
    pub cluster: Option<ClusterSettings>,
    /// Store (control plane).
    #[serde(default)]
    pub store: StoreConfig,
    /// What a joined node got.
    #[serde(default)]
    pub joined: Option<JoinedNode>,
    /// Commands run after an inventory entry renewed (`meshd rotate` and the daemon), by entry id:
    /// `{"apiserver": "systemctl restart kube-apiserver"}`. Run with `sh -c`; see `rotate`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hooks: std::collections::BTreeMap<String, String>,
}

/// Errors reading or writing the settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read or written.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The file is not valid JSON of the expected shape.
    #[error("{path}: corrupt settings file: {reason}; fix or restore it (meshd never starts from empty over a corrupt file)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The file was written by a newer meshd.
    #[error("{path}: settings format version {found} is newer than this meshd understands ({FORMAT_VERSION}); upgrade meshd")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The data directory has no settings.
    #[error("{0}: no meshd.json: run `meshd init` (control plane) or `meshd join` (node) first")]
    Missing(PathBuf),
}

/// Path of the settings file in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(SETTINGS_FILE)
}

/// Reads `meshd.json`; `Ok(None)` when the data directory has none yet.
pub fn load_config(data_dir: &Path) -> Result<Option<MeshdConfig>, SettingsError> {
    let p = path(data_dir);
    if !p.exists() {
        return Ok(None);
    }
    let text = pki::store::read_text(&p)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| SettingsError::Corrupt {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    let found = v.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if found > FORMAT_VERSION {
        return Err(SettingsError::TooNew { path: p, found });
    }
    let c: MeshdConfig = serde_json::from_value(v).map_err(|e| SettingsError::Corrupt {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some(c))
}

/// Reads `meshd.json`, which must exist.
pub fn require_config(data_dir: &Path) -> Result<MeshdConfig, SettingsError> {
    load_config(data_dir)?.ok_or_else(|| SettingsError::Missing(data_dir.to_path_buf()))
}

/// The control-plane cluster settings, if this is a control-plane data directory.
pub fn load(data_dir: &Path) -> Result<Option<ClusterSettings>, SettingsError> {
    Ok(load_config(data_dir)?.and_then(|c| c.cluster))
}

/// Writes `meshd.json` atomically.
pub fn save_config(data_dir: &Path, c: &MeshdConfig) -> Result<(), SettingsError> {
    let mut text = serde_json::to_string_pretty(c).map_err(|e| SettingsError::Corrupt {
        path: path(data_dir),
        reason: e.to_string(),
    })?;
    text.push('\n');
    pki::store::write_atomic(&path(data_dir), text.as_bytes(), 0o600)?;
    Ok(())
}
