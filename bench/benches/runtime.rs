//! Troupe's own benchmarks: bus throughput across 928 agents (direct and publish), no-op tasks
//! submit → outcome, and pool start-up. Figures and how to read them: bench/README.md.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use troupe::AgentId;
use troupe_bench::{FIN, start, timed_direct_bursts, timed_task_windows};

const AGENTS: usize = 928;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn bus(c: &mut Criterion) {
    let rt = runtime();
    let pool = rt.block_on(start(AGENTS));
    let bus = pool.runtime.bus();
    let payload = Bytes::from_static(b"m");
    let fin = Bytes::from_static(FIN);

    // Direct: `per_agent` messages to each of the 928 agents, then a fin to each.
    let per_agent = 64u64;
    let mut g = c.benchmark_group("bus");
    g.throughput(Throughput::Elements(per_agent * AGENTS as u64));
    g.bench_function(BenchmarkId::new("direct", AGENTS), |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed_direct_bursts(&bus, &pool, AGENTS as u32, per_agent, iters))
    });

    // Publish: one topic, 928 subscribers, `per_agent` publications then a fin.
    let topic = bus.topic("bench").expect("topic");
    for a in 0..AGENTS as u32 {
        bus.subscribe("bench", AgentId(a)).expect("subscribe");
    }
    g.bench_function(BenchmarkId::new("publish", AGENTS), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (topic, payload, fin, pool) = (&topic, &payload, &fin, &pool);
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..per_agent {
                        // Retry until every subscriber took it, so each iteration delivers the
                        // same number of messages.
                        let mut report = topic.try_publish(payload.clone()).expect("publish");
                        while report.dropped > 0 {
                            tokio::task::yield_now().await;
                            report = topic.try_publish(payload.clone()).expect("publish");
                        }
                    }
                    topic.publish(fin.clone()).await.expect("publish fin");
                    pool.wait_done(AGENTS as u64).await;
                }
                start.elapsed()
            }
        })
    });
    g.finish();
    let runtime = pool.runtime;
    rt.block_on(runtime.shutdown());
}

fn tasks(c: &mut Criterion) {
    let rt = runtime();
    let pool = rt.block_on(start(AGENTS));
    let handle = pool.runtime.handle();
    let window = 10_000u64;
    let mut g = c.benchmark_group("tasks");
    g.throughput(Throughput::Elements(window));
    g.bench_function(BenchmarkId::new("noop_submit_to_outcome", AGENTS), |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed_task_windows(&handle, "noop", window, false, iters))
    });
    g.finish();
    rt.block_on(pool.runtime.shutdown());
}

fn startup(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("startup");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function(BenchmarkId::new("pool_ready", AGENTS), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let pool = start_pool().await;
                total += start.elapsed();
                pool.runtime.shutdown().await;
            }
            total
        })
    });
    g.finish();
}

async fn start_pool() -> troupe_bench::Pool {
    start(AGENTS).await
}

/// The same task and bus workloads with latency telemetry on (the default) and off.
fn telemetry(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("telemetry");
    for on in [true, false] {
        let label = if on { "on" } else { "off" };
        let pool = rt.block_on(troupe_bench::start_with(AGENTS, |c| {
            c.telemetry.latency_histograms = on;
        }));
        let handle = pool.runtime.handle();
        let window = 10_000u64;
        g.throughput(Throughput::Elements(window));
        g.bench_function(BenchmarkId::new("tasks", label), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| timed_task_windows(&handle, "noop", window, false, iters))
        });
        let bus = pool.runtime.bus();
        let per_agent = 64u64;
        g.throughput(Throughput::Elements(per_agent * AGENTS as u64));
        g.bench_function(BenchmarkId::new("bus_direct", label), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                timed_direct_bursts(&bus, &pool, AGENTS as u32, per_agent, iters)
            })
        });
        rt.block_on(pool.runtime.shutdown());
    }
    g.finish();
}

criterion_group!(benches, bus, tasks, startup, telemetry);
criterion_main!(benches);
