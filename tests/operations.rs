//! Operations on the real binary: SIGTERM under load (every request completed and kept, or
//! failed cleanly; exit 0), `export` to FHIR NDJSON, and the backup/restore procedure in
//! README.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

fn referral(i: usize) -> Value {
    hub_referral(&format!("OPS-{i}"), 100 + i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_finishes_in_flight_work_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, base) = spawn_binary(&data, Some(&unthrottled_config()));
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0usize));
    let mut clients = Vec::new();
    for w in 0..6 {
        let (base, acked, failed) = (base.clone(), acked.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            for i in 0..200 {
                let n = w * 1000 + i;
                let r = http
                    .post(format!("{base}/referrals"))
                    .bearer_auth(GP)
                    .header("content-type", "application/json")
                    .body(referral(n).to_string())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        let b: Value = r.json().await.unwrap();
                        let t = b["entry"][2]["resource"]["id"]
                            .as_str()
                            .unwrap()
                            .to_string();
                        acked.lock().unwrap().insert(format!("OPS-{n}"), t);
                    }
                    // Refused cleanly (the server is shutting down), or never reached it.
                    Ok(r) if r.status().is_server_error() => {
                        panic!("5xx during shutdown: {}", r.status())
                    }
                    Ok(r) => panic!("unexpected {}", r.status()),
                    Err(_) => {
                        *failed.lock().unwrap() += 1;
                        return;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopped = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = stopped.elapsed();
    assert_eq!(code.code(), Some(0), "exit status after SIGTERM: {code:?}");
    assert!(took < Duration::from_secs(35), "shutdown took {took:?}");
    for c in clients {
        let _ = c.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty(), "no request completed before the SIGTERM");
    // Everything acknowledged is there after a restart.
    let (mut child, base) = spawn_binary(&data, Some(&unthrottled_config()));
    let http = reqwest::Client::new();
    for (id, task) in &acked {
        let s = http
            .get(format!("{base}/fhir/Task/{task}"))
            .bearer_auth(AUDITOR)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            s, 200,
            "referral {id} acknowledged before SIGTERM is missing"
        );
    }
    println!(
        "SIGTERM under load: exit 0 after {took:?}; {} referrals acknowledged and kept; {} clients cut off cleanly",
        acked.len(),
        failed.lock().unwrap()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

fn stop(mut child: std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test]
async fn export_and_backup_restore() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (child, base) = spawn_binary(&data, None);
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http
                .post(format!("{base}/referrals"))
                .bearer_auth(GP)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()
        }
    };
    post(referral(1)).await;
    post(referral(2)).await;
    // Export refuses while the gateway holds the store.
    let out = dir.path().join("export");
    let busy = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["export", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("stop it first"));
    stop(child);

    // Backup, as README says: stop the gateway, copy the data directory.
    let backup = dir.path().join("backup");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&data)
        .arg(&backup)
        .status()
        .unwrap()
        .success());

    // Export: one NDJSON file per type, one resource per line.
    let ok = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["export", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (t, n) in [
        ("Patient", 2),
        ("ServiceRequest", 2),
        ("Task", 2),
        ("Observation", 0),
        ("AuditEvent", 2),
        ("Provenance", 6),
    ] {
        let text = std::fs::read_to_string(out.join(format!("{t}.ndjson"))).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), n, "{t}");
        assert!(lines.iter().all(|r| r["resourceType"] == t));
    }

    // Later changes...
    let (child, base2) = spawn_binary(&data, None);
    let r = http
        .post(format!("{base2}/referrals"))
        .bearer_auth(GP)
        .header("content-type", "application/json")
        .body(referral(3).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let late_task = r.json::<Value>().await.unwrap()["entry"][2]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    stop(child);
    // ... are gone after a restore: stop, put the copy back, start.
    std::fs::remove_dir_all(&data).unwrap();
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&backup)
        .arg(&data)
        .status()
        .unwrap()
        .success());
    let (child, base3) = spawn_binary(&data, None);
    let s = http
        .get(format!("{base3}/fhir/Task/{late_task}"))
        .bearer_auth(AUDITOR)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 404, "the restore kept a change made after the backup");
    let all: Value = http
        .get(format!("{base3}/fhir/Task"))
        .bearer_auth(AUDITOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["total"], 2);
    // The restored store is fully usable.
    let r = http
        .post(format!("{base3}/referrals"))
        .bearer_auth(GP)
        .header("content-type", "application/json")
        .body(referral(4).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    stop(child);
}

