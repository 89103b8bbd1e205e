//! Runtime configuration: the pool (tiers of agents under supervisors), queue bounds, mailbox
//! bounds and shutdown timing.
//!
//! Load it from TOML ([`RuntimeConfig::from_toml_str`], [`RuntimeConfig::from_file`]) or build
//! it in code. [`RuntimeConfig::validate`] checks everything that does not depend on which agent
//! kinds are registered, and names the offending field in its error:
//!
//! ```
//! use troupe::RuntimeConfig;
//!
//! let err = RuntimeConfig::from_toml_str(r#"
//!     max_agents = 10
//!     [[tiers]]
//!     name = "workers"
//!     [[tiers.agents]]
//!     kind = "echo"
//!     count = 0
//! "#).unwrap_err();
//! assert_eq!(err.to_string(), "invalid config field `tiers[0].agents[0].count`: must be at least 1");
//! ```

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::priority::PerPriority;
use crate::sandbox::model::SandboxConfig;
use crate::supervisor::policy::{RestartPolicy, Strategy};

/// The default pool limit: the size of the pool Troupe was built for.
pub const DEFAULT_MAX_AGENTS: usize = 928;

/// Everything needed to start a runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Most agents the pool may hold, across all tiers (928 by default).
    pub max_agents: usize,
    /// Task queue bounds and fairness.
    pub queues: QueueConfig,
    /// Mailbox bounds and the default overflow policy.
    pub mailbox: MailboxConfig,
    /// Task defaults.
    pub tasks: TaskConfig,
    /// Shutdown timing.
    pub shutdown: ShutdownConfig,
    /// Restart intensity of the root supervisor (tier restarts after escalation).
    pub root: IntensityConfig,
    /// Liveness watchdog timing.
    pub liveness: LivenessConfig,
    /// What the runtime measures.
    pub telemetry: TelemetryConfig,
    /// The tri-sandbox: which kinds can run on three lanes, and how.
    pub sandbox: SandboxConfig,
    /// The tiers, started in this order and stopped in reverse.
    pub tiers: Vec<TierConfig>,
    /// Per-kind rate and concurrency limits (for agents calling a rate-limited upstream).
    pub limits: Vec<KindLimit>,
}

/// How fast and how many agents of one kind may run tasks. Every kind can also be paused by
/// its own handlers: one that fails with [`AgentContext::retry_after`](crate::AgentContext::retry_after)
/// holds every agent of the kind off for that long, and its task is retried after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindLimit {
    /// The agent kind.
    pub kind: String,
    /// Tasks per second the kind may start, across its agents.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Tasks that may start at once before the rate applies (default 1).
    #[serde(default = "one")]
    pub burst: u32,
    /// Tasks the kind may run at once, across its agents.
    #[serde(default)]
    pub concurrency: Option<usize>,
}

fn one() -> u32 {
    1
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_agents: DEFAULT_MAX_AGENTS,
            queues: QueueConfig::default(),
            mailbox: MailboxConfig::default(),
            tasks: TaskConfig::default(),
            shutdown: ShutdownConfig::default(),
            root: IntensityConfig {
                max_restarts: 3,
                period: Duration::from_secs(60),
            },
            liveness: LivenessConfig::default(),
            telemetry: TelemetryConfig::default(),
            sandbox: SandboxConfig::default(),
            tiers: Vec::new(),
            limits: Vec::new(),
        }
    }
}

/// Task queue bounds and the starvation guard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Most tasks queued per priority (across all targets). A partial table
    /// (`capacity = { normal = 10 }`) keeps the defaults of the levels it leaves out.
    #[serde(deserialize_with = "partial_capacity")]
    pub capacity: PerPriority<usize>,
    /// A non-empty level passed over this many times in a row by a non-critical pick takes
    /// the next one; so under sustained load it gets at least `1 / (limit + 1)` of the
    /// non-critical picks. `critical` is strict and never waits for a guard (its entry is
    /// ignored). A partial table keeps the defaults of the levels it leaves out.
    #[serde(deserialize_with = "partial_starvation_limit")]
    pub starvation_limit: PerPriority<u32>,
    /// How much of each priority's queue the tasks of one target — a capability (every kind
    /// is one) or one agent — may hold, as a fraction in (0, 1]: a target may have at most
    /// `kind_share × capacity` tasks queued plus one running per agent that serves it. Past it
    /// that target's tasks are refused (`KindFull`) while the rest of the queue stays open to
    /// the others, so one misbehaving kind cannot crowd out its neighbours. It applies only when
    /// the pool serves more than one capability.
    pub kind_share: f64,
}

