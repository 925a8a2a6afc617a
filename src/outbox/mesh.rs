//! The MESH channel: an outcome letter per Task event, to the practice's MESH mailbox as GP
//! Connect Send Document, and the ITK3 acknowledgements that come back.
//!
//! A letter is queued in the transaction of the Task change that triggers it (the events
//! the practice's config names), and goes the outbox's way: per-referral order, retries with
//! backoff, dead letters. No duplicates across crashes: each letter has its own local id
//! (MESH `mex-localid`, and the ITK MessageHeader id); before a send whose outcome is not
//! known (the gateway stopped, or the request timed out, after it started) MESH's tracking
//! is asked whether that local id was already accepted. One inbox reader per mailbox of ours
//! downloads acknowledgements (`GPFED_CONSULT_REPORT_ACK`) and MESH's reports, matches each to
//! the letter it answers, records it on the outbox entry and the Task's trail, dead-letters a
//! negative one with its reason, and acknowledges the inbox message. It logs ids, codes and
//! statuses only.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    http_client, queue_prefix, read_secret, to_json, tx_queue, Channel, Message, OutboxError,
    Outcome, Peer, TxResult, DEAD, DONE,
};
use crate::audit::SystemActivity;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::gateway::{Gateway, Now};
use crate::letter::{itk, pdf, Facts};
use crate::mesh::{Incoming, Mailbox, MeshError, Outgoing};
use crate::store::{Abort, Tx};

/// The workflow acknowledgements come back on.
pub const ACK_WORKFLOW: &str = "GPFED_CONSULT_REPORT_ACK";

/// A letter in the outbox: the Task version it reports, and what MESH and the practice said.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Letter {
    pub task: String,
    pub version: u64,
    pub status: String,
    /// Our id for it: MESH local id, ITK MessageHeader and Bundle id, SenderReference.
    pub local_id: String,
    /// MESH's id for it, once MESH accepted it.
    #[serde(default)]
    pub message_id: Option<String>,
    /// A send started whose outcome is unknown: ask tracking before sending again.
    #[serde(default)]
    pub in_doubt: bool,
    /// The acknowledgements received, oldest first.
    #[serde(default)]
    pub acks: Vec<AckRecord>,
}

/// One acknowledgement, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AckRecord {
    pub kind: String,
    pub positive: bool,
    /// ITK response code and display (e.g. `20013 Success`), or MESH's report.
    pub code: String,
    pub at: String,
}

/// Where a letter's local id leads: `{practice}/{outbox sequence number}`.
fn local_id_key(local_id: &str) -> String {
    format!("o/mesh/{local_id}")
}

/// Queues a letter for the Task version just written, in its transaction, if its practice
/// takes letters over MESH for this status.
pub(crate) fn tx_enqueue_letter(
    tx: &Tx<'_>,
    cfg: &Config,
    practice: Option<&str>,
    task: &Value,
    sr_id: &str,
    now: &Now,
) -> TxResult<()> {
    let status = task
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(ods) = practice.filter(|p| {
        cfg.practice(p)
            .and_then(|p| p.mesh.as_ref())
            .is_some_and(|m| m.sends_on(status))
    }) else {
        return Ok(());
    };
    let local_id = uuid::Uuid::new_v4().to_string();
    let letter = Letter {
        task: task
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        version: crate::fhir::version_of(task),
        status: status.to_string(),
        local_id: local_id.clone(),
        message_id: None,
        in_doubt: false,
        acks: Vec::new(),
    };
    let seq = tx_queue(tx, ods, sr_id, "", Some(letter), now)?;
    tx.put(
        local_id_key(&local_id).as_bytes(),
        format!("{ods}/{seq}").as_bytes(),
    )?;
    Ok(())
}

/// A practice's MESH route: our mailbox, and where its letters go.
pub(super) struct Target {
    mailbox: Arc<Mailbox>,
    /// The practice's mailbox, or `None` for MESH's automatic routing by the patient.
    to: Option<String>,
    workflow_id: String,
    sender_ods: String,
    sender_name: String,
    structured: bool,
    inbox_poll: Duration,
}

