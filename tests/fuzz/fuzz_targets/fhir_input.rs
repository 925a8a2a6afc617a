//! The FHIR input path: a transaction Bundle, a Task update (judged against a stored Task by
//! the state machine, for both roles), a JSON Patch, and a provider Observation. Any bytes in;
//! typed errors out; never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use sp_gateway::config::{Config, Role, EMBEDDED_DEFAULT};

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| Config::parse(EMBEDDED_DEFAULT, "embedded").expect("demo config"))
}

fn stored_task() -> Value {
    json!({
        "resourceType": "Task", "id": "t1", "status": "in-progress", "intent": "order",
        "meta": { "versionId": "3", "lastUpdated": "2026-11-21T10:00:00Z" },
        "focus": { "reference": "ServiceRequest/s1" }, "for": { "reference": "Patient/p1" },
        "owner": { "reference": "Organization/pendle-crafts" },
        "requester": { "reference": "Organization/P81001" }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = sp_gateway::schema::parse_json(data) else {
        return;
    };
    let _ = sp_gateway::gateway::check_transaction(&v);
    for t in ["Task", "Observation", "ServiceRequest", "Patient"] {
        let _ = sp_gateway::fhir::validate(&v, t, config());
    }
    let _ = sp_gateway::fhir::check_feedback(&v, config());
    let old = stored_task();
    if sp_gateway::fhir::check_structure(&v, "Task").is_ok() {
        let _ = sp_gateway::fhir::task_immutable_change(&old, &v);
        for role in [Role::Provider, Role::GpSystem] {
            let _ = sp_gateway::workflow::check(&old, &v, role);
        }
    }
    if let Ok(patch) = serde_json::from_value::<json_patch::Patch>(v.clone()) {
        let mut t = old.clone();
        if json_patch::patch(&mut t, &patch).is_ok() {
            let _ = sp_gateway::fhir::check_structure(&t, "Task");
            let _ = sp_gateway::workflow::check(&old, &t, Role::Provider);
        }
    }
    let _ = sp_gateway::fhir::is_patient_declined(&v);
});
