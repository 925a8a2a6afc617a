//! The outcome letter to the GP: what happened to a referral, told on one page, for the
//! practice to file in the patient's record.
//!
//! Owns what a letter says ([`Facts`], gathered from a referral's stored resources as they
//! were at one Task version), its PDF ([`pdf`]), and its wrapping as a GP Connect Send
//! Document message (an ITK3 FHIR STU3 Bundle, [`itk`]), with the parsing of the ITK3
//! acknowledgements that come back. It is pure: it must not read the store, use the network
//! or log anything (a letter is patient data through and through).

pub mod itk;
pub mod pdf;

use serde_json::Value;

use crate::config::Config;
use crate::fhir;

/// The Task statuses a practice gets a letter for unless its config says otherwise.
pub const DEFAULT_EVENTS: [&str; 5] = ["accepted", "rejected", "completed", "cancelled", "failed"];

/// One outcome score, the declined record or a piece of feedback.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// SNOMED CT code (or the gateway's feedback code).
    pub system: String,
    pub code: String,
    pub display: String,
    /// The score, or the feedback text; `None` for a coded record without a value.
    pub value: Option<String>,
    pub date: String,
}

/// Everything a letter says. Built by [`Facts::gather`]; each field is plain text.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// The Task status the letter reports (`accepted`, `rejected`, ...).
    pub status: String,
    /// When the Task reached it (its `lastModified`).
    pub at: String,
    pub task_id: String,
    pub task_version: u64,
    pub service_request_id: String,
    pub nhs_number: String,
    pub given: String,
    pub family: String,
    pub birth_date: String,
    pub gender: String,
    pub practice_ods: String,
    pub practice_name: String,
    pub provider_id: String,
    pub provider_name: String,
    /// The GP system's own referral id, when it sent one.
    pub referral_id: Option<String>,
    pub referred_on: String,
    pub needs: Vec<String>,
    /// Why the referral went to this provider (the routing decision).
    pub routed_because: Option<String>,
    /// Why the Task is in its status (declined, cancelled, failed, on hold).
    pub reason: Option<String>,
    /// The provider's latest business status (e.g. "Contact made"), with its date.
    pub progress: Vec<(String, String)>,
    pub accepted_on: Option<String>,
    pub completed_on: Option<String>,
    pub outcomes: Vec<Outcome>,
}

