//! The atomic file store.
//!
//! * Every file is written to a temporary file in the same directory, fsynced, renamed into place, and
//!   the directory fsynced: a reader sees the old content or the new, never a torn file.
//! * Keys are created `0600` with `create_new`; directories `0700`. A private key readable by group or
//!   others, or owned by another user, is refused with its path and mode.
//! * Certificate/key pairs are versioned: `pki/.store/<id>/<n>/{tls.crt,tls.key,tls.pem}` with a
//!   `current` symlink that is swapped atomically by rename. The files consumers know
//!   (`pki/apiserver.crt`, `pki/apiserver.key`, ...) are symlinks through `current`, so a single rename
//!   switches cert and key together: the directory never holds a certificate beside a key that does not
//!   match it, and `tls.pem` (cert and key in one file, as kubelet's `-current.pem`) gives a reader that
//!   opens one file a consistent pair. The previous version is kept for rollback.
//! * A public path is only ever created as a link, never replaced: a regular file there (a kubeadm
//!   directory read in place) or a symlink pointing anywhere else stops [`PairStore::ensure_links`]
//!   with the path named. Replacing the plain files of a pair is a deliberate, separate step
//!   ([`PairStore::replace_with_links`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{PkiError, Result};
use crate::keys::SecretPem;

/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub const CERT_MODE: u32 = 0o644;
/// Mode of directories meshd creates.
pub const DIR_MODE: u32 = 0o700;

const STORE_DIR: &str = "pki/.store";
const TMP_PREFIX: &str = ".tmp-";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |e| PkiError::io(path, e)
}

/// Creates `dir` and any missing parents with mode `0700`, and fsyncs each new entry's parent.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            ensure_dir(parent)?;
        }
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(PkiError::io(dir, e)),
    }
    crate::failpoint!("store::ensure_dir::after_mkdir", dir);
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(io(dir))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// fsyncs a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d).and_then(|f| f.sync_all()).map_err(io(d))
}

/// A temporary name in `dir`: `.tmp-<base>-<pid>-<n>-<random>`. The random part keeps a leftover of
/// a crashed run from colliding with a later process that got the same pid (`create_new` would fail).
fn tmp_name(dir: &Path, base: &str) -> Result<PathBuf> {
    use ring::rand::SecureRandom;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut r = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut r)
        .map_err(|_| PkiError::crypto("the system random source failed"))?;
    Ok(dir.join(format!(
        "{TMP_PREFIX}{base}-{}-{n}-{}",
        std::process::id(),
        hex::encode(r)
    )))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    crate::failpoint!("store::write_new::after_create", path);
    // The umask may have cleared bits we asked for; never leave more than `mode`.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    crate::failpoint!("store::write_new::before_fsync", path);
    f.sync_all().map_err(io(path))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically with `mode` (temp file, fsync, rename, fsync of the directory).
/// On any error the previous content of `path` is untouched and the temp file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_dir(dir)?;
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tmp_name(dir, &base)?;
    let res = (|| {
        write_new(&tmp, bytes, mode)?;
        crate::failpoint!("store::write_atomic::before_rename", path);
        fs::rename(&tmp, path).map_err(io(path))?;
        crate::failpoint!("store::write_atomic::before_dir_fsync", dir);
        sync_dir(dir)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// The rename that switches `current` of a pair.
fn rename_current(tmp: &Path, cur: &Path) -> Result<()> {
    crate::failpoint!("pairstore::point_current::before_current_rename", cur);
    fs::rename(tmp, cur).map_err(io(cur))
}

/// Reads a file as UTF-8 text, with the path in any error.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(io(path))?;
    String::from_utf8(bytes)
        .map_err(|_| PkiError::bad_file(path, "not UTF-8 text (is it a PEM file?)"))
}

/// Checks that a private key file is accessible only by its owner and owned by the current user.
pub fn check_key_file(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecureKeyMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(PkiError::KeyOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: me,
        });
    }
    Ok(())
}

