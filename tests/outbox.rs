//! The outbox against a real GP endpoint: an HTTPS FHIR receiver started here (certificates
//! from rcgen), checking the practice's bearer token, that can be down, refuse one message,
//! or accept. Observations reach it in order, once each by idempotency key; a permanent
//! failure is dead-lettered without blocking the others and can be retried by an operator;
//! a gateway restart mid-retry loses nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tower::ServiceExt;

#[derive(Default)]
struct Receiver {
    /// 503 to everything while down.
    down: bool,
    /// 400 for Observations with this value.
    refuse_value: Option<i64>,
    /// Every POST that arrived: (idempotency key, referral, value, authorised?).
    arrivals: Vec<(String, String, i64, bool)>,
    /// Keys accepted, in order (a repeated key is not accepted twice).
    accepted: Vec<String>,
}

type Shared = Arc<Mutex<Receiver>>;

async fn receive(
    State(r): State<Shared>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let obs: Value = serde_json::from_str(&body).unwrap_or_default();
    let key = headers
        .get("x-idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some("Bearer gp-endpoint-secret");
    let sr = obs["basedOn"][0]["reference"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let value = obs["valueInteger"].as_i64().unwrap_or(-1);
    let ident_ok = obs["identifier"][0]["value"].as_str() == Some(key.as_str());
    let mut s = r.lock().unwrap();
    s.arrivals.push((key.clone(), sr, value, auth));
    if !auth {
        return (StatusCode::UNAUTHORIZED, "{}".into());
    }
    if s.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "{}".into());
    }
    if Some(value) == s.refuse_value || !ident_ok {
        return (StatusCode::BAD_REQUEST, "{}".into());
    }
    if !s.accepted.contains(&key) {
        s.accepted.push(key);
    }
    (StatusCode::CREATED, "{}".into())
}

/// An HTTPS FHIR endpoint on loopback; returns its base URL and the CA that signed it.
async fn gp_endpoint(dir: &Path, state: Shared) -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("gp-ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("gp.token"), "gp-endpoint-secret\n").unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls::pki_types::CertificateDer::from(cert.der().to_vec())],
        rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let app = axum::Router::new()
        .route("/fhir/Observation", post(receive))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        app.clone().oneshot(req.map(axum::body::Body::new))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    format!("https://127.0.0.1:{}/fhir", addr.port())
}

fn config(dir: &Path, base: &str) -> String {
    let endpoint = format!(
        "[practices.endpoint]\nbase_url = \"{base}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n",
        dir.join("gp.token").display(),
        dir.join("gp-ca.crt").display()
    );
    config_text(|t| {
        t.replacen("name = \"Nelson Health Centre\"\n", &format!("name = \"Nelson Health Centre\"\n{endpoint}"), 1)
            .replacen(
                "[[practices]]",
                "[outbox]\nbase_delay_ms = 40\nmax_delay_ms = 200\npoll_ms = 20\nmax_attempts = 100\n\n[server.limits]\nrate_per_second = 100000\nrate_burst = 100000\n\n[[practices]]",
                1,
            )
    })
}

