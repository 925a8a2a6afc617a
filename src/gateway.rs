//! The gateway's use cases: what each API call does, from checked input to durable write.
//!
//! Data flows one way: `http` hands a [`Principal`] and the raw request here; this module
//! calls `ingest`/`fhir` to check and map, `routing` to choose a provider, `workflow` to
//! judge a status change, and `store` to write everything for one call in one atomic
//! transaction, then waits for [`Store::durable`] before returning (a 2xx means on disk).
//!
//! It also owns the key scheme ([`keys`]) and the scoping rules of DESIGN §3 (what each
//! principal may see: outside its scope a resource does not exist). It must not know HTTP
//! (status codes, headers) beyond returning typed [`Error`]s.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::auth::Principal;
use crate::config::{Config, Role};
use crate::error::{Error, Result};
use crate::fhir;
use crate::ingest;
use crate::routing;
use crate::store::{Abort, Store, Tx, TxError};
use crate::workflow;

/// The store's key scheme. Every key is ASCII; ids are FHIR ids (`[A-Za-z0-9.-]`), so `/`
/// separates fields unambiguously, and timestamps are fixed-width so keys sort by time.
pub mod keys {
    /// Current version of a resource.
    pub fn current(rtype: &str, id: &str) -> String {
        format!("r/{rtype}/{id}")
    }
    /// One version of a resource.
    pub fn version(rtype: &str, id: &str, v: u64) -> String {
        format!("h/{rtype}/{id}/{v:010}")
    }
    pub fn history(rtype: &str, id: &str) -> String {
        format!("h/{rtype}/{id}/")
    }
    /// Idempotency record of a GP referral: (practice, GP referral id) → ids and hash.
    pub fn referral(ods: &str, referral_id: &str) -> String {
        format!("k/ref/{ods}/{referral_id}")
    }
    /// The Patient a practice's referrals use for an NHS number.
    pub fn patient(ods: &str, nhs: &str) -> String {
        format!("k/pat/{ods}/{nhs}")
    }
    /// The Task that serves a ServiceRequest.
    pub fn sr_task(sr: &str) -> String {
        format!("k/srtask/{sr}")
    }
    /// A provider's number of open Tasks.
    pub fn open_count(provider: &str) -> String {
        format!("c/open/{provider}")
    }
    /// A provider may read this Patient or ServiceRequest (it owns a Task for it).
    pub fn access(rtype: &str, id: &str, provider: &str) -> String {
        format!("x/acc/{rtype}/{id}/{provider}")
    }
    /// Task index: scope is `o/{owner}`, `r/{requester}` or `a`; status `~` means any.
    pub fn task_prefix(scope: &str, status: &str) -> String {
        format!("x/task/{scope}/{status}/")
    }
    /// Observations by the ServiceRequest they are based on.
    pub fn obs_prefix(sr: &str) -> String {
        format!("x/obs/{sr}/")
    }
    /// The time-and-id suffix of an index key.
    pub fn suffix(ts: i64, id: &str) -> String {
        format!("{ts:020}/{id}")
    }
}

/// Resource types the store holds.
pub const STORED_TYPES: [&str; 4] = ["Patient", "ServiceRequest", "Task", "Observation"];

/// The gateway's clock reading for one request: the FHIR instant and its microseconds.
#[derive(Clone)]
pub struct Now {
    pub instant: String,
    pub micros: i64,
    pub time: OffsetDateTime,
}

impl Now {
    pub fn current() -> Now {
        let t = OffsetDateTime::now_utc();
        let t = t
            .replace_nanosecond(t.nanosecond() / 1000 * 1000)
            .unwrap_or(t);
        Now::at(t)
    }

    pub fn at(t: OffsetDateTime) -> Now {
        let instant = t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Now {
            instant,
            micros: (t.unix_timestamp_nanos() / 1000) as i64,
            time: t,
        }
    }
}

fn micros_of(instant: &str) -> i64 {
    ingest::parse_instant(instant)
        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
        .unwrap_or(0)
}

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
    pub patient: Value,
    pub service_request: Value,
    pub task: Value,
}

/// A page of search results.
pub struct Page {
    pub resources: Vec<Value>,
    /// Cursor for the next page, when there is one.
    pub next: Option<String>,
}

pub struct Gateway {
    cfg: Arc<Config>,
    store: Store,
}

type TxResult<T> = std::result::Result<T, Abort<Error>>;

