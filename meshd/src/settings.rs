//! The cluster settings `meshd init` records in `<data-dir>/meshd.json`, in a versioned format.

use std::path::{Path, PathBuf};

use pki::inventory::ClusterSettings;
use serde::{Deserialize, Serialize};

/// File name of the settings inside the data directory.
pub const SETTINGS_FILE: &str = "meshd.json";
/// Current format version.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    cluster: ClusterSettings,
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
}

/// Path of the settings file in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(SETTINGS_FILE)
}

/// Reads the settings; `Ok(None)` when the data directory has none yet.
pub fn load(data_dir: &Path) -> Result<Option<ClusterSettings>, SettingsError> {
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
    let d: OnDisk = serde_json::from_value(v).map_err(|e| SettingsError::Corrupt {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some(d.cluster))
}

/// Writes the settings atomically.
pub fn save(data_dir: &Path, s: &ClusterSettings) -> Result<(), SettingsError> {
    let d = OnDisk {
        version: FORMAT_VERSION,
        cluster: s.clone(),
    };
    let mut text = serde_json::to_string_pretty(&d).map_err(|e| SettingsError::Corrupt {
        path: path(data_dir),
        reason: e.to_string(),
    })?;
    text.push('\n');
    pki::store::write_atomic(&path(data_dir), text.as_bytes(), 0o600)?;
    Ok(())
}
