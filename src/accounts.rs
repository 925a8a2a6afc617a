//! People who work a provider's referrals in the browser: their accounts, passwords, second
//! factor and sessions.
//!
//! Owns: accounts (`u/user/{id}`, found by email through `u/email/{email}`), each belonging
//! to one provider organisation; passwords hashed with argon2id (the `argon2` crate's
//! defaults: 19 MiB, 2 passes); TOTP (RFC 6238, SHA-1, 6 digits, 30 s, one step of skew;
//! `totp-rs`) with enrolment; sign-in attempts limited per account (locked after
//! `lock_after` failures in a row, for `lock_minutes`) and per address (in memory); sessions
//! (`u/session/{SHA-256 of the token}`: the token itself is only ever in the person's
//! cookie) with an idle and an absolute timeout, and a CSRF token per session.
//! Time here is the store's commit clock (`gateway::tx_now`, never behind an earlier write),
//! so a wall clock stepped back cannot revive an expired session.
//! It must not know HTTP, pages or referrals; the audit of sign-ins is the caller's.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::InboxConfig;
use crate::error::{Error, Result};
use crate::store::{Abort, Store, Tx};

/// Key prefixes of accounts and sessions (left out of the clinical data's digest).
pub const PREFIXES: &[&[u8]] = &[b"u/"];

fn user_key(id: &str) -> String {
    format!("u/user/{id}")
}
fn email_key(email: &str) -> String {
    format!("u/email/{}", email.to_ascii_lowercase())
}
fn session_key(token: &str) -> String {
    format!(
        "u/session/{}",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

/// What a person's account is for: working a provider's referrals (`/inbox`), or reading
/// the figures (`/reports`, a commissioner, who sees no patient).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Provider,
    Commissioner,
}

/// One person's account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: String,
    pub email: String,
    /// The provider the person works for; empty for a commissioner.
    pub provider: String,
    #[serde(default)]
    pub kind: Kind,
    /// argon2id PHC string.
    pub password: String,
    /// Base32 TOTP secret; `None` until a new one is issued at first sign-in.
    pub totp_secret: Option<String>,
    /// True once a code from the secret has been entered (enrolment done).
    pub totp_enrolled: bool,
    pub disabled: bool,
    /// Wrong passwords or codes in a row.
    pub failures: u32,
    /// Commit-clock microseconds until which sign-in is refused.
    pub locked_until: i64,
    /// Demo accounts (from the config) sign in over loopback only.
    #[serde(default)]
    pub demo: bool,
}

/// A signed-in (or half signed-in) browser.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Session {
    pub user: String,
    /// False after the password, true after the second factor.
    pub full: bool,
    pub created: i64,
    pub last_seen: i64,
    pub csrf: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignInError {
    #[error("the email or password is not right")]
    BadCredentials,
    #[error("the code is not right")]
    BadCode,
    #[error("too many attempts: this account is locked for a while")]
    Locked,
    #[error("too many attempts from this address: wait a minute")]
    Throttled,
    #[error("this account is disabled")]
    Disabled,
    #[error("demo accounts can only sign in on the machine the gateway runs on")]
    DemoNotLoopback,
}

/// What a sign-in step did, for the audit trail.
#[derive(Debug)]
pub struct Attempt {
    pub user: Option<User>,
    pub result: std::result::Result<(), SignInError>,
    /// Set when this failure locked the account.
    pub locked_now: bool,
}

/// A new random token (256 bits), hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn new_secret() -> String {
    let mut b = [0u8; 20];
    OsRng.fill_bytes(&mut b);
    totp_rs::Secret::Raw(b.to_vec()).to_encoded().to_string()
}

pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(format!("argon2: {e}")))
}

