//! Interface plumbing through the `ip` command (iproute2): MTU, addresses, link state, routes, and
//! detection of the underlay MTU.
//!
//! Every operation runs one `ip` process, in the caller's network namespace or, with
//! [`Ip::in_netns`], in a named one (`ip -n NAME ...`). Errors name the command that failed and carry
//! its stderr, so that "RTNETLINK answers: File exists" reaches the operator as it is.
//!
//! The pure parts (parsing `ip -j` output, the tunnel MTU rule) are separate functions with unit
//! tests; only [`Ip`]'s methods spawn processes.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use ipnet::IpNet;
use serde_json::Value;

/// WireGuard's worst-case overhead on an IPv6 underlay: 40 (IPv6) + 8 (UDP) + 32 (WireGuard
/// header and authentication tag). The tunnel MTU is the underlay MTU minus this.
pub const WIREGUARD_OVERHEAD: u32 = 80;

/// The smallest MTU an IPv6 link may have; a tunnel MTU below it cannot carry IPv6.
pub const IPV6_MIN_MTU: u32 = 1280;

/// The smallest datagram every IPv4 host must accept (RFC 791): an IPv4 tunnel MTU below it is
/// refused. A 1280-byte underlay gives a 1200-byte tunnel, which IPv4 pods use fine.
pub const IPV4_MIN_MTU: u32 = 576;

/// Errors of the interface plumbing.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The `ip` program could not be started (not installed, or not on the `PATH`).
    #[error("could not run `{command}`: {source} (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// `ip` ran and exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// `ip` succeeded but printed something this module does not understand.
    #[error("unexpected output from `{command}`: {message}")]
    Output {
        /// The command line.
        command: String,
        /// What was wrong with the output.
        message: String,
    },
    /// An argument was rejected before running anything (e.g. an invalid interface name).
    #[error("{0}")]
    Invalid(String),
}

/// Checks a Linux interface name: 1 to 15 bytes of `[A-Za-z0-9_.=+-]`, not `.` or `..`, not
/// starting with `-`, and not all digits (boringtun would take an all-digit name for a file
/// descriptor number).
pub fn validate_ifname(name: &str) -> Result<(), LinkError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.=+-".contains(&b));
    if name.is_empty()
        || name.len() > 15
        || !ok_chars
        || name == "."
        || name == ".."
        || name.starts_with('-')
        || name.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(LinkError::Invalid(format!(
            "invalid interface name {name:?}: use 1 to 15 characters from [A-Za-z0-9_.=+-], \
             not all digits, not starting with '-'"
        )));
    }
    Ok(())
}

/// The tunnel MTU for an underlay MTU: `underlay - 80` (see [`WIREGUARD_OVERHEAD`]).
///
/// Saturates at 0; callers should refuse results below [`IPV6_MIN_MTU`] if they carry IPv6.
pub fn tunnel_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(WIREGUARD_OVERHEAD)
}

/// What `ip -j route get ADDR` says about the path to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// The outgoing interface.
    pub dev: String,
    /// The route's own `mtu` metric, when the route sets one.
    pub mtu: Option<u32>,
}

/// Parses the JSON of `ip -j route get ADDR` (an array with one route object).
pub fn parse_route_get(json: &str) -> Result<RouteInfo, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let route = v
        .as_array()
        .and_then(|a| a.first())
        .ok_or("expected a non-empty JSON array")?;
    let dev = route
        .get("dev")
        .and_then(Value::as_str)
        .ok_or("the route has no \"dev\"")?
        .to_string();
    let mtu = route
        .get("metrics")
        .and_then(Value::as_array)
        .and_then(|ms| ms.iter().find_map(|m| m.get("mtu").and_then(Value::as_u64)))
        .map(|m| u32::try_from(m).map_err(|_| format!("route mtu {m} out of range")))
        .transpose()?;
    Ok(RouteInfo { dev, mtu })
}

/// Parses `ip -j address show to ADDR`: the interface holding the address and its MTU, or `None`
/// when no interface holds it (or the output is not understood).
pub fn parse_address_owner(json: &str) -> Option<(String, u32)> {
    let v: Value = serde_json::from_str(json).ok()?;
    let link = v.as_array()?.first()?;
    let name = link["ifname"].as_str()?.to_string();
    let mtu = u32::try_from(link["mtu"].as_u64()?).ok()?;
    Some((name, mtu))
}

/// Parses the MTU out of the JSON of `ip -j link show dev DEV`.
pub fn parse_link_mtu(json: &str) -> Result<u32, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let mtu = v
        .as_array()
        .and_then(|a| a.first())
        .and_then(|l| l.get("mtu"))
        .and_then(Value::as_u64)
        .ok_or("expected a JSON array whose first link has an \"mtu\"")?;
    u32::try_from(mtu).map_err(|_| format!("mtu {mtu} out of range"))
}

