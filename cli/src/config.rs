//! The node's configuration file: HTTP settings, logging, the pool, and runtime settings.
//!
//! ```toml
//! catalog = "agents/pool.toml"      # optional; the default 928-agent pool otherwise
//! [http]
//! listen = "127.0.0.1:9464"
//! token = "s3cret"                  # bearer token required on POST endpoints
//! max_payload_bytes = 1048576
//! allow_non_loopback = false        # without a token the node binds to loopback only
//! [log]
//! format = "plain"                  # or "json"; level from RUST_LOG / LOG_LEVEL
//! [runtime]                         # any troupe::RuntimeConfig field (queues, mailbox, ...)
//! queues.capacity = { critical = 1000, high = 2000, normal = 5000, low = 5000, background = 5000 }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use troupe::RuntimeConfig;
use troupe_agents::{Catalogue, CatalogueError};

/// A node config that cannot be used; the message names the field.
#[derive(Debug, Error)]
pub enum NodeConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TOML does not parse or has unknown fields.
    #[error("{path}: {reason}")]
    Parse {
        /// The path.
        path: String,
        /// The parser's message (it names the line and key).
        reason: String,
    },
    /// A field is invalid.
    #[error("{path}: invalid field `{field}`: {reason}")]
    Invalid {
        /// The path.
        path: String,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The pool catalogue is invalid.
    #[error("catalogue {path}: {source}")]
    Catalogue {
        /// The catalogue path.
        path: String,
        /// What is wrong.
        source: CatalogueError,
    },
    /// The runtime settings are invalid.
    #[error("{path}: {source}")]
    Runtime {
        /// The path.
        path: String,
        /// What is wrong.
        source: troupe::ConfigError,
    },
}

/// HTTP settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Bearer token: when set, every endpoint but `/health`, `/health/ready` and `/metrics`
    /// requires `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// A second token that opens the read-only endpoints (`GET`) but not the mutating ones,
    /// for dashboards and pollers.
    pub read_token: Option<String>,
    /// Largest accepted task or message payload.
    pub max_payload_bytes: usize,
    /// Bind to a non-loopback address even without a token.
    pub allow_non_loopback: bool,
    /// How many task records `GET /v1/tasks/{id}` remembers at most.
    pub task_records: usize,
    /// How many bytes of task records it keeps at most (outputs included); the oldest go first.
    pub task_record_bytes: usize,
    /// The largest output a record keeps; a larger one is dropped from the record, which says
    /// so (a `?wait=true` response still carries it whole).
    pub max_record_output_bytes: usize,
    /// Most connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a request's headers may take to arrive.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: std::time::Duration,
    /// Time a request's body may take to arrive.
    #[serde(with = "humantime_serde")]
    pub body_timeout: std::time::Duration,
    /// Time a connection may sit idle between requests before it is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: std::time::Duration,
    /// After shutdown, how long the node keeps answering reads once every task record is
    /// final, so clients polling `/v1/tasks/{id}` can see their outcome.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: std::time::Duration,
    /// Most tasks HTTP clients may have in the pool at once (0: no limit). Past it a submission
    /// is refused at once with 429 `overloaded` and `Retry-After` (lower priorities first:
    /// `normal` at 90 % of it, `low` at 75 %, `background` at 60 %; `critical` never).
    pub max_in_flight_tasks: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            token: None,
            max_payload_bytes: 1 << 20,
            allow_non_loopback: false,
            task_records: 100_000,
            task_record_bytes: 256 << 20,
            max_record_output_bytes: 64 << 10,
            max_connections: 10_000,
            header_read_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            idle_timeout: std::time::Duration::from_secs(60),
            shutdown_grace: std::time::Duration::from_secs(2),
            read_token: None,
            max_in_flight_tasks: 2048,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Plain or JSON.
    pub format: LogFormat,
    /// Default level when neither RUST_LOG nor LOG_LEVEL is set.
    pub level: Option<String>,
    /// Log a panic's backtrace with its one line (captured at the panic, whatever
    /// `RUST_BACKTRACE` says; the first capture costs tens of MB of memory).
    pub panic_backtraces: bool,
}

/// Span export.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/HTTP traces endpoint (for example `http://127.0.0.1:4318/v1/traces`); no export
    /// when absent. Needs a build with the `otel` feature.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Which spans to export (an `EnvFilter` directive): task and bus spans are `debug`.
    pub filter: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: "troupe".into(),
            filter: "troupe=debug,info".into(),
        }
    }
}

/// How the node spreads its threads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThreadsConfig {
    /// Worker threads of the agents' runtime; the number of cores when absent.
    pub agents: Option<usize>,
    /// Worker threads of the control plane (HTTP, signals, the watchdog, shutdown), apart
    /// from the agents', so health, metrics and shutdown answer whatever agents do.
    pub control: Option<usize>,
}

