//! Workflow definitions: a named DAG of steps, read from TOML, YAML or JSON or built in Rust,
//! and checked before anything runs.
//!
//! A step names the kind or capability that runs it, its priority, its input, the steps it
//! comes after, a condition, a deadline, retries and a fallback. [`Workflow::check`] refuses a
//! definition with the step and field named: a cycle (with the cycle), an unknown kind, a
//! dependency on a missing step, an input that refers to nothing.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe::Priority;

use crate::error::WorkflowError;

/// What a step is given as its task payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// `"$input"` (the execution's input), `"$steps.NAME"` (that step's output), or literal
    /// text.
    One(String),
    /// Several of those as one JSON object: `{"NAME": output, ..., "input": ...}`.
    Many(Vec<String>),
}

/// The source one input reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source<'a> {
    Input,
    Step(&'a str),
    Literal(&'a str),
}

pub(crate) fn source(reference: &str) -> Source<'_> {
    if reference == "$input" {
        Source::Input
    } else if let Some(step) = reference.strip_prefix("$steps.") {
        Source::Step(step)
    } else {
        Source::Literal(reference)
    }
}

/// When a step runs. Without one, it runs when every step it comes after succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The step it looks at (one of `after`).
    pub step: String,
    /// `succeeded` or `failed`.
    #[serde(default)]
    pub is: Option<StepResult>,
    /// Runs only if the step succeeded and its output contains this text.
    #[serde(default)]
    pub contains: Option<String>,
}

/// How a step ended, as a condition sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepResult {
    /// It ran and its task ended `ok`.
    Succeeded,
    /// It ran and failed (after its retries and fallback).
    Failed,
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique in the workflow: `[A-Za-z0-9_-]`, 1–64 characters.
    pub name: String,
    /// The kind or capability that runs it.
    pub target: String,
    /// Its tasks' priority.
    #[serde(default)]
    pub priority: Priority,
    /// The steps it comes after.
    #[serde(default)]
    pub after: Vec<String>,
    /// Its payload: by default the execution's input when it comes after nothing, else the
    /// outputs of the steps it comes after (one: that output; several: a JSON object).
    #[serde(default)]
    pub input: Option<Input>,
    /// When it runs (default: every step it comes after succeeded).
    #[serde(default)]
    pub when: Option<Condition>,
    /// Its deadline, over every attempt and the fallback (default 30 s).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Attempts after the first failure, on `target`.
    #[serde(default)]
    pub retries: u32,
    /// A different kind or capability to try once the retries are spent ("another strategy").
    #[serde(default)]
    pub fallback: Option<String>,
    /// Run in the tri-sandbox (2-of-3 vote).
    #[serde(default)]
    pub sandbox: bool,
}

impl Step {
    /// A step `name` run by `target`, with every other field at its default.
    pub fn new(name: impl Into<String>, target: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            target: target.into(),
            priority: Priority::Normal,
            after: Vec::new(),
            input: None,
            when: None,
            timeout: None,
            retries: 0,
            fallback: None,
            sandbox: false,
        }
    }

    /// Comes after these steps.
    pub fn after<I, S>(mut self, steps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.after = steps.into_iter().map(Into::into).collect();
        self
    }

    /// Its input (see [`Input`]).
    pub fn input(mut self, input: impl Into<String>) -> Self {
        self.input = Some(Input::One(input.into()));
        self
    }

    /// Its priority.
    pub fn priority(mut self, p: Priority) -> Self {
        self.priority = p;
        self
    }

    /// Runs only if `step` ended `is`.
    pub fn when(mut self, step: impl Into<String>, is: StepResult) -> Self {
        self.when = Some(Condition {
            step: step.into(),
            is: Some(is),
            contains: None,
        });
        self
    }

    /// Runs only if `step` succeeded with an output containing `text`.
    pub fn when_contains(mut self, step: impl Into<String>, text: impl Into<String>) -> Self {
        self.when = Some(Condition {
            step: step.into(),
            is: None,
            contains: Some(text.into()),
        });
        self
    }

    /// Its deadline.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Retries on its target, then `fallback` once.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// The kind or capability tried once the retries are spent.
    pub fn fallback(mut self, target: impl Into<String>) -> Self {
        self.fallback = Some(target.into());
        self
    }

    /// Runs in the tri-sandbox.
    pub fn sandboxed(mut self) -> Self {
        self.sandbox = true;
        self
    }

    /// The deadline, defaulted.
    pub(crate) fn deadline(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT)
    }
}

