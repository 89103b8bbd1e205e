//! # troupe-loadtest: what a pool sustains, and whether it meets its SLO
//!
//! The library behind the `troupe-loadtest` binary (see loadtest/README.md for the tool):
//!
//! * [`mix`]: the workload mix file and the deterministic picker that follows its shares.
//! * [`target`]: the system under test — an embedded runtime or a node over HTTP.
//! * [`run`]: open-loop, closed-loop and ramp load generation.
//! * [`record`]: HDR histograms and counters fed by every request's sample.
//! * [`report`]: the report, its JSON schema, the terminal table and the SLO verdict.
//! * [`html`]: the self-contained HTML page with charts.

#![warn(missing_docs)]

pub mod html;
pub mod mix;
pub mod record;
pub mod report;
pub mod run;
pub mod target;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use troupe_slo::Policy;

use crate::mix::Mix;
use crate::report::{Context, RampReport, Report};
use crate::run::{Mode, Plan};
use crate::target::Target;

/// A run's settings beyond the arrival model.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The mix.
    pub mix: Mix,
    /// The SLO policy judged against.
    pub policy: Policy,
    /// Where the policy came from (a path, or "built-in default").
    pub policy_source: String,
    /// Load parameters; `plan.mode` is the arrival model of a single run.
    pub plan: Plan,
}

impl Settings {
    fn context(&self, target: &Target, mode: Mode, started_at: SystemTime) -> Context<'_> {
        Context {
            mix: &self.mix,
            mode,
            warmup: self.plan.warmup,
            target: target.describe(),
            nodes: target.nodes(),
            policy: &self.policy,
            policy_source: self.policy_source.clone(),
            bus_rate: self.plan.bus_rate,
            started_at,
            first_transport_error: target.first_transport_error(),
        }
    }
}

/// One run with `settings.plan`.
pub async fn run_once(target: Arc<Target>, settings: &Settings) -> Report {
    let started_at = SystemTime::now();
    let out = run::run(target.clone(), &settings.mix, &settings.plan).await;
    Report::build(
        &settings.context(&target, settings.plan.mode, started_at),
        &out,
    )
}

/// How a ramp steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    /// First rate, tasks/s.
    pub from: f64,
    /// Last rate, tasks/s.
    pub to: f64,
    /// Evenly spaced steps from `from` to `to`, both included.
    pub steps: usize,
    /// After the first failing step, this many bisections between it and the last pass.
    pub refine: usize,
    /// Measured length of each step.
    pub step: Duration,
}

impl Ramp {
    /// The rate of step `i` of `steps`, evenly spaced from `from` to `to` (both included).
    fn rate_of(&self, i: usize) -> f64 {
        let n = self.steps.max(1);
        if n == 1 {
            self.from.round()
        } else {
            (self.from + (self.to - self.from) * i as f64 / (n - 1) as f64).round()
        }
    }
}

/// Runs every step of `ramp` (its `refine` is ignored), past the knee too: the overload curve
/// (offered against goodput, p99 and refusals). The report is that of the last step, with every
/// step under `ramp` and the highest passing rate as its `best_rate`.
pub async fn run_sweep(target: Arc<Target>, settings: &Settings, ramp: Ramp) -> Report {
    let n = ramp.steps.max(1);
    let mut steps: Vec<Report> = Vec::with_capacity(n);
    for i in 0..n {
        let rate = ramp.rate_of(i);
        let mut s = settings.clone();
        s.plan.mode = Mode::Open { rate };
        s.plan.duration = ramp.step;
        if s.plan.progress == run::Progress::Line {
            eprintln!("sweep: {rate:.0} tasks/s");
        }
        steps.push(run_once(target.clone(), &s).await);
    }
    let rows: Vec<_> = steps.iter().map(Report::ramp_row).collect();
    let best_rate = steps
        .iter()
        .filter(|r| r.slo.pass)
        .map(|r| r.tasks.offered_per_s)
        .max_by(f64::total_cmp);
    // At least one step ran (`n` is at least 1).
    let Some(mut report) = steps.pop() else {
        return run_once(target, settings).await;
    };
    report.ramp = Some(RampReport {
        steps: rows,
        best_rate,
    });
    report
}

/// Raises the rate step by step until the SLO fails, then bisects between the last passing and
/// the first failing rate. The report is that of the highest passing step (or the first step,
/// if none passed), with every step listed under `ramp`.
pub async fn run_ramp(target: Arc<Target>, settings: &Settings, ramp: Ramp) -> Report {
    let mut steps: Vec<Report> = Vec::new();
    let run_at = async |rate: f64, steps: &mut Vec<Report>| -> bool {
        let mut s = settings.clone();
        s.plan.mode = Mode::Open { rate };
        s.plan.duration = ramp.step;
        if s.plan.progress == run::Progress::Line {
            eprintln!("ramp: {rate:.0} tasks/s");
        }
        let report = run_once(target.clone(), &s).await;
        let pass = report.slo.pass;
        steps.push(report);
        pass
    };
    let n = ramp.steps.max(1);
    let mut last_pass: Option<f64> = None;
    let mut first_fail: Option<f64> = None;
    for i in 0..n {
        let rate = ramp.rate_of(i);
        if run_at(rate, &mut steps).await {
            last_pass = Some(rate);
        } else {
            first_fail = Some(rate);
            break;
        }
    }
    if let (Some(mut lo), Some(mut hi)) = (last_pass, first_fail) {
        for _ in 0..ramp.refine {
            let mid = ((lo + hi) / 2.0).round();
            if mid <= lo || mid >= hi {
                break;
            }
            if run_at(mid, &mut steps).await {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let rows: Vec<_> = steps.iter().map(Report::ramp_row).collect();
    let best = steps
        .iter()
        .filter(|r| r.slo.pass)
        .max_by(|a, b| a.tasks.offered_per_s.total_cmp(&b.tasks.offered_per_s));
    let best_rate = best.map(|r| r.tasks.offered_per_s);
    let mut report = best.cloned().unwrap_or_else(|| steps[0].clone());
    report.ramp = Some(RampReport {
        steps: rows,
        best_rate,
    });
    report
}
