//! The provider inbox's use cases: a group's queue, one referral as a person reads it, and
//! the actions they take on it in the browser.
//!
//! Each action is the FHIR API's own use case underneath: a Task change is a merge patch
//! through `apply_task` (state machine, version check, AuditEvent, Provenance, outbox), an
//! outcome or feedback is `create_observation`. So a group may work in the browser, over
//! the API, or both. It must not know HTML or HTTP; it returns plain facts for pages.

use serde_json::{json, Value};

use super::task::Change;
use super::{keys, Gateway, Query};
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::fhir;

/// One line of a group's queue.
#[derive(Debug, Clone)]
pub struct QueueItem {
    pub task_id: String,
    pub status: String,
    /// What the group last recorded (contact attempted or made), if anything.
    pub progress: Option<String>,
    pub name: String,
    pub needs: Vec<String>,
    pub urgency: String,
    /// When the referral reached the group (the Task's `authoredOn`).
    pub received: String,
    pub waited_days: i64,
    /// New and waiting longer than the group promised to answer in.
    pub overdue: bool,
}

/// A group's open referrals, oldest first, and how many there are in each status.
#[derive(Debug, Clone, Default)]
pub struct Queue {
    pub items: Vec<QueueItem>,
    pub counts: Vec<(&'static str, usize)>,
    pub response_days: u32,
}

/// One referral as the group's people read it.
#[derive(Debug, Clone, Default)]
pub struct ReferralView {
    pub task_id: String,
    pub version: u64,
    pub status: String,
    pub progress: Option<String>,
    pub status_reason: Option<String>,
    pub name: String,
    pub birth_date: String,
    pub contacts: Vec<(String, String)>,
    pub preferred_contact: Option<String>,
    pub postcode: String,
    pub interpreter: Option<String>,
    pub needs: Vec<String>,
    pub urgency: String,
    pub notes: Vec<String>,
    pub practice: String,
    pub referrer: Option<String>,
    pub received: String,
    pub routed_because: Option<String>,
    /// Outcome measures and feedback recorded so far: (what, value, when).
    pub recorded: Vec<(String, String, String)>,
}

/// Why a group declines a referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclineReason {
    PatientDeclined,
    NoCapacity,
    NotEligible,
    Other,
}

/// What a person does to a referral from its page.
#[derive(Debug, Clone)]
pub enum Action {
    Accept,
    Decline { reason: DeclineReason, text: String },
    ContactAttempted { date: String },
    ContactMade { date: String },
    Hold { reason: String },
    Resume,
    Outcome { code: String, score: i64 },
    Feedback { text: String },
    Complete,
}

/// The codes of `businessStatus` the inbox records (text beside them says when): the
/// CodeSystem published as `profiles/CodeSystem-business-status.json`.
pub fn business_status_system() -> String {
    format!("{}/CodeSystem/business-status", fhir::CANONICAL)
}

fn text(v: Option<&Value>) -> Option<String> {
    let v = v?;
    if let Some(t) = v.get("text").and_then(Value::as_str) {
        return Some(t.to_string());
    }
    v.get("coding")?
        .as_array()?
        .iter()
        .find_map(|c| c.get("display").and_then(Value::as_str))
        .map(str::to_string)
}

fn name_of(patient: &Value) -> String {
    let n = patient.pointer("/name/0");
    let given: Vec<&str> = n
        .and_then(|n| n.get("given"))
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let family = n
        .and_then(|n| n.get("family"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut s = given.join(" ");
    if !family.is_empty() {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(family);
    }
    if s.is_empty() {
        "(no name given)".into()
    } else {
        s
    }
}

fn needs_of(sr: &Value) -> Vec<String> {
    sr.get("reasonCode")
        .and_then(Value::as_array)
        .map(|rs| rs.iter().filter_map(|r| text(Some(r))).collect())
        .unwrap_or_default()
}

/// The id a reference element of `task` names (`focus` → its ServiceRequest), or "".
fn referenced(task: &Value, element: &str, rtype: &str) -> String {
    task.get(element)
        .and_then(|r| fhir::ref_id(r, rtype))
        .unwrap_or_default()
        .to_string()
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

/// An outcome or feedback Observation for the referral a Task serves, as a page posts it.
fn page_observation(
    task: &Value,
    sr_id: &str,
    provider: &str,
    coding: Value,
    value_element: &str,
    value: Value,
) -> Value {
    let mut obs = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [coding] },
        "subject": task.get("for").cloned().unwrap_or(Value::Null),
        "basedOn": [{ "reference": format!("ServiceRequest/{sr_id}") }],
        "performer": [{ "reference": format!("Organization/{provider}") }],
        "effectiveDateTime": crate::clock::Now::current().instant
    });
    obs[value_element] = value;
    obs
}

