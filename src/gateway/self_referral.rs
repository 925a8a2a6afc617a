//! Self-referral: a person refers themselves, or someone they care for, from the public
//! page (`/refer`), with no account.
//!
//! Owns the rules for what a person types (each fault named by its form field, in plain
//! English), the reference number they are given, and the mapping to a UK Core Patient and
//! ServiceRequest. The referral is written by the same [`Gateway::create`] as every other,
//! so it is routed, audited and idempotent the same way. It must not know HTML or HTTP.

use serde_json::json;
use sha2::{Digest, Sha256};

use super::referral::{Origin, PatientPlan, Plan, Submitted};
use super::Gateway;
use crate::clock::Now;
use crate::config::Config;
use crate::error::{Error, Issue, Result};
use crate::fhir;
use crate::ingest;

/// What the person filled in, as the page sent it (every field a string, as typed).
#[derive(Debug, Clone, Default)]
pub struct SelfReferral {
    /// The form's one-time token: it makes sending the form twice safe.
    pub token: String,
    /// `me`, or `someone` (a person they care for or are related to).
    pub for_whom: String,
    pub carer_name: String,
    pub carer_relationship: String,
    pub carer_phone: String,
    pub given_name: String,
    pub family_name: String,
    pub dob_day: String,
    pub dob_month: String,
    pub dob_year: String,
    pub postcode: String,
    pub phone: String,
    pub email: String,
    /// Need category names (the config's `[[needs]] name`).
    pub needs: Vec<String>,
    pub more: String,
    pub nhs_number: String,
    /// A configured practice's ODS code, or empty (not known).
    pub practice: String,
    pub consent_share: bool,
    pub consent_gp: bool,
}

/// A self-referral the gateway holds.
pub struct SelfReferred {
    /// The reference number the person is given.
    pub reference: String,
    /// False when this form had been sent before (nothing new written).
    pub created: bool,
}

/// Identifier system of self-referral reference numbers.
pub fn reference_system() -> String {
    format!("{}/Id/self-referral", fhir::CANONICAL)
}

/// The idempotency namespace of self-referrals (no ODS code has a `.`).
pub(crate) const NAMESPACE: &str = "self.refer";

const ALPHABET: &[u8; 32] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZ";

/// The reference number of the form with this token: `SP-XXXX-XXXX`, 40 bits of its hash
/// in letters and digits that cannot be mistaken for each other.
pub fn reference_for(token: &str) -> String {
    let h = Sha256::digest(format!("sp-gateway self-referral {token}").as_bytes());
    let mut bits = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], 0, 0, 0]) >> 24;
    let mut chars = [0u8; 8];
    for c in chars.iter_mut().rev() {
        *c = ALPHABET[(bits & 31) as usize];
        bits >>= 5;
    }
    let s = String::from_utf8_lossy(&chars).into_owned();
    format!("SP-{}-{}", &s[..4], &s[4..])
}

/// A fresh form token.
pub fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn text_ok(s: &str, max: usize) -> bool {
    let t = s.trim();
    !t.is_empty() && t.chars().count() <= max && !t.chars().any(char::is_control)
}

fn phone_ok(s: &str) -> bool {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    (10..=15).contains(&digits)
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '+' | '-' | '(' | ')'))
}

/// What the page's fields are called in error messages' `expression` (the field's `name`).
fn issue(field: &str, text: &str) -> Issue {
    Issue::new("invalid", field, text)
}

