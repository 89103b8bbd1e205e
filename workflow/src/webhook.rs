//! Escalation webhooks: every `escalated` event is POSTed as JSON to the URL its workflow names
//! (or the engine's default). Delivery is off the engine's path: events go through a bounded
//! queue to one sender task, in order, each tried up to [`ATTEMPTS`] times; a full queue drops
//! the delivery (counted, logged) rather than slowing a step. The event itself is always in the
//! history, so a lost delivery loses a notification, never a record.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::store::Event;

/// Deliveries waiting at most; past this they are dropped.
pub const QUEUE: usize = 1024;
/// Tries per delivery (the first and two retries).
pub const ATTEMPTS: u32 = 3;
/// How long one try may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after a failed try, by try.
const BACKOFF: [Duration; 2] = [Duration::from_millis(250), Duration::from_secs(1)];

/// Whether `url` is one the escalation webhook can send to (http, or https with the `tls`
/// feature, and a host); the reason when not.
pub fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    match u.scheme() {
        "http" => {}
        "https" if cfg!(feature = "tls") => {}
        "https" => {
            return Err(
                "https needs the `tls` feature of troupe-workflow (off in this build)".into(),
            );
        }
        other => return Err(format!("scheme `{other}`: only http and https are sent to")),
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

/// The JSON body of one delivery.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Escalation {
    /// Always `escalated`: lets one receiver tell these from other hooks.
    pub(crate) event: &'static str,
    pub(crate) workflow: String,
    pub(crate) execution: u64,
    /// The step, or none for the execution's own deadline.
    pub(crate) step: Option<String>,
    pub(crate) detail: Option<String>,
    pub(crate) seq: u64,
    pub(crate) at_ms: u64,
    pub(crate) elapsed_ms: u64,
}

impl Escalation {
    pub(crate) fn of(workflow: &str, e: &Event) -> Self {
        Escalation {
            event: "escalated",
            workflow: workflow.to_owned(),
            execution: e.execution,
            step: e.step.clone(),
            detail: e.detail.clone(),
            seq: e.seq,
            at_ms: e.at_ms,
            elapsed_ms: e.elapsed_ms,
        }
    }
}

/// Delivered, failed after every try, dropped on a full queue.
#[derive(Default)]
struct Counters {
    handles: OnceLock<[Counter; 3]>,
}

impl Counters {
    fn count(&self, i: usize) {
        if let Some(h) = self.handles.get() {
            h[i].increment(1);
        }
    }
}

const DELIVERED: usize = 0;
const FAILED: usize = 1;
const DROPPED: usize = 2;

/// The engine's end of the delivery queue.
pub(crate) struct Webhooks {
    tx: mpsc::Sender<(Arc<str>, Escalation)>,
    counters: Arc<Counters>,
}

impl Webhooks {
    /// Starts the sender task.
    pub(crate) fn start() -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("troupe-workflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("the webhook client: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        tokio::spawn(deliver(client, rx, counters.clone()));
        Ok(Webhooks { tx, counters })
    }

    /// Resolves the delivery counters on `exporter`.
    pub(crate) fn export_to(&self, exporter: &troupe::MetricsExporter) {
        let _ = self.counters.handles.set(["delivered", "failed", "dropped"].map(|r| {
            exporter.counter(
                "troupe_workflow_webhook_deliveries_total",
                "Escalation webhook deliveries, by result (delivered, failed after every try, dropped on a full queue).",
                &[("result", r.to_owned())],
            )
        }));
    }

    /// Queues one delivery; never waits.
    pub(crate) fn send(&self, url: Arc<str>, escalation: Escalation) {
        if let Err(e) = self.tx.try_send((url, escalation)) {
            self.counters.count(DROPPED);
            let (url, esc) = match e {
                mpsc::error::TrySendError::Full(x) | mpsc::error::TrySendError::Closed(x) => x,
            };
            tracing::warn!(%url, execution = esc.execution, "escalation webhook queue full ({QUEUE}): delivery dropped");
        }
    }
}

async fn deliver(
    client: reqwest::Client,
    mut rx: mpsc::Receiver<(Arc<str>, Escalation)>,
    counters: Arc<Counters>,
) {
    while let Some((url, esc)) = rx.recv().await {
        let body = match serde_json::to_vec(&esc) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "escalation webhook: cannot encode the event");
                counters.count(FAILED);
                continue;
            }
        };
        let mut last = String::new();
        let mut delivered = false;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(BACKOFF[(attempt as usize - 1).min(BACKOFF.len() - 1)]).await;
            }
            let sent = client
                .post(&*url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => last = format!("answered {}", r.status()),
                Err(e) => last = e.to_string(),
            }
        }
        if delivered {
            counters.count(DELIVERED);
        } else {
            counters.count(FAILED);
            tracing::warn!(%url, execution = esc.execution, step = ?esc.step, error = %last,
                "escalation webhook failed after {ATTEMPTS} tries");
        }
    }
}
