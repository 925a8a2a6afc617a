//! Task updates: `PUT` (a whole Task) and `PATCH` (JSON Patch or merge patch), judged by
//! `workflow`. `If-Match` is honoured when sent (412 when stale) and required only when the
//! config says so (`server.require_if_match`): FHIR lets clients omit it, and common clients
//! (fhirpy's `save()`) do; a rejection because the patient declined also writes the
//! declined Observation, in the same transaction.

use serde_json::{json, Value};

use super::{fail, keys, org_of, scopes, tx_add, tx_json, tx_now, tx_put_resource, Gateway};
use crate::auth::Principal;
use crate::config::Role;
use crate::error::{Error, Result};
use crate::fhir;
use crate::workflow;

/// The version an `If-Match` header names (`W/"3"` or `"3"`); `None` when there is none and
/// none is required.
pub(crate) fn parse_if_match(h: Option<&str>, required: bool) -> Result<Option<u64>> {
    let Some(h) = h else {
        if !required {
            return Ok(None);
        }
        return Err(Error::PreconditionRequired(
            "If-Match is required: send the ETag of the version you read, e.g. If-Match: W/\"1\""
                .into(),
        ));
    };
    let v = h.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.trim_matches('"').parse().map(Some).map_err(|_| {
        Error::invalid(
            "value",
            "If-Match",
            "must be an ETag such as W/\"3\" (the version you read)",
        )
    })
}

/// What a request proposes: a whole Task, or a patch to apply to the version it changes.
pub(super) enum Change {
    Whole(Value),
    Patch {
        json_patch: Option<json_patch::Patch>,
        doc: Value,
    },
}

impl Change {
    /// A PATCH body: a JSON Patch (RFC 6902, an array) or a JSON Merge Patch (RFC 7386, an
    /// object).
    pub(super) fn patch(body: &[u8]) -> Result<Change> {
        let doc = crate::schema::parse_json(body)?;
        let json_patch = if doc.is_object() {
            None
        } else {
            Some(
                serde_json::from_value::<json_patch::Patch>(doc.clone()).map_err(|e| {
                    Error::invalid(
                        "structure",
                        "",
                        format!(
                            "the body is neither a JSON Patch (RFC 6902) array nor a JSON Merge \
                             Patch (RFC 7386) object: {e}"
                        ),
                    )
                })?,
            )
        };
        Ok(Change::Patch { json_patch, doc })
    }

    /// The resource as it would be: a whole one as sent, or `current` patched (`what`
    /// names it in errors: `Task/{id}`).
    pub(super) fn proposed(&self, what: &str, current: &Value) -> Result<Value> {
        match self {
            Change::Whole(v) => Ok(v.clone()),
            Change::Patch { json_patch, doc } => {
                let mut proposed = current.clone();
                match json_patch {
                    Some(p) => json_patch::patch(&mut proposed, p).map_err(|e| {
                        Error::rule(
                            "",
                            format!("the JSON Patch cannot be applied to {what}: {e}"),
                        )
                    })?,
                    None => json_patch::merge(&mut proposed, doc),
                }
                Ok(proposed)
            }
        }
    }
}

fn task_in_scope(who: &Principal, task: &Value) -> bool {
    match who.role {
        Role::Provider => org_of(task, "owner") == who.provider.as_deref(),
        // A referring system may cancel the referrals it sent itself, not those it was told of.
        Role::GpSystem => {
            let parties = fhir::parties_of(task);
            parties.referrer.is_none()
                && parties
                    .practice
                    .is_some_and(|o| who.practices.iter().any(|p| p == o))
        }
        Role::Referrer => fhir::parties_of(task).referrer == Some(who.client_id.as_str()),
        _ => false,
    }
}

impl Gateway {
    /// `PUT /fhir/Task/{id}`: a status change under the state machine, guarded by `If-Match`.
    pub async fn update_task(
        &self,
        who: &Principal,
        id: &str,
        if_match: Option<&str>,
        body: &[u8],
    ) -> Result<Value> {
        if !matches!(who.role, Role::Provider | Role::GpSystem | Role::Referrer) {
            return Err(Error::Forbidden);
        }
        let proposed = crate::schema::parse_json(body)?;
        let expected = parse_if_match(if_match, self.cfg.server.require_if_match)?;
        fhir::check_structure(&proposed, "Task")?;
        self.apply_task(who, id, expected, Change::Whole(proposed))
            .await
    }

    /// `PATCH /fhir/Task/{id}`: a JSON Patch (RFC 6902, an array of operations) or a JSON
    /// Merge Patch (RFC 7386, an object), applied to the version `If-Match` names, then
    /// judged exactly like a PUT of the result.
    pub async fn patch_task(
        &self,
        who: &Principal,
        id: &str,
        if_match: Option<&str>,
        body: &[u8],
    ) -> Result<Value> {
        if !matches!(who.role, Role::Provider | Role::GpSystem | Role::Referrer) {
            return Err(Error::Forbidden);
        }
        let change = Change::patch(body)?;
        let expected = parse_if_match(if_match, self.cfg.server.require_if_match)?;
        self.apply_task(who, id, expected, change).await
    }

