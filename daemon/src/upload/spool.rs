//! What an open upload must not lose when its engine dies: the bytes not yet in the store,
//! and where the multipart upload stands.
//!
//! Each file open for writing has two files in the mount's state directory (normally tmpfs
//! under /run, so this is memory that outlives the engine process, not disk):
//! - `<handle>.data`: the object's bytes at their offsets. Parts the store has acknowledged are
//!   punched out (a sparse file), so it holds only what is not yet safe in the store: the part
//!   being filled and the parts in flight.
//! - `<handle>.log`: an append-only record of the upload: a header (inode, key, part size, the
//!   object an append builds on), the multipart upload id, each acknowledged part's ETag, and
//!   the commit. Records are `[len u32][tag u8][fields][crc32 u32]`, little-endian; a torn or
//!   corrupt tail (a crash mid-append) ends the replay and never yields a wrong state.
//!
//! A successor engine finds the files by the handle number the kernel (or a guest) still holds
//! and resumes the upload where it stopped ([`SpoolDir::open`]). They are removed when the
//! handle is released, or when the upload is aborted.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use bytes::BytesMut;

use crate::namespace::ObjectStat;
use crate::store::{PosixMeta, UploadedPart};

const TAG_HEADER: u8 = b'H';
const TAG_UPLOAD: u8 = b'U';
const TAG_PART: u8 = b'P';
const TAG_SEEDED: u8 = b'S';
const TAG_COMMITTED: u8 = b'C';
const TAG_META: u8 = b'M';
/// A log record is never larger than this (keys are at most 1 KiB, ETags short).
const MAX_RECORD: usize = 64 << 10;
/// Metadata changes one upload records at most (a tool sets a file's attributes once or
/// twice; the cap keeps a hostile client from growing the log without bound).
pub const MAX_META_RECORDS: usize = 64;
/// Records in one log at most (10,000 parts, the metadata changes and a handful of others).
const MAX_RECORDS: usize = 10_100 + MAX_META_RECORDS;

/// What an upload is about, written first in its log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub ino: u64,
    pub key: String,
    pub part_size: u64,
    /// The object an append builds on, as it was when opened.
    pub base: Option<ObjectStat>,
}

/// One event in an upload's life, appended to its log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Header(Header),
    UploadId(String),
    Part(UploadedPart),
    /// The base object's bytes are in the data file (appends only).
    Seeded,
    Committed(ObjectStat),
    /// The POSIX attributes the object is to carry (set at open, then by chmod, chown and
    /// utimes while it is open); the last one counts.
    Meta(PosixMeta),
}

/// An upload's state as its log and data file left it.
#[derive(Debug)]
pub struct Recovered {
    pub header: Header,
    pub upload_id: Option<String>,
    pub parts: Vec<UploadedPart>,
    pub seeded: bool,
    pub committed: Option<ObjectStat>,
    /// Bytes in the data file (its length: punched parts keep it).
    pub data_len: u64,
    /// The attributes the object is to carry.
    pub meta: PosixMeta,
    /// The attributes the multipart upload was created with (the last `Meta` before its
    /// `UploadId`): if they differ from `meta` at commit, they are set after it.
    pub meta_sent: Option<PosixMeta>,
    /// `Meta` records in the log.
    pub meta_records: usize,
}

impl Recovered {
    fn new(header: Header) -> Recovered {
        Recovered {
            header,
            upload_id: None,
            parts: Vec::new(),
            seeded: false,
            committed: None,
            data_len: 0,
            meta: PosixMeta::default(),
            meta_sent: None,
            meta_records: 0,
        }
    }
}

/// The directory of the spools of one volume.
#[derive(Debug)]
pub struct SpoolDir {
    dir: PathBuf,
}

impl SpoolDir {
    pub fn new(dir: PathBuf) -> SpoolDir {
        SpoolDir { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn paths(&self, fh: u64) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{fh:016x}.data")),
            self.dir.join(format!("{fh:016x}.log")),
        )
    }

