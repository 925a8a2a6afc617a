//! The archive of closed referrals (issue #14): a referral that is closed and delivered,
//! moved out of the hot store by `sp-gateway archive run`, is still returned by read,
//! vread, `_history`, Provenance, `$trail`, AuditEvent search, export and `audit verify`;
//! re-sending it is still answered with what was stored; searches by owner no longer list
//! it, an open referral is left where it is; a damaged archive is detected and named, and
//! never served as data; an archive that cannot be written moves nothing.

use std::path::Path;

use crate::common::*;
use serde_json::{json, Value};

fn archive_run(data: &Path) -> std::process::Output {
    cli([
        std::ffi::OsStr::new("archive"),
        "run".as_ref(),
        "--after-days".as_ref(),
        "0".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ])
}

/// Flips bits of the first archive segment's byte at `1/part` of its length.
fn damage_archive(data: &Path, part: usize, flip: u8) {
    let seg = std::fs::read_dir(data.join("archive"))
        .expect("archive dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    let mut bytes = std::fs::read(&seg).expect("segment");
    let at = bytes.len() / part;
    bytes[at] ^= flip;
    std::fs::write(&seg, &bytes).expect("damage");
}

/// `sp-gateway export` of a stopped store into `to`.
fn export(data: &Path, to: &Path) {
    let o = cli([
        std::ffi::OsStr::new("export"),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        to.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Everything the tests read of one referral, as the API returns it.
async fn views(
    gw: &TestGateway,
    sid: &str,
    pid: &str,
    tid: &str,
    oid: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (token, path) in [
        (CRAFTS, format!("/fhir/Task/{tid}")),
        (CRAFTS, format!("/fhir/Task/{tid}/_history/2")),
        (GP, format!("/fhir/Task/{tid}")),
        (GP, format!("/fhir/ServiceRequest/{sid}")),
        (GP, format!("/fhir/Patient/{pid}")),
        (CRAFTS, format!("/fhir/Patient/{pid}")),
        (GP, format!("/fhir/Observation/{oid}")),
        (AUDITOR, format!("/fhir/Task/{tid}/_history")),
        (AUDITOR, format!("/fhir/ServiceRequest/{sid}/_history")),
        (AUDITOR, format!("/fhir/Provenance?target=Task/{tid}")),
        (GP, format!("/fhir/Task?focus=ServiceRequest/{sid}")),
        (
            GP,
            format!("/fhir/Observation?based-on=ServiceRequest/{sid}"),
        ),
    ] {
        let r = gw.get(token, &path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let mut body = r.body.clone();
        // A searchset's links and timestamp are the request's, not the data's.
        if body["resourceType"] == "Bundle" {
            body.as_object_mut().map(|o| {
                o.remove("link");
                o.remove("timestamp");
                o.remove("id");
                o.remove("meta")
            });
        }
        // Links carry the server's address, which a restart changes.
        out.push((path, body.to_string().replace(&gw.base, "")));
    }
    out
}

/// The trail's resource versions and AuditEvent ids.
async fn trail(gw: &TestGateway, sid: &str) -> (Vec<String>, Vec<String>) {
    let r = gw
        .get(AUDITOR, &format!("/fhir/ServiceRequest/{sid}/$trail"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (mut versions, mut events) = (Vec::new(), Vec::new());
    for e in r.entries() {
        let id = e["id"].as_str().unwrap_or_default();
        if e["resourceType"] == "AuditEvent" {
            events.push(id.to_string());
        } else {
            versions.push(format!(
                "{}/{}/{}",
                e["resourceType"].as_str().unwrap_or_default(),
                id,
                e["meta"]["versionId"].as_str().unwrap_or_default()
            ));
        }
    }
    (versions, events)
}

/// A referral through its whole life: accepted, in progress, an outcome, completed, the
/// GP's pull. Returns (patient, service request, task, observation) ids.
async fn closed_referral(gw: &TestGateway, referral: &Value) -> (String, String, String, String) {
    let (pid, sid, tid) = gw.refer(GP, referral).await;
    for s in ["accepted", "in-progress"] {
        let r = gw.transition(CRAFTS, &tid, status_to(s)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let obs = gw.post_outcome(&sid, &pid, 50).await;
    let oid = obs["id"].as_str().expect("id").to_string();
    let r = gw
        .transition(CRAFTS, &tid, |t| {
            t["status"] = json!("completed");
            t["output"] = json!([{ "type": { "text": "WEMWBS" }, "valueReference": { "reference": format!("Observation/{oid}") } }]);
        })
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pull = gw
        .get(
            GP,
            &format!("/fhir/Observation?based-on=ServiceRequest/{sid}"),
        )
        .await;
    assert_eq!(pull.entries().len(), 1, "{}", pull.body);
    (pid, sid, tid, oid)
}

fn owner_ids(r: &Resp) -> Vec<String> {
    r.entries()
        .iter()
        .filter(|e| e["resourceType"] == "Task")
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn an_archived_referral_is_still_read_traced_exported_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut gw = TestGateway::start(&data).await;
    let ada = fixture("referral-ada.json");
    let (pid, sid, tid, oid) = closed_referral(&gw, &ada).await;
    // Another referral stays open: it must stay in the hot store.
    let open = variant("referral-ada.json", "REF-ARCHIVE-OPEN", Some("9990000034"));
    let (_, open_sid, open_tid) = gw.refer(GP, &open).await;

    let before = views(&gw, &sid, &pid, &tid, &oid).await;
    let polled = gw
        .get(CRAFTS, "/fhir/Task?owner=Organization/pendle-crafts")
        .await;
    assert!(owner_ids(&polled).contains(&tid), "{}", polled.body);
    let (versions_before, events_before) = trail(&gw, &sid).await;
    gw.stop().await;

    // Export before, to compare.
    let ex_before = dir.path().join("export-before");
    export(&data, &ex_before);

    let run = archive_run(&data);
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        text(&run).contains("archived 1 closed referrals"),
        "{}",
        text(&run)
    );
    // Nothing left of it in the hot store but its pointers.
    {
        let store = sp_gateway::store::Store::open(&data).expect("store");
        for key in [
            format!("r/Task/{tid}"),
            format!("r/ServiceRequest/{sid}"),
            format!("r/Patient/{pid}"),
            format!("r/Observation/{oid}"),
        ] {
            assert_eq!(store.get(key.as_bytes()).expect("get"), None, "{key}");
        }
        assert!(store
            .get(format!("r/Task/{open_tid}").as_bytes())
            .expect("get")
            .is_some());
        assert_eq!(store.count(b"z/").expect("count"), 4);
    }
    // Running it again finds nothing more to do.
    let again = archive_run(&data);
    assert!(
        text(&again).contains("archived 0 closed referrals"),
        "{}",
        text(&again)
    );

    let ex_after = dir.path().join("export-after");
    export(&data, &ex_after);
    for t in [
        "Patient",
        "ServiceRequest",
        "Task",
        "Observation",
        "Provenance",
        "AuditEvent",
    ] {
        let lines = |d: &Path| {
            let mut l: Vec<String> = std::fs::read_to_string(d.join(format!("{t}.ndjson")))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            l.sort();
            l
        };
        assert_eq!(lines(&ex_before), lines(&ex_after), "{t}.ndjson");
    }

    let verify = audit_verify(&data);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains("archive intact: 4 archived resources in 1 groups"),
        "{}",
        text(&verify)
    );

    gw.restart().await;
    for ((path, was), (_, now)) in before.iter().zip(views(&gw, &sid, &pid, &tid, &oid).await) {
        assert!(*was == now, "{path} reads otherwise once archived");
    }
    let (versions_after, events_after) = trail(&gw, &sid).await;
    assert_eq!(versions_after, versions_before);
    assert!(
        events_before.iter().all(|e| events_after.contains(e)),
        "every AuditEvent of the trail before is in it after"
    );
    let by_entity = gw
        .get(
            AUDITOR,
            &format!("/fhir/AuditEvent?entity=Task/{tid}&_count=100"),
        )
        .await;
    assert_eq!(by_entity.status, 200);
    assert!(by_entity.entries().len() >= events_before.len() / 2);
    // Out of scope is still not found: another provider, another practice.
    assert_eq!(
        gw.get(MONEY, &format!("/fhir/Task/{tid}")).await.status,
        404
    );
    assert_eq!(
        gw.get(GP2, &format!("/fhir/Patient/{pid}")).await.status,
        404
    );
    // The provider's queue no longer lists it; the open referral is still there.
    let polled = gw
        .get(CRAFTS, "/fhir/Task?owner=Organization/pendle-crafts")
        .await;
    assert!(!owner_ids(&polled).contains(&tid), "{}", polled.body);
    assert!(owner_ids(&polled).contains(&open_tid), "{}", polled.body);
    // Re-sent, it is answered with what was stored.
    let again = gw.post_json(GP, "/referrals", &ada).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let ids: Vec<String> = again
        .entries()
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, vec![pid.clone(), sid.clone(), tid.clone()]);
    // A change to it is refused as to any final Task, and writes nothing.
    let digest = gw.digest();
    let mut t: Value = serde_json::from_str(&before[0].1).expect("task");
    t["status"] = json!("in-progress");
    let r = gw.put_task(CRAFTS, &t, None).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(gw.digest(), digest);
    assert_eq!(
        gw.get(GP, &format!("/fhir/ServiceRequest/{open_sid}"))
            .await
            .status,
        200
    );
    gw.stop().await;

    // Damage the archive: reads of it fail plainly, never with other data; both checks
    // name it.
    damage_archive(&data, 2, 0x5a);
    let verify = audit_verify(&data);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    assert!(
        text(&verify).contains("archive DAMAGED"),
        "{}",
        text(&verify)
    );
    let check = cli([
        std::ffi::OsStr::new("archive"),
        "verify".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(text(&check).contains(".seg"), "{}", text(&check));
    gw.restart().await;
    let r = gw.get(GP, &format!("/fhir/Task/{tid}")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
    assert!(!r.body.to_string().contains(&pid));
    // The open referral is untouched by it.
    assert_eq!(
        gw.get(GP, &format!("/fhir/Task/{open_tid}")).await.status,
        200
    );
    gw.stop().await;
}

/// Faults: an archive that cannot be written (here its directory is a file) moves nothing:
/// the command says why, and the store is as it was.
#[tokio::test]
async fn an_archive_that_cannot_be_written_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut gw = TestGateway::start(&data).await;
    let (_, sid, tid, _) = closed_referral(&gw, &fixture("referral-ada.json")).await;
    gw.stop().await;
    std::fs::write(data.join("archive"), b"not a directory").expect("block");
    let digest = || {
        sp_gateway::store::Store::open(&data)
            .expect("store")
            .digest()
            .expect("digest")
    };
    let before = digest();
    let run = archive_run(&data);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(text(&run).contains("archive"), "{}", text(&run));
    assert_eq!(digest(), before, "nothing moved");
    std::fs::remove_file(data.join("archive")).expect("unblock");
    gw.restart().await;
    assert_eq!(gw.get(GP, &format!("/fhir/Task/{tid}")).await.status, 200);
    let polled = gw
        .get(GP, &format!("/fhir/Task?focus=ServiceRequest/{sid}"))
        .await;
    assert_eq!(polled.entries().len(), 1);
    gw.stop().await;
    // And once it can be written, the referral moves.
    let run = archive_run(&data);
    assert!(
        text(&run).contains("archived 1 closed referrals"),
        "{}",
        text(&run)
    );
}

/// Faults: the gateway is killed with SIGKILL again and again while its archiver moves
/// referrals that its clients keep closing. Afterwards every acknowledged referral reads
/// whole, with its acknowledged cancellation, whether it was archived or not; the archive
/// verifies (a frame a kill left unreferenced is harmless and said so); so does the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archiving_survives_sigkill() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let config =
        unthrottled_config() + "\n[archive]\nafter_days = 0\ninterval_secs = 1\nbatch = 3\n";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // referral id → (Task id, whether its cancellation was acknowledged)
    let ledger: Arc<Mutex<HashMap<String, (String, bool)>>> = Arc::default();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    println!("archive crash test: seed {seed}");
    for round in 0..6usize {
        let (child, base) = spawn_binary(&data, Some(&config));
        let mut child = Guarded(child);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let client = {
            let (http, base, ledger) = (http.clone(), base.clone(), ledger.clone());
            tokio::spawn(async move {
                for i in 0..10_000usize {
                    let id = format!("ARCH-{round}-{i}");
                    let r = hub_referral(&id, 50_000 + round * 10_000 + i);
                    let Ok(resp) = http
                        .post(format!("{base}/referrals"))
                        .bearer_auth(GP)
                        .header("content-type", "application/json")
                        .body(r.to_string())
                        .send()
                        .await
                    else {
                        return;
                    };
                    let Ok(b) = resp.json::<Value>().await else {
                        return;
                    };
                    let Some(task) = b["entry"][2]["resource"].as_object().cloned() else {
                        return;
                    };
                    let tid = task["id"].as_str().unwrap_or_default().to_string();
                    ledger
                        .lock()
                        .unwrap()
                        .insert(id.clone(), (tid.clone(), false));
                    let mut t = Value::Object(task);
                    t["status"] = json!("cancelled");
                    t["statusReason"] = json!({ "text": "no longer needed" });
                    let Ok(resp) = http
                        .put(format!("{base}/fhir/Task/{tid}"))
                        .bearer_auth(GP)
                        .header("content-type", "application/fhir+json")
                        .body(t.to_string())
                        .send()
                        .await
                    else {
                        return;
                    };
                    if resp.status() == 200 {
                        ledger.lock().unwrap().insert(id, (tid, true));
                    }
                }
            })
        };
        // Long enough for the archiver to have run at least once, then a random moment.
        tokio::time::sleep(Duration::from_millis(1200 + (seed >> (round * 4)) % 900)).await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.len() > 20,
        "too little load: {} referrals",
        ledger.len()
    );
    let by_gateway = sp_gateway::store::Store::open(&data)
        .expect("store")
        .count(b"z/ServiceRequest/")
        .expect("count");
    // Whatever the archiver had not reached, then the checks.
    let run = archive_run(&data);
    assert!(run.status.success(), "{}", text(&run));
    let archived = sp_gateway::store::Store::open(&data)
        .expect("store")
        .count(b"z/ServiceRequest/")
        .expect("count");
    let verify = audit_verify(&data);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains("archive intact"),
        "{}",
        text(&verify)
    );
    let (child, base) = spawn_binary(&data, Some(&config));
    let _child = Guarded(child);
    let http = reqwest::Client::new();
    let mut wrong = Vec::new();
    for (id, (tid, cancelled)) in &ledger {
        let r = http
            .get(format!("{base}/fhir/Task/{tid}"))
            .bearer_auth(HUB)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            wrong.push(format!("{id}: Task {tid} is {}", r.status()));
            continue;
        }
        let t: Value = r.json().await.unwrap();
        if *cancelled && t["status"] != "cancelled" {
            wrong.push(format!(
                "{id}: cancellation acknowledged, Task is {}",
                t["status"]
            ));
        }
        let sr = t["focus"]["reference"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let r = http
            .get(format!("{base}/fhir/{sr}/$trail"))
            .bearer_auth(AUDITOR)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            wrong.push(format!("{id}: trail {}", r.status()));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    println!(
        "{} referrals acknowledged; {by_gateway} archived by the gateway while it was killed, {archived} in all",
        ledger.len(),
    );
    assert!(by_gateway > 0, "the gateway's archiver archived nothing");
}

/// A Patient named by a second referral (`POST /fhir/ServiceRequest` for an existing
/// Patient) is archived with both referrals, only once both are closed, and exported once.
#[tokio::test]
async fn a_patient_with_two_referrals_is_archived_once_both_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut gw = TestGateway::start(&data).await;
    let first = gw
        .post_json(GP, "/referrals", &fixture("referral-ada.json"))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let e = first.entries();
    let pid = e[0]["id"].as_str().unwrap().to_string();
    let tid = e[2]["id"].as_str().unwrap().to_string();
    let mut sr = e[1].clone();
    let o = sr.as_object_mut().unwrap();
    o.remove("id");
    o.remove("meta");
    sr["identifier"] = json!([{ "system": "https://fhir.emis.example/Id/referral/P81001", "value": "FHIR-REF-ARCH-2" }]);
    let second = gw
        .request(
            reqwest::Method::POST,
            "/fhir/ServiceRequest",
            Some(GP),
            Some("application/fhir+json"),
            Some(sr.to_string().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(second.status, 201, "{}", second.body);
    assert_eq!(
        second.body["subject"]["reference"],
        format!("Patient/{pid}")
    );
    let sid2 = second.body["id"].as_str().unwrap().to_string();
    let focus = gw
        .get(GP, &format!("/fhir/Task?focus=ServiceRequest/{sid2}"))
        .await;
    let tid2 = focus.entries()[0]["id"].as_str().unwrap().to_string();
    let cancel = with_reason("cancelled", "no longer needed");
    assert_eq!(gw.transition(GP, &tid, &cancel).await.status, 200);
    gw.stop().await;
    // One referral of the Patient is open: nothing of the Patient moves.
    let run = archive_run(&data);
    assert!(
        text(&run).contains("archived 0 closed referrals"),
        "{}",
        text(&run)
    );
    gw.restart().await;
    assert_eq!(gw.transition(GP, &tid2, &cancel).await.status, 200);
    gw.stop().await;
    let run = archive_run(&data);
    assert!(
        text(&run).contains("archived 1 closed referrals"),
        "{}",
        text(&run)
    );
    assert_eq!(
        sp_gateway::store::Store::open(&data)
            .expect("store")
            .count(b"z/ServiceRequest/")
            .expect("count"),
        2
    );
    let out = dir.path().join("export");
    export(&data, &out);
    let count = |t: &str| {
        std::fs::read_to_string(out.join(format!("{t}.ndjson")))
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(
        (count("Patient"), count("ServiceRequest"), count("Task")),
        (1, 2, 2)
    );
    gw.restart().await;
    for t in [&tid, &tid2] {
        let r = gw.get(GP, &format!("/fhir/Task/{t}")).await;
        assert_eq!(r.body["status"], "cancelled", "{}", r.body);
    }
    // A change to an archived Task is refused as to any final one.
    let r = gw.transition(GP, &tid, status_to("in-progress")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.to_string().contains("archived"), "{}", r.body);
    gw.stop().await;
}

/// Every AuditEvent id, through the search's pages.
async fn all_audit_ids(gw: &TestGateway) -> Vec<String> {
    let mut ids = Vec::new();
    let mut url = "/fhir/AuditEvent?_count=200".to_string();
    loop {
        let r = gw.get(AUDITOR, &url).await;
        assert_eq!(r.status, 200, "{}", r.body);
        ids.extend(
            r.entries()
                .iter()
                .filter_map(|e| e["id"].as_str().map(str::to_string)),
        );
        match r.next_link() {
            Some(next) => {
                url = next
                    .split_once("/fhir")
                    .map(|(_, p)| format!("/fhir{p}"))
                    .expect("a link under /fhir")
            }
            None => return ids,
        }
    }
}

/// The audit chain's old records move in blocks of 256: the chain still verifies whole,
/// every AuditEvent is still read by id, found by entity and in a search of all of them,
/// and exported; a damaged block breaks `audit verify`.
#[tokio::test]
async fn old_audit_records_move_in_blocks_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut gw = TestGateway::start_with(&data, unthrottled_config()).await;
    let (_, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    // Each read is an AuditEvent: 600 of them, beside the referral's own.
    for _ in 0..600 {
        assert_eq!(gw.get(GP, &format!("/fhir/Task/{tid}")).await.status, 200);
    }
    let ids_before = all_audit_ids(&gw).await;
    let first_before = gw.get(AUDITOR, "/fhir/AuditEvent/1").await.body;
    let trail_before = trail(&gw, &sid).await;
    gw.stop().await;
    let audit_events = |to: &Path| {
        export(&data, to);
        std::fs::read_to_string(to.join("AuditEvent.ndjson")).unwrap()
    };
    let exported_before = audit_events(&dir.path().join("before"));
    let run = archive_run(&data);
    // The referral is open; of the chain, two whole blocks (the head stays).
    assert!(
        text(&run).contains("archived 0 closed referrals")
            && text(&run).contains("and 512 audit records"),
        "{}",
        text(&run)
    );
    assert_eq!(exported_before, audit_events(&dir.path().join("after")));
    let verify = audit_verify(&data);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains("audit chain intact"),
        "{}",
        text(&verify)
    );
    assert!(
        text(&verify).contains("2 blocks of audit records"),
        "{}",
        text(&verify)
    );
    gw.restart().await;
    assert_eq!(
        gw.get(AUDITOR, "/fhir/AuditEvent/1").await.body,
        first_before
    );
    let ids_after = all_audit_ids(&gw).await;
    assert_eq!(ids_after[..ids_before.len()], ids_before[..]);
    let trail_after = trail(&gw, &sid).await;
    assert_eq!(trail_after.0, trail_before.0);
    assert!(trail_before.1.iter().all(|e| trail_after.1.contains(e)));
    gw.stop().await;
    // A damaged block is named by `audit verify`.
    damage_archive(&data, 3, 0x42);
    let verify = audit_verify(&data);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    assert!(
        text(&verify).contains("audit chain BROKEN at record 1: an archived block"),
        "{}",
        text(&verify)
    );
}
