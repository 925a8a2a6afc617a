//! The public self-referral page (`/refer`) over HTTP, as a browser without JavaScript uses
//! it: the form, a person's own referral and a carer's, the reference they are given and
//! nothing else, faults named beside their fields with nothing written, the same form sent
//! twice, hostile input, and the limit per address.

use crate::common::*;
use crate::inbox::Browser;
use serde_json::Value;

fn form<'a>(token: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut f = vec![
        ("token", token),
        ("for_whom", "me"),
        ("given_name", "Gail"),
        ("family_name", "Sample"),
        ("dob_day", "2"),
        ("dob_month", "3"),
        ("dob_year", "1950"),
        ("postcode", "bb9 7sr"),
        ("phone", "01282 333333"),
        ("email", ""),
        ("needs", "loneliness"),
        ("needs", "debt"),
        ("more", "I have not been out much since the winter."),
        ("nhs_number", ""),
        ("practice", ""),
        ("consent_share", "yes"),
    ];
    for (k, v) in extra {
        f.retain(|(key, _)| key != k || *k == "needs");
        f.push((k, v));
    }
    f
}

/// The reference number on a confirmation page.
fn reference(body: &str) -> String {
    let at = body
        .find("SP-")
        .unwrap_or_else(|| panic!("no reference: {body}"));
    body[at..at + 12].to_string()
}

async fn hub_referral(gw: &TestGateway, reference: &str) -> (Value, Value) {
    let found = gw
        .get(
            HUB,
            &format!("/fhir/ServiceRequest?identifier=https://sp-gateway.example.org/fhir/Id/self-referral|{reference}"),
        )
        .await;
    let entries = found.entries();
    assert_eq!(entries.len(), 1, "{}", found.body);
    let sr = entries[0].clone();
    let sid = sr["id"].as_str().unwrap().to_string();
    let tasks = gw
        .get(HUB, &format!("/fhir/Task?focus=ServiceRequest/{sid}"))
        .await;
    assert_eq!(tasks.entries().len(), 1, "{}", tasks.body);
    (sr, tasks.entries()[0].clone())
}

