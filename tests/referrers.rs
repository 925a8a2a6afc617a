//! Referrals from systems that are not GP practices (`referrer` clients: here the council's
//! social care system), self-referrals and carers' referrals through the FHIR API: the
//! source of referral each records, who may see them, and that a GP practice learns of one
//! only when the person agreed.

use crate::common::*;
use serde_json::{json, Value};

const SOR_SYSTEM: &str = "https://sp-gateway.example.org/fhir/CodeSystem/source-of-referral";
const SOR_EXT: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-SourceOfServiceRequest";
const INFORM_GP: &str = "https://sp-gateway.example.org/fhir/StructureDefinition/inform-gp";
const SCOPE_EXT: &str = "https://sp-gateway.example.org/fhir/StructureDefinition/referral-scope";

/// Eve, referred by a social worker (a contained Practitioner); no NHS number; registered
/// with P81001; lonely in BB9 (routes to the crafting group).
fn eve() -> Value {
    fixture("fhir/transaction-council-eve.json")
}

fn with_id(mut b: Value, id: &str) -> Value {
    b["entry"][1]["resource"]["identifier"][0]["value"] = json!(id);
    b
}

async fn post(gw: &TestGateway, token: &str, path: &str, body: &Value) -> Resp {
    crate::fhir_api::post_fhir(gw, token, path, body, &[]).await
}

/// (Patient, ServiceRequest, Task) ids of a transaction's answer.
fn ids(r: &Resp) -> (String, String, String) {
    let e = r.body["entry"].as_array().expect("entries");
    let id = |i: usize| e[i]["resource"]["id"].as_str().expect("id").to_string();
    let task = r.headers["x-sp-gateway-task"]
        .to_str()
        .expect("task header")
        .rsplit('/')
        .next()
        .expect("task id")
        .to_string();
    (id(0), id(1), task)
}

