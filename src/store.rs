//! The durable store: the only code that touches sled.
//!
//! Owns the on-disk layout (one sled tree of prefixed keys), atomic transactions over it,
//! ordered prefix scans for indexes, and durability: [`Store::durable`] returns only once
//! every write committed before the call is on disk (sled `flush`, which writes with
//! `sync_file_range` only, then `fdatasync` of sled's log file and `fsync` of its
//! directories, so the disk cache and file metadata are committed too), sharing one flush
//! among all concurrent callers (group commit).
//!
//! It knows nothing of FHIR, referrals or roles: callers give it keys and bytes. It must not
//! decide what a key means; the key scheme lives with the code that owns the data
//! (`gateway::keys`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::thread;

use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::oneshot;

#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("store at {dir}: {message}")]
    Open { dir: String, message: String },
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store is closed")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// Why a transaction closure stopped: the caller's own reason, or a storage error.
pub enum Abort<E> {
    Caller(E),
    Store(ReadError),
}

/// A storage error inside a transaction; `?` turns it into [`Abort::Store`].
pub struct ReadError(StoreError);

impl<E> From<ReadError> for Abort<E> {
    fn from(c: ReadError) -> Self {
        Abort::Store(c)
    }
}

/// What a failed [`Store::transact`] reports.
#[derive(Debug)]
pub enum TxError<E> {
    Caller(E),
    Store(StoreError),
}

