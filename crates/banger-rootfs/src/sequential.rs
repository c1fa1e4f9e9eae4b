//! The data area of an image is written strictly front to back (blocks are handed out in
//! order and each is written once, right after it is handed out), so it can go to disk as a
//! stream of large writes on a thread of its own while the tree is still being read.
//!
//! Where the filesystem allows it the writes use `O_DIRECT`: the image is written once and
//! not read back soon, so pushing it through the page cache would only mean a second pass
//! over every byte when the build syncs it. Elsewhere (tmpfs) the same stream uses plain
//! writes.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread::JoinHandle;

const ALIGN: usize = 4096;
/// Bytes per write: large enough that the disk streams, small enough to keep a few in
/// flight without noticeable memory.
const CHUNK: usize = 8 << 20;
/// Buffers in rotation: one being filled, the others queued or being written.
const BUFFERS: usize = 3;

/// A heap buffer whose usable part starts on a 4 KiB boundary, as `O_DIRECT` requires.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let raw = vec![0u8; CHUNK + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + CHUNK]
    }
}

struct Job {
    buf: AlignedBuf,
    offset: u64,
    len: usize,
}

/// Sequential writer for the region of a file from a fixed offset on.
pub(crate) struct SequentialWriter {
    current: AlignedBuf,
    /// File offset of `current[0]` (block aligned).
    base: u64,
    /// Bytes of `current` filled.
    filled: usize,
    jobs: Option<mpsc::SyncSender<Job>>,
    free: mpsc::Receiver<AlignedBuf>,
    worker: Option<JoinHandle<io::Result<()>>>,
    /// Whether writes bypass the page cache.
    direct: bool,
}

impl SequentialWriter {
    /// Starts writing `file` at `offset` (a multiple of 4 KiB).
    pub(crate) fn new(file: &File, offset: u64) -> io::Result<SequentialWriter> {
        let (target, direct) = match reopen_direct(file) {
            Ok(direct) => (direct, true),
            Err(_) => (file.try_clone()?, false),
        };
        let (jobs, queued) = mpsc::sync_channel::<Job>(BUFFERS);
        let (give_back, free) = mpsc::channel();
        for _ in 1..BUFFERS {
            give_back
                .send(AlignedBuf::new())
                .expect("receiver is alive");
        }
        let worker = std::thread::Builder::new()
            .name("ext4-writer".into())
            .spawn(move || -> io::Result<()> {
                for mut job in queued {
                    target.write_all_at(&job.buf.bytes()[..job.len], job.offset)?;
                    // The filler may already be gone after an error elsewhere.
                    let _ = give_back.send(job.buf);
                }
                Ok(())
            })?;
        Ok(SequentialWriter {
            current: AlignedBuf::new(),
            base: offset,
            filled: 0,
            jobs: Some(jobs),
            free,
            worker: Some(worker),
            direct,
        })
    }

    fn end(&self) -> u64 {
        self.base + self.filled as u64
    }

