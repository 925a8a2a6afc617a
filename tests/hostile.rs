//! Hostile input: hundreds of malformed, truncated, oversized, deeply nested, mistyped,
//! unicode-edge, header-abusing and path-traversing requests, plus a slowloris client.
//! Every one is answered 4xx (or, for slowloris, the connection is closed); none gets a
//! 5xx, nothing is written, and the server goes on serving.

use std::time::Duration;

use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config() -> String {
    config_text(|t| {
        t.replacen(
            "[[practices]]",
            "[server.limits]\nrate_per_second = 100000\nrate_burst = 100000\nheader_read_timeout_secs = 1\nrequest_timeout_secs = 2\n\n[[practices]]",
            1,
        )
    })
}

struct Case {
    name: String,
    method: Method,
    path: String,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn case(
    name: impl Into<String>,
    method: Method,
    path: &str,
    ct: &str,
    body: impl Into<Vec<u8>>,
) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.to_string(),
        content_type: (!ct.is_empty()).then(|| ct.to_string()),
        headers: vec![],
        body: body.into(),
    }
}

/// A raw HTTP/1.1 exchange; the status code, or None if the server closed without one.
async fn raw(addr: &str, bytes: &[u8]) -> Option<u16> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    let _ = tcp.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok())
}

fn set(v: &mut Value, path: &[&str], x: Value) {
    let mut o = v;
    for k in &path[..path.len() - 1] {
        o = &mut o[*k];
    }
    o[path[path.len() - 1]] = x;
}

