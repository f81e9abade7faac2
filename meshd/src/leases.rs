//! Subnet leases, as flannel does them: `<prefix>/subnets/<ip>-<len>` created with a store lease (TTL
//! 24 h) in a create-if-absent transaction, retried on conflict; acquire order: the lease this node
//! already holds, then the subnet it had before (its subnet.env) if still free, then a random free
//! one; renewal before expiry; expired leases reclaimed by the store; a subnet is never held twice,
//! and a node returning after its lease expired never takes back a subnet given to someone else.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;
use overlay::NetworkConfig;
use serde::{Deserialize, Serialize};

use crate::store::{KeyValue, Store, StoreError};

/// TTL of a subnet lease (flannel's).
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// flannel's lease value, field order as flannel writes it, plus meshd's own fields (ignored by
/// flannel): the node name and its WireGuard endpoint with its port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// The node's public IPv4 address.
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// The node's public IPv6 address.
    #[serde(rename = "PublicIPv6")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Always `wireguard`.
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    /// The WireGuard public key.
    #[serde(rename = "BackendData")]
    pub backend_data: BackendData,
    /// meshd's additions.
    #[serde(rename = "meshd", default, skip_serializing_if = "Option::is_none")]
    pub meshd: Option<MeshdLease>,
}

/// flannel's `BackendData` for the WireGuard backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendData {
    /// Base64 X25519 public key.
    #[serde(rename = "PublicKey")]
    pub public_key: String,
}

/// meshd's fields in a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshdLease {
    /// The node holding the lease.
    pub node: String,
    /// Its WireGuard endpoint.
    pub endpoint: SocketAddr,
}

impl LeaseAttrs {
    fn node(&self) -> Option<&str> {
        self.meshd.as_ref().map(|m| m.node.as_str())
    }
}

/// The lease attributes of node `name`: its public IPv4 (the endpoint's, else its first IPv4
/// address), IPv6, WireGuard key and endpoint.
pub fn attrs_for(
    name: &str,
    addresses: &[std::net::IpAddr],
    key: &str,
    endpoint: SocketAddr,
) -> LeaseAttrs {
    let v4 = match endpoint.ip() {
        std::net::IpAddr::V4(a) => Some(a),
        _ => None,
    }
    .or_else(|| {
        addresses.iter().find_map(|a| match a {
            std::net::IpAddr::V4(a) => Some(*a),
            _ => None,
        })
    })
    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let v6 = addresses.iter().find_map(|a| match a {
        std::net::IpAddr::V6(a) => Some(*a),
        _ => None,
    });
    LeaseAttrs {
        public_ip: v4,
        public_ipv6: v6,
        backend_type: "wireguard".into(),
        backend_data: BackendData {
            public_key: key.to_owned(),
        },
        meshd: Some(MeshdLease {
            node: name.to_owned(),
            endpoint,
        }),
    }
}

/// Errors of lease operations.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No subnet is free.
    #[error(transparent)]
    Exhausted(#[from] overlay::Exhausted),
    /// Too many conflicting concurrent allocations.
    #[error("could not allocate a subnet after {0} attempts (heavy contention); retry")]
    Contention(u32),
    /// A stored value is not a lease.
    #[error("corrupt lease {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// A lease held by a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// The stored key.
    pub kv: KeyValue,
}

fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

fn random_seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

