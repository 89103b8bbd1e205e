//! The report: what a run measured, judged against the SLO policy, as a terminal table and as
//! JSON (schema `troupe-loadtest/1`, documented field by field in loadtest/README.md).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use troupe::Priority;
use troupe_slo::{Objective, ObjectiveKind, Policy, Subject};

use crate::mix::Mix;
use crate::record::{self, CurvePoint, Outcomes, Percentiles, Tick};
use crate::run::{Mode, RunOutput};

/// The JSON schema identifier; bumped on any incompatible change.
pub const SCHEMA: &str = "troupe-loadtest/1";

/// Achieved throughput may fall this far below offered and still count as keeping up: the
/// window's edges cut a few in-flight completions off either end.
pub const THROUGHPUT_TOLERANCE: f64 = 0.01;

/// The policy used when no `slo/policies.yaml` is found: p95 ≤ 50 ms, p99 ≤ 100 ms, at most
/// 0.1 % of tasks bad. (Throughput ≥ offered is always checked.)
pub fn builtin_policy() -> Policy {
    let objective = |name: &str, kind, target, threshold: Option<u64>| Objective {
        name: name.to_owned(),
        description: String::new(),
        kind,
        subject: Subject::Tasks,
        target: Some(target),
        threshold: threshold.map(Duration::from_millis),
        floor: None,
        sli: Default::default(),
    };
    Policy {
        version: 1,
        service: "troupe".to_owned(),
        window: Duration::from_secs(30 * 86400),
        objectives: vec![
            objective("availability", ObjectiveKind::Ratio, 99.9, None),
            objective("task-latency-p95", ObjectiveKind::Latency, 95.0, Some(50)),
            objective("task-latency-p99", ObjectiveKind::Latency, 99.0, Some(100)),
        ],
    }
}

/// How a run was driven.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// `open` or `closed`.
    pub kind: &'static str,
    /// Open loop: offered tasks per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Closed loop: clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

/// Task counts and rates.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    /// Counts by outcome; `offered` = ok + error + timeout + panic + cancelled + rejected.
    #[serde(flatten)]
    pub outcomes: Outcomes,
    /// Requests still outstanding when the run gave up waiting (0 in a healthy run).
    pub unfinished: u64,
    /// Offered tasks per second.
    pub offered_per_s: f64,
    /// Tasks that ended (any outcome but rejected) inside the window, per second.
    pub achieved_per_s: f64,
    /// (error + timeout + panic + transport_error) / (offered − cancelled).
    pub error_ratio: f64,
    /// The first failed HTTP exchange's error, when any failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_transport_error: Option<String>,
    /// How fast the target's refusals came back (intended send → refusal), when it refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal_latency: Option<Percentiles>,
}

/// Latency of one priority.
#[derive(Debug, Clone, Serialize)]
pub struct PriorityLatency {
    /// The priority.
    pub priority: Priority,
    /// Its percentiles.
    #[serde(flatten)]
    pub latency: Percentiles,
}

/// A latency-by-percentile curve.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    /// `all` or a priority.
    pub label: String,
    /// Points.
    pub points: Vec<CurvePoint>,
}

/// Latency, submit (scheduled send) → outcome, of tasks that ended.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    /// Every measured task.
    pub overall: Percentiles,
    /// Per priority that had tasks, in priority order.
    pub by_priority: Vec<PriorityLatency>,
    /// Latency by percentile, overall and per priority.
    pub curves: Vec<Curve>,
}

/// One node's share of a run against several (a cluster, spread round-robin).
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// The node's URL.
    pub url: String,
    /// Counts of the requests sent to it.
    pub outcomes: Outcomes,
    /// Its completed tasks per second over the measured window.
    pub completed_per_s: f64,
    /// Latency of the tasks submitted to it (wherever they ran).
    pub latency: Percentiles,
}

