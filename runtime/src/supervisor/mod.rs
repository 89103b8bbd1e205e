//! Supervision: the root, one supervisor per tier, and the agents under them.
//!
//! A tier supervisor watches its children (agent incarnations). When one exits it applies the
//! child [`RestartPolicy`] (restart always, only after a crash, or never) and the tier's
//! [`Strategy`] (restart just that child, all children, or that child and those started after
//! it). Restarts wait an exponential backoff. More than `max_restarts` restarts within `period`
//! is a restart storm: the supervisor stops its children and escalates to the root. The root
//! restarts the tier while within its own intensity; past it, the tier stays down and the
//! runtime reports not-ready, with the reason.
//!
//! [`Supervision`] owns that state (tiers, root, start-up bookkeeping) and offers the runtime a
//! narrow API: start the tiers, wait for the first starts, stop everything, replace a stuck
//! agent, report. It does not know how an agent is run: each child is started through a
//! [`SpawnFn`] the runtime hands it, so supervision never imports the agent loop.
//!
//! Supervision is control-plane work: it uses an ordinary channel and a mutex for the root's
//! bookkeeping, never anything on the task or message path.

pub(crate) mod policy;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::admission::Admission;
use crate::config::{IntensityConfig, TierConfig};
use crate::ledger::Ledger;
use crate::phase::Phase;
use crate::pool::{AgentState, Liveness, Pool};
use crate::task::Outcome;
use crate::telemetry::{LatencyHistogram, LatencySummary};
pub(crate) use policy::{ExitReason, Strategy};

/// How an incarnation begins.
pub(crate) struct Start {
    pub(crate) index: u32,
    /// The previous incarnation's exit, for a restart.
    pub(crate) cause: Option<ExitReason>,
    /// Backoff before building.
    pub(crate) delay: Duration,
    /// Fired once the agent has started (dropped unfired if it fails to).
    pub(crate) started: Option<oneshot::Sender<()>>,
}

/// Spawns one incarnation of an agent as a Tokio task that reports its end to [`ExitTo`].
/// The task is spawned by the kind's own (generic) code, so the incarnation's future lives
/// in the task itself, with no box of its own.
pub(crate) type SpawnFn = Arc<dyn Fn(Start, ExitTo) + Send + Sync>;

/// Where an incarnation reports why it ended: its tier supervisor.
pub(crate) struct ExitTo {
    tx: mpsc::UnboundedSender<Exit>,
    index: u32,
    generation: u64,
}

impl ExitTo {
    /// Runs an incarnation to its end and reports it, a panic outside a handler (a hook, or
    /// the runtime itself) included. A combinator rather than an `async fn`, which would hold
    /// the incarnation's future twice (as its argument and as the future it awaits).
    pub(crate) fn report(
        self,
        incarnation: impl Future<Output = ExitReason>,
    ) -> impl Future<Output = ()> {
        std::panic::AssertUnwindSafe(incarnation)
            .catch_unwind()
            .map(move |ended| {
                let reason = match ended {
                    Ok(r) => r,
                    Err(p) => ExitReason::Panicked(policy::panic_message(p.as_ref())),
                };
                let _ = self.tx.send(Exit {
                    index: self.index,
                    generation: self.generation,
                    reason,
                });
            })
    }
}

/// Agents in each lifecycle state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AgentCounts {
    /// Building or running `on_start`.
    pub starting: usize,
    /// Taking work.
    pub running: usize,
    /// Waiting to be rebuilt.
    pub restarting: usize,
    /// Down.
    pub stopped: usize,
}

impl AgentCounts {
    fn add(&mut self, s: AgentState) {
        match s {
            AgentState::Starting => self.starting += 1,
            AgentState::Running => self.running += 1,
            AgentState::Restarting => self.restarting += 1,
            AgentState::Stopped => self.stopped += 1,
        }
    }

