//! The commissioner's figures page (`/reports`): the gateway's MeasureReports for a period
//! of whole months, as tables with charts, and each table as CSV. Every number on the page
//! and in the CSV is read from the MeasureReports the gateway evaluates (the same ones
//! `$evaluate-measure` answers), so suppressed figures are suppressed here too: this module
//! only lays them out. It must not count anything itself.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::Value;

use super::charts::{self, Series};
use super::pages::signed_in_as;
use super::{message, page, Chrome, PageError, Peer, Person, WebState};
use crate::accounts::Kind;
use crate::error::Error;
use crate::report::{DISPOSITIONS, STRATIFIERS, TIMINGS};

type PageResult = Result<Response, PageError>;

/// What a suppressed figure reads as, on the page and in the CSV.
pub const SUPPRESSED: &str = "suppressed";

/// The tables, in page order: (id, caption).
pub const TABLES: [(&str, &str); 7] = [
    (
        "referrals-by-month-and-need",
        "Referrals received each month, by need",
    ),
    (
        "referrals-by-characteristic",
        "Referrals received, by characteristic",
    ),
    ("uptake", "Where referrals ended up"),
    ("time-to-contact", "Days from referral to each step"),
    ("wellbeing-change", "Change in wellbeing scores"),
    (
        "by-provider-and-need",
        "Uptake, time to first contact and wellbeing change, by provider and by need",
    ),
    ("provider-load", "Open referrals per provider now"),
];

#[derive(serde::Deserialize, Default)]
pub struct PeriodQuery {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
}

/// One table: header cells and rows of text cells (numbers already formatted).
pub struct Table {
    pub id: &'static str,
    pub caption: &'static str,
    pub head: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// The chart drawn from the same numbers, if the table has one.
    pub chart: Option<String>,
    pub note: Option<String>,
}

#[derive(Template)]
#[template(path = "reports/page.html")]
struct ReportsPage {
    chrome: Chrome,
    months: Vec<(String, String)>,
    from: String,
    to: String,
    period_words: String,
    error: Option<String>,
    suppress_up_to: u32,
    round_to: u32,
    tables: Vec<Table>,
    query: String,
}

/// The signed-in commissioner; a provider's person is sent to their inbox.
async fn commissioner(
    state: &WebState,
    headers: &HeaderMap,
    peer: &Peer,
) -> Result<Person, PageError> {
    signed_in_as(state, headers, peer, Kind::Commissioner).await
}

/// `YYYY-MM` of the month `back` months before the one of `micros`.
fn month_back(micros: i64, back: i32) -> String {
    let m = crate::report::month_of(micros);
    let y: i32 = m.get(..4).and_then(|y| y.parse().ok()).unwrap_or(1970);
    let mo: i32 = m.get(5..7).and_then(|x| x.parse().ok()).unwrap_or(1);
    let i = y * 12 + mo - 1 - back;
    format!("{:04}-{:02}", i / 12, i % 12 + 1)
}

/// "March 2026" for `2026-03`.
fn month_words(m: &str) -> String {
    let n: Option<u8> = m.get(5..7).and_then(|x| x.parse().ok());
    match n.and_then(|n| time::Month::try_from(n).ok()) {
        Some(month) => format!("{month} {}", m.get(..4).unwrap_or("")),
        None => m.to_string(),
    }
}

fn short_month(m: &str) -> String {
    month_words(m).get(..3).unwrap_or(m).to_string() + " " + m.get(2..4).unwrap_or("")
}

/// Whether `m` is a month as the picker sends it (`2027-01`).
fn is_month(m: &str) -> bool {
    m.len() == 7
        && m.as_bytes()[4] == b'-'
        && m.bytes()
            .enumerate()
            .all(|(i, b)| i == 4 || b.is_ascii_digit())
}

/// The period asked for, or the twelve months to this one.
fn period(q: &PeriodQuery, now: i64) -> (String, String) {
    let from = q
        .from
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| month_back(now, 11));
    let to =
        q.to.clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| month_back(now, 0));
    (from, to)
}

