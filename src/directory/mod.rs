//! The directory of trusted services, as FHIR: what a HealthcareService, Location or
//! Organization of the directory says, and what routing reads from it.
//!
//! Owns the directory's FHIR shape (the gateway's extensions for assurance, age range,
//! ORUK status and retirement; the Gravity capacity status), the routing facts read back
//! from a stored HealthcareService ([`Service`]), and the snapshot of those facts that
//! routing and directory searches use ([`Directory`]). `oruk` maps an Open Referral UK
//! feed to these resources. This module is pure: it must not touch the store (the
//! `gateway::directory` use cases read and write it) nor know HTTP.

pub mod oruk;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::config::Config;
use crate::fhir::CANONICAL;

pub use crate::fhir::{PROFILE_HEALTHCARE_SERVICE, PROFILE_LOCATION};

/// Gravity's (HL7 SDOH Clinical Care) capacity status extension on HealthcareService: a
/// complex extension whose `capacityStatus` part carries a code of [`CAPACITY_SYSTEM`].
pub const EXT_CAPACITY: &str = "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/SDOHCC-ExtensionHealthcareServiceCapacityStatus";
pub const CAPACITY_SYSTEM: &str =
    "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes";

/// The types the directory holds: not patient data, read by every authenticated client.
pub const TYPES: [&str; 3] = ["HealthcareService", "Location", "Organization"];

pub fn ext_assured() -> String {
    format!("{CANONICAL}/StructureDefinition/assured-date")
}
pub fn ext_age_range() -> String {
    format!("{CANONICAL}/StructureDefinition/age-range")
}
pub fn ext_oruk_status() -> String {
    format!("{CANONICAL}/StructureDefinition/oruk-status")
}
pub fn ext_retired() -> String {
    format!("{CANONICAL}/StructureDefinition/retired")
}
/// HealthcareService.category: the gateway's need categories (config `[[needs]]`).
pub fn need_system() -> String {
    format!("{CANONICAL}/CodeSystem/need-category")
}
/// Identifier systems of what came from ORUK.
pub fn oruk_service_system() -> String {
    format!("{CANONICAL}/Id/oruk-service")
}
pub fn oruk_organization_system() -> String {
    format!("{CANONICAL}/Id/oruk-organization")
}
pub fn oruk_location_system() -> String {
    format!("{CANONICAL}/Id/oruk-location")
}

/// The Location that stands for a postcode district (shared by every service there).
pub fn district_location_id(district: &str) -> String {
    format!("district-{district}")
}

/// A provider's own statement of whether it can take referrals (Gravity's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityStatus {
    Capacity,
    NoCapacity,
    Waitlist,
}

impl CapacityStatus {
    pub const ALL: [CapacityStatus; 3] = [
        CapacityStatus::Capacity,
        CapacityStatus::NoCapacity,
        CapacityStatus::Waitlist,
    ];

    pub fn code(self) -> &'static str {
        match self {
            CapacityStatus::Capacity => "capacity",
            CapacityStatus::NoCapacity => "no-capacity",
            CapacityStatus::Waitlist => "waitlist",
        }
    }

    pub fn display(self) -> &'static str {
        match self {
            CapacityStatus::Capacity => "Has Capacity",
            CapacityStatus::NoCapacity => "No Capacity",
            CapacityStatus::Waitlist => "No Capacity - Has Waitlist",
        }
    }

    pub fn parse(code: &str) -> Option<CapacityStatus> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The extension that records it on a HealthcareService.
    pub fn extension(self) -> Value {
        json!({
            "url": EXT_CAPACITY,
            "extension": [{
                "url": "capacityStatus",
                "valueCodeableConcept": { "coding": [{ "system": CAPACITY_SYSTEM, "code": self.code(), "display": self.display() }] }
            }]
        })
    }

    /// The status a HealthcareService records, if any (a code given as `valueCode`,
    /// `valueCoding` or `valueCodeableConcept`).
    pub fn of(service: &Value) -> Option<Result<CapacityStatus, String>> {
        let ext = extensions(service).find(|e| url_is(e, EXT_CAPACITY))?;
        let part = extensions(ext).find(|e| url_is(e, "capacityStatus"));
        let code = part.and_then(|p| {
            p.get("valueCode")
                .or_else(|| p.pointer("/valueCoding/code"))
                .or_else(|| p.pointer("/valueCodeableConcept/coding/0/code"))
                .and_then(Value::as_str)
        });
        Some(match code.and_then(CapacityStatus::parse) {
            Some(c) => Ok(c),
            None => Err(format!(
                "the capacity status must be one of {}",
                Self::ALL.map(|c| c.code()).join(", ")
            )),
        })
    }
}

