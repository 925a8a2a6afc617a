//! TLS and mutual TLS with certificates generated here by rcgen: a client with a valid
//! certificate is served; no certificate, an unknown CA, an expired certificate, a
//! certificate no client owns, or one that contradicts the bearer token are refused; so is
//! TLS 1.1. Bad certificate files are named at start-up.

use std::path::Path;
use std::sync::Arc;

use crate::common::*;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

struct Leaf {
    cert: Certificate,
    key: KeyPair,
}

fn leaf(ca: &Ca, cn: &str, server: bool, expired: bool) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    Leaf {
        cert: p.signed_by(&key, &ca.cert, &ca.key).unwrap(),
        key,
    }
}

fn fingerprint(c: &Certificate) -> String {
    hex::encode(Sha256::digest(c.der()))
}

struct Pki {
    ca: Ca,
    good: Leaf,
    expired: Leaf,
    unmapped: Leaf,
    foreign: Leaf,
    config: String,
}

/// A CA, the server's certificate, client certificates, and a config using them.
fn pki(dir: &Path, client_auth: &str) -> Pki {
    let ca = ca("sp-gateway test CA");
    let other_ca = ca_named("someone else's CA");
    let server = leaf(&ca, "sp-gateway test server", true, false);
    let good = leaf(&ca, "provider-crafts", false, false);
    let expired = leaf(&ca, "provider-crafts-old", false, true);
    let unmapped = leaf(&ca, "nobody", false, false);
    let foreign = leaf(&other_ca, "provider-crafts", false, false);
    std::fs::write(dir.join("server.crt"), server.cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server.key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert.pem()).unwrap();
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nclient_auth = \"{client_auth}\"\n\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display(),
        dir.join("ca.crt").display(),
    );
    let fp = fingerprint(&good.cert);
    let fp_expired = fingerprint(&expired.cert);
    let config = config_text(|t| {
        let t = t.replacen("[[practices]]", &format!("{tls}[[practices]]"), 1);
        // provider-crafts may also authenticate by certificate.
        t.replacen(
            "id = \"provider-crafts\"\nrole = \"provider\"",
            &format!("id = \"provider-crafts\"\nrole = \"provider\"\ncert_sha256 = \"{fp}\""),
            1,
        )
        .replacen(
            "id = \"provider-money\"\nrole = \"provider\"",
            &format!(
                "id = \"provider-money\"\nrole = \"provider\"\ncert_sha256 = \"{fp_expired}\""
            ),
            1,
        )
    });
    Pki {
        ca,
        good,
        expired,
        unmapped,
        foreign,
        config,
    }
}

fn ca_named(name: &str) -> Ca {
    ca(name)
}

fn client_config(
    pki: &Pki,
    client: Option<&Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.ca.cert.der().to_vec()))
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some(l) => b
            .with_client_auth_cert(
                vec![CertificateDer::from(l.cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key.serialize_der())),
            )
            .unwrap(),
    };
    Arc::new(cfg)
}

/// One HTTP/1.1 request over TLS; the status code, or Err if the TLS layer refused.
async fn get(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
    token: Option<&str>,
) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| format!("no response: {text:?}"))?;
    status
        .parse()
        .map_err(|_| format!("bad status line: {text}"))
}

const ALL: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[tokio::test]
async fn mutual_tls_serves_the_right_client_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "required");
    let gw = TestGateway::start_with(&dir.path().join("data"), pki.config.clone()).await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    // A valid client certificate: served as provider-crafts, no token needed.
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.good), ALL),
            "/fhir/Task",
            None
        )
        .await,
        Ok(200)
    );
    // TLS 1.2 only works too; and the same client with its own token.
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.good), &[&rustls::version::TLS12]),
            "/fhir/Task",
            None
        )
        .await,
        Ok(200)
    );
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.good), ALL),
            "/fhir/Task",
            Some(CRAFTS)
        )
        .await,
        Ok(200)
    );
    // Certificate of provider-crafts with the token of another client: refused.
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.good), ALL),
            "/fhir/Task",
            Some(GP)
        )
        .await,
        Ok(401)
    );
    // A valid certificate that no client owns: authenticated by TLS, unknown to us.
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.unmapped), ALL),
            "/fhir/Task",
            None
        )
        .await,
        Ok(401)
    );
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.unmapped), ALL),
            "/fhir/Task",
            Some(GP)
        )
        .await,
        Ok(401)
    );
    // No certificate, another CA's, an expired one: the handshake fails (TLS 1.3 may
    // report it on the first read instead).
    for (what, client) in [
        ("none", None),
        ("unknown CA", Some(&pki.foreign)),
        ("expired", Some(&pki.expired)),
    ] {
        let r = get(
            &addr,
            client_config(&pki, client, ALL),
            "/fhir/Task",
            Some(CRAFTS),
        )
        .await;
        assert!(r.is_err(), "{what}: {r:?}");
    }
    // Metadata is open, but still behind TLS with a client certificate (required).
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.good), ALL),
            "/fhir/metadata",
            None
        )
        .await,
        Ok(200)
    );
}

