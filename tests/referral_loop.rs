//! The referral loop, end to end, over real HTTP against a real server on a real sled store.

use crate::common::*;
use serde_json::{json, Value};
use sp_gateway::fhir::{feedback_system, task_reason_system, CODE_SP_DECLINED, SNOMED};

fn swemwbs(sr: &str, patient: &str, provider: &str, value: i64) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [{ "system": SNOMED, "code": "718466001", "display": "SWEMWBS score" }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sr}") }],
        "performer": [{ "reference": format!("Organization/{provider}") }],
        "effectiveDateTime": "2026-11-21T09:00:00Z",
        "valueInteger": value
    })
}

fn feedback(sr: &str, patient: &str, provider: &str, text: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [{ "system": feedback_system(), "code": "link-worker-feedback" }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sr}") }],
        "performer": [{ "reference": format!("Organization/{provider}") }],
        "valueString": text
    })
}

#[tokio::test]
async fn whole_loop_referral_to_outcome_back_at_the_gp() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;

    // 1. The GP refers Ada (loneliness, BB9): routed to the Pendle crafting group.
    let r = gw
        .post_json(GP, "/referrals", &fixture("referral-ada.json"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let loc = r.headers["location"].to_str().unwrap().to_string();
    let entries = r.entries();
    assert_eq!(entries.len(), 3);
    let (patient, sr, task) = (&entries[0], &entries[1], &entries[2]);
    assert_eq!(patient["resourceType"], "Patient");
    assert_eq!(
        patient["identifier"][0]["system"],
        "https://fhir.nhs.uk/Id/nhs-number"
    );
    assert_eq!(sr["code"]["coding"][0]["code"], "871731000000106");
    assert_eq!(sr["category"][0]["coding"][0]["code"], "3457005");
    assert_eq!(sr["requester"]["identifier"]["value"], "P81001");
    assert!(
        loc.contains(&format!("/ServiceRequest/{}", sr["id"].as_str().unwrap())),
        "{loc}"
    );
    assert_eq!(task["status"], "requested");
    assert_eq!(task["owner"]["reference"], "Organization/pendle-crafts");
    assert_eq!(
        task["focus"]["reference"],
        format!("ServiceRequest/{}", sr["id"].as_str().unwrap())
    );
    let routing = &task["extension"][0]["extension"];
    assert_eq!(routing[0]["valueString"], "loneliness-pendle");
    assert!(routing[1]["valueString"]
        .as_str()
        .unwrap()
        .contains("has capacity"));
    let (pid, sid, tid) = (
        patient["id"].as_str().unwrap().to_string(),
        sr["id"].as_str().unwrap().to_string(),
        task["id"].as_str().unwrap().to_string(),
    );

    // 2. The provider polls its queue and sees the Task, and can read the referral and patient.
    let poll = gw
        .get(
            CRAFTS,
            "/fhir/Task?owner=Organization/pendle-crafts&status=requested&_count=50",
        )
        .await;
    assert_eq!(poll.status, 200, "{}", poll.body);
    assert_eq!(poll.body["type"], "searchset");
    let ids: Vec<String> = poll
        .entries()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![tid.clone()]);
    assert_eq!(
        gw.get(CRAFTS, &format!("/fhir/ServiceRequest/{sid}"))
            .await
            .status,
        200
    );
    assert_eq!(
        gw.get(CRAFTS, &format!("/fhir/Patient/{pid}")).await.status,
        200
    );

    // 3. Accept, start.
    let r = gw.transition(CRAFTS, &tid, status_to("accepted")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.etag(), "W/\"2\"");
    let r = gw.transition(CRAFTS, &tid, status_to("in-progress")).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // 4. Outcome measure and free-text feedback.
    let o1 = gw
        .post_json(
            CRAFTS,
            "/fhir/Observation",
            &swemwbs(&sid, &pid, "pendle-crafts", 24),
        )
        .await;
    assert_eq!(o1.status, 201, "{}", o1.body);
    assert!(o1.headers["location"]
        .to_str()
        .unwrap()
        .contains("/Observation/"));
    let o2 = gw
        .post_json(
            CRAFTS,
            "/fhir/Observation",
            &feedback(&sid, &pid, "pendle-crafts", "Came to three sessions."),
        )
        .await;
    assert_eq!(o2.status, 201, "{}", o2.body);
    // Out of range: refused.
    let bad = gw
        .post_json(
            CRAFTS,
            "/fhir/Observation",
            &swemwbs(&sid, &pid, "pendle-crafts", 36),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.expression(), "Observation.valueInteger");

    // 5. Complete, naming the outcome.
    let oid = o1.body["id"].as_str().unwrap().to_string();
    let r = gw
        .transition(CRAFTS, &tid, |t| {
            t["status"] = json!("completed");
            t["output"] = json!([{ "type": { "text": "SWEMWBS" }, "valueReference": { "reference": format!("Observation/{oid}") } }]);
        })
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "completed");

    // 6. The GP pulls what happened.
    let obs = gw
        .get(
            GP,
            &format!("/fhir/Observation?based-on=ServiceRequest/{sid}"),
        )
        .await;
    assert_eq!(obs.status, 200, "{}", obs.body);
    let codes: Vec<Value> = obs
        .entries()
        .iter()
        .map(|o| o["code"]["coding"][0]["code"].clone())
        .collect();
    assert_eq!(
        codes,
        vec![json!("718466001"), json!("link-worker-feedback")]
    );
    let tasks = gw
        .get(
            GP,
            "/fhir/Task?requester=Organization/P81001&_lastUpdated=gt2026-01-01T00:00:00Z",
        )
        .await;
    assert_eq!(tasks.status, 200);
    assert_eq!(tasks.entries()[0]["status"], "completed");
    // Nothing left in the provider's requested queue.
    let poll = gw
        .get(CRAFTS, "/fhir/Task?owner=pendle-crafts&status=requested")
        .await;
    assert!(poll.entries().is_empty());

    // History: four versions of the Task, newest first; vread of the first.
    let h = gw.get(GP, &format!("/fhir/Task/{tid}/_history")).await;
    assert_eq!(h.status, 200);
    let statuses: Vec<Value> = h.entries().iter().map(|t| t["status"].clone()).collect();
    assert_eq!(
        statuses,
        vec![
            json!("completed"),
            json!("in-progress"),
            json!("accepted"),
            json!("requested")
        ]
    );
    let v1 = gw.get(GP, &format!("/fhir/Task/{tid}/_history/1")).await;
    assert_eq!(v1.body["status"], "requested");
    // Final: no more feedback, no more changes.
    let late = gw
        .post_json(
            CRAFTS,
            "/fhir/Observation",
            &swemwbs(&sid, &pid, "pendle-crafts", 30),
        )
        .await;
    assert_eq!(late.status, 422);
    let r = gw.transition(CRAFTS, &tid, status_to("in-progress")).await;
    assert_eq!(r.status, 422);
}

