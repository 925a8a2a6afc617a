//! The HTTP edge: routes, authentication, request bodies, and errors.
//!
//! Owns the axum router (DESIGN §4), reading bodies within the configured limit and content
//! type, turning a bearer token into a [`Principal`] (via `auth`), the FHIR response headers
//! (`ETag`, `Last-Modified`, `Location`), request logging, and the one mapping of
//! [`Error`] to status code and OperationOutcome. It must not hold business rules: every
//! decision is the gateway's. Logs carry the route template, never the URL, a body or a
//! header value, so no patient identifier can reach them.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath, Path, RawQuery, Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::{Authenticator, Principal};
use crate::capability::Interaction;
use crate::config::Limits;
use crate::error::{Error, Issue};
use crate::gateway::{self, Gateway, Query};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Set by the server on requests that came over TLS (a client cannot set it: any copy it
/// sends is removed first), so that links the gateway writes use `https`.
pub const SCHEME_HEADER: &str = "x-sp-gateway-scheme";

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Authenticator>,
    /// The outbox workers' health (readiness, metrics, the operator's view).
    pub outbox: Arc<crate::outbox::Health>,
    limiter: Arc<RateLimiter>,
    slots: Arc<tokio::sync::Semaphore>,
    request_timeout: std::time::Duration,
}

impl AppState {
    pub fn new(
        gateway: Arc<Gateway>,
        auth: Arc<Authenticator>,
        outbox: Arc<crate::outbox::Health>,
        limits: &Limits,
    ) -> AppState {
        AppState {
            gateway,
            auth,
            outbox,
            limiter: Arc::new(RateLimiter::new(limits.rate_per_second, limits.rate_burst)),
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests)),
            request_timeout: std::time::Duration::from_secs(limits.request_timeout_secs),
        }
    }
}

/// What the connection knows about the client: its address and, under mutual TLS, the
/// SHA-256 of the certificate it presented (verified against the configured CA).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    pub cert_sha256: Option<[u8; 32]>,
    pub tls: bool,
}

/// A token bucket per client: `rate` requests a second sustained, `burst` at once.
struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Takes a token for `client`, or says how many seconds until one is free.
    fn take(&self, client: &str) -> Result<(), u64> {
        let Ok(mut b) = self.buckets.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        let (tokens, at) = b.entry(client.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// The router. What each `/fhir/{type}` route does for a type is decided by the
/// `capability` table, the same table the CapabilityStatement is generated from.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/outbox", get(admin_outbox))
        .route("/admin/backup", post(admin_backup))
        .route("/admin/outbox/{seq}/{action}", post(admin_outbox_action))
        .route("/admin/users", get(admin_users).post(admin_users_add))
        .route("/admin/directory/import", post(admin_directory_import))
        .route("/admin/users/{email}/{action}", post(admin_users_action))
        .route("/fhir/metadata", get(metadata))
        .route("/referrals", post(post_referral))
        .route("/fhir", post(transaction))
        .route("/fhir/", post(transaction))
        .route("/fhir/{rtype}", get(search).post(create))
        .route(
            "/fhir/{rtype}/{id}",
            get(read).put(update).patch(patch).post(operation),
        )
        .route("/fhir/{rtype}/{id}/_history", get(history))
        .route("/fhir/{rtype}/{id}/{op}", get(trail))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(vread))
        .fallback(|| async { ApiError(Error::NoEndpoint) })
        .method_not_allowed_fallback(|| async { ApiError(Error::MethodNotAllowed) })
        .layer(middleware::from_fn(negotiate))
        .layer(middleware::from_fn(ensure_outcome))
        .with_state(state.clone())
        // The provider inbox's pages: their own error pages, the same audit, limits and log.
        .merge(
            crate::web::router(crate::web::WebState::new(state.gateway.clone()))
                .layer(middleware::from_fn(page_peer)),
        )
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(state.clone(), audit_request))
        .layer(middleware::from_fn_with_state(state.clone(), limit))
        .layer(middleware::from_fn(log_request))
}

