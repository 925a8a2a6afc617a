//! Provenance: one for each resource version a write produced, and one for each thing the
//! gateway did by itself to a Task (a letter sent, an acknowledgement received).
//!
//! A Provenance is not stored whole: everything it says but the version it names (when,
//! who, what activity, the AuditEvent it came from) is already in the AuditEvent of the
//! same transaction, in the hash chain. So the store keeps, per target, one list
//! (`x/prov/{Type}/{id}/~`, JSON) with an entry per Provenance: the AuditEvent's number,
//! the entry's place among that event's targets, the version (and, for a new Task, the
//! routing decision as the reason); the Provenance is made from it and the AuditEvent when
//! read. Entries written before this form (one key per Provenance,
//! `x/prov/{Type}/{id}/{seq:020}-{n}`, its value the Provenance's id and the Provenance
//! whole at `r/Provenance/{id}`) are read as they were stored.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::TxResult;
use crate::error::Error;
use crate::store::{Abort, Store, Tx};

pub const PREFIX: &str = "x/prov/";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

pub fn provenance_index(target: &str) -> String {
    format!("{PREFIX}{target}/")
}

/// What the list holds of one Provenance.
#[derive(Debug, Serialize, Deserialize)]
struct Facts {
    /// The AuditEvent of the write.
    s: u64,
    /// The target's place among the write's targets.
    n: usize,
    /// The version of the target the Provenance is about.
    v: String,
    /// Why, when the write says (the routing decision of a new Task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// The routing decision a new Task carries, as a Provenance reason.
fn routing_reason(task: &Value) -> Option<String> {
    let d = task
        .get("extension")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| {
            e.get("url").and_then(Value::as_str)
                == Some(crate::fhir::routing_extension_url().as_str())
        })?;
    let part = |name: &str| {
        d.get("extension")
            .and_then(Value::as_array)
            .and_then(|xs| {
                xs.iter()
                    .find(|x| x.get("url").and_then(Value::as_str) == Some(name))
                    .and_then(|x| x.get("valueString"))
                    .and_then(Value::as_str)
            })
            .unwrap_or_default()
    };
    Some(format!(
        "routed by rule {}: {}",
        part("rule"),
        part("reason")
    ))
}

/// Indexes the Provenance of `target`'s current version for AuditEvent `seq` (the `n`th
/// target of that event); with `reason`, a new Task's routing decision is its reason.
/// `archived`: the target's current version when it is archived (not in the hot store); its
/// Provenance then goes in a hot list read after the archived one.
pub(super) fn tx_put(
    tx: &Tx<'_>,
    target: &str,
    seq: u64,
    n: usize,
    with_reason: bool,
    archived: Option<&Value>,
) -> TxResult<()> {
    let cur = match tx.get(format!("r/{target}").as_bytes())? {
        Some(b) => match serde_json::from_slice::<Value>(&b) {
            Ok(v) => v,
            Err(_) => return Ok(()),
        },
        None => match archived {
            Some(v) => v.clone(),
            None => return Ok(()),
        },
    };
    let v = cur
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .unwrap_or("1")
        .to_string();
    let reason = (with_reason && target.starts_with("Task/") && v == "1")
        .then(|| routing_reason(&cur))
        .flatten();
    let key = format!("{}~", provenance_index(target));
    let mut list: Vec<Facts> = match tx.get(key.as_bytes())? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
        None => Vec::new(),
    };
    list.push(Facts {
        s: seq,
        n,
        v,
        reason,
    });
    let bytes =
        serde_json::to_vec(&list).map_err(|e| Abort::Caller(Error::Internal(e.to_string())))?;
    tx.put(key.as_bytes(), &bytes)?;
    Ok(())
}

/// A Provenance for each resource version a write produced (`entities`, in order), from
/// the write's AuditEvent `seq`.
pub(super) fn tx_record(tx: &Tx<'_>, entities: &[String], seq: u64) -> TxResult<()> {
    for (n, target) in entities.iter().enumerate() {
        tx_put(tx, target, seq, n, true, None)?;
    }
    Ok(())
}

