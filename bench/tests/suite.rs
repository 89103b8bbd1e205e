//! The benchmark suite in test mode: every workload of `troupe-suite` (peers, Troupe-only,
//! scaling curves) runs once at tiny sizes and the report and charts are written, so a broken
//! workload fails the test suite rather than the next full run.

use std::process::Command;

#[test]
fn every_workload_runs_once_and_the_report_is_written() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_troupe-suite"))
        .arg("--quick")
        .arg("--out")
        .arg(d.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(d.path().join("RESULTS.md")).unwrap();
    for title in [
        "tell → 1 actor",
        "tell → 928 actors",
        "request/reply, serial",
        "fan-out/fan-in, 1 → 928 → 1",
        "publish → 928 subscribers",
        "spawn 100 actors",
        "Mailbox full",
        "tasks, submit → outcome",
        "tri-sandbox overhead",
        "queue wait under saturation",
        "I/O-bound pool",
        "memory per idle agent",
        "Scaling curves",
    ] {
        assert!(md.contains(title), "RESULTS.md has no `{title}`");
    }
    for system in [
        "| troupe |",
        "| troupe (telemetry off) |",
        "| actix do_send |",
        "| ractor |",
        "| kameo |",
    ] {
        assert!(md.contains(system), "no row {system}");
    }
    assert!(
        md.contains("| process lanes |"),
        "process lanes ran (troupe-bench-worker found)"
    );
    assert!(
        !md.contains("| NaN") && !md.contains("inf |"),
        "a figure is not a number:\n{md}"
    );
    for chart in [
        "scaling-actors-throughput.svg",
        "scaling-actors-p99.svg",
        "scaling-payload-throughput.svg",
        "scaling-payload-p99.svg",
    ] {
        let svg = std::fs::read_to_string(d.path().join("results").join(chart)).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("<polyline"),
            "{chart} has no lines"
        );
    }
}
