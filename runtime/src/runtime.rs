//! Starting, using and stopping a runtime: the file that composes the parts.
//!
//! [`RuntimeBuilder`] takes a [`RuntimeConfig`], one factory per agent kind and any task
//! observers, builds each part (pool, admission, bus, ledger, supervision, sandbox), composes
//! them into the core and starts every agent. The resulting [`Runtime`] dereferences to a
//! [`RuntimeHandle`], the cheap, cloneable handle used to submit tasks, reach the bus and read
//! health and stats. [`Runtime::shutdown`] drains, cancels and stops, in that order.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::Serialize;

use crate::admission::Admission;
use crate::agent::{Agent, AgentFactory};
use crate::bus::BusCore;
use crate::config::RuntimeConfig;
use crate::error::{ConfigError, StartError};
use crate::events::TaskObserver;
use crate::handle::{Core, Parts, RuntimeHandle};
use crate::ids::AgentId;
use crate::ledger::Ledger;
use crate::phase::{Phase, Stage};
use crate::pool::AgentSpec;
use crate::pool::Pool;
use crate::sandbox::jobs::LaneSpawnFn;
use crate::sandbox::lanes::Sandbox;
use crate::sandbox::model::{Policies, SandboxPolicy};
use crate::supervisor::{ExitTo, SpawnFn, Start, Supervision};
use crate::task::{Outcome, OutcomeKind};
use crate::worker;

/// How to run an agent of one kind in the pool and on a lane, given the core being built.
struct Kind {
    pool: Arc<dyn Fn(Arc<Core>) -> SpawnFn + Send + Sync>,
    lane: Arc<dyn Fn(std::sync::Weak<Core>) -> LaneSpawnFn + Send + Sync>,
}

/// Builds and starts a runtime.
pub struct RuntimeBuilder {
    config: RuntimeConfig,
    kinds: HashMap<String, Kind>,
    policies: Policies,
    observers: Vec<Arc<dyn TaskObserver>>,
    control: Option<tokio::runtime::Handle>,
    bridge: Option<Arc<dyn crate::bridge::BusBridge>>,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("config", &self.config)
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .field("observers", &self.observers.len())
            .finish()
    }
}

impl RuntimeBuilder {
    /// A builder for `config`.
    pub fn new(config: RuntimeConfig) -> Self {
        RuntimeBuilder {
            config,
            kinds: HashMap::new(),
            policies: Policies::new(),
            observers: Vec::new(),
            control: None,
            bridge: None,
        }
    }

    /// Connects the bus to other nodes through `bridge` (a cluster layer): publications here
    /// reach subscribers there, and [`Bus::remote`](crate::Bus::remote) reaches their agents.
    pub fn bus_bridge(mut self, bridge: impl crate::bridge::BusBridge) -> Self {
        self.bridge = Some(Arc::new(bridge));
        self
    }

    /// Runs the runtime's own watchdog on `control`, a Tokio runtime apart from the one the
    /// agents run on, so a stuck agent is still found and answered when every agent worker
    /// thread is blocked (a handler that never yields). The agents, their supervisors and the
    /// sandbox's unifiers still run on the runtime `start` is called from. The `troupe` node
    /// uses it with its control-plane runtime (HTTP, signals, shutdown).
    pub fn control_runtime(mut self, control: tokio::runtime::Handle) -> Self {
        self.control = Some(control);
        self
    }

    /// Registers how to build agents of kind `kind`: any `Fn(&AgentSpec) -> A`, closures
    /// included (`.register("echo", |_spec| Echo)` needs no annotation). Registering a kind
    /// twice replaces it. For a factory whose build can fail, see
    /// [`register_factory`](Self::register_factory).
    pub fn register<A, F>(self, kind: impl Into<String>, build: F) -> Self
    where
        A: Agent,
        F: Fn(&AgentSpec) -> A + Send + Sync + 'static,
    {
        self.register_factory(kind, build)
    }

