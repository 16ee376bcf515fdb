//! The durable local outbox: append-only segment files of length-prefixed,
//! checksummed protobuf events, and a cursor file recording how far delivery
//! got.
//!
//! Layout of the outbox directory:
//! - `LOCK`: held (advisory file lock) by the one client using the directory;
//! - `seg-<n>.log`: segments, written in order, rotated at [`SEGMENT_MAX`];
//!   a record is `len: u32 LE | checksum: u32 LE | AuditEvent (protobuf)`,
//!   the checksum being the first 4 bytes of the payload's SHA-256;
//! - `cursor`: `<segment> <offset>` of the first record not yet acknowledged
//!   by the audit service (rewritten atomically; losing an update only means
//!   a redelivery, which the service ignores by event id).
//!
//! Invariant: a record is acknowledged to the producer only after its bytes
//! are written and `fsync`ed; only such bytes are read by delivery.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};
use vibebox_proto::audit::AuditEvent;

/// Segments are rotated once they grow past this size.
pub(crate) const SEGMENT_MAX: u64 = 8 * 1024 * 1024;
const HEADER: usize = 8;
/// Upper bound for one encoded event; larger lengths mean a torn record.
const RECORD_MAX: usize = 4 * 1024 * 1024;

/// A position in the outbox: segment number and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub(crate) segment: u64,
    pub(crate) offset: u64,
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("seg-{segment:020}.log"))
}

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join("cursor")
}

fn checksum(payload: &[u8]) -> [u8; 4] {
    let digest = Sha256::digest(payload);
    [digest[0], digest[1], digest[2], digest[3]]
}

/// Encodes one event as an outbox record.
pub(crate) fn encode_record(event: &AuditEvent, out: &mut Vec<u8>) {
    let payload = event.encode_to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&payload));
    out.extend_from_slice(&payload);
}

/// Sorted segment numbers present in `dir`.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("seg-")
            .and_then(|rest| rest.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the next record from `reader`; `Ok(None)` at a clean end or at a
/// torn / corrupt tail.
fn read_record(reader: &mut impl Read) -> io::Result<Option<(AuditEvent, u64)>> {
    let mut header = [0u8; HEADER];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > RECORD_MAX {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    match reader.read_exact(&mut payload) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if checksum(&payload) != header[4..8] {
        return Ok(None);
    }
    match AuditEvent::decode(payload.as_slice()) {
        Ok(event) => Ok(Some((event, (HEADER + len) as u64))),
        Err(_) => Ok(None),
    }
}

/// The writing side, owned by the writer thread.
pub(crate) struct Writer {
    dir: PathBuf,
    file: File,
    segment: u64,
    len: u64,
}

impl Writer {
    /// Opens (and recovers) the outbox in `dir`; returns the writer, the
    /// durable end and the delivery cursor.
    pub(crate) fn open(dir: &Path) -> io::Result<(Writer, Pos, Pos)> {
        let existing = segments(dir)?;
        let (segment, len) = match existing.last() {
            Some(&last) => (last, valid_len(&segment_path(dir, last))?),
            None => (1, 0),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, segment))?;
        if file.metadata()?.len() != len {
            // Cut off a torn tail left by a crash mid-write (never acknowledged).
            file.set_len(len)?;
            file.sync_all()?;
        }
        if existing.is_empty() {
            sync_dir(dir)?;
        }
        let first = existing.first().copied().unwrap_or(segment);
        let cursor = read_cursor(dir)?
            .map(|c| {
                if c.segment < first {
                    Pos {
                        segment: first,
                        offset: 0,
                    }
                } else {
                    c
                }
            })
            .unwrap_or(Pos {
                segment: first,
                offset: 0,
            });
        let end = Pos {
            segment,
            offset: len,
        };
        let cursor = cursor.min(end);
        Ok((
            Writer {
                dir: dir.to_owned(),
                file,
                segment,
                len,
            },
            end,
            cursor,
        ))
    }

    /// Appends already encoded records and makes them durable; returns the
    /// new durable end.
    pub(crate) fn append(&mut self, records: &[u8]) -> io::Result<Pos> {
        if self.len >= SEGMENT_MAX {
            let next = self.segment + 1;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&self.dir, next))?;
            sync_dir(&self.dir)?;
            self.file = file;
            self.segment = next;
            self.len = 0;
        }
        self.file.write_all(records)?;
        self.file.sync_data()?;
        self.len += records.len() as u64;
        Ok(Pos {
            segment: self.segment,
            offset: self.len,
        })
    }
}

