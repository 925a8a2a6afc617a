//! The auditor's indexes (by entity, by agent) as lists of record numbers: under each
//! index prefix, a head list (`{prefix}~`, record numbers as 8-byte big-endian integers)
//! that a write appends to, and once it holds [`CHUNK`] of them it is set aside as a
//! chunk keyed by its first number (`{prefix}{first:020}`). One key per entity instead of
//! one per event: a referral's life adds a few keys to the index, not dozens.
//!
//! Indexes written before this form hold one key per event (`{prefix}{seq:020}`, empty
//! value); they are read alongside.

use super::TxResult;
use crate::store::{Store, Tx};

/// Record numbers a head list holds before it is set aside as a chunk.
const CHUNK: usize = 256;

fn head(prefix: &str) -> String {
    format!("{prefix}~")
}

/// Appends record `seq` to the index under `prefix`, in the record's transaction.
pub(super) fn tx_add(tx: &Tx<'_>, prefix: &str, seq: u64) -> TxResult<()> {
    let key = head(prefix);
    let mut list = tx.get(key.as_bytes())?.unwrap_or_default();
    if list.len() >= CHUNK * 8 {
        let first = decode(&list).next().unwrap_or(seq);
        tx.put(format!("{prefix}{first:020}").as_bytes(), &list)?;
        list.clear();
    }
    list.extend_from_slice(&seq.to_be_bytes());
    tx.put(key.as_bytes(), &list)?;
    Ok(())
}

fn decode(list: &[u8]) -> impl Iterator<Item = u64> + '_ {
    list.chunks_exact(8)
        .filter_map(|b| <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes))
}

/// The record numbers of one entry under `prefix`: a list (head or chunk), or one key of
/// the older form.
fn entry(prefix: &str, key: &[u8], value: &[u8]) -> Vec<u64> {
    if !value.is_empty() {
        return decode(value).collect();
    }
    std::str::from_utf8(&key[prefix.len()..])
        .ok()
        .and_then(|s| s.parse().ok())
        .into_iter()
        .collect()
}

/// Record numbers under `prefix` greater than `cursor`, in order: at least `want` of them
/// when there are that many (whole lists, so it may be more).
pub(super) fn after(
    store: &Store,
    prefix: &str,
    cursor: u64,
    want: usize,
) -> crate::error::Result<Vec<u64>> {
    // The list that may hold `cursor + 1`: the last entry keyed at or below `cursor`.
    let below = format!("{prefix}{:020}", cursor.saturating_add(1));
    let mut rows = store.scan_rev(prefix.as_bytes(), Some(below.as_bytes()), 1)?;
    let mut out = Vec::new();
    let mut from: Option<Vec<u8>> = rows.first().map(|(k, _)| k.clone());
    loop {
        for (k, v) in &rows {
            out.extend(entry(prefix, k, v).into_iter().filter(|s| *s > cursor));
        }
        if out.len() >= want {
            break;
        }
        rows = store.scan(prefix.as_bytes(), from.as_deref(), 64)?;
        if rows.is_empty() {
            break;
        }
        from = rows.last().map(|(k, _)| k.clone());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_spill_into_chunks_and_read_back_in_order_after_any_cursor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let prefix = "x/ae/e/Task/t1/";
        // An older store's one-key-per-event entries first, then lists.
        store
            .transact::<_, ()>(|tx| {
                for seq in [1u64, 2] {
                    tx.put(format!("{prefix}{seq:020}").as_bytes(), b"")?;
                }
                Ok(())
            })
            .map_err(|_| "write")
            .expect("write");
        let n = CHUNK as u64 * 2 + 10;
        for seq in 3..3 + n {
            store
                .transact(|tx| tx_add(tx, prefix, seq * 2))
                .map_err(|_| "write")
                .expect("write");
        }
        // Two chunks and the head: three keys for 522 records (and the two older ones).
        assert_eq!(store.count(prefix.as_bytes()).expect("count"), 2 + 3);
        let all: Vec<u64> = [1, 2]
            .into_iter()
            .chain((3..3 + n).map(|s| s * 2))
            .collect();
        for cursor in [0, 1, 2, 5, 6, 7, 600, 1000, 1048, 5000] {
            let want: Vec<u64> = all.iter().copied().filter(|s| *s > cursor).collect();
            let got = after(&store, prefix, cursor, usize::MAX).expect("read");
            assert_eq!(got, want, "after {cursor}");
            let some = after(&store, prefix, cursor, 10).expect("read");
            assert!(some.len() >= want.len().min(10), "after {cursor}");
            assert_eq!(some[..], want[..some.len()], "after {cursor}");
        }
    }
}
