//! Picks the decompressor for a layer blob and counts the bytes it produces, so a
//! decompression bomb is cut off at the configured limit instead of filling the disk.

use std::cell::Cell;
use std::io::{self, BufReader, Chain, Cursor, Read};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// What the media type declares; `None` when it declares plain tar or is unknown, in
    /// which case the magic bytes decide (some registries and tools mislabel layers).
    fn declared_by(media_type: &str) -> Option<Compression> {
        // Covers the OCI (`...tar+gzip`, nondistributable variants included) and Docker
        // (`...diff.tar.gzip`, `...foreign.diff.tar.gzip`) spellings.
        let media_type = media_type.split(';').next().unwrap_or("").trim();
        if media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip") {
            Some(Compression::Gzip)
        } else if media_type.ends_with("+zstd") || media_type.ends_with(".tar.zstd") {
            Some(Compression::Zstd)
        } else {
            None
        }
    }

    fn sniff(prefix: &[u8]) -> Compression {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Buffer between the (often network- or disk-backed) blob reader and the decompressor.
/// Large enough that the decompressor rarely waits on small reads.
const INPUT_BUFFER: usize = 256 * 1024;

type Prefixed<R> = BufReader<Chain<Cursor<[u8; 4]>, R>>;

/// The decompressed tar stream of one layer.
pub(crate) enum Decoded<'a, R: Read> {
    Plain(Prefixed<R>),
    Gzip(Box<flate2::bufread::MultiGzDecoder<Prefixed<R>>>),
    Zstd(Box<zstd::stream::read::Decoder<'a, Prefixed<R>>>),
}

impl<R: Read> Read for Decoded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
            Decoded::Zstd(r) => r.read(buf),
        }
    }
}

/// Opens the decompressor the media type asks for, or the one the magic bytes show when
/// the media type says plain tar or is unknown.
pub(crate) fn open<'a, R: Read>(
    mut blob: R,
    media_type: &str,
) -> io::Result<(Decoded<'a, R>, Compression)> {
    // Read the magic without a BufReader peek: `fill_buf` may legally return a single byte.
    let mut prefix = [0u8; 4];
    let mut have = 0;
    while have < prefix.len() {
        match blob.read(&mut prefix[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let compression =
        Compression::declared_by(media_type).unwrap_or_else(|| Compression::sniff(&prefix[..have]));
    // Put the sniffed bytes back in front of the stream. They sit at the end of a padded
    // array and the cursor starts past the padding, so no zero byte reaches the decoder.
    let mut padded = [0u8; 4];
    padded[4 - have..].copy_from_slice(&prefix[..have]);
    let mut cursor = Cursor::new(padded);
    cursor.set_position((4 - have) as u64);
    let input = BufReader::with_capacity(INPUT_BUFFER, cursor.chain(blob));
    let decoded = match compression {
        Compression::None => Decoded::Plain(input),
        Compression::Gzip => Decoded::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(input))),
        Compression::Zstd => {
            Decoded::Zstd(Box::new(zstd::stream::read::Decoder::with_buffer(input)?))
        }
    };
    Ok((decoded, compression))
}

/// Chunks in flight between the decoding thread and the tar reader: enough to ride out
/// bursts of small files on the writing side, small enough to bound memory (8 MiB).
const PIPE_CHUNKS: usize = 8;
const PIPE_CHUNK: usize = 1 << 20;

/// The decompressed stream of a layer, produced by a thread of its own.
pub(crate) type BackgroundDecoded =
    banger_io::chunks::ChunkReader<Box<dyn FnMut() -> io::Result<Option<Vec<u8>>> + Send>>;

/// Starts decoding `blob` on a new thread (compression chosen as in [`open`]). Dropping the
/// returned reader stops the thread at its next chunk.
pub(crate) fn decode_in_background<R: Read + Send + 'static>(
    blob: R,
    media_type: &str,
    mut tee: Option<crate::cache::BlobWriter>,
) -> BackgroundDecoded {
    let (sender, chunks) = std::sync::mpsc::sync_channel(PIPE_CHUNKS);
    let media_type = media_type.to_owned();
    std::thread::spawn(move || {
        let (mut decoded, compression) = match open(blob, &media_type) {
            Ok(opened) => opened,
            Err(e) => {
                let _ = sender.send(Err(e));
                return;
            }
        };
        loop {
            let mut chunk = vec![0u8; PIPE_CHUNK];
            let mut filled = 0;
            // Fill whole chunks: decoders return small pieces, channel hops are not free.
            let result = loop {
                match decoded.read(&mut chunk[filled..]) {
                    Ok(0) => break Ok(true),
                    Ok(n) => {
                        filled += n;
                        if filled == chunk.len() {
                            break Ok(false);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            chunk.truncate(filled);
            let end = match result {
                Ok(end) => end,
                Err(e) => {
                    let _ = sender.send(Ok(chunk));
                    let wrapped =
                        io::Error::new(e.kind(), format!("{} stream: {e}", compression.name()));
                    let _ = sender.send(Err(wrapped));
                    return;
                }
            };
            if let Some(writer) = tee.as_mut() {
                // The copy is an optimisation: if it cannot be written, just stop making it.
                if std::io::Write::write_all(writer, &chunk).is_err() {
                    tee = None;
                }
            }
            if !chunk.is_empty() && sender.send(Ok(chunk)).is_err() {
                return;
            }
            if end {
                if let Some(writer) = tee.take() {
                    // Verified against the digest it was opened for; a lying diff_id in
                    // the image config just means no copy.
                    if let Err(e) = writer.commit() {
                        tracing::warn!(error = %e, "not caching the uncompressed layer");
                    }
                }
                return;
            }
        }
    });
    // The thread ends by dropping its sender after the last chunk.
    banger_io::chunks::ChunkReader::new(Box::new(move || chunks.recv().ok().transpose()))
}

/// Counts decompressed bytes against what is left of the image's budget and fails the
/// read that would exceed it. `exceeded` lets the caller tell this failure apart from a
/// corrupt stream after the tar parser has wrapped the error.
pub(crate) struct Budgeted<'c, R> {
    pub(crate) inner: R,
    pub(crate) remaining: u64,
    pub(crate) consumed: &'c Cell<u64>,
    pub(crate) exceeded: &'c Cell<bool>,
}

impl<R: Read> Read for Budgeted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let n64 = n as u64;
        if n64 > self.remaining {
            self.exceeded.set(true);
            return Err(io::Error::other("uncompressed size limit exceeded"));
        }
        self.remaining -= n64;
        self.consumed.set(self.consumed.get() + n64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compression() {
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        assert_eq!(Compression::declared_by(gz), Some(Compression::Gzip));
        let docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(Compression::declared_by(docker), Some(Compression::Gzip));
        let zst = "application/vnd.oci.image.layer.v1.tar+zstd";
        assert_eq!(Compression::declared_by(zst), Some(Compression::Zstd));
        assert_eq!(
            Compression::declared_by("application/vnd.oci.image.layer.v1.tar"),
            None
        );
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"usr/"), Compression::None);
        assert_eq!(Compression::sniff(b""), Compression::None);
    }

    #[test]
    fn sniffing_keeps_every_byte_of_short_and_long_streams() {
        for input in [&b""[..], b"a", b"abc", b"abcd", b"abcdefgh"] {
            let (mut decoded, c) = open(input, "").unwrap();
            assert_eq!(c, Compression::None);
            let mut out = Vec::new();
            decoded.read_to_end(&mut out).unwrap();
            assert_eq!(out, input);
        }
    }
}
