//! Outcome letters over MESH (issue #12), against NHS England's own MESH sandbox (PyPI
//! `mesh-sandbox`, under uvicorn with `AUTH_MODE=full`, its file store, and mailbox and
//! workflow files written here, behind TLS that requires a client certificate generated
//! here) and NHS England's `mesh-client` reading the practice's mailbox as a GP system
//! would (`tests/mesh/practice.py`). What arrives is checked independently: each message as
//! a FHIR STU3 Bundle (PyPI `fhir.resources`), each PDF's text with `pdftotext` (Debian
//! poppler-utils). The harness installs all of these itself, once, into cargo's target dir.
//!
//! The gateway runs as the real binary, so its log can be read for patient data afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::conformance::run;

const PIP_PACKAGES: [&str; 3] = [
    "mesh-sandbox==1.0.137",
    "mesh-client==5.0.2",
    "fhir.resources==8.3.0",
];
const OURS: &str = "X26ABC1";
const PRACTICE: &str = "X26ABC2";

/// The sandbox, mesh-client and fhir.resources in a virtualenv under cargo's target dir
/// (installed once), and pdftotext; returns the venv's bin directory.
fn tools() -> PathBuf {
    ensure_debian_package("poppler-utils", "/usr/bin/pdftotext");
    crate::conformance::venv(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("mesh-tools"),
        &PIP_PACKAGES,
    )
}

fn here() -> PathBuf {
    Path::new(crate::common::ROOT).join("tests/mesh")
}

fn secret() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// NHS England's MESH sandbox on loopback, over TLS with client certificates required.
struct Sandbox {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    shared_key: String,
    ours_password: String,
    practice_password: String,
    process: Option<Guarded>,
}

