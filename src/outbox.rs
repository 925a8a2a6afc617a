//! The outbox: Observations pushed back to the referring practice's FHIR endpoint.
//!
//! Owns the durable queue (`o/q/{ODS}/{seq}`, written in the same transaction as the
//! Observation it carries), one delivery worker per practice with an endpoint (so a practice
//! that is down delays nobody else), per-referral order (a referral's later message waits for
//! its earlier one), exponential backoff with jitter and a retry ceiling, dead letters
//! (`o/dead/{seq}`) for permanent failures, delivery records (`o/done/{seq}`), and the
//! operator's view: list, retry, stop.
//!
//! Each delivery is `POST {base}/Observation` with an identifier
//! (`{CANONICAL}/Id/observation|{id}`), `If-None-Exist` on it and an `X-Idempotency-Key`, so
//! a receiver can de-duplicate the redelivery that follows a crash mid-request. It must not
//! log anything of the Observation: only sequence numbers, practices and status codes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::config::{Config, Endpoint};
use crate::error::{Error, Result};
use crate::fhir;
use crate::gateway::{Gateway, Now};
use crate::store::{Abort, Tx};

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("practices[{ods}].endpoint.{key}: {path}: {message}")]
    File {
        ods: String,
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("practices[{ods}].endpoint: {0}", ods = .0)]
    Client(String),
}

/// A queued, delivered or dead message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub seq: u64,
    pub practice: String,
    pub observation: String,
    pub service_request: String,
    pub attempts: u32,
    /// When the next attempt is due (µs since the epoch).
    pub next_at: i64,
    pub created_at: i64,
    /// The last failure: an HTTP status or an error kind, never content.
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub delivered_at: Option<i64>,
}

pub fn queue_prefix(ods: &str) -> String {
    format!("o/q/{ods}/")
}
const QUEUE: &str = "o/q/";
const DEAD: &str = "o/dead/";
const DONE: &str = "o/done/";
const SEQ: &str = "c/outbox-seq";

pub fn delivery_extension_url() -> String {
    format!("{}/StructureDefinition/delivery-status", fhir::CANONICAL)
}

pub fn observation_identifier_system() -> String {
    format!("{}/Id/observation", fhir::CANONICAL)
}

type TxResult<T> = std::result::Result<T, Abort<Error>>;

fn to_json(m: &Message) -> TxResult<Vec<u8>> {
    serde_json::to_vec(m).map_err(|e| Abort::Caller(Error::Internal(e.to_string())))
}

/// Queues `obs` for its practice, in the caller's transaction, if the practice has an
/// endpoint; otherwise the GP system pulls and nothing is queued.
pub(crate) fn tx_enqueue(
    tx: &Tx<'_>,
    cfg: &Config,
    practice: Option<&str>,
    obs_id: &str,
    sr_id: &str,
    now: &Now,
) -> TxResult<()> {
    let Some(ods) = practice.filter(|p| cfg.practice(p).is_some_and(|p| p.endpoint.is_some()))
    else {
        return Ok(());
    };
    let seq = tx
        .get(SEQ.as_bytes())?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    tx.put(SEQ.as_bytes(), seq.to_string().as_bytes())?;
    let m = Message {
        seq,
        practice: ods.to_string(),
        observation: obs_id.to_string(),
        service_request: sr_id.to_string(),
        attempts: 0,
        next_at: now.micros,
        created_at: now.micros,
        last_error: None,
        delivered_at: None,
    };
    tx.put(
        format!("{}{seq:020}", queue_prefix(ods)).as_bytes(),
        &to_json(&m)?,
    )?;
    Ok(())
}

/// What an operator sees.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub pending: Vec<Message>,
    pub dead_letters: Vec<Message>,
    pub delivered: usize,
}

fn messages(gw: &Gateway, prefix: &str) -> Result<Vec<Message>> {
    gw.store()
        .scan(prefix.as_bytes(), None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string())))
        .collect()
}

pub fn summary(gw: &Gateway) -> Result<Summary> {
    Ok(Summary {
        pending: messages(gw, QUEUE)?,
        dead_letters: messages(gw, DEAD)?,
        delivered: gw.store().count(DONE.as_bytes())?,
    })
}

/// Moves a dead letter back to its practice's queue, due now, attempts reset.
pub async fn retry(gw: &Gateway, seq: u64) -> Result<Message> {
    let dead_key = format!("{DEAD}{seq:020}");
    let m = gw.commit(|tx| {
        let Some(b) = tx.get(dead_key.as_bytes())? else {
            return Err(Abort::Caller(Error::not_found(format!(
                "dead letter {seq}"
            ))));
        };
        let mut m: Message = serde_json::from_slice(&b)
            .map_err(|e| Abort::Caller(Error::Internal(e.to_string())))?;
        m.attempts = 0;
        m.next_at = Now::current().micros;
        m.last_error = None;
        tx.remove(dead_key.as_bytes())?;
        tx.put(
            format!("{}{seq:020}", queue_prefix(&m.practice)).as_bytes(),
            &to_json(&m)?,
        )?;
        Ok(m)
    })?;
    gw.store().durable().await?;
    Ok(m)
}

