//! The agent loop: one incarnation of one agent, from build to exit; and the loop of an agent
//! instance on a sandbox lane.
//!
//! It builds the agent with its factory, runs its start hooks, then alternates between its
//! mailbox (the bus's) and its work groups (the pool's) until asked to stop. Each handler call is
//! isolated: a panic is caught, the task in hand gets its outcome (`panic`, or a retry), and the
//! incarnation ends so the supervisor can build a fresh instance. A timeout or a shutdown cancel
//! drops the handler's future, which is how an async handler is cancelled in Rust.
//!
//! This is where the parts meet an agent, so it sits above them all: supervision starts
//! incarnations through the spawn functions the runtime builds from [`run`], and the sandbox
//! starts lane instances through those built from [`run_lane_instance`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::FutureExt;
use tracing::Instrument;

use crate::agent::{Agent, AgentContext, AgentFactory};
use crate::handle::{Core, RuntimeHandle};
use crate::panics::{self, Guarded};
use crate::pool::{AgentSlot, AgentSpec, AgentState, Liveness};
use crate::sandbox::jobs::LaneJobs;
use crate::sandbox::model::LaneResult;
use crate::supervisor::Start;
use crate::supervisor::policy::{ExitReason, panic_message};
use crate::task::{Outcome, QueuedTask, TaskRequest};
use crate::telemetry::elapsed_ns;

/// Messages handled per turn before the agent looks at its task queues again, so a flood of
/// messages cannot starve its tasks (or the reverse).
const MESSAGE_BATCH: usize = 64;

/// Runs one incarnation of agent `start.index` and returns why it ended.
pub(crate) async fn run<F: AgentFactory>(
    factory: Arc<F>,
    core: Arc<Core>,
    start: Start,
) -> ExitReason {
    // Taken apart at once, so the future does not keep `start` whole beside its parts.
    let Start {
        index,
        cause,
        delay,
        started,
    } = start;
    let slot = core.pool().slot(index);
    if !delay.is_zero() {
        slot.set_state(AgentState::Restarting);
        tokio::time::sleep(delay).await;
    }
    slot.set_state(AgentState::Starting);
    slot.set_down(false);
    let incarnation = slot.next_incarnation();
    slot.set_liveness(Liveness::Healthy);
    let began = Instant::now();
    let ctx = AgentContext::for_agent(RuntimeHandle::internal(core.clone()), slot.spec());
    let mut agent = match std::panic::catch_unwind(AssertUnwindSafe(|| {
        panics::in_agent(index, || match slot.restarts() {
            // The slot's own spec says 0 restarts: no copy for a first start.
            0 => factory.build(slot.spec()),
            restarts => factory.build(&AgentSpec {
                restarts,
                ..slot.spec().clone()
            }),
        })
    })) {
        Ok(Ok(agent)) => agent,
        Ok(Err(e)) => return ExitReason::StartFailed(e.to_string()),
        Err(p) => return ExitReason::Panicked(panic_message(p.as_ref())),
    };
    match AssertUnwindSafe(Guarded::new(agent.on_start(&ctx), index, 0))
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return ExitReason::StartFailed(e.to_string()),
        Err(p) => return ExitReason::Panicked(panic_message(p.as_ref())),
    }
    if let Some(cause) = &cause {
        match AssertUnwindSafe(Guarded::new(agent.on_restart(&ctx, cause), index, 0))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return ExitReason::StartFailed(e.to_string()),
            Err(p) => return ExitReason::Panicked(panic_message(p.as_ref())),
        }
    }
    core.supervision()
        .record_startup(slot.tier(), elapsed_ns(began));
    slot.set_state(AgentState::Running);
    if slot.record_start() {
        core.supervision().first_start_finished(index, None);
    }
    if let Some(started) = started {
        let _ = started.send(());
    }

    // Until its first work arrives the agent waits here, in this small future. The loop that
    // handles work holds the handler futures (a few KB) and is allocated once, when work
    // comes: a pool of agents starts, and idles, without that memory.
    until_work(slot, core.bus(), index).await;
    let exit = Box::pin(serve(&mut agent, &ctx, &core, slot, incarnation)).await;
    if exit == ExitReason::Stopped {
        // A panicking stop hook still counts as a clean stop: the agent was leaving anyway.
        let _ = AssertUnwindSafe(Guarded::new(agent.on_stop(&ctx), index, 0))
            .catch_unwind()
            .await;
    }
    exit
}

/// True if the agent has mail, work or a stop request waiting.
fn pending(slot: &AgentSlot, bus: &crate::bus::BusCore, index: u32) -> bool {
    slot.has_work() || bus.has_mail(index) || slot.stop_requested()
}

/// The idle step: announce idleness, list the agent where work may arrive, look once more
/// (work that arrived in between would otherwise find nobody to wake), then park. Returns at
/// once if it was notified meanwhile or finds work on the second look; either way the caller
/// looks again.
async fn idle(slot: &AgentSlot, bus: &crate::bus::BusCore, index: u32) {
    if !slot.signal().begin_idle() {
        return;
    }
    slot.list_idle();
    if pending(slot, bus, index) {
        slot.signal().cancel_idle();
        return;
    }
    slot.signal().parked().await;
}

