//! The FHIR API as FHIR clients use it: transaction ingest, conditional create, PATCH,
//! $validate, conditional reads, content negotiation, Prefer, search parameters, the
//! CapabilityStatement, and the UK Core examples in fixtures/ukcore-examples.

use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};

const FHIR: &str = "application/fhir+json";

fn transaction() -> Value {
    fixture("fhir/transaction-dora.json")
}

pub(crate) async fn post_fhir(
    gw: &TestGateway,
    token: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Resp {
    gw.request(
        Method::POST,
        path,
        Some(token),
        Some(FHIR),
        Some(body.to_string().into_bytes()),
        headers,
    )
    .await
}

#[tokio::test]
async fn transaction_ingest_creates_routes_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let r = post_fhir(&gw, GP, "/fhir", &transaction(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["type"], "transaction-response");
    let e = r.body["entry"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert_eq!(e[1]["response"]["status"], "201 Created");
    let pid = e[0]["resource"]["id"].as_str().unwrap().to_string();
    let sr = &e[1]["resource"];
    let sid = sr["id"].as_str().unwrap().to_string();
    // Stored as sent, with the reference resolved and the server's meta.
    assert_eq!(sr["subject"]["reference"], format!("Patient/{pid}"));
    assert_eq!(sr["note"][0]["text"], "Would like to join a group.");
    assert_eq!(sr["meta"]["versionId"], "1");
    // The gateway made and routed the Task: lonely in BB9 → the crafting group.
    let task_url = r.headers["x-sp-gateway-task"].to_str().unwrap().to_string();
    let t = gw.get(CRAFTS, &task_url).await;
    assert_eq!(t.status, 200);
    assert_eq!(t.body["owner"]["reference"], "Organization/pendle-crafts");
    let found = gw
        .get(CRAFTS, &format!("/fhir/Task?focus=ServiceRequest/{sid}"))
        .await;
    assert_eq!(found.entries().len(), 1);

    // Again: nothing new, the same resources.
    let before = gw.digest();
    let again = post_fhir(&gw, GP, "/fhir", &transaction(), &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["entry"][1]["response"]["status"], "200 OK");
    assert_eq!(again.body["entry"][1]["resource"]["id"], json!(sid));
    assert_eq!(gw.digest(), before);
    // The same identifier with other content: 409.
    let mut changed = transaction();
    changed["entry"][1]["resource"]["priority"] = json!("urgent");
    assert_eq!(post_fhir(&gw, GP, "/fhir", &changed, &[]).await.status, 409);
    assert_eq!(gw.digest(), before);
}

#[tokio::test]
async fn bad_transactions_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let before = gw.digest();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut b = transaction();
        f(&mut b);
        b
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (edit(&|b| b["type"] = json!("batch")), 400, "Bundle.type"),
        (
            edit(&|b| b["entry"][0]["resource"]["identifier"][0]["value"] = json!("9990000061")),
            422,
            "Bundle.entry[0].resource.identifier[0].value",
        ),
        (
            edit(&|b| {
                b["entry"][0]["resource"]
                    .as_object_mut()
                    .unwrap()
                    .remove("identifier");
            }),
            422,
            "Bundle.entry[0].resource.identifier",
        ),
        (
            edit(&|b| b["entry"][1]["resource"]["code"]["coding"][0]["code"] = json!("73761001")),
            422,
            "Bundle.entry[1].resource.code",
        ),
        (
            edit(&|b| {
                b["entry"][1]["resource"]["requester"]["identifier"]["value"] = json!("P81003")
            }),
            422,
            "Bundle.entry[1].resource.requester",
        ),
        (
            edit(&|b| {
                b["entry"][1]["resource"]
                    .as_object_mut()
                    .unwrap()
                    .remove("identifier");
            }),
            422,
            "Bundle.entry[1].resource.identifier",
        ),
        (
            edit(&|b| {
                b["entry"][1]["resource"]["subject"]["reference"] =
                    json!("urn:uuid:00000000-0000-0000-0000-000000000000")
            }),
            422,
            "Bundle.entry[1].resource.subject",
        ),
        (
            edit(&|b| b["entry"][1]["resource"]["status"] = json!(42)),
            400,
            "Bundle.entry[1].resource.status",
        ),
        (
            edit(&|b| b["entry"][0]["request"]["method"] = json!("PUT")),
            400,
            "Bundle.entry[0].request",
        ),
        (
            edit(&|b| {
                let e = b["entry"][0].clone();
                b["entry"].as_array_mut().unwrap().push(e);
            }),
            400,
            "Bundle.entry[2].resource",
        ),
        (
            edit(&|b| b["entry"][0]["resource"]["resourceType"] = json!("Organization")),
            400,
            "Bundle.entry[0].request",
        ),
        (
            edit(&|b| {
                b["entry"].as_array_mut().unwrap().pop();
            }),
            400,
            "Bundle.entry",
        ),
    ];
    for (i, (body, status, expr)) in cases.iter().enumerate() {
        let r = post_fhir(&gw, GP, "/fhir", body, &[]).await;
        assert_eq!(r.status.as_u16(), *status, "case {i}: {}", r.body);
        let exprs: Vec<&str> = r.body["issue"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["expression"][0].as_str())
            .collect();
        assert!(
            exprs.contains(expr),
            "case {i}: expected {expr} in {}",
            r.body
        );
        assert_eq!(gw.digest(), before, "case {i} wrote something");
    }
    // Only GP systems create referrals.
    assert_eq!(
        post_fhir(&gw, CRAFTS, "/fhir", &transaction(), &[])
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn conditional_create_of_a_service_request() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let r = post_fhir(&gw, GP, "/fhir", &transaction(), &[]).await;
    let pid = r.body["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let first_sr = r.body["entry"][1]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A second referral for the same patient: debt.
    let mut sr = transaction()["entry"][1]["resource"].clone();
    sr["identifier"][0]["value"] = json!("FHIR-REF-0002");
    sr["subject"] = json!({ "reference": format!("Patient/{pid}") });
    sr["reasonCode"] =
        json!([{ "coding": [{ "system": "http://snomed.info/sct", "code": "160932005" }] }]);
    let cond = "identifier=https://fhir.emis.example/Id/referral/P81001|FHIR-REF-0002";
    let a = post_fhir(
        &gw,
        GP,
        "/fhir/ServiceRequest",
        &sr,
        &[("if-none-exist", cond)],
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert!(a.headers["location"]
        .to_str()
        .unwrap()
        .contains("/_history/1"));
    let b = post_fhir(
        &gw,
        GP,
        "/fhir/ServiceRequest",
        &sr,
        &[("if-none-exist", cond)],
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(a.body["id"], b.body["id"]);
    // The first referral's identifier matches too.
    let c = post_fhir(
        &gw,
        GP,
        "/fhir/ServiceRequest",
        &sr,
        &[(
            "if-none-exist",
            "identifier=https://fhir.emis.example/Id/referral/P81001|FHIR-REF-0001",
        )],
    )
    .await;
    assert_eq!(c.status, 200);
    assert_eq!(c.body["id"], json!(first_sr));
    // Routed: debt, 71 years old in BB9 → no working-age rule → the hub.
    let sid = a.body["id"].as_str().unwrap();
    let t = gw.get(GP, &format!("/fhir/Task?focus={sid}")).await;
    assert_eq!(
        t.entries()[0]["owner"]["reference"],
        "Organization/pendle-cvs-hub"
    );
    // A Patient of another practice cannot be referenced.
    let mut other = sr.clone();
    other["identifier"][0]["value"] = json!("FHIR-REF-0003");
    other["requester"]["identifier"]["value"] = json!("P81003");
    assert_eq!(
        post_fhir(&gw, GP2, "/fhir/ServiceRequest", &other, &[])
            .await
            .status,
        422
    );
    // Unsupported If-None-Exist criteria are refused.
    assert_eq!(
        post_fhir(
            &gw,
            GP,
            "/fhir/ServiceRequest",
            &sr,
            &[("if-none-exist", "subject=Patient/x")]
        )
        .await
        .status,
        400
    );
}

#[tokio::test]
async fn patch_prefer_and_conditional_reads() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (_, _, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let path = format!("/fhir/Task/{tid}");
    let patch = |body: Value, ct: &'static str, m: &'static str| {
        let gw = &gw;
        let path = path.clone();
        async move {
            gw.request(
                Method::PATCH,
                &path,
                Some(CRAFTS),
                Some(ct),
                Some(body.to_string().into_bytes()),
                &[("if-match", m)],
            )
            .await
        }
    };
    // JSON Patch.
    let r = patch(
        json!([{ "op": "replace", "path": "/status", "value": "accepted" }]),
        "application/json-patch+json",
        "W/\"1\"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "accepted");
    // JSON Merge Patch; with a stale ETag first.
    let r = patch(
        json!({ "status": "in-progress" }),
        "application/merge-patch+json",
        "W/\"1\"",
    )
    .await;
    assert_eq!(r.status, 412);
    let r = patch(
        json!({ "status": "in-progress" }),
        "application/merge-patch+json",
        "W/\"2\"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The same rules as PUT.
    let r = patch(json!([{ "op": "replace", "path": "/owner/reference", "value": "Organization/burnley-money-advice" }]), "application/json-patch+json", "W/\"3\"").await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "Task.owner");
    let r = patch(
        json!([{ "op": "replace", "path": "/status", "value": "requested" }]),
        "application/json-patch+json",
        "W/\"3\"",
    )
    .await;
    assert_eq!(r.status, 422);
    let r = patch(
        json!([{ "op": "test", "path": "/status", "value": "accepted" }]),
        "application/json-patch+json",
        "W/\"3\"",
    )
    .await;
    assert_eq!(r.status, 422, "a failing test op");
    let r = patch(
        json!("not a patch"),
        "application/json-patch+json",
        "W/\"3\"",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = gw
        .request(
            Method::PATCH,
            &path,
            Some(CRAFTS),
            Some("application/json-patch+json"),
            Some(br#"[{"op": "replace", "path": "/status", "value": "requested"}]"#.to_vec()),
            &[],
        )
        .await;
    // Without If-Match the patch applies to the current version, and the state machine
    // still judges it.
    assert_eq!(r.status, 422, "{}", r.body);

    // Prefer: return=minimal and return=OperationOutcome.
    let cur = gw.get(CRAFTS, &path).await;
    let mut t = cur.body.clone();
    t["note"] = json!([{ "text": "first session booked" }]);
    let r = gw
        .request(
            Method::PUT,
            &path,
            Some(CRAFTS),
            Some(FHIR),
            Some(t.to_string().into_bytes()),
            &[("if-match", "W/\"3\""), ("prefer", "return=minimal")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, Value::Null);
    assert_eq!(r.etag(), "W/\"4\"");
    t["note"] = json!([{ "text": "second session booked" }]);
    let r = gw
        .request(
            Method::PUT,
            &path,
            Some(CRAFTS),
            Some(FHIR),
            Some(t.to_string().into_bytes()),
            &[
                ("if-match", "W/\"4\""),
                ("prefer", "return=OperationOutcome"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
    assert_eq!(r.body["issue"][0]["severity"], "information");

    // Conditional reads.
    let cur = gw.get(CRAFTS, &path).await;
    let etag = cur.etag();
    let lm = cur.headers["last-modified"].to_str().unwrap().to_string();
    let r = gw
        .request(
            Method::GET,
            &path,
            Some(CRAFTS),
            None,
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.body, Value::Null);
    let r = gw
        .request(
            Method::GET,
            &path,
            Some(CRAFTS),
            None,
            None,
            &[("if-none-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .request(
            Method::GET,
            &path,
            Some(CRAFTS),
            None,
            None,
            &[("if-modified-since", &lm)],
        )
        .await;
    assert_eq!(r.status, 304);
    let r = gw
        .request(
            Method::GET,
            &path,
            Some(CRAFTS),
            None,
            None,
            &[("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT")],
        )
        .await;
    assert_eq!(r.status, 200);
    // vread and instance history carry the versions.
    assert_eq!(
        gw.get(CRAFTS, &format!("{path}/_history/2")).await.body["status"],
        "accepted"
    );
    // History keeps superseded versions only (the current one is read from the resource):
    // every version once, newest first, each readable by vread.
    let versions: Vec<String> = gw
        .get(CRAFTS, &format!("{path}/_history"))
        .await
        .entries()
        .iter()
        .map(|r| r["meta"]["versionId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions, ["5", "4", "3", "2", "1"]);
    for v in ["5", "1"] {
        let r = gw.get(CRAFTS, &format!("{path}/_history/{v}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["meta"]["versionId"], v);
    }
    assert_eq!(
        gw.get(CRAFTS, &format!("{path}/_history/9")).await.status,
        404
    );
    // Type history: the provider sees its own Task's versions, another provider none.
    let h = gw.get(CRAFTS, "/fhir/Task/_history").await;
    assert_eq!(h.body["type"], "history");
    assert_eq!(h.entries().len(), 5);
    assert_eq!(
        gw.get(MONEY, "/fhir/Task/_history").await.entries().len(),
        0
    );
}

#[tokio::test]
async fn formats_are_negotiated() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (_, _, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let path = format!("/fhir/Task/{tid}");
    for accept in [
        "application/fhir+xml",
        "application/xml",
        "text/xml",
        "text/html",
    ] {
        let r = gw
            .request(
                Method::GET,
                &path,
                Some(CRAFTS),
                None,
                None,
                &[("accept", accept)],
            )
            .await;
        assert_eq!(r.status, 406, "{accept}");
        assert_eq!(r.body["resourceType"], "OperationOutcome");
    }
    for accept in [
        "application/fhir+json",
        "application/json",
        "*/*",
        "application/fhir+xml;q=0.9, application/fhir+json",
    ] {
        let r = gw
            .request(
                Method::GET,
                &path,
                Some(CRAFTS),
                None,
                None,
                &[("accept", accept)],
            )
            .await;
        assert_eq!(r.status, 200, "{accept}");
        assert!(r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json"));
    }
    assert_eq!(
        gw.get(CRAFTS, &format!("{path}?_format=xml")).await.status,
        406
    );
    assert_eq!(
        gw.get(CRAFTS, &format!("{path}?_format=json")).await.status,
        200
    );
    let r = gw
        .request(
            Method::PUT,
            &path,
            Some(CRAFTS),
            Some("application/fhir+xml"),
            Some(b"<Task/>".to_vec()),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(r.status, 415);
}

#[tokio::test]
async fn search_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (pid, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let (_, _, tid2) = gw
        .refer(
            GP,
            &variant("referral-ada.json", "SEARCH-2", Some("9990000026")),
        )
        .await;
    gw.refer(GP, &fixture("referral-bob.json")).await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    let ids = |r: &Resp| {
        r.entries()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };

    // Task: patient, focus, status list, sort, include, summary.
    assert_eq!(
        ids(&gw
            .get(CRAFTS, &format!("/fhir/Task?patient=Patient/{pid}"))
            .await),
        vec![tid.clone()]
    );
    assert_eq!(
        ids(&gw.get(CRAFTS, &format!("/fhir/Task?focus={sid}")).await),
        vec![tid.clone()]
    );
    assert_eq!(
        ids(&gw.get(CRAFTS, "/fhir/Task?status=requested,accepted").await).len(),
        2
    );
    // Ascending by default: tid2 was changed last (tid was accepted after tid2 was created).
    assert_eq!(
        ids(&gw.get(CRAFTS, "/fhir/Task?_sort=_lastUpdated").await),
        vec![tid2.clone(), tid.clone()]
    );
    assert_eq!(
        ids(&gw.get(CRAFTS, "/fhir/Task?_sort=-_lastUpdated").await),
        vec![tid.clone(), tid2.clone()]
    );
    let r = gw
        .get(CRAFTS, "/fhir/Task?_sort=-_lastUpdated&_count=1")
        .await;
    assert_eq!(ids(&r), vec![tid.clone()]);
    let next = r.next_link().unwrap();
    assert_eq!(ids(&gw.get(CRAFTS, &next).await), vec![tid2.clone()]);
    let r = gw
        .get(
            CRAFTS,
            &format!("/fhir/Task?focus={sid}&_include=Task:focus&_include=Task:patient"),
        )
        .await;
    let modes: Vec<(String, String)> = r.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["resource"]["resourceType"].as_str().unwrap().to_string(),
                e["search"]["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        vec![
            ("Task".into(), "match".into()),
            ("ServiceRequest".into(), "include".into()),
            ("Patient".into(), "include".into())
        ]
    );
    let r = gw.get(CRAFTS, "/fhir/Task?_summary=count").await;
    assert_eq!(r.body["total"], 2);
    assert!(r.body.get("entry").is_none());
    assert_eq!(gw.get(CRAFTS, "/fhir/Task").await.body["total"], 2);

    // ServiceRequest: identifier, subject, requester, status.
    let ident = "https://sp-gateway.example.org/fhir/Id/gp-referral/P81001|EMIS-2026-000123";
    assert_eq!(
        ids(&gw
            .get(GP, &format!("/fhir/ServiceRequest?identifier={ident}"))
            .await),
        vec![sid.clone()]
    );
    assert_eq!(
        ids(&gw
            .get(CRAFTS, &format!("/fhir/ServiceRequest?identifier={ident}"))
            .await),
        vec![sid.clone()]
    );
    assert!(ids(&gw
        .get(MONEY, &format!("/fhir/ServiceRequest?identifier={ident}"))
        .await)
    .is_empty());
    assert_eq!(
        ids(&gw
            .get(GP, &format!("/fhir/ServiceRequest?subject=Patient/{pid}"))
            .await),
        vec![sid.clone()]
    );
    assert_eq!(
        gw.get(
            GP,
            "/fhir/ServiceRequest?requester=Organization/P81001&status=active"
        )
        .await
        .entries()
        .len(),
        2
    );
    assert_eq!(
        gw.get(GP, "/fhir/ServiceRequest?requester=P81002")
            .await
            .entries()
            .len(),
        1
    );
    assert_eq!(gw.get(GP2, "/fhir/ServiceRequest").await.entries().len(), 0);

    // Observation: subject, code.
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": { "reference": format!("Patient/{pid}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
        "performer": [{ "reference": "Organization/pendle-crafts" }], "valueInteger": 20
    });
    assert_eq!(
        gw.post_json(CRAFTS, "/fhir/Observation", &obs).await.status,
        201
    );
    assert_eq!(
        gw.get(GP, &format!("/fhir/Observation?subject=Patient/{pid}"))
            .await
            .entries()
            .len(),
        1
    );
    assert_eq!(
        gw.get(
            GP,
            "/fhir/Observation?code=http://snomed.info/sct|718466001"
        )
        .await
        .entries()
        .len(),
        1
    );
    assert_eq!(
        gw.get(GP, "/fhir/Observation?code=718426000")
            .await
            .entries()
            .len(),
        0
    );
    assert_eq!(gw.get(GP2, "/fhir/Observation").await.entries().len(), 0);

    // Patient by NHS number.
    assert_eq!(
        ids(&gw
            .get(
                GP,
                "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018"
            )
            .await),
        vec![pid.clone()]
    );
    // Without an identifier: the caller's own patients.
    assert_eq!(gw.get(GP, "/fhir/Patient").await.entries().len(), 3);
    assert_eq!(gw.get(CRAFTS, "/fhir/Patient").await.entries().len(), 2);
    assert_eq!(gw.get(GP2, "/fhir/Patient").await.entries().len(), 0);

    // Unknown parameters: 400 by default and with handling=strict; ignored when lenient.
    assert_eq!(gw.get(CRAFTS, "/fhir/Task?colour=red").await.status, 400);
    let strict = gw
        .request(
            Method::GET,
            "/fhir/Task?colour=red",
            Some(CRAFTS),
            None,
            None,
            &[("prefer", "handling=strict")],
        )
        .await;
    assert_eq!(strict.status, 400);
    let lenient = gw
        .request(
            Method::GET,
            "/fhir/Task?colour=red&status=accepted",
            Some(CRAFTS),
            None,
            None,
            &[("prefer", "handling=lenient")],
        )
        .await;
    assert_eq!(lenient.status, 200);
    assert_eq!(ids(&lenient), vec![tid.clone()]);
    let self_link = lenient.body["link"][0]["url"].as_str().unwrap();
    assert!(
        !self_link.contains("colour") && self_link.contains("status=accepted"),
        "{self_link}"
    );
    // The directory's types are searched too (tests/directory.rs); an unknown type is 404.
    assert_eq!(gw.get(GP, "/fhir/Organization").await.status, 200);
    assert_eq!(gw.get(GP, "/fhir/Medication").await.status, 404);
}

#[tokio::test]
async fn capability_statement_matches_what_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let (_, _, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let cs = gw
        .request(Method::GET, "/fhir/metadata", None, None, None, &[])
        .await
        .body;
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let advertised: Vec<&str> = resources
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        advertised,
        vec![
            "Patient",
            "ServiceRequest",
            "Task",
            "Observation",
            "AuditEvent",
            "Provenance",
            "Organization",
            "HealthcareService",
            "Location",
            "Measure"
        ]
    );
    // Every advertised interaction is answered by something other than 404/405, and
    // interactions not advertised are 405.
    for r in resources {
        let t = r["type"].as_str().unwrap();
        let codes: Vec<&str> = r["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["code"].as_str().unwrap())
            .collect();
        let probe = |m: Method, p: String| {
            let gw = &gw;
            async move {
                gw.request(m, &p, Some(AUDITOR), Some(FHIR), Some(b"{}".to_vec()), &[])
                    .await
                    .status
                    .as_u16()
            }
        };
        let id = if t == "Task" {
            tid.clone()
        } else {
            "x".to_string()
        };
        for (code, m, p) in [
            ("search-type", Method::GET, format!("/fhir/{t}?_count=1")),
            ("update", Method::PUT, format!("/fhir/{t}/{id}")),
            ("patch", Method::PATCH, format!("/fhir/{t}/{id}")),
            ("create", Method::POST, format!("/fhir/{t}")),
            ("history-type", Method::GET, format!("/fhir/{t}/_history")),
        ] {
            let status = probe(m.clone(), p.clone()).await;
            if codes.contains(&code) {
                assert!(status != 405, "{t} advertises {code} but {m} {p} is 405");
            } else {
                assert_eq!(
                    status, 405,
                    "{t} does not advertise {code} but {m} {p} is {status}"
                );
            }
        }
    }
    // Search parameters advertised are accepted; each is a real filter (not 400).
    for r in resources {
        let t = r["type"].as_str().unwrap();
        for sp in r["searchParam"].as_array().into_iter().flatten() {
            let name = sp["name"].as_str().unwrap();
            let value = match (name, sp["type"].as_str().unwrap()) {
                ("_lastUpdated", _) => "gt2026-01-01",
                ("_count", _) => "5",
                ("_sort", _) => "_lastUpdated",
                ("_summary", _) => "count",
                ("active", _) => "true",
                ("status", _) => {
                    if t == "Task" {
                        "requested"
                    } else {
                        "active"
                    }
                }
                ("identifier", _) => "https://fhir.nhs.uk/Id/nhs-number|9990000018",
                ("owner", _) => "pendle-crafts",
                ("requester", _) => "P81001",
                ("code", _) => "718466001",
                ("action", _) => "R",
                ("date", _) => "ge2026-01-01",
                (_, "reference") => "x",
                _ => "x",
            };
            let r = gw.get(AUDITOR, &format!("/fhir/{t}?{name}={value}")).await;
            assert_eq!(r.status, 200, "{t}?{name}={value}: {}", r.body);
        }
    }
}

/// What the gateway does with each UK Core example (real resources no one here wrote), and
/// why. `$validate` on each resource's type; ingest where the example could be a referral.
#[tokio::test]
async fn uk_core_examples_are_accepted_or_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let examples = std::path::Path::new(crate::common::ROOT).join("fixtures/ukcore-examples");
    // (file, $validate: None = valid, Some(element the first error names))
    let expected: &[(&str, Option<&str>, &str)] = &[
        ("UKCore-Bundle-Batch-Example.json", Some("Bundle"), "$validate is offered for the referral types only"),
        ("UKCore-Bundle-BatchPOST-Example.json", Some("Bundle"), "$validate is offered for the referral types only"),
        ("UKCore-HealthcareService-OrthopaedicService-Example.json", Some("HealthcareService"), "not a type this gateway handles"),
        ("UKCore-Observation-HeavyDrinker-Example.json", Some("Observation.valueQuantity.value"), "value is the string \"20\" where FHIR JSON needs a number (an XML-to-JSON conversion artefact)"),
        ("UKCore-Organization-WhiteRoseMedicalCentre-Example.json", Some("Organization"), "organisations come from the gateway's config"),
        ("UKCore-Patient-RichardSmith-Example.json", Some("Patient.extension[1].extension[1].valueTiming.repeat.period"), "period is the string \"1\" where FHIR JSON needs a number"),
        ("UKCore-Patient-Sn-MultipleLanguages-Example.json", Some("Patient.identifier"), "no NHS number: the gateway cannot identify the patient"),
        ("UKCore-ServiceRequest-ColonoscopyRequest-Example.json", Some("ServiceRequest.code"), "a colonoscopy, not a social prescribing referral"),
        ("UKCore-ServiceRequest-HipReplacement-Example.json", Some("ServiceRequest.code"), "a hip replacement review, not a social prescribing referral"),
        ("UKCore-Task-Colonoscopy-Example.json", None, "a well-formed Task (focus and for present)"),
    ];
    let mut files: Vec<String> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".json"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        expected.iter().map(|e| e.0.to_string()).collect::<Vec<_>>(),
        "every example is accounted for"
    );
    for (file, expect, why) in expected {
        let res: Value =
            serde_json::from_str(&std::fs::read_to_string(examples.join(file)).unwrap()).unwrap();
        let t = res["resourceType"].as_str().unwrap();
        let r = post_fhir(&gw, GP, &format!("/fhir/{t}/$validate"), &res, &[]).await;
        assert_eq!(r.body["resourceType"], "OperationOutcome", "{file}");
        let first_error = r.body["issue"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["severity"] == "error");
        match expect {
            None => assert!(first_error.is_none(), "{file} ({why}): {}", r.body),
            Some(expr) => {
                let e = first_error.unwrap_or_else(|| panic!("{file} ({why}) passed: {}", r.body));
                assert_eq!(e["expression"][0], *expr, "{file} ({why}): {}", r.body);
            }
        }
    }
    // Ingest: the batch Bundles are not transactions; a UK Core Patient and ServiceRequest in
    // a transaction are refused with the element named.
    let before = gw.digest();
    for f in [
        "UKCore-Bundle-Batch-Example.json",
        "UKCore-Bundle-BatchPOST-Example.json",
    ] {
        let b: Value =
            serde_json::from_str(&std::fs::read_to_string(examples.join(f)).unwrap()).unwrap();
        let r = post_fhir(&gw, GP, "/fhir", &b, &[]).await;
        assert_eq!(r.status, 400, "{f}");
        assert_eq!(r.expression(), "Bundle.type");
    }
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(examples.join(f)).unwrap()).unwrap()
    };
    let mut richard = read("UKCore-Patient-RichardSmith-Example.json");
    let mut tx = transaction();
    tx["entry"][0]["resource"] = richard.clone();
    let r = post_fhir(&gw, GP, "/fhir", &tx, &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.expression(),
        "Bundle.entry[0].resource.extension[1].extension[1].valueTiming.repeat.period"
    );
    // With that one value written as the number it stands for, Richard Smith is accepted as
    // the Patient of a social prescribing referral, as sent (extensions and all).
    richard["extension"][1]["extension"][1]["valueTiming"]["repeat"]["period"] = json!(1);
    tx["entry"][0]["resource"] = richard.clone();
    let r = post_fhir(&gw, GP, "/fhir", &tx, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stored = &r.body["entry"][0]["resource"];
    assert_eq!(stored["extension"], richard["extension"]);
    assert_eq!(stored["name"], richard["name"]);
    // The UK Core hip-replacement ServiceRequest in a transaction: not social prescribing.
    let before = gw.digest().ne(&before).then_some(gw.digest()).unwrap();
    let mut hip = read("UKCore-ServiceRequest-HipReplacement-Example.json");
    hip["subject"] = json!({ "reference": tx["entry"][0]["fullUrl"] });
    let mut tx2 = transaction();
    tx2["entry"][1]["resource"] = hip;
    let r = post_fhir(&gw, GP, "/fhir", &tx2, &[]).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "Bundle.entry[1].resource.code");
    assert_eq!(gw.digest(), before);
}