/// Reads a private key file after [`check_key_file`].
pub fn read_key_file(path: &Path) -> Result<SecretPem> {
    check_key_file(path)?;
    let bytes = zeroize::Zeroizing::new(fs::read(path).map_err(io(path))?);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| PkiError::bad_file(path, "not UTF-8 text (is it a PEM file?)"))?;
    Ok(SecretPem::new(text.to_owned()))
}

/// Where the files of a versioned pair are exposed, relative to the data directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairLinks {
    /// The certificate (e.g. `pki/apiserver.crt`).
    pub cert: Option<PathBuf>,
    /// The private key (e.g. `pki/apiserver.key`).
    pub key: Option<PathBuf>,
    /// Certificate and key in one file (e.g. `kubelet/pki/kubelet-client-current.pem`).
    pub combined: Option<PathBuf>,
}

/// A pair read from the store.
#[derive(Debug)]
pub struct StoredPair {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: SecretPem,
    /// The version directory it was read from.
    pub version_dir: PathBuf,
    /// The version number.
    pub version: u64,
}

/// What is at one public path of a pair (`pki/apiserver.crt`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicPath {
    /// Nothing, not even a dangling symlink.
    Missing,
    /// meshd's link through the entry's `current` version.
    Linked,
    /// A symlink into the entry's own store directory that is not meshd's link (its target).
    IntoEntry(PathBuf),
    /// A symlink anywhere else (its target), e.g. kubelet's `kubelet-client-current.pem`.
    Foreign(PathBuf),
    /// A regular file (or another non-directory): a pair kept as plain files, read in place.
    File,
    /// A directory.
    Directory,
}

/// Lexically resolves `.` and `..` (no file system access): `a/b/../c` is `a/c`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                let up = matches!(
                    out.components().next_back(),
                    None | Some(Component::ParentDir)
                );
                if up || !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Versioned certificate/key pairs under `<data-dir>/pki/.store`.
#[derive(Clone, Debug)]
pub struct PairStore {
    data_dir: PathBuf,
}

