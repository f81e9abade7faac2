//! Crash safety of a rotation, with the real `meshd` binary (built with the `failpoints` feature):
//!
//! * a crash at every failpoint of the pair store (and an injected I/O error at each), then the
//!   start-up recovery: every entry has a valid, matching certificate and key;
//! * a loop of `kill -9` at random moments of a rotation, each followed by recovery and the same
//!   check;
//! * a full disk (a small tmpfs): the rotation fails naming the file and saying so, the old pairs
//!   stay live and valid, and a later rotation succeeds once there is room.
//!
//! The rotation is the real `meshd rotate --force all` (the whole control-plane inventory re-issued
//! through the pair store, the embedded `admin.conf`/`super-admin.conf` replaced atomically, after
//! the start-up recovery it runs first); the command is built in one place, [`rotate_all`]. Every check reads the files consumers read (the public
//! paths through the store's links) and verifies them with the `pki` crate, and `meshd certs check`
//! must pass; openssl cross-checks every entry at the end of each test.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use meshd_e2e::{init_dir, meshd, meshd_bin, require_tool, run};
use pki::inventory::{self, ClusterSettings, Output as EntryOutput};
use pki::keys::PrivateKey;

/// Failpoints a control plane's rotation never reaches: it makes no new directory, never replaces
/// plain files by links (that is `meshd init`'s reissue of a kubeadm directory), and is not a node's
/// rejoin or renewal through the API.
const NOT_ON_THE_ROTATION_PATH: &[&str] = &[
    "store::ensure_dir::after_mkdir",
    "pairstore::replace_with_links::before_links",
    // A node's `join --rejoin` (tests/tests/rejoin.rs).
    "rejoin::before_write",
    // A node's renewal through the API (tests/tests/rotate.rs).
    "rotate::node_after_response",
];

/// The command that rotates every control-plane certificate of `dir`: `meshd rotate --force all`
/// (which runs the start-up recovery first, under its lock).
fn rotate_all(dir: &Path) -> Command {
    let mut c = Command::new(meshd_bin());
    c.args(["rotate", "--force", "all", "--data-dir"]).arg(dir);
    c.stdin(Stdio::null());
    c
}

/// The start-up recovery, as `meshd run` and `meshd init` run it first; must succeed.
fn recover(dir: &Path) -> serde_json::Value {
    let out = run(Command::new(meshd_bin())
        .args(["debug", "recover", "--output", "json", "--data-dir"])
        .arg(dir));
    assert!(out.status.success(), "recovery failed: {}", describe(&out));
    serde_json::from_slice(&out.stdout).expect("recovery JSON")
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails clearly when the binary was built without failpoints (e.g. by a plain
/// `cargo build -p meshd`, which does not unify the e2e crate's features).
fn require_failpoints() {
    let out = meshd(&["debug", "failpoints"]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        v["enabled"],
        true,
        "{} has no failpoints: build it with `cargo build -p meshd --features failpoints` \
         (deploy/test.sh's `cargo build --workspace --all-targets` does)",
        meshd_bin().display()
    );
    let listed: Vec<&str> = v["failpoints"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert_eq!(listed, pki::failpoints::ALL, "binary and tests disagree");
}

fn settings_of(dir: &Path) -> ClusterSettings {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meshd.json")).expect("meshd.json"))
            .expect("meshd.json is JSON");
    serde_json::from_value(v["cluster"].clone()).expect("cluster settings")
}

/// The certificate and key (PEM) of every control-plane entry, read where consumers read them.
fn live_pairs(dir: &Path) -> Vec<(String, String, String)> {
    let s = settings_of(dir);
    let read = |rel: &Path| {
        std::fs::read_to_string(dir.join(rel))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(rel).display()))
    };
    let mut out = Vec::new();
    for e in inventory::control_plane_entries(&s).expect("entries") {
        let (cert, key) = match &e.output {
            EntryOutput::Pair(l) | EntryOutput::Kubeconfig { links: l, .. }
                if l.cert.is_some() || l.combined.is_some() =>
            {
                match (&l.cert, &l.key, &l.combined) {
                    (Some(c), Some(k), combined) => {
                        let (c, k) = (read(c), read(k));
                        if let Some(p) = combined {
                            assert_eq!(
                                read(p),
                                format!("{c}{}{k}", if c.ends_with('\n') { "" } else { "\n" }),
                                "{}: the combined file is not the cert and key",
                                e.id
                            );
                        }
                        (c, k)
                    }
                    (_, _, Some(p)) => {
                        let both = read(p);
                        let at = both.find("-----BEGIN").expect("PEM");
                        let key_at = both[at + 1..]
                            .find("-----BEGIN")
                            .map(|i| i + at + 1)
                            .unwrap_or_else(|| panic!("{}: no key in {}", e.id, p.display()));
                        (both[..key_at].to_string(), both[key_at..].to_string())
                    }
                    _ => panic!("{}: no file", e.id),
                }
            }
            EntryOutput::Kubeconfig { file, .. } => {
                let text = read(file);
                let field = |name: &str| -> String {
                    let v = text
                        .lines()
                        .find_map(|l| l.trim().strip_prefix(name))
                        .unwrap_or_else(|| panic!("{}: no {name}", file.display()))
                        .trim()
                        .trim_matches('"');
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(v)
                            .expect("base64"),
                    )
                    .expect("PEM")
                };
                (field("client-certificate-data:"), field("client-key-data:"))
            }
            _ => panic!("{}: no file", e.id),
        };
        out.push((e.id.to_string(), cert, key));
    }
    out
}

