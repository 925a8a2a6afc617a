//! JSON parsing and JSON Schema checking shared by every inbound path.
//!
//! Owns: turning request bytes into `serde_json::Value` with a precise error (line, column,
//! nesting limit), running a compiled JSON Schema and turning its errors into [`Issue`]s
//! whose `expression` names the element (never quoting the offending value, which may be
//! patient data), and the official FHIR R4 schema compiled per resource type.
//! It must not know referral or workflow rules.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use boon::{Compiler, ErrorKind, InstanceToken, SchemaIndex, Schemas, ValidationError};
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

/// A compiled JSON Schema (draft 4 to 2020-12, as the schema's `$schema` says).
pub struct Validator {
    schemas: Schemas,
    index: SchemaIndex,
}

impl Validator {
    /// Compiles `schema`, whose own identifier is `url` (any `$ref` in it resolves against
    /// that). Nothing is fetched: a reference outside the document fails here.
    pub fn compile(url: &str, schema: Value) -> Result<Validator> {
        let mut compiler = Compiler::new();
        let mut schemas = Schemas::new();
        compiler
            .add_resource(url, schema)
            .map_err(|e| Error::Internal(format!("schema {url}: {e}")))?;
        let index = compiler
            .compile(url, &mut schemas)
            .map_err(|e| Error::Internal(format!("schema {url}: {e}")))?;
        Ok(Validator { schemas, index })
    }
}

/// Runs `validator` on `value`; each error becomes an [`Issue`] whose expression is
/// `root` followed by the element's path.
pub fn check(validator: &Validator, value: &Value, root: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    collect(&validator.schemas, validator.index, value, root, &mut out);
    out
}

fn collect(schemas: &Schemas, index: SchemaIndex, value: &Value, root: &str, out: &mut Vec<Issue>) {
    if let Err(e) = schemas.validate(value, index) {
        issues_of(&e, root, out);
    }
}

/// The leaves of boon's tree of errors, as issues. A failed `oneOf`/`anyOf` is one issue
/// at its element (what each alternative said would be noise). Messages are written here,
/// never boon's own: those quote the offending value, which may be patient data.
fn issues_of(e: &ValidationError, root: &str, out: &mut Vec<Issue>) {
    if out.len() >= MAX_ISSUES {
        return;
    }
    let at = path_of(root, &e.instance_location.tokens);
    let (code, expression, diagnostics) = match &e.kind {
        ErrorKind::Group
        | ErrorKind::Schema { .. }
        | ErrorKind::Reference { .. }
        | ErrorKind::AllOf
        | ErrorKind::ContentSchema => {
            for cause in &e.causes {
                issues_of(cause, root, out);
            }
            return;
        }
        ErrorKind::Required { want } => {
            for name in want {
                if out.len() < MAX_ISSUES {
                    out.push(Issue::new(
                        "required",
                        join(&at, name),
                        "is required but missing",
                    ));
                }
            }
            return;
        }
        ErrorKind::AdditionalProperties { got } => (
            "structure",
            join(&at, got.first().map(|c| c.as_ref()).unwrap_or_default()),
            format!(
                "is not an element allowed here{}",
                if got.len() > 1 {
                    let rest: Vec<&str> = got[1..].iter().map(|c| c.as_ref()).collect();
                    format!(" (nor are: {})", rest.join(", "))
                } else {
                    String::new()
                }
            ),
        ),
        ErrorKind::Type { got, want } => {
            let want: Vec<String> = want.iter().map(|t| t.to_string()).collect();
            (
                "structure",
                at,
                format!("must be {} (it is {got})", with_article(&want.join(" or "))),
            )
        }
        ErrorKind::Pattern { .. } | ErrorKind::Format { .. } => {
            ("value", at, "does not have the required format".to_string())
        }
        ErrorKind::Enum { want } => ("value", at, one_of(want)),
        ErrorKind::Const { want } => ("value", at, one_of(std::slice::from_ref(*want))),
        ErrorKind::MinLength { want, .. } => {
            ("value", at, format!("is shorter than {want} characters"))
        }
        ErrorKind::MaxLength { want, .. } => {
            ("value", at, format!("is longer than {want} characters"))
        }
        ErrorKind::MinItems { want, .. } => {
            ("structure", at, format!("must have at least {want} items"))
        }
        ErrorKind::MaxItems { want, .. } => {
            ("structure", at, format!("must have at most {want} items"))
        }
        ErrorKind::UniqueItems { got } => (
            "value",
            at,
            format!("has the same item twice (at {} and {})", got[0], got[1]),
        ),
        ErrorKind::MinProperties { want, .. } => (
            "structure",
            at,
            format!("must have at least {want} elements"),
        ),
        ErrorKind::MaxProperties { want, .. } => (
            "structure",
            at,
            format!("must have at most {want} elements"),
        ),
        ErrorKind::Minimum { want, .. } => ("value", at, format!("must be at least {want}")),
        ErrorKind::Maximum { want, .. } => ("value", at, format!("must be at most {want}")),
        ErrorKind::ExclusiveMinimum { want, .. } => {
            ("value", at, format!("must be greater than {want}"))
        }
        ErrorKind::ExclusiveMaximum { want, .. } => {
            ("value", at, format!("must be less than {want}"))
        }
        ErrorKind::MultipleOf { want, .. } => {
            ("value", at, format!("must be a multiple of {want}"))
        }
        ErrorKind::Dependency { prop, missing }
        | ErrorKind::DependentRequired { prop, missing } => (
            "required",
            at,
            format!("must have {} when it has {prop}", missing.join(", ")),
        ),
        ErrorKind::OneOf(Some(_)) => (
            "structure",
            at,
            "matches more than one of the forms allowed here".to_string(),
        ),
        ErrorKind::OneOf(None) | ErrorKind::AnyOf => (
            "structure",
            at,
            "matches none of the forms allowed here".to_string(),
        ),
        ErrorKind::PropertyName { .. } => (
            "structure",
            at,
            "has an element name that is not allowed here".to_string(),
        ),
        ErrorKind::AdditionalItems { .. } => (
            "structure",
            at,
            "has more items than allowed here".to_string(),
        ),
        ErrorKind::Contains | ErrorKind::MinContains { .. } | ErrorKind::MaxContains { .. } => (
            "structure",
            at,
            "does not have the items required here".to_string(),
        ),
        ErrorKind::ContentEncoding { .. } | ErrorKind::ContentMediaType { .. } => (
            "value",
            at,
            "does not have the required content".to_string(),
        ),
        ErrorKind::FalseSchema | ErrorKind::Not => {
            ("structure", at, "is not allowed here".to_string())
        }
        ErrorKind::RefCycle { .. } => (
            "exception",
            at,
            "could not be checked (the schema refers to itself in a cycle)".to_string(),
        ),
    };
    out.push(Issue::new(code, expression, diagnostics));
}

