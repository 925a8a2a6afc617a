//! The provider inbox over real HTTP, as a browser without JavaScript uses it: forms,
//! cookies, redirects. (`tests/inbox_browser.rs` drives the same pages in chromium.)
//!
//! The whole loop (sign in with password and TOTP, the queue, accept, contact, a refused
//! and an accepted score, complete, and the GP system seeing it over FHIR), and every
//! refusal: another group's referral, a form without its CSRF token, an expired session,
//! the sixth wrong password, a stale page, and patient text that holds markup.

use std::collections::HashMap;

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::Value;

use crate::common::*;

const GP: &str = "demo-gp-token";
const CRAFTS: &str = "crafts@demo.sp-gateway.example.org";
const CRAFTS_PASSWORD: &str = "demo-crafts-password";
const MONEY: &str = "money@demo.sp-gateway.example.org";
const MONEY_PASSWORD: &str = "demo-money-password";

/// The demo person's TOTP secret, read from the demo config (as README tells people to).
pub fn secret_of(email: &str) -> String {
    let cfg = sp_gateway::config::Config::parse(&demo_config_with_people(), "demo").expect("cfg");
    cfg.inbox
        .demo_users
        .iter()
        .find(|d| d.email == email)
        .map(|d| d.totp_secret.clone())
        .expect("demo person")
}

pub fn code_now(secret: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    sp_gateway::accounts::totp_code(secret, now).expect("code")
}

/// A browser: keeps cookies, does not follow redirects (so tests see them).
pub struct Browser {
    base: String,
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

impl Page {
    /// The value of the first hidden input `name` on the page.
    pub fn hidden(&self, name: &str) -> String {
        let needle = format!("name=\"{name}\" value=\"");
        let at = self
            .body
            .find(&needle)
            .unwrap_or_else(|| panic!("no {name} on the page: {}", self.body));
        let rest = &self.body[at + needle.len()..];
        rest[..rest.find('"').expect("quote")].to_string()
    }
}

impl Browser {
    pub fn new(base: &str) -> Browser {
        Browser {
            base: base.to_string(),
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .expect("client"),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn take(&mut self, r: reqwest::Response) -> Page {
        for c in r.headers().get_all(SET_COOKIE) {
            let c = c.to_str().expect("cookie");
            let first = c.split(';').next().unwrap_or_default();
            let (k, v) = first.split_once('=').expect("name=value");
            assert!(c.contains("HttpOnly"), "cookie {k} is HttpOnly");
            assert!(
                c.contains("SameSite=Strict"),
                "cookie {k} is SameSite=Strict"
            );
            if c.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), v.to_string());
            }
        }
        Page {
            status: r.status().as_u16(),
            location: r
                .headers()
                .get(LOCATION)
                .map(|l| l.to_str().expect("location").to_string()),
            body: r.text().await.expect("body"),
        }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .send()
            .await
            .expect("get");
        self.take(r).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("post");
        self.take(r).await
    }

    /// The password step: the sign-in form, filled in and sent.
    pub async fn password_step(&mut self, email: &str, password: &str) -> Page {
        let form = self.get("/inbox/sign-in").await;
        assert_eq!(form.status, 200, "{}", form.body);
        let csrf = form.hidden("csrf");
        self.post(
            "/inbox/sign-in",
            &[("csrf", &csrf), ("email", email), ("password", password)],
        )
        .await
    }

    /// Signs in with password and the current TOTP code; panics unless it works.
    pub async fn sign_in(&mut self, email: &str, password: &str, secret: &str) {
        self.sign_in_to(email, password, secret, "/inbox").await
    }

    /// Signs in, and checks the person is taken to `home` (their inbox, or the figures).
    pub async fn sign_in_to(&mut self, email: &str, password: &str, secret: &str, home: &str) {
        let r = self.password_step(email, password).await;
        assert_eq!(r.status, 303, "password step: {}", r.body);
        assert_eq!(r.location.as_deref(), Some("/inbox/sign-in/code"));
        let code_page = self.get("/inbox/sign-in/code").await;
        let csrf = code_page.hidden("csrf");
        let r = self
            .post(
                "/inbox/sign-in/code",
                &[("csrf", &csrf), ("code", &code_now(secret))],
            )
            .await;
        assert_eq!(r.status, 303, "code step: {}", r.body);
        assert_eq!(r.location.as_deref(), Some(home));
    }

