//! Authentication: who is calling.
//!
//! Owns the mapping from a bearer token to a [`Principal`] (client id, role, and the
//! practices or provider it acts for). Tokens are never stored: config holds their SHA-256,
//! and the presented token's hash is compared with every configured hash in constant time.
//! It must not decide what a principal may see; scoping is `gateway::scope`.

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

pub struct Authenticator {
    clients: Vec<([u8; 32], Principal)>,
}

impl Authenticator {
    pub fn new(cfg: &Config) -> Authenticator {
        let clients = cfg
            .clients
            .iter()
            .filter_map(|c| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(&c.token_sha256, &mut h).ok()?;
                Some((
                    h,
                    Principal {
                        client_id: c.id.clone(),
                        role: c.role,
                        practices: c.practices.clone(),
                        provider: c.provider.clone(),
                    },
                ))
            })
            .collect();
        Authenticator { clients }
    }

    /// Checks an `Authorization` header value (`Bearer <token>`).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal> {
        let token = authorization
            .and_then(|h| {
                let (scheme, rest) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
            })
            .filter(|t| !t.is_empty() && t.len() <= 4096)
            .ok_or(Error::Unauthenticated)?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found: Option<&Principal> = None;
        for (hash, principal) in &self.clients {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(Error::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_tokens() {
        let cfg = Config::parse(crate::config::EMBEDDED_DEFAULT, "embedded").unwrap();
        let a = Authenticator::new(&cfg);
        let p = a.authenticate(Some("Bearer demo-gp-token")).unwrap();
        assert_eq!(p.client_id, "gp-pennine");
        assert_eq!(p.role, Role::GpSystem);
        assert!(a.authenticate(Some("Bearer nope")).is_err());
        assert!(a.authenticate(Some("Basic demo-gp-token")).is_err());
        assert!(a.authenticate(None).is_err());
    }
}