fn source(sr: &Value) -> String {
    sr["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["valueCodeableConcept"]["coding"].as_array())
        .flatten()
        .find_map(|c| c["code"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_person_refers_themselves_and_sees_only_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let mut b = Browser::new(&gw.base);
    let page = b.get("/refer").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Ask for help from a link worker"));
    assert!(
        page.body.contains("Loneliness or social isolation"),
        "needs in the directory's words"
    );
    let token = page.hidden("token");
    let before = gw.digest();
    assert_eq!(b.get("/refer/privacy").await.status, 200);
    assert_eq!(gw.digest(), before, "reading the form writes nothing");

    let done = b.post("/refer", &form(&token, &[])).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(
        done.location.is_none(),
        "no redirect: nothing about the person in a URL"
    );
    let reference = reference(&done.body);
    for typed in ["Gail", "Sample", "BB9", "01282", "1950", "winter"] {
        assert!(!done.body.contains(typed), "the confirmation shows {typed}");
    }
    // It reached the hub's queue for triage, as a self-referral with the person as requester.
    let (sr, task) = hub_referral(&gw, &reference).await;
    let pid = sr["subject"]["reference"].as_str().unwrap().to_string();
    assert_eq!(sr["requester"]["reference"], pid);
    assert_eq!(source(&sr), "B1");
    assert_eq!(task["owner"]["reference"], "Organization/pendle-cvs-hub");
    assert!(task.to_string().contains("triage"), "{task}");
    let patient = gw.get(HUB, &format!("/fhir/{pid}")).await;
    assert_eq!(patient.body["name"][0]["given"][0], "Gail");
    assert_eq!(patient.body["address"][0]["postalCode"], "BB9 7SR");
    assert!(
        patient.body.get("identifier").is_none(),
        "no NHS number was given"
    );
    // No GP practice sees it.
    assert_eq!(gw.get(GP, &format!("/fhir/{pid}")).await.status, 404);
    // The trail names the person as the one who referred.
    let events = gw
        .get(AUDITOR, &format!("/fhir/AuditEvent?entity={pid}"))
        .await
        .entries();
    assert!(
        events
            .iter()
            .any(|e| e["agent"][0]["who"]["reference"] == pid.as_str() && e["action"] == "C"),
        "{events:?}"
    );

    // The same form again (a double click, a reload): the same reference, nothing new.
    let before = gw.digest();
    let again = b.post("/refer", &form(&token, &[])).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(self::reference(&again.body), reference);
    assert_eq!(gw.digest(), before);
    // The same token with other answers is refused, and nothing is written.
    let other = b
        .post("/refer", &form(&token, &[("given_name", "Gwen")]))
        .await;
    assert_eq!(other.status, 409, "{}", other.body);
    assert_eq!(gw.digest(), before);
}

#[tokio::test]
async fn a_carer_refers_someone_and_their_gp_is_told_because_they_agreed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let mut b = Browser::new(&gw.base);
    let token = b.get("/refer").await.hidden("token");
    let done = b
        .post(
            "/refer",
            &form(
                &token,
                &[
                    ("for_whom", "someone"),
                    ("carer_name", "Fay Sample"),
                    ("carer_relationship", "daughter"),
                    ("nhs_number", "999 000 0018"),
                    ("practice", "P81001"),
                    ("consent_gp", "yes"),
                ],
            ),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    let (sr, _) = hub_referral(&gw, &reference(&done.body)).await;
    assert_eq!(source(&sr), "B2");
    assert_eq!(sr["requester"]["reference"], "#carer");
    assert_eq!(sr["contained"][0]["resourceType"], "RelatedPerson");
    let sid = sr["id"].as_str().unwrap();
    let seen = gw.get(GP, &format!("/fhir/ServiceRequest/{sid}")).await;
    assert_eq!(seen.status, 200, "the practice was told: {}", seen.body);
    assert_eq!(
        gw.get(GP2, &format!("/fhir/ServiceRequest/{sid}"))
            .await
            .status,
        404
    );
    let r4 = sp_gateway::schema::check_fhir("ServiceRequest", &seen.body).unwrap();
    assert!(r4.is_empty(), "{r4:?}");
    fhir_sdk_parse(&seen.body, "ServiceRequest").expect("fhir-sdk parses it");
}

#[tokio::test]
async fn faults_are_named_beside_their_fields_hostile_input_is_inert_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let mut b = Browser::new(&gw.base);
    let token = b.get("/refer").await.hidden("token");
    let before = gw.digest();
    let page = b
        .post(
            "/refer",
            &form(
                &token,
                &[
                    ("given_name", "<script>alert(1)</script>"),
                    ("dob_year", "2099"),
                    ("postcode", "not a postcode"),
                    ("phone", ""),
                    ("nhs_number", "1234567890"),
                    ("consent_share", "no"),
                    ("needs", "astrology"),
                ],
            ),
        )
        .await;
    assert_eq!(page.status, 422, "{}", page.body);
    assert!(page.body.contains("There is a problem"));
    for (field, text) in [
        ("dob_day", "Date of birth must be in the past"),
        ("postcode", "Enter a real postcode"),
        ("phone", "Enter a phone number or an email address"),
        ("nhs_number", "Enter a 10 digit NHS number"),
        ("consent_share", "We can only pass the referral on"),
        ("needs", "Select from the list"),
    ] {
        assert!(
            page.body.contains(&format!("href=\"#{field}\"")),
            "{field} not linked"
        );
        assert!(page.body.contains(text), "{text} missing");
    }
    assert!(!page.body.contains("<script>alert(1)</script>"), "escaped");
    assert!(
        page.body.contains("&lt;script&gt;") || page.body.contains("&#60;script&#62;"),
        "kept, escaped, for correcting"
    );
    assert_eq!(page.hidden("token"), token, "the same form, to correct");
    assert_eq!(gw.digest(), before);
    // A forged or missing token is refused too.
    let forged = b.post("/refer", &form("x", &[])).await;
    assert_eq!(forged.status, 422);
    assert!(
        forged.body.contains("This form has expired"),
        "{}",
        forged.body
    );
    assert_eq!(gw.digest(), before);
}

#[tokio::test]
async fn one_address_is_limited_and_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_text(|c| format!("{c}\n[refer]\nper_address_per_hour = 2\n"));
    let gw = TestGateway::start_with(dir.path(), cfg).await;
    let mut b = Browser::new(&gw.base);
    for n in 0..2 {
        let token = b.get("/refer").await.hidden("token");
        let phone = format!("01282 44444{n}");
        let done = b.post("/refer", &form(&token, &[("phone", &phone)])).await;
        assert_eq!(done.status, 200, "{}", done.body);
    }
    let before = gw.digest();
    let token = b.get("/refer").await.hidden("token");
    let third = b.post("/refer", &form(&token, &[])).await;
    assert_eq!(third.status, 429, "{}", third.body);
    assert!(third.body.contains("Nothing was sent"));
    assert_eq!(gw.digest(), before);
}
