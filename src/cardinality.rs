//! FHIR R4 element rules that the R4 JSON Schema does not carry: elements with minimum
//! cardinality 1 (`Task.status`, `Task.input.value[x]`, `Extension.url`…), choice
//! elements, of which at most one type may be present (`valueString` or `valueInteger`,
//! not both), and the codes of required bindings the schema has no enum for
//! (`ServiceRequest.status`, `Task.priority`…).
//!
//! Owns: walking a resource the schema has already passed, with the table in
//! `profiles/fhir-r4-cardinality.json` (generated from HL7's R4 StructureDefinitions; see
//! `profiles/README.md`), and naming each breach by its FHIRPath. Together with the schema
//! (which checks types, patterns, unknown elements and, since the gateway adds
//! `"type": "object"` to its complex types, objects) it is the structural check that
//! fhir-sdk's typed parse used to make; a test compares the two.
//! It must not know referral or workflow rules, HTTP or the store; it does not walk
//! contained resources (the schema checks those).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Issue, Result};

const TABLE: &str = include_str!("../profiles/fhir-r4-cardinality.json");

/// At most this many issues are reported for one resource.
const MAX_ISSUES: usize = 20;

#[derive(Debug, Deserialize)]
struct TypeRules {
    required: Vec<String>,
    choices: HashMap<String, Choice>,
    /// `code` elements with a required binding, and the codes it allows.
    codes: HashMap<String, Vec<String>>,
    children: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    required: bool,
    members: Vec<String>,
}

fn table() -> Result<&'static HashMap<String, TypeRules>> {
    static TABLE_CELL: OnceLock<std::result::Result<HashMap<String, TypeRules>, String>> =
        OnceLock::new();
    TABLE_CELL
        .get_or_init(|| serde_json::from_str(TABLE).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Internal(format!("profiles/fhir-r4-cardinality.json: {e}")))
}

/// Parses the embedded table, so that a broken one stops start-up instead of a request.
pub fn init() -> Result<()> {
    table().map(drop)
}

/// The breaches of `resource`, a `rtype` the table knows (an error if it does not).
pub fn check(resource: &Value, rtype: &str) -> Result<Vec<Issue>> {
    let table = table()?;
    if !table.contains_key(rtype) {
        return Err(Error::Internal(format!(
            "no FHIR R4 cardinality rules for {rtype}"
        )));
    }
    let mut out = Vec::new();
    walk(table, resource, rtype, rtype, &mut out);
    Ok(out)
}

fn present(obj: &Map<String, Value>, name: &str) -> bool {
    // A primitive may be present as its extension only (`_status`), e.g. a data-absent
    // reason: FHIR counts that as present.
    obj.get(name).is_some_and(|v| !v.is_null())
        || obj.get(&format!("_{name}")).is_some_and(|v| !v.is_null())
}

fn walk(
    table: &HashMap<String, TypeRules>,
    value: &Value,
    ty: &str,
    path: &str,
    out: &mut Vec<Issue>,
) {
    if out.len() >= MAX_ISSUES {
        return;
    }
    // Anything but an object was refused by the schema already.
    let (Some(obj), Some(rules)) = (value.as_object(), table.get(ty)) else {
        return;
    };
    for name in &rules.required {
        if !present(obj, name) {
            out.push(Issue::new(
                "required",
                format!("{path}.{name}"),
                "is required",
            ));
        }
    }
    let mut stems: Vec<&String> = rules.choices.keys().collect();
    stems.sort();
    for stem in stems {
        let choice = &rules.choices[stem];
        let found: Vec<&str> = choice
            .members
            .iter()
            .filter(|m| present(obj, m))
            .map(String::as_str)
            .collect();
        if found.len() > 1 {
            out.push(Issue::new(
                "structure",
                format!("{path}.{stem}[x]"),
                format!(
                    "has more than one type ({}): a choice element takes one",
                    found.join(", ")
                ),
            ));
        } else if found.is_empty() && choice.required {
            out.push(Issue::new(
                "required",
                format!("{path}.{stem}[x]"),
                "is required (one of its types)",
            ));
        }
    }
    let mut coded: Vec<(&String, &Vec<String>)> = rules.codes.iter().collect();
    coded.sort();
    for (name, allowed) in coded {
        let bad = match obj.get(name) {
            Some(Value::String(c)) => !allowed.contains(c),
            Some(Value::Array(cs)) => cs
                .iter()
                .any(|c| c.as_str().is_some_and(|c| !allowed.iter().any(|a| a == c))),
            _ => false,
        };
        if bad {
            // The value is not quoted: it could be anything a client typed.
            out.push(Issue::new(
                "code-invalid",
                format!("{path}.{name}"),
                format!(
                    "is not a code FHIR R4 allows here (one of: {})",
                    allowed.join(", ")
                ),
            ));
        }
    }
    let mut keys: Vec<&String> = obj.keys().collect();
    keys.sort();
    for key in keys {
        let child = &obj[key];
        let child_ty = match key.strip_prefix('_') {
            Some(_) => "Element",
            None => match rules.children.get(key) {
                Some(t) => t.as_str(),
                None => continue,
            },
        };
        match child {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(table, item, child_ty, &format!("{path}.{key}[{i}]"), out);
                }
            }
            _ => walk(table, child, child_ty, &format!("{path}.{key}"), out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn exprs(v: &Value, t: &str) -> Vec<String> {
        check(v, t)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.expression)
            .collect()
    }

    #[test]
    fn required_elements_and_choices_are_named_by_path() {
        let task = json!({
            "resourceType": "Task",
            "intent": "order",
            "input": [
                { "type": { "text": "a" }, "valueString": "x" },
                { "type": { "text": "b" } },
                { "type": { "text": "c" }, "valueString": "x", "valueInteger": 1 }
            ],
            "extension": [{ "valueString": "no url" }],
            "_intent": { "extension": [{ "url": "u", "valueCode": "a", "valueString": "b" }] }
        });
        assert_eq!(
            exprs(&task, "Task"),
            vec![
                "Task.status",
                "Task._intent.extension[0].value[x]",
                "Task.extension[0].url",
                "Task.input[1].value[x]",
                "Task.input[2].value[x]",
            ]
        );
    }

    #[test]
    fn a_primitive_present_only_as_its_extension_counts() {
        let task = json!({
            "resourceType": "Task", "intent": "order",
            "_status": { "extension": [{ "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown" }] }
        });
        assert!(exprs(&task, "Task").is_empty());
    }

    #[test]
    fn codes_of_required_bindings_are_checked() {
        let sr = json!({
            "resourceType": "ServiceRequest", "status": "busy", "intent": "order",
            "subject": { "reference": "Patient/1" }, "priority": "routine"
        });
        assert_eq!(exprs(&sr, "ServiceRequest"), vec!["ServiceRequest.status"]);
        let issues = check(&sr, "ServiceRequest").unwrap_or_default();
        assert!(
            !issues[0].diagnostics.contains("busy"),
            "the value is not quoted"
        );
    }

    #[test]
    fn every_input_type_has_rules() {
        for t in ["Task", "Observation", "ServiceRequest", "Patient"] {
            assert!(check(&json!({}), t).is_ok(), "{t}");
        }
        assert!(check(&json!({}), "Bundle").is_err());
        assert_eq!(
            exprs(&json!({}), "ServiceRequest"),
            vec![
                "ServiceRequest.status",
                "ServiceRequest.intent",
                "ServiceRequest.subject"
            ]
        );
    }
}
