//! Every route × every role × own/other tenant: the status each gets, and that nothing of
//! another tenant's referral ever appears in a body.

use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// The clients, from the point of view of referral A (gp-pennine → pendle-crafts).
const CLIENTS: &[(&str, Option<&str>)] = &[
    ("gp-own", Some(GP)),
    ("gp-other", Some(GP2)),
    ("provider-own", Some(CRAFTS)),
    ("provider-other", Some(HOUSING)),
    ("auditor", Some(AUDITOR)),
    ("admin", Some(ADMIN)),
    ("anonymous", None),
    ("referrer-other", Some(REFERRER)),
    ("commissioner", Some("demo-commissioner-token")),
];

/// Expected statuses in CLIENTS order.
type Row = [u16; 9];

#[tokio::test]
async fn every_route_for_every_role_and_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    // Referral A (Ada, P81001 → pendle-crafts), referral B (Cara, P81003 → housing).
    let (pa, sa, ta) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let (_pb, _sb, tb) = gw.refer(GP2, &fixture("referral-cara.json")).await;
    assert_eq!(
        gw.transition(CRAFTS, &ta, status_to("accepted"))
            .await
            .status,
        200
    );
    assert_eq!(
        gw.transition(HOUSING, &tb, status_to("accepted"))
            .await
            .status,
        200
    );
    let obs = |sr: &str, p: &str, provider: &str| {
        json!({
            "resourceType": "Observation", "status": "final",
            "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
            "subject": { "reference": format!("Patient/{p}") },
            "basedOn": [{ "reference": format!("ServiceRequest/{sr}") }],
            "performer": [{ "reference": format!("Organization/{provider}") }],
            "valueInteger": 21
        })
    };
    let oa = gw
        .post_json(CRAFTS, "/fhir/Observation", &obs(&sa, &pa, "pendle-crafts"))
        .await;
    assert_eq!(oa.status, 201);
    let oa = oa.body["id"].as_str().unwrap().to_string();
    // What must never reach anyone outside tenant A.
    let secrets_of_a = [
        ta.clone(),
        sa.clone(),
        pa.clone(),
        oa.clone(),
        "9990000018".into(),
        "\"Ada\"".into(),
        "BB9 7SR".into(),
    ];

    const READ: Row = [200, 404, 200, 404, 200, 404, 401, 404, 404];
    const SEARCH: Row = [200, 200, 200, 200, 200, 403, 401, 200, 403];
    const OPEN: Row = [200; 9];
    let mut reads: Vec<(String, Row)> = Vec::new();
    for (t, id) in [
        ("Task", &ta),
        ("ServiceRequest", &sa),
        ("Patient", &pa),
        ("Observation", &oa),
    ] {
        reads.push((format!("/fhir/{t}/{id}"), READ));
        reads.push((format!("/fhir/{t}/{id}/_history"), READ));
        reads.push((format!("/fhir/{t}/{id}/_history/1"), READ));
    }
    let searches: Vec<(String, Row)> = [
        "/fhir/Task", "/fhir/Task?owner=pendle-crafts", "/fhir/Task?requester=P81001",
        &format!("/fhir/Task?patient={pa}"), &format!("/fhir/Task?focus={sa}&_include=Task:focus&_include=Task:patient"),
        "/fhir/ServiceRequest", &format!("/fhir/ServiceRequest?subject={pa}"),
        "/fhir/ServiceRequest?identifier=https://sp-gateway.example.org/fhir/Id/gp-referral/P81001|EMIS-2026-000123",
        "/fhir/Observation", &format!("/fhir/Observation?based-on={sa}"), &format!("/fhir/Observation?subject={pa}"),
        "/fhir/Patient", "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018",
        "/fhir/Task/_history", "/fhir/Patient/_history", "/fhir/Observation/_history", "/fhir/ServiceRequest/_history",
        "/fhir/Task?_summary=count",
    ]
    .iter()
    .map(|p| (p.to_string(), SEARCH))
    .collect();
    let opens: Vec<(String, Row)> = vec![
        ("/fhir/metadata".into(), OPEN),
        ("/healthz".into(), OPEN),
        ("/readyz".into(), OPEN),
        (
            "/fhir/Organization/P81001".into(),
            [200, 200, 200, 200, 200, 404, 401, 200, 404],
        ),
        (
            "/fhir/Organization/pendle-crafts".into(),
            [200, 200, 200, 200, 200, 404, 401, 200, 404],
        ),
    ];
    let mut failures = Vec::new();
    let mut cases = 0;
    for (path, row) in reads.iter().chain(searches.iter()).chain(opens.iter()) {
        for ((who, token), expected) in CLIENTS.iter().zip(row) {
            let r = gw.request(Method::GET, path, *token, None, None, &[]).await;
            cases += 1;
            if r.status.as_u16() != *expected {
                failures.push(format!(
                    "GET {path} as {who}: {} (expected {expected})",
                    r.status
                ));
            }
            let own = matches!(*who, "gp-own" | "provider-own" | "auditor");
            let text = r.body.to_string();
            if !own {
                // Only what the caller did not itself send counts: echoing the id it asked
                // for (in a 404's diagnostics, a search's self link) tells it nothing.
                for s in secrets_of_a.iter().filter(|s| !path.contains(s.as_str())) {
                    if text.contains(s.as_str()) {
                        failures.push(format!("GET {path} as {who}: body shows {s}"));
                    }
                }
            } else if searches.iter().any(|(p, _)| p == path)
                && !path.contains("_summary")
                && !path.contains("Patient/_history")
            {
                // The owner's searches do find A (they are real filters, not empty lists).
                let found = [&ta, &sa, &pa, &oa]
                    .iter()
                    .any(|id| text.contains(id.as_str()));
                if !found {
                    failures.push(format!("GET {path} as {who}: A not found: {text}"));
                }
            }
        }
    }

    // Writes: each client tries to change A; only its owner (and for cancel, its GP) can.
    let auditor_task = || async { gw.get(AUDITOR, &format!("/fhir/Task/{ta}")).await };
    let writes: Vec<(&str, Row)> = vec![
        ("PUT note", [422, 404, 200, 404, 403, 403, 401, 404, 403]),
        ("PATCH note", [422, 404, 200, 404, 403, 403, 401, 404, 403]),
        (
            "POST Observation",
            [403, 403, 201, 422, 403, 403, 401, 403, 403],
        ),
        (
            "POST $validate",
            [200, 200, 200, 200, 200, 403, 401, 200, 403],
        ),
        (
            "POST referral",
            [201, 422, 403, 403, 403, 403, 401, 403, 403],
        ),
        (
            "POST transaction",
            [200, 422, 403, 403, 403, 403, 401, 422, 403],
        ),
        (
            "POST ServiceRequest",
            [201, 422, 403, 403, 403, 403, 401, 422, 403],
        ),
    ];
    for (n, (what, row)) in writes.iter().enumerate() {
        for (k, ((who, token), expected)) in CLIENTS.iter().zip(row).enumerate() {
            let cur = auditor_task().await;
            let etag = cur.etag();
            let mut task = cur.body.clone();
            task["note"] = json!([{ "text": format!("note {n}-{k}") }]);
            let unique = format!("MATRIX-{n}-{k}");
            let (method, path, ct, body): (Method, String, &str, Value) = match *what {
                "PUT note" => (
                    Method::PUT,
                    format!("/fhir/Task/{ta}"),
                    "application/fhir+json",
                    task,
                ),
                "PATCH note" => (
                    Method::PATCH,
                    format!("/fhir/Task/{ta}"),
                    "application/json-patch+json",
                    json!([{ "op": "add", "path": "/note", "value": [{ "text": unique }] }]),
                ),
                "POST Observation" => (
                    Method::POST,
                    "/fhir/Observation".into(),
                    "application/fhir+json",
                    obs(
                        &sa,
                        &pa,
                        if *who == "provider-other" {
                            "east-lancs-housing"
                        } else {
                            "pendle-crafts"
                        },
                    ),
                ),
                "POST $validate" => (
                    Method::POST,
                    "/fhir/Task/$validate".into(),
                    "application/fhir+json",
                    cur.body.clone(),
                ),
                "POST referral" => (
                    Method::POST,
                    "/referrals".into(),
                    "application/json",
                    variant("referral-ada.json", &unique, None),
                ),
                "POST transaction" => {
                    let mut b = fixture("fhir/transaction-dora.json");
                    b["entry"][1]["resource"]["identifier"][0]["value"] = json!(unique);
                    (Method::POST, "/fhir".into(), "application/fhir+json", b)
                }
                _ => {
                    let mut sr =
                        fixture("fhir/transaction-dora.json")["entry"][1]["resource"].clone();
                    sr["identifier"][0]["value"] = json!(unique);
                    sr["subject"] = json!({ "reference": format!("Patient/{pa}") });
                    (
                        Method::POST,
                        "/fhir/ServiceRequest".into(),
                        "application/fhir+json",
                        sr,
                    )
                }
            };
            let before = gw.digest();
            let r = gw
                .request(
                    method.clone(),
                    &path,
                    *token,
                    Some(ct),
                    Some(body.to_string().into_bytes()),
                    &[("if-match", &etag)],
                )
                .await;
            let body = body.to_string();
            cases += 1;
            if r.status.as_u16() != *expected {
                failures.push(format!(
                    "{what} as {who}: {} (expected {expected}) {}",
                    r.status, r.body
                ));
            }
            if r.status.as_u16() >= 400 && gw.digest() != before {
                failures.push(format!("{what} as {who}: refused but the store changed"));
            }
            let own = matches!(*who, "gp-own" | "provider-own" | "auditor");
            if !own {
                let text = r.body.to_string();
                let sent = format!("{path} {body}");
                for s in secrets_of_a.iter().filter(|s| !sent.contains(s.as_str())) {
                    if text.contains(s.as_str()) {
                        failures.push(format!("{what} as {who}: body shows {s}"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(cases >= 330, "only {cases} cases");
}