/// Tells the pages who the browser is (address, TLS) without their knowing the server.
async fn page_peer(mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnInfo>()
        .map(|c| crate::web::Peer {
            ip: c.peer.ip(),
            tls: c.tls,
        });
    match peer {
        Some(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        None => ApiError(Error::Internal("no connection info".into())).into_response(),
    }
}

/// A panic in a handler is a bug; the client gets a 500 OperationOutcome, never a dropped
/// connection, and the panic's message (which could quote input) is not echoed.
fn panic_response(_payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    ApiError(Error::Internal("handler panicked".into())).into_response()
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes in-flight
/// requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An [`Error`] on its way out as an OperationOutcome.
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::NotFound(_) | Error::NoEndpoint => StatusCode::NOT_FOUND,
        Error::Unauthenticated => StatusCode::UNAUTHORIZED,
        Error::Forbidden => StatusCode::FORBIDDEN,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
        Error::PreconditionRequired(_) => StatusCode::PRECONDITION_REQUIRED,
        Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Error::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
        Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        Error::Timeout => StatusCode::REQUEST_TIMEOUT,
        Error::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        Error::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A single issue, for the errors that have one.
fn one(code: &'static str, diagnostics: impl Into<String>, expression: Option<&str>) -> Vec<Issue> {
    vec![Issue {
        code,
        diagnostics: diagnostics.into(),
        expression: expression.map(str::to_string),
    }]
}

/// The OperationOutcome for an error.
pub fn operation_outcome(e: &Error) -> Value {
    let issues: Vec<Issue> = match e {
        Error::Invalid(i) | Error::Unprocessable(i) => i.clone(),
        Error::NotFound(what) => one("not-found", format!("{what} is not known"), None),
        Error::NoEndpoint => one(
            "not-found",
            "there is no such endpoint: GET /fhir/metadata lists what this server supports",
            None,
        ),
        Error::Unauthenticated => one(
            "login",
            "authentication required: send Authorization: Bearer <token>",
            None,
        ),
        Error::Forbidden => one("forbidden", "this client may not do that", None),
        Error::Conflict(m) => one("duplicate", m.clone(), None),
        Error::PreconditionFailed(m) => one("conflict", m.clone(), Some("If-Match")),
        Error::PreconditionRequired(m) => one("required", m.clone(), Some("If-Match")),
        Error::PayloadTooLarge(n) => one(
            "too-costly",
            format!("the request body is larger than the limit of {n} bytes"),
            None,
        ),
        Error::UnsupportedMediaType(m) => one("not-supported", m.clone(), Some("Content-Type")),
        Error::MethodNotAllowed => one(
            "not-supported",
            "this method is not supported on this endpoint",
            None,
        ),
        Error::NotAcceptable(m) => one("not-supported", m.clone(), Some("Accept")),
        Error::TooManyRequests(s) => one(
            "throttled",
            format!("too many requests from this client; retry after {s} s"),
            None,
        ),
        Error::Overloaded => one(
            "transient",
            "the gateway is at its limit of concurrent requests; retry shortly",
            None,
        ),
        Error::Timeout => one(
            "timeout",
            "the request was not completed in time (a body sent too slowly?)",
            None,
        ),
        Error::InsufficientStorage => one(
            "transient",
            "the gateway is short of disk space and is not taking new referrals; nothing was \
             stored; send it again later (the gateway resumes by itself when space returns)",
            None,
        ),
        Error::Store(_) => one(
            "no-store",
            "the gateway's store failed while handling this request (a full disk or an I/O \
             error). If this was a write, its outcome is unknown: it may or may not have been \
             stored. Re-sending the same referral (same referralId or ServiceRequest \
             identifier) is safe and returns what was stored; read before re-sending anything \
             else. Try again later",
            None,
        ),
        Error::Internal(_) => one(
            "exception",
            "the gateway failed to process the request; try again later",
            None,
        ),
    };
    let issue: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut v =
                json!({ "severity": "error", "code": i.code, "diagnostics": i.diagnostics });
            if let Some(e) = i.expression.as_deref().filter(|e| !e.is_empty()) {
                v["expression"] = json!([e]);
            }
            v
        })
        .collect();
    json!({ "resourceType": "OperationOutcome", "issue": issue })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        // A refusal for want of space is logged once, when the floor is crossed.
        if status.is_server_error() && !matches!(self.0, Error::InsufficientStorage) {
            tracing::error!(error = %self.0, "request failed");
        }
        let mut resp = fhir_response(status, &operation_outcome(&self.0));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let retry = match self.0 {
            Error::TooManyRequests(s) => Some(s),
            Error::Overloaded => Some(1),
            Error::Store(_) => Some(5),
            Error::InsufficientStorage => Some(60),
            _ => None,
        };
        if let Some(v) = retry.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

/// Notes, for the audit trail, what `v` (a resource or a Bundle of them) discloses to the
/// caller ([`gateway::disclosed_by`]).
fn disclose(v: &Value) {
    crate::audit::disclose(gateway::disclosed_by(v));
}

fn fhir_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (status, bytes).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

/// A resource response with `ETag` and `Last-Modified` (and `Location` when given).
fn resource_response(status: StatusCode, resource: &Value, location: Option<String>) -> Response {
    let mut resp = fhir_response(status, resource);
    let h = resp.headers_mut();
    let version = crate::fhir::version_of(resource);
    if version > 0 {
        if let Ok(v) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
            h.insert(header::ETAG, v);
        }
    }
    if let Some(t) = crate::ingest::parse_instant(crate::fhir::last_updated_of(resource)) {
        let fmt = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        if let Ok(s) = t.to_offset(time::UtcOffset::UTC).format(&fmt) {
            if let Ok(v) = HeaderValue::from_str(&s) {
                h.insert(header::LAST_MODIFIED, v);
            }
        }
    }
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    resp
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let h = match parts.headers.get(header::AUTHORIZATION) {
            None => None,
            // A header that is not text is no credential.
            Some(v) => Some(v.to_str().map_err(|_| ApiError(Error::Unauthenticated))?),
        };
        let cert = parts
            .extensions
            .get::<ConnInfo>()
            .and_then(|c| c.cert_sha256);
        let p = state.auth.authenticate(h, cert.as_ref()).map_err(|e| {
            tracing::warn!(certificate = cert.is_some(), "authentication failed");
            ApiError(e)
        })?;
        state
            .limiter
            .take(&p.client_id)
            .map_err(|secs| ApiError(Error::TooManyRequests(secs)))?;
        crate::audit::set_client(&p.client_id, p.role.as_str(), p.organisations());
        if let Some(slot) = parts.extensions.get::<ClientSlot>() {
            if let Ok(mut g) = slot.0.lock() {
                *g = Some(p.client_id.clone());
            }
        }
        Ok(p)
    }
}

/// Where the authenticated client id is left for the request log.
#[derive(Clone, Default)]
struct ClientSlot(Arc<std::sync::Mutex<Option<String>>>);

/// The base URL for links: the request's Host when it is a plain host name.
fn base_url(headers: &HeaderMap) -> String {
    let scheme = headers
        .get(SCHEME_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| *s == "https")
        .unwrap_or("http");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() < 256
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}/fhir")
}

/// Reads a JSON request body: checks the content type and the size limit.
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    read_body_as(state, headers, body, &[]).await
}

/// [`read_body`], also accepting the media types in `extra` (PATCH documents).
async fn read_body_as(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    extra: &[&str],
) -> Result<Bytes, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/fhir+json"
        && mime != "application/json"
        && !extra.contains(&mime.as_str())
    {
        return Err(ApiError(Error::UnsupportedMediaType(format!(
            "the body must be application/fhir+json or application/json{}",
            if ct.is_empty() {
                " (no Content-Type was sent)".to_string()
            } else {
                String::new()
            }
        ))));
    }
    let limit = state.gateway.config().server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError(Error::PayloadTooLarge(limit)));
    }
    let read = tokio::time::timeout(state.request_timeout, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError(Error::Timeout));
    };
    let bytes = read.map_err(|e| {
        // axum reports http-body-util's LengthLimitError only through its message.
        if e.to_string().contains("length limit") {
            ApiError(Error::PayloadTooLarge(limit))
        } else {
            ApiError(Error::invalid(
                "structure",
                "",
                "the request body could not be read",
            ))
        }
    })?;
    let max = state.gateway.config().server.limits.max_string_bytes;
    if let Some(n) = longest_json_string(&bytes).filter(|n| *n > max) {
        return Err(ApiError(Error::invalid(
            "too-costly",
            "",
            format!("the body holds a JSON string of {n} bytes; the limit is {max}"),
        )));
    }
    Ok(bytes)
}

/// The length in bytes of the longest string literal in a JSON text, found without parsing
/// it (so a huge string is refused before any allocation for it).
fn longest_json_string(body: &[u8]) -> Option<usize> {
    let (mut longest, mut start, mut escaped) = (None, None::<usize>, false);
    for (i, b) in body.iter().enumerate() {
        match (start, *b) {
            (None, b'"') => start = Some(i),
            (Some(_), _) if escaped => escaped = false,
            (Some(_), b'\\') => escaped = true,
            (Some(s), b'"') => {
                longest = longest.max(Some(i - s - 1));
                start = None;
            }
            _ => {}
        }
    }
    // An unterminated string counts to the end.
    if let Some(s) = start {
        longest = longest.max(Some(body.len() - s - 1));
    }
    longest
}

