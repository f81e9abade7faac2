//! Findings, severities and the report: the shape every check produces and every output format reads.

use serde::Serialize;

/// The outcome of one check against one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// The check ran and the target meets it.
    Pass,
    /// The check ran and found a weakness below failure level.
    Warn,
    /// The check ran and the target fails it.
    Fail,
    /// The check does not apply here (with the reason).
    Skip,
    /// The check could not run (with the reason): the audit is incomplete.
    Error,
}

impl Status {
    /// Upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
            Status::Error => "ERROR",
        }
    }
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational.
    Info,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

impl Severity {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// One record of the report: one check against one target.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Check ID (`TLS-01`, `CFG-03`...), as in audit-checks.md.
    pub id: &'static str,
    /// Section: `tls`, `config`, `certs`, `overlay`.
    pub section: &'static str,
    /// What the check verifies.
    pub title: &'static str,
    /// Severity of a failure (a WARN is reported one level lower, at most medium).
    pub severity: Severity,
    /// Outcome.
    pub status: Status,
    /// What was checked: `node/component host:port`, a file, a peer.
    pub target: String,
    /// What was seen (the evidence).
    pub observed: String,
    /// What the check expects.
    pub expected: String,
    /// How to fix a failure (empty on PASS).
    pub remediation: String,
    /// CIS Kubernetes Benchmark 1.8 ID, where one exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cis: Option<&'static str>,
    /// Structured evidence (accepted versions and suites, client-auth mode...), for scripts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
}

impl Finding {
    /// The finding with structured evidence attached.
    pub fn with_evidence(mut self, v: serde_json::Value) -> Finding {
        self.evidence = Some(v);
        self
    }

    /// The severity this finding counts with for `--fail-on`: its own for a FAIL, one level lower
    /// (at most medium) for a WARN, none for the rest.
    pub fn effective_severity(&self) -> Option<Severity> {
        match self.status {
            Status::Fail => Some(self.severity),
            Status::Warn => Some(match self.severity {
                Severity::Critical | Severity::High => Severity::Medium,
                Severity::Medium => Severity::Low,
                _ => Severity::Info,
            }),
            _ => None,
        }
    }
}

/// A check's fixed facts.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    /// ID.
    pub id: &'static str,
    /// Section.
    pub section: &'static str,
    /// Title.
    pub title: &'static str,
    /// Severity of a failure.
    pub severity: Severity,
    /// CIS ID.
    pub cis: Option<&'static str>,
    /// Default remediation.
    pub remediation: &'static str,
}

impl Check {
    /// A finding of this check.
    pub fn finding(
        &self,
        status: Status,
        target: impl Into<String>,
        observed: impl Into<String>,
        expected: impl Into<String>,
    ) -> Finding {
        Finding {
            id: self.id,
            section: self.section,
            title: self.title,
            severity: self.severity,
            status,
            target: target.into(),
            observed: observed.into(),
            expected: expected.into(),
            remediation: if matches!(status, Status::Fail | Status::Warn) {
                self.remediation.to_owned()
            } else {
                String::new()
            },
            cis: self.cis,
            evidence: None,
        }
    }
}

/// The report header.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    /// `meshd` version.
    pub meshd_version: &'static str,
    /// Report format version.
    pub format_version: u32,
    /// The node the audit ran on.
    pub node: String,
    /// Its data directory.
    pub data_dir: String,
    /// Start time, RFC 3339.
    pub started: String,
    /// Duration, milliseconds.
    pub duration_ms: u64,
    /// The `--fail-on` threshold.
    pub fail_on: Severity,
}

/// Counts per status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// PASS.
    pub pass: usize,
    /// WARN.
    pub warn: usize,
    /// FAIL.
    pub fail: usize,
    /// SKIP.
    pub skip: usize,
    /// ERROR.
    pub error: usize,
    /// Findings at or above `--fail-on`.
    pub at_or_above_fail_on: usize,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Header.
    pub header: Header,
    /// Counts.
    pub summary: Summary,
    /// Every finding.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Builds the summary and sorts the findings (section, ID, target).
    pub fn new(header: Header, mut findings: Vec<Finding>) -> Report {
        let order = |s: &str| match s {
            "tls" => 0,
            "config" => 1,
            "certs" => 2,
            _ => 3,
        };
        findings.sort_by(|a, b| {
            (order(a.section), a.id, &a.target).cmp(&(order(b.section), b.id, &b.target))
        });
        let mut s = Summary::default();
        for f in &findings {
            match f.status {
                Status::Pass => s.pass += 1,
                Status::Warn => s.warn += 1,
                Status::Fail => s.fail += 1,
                Status::Skip => s.skip += 1,
                Status::Error => s.error += 1,
            }
            if f.effective_severity().is_some_and(|e| e >= header.fail_on) {
                s.at_or_above_fail_on += 1;
            }
        }
        Report {
            header,
            summary: s,
            findings,
        }
    }

    /// The exit code: 1 when a finding is at or above `--fail-on`, else 3 when a check could not
    /// run (the audit is incomplete: a clean result cannot be claimed), else 0.
    pub fn exit_code(&self) -> u8 {
        if self.summary.at_or_above_fail_on > 0 {
            1
        } else if self.summary.error > 0 {
            3
        } else {
            0
        }
    }
}
