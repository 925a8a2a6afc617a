//! The figures for commissioners, as pure functions: what the gateway keeps about each
//! referral for counting ([`Facts`]), the counters those facts add to ([`cells`]), and how
//! counters become the published Measures' MeasureReports with small numbers suppressed
//! ([`measures`], [`evaluate`]).
//!
//! Owns: the Measure definitions, the fold of each resource version into a referral's facts,
//! the cell names, the statistics (counts, nearest-rank median and 90th percentile in whole
//! days, paired score change), and the suppression rule. It must not read or write the
//! store (`gateway::report` keeps the facts and counters in the transaction of each write)
//! nor know HTTP.
//!
//! Every figure is a sum of cells, and a referral's cells are a function of its facts alone,
//! so the counters kept write by write and a rebuild from the stored resources agree
//! exactly, and a report over a year reads twelve months of counters, never a referral.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::Config;

/// What a referral contributes to the figures: from its ServiceRequest, its Patient as
/// first written, every version of its Tasks and its current score Observations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    /// When the gateway received it (its ServiceRequest's first `lastUpdated`), µs.
    #[serde(rename = "r")]
    pub received: i64,
    #[serde(rename = "n", default)]
    pub needs: Vec<String>,
    #[serde(rename = "p", default)]
    pub practice: String,
    #[serde(rename = "s", default)]
    pub source: String,
    #[serde(rename = "u", default)]
    pub urgency: String,
    #[serde(rename = "a", default)]
    pub age_band: String,
    #[serde(rename = "x", default)]
    pub sex: String,
    #[serde(rename = "t", default)]
    pub tasks: BTreeMap<String, TaskFacts>,
    /// Score Observations by id.
    #[serde(rename = "o", default)]
    pub scores: BTreeMap<String, Score>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskFacts {
    /// Its first `lastUpdated`, µs.
    #[serde(rename = "c")]
    pub created: i64,
    #[serde(rename = "o", default)]
    pub owner: String,
    #[serde(rename = "v", default)]
    pub service: String,
    #[serde(rename = "s", default)]
    pub status: String,
    /// The reason code of its rejection, if rejected.
    #[serde(rename = "r", default)]
    pub reason: String,
    /// When it was first accepted, contact was first recorded as made, it was completed (µs).
    #[serde(rename = "a", default)]
    pub accepted: Option<i64>,
    #[serde(rename = "m", default)]
    pub contact: Option<i64>,
    #[serde(rename = "d", default)]
    pub completed: Option<i64>,
    /// It was once declined for lack of capacity (and passed on).
    #[serde(rename = "k", default)]
    pub declined_capacity: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The outcome measure's SNOMED CT code.
    #[serde(rename = "c")]
    pub code: String,
    /// When it was scored (µs), and the id, for order.
    #[serde(rename = "t")]
    pub at: i64,
    #[serde(rename = "v")]
    pub value: i64,
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The statuses a referral counts as accepted from (the provider took it on).
fn accepted_status(s: &str) -> bool {
    matches!(s, "accepted" | "in-progress" | "on-hold" | "completed")
}

fn is_final(s: &str) -> bool {
    matches!(s, "completed" | "rejected" | "cancelled" | "failed")
}

/// Age bands (years at referral).
pub const AGE_BANDS: [&str; 9] = [
    "0-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65-74", "75-84", "85+",
];

pub fn age_band(age: Option<u32>) -> String {
    let Some(a) = age else {
        return "unknown".into();
    };
    let i = match a {
        0..=17 => 0,
        18..=24 => 1,
        25..=34 => 2,
        35..=44 => 3,
        45..=54 => 4,
        55..=64 => 5,
        65..=74 => 6,
        75..=84 => 7,
        _ => 8,
    };
    AGE_BANDS[i].into()
}

/// Whole years from `birth` (YYYY-MM-DD) to the day of `at` (µs).
pub fn age_at(birth: &str, at: i64) -> Option<u32> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let b = time::Date::parse(birth.get(..10)?, &fmt).ok()?;
    let day = crate::clock::Now::from_micros(at).time.date();
    let mut years = day.year() - b.year();
    if (day.month() as u8, day.day()) < (b.month() as u8, b.day()) {
        years -= 1;
    }
    u32::try_from(years).ok()
}

/// `YYYY-MM` of an instant (µs, UTC).
pub fn month_of(micros: i64) -> String {
    let d = crate::clock::Now::from_micros(micros).time.date();
    format!("{:04}-{:02}", d.year(), d.month() as u8)
}

impl TaskFacts {
    /// Folds one version of the Task (written at `at`, µs) into what is known of it.
    pub fn fold(&mut self, task: &Value, at: i64) {
        if self.created == 0 {
            self.created = at;
        }
        let status = task
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default();
        self.status = status.to_string();
        self.owner = task
            .get("owner")
            .and_then(|o| crate::fhir::ref_id(o, "Organization"))
            .unwrap_or_default()
            .to_string();
        if let Some(s) = service_of(task) {
            self.service = s;
        }
        self.reason = if status == "rejected" {
            task.pointer("/statusReason/coding/0/code")
                .and_then(Value::as_str)
                .unwrap_or("other")
                .to_string()
        } else {
            String::new()
        };
        if status == "rejected" && self.reason == crate::fhir::NO_CAPACITY {
            self.declined_capacity = true;
        }
        if accepted_status(status) && self.accepted.is_none() {
            self.accepted = Some(at);
        }
        let business = task
            .pointer("/businessStatus/coding/0/code")
            .and_then(Value::as_str);
        if business == Some("contact-made") && self.contact.is_none() {
            self.contact = Some(at);
        }
        if status == "completed" && self.completed.is_none() {
            self.completed = Some(at);
        }
    }
}

/// The directory service the routing decision on a Task names, if any.
fn service_of(task: &Value) -> Option<String> {
    task.get("extension")?.as_array()?.iter().find_map(|e| {
        e.get("extension")?.as_array()?.iter().find_map(|p| {
            (p.get("url").and_then(Value::as_str) == Some("service"))
                .then(|| {
                    p.pointer("/valueReference/reference")
                        .and_then(Value::as_str)
                        .and_then(|r| r.strip_prefix("HealthcareService/"))
                        .map(str::to_string)
                })
                .flatten()
        })
    })
}