/// The whole node config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Pool catalogue file; the default pool when absent.
    pub catalog: Option<PathBuf>,
    /// HTTP settings.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// Span export over OTLP.
    pub tracing: TracingConfig,
    /// Runtime settings (its `tiers` are replaced by the catalogue's).
    pub runtime: RuntimeConfig,
    /// Threads.
    pub threads: ThreadsConfig,
    /// Joins a cluster over NATS JetStream (README "Run a cluster"); a single node without it.
    pub cluster: Option<troupe_cluster::ClusterConfig>,
    /// Runs workflows (README "Workflows") with a durable history; off without it.
    pub workflows: Option<WorkflowsConfig>,
}

/// `[workflows]`: the engine's history and the definitions registered at start.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowsConfig {
    /// The SQLite file of the execution history.
    pub history: PathBuf,
    /// Ended executions older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention_age: std::time::Duration,
    /// At most this many executions are kept.
    pub retention_count: u64,
    /// Where `escalated` events are POSTed as JSON, for workflows that name no URL of their own.
    pub escalation_webhook: Option<String>,
    /// Definition files (TOML, YAML or JSON) registered at start; a bad one stops the start.
    pub definitions: Vec<PathBuf>,
}

impl Default for WorkflowsConfig {
    fn default() -> Self {
        let e = troupe_workflow::EngineConfig::default();
        WorkflowsConfig {
            history: e.history,
            retention_age: e.retention_age,
            retention_count: e.retention_count,
            escalation_webhook: e.escalation_webhook,
            definitions: Vec::new(),
        }
    }
}

impl WorkflowsConfig {
    /// The engine's settings.
    pub fn engine(&self) -> troupe_workflow::EngineConfig {
        troupe_workflow::EngineConfig {
            history: self.history.clone(),
            retention_age: self.retention_age,
            retention_count: self.retention_count,
            escalation_webhook: self.escalation_webhook.clone(),
        }
    }
}

/// A node config resolved into what `serve` runs.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The node settings.
    pub node: NodeConfig,
    /// The runtime config with the pool applied.
    pub runtime: RuntimeConfig,
}

impl NodeConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, NodeConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| NodeConfigError::Io {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &p)
    }

    /// Parses and checks config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, NodeConfigError> {
        let config: NodeConfig = troupe::parse_toml(text).map_err(|e| match e {
            troupe::ConfigError::Invalid { field, reason } => NodeConfigError::Invalid {
                path: origin.to_owned(),
                field,
                reason,
            },
            other => NodeConfigError::Parse {
                path: origin.to_owned(),
                reason: other.to_string(),
            },
        })?;
        for (field, zero) in [
            ("http.max_connections", config.http.max_connections == 0),
            (
                "http.header_read_timeout",
                config.http.header_read_timeout.is_zero(),
            ),
            ("http.body_timeout", config.http.body_timeout.is_zero()),
            ("http.idle_timeout", config.http.idle_timeout.is_zero()),
            ("threads.agents", config.threads.agents == Some(0)),
            ("threads.control", config.threads.control == Some(0)),
            (
                "workflows.retention_count",
                config
                    .workflows
                    .as_ref()
                    .is_some_and(|w| w.retention_count == 0),
            ),
        ] {
            if zero {
                return Err(NodeConfigError::Invalid {
                    path: origin.to_owned(),
                    field: field.into(),
                    reason: "must be above zero".into(),
                });
            }
        }
        if let Some(url) = config
            .workflows
            .as_ref()
            .and_then(|w| w.escalation_webhook.as_deref())
        {
            troupe_workflow::check_webhook_url(url).map_err(|reason| NodeConfigError::Invalid {
                path: origin.to_owned(),
                field: "workflows.escalation_webhook".into(),
                reason,
            })?;
        }
        if let Some(c) = &config.cluster {
            match c.validate() {
                Err(troupe_cluster::ClusterError::Config { field, reason }) => {
                    return Err(NodeConfigError::Invalid {
                        path: origin.to_owned(),
                        field,
                        reason,
                    });
                }
                Err(other) => {
                    return Err(NodeConfigError::Invalid {
                        path: origin.to_owned(),
                        field: "cluster".into(),
                        reason: other.to_string(),
                    });
                }
                Ok(()) => {}
            }
        }
        if config.http.read_token.is_some() && config.http.token.is_none() {
            return Err(NodeConfigError::Invalid {
                path: origin.to_owned(),
                field: "http.read_token".into(),
                reason: "needs `http.token` (without one, reads are open to all)".into(),
            });
        }
        if config.http.max_payload_bytes == 0 {
            return Err(NodeConfigError::Invalid {
                path: origin.to_owned(),
                field: "http.max_payload_bytes".into(),
                reason: "must be at least 1".into(),
            });
        }
        if config.tracing.otlp_endpoint.is_some() && !cfg!(feature = "otel") {
            return Err(NodeConfigError::Invalid {
                path: origin.to_owned(),
                field: "tracing.otlp_endpoint".into(),
                reason: "this build has no OTLP exporter (build with `--features otel`)".into(),
            });
        }
        if config
            .http
            .token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(NodeConfigError::Invalid {
                path: origin.to_owned(),
                field: "http.token".into(),
                reason: "must not be empty (omit it to disable auth)".into(),
            });
        }
        Ok(config)
    }

    /// Applies the catalogue (or the default pool) and validates the runtime settings.
    pub fn resolve(self, origin: &str) -> Result<Resolved, NodeConfigError> {
        let catalogue = match &self.catalog {
            Some(path) => {
                Catalogue::from_file(path).map_err(|source| NodeConfigError::Catalogue {
                    path: path.display().to_string(),
                    source,
                })?
            }
            None => Catalogue::default_pool().map_err(|source| NodeConfigError::Catalogue {
                path: "default".into(),
                source,
            })?,
        };
        let mut runtime = catalogue.apply(self.runtime.clone());
        if let Some(p) = &mut runtime.sandbox.process {
            if p.command.is_empty() {
                p.command = default_worker_command();
            }
        } else if runtime
            .sandbox
            .kinds
            .iter()
            .any(|k| k.lanes == troupe::sandbox::LaneMode::Process)
        {
            runtime.sandbox.process = Some(troupe::sandbox::ProcessConfig {
                command: default_worker_command(),
            });
        }
        runtime
            .validate()
            .map_err(|source| NodeConfigError::Runtime {
                path: origin.to_owned(),
                source,
            })?;
        Ok(Resolved {
            node: self,
            runtime,
        })
    }
}

