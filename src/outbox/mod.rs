//! The outbox: outcomes on their way back to the referring practice, over its channel.
//!
//! Owns the durable queue (`o/q/{ODS}/{seq}`, written in the same transaction as the
//! change it carries), one delivery worker per practice with a channel (so a practice that
//! is down delays nobody else), per-referral order (a referral's later message waits for its
//! earlier one), exponential backoff with jitter and a retry ceiling, dead letters
//! (`o/dead/{seq}`) for permanent failures, delivery records (`o/done/{seq}`), and the
//! operator's view: list, retry, stop. The channels, one file each: [`fhir_push`] (each
//! Observation POSTed to the practice's FHIR endpoint), [`mesh`] (a letter per Task
//! event over MESH, with its acknowledgements) and, the other way, [`email`] (telling a
//! provider group that new referrals wait in its inbox). It must not log anything of what it carries:
//! only sequence numbers, practices, ids and status codes.

pub mod email;
mod fhir_push;
pub mod mesh;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fhir;
use crate::gateway::{Gateway, Now};
use crate::store::{Abort, Tx};

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("practices[{ods}].{section}.{key}: {path}: {message}")]
    File {
        ods: String,
        section: &'static str,
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("practices[{ods}].{section}: {message}")]
    Client {
        ods: String,
        section: &'static str,
        message: String,
    },
    #[error("{key}: {message}")]
    Config { key: String, message: String },
}

/// A queued, delivered or dead message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub seq: u64,
    pub practice: String,
    /// The Observation it carries (the FHIR channel); empty for a letter.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub observation: String,
    pub service_request: String,
    /// The letter it carries (the MESH channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub letter: Option<mesh::Letter>,
    pub attempts: u32,
    /// When the next attempt is planned (µs since the epoch, wall clock): shown to
    /// operators, never used for scheduling (the worker schedules on the monotonic clock).
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

/// Queues a new message for practice `ods` (an Observation or a letter), due at once, in
/// the caller's transaction; returns its sequence number.
fn tx_queue(
    tx: &Tx<'_>,
    ods: &str,
    sr_id: &str,
    observation: &str,
    letter: Option<mesh::Letter>,
    now: &Now,
) -> TxResult<u64> {
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
        observation: observation.to_string(),
        service_request: sr_id.to_string(),
        letter,
        attempts: 0,
        // Wall clock, for the operator's view: a new message is due at once.
        next_at: Now::current().micros,
        created_at: now.micros,
        last_error: None,
        delivered_at: None,
    };
    tx.put(
        format!("{}{seq:020}", queue_prefix(ods)).as_bytes(),
        &to_json(&m)?,
    )?;
    Ok(seq)
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
    tx_queue(tx, ods, sr_id, obs_id, None, now)?;
    Ok(())
}

/// What an operator sees.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub pending: Vec<Message>,
    pub dead_letters: Vec<Message>,
    pub delivered: usize,
    /// Each practice endpoint's state (a running gateway only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointView>,
    /// Each provider group's "new referrals" email (a running gateway only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub email: Vec<email::EmailView>,
}

fn messages(gw: &Gateway, prefix: &str) -> Result<Vec<Message>> {
    gw.store()
        .scan(prefix.as_bytes(), None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string())))
        .collect()
}

/// The referrals (ServiceRequest ids) with a message still to deliver: queued, or
/// dead-lettered (an operator may retry it). The archive leaves them in the hot store.
pub fn held_referrals(gw: &Gateway) -> Result<std::collections::HashSet<String>> {
    let mut held = std::collections::HashSet::new();
    for prefix in [QUEUE, DEAD] {
        for m in messages(gw, prefix)? {
            held.insert(m.service_request);
        }
    }
    Ok(held)
}

