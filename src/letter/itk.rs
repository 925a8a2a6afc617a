//! The letter as GP Connect Send Document (v1.3) specifies it: an ITK3 message Bundle
//! (FHIR STU3, `type` message) holding the MessageHeader with its ITK handling extension,
//! the sender's header Organization, and the document Bundle (a CareConnect Composition, the
//! PDF as an ITK attachment Binary, the sending Organization and the Patient); and the
//! parsing of the ITK3 responses (infrastructure and business acknowledgements) that come
//! back on `GPFED_CONSULT_REPORT_ACK`.
//!
//! Followed: GP Connect Messaging 1.3.x "Send Document" payload and MESH pages
//! (GPCM-SD-0xx requirements), ITK3 Messaging Distribution 2.x (handling specification,
//! response bundle, response codes). The PDF carries every code (GPCM-SD-086); where a
//! practice's system is known to accept it (`structured_outcomes`), the codes also travel as
//! CareConnect Observations in a List (GP Connect Messaging 1.4's shape for this workflow).

use base64::Engine;
use serde_json::{json, Value};

use super::Facts;
use crate::fhir::{NHS_NUMBER_SYSTEM, ODS_SYSTEM, SNOMED};

pub const HANDLING_EXTENSION: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-ITK-MessageHandling-2";
pub const MESSAGE_EVENT_SYSTEM: &str = "https://fhir.nhs.uk/STU3/CodeSystem/ITK-MessageEvent-2";
pub const RESPONSE_CODE_SYSTEM: &str = "https://fhir.nhs.uk/STU3/CodeSystem/ITK-ResponseCodes-1";
const MESSAGE_DEFINITION: &str =
    "https://fhir.nhs.uk/STU3/MessageDefinition/ITK-GPConnectSendDocument-MessageDefinition-Instance-1";
const UUID_SYSTEM: &str = "https://tools.ietf.org/html/rfc4122";

/// Who sends the message and its ids.
pub struct Envelope<'a> {
    /// Our id for the message: the Bundle's and MessageHeader's id, the ITK
    /// `SenderReference`, and MESH's `mex-localid`, so any acknowledgement can be matched.
    pub local_id: &'a str,
    /// When the message was made (FHIR instant).
    pub timestamp: &'a str,
    /// Our MESH mailbox (`MessageHeader.source.endpoint`, as `mex-from`).
    pub mailbox: &'a str,
    /// The ODS code of the organisation that sends (the gateway's operator).
    pub sender_ods: &'a str,
    pub sender_name: &'a str,
    /// Whether the outcomes also travel as coded Observations (in a List the Composition's
    /// second section refers to): the shape GP Connect Messaging 1.4 allows on this workflow
    /// for online consultations; 1.3's consultation report carries the PDF only, so a
    /// receiver must be known to accept it.
    pub structured: bool,
}

fn profile(url: &str) -> Value {
    json!({ "profile": [url] })
}

