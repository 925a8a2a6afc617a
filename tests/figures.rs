//! Commissioners' figures (issue #16): a seeded synthetic population of referrals over
//! twelve months, worked through the FHIR API as GP systems and providers do, with the
//! store's commit clock moved to each event's time (the simulated year is ahead of the
//! wall clock, so every write is stamped with the simulated time). The test keeps its own
//! record of every referral and computes the true figures from it, with the suppression
//! rule and the rounding to 5 applied by its own code; every MeasureReport figure must
//! equal them. Then: the
//! commissioner reads nothing of any one person, and `report rebuild` agrees exactly with
//! the figures kept write by write.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::common::*;
/// Every Measure and MeasureReport passes the R4 schema and parses with fhir-sdk.
use crate::directory::valid;

const COMMISSIONER: &str = "demo-commissioner-token";
const DAY: i64 = 86_400_000_000;
const SWEMWBS: &str = "718466001";
const UP_TO: i64 = 7;

/// A small deterministic generator (the test's seed is fixed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the test knows of one referral.
#[derive(Default, Clone)]
struct Truth {
    month: String,
    need: String,
    practice: String,
    provider: String,
    sex: String,
    age_band: String,
    disposition: String,
    accept_days: Option<i64>,
    contact_days: Option<i64>,
    complete_days: Option<i64>,
    change: Option<i64>,
}

fn month_of(micros: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000).unwrap();
    format!("{:04}-{:02}", t.year(), t.month() as u8)
}

fn band(age: i64) -> &'static str {
    match age {
        0..=17 => "0-17",
        18..=24 => "18-24",
        25..=34 => "25-34",
        35..=44 => "35-44",
        45..=54 => "45-54",
        55..=64 => "55-64",
        65..=74 => "65-74",
        75..=84 => "75-84",
        _ => "85+",
    }
}

/// The suppression rule, written again here from README: 1..=7 hidden; in a partition,
/// while one cell alone is hidden, or the hidden ones come to 7 or less together, the
/// smallest other non-zero cell is hidden too.
fn suppressed(counts: &[i64], partition: bool) -> Vec<Option<i64>> {
    let mut hidden: Vec<bool> = counts.iter().map(|n| (1..=UP_TO).contains(n)).collect();
    if partition {
        protect(counts, &mut hidden);
    }
    counts
        .iter()
        .zip(hidden)
        .map(|(n, h)| (!h).then_some(r5(*n)))
        .collect()
}

/// A count as published: to the nearest 5, halves up (README; `[reports] round_to`).
fn r5(n: i64) -> i64 {
    (n + 2) / 5 * 5
}

/// README's second rule on one partition; true if it hid anything.
fn protect(counts: &[i64], hidden: &mut [bool]) -> bool {
    let mut changed = false;
    loop {
        let n = hidden.iter().filter(|h| **h).count();
        let sum: i64 = (0..counts.len())
            .filter(|i| hidden[*i])
            .map(|i| counts[i])
            .sum();
        if n == 0 || (n >= 2 && sum > UP_TO) {
            return changed;
        }
        let mut best: Option<usize> = None;
        for (i, c) in counts.iter().enumerate() {
            if !hidden[i] && *c > 0 && best.is_none_or(|b| *c < counts[b]) {
                best = Some(i);
            }
        }
        match best {
            Some(b) => {
                hidden[b] = true;
                changed = true;
            }
            None => return changed,
        }
    }
}

/// README's rule for the month x need table: small cells hidden, then the second rule on
/// each month's row and each need's column (in that order), again until nothing changes.
fn suppressed_grid(grid: &[Vec<i64>]) -> Vec<Vec<Option<i64>>> {
    let mut hidden: Vec<Vec<bool>> = grid
        .iter()
        .map(|r| r.iter().map(|n| (1..=UP_TO).contains(n)).collect())
        .collect();
    let cols = grid.first().map(Vec::len).unwrap_or(0);
    loop {
        let mut changed = false;
        for r in 0..grid.len() {
            changed |= protect(&grid[r], &mut hidden[r]);
        }
        for c in 0..cols {
            let col: Vec<i64> = grid.iter().map(|r| r[c]).collect();
            let mut h: Vec<bool> = hidden.iter().map(|r| r[c]).collect();
            if protect(&col, &mut h) {
                changed = true;
                for r in 0..grid.len() {
                    hidden[r][c] = h[r];
                }
            }
        }
        if !changed {
            break;
        }
    }
    grid.iter()
        .zip(hidden)
        .map(|(r, h)| {
            r.iter()
                .zip(h)
                .map(|(n, h)| (!h).then_some(r5(*n)))
                .collect()
        })
        .collect()
}

fn nearest_rank(mut v: Vec<i64>, p: usize) -> Option<i64> {
    if v.len() as i64 <= UP_TO {
        return None;
    }
    v.sort();
    let rank = (p * v.len()).div_ceil(100);
    Some(v[rank.max(1) - 1])
}

/// A population's count as the report shows it: `Some(n)` or masked (`None`).
fn count_of(p: &Value) -> Option<i64> {
    match p.get("count") {
        Some(c) => c.as_i64(),
        None => {
            assert_eq!(
                p.pointer("/_count/extension/0/valueCode"),
                Some(&json!("masked")),
                "{p}"
            );
            None
        }
    }
}

fn group<'a>(report: &'a Value, code: &str) -> &'a Value {
    report["group"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["code"]["text"] == code)
        .unwrap_or_else(|| panic!("no group {code}: {report:#}"))
}

