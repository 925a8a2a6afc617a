//! Configuration: reads and checks `gateway.toml`.
//!
//! Owns the shape of the config file and every rule about it (unique ids, references between
//! sections, token hashes). It returns a fully checked [`Config`] or a [`ConfigError`] naming
//! the file, the key and what is wrong. It must not open the store or touch the network.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The demo configuration compiled into the binary; used when `config/gateway.toml` is absent.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/gateway.toml");
/// Where `serve` looks for its config when no `--config` is given.
pub const DEFAULT_PATH: &str = "config/gateway.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    GpSystem,
    Provider,
    Auditor,
    Admin,
    /// A referring system that is not a GP practice: a council's social-care system, a
    /// hospital discharge team, a housing association, the link-worker hub.
    Referrer,
    /// Reads the figures (Measure, `$evaluate-measure`) and nothing of any one person.
    Commissioner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::GpSystem => "gp-system",
            Role::Provider => "provider",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::Referrer => "referrer",
            Role::Commissioner => "commissioner",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Memory for the store's cache of tree nodes, in MiB (the process needs ~140 MB more).
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// The free-space floor of the data directory's filesystem: below the smaller of these
    /// (but never below 32 MiB) new referrals are refused with 507 and the gateway is not
    /// ready; reads, polls and Task updates go on, and it resumes by itself when space
    /// returns.
    #[serde(default = "default_min_free_mb")]
    pub min_free_mb: u64,
    #[serde(default = "default_min_free_percent")]
    pub min_free_percent: u8,
    /// Refuse Task updates without `If-Match` (428). Off by default: FHIR lets clients omit
    /// it (a stale one is always refused with 412), and the state machine guards every
    /// change either way.
    #[serde(default)]
    pub require_if_match: bool,
    /// Where `POST /admin/backup` writes online backups (one directory each).
    #[serde(default = "default_backup_dir")]
    pub backup_dir: PathBuf,
    #[serde(default)]
    pub limits: Limits,
}

fn default_min_free_mb() -> u64 {
    1024
}

fn default_min_free_percent() -> u8 {
    5
}

fn default_backup_dir() -> PathBuf {
    PathBuf::from("./backups")
}

fn default_max_body() -> usize {
    256 * 1024
}

fn default_cache_mb() -> u64 {
    crate::store::DEFAULT_CACHE_BYTES / (1024 * 1024)
}

/// Protection against slow, greedy or hostile clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A client must send its request headers within this time (slowloris).
    pub header_read_timeout_secs: u64,
    /// A whole request, body included, must be handled within this time (408 otherwise).
    pub request_timeout_secs: u64,
    /// A TLS handshake must finish within this time.
    pub handshake_timeout_secs: u64,
    /// Requests handled at once; more are answered 503 at once (backpressure).
    pub max_concurrent_requests: usize,
    /// Open connections at once; more are closed on arrival.
    pub max_connections: usize,
    /// Sustained requests per second per client, and the burst allowed above it (429).
    pub rate_per_second: u32,
    pub rate_burst: u32,
    /// Longest JSON string accepted in a request body.
    pub max_string_bytes: usize,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout_secs: 10,
            request_timeout_secs: 30,
            handshake_timeout_secs: 10,
            max_concurrent_requests: 256,
            max_connections: 1024,
            rate_per_second: 100,
            rate_burst: 200,
            max_string_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
        }
    }
}

/// TLS for the listener; with `client_ca`, mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA certificate(s) that sign client certificates: turns on mutual TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `required` (every connection presents a certificate) or
    /// `optional` (bearer-token clients may connect without one).
    #[serde(default)]
    pub client_auth: ClientAuth,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Practice {
    pub ods: String,
    pub name: String,
    /// The practice's FHIR endpoint, for pushing Observations back (the outbox). Without
    /// one, the GP system pulls (`Observation?based-on=`).
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// The practice's MESH mailbox, for outcome letters (GP Connect Send Document) into the
    /// patient's record. A practice has an `endpoint` or `mesh`, not both.
    #[serde(default)]
    pub mesh: Option<Mesh>,
}

/// Sending outcome letters to a practice over MESH (API v2), and reading the ITK3
/// acknowledgements that come back to our mailbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mesh {
    /// MESH's base URL; `https://`, or `http://` on a loopback address only (a local sandbox).
    pub base_url: String,
    /// Our own mailbox id.
    pub mailbox: String,
    /// Files holding our mailbox password and the environment's shared key (secrets: not in
    /// this file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub shared_key_file: Option<PathBuf>,
    /// The same given inline: only for a MESH on loopback over plain http (the demo's local
    /// sandbox, whose mailboxes and key are public test values).
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub shared_key: Option<String>,
    /// PEM CA certificate(s) to trust (needed for https), and our client certificate and
    /// key for mutual TLS (live MESH requires them).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// The practice's mailbox id. Without it MESH's endpoint lookup finds the mailbox
    /// registered for the practice's ODS code and the workflow.
    #[serde(default)]
    pub to_mailbox: Option<String>,
    /// The workflow letters travel on (GP Connect Send Document's).
    #[serde(default = "Mesh::default_workflow")]
    pub workflow_id: String,
    /// The Task statuses that send a letter.
    #[serde(default = "Mesh::default_events")]
    pub events: Vec<String>,
    /// The largest chunk in one request; a larger letter is sent in several (MESH allows
    /// up to 100 MB a chunk).
    #[serde(default = "Mesh::default_chunk_bytes")]
    pub chunk_bytes: usize,
    /// How often our inbox is read for acknowledgements.
    #[serde(default = "Mesh::default_inbox_poll_ms")]
    pub inbox_poll_ms: u64,
    /// The organisation that sends the letters (the gateway's operator): its ODS code and
    /// name, as the ITK message's sender and the document's custodian.
    pub sender_ods: String,
    pub sender_name: String,
    /// Also send the outcomes as coded Observations beside the PDF (GP Connect Messaging
    /// 1.4's shape); only for practices whose system is known to accept them.
    #[serde(default)]
    pub structured_outcomes: bool,
}

