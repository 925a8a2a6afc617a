//! Start-up: wires config, store, gateway and HTTP together and runs them.
//!
//! Owns the order of start-up (config checked → store opened → schemas compiled → listener
//! bound → "listening" printed) and shutdown (stop accepting, finish in-flight requests,
//! flush the store). It must not contain request logic.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::http::{self, AppState};
use crate::store::{Store, StoreError};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded schema: {0}")]
    Schema(String),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A gateway bound to its listener, ready to serve.
pub struct Bound {
    pub listener: TcpListener,
    pub state: AppState,
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.state.gateway.clone()
    }

    /// Serves until `shutdown` completes; then finishes in-flight requests and flushes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let gateway = self.state.gateway.clone();
        http::serve(self.listener, self.state, shutdown).await?;
        gateway.store().durable().await?;
        Ok(())
    }
}

/// Opens the store in `cfg.server.data_dir` and binds `cfg.server.listen`.
pub async fn bind(cfg: Config) -> Result<Bound, ServeError> {
    let store = Store::open(&cfg.server.data_dir)?;
    crate::ingest::init();
    crate::schema::init().map_err(|e| ServeError::Schema(e.to_string()))?;
    let addr = cfg.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let auth = Arc::new(Authenticator::new(&cfg));
    let gateway = Arc::new(Gateway::new(Arc::new(cfg), store));
    Ok(Bound {
        listener,
        state: AppState { gateway, auth },
    })
}