    /// Posts an action form of a referral page, with the page's CSRF token and version.
    pub async fn act(&mut self, task: &str, action: &str, extra: &[(&str, &str)]) -> Page {
        let page = self.get(&format!("/inbox/referrals/{task}")).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let (csrf, version) = (page.hidden("csrf"), page.hidden("version"));
        let mut form = vec![("csrf", csrf.as_str()), ("version", version.as_str())];
        form.extend_from_slice(extra);
        self.post(&format!("/inbox/referrals/{task}/{action}"), &form)
            .await
    }
}

async fn start(dir: &std::path::Path) -> TestGateway {
    TestGateway::start_with(dir, demo_config_with_people()).await
}

/// The clinical data's digest: what a refused page action must leave as it was (sessions,
/// accounts and the audit trail may change).
pub fn clinical_digest(gw: &TestGateway) -> String {
    let mut skip: Vec<&[u8]> = sp_gateway::audit::PREFIXES.to_vec();
    skip.extend_from_slice(sp_gateway::accounts::PREFIXES);
    skip.push(b"c/clock");
    gw.gateway
        .as_ref()
        .expect("running")
        .store()
        .digest_excluding(&skip)
        .expect("digest")
}

/// Sign-in and sign-out events (DICOM 110114), newest first.
async fn sign_ins(gw: &TestGateway) -> Vec<Value> {
    audit_events(gw, "action=E&_count=200")
        .await
        .into_iter()
        .filter(|e| e["type"]["code"] == "110114")
        .collect()
}

