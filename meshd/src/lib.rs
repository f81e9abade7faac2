//! meshd: one per-node daemon for an encrypted, authenticated Kubernetes cluster.
//!
//! Layout:
//! * [`cli`]: the command-line interface (clap derive), one `Subcommand` enum.
//! * [`settings`]: the cluster settings persisted in the data directory (`meshd.json`).
//! * [`material`]: reading what the data directory holds for each inventory entry.
//! * [`init`]: `meshd init`, creating or completing a control-plane inventory.
//! * [`certs`]: `meshd certs check`.
//!
//! The binary (`main.rs`) only wires these together; the PKI itself lives in the `pki` crate.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod init;
pub mod join;
pub mod leases;
pub mod material;
pub mod mesh;
pub mod metrics;
pub mod registry;
pub mod run;
pub mod settings;
pub mod status;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod wgkey;