fn partial_capacity<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<PerPriority<usize>, D::Error> {
    PerPriority::deserialize_partial(d, &QueueConfig::default().capacity)
}

fn partial_starvation_limit<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<PerPriority<u32>, D::Error> {
    PerPriority::deserialize_partial(d, &QueueConfig::default().starvation_limit)
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            capacity: PerPriority([10_000, 20_000, 50_000, 50_000, 50_000]),
            starvation_limit: PerPriority([u32::MAX, 4, 8, 16, 32]),
            kind_share: 0.5,
        }
    }
}

/// Mailbox bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxConfig {
    /// Most messages waiting per agent.
    pub capacity: usize,
    /// What a send does when the mailbox is full, unless the send or topic says otherwise.
    pub overflow: Overflow,
    /// Most topics the bus holds at once (a topic exists while it has subscribers or a
    /// handle); creating one more is refused with `TooManyTopics`.
    pub max_topics: usize,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            capacity: 1024,
            overflow: Overflow::Reject,
            max_topics: 10_000,
        }
    }
}

/// Defaults applied to tasks that do not set their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// Handler time limit per attempt for tasks without one; `None` for no limit.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Option<Duration>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            default_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Shutdown timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long queued and in-flight tasks may run to completion before the rest is cancelled.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long an agent asked to stop (shutdown, or a sibling restart under `one_for_all` /
    /// `rest_for_one`) may spend finishing the work in hand before that work is cancelled.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
        }
    }
}

/// What the runtime measures. Counters (submitted, outcomes, rejections, messages) always run:
/// shutdown accounting relies on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// HDR latency histograms: queue wait, handler time, submit → outcome, bus delivery.
    /// Off, `stats()` percentiles and the `_seconds` histograms stay empty.
    pub latency_histograms: bool,
    /// Report each caught agent panic as one `ERROR` tracing event (target `troupe::panic`:
    /// fields `agent`, `task`, `panic`, `location`) instead of the default panic message on stderr. It
    /// installs a process panic hook, once; panics outside agents still go to the previous
    /// hook. Off, panics print as Rust prints them.
    pub panic_hook: bool,
    /// With `panic_hook`, add a backtrace to each event (captured at the panic; the first
    /// capture loads the binary's debug info, which can cost tens of MB of memory).
    pub panic_backtraces: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            latency_histograms: true,
            panic_hook: true,
            panic_backtraces: false,
        }
    }
}

/// The liveness watchdog: every `heartbeat` it checks agents busy on a task. One still busy
/// 2 heartbeats past its task's deadline is marked unhealthy (warning); at 3 heartbeats its
/// task is answered `timeout` and its supervisor replaces it. Handlers that yield are cut off
/// at their deadline by their own timeout; this catches handlers that block their thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// The watchdog's period.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// Restart intensity: more than `max_restarts` restarts within `period` escalates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensityConfig {
    /// Restarts tolerated within `period`.
    pub max_restarts: u32,
    /// The sliding window.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

/// Delay before restarting a crashed child: `initial`, doubled for each restart of that child
/// within the intensity period, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// Delay before the first restart.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Upper bound.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

/// One tier: a supervisor and the agents under it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Unique tier name (used in metrics labels and health).
    pub name: String,
    /// How the supervisor reacts to a crashed child.
    #[serde(default)]
    pub strategy: Strategy,
    /// Which exits the supervisor restarts.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Restart intensity before escalating to the root.
    #[serde(default = "default_intensity")]
    pub intensity: IntensityConfig,
    /// Restart backoff.
    #[serde(default = "default_backoff")]
    pub backoff: BackoffConfig,
    /// The agents, started in order.
    #[serde(default)]
    pub agents: Vec<AgentGroupConfig>,
}

