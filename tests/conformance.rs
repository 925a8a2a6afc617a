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

/// uv, the Python package installer (PyPI), in a virtualenv of its own under cargo's target
/// dir, installed with pip once: it makes the tests' virtualenvs in seconds where pip took
/// most of a minute for each.
const UV: &str = "uv==0.13.8";

/// One installation at a time: tests that share a tool run in parallel.
static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn uv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("uv");
    let uv = dir.join("venv/bin/uv");
    let ready = dir.join("installed");
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(UV) {
        std::fs::create_dir_all(&dir).expect("uv dir");
        run(
            Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(dir.join("venv")),
            "python3 -m venv",
        );
        run(
            Command::new(dir.join("venv/bin/python")).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                UV,
            ]),
            &format!("pip install {UV}"),
        );
        std::fs::write(&ready, UV).expect("uv marker");
    }
    uv
}

/// A virtualenv at `dir/venv` holding the PyPI packages `specs`, made (with uv) when it is
/// missing or was made for other versions; returns its bin directory.
pub fn venv(dir: &Path, specs: &[&str]) -> PathBuf {
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = dir.join("venv");
    let ready = dir.join("installed");
    let want = specs.join("\n");
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(want.as_str()) {
        std::fs::create_dir_all(dir).expect("tools dir");
        let uv = uv();
        run(
            Command::new(&uv)
                .args(["venv", "--quiet", "--clear", "--python", "python3"])
                .arg(&venv)
                .env("UV_PYTHON_DOWNLOADS", "never"),
            "uv venv",
        );
        run(
            Command::new(&uv)
                .args(["pip", "install", "--quiet", "--python"])
                .arg(venv.join("bin/python"))
                .args(specs)
                .env("UV_PYTHON_DOWNLOADS", "never"),
            &format!("uv pip install {}", specs.join(" ")),
        );
        std::fs::write(&ready, want).expect("tools marker");
    }
    venv.join("bin")
}

/// A virtualenv under `dir` with the PyPI package `spec`, made once; returns its python.
pub fn python_tool(dir: &Path, spec: &str) -> PathBuf {
    venv(dir, &[spec]).join("python")
}

/// The npm package `spec` installed under `dir` (once, when `probe` under its
/// node_modules is missing); returns node_modules.
pub fn npm_tool(dir: &Path, probe: &str, spec: &str) -> PathBuf {
    let node_modules = dir.join("node_modules");
    if !node_modules.join(probe).exists() {
        run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(dir)
                .arg(spec),
            &format!("npm install {spec}"),
        );
    }
    node_modules
}

/// Runs the npm `fhir` validator (`tests/conformance/validate.js`) over every resource in
/// `returned` (JSON lines); asserts none failed and returns what it printed.
pub async fn validate_all(returned: PathBuf, node_modules: PathBuf) -> String {
    let validate = Path::new(crate::common::ROOT).join("tests/conformance/validate.js");
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
    .expect("validator");
    println!("{validated}");
    assert!(validated.contains(" passed, 0 failed"), "{validated}");
    validated
}

/// Installs fhirpy and the npm fhir validator under `dir`, once.
pub fn tools(dir: &Path) -> (PathBuf, PathBuf) {
    (
        python_tool(dir, FHIRPY),
        npm_tool(dir, "fhir/package.json", FHIR_NPM),
    )
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
    let here = Path::new(crate::common::ROOT).join("tests/conformance");
    let suite = here.join("suite.py");
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
    let validated = validate_all(returned, node_modules).await;
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
