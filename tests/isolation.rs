//! Tenants see only their own: a provider cannot read, update or search another provider's
//! referrals, a GP system another practice's; outside its scope a resource is 404.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn providers_and_gps_see_only_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    // Ada → pendle-crafts (gp-pennine); Cara → east-lancs-housing (gp-colne).
    let (ada_p, ada_sr, ada_t) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let (cara_p, cara_sr, cara_t) = gw.refer(GP2, &fixture("referral-cara.json")).await;

    let ada_paths = [
        format!("/fhir/Task/{ada_t}"),
        format!("/fhir/ServiceRequest/{ada_sr}"),
        format!("/fhir/Patient/{ada_p}"),
        format!("/fhir/Task/{ada_t}/_history"),
        format!("/fhir/Task/{ada_t}/_history/1"),
        format!("/fhir/Patient/{ada_p}/_history/1"),
    ];
    // Owner and requester see them; everyone else gets 404 with nothing of Ada in the body.
    for p in &ada_paths {
        assert_eq!(gw.get(CRAFTS, p).await.status, 200, "crafts {p}");
        assert_eq!(gw.get(GP, p).await.status, 200, "gp {p}");
        assert_eq!(gw.get(AUDITOR, p).await.status, 200, "auditor {p}");
        for other in [MONEY, HOUSING, HUB, GP2, ADMIN] {
            let r = gw.get(other, p).await;
            assert_eq!(r.status, 404, "{other} {p}: {}", r.body);
            let text = r.body.to_string();
            assert!(
                !text.contains("9990000018") && !text.contains("Ada"),
                "{text}"
            );
        }
    }
    // Same for Cara the other way round.
    for p in [
        format!("/fhir/Task/{cara_t}"),
        format!("/fhir/Patient/{cara_p}"),
        format!("/fhir/ServiceRequest/{cara_sr}"),
    ] {
        assert_eq!(gw.get(HOUSING, &p).await.status, 200);
        assert_eq!(gw.get(GP2, &p).await.status, 200);
        assert_eq!(gw.get(CRAFTS, &p).await.status, 404);
        assert_eq!(gw.get(GP, &p).await.status, 404);
    }

    // Searches never leak.
    let r = gw
        .get(MONEY, "/fhir/Task?owner=Organization/pendle-crafts")
        .await;
    assert_eq!(r.status, 200);
    assert!(r.entries().is_empty(), "{}", r.body);
    let r = gw.get(MONEY, "/fhir/Task").await;
    assert!(r.entries().is_empty());
    let r = gw
        .get(GP2, "/fhir/Task?requester=Organization/P81001")
        .await;
    assert!(r.entries().is_empty());
    let r = gw.get(GP2, "/fhir/Task").await;
    assert_eq!(r.entries().len(), 1);
    assert_eq!(r.entries()[0]["id"], json!(cara_t));
    let r = gw
        .get(GP, "/fhir/Task?owner=Organization/east-lancs-housing")
        .await;
    assert!(r.entries().is_empty());
    let r = gw.get(AUDITOR, "/fhir/Task").await;
    assert_eq!(r.entries().len(), 2);
    assert_eq!(gw.get(ADMIN, "/fhir/Task").await.status, 403);

    // Another provider cannot update the Task: 404, nothing written.
    let before = gw.digest();
    let mut t = gw.get(CRAFTS, &format!("/fhir/Task/{ada_t}")).await.body;
    t["status"] = json!("accepted");
    for other in [MONEY, HOUSING] {
        let r = gw.put_task(other, &t, Some("W/\"1\"")).await;
        assert_eq!(r.status, 404, "{}", r.body);
    }
    // Nor can another GP system cancel it, nor the auditor change it.
    t["status"] = json!("cancelled");
    t["statusReason"] = json!({ "text": "x" });
    assert_eq!(gw.put_task(GP2, &t, Some("W/\"1\"")).await.status, 404);
    assert_eq!(gw.put_task(AUDITOR, &t, Some("W/\"1\"")).await.status, 403);
    assert_eq!(gw.digest(), before);

    // Another provider cannot post feedback on Ada's referral.
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": { "reference": format!("Patient/{ada_p}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{ada_sr}") }],
        "performer": [{ "reference": "Organization/burnley-money-advice" }],
        "valueInteger": 20
    });
    let r = gw.post_json(MONEY, "/fhir/Observation", &obs).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "Observation.basedOn[0]");
    // ... nor read Ada's Observations; the GP of another practice neither.
    let mut mine = obs.clone();
    mine["performer"] = json!([{ "reference": "Organization/pendle-crafts" }]);
    // Not before the Task is accepted.
    let r = gw.post_json(CRAFTS, "/fhir/Observation", &mine).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(
        gw.transition(CRAFTS, &ada_t, status_to("accepted"))
            .await
            .status,
        200
    );
    let posted = gw.post_json(CRAFTS, "/fhir/Observation", &mine).await;
    assert_eq!(posted.status, 201, "{}", posted.body);
    let oid = posted.body["id"].as_str().unwrap();
    assert_eq!(
        gw.get(GP, &format!("/fhir/Observation/{oid}")).await.status,
        200
    );
    assert_eq!(
        gw.get(GP2, &format!("/fhir/Observation/{oid}"))
            .await
            .status,
        404
    );
    assert_eq!(
        gw.get(MONEY, &format!("/fhir/Observation/{oid}"))
            .await
            .status,
        404
    );
    let r = gw
        .get(
            GP2,
            &format!("/fhir/Observation?based-on=ServiceRequest/{ada_sr}"),
        )
        .await;
    assert!(r.entries().is_empty());
    let r = gw
        .get(
            MONEY,
            &format!("/fhir/Observation?based-on=ServiceRequest/{ada_sr}"),
        )
        .await;
    assert!(r.entries().is_empty());
    // Wrong subject or performer are refused with what to send instead.
    let mut wrong = mine.clone();
    wrong["subject"] = json!({ "reference": format!("Patient/{cara_p}") });
    let r = gw.post_json(CRAFTS, "/fhir/Observation", &wrong).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "Observation.subject");
    // Only providers post feedback; only GP systems refer.
    assert_eq!(
        gw.post_json(GP, "/fhir/Observation", &mine).await.status,
        403
    );
    assert_eq!(
        gw.post_json(CRAFTS, "/referrals", &fixture("referral-ada.json"))
            .await
            .status,
        403
    );
    // A GP system may not refer for another GP system's practice.
    let r = gw
        .post_json(GP2, "/referrals", &fixture("referral-ada.json"))
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.expression(), "practice.odsCode");
}