/// The months the picker offers: five years to this month, and the ones asked for.
fn month_choices(now: i64, from: &str, to: &str) -> Vec<(String, String)> {
    let mut months: Vec<String> = (0..60).rev().map(|b| month_back(now, b)).collect();
    for m in [from, to] {
        if is_month(m) && !months.iter().any(|x| x == m) {
            months.push(m.to_string());
        }
    }
    months.sort();
    months
        .into_iter()
        .map(|m| {
            let w = month_words(&m);
            (m, w)
        })
        .collect()
}

// ---- Reading a MeasureReport ----

/// A population's count: `Some(n)`, or `None` when masked (suppressed).
fn count(populations: &Value, code: &str) -> Option<i64> {
    populations.as_array()?.iter().find_map(|p| {
        (p["code"]["coding"][0]["code"] == code)
            .then(|| p["count"].as_i64())
            .flatten()
    })
}

fn shown(n: Option<i64>) -> String {
    n.map(|n| n.to_string())
        .unwrap_or_else(|| SUPPRESSED.into())
}

fn score(group: &Value) -> Option<f64> {
    group["measureScore"]["value"].as_f64()
}

/// A statistic of a group of `n` (the count as shown): "none" for an empty group.
fn stat(n: &str, v: Option<f64>, dp: usize) -> String {
    if n == "0" {
        "none".into()
    } else {
        number(v, dp)
    }
}

fn number(v: Option<f64>, dp: usize) -> String {
    v.map(|v| format!("{v:.dp$}"))
        .unwrap_or_else(|| SUPPRESSED.into())
}

fn percent(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| SUPPRESSED.into())
}

fn group<'a>(report: &'a Value, code: &str) -> Option<&'a Value> {
    report["group"]
        .as_array()?
        .iter()
        .find(|g| g["code"]["text"] == code)
}

fn stratifier<'a>(group: &'a Value, code: &str) -> Vec<&'a Value> {
    group["stratifier"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["code"][0]["text"] == code))
        .and_then(|s| s["stratum"].as_array())
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