/// Every entry: a parseable certificate, a key that matches it, signed by its CA; `meshd certs
/// check` passes; no leftover temporary file anywhere. Returns the serial of each entry.
fn assert_all_valid(dir: &Path, when: &str) -> Vec<(String, String)> {
    let s = settings_of(dir);
    let entries = inventory::control_plane_entries(&s).expect("entries");
    let mut serials = Vec::new();
    for ((id, cert, key), e) in live_pairs(dir).into_iter().zip(&entries) {
        let der = pki::inspect::pem_to_der(&cert)
            .unwrap_or_else(|err| panic!("{when}: {id}: certificate: {err}"));
        let k = PrivateKey::from_pem_bundle(&key)
            .unwrap_or_else(|err| panic!("{when}: {id}: key: {err}"));
        assert!(
            pki::inspect::key_matches(&der, &k).expect("parse"),
            "{when}: {id}: the key does not match the certificate"
        );
        let ca_pem = std::fs::read_to_string(dir.join(e.signer.links().cert.expect("CA cert")))
            .expect("CA cert");
        let ca = pki::inspect::pem_to_der(&ca_pem).expect("CA PEM");
        if let Err(err) = pki::inspect::verify_signed_by(&der, &ca).expect("parse") {
            panic!("{when}: {id}: not signed by its CA: {err}");
        }
        serials.push((id, pki::inspect::inspect_der(&der).expect("parse").serial));
    }
    let out = run(Command::new(meshd_bin())
        .args(["certs", "check", "--data-dir"])
        .arg(dir));
    assert!(
        out.status.success(),
        "{when}: certs check: {}",
        describe(&out)
    );
    let left = leftovers(dir);
    assert!(left.is_empty(), "{when}: leftovers: {left:?}");
    serials
}

/// Temporary files and directories of interrupted writes anywhere under `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for ent in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = ent.path();
            if ent.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(p);
            } else if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    out
}

/// openssl's view of every entry: the key's public key is the certificate's, and the chain verifies.
fn openssl_check(dir: &Path) {
    require_tool("openssl", "openssl");
    let s = settings_of(dir);
    let entries = inventory::control_plane_entries(&s).expect("entries");
    let tmp = tempfile::tempdir().expect("tempdir");
    for ((id, cert, key), e) in live_pairs(dir).into_iter().zip(&entries) {
        let c = tmp.path().join(format!("{id}.crt"));
        let k = tmp.path().join(format!("{id}.key"));
        std::fs::write(&c, &cert).expect("write");
        std::fs::write(&k, &key).expect("write");
        let pub_of = |args: &[&str], f: &Path| {
            let out = run(Command::new("openssl").args(args).arg(f));
            assert!(
                out.status.success(),
                "{id}: openssl {args:?}: {}",
                describe(&out)
            );
            out.stdout
        };
        assert_eq!(
            pub_of(&["x509", "-noout", "-pubkey", "-in"], &c),
            pub_of(&["pkey", "-pubout", "-in"], &k),
            "{id}: openssl: key and certificate differ"
        );
        let ca = dir.join(e.signer.links().cert.expect("CA cert"));
        let out = run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca)
            .arg(&c));
        assert!(
            out.status.success(),
            "{id}: openssl verify: {}",
            describe(&out)
        );
    }
}

