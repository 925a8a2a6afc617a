//! The benchmark harness runs end to end in its quick mode (no timing is asserted: figures
//! come from full runs, recorded in BENCHMARKS.md).

use std::process::Command;

#[test]
fn the_benchmark_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway-bench"))
        .arg("--quick")
        .args(["--gateway", env!("CARGO_BIN_EXE_tested-sp-gateway")])
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
        "read by id: gateway CPU µs per read (c=16)",
        "GET /healthz: gateway CPU µs per request (c=16)",
        "Task update + Observation: gateway CPU ms per pair (c=16)",
        "$trail of one referral: p99 ms",
        "peak RSS",
        "start-up at",
    ] {
        assert!(table.contains(metric), "no {metric} in:\n{table}");
    }
}

fn census(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway-bench"))
        .args(["--census", "--lives", "100"])
        .args(["--gateway", env!("CARGO_BIN_EXE_tested-sp-gateway")])
        .args(extra)
        .output()
        .expect("run the census");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    table
}

/// The census's table by kind of key as (kind, keys per referral, bytes per referral), but
/// for the kinds that background work adds to with time, not with lives (the audit records
/// and agent index of the outbox's retries, the clock, the outbox).
fn by_kind(table: &str) -> Vec<(String, String, f64)> {
    table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter(|l| {
            !["| `a` ", "| `x/ae/g` ", "| `c/", "| `o/", "| `u/"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1].to_string(),
                cells[2].to_string(),
                cells[3].parse().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

/// The census counts what a referral's life leaves in the store: one current version of
/// each of its four resources, every key of a known kind.
#[test]
fn the_census_counts_a_life_by_kind_of_key() {
    let table = census(&[]);
    for rtype in ["Patient", "ServiceRequest", "Task", "Observation"] {
        let row = format!("| `r/{rtype}` | 1.00 |");
        assert!(table.contains(&row), "no {row} in:\n{table}");
    }
    assert!(table.contains("On disk after a clean stop"), "{table}");
    assert!(!table.contains('?'), "a key of no known kind:\n{table}");
}

/// The bulk census (the gateway's use cases in the bench's process, no HTTP) leaves exactly
/// what the census over HTTP leaves: the same keys, of the same sizes, kind by kind.
#[test]
fn the_bulk_census_writes_what_http_writes() {
    let http = census(&[]);
    let bulk = census(&["--bulk"]);
    assert!(
        bulk.starts_with("Census (bulk, in process): 100 lives"),
        "{bulk}"
    );
    let (h, b) = (by_kind(&http), by_kind(&bulk));
    assert!(!h.is_empty(), "{http}");
    // The same kinds and the same number of keys of each; the same bytes give or take a
    // timestamp's trailing zeros (a superseded Task's `lastUpdated` is as long as its
    // fraction of a second).
    let keys = |rows: &[(String, String, f64)]| -> Vec<(String, String)> {
        rows.iter()
            .map(|(k, n, _)| (k.clone(), n.clone()))
            .collect()
    };
    assert_eq!(keys(&h), keys(&b), "HTTP:\n{http}\nbulk:\n{bulk}");
    for ((kind, _, hb), (_, _, bb)) in h.iter().zip(&b) {
        assert!(
            (hb - bb).abs() <= hb * 0.01,
            "{kind}: {hb} bytes per referral over HTTP, {bb} in bulk"
        );
    }
}
