//! The audit trail: the exact trail of a referral's loop with several clients, tamper
//! evidence (altered, deleted, swapped, truncated records are each named by `audit
//! verify`), and who may read it.

use std::process::Command;

use crate::common::*;
use serde_json::{json, Value};
use sp_gateway::audit::{self, Verdict};
use sp_gateway::store::{Abort, Store};

fn trail(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["agent"][0]["who"]["identifier"]["value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["subtype"][0]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn t(agent: &str, sub: &str, outcome: &str) -> (String, String, String) {
    (agent.into(), sub.into(), outcome.into())
}

#[tokio::test]
async fn the_trail_of_a_referral_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (pid, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    assert_eq!(
        gw.get(CRAFTS, &format!("/fhir/Task/{tid}")).await.status,
        200
    );
    assert_eq!(
        gw.get(MONEY, &format!("/fhir/Task/{tid}")).await.status,
        404
    );
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    // a stale update, refused
    let cur = gw.get(CRAFTS, &format!("/fhir/Task/{tid}")).await.body;
    assert_eq!(gw.put_task(CRAFTS, &cur, Some("W/\"1\"")).await.status, 412);
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": { "reference": format!("Patient/{pid}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
        "performer": [{ "reference": "Organization/pendle-crafts" }], "valueInteger": 25
    });
    let o = gw.post_json(CRAFTS, "/fhir/Observation", &obs).await;
    let oid = o.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        gw.get(GP, &format!("/fhir/Observation/{oid}")).await.status,
        200
    );
    // Failed authentication is on the trail too.
    assert_eq!(
        gw.request(
            reqwest::Method::GET,
            &format!("/fhir/Task/{tid}"),
            Some("stolen"),
            None,
            None,
            &[]
        )
        .await
        .status,
        401
    );

    let r = gw
        .get(
            AUDITOR,
            &format!("/fhir/AuditEvent?entity=Task/{tid}&_count=200"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        trail(&r.entries()),
        vec![
            t("gp-pennine", "create", "0"),
            t("provider-crafts", "read", "0"),
            t("provider-money", "read", "4"),
            t("provider-crafts", "read", "0"), // transition(): read ...
            t("provider-crafts", "update", "0"), // ... then update
            t("provider-crafts", "read", "0"),
            t("provider-crafts", "update", "4"),
            t("unauthenticated", "read", "4"),
        ]
    );
    // The agent's organisation is recorded with the client.
    let first = &r.entries()[0];
    assert_eq!(first["agent"][0]["role"][0]["text"], "gp-system");
    let orgs: Vec<&str> = first["agent"].as_array().unwrap()[1..]
        .iter()
        .map(|a| a["who"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(orgs, vec!["Organization/P81001", "Organization/P81002"]);
    // The Observation's trail: created by the provider, read by the GP.
    let r = gw
        .get(
            AUDITOR,
            &format!("/fhir/AuditEvent?entity=Observation/{oid}"),
        )
        .await;
    assert_eq!(
        trail(&r.entries()),
        vec![
            t("provider-crafts", "create", "0"),
            t("gp-pennine", "read", "0")
        ]
    );
    // By agent and action; one event by id; every event valid R4.
    let r = gw
        .get(AUDITOR, "/fhir/AuditEvent?agent=provider-money")
        .await;
    assert_eq!(r.entries().len(), 1);
    let r = gw.get(AUDITOR, "/fhir/AuditEvent?action=C").await;
    assert!(r.entries().iter().all(|e| e["action"] == "C") && r.entries().len() >= 2);
    let first = gw.get(AUDITOR, "/fhir/AuditEvent/1").await;
    assert_eq!(first.status, 200);
    for e in gw
        .get(AUDITOR, "/fhir/AuditEvent?_count=200")
        .await
        .entries()
    {
        assert!(
            sp_gateway::schema::check_fhir("AuditEvent", &e)
                .unwrap()
                .is_empty(),
            "{e}"
        );
        fhir_sdk_parse(&e, "AuditEvent").unwrap_or_else(|err| panic!("{err}\n{e}"));
    }
    // Paging.
    let p1 = gw.get(AUDITOR, "/fhir/AuditEvent?_count=3").await;
    assert_eq!(p1.entries().len(), 3);
    let p2 = gw.get(AUDITOR, &p1.next_link().unwrap()).await;
    assert_eq!(p2.entries()[0]["id"], json!("4"));
}

#[tokio::test]
async fn only_auditors_read_the_trail_and_nobody_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    gw.refer(GP, &fixture("referral-ada.json")).await;
    for token in [GP, GP2, CRAFTS, MONEY, ADMIN] {
        assert_eq!(gw.get(token, "/fhir/AuditEvent").await.status, 403);
        assert_eq!(gw.get(token, "/fhir/AuditEvent/1").await.status, 404);
    }
    assert_eq!(gw.get(AUDITOR, "/fhir/AuditEvent/1").await.status, 200);
    let ev = gw.get(AUDITOR, "/fhir/AuditEvent/1").await.body;
    for (m, p) in [
        (reqwest::Method::POST, "/fhir/AuditEvent"),
        (reqwest::Method::PUT, "/fhir/AuditEvent/1"),
        (reqwest::Method::DELETE, "/fhir/AuditEvent/1"),
    ] {
        let r = gw
            .request(
                m,
                p,
                Some(AUDITOR),
                Some("application/fhir+json"),
                Some(ev.to_string().into_bytes()),
                &[("if-match", "W/\"1\"")],
            )
            .await;
        assert_eq!(r.status, 405, "{p}");
    }
    // The auditor changes nothing elsewhere either.
    let r = gw
        .post_json(AUDITOR, "/referrals", &fixture("referral-bob.json"))
        .await;
    assert_eq!(r.status, 403);
}

fn tamper(dir: &std::path::Path, f: impl Fn(&sp_gateway::store::Tx<'_>) -> Result<(), Abort<()>>) {
    let store = Store::open(dir).unwrap();
    store
        .transact(|tx| f(tx))
        .map_err(|_| "tamper failed")
        .unwrap();
    store.durable_blocking().unwrap();
}

fn record(store_dir: &std::path::Path, seq: u64) -> Vec<u8> {
    let s = Store::open(store_dir).unwrap();
    s.get(audit::record_key(seq).as_bytes()).unwrap().unwrap()
}

fn verify(dir: &std::path::Path, checkpoint: Option<(u64, &str)>) -> Verdict {
    audit::verify(&Store::open(dir).unwrap(), checkpoint).unwrap()
}

#[tokio::test]
async fn tampering_is_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut gw = TestGateway::start(&data).await;
    for i in 0..3 {
        gw.refer(
            GP,
            &variant(
                "referral-ada.json",
                &format!("AUDIT-{i}"),
                Some(&nhs_number(i)),
            ),
        )
        .await;
        gw.get(AUDITOR, "/fhir/Task").await;
    }
    gw.stop().await;
    let Verdict::Intact { records, head } = verify(&data, None) else {
        panic!("untouched chain is broken")
    };
    assert_eq!(records, 6);
    let checkpoint = (records, head.clone());
    // The CLI agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact: 6 records"));

    let backup = dir.path().join("pristine");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&data)
        .arg(&backup)
        .status()
        .unwrap()
        .success());
    let restore = || {
        std::fs::remove_dir_all(&data).unwrap();
        assert!(Command::new("cp")
            .arg("-a")
            .arg(&backup)
            .arg(&data)
            .status()
            .unwrap()
            .success());
    };

    // 1. Alter one record's content.
    let mut rec: Value = serde_json::from_slice(&record(&data, 3)).unwrap();
    rec["event"]["agent"][0]["who"]["identifier"]["value"] = json!("someone-else");
    let bytes = serde_json::to_vec(&rec).unwrap();
    tamper(&data, |tx| {
        tx.put(audit::record_key(3).as_bytes(), &bytes)
            .map_err(Abort::from)
    });
    assert_eq!(
        verify(&data, None),
        Verdict::Broken {
            seq: 3,
            problem: "its content was altered (hash mismatch)".into()
        }
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("BROKEN at record 3"));
    restore();

    // 2. Delete one.
    tamper(&data, |tx| {
        tx.remove(audit::record_key(4).as_bytes())
            .map_err(Abort::from)
    });
    match verify(&data, None) {
        Verdict::Broken { seq: 4, problem } => assert!(problem.contains("missing"), "{problem}"),
        v => panic!("deletion not found: {v:?}"),
    }
    restore();

    // 3. Swap two (their contents, keeping the keys).
    let (r2, r5) = (record(&data, 2), record(&data, 5));
    tamper(&data, |tx| {
        tx.put(audit::record_key(2).as_bytes(), &r5)?;
        tx.put(audit::record_key(5).as_bytes(), &r2)?;
        Ok(())
    });
    match verify(&data, None) {
        Verdict::Broken { seq: 2, .. } => {}
        v => panic!("swap not found at 2: {v:?}"),
    }
    restore();

    // 4. Truncate the tail, and even fix up the head: only a logged checkpoint shows it.
    let r4: Value = serde_json::from_slice(&record(&data, 4)).unwrap();
    let new_head = serde_json::to_vec(&json!({ "seq": 4, "hash": r4["hash"] })).unwrap();
    tamper(&data, |tx| {
        tx.remove(audit::record_key(5).as_bytes())?;
        tx.remove(audit::record_key(6).as_bytes())?;
        tx.put(b"c/audit-head", &new_head)?;
        Ok(())
    });
    assert!(matches!(
        verify(&data, None),
        Verdict::Intact { records: 4, .. }
    ));
    match verify(&data, Some((checkpoint.0, &checkpoint.1))) {
        Verdict::Broken { problem, .. } => assert!(problem.contains("truncated"), "{problem}"),
        v => panic!("truncation not found: {v:?}"),
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args([
            "audit",
            "verify",
            "--checkpoint",
            &format!("{}:{}", checkpoint.0, checkpoint.1),
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Without fixing the head, plain verify sees the cut.
    restore();
    tamper(&data, |tx| {
        tx.remove(audit::record_key(6).as_bytes())
            .map_err(Abort::from)
    });
    match verify(&data, None) {
        Verdict::Broken { problem, .. } => {
            assert!(problem.contains("removed from the end"), "{problem}")
        }
        v => panic!("cut tail not found: {v:?}"),
    }
    restore();
    assert!(matches!(
        verify(&data, None),
        Verdict::Intact { records: 6, .. }
    ));
    // The gateway goes on appending to the restored chain.
    gw = TestGateway::start(&data).await;
    gw.get(AUDITOR, "/fhir/Task").await;
    gw.stop().await;
    assert!(
        matches!(verify(&data, None), Verdict::Intact { records: 7, .. }),
        "{:?}",
        verify(&data, None)
    );
}

#[tokio::test]
async fn every_write_has_a_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (_, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    assert_eq!(
        gw.transition(CRAFTS, &tid, with_reason("cancelled", "moved away"))
            .await
            .status,
        200
    );
    let r = gw
        .get(AUDITOR, &format!("/fhir/Provenance?target=Task/{tid}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.entries();
    let targets: Vec<&str> = p
        .iter()
        .map(|p| p["target"][0]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        vec![
            format!("Task/{tid}/_history/1"),
            format!("Task/{tid}/_history/2"),
            format!("Task/{tid}/_history/3")
        ]
    );
    let agents: Vec<&str> = p
        .iter()
        .map(|p| {
            p["agent"][0]["who"]["identifier"]["value"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        agents,
        vec!["gp-pennine", "provider-crafts", "provider-crafts"]
    );
    assert_eq!(p[0]["activity"]["coding"][0]["code"], "CREATE");
    assert_eq!(p[1]["activity"]["coding"][0]["code"], "UPDATE");
    // The routing decision, on the Task's first Provenance.
    let reason = p[0]["reason"][0]["text"].as_str().unwrap();
    assert!(
        reason.contains("loneliness-pendle") && reason.contains("capacity"),
        "{reason}"
    );
    // Each points at the AuditEvent of its write; all valid R4.
    for prov in &p {
        let ae = prov["entity"][0]["what"]["reference"].as_str().unwrap();
        assert_eq!(gw.get(AUDITOR, &format!("/fhir/{ae}")).await.status, 200);
        assert!(
            sp_gateway::schema::check_fhir("Provenance", prov)
                .unwrap()
                .is_empty(),
            "{prov}"
        );
    }
    // The ServiceRequest: created, then revoked with the cancellation.
    let r = gw
        .get(
            AUDITOR,
            &format!("/fhir/Provenance?target=ServiceRequest/{sid}"),
        )
        .await;
    assert_eq!(r.entries().len(), 2);
    // Auditors only.
    assert_eq!(
        gw.get(GP, &format!("/fhir/Provenance?target=Task/{tid}"))
            .await
            .status,
        403
    );
    assert_eq!(
        gw.get(CRAFTS, &format!("/fhir/Provenance?target=Task/{tid}"))
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn a_referral_trail_in_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (pid, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": { "reference": format!("Patient/{pid}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
        "performer": [{ "reference": "Organization/pendle-crafts" }], "valueInteger": 25
    });
    assert_eq!(
        gw.post_json(CRAFTS, "/fhir/Observation", &obs).await.status,
        201
    );
    gw.get(
        GP,
        &format!("/fhir/Observation?based-on=ServiceRequest/{sid}"),
    )
    .await;
    let r = gw
        .get(AUDITOR, &format!("/fhir/ServiceRequest/{sid}/$trail"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let kinds: Vec<String> = r
        .entries()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["resourceType"].as_str().unwrap(),
                e["meta"]["versionId"].as_str().unwrap_or("")
            )
        })
        .collect();
    // Versions and events, in time order: the referral written (Patient, ServiceRequest,
    // Task v1 and the create event), the provider's read and accept (Task v2 and its event),
    // the Observation and its event.
    for want in [
        "Patient/1",
        "ServiceRequest/1",
        "Task/1",
        "Task/2",
        "Observation/1",
    ] {
        assert!(
            kinds.contains(&want.to_string()),
            "{want} missing from {kinds:?}"
        );
    }
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap();
    assert!(
        pos("Task/1") < pos("Task/2") && pos("Task/2") < pos("Observation/1"),
        "{kinds:?}"
    );
    let events = r
        .entries()
        .iter()
        .filter(|e| e["resourceType"] == "AuditEvent")
        .count();
    assert!(events >= 4, "{kinds:?}");
    assert_eq!(
        gw.get(GP, &format!("/fhir/ServiceRequest/{sid}/$trail"))
            .await
            .status,
        403
    );
}

/// Issue #11: who saw a referral. A provider's poll that returns a Task is recorded, as IHE
/// BALP does, with every resource it disclosed (the Task, the ServiceRequest it included,
/// and their Patient) as entities: `AuditEvent?entity=Task/{id}`, `?entity=Patient/{id}` and
/// the referral's `$trail` all show that poll, with the provider as agent and in time
/// order. A poll that returns nothing, and a refused read, disclose nothing.
#[tokio::test]
async fn a_poll_that_returns_a_referral_is_on_its_trail() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (pid, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    // Another provider polls: it sees nothing, so nothing of this referral is disclosed.
    let empty = gw
        .get(
            MONEY,
            "/fhir/Task?owner=Organization/burnley-money-advice&status=requested",
        )
        .await;
    assert_eq!(empty.status, 200);
    assert!(empty.entries().is_empty());
    let poll = gw
        .get(
            CRAFTS,
            "/fhir/Task?owner=Organization/pendle-crafts&status=requested&_include=Task:focus",
        )
        .await;
    assert_eq!(poll.status, 200, "{}", poll.body);
    assert!(poll.entries().iter().any(|e| e["id"] == json!(tid)));

    let by = |entity: String| {
        let gw = &gw;
        async move {
            gw.get(
                AUDITOR,
                &format!("/fhir/AuditEvent?entity={entity}&_count=200"),
            )
            .await
            .entries()
        }
    };
    for entity in [
        format!("Task/{tid}"),
        format!("ServiceRequest/{sid}"),
        format!("Patient/{pid}"),
    ] {
        let events = by(entity.clone()).await;
        let polls: Vec<&Value> = events
            .iter()
            .filter(|e| e["subtype"][0]["code"] == "search-type")
            .collect();
        assert_eq!(polls.len(), 1, "{entity}: {events:?}");
        let p = polls[0];
        assert_eq!(
            p["agent"][0]["who"]["identifier"]["value"],
            "provider-crafts"
        );
        assert_eq!(p["outcome"], "0");
        // The patient is named as such (BALP): a Person in the role of Patient.
        let patient = p["entity"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["what"]["reference"] == json!(format!("Patient/{pid}")))
            .unwrap_or_else(|| panic!("no patient entity: {p}"));
        assert_eq!(patient["type"]["code"], "1");
        assert_eq!(patient["role"]["code"], "1");
        assert!(
            sp_gateway::schema::check_fhir("AuditEvent", p)
                .unwrap()
                .is_empty(),
            "{p}"
        );
        // The other provider's empty poll disclosed none of it.
        assert!(events
            .iter()
            .all(|e| e["agent"][0]["who"]["identifier"]["value"] != "provider-money"));
    }
    // The referral's trail shows the poll after the create, with the provider as agent.
    let trail = gw
        .get(AUDITOR, &format!("/fhir/ServiceRequest/{sid}/$trail"))
        .await;
    assert_eq!(trail.status, 200, "{}", trail.body);
    let events: Vec<(String, String)> = trail
        .entries()
        .iter()
        .filter(|e| e["resourceType"] == "AuditEvent")
        .map(|e| {
            (
                e["agent"][0]["who"]["identifier"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                e["subtype"][0]["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let create = events
        .iter()
        .position(|e| e == &("gp-pennine".to_string(), "create".to_string()))
        .unwrap_or_else(|| panic!("{events:?}"));
    let seen = events
        .iter()
        .position(|e| e == &("provider-crafts".to_string(), "search-type".to_string()))
        .unwrap_or_else(|| panic!("the provider's poll is not on the trail: {events:?}"));
    assert!(create < seen, "{events:?}");
}
