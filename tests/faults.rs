//! Faults from outside (issue #10): a clock that steps back, a full disk, a damaged store.
//! Each drives the real gateway as an operator runs it and injects the fault for real:
//! libfaketime for the clock (installed by the test with apt), a small tmpfs for the disk
//! (the test machines run as root), bytes inverted in a stopped store's log.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

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
    let (child, base) = spawn_binary_env(&data, Some(&cfg), &env);
    let mut child = Guarded(child);
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
    let first = gw.post_outcome(&sid, &pid, 30).await;
    let first_id = first["id"].as_str().unwrap().to_string();
    eventually("the first Observation delivered", 10, || {
        accepted.lock().unwrap().contains(&first_id)
    })
    .await;

    // The wall clock steps back one day while the gateway runs.
    std::fs::write(&clock, "-1d\n").unwrap();
    let second = gw.post_outcome(&sid, &pid, 31).await;
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
    let (child, base) = spawn_binary_env(&data, Some(&cfg), &env);
    let mut child = Guarded(child);
    let gw = TestGateway::remote(&base);
    let third = gw.post_outcome(&sid, &pid, 32).await;
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

/// A tmpfs of `mb` MiB mounted at `path` for the life of the value (the test machines run as
/// root; a test that cannot mount says so and fails rather than skipping).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mb: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root to do so: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }

    fn resize(&self, mb: u64) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mb}m")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount the tmpfs to {mb} MiB");
    }

    fn free_bytes(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn fill_referral(n: usize) -> Value {
    hub_referral(&format!("FULL-{n}"), 20_000 + n)
}

async fn post_referral(gw: &TestGateway, n: usize) -> Resp {
    gw.post_json(GP, "/referrals", &fill_referral(n)).await
}

async fn ready(gw: &TestGateway) -> Resp {
    gw.request(reqwest::Method::GET, "/readyz", None, None, None, &[])
        .await
}

async fn metrics_text(gw: &TestGateway) -> String {
    gw.get(ADMIN, "/metrics")
        .await
        .body
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Fault 1: the data directory's disk fills up. Below the free-space floor new referrals
/// get 507 with a plain reason while reads, polls and Task updates go on and /readyz says
/// why it is not ready; when space returns the gateway resumes by itself. When the disk
/// then fills completely (another program's file), writes fail honestly (503, Retry-After,
/// "outcome unknown") and the gateway recovers by itself once the file is gone; a
/// SIGTERM while the store is failed exits 4 with a plain message; every acknowledged
/// referral is kept, and re-sending a refused one never makes a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_new_referrals_honestly_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    // The data directory is the tmpfs itself; the gateway's log ({data}.log) is beside it,
    // on the real disk, so that it can say what happened.
    let disk = Tmpfs::mount(&dir.path().join("data"), 64);
    let data = disk.0.clone();
    // Floor: the smaller of 20 MiB and 50 %, but never under 32 MiB: 32 MiB of 64.
    let cfg = unthrottled_config().replacen(
        "max_body_bytes = 262144\n",
        "max_body_bytes = 262144\nmin_free_mb = 20\nmin_free_percent = 50\n",
        1,
    );
    let (child, base) = spawn_binary(&data, Some(&cfg));
    let mut child = Guarded(child);
    let gw = Arc::new(TestGateway::remote(&base));

    // 8 clients post unique referrals until the floor stops them.
    let acked: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let refused: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..8 {
        let (gw, acked, refused) = (gw.clone(), acked.clone(), refused.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..2000 {
                let n = c * 10_000 + i;
                let r = post_referral(&gw, n).await;
                match r.status.as_u16() {
                    201 => acked
                        .lock()
                        .unwrap()
                        .push((n, r.entries()[1]["id"].as_str().unwrap().to_string())),
                    507 => {
                        assert_eq!(r.body["resourceType"], "OperationOutcome");
                        let why = r.body["issue"][0]["diagnostics"].as_str().unwrap();
                        assert!(why.contains("short of disk space"), "{why}");
                        assert!(why.contains("nothing was stored"), "{why}");
                        assert!(r.headers.get("retry-after").is_some());
                        refused.lock().unwrap().push(n);
                        return;
                    }
                    s => panic!("referral {n}: {s} {}", r.body),
                }
            }
            panic!("the floor was never reached");
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let acked_n = acked.lock().unwrap().len();
    assert!(acked_n > 100, "only {acked_n} referrals before the floor");
    // Below the floor: not ready, and says why; metrics say so too.
    let r = ready(&gw).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body["status"]
            .as_str()
            .unwrap()
            .contains("below the floor"),
        "{}",
        r.body
    );
    let m = metrics_text(&gw).await;
    assert!(m.contains("sp_gateway_store_below_floor 1"), "{m}");
    assert!(m.contains("sp_gateway_store_free_bytes "), "{m}");
    // Reads, polls and Task updates go on; a resubmission gets its stored result.
    let (first_n, first_sr) = acked.lock().unwrap()[0].clone();
    let sr = gw
        .get(GP, &format!("/fhir/ServiceRequest/{first_sr}"))
        .await;
    assert_eq!(sr.status, 200, "{}", sr.body);
    let again = post_referral(&gw, first_n).await;
    assert_eq!(
        again.status, 200,
        "a resubmission below the floor: {}",
        again.body
    );
    let poll = gw
        .get(
            HUB,
            "/fhir/Task?owner=pendle-cvs-hub&status=requested&_count=5",
        )
        .await;
    assert_eq!(poll.status, 200, "{}", poll.body);
    let task_id = poll.entries()[0]["id"].as_str().unwrap().to_string();
    let upd = gw.transition(HUB, &task_id, status_to("accepted")).await;
    assert_eq!(
        upd.status, 200,
        "a Task update below the floor: {}",
        upd.body
    );

    // Space returns: the gateway resumes by itself.
    disk.resize(160);
    let mut resumed = false;
    for _ in 0..100 {
        if ready(&gw).await.status == 200 {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "not ready again after space returned");
    let refused = refused.lock().unwrap().clone();
    for n in refused.iter() {
        // Refused with 507 means nothing was stored: now it is created afresh.
        let r = post_referral(&gw, *n).await;
        assert_eq!(
            r.status, 201,
            "referral {n} after space returned: {}",
            r.body
        );
        acked
            .lock()
            .unwrap()
            .push((*n, r.entries()[1]["id"].as_str().unwrap().to_string()));
    }

    // Another program fills the disk to the last byte: the gateway's own writes (a read's
    // audit record, a Task update) now fail for real.
    let ballast = disk.0.join("ballast");
    let fill = disk.free_bytes();
    let ok = std::process::Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&ballast)
        .status()
        .unwrap()
        .success();
    assert!(ok, "fill the disk");
    let mut failures = 0;
    let mut unknown = Vec::new();
    for i in 0..200 {
        let n = 90_000 + i;
        let r = post_referral(&gw, n).await;
        match r.status.as_u16() {
            507 => {}
            503 => {
                let why = r.body["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap_or_default();
                assert!(why.contains("outcome is unknown"), "{why}");
                assert!(!why.contains("nothing was changed"), "{why}");
                assert!(r.headers.get("retry-after").is_some());
                failures += 1;
            }
            s => panic!("referral on a full disk: {s} {}", r.body),
        }
        // Reads and updates write (audit, versions): on a full disk they fail.
        let r = gw
            .get(GP, &format!("/fhir/ServiceRequest/{first_sr}"))
            .await;
        match r.status.as_u16() {
            200 => {}
            503 => {
                failures += 1;
                unknown.push(n);
            }
            s => panic!("read on a full disk: {s} {}", r.body),
        }
        if failures >= 3 {
            break;
        }
    }
    assert!(failures >= 3, "the full disk never made a write fail");
    let r = ready(&gw).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let m = metrics_text(&gw).await;
    assert!(m.contains("sp_gateway_store_failed 1"), "{m}");
    // The other program's file goes: the gateway recovers by itself.
    std::fs::remove_file(&ballast).unwrap();
    let mut recovered = false;
    for _ in 0..200 {
        if ready(&gw).await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the store did not recover after space returned");
    // A new referral is taken again. (Should a write still meet a failure here, the client
    // does what the 503 says: re-sends the same referral, which is safe.)
    let mut seen = Vec::new();
    let mut taken = false;
    for _ in 0..50 {
        let r = post_referral(&gw, 95_000).await;
        seen.push(format!("{} {}", r.status, r.body));
        if r.status == 201 || r.status == 200 {
            taken = true;
            break;
        }
        assert_eq!(r.status, 503, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    assert!(
        taken,
        "no referral taken after recovery: {seen:?}\nlog:\n{log}"
    );
    assert!(seen.len() == 1, "after recovery: {seen:?}\nlog:\n{log}");

    // A SIGTERM while the store is failed: exit 4 and a plain line, not a raw I/O error.
    let fill = disk.free_bytes();
    assert!(std::process::Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&ballast)
        .status()
        .unwrap()
        .success());
    // sled reuses space it already holds, so this time it takes more writing to meet the
    // full disk: requests with long (refused) queries, each audited with its query, random
    // so that the store cannot compress them away.
    let mut failed = false;
    for _ in 0..3000 {
        let junk: String = (0..375)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        let r = gw.get(GP, &format!("/fhir/Task?junk={junk}")).await;
        if r.status == 503 {
            failed = true;
            break;
        }
        assert!(r.status.is_client_error(), "{} {}", r.status, r.body);
    }
    assert!(failed, "the full disk did not fail the store again");
    let code = terminate(&mut child);
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert_eq!(code, Some(4), "exit code on a failed store; log:\n{log}");
    assert!(log.contains("stopped after a storage failure"), "{log}");
    std::fs::remove_file(&ballast).unwrap();

    // After a restart every acknowledged referral is there, once.
    let (child, base) = spawn_binary(&data, Some(&cfg));
    let mut child = Guarded(child);
    let gw = TestGateway::remote(&base);
    let all = acked.lock().unwrap().clone();
    for (n, sr) in all.iter() {
        let r = gw.get(GP, &format!("/fhir/ServiceRequest/{sr}")).await;
        assert_eq!(r.status, 200, "acknowledged referral {n} lost: {}", r.body);
    }
    assert_eq!(terminate(&mut child), Some(0));
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    for (n, _) in acked.lock().unwrap().iter() {
        let nhs = nhs_number(20_000 + n);
        let line = log.lines().find(|l| l.contains(&nhs));
        assert!(line.is_none(), "a log line names an NHS number: {line:?}");
    }
    if let Ok(keep) = std::env::var("SP_KEEP_LOG") {
        std::fs::write(keep, &log).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Inverts `len` bytes of `file` from `at`.
fn invert(file: &Path, at: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, at).unwrap();
    for b in &mut buf {
        *b = !*b;
    }
    f.write_all_at(&buf, at).unwrap();
    f.sync_all().unwrap();
}

/// Starts the real gateway on `data` expecting it to refuse: returns its exit code and log.
fn refused_start(data: &Path) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = gateway_command(data, None)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    if out.starts_with("listening") {
        let _ = child.kill();
        panic!("the gateway started and served on a damaged store");
    }
    let code = child.wait().unwrap().code();
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    (code, log)
}

/// Fault 2: a stopped store is damaged (64 bytes inverted half-way through sled's log, or
/// its last 16 written bytes inverted). sled recovers what it can and silently drops the
/// rest; the gateway compares what it recovered with its own synced commit record and
/// refuses to start (exit 3), saying what is missing and how to restore, and `audit verify`
/// refuses too. The undamaged copy still opens and holds every referral.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_and_a_clean_copy_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut gw = TestGateway::start_with(&data, unthrottled_config()).await;
    let mut referrals = Vec::new();
    for i in 0..300 {
        let (_, sr, _) = gw
            .refer(GP, &hub_referral(&format!("DMG-{i}"), 30_000 + i))
            .await;
        referrals.push(sr);
    }
    gw.stop().await;
    let pristine = dir.path().join("pristine");
    copy_dir(&data, &pristine);

    // 64 bytes inverted half-way through the log.
    let mid = dir.path().join("mid");
    copy_dir(&pristine, &mid);
    let len = std::fs::metadata(mid.join("db")).unwrap().len();
    invert(&mid.join("db"), len / 2, 64);
    let (code, log) = refused_start(&mid);
    assert_eq!(code, Some(3), "exit code on a damaged store; log:\n{log}");
    assert!(log.contains("lost acknowledged writes"), "{log}");
    assert!(log.contains("Restore"), "{log}");
    let verify = audit_verify(&mid);
    assert_eq!(
        verify.status.code(),
        Some(1),
        "audit verify on a damaged store"
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("store BROKEN"));
    assert!(
        String::from_utf8_lossy(&verify.stderr).contains("lost acknowledged writes"),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // The last 16 bytes written inverted.
    let end = dir.path().join("end");
    copy_dir(&pristine, &end);
    let bytes = std::fs::read(end.join("db")).unwrap();
    let last = bytes.iter().rposition(|b| *b != 0).unwrap() as u64;
    invert(&end.join("db"), last - 15, 16);
    let (code, log) = refused_start(&end);
    assert_eq!(
        code,
        Some(3),
        "exit code on a store missing its tail; log:\n{log}"
    );
    assert!(log.contains("lost acknowledged writes"), "{log}");

    // Wherever the damage falls, the store is either refused with a message or holds
    // exactly what was acknowledged (damage in space sled no longer uses is harmless).
    // `export` opens the store as `serve` does; its output is compared with the clean one's.
    let export = |from: &Path, to: &Path| {
        cli([
            std::ffi::OsStr::new("export"),
            "--data-dir".as_ref(),
            from.as_os_str(),
            "--out".as_ref(),
            to.as_os_str(),
        ])
    };
    let reference = dir.path().join("reference");
    copy_dir(&pristine, &reference);
    assert!(export(&reference, &dir.path().join("ref-out"))
        .status
        .success());
    let read_all = |out: &Path| {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let clean = read_all(&dir.path().join("ref-out"));
    let (mut refused, mut harmless) = (0, 0);
    for tenth in 1..10 {
        let d = dir.path().join(format!("sweep-{tenth}"));
        copy_dir(&pristine, &d);
        invert(&d.join("db"), len * tenth / 10, 64);
        let out_dir = dir.path().join(format!("sweep-{tenth}-out"));
        let out = export(&d, &out_dir);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            assert!(
                read_all(&out_dir) == clean,
                "damage at {tenth}/10 of the log: the store opened with different contents"
            );
            harmless += 1;
        } else {
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(
                err.contains("lost acknowledged writes") || err.contains("is damaged"),
                "damage at {tenth}/10: {err}"
            );
            assert!(err.contains("backup"), "{err}");
            refused += 1;
        }
    }
    eprintln!("damage sweep: {refused} refused, {harmless} harmless");

    // The undamaged copy opens and holds every referral.
    let (child, base) = spawn_binary(&pristine, Some(&unthrottled_config()));
    let mut child = Guarded(child);
    let gw = TestGateway::remote(&base);
    for sr in &referrals {
        let r = gw.get(GP, &format!("/fhir/ServiceRequest/{sr}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(terminate(&mut child), Some(0));
}