fn fail<T>(e: Error) -> TxResult<T> {
    Err(Abort::Caller(e))
}

fn tx_json(tx: &Tx<'_>, key: &str) -> TxResult<Option<Value>> {
    match tx.get(key.as_bytes())? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .or_else(|e| fail(Error::Internal(format!("stored {key} unreadable: {e}")))),
    }
}

fn tx_put_json(tx: &Tx<'_>, key: &str, v: &impl Serialize) -> TxResult<()> {
    let bytes = serde_json::to_vec(v).or_else(|e| fail(Error::Internal(e.to_string())))?;
    tx.put(key.as_bytes(), &bytes)?;
    Ok(())
}

/// Writes a stamped resource as its current version and into its history.
fn tx_put_resource(tx: &Tx<'_>, rtype: &str, id: &str, resource: &Value) -> TxResult<()> {
    let v = fhir::version_of(resource);
    tx_put_json(tx, &keys::current(rtype, id), resource)?;
    tx_put_json(tx, &keys::version(rtype, id, v), resource)
}

fn tx_count(tx: &Tx<'_>, key: &str) -> TxResult<u64> {
    Ok(tx
        .get(key.as_bytes())?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

fn tx_add(tx: &Tx<'_>, key: &str, delta: i64) -> TxResult<()> {
    let n = tx_count(tx, key)? as i64 + delta;
    tx.put(key.as_bytes(), n.max(0).to_string().as_bytes())?;
    Ok(())
}

/// The index keys of one Task version.
fn task_index_keys(task: &Value) -> Vec<String> {
    let id = task.get("id").and_then(Value::as_str).unwrap_or_default();
    let status = task
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let ts = micros_of(fhir::last_updated_of(task));
    let suffix = keys::suffix(ts, id);
    let mut scopes = vec!["a".to_string()];
    if let Some(o) = task
        .get("owner")
        .and_then(|r| fhir::ref_id(r, "Organization"))
    {
        scopes.push(format!("o/{o}"));
    }
    if let Some(r) = task
        .get("requester")
        .and_then(|r| fhir::ref_id(r, "Organization"))
    {
        scopes.push(format!("r/{r}"));
    }
    let mut out = Vec::new();
    for s in scopes {
        out.push(format!("{}{suffix}", keys::task_prefix(&s, "~")));
        out.push(format!("{}{suffix}", keys::task_prefix(&s, status)));
    }
    out
}

fn org_of<'a>(resource: &'a Value, element: &str) -> Option<&'a str> {
    resource
        .get(element)
        .and_then(|r| fhir::ref_id(r, "Organization"))
}