pub async fn audit_events(gw: &TestGateway, query: &str) -> Vec<Value> {
    let r = gw
        .get("demo-auditor-token", &format!("/fhir/AuditEvent?{query}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.entries()
}

#[tokio::test]
async fn a_group_works_a_referral_in_the_browser_and_the_gp_sees_the_outcome() {
    let dir = tempfile::tempdir().expect("tmp");
    let gw = start(dir.path()).await;
    let (_patient, sr, task) = gw.refer(GP, &fixture("referral-ada.json")).await;

    let mut b = Browser::new(&gw.base);
    // Not signed in: the queue sends the browser to sign in.
    let r = b.get("/inbox").await;
    assert_eq!(r.status, 303);
    assert_eq!(r.location.as_deref(), Some("/inbox/sign-in"));
    b.sign_in(CRAFTS, CRAFTS_PASSWORD, &secret_of(CRAFTS)).await;

    let queue = b.get("/inbox").await;
    assert_eq!(queue.status, 200);
    assert!(queue.body.contains("Referrals for Pendle Crafting Circle"));
    assert!(queue.body.contains("Ada Example"), "{}", queue.body);
    assert!(queue.body.contains(&format!("/inbox/referrals/{task}")));
    assert!(queue.body.contains("<strong>1</strong> New"));

    let page = b.get(&format!("/inbox/referrals/{task}")).await;
    assert_eq!(page.status, 200);
    for shown in [
        "01282 000000",
        "BB9 7SR",
        "Lives alone since her husband died",
        "Nelson Health Centre (P81001)",
        "Dr A Khan (GP)",
        "rule loneliness-pendle",
    ] {
        assert!(page.body.contains(shown), "the page shows {shown}");
    }
    assert!(page.body.contains("content=\"width=device-width"));

    let r = b.act(&task, "accept", &[]).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let done = b.get(r.location.as_deref().expect("to")).await;
    assert!(done.body.contains("You accepted this referral"));

    let r = b
        .act(
            &task,
            "contact",
            &[("date", "21/11/2026"), ("kind", "made")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);

    // A score outside SWEMWBS's 7–35 is refused beside its field, and nothing is written.
    let before = clinical_digest(&gw);
    let r = b
        .act(
            &task,
            "outcome",
            &[("measure", "718466001"), ("score", "99")],
        )
        .await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("id=\"score-error\""), "{}", r.body);
    assert!(r.body.contains("Enter a whole number from 7 to 35"));
    assert!(r.body.contains("value=\"99\""), "what was typed is kept");
    assert_eq!(
        clinical_digest(&gw),
        before,
        "a refused score writes nothing"
    );

    let r = b
        .act(
            &task,
            "outcome",
            &[("measure", "718466001"), ("score", "24")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let r = b.act(&task, "complete", &[]).await;
    assert_eq!(r.status, 303, "{}", r.body);

    // The GP system sees it over FHIR: the Task completed with its outcome, the referral
    // completed, and the SWEMWBS score of 24.
    let t = gw.get(GP, &format!("/fhir/Task/{task}")).await;
    assert_eq!(t.body["status"], "completed", "{}", t.body);
    assert_eq!(
        t.body["businessStatus"]["text"],
        "Contact made on 2026-11-21"
    );
    let obs_ref = t.body["output"][0]["valueReference"]["reference"]
        .as_str()
        .expect("output")
        .to_string();
    let obs = gw.get(GP, &format!("/fhir/{obs_ref}")).await;
    assert_eq!(obs.body["valueInteger"], 24);
    assert_eq!(obs.body["code"]["coding"][0]["code"], "718466001");
    let s = gw.get(GP, &format!("/fhir/ServiceRequest/{sr}")).await;
    assert_eq!(s.body["status"], "completed");

    // The trail names the person, with their organisation, for the changes and the views.
    let events = audit_events(&gw, &format!("entity=Task/{task}")).await;
    let by_person: Vec<&Value> = events
        .iter()
        .filter(|e| e["agent"][0]["who"]["display"] == CRAFTS)
        .collect();
    assert!(
        by_person.len() >= 5,
        "views and changes by the person: {events:?}"
    );
    assert!(by_person
        .iter()
        .all(|e| e["agent"][1]["who"]["reference"] == "Organization/pendle-crafts"));
    let provenance = gw
        .get(
            "demo-auditor-token",
            &format!("/fhir/Provenance?target=Task/{task}"),
        )
        .await;
    assert!(
        provenance
            .entries()
            .iter()
            .any(|e| e["agent"][0]["who"]["display"] == CRAFTS),
        "Provenance names the person: {}",
        provenance.body
    );
    let logins = sign_ins(&gw).await;
    assert!(
        logins
            .iter()
            .any(|e| e["agent"][0]["who"]["display"] == CRAFTS && e["outcome"] == "0"),
        "the sign-in is on the trail: {logins:?}"
    );
}

#[tokio::test]
async fn pages_refuse_what_they_must_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let gw = start(dir.path()).await;
    let mut ada = fixture("referral-ada.json");
    ada["notes"] = Value::String("<script>alert('x')</script> & more".into());
    let (_, _, crafts_task) = gw.refer(GP, &ada).await;
    let mut b = Browser::new(&gw.base);
    b.sign_in(CRAFTS, CRAFTS_PASSWORD, &secret_of(CRAFTS)).await;

    // Markup in what the GP wrote is shown as text.
    let page = b.get(&format!("/inbox/referrals/{crafts_task}")).await;
    assert!(!page.body.contains("<script>alert"), "{}", page.body);
    assert!(
        page.body
            .contains("&#60;script&#62;alert(&#39;x&#39;)&#60;/script&#62; &#38; more")
            || page
                .body
                .contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more")
    );
    let csp = b
        .http
        .get(format!("{}/inbox/sign-in", gw.base))
        .send()
        .await
        .expect("get");
    let csp = csp
        .headers()
        .get("content-security-policy")
        .expect("CSP")
        .to_str()
        .expect("text")
        .to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));

    // A person of another group: the referral is not found, read or changed.
    let mut other = Browser::new(&gw.base);
    other
        .sign_in(MONEY, MONEY_PASSWORD, &secret_of(MONEY))
        .await;
    let r = other.get(&format!("/inbox/referrals/{crafts_task}")).await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("Referral not found"));
    let before = clinical_digest(&gw);
    let csrf = other.get("/inbox").await;
    assert!(!csrf.body.contains("Ada Example"), "not in their queue");
    let token = csrf.hidden("csrf");
    let r = other
        .post(
            &format!("/inbox/referrals/{crafts_task}/accept"),
            &[("csrf", &token), ("version", "1")],
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(clinical_digest(&gw), before);

    // A form without its CSRF token (or with another session's): 403, nothing changed.
    let r = b
        .post(
            &format!("/inbox/referrals/{crafts_task}/accept"),
            &[("version", "1")],
        )
        .await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("Nothing was changed"));
    let r = b
        .post(
            &format!("/inbox/referrals/{crafts_task}/accept"),
            &[("csrf", &token), ("version", "1")],
        )
        .await;
    assert_eq!(r.status, 403, "another session's token");
    assert_eq!(clinical_digest(&gw), before);

    // A stale page: the change is refused and the current state shown.
    let page = b.get(&format!("/inbox/referrals/{crafts_task}")).await;
    let (csrf, version) = (page.hidden("csrf"), page.hidden("version"));
    let r = b.act(&crafts_task, "accept", &[]).await;
    assert_eq!(r.status, 303);
    let r = b
        .post(
            &format!("/inbox/referrals/{crafts_task}/decline"),
            &[
                ("csrf", &csrf),
                ("version", &version),
                ("reason", "no-capacity"),
            ],
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("This referral changed since you opened it"));
    assert!(r.body.contains("Accepted"), "the current state is shown");
    let t = gw.get(GP, &format!("/fhir/Task/{crafts_task}")).await;
    assert_eq!(
        t.body["status"], "accepted",
        "the stale decline was not made"
    );

    // A form's missing field is named beside it, with nothing changed.
    let before = clinical_digest(&gw);
    let r = b.act(&crafts_task, "hold", &[("reason", " ")]).await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("id=\"hold-reason-error\""));
    assert_eq!(clinical_digest(&gw), before);

    // Signing out ends the session: its cookie no longer opens the queue.
    let queue = b.get("/inbox").await;
    let csrf = queue.hidden("csrf");
    let saved = b.cookies.clone();
    let r = b.post("/inbox/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 303);
    b.cookies = saved;
    let r = b.get("/inbox").await;
    assert_eq!(r.status, 303, "the old session cookie is worth nothing");
}

