//! meshd's PKI engine, pure at its core.
//!
//! Layout:
//! * [`keys`]: private keys and the [`keys::SecretPem`] newtype that zeroizes and never prints them.
//! * [`ca`]: certificate authorities, leaf profiles, issuing.
//! * [`csr`]: PKCS#10 parsing (self-signature verified, size-capped) and signing under a policy.
//! * [`inspect`]: what a certificate says (x509-parser), chain and key-match checks.
//! * [`renewal`]: the pure renewal planner.
//! * [`kubeconfig`]: kubeconfig rendering.
//! * [`proof`]: proof of possession of a registered key (signatures for `meshd join --rejoin`).
//! * [`inventory`]: the rows of the Kubernetes certificate inventory, in kubeadm's layout.
//! * [`store`]: the atomic file store (the only module that touches the file system).
//! * [`failpoints`]: named crash points in every write of the store (`failpoints` feature, tests only).
//! * [`time`]: RFC 3339 and duration helpers.
//!
//! One crypto provider, *ring*, serves rcgen, x509-parser's signature checks and (in the binaries)
//! rustls.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ca;
pub mod csr;
pub mod error;
pub mod failpoints;
pub mod inspect;
pub mod inventory;
pub mod keys;
pub mod kubeconfig;
pub mod proof;
pub mod renewal;
pub mod store;
pub mod time;

pub use error::{PkiError, Result};
