//! The stored form of an AuditEvent: the event with what every event of its kind says
//! left out (the resource type, id and meta, the gateway as source, the RESTful event type,
//! code systems and displays that follow from a code), so that a record costs a third of
//! the bytes. [`expand`] puts back exactly what [`compact`] left out; the hash chain is over
//! the stored form, so `audit verify` checks what is on disk. Records written before this
//! form (whole events) expand to themselves.
//!
//! It knows nothing of requests, the store or who may read the trail.

use serde_json::{json, Map, Value};

const REST_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const ORGANISATION_AGENT: &str = "organisation the client acts for";

fn client_system() -> String {
    format!("{}/Id/client", crate::fhir::CANONICAL)
}

fn rest_type() -> Value {
    json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" })
}

fn source() -> Value {
    json!({
        "observer": { "display": "sp-gateway" },
        "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server" }]
    })
}

fn person_type() -> Value {
    json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person" })
}

fn patient_role() -> Value {
    json!({ "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" })
}

fn system_object_type() -> Value {
    json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" })
}

fn org_agent_type() -> Value {
    json!({ "text": ORGANISATION_AGENT })
}

/// Removes `key` from `o` when it holds `value`.
fn drop_if(o: &mut Map<String, Value>, key: &str, value: &Value) {
    if o.get(key) == Some(value) {
        o.remove(key);
    }
}

/// Sets `key` in `o` to `value` when `o` has no `key`.
fn put_if_absent(o: &mut Map<String, Value>, key: &str, value: Value) {
    if !o.contains_key(key) {
        o.insert(key.to_string(), value);
    }
}

/// The objects in array member `key` of `o`, to change in place.
fn objects_mut<'a>(
    o: &'a mut Map<String, Value>,
    key: &str,
) -> impl Iterator<Item = &'a mut Map<String, Value>> {
    o.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
}

fn is_patient(entity: &Map<String, Value>) -> bool {
    entity
        .get("what")
        .and_then(|w| w.get("reference"))
        .and_then(Value::as_str)
        .is_some_and(|r| r.starts_with("Patient/"))
}

/// The stored form of a whole AuditEvent (as [`super::event`] makes it, with id and meta).
pub fn compact(event: &Value) -> Value {
    let mut e = event.clone();
    let Some(o) = e.as_object_mut() else {
        return e;
    };
    o.remove("resourceType");
    o.remove("id");
    if o.get("meta").and_then(|m| m.get("lastUpdated")) == o.get("recorded")
        && o.get("meta").and_then(|m| m.get("versionId")) == Some(&json!("1"))
    {
        o.remove("meta");
    }
    drop_if(o, "source", &source());
    drop_if(o, "type", &rest_type());
    for coding in objects_mut(o, "subtype") {
        drop_if(coding, "system", &json!(REST_INTERACTION));
    }
    for (i, agent) in objects_mut(o, "agent").enumerate() {
        if i == 0 {
            let Some(who) = agent.get_mut("who").and_then(Value::as_object_mut) else {
                continue;
            };
            let value = who
                .get("identifier")
                .filter(|id| id.get("system") == Some(&json!(client_system())))
                .and_then(|id| id.get("value"))
                .cloned();
            if let Some(v) = value.filter(|v| who.get("display") == Some(v)) {
                who.remove("display");
                who.insert("identifier".into(), json!({ "value": v }));
            }
        } else if agent.get("type") == Some(&org_agent_type())
            && agent.get("requestor") == Some(&json!(false))
        {
            agent.remove("type");
            agent.remove("requestor");
        }
    }
    for entity in objects_mut(o, "entity") {
        if is_patient(entity)
            && entity.get("type") == Some(&person_type())
            && entity.get("role") == Some(&patient_role())
        {
            entity.remove("type");
            entity.remove("role");
        } else if entity.contains_key("query") {
            drop_if(entity, "type", &system_object_type());
        }
    }
    e
}

