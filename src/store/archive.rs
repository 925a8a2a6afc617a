//! The archive: groups of entries moved out of sled into append-only, hash-checked files.
//!
//! Owns the files under `{store}/archive/`: segments `{n:08}.seg`, each a run of frames
//! `SPA1 | payload length (u32, big-endian) | SHA-256 of the payload | payload`, where the
//! payload is a group of keys and values in [`codec`]'s stored form (LZ4 against the fixed
//! dictionary: a group of related values compresses far better together than apart).
//!
//! A frame is on disk (written, then `fdatasync`, and the directory synced when a segment
//! is made) before [`Store::archive`] returns its [`Location`], which the caller then keeps
//! in sled. So a crash leaves at most a frame nothing points at, at the end of a segment;
//! each process appends to a segment of its own, never after such a torn tail. Reading
//! checks the frame's mark, length and hash against the location that names it: a damaged
//! or truncated archive is an error naming the segment and offset, never other data.
//!
//! Must not: know what a group holds (callers give it keys and bytes), or change a frame once
//! written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::{codec, Entry, Store, StoreError};

const MARK: &[u8; 4] = b"SPA1";
const HEADER: usize = 4 + 4 + 32;
/// A segment is closed once it holds this much; the next frame starts a new one.
const SEGMENT_LIMIT: u64 = 256 * 1024 * 1024;
/// The most a group may hold, decoded (a damaged length must not allocate gigabytes).
pub const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// Where a frame is, and the hash it must have: what sled keeps for an archived group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

impl Location {
    pub const BYTES: usize = 4 + 8 + 4 + 32;

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::BYTES);
        out.extend_from_slice(&self.segment.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.hash);
        out
    }

    /// The location a pointer `key` holds, or an error naming the key.
    pub fn parse(key: &[u8], value: &[u8]) -> Result<Location, StoreError> {
        Location::from_bytes(value).ok_or_else(|| {
            damaged(format!(
                "the pointer {} is malformed",
                String::from_utf8_lossy(key)
            ))
        })
    }

    pub fn from_bytes(b: &[u8]) -> Option<Location> {
        if b.len() != Self::BYTES {
            return None;
        }
        Some(Location {
            segment: u32::from_be_bytes(b[0..4].try_into().ok()?),
            offset: u64::from_be_bytes(b[4..12].try_into().ok()?),
            len: u32::from_be_bytes(b[12..16].try_into().ok()?),
            hash: b[16..48].try_into().ok()?,
        })
    }
}

/// The segment this process appends to.
struct Active {
    segment: u32,
    file: File,
    len: u64,
}

/// The archive's files (see the module doc).
pub(super) struct Archive {
    dir: PathBuf,
    active: Mutex<Option<Active>>,
    /// Groups read lately, each checked when read (reading one archived referral, or a
    /// page of audit records, reads its group many times).
    recent: Mutex<Vec<(Location, Arc<Vec<Entry>>)>>,
}

/// Groups [`Archive::recent`] keeps.
const RECENT: usize = 8;

fn damaged(what: String) -> StoreError {
    StoreError::Archive(what)
}

fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// The segment numbers present, ascending.
fn segments(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::Io(format!("archive {}: {e}", dir.display()))),
    };
    for e in rd {
        let e = e.map_err(|e| StoreError::Io(format!("archive {}: {e}", dir.display())))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u32>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A group of entries as a payload: each key and value with its length (u32, big-endian),
/// the whole in the codec's stored form.
fn encode_group(entries: &[Entry]) -> Vec<u8> {
    let mut raw = Vec::new();
    for (k, v) in entries {
        raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
        raw.extend_from_slice(k);
        raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
        raw.extend_from_slice(v);
    }
    codec::encode(&raw)
}

fn decode_group(payload: &[u8]) -> Result<Vec<Entry>, String> {
    let raw = codec::decode(payload, MAX_GROUP_BYTES)?;
    let mut out = Vec::new();
    let mut rest = &raw[..];
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>, String> {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or("a group ends inside a length")?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err("a group ends inside an entry".into());
        }
        let (item, tail) = tail.split_at(len);
        *rest = tail;
        Ok(item.to_vec())
    };
    while !rest.is_empty() {
        let k = take(&mut rest)?;
        let v = take(&mut rest)?;
        out.push((k, v));
    }
    Ok(out)
}