fn extensions(v: &Value) -> impl Iterator<Item = &Value> {
    v.get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn url_is(e: &Value, url: &str) -> bool {
    e.get("url").and_then(Value::as_str) == Some(url)
}

fn ext_value<'a>(v: &'a Value, url: &str, key: &str) -> Option<&'a Value> {
    extensions(v).find(|e| url_is(e, url))?.get(key)
}

/// Replaces (or, with `None`, removes) the extension with `url`.
pub fn set_extension(resource: &mut Value, url: &str, ext: Option<Value>) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let mut list: Vec<Value> = obj
        .get("extension")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    list.retain(|e| !url_is(e, url));
    list.extend(ext);
    if list.is_empty() {
        obj.remove("extension");
    } else {
        obj.insert("extension".into(), Value::Array(list));
    }
}

/// What routing and searches read of one HealthcareService.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub id: String,
    pub name: String,
    /// Its Organization's id (a provider's id when the organisation is linked to one).
    pub organization: String,
    pub active: bool,
    /// ORUK status (`active`, `inactive`, `defunct`, `temporarily closed`) or `retired`.
    pub status: String,
    pub assured: Option<time::Date>,
    /// Need categories from its categories (before any local override).
    pub needs: Vec<String>,
    /// Postcode districts of its coverage areas (before any local override).
    pub districts: Vec<String>,
    pub min_age: Option<u32>,
    pub max_age: Option<u32>,
    pub capacity: Option<CapacityStatus>,
    /// `system|code` of every category and type coding (for `service-category`,
    /// `service-type`).
    pub categories: Vec<(String, String)>,
    pub types: Vec<(String, String)>,
    /// Referenced Location ids: coverage areas and places.
    pub coverage: Vec<String>,
    pub locations: Vec<String>,
}

