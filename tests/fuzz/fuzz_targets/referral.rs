//! The EMIS-style referral parser and validator: any bytes in, a checked referral or a
//! typed error out; never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sp_gateway::config::{Config, EMBEDDED_DEFAULT};

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| Config::parse(EMBEDDED_DEFAULT, "embedded").expect("demo config"))
}

fuzz_target!(|data: &[u8]| {
    let now = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_800);
    let _ = sp_gateway::ingest::parse_referral(data, config(), now);
});
