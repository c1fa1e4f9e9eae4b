//! Reads a tar stream member by member, with the extension headers (PAX `x`, GNU long
//! names `L`/`K`, sparse maps) handled here rather than by the `tar` crate: it reads an
//! extension header whole whatever size it declares (one 2 GiB long-name header is 2 GiB of
//! RAM) and splits PAX records on newlines, although records are length-prefixed and a
//! value (a file capability, a path) may hold a newline byte. The `tar` crate still decodes
//! each 512-byte header's fields (octal and base-256 numbers, ustar prefixes).

use std::io::{self, Read};

use super::error::EntryProblem;

/// The most bytes one extension header (PAX records, a GNU long name or link, a sparse map)
/// may declare. Such headers are buffered whole before the member they describe; real ones
/// are a few hundred bytes (a path is at most `PATH_MAX`, 4 KiB; xattrs a few KiB).
pub const MAX_EXTENSION_HEADER_BYTES: u64 = 1 << 20;

const BLOCK: u64 = 512;

/// One PAX record: key and value, as bytes.
pub(crate) type PaxRecord = (Vec<u8>, Vec<u8>);

/// A regular file stored sparse: only `map`'s (offset, length) segments are in the archive,
/// back to back; the rest of its `real_size` bytes are zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sparse {
    pub real_size: u64,
    pub map: Vec<(u64, u64)>,
}

/// One archive member with its extension headers applied.
pub(crate) struct Member {
    /// The member's own 512-byte header.
    pub header: tar::Header,
    /// Its path: PAX `path`, `GNU.sparse.name`, a GNU long name or the header's.
    pub path: Vec<u8>,
    /// Its link target: PAX `linkpath`, a GNU long link or the header's.
    pub link: Vec<u8>,
    /// The PAX records that describe it, in order (global headers are not applied).
    pub pax: Vec<PaxRecord>,
    /// Data bytes that follow in the archive (a sparse file's segments, its map excluded).
    pub size: u64,
    pub sparse: Option<Sparse>,
}

/// Why the stream could not be read further.
pub(crate) enum TarError {
    /// Reading or decoding the stream failed (truncated, corrupt, over a size budget).
    Stream(io::Error),
    /// A header was refused; `path` is the member (or extension header) it belongs to.
    Entry {
        path: Vec<u8>,
        problem: EntryProblem,
    },
}

impl From<io::Error> for TarError {
    fn from(e: io::Error) -> Self {
        TarError::Stream(e)
    }
}

fn bad(path: &[u8], why: impl Into<String>) -> TarError {
    TarError::Entry {
        path: path.to_vec(),
        problem: EntryProblem::BadHeader(why.into()),
    }
}