fn codings(v: &Value, element: &str) -> Vec<(String, String)> {
    v.get(element)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|cc| cc.get("coding").and_then(Value::as_array))
        .flatten()
        .filter_map(|c| {
            Some((
                c.get("system")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                c.get("code")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

fn location_refs(v: &Value, element: &str) -> Vec<String> {
    v.get(element)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| crate::fhir::ref_id(r, "Location"))
        .map(str::to_string)
        .collect()
}

impl Service {
    /// Reads a stored HealthcareService.
    pub fn of(hs: &Value) -> Service {
        let s = |p: &str| hs.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let age = |k: &str| {
            ext_value(hs, &ext_age_range(), "valueRange")
                .and_then(|r| r.pointer(&format!("/{k}/value")))
                .and_then(Value::as_u64)
                .and_then(|a| u32::try_from(a).ok())
        };
        let categories = codings(hs, "category");
        let coverage = location_refs(hs, "coverageArea");
        let retired = ext_value(hs, &ext_retired(), "valueDate").is_some();
        Service {
            id: s("/id").to_string(),
            name: s("/name").to_string(),
            organization: hs
                .get("providedBy")
                .and_then(|r| crate::fhir::ref_id(r, "Organization"))
                .unwrap_or_default()
                .to_string(),
            active: hs.get("active").and_then(Value::as_bool).unwrap_or(false),
            status: if retired {
                "retired".into()
            } else {
                ext_value(hs, &ext_oruk_status(), "valueCode")
                    .and_then(Value::as_str)
                    .unwrap_or("active")
                    .to_string()
            },
            assured: ext_value(hs, &ext_assured(), "valueDate")
                .and_then(Value::as_str)
                .and_then(crate::ingest::parse_date),
            needs: categories
                .iter()
                .filter(|(sys, _)| *sys == need_system())
                .map(|(_, c)| c.clone())
                .collect(),
            districts: coverage
                .iter()
                .filter_map(|l| l.strip_prefix("district-"))
                .map(str::to_string)
                .collect(),
            min_age: age("low"),
            max_age: age("high"),
            capacity: CapacityStatus::of(hs).and_then(Result::ok),
            categories,
            types: codings(hs, "type"),
            coverage,
            locations: location_refs(hs, "location"),
        }
    }
}

/// What searches read of one Location.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    pub id: String,
    pub name: String,
    pub postcode: Option<String>,
    pub organization: Option<String>,
}

impl Place {
    pub fn of(loc: &Value) -> Place {
        let s = |p: &str| loc.pointer(p).and_then(Value::as_str).map(str::to_string);
        Place {
            id: s("/id").unwrap_or_default(),
            name: s("/name").unwrap_or_default(),
            postcode: s("/address/postalCode"),
            organization: loc
                .get("managingOrganization")
                .and_then(|r| crate::fhir::ref_id(r, "Organization"))
                .map(str::to_string),
        }
    }
}

/// Every directory service and place, as facts: what routing and directory searches read
/// (the resources themselves stay in the store).
#[derive(Debug, Clone, Default)]
pub struct Directory {
    pub services: BTreeMap<String, Service>,
    pub places: BTreeMap<String, Place>,
}

/// A directory service as routing sees it: its facts with the config's local fields
/// applied.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub service: &'a Service,
    pub needs: Vec<String>,
    pub districts: Vec<String>,
    pub practices: Vec<String>,
    pub priority: u32,
}

impl Directory {
    /// A service with the config's local fields (need mapping, areas, practices, priority).
    pub fn candidate<'a>(&'a self, cfg: &Config, id: &str) -> Option<Candidate<'a>> {
        let service = self.services.get(id)?;
        let local = cfg.local_service(id);
        Some(Candidate {
            service,
            needs: local
                .and_then(|l| l.needs.clone())
                .unwrap_or_else(|| service.needs.clone()),
            districts: local
                .and_then(|l| l.areas.clone())
                .unwrap_or_else(|| service.districts.clone()),
            practices: local.map(|l| l.practices.clone()).unwrap_or_default(),
            priority: local.and_then(|l| l.priority).unwrap_or(100),
        })
    }

    /// Every service in routing order: local priority, then name, then id.
    pub fn in_order<'a>(&'a self, cfg: &Config) -> Vec<Candidate<'a>> {
        let mut all: Vec<Candidate<'a>> = self
            .services
            .keys()
            .filter_map(|id| self.candidate(cfg, id))
            .collect();
        all.sort_by(|a, b| {
            (a.priority, &a.service.name, &a.service.id).cmp(&(
                b.priority,
                &b.service.name,
                &b.service.id,
            ))
        });
        all
    }
}

/// Whether `assured` is within `months` of `today` (0 months: assurance not required).
pub fn assured_recently(assured: Option<time::Date>, months: u32, today: time::Date) -> bool {
    if months == 0 {
        return true;
    }
    let Some(a) = assured else {
        return false;
    };
    // The same day `months` later, clamped to the month's last day.
    let total = a.year() * 12 + i32::from(u8::from(a.month())) - 1 + months as i32;
    let (y, m) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u8);
    let Ok(month) = time::Month::try_from(m) else {
        return false;
    };
    let last = month.length(y);
    let until = time::Date::from_calendar_date(y, month, a.day().min(last));
    until.is_ok_and(|u| today <= u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn assurance_window_is_calendar_months() {
        let a = Some(date!(2025 - 08 - 31));
        assert!(assured_recently(a, 12, date!(2026 - 08 - 31)));
        assert!(!assured_recently(a, 12, date!(2026 - 09 - 01)));
        assert!(assured_recently(a, 6, date!(2026 - 02 - 28)));
        assert!(!assured_recently(a, 6, date!(2026 - 03 - 01)));
        assert!(!assured_recently(None, 12, date!(2026 - 01 - 01)));
        assert!(assured_recently(None, 0, date!(2026 - 01 - 01)));
    }

    #[test]
    fn capacity_status_round_trips_through_its_extension() {
        for c in CapacityStatus::ALL {
            let hs = json!({ "extension": [c.extension()] });
            assert_eq!(CapacityStatus::of(&hs), Some(Ok(c)));
        }
        let bad = json!({ "extension": [{ "url": EXT_CAPACITY, "extension": [{ "url": "capacityStatus", "valueCode": "full" }] }] });
        assert!(matches!(CapacityStatus::of(&bad), Some(Err(_))));
        assert_eq!(CapacityStatus::of(&json!({})), None);
    }
}
