//! The benchmark harness runs end to end in its quick mode (no timing is asserted: figures
//! come from full runs, recorded in BENCHMARKS.md).

use std::process::Command;

#[test]
fn the_benchmark_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_sp-gateway-bench"))
        .arg("--quick")
        .output()
        .expect("run the benchmark");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for metric in [
        "ingest c=1: referrals/s",
        "ingest c=64: p99.9 ms",
        "poll at 300 stored: p99 ms",
        "read by id: reads/s (c=16)",
        "$trail of one referral: p99 ms",
        "peak RSS",
        "start-up at",
    ] {
        assert!(table.contains(metric), "no {metric} in:\n{table}");
    }
}

/// The census counts what a referral's life leaves in the store: one current version of
/// each of its four resources, every key of a known kind.
#[test]
fn the_census_counts_a_life_by_kind_of_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_sp-gateway-bench"))
        .args(["--census", "--lives", "100"])
        .output()
        .expect("run the census");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rtype in ["Patient", "ServiceRequest", "Task", "Observation"] {
        let row = format!("| `r/{rtype}` | 1.00 |");
        assert!(table.contains(&row), "no {row} in:\n{table}");
    }
    assert!(table.contains("On disk after a clean stop"), "{table}");
    assert!(!table.contains('?'), "a key of no known kind:\n{table}");
}