    /// Registers an [`AgentFactory`] for kind `kind`: a factory whose build may fail with an
    /// [`AgentError`](crate::AgentError) (the start, or the restart, then fails with it).
    pub fn register_factory<F: AgentFactory>(
        mut self,
        kind: impl Into<String>,
        factory: F,
    ) -> Self {
        let factory = Arc::new(factory);
        let f = factory.clone();
        let pool = Arc::new(move |core: Arc<Core>| -> SpawnFn {
            let f = f.clone();
            Arc::new(move |start: Start, exit: ExitTo| {
                tokio::spawn(exit.report(worker::run(f.clone(), core.clone(), start)));
            })
        });
        let lane = Arc::new(move |core: std::sync::Weak<Core>| -> LaneSpawnFn {
            let f = factory.clone();
            Arc::new(move |jobs| worker::run_lane_instance(f.clone(), core.clone(), jobs).boxed())
        });
        self.kinds.insert(kind.into(), Kind { pool, lane });
        self
    }

    /// Sets how sandboxed results of `kind` are compared, and what to answer without a quorum.
    pub fn sandbox_policy(mut self, kind: impl Into<String>, policy: SandboxPolicy) -> Self {
        self.policies.insert(kind.into(), policy);
        self
    }

    /// Adds an observer that hears every task event of the runtime (see
    /// [`TaskObserver`]). Observers are fixed once the runtime starts.
    pub fn observe(mut self, observer: impl TaskObserver) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// The config this builder will start.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Validates the config, builds the pool and starts every agent. Returns once every agent
    /// has run its `on_start`, or with the first start failure (the pool is stopped again).
    pub async fn start(self) -> Result<Runtime, StartError> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(StartError::NoTokioRuntime);
        };
        let RuntimeBuilder {
            config,
            kinds,
            policies,
            observers,
            control,
            bridge,
        } = self;
        config.validate()?;
        if config.telemetry.panic_hook {
            crate::panics::install(config.telemetry.panic_backtraces);
        }
        for (i, k) in config.sandbox.kinds.iter().enumerate() {
            if !kinds.contains_key(&k.kind) {
                return Err(ConfigError::UnknownKind {
                    field: format!("sandbox.kinds[{i}].kind"),
                    kind: k.kind.clone(),
                }
                .into());
            }
        }
        for (i, l) in config.limits.iter().enumerate() {
            if !kinds.contains_key(&l.kind) {
                return Err(ConfigError::UnknownKind {
                    field: format!("limits[{i}].kind"),
                    kind: l.kind.clone(),
                }
                .into());
            }
        }
        for (i, tier) in config.tiers.iter().enumerate() {
            for (j, group) in tier.agents.iter().enumerate() {
                if !kinds.contains_key(&group.kind) {
                    return Err(ConfigError::UnknownKind {
                        field: format!("tiers[{i}].agents[{j}].kind"),
                        kind: group.kind.clone(),
                    }
                    .into());
                }
            }
        }

        // Each part, built from its own section of the config and the parts below it.
        let phase = Arc::new(Phase::default());
        let (pool, children) = Pool::new(&config);
        let pool = Arc::new(pool);
        let latency = config.telemetry.latency_histograms;
        let ledger = Arc::new(Ledger::new(latency, observers));
        let admission = Arc::new(Admission::new(&config.queues.capacity, phase.clone()));
        let bus = Arc::new(BusCore::new(
            pool.clone(),
            config.mailbox.capacity,
            config.mailbox.max_topics,
            config.mailbox.overflow,
            phase.clone(),
            latency,
            bridge,
        ));
        let supervision = Arc::new(Supervision::new(
            pool.clone(),
            ledger.clone(),
            admission.clone(),
            phase.clone(),
            config.tiers.iter().cloned().zip(children).collect(),
            config.root,
            config.shutdown.stop_timeout,
            config.liveness.heartbeat,
        ));
        let params = kinds
            .keys()
            .map(|k| (k.clone(), pool.params_of(k)))
            .collect();
        // One limiter per registered kind: configured ones limit, every one can be paused.
        let limits = kinds
            .keys()
            .map(|k| {
                let l = config.limits.iter().find(|l| &l.kind == k);
                let limiter = crate::limit::KindLimiter::new(
                    l.and_then(|l| l.rate),
                    l.map_or(1, |l| l.burst),
                    l.and_then(|l| l.concurrency),
                );
                (k.clone(), Arc::new(limiter))
            })
            .collect();
        let core = Arc::new_cyclic(|weak| {
            let lane_spawners = kinds
                .iter()
                .map(|(k, kind)| (k.clone(), (kind.lane)(weak.clone())))
                .collect();
            let sandbox = Arc::new(Sandbox::new(
                config.sandbox.clone(),
                &policies,
                admission.clone(),
                ledger.clone(),
                lane_spawners,
                params,
                rt,
            ));
            Core::new(
                weak.clone(),
                Parts {
                    config,
                    phase,
                    pool,
                    admission,
                    bus,
                    ledger,
                    supervision,
                    sandbox,
                    limits,
                },
            )
        });

        core.sandbox()
            .start()
            .map_err(|e| StartError::Sandbox(e.to_string()))?;
        let spawners: HashMap<&str, SpawnFn> = kinds
            .iter()
            .map(|(k, kind)| (k.as_str(), (kind.pool)(core.clone())))
            .collect();
        let pool = core.pool();
        let spawn_of = |index: u32| -> SpawnFn {
            // Every slot's kind was checked against the registered kinds above.
            spawners[&*pool.slot(index).spec().kind].clone()
        };
        core.supervision().start(spawn_of, control.as_ref());
        let runtime = Runtime {
            handle: RuntimeHandle::new(core.clone()),
        };
        // Wait for every agent's first start to finish, successfully or not.
        if let Some((index, reason)) = core.supervision().first_starts().await {
            let kind = core.pool().slot(index).spec().kind.to_string();
            runtime.shutdown_with(Duration::ZERO).await;
            return Err(StartError::AgentStart {
                agent: AgentId(index),
                kind,
                reason,
            });
        }
        Ok(runtime)
    }
}

