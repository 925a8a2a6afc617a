//! The directory of services (issue #15 items 3–5): ORUK feeds imported (the published
//! examples, by the command line on a stopped store; a synthetic feed of over 500 services,
//! through a running gateway's admin API), read and searched as FHIR, routed to from every
//! kind of referrer, a provider's capacity status (over FHIR and from the inbox's page),
//! re-import, retirement, and a feed with broken records imported in part.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::common::*;
use crate::conformance::run;

const TODAY_MINUS: i64 = 30;
/// Organisations linked to the demo providers (`oruk_organization`).
const ORG_CRAFTS: &str = "0a0a0a0a-0000-4000-8000-000000000001";
const ORG_MONEY: &str = "0a0a0a0a-0000-4000-8000-000000000002";
/// The ORUK example's organisation and service (fixtures/oruk/service_full.json).
const ORG_EXAMPLE: &str = "d9d5e0f5-d3ce-4f73-9a2f-4dd0ecc6c610";
const EXAMPLE: &str = "ac148810-d857-441c-9679-408f346de14b";
/// Services of the crafts organisation, in the order routing tries them (local priority).
const STALE: &str = "5e000000-0000-4000-8000-000000000001";
const CLOSED: &str = "5e000000-0000-4000-8000-000000000002";
const FULL: &str = "5e000000-0000-4000-8000-000000000003";
pub const CIRCLE: &str = "5e000000-0000-4000-8000-000000000004";
const DEBT: &str = "5e000000-0000-4000-8000-000000000005";
/// Synthetic services from organisations the gateway does not serve.
const FILLER: usize = 520;

/// The demo config with a directory: routes from the directory's services, a rule naming
/// one, providers linked to ORUK organisations, and local fields.
pub fn directory_config() -> String {
    config_text(with_directory)
}

/// The same, with the demo config's inbox people.
pub fn directory_config_with_people() -> String {
    with_directory(demo_config_with_people())
}

fn with_directory(t: String) -> String {
    {
        let start = t.find("[[routing.routes]]").expect("routes");
        let end = t.find("# Outcome measures").expect("outcomes");
        let routes = format!(
            "[[routing.routes]]\nname = \"money-via-directory\"\nservice = \"{DEBT}\"\nneeds = [\"debt\"]\n\n"
        );
        let mut t = format!("{}{routes}{}", &t[..start], &t[end..]);
        t = t.replace(
            "fallback_provider = \"pendle-cvs-hub\"",
            "fallback_provider = \"pendle-cvs-hub\"\ndirectory = true",
        );
        for (id, org) in [
            ("pendle-crafts", ORG_CRAFTS),
            ("burnley-money-advice", ORG_MONEY),
            ("east-lancs-housing", ORG_EXAMPLE),
        ] {
            t = t.replace(
                &format!("id = \"{id}\"\n"),
                &format!("id = \"{id}\"\noruk_organization = \"{org}\"\n"),
            );
        }
        t.push_str(&format!(
            r#"
[refer]
route_by_rules = true

[directory]
assured_within_months = 12

[[directory.taxonomies]]
name = "sp-gateway-needs"
terms = {{ loneliness = "loneliness", debt = "debt", housing = "housing", employment = "employment", wellbeing = "low-confidence" }}

# The ORUK example's own taxonomy and term.
[[directory.taxonomies]]
name = "taxonomy"
terms = {{ name = "low-confidence" }}

[[directory.services]]
id = "{STALE}"
priority = 10

[[directory.services]]
id = "{CLOSED}"
priority = 20

[[directory.services]]
id = "{FULL}"
priority = 30

[[directory.services]]
id = "{CIRCLE}"
priority = 40

# The example's service areas are free text: the deployment says where it works.
[[directory.services]]
id = "{EXAMPLE}"
areas = ["BB8"]
priority = 5
"#
        ));
        t
    }
}

fn assured_recently() -> String {
    (time::OffsetDateTime::now_utc().date() - time::Duration::days(TODAY_MINUS)).to_string()
}