async fn healthz() -> Response {
    fhir_response(StatusCode::OK, &json!({ "status": "ok" }))
}

/// Ready: the gateway's own health only. The store answers and every outbox worker is
/// making progress; a GP endpoint that is down or silent is never the gateway's fault.
async fn readyz(State(st): State<AppState>) -> Response {
    let gw = &st.gateway;
    let limit = crate::outbox::stall_limit(&gw.config().outbox);
    let problem = match (gw.store().get(b"ready-probe"), gw.store().space()) {
        (Err(e), _) => Some(format!("store unavailable: {e}")),
        (_, Err(e)) => Some(format!("free space unknown: {e}")),
        (Ok(_), Ok(space)) if space.below_floor() => Some(format!(
            "free space {} MiB is below the floor of {} MiB: new referrals are refused",
            space.free_bytes / (1024 * 1024),
            space.floor_bytes / (1024 * 1024)
        )),
        (Ok(_), Ok(_)) => st.outbox.stalled(limit).map(|ods| {
            format!("outbox worker for practice {ods} has made no progress for over {limit:?}")
        }),
    };
    match problem {
        None => fhir_response(StatusCode::OK, &json!({ "status": "ready" })),
        Some(p) => fhir_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "status": p })),
    }
}

/// Prometheus text: the outbox's state (admin only: it says how busy each practice is).
async fn metrics(State(st): State<AppState>, who: Principal) -> Response {
    if let Err(e) = require_admin(&who) {
        return e.into_response();
    }
    // The store's own figures first: they matter most when the store has failed, and the
    // outbox's (read from the store) are then left out.
    let store = store_metrics(st.gateway.store());
    match crate::outbox::metrics(&st.gateway, &st.outbox).or_else(|e| match e {
        Error::Store(_) => Ok(String::new()),
        e => Err(e),
    }) {
        Ok(outbox) => {
            let text = format!("{store}{outbox}");
            let mut r = (StatusCode::OK, text).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// The store's disk and state, for operators.
fn store_metrics(store: &crate::store::Store) -> String {
    let mut out = String::new();
    if let Ok(space) = store.space() {
        out.push_str(&format!(
            "# HELP sp_gateway_store_free_bytes Free space of the data directory's filesystem.\n\
             # TYPE sp_gateway_store_free_bytes gauge\nsp_gateway_store_free_bytes {}\n\
             # HELP sp_gateway_store_floor_bytes Below this free space new referrals are refused (507).\n\
             # TYPE sp_gateway_store_floor_bytes gauge\nsp_gateway_store_floor_bytes {}\n\
             # HELP sp_gateway_store_below_floor 1 while free space is below the floor.\n\
             # TYPE sp_gateway_store_below_floor gauge\nsp_gateway_store_below_floor {}\n",
            space.free_bytes,
            space.floor_bytes,
            u8::from(space.below_floor())
        ));
    }
    out.push_str(&format!(
        "# HELP sp_gateway_store_failed 1 while the store refuses every call after a storage failure.\n\
         # TYPE sp_gateway_store_failed gauge\nsp_gateway_store_failed {}\n\
         # HELP sp_gateway_store_committed The last commit sequence recorded as on disk.\n\
         # TYPE sp_gateway_store_committed counter\nsp_gateway_store_committed {}\n",
        u8::from(store.failure().is_some()),
        store.committed_seq()
    ));
    out
}

/// `POST /admin/backup`: an online backup of the store, consistent to one commit, into a new
/// directory under `server.backup_dir`, verified by opening it. Writers pause only for the
/// final pass over the keys written while it ran.
async fn admin_backup(State(st): State<AppState>, who: Principal) -> ApiResult {
    require_admin(&who)?;
    let now = crate::gateway::Now::current();
    let name = format!(
        "sp-gateway-{}",
        now.instant.replace([':', '-'], "").replace('.', "-")
    );
    let to = st.gateway.config().server.backup_dir.join(name);
    let gw = st.gateway.clone();
    let made = tokio::task::spawn_blocking(move || {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::rule(
                    "backup_dir",
                    format!("backup directory {}: {e}", parent.display()),
                )
            })?;
        }
        gw.store().backup(&to).map_err(|e| match e {
            // The target's problem, said plainly; the live store is fine.
            crate::store::StoreError::Backup(m) => Error::rule("backup_dir", m),
            e => Error::Store(e),
        })
    })
    .await
    .map_err(|e| ApiError(Error::Internal(e.to_string())))??;
    tracing::info!(
        commit = made.commit,
        keys = made.keys,
        ms = made.millis,
        "online backup made"
    );
    let body = serde_json::to_value(&made).map_err(|e| ApiError(Error::Internal(e.to_string())))?;
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

fn require_admin(who: &Principal) -> Result<(), ApiError> {
    if who.role == crate::config::Role::Admin {
        Ok(())
    } else {
        Err(ApiError(Error::Forbidden))
    }
}

/// An inbox person as the operator sees them (no hash, no secret).
fn person_view(u: &crate::accounts::User) -> Value {
    json!({
        "email": u.email,
        "provider": u.provider,
        "kind": u.kind,
        "enrolled": u.totp_enrolled,
        "disabled": u.disabled,
        "locked": u.locked_until > 0,
        "demo": u.demo
    })
}

/// A directory feed's largest size (a national ORUK feed is tens of megabytes).
const MAX_FEED_BYTES: usize = 256 * 1024 * 1024;

/// `POST /admin/directory/import`: an ORUK feed (JSON) into the directory; answers the
/// import's report (what was added, changed, retired and refused, and why).
async fn admin_directory_import(
    State(st): State<AppState>,
    who: Principal,
    body: Body,
) -> ApiResult {
    require_admin(&who)?;
    let bytes = axum::body::to_bytes(body, MAX_FEED_BYTES)
        .await
        .map_err(|_| ApiError(Error::PayloadTooLarge(MAX_FEED_BYTES)))?;
    let feed = crate::schema::parse_json(&bytes)?;
    let report = st.gateway.import_directory(&feed).await?;
    Ok((StatusCode::OK, axum::Json(report)).into_response())
}

/// `GET /admin/users`: the provider inbox's people.
async fn admin_users(State(st): State<AppState>, who: Principal) -> ApiResult {
    require_admin(&who)?;
    let people: Vec<Value> = crate::accounts::list(st.gateway.store())?
        .iter()
        .map(person_view)
        .collect();
    Ok((StatusCode::OK, axum::Json(json!({ "people": people }))).into_response())
}

#[derive(serde::Deserialize)]
struct PersonBody {
    #[serde(default)]
    provider: String,
    /// `provider` or `"kind": "commissioner"`.
    #[serde(default)]
    kind: crate::accounts::Kind,
    #[serde(default)]
    email: String,
    /// None: a random first password, returned once.
    #[serde(default)]
    password: Option<String>,
}

fn person_body(body: &[u8]) -> Result<PersonBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(PersonBody {
            provider: String::new(),
            kind: crate::accounts::Kind::Provider,
            email: String::new(),
            password: None,
        });
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError(Error::invalid(
            "structure",
            "",
            format!("the body must be a JSON object with provider (or \"kind\": \"commissioner\"), email and (optionally) password: {e}"),
        ))
    })
}