fn hash_json(v: &Value) -> String {
    // serde_json's Map is ordered by key, so equal JSON gives equal bytes.
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

fn without_server_fields(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    v
}

impl Gateway {
    pub fn new(cfg: Arc<Config>, store: Store) -> Gateway {
        Gateway { cfg, store }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn commit<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T> {
        self.store.transact(f).map_err(|e| match e {
            TxError::Caller(e) => e,
            TxError::Store(e) => Error::Store(e),
        })
    }

    fn load(&self, rtype: &str, id: &str) -> Result<Option<Value>> {
        if !crate::config::is_fhir_id(id) {
            return Ok(None);
        }
        match self.store.get(keys::current(rtype, id).as_bytes())? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Internal(format!("stored {rtype}/{id} unreadable: {e}"))),
        }
    }

    fn has_key(&self, key: &str) -> Result<bool> {
        Ok(self.store.get(key.as_bytes())?.is_some())
    }

    /// Whether `who` may see `resource` (of `rtype`, current version) at all.
    fn visible(&self, who: &Principal, rtype: &str, resource: &Value) -> Result<bool> {
        let id = resource
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let gp_owns = |org: Option<&str>| org.is_some_and(|o| who.practices.iter().any(|p| p == o));
        Ok(match (who.role, rtype) {
            (Role::Auditor, _) => true,
            (Role::Admin, _) => false,
            (Role::GpSystem, "Task" | "ServiceRequest") => gp_owns(org_of(resource, "requester")),
            (Role::GpSystem, "Patient") => gp_owns(
                resource
                    .pointer("/generalPractitioner/0")
                    .and_then(|r| fhir::ref_id(r, "Organization")),
            ),
            (Role::Provider, "Task") => org_of(resource, "owner") == who.provider.as_deref(),
            (Role::Provider, "Patient" | "ServiceRequest") => match &who.provider {
                Some(p) => self.has_key(&keys::access(rtype, id, p))?,
                None => false,
            },
            (_, "Observation") => {
                let sr_id = resource
                    .pointer("/basedOn/0")
                    .and_then(|r| fhir::ref_id(r, "ServiceRequest"));
                match sr_id
                    .map(|s| self.load("ServiceRequest", s))
                    .transpose()?
                    .flatten()
                {
                    Some(sr) => self.visible(who, "ServiceRequest", &sr)?,
                    None => false,
                }
            }
            _ => false,
        })
    }

    /// `POST /referrals`: check, map, route and store an EMIS-style referral.
    pub async fn submit_referral(&self, who: &Principal, body: &[u8]) -> Result<Submitted> {
        if who.role != Role::GpSystem {
            return Err(Error::Forbidden);
        }
        let now = Now::current();
        let checked = ingest::parse_referral(body, &self.cfg, now.time)?;
        let r = &checked.referral;
        let ods = r.practice.ods_code.as_str();
        if !who.practices.iter().any(|p| p == ods) {
            return Err(Error::rule(
                "practice.odsCode",
                "is not a practice this client may refer for",
            ));
        }
        let hash = hash_json(&checked.canonical);
        let new_ids = ReferralRecord {
            hash: hash.clone(),
            patient: uuid::Uuid::new_v4().to_string(),
            service_request: uuid::Uuid::new_v4().to_string(),
            task: uuid::Uuid::new_v4().to_string(),
        };
        let cfg = &self.cfg;
        let mut codes: Vec<&str> = r
            .needs
            .iter()
            .filter_map(|n| cfg.need(n))
            .flat_map(|n| n.snomed.iter().map(String::as_str))
            .collect();
        codes.extend(r.reasons.iter().map(|c| c.code.as_str()));
        let facts = routing::Facts {
            needs: &r.needs,
            codes,
            district: &checked.district,
            practice: ods,
            age: checked.age,
        };
        let patient_body = fhir::patient(&checked, cfg);
        let ref_key = keys::referral(ods, &r.referral_id);
        let pat_key = keys::patient(ods, &r.patient.nhs_number);

        let (created, ids) = self.commit(|tx| {
            if let Some(rec) = tx_json(tx, &ref_key)? {
                let rec: ReferralRecord = serde_json::from_value(rec)
                    .or_else(|e| fail(Error::Internal(format!("referral record: {e}"))))?;
                if rec.hash != hash {
                    return fail(Error::Conflict(format!(
                        "referral {} from practice {ods} was already received with different \
                         content; send a new referralId for a new referral",
                        r.referral_id
                    )));
                }
                return Ok((false, rec));
            }
            // The practice's Patient for this NHS number: reuse it, new version if changed.
            let patient_id = match tx.get(pat_key.as_bytes())? {
                Some(id) => String::from_utf8_lossy(&id).into_owned(),
                None => new_ids.patient.clone(),
            };
            let current = tx_json(tx, &keys::current("Patient", &patient_id))?;
            let write_patient = match &current {
                Some(cur) => without_server_fields(cur) != patient_body,
                None => true,
            };
            if write_patient {
                let version = current.as_ref().map(fhir::version_of).unwrap_or(0) + 1;
                let mut p = patient_body.clone();
                fhir::stamp(&mut p, &patient_id, version, &now.instant);
                tx_put_resource(tx, "Patient", &patient_id, &p)?;
                tx.put(pat_key.as_bytes(), patient_id.as_bytes())?;
            }
            let decision = routing::route(cfg, &facts, |p| tx_count(tx, &keys::open_count(p)))?;
            let Some(provider) = cfg.provider(&decision.provider) else {
                return fail(Error::Internal("routed to an unknown provider".into()));
            };
            let sr_id = &new_ids.service_request;
            let task_id = &new_ids.task;
            let mut sr = fhir::service_request(&checked, cfg, &patient_id, provider);
            fhir::stamp(&mut sr, sr_id, 1, &now.instant);
            let mut task = fhir::task(
                &checked,
                cfg,
                (&patient_id, sr_id),
                provider,
                &decision,
                &now.instant,
            );
            fhir::stamp(&mut task, task_id, 1, &now.instant);
            tx_put_resource(tx, "ServiceRequest", sr_id, &sr)?;
            tx_put_resource(tx, "Task", task_id, &task)?;
            for k in task_index_keys(&task) {
                tx.put(k.as_bytes(), b"")?;
            }
            tx_add(tx, &keys::open_count(&provider.id), 1)?;
            tx.put(keys::sr_task(sr_id).as_bytes(), task_id.as_bytes())?;
            tx.put(
                keys::access("Patient", &patient_id, &provider.id).as_bytes(),
                b"",
            )?;
            tx.put(
                keys::access("ServiceRequest", sr_id, &provider.id).as_bytes(),
                b"",
            )?;
            let rec = ReferralRecord {
                patient: patient_id.clone(),
                ..new_ids.clone()
            };
            tx_put_json(tx, &ref_key, &rec)?;
            Ok((true, rec))
        })?;
        if created {
            self.store.durable().await?;
        }
        let get = |t: &str, id: &str| {
            self.load(t, id)?
                .ok_or_else(|| Error::Internal(format!("{t}/{id} missing after write")))
        };
        Ok(Submitted {
            created,
            patient: get("Patient", &ids.patient)?,
            service_request: get("ServiceRequest", &ids.service_request)?,
            task: get("Task", &ids.task)?,
        })
    }

    /// `GET /fhir/{type}/{id}`: the current version, if `who` may see it.
    pub fn read(&self, who: &Principal, rtype: &str, id: &str) -> Result<Value> {
        if rtype == "Organization" {
            return fhir::organization(&self.cfg, id)
                .filter(|_| who.role != Role::Admin)
                .ok_or_else(|| Error::not_found(format!("Organization/{id}")));
        }
        if !STORED_TYPES.contains(&rtype) {
            return Err(Error::not_found(format!("resource type {rtype}")));
        }
        match self.load(rtype, id)? {
            Some(r) if self.visible(who, rtype, &r)? => Ok(r),
            _ => Err(Error::not_found(format!("{rtype}/{id}"))),
        }
    }

    /// `GET /fhir/{type}/{id}/_history/{vid}`.
    pub fn vread(&self, who: &Principal, rtype: &str, id: &str, vid: &str) -> Result<Value> {
        self.read(who, rtype, id)?;
        let v: u64 = vid
            .parse()
            .map_err(|_| Error::not_found(format!("{rtype}/{id}/_history/{vid}")))?;
        match self.store.get(keys::version(rtype, id, v).as_bytes())? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| Error::Internal(e.to_string())),
            None => Err(Error::not_found(format!("{rtype}/{id}/_history/{vid}"))),
        }
    }

    /// `GET /fhir/{type}/{id}/_history`: every version, newest first.
    pub fn history(&self, who: &Principal, rtype: &str, id: &str) -> Result<Vec<Value>> {
        self.read(who, rtype, id)?;
        self.store
            .scan_rev(keys::history(rtype, id).as_bytes(), None, 1000)?
            .into_iter()
            .map(|(_, b)| serde_json::from_slice(&b).map_err(|e| Error::Internal(e.to_string())))
            .collect()
    }

    /// `PUT /fhir/Task/{id}`: a status change under the state machine, guarded by `If-Match`.
    pub async fn update_task(
        &self,
        who: &Principal,
        id: &str,
        if_match: Option<&str>,
        body: &[u8],
    ) -> Result<Value> {
        if !matches!(who.role, Role::Provider | Role::GpSystem) {
            return Err(Error::Forbidden);
        }
        let proposed = crate::schema::parse_json(body)?;
        fhir::check_structure(&proposed, "Task")?;
        if proposed.get("id").and_then(Value::as_str) != Some(id) {
            return Err(Error::invalid(
                "invariant",
                "Task.id",
                format!("must be present and equal the id in the URL ({id})"),
            ));
        }
        let expected = parse_if_match(if_match)?;
        let now = Now::current();
        let cfg = &self.cfg;
        let (task, created_obs) = self.commit(|tx| {
            let current = match tx_json(tx, &keys::current("Task", id))? {
                Some(t) => t,
                None => return fail(Error::not_found(format!("Task/{id}"))),
            };
            let in_scope = match who.role {
                Role::Provider => org_of(&current, "owner") == who.provider.as_deref(),
                Role::GpSystem => org_of(&current, "requester")
                    .is_some_and(|o| who.practices.iter().any(|p| p == o)),
                _ => false,
            };
            if !in_scope {
                return fail(Error::not_found(format!("Task/{id}")));
            }
            let version = fhir::version_of(&current);
            if version != expected {
                return fail(Error::PreconditionFailed(format!(
                    "If-Match names version {expected}, but Task/{id} is at version {version}: \
                     read it again and re-apply the change"
                )));
            }
            if let Some(path) = fhir::task_immutable_change(&current, &proposed) {
                return fail(Error::rule(
                    path,
                    format!(
                        "may not be changed; only {} may change",
                        fhir::TASK_MUTABLE.join(", ")
                    ),
                ));
            }
            workflow::check(&current, &proposed, who.role).or_else(fail)?;
            let to = proposed
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let from = current
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let sr_id = current
                .get("focus")
                .and_then(|r| fhir::ref_id(r, "ServiceRequest"))
                .unwrap_or_default()
                .to_string();
            if to == "completed" {
                for (i, obs_id) in workflow::output_observations(&proposed).iter().enumerate() {
                    let obs = tx_json(tx, &keys::current("Observation", obs_id))?;
                    let based_on = obs
                        .as_ref()
                        .and_then(|o| o.pointer("/basedOn/0"))
                        .and_then(|r| fhir::ref_id(r, "ServiceRequest"));
                    if based_on != Some(sr_id.as_str()) {
                        return fail(Error::rule(
                            format!("Task.output[{i}].valueReference"),
                            format!(
                                "Observation/{obs_id} is not an Observation posted for this \
                                 referral (basedOn ServiceRequest/{sr_id})"
                            ),
                        ));
                    }
                }
            }
            let mut task = proposed.clone();
            task["lastModified"] = Value::String(now.instant.clone());
            fhir::stamp(&mut task, id, version + 1, &now.instant);
            if let Some(obj) = task.as_object_mut() {
                obj.remove("text");
            }
            for k in task_index_keys(&current) {
                tx.remove(k.as_bytes())?;
            }
            for k in task_index_keys(&task) {
                tx.put(k.as_bytes(), b"")?;
            }
            tx_put_resource(tx, "Task", id, &task)?;
            if let Some(owner) = org_of(&current, "owner") {
                let delta = workflow::is_open(to) as i64 - workflow::is_open(from) as i64;
                if delta != 0 {
                    tx_add(tx, &keys::open_count(owner), delta)?;
                }
            }
            let mut created_obs = None;
            if to == "rejected" && fhir::is_patient_declined(&task) {
                let provider = org_of(&current, "owner").and_then(|o| cfg.provider(o));
                if let Some(provider) = provider {
                    let obs_id = uuid::Uuid::new_v4().to_string();
                    let mut obs = fhir::declined_observation(&task, provider, &now.instant);
                    fhir::stamp(&mut obs, &obs_id, 1, &now.instant);
                    self.tx_put_observation(tx, &obs_id, &sr_id, &obs, &now)?;
                    created_obs = Some(obs_id);
                }
            }
            Ok((task, created_obs))
        })?;
        self.store.durable().await?;
        if created_obs.is_some() {
            tracing::info!(task = id, "patient declined: declined Observation written");
        }
        Ok(task)
    }

    fn tx_put_observation(
        &self,
        tx: &Tx<'_>,
        obs_id: &str,
        sr_id: &str,
        obs: &Value,
        now: &Now,
    ) -> TxResult<()> {
        tx_put_resource(tx, "Observation", obs_id, obs)?;
        let key = format!(
            "{}{}",
            keys::obs_prefix(sr_id),
            keys::suffix(now.micros, obs_id)
        );
        tx.put(key.as_bytes(), b"")?;
        Ok(())
    }

    /// `POST /fhir/Observation`: a provider's feedback or outcome for a referral it serves.
    pub async fn create_observation(&self, who: &Principal, body: &[u8]) -> Result<Value> {
        let Some(provider_id) = who
            .provider
            .as_deref()
            .filter(|_| who.role == Role::Provider)
        else {
            return Err(Error::Forbidden);
        };
        let posted = crate::schema::parse_json(body)?;
        fhir::check_structure(&posted, "Observation")?;
        let (_kind, sr_id) = fhir::check_feedback(&posted, &self.cfg)?;
        let now = Now::current();
        let obs_id = uuid::Uuid::new_v4().to_string();
        let not_served = || {
            Error::rule(
                "Observation.basedOn[0]",
                format!("ServiceRequest/{sr_id} is not a referral this provider serves"),
            )
        };
        let obs = self.commit(|tx| {
            let task_id = match tx.get(keys::sr_task(&sr_id).as_bytes())? {
                Some(t) => String::from_utf8_lossy(&t).into_owned(),
                None => return fail(not_served()),
            };
            let Some(task) = tx_json(tx, &keys::current("Task", &task_id))? else {
                return fail(not_served());
            };
            if org_of(&task, "owner") != Some(provider_id) {
                return fail(not_served());
            }
            let status = task.get("status").and_then(Value::as_str).unwrap_or_default();
            if workflow::is_final(status) {
                return fail(Error::rule(
                    "Observation.basedOn[0]",
                    format!("the referral's Task is {status}: it takes no more feedback"),
                ));
            }
            let subject = posted.pointer("/subject/reference").and_then(Value::as_str);
            let expected_subject = task.pointer("/for/reference").and_then(Value::as_str);
            if subject != expected_subject {
                return fail(Error::rule(
                    "Observation.subject",
                    format!(
                        "must be {{\"reference\": \"{}\"}}, the referral's patient",
                        expected_subject.unwrap_or_default()
                    ),
                ));
            }
            let performs = posted
                .get("performer")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|p| fhir::ref_id(p, "Organization") == Some(provider_id)));
            if !performs {
                return fail(Error::rule(
                    "Observation.performer",
                    format!("must include {{\"reference\": \"Organization/{provider_id}\"}}, this provider"),
                ));
            }
            let mut obs = posted.clone();
            fhir::stamp(&mut obs, &obs_id, 1, &now.instant);
            self.tx_put_observation(tx, &obs_id, &sr_id, &obs, &now)?;
            Ok(obs)
        })?;
        self.store.durable().await?;
        Ok(obs)
    }

    /// `GET /fhir/Task?...`: index-backed, scoped, oldest change first.
    pub fn search_tasks(&self, who: &Principal, q: &Query) -> Result<Page> {
        let mut scopes = Vec::new();
        let mut owner_filter = q.owner.clone();
        let mut requester_filter = q.requester.clone();
        match who.role {
            Role::Admin => return Err(Error::Forbidden),
            Role::Provider => {
                let own = who.provider.clone().unwrap_or_default();
                if owner_filter.as_deref().is_some_and(|o| o != own) {
                    return Ok(Page {
                        resources: vec![],
                        next: None,
                    });
                }
                scopes.push(format!("o/{own}"));
                owner_filter = None;
            }
            Role::GpSystem => {
                for p in &who.practices {
                    if requester_filter.as_deref().is_none_or(|r| r == p) {
                        scopes.push(format!("r/{p}"));
                    }
                }
                requester_filter = None;
            }
            Role::Auditor => {
                if let Some(o) = owner_filter.take() {
                    scopes.push(format!("o/{o}"));
                } else if let Some(r) = requester_filter.take() {
                    scopes.push(format!("r/{r}"));
                } else {
                    scopes.push("a".into());
                }
            }
        }
        let statuses: Vec<&str> = if q.status.is_empty() {
            vec!["~"]
        } else {
            q.status.iter().map(String::as_str).collect()
        };
        let prefixes: Vec<String> = scopes
            .iter()
            .flat_map(|s| statuses.iter().map(move |st| keys::task_prefix(s, st)))
            .collect();
        self.page(&prefixes, q, "Task", |t| {
            owner_filter
                .as_deref()
                .is_none_or(|o| org_of(t, "owner") == Some(o))
                && requester_filter
                    .as_deref()
                    .is_none_or(|r| org_of(t, "requester") == Some(r))
        })
    }

    /// `GET /fhir/Observation?based-on=ServiceRequest/{id}`: scoped to referrals `who` sees.
    pub fn search_observations(&self, who: &Principal, q: &Query) -> Result<Page> {
        if who.role == Role::Admin {
            return Err(Error::Forbidden);
        }
        let Some(sr_id) = q.based_on.as_deref() else {
            return Err(Error::invalid(
                "required",
                "based-on",
                "Observation search needs based-on=ServiceRequest/{id}",
            ));
        };
        match self.load("ServiceRequest", sr_id)? {
            Some(sr) if self.visible(who, "ServiceRequest", &sr)? => {}
            _ => {
                return Ok(Page {
                    resources: vec![],
                    next: None,
                })
            }
        }
        self.page(&[keys::obs_prefix(sr_id)], q, "Observation", |_| true)
    }

    /// Merges the index ranges under `prefixes` in (time, id) order, loading and filtering
    /// resources until a page is full.
    fn page(
        &self,
        prefixes: &[String],
        q: &Query,
        rtype: &str,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<Page> {
        const CHUNK: usize = 64;
        let lower = match (&q.cursor, q.after.as_deref()) {
            (Some(c), Some(a)) => Some(std::cmp::max(c.as_str(), a).to_string()),
            (Some(c), None) => Some(c.clone()),
            (None, a) => a.map(str::to_string),
        };
        struct Stream {
            prefix: String,
            after: Option<Vec<u8>>,
            buf: VecDeque<String>,
            done: bool,
        }
        let mut streams: Vec<Stream> = prefixes
            .iter()
            .map(|p| Stream {
                prefix: p.clone(),
                after: lower.as_ref().map(|l| format!("{p}{l}").into_bytes()),
                buf: VecDeque::new(),
                done: false,
            })
            .collect();
        let mut out = Vec::new();
        let mut last_suffix = None;
        loop {
            for s in streams.iter_mut() {
                if s.buf.is_empty() && !s.done {
                    let rows = self
                        .store
                        .scan(s.prefix.as_bytes(), s.after.as_deref(), CHUNK)?;
                    s.done = rows.len() < CHUNK;
                    if let Some((k, _)) = rows.last() {
                        s.after = Some(k.clone());
                    }
                    for (k, _) in rows {
                        s.buf
                            .push_back(String::from_utf8_lossy(&k[s.prefix.len()..]).into_owned());
                    }
                }
            }
            let Some(best) = streams
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.buf.front().map(|f| (f.clone(), i)))
                .min()
            else {
                break;
            };
            let (suffix, i) = best;
            streams[i].buf.pop_front();
            if q.before.as_deref().is_some_and(|b| suffix.as_str() >= b) {
                break;
            }
            let id = suffix.rsplit('/').next().unwrap_or_default();
            let Some(resource) = self.load(rtype, id)? else {
                continue;
            };
            if !keep(&resource) {
                continue;
            }
            if out.len() == q.count {
                return Ok(Page {
                    resources: out,
                    next: last_suffix,
                });
            }
            out.push(resource);
            last_suffix = Some(suffix);
        }
        Ok(Page {
            resources: out,
            next: None,
        })
    }
}

