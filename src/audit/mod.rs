//! The audit trail: a FHIR AuditEvent for every request that touches patient data (and every
//! failed authentication), in an append-only, hash-chained log.
//!
//! Owns the record format (`a/{seq}`: the event, the previous record's hash, and its own
//! hash over both), the chain head (`c/audit-head`), the auditor's indexes (by entity, by
//! agent), verification (`sp-gateway audit verify`), and the request context that lets a
//! write's AuditEvent land in the same store transaction as the write itself
//! ([`tx_record`]); reads, searches and refusals are recorded right after the response is
//! decided ([`finish`]). It must not decide who may read the log (that is `capability`).

use std::cell::RefCell;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub mod archive;
mod provenance;
mod stored;

pub use provenance::{
    entry as provenance_of_entry, export_provenance, provenance_index, PREFIX as PROVENANCE_PREFIX,
};

use crate::clock::Now;
use crate::error::Error;
use crate::store::{Abort, Store, Tx};

const HEAD: &[u8] = b"c/audit-head";
pub const RECORDS: &str = "a/";

pub fn record_key(seq: u64) -> String {
    format!("{RECORDS}{seq:020}")
}
/// Record numbers an index list (by entity, by agent) holds before it is set aside as a
/// chunk: a list is rewritten with each record it gains, so it is kept short.
const INDEX_CHUNK: usize = 32;

pub fn by_entity(entity: &str) -> String {
    format!("x/ae/e/{entity}/")
}
pub fn by_agent(agent: &str) -> String {
    format!("x/ae/g/{agent}/")
}

/// One link of the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub seq: u64,
    /// Hash of the previous record ("" for the first).
    pub prev: String,
    /// SHA-256 over `prev`, a newline and the stored event's JSON.
    pub hash: String,
    /// The event in its stored form ([`stored`]); [`Record::fhir`] gives the AuditEvent.
    pub event: Value,
}

