//! SLO policies: the service's objectives, each with its SLI written over the metric catalogue.
//!
//! One file (`slo/policies.yaml` in the repository) is read by two tools: `troupe slo rules`
//! turns it into Prometheus recording rules and burn-rate alerts, and `troupe-loadtest` judges a
//! run against the same objectives. Three kinds of objective exist:
//!
//! * `ratio`: at least `target` % of events are good (availability). The SLI gives PromQL for
//!   the rate of bad events (`errors`) and of all events (`total`).
//! * `latency`: at least `target` % of events finish within `threshold`, i.e. the
//!   `target`-th percentile is at most `threshold`. Its SLI is a ratio too: the events slower
//!   than the threshold over all events, read from histogram buckets.
//! * `throughput`: the `rate` of events stays at or above `floor` per second.
//!
//! In SLI queries `{{window}}` stands for the range the rule is evaluated over (`5m`, `1h`, …).
//!
//! ```
//! let policy = troupe_slo::Policy::from_yaml_str(r#"
//! version: 1
//! service: troupe
//! window: 30d
//! objectives:
//!   - name: task-latency-p99
//!     kind: latency
//!     subject: tasks
//!     target: 99
//!     threshold: 100ms
//!     sli:
//!       errors: sum(rate(troupe_task_latency_seconds_count[{{window}}])) - sum(rate(troupe_task_latency_seconds_bucket{le="0.1"}[{{window}}]))
//!       total: sum(rate(troupe_task_latency_seconds_count[{{window}}]))
//! "#)?;
//! assert_eq!(policy.objectives[0].percentile(), Some(99.0));
//! # Ok::<(), troupe_slo::SloError>(())
//! ```

#![warn(missing_docs)]

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What SLI queries write where each evaluation range (`5m`, `1h`, …) goes.
pub const WINDOW_PLACEHOLDER: &str = "{{window}}";

/// Why a policy cannot be used. `field` is a path such as `objectives[2].threshold`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SloError {
    /// The file could not be read.
    #[error("cannot read SLO policy {path}: {reason}")]
    Io {
        /// The file asked for.
        path: String,
        /// Why reading failed.
        reason: String,
    },
    /// The YAML does not parse or does not match the schema (the message says where).
    #[error("SLO policy does not parse: {0}")]
    Parse(String),
    /// A field holds a value that cannot be used.
    #[error("invalid SLO policy field `{field}`: {reason}")]
    Invalid {
        /// Path to the field.
        field: String,
        /// Why the value is rejected.
        reason: String,
    },
}

impl SloError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SloError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A service's objectives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Schema version; only 1 exists.
    pub version: u32,
    /// Service name, used as the `sloth_service` label of generated rules.
    pub service: String,
    /// The compliance window the error budget is counted over (30 days by default).
    #[serde(with = "humantime_serde", default = "default_window")]
    pub window: Duration,
    /// The objectives.
    pub objectives: Vec<Objective>,
}

fn default_window() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

/// What kind of objective this is; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    /// Good events over all events.
    Ratio,
    /// A percentile of a latency at most a threshold.
    Latency,
    /// A rate at least a floor.
    Throughput,
}

/// What an objective is about, so tools that measure it themselves (the load test) know which
/// of their measurements to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// Tasks, submit → outcome.
    Tasks,
    /// Bus messages.
    Messages,
    /// Agent start-up (factory + `on_start`).
    AgentStartup,
}

/// The SLI of an objective as PromQL over catalogue metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sli {
    /// Rate of bad events (ratio and latency objectives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<String>,
    /// Rate of all events (ratio and latency objectives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
    /// Events per second (throughput objectives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
}

/// One objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// Identifier: lower case letters, digits and `-`; the `sloth_slo` label of its rules.
    pub name: String,
    /// What it promises, in a sentence.
    #[serde(default)]
    pub description: String,
    /// The kind.
    pub kind: ObjectiveKind,
    /// What it is about.
    pub subject: Subject,
    /// Percent of events that must be good (ratio, latency), e.g. `99.9`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// Latency objectives: the bound on the `target`-th percentile.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub threshold: Option<Duration>,
    /// Throughput objectives: the least events per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<f64>,
    /// The SLI as PromQL.
    #[serde(default)]
    pub sli: Sli,
}