    /// A new spool for handle `fh`, its log started with `header`.
    pub fn create(&self, fh: u64, header: Header) -> io::Result<Spool> {
        crate::sys::files::private_dir(&self.dir)?;
        let (data_path, log_path) = self.paths(fh);
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
        };
        let data = open(&data_path)?;
        let log = open(&log_path)?;
        let mut spool = Spool {
            data: Some(data),
            log,
            data_path,
            log_path,
            punched: 0,
            header: header.clone(),
        };
        spool.record(&Record::Header(header))?;
        Ok(spool)
    }

    /// The spool a predecessor engine left for handle `fh`, and what it says; `None` if there
    /// is none or its log has no readable header.
    pub fn open(&self, fh: u64) -> io::Result<Option<(Spool, Recovered)>> {
        let (data_path, log_path) = self.paths(fh);
        let mut log = match OpenOptions::new().read(true).write(true).open(&log_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes)?;
        let (records, good) = decode_all(&bytes);
        if good < bytes.len() {
            tracing::warn!(log = %log_path.display(), good, len = bytes.len(), "an upload log ends in a torn record; replayed up to it");
            log.set_len(good as u64)?;
        }
        let mut records = records.into_iter();
        let Some(Record::Header(header)) = records.next() else {
            tracing::error!(log = %log_path.display(), "an upload log without a header; its upload cannot be resumed");
            return Ok(None);
        };
        let mut rec = Recovered::new(header);
        for r in records {
            match r {
                // A new header starts the upload again (see `Spool::rebase`); the attributes
                // stay those of the same file.
                Record::Header(h) => {
                    let meta = std::mem::take(&mut rec.meta);
                    let meta_records = rec.meta_records;
                    rec = Recovered::new(h);
                    rec.meta = meta;
                    rec.meta_records = meta_records;
                }
                Record::UploadId(id) => {
                    rec.upload_id = Some(id);
                    rec.meta_sent = Some(rec.meta.clone());
                }
                Record::Meta(m) => {
                    rec.meta = m;
                    rec.meta_records += 1;
                }
                Record::Part(p) => {
                    rec.parts.retain(|q| q.number != p.number);
                    rec.parts.push(p);
                }
                Record::Seeded => rec.seeded = true,
                Record::Committed(stat) => rec.committed = Some(stat),
            }
        }
        let data = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && rec.committed.is_some() => None,
            Err(e) => return Err(e),
        };
        if let Some(f) = &data {
            rec.data_len = f.metadata()?.len();
        }
        use std::io::Seek as _;
        log.seek(io::SeekFrom::End(0))?;
        let spool = Spool {
            data,
            log,
            data_path,
            log_path,
            punched: 0,
            header: rec.header.clone(),
        };
        Ok(Some((spool, rec)))
    }

    /// Removes the spool of `fh`, whatever state it is in.
    pub fn remove(&self, fh: u64) {
        let (data, log) = self.paths(fh);
        remove(&data);
        remove(&log);
    }

    /// Removes the spools whose log has no header: their engine died inside `create`, before
    /// the create or open that made them was answered, so no handle the kernel holds names
    /// them (the request comes again and makes a new one). Returns how many went.
    pub fn remove_unborn(&self) -> usize {
        let mut removed = 0;
        for fh in self.handles() {
            let (_, log_path) = self.paths(fh);
            let Ok(bytes) = std::fs::read(&log_path) else {
                continue;
            };
            if matches!(decode_all(&bytes).0.first(), Some(Record::Header(_))) {
                continue;
            }
            tracing::info!(log = %log_path.display(), "removed an upload log without a header: its engine died while creating it, before any reply named it");
            self.remove(fh);
            removed += 1;
        }
        removed
    }

    /// Whether handle `fh` has a spool here.
    pub fn has(&self, fh: u64) -> bool {
        self.paths(fh).1.exists()
    }

    /// The handle numbers that have a spool here.
    pub fn handles(&self) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let hex = name.to_str()?.strip_suffix(".log")?;
                u64::from_str_radix(hex, 16).ok()
            })
            .collect()
    }
}

/// The two files of one upload.
#[derive(Debug)]
pub struct Spool {
    /// None once the upload committed (the bytes are in the store).
    data: Option<File>,
    log: File,
    data_path: PathBuf,
    log_path: PathBuf,
    /// Bytes from the start already punched out.
    punched: u64,
    header: Header,
}

