//! FHIR mapping and resource rules.
//!
//! Owns: the code systems and profiles the gateway uses; building UK Core Patient,
//! ServiceRequest and Task from a checked referral (DESIGN §5); the "declined" Observation;
//! Organization resources for the configured directory; checking provider Observations and
//! the parts of a Task a client may not change. Resources are `serde_json::Value` so that
//! what a client sent is stored as sent; their structure is checked by the R4 JSON Schema
//! (`schema`) and FHIR's cardinality rules (`cardinality`).
//!
//! It must not read or write the store, and knows nothing of HTTP or roles.

use serde_json::{json, Map, Value};

use crate::cardinality;
use crate::config::{Config, Provider};
use crate::error::{Error, Issue, Result};
use crate::ingest::CheckedReferral;
use crate::routing::Decision;
use crate::schema;

pub const SNOMED: &str = "http://snomed.info/sct";
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
pub const TASK_CODE_SYSTEM: &str = "http://hl7.org/fhir/CodeSystem/task-code";
/// FHIR R4 Task.status codes (the TaskStatus value set).
pub const TASK_STATUSES: [&str; 12] = [
    "draft",
    "requested",
    "received",
    "accepted",
    "rejected",
    "ready",
    "cancelled",
    "in-progress",
    "on-hold",
    "failed",
    "completed",
    "entered-in-error",
];

/// FHIR R4 ServiceRequest.status codes (the RequestStatus value set).
pub const REQUEST_STATUSES: [&str; 7] = [
    "draft",
    "active",
    "on-hold",
    "revoked",
    "completed",
    "entered-in-error",
    "unknown",
];

/// Canonical base of what this gateway publishes (CodeSystems, extensions, identifiers).
pub const CANONICAL: &str = "https://sp-gateway.example.org/fhir";

pub const PROFILE_PATIENT: &str = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient";
pub const PROFILE_SERVICE_REQUEST: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/UKCore-ServiceRequest";
pub const PROFILE_TASK: &str = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Task";
pub const PROFILE_OBSERVATION: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Observation";
pub const PROFILE_ORGANIZATION: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Organization";

pub const PROFILE_HEALTHCARE_SERVICE: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/UKCore-HealthcareService";
pub const PROFILE_LOCATION: &str = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Location";

pub const CODE_SP_REFERRAL: &str = "871731000000106";
pub const CODE_SP_DECLINED: &str = "871711000000103";
pub const CODE_PATIENT_REFERRAL: &str = "3457005";

pub fn task_reason_system() -> String {
    format!("{CANONICAL}/CodeSystem/task-status-reason")
}
pub const PATIENT_DECLINED: &str = "patient-declined";
/// Task rejection reasons that send the referral on to the fallback hub.
pub const NO_CAPACITY: &str = "no-capacity";
pub const NOT_ELIGIBLE: &str = "not-eligible";

pub fn feedback_system() -> String {
    format!("{CANONICAL}/CodeSystem/feedback")
}
pub const LINK_WORKER_FEEDBACK: &str = "link-worker-feedback";

pub fn routing_extension_url() -> String {
    format!("{CANONICAL}/StructureDefinition/routing-decision")
}

/// UK Core's extension on ServiceRequest for where a referral came from (its source of
/// referral), carrying a code of [`source_of_referral_system`].
pub const EXT_SOURCE_OF_REFERRAL: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-SourceOfServiceRequest";

/// The CodeSystem of NHS Data Dictionary "source of referral" codes that the gateway records
/// (`profiles/CodeSystem-source-of-referral.json`). The Data Dictionary publishes no FHIR
/// CodeSystem for them, so the gateway names its own.
pub fn source_of_referral_system() -> String {
    format!("{CANONICAL}/CodeSystem/source-of-referral")
}

/// One NHS Data Dictionary "source of referral" code the gateway records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceOfReferral {
    pub code: &'static str,
    pub display: &'static str,
}

const fn sor(code: &'static str, display: &'static str) -> SourceOfReferral {
    SourceOfReferral { code, display }
}

/// The source-of-referral codes a referral may carry: the NHS Data Dictionary's SOURCE OF
/// REFERRAL FOR MENTAL HEALTH SERVICES codes (the list MHSDS and NHS Talking Therapies
/// use) that fit who refers to social prescribing. `profiles/README.md` says where they
/// were taken from.
pub const SOURCES_OF_REFERRAL: [SourceOfReferral; 17] = [
    sor(
        "A1",
        "Primary Health Care: General Medical Practitioner Practice",
    ),
    sor("A2", "Primary Health Care: Health Visitor"),
    sor("A3", "Other Primary Health Care"),
    sor("B1", "Self Referral: Self"),
    sor("B2", "Self Referral: Carer/Relative"),
    sor(
        "C1",
        "Local Authority and Other Public Services: Social Services",
    ),
    sor(
        "C2",
        "Local Authority and Other Public Services: Education Service / Educational Establishment",
    ),
    sor(
        "C3",
        "Local Authority and Other Public Services: Housing Service",
    ),
    sor("D1", "Employer"),
    sor("E1", "Justice System: Police"),
    sor("E3", "Justice System: Probation Service"),
    sor("G4", "Voluntary Sector"),
    sor("H1", "Acute Secondary Care: Emergency Care Department"),
    sor("H2", "Other secondary care specialty"),
    sor("M5", "Other: Jobcentre Plus"),
    sor("M6", "Other SERVICE or agency"),
    sor("P1", "Internal Referral"),
];

