//! The durable store: the only code that touches sled.
//!
//! Owns the on-disk layout (one sled tree of prefixed keys), atomic transactions over it,
//! ordered prefix scans for indexes, and durability: [`Store::durable`] returns only once
//! every write committed before the call is on disk (sled `flush`, which writes with
//! `sync_file_range` only, then `fdatasync` of sled's log file and `fsync` of its
//! directories, so the disk cache and file metadata are committed too), sharing one flush
//! among all concurrent callers (group commit).
//!
//! It also keeps, outside sled, a synced record of what it has committed (`committed`, see
//! [`CommitRecord`]): every transaction bumps a commit sequence inside sled, and each group
//! commit, once on disk, records the sequence it covers. A store that opens short of its
//! record has lost acknowledged writes (sled silently truncates a damaged log) and is
//! refused. After a storage failure (a full disk, an I/O error) the store fails closed:
//! every call errs until it is reopened ([`Store::recover`], for a full disk once space is
//! back) or the process restarts. It measures the free space of its filesystem
//! ([`Store::space`]) and takes online backups consistent to one commit ([`Store::backup`]).
//!
//! It knows nothing of FHIR, referrals or roles: callers give it keys and bytes. It must not
//! decide what a key means; the key scheme lives with the code that owns the data
//! (`gateway::keys`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub mod archive;
mod codec;
use thiserror::Error;
use tokio::sync::oneshot;

#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("store at {dir}: {message}")]
    Open { dir: String, message: String },
    /// The store opened short of its commit record: acknowledged writes are missing.
    #[error(
        "store at {dir} has lost acknowledged writes: it holds commits up to {found}, but \
         commits up to {recorded} were acknowledged (the log was damaged or truncated, or the \
         data directory was restored from an older copy without its commit record). Restore \
         the whole data directory from the latest backup (README, Operations: Restore). To \
         start on what remains instead, knowingly losing those writes, remove {dir}/committed"
    )]
    Lost {
        dir: String,
        found: u64,
        recorded: u64,
    },
    #[error("store I/O error: {0}")]
    Io(String),
    /// A backup could not be made at its target (the live store is unaffected).
    #[error("{0}")]
    Backup(String),
    /// A storage failure stopped the store; it refuses every call until it is reopened.
    #[error(
        "the store stopped after a storage failure ({0}); acknowledged writes are safe on disk"
    )]
    Failed(String),
    #[error("store is closed")]
    Closed,
    /// A frame of the archive is missing, damaged or truncated.
    #[error("the archive is damaged: {0}; restore the data directory from a backup (README, Operations: Restore)")]
    Archive(String),
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
    engine: &'a Engine,
    shared: &'a Shared,
    writes: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl Tx<'_> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        if let Some(w) = self.writes.borrow().get(key) {
            return Ok(w.clone());
        }
        match self.engine.tree.get(key) {
            Ok(None) => Ok(None),
            Ok(Some(v)) => self.engine.decode(key, &v).map(Some).map_err(ReadError),
            Err(e) => Err(ReadError(self.shared.fail_sled(e))),
        }
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

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// sled's cache of tree nodes.
    pub cache_bytes: u64,
    /// The free-space floor: the smaller of these, but never below [`MIN_FLOOR_BYTES`].
    pub min_free_mb: u64,
    pub min_free_percent: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cache_bytes: DEFAULT_CACHE_BYTES,
            min_free_mb: 1024,
            min_free_percent: 5,
        }
    }
}

/// The free space of the store's filesystem against its floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Space {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub floor_bytes: u64,
}

impl Space {
    pub fn below_floor(&self) -> bool {
        self.free_bytes < self.floor_bytes
    }
}

/// The smallest free-space floor: a few of sled's segments, so that the writes the gateway
/// still makes below the floor (reads' audit records, Task updates) have room.
pub const MIN_FLOOR_BYTES: u64 = 4 * SEGMENT_BYTES as u64;

/// The open sled database; replaced whole when the store is reopened after a failure.
struct Engine {
    db: sled::Db,
    tree: sled::Tree,
    files: SyncFiles,
    format: Format,
}

impl Engine {
    /// The stored form of a value (a store of format 1 keeps it as it is, uncopied).
    fn encode(&self, value: Vec<u8>) -> Vec<u8> {
        match self.format {
            Format::Plain => value,
            Format::Compressed => codec::encode(&value),
        }
    }