#[test]
fn an_unusable_store_stops_startup_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("db"), b"this is not a store").unwrap();
    std::fs::write(data.join("conf"), b"nor is this").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    // A store whose files sled accepts but which is not ours (sled's own, empty one).
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("db"), b"garbage").unwrap();
    std::fs::write(data.join("conf"), b"junk\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not an sp-gateway store, or is damaged"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "it must not start listening"
    );
}

/// Issue #10: an online backup taken while referrals pour in is consistent to one commit:
/// restored, it holds every referral acknowledged before the backup began, each referral
/// whole or not at all, and an intact audit chain; the gateway was never stopped for it.
/// The command-line backup of a stopped store is verified the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_online_backup_under_load_restores_consistent_to_one_commit() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let backups = dir.path().join("backups");
    let cfg = unthrottled_config().replacen(
        "max_body_bytes = 262144\n",
        &format!(
            "max_body_bytes = 262144\nbackup_dir = \"{}\"\n",
            backups.display()
        ),
        1,
    );
    let (child, base) = spawn_binary(&data, Some(&cfg));
    let mut child = Guarded(child);
    let gw = Arc::new(TestGateway::remote(&base));
    let acked: Arc<Mutex<Vec<(usize, String, String)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (gw, acked, done) = (gw.clone(), acked.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !done.load(Ordering::SeqCst) {
                let n = w * 10_000 + i;
                i += 1;
                let r = gw
                    .post_json(
                        GP,
                        "/referrals",
                        &hub_referral(&format!("BAK-{n}"), 40_000 + n),
                    )
                    .await;
                assert_eq!(r.status, 201, "{}", r.body);
                let e = r.entries();
                acked.lock().unwrap().push((
                    n,
                    e[1]["id"].as_str().unwrap().to_string(),
                    e[2]["id"].as_str().unwrap().to_string(),
                ));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gw.request(
            reqwest::Method::POST,
            "/admin/backup",
            Some(GP),
            None,
            None,
            &[]
        )
        .await
        .status,
        403
    );
    let before = acked.lock().unwrap().clone();
    let b = gw
        .request(
            reqwest::Method::POST,
            "/admin/backup",
            Some(ADMIN),
            None,
            None,
            &[],
        )
        .await;
    let after = acked.lock().unwrap().clone();
    assert_eq!(b.status, 200, "{}", b.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let all = acked.lock().unwrap().clone();
    assert!(all.len() > after.len(), "writes went on after the backup");
    assert!(before.len() > 10, "too few writes before the backup");
    assert!(b.body["commit"].as_u64().unwrap() > 0, "{}", b.body);
    let copy = std::path::PathBuf::from(b.body["dir"].as_str().unwrap());
    assert!(copy.starts_with(&backups), "{}", copy.display());
    assert_eq!(terminate(&mut child), Some(0));

    // Restore: stop, replace the data directory with the copy, start.
    std::fs::remove_dir_all(&data).unwrap();
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&copy)
        .arg(&data)
        .status()
        .unwrap()
        .success());
    let verify = audit_verify(&data);
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let (child, base) = spawn_binary(&data, Some(&cfg));
    let mut child = Guarded(child);
    let gw = TestGateway::remote(&base);
    let mut present = 0;
    for (i, (n, sr, task)) in all.iter().enumerate() {
        let s = gw
            .get(AUDITOR, &format!("/fhir/ServiceRequest/{sr}"))
            .await
            .status;
        let t = gw.get(AUDITOR, &format!("/fhir/Task/{task}")).await.status;
        assert_eq!(
            s, t,
            "referral {n}: ServiceRequest {s} but Task {t} (half a referral)"
        );
        if i < before.len() {
            assert_eq!(
                s, 200,
                "referral {n}, acknowledged before the backup, is missing"
            );
        }
        if s == 200 {
            present += 1;
        }
    }
    eprintln!(
        "online backup: {} acknowledged before it, {present} in it, {} by its end, {} in all; {}",
        before.len(),
        after.len(),
        all.len(),
        b.body
    );
    assert!(
        present >= before.len() && present <= after.len(),
        "{present} referrals restored; {} acknowledged before the backup, {} by its end",
        before.len(),
        after.len()
    );
    assert_eq!(terminate(&mut child), Some(0));

    // The command-line backup of a stopped store, verified by opening it.
    let offline = dir.path().join("offline");
    let backup_to = |to: &std::path::Path| {
        cli([
            std::ffi::OsStr::new("backup"),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--to".as_ref(),
            to.as_os_str(),
        ])
    };
    let out = backup_to(&offline);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("backup verified"));
    // Into a directory that is not empty: refused, nothing touched.
    let again = backup_to(&offline);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
