//! The durable queue: an append-only log of length+CRC32 framed records in `spool_dir`, and
//! the set of already-alerted findings beside it.
//!
//! `queue.log` is a header then frames `[len: u32 LE][crc32(payload): u32 LE][payload]`, the
//! payload a JSON record: `put` (an entry, with its sequence number) or `done` (removed: sent,
//! failed for good, or dropped). Every append is fsynced before it returns, so an entry is on
//! disk before its first delivery attempt. On open the log is replayed; a frame whose CRC does
//! not match (corruption) is skipped, a torn last frame (a crash mid-write) ends the replay,
//! both with a warning and never a panic; then the live entries are compacted into a fresh
//! file (write temp, fsync, rename, fsync the directory), which also happens when `done`
//! records pile up. Bounded: a full spool drops the oldest entry of the lowest rank first.
//!
//! `alerted.json` holds the lifecycle's [`Alerted`](super::lifecycle::Alerted) map, replaced
//! atomically the same way.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tracing::warn;

const HEADER: &[u8; 8] = b"DPWSPL1\n";
const QUEUE: &str = "queue.log";
const ALERTED: &str = "alerted.json";
/// Larger frames are taken as a corrupted length field.
const MAX_FRAME: u32 = 4 << 20;
/// Compact when this many `done` records have been appended since the last compaction.
const COMPACT_AFTER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("spool {}: cannot encode a record: {source}", path.display())]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What a stored item says about its own importance: lower ranks are dropped first.
pub trait Spooled: Serialize + DeserializeOwned + Clone {
    fn rank(&self) -> u8;
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Record<T> {
    Put { seq: u64, item: T },
    Done { seq: u64 },
}

/// What opening found wrong with the file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Frames skipped for a bad CRC or an unreadable record.
    pub corrupt_frames: usize,
    /// Bytes at the end that were not a whole frame (a torn write), or after a bad length.
    pub torn_bytes: usize,
}

/// The queue: entries by sequence number (the order they were added).
pub struct Spool<T: Spooled> {
    dir: PathBuf,
    file: File,
    entries: BTreeMap<u64, T>,
    next_seq: u64,
    max_entries: usize,
    done_since_compact: usize,
}

