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
//!
//! - `referral`: creating referrals (EMIS-style JSON, FHIR transaction, conditional create)
//! - `task`: Task updates (PUT, PATCH) under the state machine
//! - `observation`: provider feedback
//! - `search`: search parameters, index-backed paging, Bundles
//! - `self_referral`: a person's own referral from the public page
//! - `directory`: importing ORUK feeds, reading and searching the directory, a provider's
//!   capacity status

pub mod archive;
pub mod directory;
pub mod inbox;
mod observation;
mod referral;
pub mod report;
pub mod search;
pub mod self_referral;
mod task;

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::auth::Principal;
use crate::config::{Config, Role};
use crate::error::{Error, Result};
use crate::fhir;
use crate::ingest;
use crate::store::{Abort, Store, Tx, TxError};

pub use crate::clock::Now;
pub use crate::fhir::check_patient;
pub use referral::{check_transaction, Submitted};
pub use search::{searchset, Query, SearchResult};

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
    /// Idempotency record of a referral: EMIS (practice, GP referral id), or a FHIR
    /// ServiceRequest identifier (by the SHA-256 of `system|value`).
    pub fn referral(ods: &str, referral_id: &str) -> String {
        format!("k/ref/{ods}/{referral_id}")
    }
    pub fn sr_identifier(hash: &str) -> String {
        format!("k/sri/{hash}")
    }
    /// The Task that serves a ServiceRequest.
    pub fn sr_task(sr: &str) -> String {
        format!("k/srtask/{sr}")
    }
    /// A provider's number of open Tasks.
    pub fn open_count(provider: &str) -> String {
        format!("c/open/{provider}")
    }
    /// A scope (`o/{provider}`, `r/{ODS code}` or `f/{client}`) may read this Patient or
    /// ServiceRequest: the provider owns a Task for it, the practice referred it (or was
    /// told of it with the person's consent), or the referring client sent it.
    pub fn access(rtype: &str, id: &str, scope: &str) -> String {
        format!("x/acc/{rtype}/{id}/{scope}")
    }
    /// Time-ordered index of a type: scope is `a` (all), `o/{provider}`, `r/{ODS code}` or
    /// `f/{referrer client}`;
    /// status is the version's for the types searched by status ([`super::statuses_of`]),
    /// else `~` (stores written before kept a copy of every version under `~` too).
    pub fn time_prefix(rtype: &str, scope: &str, status: &str) -> String {
        format!("x/{rtype}/{scope}/{status}/")
    }
    /// Resources that refer to a Patient (`Task` by `for`, `ServiceRequest` and
    /// `Observation` by `subject`), by the time each was written with that Patient (not
    /// moved by later versions: a search by patient orders what it finds by its current
    /// `lastUpdated`).
    pub fn by_patient(rtype: &str, patient: &str) -> String {
        format!("p/{rtype}/{patient}/")
    }
    /// Observations by the ServiceRequest they are based on.
    pub fn obs_by_sr(sr: &str) -> String {
        format!("b/{sr}/")
    }
    /// Patients by NHS number (one per practice).
    pub fn patient_by_nhs(nhs: &str) -> String {
        format!("n/{nhs}/")
    }
    /// Every version of a type by scope, in write order (type-level history): a list
    /// (`lists`) of `{id}/{version}` by write time.
    pub fn type_history(rtype: &str, scope: &str) -> String {
        format!("y/{rtype}/{scope}/")
    }
    /// The time-and-id suffix of an index key.
    pub fn suffix(ts: i64, id: &str) -> String {
        format!("{ts:020}/{id}")
    }

    /// What kind of key this is (the store layout table in ARCHITECTURE.md), with ids,
    /// times, sequence numbers, provider and practice codes left out: `x/Task/o/status`
    /// for every provider's by-status Task index. The census of what a referral's life
    /// writes (`sp-gateway-bench --census`) counts keys by it.
    pub fn kind(key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        let p: Vec<&str> = key.split('/').collect();
        let at = |i: usize| p.get(i).copied().unwrap_or("");
        // A scope (`a`, `o/{provider}`, `r/{ods}`) at `i`: its letter, and where it ends.
        let scope = |i: usize| match at(i) {
            "a" => ("a", i + 1),
            "o" => ("o", i + 2),
            "r" => ("r", i + 2),
            "f" => ("f", i + 2),
            _ => ("?", i + 1),
        };
        match at(0) {
            "r" | "h" | "p" | "k" | "c" | "u" => format!("{}/{}", at(0), at(1)),
            "o" => format!("o/{}", at(1)),
            "y" => format!("y/{}/{}", at(1), scope(2).0),
            "x" => match at(1) {
                "acc" | "prov" => format!("x/{}/{}", at(1), at(2)),
                "ae" if at(2) == "e" => format!("x/ae/e/{}", at(3)),
                "ae" => format!("x/ae/{}", at(2)),
                rtype => {
                    let (s, end) = scope(2);
                    let status = if at(end) == "~" { "~" } else { "status" };
                    format!("x/{rtype}/{s}/{status}")
                }
            },
            other => other.to_string(),
        }
    }
}

