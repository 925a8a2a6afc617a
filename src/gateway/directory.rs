//! The directory's use cases: importing an ORUK feed, reading and searching the
//! directory's HealthcareService, Location and Organization resources, and a provider
//! setting its own services' capacity status.
//!
//! An import maps the whole feed first (`directory::oruk`), then writes every accepted
//! service with its Organization and Locations in one transaction: a refused service
//! leaves nothing behind, and the report says what was added, changed, retired (a service
//! missing from the feed: still read, never deleted, since Tasks point at it) and refused,
//! and why. What the gateway keeps locally survives: the capacity status is carried over
//! from the stored version, and the config's local fields are never written here. After a
//! write, the in-memory snapshot of the directory's facts ([`Directory`]) is reloaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::task::{parse_if_match, Change};
use super::{fail, keys, tx_json, tx_now, tx_put_resource, Gateway};
use crate::auth::Principal;
use crate::config::Role;
use crate::directory::{self, oruk, CapacityStatus, Directory, Place, Service};
use crate::error::{Error, Result};
use crate::fhir;

/// What an import did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportReport {
    /// Services in the feed.
    pub services: usize,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
    pub retired: Vec<String>,
    pub refused: Vec<Refused>,
    /// Organizations and Locations written (new or changed).
    pub organizations_written: usize,
    pub locations_written: usize,
    /// What was read but not used.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    pub at: String,
    pub id: Option<String>,
    pub reasons: Vec<String>,
}

impl ImportReport {
    /// The report as people read it.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{} services in the feed: {} added, {} changed, {} unchanged, {} retired, {} refused \
             ({} organisations and {} locations written)\n",
            self.services,
            self.added.len(),
            self.changed.len(),
            self.unchanged,
            self.retired.len(),
            self.refused.len(),
            self.organizations_written,
            self.locations_written
        );
        for (what, ids) in [
            ("added", &self.added),
            ("changed", &self.changed),
            ("retired", &self.retired),
        ] {
            for id in ids {
                out.push_str(&format!("{what}: HealthcareService/{id}\n"));
            }
        }
        for r in &self.refused {
            out.push_str(&format!(
                "refused: {} ({})\n",
                r.at,
                r.id.as_deref().unwrap_or("no id")
            ));
            for why in &r.reasons {
                out.push_str(&format!("  - {why}\n"));
            }
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

/// A resource without its server-owned `meta`, for "did anything change?".
fn content(r: &Value) -> Value {
    let mut r = r.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("meta");
    }
    r
}

/// The capacity status extension of `from`, carried onto `to` (a local field).
fn carry_capacity(from: &Value, to: &mut Value) {
    let ext = from
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|l| {
            l.iter()
                .find(|e| e.get("url").and_then(Value::as_str) == Some(directory::EXT_CAPACITY))
        })
        .cloned();
    directory::set_extension(to, directory::EXT_CAPACITY, ext);
}

const ALL: [&str; 1] = ["a"];