/// Referrals from a GP practice.
pub const SOURCE_GP: &str = "A1";
/// A person referring themselves.
pub const SOURCE_SELF: &str = "B1";
/// A carer or relative referring someone.
pub const SOURCE_CARER: &str = "B2";

pub fn source_of_referral(code: &str) -> Option<SourceOfReferral> {
    SOURCES_OF_REFERRAL.iter().copied().find(|s| s.code == code)
}

/// The extension recording a referral's source of referral.
pub fn source_of_referral_ext(s: SourceOfReferral) -> Value {
    json!({
        "url": EXT_SOURCE_OF_REFERRAL,
        "valueCodeableConcept": { "coding": [{
            "system": source_of_referral_system(),
            "code": s.code,
            "display": s.display
        }] }
    })
}

/// The source-of-referral code a ServiceRequest carries, if any (of the gateway's system).
pub fn source_of_referral_of(sr: &Value) -> Option<&str> {
    let system = source_of_referral_system();
    sr.get("extension")?
        .as_array()?
        .iter()
        .filter(|e| e.get("url").and_then(Value::as_str) == Some(EXT_SOURCE_OF_REFERRAL))
        .filter_map(|e| e.pointer("/valueCodeableConcept/coding")?.as_array())
        .flatten()
        .find(|c| c.get("system").and_then(Value::as_str) == Some(system.as_str()))
        .and_then(|c| c.get("code")?.as_str())
}

/// The gateway's extension on a referral's ServiceRequest and Task that did not come from a
/// GP practice: which referring client sent it (`referrer`), and the GP practice the person
/// agreed may be told of it (`informedPractice`; absent: no practice sees it). Set by the
/// gateway only; a referral that arrives with it is refused.
pub fn referral_scope_extension_url() -> String {
    format!("{CANONICAL}/StructureDefinition/referral-scope")
}

/// The gateway's extension on a ServiceRequest from a referrer that is not a GP practice:
/// `valueBoolean` true when the person agreed that their GP practice may be told of the
/// referral and its outcome (absent or false: the practice is not told).
pub fn inform_gp_extension_url() -> String {
    format!("{CANONICAL}/StructureDefinition/inform-gp")
}

/// Whether a ServiceRequest says the person agreed their GP practice may be told.
pub fn consents_to_inform_gp(sr: &Value) -> bool {
    let url = inform_gp_extension_url();
    sr.get("extension")
        .and_then(Value::as_array)
        .is_some_and(|es| {
            es.iter().any(|e| {
                e.get("url").and_then(Value::as_str) == Some(url.as_str())
                    && e.get("valueBoolean") == Some(&Value::Bool(true))
            })
        })
}

/// Identifier system of the gateway's configured clients (`[[clients]] id`).
pub fn client_id_system() -> String {
    format!("{CANONICAL}/Id/client")
}

/// The `referral-scope` extension: the referring client (none for a self-referral from
/// the public page) and the practice told (none without the person's consent).
pub fn referral_scope_ext(cfg: &Config, referrer: Option<&str>, practice: Option<&str>) -> Value {
    let mut parts = Vec::new();
    if let Some(referrer) = referrer {
        parts.push(json!({
            "url": "referrer",
            "valueIdentifier": { "system": client_id_system(), "value": referrer }
        }));
    }
    if let Some(ods) = practice {
        parts.push(json!({ "url": "informedPractice", "valueReference": practice_ref(cfg, ods) }));
    }
    if parts.is_empty() {
        // Nobody but the provider: an extension needs a value or parts, so it says so.
        return json!({ "url": referral_scope_extension_url(), "valueCode": "provider-only" });
    }
    json!({ "url": referral_scope_extension_url(), "extension": parts })
}

/// The `referral-scope` extension of a ServiceRequest or Task, if it has one.
pub fn referral_scope_of(resource: &Value) -> Option<&Value> {
    let url = referral_scope_extension_url();
    resource
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url.as_str()))
}

/// Who besides its owner may see a referral's ServiceRequest or Task: its GP practice (the
/// referring practice, or the one the person agreed may be told) and the referring client
/// when that was not a GP system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Parties<'a> {
    pub practice: Option<&'a str>,
    pub referrer: Option<&'a str>,
}

