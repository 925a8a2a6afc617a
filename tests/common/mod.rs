//! Test harness: a real gateway on a free loopback port with a temp data dir, driven over
//! real HTTP. The gateway runs in this process so that tests can read the store's digest
//! (to prove that bad input changed nothing) and stop and restart it on the same data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sp_gateway::config::{Config, EMBEDDED_DEFAULT};
use sp_gateway::gateway::Gateway;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The repository's root (this package is its `tests/` folder): fixtures, config, README.
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

pub const GP: &str = "demo-gp-token"; // gp-pennine: P81001, P81002
pub const GP2: &str = "demo-gp2-token"; // gp-colne: P81003
pub const CRAFTS: &str = "demo-provider-crafts-token"; // pendle-crafts
pub const MONEY: &str = "demo-provider-money-token"; // burnley-money-advice
pub const HOUSING: &str = "demo-provider-housing-token";
pub const HUB: &str = "demo-provider-hub-token";
pub const AUDITOR: &str = "demo-auditor-token";
pub const ADMIN: &str = "demo-admin-token";
pub const REFERRER: &str = "demo-referrer-token"; // lancs-social-care: a council's social care

pub fn fixtures() -> PathBuf {
    Path::new(ROOT).join("fixtures")
}

pub fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}

/// The demo config without its MESH practice (whose outbox worker would write in the
/// background against a sandbox that is not there, and so change store digests that tests
/// compare); `tests/mesh.rs` configures MESH itself. Nor its demo inbox people (below).
pub fn demo_config() -> String {
    without_demo_people(&without_mesh(EMBEDDED_DEFAULT))
}

/// The demo config with its demo inbox people (tests/inbox.rs uses them).
pub fn demo_config_with_people() -> String {
    without_mesh(EMBEDDED_DEFAULT)
}

fn without_mesh(text: &str) -> String {
    match text.find("[practices.mesh]") {
        Some(start) => {
            let end = text[start..]
                .find("\n\n")
                .map(|e| start + e + 1)
                .unwrap_or(text.len());
            format!("{}{}", &text[..start], &text[end..])
        }
        None => text.to_string(),
    }
}

/// Creating the demo people hashes four passwords with argon2id at every start: most tests
/// have no use for them.
fn without_demo_people(text: &str) -> String {
    match text.find("[[inbox.demo_users]]") {
        Some(start) => text[..start].to_string(),
        None => text.to_string(),
    }
}

/// The demo config (without MESH), with `edit` applied to its text.
pub fn config_text(edit: impl Fn(String) -> String) -> String {
    edit(demo_config())
}

pub struct TestGateway {
    pub base: String,
    pub dir: PathBuf,
    pub gateway: Option<Arc<Gateway>>,
    config: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub http: reqwest::Client,
}

/// Stands for "connection closed without a readable response".
pub const CLOSED: StatusCode = match StatusCode::from_u16(599) {
    Ok(s) => s,
    Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
};

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn etag(&self) -> String {
        self.headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    /// The first issue's expression of an OperationOutcome body.
    pub fn expression(&self) -> String {
        self.body
            .pointer("/issue/0/expression/0")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }

    pub fn entries(&self) -> Vec<Value> {
        self.body
            .get("entry")
            .and_then(Value::as_array)
            .map(|e| e.iter().map(|x| x["resource"].clone()).collect())
            .unwrap_or_default()
    }

    pub fn next_link(&self) -> Option<String> {
        self.body
            .get("link")?
            .as_array()?
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string)
    }
}

impl TestGateway {
    pub async fn start(dir: &Path) -> TestGateway {
        Self::start_with(dir, demo_config()).await
    }