#[tokio::test]
async fn decline_writes_the_declined_code_back() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    // Coded decline.
    let (_, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let r = gw
        .transition(CRAFTS, &tid, |t| {
            t["status"] = json!("rejected");
            t["statusReason"] = json!({ "coding": [{ "system": task_reason_system(), "code": "patient-declined" }] });
        })
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let obs = gw
        .get(
            GP,
            &format!("/fhir/Observation?based-on=ServiceRequest/{sid}"),
        )
        .await;
    let e = obs.entries();
    assert_eq!(e.len(), 1, "{}", obs.body);
    assert_eq!(e[0]["code"]["coding"][0]["code"], CODE_SP_DECLINED);
    assert_eq!(e[0]["status"], "final");
    assert_eq!(
        e[0]["performer"][0]["reference"],
        "Organization/pendle-crafts"
    );

    // Declined by text; and a rejection for another reason writes no Observation.
    let (_, sid2, tid2) = gw
        .refer(
            GP,
            &variant("referral-ada.json", "EMIS-DECLINE-2", Some("9990000034")),
        )
        .await;
    let r = gw
        .transition(CRAFTS, &tid2, with_reason("rejected", "Patient declined"))
        .await;
    assert_eq!(r.status, 200);
    let obs = gw
        .get(
            GP,
            &format!("/fhir/Observation?based-on=ServiceRequest/{sid2}"),
        )
        .await;
    assert_eq!(obs.entries().len(), 1);
    let (_, sid3, tid3) = gw
        .refer(
            GP,
            &variant("referral-ada.json", "EMIS-DECLINE-3", Some("9990000042")),
        )
        .await;
    let r = gw
        .transition(CRAFTS, &tid3, with_reason("rejected", "group is full"))
        .await;
    assert_eq!(r.status, 200);
    let obs = gw
        .get(
            GP,
            &format!("/fhir/Observation?based-on=ServiceRequest/{sid3}"),
        )
        .await;
    assert!(obs.entries().is_empty());
}

