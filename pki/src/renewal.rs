//! Renewal planning: a pure function of (not_before, not_after, now, policy, jitter).
//!
//! A certificate is renewed at `fraction` of its lifetime, moved by up to ±`jitter`/2 so that
//! certificates issued together are not renewed together (kubelet renews at a random 70–90 %,
//! step-ca at 2/3). The jitter sample is derived from the certificate's serial so that repeated cron
//! runs agree on the same renewal point.

use std::time::{Duration, SystemTime};

use serde::Serialize;

/// When to renew.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RenewalPolicy {
    /// Fraction of the lifetime after which a certificate is renewed (default 2/3).
    pub fraction: f64,
    /// Width of the jitter window as a fraction of the lifetime (default 0.1: 61.7 %–71.7 %).
    pub jitter: f64,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            fraction: 2.0 / 3.0,
            jitter: 0.1,
        }
    }
}

/// The state of a certificate with respect to renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RenewalState {
    /// Valid and not yet at its renewal point.
    Valid,
    /// Past its renewal point, still valid: renew now.
    Due,
    /// Past NotAfter.
    Expired,
    /// Before NotBefore (clock skew or a bad certificate).
    NotYetValid,
}

/// The decision for one certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenewalPlan {
    /// When it should be (or should have been) renewed.
    pub renew_at: SystemTime,
    /// Its state at `now`.
    pub state: RenewalState,
}

impl RenewalPlan {
    /// Whether a renewal should happen now.
    pub fn needs_renewal(&self) -> bool {
        matches!(self.state, RenewalState::Due | RenewalState::Expired)
    }
}

/// Plans the renewal of a certificate valid from `not_before` to `not_after`.
///
/// `jitter_sample` is in `[0, 1)` (see [`jitter_from_serial`]); values outside are clamped.
pub fn plan_renewal(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    policy: &RenewalPolicy,
    jitter_sample: f64,
) -> RenewalPlan {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let j = if jitter_sample.is_finite() {
        jitter_sample.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let frac = (policy.fraction - policy.jitter / 2.0 + policy.jitter * j).clamp(0.0, 1.0);
    let renew_at = not_before + lifetime.mul_f64(frac);
    let state = if now > not_after {
        RenewalState::Expired
    } else if now < not_before {
        RenewalState::NotYetValid
    } else if now >= renew_at {
        RenewalState::Due
    } else {
        RenewalState::Valid
    };
    RenewalPlan { renew_at, state }
}

/// A deterministic jitter sample in `[0, 1)` from a certificate's serial (hex or any string).
pub fn jitter_from_serial(serial: &str) -> f64 {
    let d = ring::digest::digest(&ring::digest::SHA256, serial.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn renews_at_two_thirds_without_jitter() {
        let p = RenewalPolicy {
            fraction: 2.0 / 3.0,
            jitter: 0.0,
        };
        let plan = plan_renewal(t(0), t(300), t(100), &p, 0.3);
        assert_eq!(plan.renew_at, t(200));
        assert_eq!(plan.state, RenewalState::Valid);
        assert_eq!(
            plan_renewal(t(0), t(300), t(200), &p, 0.3).state,
            RenewalState::Due
        );
        assert_eq!(
            plan_renewal(t(0), t(300), t(301), &p, 0.3).state,
            RenewalState::Expired
        );
        assert_eq!(
            plan_renewal(t(10), t(300), t(5), &p, 0.3).state,
            RenewalState::NotYetValid
        );
    }

    #[test]
    fn jitter_stays_in_its_window() {
        let p = RenewalPolicy::default();
        for i in 0..1000 {
            let j = jitter_from_serial(&format!("{i:x}"));
            assert!((0.0..1.0).contains(&j));
            let plan = plan_renewal(t(0), t(1_000_000), t(0), &p, j);
            let at = plan.renew_at.duration_since(t(0)).unwrap().as_secs();
            assert!((616_666..=716_667).contains(&at), "{at}");
        }
        // Deterministic.
        assert_eq!(jitter_from_serial("abc"), jitter_from_serial("abc"));
        // Garbage samples do not escape the window.
        for j in [f64::NAN, -3.0, 7.0, f64::INFINITY] {
            let at = plan_renewal(t(0), t(1000), t(0), &p, j).renew_at;
            assert!(at >= t(616) && at <= t(717));
        }
    }

    #[test]
    fn inverted_validity_is_expired_or_not_yet_valid_never_a_panic() {
        let p = RenewalPolicy::default();
        let plan = plan_renewal(t(100), t(50), t(75), &p, 0.5);
        assert!(plan.needs_renewal() || plan.state == RenewalState::NotYetValid);
    }
}
