//! Search: parameters (checked against `capability`), index-backed candidate streams,
//! scoping, cursor paging, `_include`, and the searchset Bundle.
//!
//! Every search reads index ranges bounded by the caller's scope (its provider, its
//! practices) or a small fixed candidate set (an identifier, a focus), merges them in
//! (lastUpdated, id) order and resumes after the last entry returned, so paging stays
//! correct while writes happen. Every match is also checked with `Gateway::visible`.

use std::collections::{HashSet, VecDeque};

use serde_json::{json, Value};

use super::{keys, micros_of, referral::identifier_key, Gateway};
use crate::auth::Principal;
use crate::capability;
use crate::config::{is_fhir_id, Role};
use crate::error::{Error, Result};
use crate::fhir;

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 200;

/// Parsed search parameters.
#[derive(Debug, Default, Clone)]
pub struct Query {
    pub rtype: String,
    pub owner: Option<String>,
    pub requester: Option<String>,
    pub status: Vec<String>,
    pub patient: Option<String>,
    pub focus: Option<String>,
    pub based_on: Option<String>,
    pub subject: Option<String>,
    pub identifier: Option<(Option<String>, String)>,
    pub code: Option<(Option<String>, String)>,
    /// Results have an index suffix strictly greater than this (`_lastUpdated=gt|ge`).
    pub after: Option<String>,
    /// Results have an index suffix strictly less than this (`_lastUpdated=lt|le`).
    pub before: Option<String>,
    pub cursor: Option<String>,
    pub count: usize,
    pub descending: bool,
    pub summary_count: bool,
    pub include: Vec<String>,
    /// The parameters as applied, less the cursor, for `self` and `next` links.
    pub echo: Vec<(String, String)>,
}

fn reference_id(v: &str, rtype: &str) -> Option<String> {
    let id = v
        .strip_prefix(rtype)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(v);
    is_fhir_id(id).then(|| id.to_string())
}

fn token(v: &str) -> (Option<String>, String) {
    match v.split_once('|') {
        Some((s, c)) => ((!s.is_empty()).then(|| s.to_string()), c.to_string()),
        None => (None, v.to_string()),
    }
}

