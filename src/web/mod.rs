//! Pages for people in a browser, over the same `gateway` use cases as the FHIR API: the
//! provider inbox (`/inbox`) for small groups with no system of their own (its services'
//! capacity in `services`), the commissioner's figures (`/reports`, in `reports`, charts
//! in `charts`), and the public self-referral page (`/refer`, in `refer`).
//!
//! Owns: the page routes, sessions as cookies (`HttpOnly`, `SameSite=Strict`, `Secure`
//! over TLS), the CSRF token on every form, turning a person's session into the provider
//! [`Principal`] the gateway scopes by, rendering templates (`templates/inbox/`, askama,
//! escaped by default), the vendored NHS.UK frontend assets, and the one mapping of errors
//! to plain pages. It must not hold business rules (those are `gateway`'s and `workflow`'s)
//! nor touch the store except through `accounts` and `gateway`.

mod charts;
mod pages;
mod refer;
mod reports;
mod services;

use std::net::IpAddr;
use std::sync::Arc;

use askama::Template;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::accounts::{self, AddressLimiter};
use crate::auth::Principal;
use crate::config::Role;
use crate::error::Error;
use crate::gateway::Gateway;

/// What the page handlers share.
#[derive(Clone)]
pub struct WebState {
    pub gateway: Arc<Gateway>,
    limiter: Arc<AddressLimiter>,
    refer: Arc<refer::ReferLimits>,
}

impl WebState {
    pub fn new(gateway: Arc<Gateway>) -> WebState {
        let per_minute = gateway.config().inbox.attempts_per_address_per_minute;
        let refer = refer::ReferLimits::new(&gateway.config().refer);
        WebState {
            gateway,
            limiter: Arc::new(AddressLimiter::new(per_minute)),
            refer,
        }
    }
}

/// What the connection says about the browser: its address, and whether it came over TLS.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub ip: IpAddr,
    pub tls: bool,
}

/// The page routes (`/inbox…`) and the assets they use (`/assets/…`).
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/inbox", get(pages::queue))
        .route("/inbox/", get(pages::queue))
        .route(
            "/inbox/sign-in",
            get(pages::sign_in_form).post(pages::sign_in),
        )
        .route(
            "/inbox/sign-in/code",
            get(pages::code_form).post(pages::code),
        )
        .route("/inbox/sign-out", post(pages::sign_out))
        .route("/inbox/referrals/{id}", get(pages::referral))
        .route("/inbox/referrals/{id}/{action}", post(pages::act))
        .route("/inbox/services", get(services::list))
        .route("/inbox/services/{id}", post(services::set))
        .route("/inbox/{*rest}", get(pages::not_found))
        .route("/reports", get(reports::show))
        .route("/reports/{file}", get(reports::csv))
        .route("/refer", get(refer::form).post(refer::submit))
        .route("/refer/privacy", get(refer::privacy))
        .route("/assets/{*path}", get(asset))
        .with_state(state)
}

pub const SESSION_COOKIE: &str = "sp_inbox";
pub const SECURE_SESSION_COOKIE: &str = "__Host-sp_inbox";
/// The sign-in form's CSRF token before there is a session (double-submit cookie).
pub const PRE_COOKIE: &str = "sp_inbox_pre";
pub const SECURE_PRE_COOKIE: &str = "__Host-sp_inbox_pre";

fn cookie_names(tls: bool) -> (&'static str, &'static str) {
    if tls {
        (SECURE_SESSION_COOKIE, SECURE_PRE_COOKIE)
    } else {
        (SESSION_COOKIE, PRE_COOKIE)
    }
}

/// The value of cookie `name`, if the browser sent it.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, path `/`, and `Secure` over TLS.
/// `max_age` 0 removes the cookie; `None` makes it last as long as the browser session.
pub fn set_cookie(name: &str, value: &str, tls: bool, max_age: Option<u64>) -> HeaderValue {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if tls {
        c.push_str("; Secure");
    }
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static("x=; Max-Age=0"))
}

/// A signed-in person, as the gateway sees them: a provider principal, plus what the pages
/// need.
#[derive(Clone, Debug)]
pub struct Person {
    pub principal: Principal,
    pub user: accounts::User,
    pub session: accounts::Session,
    pub org_name: String,
}

impl Person {
    pub fn chrome(&self) -> Chrome {
        Chrome {
            who: Some(ChromeWho {
                home: home(self.user.kind),
                org_name: self.org_name.clone(),
                email: self.user.email.clone(),
                csrf: self.session.csrf.clone(),
            }),
        }
    }
}

/// What every page's frame shows.
#[derive(Clone, Debug, Default)]
pub struct Chrome {
    pub who: Option<ChromeWho>,
}

#[derive(Clone, Debug)]
pub struct ChromeWho {
    /// Where the service name in the header leads.
    pub home: &'static str,
    pub org_name: String,
    pub email: String,
    pub csrf: String,
}

/// The principal a person acts as: a provider's person is scoped exactly as their
/// organisation's system is; a commissioner exactly as a commissioner's system (figures
/// only, no patient).
pub fn principal_of(user: &accounts::User) -> Principal {
    match user.kind {
        accounts::Kind::Provider => Principal {
            client_id: format!("person/{}", user.id),
            role: Role::Provider,
            practices: Vec::new(),
            provider: Some(user.provider.clone()),
        },
        accounts::Kind::Commissioner => Principal {
            client_id: format!("person/{}", user.id),
            role: Role::Commissioner,
            practices: Vec::new(),
            provider: None,
        },
    }
}

/// Where a person of `kind` starts: their referrals, or the figures.
pub fn home(kind: accounts::Kind) -> &'static str {
    match kind {
        accounts::Kind::Provider => "/inbox",
        accounts::Kind::Commissioner => "/reports",
    }
}

