//! The commissioner's figures page in a real browser: Debian's chromium driven by selenium
//! from `tests/inbox/reports_browser.py`, by keyboard alone, with axe-core on every state of
//! the page, at a phone's width and at 200% zoom. A few months of referrals are seeded
//! first (the commit clock moved to each, in a year ahead of the wall clock), so the charts
//! and tables have something to show, small cells included. The full page's screenshot
//! lands in `target/tmp/inbox-screens/reports.png`.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::common::*;
use crate::conformance::run;
use crate::figures::{provider_token, set_clock};

const DAY: i64 = 86_400_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commissioner_reads_the_figures_by_keyboard_in_chromium_and_every_state_passes_axe() {
    ensure_debian_package("chromium", "/usr/bin/chromium");
    ensure_debian_package("chromium-driver", "/usr/bin/chromedriver");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (python, axe) = crate::inbox_browser::tools(&target.join("browser-tools"));
    let shots = target.join("inbox-screens");
    std::fs::create_dir_all(&shots).expect("screens dir");

    let dir = tempfile::tempdir().expect("tmp");
    let config = demo_config_with_people().replacen(
        "[[practices]]",
        "[server.limits]\nrate_per_second = 1000000\nrate_burst = 1000000\n\n[[practices]]",
        1,
    );
    let gw = TestGateway::start_with(dir.path(), config.clone()).await;
    // February to June of next year: 150 referrals, more each month.
    let year = time::OffsetDateTime::now_utc().year() + 1;
    let t0 = (time::Date::from_calendar_date(year, time::Month::February, 1)
        .expect("date")
        .midnight()
        .assume_utc()
        .unix_timestamp_nanos()
        / 1000) as i64;
    let needs = ["loneliness", "debt", "housing"];
    for i in 0..150usize {
        let at = t0 + ((i * i) as i64 * 140 / (150 * 150)) * DAY + i as i64 * 1_000_000;
        set_clock(&gw, at);
        let mut r = variant(
            "referral-ada.json",
            &format!("PAGE-{i}"),
            Some(&nhs_number(i)),
        );
        r["needs"] = json!([needs[i % 3]]);
        r["reasons"] = json!([]);
        let (_, _, task) = gw.refer(GP, &r).await;
        let owner = gw.get(GP, &format!("/fhir/Task/{task}")).await.body["owner"]["reference"]
            .as_str()
            .expect("owner")
            .trim_start_matches("Organization/")
            .to_string();
        if i % 10 < 7 {
            set_clock(&gw, at + (1 + (i % 9) as i64) * DAY);
            let r = gw
                .transition(provider_token(&owner), &task, status_to("accepted"))
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    let cfg = sp_gateway::config::Config::parse(&config, "demo").expect("cfg");
    let who = cfg
        .inbox
        .demo_users
        .iter()
        .find(|d| d.commissioner)
        .expect("the demo commissioner");

    let script = Path::new(crate::common::ROOT).join("tests/inbox/reports_browser.py");
    let (base, email, password, secret) = (
        gw.base.clone(),
        who.email.clone(),
        who.password.clone(),
        who.totp_secret.clone(),
    );
    let (axe2, shots2) = (axe.clone(), shots.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(&python)
                .arg(&script)
                .args([&base, &email, &password, &secret])
                .arg(&axe2)
                .arg(&shots2)
                .arg(year.to_string()),
            "tests/inbox/reports_browser.py",
        )
    })
    .await
    .expect("browser run");
    println!("{out}");
    assert!(out.contains("\"ok\": true"), "{out}");
    assert!(out.contains("axe control ok"), "{out}");
    for state in [
        "figures",
        "figures at phone width",
        "figures at 200% zoom",
        "figures (months chosen)",
        "figures (last month before first)",
    ] {
        assert!(
            out.contains(&format!("axe ok: {state} (")),
            "axe ran on {state}: {out}"
        );
    }
    let len = std::fs::metadata(shots.join("reports.png"))
        .expect("reports.png")
        .len();
    assert!(
        len > 30_000,
        "reports.png is a real screenshot ({len} bytes)"
    );
}
