//! Which fan-out rounds are slow: 928 agents, `Bus::request_all` per round, and the rounds at
//! or over the p99 counted by their index modulo 31 (a mailbox segment's block size, the cause
//! of a periodic tail this found): `cargo run --release -p troupe-bench --example fan_trace`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};
fn main() {
    let rounds: usize = troupe_bench::arg(1, 3100);
    let lat = troupe_bench::peers::on_worker(async move {
        let pool = troupe_bench::peers::troupe::start(928, true, |_| {}).await;
        let bus = pool.runtime.bus();
        let p = bytes::Bytes::from_static(b"q");
        let mut v = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let r = bus
                .request_all("sink", p.clone(), Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(r.replied(), 928);
            v.push(t.elapsed().as_micros() as u64);
        }
        pool.runtime.shutdown().await;
        v
    });
    let mut s = lat.clone();
    s.sort();
    let p50 = s[s.len() / 2];
    let p99 = s[s.len() * 99 / 100];
    println!("p50 {p50} p99 {p99}");
    let mut by = [0u32; 31];
    let mut n = 0;
    for (i, &l) in lat.iter().enumerate() {
        if l >= p99 {
            by[i % 31] += 1;
            n += 1;
        }
    }
    println!("rounds >= p99: {n}; by round mod 31: {by:?}");
}