#[tokio::test]
async fn gp_cancels_its_referral() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (_, _, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    // Without a reason: refused.
    let r = gw.transition(GP, &tid, status_to("cancelled")).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "Task.statusReason");
    // A GP may not do the provider's work.
    let r = gw.transition(GP, &tid, status_to("in-progress")).await;
    assert_eq!(r.status, 422);
    let r = gw
        .transition(GP, &tid, with_reason("cancelled", "patient moved away"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Cancelled is final.
    let r = gw.transition(CRAFTS, &tid, status_to("in-progress")).await;
    assert_eq!(r.status, 422);
    // Another GP system cannot see or cancel it.
    assert_eq!(gw.get(GP2, &format!("/fhir/Task/{tid}")).await.status, 404);
}

/// Takes a fresh referral's Task along `path` (each step legal), returning its id.
async fn task_at(gw: &TestGateway, n: usize, path: &[&str]) -> String {
    let nhs = std::fs::read_to_string(fixtures().join("nhs-numbers.txt")).unwrap();
    let nhs: Vec<&str> = nhs.lines().filter(|l| !l.starts_with('#')).collect();
    let (_, sid, tid) = gw
        .refer(
            GP,
            &variant(
                "referral-ada.json",
                &format!("ILLEGAL-{n}"),
                Some(nhs[n % nhs.len()]),
            ),
        )
        .await;
    for step in path {
        let r = match *step {
            "on-hold" | "rejected" | "cancelled" | "failed" => {
                gw.transition(CRAFTS, &tid, with_reason(step, "reason given"))
                    .await
            }
            "completed" => {
                let t = gw.get(CRAFTS, &format!("/fhir/Task/{tid}")).await.body;
                let patient = t["for"]["reference"].as_str().unwrap().to_string();
                let obs = json!({
                    "resourceType": "Observation", "status": "final",
                    "code": { "coding": [{ "system": SNOMED, "code": "718466001" }] },
                    "subject": { "reference": patient },
                    "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
                    "performer": [{ "reference": "Organization/pendle-crafts" }],
                    "valueInteger": 20
                });
                let o = gw.post_json(CRAFTS, "/fhir/Observation", &obs).await;
                assert_eq!(o.status, 201, "{}", o.body);
                let oid = o.body["id"].as_str().unwrap().to_string();
                gw.transition(CRAFTS, &tid, |t| {
                    t["status"] = json!("completed");
                    t["output"] = json!([{ "type": { "text": "x" }, "valueReference": { "reference": format!("Observation/{oid}") } }]);
                })
                .await
            }
            s => gw.transition(CRAFTS, &tid, status_to(s)).await,
        };
        assert_eq!(r.status, 200, "step to {step}: {}", r.body);
    }
    tid
}

#[tokio::test]
async fn every_illegal_transition_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let paths: &[(&str, &[&str])] = &[
        ("requested", &[]),
        ("accepted", &["accepted"]),
        ("in-progress", &["accepted", "in-progress"]),
        ("on-hold", &["accepted", "in-progress", "on-hold"]),
        ("completed", &["accepted", "in-progress", "completed"]),
        ("rejected", &["rejected"]),
        ("cancelled", &["cancelled"]),
        ("failed", &["accepted", "failed"]),
    ];
    // (from, to, with a statusReason?, the element the 422 names)
    let illegal: &[(&str, &str, bool, &str)] = &[
        ("requested", "in-progress", true, "Task.status"),
        ("requested", "completed", true, "Task.status"),
        ("requested", "on-hold", true, "Task.status"),
        ("requested", "failed", true, "Task.status"),
        ("requested", "draft", true, "Task.status"),
        ("requested", "rejected", false, "Task.statusReason"),
        ("requested", "cancelled", false, "Task.statusReason"),
        ("accepted", "requested", true, "Task.status"),
        ("accepted", "on-hold", true, "Task.status"),
        ("accepted", "rejected", true, "Task.status"),
        ("accepted", "completed", false, "Task.output"),
        ("accepted", "failed", false, "Task.statusReason"),
        ("accepted", "cancelled", false, "Task.statusReason"),
        ("in-progress", "accepted", true, "Task.status"),
        ("in-progress", "requested", true, "Task.status"),
        ("in-progress", "rejected", true, "Task.status"),
        ("in-progress", "on-hold", false, "Task.statusReason"),
        ("in-progress", "failed", false, "Task.statusReason"),
        ("in-progress", "cancelled", false, "Task.statusReason"),
        ("in-progress", "completed", false, "Task.output"),
        ("on-hold", "accepted", true, "Task.status"),
        ("on-hold", "rejected", true, "Task.status"),
        ("on-hold", "requested", true, "Task.status"),
        ("on-hold", "completed", false, "Task.output"),
        ("on-hold", "failed", false, "Task.statusReason"),
        ("on-hold", "cancelled", false, "Task.statusReason"),
    ];
    let finals = [
        "requested",
        "accepted",
        "in-progress",
        "on-hold",
        "completed",
        "rejected",
        "cancelled",
        "failed",
    ];
    let mut checked = 0;
    for (n, (from, path)) in paths.iter().enumerate() {
        let tid = task_at(&gw, n, path).await;
        let mut cases: Vec<(&str, bool, &str)> = illegal
            .iter()
            .filter(|(f, ..)| f == from)
            .map(|(_, to, reason, expr)| (*to, *reason, *expr))
            .collect();
        if sp_gateway::workflow::is_final(from) {
            // Final: nothing changes any more, whatever the new status.
            cases.extend(finals.iter().map(|to| (*to, true, "Task.status")));
        }
        for (to, reason, expr) in cases {
            let before = gw.digest();
            let r = gw
                .transition(CRAFTS, &tid, |t| {
                    t["status"] = json!(to);
                    if reason {
                        t["statusReason"] = json!({ "text": "a reason" });
                    } else if let Some(o) = t.as_object_mut() {
                        o.remove("statusReason");
                    }
                    if let Some(o) = t.as_object_mut() {
                        if to == "completed" && !sp_gateway::workflow::is_final(from) {
                            o.remove("output");
                        }
                    }
                })
                .await;
            assert_eq!(r.status, 422, "{from} → {to}: {}", r.body);
            assert_eq!(r.body["resourceType"], "OperationOutcome");
            assert_eq!(r.expression(), expr, "{from} → {to}: {}", r.body);
            assert_eq!(gw.digest(), before, "{from} → {to} changed the store");
            checked += 1;
        }
        // The GP: anything but a cancel with a reason is refused.
        if !sp_gateway::workflow::is_final(from) {
            for to in ["accepted", "in-progress", "completed", "requested"] {
                let r = gw.transition(GP, &tid, with_reason(to, "x")).await;
                assert_eq!(r.status, 422, "GP {from} → {to}");
                checked += 1;
            }
            let before = gw.digest();
            let r = gw
                .transition(GP, &tid, |t| {
                    t["status"] = json!("cancelled");
                    t["statusReason"] = json!({ "text": "moved away" });
                    t["businessStatus"] = json!({ "text": "the GP says so" });
                })
                .await;
            assert_eq!(r.status, 422, "GP may not set businessStatus");
            assert_eq!(r.expression(), "Task.businessStatus");
            assert_eq!(gw.digest(), before);
        }
    }
    // A status that is not a FHIR Task status at all is malformed: 400.
    let tid = task_at(&gw, 20, &[]).await;
    let r = gw.transition(CRAFTS, &tid, status_to("made-up")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.expression(), "Task.status");
    assert!(checked > 60, "only {checked} illegal changes tried");

    // Completing with an output that is not this referral's Observation.
    let tid = task_at(&gw, 21, &["accepted"]).await;
    let before = gw.digest();
    let r = gw
        .transition(CRAFTS, &tid, |t| {
            t["status"] = json!("completed");
            t["output"] = json!([{ "type": { "text": "x" }, "valueReference": { "reference": "Observation/nope" } }]);
        })
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "Task.output[0].valueReference");
    assert_eq!(gw.digest(), before);
}

