//! `troupe-loadtest`: drives load at a Troupe pool and judges it against the SLO.
//!
//! With no arguments: starts the default 928-agent pool in this process, runs the default mix
//! open loop, prints the report and the verdict, exits 1 if an objective failed (2 on a usage or
//! setup error).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use troupe_loadtest::mix::Mix;
use troupe_loadtest::report::{self, Report};
use troupe_loadtest::run::{Mode, Plan, Progress};
use troupe_loadtest::target::Target;
use troupe_loadtest::{Ramp, Settings, html};
use troupe_slo::Policy;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where the SLO policy is looked for when `--slo` is not given.
const DEFAULT_POLICY: &str = "slo/policies.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "troupe-loadtest",
    version,
    about = "Drives open-loop load at a Troupe pool (embedded, or a node over HTTP), reports exact latency percentiles and judges the run against the SLO policy.",
    after_help = "Exit status: 0 when every objective is met, 1 when one failed, 2 on a usage or setup error."
)]
struct Args {
    /// A running node to load (e.g. http://127.0.0.1:9464), or the nodes of a cluster as a
    /// comma-separated list (requests go to them in turn; the report shows each node's
    /// share); without it, an embedded pool.
    #[arg(long, value_name = "URL[,URL...]")]
    target: Option<String>,
    /// Bearer token for the node's API.
    #[arg(long)]
    token: Option<String>,
    /// Pool catalogue for the embedded pool (default: the built-in 928-agent pool).
    #[arg(long, value_name = "FILE", conflicts_with = "target")]
    catalog: Option<PathBuf>,
    /// Workload mix (TOML); default: the built-in mix (loadtest/mix.toml).
    #[arg(long, value_name = "FILE")]
    mix: Option<PathBuf>,
    /// Open loop: tasks per second, whatever the system does.
    #[arg(long, default_value_t = 12_000.0, conflicts_with = "concurrency")]
    rate: f64,
    /// Closed loop instead: this many clients, each sending when its last request ended.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Measured length of the run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before measuring; excluded from the results.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Ramp: find the highest rate meeting the SLO between two rates, e.g. 1000..50000.
    #[arg(long, value_name = "FROM..TO", conflicts_with = "concurrency")]
    ramp: Option<String>,
    /// Sweep: run every step from FROM to TO (`--ramp-steps` of them, `--step` long), past
    /// the knee, and report the overload curve (goodput, p99, refusals per step).
    #[arg(long, value_name = "FROM..TO", conflicts_with = "ramp")]
    sweep: Option<String>,
    /// With --ramp or --sweep: write the curve (offered against goodput and p99) as an SVG
    /// chart.
    #[arg(long, value_name = "FILE")]
    chart: Option<PathBuf>,
    /// Ramp: measured length of each step.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    step: Duration,
    /// Ramp: evenly spaced steps from FROM to TO.
    #[arg(long, default_value_t = 8)]
    ramp_steps: usize,
    /// Ramp: bisections between the last passing and the first failing step.
    #[arg(long, default_value_t = 3)]
    refine: usize,
    /// Bus messages per second (default: the mix's `bus.rate`; 0 turns bus traffic off).
    #[arg(long)]
    bus_rate: Option<f64>,
    /// SLO policy (YAML); default: slo/policies.yaml if present, else the built-in policy.
    #[arg(long, value_name = "FILE")]
    slo: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the report as a self-contained HTML page with charts.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Timeout of tasks whose mix entry sets none.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Most requests outstanding at once; beyond it the generator records `in_flight_limit`.
    #[arg(long, default_value_t = 200_000)]
    max_in_flight: usize,
    /// The embedded pool's workflow history (SQLite), when the mix has `[[workflow]]` entries;
    /// default: a fresh file in the temporary directory, deleted after the run.
    #[arg(long, value_name = "FILE", conflicts_with = "target")]
    workflow_history: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

/// The embedded pool's history file, deleted on drop when the run made it up.
struct History {
    path: PathBuf,
    temporary: bool,
}

impl Drop for History {
    fn drop(&mut self) {
        if self.temporary {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn parse_ramp(s: &str) -> anyhow::Result<(f64, f64)> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("--ramp `{s}`: expected FROM..TO, e.g. 1000..50000"))?;
    let from: f64 = a
        .trim()
        .parse()
        .with_context(|| format!("--ramp: `{a}` is not a rate"))?;
    let to: f64 = b
        .trim()
        .parse()
        .with_context(|| format!("--ramp: `{b}` is not a rate"))?;
    if !(from > 0.0 && to > from) {
        bail!("--ramp {s}: need 0 < FROM < TO");
    }
    Ok((from, to))
}

fn load_policy(arg: Option<&Path>) -> anyhow::Result<(Policy, String)> {
    match arg {
        Some(p) => Ok((
            Policy::from_file(p).with_context(|| format!("--slo {}", p.display()))?,
            p.display().to_string(),
        )),
        None if Path::new(DEFAULT_POLICY).exists() => Ok((
            Policy::from_file(DEFAULT_POLICY).context(DEFAULT_POLICY)?,
            DEFAULT_POLICY.to_owned(),
        )),
        None => Ok((
            report::builtin_policy(),
            "built-in default (p95 ≤ 50 ms, p99 ≤ 100 ms, ≤ 0.1 % bad)".to_owned(),
        )),
    }
}

fn write_reports(args: &Args, r: &Report) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(r).context("serialising the report")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        let page = html::render(r)
            .map_err(anyhow::Error::msg)
            .context("drawing the charts")?;
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        if r.ramp.is_none() {
            bail!("--chart needs --ramp or --sweep");
        }
        let svg = html::sweep_chart(r)
            .map_err(anyhow::Error::msg)
            .context("drawing the curve")?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The soft limit on open files (Linux `/proc/self/limits`), if it can be read.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

async fn real_main(args: Args) -> anyhow::Result<bool> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be above zero, found {}", args.rate);
    }
    if args.concurrency == Some(0) {
        bail!("--concurrency must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be above zero");
    }
    let ramp = args.ramp.as_deref().map(parse_ramp).transpose()?;
    let sweep = args.sweep.as_deref().map(parse_ramp).transpose()?;
    if args.chart.is_some() && ramp.is_none() && sweep.is_none() {
        bail!("--chart draws the curve of a --ramp or a --sweep");
    }
    let mix = match &args.mix {
        Some(p) => Mix::from_file(p).with_context(|| format!("--mix {}", p.display()))?,
        None => Mix::default_mix().context("the built-in mix")?,
    };
    let (policy, policy_source) = load_policy(args.slo.as_deref())?;
    let bus_rate = args
        .bus_rate
        .unwrap_or_else(|| mix.bus.as_ref().map_or(0.0, |b| b.rate));
    if !(bus_rate.is_finite() && bus_rate >= 0.0) {
        bail!("--bus-rate must be zero or more, found {bus_rate}");
    }
    let mode = match args.concurrency {
        Some(concurrency) => Mode::Closed { concurrency },
        None => Mode::Open { rate: args.rate },
    };
    let mut max_in_flight = args.max_in_flight.max(1);
    if args.target.is_some()
        && let Some(fds) = open_files_limit()
    {
        // Over HTTP every request in flight holds a connection, so a file descriptor; tasks
        // and bus messages are bounded apart, so each gets half of what the limit leaves.
        let cap = (fds.saturating_sub(256) / 2).max(1);
        if max_in_flight > cap {
            eprintln!(
                "troupe-loadtest: at most {cap} requests in flight (open files limit {fds}); beyond that a request is counted as rejected `in_flight_limit`, not sent"
            );
            max_in_flight = cap;
        }
    }
    let plan = Plan {
        mode,
        warmup: args.warmup,
        duration: args.duration,
        bus_rate,
        max_in_flight,
        drain: args.request_timeout + Duration::from_secs(10),
        progress: if args.quiet {
            Progress::Quiet
        } else {
            Progress::Line
        },
    };