impl Gateway {
    /// Every current resource of a directory type, read in batches.
    fn all_of(&self, rtype: &str) -> Result<Vec<Value>> {
        let prefix = keys::current(rtype, "");
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self.store.scan(prefix.as_bytes(), after.as_deref(), 1000)?;
            let Some((last, _)) = batch.last() else {
                return Ok(out);
            };
            after = Some(last.clone());
            for (_, b) in &batch {
                out.push(
                    serde_json::from_slice(b)
                        .map_err(|e| Error::Internal(format!("stored {rtype} unreadable: {e}")))?,
                );
            }
        }
    }

    /// The directory's facts as of the last directory write.
    pub fn directory(&self) -> Arc<Directory> {
        match self.directory.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the directory's facts from the store into the snapshot.
    pub fn reload_directory(&self) -> Result<()> {
        let mut dir = Directory::default();
        for r in self.all_of("HealthcareService")? {
            let s = Service::of(&r);
            dir.services.insert(s.id.clone(), s);
        }
        for r in self.all_of("Location")? {
            let p = Place::of(&r);
            dir.places.insert(p.id.clone(), p);
        }
        let mut slot = match self.directory.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Arc::new(dir);
        Ok(())
    }

    /// `sp-gateway directory import` / `POST /admin/directory/import`: one ORUK feed into
    /// the directory, in one transaction.
    pub async fn import_directory(&self, feed: &Value) -> Result<ImportReport> {
        let _one_at_a_time = self.directory_writes.lock().await;
        let items = oruk::services_of(feed).map_err(|e| Error::invalid("structure", "", e))?;
        let validator = oruk::validator()?;
        let mut report = ImportReport {
            services: items.len(),
            ..ImportReport::default()
        };
        let mut mapped = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("contents[{i}]");
            match oruk::map_service(&self.cfg, &validator, item, &at) {
                Ok(m) if !seen.insert(m.id.clone()) => report.refused.push(Refused {
                    at,
                    id: Some(m.id.clone()),
                    reasons: vec![format!("service {} is listed twice in the feed", m.id)],
                }),
                Ok(mut m) => {
                    report.notes.append(&mut m.notes);
                    mapped.push(m);
                }
                Err(r) => {
                    if let Some(id) = &r.id {
                        seen.insert(id.clone());
                    }
                    report.refused.push(Refused {
                        at: r.at,
                        id: r.id,
                        reasons: r.reasons,
                    });
                }
            }
        }
        // One Organization and Location per id: the first service that names it says it.
        let mut orgs: BTreeMap<String, Value> = BTreeMap::new();
        let mut places: BTreeMap<String, Value> = BTreeMap::new();
        for m in &mapped {
            let oid = m.organization["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            orgs.entry(oid).or_insert_with(|| m.organization.clone());
            for l in &m.locations {
                let lid = l["id"].as_str().unwrap_or_default().to_string();
                places.entry(lid).or_insert_with(|| l.clone());
            }
        }
        // Services the directory has that the feed does not name: retired.
        let stored: Vec<String> = self.directory().services.keys().cloned().collect();
        let missing: Vec<&String> = stored.iter().filter(|id| !seen.contains(*id)).collect();
        let (added, changed, unchanged, retired, orgs_w, locs_w) = self.commit(|tx| {
            let now = tx_now(tx)?;
            let today = now.instant.get(..10).unwrap_or_default().to_string();
            let mut written: Vec<String> = Vec::new();
            // Writes `new` over the stored version if its content differs; says whether it
            // was new (Some(true)), changed (Some(false)) or the same (None).
            let mut put = |rtype: &str, mut new: Value| -> super::TxResult<Option<bool>> {
                let id = new["id"].as_str().unwrap_or_default().to_string();
                let current = tx_json(tx, &keys::current(rtype, &id))?;
                if let Some(cur) = &current {
                    if rtype == "HealthcareService" {
                        carry_capacity(cur, &mut new);
                    }
                    if content(cur) == content(&new) {
                        return Ok(None);
                    }
                }
                let v = current.as_ref().map_or(1, |c| fhir::version_of(c) + 1);
                fhir::stamp(&mut new, &id, v, &now.instant);
                let scopes: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
                tx_put_resource(tx, rtype, &new, current.as_ref(), &scopes)?;
                written.push(format!("{rtype}/{id}"));
                Ok(Some(current.is_none()))
            };
            let (mut orgs_w, mut locs_w) = (0, 0);
            for o in orgs.values() {
                orgs_w += usize::from(put("Organization", o.clone())?.is_some());
            }
            for l in places.values() {
                locs_w += usize::from(put("Location", l.clone())?.is_some());
            }
            let (mut added, mut changed, mut unchanged, mut retired) =
                (Vec::new(), Vec::new(), 0, Vec::new());
            for m in &mapped {
                match put("HealthcareService", m.service.clone())? {
                    Some(true) => added.push(m.id.clone()),
                    Some(false) => changed.push(m.id.clone()),
                    None => unchanged += 1,
                }
            }
            for id in &missing {
                let Some(cur) = tx_json(tx, &keys::current("HealthcareService", id))? else {
                    continue;
                };
                if Service::of(&cur).status == "retired" {
                    continue;
                }
                let mut r = cur.clone();
                r["active"] = json!(false);
                directory::set_extension(
                    &mut r,
                    &directory::ext_retired(),
                    Some(json!({ "url": directory::ext_retired(), "valueDate": today })),
                );
                if put("HealthcareService", r)?.is_some() {
                    retired.push((*id).clone());
                }
            }
            crate::audit::tx_record(tx, &written, &now)?;
            Ok((added, changed, unchanged, retired, orgs_w, locs_w))
        })?;
        self.store.durable().await?;
        self.reload_directory()?;
        report.added = added;
        report.changed = changed;
        report.unchanged = unchanged;
        report.retired = retired;
        report.organizations_written = orgs_w;
        report.locations_written = locs_w;
        Ok(report)
    }

    /// `GET /fhir/{HealthcareService|Location|Organization}/{id}`: the directory is not
    /// patient data; every client but the admin reads it. An Organization the directory
    /// does not hold is a configured practice or provider.
    pub(super) fn read_directory(&self, who: &Principal, rtype: &str, id: &str) -> Result<Value> {
        if who.role == Role::Admin {
            return Err(Error::not_found(format!("{rtype}/{id}")));
        }
        if let Some(r) = self.load(rtype, id)? {
            return Ok(r);
        }
        if rtype == "Organization" {
            if let Some(o) = fhir::organization(&self.cfg, id) {
                return Ok(o);
            }
        }
        Err(Error::not_found(format!("{rtype}/{id}")))
    }

    /// `GET /fhir/{HealthcareService|Location|Organization}?…`: a searchset Bundle, by id
    /// order, paged with `_count` and `_offset`, with `_include`d resources after the
    /// page's matches.
    pub fn search_directory(
        &self,
        who: &Principal,
        rtype: &str,
        params: &[(String, String)],
        base: &str,
    ) -> Result<Value> {
        if who.role == Role::Admin {
            return Err(Error::Forbidden);
        }
        let q = DirQuery::parse(rtype, params)?;
        let dir = self.directory();
        let ids: Vec<String> = match rtype {
            "HealthcareService" => dir
                .services
                .values()
                .filter(|s| q.matches_service(s))
                .map(|s| s.id.clone())
                .collect(),
            "Location" => dir
                .places
                .values()
                .filter(|p| q.matches_place(p))
                .map(|p| p.id.clone())
                .collect(),
            _ => self
                .organizations()?
                .into_iter()
                .filter(|o| q.matches_organization(o))
                .filter_map(|o| o["id"].as_str().map(str::to_string))
                .collect(),
        };
        let total = ids.len();
        let page: Vec<&String> = ids.iter().skip(q.offset).take(q.count).collect();
        let mut entries = Vec::new();
        let mut included = BTreeSet::new();
        let mut includes = Vec::new();
        for id in &page {
            let Ok(r) = self.read_directory(who, rtype, id) else {
                continue;
            };
            for inc in &q.includes {
                let (element, target) = match inc.as_str() {
                    "HealthcareService:organization" => ("providedBy", "Organization"),
                    "HealthcareService:location" => ("location", "Location"),
                    "HealthcareService:coverage-area" => ("coverageArea", "Location"),
                    _ => continue,
                };
                let refs: Vec<Value> = match r.get(element) {
                    Some(Value::Array(a)) => a.clone(),
                    Some(v) => vec![v.clone()],
                    None => vec![],
                };
                for rf in refs {
                    if let Some(tid) = fhir::ref_id(&rf, target) {
                        if included.insert(format!("{target}/{tid}")) {
                            if let Ok(t) = self.read_directory(who, target, tid) {
                                includes.push(t);
                            }
                        }
                    }
                }
            }
            entries.push(json!({
                "fullUrl": format!("{base}/{rtype}/{id}"),
                "resource": r,
                "search": { "mode": "match" }
            }));
        }
        for t in includes {
            let (tt, tid) = (
                t["resourceType"].as_str().unwrap_or_default().to_string(),
                t["id"].as_str().unwrap_or_default().to_string(),
            );
            entries.push(json!({
                "fullUrl": format!("{base}/{tt}/{tid}"),
                "resource": t,
                "search": { "mode": "include" }
            }));
        }
        let link = |offset: usize| {
            let mut pairs = form_urlencoded::Serializer::new(String::new());
            for (k, v) in params.iter().filter(|(k, _)| k != "_offset") {
                pairs.append_pair(k, v);
            }
            pairs.append_pair("_offset", &offset.to_string());
            format!("{base}/{rtype}?{}", pairs.finish())
        };
        let mut links = vec![json!({ "relation": "self", "url": link(q.offset) })];
        if q.offset + q.count < total {
            links.push(json!({ "relation": "next", "url": link(q.offset + q.count) }));
        }
        let mut b = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": links
        });
        if !entries.is_empty() {
            b["entry"] = json!(entries);
        }
        Ok(b)
    }

    /// Every Organization: the directory's, then configured practices and providers it
    /// does not hold.
    fn organizations(&self) -> Result<Vec<Value>> {
        let mut out = self.all_of("Organization")?;
        let held: BTreeSet<String> = out
            .iter()
            .filter_map(|o| o["id"].as_str().map(str::to_string))
            .collect();
        let configured = self
            .cfg
            .practices
            .iter()
            .map(|p| p.ods.clone())
            .chain(self.cfg.providers.iter().map(|p| p.id.clone()));
        for id in configured {
            if !held.contains(&id) {
                out.extend(fhir::organization(&self.cfg, &id));
            }
        }
        out.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        Ok(out)
    }

    /// `PUT`/`PATCH /fhir/HealthcareService/{id}`: a provider states whether one of its own
    /// services can take referrals (Gravity's capacity status). Nothing else of a service
    /// may change here: the rest comes from the directory's feed.
    /// `body` is a whole HealthcareService (`PUT`), or with `patch` a JSON Patch or merge
    /// patch.
    pub async fn update_service(
        &self,
        who: &Principal,
        id: &str,
        if_match: Option<&str>,
        body: &[u8],
        patch: bool,
    ) -> Result<Value> {
        if who.role != Role::Provider {
            return Err(Error::Forbidden);
        }
        let change = if patch {
            Change::patch(body)?
        } else {
            let whole = crate::schema::parse_json(body)?;
            fhir::check_structure(&whole, "HealthcareService")?;
            Change::Whole(whole)
        };
        let expected = parse_if_match(if_match, self.cfg.server.require_if_match)?;
        self.write_capacity(who, id, expected, |current| {
            let proposed = change.proposed(&format!("HealthcareService/{id}"), current)?;
            if proposed.get("id").and_then(Value::as_str) != Some(id) {
                return Err(Error::invalid(
                    "invariant",
                    "HealthcareService.id",
                    format!("must be present and equal the id in the URL ({id})"),
                ));
            }
            let status = match CapacityStatus::of(&proposed) {
                Some(Ok(c)) => Some(c),
                Some(Err(why)) => {
                    return Err(Error::rule(
                        format!("HealthcareService.extension('{}')", directory::EXT_CAPACITY),
                        why,
                    ))
                }
                None => None,
            };
            let mut rest = proposed.clone();
            directory::set_extension(&mut rest, directory::EXT_CAPACITY, None);
            let mut was = current.clone();
            directory::set_extension(&mut was, directory::EXT_CAPACITY, None);
            if content(&rest) != content(&was) {
                return Err(Error::rule(
                    "HealthcareService",
                    "only the capacity status (extension SDOHCC-ExtensionHealthcareServiceCapacityStatus) \
                     may change here; the rest of a service comes from the directory's feed",
                ));
            }
            Ok(status)
        })
        .await
    }

    /// The inbox's capacity form: a person of the provider sets one of its own services'
    /// status (`None` clears it), from the page showing `version`.
    pub async fn set_service_capacity(
        &self,
        who: &Principal,
        id: &str,
        version: u64,
        status: Option<CapacityStatus>,
    ) -> Result<Value> {
        if who.role != Role::Provider {
            return Err(Error::Forbidden);
        }
        self.write_capacity(who, id, Some(version), |_| Ok(status))
            .await
    }

    /// Writes the capacity status `decide` gives for the provider's own service `id`, at
    /// version `expected` if given, in one transaction with its audit record; a service of
    /// another provider (or none) is not found, and the same status again writes nothing.
    async fn write_capacity(
        &self,
        who: &Principal,
        id: &str,
        expected: Option<u64>,
        decide: impl Fn(&Value) -> Result<Option<CapacityStatus>>,
    ) -> Result<Value> {
        let _one_at_a_time = self.directory_writes.lock().await;
        let own = |s: &Value| Some(Service::of(s).organization.as_str()) == who.provider.as_deref();
        let written = self.commit(|tx| {
            let current = match tx_json(tx, &keys::current("HealthcareService", id))? {
                Some(c) if own(&c) => c,
                _ => return fail(Error::not_found(format!("HealthcareService/{id}"))),
            };
            let v = fhir::version_of(&current);
            if let Some(e) = expected {
                if e != v {
                    return fail(Error::PreconditionFailed(format!(
                        "HealthcareService/{id} is now at version {v}, not {e}: read it again"
                    )));
                }
            }
            let status = decide(&current).or_else(fail)?;
            if CapacityStatus::of(&current).and_then(Result::ok) == status {
                return Ok(current);
            }
            let mut new = current.clone();
            directory::set_extension(
                &mut new,
                directory::EXT_CAPACITY,
                status.map(CapacityStatus::extension),
            );
            let now = tx_now(tx)?;
            fhir::stamp(&mut new, id, v + 1, &now.instant);
            tx_put_resource(
                tx,
                "HealthcareService",
                &new,
                Some(&current),
                &["a".to_string()],
            )?;
            crate::audit::tx_record(tx, &[format!("HealthcareService/{id}")], &now)?;
            Ok(new)
        })?;
        self.store.durable().await?;
        self.reload_directory()?;
        Ok(written)
    }

    /// A provider's own services that are not retired, by name, each with the version
    /// of its stored resource (the inbox's capacity form sends it back).
    pub fn own_services(&self, who: &Principal) -> Result<Vec<(Service, u64)>> {
        let (Role::Provider, Some(provider)) = (who.role, who.provider.as_deref()) else {
            return Err(Error::Forbidden);
        };
        let mut out = Vec::new();
        for s in self.directory().services.values() {
            if s.organization != provider || s.status == "retired" {
                continue;
            }
            if let Some(r) = self.load("HealthcareService", &s.id)? {
                out.push((s.clone(), fhir::version_of(&r)));
            }
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name).then(a.0.id.cmp(&b.0.id)));
        Ok(out)
    }
}