/// Resource types the store holds.
pub const STORED_TYPES: [&str; 4] = ["Patient", "ServiceRequest", "Task", "Observation"];

/// What a response carrying `v` (a resource or a Bundle of them) discloses to its caller:
/// each patient-data resource (`Task/{id}`) and the Patient it is about (IHE BALP), for the
/// request's AuditEvent.
pub fn disclosed_by(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_disclosed(v, &mut out);
    out
}

fn collect_disclosed(v: &Value, out: &mut Vec<String>) {
    let rtype = v
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if rtype == "Bundle" {
        for e in v
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = e.get("resource") {
                collect_disclosed(r, out);
            }
        }
        return;
    }
    if !STORED_TYPES.contains(&rtype) {
        return;
    }
    let Some(id) = v.get("id").and_then(Value::as_str) else {
        return;
    };
    let patient = match rtype {
        "Patient" => None,
        "Task" => v.get("for"),
        _ => v.get("subject"),
    }
    .and_then(|r| crate::fhir::ref_id(r, "Patient"));
    for e in [
        Some(format!("{rtype}/{id}")),
        patient.map(|p| format!("Patient/{p}")),
    ]
    .into_iter()
    .flatten()
    {
        if !out.contains(&e) {
            out.push(e);
        }
    }
}

/// The write time of a transaction: the wall clock, but always after the previous write's
/// (kept in the store), so that `lastUpdated` and every time index follow commit order
/// (sled runs transactions one at a time). A poll with `_lastUpdated=gt{last seen}` can then
/// never miss a write that committed after the one it saw.
pub(crate) fn tx_now(tx: &Tx<'_>) -> TxResult<Now> {
    const CLOCK: &[u8] = b"c/clock";
    let wall = Now::current();
    let last = tx
        .get(CLOCK)?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0);
    let micros = wall.micros.max(last + 1);
    tx.put(CLOCK, micros.to_string().as_bytes())?;
    Ok(if micros == wall.micros {
        wall
    } else {
        Now::from_micros(micros)
    })
}

pub(crate) fn micros_of(instant: &str) -> i64 {
    ingest::parse_instant(instant)
        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
        .unwrap_or(0)
}

/// The stored resources an outcome letter is written from (`Gateway::letter_sources`).
pub struct LetterSources {
    pub task: Value,
    pub history: Vec<Value>,
    pub patient: Value,
    pub service_request: Value,
    pub observations: Vec<Value>,
}

pub struct Gateway {
    cfg: Arc<Config>,
    store: Store,
    /// The directory's facts (services, places), reloaded after each directory write.
    directory: std::sync::RwLock<Arc<crate::directory::Directory>>,
    /// Directory writes (imports, capacity statuses) one at a time.
    directory_writes: tokio::sync::Mutex<()>,
}

pub type TxResult<T> = std::result::Result<T, Abort<Error>>;

pub(crate) fn fail<T>(e: Error) -> TxResult<T> {
    Err(Abort::Caller(e))
}

pub(crate) fn tx_json(tx: &Tx<'_>, key: &str) -> TxResult<Option<Value>> {
    match tx.get(key.as_bytes())? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .or_else(|e| fail(Error::Internal(format!("stored {key} unreadable: {e}")))),
    }
}

pub(crate) fn tx_put_json(tx: &Tx<'_>, key: &str, v: &impl Serialize) -> TxResult<()> {
    let bytes = serde_json::to_vec(v).or_else(|e| fail(Error::Internal(e.to_string())))?;
    tx.put(key.as_bytes(), &bytes)?;
    Ok(())
}