/// Checks the form; every fault is named by its field. Returns the date of birth, the
/// normalised postcode and the NHS number (if given).
fn check(
    f: &SelfReferral,
    cfg: &Config,
    today: time::Date,
) -> Result<(time::Date, String, Option<String>)> {
    let mut out = Vec::new();
    let carer = f.for_whom == "someone";
    if !matches!(f.for_whom.as_str(), "me" | "someone") {
        out.push(issue("for_whom", "Select who you are referring"));
    }
    if carer {
        if !text_ok(&f.carer_name, 100) {
            out.push(issue("carer_name", "Enter your name"));
        }
        if !text_ok(&f.carer_relationship, 100) {
            out.push(issue(
                "carer_relationship",
                "Enter how you know the person, for example daughter or neighbour",
            ));
        }
        if !f.carer_phone.trim().is_empty() && !phone_ok(&f.carer_phone) {
            out.push(issue(
                "carer_phone",
                "Enter your phone number, like 01632 960 001 or 07700 900 982",
            ));
        }
    }
    if !text_ok(&f.given_name, 100) {
        out.push(issue("given_name", "Enter a first name"));
    }
    if !text_ok(&f.family_name, 100) {
        out.push(issue("family_name", "Enter a last name"));
    }
    let dob = (|| {
        let d: u8 = f.dob_day.trim().parse().ok()?;
        let m: u8 = f.dob_month.trim().parse().ok()?;
        let y: i32 = f.dob_year.trim().parse().ok()?;
        time::Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()
    })();
    let dob = match dob {
        Some(d) if d > today => {
            out.push(issue("dob_day", "Date of birth must be in the past"));
            None
        }
        Some(d) if today.year() - d.year() > 120 => {
            out.push(issue(
                "dob_year",
                "Enter a year of birth after 1900, like 1960",
            ));
            None
        }
        Some(d) => Some(d),
        None => {
            out.push(issue(
                "dob_day",
                "Enter a real date of birth, with day, month and year, like 15 3 1960",
            ));
            None
        }
    };
    let postcode = ingest::normalise_postcode(&f.postcode);
    let district = postcode.split(' ').next().unwrap_or_default();
    if !crate::config::is_postcode_district(district) || !postcode.contains(' ') {
        out.push(issue("postcode", "Enter a real postcode, like BB9 7SR"));
    }
    let (phone, email) = (f.phone.trim(), f.email.trim());
    if phone.is_empty() && email.is_empty() {
        out.push(issue(
            "phone",
            "Enter a phone number or an email address, so that someone can get in touch",
        ));
    }
    if !phone.is_empty() && !phone_ok(phone) {
        out.push(issue(
            "phone",
            "Enter a phone number, like 01632 960 001 or 07700 900 982",
        ));
    }
    if !email.is_empty() && (!crate::config::email_ok(email) || email.len() > 254) {
        out.push(issue(
            "email",
            "Enter an email address in the right format, like name@example.com",
        ));
    }
    if f.needs.is_empty() {
        out.push(issue("needs", "Select what you would like help with"));
    } else if f.needs.iter().any(|n| cfg.need(n).is_none()) || f.needs.len() > cfg.needs.len() {
        out.push(issue(
            "needs",
            "Select from the list what you would like help with",
        ));
    }
    if f.more.chars().count() > 2000
        || f.more
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\r')
    {
        out.push(issue("more", "Tell us more in 2,000 characters or fewer"));
    }
    let nhs: String = f
        .nhs_number
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if !nhs.is_empty() && !ingest::nhs_number_valid(&nhs) {
        out.push(issue(
            "nhs_number",
            "Enter a 10 digit NHS number, like 485 777 3456, or leave it empty",
        ));
    }
    if !f.practice.is_empty() && cfg.practice(&f.practice).is_none() {
        out.push(issue(
            "practice",
            "Select a GP practice from the list, or 'I do not know'",
        ));
    }
    if !f.consent_share {
        out.push(issue(
            "consent_share",
            "We can only pass the referral on if you agree to share these details",
        ));
    }
    if f.consent_gp && f.practice.is_empty() {
        out.push(issue(
            "consent_gp",
            "Select the GP practice to tell, or untick this box",
        ));
    }
    match dob {
        Some(d) if out.is_empty() => Ok((d, postcode, (!nhs.is_empty()).then_some(nhs))),
        _ => Err(Error::Unprocessable(out)),
    }
}

