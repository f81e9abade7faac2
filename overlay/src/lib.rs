//! meshd's overlay: flannel-compatible network configuration, subnet arithmetic and the `subnet.env`
//! format (this file, pure: values in, values out), the userspace WireGuard device ([`wg`]) and the
//! interface plumbing around it ([`link`]).
//!
//! Formats follow flannel so that flannel-style tooling reads meshd's state:
//! * network config at `<prefix>/config` ([`NetworkConfig`]),
//! * lease keys `<prefix>/subnets/<ip>-<len>` ([`lease_key`]),
//! * `/run/flannel/subnet.env` ([`subnet_env`]).
//!
//! Modules:
//! * [`wg`]: WireGuard keys (base64 and hex), the cross-platform UAPI protocol and its client, and
//!   [`wg::Device`] — boringtun on a TUN interface behind meshd's own UAPI server.
//! * [`link`]: MTU, addresses, link state and routes through iproute2's `ip`; underlay MTU detection.
// `unsafe` only in `wg::fast::sys` (TUN ioctls, UDP GSO/GRO control messages), which allows it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod link;
pub mod wg;

use std::net::Ipv4Addr;

pub mod cni;
pub mod peers;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Default etcd prefix, as flannel's.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// Errors of the overlay crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverlayError {
    /// The network configuration is inconsistent.
    #[error("invalid network config: {0}")]
    Config(String),
}

/// The WireGuard backend section of the network config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Always `wireguard` for meshd.
    #[serde(rename = "Type")]
    pub kind: String,
    /// UDP port.
    #[serde(rename = "ListenPort", default = "default_port")]
    pub listen_port: u16,
    /// Persistent keepalive, seconds (0 = off).
    #[serde(rename = "PersistentKeepaliveInterval", default)]
    pub persistent_keepalive_interval: u16,
    /// Tunnel MTU (0 = derive from the underlay).
    #[serde(rename = "MTU", default)]
    pub mtu: u16,
}

fn default_port() -> u16 {
    51820
}

/// flannel's network config (`<prefix>/config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The cluster (pod) network.
    #[serde(rename = "Network")]
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet.
    #[serde(rename = "SubnetLen")]
    pub subnet_len: u8,
    /// First subnet that may be leased.
    #[serde(rename = "SubnetMin")]
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased.
    #[serde(rename = "SubnetMax")]
    pub subnet_max: Ipv4Addr,
    /// The backend.
    #[serde(rename = "Backend")]
    pub backend: Backend,
}