impl Target {
    pub(super) fn new(
        ods: &str,
        m: &crate::config::Mesh,
        timeout: Duration,
    ) -> std::result::Result<Target, OutboxError> {
        let peer = Peer {
            ods,
            section: "mesh",
            ca_file: m.ca_file.as_deref(),
            client_cert: m.client_cert.as_deref(),
            client_key: m.client_key.as_deref(),
        };
        let mailbox = Mailbox {
            base_url: m.base_url.clone(),
            mailbox: m.mailbox.clone(),
            password: match (&m.password, &m.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => read_secret(ods, "mesh", "password_file", f)?,
                (None, None) => String::new(),
            },
            shared_key: match (&m.shared_key, &m.shared_key_file) {
                (Some(k), _) => k.clone(),
                (None, Some(f)) => read_secret(ods, "mesh", "shared_key_file", f)?,
                (None, None) => String::new(),
            },
            chunk_bytes: m.chunk_bytes,
            http: http_client(&peer, timeout)?,
        };
        Ok(Target {
            mailbox: Arc::new(mailbox),
            to: m.to_mailbox.clone(),
            workflow_id: m.workflow_id.clone(),
            sender_ods: m.sender_ods.clone(),
            sender_name: m.sender_name.clone(),
            structured: m.structured_outcomes,
            inbox_poll: Duration::from_millis(m.inbox_poll_ms),
        })
    }
}

fn outcome_of(e: &MeshError) -> Outcome {
    match e {
        MeshError::Unavailable(why) => Outcome::Retry(why.clone()),
        MeshError::Protocol(_) => Outcome::Retry("unexpected answer from MESH".into()),
        MeshError::Unauthorised(s) => Outcome::Permanent(format!(
            "MESH refused our mailbox's credentials (HTTP {s}): check mailbox, password, \
             shared key and client certificate, then retry the dead letters"
        )),
        refused @ MeshError::Refused { .. } => Outcome::Permanent(refused.to_string()),
    }
}

/// Sends one letter. Returns the message as stored when the outcome is decided (it may have
/// been marked in doubt first) and the outcome; `None` when an operator's decision overtook
/// it.
pub(super) async fn send(
    gw: &Gateway,
    t: &Target,
    m: &Message,
) -> Result<Option<(Message, Outcome)>> {
    let Some(letter) = m.letter.as_ref() else {
        return Ok(Some((m.clone(), Outcome::Permanent("not a letter".into()))));
    };
    if letter.in_doubt {
        // The last send may have reached MESH: ask before sending again.
        match t.mailbox.find_sent(&letter.local_id).await {
            Ok(Some(id)) => {
                tracing::info!(practice = %m.practice, seq = m.seq, "letter found in MESH tracking; not sent again");
                return Ok(Some((m.clone(), Outcome::Sent(id))));
            }
            Ok(None) => {}
            Err(e) => return Ok(Some((m.clone(), outcome_of(&e)))),
        }
    }
    let Some(src) = gw.letter_sources(&letter.task, letter.version)? else {
        return Ok(Some((
            m.clone(),
            Outcome::Permanent("the referral's records are missing".into()),
        )));
    };
    let facts = Facts::gather(
        gw.config(),
        &src.task,
        &src.history,
        &src.patient,
        &src.service_request,
        &src.observations,
    );
    let document = pdf::render(&facts, &t.sender_name);
    let now = Now::current();
    let bundle = itk::message(
        &facts,
        &document,
        &itk::Envelope {
            local_id: &letter.local_id,
            timestamp: &now.instant,
            mailbox: &t.mailbox.mailbox,
            sender_ods: &t.sender_ods,
            sender_name: &t.sender_name,
            structured: t.structured,
        },
    );
    let body = serde_json::to_vec(&bundle).map_err(|e| Error::Internal(e.to_string()))?;
    // Mark it in doubt, durably, before any byte leaves: a crash from here on is followed
    // by a tracking query, not a blind resend.
    let mut marked = m.clone();
    if let Some(l) = marked.letter.as_mut() {
        l.in_doubt = true;
    }
    if !letter.in_doubt {
        let key = format!("{}{:020}", queue_prefix(&m.practice), m.seq);
        let applied = gw.commit(|tx| {
            let still: Option<Message> = tx
                .get(key.as_bytes())?
                .and_then(|b| serde_json::from_slice(&b).ok());
            if still.as_ref() != Some(m) {
                return Ok(false);
            }
            tx.put(key.as_bytes(), &to_json(&marked)?)?;
            Ok(true)
        })?;
        gw.store().durable().await?;
        if !applied {
            return Ok(None);
        }
    }
    let to =
        t.to.clone()
            .unwrap_or_else(|| itk::automatic_recipient(&facts));
    let subject = itk::subject(&facts);
    let filename = format!("{}.json", letter.local_id);
    let sent = t
        .mailbox
        .send(&Outgoing {
            to: &to,
            workflow_id: &t.workflow_id,
            subject: &subject,
            local_id: &letter.local_id,
            filename: &filename,
            content_type: "application/fhir+json",
            body: &body,
        })
        .await;
    let outcome = match sent {
        Ok(id) => Outcome::Sent(id),
        Err(e) => outcome_of(&e),
    };
    Ok(Some((marked, outcome)))
}