impl<T: Spooled> Spool<T> {
    /// Opens (creating) the spool in `dir`, replays and compacts it.
    pub fn open(dir: &Path, max_entries: usize) -> Result<(Self, Recovery), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir, "create the directory"))?;
        let path = dir.join(QUEUE);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(io_err(&path, "read"))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, "open")(e)),
        }
        let (entries, recovery) = replay::<T>(&bytes);
        if recovery != Recovery::default() {
            warn!(
                path = %path.display(),
                corrupt_frames = recovery.corrupt_frames,
                torn_bytes = recovery.torn_bytes,
                "alert spool was damaged (a crash mid-write or disk corruption); the damaged \
                 records were skipped"
            );
        }
        let next_seq = entries.keys().next_back().map_or(1, |s| s + 1);
        let file = write_compacted(dir, &entries)?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            file,
            entries,
            next_seq,
            max_entries: max_entries.max(1),
            done_since_compact: 0,
        };
        // A spool bigger than a lowered limit is trimmed now.
        let mut trimmed = Vec::new();
        while spool.entries.len() > spool.max_entries {
            if let Some(seq) = spool.victim(None) {
                trimmed.push(seq);
                spool.entries.remove(&seq);
            }
        }
        if !trimmed.is_empty() {
            warn!(
                dropped = trimmed.len(),
                "alert spool over spool_max_entries: oldest lowest-severity entries dropped"
            );
            spool.file = write_compacted(dir, &spool.entries)?;
        }
        Ok((spool, recovery))
    }

    /// Stores `item` durably (fsynced) and returns its sequence number and the entries
    /// dropped to make room (oldest of the lowest rank first; possibly `item` itself).
    pub fn push(&mut self, item: T) -> Result<(u64, Vec<(u64, T)>), SpoolError> {
        let out = self.push_unsynced(item)?;
        self.sync()?;
        Ok(out)
    }

    /// Stores every item with one fsync for all (an evaluation that opens thousands of
    /// findings must not wait for thousands of fsyncs); durable when this returns. Returns
    /// the entries dropped to make room.
    pub fn push_all(&mut self, items: Vec<T>) -> Result<Vec<(u64, T)>, SpoolError> {
        let mut dropped = Vec::new();
        for item in items {
            dropped.extend(self.push_unsynced(item)?.1);
        }
        self.sync()?;
        Ok(dropped)
    }

    fn push_unsynced(&mut self, item: T) -> Result<(u64, Vec<(u64, T)>), SpoolError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut dropped = Vec::new();
        if self.entries.len() >= self.max_entries {
            match self.victim(Some((seq, item.rank()))) {
                Some(victim) if victim != seq => {
                    let old = self.entries.get(&victim).cloned();
                    self.write(&Record::<T>::Done { seq: victim })?;
                    self.entries.remove(&victim);
                    if let Some(old) = old {
                        dropped.push((victim, old));
                    }
                }
                _ => {
                    dropped.push((seq, item));
                    return Ok((seq, dropped));
                }
            }
        }
        self.write(&Record::Put {
            seq,
            item: item.clone(),
        })?;
        self.entries.insert(seq, item);
        Ok((seq, dropped))
    }

    /// Removes an entry (delivered, failed for good); durable before it returns.
    pub fn remove(&mut self, seq: u64) -> Result<Option<T>, SpoolError> {
        let Some(item) = self.entries.remove(&seq) else {
            return Ok(None);
        };
        self.append(&Record::<T>::Done { seq })?;
        self.done_since_compact += 1;
        if self.done_since_compact >= COMPACT_AFTER && self.done_since_compact > self.entries.len()
        {
            self.file = write_compacted(&self.dir, &self.entries)?;
            self.done_since_compact = 0;
        }
        Ok(Some(item))
    }

    pub fn entries(&self) -> impl Iterator<Item = (u64, &T)> {
        self.entries.iter().map(|(s, t)| (*s, t))
    }

    pub fn get(&self, seq: u64) -> Option<&T> {
        self.entries.get(&seq)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry to drop: lowest rank, then oldest; `candidate` is a not-yet-stored item.
    fn victim(&self, candidate: Option<(u64, u8)>) -> Option<u64> {
        self.entries
            .iter()
            .map(|(s, t)| (t.rank(), *s))
            .chain(candidate.map(|(s, r)| (r, s)))
            .min()
            .map(|(_, s)| s)
    }

    fn append(&mut self, record: &Record<T>) -> Result<(), SpoolError> {
        self.write(record)?;
        self.sync()
    }

    fn write(&mut self, record: &Record<T>) -> Result<(), SpoolError> {
        let path = self.dir.join(QUEUE);
        let frame = frame(record).map_err(|source| SpoolError::Encode {
            path: path.clone(),
            source,
        })?;
        self.file.write_all(&frame).map_err(io_err(&path, "append"))
    }

    fn sync(&mut self) -> Result<(), SpoolError> {
        let path = self.dir.join(QUEUE);
        self.file.sync_data().map_err(io_err(&path, "fsync"))
    }

    /// Loads the alerted set; a missing file is empty, an unreadable one is empty with a
    /// warning (the cost: open findings may be paged once more).
    pub fn load_alerted<A: DeserializeOwned>(dir: &Path) -> BTreeMap<String, A> {
        let path = dir.join(ALERTED);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "alerted-findings record unreadable; starting without it");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the alerted-findings record");
                BTreeMap::new()
            }
        }
    }

    /// Replaces the alerted set atomically.
    pub fn save_alerted<A: Serialize>(
        &self,
        alerted: &BTreeMap<String, A>,
    ) -> Result<(), SpoolError> {
        let path = self.dir.join(ALERTED);
        let bytes = serde_json::to_vec(alerted).map_err(|source| SpoolError::Encode {
            path: path.clone(),
            source,
        })?;
        write_atomic(&self.dir, ALERTED, &bytes).map(|_| ())
    }
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io {
        path,
        action,
        source,
    }
}