fn text_of(cc: Option<&Value>) -> Option<String> {
    let cc = cc?;
    if let Some(t) = cc.get("text").and_then(Value::as_str) {
        return Some(t.to_string());
    }
    let coding = cc.pointer("/coding/0")?;
    coding
        .get("display")
        .or_else(|| coding.get("code"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn str_at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// A readable status: what a practice clerk would call it.
pub fn status_title(status: &str) -> &'static str {
    match status {
        "requested" => "Referral received",
        "accepted" => "Referral accepted",
        "rejected" => "Referral declined",
        "in-progress" => "Support under way",
        "on-hold" => "Support on hold",
        "completed" => "Support completed",
        "cancelled" => "Referral cancelled",
        "failed" => "Referral could not be completed",
        _ => "Referral update",
    }
}

impl Facts {
    /// The facts of a letter for `task` (the version that triggered it), from the referral's
    /// Patient and ServiceRequest, the Task's versions up to and including it (oldest first)
    /// and the referral's Observations (those issued after the Task version are left out, so
    /// a letter resent later says what was true when it was written).
    pub fn gather(
        cfg: &Config,
        task: &Value,
        history: &[Value],
        patient: &Value,
        sr: &Value,
        observations: &[Value],
    ) -> Facts {
        let status = str_at(task, "/status");
        let at = task
            .get("lastModified")
            .and_then(Value::as_str)
            .unwrap_or_else(|| fhir::last_updated_of(task))
            .to_string();
        let nhs_number = patient
            .get("identifier")
            .and_then(Value::as_array)
            .and_then(|ids| {
                ids.iter().find(|i| {
                    i.get("system").and_then(Value::as_str) == Some(fhir::NHS_NUMBER_SYSTEM)
                })
            })
            .and_then(|i| i.get("value"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let given = patient
            .pointer("/name/0/given")
            .and_then(Value::as_array)
            .map(|g| {
                g.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let practice_ods = crate::fhir::parties_of(sr)
            .practice
            .unwrap_or_default()
            .to_string();
        let practice_name = cfg
            .practice(&practice_ods)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| practice_ods.clone());
        let provider_id = task
            .pointer("/owner/identifier/value")
            .and_then(Value::as_str)
            .or_else(|| {
                task.pointer("/owner/reference")
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("Organization/"))
            })
            .unwrap_or_default()
            .to_string();
        let provider_name = cfg
            .provider(&provider_id)
            .map(|p| p.name.clone())
            .or_else(|| {
                task.pointer("/owner/display")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| provider_id.clone());
        let routing = fhir::routing_extension_url();
        let routed_because = task
            .get("extension")
            .and_then(Value::as_array)
            .and_then(|e| {
                e.iter()
                    .find(|x| x.get("url").and_then(Value::as_str) == Some(routing.as_str()))
            })
            .and_then(|x| x.get("extension").and_then(Value::as_array))
            .and_then(|parts| {
                parts
                    .iter()
                    .find(|p| p.get("url").and_then(Value::as_str) == Some("reason"))
            })
            .and_then(|p| p.get("valueString").and_then(Value::as_str))
            .map(str::to_string);
        let first_with = |s: &str| {
            history
                .iter()
                .find(|t| t.get("status").and_then(Value::as_str) == Some(s))
                .and_then(|t| t.get("lastModified").and_then(Value::as_str))
                .map(str::to_string)
        };
        let mut progress: Vec<(String, String)> = Vec::new();
        for t in history {
            if let Some(b) = text_of(t.get("businessStatus")) {
                let when = str_at(t, "/lastModified");
                if progress.last().map(|(p, _)| p) != Some(&b) {
                    progress.push((b, when));
                }
            }
        }
        let task_time = crate::clock::micros_of(fhir::last_updated_of(task));
        let mut outcomes = Vec::new();
        for o in observations {
            if crate::clock::micros_of(fhir::last_updated_of(o)) > task_time {
                continue;
            }
            let coding = o.pointer("/code/coding/0");
            let get = |k: &str| {
                coding
                    .and_then(|c| c.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let code = get("code");
            let display = cfg
                .outcome(&code)
                .map(|c| c.display.clone())
                .unwrap_or_else(|| match get("display") {
                    d if d.is_empty() && code == fhir::LINK_WORKER_FEEDBACK => {
                        "Feedback from the provider".to_string()
                    }
                    d if d.is_empty() => code.clone(),
                    d => d,
                });
            let value = o
                .get("valueInteger")
                .and_then(Value::as_i64)
                .map(|v| v.to_string())
                .or_else(|| {
                    o.get("valueString")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .or_else(|| text_of(o.get("valueCodeableConcept")));
            let date = o
                .get("effectiveDateTime")
                .or_else(|| o.get("issued"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| fhir::last_updated_of(o).to_string());
            outcomes.push(Outcome {
                system: get("system"),
                code,
                display,
                value,
                date,
            });
        }
        Facts {
            status: status.clone(),
            at,
            task_id: str_at(task, "/id"),
            task_version: fhir::version_of(task),
            service_request_id: str_at(sr, "/id"),
            nhs_number,
            given,
            family: str_at(patient, "/name/0/family"),
            birth_date: str_at(patient, "/birthDate"),
            gender: str_at(patient, "/gender"),
            practice_ods,
            practice_name,
            provider_id,
            provider_name,
            referral_id: sr
                .pointer("/identifier/0/value")
                .and_then(Value::as_str)
                .map(str::to_string),
            referred_on: str_at(sr, "/authoredOn"),
            needs: sr
                .get("reasonCode")
                .and_then(Value::as_array)
                .map(|rs| rs.iter().filter_map(|r| text_of(Some(r))).collect())
                .unwrap_or_default(),
            routed_because,
            reason: text_of(task.get("statusReason")),
            progress,
            accepted_on: first_with("accepted"),
            completed_on: (status == "completed").then(|| str_at(task, "/lastModified")),
            outcomes,
        }
    }

    /// The letter's subject line (MESH `mex-subject` and the document title): no patient
    /// data, since MESH shows subjects in its tracking.
    pub fn subject(&self) -> String {
        format!("Social prescribing: {}", status_title(&self.status))
    }

    /// The letter as titled sections of plain lines, in reading order (the PDF lays these out).
    pub fn sections(&self) -> Vec<(String, Vec<String>)> {
        let date = |s: &str| s.get(..10).unwrap_or(s).to_string();
        let mut out = Vec::new();
        out.push((
            "Patient".to_string(),
            vec![
                format!("Name: {} {}", self.given, self.family),
                format!("NHS number: {}", spaced_nhs(&self.nhs_number)),
                format!("Date of birth: {}", self.birth_date),
                format!("Gender: {}", self.gender),
            ],
        ));
        let mut referral = vec![format!("Referred on: {}", date(&self.referred_on))];
        if let Some(id) = &self.referral_id {
            referral.push(format!("Your referral reference: {id}"));
        }
        if !self.needs.is_empty() {
            referral.push(format!("Needs: {}", self.needs.join("; ")));
        }
        referral.push(format!(
            "Referred to: {} ({})",
            self.provider_name, self.provider_id
        ));
        if let Some(why) = &self.routed_because {
            referral.push(format!("Why this service: {why}"));
        }
        out.push(("The referral".to_string(), referral));
        let mut happened = vec![format!(
            "Status: {} on {}",
            status_title(&self.status),
            date(&self.at)
        )];
        if let Some(r) = &self.reason {
            happened.push(format!("Reason: {r}"));
        }
        if let Some(a) = &self.accepted_on {
            happened.push(format!("Accepted on: {}", date(a)));
        }
        for (what, when) in &self.progress {
            happened.push(format!("{what}: {}", date(when)));
        }
        if let Some(c) = &self.completed_on {
            happened.push(format!("Completed on: {}", date(c)));
        }
        out.push(("What happened".to_string(), happened));
        if !self.outcomes.is_empty() {
            let lines = self
                .outcomes
                .iter()
                .map(|o| {
                    let code = if o.system == fhir::SNOMED {
                        format!(" (SNOMED CT {})", o.code)
                    } else {
                        String::new()
                    };
                    match &o.value {
                        Some(v) => format!("{}{code}: {v} ({})", o.display, date(&o.date)),
                        None => format!("{}{code} ({})", o.display, date(&o.date)),
                    }
                })
                .collect();
            out.push(("Outcomes recorded".to_string(), lines));
        }
        out
    }
}

fn spaced_nhs(n: &str) -> String {
    if n.len() == 10 && n.is_ascii() {
        format!("{} {} {}", &n[..3], &n[3..6], &n[6..])
    } else {
        n.to_string()
    }
}