#[tokio::test]
async fn the_sixth_wrong_password_finds_the_account_locked_and_the_trail_says_so() {
    let dir = tempfile::tempdir().expect("tmp");
    let gw = start(dir.path()).await;
    let mut b = Browser::new(&gw.base);
    for attempt in 1..=6 {
        let r = b.password_step(CRAFTS, "not-the-password").await;
        assert_eq!(r.status, 401, "attempt {attempt}");
        let locked = r.body.contains("locked");
        assert_eq!(locked, attempt >= 5, "attempt {attempt}: {}", r.body);
    }
    // Locked: even the right password is refused now.
    let r = b.password_step(CRAFTS, CRAFTS_PASSWORD).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("locked"));
    let failures: Vec<Value> = sign_ins(&gw)
        .await
        .into_iter()
        .filter(|e| e["agent"][0]["who"]["display"] == CRAFTS && e["outcome"] == "4")
        .collect();
    assert_eq!(failures.len(), 7, "every failed sign-in is on the trail");

    // An unknown email gets the same answer as a wrong password.
    let r = b
        .password_step("nobody@example.org", "whatever-it-is")
        .await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("The email or password is not right"));
    // A sign-in form without its pre-session token is refused.
    let r = b
        .post(
            "/inbox/sign-in",
            &[("email", MONEY), ("password", MONEY_PASSWORD)],
        )
        .await;
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn a_session_ends_when_the_clock_passes_its_idle_time_and_when_its_account_is_disabled() {
    let dir = tempfile::tempdir().expect("tmp");
    let gw = start(dir.path()).await;
    let mut b = Browser::new(&gw.base);
    b.sign_in(CRAFTS, CRAFTS_PASSWORD, &secret_of(CRAFTS)).await;
    assert_eq!(b.get("/inbox").await.status, 200);

    // The commit clock jumps 31 minutes on (as after a wall clock stepped forward, or a
    // quiet half hour): the idle timeout (30 minutes) has passed.
    let store = gw.gateway.as_ref().expect("running").store();
    let later = sp_gateway::clock::Now::current().micros + 31 * 60_000_000;
    store
        .transact::<_, sp_gateway::error::Error>(|tx| {
            tx.put(b"c/clock", later.to_string().as_bytes())?;
            Ok(())
        })
        .expect("clock");
    let r = b.get("/inbox").await;
    assert_eq!(r.status, 303, "an idle session has ended");
    assert_eq!(r.location.as_deref(), Some("/inbox/sign-in"));

    // Signed in again; an administrator disables the account: the session ends at once.
    b.sign_in(CRAFTS, CRAFTS_PASSWORD, &secret_of(CRAFTS)).await;
    assert_eq!(b.get("/inbox").await.status, 200);
    sp_gateway::accounts::set_disabled(store, CRAFTS, true).expect("disable");
    assert_eq!(b.get("/inbox").await.status, 303);
}

