//! The inbox's page handlers: sign-in (password, then the TOTP code, with enrolment the
//! first time), sign-out, the queue, one referral, and its actions. Each checks the session
//! and, for forms, the CSRF token before anything else, and says to the audit trail who the
//! person is and what the request amounts to.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use subtle::ConstantTimeEq;

use super::{
    cookie, cookie_names, home, page, principal_of, redirect, set_cookie, Chrome, PageError, Peer,
    Person, WebState,
};
use crate::accounts::{self, SignInError};
use crate::error::{Error, Issue};
use crate::gateway::inbox::{Action, DeclineReason, ReferralView};

type PageResult = Result<Response, PageError>;

fn now_micros(state: &WebState) -> Result<i64, PageError> {
    Ok(state
        .gateway
        .commit(|tx| crate::gateway::tx_now(tx).map(|n| n.micros))?)
}

/// The person a request's session cookie names, if their session is live and complete.
/// The signed-in person of any kind (a provider's person or a commissioner).
pub(super) async fn signed_in(
    state: &WebState,
    headers: &HeaderMap,
    peer: &Peer,
) -> Result<Person, PageError> {
    let (name, _) = cookie_names(peer.tls);
    let token = cookie(headers, name).ok_or(PageError::SignIn)?;
    let cfg = &state.gateway.config().inbox;
    let found = state.gateway.commit(|tx| {
        let now = crate::gateway::tx_now(tx)?;
        accounts::tx_session(tx, cfg, now.micros, &token)
    })?;
    let Some((session, user)) = found.filter(|(s, _)| s.full) else {
        return Err(PageError::SignIn);
    };
    audit_person(&user);
    let org_name = match user.kind {
        accounts::Kind::Commissioner => "Commissioning".to_string(),
        accounts::Kind::Provider => state
            .gateway
            .config()
            .provider(&user.provider)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| user.provider.clone()),
    };
    Ok(Person {
        principal: principal_of(&user),
        user,
        session,
        org_name,
    })
}

/// The signed-in person of a provider, for the inbox's pages; a commissioner is sent to
/// their own pages.
pub(super) async fn person(
    state: &WebState,
    headers: &HeaderMap,
    peer: &Peer,
) -> Result<Person, PageError> {
    signed_in_as(state, headers, peer, accounts::Kind::Provider).await
}

/// The signed-in person if of `kind`; a person of another kind is sent to their own home.
pub(super) async fn signed_in_as(
    state: &WebState,
    headers: &HeaderMap,
    peer: &Peer,
    kind: accounts::Kind,
) -> Result<Person, PageError> {
    let p = signed_in(state, headers, peer).await?;
    if p.user.kind == kind {
        Ok(p)
    } else {
        Err(PageError::Elsewhere(home(p.user.kind)))
    }
}

/// Names the person a page request acts for in its audit record.
pub(super) fn audit_person(u: &accounts::User) {
    let org = match u.kind {
        accounts::Kind::Provider => Some(u.provider.as_str()),
        accounts::Kind::Commissioner => None,
    };
    crate::audit::set_person(&u.id, &u.email, org);
}

