//! Creating referrals, whichever way they arrive: EMIS-style JSON (`POST /referrals`), a
//! FHIR transaction Bundle (`POST /fhir`), or a lone ServiceRequest (`POST
//! /fhir/ServiceRequest`, optionally conditional). All three end in [`Gateway::create`]:
//! one transaction that reuses or versions the Patient, routes, writes the ServiceRequest
//! and Task with their indexes, and records the idempotency keys.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{
    fail, keys, scopes, tx_add, tx_count, tx_json, tx_now, tx_put_json, tx_put_resource, Gateway,
    Now,
};
use crate::auth::Principal;
use crate::config::{Config, Provider, Role};
use crate::error::{Error, Issue, Result};
use crate::fhir;
use crate::ingest;
use crate::routing;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ReferralRecord {
    hash: String,
    patient: String,
    service_request: String,
    task: String,
}

/// What a referral submission produced.
pub struct Submitted {
    /// False when the same referral had been submitted before (nothing new written).
    pub created: bool,
    /// Whether the Patient was created by this submission.
    pub patient_written: bool,
    pub patient: Value,
    pub service_request: Value,
    pub task: Value,
}

/// The Patient side of a new referral.
pub(super) enum PatientPlan {
    /// A new Patient for this referral. Each referral gets its own, so that a provider sees
    /// exactly the demographics the patient consented to share with it, never those of a
    /// later referral to someone else.
    New { body: Value, nhs: Option<String> },
    /// An existing Patient the caller referenced (conditional create of a ServiceRequest).
    Existing(String),
}

/// Builds the ServiceRequest for a Patient id and the chosen provider.
pub(super) type MakeSr<'a> = Box<dyn Fn(&str, &Provider) -> Value + Send + Sync + 'a>;

/// Who a referral comes from, and so who besides its provider may see it.
#[derive(Debug, Clone)]
pub(super) struct Origin {
    /// The namespace of its identifiers (idempotency keys): the practice's ODS code, or
    /// [`referrer_namespace`] of the referring client.
    ns: String,
    /// The GP practice that sees it: the referring practice, or the person's own practice
    /// when they agreed it may be told.
    practice: Option<String>,
    /// The referring client when it is not a GP system.
    referrer: Option<String>,
    /// Its source of referral.
    source: fhir::SourceOfReferral,
    /// Whether a GP practice referred (its requester is the practice); otherwise the
    /// referral carries the gateway's `referral-scope` extension.
    gp: bool,
}

impl Origin {
    pub(super) fn new(
        ns: String,
        practice: Option<String>,
        referrer: Option<String>,
        source: fhir::SourceOfReferral,
    ) -> Origin {
        Origin {
            ns,
            practice,
            referrer,
            source,
            gp: false,
        }
    }

    fn parties(&self) -> fhir::Parties<'_> {
        fhir::Parties {
            practice: self.practice.as_deref(),
            referrer: self.referrer.as_deref(),
        }
    }
}

/// The namespace of a referring client's ServiceRequest identifiers (ODS codes have no `.`,
/// so it cannot be a practice's).
pub(crate) fn referrer_namespace(client: &str) -> String {
    format!("f.{client}")
}

/// Everything a new referral is made of, before ids exist.
pub(super) struct Plan<'a> {
    pub(super) origin: Origin,
    /// Straight to the fallback provider (the link-worker hub) for triage, whatever the
    /// routing rules say (self-referrals, unless configured otherwise).
    pub(super) triage: bool,
    /// Idempotency keys: the first is the referral's own; a hit on any other with another
    /// referral behind it is a conflict.
    pub(super) idem_keys: Vec<String>,
    pub(super) hash: String,
    pub(super) patient: PatientPlan,
    /// Builds the ServiceRequest for a Patient id and the chosen provider.
    pub(super) make_sr: MakeSr<'a>,
    pub(super) identifier: Option<Value>,
    pub(super) priority: Option<String>,
    pub(super) needs: Vec<String>,
    pub(super) codes: Vec<String>,
    pub(super) district: String,
    pub(super) age: Option<u32>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub(super) fn hash_json(v: &Value) -> String {
    // serde_json's Map is ordered by key, so equal JSON gives equal bytes.
    sha256_hex(&v.to_string())
}

/// The idempotency key of a ServiceRequest identifier within a practice.
pub(crate) fn identifier_key(ods: &str, system: &str, value: &str) -> String {
    keys::sr_identifier(&format!(
        "{ods}/{}",
        sha256_hex(&format!("{system}|{value}"))
    ))
}