const OPEN: [&str; 4] = ["requested", "accepted", "in-progress", "on-hold"];

impl Gateway {
    fn provider_of<'a>(&self, who: &'a Principal) -> Result<&'a str> {
        who.provider.as_deref().ok_or(Error::Forbidden)
    }

    /// The group's open referrals (new, accepted, in progress, on hold), oldest first.
    pub fn inbox_queue(&self, who: &Principal, now_micros: i64) -> Result<Queue> {
        let provider = self.provider_of(who)?;
        let response_days = self
            .cfg
            .provider(provider)
            .map(|p| p.response_days)
            .unwrap_or(5);
        let q = Query {
            rtype: "Task".into(),
            owner: Some(provider.to_string()),
            status: OPEN.iter().map(|s| s.to_string()).collect(),
            count: super::search::MAX_COUNT,
            ..Query::default()
        };
        let found = self.search(who, &q)?;
        let mut items = Vec::new();
        let mut disclosed = Vec::new();
        for task in found.matches {
            let id = str_at(&task, "/id").to_string();
            let sr = task
                .get("focus")
                .and_then(|r| fhir::ref_id(r, "ServiceRequest"))
                .map(|s| self.load("ServiceRequest", s))
                .transpose()?
                .flatten()
                .unwrap_or(Value::Null);
            let patient_id = referenced(&task, "for", "Patient");
            let patient = self.load("Patient", &patient_id)?.unwrap_or(Value::Null);
            let received = str_at(&task, "/authoredOn").to_string();
            let waited_days = (now_micros - crate::clock::micros_of(&received)) / 86_400_000_000;
            let status = str_at(&task, "/status").to_string();
            disclosed.push(format!("Task/{id}"));
            disclosed.push(format!("Patient/{patient_id}"));
            items.push(QueueItem {
                overdue: status == "requested" && waited_days >= i64::from(response_days),
                progress: text(task.get("businessStatus")),
                name: name_of(&patient),
                needs: needs_of(&sr),
                urgency: str_at(&sr, "/priority").to_string(),
                task_id: id,
                status,
                received,
                waited_days,
            });
        }
        crate::audit::disclose(disclosed);
        items.sort_by(|a, b| a.received.cmp(&b.received));
        let counts = OPEN
            .iter()
            .map(|s| (*s, items.iter().filter(|i| i.status == *s).count()))
            .collect();
        Ok(Queue {
            items,
            counts,
            response_days,
        })
    }

    /// One referral of the group's, as a person reads it (404 for anyone else's).
    pub fn inbox_referral(&self, who: &Principal, task_id: &str) -> Result<ReferralView> {
        let task = self.read(who, "Task", task_id)?;
        let sr_id = referenced(&task, "focus", "ServiceRequest");
        let patient_id = referenced(&task, "for", "Patient");
        let sr = self.read(who, "ServiceRequest", &sr_id)?;
        let patient = self.read(who, "Patient", &patient_id)?;
        let mut contacts: Vec<(i64, String, String)> = patient
            .get("telecom")
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        (
                            t.get("rank").and_then(Value::as_i64).unwrap_or(9),
                            str_at(t, "/system").to_string(),
                            str_at(t, "/value").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        contacts.sort();
        let preferred = contacts
            .iter()
            .find(|c| c.0 == 1)
            .map(|c| c.1.clone())
            .filter(|_| contacts.len() > 1 || contacts.first().is_some_and(|c| c.0 == 1));
        let interpreter = patient.get("communication").and_then(|c| {
            c.as_array()?
                .iter()
                .find_map(|c| {
                    text(c.get("language")).or_else(|| {
                        c.pointer("/language/coding/0/code")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                })
                .map(|l| format!("Needs an interpreter: {l}"))
        });
        let routed_because = task
            .get("extension")
            .and_then(Value::as_array)
            .and_then(|es| {
                es.iter().find(|e| {
                    e.get("url").and_then(Value::as_str)
                        == Some(fhir::routing_extension_url().as_str())
                })
            })
            .and_then(|d| {
                d.get("extension")?
                    .as_array()?
                    .iter()
                    .find(|x| x.get("url").and_then(Value::as_str) == Some("reason"))?
                    .get("valueString")?
                    .as_str()
                    .map(str::to_string)
            });
        let notes: Vec<String> = sr
            .get("note")
            .and_then(Value::as_array)
            .map(|ns| {
                ns.iter()
                    .filter_map(|n| n.get("text").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let referrer = sr
            .pointer("/note/0/authorString")
            .or_else(|| sr.pointer("/requester/display"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let practice = fhir::parties_of(&sr)
            .practice
            .map(|ods| {
                self.cfg
                    .practice(ods)
                    .map(|p| format!("{} ({ods})", p.name))
                    .unwrap_or_else(|| ods.to_string())
            })
            .unwrap_or_default();
        let mut recorded = Vec::new();
        for (k, _) in self.scan(keys::obs_by_sr(&sr_id).as_bytes(), 1_000)? {
            let k = String::from_utf8_lossy(&k);
            let Some(obs) = k.rsplit('/').next() else {
                continue;
            };
            if let Some(o) = self.load("Observation", obs)? {
                let what = text(o.get("code")).unwrap_or_else(|| "Observation".into());
                let value = o
                    .get("valueInteger")
                    .map(|v| v.to_string())
                    .or_else(|| {
                        o.get("valueString")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                recorded.push((
                    what,
                    value,
                    str_at(&o, "/effectiveDateTime")
                        .get(..10)
                        .unwrap_or_default()
                        .to_string(),
                ));
            }
        }
        crate::audit::disclose([
            format!("Task/{task_id}"),
            format!("ServiceRequest/{sr_id}"),
            format!("Patient/{patient_id}"),
        ]);
        Ok(ReferralView {
            task_id: task_id.to_string(),
            version: fhir::version_of(&task),
            status: str_at(&task, "/status").to_string(),
            progress: text(task.get("businessStatus")),
            status_reason: text(task.get("statusReason")),
            name: name_of(&patient),
            birth_date: str_at(&patient, "/birthDate").to_string(),
            contacts: contacts.into_iter().map(|c| (c.1, c.2)).collect(),
            preferred_contact: preferred,
            postcode: str_at(&patient, "/address/0/postalCode").to_string(),
            interpreter,
            needs: needs_of(&sr),
            urgency: str_at(&sr, "/priority").to_string(),
            notes,
            practice,
            referrer,
            received: str_at(&task, "/authoredOn").to_string(),
            routed_because,
            recorded,
        })
    }

    /// Does `action` to the group's referral `task_id`, as of the `version` the person's
    /// page showed: a page older than the Task is refused (412), as `If-Match` is.
    pub async fn inbox_act(
        &self,
        who: &Principal,
        task_id: &str,
        version: u64,
        action: Action,
    ) -> Result<()> {
        let provider = self.provider_of(who)?.to_string();
        // Scope first: someone else's referral is not found, whatever the action.
        let task = self.read(who, "Task", task_id)?;
        let sr_id = referenced(&task, "focus", "ServiceRequest");
        let patch = match action {
            Action::Accept => json!({ "status": "accepted" }),
            Action::Decline { reason, text } => {
                let reason = match reason {
                    DeclineReason::PatientDeclined => json!({
                        "coding": [{ "system": fhir::task_reason_system(), "code": fhir::PATIENT_DECLINED, "display": "Patient declined" }],
                        "text": "Patient declined"
                    }),
                    DeclineReason::NoCapacity => json!({
                        "coding": [{ "system": fhir::task_reason_system(), "code": fhir::NO_CAPACITY, "display": "No capacity" }],
                        "text": "No capacity"
                    }),
                    DeclineReason::NotEligible => json!({
                        "coding": [{ "system": fhir::task_reason_system(), "code": fhir::NOT_ELIGIBLE, "display": "Not eligible" }],
                        "text": "Not eligible"
                    }),
                    DeclineReason::Other => json!({ "text": text }),
                };
                json!({ "status": "rejected", "statusReason": reason })
            }
            Action::ContactAttempted { date } => json!({
                "businessStatus": {
                    "coding": [{ "system": business_status_system(), "code": "contact-attempted", "display": "Contact attempted" }],
                    "text": format!("Contact attempted on {date}")
                }
            }),
            Action::ContactMade { date } => {
                let mut p = json!({
                    "businessStatus": {
                        "coding": [{ "system": business_status_system(), "code": "contact-made", "display": "Contact made" }],
                        "text": format!("Contact made on {date}")
                    }
                });
                if task.get("status").and_then(Value::as_str) == Some("accepted") {
                    p["status"] = json!("in-progress");
                }
                p
            }
            Action::Hold { reason } => {
                json!({ "status": "on-hold", "statusReason": { "text": reason } })
            }
            Action::Resume => json!({ "status": "in-progress", "statusReason": null }),
            Action::Outcome { code, score } => {
                let measure = self
                    .cfg
                    .outcomes
                    .iter()
                    .find(|o| o.code == code)
                    .ok_or_else(|| {
                        Error::invalid("value", "measure", "is not a measure this gateway records")
                    })?;
                let code = json!({ "system": fhir::SNOMED, "code": measure.code, "display": measure.display });
                let obs =
                    page_observation(&task, &sr_id, &provider, code, "valueInteger", json!(score));
                return self.inbox_observation(who, task_id, version, &obs).await;
            }
            Action::Feedback { text } => {
                let code = json!({ "system": fhir::feedback_system(), "code": fhir::LINK_WORKER_FEEDBACK, "display": "Link worker feedback" });
                let obs =
                    page_observation(&task, &sr_id, &provider, code, "valueString", json!(text));
                return self.inbox_observation(who, task_id, version, &obs).await;
            }
            Action::Complete => {
                let mut outputs = Vec::new();
                for (k, _) in self
                    .store
                    .scan(keys::obs_by_sr(&sr_id).as_bytes(), None, 1_000)?
                {
                    let k = String::from_utf8_lossy(&k);
                    if let Some(obs) = k.rsplit('/').next() {
                        let Some(o) = self.load("Observation", obs)? else {
                            continue;
                        };
                        // What the group itself recorded.
                        if o.pointer("/performer/0/reference").and_then(Value::as_str)
                            == Some(format!("Organization/{provider}").as_str())
                        {
                            outputs.push(json!({
                                "type": { "text": "outcome" },
                                "valueReference": { "reference": format!("Observation/{obs}") }
                            }));
                        }
                    }
                }
                if outputs.is_empty() {
                    return Err(Error::rule(
                        "Task.output",
                        "record an outcome measure or feedback before completing the referral",
                    ));
                }
                json!({ "status": "completed", "output": outputs })
            }
        };
        self.apply_task(
            who,
            task_id,
            Some(version),
            Change::Patch {
                json_patch: None,
                doc: patch,
            },
        )
        .await
        .map(drop)
    }

    /// An outcome or feedback from a page: the page's version is checked first (a stale
    /// page records nothing), then the Observation is posted as over the API.
    async fn inbox_observation(
        &self,
        who: &Principal,
        task_id: &str,
        version: u64,
        obs: &Value,
    ) -> Result<()> {
        let current = self.read(who, "Task", task_id)?;
        let at = fhir::version_of(&current);
        if at != version {
            return Err(Error::PreconditionFailed(format!(
                "Task/{task_id} is at version {at}, the page showed version {version}"
            )));
        }
        let body = serde_json::to_vec(obs).map_err(|e| Error::Internal(e.to_string()))?;
        self.create_observation(who, &body).await.map(drop)
    }
}
