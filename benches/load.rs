//! sp-gateway load benchmark: starts the real gateway (the `sp-gateway` binary built beside
//! this one) on a temp data dir and measures, over several runs, durable referral ingest at
//! several concurrencies, provider polling latency at several store sizes, Task update +
//! Observation throughput, peak RSS, store size and start-up time. Prints a Markdown table
//! of medians with min and max.
//!
//!   cargo build --release && ./target/release/sp-gateway-bench            # full
//!   ./target/release/sp-gateway-bench --quick                             # seconds
//!   ./target/release/sp-gateway-bench --runs 3 --sizes 10000,100000
//!   ./target/release/sp-gateway-bench --census --lives 2000                # what a life writes
//!   ./target/release/sp-gateway-bench --census --bulk --lives 1000000      # the same, in process
//!   ./target/release/sp-gateway-bench --census --bulk --archive            # archiving as it goes
//!   ./target/release/sp-gateway-bench --census --bulk --reports --lives 100000 # figures' latency
//!   ./target/release/sp-gateway-bench --reports-fill 1000000               # the same, counters only
//!   ./target/release/sp-gateway-bench --gateway PATH                       # another build
//!   ./target/release/sp-gateway-bench --census --lives 200 --dictionary F  # store's dictionary
//!
//! Load comes from this process, on the same machine, over loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The gateway's own allocator (src/main.rs), so that `--bulk`, which runs the gateway in
/// this process, costs what the binary costs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const GP: &str = "demo-gp-token";
const HUB: &str = "demo-provider-hub-token";
const AUDITOR: &str = "demo-auditor-token";
const COMMISSIONER: &str = "demo-commissioner-token";
const DAY_US: i64 = 86_400_000_000;

struct Opts {
    quick: bool,
    /// Run the census instead: `lives` referrals through a realistic life each, then count
    /// what the store holds, by kind of key.
    census: Option<usize>,
    /// The census through the gateway's use cases in this process, not over HTTP.
    bulk: bool,
    cache_mb: Option<u64>,
    /// With the census: write the store's value dictionary (see [`write_dictionary`]).
    dictionary: Option<PathBuf>,
    /// With the census: the gateway archives closed referrals as they close (`[archive]
    /// after_days = 0`, every 5 s), and what remains is archived before counting.
    archive: bool,
    /// With `--census --bulk`: the lives spread over a simulated year (the commit clock
    /// moved on per batch), then the year's figures read and timed (`--reports`).
    reports: bool,
    /// Time the figures over the counters that `N` referrals' writes leave, made directly
    /// from synthetic facts by the gateway's own `report::cells` (`--reports-fill N`).
    fill: Option<usize>,
    runs: usize,
    sizes: Vec<usize>,
    /// Reads by id in the read phase (`--reads N`; 5,000, or 200 with `--quick`).
    reads: usize,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs = get("--runs")
        .and_then(|r| r.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let sizes = get("--sizes")
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| {
            if quick {
                vec![300]
            } else {
                vec![10_000, 100_000]
            }
        });
    let cache_mb = get("--cache-mb").and_then(|c| c.parse().ok());
    let census = args.iter().any(|a| a == "--census").then(|| {
        get("--lives")
            .and_then(|n| n.parse().ok())
            .unwrap_or(if quick { 200 } else { 2000 })
    });
    Opts {
        quick,
        census,
        bulk: args.iter().any(|a| a == "--bulk"),
        cache_mb,
        dictionary: get("--dictionary").map(PathBuf::from),
        archive: args.iter().any(|a| a == "--archive"),
        reports: args.iter().any(|a| a == "--reports"),
        fill: get("--reports-fill").and_then(|n| n.parse().ok()),
        runs,
        sizes,
        reads: get("--reads")
            .and_then(|n| n.parse().ok())
            .unwrap_or(if quick { 200 } else { 5000 }),
    }
}

/// The gateway to measure: `--gateway PATH`, else the `sp-gateway` built beside this binary.
fn gateway_binary() -> PathBuf {
    let args: Vec<String> = std::env::args().collect();
    if let Some(path) = args
        .iter()
        .position(|a| a == "--gateway")
        .and_then(|i| args.get(i + 1))
    {
        return PathBuf::from(path);
    }
    let me = std::env::current_exe().expect("own path");
    me.parent().expect("dir").join("sp-gateway")
}

struct Gateway {
    child: Child,
    base: String,
    data: PathBuf,
}

fn config(dir: &Path, cache_mb: Option<u64>) -> PathBuf {
    let mut text = include_str!("../config/gateway.toml").to_string();
    if let Some(mb) = cache_mb {
        text = text.replacen(
            "max_body_bytes = 262144",
            &format!("max_body_bytes = 262144\ncache_mb = {mb}"),
            1,
        );
    }
    let text = text.replacen(
        "[[practices]]",
        "[server.limits]\nrate_per_second = 10000000\nrate_burst = 10000000\nmax_concurrent_requests = 4096\n\n[[practices]]",
        1,
    );
    // `--archive`: the gateway's own archiver, as deployed, with no wait after a referral
    // closes, looking every five seconds.
    let text = if ARCHIVE.load(std::sync::atomic::Ordering::Relaxed) {
        text + "\n[archive]\nafter_days = 0\ninterval_secs = 5\n"
    } else {
        text
    };
    let p = dir.join("bench.toml");
    std::fs::write(&p, text).expect("config");
    p
}