/// This executable in worker mode: `troupe sandbox-worker`.
fn default_worker_command() -> Vec<String> {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "troupe".into());
    vec![exe, "sandbox-worker".into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(text: &str) -> String {
        match NodeConfig::parse(text, "node.toml") {
            Err(NodeConfigError::Invalid { field, .. }) => field,
            other => panic!("{text}: expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn bad_fields_are_named_by_their_path() {
        assert_eq!(field_of("[http]\nlisten = 5"), "http.listen");
        assert_eq!(field_of("[http]\ncolour = 1"), "http.colour");
        assert_eq!(
            field_of("[runtime.queues]\ncapacity = { normal = \"ten\" }"),
            "runtime.queues.capacity.normal"
        );
        let e = NodeConfig::parse("[http]\nlisten = 5", "node.toml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("node.toml: invalid field `http.listen`"),
            "{e}"
        );
    }

    #[test]
    fn a_workflows_webhook_that_cannot_be_sent_to_is_named() {
        let e = NodeConfig::parse(
            "[workflows]\nescalation_webhook = \"ftp://ops/hook\"",
            "node.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("workflows.escalation_webhook") && e.contains("scheme `ftp`"),
            "{e}"
        );
        let ok = NodeConfig::parse(
            "[workflows]\nescalation_webhook = \"http://127.0.0.1:9000/hook\"",
            "node.toml",
        )
        .unwrap();
        assert_eq!(
            ok.workflows.unwrap().engine().escalation_webhook.as_deref(),
            Some("http://127.0.0.1:9000/hook")
        );
    }

    #[test]
    fn a_cluster_section_is_checked_field_by_field() {
        assert_eq!(
            field_of("[cluster]\nurls = [\"nats://x:4222\"]"),
            "cluster.node"
        );
        assert_eq!(field_of("[cluster]\nnode = \"a.b\""), "cluster.node");
        assert_eq!(
            field_of("[cluster]\nnode = \"a\"\nack_wait = \"10ms\""),
            "cluster.ack_wait"
        );
        assert_eq!(
            field_of("[cluster]\nnode = \"a\"\nurl = \"x\""),
            "cluster.url"
        );
        let c = NodeConfig::parse("[cluster]\nnode = \"n1\"", "node.toml").unwrap();
        let c = c.cluster.unwrap();
        assert_eq!((c.node.as_str(), c.max_attempts), ("n1", 5));
        assert!(
            NodeConfig::parse("", "node.toml")
                .unwrap()
                .cluster
                .is_none()
        );
    }

    #[test]
    fn a_partial_priority_table_keeps_the_other_defaults() {
        let c =
            NodeConfig::parse("[runtime.queues]\ncapacity = { normal = 10 }", "node.toml").unwrap();
        let d = troupe::QueueConfig::default().capacity;
        assert_eq!(c.runtime.queues.capacity.0[2], 10);
        assert_eq!(c.runtime.queues.capacity.0[0], d.0[0]);
    }
}