/// `POST /admin/users` `{provider | "kind": "commissioner", email[, password]}`: adds a person on a running gateway;
/// answers their first password when it made one.
async fn admin_users_add(State(st): State<AppState>, who: Principal, body: Bytes) -> ApiResult {
    require_admin(&who)?;
    let b = person_body(&body)?;
    let (password, generated) = match b.password {
        Some(p) => (p, false),
        None => (crate::accounts::random_password(), true),
    };
    let gw = st.gateway.clone();
    let pw = password.clone();
    let u = tokio::task::spawn_blocking(move || {
        crate::accounts::add(gw.store(), gw.config(), &b.email, b.kind, &b.provider, &pw)
    })
    .await
    .map_err(|e| ApiError(Error::Internal(e.to_string())))??;
    let mut out = person_view(&u);
    if generated {
        out["password"] = Value::String(password);
    }
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

/// `POST /admin/users/{email}/disable|enable|reset` (reset: `{password}` optional).
async fn admin_users_action(
    State(st): State<AppState>,
    Path((email, action)): Path<(String, String)>,
    who: Principal,
    body: Bytes,
) -> ApiResult {
    require_admin(&who)?;
    let b = person_body(&body)?;
    let gw = st.gateway.clone();
    let (password, generated) = match b.password {
        Some(p) => (p, false),
        None => (crate::accounts::random_password(), true),
    };
    let pw = password.clone();
    let act = action.clone();
    let u = tokio::task::spawn_blocking(move || match act.as_str() {
        "disable" => crate::accounts::set_disabled(gw.store(), &email, true),
        "enable" => crate::accounts::set_disabled(gw.store(), &email, false),
        "reset" => crate::accounts::reset(gw.store(), &email, &pw),
        _ => Err(Error::not_found("no such user action")),
    })
    .await
    .map_err(|e| ApiError(Error::Internal(e.to_string())))??;
    let mut out = person_view(&u);
    if action == "reset" && generated {
        out["password"] = Value::String(password);
    }
    Ok((StatusCode::OK, axum::Json(out)).into_response())
}

/// `GET /admin/outbox`: pending messages and dead letters (no clinical content).
async fn admin_outbox(State(st): State<AppState>, who: Principal) -> ApiResult {
    require_admin(&who)?;
    let mut s = crate::outbox::summary(&st.gateway)?;
    s.endpoints = st.outbox.endpoints();
    s.email = st.outbox.email.views();
    let body = serde_json::to_value(&s).map_err(|e| ApiError(Error::Internal(e.to_string())))?;
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// `POST /admin/outbox/{seq}/retry` (a dead letter back to the queue) or `/stop` (a pending
/// message to the dead letters).
async fn admin_outbox_action(
    State(st): State<AppState>,
    Path((seq, action)): Path<(String, String)>,
    who: Principal,
) -> ApiResult {
    require_admin(&who)?;
    let seq: u64 = seq
        .parse()
        .map_err(|_| ApiError(Error::not_found(format!("outbox message {seq}"))))?;
    let m = match action.as_str() {
        "retry" => crate::outbox::retry(&st.gateway, seq).await?,
        "stop" => crate::outbox::stop(&st.gateway, seq).await?,
        _ => return Err(ApiError(Error::not_found("no such outbox action"))),
    };
    let body = serde_json::to_value(&m).map_err(|e| ApiError(Error::Internal(e.to_string())))?;
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

async fn metadata(State(st): State<AppState>) -> Response {
    let strict = st.gateway.config().server.require_if_match;
    fhir_response(
        StatusCode::OK,
        &crate::capability::capability_statement(strict),
    )
}

fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The `Prefer` header's `return` and `handling` preferences.
struct Prefer {
    ret: Option<String>,
    lenient: bool,
}

fn prefer(headers: &HeaderMap) -> Prefer {
    let mut p = Prefer {
        ret: None,
        lenient: false,
    };
    for v in headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for part in v.split([',', ';']) {
            match part.trim().split_once('=') {
                Some(("return", r)) => p.ret = Some(r.trim_matches('"').to_string()),
                Some(("handling", h)) => p.lenient = h.trim_matches('"') == "lenient",
                _ => {}
            }
        }
    }
    p
}

/// The response to a create or update, shaped by `Prefer: return=`.
fn written(
    headers: &HeaderMap,
    status: StatusCode,
    resource: &Value,
    location: Option<String>,
) -> Response {
    let mut resp = resource_response(status, resource, location);
    match prefer(headers).ret.as_deref() {
        Some("minimal") => {
            *resp.body_mut() = Body::empty();
            resp.headers_mut().remove(header::CONTENT_TYPE);
        }
        Some("OperationOutcome") => {
            let t = resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let id = resource
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let v = crate::fhir::version_of(resource);
            let oo = json!({
                "resourceType": "OperationOutcome",
                "issue": [{ "severity": "information", "code": "informational",
                            "diagnostics": format!("{t}/{id} version {v} written") }]
            });
            if let Ok(bytes) = serde_json::to_vec(&oo) {
                *resp.body_mut() = Body::from(bytes);
            }
        }
        _ => {}
    }
    resp
}

fn version_location(headers: &HeaderMap, resource: &Value) -> String {
    let t = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let v = crate::fhir::version_of(resource);
    format!("{}/{t}/{id}/_history/{v}", base_url(headers))
}

/// The one authorisation gate every FHIR route passes: the interaction must exist for the
/// type (404/405) and the caller's role must be permitted it (`capability::permitted`).
/// A role that may not read a type at all is told the resource does not exist (404); one
/// that may not write is refused (403, no details). Scoping within is the gateway's.
fn require(rtype: &str, i: Interaction, who: &Principal) -> Result<(), ApiError> {
    let special = matches!(i, Interaction::Transaction | Interaction::Referral);
    if !special {
        if crate::capability::resource(rtype).is_none() {
            return Err(ApiError(Error::not_found(format!("resource type {rtype}"))));
        }
        let supported = crate::capability::supports(rtype, i)
            || (i == Interaction::Validate
                && crate::capability::resource(rtype).is_some_and(|r| r.validate));
        if !supported {
            return Err(ApiError(Error::MethodNotAllowed));
        }
    }
    if !crate::capability::permitted(who.role, rtype, i) {
        return Err(ApiError(match i {
            Interaction::Read | Interaction::Vread | Interaction::HistoryInstance => {
                Error::not_found(format!("{rtype} resource"))
            }
            _ => Error::Forbidden,
        }));
    }
    Ok(())
}

async fn post_referral(
    State(st): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    require("Bundle", Interaction::Referral, &who)?;
    let bytes = read_body(&st, &headers, body).await?;
    let s = st.gateway.submit_referral(&who, &bytes).await?;
    let base = base_url(&headers);
    let entries: Vec<Value> = [&s.patient, &s.service_request, &s.task]
        .into_iter()
        .map(|r| {
            let t = r
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let id = r.get("id").and_then(Value::as_str).unwrap_or_default();
            json!({ "fullUrl": format!("{base}/{t}/{id}"), "resource": r })
        })
        .collect();
    let bundle = json!({ "resourceType": "Bundle", "type": "collection", "entry": entries });
    let status = if s.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = fhir_response(status, &bundle);
    if let Ok(v) = HeaderValue::from_str(&version_location(&headers, &s.service_request)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `POST /fhir`: a transaction Bundle with a Patient and a ServiceRequest.
async fn transaction(
    State(st): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    require("Bundle", Interaction::Transaction, &who)?;
    let bytes = read_body(&st, &headers, body).await?;
    let s = st.gateway.submit_transaction(&who, &bytes).await?;
    let minimal = prefer(&headers).ret.as_deref() == Some("minimal");
    let entry = |r: &Value, written: bool| {
        let t = r
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let id = r.get("id").and_then(Value::as_str).unwrap_or_default();
        let v = crate::fhir::version_of(r);
        let status = if written { "201 Created" } else { "200 OK" };
        let mut e = json!({
            "fullUrl": format!("{}/{t}/{id}", base_url(&headers)),
            "response": {
                "status": status,
                "location": format!("{t}/{id}/_history/{v}"),
                "etag": format!("W/\"{v}\""),
                "lastModified": crate::fhir::last_updated_of(r)
            }
        });
        if !minimal {
            e["resource"] = r.clone();
        }
        e
    };
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [entry(&s.patient, s.patient_written), entry(&s.service_request, s.created)]
    });
    // A transaction answers 200; each entry says what happened to it.
    let mut resp = fhir_response(StatusCode::OK, &bundle);
    if let Some(task_id) = s.task.get("id").and_then(Value::as_str) {
        // Where the routed Task is: the transaction-response lists only what was sent.
        if let Ok(v) = HeaderValue::from_str(&format!("{}/Task/{task_id}", base_url(&headers))) {
            resp.headers_mut().insert("x-sp-gateway-task", v);
        }
    }
    Ok(resp)
}

async fn search(
    State(st): State<AppState>,
    Path(rtype): Path<String>,
    who: Principal,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    require(&rtype, Interaction::SearchType, &who)?;
    let params = query_pairs(raw.as_deref());
    if rtype == "AuditEvent" {
        return audit_search(&st, &headers, &params);
    }
    if rtype == "Provenance" {
        let target = match params.as_slice() {
            [(k, v)] if k == "target" => v.clone(),
            _ => {
                return Err(ApiError(Error::invalid(
                    "required",
                    "target",
                    "Provenance search needs exactly target={Type}/{id}",
                )))
            }
        };
        let base = base_url(&headers);
        let entries: Vec<Value> = st.gateway.provenance(&target)?
            .into_iter()
            .map(|p| {
                let id = p.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
                json!({ "fullUrl": format!("{base}/Provenance/{id}"), "resource": p, "search": { "mode": "match" } })
            })
            .collect();
        let mut b =
            json!({ "resourceType": "Bundle", "type": "searchset", "total": entries.len() });
        if !entries.is_empty() {
            b["entry"] = json!(entries);
        }
        return Ok(fhir_response(StatusCode::OK, &b));
    }
    if rtype == "Measure" {
        let base = base_url(&headers);
        let entries: Vec<Value> = st
            .gateway
            .measures(&who)?
            .into_iter()
            .map(|m| {
                let id = m.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
                json!({ "fullUrl": format!("{base}/Measure/{id}"), "resource": m, "search": { "mode": "match" } })
            })
            .collect();
        let b = json!({ "resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries });
        return Ok(fhir_response(StatusCode::OK, &b));
    }
    if crate::directory::TYPES.contains(&rtype.as_str()) {
        let bundle = st
            .gateway
            .search_directory(&who, &rtype, &params, &base_url(&headers))?;
        return Ok(fhir_response(StatusCode::OK, &bundle));
    }
    let q = Query::parse(&rtype, &params, !prefer(&headers).lenient)?;
    let result = st.gateway.search(&who, &q)?;
    let bundle = gateway::searchset(&base_url(&headers), &q, result);
    disclose(&bundle);
    Ok(fhir_response(StatusCode::OK, &bundle))
}

async fn create(
    State(st): State<AppState>,
    Path(rtype): Path<String>,
    who: Principal,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> ApiResult {
    require(&rtype, Interaction::Create, &who)?;
    let bytes = read_body(&st, &headers, body).await?;
    match rtype.as_str() {
        "Observation" => {
            let obs = st.gateway.create_observation(&who, &bytes).await?;
            let loc = version_location(&headers, &obs);
            Ok(written(&headers, StatusCode::CREATED, &obs, Some(loc)))
        }
        "ServiceRequest" => {
            // Conditional create: the If-None-Exist header, or (as some clients send it) the
            // same search in the query string.
            let cond = headers
                .get("if-none-exist")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or(raw.filter(|q| !q.is_empty()));
            let cond = cond.as_deref();
            let s = st
                .gateway
                .create_service_request(&who, &bytes, cond)
                .await?;
            let status = if s.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let loc = version_location(&headers, &s.service_request);
            Ok(written(&headers, status, &s.service_request, Some(loc)))
        }
        _ => Err(ApiError(Error::MethodNotAllowed)),
    }
}

/// `GET /fhir/AuditEvent?entity=&agent=&action=&date=&_count=`: the trail, in the order
/// recorded.
fn audit_search(st: &AppState, headers: &HeaderMap, params: &[(String, String)]) -> ApiResult {
    let mut q = crate::audit::Query {
        entity: None,
        agent: None,
        action: None,
        after: None,
        before: None,
        cursor: 0,
        count: 50,
    };
    let bad = |n: &str, m: &str| ApiError(Error::invalid("value", n.to_string(), m.to_string()));
    let mut echo = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "entity" => q.entity = Some(v.clone()),
            "agent" => q.agent = Some(v.clone()),
            "action" if matches!(v.as_str(), "C" | "R" | "U" | "D" | "E") => {
                q.action = Some(v.clone())
            }
            "action" => return Err(bad(k, "must be C, R, U, D or E")),
            "date" => {
                let (op, rest) = v.split_at(
                    v.len()
                        .min(2)
                        .min(v.find(|c: char| c.is_ascii_digit()).unwrap_or(0)),
                );
                let t = if rest.len() == 10 {
                    format!("{rest}T00:00:00Z")
                } else {
                    rest.to_string()
                };
                if crate::ingest::parse_instant(&t).is_none() {
                    return Err(bad(k, "must be gt, ge, lt or le and an instant or date"));
                }
                match op {
                    "gt" | "ge" => q.after = Some(t),
                    "lt" | "le" => q.before = Some(t),
                    _ => return Err(bad(k, "needs a prefix: gt, ge, lt or le")),
                }
            }
            "_count" => {
                q.count = v
                    .parse()
                    .ok()
                    .filter(|c| (1..=200).contains(c))
                    .ok_or_else(|| bad(k, "must be 1 to 200"))?
            }
            "_cursor" => {
                q.cursor = v
                    .parse()
                    .map_err(|_| bad(k, "is not a cursor this server issued"))?;
                continue;
            }
            "_format" => continue,
            _ => {
                return Err(ApiError(Error::invalid(
                    "not-supported",
                    k.clone(),
                    "is not a search parameter this server supports for AuditEvent",
                )))
            }
        }
        echo.push((k.clone(), v.clone()));
    }
    let page = crate::audit::search(st.gateway.store(), &q)?;
    let base = base_url(headers);
    let link = |cursor: Option<u64>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &echo {
            s.append_pair(k, v);
        }
        if let Some(c) = cursor {
            s.append_pair("_cursor", &c.to_string());
        }
        format!("{base}/AuditEvent?{}", s.finish())
    };
    let mut links = vec![json!({ "relation": "self", "url": link(None) })];
    if let Some(n) = page.next {
        links.push(json!({ "relation": "next", "url": link(Some(n)) }));
    }
    let entries: Vec<Value> = page
        .events
        .into_iter()
        .map(|e| {
            let id = e.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
            json!({ "fullUrl": format!("{base}/AuditEvent/{id}"), "resource": e, "search": { "mode": "match" } })
        })
        .collect();
    let mut bundle = json!({ "resourceType": "Bundle", "type": "searchset", "link": links });
    if !entries.is_empty() {
        bundle["entry"] = json!(entries);
    }
    Ok(fhir_response(StatusCode::OK, &bundle))
}

/// `GET /fhir/ServiceRequest/{id}/$trail` (auditors): one referral's whole story in one
/// Bundle: every version of the ServiceRequest, its Task, Patient and Observations, and
/// every AuditEvent that touched any of them, in time order.
/// `GET /fhir/Measure/{id}/$evaluate-measure?periodStart=&periodEnd=`: a summary
/// MeasureReport, for a commissioner (or an auditor).
fn evaluate_measure(st: &AppState, id: &str, who: &Principal, raw: Option<&str>) -> ApiResult {
    require("Measure", Interaction::Read, who)?;
    let params = query_pairs(raw);
    let mut start = None;
    let mut end = None;
    for (k, v) in &params {
        match k.as_str() {
            "periodStart" => start = Some(v.clone()),
            "periodEnd" => end = Some(v.clone()),
            "reportType" if v == "summary" => {}
            other => {
                return Err(ApiError(Error::invalid(
                    "not-supported",
                    other.to_string(),
                    "$evaluate-measure takes periodStart, periodEnd and reportType=summary",
                )))
            }
        }
    }
    let (Some(start), Some(end)) = (start, end) else {
        return Err(ApiError(Error::invalid(
            "required",
            "periodStart",
            "periodStart and periodEnd are required (months: 2026-01, or the first and last days of months)",
        )));
    };
    let report = st.gateway.evaluate_measure(who, id, &start, &end)?;
    Ok(fhir_response(StatusCode::OK, &report))
}

async fn trail(
    State(st): State<AppState>,
    Path((rtype, id, op)): Path<(String, String, String)>,
    who: Principal,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    if rtype == "Measure" && op == "$evaluate-measure" {
        return evaluate_measure(&st, &id, &who, raw.as_deref());
    }
    if rtype != "ServiceRequest" || op != "$trail" {
        return Err(ApiError(Error::NoEndpoint));
    }
    if who.role != crate::config::Role::Auditor {
        return Err(ApiError(Error::Forbidden));
    }
    let gw = &st.gateway;
    let sr = gw.read(&who, "ServiceRequest", &id)?;
    let mut refs = vec![format!("ServiceRequest/{id}")];
    if let Some(p) = sr
        .get("subject")
        .and_then(|s| crate::fhir::ref_id(s, "Patient"))
    {
        refs.push(format!("Patient/{p}"));
    }
    let q = Query::parse("Task", &[("focus".to_string(), id.clone())], true)?;
    for t in gw.search(&who, &q)?.matches {
        refs.push(format!("Task/{}", t["id"].as_str().unwrap_or_default()));
    }
    let q = Query::parse(
        "Observation",
        &[
            ("based-on".to_string(), id.clone()),
            ("_count".to_string(), "200".to_string()),
        ],
        true,
    )?;
    for o in gw.search(&who, &q)?.matches {
        refs.push(format!(
            "Observation/{}",
            o["id"].as_str().unwrap_or_default()
        ));
    }
    let mut items: Vec<(String, u64, Value)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in &refs {
        let (t, rid) = r.split_once('/').unwrap_or_default();
        for v in gw.history(&who, t, rid)? {
            let when = crate::fhir::last_updated_of(&v).to_string();
            items.push((when, 0, v));
        }
        let q = crate::audit::Query {
            entity: Some(r.clone()),
            agent: None,
            action: None,
            after: None,
            before: None,
            cursor: 0,
            count: 10_000,
        };
        for e in crate::audit::search(gw.store(), &q)?.events {
            let seq: u64 = e["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
            if seen.insert(seq) {
                let when = e["recorded"].as_str().unwrap_or_default().to_string();
                items.push((when, seq, e));
            }
        }
    }
    let key = |w: &str| {
        crate::ingest::parse_instant(w)
            .map(|t| t.unix_timestamp_nanos())
            .unwrap_or(0)
    };
    items.sort_by_key(|a| (key(&a.0), a.1));
    let base = base_url(&headers);
    let entries: Vec<Value> = items
        .into_iter()
        .map(|(_, _, r)| {
            let t = r["resourceType"].as_str().unwrap_or_default().to_string();
            let rid = r["id"].as_str().unwrap_or_default().to_string();
            json!({ "fullUrl": format!("{base}/{t}/{rid}"), "resource": r })
        })
        .collect();
    let bundle = json!({ "resourceType": "Bundle", "type": "collection", "entry": entries });
    disclose(&bundle);
    Ok(fhir_response(StatusCode::OK, &bundle))
}

/// `POST /fhir/{type}/$validate`.
async fn operation(
    State(st): State<AppState>,
    Path((rtype, op)): Path<(String, String)>,
    who: Principal,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    if op != "$validate" {
        return Err(ApiError(Error::MethodNotAllowed));
    }
    let validates = crate::capability::resource(&rtype).is_some_and(|r| r.validate);
    if !validates {
        return Err(ApiError(Error::invalid(
            "not-supported",
            rtype.clone(),
            "$validate is supported on Patient, ServiceRequest, Task and Observation",
        )));
    }
    require(&rtype, Interaction::Validate, &who)?;
    let bytes = read_body(&st, &headers, body).await?;
    let mut resource = crate::schema::parse_json(&bytes)?;
    // Either the resource itself or Parameters with a `resource` parameter.
    if resource.get("resourceType").and_then(Value::as_str) == Some("Parameters") {
        resource = resource
            .get("parameter")
            .and_then(Value::as_array)
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some("resource"))
            })
            .and_then(|p| p.get("resource"))
            .cloned()
            .ok_or_else(|| {
                ApiError(Error::invalid(
                    "required",
                    "Parameters.parameter",
                    "needs a parameter named `resource`",
                ))
            })?;
    }
    let issues = crate::fhir::validate(&resource, &rtype, st.gateway.config())?;
    let issue: Vec<Value> = if issues.is_empty() {
        vec![
            json!({ "severity": "information", "code": "informational", "diagnostics": format!("valid {rtype}: R4 schema, typed parse and sp-gateway rules passed") }),
        ]
    } else {
        issues
            .iter()
            .map(|i| {
                let mut v =
                    json!({ "severity": "error", "code": i.code, "diagnostics": i.diagnostics });
                if let Some(e) = i.expression.as_deref().filter(|e| !e.is_empty()) {
                    v["expression"] = json!([e]);
                }
                v
            })
            .collect()
    };
    Ok(fhir_response(
        StatusCode::OK,
        &json!({ "resourceType": "OperationOutcome", "issue": issue }),
    ))
}

