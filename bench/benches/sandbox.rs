//! Tri-sandbox throughput: the same no-op tasks run once, on thread lanes, and on process lanes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use troupe::sandbox::LaneMode;

const WORKER: &str = env!("CARGO_BIN_EXE_troupe-bench-worker");

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut g = c.benchmark_group("sandbox");
    for (name, mode, sandboxed, window) in [
        ("once", LaneMode::Threads, false, 10_000u64),
        ("threads", LaneMode::Threads, true, 10_000),
        ("process", LaneMode::Process, true, 1_000),
    ] {
        let pool = rt.block_on(async {
            troupe_agents::register_kinds(troupe::Runtime::builder(troupe_bench::sandbox_config(
                mode, WORKER,
            )))
            .start()
            .await
            .expect("pool starts")
        });
        let handle = pool.handle();
        g.throughput(Throughput::Elements(window));
        if mode == LaneMode::Process {
            g.sample_size(10);
        }
        g.bench_function(BenchmarkId::new(name, "echo"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                troupe_bench::timed_task_windows(&handle, "echo", window, sandboxed, iters)
            })
        });
        rt.block_on(pool.shutdown());
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