/// The [`Parties`] of a ServiceRequest or Task: from the gateway's `referral-scope`
/// extension when it has one, else (a GP practice's referral) the requester's practice.
pub fn parties_of(resource: &Value) -> Parties<'_> {
    match referral_scope_of(resource) {
        Some(ext) => {
            let part = |name: &str| {
                ext.get("extension")
                    .and_then(Value::as_array)
                    .and_then(|ps| {
                        ps.iter()
                            .find(|p| p.get("url").and_then(Value::as_str) == Some(name))
                    })
            };
            Parties {
                practice: part("informedPractice")
                    .and_then(|p| p.get("valueReference"))
                    .and_then(|r| ref_id(r, "Organization")),
                referrer: part("referrer")
                    .and_then(|p| p.pointer("/valueIdentifier/value"))
                    .and_then(Value::as_str),
            }
        }
        None => Parties {
            practice: resource.get("requester").and_then(ods_of),
            referrer: None,
        },
    }
}

/// Identifier system for GP referral ids: one per practice, since ids are unique only there.
pub fn referral_id_system(ods: &str) -> String {
    format!("{CANONICAL}/Id/gp-referral/{ods}")
}

pub fn org_ref(id: &str, display: &str) -> Value {
    json!({ "reference": format!("Organization/{id}"), "display": display })
}

pub fn practice_ref(cfg: &Config, ods: &str) -> Value {
    let name = cfg.practice(ods).map(|p| p.name.as_str()).unwrap_or(ods);
    json!({
        "reference": format!("Organization/{ods}"),
        "identifier": { "system": ODS_SYSTEM, "value": ods },
        "display": name
    })
}

pub fn provider_ref(p: &Provider) -> Value {
    org_ref(&p.id, &p.name)
}

/// The profile the gateway claims for a resource type it stores.
pub fn profile_for(rtype: &str) -> Option<&'static str> {
    Some(match rtype {
        "Patient" => PROFILE_PATIENT,
        "ServiceRequest" => PROFILE_SERVICE_REQUEST,
        "Task" => PROFILE_TASK,
        "Observation" => PROFILE_OBSERVATION,
        "Organization" => PROFILE_ORGANIZATION,
        "HealthcareService" => PROFILE_HEALTHCARE_SERVICE,
        "Location" => PROFILE_LOCATION,
        _ => return None,
    })
}

/// Sets the server-owned elements: `id` and `meta` (versionId, lastUpdated, and the
/// gateway's profile for the type). Whatever `meta` the client sent is replaced.
pub fn stamp(resource: &mut Value, id: &str, version: u64, last_updated: &str) {
    let rtype = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(obj) = resource.as_object_mut() {
        obj.insert("id".into(), Value::String(id.to_string()));
        let mut meta = Map::new();
        meta.insert("versionId".into(), Value::String(version.to_string()));
        meta.insert(
            "lastUpdated".into(),
            Value::String(last_updated.to_string()),
        );
        if let Some(p) = profile_for(&rtype) {
            meta.insert("profile".into(), json!([p]));
        }
        obj.insert("meta".into(), Value::Object(meta));
    }
}

pub fn version_of(resource: &Value) -> u64 {
    resource
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub fn last_updated_of(resource: &Value) -> &str {
    resource
        .pointer("/meta/lastUpdated")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The id part of a literal reference `Type/id` when its type is `rtype`.
pub fn ref_id<'a>(reference: &'a Value, rtype: &str) -> Option<&'a str> {
    let r = reference.get("reference")?.as_str()?;
    let id = r.strip_prefix(rtype)?.strip_prefix('/')?;
    crate::config::is_fhir_id(id).then_some(id)
}

/// UK Core Patient from a referral.
pub fn patient(c: &CheckedReferral, cfg: &Config) -> Value {
    let p = &c.referral.patient;
    let mut telecom = Vec::new();
    let preferred = p.preferred_contact.as_deref();
    if let Some(phone) = &p.phone {
        let rank = if matches!(preferred, Some("phone" | "sms")) {
            1
        } else {
            2
        };
        telecom.push(json!({ "system": "phone", "value": phone, "use": "home", "rank": rank }));
    }
    if let Some(email) = &p.email {
        let rank = if preferred == Some("email") { 1 } else { 2 };
        telecom.push(json!({ "system": "email", "value": email, "use": "home", "rank": rank }));
    }
    let mut out = json!({
        "resourceType": "Patient",
        "meta": { "profile": [PROFILE_PATIENT] },
        "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": p.nhs_number }],
        "name": [{ "use": "official", "family": p.family_name, "given": [p.given_name] }],
        "gender": p.gender,
        "birthDate": p.birth_date,
        "address": [{ "use": "home", "postalCode": c.postcode }],
        "generalPractitioner": [practice_ref(cfg, &c.referral.practice.ods_code)]
    });
    if !telecom.is_empty() {
        out["telecom"] = Value::Array(telecom);
    }
    if let Some(lang) = &p.interpreter_language {
        out["communication"] = json!([{
            "language": { "coding": [{ "system": "urn:ietf:bcp:47", "code": lang }] },
            "preferred": true
        }]);
        out["extension"] = json!([{
            "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSCommunication",
            "extension": [
                { "url": "language", "valueCodeableConcept": { "coding": [{ "system": "urn:ietf:bcp:47", "code": lang }] } },
                { "url": "interpreterRequired", "valueBoolean": true }
            ]
        }]);
    }
    out
}