/// Records on the Task's trail that its letter went to MESH (or never will), in the
/// transaction that records the attempt.
pub(super) fn tx_record_sending(tx: &Tx<'_>, m: &Message, l: &Letter, sent: bool) -> TxResult<()> {
    let now = Now::current();
    let description = if sent {
        format!(
            "{} letter (Task version {}) sent to practice {} over MESH, local id {}, MESH message {}",
            l.status,
            l.version,
            m.practice,
            l.local_id,
            l.message_id.as_deref().unwrap_or("?")
        )
    } else {
        format!(
            "{} letter (Task version {}) to practice {} could not be sent: {}",
            l.status,
            l.version,
            m.practice,
            m.last_error.as_deref().unwrap_or("dead letter")
        )
    };
    entities_and_record(
        tx,
        m,
        l,
        SystemActivity::Transmit,
        &description,
        sent,
        &now,
        None,
    )
}

/// `archived`: the Task as the archive holds it, when its referral was archived before the
/// acknowledgement came (the Task is then not in the hot store).
#[allow(clippy::too_many_arguments)]
fn entities_and_record(
    tx: &Tx<'_>,
    m: &Message,
    l: &Letter,
    activity: SystemActivity,
    description: &str,
    success: bool,
    now: &Now,
    archived: Option<&Value>,
) -> TxResult<()> {
    let task = format!("Task/{}", l.task);
    let mut entities = vec![
        task.clone(),
        format!("ServiceRequest/{}", m.service_request),
    ];
    let current = match tx.get(format!("r/{task}").as_bytes())? {
        Some(b) => serde_json::from_slice::<Value>(&b).ok(),
        None => archived.cloned(),
    };
    if let Some(p) = current.as_ref().and_then(|t| {
        t.pointer("/for/reference")
            .and_then(Value::as_str)
            .map(str::to_string)
    }) {
        entities.push(p);
    }
    crate::audit::tx_record_system(
        tx,
        activity,
        description,
        &entities,
        success,
        &task,
        now,
        archived,
    )?;
    Ok(())
}