/// Answers 304 when the client's copy is current (`If-None-Match`, `If-Modified-Since`).
fn conditional_read(headers: &HeaderMap, resource: &Value) -> Option<Response> {
    let version = crate::fhir::version_of(resource);
    let etag = format!("W/\"{version}\"");
    let not_modified = if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        inm.split(',').any(|t| {
            let t = t.trim();
            let bare = t.strip_prefix("W/").unwrap_or(t).trim_matches('"');
            t == "*" || t == etag || bare == version.to_string()
        })
    } else if let Some(ims) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    {
        let fmt = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        let since = time::PrimitiveDateTime::parse(ims, &fmt)
            .ok()
            .map(|t| t.assume_utc());
        let updated = crate::ingest::parse_instant(crate::fhir::last_updated_of(resource));
        matches!((since, updated), (Some(s), Some(u)) if u.unix_timestamp() <= s.unix_timestamp())
    } else {
        false
    };
    not_modified.then(|| {
        let mut resp = resource_response(StatusCode::NOT_MODIFIED, resource, None);
        *resp.body_mut() = Body::empty();
        resp.headers_mut().remove(header::CONTENT_TYPE);
        resp
    })
}

async fn read(
    State(st): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    who: Principal,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    if id == "_history" {
        require(&rtype, Interaction::HistoryType, &who)?;
        let count = query_pairs(raw.as_deref())
            .iter()
            .find(|(k, _)| k == "_count")
            .and_then(|(_, v)| v.parse().ok())
            .filter(|c: &usize| (1..=200).contains(c))
            .unwrap_or(50);
        let versions = st.gateway.type_history(&who, &rtype, count)?;
        versions.iter().for_each(disclose);
        return Ok(history_bundle(&headers, versions));
    }
    require(&rtype, Interaction::Read, &who)?;
    if rtype == "AuditEvent" {
        return match crate::audit::read(st.gateway.store(), &id)? {
            Some(e) => Ok(fhir_response(StatusCode::OK, &e)),
            None => Err(ApiError(Error::not_found(format!("AuditEvent/{id}")))),
        };
    }
    let r = st.gateway.read(&who, &rtype, &id)?;
    if let Some(resp) = conditional_read(&headers, &r) {
        return Ok(resp);
    }
    disclose(&r);
    Ok(resource_response(StatusCode::OK, &r, None))
}

