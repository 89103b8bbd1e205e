//! The liveness watchdog: every heartbeat, checks each busy agent against its task's deadline.
//!
//! Two heartbeats past it the agent is marked unhealthy; three past, its task is answered
//! `timeout` (through the ledger, so it still has exactly one outcome) and its supervisor
//! replaces it. This is how a handler that blocks its thread, and so never reaches an `.await`
//! where it could be cancelled, still ends its task.

use std::sync::Weak;
use std::time::Instant;

use super::Supervision;
use super::policy::ExitReason;
use crate::pool::Liveness;
use crate::task::Outcome;

/// Runs until the runtime stops. Holds only a weak reference, so it ends with the runtime.
pub(crate) async fn watchdog(sup: Weak<Supervision>) {
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