/// Need categories whose SNOMED codes appear in `codes`.
fn needs_for_codes(cfg: &Config, codes: &[String]) -> Vec<String> {
    cfg.needs
        .iter()
        .filter(|n| n.snomed.iter().any(|c| codes.contains(c)))
        .map(|n| n.name.clone())
        .collect()
}

pub(super) fn age_of(birth_date: Option<&str>, now: &Now) -> Option<u32> {
    let d = ingest::parse_date(birth_date?)?;
    let today = now.time.date();
    let mut years = today.year() - d.year();
    if (today.month() as u8, today.day()) < (d.month() as u8, d.day()) {
        years -= 1;
    }
    u32::try_from(years).ok()
}

fn district_of(patient: &Value) -> String {
    let pc = patient
        .pointer("/address/0/postalCode")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let pc = ingest::normalise_postcode(pc);
    pc.split(' ').next().unwrap_or_default().to_string()
}

/// Whether free space is below the floor (or cannot be measured: then refuse, safely).
fn space_low(gw: &Gateway) -> bool {
    match gw.store().space() {
        Ok(space) => space.below_floor(),
        Err(e) => {
            tracing::error!(error = %e, "cannot measure free space; refusing new referrals");
            true
        }
    }
}

impl Gateway {
    /// `POST /referrals`: check, map, route and store an EMIS-style referral.
    pub async fn submit_referral(&self, who: &Principal, body: &[u8]) -> Result<Submitted> {
        if who.role != Role::GpSystem {
            return Err(Error::Forbidden);
        }
        let now = Now::current();
        let checked = ingest::parse_referral(body, &self.cfg, now.time)?;
        let r = &checked.referral;
        let ods = r.practice.ods_code.clone();
        if !who.practices.contains(&ods) {
            return Err(Error::rule(
                "practice.odsCode",
                "is not a practice this client may refer for",
            ));
        }
        let cfg = &self.cfg;
        let mut codes: Vec<String> = r
            .needs
            .iter()
            .filter_map(|n| cfg.need(n))
            .flat_map(|n| n.snomed.iter().cloned())
            .collect();
        codes.extend(r.reasons.iter().map(|c| c.code.clone()));
        let system = fhir::referral_id_system(&ods);
        let plan = Plan {
            idem_keys: vec![
                keys::referral(&ods, &r.referral_id),
                identifier_key(&ods, &system, &r.referral_id),
            ],
            hash: hash_json(&checked.canonical),
            patient: PatientPlan::New {
                body: fhir::patient(&checked, cfg),
                nhs: Some(r.patient.nhs_number.clone()),
            },
            make_sr: Box::new(|patient_id, provider| {
                fhir::service_request(&checked, cfg, patient_id, provider)
            }),
            identifier: Some(json!({ "system": system, "value": r.referral_id })),
            priority: Some(r.urgency.as_str().to_string()),
            needs: r.needs.clone(),
            codes,
            district: checked.district.clone(),
            age: Some(checked.age),
            origin: Origin {
                ns: ods.clone(),
                practice: Some(ods),
                referrer: None,
                source: gp_source(),
                gp: true,
            },
            triage: false,
        };
        self.create(plan).await
    }

    /// `POST /fhir` (transaction): a UK Core Patient and ServiceRequest, all or nothing.
    pub async fn submit_transaction(&self, who: &Principal, body: &[u8]) -> Result<Submitted> {
        if !matches!(who.role, Role::GpSystem | Role::Referrer) {
            return Err(Error::Forbidden);
        }
        let bundle = crate::schema::parse_json(body)?;
        let (patient, sr, patient_url, (pi, si)) = split_transaction(&bundle)?;
        let at = |i: usize| format!("Bundle.entry[{i}].resource");
        let now = Now::current();
        // GP systems always know the NHS number; other referrers may not (checked when given).
        let nhs = match who.role {
            Role::GpSystem => fhir::check_patient(&patient).map(Some),
            _ => fhir::check_optional_nhs_number(&patient),
        }
        .map_err(|e| reroot(e, "Patient", &at(pi)))?;
        let origin = check_service_request(&sr, who, &self.cfg, Some((&patient, &patient_url)))
            .map_err(|e| reroot(e, "ServiceRequest", &at(si)))?;
        // The ServiceRequest must name the Patient of this transaction.
        let subject = sr.pointer("/subject/reference").and_then(Value::as_str);
        if subject != Some(patient_url.as_str()) {
            return Err(Error::rule(
                format!("{}.subject", at(si)),
                format!("must reference the Patient entry of this transaction ({patient_url})"),
            ));
        }
        let sr = with_requester(sr, &patient_url, "Patient/{patient}");
        self.fhir_plan(origin, sr, PatientPlan::New { body: patient, nhs }, &now)
            .await
    }

