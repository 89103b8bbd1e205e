//! The cluster's metrics, rendered with the runtime's (`troupe_cluster_*`, see
//! docs/ARCHITECTURE.md for the catalogue): handles resolved once at join.

use metrics::{Counter, Gauge};
use troupe::{MetricsExporter, OutcomeKind, Priority};

/// Resolved handles.
pub(crate) struct Metrics {
    submitted: Vec<Counter>,
    refused: Vec<Vec<Counter>>,
    deduplicated: Counter,
    recorded: Vec<Vec<Counter>>,
    duplicate_outcomes: Counter,
    redeliveries: Counter,
    dead_lettered: Counter,
    nodes_up: Gauge,
    nodes_gone: Gauge,
    backlog: Vec<Gauge>,
    connected: Gauge,
    bus_out: Vec<Counter>,
    bus_in: Vec<Counter>,
}

/// Why the cluster refused a submission (the `reason` label).
pub(crate) const REFUSALS: [&str; 3] = ["backlog_full", "no_node", "nats_unreachable"];

/// The bus message kinds that cross nodes.
pub(crate) const BUS_KINDS: [&str; 3] = ["direct", "publish", "request"];

impl Metrics {
    pub(crate) fn new(e: &MetricsExporter) -> Self {
        let pri = |p: Priority| ("priority", p.as_str().to_owned());
        Metrics {
            submitted: Priority::ALL
                .iter()
                .map(|&p| {
                    e.counter(
                        "troupe_cluster_tasks_submitted_total",
                        "Tasks this node stored in the cluster's stream.",
                        &[pri(p)],
                    )
                })
                .collect(),
            refused: Priority::ALL
                .iter()
                .map(|&p| {
                    REFUSALS
                        .iter()
                        .map(|r| {
                            e.counter(
                                "troupe_cluster_submissions_refused_total",
                                "Submissions the cluster refused, by reason: backlog_full (past the priority's share of cluster.max_backlog), no_node (no live node serves the target), nats_unreachable.",
                                &[pri(p), ("reason", (*r).to_owned())],
                            )
                        })
                        .collect()
                })
                .collect(),
            deduplicated: e.counter(
                "troupe_cluster_tasks_deduplicated_total",
                "Submissions whose idempotency key named an earlier task.",
                &[],
            ),
            recorded: Priority::ALL
                .iter()
                .map(|&p| {
                    OutcomeKind::ALL
                        .iter()
                        .map(|o| {
                            e.counter(
                                "troupe_cluster_outcomes_recorded_total",
                                "Task outcomes this node recorded in the cluster.",
                                &[pri(p), ("outcome", o.as_str().to_owned())],
                            )
                        })
                        .collect()
                })
                .collect(),
            duplicate_outcomes: e.counter(
                "troupe_cluster_duplicate_outcomes_total",
                "Executions whose outcome was already recorded by an earlier delivery (at-least-once execution).",
                &[],
            ),
            redeliveries: e.counter(
                "troupe_cluster_redeliveries_total",
                "Tasks this node received again after another delivery did not end (a node died or lost NATS).",
                &[],
            ),
            dead_lettered: e.counter(
                "troupe_cluster_dead_lettered_total",
                "Tasks given up after cluster.max_attempts deliveries (recorded error).",
                &[],
            ),
            nodes_up: e.gauge(
                "troupe_cluster_nodes",
                "Nodes of the cluster by state, as this node sees them.",
                &[("state", "up".to_owned())],
            ),
            nodes_gone: e.gauge(
                "troupe_cluster_nodes",
                "Nodes of the cluster by state, as this node sees them.",
                &[("state", "gone".to_owned())],
            ),
            backlog: Priority::ALL
                .iter()
                .map(|&p| {
                    e.gauge(
                        "troupe_cluster_backlog",
                        "Tasks waiting in the cluster's stream, not yet pulled by any node.",
                        &[pri(p)],
                    )
                })
                .collect(),
            connected: e.gauge(
                "troupe_cluster_nats_connected",
                "1 while this node's connection to NATS is up.",
                &[],
            ),
            bus_out: BUS_KINDS
                .iter()
                .map(|k| {
                    e.counter(
                        "troupe_cluster_bus_messages_total",
                        "Bus messages carried between nodes, by direction and kind.",
                        &[("direction", "out".to_owned()), ("kind", (*k).to_owned())],
                    )
                })
                .collect(),
            bus_in: BUS_KINDS
                .iter()
                .map(|k| {
                    e.counter(
                        "troupe_cluster_bus_messages_total",
                        "Bus messages carried between nodes, by direction and kind.",
                        &[("direction", "in".to_owned()), ("kind", (*k).to_owned())],
                    )
                })
                .collect(),
        }
    }

    pub(crate) fn submitted(&self, p: Priority, duplicate: bool) {
        if duplicate {
            self.deduplicated.increment(1);
        } else {
            self.submitted[p.index()].increment(1);
        }
    }

    /// `reason` is an index into [`REFUSALS`].
    pub(crate) fn refused(&self, p: Priority, reason: usize) {
        self.refused[p.index()][reason].increment(1);
    }

    pub(crate) fn recorded(&self, p: Priority, o: OutcomeKind) {
        self.recorded[p.index()][o.index()].increment(1);
    }

    pub(crate) fn duplicate_outcome(&self) {
        self.duplicate_outcomes.increment(1);
    }

    pub(crate) fn redelivered(&self) {
        self.redeliveries.increment(1);
    }

    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.increment(1);
    }

    pub(crate) fn nodes(&self, up: usize, gone: usize) {
        self.nodes_up.set(up as f64);
        self.nodes_gone.set(gone as f64);
    }

    pub(crate) fn backlog(&self, b: &[u64; Priority::COUNT]) {
        for (g, &n) in self.backlog.iter().zip(b) {
            g.set(n as f64);
        }
    }

    pub(crate) fn connected(&self, up: bool) {
        self.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// `kind` is an index into [`BUS_KINDS`].
    pub(crate) fn bus(&self, outgoing: bool, kind: usize) {
        let c = if outgoing {
            &self.bus_out
        } else {
            &self.bus_in
        };
        c[kind].increment(1);
    }
}
