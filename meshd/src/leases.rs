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
        let attrs: LeaseAttrs =
            serde_json::from_slice(&kv.value).map_err(|e| LeaseError::Corrupt {
                key: kv.key.clone(),
                reason: e.to_string(),
            })?;
        out.push((subnet, attrs, kv));
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
        let taken: BTreeSet<Ipv4Net> = leases.iter().map(|(s, _, _)| *s).collect();
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