/// A transaction in progress: reads see the store as last committed plus the
/// transaction's own writes; all writes land together or not at all.
pub struct Tx<'a> {
    tree: &'a sled::Tree,
    writes: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl Tx<'_> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        if let Some(w) = self.writes.borrow().get(key) {
            return Ok(w.clone());
        }
        self.tree
            .get(key)
            .map(|o| o.map(|v| v.to_vec()))
            .map_err(|e| ReadError(e.into()))
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ReadError> {
        self.writes
            .borrow_mut()
            .insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    pub fn remove(&self, key: &[u8]) -> Result<(), ReadError> {
        self.writes.borrow_mut().insert(key.to_vec(), None);
        Ok(())
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// The store handle; cheap to share behind an `Arc`.
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// Held for the whole of a transaction: writers run one at a time.
    writer: Mutex<()>,
    commits: Option<mpsc::Sender<Waiter>>,
    committer: Option<thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Drop for Store {
    /// Stops the commit thread and waits for it, so that once a `Store` is dropped the
    /// directory can be opened again at once (sled holds a lock on it).
    fn drop(&mut self) {
        self.commits.take();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
        let _ = self.db.flush();
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` and checks that it is one: a store this
    /// program created carries a format marker, and its keys and values can be read.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`] with a cache of `cache_bytes` for tree nodes.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let open_err = |message: String| StoreError::Open {
            dir: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(format!("cannot create: {e}")))?;
        let existed = dir.join("db").exists();
        // Segments large enough that no value ever becomes a separate blob file (sled
        // writes blobs without syncing them): the log file holds everything, and syncing it
        // is enough. Values are bounded by MAX_VALUE_BYTES, well under a quarter segment.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(SEGMENT_BYTES)
            .open()
            .map_err(|e| open_err(e.to_string()))?;
        let tree = db.open_tree("fhir").map_err(|e| open_err(e.to_string()))?;
        check_format(&db, &tree, existed).map_err(open_err)?;
        let files = SyncFiles::open(dir).map_err(|e| open_err(format!("cannot open: {e}")))?;
        let (commits, rx) = mpsc::channel::<Waiter>();
        let flusher = db.clone();
        let committer = thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || group_commit_loop(flusher, files, rx))
            .map_err(|e| open_err(format!("cannot start the commit thread: {e}")))?;
        Ok(Store {
            db,
            tree,
            writer: Mutex::new(()),
            commits: Some(commits),
            committer: Some(committer),
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Keys and values under `prefix` whose key is strictly greater than `after` (when
    /// given), in key order, at most `limit` of them.
    pub fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let iter = match after {
            Some(a) if a >= prefix => {
                let mut start = a.to_vec();
                start.push(0);
                self.tree.range(start..)
            }
            _ => self.tree.range(prefix.to_vec()..),
        };
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Keys and values under `prefix` whose key is strictly less than `before` (when given),
    /// newest key first, at most `limit` of them.
    pub fn scan_rev(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let iter = match before {
            Some(b) => self.tree.range(prefix.to_vec()..b.to_vec()),
            None => self.tree.scan_prefix(prefix),
        };
        for item in iter.rev() {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Runs `f` as one atomic, isolated transaction: transactions run one at a time (the
    /// writer lock), `f` reads the committed store plus its own writes, and its writes are
    /// applied as one sled batch, which readers never see half-applied (sled's batch lock)
    /// and which recovery replays whole or not at all. `f` runs exactly once.
    ///
    /// Not sled's `Tree::transaction`: that runs the whole closure under sled's global
    /// write lock, blocking every reader, and reads each key before writing it; on the
    /// ingest path those reads were about a third of the time spent under that lock (see
    /// BENCHMARKS.md).
    pub fn transact<T, E>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, Abort<E>>,
    ) -> Result<T, TxError<E>> {
        // A panic inside `f` poisons the lock but applies nothing: the store is unchanged,
        // so the next writer may go on.
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = Tx {
            tree: &self.tree,
            writes: RefCell::new(BTreeMap::new()),
        };
        let value = match f(&tx) {
            Ok(v) => v,
            Err(Abort::Caller(e)) => return Err(TxError::Caller(e)),
            Err(Abort::Store(ReadError(e))) => return Err(TxError::Store(e)),
        };
        let writes = tx.writes.into_inner();
        if !writes.is_empty() {
            let mut batch = sled::Batch::default();
            for (k, v) in writes {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
            }
            self.tree
                .apply_batch(batch)
                .map_err(|e| TxError::Store(e.into()))?;
        }
        Ok(value)
    }

    /// Waits until every write committed before this call is on disk. Concurrent callers
    /// share one flush and one set of fsyncs.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commits
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(tx)
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Blocking form of [`Store::durable`] for command-line tools.
    pub fn durable_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        SyncFiles::open(&self.dir)
            .and_then(|f| f.sync())
            .map_err(|e| StoreError::Io(e.to_string()))
    }

    /// Calls `f` with every key and value under `prefix`, in key order, without holding them
    /// all in memory (for export).
    pub fn for_each(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            f(&k, &v).map_err(|e| StoreError::Io(e.to_string()))?;
        }
        Ok(())
    }

    /// SHA-256 over every key and value, in order: equal digests mean equal contents.
    pub fn digest(&self) -> Result<String, StoreError> {
        self.digest_excluding(&[])
    }

    /// [`Store::digest`] leaving out keys under `prefixes`.
    pub fn digest_excluding(&self, prefixes: &[&[u8]]) -> Result<String, StoreError> {
        let mut h = Sha256::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            if prefixes.iter().any(|p| k.starts_with(p)) {
                continue;
            }
            h.update((k.len() as u64).to_be_bytes());
            h.update(&k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(&v);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Number of keys under `prefix` (values are not read).
    pub fn count(&self, prefix: &[u8]) -> Result<usize, StoreError> {
        let mut n = 0;
        for k in self.tree.scan_prefix(prefix).keys() {
            k?;
            n += 1;
        }
        Ok(n)
    }

    /// Number of keys (for integrity checks and tests).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// sled's cache of tree nodes, unless configured (`server.cache_mb`). The gateway's own
/// footprint is ~140 MB (mostly the compiled FHIR schemas), so 128 MiB keeps the whole
/// process near the 300 MB target; reads that miss it come from the OS page cache.
pub const DEFAULT_CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// sled segment size; items over a quarter of it would become unsynced blob files.
const SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// The largest value the gateway stores (a resource version); config keeps request bodies
/// well below it.
pub const MAX_VALUE_BYTES: usize = SEGMENT_BYTES / 8;

const FORMAT_KEY: &[u8] = b"meta/format";
const FORMAT: &[u8] = b"sp-gateway store 1";

/// A new store gets the format marker; an existing one must have it, and its first and
/// last keys must be readable. Garbage in place of a store, or a store of another program
/// or version, is refused with a message rather than served as empty.
fn check_format(db: &sled::Db, tree: &sled::Tree, existed: bool) -> Result<(), String> {
    let marker = db.get(FORMAT_KEY).map_err(|e| format!("unreadable: {e}"))?;
    match marker {
        Some(m) if m.as_ref() == FORMAT => {}
        Some(m) => {
            return Err(format!(
                "is a store of format {:?}; this gateway reads {:?}",
                String::from_utf8_lossy(&m),
                String::from_utf8_lossy(FORMAT)
            ))
        }
        None if existed => {
            return Err(
                "is not an sp-gateway store, or is damaged: its format marker is missing \
                 (restore it from a backup; see README, Operations)"
                    .into(),
            )
        }
        None => {
            db.insert(FORMAT_KEY, FORMAT).map_err(|e| e.to_string())?;
            db.flush().map_err(|e| e.to_string())?;
        }
    }
    for item in [tree.first(), tree.last()] {
        item.map_err(|e| format!("unreadable: {e}"))?;
    }
    Ok(())
}

/// The files whose data and metadata must reach the disk after sled's flush: its log file
/// (`db`), its blob directory and the data directory itself. Synced per file, not with
/// `syncfs`, so that a commit does not also wait for every other writer on the filesystem.
struct SyncFiles {
    log: File,
    dirs: Vec<File>,
}

impl SyncFiles {
    fn open(dir: &Path) -> std::io::Result<SyncFiles> {
        let mut dirs = vec![File::open(dir)?];
        if let Ok(blobs) = File::open(dir.join("blobs")) {
            dirs.push(blobs);
        }
        // sled writes its config file once, at creation: sync it now.
        if let Ok(conf) = File::open(dir.join("conf")) {
            conf.sync_all()?;
        }
        Ok(SyncFiles {
            log: File::open(dir.join("db"))?,
            dirs,
        })
    }

    fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        for d in &self.dirs {
            d.sync_all()?;
        }
        Ok(())
    }
}

fn group_commit_loop(db: sled::Db, files: SyncFiles, rx: mpsc::Receiver<Waiter>) {
    // After a failed sync the kernel may have dropped the pages it could not write, and a
    // later sync can "succeed" without them: one failure makes every later commit fail.
    let mut poisoned: Option<StoreError> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let result = match &poisoned {
            Some(e) => Err(e.clone()),
            None => db
                .flush()
                .map_err(StoreError::from)
                .and_then(|_| files.sync().map_err(|e| StoreError::Io(e.to_string()))),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "store flush failed; refusing further writes until restart");
            poisoned = Some(e.clone());
        }
        for w in batch {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_reads_its_own_writes_and_lands_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let before = store.digest().expect("digest");
        // Aborted by the caller after writing: nothing lands.
        let r: Result<(), TxError<&str>> = store.transact(|tx| {
            tx.put(b"k/a", b"1")?;
            assert_eq!(tx.get(b"k/a")?.as_deref(), Some(&b"1"[..]));
            Err(Abort::Caller("no"))
        });
        assert!(matches!(r, Err(TxError::Caller("no"))));
        assert_eq!(store.digest().expect("digest"), before);
        // Committed: every write lands; a removal inside the transaction is seen by it.
        store
            .transact(|tx| -> Result<(), Abort<()>> {
                tx.put(b"k/a", b"1")?;
                tx.put(b"k/b", b"2")?;
                tx.remove(b"k/b")?;
                assert_eq!(tx.get(b"k/b")?, None);
                Ok(())
            })
            .map_err(|_| "commit")
            .expect("commit");
        assert_eq!(store.get(b"k/a").expect("get").as_deref(), Some(&b"1"[..]));
        assert_eq!(store.get(b"k/b").expect("get"), None);
    }

    #[test]
    fn a_panic_inside_a_transaction_writes_nothing_and_later_ones_still_run() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let before = store.digest().expect("digest");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = store.transact(|tx| -> Result<(), Abort<()>> {
                tx.put(b"k/x", b"1")?;
                panic!("handler bug");
            });
        }));
        assert!(caught.is_err());
        assert_eq!(store.digest().expect("digest"), before);
        store
            .transact(|tx| -> Result<(), Abort<()>> { tx.put(b"k/y", b"1").map_err(Abort::from) })
            .map_err(|_| "commit")
            .expect("a later transaction runs");
        assert!(store.get(b"k/y").expect("get").is_some());
    }
}
