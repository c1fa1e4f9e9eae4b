//! `banger vm cp`, `banger vm diff` and the downloads of `vm run --export/--patch`: flags
//! in, one call, files written here. The host side is read and written by this process
//! only (`banger_client::copy`), so the same works against a remote daemon.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use banger_api::{
    DownloadEnd, DownloadParams, DownloadStream, NameParams, Notification, Progress, VmCpIn,
    VmCpInParams, VmCpOut, VmCpOutParams, VmCpResult, VmDiff, VmDiffResult, DOWNLOAD_NOTIFICATION,
};
use banger_client::copy::{self, CopyStats, Target};
use banger_client::rpc::Client;
use base64::Engine as _;

use crate::format::format_bytes;
use crate::output::{print_json, report_error};
use crate::progress::Bars;

/// One side of `vm cp`: a host path, or `VM:PATH` in a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A path on this host.
    Host(PathBuf),
    /// A path in a VM (made absolute: relative to `/root`).
    Guest {
        /// The VM.
        vm: String,
        /// Absolute guest path.
        path: String,
    },
}

impl Location {
    /// `NAME:PATH` (NAME a VM name) is a guest path; anything else is a host path (write
    /// `./a:b` for a host file with a colon).
    pub fn parse(s: &str) -> Location {
        if let Some((vm, path)) = s.split_once(':') {
            let vm_like = !vm.is_empty()
                && vm.len() <= 64
                && vm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !vm.starts_with('-');
            if vm_like {
                let path = if path.starts_with('/') {
                    path.to_owned()
                } else {
                    format!("/root/{path}")
                };
                let path = path.trim_end_matches('/');
                return Location::Guest {
                    vm: vm.to_owned(),
                    path: if path.is_empty() {
                        "/".into()
                    } else {
                        path.into()
                    },
                };
            }
        }
        Location::Host(PathBuf::from(s))
    }
}