/// The Provenances of one index entry of `target` (a value under its
/// [`provenance_index`]): its list, or one of the older form. The caller reads the index
/// (the gateway: from sled or from an archived group); the AuditEvents are in the chain.
pub fn entry(store: &Store, target: &str, value: &[u8]) -> crate::error::Result<Vec<Value>> {
    if let Ok(list) = serde_json::from_slice::<Vec<Facts>>(value) {
        let mut out = Vec::new();
        for f in list {
            out.extend(render(store, target, f)?);
        }
        return Ok(out);
    }
    // Written before Provenance was made on reading: the value is its id.
    let key = format!("r/Provenance/{}", String::from_utf8_lossy(value));
    Ok(store
        .get(key.as_bytes())?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .into_iter()
        .collect())
}

/// The Provenance `facts` describe, made with their AuditEvent.
fn render(store: &Store, target: &str, facts: Facts) -> crate::error::Result<Option<Value>> {
    let (seq, n) = (facts.s, facts.n);
    let Some(event) = super::read(store, &seq.to_string())? else {
        return Ok(None);
    };
    let recorded = event.get("recorded").cloned().unwrap_or(Value::Null);
    let typ = event.get("type").cloned().unwrap_or(Value::Null);
    let by_itself = typ.get("system") == Some(&json!(DCM))
        && matches!(
            typ.get("code").and_then(Value::as_str),
            Some("110106" | "110107")
        );
    let (activity, role) = if by_itself {
        (
            json!({ "coding": [typ], "text": event.get("outcomeDesc").cloned().unwrap_or(Value::Null) }),
            "performer",
        )
    } else if facts.v == "1" {
        (
            json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE", "display": "create" }] }),
            "author",
        )
    } else {
        (
            json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "UPDATE", "display": "revise" }] }),
            "author",
        )
    };
    let id = format!("{seq}-{n}");
    let mut p = json!({
        "resourceType": "Provenance",
        "id": id,
        "meta": { "versionId": "1", "lastUpdated": recorded },
        "target": [{ "reference": format!("{target}/_history/{}", facts.v) }],
        "recorded": recorded,
        "activity": activity,
        "agent": [{
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": role }] },
            "who": event.pointer("/agent/0/who").cloned().unwrap_or(Value::Null)
        }],
        "entity": [{ "role": "source", "what": { "reference": format!("AuditEvent/{seq}") } }]
    });
    if let Some(r) = facts.reason {
        p["reason"] = json!([{ "text": r }]);
    }
    Ok(Some(p))
}

/// Writes every Provenance as one JSON line (FHIR bulk NDJSON), by target; returns how many.
pub fn export_provenance(
    store: &Store,
    out: &mut impl std::io::Write,
) -> crate::error::Result<usize> {
    let mut n = 0;
    store.for_each(PREFIX.as_bytes(), |k, v| {
        let key = String::from_utf8_lossy(&k[PREFIX.len()..]).into_owned();
        let Some((target, _)) = key.rsplit_once('/') else {
            return Ok(());
        };
        let ps = entry(store, target, v).map_err(|e| std::io::Error::other(e.to_string()))?;
        for p in ps {
            serde_json::to_writer(&mut *out, &p)?;
            out.write_all(b"\n")?;
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written before Provenance was made on reading keeps its Provenance whole at
    /// `r/Provenance/{id}`, with the id as the index entry's value: read as stored.
    #[test]
    fn provenance_stored_whole_reads_as_stored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let old = json!({ "resourceType": "Provenance", "id": "7-0", "target": [{ "reference": "Task/t1/_history/1" }] });
        store
            .transact::<_, ()>(|tx| {
                tx.put(b"r/Provenance/7-0", old.to_string().as_bytes())?;
                tx.put(
                    format!("{}{:020}-0", provenance_index("Task/t1"), 7).as_bytes(),
                    b"7-0",
                )?;
                Ok(())
            })
            .map_err(|_| "transaction")
            .expect("write");
        assert_eq!(
            store
                .scan(provenance_index("Task/t1").as_bytes(), None, 10)
                .expect("index")
                .iter()
                .flat_map(|(_, v)| entry(&store, "Task/t1", v).expect("read"))
                .collect::<Vec<_>>(),
            vec![old.clone()]
        );
        let mut out = Vec::new();
        assert_eq!(export_provenance(&store, &mut out).expect("export"), 1);
        assert_eq!(String::from_utf8_lossy(&out), format!("{old}\n"));
    }
}
