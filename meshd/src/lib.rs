//! meshd: one per-node daemon for an encrypted, authenticated Kubernetes cluster.
//!
//! Layout:
//! * [`cli`]: the command-line interface (clap derive), one `Subcommand` enum.
//! * [`settings`]: the cluster settings persisted in the data directory (`meshd.json`).
//! * [`material`]: reading what the data directory holds for each inventory entry.
//! * [`init`]: `meshd init`, creating or completing a control-plane inventory.
//! * [`certs`]: `meshd certs check`.
//! * [`rotate`]: certificate rotation (`meshd rotate` and the daemon's planner).
//! * [`components`]: the Kubernetes components: rendering with TLS everywhere, systemd units and
//!   static pods (`meshd render`), and their supervision by `meshd run`.
//! * [`recover`]: the start-up check of the pair store after a crash (falls back to the previous pair).
//!
//! The binary (`main.rs`) only wires these together; the PKI itself lives in the `pki` crate.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod components;
pub mod debug;
pub mod init;
pub mod join;
pub mod leases;
pub mod material;
pub mod mesh;
pub mod metrics;
pub mod recover;
pub mod registry;
pub mod rejoin;
pub mod renew_pending;
pub mod rotate;
pub mod run;
pub mod settings;
pub mod status;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod wgkey;