fn parse_if_match(h: Option<&str>) -> Result<u64> {
    let Some(h) = h else {
        return Err(Error::PreconditionRequired(
            "If-Match is required: send the ETag of the version you read, e.g. If-Match: W/\"1\""
                .into(),
        ));
    };
    let v = h.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.trim_matches('"').parse().map_err(|_| {
        Error::invalid(
            "value",
            "If-Match",
            "must be an ETag such as W/\"3\" (the version you read)",
        )
    })
}

/// Parsed search parameters (Task and Observation).
#[derive(Debug, Default, Clone)]
pub struct Query {
    pub owner: Option<String>,
    pub requester: Option<String>,
    pub status: Vec<String>,
    pub based_on: Option<String>,
    /// Index suffix after which results start (from `_lastUpdated=gt|ge`).
    pub after: Option<String>,
    /// Index suffix at or after which results stop (from `_lastUpdated=lt|le`).
    pub before: Option<String>,
    pub cursor: Option<String>,
    pub count: usize,
    /// The parameters as given, less the cursor, for `self` and `next` links.
    pub echo: Vec<(String, String)>,
}

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 200;

impl Query {
    /// Parses the parameters of a search on `rtype`; unknown parameters are refused (400)
    /// so that a filter a client believes it applied is never silently dropped.
    pub fn parse(rtype: &str, params: &[(String, String)]) -> Result<Query> {
        let mut q = Query {
            count: DEFAULT_COUNT,
            ..Query::default()
        };
        let bad =
            |name: &str, msg: &str| Error::invalid("value", name.to_string(), msg.to_string());
        for (name, value) in params {
            if name != "_cursor" {
                q.echo.push((name.clone(), value.clone()));
            }
            match (rtype, name.as_str()) {
                ("Task", "owner") => {
                    q.owner = Some(
                        org_param(value)
                            .ok_or_else(|| bad(name, "must be Organization/{id} or {id}"))?,
                    )
                }
                ("Task", "requester") => {
                    q.requester = Some(
                        org_param(value)
                            .ok_or_else(|| bad(name, "must be Organization/{id} or {id}"))?,
                    )
                }
                ("Task", "status") => {
                    for s in value.split(',') {
                        if !workflow::STATUSES.contains(&s) {
                            return Err(bad(name, &format!("`{s}` is not a Task status")));
                        }
                        q.status.push(s.to_string());
                    }
                }
                ("Observation", "based-on") => {
                    let id = value.strip_prefix("ServiceRequest/").unwrap_or(value);
                    if !crate::config::is_fhir_id(id) {
                        return Err(bad(name, "must be ServiceRequest/{id}"));
                    }
                    q.based_on = Some(id.to_string());
                }
                (_, "_lastUpdated") => {
                    let (op, rest) = value.split_at(value.len().min(2));
                    let (op, instant) = match op {
                        "gt" | "ge" | "lt" | "le" => (op, rest),
                        _ => ("eq", value.as_str()),
                    };
                    let micros = parse_search_instant(instant)
                        .ok_or_else(|| bad(name, "must be a prefix (gt, ge, lt, le) and an instant such as gt2026-11-20T10:00:00Z"))?;
                    match op {
                        "gt" => q.after = Some(format!("{micros:020}/~")),
                        "ge" => q.after = Some(format!("{micros:020}/")),
                        "lt" => q.before = Some(format!("{micros:020}/")),
                        "le" => q.before = Some(format!("{micros:020}/~")),
                        _ => return Err(bad(name, "needs a prefix: gt, ge, lt or le")),
                    }
                }
                (_, "_count") => {
                    q.count = value
                        .parse::<usize>()
                        .ok()
                        .filter(|c| (1..=MAX_COUNT).contains(c))
                        .ok_or_else(|| {
                            bad(
                                name,
                                &format!("must be a whole number from 1 to {MAX_COUNT}"),
                            )
                        })?;
                }
                (_, "_cursor") => {
                    let ok = value.len() > 21
                        && value.as_bytes()[20] == b'/'
                        && value[..20].bytes().all(|b| b.is_ascii_digit())
                        && crate::config::is_fhir_id(&value[21..]);
                    if !ok {
                        return Err(bad(name, "is not a cursor this server issued"));
                    }
                    q.cursor = Some(value.clone());
                }
                (_, "_format")
                    if matches!(
                        value.as_str(),
                        "json" | "application/fhir+json" | "application/json"
                    ) => {}
                _ => {
                    return Err(Error::invalid(
                        "not-supported",
                        name.clone(),
                        format!("is not a search parameter this server supports for {rtype}"),
                    ))
                }
            }
        }
        Ok(q)
    }
}