/// The strata of a stratifier as (value, shown count).
fn strata(g: &Value, stratifier: &str) -> BTreeMap<String, Option<i64>> {
    g["stratifier"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["code"][0]["text"] == stratifier)
        .unwrap_or_else(|| panic!("no stratifier {stratifier}"))["stratum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["value"]["coding"][0]["code"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                count_of(&s["population"][0]),
            )
        })
        .collect()
}

/// The true strata of `key` over `truths`, suppressed (as a partition when `partition`).
fn true_strata(
    truths: &[Truth],
    key: impl Fn(&Truth) -> String,
    partition: bool,
) -> BTreeMap<String, Option<i64>> {
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for t in truths {
        *counts.entry(key(t)).or_insert(0) += 1;
    }
    let values: Vec<i64> = counts.values().copied().collect();
    counts
        .keys()
        .cloned()
        .zip(suppressed(&values, partition))
        .collect()
}

/// The README's rule for a share in strata: the denominators as counts; a numerator
/// hidden when its denominator is, or when it or what it leaves is small; in a partition,
/// while the hidden numerators (or what they leave) could be worked out together, the
/// smallest other non-zero numerator is hidden too.
fn share_rule(dens: &[i64], nums: &[i64], partition: bool) -> Vec<(Option<i64>, Option<i64>)> {
    let d = suppressed(dens, partition);
    let small = |n: i64| (1..=UP_TO).contains(&n);
    let mut hidden: Vec<bool> = (0..dens.len())
        .map(|i| d[i].is_none() || small(nums[i]) || small(dens[i] - nums[i]))
        .collect();
    while partition && !hidden.is_empty() {
        let h: Vec<usize> = (0..nums.len()).filter(|i| hidden[*i]).collect();
        let acc: i64 = h.iter().map(|i| nums[*i]).sum();
        let rest: i64 = h.iter().map(|i| dens[*i] - nums[*i]).sum();
        if h.is_empty() || (h.len() >= 2 && !small(acc) && !small(rest)) {
            break;
        }
        let mut others: Vec<(i64, usize)> = (0..nums.len())
            .filter(|i| !hidden[*i] && nums[*i] > 0)
            .map(|i| (nums[i], i))
            .collect();
        others.sort();
        match others.first() {
            Some((_, i)) => hidden[*i] = true,
            None => break,
        }
    }
    (0..dens.len())
        .map(|i| (d[i], (!hidden[i]).then_some(r5(nums[i]))))
        .collect()
}

/// The strata of `stratifier` in group `g`: value → (the population `code`'s count, score).
fn strata_scored(
    g: &Value,
    stratifier: &str,
    code: &str,
) -> BTreeMap<String, (Option<i64>, Option<f64>)> {
    g["stratifier"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["code"][0]["text"] == stratifier)
        .unwrap_or_else(|| panic!("no stratifier {stratifier}"))["stratum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let p = s["population"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["code"]["coding"][0]["code"] == code)
                .unwrap();
            (
                s["value"]["coding"][0]["code"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                (count_of(p), score_of(s)),
            )
        })
        .collect()
}

fn score_of(g: &Value) -> Option<f64> {
    g["measureScore"]["value"].as_f64()
}

pub fn set_clock(gw: &TestGateway, micros: i64) {
    gw.gateway
        .as_ref()
        .expect("running")
        .store()
        .transact::<_, sp_gateway::error::Error>(|tx| {
            tx.put(b"c/clock", (micros - 1).to_string().as_bytes())?;
            Ok(())
        })
        .expect("clock");
}