    /// The value whose stored form under `key` is `stored`. A value that does not decode
    /// is damaged: an error naming its key, not a value.
    fn decode(&self, key: &[u8], stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        match self.format {
            Format::Plain => Ok(stored.to_vec()),
            Format::Compressed => codec::decode(stored, MAX_VALUE_BYTES).map_err(|e| {
                StoreError::Io(format!(
                    "the value of {} is damaged: {e}",
                    String::from_utf8_lossy(key)
                ))
            }),
        }
    }
}

/// What the store and its commit thread share.
struct Shared {
    engine: RwLock<Option<Arc<Engine>>>,
    /// The commit sequence of the last transaction applied (in memory, maybe not on disk).
    applied: AtomicU64,
    /// Why the store failed, and whether reopening may cure it (a full disk may; an fsync
    /// error may not: the kernel may have dropped the pages it could not write).
    failed: Mutex<Option<(String, bool)>>,
    record: Mutex<CommitRecord>,
}

impl Shared {
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        if let Ok(f) = self.failed.lock() {
            if let Some((why, _)) = f.as_ref() {
                return Err(StoreError::Failed(why.clone()));
            }
        }
        self.engine
            .read()
            .ok()
            .and_then(|e| e.clone())
            .ok_or(StoreError::Closed)
    }

    /// Marks the store failed (the first failure's reason stands) and returns the error.
    fn fail(&self, why: String, recoverable: bool) -> StoreError {
        if let Ok(mut f) = self.failed.lock() {
            if f.is_none() {
                tracing::error!(error = %why, recoverable, "store failed; refusing every request that needs it until it recovers");
                *f = Some((why.clone(), recoverable));
            }
            if let Some((first, _)) = f.as_ref() {
                return StoreError::Failed(first.clone());
            }
        }
        StoreError::Failed(why)
    }

    /// A sled error: sled's own write path failed (it refuses every later write until
    /// reopened). A full disk there is curable by reopening once space is back.
    fn fail_sled(&self, e: sled::Error) -> StoreError {
        let full = matches!(&e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull)
            || e.to_string().contains("No space left");
        self.fail(e.to_string(), full)
    }

    /// One group commit: flush sled, sync its files, then record the sequence covered.
    fn commit(&self) -> Result<(), StoreError> {
        let engine = self.engine()?;
        let upto = self.applied.load(Ordering::SeqCst);
        engine.db.flush().map_err(|e| self.fail_sled(e))?;
        engine
            .files
            .sync()
            .map_err(|e| self.fail(format!("fsync: {e}"), false))?;
        let mut record = self
            .record
            .lock()
            .map_err(|_| StoreError::Io("commit record lock poisoned".into()))?;
        if upto > record.seq {
            record
                .write(upto)
                .map_err(|e| self.fail(format!("commit record: {e}"), false))?;
        }
        Ok(())
    }
}

/// The store handle; cheap to share behind an `Arc`.
pub struct Store {
    shared: Arc<Shared>,
    /// Held for the whole of a transaction: writers run one at a time.
    writer: Mutex<()>,
    commits: Option<mpsc::Sender<Waiter>>,
    committer: Option<thread::JoinHandle<()>>,
    dir: PathBuf,
    opts: Options,
    /// Closed referrals' groups, moved out of sled (`archive`).
    archive: archive::Archive,
    /// While a backup runs: every key written since it began.
    journal: Mutex<Option<HashSet<Vec<u8>>>>,
    /// Whether free space was below the floor when last measured (to log crossings once).
    low: std::sync::atomic::AtomicBool,
}

impl Drop for Store {
    /// Stops the commit thread and waits for it, so that once a `Store` is dropped the
    /// directory can be opened again at once (sled holds a lock on it).
    fn drop(&mut self) {
        self.commits.take();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
        if let Ok(e) = self.shared.engine() {
            let _ = e.db.flush();
        }
    }
}

/// The key, in sled's default tree, of the commit sequence.
const COMMIT_KEY: &[u8] = b"meta/commit";

fn read_seq(db: &sled::Db) -> Result<u64, String> {
    match db.get(COMMIT_KEY).map_err(|e| format!("unreadable: {e}"))? {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| "its commit sequence is malformed".to_string()),
    }
}