fn entry(id: &str, resource: Value) -> Value {
    json!({ "fullUrl": format!("urn:uuid:{id}"), "resource": resource })
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn xhtml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `mex-to` of MESH's automatic routing to the patient's registered practice:
/// `GPPROVIDER_{NHS number}_{birth date YYYYMMDD}_{surname}`.
pub fn automatic_recipient(f: &Facts) -> String {
    format!(
        "GPPROVIDER_{}_{}_{}",
        f.nhs_number,
        f.birth_date.replace('-', ""),
        f.family
    )
}

/// The document's title, and MESH's `mex-subject` (GPCM-SD-064's pattern).
pub fn subject(f: &Facts) -> String {
    format!(
        "{} for {} {}, NHS Number: {}, Version: {}",
        f.subject(),
        f.given,
        f.family,
        f.nhs_number,
        f.task_version
    )
}

/// The ITK3 message Bundle carrying `pdf`.
pub fn message(f: &Facts, pdf: &[u8], env: &Envelope<'_>) -> Value {
    let (header_org, doc_bundle, composition, binary, org, patient, list) = (
        new_id(),
        new_id(),
        new_id(),
        new_id(),
        new_id(),
        new_id(),
        new_id(),
    );
    let header = json!({
        "resourceType": "MessageHeader",
        "id": env.local_id,
        "meta": profile("https://fhir.nhs.uk/STU3/StructureDefinition/ITK-MessageHeader-2"),
        "extension": [{
            "url": HANDLING_EXTENSION,
            "extension": [
                { "url": "BusAckRequested", "valueBoolean": true },
                { "url": "InfAckRequested", "valueBoolean": true },
                { "url": "RecipientType", "valueCoding": { "system": "https://fhir.nhs.uk/STU3/CodeSystem/ITK-RecipientType-1", "code": "FA", "display": "For Action" } },
                { "url": "MessageDefinition", "valueReference": { "reference": MESSAGE_DEFINITION } },
                { "url": "SenderReference", "valueString": env.local_id },
                { "url": "LocalExtension", "valueString": "SendDocument-ConsultationReport" }
            ]
        }],
        "event": { "system": MESSAGE_EVENT_SYSTEM, "code": "ITK007C", "display": "ITK GP Connect Send Document" },
        "sender": { "reference": format!("urn:uuid:{header_org}") },
        "timestamp": env.timestamp,
        "source": { "endpoint": env.mailbox },
        "focus": [{ "reference": format!("urn:uuid:{doc_bundle}") }]
    });
    let header_organization = json!({
        "resourceType": "Organization",
        "id": header_org,
        "meta": profile("https://fhir.nhs.uk/STU3/StructureDefinition/CareConnect-ITK-Header-Organization-1"),
        "identifier": [{ "system": ODS_SYSTEM, "value": env.sender_ods }]
    });
    let narrative = format!(
        "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>{} for {} {}, NHS Number {}, Version {}</p></div>",
        xhtml_escape(&f.subject()),
        xhtml_escape(&f.given),
        xhtml_escape(&f.family),
        xhtml_escape(&f.nhs_number),
        f.task_version
    );
    let mut sections = vec![json!({
        "title": "Consultation report",
        "entry": [{ "reference": format!("urn:uuid:{binary}") }]
    })];
    let observations: Vec<(String, Value)> = f
        .outcomes
        .iter()
        .filter(|_| env.structured)
        .map(|o| {
            let id = new_id();
            let mut obs = json!({
                "resourceType": "Observation",
                "id": id,
                "meta": profile("https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Observation-1"),
                "status": "final",
                "code": { "coding": [{ "system": o.system, "code": o.code, "display": o.display }] },
                "subject": { "reference": format!("urn:uuid:{patient}") },
                "effectiveDateTime": o.date,
                "issued": o.date,
                "performer": [{ "reference": format!("urn:uuid:{org}") }]
            });
            match &o.value {
                Some(v) if o.system == SNOMED && v.parse::<i64>().is_ok() => {
                    obs["valueQuantity"] = json!({ "value": v.parse::<i64>().unwrap_or_default() })
                }
                Some(v) => obs["valueString"] = json!(v),
                None => {}
            }
            (id, obs)
        })
        .collect();
    if !observations.is_empty() {
        sections.push(json!({
            "title": "Outcomes recorded",
            "entry": [{ "reference": format!("urn:uuid:{list}") }]
        }));
    }
    let composition_resource = json!({
        "resourceType": "Composition",
        "id": composition,
        "meta": profile("https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Composition-1"),
        "text": { "status": "generated", "div": narrative },
        "status": "final",
        "type": { "coding": [{ "system": SNOMED, "code": "371531000", "display": "Report of clinical encounter" }] },
        "subject": { "reference": format!("urn:uuid:{patient}") },
        "date": env.timestamp,
        "author": [{ "reference": format!("urn:uuid:{org}") }],
        "title": "Consultation report",
        "confidentiality": "N",
        "custodian": { "reference": format!("urn:uuid:{org}") },
        "section": sections
    });
    let binary_resource = json!({
        "resourceType": "Binary",
        "id": binary,
        "meta": profile("https://fhir.nhs.uk/STU3/StructureDefinition/ITK-Attachment-Binary-1"),
        "contentType": "application/pdf",
        "content": base64::engine::general_purpose::STANDARD.encode(pdf)
    });
    let organization = json!({
        "resourceType": "Organization",
        "id": org,
        "meta": profile("https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Organization-1"),
        "identifier": [{ "system": ODS_SYSTEM, "value": env.sender_ods }],
        "name": env.sender_name
    });
    let mut patient_resource = json!({
        "resourceType": "Patient",
        "id": patient,
        "meta": profile("https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1"),
        "identifier": [{
            "extension": [{
                "url": "https://fhir.hl7.org.uk/STU3/StructureDefinition/Extension-CareConnect-NHSNumberVerificationStatus-1",
                "valueCodeableConcept": { "coding": [{ "system": "https://fhir.hl7.org.uk/STU3/CodeSystem/CareConnect-NHSNumberVerificationStatus-1", "code": "01", "display": "Number present and verified" }] }
            }],
            "system": NHS_NUMBER_SYSTEM,
            "value": f.nhs_number
        }],
        "name": [{ "use": "official", "family": f.family, "given": [f.given] }],
        "birthDate": f.birth_date
    });
    if matches!(f.gender.as_str(), "male" | "female" | "other" | "unknown") {
        patient_resource["gender"] = json!(f.gender);
    }
    let mut doc_entries = vec![
        entry(&composition, composition_resource),
        entry(&binary, binary_resource),
        entry(&org, organization),
        entry(&patient, patient_resource),
    ];
    if !observations.is_empty() {
        doc_entries.push(entry(
            &list,
            json!({
                "resourceType": "List",
                "id": list,
                "meta": profile("https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-List-1"),
                "status": "current",
                "mode": "snapshot",
                "title": "Outcomes recorded",
                "code": { "coding": [{ "system": SNOMED, "code": "826501000000100", "display": "Miscellaneous record" }] },
                "subject": { "reference": format!("urn:uuid:{patient}") },
                "date": env.timestamp,
                "entry": observations.iter().map(|(id, _)| json!({ "item": { "reference": format!("urn:uuid:{id}") } })).collect::<Vec<_>>()
            }),
        ));
        for (id, obs) in observations {
            doc_entries.push(entry(&id, obs));
        }
    }
    let document = json!({
        "resourceType": "Bundle",
        "id": doc_bundle,
        "meta": profile("https://fhir.nhs.uk/STU3/StructureDefinition/ITK-Document-Bundle-1"),
        "identifier": { "system": UUID_SYSTEM, "value": new_id() },
        "type": "document",
        "entry": doc_entries
    });
    json!({
        "resourceType": "Bundle",
        "id": env.local_id,
        "meta": profile("https://fhir.nhs.uk/STU3/StructureDefinition/ITK-Message-Bundle-1"),
        "identifier": { "system": UUID_SYSTEM, "value": env.local_id },
        "type": "message",
        "entry": [
            entry(env.local_id, header),
            entry(&header_org, header_organization),
            entry(&doc_bundle, document)
        ]
    })
}

/// Which acknowledgement an ITK3 response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckKind {
    /// 1xxxx/2xxxx: the receiving system took (or could not take) the message.
    Infrastructure,
    /// 3xxxx: the practice knows (or does not know) the patient.
    Business,
}