impl Mesh {
    pub const WORKFLOW: &'static str = "GPFED_CONSULT_REPORT";
    fn default_workflow() -> String {
        Self::WORKFLOW.to_string()
    }
    fn default_events() -> Vec<String> {
        crate::letter::DEFAULT_EVENTS
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
    fn default_chunk_bytes() -> usize {
        20 * 1024 * 1024
    }
    fn default_inbox_poll_ms() -> u64 {
        60_000
    }
    /// Whether a Task reaching `status` sends a letter.
    pub fn sends_on(&self, status: &str) -> bool {
        self.events.iter().any(|e| e == status)
    }
}

/// A GP system's FHIR endpoint and the gateway's credentials for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// FHIR base URL; `https://`, or `http://` on a loopback address only.
    pub base_url: String,
    /// File holding the bearer token the gateway sends (a secret: not in this file).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for this endpoint (needed for https).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for endpoints that want mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// How the outbox retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outbox {
    /// Attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter) up to `max_delay_ms`.
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    /// How often the outbox looks for work.
    pub poll_ms: u64,
    /// A delivery request's deadline.
    pub request_timeout_ms: u64,
    /// `/readyz` fails when a practice's delivery worker has made no progress for this long
    /// beyond the request timeout (the worker is stuck). A GP endpoint that keeps failing or
    /// never answers is not the gateway's fault and does not make it unready: it shows in
    /// `/metrics` and `GET /admin/outbox`.
    pub stuck_after_secs: u64,
    /// Deliveries in flight at once per practice (each to a different referral: one
    /// referral's messages go one at a time, in order).
    pub concurrency: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            max_attempts: 30,
            base_delay_ms: 500,
            max_delay_ms: 300_000,
            poll_ms: 200,
            request_timeout_ms: 10_000,
            stuck_after_secs: 3600,
            concurrency: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Need {
    pub name: String,
    pub display: String,
    /// SNOMED CT concept ids that this need category stands for.
    pub snomed: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub id: String,
    pub name: String,
    /// The organisation's id in the imported directory (ORUK `organization.id`): its
    /// Organization keeps this provider's id, and its services route to this provider.
    #[serde(default)]
    pub oruk_organization: Option<String>,
    #[serde(default)]
    pub needs: Vec<String>,
    /// Postcode districts served (outward codes, e.g. "BB9").
    #[serde(default)]
    pub areas: Vec<String>,
    /// Largest number of open Tasks (requested, accepted, in-progress, on-hold).
    pub capacity: u64,
    /// Working days the group promises to answer a new referral in (the inbox marks what
    /// has waited longer).
    #[serde(default = "default_response_days")]
    pub response_days: u32,
    /// The group's address for "new referrals are waiting" emails (no patient data in
    /// them); none: no email.
    #[serde(default)]
    pub email: Option<String>,
}

/// Is `email` plausibly an email address (one `@`, a dot after it, no spaces)?
pub fn email_ok(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.contains(char::is_whitespace)
        && !domain.contains('@')
        && email.len() <= 254
}

fn default_response_days() -> u32 {
    5
}

/// The provider inbox: people working referrals in a browser (`/inbox`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxConfig {
    /// A session ends after this long without a request.
    #[serde(default = "default_idle")]
    pub session_idle_minutes: u32,
    /// And after this long in any case.
    #[serde(default = "default_absolute")]
    pub session_absolute_hours: u32,
    /// Wrong passwords or codes in a row that lock an account...
    #[serde(default = "default_lock_after")]
    pub lock_after: u32,
    /// ...for this long.
    #[serde(default = "default_lock_minutes")]
    pub lock_minutes: u32,
    /// Sign-in attempts a minute from one address.
    #[serde(default = "default_per_address")]
    pub attempts_per_address_per_minute: u32,
    /// Demo people (the demo config only): created at start if absent; they sign in over
    /// loopback only.
    #[serde(default)]
    pub demo_users: Vec<DemoUser>,
    /// Email to groups when new referrals reach them; none: no email.
    #[serde(default)]
    pub email: Option<EmailConfig>,
}

/// The public self-referral page (`/refer`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferConfig {
    /// Whether the page is served at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Referrals an hour from one address.
    #[serde(default = "default_refer_per_address")]
    pub per_address_per_hour: u32,
    /// Referrals an hour from everyone together.
    #[serde(default = "default_refer_overall")]
    pub per_hour: u32,
    /// Route self-referrals by the routing rules, as any referral; false (the default): to
    /// the fallback provider (the link-worker hub) for triage.
    #[serde(default)]
    pub route_by_rules: bool,
}

impl Default for ReferConfig {
    fn default() -> Self {
        ReferConfig {
            enabled: true,
            per_address_per_hour: default_refer_per_address(),
            per_hour: default_refer_overall(),
            route_by_rules: false,
        }
    }
}

fn default_refer_per_address() -> u32 {
    5
}
fn default_refer_overall() -> u32 {
    200
}

/// The SMTP server the gateway sends "new referrals are waiting" emails through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub smtp_host: String,
    #[serde(default = "default_smtp_port")]
    pub smtp_port: u16,
    /// STARTTLS, required: plain SMTP is refused unless the host is loopback.
    #[serde(default = "default_true")]
    pub starttls: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the SMTP server by; default: the Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The sender, e.g. "Referrals <referrals@example.org>".
    pub from: String,
    /// The address people reach the gateway at, for the link in the email
    /// (e.g. https://referrals.example.org).
    pub base_url: String,
    /// At most one email to a group per this many seconds.
    #[serde(default = "default_email_interval")]
    pub interval_secs: u64,
    /// How often to look for new referrals, in milliseconds.
    #[serde(default = "default_email_poll")]
    pub poll_ms: u64,
}