enum Step {
    Refer(usize),
    Accept(usize),
    Decline(usize, &'static str),
    Contact(usize),
    Score(usize, i64),
    Complete(usize),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_year_of_referrals_is_counted_exactly_and_identifies_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = TestGateway::start_with(dir.path(), unthrottled_config()).await;
    let n = 2_000usize;
    let mut rng = Rng(0x5eed_2026);
    // The simulated year: the January after next, ahead of the wall clock.
    let year = time::OffsetDateTime::now_utc().year() + 1;
    let start = time::Date::from_calendar_date(year, time::Month::January, 1)
        .unwrap()
        .midnight()
        .assume_utc();
    let t0 = (start.unix_timestamp_nanos() / 1000) as i64;
    let needs = [("loneliness", "BB9"), ("debt", "BB11"), ("housing", "BB10")];
    let practices = ["P81001", "P81002", "P81003"];
    let mut steps: Vec<(i64, Step)> = Vec::new();
    let mut plans = Vec::new();
    for i in 0..n {
        // Fewer referrals early in the year, so some months' small cells are suppressed.
        let day = ((rng.below(365 * 365 * 365) as f64).cbrt()) as i64;
        let at = t0 + day * DAY + (rng.below(86_000) as i64) * 1_000_000;
        let need = rng.below(3) as usize;
        let practice = practices[rng.below(3) as usize];
        let age = 16 + rng.below(80) as i64;
        let sex = match rng.below(20) {
            0..=9 => "female",
            10..=18 => "male",
            _ => "other",
        };
        steps.push((at, Step::Refer(i)));
        let fate = rng.below(100);
        let accept_after = (1 + rng.below(20) as i64) * DAY;
        if fate < 70 {
            steps.push((at + accept_after, Step::Accept(i)));
            if fate < 55 {
                let contact = accept_after + rng.below(15) as i64 * DAY + DAY / 2;
                steps.push((at + contact, Step::Contact(i)));
                if fate < 40 {
                    let first = 10 + rng.below(15) as i64;
                    let last = (first + rng.below(9) as i64 - 2).clamp(7, 35);
                    steps.push((at + contact + DAY, Step::Score(i, first)));
                    steps.push((at + contact + 30 * DAY, Step::Score(i, last)));
                    steps.push((at + contact + 31 * DAY, Step::Complete(i)));
                }
            }
        } else if fate < 85 {
            steps.push((at + accept_after, Step::Decline(i, "patient-declined")));
        }
        plans.push((at, need, practice, age, sex));
    }
    steps.sort_by_key(|s| s.0);

    let mut ids: Vec<(String, String, String)> = vec![Default::default(); n];
    let mut truths: Vec<Truth> = vec![Truth::default(); n];
    let mut first_score: BTreeMap<usize, i64> = BTreeMap::new();
    let mut last_obs: BTreeMap<usize, String> = BTreeMap::new();
    for (at, step) in &steps {
        set_clock(&gw, *at);
        match *step {
            Step::Refer(i) => {
                let (t, need, practice, age, sex) = plans[i];
                let token = if practice == "P81003" { GP2 } else { GP };
                let mut r = variant(
                    "referral-ada.json",
                    &format!("FIG-{i}"),
                    Some(&nhs_number(i)),
                );
                r["practice"]["odsCode"] = json!(practice);
                r["needs"] = json!([needs[need].0]);
                r["reasons"] = json!([]);
                r["patient"]["postcode"] = json!(format!("{} 1AA", needs[need].1));
                r["patient"]["gender"] = json!(sex);
                let birth = time::OffsetDateTime::from_unix_timestamp_nanos(t as i128 * 1000)
                    .unwrap()
                    .date()
                    - time::Duration::days(age * 365 + age / 4 + 30);
                r["patient"]["birthDate"] = json!(birth.to_string());
                let (pid, sid, tid) = gw.refer(token, &r).await;
                let task = gw.get(token, &format!("/fhir/Task/{tid}")).await.body;
                let provider = task["owner"]["reference"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("Organization/")
                    .to_string();
                let years = {
                    let d = time::OffsetDateTime::from_unix_timestamp_nanos(t as i128 * 1000)
                        .unwrap()
                        .date();
                    let mut y = d.year() - birth.year();
                    if (d.month() as u8, d.day()) < (birth.month() as u8, birth.day()) {
                        y -= 1;
                    }
                    y as i64
                };
                truths[i] = Truth {
                    month: month_of(t),
                    need: needs[need].0.into(),
                    practice: practice.into(),
                    provider,
                    sex: sex.into(),
                    age_band: band(years).into(),
                    disposition: "open".into(),
                    ..Truth::default()
                };
                ids[i] = (pid, sid, tid);
            }
            Step::Accept(i) => {
                let token = provider_token(&truths[i].provider);
                let r = gw.transition(token, &ids[i].2, status_to("accepted")).await;
                assert_eq!(r.status, 200, "{}", r.body);
                truths[i].disposition = "accepted".into();
                truths[i].accept_days = Some((at - plans[i].0) / DAY);
            }
            Step::Decline(i, code) => {
                let token = provider_token(&truths[i].provider);
                let r = gw
                    .transition(token, &ids[i].2, |t| {
                        t["status"] = json!("rejected");
                        t["statusReason"] = json!({ "coding": [{ "system": "https://sp-gateway.example.org/fhir/CodeSystem/task-status-reason", "code": code }], "text": "Patient declined" });
                    })
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
                truths[i].disposition = "declined-patient".into();
            }
            Step::Contact(i) => {
                let token = provider_token(&truths[i].provider);
                let r = gw
                    .transition(token, &ids[i].2, |t| {
                        t["status"] = json!("in-progress");
                        t["businessStatus"] = json!({ "coding": [{ "system": "https://sp-gateway.example.org/fhir/CodeSystem/business-status", "code": "contact-made" }], "text": "Contact made" });
                    })
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
                truths[i].contact_days = Some((at - plans[i].0) / DAY);
            }
            Step::Score(i, value) => {
                let token = provider_token(&truths[i].provider);
                let when =
                    time::OffsetDateTime::from_unix_timestamp_nanos(*at as i128 * 1000).unwrap();
                let obs = json!({
                    "resourceType": "Observation", "status": "final",
                    "code": { "coding": [{ "system": "http://snomed.info/sct", "code": SWEMWBS }] },
                    "subject": { "reference": format!("Patient/{}", ids[i].0) },
                    "basedOn": [{ "reference": format!("ServiceRequest/{}", ids[i].1) }],
                    "performer": [{ "reference": format!("Organization/{}", truths[i].provider) }],
                    "effectiveDateTime": when.format(&time::format_description::well_known::Rfc3339).unwrap(),
                    "valueInteger": value
                });
                let r = gw.post_json(token, "/fhir/Observation", &obs).await;
                assert_eq!(r.status, 201, "{}", r.body);
                last_obs.insert(i, r.body["id"].as_str().unwrap().to_string());
                match first_score.get(&i) {
                    None => {
                        first_score.insert(i, value);
                    }
                    Some(first) => truths[i].change = Some(value - first),
                }
            }
            Step::Complete(i) => {
                let token = provider_token(&truths[i].provider);
                let oid = last_obs[&i].clone();
                let r = gw
                    .transition(token, &ids[i].2, |t| {
                        t["status"] = json!("completed");
                        t["output"] = json!([{ "type": { "text": "SWEMWBS" }, "valueReference": { "reference": format!("Observation/{oid}") } }]);
                    })
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
                truths[i].complete_days = Some((at - plans[i].0) / DAY);
            }
        }
    }

    // The year's reports, read as the commissioner.
    let eval = |id: &str| {
        let gw = &gw;
        let path = format!(
            "/fhir/Measure/{id}/$evaluate-measure?periodStart={year}-01&periodEnd={year}-12"
        );
        async move {
            let r = gw.get(COMMISSIONER, &path).await;
            assert_eq!(r.status, 200, "{}", r.body);
            valid(&r.body);
            r.body
        }
    };
    let received = eval("referrals-received").await;
    let g = group(&received, "received");
    let total = truths.len() as i64;
    assert_eq!(count_of(&g["population"][0]), Some(r5(total)));
    assert_eq!(
        strata(g, "need"),
        true_strata(&truths, |t| t.need.clone(), true)
    );
    assert_eq!(
        strata(g, "practice"),
        true_strata(&truths, |t| t.practice.clone(), true)
    );
    assert_eq!(
        strata(g, "provider"),
        true_strata(&truths, |t| t.provider.clone(), true)
    );
    assert_eq!(
        strata(g, "sex"),
        true_strata(&truths, |t| t.sex.clone(), true)
    );
    assert_eq!(
        strata(g, "age"),
        true_strata(&truths, |t| t.age_band.clone(), true)
    );
    let mut months = true_strata(&truths, |t| t.month.clone(), true);
    for m in 1..=12 {
        months.entry(format!("{year}-{m:02}")).or_insert(Some(0));
    }
    assert_eq!(
        strata(g, "month"),
        months,
        "every month of the period, empty ones as 0"
    );
    assert!(
        strata(g, "month").values().any(Option::is_none)
            || strata(g, "age").values().any(Option::is_none),
        "the seeded population has small cells, so suppression is exercised"
    );

    let uptake = eval("uptake").await;
    let g = group(&uptake, "accepted");
    let disp = true_strata(&truths, |t| t.disposition.clone(), true);
    let shown = strata(g, "disposition");
    for (d, c) in &disp {
        assert_eq!(shown.get(d), Some(c), "{d}");
    }
    let accepted = disp
        .get("accepted")
        .copied()
        .flatten()
        .expect("accepted shown");
    let share = (accepted as f64 / r5(total) as f64 * 10_000.0).round() / 10_000.0;
    assert_eq!(score_of(g), Some(share));

    // Uptake by provider, against the truth (the share rule applied by the test's own code).
    let mut by_provider: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for t in &truths {
        let e = by_provider.entry(t.provider.clone()).or_default();
        e.0 += 1;
        e.1 += i64::from(t.disposition == "accepted");
    }
    let dens: Vec<i64> = by_provider.values().map(|v| v.0).collect();
    let nums: Vec<i64> = by_provider.values().map(|v| v.1).collect();
    let expected = share_rule(&dens, &nums, true);
    let dens_got = strata_scored(g, "provider", "denominator");
    let nums_got = strata_scored(g, "provider", "numerator");
    for ((p, _), (d, n)) in by_provider.iter().zip(&expected) {
        assert_eq!(dens_got[p].0, *d, "{p} referrals");
        assert_eq!(nums_got[p].0, *n, "{p} accepted");
        let share = match (d, n) {
            (Some(d), Some(n)) => Some((*n as f64 / *d as f64 * 10_000.0).round() / 10_000.0),
            _ => None,
        };
        assert_eq!(nums_got[p].1, share, "{p} share");
    }
    assert_eq!(dens_got.len(), by_provider.len());

    let times = eval("time-to-contact").await;
    // Median days to first contact by provider, against the truth.
    let contact_by = strata_scored(
        group(&times, "contact-median"),
        "provider",
        "measure-population",
    );
    let mut contact_truth: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for t in &truths {
        if let Some(d) = t.contact_days {
            contact_truth.entry(t.provider.clone()).or_default().push(d);
        }
    }
    let ns: Vec<i64> = contact_truth.values().map(|v| v.len() as i64).collect();
    for ((p, v), n) in contact_truth.iter().zip(suppressed(&ns, true)) {
        assert_eq!(contact_by[p].0, n, "{p}: referrals with contact");
        assert_eq!(
            contact_by[p].1,
            nearest_rank(v.clone(), 50).map(|d| d as f64),
            "{p}: median days to contact"
        );
    }
    for (timing, pick) in [
        (
            "accept",
            (|t: &Truth| t.accept_days) as fn(&Truth) -> Option<i64>,
        ),
        ("contact", |t: &Truth| t.contact_days),
        ("complete", |t: &Truth| t.complete_days),
    ] {
        let v: Vec<i64> = truths.iter().filter_map(pick).collect();
        assert_eq!(
            score_of(group(&times, &format!("{timing}-median"))),
            nearest_rank(v.clone(), 50).map(|d| d as f64),
            "{timing} median"
        );
        assert_eq!(
            score_of(group(&times, &format!("{timing}-p90"))),
            nearest_rank(v.clone(), 90).map(|d| d as f64),
            "{timing} p90"
        );
        assert_eq!(
            count_of(&group(&times, &format!("{timing}-median"))["population"][1]),
            Some(r5(v.len() as i64))
        );
    }

    let change = eval("wellbeing-change").await;
    let pairs: Vec<i64> = truths.iter().filter_map(|t| t.change).collect();
    let mean = (pairs.iter().sum::<i64>() as f64 / pairs.len() as f64 * 100.0).round() / 100.0;
    let g = group(&change, &format!("{SWEMWBS}-mean-change"));
    assert_eq!(count_of(&g["population"][0]), Some(r5(pairs.len() as i64)));
    assert_eq!(score_of(g), Some(mean));
    let improved = r5(pairs.iter().filter(|c| **c >= 3).count() as i64) as f64;
    let g = group(&change, &format!("{SWEMWBS}-improved"));
    assert_eq!(
        score_of(g),
        Some((improved / r5(pairs.len() as i64) as f64 * 10_000.0).round() / 10_000.0)
    );
    // Mean change by need, against the truth (needs protected as a partition too).
    let change_by = strata_scored(
        group(&change, &format!("{SWEMWBS}-mean-change")),
        "need",
        "measure-population",
    );
    let mut change_truth: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for t in &truths {
        if let Some(c) = t.change {
            change_truth.entry(t.need.clone()).or_default().push(c);
        }
    }
    let ns: Vec<i64> = change_truth.values().map(|v| v.len() as i64).collect();
    for ((need, v), shown_n) in change_truth.iter().zip(suppressed(&ns, true)) {
        let n = v.len() as i64;
        assert_eq!(change_by[need].0, shown_n, "{need} pairs");
        let mean = (n > UP_TO && shown_n.is_some())
            .then(|| (v.iter().sum::<i64>() as f64 / n as f64 * 100.0).round() / 100.0);
        assert_eq!(change_by[need].1, mean, "{need} mean change");
    }
    // WEMWBS: nobody was scored on it, so nothing to report.
    assert_eq!(
        count_of(&group(&change, "718426000-mean-change")["population"][0]),
        Some(0)
    );

    // A month with few referrals: its counts are masked, and so is what would reveal them.
    let jan = gw
        .get(COMMISSIONER, &format!("/fhir/Measure/referrals-received/$evaluate-measure?periodStart={year}-01-01&periodEnd={year}-01-31"))
        .await;
    assert_eq!(jan.status, 200, "{}", jan.body);
    let jan_truth: Vec<Truth> = truths
        .iter()
        .filter(|t| t.month == format!("{year}-01"))
        .cloned()
        .collect();
    assert_eq!(
        strata(group(&jan.body, "received"), "need"),
        true_strata(&jan_truth, |t| t.need.clone(), true)
    );

    // Bad periods are refused, and say why.
    for (q, says) in [
        (
            "periodStart=2026-01-02&periodEnd=2026-12-31",
            "first day of a month",
        ),
        (
            "periodStart=2026-01&periodEnd=2025-12",
            "before periodStart",
        ),
        ("periodStart=2026-01", "required"),
        ("periodStart=2026-13&periodEnd=2026-12", "month"),
    ] {
        let r = gw
            .get(
                COMMISSIONER,
                &format!("/fhir/Measure/uptake/$evaluate-measure?{q}"),
            )
            .await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert!(r.body.to_string().contains(says), "{q}: {}", r.body);
    }

    // The commissioner reads nothing of any one person; nobody else reads the figures.
    let (pid, sid, tid) = ids[0].clone();
    for path in [
        format!("/fhir/Patient/{pid}"),
        format!("/fhir/ServiceRequest/{sid}"),
        format!("/fhir/Task/{tid}"),
        format!("/fhir/Task/{tid}/_history"),
        "/fhir/HealthcareService/anything".to_string(),
    ] {
        assert_eq!(gw.get(COMMISSIONER, &path).await.status, 404, "{path}");
    }
    for path in [
        "/fhir/Task",
        "/fhir/Patient",
        "/fhir/Observation",
        "/fhir/ServiceRequest",
        "/fhir/AuditEvent",
    ] {
        let s = gw.get(COMMISSIONER, path).await.status;
        assert!(s == 403 || s == 404, "{path}: {s}");
    }
    for token in [GP, CRAFTS, REFERRER, ADMIN] {
        let r = gw
            .get(
                token,
                "/fhir/Measure/uptake/$evaluate-measure?periodStart=2026-01&periodEnd=2026-12",
            )
            .await;
        assert!(r.status == 403 || r.status == 404, "{token}: {}", r.status);
    }
    let measures = gw.get(COMMISSIONER, "/fhir/Measure").await;
    assert_eq!(measures.status, 200);
    assert_eq!(measures.entries().len(), 5);
    for m in measures.entries() {
        valid(&m);
    }
    // And the independent validator (npm fhir) passes every Measure and MeasureReport.
    let mut lines = String::new();
    for m in measures.entries() {
        lines.push_str(&m.to_string());
        lines.push('\n');
    }
    for r in [&received, &uptake, &times, &change, &jan.body] {
        lines.push_str(&r.to_string());
        lines.push('\n');
    }
    lines.push_str(&eval("provider-load").await.to_string());
    lines.push('\n');
    let returned = dir.path().join("figures.jsonl");
    std::fs::write(&returned, lines).unwrap();
    let tools_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-tools");
    let node_modules = tokio::task::spawn_blocking(move || crate::conformance::tools(&tools_dir).1)
        .await
        .unwrap();
    let validated = crate::conformance::validate_all(returned, node_modules).await;
    assert!(
        validated.contains("\"Measure\":5") && validated.contains("\"MeasureReport\":6"),
        "{validated}"
    );
    // Everything it read is on the trail.
    let trail = gw
        .get(AUDITOR, "/fhir/AuditEvent?agent=commissioner&_count=200")
        .await;
    assert_eq!(trail.status, 200, "{}", trail.body);
    let text = trail.body.to_string();
    assert!(
        trail.entries().len() >= 10 && text.contains("$evaluate-measure"),
        "the commissioner's reads are audited: {text}"
    );

    // The same figures on the commissioner's page and in its CSV files.
    the_page_and_its_csv_say_the_same(&gw, year, &truths).await;

    // Rebuilt from the stored referrals, the figures are the same, key for key.
    gw.stop().await;
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("gateway.toml");
    std::fs::write(&cfg, unthrottled_config()).unwrap();
    let rebuild = |check: bool| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["report".as_ref(), "rebuild".as_ref()];
        if check {
            args.push("--check".as_ref());
        }
        args.extend([
            "--config".as_ref(),
            cfg.as_os_str(),
            "--data-dir".as_ref(),
            dir.path().as_os_str(),
        ]);
        let out = cli(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, stdout) = rebuild(true);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains(&format!("{n} referrals")), "{stdout}");
    assert!(stdout.contains("agree"), "{stdout}");

    // Damaged figures (a counter changed, a referral's facts lost, facts of no referral):
    // --check names each and changes nothing; the rebuild puts them right.
    let (counter, facts) = {
        let store = sp_gateway::store::Store::open(dir.path()).unwrap();
        let counter = store
            .scan(format!("m/c/{year}-03/rec").as_bytes(), None, 1)
            .unwrap()[0]
            .0
            .clone();
        let facts = store.scan(b"m/r/", None, 1).unwrap()[0].0.clone();
        store
            .transact::<_, sp_gateway::error::Error>(|tx| {
                tx.put(&counter, b"99999")?;
                tx.remove(&facts)?;
                tx.put(b"m/r/no-such-referral", b"{}")?;
                Ok(())
            })
            .unwrap();
        store.durable_blocking().unwrap();
        (
            String::from_utf8(counter).unwrap(),
            String::from_utf8(facts).unwrap(),
        )
    };
    for _ in 0..2 {
        let (code, stdout) = rebuild(true);
        assert_eq!(code, Some(1), "{stdout}");
        assert!(stdout.contains("3 keys differ"), "{stdout}");
        for key in [&counter, &facts, "m/r/no-such-referral"] {
            assert!(stdout.contains(key), "{key}: {stdout}");
        }
    }
    let (code, stdout) = rebuild(false);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("rewritten"), "{stdout}");
    let (code, stdout) = rebuild(true);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("agree"), "{stdout}");
}