impl Record {
    /// The whole FHIR AuditEvent.
    pub fn fhir(&self) -> Value {
        stored::expand(&self.event, self.seq)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Head {
    seq: u64,
    hash: String,
}

pub fn chain_hash(prev: &str, event: &Value) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(event.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// What is known about the request being handled.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub client: Option<String>,
    pub role: Option<String>,
    /// The organisations the client acts for (`Organization/{id}`).
    pub organisations: Vec<String>,
    pub peer: Option<String>,
    pub method: String,
    /// The path, with ids (not the query string).
    pub path: String,
    pub query: Option<String>,
    /// Set once a write has recorded this request in its own transaction.
    pub recorded: bool,
    /// The resources a read or search disclosed, and their Patients (IHE BALP): recorded
    /// as entities of its AuditEvent, so that each one's trail shows who saw it, and when.
    pub disclosed: Vec<String>,
    /// A person signed in to the provider inbox: account id and email. They are the agent
    /// (with their organisation), not a client system.
    pub person: Option<(String, String)>,
    /// The FHIR interaction a page request amounts to (`read`, `search-type`, `update`…),
    /// when its method and path do not say (pages are not FHIR URLs).
    pub interaction: Option<(&'static str, &'static str)>,
    /// A sign-in step (DICOM 110122 Login) or sign-out (110123 Logout).
    pub login: Option<&'static str>,
    /// A self-referral from the public page: the person referred themselves (`self`: the
    /// agent is their Patient) or a carer or relative referred them (`carer`).
    pub self_referral: Option<&'static str>,
}

/// Key prefixes of the audit trail (left out of the clinical data's digest).
pub const PREFIXES: &[&[u8]] = &[
    b"a/",
    b"x/ae/",
    b"c/audit-head",
    b"r/Provenance/",
    b"x/prov/",
];

tokio::task_local! {
    static REQUEST: RefCell<Context>;
}

/// Runs `f` with `ctx` as the current request's audit context.
pub async fn scope<F: std::future::Future>(ctx: Context, f: F) -> F::Output {
    REQUEST.scope(RefCell::new(ctx), f).await
}

/// Sets who the caller is, once authentication has said.
pub fn set_client(client: &str, role: &str, organisations: Vec<String>) {
    let _ = REQUEST.try_with(|c| {
        let mut c = c.borrow_mut();
        c.client = Some(client.to_string());
        c.role = Some(role.to_string());
        c.organisations = organisations;
    });
}

/// Sets the person (account id, email) a page request acts for, and their organisation.
pub fn set_person(id: &str, email: &str, provider: Option<&str>) {
    let _ = REQUEST.try_with(|c| {
        let mut c = c.borrow_mut();
        c.client = Some(format!("person/{id}"));
        match provider {
            Some(p) => {
                c.role = Some("provider-person".into());
                c.organisations = vec![format!("Organization/{p}")];
            }
            None => {
                c.role = Some("commissioner-person".into());
                c.organisations = Vec::new();
            }
        }
        c.person = Some((id.to_string(), email.to_string()));
    });
}

/// Marks the request as a self-referral from the public page, by the person themselves
/// (`"self"`) or by a carer or relative (`"carer"`): they, not a client system, are the agent.
pub fn set_self_referral(kind: &'static str) {
    let _ = REQUEST.try_with(|c| {
        let mut c = c.borrow_mut();
        c.client = Some("self-referral-page".into());
        c.role = Some("person referring".into());
        c.self_referral = Some(kind);
    });
}

/// Says which FHIR interaction a page request amounts to (`("update", "U")`).
pub fn set_interaction(subtype: &'static str, action: &'static str) {
    let _ = REQUEST.try_with(|c| c.borrow_mut().interaction = Some((subtype, action)));
}

/// Marks the request as a sign-in step (`"110122"`, Login) or a sign-out (`"110123"`).
pub fn set_login(code: &'static str) {
    let _ = REQUEST.try_with(|c| c.borrow_mut().login = Some(code));
}

/// Notes resources (`Type/id`) the current request is disclosing to its caller.
pub fn disclose(entities: impl IntoIterator<Item = String>) {
    let _ = REQUEST.try_with(|c| {
        let mut c = c.borrow_mut();
        for e in entities {
            if !c.disclosed.contains(&e) {
                c.disclosed.push(e);
            }
        }
    });
}

pub fn current() -> Option<Context> {
    REQUEST.try_with(|c| c.borrow().clone()).ok()
}

fn interaction(method: &str, path: &str) -> (&'static str, &'static str) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("POST", ["fhir", _, op]) if op.starts_with('$') => ("operation", "E"),
        ("POST", ["fhir"]) => ("transaction", "C"),
        ("POST", _) => ("create", "C"),
        ("PUT", _) => ("update", "U"),
        ("PATCH", _) => ("patch", "U"),
        ("GET", ["fhir", _]) => ("search-type", "E"),
        ("GET", ["fhir", _, "_history"]) => ("history-type", "R"),
        ("GET", ["fhir", _, _, "_history"]) => ("history-instance", "R"),
        ("GET", ["fhir", _, _, "_history", _]) => ("vread", "R"),
        _ => ("read", "R"),
    }
}

