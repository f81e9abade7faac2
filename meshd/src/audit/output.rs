//! The report in four formats: a table for people, JSON (header + one record per check × target),
//! JUnit XML (kube-bench's CI format: one testcase per finding) and SARIF 2.1.0.

use super::model::{Report, Status};

/// The human table. Unless `verbose`, the PASS rows of the certificate and configuration checks
/// are folded into one row per check (the JSON report always holds every row).
pub fn table(r: &Report, verbose: bool) -> String {
    let h = &r.header;
    let mut out = format!(
        "meshd audit {} on node {} ({}), {}, {} ms\n\n",
        h.meshd_version, h.node, h.data_dir, h.started, h.duration_ms
    );
    let tw = r
        .findings
        .iter()
        .map(|f| f.target.chars().count())
        .max()
        .unwrap_or(6)
        .clamp(6, 60);
    out.push_str(&format!(
        "{:<6} {:<7} {:<8} {:<tw$} OBSERVED\n",
        "STATUS", "CHECK", "SEVERITY", "TARGET"
    ));
    let mut folded: Vec<(usize, super::model::Finding)> = Vec::new();
    let mut rows: Vec<super::model::Finding> = Vec::new();
    for f in &r.findings {
        if !verbose && f.status == Status::Pass && matches!(f.section, "certs" | "config") {
            if let Some((n, _)) = folded.iter_mut().find(|(_, g)| g.id == f.id) {
                *n += 1;
                continue;
            }
            folded.push((1, f.clone()));
            continue;
        }
        rows.push(f.clone());
    }
    for (n, mut g) in folded {
        if n > 1 {
            g.target = format!("{n} files");
            g.observed = format!("all pass (first: {}); --verbose lists each", g.observed);
        }
        rows.push(g);
    }
    let order = |s: &str| match s {
        "tls" => 0,
        "config" => 1,
        "certs" => 2,
        _ => 3,
    };
    rows.sort_by(|a, b| {
        (order(a.section), a.id, &a.target).cmp(&(order(b.section), b.id, &b.target))
    });
    for f in &rows {
        let target: String = if f.target.chars().count() > tw {
            let s: String = f.target.chars().take(tw - 1).collect();
            format!("{s}…")
        } else {
            f.target.clone()
        };
        out.push_str(&format!(
            "{:<6} {:<7} {:<8} {:<tw$} {}\n",
            f.status.as_str(),
            f.id,
            f.severity.as_str(),
            target,
            f.observed
        ));
        if matches!(f.status, Status::Fail | Status::Warn) {
            out.push_str(&format!(
                "{:<23}{:<tw$}  expected: {}\n{:<23}{:<tw$}  fix: {}{}\n",
                "",
                "",
                f.expected,
                "",
                "",
                f.remediation,
                f.cis.map(|c| format!(" (CIS {c})")).unwrap_or_default()
            ));
        }
    }
    let s = &r.summary;
    out.push_str(&format!(
        "\n{} checks: {} pass, {} fail, {} warn, {} skip, {} error; {} at or above --fail-on {}\n",
        r.findings.len(),
        s.pass,
        s.fail,
        s.warn,
        s.skip,
        s.error,
        s.at_or_above_fail_on,
        h.fail_on.as_str()
    ));
    if s.error > 0 {
        out.push_str("the audit is INCOMPLETE: some checks could not run (ERROR rows)\n");
    }
    out
}

/// JSON.
pub fn json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn xml(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => o.push(c),
        }
    }
    o
}