/// The whole AuditEvent of record `seq` from its stored form.
pub fn expand(stored: &Value, seq: u64) -> Value {
    let mut e = stored.clone();
    let Some(o) = e.as_object_mut() else {
        return e;
    };
    put_if_absent(o, "resourceType", json!("AuditEvent"));
    put_if_absent(o, "id", json!(seq.to_string()));
    let recorded = o.get("recorded").cloned().unwrap_or(Value::Null);
    put_if_absent(
        o,
        "meta",
        json!({ "versionId": "1", "lastUpdated": recorded }),
    );
    put_if_absent(o, "source", source());
    put_if_absent(o, "type", rest_type());
    for coding in objects_mut(o, "subtype") {
        put_if_absent(coding, "system", json!(REST_INTERACTION));
    }
    for (i, agent) in objects_mut(o, "agent").enumerate() {
        if i == 0 {
            let Some(who) = agent.get_mut("who").and_then(Value::as_object_mut) else {
                continue;
            };
            let bare = who
                .get("identifier")
                .and_then(Value::as_object)
                .filter(|id| !id.contains_key("system"))
                .and_then(|id| id.get("value"))
                .cloned();
            if let Some(v) = bare {
                who.insert(
                    "identifier".into(),
                    json!({ "system": client_system(), "value": v }),
                );
                put_if_absent(who, "display", v);
            }
        } else if !agent.contains_key("type") {
            agent.insert("type".into(), org_agent_type());
            put_if_absent(agent, "requestor", json!(false));
        }
    }
    for entity in objects_mut(o, "entity") {
        if is_patient(entity) && !entity.contains_key("type") {
            entity.insert("type".into(), person_type());
            put_if_absent(entity, "role", patient_role());
        } else if entity.contains_key("query") {
            put_if_absent(entity, "type", system_object_type());
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{event, Context};
    use crate::clock::Now;

    /// An event as `tx_append` completes it before storing.
    fn whole(mut e: Value, seq: u64) -> Value {
        let recorded = e["recorded"].clone();
        e["id"] = json!(seq.to_string());
        e["meta"] = json!({ "versionId": "1", "lastUpdated": recorded });
        e
    }

    #[test]
    fn every_kind_of_event_expands_to_itself_and_stores_smaller() {
        let now = Now::current();
        let client = Context {
            client: Some("gp-pennine".into()),
            role: Some("gp-system".into()),
            organisations: vec!["Organization/P81001".into(), "Organization/P81002".into()],
            peer: Some("127.0.0.1".into()),
            method: "GET".into(),
            path: "/fhir/Task".into(),
            query: Some("owner=pendle-cvs-hub&status=requested".into()),
            ..Context::default()
        };
        let person = Context {
            client: Some("person/u1".into()),
            role: Some("provider-person".into()),
            organisations: vec!["Organization/pendle-crafts".into()],
            person: Some(("u1".into(), "ann@example.org".into())),
            method: "POST".into(),
            path: "/inbox/referrals/t1/accept".into(),
            interaction: Some(("update", "U")),
            ..Context::default()
        };
        let login = Context {
            login: Some("110122"),
            method: "POST".into(),
            path: "/inbox/sign-in".into(),
            ..Context::default()
        };
        let entities = [
            "Patient/p1".to_string(),
            "Task/t1".into(),
            "ServiceRequest/s1".into(),
        ];
        let mut system = event(
            &Context {
                client: Some("sp-gateway".into()),
                role: Some("system".into()),
                ..Context::default()
            },
            200,
            &entities,
            &now,
        );
        system["type"] = json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106", "display": "Export" });
        system["outcomeDesc"] = json!("letter sent: MESH message 20261122-1");
        let events = [
            event(&client, 200, &entities, &now),
            event(&client, 404, &[], &now),
            event(&person, 200, &entities, &now),
            event(&login, 401, &[], &now),
            event(&Context::default(), 401, &[], &now),
            system,
        ];
        for (i, e) in events.into_iter().enumerate() {
            let seq = 100 + i as u64;
            let e = whole(e, seq);
            let stored = compact(&e);
            assert_eq!(expand(&stored, seq), e, "event {i}");
            assert!(stored.to_string().len() < e.to_string().len(), "event {i}");
            // A record written whole (before the stored form) reads as it was.
            assert_eq!(expand(&e, seq), e, "event {i} stored whole");
        }
        let poll = whole(event(&client, 200, &entities, &now), 1);
        let (a, b) = (poll.to_string().len(), compact(&poll).to_string().len());
        assert!(b * 2 < a, "a poll's record: {a} bytes whole, {b} stored");
    }
}