fn default_intensity() -> IntensityConfig {
    IntensityConfig {
        max_restarts: 10,
        period: Duration::from_secs(10),
    }
}

fn default_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(1),
        max: Duration::from_secs(1),
    }
}

impl TierConfig {
    /// A tier with default supervision and no agents yet.
    pub fn new(name: impl Into<String>) -> Self {
        TierConfig {
            name: name.into(),
            strategy: Strategy::default(),
            restart: RestartPolicy::default(),
            intensity: default_intensity(),
            backoff: default_backoff(),
            agents: Vec::new(),
        }
    }

    /// Adds `count` agents of `kind`.
    pub fn agents(mut self, kind: impl Into<String>, count: usize) -> Self {
        self.agents.push(AgentGroupConfig {
            kind: kind.into(),
            count,
            capabilities: Vec::new(),
            params: toml::Table::new(),
        });
        self
    }

    /// Sets the strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the restart policy of the children.
    pub fn restart(mut self, restart: RestartPolicy) -> Self {
        self.restart = restart;
        self
    }

    /// Sets the restart intensity.
    pub fn intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.intensity = IntensityConfig {
            max_restarts,
            period,
        };
        self
    }

    /// Sets the restart backoff.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = BackoffConfig { initial, max };
        self
    }
}

/// A run of agents of one kind within a tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGroupConfig {
    /// The registered agent kind.
    pub kind: String,
    /// How many.
    pub count: usize,
    /// Extra capabilities these agents serve, beyond their kind.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Kind-specific parameters handed to the factory.
    #[serde(default)]
    pub params: toml::Table,
}

impl RuntimeConfig {
    /// Parses and validates TOML. A value of the wrong type or an unknown field is
    /// [`ConfigError::Invalid`] naming the field's path (`queues.capacity.normal`); only text
    /// that is not TOML at all is [`ConfigError::Parse`].
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: RuntimeConfig = parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml_str(&text)
    }

    /// Adds a tier.
    pub fn tier(mut self, tier: TierConfig) -> Self {
        self.tiers.push(tier);
        self
    }

    /// Total agents over all tiers.
    pub fn total_agents(&self) -> usize {
        self.tiers
            .iter()
            .flat_map(|t| &t.agents)
            .map(|a| a.count)
            .sum()
    }

    /// Checks every field that can be checked without knowing the registered kinds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_agents == 0 {
            return Err(ConfigError::invalid("max_agents", "must be at least 1"));
        }
        if self.max_agents > u32::MAX as usize >> 8 {
            return Err(ConfigError::invalid("max_agents", "must be below 16777216"));
        }
        for (p, &c) in self.queues.capacity.iter() {
            if c == 0 {
                return Err(ConfigError::invalid(
                    format!("queues.capacity.{p}"),
                    "must be at least 1",
                ));
            }
        }
        if !(self.queues.kind_share > 0.0 && self.queues.kind_share <= 1.0) {
            return Err(ConfigError::invalid(
                "queues.kind_share",
                format!(
                    "must be above 0 and at most 1 (a fraction of each queue), found {}",
                    self.queues.kind_share
                ),
            ));
        }
        if self.mailbox.capacity == 0 {
            return Err(ConfigError::invalid(
                "mailbox.capacity",
                "must be at least 1",
            ));
        }
        if self.mailbox.max_topics == 0 {
            return Err(ConfigError::invalid(
                "mailbox.max_topics",
                "must be at least 1",
            ));
        }
        let mut limited = std::collections::HashSet::new();
        for (i, l) in self.limits.iter().enumerate() {
            if !limited.insert(l.kind.as_str()) {
                return Err(ConfigError::invalid(
                    format!("limits[{i}].kind"),
                    format!("`{}` has another limit above", l.kind),
                ));
            }
            if l.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                return Err(ConfigError::invalid(
                    format!("limits[{i}].rate"),
                    "must be a number of tasks per second above 0",
                ));
            }
            if l.burst == 0 {
                return Err(ConfigError::invalid(
                    format!("limits[{i}].burst"),
                    "must be at least 1",
                ));
            }
            if l.concurrency == Some(0) {
                return Err(ConfigError::invalid(
                    format!("limits[{i}].concurrency"),
                    "must be at least 1",
                ));
            }
        }
        if self.tasks.default_timeout == Some(Duration::ZERO) {
            return Err(ConfigError::invalid(
                "tasks.default_timeout",
                "must be above zero (omit it for no limit)",
            ));
        }
        check_period("root.period", self.root.period)?;
        check_period("shutdown.stop_timeout", self.shutdown.stop_timeout)?;
        check_period("liveness.heartbeat", self.liveness.heartbeat)?;
        let mut names = HashSet::new();
        for (i, tier) in self.tiers.iter().enumerate() {
            if tier.name.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("tiers[{i}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(tier.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("tiers[{i}].name"),
                    format!("duplicate tier name `{}`", tier.name),
                ));
            }
            check_period(
                &format!("tiers[{i}].intensity.period"),
                tier.intensity.period,
            )?;
            if tier.backoff.max < tier.backoff.initial {
                return Err(ConfigError::invalid(
                    format!("tiers[{i}].backoff.max"),
                    "must not be below backoff.initial",
                ));
            }
            for (j, group) in tier.agents.iter().enumerate() {
                if group.kind.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        format!("tiers[{i}].agents[{j}].kind"),
                        "must not be empty",
                    ));
                }
                if group.count == 0 {
                    return Err(ConfigError::invalid(
                        format!("tiers[{i}].agents[{j}].count"),
                        "must be at least 1",
                    ));
                }
            }
        }
        self.sandbox.validate()?;
        let requested = self.total_agents();
        if requested > self.max_agents {
            return Err(ConfigError::TooManyAgents {
                requested,
                limit: self.max_agents,
            });
        }
        Ok(())
    }
}