impl Facts {
    /// Sets what comes from the ServiceRequest (its current version) and, at its first
    /// version, from its Patient as first written.
    pub fn fold_service_request(
        &mut self,
        cfg: &Config,
        sr: &Value,
        first_written: i64,
        patient: Option<&Value>,
    ) {
        if self.received == 0 {
            self.received = first_written;
        }
        let codes: Vec<&str> = sr
            .get("reasonCode")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("coding").and_then(Value::as_array))
            .flatten()
            .filter_map(|c| c.get("code").and_then(Value::as_str))
            .collect();
        self.needs = cfg
            .needs
            .iter()
            .filter(|n| n.snomed.iter().any(|c| codes.contains(&c.as_str())))
            .map(|n| n.name.clone())
            .collect();
        self.practice = crate::fhir::parties_of(sr)
            .practice
            .unwrap_or("none")
            .to_string();
        self.source = sr
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|e| {
                e.get("url").and_then(Value::as_str) == Some(crate::fhir::EXT_SOURCE_OF_REFERRAL)
            })
            .and_then(|e| e.pointer("/valueCodeableConcept/coding/0/code"))
            .and_then(Value::as_str)
            .unwrap_or(crate::fhir::SOURCE_GP)
            .to_string();
        self.urgency = sr
            .get("priority")
            .and_then(Value::as_str)
            .unwrap_or("routine")
            .to_string();
        if let Some(p) = patient {
            let birth = p.get("birthDate").and_then(Value::as_str).unwrap_or("");
            self.age_band = age_band(age_at(birth, self.received));
            self.sex = p
                .get("gender")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
        }
    }

    /// Records a score Observation as it now is (or forgets it when it no longer counts).
    pub fn fold_observation(&mut self, cfg: &Config, obs: &Value, written: i64) {
        let Some(id) = obs.get("id").and_then(Value::as_str) else {
            return;
        };
        let code = obs
            .pointer("/code/coding/0/code")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let status = obs.get("status").and_then(Value::as_str).unwrap_or("");
        let value = obs
            .get("valueInteger")
            .and_then(Value::as_i64)
            .or_else(|| obs.pointer("/valueQuantity/value").and_then(Value::as_i64));
        let counts =
            cfg.outcome(code).is_some() && matches!(status, "final" | "amended" | "corrected");
        match (counts, value) {
            (true, Some(value)) => {
                let at = obs
                    .get("effectiveDateTime")
                    .and_then(Value::as_str)
                    .map(crate::clock::micros_of)
                    .filter(|m| *m != 0)
                    .unwrap_or(written);
                self.scores.insert(
                    id.to_string(),
                    Score {
                        code: code.to_string(),
                        at,
                        value,
                    },
                );
            }
            _ => {
                self.scores.remove(id);
            }
        }
    }

    /// The Task that now carries the referral: the last created.
    fn current_task(&self) -> Option<&TaskFacts> {
        self.tasks
            .iter()
            .max_by(|a, b| (a.1.created, a.0).cmp(&(b.1.created, b.0)))
            .map(|(_, t)| t)
    }

    /// Where the referral ended up, one of [`DISPOSITIONS`].
    pub fn disposition(&self) -> &'static str {
        if self.tasks.values().any(|t| t.accepted.is_some()) {
            return "accepted";
        }
        match self.current_task() {
            None => "open",
            Some(t) => match (t.status.as_str(), t.reason.as_str()) {
                ("rejected", crate::fhir::PATIENT_DECLINED) => "declined-patient",
                ("rejected", crate::fhir::NO_CAPACITY) => "declined-no-capacity",
                ("rejected", crate::fhir::NOT_ELIGIBLE) => "declined-not-eligible",
                ("rejected", _) => "declined-other",
                ("cancelled", _) => "cancelled",
                ("failed", _) => "failed",
                _ => "open",
            },
        }
    }

    /// The provider it is open at, if it is open.
    pub fn open_at(&self) -> Option<&str> {
        self.current_task()
            .filter(|t| !is_final(&t.status) && !t.owner.is_empty())
            .map(|t| t.owner.as_str())
    }

    fn first(&self, f: impl Fn(&TaskFacts) -> Option<i64>) -> Option<i64> {
        self.tasks.values().filter_map(f).min()
    }

    /// Whole days from receipt to `at` (never negative).
    fn days(&self, at: i64) -> i64 {
        ((at - self.received) / MICROS_PER_DAY).max(0)
    }
}

/// Where a referral can end up (uptake's strata: they add up to the referrals received).
pub const DISPOSITIONS: [(&str, &str); 8] = [
    ("accepted", "Accepted"),
    ("declined-patient", "Declined: the person did not want it"),
    ("declined-no-capacity", "Declined: no capacity"),
    ("declined-not-eligible", "Declined: not eligible"),
    ("declined-other", "Declined: another reason"),
    ("cancelled", "Cancelled"),
    ("failed", "Could not be completed"),
    ("open", "Not yet accepted"),
];

/// The stratifiers of referrals received: (id, what it is, whether its strata are protected
/// as a partition, adding up to the total). Need is too: a referral can have two needs, but
/// most have one, so its strata nearly add up to the total.
pub const STRATIFIERS: [(&str, &str, bool); 9] = [
    ("need", "Need", true),
    ("practice", "GP practice", true),
    ("source", "Source of referral", true),
    ("provider", "Routed provider", true),
    ("service", "Routed service", true),
    ("age", "Age band", true),
    ("sex", "Sex", true),
    ("urgency", "Urgency", true),
    ("month", "Month received", true),
];

/// What uptake, times and outcomes are also given by: (id, what it is, whether a referral
/// is in exactly one stratum). A referral counts at the provider it is with now (or ended
/// with), and under each of its needs.
pub const BY: [(&str, &str, bool); 2] = [("provider", "Provider", true), ("need", "Need", true)];

/// The timings (id, what from → to).
pub const TIMINGS: [(&str, &str); 3] = [
    ("accept", "Days from referral to acceptance"),
    ("contact", "Days from referral to first contact made"),
    ("complete", "Days from referral to completion"),
];

