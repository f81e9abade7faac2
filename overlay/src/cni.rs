//! The CNI network configuration meshd writes (`/etc/cni/net.d/10-meshd.conflist` by default): the
//! standard `bridge` plugin with `host-local` IPAM over the node's subnet, as flannel's CNI plugin
//! delegates it, plus `portmap`. Debian's `containernetworking-plugins` ships all three. Pure.

use ipnet::Ipv4Net;
use serde_json::json;

/// CNI spec version written (understood by containernetworking-plugins 0.8 and later).
pub const CNI_VERSION: &str = "0.4.0";

/// Renders the conflist for a node holding `subnet` of `network`, with pod interfaces of `mtu`.
/// `bridge` is the Linux bridge's name (`cni0` by default), `ipam_dir` host-local's state directory
/// (`None`: its default).
pub fn conflist(
    network: Ipv4Net,
    subnet: Ipv4Net,
    mtu: u16,
    bridge: &str,
    ipam_dir: Option<&str>,
) -> String {
    let mut ipam = json!({
        "type": "host-local",
        "ranges": [[{ "subnet": subnet.to_string() }]],
        // `isDefaultGateway` below adds the default route; listing 0.0.0.0/0 here too makes the
        // bridge plugin add it twice and fail ("file exists").
        "routes": [{ "dst": network.to_string() }],
    });
    if let Some(d) = ipam_dir {
        ipam["dataDir"] = json!(d);
    }
    let v = json!({
        "cniVersion": CNI_VERSION,
        "name": "meshd",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "isDefaultGateway": true,
                // No masquerade by the bridge plugin: it would hide pod addresses from pods on other
                // nodes. Pod-to-pod traffic keeps its addresses and crosses the mesh encrypted.
                "ipMasq": false,
                "hairpinMode": true,
                "mtu": mtu,
                "ipam": ipam,
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_delegates_to_bridge_and_host_local() {
        let s = conflist(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.5.0/24".parse().unwrap(),
            1420,
            "cni0",
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["cniVersion"], CNI_VERSION);
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["mtu"], 1420);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.5.0/24");
        assert_eq!(bridge["isDefaultGateway"], true);
        let routes = bridge["ipam"]["routes"].as_array().unwrap();
        assert_eq!(
            routes.len(),
            1,
            "the default route comes from isDefaultGateway only"
        );
        assert_eq!(routes[0]["dst"], "10.244.0.0/16");
        assert_eq!(v["plugins"][1]["type"], "portmap");
    }
}