/// One ORUK service (the shape of the ORUK API's full service).
fn service(id: &str, org: (&str, &str), name: &str, terms: &[&str], districts: &str) -> Value {
    json!({
        "id": id,
        "name": name,
        "description": format!("{name}: a synthetic service for tests."),
        "status": "active",
        "email": "hello@example.org",
        "assured_date": assured_recently(),
        "minimum_age": 16,
        "organization": { "id": org.0, "name": org.1, "description": "A synthetic organisation." },
        "service_areas": [{ "id": format!("{id}-area"), "extent": districts, "extent_type": "text", "name": districts }],
        "service_at_locations": [{
            "id": format!("{id}-sal"),
            "location": {
                "id": format!("{id}-place"),
                "location_type": "physical",
                "name": format!("{name} hall"),
                "latitude": 53.83, "longitude": -2.21,
                "addresses": [{ "id": format!("{id}-addr"), "address_1": "1 Market Street", "city": "Nelson", "state_province": "Lancashire", "postal_code": format!("{} 1AA", districts.split(',').next().unwrap_or("BB9").trim()), "country": "GB", "address_type": "physical" }]
            }
        }],
        "attributes": terms.iter().map(|t| json!({
            "id": format!("{id}-{t}"),
            "taxonomy_term": { "id": format!("term-{t}"), "name": t, "description": t, "taxonomy": "sp-gateway-needs", "term": t }
        })).collect::<Vec<_>>()
    })
}

/// The synthetic feed: the ORUK example, the crafts and money services, and `FILLER`
/// services of unserved organisations elsewhere in Lancashire.
pub fn feed(without: &[&str]) -> Value {
    let crafts = (ORG_CRAFTS, "Pendle Crafting Circle CIO");
    let mut all = vec![
        fixture("oruk/service_full.json"),
        {
            let mut s = service(STALE, crafts, "Knit and Natter", &["loneliness"], "BB9");
            s["assured_date"] = json!("2020-01-01");
            s
        },
        {
            let mut s = service(CLOSED, crafts, "Nelson Choir", &["loneliness"], "BB9");
            s["status"] = json!("temporarily closed");
            s
        },
        service(FULL, crafts, "Walking Group", &["loneliness"], "BB9"),
        service(
            CIRCLE,
            crafts,
            "Crafts Circle",
            &["loneliness", "wellbeing"],
            "BB8, BB9",
        ),
        service(
            DEBT,
            (ORG_MONEY, "Burnley Money Advice Ltd"),
            "Debt Drop-in",
            &["debt", "employment"],
            "BB10, BB11, BB12",
        ),
    ];
    let needs = ["loneliness", "debt", "housing", "employment", "wellbeing"];
    for i in 0..FILLER {
        let org = format!("0b0b0b0b-0000-4000-8000-{:012}", i % 40);
        let name = format!("Community service {i}");
        all.push(service(
            &format!("5f000000-0000-4000-8000-{i:012}"),
            (&org, &format!("Preston group {}", i % 40)),
            &name,
            &[needs[i % needs.len()]],
            &format!("PR{}", 1 + i % 5),
        ));
    }
    all.retain(|s| !without.contains(&s["id"].as_str().unwrap_or_default()));
    json!({ "total_items": all.len(), "total_pages": 1, "page_number": 1, "size": all.len(), "first_page": true, "last_page": true, "empty": false, "contents": all })
}

