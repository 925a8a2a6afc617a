//! Start-up, the accept loop and shutdown.
//!
//! Owns the order of start-up (config checked → TLS loaded → store opened → schemas
//! compiled → listener bound → "listening" printed), the connection loop (TLS handshake with
//! a deadline, the client certificate's fingerprint handed to authentication, HTTP/1.1 with
//! a header-read deadline and a head-size cap, served by the axum router through hyper-util)
//! and graceful shutdown (stop accepting, let in-flight requests finish within a bound,
//! flush the store). It must not contain request logic.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::http::{self, AppState, ConnInfo};
use crate::store::{Store, StoreError};
use crate::tls::TlsError;

/// How long shutdown waits for in-flight requests.
const DRAIN: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("embedded schema: {0}")]
    Schema(String),
    #[error("demo inbox accounts: {0}")]
    DemoAccounts(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A gateway bound to its listener, ready to serve.
pub struct Bound {
    pub listener: TcpListener,
    pub state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    outbox: crate::outbox::Outbox,
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.state.gateway.clone()
    }

    /// Serves until `shutdown` completes; then finishes in-flight requests (at most
    /// [`DRAIN`]) and flushes the store.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        self.serve(Box::pin(shutdown)).await
    }

    /// [`Bound::run`], not generic: the accept loop and everything under it (hyper's
    /// connections over the router, TLS) are compiled once, here, instead of once in every
    /// binary that starts a server (the gateway, the tests, the bench).
    async fn serve(
        self,
        mut shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Result<(), ServeError> {
        let gateway = self.state.gateway.clone();
        let (stop_outbox, outbox_stopped) = tokio::sync::watch::channel(false);
        // Background work (outbox workers, inbox readers, checkpoints, the storage watcher):
        // stopped with the server and waited for, so that none holds the store once `run`
        // returns.
        let mut background = tokio::task::JoinSet::new();
        self.outbox
            .start(gateway.clone(), outbox_stopped.clone(), &mut background);
        // Audit checkpoints: the chain head, logged now and every minute, so that cutting
        // records off the end of the chain is detectable (`audit verify --checkpoint`).
        {
            let (gw, mut stop) = (gateway.clone(), outbox_stopped);
            background.spawn(async move {
                loop {
                    if let Ok((seq, hash)) = crate::audit::head(gw.store()) {
                        tracing::info!(checkpoint = %format!("{seq}:{hash}"), "audit checkpoint");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        background.spawn(watch_storage(gateway.clone(), stop_outbox.subscribe()));
        if gateway.config().archive.enabled {
            background.spawn(archive_loop(gateway.clone(), stop_outbox.subscribe()));
        }
        let limits = gateway.config().server.limits.clone();
        let router = http::router(self.state);
        let graceful = GracefulShutdown::new();
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs))
            .max_buf_size(limits.max_header_bytes.max(8192));
        let handshake = Duration::from_secs(limits.handshake_timeout_secs);
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // Beyond the connection limit a new connection is closed at once.
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let router = router.clone();
            let http1 = http1.clone();
            let watcher = graceful.watcher();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    None => {
                        let info = ConnInfo {
                            peer,
                            cert_sha256: None,
                            tls: false,
                        };
                        serve_io(tcp, http1, router, info, watcher).await;
                    }
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => s,
                                // Failed or too slow handshake: nothing to answer, close.
                                Ok(Err(_)) | Err(_) => return,
                            };
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(crate::tls::fingerprint);
                        let info = ConnInfo {
                            peer,
                            cert_sha256: cert,
                            tls: true,
                        };
                        serve_io(stream, http1, router, info, watcher).await;
                    }
                }
            });
        }
        drop(self.listener);
        let _ = stop_outbox.send(true);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(DRAIN) => {
                tracing::warn!("shutdown: in-flight requests still running after {DRAIN:?}; closing");
            }
        }
        // Background tasks end at their next step; one in the middle of a delivery gets the
        // drain time, then is cut off (safe: a letter is marked in doubt before it is sent,
        // and an Observation carries its idempotency key).
        let joined = tokio::time::timeout(DRAIN, async {
            while background.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!("shutdown: background work still running after {DRAIN:?}; cut off");
            background.shutdown().await;
        }
        gateway.store().durable().await?;
        // The chain head at shutdown too: a cut tail is then detectable from the last log.
        if let Ok((seq, hash)) = crate::audit::head(gateway.store()) {
            tracing::info!(checkpoint = %format!("{seq}:{hash}"), commit = gateway.store().committed_seq(), "audit checkpoint at shutdown");
        }
        Ok(())
    }
}