    /// `POST /fhir/ServiceRequest`: a referral for an existing Patient. With
    /// `If-None-Exist: identifier=system|value`, an existing match is returned instead.
    pub async fn create_service_request(
        &self,
        who: &Principal,
        body: &[u8],
        if_none_exist: Option<&str>,
    ) -> Result<Submitted> {
        if !matches!(who.role, Role::GpSystem | Role::Referrer) {
            return Err(Error::Forbidden);
        }
        let sr = crate::schema::parse_json(body)?;
        let now = Now::current();
        let patient_id = sr
            .get("subject")
            .and_then(|s| fhir::ref_id(s, "Patient"))
            .map(str::to_string);
        // The caller's own scope: the practice it refers for, or its own referrals.
        let own_scope = |me: &Self, id: &str, scope: &str| -> Result<bool> {
            Ok(me
                .store
                .get(keys::access("Patient", id, scope).as_bytes())?
                .is_some())
        };
        let patient = match &patient_id {
            Some(id) => self.load("Patient", id)?,
            None => None,
        };
        let patient_ref = patient_id.as_ref().map(|id| format!("Patient/{id}"));
        let origin = check_service_request(
            &sr,
            who,
            &self.cfg,
            patient.as_ref().zip(patient_ref.as_deref()),
        )?;
        if let Some(cond) = if_none_exist {
            let (system, value) = parse_if_none_exist(cond)?;
            if let Some(rec) = self
                .store
                .get(identifier_key(&origin.ns, &system, &value).as_bytes())?
            {
                let rec: ReferralRecord = serde_json::from_slice(&rec)
                    .map_err(|e| Error::Internal(format!("referral record: {e}")))?;
                return self.existing(&rec);
            }
        }
        let (scope, whose) = match &origin.referrer {
            Some(client) => (format!("f/{client}"), "this client referred".to_string()),
            None => (
                format!("r/{}", origin.ns),
                format!("of practice {}", origin.ns),
            ),
        };
        let visible = match (&patient_id, &patient) {
            (Some(id), Some(_)) => own_scope(self, id, &scope)?,
            _ => false,
        };
        let Some(patient_id) = patient_id.filter(|_| visible) else {
            return Err(Error::rule(
                "ServiceRequest.subject",
                format!("must reference an existing Patient/{{id}} {whose} (create one with a transaction Bundle)"),
            ));
        };
        self.fhir_plan(origin, sr, PatientPlan::Existing(patient_id), &now)
            .await
    }