impl Gateway {
    /// `POST /refer`: checks a self-referral, writes it as any referral is written, and
    /// returns its reference number. The same form sent again answers with the same
    /// reference and writes nothing.
    pub async fn self_refer(&self, f: &SelfReferral) -> Result<SelfReferred> {
        if !(16..=64).contains(&f.token.len())
            || !f.token.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(Error::Unprocessable(vec![issue(
                "token",
                "This form has expired. Reload the page and fill it in again",
            )]));
        }
        let cfg = &self.cfg;
        let now = Now::current();
        let (dob, postcode, nhs) = check(f, cfg, now.time.date())?;
        let carer = f.for_whom == "someone";
        crate::audit::set_self_referral(if carer { "carer" } else { "self" });
        let reference = reference_for(&f.token);
        let mut telecom = Vec::new();
        if !f.phone.trim().is_empty() {
            telecom.push(json!({ "system": "phone", "value": f.phone.trim(), "use": "home" }));
        }
        if !f.email.trim().is_empty() {
            telecom.push(json!({ "system": "email", "value": f.email.trim(), "use": "home" }));
        }
        let mut patient = json!({
            "resourceType": "Patient",
            "meta": { "profile": [fhir::PROFILE_PATIENT] },
            "name": [{ "use": "official", "family": f.family_name.trim(), "given": [f.given_name.trim()] }],
            "birthDate": dob.to_string(),
            "address": [{ "use": "home", "postalCode": postcode }],
            "telecom": telecom
        });
        if let Some(n) = &nhs {
            patient["identifier"] = json!([{ "system": fhir::NHS_NUMBER_SYSTEM, "value": n }]);
        }
        if !f.practice.is_empty() {
            patient["generalPractitioner"] = json!([fhir::practice_ref(cfg, &f.practice)]);
        }
        let needs: Vec<String> = f.needs.clone();
        let reason_codes = fhir::need_reason_codes(cfg, &needs);
        let codes: Vec<String> = needs
            .iter()
            .filter_map(|n| cfg.need(n))
            .flat_map(|n| n.snomed.iter().cloned())
            .collect();
        let mut sr = json!({
            "resourceType": "ServiceRequest",
            "meta": { "profile": [fhir::PROFILE_SERVICE_REQUEST] },
            "identifier": [{ "system": reference_system(), "value": reference }],
            "status": "active",
            "intent": "order",
            "category": [{ "coding": [{ "system": fhir::SNOMED, "code": fhir::CODE_PATIENT_REFERRAL, "display": "Patient referral" }] }],
            "priority": "routine",
            "code": { "coding": [{ "system": fhir::SNOMED, "code": fhir::CODE_SP_REFERRAL, "display": "Referral to social prescribing service" }] },
            "subject": { "reference": "Patient/{patient}" },
            "authoredOn": now.instant,
            "requester": { "reference": "Patient/{patient}" },
            "reasonCode": reason_codes
        });
        if carer {
            let mut related = json!({
                "resourceType": "RelatedPerson",
                "id": "carer",
                "patient": { "reference": "Patient/{patient}" },
                "relationship": [{ "text": f.carer_relationship.trim() }],
                "name": [{ "text": f.carer_name.trim() }]
            });
            if !f.carer_phone.trim().is_empty() {
                related["telecom"] = json!([{ "system": "phone", "value": f.carer_phone.trim() }]);
            }
            sr["contained"] = json!([related]);
            sr["requester"] = json!({ "reference": "#carer", "type": "RelatedPerson" });
        }
        let more = f.more.trim();
        if !more.is_empty() {
            sr["note"] = json!([{ "text": more, "time": now.instant }]);
        }
        if f.consent_gp {
            sr["extension"] =
                json!([{ "url": fhir::inform_gp_extension_url(), "valueBoolean": true }]);
        }
        let source = fhir::source_of_referral(if carer {
            fhir::SOURCE_CARER
        } else {
            fhir::SOURCE_SELF
        })
        .ok_or_else(|| Error::Internal("source-of-referral codes missing".into()))?;
        let practice = (f.consent_gp && !f.practice.is_empty()).then(|| f.practice.clone());
        let age = super::referral::age_of(Some(&dob.to_string()), &now);
        let district = postcode.split(' ').next().unwrap_or_default().to_string();
        // The form as sent, less the token: the same token with other answers is a conflict.
        let hash_input = json!({ "patient": patient, "serviceRequest": { "identifier": sr["identifier"], "requester": sr["requester"], "contained": sr["contained"], "reasonCode": sr["reasonCode"], "note": sr.pointer("/note/0/text"), "extension": sr["extension"] } });
        let template = sr;
        let plan = Plan {
            idem_keys: vec![super::referral::identifier_key(
                NAMESPACE,
                &reference_system(),
                &reference,
            )],
            hash: super::referral::hash_json(&hash_input),
            patient: PatientPlan::New { body: patient, nhs },
            make_sr: Box::new(move |patient_id, _provider| {
                let mut s = template.clone();
                let patient = json!({ "reference": format!("Patient/{patient_id}") });
                s["subject"] = patient.clone();
                if carer {
                    s["contained"][0]["patient"] = patient;
                } else {
                    s["requester"] = patient;
                }
                s
            }),
            identifier: Some(json!({ "system": reference_system(), "value": reference })),
            priority: Some("routine".into()),
            needs,
            codes,
            district,
            age,
            origin: Origin::new(NAMESPACE.into(), practice, None, source),
            triage: !cfg.refer.route_by_rules,
        };
        let Submitted { created, .. } = self.create(plan).await?;
        Ok(SelfReferred { reference, created })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_stable_readable_and_differ_by_token() {
        let a = reference_for("0123456789abcdef0123456789abcdef");
        assert_eq!(a, reference_for("0123456789abcdef0123456789abcdef"));
        assert_ne!(a, reference_for("0123456789abcdef0123456789abcdee"));
        assert_eq!(a.len(), 12);
        assert!(a.starts_with("SP-") && a.as_bytes()[7] == b'-');
        assert!(a[3..].bytes().all(|b| b == b'-' || ALPHABET.contains(&b)));
    }