async fn vread(
    State(st): State<AppState>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    who: Principal,
) -> ApiResult {
    require(&rtype, Interaction::Vread, &who)?;
    let r = st.gateway.vread(&who, &rtype, &id, &vid)?;
    disclose(&r);
    Ok(resource_response(StatusCode::OK, &r, None))
}

fn history_bundle(headers: &HeaderMap, versions: Vec<Value>) -> Response {
    let base = base_url(headers);
    let entries: Vec<Value> = versions
        .into_iter()
        .map(|r| {
            let t = r.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_string();
            let id = r.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
            let v = crate::fhir::version_of(&r);
            let lu = crate::fhir::last_updated_of(&r).to_string();
            json!({
                "fullUrl": format!("{base}/{t}/{id}"),
                "resource": r,
                "request": { "method": if v == 1 { "POST" } else { "PUT" }, "url": if v == 1 { t.clone() } else { format!("{t}/{id}") } },
                "response": { "status": if v == 1 { "201" } else { "200" }, "etag": format!("W/\"{v}\""), "lastModified": lu }
            })
        })
        .collect();
    let mut bundle = json!({ "resourceType": "Bundle", "type": "history", "total": entries.len() });
    if !entries.is_empty() {
        bundle["entry"] = json!(entries);
    }
    fhir_response(StatusCode::OK, &bundle)
}