/// A ServiceRequest's `reasonCode`s for need categories: each category's SNOMED CT codes,
/// with the category's own words as text.
pub fn need_reason_codes(cfg: &Config, needs: &[String]) -> Vec<Value> {
    needs
        .iter()
        .filter_map(|n| cfg.need(n))
        .map(|n| {
            let coding: Vec<Value> = n
                .snomed
                .iter()
                .map(|code| json!({ "system": SNOMED, "code": code }))
                .collect();
            json!({ "coding": coding, "text": n.display })
        })
        .collect()
}

/// UK Core ServiceRequest from a referral.
pub fn service_request(
    c: &CheckedReferral,
    cfg: &Config,
    patient_id: &str,
    provider: &Provider,
) -> Value {
    let r = &c.referral;
    let mut reason_codes = need_reason_codes(cfg, &r.needs);
    for reason in &r.reasons {
        let mut coding = json!({ "system": reason.system, "code": reason.code });
        if let Some(d) = &reason.display {
            coding["display"] = Value::String(d.clone());
        }
        reason_codes.push(json!({ "coding": [coding] }));
    }
    let mut out = json!({
        "resourceType": "ServiceRequest",
        "meta": { "profile": [PROFILE_SERVICE_REQUEST] },
        "identifier": [{
            "system": referral_id_system(&r.practice.ods_code),
            "value": r.referral_id,
            "assigner": practice_ref(cfg, &r.practice.ods_code)
        }],
        "status": "active",
        "intent": "order",
        "category": [{ "coding": [{ "system": SNOMED, "code": CODE_PATIENT_REFERRAL, "display": "Patient referral" }] }],
        "priority": r.urgency.as_str(),
        "code": { "coding": [{ "system": SNOMED, "code": CODE_SP_REFERRAL, "display": "Referral to social prescribing service" }] },
        "subject": { "reference": format!("Patient/{patient_id}") },
        "authoredOn": r.sent_at,
        "requester": practice_ref(cfg, &r.practice.ods_code),
        "performer": [provider_ref(provider)],
        "reasonCode": reason_codes
    });
    let mut author = r.referrer.name.clone();
    if let Some(role) = &r.referrer.role {
        author = format!("{author} ({role})");
    }
    if let Some(notes) = &r.notes {
        if !notes.trim().is_empty() {
            out["note"] = json!([{ "authorString": author, "time": r.sent_at, "text": notes }]);
        }
    }
    out
}

/// What a new Task is made from, whichever format the referral came in.
pub struct TaskSpec<'a> {
    /// The referral's identifier (copied from the ServiceRequest).
    pub identifier: Option<Value>,
    pub priority: Option<&'a str>,
    /// The referral's requester (copied from the ServiceRequest).
    pub requester: Value,
    /// The ServiceRequest's `referral-scope` extension, when it has one.
    pub scope: Option<Value>,
    pub patient_id: &'a str,
    pub sr_id: &'a str,
    pub provider: &'a Provider,
    pub decision: &'a Decision,
    pub now: &'a str,
}

/// The Task that carries the referral to its provider, recording the routing decision.
pub fn task(s: &TaskSpec<'_>) -> Value {
    let mut t = json!({
        "resourceType": "Task",
        "meta": { "profile": [PROFILE_TASK] },
        "extension": [{
            "url": routing_extension_url(),
            "extension": [
                { "url": "rule", "valueString": s.decision.rule },
                { "url": "reason", "valueString": s.decision.reason }
            ]
        }],
        "status": "requested",
        "intent": "order",
        "code": { "coding": [{ "system": TASK_CODE_SYSTEM, "code": "fulfill", "display": "Fulfill the focal request" }] },
        "focus": { "reference": format!("ServiceRequest/{}", s.sr_id) },
        "for": { "reference": format!("Patient/{}", s.patient_id) },
        "authoredOn": s.now,
        "lastModified": s.now,
        "requester": s.requester,
        "owner": provider_ref(s.provider)
    });
    if let Some((id, name)) = &s.decision.service {
        if let Some(parts) = t
            .pointer_mut("/extension/0/extension")
            .and_then(Value::as_array_mut)
        {
            parts.push(json!({ "url": "service", "valueReference": { "reference": format!("HealthcareService/{id}"), "display": name } }));
        }
    }
    if let (Some(scope), Some(exts)) = (&s.scope, t["extension"].as_array_mut()) {
        exts.push(scope.clone());
    }
    if let Some(id) = &s.identifier {
        let mut id = id.clone();
        if let Some(o) = id.as_object_mut() {
            o.remove("assigner");
        }
        t["identifier"] = json!([id]);
    }
    if let Some(p) = s.priority {
        t["priority"] = json!(p);
    }
    t
}