/// Stops retrying a pending message: it becomes a dead letter.
pub async fn stop(gw: &Gateway, seq: u64) -> Result<Message> {
    let pending = messages(gw, QUEUE)?;
    let Some(found) = pending.into_iter().find(|m| m.seq == seq) else {
        return Err(Error::not_found(format!("pending message {seq}")));
    };
    let key = format!("{}{seq:020}", queue_prefix(&found.practice));
    let m = gw.commit(|tx| {
        let Some(b) = tx.get(key.as_bytes())? else {
            return Err(Abort::Caller(Error::not_found(format!(
                "pending message {seq}"
            ))));
        };
        let mut m: Message = serde_json::from_slice(&b)
            .map_err(|e| Abort::Caller(Error::Internal(e.to_string())))?;
        m.last_error = Some("stopped by an operator".into());
        tx.remove(key.as_bytes())?;
        tx.put(format!("{DEAD}{seq:020}").as_bytes(), &to_json(&m)?)?;
        gw.tx_mark_delivery(tx, &m.observation, "failed")?;
        Ok(m)
    })?;
    gw.store().durable().await?;
    Ok(m)
}

/// Whether the outbox workers are making progress: no message has been due for longer than
/// `stuck_after_secs` without an attempt. Messages of practices no longer configured are
/// not counted (nobody will deliver them; an operator sees them in the list).
pub fn stuck(gw: &Gateway) -> Result<Option<u64>> {
    let limit = gw.config().outbox.stuck_after_secs as i64 * 1_000_000;
    let now = Now::current().micros;
    let cfg = gw.config();
    Ok(messages(gw, QUEUE)?
        .into_iter()
        .filter(|m| {
            cfg.practice(&m.practice)
                .is_some_and(|p| p.endpoint.is_some())
        })
        .find(|m| now - m.next_at > limit)
        .map(|m| m.seq))
}