#[tokio::test]
async fn a_new_person_enrols_their_authenticator_from_a_qr_code() {
    let dir = tempfile::tempdir().expect("tmp");
    let gw = start(dir.path()).await;
    let g = gw.gateway.as_ref().expect("running");
    // A weak password or an unknown provider is refused, and no account is made.
    assert!(sp_gateway::accounts::add(
        g.store(),
        g.config(),
        "new@example.org",
        sp_gateway::accounts::Kind::Provider,
        "pendle-crafts",
        "short"
    )
    .is_err());
    assert!(sp_gateway::accounts::add(
        g.store(),
        g.config(),
        "new@example.org",
        sp_gateway::accounts::Kind::Provider,
        "no-such-group",
        "a long enough password"
    )
    .is_err());
    // A commissioner works for no provider: naming one is refused too.
    assert!(sp_gateway::accounts::add(
        g.store(),
        g.config(),
        "new@example.org",
        sp_gateway::accounts::Kind::Commissioner,
        "pendle-crafts",
        "a long enough password"
    )
    .is_err());
    sp_gateway::accounts::add(
        g.store(),
        g.config(),
        "new@example.org",
        sp_gateway::accounts::Kind::Provider,
        "pendle-crafts",
        "a long enough password",
    )
    .expect("add");
    let mut b = Browser::new(&gw.base);
    let r = b
        .password_step("new@example.org", "a long enough password")
        .await;
    assert_eq!(r.status, 303);
    let enrol = b.get("/inbox/sign-in/code").await;
    assert!(enrol.body.contains("Set up your security code"));
    assert!(enrol.body.contains("src=\"data:image/svg+xml;base64,"));
    let secret = {
        let at = enrol.body.find("<code>").expect("secret shown") + 6;
        enrol.body[at..at + enrol.body[at..].find('<').expect("end")].to_string()
    };
    // A wrong code is refused beside the field; the right one signs in.
    let csrf = enrol.hidden("csrf");
    let r = b
        .post(
            "/inbox/sign-in/code",
            &[("csrf", &csrf), ("code", "000000")],
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("id=\"code-error\""));
    let r = b
        .post(
            "/inbox/sign-in/code",
            &[("csrf", &csrf), ("code", &code_now(&secret))],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(b.get("/inbox").await.status, 200);
    let u = sp_gateway::accounts::list(g.store())
        .expect("list")
        .into_iter()
        .find(|u| u.email == "new@example.org")
        .expect("account");
    assert!(u.totp_enrolled);
    assert!(u.password.starts_with("$argon2id$"), "argon2id");
}

/// A CA and a server certificate for 127.0.0.1, as PEM files in `dir`: (ca, cert, key).
fn smtp_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "sp-gateway SMTP test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("cert");
    let paths = (
        dir.join("ca.pem"),
        dir.join("smtp.pem"),
        dir.join("smtp-key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    paths
}

async fn email_view(gw: &TestGateway) -> Value {
    let r = gw.get("demo-admin-token", "/admin/outbox").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["email"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["provider"] == "pendle-crafts"))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn new_referrals_are_emailed_to_the_group_once_per_interval_with_no_patient_data() {
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let python = crate::conformance::python_tool(&target.join("smtp-tools"), "aiosmtpd==1.4.6");
    let dir = tempfile::tempdir().expect("tmp");
    let (ca, cert, key) = smtp_pki(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let config = demo_config_with_people()
        .replacen(
            "id = \"pendle-crafts\"",
            "id = \"pendle-crafts\"\nemail = \"crafts-group@example.org\"",
            1,
        )
        .replacen(
            "[inbox]\n",
            &format!(
                "[inbox]\n\n[inbox.email]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\n\
                 ca_file = \"{}\"\nfrom = \"Referrals <referrals@example.org>\"\n\
                 base_url = \"https://referrals.example.org\"\ninterval_secs = 3600\npoll_ms = 100\n\n",
                ca.display()
            ),
            1,
        );
    let data = dir.path().join("data");
    let gw = TestGateway::start_with(&data, config).await;

    // The SMTP server is not up: referrals are taken at once all the same, and the
    // operator sees the group's email failing.
    let started = std::time::Instant::now();
    gw.refer(GP, &fixture("referral-ada.json")).await;
    gw.refer(
        GP,
        &variant(
            "referral-ada.json",
            "EMIS-2026-EMAIL-2",
            Some(&nhs_number(41)),
        ),
    )
    .await;
    assert!(
        started.elapsed().as_secs() < 5,
        "referrals do not wait for email"
    );
    let mut failing = Value::Null;
    for _ in 0..100 {
        failing = email_view(&gw).await;
        if failing["consecutive_failures"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        failing["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("SMTP")),
        "the admin view shows the failure: {failing}"
    );
    assert_eq!(failing["untold"], 2);

    // Now a real SMTP server (STARTTLS required) comes up: one email, for both referrals.
    let out = dir.path().join("mail");
    let script = std::path::Path::new(crate::common::ROOT).join("tests/inbox/smtp_server.py");
    let mut smtp = std::process::Command::new(&python)
        .arg(&script)
        .arg(port.to_string())
        .arg(&cert)
        .arg(&key)
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("aiosmtpd");
    let mut mails = Vec::new();
    for _ in 0..300 {
        mails = std::fs::read_dir(&out)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        if !mails.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(mails.len(), 1, "one email");
    let mail = std::fs::read_to_string(&mails[0]).expect("mail");
    assert!(
        mail.contains("X-Test-TLS: yes"),
        "sent over STARTTLS: {mail}"
    );
    assert!(mail.contains("X-Test-Rcpt: crafts-group@example.org"));
    assert!(
        mail.contains("Subject: 2 new referrals are waiting for Pendle Crafting Circle"),
        "{mail}"
    );
    assert!(mail.contains("https://referrals.example.org/inbox"));
    for private in [
        "Ada",
        "Example",
        "9990000018",
        "BB9",
        "01282",
        "onel",
        "Lives alone",
        "1948",
    ] {
        assert!(
            !mail.contains(private),
            "the email holds no patient data ({private}): {mail}"
        );
    }
    // The server has the message once it has its data; the gateway records the send after
    // the server's answer and QUIT, a moment later (longer on a loaded machine).
    let mut ok = email_view(&gw).await;
    for _ in 0..300 {
        if ok["last_sent"].is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ok = email_view(&gw).await;
    }
    assert_eq!(ok["consecutive_failures"], 0, "{ok}");
    assert!(ok["last_sent"].is_string(), "{ok}");

    // A third referral within the interval: no second email yet; the operator sees it
    // waiting to be told.
    gw.refer(
        GP,
        &variant(
            "referral-ada.json",
            "EMIS-2026-EMAIL-3",
            Some(&nhs_number(42)),
        ),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let count = std::fs::read_dir(&out).expect("mail dir").count();
    assert_eq!(count, 1, "at most one email per interval");
    assert_eq!(email_view(&gw).await["untold"], 1);
    let _ = smtp.kill();
    let _ = smtp.wait();
}

#[tokio::test]
async fn a_decline_for_capacity_goes_to_the_fallback_hub_and_a_patient_decline_ends_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let gw = start(dir.path()).await;
    let (_, sr, task) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let mut b = Browser::new(&gw.base);
    b.sign_in(CRAFTS, CRAFTS_PASSWORD, &secret_of(CRAFTS)).await;
    // "Other" needs words: refused beside the field, nothing written.
    let before = clinical_digest(&gw);
    let r = b.act(&task, "decline", &[("reason", "other")]).await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("Say why you are declining"));
    assert_eq!(clinical_digest(&gw), before);
    let r = b.act(&task, "decline", &[("reason", "no-capacity")]).await;
    assert_eq!(r.status, 303, "{}", r.body);

    // The GP sees the group's Task rejected, the referral still active, now with the hub,
    // and a new Task for the hub.
    let t = gw.get(GP, &format!("/fhir/Task/{task}")).await;
    assert_eq!(t.body["status"], "rejected");
    assert_eq!(t.body["statusReason"]["coding"][0]["code"], "no-capacity");
    let s = gw.get(GP, &format!("/fhir/ServiceRequest/{sr}")).await;
    assert_eq!(s.body["status"], "active", "the referral goes on");
    assert_eq!(
        s.body["performer"][0]["reference"],
        "Organization/pendle-cvs-hub"
    );
    let tasks = gw
        .get(GP, &format!("/fhir/Task?focus=ServiceRequest/{sr}"))
        .await;
    let hub_task = tasks
        .entries()
        .into_iter()
        .find(|t| t["owner"]["reference"] == "Organization/pendle-cvs-hub")
        .expect("a Task for the hub");
    assert_eq!(hub_task["status"], "requested");
    let hub_id = hub_task["id"].as_str().expect("id").to_string();

    // The hub's person finds it in their queue, and reads why it came to them.
    let mut hub = Browser::new(&gw.base);
    hub.sign_in(
        "hub@demo.sp-gateway.example.org",
        "demo-hub-password",
        &secret_of("hub@demo.sp-gateway.example.org"),
    )
    .await;
    let q = hub.get("/inbox").await;
    assert!(
        q.body.contains(&format!("/inbox/referrals/{hub_id}")),
        "{}",
        q.body
    );
    let page = hub.get(&format!("/inbox/referrals/{hub_id}")).await;
    assert!(
        page.body
            .contains("Pendle Crafting Circle declined it (no capacity)"),
        "{}",
        page.body
    );
    // The group that declined no longer has it open.
    let q = b.get("/inbox").await;
    assert!(!q.body.contains(&format!("/inbox/referrals/{task}\"")));

    // At the hub, the person declines: that ends the referral, with the declined record.
    let r = hub
        .act(&hub_id, "decline", &[("reason", "patient-declined")])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let s = gw.get(GP, &format!("/fhir/ServiceRequest/{sr}")).await;
    assert_eq!(s.body["status"], "revoked");
    let obs = gw
        .get(
            GP,
            &format!("/fhir/Observation?based-on=ServiceRequest/{sr}"),
        )
        .await;
    assert!(
        obs.entries()
            .iter()
            .any(|o| o["code"]["coding"][0]["code"] == "871711000000103"),
        "the GP gets 'social prescribing declined': {}",
        obs.body
    );
}

#[test]
fn readme_lists_the_demo_people_as_the_demo_config_has_them() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(crate::common::ROOT).join("README.md"))
            .expect("README");
    let cfg = sp_gateway::config::Config::parse(&demo_config_with_people(), "demo").expect("cfg");
    assert_eq!(
        cfg.inbox.demo_users.len(),
        cfg.providers.len() + 1,
        "one per provider, and a commissioner"
    );
    for d in &cfg.inbox.demo_users {
        let row = format!("| `{}` | `{}` | `{}` |", d.email, d.password, d.totp_secret);
        assert!(readme.contains(&row), "README lists {row}");
    }
}

fn users_cli(base: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["users", "--gateway", base])
        .args(args)
        .env("SP_GATEWAY_ADMIN_TOKEN", "demo-admin-token")
        .current_dir(crate::common::ROOT)
        .output()
        .expect("run sp-gateway users")
}

#[tokio::test]
async fn people_are_managed_on_a_running_gateway_through_its_admin_api() {
    let dir = tempfile::tempdir().expect("tmp");
    let gw = start(dir.path()).await;
    let base = gw.base.clone();
    let run = |args: Vec<&'static str>| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || users_cli(&base, &args))
    };
    // Refused with a reason, and nothing added: an unknown group, a bad address.
    let out = run(vec![
        "add",
        "--provider",
        "no-such-group",
        "--email",
        "sam@example.org",
    ])
    .await
    .expect("cli");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("names no provider"));
    let out = run(vec![
        "add",
        "--provider",
        "pendle-crafts",
        "--email",
        "not-an-address",
    ])
    .await
    .expect("cli");
    assert_eq!(out.status.code(), Some(2));
    let list = run(vec!["list"]).await.expect("cli");
    assert!(!String::from_utf8_lossy(&list.stdout).contains("sam@example.org"));

    let out = run(vec![
        "add",
        "--provider",
        "pendle-crafts",
        "--email",
        "sam@example.org",
    ])
    .await
    .expect("cli");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once; pass it on safely): "))
        .expect("a first password")
        .to_string();
    // A commissioner works for no provider: one or the other, never both.
    let out = run(vec![
        "add",
        "--commissioner",
        "--provider",
        "pendle-crafts",
        "--email",
        "kim@example.org",
    ])
    .await
    .expect("cli");
    assert_eq!(out.status.code(), Some(2));
    let out = run(vec!["add", "--commissioner", "--email", "kim@example.org"])
        .await
        .expect("cli");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kim@example.org ((commissioner)): done"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let list = run(vec!["list"]).await.expect("cli");
    assert!(String::from_utf8_lossy(&list.stdout).contains("kim@example.org\t(commissioner)\t"));
    // Without the admin token the API refuses.
    let r = gw.get("demo-provider-crafts-token", "/admin/users").await;
    assert_eq!(r.status, 403);

    // Sam signs in with it and is asked to set up a security code.
    let mut b = Browser::new(&gw.base);
    let r = b.password_step("sam@example.org", &password).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(b
        .get("/inbox/sign-in/code")
        .await
        .body
        .contains("Set up your security code"));

    let out = run(vec!["disable", "--email", "sam@example.org"])
        .await
        .expect("cli");
    assert!(out.status.success());
    let list = run(vec!["list"]).await.expect("cli");
    assert!(String::from_utf8_lossy(&list.stdout)
        .contains("sam@example.org\tpendle-crafts\tenrolled=false disabled=true"));
    // Disabled: the half-signed-in session is over.
    let r = b.get("/inbox/sign-in/code").await;
    assert_eq!(r.status, 303);
    // Only someone with the password learns that the account is disabled.
    let r = b
        .password_step("sam@example.org", "not-sams-password")
        .await;
    assert!(
        r.body.contains("The email or password is not right"),
        "{}",
        r.body
    );
    let r = b.password_step("sam@example.org", &password).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("This account is disabled"), "{}", r.body);
}

