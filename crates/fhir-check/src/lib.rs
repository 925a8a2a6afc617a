//! fhir-sdk's typed parse of the FHIR resources sp-gateway takes as input (Task,
//! Observation, ServiceRequest, Patient): a second check, after the R4 JSON Schema, that
//! a resource fits FHIR's typed model.
//!
//! Its own crate for build time only. Each typed parse monomorphises fhir-model's
//! deserialisers (with `serde_path_to_error` over `serde_json::Value`) in the crate that
//! calls it; in the gateway's crate that was most of a ten-minute release build. Here it
//! compiles beside the gateway's other dependencies and at a lower optimisation level (the
//! root manifest's profile override): it is far from any hot path (<1% of ingest CPU).
//! It owns nothing else and must not know HTTP, the store or the gateway's rules.

use serde_json::Value;

/// Where a resource failed to parse (a path such as `status` or `for.reference`, empty or
/// `.` for the root) and serde's message, which may quote input values: the caller must
/// redact it before showing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub path: String,
    pub message: String,
}

/// Parses `resource` as fhir-sdk's R4B `rtype` (the same JSON as R4 for these types).
/// `None` when `rtype` is not one this crate parses.
pub fn typed_parse(resource: &Value, rtype: &str) -> Option<Result<(), Failure>> {
    use fhir_sdk::r4b::resources as r;
    fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), Failure> {
        serde_path_to_error::deserialize::<_, T>(v.clone())
            .map(drop)
            .map_err(|e| Failure {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })
    }
    Some(match rtype {
        "Task" => parse::<r::Task>(resource),
        "Observation" => parse::<r::Observation>(resource),
        "ServiceRequest" => parse::<r::ServiceRequest>(resource),
        "Patient" => parse::<r::Patient>(resource),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_parses_and_a_wrong_type_names_its_element() {
        let ok =
            serde_json::json!({ "resourceType": "Task", "status": "requested", "intent": "order" });
        assert_eq!(typed_parse(&ok, "Task"), Some(Ok(())));
        let bad = serde_json::json!({ "resourceType": "Task", "status": 7, "intent": "order" });
        let Some(Err(f)) = typed_parse(&bad, "Task") else {
            panic!("a number for a code parsed");
        };
        assert_eq!(f.path, "status");
        assert_eq!(typed_parse(&ok, "Bundle"), None);
    }
}
