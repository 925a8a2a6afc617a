//! The real binary: `serve` on a loopback port, killed with SIGKILL and started again on the
//! same data dir with nothing acknowledged lost; `check-config` names file and key.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::common::*;

/// The gateway on `{dir}/data`, so that its log (`{dir}/data.log`) goes with the temp dir.
fn spawn(dir: &std::path::Path) -> (Child, String) {
    spawn_binary(&dir.join("data"), None)
}

#[tokio::test]
async fn acknowledged_referral_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (mut child, base) = spawn(dir.path());
    let r = http
        .post(format!("{base}/referrals"))
        .bearer_auth(GP)
        .header("content-type", "application/json")
        .body(fixture("referral-ada.json").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    let task_id = body["entry"][2]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    child.kill().unwrap(); // SIGKILL: no shutdown, no flush on exit
    child.wait().unwrap();

    let (mut child, base) = spawn(dir.path());
    let r = http
        .get(format!("{base}/fhir/Task/{task_id}"))
        .bearer_auth(CRAFTS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{base}/referrals"))
        .bearer_auth(GP)
        .header("content-type", "application/json")
        .body(fixture("referral-ada.json").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "resubmission after a crash is recognised");

    // A Task update and an Observation, each acknowledged, then SIGKILL.
    let task: serde_json::Value = http
        .get(format!("{base}/fhir/Task/{task_id}"))
        .bearer_auth(CRAFTS)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut accepted = task.clone();
    accepted["status"] = serde_json::json!("accepted");
    let r = http
        .put(format!("{base}/fhir/Task/{task_id}"))
        .bearer_auth(CRAFTS)
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(accepted.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let obs = serde_json::json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": task["for"], "basedOn": [task["focus"]],
        "performer": [{ "reference": "Organization/pendle-crafts" }], "valueInteger": 22
    });
    let r = http
        .post(format!("{base}/fhir/Observation"))
        .bearer_auth(CRAFTS)
        .header("content-type", "application/fhir+json")
        .body(obs.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let obs_id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, base) = spawn(dir.path());
    let t: serde_json::Value = http
        .get(format!("{base}/fhir/Task/{task_id}"))
        .bearer_auth(CRAFTS)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["status"], "accepted");
    assert_eq!(t["meta"]["versionId"], "2");
    let r = http
        .get(format!("{base}/fhir/Observation/{obs_id}"))
        .bearer_auth(GP)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn check_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["check-config", "--config", "config/gateway.toml"])
        .current_dir(crate::common::ROOT)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        config_text(|t| {
            t.replace(
                "fallback_provider = \"pendle-cvs-hub\"",
                "fallback_provider = \"nobody\"",
            )
        }),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml")
            && err.contains("routing.fallback_provider")
            && err.contains("nobody"),
        "{err}"
    );
    // Demo tokens on a non-loopback listener are refused.
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args([
            "serve",
            "--config",
            "config/gateway.toml",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path().join("d"))
        .current_dir(crate::common::ROOT)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("demo tokens"));
    // --help for every subcommand.
    for sub in ["serve", "check-config"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("--config") && text.contains("--data-dir"),
            "{text}"
        );
    }
}

#[test]
fn production_example_config_is_valid_but_for_its_certificates() {
    // Everything in it checks out; the certificate files it names are not on this machine,
    // and check-config says exactly which one is missing.
    let out = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
        .args(["check-config", "--config", "config/production.example.toml"])
        .current_dir(crate::common::ROOT)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("tls.cert: /etc/sp-gateway/tls/server.crt: cannot read"),
        "{err}"
    );
}

