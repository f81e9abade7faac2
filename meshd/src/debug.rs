//! `meshd debug ...` (hidden from help): helpers for the crash tests.
//!
//! * `recover` runs the start-up recovery ([`crate::recover`]) alone.
//! * `failpoints` says whether this build has failpoints and lists them.
//!
//! The crash tests rotate with the real `meshd rotate --force all`.
