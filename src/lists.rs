//! Append-only, ordered lists of short entries under a key prefix, in a few keys however
//! long the list: an index with one key per entry would cost the store a key per entry,
//! and sled keeps an in-memory page-table entry for every 8–16 keys (BENCHMARKS.md,
//! footprint), so keys, not bytes, are what the store's memory and start-up grow with.
//!
//! Each entry has an order number (an audit record's number, a write's time in µs) that
//! never decreases from one entry to the next, and a few bytes. The newest entries are in
//! the head list (`{prefix}~`); a write appends to it, and once it holds `chunk` entries it
//! is set aside as a chunk keyed by its first entry's order number (`{prefix}{order:020}`).
//! Indexes written before lists (one key per entry, `{prefix}{order:020}` or
//! `{prefix}{order:020}/{bytes}`, with an empty value) read as entries too.
//!
//! It knows nothing of what the entries mean, and writes only inside its callers'
//! transactions.

use crate::error::{Error, Result};
use crate::store::{Abort, Store, Tx};

type TxResult<T> = std::result::Result<T, Abort<Error>>;

/// One entry: its order number and its bytes.
pub type Item = (u64, Vec<u8>);

fn head(prefix: &str) -> String {
    format!("{prefix}~")
}

fn encode(out: &mut Vec<u8>, order: u64, bytes: &[u8]) {
    out.extend_from_slice(&order.to_be_bytes());
    // Entries are short (ids, codes); a longer one is cut, never written past its length.
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..len]);
}

fn decode(mut list: &[u8]) -> Vec<Item> {
    let mut out = Vec::new();
    while list.len() >= 10 {
        let order = u64::from_be_bytes(list[..8].try_into().unwrap_or_default());
        let len = u16::from_be_bytes(list[8..10].try_into().unwrap_or_default()) as usize;
        let Some(bytes) = list.get(10..10 + len) else {
            break;
        };
        out.push((order, bytes.to_vec()));
        list = &list[10 + len..];
    }
    out
}

/// The entries of one key under `prefix`: a list (head or chunk), or one entry of the
/// older form.
fn entries(prefix: &str, key: &[u8], value: &[u8]) -> Vec<Item> {
    if !value.is_empty() {
        return decode(value);
    }
    let rest = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
    let (order, bytes) = rest.split_once('/').unwrap_or((&rest, ""));
    order
        .parse()
        .map(|o| vec![(o, bytes.as_bytes().to_vec())])
        .unwrap_or_default()
}

/// Appends an entry to the list under `prefix` in the caller's transaction; the head is set
/// aside as a chunk once it holds `chunk` entries.
pub fn tx_push(tx: &Tx<'_>, prefix: &str, order: u64, bytes: &[u8], chunk: usize) -> TxResult<()> {
    let key = head(prefix);
    let mut list = tx.get(key.as_bytes())?.unwrap_or_default();
    let held = decode(&list);
    if held.len() >= chunk {
        let first = held.first().map(|e| e.0).unwrap_or(order);
        tx.put(format!("{prefix}{first:020}").as_bytes(), &list)?;
        list.clear();
    }
    encode(&mut list, order, bytes);
    tx.put(key.as_bytes(), &list)?;
    Ok(())
}

/// Entries under `prefix` with an order number above `cursor`, oldest first: at least
/// `want` of them when there are that many (whole lists are read, so maybe more).
pub fn after(store: &Store, prefix: &str, cursor: u64, want: usize) -> Result<Vec<Item>> {
    // The list that may hold `cursor + 1`: the last key at or below `cursor`.
    let below = format!("{prefix}{:020}", cursor.saturating_add(1));
    let mut rows = store.scan_rev(prefix.as_bytes(), Some(below.as_bytes()), 1)?;
    let mut from: Option<Vec<u8>> = rows.first().map(|(k, _)| k.clone());
    let mut out = Vec::new();
    loop {
        for (k, v) in &rows {
            out.extend(entries(prefix, k, v).into_iter().filter(|e| e.0 > cursor));
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
    out.sort();
    out.dedup();
    Ok(out)
}

/// The newest entries under `prefix`, newest first: at least `want` of them when there are
/// that many (whole lists are read, so maybe more).
pub fn newest(store: &Store, prefix: &str, want: usize) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    let mut before: Option<Vec<u8>> = None;
    while out.len() < want {
        let rows = store.scan_rev(prefix.as_bytes(), before.as_deref(), 64)?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        before = Some(last.clone());
        for (k, v) in &rows {
            out.extend(entries(prefix, k, v));
            if out.len() >= want {
                break;
            }
        }
    }
    out.sort_by(|a, b| b.cmp(a));
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(store: &Store, prefix: &str, order: u64, bytes: &[u8], chunk: usize) {
        store
            .transact(|tx| tx_push(tx, prefix, order, bytes, chunk))
            .map_err(|_| "write")
            .expect("write");
    }

    #[test]
    fn lists_spill_into_chunks_and_read_back_in_order_from_any_point() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let prefix = "x/test/t1/";
        // An older index's one key per entry first (with and without bytes), then lists.
        store
            .transact::<_, ()>(|tx| {
                tx.put(format!("{prefix}{:020}", 1).as_bytes(), b"")?;
                tx.put(format!("{prefix}{:020}/a/1", 2).as_bytes(), b"")?;
                Ok(())
            })
            .map_err(|_| "write")
            .expect("write");
        let n = 16 * 2 + 5;
        let mut all: Vec<Item> = vec![(1, vec![]), (2, b"a/1".to_vec())];
        for i in 3..3 + n {
            let bytes = format!("id-{i}/{}", i % 7).into_bytes();
            push(&store, prefix, i * 2, &bytes, 16);
            all.push((i * 2, bytes));
        }
        // Two chunks and the head: three keys for 37 entries (and the two older ones).
        assert_eq!(store.count(prefix.as_bytes()).expect("count"), 2 + 3);
        for cursor in [0, 1, 2, 5, 6, 7, 40, 41, 70, 78, 500] {
            let want: Vec<Item> = all.iter().filter(|e| e.0 > cursor).cloned().collect();
            assert_eq!(
                after(&store, prefix, cursor, usize::MAX).expect("read"),
                want,
                "after {cursor}"
            );
            let some = after(&store, prefix, cursor, 5).expect("read");
            assert!(some.len() >= want.len().min(5), "after {cursor}");
            assert_eq!(some[..], want[..some.len()], "after {cursor}");
        }
        let mut desc = all.clone();
        desc.reverse();
        for want in [1, 5, 16, 17, 30, 100] {
            let got = newest(&store, prefix, want).expect("read");
            assert!(got.len() >= want.min(desc.len()), "newest {want}");
            assert_eq!(got[..], desc[..got.len()], "newest {want}");
        }
    }
}