    /// Judges and writes a change to the Task's current version, or to the version
    /// `If-Match` named (412 if that is no longer current).
    pub(super) async fn apply_task(
        &self,
        who: &Principal,
        id: &str,
        expected: Option<u64>,
        change: Change,
    ) -> Result<Value> {
        if let Change::Whole(proposed) = &change {
            check_id(proposed, id)?;
        }
        let cfg = &self.cfg;
        // An archived Task is final: refused as any change to a final Task is, not as missing.
        if self.is_archived("Task", id)? {
            if let Some(t) = self.load("Task", id)?.filter(|t| task_in_scope(who, t)) {
                return Err(Error::rule(
                    "Task.status",
                    format!(
                        "Task/{id} is {} and its referral is closed and archived: it cannot \
                         change",
                        t.get("status").and_then(Value::as_str).unwrap_or("final")
                    ),
                ));
            }
        }
        let task = self.commit(|tx| {
            let current = match tx_json(tx, &keys::current("Task", id))? {
                Some(t) if task_in_scope(who, &t) => t,
                _ => return fail(Error::not_found(format!("Task/{id}"))),
            };
            let version = fhir::version_of(&current);
            if let Some(expected) = expected.filter(|e| *e != version) {
                return fail(stale(id, expected, version));
            }
            let proposed = change
                .proposed(&format!("Task/{id}"), &current)
                .or_else(fail)?;
            if let Change::Patch { .. } = &change {
                fhir::check_structure(&proposed, "Task").or_else(fail)?;
                check_id(&proposed, id).or_else(fail)?;
            }
            if let Some(path) = fhir::task_immutable_change(&current, &proposed) {
                return fail(Error::rule(
                    path,
                    format!(
                        "may not be changed; only {} may change",
                        fhir::TASK_MUTABLE.join(", ")
                    ),
                ));
            }
            workflow::check(&current, &proposed, who.role).or_else(fail)?;
            let now = tx_now(tx)?;
            let to = proposed
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let from = current
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let sr_id = current
                .get("focus")
                .and_then(|r| fhir::ref_id(r, "ServiceRequest"))
                .unwrap_or_default()
                .to_string();
            if to == "completed" {
                for (i, obs_id) in workflow::output_observations(&proposed).iter().enumerate() {
                    let obs = tx_json(tx, &keys::current("Observation", obs_id))?;
                    let based_on = obs
                        .as_ref()
                        .and_then(|o| o.pointer("/basedOn/0"))
                        .and_then(|r| fhir::ref_id(r, "ServiceRequest"));
                    if based_on != Some(sr_id.as_str()) {
                        return fail(Error::rule(
                            format!("Task.output[{i}].valueReference"),
                            format!(
                                "Observation/{obs_id} is not an Observation posted for this \
                                 referral (basedOn ServiceRequest/{sr_id})"
                            ),
                        ));
                    }
                }
            }
            let mut task = proposed.clone();
            task["lastModified"] = Value::String(now.instant.clone());
            if let Some(obj) = task.as_object_mut() {
                obj.remove("text");
            }
            fhir::stamp(&mut task, id, version + 1, &now.instant);
            let owner = org_of(&current, "owner");
            let parties = fhir::parties_of(&current);
            let practice = parties.practice;
            tx_put_resource(tx, "Task", &task, Some(&current), &scopes(owner, parties))?;
            super::report::tx_track(tx, cfg, "Task", &task)?;
            // A group without room, or for whom the person is not eligible, passes the
            // referral to the fallback hub rather than ending it there.
            let fallback = cfg.routing.fallback_provider.as_str();
            let reroute = (to == "rejected" && from != "rejected" && owner != Some(fallback))
                .then(|| fhir::reroute_reason(&task))
                .flatten();
            if to != from && reroute.is_none() {
                crate::outbox::mesh::tx_enqueue_letter(tx, cfg, practice, &task, &sr_id, &now)?;
            }
            if let Some(owner) = owner {
                let delta = workflow::is_open(to) as i64 - workflow::is_open(from) as i64;
                if delta != 0 {
                    tx_add(tx, &keys::open_count(owner), delta)?;
                }
            }
            let mut touched = vec![format!("Task/{id}")];
            if to == "rejected" && fhir::is_patient_declined(&task) {
                if let Some(provider) = owner.and_then(|o| cfg.provider(o)) {
                    let mut obs = fhir::declined_observation(&task, provider, &now.instant);
                    let obs_id = uuid::Uuid::new_v4().to_string();
                    fhir::stamp(&mut obs, &obs_id, 1, &now.instant);
                    touched.push(format!("Observation/{obs_id}"));
                    self.tx_put_observation(tx, &obs, None, &sr_id, (owner, parties), &now)?;
                }
            }
            if let Some(why) = reroute {
                let new_task = tx_reroute(tx, cfg, &current, &sr_id, owner, parties, why, &now)?;
                touched.push(format!("Task/{new_task}"));
                touched.push(format!("ServiceRequest/{sr_id}"));
                crate::audit::tx_record(tx, &touched, &now)?;
                return Ok(task);
            }
            // The referral follows its Task to the end: completed, or revoked when it was
            // cancelled, rejected or failed.
            if workflow::is_final(to) && !workflow::is_final(from) {
                if let Some(sr) = tx_json(tx, &keys::current("ServiceRequest", &sr_id))? {
                    let mut next = sr.clone();
                    next["status"] = Value::String(
                        if to == "completed" {
                            "completed"
                        } else {
                            "revoked"
                        }
                        .into(),
                    );
                    fhir::stamp(&mut next, &sr_id, fhir::version_of(&sr) + 1, &now.instant);
                    tx_put_resource(
                        tx,
                        "ServiceRequest",
                        &next,
                        Some(&sr),
                        &scopes(owner, parties),
                    )?;
                    super::report::tx_track(tx, cfg, "ServiceRequest", &next)?;
                }
            }
            if workflow::is_final(to) && !workflow::is_final(from) {
                touched.push(format!("ServiceRequest/{sr_id}"));
            }
            crate::audit::tx_record(tx, &touched, &now)?;
            Ok(task)
        })?;
        self.store.durable().await?;
        Ok(task)
    }
}

