//! The `sp-gateway` command line: parses the arguments and runs one subcommand (serve,
//! check-config, audit, outbox, backup, users, export) over the modules below it. It is
//! the top of the library: nothing imports it. It holds no logic a request path needs, and
//! prints nothing a patient could be identified by (a panic's message is withheld).
//!
//! It lives in the library, not in the binary, so that it is compiled once with the rest
//! (the binary is three lines): its generic instantiations (tokio's runtime, the log
//! subscriber, the HTTP client) are shared with the library's instead of compiled again,
//! which shortened a cold release build (issue #11, BENCHMARKS.md).

mod directory;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// A FHIR R4 gateway for NHS social prescribing referrals.
#[derive(Parser)]
#[command(name = "sp-gateway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// Config file [default: config/gateway.toml, or the embedded demo config when absent]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (overrides server.data_dir)
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on (overrides server.listen), e.g. 127.0.0.1:8080
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Log as JSON lines instead of text
        #[arg(long)]
        log_json: bool,
    },
    /// Check a config file and say what is wrong with it, if anything.
    CheckConfig {
        #[command(flatten)]
        common: Common,
    },
    /// Audit log tools (on a stopped gateway's data directory).
    Audit {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        action: AuditAction,
    },
    /// The archive of closed referrals (on a stopped gateway's data directory).
    Archive {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        action: ArchiveAction,
    },
    /// Inspect and steer the outbox of a stopped gateway (a running one: /admin/outbox).
    Outbox {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Copy a stopped gateway's store to a new directory, verified by opening it (a running
    /// gateway: POST /admin/backup). Restore: stop, replace the data directory with the copy.
    Backup {
        #[command(flatten)]
        common: Common,
        /// New (or empty) directory for the copy
        #[arg(long)]
        to: PathBuf,
    },
    /// People who work a provider's referrals in the browser (/inbox): on a stopped
    /// gateway's data directory, or on a running one with --gateway.
    Users {
        #[command(flatten)]
        common: Common,
        /// A running gateway's base URL (e.g. https://referrals.example.org): manage people
        /// through its admin API, with the admin token in SP_GATEWAY_ADMIN_TOKEN.
        #[arg(long)]
        gateway: Option<String>,
        /// CA certificate (PEM) to verify a running gateway's TLS certificate by
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[command(subcommand)]
        action: UsersAction,
    },
    /// The directory of services: import an Open Referral UK feed (a file or a URL) into a
    /// stopped gateway's store, or into a running one with --gateway.
    Directory {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        action: directory::Action,
    },
    /// The commissioners' figures: `report rebuild` recomputes every referral's facts and
    /// every counter from the stored referrals (archived ones too) on a stopped gateway's
    /// data directory, says where the kept figures differ, and writes the rebuilt ones.
    Report {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        action: ReportAction,
    },
    /// Export every stored resource as FHIR bulk-data NDJSON, one file per type, from a
    /// stopped gateway's data directory.
    Export {
        #[command(flatten)]
        common: Common,
        /// Directory to write {Type}.ndjson files into (created if absent)
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ReportAction {
    /// Recompute the figures from the stored referrals and put right any that differ (a stopped
    /// store); with --check, compare only and exit 1 if any differ.
    Rebuild {
        /// Compare only: write nothing
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Walk the hash chain; name the first altered, missing or reordered record; exit 1 if
    /// any. With --checkpoint SEQ:HASH (from the gateway's log), also detect a cut tail.
    Verify {
        #[arg(long)]
        checkpoint: Option<String>,
    },
}

#[derive(Subcommand)]
enum ArchiveAction {
    /// Move the closed referrals that are due (archive.after_days, or --after-days) out of
    /// the hot store now, as the running gateway does every archive.interval_secs.
    Run {
        #[arg(long)]
        after_days: Option<u32>,
    },
    /// Check every archived referral's frame against its hash; exit 1 if any is missing
    /// or damaged.
    Verify,
}

#[derive(Subcommand)]
enum UsersAction {
    /// Add a person to a provider (or a commissioner, who reads the figures at /reports).
    /// Prints a first password to pass on (or reads one from --password-file); they set up
    /// their security code at first sign-in.
    Add {
        #[arg(
            long,
            required_unless_present = "commissioner",
            conflicts_with = "commissioner"
        )]
        provider: Option<String>,
        /// A commissioner: reads the figures, works for no provider, sees no patient
        #[arg(long)]
        commissioner: bool,
        #[arg(long)]
        email: String,
        /// A file holding the password (at least 12 characters) instead of a random one
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Stop a person signing in; their sessions end at once.
    Disable {
        #[arg(long)]
        email: String,
    },
    /// Let a disabled person sign in again.
    Enable {
        #[arg(long)]
        email: String,
    },
    /// A new password and a new security code (set up again at next sign-in); lifts a lock.
    Reset {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Every account: email, provider, and whether it is enrolled, disabled or locked.
    List,
    /// The security code a TOTP secret gives now (for the demo people in README).
    Code {
        #[arg(long)]
        secret: String,
    },
}

#[derive(Subcommand)]
enum OutboxAction {
    /// Messages waiting for delivery, with attempts and the last error.
    List,
    /// Messages whose delivery failed for good.
    DeadLetters,
    /// Put a dead letter back in the queue, due now.
    Retry { seq: u64 },
    /// Stop retrying a pending message (it becomes a dead letter).
    Stop { seq: u64 },
}

fn load(common: &Common, listen: Option<SocketAddr>) -> Result<Config, String> {
    let (cfg, name) = Config::load(common.config.as_deref()).map_err(|e| e.to_string())?;
    cfg.with_overrides(&name, listen, common.data_dir.clone())
        .map_err(|e| e.to_string())
}

/// A command's answer: its text on stdout (exit 0), or `error: …` on stderr (exit 2).
fn report(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command line: `sp-gateway` with the process's arguments.
pub fn main() -> ExitCode {
    // A panic message can quote the input that caused it; log where, never what.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("panic at {at} (message withheld: it may quote patient data)");
    }));
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { common } => match load(&common, None).and_then(|cfg| {
            // The certificate, key and token files too: a config that cannot start is not OK.
            if let Some(t) = &cfg.tls {
                crate::tls::server_config(t).map_err(|e| e.to_string())?;
            }
            crate::outbox::Outbox::new(&cfg).map_err(|e| e.to_string())?;
            Ok(cfg)
        }) {
            Ok(cfg) => {
                println!(
                    "config OK: {} practices, {} providers, {} routes, {} clients",
                    cfg.practices.len(),
                    cfg.providers.len(),
                    cfg.routing.routes.len(),
                    cfg.clients.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Audit {
            common,
            action: AuditAction::Verify { checkpoint },
        } => {
            let cp = match checkpoint.as_deref().map(|c| c.split_once(':')) {
                None => None,
                Some(Some((seq, hash))) => match seq.parse::<u64>() {
                    Ok(seq) => Some((seq, hash.to_string())),
                    Err(_) => {
                        eprintln!("error: --checkpoint must be SEQ:HASH");
                        return ExitCode::from(2);
                    }
                },
                Some(None) => {
                    eprintln!("error: --checkpoint must be SEQ:HASH");
                    return ExitCode::from(2);
                }
            };
            let gw = match open_gateway(&common) {
                Ok(g) => g,
                // A store that lost acknowledged writes is as broken as a broken chain.
                Err(OpenError::Lost(e)) => {
                    println!("store BROKEN: {e}");
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match crate::audit::verify(gw.store(), cp.as_ref().map(|(s, h)| (*s, h.as_str()))) {
                Ok(crate::audit::Verdict::Intact { records, head }) => {
                    println!("audit chain intact: {records} records, head {head}");
                    // The resources the chain speaks of, archived ones included.
                    archive_verdict(&gw)
                }
                Ok(crate::audit::Verdict::Broken { seq, problem }) => {
                    println!("audit chain BROKEN at record {seq}: {problem}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Archive { common, action } => archive(&common, action),
        Command::Outbox { common, action } => report(outbox(&common, action)),
        Command::Backup { common, to } => report(
            open_gateway(&common)
                .map_err(String::from)
                .and_then(|gw| gw.store().backup(&to).map_err(|e| e.to_string()))
                .map(|b| {
                    format!(
                        "backup verified: {} keys, consistent to commit {}, in {} ({} ms)",
                        b.keys,
                        b.commit,
                        b.dir.display(),
                        b.millis
                    )
                }),
        ),
        Command::Users {
            common,
            gateway,
            ca_file,
            action,
        } => report(match gateway {
            Some(url) => users_remote(&url, ca_file.as_deref(), action),
            None => users(&common, action),
        }),
        Command::Directory { common, action } => report(directory::run(&common, action)),
        Command::Report {
            common,
            action: ReportAction::Rebuild { check },
        } => {
            let gw = match open_gateway(&common) {
                Ok(gw) => gw,
                Err(e) => return report(Err(e.to_string())),
            };
            match gw.rebuild_reports(check) {
                Ok(r) => {
                    println!("{}", r.text());
                    // Differences fail a check; a rebuild that put them right succeeds.
                    if r.differences.is_empty() || r.written {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => report(Err(e.to_string())),
            }
        }
        Command::Export { common, out } => report(export(&common, &out).map(|counts| {
            counts
                .iter()
                .map(|(t, n)| {
                    format!(
                        "{t}: {n} resources → {}",
                        out.join(format!("{t}.ndjson")).display()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })),
        Command::Serve {
            common,
            listen,
            log_json,
        } => {
            let filter =
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            // Logs go to stderr; stdout carries only the "listening on" line.
            let fmt = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr);
            if log_json {
                fmt.json().init();
            } else {
                fmt.with_ansi(std::io::stderr().is_terminal()).init();
            }
            let cfg = match load(&common, listen) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(serve(cfg))
        }
    }
}

/// Why a command-line tool could not open the store: lost acknowledged writes (a broken
/// store), or anything else.
enum OpenError {
    Lost(String),
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Lost(e) | OpenError::Other(e) => f.write_str(e),
        }
    }
}

impl From<OpenError> for String {
    fn from(e: OpenError) -> String {
        e.to_string()
    }
}

fn open_gateway(common: &Common) -> Result<crate::gateway::Gateway, OpenError> {
    let cfg = load(common, None).map_err(OpenError::Other)?;
    let store =
        crate::store::Store::open_with(&cfg.server.data_dir, crate::server::store_options(&cfg))
            .map_err(|e| match e {
                crate::store::StoreError::Lost { .. } => OpenError::Lost(e.to_string()),
                ref open @ crate::store::StoreError::Open { ref message, .. }
                    if message.contains("lock") =>
                {
                    OpenError::Other(format!(
                        "{open} (is a gateway still running on this data directory? stop it first)"
                    ))
                }
                e => OpenError::Other(e.to_string()),
            })?;
    Ok(crate::gateway::Gateway::new(
        std::sync::Arc::new(cfg),
        store,
    ))
}

fn read_password(file: Option<&std::path::Path>) -> Result<(String, bool), String> {
    match file {
        Some(f) => std::fs::read_to_string(f)
            .map(|p| (p.trim_end_matches(['\r', '\n']).to_string(), false))
            .map_err(|e| format!("cannot read {}: {e}", f.display())),
        None => Ok((crate::accounts::random_password(), true)),
    }
}

/// A person's organisation as the admin API gives it: their provider, or "(commissioner)".
fn org_of(p: &serde_json::Value) -> &str {
    if p["kind"] == "commissioner" {
        "(commissioner)"
    } else {
        p["provider"].as_str().unwrap_or_default()
    }
}

/// `users` against a running gateway's admin API.
fn users_remote(
    base: &str,
    ca_file: Option<&std::path::Path>,
    action: UsersAction,
) -> Result<String, String> {
    let token = std::env::var("SP_GATEWAY_ADMIN_TOKEN")
        .map_err(|_| "set SP_GATEWAY_ADMIN_TOKEN to the admin client's token".to_string())?;
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let cert =
            reqwest::Certificate::from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let base = base.trim_end_matches('/');
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let (method, path, body) = match &action {
        UsersAction::List => ("GET", "/admin/users".to_string(), None),
        UsersAction::Add {
            provider,
            commissioner,
            email,
            password_file,
        } => {
            let mut b = if *commissioner {
                serde_json::json!({ "kind": "commissioner", "email": email })
            } else {
                serde_json::json!({ "provider": provider, "email": email })
            };
            if let Some(f) = password_file {
                b["password"] = read_password(Some(f))?.0.into();
            }
            ("POST", "/admin/users".to_string(), Some(b))
        }
        UsersAction::Disable { email } => {
            ("POST", format!("/admin/users/{}/disable", enc(email)), None)
        }
        UsersAction::Enable { email } => {
            ("POST", format!("/admin/users/{}/enable", enc(email)), None)
        }
        UsersAction::Reset {
            email,
            password_file,
        } => {
            let b = match password_file {
                Some(f) => Some(serde_json::json!({ "password": read_password(Some(f))?.0 })),
                None => None,
            };
            ("POST", format!("/admin/users/{}/reset", enc(email)), b)
        }
        UsersAction::Code { secret } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            return crate::accounts::totp_code(secret, now).map_err(|e| e.to_string());
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let url = format!("{base}{path}");
        let mut req = if method == "GET" {
            client.get(&url)
        } else {
            client.post(&url)
        };
        req = req.bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
        if !status.is_success() {
            let why = v
                .pointer("/issue/0/diagnostics")
                .and_then(|d| d.as_str())
                .unwrap_or("refused");
            return Err(format!("{status}: {why}"));
        }
        let mut out = String::new();
        if let Some(people) = v.get("people").and_then(|p| p.as_array()) {
            for p in people {
                out.push_str(&format!(
                    "{}\t{}\tenrolled={} disabled={} locked={}\n",
                    p["email"].as_str().unwrap_or_default(),
                    org_of(p),
                    p["enrolled"],
                    p["disabled"],
                    p["locked"]
                ));
            }
            return Ok(if out.is_empty() {
                "no accounts".into()
            } else {
                out.trim_end().to_string()
            });
        }
        out.push_str(&format!(
            "{} ({}): done",
            v["email"].as_str().unwrap_or_default(),
            org_of(&v)
        ));
        if let Some(p) = v.get("password").and_then(|p| p.as_str()) {
            out.push_str(&format!("\npassword (shown once; pass it on safely): {p}"));
        }
        Ok(out)
    })
}

fn users(common: &Common, action: UsersAction) -> Result<String, String> {
    use crate::accounts;
    if let UsersAction::Code { secret } = &action {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        return accounts::totp_code(secret, now).map_err(|e| e.to_string());
    }
    let gw = open_gateway(common)?;
    let store = gw.store();
    let e = |e: crate::error::Error| e.to_string();
    match action {
        UsersAction::Add {
            provider,
            commissioner,
            email,
            password_file,
        } => {
            let (password, generated) = read_password(password_file.as_deref())?;
            let kind = if commissioner {
                accounts::Kind::Commissioner
            } else {
                accounts::Kind::Provider
            };
            let provider = provider.unwrap_or_default();
            let u =
                accounts::add(store, gw.config(), &email, kind, &provider, &password).map_err(e)?;
            let mut out = match u.kind {
                accounts::Kind::Provider => format!("added {} to {}", u.email, u.provider),
                accounts::Kind::Commissioner => format!("added {} as a commissioner", u.email),
            };
            if generated {
                out.push_str(&format!(
                    "\nfirst password (shown once; pass it on safely): {password}"
                ));
            }
            Ok(out)
        }
        UsersAction::Disable { email } => accounts::set_disabled(store, &email, true)
            .map(|u| format!("disabled {}", u.email))
            .map_err(e),
        UsersAction::Enable { email } => accounts::set_disabled(store, &email, false)
            .map(|u| format!("enabled {}", u.email))
            .map_err(e),
        UsersAction::Reset {
            email,
            password_file,
        } => {
            let (password, generated) = read_password(password_file.as_deref())?;
            let u = accounts::reset(store, &email, &password).map_err(e)?;
            let mut out = format!(
                "reset {}: new password, security code to set up at next sign-in",
                u.email
            );
            if generated {
                out.push_str(&format!(
                    "\nnew password (shown once; pass it on safely): {password}"
                ));
            }
            Ok(out)
        }
        UsersAction::List => {
            let mut out = String::new();
            for u in accounts::list(store).map_err(e)? {
                let mut flags = Vec::new();
                if !u.totp_enrolled {
                    flags.push("security code not set up");
                }
                if u.disabled {
                    flags.push("disabled");
                }
                if u.locked_until > 0 {
                    flags.push("locked (until its time passes)");
                }
                if u.demo {
                    flags.push("demo, loopback only");
                }
                let org = match u.kind {
                    accounts::Kind::Provider => u.provider.as_str(),
                    accounts::Kind::Commissioner => "(commissioner)",
                };
                out.push_str(&format!("{}\t{}\t{}\n", u.email, org, flags.join(", ")));
            }
            if out.is_empty() {
                out.push_str("no accounts");
            }
            Ok(out.trim_end().to_string())
        }
        UsersAction::Code { .. } => Err("(answered above, without the store)".into()),
    }
}

fn outbox(common: &Common, action: OutboxAction) -> Result<String, String> {
    use crate::outbox;
    let gw = open_gateway(common)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let json = |v: serde_json::Result<String>| v.map_err(|e| e.to_string());
    match action {
        OutboxAction::List => {
            let s = outbox::summary(&gw).map_err(|e| e.to_string())?;
            json(serde_json::to_string_pretty(&s.pending))
        }
        OutboxAction::DeadLetters => {
            let s = outbox::summary(&gw).map_err(|e| e.to_string())?;
            json(serde_json::to_string_pretty(&s.dead_letters))
        }
        OutboxAction::Retry { seq } => {
            let m = rt
                .block_on(outbox::retry(&gw, seq))
                .map_err(|e| e.to_string())?;
            json(serde_json::to_string_pretty(&m))
        }
        OutboxAction::Stop { seq } => {
            let m = rt
                .block_on(outbox::stop(&gw, seq))
                .map_err(|e| e.to_string())?;
            json(serde_json::to_string_pretty(&m))
        }
    }
}

fn export(common: &Common, out: &std::path::Path) -> Result<Vec<(&'static str, usize)>, String> {
    let gateway = open_gateway(common)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut counts = Vec::new();
    for t in crate::gateway::STORED_TYPES
        .into_iter()
        .chain(["AuditEvent", "Provenance"])
    {
        let path = out.join(format!("{t}.ndjson"));
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let n = gateway.export(t, &mut w).map_err(|e| e.to_string())?;
        std::io::Write::flush(&mut w).map_err(|e| format!("{}: {e}", path.display()))?;
        counts.push((t, n));
    }
    Ok(counts)
}

async fn serve(cfg: Config) -> ExitCode {
    let bound = match crate::server::bind(cfg).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    match bound.local_addr() {
        // Tests and scripts read this line to find the port.
        Ok(addr) => println!("listening on http://{addr}"),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!("sp-gateway serving");
    match bound.run(shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("sp-gateway stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(crate::server::ServeError::Store(e @ crate::store::StoreError::Failed(_))) => {
            tracing::error!(error = %e, "stopped after a storage failure");
            eprintln!(
                "error: stopped after a storage failure: {e}. Writes answered 503 may or may \
                 not have been stored. Free space (or fix the disk) and start again (exit 4)"
            );
            ExitCode::from(4)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// `archive run` and `archive verify`.
fn archive(common: &Common, action: ArchiveAction) -> ExitCode {
    let gw = match open_gateway(common) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match action {
        ArchiveAction::Verify => archive_verdict(&gw),
        ArchiveAction::Run { after_days } => {
            let cfg = gw.config().archive.clone();
            let days = after_days.unwrap_or(cfg.after_days);
            report(
                crate::server::archive_due(&gw, days, cfg.batch)
                    .map_err(|e| e.to_string())
                    .map(|r| {
                        format!(
                            "archived {} closed referrals ({} keys fewer in the hot store, {} \
                             bytes moved) and {} audit records; {} closed referrals left in \
                             place (still to be delivered, or changed meanwhile)",
                            r.archived,
                            r.keys_removed,
                            r.bytes_moved,
                            r.audit_records,
                            r.passed_over
                        )
                    }),
            )
        }
    }
}

/// Prints what the archive check found; exit 1 when a frame is missing or damaged.
fn archive_verdict(gw: &crate::gateway::Gateway) -> ExitCode {
    match gw.verify_archive() {
        Ok(v) if v.problems.is_empty() => {
            println!(
                "archive intact: {} archived resources in {} groups, {} blocks of audit records, {} segments, {} bytes{}",
                v.resources,
                v.groups,
                v.audit_blocks,
                v.segments,
                v.bytes,
                if v.unreferenced > 0 {
                    format!(" ({} frames nothing points at: harmless)", v.unreferenced)
                } else {
                    String::new()
                }
            );
            for n in &v.notes {
                println!("note: {n}");
            }
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!(
                "archive DAMAGED: {} of {} archived resources cannot be read",
                v.problems.len(),
                v.resources
            );
            for p in &v.problems {
                println!("  {p}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