/// Waits, in the agent's small pre-work future, until it has something to do.
async fn until_work(slot: &AgentSlot, bus: &crate::bus::BusCore, index: u32) {
    if !pending(slot, bus, index) {
        idle(slot, bus, index).await;
    }
}

async fn serve<A: Agent>(
    agent: &mut A,
    ctx: &AgentContext,
    core: &Core,
    slot: &AgentSlot,
    incarnation: u64,
) -> ExitReason {
    let limits = &core.config().queues.starvation_limit;
    let index = slot.spec().id.0;
    let bus = core.bus();
    loop {
        let mut handled = 0;
        while handled < MESSAGE_BATCH {
            let Some(mut msg) = bus.pop(index) else {
                break;
            };
            handled += 1;
            bus.delivered(&msg);
            let reply = msg.take_reply();
            let span = tracing::debug_span!(
                "troupe.bus.message",
                kind = msg.kind().as_str(),
                from = msg.from.map(|a| a.0)
            );
            crate::trace::adopt(&span, &msg.trace);
            let handler = AssertUnwindSafe(Guarded::new(
                agent.on_message(msg, ctx).instrument(span),
                index,
                0,
            ))
            .catch_unwind();
            let cancel = CancelSignal { core, slot };
            let answer = tokio::select! {
                biased;
                r = handler => r,
                // Dropping the reply sender tells a requester there will be no reply.
                _ = cancel => Ok(None),
            };
            match answer {
                Ok(Some(answer)) => {
                    if let Some(tx) = reply {
                        tx.send(answer);
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

        if slot.stop_requested() {
            return ExitReason::Stopped;
        }

        if let Some(task) = slot.pick(limits) {
            core.admission().release(task.priority);
            if let Some(exit) = run_task(agent, ctx, core, slot, task, incarnation).await {
                return exit;
            }
            if slot.incarnation() != incarnation {
                return ExitReason::Unresponsive("replaced while its handler was stuck".into());
            }
            tokio::task::consume_budget().await;
            continue;
        }
        if handled > 0 {
            continue;
        }

        idle(slot, bus, index).await;
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
    core: &Core,
    slot: &AgentSlot,
    task: QueuedTask,
    incarnation: u64,
) -> Option<ExitReason> {
    let now = Instant::now();
    let p = task.priority;
    let enqueued_at = task.enqueued_at;
    let ledger = core.ledger();
    ledger.started(&task, ctx.id(), now);
    if core.phase().is_cancelling() {
        ledger.finish(task, Outcome::Cancelled);
        return None;
    }
    // The attempt ends by the task's deadline, and by its own limit if it has one.
    let mut limit = task.attempt_timeout.map(|t| now + t);
    if let Some(deadline) = task.deadline {
        if deadline <= now {
            ledger.finish(task, Outcome::Timeout);
            return None;
        }
        limit = Some(limit.map_or(deadline, |l| l.min(deadline)));
    }
    let task_id = task.id.0;
    let request = TaskRequest {
        id: task.id,
        priority: p,
        payload: task.payload.clone(),
        attempt: task.attempt,
        key: task.key,
    };
    // Publish the deadline and the task so the liveness watchdog can answer it if this thread
    // gets stuck in a handler that never yields.
    let deadline_ms = limit.map_or(0, |l| core.pool().ms_at(l).max(1));
    let parent = task.parent;
    slot.begin_task(task, incarnation, deadline_ms);
    let span = tracing::debug_span!(
        "troupe.task",
        task.id = request.id.0,
        priority = p.as_str(),
        attempt = request.attempt,
        queue_wait_us = crate::telemetry::nanos_between(enqueued_at, now) / 1_000,
        outcome = tracing::field::Empty
    );
    crate::trace::adopt(&span, &parent);
    let span_handle = span.clone();
    let ran = {
        // A limited or paused kind waits for its turn inside the task's deadline.
        let limiter = ctx.limiter.as_deref().filter(|l| !l.is_free());
        let work = async move {
            let _permit = match limiter {
                Some(l) => l.acquire().await,
                None => None,
            };
            agent.handle(request, ctx).await
        };
        let handler = AssertUnwindSafe(Guarded::new(work.instrument(span), ctx.id().0, task_id))
            .catch_unwind();
        let cancel = CancelSignal { core, slot };
        match limit {
            Some(limit) => {
                // The timer runs for what is left on Tokio's clock rather than at the std
                // instant converted, so a test on a paused clock (which auto-advances past idle
                // waits) sees the attempt cut off when its handler's own timers say it is due.
                let left = limit.saturating_duration_since(Instant::now());
                tokio::select! {
                    biased;
                    r = handler => Ran::Done(r),
                    _ = cancel => Ran::Cancelled,
                    _ = tokio::time::sleep(left) => Ran::TimedOut,
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
    ledger.handled(p, now);
    // A handler that held its thread past the limit (so the timer could not cut it off) is
    // late whatever it returned: the deadline is the outcome, and the late result is counted.
    let ran = match ran {
        Ran::Done(_) if limit.is_some_and(|l| Instant::now() > l) => {
            ledger.late_result(p);
            Ran::TimedOut
        }
        other => other,
    };
    let Some(task) = slot.end_task(incarnation) else {
        // The watchdog answered the task (timeout) and replaced this incarnation.
        return Some(ExitReason::Unresponsive(
            "its task overran the deadline while the handler blocked its thread".into(),
        ));
    };
    let kind = match &ran {
        Ran::Done(Ok(Ok(_))) => "ok",
        Ran::Done(Ok(Err(_))) => "error",
        Ran::Done(Err(_)) => "panic",
        Ran::TimedOut => "timeout",
        Ran::Cancelled => "cancelled",
    };
    span_handle.record("outcome", kind);
    // Taken whatever the outcome, so a flag set by a handler that then succeeded or panicked
    // does not carry over to the next task.
    let retry_after = ctx.take_retry_after();
    match ran {
        Ran::Done(Ok(Ok(output))) => ledger.finish(task, Outcome::Ok(output)),
        Ran::Done(Ok(Err(e))) => match retry_after {
            Some(after) => core.retry_after(ctx.limiter.as_deref(), task, after, Outcome::Error(e)),
            None => core.retry_or_finish(task, Outcome::Error(e)),
        },
        Ran::Done(Err(p)) => {
            let msg = panic_message(p.as_ref());
            core.retry_or_finish(task, Outcome::Panic(msg.clone()));
            return Some(ExitReason::Panicked(msg));
        }
        Ran::TimedOut => core.retry_or_finish(task, Outcome::Timeout),
        Ran::Cancelled => ledger.finish(task, Outcome::Cancelled),
    }
    None
}

/// Ready once shutdown enters its cancel phase, or the supervisor kills this agent after a stop
/// timeout; both wake the agent to notice.
struct CancelSignal<'a> {
    core: &'a Core,
    slot: &'a AgentSlot,
}

impl Future for CancelSignal<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let cancelled = || self.core.phase().is_cancelling() || self.slot.killed();
        if cancelled() {
            return Poll::Ready(());
        }
        self.slot.signal().register(cx);
        if cancelled() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Runs sandbox jobs on one agent instance of a lane, rebuilding it after a panic. `runtime`
/// is the runtime being built when the spawn function was made; once it is gone, so is the lane.
pub(crate) async fn run_lane_instance<F: AgentFactory>(
    factory: Arc<F>,
    runtime: Weak<Core>,
    w: LaneJobs,
) {
    let Some(core) = runtime.upgrade() else {
        return;
    };
    let ctx = AgentContext::for_lane(RuntimeHandle::internal(core), w.id, w.kind.clone(), w.lane);
    let spec = AgentSpec {
        id: w.id,
        kind: w.kind.clone(),
        tier: Arc::from("sandbox"),
        capabilities: Arc::from(vec![w.kind.clone()]),
        params: w.params.clone(),
        restarts: 0,
    };
    let mut agent: Option<F::Agent> = None;
    while let Some(job) = w.next().await {
        let (request, timeout, reply) = job.into_parts();
        if agent.is_none() {
            match build_for_lane(&*factory, &spec, &ctx).await {
                Ok(a) => agent = Some(a),
                Err(e) => {
                    let _ = reply.send(LaneResult::Unavailable(e));
                    continue;
                }
            }
        }
        let Some(a) = agent.as_mut() else { continue };
        let task_id = request.id.0;
        let started = Instant::now();
        let ran = tokio::time::timeout(
            timeout,
            AssertUnwindSafe(Guarded::new(a.handle(request, &ctx), ctx.id().0, task_id))
                .catch_unwind(),
        )
        .await;
        let result = match ran {
            // A handler that blocked its thread past the timeout returns "in time" as far as
            // the timer knows; it is late all the same.
            Ok(Ok(_)) if started.elapsed() > timeout => LaneResult::Timeout,
            Err(_) => LaneResult::Timeout,
            Ok(Ok(Ok(out))) => LaneResult::Ok(out),
            Ok(Ok(Err(e))) => LaneResult::Error(e.to_string()),
            Ok(Err(p)) => {
                agent = None;
                LaneResult::Panic(panic_message(p.as_ref()))
            }
        };
        let _ = reply.send(result);
        if w.replaced() {
            break;
        }
    }
}

async fn build_for_lane<F: AgentFactory>(
    factory: &F,
    spec: &AgentSpec,
    ctx: &AgentContext,
) -> Result<F::Agent, String> {
    let mut agent = std::panic::catch_unwind(AssertUnwindSafe(|| {
        panics::in_agent(spec.id.0, || factory.build(spec))
    }))
    .map_err(|p| format!("factory panicked: {}", panic_message(p.as_ref())))?
    .map_err(|e| format!("factory failed: {e}"))?;
    match AssertUnwindSafe(Guarded::new(agent.on_start(ctx), spec.id.0, 0))
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => Ok(agent),
        Ok(Err(e)) => Err(format!("on_start failed: {e}")),
        Err(p) => Err(format!("on_start panicked: {}", panic_message(p.as_ref()))),
    }
}