fn frame<T: Serialize>(record: &Record<T>) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_vec(record)?;
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The live entries in `bytes` (a whole `queue.log`) and what was wrong with it.
fn replay<T: Spooled>(bytes: &[u8]) -> (BTreeMap<u64, T>, Recovery) {
    let mut entries = BTreeMap::new();
    let mut rec = Recovery::default();
    if bytes.is_empty() {
        return (entries, rec);
    }
    let mut pos = if bytes.starts_with(HEADER) {
        HEADER.len()
    } else {
        // Not our header: everything is suspect, but frames may still be whole.
        rec.corrupt_frames += 1;
        HEADER.len().min(bytes.len())
    };
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < 8 {
            rec.torn_bytes += rest.len();
            break;
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > MAX_FRAME || (len as usize) > rest.len() - 8 {
            // A torn last frame, or a length field that is itself corrupt: nothing after it
            // can be framed reliably.
            rec.torn_bytes += rest.len();
            break;
        }
        let payload = &rest[8..8 + len as usize];
        pos += 8 + len as usize;
        if crc32fast::hash(payload) != crc {
            rec.corrupt_frames += 1;
            continue;
        }
        match serde_json::from_slice::<Record<T>>(payload) {
            Ok(Record::Put { seq, item }) => {
                entries.insert(seq, item);
            }
            Ok(Record::Done { seq }) => {
                entries.remove(&seq);
            }
            Err(_) => rec.corrupt_frames += 1,
        }
    }
    (entries, rec)
}

/// Writes `entries` as a fresh `queue.log` and returns it opened for appending.
fn write_compacted<T: Spooled>(dir: &Path, entries: &BTreeMap<u64, T>) -> Result<File, SpoolError> {
    let mut bytes = HEADER.to_vec();
    for (seq, item) in entries {
        let f = frame(&Record::Put {
            seq: *seq,
            item: item.clone(),
        })
        .map_err(|source| SpoolError::Encode {
            path: dir.join(QUEUE),
            source,
        })?;
        bytes.extend_from_slice(&f);
    }
    let path = write_atomic(dir, QUEUE, &bytes)?;
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_err(&path, "open for appending"))
}