/// One mix entry's results.
#[derive(Debug, Clone, Serialize)]
pub struct EntryReport {
    /// Entry name.
    pub name: String,
    /// Agent kind.
    pub kind: String,
    /// Capability targeted.
    pub target: String,
    /// Priority.
    pub priority: Priority,
    /// Through the tri-sandbox.
    pub sandbox: bool,
    /// Share of traffic (0–1).
    pub share: f64,
    /// Counts.
    pub outcomes: Outcomes,
    /// Latency.
    pub latency: Percentiles,
}

/// Bus traffic.
#[derive(Debug, Clone, Serialize)]
pub struct BusReport {
    /// Messages scheduled in the window.
    pub offered: u64,
    /// Accepted by the bus.
    pub accepted: u64,
    /// Mailbox deliveries (a publish reaches every subscriber).
    pub delivered: u64,
    /// Deliveries dropped because a mailbox was full.
    pub dropped: u64,
    /// Sends refused outright.
    pub failed: u64,
    /// Offered messages per second.
    pub offered_per_s: f64,
    /// Accepted messages per second.
    pub accepted_per_s: f64,
    /// Deliveries per second.
    pub delivered_per_s: f64,
}

/// Result of one objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Met.
    Pass,
    /// Missed.
    Fail,
    /// The run cannot judge it (e.g. agent start-up, or a floor above the offered rate).
    NotMeasured,
}

/// One objective, measured.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Objective name.
    pub name: String,
    /// What it promises.
    pub objective: String,
    /// The measured value, in `unit`.
    pub measured: Option<f64>,
    /// The limit, in `unit`.
    pub limit: Option<f64>,
    /// `ms`, `%` or `/s`.
    pub unit: &'static str,
    /// The verdict.
    pub status: Status,
    /// Why it was not measured, or what it means.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The SLO verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Where the policy came from.
    pub policy: String,
    /// Every objective.
    pub checks: Vec<Check>,
    /// True when no check failed.
    pub pass: bool,
}

/// One row of a ramp.
#[derive(Debug, Clone, Serialize)]
pub struct RampRow {
    /// Offered tasks per second.
    pub rate: f64,
    /// Achieved tasks per second.
    pub achieved_per_s: f64,
    /// Tasks that ended `ok`, per second of the measured window.
    pub goodput_per_s: f64,
    /// Refusals (of any reason) per second.
    pub refused_per_s: f64,
    /// p99 of how fast the target's refusals came back, ms (0 without refusals).
    pub refusal_p99_ms: f64,
    /// p95, ms.
    pub p95_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// Bad / offered.
    pub error_ratio: f64,
    /// Rejected tasks.
    pub rejected: u64,
    /// Met every objective.
    pub pass: bool,
}

/// A ramp's steps and its finding.
#[derive(Debug, Clone, Serialize)]
pub struct RampReport {
    /// Steps, in the order run.
    pub steps: Vec<RampRow>,
    /// The highest offered rate that met every objective, if any did.
    pub best_rate: Option<f64>,
}

/// Everything about one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// RFC 3339 time the run started.
    pub started_at: String,
    /// `embedded N-agent pool` or the node's URL.
    pub target: String,
    /// Mix name.
    pub mix: String,
    /// Arrival model.
    pub mode: ModeReport,
    /// Warm-up, seconds (excluded).
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Tasks.
    pub tasks: TaskSummary,
    /// Latency.
    pub latency: LatencyReport,
    /// Per entry.
    pub entries: Vec<EntryReport>,
    /// Per node, when the target is several nodes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeReport>,
    /// Bus traffic (zeros without any).
    pub bus: BusReport,
    /// Per second, warm-up included.
    pub timeline: Vec<Tick>,
    /// SLO verdict.
    pub slo: Verdict,
    /// Ramp, when run with `--ramp` (the rest of the report is the best passing step, or the
    /// first step if none passed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampReport>,
}