fn default_smtp_port() -> u16 {
    587
}
fn default_true() -> bool {
    true
}
fn default_email_interval() -> u64 {
    3600
}
fn default_email_poll() -> u64 {
    10_000
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            session_idle_minutes: default_idle(),
            session_absolute_hours: default_absolute(),
            lock_after: default_lock_after(),
            lock_minutes: default_lock_minutes(),
            attempts_per_address_per_minute: default_per_address(),
            demo_users: Vec::new(),
            email: None,
        }
    }
}

fn default_idle() -> u32 {
    30
}
fn default_absolute() -> u32 {
    12
}
fn default_lock_after() -> u32 {
    5
}
fn default_lock_minutes() -> u32 {
    15
}
fn default_per_address() -> u32 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoUser {
    /// The provider the person works for; empty for a commissioner.
    #[serde(default)]
    pub provider: String,
    /// A commissioner, who reads the figures (`/reports`) and works for no provider.
    #[serde(default)]
    pub commissioner: bool,
    pub email: String,
    pub password: String,
    /// Base32 TOTP secret, so that the demo's codes can be made from README.
    pub totp_secret: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    /// The provider this rule sends to (one of `provider` and `service`).
    #[serde(default)]
    pub provider: String,
    /// A directory service (HealthcareService id) this rule sends to: the service's own
    /// needs, postcode districts and ages apply as well as the rule's, and it must be
    /// active, recently assured and have capacity.
    #[serde(default)]
    pub service: Option<String>,
    /// Need category names or SNOMED codes; any one matching is enough. Empty: any need.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Postcode districts; empty: anywhere.
    #[serde(default)]
    pub postcode_districts: Vec<String>,
    /// Practice ODS codes; empty: any practice.
    #[serde(default)]
    pub practices: Vec<String>,
    #[serde(default)]
    pub min_age: Option<u32>,
    #[serde(default)]
    pub max_age: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Provider that takes every referral no rule (with capacity) matched.
    pub fallback_provider: String,
    pub routes: Vec<Route>,
    /// After the rules, try every directory service the referral fits (its needs, postcode
    /// district and age), by the service's local priority, then name.
    #[serde(default)]
    pub directory: bool,
}

/// The directory of services (`sp-gateway directory import`): how ORUK categories become
/// need categories, how recent an assurance must be, and the fields kept locally per
/// service (an import never changes them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectoryConfig {
    /// A service is routed to only if its `assured_date` is at most this many months old;
    /// 0: assurance is not required.
    pub assured_within_months: u32,
    /// The taxonomies the gateway reads; a service tagged with a term of any other is
    /// refused at import.
    pub taxonomies: Vec<Taxonomy>,
    /// Local fields of directory services, by service id.
    pub services: Vec<LocalService>,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            assured_within_months: 12,
            taxonomies: Vec::new(),
            services: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Taxonomy {
    /// The ORUK `taxonomy_term.taxonomy` value (e.g. "sp-gateway-needs", "esd").
    pub name: String,
    /// Term (its `term`, `name` or `id`) → need category name.
    #[serde(default)]
    pub terms: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalService {
    pub id: String,
    /// Need categories this service takes, instead of those its ORUK categories map to.
    #[serde(default)]
    pub needs: Option<Vec<String>>,
    /// Postcode districts, instead of those read from its ORUK service areas.
    #[serde(default)]
    pub areas: Option<Vec<String>>,
    /// Routing order among directory services: lower first (default 100).
    #[serde(default)]
    pub priority: Option<u32>,
    /// Practices whose referrals it takes; empty: any.
    #[serde(default)]
    pub practices: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// SNOMED CT code of the outcome measure.
    pub code: String,
    pub display: String,
    /// A short name for table headings (`SWEMWBS`); the display when absent.
    #[serde(default)]
    pub short: Option<String>,
    pub min: i64,
    pub max: i64,
    /// The smallest rise from first to last score that counts as a meaningful improvement
    /// in the figures (default 3 points: see README's "Figures for commissioners").
    #[serde(default = "default_meaningful_change")]
    pub meaningful_change: i64,
}

fn default_meaningful_change() -> i64 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub id: String,
    pub role: Role,
    /// Lower-case hex SHA-256 of the bearer token.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Lower-case hex SHA-256 of the client's certificate (DER), for mutual TLS.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// A demo token (its clear text is published in README): refused unless the listener is
    /// loopback.
    #[serde(default)]
    pub demo: bool,
    /// For `gp-system`: the practices (ODS codes) it acts for.
    #[serde(default)]
    pub practices: Vec<String>,
    /// For `provider`: the provider id it acts for.
    #[serde(default)]
    pub provider: Option<String>,
    /// For `referrer`: the source of referral (a code of the gateway's source-of-referral
    /// CodeSystem, `fhir::SOURCES_OF_REFERRAL`) recorded on its referrals that do not name
    /// one themselves.
    #[serde(default)]
    pub source_of_referral: Option<String>,
}

/// A checked configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    #[serde(default)]
    pub tls: Option<Tls>,
    pub practices: Vec<Practice>,
    pub needs: Vec<Need>,
    pub providers: Vec<Provider>,
    pub routing: Routing,
    pub outcomes: Vec<Outcome>,
    pub clients: Vec<Client>,
    #[serde(default)]
    pub outbox: Outbox,
    #[serde(default)]
    pub inbox: InboxConfig,
    #[serde(default)]
    pub refer: ReferConfig,
    #[serde(default)]
    pub archive: ArchiveConfig,
    #[serde(default)]
    pub directory: DirectoryConfig,
    #[serde(default)]
    pub reports: ReportsConfig,
}

