//! Email to a group when new referrals reach it: "2 new referrals are waiting", with a link
//! to the inbox, and nothing about the people referred.
//!
//! Owns: one notifier (a background task) that looks, every `poll_ms`, for Tasks newly
//! waiting (`requested`) for each provider with an `email`, and sends at most one email per
//! group per `interval_secs` over SMTP with STARTTLS (lettre, rustls); what has been told
//! (`o/email/{provider}`: the newest Task counted and when the email went) so a restart
//! neither repeats nor forgets; failures retried with backoff and shown to the operator
//! (`GET /admin/outbox`, `email`). It reads the referral indexes only: a referral never
//! waits for email. It must not put patient data in an email or a log line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use super::OutboxError;
use crate::config::{Config, EmailConfig};
use crate::error::{Error, Result};
use crate::gateway::{keys, Gateway};

fn state_key(provider: &str) -> String {
    format!("o/email/{provider}")
}

/// What a group has been told.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Told {
    /// Index suffix (`{time}/{id}`) of the newest waiting Task counted in an email.
    cursor: String,
    /// When the last email went (commit-clock microseconds).
    sent_micros: i64,
}

/// A group's email as the operator sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EmailView {
    pub provider: String,
    /// New referrals not yet in an email (waiting for the interval, or for SMTP).
    pub untold: usize,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub last_sent: Option<String>,
}

/// The notifier's state per group, for `/admin/outbox`.
#[derive(Default)]
pub struct EmailHealth {
    groups: Mutex<BTreeMap<String, EmailView>>,
}

impl EmailHealth {
    pub fn views(&self) -> Vec<EmailView> {
        self.groups
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    fn update(&self, provider: &str, f: impl FnOnce(&mut EmailView)) {
        if let Ok(mut g) = self.groups.lock() {
            let v = g.entry(provider.to_string()).or_insert_with(|| EmailView {
                provider: provider.to_string(),
                ..EmailView::default()
            });
            f(v);
        }
    }
}

/// The SMTP transport and what every email shares.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    cfg: EmailConfig,
}

fn bad(key: &'static str, message: String) -> OutboxError {
    OutboxError::Config {
        key: format!("inbox.email.{key}"),
        message,
    }
}

impl Mailer {
    pub fn new(cfg: &EmailConfig) -> std::result::Result<Mailer, OutboxError> {
        let from: Mailbox = cfg.from.parse().map_err(|e| bad("from", format!("{e}")))?;
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.smtp_host)
            .port(cfg.smtp_port)
            .timeout(Some(Duration::from_secs(20)));
        if cfg.starttls {
            let mut tls = TlsParameters::builder(cfg.smtp_host.clone());
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
                tls = tls
                    .certificate_store(CertificateStore::None)
                    .add_root_certificate(cert);
            }
            let tls = tls.build().map_err(|e| bad("starttls", format!("{e}")))?;
            b = b.tls(Tls::Required(tls));
        }
        if let Some(user) = &cfg.username {
            let password = match &cfg.password_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| bad("password_file", format!("{}: {e}", f.display())))?
                    .trim()
                    .to_string(),
                None => return Err(bad("password_file", "is required with username".into())),
            };
            b = b.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Mailer {
            transport: b.build(),
            from,
            cfg: cfg.clone(),
        })
    }

    /// The email itself: a count, the group's name and a link; nothing about anyone referred.
    pub fn message(&self, to: &str, group: &str, count: usize) -> Result<Message> {
        let to: Mailbox = to
            .parse()
            .map_err(|e| Error::Internal(format!("group email address: {e}")))?;
        let what = if count == 1 {
            "1 new referral is waiting".to_string()
        } else {
            format!("{count} new referrals are waiting")
        };
        let link = format!("{}/inbox", self.cfg.base_url.trim_end_matches('/'));
        let body = format!(
            "{what} for {group}.\n\nSign in to see {}: {link}\n\n\
             This email says nothing about the people referred: their details are only in \
             the inbox, for people of your group who have signed in.\n",
            if count == 1 { "it" } else { "them" }
        );
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!("{what} for {group}"))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| Error::Internal(format!("email: {e}")))
    }
}

