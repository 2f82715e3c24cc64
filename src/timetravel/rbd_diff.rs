//! Ceph's "rbd diff v1" stream (what `rbd export-diff` writes and `rbd import-diff` reads),
//! as Ceph's own description has it (doc/dev/rbd-diff.rst): the writer `export-diff` uses
//! and the parser `import-diff` validates a whole stream with before it writes anything.
//!
//! # Format (integers little-endian)
//! ```text
//! banner   "rbd diff v1\n"                      12 bytes
//! metadata ('f' le32 n, n bytes)                from-snapshot name (optional)
//!          ('t' le32 n, n bytes)                to-snapshot name (optional)
//!          ('s' le64 size)                      the image size at the end (always)
//! data     ('w' le64 offset, le64 len, len bytes of data
//!          |'z' le64 offset, le64 len)*         zeroes (a discard or zeroed range)
//! end      'e'
//! ```
//! Metadata records come before data records, in any order. Records carry no length of
//! their own, so an unknown tag cannot be skipped: it ends the parse with an error. Names
//! are at most [`MAX_NAME`] bytes (Ceph's cap).
//!
//! Must never: accept a stream it cannot parse to its `e` (a truncated stream is an error,
//! not a shorter diff); accept a record reaching past the image size; allocate what a length
//! field claims before the bytes are there.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// The banner every v1 stream starts with.
pub const BANNER: &[u8; 12] = b"rbd diff v1\n";
/// The longest snapshot name accepted (Ceph's import refuses longer ones).
pub const MAX_NAME: u32 = 4096;
/// The largest `w` record the exporter writes: readers (Ceph's import-diff among them)
/// buffer a whole record.
pub const MAX_WRITE: u64 = 4 << 20;