fn referral_cases() -> Vec<Case> {
    let good = fixture("referral-ada.json");
    let text = serde_json::to_string(&good).unwrap();
    let mut out = Vec::new();
    let post = |name: String, body: Vec<u8>| {
        case(name, Method::POST, "/referrals", "application/json", body)
    };
    // Truncated at 40 points.
    for i in 0..40 {
        let cut = 1 + i * (text.len() - 2) / 40;
        out.push(post(
            format!("truncated at {cut}"),
            text.as_bytes()[..cut].to_vec(),
        ));
    }
    // Malformed JSON.
    for (n, b) in [
        "{",
        "}",
        "[",
        "]",
        "{{}}",
        "{\"a\":}",
        "{\"a\" 1}",
        "{'referralId': 'x'}",
        "{\"a\":1,}",
        "[1,2,,3]",
        "nul",
        "tru",
        "\"unterminated",
        "{\"a\":\"\\x41\"}",
        "{\"a\":01}",
        "{\"a\":.5}",
        "{\"a\":1e}",
        "{\"a\":--1}",
        "{\"a\":\"\\u12\"}",
        "\u{feff}{}",
        "{}{}",
        "{\"a\":1} trailing",
        "// comment\n{}",
        "{\"a\":NaN}",
        "{\"a\":Infinity}",
        "{\"a\":undefined}",
        "\0",
        "\x01\x02\x03",
    ]
    .iter()
    .enumerate()
    {
        out.push(post(format!("malformed {n}: {b:?}"), b.as_bytes().to_vec()));
    }
    // Numbers out of range, in every numeric-looking place.
    for (n, num) in [
        "1e400",
        "-1e400",
        "123456789012345678901234567890123456789",
        "1e-400",
        "-0",
        "9007199254740993",
    ]
    .iter()
    .enumerate()
    {
        for field in ["referralId", "urgency", "needs"] {
            let mut v = text.clone();
            v = v.replacen(
                &format!("\"{field}\":"),
                &format!("\"{field}\":{num},\"x{field}\":"),
                1,
            );
            out.push(post(format!("number {n} in {field}"), v.into_bytes()));
        }
    }
    // Deep nesting, in several places.
    for depth in [129, 1000, 10_000] {
        for field in ["referralId", "patient", "needs", "notes"] {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let v = text.replacen(
                &format!("\"{field}\":"),
                &format!("\"{field}\":{nested},\"x{field}\":"),
                1,
            );
            out.push(post(format!("nesting {depth} in {field}"), v.into_bytes()));
        }
        let obj = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        out.push(post(format!("object nesting {depth}"), obj.into_bytes()));
    }
    // Wrong types for every required element.
    let wrongs = [
        json!(null),
        json!(1),
        json!(true),
        json!("x"),
        json!([]),
        json!({}),
    ];
    let fields: &[(&[&str], &[usize])] = &[
        (&["referralId"], &[0, 1, 2, 4, 5]),
        (&["sentAt"], &[0, 1, 2, 4, 5]),
        (&["urgency"], &[0, 1, 2, 4, 5]),
        (&["practice"], &[0, 1, 2, 3, 4]),
        (&["referrer"], &[0, 1, 2, 3, 4]),
        (&["patient"], &[0, 1, 2, 3, 4]),
        (&["consent"], &[0, 1, 2, 3, 4]),
        (&["needs"], &[0, 1, 2, 3, 5]),
        (&["patient", "nhsNumber"], &[0, 1, 2, 4, 5]),
        (&["patient", "birthDate"], &[0, 1, 2, 4, 5]),
        (&["patient", "gender"], &[0, 1, 2, 4, 5]),
        (&["patient", "postcode"], &[0, 1, 2, 4, 5]),
        (&["consent", "shareWithProvider"], &[0, 1, 3, 4, 5]),
        (&["practice", "odsCode"], &[0, 1, 2, 4, 5]),
    ];
    for (path, which) in fields {
        for w in which.iter() {
            let mut v = good.clone();
            set(&mut v, path, wrongs[*w].clone());
            out.push(post(
                format!("{} = {}", path.join("."), wrongs[*w]),
                v.to_string().into_bytes(),
            ));
        }
    }
    // Unicode edge cases.
    let strings: &[(&[&str], &str)] = &[
        (&["patient", "nhsNumber"], "999000001\u{200b}8"),
        (&["patient", "nhsNumber"], "\u{ff19}\u{ff19}\u{ff19}0000018"),
        (&["patient", "nhsNumber"], "٩٩٩٠٠٠٠٠١٨"),
        (&["practice", "odsCode"], "P8100\u{0661}"),
        (&["patient", "postcode"], "BB9 7S\u{1F600}"),
        (&["patient", "givenName"], "A\u{0000}da"),
        (&["patient", "givenName"], "A\u{001b}[31mda"),
        (&["patient", "birthDate"], "1948-03-0\u{0662}"),
        (&["referralId"], "EMIS\u{202e}123"),
        (&["referralId"], "../../etc/passwd"),
        (&["sentAt"], "2026-11-20T10:15:00Z\u{0000}"),
        (&["urgency"], "ROUTINE"),
        (&["needs"], "loneliness"),
    ];
    for (path, s) in strings {
        let mut v = good.clone();
        set(&mut v, path, json!(s));
        out.push(post(
            format!("unicode {} = {s:?}", path.join(".")),
            v.to_string().into_bytes(),
        ));
    }
    // Invalid UTF-8 and lone surrogates.
    for (n, bytes) in [
        b"{\"referralId\": \"\xc0\xaf\"}".to_vec(),
        b"{\"referralId\": \"\xed\xa0\x80\"}".to_vec(),
        b"{\"referralId\": \"\xff\"}".to_vec(),
        br#"{"referralId": "\ud800"}"#.to_vec(),
        br#"{"referralId": "\udc00\ud800"}"#.to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        out.push(post(format!("bad encoding {n}"), bytes));
    }
    // Huge strings: over the string limit, and over the body limit.
    for (n, len) in [70_000usize, 200_000, 400_000].iter().enumerate() {
        let mut v = good.clone();
        v["notes"] = json!("x".repeat(*len));
        out.push(post(format!("huge string {n}"), v.to_string().into_bytes()));
    }
    out.push(post(
        "unterminated huge string".into(),
        format!("{{\"notes\": \"{}", "y".repeat(100_000)).into_bytes(),
    ));
    out
}

