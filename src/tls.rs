//! TLS for the listener (rustls 0.23, ring provider): TLS 1.2 and 1.3 only, certificates
//! and keys from the config's paths, and — with `tls.client_ca` — mutual TLS, client
//! certificates verified against that CA by rustls' `WebPkiClientVerifier`.
//!
//! Owns building the `ServerConfig` and naming exactly which file is wrong when it cannot.
//! It must not decide who a certificate belongs to (that is `auth`, by fingerprint).

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::{ClientAuth, Tls};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("tls.{key}: {path}: {message}")]
    File {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("tls: {0}")]
    Config(String),
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::File {
        key,
        path: path.display().to_string(),
        message,
    };
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The rustls server configuration for `tls`.
pub fn server_config(tls: &Tls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs("cert", &tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsError::File {
        key: "key",
        path: tls.key.display().to_string(),
        message: format!("no usable PEM private key: {e}"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs("client_ca", ca)? {
                roots.add(c).map_err(|e| TlsError::File {
                    key: "client_ca",
                    path: ca.display().to_string(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = match tls.client_auth {
                ClientAuth::Required => v,
                ClientAuth::Optional => v.allow_unauthenticated(),
            };
            builder
                .with_client_cert_verifier(v.build().map_err(|e| TlsError::Config(e.to_string()))?)
        }
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::File {
            key: "key",
            path: tls.key.display().to_string(),
            message: format!("does not go with tls.cert: {e}"),
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// SHA-256 of a certificate's DER bytes: how config names a client certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}