/// The counters a referral's facts add 1 (or a sum) to, by month received: `(month, cell)`.
pub fn cells(f: &Facts) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    if f.received == 0 {
        return out;
    }
    let month = month_of(f.received);
    let mut add = |cell: String, n: i64| {
        *out.entry((month.clone(), cell)).or_insert(0) += n;
    };
    add("rec".into(), 1);
    for n in f.needs.iter().collect::<BTreeSet<_>>() {
        add(format!("rec|need|{n}"), 1);
    }
    if f.needs.is_empty() {
        add("rec|need|none".into(), 1);
    }
    let current = f.current_task();
    let provider = current.map(|t| t.owner.as_str()).unwrap_or("none");
    let service = current
        .map(|t| t.service.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("none");
    for (k, v) in [
        ("practice", f.practice.as_str()),
        ("source", f.source.as_str()),
        ("provider", provider),
        ("service", service),
        ("age", f.age_band.as_str()),
        ("sex", f.sex.as_str()),
        ("urgency", f.urgency.as_str()),
    ] {
        add(format!("rec|{k}|{v}"), 1);
    }
    let disposition = f.disposition();
    add(format!("disp|{disposition}"), 1);
    // Uptake, times and outcomes again by provider and by need (`BY`): `…s|{by}|{value}|…`.
    let mut by: Vec<(&str, &str)> = vec![("provider", provider)];
    let needs: BTreeSet<&str> = f.needs.iter().map(String::as_str).collect();
    if needs.is_empty() {
        by.push(("need", "none"));
    }
    by.extend(needs.iter().map(|n| ("need", *n)));
    for (k, v) in &by {
        add(format!("ds|{k}|{v}|{disposition}"), 1);
    }
    if f.tasks.values().any(|t| t.declined_capacity) {
        add("declined-capacity".into(), 1);
    }
    for (id, at) in [
        ("accept", f.first(|t| t.accepted)),
        ("contact", f.first(|t| t.contact)),
        ("complete", f.first(|t| t.completed)),
    ] {
        if let Some(at) = at {
            let days = f.days(at);
            add(format!("t|{id}|{days}"), 1);
            for (k, v) in &by {
                add(format!("ts|{id}|{k}|{v}|{days}"), 1);
            }
        }
    }
    // Outcomes: per scale, the change from the first score to the last.
    let mut by_scale: BTreeMap<&str, Vec<(&i64, &String, i64)>> = BTreeMap::new();
    for (id, s) in &f.scores {
        by_scale
            .entry(s.code.as_str())
            .or_default()
            .push((&s.at, id, s.value));
    }
    for (code, mut scores) in by_scale {
        if scores.len() < 2 {
            continue;
        }
        scores.sort();
        let change = scores[scores.len() - 1].2 - scores[0].2;
        add(format!("o|{code}|pairs"), 1);
        add(format!("o|{code}|change|{change}"), 1);
        for (k, v) in &by {
            add(format!("os|{code}|{k}|{v}|{change}"), 1);
        }
    }
    out
}

/// The outcome's meaningful change per scale (from config).
fn threshold(cfg: &Config, code: &str) -> i64 {
    cfg.outcome(code).map(|o| o.meaningful_change).unwrap_or(3)
}

// ---- The Measures ----

pub const MEASURES: [(&str, &str, &str); 5] = [
    (
        "referrals-received",
        "Referrals received",
        "Referrals the gateway received in the period, by need, GP practice, source of referral, routed provider and service, age band at referral, sex, urgency and month. A referral with two needs counts once under each need, so those strata do not add up to the total.",
    ),
    (
        "uptake",
        "Uptake",
        "Of the referrals received in the period: the share accepted by a provider (at any provider, after any passing on), and where the others ended: declined (by reason: the person did not want it, no capacity, not eligible, another), cancelled, could not be completed, or not yet accepted. Also the referrals some provider declined for lack of capacity and passed on.",
    ),
    (
        "time-to-contact",
        "Time from referral to acceptance, first contact and completion",
        "For the referrals received in the period that reached each step: whole days from the gateway receiving the referral to the provider first accepting it, to contact first being recorded as made, and to completion, as the gateway recorded each. Median and 90th percentile by the nearest-rank method (the value at rank ceil(p x n)).",
    ),
    (
        "wellbeing-change",
        "Change in wellbeing scores",
        "For referrals received in the period with two or more scores on the same scale: the change from the first to the last score (by the time each was scored). Mean change, and the share improving by at least the scale's meaningful change (configured per scale; 3 points by default, see README).",
    ),
    (
        "provider-load",
        "Provider load",
        "Now, not for a period: each provider's open referrals against the open-referral limit it is configured with, and how many whole days the oldest of them has waited since the gateway received it.",
    ),
];

/// The gateway's Measure `id` as a FHIR R4 Measure.
pub fn measure(cfg: &Config, canonical_base: &str, id: &str) -> Option<Value> {
    let (_, title, description) = MEASURES.iter().find(|m| m.0 == id)?;
    let scoring = match id {
        "uptake" => "proportion",
        "time-to-contact" => "continuous-variable",
        "wellbeing-change" => "continuous-variable",
        _ => "cohort",
    };
    let groups: Vec<Value> = match id {
        "referrals-received" => vec![json!({
            "code": { "text": "received" },
            "description": "Referrals received",
            "population": [pop("initial-population", "Referrals received in the period")],
            "stratifier": STRATIFIERS
                .iter()
                .map(|(s, what, _)| json!({ "code": { "text": s }, "description": what }))
                .chain(std::iter::once(json!({
                    "code": { "text": "month-need" },
                    "description": "Month received and need together (a referral with two needs counts under each)",
                    "component": [
                        { "code": { "text": "month" }, "description": "Month received", "criteria": { "language": "text/fhirpath", "expression": "'month'" } },
                        { "code": { "text": "need" }, "description": "Need", "criteria": { "language": "text/fhirpath", "expression": "'need'" } }
                    ]
                })))
                .collect::<Vec<_>>()
        })],
        "uptake" => vec![
            json!({
                "code": { "text": "accepted" },
                "description": "Share of referrals received that a provider accepted",
                "population": [
                    pop("initial-population", "Referrals received in the period"),
                    pop("denominator", "Referrals received in the period"),
                    pop("numerator", "Those a provider accepted")
                ],
                "stratifier": std::iter::once(json!({ "code": { "text": "disposition" }, "description": "Where the referral ended up" }))
                    .chain(by_definitions())
                    .collect::<Vec<_>>()
            }),
            json!({
                "code": { "text": "declined-capacity" },
                "description": "Referrals some provider declined for lack of capacity (passed on)",
                "population": [pop("initial-population", "Referrals a provider declined for no capacity")]
            }),
        ],
        "time-to-contact" => TIMINGS
            .iter()
            .flat_map(|(t, what)| {
                ["median", "p90"].map(|stat| {
                    json!({
                        "code": { "text": format!("{t}-{stat}") },
                        "description": format!("{what}: {}", if stat == "median" { "median" } else { "90th percentile" }),
                        "population": [
                            pop("initial-population", "Referrals received in the period"),
                            pop("measure-population", "Those that reached the step"),
                            pop("measure-observation", "Whole days to the step")
                        ],
                        "stratifier": by_definitions()
                    })
                })
            })
            .collect(),
        "wellbeing-change" => cfg
            .outcomes
            .iter()
            .flat_map(|o| {
                [
                    json!({
                        "code": { "coding": [{ "system": crate::fhir::SNOMED, "code": o.code, "display": o.display }], "text": format!("{}-mean-change", o.code) },
                        "description": format!("{}: mean change from first to last score", o.display),
                        "population": [pop("measure-population", "Referrals with two or more scores on the scale")],
                        "stratifier": by_definitions()
                    }),
                    json!({
                        "code": { "coding": [{ "system": crate::fhir::SNOMED, "code": o.code, "display": o.display }], "text": format!("{}-improved", o.code) },
                        "description": format!("{}: share improving by {} points or more", o.display, o.meaningful_change),
                        "population": [
                            pop("denominator", "Referrals with two or more scores on the scale"),
                            pop("numerator", "Those whose last score is at least the meaningful change above the first")
                        ]
                    }),
                ]
            })
            .collect(),
        _ => cfg
            .providers
            .iter()
            .map(|p| {
                json!({
                    "code": { "text": p.id },
                    "description": format!("{}: open referrals against its limit of {}", p.name, p.capacity),
                    "population": [pop("measure-population", "Open referrals")]
                })
            })
            .collect(),
    };
    Some(json!({
        "resourceType": "Measure",
        "id": id,
        "url": format!("{canonical_base}/Measure/{id}"),
        "name": title.replace([' ', ','], ""),
        "title": title,
        "status": "active",
        "experimental": false,
        "publisher": "sp-gateway",
        "description": description,
        "scoring": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/measure-scoring", "code": scoring }] },
        "group": groups
    }))
}