#[tokio::test]
async fn each_referral_shares_only_its_own_patient_details() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    // The same person referred twice: lonely (to the crafting group), then in debt with a
    // new phone number (to money advice, BB9 working-age rule does not apply at 78: the hub).
    let (p1, _, _) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let mut second = fixture("referral-ada.json");
    second["referralId"] = json!("EMIS-2026-000999");
    second["needs"] = json!(["housing"]);
    second["patient"]["phone"] = json!("01282 999999");
    let (p2, _, _) = gw.refer(GP, &second).await;
    assert_ne!(p1, p2, "each referral has its own Patient");
    // The crafting group sees the first Patient only, the housing provider the second only.
    assert_eq!(
        gw.get(CRAFTS, &format!("/fhir/Patient/{p1}")).await.status,
        200
    );
    assert_eq!(
        gw.get(CRAFTS, &format!("/fhir/Patient/{p2}")).await.status,
        404
    );
    assert_eq!(
        gw.get(HOUSING, &format!("/fhir/Patient/{p2}")).await.status,
        200
    );
    assert_eq!(
        gw.get(HOUSING, &format!("/fhir/Patient/{p1}")).await.status,
        404
    );
    let first = gw.get(CRAFTS, &format!("/fhir/Patient/{p1}")).await.body;
    assert!(
        !first.to_string().contains("999999"),
        "the new phone number leaked"
    );
    // The GP finds both by NHS number; a provider only its own.
    let q = "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018";
    assert_eq!(gw.get(GP, q).await.entries().len(), 2);
    assert_eq!(gw.get(CRAFTS, q).await.entries().len(), 1);
    assert_eq!(gw.get(GP2, q).await.entries().len(), 0);
}
