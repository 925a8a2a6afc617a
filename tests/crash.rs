//! Crash safety: concurrent clients submit referrals and accept Tasks while the real gateway
//! is killed with SIGKILL at random moments and restarted, again and again. Afterwards every
//! acknowledged referral and update is there exactly once, nothing unacknowledged is half
//! there, and the store opened cleanly every time. The commissioner's figures (counters kept
//! in each write's transaction) equal what is stored, and `report rebuild --check` agrees.
//!
//! Short form (CI): 10 kills. Long form: `SP_CRASH_KILLS=50 cargo test --release -p
//! sp-gateway-tests crash:: -- --nocapture`.

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

fn spawn(data: &std::path::Path) -> (Child, String) {
    spawn_binary(data, Some(&unthrottled_config()))
}

/// A tiny deterministic generator, seeded per run and printed, for the kill moments.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[derive(Default)]
struct Ledger {
    /// referral id → task id, for every 200/201 the clients saw.
    acked: HashMap<String, String>,
    /// referral ids whose POST got no answer (the gateway died): may or may not exist.
    unknown: HashSet<String>,
    /// task id → the version a 200 to our accept returned.
    accepted: HashMap<String, u64>,
}

async fn client_round(base: String, round: usize, ledger: Arc<Mutex<Ledger>>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (http, base, ledger) = (http.clone(), base.clone(), ledger.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..1000 {
                let id = format!("CRASH-{round}-{w}-{i}");
                let r = hub_referral(&id, round * 4000 + w * 1000 + i);
                let resp = http
                    .post(format!("{base}/referrals"))
                    .bearer_auth(GP)
                    .header("content-type", "application/json")
                    .body(r.to_string())
                    .send()
                    .await;
                match resp {
                    Ok(resp) if resp.status() == 201 || resp.status() == 200 => {
                        let Ok(b) = resp.json::<Value>().await else {
                            ledger.lock().unwrap().unknown.insert(id);
                            return;
                        };
                        let task = b["entry"][2]["resource"]["id"]
                            .as_str()
                            .unwrap()
                            .to_string();
                        ledger.lock().unwrap().acked.insert(id, task);
                    }
                    Ok(resp) => panic!("referral {id}: unexpected {}", resp.status()),
                    Err(_) => {
                        ledger.lock().unwrap().unknown.insert(id);
                        return; // the gateway is gone
                    }
                }
            }
        }));
    }
    // One worker accepts Tasks as they arrive.
    {
        let (http, base, ledger) = (http.clone(), base.clone(), ledger.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let pending: Vec<String> = {
                    let l = ledger.lock().unwrap();
                    l.acked
                        .values()
                        .filter(|t| !l.accepted.contains_key(*t))
                        .take(5)
                        .cloned()
                        .collect()
                };
                if pending.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                for t in pending {
                    let Ok(r) = http
                        .get(format!("{base}/fhir/Task/{t}"))
                        .bearer_auth(HUB)
                        .send()
                        .await
                    else {
                        return;
                    };
                    let Ok(mut task) = r.json::<Value>().await else {
                        return;
                    };
                    if task["status"] != "requested" {
                        continue;
                    }
                    let v = task["meta"]["versionId"]
                        .as_str()
                        .unwrap_or("1")
                        .to_string();
                    task["status"] = json!("accepted");
                    let resp = http
                        .put(format!("{base}/fhir/Task/{t}"))
                        .bearer_auth(HUB)
                        .header("content-type", "application/fhir+json")
                        .header("if-match", format!("W/\"{v}\""))
                        .body(task.to_string())
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status() == 200 => {
                            let Ok(b) = r.json::<Value>().await else {
                                return;
                            };
                            let v: u64 = b["meta"]["versionId"].as_str().unwrap().parse().unwrap();
                            ledger.lock().unwrap().accepted.insert(t, v);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_repeated_sigkill() {
    let kills: usize = std::env::var("SP_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("crash test: {kills} kills, seed {seed}");
    let mut rng = Lcg(seed);
    let started = time::OffsetDateTime::now_utc();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..kills {
        let (mut child, base) = spawn(&data);
        let before = ledger.lock().unwrap().acked.len();
        let clients = tokio::spawn(client_round(base.clone(), round, ledger.clone()));
        // Kill mid-load: once writes are flowing (however slow this machine is), at a random
        // moment after.
        for _ in 0..500 {
            if ledger.lock().unwrap().acked.len() >= before + 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(20 + rng.next(300))).await;
        child.kill().unwrap(); // SIGKILL, mid-write
        child.wait().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), clients).await;
    }
    // Verify on a fresh start.
    let (mut child, base) = spawn(&data);
    let http = reqwest::Client::new();
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        l.acked.len() > kills * 5,
        "too little load: {} referrals acknowledged",
        l.acked.len()
    );
    let mut lost = Vec::new();
    for (id, task) in &l.acked {
        let r = http
            .get(format!("{base}/fhir/Task/{task}"))
            .bearer_auth(HUB)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            lost.push(format!("referral {id}: Task {task} is {}", r.status()));
            continue;
        }
        let t: Value = r.json().await.unwrap();
        if let Some(v) = l.accepted.get(task) {
            let have: u64 = t["meta"]["versionId"].as_str().unwrap().parse().unwrap();
            if have < *v || t["status"] != "accepted" {
                lost.push(format!(
                    "Task {task}: accepted as version {v}, now {have} {}",
                    t["status"]
                ));
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost:\n{}",
        lost.len(),
        lost.join("\n")
    );
    // Exactly once: resubmitting an acknowledged referral finds the same Task.
    for (id, task) in l.acked.iter().take(200) {
        let round: usize = id.split('-').nth(1).unwrap().parse().unwrap();
        let w: usize = id.split('-').nth(2).unwrap().parse().unwrap();
        let i: usize = id.split('-').nth(3).unwrap().parse().unwrap();
        let r = hub_referral(id, round * 4000 + w * 1000 + i);
        let resp = http
            .post(format!("{base}/referrals"))
            .bearer_auth(GP)
            .header("content-type", "application/json")
            .body(r.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "acknowledged referral {id} was not found again"
        );
        let b: Value = resp.json().await.unwrap();
        assert_eq!(
            b["entry"][2]["resource"]["id"],
            json!(task),
            "referral {id} has two Tasks"
        );
    }
    // Nothing half there: every Task has its ServiceRequest and Patient, and there are as many
    // Tasks as referrals that exist (acknowledged ones, plus unanswered ones that committed).
    let mut tasks = Vec::new();
    let mut url = format!("{base}/fhir/Task?_count=200");
    loop {
        let b: Value = http
            .get(&url)
            .bearer_auth(AUDITOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for e in b["entry"].as_array().into_iter().flatten() {
            tasks.push(e["resource"].clone());
        }
        match b["link"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["relation"] == "next"))
        {
            Some(n) => url = n["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    let ids: HashSet<&str> = tasks.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), tasks.len(), "a Task appears twice");
    for t in &tasks {
        for r in [&t["focus"]["reference"], &t["for"]["reference"]] {
            let s = http
                .get(format!("{base}/fhir/{}", r.as_str().unwrap()))
                .bearer_auth(AUDITOR)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(s, 200, "Task {} refers to a missing {r}", t["id"]);
        }
    }
    let acked_tasks: HashSet<&str> = l.acked.values().map(String::as_str).collect();
    assert!(acked_tasks.is_subset(&ids));
    let extra = ids.len() - acked_tasks.len();
    assert!(
        extra <= l.unknown.len(),
        "{extra} Tasks nobody asked for ({} unanswered requests)",
        l.unknown.len()
    );
    println!(
        "crash test: {kills} kills; {} referrals acknowledged, {} accepts acknowledged, {} unanswered ({} of those committed); all present, none twice, none half-written",
        l.acked.len(),
        l.accepted.len(),
        l.unknown.len(),
        extra
    );
    // The figures kept write by write survived the kills too: the commissioner's count of
    // referrals and of accepted ones equals what is stored, and, with the gateway killed once
    // more, `report rebuild --check` recomputes every counter from the stored referrals and
    // finds each equal to the one kept.
    let month = |t: time::OffsetDateTime| format!("{:04}-{:02}", t.year(), t.month() as u8);
    let period = format!(
        "periodStart={}&periodEnd={}",
        month(started),
        month(time::OffsetDateTime::now_utc())
    );
    let figure = |id: &'static str| {
        let (http, url) = (
            http.clone(),
            format!("{base}/fhir/Measure/{id}/$evaluate-measure?{period}"),
        );
        async move {
            let r = http
                .get(url)
                .bearer_auth("demo-commissioner-token")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let received = figure("referrals-received").await;
    // Published to the nearest 5 (README).
    let r5 = |n: usize| (n + 2) / 5 * 5;
    assert_eq!(
        received["group"][0]["population"][0]["count"],
        json!(r5(tasks.len())),
        "referrals received = referrals stored"
    );
    let uptake = figure("uptake").await;
    let accepted = tasks.iter().filter(|t| t["status"] == "accepted").count();
    let shown = &uptake["group"][0]["population"][2];
    // Suppressed only when the rest (open referrals) is small and would give it away.
    let rest = tasks.len() - accepted;
    assert!(
        shown["count"] == json!(r5(accepted))
            || (shown["count"].is_null() && (1..=7).contains(&rest)),
        "accepted = Tasks accepted ({accepted}, {rest} open): {shown}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, unthrottled_config()).unwrap();
    let out = cli([
        "report".as_ref(),
        "rebuild".as_ref(),
        "--check".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("agree"),
        "report rebuild after {kills} kills: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("{} referrals", tasks.len())),
        "{said}"
    );
    println!("crash test: report rebuild --check: {}", said.trim());
}
