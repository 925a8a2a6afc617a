//! Closed referrals out of the hot store: choosing them, moving them, and reading them back.
//!
//! A referral is archived once it is closed (its ServiceRequest `completed` or `revoked`,
//! every Task final), nothing for it waits in the outbox (queued or dead-lettered: the
//! caller says which referrals are held), and its last change is older than the cut-off.
//! Its group (every version of its ServiceRequest, Tasks, Patient and Observations, their
//! Provenance lists, who may read them (`x/acc`), the ServiceRequest's Task link and its
//! Observations (`k/srtask`, `b/`)) is written to the store's archive and synced; then one
//! transaction checks that none of it changed meanwhile, removes it together with the
//! resources' time and by-patient indexes, and keeps one pointer per resource
//! (`z/{Type}/{id}`: where the group is and its hash). A referral that changed is left for
//! the next round (its frame is then one nothing points at).
//!
//! What stays in sled: the audit chain's indexes (its records move by age, in blocks, with
//! `audit::archive`), the type-history lists, the idempotency records (a
//! re-sent referral is still answered with what was stored), the NHS-number index.
//!
//! Reading ([`Gateway::get`], [`Gateway::scan`]): sled first; for a key of an archived
//! resource, its group. So reads by id, `_history`, vread, Provenance, `$trail`, letters,
//! export and the searches that name one referral (identifier, `focus`, `based-on`) find
//! archived referrals; searches by time, status, owner, practice or patient read the hot
//! indexes only, and leave them out.
//!
//! Must not: archive anything open or undelivered, or remove a key whose value it did not
//! archive as it is.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use super::{index_keys, keys, Gateway};
use crate::error::{Error, Result};
use crate::fhir;
use crate::store::archive::Location;
use crate::store::{Abort, Entry};

/// The pointer to an archived resource's group.
pub fn pointer(rtype: &str, id: &str) -> String {
    format!("z/{rtype}/{id}")
}

/// The resource a key belongs to, for the key families an archived group holds.
fn owner_of(key: &[u8]) -> Option<(&str, &str)> {
    let key = std::str::from_utf8(key).ok()?;
    let p: Vec<&str> = key.splitn(5, '/').collect();
    let at = |i: usize| p.get(i).copied().filter(|s| !s.is_empty());
    match (at(0)?, at(1)?) {
        ("r" | "h", t) => Some((t, at(2)?)),
        ("x", "acc" | "prov") => Some((at(2)?, at(3)?)),
        ("k", "srtask") => Some(("ServiceRequest", at(2)?)),
        ("b", sr) => Some(("ServiceRequest", sr)),
        _ => None,
    }
}

/// Final statuses of a ServiceRequest.
const CLOSED_REQUEST: [&str; 2] = ["completed", "revoked"];

/// What one round of [`Gateway::archive_closed`] did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Round {
    /// Referrals moved to the archive.
    pub archived: usize,
    /// Keys removed from sled (pointers kept: one per resource).
    pub keys_removed: usize,
    /// Bytes of keys and values moved (before compression).
    pub bytes_moved: usize,
    /// Closed referrals passed over: held by the outbox, or changed while being moved.
    pub passed_over: usize,
    /// Audit records moved, in blocks (`audit::archive`).
    pub audit_records: u64,
}

/// What [`Gateway::verify_archive`] found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Archived resources (pointers), and the groups they point at, each read and checked.
    pub resources: usize,
    pub groups: usize,
    /// Blocks of the audit chain's records (`audit::archive`).
    pub audit_blocks: usize,
    pub segments: usize,
    pub bytes: u64,
    /// Frames nothing points at (a referral that changed while being moved, or a crash
    /// between writing a frame and the transaction that points at it): harmless.
    pub unreferenced: usize,
    /// What is wrong: a pointer whose frame is missing or damaged.
    pub problems: Vec<String>,
    /// What the walk of the segments noticed (a torn frame at a segment's end).
    pub notes: Vec<String>,
}

/// One referral's group, as read.
struct Group {
    /// Its referrals (ServiceRequest ids).
    srs: Vec<String>,
    /// Every key moved, with its value as read.
    entries: Vec<Entry>,
    /// Index keys removed without being kept.
    dropped: Vec<Vec<u8>>,
    /// `(type, id)` of every resource in it.
    members: Vec<(String, String)>,
}

