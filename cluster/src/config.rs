//! The `[cluster]` section of a node's config: where NATS is, who this node is, and the
//! knobs of durability (ack wait, attempts, retention).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ClusterError;

/// How a node joins a cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URLs (any of a NATS cluster).
    pub urls: Vec<String>,
    /// This node's name, unique in the cluster: `[A-Za-z0-9_-]`, 1–64 characters.
    pub node: String,
    /// The cluster's name: streams, buckets and subjects are prefixed with it, so several
    /// Troupe clusters can share one NATS.
    pub name: String,
    /// A NATS token.
    pub token: Option<String>,
    /// A NATS credentials (`.creds`) file.
    pub credentials: Option<PathBuf>,
    /// How long a task may go unacknowledged before JetStream hands it to another node. A
    /// node running a task tells JetStream it is still at it every third of this, so only a
    /// node that died (or lost NATS) loses its tasks to the others.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries a task may take (a node that died while running it costs one); past them it
    /// ends `error` with the reason.
    pub max_attempts: u32,
    /// Most tasks of one capability a node holds at once (pulled, not yet finished), across
    /// priorities; a node also never holds more than twice the agents serving the capability
    /// (or 32, for a capability of few agents, so they do not idle on the pull round trip).
    /// This bound on outstanding acknowledgements is what carries backpressure across
    /// machines: a busy node stops asking, and the stream keeps the work for the others.
    pub pull_in_flight: usize,
    /// How long task outcomes stay readable (the outcome bucket's retention).
    #[serde(with = "humantime_serde")]
    pub outcome_retention: Duration,
    /// How often a node announces itself; one silent for three of these is shown gone.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long JetStream remembers an idempotency key (a resubmission within it is the same
    /// task).
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Most unfinished tasks the cluster's stream holds. Each priority may fill a share of it
    /// (critical all, high 90 %, normal 80 %, low 70 %, background 60 %); past its share a
    /// submission is refused (429 `backlog_full`), so the urgent keep room.
    pub max_backlog: u64,
    /// How long joining may wait for NATS at start.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            urls: vec!["nats://127.0.0.1:4222".into()],
            node: String::new(),
            name: "troupe".into(),
            token: None,
            credentials: None,
            ack_wait: Duration::from_secs(30),
            max_attempts: 5,
            pull_in_flight: 256,
            outcome_retention: Duration::from_secs(24 * 3600),
            heartbeat: Duration::from_secs(1),
            dedup_window: Duration::from_secs(120),
            max_backlog: 100_000,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ClusterError {
    ClusterError::Config {
        field: format!("cluster.{field}"),
        reason: reason.into(),
    }
}

/// True for a name usable as one NATS subject token and a stream/bucket name part.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ClusterConfig {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.urls.is_empty() {
            return Err(invalid("urls", "needs at least one NATS URL"));
        }
        if !is_token(&self.node) {
            return Err(invalid(
                "node",
                format!("`{}` must be 1-64 characters of A-Z a-z 0-9 _ -", self.node),
            ));
        }
        if !is_token(&self.name) {
            return Err(invalid(
                "name",
                format!("`{}` must be 1-64 characters of A-Z a-z 0-9 _ -", self.name),
            ));
        }
        for (field, d) in [
            ("ack_wait", self.ack_wait),
            ("heartbeat", self.heartbeat),
            ("outcome_retention", self.outcome_retention),
            ("dedup_window", self.dedup_window),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be above zero"));
            }
        }
        if self.ack_wait < Duration::from_millis(300) {
            return Err(invalid("ack_wait", "must be at least 300ms"));
        }
        if self.max_attempts == 0 {
            return Err(invalid("max_attempts", "must be at least 1"));
        }
        if self.pull_in_flight == 0 {
            return Err(invalid("pull_in_flight", "must be at least 1"));
        }
        Ok(())
    }
}
