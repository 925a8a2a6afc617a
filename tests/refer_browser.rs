//! The public self-referral page (`/refer`) in a real browser: Debian's chromium and
//! chromium-driver, driven by selenium from `tests/inbox/refer_browser.py`, by keyboard
//! alone, with axe-core (npm) run on every page, and the form, its errors and the
//! confirmation each checked at a phone's width and at 200% zoom.
//!
//! The person sends the form once with faults (an impossible date of birth, no phone or
//! email), follows the error summary to the field, corrects it and sends it again; the
//! confirmation shows a reference and nothing they typed. Then, over FHIR, the hub finds the
//! referral in its queue by that reference, with what was typed in the browser.
//!
//! The tools are those of `inbox_browser.rs`, installed once under cargo's target dir (the
//! same pinned versions, so the same virtualenv and node_modules). Screenshots of the form,
//! the form with its errors and the confirmation land in `target/tmp/refer-screens/`.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::*;
use crate::conformance::run;
use crate::inbox_browser::tools;

/// The self-referral with this reference as the hub sees it: (ServiceRequest, Task).
async fn in_the_hubs_queue(gw: &TestGateway, reference: &str) -> (Value, Value) {
    let found = gw
        .get(
            HUB,
            &format!("/fhir/ServiceRequest?identifier=https://sp-gateway.example.org/fhir/Id/self-referral|{reference}"),
        )
        .await;
    assert_eq!(found.status, 200, "{}", found.body);
    let entries = found.entries();
    assert_eq!(
        entries.len(),
        1,
        "one referral for {reference}: {}",
        found.body
    );
    let sr = entries[0].clone();
    let sid = sr["id"].as_str().expect("ServiceRequest id").to_string();
    let tasks = gw
        .get(HUB, &format!("/fhir/Task?focus=ServiceRequest/{sid}"))
        .await;
    assert_eq!(tasks.entries().len(), 1, "{}", tasks.body);
    (sr, tasks.entries()[0].clone())
}

#[tokio::test]
async fn a_person_refers_themselves_by_keyboard_in_chromium_and_every_page_passes_axe() {
    ensure_debian_package("chromium", "/usr/bin/chromium");
    ensure_debian_package("chromium-driver", "/usr/bin/chromedriver");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (python, axe) = tools(&target.join("browser-tools"));
    let shots = target.join("refer-screens");
    std::fs::create_dir_all(&shots).expect("screens dir");
    for shot in ["refer-form.png", "refer-errors.png", "refer-done.png"] {
        let _ = std::fs::remove_file(shots.join(shot)); // this run's, not an earlier one's
    }

    let dir = tempfile::tempdir().expect("tmp");
    let gw = TestGateway::start(dir.path()).await;

    let script = Path::new(ROOT).join("tests/inbox/refer_browser.py");
    let (base, shots2) = (gw.base.clone(), shots.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(&python)
                .arg(&script)
                .arg(&base)
                .arg(&axe)
                .arg(&shots2),
            "tests/inbox/refer_browser.py",
        )
    })
    .await
    .expect("browser run");
    println!("{out}");
    assert!(out.contains("\"ok\": true"), "{out}");
    assert!(
        out.contains("axe control ok"),
        "axe reports a planted fault: {out}"
    );
    for page in [
        "refer form",
        "refer form at phone width",
        "refer form at 200% zoom",
        "privacy",
        "refer form with errors",
        "refer form with errors at phone width",
        "refer form with errors at 200% zoom",
        "confirmation",
        "confirmation at phone width",
        "confirmation at 200% zoom",
    ] {
        assert!(
            out.contains(&format!("axe ok: {page} (")),
            "axe ran on {page}: {out}"
        );
    }
    for check in [
        "ok: the error summary heads the page and links each fault to its field",
        "ok: the form keeps what was typed",
        "ok: Enter on an error's link moves to its field",
        "ok: the confirmation and its address hold nothing that was typed",
    ] {
        assert!(out.contains(check), "{check}: {out}");
    }
    for shot in ["refer-form.png", "refer-errors.png", "refer-done.png"] {
        let len = std::fs::metadata(shots.join(shot)).expect(shot).len();
        assert!(len > 10_000, "{shot} is a real screenshot ({len} bytes)");
    }

    // The script's last line: the reference the page showed, and who was typed in.
    let done: Value = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line: {out}"));
    let reference = done["reference"].as_str().expect("reference").to_string();
    assert!(
        is_reference(&reference),
        "the reference is SP-XXXX-XXXX: {reference}"
    );
    let person = &done["person"];

    // What the person did in the browser, the hub sees over FHIR, in its queue for triage.
    let (sr, task) = in_the_hubs_queue(&gw, &reference).await;
    assert_eq!(task["owner"]["reference"], "Organization/pendle-cvs-hub");
    assert!(task.to_string().contains("triage"), "{task}");
    let pid = sr["subject"]["reference"]
        .as_str()
        .expect("subject")
        .to_string();
    assert_eq!(
        sr["requester"]["reference"], pid,
        "they referred themselves"
    );
    let patient = gw.get(HUB, &format!("/fhir/{pid}")).await;
    assert_eq!(patient.status, 200, "{}", patient.body);
    let p = &patient.body;
    assert_eq!(p["name"][0]["given"][0], person["given_name"], "{p}");
    assert_eq!(p["name"][0]["family"], person["family_name"], "{p}");
    assert_eq!(p["birthDate"], person["birth_date"], "{p}");
    assert_eq!(p["address"][0]["postalCode"], person["postcode"], "{p}");
    assert_eq!(p["identifier"][0]["value"], person["nhs_number"], "{p}");
    let p_text = p.to_string();
    assert!(
        p_text.contains("01632") && p_text.contains("marigold.tabwell@example.com"),
        "the phone and email typed: {p}"
    );
    // The practice chosen (by the down arrow) was told, because they agreed; no other was.
    assert_eq!(person["practice"], "P81001", "{person}");
    let sid = sr["id"].as_str().expect("id");
    let seen = gw.get(GP, &format!("/fhir/ServiceRequest/{sid}")).await;
    assert_eq!(seen.status, 200, "P81001's GP was told: {}", seen.body);
    assert_eq!(
        gw.get(GP2, &format!("/fhir/ServiceRequest/{sid}"))
            .await
            .status,
        404
    );
}

/// `SP-[A-Z0-9]{4}-[A-Z0-9]{4}` (the tests have no regex crate).
fn is_reference(reference: &str) -> bool {
    let parts: Vec<&str> = reference.split('-').collect();
    parts.len() == 3
        && parts[0] == "SP"
        && parts[1..].iter().all(|p| {
            p.len() == 4
                && p.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
}