impl NetworkConfig {
    /// The config flannel would derive for `network`: SubnetLen 24 for a /22 or shorter network,
    /// else prefix + 2 (at most 30); SubnetMin skips the first subnet; SubnetMax is the last one.
    pub fn with_defaults(network: Ipv4Net, backend: Backend) -> Result<Self, OverlayError> {
        let network = network.trunc();
        let subnet_len = if network.prefix_len() <= 22 {
            24
        } else {
            network.prefix_len() + 2
        };
        if subnet_len > 30 {
            return Err(OverlayError::Config(format!(
                "network {network} is too small for per-node subnets (subnet length would be /{subnet_len}, at most /30)"
            )));
        }
        let size = 1u32 << (32 - subnet_len);
        let base = u32::from(network.network());
        let last = u32::from(network.broadcast()) & !(size - 1);
        let cfg = NetworkConfig {
            network,
            subnet_len,
            subnet_min: Ipv4Addr::from(base + size),
            subnet_max: Ipv4Addr::from(last),
            backend,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the config's internal consistency.
    pub fn validate(&self) -> Result<(), OverlayError> {
        let err = |s: String| Err(OverlayError::Config(s));
        if self.subnet_len < self.network.prefix_len() || self.subnet_len > 30 {
            return err(format!(
                "SubnetLen /{} must be between the network's /{} and /30",
                self.subnet_len,
                self.network.prefix_len()
            ));
        }
        for (name, a) in [
            ("SubnetMin", self.subnet_min),
            ("SubnetMax", self.subnet_max),
        ] {
            if !self.network.contains(&a) {
                return err(format!("{name} {a} is outside {}", self.network));
            }
            let size = 1u32 << (32 - self.subnet_len);
            if u32::from(a) % size != 0 {
                return err(format!("{name} {a} is not aligned to /{}", self.subnet_len));
            }
        }
        if u32::from(self.subnet_min) > u32::from(self.subnet_max) {
            return err(format!(
                "SubnetMin {} is above SubnetMax {}",
                self.subnet_min, self.subnet_max
            ));
        }
        if self.backend.kind != "wireguard" {
            return err(format!(
                "backend {:?} is not supported (meshd only runs wireguard)",
                self.backend.kind
            ));
        }
        Ok(())
    }

    /// How many subnets may be leased.
    pub fn capacity(&self) -> u32 {
        let size = 1u32 << (32 - self.subnet_len);
        (u32::from(self.subnet_max) - u32::from(self.subnet_min)) / size + 1
    }

    /// The `i`-th leasable subnet (0-based), if any.
    pub fn nth_subnet(&self, i: u32) -> Option<Ipv4Net> {
        if i >= self.capacity() {
            return None;
        }
        let size = 1u32 << (32 - self.subnet_len);
        let a = u32::from(self.subnet_min).checked_add(i.checked_mul(size)?)?;
        Ipv4Net::new(Ipv4Addr::from(a), self.subnet_len).ok()
    }
}

/// No free subnet is left.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free subnet left: all {capacity} /{subnet_len} subnets of {network} are leased (widen the cluster CIDR or remove nodes)")]
pub struct Exhausted {
    /// The network.
    pub network: Ipv4Net,
    /// Prefix length of node subnets.
    pub subnet_len: u8,
    /// How many subnets exist.
    pub capacity: u32,
}

impl NetworkConfig {
    /// Whether `s` is a subnet this config may lease (right length, aligned, within min..=max).
    pub fn is_leasable(&self, s: Ipv4Net) -> bool {
        s.prefix_len() == self.subnet_len
            && s.addr() == s.network()
            && u32::from(s.network()) >= u32::from(self.subnet_min)
            && u32::from(s.network()) <= u32::from(self.subnet_max)
    }

    /// Chooses a subnet that is not `taken`: `preferred` when it is leasable and free (a node
    /// returning to the subnet in its subnet.env), otherwise the `seed`-th free one (callers pass a
    /// random seed so that concurrent allocators rarely collide). Pure.
    pub fn choose_subnet(
        &self,
        taken: &std::collections::BTreeSet<Ipv4Net>,
        preferred: Option<Ipv4Net>,
        seed: u64,
    ) -> Result<Ipv4Net, Exhausted> {
        if let Some(p) = preferred {
            if self.is_leasable(p) && !taken.contains(&p) {
                return Ok(p);
            }
        }
        let cap = self.capacity();
        let used = taken.iter().filter(|t| self.is_leasable(**t)).count() as u32;
        let free = cap.saturating_sub(used);
        if free == 0 {
            return Err(Exhausted {
                network: self.network,
                subnet_len: self.subnet_len,
                capacity: cap,
            });
        }
        let mut k = (seed % u64::from(free)) as u32;
        for i in 0..cap {
            if let Some(s) = self.nth_subnet(i) {
                if !taken.contains(&s) {
                    if k == 0 {
                        return Ok(s);
                    }
                    k -= 1;
                }
            }
        }
        Err(Exhausted {
            network: self.network,
            subnet_len: self.subnet_len,
            capacity: cap,
        })
    }
}

/// The lease key of `subnet` under `prefix`: `<prefix>/subnets/10.244.5.0-24`.
pub fn lease_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{}/subnets/{}-{}",
        prefix.trim_end_matches('/'),
        subnet.network(),
        subnet.prefix_len()
    )
}

/// Parses a lease key back into its subnet.
pub fn parse_lease_key(prefix: &str, key: &str) -> Option<Ipv4Net> {
    let rest = key
        .strip_prefix(prefix.trim_end_matches('/'))?
        .strip_prefix("/subnets/")?;
    let (ip, len) = rest.split_once('-')?;
    let net = Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (net.network() == net.addr()).then_some(net)
}