/// The AuditEvent for the current request, with its outcome and the entities it touched.
pub fn event(ctx: &Context, status: u16, entities: &[String], now: &Now) -> Value {
    let (sub, action) = ctx
        .interaction
        .unwrap_or_else(|| interaction(&ctx.method, &ctx.path));
    let outcome = match status {
        200..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let who = match ctx.self_referral {
        // The person referred themselves: they are the Patient this request wrote.
        Some("self") => match entities.iter().find(|e| e.starts_with("Patient/")) {
            Some(p) => json!({ "reference": p, "type": "Patient" }),
            None => agent_who(ctx),
        },
        Some(_) => json!({
            "type": "RelatedPerson",
            "identifier": { "system": format!("{}/Id/client", crate::fhir::CANONICAL), "value": "self-referral-page" },
            "display": "a carer or relative of the person referred (self-referral page)"
        }),
        None => agent_who(ctx),
    };
    let mut agent = json!({ "who": who, "requestor": true });
    if let Some(r) = &ctx.role {
        agent["role"] = json!([{ "text": r }]);
    }
    if let Some(p) = &ctx.peer {
        agent["network"] = json!({ "address": p, "type": "2" });
    }
    let mut agents = vec![agent];
    // The organisation(s) the client acts for: its provider, or its practices.
    for org in &ctx.organisations {
        agents.push(json!({
            "type": { "text": "organisation the client acts for" },
            "who": { "reference": org },
            "requestor": false
        }));
    }
    // As IHE BALP does, the patient is named as a Person in the role of Patient; every other
    // entity is the resource itself (kept short: a poll names many).
    let mut entity: Vec<Value> = entities
        .iter()
        .map(|e| {
            if e.starts_with("Patient/") {
                json!({
                    "what": { "reference": e },
                    "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person" },
                    "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" }
                })
            } else {
                json!({ "what": { "reference": e } })
            }
        })
        .collect();
    if let Some(q) = ctx.query.as_deref().filter(|q| !q.is_empty()) {
        entity.push(json!({
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
            "query": base64::engine::general_purpose::STANDARD.encode(q),
            "description": format!("{} {}", ctx.method, ctx.path)
        }));
    }
    let (typ, subtype) = match ctx.login {
        Some(code) => (
            json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110114", "display": "User Authentication" }),
            json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": code, "display": if code == "110123" { "Logout" } else { "Login" } }),
        ),
        None => (
            json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" }),
            json!({ "system": "http://hl7.org/fhir/restful-interaction", "code": sub }),
        ),
    };
    let mut e = json!({
        "resourceType": "AuditEvent",
        "type": typ,
        "subtype": [subtype],
        "action": if ctx.login.is_some() { "E" } else { action },
        "recorded": now.instant,
        "outcome": outcome,
        "outcomeDesc": format!("HTTP {status}"),
        "agent": agents,
        "source": {
            "observer": { "display": "sp-gateway" },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server" }]
        }
    });
    if !entity.is_empty() {
        e["entity"] = json!(entity);
    }
    e
}

/// Who acted: a person of the provider inbox (by account id, with their email), or a
/// client system (by client id).
fn agent_who(ctx: &Context) -> Value {
    match &ctx.person {
        Some((id, email)) => json!({
            "identifier": { "system": format!("{}/Id/person", crate::fhir::CANONICAL), "value": id },
            "display": email
        }),
        None => {
            let client = ctx
                .client
                .clone()
                .unwrap_or_else(|| "unauthenticated".into());
            json!({
                "identifier": { "system": format!("{}/Id/client", crate::fhir::CANONICAL), "value": client },
                "display": client
            })
        }
    }
}

/// The entities a path names (`Task/{id}` from `/fhir/Task/{id}/_history/2` or from
/// `/inbox/referrals/{id}/accept`).
pub fn path_entities(path: &str) -> Vec<String> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["fhir", t, id, ..] if !id.starts_with('$') && !id.starts_with('_') => {
            vec![format!("{t}/{id}")]
        }
        // The provider inbox's page of one referral is its Task.
        ["inbox", "referrals", id, ..] => vec![format!("Task/{id}")],
        _ => vec![],
    }
}

type TxResult<T> = std::result::Result<T, Abort<Error>>;

