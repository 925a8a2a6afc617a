//! Provider feedback: `POST /fhir/Observation` for a referral the provider serves, and the
//! shared write of an Observation with its indexes.

use serde_json::Value;

use super::{fail, keys, org_of, scopes, tx_json, tx_now, tx_put_resource, Gateway, Now, TxResult};
use crate::auth::Principal;
use crate::config::Role;
use crate::error::{Error, Result};
use crate::fhir;
use crate::store::Tx;
use crate::workflow;

impl Gateway {
    /// Writes a stamped Observation: resource, history, scope and patient indexes, the index
    /// by the ServiceRequest it is based on, and (when new) its place in the outbox.
    pub(crate) fn tx_put_observation(
        &self,
        tx: &Tx<'_>,
        obs: &Value,
        previous: Option<&Value>,
        sr_id: &str,
        (provider, parties): (Option<&str>, fhir::Parties<'_>),
        now: &Now,
    ) -> TxResult<()> {
        tx_put_resource(tx, "Observation", obs, previous, &scopes(provider, parties))?;
        super::report::tx_track(tx, &self.cfg, "Observation", obs)?;
        let id = obs.get("id").and_then(Value::as_str).unwrap_or_default();
        let key = |o: &Value| {
            let ts = super::micros_of(fhir::last_updated_of(o));
            format!("{}{}", keys::obs_by_sr(sr_id), keys::suffix(ts, id))
        };
        match previous {
            Some(p) => tx.remove(key(p).as_bytes())?,
            None => crate::outbox::tx_enqueue(tx, &self.cfg, parties.practice, id, sr_id, now)?,
        }
        tx.put(key(obs).as_bytes(), b"")?;
        Ok(())
    }

    /// Records on an Observation how its delivery to the GP system went (`delivered` or
    /// `failed`), as a new version carrying the gateway's delivery-status extension, in the
    /// caller's transaction (the outbox's own state change).
    pub fn tx_mark_delivery(&self, tx: &Tx<'_>, obs_id: &str, state: &str) -> TxResult<()> {
        let ext_url = crate::outbox::delivery_extension_url();
        let Some(cur) = tx_json(tx, &keys::current("Observation", obs_id))? else {
            return Ok(());
        };
        let sr_id = cur
            .pointer("/basedOn/0")
            .and_then(|r| fhir::ref_id(r, "ServiceRequest"))
            .unwrap_or_default()
            .to_string();
        // The same scopes the Observation was written under: its Task's owner and parties.
        let task = match tx.get(keys::sr_task(&sr_id).as_bytes())? {
            Some(t) => tx_json(tx, &keys::current("Task", &String::from_utf8_lossy(&t)))?,
            None => None,
        };
        let provider = task.as_ref().and_then(|t| org_of(t, "owner"));
        let parties = task.as_ref().map(fhir::parties_of).unwrap_or_default();
        let now = tx_now(tx)?;
        let mut next = cur.clone();
        let mut exts: Vec<Value> = next
            .get("extension")
            .and_then(Value::as_array)
            .map(|e| {
                e.iter()
                    .filter(|x| x.get("url").and_then(Value::as_str) != Some(ext_url.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        exts.push(crate::outbox::delivery_extension(state));
        next["extension"] = Value::Array(exts);
        fhir::stamp(&mut next, obs_id, fhir::version_of(&cur) + 1, &now.instant);
        self.tx_put_observation(tx, &next, Some(&cur), &sr_id, (provider, parties), &now)
    }

    /// `POST /fhir/Observation`: a provider's feedback or outcome for a referral it serves.
    pub async fn create_observation(&self, who: &Principal, body: &[u8]) -> Result<Value> {
        let Some(provider_id) = who
            .provider
            .as_deref()
            .filter(|_| who.role == Role::Provider)
        else {
            return Err(Error::Forbidden);
        };
        let mut posted = crate::schema::parse_json(body)?;
        // The performer is the caller's organisation: set when absent, refused below when it
        // names someone else.
        if let Some(o) = posted.as_object_mut() {
            if !o.contains_key("performer") {
                o.insert(
                    "performer".into(),
                    serde_json::json!([{ "reference": format!("Organization/{provider_id}") }]),
                );
            }
        }
        fhir::check_structure(&posted, "Observation")?;
        let (kind, sr_id) = fhir::check_feedback(&posted, &self.cfg)?;
        let obs_id = uuid::Uuid::new_v4().to_string();
        let not_served = || {
            Error::rule(
                "Observation.basedOn[0]",
                format!("ServiceRequest/{sr_id} is not a referral this provider serves"),
            )
        };
        let obs = self.commit(|tx| {
            let task_id = match tx.get(keys::sr_task(&sr_id).as_bytes())? {
                Some(t) => String::from_utf8_lossy(&t).into_owned(),
                None => return fail(not_served()),
            };
            let Some(task) = tx_json(tx, &keys::current("Task", &task_id))? else {
                return fail(not_served());
            };
            if org_of(&task, "owner") != Some(provider_id) {
                return fail(not_served());
            }
            let status = task.get("status").and_then(Value::as_str).unwrap_or_default();
            if workflow::is_final(status) {
                return fail(Error::rule(
                    "Observation.basedOn[0]",
                    format!("the referral's Task is {status}: it takes no more feedback"),
                ));
            }
            // Outcomes and feedback come from work on the referral: only once it is accepted.
            // That the patient declined may be said before (or instead of) accepting.
            if status == "requested" && kind != fhir::Feedback::Declined {
                return fail(Error::rule(
                    "Observation.basedOn[0]",
                    "the referral's Task is still requested: accept it before posting outcomes or feedback",
                ));
            }
            let subject = posted.pointer("/subject/reference").and_then(Value::as_str);
            let expected_subject = task.pointer("/for/reference").and_then(Value::as_str);
            if subject != expected_subject {
                return fail(Error::rule(
                    "Observation.subject",
                    format!(
                        "must be {{\"reference\": \"{}\"}}, the referral's patient",
                        expected_subject.unwrap_or_default()
                    ),
                ));
            }
            let performs = posted
                .get("performer")
                .and_then(Value::as_array)
                .is_some_and(|ps| {
                    ps.iter()
                        .any(|p| fhir::ref_id(p, "Organization") == Some(provider_id))
                });
            if !performs {
                return fail(Error::rule(
                    "Observation.performer",
                    format!(
                        "must include {{\"reference\": \"Organization/{provider_id}\"}}, this provider"
                    ),
                ));
            }
            let now = tx_now(tx)?;
            let mut obs = posted.clone();
            fhir::stamp(&mut obs, &obs_id, 1, &now.instant);
            self.tx_put_observation(tx, &obs, None, &sr_id, (Some(provider_id), fhir::parties_of(&task)), &now)?;
            crate::audit::tx_record(
                tx,
                &[format!("Observation/{obs_id}"), format!("ServiceRequest/{sr_id}")],
                &now,
            )?;
            Ok(obs)
        })?;
        self.store.durable().await?;
        Ok(obs)
    }
}