impl Archive {
    pub(super) fn new(store_dir: &Path) -> Archive {
        Archive {
            dir: store_dir.join("archive"),
            active: Mutex::new(None),
            recent: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one frame per group, syncs, and returns where each is.
    fn append(&self, groups: &[Vec<Entry>]) -> Result<Vec<Location>, StoreError> {
        let io = |what: &str, e: std::io::Error| {
            StoreError::Io(format!("archive {}: {what}: {e}", self.dir.display()))
        };
        let mut guard = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(groups.len());
        let mut touched = false;
        for g in groups {
            let raw: usize = g.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
            if raw > MAX_GROUP_BYTES {
                return Err(damaged(format!(
                    "a group of {raw} bytes is over the {MAX_GROUP_BYTES} a group may have"
                )));
            }
            let payload = encode_group(g);
            let len = u32::try_from(payload.len())
                .map_err(|_| damaged("a group too large to archive".into()))?;
            let needs_new = match guard.as_ref() {
                None => true,
                Some(a) => a.len >= SEGMENT_LIMIT,
            };
            if needs_new {
                if let Some(a) = guard.take() {
                    a.file.sync_data().map_err(|e| io("sync", e))?;
                }
                std::fs::create_dir_all(&self.dir).map_err(|e| io("create", e))?;
                let next = segments(&self.dir)?.last().map_or(1, |n| n + 1);
                let file = OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(segment_path(&self.dir, next))
                    .map_err(|e| io("create a segment", e))?;
                sync_dir(&self.dir).map_err(|e| io("sync the directory", e))?;
                if let Some(parent) = self.dir.parent() {
                    sync_dir(parent).map_err(|e| io("sync the store directory", e))?;
                }
                *guard = Some(Active {
                    segment: next,
                    file,
                    len: 0,
                });
            }
            let Some(active) = guard.as_mut() else {
                return Err(StoreError::Io("archive: no segment open".into()));
            };
            let hash: [u8; 32] = Sha256::digest(&payload).into();
            let mut frame = Vec::with_capacity(HEADER + payload.len());
            frame.extend_from_slice(MARK);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&hash);
            frame.extend_from_slice(&payload);
            if let Err(e) = active.file.write_all(&frame) {
                // Whatever part was written is a torn tail nothing points at; start afresh.
                guard.take();
                return Err(io("write", e));
            }
            out.push(Location {
                segment: active.segment,
                offset: active.len,
                len,
                hash,
            });
            active.len += frame.len() as u64;
            touched = true;
        }
        if touched {
            if let Some(a) = guard.as_ref() {
                if let Err(e) = a.file.sync_data() {
                    guard.take();
                    return Err(io("sync", e));
                }
            }
        }
        Ok(out)
    }

    /// The group at `loc`: one read lately, or read now and checked against its hash.
    fn read(&self, loc: &Location) -> Result<Arc<Vec<Entry>>, StoreError> {
        if let Ok(recent) = self.recent.lock() {
            if let Some((_, g)) = recent.iter().find(|(l, _)| l == loc) {
                return Ok(g.clone());
            }
        }
        let group = Arc::new(self.read_checked(loc)?);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() >= RECENT {
                recent.remove(0);
            }
            recent.push((*loc, group.clone()));
        }
        Ok(group)
    }

    fn read_checked(&self, loc: &Location) -> Result<Vec<Entry>, StoreError> {
        let path = segment_path(&self.dir, loc.segment);
        let at = || {
            format!(
                "archive segment {} at offset {}",
                path.display(),
                loc.offset
            )
        };
        if loc.len as usize > max_payload() {
            return Err(damaged(format!(
                "{}: the recorded length {} is over any frame's",
                at(),
                loc.len
            )));
        }
        let file = File::open(&path).map_err(|e| damaged(format!("{}: {e}", at())))?;
        let mut frame = vec![0u8; HEADER + loc.len as usize];
        file.read_exact_at(&mut frame, loc.offset)
            .map_err(|e| damaged(format!("{}: the frame is short ({e})", at())))?;
        check_frame(&frame, loc).map_err(|m| damaged(format!("{}: {m}", at())))?;
        decode_group(&frame[HEADER..]).map_err(|m| damaged(format!("{}: {m}", at())))
    }

    /// Walks every segment, checking each frame's hash; returns the frames and bytes, and
    /// what is wrong where (a torn tail at a segment's end is counted as such).
    pub(super) fn walk(&self) -> Result<Walk, StoreError> {
        let mut w = Walk::default();
        for n in segments(&self.dir)? {
            let path = segment_path(&self.dir, n);
            let data = std::fs::read(&path)
                .map_err(|e| StoreError::Io(format!("archive {}: {e}", path.display())))?;
            w.segments += 1;
            w.bytes += data.len() as u64;
            let mut at = 0usize;
            while at < data.len() {
                let rest = &data[at..];
                if rest.len() < HEADER || &rest[..4] != MARK {
                    w.problems.push(format!(
                        "{} at offset {at}: {}",
                        path.display(),
                        if rest.len() < HEADER {
                            "a torn frame at the end (a crash while archiving; nothing points at it)"
                        } else {
                            "no frame starts here"
                        }
                    ));
                    break;
                }
                let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
                if rest.len() < HEADER + len {
                    w.problems.push(format!(
                        "{} at offset {at}: a torn frame at the end (a crash while archiving; \
                         nothing points at it)",
                        path.display()
                    ));
                    break;
                }
                let payload = &rest[HEADER..HEADER + len];
                let hash: [u8; 32] = Sha256::digest(payload).into();
                if hash[..] != rest[8..40] {
                    w.problems.push(format!(
                        "{} at offset {at}: the frame does not match its hash",
                        path.display()
                    ));
                } else {
                    w.frames += 1;
                    w.locations.push(Location {
                        segment: n,
                        offset: at as u64,
                        len: len as u32,
                        hash,
                    });
                }
                at += HEADER + len;
            }
        }
        Ok(w)
    }
}