impl Query {
    /// Parses the parameters of a search on `rtype`. Unknown parameters are refused (400)
    /// when `strict` (the default: a filter a client believes it applied is never silently
    /// dropped), and ignored — left out of the `self` link — when lenient.
    pub fn parse(rtype: &str, params: &[(String, String)], strict: bool) -> Result<Query> {
        let mut q = Query {
            rtype: rtype.to_string(),
            count: DEFAULT_COUNT,
            ..Query::default()
        };
        let bad = |name: &str, msg: String| Error::invalid("value", name.to_string(), msg);
        for (name, value) in params {
            match name.as_str() {
                "_cursor" => {
                    let ok = value.len() > 21
                        && value.as_bytes()[20] == b'/'
                        && value[..20].bytes().all(|b| b.is_ascii_digit())
                        && is_fhir_id(&value[21..]);
                    if !ok {
                        return Err(bad(name, "is not a cursor this server issued".into()));
                    }
                    q.cursor = Some(value.clone());
                    continue;
                }
                "_format" | "_pretty" => continue,
                _ => {}
            }
            if !capability::search_param(rtype, name) {
                if strict {
                    return Err(Error::invalid(
                        "not-supported",
                        name.clone(),
                        format!(
                            "is not a search parameter this server supports for {rtype} \
                             (send Prefer: handling=lenient to have unknown parameters ignored)"
                        ),
                    ));
                }
                continue;
            }
            q.echo.push((name.clone(), value.clone()));
            let reference = |t: &str| {
                reference_id(value, t)
                    .ok_or_else(|| bad(name, format!("must be {t}/{{id}} or {{id}}")))
            };
            match name.as_str() {
                "owner" => q.owner = Some(reference("Organization")?),
                "requester" => q.requester = Some(reference("Organization")?),
                "patient" => q.patient = Some(reference("Patient")?),
                "subject" => q.subject = Some(reference("Patient")?),
                "focus" => q.focus = Some(reference("ServiceRequest")?),
                "based-on" => q.based_on = Some(reference("ServiceRequest")?),
                "status" => {
                    for s in value.split(',') {
                        let known = if rtype == "Task" {
                            crate::fhir::TASK_STATUSES.contains(&s)
                        } else {
                            !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                        };
                        if !known {
                            return Err(bad(name, format!("`{s}` is not a {rtype} status")));
                        }
                        q.status.push(s.to_string());
                    }
                }
                "identifier" => {
                    let (system, v) = token(value);
                    if v.is_empty() {
                        return Err(bad(name, "must be system|value or value".into()));
                    }
                    q.identifier = Some((system, v));
                }
                "code" => {
                    let (system, v) = token(value);
                    if v.is_empty() {
                        return Err(bad(name, "must be system|code or code".into()));
                    }
                    q.code = Some((system, v));
                }
                "_lastUpdated" => {
                    let (op, rest) = ["gt", "ge", "lt", "le"]
                        .iter()
                        .find_map(|op| value.strip_prefix(op).map(|rest| (*op, rest)))
                        .unwrap_or(("", value.as_str()));
                    let micros = parse_search_instant(rest).ok_or_else(|| {
                        bad(name, "must be a prefix (gt, ge, lt, le) and an instant such as gt2026-11-20T10:00:00Z".into())
                    })?;
                    match op {
                        "gt" => q.after = Some(format!("{micros:020}/~")),
                        "ge" => q.after = Some(format!("{micros:020}/")),
                        "lt" => q.before = Some(format!("{micros:020}/")),
                        "le" => q.before = Some(format!("{micros:020}/~")),
                        _ => return Err(bad(name, "needs a prefix: gt, ge, lt or le".into())),
                    }
                }
                "_count" if value == "0" => q.summary_count = true,
                "_count" => {
                    q.count = value
                        .parse::<usize>()
                        .ok()
                        .filter(|c| (1..=MAX_COUNT).contains(c))
                        .ok_or_else(|| {
                            bad(
                                name,
                                format!(
                                    "must be a whole number from 0 (only the total) to {MAX_COUNT}"
                                ),
                            )
                        })?;
                }
                "_sort" => match value.as_str() {
                    "_lastUpdated" => q.descending = false,
                    "-_lastUpdated" => q.descending = true,
                    _ => {
                        return Err(Error::invalid(
                            "not-supported",
                            name.clone(),
                            "only _lastUpdated and -_lastUpdated are supported".to_string(),
                        ))
                    }
                },
                "_summary" => match value.as_str() {
                    "count" => q.summary_count = true,
                    "false" => {}
                    _ => {
                        return Err(Error::invalid(
                            "not-supported",
                            name.clone(),
                            "only _summary=count is supported".to_string(),
                        ))
                    }
                },
                "_include" => {
                    let ok = capability::resource(rtype)
                        .is_some_and(|r| r.includes.contains(&value.as_str()));
                    if !ok {
                        return Err(Error::invalid(
                            "not-supported",
                            name.clone(),
                            format!("`{value}` is not an _include this server supports"),
                        ));
                    }
                    q.include.push(value.clone());
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// An instant, or a date (taken as its start, UTC), as microseconds since the epoch.
fn parse_search_instant(s: &str) -> Option<i64> {
    if let Some(t) = crate::ingest::parse_instant(s) {
        return Some((t.unix_timestamp_nanos() / 1000) as i64);
    }
    let d = crate::ingest::parse_date(s)?;
    Some(d.midnight().assume_utc().unix_timestamp() * 1_000_000)
}

/// What a search found.
pub struct SearchResult {
    pub matches: Vec<Value>,
    pub included: Vec<Value>,
    /// Cursor for the next page, when there is one.
    pub next: Option<String>,
    pub total: Option<usize>,
}

/// Where candidates come from.
enum Source {
    /// Time-ordered index ranges (`…/{time}/{id}` under each prefix).
    Index(Vec<String>),
    /// A small set of ids, ordered after loading.
    Ids(Vec<String>),
}

struct Stream {
    prefix: String,
    bound: Option<Vec<u8>>,
    buf: VecDeque<String>,
    done: bool,
}

/// The most resources of one type a search by patient reads (a Patient belongs to one
/// referral: it has a Task or two, one ServiceRequest and a few Observations).
const MAX_BY_PATIENT: usize = 10_000;

impl Gateway {
    /// The ids of the entries under an index prefix (`…/{µs}/{id}`), each once.
    fn ids_under(&self, prefix: &str) -> Result<Vec<String>> {
        let mut ids = last_fields(self.store.scan(prefix.as_bytes(), None, MAX_BY_PATIENT)?);
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn scopes_for(&self, who: &Principal, q: &Query) -> Result<Option<Vec<String>>> {
        Ok(Some(match who.role {
            Role::Admin | Role::Commissioner => return Err(Error::Forbidden),
            Role::Provider => {
                let own = who.provider.clone().unwrap_or_default();
                if q.owner.as_deref().is_some_and(|o| o != own) {
                    return Ok(None);
                }
                vec![format!("o/{own}")]
            }
            Role::GpSystem => {
                let s: Vec<String> = who
                    .practices
                    .iter()
                    .filter(|p| q.requester.as_deref().is_none_or(|r| r == p.as_str()))
                    .map(|p| format!("r/{p}"))
                    .collect();
                if s.is_empty() {
                    return Ok(None);
                }
                s
            }
            Role::Referrer => vec![format!("f/{}", who.client_id)],
            Role::Auditor => match (&q.owner, &q.requester) {
                (Some(o), _) => vec![format!("o/{o}")],
                (None, Some(r)) => vec![format!("r/{r}")],
                _ => vec!["a".into()],
            },
        }))
    }

    fn source(&self, who: &Principal, q: &Query) -> Result<Option<Source>> {
        let rtype = q.rtype.as_str();
        let statuses: Vec<&str> = match super::statuses_of(rtype) {
            None => vec!["~"],
            Some(_) if !q.status.is_empty() => q.status.iter().map(String::as_str).collect(),
            Some(known) => known.iter().copied().chain(["~"]).collect(),
        };
        let scoped = |me: &Gateway| -> Result<Option<Source>> {
            Ok(me.scopes_for(who, q)?.map(|scopes| {
                Source::Index(
                    scopes
                        .iter()
                        .flat_map(|s| {
                            statuses
                                .iter()
                                .map(move |st| keys::time_prefix(rtype, s, st))
                        })
                        .collect(),
                )
            }))
        };
        if who.role == Role::Admin {
            return Err(Error::Forbidden);
        }
        Ok(match rtype {
            "Task" => {
                if let Some(f) = &q.focus {
                    let id = self.get(keys::sr_task(f).as_bytes())?;
                    Some(Source::Ids(
                        id.map(|b| String::from_utf8_lossy(&b).into_owned())
                            .into_iter()
                            .collect(),
                    ))
                } else if let Some(p) = &q.patient {
                    Some(Source::Ids(self.ids_under(&keys::by_patient("Task", p))?))
                } else {
                    scoped(self)?
                }
            }
            "ServiceRequest" => {
                if let Some((system, value)) = &q.identifier {
                    let Some(system) = system else {
                        return Err(Error::invalid(
                            "value",
                            "identifier",
                            "must be system|value for ServiceRequest",
                        ));
                    };
                    // Identifiers are unique within a practice, or within a referring
                    // client (the namespaces of the idempotency keys).
                    let practices: Vec<String> = match who.role {
                        Role::GpSystem => who.practices.clone(),
                        Role::Referrer => vec![super::referral::referrer_namespace(&who.client_id)],
                        _ => self
                            .cfg
                            .practices
                            .iter()
                            .map(|p| p.ods.clone())
                            .chain(
                                self.cfg
                                    .clients
                                    .iter()
                                    .filter(|c| c.role == Role::Referrer)
                                    .map(|c| super::referral::referrer_namespace(&c.id)),
                            )
                            .chain([super::self_referral::NAMESPACE.to_string()])
                            .collect(),
                    };
                    let mut ids = Vec::new();
                    for ods in practices {
                        if let Some(rec) = self
                            .store
                            .get(identifier_key(&ods, system, value).as_bytes())?
                        {
                            let rec: Value = serde_json::from_slice(&rec)
                                .map_err(|e| Error::Internal(e.to_string()))?;
                            if let Some(id) = rec.get("service_request").and_then(Value::as_str) {
                                ids.push(id.to_string());
                            }
                        }
                    }
                    Some(Source::Ids(ids))
                } else if let Some(p) = &q.subject {
                    Some(Source::Ids(
                        self.ids_under(&keys::by_patient("ServiceRequest", p))?,
                    ))
                } else {
                    scoped(self)?
                }
            }
            "Observation" => {
                if let Some(sr) = &q.based_on {
                    if self.is_archived("ServiceRequest", sr)? {
                        // A closed referral's Observations, from its archived group.
                        let prefix = keys::obs_by_sr(sr);
                        Some(Source::Ids(last_fields(
                            self.scan(prefix.as_bytes(), MAX_BY_PATIENT)?,
                        )))
                    } else {
                        Some(Source::Index(vec![keys::obs_by_sr(sr)]))
                    }
                } else if let Some(p) = &q.subject {
                    Some(Source::Ids(
                        self.ids_under(&keys::by_patient("Observation", p))?,
                    ))
                } else {
                    scoped(self)?
                }
            }
            "Patient" => match &q.identifier {
                None => scoped(self)?,
                Some((system, nhs)) => {
                    if system
                        .as_deref()
                        .is_some_and(|s| s != fhir::NHS_NUMBER_SYSTEM)
                        || nhs.len() != 10
                        || !nhs.bytes().all(|b| b.is_ascii_digit())
                    {
                        return Ok(None);
                    }
                    let prefix = keys::patient_by_nhs(nhs);
                    let rows = self.store.scan(prefix.as_bytes(), None, 1000)?;
                    Some(Source::Ids(
                        rows.into_iter()
                            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
                            .collect(),
                    ))
                }
            },
            _ => {
                return Err(Error::invalid(
                    "not-supported",
                    rtype.to_string(),
                    "search is not supported on this type",
                ))
            }
        })
    }

    /// Whether a candidate matches every filter of `q`.
    fn matches(&self, q: &Query, r: &Value) -> bool {
        let ref_is = |element: &str, t: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|w| r.get(element).and_then(|x| fhir::ref_id(x, t)) == Some(w))
        };
        let status_ok = q.status.is_empty()
            || r.get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| q.status.iter().any(|w| w == s));
        let code_ok = q.code.as_ref().is_none_or(|(system, code)| {
            r.pointer("/code/coding")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.get("code").and_then(Value::as_str) == Some(code.as_str())
                            && system
                                .as_deref()
                                .is_none_or(|s| c.get("system").and_then(Value::as_str) == Some(s))
                    })
                })
        });
        let based_on_ok = q.based_on.as_deref().is_none_or(|sr| {
            r.get("basedOn").and_then(Value::as_array).is_some_and(|b| {
                b.iter()
                    .any(|x| fhir::ref_id(x, "ServiceRequest") == Some(sr))
            })
        });
        match q.rtype.as_str() {
            "Task" => {
                status_ok
                    && ref_is("owner", "Organization", &q.owner)
                    && ref_is("requester", "Organization", &q.requester)
                    && ref_is("for", "Patient", &q.patient)
                    && ref_is("focus", "ServiceRequest", &q.focus)
            }
            "ServiceRequest" => {
                status_ok
                    && q.requester
                        .as_deref()
                        .is_none_or(|o| fhir::requester_ods(r).as_deref() == Some(o))
                    && ref_is("subject", "Patient", &q.subject)
            }
            "Observation" => code_ok && based_on_ok && ref_is("subject", "Patient", &q.subject),
            _ => true,
        }
    }

    /// Runs a search for `who`.
    pub fn search(&self, who: &Principal, q: &Query) -> Result<SearchResult> {
        let empty = SearchResult {
            matches: vec![],
            included: vec![],
            next: None,
            total: Some(0),
        };
        let Some(source) = self.source(who, q)? else {
            return Ok(empty);
        };
        // Bounds: results lie strictly between `lower` and `upper` (index suffixes).
        let (mut lower, mut upper) = (q.after.clone(), q.before.clone());
        if let Some(c) = &q.cursor {
            if q.descending {
                upper = Some(upper.map_or(c.clone(), |u| std::cmp::min(u, c.clone())));
            } else {
                lower = Some(lower.map_or(c.clone(), |l| std::cmp::max(l, c.clone())));
            }
        }
        let in_bounds = |s: &str| {
            lower.as_deref().is_none_or(|l| s > l) && upper.as_deref().is_none_or(|u| s < u)
        };
        let limit = if q.summary_count { usize::MAX } else { q.count };
        let mut matches = Vec::new();
        let mut last = None;
        let mut more = false;
        // The entry last taken from the indexes: the same entry in two of them (a version in
        // an older store's copy for any status and in its index by status) is taken once.
        let mut previous: Option<String> = None;
        let mut accept = |suffix: String, r: Value, matches: &mut Vec<Value>| -> Result<bool> {
            if !self.matches(q, &r) || !self.visible(who, &q.rtype, &r)? {
                return Ok(true);
            }
            if matches.len() >= limit {
                more = true;
                return Ok(false);
            }
            matches.push(r);
            last = Some(suffix);
            Ok(true)
        };
        match source {
            Source::Ids(ids) => {
                let mut found = Vec::new();
                for id in ids {
                    if let Some(r) = self.load(&q.rtype, &id)? {
                        let s = keys::suffix(micros_of(fhir::last_updated_of(&r)), &id);
                        found.push((s, r));
                    }
                }
                found.sort_by(|a, b| a.0.cmp(&b.0));
                if q.descending {
                    found.reverse();
                }
                for (s, r) in found {
                    if in_bounds(&s) && !accept(s, r, &mut matches)? {
                        break;
                    }
                }
            }
            Source::Index(prefixes) => {
                let mut streams: Vec<Stream> = prefixes
                    .into_iter()
                    .map(|p| {
                        let bound = if q.descending {
                            upper.as_ref()
                        } else {
                            lower.as_ref()
                        };
                        Stream {
                            bound: bound.map(|b| format!("{p}{b}").into_bytes()),
                            prefix: p,
                            buf: VecDeque::new(),
                            done: false,
                        }
                    })
                    .collect();
                const CHUNK: usize = 64;
                loop {
                    for s in streams.iter_mut() {
                        if s.buf.is_empty() && !s.done {
                            let rows = if q.descending {
                                self.store.scan_rev(
                                    s.prefix.as_bytes(),
                                    s.bound.as_deref(),
                                    CHUNK,
                                )?
                            } else {
                                self.store
                                    .scan(s.prefix.as_bytes(), s.bound.as_deref(), CHUNK)?
                            };
                            s.done = rows.len() < CHUNK;
                            if let Some((k, _)) = rows.last() {
                                s.bound = Some(k.clone());
                            }
                            for (k, _) in rows {
                                s.buf.push_back(
                                    String::from_utf8_lossy(&k[s.prefix.len()..]).into_owned(),
                                );
                            }
                        }
                    }
                    let heads = streams
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| s.buf.front().map(|f| (f.clone(), i)));
                    let best = if q.descending {
                        heads.max()
                    } else {
                        heads.min()
                    };
                    let Some((suffix, i)) = best else { break };
                    streams[i].buf.pop_front();
                    if !in_bounds(&suffix) {
                        // Past the far bound: every later entry is too.
                        break;
                    }
                    if previous.as_deref() == Some(suffix.as_str()) {
                        continue;
                    }
                    previous = Some(suffix.clone());
                    let id = suffix.rsplit('/').next().unwrap_or_default();
                    let Some(r) = self.load(&q.rtype, id)? else {
                        continue;
                    };
                    // A time index entry of a version since superseded (an older store's
                    // copy for any status is not moved by later writes): not the
                    // resource's place in time.
                    if streams[i].prefix.starts_with("x/")
                        && keys::suffix(micros_of(fhir::last_updated_of(&r)), id) != suffix
                    {
                        continue;
                    }
                    if !accept(suffix, r, &mut matches)? {
                        break;
                    }
                }
            }
        }
        if q.summary_count {
            let total = matches.len();
            return Ok(SearchResult {
                matches: vec![],
                included: vec![],
                next: None,
                total: Some(total),
            });
        }
        let total = (!more && q.cursor.is_none()).then_some(matches.len());
        let included = self.includes(who, q, &matches)?;
        Ok(SearchResult {
            matches,
            included,
            next: if more { last } else { None },
            total,
        })
    }

    fn includes(&self, who: &Principal, q: &Query, matches: &[Value]) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for inc in &q.include {
            let (element, rtype) = match inc.as_str() {
                "Task:focus" => ("focus", "ServiceRequest"),
                "Task:patient" => ("for", "Patient"),
                _ => continue,
            };
            for m in matches {
                let Some(id) = m.get(element).and_then(|r| fhir::ref_id(r, rtype)) else {
                    continue;
                };
                if !seen.insert(format!("{rtype}/{id}")) {
                    continue;
                }
                if let Some(r) = self.load(rtype, id)? {
                    if self.visible(who, rtype, &r)? {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A searchset Bundle for `result`, with `self` and `next` links under `base`.
pub fn searchset(base: &str, q: &Query, result: SearchResult) -> Value {
    let encode = |cursor: Option<&str>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &q.echo {
            s.append_pair(k, v);
        }
        if let Some(c) = cursor {
            s.append_pair("_cursor", c);
        }
        s.finish()
    };
    let rtype = &q.rtype;
    let mut links = vec![
        json!({ "relation": "self", "url": format!("{base}/{rtype}?{}", encode(q.cursor.as_deref())) }),
    ];
    if let Some(next) = &result.next {
        links.push(
            json!({ "relation": "next", "url": format!("{base}/{rtype}?{}", encode(Some(next))) }),
        );
    }
    let entry = |r: Value, mode: &str| {
        let t = r
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let id = r
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        json!({ "fullUrl": format!("{base}/{t}/{id}"), "resource": r, "search": { "mode": mode } })
    };
    let entries: Vec<Value> = result
        .matches
        .into_iter()
        .map(|r| entry(r, "match"))
        .chain(result.included.into_iter().map(|r| entry(r, "include")))
        .collect();
    let mut b = json!({ "resourceType": "Bundle", "type": "searchset", "link": links });
    if let Some(t) = result.total {
        b["total"] = json!(t);
    }
    if !entries.is_empty() {
        b["entry"] = json!(entries);
    }
    b
}

/// The last field of each key (an id, after its time): `p/Task/{patient}/{µs}/{id}` → id.
fn last_fields(rows: Vec<crate::store::Entry>) -> Vec<String> {
    rows.into_iter()
        .filter_map(|(k, _)| {
            String::from_utf8_lossy(&k)
                .rsplit('/')
                .next()
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{Config, Role, EMBEDDED_DEFAULT};
    use crate::store::{Abort, Store};

    /// A gateway on a new store with the embedded config, its first provider and that
    /// provider as a caller.
    fn provider_and_gateway() -> (tempfile::TempDir, Gateway, String, Principal) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let cfg = Config::parse(EMBEDDED_DEFAULT, "gateway.toml").expect("config");
        let provider = cfg.providers[0].id.clone();
        let who = Principal {
            client_id: "hub".into(),
            role: Role::Provider,
            practices: vec![],
            provider: Some(provider.clone()),
        };
        (dir, Gateway::new(Arc::new(cfg), store), provider, who)
    }

    /// Stores written before Tasks were indexed by status only hold a copy of each Task
    /// under `~` beside its index by status, and a Task updated since keeps its old copy
    /// there (nothing moves it). A search without a status takes each Task once, at its
    /// current place in time; a search by status is unchanged.
    #[test]
    fn an_older_stores_copies_for_any_status_are_taken_once_and_never_stale() {
        let (_dir, g, provider, who) = provider_and_gateway();
        let task = |id: &str, v: &str, at: &str, status: &str| {
            json!({"resourceType": "Task", "id": id, "status": status,
                   "meta": {"versionId": v, "lastUpdated": at},
                   "owner": {"reference": format!("Organization/{provider}")}})
        };
        // t1: version 1 written by the older gateway, version 2 by this one; t2: written by
        // the older gateway only.
        let t1v1 = task("t1", "1", "2026-11-20T10:00:00Z", "requested");
        let t1v2 = task("t1", "2", "2026-11-21T10:00:00Z", "accepted");
        let t2 = task("t2", "1", "2026-11-20T12:00:00Z", "requested");
        let scope = format!("o/{provider}");
        let at = |r: &Value, status: &str| {
            let id = r["id"].as_str().unwrap_or_default();
            let suffix = keys::suffix(micros_of(fhir::last_updated_of(r)), id);
            format!("{}{suffix}", keys::time_prefix("Task", &scope, status))
        };
        g.commit(|tx| -> super::super::TxResult<()> {
            for (r, id) in [(&t1v2, "t1"), (&t2, "t2")] {
                let json = serde_json::to_vec(r).unwrap_or_default();
                tx.put(keys::current("Task", id).as_bytes(), &json)?;
            }
            for k in [
                at(&t1v1, "~"),
                at(&t1v2, "accepted"),
                at(&t2, "~"),
                at(&t2, "requested"),
            ] {
                tx.put(k.as_bytes(), b"")?;
            }
            Ok::<(), Abort<Error>>(())
        })
        .expect("write");
        let ids = |params: &[(&str, &str)]| -> Vec<(String, String)> {
            let params: Vec<(String, String)> = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let q = Query::parse("Task", &params, true).expect("query");
            g.search(&who, &q)
                .expect("search")
                .matches
                .iter()
                .map(|r| (r["id"].to_string(), r["status"].to_string()))
                .collect()
        };
        let pair = |id: &str, status: &str| (format!("\"{id}\""), format!("\"{status}\""));
        assert_eq!(
            ids(&[]),
            vec![pair("t2", "requested"), pair("t1", "accepted")]
        );
        assert_eq!(
            ids(&[("_sort", "-_lastUpdated")]),
            vec![pair("t1", "accepted"), pair("t2", "requested")]
        );
        assert_eq!(
            ids(&[("status", "requested")]),
            vec![pair("t2", "requested")]
        );
        assert_eq!(ids(&[("status", "accepted")]), vec![pair("t1", "accepted")]);
    }

    /// A Task's entry by patient is written once, with its first version; later versions
    /// do not move it, and a search by patient still finds the Task as it is now, in order.
    #[test]
    fn the_index_by_patient_is_written_once_and_searched_in_time_order() {
        let (_dir, g, provider, who) = provider_and_gateway();
        let task = |id: &str, v: &str, at: &str, status: &str| {
            json!({"resourceType": "Task", "id": id, "status": status,
                   "meta": {"versionId": v, "lastUpdated": at},
                   "for": {"reference": "Patient/p1"},
                   "owner": {"reference": format!("Organization/{provider}")}})
        };
        let scopes = super::super::scopes(Some(&provider), Default::default());
        let a1 = task("a", "1", "2026-11-20T10:00:00Z", "requested");
        let a2 = task("a", "2", "2026-11-22T10:00:00Z", "accepted");
        let b1 = task("b", "1", "2026-11-21T10:00:00Z", "requested");
        g.commit(|tx| {
            super::super::tx_put_resource(tx, "Task", &a1, None, &scopes)?;
            super::super::tx_put_resource(tx, "Task", &b1, None, &scopes)
        })
        .expect("write");
        g.commit(|tx| super::super::tx_put_resource(tx, "Task", &a2, Some(&a1), &scopes))
            .expect("update");
        let by_patient = keys::by_patient("Task", "p1");
        assert_eq!(g.store.count(by_patient.as_bytes()).expect("count"), 2);
        let found = |sort: &str| -> Vec<String> {
            let params = vec![
                ("patient".to_string(), "p1".to_string()),
                ("_sort".to_string(), sort.to_string()),
            ];
            let q = Query::parse("Task", &params, true).expect("query");
            g.search(&who, &q)
                .expect("search")
                .matches
                .iter()
                .map(|r| {
                    let field = |f: &str| r[f].as_str().unwrap_or_default().to_string();
                    format!("{}:{}", field("id"), field("status"))
                })
                .collect()
        };
        assert_eq!(found("_lastUpdated"), ["b:requested", "a:accepted"]);
        assert_eq!(found("-_lastUpdated"), ["a:accepted", "b:requested"]);
    }
}