/// Cells of an RFC 4180 CSV body.
fn parse_csv(body: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let (mut row, mut cell, mut quoted, mut chars) =
        (Vec::new(), String::new(), false, body.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    rows
}

/// The text of every table header and cell on a page, in order (entities decoded).
fn page_cells(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = html;
    loop {
        let next = [
            "class=\"nhsuk-table__header\">",
            "class=\"nhsuk-table__cell\">",
        ]
        .iter()
        .filter_map(|m| rest.find(m).map(|i| (i, m.len())))
        .min();
        let Some((at, len)) = next else { break };
        rest = &rest[at + len..];
        let end = rest.find("</t").expect("cell end");
        out.push(
            rest[..end]
                .replace("&#38;", "&")
                .replace("&amp;", "&")
                .replace("&#39;", "'")
                .replace("&#34;", "\"")
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">"),
        );
        rest = &rest[end..];
    }
    out
}

fn shown(n: Option<i64>) -> String {
    n.map(|n| n.to_string())
        .unwrap_or_else(|| "suppressed".into())
}

/// A new person (password "a long enough password") signs in for the first time, sets up
/// their authenticator from the page, and is sent to their home: its path.
async fn enrol(b: &mut crate::inbox::Browser, email: &str) -> Option<String> {
    let r = b.password_step(email, "a long enough password").await;
    assert_eq!(r.status, 303, "{}", r.body);
    let page = b.get("/inbox/sign-in/code").await;
    let secret = {
        let at = page.body.find("<code>").expect("secret shown") + 6;
        page.body[at..at + page.body[at..].find('<').expect("end")].to_string()
    };
    let csrf = page.hidden("csrf");
    let code = crate::inbox::code_now(&secret);
    let r = b
        .post("/inbox/sign-in/code", &[("csrf", &csrf), ("code", &code)])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    r.location
}

