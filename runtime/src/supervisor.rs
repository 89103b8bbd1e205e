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
//! Supervision is control-plane work: it uses an ordinary channel and a mutex for the root's
//! bookkeeping, never anything on the task or message path.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::agent::ExitReason;
use crate::config::TierConfig;
use crate::runtime::Shared;
use crate::slot::AgentState;
use crate::telemetry::LatencyHistogram;
use crate::worker::{Start, panic_message};

/// What a supervisor restarts when a child exits and is to be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the child that exited.
    #[default]
    OneForOne,
    /// Every child of the tier: the others are stopped, then all are started again in order.
    OneForAll,
    /// The child and every child started after it.
    RestForOne,
}

/// Which exits a child is restarted after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Always (the child should always run).
    #[default]
    Permanent,
    /// Only after an abnormal exit (panic, failed start).
    Transient,
    /// Never.
    Temporary,
}

impl Strategy {
    /// The config name (`one_for_one`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
        }
    }
}

impl RestartPolicy {
    /// The config name (`permanent`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Permanent => "permanent",
            RestartPolicy::Transient => "transient",
            RestartPolicy::Temporary => "temporary",
        }
    }

    fn restarts_after(self, reason: &ExitReason) -> bool {
        match self {
            RestartPolicy::Permanent => true,
            RestartPolicy::Transient => reason.is_abnormal(),
            RestartPolicy::Temporary => false,
        }
    }
}

pub(crate) type SpawnFn =
    Arc<dyn Fn(Arc<Shared>, Start) -> BoxFuture<'static, ExitReason> + Send + Sync>;

/// Shared view of one tier, read by health and written by its supervisor.
pub(crate) struct TierState {
    pub(crate) config: TierConfig,
    /// Agent indices in start order.
    pub(crate) children: Vec<u32>,
    pub(crate) restarts: AtomicU64,
    pub(crate) escalations: AtomicU64,
    /// Set while the tier is down after an escalation the root did not absorb.
    pub(crate) failed: AtomicBool,
    pub(crate) startup: LatencyHistogram,
    pub(crate) control: std::sync::Mutex<Option<mpsc::UnboundedSender<Control>>>,
}

/// Root bookkeeping: tier restarts within the root's intensity window, and why it gave up.
#[derive(Default)]
pub(crate) struct RootState {
    restarts: VecDeque<Instant>,
    pub(crate) failures: Vec<String>,
}

pub(crate) enum Control {
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

pub(crate) struct TierSupervisor {
    shared: Arc<Shared>,
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
    pub(crate) fn spawn(shared: Arc<Shared>, tier: usize) {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let (control_tx, control) = mpsc::unbounded_channel();
        let children = shared.tiers[tier].children.len();
        if let Ok(mut c) = shared.tiers[tier].control.lock() {
            *c = Some(control_tx);
        }
        let mut sup = TierSupervisor {
            shared,
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
        for pos in 0..children {
            sup.start_child(pos, None, Duration::ZERO, None);
        }
        tokio::spawn(sup.run());
    }

    fn child_index(&self, pos: usize) -> u32 {
        self.shared.tiers[self.tier].children[pos]
    }

    fn position_of(&self, index: u32) -> Option<usize> {
        self.shared.tiers[self.tier]
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
        let slot = &self.shared.agents[index as usize];
        slot.stop.store(false, Ordering::Release);
        slot.kill.store(false, Ordering::Release);
        let spawn = self.shared.spawner_for(index);
        let fut = spawn(
            self.shared.clone(),
            Start {
                index,
                cause,
                delay,
                started,
            },
        );
        let tx = self.exits_tx.clone();
        self.alive[pos] = true;
        self.generation[pos] += 1;
        let generation = self.generation[pos];
        tokio::spawn(async move {
            // A panic outside a handler (a hook, or the runtime itself) still reports an exit.
            let reason = match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
                Ok(r) => r,
                Err(p) => ExitReason::Panicked(panic_message(p.as_ref())),
            };
            let _ = tx.send(Exit {
                index,
                generation,
                reason,
            });
        });
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
        let slot = &self.shared.agents[exit.index as usize];
        let tier = &self.shared.tiers[self.tier];
        if slot.starts.load(Ordering::Acquire) == 0 {
            // It never started: the pool cannot come up as configured. The builder reports it;
            // retrying would only hide the error behind restarts.
            slot.set_state(AgentState::Stopped);
            self.shared
                .first_start_finished(exit.index, Some(exit.reason.to_string()));
            return;
        }
        // Restarts continue while shutdown drains: queued work still needs agents.
        let restart = tier.config.restart.restarts_after(&exit.reason);
        if !restart {
            slot.set_state(AgentState::Stopped);
            return;
        }
        slot.set_state(AgentState::Restarting);
        tracing::warn!(
            agent = exit.index,
            tier = %tier.config.name,
            reason = %exit.reason,
            "agent exited; restarting"
        );

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
            self.shared.agents[self.child_index(p) as usize].set_state(AgentState::Restarting);
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
        self.shared.tiers[self.tier]
            .restarts
            .fetch_add(1, Ordering::Relaxed);
        self.shared.agents[self.child_index(pos) as usize]
            .restarts
            .fetch_add(1, Ordering::Relaxed);
    }

