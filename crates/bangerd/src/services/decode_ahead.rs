//! Decompressing later layers ahead of the flattener, on a thread of their own.
//!
//! Decompression is most of a cold build and layers must be applied in order, so while the
//! flattener works through layer 1 a second thread inflates layers 2, 3, … into their
//! uncompressed cache copies (keyed by diff_id). The flattener does not wait for a copy to
//! be complete: it follows the copy as it grows, so applying a layer overlaps with the end
//! of its decompression instead of starting after it.
//!
//! A copy only ever holds the decompression of a blob whose digest was verified when it
//! entered the cache, so following it before its own diff_id is checked reads nothing that
//! was not verified; a diff_id mismatch (a config that lies) just means no cached copy.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

use banger_oci::cache::BlobWriter;
use banger_oci::flatten::FlattenOptions;
use banger_oci::{BlobCache, Digest};

/// How far a copy has got.
#[derive(Default)]
struct Progress {
    /// The copy, readable up to `available`, once its decoding started.
    file: Option<Arc<File>>,
    /// Bytes flushed to the copy, safe to read.
    available: u64,
    /// `Some(Ok)` once every byte is in, `Some(Err)` if decoding stopped short.
    end: Option<Result<(), String>>,
}

/// One layer's copy in the making.
#[derive(Default)]
pub struct GrowingCopy {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl GrowingCopy {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut progress);
        self.changed.notify_all();
    }

    /// A reader of the whole uncompressed layer that waits for bytes not decoded yet, or
    /// `None` when decoding failed before producing anything (read the compressed blob
    /// instead: its errors are the ones to report).
    pub fn reader(self: &Arc<Self>) -> Option<FollowingReader> {
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        // Wait for the first bytes (or the end): only then is it known whether decoding
        // gets anywhere at all.
        loop {
            match &progress.end {
                _ if progress.available > 0 => break,
                Some(Ok(())) => break,
                Some(Err(_)) => return None,
                None => {
                    progress = self
                        .changed
                        .wait(progress)
                        .unwrap_or_else(|p| p.into_inner())
                }
            }
        }
        progress.file.clone().map(|file| FollowingReader {
            copy: Arc::clone(self),
            file,
            offset: 0,
        })
    }
}

/// Reads a [`GrowingCopy`] from the start, blocking until more is decoded.
pub struct FollowingReader {
    copy: Arc<GrowingCopy>,
    file: Arc<File>,
    offset: u64,
}

impl Read for FollowingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = {
            let mut progress = self.copy.progress.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if progress.available > self.offset {
                    break progress.available;
                }
                match &progress.end {
                    Some(Ok(())) => return Ok(0),
                    Some(Err(message)) => return Err(io::Error::other(message.clone())),
                    None => {
                        progress = self
                            .copy
                            .changed
                            .wait(progress)
                            .unwrap_or_else(|p| p.into_inner())
                    }
                }
            }
        };
        let want = buf.len().min((available - self.offset) as usize);
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the uncompressed layer copy ended before its decoded length",
            ));
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// A layer to decode ahead: its blob, media type and diff_id.
pub struct Job {
    /// The compressed blob (in the cache).
    pub digest: Digest,
    /// Its media type (selects the decompressor).
    pub media_type: String,
    /// The uncompressed copy to make.
    pub diff_id: Digest,
}

/// Starts one thread that decodes `jobs` in order; returns their copies, in the same order.
pub fn start(cache: &Arc<BlobCache>, jobs: Vec<Job>) -> Vec<Arc<GrowingCopy>> {
    let copies: Vec<Arc<GrowingCopy>> = jobs.iter().map(|_| Arc::default()).collect();
    if jobs.is_empty() {
        return copies;
    }
    let cache = Arc::clone(cache);
    let handed = copies.clone();
    let _ = crate::span::spawn_thread("decode-ahead", move || {
        let limit = FlattenOptions::default().limits.max_uncompressed_bytes;
        for (job, copy) in jobs.into_iter().zip(handed) {
            // A reader waits for the end of its copy: a panic must still end it.
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                decode(&cache, &job, &copy, limit)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("decoding thread panicked")));
            if let Err(e) = &decoded {
                tracing::debug!(layer = %job.digest, error = %format!("{e:#}"), "no uncompressed copy decoded ahead");
            }
            copy.update(|p| {
                if p.end.is_none() {
                    p.end = Some(decoded.map_err(|e| format!("{e:#}")));
                }
            });
        }
    });
    copies
}

