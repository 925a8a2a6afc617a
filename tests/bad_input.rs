//! Every file in fixtures/bad/ (listed in its manifest.json) is answered with the expected
//! 4xx, an OperationOutcome naming the element, and an unchanged store.

use crate::common::*;
use reqwest::Method;
use serde_json::Value;

#[tokio::test]
async fn every_bad_fixture_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    // A live referral for the Task and Observation cases to aim at.
    let (_, _, task_id) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let manifest: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("bad/manifest.json")).unwrap(),
    )
    .unwrap();
    assert!(manifest.len() >= 40, "only {} bad inputs", manifest.len());
    let files: Vec<String> = std::fs::read_dir(fixtures().join("bad"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f != "manifest.json")
        .collect();
    assert_eq!(
        files.len(),
        manifest.len(),
        "every file in fixtures/bad is in the manifest"
    );

    let mut failures = Vec::new();
    for case in &manifest {
        let file = case["file"].as_str().unwrap();
        let path = case["path"].as_str().unwrap().replace("{task}", &task_id);
        let method: Method = case["method"].as_str().unwrap().parse().unwrap();
        let token = match path.as_str() {
            p if p.starts_with("/fhir/") => CRAFTS,
            _ => GP,
        };
        let body = std::fs::read(fixtures().join("bad").join(file)).unwrap();
        let body = String::from_utf8(body.clone())
            .map(|s| s.replace("{task}", &task_id).into_bytes())
            .unwrap_or(body);
        let ct = case["content_type"].as_str().filter(|c| !c.is_empty());
        let headers: &[(&str, &str)] = if method == Method::PUT {
            &[("if-match", "W/\"1\"")]
        } else {
            &[]
        };
        let before = gw.digest();
        let r = gw
            .request(method, &path, Some(token), ct, Some(body), headers)
            .await;
        let expected = case["status"].as_u64().unwrap() as u16;
        let expr = case["expression"].as_str().unwrap();
        let mut problems = Vec::new();
        if r.status.as_u16() != expected {
            problems.push(format!("status {} (expected {expected})", r.status));
        }
        if r.body["resourceType"] != "OperationOutcome" {
            problems.push("body is not an OperationOutcome".into());
        } else {
            let issue = &r.body["issue"][0];
            if issue["severity"] != "error"
                || !issue["code"].is_string()
                || !issue["diagnostics"].is_string()
            {
                problems.push(format!("issue lacks severity/code/diagnostics: {issue}"));
            }
            let exprs: Vec<&str> = r.body["issue"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|i| i["expression"][0].as_str())
                .collect();
            if !expr.is_empty() && !exprs.contains(&expr) {
                problems.push(format!("no issue names {expr}: {}", r.body));
            }
        }
        if gw.digest() != before {
            problems.push("the store changed".into());
        }
        if !problems.is_empty() {
            failures.push(format!("{file}: {}", problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        manifest.len(),
        failures.join("\n")
    );
    // Still serving.
    assert_eq!(
        gw.get(GP, &format!("/fhir/Task/{task_id}")).await.status,
        200
    );
}

#[tokio::test]
async fn authentication_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let body = fixture("referral-ada.json").to_string().into_bytes();
    for token in [None, Some("wrong-token"), Some("")] {
        let before = gw.digest();
        let r = gw
            .request(
                Method::POST,
                "/referrals",
                token,
                Some("application/json"),
                Some(body.clone()),
                &[],
            )
            .await;
        assert_eq!(r.status, 401);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        assert_eq!(gw.digest(), before);
    }
    for path in [
        "/fhir/Task",
        "/fhir/Task/x",
        "/fhir/Observation?based-on=ServiceRequest/x",
    ] {
        let r = gw.request(Method::GET, path, None, None, None, &[]).await;
        assert_eq!(r.status, 401, "{path}");
    }
    // Open: metadata and probes.
    let r = gw
        .request(Method::GET, "/fhir/metadata", None, None, None, &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["fhirVersion"], "4.0.1");
    assert_eq!(
        gw.request(Method::GET, "/healthz", None, None, None, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        gw.request(Method::GET, "/readyz", None, None, None, &[])
            .await
            .status,
        200
    );
    // Unknown routes and methods answer with an OperationOutcome too.
    let r = gw.get(GP, "/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
    assert_eq!(
        r.body["issue"][0]["diagnostics"],
        "there is no such endpoint: GET /fhir/metadata lists what this server supports"
    );
    let r = gw
        .request(Method::DELETE, "/fhir/Task/x", Some(GP), None, None, &[])
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn streamed_oversized_body_and_odd_query_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dir.path()).await;
    let before = gw.digest();
    // No Content-Length: the body arrives in chunks and is cut off at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..40).map(|_| Ok(vec![b' '; 16 * 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_stream(chunks));
    let r = gw
        .http
        .post(format!("{}/referrals", gw.base))
        .bearer_auth(GP)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    // Multi-byte characters where a prefix is expected; junk everywhere else.
    for q in [
        "/fhir/Task?_lastUpdated=a%C3%A9",
        "/fhir/Task?_lastUpdated=%C3%A9%C3%A9",
        "/fhir/Task?_lastUpdated=gt%F0%9F%98%80",
        "/fhir/Task?owner=%E2%80%AE",
        "/fhir/Task?_count=%C3%A9",
        "/fhir/Task?_cursor=%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9",
        "/fhir/Task?status=%00",
        "/fhir/Observation?based-on=ServiceRequest/%2E%2E%2F%2E%2E",
    ] {
        let r = gw.get(CRAFTS, q).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert_eq!(r.body["resourceType"], "OperationOutcome");
    }
    for path in [
        "/fhir/Task/%C3%A9",
        "/fhir/Task/..%2F..%2Fetc",
        "/fhir/Patient/%00",
    ] {
        assert_eq!(gw.get(CRAFTS, path).await.status, 404, "{path}");
    }
    assert_eq!(gw.digest(), before);
}

/// A stream of chunks for a request body of unknown length.
fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    struct Chunks(std::collections::VecDeque<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.pop_front())
        }
    }
    Chunks(chunks.into())
}
