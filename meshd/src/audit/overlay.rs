//! NET-01 … NET-06: this node's WireGuard device (over its UAPI socket, as `wg show` reads it)
//! against the registry, and the kernel's routes to the remote pod subnets.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::catalog::*;
use super::model::{Finding, Status};
use crate::registry::NodeRecord;

/// Handshake age beyond which a peer is stale: WireGuard re-keys every 120 s while traffic flows
/// and gives up after 180 s; 30 s of slack.
const STALE: Duration = Duration::from_secs(210);

/// The NET findings of this node.
pub fn judge(data_dir: &Path, me: &str, ifname: &str, nodes: &[NodeRecord]) -> Vec<Finding> {
    let mut v = Vec::new();
    let t = format!("{me}/{ifname}");
    let sock = overlay::wg::uapi::socket_path(ifname);
    let info = if !sock.exists() {
        let why = format!(
            "no WireGuard device {ifname} on this node ({} absent: meshd run --no-mesh, or another --wg-interface)",
            sock.display()
        );
        for c in [NET_01, NET_02, NET_03, NET_04, NET_05, NET_06, NET_07] {
            v.push(c.finding(Status::Skip, &t, why.clone(), "a running mesh"));
        }
        return v;
    } else {
        match overlay::wg::Uapi::connect(ifname).and_then(|u| u.get()) {
            Ok(i) => i,
            Err(e) => {
                for c in [NET_01, NET_02, NET_03, NET_06] {
                    v.push(c.finding(
                        Status::Error,
                        &t,
                        format!("UAPI: {e}"),
                        "a device that answers",
                    ));
                }
                return v;
            }
        }
    };
    let remote: Vec<&NodeRecord> = nodes.iter().filter(|n| n.name != me).collect();

    // NET-01
    let mut missing = Vec::new();
    for n in &remote {
        let key = overlay::wg::PublicKey::from_base64(&n.wireguard_public_key).ok();
        if key.as_ref().and_then(|k| info.peer(k)).is_none() {
            missing.push(format!("{} ({})", n.name, n.wireguard_public_key));
        }
    }
    let unknown: Vec<String> = info
        .peers
        .iter()
        .map(|p| p.public_key.to_base64())
        .filter(|k| !remote.iter().any(|n| &n.wireguard_public_key == k))
        .collect();
    let exp = format!("{} peers: the registered nodes minus {me}", remote.len());
    v.push(if missing.is_empty() && unknown.is_empty() {
        NET_01.finding(
            Status::Pass,
            &t,
            format!(
                "{} peers, each a registered node with its key",
                info.peers.len()
            ),
            exp,
        )
    } else {
        let mut s = Vec::new();
        if !missing.is_empty() {
            s.push(format!("missing from the peer set: {}", missing.join(", ")));
        }
        if !unknown.is_empty() {
            s.push(format!(
                "peers no registered node has: {}",
                unknown.join(", ")
            ));
        }
        NET_01.finding(Status::Fail, &t, s.join("; "), exp)
    });

    // NET-02 and NET-03, per remote node
    let now = SystemTime::now();
    for n in &remote {
        let pt = format!("{me}/{ifname} peer {}", n.name);
        let Some(p) = overlay::wg::PublicKey::from_base64(&n.wireguard_public_key)
            .ok()
            .and_then(|k| info.peer(&k).cloned())
        else {
            v.push(NET_02.finding(
                Status::Skip,
                &pt,
                "not a peer (see NET-01)",
                "a fresh handshake",
            ));
            v.push(NET_03.finding(
                Status::Skip,
                &pt,
                "not a peer (see NET-01)",
                "its subnet in its AllowedIPs",
            ));
            continue;
        };
        v.push(
            match p
                .last_handshake()
                .map(|h| now.duration_since(h).unwrap_or_default())
            {
                Some(age) if age <= STALE => NET_02.finding(
                    Status::Pass,
                    &pt,
                    format!("latest handshake {}s ago", age.as_secs()),
                    "<= 210 s while traffic flows",
                ),
                Some(age) => NET_02.finding(
                    Status::Warn,
                    &pt,
                    format!(
                        "latest handshake {}s ago (rx {} tx {} bytes)",
                        age.as_secs(),
                        p.rx_bytes,
                        p.tx_bytes
                    ),
                    "<= 210 s while traffic flows",
                ),
                None if p.tx_bytes == 0 => NET_02.finding(
                    Status::Skip,
                    &pt,
                    "no handshake yet and no traffic sent (WireGuard handshakes on demand)",
                    "<= 210 s while traffic flows",
                ),
                None => NET_02.finding(
                    Status::Fail,
                    &pt,
                    format!(
                        "never completed a handshake although {} bytes were sent",
                        p.tx_bytes
                    ),
                    "<= 210 s while traffic flows",
                ),
            },
        );
        let holders: Vec<String> = info
            .peers
            .iter()
            .filter(|q| {
                q.allowed_ips.iter().any(|a| match a {
                    ipnet::IpNet::V4(a) => {
                        a.contains(&n.subnet.network()) && a.prefix_len() <= n.subnet.prefix_len()
                    }
                    _ => false,
                })
            })
            .map(|q| q.public_key.to_base64())
            .collect();
        let own = holders.len() == 1 && holders[0] == n.wireguard_public_key;
        v.push(NET_03.finding(
            if own { Status::Pass } else { Status::Fail },
            &pt,
            format!(
                "{} is in the AllowedIPs of {} peer(s){}",
                n.subnet,
                holders.len(),
                if own {
                    ": its own".to_string()
                } else {
                    format!(": {}", holders.join(", "))
                }
            ),
            format!(
                "{} in the AllowedIPs of exactly {}'s peer",
                n.subnet, n.name
            ),
        ));
    }

    // NET-04
    let ip = overlay::link::Ip::new();
    for n in &remote {
        let pt = format!("{me} route to {} ({})", n.subnet, n.name);
        let dst: IpAddr = IpAddr::V4(n.subnet.hosts().next().unwrap_or(n.subnet.network()));
        v.push(match ip.route_get(dst) {
            Ok(r) if r.dev == ifname => NET_04.finding(Status::Pass, &pt, format!("{dst} routes via {}", r.dev), format!("via {ifname}")),
            Ok(r) => NET_04.finding(Status::Fail, &pt, format!("{dst} routes via {}, bypassing {ifname}: pod traffic would cross the underlay in clear", r.dev), format!("via {ifname}")),
            Err(e) => NET_04.finding(Status::Error, &pt, e.to_string(), format!("via {ifname}")),
        });
    }

    // NET-05
    v.push(leak_probe(&ip, ifname, &remote, &t));

    // NET-07: meshd's tunnel carries the pod network; node-to-node traffic stays on the underlay.
    v.push(NET_07.finding(
        Status::Skip,
        &t,
        "declared out of scope: the tunnel carries pod subnets only; host-to-host traffic (node IPs, kubelet, NodePorts) is protected by TLS, which the TLS-xx checks probe on every node",
        "encrypted, or declared out of scope",
    ));

    // NET-06
    let key = crate::wgkey::private_path(data_dir);
    let mut probs = Vec::new();
    match std::fs::metadata(&key) {
        Ok(md) => {
            if md.mode() & 0o077 != 0 {
                probs.push(format!("{} mode {:04o}", key.display(), md.mode() & 0o7777));
            }
        }
        Err(e) => probs.push(format!("{}: {e}", key.display())),
    }
    match ip.link_mtu(ifname) {
        Ok(mtu) => {
            let under = nodes
                .iter()
                .find(|n| n.name != me)
                .and_then(|n| ip.underlay_mtu(n.endpoint.ip()).ok());
            if let Some(u) = under {
                if mtu + 60 > u && u != 65536 {
                    probs.push(format!("MTU {mtu} leaves less than WireGuard's 60-byte overhead under the underlay's {u}"));
                }
            }
            if probs.is_empty() {
                v.push(NET_06.finding(
                    Status::Pass,
                    &t,
                    format!("key 0600; {ifname} up, MTU {mtu}"),
                    "key 0600; interface up; MTU + overhead <= underlay",
                ));
            }
        }
        Err(e) => probs.push(format!("{ifname}: {e}")),
    }
    if !probs.is_empty() {
        v.push(NET_06.finding(
            Status::Fail,
            &t,
            probs.join("; "),
            "key 0600; interface up; MTU + overhead <= underlay",
        ));
    }
    v
}

