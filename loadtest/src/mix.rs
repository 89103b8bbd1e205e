//! The workload mix: which tasks to send, in what proportions, and how much bus traffic.
//!
//! A mix is a TOML file of `[[task]]` entries and an optional `[bus]` table (see
//! `loadtest/mix.toml`, the default, and loadtest/README.md). Each entry's payload is built once
//! here, so the generator only clones a `Bytes` per request.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use thiserror::Error;
use troupe::Priority;

/// The default mix, shipped as `loadtest/mix.toml`.
pub const DEFAULT_MIX: &str = include_str!("../mix.toml");

/// Largest payload a mix may ask for; bigger is a typo more often than a test.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Why a mix cannot be used. `field` is a path such as `task[2].cost`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MixError {
    /// The file could not be read.
    #[error("cannot read mix file {path}: {reason}")]
    Io {
        /// The file asked for.
        path: String,
        /// Why reading failed.
        reason: String,
    },
    /// The TOML does not parse or does not match the schema (the message says where).
    #[error("mix does not parse: {0}")]
    Parse(String),
    /// A field holds a value that cannot be used.
    #[error("invalid mix field `{field}`: {reason}")]
    Invalid {
        /// Path to the field.
        field: String,
        /// Why the value is rejected.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> MixError {
    MixError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MixFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    task: Vec<EntryFile>,
    #[serde(default)]
    workflow: Vec<WorkflowFile>,
    #[serde(default)]
    bus: Option<BusFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    name: Option<String>,
    /// A definition file (TOML, YAML or JSON), relative to the mix file.
    definition: std::path::PathBuf,
    #[serde(default)]
    input: String,
    share: f64,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    name: Option<String>,
    kind: String,
    capability: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    payload_bytes: Option<usize>,
    cost: Option<u64>,
    payload: Option<String>,
    share: f64,
    #[serde(default)]
    sandbox: bool,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BusFile {
    rate: f64,
    #[serde(default)]
    publish_share: f64,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default = "default_bus_payload")]
    payload_bytes: usize,
}

fn default_topic() -> String {
    "events".to_owned()
}

fn default_bus_payload() -> usize {
    32
}

/// One kind of task in the mix.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Label in reports (defaults to the capability).
    pub name: String,
    /// Agent kind that runs it.
    pub kind: String,
    /// What the task targets: the capability, or the kind itself.
    pub target: String,
    /// Queue priority.
    pub priority: Priority,
    /// The payload every request of this entry carries.
    pub payload: Bytes,
    /// Kind-specific cost as written (see [`Entry::cost_meaning`]).
    pub cost: Option<u64>,
    /// Relative weight, normalised so all shares sum to 1.
    pub share: f64,
    /// Run through the tri-sandbox.
    pub sandbox: bool,
    /// Task timeout, if any; for a workflow, how long its end is waited for.
    pub timeout: Option<Duration>,
    /// A workflow execution instead of a task: the definition, started with `payload` as its
    /// input (`kind` is `workflow`, `target` the workflow's name).
    pub workflow: Option<std::sync::Arc<troupe_workflow::Workflow>>,
}

impl Entry {
    /// What `cost` means for this entry's kind.
    pub fn cost_meaning(kind: &str) -> Option<&'static str> {
        match kind {
            "compute" => Some("hash rounds"),
            "io" => Some("latency in ms"),
            "router" => Some("agents asked (fan-out)"),
            _ => None,
        }
    }
}

/// Bus traffic sent alongside the tasks.
#[derive(Debug, Clone)]
pub struct BusMix {
    /// Messages per second, all kinds together.
    pub rate: f64,
    /// Fraction published to `topic`; the rest are direct sends, round robin over every agent.
    pub publish_share: f64,
    /// Topic published to.
    pub topic: String,
    /// Payload every message carries.
    pub payload: Bytes,
}

/// A validated mix.
#[derive(Debug, Clone)]
pub struct Mix {
    /// Name for reports.
    pub name: String,
    /// Task entries; shares sum to 1.
    pub entries: Vec<Entry>,
    /// Bus traffic, if any.
    pub bus: Option<BusMix>,
}