/// The Observation the gateway writes when a patient declines (SNOMED 871711000000103).
pub fn declined_observation(task: &Value, provider: &Provider, now: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "meta": { "profile": [PROFILE_OBSERVATION] },
        "status": "final",
        "code": { "coding": [{ "system": SNOMED, "code": CODE_SP_DECLINED, "display": "Social prescribing declined" }] },
        "subject": task.get("for").cloned().unwrap_or(Value::Null),
        "basedOn": [task.get("focus").cloned().unwrap_or(Value::Null)],
        "performer": [provider_ref(provider)],
        "effectiveDateTime": now,
        "issued": now
    })
}

/// Organization for a practice (by ODS code) or a provider (by its id).
pub fn organization(cfg: &Config, id: &str) -> Option<Value> {
    if let Some(p) = cfg.practice(id) {
        return Some(json!({
            "resourceType": "Organization",
            "id": p.ods,
            "meta": { "profile": [PROFILE_ORGANIZATION] },
            "identifier": [{ "system": ODS_SYSTEM, "value": p.ods }],
            "active": true,
            "type": [{ "coding": [{ "system": "https://fhir.nhs.uk/CodeSystem/organisation-role", "code": "76", "display": "GP PRACTICE" }] }],
            "name": p.name
        }));
    }
    cfg.provider(id).map(|p| {
        json!({
            "resourceType": "Organization",
            "id": p.id,
            "meta": { "profile": [PROFILE_ORGANIZATION] },
            "identifier": [{ "system": format!("{CANONICAL}/Id/provider"), "value": p.id }],
            "active": true,
            "name": p.name
        })
    })
}

/// The ODS code of a ServiceRequest's requester: its identifier (ODS system), or a literal
/// `Organization/{ODS code}` reference.
pub fn requester_ods(sr: &Value) -> Option<String> {
    ods_of(sr.get("requester")?).map(str::to_string)
}

/// The ODS code a reference names: its identifier when that is of the ODS system, else a
/// literal `Organization/{ODS code}`.
pub fn ods_of(r: &Value) -> Option<&str> {
    let code = if r.pointer("/identifier/system").and_then(Value::as_str) == Some(ODS_SYSTEM) {
        r.pointer("/identifier/value").and_then(Value::as_str)
    } else {
        ref_id(r, "Organization")
    };
    code.filter(|v| crate::config::is_ods_code(v))
}

fn has_coding(concept: Option<&Value>, system: &str, code: &str) -> bool {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(system)
                    && c.get("code").and_then(Value::as_str) == Some(code)
            })
        })
}

/// The gateway's rules for a social prescribing ServiceRequest (beyond the R4 schema): what
/// a new referral must carry for the loop to work.
pub fn service_request_rules(sr: &Value) -> Vec<Issue> {
    let mut issues = Vec::new();
    if sr.get("status").and_then(Value::as_str) != Some("active") {
        issues.push(Issue::new(
            "value",
            "ServiceRequest.status",
            "must be `active` for a new referral",
        ));
    }
    if sr.get("intent").and_then(Value::as_str) != Some("order") {
        issues.push(Issue::new(
            "value",
            "ServiceRequest.intent",
            "must be `order`",
        ));
    }
    if !has_coding(sr.get("code"), SNOMED, CODE_SP_REFERRAL) {
        issues.push(Issue::new(
            "code-invalid",
            "ServiceRequest.code",
            format!("must include {SNOMED}|{CODE_SP_REFERRAL} (Referral to social prescribing service): this gateway carries social prescribing referrals only"),
        ));
    }
    if sr
        .pointer("/subject/reference")
        .and_then(Value::as_str)
        .is_none()
    {
        issues.push(Issue::new(
            "required",
            "ServiceRequest.subject",
            "must reference the Patient",
        ));
    }
    if sr.get("requester").is_none() {
        issues.push(Issue::new(
            "required",
            "ServiceRequest.requester",
            format!("must say who is referring: a GP practice by ODS code (identifier system {ODS_SYSTEM}, or reference Organization/{{ODS code}}), or for other referrers a Practitioner, PractitionerRole, Organization, the Patient or a RelatedPerson"),
        ));
    }
    let has_id = sr
        .get("identifier")
        .and_then(Value::as_array)
        .is_some_and(|ids| {
            ids.iter().any(|i| {
                i.get("system")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
                    && i.get("value")
                        .and_then(Value::as_str)
                        .is_some_and(|v| !v.is_empty())
            })
        });
    if !has_id {
        issues.push(Issue::new(
            "required",
            "ServiceRequest.identifier",
            "must hold the GP system's referral identifier (system and value): it makes resubmission safe",
        ));
    }
    issues
}

