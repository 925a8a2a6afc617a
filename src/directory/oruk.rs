//! Open Referral UK (ORUK, the UK profile of HSDS 3.0) → the directory's FHIR resources.
//!
//! Owns reading a feed (an ORUK API page `{"contents": [...]}`, a bare list, or one
//! service), checking each service against ORUK's published service schema
//! (`profiles/oruk/service.json`, CC BY-SA 4.0) and the rules the gateway needs on top
//! (usable ids, an organisation, taxonomies it knows), and mapping each accepted service to
//! a HealthcareService, its Organization and its Locations (`profiles/README.md`, "The
//! directory from ORUK"). A refused service is named with every reason; nothing of it is
//! mapped. Pure: it must not touch the store or the network.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::*;
use crate::config::{is_fhir_id, is_postcode_district, Config};
use crate::schema::{self, Validator};

/// ORUK's compiled service schema (draft 2020-12), as published.
const SERVICE_SCHEMA: &str = include_str!("../../profiles/oruk/service.json");

/// Services a feed may hold (a bigger directory is imported in parts).
pub const MAX_SERVICES: usize = 100_000;

/// The services of a feed, or why it is not one.
pub fn services_of(feed: &Value) -> Result<&[Value], String> {
    let list = match feed {
        Value::Array(a) => a.as_slice(),
        Value::Object(o) if o.contains_key("contents") => o
            .get("contents")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .ok_or("`contents` must be a list of services")?,
        Value::Object(o) if o.contains_key("id") && o.contains_key("name") => {
            std::slice::from_ref(feed)
        }
        _ => {
            return Err(
                "not an ORUK feed: expected an API page with `contents`, a list of services, or one service"
                    .into(),
            )
        }
    };
    if list.len() > MAX_SERVICES {
        return Err(format!(
            "{} services: at most {MAX_SERVICES} in one feed",
            list.len()
        ));
    }
    Ok(list)
}

/// ORUK's service schema, compiled.
pub fn validator() -> crate::error::Result<Validator> {
    let schema: Value = serde_json::from_str(SERVICE_SCHEMA)
        .map_err(|e| crate::error::Error::Internal(format!("ORUK service schema: {e}")))?;
    Validator::compile("https://sp-gateway.example.org/oruk/service.json", schema)
}

/// One service mapped: its resources, and what the import should say of it.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub id: String,
    pub service: Value,
    pub organization: Value,
    /// Its places and the postcode districts it covers.
    pub locations: Vec<Value>,
    /// What was read but not used (said in the report, not refused).
    pub notes: Vec<String>,
}

/// A service refused, and every reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Where in the feed: `contents[3]`.
    pub at: String,
    pub id: Option<String>,
    pub reasons: Vec<String>,
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A code as FHIR allows it: no leading or trailing space, single spaces inside.
fn code_of(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The CodeSystem URL the gateway gives an ORUK taxonomy.
pub fn taxonomy_system(name: &str) -> String {
    format!("{CANONICAL}/CodeSystem/oruk-taxonomy/{}", slug(name))
}

/// Postcode districts in a service area's text: every token must be one, else none.
fn districts_in(s: &str) -> Option<Vec<String>> {
    let tokens: Vec<String> = s
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_uppercase)
        .collect();
    (!tokens.is_empty() && tokens.iter().all(|t| is_postcode_district(t))).then_some(tokens)
}

/// The Location that stands for a postcode district.
pub fn district_location(district: &str) -> Value {
    json!({
        "resourceType": "Location",
        "id": district_location_id(district),
        "meta": { "profile": [PROFILE_LOCATION] },
        "status": "active",
        "name": format!("Postcode district {district}"),
        "mode": "kind",
        "physicalType": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "area", "display": "Area" }] },
        "address": { "postalCode": district, "country": "GB" }
    })
}