impl Spool {
    fn data(&mut self) -> io::Result<&mut File> {
        self.data
            .as_mut()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    /// The data file, for writes straight from a request's buffers.
    pub fn data_file(&mut self) -> io::Result<&mut File> {
        self.data()
    }

    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.data()?.write_all_at(bytes, offset)
    }

    /// Cuts the data file back to `len` (a write that failed half-way leaves nothing behind).
    pub fn truncate(&mut self, len: u64) -> io::Result<()> {
        let f = self.data()?;
        if f.metadata()?.len() > len {
            f.set_len(len)?;
        }
        Ok(())
    }

    /// Makes the data file at least `len` bytes long (a hole where nothing was written).
    pub fn extend_to(&mut self, len: u64) -> io::Result<()> {
        let f = self.data()?;
        if f.metadata()?.len() < len {
            f.set_len(len)?;
        }
        Ok(())
    }

    /// The bytes of `range`, read into memory for an upload.
    pub fn read(&mut self, range: Range<u64>) -> io::Result<BytesMut> {
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut buf = BytesMut::zeroed(len);
        self.data()?.read_exact_at(&mut buf, range.start)?;
        Ok(buf)
    }

    /// The store has everything before `upto`: its space is given back.
    pub fn release_before(&mut self, upto: u64) {
        if upto <= self.punched {
            return;
        }
        let from = self.punched;
        let Ok(f) = self.data() else {
            return;
        };
        // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                from as libc::off_t,
                (upto - from) as libc::off_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "could not punch uploaded parts out of a spool");
        }
        self.punched = upto;
    }

    /// Appends `r` to the log. It is in the file (the page cache) when this returns, which is
    /// all an engine crash needs; no fsync (a node crash loses the kernel's open files too).
    pub fn record(&mut self, r: &Record) -> io::Result<()> {
        let mut out = Vec::new();
        encode(r, &mut out);
        self.log.write_all(&out)
    }

    /// The upload committed: its bytes are no longer needed, only the fact.
    pub fn committed(&mut self, stat: &ObjectStat) -> io::Result<()> {
        self.record(&Record::Committed(stat.clone()))?;
        if self.data.take().is_some() {
            remove(&self.data_path);
        }
        Ok(())
    }

    /// A committed file is written again, on top of `base` (what it committed, if anything):
    /// a new data file, and a new header that starts the upload over.
    pub fn rebase(&mut self, base: Option<ObjectStat>) -> io::Result<()> {
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.data_path)?;
        self.data = Some(data);
        self.punched = 0;
        self.header.base = base;
        let header = self.header.clone();
        self.record(&Record::Header(header))
    }

    /// Removes both files (the handle was released, or the upload aborted).
    pub fn remove(&mut self) {
        self.data = None;
        remove(&self.data_path);
        remove(&self.log_path);
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an upload spool file");
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_stat(out: &mut Vec<u8>, stat: &ObjectStat) {
    out.extend_from_slice(&stat.size.to_le_bytes());
    let nanos = stat
        .mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    out.extend_from_slice(&nanos.to_le_bytes());
    match &stat.etag {
        Some(e) => {
            out.push(1);
            put_str(out, e);
        }
        None => out.push(0),
    }
}

fn encode(r: &Record, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    match r {
        Record::Header(h) => {
            body.push(TAG_HEADER);
            body.extend_from_slice(&h.ino.to_le_bytes());
            body.extend_from_slice(&h.part_size.to_le_bytes());
            put_str(&mut body, &h.key);
            match &h.base {
                Some(b) => {
                    body.push(1);
                    put_stat(&mut body, b);
                }
                None => body.push(0),
            }
        }
        Record::UploadId(id) => {
            body.push(TAG_UPLOAD);
            put_str(&mut body, id);
        }
        Record::Part(p) => {
            body.push(TAG_PART);
            body.extend_from_slice(&p.number.to_le_bytes());
            put_str(&mut body, &p.etag);
        }
        Record::Seeded => body.push(TAG_SEEDED),
        Record::Committed(stat) => {
            body.push(TAG_COMMITTED);
            put_stat(&mut body, stat);
        }
        Record::Meta(meta) => {
            body.push(TAG_META);
            put_str(&mut body, &meta.to_text());
        }
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32fast::hash(&body);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Reads fields off the front of a record body; every read is bounds-checked.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
    fn stat(&mut self) -> Option<ObjectStat> {
        let size = self.u64()?;
        let mtime = UNIX_EPOCH + Duration::from_nanos(self.u64()?);
        let etag = match self.u8()? {
            0 => None,
            1 => Some(self.string()?),
            _ => return None,
        };
        Some(ObjectStat {
            size,
            mtime,
            etag,
            meta: None,
        })
    }
}

fn decode(body: &[u8]) -> Option<Record> {
    let mut f = Fields(body);
    let record = match f.u8()? {
        TAG_HEADER => {
            let ino = f.u64()?;
            let part_size = f.u64()?;
            let key = f.string()?;
            let base = match f.u8()? {
                0 => None,
                1 => Some(f.stat()?),
                _ => return None,
            };
            Record::Header(Header {
                ino,
                key,
                part_size,
                base,
            })
        }
        TAG_UPLOAD => Record::UploadId(f.string()?),
        TAG_PART => {
            let number = f.i32()?;
            let etag = f.string()?;
            Record::Part(UploadedPart { number, etag })
        }
        TAG_SEEDED => Record::Seeded,
        TAG_COMMITTED => Record::Committed(f.stat()?),
        TAG_META => Record::Meta(PosixMeta::from_text(&f.string()?)),
        _ => return None,
    };
    f.0.is_empty().then_some(record)
}

/// The records of a log up to the first torn or corrupt one, and how many bytes they span.
fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while records.len() < MAX_RECORDS && bytes.len() - at >= 4 {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        if len == 0 || len > MAX_RECORD || bytes.len() - at - 4 < len + 4 {
            break;
        }
        let body = &bytes[at + 4..at + 4 + len];
        let crc_at = at + 4 + len;
        let crc = u32::from_le_bytes([
            bytes[crc_at],
            bytes[crc_at + 1],
            bytes[crc_at + 2],
            bytes[crc_at + 3],
        ]);
        if crc32fast::hash(body) != crc {
            break;
        }
        let Some(r) = decode(body) else {
            break;
        };
        records.push(r);
        at = crc_at + 4;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    /// A time as a log keeps it (nanoseconds).
    fn round_trip_mtime(t: SystemTime) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64)
    }

    fn header(base: Option<ObjectStat>) -> Header {
        Header {
            ino: 42,
            key: "dir/file with\nnewline".into(),
            part_size: 8 << 20,
            base,
        }
    }

    #[test]
    fn a_log_replays_what_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let spools = SpoolDir::new(dir.path().join("writes"));
        let base = ObjectStat {
            size: 11,
            mtime: round_trip_mtime(SystemTime::now()),
            etag: Some("\"abc\"".into()),
            meta: None,
        };
        let mut s = spools.create(0xfeed, header(Some(base.clone()))).unwrap();
        s.write_at(0, b"hello world").unwrap();
        s.record(&Record::UploadId("up-1".into())).unwrap();
        s.record(&Record::Seeded).unwrap();
        for (n, e) in [(1, "e1"), (2, "e2"), (1, "e1-again")] {
            s.record(&Record::Part(UploadedPart {
                number: n,
                etag: e.into(),
            }))
            .unwrap();
        }
        drop(s);
        assert_eq!(spools.handles(), vec![0xfeed]);
        let (mut s, rec) = spools.open(0xfeed).unwrap().unwrap();
        assert_eq!(rec.header, header(Some(base)));
        assert_eq!(rec.upload_id.as_deref(), Some("up-1"));
        assert!(rec.seeded);
        assert_eq!(rec.data_len, 11);
        let mut parts: Vec<_> = rec
            .parts
            .iter()
            .map(|p| (p.number, p.etag.as_str()))
            .collect();
        parts.sort();
        assert_eq!(
            parts,
            vec![(1, "e1-again"), (2, "e2")],
            "a part sent again replaces its first ETag"
        );
        assert_eq!(&s.read(6..11).unwrap()[..], b"world");
        let stat = ObjectStat {
            size: 11,
            mtime: round_trip_mtime(SystemTime::now()),
            etag: None,
            meta: None,
        };
        s.committed(&stat).unwrap();
        drop(s);
        let (mut s, rec) = spools.open(0xfeed).unwrap().unwrap();
        assert_eq!(
            rec.committed,
            Some(stat),
            "a committed upload is remembered without its bytes"
        );
        s.remove();
        assert!(spools.open(0xfeed).unwrap().is_none());
        assert!(spools.handles().is_empty());
    }

    /// An engine that died inside `create` left a log with no header (empty, or the header
    /// torn): nothing names it, so a successor removes it instead of reporting a lost file at
    /// every takeover; spools with a header stay.
    #[test]
    fn logs_without_a_header_are_removed_and_the_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spools = SpoolDir::new(dir.path().to_path_buf());
        drop(spools.create(1, header(None)).unwrap());
        std::fs::write(dir.path().join(format!("{:016x}.log", 2)), b"").unwrap();
        std::fs::write(dir.path().join(format!("{:016x}.data", 2)), b"").unwrap();
        let mut torn = std::fs::read(dir.path().join(format!("{:016x}.log", 1))).unwrap();
        torn.truncate(torn.len() / 2);
        std::fs::write(dir.path().join(format!("{:016x}.log", 3)), torn).unwrap();
        let mut found = spools.handles();
        found.sort();
        assert_eq!(found, vec![1, 2, 3]);
        assert_eq!(spools.remove_unborn(), 2);
        assert_eq!(spools.handles(), vec![1]);
        assert!(!dir.path().join(format!("{:016x}.data", 2)).exists());
        assert!(spools.open(1).unwrap().is_some());
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let spools = SpoolDir::new(dir.path().to_path_buf());
        let mut s = spools.create(7, header(None)).unwrap();
        s.record(&Record::UploadId("id".into())).unwrap();
        drop(s);
        let log = dir.path().join(format!("{:016x}.log", 7));
        let whole = std::fs::read(&log).unwrap();
        let mut part = Vec::new();
        encode(
            &Record::Part(UploadedPart {
                number: 1,
                etag: "e".into(),
            }),
            &mut part,
        );
        // Torn: half a record. Corrupt: a flipped byte. Neither is replayed.
        for tail in [part[..part.len() / 2].to_vec(), {
            let mut p = part.clone();
            p[6] ^= 0xff;
            p
        }] {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&tail);
            std::fs::write(&log, &bytes).unwrap();
            let (_, rec) = spools.open(7).unwrap().unwrap();
            assert!(rec.parts.is_empty());
            assert_eq!(rec.upload_id.as_deref(), Some("id"));
            assert_eq!(
                std::fs::read(&log).unwrap(),
                whole,
                "the bad tail is cut off"
            );
        }
        // A log that is garbage from the start resumes nothing.
        std::fs::write(&log, b"\xff\xff\xff\x7fgarbage").unwrap();
        assert!(spools.open(7).unwrap().is_none());
    }

    #[test]
    fn uploaded_parts_are_punched_out_and_the_size_stays() {
        let dir = tempfile::tempdir().unwrap();
        let spools = SpoolDir::new(dir.path().to_path_buf());
        let mut s = spools.create(9, header(None)).unwrap();
        s.write_at(0, &vec![7u8; 3 << 20]).unwrap();
        s.release_before(2 << 20);
        drop(s);
        let (mut s, rec) = spools.open(9).unwrap().unwrap();
        assert_eq!(rec.data_len, 3 << 20);
        assert_eq!(&s.read((2 << 20)..(2 << 20) + 4).unwrap()[..], &[7u8; 4]);
        let meta = std::fs::metadata(dir.path().join(format!("{:016x}.data", 9))).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert!(
            meta.blocks() * 512 < (3 << 20),
            "the punched part takes no space"
        );
    }
}