/// An ITK3 response, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// The ids it may answer: `response.identifier` and the echoed `SenderReference`.
    pub responds_to: Vec<String>,
    pub kind: AckKind,
    pub positive: bool,
    /// The ITK response code and its display (e.g. `20013 Success`).
    pub code: String,
    pub display: String,
    /// The responder's diagnostics, for the operator (a negative ack's reason).
    pub diagnostics: Option<String>,
}

/// Positive ITK3 response codes (success; patient known here; known and recently deceased).
const POSITIVE: [&str; 3] = ["20013", "30001", "30004"];

/// Reads an ITK3 response message (JSON). An error says what is missing, never content.
pub fn parse_ack(body: &[u8]) -> Result<Ack, String> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "not FHIR JSON".to_string())?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || v.get("type").and_then(Value::as_str) != Some("message")
    {
        return Err("not a message Bundle".into());
    }
    let resources: Vec<&Value> = v
        .get("entry")
        .and_then(Value::as_array)
        .map(|es| es.iter().filter_map(|e| e.get("resource")).collect())
        .unwrap_or_default();
    let of_type = |t: &str| {
        resources
            .iter()
            .find(|r| r.get("resourceType").and_then(Value::as_str) == Some(t))
            .copied()
    };
    let header = of_type("MessageHeader").ok_or("no MessageHeader")?;
    let event = header.get("event").map(|e| match e {
        Value::Array(a) => a.first().cloned().unwrap_or(Value::Null),
        other => other.clone(),
    });
    if event
        .as_ref()
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        != Some("ITK008M")
    {
        return Err("not an ITK response (event ITK008M)".into());
    }
    let mut responds_to = Vec::new();
    if let Some(id) = header
        .pointer("/response/identifier")
        .and_then(Value::as_str)
    {
        responds_to.push(id.to_string());
    }
    let sender_ref = header
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|x| x.get("url").and_then(Value::as_str) == Some(HANDLING_EXTENSION))
        .filter_map(|x| x.get("extension").and_then(Value::as_array))
        .flatten()
        .find(|x| x.get("url").and_then(Value::as_str) == Some("SenderReference"))
        .and_then(|x| x.get("valueString").and_then(Value::as_str));
    if let Some(s) = sender_ref {
        if !responds_to.iter().any(|r| r == s) {
            responds_to.push(s.to_string());
        }
    }
    let outcome = of_type("OperationOutcome").ok_or("no OperationOutcome")?;
    let issue = outcome
        .get("issue")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|i| {
            let coding = i
                .pointer("/details/coding")
                .and_then(Value::as_array)?
                .iter()
                .find(|c| c.get("system").and_then(Value::as_str) == Some(RESPONSE_CODE_SYSTEM))?;
            Some((i, coding))
        });
    let (issue, coding) = issue.ok_or("no ITK response code")?;
    let code = coding
        .get("code")
        .and_then(Value::as_str)
        .ok_or("no ITK response code")?
        .to_string();
    let kind = if code.starts_with('3') {
        AckKind::Business
    } else {
        AckKind::Infrastructure
    };
    Ok(Ack {
        responds_to,
        kind,
        positive: POSITIVE.contains(&code.as_str()),
        display: coding
            .get("display")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        code,
        diagnostics: issue
            .get("diagnostics")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}