fn source_code(sr: &Value) -> Option<String> {
    sr["extension"]
        .as_array()?
        .iter()
        .filter(|e| e["url"] == SOR_EXT)
        .flat_map(|e| {
            e["valueCodeableConcept"]["coding"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|c| c["system"] == SOR_SYSTEM)
        .and_then(|c| c["code"].as_str().map(str::to_string))
}

/// The ServiceRequest entry of a transaction.
fn sr(b: &mut Value) -> &mut Value {
    &mut b["entry"][1]["resource"]
}

fn scope_ext(r: &Value) -> Option<Value> {
    r["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"] == SCOPE_EXT)
        .cloned()
}

fn valid_r4(resource: &Value) {
    let rtype = resource["resourceType"].as_str().expect("resourceType");
    let issues = sp_gateway::schema::check_fhir(rtype, resource).expect("schema");
    assert!(issues.is_empty(), "{rtype}: {issues:?}\n{resource:#}");
    if let Err(e) = fhir_sdk_parse(resource, rtype) {
        panic!("{rtype} does not parse with fhir-sdk: {e:?}\n{resource:#}");
    }
}

#[tokio::test]
async fn a_council_refers_and_only_it_the_provider_and_the_auditor_see_the_referral() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let r = post(&gw, REFERRER, "/fhir", &eve()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (pid, sid, tid) = ids(&r);
    let sr = gw
        .get(REFERRER, &format!("/fhir/ServiceRequest/{sid}"))
        .await;
    assert_eq!(sr.status, 200, "{}", sr.body);
    // Recorded as from social services (the client's configured source), by this client,
    // with no GP practice told; the social worker stays the requester, as sent.
    assert_eq!(source_code(&sr.body).as_deref(), Some("C1"));
    let scope = scope_ext(&sr.body).expect("referral-scope extension");
    assert_eq!(scope["extension"][0]["url"], "referrer");
    assert_eq!(
        scope["extension"][0]["valueIdentifier"]["value"],
        "lancs-social-care"
    );
    assert_eq!(scope["extension"].as_array().unwrap().len(), 1, "{scope}");
    assert_eq!(sr.body["requester"]["reference"], "#social-worker");
    let task = gw.get(CRAFTS, &format!("/fhir/Task/{tid}")).await;
    assert_eq!(
        task.status, 200,
        "routed to the crafting group: {}",
        task.body
    );
    // The Task cannot point into the ServiceRequest's contained resources: it names the
    // requester by type and display instead.
    assert_eq!(
        task.body["requester"],
        json!({ "type": "Practitioner", "display": "Jo Okafor, social worker, Lancashire adult social care" })
    );
    for resource in [&sr.body, &task.body, &r.body["entry"][0]["resource"]] {
        valid_r4(resource);
    }

    // The referrer reads what it referred, and finds it by search.
    for path in [
        format!("/fhir/Patient/{pid}"),
        format!("/fhir/Task/{tid}"),
        format!("/fhir/Task/{tid}/_history"),
    ] {
        assert_eq!(gw.get(REFERRER, &path).await.status, 200, "{path}");
    }
    let found = gw.get(REFERRER, "/fhir/Task").await;
    assert_eq!(found.entries().len(), 1, "{}", found.body);
    let found = gw.get(REFERRER, "/fhir/ServiceRequest?identifier=https://social-care.lancashire.example/Id/case-referral|ASC-2026-0042").await;
    assert_eq!(found.entries().len(), 1, "{}", found.body);
    // Eve did not agree that her GP practice be told: it sees nothing of her.
    for path in [
        format!("/fhir/Patient/{pid}"),
        format!("/fhir/ServiceRequest/{sid}"),
        format!("/fhir/Task/{tid}"),
    ] {
        assert_eq!(gw.get(GP, &path).await.status, 404, "{path}");
    }
    let gp_tasks = gw.get(GP, "/fhir/Task").await;
    assert!(
        !gp_tasks.body.to_string().contains(&tid),
        "{}",
        gp_tasks.body
    );
    assert_eq!(
        gw.get(AUDITOR, &format!("/fhir/Task/{tid}")).await.status,
        200
    );

    // The provider's outcome reaches the referrer (pull), and no GP outbox entry is made.
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    let obs = gw.post_outcome(&sid, &pid, 50).await;
    let oid = obs["id"].as_str().unwrap();
    assert_eq!(
        gw.get(REFERRER, &format!("/fhir/Observation/{oid}"))
            .await
            .status,
        200
    );
    assert_eq!(
        gw.get(GP, &format!("/fhir/Observation/{oid}")).await.status,
        404
    );
    let outbox = gw.get(ADMIN, "/admin/outbox").await;
    assert!(!outbox.body.to_string().contains(oid), "{}", outbox.body);

    // Sent again: the same referral (200, same ids), nothing written.
    let before = gw.digest();
    let again = post(&gw, REFERRER, "/fhir", &eve()).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(ids(&again), (pid.clone(), sid.clone(), tid.clone()));
    assert_eq!(gw.digest(), before);

    // The referrer may cancel its own referral, and nothing else.
    assert_eq!(
        gw.transition(REFERRER, &tid, status_to("in-progress"))
            .await
            .status,
        422
    );
    let cancelled = gw
        .transition(
            REFERRER,
            &tid,
            with_reason("cancelled", "moved out of the area"),
        )
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
}

#[tokio::test]
async fn with_consent_the_persons_own_practice_is_told_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let mut b = eve();
    b["entry"][1]["resource"]["extension"] = json!([{ "url": INFORM_GP, "valueBoolean": true }]);
    let r = post(&gw, REFERRER, "/fhir", &b).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (pid, sid, tid) = ids(&r);
    let sr = gw.get(GP, &format!("/fhir/ServiceRequest/{sid}")).await;
    assert_eq!(sr.status, 200, "the practice was told: {}", sr.body);
    let scope = scope_ext(&sr.body).expect("referral-scope");
    assert_eq!(scope["extension"][1]["url"], "informedPractice");
    assert_eq!(
        scope["extension"][1]["valueReference"]["reference"],
        "Organization/P81001"
    );
    valid_r4(&sr.body);
    for path in [format!("/fhir/Patient/{pid}"), format!("/fhir/Task/{tid}")] {
        assert_eq!(gw.get(GP, &path).await.status, 200, "{path}");
        assert_eq!(gw.get(GP2, &path).await.status, 404, "{path}");
    }
    let listed = gw.get(GP, "/fhir/Task?status=requested").await;
    assert!(listed.body.to_string().contains(&tid), "{}", listed.body);
    // It is not the practice's referral: the practice cannot cancel it, and a search by
    // requester (the practice's own referrals) leaves it out.
    let refused = gw
        .transition(GP, &tid, with_reason("cancelled", "not ours"))
        .await;
    assert_eq!(refused.status, 404, "{}", refused.body);
    let own = gw.get(GP, "/fhir/Task?requester=P81001").await;
    assert!(!own.body.to_string().contains(&tid), "{}", own.body);
    // The outcome goes to the practice, as a GP referral's does.
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    let obs = gw.post_outcome(&sid, &pid, 50).await;
    let oid = obs["id"].as_str().unwrap();
    assert_eq!(
        gw.get(GP, &format!("/fhir/Observation/{oid}")).await.status,
        200
    );
}