impl Sandbox {
    fn start(dir: &Path) -> Sandbox {
        let bin = tools();
        let dir = dir.join("mesh");
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        // A CA, the sandbox's server certificate, and one client certificate (ours, and the
        // practice's system's: the sandbox checks only that the CA signed it).
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL (the sandbox's TLS) takes a certificate whose subject is
        // its issuer's for a self-signed one.
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "sp-gateway MESH test CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let server = p.signed_by(&server_key, &ca, &ca_key).unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let mut c = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        c.distinguished_name
            .push(rcgen::DnType::CommonName, "X26ABC1.sp-gateway.test");
        let client = c.signed_by(&client_key, &ca, &ca_key).unwrap();
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server.pem()),
            ("server.key", server_key.serialize_pem()),
            ("client.pem", client.pem()),
            ("test-client.key", client_key.serialize_pem()),
        ] {
            std::fs::write(pki.join(name), pem).unwrap();
        }
        let (shared_key, ours_password, practice_password) = (secret(), secret(), secret());
        let config = dir.join("config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(
            config.join("mailboxes.jsonl"),
            format!(
                "{}\n{}\n",
                json!({ "mailbox_id": OURS, "mailbox_name": "sp-gateway (test)", "billing_entity": "England", "ods_code": "X26", "org_code": "X26", "org_name": "Pendle CVS", "password": ours_password }),
                json!({ "mailbox_id": PRACTICE, "mailbox_name": "Nelson Health Centre (test)", "billing_entity": "England", "ods_code": "P81001", "org_code": "P81001", "org_name": "Nelson Health Centre", "password": practice_password })
            ),
        )
        .unwrap();
        std::fs::write(
            config.join("workflows.jsonl"),
            format!(
                "{}\n{}\n",
                json!({ "workflow_id": "GPFED_CONSULT_REPORT", "senders": [OURS], "receivers": [PRACTICE] }),
                json!({ "workflow_id": "GPFED_CONSULT_REPORT_ACK", "senders": [PRACTICE], "receivers": [OURS] })
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Sandbox {
            bin,
            dir,
            port,
            shared_key,
            ours_password,
            practice_password,
            process: None,
        };
        s.resume();
        s
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// (Re)starts the sandbox process on the same port and store.
    fn resume(&mut self) {
        let pki = self.dir.join("pki");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sandbox.log"))
            .unwrap();
        let child = Command::new(self.bin.join("uvicorn"))
            .args(["sandbox_app:app", "--app-dir"])
            .arg(here())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--workers", "1", "--log-level", "warning"])
            .arg("--ssl-certfile")
            .arg(pki.join("server.pem"))
            .arg("--ssl-keyfile")
            .arg(pki.join("server.key"))
            .arg("--ssl-ca-certs")
            .arg(pki.join("ca.pem"))
            .args(["--ssl-cert-reqs", "2"])
            .env("AUTH_MODE", "full")
            .env("STORE_MODE", "file")
            .env("MAILBOXES_DATA_DIR", self.dir.join("store"))
            .env("SHARED_KEY", &self.shared_key)
            .env("MESH_SANDBOX_CONFIG_DIR", self.dir.join("config"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the MESH sandbox");
        self.process = Some(Guarded(child));
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the MESH sandbox did not start: {}",
            std::fs::read_to_string(self.dir.join("sandbox.log")).unwrap_or_default()
        );
    }

    fn down(&mut self) {
        self.process = None; // killed on drop
    }

    /// Injects a fault (see tests/mesh/sandbox_app.py).
    fn fault(&self, name: &str, value: Option<&str>) {
        let path = self.dir.join("config").join(name);
        match value {
            Some(v) => std::fs::write(path, v).unwrap(),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Whole messages that reached the practice's mailbox (the sandbox's file store; a
    /// message still uploading its chunks is not delivered).
    fn delivered_to_practice(&self) -> usize {
        std::fs::read_dir(self.dir.join("store").join(PRACTICE).join("in"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .filter(|e| {
                        let m: Value = std::fs::read(e.path())
                            .ok()
                            .and_then(|b| serde_json::from_slice(&b).ok())
                            .unwrap_or_default();
                        // The latest event comes first.
                        matches!(
                            m["events"][0]["status"].as_str(),
                            Some("accepted" | "acknowledged")
                        )
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// The practice's system (mesh-client) configuration, written for practice.py.
    fn practice_config(&self) -> PathBuf {
        let pki = self.dir.join("pki");
        let path = self.dir.join("practice.json");
        let cfg = json!({
            "url": self.url(), "mailbox": PRACTICE, "password": self.practice_password,
            "shared_key": self.shared_key, "cert": pki.join("client.pem"),
            "key": pki.join("test-client.key"), "ca": pki.join("ca.pem"), "to": OURS
        });
        std::fs::write(&path, cfg.to_string()).unwrap();
        path
    }

    /// Reads the practice's inbox as a GP system would; returns each message's MESH headers
    /// and body, in arrival order.
    fn practice_receive(&self) -> Vec<(Value, Vec<u8>)> {
        let out = self.dir.join("received");
        let _ = std::fs::remove_dir_all(&out);
        run(
            Command::new(self.bin.join("python"))
                .arg(here().join("practice.py"))
                .arg(self.practice_config())
                .arg("receive")
                .arg(&out),
            "practice.py receive",
        );
        let mut names: Vec<PathBuf> = std::fs::read_dir(&out)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|x| x == "json"));
        names.sort();
        names
            .into_iter()
            .map(|h| {
                let headers: Value = serde_json::from_slice(&std::fs::read(&h).unwrap()).unwrap();
                let body = std::fs::read(h.with_extension("body")).unwrap();
                (headers, body)
            })
            .collect()
    }

    /// Sends an ITK3 acknowledgement from the practice to our mailbox.
    fn practice_ack(&self, ack: &Value) {
        let path = self.dir.join(format!("ack-{}.json", secret()));
        std::fs::write(&path, ack.to_string()).unwrap();
        run(
            Command::new(self.bin.join("python"))
                .arg(here().join("practice.py"))
                .arg(self.practice_config())
                .arg("send")
                .arg(&path)
                .arg("GPFED_CONSULT_REPORT_ACK"),
            "practice.py send",
        );
    }

    fn validate_stu3(&self, bodies: &[PathBuf]) -> String {
        run(
            Command::new(self.bin.join("python"))
                .arg(here().join("practice.py"))
                .arg("-")
                .arg("validate")
                .args(bodies),
            "STU3 validation (fhir.resources)",
        )
    }

    /// The gateway's `[practices.mesh]` for P81001, with `password` as our password.
    fn gateway_mesh(&self, password: &str) -> String {
        let pki = self.dir.join("pki");
        std::fs::write(self.dir.join("password"), format!("{password}\n")).unwrap();
        std::fs::write(self.dir.join("shared-key"), &self.shared_key).unwrap();
        format!(
            "[practices.mesh]\nbase_url = \"{}\"\nmailbox = \"{OURS}\"\npassword_file = \"{}\"\n\
             shared_key_file = \"{}\"\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n\
             to_mailbox = \"{PRACTICE}\"\nsender_ods = \"X26\"\nsender_name = \"Pendle CVS (sp-gateway)\"\n\
             chunk_bytes = 4096\ninbox_poll_ms = 200\nstructured_outcomes = true\n",
            self.url(),
            self.dir.join("password").display(),
            self.dir.join("shared-key").display(),
            pki.join("ca.pem").display(),
            pki.join("client.pem").display(),
            pki.join("test-client.key").display()
        )
    }
}

/// The demo config with P81001 on MESH and a quick outbox.
fn config(mesh: &str) -> String {
    config_text(|t| {
        let t = t.replacen(
            "name = \"Nelson Health Centre\"\n",
            &format!("name = \"Nelson Health Centre\"\n{mesh}"),
            1,
        );
        format!(
            "{t}\n[outbox]\nbase_delay_ms = 100\nmax_delay_ms = 1000\npoll_ms = 50\nrequest_timeout_ms = 3000\nmax_attempts = 50\n"
        )
    })
}

/// An ITK3 response (ITK008M) from the practice to message `to` with ITK response `code`.
fn itk_ack(to: &str, code: &str, display: &str, negative: bool) -> Value {
    let (header, org, outcome) = (secret(), secret(), secret());
    let mut issue = json!({
        "severity": if negative { "fatal" } else { "information" },
        "code": if negative { "not-found" } else { "informational" },
        "details": { "coding": [{ "system": "https://fhir.nhs.uk/STU3/CodeSystem/ITK-ResponseCodes-1", "code": code, "display": display }] }
    });
    if negative {
        issue["diagnostics"] = json!("No patient with these details is registered here");
    }
    json!({
        "resourceType": "Bundle", "id": secret(), "type": "message",
        "meta": { "profile": ["https://fhir.nhs.uk/STU3/StructureDefinition/ITK-Message-Bundle-1"] },
        "entry": [
            { "fullUrl": format!("urn:uuid:{header}"), "resource": {
                "resourceType": "MessageHeader", "id": header,
                "extension": [{ "url": "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-ITK-MessageHandling-2", "extension": [
                    { "url": "BusAckRequested", "valueBoolean": false },
                    { "url": "InfAckRequested", "valueBoolean": false },
                    { "url": "SenderReference", "valueString": to } ] }],
                "event": { "system": "https://fhir.nhs.uk/STU3/CodeSystem/ITK-MessageEvent-2", "code": "ITK008M", "display": "ITK Response" },
                "sender": { "reference": format!("urn:uuid:{org}") },
                "timestamp": "2026-11-21T12:00:00+00:00",
                "source": { "endpoint": PRACTICE },
                "response": { "identifier": to, "code": if negative { "fatal-error" } else { "ok" }, "details": { "reference": format!("urn:uuid:{outcome}") } }
            } },
            { "fullUrl": format!("urn:uuid:{org}"), "resource": {
                "resourceType": "Organization", "id": org,
                "identifier": [{ "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "P81001" }] } },
            { "fullUrl": format!("urn:uuid:{outcome}"), "resource": {
                "resourceType": "OperationOutcome", "id": outcome, "issue": [issue] } }
        ]
    })
}

async fn eventually<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn outbox(gw: &TestGateway) -> Value {
    let r = gw.get(ADMIN, "/admin/outbox").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// SWEMWBS (718466001) score for a referral, as the provider posts it.
async fn post_swemwbs(gw: &TestGateway, sid: &str, pid: &str, value: i64) -> String {
    let obs = json!({
        "resourceType": "Observation", "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] },
        "subject": { "reference": format!("Patient/{pid}") },
        "basedOn": [{ "reference": format!("ServiceRequest/{sid}") }],
        "valueInteger": value
    });
    let r = gw.post_json(CRAFTS, "/fhir/Observation", &obs).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

fn pdf_text(dir: &Path, bundle: &Value) -> String {
    let binary = bundle["entry"][2]["resource"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Binary")
        .expect("a Binary in the document");
    assert_eq!(binary["contentType"], "application/pdf");
    use base64::Engine;
    let pdf = base64::engine::general_purpose::STANDARD
        .decode(binary["content"].as_str().unwrap())
        .unwrap();
    let path = dir.join(format!("{}.pdf", secret()));
    std::fs::write(&path, &pdf).unwrap();
    let out = run(Command::new("pdftotext").arg(&path).arg("-"), "pdftotext");
    let info = run(Command::new("pdfinfo").arg(&path), "pdfinfo");
    assert!(
        info.lines()
            .any(|l| l.starts_with("Pages:") && l.split_whitespace().nth(1) == Some("1")),
        "one page: {info}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_letters_reach_the_practice_over_mesh_and_acknowledgements_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = tokio::task::spawn_blocking({
        let d = dir.path().to_path_buf();
        move || Sandbox::start(&d)
    })
    .await
    .unwrap();
    let data = dir.path().join("data");
    let (mut child, gw) = gateway(&data, &sandbox.gateway_mesh(&sandbox.ours_password));

    // The loop: referral → accepted → in progress → SWEMWBS 24 → completed.
    let (pid, sid, tid) = gw.refer(GP, &fixture("referral-ada.json")).await;
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("accepted"))
            .await
            .status,
        200
    );
    assert_eq!(
        gw.transition(CRAFTS, &tid, status_to("in-progress"))
            .await
            .status,
        200
    );
    let oid = post_swemwbs(&gw, &sid, &pid, 24).await;
    let done = gw
        .transition(CRAFTS, &tid, |t| {
            t["status"] = json!("completed");
            t["output"] = json!([{ "type": { "text": "SWEMWBS" }, "valueReference": { "reference": format!("Observation/{oid}") } }]);
        })
        .await;
    assert_eq!(done.status, 200, "{}", done.body);

    // Two letters (accepted, completed: in-progress is not a default event), sent in order.
    for _ in 0..300 {
        if outbox(&gw).await["delivered"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let o = outbox(&gw).await;
    assert_eq!(
        o["delivered"],
        2,
        "two letters sent: {o}\n{}",
        std::fs::read_to_string(format!("{}.log", data.display())).unwrap_or_default()
    );
    let received = tokio::task::spawn_blocking(move || {
        let r = sandbox.practice_receive();
        (sandbox, r)
    })
    .await
    .unwrap();
    let (sandbox, received) = received;
    assert_eq!(received.len(), 2, "one message per event");
    let mut bodies = Vec::new();
    let mut local_ids = Vec::new();
    for (i, (headers, body)) in received.iter().enumerate() {
        assert_eq!(headers["workflow_id"], "GPFED_CONSULT_REPORT");
        assert_eq!(headers["sender"], OURS);
        assert!(
            headers["chunks"]
                .as_str()
                .unwrap_or("1")
                .parse::<u32>()
                .unwrap()
                > 1,
            "a letter larger than chunk_bytes travels in chunks: {headers}"
        );
        let bundle: Value = serde_json::from_slice(body).expect("the message is JSON");
        assert_eq!(bundle["type"], "message");
        let header = &bundle["entry"][0]["resource"];
        assert_eq!(header["resourceType"], "MessageHeader");
        assert_eq!(header["event"]["code"], "ITK007C");
        assert_eq!(header["source"]["endpoint"], OURS);
        assert_eq!(
            header["id"], headers["local_id"],
            "local id is the ITK message id"
        );
        local_ids.push(headers["local_id"].as_str().unwrap().to_string());
        let path = dir.path().join(format!("letter-{i}.json"));
        std::fs::write(&path, body).unwrap();
        bodies.push(path);
        let text = pdf_text(dir.path(), &bundle);
        assert!(text.contains("999 000 0018"), "the NHS number: {text}");
        assert!(text.contains("Ada") && text.contains("Example"), "{text}");
        if i == 0 {
            assert!(text.contains("Referral accepted"), "{text}");
        } else {
            assert!(text.contains("Support completed"), "{text}");
            assert!(
                text.contains("Short Warwick-Edinburgh Mental Well-being Scale score (SNOMED CT 718466001): 24"),
                "the outcome and its value: {text}"
            );
            // Structured too (structured_outcomes = true).
            let doc = &bundle["entry"][2]["resource"]["entry"];
            assert!(
                doc.as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["resource"]["resourceType"] == "Observation"
                        && e["resource"]["code"]["coding"][0]["code"] == "718466001"
                        && e["resource"]["valueQuantity"]["value"] == 24),
                "a coded Observation: {doc}"
            );
        }
    }
    let validated = sandbox.validate_stu3(&bodies);
    assert!(validated.contains("2 passed, 0 failed"), "{validated}");

    // Acknowledgements, as the GP system sends them: both positive for the first letter;
    // for the second, the infrastructure one positive and the business one negative.
    let acks = [
        itk_ack(&local_ids[0], "20013", "Success", false),
        itk_ack(&local_ids[0], "30001", "Patient known here", false),
        itk_ack(&local_ids[1], "20013", "Success", false),
        itk_ack(&local_ids[1], "30002", "Patient not known here", true),
    ];
    let sandbox = tokio::task::spawn_blocking(move || {
        for a in &acks {
            sandbox.practice_ack(a);
        }
        sandbox
    })
    .await
    .unwrap();
    let dead = eventually(
        "the negative acknowledgement dead-lettered",
        30,
        async || {
            let o = outbox(&gw).await;
            let dead = o["dead_letters"].as_array().cloned().unwrap_or_default();
            (dead.len() == 1).then(|| dead[0].clone())
        },
    )
    .await;
    assert_eq!(dead["letter"]["local_id"], local_ids[1].as_str());
    assert!(
        dead["last_error"].as_str().unwrap().contains("30002"),
        "its reason: {dead}"
    );
    let kinds: Vec<&str> = dead["letter"]["acks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["infrastructure", "business"]);
    // On the Task's trail: each letter sent, each acknowledgement received.
    let trail = eventually("four acknowledgements on the trail", 30, async || {
        let r = gw
            .get(
                AUDITOR,
                &format!("/fhir/AuditEvent?entity=Task/{tid}&_count=100"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let descs: Vec<String> = r
            .entries()
            .iter()
            .filter_map(|e| e["outcomeDesc"].as_str().map(str::to_string))
            .collect();
        (descs
            .iter()
            .filter(|d| d.contains("acknowledgement"))
            .count()
            == 4)
            .then_some(descs)
    })
    .await;
    assert_eq!(
        trail
            .iter()
            .filter(|d| d.contains("sent to practice P81001 over MESH"))
            .count(),
        2,
        "{trail:?}"
    );
    let prov = gw
        .get(AUDITOR, &format!("/fhir/Provenance?target=Task/{tid}"))
        .await;
    assert!(
        prov.body.to_string().contains("30002"),
        "the negative acknowledgement is on the Task's Provenance: {}",
        prov.body
    );
    // The inbox is empty (each acknowledgement was acknowledged on MESH).
    assert_eq!(outbox(&gw).await["pending"], json!([]));

    assert_eq!(terminate(&mut child), Some(0));
    // Nothing in the gateway's log but ids and statuses.
    let log = std::fs::read_to_string(format!("{}.log", data.display())).unwrap();
    for secret in [
        "9990000018",
        "999 000 0018",
        "Example",
        "Ada",
        "Lives alone",
    ] {
        assert!(
            !log.contains(secret),
            "the log holds patient data ({secret})"
        );
    }
    drop(sandbox);
}

/// The real gateway on `data` with `[practices.mesh]` text `mesh`; killed if the test ends
/// without stopping it.
fn gateway(data: &Path, mesh: &str) -> (Guarded, TestGateway) {
    let (child, base) = spawn_binary(data, Some(&config(mesh)));
    (Guarded(child), TestGateway::remote(&base))
}

fn log_of(data: &Path) -> String {
    std::fs::read_to_string(format!("{}.log", data.display())).unwrap_or_default()
}

/// Refers a new patient (referral `n`) and has pendle-crafts accept it: one letter.
async fn accepted_referral(gw: &TestGateway, n: usize) {
    let nhs = nhs_number(900 + n);
    let (_, _, tid) = gw
        .refer(
            GP,
            &variant("referral-ada.json", &format!("MESH-{n}"), Some(&nhs)),
        )
        .await;
    let r = gw.transition(CRAFTS, &tid, status_to("accepted")).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn delivered(gw: &TestGateway) -> u64 {
    outbox(gw).await["delivered"].as_u64().unwrap()
}

/// Faults: a wrong password (one attempt, a dead letter, no retry storm), MESH down, MESH
/// answering 503, and the gateway killed (SIGKILL) after MESH accepted a letter but before
/// the gateway recorded it (no duplicate: tracking is asked before sending again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_faults_never_duplicate_a_letter_or_storm_and_never_make_the_gateway_unready() {
    let dir = tempfile::tempdir().unwrap();
    let mut sandbox = tokio::task::spawn_blocking({
        let d = dir.path().to_path_buf();
        move || Sandbox::start(&d)
    })
    .await
    .unwrap();
    let data = dir.path().join("data");

    // 1. A wrong password: MESH refuses (403); the letter is dead-lettered at once.
    let (mut child, gw) = gateway(&data, &sandbox.gateway_mesh("wrong"));
    accepted_referral(&gw, 1).await;
    let dead = eventually(
        "a dead letter for the refused credentials",
        20,
        async || {
            let d = outbox(&gw).await["dead_letters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            (d.len() == 1).then(|| d[0].clone())
        },
    )
    .await;
    assert_eq!(dead["attempts"], 1, "{dead}");
    assert!(
        dead["last_error"]
            .as_str()
            .unwrap()
            .contains("credentials (HTTP 403)"),
        "{dead}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let o = outbox(&gw).await;
    assert_eq!(o["dead_letters"][0]["attempts"], 1, "no retries: {o}");
    assert_eq!(gw.get(ADMIN, "/readyz").await.status, 200);
    assert_eq!(sandbox.delivered_to_practice(), 0);
    // The operator fixes the password and retries the dead letter: it goes, once.
    assert_eq!(terminate(&mut child), Some(0));
    let password = sandbox.ours_password.clone();
    let (mut child, gw) = gateway(&data, &sandbox.gateway_mesh(&password));
    let seq = dead["seq"].as_u64().unwrap();
    let r = gw
        .post_json(ADMIN, &format!("/admin/outbox/{seq}/retry"), &json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually("the retried letter sent", 20, async || {
        (delivered(&gw).await == 1).then_some(())
    })
    .await;
    assert_eq!(sandbox.delivered_to_practice(), 1);

    // 2. MESH down: the letter waits, retried with backoff; the gateway stays ready.
    sandbox.down();
    accepted_referral(&gw, 2).await;
    eventually("failed attempts against a down MESH", 20, async || {
        let o = outbox(&gw).await;
        (o["pending"][0]["attempts"].as_u64().unwrap_or(0) >= 2).then_some(())
    })
    .await;
    assert_eq!(gw.get(ADMIN, "/readyz").await.status, 200);
    let metrics = gw.get(ADMIN, "/metrics").await;
    assert!(
        metrics
            .body
            .to_string()
            .contains("sp_gateway_outbox_endpoint_failing{practice=\\\"P81001\\\"} 1"),
        "{}",
        metrics.body
    );
    let sandbox = tokio::task::spawn_blocking(move || {
        sandbox.resume();
        sandbox
    })
    .await
    .unwrap();
    eventually("the letter sent once MESH is back", 30, async || {
        (delivered(&gw).await == 2).then_some(())
    })
    .await;
    assert_eq!(sandbox.delivered_to_practice(), 2);

    // 3. MESH answers 503 twice: retried, then sent, once.
    sandbox.fault("fail-sends", Some("2"));
    accepted_referral(&gw, 3).await;
    eventually("the letter sent after two 503s", 30, async || {
        (delivered(&gw).await == 3).then_some(())
    })
    .await;
    assert_eq!(
        sandbox.delivered_to_practice(),
        3,
        "no duplicate after 503s"
    );
    assert!(log_of(&data).contains("HTTP 503"), "the 503s were seen");

    // 4. SIGKILL after MESH accepted the letter, before the gateway recorded it.
    sandbox.fault("hold-sends", Some("60"));
    accepted_referral(&gw, 4).await;
    eventually("MESH accepted the fourth letter", 30, async || {
        (sandbox.delivered_to_practice() == 4).then_some(())
    })
    .await;
    child.kill().unwrap(); // SIGKILL: the answer never arrives, nothing is recorded
    let _ = child.wait();
    sandbox.fault("hold-sends", None);
    let password = sandbox.ours_password.clone();
    let (mut child, gw) = gateway(&data, &sandbox.gateway_mesh(&password));
    eventually("the fourth letter recorded as sent", 30, async || {
        (delivered(&gw).await == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sandbox.delivered_to_practice(),
        4,
        "tracking found it: not sent again"
    );
    assert!(
        log_of(&data).contains("letter found in MESH tracking; not sent again"),
        "{}",
        log_of(&data)
    );
    // And the practice reads four letters, one per referral.
    let received = tokio::task::spawn_blocking(move || sandbox.practice_receive())
        .await
        .unwrap();
    assert_eq!(received.len(), 4);
    assert_eq!(terminate(&mut child), Some(0));
}
