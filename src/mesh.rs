//! A client for NHS England's MESH API (version 2): the mailbox-to-mailbox transport GP
//! systems accept documents over.
//!
//! Owns the `NHSMESH` authorisation header (HMAC-SHA256 over mailbox, nonce, nonce count,
//! password and timestamp, keyed by the environment's shared key), the handshake, sending
//! (with the `mex-*` headers, chunked where a message is larger than one chunk), tracking a
//! message by our local id, and the inbox (list, download, acknowledge). Mutual TLS comes
//! with the `reqwest::Client` it is given. It knows nothing of letters or referrals, and
//! must not log: callers log ids and statuses.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

const ACCEPT: &str = "application/vnd.mesh.v2+json";

/// What went wrong talking to MESH, in the terms the outbox decides on.
#[derive(Debug, Error)]
pub enum MeshError {
    /// MESH refused our credentials (wrong mailbox, password, shared key or certificate):
    /// retrying will not help until an operator fixes the config.
    #[error("MESH refused the mailbox's credentials (HTTP {0})")]
    Unauthorised(u16),
    /// MESH refused this message for good (unknown recipient, workflow not allowed, ...).
    #[error("MESH refused the message (HTTP {status}{})", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused { status: u16, detail: Option<String> },
    /// MESH is down, overloaded or slow: try again later.
    #[error("MESH unavailable ({0})")]
    Unavailable(String),
    /// MESH answered something this client cannot read.
    #[error("unexpected answer from MESH: {0}")]
    Protocol(String),
}

impl MeshError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, MeshError::Unavailable(_))
    }
}

type Result<T> = std::result::Result<T, MeshError>;

/// A mailbox's credentials and where its MESH is.
pub struct Mailbox {
    pub base_url: String,
    pub mailbox: String,
    pub password: String,
    pub shared_key: String,
    /// The largest chunk sent in one request; a larger message is sent in several.
    pub chunk_bytes: usize,
    pub http: reqwest::Client,
}

/// A message to send.
pub struct Outgoing<'a> {
    pub to: &'a str,
    pub workflow_id: &'a str,
    pub subject: &'a str,
    pub local_id: &'a str,
    pub filename: &'a str,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

/// A message read from the inbox.
pub struct Incoming {
    pub message_id: String,
    pub workflow_id: Option<String>,
    pub from: Option<String>,
    pub local_id: Option<String>,
    /// `DATA`, or `REPORT` for MESH's own report on a message we sent (e.g. not delivered).
    pub message_type: Option<String>,
    /// A report's verdict (`SUCCESS`/`ERROR`) and description.
    pub status_success: Option<String>,
    pub status_description: Option<String>,
    pub body: Vec<u8>,
}

/// The `NHSMESH` authorisation header: `NHSMESH {mailbox}:{nonce}:{count}:{timestamp}:{hmac}`
/// where `hmac` is the hex HMAC-SHA256, keyed by the shared key, of
/// `{mailbox}:{nonce}:{count}:{password}:{timestamp}` and the timestamp is UTC
/// `YYYYMMDDHHMM`.
pub fn authorization(
    mailbox: &str,
    password: &str,
    shared_key: &str,
    nonce: &str,
    count: u32,
    timestamp: &str,
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(shared_key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(format!("{mailbox}:{nonce}:{count}:{password}:{timestamp}").as_bytes());
    let hash = hex::encode(mac.finalize().into_bytes());
    format!("NHSMESH {mailbox}:{nonce}:{count}:{timestamp}:{hash}")
}

fn timestamp_now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

#[derive(Deserialize)]
struct Sent {
    message_id: String,
}

#[derive(Deserialize)]
struct InboxList {
    messages: Vec<String>,
}

/// A transport failure, with its cause (TLS, reset, ...) but not the URL.
fn send_error(e: reqwest::Error) -> MeshError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection refused or failed"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        MeshError::Unavailable(kind.into())
    } else {
        MeshError::Unavailable(format!("{kind}: {cause}"))
    }
}

