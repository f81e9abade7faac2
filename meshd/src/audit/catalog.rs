//! Every check of audit-checks.md: ID, section, title, severity of a failure, CIS ID, remediation.

use super::model::{Check, Severity::*};

macro_rules! check {
    ($name:ident, $id:literal, $section:literal, $sev:ident, $cis:expr, $title:literal, $fix:literal) => {
        #[doc = $title]
        pub const $name: Check = Check {
            id: $id,
            section: $section,
            title: $title,
            severity: $sev,
            cis: $cis,
            remediation: $fix,
        };
    };
}

check!(
    TLS_01,
    "TLS-01",
    "tls",
    Critical,
    None,
    "the listener speaks TLS",
    "serve TLS on this port (or close it: the kubelet's read-only port 10255 must be 0)"
);
check!(TLS_02, "TLS-02", "tls", High, None, "no SSLv3 / TLS 1.0 / TLS 1.1 accepted",
    "set the minimum TLS version to 1.2 (--tls-min-version=VersionTLS12; etcd: --tls-min-version=TLS1.2)");
check!(TLS_03, "TLS-03", "tls", High, Some("1.2.30"), "only AEAD + ECDHE cipher suites",
    "restrict --tls-cipher-suites / --cipher-suites to TLS_ECDHE_*_WITH_AES_*_GCM_* and *_CHACHA20_POLY1305_*");
check!(TLS_04, "TLS-04", "tls", High, Some("2.2"), "client certificate required where mTLS is mandated",
    "require client certificates: etcd --client-cert-auth=true / --peer-client-cert-auth=true; kubelet authentication.x509.clientCAFile");
check!(TLS_05, "TLS-05", "tls", Critical, None, "a client certificate from a foreign CA is refused",
    "trust only the component's CA for client certificates (etcd --trusted-ca-file, --client-ca-file)");
check!(TLS_06, "TLS-06", "tls", High, None, "the served chain verifies to the component's CA",
    "serve a certificate issued by the component's CA (etcd CA for etcd, cluster CA for the rest): meshd init issues them");
check!(TLS_07, "TLS-07", "tls", High, None, "the dialled name / IP is in the served certificate's SANs",
    "reissue the serving certificate with the address clients dial (meshd init --apiserver-cert-sans / node addresses)");
check!(
    TLS_08,
    "TLS-08",
    "tls",
    Medium,
    None,
    "the served certificate is the one on disk",
    "restart or reload the component so it serves the renewed certificate"
);

check!(
    CFG_01,
    "CFG-01",
    "config",
    High,
    Some("2.1"),
    "etcd serving cert/key set",
    "set etcd --cert-file and --key-file and listen on https:// client URLs"
);
check!(
    CFG_02,
    "CFG-02",
    "config",
    High,
    Some("2.2"),
    "etcd --client-cert-auth=true",
    "start etcd with --client-cert-auth=true and --trusted-ca-file"
);
check!(CFG_03, "CFG-03", "config", High, Some("2.3/2.6"), "etcd --auto-tls / --peer-auto-tls not true",
    "remove --auto-tls / --peer-auto-tls (they encrypt with unauthenticated self-signed certificates); use CA-issued certificates");
check!(CFG_04, "CFG-04", "config", High, Some("2.4/2.5"), "etcd peer cert/key and --peer-client-cert-auth=true",
    "set --peer-cert-file, --peer-key-file, --peer-trusted-ca-file and --peer-client-cert-auth=true");
check!(
    CFG_05,
    "CFG-05",
    "config",
    Medium,
    Some("2.7"),
    "etcd CA differs from the cluster CA",
    "give etcd its own CA (pki/etcd/ca.crt): a cluster-CA certificate must not open etcd"
);
check!(
    CFG_06,
    "CFG-06",
    "config",
    High,
    Some("1.2.24/1.2.27"),
    "apiserver -> etcd over TLS with --etcd-cafile/certfile/keyfile",
    "set --etcd-servers=https://..., --etcd-cafile, --etcd-certfile, --etcd-keyfile"
);
check!(
    CFG_07,
    "CFG-07",
    "config",
    High,
    Some("1.2.4/1.2.5"),
    "apiserver -> kubelet: client cert and --kubelet-certificate-authority",
    "set --kubelet-client-certificate, --kubelet-client-key and --kubelet-certificate-authority"
);
check!(
    CFG_08,
    "CFG-08",
    "config",
    High,
    Some("1.2.25/1.2.26"),
    "apiserver serving cert/key and --client-ca-file",
    "set --tls-cert-file, --tls-private-key-file and --client-ca-file"
);
check!(
    CFG_09,
    "CFG-09",
    "config",
    Medium,
    Some("1.2.30/4.2.12"),
    "cipher lists within meshd's policy",
    "set --tls-cipher-suites (kubelet: tlsCipherSuites) to ECDHE + AEAD suites only"
);
check!(
    CFG_10,
    "CFG-10",
    "config",
    High,
    Some("1.2.1/4.2.1"),
    "--anonymous-auth=false",
    "set --anonymous-auth=false (kubelet: authentication.anonymous.enabled: false)"
);
check!(CFG_11, "CFG-11", "config", High, Some("1.2.7/1.2.15/4.2.2"), "authorization Node,RBAC and NodeRestriction; kubelet not AlwaysAllow",
    "apiserver: --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction; kubelet: --authorization-mode=Webhook");