/// The figures for commissioners (`report`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// Counts from 1 to this are shown as suppressed (and so are the cells that would give
    /// them away); medians and changes need a group larger than this. Never below 5.
    pub suppress_up_to: u32,
    /// Published counts are rounded to the nearest multiple of this (after suppression),
    /// so that figures for overlapping periods cannot be subtracted to reveal a suppressed
    /// one. 1 publishes exact counts (and gives that protection up).
    #[serde(default = "default_round_to")]
    pub round_to: u32,
}

fn default_round_to() -> u32 {
    5
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig {
            suppress_up_to: 7,
            round_to: default_round_to(),
        }
    }
}

/// Moving closed, delivered referrals out of the hot store into the archive
/// (`gateway::archive`): they are still read by id, with their history, Provenance and
/// audit trail, but searches by time, status, owner or patient no longer list them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    pub enabled: bool,
    /// A referral is archived this many days after its last change, once it is closed and
    /// nothing for it waits in the outbox.
    pub after_days: u32,
    /// How often the gateway looks for referrals to archive.
    pub interval_secs: u64,
    /// Referrals archived at most per transaction.
    pub batch: usize,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            enabled: true,
            after_days: 90,
            interval_secs: 600,
            batch: 200,
        }
    }
}

impl Config {
    /// Reads `path`, or the embedded demo config when `path` is `None` and
    /// [`DEFAULT_PATH`] does not exist.
    pub fn load(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
        let (text, name) = match path {
            Some(p) => (read(p)?, p.display().to_string()),
            None if Path::new(DEFAULT_PATH).exists() => {
                (read(Path::new(DEFAULT_PATH))?, DEFAULT_PATH.to_string())
            }
            None => (
                EMBEDDED_DEFAULT.to_string(),
                format!("{DEFAULT_PATH} (embedded)"),
            ),
        };
        let cfg = Config::parse(&text, &name)?;
        Ok((cfg, name))
    }

