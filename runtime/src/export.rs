//! Prometheus exposition of the metric catalogue (see DESIGN.md), rendered on demand.
//!
//! The runtime never touches the exporter on its hot paths: it counts into striped counters
//! and records latencies into HDR histograms (see `telemetry`). Rendering reads them:
//!
//! * counters and gauges are copied into a `metrics-exporter-prometheus` recorder (handles
//!   registered once, updated with `absolute` / `set`), which also carries the `process_*`
//!   metrics of `metrics-process`, and renders them with HELP and TYPE lines;
//! * histograms are rendered here, straight from the HDR data, as cumulative buckets from
//!   10 µs to 10 s (0.05 and 0.1 included, the SLO thresholds). Feeding the exporter sample by
//!   sample would buffer every sample between scrapes (tens of MB per second at full load) and
//!   its summaries lose samples under load; the HDR data gives exact bucket counts in
//!   O(buckets) instead.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use crate::bus::{DROP_REASONS, MessageKind};
use crate::handle::{Core, RuntimeHandle};
use crate::pool::AgentState;
use crate::priority::Priority;
use crate::sandbox::model::{Lane, LaneResult};
use crate::task::OutcomeKind;
use crate::telemetry::LatencyHistogram;

/// Histogram bucket upper bounds, in seconds.
pub const BUCKETS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const REJECT_REASONS: [&str; 5] = [
    "queue_full",
    "shutting_down",
    "invalid",
    "unavailable",
    "kind_full",
];
const KINDS: [MessageKind; 3] = MessageKind::ALL;
const STATES: [&str; 3] = ["running", "restarting", "stopped"];
const VOTES: [&str; 3] = ["unanimous", "majority", "no_quorum"];

/// A latency histogram a caller records into (the node's HTTP layer uses one per route).
#[derive(Clone)]
pub struct HistogramHandle(Arc<LatencyHistogram>);

impl HistogramHandle {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        self.0
            .record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
}

impl std::fmt::Debug for HistogramHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HistogramHandle")
    }
}

struct Series {
    labels: Vec<(&'static str, String)>,
    source: Source,
}

enum Source {
    Runtime(fn(&Core, usize) -> &LatencyHistogram, usize),
    External(Arc<LatencyHistogram>),
}

struct Family {
    name: &'static str,
    help: &'static str,
    series: Vec<Series>,
}

struct Handles {
    submitted: Vec<Counter>,
    late: Vec<Counter>,
    completed: Vec<Vec<Counter>>,
    rejected: Vec<Vec<Counter>>,
    depth: Vec<Gauge>,
    capacity: Vec<Gauge>,
    bus: Vec<Counter>,
    dropped: Vec<Counter>,
    agents: Vec<Vec<Gauge>>,
    agents_capacity: Gauge,
    unhealthy: Vec<Gauge>,
    starts: Vec<Counter>,
    restarts: Vec<Counter>,
    escalations: Vec<Counter>,
    lane_exec: Vec<Vec<Counter>>,
    votes: Vec<Counter>,
    lanes_available: Vec<Gauge>,
    lanes_total: Vec<Gauge>,
}

/// Renders the runtime's metrics in the Prometheus text format.
pub struct MetricsExporter {
    core: Arc<Core>,
    recorder: PrometheusRecorder,
    handles: Handles,
    histograms: Mutex<Vec<Family>>,
    process: metrics_process::Collector,
}

impl std::fmt::Debug for MetricsExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsExporter").finish_non_exhaustive()
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect::<Vec<_>>(),
    )
}