pub(crate) fn tx_count(tx: &Tx<'_>, key: &str) -> TxResult<u64> {
    Ok(tx
        .get(key.as_bytes())?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

pub(crate) fn tx_add(tx: &Tx<'_>, key: &str, delta: i64) -> TxResult<()> {
    let n = tx_count(tx, key)? as i64 + delta;
    tx.put(key.as_bytes(), n.max(0).to_string().as_bytes())?;
    Ok(())
}

/// The scopes a resource version is indexed under: everyone (`a`), its provider
/// (`o/{id}`), its GP practice (`r/{ods}`) and the client that referred it when that was
/// not a GP system (`f/{client}`).
pub(crate) fn scopes(provider: Option<&str>, parties: fhir::Parties<'_>) -> Vec<String> {
    let mut out = vec!["a".to_string()];
    if let Some(p) = provider {
        out.push(format!("o/{p}"));
    }
    if let Some(r) = parties.practice {
        out.push(format!("r/{r}"));
    }
    if let Some(f) = parties.referrer {
        out.push(format!("f/{f}"));
    }
    out
}

/// Versions a scope's type-history list holds before it is set aside as a chunk (the list
/// is rewritten with each version it gains, so it is kept short).
const TYPE_HISTORY_CHUNK: usize = 8;

/// The statuses of a type searched by status (Task, ServiceRequest). Such a type's time
/// index is kept by status only (one key per scope for the current version): a search
/// without a status reads the index of every status and merges them by time. A version whose status is not one of
/// these goes in the index for any status (`~`), which that search reads too, as it does
/// the copy for any status that stores written before this kept beside the one by status.
pub(crate) fn statuses_of(rtype: &str) -> Option<&'static [&'static str]> {
    match rtype {
        "Task" => Some(&fhir::TASK_STATUSES),
        "ServiceRequest" => Some(&fhir::REQUEST_STATUSES),
        _ => None,
    }
}

/// The time index keys of one resource version: by scope, and by status for the types
/// searched by status. (Stores written before also moved a `p/` key with every version.)
pub(crate) fn index_keys(rtype: &str, resource: &Value, scopes: &[String]) -> Vec<String> {
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let status = resource
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let suffix = keys::suffix(micros_of(fhir::last_updated_of(resource)), id);
    let mut out = Vec::new();
    let status = match statuses_of(rtype) {
        Some(known) if known.contains(&status) => status,
        _ => "~",
    };
    for s in scopes {
        out.push(format!("{}{suffix}", keys::time_prefix(rtype, s, status)));
    }
    out
}

/// The Patient a resource refers to (`Task.for`, else `subject`).
fn patient_of<'a>(rtype: &str, resource: &'a Value) -> Option<&'a str> {
    let element = if rtype == "Task" { "for" } else { "subject" };
    resource
        .get(element)
        .and_then(|r| fhir::ref_id(r, "Patient"))
}

/// Writes a stamped resource: the current version (the version it supersedes, `previous`,
/// moves to history), time indexes (replacing those of `previous`) and the type-history
/// index. History holds superseded versions only: the current one is read from `r/`.
pub(crate) fn tx_put_resource(
    tx: &Tx<'_>,
    rtype: &str,
    resource: &Value,
    previous: Option<&Value>,
    scopes: &[String],
) -> TxResult<()> {
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let v = fhir::version_of(resource);
    if let Some(prev) = previous {
        for k in index_keys(rtype, prev, scopes) {
            tx.remove(k.as_bytes())?;
        }
    }
    for k in index_keys(rtype, resource, scopes) {
        tx.put(k.as_bytes(), b"")?;
    }
    // By patient: once, when the resource first refers to its Patient.
    if let Some(p) = patient_of(rtype, resource) {
        if previous.and_then(|prev| patient_of(rtype, prev)) != Some(p) {
            let suffix = keys::suffix(micros_of(fhir::last_updated_of(resource)), id);
            tx.put(
                format!("{}{suffix}", keys::by_patient(rtype, p)).as_bytes(),
                b"",
            )?;
        }
    }
    let ts = micros_of(fhir::last_updated_of(resource));
    for s in scopes {
        crate::lists::tx_push(
            tx,
            &keys::type_history(rtype, s),
            u64::try_from(ts).unwrap_or(0),
            format!("{id}/{v}").as_bytes(),
            TYPE_HISTORY_CHUNK,
        )?;
    }
    let json = |r: &Value| serde_json::to_vec(r).or_else(|e| fail(Error::Internal(e.to_string())));
    if let Some(prev) = previous {
        let pv = fhir::version_of(prev);
        tx.put(keys::version(rtype, id, pv).as_bytes(), &json(prev)?)?;
    }
    tx.put(keys::current(rtype, id).as_bytes(), &json(resource)?)?;
    Ok(())
}