/// "must be one of: a, b" from a schema's `enum` (the schema's words, not the input's).
fn one_of(want: &[Value]) -> String {
    let shown: Vec<String> = want
        .iter()
        .take(12)
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    match (shown.as_slice(), want.len() > shown.len()) {
        ([one], false) => format!("must be {one}"),
        (_, false) => format!("must be one of: {}", shown.join(", ")),
        (_, true) => format!("must be one of: {}, …", shown.join(", ")),
    }
}

fn with_article(t: &str) -> String {
    if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {t}")
    } else {
        format!("a {t}")
    }
}

/// The element's path under `root`: `Task` + [output, 1, valueReference] →
/// `Task.output[1].valueReference`.
fn path_of(root: &str, tokens: &[InstanceToken]) -> String {
    let mut out = root.to_string();
    for t in tokens {
        match t {
            InstanceToken::Item(i) => out.push_str(&format!("[{i}]")),
            InstanceToken::Prop(name) if out.is_empty() => out.push_str(name),
            InstanceToken::Prop(name) => {
                out.push('.');
                out.push_str(name);
            }
        }
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

/// Patches 2 to 4 of `profiles/README.md`, made as the schema is loaded. The published
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
    // Patch 4: a resource inside a resource is checked by `check_fhir` against its own
    // type; here, only that it is an object naming a resource type. (As published,
    // `ResourceList` is a `oneOf` over every resource type: a fault inside a contained
    // resource was reported only as "matches none", and compiling any type meant all 146.)
    let names: Vec<Value> = root
        .pointer("/discriminator/mapping")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().map(Value::String).collect())
        .unwrap_or_default();
    if let Some(top) = root.as_object_mut() {
        // The document's own "any resource" `oneOf`: unused (each type is compiled from
        // its definition), and boon would compile all 146 through it.
        top.remove("oneOf");
    }
    if let Some(defs) = root.get_mut("definitions").and_then(Value::as_object_mut) {
        defs.insert(
            "ResourceList".into(),
            serde_json::json!({
                "type": "object",
                "required": ["resourceType"],
                "properties": {"resourceType": {"enum": names}}
            }),
        );
    }
}

/// The resource types the request paths check, compiled together at start-up, so that a
/// broken embedded schema stops start-up instead of a request.
const COMMON_TYPES: [&str; 5] = ["Task", "Observation", "ServiceRequest", "Patient", "Bundle"];

/// Compiles the schemas the request paths use (see [`COMMON_TYPES`]).
pub fn init() -> Result<()> {
    let lock = fhir();
    let mut guard = lock.write().map_err(|_| poisoned())?;
    compile_types(&mut guard, &COMMON_TYPES)
}

