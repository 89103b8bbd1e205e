//! Driving load: open loop at a constant arrival rate, closed loop at a fixed concurrency, and
//! the ramp that looks for the highest rate still meeting the SLO.
//!
//! The open-loop generator is an OS thread of its own, not a Tokio task: it keeps the schedule
//! (request `i` is due at `start + i / rate`) with `thread::sleep`, whose slack is tens of
//! microseconds, where a Tokio timer rounds to a millisecond. It never waits for a request; if
//! it falls behind it sends what is due at once, each request keeping its scheduled time, so
//! the lateness shows up in the latency rather than being hidden (no coordinated omission).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mix::{Mix, Picker};
use crate::record::{self, BusCounters, Measured, Recorder, Window};
use crate::target::{BusResult, Sink, Target};

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// A constant arrival rate, tasks per second, whatever the system does.
    Open {
        /// Tasks per second.
        rate: f64,
    },
    /// `concurrency` clients, each sending its next request when the last one ends.
    Closed {
        /// Clients.
        concurrency: usize,
    },
}

/// Live progress output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// None.
    Quiet,
    /// One line a second on stderr (rewritten in place on a terminal).
    Line,
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Arrival model.
    pub mode: Mode,
    /// Load before measurement starts; excluded from results.
    pub warmup: Duration,
    /// Measured load.
    pub duration: Duration,
    /// Bus messages per second (overrides the mix; 0 turns bus traffic off).
    pub bus_rate: f64,
    /// The generator's own bound on requests outstanding.
    pub max_in_flight: usize,
    /// How long to wait after the last request for outstanding ones to end.
    pub drain: Duration,
    /// Progress output.
    pub progress: Progress,
}

/// Bus traffic measured in the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusMeasured {
    /// Scheduled in the window.
    pub offered: u64,
    /// Accepted by the bus.
    pub accepted: u64,
    /// Mailbox deliveries.
    pub delivered: u64,
    /// Deliveries dropped (mailbox full).
    pub dropped: u64,
    /// Refused outright.
    pub failed: u64,
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Tasks.
    pub measured: Measured,
    /// Bus.
    pub bus: BusMeasured,
    /// Length of the measured window.
    pub window: Duration,
    /// Requests still outstanding when the drain gave up (counted as not finished: should be 0).
    pub unfinished: usize,
}

