//! Black-box conformance: real, independent FHIR tooling against the real server.
//!
//! The test installs what it needs into cargo's target dir (first run only): Python
//! `fhirpy` (a FHIR client) in a virtualenv, and the npm `fhir` package (a validator). It then
//! runs `tests/conformance/suite.py` against a gateway on loopback — transactions,
//! conditional create twice, paging through three pages, read/vread/history, updates with
//! fresh and stale ETags, patch, $validate — and validates every resource the server returned
//! with `tests/conformance/validate.js`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

const FHIRPY: &str = "fhirpy==2.3.1";
const FHIR_NPM: &str = "fhir@4.12.0";

/// Runs a tool; its output, or a panic with it when it fails.
pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// Installs fhirpy and the npm fhir validator under `dir`, once.
fn tools(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let have_fhirpy = Command::new(&python)
        .args(["-c", "import fhirpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fhirpy {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
        run(
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                FHIRPY,
            ]),
            "pip install fhirpy",
        );
    }
    let node_modules = dir.join("node_modules");
    if !node_modules.join("fhir/package.json").exists() {
        run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(dir)
                .arg(FHIR_NPM),
            "npm install fhir",
        );
    }
    (python, node_modules)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_fhir_client_and_validator() {
    let tools_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-tools");
    let (python, node_modules) = tokio::task::spawn_blocking(move || tools(&tools_dir))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let base = format!("{}/fhir", gw.base);
    let returned = dir.path().join("returned.jsonl");
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let (suite, validate) = (here.join("suite.py"), here.join("validate.js"));
    let out = {
        let returned = returned.clone();
        tokio::task::spawn_blocking(move || {
            run(
                Command::new(&python).arg(&suite).arg(&base).arg(&returned),
                "conformance suite (fhirpy)",
            )
        })
        .await
        .unwrap()
    };
    println!("{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
    let validated = tokio::task::spawn_blocking(move || {
        run(
            Command::new("node")
                .arg(&validate)
                .arg(&returned)
                .env("NODE_PATH", &node_modules),
            "validation (npm fhir)",
        )
    })
    .await
    .unwrap();
    println!("{validated}");
    assert!(validated.contains(" passed, 0 failed"), "{validated}");
    for t in [
        "Bundle",
        "Task",
        "ServiceRequest",
        "Patient",
        "Observation",
        "CapabilityStatement",
        "OperationOutcome",
    ] {
        assert!(
            validated.contains(&format!("\"{t}\"")),
            "no {t} was validated: {validated}"
        );
    }
}
