//! JSON parsing and JSON Schema checking shared by every inbound path.
//!
//! Owns: turning request bytes into `serde_json::Value` with a precise error (line, column,
//! nesting limit), running a compiled JSON Schema and turning its errors into [`Issue`]s
//! whose `expression` names the element (never quoting the offending value, which may be
//! patient data), and the official FHIR R4 schema compiled per resource type.
//! It must not know referral or workflow rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

use crate::error::{Error, Issue, Result};

const FHIR_R4_SCHEMA: &str = include_str!("../profiles/fhir-r4.schema.json");

/// At most this many schema issues are reported for one request.
const MAX_ISSUES: usize = 20;

/// Parses a request body as JSON. serde_json refuses nesting deeper than 128 levels.
pub fn parse_json(body: &[u8]) -> Result<Value> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::invalid("structure", "", "the request body is empty"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.to_string().contains("recursion limit") {
            "is nested too deeply (more than 128 levels)".to_string()
        } else {
            match e.classify() {
                serde_json::error::Category::Eof => "is truncated".to_string(),
                _ => "is not valid JSON".to_string(),
            }
        };
        Error::invalid(
            "structure",
            "",
            format!(
                "the request body {what} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Runs `validator` on `value`; each error becomes an [`Issue`] whose expression is
/// `root` followed by the element's path.
pub fn check(validator: &jsonschema::Validator, value: &Value, root: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    for err in validator.iter_errors(value) {
        if out.len() >= MAX_ISSUES {
            break;
        }
        let base = pointer_to_path(root, &err.instance_path().to_string());
        let (code, expression, diagnostics) = match err.kind() {
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                (
                    "required",
                    join(&base, name),
                    "is required but missing".to_string(),
                )
            }
            ValidationErrorKind::AdditionalProperties { unexpected } => (
                "structure",
                join(
                    &base,
                    unexpected.first().map(String::as_str).unwrap_or_default(),
                ),
                format!(
                    "is not an element allowed here{}",
                    if unexpected.len() > 1 {
                        format!(" (nor are: {})", unexpected[1..].join(", "))
                    } else {
                        String::new()
                    }
                ),
            ),
            ValidationErrorKind::Type { .. } => ("structure", base, err.masked().to_string()),
            ValidationErrorKind::Pattern { .. } | ValidationErrorKind::Format { .. } => (
                "value",
                base,
                "does not have the required format".to_string(),
            ),
            _ => ("value", base, err.masked().to_string()),
        };
        out.push(Issue::new(code, expression, diagnostics));
    }
    out
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else if name.is_empty() {
        base.to_string()
    } else {
        format!("{base}.{name}")
    }
}

/// "/patient/names/0/given" under root "Patient" → "Patient.names[0].given".
pub fn pointer_to_path(root: &str, pointer: &str) -> String {
    let mut out = root.to_string();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else if out.is_empty() {
            out.push_str(&seg);
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

fn fhir_root() -> &'static Value {
    static ROOT: OnceLock<Value> = OnceLock::new();
    ROOT.get_or_init(|| match serde_json::from_str(FHIR_R4_SCHEMA) {
        Ok(mut v) => {
            patch_types(&mut v);
            v
        }
        Err(e) => panic!("profiles/fhir-r4.schema.json is not JSON: {e}"),
    })
}

/// Patches 2 and 3 of `profiles/README.md`, made as the schema is loaded. The published
/// schema gives its complex types and resources no `"type": "object"` (so a string or an
/// array where an object belongs would pass), `xhtml` no type at all, and its integer
/// types only `"type": "number"` with a pattern (which applies to strings, so `-1.5` passes
/// as a `positiveInt`).
fn patch_types(root: &mut Value) {
    let Some(defs) = root.get_mut("definitions").and_then(Value::as_object_mut) else {
        return;
    };
    for def in defs.values_mut() {
        if let Some(def) = def.as_object_mut() {
            if def.contains_key("properties") && !def.contains_key("type") {
                def.insert("type".into(), Value::String("object".into()));
            }
        }
    }
    let integers = [
        ("integer", -2_147_483_648_i64),
        ("unsignedInt", 0),
        ("positiveInt", 1),
    ];
    for (name, minimum) in integers {
        if let Some(def) = defs.get_mut(name).and_then(Value::as_object_mut) {
            def.insert("type".into(), Value::String("integer".into()));
            def.insert("minimum".into(), Value::from(minimum));
            def.insert("maximum".into(), Value::from(2_147_483_647_i64));
        }
    }
    if let Some(def) = defs.get_mut("xhtml").and_then(Value::as_object_mut) {
        def.insert("type".into(), Value::String("string".into()));
    }
}

/// Compiles the schemas the request paths use, so that a broken embedded schema stops
/// start-up instead of a request.
pub fn init() -> Result<()> {
    for t in ["Task", "Observation"] {
        fhir_validator(t)?;
    }
    Ok(())
}

/// The official FHIR R4 JSON Schema, compiled for one resource type (`#/definitions/Task`).
pub fn fhir_validator(resource_type: &str) -> Result<Arc<jsonschema::Validator>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(v) = cache.lock().map_err(|_| poisoned())?.get(resource_type) {
        return Ok(v.clone());
    }
    let root = fhir_root();
    if root
        .pointer(&format!("/definitions/{resource_type}"))
        .is_none()
    {
        return Err(Error::Internal(format!(
            "no FHIR R4 schema definition for {resource_type}"
        )));
    }
    let mut schema = serde_json::Map::new();
    schema.insert(
        "$schema".into(),
        Value::String("http://json-schema.org/draft-06/schema#".into()),
    );
    schema.insert(
        "$ref".into(),
        Value::String(format!("#/definitions/{resource_type}")),
    );
    schema.insert(
        "definitions".into(),
        root.get("definitions").cloned().unwrap_or(Value::Null),
    );
    let compiled = jsonschema::draft6::new(&Value::Object(schema))
        .map_err(|e| Error::Internal(format!("FHIR R4 schema for {resource_type}: {e}")))?;
    let compiled = Arc::new(compiled);
    cache
        .lock()
        .map_err(|_| poisoned())?
        .insert(resource_type.to_string(), compiled.clone());
    Ok(compiled)
}

fn poisoned() -> Error {
    Error::Internal("schema cache lock poisoned".into())
}

/// Checks `resource` against the R4 schema of `resource_type`: the structural pre-check.
pub fn check_fhir(resource_type: &str, resource: &Value) -> Result<Vec<Issue>> {
    let v = fhir_validator(resource_type)?;
    Ok(check(&v, resource, resource_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers() {
        assert_eq!(
            pointer_to_path("", "/patient/nhsNumber"),
            "patient.nhsNumber"
        );
        assert_eq!(pointer_to_path("", "/needs/0"), "needs[0]");
        assert_eq!(
            pointer_to_path("Task", "/output/1/valueReference"),
            "Task.output[1].valueReference"
        );
        assert_eq!(pointer_to_path("Task", ""), "Task");
    }

    #[test]
    fn fhir_schema_per_type() {
        let ok =
            serde_json::json!({"resourceType": "Task", "status": "requested", "intent": "order"});
        assert!(check_fhir("Task", &ok).unwrap().is_empty());
        let bad = serde_json::json!({"resourceType": "Task", "status": 7, "intent": "order"});
        let issues = check_fhir("Task", &bad).unwrap();
        assert_eq!(
            issues[0].expression.as_deref(),
            Some("Task.status"),
            "{issues:?}"
        );
    }
}