impl Gateway {
    /// The value at `key`: from sled, or, for a key of an archived resource, its group.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.store.get(key)? {
            return Ok(Some(v));
        }
        let Some(group) = self.group_of(key)? else {
            return Ok(None);
        };
        Ok(group
            .iter()
            .find(|(k, _)| k.as_slice() == key)
            .map(|(_, v)| v.clone()))
    }

    /// Up to `limit` entries under `prefix`, in key order: from sled, or, when sled has none
    /// and the prefix is of an archived resource, from its group.
    pub fn scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<Entry>> {
        let hot = self.store.scan(prefix, None, limit)?;
        if !hot.is_empty() {
            return Ok(hot);
        }
        let Some(group) = self.group_of(prefix)? else {
            return Ok(hot);
        };
        Ok(group
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }

    /// The archived entries under `prefix`, if its resource is archived.
    pub(super) fn archived_under(&self, prefix: &[u8]) -> Result<Vec<Entry>> {
        Ok(match self.group_of(prefix)? {
            Some(g) => g
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .cloned()
                .collect(),
            None => Vec::new(),
        })
    }

    /// Whether a resource is in the archive.
    pub fn is_archived(&self, rtype: &str, id: &str) -> Result<bool> {
        Ok(self.store.get(pointer(rtype, id).as_bytes())?.is_some())
    }

    /// The archived group holding `key`'s resource, if it is archived.
    fn group_of(&self, key: &[u8]) -> Result<Option<Arc<Vec<Entry>>>> {
        let Some((rtype, id)) = owner_of(key) else {
            return Ok(None);
        };
        let key = pointer(rtype, id);
        let Some(loc) = self.store.get(key.as_bytes())? else {
            return Ok(None);
        };
        let loc = Location::parse(key.as_bytes(), &loc)?;
        Ok(Some(self.store.archived(&loc)?))
    }

    /// Checks the archive: every pointer names a frame that is there and matches its hash.
    pub fn verify_archive(&self) -> Result<Verdict> {
        let mut v = Verdict::default();
        let mut checked: HashSet<Location> = HashSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(b"z/", after.as_deref(), 1000)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (k, val) in &page {
                if k.starts_with(b"z/a/") {
                    v.audit_blocks += 1;
                } else {
                    v.resources += 1;
                }
                let Some(loc) = Location::from_bytes(val) else {
                    v.problems.push(format!(
                        "the pointer {} is malformed",
                        String::from_utf8_lossy(k)
                    ));
                    continue;
                };
                if !checked.insert(loc) {
                    continue;
                }
                match self.store.archived_from_disk(&loc) {
                    Ok(_) if k.starts_with(b"z/a/") => {}
                    Ok(_) => v.groups += 1,
                    Err(e) => v
                        .problems
                        .push(format!("{}: {e}", String::from_utf8_lossy(k))),
                }
            }
        }
        let walk = self.store.archive_walk()?;
        v.segments = walk.segments;
        v.bytes = walk.bytes;
        v.unreferenced = walk
            .locations
            .iter()
            .filter(|l| !checked.contains(l))
            .count();
        v.notes = walk.problems;
        Ok(v)
    }

    /// Every archived group once, with its location (by its ServiceRequest's pointer).
    pub fn for_each_archived(
        &self,
        mut f: impl FnMut(&Location, &[Entry]) -> Result<()>,
    ) -> Result<usize> {
        let prefix = pointer("ServiceRequest", "");
        let mut after: Option<Vec<u8>> = None;
        let mut n = 0;
        let mut visited = HashSet::new();
        loop {
            let page = self.store.scan(prefix.as_bytes(), after.as_deref(), 1000)?;
            let Some((last, _)) = page.last() else {
                return Ok(n);
            };
            after = Some(last.clone());
            for (k, v) in &page {
                let loc = Location::parse(k, v)?;
                // A group of several referrals (one Patient) is visited once.
                if !visited.insert(loc) {
                    continue;
                }
                let group = self.store.archived_from_disk(&loc)?;
                f(&loc, &group)?;
                n += 1;
            }
        }
    }

    /// Moves up to `limit` closed referrals whose last change is before `before_micros`
    /// (µs since the epoch, the commit clock) to the archive, oldest first, leaving out the
    /// referrals in `held` (ServiceRequest ids with outbox messages still to deliver).
    pub fn archive_closed(
        &self,
        before_micros: i64,
        limit: usize,
        held: &HashSet<String>,
    ) -> Result<Round> {
        let mut round = Round::default();
        let mut seen = HashSet::new();
        let mut groups = Vec::new();
        // Closed referrals, found by their Tasks' final statuses, oldest first.
        'statuses: for status in ["completed", "cancelled", "rejected", "failed"] {
            let prefix = keys::time_prefix("Task", "a", status);
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self.store.scan(prefix.as_bytes(), after.as_deref(), 500)?;
                let Some((last, _)) = page.last() else {
                    break;
                };
                after = Some(last.clone());
                for (k, _) in &page {
                    let suffix = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                    let Some((micros, task_id)) = suffix.split_once('/') else {
                        continue;
                    };
                    if micros.parse::<i64>().unwrap_or(i64::MAX) >= before_micros {
                        continue 'statuses;
                    }
                    let Some(task) = self.load("Task", task_id)? else {
                        continue;
                    };
                    let Some(sr) = task
                        .get("focus")
                        .and_then(|r| fhir::ref_id(r, "ServiceRequest"))
                        .map(str::to_string)
                    else {
                        continue;
                    };
                    if !seen.insert(sr.clone()) {
                        continue;
                    }
                    if held.contains(&sr) {
                        round.passed_over += 1;
                        continue;
                    }
                    if let Some(g) = self.closed_group(&sr, before_micros, held)? {
                        seen.extend(g.srs.iter().cloned());
                        groups.push(g);
                        if groups.len() >= limit {
                            break 'statuses;
                        }
                    }
                }
            }
        }
        if groups.is_empty() {
            return Ok(round);
        }
        let locations = self
            .store
            .archive(&groups.iter().map(|g| g.entries.clone()).collect::<Vec<_>>())?;
        let outcome = self.commit(|tx| {
            let mut moved = Vec::new();
            for (g, loc) in groups.iter().zip(&locations) {
                // Unchanged since read? Otherwise leave it for the next round.
                let mut same = true;
                for (k, v) in &g.entries {
                    if tx.get(k)?.as_deref() != Some(v.as_slice()) {
                        same = false;
                        break;
                    }
                }
                if !same {
                    continue;
                }
                for (k, _) in &g.entries {
                    tx.remove(k)?;
                }
                for k in &g.dropped {
                    tx.remove(k)?;
                }
                for (t, id) in &g.members {
                    tx.put(pointer(t, id).as_bytes(), &loc.to_bytes())?;
                }
                moved.push(g);
            }
            Ok::<_, Abort<Error>>(
                moved
                    .iter()
                    .map(|g| (g.entries.len(), g.dropped.len(), g.members.len(), bytes(g)))
                    .collect::<Vec<_>>(),
            )
        })?;
        for (entries, dropped, members, b) in &outcome {
            round.archived += 1;
            round.keys_removed += entries + dropped;
            round.keys_removed -= members;
            round.bytes_moved += b;
        }
        round.passed_over += groups.len() - outcome.len();
        if !outcome.is_empty() {
            self.store.durable_blocking()?;
        }
        Ok(round)
    }

    /// The group of referral `sr` if it is closed and its last change is before `before`.
    /// A group is everything of the referral's Patient: a Patient is usually one
    /// referral's, but `POST /fhir/ServiceRequest` may name an existing one, and then every
    /// referral of that Patient must be closed, and none held, for the group to move.
    fn closed_group(&self, sr: &str, before: i64, held: &HashSet<String>) -> Result<Option<Group>> {
        let json = |b: &[u8]| -> Result<Value> {
            serde_json::from_slice(b).map_err(|e| Error::Internal(e.to_string()))
        };
        let Some(request) = self
            .store
            .get(keys::current("ServiceRequest", sr).as_bytes())?
        else {
            return Ok(None);
        };
        let Some(patient) = json(&request)?
            .get("subject")
            .and_then(|r| fhir::ref_id(r, "Patient"))
            .map(str::to_string)
        else {
            return Ok(None);
        };
        let mut members = vec![
            ("ServiceRequest".to_string(), sr.to_string()),
            ("Patient".to_string(), patient.clone()),
        ];
        let mut dropped: Vec<Vec<u8>> = Vec::new();
        // Everything under the Patient's by-patient indexes (the rejected Task of a
        // referral passed to the hub too).
        for rtype in ["Task", "ServiceRequest", "Observation"] {
            let prefix = keys::by_patient(rtype, &patient);
            for (k, _) in self.store.scan(prefix.as_bytes(), None, 10_000)? {
                if let Some(id) = String::from_utf8_lossy(&k).rsplit('/').next() {
                    let m = (rtype.to_string(), id.to_string());
                    if !members.contains(&m) {
                        members.push(m);
                    }
                }
                dropped.push(k);
            }
        }
        let srs: Vec<String> = members
            .iter()
            .filter(|(t, _)| t == "ServiceRequest")
            .map(|(_, id)| id.clone())
            .collect();
        if srs.iter().any(|s| held.contains(s)) {
            return Ok(None);
        }
        let mut entries: Vec<Entry> = Vec::new();
        for s in &srs {
            if let Some(task) = self.store.get(keys::sr_task(s).as_bytes())? {
                entries.push((keys::sr_task(s).into_bytes(), task));
            }
            let prefix = keys::obs_by_sr(s);
            for (k, v) in self.store.scan(prefix.as_bytes(), None, 10_000)? {
                if let Some(id) = String::from_utf8_lossy(&k).rsplit('/').next() {
                    let m = ("Observation".to_string(), id.to_string());
                    if !members.contains(&m) {
                        members.push(m);
                    }
                }
                entries.push((k, v));
            }
        }
        // Who may read them: every scope that ever could (the scopes their indexes are in).
        let mut scopes = vec!["a".to_string()];
        for (t, id) in members
            .iter()
            .filter(|(t, _)| t == "ServiceRequest" || t == "Patient")
        {
            let prefix = keys::access(t, id, "");
            for (k, _) in self.store.scan(prefix.as_bytes(), None, 1000)? {
                let s = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if !scopes.contains(&s) {
                    scopes.push(s);
                }
            }
        }
        let mut last_change = 0i64;
        for (t, id) in &members {
            let Some(cur) = self.store.get(keys::current(t, id).as_bytes())? else {
                return Ok(None);
            };
            let value = json(&cur)?;
            let status = value.get("status").and_then(Value::as_str).unwrap_or("");
            let open = match t.as_str() {
                "Task" => !crate::workflow::is_final(status),
                "ServiceRequest" => !CLOSED_REQUEST.contains(&status),
                _ => false,
            };
            if open {
                return Ok(None);
            }
            last_change = last_change.max(super::micros_of(fhir::last_updated_of(&value)));
            for k in index_keys(t, &value, &scopes) {
                dropped.push(k.into_bytes());
            }
            if super::statuses_of(t).is_some() {
                // Stores written before kept a copy under any status (`~`).
                let mut any = value.clone();
                any["status"] = Value::Null;
                for k in index_keys(t, &any, &scopes) {
                    dropped.push(k.into_bytes());
                }
            }
            entries.push((keys::current(t, id).into_bytes(), cur));
            for prefix in [
                keys::history(t, id),
                keys::access(t, id, ""),
                crate::audit::provenance_index(&format!("{t}/{id}")),
            ] {
                entries.extend(self.store.scan(prefix.as_bytes(), None, 100_000)?);
            }
        }
        if last_change >= before {
            return Ok(None);
        }
        entries.sort();
        entries.dedup_by(|a, b| a.0 == b.0);
        let size: usize = entries.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        if size > crate::store::archive::MAX_GROUP_BYTES {
            // Too large to archive as one group: it stays in the hot store.
            return Ok(None);
        }
        dropped.sort();
        dropped.dedup();
        Ok(Some(Group {
            srs,
            entries,
            dropped,
            members,
        }))
    }
}

fn bytes(g: &Group) -> usize {
    g.entries.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::owner_of;

    #[test]
    fn keys_of_a_group_name_their_resource() {
        assert_eq!(owner_of(b"r/Task/t1"), Some(("Task", "t1")));
        assert_eq!(owner_of(b"h/Task/t1/0000000002"), Some(("Task", "t1")));
        assert_eq!(owner_of(b"x/acc/Patient/p1/o/hub"), Some(("Patient", "p1")));
        assert_eq!(owner_of(b"x/prov/Task/t1/~"), Some(("Task", "t1")));
        assert_eq!(owner_of(b"k/srtask/s1"), Some(("ServiceRequest", "s1")));
        assert_eq!(owner_of(b"b/s1/"), Some(("ServiceRequest", "s1")));
        assert_eq!(owner_of(b"a/00000000000000000001"), None);
        assert_eq!(owner_of(b"x/ae/e/Task/t1/~"), None);
        assert_eq!(owner_of(b"r/Task/"), None);
    }
}