/// The R4 schema's definitions compiled so far, in one store that shares the data types
/// between them. A type outside [`COMMON_TYPES`] (one inside `contained`, say) is compiled
/// the first time it is checked (tens of milliseconds).
struct Fhir {
    schemas: Schemas,
    by_type: HashMap<String, SchemaIndex>,
}

const FHIR_URL: &str = "http://hl7.org/fhir/json-schema/4.0";

fn fhir() -> &'static RwLock<Fhir> {
    static FHIR: OnceLock<RwLock<Fhir>> = OnceLock::new();
    FHIR.get_or_init(|| {
        RwLock::new(Fhir {
            schemas: Schemas::new(),
            by_type: HashMap::new(),
        })
    })
}

/// Compiles the definitions of `types` not compiled yet into `fhir`. (boon's compiler is
/// not `Send`, so one is made for each call; the compiled store is kept.)
fn compile_types(fhir: &mut Fhir, types: &[&str]) -> Result<()> {
    let todo: Vec<&str> = types
        .iter()
        .copied()
        .filter(|t| !fhir.by_type.contains_key(*t))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let mut compiler = Compiler::new();
    compiler
        .add_resource(FHIR_URL, fhir_root().clone())
        .map_err(|e| Error::Internal(format!("FHIR R4 schema: {e}")))?;
    for t in todo {
        if !is_resource_type(t) {
            return Err(Error::Internal(format!(
                "no FHIR R4 schema definition for {t}"
            )));
        }
        let i = compiler
            .compile(&format!("{FHIR_URL}#/definitions/{t}"), &mut fhir.schemas)
            .map_err(|e| Error::Internal(format!("FHIR R4 schema for {t}: {e}")))?;
        fhir.by_type.insert(t.to_string(), i);
    }
    Ok(())
}

/// The compiled definition of `resource_type` (`#/definitions/Task`), compiled now if it
/// was not yet.
fn fhir_index(resource_type: &str) -> Result<SchemaIndex> {
    let lock = fhir();
    if let Some(i) = lock
        .read()
        .map_err(|_| poisoned())?
        .by_type
        .get(resource_type)
    {
        return Ok(*i);
    }
    let mut guard = lock.write().map_err(|_| poisoned())?;
    compile_types(&mut guard, &[resource_type])?;
    guard
        .by_type
        .get(resource_type)
        .copied()
        .ok_or_else(|| Error::Internal(format!("{resource_type} was not compiled")))
}

fn is_resource_type(name: &str) -> bool {
    fhir_root()
        .pointer("/discriminator/mapping")
        .and_then(Value::as_object)
        .is_some_and(|m| m.contains_key(name))
}

fn poisoned() -> Error {
    Error::Internal("schema lock poisoned".into())
}

/// Checks `resource` against the R4 schema of `resource_type`: the structural pre-check.
/// Resources inside it (`contained`, a Bundle's entries, a Parameters' resources) are
/// checked against their own type's definition, so an issue inside one names its element.
pub fn check_fhir(resource_type: &str, resource: &Value) -> Result<Vec<Issue>> {
    let mut out = Vec::new();
    check_fhir_at(resource_type, resource, resource_type, &mut out)?;
    Ok(out)
}

fn check_fhir_at(
    resource_type: &str,
    resource: &Value,
    root: &str,
    out: &mut Vec<Issue>,
) -> Result<()> {
    let index = fhir_index(resource_type)?;
    {
        let guard = fhir().read().map_err(|_| poisoned())?;
        collect(&guard.schemas, index, resource, root, out);
    }
    let mut inner = Vec::new();
    nested_resources(resource_type, resource, root, &mut inner);
    for (path, value) in inner {
        if out.len() >= MAX_ISSUES {
            break;
        }
        // The outer check has already said what is wrong with one that is not an object
        // or names no resource type.
        if let Some(t) = value.get("resourceType").and_then(Value::as_str) {
            if is_resource_type(t) {
                check_fhir_at(t, value, &path, out)?;
            }
        }
    }
    Ok(())
}

/// Where the R4 schema puts a whole resource (`ResourceList`): every resource's
/// `contained`, `Bundle.entry.resource`, `Bundle.entry.response.outcome`, and
/// `Parameters.parameter.resource` at any depth of `part`. A unit test holds this list to
/// the schema.
fn nested_resources<'v>(
    resource_type: &str,
    resource: &'v Value,
    root: &str,
    out: &mut Vec<(String, &'v Value)>,
) {
    let items = |v: &'v Value, name: &str| -> Vec<(usize, &'v Value)> {
        v.get(name)
            .and_then(Value::as_array)
            .map(|a| a.iter().enumerate().collect())
            .unwrap_or_default()
    };
    for (i, c) in items(resource, "contained") {
        out.push((format!("{root}.contained[{i}]"), c));
    }
    match resource_type {
        "Bundle" => {
            for (i, entry) in items(resource, "entry") {
                if let Some(r) = entry.get("resource") {
                    out.push((format!("{root}.entry[{i}].resource"), r));
                }
                if let Some(o) = entry.get("response").and_then(|r| r.get("outcome")) {
                    out.push((format!("{root}.entry[{i}].response.outcome"), o));
                }
            }
        }
        "Parameters" => parameters(resource, &format!("{root}.parameter"), "parameter", out),
        _ => {}
    }
}