/// The Measure's stratifiers by provider and by need (see [`BY`]).
fn by_definitions() -> Vec<Value> {
    BY.iter()
        .map(|(by, what, _)| {
            json!({
                "code": { "text": by },
                "description": if *by == "provider" {
                    format!("{what}: the one the referral is with now, or ended with")
                } else {
                    format!("{what}: a referral with two counts under each")
                }
            })
        })
        .collect()
}

fn pop(code: &str, description: &str) -> Value {
    json!({
        "code": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/measure-population", "code": code }] },
        "description": description,
        // The R4 schema allows only CQL, FHIRPath or a FHIR query here. The gateway counts
        // with its own kept counters, not by running an expression: this names the
        // population as a FHIRPath string literal; `description` says what it is.
        "criteria": { "language": "text/fhirpath", "expression": format!("'{code}'") }
    })
}

// ---- Suppression ----

/// A count as published: shown, or suppressed (1 to the threshold, or to protect one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    Count(i64),
    Suppressed,
}

impl Shown {
    pub fn value(self) -> Option<i64> {
        match self {
            Shown::Count(n) => Some(n),
            Shown::Suppressed => None,
        }
    }
}

/// The suppression rule (README, "Small numbers"): a count from 1 to `up_to` is
/// suppressed; and in a partition (cells that add up to a total that is shown), while only
/// one cell is suppressed, or the suppressed cells add up to `up_to` or less, the smallest
/// other non-zero cell is suppressed too, so that no hidden count, nor the sum of the
/// hidden ones, can be worked out by subtraction. `partition` false: the first rule only.
pub fn suppress(counts: &[i64], up_to: u32, partition: bool) -> Vec<Shown> {
    let mut hidden: Vec<bool> = counts.iter().map(|&n| small(n, up_to)).collect();
    if partition {
        protect(counts, &mut hidden, up_to);
    }
    shown_of(counts, &hidden)
}

/// A count as published: rounded to the nearest multiple of `reports.round_to` (halves
/// up; 0 stays 0), so that figures for overlapping periods cannot be subtracted to find a
/// suppressed one. Suppression is decided on the exact counts first.
pub fn published(cfg: &Config, s: Shown) -> Shown {
    let to = i64::from(cfg.reports.round_to.max(1));
    match s {
        Shown::Count(n) => Shown::Count((n + to / 2) / to * to),
        Shown::Suppressed => Shown::Suppressed,
    }
}

fn small(n: i64, up_to: u32) -> bool {
    n >= 1 && n <= i64::from(up_to)
}

fn shown_of(counts: &[i64], hidden: &[bool]) -> Vec<Shown> {
    counts
        .iter()
        .zip(hidden)
        .map(|(n, h)| {
            if *h {
                Shown::Suppressed
            } else {
                Shown::Count(*n)
            }
        })
        .collect()
}

/// The second rule on one partition: hides the smallest other non-zero cell while the
/// hidden cells could be worked out (one alone, or together `up_to` or less). True if it
/// hid anything.
fn protect(counts: &[i64], hidden: &mut [bool], up_to: u32) -> bool {
    let mut changed = false;
    loop {
        let n = hidden.iter().filter(|h| **h).count();
        let sum: i64 = counts
            .iter()
            .zip(hidden.iter())
            .filter(|(_, h)| **h)
            .map(|(c, _)| *c)
            .sum();
        if n == 0 || (n >= 2 && sum > i64::from(up_to)) {
            return changed;
        }
        match smallest_shown(counts, hidden) {
            Some(i) => {
                hidden[i] = true;
                changed = true;
            }
            None => return changed,
        }
    }
}

/// The smallest non-zero cell not yet hidden (the first of equals): the next to hide.
fn smallest_shown(counts: &[i64], hidden: &[bool]) -> Option<usize> {
    counts
        .iter()
        .enumerate()
        .filter(|(i, c)| !hidden[*i] && **c > 0)
        .min_by_key(|(i, c)| (**c, *i))
        .map(|(i, _)| i)
}