/// An HTTP client and credentials for one practice's endpoint.
struct Target {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

fn read(
    ods: &str,
    key: &'static str,
    path: &std::path::Path,
) -> std::result::Result<Vec<u8>, OutboxError> {
    std::fs::read(path).map_err(|e| OutboxError::File {
        ods: ods.to_string(),
        key,
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

fn target(ods: &str, e: &Endpoint, timeout: Duration) -> std::result::Result<Target, OutboxError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let token = match &e.token_file {
        Some(p) => Some(
            String::from_utf8_lossy(&read(ods, "token_file", p)?)
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &e.ca_file {
        let pem = read(ods, "ca_file", ca)?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|err| OutboxError::File {
                ods: ods.into(),
                key: "ca_file",
                path: ca.display().to_string(),
                message: format!("not PEM: {err}"),
            })?;
            roots.add(c).map_err(|err| OutboxError::File {
                ods: ods.into(),
                key: "ca_file",
                path: ca.display().to_string(),
                message: err.to_string(),
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|err| OutboxError::Client(err.to_string()))?
    .with_root_certificates(roots);
    let tls = match (&e.client_cert, &e.client_key) {
        (Some(c), Some(k)) => {
            let chain: Vec<_> = CertificateDer::pem_slice_iter(&read(ods, "client_cert", c)?)
                .collect::<std::result::Result<_, _>>()
                .map_err(|err| OutboxError::File {
                    ods: ods.into(),
                    key: "client_cert",
                    path: c.display().to_string(),
                    message: err.to_string(),
                })?;
            let key =
                PrivateKeyDer::from_pem_slice(&read(ods, "client_key", k)?).map_err(|err| {
                    OutboxError::File {
                        ods: ods.into(),
                        key: "client_key",
                        path: k.display().to_string(),
                        message: err.to_string(),
                    }
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|err| OutboxError::Client(err.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .build()
        .map_err(|err| OutboxError::Client(err.to_string()))?;
    Ok(Target {
        base: e.base_url.trim_end_matches('/').to_string(),
        token,
        http,
    })
}

/// Builds a client per practice with an endpoint (reading token, CA and key files now, so
/// that a bad file stops start-up with its name).
pub struct Outbox {
    targets: HashMap<String, Arc<Target>>,
}

impl Outbox {
    pub fn new(cfg: &Config) -> std::result::Result<Outbox, OutboxError> {
        let timeout = Duration::from_millis(cfg.outbox.request_timeout_ms);
        let mut targets = HashMap::new();
        for p in &cfg.practices {
            if let Some(e) = &p.endpoint {
                targets.insert(p.ods.clone(), Arc::new(target(&p.ods, e, timeout)?));
            }
        }
        Ok(Outbox { targets })
    }

    /// Starts one delivery worker per practice; they stop when `stop` fires.
    pub fn start(self, gw: Arc<Gateway>, stop: tokio::sync::watch::Receiver<bool>) {
        for (ods, t) in self.targets {
            let (gw, mut stop) = (gw.clone(), stop.clone());
            tokio::spawn(async move {
                let poll = Duration::from_millis(gw.config().outbox.poll_ms.max(10));
                loop {
                    if let Err(e) = deliver_due(&gw, &ods, &t).await {
                        tracing::error!(practice = %ods, error = %e, "outbox pass failed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
    }
}

enum Outcome {
    Delivered,
    Retry(String),
    Permanent(String),
}

async fn send(gw: &Gateway, t: &Target, m: &Message) -> Result<Outcome> {
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

/// Backoff for the `attempts`-th retry: base·2^attempts, capped, times a jitter in
/// [0.5, 1.5).
fn backoff(cfg: &crate::config::Outbox, attempts: u32) -> i64 {
    let exp = cfg
        .base_delay_ms
        .saturating_mul(1u64 << attempts.min(30))
        .min(cfg.max_delay_ms);
    let jitter = 0.5 + f64::from(uuid::Uuid::new_v4().as_bytes()[0]) / 256.0;
    (exp as f64 * jitter * 1000.0) as i64
}

/// One pass over a practice's queue: every referral's first message that is due is tried.
async fn deliver_due(gw: &Gateway, ods: &str, t: &Target) -> Result<()> {
    let prefix = queue_prefix(ods);
    let queued = messages(gw, &prefix)?;
    // A referral with a dead letter waits for the operator: delivering its later messages
    // first would break its order.
    let mut blocked: HashSet<String> = messages(gw, DEAD)?
        .into_iter()
        .filter(|d| d.practice == ods)
        .map(|d| d.service_request)
        .collect();
    for m in queued {
        if !blocked.insert(m.service_request.clone()) {
            continue; // an earlier message of this referral is still queued
        }
        if m.next_at > Now::current().micros {
            continue;
        }
        let outcome = send(gw, t, &m).await?;
        let key = format!("{prefix}{:020}", m.seq);
        let cfg = gw.config().outbox.clone();
        let (state, note) = match &outcome {
            Outcome::Delivered => ("delivered", None),
            Outcome::Retry(e) if m.attempts + 1 >= cfg.max_attempts => (
                "failed",
                Some(format!("{e}; gave up after {} attempts", m.attempts + 1)),
            ),
            Outcome::Retry(e) => ("retry", Some(e.clone())),
            Outcome::Permanent(e) => ("failed", Some(e.clone())),
        };
        let applied = gw.commit(|tx| {
            // An operator may have stopped (or retried) this message while it was being sent:
            // then their decision stands and this attempt's result is dropped.
            let still: Option<Message> = tx
                .get(key.as_bytes())?
                .and_then(|b| serde_json::from_slice(&b).ok());
            if still.as_ref() != Some(&m) {
                return Ok(false);
            }
            let mut next = m.clone();
            next.attempts += 1;
            next.last_error = note.clone();
            tx.remove(key.as_bytes())?;
            match state {
                "delivered" => {
                    next.delivered_at = Some(Now::current().micros);
                    tx.put(format!("{DONE}{:020}", m.seq).as_bytes(), &to_json(&next)?)?;
                }
                "retry" => {
                    next.next_at = Now::current().micros + backoff(&cfg, m.attempts);
                    tx.put(key.as_bytes(), &to_json(&next)?)?;
                }
                _ => tx.put(format!("{DEAD}{:020}", m.seq).as_bytes(), &to_json(&next)?)?,
            }
            // The Observation says how its delivery went, in the same transaction.
            if state != "retry" {
                gw.tx_mark_delivery(tx, &m.observation, state)?;
            }
            Ok(true)
        })?;
        gw.store().durable().await?;
        if !applied {
            continue;
        }
        match state {
            "retry" => {
                tracing::warn!(practice = %ods, seq = m.seq, attempt = m.attempts + 1, error = note.as_deref().unwrap_or(""), "outbox delivery failed; will retry")
            }
            "failed" => {
                tracing::error!(practice = %ods, seq = m.seq, error = note.as_deref().unwrap_or(""), "outbox message dead-lettered")
            }
            _ => {}
        }
        if state == "retry" {
            // The endpoint is failing: leave the rest of this pass to the next one.
            break;
        }
    }
    Ok(())
}

/// Prometheus text for the outbox.
pub fn metrics(gw: &Gateway) -> Result<String> {
    let count = |p: &str| gw.store().count(p.as_bytes());
    let (pending, dead, delivered) = (count(QUEUE)?, count(DEAD)?, count(DONE)?);
    Ok(format!(
        "# HELP sp_gateway_outbox_pending Observations waiting to be delivered to GP systems.\n\
         # TYPE sp_gateway_outbox_pending gauge\nsp_gateway_outbox_pending {}\n\
         # HELP sp_gateway_outbox_dead_letters Observations whose delivery failed for good.\n\
         # TYPE sp_gateway_outbox_dead_letters gauge\nsp_gateway_outbox_dead_letters {}\n\
         # HELP sp_gateway_outbox_delivered Observations delivered to GP systems.\n\
         # TYPE sp_gateway_outbox_delivered counter\nsp_gateway_outbox_delivered {}\n",
        pending, dead, delivered
    ))
}

/// Tests and `$validate` of the delivery extension's shape.
pub fn delivery_extension(state: &str) -> Value {
    json!({ "url": delivery_extension_url(), "valueCode": state })
}
