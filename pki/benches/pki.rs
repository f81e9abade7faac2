//! Benchmarks of the PKI engine, in process and single-threaded (criterion runs one thread, so every
//! figure is per core).
//!
//! * `pki/csr_parse_and_sign`: a kubelet serving CSR (CN `system:node:n1`, O `system:nodes`, DNS `n1`,
//!   one IP) parsed from PEM (self-signature verified) and signed under a [`SigningPolicy`].
//! * `pki/csr_sign_only`: the same, with the CSR parsed once outside the loop.
//! * `pki/csr_parse_only`: parsing alone (DER decode, self-signature verified, SANs read).
//! * `pki/inventory_issue_all`: every entry of the control-plane inventory issued in memory (a fresh
//!   P-256 key and a CA signature per entry), with the three CAs created outside the loop.
//! * `pki/inspect_der`: parsing one issued leaf with [`pki::inspect::inspect_der`].
//! * `pki/keygen_p256`: one P-256 key alone, to show how much of an issued entry is key generation.
//! * `pki/ring_p256_sign`, `pki/ring_p256_verify`: one raw ECDSA P-256/SHA-256 signature and one
//!   verification with *ring* over a 300-byte message (about a TBSCertificate), the floor under the
//!   figures above and the counterpart of `openssl speed ecdsap256`.
//!
//! Run with `cargo bench -p meshd-pki --bench pki`; `deploy/bench/pki-vs-openssl.sh` runs it and
//! compares the figures with the openssl CLI and cfssl in the same run.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use pki::ca::{CertificateAuthority, LeafProfile, Usage, DEFAULT_BACKDATE, DEFAULT_CA_LIFETIME};
use pki::csr::{self, CsrLimits, SigningPolicy};
use pki::inventory::{self, CaSet, ClusterSettings, DEFAULT_LEAF_LIFETIME};
use pki::keys::{KeyAlgorithm, PrivateKey};

fn node_ip() -> IpAddr {
    "192.0.2.21".parse().expect("literal IP")
}

fn node_policy() -> SigningPolicy {
    SigningPolicy {
        common_name: "system:node:n1".into(),
        organizations: vec!["system:nodes".into()],
        allowed_dns_names: vec!["n1".into()],
        allowed_ip_addresses: vec![node_ip()],
        usage: Usage::Server,
        require_san: true,
        lifetime: Duration::from_secs(365 * 86400),
        max_lifetime: Duration::from_secs(366 * 86400),
        backdate: DEFAULT_BACKDATE,
    }
}

/// The CSR a joining node sends for its kubelet serving certificate, PEM.
fn node_csr_pem() -> String {
    let profile = LeafProfile {
        common_name: "system:node:n1".into(),
        organizations: vec!["system:nodes".into()],
        dns_names: vec!["n1".into()],
        ip_addresses: vec![node_ip()],
        usage: Usage::Server,
    };
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("node key");
    csr::build_csr(&profile, &key).expect("node CSR")
}

fn settings() -> ClusterSettings {
    ClusterSettings {
        cluster_name: "kubernetes".into(),
        node_name: "cp1".into(),
        advertise_address: "192.0.2.10".parse().expect("literal IP"),
        apiserver_port: 6443,
        service_cidr: "10.96.0.0/12".parse().expect("literal CIDR"),
        cluster_cidr: "10.244.0.0/16".parse().expect("literal CIDR"),
        cluster_domain: "cluster.local".into(),
        apiserver_cert_sans: vec!["api.example.com".into(), "198.51.100.7".into()],
        etcd_peer_addresses: vec![],
        api_port: 7443,
        key_algorithm: KeyAlgorithm::EcdsaP256,
        leaf_lifetime_secs: DEFAULT_LEAF_LIFETIME.as_secs(),
        ca_lifetime_secs: DEFAULT_CA_LIFETIME.as_secs(),
    }
}

fn benches(c: &mut Criterion) {
    let now = SystemTime::now();
    let ca = CertificateAuthority::create(
        "kubernetes",
        KeyAlgorithm::EcdsaP256,
        DEFAULT_CA_LIFETIME,
        now,
    )
    .expect("cluster CA");
    let policy = node_policy();
    let limits = CsrLimits::default();
    let csr_pem = node_csr_pem();
    let parsed = csr::parse_csr_pem(&csr_pem, &limits).expect("CSR parses");

    // Sanity: what is measured really is a valid signature under the policy.
    let leaf = csr::sign_csr(&ca, &parsed, &policy, now).expect("CSR signs");
    let info = pki::inspect::inspect_der(&leaf.der).expect("leaf parses");
    assert_eq!(info.common_name.as_deref(), Some("system:node:n1"));
    assert_eq!(info.dns_names, vec!["n1"]);
    assert!(pki::inspect::verify_signed_by(&leaf.der, ca.cert_der())
        .expect("parse")
        .is_ok());

    let mut g = c.benchmark_group("pki");
    g.throughput(Throughput::Elements(1));

    g.bench_function("csr_parse_and_sign", |b| {
        b.iter(|| {
            let csr = csr::parse_csr_pem(black_box(&csr_pem), &limits).expect("parse");
            csr::sign_csr(&ca, &csr, &policy, now).expect("sign")
        })
    });

    g.bench_function("csr_sign_only", |b| {
        b.iter(|| csr::sign_csr(&ca, black_box(&parsed), &policy, now).expect("sign"))
    });

    g.bench_function("csr_parse_only", |b| {
        b.iter(|| csr::parse_csr_pem(black_box(&csr_pem), &limits).expect("parse"))
    });

    // The whole control-plane inventory, with existing CAs.
    let s = settings();
    let cas = CaSet::create(KeyAlgorithm::EcdsaP256, DEFAULT_CA_LIFETIME, now).expect("CAs");
    let entries = inventory::control_plane_entries(&s).expect("inventory");
    let validity = s.leaf_validity();
    g.throughput(Throughput::Elements(entries.len() as u64));
    // ~0.7 ms an iteration: 50 samples fit the 3 s measurement window.
    g.sample_size(50);
    g.bench_function("inventory_issue_all", |b| {
        b.iter(|| {
            entries
                .iter()
                .map(|e| {
                    inventory::issue_entry(e, &cas, s.key_algorithm, validity, now).expect("issue")
                })
                .collect::<Vec<_>>()
        })
    });

    g.sample_size(100);
    g.throughput(Throughput::Elements(1));
    g.bench_function("inspect_der", |b| {
        b.iter(|| pki::inspect::inspect_der(black_box(&leaf.der)).expect("inspect"))
    });

    g.bench_function("keygen_p256", |b| {
        b.iter(|| PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("keygen"))
    });

    // Raw ECDSA P-256 with ring: what every signature above costs at the bottom.
    use ring::signature::{self as sig, EcdsaKeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let alg = &sig::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("pkcs8");
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("pair");
    let msg = [0x5au8; 300];
    g.bench_function("ring_p256_sign", |b| {
        b.iter(|| pair.sign(&rng, black_box(&msg)).expect("sign"))
    });
    let signature = pair.sign(&rng, &msg).expect("sign");
    let public = sig::UnparsedPublicKey::new(
        &sig::ECDSA_P256_SHA256_ASN1,
        pair.public_key().as_ref().to_vec(),
    );
    g.bench_function("ring_p256_verify", |b| {
        b.iter(|| {
            public
                .verify(black_box(&msg), signature.as_ref())
                .expect("verify")
        })
    });
    g.finish();

    // For the report: how many certificates one inventory run issues.
    eprintln!("inventory entries: {}", entries.len());
}

criterion_group! {
    name = pki_benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(pki_benches);