pub(super) fn same(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

// ---- Sign-in ----

#[derive(Template)]
#[template(path = "inbox/signin.html")]
struct SignInPage {
    chrome: Chrome,
    csrf: String,
    email: String,
    error: Option<String>,
    note: Option<String>,
}

/// The sign-in form, with a fresh pre-session CSRF token in a cookie and the form.
fn sign_in_page(
    peer: &Peer,
    status: StatusCode,
    email: &str,
    error: Option<String>,
    note: Option<String>,
) -> PageResult {
    let csrf = accounts::random_token();
    let mut r = page(
        status,
        &SignInPage {
            chrome: Chrome::default(),
            csrf: csrf.clone(),
            email: email.to_string(),
            error,
            note,
        },
    )?;
    let (_, pre) = cookie_names(peer.tls);
    r.headers_mut()
        .append(header::SET_COOKIE, set_cookie(pre, &csrf, peer.tls, None));
    Ok(r)
}

pub async fn sign_in_form(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> PageResult {
    if let Ok(p) = signed_in(&state, &headers, &peer).await {
        return Ok(redirect(home(p.user.kind)));
    }
    let note = match q.as_deref() {
        Some("signed-out") => Some("You have signed out.".to_string()),
        Some("expired") => Some("Your session has ended. Sign in again.".to_string()),
        _ => None,
    };
    sign_in_page(&peer, StatusCode::OK, "", None, note)
}

#[derive(serde::Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

pub async fn sign_in(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> PageResult {
    crate::audit::set_login("110122");
    let (session_name, pre) = cookie_names(peer.tls);
    if !same(&form.csrf, &cookie(&headers, pre).unwrap_or_default()) {
        return Err(PageError::Csrf);
    }
    let email = form.email.trim().to_string();
    if !state.limiter.allow(peer.ip) {
        return sign_in_page(
            &peer,
            StatusCode::TOO_MANY_REQUESTS,
            &email,
            Some(SignInError::Throttled.to_string()),
            None,
        );
    }
    if email.is_empty() || form.password.is_empty() {
        return sign_in_page(
            &peer,
            StatusCode::UNAUTHORIZED,
            &email,
            Some("Enter your email address and your password.".into()),
            None,
        );
    }
    let cfg = &state.gateway.config().inbox;
    let loopback = peer.ip.is_loopback();
    let (attempt, token) = state.gateway.commit(|tx| {
        let now = crate::gateway::tx_now(tx)?;
        accounts::tx_password_step(tx, cfg, now.micros, &email, &form.password, loopback)
    })?;
    state.gateway.store().durable().await.map_err(Error::from)?;
    if let Some(u) = &attempt.user {
        audit_person(u);
    }
    match (attempt.result, token) {
        (Ok(()), Some(token)) => {
            let mut r = redirect("/inbox/sign-in/code");
            let h = r.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(session_name, &token, peer.tls, None),
            );
            h.append(header::SET_COOKIE, set_cookie(pre, "", peer.tls, Some(0)));
            Ok(r)
        }
        (Err(e), _) => {
            if attempt.locked_now {
                tracing::warn!("an inbox account was locked after repeated failures");
            }
            sign_in_page(
                &peer,
                StatusCode::UNAUTHORIZED,
                &email,
                Some(format!("{}.", capitalise(&e.to_string()))),
                None,
            )
        }
        (Ok(()), None) => Err(PageError::Gateway(Error::Internal(
            "sign-in made no session".into(),
        ))),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

struct Enrol {
    qr_data_url: String,
    secret: String,
}

#[derive(Template)]
#[template(path = "inbox/code.html")]
struct CodePage {
    chrome: Chrome,
    csrf: String,
    error: Option<String>,
    enrol: Option<Enrol>,
}

/// The half session (password done) a request's cookie names.
fn half_session(
    state: &WebState,
    headers: &HeaderMap,
    peer: &Peer,
) -> Result<Option<(String, accounts::Session, accounts::User)>, PageError> {
    let (name, _) = cookie_names(peer.tls);
    let Some(token) = cookie(headers, name) else {
        return Ok(None);
    };
    let cfg = &state.gateway.config().inbox;
    let found = state.gateway.commit(|tx| {
        let now = crate::gateway::tx_now(tx)?;
        accounts::tx_session(tx, cfg, now.micros, &token)
    })?;
    Ok(found.map(|(s, u)| (token, s, u)))
}

fn code_page(
    status: StatusCode,
    session: &accounts::Session,
    user: &accounts::User,
    error: Option<String>,
) -> PageResult {
    let enrol = if user.totp_enrolled {
        None
    } else {
        let url = accounts::otpauth_url(user)?.unwrap_or_default();
        let svg = accounts::qr_svg(&url)?;
        Some(Enrol {
            qr_data_url: format!(
                "data:image/svg+xml;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(svg)
            ),
            secret: user.totp_secret.clone().unwrap_or_default(),
        })
    };
    page(
        status,
        &CodePage {
            chrome: Chrome::default(),
            csrf: session.csrf.clone(),
            error,
            enrol,
        },
    )
}

pub async fn code_form(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> PageResult {
    match half_session(&state, &headers, &peer)? {
        Some((_, s, u)) if s.full => Ok(redirect(home(u.kind))),
        Some((_, s, u)) => code_page(StatusCode::OK, &s, &u, None),
        None => Ok(redirect("/inbox/sign-in?expired")),
    }
}

#[derive(serde::Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
}

pub async fn code(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> PageResult {
    crate::audit::set_login("110122");
    let Some((token, session, user)) = half_session(&state, &headers, &peer)? else {
        return Ok(redirect("/inbox/sign-in?expired"));
    };
    audit_person(&user);
    if !same(&form.csrf, &session.csrf) {
        return Err(PageError::Csrf);
    }
    if !state.limiter.allow(peer.ip) {
        return code_page(
            StatusCode::TOO_MANY_REQUESTS,
            &session,
            &user,
            Some(capitalise(&SignInError::Throttled.to_string())),
        );
    }
    let cfg = &state.gateway.config().inbox;
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (attempt, fresh) = state.gateway.commit(|tx| {
        let now = crate::gateway::tx_now(tx)?;
        accounts::tx_code_step(tx, cfg, now.micros, unix, &token, &form.code)
    })?;
    state.gateway.store().durable().await.map_err(Error::from)?;
    let (session_name, _) = cookie_names(peer.tls);
    match (attempt.result, fresh) {
        (Ok(()), Some(fresh)) => {
            let mut r = redirect(home(user.kind));
            r.headers_mut().append(
                header::SET_COOKIE,
                set_cookie(session_name, &fresh, peer.tls, None),
            );
            Ok(r)
        }
        (Err(SignInError::Locked), _) => {
            let mut r = sign_in_page(
                &peer,
                StatusCode::UNAUTHORIZED,
                "",
                Some(format!("{}.", capitalise(&SignInError::Locked.to_string()))),
                None,
            )?;
            r.headers_mut().append(
                header::SET_COOKIE,
                set_cookie(session_name, "", peer.tls, Some(0)),
            );
            Ok(r)
        }
        (Err(_), _) => code_page(
            StatusCode::UNAUTHORIZED,
            &session,
            &user,
            Some("The code is not right: enter the 6 digits your app shows now".into()),
        ),
        (Ok(()), None) => Err(PageError::Gateway(Error::Internal(
            "sign-in made no session".into(),
        ))),
    }
}

#[derive(serde::Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

pub async fn sign_out(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<CsrfOnly>,
) -> PageResult {
    crate::audit::set_login("110123");
    let p = signed_in(&state, &headers, &peer).await?;
    if !same(&form.csrf, &p.session.csrf) {
        return Err(PageError::Csrf);
    }
    let (name, _) = cookie_names(peer.tls);
    if let Some(token) = cookie(&headers, name) {
        state
            .gateway
            .commit(|tx| accounts::tx_end_session(tx, &token))?;
        state.gateway.store().durable().await.map_err(Error::from)?;
    }
    let mut r = redirect("/inbox/sign-in?signed-out");
    r.headers_mut()
        .append(header::SET_COOKIE, set_cookie(name, "", peer.tls, Some(0)));
    Ok(r)
}

// ---- The queue ----

struct Row {
    task_id: String,
    name: String,
    needs: Vec<String>,
    urgency: String,
    received_text: String,
    overdue: bool,
    waited_days: i64,
    tag_class: &'static str,
    status_text: &'static str,
    progress: Option<String>,
}

#[derive(Template)]
#[template(path = "inbox/queue.html")]
struct QueuePage {
    chrome: Chrome,
    org_name: String,
    counts: Vec<(&'static str, usize)>,
    overdue: usize,
    response_days: u32,
    items: Vec<Row>,
}

/// Plain English for a Task status, and the NHS.UK tag colour that goes with it.
pub fn status_words(status: &str) -> (&'static str, &'static str) {
    match status {
        "requested" => ("New", "nhsuk-tag--blue"),
        "accepted" => ("Accepted", "nhsuk-tag--aqua-green"),
        "in-progress" => ("In progress", "nhsuk-tag--green"),
        "on-hold" => ("On hold", "nhsuk-tag--yellow"),
        "completed" => ("Completed", "nhsuk-tag--white"),
        "rejected" => ("Declined", "nhsuk-tag--grey"),
        "cancelled" => ("Cancelled by the GP practice", "nhsuk-tag--grey"),
        "failed" => ("Could not be completed", "nhsuk-tag--red"),
        _ => ("Unknown", "nhsuk-tag--grey"),
    }
}

/// "2026-11-20T10:15:00Z" → "20 November 2026" (the date part as given, when not a
/// timestamp).
pub fn date_words(instant: &str) -> String {
    let date = instant.get(..10).unwrap_or(instant);
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let out = time::macros::format_description!("[day padding:none] [month repr:long] [year]");
    time::Date::parse(date, &fmt)
        .ok()
        .and_then(|d| d.format(&out).ok())
        .unwrap_or_else(|| date.to_string())
}

pub async fn queue(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> PageResult {
    let p = person(&state, &headers, &peer).await?;
    crate::audit::set_interaction("search-type", "E");
    let now = now_micros(&state)?;
    let q = state.gateway.inbox_queue(&p.principal, now)?;
    let counts = q
        .counts
        .iter()
        .map(|(s, n)| (status_words(s).0, *n))
        .collect();
    let items: Vec<Row> = q
        .items
        .into_iter()
        .map(|i| {
            let (status_text, tag_class) = status_words(&i.status);
            Row {
                received_text: date_words(&i.received),
                task_id: i.task_id,
                name: i.name,
                needs: i.needs,
                urgency: i.urgency,
                overdue: i.overdue,
                waited_days: i.waited_days,
                tag_class,
                status_text,
                progress: i.progress,
            }
        })
        .collect();
    page(
        StatusCode::OK,
        &QueuePage {
            chrome: p.chrome(),
            org_name: p.org_name.clone(),
            counts,
            overdue: items.iter().filter(|i| i.overdue).count(),
            response_days: q.response_days,
            items,
        },
    )
}

// ---- One referral ----

struct Problem {
    title: String,
    text: String,
    field: Option<String>,
    field_text: String,
}

#[derive(Template)]
#[template(path = "inbox/referral.html")]
struct ReferralPage {
    chrome: Chrome,
    r: ReferralView,
    csrf: String,
    problem: Option<Problem>,
    done: Option<String>,
    tag_class: &'static str,
    status_text: &'static str,
    birth_text: String,
    received_text: String,
    open: bool,
    today: String,
    measures: Vec<(String, String, i64, i64)>,
    chosen_measure: String,
    score_value: String,
    errors: Vec<(String, String)>,
}

impl ReferralPage {
    fn field_error(&self, field: &str) -> Option<&str> {
        super::field_error(&self.errors, field)
    }
}

/// What the person typed, kept when a form comes back with a problem.
#[derive(Default)]
struct Typed {
    measure: String,
    score: String,
}

/// What a referral page says besides the referral: a problem (and the fields it is
/// about), or what was just done; and what the person had typed.
#[derive(Default)]
struct Said {
    problem: Option<Problem>,
    errors: Vec<(String, String)>,
    done: Option<String>,
    typed: Typed,
}

fn referral_page(
    state: &WebState,
    p: &Person,
    task_id: &str,
    status: StatusCode,
    said: Said,
) -> PageResult {
    let Said {
        problem,
        errors,
        done,
        typed,
    } = said;
    let r = state.gateway.inbox_referral(&p.principal, task_id)?;
    let (status_text, tag_class) = status_words(&r.status);
    let measures: Vec<(String, String, i64, i64)> = state
        .gateway
        .config()
        .outcomes
        .iter()
        .map(|o| (o.code.clone(), o.display.clone(), o.min, o.max))
        .collect();
    let today = crate::clock::Now::current()
        .instant
        .get(..10)
        .unwrap_or_default()
        .to_string();
    page(
        status,
        &ReferralPage {
            chrome: p.chrome(),
            csrf: p.session.csrf.clone(),
            problem,
            done,
            tag_class,
            status_text,
            birth_text: date_words(&r.birth_date),
            received_text: date_words(&r.received),
            open: crate::workflow::is_open(&r.status),
            today,
            chosen_measure: if typed.measure.is_empty() {
                measures.first().map(|m| m.0.clone()).unwrap_or_default()
            } else {
                typed.measure
            },
            measures,
            score_value: typed.score,
            errors,
            r,
        },
    )
}

pub async fn referral(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> PageResult {
    let p = person(&state, &headers, &peer).await?;
    crate::audit::set_interaction("read", "R");
    let done = q.as_deref().and_then(|q| {
        Some(
            match q.strip_prefix("done=")? {
                "accept" => "You accepted this referral. The GP practice is told.",
                "decline" => "You declined this referral. The GP practice is told.",
                "contact" => "Contact recorded.",
                "hold" => "The referral is on hold.",
                "resume" => "The referral is in progress again.",
                "outcome" => "Score recorded. The GP practice is sent it.",
                "feedback" => "Feedback sent to the GP practice.",
                "complete" => "The referral is complete. The GP practice is told.",
                _ => return None,
            }
            .to_string(),
        )
    });
    referral_page(
        &state,
        &p,
        &id,
        StatusCode::OK,
        Said {
            done,
            ..Said::default()
        },
    )
}

/// A date as people type it (`21/11/2026`, `2026-11-21`) → `2026-11-21`, not in the future.
fn parse_date(s: &str) -> Result<String, String> {
    let s = s.trim();
    let iso = time::macros::format_description!("[year]-[month]-[day]");
    let uk = time::macros::format_description!("[day padding:none]/[month padding:none]/[year]");
    let d = time::Date::parse(s, &iso)
        .or_else(|_| time::Date::parse(s, &uk))
        .map_err(|_| "Enter a real date, for example 21/11/2026".to_string())?;
    if d > time::OffsetDateTime::now_utc().date() {
        return Err("The date cannot be in the future".into());
    }
    d.format(&iso).map_err(|e| e.to_string())
}

/// What a page form asks for, checked field by field (a problem goes beside its field).
fn action_of(
    action: &str,
    form: &HashMap<String, String>,
    state: &WebState,
) -> Result<Action, Vec<(String, String)>> {
    let get = |k: &str| {
        form.get(k)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let err = |f: &str, m: &str| Err(vec![(f.to_string(), m.to_string())]);
    match action {
        "accept" => Ok(Action::Accept),
        "resume" => Ok(Action::Resume),
        "complete" => Ok(Action::Complete),
        "decline" => {
            let reason = match get("reason").as_str() {
                "patient-declined" => DeclineReason::PatientDeclined,
                "no-capacity" => DeclineReason::NoCapacity,
                "not-eligible" => DeclineReason::NotEligible,
                "other" => DeclineReason::Other,
                _ => return err("reason-patient", "Choose why you are declining"),
            };
            let text = get("text");
            if reason == DeclineReason::Other && text.is_empty() {
                return err("decline-text", "Say why you are declining");
            }
            Ok(Action::Decline { reason, text })
        }
        "contact" => {
            let date = match parse_date(&get("date")) {
                Ok(d) => d,
                Err(m) => return err("contact-date", &m),
            };
            match get("kind").as_str() {
                "made" => Ok(Action::ContactMade { date }),
                _ => Ok(Action::ContactAttempted { date }),
            }
        }
        "hold" => {
            let reason = get("reason");
            if reason.is_empty() {
                return err("hold-reason", "Say why the referral is on hold");
            }
            Ok(Action::Hold { reason })
        }
        "outcome" => {
            let code = get("measure");
            let Some(m) = state
                .gateway
                .config()
                .outcomes
                .iter()
                .find(|o| o.code == code)
            else {
                return err("measure", "Choose a questionnaire from the list");
            };
            let range = format!("Enter a whole number from {} to {}", m.min, m.max);
            let score: i64 = match get("score").parse() {
                Ok(s) => s,
                Err(_) => return err("score", &range),
            };
            if score < m.min || score > m.max {
                return err("score", &range);
            }
            Ok(Action::Outcome { code, score })
        }
        "feedback" => {
            let text = get("text");
            if text.is_empty() {
                return err("feedback", "Enter the feedback for the GP");
            }
            if text.chars().count() > 4000 {
                return err("feedback", "Feedback must be 4,000 characters or fewer");
            }
            Ok(Action::Feedback { text })
        }
        _ => err("", "no such action"),
    }
}

fn issues_text(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| i.diagnostics.clone())
        .collect::<Vec<_>>()
        .join("; ")
}

pub async fn act(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    let p = person(&state, &headers, &peer).await?;
    if !same(
        form.get("csrf").map(String::as_str).unwrap_or_default(),
        &p.session.csrf,
    ) {
        return Err(PageError::Csrf);
    }
    let creates = matches!(action.as_str(), "outcome" | "feedback");
    if creates {
        crate::audit::set_interaction("create", "C");
    } else {
        crate::audit::set_interaction("update", "U");
    }
    let typed = || Typed {
        measure: form.get("measure").cloned().unwrap_or_default(),
        score: form.get("score").cloned().unwrap_or_default(),
    };
    if !matches!(
        action.as_str(),
        "accept" | "decline" | "contact" | "hold" | "resume" | "outcome" | "feedback" | "complete"
    ) {
        return Err(PageError::Gateway(Error::not_found(format!(
            "inbox action {action}"
        ))));
    }
    let version: u64 = form
        .get("version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let todo = match action_of(&action, &form, &state) {
        Ok(a) => a,
        Err(errors) => {
            let first = errors.first().cloned().unwrap_or_default();
            let problem = Problem {
                title: "There is a problem".into(),
                text: "Nothing was changed.".into(),
                field: Some(first.0.clone()).filter(|f| !f.is_empty()),
                field_text: first.1.clone(),
            };
            return referral_page(
                &state,
                &p,
                &id,
                StatusCode::UNPROCESSABLE_ENTITY,
                Said {
                    problem: Some(problem),
                    errors,
                    done: None,
                    typed: typed(),
                },
            );
        }
    };
    match state
        .gateway
        .inbox_act(&p.principal, &id, version, todo)
        .await
    {
        Ok(()) => Ok(redirect(&format!("/inbox/referrals/{id}?done={action}"))),
        Err(Error::PreconditionFailed(_)) => referral_page(
            &state,
            &p,
            &id,
            StatusCode::CONFLICT,
            Said {
                problem: Some(Problem {
                    title: "This referral changed since you opened it".into(),
                    text: "Someone else (or another system) changed it after your page was shown, so your change was not made. This is how it is now: check it, then try again if you still need to.".into(),
                    field: None,
                    field_text: String::new(),
                }),
                errors: vec![],
                done: None,
                typed: typed(),
            },
        ),
        Err(Error::Unprocessable(issues)) | Err(Error::Invalid(issues)) => {
            let score_problem = issues.iter().any(|i| {
                i.expression
                    .as_deref()
                    .is_some_and(|e| e.starts_with("Observation.value"))
            });
            let errors = if score_problem {
                vec![("score".to_string(), issues_text(&issues))]
            } else {
                vec![]
            };
            referral_page(
                &state,
                &p,
                &id,
                StatusCode::UNPROCESSABLE_ENTITY,
                Said {
                    problem: Some(Problem {
                        title: "That could not be done".into(),
                        text: format!("Nothing was changed: {}.", issues_text(&issues)),
                        field: None,
                        field_text: String::new(),
                    }),
                    errors,
                    done: None,
                    typed: typed(),
                },
            )
        }
        Err(e) => Err(PageError::Gateway(e)),
    }
}

/// Unknown pages under `/inbox/` get a plain page, not an OperationOutcome.
pub async fn not_found() -> Response {
    super::message(
        StatusCode::NOT_FOUND,
        "Page not found",
        "There is no page at this address.",
        "/inbox",
        "Go to your referrals",
    )
    .into_response()
}