/// `--archive` (the census): the gateway archives closed referrals while the lives run.
static ARCHIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn start(dir: &Path, cache_mb: Option<u64>) -> (Gateway, Duration) {
    let data = dir.join("data");
    let binary = gateway_binary();
    let t = Instant::now();
    let mut child = Command::new(&binary)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config(dir, cache_mb))
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start the gateway at {} ({e}): build it first (cargo build --release) \
                 or name it with --gateway PATH",
                binary.display()
            )
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let took = t.elapsed();
    let base = line.trim().trim_start_matches("listening on ").to_string();
    (Gateway { child, base, data }, took)
}

fn stop(mut g: Gateway) {
    let _ = Command::new("kill")
        .args(["-TERM", &g.child.id().to_string()])
        .status();
    let _ = g.child.wait();
}

fn nhs(n: usize) -> String {
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
        if k > 999_999 {
            k = 1;
        }
    }
}

fn referral(id: usize) -> String {
    let mut r: Value =
        serde_json::from_str(include_str!("../fixtures/referral-ada.json")).expect("fixture");
    r["referralId"] = json!(format!("BENCH-{id}"));
    r["patient"]["nhsNumber"] = json!(nhs(id % 300_000));
    r["needs"] = json!(["employment"]); // no route matches: the hub, which has room
    r["reasons"] = json!([]);
    r.to_string()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Sends requests `first..first + n` with `conc` concurrent clients (`request(client, i)`
/// makes request `i`; a request that fails panics); returns (requests per second, sorted
/// latencies).
async fn drive(
    first: usize,
    n: usize,
    conc: usize,
    request: impl Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> (f64, Vec<Duration>) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(conc)
        .build()
        .expect("client");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(first));
    let request = Arc::new(request);
    let end = first + n;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (http, next, request) = (http.clone(), next.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return lat;
                }
                let s = Instant::now();
                let r = request(&http, i).send().await.expect("request");
                assert!(r.status().is_success(), "request {i}: {}", r.status());
                let _ = r.bytes().await;
                lat.push(s.elapsed());
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("worker"));
    }
    let secs = t.elapsed().as_secs_f64();
    lat.sort();
    (n as f64 / secs, lat)
}

/// POSTs `n` referrals (ids from `first`) with `conc` concurrent clients; returns
/// (requests per second, latencies).
async fn ingest(base: &str, first: usize, n: usize, conc: usize) -> (f64, Vec<Duration>) {
    let base = base.to_string();
    drive(first, n, conc, move |http, i| {
        http.post(format!("{base}/referrals"))
            .bearer_auth(GP)
            .header("content-type", "application/json")
            .body(referral(i))
    })
    .await
}

async fn poll(base: &str, n: usize) -> Vec<Duration> {
    let http = reqwest::Client::new();
    let mut lat = Vec::new();
    for _ in 0..n {
        let s = Instant::now();
        let r = http
            .get(format!(
                "{base}/fhir/Task?owner=pendle-cvs-hub&status=requested&_count=50"
            ))
            .bearer_auth(HUB)
            .send()
            .await
            .expect("poll");
        assert!(r.status().is_success());
        let _ = r.bytes().await;
        lat.push(s.elapsed());
    }
    lat.sort();
    lat
}