/// `banger vm cp SRC DST`.
pub fn cp(client: &mut Client, src: &str, dst: &str, json: bool) -> anyhow::Result<ExitCode> {
    let result = match (Location::parse(src), Location::parse(dst)) {
        (Location::Host(from), Location::Guest { vm, path }) => {
            copy_in(client, &from, vm, path, json)
        }
        (Location::Guest { vm, path }, Location::Host(to)) => copy_out(client, vm, path, &to, json),
        (Location::Guest { .. }, Location::Guest { .. }) => {
            bail!("both {src} and {dst} are in VMs: copy through the host")
        }
        (Location::Host(_), Location::Host(_)) => {
            bail!("neither {src} nor {dst} is in a VM (write VM:PATH for one of them)")
        }
    }?;
    if json {
        print_json(&result)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn progress(enabled: bool) -> Arc<Mutex<Bars>> {
    Arc::new(Mutex::new(Bars::new(enabled)))
}

fn show(bars: &Mutex<Bars>, task: &str, bytes: u64, done: bool) {
    bars.lock()
        .unwrap_or_else(|e| e.into_inner())
        .update(&Progress {
            task: task.into(),
            message: format_bytes(bytes),
            current: bytes,
            total: None,
            done,
        });
}

fn copy_in(
    client: &mut Client,
    from: &Path,
    vm: String,
    path: String,
    json: bool,
) -> anyhow::Result<VmCpResult> {
    std::fs::symlink_metadata(from).with_context(|| format!("stat {}", from.display()))?;
    let params = VmCpInParams {
        name: vm,
        dest: path,
    };
    let bars = progress(!json && std::io::stderr().is_terminal());
    let from = from.to_owned();
    let archived: Arc<Mutex<Option<anyhow::Result<CopyStats>>>> = Arc::default();
    let (for_thread, for_bars) = (archived.clone(), bars.clone());
    let result = client.call_with_input::<VmCpIn>(
        &params,
        |_| {},
        move |input| {
            std::thread::Builder::new()
                .name("banger-cp-upload".into())
                .spawn(move || {
                    let mut writer = Counting {
                        inner: banger_client::workspace::UploadWriter::new(input.clone()),
                        bytes: 0,
                        bars: for_bars,
                    };
                    let done = copy::archive(&from, &mut writer).and_then(|stats| {
                        writer.inner.finish().context("send the archive")?;
                        Ok(stats)
                    });
                    if let Err(e) = &done {
                        if !input.is_done() {
                            // Closing the connection (not `eof`) tells the daemon the
                            // stream is incomplete.
                            eprintln!("banger: {e:#}");
                            std::process::exit(1);
                        }
                    }
                    *for_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
                })
                .map(drop)
        },
    );
    bars.lock().unwrap_or_else(|e| e.into_inner()).finish();
    let result = result?;
    if !json {
        let stats = archived
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .and_then(Result::ok)
            .unwrap_or_default();
        println!(
            "copied {} to {}:{}{}",
            copied_summary(&stats),
            result.vm,
            result.guest_path,
            skipped_note(stats.skipped)
        );
    }
    Ok(result)
}

/// What a copy carried, as both directions report it: `1.0 KiB (2 file(s), 1 dir(s), 0 link(s))`.
fn copied_summary(stats: &CopyStats) -> String {
    format!(
        "{} ({} file(s), {} dir(s), {} link(s))",
        format_bytes(stats.bytes),
        stats.files,
        stats.dirs,
        stats.symlinks
    )
}

fn skipped_note(skipped: u64) -> String {
    if skipped == 0 {
        String::new()
    } else {
        format!("; skipped {skipped} device(s), FIFO(s), socket(s) or hard link(s)")
    }
}

/// Counts what goes through, for the progress line.
struct Counting<W> {
    inner: W,
    bytes: u64,
    bars: Arc<Mutex<Bars>>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        let before = self.bytes >> 20;
        self.bytes += n as u64;
        if self.bytes >> 20 != before {
            show(&self.bars, "copy", self.bytes, false);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn copy_out(
    client: &mut Client,
    vm: String,
    path: String,
    to: &Path,
    json: bool,
) -> anyhow::Result<VmCpResult> {
    let name = Path::new(&path)
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| OsString::from("rootfs"));
    let target = Target::resolve(to, &name)?;
    let shown = target.path().to_owned();
    let mut downloads = Downloads::new(!json && std::io::stderr().is_terminal());
    downloads.extract_to(DownloadStream::Copy, 0, target);
    let params = VmCpOutParams {
        name: vm,
        src: path,
    };
    let hook = downloads.hook();
    let result = client.call_with_notifications::<VmCpOut>(&params, hook);
    let mut outcomes = downloads.finish();
    let result = result?;
    let (stats, end, _) = outcomes
        .remove(&(DownloadStream::Copy, 0))
        .context("the daemon sent no download")?;
    let stats = stats?;
    if let Some(e) = end.and_then(|e| e.error) {
        bail!("the copy is incomplete: {e}");
    }
    if !json {
        println!(
            "copied {} from {}:{} to {}{}",
            copied_summary(&stats),
            result.vm,
            result.guest_path,
            shown.display(),
            skipped_note(stats.skipped + result.skipped)
        );
    }
    Ok(result)
}

/// Where one download stream goes.
enum Sink {
    /// Unpacked by a thread (a tar stream).
    Extract {
        tx: Option<SyncSender<Vec<u8>>>,
        thread: Option<JoinHandle<anyhow::Result<CopyStats>>>,
    },
    /// Collected (a patch), at most [`banger_api::MAX_PATCH_BYTES`].
    Collect(Vec<u8>),
}

struct Stream {
    sink: Sink,
    bytes: u64,
    end: Option<DownloadEnd>,
}

/// The download streams a call sends, each to its sink.
#[derive(Clone)]
pub struct Downloads {
    streams: Arc<Mutex<HashMap<(DownloadStream, u32), Stream>>>,
    bars: Arc<Mutex<Bars>>,
}

/// What became of one stream: what the sink did, the daemon's end of it, and the bytes
/// collected (for a collected stream).
type Outcome = (anyhow::Result<CopyStats>, Option<DownloadEnd>, Vec<u8>);

impl Downloads {
    /// No streams yet; progress on stderr when `progress`.
    pub fn new(progress: bool) -> Downloads {
        Downloads {
            streams: Arc::default(),
            bars: self::progress(progress),
        }
    }

    /// Unpacks the tar stream `(stream, index)` at `target`.
    pub fn extract_to(&mut self, stream: DownloadStream, index: u32, target: Target) {
        // A few chunks in flight: when the disk is slower than the guest, the notification
        // loop waits here, stops reading the connection, and the daemon and guest wait too.
        let (tx, rx) = sync_channel::<Vec<u8>>(8);
        let thread = std::thread::Builder::new()
            .name("banger-extract".into())
            .spawn(move || copy::extract(copy::channel_reader(rx), &target))
            .ok();
        self.insert(
            stream,
            index,
            Sink::Extract {
                tx: Some(tx),
                thread,
            },
        );
    }

    /// Collects the stream `(stream, index)` (a patch).
    pub fn collect(&mut self, stream: DownloadStream, index: u32) {
        self.insert(stream, index, Sink::Collect(Vec::new()));
    }

    fn insert(&mut self, stream: DownloadStream, index: u32, sink: Sink) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (stream, index),
                Stream {
                    sink,
                    bytes: 0,
                    end: None,
                },
            );
    }

    /// The notification handler to give the call.
    pub fn hook(&self) -> impl FnMut(Notification) + 'static {
        let this = self.clone();
        move |note| this.on_note(note)
    }

    fn on_note(&self, note: Notification) {
        if note.method != DOWNLOAD_NOTIFICATION {
            return;
        }
        let Ok(p) = serde_json::from_value::<DownloadParams>(note.params) else {
            return;
        };
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = streams.get_mut(&(p.stream, p.index)) else {
            return;
        };
        if let Some(data) = p.data {
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) else {
                return;
            };
            let before = s.bytes >> 20;
            s.bytes += bytes.len() as u64;
            match &mut s.sink {
                Sink::Extract { tx: Some(tx), .. } => {
                    // Fails once the unpacking gave up; its error is reported at the end.
                    let _ = tx.send(bytes);
                }
                Sink::Extract { tx: None, .. } => {}
                Sink::Collect(buf) => {
                    if (buf.len() + bytes.len()) as u64 <= banger_api::MAX_PATCH_BYTES {
                        buf.extend_from_slice(&bytes);
                    }
                }
            }
            if s.bytes >> 20 != before && matches!(s.sink, Sink::Extract { .. }) {
                show(&self.bars, &format!("{}", p.stream), s.bytes, false);
            }
        }
        if let Some(end) = p.end {
            if let Sink::Extract { tx, .. } = &mut s.sink {
                // The end of the stream: the unpacker reads end-of-file.
                *tx = None;
            }
            s.end = Some(end);
        }
    }

    /// Waits for every sink; returns each stream's outcome.
    pub fn finish(&mut self) -> HashMap<(DownloadStream, u32), Outcome> {
        self.bars.lock().unwrap_or_else(|e| e.into_inner()).finish();
        let streams: Vec<_> = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        streams
            .into_iter()
            .map(|(key, s)| {
                let (stats, collected) = match s.sink {
                    Sink::Extract { tx, thread } => {
                        drop(tx);
                        let stats = match thread {
                            Some(t) => t.join().unwrap_or_else(|_| {
                                Err(anyhow::anyhow!("the unpacking thread panicked"))
                            }),
                            None => Err(anyhow::anyhow!("no thread to unpack with")),
                        };
                        (stats, Vec::new())
                    }
                    Sink::Collect(buf) => {
                        let stats = CopyStats {
                            bytes: buf.len() as u64,
                            ..CopyStats::default()
                        };
                        (Ok(stats), buf)
                    }
                };
                (key, (stats, s.end, collected))
            })
            .collect()
    }
}