fn decode(
    cache: &Arc<BlobCache>,
    job: &Job,
    copy: &Arc<GrowingCopy>,
    limit: u64,
) -> anyhow::Result<()> {
    let blob = io::BufReader::with_capacity(1 << 20, cache.open(&job.digest)?);
    let writer = cache.writer(&job.diff_id, None)?;
    let file = Arc::new(writer.read_handle()?);
    copy.update(|p| p.file = Some(file));
    let mut publishing = Publishing {
        writer,
        copy,
        unpublished: 0,
    };
    banger_oci::flatten::decompress_layer(blob, &job.media_type, &mut publishing, limit)?;
    publishing.publish()?;
    // Every byte is in: readers may finish before the copy is checked against its
    // diff_id, which only decides whether it is kept.
    copy.update(|p| p.end = Some(Ok(())));
    publishing.writer.commit()?;
    Ok(())
}

/// Writes to the copy and tells readers about it every MiB.
struct Publishing<'a> {
    writer: BlobWriter,
    copy: &'a GrowingCopy,
    unpublished: usize,
}

impl Publishing<'_> {
    fn publish(&mut self) -> io::Result<()> {
        self.writer.flush()?;
        let written = self.writer.written();
        self.copy.update(|p| p.available = written);
        self.unpublished = 0;
        Ok(())
    }
}

impl Write for Publishing<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.writer.write(buf)?;
        self.unpublished += n;
        if self.unpublished >= 1 << 20 {
            self.publish()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.publish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn cached(cache: &Arc<BlobCache>, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let mut w = cache.writer(&digest, None).unwrap();
        w.write_all(bytes).unwrap();
        w.commit().unwrap();
        digest
    }

    #[test]
    fn readers_follow_copies_to_the_end_and_the_copies_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(tmp.path().join("oci"));
        // Several MiB each, so readers catch up with the decoder and wait on it.
        let layers: Vec<Vec<u8>> = (0..2u8)
            .map(|n| (0..6 << 20).map(|i| (i % 253) as u8 ^ n).collect())
            .collect();
        let jobs = layers
            .iter()
            .map(|plain| Job {
                digest: cached(&cache, &gzip(plain)),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Digest::of(plain),
            })
            .collect();
        let copies = start(&cache, jobs);
        for (copy, plain) in copies.iter().zip(&layers) {
            let mut read = Vec::new();
            copy.reader().unwrap().read_to_end(&mut read).unwrap();
            assert!(read == *plain, "followed bytes equal the layer");
        }
        // The commit follows the readers' end: wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !layers.iter().all(|l| cache.contains(&Digest::of(l))) {
            assert!(std::time::Instant::now() < deadline, "copies not committed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_corrupt_blob_gives_no_reader_or_a_reader_that_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(tmp.path().join("oci"));
        let plain: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let mut broken = gzip(&plain);
        let at = broken.len() / 2;
        broken.truncate(at);
        let jobs = vec![
            Job {
                digest: cached(&cache, b"\x1f\x8b\x08\x00 gzip magic, then garbage"),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Digest::of(b"x"),
            },
            Job {
                digest: cached(&cache, &broken),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Digest::of(&plain),
            },
        ];
        let copies = start(&cache, jobs);
        assert!(
            copies[0].reader().is_none(),
            "nothing decoded: read the blob instead"
        );
        if let Some(mut reader) = copies[1].reader() {
            let err = reader.read_to_end(&mut Vec::new()).unwrap_err();
            assert!(!err.to_string().is_empty());
        }
        assert!(
            !cache.contains(&Digest::of(&plain)),
            "no copy of a truncated layer"
        );
    }
}