/// The tables of the period's MeasureReports (in `report::MEASURES` order).
pub fn tables(
    cfg: &crate::config::Config,
    reports: &[Value],
    charts_too: bool,
) -> Result<Vec<Table>, charts::ChartError> {
    let by_id = |id: &str| {
        reports
            .iter()
            .find(|r| {
                r["measure"]
                    .as_str()
                    .is_some_and(|m| m.ends_with(&format!("/Measure/{id}")))
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    let caption = |id: &str| TABLES.iter().find(|t| t.0 == id).map(|t| t.1).unwrap_or("");
    let mut out = Vec::new();

    // Referrals by month and need.
    let received = by_id("referrals-received");
    let rec = group(&received, "received").cloned().unwrap_or(Value::Null);
    let months: Vec<(String, Option<i64>)> = stratifier(&rec, "month")
        .iter()
        .map(|s| {
            (
                s["value"]["coding"][0]["code"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                count(&s["population"], "initial-population"),
            )
        })
        .collect();
    let cells = stratifier(&rec, "month-need");
    let mut needs: Vec<(String, String)> = Vec::new();
    for c in &cells {
        let v = &c["component"][1]["value"];
        let code = v["coding"][0]["code"].as_str().unwrap_or("").to_string();
        if !needs.iter().any(|n| n.0 == code) {
            needs.push((code, v["text"].as_str().unwrap_or("").to_string()));
        }
    }
    let order = |code: &str| {
        cfg.needs
            .iter()
            .position(|n| n.name == code)
            .unwrap_or(usize::MAX)
    };
    needs.sort_by_key(|n| (order(&n.0), n.0.clone()));
    let cell = |month: &str, need: &str| -> Option<Option<i64>> {
        cells
            .iter()
            .find(|c| {
                c["component"][0]["value"]["coding"][0]["code"] == month
                    && c["component"][1]["value"]["coding"][0]["code"] == need
            })
            .map(|c| count(&c["population"], "initial-population"))
    };
    let mut head = vec!["Month".to_string(), "All referrals".to_string()];
    head.extend(needs.iter().map(|n| n.1.clone()));
    let rows: Vec<Vec<String>> = months
        .iter()
        .map(|(m, total)| {
            let mut r = vec![month_words(m), shown(*total)];
            r.extend(
                needs
                    .iter()
                    .map(|n| shown(cell(m, &n.0).unwrap_or(Some(0)))),
            );
            r
        })
        .collect();
    let chart = if charts_too {
        let series: Vec<Series> = needs
            .iter()
            .map(|n| Series {
                name: n.1.clone(),
                values: months
                    .iter()
                    .map(|(m, _)| cell(m, &n.0).unwrap_or(Some(0)).map(|v| v as f64))
                    .collect(),
            })
            .collect();
        let cats: Vec<String> = months.iter().map(|m| short_month(&m.0)).collect();
        Some(charts::bars(
            "Chart: referrals received each month, by need. The table below gives the numbers.",
            &cats,
            &series,
            "Referrals",
        )?)
    } else {
        None
    };
    out.push(Table {
        id: "referrals-by-month-and-need",
        caption: caption("referrals-by-month-and-need"),
        head,
        rows,
        chart,
        note: Some("A referral for two needs counts under each, so the needs of a month can add up to more than its referrals.".into()),
    });

    // Referrals by characteristic.
    let mut rows = vec![vec![
        "All".to_string(),
        "All referrals".to_string(),
        shown(count(&rec["population"], "initial-population")),
    ]];
    for (id, what, _) in STRATIFIERS.iter().filter(|s| s.0 != "month") {
        for s in stratifier(&rec, id) {
            rows.push(vec![
                what.to_string(),
                s["value"]["text"].as_str().unwrap_or("").to_string(),
                shown(count(&s["population"], "initial-population")),
            ]);
        }
    }
    out.push(Table {
        id: "referrals-by-characteristic",
        caption: caption("referrals-by-characteristic"),
        head: vec!["Characteristic".into(), "Group".into(), "Referrals".into()],
        rows,
        chart: None,
        note: None,
    });

    // Uptake.
    let uptake = by_id("uptake");
    let accepted = group(&uptake, "accepted").cloned().unwrap_or(Value::Null);
    let total = count(&accepted["population"], "denominator");
    let strata = stratifier(&accepted, "disposition");
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for (code, words) in DISPOSITIONS {
        let n = strata
            .iter()
            .find(|s| s["value"]["coding"][0]["code"] == code)
            .and_then(|s| count(&s["population"], "initial-population"));
        let share = match (n, total) {
            (Some(n), Some(t)) if t > 0 => Some(n as f64 / t as f64),
            _ => None,
        };
        values.push(share.map(|s| s * 100.0));
        rows.push(vec![words.to_string(), shown(n), percent(share)]);
    }
    let passed_on = group(&uptake, "declined-capacity")
        .and_then(|g| count(&g["population"], "initial-population"));
    let chart = if charts_too {
        let cats: Vec<String> = [
            "Accepted",
            "Person declined",
            "No capacity",
            "Not eligible",
            "Other decline",
            "Cancelled",
            "Not completed",
            "Not yet accepted",
        ]
        .map(String::from)
        .to_vec();
        Some(charts::bars(
            "Chart: share of referrals by where they ended up. The table below gives the numbers.",
            &cats,
            &[Series {
                name: "Share of referrals".into(),
                values,
            }],
            "Share of referrals (%)",
        )?)
    } else {
        None
    };
    rows.push(vec![
        "Declined by a provider for no capacity and passed on (also counted above)".into(),
        shown(passed_on),
        String::new(),
    ]);
    out.push(Table {
        id: "uptake",
        caption: caption("uptake"),
        head: vec![
            "Where the referral ended up".into(),
            "Referrals".into(),
            "Share of referrals received".into(),
        ],
        rows,
        chart,
        note: Some(format!(
            "Accepted: {} of the referrals received.",
            percent(score(&accepted))
        )),
    });

    // Time to each step.
    let timing = by_id("time-to-contact");
    let mut rows = Vec::new();
    let (mut medians, mut p90s) = (Vec::new(), Vec::new());
    for (id, words) in TIMINGS {
        let median = group(&timing, &format!("{id}-median"))
            .cloned()
            .unwrap_or(Value::Null);
        let p90 = group(&timing, &format!("{id}-p90"))
            .cloned()
            .unwrap_or(Value::Null);
        medians.push(score(&median));
        p90s.push(score(&p90));
        let n = shown(count(&median["population"], "measure-population"));
        rows.push(vec![
            words.to_string(),
            n.clone(),
            stat(&n, score(&median), 0),
            stat(&n, score(&p90), 0),
        ]);
    }
    let chart = if charts_too {
        Some(charts::bars(
            "Chart: median and 90th percentile days from referral to acceptance, first contact and completion. The table below gives the numbers.",
            &["To acceptance", "To first contact", "To completion"].map(String::from),
            &[
                Series { name: "Median".into(), values: medians },
                Series { name: "90th percentile".into(), values: p90s },
            ],
            "Days",
        )?)
    } else {
        None
    };
    out.push(Table {
        id: "time-to-contact",
        caption: caption("time-to-contact"),
        head: vec![
            "Step".into(),
            "Referrals that reached it".into(),
            "Median days".into(),
            "90th percentile days".into(),
        ],
        rows,
        chart,
        note: None,
    });

    // Wellbeing change.
    let change = by_id("wellbeing-change");
    let mut rows = Vec::new();
    let (mut names, mut means) = (Vec::new(), Vec::new());
    for o in &cfg.outcomes {
        let mean = group(&change, &format!("{}-mean-change", o.code))
            .cloned()
            .unwrap_or(Value::Null);
        let improved = group(&change, &format!("{}-improved", o.code))
            .cloned()
            .unwrap_or(Value::Null);
        names.push(o.display.clone());
        means.push(score(&mean));
        let n = shown(count(&mean["population"], "measure-population"));
        let share = if n == "0" {
            "none".to_string()
        } else {
            percent(score(&improved))
        };
        rows.push(vec![
            o.display.clone(),
            n.clone(),
            stat(&n, score(&mean), 2),
            o.meaningful_change.to_string(),
            shown(count(&improved["population"], "numerator")),
            share,
        ]);
    }
    let chart = if charts_too && !names.is_empty() {
        Some(charts::bars(
            "Chart: mean change in wellbeing score from first to last, per scale. The table below gives the numbers.",
            &names,
            &[Series { name: "Mean change".into(), values: means }],
            "Mean change (points)",
        )?)
    } else {
        None
    };
    out.push(Table {
        id: "wellbeing-change",
        caption: caption("wellbeing-change"),
        head: vec![
            "Scale".into(),
            "Referrals with two or more scores".into(),
            "Mean change".into(),
            "Meaningful change (points)".into(),
            "Improved by at least that".into(),
            "Share improved".into(),
        ],
        rows,
        chart,
        note: None,
    });

    // By provider and by need: the strata of uptake, time to contact and wellbeing change.
    let contact = group(&timing, "contact-median")
        .cloned()
        .unwrap_or(Value::Null);
    let mut head = vec![
        "Characteristic".to_string(),
        "Group".to_string(),
        "Referrals".to_string(),
        "Accepted".to_string(),
        "Share accepted".to_string(),
        "Referrals with first contact".to_string(),
        "Median days to first contact".to_string(),
    ];
    for o in &cfg.outcomes {
        let name = o.short.as_deref().unwrap_or(&o.display);
        head.push(format!("{name}: scored twice or more"));
        head.push(format!("{name}: mean change"));
    }
    let mut rows = Vec::new();
    let find = |strata: &[&Value], code: &str| -> Value {
        strata
            .iter()
            .find(|s| s["value"]["coding"][0]["code"] == code)
            .map(|s| (*s).clone())
            .unwrap_or(Value::Null)
    };
    for (by, what, _) in crate::report::BY {
        let uptake_strata = stratifier(&accepted, by);
        let contact_strata = stratifier(&contact, by);
        for u in &uptake_strata {
            let code = u["value"]["coding"][0]["code"].as_str().unwrap_or("");
            let c = find(&contact_strata, code);
            let mut row = vec![
                what.to_string(),
                u["value"]["text"].as_str().unwrap_or("").to_string(),
                shown(count(&u["population"], "denominator")),
                shown(count(&u["population"], "numerator")),
                percent(score(u)),
            ];
            let n =
                shown(count(&c["population"], "measure-population").or(c.is_null().then_some(0)));
            row.push(n.clone());
            row.push(stat(&n, score(&c), 0));
            for o in &cfg.outcomes {
                let g = group(&change, &format!("{}-mean-change", o.code))
                    .cloned()
                    .unwrap_or(Value::Null);
                let m = find(&stratifier(&g, by), code);
                let n = shown(
                    count(&m["population"], "measure-population").or(m.is_null().then_some(0)),
                );
                row.push(n.clone());
                row.push(stat(&n, score(&m), 2));
            }
            rows.push(row);
        }
    }
    out.push(Table {
        id: "by-provider-and-need",
        caption: caption("by-provider-and-need"),
        head,
        rows,
        chart: None,
        note: Some("A referral counts at the provider it is with now, or ended with, and under each of its needs. Shares, medians and means are not shown for groups of the suppression threshold or fewer.".into()),
    });

    // Provider load.
    let load = by_id("provider-load");
    let mut rows = Vec::new();
    for p in &cfg.providers {
        let Some(g) = group(&load, &p.id) else {
            continue;
        };
        let oldest = g["extension"]
            .as_array()
            .and_then(|e| {
                e.iter().find(|x| {
                    x["url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("/oldest-wait"))
                })
            })
            .and_then(|x| x["valueQuantity"]["value"].as_f64());
        rows.push(vec![
            p.name.clone(),
            shown(count(&g["population"], "measure-population")),
            p.capacity.to_string(),
            percent(score(g)),
            number(oldest, 0),
        ]);
    }
    out.push(Table {
        id: "provider-load",
        caption: caption("provider-load"),
        head: vec![
            "Provider".into(),
            "Open referrals".into(),
            "Open-referral limit".into(),
            "Share of the limit".into(),
            "Days the oldest has waited".into(),
        ],
        rows,
        chart: None,
        note: Some("As it is now, whatever the period.".into()),
    });
    Ok(out)
}

/// The period's MeasureReports, or the problem with the period in the person's words.
fn evaluate(
    state: &WebState,
    p: &Person,
    from: &str,
    to: &str,
) -> Result<Result<Vec<Value>, String>, PageError> {
    // The page's months only (not the API's dates): what the picker can show again.
    for (m, field) in [(from, "periodStart"), (to, "periodEnd")] {
        if !is_month(m) {
            return Ok(Err(period_problem(field, "not a month")));
        }
    }
    match state.gateway.evaluate_all(&p.principal, from, to) {
        Ok(r) => Ok(Ok(r)),
        Err(Error::Invalid(issues)) => Ok(Err(issues
            .first()
            .map(|i| period_problem(i.expression.as_deref().unwrap_or(""), &i.diagnostics))
            .unwrap_or_else(|| "Choose the first and last month again.".into()))),
        Err(e) => Err(e.into()),
    }
}

/// What was wrong with the months chosen, in words for the person who chose them.
fn period_problem(field: &str, why: &str) -> String {
    if why.contains("before") {
        "The last month must be the same as the first month or after it.".into()
    } else if why.contains("ten years") {
        "Choose a period of ten years or less.".into()
    } else if field.contains("periodEnd") {
        "Choose the last month from the list.".into()
    } else {
        "Choose the first month from the list.".into()
    }
}

/// `GET /reports?from=YYYY-MM&to=YYYY-MM`.
pub async fn show(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Query(q): Query<PeriodQuery>,
) -> PageResult {
    let p = commissioner(&state, &headers, &peer).await?;
    crate::audit::set_interaction("operation", "E");
    // The commit clock as the session saw it on this request (no further write).
    let now = p.session.last_seen;
    let (from, to) = period(&q, now);
    let cfg = state.gateway.config();
    let (status, error, tables) = match evaluate(&state, &p, &from, &to)? {
        Ok(reports) => (
            StatusCode::OK,
            None,
            tables(cfg, &reports, true)
                .map_err(|e| PageError::Gateway(Error::Internal(e.to_string())))?,
        ),
        Err(msg) => (StatusCode::BAD_REQUEST, Some(msg), Vec::new()),
    };
    let query = format!(
        "from={}&to={}",
        form_urlencoded::byte_serialize(from.as_bytes()).collect::<String>(),
        form_urlencoded::byte_serialize(to.as_bytes()).collect::<String>()
    );
    page(
        status,
        &ReportsPage {
            chrome: p.chrome(),
            months: month_choices(now, &from, &to),
            period_words: format!("{} to {}", month_words(&from), month_words(&to)),
            from,
            to,
            error,
            suppress_up_to: cfg.reports.suppress_up_to,
            round_to: cfg.reports.round_to,
            tables,
            query,
        },
    )
}

/// `GET /reports/{table}.csv?from=&to=`: one table as CSV (RFC 4180), the same cells.
pub async fn csv(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(file): Path<String>,
    Query(q): Query<PeriodQuery>,
) -> PageResult {
    let p = commissioner(&state, &headers, &peer).await?;
    crate::audit::set_interaction("operation", "E");
    let Some(id) = file
        .strip_suffix(".csv")
        .filter(|id| TABLES.iter().any(|t| t.0 == *id))
    else {
        return Ok(message(
            StatusCode::NOT_FOUND,
            "Table not found",
            "There is no table of figures with that name.",
            "/reports",
            "Go to the figures",
        ));
    };
    // The commit clock as the session saw it on this request (no further write).
    let now = p.session.last_seen;
    let (from, to) = period(&q, now);
    let reports = match evaluate(&state, &p, &from, &to)? {
        Ok(r) => r,
        Err(msg) => {
            return Ok(message(
                StatusCode::BAD_REQUEST,
                "Those months cannot be used",
                &msg,
                "/reports",
                "Go to the figures",
            ))
        }
    };
    let cfg = state.gateway.config();
    let tables = tables(cfg, &reports, false)
        .map_err(|e| PageError::Gateway(Error::Internal(e.to_string())))?;
    let Some(t) = tables.into_iter().find(|t| t.id == id) else {
        return Err(PageError::Gateway(Error::Internal(format!(
            "table {id} missing"
        ))));
    };
    let mut body = String::new();
    for row in std::iter::once(&t.head).chain(t.rows.iter()) {
        let line: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
        body.push_str(&line.join(","));
        body.push_str("\r\n");
    }
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) =
        HeaderValue::from_str(&format!("attachment; filename=\"{id}-{from}-to-{to}.csv\""))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(r)
}

/// A CSV cell: quoted when it holds a comma, quote or line break; a leading `=`, `+`, `-`
/// (but a number's), `@`, tab or carriage return is prefixed with `'` so that a spreadsheet
/// does not run it as a formula (OWASP's list).
fn csv_cell(c: &str) -> String {
    let c = if c.starts_with(['=', '+', '@', '\t', '\r'])
        || (c.starts_with('-') && c.parse::<f64>().is_err())
    {
        format!("'{c}")
    } else {
        c.to_string()
    };
    if c.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_cell("a, b"), "\"a, b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=1+1"), "'=1+1");
        assert_eq!(csv_cell("\t=1"), "'\t=1");
        assert_eq!(
            csv_cell("-1.50"),
            "-1.50",
            "a negative number stays a number"
        );
        assert_eq!(csv_cell("12"), "12");
    }

    #[test]
    fn the_default_period_is_the_twelve_months_to_this_one() {
        let now = crate::clock::micros_of("2026-03-15T10:00:00Z");
        let (from, to) = period(&PeriodQuery::default(), now);
        assert_eq!((from.as_str(), to.as_str()), ("2025-04", "2026-03"));
        assert_eq!(month_words("2026-03"), "March 2026");
    }
}