    /// Moves to `offset` (at or after everything written so far), zero-filling the gap.
    fn seek(&mut self, offset: u64) -> io::Result<()> {
        let end = self.end();
        if offset < end {
            return Err(io::Error::other(format!(
                "sequential image write went backwards: offset {offset} after {end}"
            )));
        }
        let mut gap = offset - end;
        while gap > 0 {
            let room = CHUNK - self.filled;
            let n = (gap as usize).min(room);
            let filled = self.filled;
            self.current.bytes()[filled..filled + n].fill(0);
            self.filled += n;
            gap -= n as u64;
            self.flush_if_full()?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub(crate) fn write_at(&mut self, offset: u64, mut data: &[u8]) -> io::Result<()> {
        self.seek(offset)?;
        while !data.is_empty() {
            let n = data.len().min(CHUNK - self.filled);
            let filled = self.filled;
            self.current.bytes()[filled..filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            self.flush_if_full()?;
        }
        Ok(())
    }

    /// Reads `len` bytes of `source` into the image from `offset` (block aligned, at or
    /// after everything written), leaving out every run of at least `min_hole` whole zero
    /// blocks: those become holes. Returns the runs stored, as (first block within the
    /// source, blocks), which lie back to back from `offset`. Makes at most `max_runs`
    /// runs: past that, zeros are stored like data. Data is read straight into the
    /// output buffers; only blocks after a hole in the same buffer are moved.
    pub(crate) fn copy_skipping_zeros(
        &mut self,
        offset: u64,
        source: &mut impl Read,
        len: u64,
        min_hole: u64,
        max_runs: usize,
    ) -> io::Result<Vec<(u64, u64)>> {
        self.seek(offset)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let (mut run_start, mut run_len) = (0u64, 0u64);
        // Trailing zero blocks of the current run, and how many of them are still in
        // `current` (those can be taken back out).
        let (mut zeros, mut movable) = (0u64, 0u64);
        let mut in_hole = false;
        let mut logical = 0u64;
        // current[..kept] is stored; current[scanned..filled] is read but not classified.
        let mut kept = self.filled;
        let mut scanned = self.filled;
        let mut left = len;
        loop {
            if left == 0 {
                // Zero-pad a partial last block so it can be classified.
                let end = self.filled.div_ceil(ALIGN) * ALIGN;
                let filled = self.filled;
                self.current.bytes()[filled..end].fill(0);
                self.filled = end;
            }
            let complete = self.filled / ALIGN * ALIGN;
            while scanned < complete {
                let zero = is_zero(&self.current.bytes()[scanned..scanned + ALIGN]);
                if zero && in_hole {
                    // Dropped: part of a hole.
                } else {
                    if kept != scanned {
                        self.current
                            .bytes()
                            .copy_within(scanned..scanned + ALIGN, kept);
                    }
                    kept += ALIGN;
                    if run_len == 0 {
                        run_start = logical;
                    }
                    run_len += 1;
                    if zero {
                        zeros += 1;
                        movable += 1;
                        if zeros >= min_hole && movable == zeros && runs.len() + 1 < max_runs {
                            // Long enough: take the run's zeros back out; a hole from here.
                            kept -= zeros as usize * ALIGN;
                            run_len -= zeros;
                            if run_len > 0 {
                                runs.push((run_start, run_len));
                            }
                            run_len = 0;
                            (zeros, movable) = (0, 0);
                            in_hole = true;
                        }
                    } else {
                        (zeros, movable) = (0, 0);
                        in_hole = false;
                    }
                }
                scanned += ALIGN;
                logical += 1;
            }
            // Move a partial block left unclassified down to the stored part.
            let tail = self.filled - scanned;
            if tail > 0 && kept != scanned {
                let filled = self.filled;
                self.current.bytes().copy_within(scanned..filled, kept);
            }
            self.filled = kept + tail;
            scanned = kept;
            if left == 0 {
                break;
            }
            if self.filled == CHUNK {
                self.submit(CHUNK)?;
                (kept, scanned) = (0, 0);
                // Zeros already on their way to disk stay data; a hole may still start
                // after them.
                (zeros, movable) = (0, 0);
            }
            let n = (left as usize).min(CHUNK - self.filled);
            let filled = self.filled;
            let got = match source.read(&mut self.current.bytes()[filled..filled + n]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while being copied",
                    ))
                }
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.filled += got;
            left -= got as u64;
        }
        if run_len > 0 {
            runs.push((run_start, run_len));
        }
        self.flush_if_full()?;
        Ok(runs)
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.filled == CHUNK {
            self.submit(CHUNK)?;
        }
        Ok(())
    }

    /// Hands the first `len` bytes (block aligned) of the current buffer to the worker.
    fn submit(&mut self, len: usize) -> io::Result<()> {
        let next = match self.free.recv() {
            Ok(buf) => buf,
            // The worker stopped: its error is what matters.
            Err(_) => return Err(self.stop().err().unwrap_or_else(worker_gone)),
        };
        let buf = std::mem::replace(&mut self.current, next);
        let job = Job {
            buf,
            offset: self.base,
            len,
        };
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.stop().err().unwrap_or_else(worker_gone));
        }
        self.base += len as u64;
        self.filled = 0;
        Ok(())
    }

    fn stop(&mut self) -> io::Result<()> {
        self.jobs = None;
        match self.worker.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("image writer thread panicked")),
            None => Ok(()),
        }
    }

    /// Writes what is left (zero-padded to a whole block) and waits for every write.
    /// Returns whether the writes bypassed the page cache.
    pub(crate) fn finish(mut self) -> io::Result<bool> {
        if self.filled > 0 {
            let len = self.filled.div_ceil(ALIGN) * ALIGN;
            let filled = self.filled;
            self.current.bytes()[filled..len].fill(0);
            self.submit(len)?;
        }
        self.stop()?;
        Ok(self.direct)
    }
}