check!(
    CFG_12,
    "CFG-12",
    "config",
    High,
    Some("4.2.3/4.2.4/4.2.9"),
    "kubelet client CA, serving cert/key, read-only port 0",
    "kubelet: clientCAFile, tlsCertFile, tlsPrivateKeyFile, readOnlyPort: 0"
);
check!(
    CFG_13,
    "CFG-13",
    "config",
    Medium,
    Some("1.3.5/1.3.7/1.4.2"),
    "controller-manager and scheduler bind 127.0.0.1; --root-ca-file set",
    "--bind-address=127.0.0.1 (both); controller-manager --root-ca-file"
);
check!(
    CFG_14,
    "CFG-14",
    "config",
    High,
    Some("1.1.19-1.1.21/4.1.x"),
    "PKI keys and kubeconfigs 0600, owned by root",
    "chmod 600 the file and chown root:root it"
);

check!(CRT_01, "CRT-01", "certs", High, None, "not expired or expiring",
    "renew it: meshd renews at 2/3 of the lifetime (meshd run); `meshd init` reissues an expired leaf");
check!(
    CRT_02,
    "CRT-02",
    "certs",
    Medium,
    None,
    "valid now (no clock skew beyond the backdate)",
    "fix the clock (NTP) of this machine or of the issuer"
);
check!(
    CRT_03,
    "CRT-03",
    "certs",
    High,
    None,
    "key strength (RSA >= 2048, P-256/P-384, Ed25519; no SHA-1)",
    "reissue with a strong key and a SHA-256+ signature"
);
check!(
    CRT_06,
    "CRT-06",
    "certs",
    High,
    None,
    "chains to the right CA",
    "reissue it from the CA its role calls for"
);
check!(
    CRT_07,
    "CRT-07",
    "certs",
    Medium,
    None,
    "KU / EKU / basic constraints fit the role",
    "reissue it with the role's usages (meshd init reissues drifted leaves)"
);
check!(
    CRT_08,
    "CRT-08",
    "certs",
    High,
    None,
    "certificate and key match; PEM parses",
    "restore the matching pair or reissue it (meshd init)"
);
check!(
    CRT_09,
    "CRT-09",
    "certs",
    Low,
    None,
    "leaf lifetime within policy; the CA outlives its leaves",
    "reissue with a lifetime within the policy (<= 1 year); renew the CA before its leaves"
);

check!(NET_01, "NET-01", "overlay", High, None, "peer set = registered nodes minus self, with their keys",
    "restart meshd run on this node (it re-lists the registry), or remove stale nodes with meshd node remove");
check!(
    NET_02,
    "NET-02",
    "overlay",
    Medium,
    None,
    "every peer's latest handshake is fresh",
    "check UDP reachability of the peer's WireGuard endpoint (firewall, NAT: --keepalive 25)"
);
check!(
    NET_03,
    "NET-03",
    "overlay",
    High,
    None,
    "every remote pod subnet is in exactly one peer's AllowedIPs",
    "restart meshd run on this node; check the registry for overlapping subnets"
);
check!(
    NET_04,
    "NET-04",
    "overlay",
    Critical,
    None,
    "remote pod subnets route through the WireGuard interface",
    "delete the bypass route (ip route del <subnet>); meshd installs <cluster-cidr> dev <wg>"
);
check!(
    NET_05,
    "NET-05",
    "overlay",
    High,
    None,
    "active leak probe: pod traffic crosses the underlay only inside WireGuard",
    "see NET-04; check for a second CNI or a host route that carries pod traffic"
);
check!(
    NET_06,
    "NET-06",
    "overlay",
    High,
    None,
    "WireGuard key 0600; interface up, addressed, MTU consistent",
    "chmod 600 the key; restart meshd run"
);
check!(
    CRT_04,
    "CRT-04",
    "certs",
    High,
    None,
    "identity fits the role (CN, O)",
    "reissue it with the role's identity (meshd init reissues drifted leaves)"
);
check!(
    CRT_05,
    "CRT-05",
    "certs",
    High,
    None,
    "SAN scope: serving SANs within the node's own names and addresses",
    "reissue it with the node's own names and addresses only"
);
check!(
    CRT_10,
    "CRT-10",
    "certs",
    High,
    None,
    "no private key shared; no duplicate serial under one CA",
    "reissue one of them with a fresh key (each node makes its own keys)"
);
check!(NET_07, "NET-07", "overlay", Medium, None, "host-to-host traffic encrypted, or declared out of scope",
    "carry host-to-host traffic over TLS (the TLS-xx checks) or route node addresses through the tunnel");
