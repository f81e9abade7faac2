//! The node's WireGuard key pair in the data directory: `wireguard/private.key` (base64, as
//! `wg genkey` prints it, mode 0600, never replaced once made) and `wireguard/public.key`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use pki::keys::SecretPem;
use pki::store;

/// Path of the private key in `data_dir`.
pub fn private_path(data_dir: &Path) -> PathBuf {
    data_dir.join("wireguard/private.key")
}

/// Path of the public key in `data_dir`.
pub fn public_path(data_dir: &Path) -> PathBuf {
    data_dir.join("wireguard/public.key")
}

/// A fresh key pair: (private key file content, public key base64).
pub fn generate() -> anyhow::Result<(SecretPem, String)> {
    use ring::rand::SecureRandom;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    ring::rand::SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    let secret = x25519_dalek::StaticSecret::from(*bytes);
    let public = x25519_dalek::PublicKey::from(&secret);
    let b64 = base64::engine::general_purpose::STANDARD;
    let private = SecretPem::new(format!("{}\n", b64.encode(secret.to_bytes())));
    Ok((private, b64.encode(public.as_bytes())))
}

/// The public key (base64) of a private key file's content.
pub fn public_of(private_b64: &str, path: &Path) -> anyhow::Result<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw = zeroize::Zeroizing::new(
        b64.decode(private_b64.trim())
            .with_context(|| format!("{}: not a base64 WireGuard key", path.display()))?,
    );
    let Ok(arr) = <[u8; 32]>::try_from(raw.as_slice()) else {
        bail!(
            "{}: a WireGuard key is 32 bytes, this one is {}",
            path.display(),
            raw.len()
        );
    };
    let secret = x25519_dalek::StaticSecret::from(arr);
    Ok(b64.encode(x25519_dalek::PublicKey::from(&secret).as_bytes()))
}

/// Reads the private key (mode checked) and returns it with its public key.
pub fn load(data_dir: &Path) -> anyhow::Result<(SecretPem, String)> {
    let p = private_path(data_dir);
    let private = store::read_key_file(&p)?;
    let public = public_of(private.expose(), &p)?;
    Ok((private, public))
}

/// Makes the key pair if there is none; never replaces an existing private key. Returns the public
/// key and whether it was created.
pub fn ensure(data_dir: &Path) -> anyhow::Result<(String, bool)> {
    let p = private_path(data_dir);
    if p.exists() {
        let (_, public) = load(data_dir)?;
        let pp = public_path(data_dir);
        if std::fs::read_to_string(&pp)
            .ok()
            .map(|s| s.trim().to_owned())
            != Some(public.clone())
        {
            store::write_atomic(&pp, format!("{public}\n").as_bytes(), store::CERT_MODE)?;
        }
        return Ok((public, false));
    }
    let (private, public) = generate()?;
    store::write_atomic(&p, private.expose().as_bytes(), store::KEY_MODE)?;
    store::write_atomic(
        &public_path(data_dir),
        format!("{public}\n").as_bytes(),
        store::CERT_MODE,
    )?;
    Ok((public, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_makes_once_and_keeps() {
        let d = tempfile::tempdir().unwrap();
        let (k1, created) = ensure(d.path()).unwrap();
        assert!(created);
        let (k2, created) = ensure(d.path()).unwrap();
        assert!(!created);
        assert_eq!(k1, k2);
        let (_, k3) = load(d.path()).unwrap();
        assert_eq!(k1, k3);
        assert!(public_of("AAAA", Path::new("x")).is_err());
    }
}