/// NET-05: sends UDP datagrams from this node to every remote pod subnet while capturing on the
/// underlay interface and on the tunnel. Clean: every probe is seen on the tunnel (before
/// encryption) and none on the underlay; a probe on the underlay is a leak in clear.
fn leak_probe(ip: &overlay::link::Ip, ifname: &str, remote: &[&NodeRecord], t: &str) -> Finding {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let exp =
        "pod-subnet traffic on the underlay only inside WireGuard (UDP to the WireGuard port)";
    if remote.is_empty() {
        return NET_05.finding(Status::Skip, t, "no remote node to probe", exp);
    }
    let underlay = match ip.route_get(remote[0].endpoint.ip()) {
        Ok(r) => r.dev,
        Err(e) => return NET_05.finding(Status::Error, t, format!("underlay interface: {e}"), exp),
    };
    let filter = remote
        .iter()
        .map(|n| format!("dst net {}", n.subnet))
        .collect::<Vec<_>>()
        .join(" or ");
    let capture = |dev: &str| {
        Command::new("tcpdump")
            .args(["-i", dev, "-n", "-l", "-p", "-q"])
            .arg(&filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut caps = Vec::new();
    for dev in [underlay.as_str(), ifname] {
        match capture(dev) {
            Ok(c) => caps.push(c),
            Err(e) => {
                for mut c in caps {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return NET_05.finding(
                    Status::Skip,
                    t,
                    format!("cannot run tcpdump ({e}): install tcpdump for the leak probe"),
                    exp,
                );
            }
        }
    }
    // Each capture is ready once it says "listening on".
    let mut lines = Vec::new();
    let complaints = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    for c in caps.iter_mut() {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(err) = c.stderr.take() {
            let complaints = complaints.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    if l.contains("listening on") {
                        let _ = tx.send(true);
                    } else if let Ok(mut c) = complaints.lock() {
                        c.push(l);
                    }
                }
            });
        }
        let ready = rx.recv_timeout(Duration::from_secs(5)).is_ok();
        let (ltx, lrx) = std::sync::mpsc::channel::<String>();
        if let Some(out) = c.stdout.take() {
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = ltx.send(l);
                }
            });
        }
        lines.push((ready, lrx));
    }
    let send = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|sock| {
        for n in remote {
            let dst = n.subnet.hosts().next().unwrap_or(n.subnet.network());
            for _ in 0..3 {
                sock.send_to(b"meshd-audit-leak-probe", (dst, 9))?;
            }
        }
        Ok(())
    });
    // The tunnel capture must see them all; give the captures a moment to print.
    let want = remote.len() * 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut seen: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    while std::time::Instant::now() < deadline && seen[1].len() < want {
        for (i, (_, rx)) in lines.iter().enumerate() {
            while let Ok(l) = rx.try_recv() {
                seen[i].push(l);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    for (i, (_, rx)) in lines.iter().enumerate() {
        while let Ok(l) = rx.try_recv() {
            seen[i].push(l);
        }
    }
    for mut c in caps {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Err(e) = send {
        return NET_05.finding(Status::Error, t, format!("sending the probes: {e}"), exp);
    }
    if lines.iter().any(|(ready, _)| !ready) {
        let why = complaints.lock().map(|c| c.join("; ")).unwrap_or_default();
        return NET_05.finding(
            Status::Skip,
            t,
            format!("tcpdump could not capture (the leak probe needs root): {why}"),
            exp,
        );
    }
    if !seen[0].is_empty() {
        return NET_05.finding(
            Status::Fail,
            t,
            format!(
                "probes to remote pod subnets crossed {underlay} in clear: {}",
                seen[0]
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
            exp,
        );
    }
    if seen[1].len() < want {
        return NET_05.finding(
            Status::Error,
            t,
            format!("only {} of {want} probes seen on {ifname} and none on {underlay}: the probe is inconclusive", seen[1].len()),
            exp,
        );
    }
    NET_05.finding(
        Status::Pass,
        t,
        format!("{want} probe datagrams to {} remote pod subnet(s): all entered {ifname}, none crossed {underlay} in clear", remote.len()),
        exp,
    )
}
