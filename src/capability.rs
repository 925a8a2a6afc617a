//! What the FHIR API implements: one table, read by the HTTP dispatcher (to answer 404/405
//! for anything not in it), by search parsing (to refuse or ignore unknown parameters), and
//! by `GET /fhir/metadata` (the CapabilityStatement), so the three cannot drift apart.
//!
//! It must not contain behaviour: adding a row here without a handler is caught by the
//! conformance tests, which exercise every row.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Read,
    Vread,
    HistoryInstance,
    HistoryType,
    Create,
    Update,
    Patch,
    SearchType,
    /// `$validate`.
    Validate,
    /// `POST /fhir` (transaction Bundle).
    Transaction,
    /// `POST /referrals` (EMIS-style JSON).
    Referral,
}

impl Interaction {
    pub fn code(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::SearchType => "search-type",
            Interaction::Validate => "operation",
            Interaction::Transaction => "transaction",
            Interaction::Referral => "referral",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SearchParam {
    pub name: &'static str,
    pub kind: &'static str,
    pub doc: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct Resource {
    pub rtype: &'static str,
    pub profile: &'static str,
    pub interactions: &'static [Interaction],
    pub search: &'static [SearchParam],
    pub includes: &'static [&'static str],
    pub conditional_create: bool,
    pub validate: bool,
}

const fn p(name: &'static str, kind: &'static str, doc: &'static str) -> SearchParam {
    SearchParam { name, kind, doc }
}

/// Parameters every search takes.
pub const COMMON_SEARCH: &[SearchParam] = &[
    p(
        "_lastUpdated",
        "date",
        "gt, ge, lt, le with an instant or a date",
    ),
    p("_count", "number", "page size, 1 to 200 (default 50)"),
    p(
        "_sort",
        "string",
        "_lastUpdated (the default) or -_lastUpdated",
    ),
    p("_summary", "token", "count: only the total"),
];

use Interaction::*;

pub const RESOURCES: &[Resource] = &[
    Resource {
        rtype: "Patient",
        profile: crate::fhir::PROFILE_PATIENT,
        interactions: &[Read, Vread, HistoryInstance, HistoryType, SearchType],
        search: &[p(
            "identifier",
            "token",
            "NHS number: https://fhir.nhs.uk/Id/nhs-number|{nhs}",
        )],
        includes: &[],
        conditional_create: false,
        validate: true,
    },
    Resource {
        rtype: "ServiceRequest",
        profile: crate::fhir::PROFILE_SERVICE_REQUEST,
        interactions: &[
            Read,
            Vread,
            HistoryInstance,
            HistoryType,
            Create,
            SearchType,
        ],
        search: &[
            p(
                "identifier",
                "token",
                "system|value of the referral identifier",
            ),
            p("subject", "reference", "Patient/{id}"),
            p("requester", "reference", "Organization/{ODS code}"),
            p("status", "token", "request status"),
        ],
        includes: &[],
        conditional_create: true,
        validate: true,
    },
    Resource {
        rtype: "Task",
        profile: crate::fhir::PROFILE_TASK,
        interactions: &[
            Read,
            Vread,
            HistoryInstance,
            HistoryType,
            Update,
            Patch,
            SearchType,
        ],
        search: &[
            p("owner", "reference", "Organization/{provider id}"),
            p("requester", "reference", "Organization/{ODS code}"),
            p(
                "status",
                "token",
                "Task status; comma-separated for any of several",
            ),
            p("patient", "reference", "Patient/{id}"),
            p("focus", "reference", "ServiceRequest/{id}"),
        ],
        includes: &["Task:focus", "Task:patient"],
        conditional_create: false,
        validate: true,
    },
    Resource {
        rtype: "Observation",
        profile: crate::fhir::PROFILE_OBSERVATION,
        interactions: &[
            Read,
            Vread,
            HistoryInstance,
            HistoryType,
            Create,
            SearchType,
        ],
        search: &[
            p("based-on", "reference", "ServiceRequest/{id}"),
            p("subject", "reference", "Patient/{id}"),
            p("code", "token", "system|code"),
        ],
        includes: &[],
        conditional_create: false,
        validate: true,
    },
    Resource {
        rtype: "AuditEvent",
        profile: "http://hl7.org/fhir/StructureDefinition/AuditEvent",
        interactions: &[Read, SearchType],
        search: &[
            p("entity", "reference", "{Type}/{id}: events that touched it"),
            p("agent", "token", "client id"),
            p("action", "token", "C, R, U, D or E"),
            p("date", "date", "gt, ge, lt, le with an instant or a date"),
        ],
        includes: &[],
        conditional_create: false,
        validate: false,
    },
    Resource {
        rtype: "Provenance",
        profile: "http://hl7.org/fhir/StructureDefinition/Provenance",
        interactions: &[SearchType],
        search: &[p(
            "target",
            "reference",
            "{Type}/{id}: every version's provenance",
        )],
        includes: &[],
        conditional_create: false,
        validate: false,
    },
    Resource {
        rtype: "Organization",
        profile: crate::fhir::PROFILE_ORGANIZATION,
        interactions: &[Read, SearchType],
        search: &[
            p("_id", "token", "the Organization's id (an ODS code, a provider id or an ORUK organisation id)"),
            p("name", "string", "starts with, ignoring case"),
        ],
        includes: &[],
        conditional_create: false,
        validate: false,
    },
    Resource {
        rtype: "HealthcareService",
        profile: crate::fhir::PROFILE_HEALTHCARE_SERVICE,
        interactions: &[Read, Vread, HistoryInstance, SearchType, Update, Patch],
        search: &[
            p("_id", "token", "the service's id (its ORUK id)"),
            p("active", "token", "true or false"),
            p("service-category", "token", "a need category ([code] or [system]|[code]); comma: any of them"),
            p("service-type", "token", "an ORUK taxonomy term ([system]|[code])"),
            p("coverage-area", "reference", "Location/district-{postcode district}, e.g. Location/district-BB9"),
            p("location", "reference", "Location/{id}: where it is offered"),
            p("organization", "reference", "Organization/{id}: who provides it"),
            p("name", "string", "starts with, ignoring case"),
        ],
        includes: &crate::gateway::directory::SERVICE_INCLUDES,
        conditional_create: false,
        validate: false,
    },
    Resource {
        rtype: "Location",
        profile: crate::fhir::PROFILE_LOCATION,
        interactions: &[Read, Vread, HistoryInstance, SearchType],
        search: &[
            p("_id", "token", "the Location's id"),
            p("name", "string", "starts with, ignoring case"),
            p("address-postalcode", "string", "starts with, ignoring case and spaces: BB9 finds every place in BB9 and the district itself"),
            p("organization", "reference", "Organization/{id}"),
        ],
        includes: &[],
        conditional_create: false,
        validate: false,
    },
    Resource {
        rtype: "Measure",
        profile: "http://hl7.org/fhir/StructureDefinition/Measure",
        interactions: &[Read, SearchType],
        search: &[],
        includes: &[],
        conditional_create: false,
        validate: false,
    },
];

pub fn resource(rtype: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.rtype == rtype)
}

pub fn supports(rtype: &str, i: Interaction) -> bool {
    resource(rtype).is_some_and(|r| r.interactions.contains(&i))
}

/// The common parameters a type's search takes: all of them, but only `_count` for the
/// audit trail (which is ordered as recorded, not by `_lastUpdated`).
fn common_for(rtype: &str) -> impl Iterator<Item = &'static SearchParam> + '_ {
    COMMON_SEARCH.iter().filter(move |s| match rtype {
        "AuditEvent" | "HealthcareService" | "Location" | "Organization" => s.name == "_count",
        "Provenance" => false,
        _ => true,
    })
}

/// Whether `name` is a search parameter of `rtype` (or common to all searches).
pub fn search_param(rtype: &str, name: &str) -> bool {
    let own = resource(rtype).is_some_and(|r| r.search.iter().any(|s| s.name == name));
    own || common_for(rtype).any(|s| s.name == name)
        || (name == "_include" && resource(rtype).is_some_and(|r| !r.includes.is_empty()))
}

/// What each role may do at all (DESIGN §3); which resources it sees within that is the
/// gateway's scoping. Every route is checked against this one table.
pub fn permitted(role: crate::config::Role, rtype: &str, i: Interaction) -> bool {
    use crate::config::Role;
    let reads = matches!(
        i,
        Read | Vread | HistoryInstance | HistoryType | SearchType | Validate
    );
    if rtype == "Measure" {
        // The figures: commissioners' (and auditors', who see everything).
        return matches!(role, Role::Commissioner | Role::Auditor)
            && matches!(i, Read | SearchType);
    }
    if rtype == "AuditEvent" || rtype == "Provenance" {
        // The trail is the auditors' alone.
        return role == Role::Auditor && matches!(i, Read | SearchType);
    }
    match role {
        Role::Admin | Role::Commissioner => false,
        Role::Auditor => reads,
        Role::Referrer => {
            reads
                || i == Transaction
                || (i == Create && rtype == "ServiceRequest")
                || (matches!(i, Update | Patch) && rtype == "Task")
        }
        Role::GpSystem => {
            reads
                || matches!(i, Transaction | Referral)
                || (i == Create && rtype == "ServiceRequest")
                || (matches!(i, Update | Patch) && rtype == "Task")
        }
        Role::Provider => {
            reads
                || (i == Create && rtype == "Observation")
                || (matches!(i, Update | Patch) && rtype == "HealthcareService")
                || (matches!(i, Update | Patch) && rtype == "Task")
        }
    }
}

/// The CapabilityStatement, generated from [`RESOURCES`]; `require_if_match` is the
/// deployment's `server.require_if_match`.
pub fn capability_statement(require_if_match: bool) -> Value {
    let if_match = if require_if_match {
        "If-Match is required (428 without it) and honoured (412 when it names a version that is no longer current)"
    } else {
        "If-Match is honoured when sent (412 when it names a version that is no longer current) and not required: without it the change applies to the current version; the state machine judges every change"
    };
    let resources: Vec<Value> = RESOURCES
        .iter()
        .map(|r| {
            let mut v = json!({
                "type": r.rtype,
                "supportedProfile": [r.profile],
                "interaction": r.interactions.iter().map(|i| {
                    if matches!(i, Update | Patch) {
                        json!({ "code": i.code(), "documentation": if_match })
                    } else {
                        json!({ "code": i.code() })
                    }
                }).collect::<Vec<_>>(),
            });
            if r.interactions.contains(&Update) || r.interactions.contains(&Patch) {
                v["versioning"] = json!("versioned-update");
                v["readHistory"] = json!(true);
                v["updateCreate"] = json!(false);
            } else {
                v["versioning"] = json!("versioned");
                v["readHistory"] = json!(r.interactions.contains(&Vread));
            }
            v["conditionalRead"] = json!("full-support");
            if r.conditional_create {
                v["conditionalCreate"] = json!(true);
            }
            if r.interactions.contains(&SearchType) {
                let params: Vec<Value> = r
                    .search
                    .iter()
                    .chain(common_for(r.rtype))
                    .map(|s| json!({ "name": s.name, "type": s.kind, "documentation": s.doc }))
                    .collect();
                v["searchParam"] = json!(params);
            }
            if !r.includes.is_empty() {
                v["searchInclude"] = json!(r.includes);
            }
            let mut operations = Vec::new();
            if r.validate {
                operations.push(json!({
                    "name": "validate",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"
                }));
            }
            if r.rtype == "Measure" {
                operations.push(json!({
                    "name": "evaluate-measure",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Measure-evaluate-measure",
                    "documentation": "periodStart and periodEnd: whole calendar months (2027-01, or the first and last day of a month). Commissioners and auditors only; small counts suppressed."
                }));
            }
            if !operations.is_empty() {
                v["operation"] = json!(operations);
            }
            v
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "publisher": "sp-gateway",
        "kind": "instance",
        "software": { "name": "sp-gateway", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "sp-gateway: FHIR R4 gateway for NHS social prescribing" },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "description": "Authorization: Bearer <token>. Every client has a role (gp-system, provider, auditor, admin) and sees only its own practices' or provider's resources; anything else is answered 404."
            },
            "resource": resources,
            "interaction": [{ "code": "transaction", "documentation": "Patient + ServiceRequest (UK Core): the gateway creates and routes the Task" }]
        }]
    })
}