    let mut runtime = None;
    let mut history = None;
    let target = match &args.target {
        Some(url) => Target::new_http(url, args.token.clone(), &mix, args.request_timeout).await?,
        None => {
            let catalogue = match &args.catalog {
                Some(p) => troupe_agents::Catalogue::from_file(p)
                    .with_context(|| format!("--catalog {}", p.display()))?,
                None => {
                    troupe_agents::Catalogue::default_pool().context("the built-in catalogue")?
                }
            };
            let timings = troupe_workflow::StepTimings::new();
            let mut builder = troupe_agents::builder(&catalogue, troupe::RuntimeConfig::default());
            if mix.has_workflows() {
                builder = builder.observe(timings.clone());
            }
            let rt = builder
                .start()
                .await
                .context("starting the embedded pool")?;
            let engine = if mix.has_workflows() {
                let h = History {
                    temporary: args.workflow_history.is_none(),
                    path: args.workflow_history.clone().unwrap_or_else(|| {
                        std::env::temp_dir()
                            .join(format!("troupe-loadtest-{}.sqlite", std::process::id()))
                    }),
                };
                let engine = troupe_workflow::Engine::open(
                    rt.handle(),
                    timings,
                    troupe_workflow::EngineConfig {
                        history: h.path.clone(),
                        ..troupe_workflow::EngineConfig::default()
                    },
                )
                .await
                .with_context(|| format!("opening the workflow history {}", h.path.display()))?;
                history = Some(h);
                Some(engine)
            } else {
                None
            };
            let t = Target::new_embedded(rt.handle(), engine, &mix, args.request_timeout)?;
            runtime = Some(rt);
            t
        }
    };
    let target = Arc::new(target);
    target.check(&mix).await?;
    if !args.quiet {
        eprintln!(
            "troupe-loadtest: {} | mix `{}` ({} entries) | SLO: {policy_source}",
            target.describe(),
            mix.name,
            mix.entries.len()
        );
    }
    let settings = Settings {
        mix,
        policy,
        policy_source,
        plan,
    };
    let steps = |(from, to): (f64, f64), refine: usize| Ramp {
        from,
        to,
        steps: args.ramp_steps,
        refine,
        step: args.step,
    };
    let report = match (ramp, sweep) {
        (None, Some(range)) => {
            troupe_loadtest::run_sweep(target.clone(), &settings, steps(range, 0)).await
        }
        (Some(range), _) => {
            troupe_loadtest::run_ramp(target.clone(), &settings, steps(range, args.refine)).await
        }
        (None, None) => troupe_loadtest::run_once(target.clone(), &settings).await,
    };
    if let Some(rt) = runtime {
        drop(target);
        rt.shutdown().await;
    }
    drop(history);
    print!("{}", report::render_text(&report));
    write_reports(&args, &report)?;
    Ok(report.slo.pass)
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    match rt.block_on(real_main(args)) {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