async fn history(
    State(st): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    who: Principal,
    headers: HeaderMap,
) -> ApiResult {
    require(&rtype, Interaction::HistoryInstance, &who)?;
    let versions = st.gateway.history(&who, &rtype, &id)?;
    versions.iter().for_each(disclose);
    Ok(history_bundle(&headers, versions))
}

async fn update(
    State(st): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    who: Principal,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    require(&rtype, Interaction::Update, &who)?;
    let bytes = read_body(&st, &headers, body).await?;
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    let r = if rtype == "HealthcareService" {
        st.gateway
            .update_service(&who, &id, if_match, &bytes, false)
            .await?
    } else {
        st.gateway.update_task(&who, &id, if_match, &bytes).await?
    };
    Ok(written(&headers, StatusCode::OK, &r, None))
}

async fn patch(
    State(st): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    who: Principal,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    require(&rtype, Interaction::Patch, &who)?;
    let patch_types = [
        "application/json-patch+json",
        "application/merge-patch+json",
    ];
    let bytes = read_body_as(&st, &headers, body, &patch_types).await?;
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    let r = if rtype == "HealthcareService" {
        st.gateway
            .update_service(&who, &id, if_match, &bytes, true)
            .await?
    } else {
        st.gateway.patch_task(&who, &id, if_match, &bytes).await?
    };
    Ok(written(&headers, StatusCode::OK, &r, None))
}