fn password_ok(user: &User, password: &str) -> bool {
    PasswordHash::new(&user.password)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn totp_of(secret: &str, email: &str) -> Result<totp_rs::TOTP> {
    let bytes = totp_rs::Secret::Encoded(secret.to_string())
        .to_bytes()
        .map_err(|e| Error::Internal(format!("TOTP secret: {e:?}")))?;
    totp_rs::TOTP::new(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        bytes,
        Some("sp-gateway".into()),
        email.to_string(),
    )
    .map_err(|e| Error::Internal(format!("TOTP: {e}")))
}

/// The code a TOTP secret gives at `unix_secs` (for tests and the demo).
pub fn totp_code(secret: &str, unix_secs: u64) -> Result<String> {
    Ok(totp_of(secret, "x@example.org")?.generate(unix_secs))
}

/// The `otpauth://` URL an authenticator app enrols from (shown as a QR code).
pub fn otpauth_url(user: &User) -> Result<Option<String>> {
    match &user.totp_secret {
        Some(s) => Ok(Some(totp_of(s, &user.email)?.get_url())),
        None => Ok(None),
    }
}

/// The QR code of an enrolment URL, as SVG.
pub fn qr_svg(url: &str) -> Result<String> {
    let code = qrcode::QrCode::new(url.as_bytes())
        .map_err(|e| Error::Internal(format!("QR code: {e}")))?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(200, 200)
        .build())
}

fn abort(e: impl std::fmt::Display) -> Abort<Error> {
    Abort::Caller(Error::Internal(e.to_string()))
}

fn tx_get_json<T: for<'de> Deserialize<'de>>(
    tx: &Tx<'_>,
    key: &str,
) -> std::result::Result<Option<T>, Abort<Error>> {
    match tx.get(key.as_bytes())? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(abort),
    }
}

fn tx_put_json<T: Serialize>(
    tx: &Tx<'_>,
    key: &str,
    v: &T,
) -> std::result::Result<(), Abort<Error>> {
    let b = serde_json::to_vec(v).map_err(abort)?;
    tx.put(key.as_bytes(), &b)?;
    Ok(())
}

pub fn tx_user_by_email(
    tx: &Tx<'_>,
    email: &str,
) -> std::result::Result<Option<User>, Abort<Error>> {
    let Some(id) = tx.get(email_key(email).as_bytes())? else {
        return Ok(None);
    };
    let id = String::from_utf8(id).map_err(abort)?;
    tx_get_json(tx, &user_key(&id))
}

pub fn user(store: &Store, id: &str) -> Result<Option<User>> {
    match store.get(user_key(id).as_bytes())? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Internal(format!("stored account unreadable: {e}"))),
    }
}

/// Every account, sorted by email.
pub fn list(store: &Store) -> Result<Vec<User>> {
    let mut out = Vec::new();
    for (_, v) in store.scan(b"u/user/", None, 1_000_000)? {
        out.push(
            serde_json::from_slice::<User>(&v)
                .map_err(|e| Error::Internal(format!("stored account unreadable: {e}")))?,
        );
    }
    out.sort_by(|a, b| a.email.cmp(&b.email));
    Ok(out)
}

pub use crate::config::email_ok;

/// Passwords: at least 12 characters (NCSC guidance favours length over composition rules).
pub fn password_policy(password: &str) -> std::result::Result<(), String> {
    if password.chars().count() < 12 {
        return Err("must be at least 12 characters".into());
    }
    if password.len() > 1024 {
        return Err("must be at most 1024 bytes".into());
    }
    Ok(())
}

/// Adds an account in `tx` (a config error, an existing email or a weak password refuse
/// it, writing nothing). `totp_secret` is for demo accounts; others get theirs at first
/// sign-in.
pub fn tx_add(
    tx: &Tx<'_>,
    email: &str,
    kind: Kind,
    provider: &str,
    password_hash: String,
    totp_secret: Option<String>,
    demo: bool,
) -> std::result::Result<User, Abort<Error>> {
    if tx.get(email_key(email).as_bytes())?.is_some() {
        return Err(Abort::Caller(Error::Conflict(format!(
            "an account with the email {email} exists already"
        ))));
    }
    let user = User {
        id: uuid::Uuid::new_v4().simple().to_string(),
        email: email.to_string(),
        provider: provider.to_string(),
        kind,
        password: password_hash,
        totp_enrolled: totp_secret.is_some(),
        totp_secret,
        disabled: false,
        failures: 0,
        locked_until: 0,
        demo,
    };
    tx_put_json(tx, &user_key(&user.id), &user)?;
    tx.put(email_key(email).as_bytes(), user.id.as_bytes())?;
    Ok(user)
}

/// Changes the account of `email` in `tx` (not found: an error, nothing written).
fn tx_change(
    tx: &Tx<'_>,
    email: &str,
    change: impl FnOnce(&mut User),
) -> std::result::Result<User, Abort<Error>> {
    let Some(mut u) = tx_user_by_email(tx, email)? else {
        return Err(Abort::Caller(Error::not_found(format!(
            "no account with the email {email}"
        ))));
    };
    change(&mut u);
    tx_put_json(tx, &user_key(&u.id), &u)?;
    Ok(u)
}