impl PairStore {
    /// A store rooted at `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PairStore {
            data_dir: data_dir.into(),
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the versions of entry `id`.
    pub fn entry_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join(STORE_DIR).join(id)
    }

    /// The ids of every entry of the store (`pki/.store/<id>`), sorted; leftovers of interrupted
    /// writes are not entries.
    pub fn entries(&self) -> Result<Vec<String>> {
        let root = self.data_dir.join(STORE_DIR);
        let rd = match fs::read_dir(&root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PkiError::io(&root, e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(io(&root))?;
            let is_dir = ent.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if let (true, Some(id)) = (is_dir, ent.file_name().to_str()) {
                if !id.starts_with(TMP_PREFIX) {
                    out.push(id.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The version numbers of `id` present on disk, ascending (complete versions only: a staged,
    /// unrenamed version is a temporary directory).
    pub fn versions(&self, id: &str) -> Result<Vec<u64>> {
        let dir = self.entry_dir(id);
        let mut out = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(PkiError::io(&dir, e)),
        };
        for ent in rd {
            let ent = ent.map_err(io(&dir))?;
            if let Some(n) = ent.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The version `current` points at, if any.
    pub fn current_version(&self, id: &str) -> Result<Option<u64>> {
        let link = self.entry_dir(id).join("current");
        match fs::read_link(&link) {
            Ok(t) => Ok(t.to_str().and_then(|s| s.parse().ok())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PkiError::io(&link, e)),
        }
    }

    /// The newest version older than `current`, kept for rollback.
    pub fn previous_version(&self, id: &str) -> Result<Option<u64>> {
        let Some(cur) = self.current_version(id)? else {
            return Ok(None);
        };
        Ok(self.versions(id)?.into_iter().filter(|v| *v < cur).max())
    }

    /// Reads the current pair of `id` (resolving `current` once, so cert and key come from one
    /// version). `None` when the entry has no current version.
    pub fn read_current(&self, id: &str) -> Result<Option<StoredPair>> {
        match self.current_version(id)? {
            Some(v) => self.read_version(id, v).map(Some),
            None => Ok(None),
        }
    }

    /// Reads version `v` of `id`.
    pub fn read_version(&self, id: &str, v: u64) -> Result<StoredPair> {
        let dir = self.entry_dir(id).join(v.to_string());
        let cert_pem = read_text(&dir.join("tls.crt"))?;
        let key_pem = read_key_file(&dir.join("tls.key"))?;
        Ok(StoredPair {
            cert_pem,
            key_pem,
            version_dir: dir,
            version: v,
        })
    }

    /// Writes a new version of `id` and makes it current in one atomic step, then makes sure the
    /// public links exist. Returns the new version number.
    ///
    /// The public paths are checked first: when one holds anything but meshd's link (or nothing),
    /// nothing is written and the error names it.
    pub fn write_pair(
        &self,
        id: &str,
        cert_pem: &str,
        key_pem: &SecretPem,
        links: &PairLinks,
    ) -> Result<u64> {
        self.check_links(id, links)?;
        let v = self.write_version(id, cert_pem, key_pem)?;
        self.ensure_links(id, links)?;
        Ok(v)
    }

    /// Writes a new version of `id` and makes it current in one atomic step, without touching the
    /// public paths (see [`PairStore::ensure_links`] and [`PairStore::replace_with_links`]). Keeps
    /// the previous version for rollback. Returns the new version number.
    pub fn write_version(&self, id: &str, cert_pem: &str, key_pem: &SecretPem) -> Result<u64> {
        let entry = self.entry_dir(id);
        ensure_dir(&entry)?;
        self.cleanup_tmp(id)?;
        let next = self.versions(id)?.last().copied().unwrap_or(0) + 1;
        let stage = tmp_name(&entry, "stage")?;
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&stage)
            .map_err(io(&stage))?;
        let staged = (|| {
            crate::failpoint!("pairstore::write_version::after_stage_mkdir", &stage);
            write_new(&stage.join("tls.crt"), cert_pem.as_bytes(), CERT_MODE)?;
            crate::failpoint!("pairstore::write_version::after_cert", &stage);
            write_new(
                &stage.join("tls.key"),
                key_pem.expose().as_bytes(),
                KEY_MODE,
            )?;
            crate::failpoint!("pairstore::write_version::after_key", &stage);
            let mut both = zeroize::Zeroizing::new(String::with_capacity(
                cert_pem.len() + key_pem.expose().len() + 1,
            ));
            both.push_str(cert_pem);
            if !cert_pem.ends_with('\n') {
                both.push('\n');
            }
            both.push_str(key_pem.expose());
            write_new(&stage.join("tls.pem"), both.as_bytes(), KEY_MODE)?;
            crate::failpoint!("pairstore::write_version::before_stage_fsync", &stage);
            sync_dir(&stage)?;
            let final_dir = entry.join(next.to_string());
            crate::failpoint!("pairstore::write_version::before_stage_rename", &final_dir);
            fs::rename(&stage, &final_dir).map_err(io(&final_dir))?;
            crate::failpoint!("pairstore::write_version::before_entry_fsync", &entry);
            sync_dir(&entry)
        })();
        if let Err(e) = staged {
            let _ = fs::remove_dir_all(&stage);
            return Err(e);
        }
        crate::failpoint!(
            "pairstore::write_version::before_current_switch",
            entry.join("current")
        );
        self.point_current(id, next)?;
        crate::failpoint!("pairstore::write_version::before_prune", &entry);
        self.prune(id)?;
        Ok(next)
    }

    /// Atomically points `current` of `id` at version `v` (used by rollback).
    pub fn point_current(&self, id: &str, v: u64) -> Result<()> {
        let entry = self.entry_dir(id);
        let tmp = tmp_name(&entry, "current")?;
        std::os::unix::fs::symlink(v.to_string(), &tmp).map_err(io(&tmp))?;
        let cur = entry.join("current");
        if let Err(e) = rename_current(&tmp, &cur) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        crate::failpoint!("pairstore::point_current::before_dir_fsync", &entry);
        sync_dir(&entry)
    }

    /// The public paths of `links` (relative to the data directory), each with the file of a version
    /// it exposes (`tls.crt`, `tls.key`, `tls.pem`).
    fn public_files(links: &PairLinks) -> impl Iterator<Item = (&PathBuf, &'static str)> {
        [
            (&links.cert, "tls.crt"),
            (&links.key, "tls.key"),
            (&links.combined, "tls.pem"),
        ]
        .into_iter()
        .filter_map(|(rel, file)| rel.as_ref().map(|r| (r, file)))
    }

    /// The target of meshd's link at `rel` (relative to the data directory) for `file` of `id`:
    /// `../../pki/.store/<id>/current/<file>`, as many `..` as `rel` has parents.
    fn link_target(id: &str, rel: &Path, file: &str) -> PathBuf {
        let depth = rel
            .parent()
            .map(|p| {
                p.components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .count()
            })
            .unwrap_or(0);
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push(STORE_DIR);
        target.push(id);
        target.push("current");
        target.push(file);
        target
    }

    /// What is at the public path `rel` (relative to the data directory) that exposes `file`
    /// (`tls.crt`, `tls.key` or `tls.pem`) of `id`.
    pub fn link_state(&self, id: &str, rel: &Path, file: &str) -> Result<PublicPath> {
        let path = self.data_dir.join(rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PublicPath::Missing),
            Err(e) => return Err(PkiError::io(&path, e)),
        };
        if !meta.file_type().is_symlink() {
            return Ok(if meta.is_dir() {
                PublicPath::Directory
            } else {
                PublicPath::File
            });
        }
        let target = fs::read_link(&path).map_err(io(&path))?;
        if target == Self::link_target(id, rel, file) {
            return Ok(PublicPath::Linked);
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        if normalize(&dir.join(&target)).starts_with(normalize(&self.entry_dir(id))) {
            Ok(PublicPath::IntoEntry(target))
        } else {
            Ok(PublicPath::Foreign(target))
        }
    }

    /// [`PairStore::link_state`] of every public path of `links`, with the path (relative to the data
    /// directory).
    pub fn link_states(&self, id: &str, links: &PairLinks) -> Result<Vec<(PathBuf, PublicPath)>> {
        Self::public_files(links)
            .map(|(rel, file)| Ok((rel.clone(), self.link_state(id, rel, file)?)))
            .collect()
    }

    /// Checks that every public path of `links` is either free or meshd's link through `current`
    /// of `id`, so that [`PairStore::ensure_links`] will not refuse; the error names the first path
    /// that holds something else.
    pub fn check_links(&self, id: &str, links: &PairLinks) -> Result<()> {
        for (rel, file) in Self::public_files(links) {
            match self.link_state(id, rel, file)? {
                PublicPath::Missing | PublicPath::Linked => {}
                other => return Err(self.occupied(id, rel, file, &other)),
            }
        }
        Ok(())
    }

    fn occupied(&self, id: &str, rel: &Path, file: &str, state: &PublicPath) -> PkiError {
        let what = match state {
            PublicPath::File => "is a regular file".to_string(),
            PublicPath::Directory => "is a directory".to_string(),
            PublicPath::IntoEntry(t) | PublicPath::Foreign(t) => {
                format!("is a symlink to {}", t.display())
            }
            PublicPath::Missing | PublicPath::Linked => "is in the way".to_string(),
        };
        PkiError::bad_file(
            self.data_dir.join(rel),
            format!(
                "{what}, not meshd's link to {}; meshd does not replace it (move it away to let meshd manage this file)",
                Path::new(STORE_DIR).join(id).join("current").join(file).display()
            ),
        )
    }

    /// Makes the public links of `id` point through `current` (idempotent). Only creates links where
    /// nothing is: a regular file, or a symlink pointing anywhere else, is never replaced; the error
    /// names it (and no link is made).
    pub fn ensure_links(&self, id: &str, links: &PairLinks) -> Result<()> {
        self.check_links(id, links)?;
        for (rel, file) in Self::public_files(links) {
            self.link(id, rel, file)?;
        }
        Ok(())
    }

    /// Replaces whatever is at the public paths of `id` (the plain files of a pair found in place, a
    /// symlink elsewhere) by meshd's links through `current`. For a pair the caller has decided to
    /// reissue, after [`PairStore::write_version`]: every old file is removed first, then the links
    /// are made, so a crash in between leaves only missing paths and meshd links, which a reader
    /// resolves through the store. Returns the paths whose old content was removed. A directory in
    /// the way is refused.
    pub fn replace_with_links(&self, id: &str, links: &PairLinks) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for (rel, file) in Self::public_files(links) {
            match self.link_state(id, rel, file)? {
                PublicPath::Missing | PublicPath::Linked => {}
                PublicPath::Directory => {
                    return Err(self.occupied(id, rel, file, &PublicPath::Directory))
                }
                PublicPath::File | PublicPath::IntoEntry(_) | PublicPath::Foreign(_) => {
                    let p = self.data_dir.join(rel);
                    fs::remove_file(&p).map_err(io(&p))?;
                    removed.push(p);
                }
            }
        }
        for p in &removed {
            sync_dir(p.parent().unwrap_or(Path::new(".")))?;
        }
        crate::failpoint!(
            "pairstore::replace_with_links::before_links",
            &self.data_dir
        );
        self.ensure_links(id, links)?;
        Ok(removed)
    }

    /// Creates meshd's link at `rel` if nothing is there (atomically: `symlink` never replaces).
    fn link(&self, id: &str, rel: &Path, file: &str) -> Result<()> {
        let target = Self::link_target(id, rel, file);
        let path = self.data_dir.join(rel);
        match self.link_state(id, rel, file)? {
            PublicPath::Linked => return Ok(()),
            PublicPath::Missing => {}
            other => return Err(self.occupied(id, rel, file, &other)),
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        ensure_dir(dir)?;
        match std::os::unix::fs::symlink(&target, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Made by someone else since we looked: fine only if it is the same link.
                return match self.link_state(id, rel, file)? {
                    PublicPath::Linked => Ok(()),
                    other => Err(self.occupied(id, rel, file, &other)),
                };
            }
            Err(e) => return Err(PkiError::io(&path, e)),
        }
        crate::failpoint!("pairstore::link::before_dir_fsync", dir);
        sync_dir(dir)
    }

    /// Removes leftovers of an interrupted write of `id`; returns how many were removed.
    pub fn cleanup_tmp(&self, id: &str) -> Result<usize> {
        let entry = self.entry_dir(id);
        let rd = match fs::read_dir(&entry) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(PkiError::io(&entry, e)),
        };
        let mut n = 0;
        for ent in rd.flatten() {
            if ent.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let p = ent.path();
                let r = if p.is_dir() && !p.is_symlink() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                r.map_err(io(&p))?;
                crate::failpoint!("pairstore::cleanup_tmp::after_remove", &p);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes leftovers of interrupted writes of every entry of the store, including entries that
    /// will not be written again (a kept pair); returns how many were removed. Callers hold the data
    /// directory's lock, so no write is in progress.
    pub fn cleanup_all_tmp(&self) -> Result<usize> {
        let root = self.data_dir.join(STORE_DIR);
        let rd = match fs::read_dir(&root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(PkiError::io(&root, e)),
        };
        let mut n = 0;
        for ent in rd.flatten() {
            let is_dir = ent.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if let (true, Some(id)) = (is_dir, ent.file_name().to_str()) {
                if !id.starts_with(TMP_PREFIX) {
                    n += self.cleanup_tmp(id)?;
                }
            }
        }
        Ok(n)
    }

    /// Keeps `current` and the version before it; removes the rest.
    fn prune(&self, id: &str) -> Result<()> {
        let Some(cur) = self.current_version(id)? else {
            return Ok(());
        };
        let prev = self.previous_version(id)?;
        for v in self.versions(id)? {
            if v != cur && Some(v) != prev {
                let p = self.entry_dir(id).join(v.to_string());
                fs::remove_dir_all(&p).map_err(io(&p))?;
                crate::failpoint!("pairstore::prune::after_remove", &p);
            }
        }
        Ok(())
    }
}

/// Removes temporary files an interrupted atomic write left in `dir` (not recursive).
pub fn cleanup_tmp_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(PkiError::io(dir, e)),
    };
    for ent in rd.flatten() {
        if ent.file_name().to_string_lossy().starts_with(TMP_PREFIX) && !ent.path().is_dir() {
            fs::remove_file(ent.path()).map_err(io(&ent.path()))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SecretPem {
        SecretPem::new(s.to_string())
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/file.key");
        write_atomic(&p, b"one", KEY_MODE).unwrap();
        write_atomic(&p, b"two", KEY_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(d.path().join("a")).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn insecure_key_mode_is_refused_with_path_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.key");
        write_atomic(&p, b"k", KEY_MODE).unwrap();
        assert!(read_key_file(&p).is_ok());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let msg = read_key_file(&p).unwrap_err().to_string();
        assert!(msg.contains("ca.key") && msg.contains("0644"), "{msg}");
    }

    #[test]
    fn pairs_are_versioned_linked_and_switched_together() {
        let d = tempfile::tempdir().unwrap();
        let s = PairStore::new(d.path());
        let links = PairLinks {
            cert: Some("pki/etcd/server.crt".into()),
            key: Some("pki/etcd/server.key".into()),
            combined: None,
        };
        assert!(s.read_current("etcd-server").unwrap().is_none());
        assert_eq!(
            s.write_pair("etcd-server", "C1\n", &key("K1\n"), &links)
                .unwrap(),
            1
        );
        assert_eq!(
            fs::read_to_string(d.path().join("pki/etcd/server.crt")).unwrap(),
            "C1\n"
        );
        assert_eq!(
            s.write_pair("etcd-server", "C2\n", &key("K2\n"), &links)
                .unwrap(),
            2
        );
        assert_eq!(
            fs::read_to_string(d.path().join("pki/etcd/server.key")).unwrap(),
            "K2\n"
        );
        assert_eq!(s.previous_version("etcd-server").unwrap(), Some(1));
        s.write_pair("etcd-server", "C3\n", &key("K3\n"), &links)
            .unwrap();
        // Only current and previous are kept.
        assert!(!s.entry_dir("etcd-server").join("1").exists());
        let cur = s.read_current("etcd-server").unwrap().unwrap();
        assert_eq!(
            (cur.cert_pem.as_str(), cur.key_pem.expose()),
            ("C3\n", "K3\n")
        );
        let pem = fs::read_to_string(s.entry_dir("etcd-server").join("3/tls.pem")).unwrap();
        assert_eq!(pem, "C3\nK3\n");
        // Roll back.
        s.point_current("etcd-server", 2).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("pki/etcd/server.crt")).unwrap(),
            "C2\n"
        );
    }

    #[test]
    fn leftovers_of_an_interrupted_write_are_cleaned_and_do_not_count() {
        let d = tempfile::tempdir().unwrap();
        let s = PairStore::new(d.path());
        let entry = s.entry_dir("x");
        ensure_dir(&entry.join(".tmp-stage-1-0")).unwrap();
        fs::write(entry.join(".tmp-stage-1-0/tls.crt"), "half").unwrap();
        assert!(s.read_current("x").unwrap().is_none());
        s.write_pair("x", "C", &key("K"), &PairLinks::default())
            .unwrap();
        assert!(!entry.join(".tmp-stage-1-0").exists());
        // Leftovers of an entry that is not written again are removed by the store-wide cleanup.
        ensure_dir(&entry.join(".tmp-stage-2-0")).unwrap();
        fs::write(entry.join(".tmp-current-2-1"), "").unwrap();
        assert_eq!(s.cleanup_all_tmp().unwrap(), 2);
        assert!(!entry.join(".tmp-stage-2-0").exists());
        assert_eq!(s.read_current("x").unwrap().unwrap().cert_pem, "C");
        assert_eq!(s.cleanup_all_tmp().unwrap(), 0);
    }
    #[test]
    fn temp_names_are_unpredictable_and_survive_leftovers_of_a_reused_pid() {
        let d = tempfile::tempdir().unwrap();
        let a = tmp_name(d.path(), "f").unwrap();
        let b = tmp_name(d.path(), "f").unwrap();
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        let random = name.rsplit('-').next().unwrap();
        assert_eq!(random.len(), 16, "{name}");
        assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
        // Leftovers of a crashed process that had this pid, with every sequence number it could have
        // reached by now: the next write is not blocked by them.
        for n in 0..256 {
            fs::write(
                d.path()
                    .join(format!("{TMP_PREFIX}file-{}-{n}", std::process::id())),
                "half",
            )
            .unwrap();
        }
        write_atomic(&d.path().join("file"), b"whole", CERT_MODE).unwrap();
        assert_eq!(fs::read(d.path().join("file")).unwrap(), b"whole");
        assert_eq!(cleanup_tmp_files(d.path()).unwrap(), 256);
    }

    fn etcd_links() -> PairLinks {
        PairLinks {
            cert: Some("pki/etcd/server.crt".into()),
            key: Some("pki/etcd/server.key".into()),
            combined: Some("pki/etcd/server-current.pem".into()),
        }
    }

    #[test]
    fn links_never_replace_plain_files_or_foreign_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let s = PairStore::new(d.path());
        let links = etcd_links();
        let crt = d.path().join("pki/etcd/server.crt");
        let keyf = d.path().join("pki/etcd/server.key");
        // A kubeadm pair, plain files.
        write_atomic(&crt, b"PLAIN CERT", CERT_MODE).unwrap();
        write_atomic(&keyf, b"PLAIN KEY", KEY_MODE).unwrap();
        s.write_version("etcd-server", "C1\n", &key("K1\n"))
            .unwrap();
        let e = s
            .ensure_links("etcd-server", &links)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pki/etcd/server.crt") && e.contains("regular file"),
            "{e}"
        );
        // Checked before anything is made: not even the free combined path got a link.
        assert!(!d.path().join("pki/etcd/server-current.pem").exists());
        let e = s
            .write_pair("etcd-server", "C2\n", &key("K2\n"), &links)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pki/etcd/server.crt"), "{e}");
        assert_eq!(
            s.current_version("etcd-server").unwrap(),
            Some(1),
            "nothing written"
        );
        assert_eq!(fs::read(&crt).unwrap(), b"PLAIN CERT");
        assert_eq!(fs::read(&keyf).unwrap(), b"PLAIN KEY");

        // A symlink elsewhere is not replaced either.
        fs::remove_file(&crt).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &crt).unwrap();
        assert_eq!(
            s.link_state("etcd-server", Path::new("pki/etcd/server.crt"), "tls.crt")
                .unwrap(),
            PublicPath::Foreign("/etc/hostname".into())
        );
        let e = s
            .ensure_links("etcd-server", &links)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pki/etcd/server.crt") && e.contains("/etc/hostname"),
            "{e}"
        );
        assert_eq!(fs::read_link(&crt).unwrap(), Path::new("/etc/hostname"));

        // A deliberate replacement (a reissue) removes both, then links.
        let removed = s.replace_with_links("etcd-server", &links).unwrap();
        assert_eq!(removed, vec![crt.clone(), keyf.clone()]);
        assert_eq!(fs::read_to_string(&crt).unwrap(), "C1\n");
        assert_eq!(fs::read_to_string(&keyf).unwrap(), "K1\n");
        for (rel, state) in s.link_states("etcd-server", &links).unwrap() {
            assert_eq!(state, PublicPath::Linked, "{}", rel.display());
        }
        // Idempotent, and a link into the entry that is not meshd's is recognised as such.
        s.ensure_links("etcd-server", &links).unwrap();
        fs::remove_file(&keyf).unwrap();
        std::os::unix::fs::symlink("../.store/etcd-server/1/tls.key", &keyf).unwrap();
        assert!(matches!(
            s.link_state("etcd-server", Path::new("pki/etcd/server.key"), "tls.key")
                .unwrap(),
            PublicPath::IntoEntry(_)
        ));
        assert!(s.ensure_links("etcd-server", &links).is_err());
        fs::remove_file(&keyf).unwrap();
        assert_eq!(
            s.link_state("etcd-server", Path::new("pki/etcd/server.key"), "tls.key")
                .unwrap(),
            PublicPath::Missing
        );
        s.ensure_links("etcd-server", &links).unwrap();
        assert_eq!(fs::read_to_string(&keyf).unwrap(), "K1\n");
    }

    #[test]
    fn normalize_resolves_dots_lexically() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
        assert_eq!(normalize(Path::new("../../x")), Path::new("../../x"));
        assert_eq!(normalize(Path::new("a/../../x")), Path::new("../x"));
    }
}