    /// Sum over all states.
    pub fn total(&self) -> usize {
        self.starting + self.running + self.restarting + self.stopped
    }
}

/// One tier's supervision picture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierHealth {
    /// Tier name.
    pub name: String,
    /// Agents by state.
    pub agents: AgentCounts,
    /// Agents busy past their task's deadline (see `liveness.heartbeat`).
    pub unhealthy: usize,
    /// Restarts performed by the tier's supervisor (and by the root for this tier).
    pub restarts: u64,
    /// Times the tier exceeded its restart intensity.
    pub escalations: u64,
    /// True if the tier is down for good (the root gave up on it).
    pub failed: bool,
    /// Agent start-up time (build + hooks).
    pub startup: LatencySummary,
}

/// One tier's supervision counters, as [`Stats`](crate::Stats) reports them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierStats {
    /// Tier name.
    pub name: String,
    /// Agent starts in the tier (first starts and restarts).
    pub starts: u64,
    /// Restarts performed by the tier's supervisor (and by the root for this tier).
    pub restarts: u64,
    /// Times the tier exceeded its restart intensity and escalated to the root.
    pub escalations: u64,
    /// Agent start-up time (build + hooks).
    pub startup: LatencySummary,
}

/// The supervision tree's state, shared by the tier supervisors, the watchdog and the runtime.
pub(crate) struct Supervision {
    pool: Arc<Pool>,
    ledger: Arc<Ledger>,
    admission: Arc<Admission>,
    phase: Arc<Phase>,
    tiers: Box<[TierState]>,
    root: Mutex<RootState>,
    root_limits: IntensityConfig,
    stop_timeout: Duration,
    heartbeat: Duration,
    /// Agents whose first start has not finished yet; `starts_done` fires when it reaches 0.
    pending_starts: AtomicUsize,
    starts_done: Notify,
    /// The first agent (in start order) that failed its first start, and why.
    start_failure: Mutex<Option<(u32, String)>>,
}

