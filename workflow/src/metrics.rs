//! Workflow metrics, one set of handles per registered workflow, resolved when it is
//! registered (never looked up per event). Workflow names are user-defined, so the label is
//! bounded by the number of workflows an engine may hold ([`MAX_WORKFLOWS`]).

use metrics::{Counter, Gauge};
use troupe::{HistogramHandle, MetricsExporter};

/// Most workflows one engine registers: the bound on the `workflow` label.
pub const MAX_WORKFLOWS: usize = 256;

pub(crate) const EXECUTION_END: [&str; 4] = ["succeeded", "failed", "cancelled", "timed_out"];
pub(crate) const STEP_END: [&str; 3] = ["succeeded", "failed", "skipped"];

/// The handles of one workflow.
pub(crate) struct WorkflowMetrics {
    pub(crate) started: Counter,
    pub(crate) running: Gauge,
    finished: [Counter; 4],
    steps: [Counter; 3],
    pub(crate) warnings: Counter,
    pub(crate) escalations: Counter,
    pub(crate) step_duration: HistogramHandle,
    pub(crate) execution_duration: HistogramHandle,
}

impl WorkflowMetrics {
    pub(crate) fn new(e: &MetricsExporter, workflow: &str) -> Self {
        let w = || ("workflow", workflow.to_owned());
        WorkflowMetrics {
            started: e.counter(
                "troupe_workflow_executions_started_total",
                "Workflow executions started.",
                &[w()],
            ),
            running: e.gauge(
                "troupe_workflow_executions_running",
                "Workflow executions running now.",
                &[w()],
            ),
            finished: EXECUTION_END.map(|s| {
                e.counter(
                    "troupe_workflow_executions_finished_total",
                    "Workflow executions ended, by status.",
                    &[w(), ("status", s.to_owned())],
                )
            }),
            steps: STEP_END.map(|s| {
                e.counter(
                    "troupe_workflow_steps_finished_total",
                    "Workflow steps ended, by status.",
                    &[w(), ("status", s.to_owned())],
                )
            }),
            warnings: e.counter(
                "troupe_workflow_warnings_total",
                "`warned` events: a step or execution past the warn fraction of its deadline.",
                &[w()],
            ),
            escalations: e.counter(
                "troupe_workflow_escalations_total",
                "`escalated` events: a step that failed after its retries and fallback, or a deadline passed.",
                &[w()],
            ),
            step_duration: e.histogram(
                "troupe_workflow_step_duration_seconds",
                "A step's duration, first submission to end (retries and fallback included).",
                &[w()],
            ),
            execution_duration: e.histogram(
                "troupe_workflow_execution_duration_seconds",
                "An execution's duration, start (or resume) to end.",
                &[w()],
            ),
        }
    }

    pub(crate) fn finished(&self, status: &str) {
        if let Some(i) = EXECUTION_END.iter().position(|s| *s == status) {
            self.finished[i].increment(1);
        }
    }

    pub(crate) fn step(&self, status: &str) {
        if let Some(i) = STEP_END.iter().position(|s| *s == status) {
            self.steps[i].increment(1);
        }
    }
}
