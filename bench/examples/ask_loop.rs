//! Serial request/reply for one system, outside the suite, for a quick before/after:
//! `cargo run --release -p troupe-bench --example ask_loop -- [asks] [system]`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: u64 = troupe_bench::arg(1, 200_000);
    let who = troupe_bench::arg(2, String::from("troupe"));
    let l = match who.as_str() {
        "actix" => troupe_bench::peers::actix::ask_serial(n, 0),
        "kameo" => troupe_bench::peers::kameo::ask_serial(n, 0),
        "ractor" => troupe_bench::peers::ractor::ask_serial(n, 0),
        "troupe-off" => troupe_bench::peers::troupe::ask_serial(n, 0, false),
        _ => troupe_bench::peers::troupe::ask_serial(n, 0, true),
    };
    println!(
        "{who} asks/s {:.0} p50 {:.1} µs p99 {:.1} µs",
        l.per_s, l.p50_us, l.p99_us
    );
}
