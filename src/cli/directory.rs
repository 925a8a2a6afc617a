//! `sp-gateway directory import FILE|URL`: reads an Open Referral UK feed (every page of
//! an ORUK API's service list, following `total_pages`), and imports it into a stopped
//! gateway's store or, with `--gateway`, a running gateway's (`POST
//! /admin/directory/import`, the admin token in `SP_GATEWAY_ADMIN_TOKEN`). Prints what
//! was added, changed, retired and refused, and why.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use super::{open_gateway, Common};
use crate::gateway::directory::ImportReport;

#[derive(Subcommand)]
pub(super) enum Action {
    /// Import an ORUK feed: a file, or an http(s) URL of an ORUK API's services.
    Import {
        /// The feed: a file path, or a URL (every page is read)
        source: String,
        /// A running gateway's base URL (e.g. https://referrals.example.org): import
        /// through its admin API, with the admin token in SP_GATEWAY_ADMIN_TOKEN.
        #[arg(long)]
        gateway: Option<String>,
        /// CA certificate (PEM) to verify https URLs (the feed's and the gateway's) by
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
}

/// Pages of an ORUK API read at most.
const MAX_PAGES: u64 = 1000;

pub(super) fn run(common: &Common, action: Action) -> Result<String, String> {
    let Action::Import {
        source,
        gateway,
        ca_file,
        json,
    } = action;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = client(ca_file.as_deref())?;
    let feed = if source.starts_with("http://") || source.starts_with("https://") {
        rt.block_on(fetch(&client, &source))?
    } else {
        let bytes = std::fs::read(&source).map_err(|e| format!("cannot read {source}: {e}"))?;
        crate::schema::parse_json(&bytes).map_err(|e| format!("{source}: {e}"))?
    };
    eprintln!(
        "read {} services from {source}",
        crate::directory::oruk::services_of(&feed)
            .map(<[Value]>::len)
            .unwrap_or(0)
    );
    let report: ImportReport = match gateway {
        Some(base) => rt.block_on(remote(&client, &base, &feed))?,
        None => {
            let gw = open_gateway(common).map_err(|e| e.to_string())?;
            rt.block_on(gw.import_directory(&feed))
                .map_err(|e| e.to_string())?
        }
    };
    Ok(if json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
    } else {
        report.text().trim_end().to_string()
    })
}

fn client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(300));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let cert =
            reqwest::Certificate::from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| e.to_string())
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let resp = client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let bytes = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    crate::schema::parse_json(&bytes).map_err(|e| format!("{url}: {e}"))
}

/// Every page of an ORUK service list, as one page.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let mut first = get_json(client, url).await?;
    let pages = first
        .get("total_pages")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    if pages > MAX_PAGES {
        return Err(format!("{url}: {pages} pages, more than {MAX_PAGES}"));
    }
    let mut all: Vec<Value> = first
        .get("contents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for page in 2..=pages {
        let sep = if url.contains('?') { '&' } else { '?' };
        let next = get_json(client, &format!("{url}{sep}page={page}")).await?;
        let items = next
            .get("contents")
            .and_then(Value::as_array)
            .ok_or(format!("{url} page {page}: no `contents`"))?;
        all.extend(items.iter().cloned());
        eprintln!("read page {page} of {pages}");
    }
    if pages > 1 {
        first["contents"] = Value::Array(all);
    }
    Ok(first)
}

async fn remote(
    client: &reqwest::Client,
    base: &str,
    feed: &Value,
) -> Result<ImportReport, String> {
    let token = std::env::var("SP_GATEWAY_ADMIN_TOKEN")
        .map_err(|_| "set SP_GATEWAY_ADMIN_TOKEN to the admin client's token".to_string())?;
    let url = format!("{}/admin/directory/import", base.trim_end_matches('/'));
    let resp = client
        .post(&url)
        .bearer_auth(token)
        .json(feed)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        let why = v
            .pointer("/issue/0/diagnostics")
            .and_then(Value::as_str)
            .unwrap_or("refused");
        return Err(format!("{status}: {why}"));
    }
    serde_json::from_value(v).map_err(|e| format!("{url}: the report is unreadable: {e}"))
}