/// A commissioner added by the operator on the running gateway enrols their authenticator,
/// signs in, and is taken to the figures. The page and every CSV table equal the test's own
/// truth (or, for words the test does not keep, the MeasureReport already checked against
/// it). A provider's person cannot see the page; a bad period is refused, naming the fault.
async fn the_page_and_its_csv_say_the_same(gw: &TestGateway, year: i32, truths: &[Truth]) {
    use crate::inbox::Browser;
    let r = gw
        .post_json(
            ADMIN,
            "/admin/users",
            &json!({ "kind": "commissioner", "email": "figures@example.org", "password": "a long enough password" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["kind"], "commissioner");
    let mut b = Browser::new(&gw.base);
    assert_eq!(
        b.get("/reports").await.location.as_deref(),
        Some("/inbox/sign-in")
    );
    let home = enrol(&mut b, "figures@example.org").await;
    assert_eq!(home.as_deref(), Some("/reports"), "a commissioner's home");
    // Their inbox is not theirs: the inbox sends them to the figures.
    assert_eq!(b.get("/inbox").await.location.as_deref(), Some("/reports"));

    let q = format!("from={year}-01&to={year}-12");
    let page = b.get(&format!("/reports?{q}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(
        page.body.matches("<svg role=\"img\"").count(),
        4,
        "four charts"
    );
    let csv = |name: &str| format!("/reports/{name}.csv?{q}");
    let mut tables = BTreeMap::new();
    let mut order = Vec::new();
    for name in [
        "referrals-by-month-and-need",
        "referrals-by-characteristic",
        "uptake",
        "time-to-contact",
        "wellbeing-change",
        "by-provider-and-need",
        "provider-load",
    ] {
        let r = b.get(&csv(name)).await;
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        let rows = parse_csv(&r.body);
        assert!(rows.len() >= 2, "{name}: {rows:?}");
        assert!(
            rows.iter().all(|r| r.len() == rows[0].len()),
            "{name}: a rectangle"
        );
        tables.insert(name, rows);
        order.push(name);
    }
    // The page's tables hold the same cells as the CSV files, in the same order.
    let in_csv: Vec<String> = order
        .iter()
        .flat_map(|name| tables[name].iter().flatten().cloned())
        .collect();
    assert!(
        in_csv.iter().any(|c| c == "suppressed"),
        "small cells are suppressed in the CSV too"
    );
    assert_eq!(page_cells(&page.body), in_csv);

    // Month by need, against the truth: the table rule on the test's own grid.
    let t = &tables["referrals-by-month-and-need"];
    let cfg = sp_gateway::config::Config::parse(&unthrottled_config(), "test").expect("config");
    // The months' totals are one partition of the year (as the month stratifier).
    let mut months = true_strata(truths, |t| t.month.clone(), true);
    for m in 1..=12 {
        months.entry(format!("{year}-{m:02}")).or_insert(Some(0));
    }
    let mut need_names: Vec<String> = truths.iter().map(|t| t.need.clone()).collect();
    need_names.sort();
    need_names.dedup();
    let grid: Vec<Vec<i64>> = (1..=12)
        .map(|m| {
            let month = format!("{year}-{m:02}");
            need_names
                .iter()
                .map(|n| {
                    truths
                        .iter()
                        .filter(|t| t.month == month && &t.need == n)
                        .count() as i64
                })
                .collect()
        })
        .collect();
    let expected = suppressed_grid(&grid);
    assert!(
        expected.iter().flatten().filter(|c| c.is_none()).count() >= 2,
        "the grid has suppressed cells to check"
    );
    for (m, row) in t.iter().skip(1).enumerate() {
        let month = format!("{year}-{:02}", m + 1);
        assert_eq!(row[1], shown(months[&month]), "{month}");
        for (col, head) in t[0].iter().enumerate().skip(2) {
            let need = cfg
                .needs
                .iter()
                .find(|n| &n.display == head)
                .expect("need column");
            let j = need_names
                .iter()
                .position(|n| n == &need.name)
                .expect("need");
            assert_eq!(row[col], shown(expected[m][j]), "{month} {head}");
        }
    }
    assert_eq!(t.len(), 13, "a row per month of the year: {t:?}");

    // By characteristic: the MeasureReport's strata, row for row (those equal the truth above).
    let received = gw
        .get(COMMISSIONER, &format!("/fhir/Measure/referrals-received/$evaluate-measure?periodStart={year}-01&periodEnd={year}-12"))
        .await
        .body;
    let g = group(&received, "received");
    let t = &tables["referrals-by-characteristic"];
    assert_eq!(
        t[1],
        ["All", "All referrals", &r5(truths.len() as i64).to_string()]
    );
    let mut expected = Vec::new();
    for s in g["stratifier"].as_array().unwrap() {
        let id = s["code"][0]["text"].as_str().unwrap();
        if id == "month" || id == "month-need" {
            continue;
        }
        for st in s["stratum"].as_array().unwrap() {
            expected.push((
                st["value"]["text"].as_str().unwrap().to_string(),
                shown(count_of(&st["population"][0])),
            ));
        }
    }
    let got: Vec<(String, String)> = t[2..]
        .iter()
        .map(|r| (r[1].clone(), r[2].clone()))
        .collect();
    assert_eq!(got, expected);

    // Uptake, against the truth.
    let t = &tables["uptake"];
    let disp = true_strata(truths, |t| t.disposition.clone(), true);
    let accepted = disp["accepted"].expect("accepted shown");
    assert_eq!(t[1][1], accepted.to_string());
    assert_eq!(
        t[1][2],
        format!(
            "{:.1}%",
            accepted as f64 / r5(truths.len() as i64) as f64 * 100.0
        )
    );
    // Every disposition's row, in the report's order, with its share of all referrals.
    let order = [
        "accepted",
        "declined-patient",
        "declined-no-capacity",
        "declined-not-eligible",
        "declined-other",
        "cancelled",
        "failed",
        "open",
    ];
    for (row, d) in t[1..=8].iter().zip(order) {
        let n = disp.get(d).copied().unwrap_or(Some(0));
        assert_eq!(row[1], shown(n), "{d}");
        let share = n
            .map(|n| format!("{:.1}%", n as f64 / r5(truths.len() as i64) as f64 * 100.0))
            .unwrap_or_else(|| "suppressed".into());
        assert_eq!(row[2], share, "{d} share");
    }
    assert_eq!(
        t[9][1], "0",
        "nobody was declined for capacity and passed on"
    );

    // Times, against the truth.
    let t = &tables["time-to-contact"];
    for (row, pick) in [
        (1, (|t: &Truth| t.accept_days) as fn(&Truth) -> Option<i64>),
        (2, |t: &Truth| t.contact_days),
        (3, |t: &Truth| t.complete_days),
    ] {
        let v: Vec<i64> = truths.iter().filter_map(pick).collect();
        assert_eq!(t[row][1], r5(v.len() as i64).to_string());
        assert_eq!(t[row][2], nearest_rank(v.clone(), 50).unwrap().to_string());
        assert_eq!(t[row][3], nearest_rank(v, 90).unwrap().to_string());
    }

    // Wellbeing, against the truth.
    let t = &tables["wellbeing-change"];
    let pairs: Vec<i64> = truths.iter().filter_map(|t| t.change).collect();
    let swemwbs = t
        .iter()
        .find(|r| r[0].contains("Short"))
        .expect("SWEMWBS row");
    assert_eq!(swemwbs[1], r5(pairs.len() as i64).to_string());
    assert_eq!(
        swemwbs[2],
        format!(
            "{:.2}",
            pairs.iter().sum::<i64>() as f64 / pairs.len() as f64
        )
    );
    assert_eq!(
        swemwbs[4],
        r5(pairs.iter().filter(|c| **c >= 3).count() as i64).to_string()
    );

    // By provider and need: the provider rows against the truth.
    let t = &tables["by-provider-and-need"];
    let mut by_provider: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for tr in truths {
        let e = by_provider.entry(tr.provider.clone()).or_default();
        e.0 += 1;
        e.1 += i64::from(tr.disposition == "accepted");
    }
    let dens: Vec<i64> = by_provider.values().map(|v| v.0).collect();
    let nums: Vec<i64> = by_provider.values().map(|v| v.1).collect();
    for ((p, _), (d, n)) in by_provider.iter().zip(share_rule(&dens, &nums, true)) {
        let name = &cfg.provider(p).expect("provider").name;
        let row = t
            .iter()
            .find(|r| r[0] == "Provider" && &r[1] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {t:?}"));
        assert_eq!(
            (row[2].clone(), row[3].clone()),
            (shown(d), shown(n)),
            "{name}"
        );
        let share = match (d, n) {
            (Some(d), Some(n)) => {
                format!("{:.1}%", (n as f64 / d as f64 * 10_000.0).round() / 100.0)
            }
            _ => "suppressed".into(),
        };
        assert_eq!(row[4], share, "{name} share");
        // Median days to first contact, as the MeasureReport gives it (checked above).
        let contact: Vec<i64> = truths
            .iter()
            .filter(|t| &t.provider == p)
            .filter_map(|t| t.contact_days)
            .collect();
        if contact.len() as i64 > UP_TO && row[5] != "suppressed" {
            assert_eq!(
                row[6],
                nearest_rank(contact, 50).unwrap().to_string(),
                "{name} median"
            );
        } else {
            assert!(
                row[6] == "suppressed" || row[6] == "none",
                "{name}: {row:?}"
            );
        }
    }
    // The need rows: referrals by need as the need stratifier has them.
    let needs = true_strata(truths, |t| t.need.clone(), true);
    for (need, n) in &needs {
        let words = &cfg.need(need).expect("need").display;
        let row = t
            .iter()
            .find(|r| r[0] == "Need" && &r[1] == words)
            .unwrap_or_else(|| panic!("no row for {words}"));
        assert_eq!(row[2], shown(*n), "{need}");
    }

    // Provider load: as the MeasureReport has it.
    let load = gw
        .get(COMMISSIONER, &format!("/fhir/Measure/provider-load/$evaluate-measure?periodStart={year}-01&periodEnd={year}-12"))
        .await
        .body;
    let t = &tables["provider-load"];
    for p in &cfg.providers {
        let row = t.iter().find(|r| r[0] == p.name).expect("provider row");
        assert_eq!(
            row[1],
            shown(count_of(&group(&load, &p.id)["population"][0])),
            "{}",
            p.id
        );
        assert_eq!(row[2], p.capacity.to_string());
    }

    // A bad period: said beside the picker, no figures, nothing written.
    let before = crate::inbox::clinical_digest(gw);
    let bad = b
        .get(&format!("/reports?from={year}-06&to={year}-02"))
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad
        .body
        .contains("The last month must be the same as the first month or after it"));
    assert!(bad.body.contains("nhsuk-error-summary") && !bad.body.contains("<table"));
    let bad = b
        .get(&format!("/reports/uptake.csv?from=soon&to={year}-02"))
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        b.get(&format!("/reports/nothing.csv?{q}")).await.status,
        404
    );
    assert_eq!(crate::inbox::clinical_digest(gw), before);

    // A provider's person is sent to their inbox, not shown the figures.
    let r = gw
        .post_json(
            ADMIN,
            "/admin/users",
            &json!({ "provider": "pendle-crafts", "email": "crafts@example.org", "password": "a long enough password" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let mut crafts = Browser::new(&gw.base);
    assert_eq!(
        enrol(&mut crafts, "crafts@example.org").await.as_deref(),
        Some("/inbox")
    );
    assert_eq!(
        crafts
            .get(&format!("/reports?{q}"))
            .await
            .location
            .as_deref(),
        Some("/inbox")
    );
    assert_eq!(
        crafts.get(&csv("uptake")).await.location.as_deref(),
        Some("/inbox")
    );

    // The page's reads are on the trail, as the commissioner person.
    let trail = crate::inbox::audit_events(gw, "action=E&_count=100").await;
    let reads = trail
        .iter()
        .filter(|e| {
            let t = e.to_string();
            t.contains("commissioner-person") && t.contains("/reports")
        })
        .count();
    assert!(reads >= 8, "the page's reads are audited: {reads}");
}

pub fn provider_token(provider: &str) -> &'static str {
    match provider {
        "pendle-crafts" => CRAFTS,
        "burnley-money-advice" => MONEY,
        "east-lancs-housing" => HOUSING,
        _ => HUB,
    }
}