/// A step's deadline when it sets none.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A named DAG of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Its name: `[A-Za-z0-9_-]`, 1–64 characters.
    pub name: String,
    /// The whole execution's deadline (none by default).
    #[serde(default, with = "humantime_serde::option")]
    pub deadline: Option<Duration>,
    /// The fraction of a deadline (a step's or the workflow's) at which `warned` is sent.
    #[serde(default = "default_warn_at")]
    pub warn_at: f64,
    /// Where `escalated` events are POSTed as JSON (overrides the engine's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation_webhook: Option<String>,
    /// The steps, in any order.
    #[serde(default)]
    pub steps: Vec<Step>,
}

fn default_warn_at() -> f64 {
    0.8
}

/// The format of a definition file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML (`.toml`).
    Toml,
    /// YAML (`.yaml`, `.yml`).
    Yaml,
    /// JSON (`.json`).
    Json,
}

impl Format {
    /// The format a file name's extension says.
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

fn invalid(workflow: &str, at: impl Into<String>, reason: impl Into<String>) -> WorkflowError {
    WorkflowError::Definition {
        workflow: workflow.to_owned(),
        at: at.into(),
        reason: reason.into(),
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Workflow {
    /// An empty workflow `name`; add steps with [`Workflow::step`].
    pub fn new(name: impl Into<String>) -> Self {
        Workflow {
            name: name.into(),
            deadline: None,
            warn_at: default_warn_at(),
            escalation_webhook: None,
            steps: Vec::new(),
        }
    }

    /// POSTs this workflow's `escalated` events to `url`.
    pub fn escalation_webhook(mut self, url: impl Into<String>) -> Self {
        self.escalation_webhook = Some(url.into());
        self
    }

    /// Adds a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// The whole execution's deadline.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// The fraction of a deadline at which `warned` is sent.
    pub fn warn_at(mut self, fraction: f64) -> Self {
        self.warn_at = fraction;
        self
    }

    /// Parses a definition; a syntax or type error names the field path.
    pub fn parse(text: &str, format: Format) -> Result<Workflow, WorkflowError> {
        let parse_err = |at: String, reason: String| invalid("?", at, reason);
        match format {
            Format::Toml => troupe::parse_toml(text).map_err(|e| match e {
                troupe::ConfigError::Invalid { field, reason } => parse_err(field, reason),
                other => parse_err(String::new(), other.to_string()),
            }),
            Format::Yaml => {
                let de = yaml_serde::Deserializer::from_str(text);
                serde_path_to_error::deserialize(de)
                    .map_err(|e| parse_err(e.path().to_string(), e.inner().to_string()))
            }
            Format::Json => {
                let mut de = serde_json::Deserializer::from_str(text);
                serde_path_to_error::deserialize(&mut de)
                    .map_err(|e| parse_err(e.path().to_string(), e.inner().to_string()))
            }
        }
    }

    /// Reads and parses a definition file (format from its extension).
    pub fn from_file(path: &Path) -> Result<Workflow, WorkflowError> {
        let format = Format::of(path).ok_or_else(|| {
            invalid(
                "?",
                path.display().to_string(),
                "the file must end in .toml, .yaml, .yml or .json",
            )
        })?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("?", path.display().to_string(), e.to_string()))?;
        Workflow::parse(&text, format)
    }

    /// Checks the definition against the targets the pool serves (`known`: every kind and
    /// capability): names, references, conditions, and that the steps form a DAG.
    pub fn check(&self, known: &HashSet<String>) -> Result<(), WorkflowError> {
        let w = self.name.as_str();
        if !is_name(w) {
            return Err(invalid(
                w,
                "name",
                "must be 1-64 characters of A-Z a-z 0-9 _ -",
            ));
        }
        if !(self.warn_at > 0.0 && self.warn_at < 1.0) {
            return Err(invalid(w, "warn_at", "must be between 0 and 1 (e.g. 0.8)"));
        }
        if let Some(url) = &self.escalation_webhook {
            crate::webhook::check_url(url).map_err(|why| invalid(w, "escalation_webhook", why))?;
        }
        if self.steps.is_empty() {
            return Err(invalid(w, "steps", "a workflow needs at least one step"));
        }
        let mut index = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = |field: &str| format!("steps[{i}] ({}).{field}", s.name);
            if !is_name(&s.name) {
                return Err(invalid(
                    w,
                    at("name"),
                    "must be 1-64 characters of A-Z a-z 0-9 _ -",
                ));
            }
            if index.insert(s.name.as_str(), i).is_some() {
                return Err(invalid(w, at("name"), "another step has this name"));
            }
            if !known.contains(&s.target) {
                return Err(invalid(
                    w,
                    at("target"),
                    format!("no agent kind or capability `{}` in the pool", s.target),
                ));
            }
            if let Some(f) = &s.fallback {
                if !known.contains(f) {
                    return Err(invalid(
                        w,
                        at("fallback"),
                        format!("no agent kind or capability `{f}` in the pool"),
                    ));
                }
            }
            if s.timeout == Some(Duration::ZERO) {
                return Err(invalid(w, at("timeout"), "must be more than 0"));
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            let at = |field: &str| format!("steps[{i}] ({}).{field}", s.name);
            for d in &s.after {
                if !index.contains_key(d.as_str()) {
                    return Err(invalid(w, at("after"), format!("no step `{d}`")));
                }
                if d == &s.name {
                    return Err(invalid(w, at("after"), "a step cannot come after itself"));
                }
            }
            let refs: Vec<&str> = match &s.input {
                None => Vec::new(),
                Some(Input::One(r)) => vec![r.as_str()],
                Some(Input::Many(rs)) => rs.iter().map(String::as_str).collect(),
            };
            for r in refs {
                if let Source::Step(name) = source(r) {
                    if !index.contains_key(name) {
                        return Err(invalid(w, at("input"), format!("`{r}` refers to no step")));
                    }
                    if !s.after.iter().any(|d| d == name) {
                        return Err(invalid(
                            w,
                            at("input"),
                            format!("`{r}` is not a step this one comes after (add it to `after`)"),
                        ));
                    }
                }
            }
            if let Some(c) = &s.when {
                if !s.after.iter().any(|d| d == &c.step) {
                    return Err(invalid(
                        w,
                        at("when.step"),
                        format!("`{}` is not a step this one comes after", c.step),
                    ));
                }
                if c.is.is_some() == c.contains.is_some() {
                    return Err(invalid(
                        w,
                        at("when"),
                        "set exactly one of `is` (succeeded / failed) and `contains`",
                    ));
                }
            }
        }
        if let Some(cycle) = self.cycle(&index) {
            return Err(invalid(
                w,
                "steps",
                format!("the steps form a cycle: {}", cycle.join(" → ")),
            ));
        }
        Ok(())
    }

    /// A cycle among `after` edges, as step names from one back to itself.
    fn cycle(&self, index: &HashMap<&str, usize>) -> Option<Vec<String>> {
        // Depth-first with colours; the grey path is the cycle when a grey step is met again.
        let n = self.steps.len();
        let mut colour = vec![0u8; n];
        let mut path: Vec<usize> = Vec::new();
        fn visit(
            w: &Workflow,
            index: &HashMap<&str, usize>,
            i: usize,
            colour: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<String>> {
            colour[i] = 1;
            path.push(i);
            for d in &w.steps[i].after {
                let j = *index.get(d.as_str())?;
                if colour[j] == 1 {
                    let from = path.iter().position(|&p| p == j).unwrap_or(0);
                    let mut names: Vec<String> = path[from..]
                        .iter()
                        .map(|&p| w.steps[p].name.clone())
                        .collect();
                    names.push(w.steps[j].name.clone());
                    return Some(names);
                }
                if colour[j] == 0 {
                    if let Some(c) = visit(w, index, j, colour, path) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            colour[i] = 2;
            None
        }
        (0..n).find_map(|i| {
            if colour[i] == 0 {
                visit(self, index, i, &mut colour, &mut path)
            } else {
                None
            }
        })
    }
}