/// Tasks waiting for `provider` newer than `cursor`: how many, and the newest's suffix.
fn untold(gw: &Gateway, provider: &str, cursor: &str) -> Result<(usize, Option<String>)> {
    let prefix = keys::time_prefix("Task", &format!("o/{provider}"), "requested");
    let mut n = 0;
    let mut newest = None;
    for (k, _) in gw.store().scan(prefix.as_bytes(), None, usize::MAX)? {
        let k = String::from_utf8_lossy(&k);
        let suffix = k[prefix.len()..].to_string();
        if suffix.as_str() > cursor {
            n += 1;
            newest = Some(suffix);
        }
    }
    Ok((n, newest))
}

fn told(gw: &Gateway, provider: &str) -> Result<Told> {
    match gw.store().get(state_key(provider).as_bytes())? {
        None => Ok(Told::default()),
        Some(b) => serde_json::from_slice(&b).map_err(|e| Error::Internal(e.to_string())),
    }
}

/// Starts the notifier (when the config has `[inbox.email]` and a group has an address).
pub fn start(
    gw: &Arc<Gateway>,
    mailer: Mailer,
    health: &Arc<super::Health>,
    stop: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    let cfg: &Config = gw.config();
    let groups: Vec<(String, String, String)> = cfg
        .providers
        .iter()
        .filter_map(|p| Some((p.id.clone(), p.name.clone(), p.email.clone()?)))
        .collect();
    if groups.is_empty() {
        return;
    }
    let (gw, health, mut stop) = (gw.clone(), health.clone(), stop.clone());
    for (id, _, _) in &groups {
        health.email.update(id, |_| {});
    }
    tasks.spawn(async move {
        let poll = Duration::from_millis(mailer.cfg.poll_ms);
        let interval = mailer.cfg.interval_secs as i64 * 1_000_000;
        // Per group: no attempt before this instant (backoff after a failure).
        let mut not_before: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            for (id, name, address) in &groups {
                if not_before.get(id).is_some_and(|t| Instant::now() < *t) {
                    continue;
                }
                let result =
                    notify_one(&gw, &mailer, &health.email, id, name, address, interval).await;
                if let Err(e) = result {
                    let mut failures = 0;
                    health.email.update(id, |v| {
                        v.consecutive_failures += 1;
                        failures = v.consecutive_failures;
                        v.last_error = Some(e.to_string());
                    });
                    // 2 s, 4 s, 8 s… up to the interval (at most about 8.5 minutes).
                    let backoff = Duration::from_millis(1000u64 << failures.min(9))
                        .min(Duration::from_secs(mailer.cfg.interval_secs.max(2)));
                    not_before.insert(id.clone(), Instant::now() + backoff);
                    tracing::warn!(provider = %id, failures, error = %e, "email to a group failed; will retry");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

async fn notify_one(
    gw: &Gateway,
    mailer: &Mailer,
    health: &EmailHealth,
    provider: &str,
    group: &str,
    address: &str,
    interval: i64,
) -> Result<()> {
    let t = told(gw, provider)?;
    let (count, newest) = untold(gw, provider, &t.cursor)?;
    health.update(provider, |v| v.untold = count);
    let Some(newest) = newest else {
        return Ok(());
    };
    let now = gw.commit(|tx| crate::gateway::tx_now(tx).map(|n| n.micros))?;
    if t.sent_micros > 0 && now - t.sent_micros < interval {
        return Ok(());
    }
    let msg = mailer.message(address, group, count)?;
    mailer
        .transport
        .send(msg)
        .await
        .map_err(|e| Error::Internal(format!("SMTP: {e}")))?;
    let next = Told {
        cursor: newest,
        sent_micros: now,
    };
    let bytes = serde_json::to_vec(&next).map_err(|e| Error::Internal(e.to_string()))?;
    gw.commit(|tx| {
        tx.put(state_key(provider).as_bytes(), &bytes)?;
        Ok(())
    })?;
    gw.store().durable().await?;
    let sent = crate::clock::Now::from_micros(now).instant;
    health.update(provider, |v| {
        v.untold = 0;
        v.consecutive_failures = 0;
        v.last_error = None;
        v.last_sent = Some(sent);
    });
    tracing::info!(provider = %provider, count, "emailed a group about new referrals");
    Ok(())
}