impl Objective {
    /// The fraction of events allowed to be bad (`1 - target/100`), for ratio and latency.
    pub fn error_budget(&self) -> Option<f64> {
        match self.kind {
            ObjectiveKind::Throughput => None,
            _ => self.target.map(|t| 1.0 - t / 100.0),
        }
    }

    /// For a latency objective, the percentile it bounds (`target`).
    pub fn percentile(&self) -> Option<f64> {
        match self.kind {
            ObjectiveKind::Latency => self.target,
            _ => None,
        }
    }

    /// A one-line statement of the objective, e.g. `p99 of tasks ≤ 100ms`.
    pub fn statement(&self) -> String {
        let subject = match self.subject {
            Subject::Tasks => "tasks",
            Subject::Messages => "messages",
            Subject::AgentStartup => "agent start-up",
        };
        match self.kind {
            ObjectiveKind::Ratio => format!(
                "{subject} good ≥ {}% (bad ≤ {}%)",
                fmt_num(self.target.unwrap_or(0.0)),
                fmt_num(100.0 - self.target.unwrap_or(0.0))
            ),
            ObjectiveKind::Latency => format!(
                "p{} of {subject} ≤ {}",
                fmt_num(self.target.unwrap_or(0.0)),
                humantime::format_duration(self.threshold.unwrap_or_default())
            ),
            ObjectiveKind::Throughput => {
                format!("{subject} ≥ {}/s", fmt_num(self.floor.unwrap_or(0.0)))
            }
        }
    }
}