    #[test]
    fn every_fault_is_named_by_its_field() {
        let cfg = Config::parse(crate::config::EMBEDDED_DEFAULT, "embedded").unwrap();
        let today = time::macros::date!(2026 - 11 - 22);
        let Err(Error::Unprocessable(issues)) = check(&SelfReferral::default(), &cfg, today) else {
            panic!("an empty form passed");
        };
        let fields: Vec<&str> = issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        for f in [
            "for_whom",
            "given_name",
            "family_name",
            "dob_day",
            "postcode",
            "phone",
            "needs",
            "consent_share",
        ] {
            assert!(fields.contains(&f), "{f} not named: {fields:?}");
        }
        let good = SelfReferral {
            for_whom: "me".into(),
            given_name: "Gail".into(),
            family_name: "Sample".into(),
            dob_day: "2".into(),
            dob_month: "3".into(),
            dob_year: "1950".into(),
            postcode: "bb97sr".into(),
            phone: "01282 000 000".into(),
            needs: vec!["loneliness".into()],
            consent_share: true,
            ..Default::default()
        };
        let (dob, pc, nhs) = check(&good, &cfg, today).expect("a good form");
        assert_eq!((dob.year(), pc.as_str(), nhs), (1950, "BB9 7SR", None));
        let mut future = good.clone();
        future.dob_year = "2027".into();
        assert!(check(&future, &cfg, today).is_err());
        let mut bad_nhs = good.clone();
        bad_nhs.nhs_number = "999 000 0019".into();
        assert!(check(&bad_nhs, &cfg, today).is_err());
        let mut gp_unknown = good;
        gp_unknown.consent_gp = true;
        assert!(check(&gp_unknown, &cfg, today).is_err());
    }
}
