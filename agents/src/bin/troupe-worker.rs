//! `troupe-worker`: a sandbox worker process serving every built-in agent kind.
//!
//! The host starts it for process lanes (`sandbox.process.command`); it speaks the framed
//! protocol of `troupe::sandbox::wire` on standard input and output and logs to standard error.

use std::process::ExitCode;

fn main() -> ExitCode {
    let builder = troupe_agents::register_kinds(troupe::RuntimeBuilder::new(
        troupe::RuntimeConfig::default(),
    ));
    troupe::sandbox::worker_main(builder)
}