pub fn summary(gw: &Gateway) -> Result<Summary> {
    Ok(Summary {
        pending: messages(gw, QUEUE)?,
        dead_letters: messages(gw, DEAD)?,
        delivered: gw.store().count(DONE.as_bytes())?,
        endpoints: Vec::new(),
        email: Vec::new(),
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
        if m.observation.is_empty() {
            // A letter: nothing to mark; its dead letter is the record.
        } else {
            gw.tx_mark_delivery(tx, &m.observation, "failed")?;
        }
        Ok(m)
    })?;
    gw.store().durable().await?;
    Ok(m)
}

fn read(
    ods: &str,
    section: &'static str,
    key: &'static str,
    path: &std::path::Path,
) -> std::result::Result<Vec<u8>, OutboxError> {
    std::fs::read(path).map_err(|e| OutboxError::File {
        ods: ods.to_string(),
        section,
        key,
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

/// A secret from a file (a token, a password, a key), trimmed of surrounding whitespace.
fn read_secret(
    ods: &str,
    section: &'static str,
    key: &'static str,
    path: &std::path::Path,
) -> std::result::Result<String, OutboxError> {
    Ok(String::from_utf8_lossy(&read(ods, section, key, path)?)
        .trim()
        .to_string())
}

/// Where a remote peer is and how to trust it: the CA to verify it by and our client
/// certificate for mutual TLS.
struct Peer<'a> {
    ods: &'a str,
    section: &'static str,
    ca_file: Option<&'a std::path::Path>,
    client_cert: Option<&'a std::path::Path>,
    client_key: Option<&'a std::path::Path>,
}

/// An HTTP client for one practice's peer (its FHIR endpoint or MESH): TLS 1.2+ trusting
/// only the configured CA, with our client certificate when configured, and a deadline on
/// every request. Files are read now, so a bad one stops start-up with its name.
fn http_client(
    p: &Peer<'_>,
    timeout: Duration,
) -> std::result::Result<reqwest::Client, OutboxError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (ods, section) = (p.ods, p.section);
    let file_error =
        |key: &'static str, path: &std::path::Path, message: String| OutboxError::File {
            ods: ods.into(),
            section,
            key,
            path: path.display().to_string(),
            message,
        };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = p.ca_file {
        let pem = read(ods, section, "ca_file", ca)?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|err| file_error("ca_file", ca, format!("not PEM: {err}")))?;
            roots
                .add(c)
                .map_err(|err| file_error("ca_file", ca, err.to_string()))?;
        }
    }
    let client_error = |err: String| OutboxError::Client {
        ods: ods.into(),
        section,
        message: err,
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|err| client_error(err.to_string()))?
    .with_root_certificates(roots);
    let tls = match (p.client_cert, p.client_key) {
        (Some(c), Some(k)) => {
            let chain: Vec<_> =
                CertificateDer::pem_slice_iter(&read(ods, section, "client_cert", c)?)
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|err| file_error("client_cert", c, err.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(&read(ods, section, "client_key", k)?)
                .map_err(|err| file_error("client_key", k, err.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|err| client_error(err.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .build()
        .map_err(|err| client_error(err.to_string()))
}

/// How a practice gets its outcomes.
enum Channel {
    /// Observations POSTed to its FHIR endpoint.
    Fhir(fhir_push::Target),
    /// Letters over MESH (GP Connect Send Document).
    Mesh(mesh::Target),
}

/// Builds a client per practice with an endpoint (reading token, CA and key files now, so
/// that a bad file stops start-up with its name).
pub struct Outbox {
    targets: HashMap<String, Arc<Channel>>,
    health: Arc<Health>,
    mailer: Option<email::Mailer>,
}

impl Outbox {
    pub fn new(cfg: &Config) -> std::result::Result<Outbox, OutboxError> {
        let timeout = Duration::from_millis(cfg.outbox.request_timeout_ms);
        let mut targets = HashMap::new();
        for p in &cfg.practices {
            if let Some(e) = &p.endpoint {
                let t = fhir_push::Target::new(&p.ods, e, timeout)?;
                targets.insert(p.ods.clone(), Arc::new(Channel::Fhir(t)));
            }
            if let Some(m) = &p.mesh {
                let t = mesh::Target::new(&p.ods, m, timeout)?;
                targets.insert(p.ods.clone(), Arc::new(Channel::Mesh(t)));
            }
        }
        let health = Arc::new(Health::default());
        let mailer = match &cfg.inbox.email {
            Some(e) => Some(email::Mailer::new(e)?),
            None => None,
        };
        Ok(Outbox {
            targets,
            health,
            mailer,
        })
    }

    /// What the workers report (readiness, metrics, the operator's view).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Starts one delivery worker per practice (and an inbox reader per MESH mailbox) in
    /// `tasks`; they finish when `stop` fires (the server waits for them before it closes
    /// the store).
    pub fn start(
        self,
        gw: Arc<Gateway>,
        stop: tokio::sync::watch::Receiver<bool>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) {
        mesh::start_inbox_readers(&gw, &self.targets, &stop, tasks);
        if let Some(mailer) = self.mailer {
            email::start(&gw, mailer, &self.health, &stop, tasks);
        }
        for (ods, t) in self.targets {
            let (gw, mut stop, health) = (gw.clone(), stop.clone(), self.health.clone());
            health.register(&ods);
            tasks.spawn(async move {
                let poll = Duration::from_millis(gw.config().outbox.poll_ms.max(10));
                let mut worker = Worker::default();
                loop {
                    if let Err(e) = worker.pass(&gw, &ods, &t, &health).await {
                        tracing::error!(practice = %ods, error = %e, "outbox pass failed");
                    }
                    health.progress(&ods);
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
    }
}

/// How the delivery workers are doing, on the monotonic clock: readiness asks whether each
/// worker is making progress (the gateway's own health), and operators see each practice's
/// endpoint (failing or not, and why) in `/metrics` and `GET /admin/outbox`.
#[derive(Default)]
pub struct Health {
    practices: Mutex<BTreeMap<String, PracticeState>>,
    /// The provider groups' "new referrals" emails.
    pub email: email::EmailHealth,
}

struct PracticeState {
    /// When the worker last finished a pass or a batch of attempts.
    progress: Instant,
    consecutive_failures: u32,
    last_error: Option<String>,
    last_attempt: Option<String>,
    last_delivery: Option<String>,
}

/// One practice's endpoint as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub practice: String,
    /// The last attempt failed in a way that will be retried (down, timeout, 5xx).
    pub failing: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub last_attempt: Option<String>,
    pub last_delivery: Option<String>,
    /// Seconds since the worker last made progress.
    pub idle_secs: u64,
}

impl Health {
    fn with(&self, ods: &str, f: impl FnOnce(&mut PracticeState)) {
        if let Ok(mut m) = self.practices.lock() {
            if let Some(p) = m.get_mut(ods) {
                f(p);
            }
        }
    }

    fn register(&self, ods: &str) {
        if let Ok(mut m) = self.practices.lock() {
            m.insert(
                ods.to_string(),
                PracticeState {
                    progress: Instant::now(),
                    consecutive_failures: 0,
                    last_error: None,
                    last_attempt: None,
                    last_delivery: None,
                },
            );
        }
    }

    fn progress(&self, ods: &str) {
        self.with(ods, |p| p.progress = Instant::now());
    }

    fn attempted(&self, ods: &str, state: &State, note: Option<&str>) {
        let now = Now::current().instant;
        self.with(ods, |p| {
            p.last_attempt = Some(now.clone());
            match state {
                State::Delivered => {
                    p.consecutive_failures = 0;
                    p.last_error = None;
                    p.last_delivery = Some(now);
                }
                State::Retry => {
                    p.consecutive_failures += 1;
                    p.last_error = note.map(str::to_string);
                }
                // The endpoint answered (a refusal of this one message): it is up.
                State::Failed => {
                    p.consecutive_failures = 0;
                    p.last_error = note.map(str::to_string);
                }
            }
        });
    }

    /// A practice whose worker has made no progress for `limit`: the worker itself is stuck
    /// (a failing endpoint is not: every attempt ends within the request timeout).
    pub fn stalled(&self, limit: Duration) -> Option<String> {
        let m = self.practices.lock().ok()?;
        m.iter()
            .find(|(_, p)| p.progress.elapsed() > limit)
            .map(|(ods, _)| ods.clone())
    }

    pub fn endpoints(&self) -> Vec<EndpointView> {
        let Ok(m) = self.practices.lock() else {
            return Vec::new();
        };
        m.iter()
            .map(|(ods, p)| EndpointView {
                practice: ods.clone(),
                failing: p.consecutive_failures > 0,
                consecutive_failures: p.consecutive_failures,
                last_error: p.last_error.clone(),
                last_attempt: p.last_attempt.clone(),
                last_delivery: p.last_delivery.clone(),
                idle_secs: p.progress.elapsed().as_secs(),
            })
            .collect()
    }
}

/// How long a worker may go without progress before readiness fails: the configured
/// `stuck_after_secs` beyond the longest an attempt may take.
pub fn stall_limit(cfg: &crate::config::Outbox) -> Duration {
    Duration::from_secs(cfg.stuck_after_secs) + Duration::from_millis(cfg.request_timeout_ms)
}

enum Outcome {
    Delivered,
    /// A letter MESH accepted, with the message id it gave.
    Sent(String),
    Retry(String),
    Permanent(String),
}

/// What an attempt did to its message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Delivered,
    Retry,
    Failed,
}

/// Backoff for the `attempts`-th retry: base·2^attempts, capped, times a jitter in
/// [0.5, 1.5).
fn backoff(cfg: &crate::config::Outbox, attempts: u32) -> Duration {
    let exp = cfg
        .base_delay_ms
        .saturating_mul(1u64 << attempts.min(30))
        .min(cfg.max_delay_ms);
    let jitter = 0.5 + f64::from(uuid::Uuid::new_v4().as_bytes()[0]) / 256.0;
    Duration::from_micros((exp as f64 * jitter * 1000.0) as u64)
}

/// One practice's delivery schedule. It lives in memory and runs on the monotonic clock:
/// neither the stored commit clock nor a wall clock that steps back can hold a message
/// back. After a restart every queued message is due at once; its stored attempt count
/// keeps its backoff growing. (`Message::next_at` is the wall-clock time shown to
/// operators, never read for scheduling.)
#[derive(Default)]
struct Worker {
    /// When each message that failed may be tried again.
    due: HashMap<u64, Instant>,
    /// The endpoint failed a whole batch: the practice waits until then.
    paused_until: Option<Instant>,
    failed_batches: u32,
}

impl Worker {
    /// One pass over a practice's queue: each referral's first message, if due, is tried,
    /// up to `outbox.concurrency` at once. A referral with a dead letter waits for the
    /// operator (delivering its later messages first would break its order). A batch in
    /// which the endpoint failed every attempt pauses the practice with backoff, so a
    /// down endpoint sees a trickle of attempts, not a storm.
    async fn pass(
        &mut self,
        gw: &Arc<Gateway>,
        ods: &str,
        t: &Arc<Channel>,
        health: &Health,
    ) -> Result<()> {
        if self.paused_until.is_some_and(|p| p > Instant::now()) {
            return Ok(());
        }
        let queued = messages(gw, &queue_prefix(ods))?;
        let live: HashSet<u64> = queued.iter().map(|m| m.seq).collect();
        self.due.retain(|seq, _| live.contains(seq));
        let mut blocked: HashSet<String> = messages(gw, DEAD)?
            .into_iter()
            .filter(|d| d.practice == ods)
            .map(|d| d.service_request)
            .collect();
        let now = Instant::now();
        let heads: Vec<Message> = queued
            .into_iter()
            .filter(|m| blocked.insert(m.service_request.clone()))
            .filter(|m| self.due.get(&m.seq).is_none_or(|d| *d <= now))
            .collect();
        let cfg = gw.config().outbox.clone();
        for batch in heads.chunks(cfg.concurrency.max(1)) {
            let mut running = tokio::task::JoinSet::new();
            for m in batch {
                let (gw, t, m) = (gw.clone(), t.clone(), m.clone());
                running.spawn(async move { (m.seq, attempt(&gw, &t, &m).await) });
            }
            let (mut delivered, mut failed) = (false, false);
            while let Some(joined) = running.join_next().await {
                let (seq, result) = match joined {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(practice = %ods, error = %e, "outbox attempt panicked");
                        continue;
                    }
                };
                match result {
                    Ok(Some((state, note, attempts))) => {
                        health.attempted(ods, &state, note.as_deref());
                        match state {
                            State::Retry => {
                                failed = true;
                                self.due
                                    .insert(seq, Instant::now() + backoff(&cfg, attempts - 1));
                            }
                            State::Delivered => {
                                delivered = true;
                                self.due.remove(&seq);
                            }
                            State::Failed => {
                                self.due.remove(&seq);
                            }
                        }
                    }
                    // An operator's decision overtook the attempt.
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(practice = %ods, seq, error = %e, "outbox attempt not recorded");
                        failed = true;
                    }
                }
            }
            health.progress(ods);
            if failed {
                if !delivered {
                    self.failed_batches += 1;
                    self.paused_until =
                        Some(Instant::now() + backoff(&cfg, self.failed_batches - 1));
                }
                // The endpoint is failing: leave the rest of this pass to a later one.
                break;
            }
            self.failed_batches = 0;
        }
        Ok(())
    }
}

/// Sends one message and records the result (delivered, retry, dead letter) in one
/// transaction, with the Observation's delivery state. `None` when an operator stopped or
/// retried the message while it was being sent: their decision stands.
async fn attempt(
    gw: &Gateway,
    t: &Channel,
    m: &Message,
) -> Result<Option<(State, Option<String>, u32)>> {
    let (m, outcome) = match t {
        Channel::Fhir(t) => (m.clone(), fhir_push::send(gw, t, m).await?),
        Channel::Mesh(t) => match mesh::send(gw, t, m).await? {
            Some(sent) => sent,
            // An operator's decision overtook the attempt.
            None => return Ok(None),
        },
    };
    let m = &m;
    let key = format!("{}{:020}", queue_prefix(&m.practice), m.seq);
    let cfg = gw.config().outbox.clone();
    let attempts = m.attempts + 1;
    let (state, note) = match &outcome {
        Outcome::Delivered | Outcome::Sent(_) => (State::Delivered, None),
        Outcome::Retry(e) if attempts >= cfg.max_attempts => (
            State::Failed,
            Some(format!("{e}; gave up after {attempts} attempts")),
        ),
        Outcome::Retry(e) => (State::Retry, Some(e.clone())),
        Outcome::Permanent(e) => (State::Failed, Some(e.clone())),
    };
    let applied = gw.commit(|tx| {
        let still: Option<Message> = tx
            .get(key.as_bytes())?
            .and_then(|b| serde_json::from_slice(&b).ok());
        if still.as_ref() != Some(m) {
            return Ok(false);
        }
        let mut next = m.clone();
        next.attempts = attempts;
        next.last_error = note.clone();
        if let (Some(l), Outcome::Sent(id)) = (next.letter.as_mut(), &outcome) {
            l.message_id = Some(id.clone());
            l.in_doubt = false;
        }
        tx.remove(key.as_bytes())?;
        let wall = Now::current().micros;
        match state {
            State::Delivered => {
                next.delivered_at = Some(wall);
                tx.put(format!("{DONE}{:020}", m.seq).as_bytes(), &to_json(&next)?)?;
            }
            State::Retry => {
                // For the operator's view only; the worker schedules on the monotonic clock.
                next.next_at = wall + backoff(&cfg, m.attempts).as_micros() as i64;
                tx.put(key.as_bytes(), &to_json(&next)?)?;
            }
            State::Failed => tx.put(format!("{DEAD}{:020}", m.seq).as_bytes(), &to_json(&next)?)?,
        }
        // The Observation says how its delivery went, in the same transaction; a letter's
        // sending is on its Task's trail.
        match (state, next.letter.as_ref()) {
            (State::Retry, _) => {}
            (_, Some(l)) => mesh::tx_record_sending(tx, &next, l, state == State::Delivered)?,
            (State::Delivered, None) => gw.tx_mark_delivery(tx, &m.observation, "delivered")?,
            (State::Failed, None) => gw.tx_mark_delivery(tx, &m.observation, "failed")?,
        }
        Ok(true)
    })?;
    gw.store().durable().await?;
    if !applied {
        return Ok(None);
    }
    let (ods, seq, error) = (&m.practice, m.seq, note.as_deref().unwrap_or(""));
    match state {
        State::Retry => {
            tracing::warn!(practice = %ods, seq, attempt = attempts, error, "outbox delivery failed; will retry")
        }
        State::Failed => {
            tracing::error!(practice = %ods, seq, error, "outbox message dead-lettered")
        }
        State::Delivered => {}
    }
    Ok(Some((state, note, attempts)))
}

/// Prometheus text for the outbox: totals, and each practice endpoint's state (whether it
/// is failing, for how many attempts in a row, and its queue) so that an operator sees which
/// GP endpoint is down without the gateway being taken out of service for it.
pub fn metrics(gw: &Gateway, health: &Health) -> Result<String> {
    let count = |p: &str| gw.store().count(p.as_bytes());
    let (pending, dead, delivered) = (count(QUEUE)?, count(DEAD)?, count(DONE)?);
    let mut out = format!(
        "# HELP sp_gateway_outbox_pending Observations waiting to be delivered to GP systems.\n\
         # TYPE sp_gateway_outbox_pending gauge\nsp_gateway_outbox_pending {}\n\
         # HELP sp_gateway_outbox_dead_letters Observations whose delivery failed for good.\n\
         # TYPE sp_gateway_outbox_dead_letters gauge\nsp_gateway_outbox_dead_letters {}\n\
         # HELP sp_gateway_outbox_delivered Observations delivered to GP systems.\n\
         # TYPE sp_gateway_outbox_delivered counter\nsp_gateway_outbox_delivered {}\n",
        pending, dead, delivered
    );
    let endpoints = health.endpoints();
    if !endpoints.is_empty() {
        out.push_str(
            "# HELP sp_gateway_outbox_endpoint_failing 1 while a practice's endpoint fails (down, timeout, 5xx).\n\
             # TYPE sp_gateway_outbox_endpoint_failing gauge\n",
        );
        for e in &endpoints {
            out.push_str(&format!(
                "sp_gateway_outbox_endpoint_failing{{practice=\"{}\"}} {}\n",
                e.practice,
                u8::from(e.failing)
            ));
        }
        out.push_str(
            "# HELP sp_gateway_outbox_endpoint_consecutive_failures Failed attempts in a row to a practice's endpoint.\n\
             # TYPE sp_gateway_outbox_endpoint_consecutive_failures gauge\n",
        );
        for e in &endpoints {
            out.push_str(&format!(
                "sp_gateway_outbox_endpoint_consecutive_failures{{practice=\"{}\"}} {}\n",
                e.practice, e.consecutive_failures
            ));
        }
        out.push_str(
            "# HELP sp_gateway_outbox_practice_pending Observations waiting for a practice's endpoint.\n\
             # TYPE sp_gateway_outbox_practice_pending gauge\n",
        );
        for e in &endpoints {
            let n = count(&queue_prefix(&e.practice))?;
            out.push_str(&format!(
                "sp_gateway_outbox_practice_pending{{practice=\"{}\"}} {n}\n",
                e.practice
            ));
        }
    }
    Ok(out)
}

/// Tests and `$validate` of the delivery extension's shape.
pub fn delivery_extension(state: &str) -> Value {
    json!({ "url": delivery_extension_url(), "valueCode": state })
}