/// Maps a non-success answer: 401/403 credentials, 5xx/429/408 unavailable, other 4xx a
/// refusal (with MESH's own error code and description when it gave them).
async fn status_error(r: reqwest::Response) -> MeshError {
    let status = r.status().as_u16();
    if matches!(status, 408 | 429) || r.status().is_server_error() {
        return MeshError::Unavailable(format!("HTTP {status}"));
    }
    if matches!(status, 401 | 403) {
        return MeshError::Unauthorised(status);
    }
    // MESH's error body: v2 `{"detail": [{"event", "code", "msg"}]}`, v1 `{"errorCode",
    // "errorDescription"}`. It names the error, never message content.
    let detail = r.json::<serde_json::Value>().await.ok().and_then(|v| {
        let item = v.pointer("/detail/0").unwrap_or(&v);
        let text = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| item.get(*k).and_then(serde_json::Value::as_str))
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        match (
            text(&["code", "errorCode"]),
            text(&["msg", "errorDescription"]),
        ) {
            (Some(c), Some(t)) => Some(format!("{c} {t}")),
            (c, t) => c.or(t),
        }
    });
    MeshError::Refused { status, detail }
}

impl Mailbox {
    fn url(&self, tail: &str) -> String {
        format!(
            "{}/messageexchange/{}{tail}",
            self.base_url.trim_end_matches('/'),
            self.mailbox
        )
    }

    fn auth(&self) -> String {
        authorization(
            &self.mailbox,
            &self.password,
            &self.shared_key,
            &uuid::Uuid::new_v4().to_string(),
            1,
            &timestamp_now(),
        )
    }