pub(crate) fn org_of<'a>(resource: &'a Value, element: &str) -> Option<&'a str> {
    resource
        .get(element)
        .and_then(|r| fhir::ref_id(r, "Organization"))
}

impl Gateway {
    pub fn new(cfg: Arc<Config>, store: Store) -> Gateway {
        let gw = Gateway {
            cfg,
            store,
            directory: std::sync::RwLock::default(),
            directory_writes: tokio::sync::Mutex::new(()),
        };
        if let Err(e) = gw.reload_directory() {
            tracing::error!(error = %e, "the directory could not be read: routing uses the config's rules only");
        }
        gw
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn commit<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T> {
        self.store.transact(f).map_err(|e| match e {
            TxError::Caller(e) => e,
            TxError::Store(e) => Error::Store(e),
        })
    }

    pub fn load(&self, rtype: &str, id: &str) -> Result<Option<Value>> {
        if !crate::config::is_fhir_id(id) {
            return Ok(None);
        }
        match self.get(keys::current(rtype, id).as_bytes())? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Internal(format!("stored {rtype}/{id} unreadable: {e}"))),
        }
    }

    /// What an outcome letter is written from: Task `id` as it was at `version`, its versions
    /// up to then (oldest first), its Patient and ServiceRequest, and the referral's
    /// Observations. `None` when any of them is missing.
    pub fn letter_sources(&self, id: &str, version: u64) -> Result<Option<LetterSources>> {
        let mut history = Vec::new();
        for v in 1..=version {
            match self.load_version("Task", id, v)? {
                Some(t) => history.push(t),
                None => return Ok(None),
            }
        }
        let Some(task) = history.last().cloned() else {
            return Ok(None);
        };
        let reference = |element: &str, rtype: &str| {
            task.get(element)
                .and_then(|r| crate::fhir::ref_id(r, rtype))
                .map(str::to_string)
        };
        let (Some(sr_id), Some(patient_id)) = (
            reference("focus", "ServiceRequest"),
            reference("for", "Patient"),
        ) else {
            return Ok(None);
        };
        let (Some(sr), Some(patient)) = (
            self.load("ServiceRequest", &sr_id)?,
            self.load("Patient", &patient_id)?,
        ) else {
            return Ok(None);
        };
        let mut observations = Vec::new();
        for (k, _) in self.scan(keys::obs_by_sr(&sr_id).as_bytes(), 10_000)? {
            let k = String::from_utf8_lossy(&k);
            if let Some(obs) = k.rsplit('/').next().map(|o| self.load("Observation", o)) {
                if let Some(o) = obs? {
                    observations.push(o);
                }
            }
        }
        Ok(Some(LetterSources {
            task,
            history,
            patient,
            service_request: sr,
            observations,
        }))
    }

    fn has_key(&self, key: &str) -> Result<bool> {
        Ok(self.get(key.as_bytes())?.is_some())
    }

    /// Whether `who` may see `resource` (of `rtype`, current version) at all.
    pub(crate) fn visible(&self, who: &Principal, rtype: &str, resource: &Value) -> Result<bool> {
        let id = resource
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let gp_owns = |org: Option<&str>| org.is_some_and(|o| who.practices.iter().any(|p| p == o));
        Ok(match (who.role, rtype) {
            (Role::Auditor, _) => true,
            (Role::Admin | Role::Commissioner, _) => false,
            (Role::GpSystem, "Task" | "ServiceRequest") => {
                gp_owns(fhir::parties_of(resource).practice)
            }
            (Role::GpSystem, "Patient") => {
                let mut any = false;
                for ods in &who.practices {
                    any = any || self.has_key(&keys::access(rtype, id, &format!("r/{ods}")))?;
                }
                any
            }
            (Role::Provider, "Task") => org_of(resource, "owner") == who.provider.as_deref(),
            (Role::Referrer, "Task" | "ServiceRequest") => {
                fhir::parties_of(resource).referrer == Some(who.client_id.as_str())
            }
            (Role::Referrer, "Patient") => {
                self.has_key(&keys::access(rtype, id, &format!("f/{}", who.client_id)))?
            }
            (Role::Provider, "Patient" | "ServiceRequest") => match &who.provider {
                Some(p) => self.has_key(&keys::access(rtype, id, &format!("o/{p}")))?,
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

    /// `GET /fhir/{type}/{id}`: the current version, if `who` may see it.
    pub fn read(&self, who: &Principal, rtype: &str, id: &str) -> Result<Value> {
        if crate::directory::TYPES.contains(&rtype) {
            return self.read_directory(who, rtype, id);
        }
        if rtype == "Measure" {
            return self.read_measure(who, id);
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
        self.load_version(rtype, id, v)?
            .ok_or_else(|| Error::not_found(format!("{rtype}/{id}/_history/{vid}")))
    }

    /// Version `v` of a resource: a superseded one from history, the current one from `r/`.
    fn load_version(&self, rtype: &str, id: &str, v: u64) -> Result<Option<Value>> {
        match self.get(keys::version(rtype, id, v).as_bytes())? {
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Internal(format!("stored {rtype}/{id} unreadable: {e}"))),
            None => Ok(self
                .load(rtype, id)?
                .filter(|cur| fhir::version_of(cur) == v)),
        }
    }

    /// `GET /fhir/{type}/{id}/_history`: every version, newest first (the current one, then
    /// the superseded ones; a store written before history held superseded versions only
    /// has the current one in history too, and it is not repeated).
    pub fn history(&self, who: &Principal, rtype: &str, id: &str) -> Result<Vec<Value>> {
        let current = self.read(who, rtype, id)?;
        let cv = fhir::version_of(&current);
        let mut out = vec![current];
        let prefix = keys::history(rtype, id);
        let mut versions = self.store.scan_rev(prefix.as_bytes(), None, 1000)?;
        if versions.is_empty() {
            versions = self.scan(prefix.as_bytes(), 1000)?;
            versions.reverse();
        }
        for (_, b) in versions {
            let v: Value =
                serde_json::from_slice(&b).map_err(|e| Error::Internal(e.to_string()))?;
            if fhir::version_of(&v) != cv {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// `GET /fhir/{type}/_history`: the newest `count` versions of resources of `rtype` that
    /// `who` may see, read from the type-history index of the caller's scopes.
    pub fn type_history(&self, who: &Principal, rtype: &str, count: usize) -> Result<Vec<Value>> {
        let scopes: Vec<String> = match who.role {
            Role::Admin | Role::Commissioner => return Err(Error::Forbidden),
            Role::Auditor => vec!["a".into()],
            Role::Provider => who.provider.iter().map(|p| format!("o/{p}")).collect(),
            Role::GpSystem => who.practices.iter().map(|p| format!("r/{p}")).collect(),
            Role::Referrer => vec![format!("f/{}", who.client_id)],
        };
        let mut rows = Vec::new();
        for s in &scopes {
            rows.extend(crate::lists::newest(
                &self.store,
                &keys::type_history(rtype, s),
                count,
            )?);
        }
        rows.sort_by(|a, b| b.cmp(a));
        rows.dedup();
        let mut out = Vec::new();
        for (_, row) in rows.into_iter().take(count) {
            // {id}/{version}
            let row = String::from_utf8_lossy(&row).into_owned();
            let Some((id, v)) = row
                .split_once('/')
                .and_then(|(id, v)| Some((id.to_string(), v.parse::<u64>().ok()?)))
            else {
                continue;
            };
            let id = id.as_str();
            match self.load(rtype, id)? {
                Some(cur) if self.visible(who, rtype, &cur)? => {}
                _ => continue,
            }
            if let Some(r) = self.load_version(rtype, id, v)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Writes every current resource of `rtype` as one JSON line (FHIR bulk NDJSON).
    /// Returns how many.
    /// The audit trail exports as its AuditEvents, in the order recorded.
    pub fn export(&self, rtype: &str, out: &mut impl std::io::Write) -> Result<usize> {
        let mut n = 0;
        if rtype == "AuditEvent" {
            crate::audit::archive::for_each_record(&self.store, |_, v| {
                let rec: crate::audit::Record =
                    serde_json::from_slice(v).map_err(|e| std::io::Error::other(e.to_string()))?;
                serde_json::to_writer(&mut *out, &rec.fhir())?;
                out.write_all(b"\n")?;
                n += 1;
                Ok(())
            })?;
            return Ok(n);
        }
        if rtype == "Provenance" {
            let mut n = crate::audit::export_provenance(&self.store, out)?;
            let prefix = crate::audit::PROVENANCE_PREFIX;
            self.for_each_archived(|_, group| {
                for (k, v) in group
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
                {
                    let target = String::from_utf8_lossy(&k[prefix.len()..]);
                    let Some((target, _)) = target.rsplit_once('/') else {
                        continue;
                    };
                    for p in crate::audit::provenance_of_entry(&self.store, target, v)? {
                        serde_json::to_writer(&mut *out, &p)
                            .map_err(|e| Error::Internal(e.to_string()))?;
                        out.write_all(b"\n")
                            .map_err(|e| Error::Internal(e.to_string()))?;
                        n += 1;
                    }
                }
                Ok(())
            })?;
            return Ok(n);
        }
        let prefix = format!("r/{rtype}/");
        self.store.for_each(prefix.as_bytes(), |_, v| {
            out.write_all(v)?;
            out.write_all(b"\n")?;
            n += 1;
            Ok(())
        })?;
        // Archived resources of the type, a group at a time.
        self.for_each_archived(|_, group| {
            for (_, v) in group
                .iter()
                .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
            {
                out.write_all(v)
                    .and_then(|_| out.write_all(b"\n"))
                    .map_err(|e| Error::Internal(format!("export: {e}")))?;
                n += 1;
            }
            Ok(())
        })?;
        Ok(n)
    }

    /// Every Provenance of a target (`Task/{id}`), in the order written, archived or not.
    pub fn provenance(&self, target: &str) -> Result<Vec<Value>> {
        let prefix = crate::audit::provenance_index(target);
        let mut out = Vec::new();
        // An archived target's list, then what was recorded since (an acknowledgement of a
        // letter that arrived after the referral was archived).
        let mut rows = self.archived_under(prefix.as_bytes())?;
        rows.extend(self.store.scan(prefix.as_bytes(), None, 10_000)?);
        for (_, v) in rows {
            out.extend(crate::audit::provenance_of_entry(&self.store, target, &v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::keys;

    #[test]
    fn key_kinds_leave_out_ids_times_and_codes() {
        let kind = |k: &str| keys::kind(k.as_bytes());
        assert_eq!(kind(&keys::current("Task", "t1")), "r/Task");
        assert_eq!(kind(&keys::version("Task", "t1", 3)), "h/Task");
        let t = keys::suffix(1_700_000_000_000_000, "t1");
        let idx =
            |scope: &str, status: &str| kind(&(keys::time_prefix("Task", scope, status) + &t));
        assert_eq!(idx("a", "~"), "x/Task/a/~");
        assert_eq!(idx("o/pendle-cvs-hub", "requested"), "x/Task/o/status");
        assert_eq!(idx("r/P81001", "~"), "x/Task/r/~");
        assert_eq!(
            kind(&(keys::type_history("Task", "o/pendle-cvs-hub") + &t + "/2")),
            "y/Task/o"
        );
        assert_eq!(
            kind(&keys::access("Patient", "p1", "r/P81001")),
            "x/acc/Patient"
        );
        assert_eq!(kind("x/ae/e/Task/t1/00000000000000000007"), "x/ae/e/Task");
        assert_eq!(kind("x/ae/g/gp-pennine/00000000000000000007"), "x/ae/g");
        assert_eq!(kind("x/prov/Task/t1/7-0"), "x/prov/Task");
        // Lists (`lists`): their head and chunks are of the index's kind.
        assert_eq!(
            kind(&(keys::type_history("Task", "o/pendle-cvs-hub") + "~")),
            "y/Task/o"
        );
        assert_eq!(
            kind(&(keys::type_history("Task", "a") + "00000000000000000042")),
            "y/Task/a"
        );
        assert_eq!(kind("x/ae/e/Task/t1/~"), "x/ae/e/Task");
        assert_eq!(kind("x/ae/g/gp-pennine/~"), "x/ae/g");
        assert_eq!(kind("x/prov/Task/t1/~"), "x/prov/Task");
        assert_eq!(kind("a/00000000000000000007"), "a");
        assert_eq!(kind(&keys::open_count("pendle-cvs-hub")), "c/open");
        assert_eq!(kind("o/q/P81003/00000000000000000001"), "o/q");
    }
}