#[tokio::test]
async fn self_referrals_and_carers_are_recorded_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    // The person refers themselves: the requester is the transaction's own Patient.
    let mut me = with_id(eve(), "SELF-1");
    let patient_url = me["entry"][0]["fullUrl"].clone();
    let sr = &mut me["entry"][1]["resource"];
    sr.as_object_mut().unwrap().remove("contained");
    sr["requester"] = json!({ "reference": patient_url });
    let r = post(&gw, REFERRER, "/fhir", &me).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (pid, sid, _) = ids(&r);
    let sr = gw
        .get(REFERRER, &format!("/fhir/ServiceRequest/{sid}"))
        .await;
    assert_eq!(sr.body["requester"]["reference"], format!("Patient/{pid}"));
    assert_eq!(source_code(&sr.body).as_deref(), Some("B1"));
    valid_r4(&sr.body);

    // A daughter refers her mother: a contained RelatedPerson.
    let mut carer = with_id(eve(), "CARER-1");
    let sr = &mut carer["entry"][1]["resource"];
    sr["contained"] = json!([{
        "resourceType": "RelatedPerson", "id": "daughter",
        "patient": { "reference": patient_url },
        "relationship": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "DAU", "display": "natural daughter" }] }],
        "name": [{ "family": "Sample", "given": ["Fay"] }]
    }]);
    sr["requester"] = json!({ "reference": "#daughter" });
    let r = post(&gw, REFERRER, "/fhir", &carer).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, sid, _) = ids(&r);
    let sr = gw
        .get(REFERRER, &format!("/fhir/ServiceRequest/{sid}"))
        .await;
    assert_eq!(source_code(&sr.body).as_deref(), Some("B2"));
    valid_r4(&sr.body);

    // A source of referral named in the request is kept (a housing officer's, here), and an
    // NHS number, when given, is kept too.
    let mut housing = with_id(eve(), "HOUSING-1");
    housing["entry"][0]["resource"]["identifier"] =
        json!([{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number(7) }]);
    housing["entry"][1]["resource"]["extension"] = json!([{
        "url": SOR_EXT,
        "valueCodeableConcept": { "coding": [{ "system": SOR_SYSTEM, "code": "C3" }] }
    }]);
    let r = post(&gw, REFERRER, "/fhir", &housing).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, sid, _) = ids(&r);
    let sr = gw
        .get(REFERRER, &format!("/fhir/ServiceRequest/{sid}"))
        .await;
    assert_eq!(source_code(&sr.body).as_deref(), Some("C3"));
    // A GP system's referral is recorded as from a GP practice.
    let gp = post(&gw, GP, "/fhir", &fixture("fhir/transaction-dora.json")).await;
    assert_eq!(gp.status, 200, "{}", gp.body);
    assert_eq!(
        source_code(&gp.body["entry"][1]["resource"]).as_deref(),
        Some("A1")
    );
}