    /// Parses and checks a config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        cfg.check(file)?;
        Ok(cfg)
    }

    /// Applies command-line overrides and checks the result again (a `--listen` that is not
    /// loopback must not serve demo tokens).
    pub fn with_overrides(
        mut self,
        file: &str,
        listen: Option<SocketAddr>,
        data_dir: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        if let Some(l) = listen {
            self.server.listen = l;
        }
        if let Some(d) = data_dir {
            self.server.data_dir = d;
        }
        self.check(file)?;
        Ok(self)
    }

    pub fn practice(&self, ods: &str) -> Option<&Practice> {
        self.practices.iter().find(|p| p.ods == ods)
    }

    pub fn provider(&self, id: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.id == id)
    }

    pub fn need(&self, name: &str) -> Option<&Need> {
        self.needs.iter().find(|n| n.name == name)
    }

    pub fn outcome(&self, code: &str) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.code == code)
    }

    /// `[directory]`: known taxonomies map terms to real needs; local service fields name
    /// real needs, districts and practices; providers link distinct ORUK organisations.
    fn check_directory(
        &self,
        need_names: &HashSet<&str>,
        practices: &HashSet<&str>,
        bad: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let d = &self.directory;
        if d.assured_within_months > 1200 {
            return Err(bad(
                "directory.assured_within_months".into(),
                "must be from 0 (not required) to 1200".into(),
            ));
        }
        let mut names = HashSet::new();
        for (i, t) in d.taxonomies.iter().enumerate() {
            if t.name.trim().is_empty() || !names.insert(t.name.as_str()) {
                return Err(bad(
                    format!("directory.taxonomies[{i}].name"),
                    "must be a taxonomy name, listed once".into(),
                ));
            }
            for (term, need) in &t.terms {
                if !need_names.contains(need.as_str()) {
                    return Err(bad(
                        format!("directory.taxonomies[{i}].terms.{term}"),
                        format!("`{need}` is not a need named in [[needs]]"),
                    ));
                }
            }
        }
        let mut ids = HashSet::new();
        for (i, s) in d.services.iter().enumerate() {
            if !is_fhir_id(&s.id) || !ids.insert(s.id.as_str()) {
                return Err(bad(
                    format!("directory.services[{i}].id"),
                    format!("`{}` is not a FHIR id, or is listed twice", s.id),
                ));
            }
            for n in s.needs.iter().flatten() {
                if !need_names.contains(n.as_str()) {
                    return Err(bad(
                        format!("directory.services[{i}].needs"),
                        format!("`{n}` is not a need named in [[needs]]"),
                    ));
                }
            }
            for a in s.areas.iter().flatten() {
                if !is_postcode_district(a) {
                    return Err(bad(
                        format!("directory.services[{i}].areas"),
                        format!("`{a}` is not a postcode district such as \"BB9\""),
                    ));
                }
            }
            for o in &s.practices {
                if !practices.contains(o.as_str()) {
                    return Err(bad(
                        format!("directory.services[{i}].practices"),
                        format!("`{o}` is not a practice in [[practices]]"),
                    ));
                }
            }
        }
        let mut linked = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if let Some(o) = &p.oruk_organization {
                if o.trim().is_empty() || !linked.insert(o.as_str()) {
                    return Err(bad(
                        format!("providers[{i}].oruk_organization"),
                        "must be an ORUK organisation id, linked to one provider only".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The provider an ORUK organisation is linked to.
    pub fn provider_for_oruk(&self, org: &str) -> Option<&Provider> {
        self.providers
            .iter()
            .find(|p| p.oruk_organization.as_deref() == Some(org))
    }

    /// A directory service's local fields, if the config has any.
    pub fn local_service(&self, id: &str) -> Option<&LocalService> {
        self.directory.services.iter().find(|s| s.id == id)
    }

    fn check(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key,
            message,
        };
        if self.reports.suppress_up_to < 5 {
            return Err(bad(
                "reports.suppress_up_to".into(),
                "must be 5 or more: smaller counts could identify people".into(),
            ));
        }
        if self.reports.round_to < 1 || self.reports.round_to > 100 {
            return Err(bad(
                "reports.round_to".into(),
                "must be from 1 (exact counts) to 100".into(),
            ));
        }
        for (i, o) in self.outcomes.iter().enumerate() {
            if o.meaningful_change < 1 || o.meaningful_change > o.max - o.min {
                return Err(bad(
                    format!("outcomes[{i}].meaningful_change"),
                    "must be at least 1 and within the scale's range".into(),
                ));
            }
        }
        if self.server.max_body_bytes < 1024 || self.server.max_body_bytes > 1024 * 1024 {
            return Err(bad(
                "server.max_body_bytes".into(),
                "must be from 1024 to 1048576 (1 MiB)".into(),
            ));
        }
        if !(1..=86_400).contains(&self.archive.interval_secs) {
            return Err(bad(
                "archive.interval_secs".into(),
                "must be from 1 to 86400 (a day)".into(),
            ));
        }
        if !(1..=10_000).contains(&self.archive.batch) {
            return Err(bad(
                "archive.batch".into(),
                "must be from 1 to 10000".into(),
            ));
        }
        if self.archive.after_days > 36_500 {
            return Err(bad(
                "archive.after_days".into(),
                "must be at most 36500 (a hundred years)".into(),
            ));
        }
        if self.server.min_free_percent > 50 {
            return Err(bad(
                "server.min_free_percent".into(),
                "must be from 0 to 50".into(),
            ));
        }
        if !(1..=64).contains(&self.outbox.concurrency) {
            return Err(bad(
                "outbox.concurrency".into(),
                "must be from 1 to 64".into(),
            ));
        }
        let i = &self.inbox;
        for (key, v, lo, hi) in [
            (
                "inbox.session_idle_minutes",
                i.session_idle_minutes,
                1,
                24 * 60,
            ),
            (
                "inbox.session_absolute_hours",
                i.session_absolute_hours,
                1,
                7 * 24,
            ),
            ("inbox.lock_after", i.lock_after, 1, 100),
            ("inbox.lock_minutes", i.lock_minutes, 1, 24 * 60),
            (
                "inbox.attempts_per_address_per_minute",
                i.attempts_per_address_per_minute,
                1,
                10_000,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(bad(key.into(), format!("must be from {lo} to {hi}")));
            }
        }
        if let Some(e) = &i.email {
            let loopback = matches!(e.smtp_host.as_str(), "localhost" | "127.0.0.1" | "::1");
            if !e.starttls && !loopback {
                return Err(bad(
                    "inbox.email.starttls".into(),
                    "must be true: plain SMTP is allowed to a loopback host only".into(),
                ));
            }
            if !email_ok(
                e.from
                    .rsplit('<')
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches('>'),
            ) {
                return Err(bad(
                    "inbox.email.from".into(),
                    "is not an email address (e.g. \"Referrals <referrals@example.org>\")".into(),
                ));
            }
            if !(e.base_url.starts_with("https://") || e.base_url.starts_with("http://")) {
                return Err(bad(
                    "inbox.email.base_url".into(),
                    "must be an http(s) URL".into(),
                ));
            }
            if e.interval_secs < 1 || e.poll_ms < 10 {
                return Err(bad(
                    "inbox.email".into(),
                    "interval_secs must be at least 1 and poll_ms at least 10".into(),
                ));
            }
        }
        for p in &self.providers {
            if let Some(a) = &p.email {
                if !email_ok(a) {
                    return Err(bad(
                        format!("providers[{}].email", p.id),
                        "is not an email address".into(),
                    ));
                }
            }
        }
        for (n, d) in i.demo_users.iter().enumerate() {
            if d.commissioner {
                if !d.provider.is_empty() {
                    return Err(bad(
                        format!("inbox.demo_users[{n}].provider"),
                        "a commissioner works for no provider: give commissioner = true or a provider, not both".into(),
                    ));
                }
            } else if !self.providers.iter().any(|p| p.id == d.provider) {
                return Err(bad(
                    format!("inbox.demo_users[{n}].provider"),
                    format!("names no provider: {}", d.provider),
                ));
            }
            if !email_ok(&d.email) {
                return Err(bad(
                    format!("inbox.demo_users[{n}].email"),
                    "is not an email address".into(),
                ));
            }
            let base32 = d
                .totp_secret
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
            if !base32 || d.totp_secret.len() < 26 {
                return Err(bad(
                    format!("inbox.demo_users[{n}].totp_secret"),
                    "must be base32, at least 128 bits".into(),
                ));
            }
        }
        if !(16..=65536).contains(&self.server.cache_mb) {
            return Err(bad(
                "server.cache_mb".into(),
                "must be from 16 to 65536 (MiB)".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, p) in self.practices.iter().enumerate() {
            if !is_ods_code(&p.ods) {
                return Err(bad(
                    format!("practices[{i}].ods"),
                    format!(
                        "`{}` is not an ODS code (3 to 10 upper-case letters and digits)",
                        p.ods
                    ),
                ));
            }
            if !seen.insert(p.ods.as_str()) {
                return Err(bad(
                    format!("practices[{i}].ods"),
                    format!("`{}` is listed twice", p.ods),
                ));
            }
            let remote = p
                .endpoint
                .as_ref()
                .map(|e| {
                    (
                        "endpoint",
                        &e.base_url,
                        &e.ca_file,
                        &e.client_cert,
                        &e.client_key,
                    )
                })
                .into_iter()
                .chain(p.mesh.as_ref().map(|m| {
                    (
                        "mesh",
                        &m.base_url,
                        &m.ca_file,
                        &m.client_cert,
                        &m.client_key,
                    )
                }));
            for (section, base_url, ca_file, client_cert, client_key) in remote {
                let key = format!("practices[{i}].{section}.base_url");
                let rest = base_url
                    .strip_prefix("https://")
                    .or_else(|| base_url.strip_prefix("http://"));
                let host = rest
                    .and_then(|r| r.split(['/', ':']).next())
                    .unwrap_or_default();
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|a| a.is_loopback());
                if rest.is_none() || host.is_empty() {
                    return Err(bad(key, "must be an http(s):// URL".into()));
                }
                if base_url.starts_with("http://") && !loopback {
                    return Err(bad(
                        key,
                        "must be https:// (plain http only to loopback)".into(),
                    ));
                }
                if base_url.starts_with("https://") && ca_file.is_none() {
                    return Err(bad(
                        format!("practices[{i}].{section}.ca_file"),
                        format!("is needed for an https {section}: the CA certificate(s) to trust"),
                    ));
                }
                if client_cert.is_some() != client_key.is_some() {
                    return Err(bad(
                        format!("practices[{i}].{section}.client_key"),
                        "client_cert and client_key go together".into(),
                    ));
                }
            }
            if p.endpoint.is_some() && p.mesh.is_some() {
                return Err(bad(
                    format!("practices[{i}].mesh"),
                    "a practice gets its outcomes over one channel: keep `endpoint` (FHIR) or \
                     `mesh` (letters), not both"
                        .into(),
                ));
            }
            if let Some(m) = &p.mesh {
                let mailbox_ok = |s: &str| {
                    !s.is_empty()
                        && s.len() <= 20
                        && s.bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                };
                if !mailbox_ok(&m.mailbox) {
                    return Err(bad(
                        format!("practices[{i}].mesh.mailbox"),
                        "must be a MESH mailbox id (upper-case letters and digits, e.g. X26ABC1)"
                            .into(),
                    ));
                }
                if m.to_mailbox.as_deref().is_some_and(|t| !mailbox_ok(t)) {
                    return Err(bad(
                        format!("practices[{i}].mesh.to_mailbox"),
                        "must be a MESH mailbox id (upper-case letters and digits)".into(),
                    ));
                }
                for (j, e) in m.events.iter().enumerate() {
                    if !crate::fhir::TASK_STATUSES.contains(&e.as_str()) {
                        return Err(bad(
                            format!("practices[{i}].mesh.events[{j}]"),
                            format!(
                                "`{e}` is not a Task status (one of {})",
                                crate::fhir::TASK_STATUSES.join(", ")
                            ),
                        ));
                    }
                }
                if !(1024..=100 * 1024 * 1024).contains(&m.chunk_bytes) {
                    return Err(bad(
                        format!("practices[{i}].mesh.chunk_bytes"),
                        "must be from 1024 to 104857600 (MESH's 100 MB chunk limit)".into(),
                    ));
                }
                let local_sandbox = m.base_url.starts_with("http://");
                for (key, file, inline) in [
                    ("password", m.password_file.is_some(), m.password.is_some()),
                    (
                        "shared_key",
                        m.shared_key_file.is_some(),
                        m.shared_key.is_some(),
                    ),
                ] {
                    if file == inline {
                        return Err(bad(
                            format!("practices[{i}].mesh.{key}_file"),
                            format!("give exactly one of {key}_file and {key}"),
                        ));
                    }
                    if inline && !local_sandbox {
                        return Err(bad(
                            format!("practices[{i}].mesh.{key}"),
                            format!(
                                "an inline {key} is only for a local sandbox (http:// on \
                                 loopback); use {key}_file"
                            ),
                        ));
                    }
                }
                if !is_ods_code(&m.sender_ods) {
                    return Err(bad(
                        format!("practices[{i}].mesh.sender_ods"),
                        "must be the ODS code of the organisation sending the letters".into(),
                    ));
                }
                if m.inbox_poll_ms < 50 {
                    return Err(bad(
                        format!("practices[{i}].mesh.inbox_poll_ms"),
                        "must be at least 50".into(),
                    ));
                }
            }
        }
        let mut need_names = HashSet::new();
        for (i, n) in self.needs.iter().enumerate() {
            if n.name.is_empty()
                || !n
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(bad(
                    format!("needs[{i}].name"),
                    "must be lower-case letters, digits and '-'".into(),
                ));
            }
            if !need_names.insert(n.name.as_str()) {
                return Err(bad(
                    format!("needs[{i}].name"),
                    format!("`{}` is listed twice", n.name),
                ));
            }
            if n.snomed.is_empty() {
                return Err(bad(
                    format!("needs[{i}].snomed"),
                    "must list at least one SNOMED CT code".into(),
                ));
            }
            for (j, c) in n.snomed.iter().enumerate() {
                if !is_sctid(c) {
                    return Err(bad(
                        format!("needs[{i}].snomed[{j}]"),
                        format!("`{c}` is not a SNOMED CT concept id (6 to 18 digits)"),
                    ));
                }
            }
        }
        let mut provider_ids = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if !is_fhir_id(&p.id) {
                return Err(bad(
                    format!("providers[{i}].id"),
                    format!("`{}` is not a FHIR id ([A-Za-z0-9-.], 1 to 64)", p.id),
                ));
            }
            if !provider_ids.insert(p.id.as_str()) {
                return Err(bad(
                    format!("providers[{i}].id"),
                    format!("`{}` is listed twice", p.id),
                ));
            }
            if p.capacity == 0 {
                return Err(bad(
                    format!("providers[{i}].capacity"),
                    "must be at least 1".into(),
                ));
            }
            for (j, n) in p.needs.iter().enumerate() {
                if !need_names.contains(n.as_str()) {
                    return Err(bad(
                        format!("providers[{i}].needs[{j}]"),
                        format!("`{n}` is not a need named in [[needs]]"),
                    ));
                }
            }
            for (j, a) in p.areas.iter().enumerate() {
                if !is_postcode_district(a) {
                    return Err(bad(
                        format!("providers[{i}].areas[{j}]"),
                        format!("`{a}` is not a postcode district such as \"BB9\""),
                    ));
                }
            }
        }
        if !provider_ids.contains(self.routing.fallback_provider.as_str()) {
            return Err(bad(
                "routing.fallback_provider".into(),
                format!("`{}` is not a provider id", self.routing.fallback_provider),
            ));
        }
        let mut route_names = HashSet::new();
        for (i, r) in self.routing.routes.iter().enumerate() {
            if !route_names.insert(r.name.as_str()) {
                return Err(bad(
                    format!("routing.routes[{i}].name"),
                    format!("`{}` is listed twice", r.name),
                ));
            }
            match &r.service {
                Some(s) if r.provider.is_empty() && !is_fhir_id(s) => {
                    return Err(bad(
                        format!("routing.routes[{i}].service"),
                        format!("`{s}` is not a FHIR id"),
                    ));
                }
                Some(_) if r.provider.is_empty() => {}
                Some(_) => {
                    return Err(bad(
                        format!("routing.routes[{i}]"),
                        "names both a provider and a service: name one".into(),
                    ))
                }
                None if !provider_ids.contains(r.provider.as_str()) => {
                    return Err(bad(
                        format!("routing.routes[{i}].provider"),
                        format!("`{}` is not a provider id", r.provider),
                    ));
                }
                None => {}
            }
            for (j, n) in r.needs.iter().enumerate() {
                if !need_names.contains(n.as_str()) && !is_sctid(n) {
                    return Err(bad(
                        format!("routing.routes[{i}].needs[{j}]"),
                        format!("`{n}` is neither a need name nor a SNOMED CT code"),
                    ));
                }
            }
            for (j, d) in r.postcode_districts.iter().enumerate() {
                if !is_postcode_district(d) {
                    return Err(bad(
                        format!("routing.routes[{i}].postcode_districts[{j}]"),
                        format!("`{d}` is not a postcode district such as \"BB9\""),
                    ));
                }
            }
            for (j, o) in r.practices.iter().enumerate() {
                if !seen.contains(o.as_str()) {
                    return Err(bad(
                        format!("routing.routes[{i}].practices[{j}]"),
                        format!("`{o}` is not a practice in [[practices]]"),
                    ));
                }
            }
            if let (Some(lo), Some(hi)) = (r.min_age, r.max_age) {
                if lo > hi {
                    return Err(bad(
                        format!("routing.routes[{i}].min_age"),
                        format!("{lo} is above max_age {hi}"),
                    ));
                }
            }
        }
        self.check_directory(&need_names, &seen, &bad)?;
        let mut outcome_codes = HashSet::new();
        for (i, o) in self.outcomes.iter().enumerate() {
            if !is_sctid(&o.code) {
                return Err(bad(
                    format!("outcomes[{i}].code"),
                    format!("`{}` is not a SNOMED CT concept id", o.code),
                ));
            }
            if !outcome_codes.insert(o.code.as_str()) {
                return Err(bad(
                    format!("outcomes[{i}].code"),
                    format!("`{}` is listed twice", o.code),
                ));
            }
            if o.min > o.max {
                return Err(bad(
                    format!("outcomes[{i}].min"),
                    format!("{} is above max {}", o.min, o.max),
                ));
            }
        }
        let mut client_ids = HashSet::new();
        let mut hashes = BTreeSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if !client_ids.insert(c.id.as_str()) {
                return Err(bad(
                    format!("clients[{i}].id"),
                    format!("`{}` is listed twice", c.id),
                ));
            }
            if c.token_sha256.is_none() && c.cert_sha256.is_none() {
                return Err(bad(
                    format!("clients[{i}]"),
                    "needs token_sha256 or cert_sha256 (or both)".into(),
                ));
            }
            for (field, h) in [
                ("token_sha256", &c.token_sha256),
                ("cert_sha256", &c.cert_sha256),
            ] {
                let Some(h) = h else { continue };
                if h.len() != 64
                    || !h
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(bad(
                        format!("clients[{i}].{field}"),
                        "must be 64 lower-case hex digits (a SHA-256)".into(),
                    ));
                }
                if !hashes.insert(format!("{field}:{h}")) {
                    return Err(bad(
                        format!("clients[{i}].{field}"),
                        "the same credential is given to two clients".into(),
                    ));
                }
            }
            if c.cert_sha256.is_some() && self.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
                return Err(bad(
                    format!("clients[{i}].cert_sha256"),
                    "client certificates need mutual TLS: set tls.client_ca".into(),
                ));
            }
            match c.role {
                Role::GpSystem => {
                    if c.practices.is_empty() {
                        return Err(bad(
                            format!("clients[{i}].practices"),
                            "a gp-system client must name at least one practice".into(),
                        ));
                    }
                    for (j, o) in c.practices.iter().enumerate() {
                        if !seen.contains(o.as_str()) {
                            return Err(bad(
                                format!("clients[{i}].practices[{j}]"),
                                format!("`{o}` is not a practice in [[practices]]"),
                            ));
                        }
                    }
                }
                Role::Provider => match &c.provider {
                    Some(p) if provider_ids.contains(p.as_str()) => {}
                    Some(p) => {
                        return Err(bad(
                            format!("clients[{i}].provider"),
                            format!("`{p}` is not a provider id"),
                        ))
                    }
                    None => {
                        return Err(bad(
                            format!("clients[{i}].provider"),
                            "a provider client must name its provider".into(),
                        ))
                    }
                },
                Role::Referrer => {
                    if !is_fhir_id(&c.id) {
                        return Err(bad(
                            format!("clients[{i}].id"),
                            "a referrer's id names its referrals' scope: letters, digits, `-` and `.` only, at most 64".into(),
                        ));
                    }
                    match c.source_of_referral.as_deref() {
                        Some(code) if crate::fhir::source_of_referral(code).is_some() => {}
                        Some(code) => {
                            return Err(bad(
                                format!("clients[{i}].source_of_referral"),
                                format!(
                                    "`{code}` is not a source-of-referral code; one of: {}",
                                    crate::fhir::SOURCES_OF_REFERRAL
                                        .iter()
                                        .map(|s| s.code)
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            ))
                        }
                        None => {
                            return Err(bad(
                                format!("clients[{i}].source_of_referral"),
                                "a referrer client must name the source of referral its referrals are recorded with".into(),
                            ))
                        }
                    }
                }
                Role::Auditor | Role::Admin | Role::Commissioner => {}
            }
            let misplaced = [
                (
                    "practices",
                    !c.practices.is_empty() && c.role != Role::GpSystem,
                ),
                ("provider", c.provider.is_some() && c.role != Role::Provider),
                (
                    "source_of_referral",
                    c.source_of_referral.is_some() && c.role != Role::Referrer,
                ),
            ];
            if let Some((field, _)) = misplaced.iter().find(|(_, m)| *m) {
                return Err(bad(
                    format!("clients[{i}].{field}"),
                    format!("does not apply to a {} client", c.role.as_str()),
                ));
            }
        }
        let published = published_demo_hashes();
        let demo = self.clients.iter().any(|c| {
            c.demo
                || c.token_sha256
                    .as_ref()
                    .is_some_and(|h| published.contains(h))
        });
        if demo && !self.server.listen.ip().is_loopback() {
            return Err(bad(
                "server.listen".into(),
                format!(
                    "{} is not a loopback address, and demo tokens are configured: \
                     demo tokens are refused anywhere but loopback",
                    self.server.listen
                ),
            ));
        }
        if self.tls.is_none() && !self.server.listen.ip().is_loopback() {
            return Err(bad(
                "server.listen".into(),
                format!(
                    "{} is not a loopback address: plain HTTP is allowed only on loopback; \
                     configure [tls]",
                    self.server.listen
                ),
            ));
        }
        let l = &self.server.limits;
        for (key, v) in [
            ("header_read_timeout_secs", l.header_read_timeout_secs),
            ("request_timeout_secs", l.request_timeout_secs),
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("max_concurrent_requests", l.max_concurrent_requests as u64),
            ("max_connections", l.max_connections as u64),
            ("rate_per_second", l.rate_per_second as u64),
            ("rate_burst", l.rate_burst as u64),
        ] {
            if v == 0 {
                return Err(bad(
                    format!("server.limits.{key}"),
                    "must be at least 1".into(),
                ));
            }
        }
        if l.max_header_bytes < 8192 {
            return Err(bad(
                "server.limits.max_header_bytes".into(),
                "must be at least 8192".into(),
            ));
        }
        Ok(())
    }
}