/// Checks and maps the service at `at` of a feed.
pub fn map_service(
    cfg: &Config,
    validator: &Validator,
    item: &Value,
    at: &str,
) -> Result<Mapped, Refusal> {
    let id = text(item, "id").map(str::to_string);
    let mut reasons: Vec<String> = schema::check(validator, item, at)
        .into_iter()
        .map(|i| {
            format!(
                "{}: {}",
                i.expression.unwrap_or_else(|| at.to_string()),
                i.diagnostics
            )
        })
        .collect();
    let refuse = |reasons: Vec<String>| Refusal {
        at: at.to_string(),
        id: id.clone(),
        reasons,
    };
    if !reasons.is_empty() {
        return Err(refuse(reasons));
    }
    let mut notes = Vec::new();
    match &id {
        None => reasons.push(format!("{at}.id: is required but missing")),
        Some(i) if !is_fhir_id(i) => reasons.push(format!(
            "{at}.id: `{i}` cannot be a FHIR id (letters, digits, '-' and '.', at most 64)"
        )),
        _ => {}
    }
    // The organisation: embedded (ORUK's API returns it with the service).
    let org = item.get("organization").filter(|o| o.is_object());
    let org_id = org.and_then(|o| text(o, "id"));
    match (org, org_id) {
        (None, _) => reasons.push(format!(
            "{at}.organization: the service has no organisation (every service must say who provides it)"
        )),
        (Some(_), None) => reasons.push(format!("{at}.organization.id: is required but missing")),
        (Some(_), Some(o)) if !is_fhir_id(o) && cfg.provider_for_oruk(o).is_none() => {
            reasons.push(format!("{at}.organization.id: `{o}` cannot be a FHIR id"))
        }
        _ => {}
    }
    if let (Some(o), Some(declared)) = (org_id, text(item, "organization_id")) {
        if o != declared {
            reasons.push(format!(
                "{at}.organization_id: names another organisation than the one embedded"
            ));
        }
    }
    // Categories: terms of the taxonomies the gateway knows.
    let mut needs = BTreeSet::new();
    let mut types = Vec::new();
    for (n, a) in item
        .get("attributes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(term) = a.get("taxonomy_term").filter(|t| t.is_object()) else {
            reasons.push(format!(
                "{at}.attributes[{n}]: its taxonomy term is not in the feed (only its id is given), so its taxonomy is unknown"
            ));
            continue;
        };
        let taxonomy = text(term, "taxonomy").or_else(|| text(term, "taxonomy_id"));
        let Some(known) =
            taxonomy.and_then(|t| cfg.directory.taxonomies.iter().find(|k| k.name == t))
        else {
            let known: Vec<&str> = cfg
                .directory
                .taxonomies
                .iter()
                .map(|k| k.name.as_str())
                .collect();
            reasons.push(format!(
                "{at}.attributes[{n}].taxonomy_term.taxonomy: unknown taxonomy `{}` (the gateway reads {})",
                taxonomy.unwrap_or("(none)"),
                if known.is_empty() { "none: [directory.taxonomies] is empty".to_string() } else { known.join(", ") }
            ));
            continue;
        };
        let keys = [text(term, "term"), text(term, "name"), text(term, "id")];
        let need = keys.iter().flatten().find_map(|k| known.terms.get(*k));
        let code = keys.iter().flatten().next().map(|k| code_of(k));
        if let Some(code) = code {
            let display = text(term, "name").unwrap_or(&code).to_string();
            types.push(json!({ "coding": [{ "system": taxonomy_system(&known.name), "code": code, "display": display }] }));
        }
        match need {
            Some(need) => {
                needs.insert(need.clone());
            }
            None => notes.push(format!(
                "{at}.attributes[{n}]: term `{}` of {} stands for no need category",
                code_of(keys.iter().flatten().next().unwrap_or(&"")),
                known.name
            )),
        }
    }
    // Places.
    let mut locations = Vec::new();
    let mut location_refs = Vec::new();
    for (n, sal) in item
        .get("service_at_locations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(loc) = sal.get("location").filter(|l| l.is_object()) else {
            notes.push(format!("{at}.service_at_locations[{n}]: no location given"));
            continue;
        };
        match text(loc, "id") {
            Some(lid) if is_fhir_id(lid) => {
                let (l, mut ln) = location(
                    loc,
                    lid,
                    &format!("{at}.service_at_locations[{n}].location"),
                );
                notes.append(&mut ln);
                location_refs.push(json!({ "reference": format!("Location/{lid}"), "display": text(loc, "name").unwrap_or(lid) }));
                locations.push(l);
            }
            Some(lid) => reasons.push(format!(
                "{at}.service_at_locations[{n}].location.id: `{lid}` cannot be a FHIR id"
            )),
            None => reasons.push(format!(
                "{at}.service_at_locations[{n}].location.id: is required but missing"
            )),
        }
    }
    // Service areas: postcode districts where the area says so; anything else is kept as
    // text and not routed by.
    let mut districts = BTreeSet::new();
    let mut coverage = Vec::new();
    for (n, area) in item
        .get("service_areas")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let found = [
            text(area, "extent").filter(|_| {
                text(area, "extent_type").is_none_or(|t| t.eq_ignore_ascii_case("text"))
            }),
            text(area, "name"),
            text(area, "service_area"),
        ]
        .into_iter()
        .flatten()
        .find_map(districts_in);
        match found {
            Some(ds) => districts.extend(ds),
            None => {
                let words = text(area, "name").or_else(|| text(area, "service_area"));
                if let Some(w) = words {
                    let short: String = w.chars().take(200).collect();
                    coverage.push(json!({ "display": short }));
                }
                notes.push(format!(
                    "{at}.service_areas[{n}]: not a list of postcode districts, so not routed by (kept as text)"
                ));
            }
        }
    }
    if !reasons.is_empty() {
        return Err(refuse(reasons));
    }
    let (Some(id), Some(org), Some(org_oruk)) = (id.clone(), org, org_id) else {
        return Err(refuse(vec![format!("{at}: incomplete")]));
    };
    let organization = organization(cfg, org, org_oruk);
    let org_fhir = organization["id"].as_str().unwrap_or(org_oruk).to_string();
    for d in &districts {
        coverage.insert(
            0,
            json!({ "reference": format!("Location/{}", district_location_id(d)), "display": format!("Postcode district {d}") }),
        );
        locations.push(district_location(d));
    }
    // District areas first, in district order.
    coverage.sort_by_key(|c| c.get("reference").is_none());
    let status = text(item, "status").unwrap_or("active");
    let mut exts = vec![json!({ "url": ext_oruk_status(), "valueCode": status })];
    match text(item, "assured_date") {
        Some(d) if crate::ingest::parse_date(d).is_some() => {
            exts.insert(0, json!({ "url": ext_assured(), "valueDate": d }))
        }
        Some(_) => notes.push(format!(
            "{at}.assured_date: not a date (YYYY-MM-DD), so the service is not assured"
        )),
        None => {}
    }
    let age = |k: &str| item.get(k).and_then(Value::as_u64).filter(|a| *a <= 150);
    if age("minimum_age").is_some() || age("maximum_age").is_some() {
        let mut range = json!({});
        for (k, part) in [("minimum_age", "low"), ("maximum_age", "high")] {
            if let Some(a) = age(k) {
                range[part] = json!({ "value": a, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a" });
            }
        }
        exts.push(json!({ "url": ext_age_range(), "valueRange": range }));
    }
    let mut hs = json!({
        "resourceType": "HealthcareService",
        "id": id,
        "meta": { "profile": [PROFILE_HEALTHCARE_SERVICE] },
        "extension": exts,
        "identifier": [{ "system": oruk_service_system(), "value": id }],
        "active": status == "active",
        "providedBy": { "reference": format!("Organization/{org_fhir}"), "display": organization["name"] },
        "name": text(item, "name").unwrap_or(&id)
    });
    let categories: Vec<Value> = needs
        .iter()
        .map(|n| {
            let display = cfg
                .needs
                .iter()
                .find(|x| &x.name == n)
                .map(|x| x.display.as_str())
                .unwrap_or(n);
            json!({ "coding": [{ "system": need_system(), "code": n, "display": display }] })
        })
        .collect();
    if !categories.is_empty() {
        hs["category"] = json!(categories);
    }
    if !types.is_empty() {
        hs["type"] = json!(types);
    }
    if !location_refs.is_empty() {
        hs["location"] = json!(location_refs);
    }
    if let Some(d) = text(item, "description") {
        hs["comment"] = json!(d);
    }
    let telecom: Vec<Value> = [("email", text(item, "email")), ("url", text(item, "url"))]
        .into_iter()
        .filter_map(|(sys, v)| v.map(|v| json!({ "system": sys, "value": v })))
        .collect();
    if !telecom.is_empty() {
        hs["telecom"] = json!(telecom);
    }
    if !coverage.is_empty() {
        hs["coverageArea"] = json!(coverage);
    }
    if needs.is_empty() {
        notes.push(format!(
            "{at}: no category stands for a need, so routing does not choose it by need"
        ));
    }
    Ok(Mapped {
        id,
        service: hs,
        organization,
        locations,
        notes,
    })
}

/// An ORUK organisation as an Organization: a linked provider's id, else its own.
fn organization(cfg: &Config, org: &Value, oruk_id: &str) -> Value {
    let provider = cfg.provider_for_oruk(oruk_id);
    let id = provider.map(|p| p.id.as_str()).unwrap_or(oruk_id);
    let mut identifiers = vec![json!({ "system": oruk_organization_system(), "value": oruk_id })];
    if let Some(p) = provider {
        identifiers.push(json!({ "system": format!("{CANONICAL}/Id/provider"), "value": p.id }));
    }
    for i in org
        .get("organization_identifiers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(scheme), Some(value)) = (text(i, "identifier_scheme"), text(i, "identifier")) {
            identifiers.push(json!({ "system": format!("https://org-id.guide/list/{}", slug(scheme).to_ascii_uppercase()), "value": value }));
        }
    }
    let mut o = json!({
        "resourceType": "Organization",
        "id": id,
        "meta": { "profile": [crate::fhir::PROFILE_ORGANIZATION] },
        "identifier": identifiers,
        "active": true,
        "name": text(org, "name").unwrap_or(oruk_id)
    });
    let telecom: Vec<Value> = [("email", text(org, "email")), ("url", text(org, "website"))]
        .into_iter()
        .filter_map(|(sys, v)| v.map(|v| json!({ "system": sys, "value": v })))
        .collect();
    if !telecom.is_empty() {
        o["telecom"] = json!(telecom);
    }
    o
}