/// The rule on a table whose rows and columns are each a partition (the month x need
/// table): small cells hidden, then the second rule on every row and every column, again
/// until nothing changes. `cells` are (row, column, count).
pub fn suppress_table(cells: &[(usize, usize, i64)], up_to: u32) -> Vec<Shown> {
    let counts: Vec<i64> = cells.iter().map(|c| c.2).collect();
    let mut hidden: Vec<bool> = counts.iter().map(|&n| small(n, up_to)).collect();
    let rows: BTreeSet<usize> = cells.iter().map(|c| c.0).collect();
    let cols: BTreeSet<usize> = cells.iter().map(|c| c.1).collect();
    let lines: Vec<Vec<usize>> = rows
        .iter()
        .map(|r| (0..cells.len()).filter(|i| cells[*i].0 == *r).collect())
        .chain(
            cols.iter()
                .map(|c| (0..cells.len()).filter(|i| cells[*i].1 == *c).collect()),
        )
        .collect();
    loop {
        let mut changed = false;
        for line in &lines {
            let c: Vec<i64> = line.iter().map(|i| counts[*i]).collect();
            let mut h: Vec<bool> = line.iter().map(|i| hidden[*i]).collect();
            if protect(&c, &mut h, up_to) {
                changed = true;
                for (k, i) in line.iter().enumerate() {
                    hidden[*i] = h[k];
                }
            }
        }
        if !changed {
            return shown_of(&counts, &hidden);
        }
    }
}

/// Nearest-rank percentile (`p` in 1..=100) of a histogram of whole days.
pub fn percentile(hist: &BTreeMap<i64, i64>, p: i64) -> Option<i64> {
    let n: i64 = hist.values().sum();
    if n == 0 {
        return None;
    }
    let rank = (p * n + 99) / 100; // ceil(p/100 * n)
    let mut seen = 0;
    for (days, c) in hist {
        seen += c;
        if seen >= rank.max(1) {
            return Some(*days);
        }
    }
    None
}

// ---- Evaluating ----

/// Summed cells of a period: cell → total.
pub type Totals = BTreeMap<String, i64>;

/// Per month too (for the month stratifier): month → cell → count.
pub type ByMonth = BTreeMap<String, Totals>;

/// One provider's load now.
pub struct Load {
    pub provider: String,
    pub open: i64,
    pub capacity: u64,
    pub oldest_days: Option<i64>,
}

const DAR: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";

fn masked() -> Value {
    json!({ "extension": [{ "url": DAR, "valueCode": "masked" }] })
}

/// A population with its count, or with the count masked.
fn population(code: &str, shown: Shown) -> Value {
    let mut p = json!({
        "code": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/measure-population", "code": code }] }
    });
    match shown {
        Shown::Count(n) => p["count"] = json!(n),
        Shown::Suppressed => p["_count"] = masked(),
    }
    p
}

fn score(value: Option<f64>, unit: Option<&str>) -> Value {
    match (value, unit) {
        (Some(v), Some(u)) => {
            json!({ "value": v, "unit": u, "system": "http://unitsofmeasure.org", "code": u })
        }
        (Some(v), None) => json!({ "value": v }),
        (None, _) => masked(),
    }
}

/// Rounds to `dp` decimal places (for shares and means).
fn round(v: f64, dp: i32) -> f64 {
    let f = 10f64.powi(dp);
    (v * f).round() / f
}

/// The stratum values of `stratifier` among the totals' cells, with their counts.
fn strata(totals: &Totals, by_month: &ByMonth, stratifier: &str) -> Vec<(String, i64)> {
    if stratifier == "month" {
        return by_month
            .iter()
            .map(|(m, t)| (m.clone(), t.get("rec").copied().unwrap_or(0)))
            .collect();
    }
    let prefix = format!("rec|{stratifier}|");
    totals
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), *v)))
        .collect()
}

/// The words for a stratum value.
fn stratum_text(cfg: &Config, stratifier: &str, value: &str) -> String {
    match stratifier {
        "need" => cfg
            .need(value)
            .map(|n| n.display.clone())
            .unwrap_or(value.into()),
        "practice" => cfg
            .practice(value)
            .map(|p| p.name.clone())
            .unwrap_or(value.into()),
        "provider" => cfg
            .provider(value)
            .map(|p| p.name.clone())
            .unwrap_or(value.into()),
        "source" => crate::fhir::source_of_referral(value)
            .map(|s| s.display.to_string())
            .unwrap_or(value.into()),
        "disposition" => DISPOSITIONS
            .iter()
            .find(|d| d.0 == value)
            .map(|d| d.1.to_string())
            .unwrap_or(value.into()),
        _ => value.to_string(),
    }
}

fn stratifier_json(
    cfg: &Config,
    id: &str,
    pop_code: &str,
    values: &[(String, i64)],
    up_to: u32,
    partition: bool,
) -> Value {
    let counts: Vec<i64> = values.iter().map(|v| v.1).collect();
    let shown: Vec<Shown> = suppress(&counts, up_to, partition)
        .into_iter()
        .map(|s| published(cfg, s))
        .collect();
    json!({
        "code": [{ "text": id }],
        "stratum": values.iter().zip(shown).map(|((v, _), s)| json!({
            "value": { "coding": [{ "code": v }], "text": stratum_text(cfg, id, v) },
            "population": [population(pop_code, s)]
        })).collect::<Vec<_>>()
    })
}