/// UK Core Patient rules for ingest: an NHS number with the right system and check digit.
/// Returns the NHS number.
pub fn check_patient(p: &Value) -> Result<String> {
    let ids = p.get("identifier").and_then(Value::as_array);
    let nhs = ids.and_then(|ids| {
        ids.iter()
            .enumerate()
            .find(|(_, i)| i.get("system").and_then(Value::as_str) == Some(NHS_NUMBER_SYSTEM))
    });
    match nhs {
        None => Err(Error::rule(
            "Patient.identifier",
            format!("must include an NHS number (system {})", NHS_NUMBER_SYSTEM),
        )),
        Some((i, id)) => {
            let v = id.get("value").and_then(Value::as_str).unwrap_or_default();
            if crate::ingest::nhs_number_valid(v) {
                Ok(v.to_string())
            } else {
                Err(Error::rule(
                    format!("Patient.identifier[{i}].value"),
                    "is not a valid NHS number: 10 digits whose last is the Modulus 11 check digit",
                ))
            }
        }
    }
}

/// The NHS number of a Patient that need not have one (from a referrer other than a GP
/// system): checked like [`check_patient`] when an identifier of its system is given.
pub fn check_optional_nhs_number(p: &Value) -> Result<Option<String>> {
    let given = p
        .get("identifier")
        .and_then(Value::as_array)
        .is_some_and(|ids| {
            ids.iter()
                .any(|i| i.get("system").and_then(Value::as_str) == Some(NHS_NUMBER_SYSTEM))
        });
    if given {
        check_patient(p).map(Some)
    } else {
        Ok(None)
    }
}

/// `$validate`: the R4 schema, R4's cardinality rules, and the gateway's UK Core rules for
/// `rtype`. Returns every issue found (empty: valid).
pub fn validate(resource: &Value, rtype: &str, cfg: &Config) -> Result<Vec<Issue>> {
    match check_structure(resource, rtype) {
        Ok(()) => {}
        Err(Error::Invalid(issues)) | Err(Error::Unprocessable(issues)) => return Ok(issues),
        Err(e) => return Err(e),
    }
    let mut issues = Vec::new();
    match rtype {
        "ServiceRequest" => issues.extend(service_request_rules(resource)),
        "Patient" => {
            if let Err(Error::Unprocessable(i)) = check_patient(resource) {
                issues.extend(i);
            }
        }
        "Task" => {
            let status = resource
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !TASK_STATUSES.contains(&status) {
                issues.push(Issue::new(
                    "code-invalid",
                    "Task.status",
                    "is not a FHIR Task status",
                ));
            }
            if !matches!(
                resource.get("intent").and_then(Value::as_str),
                Some(
                    "order"
                        | "original-order"
                        | "plan"
                        | "proposal"
                        | "reflex-order"
                        | "filler-order"
                        | "instance-order"
                        | "option"
                        | "unknown"
                )
            ) {
                issues.push(Issue::new(
                    "code-invalid",
                    "Task.intent",
                    "is not a FHIR Task intent",
                ));
            }
            if resource
                .get("focus")
                .and_then(|f| ref_id(f, "ServiceRequest"))
                .is_none()
            {
                issues.push(Issue::new(
                    "required",
                    "Task.focus",
                    "must reference the ServiceRequest the Task fulfils (ServiceRequest/{id})",
                ));
            }
            if resource
                .get("for")
                .and_then(|f| ref_id(f, "Patient"))
                .is_none()
            {
                issues.push(Issue::new(
                    "required",
                    "Task.for",
                    "must reference the Patient (Patient/{id})",
                ));
            }
        }
        "Observation" => {
            if let Err(Error::Unprocessable(i)) = check_feedback(resource, cfg) {
                issues.extend(i);
            }
            if resource
                .get("subject")
                .and_then(|f| ref_id(f, "Patient"))
                .is_none()
            {
                issues.push(Issue::new(
                    "required",
                    "Observation.subject",
                    "must reference the Patient (Patient/{id})",
                ));
            }
        }
        _ => {}
    }
    Ok(issues)
}

