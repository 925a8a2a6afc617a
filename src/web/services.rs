//! The inbox's services page: a provider's people see their own directory services and say
//! whether each can take new referrals (Gravity's capacity status). Routing passes over a
//! service that is full or has a waiting list, so this is how a small group with no system
//! stops referrals arriving while it has no room. The use case is the gateway's, the same
//! one `PATCH /fhir/HealthcareService/{id}` reaches.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;

use super::pages::{date_words, person, same};
use super::{message, page, redirect, Chrome, PageError, Peer, Person, WebState};
use crate::directory::CapacityStatus;
use crate::error::Error;

type PageResult = Result<Response, PageError>;

/// One service as the page shows it.
struct Row {
    id: String,
    name: String,
    needs: String,
    areas: String,
    assured: String,
    version: u64,
    /// The stored status in words, and its tag colour.
    status: Option<(&'static str, &'static str)>,
    /// The choice to show as checked: the one just sent (with a problem), else the stored.
    chosen: String,
}

#[derive(Template)]
#[template(path = "inbox/services.html")]
struct ServicesPage {
    chrome: Chrome,
    org_name: String,
    csrf: String,
    rows: Vec<Row>,
    done: Option<String>,
    /// A problem with one service's form: (service id, message).
    problem: Option<(String, String)>,
    stale: bool,
}

impl ServicesPage {
    fn error_for(&self, id: &str) -> Option<&str> {
        self.problem
            .as_ref()
            .filter(|(s, _)| s == id)
            .map(|(_, m)| m.as_str())
    }
}

/// What the radios offer, in the people's words.
pub fn status_words(c: CapacityStatus) -> (&'static str, &'static str) {
    match c {
        CapacityStatus::Capacity => ("Has room for new referrals", "nhsuk-tag--green"),
        CapacityStatus::Waitlist => ("Full, with a waiting list", "nhsuk-tag--yellow"),
        CapacityStatus::NoCapacity => ("Full", "nhsuk-tag--red"),
    }
}

fn rows(state: &WebState, p: &Person, chosen: Option<(&str, &str)>) -> Result<Vec<Row>, PageError> {
    let cfg = state.gateway.config();
    let own = state.gateway.own_services(&p.principal)?;
    Ok(own
        .into_iter()
        .map(|(s, version)| {
            let local = cfg.directory.services.iter().find(|l| l.id == s.id);
            let needs = local
                .and_then(|l| l.needs.clone())
                .unwrap_or(s.needs.clone());
            let areas = local
                .and_then(|l| l.areas.clone())
                .unwrap_or(s.districts.clone());
            let words = |v: &[String], none: &str| {
                if v.is_empty() {
                    none.to_string()
                } else {
                    v.join(", ")
                }
            };
            let needs: Vec<String> = needs
                .iter()
                .map(|n| cfg.need(n).map(|d| d.display.clone()).unwrap_or(n.clone()))
                .collect();
            let stored = s.capacity.map(|c| c.code().to_string()).unwrap_or_default();
            Row {
                chosen: match chosen {
                    Some((id, c)) if id == s.id => c.to_string(),
                    _ => stored,
                },
                needs: words(&needs, "Not said"),
                areas: words(&areas, "Not said"),
                assured: s
                    .assured
                    .map(|d| date_words(&d.to_string()))
                    .unwrap_or_else(|| "Not assured".into()),
                version,
                status: s.capacity.map(status_words),
                id: s.id,
                name: s.name,
            }
        })
        .collect())
}

fn services_page(
    state: &WebState,
    p: &Person,
    status: StatusCode,
    done: Option<String>,
    problem: Option<(String, String)>,
    chosen: Option<(&str, &str)>,
    stale: bool,
) -> PageResult {
    page(
        status,
        &ServicesPage {
            chrome: p.chrome(),
            org_name: p.org_name.clone(),
            csrf: p.session.csrf.clone(),
            rows: rows(state, p, chosen)?,
            done,
            problem,
            stale,
        },
    )
}

/// `GET /inbox/services`
pub async fn list(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> PageResult {
    let p = person(&state, &headers, &peer).await?;
    crate::audit::set_interaction("search-type", "E");
    let said: HashMap<String, String> = q
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let status = said.get("done").and_then(|c| CapacityStatus::parse(c));
    let name = said.get("service").and_then(|id| {
        let dir = state.gateway.directory();
        dir.services.get(id).map(|s| s.name.clone())
    });
    let done = status.map(|c| {
        format!(
            "Saved: {} is now shown as “{}”.",
            name.as_deref().unwrap_or("the service"),
            status_words(c).0
        )
    });
    services_page(&state, &p, StatusCode::OK, done, None, None, false)
}

/// `POST /inbox/services/{id}`: `csrf`, `version`, `status` (a Gravity code).
pub async fn set(
    State(state): State<WebState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    let p = person(&state, &headers, &peer).await?;
    if !same(
        form.get("csrf").map(String::as_str).unwrap_or_default(),
        &p.session.csrf,
    ) {
        return Err(PageError::Csrf);
    }
    crate::audit::set_interaction("update", "U");
    let code = form.get("status").map(|s| s.trim()).unwrap_or_default();
    let Some(status) = CapacityStatus::parse(code) else {
        return services_page(
            &state,
            &p,
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            Some((
                id.clone(),
                "Choose whether the service can take new referrals".into(),
            )),
            Some((&id, "")),
            false,
        );
    };
    let version: u64 = form
        .get("version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match state
        .gateway
        .set_service_capacity(&p.principal, &id, version, Some(status))
        .await
    {
        Ok(_) => Ok(redirect(&format!(
            "/inbox/services?done={}&service={id}",
            status.code()
        ))),
        Err(Error::NotFound(_)) => Ok(message(
            StatusCode::NOT_FOUND,
            "Service not found",
            "There is no service here for your group. It may belong to another group, or the link may be wrong. Nothing was changed.",
            "/inbox/services",
            "Go to your services",
        )),
        Err(Error::PreconditionFailed(_)) => services_page(
            &state,
            &p,
            StatusCode::CONFLICT,
            None,
            None,
            None,
            true,
        ),
        Err(e) => Err(PageError::Gateway(e)),
    }
}
