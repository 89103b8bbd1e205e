//! Fan-out/fan-in 1 → N → 1 for one system, outside the suite, for a quick before/after:
//! `cargo run --release -p troupe-bench --example fan_loop -- [actors] [rounds] [system]`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: usize = troupe_bench::arg(1, 928);
    let rounds: u64 = troupe_bench::arg(2, 300);
    let who = troupe_bench::arg(3, String::from("troupe"));
    let l = match who.as_str() {
        "actix" => troupe_bench::peers::actix::fan_out(n, rounds),
        "kameo" => troupe_bench::peers::kameo::fan_out(n, rounds),
        "ractor" => troupe_bench::peers::ractor::fan_out(n, rounds),
        "troupe-all" => troupe_bench::peers::troupe::request_all(n, rounds, true),
        "troupe-all-off" => troupe_bench::peers::troupe::request_all(n, rounds, false),
        "troupe-off" => troupe_bench::peers::troupe::fan_out(n, rounds, false),
        _ => troupe_bench::peers::troupe::fan_out(n, rounds, true),
    };
    println!(
        "{who} n={n} rounds/s {:.0} p50 {:.0} µs p99 {:.0} µs",
        l.per_s, l.p50_us, l.p99_us
    );
}