/// Runs `ip` commands, in the current network namespace or in a named one.
#[derive(Clone, Debug)]
pub struct Ip {
    program: PathBuf,
    netns: Option<String>,
}

impl Default for Ip {
    fn default() -> Self {
        Ip {
            program: PathBuf::from("ip"),
            netns: None,
        }
    }
}

/// A command line, for error messages.
struct CommandLine<'a>(&'a Ip, &'a [&'a str]);

impl fmt::Display for CommandLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.program.display())?;
        if let Some(ns) = &self.0.netns {
            write!(f, " -n {ns}")?;
        }
        for a in self.1 {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

impl Ip {
    /// `ip` from the `PATH`, acting in the caller's network namespace.
    pub fn new() -> Self {
        Self::default()
    }

    /// `ip -n NAME`: act in the named network namespace (as created by `ip netns add`).
    pub fn in_netns(name: &str) -> Self {
        Ip {
            netns: Some(name.to_string()),
            ..Self::default()
        }
    }

    /// Uses this `ip` program instead of the one on the `PATH`.
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    fn run(&self, args: &[&str]) -> Result<String, LinkError> {
        let mut cmd = Command::new(&self.program);
        if let Some(ns) = &self.netns {
            cmd.args(["-n", ns]);
        }
        cmd.args(args);
        let out = cmd.output().map_err(|source| LinkError::Spawn {
            command: CommandLine(self, args).to_string(),
            source,
        })?;
        if !out.status.success() {
            return Err(LinkError::Failed {
                command: CommandLine(self, args).to_string(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        String::from_utf8(out.stdout).map_err(|_| LinkError::Output {
            command: CommandLine(self, args).to_string(),
            message: "not UTF-8".into(),
        })
    }

    /// `ip link set dev IFNAME mtu MTU`.
    pub fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), LinkError> {
        validate_ifname(ifname)?;
        self.run(&["link", "set", "dev", ifname, "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// `ip link set dev IFNAME up`.
    pub fn set_up(&self, ifname: &str) -> Result<(), LinkError> {
        validate_ifname(ifname)?;
        self.run(&["link", "set", "dev", ifname, "up"]).map(drop)
    }

    /// `ip link set dev IFNAME down`.
    pub fn set_down(&self, ifname: &str) -> Result<(), LinkError> {
        validate_ifname(ifname)?;
        self.run(&["link", "set", "dev", ifname, "down"]).map(drop)
    }

    /// Adds `ADDR/32` (or `/128` for IPv6) to the interface, with `ip address replace`, so that
    /// adding an address that is already there succeeds (a restarted daemon re-applies its state).
    pub fn add_address(&self, ifname: &str, addr: IpAddr) -> Result<(), LinkError> {
        validate_ifname(ifname)?;
        let host = IpNet::from(addr).to_string();
        self.run(&["address", "replace", &host, "dev", ifname])
            .map(drop)
    }

    /// `ip address del ADDR/32 (or /128) dev IFNAME`; `Ok(false)` if the address was not there.
    pub fn delete_address(&self, ifname: &str, addr: IpAddr) -> Result<bool, LinkError> {
        validate_ifname(ifname)?;
        let host = IpNet::from(addr).to_string();
        match self.run(&["address", "del", &host, "dev", ifname]) {
            Ok(_) => Ok(true),
            Err(LinkError::Failed { stderr, .. })
                if stderr.contains("Cannot assign requested address") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// `ip route replace CIDR dev IFNAME`: creates the route or moves it to this interface.
    pub fn route_replace(&self, cidr: IpNet, ifname: &str) -> Result<(), LinkError> {
        validate_ifname(ifname)?;
        let dst = cidr.trunc().to_string();
        self.run(&["route", "replace", &dst, "dev", ifname])
            .map(drop)
    }

    /// `ip route del CIDR dev IFNAME`. Returns `false` if there was no such route.
    pub fn route_delete(&self, cidr: IpNet, ifname: &str) -> Result<bool, LinkError> {
        validate_ifname(ifname)?;
        let dst = cidr.trunc().to_string();
        match self.run(&["route", "del", &dst, "dev", ifname]) {
            Ok(_) => Ok(true),
            Err(LinkError::Failed { stderr, .. })
                if stderr.contains("No such process") || stderr.contains("Cannot find device") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether an interface of that name exists (`ip -j link show dev IFNAME`).
    pub fn link_exists(&self, ifname: &str) -> Result<bool, LinkError> {
        validate_ifname(ifname)?;
        match self.run(&["-j", "link", "show", "dev", ifname]) {
            Ok(_) => Ok(true),
            Err(LinkError::Failed { stderr, .. }) if stderr.contains("does not exist") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The MTU of an interface (`ip -j link show dev IFNAME`).
    pub fn link_mtu(&self, ifname: &str) -> Result<u32, LinkError> {
        validate_ifname(ifname)?;
        let args = ["-j", "link", "show", "dev", ifname];
        let out = self.run(&args)?;
        parse_link_mtu(&out).map_err(|message| LinkError::Output {
            command: CommandLine(self, &args).to_string(),
            message,
        })
    }

    /// The route to an address (`ip -j route get ADDR`): outgoing interface and route MTU.
    pub fn route_get(&self, dst: IpAddr) -> Result<RouteInfo, LinkError> {
        let dst = dst.to_string();
        let args = ["-j", "route", "get", dst.as_str()];
        let out = self.run(&args)?;
        parse_route_get(&out).map_err(|message| LinkError::Output {
            command: CommandLine(self, &args).to_string(),
            message,
        })
    }

    /// The underlay MTU for a tunnel that reaches `addr`: when `addr` is one of this machine's
    /// own addresses (a control plane measuring towards itself), the MTU of the interface that
    /// holds it; otherwise [`Ip::underlay_mtu`] (the route's interface, lowered to a known path
    /// MTU). Loopback is never the underlay: it, and absurd values, count as 1500.
    pub fn underlay_mtu_for(&self, addr: IpAddr) -> Result<u32, LinkError> {
        let a = addr.to_string();
        let own = self
            .run(&["-j", "address", "show", "to", a.as_str()])
            .ok()
            .and_then(|out| parse_address_owner(&out));
        let mtu = match own {
            Some((ifname, _)) if ifname == "lo" => 1500,
            Some((_, mtu)) => mtu,
            None => self.underlay_mtu(addr)?,
        };
        Ok(if mtu == 0 || mtu > 65000 { 1500 } else { mtu })
    }

    /// The underlay MTU towards an address: the MTU of the interface the kernel routes it through,
    /// lowered to the route's own `mtu` metric when it has one.
    pub fn underlay_mtu(&self, dst: IpAddr) -> Result<u32, LinkError> {
        let route = self.route_get(dst)?;
        let link = self.link_mtu(&route.dev)?;
        Ok(route.mtu.map_or(link, |m| m.min(link)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_owner() {
        let own = r#"[{"ifindex":2,"ifname":"eth0","flags":["UP"],"mtu":1400,"addr_info":[{"family":"inet","local":"10.0.0.1","prefixlen":24}]}]"#;
        assert_eq!(parse_address_owner(own), Some(("eth0".into(), 1400)));
        assert_eq!(parse_address_owner("[]"), None);
        assert_eq!(parse_address_owner("garbage"), None);
        assert_eq!(parse_address_owner(r#"[{"ifname":"x"}]"#), None);
    }

    #[test]
    fn parses_route_get() {
        let direct = r#"[{"dst":"10.9.0.5","dev":"veth0","prefsrc":"10.9.0.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(
            parse_route_get(direct).unwrap(),
            RouteInfo {
                dev: "veth0".into(),
                mtu: None
            }
        );
        let with_mtu = r#"[{"dst":"10.10.0.5","gateway":"10.9.0.2","dev":"d0","prefsrc":"10.9.0.1","flags":[],"uid":0,"cache":[],"metrics":[{"mtu":1300}]}]"#;
        assert_eq!(
            parse_route_get(with_mtu).unwrap(),
            RouteInfo {
                dev: "d0".into(),
                mtu: Some(1300)
            }
        );
        assert!(parse_route_get("[]").is_err());
        assert!(parse_route_get("Error").is_err());
        assert!(parse_route_get(r#"[{"dst":"1.2.3.4"}]"#).is_err());
    }

    #[test]
    fn parses_link_mtu() {
        let j = r#"[{"ifindex":3,"link":"d1","ifname":"d0","flags":["UP"],"mtu":1400,"qdisc":"noqueue"}]"#;
        assert_eq!(parse_link_mtu(j).unwrap(), 1400);
        assert!(parse_link_mtu(r#"[{"mtu":-1}]"#).is_err());
        assert!(parse_link_mtu(r#"[{"mtu":99999999999}]"#).is_err());
        assert!(parse_link_mtu("{}").is_err());
    }

    #[test]
    fn tunnel_mtu_rule() {
        assert_eq!(tunnel_mtu(1500), 1420);
        assert_eq!(tunnel_mtu(9001), 8921);
        assert_eq!(tunnel_mtu(40), 0);
    }

    #[test]
    fn interface_names() {
        for ok in ["meshd0", "wg-a.1", "a", "x_y=z+1", "abcdefghijklmno"] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            "a b",
            "a/b",
            ".",
            "..",
            "-x",
            "123",
            "wg\n",
            "é",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn command_line_in_errors() {
        let ip = Ip::in_netns("ns1").with_program("/nonexistent/ip");
        let e = ip.set_up("wg0").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/ip -n ns1 link set dev wg0 up"),
            "{msg}"
        );
    }
}