/// Appends `event` to the chain in the caller's transaction; returns its sequence number.
pub fn tx_append(tx: &Tx<'_>, mut event: Value) -> TxResult<u64> {
    let head: Head = match tx.get(HEAD)? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
        None => Head::default(),
    };
    let seq = head.seq + 1;
    if let Some(o) = event.as_object_mut() {
        o.insert("id".into(), json!(seq.to_string()));
        o.insert("meta".into(), json!({ "versionId": "1", "lastUpdated": o.get("recorded").cloned().unwrap_or(Value::Null) }));
    }
    let event = stored::compact(&event);
    let hash = chain_hash(&head.hash, &event);
    let rec = Record {
        seq,
        prev: head.hash.clone(),
        hash: hash.clone(),
        event,
    };
    let bytes =
        serde_json::to_vec(&rec).map_err(|e| Abort::Caller(Error::Internal(e.to_string())))?;
    tx.put(record_key(seq).as_bytes(), &bytes)?;
    let head = serde_json::to_vec(&Head { seq, hash })
        .map_err(|e| Abort::Caller(Error::Internal(e.to_string())))?;
    tx.put(HEAD, &head)?;
    // Auditor indexes.
    let agent = rec
        .event
        .pointer("/agent/0/who/identifier/value")
        .or_else(|| rec.event.pointer("/agent/0/who/reference"))
        .and_then(Value::as_str)
        .unwrap_or("unauthenticated");
    crate::lists::tx_push(tx, &by_agent(agent), seq, b"", INDEX_CHUNK)?;
    for e in rec
        .event
        .get("entity")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(r) = e.pointer("/what/reference").and_then(Value::as_str) {
            crate::lists::tx_push(tx, &by_entity(r), seq, b"", INDEX_CHUNK)?;
        }
    }
    Ok(seq)
}

/// Records the current request as a success that wrote `entities`, in the caller's (the
/// write's) transaction. Outside a request (the outbox worker, tools), records nothing.
pub fn tx_record(tx: &Tx<'_>, entities: &[String], now: &Now) -> TxResult<()> {
    if let Some(ctx) = current() {
        let _ = REQUEST.try_with(|c| c.borrow_mut().recorded = true);
        let mut all = path_entities(&ctx.path);
        for e in entities {
            if !all.contains(e) {
                all.push(e.clone());
            }
        }
        let seq = tx_append(tx, event(&ctx, 200, &all, now))?;
        provenance::tx_record(tx, entities, seq)?;
    }
    Ok(())
}

/// Records something the gateway did by itself, outside any request (sending a letter to a
/// practice, receiving its acknowledgement): an AuditEvent with the gateway as agent (DICOM
/// "transmit"/"receive" as subtype), `entities` as what it was about (the Patient as BALP
/// names it), and a Provenance on the current version of `target` so the Task's own trail
/// shows it (`archived`: the target as the archive holds it, when it is not in the hot
/// store). `description` is ids and codes only, never patient data.
#[allow(clippy::too_many_arguments)]
pub fn tx_record_system(
    tx: &Tx<'_>,
    activity: SystemActivity,
    description: &str,
    entities: &[String],
    success: bool,
    target: &str,
    now: &Now,
    archived: Option<&Value>,
) -> TxResult<u64> {
    let (code, display, action) = match activity {
        SystemActivity::Transmit => ("110106", "Export", "R"),
        SystemActivity::Receive => ("110107", "Import", "C"),
    };
    let ctx = Context {
        client: Some("sp-gateway".into()),
        role: Some("system".into()),
        ..Context::default()
    };
    let mut e = event(&ctx, if success { 200 } else { 500 }, entities, now);
    e["type"] = json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": code, "display": display });
    e["subtype"] = json!([{ "system": crate::fhir::CANONICAL.to_string() + "/CodeSystem/system-activity", "code": activity.code() }]);
    e["action"] = json!(action);
    e["outcome"] = json!(if success { "0" } else { "4" });
    e["outcomeDesc"] = json!(description);
    let seq = tx_append(tx, e)?;
    provenance::tx_put(tx, target, seq, 0, false, archived)?;
    Ok(seq)
}

/// What the gateway did by itself.
#[derive(Debug, Clone, Copy)]
pub enum SystemActivity {
    /// Sent patient data out (a letter to a practice).
    Transmit,
    /// Took something in (an acknowledgement).
    Receive,
}

impl SystemActivity {
    fn code(self) -> &'static str {
        match self {
            SystemActivity::Transmit => "letter-sent",
            SystemActivity::Receive => "acknowledgement-received",
        }
    }
}

