//! The sandbox worker used by the process-lane benchmarks: the built-in kinds over the wire
//! protocol. (Benches can locate a binary of their own package, not of `troupe-agents`.)

fn main() -> std::process::ExitCode {
    troupe::sandbox::worker_main(troupe_agents::register_kinds(troupe::RuntimeBuilder::new(
        troupe::RuntimeConfig::default(),
    )))
}