/// write temp + fsync + rename + fsync the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, SpoolError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename into place"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync the directory"))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Item {
        name: String,
        rank: u8,
    }

    impl Spooled for Item {
        fn rank(&self) -> u8 {
            self.rank
        }
    }

    fn item(name: &str, rank: u8) -> Item {
        Item {
            name: name.into(),
            rank,
        }
    }

    fn names(s: &Spool<Item>) -> Vec<String> {
        s.entries().map(|(_, i)| i.name.clone()).collect()
    }

    #[test]
    fn round_trip_and_restart_resume() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, rec) = Spool::<Item>::open(dir.path(), 10).unwrap();
            assert_eq!(rec, Recovery::default());
            let (a, _) = s.push(item("a", 1)).unwrap();
            s.push(item("b", 1)).unwrap();
            s.push(item("c", 2)).unwrap();
            assert_eq!(s.remove(a).unwrap(), Some(item("a", 1)));
            assert_eq!(s.remove(a).unwrap(), None);
            // Dropped without close: appends are already on disk.
        }
        let (mut s, rec) = Spool::<Item>::open(dir.path(), 10).unwrap();
        assert_eq!(rec, Recovery::default());
        assert_eq!(names(&s), ["b", "c"]);
        // Sequence numbers keep increasing across restarts (ordering per finding relies on it).
        let (d, _) = s.push(item("d", 1)).unwrap();
        assert!(d > s.entries().next().unwrap().0);
        assert!(d >= 4, "{d}");
    }

    #[test]
    fn a_torn_last_frame_is_skipped_with_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::<Item>::open(dir.path(), 10).unwrap();
            s.push(item("a", 1)).unwrap();
            s.push(item("b", 1)).unwrap();
        }
        let path = dir.path().join(QUEUE);
        let len = fs::metadata(&path).unwrap().len();
        // Tear the last frame in the middle, as a crash during write would.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap();
        drop(f);
        let (mut s, rec) = Spool::<Item>::open(dir.path(), 10).unwrap();
        assert_eq!(names(&s), ["a"]);
        assert_eq!(rec.corrupt_frames, 0);
        assert!(rec.torn_bytes > 0);
        // The file was compacted: appending after recovery is readable again.
        s.push(item("c", 1)).unwrap();
        drop(s);
        let (s, rec) = Spool::<Item>::open(dir.path(), 10).unwrap();
        assert_eq!(rec, Recovery::default());
        assert_eq!(names(&s), ["a", "c"]);
    }

    #[test]
    fn a_corrupt_frame_in_the_middle_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::<Item>::open(dir.path(), 10).unwrap();
            for n in ["a", "bbbbbbbb", "c"] {
                s.push(item(n, 1)).unwrap();
            }
        }
        let path = dir.path().join(QUEUE);
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes.windows(8).position(|w| w == b"bbbbbbbb").unwrap();
        // Still valid JSON after the flip: only the CRC can tell.
        bytes[at + 3] = b'x';
        fs::write(&path, &bytes).unwrap();
        let (s, rec) = Spool::<Item>::open(dir.path(), 10).unwrap();
        assert_eq!(names(&s), ["a", "c"]);
        assert_eq!(rec.corrupt_frames, 1);
        assert_eq!(rec.torn_bytes, 0);
    }

    #[test]
    fn garbage_files_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(QUEUE);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..200 {
            let len = (round * 7) % 300;
            let mut bytes = if round % 2 == 0 {
                HEADER.to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            fs::write(&path, &bytes).unwrap();
            let (s, _) = Spool::<Item>::open(dir.path(), 10).unwrap();
            assert!(s.len() <= 10);
        }
    }

    #[test]
    fn push_all_is_durable_and_bounded_like_push() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::<Item>::open(dir.path(), 3).unwrap();
        let dropped = s
            .push_all(vec![
                item("w1", 1),
                item("c1", 2),
                item("w2", 1),
                item("c2", 2),
            ])
            .unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].1.name, "w1");
        drop(s);
        let (s, rec) = Spool::<Item>::open(dir.path(), 3).unwrap();
        assert_eq!(rec, Recovery::default());
        assert_eq!(names(&s), ["c1", "w2", "c2"]);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_of_the_lowest_rank_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::<Item>::open(dir.path(), 3).unwrap();
        s.push(item("crit-old", 2)).unwrap();
        s.push(item("warn-old", 1)).unwrap();
        s.push(item("warn-new", 1)).unwrap();
        let (_, dropped) = s.push(item("crit-new", 2)).unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].1.name, "warn-old");
        assert_eq!(names(&s), ["crit-old", "warn-new", "crit-new"]);
        // A new entry of the lowest rank, when everything stored outranks it, is itself dropped.
        s.push(item("crit-3", 2)).unwrap();
        let (_, dropped) = s.push(item("warn-x", 1)).unwrap();
        assert_eq!(dropped[0].1.name, "warn-x");
        assert_eq!(names(&s), ["crit-old", "crit-new", "crit-3"]);
        drop(s);
        let (s, _) = Spool::<Item>::open(dir.path(), 3).unwrap();
        assert_eq!(names(&s), ["crit-old", "crit-new", "crit-3"]);
        drop(s);
        // A lower limit trims on open, the same way.
        let (s, _) = Spool::<Item>::open(dir.path(), 1).unwrap();
        assert_eq!(names(&s), ["crit-3"]);
    }

    #[test]
    fn alerted_set_is_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::<Item>::open(dir.path(), 3).unwrap();
        assert!(Spool::<Item>::load_alerted::<u32>(dir.path()).is_empty());
        let mut m = BTreeMap::new();
        m.insert("k".to_string(), 7u32);
        s.save_alerted(&m).unwrap();
        assert_eq!(Spool::<Item>::load_alerted::<u32>(dir.path()), m);
        fs::write(dir.path().join(ALERTED), b"{not json").unwrap();
        assert!(Spool::<Item>::load_alerted::<u32>(dir.path()).is_empty());
        assert!(!dir.path().join("alerted.json.tmp").exists());
    }
}