impl Supervision {
    /// Supervision of `tiers` (with their children, agent indices in start order).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pool: Arc<Pool>,
        ledger: Arc<Ledger>,
        admission: Arc<Admission>,
        phase: Arc<Phase>,
        tiers: Vec<(TierConfig, Vec<u32>)>,
        root_limits: IntensityConfig,
        stop_timeout: Duration,
        heartbeat: Duration,
    ) -> Self {
        let pending = pool.len();
        Supervision {
            pool,
            ledger,
            admission,
            phase,
            tiers: tiers
                .into_iter()
                .map(|(config, children)| TierState {
                    config,
                    children,
                    restarts: AtomicU64::new(0),
                    escalations: AtomicU64::new(0),
                    failed: AtomicBool::new(false),
                    startup: LatencyHistogram::default(),
                    control: Mutex::new(None),
                })
                .collect(),
            root: Mutex::new(RootState::default()),
            root_limits,
            stop_timeout,
            heartbeat,
            pending_starts: AtomicUsize::new(pending),
            starts_done: Notify::new(),
            start_failure: Mutex::new(None),
        }
    }

    /// Starts the watchdog (on `control` if given, else here) and every tier's supervisor,
    /// which start their children. `spawn` gives the function that runs an incarnation of the
    /// agent at an index.
    pub(crate) fn start(
        self: &Arc<Self>,
        spawn: impl Fn(u32) -> SpawnFn,
        control: Option<&tokio::runtime::Handle>,
    ) {
        let dog = watchdog(Arc::downgrade(self));
        match control {
            Some(rt) => {
                rt.spawn(dog);
            }
            None => {
                tokio::spawn(dog);
            }
        }
        for tier in 0..self.tiers.len() {
            let spawners = self.tiers[tier]
                .children
                .iter()
                .map(|&i| spawn(i))
                .collect();
            TierSupervisor::spawn(self.clone(), tier, spawners);
        }
    }

    /// Waits until every agent's first start has finished; the first failure, if any.
    pub(crate) async fn first_starts(&self) -> Option<(u32, String)> {
        loop {
            let notified = self.starts_done.notified();
            if self.pending_starts.load(Ordering::Acquire) == 0 {
                break;
            }
            notified.await;
        }
        lock(&self.start_failure).take()
    }

    /// Counts one agent's first start as finished (`failure` says why it did not succeed).
    pub(crate) fn first_start_finished(&self, index: u32, failure: Option<String>) {
        if let Some(reason) = failure {
            // Report the first agent in start order that failed, whichever exited first.
            let mut first = lock(&self.start_failure);
            if first.as_ref().is_none_or(|(i, _)| index < *i) {
                *first = Some((index, reason));
            }
        }
        if self.pending_starts.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.starts_done.notify_one();
        }
    }

    /// Records how long an agent of `tier` took to start.
    pub(crate) fn record_startup(&self, tier: usize, nanos: u64) {
        self.tiers[tier].startup.record(nanos);
    }

    /// Stops every tier, in reverse start order, each stopping its agents in reverse; waits for
    /// each tier until `deadline`, after which the remaining tiers are told to stop without
    /// waiting (an agent whose handler never gives its thread back holds its tier up).
    pub(crate) async fn stop_all(&self, deadline: Instant) {
        for tier in self.tiers.iter().rev() {
            let control = tier.control.lock().ok().and_then(|mut c| c.take());
            if let Some(control) = control {
                let (ack, done) = oneshot::channel();
                if control.send(Control::Stop(ack)).is_ok()
                    && tokio::time::timeout_at(deadline.into(), done)
                        .await
                        .is_err()
                {
                    tracing::error!(
                        tier = %tier.config.name,
                        "tier did not stop by the shutdown deadline; leaving it behind"
                    );
                }
            }
        }
    }

    /// Asks the supervisor of agent `index` to treat it as crashed (it is stuck).
    fn replace(&self, index: u32, reason: ExitReason) {
        let tier = self.pool.slot(index).tier();
        let control = self.tiers[tier].control.lock().ok().and_then(|c| c.clone());
        if let Some(c) = control {
            let _ = c.send(Control::Replace(index, reason));
        }
    }

    fn root_allows_restart(&self, tier: usize, reason: &ExitReason) -> bool {
        let name = &self.tiers[tier].config.name;
        lock(&self.root).on_escalation(
            name,
            reason,
            self.root_limits.max_restarts,
            self.root_limits.period,
        )
    }

    /// Why the root gave up on tiers, if it did.
    pub(crate) fn failures(&self) -> Vec<String> {
        lock(&self.root).failures.clone()
    }

    /// Number of tiers.
    pub(crate) fn tier_count(&self) -> usize {
        self.tiers.len()
    }

    /// Tier names, in start order.
    pub(crate) fn tier_names(&self) -> Vec<String> {
        self.tiers.iter().map(|t| t.config.name.clone()).collect()
    }

    /// Restarts of tier `i`.
    pub(crate) fn restarts(&self, i: usize) -> u64 {
        self.tiers[i].restarts.load(Ordering::Relaxed)
    }

    /// Escalations of tier `i`.
    pub(crate) fn escalations(&self, i: usize) -> u64 {
        self.tiers[i].escalations.load(Ordering::Relaxed)
    }

    /// Start-up times of tier `i`'s agents.
    pub(crate) fn startup(&self, i: usize) -> &LatencyHistogram {
        &self.tiers[i].startup
    }

    /// Every tier's counters, in start order.
    pub(crate) fn tiers_stats(&self) -> Vec<TierStats> {
        let mut starts = vec![0u64; self.tiers.len()];
        for slot in self.pool.slots() {
            starts[slot.tier()] += slot.starts();
        }
        self.tiers
            .iter()
            .zip(starts)
            .map(|(t, starts)| TierStats {
                name: t.config.name.clone(),
                starts,
                restarts: t.restarts.load(Ordering::Relaxed),
                escalations: t.escalations.load(Ordering::Relaxed),
                startup: t.startup.summary(),
            })
            .collect()
    }

    /// Every tier's picture, in start order.
    pub(crate) fn tiers_health(&self) -> Vec<TierHealth> {
        let mut tiers: Vec<TierHealth> = self
            .tiers
            .iter()
            .map(|t| TierHealth {
                name: t.config.name.clone(),
                agents: AgentCounts::default(),
                unhealthy: 0,
                restarts: t.restarts.load(Ordering::Relaxed),
                escalations: t.escalations.load(Ordering::Relaxed),
                failed: t.failed.load(Ordering::Acquire),
                startup: t.startup.summary(),
            })
            .collect();
        for slot in self.pool.slots() {
            let t = &mut tiers[slot.tier()];
            t.agents.add(slot.state());
            if slot.is_unhealthy() {
                t.unhealthy += 1;
            }
        }
        tiers
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One tier, read by health and written by its supervisor.
struct TierState {
    config: TierConfig,
    /// Agent indices in start order.
    children: Vec<u32>,
    restarts: AtomicU64,
    escalations: AtomicU64,
    /// Set while the tier is down after an escalation the root did not absorb.
    failed: AtomicBool,
    startup: LatencyHistogram,
    control: Mutex<Option<mpsc::UnboundedSender<Control>>>,
}

/// Root bookkeeping: tier restarts within the root's intensity window, and why it gave up.
#[derive(Default)]
struct RootState {
    restarts: VecDeque<Instant>,
    failures: Vec<String>,
}

enum Control {
    /// Stop every child in reverse start order, then acknowledge.
    Stop(oneshot::Sender<()>),
    /// The child at this agent index is stuck: treat it as crashed (its incarnation is
    /// abandoned; its late exit will be ignored as stale).
    Replace(u32, ExitReason),
}

struct Exit {
    index: u32,
    /// Which incarnation of the child exited; exits of replaced incarnations are ignored.
    generation: u64,
    reason: ExitReason,
}

struct TierSupervisor {
    sup: Arc<Supervision>,
    /// How to run each child, by position.
    spawners: Vec<SpawnFn>,
    tier: usize,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Restarts of this tier's children within the intensity period.
    window: VecDeque<Instant>,
    /// Per-child recent restart times, for backoff.
    child_window: Vec<VecDeque<Instant>>,
    alive: Vec<bool>,
    /// Current incarnation number per child.
    generation: Vec<u64>,
    /// Exits that arrived while waiting for other children to stop.
    pending: VecDeque<Exit>,
}

impl TierSupervisor {
    /// Spawns the supervisor for `tier` and starts its children (without waiting for them).
    fn spawn(sup: Arc<Supervision>, tier: usize, spawners: Vec<SpawnFn>) {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let (control_tx, control) = mpsc::unbounded_channel();
        let children = sup.tiers[tier].children.len();
        *lock(&sup.tiers[tier].control) = Some(control_tx);
        let mut sup = TierSupervisor {
            sup,
            spawners,
            tier,
            exits_tx,
            exits,
            control,
            window: VecDeque::new(),
            child_window: vec![VecDeque::new(); children],
            alive: vec![false; children],
            generation: vec![0; children],
            pending: VecDeque::new(),
        };
        // The children are spawned from the supervisor's own task, on a Tokio worker: a spawn
        // from there goes to that worker's local queue, where one from the caller's thread
        // would go through the shared inject queue and wake a worker for each child.
        tokio::spawn(async move {
            for pos in 0..children {
                sup.start_child(pos, None, Duration::ZERO, None);
            }
            sup.run().await;
        });
    }

    fn child_index(&self, pos: usize) -> u32 {
        self.sup.tiers[self.tier].children[pos]
    }

    fn position_of(&self, index: u32) -> Option<usize> {
        self.sup.tiers[self.tier]
            .children
            .iter()
            .position(|&c| c == index)
    }

    fn start_child(
        &mut self,
        pos: usize,
        cause: Option<ExitReason>,
        delay: Duration,
        started: Option<oneshot::Sender<()>>,
    ) {
        let index = self.child_index(pos);
        self.sup.pool.slot(index).clear_requests();
        self.alive[pos] = true;
        self.generation[pos] += 1;
        let exit = ExitTo {
            tx: self.exits_tx.clone(),
            index,
            generation: self.generation[pos],
        };
        (self.spawners[pos])(
            Start {
                index,
                cause,
                delay,
                started,
            },
            exit,
        );
    }

    async fn run(mut self) {
        loop {
            let exit = if let Some(e) = self.pending.pop_front() {
                e
            } else {
                tokio::select! {
                    Some(e) = self.exits.recv() => e,
                    cmd = self.control.recv() => {
                        match cmd {
                            Some(Control::Replace(index, reason)) => {
                                match self.position_of(index) {
                                    Some(pos) if self.alive[pos] => Exit {
                                        index,
                                        generation: self.generation[pos],
                                        reason,
                                    },
                                    _ => continue,
                                }
                            }
                            Some(Control::Stop(ack)) => {
                                self.stop_range(0).await;
                                let _ = ack.send(());
                                return;
                            }
                            None => {
                                self.stop_range(0).await;
                                return;
                            }
                        }
                    }
                }
            };
            self.on_exit(exit).await;
        }
    }

    async fn on_exit(&mut self, exit: Exit) {
        let Some(pos) = self.position_of(exit.index) else {
            return;
        };
        if exit.generation != self.generation[pos] || !self.alive[pos] {
            return;
        }
        self.alive[pos] = false;
        let sup = self.sup.clone();
        let slot = sup.pool.slot(exit.index);
        let tier = &sup.tiers[self.tier];
        if slot.starts() == 0 {
            // It never started: the pool cannot come up as configured. The builder reports it;
            // retrying would only hide the error behind restarts.
            slot.set_state(AgentState::Stopped);
            slot.set_down(true);
            sup.first_start_finished(exit.index, Some(exit.reason.to_string()));
            return;
        }
        // Restarts continue while shutdown drains: queued work still needs agents.
        let restart = tier.config.restart.restarts_after(&exit.reason);
        if !restart {
            slot.set_state(AgentState::Stopped);
            slot.set_down(true);
            return;
        }
        slot.set_state(AgentState::Restarting);
        if matches!(exit.reason, ExitReason::Panicked(_)) {
            // The panic itself was reported where it happened (see `panics`).
            tracing::debug!(agent = exit.index, tier = %tier.config.name, "agent panicked; restarting");
        } else {
            tracing::warn!(
                agent = exit.index,
                tier = %tier.config.name,
                reason = %exit.reason,
                "agent exited; restarting"
            );
        }

        let now = Instant::now();
        let period = tier.config.intensity.period;
        self.window.push_back(now);
        while self
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) > period)
        {
            self.window.pop_front();
        }
        if self.window.len() > tier.config.intensity.max_restarts as usize {
            self.escalate(&exit.reason).await;
            return;
        }

        let first = match tier.config.strategy {
            Strategy::OneForOne => pos,
            Strategy::OneForAll => 0,
            Strategy::RestForOne => pos,
        };
        let last = match tier.config.strategy {
            Strategy::OneForOne => pos,
            Strategy::OneForAll | Strategy::RestForOne => self.alive.len() - 1,
        };
        if last > pos || first < pos {
            self.stop_range_except(first, pos).await;
        }
        if first == last {
            let delay = self.backoff(pos, now);
            self.count_restart(pos);
            self.start_child(pos, Some(exit.reason), delay, None);
            return;
        }
        // Several children: one backoff for the group, then start them one by one in order,
        // each after the previous has started, as they were started the first time.
        let delay = self.backoff(pos, now);
        for p in first..=last {
            sup.pool
                .slot(self.child_index(p))
                .set_state(AgentState::Restarting);
        }
        tokio::time::sleep(delay).await;
        for p in first..=last {
            let cause = if p == pos {
                exit.reason.clone()
            } else {
                ExitReason::Stopped
            };
            self.count_restart(p);
            let (tx, rx) = oneshot::channel();
            self.start_child(p, Some(cause), Duration::ZERO, Some(tx));
            let _ = rx.await;
        }
    }

    fn count_restart(&self, pos: usize) {
        self.sup.tiers[self.tier]
            .restarts
            .fetch_add(1, Ordering::Relaxed);
        self.sup.pool.slot(self.child_index(pos)).record_restart();
    }

    fn backoff(&mut self, pos: usize, now: Instant) -> Duration {
        let tier = &self.sup.tiers[self.tier].config;
        let recent = &mut self.child_window[pos];
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > tier.intensity.period)
        {
            recent.pop_front();
        }
        let doublings = (recent.len().saturating_sub(1)).min(20) as u32;
        tier.backoff
            .initial
            .saturating_mul(1 << doublings)
            .min(tier.backoff.max)
    }

    /// Stops children `from..` in reverse start order, except `skip` (already down).
    async fn stop_range_except(&mut self, from: usize, skip: usize) {
        for pos in (from..self.alive.len()).rev() {
            if pos != skip {
                self.stop_child(pos).await;
            }
        }
    }

    async fn stop_range(&mut self, from: usize) {
        for pos in (from..self.alive.len()).rev() {
            self.stop_child(pos).await;
        }
    }

    /// Asks one child to stop after the work in hand and waits for it to exit.
    async fn stop_child(&mut self, pos: usize) {
        if !self.alive[pos] {
            return;
        }
        let index = self.child_index(pos);
        let sup = self.sup.clone();
        let slot = sup.pool.slot(index);
        slot.request_stop();
        let generation = self.generation[pos];
        let already = self
            .pending
            .iter()
            .position(|e| e.index == index && e.generation == generation);
        if let Some(i) = already {
            // It exited on its own while we were stopping a sibling.
            self.pending.remove(i);
            self.alive[pos] = false;
            slot.set_state(AgentState::Stopped);
            return;
        }
        let mut deadline = Instant::now() + sup.stop_timeout;
        let mut killed = false;
        loop {
            let exit = match tokio::time::timeout_at(deadline.into(), self.exits.recv()).await {
                Ok(exit) => exit,
                Err(_) if !killed => {
                    // It is still busy with a task: cancel that task and wait once more.
                    tracing::warn!(agent = index, "stop timeout passed; cancelling its work");
                    slot.kill();
                    killed = true;
                    deadline = Instant::now() + sup.stop_timeout;
                    continue;
                }
                Err(_) if !sup.phase.is_closed() => {
                    // A sibling restart: the slot must not get a second incarnation while this
                    // one still runs, so wait for it (the watchdog answers its task).
                    deadline = Instant::now() + Duration::from_secs(3600);
                    continue;
                }
                Err(_) => {
                    // Shutdown, and cancelling did not reach it: its handler holds its thread.
                    // Leave it (its late exit is ignored as stale) rather than hold up its
                    // siblings and the shutdown deadline.
                    tracing::error!(
                        agent = index,
                        "agent did not stop after its work was cancelled; leaving it behind"
                    );
                    self.alive[pos] = false;
                    return;
                }
            };
            let Some(exit) = exit else { break };
            if exit.index == index && exit.generation == generation {
                break;
            }
            // Another child exited meanwhile: handle it once this stop is done.
            self.pending.push_back(exit);
        }
        self.alive[pos] = false;
        slot.set_state(AgentState::Stopped);
    }

    async fn escalate(&mut self, reason: &ExitReason) {
        let sup = self.sup.clone();
        let tier = &sup.tiers[self.tier];
        tier.escalations.fetch_add(1, Ordering::Relaxed);
        tracing::error!(tier = %tier.config.name, %reason, "restart intensity exceeded; escalating to root");
        self.stop_range(0).await;
        for &child in &tier.children {
            sup.pool.slot(child).set_state(AgentState::Stopped);
        }
        // Exits gathered while stopping belong to children that are now down anyway.
        self.pending.clear();
        self.window.clear();
        let restart = sup.root_allows_restart(self.tier, reason);
        if restart {
            for pos in 0..self.alive.len() {
                self.count_restart(pos);
                let (tx, rx) = oneshot::channel();
                self.start_child(pos, Some(reason.clone()), Duration::ZERO, Some(tx));
                let _ = rx.await;
            }
        } else {
            tier.failed.store(true, Ordering::Release);
            for &child in &tier.children {
                sup.pool.slot(child).set_down(true);
            }
        }
    }
}

