//! The userspace WireGuard device and its configuration protocol.
//!
//! * [`key`]: public, private and preshared keys; base64 (meshd's files and registry) and hex (UAPI).
//! * [`uapi`]: the cross-platform configuration protocol — pure parsing/formatting of `get`/`set`,
//!   and the [`Uapi`] client for `/var/run/wireguard/<ifname>.sock`.
//! * [`device`]: [`Device`], the userspace device on a TUN interface, fronted by our own UAPI
//!   server, with enlarged UDP socket buffers ([`sockbuf`]); its data path is [`fast`] (meshd's,
//!   with TUN/UDP offloads, around boringtun's `noise::Tunn`) or boringtun 0.7's device loop (whose
//!   UAPI defects the server works around).
//! * [`fast`]: the fast data path and its pure packet work ([`fast::offload`]).
//!
//! Linux only (TUN, `/proc`, `pidfd_getfd`).

pub mod device;
pub mod fast;
pub mod key;
pub mod sockbuf;
pub mod uapi;

use std::path::PathBuf;

pub use device::{Device, DeviceConfig, WgEngine};
pub use key::{PresharedKey, PrivateKey, PublicKey};
pub use sockbuf::BufferReport;
pub use uapi::{DeviceInfo, DeviceUpdate, PeerInfo, PeerUpdate, Uapi};

use crate::link::LinkError;

/// Errors of the WireGuard layer.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// A key is not in the expected encoding (the message never repeats a secret).
    #[error("invalid key: {0}")]
    Key(String),
    /// UAPI text that does not follow the protocol.
    #[error("WireGuard UAPI protocol error: {0}")]
    Protocol(String),
    /// An I/O error on a path (the UAPI socket, the socket directory).
    #[error("{}: {source}", path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The device answered a request with a non-zero errno.
    #[error("the WireGuard device refused `{op}`: errno {errno} ({})", std::io::Error::from_raw_os_error(*errno))]
    Errno {
        /// `get` or `set`.
        op: &'static str,
        /// The errno value.
        errno: i32,
    },
    /// boringtun could not create or run the device.
    #[error("WireGuard device {name}: {message}")]
    Device {
        /// The interface name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// An interface of that name already exists in this network namespace.
    #[error("interface {0} already exists: remove it or choose another name")]
    InterfaceExists(String),
    /// A live WireGuard daemon already answers on the UAPI socket of that name.
    #[error(
        "another WireGuard device answers on {}: {} is shared by all network namespaces, \
         so every device on this machine needs its own interface name",
        path.display(), uapi::SOCKET_DIR
    )]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Interface plumbing failed.
    #[error(transparent)]
    Link(#[from] LinkError),
}
