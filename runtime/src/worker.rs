//! The agent loop: one incarnation of one agent, from build to exit.
//!
//! It builds the agent with its factory, runs its start hooks, then alternates between its
//! mailbox and its work groups until asked to stop. Each handler call is isolated: a panic is
//! caught, the task in hand gets its outcome (`panic`, or a retry), and the incarnation ends so
//! the supervisor can build a fresh instance. A timeout or a shutdown cancel drops the handler's
//! future, which is how an async handler is cancelled in Rust.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use std::sync::atomic::Ordering;

use futures_util::FutureExt;
use tracing::Instrument;

use crate::agent::{Agent, AgentContext, AgentFactory, ExitReason};
use crate::runtime::Shared;
use crate::slot::{AgentSlot, AgentState};
use crate::task::{Outcome, QueuedTask, TaskRequest};

/// Messages handled per turn before the agent looks at its task queues again, so a flood of
/// messages cannot starve its tasks (or the reverse).
const MESSAGE_BATCH: usize = 64;

/// How an incarnation begins.
pub(crate) struct Start {
    pub(crate) index: u32,
    /// The previous incarnation's exit, for a restart.
    pub(crate) cause: Option<ExitReason>,
    /// Backoff before building.
    pub(crate) delay: std::time::Duration,
    /// Fired once the agent has started (dropped unfired if it fails to).
    pub(crate) started: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Runs one incarnation of agent `start.index` and returns why it ended.
pub(crate) async fn run<F: AgentFactory>(
    factory: Arc<F>,
    shared: Arc<Shared>,
    start: Start,
) -> ExitReason {
    let index = start.index;
    let slot = &shared.agents[index as usize];
    if !start.delay.is_zero() {
        slot.set_state(AgentState::Restarting);
        tokio::time::sleep(start.delay).await;
    }
    slot.set_state(AgentState::Starting);
    let incarnation = slot
        .incarnation
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
        + 1;
    slot.set_liveness(crate::slot::Liveness::Healthy);
    let began = Instant::now();
    let ctx = AgentContext::new(shared.clone(), index);
    let mut spec = slot.spec.clone();
    spec.restarts = slot.restarts.load(std::sync::atomic::Ordering::Relaxed);

    let mut agent = match std::panic::catch_unwind(AssertUnwindSafe(|| factory.build(&spec))) {
        Ok(Ok(agent)) => agent,
        Ok(Err(e)) => return ExitReason::StartFailed(e.to_string()),
        Err(p) => return ExitReason::Panicked(panic_message(p.as_ref())),
    };
    match AssertUnwindSafe(agent.on_start(&ctx)).catch_unwind().await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return ExitReason::StartFailed(e.to_string()),
        Err(p) => return ExitReason::Panicked(panic_message(p.as_ref())),
    }
    if let Some(cause) = &start.cause {
        match AssertUnwindSafe(agent.on_restart(&ctx, cause))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return ExitReason::StartFailed(e.to_string()),
            Err(p) => return ExitReason::Panicked(panic_message(p.as_ref())),
        }
    }
    shared.tiers[slot.tier].startup.record(elapsed_ns(began));
    slot.set_state(AgentState::Running);
    if slot
        .starts
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
        == 0
    {
        shared.first_start_finished(index, None);
    }
    if let Some(started) = start.started {
        let _ = started.send(());
    }

    let exit = serve(&mut agent, &ctx, &shared, slot, incarnation).await;
    if exit == ExitReason::Stopped {
        // A panicking stop hook still counts as a clean stop: the agent was leaving anyway.
        let _ = AssertUnwindSafe(agent.on_stop(&ctx)).catch_unwind().await;
    }
    exit
}

