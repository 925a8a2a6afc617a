//! Inbound formats: turns an EMIS-style referral body into a checked [`Referral`].
//!
//! Owns `profiles/gp-referral.schema.json` and every rule the schema cannot say (NHS number
//! check digit, postcode shape, dates not in the future, need categories known to the
//! config, consent). It must not map to FHIR, route, or write anything: a [`Referral`] is
//! plain validated data, and a refusal is an [`Error`] naming each offending element.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Date, OffsetDateTime};

use crate::config::Config;
use crate::error::{Error, Issue, Result};
use crate::schema;

const REFERRAL_SCHEMA: &str = include_str!("../profiles/gp-referral.schema.json");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Referral {
    pub referral_id: String,
    pub sent_at: String,
    pub practice: Practice,
    pub referrer: Referrer,
    pub patient: Patient,
    pub needs: Vec<String>,
    #[serde(default)]
    pub reasons: Vec<Coding>,
    pub urgency: Urgency,
    pub consent: Consent,
    #[serde(default)]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Practice {
    pub ods_code: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Referrer {
    pub name: String,
    #[serde(default)]
    pub role: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patient {
    pub nhs_number: String,
    pub given_name: String,
    pub family_name: String,
    pub birth_date: String,
    pub gender: String,
    pub postcode: String,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub preferred_contact: Option<String>,
    #[serde(default)]
    pub interpreter_language: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coding {
    pub system: String,
    pub code: String,
    #[serde(default)]
    pub display: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Urgency {
    Routine,
    Urgent,
}

impl Urgency {
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::Routine => "routine",
            Urgency::Urgent => "urgent",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Consent {
    pub share_with_provider: bool,
    pub recorded_at: String,
}

/// A referral that passed the schema and every rule, with the facts routing needs.
#[derive(Debug, Clone)]
pub struct CheckedReferral {
    pub referral: Referral,
    /// The body as parsed JSON, for the idempotency hash.
    pub canonical: Value,
    /// Postcode normalised to "AA9 9AA" form.
    pub postcode: String,
    /// Outward code of the postcode, e.g. "BB9".
    pub district: String,
    /// Age in whole years today.
    pub age: u32,
}

fn validator() -> &'static schema::Validator {
    static V: OnceLock<schema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let schema: Value = match serde_json::from_str(REFERRAL_SCHEMA) {
            Ok(v) => v,
            Err(e) => panic!("profiles/gp-referral.schema.json is not JSON: {e}"),
        };
        let id = schema["$id"]
            .as_str()
            .unwrap_or("urn:gp-referral")
            .to_string();
        match schema::Validator::compile(&id, schema) {
            Ok(v) => v,
            Err(e) => panic!("profiles/gp-referral.schema.json does not compile: {e}"),
        }
    })
}

/// Forces the referral schema to compile (at start-up, so a broken schema fails fast).
pub fn init() {
    let _ = validator();
}

/// Parses and checks an EMIS-style referral. `now` is the gateway's clock.
pub fn parse_referral(body: &[u8], cfg: &Config, now: OffsetDateTime) -> Result<CheckedReferral> {
    let value = schema::parse_json(body)?;
    let issues = schema::check(validator(), &value, "");
    if !issues.is_empty() {
        return Err(Error::Invalid(issues));
    }
    let referral: Referral = serde_json::from_value(value.clone()).map_err(|e| {
        // The schema and the struct disagree: a bug, but still the client's input.
        Error::invalid(
            "structure",
            "",
            format!("referral does not match its schema: {e}"),
        )
    })?;
    check_rules(referral, value, cfg, now)
}

fn check_rules(
    r: Referral,
    canonical: Value,
    cfg: &Config,
    now: OffsetDateTime,
) -> Result<CheckedReferral> {
    let mut issues = Vec::new();
    if !nhs_number_valid(&r.patient.nhs_number) {
        issues.push(Issue::new(
            "value",
            "patient.nhsNumber",
            "is not a valid NHS number: its Modulus 11 check digit does not match",
        ));
    }
    let postcode = normalise_postcode(&r.patient.postcode);
    let district = postcode.split(' ').next().unwrap_or_default().to_string();
    if !crate::config::is_postcode_district(&district) {
        issues.push(Issue::new(
            "value",
            "patient.postcode",
            "is not a UK postcode",
        ));
    }
    let today = now.date();
    let mut age = 0;
    match parse_date(&r.patient.birth_date) {
        None => issues.push(Issue::new(
            "value",
            "patient.birthDate",
            "is not a calendar date (YYYY-MM-DD)",
        )),
        Some(d) if d > today => {
            issues.push(Issue::new("value", "patient.birthDate", "is in the future"))
        }
        Some(d) if d.year() < 1890 => {
            issues.push(Issue::new("value", "patient.birthDate", "is before 1890"))
        }
        // Age on the day the referral was sent, so the same referral always routes the same.
        Some(d) => {
            let on = parse_instant(&r.sent_at).map(|t| t.date()).unwrap_or(today);
            age = age_on(d, on.max(d));
        }
    }
    let skew = time::Duration::minutes(5);
    for (path, v) in [
        ("sentAt", &r.sent_at),
        ("consent.recordedAt", &r.consent.recorded_at),
    ] {
        match parse_instant(v) {
            None => issues.push(Issue::new("value", path, "is not a valid date-time")),
            Some(t) if t > now + skew => issues.push(Issue::new("value", path, "is in the future")),
            Some(_) => {}
        }
    }
    if let Some(l) = &r.patient.interpreter_language {
        if l.len() > 35 {
            issues.push(Issue::new(
                "value",
                "patient.interpreterLanguage",
                "is too long",
            ));
        }
    }
    for (i, n) in r.needs.iter().enumerate() {
        if cfg.need(n).is_none() {
            let known: Vec<&str> = cfg.needs.iter().map(|n| n.name.as_str()).collect();
            issues.push(Issue::new(
                "code-invalid",
                format!("needs[{i}]"),
                format!(
                    "`{n}` is not a need category this gateway knows; known: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    if !issues.is_empty() {
        return Err(Error::Invalid(issues));
    }
    if cfg.practice(&r.practice.ods_code).is_none() {
        return Err(Error::rule(
            "practice.odsCode",
            "is not a practice configured on this gateway",
        ));
    }
    if !r.consent.share_with_provider {
        return Err(Error::rule(
            "consent.shareWithProvider",
            "is false: nothing is shared with a provider without the patient's consent",
        ));
    }
    Ok(CheckedReferral {
        referral: r,
        canonical,
        postcode,
        district,
        age,
    })
}

/// NHS number: 10 digits whose last is the Modulus 11 check digit of the first nine.
pub fn nhs_number_valid(s: &str) -> bool {
    let d: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if d.len() != 10 || s.len() != 10 {
        return false;
    }
    let sum: u32 = d[..9].iter().zip((2..=10).rev()).map(|(x, w)| x * w).sum();
    let check = 11 - (sum % 11);
    match check {
        11 => d[9] == 0,
        10 => false,
        c => d[9] == c,
    }
}

/// Upper-cases and puts exactly one space before the inward code ("bb97sr" → "BB9 7SR").
pub fn normalise_postcode(s: &str) -> String {
    let compact: String = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_uppercase();
    if compact.len() < 5 {
        return compact;
    }
    let (out, inw) = compact.split_at(compact.len() - 3);
    format!("{out} {inw}")
}

pub fn parse_date(s: &str) -> Option<Date> {
    Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()
}

pub fn parse_instant(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

fn age_on(birth: Date, today: Date) -> u32 {
    let mut years = today.year() - birth.year();
    if (today.month() as u8, today.day()) < (birth.month() as u8, birth.day()) {
        years -= 1;
    }
    years.max(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulus_11() {
        assert!(nhs_number_valid("9990000018"));
        assert!(!nhs_number_valid("9990000019"));
        assert!(!nhs_number_valid("999000001"));
        assert!(!nhs_number_valid("99900000１8"));
    }

    #[test]
    fn postcodes() {
        assert_eq!(normalise_postcode("bb97sr"), "BB9 7SR");
        assert_eq!(normalise_postcode("M1 1AE"), "M1 1AE");
        assert_eq!(normalise_postcode("EC1A 1BB"), "EC1A 1BB");
    }

    #[test]
    fn ages() {
        let d = |s| parse_date(s).unwrap();
        assert_eq!(age_on(d("1948-03-02"), d("2026-11-20")), 78);
        assert_eq!(age_on(d("2000-11-21"), d("2026-11-20")), 25);
        assert_eq!(age_on(d("2000-11-20"), d("2026-11-20")), 26);
    }
}