async fn outcome(gw: &TestGateway, sid: &str, pid: &str, value: i64) -> String {
    gw.post_outcome(sid, pid, value).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn referral(gw: &TestGateway, n: usize) -> (String, String) {
    let nhs = ["9990000026", "9990000034", "9990000042", "9990000050"][n];
    let (pid, sid, tid) = gw
        .refer(
            GP,
            &variant("referral-ada.json", &format!("OUTBOX-{n}"), Some(nhs)),
        )
        .await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    (pid, sid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_then_up_delivers_everything_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let rx: Shared = Arc::new(Mutex::new(Receiver {
        down: true,
        ..Default::default()
    }));
    let base = gp_endpoint(dir.path(), rx.clone()).await;
    let gw = TestGateway::start_with(&dir.path().join("data"), config(dir.path(), &base)).await;
    let (pid, sid) = referral(&gw, 0).await;
    let (pid2, sid2) = referral(&gw, 1).await;
    let mut sent = Vec::new();
    for v in [20, 25, 30] {
        sent.push(outcome(&gw, &sid, &pid, v).await);
    }
    sent.push(outcome(&gw, &sid2, &pid2, 40).await);
    // While the endpoint is down: tried (with the practice's token), not delivered.
    wait_for("retries against the down endpoint", || {
        rx.lock().unwrap().arrivals.len() >= 3
    })
    .await;
    assert!(
        rx.lock().unwrap().arrivals.iter().all(|a| a.3),
        "a delivery lacked the practice's token"
    );
    assert!(rx.lock().unwrap().accepted.is_empty());
    assert_eq!(
        gw.request(reqwest::Method::GET, "/metrics", None, None, None, &[])
            .await
            .status,
        401
    );
    let m = gw.get(ADMIN, "/metrics").await;
    assert!(
        m.body
            .as_str()
            .unwrap()
            .contains("sp_gateway_outbox_pending 4"),
        "{}",
        m.body
    );
    rx.lock().unwrap().down = false;
    wait_for("all four delivered", || {
        rx.lock().unwrap().accepted.len() == 4
    })
    .await;
    {
        let s = rx.lock().unwrap();
        // Per referral, in the order posted; each once.
        let order: Vec<&String> = s
            .accepted
            .iter()
            .filter(|k| sent[..3].contains(k))
            .collect();
        assert_eq!(order, sent[..3].iter().collect::<Vec<_>>());
        let mut seen: HashMap<&String, usize> = HashMap::new();
        for k in &s.accepted {
            *seen.entry(k).or_default() += 1;
        }
        assert!(seen.values().all(|n| *n == 1));
        // A referral's second message never arrived before its first was accepted.
        let first_ok = s
            .arrivals
            .iter()
            .position(|a| a.0 == sent[0] && a.2 == 20)
            .unwrap();
        assert!(s.arrivals.iter().position(|a| a.0 == sent[1]).unwrap() > first_ok);
    }
    // Delivery state on the Observation, and in the metrics.
    wait_for("delivery recorded", || true).await;
    for _ in 0..100 {
        let o = gw.get(GP, &format!("/fhir/Observation/{}", sent[0])).await;
        if o.body["extension"][0]["valueCode"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let o = gw.get(GP, &format!("/fhir/Observation/{}", sent[0])).await;
    assert_eq!(
        o.body["extension"][0]["valueCode"], "delivered",
        "{}",
        o.body
    );
    assert_eq!(
        gw.request(reqwest::Method::GET, "/metrics", None, None, None, &[])
            .await
            .status,
        401
    );
    let m = gw.get(ADMIN, "/metrics").await;
    assert!(
        m.body
            .as_str()
            .unwrap()
            .contains("sp_gateway_outbox_delivered 4"),
        "{}",
        m.body
    );
    assert_eq!(
        gw.request(reqwest::Method::GET, "/readyz", None, None, None, &[])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_and_others_flow() {
    let dir = tempfile::tempdir().unwrap();
    let rx: Shared = Arc::new(Mutex::new(Receiver {
        refuse_value: Some(17),
        ..Default::default()
    }));
    let base = gp_endpoint(dir.path(), rx.clone()).await;
    let gw = TestGateway::start_with(&dir.path().join("data"), config(dir.path(), &base)).await;
    let (pid, sid) = referral(&gw, 0).await;
    let (pid2, sid2) = referral(&gw, 1).await;
    let bad = outcome(&gw, &sid, &pid, 17).await;
    let good = outcome(&gw, &sid2, &pid2, 30).await;
    wait_for("the good one delivered", || {
        rx.lock().unwrap().accepted.contains(&good)
    })
    .await;
    // The bad one was tried once (a 400 is final) and is a dead letter. (The two referrals'
    // messages are in flight side by side: wait until the gateway has recorded both.)
    let mut admin = gw.get(ADMIN, "/admin/outbox").await;
    for _ in 0..200 {
        if admin.body["pending"]
            .as_array()
            .is_some_and(|p| p.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        admin = gw.get(ADMIN, "/admin/outbox").await;
    }
    assert_eq!(admin.status, 200, "{}", admin.body);
    let dead = admin.body["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{}", admin.body);
    assert_eq!(dead[0]["observation"], json!(bad));
    assert_eq!(dead[0]["last_error"], "HTTP 400");
    assert!(
        !admin.body.to_string().contains("\"valueInteger\""),
        "the admin view shows no content"
    );
    assert_eq!(
        rx.lock()
            .unwrap()
            .arrivals
            .iter()
            .filter(|a| a.0 == bad)
            .count(),
        1
    );
    assert_eq!(gw.get(GP, "/admin/outbox").await.status, 403);
    // The practice fixes its side; an operator retries.
    rx.lock().unwrap().refuse_value = None;
    let seq = dead[0]["seq"].as_u64().unwrap();
    let r = gw
        .request(
            reqwest::Method::POST,
            &format!("/admin/outbox/{seq}/retry"),
            Some(ADMIN),
            None,
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the retried one delivered", || {
        rx.lock().unwrap().accepted.contains(&bad)
    })
    .await;
    // Stopping: a message to a down endpoint is stopped by the operator.
    rx.lock().unwrap().down = true;
    let third = outcome(&gw, &sid2, &pid2, 31).await;
    wait_for("a failed attempt", || {
        rx.lock().unwrap().arrivals.iter().any(|a| a.0 == third)
    })
    .await;
    let pending = gw.get(ADMIN, "/admin/outbox").await.body["pending"].clone();
    let seq = pending[0]["seq"].as_u64().unwrap();
    let r = gw
        .request(
            reqwest::Method::POST,
            &format!("/admin/outbox/{seq}/stop"),
            Some(ADMIN),
            None,
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let after = gw.get(ADMIN, "/admin/outbox").await.body;
    assert!(after["pending"].as_array().unwrap().is_empty());
    assert_eq!(after["dead_letters"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_retry_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rx: Shared = Arc::new(Mutex::new(Receiver {
        down: true,
        ..Default::default()
    }));
    let base = gp_endpoint(dir.path(), rx.clone()).await;
    let mut gw = TestGateway::start_with(&dir.path().join("data"), config(dir.path(), &base)).await;
    let (pid, sid) = referral(&gw, 0).await;
    let a = outcome(&gw, &sid, &pid, 21).await;
    let b = outcome(&gw, &sid, &pid, 22).await;
    wait_for("retrying", || rx.lock().unwrap().arrivals.len() >= 2).await;
    gw.restart().await;
    rx.lock().unwrap().down = false;
    wait_for("both delivered after the restart", || {
        rx.lock().unwrap().accepted.len() == 2
    })
    .await;
    assert_eq!(rx.lock().unwrap().accepted, vec![a, b]);
}

/// A "GP endpoint" that accepts TCP connections and never answers; returns its base URL
/// and how many connections it has taken.
async fn silent_endpoint() -> (String, Arc<Mutex<Vec<tokio::net::TcpStream>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            keep.lock().unwrap().push(tcp);
        }
    });
    (format!("http://127.0.0.1:{}/fhir", addr.port()), held)
}

/// Issue #10, fault 3: one practice's endpoint accepts connections and never answers. The
/// gateway stays ready (a remote fault is not its own), the other practice's Observations
/// are delivered as if nothing were wrong, and the silent endpoint shows as failing where
/// an operator looks (/metrics, GET /admin/outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_delays_only_its_own_practice_and_never_makes_the_gateway_unready() {
    let dir = tempfile::tempdir().unwrap();
    let rx: Shared = Arc::default();
    let good = gp_endpoint(dir.path(), rx.clone()).await;
    let (silent, held) = silent_endpoint().await;
    // P81001 → the silent endpoint; P81002 → the working one. A short request timeout and
    // stuck threshold, so that the old rule ("a message due for stuck_after_secs") would
    // have failed readiness within the test.
    let endpoint = |base: &str| {
        format!(
            "[practices.endpoint]\nbase_url = \"{base}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n",
            dir.path().join("gp.token").display(),
            dir.path().join("gp-ca.crt").display()
        )
    };
    let cfg = config_text(|t| {
        t.replacen(
            "name = \"Nelson Health Centre\"\n",
            &format!("name = \"Nelson Health Centre\"\n{}", endpoint(&silent)),
            1,
        )
        .replacen(
            "name = \"Burnley Wood Medical Centre\"\n",
            &format!("name = \"Burnley Wood Medical Centre\"\n{}", endpoint(&good)),
            1,
        )
        .replacen(
            "[[practices]]",
            "[outbox]\nbase_delay_ms = 40\nmax_delay_ms = 400\npoll_ms = 20\nmax_attempts = 1000\nrequest_timeout_ms = 800\nstuck_after_secs = 8\n\n[server.limits]\nrate_per_second = 100000\nrate_burst = 100000\n\n[[practices]]",
            1,
        )
    });
    let gw = TestGateway::start_with(&dir.path().join("data"), cfg).await;
    let mut for_good = Vec::new();
    for n in 0..6 {
        let mut r = variant(
            "referral-ada.json",
            &format!("SILENT-{n}"),
            Some(&nhs_number(7000 + n)),
        );
        // Four referrals from the silent practice, two from the working one.
        if n >= 4 {
            r["practice"]["odsCode"] = json!("P81002");
        }
        let (pid, sid, tid) = gw.refer(GP, &r).await;
        assert_eq!(
            gw.transition(CRAFTS, &tid, status_to("accepted"))
                .await
                .status,
            200
        );
        for v in [20, 21] {
            let id = outcome(&gw, &sid, &pid, v).await;
            if n >= 4 {
                for_good.push(id);
            }
        }
    }
    // The working practice's four Observations arrive promptly, whatever the silent one does.
    wait_for("the working practice's deliveries", || {
        rx.lock().unwrap().accepted.len() == 4
    })
    .await;
    {
        let acc = rx.lock().unwrap().accepted.clone();
        assert!(for_good.iter().all(|k| acc.contains(k)), "{acc:?}");
        // Each referral's two messages in the order posted.
        for pair in for_good.chunks(2) {
            let pos = |k: &String| acc.iter().position(|a| a == k).unwrap();
            assert!(pos(&pair[0]) < pos(&pair[1]), "{acc:?}");
        }
    }
    // Readiness, sampled for longer than the stuck threshold (8 s + the 0.8 s request
    // timeout) while the silent endpoint swallows one attempt after another: always ready.
    // (With 2 s, then 4 s, this failed once each in full runs of four tests at a time on
    // the loaded 2-core machine: "no progress for over 4.8s". The likeliest cause, not
    // confirmed, is a worker's durable record of an attempt taking seconds while the other
    // tests' gateways sync the same disk; the worker was not stuck on the endpoint.)
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let r = gw
            .request(reqwest::Method::GET, "/readyz", None, None, None, &[])
            .await;
        assert_eq!(
            r.status, 200,
            "a silent GP endpoint made the gateway unready: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !held.lock().unwrap().is_empty(),
        "the silent endpoint was never tried"
    );
    // The operator sees which endpoint is failing, and why.
    let m = gw.get(ADMIN, "/metrics").await;
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("sp_gateway_outbox_endpoint_failing{practice=\"P81001\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("sp_gateway_outbox_endpoint_failing{practice=\"P81002\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("sp_gateway_outbox_practice_pending{practice=\"P81001\"} 8"),
        "{text}"
    );
    let admin = gw.get(ADMIN, "/admin/outbox").await;
    let eps = admin.body["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let silent_view = eps
        .iter()
        .find(|e| e["practice"] == "P81001")
        .unwrap_or_else(|| panic!("no endpoint view: {}", admin.body));
    assert_eq!(silent_view["failing"], true, "{}", admin.body);
    assert_eq!(silent_view["last_error"], "timeout", "{}", admin.body);
    let good_view = eps.iter().find(|e| e["practice"] == "P81002").unwrap();
    assert_eq!(good_view["failing"], false, "{}", admin.body);
    // Nothing of the silent practice was lost or dead-lettered: all eight wait.
    assert_eq!(admin.body["pending"].as_array().unwrap().len(), 8);
    assert!(admin.body["dead_letters"].as_array().unwrap().is_empty());
}