/// Length of the valid prefix of a segment (up to the first torn record).
fn valid_len(path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut len = 0;
    while let Some((_, size)) = read_record(&mut reader)? {
        len += size;
    }
    Ok(len)
}

fn read_cursor(dir: &Path) -> io::Result<Option<Pos>> {
    let text = match fs::read_to_string(cursor_path(dir)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(segment)), Some(Ok(offset))) => Ok(Some(Pos { segment, offset })),
        _ => Ok(None),
    }
}

/// Records how far delivery got and removes fully delivered segments.
pub(crate) fn commit_cursor(dir: &Path, cursor: Pos) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    fs::write(&tmp, format!("{} {}\n", cursor.segment, cursor.offset))?;
    fs::rename(&tmp, cursor_path(dir))?;
    for segment in segments(dir)? {
        if segment < cursor.segment {
            fs::remove_file(segment_path(dir, segment))?;
        }
    }
    Ok(())
}

/// Reads up to `max` durable records starting at `from`, never past `end`.
/// Returns the events and the position after the last one.
pub(crate) fn read_batch(
    dir: &Path,
    from: Pos,
    end: Pos,
    max: usize,
    max_bytes: u64,
) -> io::Result<(Vec<AuditEvent>, Pos)> {
    let mut events = Vec::new();
    let mut pos = from;
    let mut bytes = 0;
    while pos < end && events.len() < max && bytes < max_bytes {
        let limit = if pos.segment == end.segment {
            end.offset
        } else {
            u64::MAX
        };
        let path = segment_path(dir, pos.segment);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                pos = Pos {
                    segment: pos.segment + 1,
                    offset: 0,
                };
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file);
        reader.seek(SeekFrom::Start(pos.offset))?;
        let mut advanced = false;
        while pos.offset < limit && events.len() < max && bytes < max_bytes {
            match read_record(&mut reader)? {
                Some((event, size)) => {
                    pos.offset += size;
                    bytes += size;
                    events.push(event);
                    advanced = true;
                }
                None => break,
            }
        }
        let at_limit = pos.offset >= limit;
        if pos.segment < end.segment && !(events.len() >= max || bytes >= max_bytes) {
            // End of this (finished) segment: continue with the next one.
            pos = Pos {
                segment: pos.segment + 1,
                offset: 0,
            };
        } else if at_limit || !advanced {
            break;
        }
    }
    Ok((events, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str) -> AuditEvent {
        AuditEvent {
            id: action.to_owned(),
            action: action.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn appends_recover_and_truncate_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, end, cursor) = Writer::open(dir.path()).unwrap();
        assert_eq!(end, cursor);
        let mut buf = Vec::new();
        encode_record(&event("a"), &mut buf);
        encode_record(&event("b"), &mut buf);
        let end = writer.append(&buf).unwrap();
        drop(writer);
        // A torn record after the durable end.
        let mut file = OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), 1))
            .unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(file);

        let (_writer, recovered, cursor) = Writer::open(dir.path()).unwrap();
        assert_eq!(recovered, end);
        let (events, pos) = read_batch(dir.path(), cursor, recovered, 10, u64::MAX).unwrap();
        assert_eq!(
            events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(pos, end);
        commit_cursor(dir.path(), pos).unwrap();
        let (_w, _, cursor) = {
            drop(_writer);
            Writer::open(dir.path()).unwrap()
        };
        assert_eq!(cursor, end);
    }

    #[test]
    fn reads_across_segments_and_removes_delivered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, start, _) = Writer::open(dir.path()).unwrap();
        // Force a rotation by pretending the segment is full.
        let mut buf = Vec::new();
        encode_record(&event("one"), &mut buf);
        writer.append(&buf).unwrap();
        writer.len = SEGMENT_MAX;
        buf.clear();
        encode_record(&event("two"), &mut buf);
        let end = writer.append(&buf).unwrap();
        assert_eq!(end.segment, 2);
        let (events, pos) = read_batch(dir.path(), start, end, 10, u64::MAX).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(pos, end);
        commit_cursor(dir.path(), pos).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![2]);
    }
}