/// Lists the leases under `prefix` (a linearizable read): subnet, attributes, key.
pub async fn list(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<(Ipv4Net, LeaseAttrs, KeyValue)>, LeaseError> {
    let listing = store.list(&subnets_prefix(prefix)).await?;
    let mut out = Vec::with_capacity(listing.kvs.len());
    for kv in listing.kvs {
        let Some(subnet) = overlay::parse_lease_key(prefix, &kv.key) else {
            continue;
        };
        // A lease meshd cannot read (another tool's, say) still holds its subnet (see
        // [`taken_subnets`]); it is only left out of the attribute search.
        match serde_json::from_slice::<LeaseAttrs>(&kv.value) {
            Ok(attrs) => out.push((subnet, attrs, kv)),
            Err(e) => crate::api::server::log(format!("skipping unreadable lease {}: {e}", kv.key)),
        }
    }
    Ok(out)
}

/// The subnets leased under `prefix`, from the keys alone (a linearizable read).
pub async fn taken_subnets(
    store: &dyn Store,
    prefix: &str,
) -> Result<BTreeSet<Ipv4Net>, LeaseError> {
    let listing = store.list(&subnets_prefix(prefix)).await?;
    Ok(listing
        .kvs
        .iter()
        .filter_map(|kv| overlay::parse_lease_key(prefix, &kv.key))
        .collect())
}

/// Acquires a subnet for `attrs.meshd.node`, in flannel's order (see the module docs).
pub async fn acquire(
    store: &dyn Store,
    prefix: &str,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    preferred: Option<Ipv4Net>,
) -> Result<Lease, LeaseError> {
    const ATTEMPTS: u32 = 32;
    let value = serde_json::to_vec(attrs).map_err(|e| LeaseError::Corrupt {
        key: String::new(),
        reason: e.to_string(),
    })?;
    for _ in 0..ATTEMPTS {
        let leases = list(store, prefix).await?;
        if let Some(node) = attrs.node() {
            if let Some((subnet, _, old)) = leases.iter().find(|(_, a, _)| a.node() == Some(node)) {
                // Already ours: refresh the attributes on a new store lease and keep the subnet.
                let lease = store.grant_lease(LEASE_TTL).await?;
                match store
                    .compare_and_swap(&old.key, old.mod_revision, &value, Some(lease))
                    .await?
                {
                    Some(kv) => {
                        if old.lease != 0 {
                            // Nothing is attached to the old lease any more.
                            let _ = store.revoke_lease(old.lease).await;
                        }
                        return Ok(Lease {
                            subnet: *subnet,
                            kv,
                        });
                    }
                    None => {
                        let _ = store.revoke_lease(lease).await;
                        continue;
                    }
                }
            }
        }
        // Every leased subnet counts as taken, readable or not.
        let taken = taken_subnets(store, prefix).await?;
        let subnet = cfg.choose_subnet(&taken, preferred, random_seed())?;
        let key = overlay::lease_key(prefix, subnet);
        let lease = store.grant_lease(LEASE_TTL).await?;
        match store.create(&key, &value, Some(lease)).await? {
            Some(kv) => return Ok(Lease { subnet, kv }),
            None => {
                // Lost a race for this subnet: pick again from a fresh listing.
                let _ = store.revoke_lease(lease).await;
            }
        }
    }
    Err(LeaseError::Contention(ATTEMPTS))
}

/// Renews `node`'s lease of `subnet` for another TTL. When it has expired meanwhile the node
/// re-acquires, preferring the same subnet only if nobody else took it.
pub async fn renew(
    store: &dyn Store,
    prefix: &str,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    subnet: Ipv4Net,
) -> Result<Lease, LeaseError> {
    let key = overlay::lease_key(prefix, subnet);
    if let Some(kv) = store.get(&key).await? {
        let held: Result<LeaseAttrs, _> = serde_json::from_slice(&kv.value);
        if held.as_ref().ok().and_then(|a| a.node()) == attrs.node() && kv.lease != 0 {
            match store.keep_alive(kv.lease).await {
                Ok(_) => return Ok(Lease { subnet, kv }),
                Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    acquire(store, prefix, cfg, attrs, Some(subnet)).await
}

/// Releases `node`'s lease of `subnet` (only if it is still `node`'s).
pub async fn release(
    store: &dyn Store,
    prefix: &str,
    subnet: Ipv4Net,
    node: &str,
) -> Result<bool, LeaseError> {
    let key = overlay::lease_key(prefix, subnet);
    let Some(kv) = store.get(&key).await? else {
        return Ok(false);
    };
    let held: Result<LeaseAttrs, _> = serde_json::from_slice(&kv.value);
    if held.ok().and_then(|a| a.meshd).map(|m| m.node).as_deref() != Some(node) {
        return Ok(false);
    }
    Ok(store.delete(&key, Some(kv.mod_revision)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn attrs(node: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: "192.0.2.1".parse().unwrap(),
            public_ipv6: None,
            backend_type: "wireguard".into(),
            backend_data: BackendData {
                public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            },
            meshd: Some(MeshdLease {
                node: node.into(),
                endpoint: "192.0.2.1:51820".parse().unwrap(),
            }),
        }
    }

    fn config() -> NetworkConfig {
        NetworkConfig::with_defaults(
            "10.244.0.0/16".parse().unwrap(),
            overlay::Backend {
                kind: "wireguard".into(),
                listen_port: 51820,
                persistent_keepalive_interval: 0,
                mtu: 0,
            },
        )
        .unwrap()
    }

    #[test]
    fn lease_value_is_flannels_format_in_flannels_field_order() {
        let mut a = attrs("n1");
        a.meshd = None;
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}"#
        );
    }

    /// flannel-io/flannel#1289: a node whose lease expired while it was away must not take back a
    /// subnet that was given to someone else meanwhile; it gets its old one back only if still free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_returning_node_never_takes_back_a_subnet_given_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let cfg = config();
        let p = overlay::DEFAULT_PREFIX;
        // n1 holds a subnet on a short lease and goes away.
        let n1 = acquire(&store, p, &cfg, &attrs("n1"), None).await.unwrap();
        let short = store.grant_lease(Duration::from_secs(1)).await.unwrap();
        let v = serde_json::to_vec(&attrs("n1")).unwrap();
        store
            .compare_and_swap(&n1.kv.key, n1.kv.mod_revision, &v, Some(short))
            .await
            .unwrap()
            .unwrap();
        let mut gone = false;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if store.get(&n1.kv.key).await.unwrap().is_none() {
                gone = true;
                break;
            }
        }
        assert!(gone, "the expired lease was reclaimed");
        // n2 arrives and, preferring it, is given n1's old subnet.
        let n2 = acquire(&store, p, &cfg, &attrs("n2"), Some(n1.subnet))
            .await
            .unwrap();
        assert_eq!(n2.subnet, n1.subnet);
        // n1 comes back and renews: it gets another subnet, n2 keeps its own.
        let back = renew(&store, p, &cfg, &attrs("n1"), n1.subnet)
            .await
            .unwrap();
        assert_ne!(back.subnet, n1.subnet);
        let held = list(&store, p).await.unwrap();
        assert_eq!(held.len(), 2);
        let owner = |s: Ipv4Net| {
            held.iter()
                .find(|(x, _, _)| *x == s)
                .and_then(|(_, a, _)| a.meshd.clone())
                .map(|m| m.node)
        };
        assert_eq!(owner(n1.subnet).as_deref(), Some("n2"));
        assert_eq!(owner(back.subnet).as_deref(), Some("n1"));
        // A renewal of a live lease keeps the subnet and the key.
        let again = renew(&store, p, &cfg, &attrs("n1"), back.subnet)
            .await
            .unwrap();
        assert_eq!(again.subnet, back.subnet);
        // Releasing someone else's lease does nothing.
        assert!(!release(&store, p, n1.subnet, "n1").await.unwrap());
        assert!(release(&store, p, back.subnet, "n1").await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_lease_is_taken_back_when_still_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let cfg = config();
        let p = overlay::DEFAULT_PREFIX;
        let n1 = acquire(&store, p, &cfg, &attrs("n1"), None).await.unwrap();
        store.revoke_lease(n1.kv.lease).await.unwrap();
        assert!(store.get(&n1.kv.key).await.unwrap().is_none());
        let back = renew(&store, p, &cfg, &attrs("n1"), n1.subnet)
            .await
            .unwrap();
        assert_eq!(back.subnet, n1.subnet);
    }
}
