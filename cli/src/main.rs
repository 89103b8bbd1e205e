//! `troupe`: run a node (a 928-agent pool behind an HTTP API), inspect the pool catalogue,
//! check a config.

mod admission;
mod clustered;
mod config;
mod listen;
mod server;
mod slo;
mod store;
mod workflow_run;
mod workflows;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, NodeConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "troupe",
    version,
    about = "An actor runtime for pools of agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the pool and the HTTP API (metrics, health, stats, tasks, messages, agents).
    Serve {
        /// Node config (TOML); defaults apply without one.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding `http.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Print the pool (tiers, kinds, counts) and validate its catalogue.
    Pool {
        /// Catalogue file; the default 928-agent pool when absent.
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Validate a node config (and its catalogue); exit non-zero with the error.
    Check {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Service level objectives: generate Prometheus rules from the policy.
    Slo {
        #[command(subcommand)]
        command: SloCommand,
    },
    /// Workflows on a running node.
    Workflow {
        #[command(subcommand)]
        command: WorkflowCommand,
    },
    /// Run as a sandbox worker process (started by the node for process lanes).
    #[command(hide = true)]
    SandboxWorker,
}

#[derive(Debug, Subcommand)]
enum WorkflowCommand {
    /// Register FILE (TOML, YAML or JSON) with the node, run it once with --input, show each
    /// step's progress live and the table of step timings; exit 0 if it succeeded.
    Run {
        /// The workflow definition.
        file: PathBuf,
        /// The execution's input.
        #[arg(long, default_value = "")]
        input: String,
        /// The node.
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        node: String,
        /// Bearer token for the node's API.
        #[arg(long)]
        token: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SloCommand {
    /// Write recording rules (slo/rules.yaml) and burn-rate alerts (alerts/slo.yaml) from the
    /// policy; with --check, only verify that both files are current.
    Rules {
        /// The SLO policy.
        #[arg(long, default_value = "slo/policies.yaml")]
        policy: PathBuf,
        /// Where the recording rules go.
        #[arg(long, default_value = "slo/rules.yaml")]
        rules_out: PathBuf,
        /// Where the alerts go.
        #[arg(long, default_value = "alerts/slo.yaml")]
        alerts_out: PathBuf,
        /// Write nothing; fail if either file differs from what the policy generates.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::SandboxWorker => troupe::sandbox::worker_main(troupe_agents::register_kinds(
            troupe::RuntimeBuilder::new(troupe::RuntimeConfig::default()),
        )),
        Command::Pool { catalog } => report(pool(catalog)),
        Command::Slo {
            command:
                SloCommand::Rules {
                    policy,
                    rules_out,
                    alerts_out,
                    check,
                },
        } => report(slo_rules(&policy, &rules_out, &alerts_out, check)),
        Command::Check { config } => report(check(config)),
        Command::Serve { config, listen } => report(serve(config, listen)),
        Command::Workflow {
            command:
                WorkflowCommand::Run {
                    file,
                    input,
                    node,
                    token,
                },
        } => match workflow_run::run(&file, &input, &node, token) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("troupe: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("troupe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn slo_rules(
    policy: &std::path::Path,
    rules_out: &std::path::Path,
    alerts_out: &std::path::Path,
    check: bool,
) -> anyhow::Result<()> {
    let p = troupe_slo::Policy::from_file(policy)
        .with_context(|| format!("SLO policy {}", policy.display()))?;
    let files = [
        (rules_out, slo::recording_rules(&p)),
        (alerts_out, slo::alert_rules(&p)),
    ];
    for (path, text) in files {
        if check {
            let current = std::fs::read_to_string(path).unwrap_or_default();
            if current != text {
                bail!(
                    "{} is not what {} generates; run `troupe slo rules`",
                    path.display(),
                    policy.display()
                );
            }
            println!("{} is current", path.display());
        } else {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn pool(catalog: Option<PathBuf>) -> anyhow::Result<()> {
    let (name, catalogue) = match &catalog {
        Some(p) => (
            p.display().to_string(),
            troupe_agents::Catalogue::from_file(p)?,
        ),
        None => (
            "default".to_owned(),
            troupe_agents::Catalogue::default_pool()?,
        ),
    };
    println!(
        "pool {name}: {} agents of {} allowed, {} tiers",
        catalogue.total_agents(),
        catalogue.max_agents,
        catalogue.tiers.len()
    );
    println!(
        "{:<14} {:<13} {:<10} {:>6}  agents",
        "tier", "strategy", "restart", "count"
    );
    for t in &catalogue.tiers {
        let count: usize = t.agents.iter().map(|a| a.count).sum();
        let groups: Vec<String> = t
            .agents
            .iter()
            .map(|a| {
                let caps = if a.capabilities.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", a.capabilities.join(", "))
                };
                format!("{}×{}{}", a.count, a.kind, caps)
            })
            .collect();
        println!(
            "{:<14} {:<13} {:<10} {:>6}  {}",
            t.name,
            t.strategy.as_str(),
            t.restart.as_str(),
            count,
            groups.join(", ")
        );
    }
    Ok(())
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let origin = path.display().to_string();
    let resolved = NodeConfig::load(&path)?.resolve(&origin)?;
    println!(
        "{origin}: ok ({} agents in {} tiers, listening on {})",
        resolved.runtime.total_agents(),
        resolved.runtime.tiers.len(),
        resolved.node.http.listen
    );
    Ok(())
}

/// Installs logging (stderr, plain or JSON, level from RUST_LOG / LOG_LEVEL / config) and,
/// with the `otel` feature and an endpoint, span export over OTLP. Returns the tracer provider
/// to flush at exit.
fn init_telemetry(node: &NodeConfig) -> anyhow::Result<Option<Otel>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| {
            std::env::var("LOG_LEVEL")
                .ok()
                .and_then(|l| EnvFilter::try_new(l).ok())
        })
        .unwrap_or_else(|| EnvFilter::new(node.log.level.as_deref().unwrap_or("info")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match node.log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Plain => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (otel_layer, otel) = otel_layer(node)?;
    let mut layers: Vec<BoxedLayer> = vec![fmt.with_filter(filter).boxed()];
    layers.extend(otel_layer);
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(otel)
}

#[cfg(feature = "otel")]
type Otel = opentelemetry_sdk::trace::SdkTracerProvider;
#[cfg(not(feature = "otel"))]
type Otel = ();

type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

#[cfg(feature = "otel")]
fn otel_layer(node: &NodeConfig) -> anyhow::Result<(Option<BoxedLayer>, Option<Otel>)> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use tracing_subscriber::Layer;
    let Some(endpoint) = node.tracing.otlp_endpoint.clone() else {
        return Ok((None, None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .build()
        .with_context(|| format!("building the OTLP exporter for {endpoint}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(node.tracing.service_name.clone())
                .build(),
        )
        .build();
    let filter = EnvFilter::try_new(&node.tracing.filter)
        .with_context(|| format!("tracing.filter `{}`", node.tracing.filter))?;
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("troupe"))
        .with_filter(filter)
        .boxed();
    Ok((Some(layer), Some(provider)))
}

#[cfg(not(feature = "otel"))]
fn otel_layer(_: &NodeConfig) -> anyhow::Result<(Option<BoxedLayer>, Option<Otel>)> {
    Ok((None, None))
}

fn serve(config: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let (node, origin) = match &config {
        Some(p) => (NodeConfig::load(p)?, p.display().to_string()),
        None => (NodeConfig::default(), "defaults".to_owned()),
    };
    let mut resolved = node.resolve(&origin)?;
    if let Some(addr) = listen {
        resolved.node.http.listen = addr;
    }
    let otel = init_telemetry(&resolved.node)?;
    let http = resolved.node.http.clone();
    if http.token.is_none() && !http.listen.ip().is_loopback() && !http.allow_non_loopback {
        bail!(
            "refusing to listen on {} without `http.token`: the API would be open to the \
             network (set a token, or `http.allow_non_loopback = true`)",
            http.listen
        );
    }
    // Every connection is a file descriptor: take what the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_files = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let threads = resolved.node.threads.clone();
    let backtraces = resolved.node.log.panic_backtraces;
    resolved.runtime.telemetry.panic_hook = true;
    resolved.runtime.telemetry.panic_backtraces = backtraces;
    // Every panic of the node is one structured line (agents' carry their agent and task).
    troupe::log_all_panics(backtraces);
    // Two runtimes: the agents' workers, and a control plane (HTTP, signals, the watchdog,
    // shutdown) that answers whatever the agents do to their threads.
    let mut agents = tokio::runtime::Builder::new_multi_thread();
    agents.enable_all().thread_name("troupe-agent");
    if let Some(n) = threads.agents {
        agents.worker_threads(n);
    }
    let agents = agents.build().context("building the agents' runtime")?;
    let control = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("troupe-control")
        .worker_threads(threads.control.unwrap_or(1))
        .build()
        .context("building the control runtime")?;
    let default_timeout = resolved.runtime.tasks.default_timeout;
    let mut builder = troupe_agents::register_kinds(troupe::Runtime::builder(resolved.runtime))
        .control_runtime(control.handle().clone());
    // The cluster's work (NATS, pulling, recording outcomes) runs on the control runtime too,
    // so agents that block their threads cannot stop a node from keeping its tasks alive.
    let cluster = match &resolved.node.cluster {
        Some(c) => {
            let cluster = control
                .block_on(troupe_cluster::Cluster::connect(c.clone()))
                .with_context(|| format!("joining cluster `{}` at {}", c.name, c.urls.join(",")))?;
            builder = builder.bus_bridge(control.block_on(async { cluster.bridge() }));
            Some(cluster)
        }
        None => None,
    };
    // The workflow engine times its steps from the runtime's task events.
    let timings = troupe_workflow::StepTimings::new();
    if resolved.node.workflows.is_some() {
        builder = builder.observe(timings.clone());
    }
    let runtime = agents
        .block_on(builder.start())
        .context("starting the pool")?;
    let workflows = resolved.node.workflows.clone();
    let result = control.block_on(async move {
        let state =
            server::AppState::new(runtime.handle(), &http, cluster.clone(), default_timeout);
        if let Some(w) = &workflows {
            let engine = troupe_workflow::Engine::open(runtime.handle(), timings, w.engine())
                .await
                .with_context(|| format!("opening the workflow history {}", w.history.display()))?;
            engine.export_to(state.shared_exporter());
            for file in &w.definitions {
                let def = troupe_workflow::Workflow::from_file(file)
                    .and_then(|d| engine.register(d))
                    .with_context(|| format!("workflow definition {}", file.display()));
                def?;
            }
            let resumed = engine.resume().await.context("resuming workflow executions")?;
            if !resumed.is_empty() {
                tracing::info!(executions = ?resumed, "resumed workflow executions (their running steps run again)");
            }
            state.set_workflows(engine);
        }
        if let Some(c) = &cluster {
            c.join(runtime.handle(), Some(state.exporter()))
                .await
                .context("joining the cluster")?;
            tracing::info!(node = c.node(), cluster = c.config().name, "joined the cluster");
        }
        tokio::spawn(
            state
                .admission()
                .clone()
                .control(runtime.queue_wait_window(None)),
        );
        let app = server::router(state.clone());
        let listener = tokio::net::TcpListener::bind(http.listen)
            .await
            .with_context(|| format!("binding {}", http.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, agents = runtime.agent_count(), "troupe node ready");
        // Tests and scripts read the address from the first line of standard output.
        println!("listening on http://{addr}");

        let conn_metrics = listen::ConnMetrics {
            open: state.exporter().gauge(
                "troupe_http_connections",
                "HTTP connections open.",
                &[],
            ),
            refused: state.exporter().counter(
                "troupe_http_connections_refused_total",
                "HTTP connections refused at http.max_connections.",
                &[],
            ),
        };
        let limits = listen::Limits {
            max_connections: http.max_connections,
            header_read_timeout: http.header_read_timeout,
            idle_timeout: http.idle_timeout,
        };
        let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(listen::serve(
            listener,
            app,
            limits,
            conn_metrics,
            async {
                let _ = http_stopped.await;
            },
            Duration::from_secs(2),
        ));
        shutdown_signal().await;
        tracing::info!("signal received: draining");
        // In a cluster, stop pulling first: what was pulled but not started goes back to the
        // stream at once, for the other nodes.
        if let Some(c) = &cluster {
            c.stop_pulling();
        }
        // Shut the pool down (the API stays up: waiting requests get their outcomes, new work
        // is refused with 503), then keep answering reads until every record is final and a
        // little longer, so clients polling their tasks see how they ended.
        let report = runtime.shutdown().await;
        if let Some(c) = &cluster {
            // Records the outcomes of what ran, then withdraws this node's heartbeat.
            c.leave().await;
        }
        let settle_until = std::time::Instant::now() + Duration::from_secs(5);
        while state.store().pending() > 0 && std::time::Instant::now() < settle_until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(http.shutdown_grace).await;
        let _ = stop_http.send(());
        server
            .await
            .context("HTTP server task")?
            .context("HTTP server")?;
        tracing::info!(
            outstanding = report.outstanding,
            admitted = report.admitted,
            drained = report.drained,
            cancelled = report.cancelled,
            abandoned = report.abandoned,
            agents_left_running = report.agents_left_running,
            "troupe node stopped"
        );
        println!(
            "stopped: drained {} cancelled {} abandoned {} (of {} outstanding + {} admitted during the drain)",
            report.drained, report.cancelled, report.abandoned, report.outstanding, report.admitted
        );
        Ok::<(), anyhow::Error>(())
    });
    // Agents whose handlers never gave their threads back are left behind, not waited for.
    agents.shutdown_background();
    control.shutdown_background();
    result?;
    flush(otel);
    Ok(())
}

/// Exports the spans still buffered.
#[cfg(feature = "otel")]
fn flush(otel: Option<Otel>) {
    if let Some(provider) = otel {
        if let Err(e) = provider.shutdown() {
            eprintln!("troupe: flushing spans: {e}");
        }
    }
}

#[cfg(not(feature = "otel"))]
fn flush(_: Option<Otel>) {}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
