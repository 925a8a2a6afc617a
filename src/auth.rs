//! Authentication: who is calling.
//!
//! Owns the mapping from credentials to a [`Principal`] (client id, role, and the practices
//! or provider it acts for): a bearer token, a client certificate verified by mutual TLS, or
//! both (then they must name the same client). Secrets are never stored: config holds the
//! SHA-256 of each token and certificate, and a presented credential's hash is compared with
//! every configured hash in constant time. It must not decide what a principal may see;
//! scoping is `gateway`'s.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Config, Role};
use crate::error::{Error, Result};

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub client_id: String,
    pub role: Role,
    /// For `gp-system`: the ODS codes of the practices it acts for.
    pub practices: Vec<String>,
    /// For `provider`: its provider (Organization) id.
    pub provider: Option<String>,
}

impl Principal {
    /// The organisations the client acts for, as references (`Organization/{id}`): its
    /// provider, or its practices.
    pub fn organisations(&self) -> Vec<String> {
        self.provider
            .iter()
            .chain(self.practices.iter())
            .map(|o| format!("Organization/{o}"))
            .collect()
    }
}

pub struct Authenticator {
    tokens: Vec<([u8; 32], Principal)>,
    certs: Vec<([u8; 32], Principal)>,
}

fn hash_of(hex_hash: Option<&String>) -> Option<[u8; 32]> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(hex_hash?, &mut h).ok()?;
    Some(h)
}

/// Looks `presented` up among `known` without an early exit.
fn find<'a>(known: &'a [([u8; 32], Principal)], presented: &[u8; 32]) -> Option<&'a Principal> {
    let mut found = None;
    for (hash, principal) in known {
        if bool::from(hash.ct_eq(presented)) {
            found = Some(principal);
        }
    }
    found
}

impl Authenticator {
    pub fn new(cfg: &Config) -> Authenticator {
        let mut tokens = Vec::new();
        let mut certs = Vec::new();
        for c in &cfg.clients {
            let p = Principal {
                client_id: c.id.clone(),
                role: c.role,
                practices: c.practices.clone(),
                provider: c.provider.clone(),
            };
            if let Some(h) = hash_of(c.token_sha256.as_ref()) {
                tokens.push((h, p.clone()));
            }
            if let Some(h) = hash_of(c.cert_sha256.as_ref()) {
                certs.push((h, p));
            }
        }
        Authenticator { tokens, certs }
    }

    /// Checks an `Authorization` header value (`Bearer <token>`) and the SHA-256 of the
    /// client certificate the TLS layer verified, if any.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        cert_sha256: Option<&[u8; 32]>,
    ) -> Result<Principal> {
        let by_cert = match cert_sha256 {
            Some(fp) => Some(find(&self.certs, fp).ok_or(Error::Unauthenticated)?),
            None => None,
        };
        let by_token = match authorization {
            None => None,
            Some(h) => {
                let token = h
                    .split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim())
                    .filter(|t| !t.is_empty() && t.len() <= 4096)
                    .ok_or(Error::Unauthenticated)?;
                let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                Some(find(&self.tokens, &presented).ok_or(Error::Unauthenticated)?)
            }
        };
        match (by_cert, by_token) {
            (Some(c), Some(t)) if c.client_id != t.client_id => Err(Error::Unauthenticated),
            (Some(p), _) | (None, Some(p)) => Ok(p.clone()),
            (None, None) => Err(Error::Unauthenticated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_tokens() {
        let cfg = Config::parse(crate::config::EMBEDDED_DEFAULT, "embedded").unwrap();
        let a = Authenticator::new(&cfg);
        let p = a.authenticate(Some("Bearer demo-gp-token"), None).unwrap();
        assert_eq!(p.client_id, "gp-pennine");
        assert_eq!(p.role, Role::GpSystem);
        assert!(a.authenticate(Some("Bearer nope"), None).is_err());
        assert!(a.authenticate(Some("Basic demo-gp-token"), None).is_err());
        assert!(a.authenticate(None, None).is_err());
        // An unknown certificate is refused even with a good token.
        assert!(a
            .authenticate(Some("Bearer demo-gp-token"), Some(&[7u8; 32]))
            .is_err());
    }
}