/// Plants what a crashed run can leave, so that the failpoints of its repair are reached: a staged
/// version (removed by the clean-up) and a missing link (made again by the rotation or the
/// recovery).
fn plant_leftover(dir: &Path) {
    let stage = dir.join("pki/.store/apiserver/.tmp-stage-1-0-0123456789abcdef");
    std::fs::create_dir_all(&stage).expect("mkdir");
    std::fs::write(stage.join("tls.crt"), "half").expect("write");
    let _ = std::fs::remove_file(dir.join("pki/apiserver-kubelet-client.crt"));
}

#[test]
fn a_crash_at_every_failpoint_leaves_valid_pairs_after_recovery() {
    require_failpoints();
    let d = init_dir("cp1", "127.0.0.1", &["--cert-lifetime", "1h"]);
    let dir = d.path();
    // A first rotation: every entry has a previous version, so pruning runs from now on.
    let out = run(&mut rotate_all(dir));
    assert!(out.status.success(), "{}", describe(&out));
    let mut before = assert_all_valid(dir, "before");
    let mut crashed_first = Vec::new();
    let mut crashes = 0;
    for fp in pki::failpoints::ALL {
        // The first hit, and a later one (another entry: each entry writes three files).
        for hit in [1u32, 8] {
            plant_leftover(dir);
            let spec = format!("{fp}={}*off->panic", hit - 1);
            let out = run(rotate_all(dir).env("FAILPOINTS", &spec));
            let when = format!("after a crash at {spec}");
            match (out.status.code(), out.status.signal()) {
                (Some(0), _) => {}
                (None, Some(6)) => {
                    crashes += 1;
                    if hit == 1 {
                        crashed_first.push(*fp);
                    }
                    assert!(
                        String::from_utf8_lossy(&out.stderr).contains(fp),
                        "{when}: {}",
                        describe(&out)
                    );
                }
                _ => panic!("{when}: neither a crash nor a success: {}", describe(&out)),
            }
            recover(dir);
            let after = assert_all_valid(dir, &when);
            // Every entry holds its old pair or a new one; none is lost.
            assert_eq!(after.len(), before.len());
            before = after;
        }
    }
    let expected: Vec<&str> = pki::failpoints::ALL
        .iter()
        .copied()
        .filter(|f| !NOT_ON_THE_ROTATION_PATH.contains(f))
        .collect();
    assert_eq!(
        crashed_first, expected,
        "every failpoint of the rotation path must be reached (and only those)"
    );
    eprintln!(
        "{crashes} crashes at {} failpoints, all recovered",
        expected.len()
    );
    // After all that, a rotation runs clean and replaces every certificate.
    let out = run(&mut rotate_all(dir));
    assert!(out.status.success(), "{}", describe(&out));
    let after = assert_all_valid(dir, "after a clean rotation");
    for ((id, a), (_, b)) in before.iter().zip(&after) {
        assert_ne!(a, b, "{id} was not rotated");
    }
    openssl_check(dir);
}

#[test]
fn an_io_error_at_any_failpoint_leaves_the_live_pairs_valid_without_recovery() {
    require_failpoints();
    let d = init_dir("cp1", "127.0.0.1", &["--cert-lifetime", "1h"]);
    let dir = d.path();
    let out = run(&mut rotate_all(dir));
    assert!(out.status.success(), "{}", describe(&out));
    for fp in pki::failpoints::ALL
        .iter()
        .filter(|f| !NOT_ON_THE_ROTATION_PATH.contains(f))
    {
        plant_leftover(dir);
        let out = run(rotate_all(dir).env("FAILPOINTS", format!("{fp}=return")));
        // 1: renewals failed (one line per entry on stdout, `FAILED to renew ...`); 3: the
        // start-up recovery `meshd rotate` runs first failed, and nothing was done (stderr).
        let err = match out.status.code() {
            Some(1) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Some(3) => {
                let e = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(e.contains("start-up recovery"), "{fp}: {}", describe(&out));
                e
            }
            _ => panic!("{fp}: expected exit 1 or 3: {}", describe(&out)),
        };
        assert!(
            err.contains(&format!("failpoint {fp}")) && err.contains(&dir.display().to_string()),
            "{fp}: the error names the file: {}",
            describe(&out)
        );
        // No recovery: an error mid-rotation never leaves a broken live pair. (What was planted
        // may still be there when the error came before its repair.)
        let _ = std::fs::remove_dir_all(
            dir.join("pki/.store/apiserver/.tmp-stage-1-0-0123456789abcdef"),
        );
        if !dir.join("pki/apiserver-kubelet-client.crt").exists() {
            std::os::unix::fs::symlink(
                ".store/apiserver-kubelet-client/current/tls.crt",
                dir.join("pki/apiserver-kubelet-client.crt"),
            )
            .expect("link");
        }
        assert_all_valid(dir, &format!("after an I/O error at {fp}"));
    }
}

