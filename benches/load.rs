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
//!
//! Load comes from this process, on the same machine, over loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const GP: &str = "demo-gp-token";
const HUB: &str = "demo-provider-hub-token";
const AUDITOR: &str = "demo-auditor-token";

struct Opts {
    quick: bool,
    /// Run the census instead: `lives` referrals through a realistic life each, then count
    /// what the store holds, by kind of key.
    census: Option<usize>,
    cache_mb: Option<u64>,
    runs: usize,
    sizes: Vec<usize>,
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
        cache_mb,
        runs,
        sizes,
    }
}

fn gateway_binary() -> PathBuf {
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
    let p = dir.join("bench.toml");
    std::fs::write(&p, text).expect("config");
    p
}

fn start(dir: &Path, cache_mb: Option<u64>) -> (Gateway, Duration) {
    let data = dir.join("data");
    let t = Instant::now();
    let mut child = Command::new(gateway_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config(dir, cache_mb))
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sp-gateway (build it first: cargo build --release)");
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

/// One referral's life after ingest and the provider's two polls: accept, in progress, an
/// outcome Observation, complete naming it, and the GP pulling the outcome.
async fn life(http: &reqwest::Client, base: &str, task: Value) {
    let id = task["id"].as_str().unwrap_or_default().to_string();
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
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": task["for"], "basedOn": [task["focus"]], "valueInteger": 24
    });
    let obs = call(
        http.post(format!("{base}/fhir/Observation"))
            .bearer_auth(HUB)
            .header("content-type", "application/fhir+json")
            .body(obs.to_string()),
        "observation",
    )
    .await;
    t["status"] = json!("completed");
    t["output"] = json!([{ "type": { "text": "SWEMWBS" }, "valueReference": { "reference": format!("Observation/{}", obs["id"].as_str().unwrap_or_default()) } }]);
    call(put(&t), "complete").await;
    let sr = task["focus"]["reference"].as_str().unwrap_or_default();
    call(
        http.get(format!("{base}/fhir/Observation?based-on={sr}"))
            .bearer_auth(GP),
        "GP pull",
    )
    .await;
}

/// The family of a kind of key, for the census's summary table.
fn family(kind: &str) -> &'static str {
    match kind {
        "r/Provenance" => "Provenance (`r/Provenance`)",
        "a" => "audit chain (`a/`)",
        "b" | "n" => "by patient, referral, NHS number (`p/`, `b/`, `n/`)",
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

/// The census (`--census`): `lives` referrals, each through a realistic life (ingest, two
/// polls that return it, accept, in progress, one outcome Observation, complete, one GP
/// pull), 50 at a time with 16 clients; then a clean stop, the data directory's size on
/// disk, and every key in the store counted by kind (`gateway::keys::kind`). Prints
/// Markdown.
async fn census(lives: usize, cache_mb: Option<u64>) {
    const BATCH: usize = 50;
    let lives = lives.div_ceil(BATCH) * BATCH;
    let dir = std::env::temp_dir().join(format!("sp-gateway-census-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (g, _) = start(&dir, cache_mb);
    let http = reqwest::Client::new();
    let cpu0 = cpu_ms(g.child.id());
    let t = Instant::now();
    for batch in 0..lives / BATCH {
        ingest(&g.base, batch * BATCH, BATCH, 16).await;
        let poll = format!(
            "{}/fhir/Task?owner=pendle-cvs-hub&status=requested&_count={BATCH}",
            g.base
        );
        call(http.get(&poll).bearer_auth(HUB), "poll").await;
        let page = call(http.get(&poll).bearer_auth(HUB), "poll").await;
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
            let (http, base, chunk) = (http.clone(), g.base.clone(), chunk.to_vec());
            handles.push(tokio::spawn(async move {
                for task in chunk {
                    life(&http, &base, task).await;
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
    let cpu = cpu_ms(g.child.id()) - cpu0;
    let rss = peak_rss_mb(g.child.id());
    let data = g.data.clone();
    stop(g);
    let disk = dir_mb(&data) * 1e6;
    // Start-up on the filled store: after the clean stop (sled replays all the log written
    // since the store was last opened: here, all of it), then killed with SIGKILL once
    // listening and started again (sled wrote a snapshot as the last start opened it).
    let (g, after_stop) = start(&dir, cache_mb);
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
    for (kind, (k, b)) in &kinds {
        let f = families.entry(family(kind)).or_default();
        f.0 += k;
        f.1 += b;
    }
    let mut families: Vec<_> = families.into_iter().collect();
    families.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let mut rows: Vec<_> = kinds.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(&b.0)));
    println!(
        "Census: {lives} lives in {secs:.1} s; gateway CPU {:.2} ms per life; peak RSS {rss:.0} MB",
        cpu / n
    );
    println!();
    let table = |rows: Vec<(String, (u64, u64))>, what: &str| {
        println!(
            "| {what} | keys per referral | bytes per referral (key + value) | share of bytes |"
        );
        println!("| --- | --- | --- | --- |");
        for (name, (k, b)) in &rows {
            println!(
                "| {name} | {:.2} | {:.0} | {:.1}% |",
                *k as f64 / n,
                *b as f64 / n,
                100.0 * *b as f64 / bytes.max(1) as f64
            );
        }
        println!(
            "| **all** | **{:.1}** | **{:.0}** | 100% |",
            keys as f64 / n,
            bytes as f64 / n
        );
        println!();
    };
    table(
        families
            .into_iter()
            .map(|(f, c)| (f.to_string(), c))
            .collect(),
        "family of keys",
    );
    table(
        rows.into_iter()
            .map(|(k, c)| (format!("`{k}`"), c))
            .collect(),
        "kind of key",
    );
    println!(
        "Start-up: {:.0} ms after the clean stop, {:.0} ms after SIGKILL of that start",
        after_stop.as_secs_f64() * 1000.0,
        after_kill.as_secs_f64() * 1000.0
    );
    println!(
        "On disk after a clean stop: {:.1} KB per referral ({:.1} MB in all; logical {:.1} KB per referral)",
        disk / n / 1000.0,
        disk / 1e6,
        bytes as f64 / n / 1000.0
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let o = opts();
    if let Some(lives) = o.census {
        census(lives, o.cache_mb).await;
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
        let pairs = work(&g.base, if o.quick { 20 } else { 200 }).await;
        push("Task update + Observation: pairs/s (c=16)".into(), pairs);
        // Read by id (each read writes its AuditEvent), and one referral's $trail.
        let some = some_tasks(&g.base, 200).await;
        let task_paths: Vec<String> = some
            .iter()
            .map(|(t, _)| format!("/fhir/Task/{t}"))
            .collect();
        let (rps, lat) = reads(
            &g.base,
            HUB,
            &task_paths,
            if o.quick { 200 } else { 5000 },
            16,
        )
        .await;
        push("read by id: reads/s (c=16)".into(), rps);
        push("read by id: p99 ms (c=16)".into(), pct(&lat, 0.99));
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