impl Mix {
    /// The default mix (`loadtest/mix.toml`).
    pub fn default_mix() -> Result<Self, MixError> {
        Self::from_toml_str(DEFAULT_MIX)
    }

    /// Reads a mix file; workflow definitions are found relative to it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, MixError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| MixError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates a mix; workflow definitions are found relative to the current
    /// directory.
    pub fn from_toml_str(text: &str) -> Result<Self, MixError> {
        Self::parse(text, Path::new("."))
    }

    /// Whether any entry is a workflow (the target then needs a workflow engine).
    pub fn has_workflows(&self) -> bool {
        self.entries.iter().any(|e| e.workflow.is_some())
    }

    fn parse(text: &str, base: &Path) -> Result<Self, MixError> {
        let file: MixFile = toml::from_str(text).map_err(|e| MixError::Parse(e.to_string()))?;
        if file.task.is_empty() && file.workflow.is_empty() {
            return Err(invalid(
                "task",
                "the mix needs at least one [[task]] or [[workflow]] entry",
            ));
        }
        let total: f64 = file.task.iter().map(|e| e.share).sum::<f64>()
            + file.workflow.iter().map(|w| w.share).sum::<f64>();
        let mut entries = Vec::with_capacity(file.task.len());
        for (i, e) in file.task.into_iter().enumerate() {
            let at = |f: &str| format!("task[{i}].{f}");
            if !troupe_agents::kinds::KINDS.contains(&e.kind.as_str()) {
                return Err(invalid(
                    at("kind"),
                    format!(
                        "unknown kind `{}`; built-in kinds are {}",
                        e.kind,
                        troupe_agents::kinds::KINDS.join(", ")
                    ),
                ));
            }
            if !(e.share.is_finite() && e.share > 0.0) {
                return Err(invalid(
                    at("share"),
                    format!("must be above zero, found {}", e.share),
                ));
            }
            let priority = match e.priority.as_deref() {
                None => Priority::Normal,
                Some(p) => p.parse().map_err(|_| {
                    invalid(
                        at("priority"),
                        format!(
                            "unknown priority `{p}`; use critical, high, normal, low or background"
                        ),
                    )
                })?,
            };
            if let Some(c) = e.cost
                && Entry::cost_meaning(&e.kind).is_none()
            {
                return Err(invalid(
                    at("cost"),
                    format!(
                        "kind `{}` has no cost (found {c}); only compute, io and router do",
                        e.kind
                    ),
                ));
            }
            if e.cost == Some(0) {
                return Err(invalid(
                    at("cost"),
                    "must be above zero (omit it for the agent's default)",
                ));
            }
            if let Some(n) = e.payload_bytes
                && n > MAX_PAYLOAD_BYTES
            {
                return Err(invalid(
                    at("payload_bytes"),
                    format!("{n} is above the limit of {MAX_PAYLOAD_BYTES}"),
                ));
            }
            if e.timeout == Some(Duration::ZERO) {
                return Err(invalid(
                    at("timeout"),
                    "must be above zero (omit it for none)",
                ));
            }
            let payload = match e.payload {
                Some(p) => {
                    if e.cost.is_some() || e.payload_bytes.is_some() {
                        return Err(invalid(
                            at("payload"),
                            "a literal payload excludes `cost` and `payload_bytes`",
                        ));
                    }
                    Bytes::from(p)
                }
                None => build_payload(&e.kind, e.cost, e.payload_bytes.unwrap_or(0)),
            };
            let target = e.capability.unwrap_or_else(|| e.kind.clone());
            if target.is_empty() {
                return Err(invalid(at("capability"), "must not be empty"));
            }
            entries.push(Entry {
                name: e.name.unwrap_or_else(|| target.clone()),
                kind: e.kind,
                target,
                priority,
                payload,
                cost: e.cost,
                share: e.share / total,
                sandbox: e.sandbox,
                timeout: e.timeout,
                workflow: None,
            });
        }
        let tasks = entries.len();
        for (i, w) in file.workflow.into_iter().enumerate() {
            let at = |f: &str| format!("workflow[{i}].{f}");
            if !(w.share.is_finite() && w.share > 0.0) {
                return Err(invalid(
                    at("share"),
                    format!("must be above zero, found {}", w.share),
                ));
            }
            if w.timeout == Some(Duration::ZERO) {
                return Err(invalid(
                    at("timeout"),
                    "must be above zero (omit it for the run's)",
                ));
            }
            let path = base.join(&w.definition);
            // The pool's kinds are checked when the target registers it.
            let definition = troupe_workflow::Workflow::from_file(&path)
                .map_err(|e| invalid(at("definition"), format!("{}: {e}", path.display())))?;
            entries.push(Entry {
                name: w.name.unwrap_or_else(|| definition.name.clone()),
                kind: "workflow".to_owned(),
                target: definition.name.clone(),
                priority: Priority::Normal,
                payload: Bytes::from(w.input),
                cost: None,
                share: w.share / total,
                sandbox: false,
                timeout: w.timeout,
                workflow: Some(std::sync::Arc::new(definition)),
            });
        }
        for (i, e) in entries.iter().enumerate() {
            if entries[..i].iter().any(|p| p.name == e.name) {
                let field = if i < tasks {
                    format!("task[{i}].name")
                } else {
                    format!("workflow[{}].name", i - tasks)
                };
                return Err(invalid(
                    field,
                    format!(
                        "`{}` is used by an earlier entry; give each a distinct name",
                        e.name
                    ),
                ));
            }
        }
        let bus = match file.bus {
            None => None,
            Some(b) => {
                if !(b.rate.is_finite() && b.rate >= 0.0) {
                    return Err(invalid(
                        "bus.rate",
                        format!("must be zero or more, found {}", b.rate),
                    ));
                }
                if !(0.0..=1.0).contains(&b.publish_share) {
                    return Err(invalid(
                        "bus.publish_share",
                        format!("must be between 0 and 1, found {}", b.publish_share),
                    ));
                }
                if b.payload_bytes > MAX_PAYLOAD_BYTES {
                    return Err(invalid(
                        "bus.payload_bytes",
                        format!(
                            "{} is above the limit of {MAX_PAYLOAD_BYTES}",
                            b.payload_bytes
                        ),
                    ));
                }
                if let Err(e) = troupe::Topic::validate_name(&b.topic) {
                    return Err(invalid("bus.topic", e.to_string()));
                }
                (b.rate > 0.0).then(|| BusMix {
                    rate: b.rate,
                    publish_share: b.publish_share,
                    topic: b.topic,
                    payload: Bytes::from(filler(b.payload_bytes)),
                })
            }
        };
        Ok(Mix {
            name: file.name.unwrap_or_else(|| "mix".to_owned()),
            entries,
            bus,
        })
    }