    fn backoff(&mut self, pos: usize, now: Instant) -> Duration {
        let tier = &self.shared.tiers[self.tier].config;
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
        let slot = &self.shared.agents[index as usize];
        slot.stop.store(true, Ordering::Release);
        slot.signal.force_wake();
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
        let mut deadline = Some(Instant::now() + self.shared.config.shutdown.stop_timeout);
        loop {
            let exit = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), self.exits.recv()).await {
                    Ok(exit) => exit,
                    Err(_) => {
                        // It is still busy with a task: cancel that task and keep waiting.
                        tracing::warn!(agent = index, "stop timeout passed; cancelling its work");
                        slot.kill.store(true, Ordering::Release);
                        slot.signal.force_wake();
                        deadline = None;
                        continue;
                    }
                },
                None => self.exits.recv().await,
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
        let shared = self.shared.clone();
        let tier = &shared.tiers[self.tier];
        tier.escalations.fetch_add(1, Ordering::Relaxed);
        tracing::error!(tier = %tier.config.name, %reason, "restart intensity exceeded; escalating to root");
        self.stop_range(0).await;
        for &child in &tier.children {
            shared.agents[child as usize].set_state(AgentState::Stopped);
        }
        // Exits gathered while stopping belong to children that are now down anyway.
        self.pending.clear();
        self.window.clear();
        let restart = shared.root_allows_restart(self.tier, reason);
        if restart {
            for pos in 0..self.alive.len() {
                self.count_restart(pos);
                let (tx, rx) = oneshot::channel();
                self.start_child(pos, Some(reason.clone()), Duration::ZERO, Some(tx));
                let _ = rx.await;
            }
        } else {
            tier.failed.store(true, Ordering::Release);
        }
    }
}

impl RootState {
    /// Records a tier escalation; true if the root restarts the tier, false if it gives up.
    pub(crate) fn on_escalation(
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
/// Two heartbeats past it the agent is marked unhealthy; three past, its task is answered
/// `timeout` and its supervisor replaces it. Holds only a weak reference, so it ends with the
/// runtime.
pub(crate) async fn watchdog(shared: std::sync::Weak<Shared>) {
    use crate::slot::Liveness;
    let heartbeat = match shared.upgrade() {
        Some(s) => s.config.liveness.heartbeat,
        None => return,
    };
    let beat_ms = u64::try_from(heartbeat.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        if s.is_stopped() {
            return;
        }
        let now = s.ms_at(Instant::now());
        for (index, slot) in s.agents.iter().enumerate() {
            let deadline = slot.deadline_ms.load(Ordering::Acquire);
            if deadline == 0 || now <= deadline {
                if slot.is_unhealthy() && deadline == 0 {
                    slot.set_liveness(Liveness::Healthy);
                }
                continue;
            }
            let overdue = now - deadline;
            if overdue >= 3 * beat_ms {
                let Some(task) = slot.in_flight.take() else {
                    continue;
                };
                slot.deadline_ms.store(0, Ordering::Release);
                slot.set_liveness(Liveness::Dead);
                tracing::error!(
                    agent = index,
                    overdue_ms = overdue,
                    "agent unresponsive: answering its task `timeout` and replacing it"
                );
                s.finish(task, crate::task::Outcome::Timeout);
                let reason =
                    ExitReason::Unresponsive(format!("busy {overdue} ms past its task's deadline"));
                let control = s.tiers[slot.tier]
                    .control
                    .lock()
                    .ok()
                    .and_then(|c| c.clone());
                if let Some(c) = control {
                    let _ = c.send(Control::Replace(index as u32, reason));
                }
            } else if overdue >= 2 * beat_ms {
                slot.set_liveness(Liveness::Warning);
            }
        }
    }
}