/// Runs the whole loop against the real binary with its log captured (text and JSON, at
/// our most verbose level) and checks that no patient identifier or free text was logged.
#[tokio::test]
async fn logs_never_hold_patient_data() {
    for (log_json, filter) in [(false, "info"), (true, "sp_gateway=trace,info")] {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir"];
        let data = dir.path().join("data");
        args.push(data.to_str().unwrap());
        if log_json {
            args.push("--log-json");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_tested-sp-gateway"))
            .args(&args)
            .env("RUST_LOG", filter)
            .current_dir(crate::common::ROOT)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_string();
        let http = reqwest::Client::new();
        let send = |m: reqwest::Method,
                    path: String,
                    token: &'static str,
                    body: Option<serde_json::Value>,
                    etag: Option<String>| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let mut rb = http.request(m, format!("{base}{path}")).bearer_auth(token);
                if let Some(b) = body {
                    rb = rb
                        .header("content-type", "application/fhir+json")
                        .body(b.to_string());
                }
                if let Some(e) = etag {
                    rb = rb.header("if-match", e);
                }
                let r = rb.send().await.unwrap();
                let etag = r
                    .headers()
                    .get("etag")
                    .map(|v| v.to_str().unwrap().to_string());
                (
                    r.status().as_u16(),
                    etag,
                    r.json::<serde_json::Value>().await.unwrap_or_default(),
                )
            }
        };
        let bob = fixture("referral-bob.json");
        let (s, _, b) = send(
            reqwest::Method::POST,
            "/referrals".into(),
            GP,
            Some(bob.clone()),
            None,
        )
        .await;
        assert_eq!(s, 201);
        let task = b["entry"][2]["resource"].clone();
        let tid = task["id"].as_str().unwrap().to_string();
        // Failures too: a bad NHS number, a conflict, a stale ETag, someone else's Task.
        let mut bad = bob.clone();
        bad["patient"]["nhsNumber"] = serde_json::json!("9990000027");
        send(
            reqwest::Method::POST,
            "/referrals".into(),
            GP,
            Some(bad),
            None,
        )
        .await;
        let mut changed = bob.clone();
        changed["notes"] = serde_json::json!("Different notes about rent arrears.");
        send(
            reqwest::Method::POST,
            "/referrals".into(),
            GP,
            Some(changed),
            None,
        )
        .await;
        let nhs = bob["patient"]["nhsNumber"].as_str().unwrap();
        send(
            reqwest::Method::GET,
            format!("/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"),
            GP,
            None,
            None,
        )
        .await;
        send(
            reqwest::Method::GET,
            format!("/fhir/Task/{tid}"),
            CRAFTS,
            None,
            None,
        )
        .await;
        let mut t = task.clone();
        t["status"] = serde_json::json!("accepted");
        let (s, _, _) = send(
            reqwest::Method::PUT,
            format!("/fhir/Task/{tid}"),
            MONEY,
            Some(t.clone()),
            Some("W/\"1\"".into()),
        )
        .await;
        assert_eq!(s, 200);
        send(
            reqwest::Method::PUT,
            format!("/fhir/Task/{tid}"),
            MONEY,
            Some(t.clone()),
            Some("W/\"1\"".into()),
        )
        .await;
        let (_, _, cur) = send(
            reqwest::Method::GET,
            format!("/fhir/Task/{tid}"),
            MONEY,
            None,
            None,
        )
        .await;
        let obs = serde_json::json!({
            "resourceType": "Observation", "status": "final",
            "code": { "coding": [{ "system": sp_gateway::fhir::feedback_system(), "code": "link-worker-feedback" }] },
            "subject": cur["for"], "basedOn": [cur["focus"]],
            "performer": [{ "reference": "Organization/burnley-money-advice" }],
            "valueString": "Bob came to the debt clinic and set up a payment plan."
        });
        let (s, _, _) = send(
            reqwest::Method::POST,
            "/fhir/Observation".into(),
            MONEY,
            Some(obs),
            None,
        )
        .await;
        assert_eq!(s, 201);
        let mut declined = cur.clone();
        declined["status"] = serde_json::json!("cancelled");
        declined["statusReason"] = serde_json::json!({ "text": "Bob moved to Leeds" });
        let (s, _, _) = send(
            reqwest::Method::PUT,
            format!("/fhir/Task/{tid}"),
            MONEY,
            Some(declined),
            Some("W/\"2\"".into()),
        )
        .await;
        assert_eq!(s, 200);
        send(
            reqwest::Method::GET,
            format!(
                "/fhir/Observation?subject={}",
                cur["for"]["reference"].as_str().unwrap()
            ),
            GP,
            None,
            None,
        )
        .await;
        child.kill().unwrap();
        child.wait().unwrap();

        let logged = std::fs::read_to_string(&log_path).unwrap();
        assert!(logged.contains("request"), "nothing was logged: {logged}");
        let p = &bob["patient"];
        let secrets = [
            p["nhsNumber"].as_str().unwrap(),
            p["givenName"].as_str().unwrap(),
            p["familyName"].as_str().unwrap(),
            p["postcode"].as_str().unwrap(),
            "BB11",
            p["email"].as_str().unwrap(),
            p["birthDate"].as_str().unwrap(),
            "9990000027",
            bob["notes"].as_str().unwrap(),
            "rent arrears",
            "payment plan",
            "moved to Leeds",
        ];
        for s in secrets {
            assert!(
                !logged.contains(s),
                "the log (json={log_json}) holds {s:?}:\n{logged}"
            );
        }
    }
}

