//! Start-up time of one system, outside the suite, many times in one process, for a quick
//! before/after of a start-up change:
//! `cargo run --release -p troupe-bench --example spawn_loop -- [agents] [iterations] [system]`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: usize = troupe_bench::arg(1, 928);
    let iters: usize = troupe_bench::arg(2, 500);
    let who = troupe_bench::arg(3, String::from("troupe"));
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