/// An ORUK location as a Location (one address: the first physical one, else the first).
fn location(loc: &Value, id: &str, at: &str) -> (Value, Vec<String>) {
    let mut notes = Vec::new();
    let virtual_ = text(loc, "location_type") == Some("virtual");
    let mut l = json!({
        "resourceType": "Location",
        "id": id,
        "meta": { "profile": [PROFILE_LOCATION] },
        "identifier": [{ "system": oruk_location_system(), "value": id }],
        "status": "active",
        "name": text(loc, "name").unwrap_or(id),
        "mode": "instance",
        "physicalType": { "coding": [if virtual_ {
            json!({ "system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "vi", "display": "Virtual" })
        } else {
            json!({ "system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "bu", "display": "Building" })
        }] }
    });
    if let Some(d) = text(loc, "description") {
        l["description"] = json!(d);
    }
    let addresses: Vec<&Value> = loc
        .get("addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let addr = addresses
        .iter()
        .find(|a| text(a, "address_type") == Some("physical"))
        .or(addresses.first());
    if let Some(a) = addr {
        let mut out = json!({});
        let lines: Vec<&str> = ["address_1", "address_2"]
            .iter()
            .filter_map(|k| text(a, k))
            .collect();
        if !lines.is_empty() {
            out["line"] = json!(lines);
        }
        for (k, f) in [
            ("city", "city"),
            ("region", "district"),
            ("state_province", "state"),
            ("postal_code", "postalCode"),
            ("country", "country"),
        ] {
            if let Some(v) = text(a, k) {
                out[f] = json!(v);
            }
        }
        l["address"] = out;
    }
    let lat = loc.get("latitude").and_then(Value::as_f64);
    let long = loc.get("longitude").and_then(Value::as_f64);
    match (lat, long) {
        (Some(la), Some(lo)) if (-90.0..=90.0).contains(&la) && (-180.0..=180.0).contains(&lo) => {
            l["position"] = json!({ "latitude": la, "longitude": lo });
        }
        (Some(_), Some(_)) => notes.push(format!(
            "{at}: latitude or longitude out of range, left out"
        )),
        _ => {}
    }
    (l, notes)
}