impl RootState {
    /// Records a tier escalation; true if the root restarts the tier, false if it gives up.
    fn on_escalation(
        &mut self,
        tier: &str,
        reason: &ExitReason,
        max_restarts: u32,
        period: Duration,
    ) -> bool {
        let now = Instant::now();
        self.restarts.push_back(now);
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > period)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() > max_restarts as usize {
            self.failures.push(format!(
                "tier `{tier}` exceeded its restart intensity and the root's limit of \
                 {max_restarts} tier restarts per {period:?} is spent (last exit: {reason})"
            ));
            false
        } else {
            true
        }
    }
}

/// The liveness watchdog: every heartbeat, checks each busy agent against its task's deadline.
///
/// Two heartbeats past it the agent is marked unhealthy; three past, its task is answered
/// `timeout` (through the ledger, so it still has exactly one outcome) and its supervisor
/// replaces it. This is how a handler that blocks its thread, and so never reaches an `.await`
/// where it could be cancelled, still ends its task.
///
/// Runs until the runtime stops. Holds only a weak reference, so it ends with the runtime.
async fn watchdog(sup: Weak<Supervision>) {
    let heartbeat = match sup.upgrade() {
        Some(s) => s.heartbeat,
        None => return,
    };
    let beat_ms = u64::try_from(heartbeat.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = sup.upgrade() else { return };
        if s.phase.is_stopped() {
            return;
        }
        // Work queued where every agent is down (a tier the root gave up on) would wait for
        // nobody: answer it now.
        s.pool.sweep_dead(|task| {
            s.admission.release(task.priority);
            s.ledger.finish(
                task,
                Outcome::Error(crate::task::TaskError::new(
                    "no live agent serves this task's target: every one of them is down",
                )),
            );
        });
        let now = s.pool.ms_at(Instant::now());
        for slot in s.pool.slots() {
            let deadline = slot.deadline_ms();
            if deadline == 0 || now <= deadline {
                if slot.is_unhealthy() && deadline == 0 {
                    slot.set_liveness(Liveness::Healthy);
                }
                continue;
            }
            let overdue = now - deadline;
            if overdue >= 3 * beat_ms {
                let Some(task) = slot.seize_task() else {
                    continue;
                };
                slot.set_liveness(Liveness::Dead);
                let index = slot.spec().id.0;
                tracing::error!(
                    agent = index,
                    overdue_ms = overdue,
                    "agent unresponsive: answering its task `timeout` and replacing it"
                );
                s.ledger.finish(task, Outcome::Timeout);
                let reason =
                    ExitReason::Unresponsive(format!("busy {overdue} ms past its task's deadline"));
                s.replace(index, reason);
            } else if overdue >= 2 * beat_ms {
                slot.set_liveness(Liveness::Warning);
            }
        }
    }
}
