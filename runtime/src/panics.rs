//! Caught panics, reported once: a process panic hook that knows when a panic happens inside an
//! agent and logs it as one structured tracing event instead of the default stderr message.
//!
//! The runtime catches every panic of an agent's factory, hooks and handlers (the task ends
//! `panic` or is retried, the agent is rebuilt), so the default hook's output — a raw
//! "thread panicked at" line per occurrence, plus a full backtrace under `RUST_BACKTRACE` (whose
//! first capture also loads the binary's debug info: ~100 MB of RSS) — is noise for an expected,
//! handled event. While agent code runs, [`Guarded`] (or [`in_agent`]) marks the thread with the
//! agent and task it works for; the hook installed by [`install`] logs a marked panic as one
//! `ERROR` event with target `troupe::panic` (fields `agent`, `task`, `panic` — the message —, `location`, and a backtrace
//! only when [`install`] was asked for one) and hands every other panic to the hook that was
//! there before. The switches are `telemetry.panic_hook` and `telemetry.panic_backtraces`.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// Nothing is marked.
const NONE: (u32, u64) = (u32::MAX, 0);

thread_local! {
    /// The agent (index) and task id (0 for none) the current thread runs code for.
    static SITE: Cell<(u32, u64)> = const { Cell::new(NONE) };
}

static INSTALL: Once = Once::new();
static BACKTRACES: AtomicBool = AtomicBool::new(false);
static ALL: AtomicBool = AtomicBool::new(false);

/// Installs the hook (once per process; later calls only change `backtraces`).
pub(crate) fn install(backtraces: bool) {
    BACKTRACES.store(backtraces, Ordering::Relaxed);
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let (agent, task) = SITE.with(Cell::get);
            if (agent, task) == NONE && !ALL.load(Ordering::Relaxed) {
                return previous(info);
            }
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(non-string panic payload)");
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            if (agent, task) == NONE {
                // Not an agent's: the process asked for every panic as one line.
                let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
                if BACKTRACES.load(Ordering::Relaxed) {
                    let backtrace = std::backtrace::Backtrace::force_capture().to_string();
                    tracing::error!(target: "troupe::panic", panic = message, location, thread, backtrace, "panic");
                } else {
                    tracing::error!(target: "troupe::panic", panic = message, location, thread, "panic");
                }
                return;
            }
            let task = (task != 0).then_some(task);
            if BACKTRACES.load(Ordering::Relaxed) {
                let backtrace = std::backtrace::Backtrace::force_capture().to_string();
                tracing::error!(
                    target: "troupe::panic",
                    agent, task, panic = message, location, backtrace,
                    "agent panicked (caught)"
                );
            } else {
                tracing::error!(
                    target: "troupe::panic",
                    agent, task, panic = message, location,
                    "agent panicked (caught)"
                );
            }
        }));
    });
}

/// Logs every panic of the process as one structured event (target `troupe::panic`), not only
/// agents': for a service binary that wants no raw panic output at all. Backtraces only with
/// `backtraces`.
pub fn log_all_panics(backtraces: bool) {
    ALL.store(true, Ordering::Relaxed);
    install(backtraces);
}

/// Restores the previous mark when dropped, also while unwinding.
struct Mark((u32, u64));

impl Mark {
    #[inline]
    fn set(agent: u32, task: u64) -> Self {
        Mark(SITE.with(|s| s.replace((agent, task))))
    }
}

impl Drop for Mark {
    #[inline]
    fn drop(&mut self) {
        SITE.with(|s| s.set(self.0));
    }
}

/// Runs `f` marked as agent code of `agent`.
pub(crate) fn in_agent<R>(agent: u32, f: impl FnOnce() -> R) -> R {
    let _mark = Mark::set(agent, 0);
    f()
}

pin_project_lite::pin_project! {
    /// A future whose every poll is marked as agent code (of `agent`, for task `task`, 0 for
    /// none).
    pub(crate) struct Guarded<F> {
        #[pin]
        inner: F,
        agent: u32,
        task: u64,
    }
}

impl<F> Guarded<F> {
    pub(crate) fn new(inner: F, agent: u32, task: u64) -> Self {
        Guarded { inner, agent, task }
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _mark = Mark::set(*this.agent, *this.task);
        this.inner.poll(cx)
    }
}