/// Runs `plan` against `target`.
pub async fn run(target: Arc<Target>, mix: &Mix, plan: &Plan) -> RunOutput {
    // A short lead so the first slot is not already late when the threads start.
    let start = Instant::now() + Duration::from_millis(20);
    let window = Window {
        from_ns: plan.warmup.as_nanos() as u64,
        to_ns: (plan.warmup + plan.duration).as_nanos() as u64,
    };
    let end = start + plan.warmup + plan.duration;
    let (tx, rx) = mpsc::channel(1 << 16);
    let sink = Sink {
        tx,
        start,
        in_flight: Arc::new(AtomicUsize::new(0)),
        max_in_flight: plan.max_in_flight,
        rt: tokio::runtime::Handle::current(),
    };
    let bus_counters = BusCounters::shared();
    let recorder = Recorder::new(
        mix.entries.iter().map(|e| e.priority).collect(),
        target.nodes().len(),
        window,
    );
    let stop = CancellationToken::new();
    let recording = tokio::spawn(record_loop(
        rx,
        recorder,
        stop.clone(),
        ProgressState {
            progress: plan.progress,
            start,
            window,
            in_flight: sink.in_flight.clone(),
            bus: bus_counters.clone(),
        },
    ));

    // Bus messages in flight (HTTP sends) are counted apart from tasks: `unfinished` is about
    // tasks, and the bus figures are read only once its own sends have ended.
    let bus_in_flight = Arc::new(AtomicUsize::new(0));
    let bus_thread = mix.bus.as_ref().filter(|_| plan.bus_rate > 0.0).map(|b| {
        let target = target.clone();
        let counters = bus_counters.clone();
        let (rate, share) = (plan.bus_rate, b.publish_share);
        let (rt, in_flight, max) = (sink.rt.clone(), bus_in_flight.clone(), plan.max_in_flight);
        std::thread::Builder::new()
            .name("loadgen-bus".into())
            .spawn(move || {
                bus_loop(
                    target, rate, share, start, end, window, counters, rt, in_flight, max,
                )
            })
    });

    match plan.mode {
        Mode::Open { rate } => {
            let (target, sink, mix) = (target.clone(), sink.clone(), mix.clone());
            let gen_thread = std::thread::Builder::new()
                .name("loadgen-tasks".into())
                .spawn(move || open_loop(&target, &mix, rate, end, &sink));
            if let Ok(h) = gen_thread {
                let _ = tokio::task::spawn_blocking(move || h.join()).await;
            }
        }
        Mode::Closed { concurrency } => {
            let mut clients = Vec::with_capacity(concurrency);
            for c in 0..concurrency {
                let (target, sink) = (target.clone(), sink.clone());
                let mut picker = Picker::new(mix);
                // Clients start at different points of the rotation so the first requests of
                // all of them are not the same entry.
                for _ in 0..c % mix.entries.len().max(1) {
                    picker.next_index();
                }
                clients.push(tokio::spawn(async move {
                    tokio::time::sleep_until(start.into()).await;
                    while Instant::now() < end {
                        let entry = picker.next_index();
                        let intended_ns = sink.now_ns();
                        sink.in_flight.fetch_add(1, Ordering::Relaxed);
                        let (class, node) = target.call_at(entry).await;
                        sink.in_flight.fetch_sub(1, Ordering::Relaxed);
                        let done_ns = sink.now_ns();
                        let s = record::Sample {
                            entry: entry as u32,
                            intended_ns,
                            done_ns,
                            class,
                            node,
                        };
                        let _ = sink.tx.send(s).await;
                    }
                }));
            }
            for c in clients {
                let _ = c.await;
            }
        }
    }
    if let Some(Ok(h)) = bus_thread {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    let bus_drained = tokio::time::timeout(plan.drain, async {
        while bus_in_flight.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let _ = bus_drained.await;
    // Outstanding requests hold clones of the sender; the recorder ends when the last is done.
    let in_flight = sink.in_flight.clone();
    drop(sink);
    let mut recording = recording;
    let measured = match tokio::time::timeout(plan.drain, &mut recording).await {
        Ok(m) => m,
        Err(_) => {
            // The drain gave up: report what arrived; `unfinished` says what did not.
            stop.cancel();
            recording.await
        }
    };
    let unfinished = in_flight.load(Ordering::Relaxed);
    // The recorder task only ends by returning; a panic in it is a bug worth surfacing.
    let measured = measured.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    RunOutput {
        measured,
        bus: BusMeasured {
            offered: record::load(&bus_counters.offered),
            accepted: record::load(&bus_counters.accepted),
            delivered: record::load(&bus_counters.delivered),
            dropped: record::load(&bus_counters.dropped),
            failed: record::load(&bus_counters.failed),
        },
        window: plan.duration,
        unfinished,
    }
}

/// Sleeps until `start + ns`, or not at all if that has passed.
fn sleep_until(start: Instant, ns: u64) {
    let at = start + Duration::from_nanos(ns);
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

fn open_loop(target: &Arc<Target>, mix: &Mix, rate: f64, end: Instant, sink: &Sink) {
    let mut picker = Picker::new(mix);
    let total = ((end - sink.start).as_secs_f64() * rate).floor() as u64;
    let period_ns = 1e9 / rate;
    let mut i = 0u64;
    while i < total {
        let due_ns = (i as f64 * period_ns) as u64;
        sleep_until(sink.start, due_ns);
        // Send everything due by now, each with its own scheduled time.
        let now_ns = sink.now_ns();
        while i < total {
            let intended_ns = (i as f64 * period_ns) as u64;
            if intended_ns > now_ns {
                break;
            }
            target.issue(picker.next_index(), intended_ns, sink);
            i += 1;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn bus_loop(
    target: Arc<Target>,
    rate: f64,
    publish_share: f64,
    start: Instant,
    end: Instant,
    window: Window,
    counters: Arc<BusCounters>,
    rt: tokio::runtime::Handle,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
) {
    let agents = target.agents().max(1);
    let total = ((end - start).as_secs_f64() * rate).floor() as u64;
    let period_ns = 1e9 / rate;
    let (mut i, mut next_agent, mut publish_acc) = (0u64, 0u32, 0.0f64);
    let in_window = move |ns: u64| (window.from_ns..window.to_ns).contains(&ns);
    // Against a node, the messages due at each tick go out as one batch request.
    let batching = target.batches_bus();
    let mut batch: Vec<(bool, u32, bool)> = Vec::new();
    let record = |c: &BusCounters, sent_in_window: bool, r: BusResult| {
        if !sent_in_window {
            return;
        }
        match r {
            BusResult::Accepted { delivered, dropped } => {
                c.accepted.fetch_add(1, Ordering::Relaxed);
                c.delivered.fetch_add(delivered, Ordering::Relaxed);
                c.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
            BusResult::Failed => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let flush = |batch: &mut Vec<(bool, u32, bool)>| {
        if batch.is_empty() {
            return;
        }
        let items: Vec<(bool, u32)> = batch.iter().map(|&(p, t, _)| (p, t)).collect();
        let windows: Vec<bool> = batch.iter().map(|&(_, _, w)| w).collect();
        batch.clear();
        let (c, flight) = (counters.clone(), in_flight.clone());
        // In flight counts messages, so the bound keeps the node's backlog bounded too.
        flight.fetch_add(items.len(), Ordering::Relaxed);
        target.send_messages(items, &rt, move |results| {
            flight.fetch_sub(windows.len(), Ordering::Relaxed);
            for (r, w) in results.into_iter().zip(windows) {
                record(&c, w, r);
            }
        });
    };
    while i < total {
        sleep_until(start, (i as f64 * period_ns) as u64);
        let now_ns = Instant::now().saturating_duration_since(start).as_nanos() as u64;
        while i < total {
            let intended_ns = (i as f64 * period_ns) as u64;
            if intended_ns > now_ns {
                break;
            }
            i += 1;
            publish_acc += publish_share;
            let publish = publish_acc >= 1.0;
            if publish {
                publish_acc -= 1.0;
            }
            let to = next_agent;
            next_agent = (next_agent + 1) % agents;
            // Offered counts by schedule; accepted by when it was really sent, so a generator
            // that falls behind cannot make the bus look faster than it was.
            let counted = in_window(intended_ns);
            let sent_in_window = in_window(now_ns);
            if counted {
                counters.offered.fetch_add(1, Ordering::Relaxed);
            }
            counters.sent_all.fetch_add(1, Ordering::Relaxed);
            if in_flight.load(Ordering::Relaxed) >= max_in_flight {
                if counted {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            if batching {
                batch.push((publish, to, sent_in_window));
                if batch.len() >= MAX_BUS_BATCH {
                    flush(&mut batch);
                }
                continue;
            }
            let c = counters.clone();
            let flight = in_flight.clone();
            flight.fetch_add(1, Ordering::Relaxed);
            target.send_message(publish, to, &rt, move |r| {
                flight.fetch_sub(1, Ordering::Relaxed);
                record(&c, sent_in_window, r);
            });
        }
        flush(&mut batch);
    }
}

/// Most bus messages in one batch request to a node.
const MAX_BUS_BATCH: usize = 1000;

struct ProgressState {
    progress: Progress,
    start: Instant,
    window: Window,
    in_flight: Arc<AtomicUsize>,
    bus: Arc<BusCounters>,
}

async fn record_loop(
    mut rx: mpsc::Receiver<record::Sample>,
    mut recorder: Recorder,
    stop: CancellationToken,
    p: ProgressState,
) -> Measured {
    let mut tick = tokio::time::interval_at(
        (p.start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let tty = std::io::stderr().is_terminal();
    let mut last_bus = 0;
    let mut printed = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            s = rx.recv() => match s {
                Some(s) => recorder.record(&s),
                None => break,
            },
            _ = tick.tick(), if p.progress == Progress::Line => {
                let elapsed = Instant::now().saturating_duration_since(p.start);
                let sec = elapsed.as_secs().saturating_sub(1) as usize;
                let (completed, p99_sec) = recorder.second(sec).unwrap_or((0, 0.0));
                let (_, bad, rejected) = recorder.progress();
                let bus_now = record::load(&p.bus.sent_all);
                let total_s = p.window.to_ns as f64 / 1e9;
                let phase = if (elapsed.as_nanos() as u64) < p.window.from_ns { "warm-up" } else { "measuring" };
                let left = (total_s - elapsed.as_secs_f64()).max(0.0);
                let line = format!(
                    "[{:>5.1}s left, {phase:>9}] {completed:>7} tasks/s  p99 {p99_sec:>8.3} ms (so far {:>8.3})  bad {bad}  rejected {rejected}  in flight {}  bus {} msg/s",
                    left,
                    recorder.p99_so_far(),
                    p.in_flight.load(Ordering::Relaxed),
                    bus_now - last_bus,
                );
                last_bus = bus_now;
                let mut err = std::io::stderr().lock();
                let _ = if tty { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
                let _ = err.flush();
                printed = true;
            }
        }
    }
    if printed && tty {
        let _ = writeln!(std::io::stderr());
    }
    recorder.finish()
}

/// One step of a ramp.
#[derive(Debug, Clone)]
pub struct RampStep {
    /// Offered rate, tasks per second.
    pub rate: f64,
    /// The step's run.
    pub output: RunOutput,
}