/// What the report needs besides the measurements.
pub struct Context<'a> {
    /// The mix.
    pub mix: &'a Mix,
    /// Arrival model.
    pub mode: Mode,
    /// Warm-up.
    pub warmup: Duration,
    /// `describe()` of the target.
    pub target: String,
    /// The target's nodes (one name for an embedded pool or a single node).
    pub nodes: Vec<String>,
    /// The policy and where it came from.
    pub policy: &'a Policy,
    /// Where the policy came from.
    pub policy_source: String,
    /// Bus messages per second asked for.
    pub bus_rate: f64,
    /// Wall-clock start.
    pub started_at: SystemTime,
    /// The target's first failed HTTP exchange, if any.
    pub first_transport_error: Option<String>,
}

impl Report {
    /// Builds the report of `out`.
    pub fn build(ctx: &Context<'_>, out: &RunOutput) -> Report {
        let m = &out.measured;
        let secs = out.window.as_secs_f64().max(1e-9);
        let o = &m.total;
        let offered_per_s = match ctx.mode {
            Mode::Open { rate } => rate,
            Mode::Closed { .. } => o.offered as f64 / secs,
        };
        let judged = o.judged();
        let tasks = TaskSummary {
            outcomes: o.clone(),
            unfinished: out.unfinished as u64,
            offered_per_s,
            achieved_per_s: m.completed_in_window as f64 / secs,
            error_ratio: if judged == 0 {
                0.0
            } else {
                o.bad() as f64 / judged as f64
            },
            first_transport_error: ctx.first_transport_error.clone(),
            refusal_latency: (!m.refusal.is_empty()).then(|| Percentiles::of(&m.refusal)),
        };
        let by_priority: Vec<PriorityLatency> = Priority::ALL
            .iter()
            .zip(&m.by_priority)
            .filter(|(_, h)| !h.is_empty())
            .map(|(&priority, h)| PriorityLatency {
                priority,
                latency: Percentiles::of(h),
            })
            .collect();
        let mut curves = vec![Curve {
            label: "all".to_owned(),
            points: record::curve(&m.overall),
        }];
        curves.extend(
            Priority::ALL
                .iter()
                .zip(&m.by_priority)
                .filter(|(_, h)| !h.is_empty())
                .map(|(p, h)| Curve {
                    label: p.as_str().to_owned(),
                    points: record::curve(h),
                }),
        );
        let entries = ctx
            .mix
            .entries
            .iter()
            .zip(m.by_entry.iter().zip(&m.entry_latency))
            .map(|(e, (o, h))| EntryReport {
                name: e.name.clone(),
                kind: e.kind.clone(),
                target: e.target.clone(),
                priority: e.priority,
                sandbox: e.sandbox,
                share: e.share,
                outcomes: o.clone(),
                latency: Percentiles::of(h),
            })
            .collect();
        let nodes = if ctx.nodes.len() > 1 {
            ctx.nodes
                .iter()
                .zip(m.by_node.iter().zip(&m.node_latency))
                .map(|(url, (o, h))| NodeReport {
                    url: url.clone(),
                    outcomes: o.clone(),
                    completed_per_s: o.completed() as f64 / secs,
                    latency: Percentiles::of(h),
                })
                .collect()
        } else {
            Vec::new()
        };
        let bus_offered_per_s = if ctx.mix.bus.is_some() {
            ctx.bus_rate
        } else {
            0.0
        };
        let bus = BusReport {
            offered: out.bus.offered,
            accepted: out.bus.accepted,
            delivered: out.bus.delivered,
            dropped: out.bus.dropped,
            failed: out.bus.failed,
            offered_per_s: bus_offered_per_s,
            accepted_per_s: out.bus.accepted as f64 / secs,
            delivered_per_s: out.bus.delivered as f64 / secs,
        };
        let latency = LatencyReport {
            overall: Percentiles::of(&m.overall),
            by_priority,
            curves,
        };
        let slo = judge(ctx, &tasks, &bus, m);
        Report {
            schema: SCHEMA,
            started_at: humantime::format_rfc3339_seconds(ctx.started_at).to_string(),
            target: ctx.target.clone(),
            mix: ctx.mix.name.clone(),
            mode: match ctx.mode {
                Mode::Open { rate } => ModeReport {
                    kind: "open",
                    rate: Some(rate),
                    concurrency: None,
                },
                Mode::Closed { concurrency } => ModeReport {
                    kind: "closed",
                    rate: None,
                    concurrency: Some(concurrency),
                },
            },
            warmup_s: ctx.warmup.as_secs_f64(),
            duration_s: secs,
            tasks,
            latency,
            entries,
            nodes,
            bus,
            timeline: m.timeline.clone(),
            slo,
            ramp: None,
        }
    }