/// A small pseudo-random generator (xorshift), seeded from the clock; the seed is printed so that
/// a failing run can be replayed with `MESHD_CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("MESHD_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("random kill loop: MESHD_CRASH_SEED={seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn random_kill_9_during_rotations() {
    let iterations: u32 = std::env::var("MESHD_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let d = init_dir("cp1", "127.0.0.1", &["--cert-lifetime", "1h"]);
    let dir = d.path();
    let mut rng = Rng::new();
    // Kill anywhere from the start to past the end of a rotation: at least 0-40 ms, more when a
    // whole rotation takes longer on this machine.
    let t0 = Instant::now();
    let out = run(&mut rotate_all(dir));
    assert!(out.status.success(), "{}", describe(&out));
    let range_us = (t0.elapsed().as_micros() as u64 * 6 / 5).max(40_000);
    let (mut killed, mut finished) = (0u32, 0u32);
    let mut rolled_back = 0usize;
    // How many entries each interrupted rotation had replaced: the kills land all along the way.
    let mut progress = std::collections::BTreeMap::<usize, u32>::new();
    let mut serials = assert_all_valid(dir, "before");
    let started = Instant::now();
    for i in 0..iterations {
        let delay = Duration::from_micros(rng.below(range_us));
        let mut child = rotate_all(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().expect("wait");
        match (status.code(), status.signal()) {
            (Some(0), _) => finished += 1,
            (None, Some(9)) => killed += 1,
            _ => panic!("iteration {i}: rotation ended with {status}"),
        }
        let r = recover(dir);
        rolled_back += r
            .as_array()
            .map(|a| a.iter().filter(|x| x["action"] == "rolled-back").count())
            .unwrap_or(0);
        let now = assert_all_valid(
            dir,
            &format!("iteration {i} (kill after {delay:?}, {status})"),
        );
        let changed = serials.iter().zip(&now).filter(|(a, b)| a != b).count();
        *progress.entry(changed).or_default() += 1;
        serials = now;
    }
    eprintln!(
        "{iterations} rotations in {:?} (kills 0-{} ms after the start): {killed} killed, {finished} finished first; \
         {rolled_back} roll-backs; entries replaced before the kill -> iterations: {progress:?}",
        started.elapsed(),
        range_us / 1000
    );
    assert!(
        killed > 0,
        "no rotation was interrupted: the kill loop tested nothing"
    );
    openssl_check(dir);
}

/// A tmpfs mounted for the test, unmounted when dropped (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("meshd-diskfull-")
            .tempdir()
            .expect("tempdir");
        let out = run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path()));
        assert!(
            out.status.success(),
            "mount tmpfs (the tests run as root): {}",
            describe(&out)
        );
        Tmpfs { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = self.dir.path();
        let ok = Command::new("umount")
            .arg(p)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Writes a file until the file system is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).expect("filler");
    let chunk = vec![0u8; 4096];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    let _ = f.sync_all();
    p
}