fn parameters<'v>(v: &'v Value, at: &str, name: &str, out: &mut Vec<(String, &'v Value)>) {
    let Some(list) = v.get(name).and_then(Value::as_array) else {
        return;
    };
    for (i, p) in list.iter().enumerate() {
        if let Some(r) = p.get("resource") {
            out.push((format!("{at}[{i}].resource"), r));
        }
        parameters(p, &format!("{at}[{i}].part"), "part", out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = |name: &str| InstanceToken::Prop(name.to_string().into());
        assert_eq!(
            path_of("", &[t("patient"), t("nhsNumber")]),
            "patient.nhsNumber"
        );
        assert_eq!(
            path_of("", &[t("needs"), InstanceToken::Item(0)]),
            "needs[0]"
        );
        assert_eq!(
            path_of(
                "Task",
                &[t("output"), InstanceToken::Item(1), t("valueReference")]
            ),
            "Task.output[1].valueReference"
        );
        // A property named "0" is a property, not an index.
        assert_eq!(path_of("x", &[t("0")]), "x.0");
        assert_eq!(path_of("Task", &[]), "Task");
    }

    #[test]
    fn a_fault_inside_a_contained_or_bundled_resource_names_its_element() {
        let task = serde_json::json!({"resourceType": "Task", "status": "requested", "intent": "order",
            "contained": [{"resourceType": "Patient", "gender": 3}, {"resourceType": "Nonsense"}, "x"]});
        let issues = check_fhir("Task", &task).unwrap();
        let at: Vec<_> = issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        assert!(at.contains(&"Task.contained[0].gender"), "{issues:?}");
        assert!(at.contains(&"Task.contained[1].resourceType"), "{issues:?}");
        assert!(at.contains(&"Task.contained[2]"), "{issues:?}");
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Observation", "status": "final", "code": {}, "valueInteger": "7"}},
            {"response": {"status": "201", "outcome": {"resourceType": "OperationOutcome", "issue": [{"severity": 1}]}}}]});
        let issues = check_fhir("Bundle", &bundle).unwrap();
        let at: Vec<_> = issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        assert_eq!(
            at,
            [
                "Bundle.entry[0].resource.valueInteger",
                "Bundle.entry[1].response.outcome.issue[0].severity"
            ],
            "{issues:?}"
        );
        let params = serde_json::json!({"resourceType": "Parameters", "parameter": [{"name": "a", "part": [
            {"name": "b", "resource": {"resourceType": "Task", "status": false}}]}]});
        let issues = check_fhir("Parameters", &params).unwrap();
        assert_eq!(
            issues[0].expression.as_deref(),
            Some("Parameters.parameter[0].part[0].resource.status"),
            "{issues:?}"
        );
    }

    /// `nested_resources` knows every place the published schema puts a whole resource.
    #[test]
    fn nested_resources_follow_the_schema() {
        let published: Value = serde_json::from_str(FHIR_R4_SCHEMA).unwrap();
        let mut places = Vec::new();
        for (name, def) in published["definitions"].as_object().unwrap() {
            for (prop, p) in def["properties"].as_object().into_iter().flatten() {
                if p.to_string().contains("#/definitions/ResourceList") && prop != "contained" {
                    places.push(format!("{name}.{prop}"));
                }
                if prop == "contained" {
                    assert!(is_resource_type(name), "{name}.contained");
                }
            }
        }
        places.sort();
        assert_eq!(
            places,
            [
                "Bundle_Entry.resource",
                "Bundle_Response.outcome",
                "Parameters_Parameter.resource"
            ]
        );
    }

    #[test]
    fn messages_never_quote_the_value() {
        let secret = "Ada-Lovelace-1815";
        let task = serde_json::json!({"resourceType": "Task", "status": secret, "intent": "order",
            "id": format!("{secret} with spaces"), "authoredOn": secret, "priority": [secret],
            "note": [{"text": 5, "authorString": {"x": secret}}]});
        let issues = check_fhir("Task", &task).unwrap();
        assert!(issues.len() >= 4, "{issues:?}");
        assert!(!format!("{issues:?}").contains(secret), "{issues:?}");
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