async fn serve<A: Agent>(
    agent: &mut A,
    ctx: &AgentContext,
    shared: &Shared,
    slot: &AgentSlot,
    incarnation: u64,
) -> ExitReason {
    let limits = &shared.config.queues.starvation_limit;
    loop {
        let mut handled = 0;
        while handled < MESSAGE_BATCH {
            let Some(mut msg) = slot.mailbox.pop() else {
                break;
            };
            handled += 1;
            shared
                .telemetry
                .delivered(msg.kind, elapsed_ns(msg.sent_at));
            let reply = msg.reply.take();
            let span = tracing::debug_span!(
                "troupe.bus.message",
                kind = msg.kind.as_str(),
                from = msg.from.map(|a| a.0)
            );
            crate::trace::adopt(&span, &msg.trace);
            let handler =
                AssertUnwindSafe(agent.on_message(msg, ctx).instrument(span)).catch_unwind();
            let cancel = CancelSignal { shared, slot };
            let answer = tokio::select! {
                biased;
                r = handler => r,
                // Dropping the reply sender tells a requester there will be no reply.
                _ = cancel => Ok(None),
            };
            match answer {
                Ok(Some(answer)) => {
                    if let Some(tx) = reply {
                        let _ = tx.send(answer);
                    }
                }
                Ok(None) => {}
                Err(p) => return ExitReason::Panicked(panic_message(p.as_ref())),
            }
            // Queues are not Tokio resources, so a busy agent would never yield on its own;
            // spend coop budget so it yields now and then and its neighbours on this worker
            // thread (submitters included) keep running.
            tokio::task::consume_budget().await;
        }

        if slot.stop.load(std::sync::atomic::Ordering::Acquire) {
            return ExitReason::Stopped;
        }

        if let Some(task) = pick(shared, slot, limits) {
            if let Some(exit) = run_task(agent, ctx, shared, slot, task, incarnation).await {
                return exit;
            }
            if slot.incarnation.load(std::sync::atomic::Ordering::Acquire) != incarnation {
                return ExitReason::Unresponsive("replaced while its handler was stuck".into());
            }
            tokio::task::consume_budget().await;
            continue;
        }
        if handled > 0 {
            continue;
        }

        // Nothing to do: announce idleness, list ourselves where work may arrive, look once
        // more (work that arrived in between would otherwise find nobody to wake), then park.
        if !slot.signal.begin_idle() {
            continue;
        }
        for (position, group) in slot.groups.iter().enumerate() {
            if !slot.in_idle[position].swap(true, std::sync::atomic::Ordering::SeqCst) {
                group.push_idle(ctx.id().0, position as u8);
            }
        }
        if slot.has_work()
            || !slot.mailbox.is_empty()
            || slot.stop.load(std::sync::atomic::Ordering::Acquire)
        {
            slot.signal.cancel_idle();
            continue;
        }
        slot.signal.parked().await;
    }
}

/// Takes the next task from the agent's groups: the group with the most urgent queued task
/// wins, and within it the group's fair pick applies.
#[inline]
fn pick(
    shared: &Shared,
    slot: &AgentSlot,
    limits: &crate::priority::PerPriority<u32>,
) -> Option<QueuedTask> {
    loop {
        let mut best: Option<(usize, usize)> = None;
        for (gi, g) in slot.groups.iter().enumerate() {
            if let Some(level) = g.first_nonempty() {
                if best.is_none_or(|(b, _)| level < b) {
                    best = Some((level, gi));
                }
                if level == 0 {
                    break;
                }
            }
        }
        let (_, gi) = best?;
        if let Some(task) = slot.groups[gi].pop(limits) {
            shared.admission.level(task.priority).release();
            return Some(task);
        }
    }
}

enum Ran<T> {
    Done(T),
    TimedOut,
    Cancelled,
}