/// Whether sled refused to open because another handle holds the store's lock.
fn is_lock_held(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Opens the sled database in `dir`; a new one is created in format `new`.
fn open_engine(dir: &Path, opts: &Options, new: Format) -> Result<(Engine, u64), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create: {e}"))?;
    let existed = dir.join("db").exists();
    // Segments large enough that no value ever becomes a separate blob file (sled writes
    // blobs without syncing them): the log file holds everything, and syncing it is enough.
    // Values are bounded by MAX_VALUE_BYTES, well under a quarter segment.
    // sled panics on some damaged logs while recovering (serialization.rs): that is a
    // damaged store, to be refused with a message, not a crash.
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(opts.cache_bytes)
        .segment_size(SEGMENT_BYTES);
    // A store this process has just dropped may still be closing: sled's own background
    // threads let go of its lock a moment after the last handle is dropped. Wait for that
    // (up to 2 s) rather than fail; another process holding the store still fails.
    let open = || {
        let mut tries = 0;
        loop {
            match config.open() {
                // sled reports a held lock as ErrorKind::Other with this message
                // (config.rs), not as WouldBlock.
                Err(sled::Error::Io(e)) if is_lock_held(&e) && tries < 100 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    };
    let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open))
        .map_err(|_| {
            "is damaged: sled could not read its log (it failed while recovering); restore \
             the data directory from a backup (README, Operations: Restore)"
                .to_string()
        })?
        .map_err(|e| match e {
            sled::Error::Corruption { .. } => format!(
                "is damaged ({e}); restore the data directory from a backup (README, \
                 Operations: Restore)"
            ),
            e => e.to_string(),
        })?;
    let tree = db.open_tree("fhir").map_err(|e| e.to_string())?;
    let format = check_format(&db, &tree, existed, new)?;
    let seq = read_seq(&db)?;
    let files = SyncFiles::open(dir).map_err(|e| format!("cannot open: {e}"))?;
    Ok((
        Engine {
            db,
            tree,
            files,
            format,
        },
        seq,
    ))
}

