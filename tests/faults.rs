//! Faults from outside (issue #10): a clock that steps back, a full disk, a damaged store.
//! Each drives the real gateway as an operator runs it and injects the fault for real:
//! libfaketime for the clock (installed by the test with apt), a small tmpfs for the disk
//! (the test machines run as root), bytes inverted in a stopped store's log.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::common::*;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A plain-HTTP GP endpoint on loopback that records the idempotency key of every
/// Observation it accepts.
async fn plain_endpoint(accepted: Arc<Mutex<Vec<String>>>) -> String {
    async fn receive(
        State(acc): State<Arc<Mutex<Vec<String>>>>,
        headers: HeaderMap,
    ) -> (StatusCode, &'static str) {
        let key = headers
            .get("x-idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        acc.lock().unwrap().push(key);
        (StatusCode::CREATED, "{}")
    }
    let app = axum::Router::new()
        .route("/fhir/Observation", axum::routing::post(receive))
        .with_state(accepted);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://127.0.0.1:{}/fhir", addr.port())
}

/// The demo config with P81001's endpoint at `base`, a fast outbox and no rate limit.
fn endpoint_config(base: &str, extra: &str) -> String {
    config_text(|t| {
        t.replacen(
            "name = \"Nelson Health Centre\"\n",
            &format!("name = \"Nelson Health Centre\"\n[practices.endpoint]\nbase_url = \"{base}\"\n"),
            1,
        )
        .replacen(
            "[[practices]]",
            &format!("[outbox]\nbase_delay_ms = 40\nmax_delay_ms = 400\npoll_ms = 20\n\n[server.limits]\nrate_per_second = 100000\nrate_burst = 100000\n{extra}\n[[practices]]"),
            1,
        )
    })
}

async fn observation(gw: &TestGateway, sid: &str, pid: &str, value: i64) -> Value {
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718426000" }] },
        "subject": { "reference": format!("Patient/{pid}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
        "performer": [{ "reference": "Organization/pendle-crafts" }],
        "valueInteger": value
    });
    let r = gw.post_json(CRAFTS, "/fhir/Observation", &obs).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

async fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within {secs} s");
}

/// Fault 4: the wall clock steps back a day while the gateway runs, and later the gateway
/// restarts with its clock years behind the stored commit clock. Observations posted after
/// each step are still written back to the GP at once (the outbox schedules on the
/// monotonic clock, not on the stored commit clock), polling order still holds, and the
/// gateway stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_that_steps_back_does_not_stall_write_back() {
    ensure_debian_package("faketime", LIBFAKETIME);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let cfg = endpoint_config(&plain_endpoint(accepted.clone()).await, "");
    let clock_path = clock.to_string_lossy().to_string();
    let env = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME_TIMESTAMP_FILE", clock_path.as_str()),
        ("FAKETIME_NO_CACHE", "1"),
        // Only the wall clock moves: the monotonic clock is the machine's.
        ("DONT_FAKE_MONOTONIC", "1"),
    ];
    let (mut child, base) = spawn_binary_env(&data, Some(&cfg), &env);
    let gw = TestGateway::remote(&base);
    let (pid, sid, tid) = gw
        .refer(GP, &variant("referral-ada.json", "CLOCK-1", None))
        .await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    let first = observation(&gw, &sid, &pid, 30).await;
    let first_id = first["id"].as_str().unwrap().to_string();
    eventually("the first Observation delivered", 10, || {
        accepted.lock().unwrap().contains(&first_id)
    })
    .await;

    // The wall clock steps back one day while the gateway runs.
    std::fs::write(&clock, "-1d\n").unwrap();
    let second = observation(&gw, &sid, &pid, 31).await;
    let second_id = second["id"].as_str().unwrap().to_string();
    eventually(
        "an Observation posted after the clock stepped back delivered",
        10,
        || accepted.lock().unwrap().contains(&second_id),
    )
    .await;
    // Writes still follow commit order.
    assert!(
        second["meta"]["lastUpdated"].as_str() > first["meta"]["lastUpdated"].as_str(),
        "{} then {}",
        first["meta"]["lastUpdated"],
        second["meta"]["lastUpdated"]
    );
    let ready = gw
        .request(reqwest::Method::GET, "/readyz", None, None, None, &[])
        .await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(terminate(&mut child), Some(0));

    // A restart with the wall clock five years behind the stored commit clock.
    std::fs::write(&clock, "@2021-06-01 00:00:00\n").unwrap();
    let (mut child, base) = spawn_binary_env(&data, Some(&cfg), &env);
    let gw = TestGateway::remote(&base);
    let third = observation(&gw, &sid, &pid, 32).await;
    let third_id = third["id"].as_str().unwrap().to_string();
    eventually(
        "an Observation posted after a restart in 2021 delivered",
        10,
        || accepted.lock().unwrap().contains(&third_id),
    )
    .await;
    assert_eq!(
        *accepted.lock().unwrap(),
        vec![first_id, second_id, third_id],
        "each once, in order"
    );
    let ready = gw
        .request(reqwest::Method::GET, "/readyz", None, None, None, &[])
        .await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(terminate(&mut child), Some(0));
    let _ = Path::new(&data);
}