#[tokio::test]
async fn a_referrers_bad_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let before = gw.digest();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut b = eve();
        f(&mut b);
        b
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "no requester",
            edit(&|b| {
                let s = sr(b);
                s.as_object_mut().unwrap().remove("requester");
                s.as_object_mut().unwrap().remove("contained");
            }),
            "Bundle.entry[1].resource.requester",
        ),
        (
            "a GP practice as requester",
            edit(&|b| {
                let s = sr(b);
                s.as_object_mut().unwrap().remove("contained");
                s["requester"] = json!({ "type": "Organization", "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "P81001" } });
            }),
            "Bundle.entry[1].resource.requester.identifier",
        ),
        (
            "a literal reference to a resource the gateway does not hold",
            edit(&|b| {
                let s = sr(b);
                s.as_object_mut().unwrap().remove("contained");
                s["requester"] = json!({ "reference": "Practitioner/123" });
            }),
            "Bundle.entry[1].resource.requester.reference",
        ),
        (
            "a contained reference to nothing",
            edit(&|b| sr(b)["requester"]["reference"] = json!("#nobody")),
            "Bundle.entry[1].resource.requester.reference",
        ),
        (
            "a type that cannot request",
            edit(&|b| sr(b)["requester"]["type"] = json!("Device")),
            "Bundle.entry[1].resource.requester.type",
        ),
        (
            "an unknown source of referral",
            edit(
                &|b| sr(b)["extension"] = json!([{ "url": SOR_EXT, "valueCodeableConcept": { "coding": [{ "system": SOR_SYSTEM, "code": "Z9" }] } }]),
            ),
            "Bundle.entry[1].resource.extension",
        ),
        (
            "the gateway's own scope extension",
            edit(
                &|b| sr(b)["extension"] = json!([{ "url": SCOPE_EXT, "extension": [{ "url": "referrer", "valueIdentifier": { "value": "gp-pennine" } }] }]),
            ),
            "Bundle.entry[1].resource.extension",
        ),
        (
            "consent to tell a GP practice the gateway does not serve",
            edit(&|b| {
                b["entry"][0]["resource"]["generalPractitioner"][0]["identifier"]["value"] =
                    json!("Y99999");
                sr(b)["extension"] = json!([{ "url": INFORM_GP, "valueBoolean": true }]);
            }),
            "Bundle.entry[1].resource.extension",
        ),
        (
            "an NHS number that fails its check digit",
            edit(&|b| {
                b["entry"][0]["resource"]["identifier"] = json!([{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000019" }]);
            }),
            "Bundle.entry[0].resource.identifier[0].value",
        ),
    ];
    for (what, body, expression) in cases {
        let r = post(&gw, REFERRER, "/fhir", &body).await;
        assert_eq!(r.status, 422, "{what}: {}", r.body);
        assert_eq!(r.expression(), expression, "{what}: {}", r.body);
        assert_eq!(gw.digest(), before, "{what}: the store changed");
    }
    // A referrer cannot use the GP systems' EMIS-style endpoint, and a GP system cannot
    // send a referral whose requester is not its practice.
    let emis = gw
        .post_json(REFERRER, "/referrals", &fixture("referral-ada.json"))
        .await;
    assert_eq!(emis.status, 403, "{}", emis.body);
    let gp = post(&gw, GP, "/fhir", &eve()).await;
    assert_eq!(gp.status, 422, "{}", gp.body);
    assert_eq!(gw.digest(), before);
}