impl Store {
    /// Opens (or creates) the store in `dir` and checks that it is one: a store this
    /// program created carries a format marker, its keys and values can be read, and it
    /// holds every commit its commit record says was acknowledged.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, Options::default())
    }

    /// [`Store::open`] with a cache of `cache_bytes` for tree nodes.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Store::open_with(
            dir,
            Options {
                cache_bytes,
                ..Options::default()
            },
        )
    }

    pub fn open_with(dir: &Path, opts: Options) -> Result<Store, StoreError> {
        let open_err = |message: String| StoreError::Open {
            dir: dir.display().to_string(),
            message,
        };
        let (engine, seq) = open_engine(dir, &opts, Format::Compressed).map_err(open_err)?;
        let record = CommitRecord::open(dir, seq).map_err(|e| open_err(e.to_string()))?;
        if seq < record.seq {
            return Err(StoreError::Lost {
                dir: dir.display().to_string(),
                found: seq,
                recorded: record.seq,
            });
        }
        let shared = Arc::new(Shared {
            engine: RwLock::new(Some(Arc::new(engine))),
            applied: AtomicU64::new(seq),
            failed: Mutex::new(None),
            record: Mutex::new(record),
        });
        let (commits, rx) = mpsc::channel::<Waiter>();
        let for_thread = shared.clone();
        let committer = thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || group_commit_loop(for_thread, rx))
            .map_err(|e| open_err(format!("cannot start the commit thread: {e}")))?;
        Ok(Store {
            shared,
            writer: Mutex::new(()),
            commits: Some(commits),
            committer: Some(committer),
            dir: dir.to_path_buf(),
            archive: archive::Archive::new(dir),
            opts,
            journal: Mutex::new(None),
            low: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.shared.engine()
    }

    /// Any sled error fails the store: sled's reads fail only once its write path has
    /// failed (the error it keeps) or on a damaged page, and either way nothing it serves
    /// afterwards can be trusted until it is reopened.
    fn sled_err(&self, e: sled::Error) -> StoreError {
        self.shared.fail_sled(e)
    }

    /// Why the store has failed, if it has.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|(why, _)| why.clone()))
    }

    /// The last commit sequence on disk (as the commit record says).
    pub fn committed_seq(&self) -> u64 {
        self.shared.record.lock().map(|r| r.seq).unwrap_or(0)
    }

    /// The free space of the store's filesystem (measured now), and the floor below which
    /// the gateway takes no new work. Crossing the floor either way is logged once.
    pub fn space(&self) -> Result<Space, StoreError> {
        let io = |e: std::io::Error| {
            StoreError::Io(format!("free space of {}: {e}", self.dir.display()))
        };
        let free = fs2::available_space(&self.dir).map_err(io)?;
        let total = fs2::total_space(&self.dir).map_err(io)?;
        let by_percent = total / 100 * u64::from(self.opts.min_free_percent);
        let by_mb = self.opts.min_free_mb.saturating_mul(1024 * 1024);
        let space = Space {
            free_bytes: free,
            total_bytes: total,
            floor_bytes: by_mb.min(by_percent).max(MIN_FLOOR_BYTES),
        };
        let low = space.below_floor();
        if self.low.swap(low, Ordering::SeqCst) != low {
            let (free_mb, floor_mb) = (free / (1024 * 1024), space.floor_bytes / (1024 * 1024));
            if low {
                tracing::warn!(free_mb, floor_mb, "free space below the floor: refusing new referrals (507) and not ready; reads, polls and updates go on");
            } else {
                tracing::info!(
                    free_mb,
                    floor_mb,
                    "free space back above the floor: taking new referrals again"
                );
            }
        }
        Ok(space)
    }

    /// Reopens a store that failed for want of space, once space is back above the floor:
    /// sled recovers from its log what reached the disk, which must include every
    /// acknowledged commit. Returns whether the store is healthy afterwards. A failure that
    /// reopening cannot cure (an fsync error) stays until the process restarts.
    pub fn recover(&self) -> Result<bool, StoreError> {
        let curable = match self.shared.failed.lock() {
            Ok(f) => match f.as_ref() {
                None => return Ok(true),
                Some((_, curable)) => *curable,
            },
            Err(_) => false,
        };
        if !curable || self.space()?.below_floor() {
            return Ok(false);
        }
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = self
            .shared
            .engine
            .write()
            .map_err(|_| StoreError::Io("engine lock poisoned".into()))?;
        // Wait for calls still holding the old engine, then close it (and its file lock).
        if let Some(mut old) = slot.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(engine) => {
                        drop(engine);
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(shared) => {
                        *slot = Some(shared);
                        return Ok(false);
                    }
                }
            }
        }
        // sled's background writers may hold the file lock a moment longer.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (engine, seq) = loop {
            match open_engine(&self.dir, &self.opts, Format::Compressed) {
                Ok(opened) => break opened,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "store reopen: retrying");
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::error!(error = %e, "store reopen failed");
                    return Ok(false);
                }
            }
        };
        let recorded = self.committed_seq();
        if seq < recorded {
            let e = StoreError::Lost {
                dir: self.dir.display().to_string(),
                found: seq,
                recorded,
            };
            if let Ok(mut f) = self.shared.failed.lock() {
                *f = Some((e.to_string(), false));
            }
            return Err(e);
        }
        self.shared.applied.store(seq, Ordering::SeqCst);
        *slot = Some(Arc::new(engine));
        if let Ok(mut f) = self.shared.failed.lock() {
            *f = None;
        }
        tracing::info!(
            commit = seq,
            "store recovered after a storage failure; serving again"
        );
        Ok(true)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.engine()?;
        match engine.tree.get(key).map_err(|e| self.sled_err(e))? {
            None => Ok(None),
            Some(v) => engine.decode(key, &v).map(Some),
        }
    }

    /// Keys and values under `prefix` whose key is strictly greater than `after` (when
    /// given), in key order, at most `limit` of them.
    pub fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let engine = self.engine()?;
        let iter = match after {
            Some(a) if a >= prefix => {
                let mut start = a.to_vec();
                start.push(0);
                engine.tree.range(start..)
            }
            _ => engine.tree.range(prefix.to_vec()..),
        };
        self.take(&engine, iter, prefix, limit)
    }

    /// The entries of `iter` while their keys start with `prefix`, at most `limit`.
    fn take(
        &self,
        engine: &Engine,
        iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            let v = engine.decode(&k, &v)?;
            out.push((k.to_vec(), v));
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
        let engine = self.engine()?;
        let iter = match before {
            Some(b) => engine.tree.range(prefix.to_vec()..b.to_vec()),
            None => engine.tree.scan_prefix(prefix),
        };
        self.take(&engine, iter.rev(), prefix, limit)
    }

    /// Runs `f` as one atomic, isolated transaction: transactions run one at a time (the
    /// writer lock), `f` reads the committed store plus its own writes, and its writes are
    /// applied as one sled batch, which readers never see half-applied (sled's batch lock)
    /// and which recovery replays whole or not at all. `f` runs exactly once. Each
    /// transaction that writes also advances the commit sequence (sled's default tree), so
    /// that the commit record can tell whether a reopened store lost any of it.
    ///
    /// Not sled's `Tree::transaction`: that runs the whole closure under sled's global
    /// write lock, blocking every reader, and reads each key before writing it; on the
    /// ingest path those reads were about a third of the time spent under that lock (see
    /// BENCHMARKS.md).
    ///
    /// A sled failure while applying fails the whole store (sled does not roll back a
    /// batch that failed half-way): every later call errs until [`Store::recover`].
    pub fn transact<T, E>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, Abort<E>>,
    ) -> Result<T, TxError<E>> {
        // A failed store answers at once, without queueing behind a reopen that holds the
        // writer lock.
        self.engine().map_err(TxError::Store)?;
        // A panic inside `f` poisons the lock but applies nothing: the store is unchanged,
        // so the next writer may go on.
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let engine = self.engine().map_err(TxError::Store)?;
        let tx = Tx {
            engine: &engine,
            shared: &self.shared,
            writes: RefCell::new(BTreeMap::new()),
        };
        let value = match f(&tx) {
            Ok(v) => v,
            Err(Abort::Caller(e)) => return Err(TxError::Caller(e)),
            Err(Abort::Store(ReadError(e))) => return Err(TxError::Store(e)),
        };
        let writes = tx.writes.into_inner();
        if !writes.is_empty() {
            if let Ok(mut journal) = self.journal.lock() {
                if let Some(j) = journal.as_mut() {
                    j.extend(writes.keys().cloned());
                }
            }
            let mut batch = sled::Batch::default();
            for (k, v) in writes {
                match v {
                    Some(v) => batch.insert(k, engine.encode(v)),
                    None => batch.remove(k),
                }
            }
            engine
                .tree
                .apply_batch(batch)
                .map_err(|e| TxError::Store(self.shared.fail_sled(e)))?;
            let seq = self.shared.applied.load(Ordering::SeqCst) + 1;
            engine
                .db
                .insert(COMMIT_KEY, &seq.to_be_bytes())
                .map_err(|e| TxError::Store(self.shared.fail_sled(e)))?;
            self.shared.applied.store(seq, Ordering::SeqCst);
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
        self.shared.commit()
    }

    /// Calls `f` with every key and value under `prefix`, in key order, without holding them
    /// all in memory (for export).
    pub fn for_each(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let engine = self.engine()?;
        for item in engine.tree.scan_prefix(prefix) {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let v = engine.decode(&k, &v)?;
            f(&k, &v).map_err(|e| StoreError::Io(e.to_string()))?;
        }
        Ok(())
    }

    /// Calls `f` with every key under `prefix` and the number of bytes its value takes as
    /// stored (compressed or not), for the benchmark's census.
    pub fn for_each_stored_len(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], usize),
    ) -> Result<(), StoreError> {
        for item in self.engine()?.tree.scan_prefix(prefix) {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            f(&k, v.len());
        }
        Ok(())
    }

    /// SHA-256 over every key and value (as read, whatever their stored form), in order:
    /// equal digests mean equal contents.
    pub fn digest(&self) -> Result<String, StoreError> {
        self.digest_excluding(&[])
    }

    /// [`Store::digest`] leaving out keys under `prefixes`.
    pub fn digest_excluding(&self, prefixes: &[&[u8]]) -> Result<String, StoreError> {
        let mut h = Sha256::new();
        let engine = self.engine()?;
        for item in engine.tree.iter() {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            if prefixes.iter().any(|p| k.starts_with(p)) {
                continue;
            }
            let v = engine.decode(&k, &v)?;
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
        for k in self.engine()?.tree.scan_prefix(prefix).keys() {
            k.map_err(|e| self.sled_err(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Number of keys (for integrity checks and tests).
    pub fn len(&self) -> usize {
        self.engine().map(|e| e.tree.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the store, consistent to one commit, into a new store at `to` (which must not
    /// exist or be empty), while writers go on: the live tree is copied without blocking
    /// anyone, every key written meanwhile is noted, and then, under the writer lock, those
    /// keys are copied again as they are now. The copy is then the store as of the last
    /// commit before that lock: each key was either untouched since the copy began or
    /// copied afresh. The copy is synced, given its own commit record, and verified by
    /// opening it again and counting its keys.
    pub fn backup(&self, to: &Path) -> Result<Backup, StoreError> {
        let started = Instant::now();
        let io = |e: String| StoreError::Backup(format!("backup to {}: {e}", to.display()));
        if to.exists()
            && std::fs::read_dir(to)
                .map_err(|e| io(e.to_string()))?
                .next()
                .is_some()
        {
            return Err(io("the directory exists and is not empty".into()));
        }
        // The copy takes the store's format: values are copied as stored.
        let format = self.engine()?.format;
        let (copy, _) = open_engine(to, &self.opts, format).map_err(io)?;
        // Note every key written from now on (installed under the writer lock, so no
        // transaction is half-noted).
        {
            let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(mut j) = self.journal.lock() {
                *j = Some(HashSet::new());
            }
        }
        let result = (|| -> Result<Backup, StoreError> {
            let engine = self.engine()?;
            let mut batch = sled::Batch::default();
            let mut pending = 0usize;
            for item in engine.tree.iter() {
                let (k, v) = item.map_err(|e| self.sled_err(e))?;
                batch.insert(k, v);
                pending += 1;
                if pending == 10_000 {
                    copy.tree.apply_batch(std::mem::take(&mut batch))?;
                    pending = 0;
                }
            }
            copy.tree.apply_batch(batch)?;
            // The final pass: writers wait while the keys they changed are copied again.
            let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let touched = self
                .journal
                .lock()
                .ok()
                .and_then(|mut j| j.take())
                .unwrap_or_default();
            let mut batch = sled::Batch::default();
            for k in &touched {
                match engine.tree.get(k).map_err(|e| self.sled_err(e))? {
                    Some(v) => batch.insert(k.as_slice(), v),
                    None => batch.remove(k.as_slice()),
                }
            }
            copy.tree.apply_batch(batch)?;
            let seq = self.shared.applied.load(Ordering::SeqCst);
            copy.db.insert(COMMIT_KEY, &seq.to_be_bytes())?;
            drop(_writer);
            copy.db.flush()?;
            copy.files.sync().map_err(|e| io(e.to_string()))?;
            let keys = copy.tree.len();
            Ok(Backup {
                dir: to.to_path_buf(),
                commit: seq,
                keys,
                rewritten: touched.len(),
                millis: 0,
            })
        })();
        if let Ok(mut j) = self.journal.lock() {
            j.take();
        }
        let mut done = result?;
        drop(copy);
        // The archive's segments, as they are now: every frame the copy points at was
        // synced before the copy's last pass began (segments only grow).
        let segments = self.archive.dir();
        if segments.exists() {
            let into = to.join("archive");
            std::fs::create_dir_all(&into).map_err(|e| io(e.to_string()))?;
            for e in std::fs::read_dir(segments).map_err(|e| io(e.to_string()))? {
                let e = e.map_err(|e| io(e.to_string()))?;
                let target = into.join(e.file_name());
                std::fs::copy(e.path(), &target).map_err(|e| io(e.to_string()))?;
                File::open(&target)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io(e.to_string()))?;
            }
            File::open(&into)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(e.to_string()))?;
        }
        // Verify: the copy opens as a store (format, commit record) with every key.
        let mut record = CommitRecord::open(to, done.commit).map_err(|e| io(e.to_string()))?;
        record.write(done.commit).map_err(|e| io(e.to_string()))?;
        drop(record);
        let reopened = Store::open_with(to, self.opts.clone())?;
        if reopened.len() != done.keys || reopened.committed_seq() != done.commit {
            return Err(io(format!(
                "verification failed: the copy holds {} keys at commit {}, expected {} at {}",
                reopened.len(),
                reopened.committed_seq(),
                done.keys,
                done.commit
            )));
        }
        done.millis = started.elapsed().as_millis() as u64;
        Ok(done)
    }
}

/// What [`Store::backup`] made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backup {
    pub dir: PathBuf,
    /// The commit the copy is consistent to.
    pub commit: u64,
    pub keys: usize,
    /// Keys written during the copy and copied again at the end.
    pub rewritten: usize,
    pub millis: u64,
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

/// How a store keeps its values. A store keeps the format it was created in: stores made
/// before values were compressed are read and written as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `sp-gateway store 1`: values as given.
    Plain,
    /// `sp-gateway store 2`: values in [`codec`]'s stored form.
    Compressed,
}

impl Format {
    fn marker(self) -> &'static [u8] {
        match self {
            Format::Plain => b"sp-gateway store 1",
            Format::Compressed => b"sp-gateway store 2",
        }
    }
}

/// A new store gets the format marker of `new`; an existing one must have a marker this
/// gateway reads, and its first and last keys must be readable. Garbage in place of a
/// store, or a store of another program or version, is refused with a message rather
/// than served as empty.
fn check_format(
    db: &sled::Db,
    tree: &sled::Tree,
    existed: bool,
    new: Format,
) -> Result<Format, String> {
    let marker = db.get(FORMAT_KEY).map_err(|e| format!("unreadable: {e}"))?;
    let format = match marker {
        Some(m) if m.as_ref() == Format::Plain.marker() => Format::Plain,
        Some(m) if m.as_ref() == Format::Compressed.marker() => Format::Compressed,
        Some(m) => {
            return Err(format!(
                "is a store of format {:?}; this gateway reads {:?} and {:?}",
                String::from_utf8_lossy(&m),
                String::from_utf8_lossy(Format::Plain.marker()),
                String::from_utf8_lossy(Format::Compressed.marker()),
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
            db.insert(FORMAT_KEY, new.marker())
                .map_err(|e| e.to_string())?;
            db.flush().map_err(|e| e.to_string())?;
            new
        }
    };
    for item in [tree.first(), tree.last()] {
        item.map_err(|e| format!("unreadable: {e}"))?;
    }
    Ok(format)
}

/// The store's own record, outside sled, of the last commit sequence known to be on disk:
/// the file `committed` in the data directory, two 64-byte slots written alternately (each
/// with a generation and a SHA-256 check) and synced after every group commit, so that a
/// torn write leaves the other slot readable. A store whose sled log holds less than this
/// has lost acknowledged writes.
pub struct CommitRecord {
    file: File,
    pub seq: u64,
    generation: u64,
}

const RECORD_FILE: &str = "committed";
const RECORD_MAGIC: &[u8; 8] = b"SPGWCMT1";
const SLOT: usize = 64;

impl CommitRecord {
    /// Opens the record in `dir`; a store without one (new, or older than the record) gets
    /// one at `seq`, synced with its directory.
    fn open(dir: &Path, seq: u64) -> std::io::Result<CommitRecord> {
        let path = dir.join(RECORD_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if existed {
            let mut buf = [0u8; 2 * SLOT];
            let n = file.read_at(&mut buf, 0)?;
            let best = [0, SLOT]
                .into_iter()
                .filter(|o| o + SLOT <= n)
                .filter_map(|o| parse_slot(&buf[o..o + SLOT]))
                .max_by_key(|(generation, _)| *generation);
            if let Some((generation, recorded)) = best {
                return Ok(CommitRecord {
                    file,
                    seq: recorded,
                    generation,
                });
            }
            return Err(std::io::Error::other(format!(
                "{} is unreadable (both slots damaged); restore the data directory from a backup",
                path.display()
            )));
        }
        let mut r = CommitRecord {
            file,
            seq: 0,
            generation: 0,
        };
        r.write(seq)?;
        File::open(dir)?.sync_all()?;
        Ok(r)
    }

    fn write(&mut self, seq: u64) -> std::io::Result<()> {
        let generation = self.generation + 1;
        let mut slot = [0u8; SLOT];
        slot[..8].copy_from_slice(RECORD_MAGIC);
        slot[8..16].copy_from_slice(&generation.to_be_bytes());
        slot[16..24].copy_from_slice(&seq.to_be_bytes());
        let check = Sha256::digest(&slot[..24]);
        slot[24..56].copy_from_slice(&check);
        self.file
            .write_all_at(&slot, (generation % 2) * SLOT as u64)?;
        self.file.sync_data()?;
        self.generation = generation;
        self.seq = seq;
        Ok(())
    }
}

fn parse_slot(slot: &[u8]) -> Option<(u64, u64)> {
    if &slot[..8] != RECORD_MAGIC || Sha256::digest(&slot[..24]).as_slice() != &slot[24..56] {
        return None;
    }
    let generation = u64::from_be_bytes(slot[8..16].try_into().ok()?);
    let seq = u64::from_be_bytes(slot[16..24].try_into().ok()?);
    Some((generation, seq))
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

fn group_commit_loop(shared: Arc<Shared>, rx: mpsc::Receiver<Waiter>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let result = shared.commit();
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

    fn put(store: &Store, k: &[u8], v: &[u8]) {
        store
            .transact(|tx| -> Result<(), Abort<()>> { tx.put(k, v).map_err(Abort::from) })
            .map_err(|_| "commit")
            .expect("commit");
    }

    fn stored(store: &Store, k: &[u8]) -> Vec<u8> {
        let engine = store.engine().expect("engine");
        engine.tree.get(k).expect("get").expect("present").to_vec()
    }

    const TASK: &[u8] = br#"{"resourceType":"Task","id":"7d3c2a4e-0b59-4c1e-9e07-3f8f2d5c6a11","meta":{"versionId":"2","lastUpdated":"2026-11-22T10:58:59.279386Z"},"status":"accepted","intent":"order","priority":"routine","focus":{"reference":"ServiceRequest/0d8f5c55-1f3c-4f0a-8a6e-9b1f0b6f9c21"},"for":{"reference":"Patient/5b0e7e2e-8d7b-4b8e-a0a4-1f3a9c3e2b77"},"owner":{"reference":"Organization/pendle-cvs-hub"}}"#;

    #[test]
    fn a_new_store_keeps_values_compressed_and_reads_them_as_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        put(&store, b"r/Task/t1", TASK);
        put(&store, b"x/Task/a/~/1/t1", b"");
        put(&store, b"c/open/p", b"3");
        assert_eq!(store.get(b"r/Task/t1").expect("get").as_deref(), Some(TASK));
        assert_eq!(
            store.get(b"x/Task/a/~/1/t1").expect("get").as_deref(),
            Some(&b""[..])
        );
        assert_eq!(
            store.get(b"c/open/p").expect("get").as_deref(),
            Some(&b"3"[..])
        );
        let raw = stored(&store, b"r/Task/t1");
        assert_eq!(raw[0], codec::LZ4_DICTIONARY_1);
        assert!(
            raw.len() * 3 < TASK.len() * 2,
            "{} of {}",
            raw.len(),
            TASK.len()
        );
        assert_eq!(stored(&store, b"x/Task/a/~/1/t1"), b"");
        assert_eq!(stored(&store, b"c/open/p"), b"\x003");
        let scanned = store.scan(b"r/Task/", None, 10).expect("scan");
        assert_eq!(scanned, vec![(b"r/Task/t1".to_vec(), TASK.to_vec())]);
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.get(b"r/Task/t1").expect("get").as_deref(), Some(TASK));
    }

    /// A store whose lock is let go of shortly (as sled's threads do after the last handle
    /// of a store is dropped) opens once it is free; one held throughout is refused.
    #[test]
    fn opening_waits_for_a_lock_let_go_of_shortly_and_refuses_one_held() {
        let dir = tempfile::tempdir().expect("temp dir");
        drop(Store::open(dir.path()).expect("create"));
        let held = sled::Config::new()
            .path(dir.path())
            .segment_size(SEGMENT_BYTES)
            .open()
            .expect("sled");
        let started = std::time::Instant::now();
        let refused = Store::open(dir.path()).err().expect("refused while held");
        assert!(refused.to_string().contains("lock"), "{refused}");
        assert!(started.elapsed() >= Duration::from_millis(1500));
        let letting_go = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let store = Store::open(dir.path()).expect("opens once let go");
        letting_go.join().expect("thread");
        drop(store);
    }

    /// A store made before values were compressed (format 1) is read and written as it
    /// was, and so is a backup of it.
    #[test]
    fn a_store_of_format_1_stays_as_it_was() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = sled::Config::new()
                .path(dir.path())
                .segment_size(SEGMENT_BYTES)
                .open()
                .expect("sled");
            db.insert(FORMAT_KEY, &b"sp-gateway store 1"[..])
                .expect("marker");
            let tree = db.open_tree("fhir").expect("tree");
            tree.insert(b"r/Task/t0", TASK).expect("value");
            db.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.get(b"r/Task/t0").expect("get").as_deref(), Some(TASK));
        put(&store, b"r/Task/t1", TASK);
        assert_eq!(stored(&store, b"r/Task/t1"), TASK);
        let copy = dir.path().join("copy");
        store.backup(&copy).expect("backup");
        drop(store);
        let copy = Store::open(&copy).expect("open the copy");
        assert_eq!(copy.get(b"r/Task/t0").expect("get").as_deref(), Some(TASK));
        put(&copy, b"r/Task/t2", TASK);
        assert_eq!(stored(&copy, b"r/Task/t2"), TASK);
    }

    /// A value damaged on disk is an error that names its key, never a wrong value.
    #[test]
    fn a_damaged_value_is_an_error_naming_its_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        put(&store, b"r/Task/t1", TASK);
        let mut raw = stored(&store, b"r/Task/t1");
        raw.truncate(raw.len() - 8);
        store
            .engine()
            .expect("engine")
            .tree
            .insert(b"r/Task/t1", raw)
            .expect("damage it");
        let err = store.get(b"r/Task/t1").expect_err("damaged");
        assert!(err.to_string().contains("r/Task/t1"), "{err}");
        assert!(store.scan(b"r/", None, 10).is_err());
        let tx: Result<(), TxError<()>> = store.transact(|tx| {
            tx.get(b"r/Task/t1")?;
            Ok(())
        });
        assert!(matches!(tx, Err(TxError::Store(_))));
    }
}