/// The largest payload a group of [`MAX_GROUP_BYTES`] can take (LZ4's bound, the codec's tag
/// and length).
fn max_payload() -> usize {
    lz4_flex::block::get_maximum_output_size(MAX_GROUP_BYTES) + 5
}

fn check_frame(frame: &[u8], loc: &Location) -> Result<(), String> {
    if &frame[..4] != MARK {
        return Err("no frame starts here".into());
    }
    if frame[4..8] != loc.len.to_be_bytes() {
        return Err("the frame's length is not the one recorded".into());
    }
    let hash: [u8; 32] = Sha256::digest(&frame[HEADER..]).into();
    if hash != loc.hash || frame[8..40] != loc.hash {
        return Err("the frame does not match its hash (damaged)".into());
    }
    Ok(())
}

/// What [`Store::archive_walk`] found.
#[derive(Debug, Default)]
pub struct Walk {
    pub segments: usize,
    pub frames: usize,
    pub bytes: u64,
    /// Every sound frame, in file order.
    pub locations: Vec<Location>,
    pub problems: Vec<String>,
}

impl Store {
    /// Writes each group as a frame of the archive and syncs it; returns their locations.
    /// Nothing in sled changes: the caller removes what it archived and keeps the
    /// locations, in a transaction of its own, once this has returned.
    pub fn archive(&self, groups: &[Vec<Entry>]) -> Result<Vec<Location>, StoreError> {
        self.engine()?;
        self.archive.append(groups)
    }

    /// The group at `loc`, checked against its hash when read from its file (the last few
    /// are kept): a damaged archive is [`StoreError::Archive`].
    pub fn archived(&self, loc: &Location) -> Result<Arc<Vec<Entry>>, StoreError> {
        self.archive.read(loc)
    }

    /// The group at `loc`, read from its file and checked now (never one kept from
    /// before): for checks of the archive, and walks of all of it.
    pub fn archived_from_disk(&self, loc: &Location) -> Result<Vec<Entry>, StoreError> {
        self.archive.read_checked(loc)
    }

    /// Every frame of the archive, each checked against its own hash.
    pub fn archive_walk(&self) -> Result<Walk, StoreError> {
        self.archive.walk()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(i: u8) -> Vec<Entry> {
        vec![
            (
                format!("r/Task/t{i}").into_bytes(),
                br#"{"resourceType":"Task","status":"completed"}"#.repeat(3),
            ),
            (format!("x/acc/Task/t{i}/o/hub").into_bytes(), Vec::new()),
        ]
    }

    #[test]
    fn groups_read_back_and_damage_is_detected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let locs = store.archive(&[group(1), group(2)]).expect("archive");
        assert_eq!(*store.archived(&locs[1]).expect("read"), group(2));
        assert_eq!(
            Location::from_bytes(&locs[0].to_bytes()),
            Some(locs[0]),
            "a location round-trips"
        );
        let walk = store.archive_walk().expect("walk");
        assert_eq!((walk.frames, walk.problems.len()), (2, 0));
        // Damage one byte of the second frame's payload.
        let path = segment_path(&dir.path().join("archive"), locs[1].segment);
        let mut data = std::fs::read(&path).expect("segment");
        let at = locs[1].offset as usize + HEADER + 3;
        data[at] ^= 0x55;
        std::fs::write(&path, &data).expect("damage");
        // A new process (groups read before are kept by the one that read them).
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert!(matches!(
            store.archived(&locs[1]),
            Err(StoreError::Archive(_))
        ));
        assert_eq!(*store.archived(&locs[0]).expect("intact"), group(1));
        let walk = store.archive_walk().expect("walk");
        assert_eq!(walk.frames, 1);
        assert!(walk.problems[0].contains("hash"), "{:?}", walk.problems);
        // A torn tail (a crash mid-write) is reported as such; a new process appends to a
        // segment of its own.
        std::fs::write(&path, &data[..data.len() - 5]).expect("tear");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        let next = store.archive(&[group(3)]).expect("archive again");
        assert_eq!(next[0].segment, locs[0].segment + 1);
        assert_eq!(*store.archived(&next[0]).expect("read"), group(3));
        let walk = store.archive_walk().expect("walk");
        assert!(
            walk.problems.iter().any(|p| p.contains("torn")),
            "{:?}",
            walk.problems
        );
    }
}