/// Passes a referral its provider rejected for capacity or eligibility to the fallback hub,
/// in the rejection's transaction: a new Task for the hub (its routing decision says why),
/// the ServiceRequest's performer the hub (it stays active), the hub's access and count.
/// Returns the new Task's id.
#[allow(clippy::too_many_arguments)]
fn tx_reroute(
    tx: &crate::store::Tx<'_>,
    cfg: &crate::config::Config,
    rejected: &Value,
    sr_id: &str,
    owner: Option<&str>,
    parties: fhir::Parties<'_>,
    why: &str,
    now: &crate::clock::Now,
) -> super::TxResult<String> {
    let Some(hub) = cfg.provider(&cfg.routing.fallback_provider) else {
        return fail(Error::Internal(
            "the fallback provider is not configured".into(),
        ));
    };
    let from_name = owner
        .and_then(|o| cfg.provider(o))
        .map(|p| p.name.as_str())
        .unwrap_or("the provider");
    let patient_id = rejected
        .get("for")
        .and_then(|r| fhir::ref_id(r, "Patient"))
        .unwrap_or_default()
        .to_string();
    let decision = crate::routing::Decision {
        provider: hub.id.clone(),
        rule: "fallback".into(),
        reason: format!(
            "{from_name} declined it ({why}); the fallback hub takes referrals no group can"
        ),
        service: None,
    };
    let new_id = uuid::Uuid::new_v4().to_string();
    let mut task = fhir::task(&fhir::TaskSpec {
        identifier: rejected.pointer("/identifier/0").cloned(),
        priority: rejected.get("priority").and_then(Value::as_str),
        requester: rejected.get("requester").cloned().unwrap_or(Value::Null),
        scope: fhir::referral_scope_of(rejected).cloned(),
        patient_id: &patient_id,
        sr_id,
        provider: hub,
        decision: &decision,
        now: &now.instant,
    });
    fhir::stamp(&mut task, &new_id, 1, &now.instant);
    let hub_scopes = scopes(Some(&hub.id), parties);
    tx_put_resource(tx, "Task", &task, None, &hub_scopes)?;
    super::report::tx_track(tx, cfg, "Task", &task)?;
    tx_add(tx, &keys::open_count(&hub.id), 1)?;
    tx.put(keys::sr_task(sr_id).as_bytes(), new_id.as_bytes())?;
    let hub_scope = format!("o/{}", hub.id);
    for (t, id) in [("Patient", patient_id.as_str()), ("ServiceRequest", sr_id)] {
        tx.put(keys::access(t, id, &hub_scope).as_bytes(), b"")?;
    }
    if let Some(sr) = tx_json(tx, &keys::current("ServiceRequest", sr_id))? {
        let mut next = sr.clone();
        next["performer"] = json!([fhir::provider_ref(hub)]);
        fhir::stamp(&mut next, sr_id, fhir::version_of(&sr) + 1, &now.instant);
        // Its time indexes move from the old provider's scope to the hub's.
        if let Some(o) = owner {
            for k in super::index_keys("ServiceRequest", &sr, &[format!("o/{o}")]) {
                tx.remove(k.as_bytes())?;
            }
        }
        tx_put_resource(tx, "ServiceRequest", &next, Some(&sr), &hub_scopes)?;
        super::report::tx_track(tx, cfg, "ServiceRequest", &next)?;
    }
    Ok(new_id)
}

fn check_id(proposed: &Value, id: &str) -> Result<()> {
    if proposed.get("id").and_then(Value::as_str) != Some(id) {
        return Err(Error::invalid(
            "invariant",
            "Task.id",
            format!("must be present and equal the id in the URL ({id})"),
        ));
    }
    Ok(())
}

fn stale(id: &str, expected: u64, version: u64) -> Error {
    Error::PreconditionFailed(format!(
        "If-Match names version {expected}, but Task/{id} is at version {version}: \
         read it again and re-apply the change"
    ))
}
