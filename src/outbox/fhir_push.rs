//! The FHIR channel: each Observation POSTed to the practice's FHIR endpoint.
//!
//! Each delivery is `POST {base}/Observation` with an identifier
//! (`{CANONICAL}/Id/observation|{id}`), `If-None-Exist` on it and an `X-Idempotency-Key`, so
//! a receiver can de-duplicate the redelivery that follows a crash mid-request. It must not
//! log anything of the Observation.

use std::time::Duration;

use serde_json::{json, Value};

use super::{
    delivery_extension_url, http_client, observation_identifier_system, read_secret, Message,
    OutboxError, Outcome, Peer,
};
use crate::config::Endpoint;
use crate::error::Result;
use crate::gateway::Gateway;

/// An HTTP client and credentials for one practice's endpoint.
pub(super) struct Target {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Target {
    pub(super) fn new(
        ods: &str,
        e: &Endpoint,
        timeout: Duration,
    ) -> std::result::Result<Target, OutboxError> {
        let token = match &e.token_file {
            Some(p) => Some(read_secret(ods, "endpoint", "token_file", p)?),
            None => None,
        };
        let peer = Peer {
            ods,
            section: "endpoint",
            ca_file: e.ca_file.as_deref(),
            client_cert: e.client_cert.as_deref(),
            client_key: e.client_key.as_deref(),
        };
        Ok(Target {
            base: e.base_url.trim_end_matches('/').to_string(),
            token,
            http: http_client(&peer, timeout)?,
        })
    }
}

pub(super) async fn send(gw: &Gateway, t: &Target, m: &Message) -> Result<Outcome> {
    let Some(mut obs) = gw.load("Observation", &m.observation)? else {
        return Ok(Outcome::Permanent("the Observation is missing".into()));
    };
    // What the receiver needs to de-duplicate a redelivery.
    let ident = json!({ "system": observation_identifier_system(), "value": m.observation });
    if let Some(o) = obs.as_object_mut() {
        o.remove("meta");
        o.insert("identifier".into(), json!([ident]));
        // The gateway's own delivery bookkeeping is not the GP's business.
        let own = delivery_extension_url();
        if let Some(Value::Array(exts)) = o.get_mut("extension") {
            exts.retain(|e| e.get("url").and_then(Value::as_str) != Some(own.as_str()));
        }
        if o.get("extension")
            .and_then(Value::as_array)
            .is_some_and(|e| e.is_empty())
        {
            o.remove("extension");
        }
    }
    let mut req = t
        .http
        .post(format!("{}/Observation", t.base))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .header(
            "if-none-exist",
            format!(
                "identifier={}|{}",
                observation_identifier_system(),
                m.observation
            ),
        )
        .header("x-idempotency-key", &m.observation)
        .body(obs.to_string());
    if let Some(tok) = &t.token {
        req = req.bearer_auth(tok);
    }
    Ok(match req.send().await {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) if matches!(r.status().as_u16(), 408 | 429) || r.status().is_server_error() => {
            Outcome::Retry(format!("HTTP {}", r.status().as_u16()))
        }
        Ok(r) => Outcome::Permanent(format!("HTTP {}", r.status().as_u16())),
        Err(e) if e.is_timeout() => Outcome::Retry("timeout".into()),
        Err(e) if e.is_connect() => Outcome::Retry("connection refused or failed".into()),
        Err(_) => Outcome::Retry("request failed".into()),
    })
}
