//! A node whose subnet lease expired while it was away and was given another subnet (the control
//! plane records it in the node's registry entry, which reaches the node on its peer feed): the
//! running mesh moves to the new subnet without a restart. Real TUN device, real `ip`, in a
//! network namespace of its own (root and /dev/net/tun, as the mesh tests;
//! `MESHD_SKIP_NETNS_TESTS=1` skips it).

use std::process::Command;

use meshd::api::PeerEvent;
use meshd::mesh::{Mesh, MeshOptions};
use meshd::registry::NodeRecord;
use meshd_e2e::{netns_do, run};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

fn ip_in(ns: &str, args: &[&str]) -> String {
    let out = run(Command::new("ip").arg("-n").arg(ns).args(args));
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_new_subnet_on_the_feed_readdresses_the_running_mesh() {
    if std::env::var_os("MESHD_SKIP_NETNS_TESTS").is_some_and(|v| v == "1") {
        return;
    }
    let ns = format!("mreaddr{}", std::process::id());
    let _ = run(Command::new("ip").args(["netns", "del", &ns]));
    assert!(run(Command::new("ip").args(["netns", "add", &ns]))
        .status
        .success());
    let guard = Netns(ns.clone());
    ip_in(&ns, &["link", "set", "lo", "up"]);
    ip_in(
        &ns,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ],
    );
    ip_in(&ns, &["address", "add", "10.218.0.1/24", "dev", "eth0"]);
    ip_in(&ns, &["link", "set", "eth0", "up"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let env = dir.path().join("subnet.env");
    let conf = dir.path().join("10-meshd.conflist");
    let ifname = format!("mra{}", std::process::id() % 100_000);
    let opts = MeshOptions {
        ifname: ifname.clone(),
        mtu: None,
        keepalive: 0,
        engine: overlay::wg::WgEngine::DEFAULT,
        subnet_env: Some(env.clone()),
        cni_conf: Some(conf.clone()),
        cni_bridge: "cni-mra".into(),
    };
    let old: ipnet::Ipv4Net = "10.244.7.0/24".parse().expect("subnet");
    let new: ipnet::Ipv4Net = "10.244.42.0/24".parse().expect("subnet");
    let me = NodeRecord {
        version: meshd::registry::RECORD_VERSION,
        name: "n1".into(),
        addresses: vec!["10.218.0.1".parse().expect("ip")],
        wireguard_public_key: String::new(),
        endpoint: "10.218.0.1:51899".parse().expect("endpoint"),
        subnet: old,
        control_plane: false,
        registered: 0,
        identity_sha256: String::new(),
        last_renewal: None,
    };
    let (ns2, ifname2, env2, conf2) = (ns.clone(), ifname.clone(), env.clone(), conf.clone());
    netns_do(&ns, move || {
        let key = overlay::wg::PrivateKey::generate().expect("key");
        let mut mesh = Mesh::start(
            &opts,
            key,
            &me,
            "10.244.0.0/16".parse().expect("network"),
            "10.218.0.1".parse().expect("ip"),
        )
        .expect("mesh up");
        let addrs = ip_in(&ns2, &["-4", "-o", "address", "show", "dev", &ifname2]);
        assert!(addrs.contains("inet 10.244.7.0/32"), "{addrs}");
        let before = std::fs::read_to_string(&env2).expect("subnet.env");
        assert!(before.contains("FLANNEL_SUBNET=10.244.7.1/24"), "{before}");

        // Another node's record, then our own with the same subnet: nothing moves.
        let mut same = me.clone();
        same.registered = 1;
        mesh.handle(&PeerEvent::Put {
            revision: 5,
            node: same,
        })
        .expect("own record, unchanged");
        assert_eq!(mesh.subnet(), old);

        // Our own record with a new subnet.
        let mut moved = me.clone();
        moved.subnet = new;
        mesh.handle(&PeerEvent::Put {
            revision: 6,
            node: moved,
        })
        .expect("own record, new subnet");
        assert_eq!(mesh.subnet(), new);
        let addrs = ip_in(&ns2, &["-4", "-o", "address", "show", "dev", &ifname2]);
        assert!(addrs.contains("inet 10.244.42.0/32"), "{addrs}");
        assert!(!addrs.contains("10.244.7.0"), "old address left: {addrs}");
        let route = ip_in(&ns2, &["route", "show", "10.244.0.0/16"]);
        assert!(route.contains(&format!("dev {ifname2}")), "{route}");
        let after = std::fs::read_to_string(&env2).expect("subnet.env");
        assert!(after.contains("FLANNEL_SUBNET=10.244.42.1/24"), "{after}");
        let conflist: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&conf2).expect("conflist"))
                .expect("conflist JSON");
        let text = conflist.to_string();
        assert!(
            text.contains("10.244.42.0/24") && !text.contains("10.244.7.0"),
            "{text}"
        );
        drop(mesh);
    });
    drop(guard);
}