/// Runs one task attempt. Returns an exit reason if the agent must be rebuilt (a panic).
async fn run_task<A: Agent>(
    agent: &mut A,
    ctx: &AgentContext,
    shared: &Shared,
    slot: &AgentSlot,
    task: QueuedTask,
    incarnation: u64,
) -> Option<ExitReason> {
    let now = Instant::now();
    let p = task.priority;
    let enqueued_at = task.enqueued_at;
    shared.telemetry.queue_wait[p].record(nanos_between(enqueued_at, now));
    if shared.is_cancelling() {
        shared.finish(task, Outcome::Cancelled);
        return None;
    }
    let mut limit = task
        .timeout
        .or(shared.config.tasks.default_timeout)
        .map(|t| now + t);
    if let Some(deadline) = task.deadline {
        if deadline <= now {
            shared.finish(task, Outcome::Timeout);
            return None;
        }
        limit = Some(limit.map_or(deadline, |l| l.min(deadline)));
    }
    let request = TaskRequest {
        id: task.id,
        priority: p,
        payload: task.payload.clone(),
        attempt: task.attempt,
    };
    // Publish the deadline and the task so the liveness watchdog can answer it if this thread
    // gets stuck in a handler that never yields.
    if let Some(limit) = limit {
        slot.deadline_ms
            .store(shared.ms_at(limit).max(1), Ordering::Release);
    }
    slot.in_flight.put(task, incarnation);
    let span = tracing::debug_span!(
        "troupe.task",
        task.id = request.id.0,
        priority = p.as_str(),
        attempt = request.attempt,
        queue_wait_us = nanos_between(enqueued_at, now) / 1_000,
        outcome = tracing::field::Empty
    );
    let span_handle = span.clone();
    let ran = {
        let handler = AssertUnwindSafe(agent.handle(request, ctx).instrument(span)).catch_unwind();
        let cancel = CancelSignal { shared, slot };
        match limit {
            Some(limit) => {
                tokio::select! {
                    biased;
                    r = handler => Ran::Done(r),
                    _ = cancel => Ran::Cancelled,
                    _ = tokio::time::sleep_until(limit.into()) => Ran::TimedOut,
                }
            }
            None => {
                tokio::select! {
                    biased;
                    r = handler => Ran::Done(r),
                    _ = cancel => Ran::Cancelled,
                }
            }
        }
    };
    shared.telemetry.handler[p].record(elapsed_ns(now));
    let Some(task) = slot.in_flight.take_own(incarnation) else {
        // The watchdog answered the task (timeout) and replaced this incarnation.
        return Some(ExitReason::Unresponsive(
            "its task overran the deadline while the handler blocked its thread".into(),
        ));
    };
    slot.deadline_ms.store(0, Ordering::Release);
    let kind = match &ran {
        Ran::Done(Ok(Ok(_))) => "ok",
        Ran::Done(Ok(Err(_))) => "error",
        Ran::Done(Err(_)) => "panic",
        Ran::TimedOut => "timeout",
        Ran::Cancelled => "cancelled",
    };
    span_handle.record("outcome", kind);
    match ran {
        Ran::Done(Ok(Ok(output))) => shared.finish(task, Outcome::Ok(output)),
        Ran::Done(Ok(Err(e))) => shared.retry_or_finish(task, Outcome::Error(e)),
        Ran::Done(Err(p)) => {
            let msg = panic_message(p.as_ref());
            shared.retry_or_finish(task, Outcome::Panic(msg.clone()));
            return Some(ExitReason::Panicked(msg));
        }
        Ran::TimedOut => shared.retry_or_finish(task, Outcome::Timeout),
        Ran::Cancelled => shared.finish(task, Outcome::Cancelled),
    }
    None
}

/// Ready once shutdown enters its cancel phase, or the supervisor kills this agent after a stop
/// timeout; both wake the agent to notice.
struct CancelSignal<'a> {
    shared: &'a Shared,
    slot: &'a AgentSlot,
}

impl Future for CancelSignal<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let cancelled = || {
            self.shared.is_cancelling() || self.slot.kill.load(std::sync::atomic::Ordering::Acquire)
        };
        if cancelled() {
            return Poll::Ready(());
        }
        self.slot.signal.register(cx);
        if cancelled() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[inline]
pub(crate) fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[inline]
pub(crate) fn nanos_between(a: Instant, b: Instant) -> u64 {
    u64::try_from(b.saturating_duration_since(a).as_nanos()).unwrap_or(u64::MAX)
}