/// A directory search's parameters.
struct DirQuery {
    filters: Vec<(String, Vec<String>)>,
    includes: Vec<String>,
    count: usize,
    offset: usize,
}

const SERVICE_PARAMS: [&str; 8] = [
    "_id",
    "active",
    "service-category",
    "service-type",
    "coverage-area",
    "location",
    "organization",
    "name",
];
const LOCATION_PARAMS: [&str; 4] = ["_id", "name", "address-postalcode", "organization"];
const ORGANIZATION_PARAMS: [&str; 2] = ["_id", "name"];
pub const SERVICE_INCLUDES: [&str; 3] = [
    "HealthcareService:organization",
    "HealthcareService:location",
    "HealthcareService:coverage-area",
];

fn token_matches(want: &str, codings: &[(String, String)]) -> bool {
    match want.split_once('|') {
        Some((sys, code)) => codings
            .iter()
            .any(|(s, c)| c == code && (sys.is_empty() || s == sys)),
        None => codings.iter().any(|(_, c)| c == want),
    }
}

fn ref_matches(want: &str, rtype: &str, id: &str) -> bool {
    want.strip_prefix(&format!("{rtype}/")).unwrap_or(want) == id
}

/// FHIR string search: starts with, ignoring case (and, for postcodes, spaces).
fn starts(have: &str, want: &str) -> bool {
    let norm = |s: &str| s.to_lowercase().replace(' ', "");
    norm(have).starts_with(&norm(want))
}

