//! Start-up time of one system, outside the suite, many times in one process, for a quick
//! before/after of a start-up change:
//! `cargo run --release -p troupe-bench --example spawn_loop -- [agents] [iterations] [system]`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(928);
    let iters: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let who = std::env::args().nth(3).unwrap_or_else(|| "troupe".into());
    let mut v = Vec::new();
    for _ in 0..iters {
        v.push(
            match who.as_str() {
                "actix" => troupe_bench::peers::actix::spawn(n),
                "kameo" => troupe_bench::peers::kameo::spawn(n),
                "ractor" => troupe_bench::peers::ractor::spawn(n),
                _ => troupe_bench::peers::troupe::spawn(n, true),
            } * 1e3,
        );
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{who} n={n} min {:.3} med {:.3} max {:.3} ms",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    );
}