pub(crate) struct TarReader<R> {
    inner: R,
    /// Data bytes of the current member not read yet.
    remaining: u64,
    /// Padding after the current member's data.
    padding: u64,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> TarReader<R> {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            done: false,
        }
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the current member's data; 0 at its end.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.remaining) as usize;
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "archive ends inside a member's data",
                    ))
                }
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Reads exactly `buf.len()` bytes of the current member's data.
    pub(crate) fn read_data_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read_data(buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "member data shorter than its header says",
                ));
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn skip_rest(&mut self) -> io::Result<()> {
        let n = self.remaining + self.padding;
        if n > 0 {
            let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
            if copied < n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "archive ends inside a member",
                ));
            }
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    fn start_data(&mut self, size: u64) {
        self.remaining = size;
        self.padding = size.next_multiple_of(BLOCK) - size;
    }

    /// Reads one 512-byte block; `None` at a clean end of stream.
    fn block(&mut self) -> io::Result<Option<[u8; 512]>> {
        let mut block = [0u8; 512];
        let mut got = 0;
        while got < 512 {
            match self.inner.read(&mut block[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "archive ends inside a header",
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Some(block))
    }

    /// The current (extension) member's data, refused before it is read when it and the
    /// `already` buffered bytes of extension headers for the same member declare more than
    /// [`MAX_EXTENSION_HEADER_BYTES`].
    fn small_data(
        &mut self,
        what: &'static str,
        path: &[u8],
        size: u64,
        already: u64,
    ) -> Result<Vec<u8>, TarError> {
        if size.saturating_add(already) > MAX_EXTENSION_HEADER_BYTES {
            return Err(TarError::Entry {
                path: path.to_vec(),
                problem: EntryProblem::ExtensionTooLarge {
                    what,
                    size: size.saturating_add(already),
                    limit: MAX_EXTENSION_HEADER_BYTES,
                },
            });
        }
        self.start_data(size);
        let mut data = vec![0u8; size as usize];
        self.read_data_exact(&mut data)?;
        Ok(data)
    }

    /// The next member, its extension headers applied; `None` after the end-of-archive
    /// block (or a clean end of stream).
    pub(crate) fn next(&mut self) -> Result<Option<Member>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut pax: Vec<PaxRecord> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            self.skip_rest()?;
            let Some(bytes) = self.block()? else {
                if !pax.is_empty() || long_name.is_some() || long_link.is_some() {
                    return Err(TarError::Stream(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "extension headers at the end of the archive describe no member",
                    )));
                }
                self.done = true;
                return Ok(None);
            };
            if bytes.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            let mut header = tar::Header::new_old();
            header.as_mut_bytes().copy_from_slice(&bytes);
            let sum: u32 = bytes[..148]
                .iter()
                .chain(&bytes[156..])
                .map(|&b| u32::from(b))
                .sum::<u32>()
                + 8 * 32;
            if header.cksum()? != sum {
                return Err(TarError::Stream(io::Error::other(
                    "archive header checksum mismatch",
                )));
            }
            let own_path = header.path_bytes().into_owned();
            let size = header.entry_size()?;
            let kind = header.entry_type();
            match kind {
                tar::EntryType::XHeader => {
                    // Several PAX headers before one member add up: the limit is on their
                    // sum, or a run of them would be buffered without bound.
                    let before: u64 = pax.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
                    let data = self.small_data("PAX extended header", &own_path, size, before)?;
                    pax.extend(parse_pax(&data).map_err(|why| bad(&own_path, why))?);
                    continue;
                }
                tar::EntryType::XGlobalHeader => {
                    // Global records are not applied (no image tool writes them); skipped
                    // without being buffered.
                    self.start_data(size);
                    continue;
                }
                tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                    let mut data = self.small_data("GNU long name header", &own_path, size, 0)?;
                    while data.last() == Some(&0) {
                        data.pop();
                    }
                    if kind == tar::EntryType::GNULongName {
                        long_name = Some(data);
                    } else {
                        long_link = Some(data);
                    }
                    continue;
                }
                _ => {}
            }
            let get = |key: &[u8]| {
                pax.iter()
                    .rev()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_slice())
            };
            let mut path = get(b"path")
                .map(<[u8]>::to_vec)
                .or(long_name.take())
                .unwrap_or(own_path);
            let link = get(b"linkpath")
                .map(<[u8]>::to_vec)
                .or(long_link.take())
                .or_else(|| header.link_name_bytes().map(|l| l.into_owned()))
                .unwrap_or_default();
            let mut size = match get(b"size") {
                Some(v) => parse_u64(v).ok_or_else(|| bad(&path, "malformed pax size"))?,
                None => size,
            };
            let mut sparse = None;
            if let Some(name) = get(b"GNU.sparse.name") {
                path = name.to_vec();
            }
            let num = |key: &[u8], path: &[u8]| -> Result<Option<u64>, TarError> {
                match get(key) {
                    Some(v) => parse_u64(v).map(Some).ok_or_else(|| {
                        bad(path, format!("malformed {}", String::from_utf8_lossy(key)))
                    }),
                    None => Ok(None),
                }
            };
            let major = num(b"GNU.sparse.major", &path)?;
            let minor = num(b"GNU.sparse.minor", &path)?;
            let map_in_data = major == Some(1) && minor == Some(0);
            if map_in_data {
                // Format 1.0: the map leads the data, as decimal lines padded to a block.
                let real_size = num(b"GNU.sparse.realsize", &path)?
                    .ok_or_else(|| bad(&path, "sparse 1.0 member without GNU.sparse.realsize"))?;
                self.start_data(size);
                let (map, used) = self.sparse_map_1_0(&path)?;
                size -= used;
                sparse = Some(Sparse { real_size, map });
            } else if let Some(map) = get(b"GNU.sparse.map") {
                let real_size = num(b"GNU.sparse.size", &path)?
                    .ok_or_else(|| bad(&path, "sparse 0.1 member without GNU.sparse.size"))?;
                let numbers: Option<Vec<u64>> = map
                    .split(|&b| b == b',')
                    .filter(|s| !s.is_empty())
                    .map(parse_u64)
                    .collect();
                let numbers = numbers.ok_or_else(|| bad(&path, "malformed GNU.sparse.map"))?;
                sparse = Some(Sparse {
                    real_size,
                    map: pairs(&numbers).ok_or_else(|| bad(&path, "odd GNU.sparse.map"))?,
                });
            } else if get(b"GNU.sparse.offset").is_some() {
                // Format 0.0: repeated offset/numbytes records, in order.
                let real_size = num(b"GNU.sparse.size", &path)?
                    .ok_or_else(|| bad(&path, "sparse 0.0 member without GNU.sparse.size"))?;
                let mut numbers = Vec::new();
                for (k, v) in &pax {
                    if k == b"GNU.sparse.offset" || k == b"GNU.sparse.numbytes" {
                        numbers.push(
                            parse_u64(v)
                                .ok_or_else(|| bad(&path, "malformed GNU.sparse.offset"))?,
                        );
                    }
                }
                sparse = Some(Sparse {
                    real_size,
                    map: pairs(&numbers).ok_or_else(|| bad(&path, "odd GNU sparse records"))?,
                });
            } else if kind == tar::EntryType::GNUSparse {
                sparse = Some(self.old_gnu_sparse(&header, &path)?);
            }
            if let Some(s) = &sparse {
                check_map(s, size).map_err(|why| bad(&path, why))?;
            }
            if !map_in_data {
                self.start_data(size);
            } else {
                // The map was read already; what is left is the data.
                self.remaining = size;
            }
            return Ok(Some(Member {
                header,
                path,
                link,
                pax,
                size,
                sparse,
            }));
        }
    }

    /// Reads a sparse 1.0 map from the start of the member's data; returns it and the bytes
    /// it took (whole 512-byte blocks).
    fn sparse_map_1_0(&mut self, path: &[u8]) -> Result<(Vec<(u64, u64)>, u64), TarError> {
        let mut text = Vec::new();
        let mut numbers: Vec<u64> = Vec::new();
        let mut count: Option<u64> = None;
        let mut used = 0u64;
        loop {
            if used >= MAX_EXTENSION_HEADER_BYTES {
                return Err(TarError::Entry {
                    path: path.to_vec(),
                    problem: EntryProblem::ExtensionTooLarge {
                        what: "GNU sparse map",
                        size: used,
                        limit: MAX_EXTENSION_HEADER_BYTES,
                    },
                });
            }
            let mut block = [0u8; 512];
            self.read_data_exact(&mut block)?;
            used += BLOCK;
            for &b in &block {
                if b == b'\n' {
                    let n = parse_u64(&text).ok_or_else(|| bad(path, "malformed sparse map"))?;
                    text.clear();
                    match count {
                        None => count = Some(n),
                        Some(_) => numbers.push(n),
                    }
                    if let Some(c) = count {
                        if numbers.len() as u64 == c.saturating_mul(2) {
                            let map = pairs(&numbers).expect("an even count");
                            return Ok((map, used));
                        }
                    }
                } else {
                    text.push(b);
                    if text.len() > 20 {
                        return Err(bad(path, "malformed sparse map"));
                    }
                }
            }
        }
    }

    /// The old GNU format (`S` members): up to four map entries in the header, more in
    /// extension blocks after it.
    fn old_gnu_sparse(&mut self, header: &tar::Header, path: &[u8]) -> Result<Sparse, TarError> {
        let gnu = header
            .as_gnu()
            .ok_or_else(|| bad(path, "sparse member without a GNU header"))?;
        let mut map = Vec::new();
        let mut add = |s: &tar::GnuSparseHeader| -> Result<(), TarError> {
            if !s.is_empty() {
                map.push((s.offset()?, s.length()?));
            }
            Ok(())
        };
        for s in &gnu.sparse {
            add(s)?;
        }
        let mut extended = gnu.is_extended();
        let mut read = 0u64;
        while extended {
            read += BLOCK;
            if read > MAX_EXTENSION_HEADER_BYTES {
                return Err(TarError::Entry {
                    path: path.to_vec(),
                    problem: EntryProblem::ExtensionTooLarge {
                        what: "GNU sparse map",
                        size: read,
                        limit: MAX_EXTENSION_HEADER_BYTES,
                    },
                });
            }
            let mut ext = tar::GnuExtSparseHeader::new();
            let bytes = self.block()?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "archive ends inside a sparse map",
                )
            })?;
            ext.as_mut_bytes().copy_from_slice(&bytes);
            for s in &ext.sparse {
                add(s)?;
            }
            extended = ext.is_extended();
        }
        Ok(Sparse {
            real_size: gnu.real_size()?,
            map,
        })
    }
}