/// The routing decision on a Task: (rule, reason, service reference).
fn decision(task: &Value) -> (String, String, String) {
    let parts = task["extension"][0]["extension"]
        .as_array()
        .expect("decision");
    let get = |url: &str, key: &str| {
        parts
            .iter()
            .find(|p| p["url"] == url)
            .and_then(|p| p.pointer(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (
        get("rule", "/valueString"),
        get("reason", "/valueString"),
        get("service", "/valueReference/reference"),
    )
}

/// Every resource the gateway emitted passes the R4 schema and parses with fhir-sdk.
pub fn valid(resource: &Value) {
    let rtype = resource["resourceType"].as_str().expect("resourceType");
    let issues = sp_gateway::schema::check_fhir(rtype, resource).expect("schema");
    assert!(
        issues.is_empty(),
        "{rtype} fails the R4 schema: {issues:?}\n{resource:#}"
    );
    fhir_sdk_parse(resource, rtype).unwrap_or_else(|e| panic!("{rtype}: {e}\n{resource:#}"));
    for e in resource["entry"].as_array().into_iter().flatten() {
        valid(&e["resource"]);
    }
}

pub async fn import(gw: &TestGateway, feed: &Value) -> Value {
    let r = gw.post_json(ADMIN, "/admin/directory/import", feed).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn ids(report: &Value, key: &str) -> Vec<String> {
    report[key]
        .as_array()
        .expect(key)
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn the_directory_is_imported_searched_and_routed_to_from_every_referrer() {
    let dir = tempfile::tempdir().unwrap();
    let config = directory_config();
    let cfg_file = dir.path().join("gateway.toml");
    std::fs::write(&cfg_file, &config).unwrap();
    let data = dir.path().join("data");

    // 1. The ORUK example, from the command line, into a stopped gateway's store.
    let out = cli([
        "directory".as_ref(),
        "import".as_ref(),
        Path::new(ROOT)
            .join("fixtures/oruk/service_full.json")
            .as_os_str(),
        "--config".as_ref(),
        cfg_file.as_os_str(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 services in the feed: 1 added"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("added: HealthcareService/{EXAMPLE}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("not a list of postcode districts"),
        "the free-text area is noted: {stdout}"
    );

    let gw = TestGateway::start_with(&data, config.clone()).await;
    let ex = gw
        .get(GP, &format!("/fhir/HealthcareService/{EXAMPLE}"))
        .await;
    assert_eq!(ex.status, 200, "{}", ex.body);
    valid(&ex.body);
    assert_eq!(
        ex.body["providedBy"]["reference"], "Organization/east-lancs-housing",
        "a linked organisation keeps its provider's id"
    );
    let org = gw
        .get(REFERRER, "/fhir/Organization/east-lancs-housing")
        .await;
    assert_eq!(org.status, 200);
    assert_eq!(
        org.body["name"], "Example Organization Inc.",
        "the same record answers the provider's Organization"
    );
    valid(&org.body);

    // 2. The synthetic feed (over 500 services) through the running gateway.
    let report = import(&gw, &feed(&[])).await;
    assert_eq!(report["services"], json!(FILLER + 6));
    assert_eq!(ids(&report, "added").len(), FILLER + 5, "{report:#}");
    assert_eq!(report["unchanged"], 1, "the example was already there");
    assert!(
        report["refused"].as_array().unwrap().is_empty(),
        "{report:#}"
    );

    // Every client but the admin reads the directory; it is not patient data.
    for token in [GP, GP2, CRAFTS, HUB, REFERRER, AUDITOR] {
        assert_eq!(
            gw.get(token, &format!("/fhir/HealthcareService/{CIRCLE}"))
                .await
                .status,
            200,
            "{token}"
        );
    }
    assert_ne!(
        gw.get(ADMIN, &format!("/fhir/HealthcareService/{CIRCLE}"))
            .await
            .status,
        200
    );

    // 3. Searches: by category and area, active, with _include; by postcode.
    let s = gw
        .get(GP, "/fhir/HealthcareService?service-category=loneliness&coverage-area=Location/district-BB9&active=true&_include=HealthcareService:organization&_include=HealthcareService:location")
        .await;
    assert_eq!(s.status, 200, "{}", s.body);
    valid(&s.body);
    let matched: Vec<String> = s.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    let mut want = vec![STALE.to_string(), FULL.to_string(), CIRCLE.to_string()];
    want.sort();
    assert_eq!(matched, want, "the closed choir is not active");
    let included: Vec<String> = s.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        included.contains(&"Organization/pendle-crafts".to_string()),
        "{included:?}"
    );
    assert!(
        included.contains(&format!("Location/{CIRCLE}-place")),
        "{included:?}"
    );
    let all = gw.get(GP, "/fhir/HealthcareService?_count=100").await;
    assert_eq!(all.body["total"], json!(FILLER + 6));
    assert_eq!(all.entries().len(), 100);
    assert!(all.next_link().is_some(), "paged");
    let places = gw
        .get(CRAFTS, "/fhir/Location?address-postalcode=bb9")
        .await;
    let names: Vec<&str> = places.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert!(
        names.contains(&"district-BB9") && names.contains(&format!("{STALE}-place").as_str()),
        "{names:?}"
    );
    let bad = gw.get(GP, "/fhir/HealthcareService?colour=blue").await;
    assert_eq!(bad.status, 400, "{}", bad.body);

    // 4. A provider sets its own service's capacity status; nobody else can, nothing else
    // changes that way.
    let no_capacity = json!([{ "op": "add", "path": "/extension/-", "value": {
        "url": "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/SDOHCC-ExtensionHealthcareServiceCapacityStatus",
        "extension": [{ "url": "capacityStatus", "valueCodeableConcept": { "coding": [{ "system": "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes", "code": "no-capacity" }] } }]
    }}]);
    let patch = |token: &'static str, body: Value| {
        let gw = &gw;
        async move {
            gw.request(
                reqwest::Method::PATCH,
                &format!("/fhir/HealthcareService/{FULL}"),
                Some(token),
                Some("application/json-patch+json"),
                Some(body.to_string().into_bytes()),
                &[],
            )
            .await
        }
    };
    let before = gw.digest();
    assert_eq!(
        patch(MONEY, no_capacity.clone()).await.status,
        404,
        "not its service"
    );
    let renamed = patch(
        CRAFTS,
        json!([{ "op": "replace", "path": "/name", "value": "Renamed" }]),
    )
    .await;
    assert_eq!(renamed.status, 422, "{}", renamed.body);
    let mut odd = no_capacity.clone();
    odd[0]["value"]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] = json!("full-up");
    assert_eq!(patch(CRAFTS, odd).await.status, 422);
    assert_eq!(gw.digest(), before, "refused changes write nothing");
    let ok = patch(CRAFTS, no_capacity).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["meta"]["versionId"], "2");
    valid(&ok.body);

    // 5. Referrals from every kind of referrer, routed from the directory.
    // A GP system (EMIS-style JSON): loneliness in BB9.
    let (_, _, task) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let t = gw.get(GP, &format!("/fhir/Task/{task}")).await.body;
    valid(&t);
    let (rule, reason, svc) = decision(&t);
    assert_eq!(
        (rule.as_str(), svc.as_str()),
        ("directory", format!("HealthcareService/{CIRCLE}").as_str()),
        "{reason}"
    );
    assert_eq!(t["owner"]["reference"], "Organization/pendle-crafts");
    assert!(
        reason.contains(&format!(
            "service {STALE} (Knit and Natter) was last assured on 2020-01-01"
        )),
        "{reason}"
    );
    assert!(
        reason.contains(&format!(
            "service {CLOSED} (Nelson Choir) is not active (status temporarily closed)"
        )),
        "{reason}"
    );
    assert!(
        reason.contains(&format!(
            "service {FULL} (Walking Group) says it has no capacity"
        )),
        "{reason}"
    );

    // A referrer (the council's social care): debt in BB11, by the rule naming a service.
    let mut council = fixture("fhir/transaction-council-eve.json");
    for e in council["entry"].as_array_mut().unwrap() {
        let r = &mut e["resource"];
        if r["resourceType"] == "Patient" {
            r["address"][0]["postalCode"] = json!("BB11 2AB");
        } else {
            r["reasonCode"] = json!([{ "coding": [{ "system": "http://snomed.info/sct", "code": "160932005", "display": "Financial problem" }] }]);
        }
    }
    let r = gw.post_json(REFERRER, "/fhir", &council).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let task = r
        .headers
        .get("x-sp-gateway-task")
        .and_then(|v| v.to_str().ok())
        .expect("task")
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let t = gw.get(REFERRER, &format!("/fhir/Task/{task}")).await.body;
    let (rule, reason, svc) = decision(&t);
    assert_eq!(
        (rule.as_str(), svc.as_str()),
        (
            "money-via-directory",
            format!("HealthcareService/{DEBT}").as_str()
        ),
        "{reason}"
    );
    assert_eq!(t["owner"]["reference"], "Organization/burnley-money-advice");

    // A person, at /refer: low confidence in BB8. The example (assured 2005) is turned away.
    let mut b = crate::inbox::Browser::new(&gw.base);
    let token = b.get("/refer").await.hidden("token");
    let form: Vec<(&str, &str)> = vec![
        ("token", &token),
        ("for_whom", "me"),
        ("given_name", "Rowan"),
        ("family_name", "Example"),
        ("dob_day", "4"),
        ("dob_month", "5"),
        ("dob_year", "1961"),
        ("postcode", "BB8 1AA"),
        ("phone", "01632 960002"),
        ("email", ""),
        ("needs", "low-confidence"),
        ("more", ""),
        ("nhs_number", ""),
        ("practice", ""),
        ("consent_share", "yes"),
    ];
    let done = b.post("/refer", &form).await;
    assert_eq!(done.status, 200, "{}", done.body);
    let hub_tasks = gw
        .get(CRAFTS, "/fhir/Task?status=requested&_count=50")
        .await;
    let t = hub_tasks
        .entries()
        .into_iter()
        .find(|t| decision(t).1.contains("low-confidence"))
        .expect("the self-referral reached the crafts circle");
    let (rule, reason, svc) = decision(&t);
    assert_eq!(
        (rule.as_str(), svc.as_str()),
        ("directory", format!("HealthcareService/{CIRCLE}").as_str()),
        "{reason}"
    );
    assert!(
        reason.contains(&format!(
            "service {EXAMPLE} (Community Counselling) was last assured on 2005-01-01"
        )),
        "{reason}"
    );

    // 6. The same feed again changes nothing; the capacity status (a local field) survives.
    let again = import(&gw, &feed(&[])).await;
    assert!(
        ids(&again, "added").is_empty() && ids(&again, "changed").is_empty(),
        "{again:#}"
    );
    assert_eq!(again["unchanged"], json!(FILLER + 6));
    let full = gw
        .get(GP, &format!("/fhir/HealthcareService/{FULL}"))
        .await
        .body;
    assert_eq!(full["meta"]["versionId"], "2");
    assert!(full.to_string().contains("no-capacity"));

    // 7. A service missing from a later feed is retired, not deleted; its Tasks still
    // point at it; routing passes it by.
    let later = import(&gw, &feed(&[CIRCLE])).await;
    assert_eq!(
        ids(&later, "retired"),
        vec![CIRCLE.to_string()],
        "{later:#}"
    );
    let circle = gw
        .get(CRAFTS, &format!("/fhir/HealthcareService/{CIRCLE}"))
        .await;
    assert_eq!(circle.status, 200);
    assert_eq!(circle.body["active"], false);
    valid(&circle.body);
    let history = gw
        .get(
            AUDITOR,
            &format!("/fhir/HealthcareService/{CIRCLE}/_history"),
        )
        .await;
    assert_eq!(history.status, 200, "{}", history.body);
    let mut ada2 = fixture("referral-ada.json");
    ada2["referralId"] = json!("ada-after-retirement");
    let (_, _, task) = gw.refer(GP, &ada2).await;
    let t = gw.get(GP, &format!("/fhir/Task/{task}")).await.body;
    let (rule, reason, _) = decision(&t);
    assert_eq!(rule, "fallback", "{reason}");
    assert!(
        reason.contains("says it has no capacity"),
        "each service turned away says why: {reason}"
    );
}

/// Posts the capacity form of service `id` from the services page, as the page has it.
async fn capacity_form(
    b: &mut crate::inbox::Browser,
    id: &str,
    status: &str,
) -> crate::inbox::Page {
    let page = b.get("/inbox/services").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let form_at = page
        .body
        .find(&format!("action=\"/inbox/services/{id}\""))
        .unwrap_or_else(|| panic!("no form for {id}: {}", page.body));
    let form = crate::inbox::Page {
        status: 200,
        location: None,
        body: page.body[form_at..].to_string(),
    };
    let (csrf, version) = (form.hidden("csrf"), form.hidden("version"));
    b.post(
        &format!("/inbox/services/{id}"),
        &[("csrf", &csrf), ("version", &version), ("status", status)],
    )
    .await
}

#[tokio::test]
async fn a_group_says_in_the_inbox_that_a_service_is_full_and_referrals_go_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_with(dir.path(), directory_config_with_people()).await;
    import(&gw, &feed(&[])).await;
    let email = "crafts@demo.sp-gateway.example.org";
    let mut b = crate::inbox::Browser::new(&gw.base);
    b.sign_in(
        email,
        "demo-crafts-password",
        &crate::inbox::secret_of(email),
    )
    .await;

    // The queue links to the services page; it lists the group's own services only.
    let queue = b.get("/inbox").await;
    assert!(
        queue.body.contains("href=\"/inbox/services\""),
        "{}",
        queue.body
    );
    let page = b.get("/inbox/services").await;
    assert_eq!(page.status, 200, "{}", page.body);
    for name in [
        "Crafts Circle",
        "Walking Group",
        "Knit and Natter",
        "Nelson Choir",
    ] {
        assert!(page.body.contains(name), "{name}: {}", page.body);
    }
    assert!(
        !page.body.contains("Debt Drop-in"),
        "another group's service"
    );
    assert!(page.body.contains("Not said yet"), "{}", page.body);

    // Refused forms change nothing: no CSRF token, no choice, an unknown choice, a stale
    // page, another group's service, no such service.
    let before = crate::inbox::clinical_digest(&gw);
    let version = |b: &str| {
        let at = b.find(&format!("/inbox/services/{CIRCLE}")).expect("form");
        crate::inbox::Page {
            status: 200,
            location: None,
            body: b[at..].to_string(),
        }
        .hidden("version")
    };
    let v = version(&page.body);
    let csrf = page.hidden("csrf");
    let r = b
        .post(
            &format!("/inbox/services/{CIRCLE}"),
            &[("version", &v), ("status", "no-capacity")],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("Nothing was changed"), "{}", r.body);
    for status in ["", "full-up"] {
        let r = capacity_form(&mut b, CIRCLE, status).await;
        assert_eq!(r.status, 422, "{status}: {}", r.body);
        assert!(
            r.body
                .contains("Choose whether the service can take new referrals"),
            "{}",
            r.body
        );
        assert!(
            r.body.contains("nhsuk-form-group--error"),
            "the field is marked"
        );
        assert!(
            r.body.contains(&format!("href=\"#status-{CIRCLE}\"")),
            "the summary links to it"
        );
    }
    let r = b
        .post(
            &format!("/inbox/services/{CIRCLE}"),
            &[("csrf", &csrf), ("version", "7"), ("status", "no-capacity")],
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body.contains("changed since you opened the page"),
        "{}",
        r.body
    );
    for other in [DEBT, "no-such-service"] {
        let r = b
            .post(
                &format!("/inbox/services/{other}"),
                &[("csrf", &csrf), ("version", "1"), ("status", "no-capacity")],
            )
            .await;
        assert_eq!(r.status, 404, "{other}: {}", r.body);
        assert!(r.body.contains("Service not found"), "{}", r.body);
    }
    assert_eq!(
        crate::inbox::clinical_digest(&gw),
        before,
        "refused forms write nothing"
    );
    let debt = gw
        .get(MONEY, &format!("/fhir/HealthcareService/{DEBT}"))
        .await;
    assert_eq!(debt.body["meta"]["versionId"], "1");

    // "Full": saved, shown, and on the FHIR record as Gravity's code.
    let r = capacity_form(&mut b, CIRCLE, "no-capacity").await;
    assert_eq!(r.status, 303, "{}", r.body);
    let done = format!("/inbox/services?done=no-capacity&service={CIRCLE}");
    assert_eq!(r.location.as_deref(), Some(done.as_str()));
    let page = b.get(&done).await;
    assert!(
        page.body
            .contains("Saved: Crafts Circle is now shown as “Full”"),
        "{}",
        page.body
    );
    let svc = gw
        .get(GP, &format!("/fhir/HealthcareService/{CIRCLE}"))
        .await
        .body;
    valid(&svc);
    assert_eq!(svc["meta"]["versionId"], "2");
    let code = svc["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["url"]
                .as_str()
                .unwrap_or_default()
                .ends_with("CapacityStatus")
        })
        .and_then(|e| e.pointer("/extension/0/valueCodeableConcept/coding/0/code"))
        .cloned();
    assert_eq!(code, Some(json!("no-capacity")));
    // The same choice again writes nothing new.
    let r = capacity_form(&mut b, CIRCLE, "no-capacity").await;
    assert_eq!(r.status, 303);
    let again = gw
        .get(GP, &format!("/fhir/HealthcareService/{CIRCLE}"))
        .await
        .body;
    assert_eq!(again["meta"]["versionId"], "2");

    // The trail names the person and the service.
    let events = crate::inbox::audit_events(&gw, "action=U&_count=50").await;
    assert!(
        events.iter().any(|e| {
            let text = e.to_string();
            text.contains(&format!("HealthcareService/{CIRCLE}")) && text.contains(email)
        }),
        "{events:#?}"
    );

    // The walking group has a waiting list: set the same way.
    let r = capacity_form(&mut b, FULL, "waitlist").await;
    assert_eq!(r.status, 303, "{}", r.body);

    // A GP's referral for loneliness in BB9 passes both over, each with its reason.
    let (_, _, task) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let t = gw.get(GP, &format!("/fhir/Task/{task}")).await.body;
    let (rule, reason, _) = decision(&t);
    assert_eq!(rule, "fallback", "{reason}");
    assert!(
        reason.contains(&format!(
            "service {CIRCLE} (Crafts Circle) says it has no capacity"
        )),
        "{reason}"
    );

    // Room again: the next referral goes to the circle.
    let r = capacity_form(&mut b, CIRCLE, "capacity").await;
    assert_eq!(r.status, 303, "{}", r.body);
    let (_, _, task) = gw
        .refer(GP, &variant("referral-ada.json", "EMIS-ROOM-AGAIN", None))
        .await;
    let t = gw.get(GP, &format!("/fhir/Task/{task}")).await.body;
    let (rule, reason, svc) = decision(&t);
    assert_eq!(
        (rule.as_str(), svc.as_str()),
        ("directory", format!("HealthcareService/{CIRCLE}").as_str()),
        "{reason}"
    );
}

#[tokio::test]
async fn a_feed_with_broken_records_is_imported_in_part_and_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_with(dir.path(), directory_config()).await;
    let org = ("0c0c0c0c-0000-4000-8000-000000000001", "Broken Feed Trust");
    let good = service(
        "6a000000-0000-4000-8000-000000000001",
        org,
        "Good Service",
        &["housing"],
        "BB10",
    );
    let mut no_id = service(
        "6a000000-0000-4000-8000-000000000002",
        org,
        "No Id",
        &["housing"],
        "BB10",
    );
    no_id.as_object_mut().unwrap().remove("id");
    let mut unknown = service(
        "6a000000-0000-4000-8000-000000000003",
        (
            "0c0c0c0c-0000-4000-8000-000000000099",
            "Only In A Refused Service",
        ),
        "Unknown Taxonomy",
        &["housing"],
        "BB10",
    );
    unknown["attributes"][0]["taxonomy_term"]["taxonomy"] = json!("made-up-taxonomy");
    let mut orphan = service(
        "6a000000-0000-4000-8000-000000000004",
        org,
        "No Organisation",
        &["housing"],
        "BB10",
    );
    orphan.as_object_mut().unwrap().remove("organization");
    let twice = good.clone();
    let feed = json!({ "contents": [good, no_id, unknown, orphan, twice] });

    // Not a feed at all: refused whole, nothing written.
    let before = gw.digest();
    let r = gw
        .post_json(
            ADMIN,
            "/admin/directory/import",
            &json!({ "colour": "blue" }),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(gw.digest(), before);
    assert_eq!(
        gw.post_json(GP, "/admin/directory/import", &feed)
            .await
            .status,
        403,
        "the admin's alone"
    );

    let report = import(&gw, &feed).await;
    assert_eq!(
        ids(&report, "added"),
        vec!["6a000000-0000-4000-8000-000000000001".to_string()],
        "{report:#}"
    );
    let refused = report["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 4, "{report:#}");
    let text = serde_json::to_string(refused).unwrap();
    for why in [
        "contents[1].id: is required but missing",
        "unknown taxonomy `made-up-taxonomy`",
        "contents[3].organization: the service has no organisation",
        "is listed twice in the feed",
    ] {
        assert!(text.contains(why), "{why} in {text}");
    }
    // Nothing of a refused service was written: not its organisation, nor its place.
    for path in [
        "/fhir/HealthcareService/6a000000-0000-4000-8000-000000000003",
        "/fhir/Organization/0c0c0c0c-0000-4000-8000-000000000099",
        "/fhir/Location/6a000000-0000-4000-8000-000000000003-place",
        "/fhir/HealthcareService/6a000000-0000-4000-8000-000000000004",
    ] {
        assert_eq!(gw.get(GP, path).await.status, 404, "{path}");
    }
    assert_eq!(
        gw.get(
            GP,
            "/fhir/Location/6a000000-0000-4000-8000-000000000001-place"
        )
        .await
        .status,
        200
    );
    let all = gw.get(GP, "/fhir/HealthcareService").await;
    assert_eq!(all.body["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_through_fhirpy_and_the_independent_validator() {
    let tools_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-tools");
    let (python, node_modules) =
        tokio::task::spawn_blocking(move || crate::conformance::tools(&tools_dir))
            .await
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_with(dir.path(), directory_config()).await;
    import(&gw, &feed(&[])).await;
    let returned = dir.path().join("returned.jsonl");
    let script = Path::new(ROOT).join("tests/directory/fhirpy_directory.py");
    let (base, ret) = (format!("{}/fhir", gw.base), returned.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(&python)
                .arg(&script)
                .arg(&base)
                .arg(GP)
                .arg(&ret),
            "directory through fhirpy",
        )
    })
    .await
    .unwrap();
    println!("{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
    let validated = crate::conformance::validate_all(returned, node_modules).await;
    for t in ["HealthcareService", "Location", "Organization", "Bundle"] {
        assert!(
            validated.contains(&format!("\"{t}\"")),
            "{t} validated: {validated}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_feed_or_a_locked_store_is_a_plain_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_file = dir.path().join("gateway.toml");
    std::fs::write(&cfg_file, directory_config()).unwrap();
    let data = dir.path().join("data");
    let import = |source: &str| {
        cli([
            "directory".as_ref(),
            "import".as_ref(),
            std::ffi::OsStr::new(source),
            "--config".as_ref(),
            cfg_file.as_os_str(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ])
    };
    // The peer is not there: nothing is read, so nothing is opened or written.
    let out = import("http://127.0.0.1:9/services");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error: http://127.0.0.1:9/services"), "{err}");
    assert!(!data.exists(), "no store was even created");
    // A file that is not JSON, or not a feed.
    std::fs::write(dir.path().join("bad.json"), "{\"contents\": [").unwrap();
    let out = import(dir.path().join("bad.json").to_str().unwrap());
    assert_eq!(out.status.code(), Some(2));
    // A running gateway holds the store: the command says so instead of waiting or
    // writing beside it.
    let gw = TestGateway::start_with(&data, directory_config()).await;
    let before = gw.digest();
    let feed = Path::new(ROOT).join("fixtures/oruk/service_full.json");
    let out = import(feed.to_str().unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("stop it first"), "{err}");
    assert_eq!(gw.digest(), before);
}
