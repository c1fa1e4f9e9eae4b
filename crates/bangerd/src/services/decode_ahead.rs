//! Decompressing later layers ahead of the flattener, on a thread of their own.
//!
//! Decompression is most of a cold build and layers must be applied in order, so while the
//! flattener works through layer 1 a second thread inflates layers 2, 3, … into their
//! uncompressed cache copies (keyed by diff_id). The flattener does not wait for a copy to
//! be complete: it follows the copy as it grows, so applying a layer overlaps with the end
//! of its decompression instead of starting after it.
//!
//! A copy only ever holds the decompression of a blob whose digest was verified when it
//! entered the cache. Its hash is checked against the image's diff_id before a reader is
//! told it ended: a config that lies about a diff_id makes the reader fail, and with it the
//! image, instead of passing off content the config does not describe.
//!
//! The decoder stops as soon as the build it works for ends ([`DecodeAhead`] dropped),
//! and never decodes more than the image may unpack to.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use banger_oci::cache::BlobWriter;
use banger_oci::{BlobCache, Digest};

/// A layer whose uncompressed content is not what the image config says it is.
#[derive(Debug, thiserror::Error)]
#[error(
    "layer {layer}: its uncompressed content hashes to {actual}, but the image config names \
     diff_id {expected}; refusing the image"
)]
pub struct DiffIdMismatch {
    /// The layer (compressed digest).
    pub layer: Digest,
    /// The config's diff_id.
    pub expected: Digest,
    /// What the decompressed layer hashes to.
    pub actual: Digest,
}

/// The error for a layer that does not decompress to its diff_id.
pub fn diff_id_mismatch(layer: &Digest, expected: &Digest, actual: &Digest) -> DiffIdMismatch {
    DiffIdMismatch {
        layer: layer.clone(),
        expected: expected.clone(),
        actual: actual.clone(),
    }
}

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
    /// What the image config says the copy hashes to.
    pub diff_id: Digest,
}

/// How much decoding ahead may produce.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Bytes decoded over all jobs: what the image may unpack to in all.
    pub decoded: u64,
    /// The biggest copy kept in the cache once its layer is applied.
    pub kept: u64,
}

/// The copies being decoded for one build. Dropping it stops the decoder at its next write.
pub struct DecodeAhead {
    copies: Vec<Option<Arc<GrowingCopy>>>,
    stop: Arc<AtomicBool>,
}

impl DecodeAhead {
    /// The copy of layer `index`, if it is being decoded ahead (once).
    pub fn take(&mut self, index: usize) -> Option<Arc<GrowingCopy>> {
        self.copies.get_mut(index).and_then(Option::take)
    }
}

impl Drop for DecodeAhead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts one thread that decodes the jobs in order (`None`: a layer not decoded ahead).
pub fn start(cache: &Arc<BlobCache>, jobs: Vec<Option<Job>>, caps: Caps) -> DecodeAhead {
    let copies: Vec<Option<Arc<GrowingCopy>>> = jobs
        .iter()
        .map(|job| job.as_ref().map(|_| Arc::default()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let work: Vec<(Job, Arc<GrowingCopy>)> = jobs
        .into_iter()
        .zip(&copies)
        .filter_map(|(job, copy)| Some((job?, Arc::clone(copy.as_ref()?))))
        .collect();
    let ahead = DecodeAhead {
        copies,
        stop: Arc::clone(&stop),
    };
    if work.is_empty() {
        return ahead;
    }
    let cache = Arc::clone(cache);
    let _ = crate::span::spawn_thread("decode-ahead", move || {
        let mut budget = caps.decoded;
        for (job, copy) in work {
            // A reader waits for the end of its copy: a panic must still end it.
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if stop.load(Ordering::Relaxed) {
                    anyhow::bail!("the build ended");
                }
                decode(&cache, &job, &copy, &stop, budget, caps.kept)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("decoding thread panicked")));
            let produced = match &decoded {
                Ok(bytes) => *bytes,
                Err(e) => {
                    tracing::debug!(layer = %job.digest, error = %format!("{e:#}"), "no uncompressed copy decoded ahead");
                    0
                }
            };
            budget = budget.saturating_sub(produced);
            copy.update(|p| {
                if p.end.is_none() {
                    p.end = Some(decoded.map(drop).map_err(|e| format!("{e:#}")));
                }
            });
        }
    });
    ahead
}

/// Decodes one layer into its copy; returns the bytes decoded.
fn decode(
    cache: &Arc<BlobCache>,
    job: &Job,
    copy: &Arc<GrowingCopy>,
    stop: &AtomicBool,
    limit: u64,
    kept: u64,
) -> anyhow::Result<u64> {
    let blob = io::BufReader::with_capacity(1 << 20, cache.open(&job.digest)?);
    let seen = Arc::new(std::sync::OnceLock::new());
    // The copy's own cap is the image's: its reader needs every byte, and past the image's
    // limit the build fails anyway. Whether it is kept afterwards is `kept`'s call.
    let writer = cache.uncompressed_writer(
        &job.digest,
        Some(&job.diff_id),
        limit.saturating_add(1 << 20),
        seen,
    );
    let file = Arc::new(writer.read_handle()?);
    copy.update(|p| p.file = Some(file));
    let mut publishing = Publishing {
        writer,
        copy,
        stop,
        unpublished: 0,
    };
    let bytes =
        banger_oci::flatten::decompress_layer(blob, &job.media_type, &mut publishing, limit)?;
    publishing.publish()?;
    // Every byte is in. Readers are told the copy ended only once it hashed to the
    // diff_id: a lying config fails the build here.
    let actual = publishing.writer.digest_so_far();
    if actual != job.diff_id {
        anyhow::bail!(diff_id_mismatch(&job.digest, &job.diff_id, &actual));
    }
    copy.update(|p| p.end = Some(Ok(())));
    if bytes <= kept {
        publishing.writer.commit()?;
    }
    Ok(bytes)
}