/// README's quickstart is `cargo run --release -- serve`: with two binaries in the package,
/// that only works while the gateway is the default one.
#[test]
fn the_quickstart_command_runs_the_gateway() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
    assert!(manifest.contains("default-run = \"sp-gateway\""));
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- serve"));
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/run")).unwrap();
    let test = "cargo test --release --locked --workspace";
    assert!(readme.contains(test) && ci.contains(&format!("\n{test}\n")));
}

/// The test command reuses the release build (issue #11) only while the tests turn on no
/// feature of a crate the gateway uses that the gateway's own build does not: one such
/// feature and the test command compiles tokio, the HTTP stack and the gateway again, at
/// opt-level 3 (minutes). The root Cargo.toml declares those features; this names any that
/// drift.
#[test]
fn the_tests_turn_on_no_feature_the_release_build_lacks() {
    let tree = |scope: &[&str]| -> std::collections::BTreeMap<String, String> {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .arg("tree")
            .args(scope)
            .args(["--offline", "--locked", "--prefix", "none", "-f", "{p}|{f}"])
            .current_dir(crate::common::ROOT)
            .output()
            .expect("run cargo tree");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('|'))
            .map(|(p, f)| {
                (
                    p.trim_end_matches(" (*)").to_string(),
                    f.trim_end_matches(" (*)").to_string(),
                )
            })
            .collect()
    };
    let gateway = tree(&["-p", "sp-gateway", "-e", "normal"]);
    let everything = tree(&["--workspace", "-e", "normal,dev"]);
    let drifted: Vec<String> = gateway
        .iter()
        .filter(|(p, f)| everything.get(*p).is_some_and(|g| g != *f))
        .map(|(p, f)| {
            format!(
                "{p}: the gateway builds it with [{f}], the tests with [{}]",
                everything[p]
            )
        })
        .collect();
    assert!(gateway.len() > 100, "{gateway:?}");
    assert!(
        drifted.is_empty(),
        "declare these features in the root Cargo.toml too:\n{}",
        drifted.join("\n")
    );
}

/// The repository builds, tests and explains itself with nothing beside it: no file in it
/// (but build output) names a path in the directory that sits beside it in development.
#[test]
fn no_file_refers_outside_the_repository() {
    let root = std::path::Path::new(crate::common::ROOT);
    let needle = format!("..{}shared", '/');
    let mut offenders = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                if !matches!(name.as_str(), "target" | ".git" | "data" | "backups") {
                    stack.push(path);
                }
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(&path) {
                if text.contains(&needle) {
                    offenders.push(path.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
    }
    offenders.sort();
    assert!(
        offenders.is_empty(),
        "these files refer to {needle}: copy what they need into the repository: {offenders:?}"
    );
}