    pub async fn start_with(dir: &Path, config: String) -> TestGateway {
        let cfg = Config::parse(&config, "test.toml")
            .expect("test config")
            .with_overrides(
                "test.toml",
                Some("127.0.0.1:0".parse().expect("addr")),
                Some(dir.to_path_buf()),
            )
            .expect("overrides");
        let bound = sp_gateway::server::bind(cfg).await.expect("bind");
        let addr = bound.local_addr().expect("addr");
        let gateway = bound.gateway();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            bound
                .run(async {
                    let _ = rx.await;
                })
                .await
                .expect("server run");
        });
        TestGateway {
            base: format!("http://{addr}"),
            dir: dir.to_path_buf(),
            gateway: Some(gateway),
            config,
            stop: Some(stop),
            task: Some(task),
            http: reqwest::Client::new(),
        }
    }

    /// A client for a gateway running elsewhere (the real binary): the request helpers work,
    /// the store-reading ones do not.
    pub fn remote(base: &str) -> TestGateway {
        TestGateway {
            base: base.trim_end_matches('/').to_string(),
            dir: PathBuf::new(),
            gateway: None,
            config: String::new(),
            stop: None,
            task: None,
            http: reqwest::Client::new(),
        }
    }

    /// Stops the server (in-flight requests finish) and closes the store.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
        // A new client first: the old one's pooled keep-alive connections would otherwise
        // keep their connection tasks, and the handles those hold, alive while we wait.
        self.http = reqwest::Client::new();
        // Connection tasks may still be dropping their handles on the gateway: wait until
        // ours is the last, so that dropping it closes the store (and its lock) now.
        // (Up to 30 s: on a loaded two-core machine connection tasks can be slow to go.)
        if let Some(mut g) = self.gateway.take() {
            for _ in 0..3000 {
                match Arc::try_unwrap(g) {
                    Ok(only) => {
                        drop(only);
                        break;
                    }
                    Err(shared) => {
                        g = shared;
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }

    /// Stops and starts again on the same data dir and config.
    pub async fn restart(&mut self) {
        self.stop().await;
        let fresh = TestGateway::start_with(&self.dir.clone(), self.config.clone()).await;
        *self = fresh;
    }

    /// SHA-256 over every key and value in the store but the audit trail (which records
    /// refused requests too, by design).
    pub fn digest(&self) -> String {
        self.gateway
            .as_ref()
            .expect("running")
            .store()
            .digest_excluding(sp_gateway::audit::PREFIXES)
            .expect("digest")
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let first = self
            .request_with(
                &self.http,
                method.clone(),
                path,
                token,
                content_type,
                body.clone(),
                headers,
            )
            .await;
        if first.status != CLOSED {
            return first;
        }
        // A pooled connection the server had just closed (after refusing an oversized body,
        // say): once more on a fresh connection.
        let fresh = reqwest::Client::new();
        self.request_with(&fresh, method, path, token, content_type, body, headers)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn request_with(
        &self,
        http: &reqwest::Client,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut rb = http.request(method, url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            // The server closed the connection without an answer the client could read (a
            // body refused while it was still being sent): reported as CLOSED.
            Err(e) if e.is_request() || e.is_body() => {
                return Resp {
                    status: CLOSED,
                    headers: Default::default(),
                    body: Value::String(e.to_string()),
                }
            }
            Err(e) => panic!("request: {e}"),
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            // Not JSON: kept as text, so that tests can say so (every error should be an
            // OperationOutcome).
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, token: &str, path: &str) -> Resp {
        self.request(Method::GET, path, Some(token), None, None, &[])
            .await
    }

    pub async fn post_json(&self, token: &str, path: &str, body: &Value) -> Resp {
        let ct = if path == "/referrals" {
            "application/json"
        } else {
            "application/fhir+json"
        };
        self.request(
            Method::POST,
            path,
            Some(token),
            Some(ct),
            Some(body.to_string().into_bytes()),
            &[],
        )
        .await
    }

    pub async fn put_task(&self, token: &str, task: &Value, if_match: Option<&str>) -> Resp {
        let id = task["id"].as_str().expect("task id");
        let mut headers = vec![];
        if let Some(m) = if_match {
            headers.push(("if-match", m));
        }
        self.request(
            Method::PUT,
            &format!("/fhir/Task/{id}"),
            Some(token),
            Some("application/fhir+json"),
            Some(task.to_string().into_bytes()),
            &headers,
        )
        .await
    }

    /// Reads a Task, applies `edit`, and PUTs it with the ETag just read.
    pub async fn transition(&self, token: &str, task_id: &str, edit: impl Fn(&mut Value)) -> Resp {
        let cur = self.get(token, &format!("/fhir/Task/{task_id}")).await;
        assert_eq!(cur.status, 200, "read before transition: {}", cur.body);
        let mut t = cur.body.clone();
        edit(&mut t);
        self.put_task(token, &t, Some(&cur.etag())).await
    }

    /// Posts a WEMWBS outcome Observation as pendle-crafts for a referral; returns it as
    /// stored (201 asserted).
    pub async fn post_outcome(&self, sid: &str, pid: &str, value: i64) -> Value {
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718426000" }] },
            "subject": { "reference": format!("Patient/{pid}") },
            "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
            "performer": [{ "reference": "Organization/pendle-crafts" }],
            "valueInteger": value
        });
        let r = self.post_json(CRAFTS, "/fhir/Observation", &obs).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body
    }

    /// Submits a referral; returns (patient, service request, task) ids.
    pub async fn refer(&self, token: &str, referral: &Value) -> (String, String, String) {
        let r = self.post_json(token, "/referrals", referral).await;
        assert!(
            r.status == 201 || r.status == 200,
            "referral: {} {}",
            r.status,
            r.body
        );
        let e = r.entries();
        let id = |i: usize| e[i]["id"].as_str().expect("id").to_string();
        (id(0), id(1), id(2))
    }
}

/// A referral fixture with another GP referral id (and optionally another NHS number).
pub fn variant(base: &str, referral_id: &str, nhs: Option<&str>) -> Value {
    let mut r = fixture(base);
    r["referralId"] = json!(referral_id);
    if let Some(n) = nhs {
        r["patient"]["nhsNumber"] = json!(n);
    }
    r
}

pub fn status_to(status: &str) -> impl Fn(&mut Value) + '_ {
    move |t: &mut Value| t["status"] = json!(status)
}

pub fn with_reason(status: &str, text: &str) -> impl Fn(&mut Value) {
    let (status, text) = (status.to_string(), text.to_string());
    move |t: &mut Value| {
        t["status"] = json!(status);
        t["statusReason"] = json!({ "text": text });
    }
}

/// The real `sp-gateway` binary serving on a free loopback port; `config` (TOML text) is
/// written beside the data dir when given.
pub fn spawn_binary(data: &Path, config: Option<&str>) -> (std::process::Child, String) {
    spawn_binary_env(data, config, &[])
}

/// [`spawn_binary`] with extra environment variables. The gateway's log (stderr) goes to
/// `{data}.log`, appended, so that a test can read what it said.
pub fn spawn_binary_env(
    data: &Path,
    config: Option<&str>,
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut cmd = gateway_command(data, config);
    cmd.envs(env.iter().copied());
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sp-gateway");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the listening line");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "the gateway did not start: {line:?}; its log: {}",
                std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
            )
        })
        .to_string();
    (child, base)
}