/// Why a page could not be shown: each becomes a plain page with the right status.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("sign in first")]
    SignIn,
    /// The person signed in is of another kind: their own pages are there.
    #[error("not a page for this account")]
    Elsewhere(&'static str),
    #[error("the form was not sent from this site's page")]
    Csrf,
    #[error("{0}")]
    Gateway(#[from] Error),
    #[error("the page could not be drawn: {0}")]
    Render(#[from] askama::Error),
}

#[derive(Template)]
#[template(path = "inbox/message.html")]
struct MessagePage<'a> {
    chrome: Chrome,
    heading: &'a str,
    message: &'a str,
    link: &'a str,
    link_text: &'a str,
}

/// A plain page saying what went wrong, with the status that goes with it.
pub fn message(
    status: StatusCode,
    heading: &str,
    text: &str,
    link: &str,
    link_text: &str,
) -> Response {
    let page = MessagePage {
        chrome: Chrome::default(),
        heading,
        message: text,
        link,
        link_text,
    };
    match page.render() {
        Ok(html) => html_response(status, html),
        Err(_) => (status, heading.to_string()).into_response(),
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn => redirect("/inbox/sign-in"),
            PageError::Elsewhere(to) => redirect(to),
            PageError::Csrf => message(
                StatusCode::FORBIDDEN,
                "This form has expired",
                "The form was not sent from a page of this site, or it is too old. Nothing was changed. Go back, reload the page and try again.",
                "/inbox",
                "Go to your referrals",
            ),
            PageError::Render(e) => {
                tracing::error!(error = %e, "page render failed");
                message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Sorry, something went wrong",
                    "The page could not be shown. Try again in a moment.",
                    "/inbox",
                    "Go to your referrals",
                )
            }
            PageError::Gateway(e) => match e {
                Error::NotFound(_) => message(
                    StatusCode::NOT_FOUND,
                    "Referral not found",
                    "There is no referral here for your group. It may belong to another group, or the link may be wrong.",
                    "/inbox",
                    "Go to your referrals",
                ),
                Error::Forbidden => message(
                    StatusCode::FORBIDDEN,
                    "You cannot do that",
                    "Your account is not allowed to do this.",
                    "/inbox",
                    "Go to your referrals",
                ),
                Error::Overloaded | Error::Store(_) => message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sorry, the service is busy",
                    "Nothing was changed. Try again in a minute.",
                    "/inbox",
                    "Go to your referrals",
                ),
                other => {
                    tracing::error!(error = %other, "page failed");
                    message(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Sorry, something went wrong",
                        "Nothing may have been changed. Go back to your referrals and check.",
                        "/inbox",
                        "Go to your referrals",
                    )
                }
            },
        }
    }
}

/// The message of a form's fault at `field`, among (field, message) pairs.
pub fn field_error<'a>(errors: &'a [(String, String)], field: &str) -> Option<&'a str> {
    errors
        .iter()
        .find(|(f, _)| f == field)
        .map(|(_, m)| m.as_str())
}

/// Headers every page carries: nothing from elsewhere, not framed, not cached.
fn html_response(status: StatusCode, html: String) -> Response {
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub fn page(status: StatusCode, t: &impl Template) -> Result<Response, PageError> {
    Ok(html_response(status, t.render()?))
}

/// 303 to `to`, so that a reload does not send a form again.
pub fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const NHSUK_CSS: &[u8] = include_bytes!("../../assets/nhsuk/nhsuk-frontend.min.css");
const INBOX_CSS: &[u8] = include_bytes!("../../assets/inbox.css");

/// The vendored NHS.UK frontend stylesheet, its images, and the inbox's own few rules.
async fn asset(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    let (body, ty): (&'static [u8], &'static str) = match path.as_str() {
        "nhsuk-frontend.min.css" => (NHSUK_CSS, "text/css; charset=utf-8"),
        "inbox.css" => (INBOX_CSS, "text/css; charset=utf-8"),
        p => match nhsuk_image(p) {
            Some(b) => (b, "image/svg+xml"),
            None => return StatusCode::NOT_FOUND.into_response(),
        },
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ty));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The icons the NHS.UK stylesheet refers to (`/assets/images/…`).
fn nhsuk_image(path: &str) -> Option<&'static [u8]> {
    Some(match path {
        "images/nhsuk-icon-arrow-down.svg" => {
            include_bytes!("../../assets/nhsuk/images/nhsuk-icon-arrow-down.svg")
        }
        "images/nhsuk-icon-arrow-up-down.svg" => {
            include_bytes!("../../assets/nhsuk/images/nhsuk-icon-arrow-up-down.svg")
        }
        "images/nhsuk-icon-arrow-up.svg" => {
            include_bytes!("../../assets/nhsuk/images/nhsuk-icon-arrow-up.svg")
        }
        "images/nhsuk-icon-cross.svg" => {
            include_bytes!("../../assets/nhsuk/images/nhsuk-icon-cross.svg")
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_http_only_strict_and_secure_over_tls() {
        let plain = set_cookie(SESSION_COOKIE, "t", false, None);
        let plain = plain.to_str().unwrap_or_default();
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(!plain.contains("Secure"), "loopback plain HTTP");
        let (name, pre) = cookie_names(true);
        assert!(name.starts_with("__Host-") && pre.starts_with("__Host-"));
        let tls = set_cookie(name, "t", true, Some(0));
        let tls = tls.to_str().unwrap_or_default();
        assert!(tls.contains("; Secure") && tls.contains("Path=/") && tls.contains("Max-Age=0"));
    }

    #[test]
    fn a_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sp_inbox=abc; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "missing"), None);
    }
}
