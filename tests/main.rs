//! The integration tests: one binary, one module per area, all sharing `common`.
//!
//! The package's manifest (`tests/Cargo.toml`) says why the tests are a package of their own.
//! Run one area with `cargo test --release -p sp-gateway-tests <module>::`, e.g. `crash::`.

mod common;

mod archive;
mod audit;
mod authz_matrix;
mod bad_input;
mod bench_smoke;
mod conformance;
mod crash;
mod directory;
mod emitted_resources;
mod faults;
mod fhir_api;
mod figures;
mod hostile;
mod inbox;
mod inbox_browser;
mod isolation;
mod mesh;
mod operations;
mod outbox;
mod polling;
mod process;
mod refer;
mod refer_browser;
mod referral_loop;
mod referrers;
mod reports_browser;
mod structure;
mod tls;