/// `sp-gateway serve` on a free loopback port over `data` (config written beside it when
/// given), logging to `{data}.log`; not started.
pub fn gateway_command(data: &Path, config: Option<&str>) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data);
    if let Some(text) = config {
        let path = data.with_extension("toml");
        std::fs::write(&path, text).expect("write config");
        cmd.arg("--config").arg(path);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.with_extension("log"))
        .expect("gateway log file");
    cmd.current_dir(ROOT)
        .stdin(std::process::Stdio::null())
        .stderr(log);
    cmd
}

/// Sends SIGTERM and waits; returns the exit code.
pub fn terminate(child: &mut std::process::Child) -> Option<i32> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().expect("wait for the gateway").code()
}

/// Installs a Debian package (as root, with apt) unless `probe` already exists: what a test
/// needs, it installs itself, as the conformance suite does for its tools.
/// Tests install at the same time: one apt at a time here (dpkg has one lock, and a second
/// apt-get fails at once without the timeout), and the probe is looked at again once it is
/// this test's turn.
pub fn ensure_debian_package(package: &str, probe: &str) {
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if Path::new(probe).exists() {
        return;
    }
    let _turn = APT.lock().unwrap_or_else(|e| e.into_inner());
    if Path::new(probe).exists() {
        return;
    }
    let install = || {
        std::process::Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=300",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                package,
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !install() {
        let _ = std::process::Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300", "update", "-qq"])
            .output();
        assert!(
            install(),
            "this test needs the Debian package {package} and could not install it with apt-get (run the tests as root on Debian, or install it by hand)"
        );
    }
    assert!(
        Path::new(probe).exists(),
        "{package} was installed but {probe} is missing"
    );
}

/// Demo config with a rate limit a test's few clients cannot reach.
pub fn unthrottled_config() -> String {
    config_text(|t| {
        t.replacen(
            "[[practices]]",
            "[server.limits]\nrate_per_second = 1000000\nrate_burst = 1000000\n\n[[practices]]",
            1,
        )
    })
}

/// The `n`-th synthetic NHS number of the 999 test range with a valid check digit.
pub fn nhs_number(n: usize) -> String {
    let mut k = n * 3 + 1;
    loop {
        let n9 = format!("999{k:06}");
        let sum: u32 = n9
            .chars()
            .zip((2..=10).rev())
            .filter_map(|(d, w)| d.to_digit(10).map(|d| d * w))
            .sum();
        let c = (11 - sum % 11) % 11;
        if c != 10 {
            return format!("{n9}{c}");
        }
        k += 1;
    }
}

/// A referral that no route matches (employment, in BB9): it goes to the fallback hub.
pub fn hub_referral(id: &str, n: usize) -> Value {
    let mut r = variant("referral-ada.json", id, Some(&nhs_number(n)));
    r["needs"] = json!(["employment"]);
    r["reasons"] = json!([]);
    r
}

/// A gateway process that is killed if the test ends (or panics) before stopping it, so a
/// failed test leaves no server behind.
pub struct Guarded(pub std::process::Child);

impl std::ops::Deref for Guarded {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Parses `resource` with fhir-sdk's typed R4B model of `rtype` (any type the gateway emits):
/// the error names the element that failed.
pub fn fhir_sdk_parse(resource: &Value, rtype: &str) -> Result<(), String> {
    use fhir_sdk::r4b::resources as r;
    fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        serde_path_to_error::deserialize::<_, T>(v.clone())
            .map(drop)
            .map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }
    match rtype {
        "Task" => parse::<r::Task>(resource),
        "Observation" => parse::<r::Observation>(resource),
        "ServiceRequest" => parse::<r::ServiceRequest>(resource),
        "Patient" => parse::<r::Patient>(resource),
        "Organization" => parse::<r::Organization>(resource),
        "HealthcareService" => parse::<r::HealthcareService>(resource),
        "Location" => parse::<r::Location>(resource),
        "Bundle" => parse::<r::Bundle>(resource),
        "OperationOutcome" => parse::<r::OperationOutcome>(resource),
        "CapabilityStatement" => parse::<r::CapabilityStatement>(resource),
        "AuditEvent" => parse::<r::AuditEvent>(resource),
        "Provenance" => parse::<r::Provenance>(resource),
        "Measure" => parse::<r::Measure>(resource),
        "MeasureReport" => parse::<r::MeasureReport>(resource),
        other => Err(format!("no typed parser for {other}")),
    }
}

/// Runs `sp-gateway ARGS…` (a command-line tool on a stopped store) and returns its output.
pub fn cli<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    std::process::Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run sp-gateway")
}

/// `sp-gateway audit verify --data-dir DATA` on a stopped store.
pub fn audit_verify(data: &Path) -> std::process::Output {
    cli([
        std::ffi::OsStr::new("audit"),
        "verify".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ])
}
