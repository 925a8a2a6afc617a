//! The audit chain's old records, moved out of sled in blocks, and read back.
//!
//! Records are immutable once written, so the chain's oldest records move, a block of
//! [`BLOCK`] consecutive records at a time, into the store's archive once every record of
//! the block is older than the cut-off: one frame (its records as they were, keys and
//! values), synced, then one transaction that checks them unchanged, removes them and keeps
//! one pointer, `z/a/{last seq:020}` (the frame's location and hash). [`record`] reads a
//! record from sled or from its block; [`for_each_record`] walks the whole chain in order,
//! blocks first. The hash chain, the indexes by entity and agent (record numbers) and the
//! head are unchanged, so `verify`, search and `$trail` see one chain.
//!
//! Must not: move a record of an incomplete block, or the head's.

use crate::error::{Error, Result};
use crate::store::archive::Location;
use crate::store::{Abort, Entry, Store};

use super::{record_key, RECORDS};

/// Records a block holds.
pub const BLOCK: u64 = 256;
const POINTERS: &str = "z/a/";

fn pointer(last: u64) -> String {
    format!("{POINTERS}{last:020}")
}

/// The stored record `seq`, from sled or from its archived block.
pub fn record(store: &Store, seq: u64) -> Result<Option<Vec<u8>>> {
    let key = record_key(seq);
    if let Some(v) = store.get(key.as_bytes())? {
        return Ok(Some(v));
    }
    if seq == 0 {
        return Ok(None);
    }
    // The first block whose last record is at or after `seq`.
    let after = pointer(seq - 1);
    let Some((k, v)) = store
        .scan(POINTERS.as_bytes(), Some(after.as_bytes()), 1)?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let block = store.archived(&Location::parse(&k, &v)?)?;
    Ok(block
        .iter()
        .find(|(bk, _)| bk.as_slice() == key.as_bytes())
        .map(|(_, v)| v.clone()))
}

/// Every record of the chain in order, archived blocks first, as `(key, stored record)`.
pub fn for_each_record(
    store: &Store,
    mut f: impl FnMut(&[u8], &[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(POINTERS.as_bytes(), after.as_deref(), 256)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (k, v) in &page {
            let block = store.archived_from_disk(&Location::parse(k, v)?)?;
            for (rk, rv) in block.iter() {
                f(rk, rv).map_err(|e| Error::Internal(e.to_string()))?;
            }
        }
    }
    store.for_each(RECORDS.as_bytes(), f)?;
    Ok(())
}

/// Moves every complete block of records all recorded before `before_micros` out of sled;
/// returns how many records moved.
pub fn archive_chain(store: &Store, before_micros: i64) -> Result<u64> {
    let mut moved = 0;
    loop {
        let block = store.scan(RECORDS.as_bytes(), None, BLOCK as usize + 1)?;
        // A complete block, and never the last record (the head's).
        if (block.len() as u64) <= BLOCK {
            return Ok(moved);
        }
        let block: Vec<Entry> = block.into_iter().take(BLOCK as usize).collect();
        let Some((_, last)) = block.last() else {
            return Ok(moved);
        };
        let last: super::Record = serde_json::from_slice(last)
            .map_err(|e| Error::Internal(format!("audit record unreadable: {e}")))?;
        let recorded = last
            .event
            .get("recorded")
            .and_then(serde_json::Value::as_str)
            .and_then(crate::ingest::parse_instant)
            .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
            .unwrap_or(i64::MAX);
        // Records are in time order: the block's last is its newest.
        if recorded >= before_micros {
            return Ok(moved);
        }
        let locs = store.archive(std::slice::from_ref(&block))?;
        let Some(loc) = locs.first() else {
            return Ok(moved);
        };
        let last_seq = last.seq;
        store
            .transact(|tx| {
                for (k, v) in &block {
                    if tx.get(k)?.as_deref() != Some(v.as_slice()) {
                        return Err(Abort::Caller(Error::Internal(
                            "an audit record changed while being archived".into(),
                        )));
                    }
                }
                for (k, _) in &block {
                    tx.remove(k)?;
                }
                tx.put(pointer(last_seq).as_bytes(), &loc.to_bytes())?;
                Ok(())
            })
            .map_err(|e| match e {
                crate::store::TxError::Caller(e) => e,
                crate::store::TxError::Store(e) => Error::Store(e),
            })?;
        store.durable_blocking()?;
        moved += BLOCK;
    }
}