/// JUnit XML: one testsuite per section, one testcase per finding; FAIL/WARN are failures, ERROR
/// errors, SKIP skipped.
pub fn junit(r: &Report) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites name=\"meshd audit\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">\n",
        r.findings.len(),
        r.summary.fail + r.summary.warn,
        r.summary.error,
        r.summary.skip,
        r.header.duration_ms as f64 / 1000.0
    ));
    for section in ["tls", "config", "certs", "overlay"] {
        let fs: Vec<_> = r.findings.iter().filter(|f| f.section == section).collect();
        if fs.is_empty() {
            continue;
        }
        let count = |st: Status| fs.iter().filter(|f| f.status == st).count();
        out.push_str(&format!(
            "  <testsuite name=\"{section}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">\n",
            fs.len(),
            count(Status::Fail) + count(Status::Warn),
            count(Status::Error),
            count(Status::Skip)
        ));
        for f in fs {
            out.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\">\n",
                xml(f.id),
                xml(&format!("{} {}", f.title, f.target))
            ));
            let body = format!("observed: {}\nexpected: {}", f.observed, f.expected);
            match f.status {
                Status::Fail | Status::Warn => out.push_str(&format!(
                    "      <failure type=\"{}\" message=\"{}\">{}\nremediation: {}</failure>\n",
                    f.status.as_str(),
                    xml(&format!("[{}] {}", f.severity.as_str(), f.observed)),
                    xml(&body),
                    xml(&f.remediation)
                )),
                Status::Error => out.push_str(&format!(
                    "      <error message=\"{}\">{}</error>\n",
                    xml(&f.observed),
                    xml(&body)
                )),
                Status::Skip => out.push_str(&format!(
                    "      <skipped message=\"{}\"/>\n",
                    xml(&f.observed)
                )),
                Status::Pass => {
                    out.push_str(&format!("      <system-out>{}</system-out>\n", xml(&body)))
                }
            }
            out.push_str("    </testcase>\n");
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// SARIF 2.1.0: one rule per check ID, one result per FAIL / WARN / ERROR finding.
pub fn sarif(r: &Report) -> String {
    use serde_json::json;
    let mut ids: Vec<&super::model::Finding> = Vec::new();
    for f in &r.findings {
        if !ids.iter().any(|g| g.id == f.id) {
            ids.push(f);
        }
    }
    let rules: Vec<_> = ids
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "name": f.id.replace('-', ""),
                "shortDescription": {"text": f.title},
                "help": {"text": f.remediation},
                "properties": {"section": f.section, "severity": f.severity, "cis": f.cis},
            })
        })
        .collect();
    let results: Vec<_> = r
        .findings
        .iter()
        .filter(|f| matches!(f.status, Status::Fail | Status::Warn | Status::Error))
        .map(|f| {
            let level = match f.status {
                Status::Fail if f.severity >= super::model::Severity::High => "error",
                Status::Fail | Status::Error => "warning",
                _ => "note",
            };
            json!({
                "ruleId": f.id,
                "level": level,
                "message": {"text": format!("{}: {} (expected: {})", f.target, f.observed, f.expected)},
                "locations": [{
                    "physicalLocation": {"artifactLocation": {"uri": if f.target.starts_with('/') { format!("file://{}", f.target.split(' ').next().unwrap_or_default()) } else { format!("meshd://{}", f.target.replace(' ', "/")) }}},
                    "logicalLocations": [{"name": f.target}],
                }],
                "properties": {"status": f.status, "severity": f.severity, "remediation": f.remediation},
            })
        })
        .collect();
    let doc = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "meshd audit",
                "version": r.header.meshd_version,
                "informationUri": "https://example.invalid/meshd",
                "rules": rules,
            }},
            "invocations": [{
                "executionSuccessful": r.summary.error == 0,
                "startTimeUtc": r.header.started,
                "properties": {"node": r.header.node, "data_dir": r.header.data_dir},
            }],
            "results": results,
        }],
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::catalog::{CRT_01, TLS_01, TLS_03};
    use crate::audit::model::{Header, Report, Severity};

    fn report(fail_on: Severity, findings: Vec<crate::audit::model::Finding>) -> Report {
        Report::new(
            Header {
                meshd_version: "0",
                format_version: 1,
                node: "cp1".into(),
                data_dir: "/d".into(),
                started: "2026-01-01T00:00:00Z".into(),
                duration_ms: 5,
                fail_on,
            },
            findings,
        )
    }

    #[test]
    fn exit_codes() {
        let pass = TLS_01.finding(Status::Pass, "a", "tls", "tls");
        let err = TLS_01.finding(Status::Error, "b", "timeout", "tls");
        let fail_medium = crate::audit::catalog::TLS_08.finding(Status::Fail, "c", "x", "y");
        assert_eq!(report(Severity::High, vec![pass.clone()]).exit_code(), 0);
        assert_eq!(
            report(Severity::High, vec![pass.clone(), err.clone()]).exit_code(),
            3
        );
        assert_eq!(
            report(Severity::High, vec![fail_medium.clone()]).exit_code(),
            0
        );
        assert_eq!(
            report(Severity::Medium, vec![fail_medium.clone()]).exit_code(),
            1
        );
        assert_eq!(
            report(Severity::Medium, vec![fail_medium, err]).exit_code(),
            1
        );
        // A WARN counts one level lower: a high check's WARN is medium.
        let warn = CRT_01.finding(Status::Warn, "d", "expires in 20d", "30d");
        assert_eq!(report(Severity::High, vec![warn.clone()]).exit_code(), 0);
        assert_eq!(report(Severity::Medium, vec![warn]).exit_code(), 1);
    }

    #[test]
    fn junit_and_sarif() {
        let r = report(
            Severity::High,
            vec![
                TLS_03.finding(
                    Status::Fail,
                    "n/etcd 1.2.3.4:2379",
                    "accepts <CBC> & \"3DES\"",
                    "AEAD",
                ),
                TLS_01.finding(Status::Pass, "n/etcd 1.2.3.4:2379", "tls", "tls"),
                TLS_01.finding(Status::Skip, "n/kubelet 1.2.3.4:10250", "refused", "tls"),
            ],
        );
        let j = junit(&r);
        assert!(
            j.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""),
            "{j}"
        );
        assert!(
            j.contains("accepts &lt;CBC&gt; &amp; &quot;3DES&quot;"),
            "{j}"
        );
        assert!(!j.contains("<CBC>"));
        let s: serde_json::Value = serde_json::from_str(&sarif(&r)).unwrap();
        assert_eq!(s["version"], "2.1.0");
        let results = s["runs"][0]["results"].as_array().unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0]["ruleId"], "TLS-03");
        assert_eq!(results[0]["level"], "error");
        assert_eq!(
            s["runs"][0]["tool"]["driver"]["rules"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let t = table(&r, false);
        assert!(
            t.contains("FAIL   TLS-03") && t.contains("fix: restrict"),
            "{t}"
        );
    }
}