/// Formats a number for people and for generated rules: no trailing `.0`, and float noise
/// rounded away (`1 - 0.999` is `0.001`, not `0.0010000000000000009`).
pub fn fmt_num(x: f64) -> String {
    let r = (x * 1e9).round() / 1e9;
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

impl Policy {
    /// Parses and validates a policy.
    pub fn from_yaml_str(text: &str) -> Result<Self, SloError> {
        let policy: Policy =
            yaml_serde::from_str(text).map_err(|e| SloError::Parse(e.to_string()))?;
        policy.validate()?;
        Ok(policy)
    }

    /// Reads, parses and validates a policy file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SloError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| SloError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_yaml_str(&text)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SloError> {
        if self.version != 1 {
            return Err(SloError::invalid(
                "version",
                format!("only version 1 exists, found {}", self.version),
            ));
        }
        if self.service.is_empty() || !is_label_safe(&self.service) {
            return Err(SloError::invalid(
                "service",
                "must be lower case letters, digits, `-` or `_`, and not empty",
            ));
        }
        if self.window < Duration::from_secs(3600) {
            return Err(SloError::invalid("window", "must be at least 1h"));
        }
        if self.objectives.is_empty() {
            return Err(SloError::invalid("objectives", "must list at least one"));
        }
        for (i, o) in self.objectives.iter().enumerate() {
            let at = |f: &str| format!("objectives[{i}].{f}");
            if o.name.is_empty() || !is_label_safe(&o.name) {
                return Err(SloError::invalid(
                    at("name"),
                    "must be lower case letters, digits, `-` or `_`, and not empty",
                ));
            }
            if self.objectives[..i].iter().any(|p| p.name == o.name) {
                return Err(SloError::invalid(
                    at("name"),
                    format!("`{}` is used twice", o.name),
                ));
            }
            match o.kind {
                ObjectiveKind::Ratio | ObjectiveKind::Latency => {
                    match o.target {
                        None => {
                            return Err(SloError::invalid(
                                at("target"),
                                "required: percent of good events, e.g. 99.9",
                            ));
                        }
                        Some(t) if !(t > 0.0 && t < 100.0) => {
                            return Err(SloError::invalid(
                                at("target"),
                                format!("must be a percentage above 0 and below 100, found {t}"),
                            ));
                        }
                        Some(_) => {}
                    }
                    if o.floor.is_some() {
                        return Err(SloError::invalid(
                            at("floor"),
                            "only throughput objectives have a floor",
                        ));
                    }
                    match (o.kind, o.threshold) {
                        (ObjectiveKind::Latency, None) => {
                            return Err(SloError::invalid(
                                at("threshold"),
                                "required for a latency objective, e.g. 50ms",
                            ));
                        }
                        (ObjectiveKind::Latency, Some(Duration::ZERO)) => {
                            return Err(SloError::invalid(at("threshold"), "must be above zero"));
                        }
                        (ObjectiveKind::Ratio, Some(_)) => {
                            return Err(SloError::invalid(
                                at("threshold"),
                                "only latency objectives have a threshold",
                            ));
                        }
                        _ => {}
                    }
                    for (field, q) in [("sli.errors", &o.sli.errors), ("sli.total", &o.sli.total)] {
                        check_query(&at(field), q.as_deref())?;
                    }
                    if o.sli.rate.is_some() {
                        return Err(SloError::invalid(
                            at("sli.rate"),
                            "ratio and latency SLIs are `errors` and `total`",
                        ));
                    }
                }
                ObjectiveKind::Throughput => {
                    match o.floor {
                        None => {
                            return Err(SloError::invalid(
                                at("floor"),
                                "required: the least events per second",
                            ));
                        }
                        Some(f) if !(f > 0.0 && f.is_finite()) => {
                            return Err(SloError::invalid(
                                at("floor"),
                                format!("must be above zero, found {f}"),
                            ));
                        }
                        Some(_) => {}
                    }
                    if o.target.is_some() || o.threshold.is_some() {
                        return Err(SloError::invalid(
                            at(if o.target.is_some() {
                                "target"
                            } else {
                                "threshold"
                            }),
                            "a throughput objective has a floor only",
                        ));
                    }
                    check_query(&at("sli.rate"), o.sli.rate.as_deref())?;
                    if o.sli.errors.is_some() || o.sli.total.is_some() {
                        return Err(SloError::invalid(
                            at("sli"),
                            "a throughput SLI is `rate` only",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Objectives about `subject`.
    pub fn about(&self, subject: Subject) -> impl Iterator<Item = &Objective> {
        self.objectives.iter().filter(move |o| o.subject == subject)
    }
}

fn check_query(field: &str, q: Option<&str>) -> Result<(), SloError> {
    match q {
        None => Err(SloError::invalid(field, "required: a PromQL expression")),
        Some(q) if q.trim().is_empty() => Err(SloError::invalid(field, "must not be empty")),
        Some(_) => Ok(()),
    }
}

fn is_label_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
version: 1
service: troupe
objectives:
  - name: availability
    kind: ratio
    subject: tasks
    target: 99.9
    sli:
      errors: a[{{window}}]
      total: b[{{window}}]
  - name: tasks-floor
    kind: throughput
    subject: tasks
    floor: 10000
    sli:
      rate: sum(rate(troupe_tasks_completed_total[5m]))
"#;

    #[test]
    fn a_valid_policy_parses_with_a_30_day_default_window() {
        let p = Policy::from_yaml_str(BASE).unwrap();
        assert_eq!(p.window, Duration::from_secs(30 * 86400));
        let a = &p.objectives[0];
        assert!((a.error_budget().unwrap() - 0.001).abs() < 1e-12);
        assert_eq!(a.statement(), "tasks good ≥ 99.9% (bad ≤ 0.1%)");
        assert_eq!(p.objectives[1].statement(), "tasks ≥ 10000/s");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("target: 99.9", "target: 100", "objectives[0].target"),
            (
                "target: 99.9",
                "target: 99.9\n    threshold: 5ms",
                "objectives[0].threshold",
            ),
            ("floor: 10000", "floor: -1", "objectives[1].floor"),
            (
                "name: tasks-floor",
                "name: availability",
                "objectives[1].name",
            ),
            (
                "name: tasks-floor",
                "name: Tasks Floor",
                "objectives[1].name",
            ),
            (
                "      rate: sum",
                "      errors: sum",
                "objectives[1].sli.rate",
            ),
            ("version: 1", "version: 2", "version"),
            (
                "      total: b[{{window}}]\n",
                "",
                "objectives[0].sli.total",
            ),
        ];
        for (from, to, field) in cases {
            let text = BASE.replacen(from, to, 1);
            match Policy::from_yaml_str(&text) {
                Err(SloError::Invalid { field: f, .. }) => assert_eq!(f, field, "{to}"),
                other => panic!("{to}: expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_and_kinds_are_parse_errors_that_say_where() {
        let e =
            Policy::from_yaml_str(&BASE.replacen("kind: ratio", "kind: ratios", 1)).unwrap_err();
        assert!(
            matches!(&e, SloError::Parse(m) if m.contains("objectives[0].kind")),
            "{e}"
        );
        let e = Policy::from_yaml_str(&BASE.replacen("floor: 10000", "flor: 1", 1)).unwrap_err();
        assert!(
            matches!(&e, SloError::Parse(m) if m.contains("flor")),
            "{e}"
        );
    }
}