    async fn fhir_plan(
        &self,
        origin: Origin,
        sr: Value,
        patient: PatientPlan,
        now: &Now,
    ) -> Result<Submitted> {
        let identifiers: Vec<(String, String)> = sr
            .get("identifier")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|i| {
                        Some((
                            i.get("system")?.as_str()?.to_string(),
                            i.get("value")?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let codes: Vec<String> = sr
            .get("reasonCode")
            .and_then(Value::as_array)
            .map(|rc| {
                rc.iter()
                    .filter_map(|c| c.get("coding").and_then(Value::as_array))
                    .flatten()
                    .filter(|c| c.get("system").and_then(Value::as_str) == Some(fhir::SNOMED))
                    .filter_map(|c| c.get("code").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // Age on the day the referral was written, so the same referral always routes the
        // same way.
        let on = sr
            .get("authoredOn")
            .and_then(Value::as_str)
            .and_then(ingest::parse_instant)
            .map(Now::at)
            .unwrap_or_else(|| now.clone());
        let (district, age) = match &patient {
            PatientPlan::New { body, .. } => (
                district_of(body),
                age_of(body.get("birthDate").and_then(Value::as_str), &on),
            ),
            PatientPlan::Existing(id) => {
                let p = self.load("Patient", id)?.unwrap_or(Value::Null);
                (
                    district_of(&p),
                    age_of(p.get("birthDate").and_then(Value::as_str), &on),
                )
            }
        };
        let hash_input = json!({
            "patient": match &patient { PatientPlan::New { body, .. } => body.clone(), PatientPlan::Existing(id) => json!(id) },
            "serviceRequest": sr,
        });
        let sr_template = sr.clone();
        let plan = Plan {
            idem_keys: identifiers
                .iter()
                .map(|(s, v)| identifier_key(&origin.ns, s, v))
                .collect(),
            hash: hash_json(&hash_input),
            patient,
            make_sr: Box::new(move |patient_id, _provider| {
                let mut s = sr_template.clone();
                s["subject"] = json!({ "reference": format!("Patient/{patient_id}") });
                if s.pointer("/requester/reference").and_then(Value::as_str)
                    == Some("Patient/{patient}")
                {
                    s["requester"]["reference"] = json!(format!("Patient/{patient_id}"));
                }
                s
            }),
            identifier: sr.pointer("/identifier/0").cloned(),
            priority: sr
                .get("priority")
                .and_then(Value::as_str)
                .map(str::to_string),
            needs: needs_for_codes(&self.cfg, &codes),
            codes,
            district,
            age,
            origin,
            triage: false,
        };
        self.create(plan).await
    }

    fn existing(&self, rec: &ReferralRecord) -> Result<Submitted> {
        let get = |t: &str, id: &str| {
            self.load(t, id)?
                .ok_or_else(|| Error::Internal(format!("{t}/{id} missing after write")))
        };
        Ok(Submitted {
            created: false,
            patient_written: false,
            patient: get("Patient", &rec.patient)?,
            service_request: get("ServiceRequest", &rec.service_request)?,
            task: get("Task", &rec.task)?,
        })
    }

    /// Writes a new referral in one transaction, or finds the same one already written.
    pub(super) async fn create(&self, plan: Plan<'_>) -> Result<Submitted> {
        let cfg = &self.cfg;
        let new_patient = uuid::Uuid::new_v4().to_string();
        let sr_id = uuid::Uuid::new_v4().to_string();
        let task_id = uuid::Uuid::new_v4().to_string();
        let origin = &plan.origin;
        let parties = origin.parties();
        let facts = routing::Facts {
            needs: &plan.needs,
            codes: plan.codes.iter().map(String::as_str).collect(),
            district: &plan.district,
            practice: parties.practice.unwrap_or_default(),
            age: plan.age,
        };
        let Some(own_key) = plan.idem_keys.first() else {
            return Err(Error::rule(
                "ServiceRequest.identifier",
                "at least one identifier (system and value) is required: it makes resubmission safe",
            ));
        };
        let directory = self.directory();
        let (patient_written, rec, written) = self.commit(|tx| {
            if let Some(rec) = tx_json(tx, own_key)? {
                let rec: ReferralRecord = serde_json::from_value(rec)
                    .or_else(|e| fail(Error::Internal(format!("referral record: {e}"))))?;
                if rec.hash != plan.hash {
                    return fail(Error::Conflict(
                        "this referral was already received with different content; \
                         send a new referral id (identifier) for a new referral"
                            .into(),
                    ));
                }
                crate::audit::tx_record(
                    tx,
                    &[
                        format!("Patient/{}", rec.patient),
                        format!("ServiceRequest/{}", rec.service_request),
                        format!("Task/{}", rec.task),
                    ],
                    &Now::current(),
                )?;
                return Ok((false, rec, None));
            }
            // A new referral needs room: below the free-space floor it is refused (a
            // resubmission, above, is still answered with what was stored).
            if space_low(self) {
                return fail(Error::InsufficientStorage);
            }
            for k in &plan.idem_keys[1..] {
                if tx.get(k.as_bytes())?.is_some() {
                    return fail(Error::Conflict(
                        "an identifier of this referral already belongs to another referral".into(),
                    ));
                }
            }
            let now = tx_now(tx)?;
            let decision = if plan.triage {
                routing::Decision {
                    provider: cfg.routing.fallback_provider.clone(),
                    rule: "triage".into(),
                    reason: "a self-referral goes to the link-worker hub for triage".into(),
                    service: None,
                }
            } else {
                let today = crate::ingest::parse_date(now.instant.get(..10).unwrap_or_default())
                    .unwrap_or(time::Date::MIN);
                routing::route(cfg, &directory, today, &facts, |p| {
                    tx_count(tx, &keys::open_count(p))
                })?
            };
            let Some(provider) = cfg.provider(&decision.provider) else {
                return fail(Error::Internal("routed to an unknown provider".into()));
            };
            let both = scopes(Some(&provider.id), parties);
            let (patient_id, new_patient_resource) = match &plan.patient {
                PatientPlan::Existing(id) => (id.clone(), None),
                PatientPlan::New { body, nhs } => {
                    let mut p = body.clone();
                    fhir::stamp(&mut p, &new_patient, 1, &now.instant);
                    tx_put_resource(tx, "Patient", &p, None, &both)?;
                    if let Some(nhs) = nhs {
                        tx.put(
                            format!("{}{new_patient}", keys::patient_by_nhs(nhs)).as_bytes(),
                            b"",
                        )?;
                    }
                    (new_patient.clone(), Some(p))
                }
            };
            let mut sr = (plan.make_sr)(&patient_id, provider);
            let scope_ext = (!origin.gp).then(|| {
                fhir::referral_scope_ext(
                    cfg,
                    origin.referrer.as_deref(),
                    origin.practice.as_deref(),
                )
            });
            mark_origin(&mut sr, origin.source, scope_ext.clone());
            fhir::stamp(&mut sr, &sr_id, 1, &now.instant);
            // A GP practice's referral names the practice as its requester, as written by
            // the gateway (the ServiceRequest may identify it by ODS code only).
            let requester = match (origin.gp, &origin.practice) {
                (true, Some(ods)) => fhir::practice_ref(cfg, ods),
                _ => task_requester(&sr),
            };
            let mut task = fhir::task(&fhir::TaskSpec {
                identifier: plan.identifier.clone(),
                priority: plan.priority.as_deref(),
                requester,
                scope: scope_ext,
                patient_id: &patient_id,
                sr_id: &sr_id,
                provider,
                decision: &decision,
                now: &now.instant,
            });
            fhir::stamp(&mut task, &task_id, 1, &now.instant);
            tx_put_resource(tx, "ServiceRequest", &sr, None, &both)?;
            tx_put_resource(tx, "Task", &task, None, &both)?;
            super::report::tx_track(tx, cfg, "ServiceRequest", &sr)?;
            super::report::tx_track(tx, cfg, "Task", &task)?;
            tx_add(tx, &keys::open_count(&provider.id), 1)?;
            tx.put(keys::sr_task(&sr_id).as_bytes(), task_id.as_bytes())?;
            // Who may read the Patient and ServiceRequest: every scope but `a`.
            for (t, id) in [("Patient", &patient_id), ("ServiceRequest", &sr_id)] {
                for scope in both.iter().filter(|s| s.as_str() != "a") {
                    tx.put(keys::access(t, id, scope).as_bytes(), b"")?;
                }
            }
            let rec = ReferralRecord {
                hash: plan.hash.clone(),
                patient: patient_id.clone(),
                service_request: sr_id.clone(),
                task: task_id.clone(),
            };
            for k in &plan.idem_keys {
                tx_put_json(tx, k, &rec)?;
            }
            crate::audit::tx_record(
                tx,
                &[
                    format!("Patient/{patient_id}"),
                    format!("ServiceRequest/{sr_id}"),
                    format!("Task/{task_id}"),
                ],
                &now,
            )?;
            let patient_written = new_patient_resource.is_some();
            Ok((patient_written, rec, Some((new_patient_resource, sr, task))))
        })?;
        // Also for a resubmission: the first submission may still be on its way to disk.
        self.store.durable().await?;
        match written {
            // What this call wrote, as written: no need to read it back.
            Some((patient, service_request, task)) => Ok(Submitted {
                created: true,
                patient_written,
                patient: match patient {
                    Some(p) => p,
                    None => self.load("Patient", &rec.patient)?.ok_or_else(|| {
                        Error::Internal(format!("Patient/{} missing after write", rec.patient))
                    })?,
                },
                service_request,
                task,
            }),
            None => self.existing(&rec),
        }
    }
}

/// Moves issue expressions from `from` (a resource type) to `to` (its place in a Bundle).
fn reroot(e: Error, from: &str, to: &str) -> Error {
    let fix = |issues: Vec<Issue>| {
        issues
            .into_iter()
            .map(|mut i| {
                if let Some(x) = &i.expression {
                    if let Some(rest) = x.strip_prefix(from) {
                        i.expression = Some(format!("{to}{rest}"));
                    }
                }
                i
            })
            .collect()
    };
    match e {
        Error::Invalid(i) => Error::Invalid(fix(i)),
        Error::Unprocessable(i) => Error::Unprocessable(fix(i)),
        other => other,
    }
}

/// Checks a transaction Bundle's shape and both resources (for fuzzing and `$validate`-like
/// use): everything `POST /fhir` checks before it touches the store, bar the caller's
/// practices.
pub fn check_transaction(bundle: &Value) -> Result<()> {
    let (patient, sr, _, (pi, si)) = split_transaction(bundle)?;
    fhir::check_patient(&patient)
        .map_err(|e| reroot(e, "Patient", &format!("Bundle.entry[{pi}].resource")))?;
    fhir::check_structure(&sr, "ServiceRequest")?;
    let issues = fhir::service_request_rules(&sr);
    if !issues.is_empty() {
        return Err(reroot(
            Error::Unprocessable(issues),
            "ServiceRequest",
            &format!("Bundle.entry[{si}].resource"),
        ));
    }
    Ok(())
}

/// The Patient, the ServiceRequest, the Patient's fullUrl and the two entries' indexes, of
/// a transaction Bundle.
fn split_transaction(bundle: &Value) -> Result<(Value, Value, String, (usize, usize))> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Error::invalid(
            "structure",
            "resourceType",
            "must be Bundle",
        ));
    }
    if bundle.get("type").and_then(Value::as_str) != Some("transaction") {
        return Err(Error::invalid(
            "value",
            "Bundle.type",
            "must be `transaction` (this endpoint takes a Patient and a ServiceRequest, all or nothing)",
        ));
    }
    let empty = Vec::new();
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let mut patient = None;
    let mut sr = None;
    for (i, e) in entries.iter().enumerate() {
        let at = format!("Bundle.entry[{i}]");
        let resource = e.get("resource").cloned().unwrap_or(Value::Null);
        let rtype = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let method = e.pointer("/request/method").and_then(Value::as_str);
        let url = e.pointer("/request/url").and_then(Value::as_str);
        if method != Some("POST") || url != Some(rtype.as_str()) {
            return Err(Error::invalid(
                "value",
                format!("{at}.request"),
                format!("must be {{\"method\": \"POST\", \"url\": \"{rtype}\"}}: the transaction creates its resources"),
            ));
        }
        if !matches!(rtype.as_str(), "Patient" | "ServiceRequest") {
            return Err(Error::invalid(
                "not-supported",
                format!("{at}.resource.resourceType"),
                "a transaction here holds one Patient and one ServiceRequest",
            ));
        }
        fhir::check_structure(&resource, &rtype)
            .map_err(|err| reroot(err, &rtype, &format!("{at}.resource")))?;
        let full_url = e
            .get("fullUrl")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match rtype.as_str() {
            "Patient" if patient.is_none() => patient = Some((resource, full_url, i)),
            "ServiceRequest" if sr.is_none() => sr = Some((resource, i)),
            _ => {
                return Err(Error::invalid(
                    "not-supported",
                    format!("{at}.resource"),
                    "a transaction here holds exactly one Patient and one ServiceRequest",
                ))
            }
        }
    }
    match (patient, sr) {
        (Some((p, url, pi)), Some((s, si))) if url.starts_with("urn:uuid:") => Ok((p, s, url, (pi, si))),
        (Some(_), Some(_)) => Err(Error::invalid(
            "value",
            "Bundle.entry[0].fullUrl",
            "the Patient's fullUrl must be a urn:uuid: that the ServiceRequest's subject references",
        )),
        _ => Err(Error::invalid(
            "required",
            "Bundle.entry",
            "a transaction here holds exactly one Patient and one ServiceRequest",
        )),
    }
}

/// A Task's requester from its ServiceRequest's. A reference to a resource contained in the
/// ServiceRequest (`#id`) would dangle in the Task: it becomes its type and a display (the
/// contained resource's name, as given), with any identifier kept.
fn task_requester(sr: &Value) -> Value {
    let Some(r) = sr.get("requester") else {
        return Value::Null;
    };
    let Some(local) = r
        .get("reference")
        .and_then(Value::as_str)
        .and_then(|x| x.strip_prefix('#'))
    else {
        return r.clone();
    };
    let contained = sr
        .get("contained")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("id").and_then(Value::as_str) == Some(local))
        });
    let mut out = serde_json::Map::new();
    if let Some(t) = contained.and_then(|c| c.get("resourceType")).cloned() {
        out.insert("type".into(), t);
    }
    if let Some(i) = r.get("identifier") {
        out.insert("identifier".into(), i.clone());
    }
    let name = contained.and_then(|c| {
        let n = c.pointer("/name/0").or_else(|| c.get("name"))?;
        n.get("text")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| n.as_str().map(str::to_string))
            .or_else(|| {
                let given = n.get("given")?.as_array()?.iter().filter_map(Value::as_str);
                let family = n.get("family").and_then(Value::as_str);
                Some(given.chain(family).collect::<Vec<_>>().join(" "))
            })
    });
    let display = r
        .get("display")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or(name)
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "the requester named in the ServiceRequest".into());
    out.insert("display".into(), Value::String(display));
    Value::Object(out)
}