    /// The ramp row for this run.
    pub fn ramp_row(&self) -> RampRow {
        let secs = self.duration_s.max(1e-9);
        RampRow {
            rate: self.tasks.offered_per_s,
            achieved_per_s: self.tasks.achieved_per_s,
            goodput_per_s: self.tasks.outcomes.ok as f64 / secs,
            refused_per_s: self.tasks.outcomes.rejected as f64 / secs,
            refusal_p99_ms: self
                .tasks
                .refusal_latency
                .as_ref()
                .map_or(0.0, |p| p.p99_ms),
            p95_ms: self.latency.overall.p95_ms,
            p99_ms: self.latency.overall.p99_ms,
            error_ratio: self.tasks.error_ratio,
            rejected: self.tasks.outcomes.rejected,
            pass: self.slo.pass,
        }
    }
}

fn check(
    name: &str,
    objective: String,
    measured: Option<f64>,
    limit: f64,
    unit: &'static str,
    pass: bool,
) -> Check {
    Check {
        name: name.to_owned(),
        objective,
        measured,
        limit: Some(limit),
        unit,
        status: if pass { Status::Pass } else { Status::Fail },
        note: String::new(),
    }
}

fn not_measured(o: &Objective, note: &str) -> Check {
    Check {
        name: o.name.clone(),
        objective: o.statement(),
        measured: None,
        limit: None,
        unit: "",
        status: Status::NotMeasured,
        note: note.to_owned(),
    }
}

fn judge(ctx: &Context<'_>, tasks: &TaskSummary, bus: &BusReport, m: &record::Measured) -> Verdict {
    let mut checks = Vec::new();
    if let Mode::Open { rate } = ctx.mode {
        let limit = rate * (1.0 - THROUGHPUT_TOLERANCE);
        let mut c = check(
            "throughput-vs-offered",
            format!(
                "achieved ≥ offered {rate}/s (within {}%)",
                THROUGHPUT_TOLERANCE * 100.0
            ),
            Some(tasks.achieved_per_s),
            limit,
            "/s",
            tasks.achieved_per_s >= limit,
        );
        c.note = "built in: an open-loop run must keep up with its arrival rate".to_owned();
        checks.push(c);
    }
    if tasks.unfinished > 0 {
        let mut c = check(
            "all-finished",
            "every request ends before the drain deadline".to_owned(),
            Some(tasks.unfinished as f64),
            0.0,
            "",
            false,
        );
        c.note = "requests were still outstanding when the run stopped waiting".to_owned();
        checks.push(c);
    }
    for o in &ctx.policy.objectives {
        let c = match (o.subject, o.kind) {
            (Subject::Tasks, ObjectiveKind::Ratio) => {
                let budget = o.error_budget().unwrap_or(0.0);
                check(
                    &o.name,
                    o.statement(),
                    Some(tasks.error_ratio * 100.0),
                    budget * 100.0,
                    "%",
                    tasks.error_ratio <= budget + 1e-12,
                )
            }
            (Subject::Tasks, ObjectiveKind::Latency) => {
                let (Some(p), Some(t)) = (o.percentile(), o.threshold) else {
                    checks.push(not_measured(o, "incomplete objective"));
                    continue;
                };
                let limit = t.as_secs_f64() * 1000.0;
                if m.overall.is_empty() {
                    let mut c = check(&o.name, o.statement(), None, limit, "ms", false);
                    c.note = "no task completed".to_owned();
                    c
                } else {
                    let v = Percentiles::at(&m.overall, p);
                    check(&o.name, o.statement(), Some(v), limit, "ms", v <= limit)
                }
            }
            (Subject::Tasks, ObjectiveKind::Throughput) => {
                let floor = o.floor.unwrap_or(0.0);
                if tasks.offered_per_s < floor {
                    not_measured(
                        o,
                        "the offered rate is below the floor; run at least that rate to judge it",
                    )
                } else {
                    check(
                        &o.name,
                        o.statement(),
                        Some(tasks.achieved_per_s),
                        floor,
                        "/s",
                        tasks.achieved_per_s >= floor,
                    )
                }
            }
            (Subject::Messages, ObjectiveKind::Throughput) => {
                let floor = o.floor.unwrap_or(0.0);
                if bus.offered_per_s < floor {
                    not_measured(o, "the mix offers fewer messages per second than the floor")
                } else {
                    check(
                        &o.name,
                        o.statement(),
                        Some(bus.accepted_per_s),
                        floor,
                        "/s",
                        bus.accepted_per_s >= floor,
                    )
                }
            }
            (Subject::AgentStartup, _) => {
                not_measured(o, "agent start-up is not something a load test drives")
            }
            (Subject::Messages, _) => {
                not_measured(o, "the load test measures message throughput only")
            }
        };
        checks.push(c);
    }
    Verdict {
        policy: ctx.policy_source.clone(),
        pass: checks.iter().all(|c| c.status != Status::Fail),
        checks,
    }
}