/// Why a rejection passes the referral on to the fallback hub, in words, if it does: the
/// gateway's `no-capacity` or `not-eligible` code in `statusReason`.
pub fn reroute_reason(task: &Value) -> Option<&'static str> {
    let codings = task.pointer("/statusReason/coding")?.as_array()?;
    codings.iter().find_map(|c| {
        if c.get("system").and_then(Value::as_str) != Some(task_reason_system().as_str()) {
            return None;
        }
        match c.get("code").and_then(Value::as_str)? {
            NO_CAPACITY => Some("no capacity"),
            NOT_ELIGIBLE => Some("not eligible"),
            _ => None,
        }
    })
}

/// Whether a Task rejection says the patient declined: the gateway's `patient-declined`
/// code in `statusReason`, or the text "patient declined".
pub fn is_patient_declined(task: &Value) -> bool {
    let Some(reason) = task.get("statusReason") else {
        return false;
    };
    let coded = reason
        .get("coding")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(task_reason_system().as_str())
                    && c.get("code").and_then(Value::as_str) == Some(PATIENT_DECLINED)
            })
        });
    let text = reason
        .get("text")
        .and_then(Value::as_str)
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("patient declined"));
    coded || text
}

/// Checks that a resource is structurally valid R4: the R4 JSON Schema, then the
/// cardinality and choice rules the schema does not carry; `expected` is its required
/// `resourceType`.
pub fn check_structure(resource: &Value, expected: &str) -> Result<()> {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == expected => {}
        Some(_) => {
            return Err(Error::invalid(
                "structure",
                "resourceType",
                format!("must be {expected}"),
            ))
        }
        None => {
            return Err(Error::invalid(
                "required",
                "resourceType",
                format!("is required and must be {expected}"),
            ))
        }
    }
    let issues = schema::check_fhir(expected, resource)?;
    if !issues.is_empty() {
        return Err(Error::Invalid(issues));
    }
    let issues = cardinality::check(resource, expected)?;
    if !issues.is_empty() {
        return Err(Error::Invalid(issues));
    }
    Ok(())
}

/// The elements of a Task a client may change (DESIGN §4).
pub const TASK_MUTABLE: [&str; 6] = [
    "status",
    "statusReason",
    "businessStatus",
    "note",
    "output",
    "lastModified",
];

/// The first top-level element where `new` differs from `old` outside the mutable set
/// (ignoring `meta` and `text`, which the server owns).
pub fn task_immutable_change(old: &Value, new: &Value) -> Option<String> {
    let skip = |k: &str| TASK_MUTABLE.contains(&k) || k == "meta" || k == "text";
    let empty = Map::new();
    let o = old.as_object().unwrap_or(&empty);
    let n = new.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .find(|k| !skip(k) && o.get(*k) != n.get(*k))
        .map(|k| format!("Task.{k}"))
}

/// What a provider's Observation reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    Declined,
    Outcome { code: String, value: i64 },
    Text,
}