/// Accepts `n` Tasks and posts an Observation for each, 16 at a time; pairs per second.
async fn work(base: &str, n: usize) -> f64 {
    let http = reqwest::Client::new();
    let page: Value = http
        .get(format!(
            "{base}/fhir/Task?owner=pendle-cvs-hub&status=requested&_count={}",
            n.min(200)
        ))
        .bearer_auth(HUB)
        .send()
        .await
        .expect("tasks")
        .json()
        .await
        .expect("bundle");
    let tasks: Vec<Value> = page["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect();
    let t = Instant::now();
    let mut handles = Vec::new();
    for chunk in tasks.chunks(tasks.len().div_ceil(16).max(1)) {
        let (http, base, chunk) = (http.clone(), base.to_string(), chunk.to_vec());
        handles.push(tokio::spawn(async move {
            for mut task in chunk {
                let id = task["id"].as_str().unwrap_or_default().to_string();
                task["status"] = json!("accepted");
                let r = http.put(format!("{base}/fhir/Task/{id}")).bearer_auth(HUB).header("content-type", "application/fhir+json").header("if-match", "W/\"1\"").body(task.to_string()).send().await.expect("put");
                assert!(r.status().is_success(), "update {}", r.status());
                let obs = json!({
                    "resourceType": "Observation", "status": "final",
                    "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
                    "subject": task["for"], "basedOn": [task["focus"]],
                    "performer": [{ "reference": "Organization/pendle-cvs-hub" }], "valueInteger": 20
                });
                let r = http.post(format!("{base}/fhir/Observation")).bearer_auth(HUB).header("content-type", "application/fhir+json").body(obs.to_string()).send().await.expect("obs");
                assert!(r.status().is_success(), "observation {}", r.status());
            }
        }));
    }
    for h in handles {
        h.await.expect("worker");
    }
    tasks.len() as f64 / t.elapsed().as_secs_f64()
}

/// The first page of the hub's requested Tasks (ids and the ServiceRequests they serve).
async fn some_tasks(base: &str, n: usize) -> Vec<(String, String)> {
    let page: Value = reqwest::Client::new()
        .get(format!(
            "{base}/fhir/Task?owner=pendle-cvs-hub&status=requested&_count={n}"
        ))
        .bearer_auth(HUB)
        .send()
        .await
        .expect("tasks")
        .json()
        .await
        .expect("bundle");
    page["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    let t = &e["resource"];
                    let sr = t["focus"]["reference"].as_str().unwrap_or_default();
                    (
                        t["id"].as_str().unwrap_or_default().to_string(),
                        sr.trim_start_matches("ServiceRequest/").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `n` GETs of `paths` in turn with `token`, `conc` at a time: (requests per second,
/// sorted latencies). Each is audited by the gateway, as every read is.
async fn reads(
    base: &str,
    token: &str,
    paths: &[String],
    n: usize,
    conc: usize,
) -> (f64, Vec<Duration>) {
    if paths.is_empty() {
        return (0.0, Vec::new());
    }
    let (base, token, paths) = (base.to_string(), token.to_string(), paths.to_vec());
    drive(0, n, conc, move |http, i| {
        http.get(format!("{base}{}", paths[i % paths.len()]))
            .bearer_auth(&token)
    })
    .await
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn dir_mb(p: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        e.metadata()
                            .map(|m| if m.is_dir() { walk(&e.path()) } else { m.len() })
                            .unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(p) as f64 / 1e6
}

/// CPU time (user + system) the process has used so far, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    ticks * 1000.0 / 100.0 // USER_HZ is 100 on Linux
}

/// Median, min and max of a metric over runs.
fn summary(xs: &[f64]) -> String {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let med = v[v.len() / 2];
    format!("{med:.1} ({:.1}–{:.1})", v[0], v[v.len() - 1])
}

/// Sends one request and returns its JSON body, panicking on anything but success.
async fn call(r: reqwest::RequestBuilder, what: &str) -> Value {
    let r = r.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert!(status.is_success(), "{what}: {status} {body}");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// How the census reaches the gateway: over HTTP to the real binary, or (`--bulk`) through
/// the same `gateway` use cases in this process, each inside an audit scope closed by
/// `audit::finish` as the HTTP layer closes it. What the bulk path leaves out: TCP, HTTP
/// parsing, the bearer token's hash, the rate and concurrency limits, and serialising the
/// responses. What it keeps: validation, routing, the state machine, every store
/// transaction with its durable commit (one group flush shared by concurrent writes), and
/// every AuditEvent with what each read disclosed. Same writes, same keys.
enum Driver {
    Http { http: reqwest::Client, base: String },
    InProcess(Arc<InProcess>),
}

struct InProcess {
    gw: Arc<sp_gateway::gateway::Gateway>,
    gp: sp_gateway::auth::Principal,
    hub: sp_gateway::auth::Principal,
    commissioner: sp_gateway::auth::Principal,
}

impl InProcess {
    /// Runs `f` as `who`'s request `method path?query`, audited as the HTTP layer audits it.
    async fn call<T>(
        &self,
        who: &sp_gateway::auth::Principal,
        (method, path, query): (&str, &str, Option<&str>),
        f: impl std::future::Future<Output = sp_gateway::error::Result<T>>,
    ) -> T {
        use sp_gateway::audit;
        let ctx = audit::Context {
            peer: Some("127.0.0.1".into()),
            method: method.to_string(),
            path: path.to_string(),
            query: query.map(str::to_string),
            ..Default::default()
        };
        let (r, ctx) = audit::scope(ctx, async {
            audit::set_client(&who.client_id, who.role.as_str(), who.organisations());
            let r = f.await;
            (r, audit::current())
        })
        .await;
        let status = if r.is_ok() { 200 } else { 500 };
        if let Some(ctx) = ctx {
            audit::finish(self.gw.store(), &ctx, status).expect("audit");
        }
        r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A search as `who`, its searchset disclosed to the audit trail as the HTTP layer does.
    async fn search(
        &self,
        who: &sp_gateway::auth::Principal,
        rtype: &str,
        params: &[(&str, &str)],
    ) -> Value {
        use sp_gateway::gateway;
        let pairs: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // As the HTTP client sends it (the AuditEvent keeps the query).
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let query = query.join("&");
        let path = format!("/fhir/{rtype}");
        self.call(who, ("GET", &path, Some(&query)), async {
            let q = gateway::search::Query::parse(rtype, &pairs, true)?;
            let result = self.gw.search(who, &q)?;
            let bundle = gateway::searchset("http://bulk/fhir", &q, result);
            sp_gateway::audit::disclose(gateway::disclosed_by(&bundle));
            Ok(bundle)
        })
        .await
    }
}

impl Driver {
    async fn ingest(&self, first: usize, n: usize) {
        match self {
            Driver::Http { base, .. } => {
                ingest(base, first, n, 16).await;
            }
            Driver::InProcess(p) => {
                let mut handles = Vec::new();
                for c in 0..16 {
                    let p = p.clone();
                    handles.push(tokio::spawn(async move {
                        for i in (first + c..first + n).step_by(16) {
                            let body = referral(i);
                            p.call(
                                &p.gp,
                                ("POST", "/referrals", None),
                                p.gw.submit_referral(&p.gp, body.as_bytes()),
                            )
                            .await;
                        }
                    }));
                }
                for h in handles {
                    h.await.expect("ingest");
                }
            }
        }
    }

    /// The provider's poll: the oldest `count` requested Tasks.
    async fn poll(&self, count: usize) -> Value {
        match self {
            Driver::Http { http, base } => {
                let poll = format!(
                    "{base}/fhir/Task?owner=pendle-cvs-hub&status=requested&_count={count}"
                );
                call(http.get(&poll).bearer_auth(HUB), "poll").await
            }
            Driver::InProcess(p) => {
                let count = count.to_string();
                p.search(
                    &p.hub,
                    "Task",
                    &[
                        ("owner", "pendle-cvs-hub"),
                        ("status", "requested"),
                        ("_count", &count),
                    ],
                )
                .await
            }
        }
    }

    /// One referral's life after ingest and the provider's two polls: accept, in progress,
    /// an outcome Observation, complete naming it, and the GP pulling the outcome.
    async fn life(&self, task: Value) {
        let id = task["id"].as_str().unwrap_or_default().to_string();
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
            "subject": task["for"], "basedOn": [task["focus"]], "valueInteger": 24
        });
        let sr = task["focus"]["reference"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let complete = |t: &mut Value, obs: &Value| {
            t["status"] = json!("completed");
            t["output"] = json!([{ "type": { "text": "SWEMWBS" }, "valueReference": { "reference": format!("Observation/{}", obs["id"].as_str().unwrap_or_default()) } }]);
        };
        match self {
            Driver::Http { http, base } => {
                let put = |t: &Value| {
                    http.put(format!("{base}/fhir/Task/{id}"))
                        .bearer_auth(HUB)
                        .header("content-type", "application/fhir+json")
                        .body(t.to_string())
                };
                let mut t = task.clone();
                t["status"] = json!("accepted");
                let mut t = call(put(&t), "accept").await;
                t["status"] = json!("in-progress");
                let mut t = call(put(&t), "in progress").await;
                let obs = call(
                    http.post(format!("{base}/fhir/Observation"))
                        .bearer_auth(HUB)
                        .header("content-type", "application/fhir+json")
                        .body(obs.to_string()),
                    "observation",
                )
                .await;
                complete(&mut t, &obs);
                call(put(&t), "complete").await;
                call(
                    http.get(format!("{base}/fhir/Observation?based-on={sr}"))
                        .bearer_auth(GP),
                    "GP pull",
                )
                .await;
            }
            Driver::InProcess(p) => {
                let path = format!("/fhir/Task/{id}");
                let put = |t: Value| {
                    let (p, id, path) = (p.clone(), id.clone(), path.clone());
                    async move {
                        let body = t.to_string();
                        p.call(
                            &p.hub,
                            ("PUT", &path, None),
                            p.gw.update_task(&p.hub, &id, None, body.as_bytes()),
                        )
                        .await
                    }
                };
                let mut t = task.clone();
                t["status"] = json!("accepted");
                let mut t = put(t).await;
                t["status"] = json!("in-progress");
                let mut t = put(t).await;
                let body = obs.to_string();
                let obs = p
                    .call(
                        &p.hub,
                        ("POST", "/fhir/Observation", None),
                        p.gw.create_observation(&p.hub, body.as_bytes()),
                    )
                    .await;
                complete(&mut t, &obs);
                put(t).await;
                p.search(&p.gp, "Observation", &[("based-on", &sr)]).await;
            }
        }
    }
}

/// The gateway on `dir` in this process (`--bulk`): the same config as [`start`], the
/// same server with its background work (outbox, checkpoints), no client over HTTP.
async fn start_in_process(
    dir: &Path,
    cache_mb: Option<u64>,
) -> (
    Arc<InProcess>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let cfg = bench_config(dir, cache_mb);
    let auth = sp_gateway::auth::Authenticator::new(&cfg);
    let who = |token: &str| {
        auth.authenticate(Some(&format!("Bearer {token}")), None)
            .expect("demo token")
    };
    let (gp, hub, commissioner) = (who(GP), who(HUB), who(COMMISSIONER));
    let bound = sp_gateway::server::bind(cfg).await.expect("bind");
    let gw = bound.gateway();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        bound
            .run(async {
                let _ = rx.await;
            })
            .await
            .expect("server run");
    });
    (
        Arc::new(InProcess {
            gw,
            gp,
            hub,
            commissioner,
        }),
        stop,
        task,
    )
}

/// The config [`start`] gives the gateway, as the library reads it.
fn bench_config(dir: &Path, cache_mb: Option<u64>) -> sp_gateway::config::Config {
    use sp_gateway::config::Config;
    let path = config(dir, cache_mb);
    let text = std::fs::read_to_string(&path).expect("config");
    Config::parse(&text, "bench.toml")
        .and_then(|c| {
            c.with_overrides(
                "bench.toml",
                Some("127.0.0.1:0".parse().expect("addr")),
                Some(dir.join("data")),
            )
        })
        .expect("bench config")
}

/// `--archive`: moves every closed referral of the stopped gateway's store to the archive,
/// as `sp-gateway archive run --after-days 0` does; prints what it did and how long it took.
fn archive_all(dir: &Path, cache_mb: Option<u64>) {
    let cfg = bench_config(dir, cache_mb);
    let store = sp_gateway::store::Store::open_with(
        &cfg.server.data_dir,
        sp_gateway::server::store_options(&cfg),
    )
    .expect("open the store");
    let gw = sp_gateway::gateway::Gateway::new(Arc::new(cfg), store);
    let t = Instant::now();
    let cpu0 = cpu_ms(std::process::id());
    let r = sp_gateway::server::archive_due(&gw, 0, 500).expect("archive");
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_ms(std::process::id()) - cpu0;
    println!(
        "Archived {} referrals and {} audit records in {secs:.1} s ({:.0} referrals a second, CPU {:.2} ms each); {} keys fewer, {:.0} bytes moved per referral; {} passed over",
        r.archived,
        r.audit_records,
        r.archived as f64 / secs.max(1e-9),
        cpu / (r.archived.max(1) as f64),
        r.keys_removed,
        r.bytes_moved as f64 / r.archived.max(1) as f64,
        r.passed_over
    );
    println!();
}

/// The family of a kind of key, for the census's summary table.
fn family(kind: &str) -> &'static str {
    match kind {
        "r/Provenance" => "Provenance (`r/Provenance`)",
        "a" => "audit chain (`a/`)",
        "b" | "n" => "by patient, referral, NHS number (`p/`, `b/`, `n/`)",
        "z" => "archived resources: where each group is (`z/`)",
        k if k.starts_with("r/") => "current versions (`r/`)",
        k if k.starts_with("h/") => "history (`h/`)",
        k if k.starts_with("x/ae/") => "audit indexes (`x/ae/`)",
        k if k.starts_with("x/prov/") => "Provenance index (`x/prov/`)",
        k if k.starts_with("x/acc/") => "access (`x/acc/`)",
        k if k.starts_with("x/") => "time indexes by scope and status (`x/{Type}/`)",
        k if k.starts_with("y/") => "type history (`y/`)",
        k if k.starts_with("p/") => "by patient, referral, NHS number (`p/`, `b/`, `n/`)",
        k if k.starts_with("k/") => "idempotency and links (`k/`)",
        _ => "other (`c/`, `o/`, `u/`)",
    }
}

/// Writes, from a census's store, the sample values that `src/store/dictionary-1.txt` holds
/// (`--census --dictionary FILE`): for each kind of key whose values are JSON (but the
/// accounts of people, `u/`, which hold password hashes), its first value of 48 bytes or
/// more, one a line, the kinds with the fewest bytes first (LZ4 finds the nearest bytes of
/// its dictionary cheapest, and the end of it is nearest). Synthetic data only: the
/// census's referrals are made up, with NHS numbers of the 999 range.
fn write_dictionary(store: &sp_gateway::store::Store, path: &Path) {
    let mut kinds: std::collections::BTreeMap<String, (u64, Option<Vec<u8>>)> = Default::default();
    store
        .for_each(b"", |k, v| {
            let kind = sp_gateway::gateway::keys::kind(k);
            if kind.starts_with("u/") || !v.starts_with(b"{") {
                return Ok(());
            }
            let e = kinds.entry(kind).or_default();
            e.0 += v.len() as u64;
            if e.1.is_none() && v.len() >= 48 {
                e.1 = Some(v.to_vec());
            }
            Ok(())
        })
        .expect("scan");
    let mut samples: Vec<(u64, Vec<u8>)> = kinds
        .into_values()
        .filter_map(|(bytes, v)| v.map(|v| (bytes, v)))
        .collect();
    samples.sort();
    let mut out = Vec::new();
    for (_, v) in samples {
        out.extend_from_slice(&v);
        out.push(b'\n');
    }
    std::fs::write(path, &out).expect("write the dictionary");
    eprintln!("wrote {} ({} bytes)", path.display(), out.len());
}

/// The year after this one (by the wall clock).
fn next_year() -> i32 {
    let month = sp_gateway::report::month_of(sp_gateway::clock::Now::current().micros);
    month
        .get(..4)
        .and_then(|y| y.parse::<i32>().ok())
        .unwrap_or(2026)
        + 1
}

/// 1 January of `year`, µs.
fn year_start(year: i32) -> i64 {
    sp_gateway::clock::micros_of(&format!("{year:04}-01-01T00:00:00Z"))
}

/// Moves the store's commit clock on to `at` (µs): the next write is stamped just after it.
fn set_clock(store: &sp_gateway::store::Store, at: i64) {
    store
        .transact::<_, sp_gateway::error::Error>(|tx| {
            tx.put(b"c/clock", (at - 1).to_string().as_bytes())?;
            Ok(())
        })
        .expect("clock");
}

/// Times the figures for `year` as the commissioner reads them: each Measure's
/// `$evaluate-measure` for the whole year and for one month, and the `/reports` page's one
/// reading of all five (`evaluate_all`), each audited as the HTTP layer audits it; 21 times
/// each, after one untimed read. Prints a Markdown table: median and slowest, in ms, and how
/// many counter keys the year holds.
async fn time_figures(p: &InProcess, year: i32, what: &str) {
    let who = &p.commissioner;
    let months =
        p.gw.store()
            .scan(format!("m/c/{year}-").as_bytes(), None, 10_000_000)
            .expect("scan")
            .len();
    println!("Figures over {what}: the year holds {months} counter keys (`m/c/{year}-*`)");
    println!();
    println!("| read (as the commissioner, audited) | median ms | slowest ms |");
    println!("| --- | --- | --- |");
    let (start, end) = (format!("{year}-01"), format!("{year}-12"));
    let mut reads: Vec<(String, String, String, bool)> = sp_gateway::report::MEASURES
        .iter()
        .map(|m| (m.0.to_string(), start.clone(), end.clone(), false))
        .collect();
    reads.push((
        "referrals-received".into(),
        format!("{year}-06"),
        format!("{year}-06"),
        false,
    ));
    reads.push((
        "all five (the /reports page)".into(),
        start.clone(),
        end.clone(),
        true,
    ));
    for (id, from, to, all) in reads {
        let mut times = Vec::new();
        for i in 0..22 {
            let t = Instant::now();
            let path = format!("/fhir/Measure/{id}/$evaluate-measure");
            let query = format!("periodStart={from}&periodEnd={to}");
            let n = p
                .call(who, ("GET", &path, Some(&query)), async {
                    if all {
                        p.gw.evaluate_all(who, &from, &to).map(|r| r.len())
                    } else {
                        p.gw.evaluate_measure(who, &id, &from, &to).map(|_| 1)
                    }
                })
                .await;
            assert!(n >= 1);
            if i > 0 {
                times.push(t.elapsed());
            }
        }
        times.sort();
        let label = if from == to {
            format!("`{id}`, one month")
        } else if all {
            id.clone()
        } else {
            format!("`{id}`, a year")
        };
        println!(
            "| {label} | {:.2} | {:.2} |",
            pct(&times, 0.5),
            pct(&times, 1.0)
        );
    }
    println!();
}

/// `--reports-fill N`: a store holding the counters that `N` referrals received over a year
/// leave, made without the referrals: synthetic facts (needs, practices, providers, ages,
/// dispositions, days to each step, SWEMWBS pairs; fixed seed) folded by the gateway's own
/// `report::cells` into `m/c/{month}/{cell}` counters, as the write path adds them. The
/// figures are then timed as in the census. This measures what a report reads (counters),
/// at a size the bulk census cannot reach in a session (1M lives ≈ 100 min).
async fn reports_fill(n: usize, cache_mb: Option<u64>) {
    use sp_gateway::report::{Facts, Score, TaskFacts, AGE_BANDS};
    let dir = std::env::temp_dir().join(format!("sp-gateway-fill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = bench_config(&dir, cache_mb);
    let year = next_year();
    let t0 = year_start(year);
    let mut seed = 0x5eed_u64;
    let mut below = |k: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % k
    };
    let needs: Vec<String> = cfg.needs.iter().map(|x| x.name.clone()).collect();
    let practices: Vec<String> = cfg.practices.iter().map(|x| x.ods.clone()).collect();
    let providers: Vec<String> = cfg.providers.iter().map(|x| x.id.clone()).collect();
    let t = Instant::now();
    let mut counters: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for i in 0..n {
        let received = t0 + (below(365 * 86_400) as i64) * 1_000_000;
        let mut f = Facts {
            received,
            needs: vec![needs[below(needs.len() as u64) as usize].clone()],
            practice: practices[below(practices.len() as u64) as usize].clone(),
            source: ["GP", "self", "other"][below(3) as usize].into(),
            urgency: if below(10) == 0 { "urgent" } else { "routine" }.into(),
            age_band: AGE_BANDS[below(9) as usize].into(),
            sex: ["female", "male", "other"][below(3) as usize].into(),
            ..Default::default()
        };
        if below(5) == 0 {
            f.needs
                .push(needs[below(needs.len() as u64) as usize].clone());
        }
        let fate = below(100);
        let day = |d: u64| received + d as i64 * DAY_US;
        let mut task = TaskFacts {
            created: received,
            owner: providers[below(providers.len() as u64) as usize].clone(),
            status: "requested".into(),
            ..Default::default()
        };
        if fate < 70 {
            let a = 1 + below(30);
            task.accepted = Some(day(a));
            task.status = "accepted".into();
            if fate < 55 {
                let c = a + below(30);
                task.contact = Some(day(c));
                task.status = "in-progress".into();
                if fate < 40 {
                    let first = 7 + below(20) as i64;
                    f.scores.insert(
                        format!("o{i}a"),
                        Score {
                            code: "718466001".into(),
                            at: day(c + 1),
                            value: first,
                        },
                    );
                    f.scores.insert(
                        format!("o{i}b"),
                        Score {
                            code: "718466001".into(),
                            at: day(c + 60),
                            value: (first + below(13) as i64 - 4).clamp(7, 35),
                        },
                    );
                    task.completed = Some(day(c + 61));
                    task.status = "completed".into();
                }
            }
        } else if fate < 85 {
            task.status = "rejected".into();
            task.reason = "patient-declined".into();
        }
        f.tasks.insert(format!("t{i}"), task);
        for (k, v) in sp_gateway::report::cells(&f) {
            *counters.entry(k).or_insert(0) += v;
        }
    }
    let store = sp_gateway::store::Store::open_with(
        &cfg.server.data_dir,
        sp_gateway::server::store_options(&cfg),
    )
    .expect("open the store");
    let keys: Vec<_> = counters.into_iter().collect();
    for chunk in keys.chunks(5_000) {
        store
            .transact::<_, sp_gateway::error::Error>(|tx| {
                for ((month, cell), v) in chunk {
                    tx.put(
                        format!("m/c/{month}/{cell}").as_bytes(),
                        v.to_string().as_bytes(),
                    )?;
                }
                Ok(())
            })
            .expect("counters");
    }
    store.durable_blocking().expect("flush");
    drop(store);
    eprintln!(
        "filled the counters of {n} referrals in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (p, stop, task) = start_in_process(&dir, cache_mb).await;
    time_figures(
        &p,
        year,
        &format!("the counters of {n} synthetic referrals"),
    )
    .await;
    drop(p);
    let _ = stop.send(());
    task.await.expect("stopped");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The census (`--census`): `lives` referrals, each through a realistic life (ingest, two
/// polls that return it, accept, in progress, one outcome Observation, complete, one GP
/// pull), 50 at a time with 16 clients; then a clean stop, the data directory's size on
/// disk, and every key in the store counted by kind (`gateway::keys::kind`). Prints
/// Markdown.
async fn census(
    lives: usize,
    cache_mb: Option<u64>,
    bulk: bool,
    dictionary: Option<&Path>,
    archive: bool,
    reports: bool,
) {
    const BATCH: usize = 50;
    let lives = lives.div_ceil(BATCH) * BATCH;
    assert!(
        !reports || bulk,
        "--reports needs --bulk (it moves the store's clock)"
    );
    // With --reports: the lives over a simulated year, the year after this one.
    let year = next_year();
    let t0 = year_start(year);
    let dir = std::env::temp_dir().join(format!("sp-gateway-census-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Over HTTP: the real binary, measured from outside. In process: this process.
    let (driver, server) = if bulk {
        let (p, stop, task) = start_in_process(&dir, cache_mb).await;
        (Driver::InProcess(p), Err((stop, task)))
    } else {
        let (g, _) = start(&dir, cache_mb);
        let driver = Driver::Http {
            http: reqwest::Client::new(),
            base: g.base.clone(),
        };
        (driver, Ok(g))
    };
    let pid = match &server {
        Ok(g) => g.child.id(),
        Err(_) => std::process::id(),
    };
    let driver = Arc::new(driver);
    let cpu0 = cpu_ms(pid);
    let t = Instant::now();
    for batch in 0..lives / BATCH {
        if let (true, Driver::InProcess(p)) = (reports, &*driver) {
            let at = t0 + (batch as i64 * 365 * DAY_US) / (lives / BATCH) as i64;
            set_clock(p.gw.store(), at);
        }
        driver.ingest(batch * BATCH, BATCH).await;
        driver.poll(BATCH).await;
        let page = driver.poll(BATCH).await;
        let tasks: Vec<Value> = page["entry"]
            .as_array()
            .map(|e| e.iter().map(|e| e["resource"].clone()).collect())
            .unwrap_or_default();
        assert_eq!(
            tasks.len(),
            BATCH,
            "each poll returns the batch just ingested"
        );
        let mut handles = Vec::new();
        for chunk in tasks.chunks(BATCH.div_ceil(16)) {
            let (driver, chunk) = (driver.clone(), chunk.to_vec());
            handles.push(tokio::spawn(async move {
                for task in chunk {
                    driver.life(task).await;
                }
            }));
        }
        for h in handles {
            h.await.expect("life");
        }
        if ((batch + 1) * BATCH).is_multiple_of(1000) {
            eprintln!("{} lives", (batch + 1) * BATCH);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_ms(pid) - cpu0;
    let rss = peak_rss_mb(pid);
    let data = dir.join("data");
    if let (true, Driver::InProcess(p)) = (reports, &*driver) {
        time_figures(p, year, &format!("{lives} lives through the gateway")).await;
    }
    drop(driver);
    match server {
        Ok(g) => stop(g),
        Err((stop, task)) => {
            let _ = stop.send(());
            task.await.expect("in-process gateway stopped");
        }
    }
    if archive {
        // What the archiver had not reached when the lives ended.
        archive_all(&dir, cache_mb);
    }
    let disk = dir_mb(&data) * 1e6;
    let archive_bytes = dir_mb(&data.join("archive")) * 1e6;
    // Start-up on the filled store: after the clean stop (sled replays all the log written
    // since the store was last opened: here, all of it), then killed with SIGKILL once
    // listening and started again (sled wrote a snapshot as the last start opened it).
    let (g, after_stop) = start(&dir, cache_mb);
    let rss_started = peak_rss_mb(g.child.id());
    let _ = Command::new("kill")
        .args(["-KILL", &g.child.id().to_string()])
        .status();
    let mut child = g.child;
    let _ = child.wait();
    let (g, after_kill) = start(&dir, cache_mb);
    stop(g);
    let store = sp_gateway::store::Store::open(&data).expect("open the store");
    let mut kinds: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    store
        .for_each(b"", |k, v| {
            let e = kinds.entry(sp_gateway::gateway::keys::kind(k)).or_default();
            e.0 += 1;
            e.1 += (k.len() + v.len()) as u64;
            Ok(())
        })
        .expect("scan");
    let mut stored: std::collections::BTreeMap<String, u64> = Default::default();
    store
        .for_each_stored_len(b"", |k, v| {
            *stored
                .entry(sp_gateway::gateway::keys::kind(k))
                .or_default() += (k.len() + v) as u64;
        })
        .expect("scan");
    if let Some(path) = dictionary {
        write_dictionary(&store, path);
    }
    drop(store);
    if std::env::var_os("SP_GATEWAY_CENSUS_KEEP").is_some() {
        eprintln!("kept {}", data.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let n = lives as f64;
    let (keys, bytes) = kinds
        .values()
        .fold((0, 0), |(k, b), (k2, b2)| (k + k2, b + b2));
    let mut families: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    let mut family_stored: std::collections::BTreeMap<String, u64> = Default::default();
    for (kind, (k, b)) in &kinds {
        let f = families.entry(family(kind)).or_default();
        f.0 += k;
        f.1 += b;
        *family_stored.entry(family(kind).to_string()).or_default() +=
            stored.get(kind).copied().unwrap_or(0);
    }
    let all_stored: u64 = stored.values().sum();
    let mut families: Vec<_> = families.into_iter().collect();
    families.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let mut rows: Vec<_> = kinds.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(&b.0)));
    println!(
        "Census{}: {lives} lives in {secs:.1} s; gateway CPU {:.2} ms per life; peak RSS {rss:.0} MB",
        if bulk { " (bulk, in process)" } else { "" },
        cpu / n
    );
    println!();
    let table = |rows: Vec<(String, (u64, u64), u64)>, what: &str| {
        println!(
            "| {what} | keys per referral | bytes per referral (key + value) | share of bytes | bytes per referral as stored (values compressed) |"
        );
        println!("| --- | --- | --- | --- | --- |");
        for (name, (k, b), st) in &rows {
            println!(
                "| {name} | {:.2} | {:.0} | {:.1}% | {:.0} |",
                *k as f64 / n,
                *b as f64 / n,
                100.0 * *b as f64 / bytes.max(1) as f64,
                *st as f64 / n
            );
        }
        println!(
            "| **all** | **{:.1}** | **{:.0}** | 100% | **{:.0}** |",
            keys as f64 / n,
            bytes as f64 / n,
            all_stored as f64 / n
        );
        println!();
    };
    table(
        families
            .into_iter()
            .map(|(f, c)| {
                let st = family_stored.get(f).copied().unwrap_or(0);
                (f.to_string(), c, st)
            })
            .collect(),
        "family of keys",
    );
    table(
        rows.into_iter()
            .map(|(k, c)| {
                let st = stored.get(&k).copied().unwrap_or(0);
                (format!("`{k}`"), c, st)
            })
            .collect(),
        "kind of key",
    );
    println!(
        "Start-up: {:.0} ms after the clean stop (peak RSS by then {rss_started:.0} MB), {:.0} ms after SIGKILL of that start",
        after_stop.as_secs_f64() * 1000.0,
        after_kill.as_secs_f64() * 1000.0
    );
    println!(
        "On disk after a clean stop: {:.1} KB per referral ({:.1} MB in all; logical {:.1} KB per referral, {:.1} KB as stored)",
        disk / n / 1000.0,
        disk / 1e6,
        bytes as f64 / n / 1000.0,
        all_stored as f64 / n / 1000.0
    );
    if archive {
        println!(
            "Of which the archive: {:.1} KB per referral ({:.1} MB)",
            archive_bytes / n / 1000.0,
            archive_bytes / 1e6
        );
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let o = opts();
    ARCHIVE.store(o.archive, std::sync::atomic::Ordering::Relaxed);
    if let Some(n) = o.fill {
        reports_fill(n, o.cache_mb).await;
        return;
    }
    if let Some(lives) = o.census {
        census(
            lives,
            o.cache_mb,
            o.bulk,
            o.dictionary.as_deref(),
            o.archive,
            o.reports,
        )
        .await;
        return;
    }
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut push = |name: String, x: f64| match rows.iter_mut().find(|r| r.0 == name) {
        Some(r) => r.1.push(x),
        None => rows.push((name, vec![x])),
    };
    for run in 0..o.runs {
        let dir =
            std::env::temp_dir().join(format!("sp-gateway-bench-{}-{run}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (g, _) = start(&dir, o.cache_mb);
        let mut next = 0usize;
        for conc in [1usize, 16, 64] {
            let n = if o.quick {
                50
            } else {
                match conc {
                    1 => 1000,
                    _ => 5000,
                }
            };
            let cpu0 = cpu_ms(g.child.id());
            let (rps, lat) = ingest(&g.base, next, n, conc).await;
            let cpu = (cpu_ms(g.child.id()) - cpu0) / n as f64;
            next += n;
            push(format!("ingest c={conc}: referrals/s"), rps);
            push(format!("ingest c={conc}: gateway CPU ms per referral"), cpu);
            push(format!("ingest c={conc}: p50 ms"), pct(&lat, 0.5));
            push(format!("ingest c={conc}: p99 ms"), pct(&lat, 0.99));
            push(format!("ingest c={conc}: p99.9 ms"), pct(&lat, 0.999));
        }
        let n_pairs = if o.quick { 20 } else { 200 };
        let cpu0 = cpu_ms(g.child.id());
        let pairs = work(&g.base, n_pairs).await;
        let cpu = (cpu_ms(g.child.id()) - cpu0) / n_pairs as f64;
        push("Task update + Observation: pairs/s (c=16)".into(), pairs);
        push(
            "Task update + Observation: gateway CPU ms per pair (c=16)".into(),
            cpu,
        );
        // Read by id (each read writes its AuditEvent), and one referral's $trail.
        let some = some_tasks(&g.base, 200).await;
        let task_paths: Vec<String> = some
            .iter()
            .map(|(t, _)| format!("/fhir/Task/{t}"))
            .collect();
        let cpu0 = cpu_ms(g.child.id());
        let (rps, lat) = reads(&g.base, HUB, &task_paths, o.reads, 16).await;
        let cpu_us = (cpu_ms(g.child.id()) - cpu0) * 1000.0 / o.reads.max(1) as f64;
        push("read by id: reads/s (c=16)".into(), rps);
        push("read by id: gateway CPU µs per read (c=16)".into(), cpu_us);
        push("read by id: p99 ms (c=16)".into(), pct(&lat, 0.99));
        // The HTTP floor: the liveness probe passes through the same server, middleware
        // and loopback TCP as a read, and touches neither the store nor the audit trail,
        // so a read's CPU less this is what reading and auditing cost.
        let cpu0 = cpu_ms(g.child.id());
        let (rps, _) = reads(&g.base, HUB, &["/healthz".to_string()], o.reads, 16).await;
        let cpu_us = (cpu_ms(g.child.id()) - cpu0) * 1000.0 / o.reads.max(1) as f64;
        push("GET /healthz: requests/s (c=16)".into(), rps);
        push(
            "GET /healthz: gateway CPU µs per request (c=16)".into(),
            cpu_us,
        );
        let trail_paths: Vec<String> = some
            .iter()
            .map(|(_, sr)| format!("/fhir/ServiceRequest/{sr}/$trail"))
            .collect();
        let (_, lat) = reads(
            &g.base,
            AUDITOR,
            &trail_paths,
            if o.quick { 20 } else { 200 },
            1,
        )
        .await;
        push("$trail of one referral: p50 ms".into(), pct(&lat, 0.5));
        push("$trail of one referral: p99 ms".into(), pct(&lat, 0.99));
        let pid = g.child.id();
        let data = g.data.clone();
        for &size in &o.sizes {
            if next < size {
                let (_, _) = ingest(&g.base, next, size - next, 64).await;
                next = size;
            }
            let lat = poll(&g.base, if o.quick { 20 } else { 300 }).await;
            push(format!("poll at {size} stored: p50 ms"), pct(&lat, 0.5));
            push(format!("poll at {size} stored: p99 ms"), pct(&lat, 0.99));
            push(format!("peak RSS at {size} stored: MB"), peak_rss_mb(pid));
            push(format!("store at {size} stored: MB on disk"), dir_mb(&data));
        }
        stop(g);
        let (g, took) = start(&dir, o.cache_mb);
        push(
            format!("start-up at {} stored: ms", next),
            took.as_secs_f64() * 1000.0,
        );
        stop(g);
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("run {} of {} done", run + 1, o.runs);
    }
    println!("| metric | median (min–max) over {} run(s) |", o.runs);
    println!("| --- | --- |");
    for (name, xs) in &rows {
        println!("| {name} | {} |", summary(xs));
    }
}