impl MetricsExporter {
    /// An exporter for `runtime`'s metrics (and this process's `process_*` metrics).
    pub fn new(runtime: &RuntimeHandle) -> Self {
        let core = runtime.core().clone();
        let recorder = PrometheusBuilder::new().build_recorder();
        let r = &recorder;
        let describe = |name: &'static str, help: &'static str| {
            r.describe_counter(KeyName::from(name), None, SharedString::from(help));
        };
        let counter = |name: &'static str, labels: &[(&'static str, String)]| {
            r.register_counter(&key(name, labels), &METADATA)
        };
        let gauge = |name: &'static str, labels: &[(&'static str, String)]| {
            r.register_gauge(&key(name, labels), &METADATA)
        };
        let pri = |p: Priority| ("priority", p.as_str().to_owned());
        let tiers: Vec<String> = core.supervision().tier_names();

        describe(
            "troupe_tasks_submitted_total",
            "Tasks accepted at admission.",
        );
        describe(
            "troupe_tasks_completed_total",
            "Tasks finished, by outcome.",
        );
        describe(
            "troupe_tasks_late_results_total",
            "Handler results that came back after the task's deadline and were discarded (the task ended timeout).",
        );
        describe(
            "troupe_tasks_rejected_total",
            "Tasks refused at admission, by reason.",
        );
        describe(
            "troupe_task_queue_depth",
            "Tasks waiting in the queue of a priority.",
        );
        describe(
            "troupe_task_queue_capacity",
            "Bound of the queue of a priority.",
        );
        describe(
            "troupe_bus_messages_total",
            "Bus messages delivered to a mailbox.",
        );
        describe(
            "troupe_bus_messages_dropped_total",
            "Bus messages not delivered, by reason.",
        );
        describe("troupe_agents", "Agents by tier and state.");
        describe("troupe_agents_capacity", "The pool limit.");
        describe(
            "troupe_agents_unhealthy",
            "Agents busy on one task past their liveness limit.",
        );
        describe(
            "troupe_agent_starts_total",
            "Agent starts (first starts and restarts).",
        );
        describe(
            "troupe_agent_restarts_total",
            "Agent restarts by their supervisor.",
        );
        describe(
            "troupe_supervisor_escalations_total",
            "Restart intensity exceeded.",
        );
        describe(
            "troupe_sandbox_lane_executions_total",
            "Sandbox lane executions, by result.",
        );
        describe("troupe_sandbox_votes_total", "Sandbox votes, by result.");
        describe(
            "troupe_sandbox_lanes_available",
            "Sandbox lane executors able to take jobs.",
        );
        describe(
            "troupe_sandbox_lanes_capacity",
            "Sandbox lane executors configured.",
        );

        let handles = Handles {
            submitted: Priority::ALL
                .iter()
                .map(|&p| counter("troupe_tasks_submitted_total", &[pri(p)]))
                .collect(),
            late: Priority::ALL
                .iter()
                .map(|&p| counter("troupe_tasks_late_results_total", &[pri(p)]))
                .collect(),
            completed: Priority::ALL
                .iter()
                .map(|&p| {
                    OutcomeKind::ALL
                        .iter()
                        .map(|o| {
                            counter(
                                "troupe_tasks_completed_total",
                                &[pri(p), ("outcome", o.as_str().to_owned())],
                            )
                        })
                        .collect()
                })
                .collect(),
            rejected: Priority::ALL
                .iter()
                .map(|&p| {
                    REJECT_REASONS
                        .iter()
                        .map(|r| {
                            counter(
                                "troupe_tasks_rejected_total",
                                &[pri(p), ("reason", (*r).to_owned())],
                            )
                        })
                        .collect()
                })
                .collect(),
            depth: Priority::ALL
                .iter()
                .map(|&p| gauge("troupe_task_queue_depth", &[pri(p)]))
                .collect(),
            capacity: Priority::ALL
                .iter()
                .map(|&p| gauge("troupe_task_queue_capacity", &[pri(p)]))
                .collect(),
            bus: KINDS
                .iter()
                .map(|k| {
                    counter(
                        "troupe_bus_messages_total",
                        &[("kind", k.as_str().to_owned())],
                    )
                })
                .collect(),
            dropped: DROP_REASONS
                .iter()
                .map(|r| {
                    counter(
                        "troupe_bus_messages_dropped_total",
                        &[("reason", (*r).to_owned())],
                    )
                })
                .collect(),
            agents: tiers
                .iter()
                .map(|t| {
                    STATES
                        .iter()
                        .map(|s| {
                            gauge(
                                "troupe_agents",
                                &[("tier", t.clone()), ("state", (*s).to_owned())],
                            )
                        })
                        .collect()
                })
                .collect(),
            agents_capacity: gauge("troupe_agents_capacity", &[]),
            unhealthy: tiers
                .iter()
                .map(|t| gauge("troupe_agents_unhealthy", &[("tier", t.clone())]))
                .collect(),
            starts: tiers
                .iter()
                .map(|t| counter("troupe_agent_starts_total", &[("tier", t.clone())]))
                .collect(),
            restarts: tiers
                .iter()
                .map(|t| counter("troupe_agent_restarts_total", &[("tier", t.clone())]))
                .collect(),
            escalations: tiers
                .iter()
                .map(|t| {
                    counter(
                        "troupe_supervisor_escalations_total",
                        &[("supervisor", t.clone())],
                    )
                })
                .collect(),
            lane_exec: Lane::ALL
                .iter()
                .map(|l| {
                    LaneResult::LABELS
                        .iter()
                        .map(|o| {
                            counter(
                                "troupe_sandbox_lane_executions_total",
                                &[
                                    ("lane", l.as_str().to_owned()),
                                    ("outcome", (*o).to_owned()),
                                ],
                            )
                        })
                        .collect()
                })
                .collect(),
            votes: VOTES
                .iter()
                .map(|v| counter("troupe_sandbox_votes_total", &[("result", (*v).to_owned())]))
                .collect(),
            lanes_available: Lane::ALL
                .iter()
                .map(|l| {
                    gauge(
                        "troupe_sandbox_lanes_available",
                        &[("lane", l.as_str().to_owned())],
                    )
                })
                .collect(),
            lanes_total: Lane::ALL
                .iter()
                .map(|l| {
                    gauge(
                        "troupe_sandbox_lanes_capacity",
                        &[("lane", l.as_str().to_owned())],
                    )
                })
                .collect(),
        };

        let per_priority = |f: fn(&Core, usize) -> &LatencyHistogram| {
            Priority::ALL
                .iter()
                .map(|&p| Series {
                    labels: vec![pri(p)],
                    source: Source::Runtime(f, p.index()),
                })
                .collect()
        };
        let histograms = vec![
            Family {
                name: "troupe_task_queue_wait_seconds",
                help: "Time a task waited in its queue before an agent took it.",
                series: per_priority(|c, i| c.ledger().queue_wait(Priority::ALL[i])),
            },
            Family {
                name: "troupe_task_duration_seconds",
                help: "Handler time per task attempt.",
                series: per_priority(|c, i| c.ledger().handler(Priority::ALL[i])),
            },
            Family {
                name: "troupe_task_latency_seconds",
                help: "Time from submission to outcome.",
                series: per_priority(|c, i| c.ledger().latency(Priority::ALL[i])),
            },
            Family {
                name: "troupe_bus_delivery_seconds",
                help: "Time from send to the recipient's handler.",
                series: KINDS
                    .iter()
                    .map(|k| Series {
                        labels: vec![("kind", k.as_str().to_owned())],
                        source: Source::Runtime(|c, i| c.bus().delivery(KINDS[i]), k.index()),
                    })
                    .collect(),
            },
            Family {
                name: "troupe_agent_startup_seconds",
                help: "Time to build an agent and run its start hooks.",
                series: tiers
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Series {
                        labels: vec![("tier", t.clone())],
                        source: Source::Runtime(|c, i| c.supervision().startup(i), i),
                    })
                    .collect(),
            },
        ];

        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(&recorder, || process.describe());
        MetricsExporter {
            core,
            recorder,
            handles,
            histograms: Mutex::new(histograms),
            process,
        }
    }

    /// A counter rendered with the runtime's metrics (for layers above the runtime, such as
    /// the node's HTTP server). Resolve it once and keep it.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Counter {
        self.recorder
            .describe_counter(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    /// A gauge rendered with the runtime's metrics. Resolve it once and keep it.
    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Gauge {
        self.recorder
            .describe_gauge(KeyName::from(name), None, SharedString::from(help));
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    /// A latency histogram rendered with the runtime's (same buckets). Resolve it once.
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> HistogramHandle {
        let h = Arc::new(LatencyHistogram::default());
        let mut families = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let series = Series {
            labels: labels.to_vec(),
            source: Source::External(h.clone()),
        };
        match families.iter_mut().find(|f| f.name == name) {
            Some(f) => f.series.push(series),
            None => families.push(Family {
                name,
                help,
                series: vec![series],
            }),
        }
        HistogramHandle(h)
    }

    fn sync(&self) {
        let c = &*self.core;
        let (ledger, admission, bus, sup, sb) = (
            c.ledger(),
            c.admission(),
            c.bus(),
            c.supervision(),
            c.sandbox(),
        );
        let h = &self.handles;
        for p in Priority::ALL {
            let i = p.index();
            h.submitted[i].absolute(ledger.submitted(p));
            h.late[i].absolute(ledger.late_results(p));
            for o in OutcomeKind::ALL {
                h.completed[i][o.index()].absolute(ledger.completed(p, o));
            }
            let r = ledger.rejections(p);
            for (c, n) in h.rejected[i].iter().zip([
                r.queue_full,
                r.shutting_down,
                r.invalid,
                r.unavailable,
                r.kind_full,
            ]) {
                c.absolute(n);
            }
            h.depth[i].set(admission.depth(p) as f64);
            h.capacity[i].set(admission.capacity(p) as f64);
        }
        for k in KINDS {
            h.bus[k.index()].absolute(bus.messages(k));
        }
        for (reason, d) in h.dropped.iter().enumerate() {
            d.absolute(bus.dropped(reason));
        }
        let tiers = sup.tier_count();
        let mut counts = vec![[0usize; 3]; tiers];
        let mut starts = vec![0u64; tiers];
        let mut unhealthy = vec![0usize; tiers];
        for slot in c.pool().slots() {
            let state = match slot.state() {
                AgentState::Running => 0,
                AgentState::Starting | AgentState::Restarting => 1,
                AgentState::Stopped => 2,
            };
            counts[slot.tier()][state] += 1;
            starts[slot.tier()] += slot.starts();
            if slot.is_unhealthy() {
                unhealthy[slot.tier()] += 1;
            }
        }
        for i in 0..tiers {
            for (state, g) in h.agents[i].iter().enumerate() {
                g.set(counts[i][state] as f64);
            }
            h.unhealthy[i].set(unhealthy[i] as f64);
            h.starts[i].absolute(starts[i]);
            h.restarts[i].absolute(sup.restarts(i));
            h.escalations[i].absolute(sup.escalations(i));
        }
        h.agents_capacity.set(c.config().max_agents as f64);
        let available = sb.lanes_available();
        for lane in Lane::ALL {
            let i = lane.index();
            for (k, counter) in h.lane_exec[i].iter().enumerate() {
                counter.absolute(sb.executions(lane, k));
            }
            h.lanes_available[i].set(available[i].0 as f64);
            h.lanes_total[i].set(available[i].1 as f64);
        }
        for (k, counter) in h.votes.iter().enumerate() {
            counter.absolute(sb.votes(k));
        }
        metrics::with_local_recorder(&self.recorder, || self.process.collect());
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        self.sync();
        let mut out = self.recorder.handle().render();
        let families = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        for f in families.iter() {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} histogram", f.name);
            for series in &f.series {
                let hist = match &series.source {
                    Source::Runtime(get, i) => get(&self.core, *i).snapshot(),
                    Source::External(h) => h.snapshot(),
                };
                render_histogram(&mut out, f.name, &series.labels, hist.as_ref());
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_histogram(
    out: &mut String,
    name: &str,
    labels: &[(&'static str, String)],
    hist: Option<&hdrhistogram::Histogram<u64>>,
) {
    let base: String = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",");
    let sep = if base.is_empty() { "" } else { "," };
    let (count, sum) = match hist {
        Some(h) if !h.is_empty() => (h.len(), h.mean() * h.len() as f64 / 1e9),
        _ => (0, 0.0),
    };
    for b in BUCKETS {
        let le_ns = (b * 1e9) as u64;
        let n = match hist {
            Some(h) if !h.is_empty() => h.count_between(0, le_ns),
            _ => 0,
        };
        let _ = writeln!(out, "{name}_bucket{{{base}{sep}le=\"{b}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{base}{sep}le=\"+Inf\"}} {count}");
    let braces = if base.is_empty() {
        String::new()
    } else {
        format!("{{{base}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {count}");
}