/// A running runtime. Dereferences to [`RuntimeHandle`]; call [`Runtime::shutdown`] to stop it.
///
/// Dropping a `Runtime` without shutting it down leaves its agents running until the Tokio
/// runtime ends; tasks still queued then answer `cancelled`.
#[derive(Debug)]
pub struct Runtime {
    handle: RuntimeHandle,
}

impl Deref for Runtime {
    type Target = RuntimeHandle;
    fn deref(&self) -> &RuntimeHandle {
        &self.handle
    }
}

/// What a shutdown did. The buckets add up, always:
/// `drained + cancelled + abandoned == outstanding + admitted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShutdownReport {
    /// Tasks without an outcome when shutdown began (queued, running or waiting to retry).
    pub outstanding: u64,
    /// Sub-tasks agents submitted during the drain (drained and counted like the rest).
    pub admitted: u64,
    /// Tasks that ended on their own during shutdown, with whatever outcome their handler
    /// gave (ok, error, timeout, panic).
    pub drained: u64,
    /// Tasks answered `cancelled` after the drain deadline: still queued, or running in a
    /// handler that yielded to the cancellation.
    pub cancelled: u64,
    /// Tasks whose handler still held its thread when shutdown gave up on it
    /// (`shutdown.stop_timeout` after the drain deadline): each was answered `cancelled` then,
    /// its thread was left behind, and its late result is discarded. (A sandboxed task whose
    /// unifier cannot run at all is counted here too, without an outcome yet.)
    pub abandoned: u64,
    /// Agents that had not stopped when shutdown returned: their handlers never gave their
    /// threads back. Zero for cooperative handlers.
    pub agents_left_running: u64,
    /// Time the whole shutdown took.
    #[serde(with = "humantime_serde")]
    pub took: Duration,
}

impl Runtime {
    /// A builder for `config`.
    pub fn builder(config: RuntimeConfig) -> RuntimeBuilder {
        RuntimeBuilder::new(config)
    }

    /// A handle that outlives borrows of the runtime.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Graceful shutdown with the configured drain timeout. See [`Runtime::shutdown_with`].
    pub async fn shutdown(self) -> ShutdownReport {
        let drain = self.handle.core().config().shutdown.drain_timeout;
        self.shutdown_with(drain).await
    }