    /// Shares of each priority, in [`Priority::ALL`] order.
    pub fn priority_shares(&self) -> [f64; Priority::COUNT] {
        let mut s = [0.0; Priority::COUNT];
        for e in &self.entries {
            s[e.priority.index()] += e.share;
        }
        s
    }
}

/// ASCII filler: payloads travel as JSON strings over HTTP, so they must be valid UTF-8.
fn filler(n: usize) -> String {
    "x".repeat(n)
}

/// The payload for `kind` with `cost`, padded to at least `bytes` (see agents/src/kinds.rs for
/// what each kind reads from its payload).
fn build_payload(kind: &str, cost: Option<u64>, bytes: usize) -> Bytes {
    let head = match (kind, cost) {
        ("compute", Some(n)) => format!("{n}|"),
        ("io", Some(ms)) => format!("latency={ms},jitter=0,pad="),
        ("router", Some(n)) => format!("reply*{n}:"),
        ("router", None) => "reply*8:".to_owned(),
        _ => String::new(),
    };
    let pad = bytes.saturating_sub(head.len());
    Bytes::from(head + &filler(pad))
}

/// Picks entries in proportion to their shares, deterministically: smooth weighted round robin
/// (as nginx balances upstreams), so any window of n picks is within one of n × share.
#[derive(Debug, Clone)]
pub struct Picker {
    weights: Vec<f64>,
    current: Vec<f64>,
}

impl Picker {
    /// A picker over `mix`'s entries.
    pub fn new(mix: &Mix) -> Self {
        Picker {
            weights: mix.entries.iter().map(|e| e.share).collect(),
            current: vec![0.0; mix.entries.len()],
        }
    }