/// Deserialises TOML text into `T`, naming the path of the field at fault in the error:
/// a wrong type or an unknown field is [`ConfigError::Invalid`] with `field` set to the path
/// (`queues.capacity.normal`, `tiers[0].agents[0].count`, `mailbox.colour`); text that is not
/// TOML is [`ConfigError::Parse`] with the parser's line and column. Layers above the runtime
/// (the node's config, the pool catalogue) use it for their own files.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = inner.message().trim().to_owned();
        // The path includes an unknown field's own name.
        let field = if path == "." {
            "(top level)".to_owned()
        } else {
            path
        };
        ConfigError::Invalid { field, reason }
    })
}

fn check_period(field: &str, period: Duration) -> Result<(), ConfigError> {
    if period.is_zero() {
        Err(ConfigError::invalid(field, "must be above zero"))
    } else {
        Ok(())
    }
}

/// What a bus send does when the recipient's mailbox is full (`mailbox.overflow`, or per send
/// and per topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum Overflow {
    /// Fail the send with [`BusError::MailboxFull`](crate::BusError::MailboxFull).
    #[default]
    Reject,
    /// Drop the new message and count it in `troupe_bus_messages_dropped_total`.
    DropNewest,
    /// Wait for room, up to `timeout`; then fail like `Reject`.
    Wait {
        /// Longest wait for room.
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let c = RuntimeConfig::from_toml_str(
            r#"
            max_agents = 20
            [queues]
            capacity = { critical = 1, high = 2, normal = 3, low = 4, background = 5 }
            starvation_limit = { critical = 0, high = 1, normal = 2, low = 3, background = 4 }
            [mailbox]
            capacity = 8
            overflow = { policy = "wait", timeout = "50ms" }
            [tasks]
            default_timeout = "2s"
            [shutdown]
            drain_timeout = "1s"
            [[tiers]]
            name = "a"
            strategy = "rest_for_one"
            restart = "transient"
            intensity = { max_restarts = 2, period = "5s" }
            backoff = { initial = "1ms", max = "10ms" }
            [[tiers.agents]]
            kind = "echo"
            count = 3
            capabilities = ["talk"]
            params = { greeting = "hi" }
            "#,
        )
        .unwrap();
        assert_eq!(c.total_agents(), 3);
        assert_eq!(c.queues.capacity.0, [1, 2, 3, 4, 5]);
        assert_eq!(
            c.mailbox.overflow,
            Overflow::Wait {
                timeout: Duration::from_millis(50)
            }
        );
        assert_eq!(c.tiers[0].strategy, Strategy::RestForOne);
        assert_eq!(c.tiers[0].restart, RestartPolicy::Transient);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("max_agents = 0", "max_agents"),
            (
                "[queues]\ncapacity = { critical = 0, high = 1, normal = 1, low = 1, background = 1 }",
                "queues.capacity.critical",
            ),
            ("[[tiers]]\nname = \"\"", "tiers[0].name"),
            (
                "[[tiers]]\nname = \"a\"\n[[tiers]]\nname = \"a\"",
                "tiers[1].name",
            ),
            (
                "[[tiers]]\nname = \"a\"\nbackoff = { initial = \"1s\", max = \"1ms\" }",
                "tiers[0].backoff.max",
            ),
        ];
        for (text, field) in cases {
            match RuntimeConfig::from_toml_str(text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn too_many_agents_is_refused_with_both_numbers() {
        let c = RuntimeConfig {
            max_agents: 928,
            ..Default::default()
        }
        .tier(TierConfig::new("a").agents("echo", 900))
        .tier(TierConfig::new("b").agents("echo", 29));
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooManyAgents {
                requested: 929,
                limit: 928
            })
        );
    }

    #[test]
    fn the_readme_reference_config_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\nmax_agents")
            .expect("README has the reference config")
            + "```toml\n".len();
        let len = readme[start..].find("```").expect("block ends");
        let c = RuntimeConfig::from_toml_str(&readme[start..start + len]).unwrap();
        assert_eq!(c.total_agents(), 635);
        assert_eq!(c.tiers[0].agents[0].capabilities, ["reply"]);
        assert_eq!(c.limits[0].rate, Some(50.0));
        c.validate().unwrap();
    }

    #[test]
    fn bad_limits_name_the_entry() {
        let err = |text: &str| RuntimeConfig::from_toml_str(text).unwrap_err();
        let field = |text: &str| match err(text) {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field("[[limits]]\nkind = \"a\"\nrate = 0.0"),
            "limits[0].rate"
        );
        assert_eq!(
            field("[[limits]]\nkind = \"a\"\nconcurrency = 0"),
            "limits[0].concurrency"
        );
        assert_eq!(
            field("[[limits]]\nkind = \"a\"\nburst = 0"),
            "limits[0].burst"
        );
        assert_eq!(
            field("[[limits]]\nkind = \"a\"\n[[limits]]\nkind = \"a\""),
            "limits[1].kind"
        );
    }

    #[test]
    fn unknown_fields_and_bad_types_name_the_field_path() {
        let field = |text: &str| match RuntimeConfig::from_toml_str(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{text}: expected a field error, got {other:?}"),
        };
        assert_eq!(field("max_agent = 3"), "max_agent");
        assert_eq!(field("[mailbox]\ncapacity = \"big\""), "mailbox.capacity");
        assert_eq!(
            field("[queues]\ncapacity = { normal = \"ten\" }"),
            "queues.capacity.normal"
        );
        assert_eq!(
            field("[queues]\ncapacity = { urgent = 1 }"),
            "queues.capacity.urgent"
        );
        assert_eq!(
            field("[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"x\"\ncount = -1"),
            "tiers[0].agents[0].count"
        );
        let e = RuntimeConfig::from_toml_str("[mailbox]\ncapacity = \"big\"").unwrap_err();
        assert!(e.to_string().contains("`mailbox.capacity`"), "{e}");
        // Text that is not TOML at all still gets the parser's position.
        assert!(matches!(
            RuntimeConfig::from_toml_str("[mailbox"),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn partial_priority_tables_keep_the_defaults_they_leave_out() {
        let c = RuntimeConfig::from_toml_str(
            "[queues]\ncapacity = { normal = 10 }\nstarvation_limit = { low = 2 }",
        )
        .unwrap();
        let d = QueueConfig::default();
        assert_eq!(
            c.queues.capacity.0,
            [
                d.capacity.0[0],
                d.capacity.0[1],
                10,
                d.capacity.0[3],
                d.capacity.0[4]
            ]
        );
        assert_eq!(c.queues.starvation_limit.0[3], 2);
        assert_eq!(c.queues.starvation_limit.0[4], d.starvation_limit.0[4]);
    }
}