async fn serve_io<I>(
    io: I,
    http1: hyper::server::conn::http1::Builder,
    router: axum::Router,
    info: ConnInfo,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = http1.serve_connection(TokioIo::new(io), service(router, info));
    let _ = watcher.watch(conn).await;
}

/// The router as a hyper service, with the connection's facts on every request.
fn service(
    router: axum::Router,
    info: ConnInfo,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        req.headers_mut().remove(http::SCHEME_HEADER);
        if info.tls {
            req.headers_mut().insert(
                http::SCHEME_HEADER,
                hyper::header::HeaderValue::from_static("https"),
            );
        }
        router.clone().oneshot(req.map(axum::body::Body::new))
    })
}

/// The store's options from the config.
pub fn store_options(cfg: &Config) -> crate::store::Options {
    crate::store::Options {
        cache_bytes: cfg.server.cache_mb * 1024 * 1024,
        min_free_mb: cfg.server.min_free_mb,
        min_free_percent: cfg.server.min_free_percent,
    }
}

/// Watches the store's disk once a second: logs when free space crosses the floor (new
/// referrals are refused below it, and taken again above it), and reopens a store that
/// failed for want of space once space is back.
async fn watch_storage(gw: Arc<Gateway>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if let Err(e) = gw.store().space() {
            tracing::error!(error = %e, "cannot measure free space");
        }
        if gw.store().failure().is_some() {
            let g = gw.clone();
            match tokio::task::spawn_blocking(move || g.store().recover()).await {
                Ok(Err(e)) => tracing::error!(error = %e, "store cannot recover"),
                Err(e) => tracing::error!(error = %e, "store recovery panicked"),
                Ok(Ok(_)) => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Loads TLS, opens the store in `cfg.server.data_dir` and binds `cfg.server.listen`.
pub async fn bind(cfg: Config) -> Result<Bound, ServeError> {
    let tls = match &cfg.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
            t,
        )?)),
        None => None,
    };
    let outbox = crate::outbox::Outbox::new(&cfg)?;
    let store = Store::open_with(&cfg.server.data_dir, store_options(&cfg))?;
    crate::ingest::init();
    crate::schema::init().map_err(|e| ServeError::Schema(e.to_string()))?;
    crate::cardinality::init().map_err(|e| ServeError::Schema(e.to_string()))?;
    let demo = crate::accounts::ensure_demo_users(&store, &cfg)
        .map_err(|e| ServeError::DemoAccounts(e.to_string()))?;
    if demo > 0 {
        tracing::info!(people = demo, "demo inbox accounts created (loopback only)");
    }
    let addr = cfg.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let auth = Arc::new(Authenticator::new(&cfg));
    let limits = cfg.server.limits.clone();
    let gateway = Arc::new(Gateway::new(Arc::new(cfg), store));
    Ok(Bound {
        listener,
        state: AppState::new(gateway, auth, outbox.health(), &limits),
        tls,
        outbox,
    })
}

/// Archives the referrals that are due (`[archive]`), a batch at a time, until none is.
/// Returns what was done in all.
pub fn archive_due(
    gw: &Gateway,
    after_days: u32,
    batch: usize,
) -> crate::error::Result<crate::gateway::archive::Round> {
    let before = crate::clock::Now::current().micros - i64::from(after_days) * 86_400 * 1_000_000;
    let mut total = crate::gateway::archive::Round::default();
    // Below the free-space floor nothing new is written, archive frames included.
    if gw.store().space()?.below_floor() {
        return Ok(total);
    }
    loop {
        let held = crate::outbox::held_referrals(gw)?;
        let r = gw.archive_closed(before, batch, &held)?;
        total.archived += r.archived;
        total.keys_removed += r.keys_removed;
        total.bytes_moved += r.bytes_moved;
        // Those left in place by the last round (each round looks at all of them again).
        total.passed_over = r.passed_over;
        if r.archived == 0 {
            // And the audit chain's old records, a block at a time.
            total.audit_records += crate::audit::archive::archive_chain(gw.store(), before)?;
            return Ok(total);
        }
    }
}

/// Every `archive.interval_secs`, moves the referrals that are due to the archive.
async fn archive_loop(gw: Arc<Gateway>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = gw.config().archive.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(cfg.interval_secs)) => {}
            _ = stop.changed() => return,
        }
        let g = gw.clone();
        let (days, batch) = (cfg.after_days, cfg.batch);
        match tokio::task::spawn_blocking(move || archive_due(&g, days, batch)).await {
            Ok(Ok(r)) if r.archived > 0 => tracing::info!(
                archived = r.archived,
                keys_removed = r.keys_removed,
                passed_over = r.passed_over,
                "archived closed referrals"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "archiving failed; will try again"),
            Err(e) => tracing::warn!(error = %e, "archiving stopped unexpectedly"),
        }
    }
}