/// Writes to the copy and tells readers about it every MiB.
struct Publishing<'a> {
    writer: BlobWriter,
    copy: &'a GrowingCopy,
    stop: &'a AtomicBool,
    unpublished: usize,
}

impl Publishing<'_> {
    fn publish(&mut self) -> io::Result<()> {
        self.writer.flush()?;
        if !self.writer.is_complete() {
            // The disk filled: the reader cannot follow a copy with holes.
            return Err(io::Error::other(
                "the uncompressed layer copy could not be written to the cache (disk full?)",
            ));
        }
        let written = self.writer.written();
        self.copy.update(|p| p.available = written);
        self.unpublished = 0;
        Ok(())
    }
}

impl Write for Publishing<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            // Not `Interrupted`: `io::copy` retries those.
            return Err(io::Error::other("decoding ahead stopped: the build ended"));
        }
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

    /// Polls `done` until it holds, failing the test naming `what` after `seconds`: the
    /// decoder and the commit run on threads of their own.
    fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "waited for {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

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

    const CAPS: Caps = Caps {
        decoded: 1 << 30,
        kept: 1 << 30,
    };

    #[test]
    fn a_copy_that_does_not_hash_to_its_diff_id_fails_its_reader_and_is_not_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(tmp.path().join("oci"));
        let plain: Vec<u8> = (0..3 << 20).map(|i| (i % 241) as u8).collect();
        let claimed = Digest::of(b"another image's layer");
        let blob = cached(&cache, &gzip(&plain));
        let jobs = vec![Some(Job {
            digest: blob.clone(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: claimed.clone(),
        })];
        let mut ahead = start(&cache, jobs, CAPS);
        let mut reader = ahead.take(0).unwrap().reader().unwrap();
        let err = reader.read_to_end(&mut Vec::new()).unwrap_err().to_string();
        assert!(
            err.contains(&blob.to_string()) && err.contains(&claimed.to_string()),
            "{err}"
        );
        assert!(!cache.contains(&claimed) && !cache.contains(&Digest::of(&plain)));
        assert_eq!(cache.uncompressed_of(&blob), None);
    }

    #[test]
    fn dropping_the_build_stops_the_decoder() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(tmp.path().join("oci"));
        // A small blob that decodes to 1 GiB: the same gzip member 1024 times.
        let member = gzip(&vec![0u8; 1 << 20]);
        let blob: Vec<u8> = member
            .iter()
            .copied()
            .cycle()
            .take(member.len() * 1024)
            .collect();
        let decoded_len = 1u64 << 30;
        let jobs = vec![Some(Job {
            digest: cached(&cache, &blob),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: Digest::of(b"never reached"),
        })];
        let mut ahead = start(&cache, jobs, CAPS);
        let copy = ahead.take(0).unwrap();
        drop(ahead);
        wait_until("the decoder stops", 30, || {
            let progress = copy.progress.lock().unwrap();
            let Some(end) = &progress.end else {
                return false;
            };
            assert!(end.is_err(), "stopped, not finished");
            assert!(progress.available < decoded_len);
            true
        });
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
            .map(|plain| {
                Some(Job {
                    digest: cached(&cache, &gzip(plain)),
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    diff_id: Digest::of(plain),
                })
            })
            .collect();
        let mut ahead = start(&cache, jobs, CAPS);
        for (index, plain) in layers.iter().enumerate() {
            let mut read = Vec::new();
            let copy = ahead.take(index).unwrap();
            copy.reader().unwrap().read_to_end(&mut read).unwrap();
            assert!(read == *plain, "followed bytes equal the layer");
        }
        // The commit follows the readers' end: wait for it.
        wait_until("the copies are committed", 10, || {
            layers.iter().all(|l| cache.contains(&Digest::of(l)))
        });
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
            Some(Job {
                digest: cached(&cache, b"\x1f\x8b\x08\x00 gzip magic, then garbage"),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Digest::of(b"x"),
            }),
            Some(Job {
                digest: cached(&cache, &broken),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Digest::of(&plain),
            }),
        ];
        let mut ahead = start(&cache, jobs, CAPS);
        assert!(
            ahead.take(0).unwrap().reader().is_none(),
            "nothing decoded: read the blob instead"
        );
        if let Some(mut reader) = ahead.take(1).unwrap().reader() {
            let err = reader.read_to_end(&mut Vec::new()).unwrap_err();
            assert!(!err.to_string().is_empty());
        }
        assert!(
            !cache.contains(&Digest::of(&plain)),
            "no copy of a truncated layer"
        );
    }
}