fn org_param(v: &str) -> Option<String> {
    let id = v.strip_prefix("Organization/").unwrap_or(v);
    crate::config::is_fhir_id(id).then(|| id.to_string())
}

/// An instant, or a date (taken as its start, UTC), as microseconds since the epoch.
fn parse_search_instant(s: &str) -> Option<i64> {
    if let Some(t) = ingest::parse_instant(s) {
        return Some((t.unix_timestamp_nanos() / 1000) as i64);
    }
    let d = ingest::parse_date(s)?;
    Some(d.midnight().assume_utc().unix_timestamp() * 1_000_000)
}

/// A searchset Bundle for `page`, with `self` and `next` links under `base`.
pub fn searchset(base: &str, rtype: &str, q: &Query, page: Page) -> Value {
    let encode = |extra: Option<&str>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &q.echo {
            s.append_pair(k, v);
        }
        if let Some(c) = extra {
            s.append_pair("_cursor", c);
        }
        s.finish()
    };
    let mut links = vec![
        json!({ "relation": "self", "url": format!("{base}/{rtype}?{}", encode(q.cursor.as_deref())) }),
    ];
    if let Some(next) = &page.next {
        links.push(
            json!({ "relation": "next", "url": format!("{base}/{rtype}?{}", encode(Some(next))) }),
        );
    }
    let entries: Vec<Value> = page
        .resources
        .into_iter()
        .map(|r| {
            let t = r.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_string();
            let id = r.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
            json!({ "fullUrl": format!("{base}/{t}/{id}"), "resource": r, "search": { "mode": "match" } })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries
    })
}
