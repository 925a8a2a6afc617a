//! The public self-referral page (`/refer`): a person refers themselves, or someone they
//! care for, with no account.
//!
//! Owns the form (`templates/refer/`), reading what the browser sent, the limits per
//! address and overall, and the confirmation, which shows the reference number and nothing
//! the person typed (the URL stays `/refer`: nothing about them is in it). What counts as a
//! good referral is `gateway::self_referral`'s; this module only shows its answer.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::{message, page, PageError, Peer, WebState};
use crate::accounts::AddressLimiter;
use crate::error::Error;
use crate::gateway::self_referral::{self, SelfReferral};

/// The limits on self-referrals: per address, and from everyone together.
pub struct ReferLimits {
    per_address: AddressLimiter,
    overall: AddressLimiter,
}

impl ReferLimits {
    pub fn new(cfg: &crate::config::ReferConfig) -> Arc<ReferLimits> {
        Arc::new(ReferLimits {
            per_address: AddressLimiter::per_window(cfg.per_address_per_hour, 3600),
            overall: AddressLimiter::per_window(cfg.per_hour, 3600),
        })
    }

    fn allow(&self, ip: std::net::IpAddr) -> bool {
        // Everyone together counts as one address.
        self.per_address.allow(ip) && self.overall.allow(std::net::Ipv4Addr::UNSPECIFIED.into())
    }
}

#[derive(Template)]
#[template(path = "refer/form.html")]
struct FormPage {
    token: String,
    hub: String,
    f: SelfReferral,
    /// (field, message), in the form's order.
    errors: Vec<(String, String)>,
    /// (name, what the page calls it).
    needs: Vec<(String, String)>,
    /// (ODS code, name).
    practices: Vec<(String, String)>,
}

impl FormPage {
    fn err(&self, field: &str) -> Option<&str> {
        super::field_error(&self.errors, field)
    }
}

#[derive(Template)]
#[template(path = "refer/done.html")]
struct DonePage {
    reference: String,
    hub: String,
    days: u32,
}

#[derive(Template)]
#[template(path = "refer/privacy.html")]
struct PrivacyPage {
    hub: String,
}

type PageResult = Result<Response, PageError>;

fn hub(state: &WebState) -> String {
    let cfg = state.gateway.config();
    cfg.provider(&cfg.routing.fallback_provider)
        .map(|p| p.name.clone())
        .unwrap_or_else(|| "the link-worker team".into())
}

fn form_page(state: &WebState, f: SelfReferral, errors: Vec<(String, String)>) -> FormPage {
    let cfg = state.gateway.config();
    let token = if f.token.is_empty() {
        self_referral::new_token()
    } else {
        f.token.clone()
    };
    FormPage {
        token,
        hub: hub(state),
        f,
        errors,
        needs: cfg
            .needs
            .iter()
            .map(|n| (n.name.clone(), n.display.clone()))
            .collect(),
        practices: cfg
            .practices
            .iter()
            .map(|p| (p.ods.clone(), p.name.clone()))
            .collect(),
    }
}

fn closed() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "This page is not available",
        "Self-referral is not offered here. Ask your GP practice or a local community group to refer you.",
        "/refer",
        "Go back",
    )
}

/// `GET /refer`: an empty form with a fresh token.
pub async fn form(State(state): State<WebState>) -> PageResult {
    if !state.gateway.config().refer.enabled {
        return Ok(closed());
    }
    page(
        StatusCode::OK,
        &form_page(&state, SelfReferral::default(), Vec::new()),
    )
}

/// `GET /refer/privacy`: the privacy notice.
pub async fn privacy(State(state): State<WebState>) -> PageResult {
    page(StatusCode::OK, &PrivacyPage { hub: hub(&state) })
}

/// What the browser sent, field by field (checkboxes repeat `needs`).
fn read_form(pairs: Vec<(String, String)>) -> SelfReferral {
    let mut f = SelfReferral::default();
    for (k, v) in pairs {
        // Nothing longer than a field could need is kept (the gateway refuses it anyway).
        let v: String = v.chars().take(4000).collect();
        match k.as_str() {
            "token" => f.token = v,
            "for_whom" => f.for_whom = v,
            "carer_name" => f.carer_name = v,
            "carer_relationship" => f.carer_relationship = v,
            "carer_phone" => f.carer_phone = v,
            "given_name" => f.given_name = v,
            "family_name" => f.family_name = v,
            "dob_day" => f.dob_day = v,
            "dob_month" => f.dob_month = v,
            "dob_year" => f.dob_year = v,
            "postcode" => f.postcode = v,
            "phone" => f.phone = v,
            "email" => f.email = v,
            "needs" if f.needs.len() < 50 => f.needs.push(v),
            "more" => f.more = v,
            "nhs_number" => f.nhs_number = v,
            "practice" => f.practice = v,
            "consent_share" => f.consent_share = v == "yes",
            "consent_gp" => f.consent_gp = v == "yes",
            _ => {}
        }
    }
    f
}

/// `POST /refer`: the referral is checked and written, and the person sees their reference
/// number; a form with faults comes back with each one named beside its field, and nothing
/// is written.
pub async fn submit(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> PageResult {
    let cfg = state.gateway.config();
    if !cfg.refer.enabled {
        return Ok(closed());
    }
    crate::audit::set_interaction("create", "C");
    let f = read_form(pairs);
    if !state.refer.allow(peer.ip) {
        return Ok(message(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            "We have had too many requests from here in the last hour. Nothing was sent. Try again later, or ask your GP practice to refer you.",
            "/refer",
            "Go back to the form",
        ));
    }
    match state.gateway.self_refer(&f).await {
        Ok(done) => page(
            StatusCode::OK,
            &DonePage {
                reference: done.reference,
                hub: hub(&state),
                days: cfg
                    .provider(&cfg.routing.fallback_provider)
                    .map(|p| p.response_days)
                    .unwrap_or(5),
            },
        ),
        Err(Error::Unprocessable(issues)) => {
            let errors = issues
                .into_iter()
                .map(|i| (i.expression.unwrap_or_default(), i.diagnostics))
                .collect();
            page(StatusCode::UNPROCESSABLE_ENTITY, &form_page(&state, f, errors))
        }
        Err(Error::Conflict(_)) => Ok(message(
            StatusCode::CONFLICT,
            "This form was already sent",
            "This form was sent before with other answers, so nothing new was sent. To ask again, start a new form.",
            "/refer",
            "Start a new form",
        )),
        Err(Error::InsufficientStorage) => Ok(message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sorry, we cannot take requests just now",
            "Nothing was sent. Try again later, or ask your GP practice to refer you.",
            "/refer",
            "Go back to the form",
        )),
        Err(e) => {
            let busy = matches!(e, Error::Store(_) | Error::Overloaded);
            if !busy {
                tracing::error!(error = %e, "self-referral failed");
            }
            Ok(message(
                if busy {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                },
                "Sorry, something went wrong",
                "Your request may not have been sent. Go back and send the same form again: it will not be sent twice.",
                "/refer",
                "Go back to the form",
            ))
        }
    }
}
