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
        "memory per idle agent, 928 agents",
        "memory per idle agent, 10000 agents",
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
        "| troupe (join_all of requests) |",
    ] {
        assert!(md.contains(system), "no row {system}");
    }
    assert!(
        md.contains("| process lanes |"),
        "process lanes ran (troupe-bench-worker found)"
    );
    // The header says what was compared and how it was built, read from Cargo.lock and
    // Cargo.toml by the suite itself.
    let header = md.lines().nth(2).unwrap_or_default();
    for fact in [
        "kameo 0.22",
        "ractor 0.16",
        "actix 0.13",
        "lto = \"thin\"",
        "codegen-units = 1",
    ] {
        assert!(header.contains(fact), "the header lacks `{fact}`: {header}");
    }
    assert!(
        md.contains("| kameo (mailbox 1 024) |"),
        "kameo at Troupe's bound"
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

#[test]
fn only_runs_the_rows_it_names_and_prints_their_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_troupe-suite"))
        .args(["--only", "spawn 1 actors troupe"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains("### spawn 1 actors"), "{md}");
    assert!(md.contains("| troupe |"), "{md}");
    assert!(
        !md.contains("| actix |") && !md.contains("### tell"),
        "{md}"
    );
}

#[test]
fn the_readme_peer_lines_are_the_generated_block() {
    let readme = include_str!("../../README.md");
    let begin = "<!-- bench-summary: written by bench/run.sh -->";
    let end = "<!-- /bench-summary -->";
    let (Some(a), Some(b)) = (readme.find(begin), readme.find(end)) else {
        panic!("README.md has lost its bench-summary markers");
    };
    let block = &readme[a + begin.len()..b];
    for workload in [
        "tell → 928 actors",
        "request/reply, serial",
        "fan-out/fan-in p99",
        "spawn 928 actors",
    ] {
        assert!(
            block.contains(workload),
            "the summary lacks {workload}: {block}"
        );
    }
    // No peer figure outside the generated block ("ractor 4.3 M"): the README's own prose
    // states none, so none can go stale.
    let outside = format!("{}{}", &readme[..a], &readme[b..]);
    for peer in ["actix do_send ", "ractor ", "kameo "] {
        for (i, _) in outside.match_indices(peer) {
            let next = outside[i + peer.len()..].chars().next();
            assert!(
                !next.is_some_and(|c| c.is_ascii_digit()),
                "a hand-copied peer figure outside the block: {}",
                outside[i..].chars().take(40).collect::<String>()
            );
        }
    }
}
