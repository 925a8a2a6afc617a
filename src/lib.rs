//! sp-gateway: a FHIR R4 gateway for NHS social prescribing.
//!
//! See ARCHITECTURE.md for the map of modules and the invariants they keep. Data flows one
//! way: `http` → `gateway` → (`ingest`, `fhir`, `routing`, `workflow`) → `store`.

pub mod accounts;
pub mod audit;
pub mod auth;
pub mod capability;
pub mod cardinality;
pub mod cli;
pub mod clock;
pub mod config;
pub mod directory;
pub mod error;
pub mod fhir;
pub mod gateway;
pub mod http;
pub mod ingest;
pub mod letter;
pub mod lists;
pub mod mesh;
pub mod outbox;
pub mod report;
pub mod routing;
pub mod schema;
pub mod server;
pub mod store;
pub mod tls;
pub mod web;
pub mod workflow;