fn pct_row(out: &mut String, label: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "  {label:<26} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        p.count, p.p50_ms, p.p90_ms, p.p95_ms, p.p99_ms, p.p999_ms, p.max_ms
    );
}

fn outcome_line(o: &Outcomes) -> String {
    let mut s = format!(
        "ok {}  error {}  timeout {}  panic {}  cancelled {}  rejected {}",
        o.ok, o.error, o.timeout, o.panic, o.cancelled, o.rejected
    );
    if o.transport_error > 0 {
        let _ = write!(s, "  transport_error {}", o.transport_error);
    }
    if !o.rejected_by_reason.is_empty() {
        let reasons: Vec<String> = o
            .rejected_by_reason
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        let _ = write!(s, " ({})", reasons.join(", "));
    }
    s
}

fn fmt_value(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "—".to_owned(),
        Some(v) if unit == "%" => format!("{v:.3}%"),
        Some(v) if unit == "ms" => format!("{v:.3} ms"),
        Some(v) if unit == "/s" => format!("{v:.0}/s"),
        Some(v) => format!("{v}"),
    }
}

/// The verdict as a table.
pub fn render_verdict(v: &Verdict) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "SLO ({})", v.policy);
    for c in &v.checks {
        let status = match c.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NotMeasured => "n/a ",
        };
        let _ = write!(
            out,
            "  {status}  {:<24} {:<34} measured {:>14}",
            c.name,
            c.objective,
            fmt_value(c.measured, c.unit)
        );
        if let Some(l) = c.limit {
            let _ = write!(out, "  limit {}", fmt_value(Some(l), c.unit));
        }
        if !c.note.is_empty() && c.status != Status::Pass {
            let _ = write!(out, "  ({})", c.note);
        }
        out.push('\n');
    }
    let _ = writeln!(out, "verdict: {}", if v.pass { "PASS" } else { "FAIL" });
    out
}