/// The content of flannel's `subnet.env` for a node holding `subnet`.
/// `FLANNEL_SUBNET` is the first usable address of the lease with the lease's prefix length.
pub fn subnet_env(network: Ipv4Net, subnet: Ipv4Net, mtu: u16, ipmasq: bool) -> String {
    let first = Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1));
    format!(
        "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ipmasq}\n",
        subnet.prefix_len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wg() -> Backend {
        Backend {
            kind: "wireguard".into(),
            listen_port: 51820,
            persistent_keepalive_interval: 25,
            mtu: 1420,
        }
    }

    #[test]
    fn flannel_defaults() {
        let c = NetworkConfig::with_defaults("10.244.0.0/16".parse().unwrap(), wg()).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, "10.244.1.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.subnet_max, "10.244.255.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.capacity(), 255);
        assert_eq!(c.nth_subnet(4).unwrap().to_string(), "10.244.5.0/24");
        assert!(c.nth_subnet(255).is_none());
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["Network"], "10.244.0.0/16");
        assert_eq!(j["SubnetMin"], "10.244.1.0");
        assert_eq!(j["Backend"]["Type"], "wireguard");
        let c = NetworkConfig::with_defaults("10.0.0.0/24".parse().unwrap(), wg()).unwrap();
        assert_eq!(c.subnet_len, 26);
        assert!(NetworkConfig::with_defaults("10.0.0.0/29".parse().unwrap(), wg()).is_err());
    }

    #[test]
    fn lease_keys_and_subnet_env() {
        let n: Ipv4Net = "10.244.5.0/24".parse().unwrap();
        let k = lease_key(DEFAULT_PREFIX, n);
        assert_eq!(k, "/coreos.com/network/subnets/10.244.5.0-24");
        assert_eq!(parse_lease_key(DEFAULT_PREFIX, &k), Some(n));
        assert_eq!(
            parse_lease_key(DEFAULT_PREFIX, "/coreos.com/network/subnets/10.244.5.7-24"),
            None
        );
        assert_eq!(
            parse_lease_key(DEFAULT_PREFIX, "/other/subnets/10.244.5.0-24"),
            None
        );
        assert_eq!(
            subnet_env("10.244.0.0/16".parse().unwrap(), n, 1420, true),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=true\n"
        );
    }

    proptest::proptest! {
        #[test]
        fn allocation_never_overlaps_stays_in_bounds_and_reports_exhaustion(
            prefix in 16u8..=26,
            seeds in proptest::collection::vec(proptest::prelude::any::<u64>(), 1..300),
            prefer in proptest::option::of(0u32..400),
        ) {
            let net: Ipv4Net = format!("10.244.0.0/{prefix}").parse().unwrap();
            let cfg = NetworkConfig::with_defaults(net, wg()).unwrap();
            let mut taken = std::collections::BTreeSet::new();
            for (i, seed) in seeds.iter().enumerate() {
                let preferred = prefer.and_then(|p| cfg.nth_subnet(p));
                match cfg.choose_subnet(&taken, preferred, *seed) {
                    Ok(s) => {
                        proptest::prop_assert!(cfg.is_leasable(s), "{s} not leasable");
                        proptest::prop_assert!(cfg.network.contains(&s.network()));
                        proptest::prop_assert!(u32::from(s.network()) >= u32::from(cfg.subnet_min));
                        proptest::prop_assert!(!taken.iter().any(|t: &Ipv4Net| t.contains(&s.network()) || s.contains(&t.network())), "{s} overlaps");
                        taken.insert(s);
                    }
                    Err(e) => {
                        proptest::prop_assert_eq!(taken.len() as u32, cfg.capacity(), "exhausted early at {}", i);
                        proptest::prop_assert!(e.to_string().contains("no free subnet"));
                    }
                }
            }
        }
    }

    #[test]
    fn preferred_subnet_is_taken_back_only_when_free() {
        let cfg = NetworkConfig::with_defaults("10.244.0.0/16".parse().unwrap(), wg()).unwrap();
        let p: Ipv4Net = "10.244.7.0/24".parse().unwrap();
        let mut taken = std::collections::BTreeSet::new();
        assert_eq!(cfg.choose_subnet(&taken, Some(p), 3).unwrap(), p);
        taken.insert(p);
        assert_ne!(cfg.choose_subnet(&taken, Some(p), 3).unwrap(), p);
        // A preferred subnet outside the leasable range is ignored.
        let outside: Ipv4Net = "10.244.0.0/24".parse().unwrap();
        assert_ne!(
            cfg.choose_subnet(&taken, Some(outside), 0).unwrap(),
            outside
        );
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        let mut c = NetworkConfig::with_defaults("10.244.0.0/16".parse().unwrap(), wg()).unwrap();
        c.subnet_min = "10.245.0.0".parse().unwrap();
        assert!(c.validate().is_err());
        let mut c = NetworkConfig::with_defaults("10.244.0.0/16".parse().unwrap(), wg()).unwrap();
        c.subnet_min = "10.244.1.7".parse().unwrap();
        assert!(c.validate().is_err());
        let mut c = NetworkConfig::with_defaults("10.244.0.0/16".parse().unwrap(), wg()).unwrap();
        c.backend.kind = "vxlan".into();
        assert!(c.validate().is_err());
    }
}