/// Ends a request's audit once its outcome (`status`) is known: a write that succeeded has
/// recorded itself in its own transaction; anything else (a read, a search, a refusal, a
/// failed write) is recorded now, naming the entities its path names and, when it
/// succeeded (2xx), what it disclosed. The caller must withhold the response if this fails
/// (no unaudited access). A page's write answers 303 (a redirect to its result).
pub fn finish(store: &Store, ctx: &Context, status: u16) -> crate::error::Result<()> {
    let ok = (200..300).contains(&status);
    if ctx.recorded && (ok || status == 303) {
        return Ok(());
    }
    let mut entities = path_entities(&ctx.path);
    if ok {
        for e in &ctx.disclosed {
            if !entities.contains(e) {
                entities.push(e.clone());
            }
        }
    }
    append(store, ctx, status, &entities).map(|_| ())
}

/// Records a request (a read, a search, a refusal) in its own transaction.
pub fn append(
    store: &Store,
    ctx: &Context,
    status: u16,
    entities: &[String],
) -> crate::error::Result<u64> {
    let now = Now::current();
    let ev = event(ctx, status, entities, &now);
    store
        .transact(|tx| tx_append(tx, ev.clone()))
        .map_err(|e| match e {
            crate::store::TxError::Caller(e) => e,
            crate::store::TxError::Store(e) => Error::Store(e),
        })
}

/// What `audit verify` found.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Intact {
        records: u64,
        head: String,
    },
    /// The first record that is wrong, and how.
    Broken {
        seq: u64,
        problem: String,
    },
}

/// Walks the chain from the first record: every sequence number present and in order, each
/// record's `prev` the hash of the one before, each hash right for its content, the head
/// where the chain ends, and (when given) a logged checkpoint `(seq, hash)` still there.
pub fn verify(store: &Store, checkpoint: Option<(u64, &str)>) -> crate::error::Result<Verdict> {
    let mut expected_seq = 1u64;
    let mut prev = String::new();
    let mut broken: Option<(u64, String)> = None;
    let mut count = 0u64;
    let walked = archive::for_each_record(store, |k, v| {
        if broken.is_some() {
            return Ok(());
        }
        let key_seq: u64 = std::str::from_utf8(&k[RECORDS.len()..])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let rec: Record = match serde_json::from_slice(v) {
            Ok(r) => r,
            Err(_) => {
                broken = Some((key_seq, "record unreadable".into()));
                return Ok(());
            }
        };
        if key_seq != expected_seq || rec.seq != key_seq {
            let problem = if key_seq > expected_seq {
                format!("record {expected_seq} is missing (next present is {key_seq})")
            } else {
                format!(
                    "record out of place (stored as {key_seq}, says {})",
                    rec.seq
                )
            };
            broken = Some((expected_seq, problem));
            return Ok(());
        }
        if rec.prev != prev {
            broken = Some((
                key_seq,
                "its link to the previous record does not match (reordered or replaced)".into(),
            ));
            return Ok(());
        }
        if chain_hash(&rec.prev, &rec.event) != rec.hash {
            broken = Some((key_seq, "its content was altered (hash mismatch)".into()));
            return Ok(());
        }
        prev = rec.hash;
        expected_seq += 1;
        count += 1;
        Ok(())
    });
    // A damaged archived block breaks the chain where the walk stopped.
    if let Err(Error::Store(crate::store::StoreError::Archive(m))) = &walked {
        return Ok(Verdict::Broken {
            seq: expected_seq,
            problem: format!("an archived block of records cannot be read: {m}"),
        });
    }
    walked?;
    if let Some((seq, problem)) = broken {
        return Ok(Verdict::Broken { seq, problem });
    }
    let head: Head = store
        .get(HEAD)?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if head.seq != count || head.hash != prev {
        return Ok(Verdict::Broken {
            seq: count + 1,
            problem: format!("the chain ends at record {count}, but its head says {} (records removed from the end)", head.seq),
        });
    }
    if let Some((seq, hash)) = checkpoint {
        if seq > count {
            return Ok(Verdict::Broken { seq: count + 1, problem: format!("checkpoint {seq} is beyond the end of the chain ({count}): the tail was truncated") });
        }
        let rec: Option<Record> =
            archive::record(store, seq)?.and_then(|b| serde_json::from_slice(&b).ok());
        if rec.map(|r| r.hash) != Some(hash.to_string()) {
            return Ok(Verdict::Broken {
                seq,
                problem: format!("record {seq} does not have the checkpoint's hash"),
            });
        }
    }
    Ok(Verdict::Intact {
        records: count,
        head: prev,
    })
}

