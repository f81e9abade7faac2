//! Failpoints: named places in every write, fsync and rename of the store (and so of a rotation),
//! where a test can make meshd crash (or fail with an I/O error) to prove that nothing is left
//! half-written.
//!
//! They exist only in builds with the `failpoints` cargo feature (off by default; the workspace's
//! test builds turn it on through the `meshd-e2e` crate). Without it [`failpoint!`] expands to
//! nothing and [`configure_from_env`] refuses a `FAILPOINTS` variable, so a release binary carries
//! none.
//!
//! `FAILPOINTS` takes the `fail` crate's syntax, `name=actions;name=actions`, e.g.
//! `pairstore::point_current::before_current_rename=2*off->panic` (crash at the third hit). Every
//! name must be one of [`ALL`]: a typo is an error, not a test that silently passes. Actions:
//! `panic` (the process aborts at once: no destructor runs, as with `kill -9`), `return` (the write
//! fails with an I/O error naming the file), `sleep(ms)`, `off`, counts and probabilities.

/// Every failpoint, in the order a pair rotation meets them.
pub const ALL: &[&str] = &[
    "store::ensure_dir::after_mkdir",
    "store::write_new::after_create",
    "store::write_new::before_fsync",
    "store::write_atomic::before_rename",
    "store::write_atomic::before_dir_fsync",
    "pairstore::cleanup_tmp::after_remove",
    "pairstore::write_version::after_stage_mkdir",
    "pairstore::write_version::after_cert",
    "pairstore::write_version::after_key",
    "pairstore::write_version::before_stage_fsync",
    "pairstore::write_version::before_stage_rename",
    "pairstore::write_version::before_entry_fsync",
    "pairstore::write_version::before_current_switch",
    "pairstore::point_current::before_current_rename",
    "pairstore::point_current::before_dir_fsync",
    "pairstore::write_version::before_prune",
    "pairstore::prune::after_remove",
    "pairstore::link::before_dir_fsync",
    "pairstore::replace_with_links::before_links",
    "rejoin::before_write",
    "rotate::node_after_response",
];

/// The `fail` crate, for [`failpoint!`] in other crates of the workspace (which turn on their own
/// `failpoints` feature, forwarding to this one).
#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub use fail;

/// Whether this build has failpoints (the `failpoints` feature).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// A failpoint named `$name` (one of [`ALL`]). With a second argument, the path a `return` action
/// reports: the enclosing function then returns an I/O error for that path. Used in another crate,
/// that crate needs a `failpoints` feature that turns on `pki/failpoints`.
#[macro_export]
#[doc(hidden)]
macro_rules! failpoint {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            debug_assert!($crate::failpoints::ALL.contains(&$name));
            $crate::failpoints::fail::fail_point!($name);
        }
    };
    ($name:expr, $path:expr) => {
        #[cfg(feature = "failpoints")]
        {
            debug_assert!($crate::failpoints::ALL.contains(&$name));
            $crate::failpoints::fail::fail_point!($name, |_| {
                Err($crate::PkiError::io(
                    $path,
                    std::io::Error::other(format!("failpoint {}", $name)),
                ))
            });
        }
    };
}

/// Configures the failpoints named in the `FAILPOINTS` environment variable (nothing when it is
/// unset or empty). With any failpoint configured, a panic aborts the process at once, so that a
/// `panic` action is a crash (no destructor, no cleanup) rather than an unwinding error.
///
/// Errors: a malformed entry, a name not in [`ALL`], or `FAILPOINTS` set in a build without the
/// `failpoints` feature.
pub fn configure_from_env() -> Result<(), String> {
    let spec = std::env::var("FAILPOINTS").unwrap_or_default();
    configure(&spec)
}

/// [`configure_from_env`] for an explicit specification.
pub fn configure(spec: &str) -> Result<(), String> {
    let mut parsed = Vec::new();
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, actions)) = item.split_once('=') else {
            return Err(format!("FAILPOINTS: {item:?} is not name=actions"));
        };
        let name = name.trim();
        if !ALL.contains(&name) {
            return Err(format!(
                "FAILPOINTS: unknown failpoint {name:?} (known: {})",
                ALL.join(", ")
            ));
        }
        parsed.push((name, actions.trim()));
    }
    if parsed.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        for (name, actions) in parsed {
            fail::cfg(name, actions).map_err(|e| format!("FAILPOINTS: {name}: {e}"))?;
        }
        std::panic::set_hook(Box::new(|info| {
            eprintln!("meshd: {info}; aborting (failpoint crash)");
            std::process::abort();
        }));
        Ok(())
    }
    #[cfg(not(feature = "failpoints"))]
    {
        Err(format!(
            "FAILPOINTS is set ({} failpoint(s)) but this build has no failpoints (build with the `failpoints` feature)",
            parsed.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list and the code agree: every name in [`ALL`] is used exactly once in the sources, and
    /// every failpoint used in the sources is listed.
    #[test]
    fn the_list_matches_the_code() {
        let sources = [
            include_str!("store.rs"),
            include_str!("../../meshd/src/rejoin.rs"),
            include_str!("../../meshd/src/rotate.rs"),
        ];
        let mut used = Vec::new();
        for src in sources {
            for (i, _) in src.match_indices("failpoint!(") {
                let rest = &src[i + "failpoint!(".len()..];
                let Some(start) = rest.find('"') else {
                    continue;
                };
                let rest = &rest[start + 1..];
                let end = rest.find('"').unwrap();
                used.push(rest[..end].to_string());
            }
        }
        for name in ALL {
            assert_eq!(
                used.iter().filter(|u| u == name).count(),
                1,
                "{name} must be used exactly once"
            );
        }
        for u in &used {
            assert!(ALL.contains(&u.as_str()), "{u} is not in ALL");
        }
        let mut sorted = ALL.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALL.len(), "duplicate names");
    }

    #[test]
    fn unknown_names_and_bad_syntax_are_refused() {
        assert!(configure("").is_ok());
        let e = configure("pairstore::nope=panic").unwrap_err();
        assert!(e.contains("unknown failpoint"), "{e}");
        let e = configure("pairstore::prune::after_remove").unwrap_err();
        assert!(e.contains("name=actions"), "{e}");
    }
}
