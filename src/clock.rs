//! The wall clock, read once per request or transaction.
//!
//! Owns [`Now`]: an instant in FHIR form with its microseconds. It is for *recording* when
//! something happened (`lastUpdated`, `recorded`, delivery times). It must not be used to
//! schedule or time anything (retries, backoff, stuck detection, rate limits, sessions):
//! those run on the monotonic clock (`std::time::Instant`), because the wall clock can
//! step back. The order of writes comes from the store's commit clock (`gateway::tx_now`).

use time::OffsetDateTime;

/// The gateway's clock reading for one request: the FHIR instant and its microseconds.
#[derive(Clone)]
pub struct Now {
    pub instant: String,
    pub micros: i64,
    pub time: OffsetDateTime,
}

impl Now {
    pub fn current() -> Now {
        let t = OffsetDateTime::now_utc();
        let t = t
            .replace_nanosecond(t.nanosecond() / 1000 * 1000)
            .unwrap_or(t);
        Now::at(t)
    }

    pub fn from_micros(micros: i64) -> Now {
        let t = OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Now::at(t)
    }

    pub fn at(t: OffsetDateTime) -> Now {
        let instant = t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Now {
            instant,
            micros: (t.unix_timestamp_nanos() / 1000) as i64,
            time: t,
        }
    }
}

/// Microseconds since the epoch of an RFC 3339 instant the gateway wrote (`lastUpdated`),
/// 0 if it is not one.
pub fn micros_of(instant: &str) -> i64 {
    OffsetDateTime::parse(instant, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
        .unwrap_or(0)
}