/// Checks a provider's Observation against the gateway's rules (after [`check_structure`]):
/// status final, one `basedOn` ServiceRequest, a code the gateway knows, and a value that
/// fits it. Returns the kind and the ServiceRequest id.
pub fn check_feedback(obs: &Value, cfg: &Config) -> Result<(Feedback, String)> {
    let mut issues = Vec::new();
    if obs.get("status").and_then(Value::as_str) != Some("final") {
        issues.push(Issue::new(
            "value",
            "Observation.status",
            "must be `final`: feedback sent to the GP is final",
        ));
    }
    let based_on = obs.get("basedOn").and_then(Value::as_array);
    let sr_id = match based_on.map(|b| b.as_slice()) {
        Some([one]) => match ref_id(one, "ServiceRequest") {
            Some(id) => Some(id.to_string()),
            None => {
                issues.push(Issue::new(
                    "value",
                    "Observation.basedOn[0]",
                    "must be a literal reference `ServiceRequest/{id}` to the referral",
                ));
                None
            }
        },
        _ => {
            issues.push(Issue::new(
                "required",
                "Observation.basedOn",
                "must hold exactly one reference, to the referral's ServiceRequest",
            ));
            None
        }
    };
    let codings: Vec<(&str, &str)> = obs
        .pointer("/code/coding")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| Some((c.get("system")?.as_str()?, c.get("code")?.as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    let feedback_sys = feedback_system();
    let mut kind = None;
    for (system, code) in &codings {
        if *system == SNOMED && *code == CODE_SP_DECLINED {
            kind = Some(Feedback::Declined);
        } else if *system == SNOMED {
            if let Some(o) = cfg.outcome(code) {
                match obs.get("valueInteger").and_then(Value::as_i64) {
                    Some(v) if (o.min..=o.max).contains(&v) => {
                        kind = Some(Feedback::Outcome {
                            code: code.to_string(),
                            value: v,
                        })
                    }
                    Some(_) => issues.push(Issue::new(
                        "value",
                        "Observation.valueInteger",
                        format!(
                            "is out of range for {} ({code}): must be {} to {}",
                            o.display, o.min, o.max
                        ),
                    )),
                    None => issues.push(Issue::new(
                        "required",
                        "Observation.valueInteger",
                        format!("is required for {} ({code})", o.display),
                    )),
                }
            }
        } else if *system == feedback_sys && *code == LINK_WORKER_FEEDBACK {
            match obs.get("valueString").and_then(Value::as_str) {
                Some(s) if !s.trim().is_empty() && s.chars().count() <= 4000 => {
                    kind = Some(Feedback::Text)
                }
                Some(_) => issues.push(Issue::new(
                    "value",
                    "Observation.valueString",
                    "must be 1 to 4000 characters of feedback",
                )),
                None => issues.push(Issue::new(
                    "required",
                    "Observation.valueString",
                    "is required for link-worker feedback",
                )),
            }
        }
        if kind.is_some() {
            break;
        }
    }
    if kind.is_none()
        && issues.iter().all(|i| {
            i.expression.as_deref() == Some("Observation.status")
                || i.expression.as_deref() == Some("Observation.basedOn")
                || i.expression.as_deref() == Some("Observation.basedOn[0]")
        })
    {
        let outcomes: Vec<String> = cfg
            .outcomes
            .iter()
            .map(|o| format!("{SNOMED}|{}", o.code))
            .collect();
        issues.push(Issue::new(
            "code-invalid",
            "Observation.code",
            format!(
                "must be one of: {SNOMED}|{CODE_SP_DECLINED} (declined), {}, or {feedback_sys}|{LINK_WORKER_FEEDBACK} (with valueString)",
                outcomes.join(", ")
            ),
        ));
    }
    match (kind, sr_id) {
        (Some(k), Some(sr)) if issues.is_empty() => Ok((k, sr)),
        _ => Err(Error::Unprocessable(issues)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_code_systems_are_valid_and_match_the_code() {
        for (text, url, code) in [
            (
                include_str!("../profiles/CodeSystem-task-status-reason.json"),
                task_reason_system(),
                PATIENT_DECLINED,
            ),
            (
                include_str!("../profiles/CodeSystem-feedback.json"),
                feedback_system(),
                LINK_WORKER_FEEDBACK,
            ),
            (
                include_str!("../profiles/CodeSystem-business-status.json"),
                format!("{CANONICAL}/CodeSystem/business-status"),
                "contact-attempted",
            ),
        ] {
            let cs: Value = serde_json::from_str(text).unwrap();
            assert!(schema::check_fhir("CodeSystem", &cs).unwrap().is_empty());
            assert_eq!(cs["url"], url);
            assert_eq!(cs["concept"][0]["code"], code);
        }
        let cs: Value = serde_json::from_str(include_str!(
            "../profiles/CodeSystem-task-status-reason.json"
        ))
        .unwrap();
        let codes: Vec<&str> = cs["concept"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["code"].as_str())
            .collect();
        assert_eq!(codes, [PATIENT_DECLINED, NO_CAPACITY, NOT_ELIGIBLE]);
        assert_eq!(cs["count"], 3);
    }

    #[test]
    fn the_published_sources_of_referral_are_the_ones_the_gateway_accepts() {
        let cs: Value = serde_json::from_str(include_str!(
            "../profiles/CodeSystem-source-of-referral.json"
        ))
        .unwrap();
        assert!(schema::check_fhir("CodeSystem", &cs).unwrap().is_empty());
        assert_eq!(cs["url"], source_of_referral_system());
        let published: Vec<(&str, &str)> = cs["concept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["code"].as_str().unwrap(), c["display"].as_str().unwrap()))
            .collect();
        let ours: Vec<(&str, &str)> = SOURCES_OF_REFERRAL
            .iter()
            .map(|s| (s.code, s.display))
            .collect();
        assert_eq!(published, ours);
        assert_eq!(cs["count"], SOURCES_OF_REFERRAL.len());
        let vs: Value =
            serde_json::from_str(include_str!("../profiles/ValueSet-source-of-referral.json"))
                .unwrap();
        assert!(schema::check_fhir("ValueSet", &vs).unwrap().is_empty());
        assert_eq!(
            vs["compose"]["include"][0]["system"],
            source_of_referral_system()
        );
        for code in [SOURCE_GP, SOURCE_SELF, SOURCE_CARER] {
            assert!(source_of_referral(code).is_some(), "{code}");
        }
    }

    #[test]
    fn immutable_changes_are_named() {
        let old = json!({ "resourceType": "Task", "status": "requested", "owner": { "reference": "Organization/a" } });
        let mut new = old.clone();
        new["status"] = json!("accepted");
        new["note"] = json!([{ "text": "called" }]);
        assert_eq!(task_immutable_change(&old, &new), None);
        new["owner"] = json!({ "reference": "Organization/b" });
        assert_eq!(
            task_immutable_change(&old, &new).as_deref(),
            Some("Task.owner")
        );
    }
}