/// The month × need table: one stratum per month and need, with components, suppressed as
/// a table ([`suppress_table`]).
fn month_need_json(cfg: &Config, by_month: &ByMonth, up_to: u32) -> Value {
    let mut cells: Vec<(&str, &str, i64)> = Vec::new();
    for (month, t) in by_month {
        for (k, v) in t {
            if let Some(need) = k.strip_prefix("rec|need|") {
                cells.push((month, need, *v));
            }
        }
    }
    // Each referral is in one month, so a need's months add up to its total; and most have
    // one need, so a month's needs add up to (about) its total: both are protected.
    let months: Vec<&str> = cells
        .iter()
        .map(|c| c.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let needs: Vec<&str> = cells
        .iter()
        .map(|c| c.1)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let table: Vec<(usize, usize, i64)> = cells
        .iter()
        .map(|(m, n, c)| {
            (
                months.iter().position(|x| x == m).unwrap_or(0),
                needs.iter().position(|x| x == n).unwrap_or(0),
                *c,
            )
        })
        .collect();
    let shown: Vec<Shown> = suppress_table(&table, up_to)
        .into_iter()
        .map(|s| published(cfg, s))
        .collect();
    json!({
        "code": [{ "text": "month-need" }],
        "stratum": cells.iter().zip(shown).map(|((month, need, _), s)| json!({
            "component": [
                { "code": { "text": "month" }, "value": { "coding": [{ "code": month }], "text": month } },
                { "code": { "text": "need" }, "value": { "coding": [{ "code": need }], "text": stratum_text(cfg, "need", need) } }
            ],
            "population": [population("initial-population", s)]
        })).collect::<Vec<_>>()
    })
}

/// The counters under `{prefix}{by}|` split by stratum value, then by what follows it:
/// value → (last segment → count).
fn split_by(totals: &Totals, prefix: &str, by: &str) -> BTreeMap<String, BTreeMap<String, i64>> {
    let head = format!("{prefix}{by}|");
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (k, v) in totals.range(head.clone()..) {
        let Some(rest) = k.strip_prefix(&head) else {
            break;
        };
        if let Some((value, last)) = rest.rsplit_once('|') {
            *out.entry(value.to_string())
                .or_default()
                .entry(last.to_string())
                .or_insert(0) += v;
        }
    }
    out
}

/// Suppression of a share's numerator and denominator in strata: the denominators by
/// [`suppress`]; a numerator is suppressed when it, or what it leaves of its denominator, is
/// from 1 to `up_to`, or its denominator is suppressed; and, in a partition (numerators add
/// up to a shown total), while the suppressed numerators could be worked out (one alone, or
/// together, or what they leave of their denominators together, from 1 to `up_to`), the
/// smallest other non-zero numerator is suppressed too.
fn share_strata(dens: &[i64], nums: &[i64], up_to: u32, partition: bool) -> Vec<(Shown, Shown)> {
    let dens_shown = suppress(dens, up_to, partition);
    let mut hidden: Vec<bool> = dens_shown
        .iter()
        .zip(dens.iter().zip(nums))
        .map(|(s, (d, n))| *s == Shown::Suppressed || small(*n, up_to) || small(d - n, up_to))
        .collect();
    if !partition {
        return pair_shown(dens_shown, nums, &hidden);
    }
    loop {
        // Loops until the hidden numerators are safe together, or none is left to hide.
        let h: Vec<usize> = (0..nums.len()).filter(|i| hidden[*i]).collect();
        let accepted: i64 = h.iter().map(|i| nums[*i]).sum();
        let rest: i64 = h.iter().map(|i| dens[*i] - nums[*i]).sum();
        if h.is_empty() || (h.len() >= 2 && !small(accepted, up_to) && !small(rest, up_to)) {
            break;
        }
        match smallest_shown(nums, &hidden) {
            Some(i) => hidden[i] = true,
            None => break,
        }
    }
    pair_shown(dens_shown, nums, &hidden)
}

fn pair_shown(dens_shown: Vec<Shown>, nums: &[i64], hidden: &[bool]) -> Vec<(Shown, Shown)> {
    dens_shown
        .into_iter()
        .zip(nums.iter().zip(hidden))
        .map(|(d, (n, h))| {
            (
                d,
                if *h {
                    Shown::Suppressed
                } else {
                    Shown::Count(*n)
                },
            )
        })
        .collect()
}

fn stratum_value(cfg: &Config, by: &str, value: &str) -> Value {
    json!({ "coding": [{ "code": value }], "text": stratum_text(cfg, by, value) })
}

/// Uptake by provider and by need: each stratum's referrals, those accepted, and the share.
fn uptake_by(cfg: &Config, t: &Totals, up_to: u32) -> Vec<Value> {
    BY.iter()
        .map(|(by, _, partition)| {
            let groups = split_by(t, "ds|", by);
            let dens: Vec<i64> = groups.values().map(|g| g.values().sum()).collect();
            let nums: Vec<i64> = groups.values().map(|g| g.get("accepted").copied().unwrap_or(0)).collect();
            let shown: Vec<(Shown, Shown)> = share_strata(&dens, &nums, up_to, *partition)
                .into_iter()
                .map(|(d, n)| (published(cfg, d), published(cfg, n)))
                .collect();
            json!({
                "code": [{ "text": by }],
                "stratum": groups.keys().zip(shown).map(|(v, (d, n))| {
                    let share = match (d, n) {
                        (Shown::Count(d), Shown::Count(n)) if d > 0 => Some(round(n as f64 / d as f64, 4)),
                        _ => None,
                    };
                    json!({
                        "value": stratum_value(cfg, by, v),
                        "population": [population("denominator", d), population("numerator", n)],
                        "measureScore": score(share, None)
                    })
                }).collect::<Vec<_>>()
            })
        })
        .collect()
}

/// A statistic of a histogram (whole days, or changes) in strata by provider and by need:
/// each stratum's count, and `stat` of it when the count is above `up_to`.
fn histogram_by(
    cfg: &Config,
    t: &Totals,
    prefix: &str,
    pop_code: &str,
    unit: Option<&str>,
    up_to: u32,
    stat: &dyn Fn(&BTreeMap<i64, i64>) -> Option<f64>,
) -> Vec<Value> {
    BY.iter()
        .map(|(by, _, partition)| {
            let groups: Vec<(String, BTreeMap<i64, i64>)> = split_by(t, prefix, by)
                .into_iter()
                .map(|(v, g)| {
                    let hist = g
                        .into_iter()
                        .filter_map(|(k, c)| k.parse().ok().map(|k| (k, c)))
                        .collect();
                    (v, hist)
                })
                .collect();
            let ns: Vec<i64> = groups.iter().map(|(_, h)| h.values().sum()).collect();
            let shown: Vec<Shown> = suppress(&ns, up_to, *partition)
                .into_iter()
                .map(|s| published(cfg, s))
                .collect();
            json!({
                "code": [{ "text": by }],
                "stratum": groups.iter().zip(ns.iter().zip(shown)).map(|((v, h), (n, s))| {
                    // Only beside a count that is shown: a mean beside a count hidden to
                    // protect another would narrow it down.
                    let value = (*n > i64::from(up_to) && s != Shown::Suppressed)
                        .then(|| stat(h))
                        .flatten();
                    json!({
                        "value": stratum_value(cfg, by, v),
                        "population": [population(pop_code, s)],
                        "measureScore": score(value, unit)
                    })
                }).collect::<Vec<_>>()
            })
        })
        .collect()
}

/// The mean of a histogram of changes, to two places.
fn mean_of(h: &BTreeMap<i64, i64>) -> Option<f64> {
    let n: i64 = h.values().sum();
    (n > 0).then(|| {
        round(
            h.iter().map(|(k, c)| k * c).sum::<i64>() as f64 / n as f64,
            2,
        )
    })
}

/// What a MeasureReport is made from.
pub struct Period<'a> {
    pub start: &'a str,
    pub end: &'a str,
    pub totals: &'a Totals,
    pub by_month: &'a ByMonth,
}

