//! Time helpers: RFC 3339 formatting and human durations, at the edge of the pure code.

use std::time::{Duration, SystemTime};

use crate::error::{PkiError, Result};

/// Formats a time as RFC 3339 (UTC, second precision).
pub fn rfc3339(t: SystemTime) -> String {
    let odt = to_offset(t);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    odt.format(&fmt).unwrap_or_else(|_| format!("{odt}"))
}

pub(crate) fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Signed seconds from `now` until `t` (negative when `t` is in the past).
pub fn seconds_until(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A compact human duration, as kubeadm prints residual time: `364d`, `23h`, `5m`, `40s`.
pub fn human_duration(secs: i64) -> String {
    let neg = secs < 0;
    let s = secs.unsigned_abs();
    let body = if s >= 2 * 365 * 86400 {
        format!("{}y", s / (365 * 86400))
    } else if s >= 86400 {
        format!("{}d", s / 86400)
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else if s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    };
    if neg {
        format!("-{body}")
    } else {
        body
    }
}

/// Parses a duration such as `90s`, `15m`, `24h`, `7d`, `1y`, or a combination like `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = |reason: &str| PkiError::Invalid {
        what: "duration",
        reason: format!("{s:?}: {reason} (use e.g. 30s, 15m, 24h, 90d, 1y)"),
    };
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            'y' => 365 * 86400,
            _ => return Err(bad("unknown unit")),
        };
        if num.is_empty() {
            return Err(bad("a unit without a number"));
        }
        let n: u64 = num.parse().map_err(|_| bad("number too large"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too large"))?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad("a number without a unit"));
    }
    if total == 0 {
        return Err(bad("must be positive"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        for bad in ["", "10", "h", "5x", "0s", "99999999999999999999y"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_and_rfc3339() {
        assert_eq!(human_duration(364 * 86400 + 5), "364d");
        assert_eq!(human_duration(-3700), "-1h");
        assert_eq!(human_duration(3650 * 86400), "10y");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(86400)),
            "1970-01-02T00:00:00Z"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(seconds_until(now + Duration::from_secs(5), now), 5);
        assert_eq!(seconds_until(now - Duration::from_secs(5), now), -5);
    }
}