/// Segments must be in order, apart, inside the file, and add up to the stored data.
fn check_map(s: &Sparse, stored: u64) -> Result<(), String> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in &s.map {
        if off < end {
            return Err("sparse map segments overlap or are out of order".into());
        }
        end = off
            .checked_add(len)
            .filter(|&e| e <= s.real_size)
            .ok_or("sparse map segment past the file's size")?;
        total += len;
    }
    if total != stored {
        return Err(format!(
            "sparse map lists {total} data bytes but the member stores {stored}"
        ));
    }
    Ok(())
}

fn pairs(numbers: &[u64]) -> Option<Vec<(u64, u64)>> {
    if !numbers.len().is_multiple_of(2) {
        return None;
    }
    Some(numbers.chunks(2).map(|c| (c[0], c[1])).collect())
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// PAX records, `LEN KEY=VALUE\n` each, LEN counting the whole record: parsed by length,
/// so values may hold any byte, newlines included.
pub(crate) fn parse_pax(data: &[u8]) -> Result<Vec<PaxRecord>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        // Some writers pad the header's data with NULs.
        if data[at] == 0 {
            break;
        }
        let rest = &data[at..];
        let space = rest
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or_else(|| format!("malformed pax record at byte {at}: no length"))?;
        let len = parse_u64(&rest[..space])
            .ok_or_else(|| format!("malformed pax record at byte {at}: bad length"))?
            as usize;
        if len <= space + 1 || len > rest.len() {
            return Err(format!(
                "malformed pax record at byte {at}: length {len} does not fit"
            ));
        }
        let record = &rest[space + 1..len];
        let Some((b'\n', kv)) = record.split_last() else {
            return Err(format!(
                "malformed pax record at byte {at}: no newline at its declared end"
            ));
        };
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| format!("malformed pax record at byte {at}: no '='"))?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pax_header(records: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("PaxHeaders/x").unwrap();
        h.set_size(records.len() as u64);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(records);
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }

    #[test]
    fn many_pax_headers_for_one_member_count_against_one_limit() {
        // 3 headers of 400 KiB each: every one is under the limit, together they are not.
        let value = vec![b'v'; 400 << 10];
        let mut rec = Vec::new();
        let body = "SCHILY.xattr.user.x=".len() + value.len() + 2;
        let len = body + (body + 7).to_string().len();
        rec.extend_from_slice(format!("{len} SCHILY.xattr.user.x=").as_bytes());
        rec.extend_from_slice(&value);
        rec.push(b'\n');
        assert!(parse_pax(&rec).is_ok());
        let mut stream = Vec::new();
        for _ in 0..3 {
            stream.extend(pax_header(&rec));
        }
        stream.extend_from_slice(&[0u8; 1024]);
        let mut r = TarReader::new(&stream[..]);
        match r.next() {
            Err(TarError::Entry {
                problem: EntryProblem::ExtensionTooLarge { size, limit, .. },
                ..
            }) => assert!(size > limit),
            _ => panic!("three large PAX headers were accepted"),
        }
    }

    #[test]
    fn pax_records_are_split_by_length_not_newlines() {
        let data = b"29 SCHILY.xattr.user.a=x\ny\nz\n10 path=a\n\0\0";
        let recs = parse_pax(data).unwrap();
        assert_eq!(
            recs[0],
            (b"SCHILY.xattr.user.a".to_vec(), b"x\ny\nz".to_vec())
        );
        assert_eq!(recs[1], (b"path".to_vec(), b"a".to_vec()));
        assert!(parse_pax(b"99 path=a\n").is_err());
        assert!(parse_pax(b"9 pathxa\n").is_err());
        assert!(parse_pax(b"x path=a\n").is_err());
    }
}