#[tokio::test]
async fn an_address_that_tries_too_often_waits_and_a_late_referral_is_marked() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = demo_config_with_people()
        .replacen(
            "[inbox]\n",
            "[inbox]\nattempts_per_address_per_minute = 3\n",
            1,
        )
        // A group that promises to answer the same day: a new referral is already late.
        .replacen(
            "id = \"pendle-crafts\"",
            "id = \"pendle-crafts\"\nresponse_days = 0",
            1,
        );
    let gw = TestGateway::start_with(dir.path(), config).await;
    gw.refer(GP, &fixture("referral-ada.json")).await;
    let mut b = Browser::new(&gw.base);
    for _ in 0..3 {
        let r = b.password_step(MONEY, "wrong-password-here").await;
        assert_eq!(r.status, 401);
    }
    // The fourth attempt from this address within the minute: refused before any check,
    // even with the right password of another account.
    let r = b.password_step(CRAFTS, CRAFTS_PASSWORD).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("too many attempts from this address"));
    let money = sp_gateway::accounts::list(gw.gateway.as_ref().expect("running").store())
        .expect("list")
        .into_iter()
        .find(|u| u.email == MONEY)
        .expect("account");
    assert_eq!(
        money.failures, 3,
        "the throttled attempt did not count against anyone"
    );

    let dir2 = tempfile::tempdir().expect("tmp");
    let gw2 = TestGateway::start_with(
        dir2.path(),
        demo_config_with_people().replacen(
            "id = \"pendle-crafts\"",
            "id = \"pendle-crafts\"\nresponse_days = 0",
            1,
        ),
    )
    .await;
    gw2.refer(GP, &fixture("referral-ada.json")).await;
    let mut b = Browser::new(&gw2.base);
    b.sign_in(CRAFTS, CRAFTS_PASSWORD, &secret_of(CRAFTS)).await;
    let q = b.get("/inbox").await;
    assert!(q.body.contains("Waiting too long"), "{}", q.body);
    assert!(q.body.contains("Waiting 0 days"));
}
