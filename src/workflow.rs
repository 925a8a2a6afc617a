//! The Task state machine (DESIGN §6).
//!
//! Owns which status changes are legal, for whom, and what each needs (`statusReason`,
//! an `output` naming an Observation). Pure: it looks at the stored and the proposed Task
//! and the actor's role, and answers yes or a 422 naming the element. It must not read the
//! store; checking that an output Observation exists is the caller's job.

use serde_json::Value;

use crate::config::Role;
use crate::error::{Error, Result};

use crate::fhir::TASK_STATUSES as STATUSES;

/// Statuses that count against a provider's capacity.
pub fn is_open(status: &str) -> bool {
    matches!(status, "requested" | "accepted" | "in-progress" | "on-hold")
}

pub fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "rejected" | "cancelled" | "failed")
}

fn has_reason(task: &Value) -> bool {
    let Some(r) = task.get("statusReason") else {
        return false;
    };
    let text = r
        .get("text")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.trim().is_empty());
    let coded = r
        .get("coding")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    text || coded
}

/// Ids of the Observations that the Task's `output` refers to.
pub fn output_observations(task: &Value) -> Vec<String> {
    task.get("output")
        .and_then(Value::as_array)
        .map(|outs| {
            outs.iter()
                .filter_map(|o| o.get("valueReference"))
                .filter_map(|r| crate::fhir::ref_id(r, "Observation"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the change from `old` to `new` by a client of `role`.
pub fn check(old: &Value, new: &Value, role: Role) -> Result<()> {
    let from = old
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let to = match new.get("status").and_then(Value::as_str) {
        Some(s) if STATUSES.contains(&s) => s,
        Some(_) => {
            return Err(Error::invalid(
                "code-invalid",
                "Task.status",
                format!("is not a FHIR Task status; one of: {}", STATUSES.join(", ")),
            ))
        }
        None => return Err(Error::invalid("required", "Task.status", "is required")),
    };
    if is_final(from) {
        return Err(Error::rule(
            "Task.status",
            format!("the Task is {from}, which is final: it cannot change any more"),
        ));
    }
    match role {
        Role::GpSystem | Role::Referrer => {
            if to != "cancelled" {
                return Err(Error::rule(
                    "Task.status",
                    "a referring system may only cancel a referral (status `cancelled`)",
                ));
            }
            // The provider's elements stay the provider's.
            for element in ["businessStatus", "output"] {
                if old.get(element) != new.get(element) {
                    return Err(Error::rule(
                        format!("Task.{element}"),
                        "a referring system cancelling a referral may change only status, statusReason and note",
                    ));
                }
            }
        }
        Role::Provider => {
            let legal = from == to
                || matches!(
                    (from, to),
                    ("requested", "accepted" | "rejected")
                        | ("accepted", "in-progress")
                        | ("in-progress", "on-hold")
                        | ("on-hold", "in-progress")
                        | (
                            "accepted" | "in-progress" | "on-hold",
                            "completed" | "failed"
                        )
                        | (
                            "requested" | "accepted" | "in-progress" | "on-hold",
                            "cancelled"
                        )
                );
            if !legal {
                return Err(Error::rule(
                    "Task.status",
                    format!("a Task cannot go from {from} to {to}"),
                ));
            }
        }
        Role::Auditor | Role::Admin | Role::Commissioner => return Err(Error::Forbidden),
    }
    let needs_reason =
        matches!(to, "rejected" | "cancelled" | "failed") || (to == "on-hold" && from != "on-hold");
    if needs_reason && !has_reason(new) {
        return Err(Error::rule(
            "Task.statusReason",
            format!("is required when the status becomes {to}"),
        ));
    }
    if to == "completed" && output_observations(new).is_empty() {
        return Err(Error::rule(
            "Task.output",
            "a completed Task needs at least one output whose valueReference is an Observation \
             (the outcome or feedback posted for this referral)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(status: &str) -> Value {
        json!({ "status": status })
    }

    #[test]
    fn provider_paths() {
        assert!(check(&t("requested"), &t("accepted"), Role::Provider).is_ok());
        assert!(check(&t("requested"), &t("in-progress"), Role::Provider).is_err());
        assert!(check(&t("requested"), &t("rejected"), Role::Provider).is_err());
        let rejected =
            json!({ "status": "rejected", "statusReason": { "text": "patient declined" } });
        assert!(check(&t("requested"), &rejected, Role::Provider).is_ok());
        assert!(check(&t("accepted"), &t("completed"), Role::Provider).is_err());
        let done = json!({ "status": "completed", "output": [{ "type": { "text": "outcome" }, "valueReference": { "reference": "Observation/abc" } }] });
        assert!(check(&t("in-progress"), &done, Role::Provider).is_ok());
        assert!(check(&t("completed"), &t("completed"), Role::Provider).is_err());
    }

    #[test]
    fn gp_may_only_cancel() {
        let cancel = json!({ "status": "cancelled", "statusReason": { "text": "moved away" } });
        assert!(check(&t("accepted"), &cancel, Role::GpSystem).is_ok());
        assert!(check(&t("requested"), &t("accepted"), Role::GpSystem).is_err());
        assert!(check(&t("requested"), &t("cancelled"), Role::GpSystem).is_err());
    }
}