/// The report as the terminal table printed at the end of a run.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let how = match (r.mode.rate, r.mode.concurrency) {
        (Some(rate), _) => format!("open loop at {rate} tasks/s"),
        (_, Some(c)) => format!("closed loop with {c} clients"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "troupe-loadtest: {} | mix `{}` | {how} for {}s (+{}s warm-up)",
        r.target, r.mix, r.duration_s, r.warmup_s
    );
    let t = &r.tasks;
    let _ = writeln!(
        out,
        "tasks     offered {} ({:.0}/s)  achieved {:.0}/s  error ratio {:.4}%{}",
        t.outcomes.offered,
        t.offered_per_s,
        t.achieved_per_s,
        t.error_ratio * 100.0,
        if t.unfinished > 0 {
            format!("  UNFINISHED {}", t.unfinished)
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "outcomes  {}", outcome_line(&t.outcomes));
    if let Some(e) = &t.first_transport_error {
        let _ = writeln!(out, "          first failed HTTP exchange: {e}");
    }
    let _ = writeln!(
        out,
        "\nlatency, submit → outcome (ms)\n  {:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "count", "p50", "p90", "p95", "p99", "p99.9", "max"
    );
    pct_row(&mut out, "all", &r.latency.overall);
    for p in &r.latency.by_priority {
        pct_row(&mut out, p.priority.as_str(), &p.latency);
    }
    // Refused requests have no latency, so the percentiles above cannot show them: say how
    // many there were, right here, and that they count against availability.
    let o = &t.outcomes;
    if o.rejected > 0 {
        let share = |n: u64| 100.0 * n as f64 / o.offered.max(1) as f64;
        let _ = writeln!(
            out,
            "  {:<26} {:>9} ({:.2}% of offered; no latency, counted bad in availability)",
            "refused (overload)",
            o.refused_overload(),
            share(o.refused_overload())
        );
        if let Some(r) = &t.refusal_latency {
            pct_row(&mut out, "time to refusal", r);
        }
        if o.refused_invalid() > 0 {
            let _ = writeln!(
                out,
                "  {:<26} {:>9} ({:.2}% of offered; the client's mistake, not judged)",
                "refused (invalid)",
                o.refused_invalid(),
                share(o.refused_invalid())
            );
        }
    }
    let _ = writeln!(out, "\nby entry");
    for e in &r.entries {
        let mark = match (e.sandbox, e.kind.as_str()) {
            (true, _) => " [sandbox]",
            (_, "workflow") => " [workflow]",
            _ => "",
        };
        let label = format!("{}{mark}", e.name);
        pct_row(&mut out, &label, &e.latency);
        if e.outcomes.ok != e.outcomes.offered {
            let _ = writeln!(out, "  {:<26} {}", "", outcome_line(&e.outcomes));
        }
    }
    if !r.nodes.is_empty() {
        let _ = writeln!(
            out,
            "\nby node (requests spread round-robin; latency of the tasks submitted there)"
        );
        for n in &r.nodes {
            pct_row(&mut out, &n.url, &n.latency);
            let _ = writeln!(
                out,
                "  {:<26} {:.0} completed/s  {}",
                "",
                n.completed_per_s,
                outcome_line(&n.outcomes)
            );
        }
    }
    if r.bus.offered > 0 {
        let b = &r.bus;
        let _ = writeln!(
            out,
            "\nbus       offered {} ({:.0}/s)  accepted {:.0}/s  deliveries {:.0}/s  dropped {}  failed {}",
            b.offered, b.offered_per_s, b.accepted_per_s, b.delivered_per_s, b.dropped, b.failed
        );
    }
    if let Some(ramp) = &r.ramp {
        let _ = writeln!(out, "\nsteps (each judged against the SLO)");
        let _ = writeln!(
            out,
            "  {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>11}  verdict",
            "offered/s",
            "achieved/s",
            "goodput/s",
            "p95 ms",
            "p99 ms",
            "errors %",
            "refused/s",
            "refusal p99"
        );
        for s in &ramp.steps {
            let _ = writeln!(
                out,
                "  {:>10.0} {:>10.0} {:>10.0} {:>9.3} {:>9.3} {:>9.4} {:>10.0} {:>8.3} ms  {}",
                s.rate,
                s.achieved_per_s,
                s.goodput_per_s,
                s.p95_ms,
                s.p99_ms,
                s.error_ratio * 100.0,
                s.refused_per_s,
                s.refusal_p99_ms,
                if s.pass { "PASS" } else { "FAIL" }
            );
        }
        match ramp.best_rate {
            Some(b) => {
                let _ = writeln!(
                    out,
                    "highest rate meeting the SLO: {b:.0} tasks/s (details above: that step for a ramp, the last for a sweep)"
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "no step met the SLO (details above are the first step)"
                );
            }
        }
    }
    out.push('\n');
    out.push_str(&render_verdict(&r.slo));
    out
}
