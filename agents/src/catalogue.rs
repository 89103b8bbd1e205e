//! The pool catalogue: which agents a pool holds, in which tiers, under which supervision.
//!
//! A catalogue is a TOML file (the default one is `agents/pool.toml`, embedded in this crate).
//! Loading checks what a typo would otherwise turn into a confusing start-up failure, and
//! names the field: an unknown agent kind, a zero or negative count, duplicate tier names, and
//! a total over `max_agents`.

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;
use troupe::sandbox::SandboxConfig;
use troupe::{
    AgentGroupConfig, BackoffConfig, IntensityConfig, RestartPolicy, RuntimeConfig, Strategy,
    TierConfig,
};

use crate::kinds::KINDS;

/// The default catalogue's text (six tiers, 928 agents).
pub const DEFAULT_CATALOGUE: &str = include_str!("../pool.toml");

/// A catalogue that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CatalogueError {
    /// The text is not valid TOML for a catalogue.
    #[error("catalogue does not parse: {0}")]
    Parse(String),
    /// The file could not be read.
    #[error("cannot read catalogue {path}: {reason}")]
    Io {
        /// The path asked for.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// A field has an unusable value.
    #[error("invalid catalogue field `{field}`: {reason}")]
    Invalid {
        /// Path to the field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// More agents than the pool limit.
    #[error("the tiers ask for {requested} agents but `max_agents` is {limit}")]
    TooManyAgents {
        /// Total over all tiers.
        requested: i64,
        /// The limit.
        limit: usize,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    #[serde(default = "default_max")]
    max_agents: usize,
    #[serde(default)]
    tiers: Vec<RawTier>,
    #[serde(default)]
    sandbox: Option<SandboxConfig>,
}

fn default_max() -> usize {
    troupe::DEFAULT_MAX_AGENTS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    name: String,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default)]
    restart: RestartPolicy,
    intensity: Option<IntensityConfig>,
    backoff: Option<BackoffConfig>,
    #[serde(default)]
    agents: Vec<RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    kind: String,
    // Signed on purpose: a negative count is reported as such, naming the field.
    count: i64,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    params: toml::Table,
}

/// A validated pool catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalogue {
    /// The pool limit.
    pub max_agents: usize,
    /// Tiers in start order.
    pub tiers: Vec<TierConfig>,
    /// Sandbox kinds, if the catalogue sets them.
    pub sandbox: Option<SandboxConfig>,
}

fn invalid(field: String, reason: impl Into<String>) -> CatalogueError {
    CatalogueError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Catalogue {
    /// The default catalogue: 928 agents in six tiers.
    pub fn default_pool() -> Result<Self, CatalogueError> {
        Self::from_toml_str(DEFAULT_CATALOGUE)
    }

    /// Reads and validates a catalogue file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, CatalogueError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| CatalogueError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses and validates catalogue text.
    pub fn from_toml_str(text: &str) -> Result<Self, CatalogueError> {
        let raw: RawCatalogue = troupe::parse_toml(text).map_err(|e| match e {
            troupe::ConfigError::Invalid { field, reason } => invalid(field, reason),
            other => CatalogueError::Parse(other.to_string()),
        })?;
        let mut total: i64 = 0;
        let mut tiers = Vec::with_capacity(raw.tiers.len());
        // Tier names (empty, duplicate) are checked by the runtime's own validation below.
        for (i, t) in raw.tiers.into_iter().enumerate() {
            if t.agents.is_empty() {
                return Err(invalid(
                    format!("tiers[{i}].agents"),
                    "a tier needs at least one agent group",
                ));
            }
            let mut tier = TierConfig::new(t.name)
                .strategy(t.strategy)
                .restart(t.restart);
            if let Some(intensity) = t.intensity {
                tier.intensity = intensity;
            }
            if let Some(backoff) = t.backoff {
                tier.backoff = backoff;
            }
            for (j, g) in t.agents.into_iter().enumerate() {
                if !KINDS.contains(&g.kind.as_str()) {
                    return Err(invalid(
                        format!("tiers[{i}].agents[{j}].kind"),
                        format!(
                            "unknown agent kind `{}` (built-in kinds: {})",
                            g.kind,
                            KINDS.join(", ")
                        ),
                    ));
                }
                if g.count < 1 {
                    return Err(invalid(
                        format!("tiers[{i}].agents[{j}].count"),
                        format!("must be at least 1 (got {})", g.count),
                    ));
                }
                total = total.saturating_add(g.count);
                tier.agents.push(AgentGroupConfig {
                    kind: g.kind,
                    count: g.count as usize,
                    capabilities: g.capabilities,
                    params: g.params,
                });
            }
            tiers.push(tier);
        }
        if total > raw.max_agents as i64 {
            return Err(CatalogueError::TooManyAgents {
                requested: total,
                limit: raw.max_agents,
            });
        }
        if let Some(sb) = &raw.sandbox {
            for (i, k) in sb.kinds.iter().enumerate() {
                if !KINDS.contains(&k.kind.as_str()) {
                    return Err(invalid(
                        format!("sandbox.kinds[{i}].kind"),
                        format!("unknown agent kind `{}`", k.kind),
                    ));
                }
            }
        }
        let catalogue = Catalogue {
            max_agents: raw.max_agents,
            tiers,
            sandbox: raw.sandbox,
        };
        // The runtime's own checks (intensity periods, backoff bounds, sandbox settings).
        catalogue
            .apply(RuntimeConfig::default())
            .validate()
            .map_err(|e| match e {
                troupe::ConfigError::Invalid { field, reason } => invalid(field, reason),
                other => CatalogueError::Parse(other.to_string()),
            })?;
        Ok(catalogue)
    }

    /// Total agents.
    pub fn total_agents(&self) -> usize {
        self.tiers
            .iter()
            .flat_map(|t| &t.agents)
            .map(|a| a.count)
            .sum()
    }

    /// `base` with this catalogue's pool (limit, tiers and, if set, sandbox kinds).
    pub fn apply(&self, mut base: RuntimeConfig) -> RuntimeConfig {
        base.max_agents = self.max_agents;
        base.tiers = self.tiers.clone();
        if let Some(sb) = &self.sandbox {
            base.sandbox = sb.clone();
        }
        base
    }
}