/// Every error leaves as an OperationOutcome: a rejection produced by the framework itself
/// (an undecodable path segment, say) is turned into one here.
async fn ensure_outcome(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_fhir = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/fhir+json"));
    if !status.is_client_error() && !status.is_server_error() || is_fhir {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text: String = String::from_utf8_lossy(&text).chars().take(200).collect();
    let code = if status.is_server_error() {
        "exception"
    } else {
        "invalid"
    };
    let oo = json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": code, "diagnostics": if text.is_empty() { status.to_string() } else { text } }]
    });
    let mut out = fhir_response(parts.status, &oo);
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// Refuses, before anything else runs, a request for a format other than JSON (406): an
/// `Accept` that admits no JSON type, or `_format` naming XML or another format.
async fn negotiate(req: Request, next: Next) -> Response {
    let format = query_pairs(req.uri().query())
        .into_iter()
        .find(|(k, _)| k == "_format")
        .map(|(_, v)| v);
    if let Some(f) = format {
        let ok = matches!(
            f.as_str(),
            "json" | "application/json" | "application/fhir+json"
        ) || f.starts_with("application/fhir+json;")
            || f.starts_with("application/json;");
        if !ok {
            return ApiError(Error::NotAcceptable(format!(
                "_format={f} is not supported: this server speaks FHIR JSON only (_format=json)"
            )))
            .into_response();
        }
    }
    if let Some(accept) = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
    {
        let takes_json = accept.split(',').any(|m| {
            let m = m
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            m.is_empty()
                || matches!(
                    m.as_str(),
                    "*/*" | "application/*" | "application/json" | "application/fhir+json" | "json"
                )
        });
        if !takes_json {
            return ApiError(Error::NotAcceptable(
                "this server produces application/fhir+json only; XML is not supported".into(),
            ))
            .into_response();
        }
    }
    next.run(req).await
}

/// Records every request that can touch patient data in the audit trail. A successful write
/// has already recorded itself in its own transaction; everything else (reads, searches,
/// refusals, failed authentication) is recorded here before the response leaves. If the
/// record cannot be written, the response is withheld (fail closed): no unaudited access.
async fn audit_request(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    // Probes, the CapabilityStatement, the pages' stylesheet and icons, and the empty
    // sign-in and self-referral forms touch no patient data.
    let exempt = matches!(
        path.as_str(),
        "/healthz" | "/readyz" | "/metrics" | "/fhir/metadata"
    ) || path.starts_with("/assets/")
        || (req.method() == axum::http::Method::GET
            && matches!(
                path.as_str(),
                "/inbox/sign-in" | "/inbox/sign-in/code" | "/refer" | "/refer/privacy"
            ));
    if exempt {
        return next.run(req).await;
    }
    let ctx = crate::audit::Context {
        peer: req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.peer.ip().to_string()),
        method: req.method().to_string(),
        query: req.uri().query().map(str::to_string),
        path,
        ..Default::default()
    };
    let (resp, ctx) = crate::audit::scope(ctx, async {
        let resp = next.run(req).await;
        (resp, crate::audit::current())
    })
    .await;
    let Some(ctx) = ctx else { return resp };
    match crate::audit::finish(st.gateway.store(), &ctx, resp.status().as_u16()) {
        Ok(()) => resp,
        Err(e) => {
            tracing::error!(error = %e, "audit record failed; response withheld");
            match e {
                Error::Store(_) => ApiError(e).into_response(),
                _ => ApiError(Error::Internal("audit".into())).into_response(),
            }
        }
    }
}

/// Backpressure and deadlines: a request beyond the concurrency limit is answered 503 at
/// once (never queued without bound), and one not done within the request timeout 408.
async fn limit(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // The probes answer however busy the gateway is.
    if matches!(req.uri().path(), "/healthz" | "/readyz") {
        return next.run(req).await;
    }
    let Ok(_slot) = st.slots.clone().try_acquire_owned() else {
        return ApiError(Error::Overloaded).into_response();
    };
    // No deadline here: a handler that has committed a write must be allowed to finish and
    // answer, or a client would retry a write that happened. Slow clients are cut off where
    // they are slow: reading the head (server) and the body (read_body).
    next.run(req).await
}

/// Logs one line per request: method, route template, status, time, client. Never the URL
/// (ids and search values), headers or bodies.
async fn log_request(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "(unmatched)".into());
    let request_id = uuid::Uuid::new_v4().to_string();
    let slot = ClientSlot::default();
    req.extensions_mut().insert(slot.clone());
    // Everything logged while handling the request carries its id.
    let span = tracing::info_span!("req", request_id = %request_id);
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    let client = slot
        .0
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .unwrap_or_else(|| "-".into());
    tracing::info!(
        request_id = %request_id,
        method = %method,
        route = %route,
        status = resp.status().as_u16(),
        ms = start.elapsed().as_millis() as u64,
        client = %client,
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
