//! The provider inbox in a real browser: Debian's chromium and chromium-driver, driven by
//! selenium from `tests/inbox/browser.py`, by keyboard alone, with axe-core (npm) run on
//! every page, and each page checked at a phone's width and at 200% zoom.
//!
//! The test installs what it needs, once: the Debian packages with apt-get, selenium into a
//! virtualenv and axe-core into node_modules under cargo's target dir. Screenshots of the
//! queue and of one referral land in `target/tmp/inbox-screens/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::conformance::{npm_tool, python_tool, run};

const SELENIUM: &str = "selenium==4.50.0";
const AXE_NPM: &str = "axe-core@4.14.1";

/// Installs selenium and axe-core under `dir`, once; returns (python, axe.min.js). The
/// /refer browser test uses the same tools.
pub fn tools(dir: &Path) -> (PathBuf, PathBuf) {
    let python = python_tool(dir, SELENIUM);
    let axe = npm_tool(dir, "axe-core/axe.min.js", AXE_NPM).join("axe-core/axe.min.js");
    (python, axe)
}

#[tokio::test]
async fn the_inbox_works_by_keyboard_in_chromium_and_every_page_passes_axe() {
    ensure_debian_package("chromium", "/usr/bin/chromium");
    ensure_debian_package("chromium-driver", "/usr/bin/chromedriver");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (python, axe) = tools(&target.join("browser-tools"));
    let shots = target.join("inbox-screens");
    std::fs::create_dir_all(&shots).expect("screens dir");

    let dir = tempfile::tempdir().expect("tmp");
    // A gateway with a directory, so the services page has the group's services to show.
    let gw =
        TestGateway::start_with(dir.path(), crate::directory::directory_config_with_people()).await;
    crate::directory::import(&gw, &crate::directory::feed(&[])).await;
    let mut ada = fixture("referral-ada.json");
    ada["notes"] = serde_json::Value::String(
        "Lives alone since her husband died; would like to meet people. <script>alert('x')</script>"
            .into(),
    );
    let (_, _, task) = gw.refer("demo-gp-token", &ada).await;
    let cfg = sp_gateway::config::Config::parse(&demo_config_with_people(), "demo").expect("cfg");
    let crafts = cfg
        .inbox
        .demo_users
        .iter()
        .find(|d| d.provider == "pendle-crafts")
        .expect("demo person");

    let script = Path::new(crate::common::ROOT).join("tests/inbox/browser.py");
    let (base, email, password, secret) = (
        gw.base.clone(),
        crafts.email.clone(),
        crafts.password.clone(),
        crafts.totp_secret.clone(),
    );
    let (task2, axe2, shots2) = (task.clone(), axe.clone(), shots.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(&python)
                .arg(&script)
                .args([&base, &email, &password, &secret, &task2])
                .arg(&axe2)
                .arg(&shots2)
                .arg(crate::directory::CIRCLE),
            "tests/inbox/browser.py",
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
        "sign-in",
        "security code",
        "queue",
        "queue at phone width",
        "queue at 200% zoom",
        "referral (new)",
        "referral (score refused)",
        "referral (completed)",
        "services",
        "services at phone width",
        "services (no choice)",
        "services (saved)",
    ] {
        assert!(
            out.contains(&format!("axe ok: {page} (")),
            "axe ran on {page}"
        );
    }
    for shot in ["queue.png", "referral.png", "services.png"] {
        let len = std::fs::metadata(shots.join(shot)).expect(shot).len();
        assert!(len > 10_000, "{shot} is a real screenshot ({len} bytes)");
    }

    // What the person did in the browser, the GP system sees over FHIR.
    let t = gw.get("demo-gp-token", &format!("/fhir/Task/{task}")).await;
    assert_eq!(t.body["status"], "completed", "{}", t.body);
    let obs = t.body["output"][0]["valueReference"]["reference"]
        .as_str()
        .expect("output")
        .to_string();
    let o = gw.get("demo-gp-token", &format!("/fhir/{obs}")).await;
    assert_eq!(o.body["valueInteger"], 24);

    // What the page saved is the service's FHIR record.
    let svc = gw
        .get(
            "demo-gp-token",
            &format!("/fhir/HealthcareService/{}", crate::directory::CIRCLE),
        )
        .await;
    assert!(
        svc.body.to_string().contains("\"code\":\"no-capacity\""),
        "{}",
        svc.body
    );
}
