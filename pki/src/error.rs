//! The one error type of the `pki` crate.

use std::path::PathBuf;

/// Everything that can go wrong in the PKI engine.
///
/// Messages say what was wrong and, where there is one, what to do about it. Variants that concern a
/// file carry its path.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file exists but its content is unusable (corrupt PEM, wrong object type, ...).
    #[error("{path}: {reason}")]
    BadFile {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A private key file is readable by group or others.
    #[error(
        "{path}: private key is accessible by group or others (mode {mode:04o}); \
         refusing to use it: restrict it with `chmod 600 {path}` and check who may have read it"
    )]
    InsecureKeyMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A private key file is owned by another user than the one running meshd.
    #[error("{path}: private key is owned by uid {owner}, but meshd runs as uid {expected}; refusing to use it")]
    KeyOwner {
        /// The key file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The uid meshd runs as.
        expected: u32,
    },
    /// A certificate and the private key stored with it do not belong together.
    #[error("{what}: the certificate's public key does not match the private key")]
    KeyMismatch {
        /// Which pair (usually a path).
        what: String,
    },
    /// A PEM or DER object could not be parsed.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A certificate signing request is malformed, oversized, badly signed or uses a refused key.
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    /// A request asked for something the issuing policy does not allow.
    #[error("certificate signing request refused: {field}: {reason}")]
    PolicyViolation {
        /// The refused field (`subject CN`, `subject O`, `DNS SAN`, `IP SAN`, `public key`, ...).
        field: &'static str,
        /// What was requested and what is allowed.
        reason: String,
    },
    /// The certificate authority cannot be used for the operation.
    #[error("certificate authority {name}: {reason}")]
    Ca {
        /// The CA concerned.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Key generation or signing failed inside the crypto library.
    #[error("crypto operation failed: {0}")]
    Crypto(String),
    /// A setting or argument is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The setting concerned.
        what: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

/// Result alias for the crate.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

impl PkiError {
    /// An [`PkiError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PkiError::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`PkiError::BadFile`] for `path`.
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        PkiError::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn crypto(e: impl std::fmt::Display) -> Self {
        PkiError::Crypto(e.to_string())
    }
}