    /// Graceful shutdown, in three steps, each with a deadline:
    ///
    /// 1. **Drain**, up to `drain`: callers outside the pool are refused (`ShuttingDown`);
    ///    agents keep working, and may still talk over the bus and submit sub-tasks of the
    ///    work they hold (those count in [`ShutdownReport::admitted`]). It ends early once no
    ///    task is outstanding.
    /// 2. **Cancel**, up to `shutdown.stop_timeout`: everyone is refused; queued tasks are
    ///    answered `cancelled`, running handlers are dropped at their next `.await` and their
    ///    tasks answered `cancelled`. A handler that still holds its thread when this step ends
    ///    is abandoned: its task is answered `cancelled` anyway and its thread left behind.
    /// 3. **Stop**, up to `shutdown.stop_timeout`: agents stop in reverse start order (tiers in
    ///    reverse, agents in reverse within each) and run `on_stop`.
    ///
    /// So it returns within `drain + 2 × stop_timeout` (plus scheduling), whatever handlers do,
    /// as long as the Tokio runtime it runs on has a free thread to run it; afterwards every
    /// accepted task has exactly one outcome, except sandboxed tasks whose unifier could not
    /// run (counted as abandoned).
    pub async fn shutdown_with(self, drain: Duration) -> ShutdownReport {
        let c = self.handle.core();
        let ledger = c.ledger();
        let stop_timeout = c.config().shutdown.stop_timeout;
        let began = Instant::now();

        // Each snapshot reads finished counts before accepted ones (and cancelled before
        // finished at the end), so every difference below is non-negative and the buckets add
        // up exactly; see the report's doc.
        c.phase().enter(Stage::Draining);
        // Wait until no outside submission is between its phase check and its push.
        c.admission().quiesce_outside().await;
        let finished0 = ledger.finished_total();
        let accepted0 = ledger.accepted_total();
        let drain_end = began + drain;
        while ledger.outstanding() > 0 && Instant::now() < drain_end {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        c.phase().enter(Stage::Cancelling);
        c.admission().quiesce_inside().await;
        let finished1 = ledger.finished_total();
        let cancelled1 = ledger.completed_total(OutcomeKind::Cancelled);
        c.sandbox().cancel_pending();
        c.pool().wake_all();
        // Agents cancel what they hold and pick; sweep the queues too, for groups whose agents
        // are down (a failed tier) and for retries that land late.
        let cancel_end = Instant::now() + stop_timeout;
        loop {
            c.pool().sweep(|task| {
                c.admission().release(task.priority);
                ledger.finish(task, Outcome::Cancelled);
            });
            if ledger.outstanding() == 0 || Instant::now() >= cancel_end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let seized = c.pool().seize_running(|task| {
            tracing::error!(
                task = task.id.0,
                "shutdown: a handler still holds its thread past the cancel deadline; \
                 answering its task `cancelled` and leaving the thread behind"
            );
            ledger.finish(task, Outcome::Cancelled);
        });
        let cancelled2 = ledger.completed_total(OutcomeKind::Cancelled);
        let finished2 = ledger.finished_total();
        let accepted2 = ledger.accepted_total();

        let stop_end = Instant::now() + stop_timeout;
        c.supervision().stop_all(stop_end).await;
        let _ = tokio::time::timeout_at(stop_end.into(), c.sandbox().shutdown()).await;
        c.phase().enter(Stage::Stopped);

        // Saturating only as a guard: the read order makes every difference non-negative.
        let cancelled_in_cancel = cancelled2.saturating_sub(cancelled1);
        ShutdownReport {
            outstanding: accepted0.saturating_sub(finished0),
            admitted: accepted2.saturating_sub(accepted0),
            drained: finished1.saturating_sub(finished0)
                + finished2
                    .saturating_sub(finished1)
                    .saturating_sub(cancelled_in_cancel),
            cancelled: cancelled_in_cancel.saturating_sub(seized),
            abandoned: seized + accepted2.saturating_sub(finished2),
            agents_left_running: c.pool().not_stopped(),
            took: began.elapsed(),
        }
    }
}