#[tokio::test]
async fn optional_client_auth_admits_bearer_clients() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "optional");
    let gw = TestGateway::start_with(&dir.path().join("data"), pki.config.clone()).await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    assert_eq!(
        get(
            &addr,
            client_config(&pki, None, ALL),
            "/fhir/Task",
            Some(GP)
        )
        .await,
        Ok(200)
    );
    assert_eq!(
        get(&addr, client_config(&pki, None, ALL), "/fhir/Task", None).await,
        Ok(401)
    );
    assert_eq!(
        get(
            &addr,
            client_config(&pki, Some(&pki.good), ALL),
            "/fhir/Task",
            None
        )
        .await,
        Ok(200)
    );
    // Still no expired or foreign certificates.
    assert!(get(
        &addr,
        client_config(&pki, Some(&pki.expired), ALL),
        "/fhir/Task",
        None
    )
    .await
    .is_err());
    assert!(get(
        &addr,
        client_config(&pki, Some(&pki.foreign), ALL),
        "/fhir/Task",
        None
    )
    .await
    .is_err());
}

/// A TLS 1.1 ClientHello, written out by hand (rustls cannot speak TLS 1.1 at all).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend([0x42u8; 32]); // random
    body.push(0); // session id
    body.extend([0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // two TLS 1.1 cipher suites
    body.extend([0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x02, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend(hs);
    rec
}

#[tokio::test]
async fn tls_1_1_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "optional");
    let gw = TestGateway::start_with(&dir.path().join("data"), pki.config.clone()).await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(&tls11_client_hello()).await.unwrap();
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    // An alert (0x15) or nothing at all; never a ServerHello (0x16).
    assert!(
        buf.is_empty() || buf[0] == 0x15,
        "server answered TLS 1.1 with {buf:02x?}"
    );
    // Plain HTTP to the TLS port is not served either.
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("CapabilityStatement"));
}

#[tokio::test]
async fn bad_certificate_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "required");
    let try_bind = |config: String| {
        let data = dir.path().join("data-bad");
        async move {
            let cfg = sp_gateway::config::Config::parse(&config, "t.toml")
                .unwrap()
                .with_overrides("t.toml", Some("127.0.0.1:0".parse().unwrap()), Some(data))
                .unwrap();
            match sp_gateway::server::bind(cfg).await {
                Ok(_) => String::from("bound"),
                Err(e) => e.to_string(),
            }
        }
    };
    let missing = pki.config.replace("server.crt", "missing.crt");
    let e = try_bind(missing).await;
    assert!(
        e.contains("tls.cert") && e.contains("missing.crt") && e.contains("cannot read"),
        "{e}"
    );
    std::fs::write(dir.path().join("garbage.key"), "not a key").unwrap();
    let e = try_bind(pki.config.replace("server.key", "garbage.key")).await;
    assert!(e.contains("tls.key") && e.contains("garbage.key"), "{e}");
    // A key that is not the certificate's.
    std::fs::write(
        dir.path().join("other.key"),
        pki.unmapped.key.serialize_pem(),
    )
    .unwrap();
    let e = try_bind(pki.config.replace("server.key", "other.key")).await;
    assert!(
        e.contains("tls.key") && e.contains("does not go with tls.cert"),
        "{e}"
    );
    std::fs::write(dir.path().join("empty.crt"), "").unwrap();
    let e = try_bind(pki.config.replace("ca.crt", "empty.crt")).await;
    assert!(
        e.contains("tls.client_ca") && e.contains("no PEM certificate"),
        "{e}"
    );
    // Plain HTTP on a routable address is refused at config check.
    let plain = config_text(|t| t);
    let err = sp_gateway::config::Config::parse(&plain, "t.toml")
        .unwrap()
        .with_overrides("t.toml", Some("10.1.2.3:8080".parse().unwrap()), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.listen"), "{err}");
}