/// The chain head, for checkpoints in the log.
pub fn head(store: &Store) -> crate::error::Result<(u64, String)> {
    let h: Head = store
        .get(HEAD)?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    Ok((h.seq, h.hash))
}

/// A page of the trail.
pub struct Page {
    pub events: Vec<Value>,
    pub next: Option<u64>,
}

/// Auditor search: by entity or agent (index-backed) or over the whole trail, filtered by
/// action and recorded date, in the order recorded, `count` at a time after `cursor`.
pub struct Query {
    pub entity: Option<String>,
    pub agent: Option<String>,
    pub action: Option<String>,
    pub after: Option<String>,
    pub before: Option<String>,
    pub cursor: u64,
    pub count: usize,
}

pub fn search(store: &Store, q: &Query) -> crate::error::Result<Page> {
    let index = match (&q.entity, &q.agent) {
        (Some(e), _) => Some(by_entity(e)),
        (None, Some(a)) => Some(by_agent(a)),
        _ => None,
    };
    let mut events = Vec::new();
    let mut next = None;
    let mut cursor = q.cursor;
    'scan: loop {
        let batch: Vec<u64> = match &index {
            Some(prefix) => crate::lists::after(store, prefix, cursor, 256)?
                .into_iter()
                .map(|e| e.0)
                .collect(),
            // Every record: the chain is numbered without gaps up to its head (old records
            // may be in archived blocks).
            None => {
                let head: Head = store
                    .get(HEAD)?
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                (cursor.saturating_add(1)..=head.seq.min(cursor.saturating_add(256))).collect()
            }
        };
        let Some(&last) = batch.last() else {
            break;
        };
        cursor = last;
        for seq in batch {
            let Some(rec) = archive::record(store, seq)? else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<Record>(&rec) else {
                continue;
            };
            let e = rec.fhir();
            if q.agent.as_deref().is_some_and(|a| {
                e.pointer("/agent/0/who/identifier/value")
                    .and_then(Value::as_str)
                    != Some(a)
            }) {
                continue;
            }
            if q.action
                .as_deref()
                .is_some_and(|a| e.get("action").and_then(Value::as_str) != Some(a))
            {
                continue;
            }
            let recorded = e
                .get("recorded")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let t = crate::ingest::parse_instant(recorded)
                .map(|t| t.unix_timestamp_nanos())
                .unwrap_or(0);
            let bound = |s: &Option<String>| {
                s.as_deref()
                    .and_then(crate::ingest::parse_instant)
                    .map(|t| t.unix_timestamp_nanos())
            };
            if bound(&q.after).is_some_and(|a| t <= a) || bound(&q.before).is_some_and(|b| t >= b) {
                continue;
            }
            if events.len() == q.count {
                next = events
                    .last()
                    .and_then(|e: &Value| e.get("id")?.as_str()?.parse().ok());
                break 'scan;
            }
            events.push(e);
        }
    }
    Ok(Page { events, next })
}

/// One AuditEvent by its id (its sequence number).
pub fn read(store: &Store, id: &str) -> crate::error::Result<Option<Value>> {
    let Ok(seq) = id.parse::<u64>() else {
        return Ok(None);
    };
    Ok(archive::record(store, seq)?
        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        .map(|r| r.fhir()))
}