/// The source of referral of a GP practice's referral.
fn gp_source() -> fhir::SourceOfReferral {
    fhir::source_of_referral(fhir::SOURCE_GP).unwrap_or(fhir::SOURCES_OF_REFERRAL[0])
}

/// Points a ServiceRequest's requester that names the transaction's Patient entry
/// (`urn:uuid:…`, a self-referral) at `to` instead.
fn with_requester(mut sr: Value, patient_url: &str, to: &str) -> Value {
    if sr.pointer("/requester/reference").and_then(Value::as_str) == Some(patient_url) {
        sr["requester"]["reference"] = json!(to);
    }
    sr
}

/// Records a new referral's source of referral (UK Core's extension; a coding of the
/// gateway's system is added when the one sent carries other codes only) and, for a referral
/// that did not come from a GP practice, the gateway's `referral-scope` extension.
fn mark_origin(sr: &mut Value, source: fhir::SourceOfReferral, scope: Option<Value>) {
    let ours = fhir::source_of_referral_ext(source);
    let Some(obj) = sr.as_object_mut() else {
        return;
    };
    let exts = obj.entry("extension").or_insert_with(|| json!([]));
    let Some(exts) = exts.as_array_mut() else {
        return;
    };
    let sent = exts
        .iter_mut()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(fhir::EXT_SOURCE_OF_REFERRAL));
    match sent {
        Some(e) => {
            let has_ours =
                fhir::source_of_referral_of(&json!({ "extension": [e.clone()] })).is_some();
            if !has_ours {
                if let (Some(coding), Some(codings)) = (
                    ours.pointer("/valueCodeableConcept/coding/0").cloned(),
                    e.pointer_mut("/valueCodeableConcept/coding")
                        .and_then(Value::as_array_mut),
                ) {
                    codings.push(coding);
                } else {
                    *e = ours;
                }
            }
        }
        None => exts.push(ours),
    }
    if let Some(scope) = scope {
        exts.push(scope);
    }
}

