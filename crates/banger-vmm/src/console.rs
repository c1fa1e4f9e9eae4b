//! The guest's serial console on the host, capped.
//!
//! A guest can write to its console as fast as the VMM emulates the UART: written
//! straight to a file, 30 MiB from the guest were 30 MiB on the host. So the VMM writes
//! the console to a pipe, and a small logger process (`bangerd --console-log DIR`,
//! detached like the VMM, so a daemon restart loses nothing) copies it into
//! `console.log` in the VM's directory, rotating it to `console.log.1` when it reaches
//! half the cap: the two together never exceed the cap and always hold the latest
//! output. The logger ends when the VMM does (end of the pipe).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The current console file in a VM's run directory.
pub const CONSOLE_LOG: &str = "console.log";
/// The previous one, replaced at each rotation.
pub const CONSOLE_LOG_PREVIOUS: &str = "console.log.1";
/// Default cap of both files together (config `console_log_max`).
pub const DEFAULT_CONSOLE_LOG_MAX: u64 = 1 << 20;
/// The smallest cap accepted: a kernel's boot messages should fit.
pub const MIN_CONSOLE_LOG_MAX: u64 = 16 << 10;

/// How a backend starts the console logger: `program` with `args` (the logger's
/// directory and cap are appended as `DIR MAX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLogger {
    /// The logger program (bangerd itself).
    pub program: PathBuf,
    /// Arguments before the directory and cap.
    pub args: Vec<String>,
    /// The cap of `console.log` + `console.log.1`, in bytes.
    pub max_bytes: u64,
}

impl ConsoleLogger {
    /// Starts the logger for `run_dir` and returns the pipe end the VMM writes the
    /// console to. The logger is reaped by a thread while the caller lives.
    pub fn spawn(&self, run_dir: &Path) -> io::Result<io::PipeWriter> {
        use std::os::unix::process::CommandExt;
        let (reader, writer) = io::pipe()?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .arg(run_dir)
            .arg(self.max_bytes.to_string())
            .stdin(reader)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches no parent memory; like the VMM,
        // the logger must not receive signals aimed at the daemon's process group.
        unsafe {
            command.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
        }
        let mut child = command.spawn()?;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(writer)
    }
}

/// Copies `input` into `dir/console.log` until its end, rotating as described in the
/// module docs so that both files together stay within `max_bytes`.
pub fn copy_capped(mut input: impl Read, dir: &Path, max_bytes: u64) -> io::Result<()> {
    let half = (max_bytes / 2).max(1);
    let current = dir.join(CONSOLE_LOG);
    let previous = dir.join(CONSOLE_LOG_PREVIOUS);
    let _ = fs::remove_file(&previous);
    let mut file = fs::File::create(&current)?;
    let mut written = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            if written >= half {
                // Rename first: a reader following the log sees the old file complete
                // and the new one from its start.
                fs::rename(&current, &previous)?;
                file = fs::File::create(&current)?;
                written = 0;
            }
            let room = (half - written).min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..room])?;
            written += room as u64;
            chunk = &chunk[room..];
        }
    }
}

/// The console of the VM in `dir` as it stands: `console.log.1` then `console.log`.
pub fn read_console(dir: &Path) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for name in [CONSOLE_LOG_PREVIOUS, CONSOLE_LOG] {
        match fs::read(dir.join(name)) {
            Ok(bytes) => out.extend(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_stays_within_the_cap_and_keeps_the_latest_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut flood = Vec::new();
        for i in 0..200_000u32 {
            flood.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        // Fed in odd-sized chunks, as a pipe delivers them.
        struct Chunks<'a>(&'a [u8]);
        impl Read for Chunks<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(buf.len()).min(7_777);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let max = 64 << 10;
        copy_capped(Chunks(&flood), tmp.path(), max).unwrap();
        let size = |name| fs::metadata(tmp.path().join(name)).unwrap().len();
        assert!(size(CONSOLE_LOG) + size(CONSOLE_LOG_PREVIOUS) <= max);
        let kept = read_console(tmp.path()).unwrap();
        assert!(kept.len() as u64 > max / 2, "{}", kept.len());
        assert!(flood.ends_with(&kept), "not the latest output");
        assert!(String::from_utf8_lossy(&kept).ends_with("line 199999\n"));
    }

    #[test]
    fn a_short_console_is_one_file() {
        let tmp = tempfile::tempdir().unwrap();
        copy_capped(&b"booted\n"[..], tmp.path(), DEFAULT_CONSOLE_LOG_MAX).unwrap();
        assert_eq!(fs::read(tmp.path().join(CONSOLE_LOG)).unwrap(), b"booted\n");
        assert!(!tmp.path().join(CONSOLE_LOG_PREVIOUS).exists());
    }
}
