//! The real binary: `serve` on a loopback port, killed with SIGKILL and started again on the
//! same data dir with nothing acknowledged lost; `check-config` names file and key.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;

fn spawn(data: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sp-gateway"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sp-gateway");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read listening line");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    (child, base)
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
    let ok = Command::new(env!("CARGO_BIN_EXE_sp-gateway"))
        .args(["check-config", "--config", "config/gateway.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
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
    let out = Command::new(env!("CARGO_BIN_EXE_sp-gateway"))
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
    let out = Command::new(env!("CARGO_BIN_EXE_sp-gateway"))
        .args([
            "serve",
            "--config",
            "config/gateway.toml",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path().join("d"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("demo tokens"));
    // --help for every subcommand.
    for sub in ["serve", "check-config"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sp-gateway"))
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
fn production_example_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_sp-gateway"))
        .args(["check-config", "--config", "config/production.example.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