/// The practice a Patient is registered with (`generalPractitioner`, by ODS code or
/// `Organization/{ODS code}`), if it is one this gateway serves.
fn registered_practice(patient: &Value, cfg: &Config) -> Option<String> {
    patient
        .get("generalPractitioner")?
        .as_array()?
        .iter()
        .filter_map(fhir::ods_of)
        .find(|ods| cfg.practice(ods).is_some())
        .map(str::to_string)
}

/// Who may be a referral's requester when a referrer (not a GP system) sends it.
const REQUESTER_TYPES: [&str; 5] = [
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Patient",
    "RelatedPerson",
];

/// Checks the requester of a referrer's ServiceRequest and returns its resource type.
/// `patient_ref` is how the ServiceRequest may name its own Patient (a self-referral).
fn check_referrer_requester(
    sr: &Value,
    cfg: &Config,
    patient_ref: Option<&str>,
) -> Result<&'static str> {
    const AT: &str = "ServiceRequest.requester";
    let kinds = REQUESTER_TYPES.join(", ");
    let Some(r) = sr.get("requester") else {
        return Err(Error::rule(
            AT,
            format!("is required: who is referring ({kinds}; the Patient for a self-referral, a RelatedPerson for family or a carer)"),
        ));
    };
    let declared = r.get("type").and_then(Value::as_str);
    if let Some(t) = declared {
        if !REQUESTER_TYPES.contains(&t) {
            return Err(Error::rule(
                format!("{AT}.type"),
                format!("`{t}` cannot request a referral; one of: {kinds}"),
            ));
        }
    }
    let kind_of = |t: &str| REQUESTER_TYPES.iter().copied().find(|k| *k == t);
    let kind = match r.get("reference").and_then(Value::as_str) {
        Some(x) if Some(x) == patient_ref => "Patient",
        Some(x) if x.starts_with('#') => {
            let id = &x[1..];
            let contained = sr
                .get("contained")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("id").and_then(Value::as_str) == Some(id))
                })
                .and_then(|c| c.get("resourceType").and_then(Value::as_str));
            match contained.and_then(kind_of).filter(|k| *k != "Patient") {
                Some(k) => k,
                None => {
                    return Err(Error::rule(
                        format!("{AT}.reference"),
                        format!("`{x}` must name a contained Practitioner, PractitionerRole, Organization or RelatedPerson"),
                    ))
                }
            }
        }
        Some(x) => match x.split_once('/') {
            Some(("Organization", id)) if cfg.provider(id).is_some() => "Organization",
            _ => {
                return Err(Error::rule(
                    format!("{AT}.reference"),
                    "must be the referral's own Patient (a self-referral), a contained resource (`#id`) \
                     or Organization/{provider id}; name anyone else by identifier and display",
                ))
            }
        },
        None => {
            let named = r.get("identifier").is_some() || r.get("display").is_some();
            match declared.and_then(kind_of).filter(|_| named) {
                Some(k) if k != "Patient" => k,
                _ => {
                    return Err(Error::rule(
                        AT,
                        format!("needs a reference, or a type ({kinds}, not Patient) with an identifier or display"),
                    ))
                }
            }
        }
    };
    if declared.is_some_and(|t| t != kind) {
        return Err(Error::rule(
            format!("{AT}.type"),
            format!(
                "says {} but the reference is to a {kind}",
                declared.unwrap_or_default()
            ),
        ));
    }
    let ods = r
        .pointer("/identifier/value")
        .and_then(Value::as_str)
        .filter(|_| {
            r.pointer("/identifier/system").and_then(Value::as_str) == Some(fhir::ODS_SYSTEM)
        });
    if ods.is_some_and(|o| cfg.practice(o).is_some()) {
        return Err(Error::rule(
            format!("{AT}.identifier"),
            "names a GP practice: practices refer through their own gp-system client",
        ));
    }
    Ok(kind)
}