/// Why a stream is refused; `at` is the byte offset of the record.
#[derive(Debug, thiserror::Error)]
pub enum RbdDiffError {
    #[error("not an rbd diff v1 stream: the first 12 bytes are not \"rbd diff v1\\n\"")]
    Banner,
    #[error("truncated at byte {at}: {what} is cut off (the stream has no 'e' end record)")]
    Truncated { at: u64, what: &'static str },
    #[error("byte {at}: unknown record tag {tag:#04x} ({shown}); v1 records cannot be skipped")]
    UnknownTag { at: u64, tag: u8, shown: String },
    #[error("byte {at}: metadata record '{tag}' after a data record")]
    MetadataAfterData { at: u64, tag: char },
    #[error("byte {at}: a second '{tag}' record")]
    Duplicate { at: u64, tag: char },
    #[error("byte {at}: snapshot name of {len} bytes (at most {MAX_NAME})")]
    NameTooLong { at: u64, len: u32 },
    #[error("byte {at}: snapshot name is not UTF-8")]
    NameNotUtf8 { at: u64 },
    #[error("byte {at}: a data record before the 's' (image size) record")]
    NoSize { at: u64 },
    #[error("byte {at}: '{tag}' record {offset}+{len} reaches past the image size {size}")]
    PastEnd {
        at: u64,
        tag: char,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("byte {at}: {extra} bytes after the 'e' end record")]
    Trailing { at: u64, extra: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The metadata of a stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub from: Option<String>,
    pub to: Option<String>,
    pub size: u64,
}

/// One data record; a `w`'s data is at `data_pos` in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataRecord {
    Write {
        offset: u64,
        len: u64,
        data_pos: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

/// A whole stream, parsed and checked; data is left in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub header: Header,
    pub records: Vec<DataRecord>,
}

impl Parsed {
    /// Bytes the `w` records carry and bytes the `z` records zero.
    pub fn totals(&self) -> (u64, u64) {
        self.records.iter().fold((0, 0), |(w, z), r| match r {
            DataRecord::Write { len, .. } => (w + len, z),
            DataRecord::Zero { len, .. } => (w, z + len),
        })
    }
}

/// Writes a v1 stream.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    /// Bytes written so far.
    pub written: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the banner and the metadata records (`f`, `t` when named, `s` always).
    pub fn start(out: W, header: &Header) -> io::Result<Writer<W>> {
        let mut w = Writer { out, written: 0 };
        w.put(BANNER)?;
        for (tag, name) in [(b'f', &header.from), (b't', &header.to)] {
            if let Some(name) = name {
                let len = u32::try_from(name.len())
                    .ok()
                    .filter(|&l| l <= MAX_NAME)
                    .ok_or_else(|| io::Error::other("snapshot name longer than 4096 bytes"))?;
                w.put(&[tag])?;
                w.put(&len.to_le_bytes())?;
                w.put(name.as_bytes())?;
            }
        }
        w.put(b"s")?;
        w.put(&header.size.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// A `w` record (the caller keeps it at most [`MAX_WRITE`]).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.put(b"w")?;
        self.put(&offset.to_le_bytes())?;
        self.put(&(data.len() as u64).to_le_bytes())?;
        self.put(data)
    }

    /// A `z` record.
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.put(b"z")?;
        self.put(&offset.to_le_bytes())?;
        self.put(&len.to_le_bytes())
    }

    /// The `e` record; hands the output back, flushed.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(b"e")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads exactly `buf.len()` bytes or says which field was cut off.
fn read_exact_at<R: Read>(
    r: &mut R,
    at: &mut u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), RbdDiffError> {
    match r.read_exact(buf) {
        Ok(()) => {
            *at += buf.len() as u64;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(RbdDiffError::Truncated { at: *at, what })
        }
        Err(e) => Err(e.into()),
    }
}

fn le64<R: Read>(r: &mut R, at: &mut u64, what: &'static str) -> Result<u64, RbdDiffError> {
    let mut b = [0u8; 8];
    read_exact_at(r, at, &mut b, what)?;
    Ok(u64::from_le_bytes(b))
}

/// Parses and checks a whole stream (seeking over `w` data, which is not read), to its `e`
/// and the end of the input.
pub fn parse<R: Read + Seek>(input: &mut R) -> Result<Parsed, RbdDiffError> {
    let total = input.seek(SeekFrom::End(0))?;
    input.seek(SeekFrom::Start(0))?;
    let mut banner = [0u8; 12];
    let mut at = 0u64;
    match read_exact_at(input, &mut at, &mut banner, "the banner") {
        Err(RbdDiffError::Truncated { .. }) => return Err(RbdDiffError::Banner),
        other => other?,
    }
    if &banner != BANNER {
        return Err(RbdDiffError::Banner);
    }
    let mut header = Header::default();
    let mut size: Option<u64> = None;
    let mut data_seen = false;
    let mut records = Vec::new();
    loop {
        let record_at = at;
        let mut tag = [0u8; 1];
        read_exact_at(input, &mut at, &mut tag, "the next record (or 'e')")?;
        let tag = tag[0];
        match tag {
            b'f' | b't' | b's' if data_seen => {
                return Err(RbdDiffError::MetadataAfterData {
                    at: record_at,
                    tag: tag as char,
                })
            }
            b'f' | b't' => {
                let slot = if tag == b'f' {
                    &mut header.from
                } else {
                    &mut header.to
                };
                if slot.is_some() {
                    return Err(RbdDiffError::Duplicate {
                        at: record_at,
                        tag: tag as char,
                    });
                }
                let mut len = [0u8; 4];
                read_exact_at(input, &mut at, &mut len, "a snapshot name's length")?;
                let len = u32::from_le_bytes(len);
                if len > MAX_NAME {
                    return Err(RbdDiffError::NameTooLong { at: record_at, len });
                }
                let mut name = vec![0u8; len as usize];
                read_exact_at(input, &mut at, &mut name, "a snapshot name")?;
                *slot = Some(
                    String::from_utf8(name)
                        .map_err(|_| RbdDiffError::NameNotUtf8 { at: record_at })?,
                );
            }
            b's' => {
                if size.is_some() {
                    return Err(RbdDiffError::Duplicate {
                        at: record_at,
                        tag: 's',
                    });
                }
                size = Some(le64(input, &mut at, "the image size")?);
            }
            b'w' | b'z' => {
                data_seen = true;
                let Some(size) = size else {
                    return Err(RbdDiffError::NoSize { at: record_at });
                };
                let offset = le64(input, &mut at, "a data record's offset")?;
                let len = le64(input, &mut at, "a data record's length")?;
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(RbdDiffError::PastEnd {
                        at: record_at,
                        tag: tag as char,
                        offset,
                        len,
                        size,
                    });
                }
                if tag == b'w' {
                    if total - at < len {
                        return Err(RbdDiffError::Truncated {
                            at: record_at,
                            what: "a 'w' record's data",
                        });
                    }
                    records.push(DataRecord::Write {
                        offset,
                        len,
                        data_pos: at,
                    });
                    at += len;
                    input.seek(SeekFrom::Start(at))?;
                } else {
                    records.push(DataRecord::Zero { offset, len });
                }
            }
            b'e' => {
                let Some(size) = size else {
                    return Err(RbdDiffError::NoSize { at: record_at });
                };
                if total > at {
                    return Err(RbdDiffError::Trailing {
                        at,
                        extra: total - at,
                    });
                }
                header.size = size;
                return Ok(Parsed { header, records });
            }
            other => {
                return Err(RbdDiffError::UnknownTag {
                    at: record_at,
                    tag: other,
                    shown: if other.is_ascii_graphic() {
                        format!("'{}'", other as char)
                    } else {
                        "not a letter".to_string()
                    },
                })
            }
        }
    }
}

/// Splits `data` (device bytes from `offset`) into runs of whole `block`-aligned blocks that
/// are all zero or not: `(offset, len, zero)`, in order, covering `data` exactly.
pub fn zero_runs(offset: u64, data: &[u8], block: u64) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let abs = offset + at as u64;
        let next_boundary = (abs / block + 1) * block;
        let end = (at + (next_boundary - abs) as usize).min(data.len());
        let zero = data[at..end].iter().all(|&b| b == 0);
        let len = (end - at) as u64;
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += len,
            _ => runs.push((abs, len, zero)),
        }
        at = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn stream() -> Vec<u8> {
        let header = Header {
            from: Some("monday".into()),
            to: Some("tuesday".into()),
            size: 1 << 20,
        };
        let mut w = Writer::start(Vec::new(), &header).unwrap();
        w.write(4096, &[7u8; 512]).unwrap();
        w.zero(8192, 4096).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn a_written_stream_is_the_documented_bytes_and_parses_back() {
        let s = stream();
        let mut expect = b"rbd diff v1\n".to_vec();
        expect.extend(b"f\x06\0\0\0monday");
        expect.extend(b"t\x07\0\0\0tuesday");
        expect.extend(b"s\0\0\x10\0\0\0\0\0");
        expect.extend(b"w\0\x10\0\0\0\0\0\0\0\x02\0\0\0\0\0\0");
        expect.extend([7u8; 512]);
        expect.extend(b"z\0\x20\0\0\0\0\0\0\0\x10\0\0\0\0\0\0");
        expect.push(b'e');
        assert_eq!(s, expect);
        let p = parse(&mut Cursor::new(&s)).unwrap();
        assert_eq!(p.header.from.as_deref(), Some("monday"));
        assert_eq!(p.header.size, 1 << 20);
        assert_eq!(p.totals(), (512, 4096));
    }

    #[test]
    fn every_cut_of_a_stream_is_refused() {
        let s = stream();
        for cut in 0..s.len() {
            let err = parse(&mut Cursor::new(&s[..cut])).unwrap_err();
            assert!(
                matches!(err, RbdDiffError::Truncated { .. } | RbdDiffError::Banner),
                "cut at {cut}: {err}"
            );
        }
        let mut long = s.clone();
        long.push(0);
        assert!(matches!(
            parse(&mut Cursor::new(&long)),
            Err(RbdDiffError::Trailing { .. })
        ));
    }

    #[test]
    fn zero_runs_follow_block_boundaries() {
        let mut d = vec![0u8; 10_000];
        d[5000] = 1;
        // Device offset 100: blocks end at 4096, 8192; data covers 100..10100.
        assert_eq!(
            zero_runs(100, &d, 4096),
            vec![(100, 3996, true), (4096, 4096, false), (8192, 1908, true)]
        );
    }
}