#[tokio::test]
async fn the_service_request_follows_its_task_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    for (n, path, expected) in [
        (
            0,
            &["accepted", "in-progress", "completed"][..],
            "completed",
        ),
        (1, &["rejected"][..], "revoked"),
        (2, &["accepted", "failed"][..], "revoked"),
        (3, &["accepted"][..], "active"),
    ] {
        let tid = task_at(&gw, n, path).await;
        let t = gw.get(GP, &format!("/fhir/Task/{tid}")).await.body;
        let sr = t["focus"]["reference"].as_str().unwrap();
        let r = gw.get(GP, &format!("/fhir/{sr}")).await;
        assert_eq!(r.body["status"], expected, "{path:?}");
    }
}

#[tokio::test]
async fn if_match_is_honoured_when_sent_and_required_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (_, _, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let read = gw.get(CRAFTS, &format!("/fhir/Task/{tid}")).await;
    assert_eq!(read.etag(), "W/\"1\"");
    assert!(read.headers.contains_key("last-modified"));
    let mut t = read.body.clone();
    t["status"] = json!("accepted");
    let before = gw.digest();
    assert_eq!(gw.put_task(CRAFTS, &t, Some("W/\"7\"")).await.status, 412);
    assert_eq!(gw.put_task(CRAFTS, &t, Some("garbage")).await.status, 400);
    assert_eq!(gw.digest(), before);
    // No If-Match (as fhirpy's save() sends): the change applies to the current version.
    let r = gw.put_task(CRAFTS, &t, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.etag(), "W/\"2\"");
    // The ETag read before that change is stale now: 412.
    let r = gw.put_task(CRAFTS, &t, Some("W/\"1\"")).await;
    assert_eq!(r.status, 412);
    assert_eq!(r.body["resourceType"], "OperationOutcome");

    // A deployment may require If-Match: then its absence is 428, naming the header.
    let dir2 = tempfile::tempdir().unwrap();
    let strict = TestGateway::start_with(
        dir2.path(),
        config_text(|c| {
            c.replacen(
                "max_body_bytes = 262144\n",
                "max_body_bytes = 262144\nrequire_if_match = true\n",
                1,
            )
        }),
    )
    .await;
    let (_, _, tid2) = strict.refer(GP, &fixture("referral-ada.json")).await;
    let mut t2 = strict.get(CRAFTS, &format!("/fhir/Task/{tid2}")).await.body;
    t2["status"] = json!("accepted");
    let before = strict.digest();
    let r = strict.put_task(CRAFTS, &t2, None).await;
    assert_eq!(r.status, 428, "{}", r.body);
    assert_eq!(r.expression(), "If-Match");
    assert_eq!(strict.digest(), before);
    assert_eq!(
        strict.put_task(CRAFTS, &t2, Some("W/\"1\"")).await.status,
        200
    );

    // Elements a client may not change.
    let mut t = gw.get(CRAFTS, &format!("/fhir/Task/{tid}")).await.body;
    t["owner"] = json!({ "reference": "Organization/burnley-money-advice" });
    let r = gw.put_task(CRAFTS, &t, Some("W/\"2\"")).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "Task.owner");
}