/// Starts one inbox reader per distinct mailbox of ours (several practices may share one).
pub(super) fn start_inbox_readers(
    gw: &Arc<Gateway>,
    targets: &HashMap<String, Arc<Channel>>,
    stop: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    let mut seen = HashSet::new();
    for t in targets.values() {
        let Channel::Mesh(t) = t.as_ref() else {
            continue;
        };
        let key = format!("{}|{}", t.mailbox.base_url, t.mailbox.mailbox);
        if !seen.insert(key) {
            continue;
        }
        let (gw, mailbox, poll, mut stop) =
            (gw.clone(), t.mailbox.clone(), t.inbox_poll, stop.clone());
        tasks.spawn(async move {
            let mut skipped: HashSet<String> = HashSet::new();
            let mut failing = false;
            loop {
                // A failure is logged when it starts and when it ends, not every poll.
                match read_inbox(&gw, &mailbox, &mut skipped).await {
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(mailbox = %mailbox.mailbox, error = %e, "MESH inbox cannot be read; will keep trying");
                    }
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(mailbox = %mailbox.mailbox, "MESH inbox readable again");
                    }
                    _ => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }
}

/// What an inbox message says about a letter of ours.
struct Answer {
    local_id: Option<String>,
    responds_to: Vec<String>,
    kind: &'static str,
    positive: bool,
    code: String,
    reason: Option<String>,
}

fn answer_of(msg: &Incoming) -> std::result::Result<Answer, String> {
    if msg.message_type.as_deref() == Some("REPORT") {
        // MESH's own report on a message we sent (e.g. not collected, not deliverable).
        let positive = msg.status_success.as_deref() == Some("SUCCESS");
        return Ok(Answer {
            local_id: msg.local_id.clone(),
            responds_to: Vec::new(),
            kind: "mesh-report",
            positive,
            code: msg
                .status_description
                .clone()
                .unwrap_or_else(|| "MESH report".into()),
            reason: msg.status_description.clone(),
        });
    }
    if msg.workflow_id.as_deref() != Some(ACK_WORKFLOW) {
        return Err(format!(
            "workflow {} is not one this gateway reads",
            msg.workflow_id.as_deref().unwrap_or("(none)")
        ));
    }
    let ack = itk::parse_ack(&msg.body)?;
    Ok(Answer {
        local_id: None,
        responds_to: ack.responds_to,
        kind: match ack.kind {
            itk::AckKind::Infrastructure => "infrastructure",
            itk::AckKind::Business => "business",
        },
        positive: ack.positive,
        code: format!("{} {}", ack.code, ack.display).trim().to_string(),
        reason: ack.diagnostics,
    })
}

/// One pass over our inbox.
async fn read_inbox(gw: &Gateway, mailbox: &Mailbox, skipped: &mut HashSet<String>) -> Result<()> {
    let ids = mailbox
        .inbox()
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    for id in ids {
        if skipped.contains(&id) {
            continue;
        }
        let msg = match mailbox.download(&id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(mailbox = %mailbox.mailbox, message = %id, error = %e, "MESH message not downloaded");
                continue;
            }
        };
        let answer = match answer_of(&msg) {
            Ok(a) => a,
            Err(why) => {
                // Not ours to read: left in the inbox for whoever reads it, and not fetched again.
                tracing::warn!(mailbox = %mailbox.mailbox, message = %id, reason = %why, "MESH message left unread");
                skipped.insert(id);
                continue;
            }
        };
        let matched = record_answer(gw, &answer).await?;
        match matched {
            Some(seq) => tracing::info!(
                mailbox = %mailbox.mailbox, message = %id, seq, kind = answer.kind,
                positive = answer.positive, code = %answer.code, "acknowledgement recorded"
            ),
            None => tracing::warn!(
                mailbox = %mailbox.mailbox, message = %id, kind = answer.kind,
                "acknowledgement matches no letter of ours"
            ),
        }
        // Recorded (durably) first, then taken off MESH: a crash in between reads it again,
        // and recording the same acknowledgement twice changes nothing.
        if let Err(e) = mailbox.acknowledge(&id).await {
            tracing::warn!(mailbox = %mailbox.mailbox, message = %id, error = %e, "MESH message not acknowledged");
        }
    }
    Ok(())
}

/// Records `a` on the letter it answers; a negative answer makes the letter a dead letter
/// with its reason. Returns the letter's sequence number, or `None` if it answers none.
async fn record_answer(gw: &Gateway, a: &Answer) -> Result<Option<u64>> {
    let candidates: Vec<String> = a
        .local_id
        .iter()
        .chain(a.responds_to.iter())
        .cloned()
        .collect();
    let applied = gw.commit(|tx| {
        let mut place = None;
        for c in &candidates {
            if let Some(b) = tx.get(local_id_key(c).as_bytes())? {
                let v = String::from_utf8_lossy(&b).to_string();
                place = v
                    .split_once('/')
                    .and_then(|(ods, seq)| Some((ods.to_string(), seq.parse::<u64>().ok()?)));
                break;
            }
        }
        let Some((ods, seq)) = place else {
            return Ok(None);
        };
        // The letter is delivered (usually), still queued (an answer raced our record of
        // sending), or already dead.
        let mut found = None;
        for key in [
            format!("{DONE}{seq:020}"),
            format!("{DEAD}{seq:020}"),
            format!("{}{seq:020}", queue_prefix(&ods)),
        ] {
            if let Some(b) = tx.get(key.as_bytes())? {
                found = Some((key, b));
                break;
            }
        }
        let Some((key, bytes)) = found else {
            return Ok(None);
        };
        let mut m: Message = serde_json::from_slice(&bytes)
            .map_err(|e| Abort::Caller(Error::Internal(e.to_string())))?;
        let Some(l) = m.letter.as_mut() else {
            return Ok(None);
        };
        if l.acks
            .iter()
            .any(|r| r.kind == a.kind && r.code == a.code && r.positive == a.positive)
        {
            return Ok(Some(seq)); // recorded before
        }
        let now = Now::current();
        l.acks.push(AckRecord {
            kind: a.kind.to_string(),
            positive: a.positive,
            code: a.code.clone(),
            at: now.instant.clone(),
        });
        let l = l.clone();
        let mut description = format!(
            "{} acknowledgement {} for the {} letter (Task version {}, local id {})",
            a.kind, a.code, l.status, l.version, l.local_id
        );
        if a.positive {
            tx.put(key.as_bytes(), &to_json(&m)?)?;
        } else {
            m.last_error = Some(match &a.reason {
                Some(r) => format!("negative acknowledgement: {} ({r})", a.code),
                None => format!("negative acknowledgement: {}", a.code),
            });
            description.push_str("; the letter is a dead letter for the operator");
            tx.remove(key.as_bytes())?;
            tx.put(format!("{DEAD}{seq:020}").as_bytes(), &to_json(&m)?)?;
        }
        let archived = if gw.is_archived("Task", &l.task).map_err(Abort::Caller)? {
            gw.load("Task", &l.task).map_err(Abort::Caller)?
        } else {
            None
        };
        entities_and_record(
            tx,
            &m,
            &l,
            SystemActivity::Receive,
            &description,
            a.positive,
            &now,
            archived.as_ref(),
        )?;
        Ok(Some(seq))
    })?;
    gw.store().durable().await?;
    Ok(applied)
}