/// Hashes of the demo tokens published in README (the embedded config's `demo` clients):
/// refused off loopback even if a copied config drops the `demo` flag.
fn published_demo_hashes() -> HashSet<String> {
    let Ok(v) = EMBEDDED_DEFAULT.parse::<toml::Table>() else {
        return HashSet::new();
    };
    v.get("clients")
        .and_then(|c| c.as_array())
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("token_sha256")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn read(p: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
        file: p.display().to_string(),
        source,
    })
}

/// ODS organisation code: 3 to 10 upper-case letters and digits.
pub fn is_ods_code(s: &str) -> bool {
    (3..=10).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// SNOMED CT concept id: 6 to 18 digits, no leading zero.
pub fn is_sctid(s: &str) -> bool {
    (6..=18).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0')
}

/// FHIR `id`: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// UK postcode district (outward code): e.g. "BB9", "M1", "EC1A", "SW19".
pub fn is_postcode_district(s: &str) -> bool {
    let b = s.as_bytes();
    let letters = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if !(1..=2).contains(&letters) {
        return false;
    }
    let rest = &b[letters..];
    match rest {
        [d] => d.is_ascii_digit(),
        [d, e] => d.is_ascii_digit() && (e.is_ascii_digit() || e.is_ascii_uppercase()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::parse(EMBEDDED_DEFAULT, "embedded").expect("default config");
        assert!(cfg.practices.len() >= 3);
        assert!(cfg.providers.len() >= 4);
    }

    #[test]
    fn errors_name_file_and_key() {
        let text = EMBEDDED_DEFAULT.replacen("capacity = ", "capacity = 0 #", 1);
        let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("x.toml: key `providers[0].capacity`"),
            "{err}"
        );
        let err = Config::parse("[server]\nlisten = 3", "y.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("y.toml: "), "{err}");
    }

    #[test]
    fn a_referrer_needs_a_known_source_of_referral_and_nothing_of_other_roles() {
        let with = |from: &str, to: &str| {
            let text = EMBEDDED_DEFAULT.replacen(from, to, 1);
            Config::parse(&text, "x.toml").unwrap_err().to_string()
        };
        let source = "source_of_referral = \"C1\"";
        let err = with(source, "");
        assert!(
            err.contains("source_of_referral") && err.contains("must name"),
            "{err}"
        );
        let err = with(source, "source_of_referral = \"Z9\"");
        assert!(
            err.contains("`Z9` is not a source-of-referral code"),
            "{err}"
        );
        let err = with(
            source,
            "source_of_referral = \"C1\"\npractices = [\"P81001\"]",
        );
        assert!(
            err.contains(".practices`") && err.contains("referrer"),
            "{err}"
        );
        let err = with("id = \"lancs-social-care\"", "id = \"lancs social care\"");
        assert!(err.contains(".id`"), "{err}");
    }

    #[test]
    fn postcode_districts() {
        for ok in ["BB9", "M1", "EC1A", "SW19", "B33"] {
            assert!(is_postcode_district(ok), "{ok}");
        }
        for bad in ["", "9BB", "BBB9", "bb9", "BB", "B123"] {
            assert!(!is_postcode_district(bad), "{bad}");
        }
    }
}