    fn request(&self, method: reqwest::Method, tail: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(tail))
            .header("authorization", self.auth())
            .header("accept", ACCEPT)
    }

    async fn ok(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let r = rb.send().await.map_err(send_error)?;
        if r.status().is_success() {
            Ok(r)
        } else {
            Err(status_error(r).await)
        }
    }

    /// The handshake ("validate mailbox"): proves the credentials and says who we are.
    pub async fn handshake(&self) -> Result<()> {
        let rb = self
            .request(reqwest::Method::GET, "")
            .header(
                "mex-clientversion",
                concat!("sp-gateway/", env!("CARGO_PKG_VERSION")),
            )
            .header("mex-osname", std::env::consts::OS)
            .header("mex-osarchitecture", std::env::consts::ARCH)
            .header("mex-osversion", "unknown");
        self.ok(rb).await.map(|_| ())
    }

    /// Sends `m`, in chunks of at most `chunk_bytes`; returns MESH's message id.
    pub async fn send(&self, m: &Outgoing<'_>) -> Result<String> {
        let chunk = self.chunk_bytes.max(1);
        let chunks: Vec<&[u8]> = if m.body.is_empty() {
            vec![m.body]
        } else {
            m.body.chunks(chunk).collect()
        };
        let total = chunks.len();
        let checksum = format!("SHA256:{}", hex::encode(Sha256::digest(m.body)));
        let first = self
            .request(reqwest::Method::POST, "/outbox")
            .header("content-type", "application/octet-stream")
            .header("mex-from", &self.mailbox)
            .header("mex-to", m.to)
            .header("mex-workflowid", m.workflow_id)
            .header("mex-subject", m.subject)
            .header("mex-localid", m.local_id)
            .header("mex-filename", m.filename)
            .header("mex-content-type", m.content_type)
            .header("mex-content-checksum", &checksum)
            .header("mex-chunk-range", format!("1:{total}"))
            .body(chunks[0].to_vec());
        let sent: Sent = self
            .ok(first)
            .await?
            .json()
            .await
            .map_err(|e| MeshError::Protocol(format!("send: {e}")))?;
        for (i, c) in chunks.iter().enumerate().skip(1) {
            let no = i + 1;
            let rb = self
                .request(
                    reqwest::Method::POST,
                    &format!("/outbox/{}/{no}", sent.message_id),
                )
                .header("content-type", "application/octet-stream")
                .header("mex-chunk-range", format!("{no}:{total}"))
                .body(c.to_vec());
            self.ok(rb).await?;
        }
        Ok(sent.message_id)
    }

    /// The message we sent with `local_id`, if MESH accepted one whole (tracking says
    /// `accepted` or `acknowledged`; a message still `uploading` was never delivered). Uses
    /// tracking by local id (`/outbox/tracking/{local_id}`, which answers in API v1's shape:
    /// 404 none, 200 one, 300 several), because after a crash between sending and recording
    /// we do not know MESH's message id.
    pub async fn find_sent(&self, local_id: &str) -> Result<Option<String>> {
        let rb = self.request(
            reqwest::Method::GET,
            &format!("/outbox/tracking/{local_id}"),
        );
        let r = rb.send().await.map_err(send_error)?;
        match r.status().as_u16() {
            404 => return Ok(None),
            // Several messages with our local id: at least one was accepted.
            300 => return Ok(Some(format!("(several with local id {local_id})"))),
            s if (200..300).contains(&s) => {}
            _ => return Err(status_error(r).await),
        }
        let v: serde_json::Value = r
            .json()
            .await
            .map_err(|e| MeshError::Protocol(format!("tracking: {e}")))?;
        let field = |a: &str, b: &str| {
            v.get(a)
                .or_else(|| v.get(b))
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        let status = field("status", "status").unwrap_or_default().to_lowercase();
        let id = field("message_id", "messageId")
            .ok_or_else(|| MeshError::Protocol("tracking: no message id".into()))?;
        Ok(matches!(status.as_str(), "accepted" | "acknowledged").then_some(id))
    }

    /// The ids of the messages waiting in our inbox.
    pub async fn inbox(&self) -> Result<Vec<String>> {
        let list: InboxList = self
            .ok(self.request(reqwest::Method::GET, "/inbox"))
            .await?
            .json()
            .await
            .map_err(|e| MeshError::Protocol(format!("inbox: {e}")))?;
        Ok(list.messages)
    }

    /// Downloads a message, all its chunks.
    pub async fn download(&self, message_id: &str) -> Result<Incoming> {
        let r = self
            .ok(self.request(reqwest::Method::GET, &format!("/inbox/{message_id}")))
            .await?;
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (workflow_id, from, local_id, message_type, status_success, status_description) = (
            header("mex-workflowid"),
            header("mex-from"),
            header("mex-localid"),
            header("mex-messagetype"),
            header("mex-statussuccess"),
            header("mex-statusdescription"),
        );
        let total = header("mex-chunk-range")
            .and_then(|r| r.split_once(':').and_then(|(_, n)| n.parse::<usize>().ok()))
            .unwrap_or(1);
        let mut body = r
            .bytes()
            .await
            .map_err(|e| MeshError::Protocol(format!("download: {e}")))?
            .to_vec();
        for no in 2..=total {
            let more = self
                .ok(self.request(reqwest::Method::GET, &format!("/inbox/{message_id}/{no}")))
                .await?
                .bytes()
                .await
                .map_err(|e| MeshError::Protocol(format!("download: {e}")))?;
            body.extend_from_slice(&more);
        }
        Ok(Incoming {
            message_id: message_id.to_string(),
            workflow_id,
            from,
            local_id,
            message_type,
            status_success,
            status_description,
            body,
        })
    }

    /// Acknowledges (removes) a message from our inbox.
    pub async fn acknowledge(&self, message_id: &str) -> Result<()> {
        let rb = self.request(
            reqwest::Method::PUT,
            &format!("/inbox/{message_id}/status/acknowledged"),
        );
        self.ok(rb).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authorisation_header_is_the_hmac_mesh_specifies() {
        // Recomputed independently of `authorization`, with the inputs in MESH's order.
        let h = authorization(
            "X26ABC1",
            "password",
            "TestKey",
            "4a6f0c0a",
            1,
            "202611211200",
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"TestKey").unwrap();
        mac.update(b"X26ABC1:4a6f0c0a:1:password:202611211200");
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(h, format!("NHSMESH X26ABC1:4a6f0c0a:1:202611211200:{want}"));
    }
}