/// `banger vm diff NAME`: the patch on stdout (with `--json`: the counts and the patch).
pub fn diff(client: &mut Client, name: String, json: bool) -> anyhow::Result<ExitCode> {
    let mut downloads = Downloads::new(false);
    downloads.collect(DownloadStream::Patch, 0);
    let result: anyhow::Result<VmDiffResult> = client
        .call_with_notifications::<VmDiff>(&NameParams { name }, downloads.hook())
        .map_err(Into::into);
    let mut outcomes = downloads.finish();
    let result = result?;
    let (_, end, patch) = outcomes.remove(&(DownloadStream::Patch, 0)).unwrap_or((
        Ok(CopyStats::default()),
        None,
        Vec::new(),
    ));
    if let Some(e) = end.and_then(|e| e.error) {
        bail!("the patch is incomplete: {e}");
    }
    if json {
        let mut value = serde_json::to_value(&result)?;
        value["patch"] = String::from_utf8_lossy(&patch).into_owned().into();
        print_json(&value)?;
    } else {
        let mut out = std::io::stdout();
        out.write_all(&patch)
            .and_then(|()| out.flush())
            .context("write the patch")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The downloads of `vm run --export/--patch`, prepared before the call.
pub struct RunDownloads {
    downloads: Downloads,
    /// (guest path, where it lands) per export.
    exports: Vec<(String, PathBuf)>,
    patch: Option<PathBuf>,
}

impl RunDownloads {
    /// Parses `--export GUEST_PATH[:HOST_PATH]` (relative guest paths are relative to the
    /// command's directory `cwd`; the host path defaults to `.`) and resolves each target
    /// now, so a missing host directory fails before a VM boots.
    pub fn prepare(
        exports: &[String],
        patch: Option<PathBuf>,
        cwd: &str,
        json: bool,
    ) -> anyhow::Result<RunDownloads> {
        let mut downloads = Downloads::new(!json && std::io::stderr().is_terminal());
        let mut list = Vec::new();
        for (i, spec) in exports.iter().enumerate() {
            let (guest, host) = match spec.split_once(':') {
                Some((g, h)) => (g, h),
                None => (spec.as_str(), "."),
            };
            if guest.is_empty() || host.is_empty() {
                bail!("--export {spec:?}: expected GUEST_PATH[:HOST_PATH]");
            }
            let guest = if guest.starts_with('/') {
                guest.trim_end_matches('/').to_owned()
            } else {
                format!("{cwd}/{}", guest.trim_end_matches('/'))
            };
            let name = Path::new(&guest)
                .file_name()
                .map(|n| n.to_owned())
                .with_context(|| format!("--export {spec:?} names no file"))?;
            let target = Target::resolve(Path::new(host), &name)
                .with_context(|| format!("--export {spec:?}"))?;
            let shown = target.path().to_owned();
            downloads.extract_to(DownloadStream::Export, i as u32, target);
            list.push((guest, shown));
        }
        if patch.is_some() {
            downloads.collect(DownloadStream::Patch, 0);
        }
        Ok(RunDownloads {
            downloads,
            exports: list,
            patch,
        })
    }

    /// The guest paths for `VmRunParams::exports`.
    pub fn guest_paths(&self) -> Vec<String> {
        self.exports.iter().map(|(g, _)| g.clone()).collect()
    }

    /// Whether a patch was asked for.
    pub fn wants_patch(&self) -> bool {
        self.patch.is_some()
    }

    /// The notification handler for the call.
    pub fn hook(&self) -> crate::interactive::OtherNotes {
        Box::new(self.downloads.hook())
    }

    /// Waits for the exports, writes the patch, reports failures on stderr; false when
    /// anything failed.
    pub fn finish(mut self, json: bool) -> bool {
        let mut outcomes = self.downloads.finish();
        let mut ok = true;
        for (i, (guest, host)) in self.exports.iter().enumerate() {
            let outcome = outcomes.remove(&(DownloadStream::Export, i as u32));
            let failure = match outcome {
                None => Some("nothing came back (the command did not run?)".to_owned()),
                Some((_, Some(DownloadEnd { error: Some(e), .. }), _)) => Some(e),
                Some((Err(e), _, _)) => Some(format!("{e:#}")),
                Some((Ok(_), None, _)) => Some("the stream did not end".to_owned()),
                Some((Ok(stats), Some(end), _)) => {
                    if !json {
                        eprintln!(
                            "banger: exported {guest} to {} ({}){}",
                            host.display(),
                            format_bytes(stats.bytes),
                            skipped_note(stats.skipped + end.skipped)
                        );
                    }
                    None
                }
            };
            if let Some(why) = failure {
                ok = false;
                report_error(&anyhow::anyhow!("export {guest}: {why}"), false);
            }
        }
        if let Some(file) = &self.patch {
            let failure = match outcomes.remove(&(DownloadStream::Patch, 0)) {
                None => Some("nothing came back (the command did not run?)".to_owned()),
                Some((_, Some(DownloadEnd { error: Some(e), .. }), _)) => Some(e),
                Some((_, None, _)) => Some("the stream did not end".to_owned()),
                Some((_, Some(_), patch)) => std::fs::write(file, &patch)
                    .err()
                    .map(|e| format!("write {}: {e}", file.display())),
            };
            if let Some(why) = failure {
                ok = false;
                report_error(&anyhow::anyhow!("patch: {why}"), false);
            }
        }
        ok
    }
}

/// A `vm run` whose command succeeded but whose results could not be copied out failed
/// (exit 125): a script must not take the missing artifact for success. A failed command
/// keeps its own status.
pub fn fail_if_lost(
    result: anyhow::Result<banger_api::ExecResult>,
    copied: bool,
) -> anyhow::Result<banger_api::ExecResult> {
    match result {
        Ok(r) if !copied && r.exit_code == Some(0) => Err(anyhow::anyhow!(
            "copying the results out of VM {} failed",
            r.vm
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_colon_path_is_a_guest_path_relative_to_root_and_the_rest_host_paths() {
        assert_eq!(
            Location::parse("dev:/tmp/out/"),
            Location::Guest {
                vm: "dev".into(),
                path: "/tmp/out".into()
            }
        );
        assert_eq!(
            Location::parse("dev:out"),
            Location::Guest {
                vm: "dev".into(),
                path: "/root/out".into()
            }
        );
        assert_eq!(Location::parse("./a:b"), Location::Host("./a:b".into()));
        assert_eq!(Location::parse("/x/y"), Location::Host("/x/y".into()));
        assert_eq!(Location::parse("Dev:x"), Location::Host("Dev:x".into()));
    }
}