impl DirQuery {
    fn parse(rtype: &str, params: &[(String, String)]) -> Result<DirQuery> {
        let known: &[&str] = match rtype {
            "HealthcareService" => &SERVICE_PARAMS,
            "Location" => &LOCATION_PARAMS,
            _ => &ORGANIZATION_PARAMS,
        };
        let mut q = DirQuery {
            filters: Vec::new(),
            includes: Vec::new(),
            count: 50,
            offset: 0,
        };
        for (k, v) in params {
            let number = |max: usize| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| {
                        Error::invalid(
                            "value",
                            k.clone(),
                            format!("must be a whole number up to {max}"),
                        )
                    })
            };
            match k.as_str() {
                "_count" => q.count = number(200)?.max(1),
                "_offset" => q.offset = number(1_000_000)?,
                "_include" => {
                    if rtype != "HealthcareService" || !SERVICE_INCLUDES.contains(&v.as_str()) {
                        return Err(Error::invalid(
                            "not-supported",
                            "_include",
                            format!(
                                "`{v}` is not supported: {rtype} takes {}",
                                if rtype == "HealthcareService" {
                                    SERVICE_INCLUDES.join(", ")
                                } else {
                                    "none".into()
                                }
                            ),
                        ));
                    }
                    q.includes.push(v.clone());
                }
                "_format" => {}
                name if known.contains(&name) => {
                    if name == "active" && !matches!(v.as_str(), "true" | "false") {
                        return Err(Error::invalid("value", "active", "must be true or false"));
                    }
                    q.filters
                        .push((name.to_string(), v.split(',').map(str::to_string).collect()));
                }
                other => {
                    return Err(Error::invalid(
                        "not-supported",
                        other.to_string(),
                        format!(
                            "is not a search parameter of {rtype}: it takes {}, _count, _offset{}",
                            known.join(", "),
                            if rtype == "HealthcareService" {
                                ", _include"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
            }
        }
        Ok(q)
    }

    fn all(&self, test: impl Fn(&str, &str) -> bool) -> bool {
        self.filters
            .iter()
            .all(|(name, values)| values.iter().any(|v| test(name, v)))
    }

    fn matches_service(&self, s: &Service) -> bool {
        self.all(|name, v| match name {
            "_id" => s.id == v,
            "active" => s.active == (v == "true"),
            "service-category" => token_matches(v, &s.categories),
            "service-type" => token_matches(v, &s.types),
            "coverage-area" => s.coverage.iter().any(|l| ref_matches(v, "Location", l)),
            "location" => s.locations.iter().any(|l| ref_matches(v, "Location", l)),
            "organization" => ref_matches(v, "Organization", &s.organization),
            "name" => starts(&s.name, v),
            _ => false,
        })
    }

    fn matches_place(&self, p: &Place) -> bool {
        self.all(|name, v| match name {
            "_id" => p.id == v,
            "name" => starts(&p.name, v),
            "address-postalcode" => p.postcode.as_deref().is_some_and(|pc| starts(pc, v)),
            "organization" => p
                .organization
                .as_deref()
                .is_some_and(|o| ref_matches(v, "Organization", o)),
            _ => false,
        })
    }

    fn matches_organization(&self, o: &Value) -> bool {
        self.all(|name, v| match name {
            "_id" => o["id"].as_str() == Some(v),
            "name" => o["name"].as_str().is_some_and(|n| starts(n, v)),
            _ => false,
        })
    }
}