/// Disables an account and ends its sessions (they are checked against the account on
/// every request, so a disabled account's sessions stop at once).
pub fn tx_set_disabled(
    tx: &Tx<'_>,
    email: &str,
    disabled: bool,
) -> std::result::Result<User, Abort<Error>> {
    tx_change(tx, email, |u| u.disabled = disabled)
}

/// Resets an account: a new password, a new second factor (enrolled again at next sign-in),
/// the lock lifted.
pub fn tx_reset(
    tx: &Tx<'_>,
    email: &str,
    password_hash: String,
) -> std::result::Result<User, Abort<Error>> {
    tx_change(tx, email, |u| {
        u.password = password_hash;
        u.totp_secret = None;
        u.totp_enrolled = false;
        u.failures = 0;
        u.locked_until = 0;
    })
}

/// Per-address limit on sign-in attempts (in memory: a restart forgets it, the per-account
/// lock is in the store).
pub struct AddressLimiter {
    limit: u32,
    window_secs: u64,
    seen: Mutex<HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
}

impl AddressLimiter {
    pub fn new(per_minute: u32) -> AddressLimiter {
        AddressLimiter::per_window(per_minute, 60)
    }

    /// At most `limit` attempts from one address in a window of `window_secs`.
    pub fn per_window(limit: u32, window_secs: u64) -> AddressLimiter {
        AddressLimiter {
            limit,
            window_secs,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt from `ip`; false when it is over the limit.
    pub fn allow(&self, ip: std::net::IpAddr) -> bool {
        let now = std::time::Instant::now();
        let window = self.window_secs;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, (t, _)| now.duration_since(*t).as_secs() < window);
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0).as_secs() >= window {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 <= self.limit
    }
}

/// The password step. On success a half session (password done, second factor to come) is
/// created and its token returned. Failures count towards the account's lock.
pub fn tx_password_step(
    tx: &Tx<'_>,
    cfg: &InboxConfig,
    now: i64,
    email: &str,
    password: &str,
    loopback: bool,
) -> std::result::Result<(Attempt, Option<String>), Abort<Error>> {
    let Some(mut u) = tx_user_by_email(tx, email)? else {
        // Spend the same time as a real check, so that timing does not tell which emails
        // have accounts.
        let _ = hash_password(password);
        return Ok((
            Attempt {
                user: None,
                result: Err(SignInError::BadCredentials),
                locked_now: false,
            },
            None,
        ));
    };
    let refuse = |u: User, e| {
        Ok((
            Attempt {
                user: Some(u),
                result: Err(e),
                locked_now: false,
            },
            None,
        ))
    };
    if u.locked_until > now {
        return refuse(u, SignInError::Locked);
    }
    if u.demo && !loopback {
        return refuse(u, SignInError::DemoNotLoopback);
    }
    if !password_ok(&u, password) {
        let locked_now = tx_fail(tx, cfg, now, &mut u)?;
        return Ok(failed(u, locked_now, SignInError::BadCredentials));
    }
    // Said only to someone who knows the password, so that it does not tell others which
    // addresses have accounts.
    if u.disabled {
        return refuse(u, SignInError::Disabled);
    }
    if u.totp_secret.is_none() {
        u.totp_secret = Some(new_secret());
        u.totp_enrolled = false;
        tx_put_json(tx, &user_key(&u.id), &u)?;
    }
    let token = random_token();
    let s = Session {
        user: u.id.clone(),
        full: false,
        created: now,
        last_seen: now,
        csrf: random_token(),
    };
    tx_put_json(tx, &session_key(&token), &s)?;
    Ok((
        Attempt {
            user: Some(u),
            result: Ok(()),
            locked_now: false,
        },
        Some(token),
    ))
}

/// A wrong password or code: the attempt, which says "locked" if this failure locked it.
fn failed(u: User, locked_now: bool, otherwise: SignInError) -> (Attempt, Option<String>) {
    (
        Attempt {
            user: Some(u),
            result: Err(if locked_now {
                SignInError::Locked
            } else {
                otherwise
            }),
            locked_now,
        },
        None,
    )
}

fn tx_fail(
    tx: &Tx<'_>,
    cfg: &InboxConfig,
    now: i64,
    u: &mut User,
) -> std::result::Result<bool, Abort<Error>> {
    u.failures += 1;
    let locked_now = u.failures >= cfg.lock_after;
    if locked_now {
        u.locked_until = now + i64::from(cfg.lock_minutes) * 60_000_000;
        u.failures = 0;
    }
    tx_put_json(tx, &user_key(&u.id), u)?;
    Ok(locked_now)
}

/// The second-factor step of a half session: a right code makes it a full session (and
/// completes enrolment); a wrong one counts towards the lock. `unix_secs` is the wall clock
/// (TOTP is defined on it).
pub fn tx_code_step(
    tx: &Tx<'_>,
    cfg: &InboxConfig,
    now: i64,
    unix_secs: u64,
    token: &str,
    code: &str,
) -> std::result::Result<(Attempt, Option<String>), Abort<Error>> {
    let Some((mut s, mut u)) = tx_session(tx, cfg, now, token)? else {
        return Ok((
            Attempt {
                user: None,
                result: Err(SignInError::BadCode),
                locked_now: false,
            },
            None,
        ));
    };
    if u.locked_until > now {
        return Ok((
            Attempt {
                user: Some(u),
                result: Err(SignInError::Locked),
                locked_now: false,
            },
            None,
        ));
    }
    let secret = u.totp_secret.clone().unwrap_or_default();
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    let ok = code.len() == 6
        && code.bytes().all(|b| b.is_ascii_digit())
        && totp_of(&secret, &u.email)
            .map(|t| t.check(&code, unix_secs))
            .unwrap_or(false);
    if !ok {
        let locked_now = tx_fail(tx, cfg, now, &mut u)?;
        if locked_now {
            tx.remove(session_key(token).as_bytes())?;
        }
        return Ok(failed(u, locked_now, SignInError::BadCode));
    }
    u.failures = 0;
    u.totp_enrolled = true;
    tx_put_json(tx, &user_key(&u.id), &u)?;
    // A fresh token and CSRF token for the full session (the half session's are retired),
    // so a token seen before sign-in completed is worth nothing after.
    s.full = true;
    s.last_seen = now;
    s.csrf = random_token();
    tx.remove(session_key(token).as_bytes())?;
    let fresh = random_token();
    tx_put_json(tx, &session_key(&fresh), &s)?;
    Ok((
        Attempt {
            user: Some(u),
            result: Ok(()),
            locked_now: false,
        },
        Some(fresh),
    ))
}

/// The session a token names and its account, if the session is live: within the idle
/// and absolute timeouts, and its account neither disabled nor locked. An expired session
/// is removed. The idle clock is moved on at most once a minute (a page view is not a
/// write otherwise).
pub fn tx_session(
    tx: &Tx<'_>,
    cfg: &InboxConfig,
    now: i64,
    token: &str,
) -> std::result::Result<Option<(Session, User)>, Abort<Error>> {
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let key = session_key(token);
    let Some(mut s) = tx_get_json::<Session>(tx, &key)? else {
        return Ok(None);
    };
    let idle = i64::from(cfg.session_idle_minutes) * 60_000_000;
    let absolute = i64::from(cfg.session_absolute_hours) * 3_600_000_000;
    let user: Option<User> = tx_get_json(tx, &user_key(&s.user))?;
    let live = now - s.last_seen <= idle && now - s.created <= absolute;
    let Some(user) = user.filter(|u| live && !u.disabled && u.locked_until <= now) else {
        tx.remove(key.as_bytes())?;
        return Ok(None);
    };
    if now - s.last_seen > 60_000_000 {
        s.last_seen = now;
        tx_put_json(tx, &key, &s)?;
    }
    Ok(Some((s, user)))
}

/// Ends a session.
pub fn tx_end_session(tx: &Tx<'_>, token: &str) -> std::result::Result<(), Abort<Error>> {
    tx.remove(session_key(token).as_bytes())?;
    Ok(())
}

/// Constant-time comparison of a form's CSRF token with the session's.
pub fn csrf_ok(session: &Session, presented: &str) -> bool {
    !presented.is_empty() && bool::from(session.csrf.as_bytes().ct_eq(presented.as_bytes()))
}

fn commit<T>(
    store: &Store,
    f: impl FnOnce(&Tx<'_>) -> std::result::Result<T, Abort<Error>>,
) -> Result<T> {
    let out = store.transact(f).map_err(|e| match e {
        crate::store::TxError::Caller(e) => e,
        crate::store::TxError::Store(e) => Error::Store(e),
    })?;
    store.durable_blocking()?;
    Ok(out)
}

/// Adds an account for a person of `provider` (a provider in `cfg`), or for a commissioner
/// (`provider` empty): the command line's `users add`. Nothing is written when anything is wrong.
pub fn add(
    store: &Store,
    cfg: &crate::config::Config,
    email: &str,
    kind: Kind,
    provider: &str,
    password: &str,
) -> Result<User> {
    match kind {
        Kind::Provider if cfg.provider(provider).is_none() => {
            return Err(Error::invalid(
                "value",
                "--provider",
                format!("names no provider in the config: {provider}"),
            ));
        }
        Kind::Commissioner if !provider.is_empty() => {
            return Err(Error::invalid(
                "value",
                "--provider",
                "a commissioner works for no provider: give --commissioner or --provider, not both",
            ));
        }
        _ => {}
    }
    if !email_ok(email) {
        return Err(Error::invalid(
            "value",
            "--email",
            "is not an email address",
        ));
    }
    password_policy(password).map_err(|m| Error::invalid("value", "password", m))?;
    let hash = hash_password(password)?;
    commit(store, |tx| {
        tx_add(tx, email, kind, provider, hash.clone(), None, false)
    })
}

/// Disables (or enables again) an account; a disabled account's sessions end at once.
pub fn set_disabled(store: &Store, email: &str, disabled: bool) -> Result<User> {
    commit(store, |tx| tx_set_disabled(tx, email, disabled))
}

/// A new password and a new second factor for an account, its lock lifted.
pub fn reset(store: &Store, email: &str, password: &str) -> Result<User> {
    password_policy(password).map_err(|m| Error::invalid("value", "password", m))?;
    let hash = hash_password(password)?;
    commit(store, |tx| tx_reset(tx, email, hash.clone()))
}

/// Creates the config's demo people that do not exist yet (at start).
pub fn ensure_demo_users(store: &Store, cfg: &crate::config::Config) -> Result<usize> {
    let mut added = 0;
    for d in &cfg.inbox.demo_users {
        let exists = store.get(email_key(&d.email).as_bytes())?.is_some();
        if exists {
            continue;
        }
        let hash = hash_password(&d.password)?;
        commit(store, |tx| {
            tx_add(
                tx,
                &d.email,
                if d.commissioner {
                    Kind::Commissioner
                } else {
                    Kind::Provider
                },
                &d.provider,
                hash.clone(),
                Some(d.totp_secret.clone()),
                true,
            )
        })?;
        added += 1;
    }
    Ok(added)
}

/// A random password for a new account (the command line prints it once).
pub fn random_password() -> String {
    // 20 characters from a 32-letter alphabet without look-alikes: 100 bits.
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789-";
    let mut b = [0u8; 20];
    OsRng.fill_bytes(&mut b);
    b.iter()
        .map(|x| ALPHABET[(*x as usize) % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InboxConfig {
        InboxConfig::default()
    }

    #[test]
    fn a_demo_account_signs_in_over_loopback_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let hash = hash_password("demo-password-long").expect("hash");
        store
            .transact::<_, Error>(|tx| {
                tx_add(
                    tx,
                    "d@example.org",
                    Kind::Provider,
                    "p",
                    hash.clone(),
                    Some("ONYC2Z3BORSXOYLZEBSGK3LPEBUHKYRA".into()),
                    true,
                )
                .map(drop)
            })
            .map_err(|_| "add")
            .expect("add");
        let attempt = |loopback| {
            store
                .transact::<_, Error>(|tx| {
                    tx_password_step(
                        tx,
                        &cfg(),
                        1,
                        "d@example.org",
                        "demo-password-long",
                        loopback,
                    )
                })
                .map_err(|_| "step")
                .expect("step")
        };
        let (a, token) = attempt(false);
        assert_eq!(a.result, Err(SignInError::DemoNotLoopback));
        assert!(token.is_none());
        let (a, token) = attempt(true);
        assert_eq!(a.result, Ok(()));
        assert!(token.is_some());
    }

    #[test]
    fn passwords_are_argon2id_and_short_ones_refused() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(password_policy("short").is_err());
        assert!(password_policy("twelve chars").is_ok());
    }
}
