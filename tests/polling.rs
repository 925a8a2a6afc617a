//! Incremental polling (`_lastUpdated=gt{last seen}`) while referrals are being written
//! concurrently never misses one: lastUpdated follows commit order.

use std::collections::HashSet;
use std::sync::Arc;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polling_while_writing_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(TestGateway::start(dir.path()).await);
    let nhs = std::fs::read_to_string(fixtures().join("nhs-numbers.txt")).unwrap();
    let nhs: Vec<String> = nhs
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    // 4 writers x 10 referrals, all to the hub (fallback: "employment" in BB9 matches no rule).
    let mut writers = Vec::new();
    for w in 0..4 {
        let gw = gw.clone();
        let nhs = nhs.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                let mut r = variant(
                    "referral-ada.json",
                    &format!("POLL-{w}-{i}"),
                    Some(&nhs[(w * 10 + i) % nhs.len()]),
                );
                r["needs"] = serde_json::json!(["employment"]);
                r["reasons"] = serde_json::json!([]);
                let (_, _, t) = gw.refer(GP, &r).await;
                ids.push(t);
            }
            ids
        }));
    }
    // One poller, only ever asking for what is newer than the newest it has seen, until
    // the writers are done, and once more after.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let gw = gw.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut last = String::from("2000-01-01T00:00:00Z");
            let mut polls = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let url = format!(
                    "/fhir/Task?owner=pendle-cvs-hub&_count=200&_lastUpdated=gt{}",
                    last.replace('+', "%2B")
                );
                let r = gw.get(HUB, &url).await;
                assert_eq!(r.status, 200, "{}", r.body);
                polls += 1;
                for t in r.entries() {
                    assert!(
                        seen.insert(t["id"].as_str().unwrap().to_string()),
                        "seen twice"
                    );
                    last = t["meta"]["lastUpdated"].as_str().unwrap().to_string();
                }
                if finished {
                    return (seen, polls);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut written = HashSet::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (seen, polls) = poller.await.unwrap();
    assert!(polls > 2, "the poller ran only {polls} times");
    assert_eq!(written.len(), 40);
    assert_eq!(seen, written, "incremental polling missed a Task");
    let r = gw
        .get(HUB, "/fhir/Task?owner=pendle-cvs-hub&_count=200")
        .await;
    // And lastUpdated is strictly increasing in the order the index returns them.
    let stamps: Vec<String> = r
        .entries()
        .iter()
        .map(|t| t["meta"]["lastUpdated"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = stamps.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), stamps.len(), "two writes share a lastUpdated");
}
