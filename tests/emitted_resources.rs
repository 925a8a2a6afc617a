//! Every resource the gateway emits parses with fhir-sdk's R4B types and validates against
//! the official R4 JSON Schema for its type (profiles/fhir-r4.schema.json).

use crate::common::*;
use serde_json::{json, Value};

fn check(resource: &Value, seen: &mut Vec<String>) {
    let rtype = resource["resourceType"]
        .as_str()
        .expect("resourceType")
        .to_string();
    let issues = sp_gateway::schema::check_fhir(&rtype, resource).expect("schema");
    assert!(
        issues.is_empty(),
        "{rtype} fails the R4 schema: {issues:?}\n{resource:#}"
    );
    if let Err(e) = fhir_sdk_parse(resource, &rtype) {
        panic!("{rtype} does not parse with fhir-sdk: {e:?}\n{resource:#}");
    }
    if let Some(profile) = sp_gateway::fhir::profile_for(&rtype) {
        assert_eq!(
            resource["meta"]["profile"],
            json!([profile]),
            "{rtype} does not carry the gateway's profile"
        );
    }
    seen.push(rtype.clone());
    if rtype == "Bundle" {
        for e in resource["entry"].as_array().into_iter().flatten() {
            check(&e["resource"], seen);
        }
    }
}

#[tokio::test]
async fn everything_emitted_is_valid_r4() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let mut bodies = Vec::new();
    for (token, f) in [
        (GP, "referral-ada.json"),
        (GP, "referral-bob.json"),
        (GP2, "referral-cara.json"),
    ] {
        let r = gw.post_json(token, "/referrals", &fixture(f)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        bodies.push(r.body.clone());
    }
    let ada = &bodies[0]["entry"];
    let (pid, sid, tid) = (
        ada[0]["resource"]["id"].as_str().unwrap().to_string(),
        ada[1]["resource"]["id"].as_str().unwrap().to_string(),
        ada[2]["resource"]["id"].as_str().unwrap().to_string(),
    );
    bodies.push(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .body,
    );
    bodies.push(
        gw.transition(CRAFTS, &tid, status_to("in-progress"))
            .await
            .body,
    );
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718426000", "display": "WEMWBS score" }] },
        "subject": { "reference": format!("Patient/{pid}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
        "performer": [{ "reference": "Organization/pendle-crafts" }],
        "valueInteger": 52
    });
    let o = gw.post_json(CRAFTS, "/fhir/Observation", &obs).await;
    assert_eq!(o.status, 201, "{}", o.body);
    bodies.push(o.body.clone());
    // The decline path: the gateway's own Observation.
    let bob_task = bodies[1]["entry"][2]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = gw
        .transition(
            MONEY,
            &bob_task,
            with_reason("rejected", "patient declined"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    bodies.push(r.body);
    let bob_sr = bodies[1]["entry"][1]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (token, path) in [
        (
            GP,
            format!("/fhir/Observation?based-on=ServiceRequest/{bob_sr}"),
        ),
        (
            GP,
            format!("/fhir/Observation?based-on=ServiceRequest/{sid}"),
        ),
        (
            CRAFTS,
            "/fhir/Task?owner=pendle-crafts&_count=1".to_string(),
        ),
        (GP, format!("/fhir/Task/{tid}/_history")),
        (GP, format!("/fhir/Task/{tid}/_history/1")),
        (GP, format!("/fhir/Patient/{pid}")),
        (GP, "/fhir/Organization/P81001".to_string()),
        (GP, "/fhir/Organization/pendle-crafts".to_string()),
        (GP, "/fhir/metadata".to_string()),
        // Errors are resources too.
        (GP, "/fhir/Task/does-not-exist".to_string()),
        (GP, "/fhir/Task?colour=red".to_string()),
    ] {
        let r = gw.get(token, &path).await;
        bodies.push(r.body);
    }
    let bad = gw
        .post_json(GP, "/referrals", &json!({ "referralId": 1 }))
        .await;
    bodies.push(bad.body);
    let mut seen = Vec::new();
    for b in &bodies {
        check(b, &mut seen);
    }
    for t in [
        "Patient",
        "ServiceRequest",
        "Task",
        "Observation",
        "Bundle",
        "OperationOutcome",
        "Organization",
        "CapabilityStatement",
    ] {
        assert!(seen.iter().any(|s| s == t), "no {t} was checked");
    }
    let declined = bodies
        .iter()
        .flat_map(|b| b["entry"].as_array().cloned().unwrap_or_default())
        .any(|e| e["resource"]["code"]["coding"][0]["code"] == "871711000000103");
    assert!(
        declined,
        "the declined Observation was not among the checked resources"
    );
}

#[tokio::test]
async fn the_server_owns_meta() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (pid, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    // A PUT without meta, then a PUT claiming another profile and version.
    let mut t = gw.get(CRAFTS, &format!("/fhir/Task/{tid}")).await.body;
    t["status"] = json!("accepted");
    t.as_object_mut().unwrap().remove("meta");
    let r = gw.put_task(CRAFTS, &t, Some("W/\"1\"")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["meta"]["profile"],
        json!([sp_gateway::fhir::PROFILE_TASK])
    );
    let mut t = r.body.clone();
    t["status"] = json!("in-progress");
    t["meta"] = json!({ "profile": ["http://evil.example/x"], "versionId": "99" });
    let r = gw.put_task(CRAFTS, &t, Some("W/\"2\"")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["meta"]["profile"],
        json!([sp_gateway::fhir::PROFILE_TASK])
    );
    assert_eq!(r.body["meta"]["versionId"], "3");
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "meta": { "profile": ["http://evil.example/x"], "lastUpdated": "1999-01-01T00:00:00Z" },
        "id": "chosen-by-client",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": { "reference": format!("Patient/{pid}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
        "performer": [{ "reference": "Organization/pendle-crafts" }],
        "valueInteger": 20
    });
    let o = gw.post_json(CRAFTS, "/fhir/Observation", &obs).await;
    assert_eq!(o.status, 201, "{}", o.body);
    assert_eq!(
        o.body["meta"]["profile"],
        json!([sp_gateway::fhir::PROFILE_OBSERVATION])
    );
    assert_ne!(o.body["id"], "chosen-by-client");
    assert_ne!(o.body["meta"]["lastUpdated"], "1999-01-01T00:00:00Z");
}