#[tokio::test]
async fn nothing_is_lost_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = TestGateway::start(dir.path()).await;
    let (pid, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    gw.restart().await;
    let poll = gw
        .get(CRAFTS, "/fhir/Task?owner=pendle-crafts&status=requested")
        .await;
    assert_eq!(poll.entries().len(), 1);
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    gw.restart().await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("in-progress"))
            .await
            .status,
        200
    );
    let o = gw
        .post_json(
            CRAFTS,
            "/fhir/Observation",
            &swemwbs(&sid, &pid, "pendle-crafts", 20),
        )
        .await;
    assert_eq!(o.status, 201);
    gw.restart().await;
    let t = gw.get(GP, &format!("/fhir/Task/{tid}")).await;
    assert_eq!(t.body["status"], "in-progress");
    assert_eq!(t.etag(), "W/\"3\"");
    let obs = gw
        .get(
            GP,
            &format!("/fhir/Observation?based-on=ServiceRequest/{sid}"),
        )
        .await;
    assert_eq!(obs.entries().len(), 1);
    // Idempotency survives a restart too.
    let again = gw
        .post_json(GP, "/referrals", &fixture("referral-ada.json"))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.entries()[2]["id"], json!(tid));
}

#[tokio::test]
async fn resubmission_is_idempotent_and_changed_content_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let first = gw
        .post_json(GP, "/referrals", &fixture("referral-ada.json"))
        .await;
    assert_eq!(first.status, 201);
    let before = gw.digest();
    let again = gw
        .post_json(GP, "/referrals", &fixture("referral-ada.json"))
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    let ids = |r: &Resp| {
        r.entries()
            .iter()
            .map(|e| e["id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(gw.digest(), before, "a resubmission wrote something");
    let mut changed = fixture("referral-ada.json");
    changed["needs"] = json!(["debt"]);
    let r = gw.post_json(GP, "/referrals", &changed).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["issue"][0]["code"], "duplicate");
    assert_eq!(gw.digest(), before);
    // The same referral id from another practice is another referral.
    let mut other = fixture("referral-ada.json");
    other["practice"]["odsCode"] = json!("P81002");
    assert_eq!(gw.post_json(GP, "/referrals", &other).await.status, 201);
}

#[tokio::test]
async fn concurrent_identical_submissions_create_one_referral() {
    let dir = tempfile::tempdir().unwrap();
    let gw = std::sync::Arc::new(TestGateway::start(dir.path()).await);
    let mut handles = Vec::new();
    for _ in 0..8 {
        let gw = gw.clone();
        handles.push(tokio::spawn(async move {
            gw.post_json(GP, "/referrals", &fixture("referral-ada.json"))
                .await
        }));
    }
    let mut created = 0;
    let mut task_ids = std::collections::HashSet::new();
    for h in handles {
        let r = h.await.unwrap();
        assert!(r.status == 201 || r.status == 200, "{}", r.status);
        created += (r.status == 201) as usize;
        task_ids.insert(r.entries()[2]["id"].clone());
    }
    assert_eq!(created, 1);
    assert_eq!(task_ids.len(), 1);
}

#[tokio::test]
async fn routing_follows_rules_capacity_and_fallback() {
    let dir = tempfile::tempdir().unwrap();
    // Pendle crafts holds only two open Tasks.
    let cfg = config_text(|t| t.replacen("capacity = 25", "capacity = 2", 1));
    let gw = TestGateway::start_with(dir.path(), cfg).await;
    let nhs = ["9990000026", "9990000034", "9990000042"];
    let mut owners = Vec::new();
    for (i, n) in nhs.iter().enumerate() {
        let r = gw
            .post_json(
                GP,
                "/referrals",
                &variant("referral-ada.json", &format!("CAP-{i}"), Some(n)),
            )
            .await;
        assert_eq!(r.status, 201);
        let t = &r.entries()[2];
        owners.push((
            t["owner"]["reference"].as_str().unwrap().to_string(),
            t["extension"][0]["extension"][0]["valueString"]
                .as_str()
                .unwrap()
                .to_string(),
        ));
    }
    assert_eq!(owners[0].0, "Organization/pendle-crafts");
    assert_eq!(owners[1].0, "Organization/pendle-crafts");
    assert_eq!(
        owners[2],
        (
            "Organization/pendle-cvs-hub".to_string(),
            "fallback".to_string()
        )
    );
    // Bob: debt, BB11 → Burnley money advice; Cara: housing → housing help.
    let r = gw
        .post_json(GP, "/referrals", &fixture("referral-bob.json"))
        .await;
    assert_eq!(
        r.entries()[2]["owner"]["reference"],
        "Organization/burnley-money-advice"
    );
    let r = gw
        .post_json(GP2, "/referrals", &fixture("referral-cara.json"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.entries()[2]["owner"]["reference"],
        "Organization/east-lancs-housing"
    );
    assert_eq!(r.entries()[0]["address"][0]["postalCode"], "BB8 9ZZ");
    // Closing a Task frees capacity.
    let poll = gw.get(CRAFTS, "/fhir/Task?status=requested").await;
    let first = poll.entries()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        gw.transition(CRAFTS, &first, with_reason("rejected", "not suitable"))
            .await
            .status,
        200
    );
    let r = gw
        .post_json(
            GP,
            "/referrals",
            &variant("referral-ada.json", "CAP-9", Some("9990000050")),
        )
        .await;
    assert_eq!(
        r.entries()[2]["owner"]["reference"],
        "Organization/pendle-crafts"
    );
}

#[tokio::test]
async fn polling_pages_through_the_queue_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let nhs = std::fs::read_to_string(fixtures().join("nhs-numbers.txt")).unwrap();
    let nhs: Vec<&str> = nhs.lines().filter(|l| !l.starts_with('#')).collect();
    let mut made = Vec::new();
    for (i, n) in nhs.iter().take(7).enumerate() {
        let (_, _, t) = gw
            .refer(
                GP,
                &variant("referral-ada.json", &format!("PAGE-{i}"), Some(n)),
            )
            .await;
        made.push(t);
    }
    let mut seen = Vec::new();
    let mut url = "/fhir/Task?owner=pendle-crafts&status=requested&_count=3".to_string();
    let mut pages = 0;
    loop {
        let r = gw.get(CRAFTS, &url).await;
        assert_eq!(r.status, 200, "{}", r.body);
        pages += 1;
        seen.extend(
            r.entries()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_string()),
        );
        match r.next_link() {
            Some(n) => url = n,
            None => break,
        }
        // A write between pages does not disturb the walk.
        if pages == 1 {
            gw.refer(GP, &variant("referral-ada.json", "PAGE-late", Some(nhs[8])))
                .await;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        &seen[..7],
        &made[..],
        "oldest first, none skipped or repeated"
    );
    // Incremental polling: only what changed after the last seen instant.
    let all = gw
        .get(CRAFTS, "/fhir/Task?owner=pendle-crafts")
        .await
        .entries();
    let last = all.last().unwrap()["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    let r = gw
        .get(
            CRAFTS,
            &format!(
                "/fhir/Task?owner=pendle-crafts&_lastUpdated=gt{}",
                last.replace('+', "%2B")
            ),
        )
        .await;
    assert!(r.entries().is_empty(), "{}", r.body);
    // Bad parameters are refused, not ignored.
    assert_eq!(gw.get(CRAFTS, "/fhir/Task?colour=red").await.status, 400);
    assert_eq!(gw.get(CRAFTS, "/fhir/Task?_count=201").await.status, 400);
    assert_eq!(gw.get(CRAFTS, "/fhir/Task?_count=0").await.body["total"], 8);
    assert_eq!(gw.get(CRAFTS, "/fhir/Task?status=nope").await.status, 400);
    assert_eq!(
        gw.get(CRAFTS, "/fhir/Task?_cursor=../../etc").await.status,
        400
    );
}