impl Drop for SequentialWriter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Whether a block is all zeros; data blocks usually answer at their first bytes.
fn is_zero(block: &[u8]) -> bool {
    if block[..16].iter().any(|&b| b != 0) {
        return false;
    }
    block.iter().fold(0u8, |acc, &b| acc | b) == 0
}

fn worker_gone() -> io::Error {
    io::Error::other("image writer thread stopped")
}

/// A second descriptor for the same file with `O_DIRECT`; fails where the filesystem does
/// not support it.
fn reopen_direct(file: &File) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let fd = rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 MiB sparse file to write into, in a directory the caller keeps alive: on a
    /// disk-backed tempdir O_DIRECT works, elsewhere the writer's fallback is exercised.
    fn scratch_image() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        file.set_len(64 << 20).unwrap();
        (dir, file)
    }

    #[test]
    fn writes_land_at_their_offsets_with_gaps_zeroed() {
        let (_dir, file) = scratch_image();
        let mut w = SequentialWriter::new(&file, 8192).unwrap();
        w.write_at(8192, b"first").unwrap();
        let big: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| (i % 251) as u8).collect();
        let runs = w
            .copy_skipping_zeros(12288, &mut &big[..], big.len() as u64, 8, 16)
            .unwrap();
        assert_eq!(runs, vec![(0, (big.len() as u64).div_ceil(4096))]);
        let tail_at = (12288 + big.len() as u64).div_ceil(4096) * 4096 + 4096;
        w.write_at(tail_at, b"tail").unwrap();
        assert!(w.write_at(100, b"x").is_err(), "backwards is refused");
        w.finish().unwrap();

        let mut read = vec![0u8; 64 << 20];
        file.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(&read[8192..8197], b"first");
        assert!(read[8197..12288].iter().all(|&b| b == 0));
        assert_eq!(&read[12288..12288 + big.len()], &big[..]);
        let gap = &read[12288 + big.len()..tail_at as usize];
        assert!(gap.iter().all(|&b| b == 0));
        assert_eq!(&read[tail_at as usize..tail_at as usize + 4], b"tail");
        assert!(
            read[..8192].iter().all(|&b| b == 0),
            "nothing before the start"
        );
    }

    #[test]
    fn zero_runs_become_holes_and_short_ones_stay() {
        let (_dir, file) = scratch_image();
        let block = |b: u8, n: usize| vec![b; n * 4096];
        // data 2, zeros 3 (kept), data 1, zeros 20 (hole), data 1, zeros past a buffer
        // boundary (hole), data 1, then trailing zeros (hole).
        let src = [
            block(1, 2),
            block(0, 3),
            block(2, 1),
            block(0, 20),
            block(3, 1),
            block(0, CHUNK / 4096 + 50),
            block(4, 1),
            block(0, 9),
        ]
        .concat();
        let mut w = SequentialWriter::new(&file, 4096).unwrap();
        let runs = w
            .copy_skipping_zeros(4096, &mut &src[..], src.len() as u64, 8, 100)
            .unwrap();
        let hole_end = 2 + 3 + 1 + 20 + 1 + CHUNK as u64 / 4096 + 50;
        assert_eq!(runs, vec![(0, 6), (26, 1), (hole_end, 1)]);
        w.finish().unwrap();
        let mut read = vec![0u8; 8 * 4096];
        file.read_exact_at(&mut read, 4096).unwrap();
        let stored = [
            block(1, 2),
            block(0, 3),
            block(2, 1),
            block(3, 1),
            block(4, 1),
        ]
        .concat();
        assert_eq!(read, stored);
        // A budget of one run: no holes at all.
        let mut w = SequentialWriter::new(&file, 4096).unwrap();
        let runs = w
            .copy_skipping_zeros(4096, &mut &src[..], src.len() as u64, 8, 1)
            .unwrap();
        assert_eq!(runs, vec![(0, src.len() as u64 / 4096)]);
        w.finish().unwrap();
    }
}