fn fhir_cases(task: &str) -> Vec<Case> {
    let mut out = Vec::new();
    let tx = fixture("fhir/transaction-dora.json").to_string();
    for i in 0..15 {
        let cut = 1 + i * (tx.len() - 2) / 15;
        out.push(case(
            format!("transaction truncated at {cut}"),
            Method::POST,
            "/fhir",
            "application/fhir+json",
            tx.as_bytes()[..cut].to_vec(),
        ));
    }
    let task_path = format!("/fhir/Task/{task}");
    for (n, b) in [
        json!(null), json!([]), json!({}), json!({ "resourceType": "Task" }),
        json!({ "resourceType": "Task", "id": task, "status": ["accepted"], "intent": "order" }),
        json!({ "resourceType": "Task", "id": task, "status": "accepted", "intent": "order", "for": "Patient/1" }),
        json!({ "resourceType": "Task", "id": task, "status": "accepted", "intent": "order", "output": [{ "valueReference": 7 }] }),
        json!({ "resourceType": "Task", "id": "../../x", "status": "accepted", "intent": "order" }),
        json!({ "resourceType": "Task", "id": task, "status": "accepted", "intent": "order", "meta": "x" }),
        json!({ "resourceType": "Task", "id": task, "status": "accepted", "intent": "order", "contained": [{ "resourceType": "Task", "contained": [1] }] }),
    ]
    .iter()
    .enumerate()
    {
        let mut c = case(format!("task body {n}"), Method::PUT, &task_path, "application/fhir+json", b.to_string().into_bytes());
        c.headers.push(("if-match".into(), "W/\"1\"".into()));
        out.push(c);
    }
    for (n, b) in [
        "[{\"op\":\"remove\",\"path\":\"/\"}]",
        "[{\"op\":\"move\",\"from\":\"/status\",\"path\":\"/status/x\"}]",
        "[{\"op\":\"bogus\"}]",
        "[{\"op\":\"replace\",\"path\":\"/id\",\"value\":\"other\"}]",
        "[{\"op\":\"add\",\"path\":\"/owner\",\"value\":{\"reference\":\"Organization/x\"}}]",
        "{\"owner\": null}",
        "{\"resourceType\": \"Patient\"}",
        "[{\"op\":\"replace\",\"path\":\"/status\",\"value\":7}]",
        "[{\"op\":\"copy\",\"from\":\"/nope\",\"path\":\"/x\"}]",
        "7",
    ]
    .iter()
    .enumerate()
    {
        let mut c = case(
            format!("patch {n}"),
            Method::PATCH,
            &task_path,
            "application/json-patch+json",
            b.as_bytes().to_vec(),
        );
        c.headers.push(("if-match".into(), "W/\"1\"".into()));
        out.push(c);
    }
    for (n, b) in [
        json!({ "resourceType": "Observation" }),
        json!({ "resourceType": "Observation", "status": "final", "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] }, "valueInteger": 1e300 }),
        json!({ "resourceType": "Observation", "status": "final", "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] }, "valueInteger": "20" }),
        json!({ "resourceType": "Observation", "status": "final", "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "718466001" }] }, "basedOn": [{ "reference": "ServiceRequest/../../x" }], "valueInteger": 20 }),
        json!({ "resourceType": "Patient", "id": "x" }),
    ]
    .iter()
    .enumerate()
    {
        out.push(case(format!("observation {n}"), Method::POST, "/fhir/Observation", "application/fhir+json", b.to_string().into_bytes()));
    }
    // Path traversal and odd ids.
    for p in [
        "/fhir/Task/..%2F..%2Fetc%2Fpasswd",
        "/fhir/Task/%2e%2e",
        "/fhir/Task/%00",
        "/fhir/Patient/x%0d%0aSet-Cookie:%20a=b",
        "/fhir/..%2Fadmin",
        "/fhir/Task/a/b/c/d",
        "/fhir/Task/%ff%fe",
        "/fhir/Task/*",
        "/fhir/Task/{id}",
        "/fhir/ServiceRequest/1;DROP TABLE",
        "/fhir/%2e%2e/%2e%2e/etc/passwd",
        "/fhir/Task/_history/x",
        "/fhir/Observation/..",
        "/fhir/Task/$everything",
        "/fhir/$export",
    ] {
        out.push(case(format!("path {p}"), Method::GET, p, "", Vec::new()));
    }
    let long_id = format!("/fhir/Task/{}", "a".repeat(5000));
    out.push(case("5000-char id", Method::GET, &long_id, "", Vec::new()));
    // Header abuse that reqwest can send.
    let hdr = |name: &str, k: &str, v: String| {
        let mut c = case(name.to_string(), Method::GET, "/fhir/Task", "", Vec::new());
        c.headers.push((k.to_string(), v));
        c
    };
    out.push(hdr("accept xml", "accept", "application/fhir+xml".into()));
    out.push(hdr("accept html", "accept", "text/html".into()));
    let mut strict = case(
        "strict handling of an unknown parameter",
        Method::GET,
        "/fhir/Task?colour=red",
        "",
        Vec::new(),
    );
    strict
        .headers
        .push(("prefer".into(), "handling=strict".into()));
    out.push(strict);
    out.push(hdr(
        "accept xml with a q",
        "accept",
        "application/fhir+xml;q=1.0, text/xml;q=0.5".into(),
    ));
    for ct in [
        "text/json",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/fhir+xml",
        "application/jsonx",
        "*/*",
    ] {
        out.push(case(
            format!("content-type {ct}"),
            Method::POST,
            "/referrals",
            ct,
            fixture("referral-ada.json").to_string().into_bytes(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_with(dir.path(), config()).await;
    let (_, _, task) = gw.refer(GP, &fixture("referral-ada.json")).await;
    let before = gw.digest();
    let mut cases = referral_cases();
    cases.extend(fhir_cases(&task));
    // The same bodies with a bad, huge or absent credential.
    let mut failures = Vec::new();
    let mut n = 0;
    for c in &cases {
        let headers: Vec<(&str, &str)> = c
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let token = if c.path.starts_with("/referrals") {
            GP
        } else {
            CRAFTS
        };
        let body = (!c.body.is_empty() || c.method != Method::GET).then(|| c.body.clone());
        let r = gw
            .request(
                c.method.clone(),
                &c.path,
                Some(token),
                c.content_type.as_deref(),
                body,
                &headers,
            )
            .await;
        n += 1;
        let s = r.status.as_u16();
        // A body over the limit may be refused (413) while the client is still sending it;
        // the client may then see the connection close instead of the answer.
        if r.status == CLOSED && c.body.len() > 256 * 1024 {
            continue;
        }
        if !(400..500).contains(&s) {
            failures.push(format!("{}: {s} {}", c.name, r.body));
        } else if r.body != Value::Null && r.body["resourceType"] != "OperationOutcome" {
            failures.push(format!("{}: {s} without an OperationOutcome", c.name));
        }
    }
    for token in [
        "x".repeat(5000),
        "Bearer".into(),
        String::new(),
        "demo-gp-tokenx".into(),
        "demo-gp-token2".into(),
    ] {
        let r = gw
            .request(
                Method::GET,
                "/fhir/Task",
                None,
                None,
                None,
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await;
        n += 1;
        if r.status != 401 {
            failures.push(format!(
                "authorization {:?}: {}",
                &token[..token.len().min(20)],
                r.status
            ));
        }
    }
    // Protocol-level abuse, over raw TCP.
    let addr = gw.base.trim_start_matches("http://").to_string();
    let auth = "Authorization: Bearer demo-gp-token\r\n";
    let big_header = format!(
        "GET /fhir/Task HTTP/1.1\r\nHost: x\r\n{auth}X-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let many_headers = format!(
        "GET /fhir/Task HTTP/1.1\r\nHost: x\r\n{auth}{}\r\n",
        "X-A: b\r\n".repeat(200)
    );
    let raw_cases: Vec<(String, Vec<u8>)> = vec![
        ("header over the limit".into(), big_header.into_bytes()),
        ("hundreds of headers".into(), many_headers.into_bytes()),
        ("two content lengths".into(), format!("POST /referrals HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{{}}").into_bytes()),
        ("length and chunked".into(), format!("POST /referrals HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes()),
        ("bad chunk size".into(), format!("POST /referrals HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n").into_bytes()),
        ("garbage request line".into(), b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 hello\r\n\r\n".to_vec()),
        ("bad header name".into(), format!("GET /fhir/Task HTTP/1.1\r\nHost: x\r\n{auth}Bad Header: x\r\n\r\n").into_bytes()),
        ("raw dot-dot path".into(), format!("GET /fhir/Task/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes()),
        ("absolute-form elsewhere".into(), format!("GET http://evil.example/fhir/Task/x HTTP/1.1\r\nHost: evil.example\r\n{auth}\r\n").into_bytes()),
        ("request line too long".into(), format!("GET /fhir/Task?{} HTTP/1.1\r\nHost: x\r\n{auth}\r\n", "a=b&".repeat(10_000)).into_bytes()),
        ("binary authorization".into(), b"GET /fhir/Task HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x01\r\n\r\n".to_vec()),
        ("lying content length".into(), format!("POST /referrals HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"a\":1}}").into_bytes()),
    ];
    for (name, bytes) in raw_cases {
        n += 1;
        match raw(&addr, &bytes).await {
            Some(s) if (400..500).contains(&s) => {}
            None => {} // closed without an answer: acceptable for a broken request
            Some(s) => failures.push(format!("raw {name}: {s}")),
        }
    }
    // Slowloris: headers dribbled out one byte at a time are cut off.
    n += 1;
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    for b in b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Slow: "
        .iter()
        .chain(b"a".repeat(100).iter())
    {
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await
        {
            closed = true;
            break;
        }
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await
        {
            closed = true; // the server answered (408) and will close
            break;
        }
    }
    if !closed || started.elapsed() > Duration::from_secs(8) {
        failures.push(format!(
            "slowloris connection still open after {:?}",
            started.elapsed()
        ));
    }

    assert!(
        failures.is_empty(),
        "{} of {n} hostile requests misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(n >= 200, "only {n} hostile requests");
    assert_eq!(gw.digest(), before, "hostile input changed the store");
    // Still serving.
    assert_eq!(gw.get(GP, &format!("/fhir/Task/{task}")).await.status, 200);
    let r = gw
        .post_json(
            GP,
            "/referrals",
            &variant("referral-ada.json", "AFTER-HOSTILE", Some("9990000026")),
        )
        .await;
    assert_eq!(r.status, 201);
    println!("{n} hostile requests, all refused");
}