/// The gateway's rules for an inbound ServiceRequest, by who sends it; returns where it
/// comes from. `patient` is the referral's Patient with the reference by which the
/// ServiceRequest may name it (its `fullUrl` in a transaction, `Patient/{id}` otherwise).
pub(crate) fn check_service_request(
    sr: &Value,
    who: &Principal,
    cfg: &Config,
    patient: Option<(&Value, &str)>,
) -> Result<Origin> {
    fhir::check_structure(sr, "ServiceRequest")?;
    let issues = fhir::service_request_rules(sr);
    if !issues.is_empty() {
        return Err(Error::Unprocessable(issues));
    }
    if fhir::referral_scope_of(sr).is_some() {
        return Err(Error::rule(
            "ServiceRequest.extension",
            format!(
                "must not carry {}: the gateway records who referred",
                fhir::referral_scope_extension_url()
            ),
        ));
    }
    let claimed = match fhir::source_of_referral_of(sr) {
        Some(code) => Some(fhir::source_of_referral(code).ok_or_else(|| {
            Error::rule(
                "ServiceRequest.extension",
                format!(
                    "`{code}` is not a source-of-referral code of {}; one of: {}",
                    fhir::source_of_referral_system(),
                    fhir::SOURCES_OF_REFERRAL
                        .iter()
                        .map(|s| s.code)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?),
        None => None,
    };
    if who.role == Role::GpSystem {
        let ods = fhir::requester_ods(sr).unwrap_or_default();
        if cfg.practice(&ods).is_none() || !who.practices.contains(&ods) {
            return Err(Error::rule(
                "ServiceRequest.requester",
                "must be a practice this client may refer for: {\"identifier\": {\"system\": \
                 \"https://fhir.nhs.uk/Id/ods-organization-code\", \"value\": \"<ODS code>\"}}",
            ));
        }
        return Ok(Origin {
            ns: ods.clone(),
            practice: Some(ods),
            referrer: None,
            source: claimed.unwrap_or_else(gp_source),
            gp: true,
        });
    }
    let kind = check_referrer_requester(sr, cfg, patient.map(|p| p.1))?;
    let configured = cfg
        .clients
        .iter()
        .find(|c| c.id == who.client_id)
        .and_then(|c| c.source_of_referral.as_deref())
        .and_then(fhir::source_of_referral);
    let by_requester = match kind {
        "Patient" => fhir::source_of_referral(fhir::SOURCE_SELF),
        "RelatedPerson" => fhir::source_of_referral(fhir::SOURCE_CARER),
        _ => None,
    };
    let Some(source) = claimed.or(by_requester).or(configured) else {
        return Err(Error::Internal(format!(
            "referrer client {} has no source of referral",
            who.client_id
        )));
    };
    // A GP practice learns of a referral it did not make only if the person agreed.
    let practice = if fhir::consents_to_inform_gp(sr) {
        match patient.and_then(|(p, _)| registered_practice(p, cfg)) {
            Some(ods) => Some(ods),
            None => {
                return Err(Error::rule(
                    "ServiceRequest.extension",
                    format!(
                        "{} is true, but the Patient's generalPractitioner names no practice this \
                         gateway serves (by ODS code): the practice cannot be told",
                        fhir::inform_gp_extension_url()
                    ),
                ))
            }
        }
    } else {
        None
    };
    Ok(Origin {
        ns: referrer_namespace(&who.client_id),
        practice,
        referrer: Some(who.client_id.clone()),
        source,
        gp: false,
    })
}

fn parse_if_none_exist(cond: &str) -> Result<(String, String)> {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(cond.trim_start_matches('?').as_bytes())
            .into_owned()
            .collect();
    match pairs.as_slice() {
        [(k, v)] if k == "identifier" => match v.split_once('|') {
            Some((s, v)) if !s.is_empty() && !v.is_empty() => Ok((s.to_string(), v.to_string())),
            _ => Err(Error::invalid(
                "value",
                "If-None-Exist",
                "identifier must be system|value",
            )),
        },
        _ => Err(Error::invalid(
            "not-supported",
            "If-None-Exist",
            "only identifier=system|value is supported",
        )),
    }
}