/// The MeasureReport of Measure `id` over a period's counters (or, for provider load,
/// over `loads`), with the suppression rule applied.
pub fn evaluate(
    cfg: &Config,
    canonical_base: &str,
    id: &str,
    period: &Period<'_>,
    loads: &[Load],
    now: &str,
) -> Option<Value> {
    MEASURES.iter().find(|m| m.0 == id)?;
    let up_to = cfg.reports.suppress_up_to;
    let t = period.totals;
    let get = |k: &str| t.get(k).copied().unwrap_or(0);
    let total = get("rec");
    let total_shown = published(cfg, suppress(&[total], up_to, false)[0]);
    let groups: Vec<Value> = match id {
        "referrals-received" => {
            let stratifiers: Vec<Value> = STRATIFIERS
                .iter()
                .map(|(s, _, partition)| {
                    stratifier_json(
                        cfg,
                        s,
                        "initial-population",
                        &strata(t, period.by_month, s),
                        up_to,
                        *partition,
                    )
                })
                .chain(std::iter::once(month_need_json(cfg, period.by_month, up_to)))
                .collect();
            vec![json!({
                "code": { "text": "received" },
                "population": [population("initial-population", total_shown)],
                "stratifier": stratifiers
            })]
        }
        "uptake" => {
            let values: Vec<(String, i64)> = DISPOSITIONS
                .iter()
                .map(|(d, _)| (d.to_string(), get(&format!("disp|{d}"))))
                .collect();
            let counts: Vec<i64> = values.iter().map(|v| v.1).collect();
            let shown: Vec<Shown> = suppress(&counts, up_to, true)
                .into_iter()
                .map(|s| published(cfg, s))
                .collect();
            let accepted = shown[0];
            let share = match (accepted, total_shown) {
                (Shown::Count(a), Shown::Count(n)) if n > 0 => Some(round(a as f64 / n as f64, 4)),
                _ => None,
            };
            vec![
                json!({
                    "code": { "text": "accepted" },
                    "population": [
                        population("initial-population", total_shown),
                        population("denominator", total_shown),
                        population("numerator", accepted)
                    ],
                    "measureScore": score(share, None),
                    "stratifier": std::iter::once(stratifier_json(cfg, "disposition", "initial-population", &values, up_to, true))
                        .chain(uptake_by(cfg, t, up_to))
                        .collect::<Vec<_>>()
                }),
                json!({
                    "code": { "text": "declined-capacity" },
                    "population": [population("initial-population", published(cfg, suppress(&[get("declined-capacity")], up_to, false)[0]))]
                }),
            ]
        }
        "time-to-contact" => TIMINGS
            .iter()
            .flat_map(|(timing, _)| {
                let prefix = format!("t|{timing}|");
                let hist: BTreeMap<i64, i64> = t
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(&prefix)
                            .and_then(|d| d.parse().ok())
                            .map(|d| (d, *v))
                    })
                    .collect();
                let n: i64 = hist.values().sum();
                let n_shown = published(cfg, suppress(&[n], up_to, false)[0]);
                let big_enough = n > i64::from(up_to);
                [("median", 50), ("p90", 90)].map(|(stat, p)| {
                    let value = if big_enough {
                        percentile(&hist, p).map(|d| d as f64)
                    } else {
                        None
                    };
                    json!({
                        "code": { "text": format!("{timing}-{stat}") },
                        "population": [
                            population("initial-population", total_shown),
                            population("measure-population", n_shown),
                            population("measure-observation", n_shown)
                        ],
                        "measureScore": score(value, Some("d")),
                        "stratifier": histogram_by(cfg, t, &format!("ts|{timing}|"), "measure-population", Some("d"), up_to, &|h| percentile(h, p).map(|d| d as f64))
                    })
                })
            })
            .collect(),
        "wellbeing-change" => cfg
            .outcomes
            .iter()
            .flat_map(|o| {
                let prefix = format!("o|{}|change|", o.code);
                let changes: Vec<(i64, i64)> = t
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(&prefix)
                            .and_then(|d| d.parse().ok())
                            .map(|d| (d, *v))
                    })
                    .collect();
                let n: i64 = changes.iter().map(|c| c.1).sum();
                let sum: i64 = changes.iter().map(|(d, c)| d * c).sum();
                let improved: i64 = changes
                    .iter()
                    .filter(|(d, _)| *d >= threshold(cfg, &o.code))
                    .map(|c| c.1)
                    .sum();
                let n_shown = published(cfg, suppress(&[n], up_to, false)[0]);
                let big_enough = n > i64::from(up_to);
                let mean = big_enough.then(|| round(sum as f64 / n as f64, 2));
                let split = suppress(&[improved, n - improved], up_to, true);
                let improved_shown = if big_enough { published(cfg, split[0]) } else { Shown::Suppressed };
                // From the published counts, so that the share gives away no exact count.
                let share = match (improved_shown, split[1], n_shown) {
                    (Shown::Count(a), Shown::Count(_), Shown::Count(d)) if big_enough && d > 0 => Some(round(a as f64 / d as f64, 4)),
                    _ => None,
                };
                let code = json!({ "coding": [{ "system": crate::fhir::SNOMED, "code": o.code, "display": o.display }] });
                [
                    json!({
                        "code": { "coding": code["coding"], "text": format!("{}-mean-change", o.code) },
                        "population": [population("measure-population", n_shown)],
                        "measureScore": score(mean, None),
                        "stratifier": histogram_by(cfg, t, &format!("os|{}|", o.code), "measure-population", None, up_to, &mean_of)
                    }),
                    json!({
                        "code": { "coding": code["coding"], "text": format!("{}-improved", o.code) },
                        "population": [
                            population("denominator", n_shown),
                            population("numerator", if share.is_some() { improved_shown } else { Shown::Suppressed })
                        ],
                        "measureScore": score(share, None)
                    }),
                ]
            })
            .collect(),
        _ => loads
            .iter()
            .map(|l| {
                let shown = published(cfg, suppress(&[l.open], up_to, false)[0]);
                let big_enough = l.open > i64::from(up_to);
                let share = match shown {
                    Shown::Count(open) if big_enough && l.capacity > 0 => {
                        Some(round(open as f64 / l.capacity as f64, 4))
                    }
                    _ => None,
                };
                let mut g = json!({
                    "code": { "text": l.provider },
                    "population": [population("measure-population", shown)],
                    "measureScore": score(share, None),
                    "extension": [{
                        "url": format!("{}/StructureDefinition/provider-capacity", crate::fhir::CANONICAL),
                        "valueInteger": l.capacity
                    }]
                });
                let wait = if big_enough { l.oldest_days } else { None };
                if let Some(ext) = g["extension"].as_array_mut() {
                    ext.push(json!({
                        "url": format!("{}/StructureDefinition/oldest-wait", crate::fhir::CANONICAL),
                        "valueQuantity": score(wait.map(|d| d as f64), Some("d"))
                    }));
                }
                g
            })
            .collect(),
    };
    Some(json!({
        "resourceType": "MeasureReport",
        "status": "complete",
        "type": "summary",
        "measure": format!("{canonical_base}/Measure/{id}"),
        "date": now,
        "reporter": { "display": "sp-gateway" },
        "period": { "start": period.start, "end": period.end },
        "improvementNotation": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/measure-improvement-notation", "code": "increase" }] },
        "extension": [{
            "url": format!("{}/StructureDefinition/suppressed-up-to", crate::fhir::CANONICAL),
            "valueInteger": up_to
        }],
        "group": groups
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_counts_and_the_one_that_would_give_them_away_are_suppressed() {
        use Shown::*;
        assert_eq!(
            suppress(&[20, 5, 0, 12], 7, true),
            vec![Count(20), Suppressed, Count(0), Suppressed],
            "5 is hidden, and so is 12, the smallest other, or 5 = total - 20 - 12"
        );
        assert_eq!(
            suppress(&[20, 5, 3, 12], 7, true),
            vec![Count(20), Suppressed, Suppressed, Count(12)],
            "two hidden cells protect each other"
        );
        assert_eq!(suppress(&[8, 0], 7, true), vec![Count(8), Count(0)]);
        assert_eq!(
            suppress(&[20, 1, 1, 12], 7, true),
            vec![Count(20), Suppressed, Suppressed, Suppressed],
            "two hidden cells adding up to 2 must both be 1: a third joins them"
        );
        assert_eq!(
            suppress(&[7, 1], 7, false),
            vec![Suppressed, Suppressed],
            "1 to 7"
        );
    }

    #[test]
    fn a_share_in_strata_hides_what_would_reveal_a_small_count() {
        use Shown::*;
        // Providers b and c: 5 and 6 referrals (small, and they protect each other). d: 20
        // with 17 accepted leaves 3 not accepted, so its numerator is hidden.
        let got = share_strata(&[30, 5, 6, 20, 40], &[20, 5, 6, 17, 30], 7, true);
        assert_eq!(got[1], (Suppressed, Suppressed));
        assert_eq!(got[2], (Suppressed, Suppressed));
        assert_eq!(
            got[3],
            (Count(20), Suppressed),
            "17 of 20 reveals 3 not accepted"
        );
        assert_eq!(
            (got[0].1, got[4].1),
            (Suppressed, Count(30)),
            "the hidden ones leave 0 + 0 + 3 not accepted together: a (10 not accepted) joins them"
        );
        // Only one numerator hidden among the rest: the smallest other goes too.
        let got = share_strata(&[30, 20, 40], &[20, 17, 30], 7, true);
        assert_eq!(got.iter().filter(|g| g.1 == Suppressed).count(), 2);
        assert_eq!(got[0].1, Suppressed, "20 is the smallest other numerator");
        // Needs overlap: no complement across strata.
        let got = share_strata(&[30, 20, 40], &[20, 17, 30], 7, false);
        assert_eq!(got.iter().filter(|g| g.1 == Suppressed).count(), 1);
    }

    #[test]
    fn published_counts_are_rounded_to_the_nearest_five_after_suppression() {
        let mut cfg = Config::parse(crate::config::EMBEDDED_DEFAULT, "demo").expect("config");
        let p = |cfg: &Config, n| published(cfg, Shown::Count(n));
        assert_eq!(p(&cfg, 657), Shown::Count(655));
        assert_eq!(p(&cfg, 658), Shown::Count(660));
        assert_eq!(p(&cfg, 8), Shown::Count(10));
        assert_eq!(p(&cfg, 0), Shown::Count(0));
        assert_eq!(published(&cfg, Shown::Suppressed), Shown::Suppressed);
        cfg.reports.round_to = 1;
        assert_eq!(p(&cfg, 657), Shown::Count(657), "1: exact counts");
    }

    #[test]
    fn a_table_protects_its_rows_and_its_columns() {
        use Shown::*;
        // Rows (months) x columns (needs):
        //   20  5  30
        //   25 40  35
        //   30 45  50
        let cells: Vec<(usize, usize, i64)> = [[20, 5, 30], [25, 40, 35], [30, 45, 50]]
            .iter()
            .enumerate()
            .flat_map(|(r, row)| row.iter().enumerate().map(move |(c, n)| (r, c, *n)))
            .collect();
        let got = suppress_table(&cells, 7);
        let hidden: Vec<(usize, usize)> = cells
            .iter()
            .zip(&got)
            .filter(|(_, s)| **s == Suppressed)
            .map(|(c, _)| (c.0, c.1))
            .collect();
        // 5 is small; then every row and column with a hidden cell must have two or more.
        for line in 0..3 {
            let in_row = hidden.iter().filter(|h| h.0 == line).count();
            let in_col = hidden.iter().filter(|h| h.1 == line).count();
            assert!(in_row != 1 && in_col != 1, "{hidden:?}");
        }
        assert!(hidden.contains(&(0, 1)));
        assert_eq!(got[8], Count(50));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let hist: BTreeMap<i64, i64> = [(1, 1), (2, 1), (3, 1), (4, 1)].into();
        assert_eq!(percentile(&hist, 50), Some(2), "rank ceil(0.5 x 4) = 2");
        assert_eq!(percentile(&hist, 90), Some(4), "rank ceil(0.9 x 4) = 4");
        let one: BTreeMap<i64, i64> = [(9, 10)].into();
        assert_eq!(percentile(&one, 50), Some(9));
    }

    #[test]
    fn age_bands_are_whole_years_at_referral() {
        let at = crate::clock::micros_of("2026-11-21T10:00:00Z");
        assert_eq!(age_at("1948-11-22", at), Some(77));
        assert_eq!(age_at("1948-11-21", at), Some(78));
        assert_eq!(age_band(Some(78)), "75-84");
        assert_eq!(age_band(None), "unknown");
    }
}