#[test]
fn disk_full_during_a_rotation_keeps_the_old_pairs() {
    let fs = Tmpfs::mount("4m");
    let data = fs.path().join("meshd");
    let d = data.to_str().expect("utf-8").to_owned();
    let out = meshd(&[
        "init",
        "--data-dir",
        &d,
        "--node-name",
        "cp1",
        "--advertise-address",
        "127.0.0.1",
        "--cert-lifetime",
        "1h",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let before = live_pairs(&data);
    let serials = assert_all_valid(&data, "before");
    let filler = fill(fs.path());

    let out = run(&mut rotate_all(&data));
    // Exit 1: the renewals failed, one `FAILED to renew <id>: ...` line each (stdout).
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("FAILED to renew")
            && err.contains("No space left on device")
            && err.contains(&d),
        "the error says what and where: {}",
        describe(&out)
    );
    // The old pairs are live, unchanged and valid, and nothing half-written is left.
    assert_eq!(live_pairs(&data), before, "a live pair changed");
    assert_eq!(assert_all_valid(&data, "disk full"), serials);
    // Recovery has nothing to repair.
    let r = recover(&data);
    assert_eq!(r, serde_json::json!([]), "{r:#}");

    // Room again: the next rotation succeeds and replaces every certificate.
    std::fs::remove_file(&filler).expect("free the space");
    let out = run(&mut rotate_all(&data));
    assert!(out.status.success(), "{}", describe(&out));
    let after = assert_all_valid(&data, "after freeing space");
    for ((id, a), (_, b)) in serials.iter().zip(&after) {
        assert_ne!(a, b, "{id} was not rotated");
    }
    openssl_check(&data);
}

/// `meshd run` starts with the recovery: a live pair damaged behind meshd's back (as by storage that
/// lost a write) is rolled back before the API loads its certificate, and leftovers are removed.
#[test]
fn meshd_run_starts_with_the_recovery() {
    let port = meshd_e2e::free_port();
    let d = init_dir(
        "cp1",
        "127.0.0.1",
        &["--cert-lifetime", "1h", "--api-port", &port.to_string()],
    );
    let dir = d.path();
    let out = run(&mut rotate_all(dir));
    assert!(out.status.success(), "{}", describe(&out));
    let old_api = std::fs::read_to_string(dir.join("pki/.store/meshd-api/1/tls.crt")).expect("v1");
    // The live meshd-api certificate is torn, and a staged version is left over.
    let live = dir.join("pki/.store/meshd-api/2/tls.crt");
    let text = std::fs::read_to_string(&live).expect("v2");
    std::fs::write(&live, &text[..text.len() / 3]).expect("tear");
    plant_leftover(dir);
    let out = run(Command::new(meshd_bin())
        .args(["certs", "check", "--data-dir"])
        .arg(dir));
    assert!(
        !out.status.success(),
        "the damage shows: {}",
        describe(&out)
    );

    let log = dir.join("run.log");
    let mut g = meshd_e2e::ChildGuard::spawn(
        "meshd run",
        Command::new(meshd_bin())
            .args(["run", "--no-mesh", "--data-dir"])
            .arg(dir),
        &log,
    );
    let up = meshd_e2e::wait_for(Duration::from_secs(20), || {
        if !g.alive() {
            return Some(false);
        }
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        l.contains("meshd API listening on").then_some(true)
    });
    let l = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(up, Some(true), "meshd run did not start:\n{l}");
    assert!(
        l.contains(
            "meshd run: start-up recovery: meshd-api: the live pair (version 2) was not valid"
        ) && l.contains("rolled back to version 1"),
        "{l}"
    );
    drop(g);
    assert_eq!(
        std::fs::read_to_string(dir.join("pki/meshd/api-server.crt")).expect("live"),
        old_api
    );
    std::fs::remove_file(&log).expect("log");
    assert_all_valid(dir, "after meshd run's recovery");
}

/// `meshd rotate` starts with the same recovery, under its lock: a torn live pair is rolled back
/// before planning, and the report says so (table and JSON).
#[test]
fn meshd_rotate_starts_with_the_recovery() {
    let d = init_dir("cp1", "127.0.0.1", &["--cert-lifetime", "1h"]);
    let dir = d.path();
    let out = run(&mut rotate_all(dir));
    assert!(out.status.success(), "{}", describe(&out));
    let old_api = std::fs::read_to_string(dir.join("pki/.store/meshd-api/1/tls.crt")).expect("v1");
    let live = dir.join("pki/.store/meshd-api/2/tls.crt");
    let text = std::fs::read_to_string(&live).expect("v2");
    std::fs::write(&live, &text[..text.len() / 3]).expect("tear");
    plant_leftover(dir);
    // Nothing is due (1 h leaves): the pass only recovers.
    let out = run(Command::new(meshd_bin())
        .args(["rotate", "--output", "json", "--data-dir"])
        .arg(dir));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let recovered: Vec<&str> = v["recovered"]
        .as_array()
        .unwrap_or_else(|| panic!("no `recovered` in {v:#}"))
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        recovered
            .iter()
            .any(|r| r.contains("meshd-api") && r.contains("rolled back to version 1")),
        "{recovered:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("pki/meshd/api-server.crt")).expect("live"),
        old_api
    );
    assert_all_valid(dir, "after meshd rotate's recovery");
    // A second pass has nothing to recover and, nothing being due, says nothing.
    let out = run(Command::new(meshd_bin())
        .args(["rotate", "--data-dir"])
        .arg(dir));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
}