    /// The index of the next entry.
    pub fn next_index(&mut self) -> usize {
        let mut best = 0;
        for i in 0..self.current.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= 1.0;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_mix_is_valid_and_exercises_everything_the_issue_names() {
        let mix = Mix::default_mix().unwrap();
        let shares = mix.priority_shares();
        assert!(
            shares.iter().all(|&s| s > 0.0),
            "every priority: {shares:?}"
        );
        assert!(mix.entries.iter().any(|e| e.sandbox));
        assert!(
            mix.entries
                .iter()
                .any(|e| e.kind == "io" && e.cost == Some(20))
        );
        let bus = mix.bus.as_ref().unwrap();
        assert!(bus.publish_share > 0.0 && bus.publish_share < 1.0);
        let sum: f64 = mix.entries.iter().map(|e| e.share).sum();
        assert!((sum - 1.0).abs() < 1e-9);
    }

    #[test]
    fn payloads_carry_the_cost_the_kind_reads() {
        let mix = Mix::from_toml_str(
            r#"
            [[task]]
            kind = "compute"
            cost = 7
            payload_bytes = 16
            share = 1
            [[task]]
            kind = "io"
            cost = 20
            share = 1
            [[task]]
            kind = "echo"
            payload = "hello"
            share = 2
            "#,
        )
        .unwrap();
        assert_eq!(&mix.entries[0].payload[..], b"7|xxxxxxxxxxxxxx");
        assert!(mix.entries[1].payload.starts_with(b"latency=20,"));
        assert_eq!(&mix.entries[2].payload[..], b"hello");
        assert_eq!(mix.entries[2].share, 0.5);
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = "[[task]]\nkind = \"echo\"\nshare = 1\n";
        let cases = [
            ("kind = \"echo\"", "kind = \"gpu\"", "task[0].kind"),
            ("share = 1", "share = 0", "task[0].share"),
            ("share = 1", "share = 1\ncost = 5", "task[0].cost"),
            (
                "share = 1",
                "share = 1\npriority = \"urgent\"",
                "task[0].priority",
            ),
            (
                "share = 1",
                "share = 1\npayload_bytes = 9999999",
                "task[0].payload_bytes",
            ),
            (
                "share = 1",
                "share = 1\ntimeout = \"0s\"",
                "task[0].timeout",
            ),
            (
                "share = 1",
                "share = 1\n[bus]\nrate = 10\npublish_share = 2",
                "bus.publish_share",
            ),
            (
                "share = 1",
                "share = 1\n[[task]]\nkind = \"echo\"\nshare = 1",
                "task[1].name",
            ),
        ];
        for (from, to, field) in cases {
            match Mix::from_toml_str(&base.replacen(from, to, 1)) {
                Err(MixError::Invalid { field: f, .. }) => assert_eq!(f, field, "{to}"),
                other => panic!("{to}: expected invalid {field}, got {other:?}"),
            }
        }
        assert!(
            matches!(Mix::from_toml_str(""), Err(MixError::Invalid { field, .. }) if field == "task")
        );
        let e =
            Mix::from_toml_str("[[task]]\nkind = \"echo\"\nshare = 1\nshare_x = 2\n").unwrap_err();
        assert!(
            matches!(&e, MixError::Parse(m) if m.contains("share_x")),
            "{e}"
        );
    }

    #[test]
    fn the_picker_follows_the_shares_exactly_over_any_window() {
        let mix = Mix::from_toml_str(
            "[[task]]\nkind = \"echo\"\nshare = 7\n[[task]]\nkind = \"io\"\nshare = 2\n[[task]]\nkind = \"compute\"\nshare = 1\n",
        )
        .unwrap();
        let mut p = Picker::new(&mix);
        let mut counts = [0usize; 3];
        for n in 1..=1000 {
            counts[p.next_index()] += 1;
            for (c, e) in counts.iter().zip(&mix.entries) {
                assert!(
                    (*c as f64 - n as f64 * e.share).abs() <= 1.0 + 1e-9,
                    "{counts:?} at {n}"
                );
            }
        }
        assert_eq!(counts, [700, 200, 100]);
    }
}
