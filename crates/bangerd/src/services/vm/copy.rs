//! Files both ways between the caller and a running VM (`vm.cp.in`, `vm.cp.out`), the
//! exports and patch of `vm.run`, and `vm.diff`.
//!
//! The daemon opens no caller path: the caller archives what goes in and unpacks what comes
//! out (`banger_client::copy`), and the daemon only passes tar streams between the
//! connection (`upload` in, `download` out) and the guest agent (its upload and download
//! sessions). Both directions are paced end to end: an upload through the call's bounded
//! input queue, a download through the bounded output queue and the agent's window, so a
//! slow caller slows the guest and the daemon's memory stays bounded.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use banger_agent::proto::ExecRequest;
use banger_api::{
    DownloadEnd, DownloadParams, DownloadStream, NameParams, VmCpInParams, VmCpOutParams,
    VmCpResult, VmDiffResult, DOWNLOAD_CHUNK, DOWNLOAD_NOTIFICATION, MAX_COPY_BYTES,
    MAX_COPY_ENTRIES, MAX_EXPORTS,
};
use banger_vmm::agent::AgentClient;
use base64::Engine as _;

use super::diff::{self, BASELINE_META, BASELINE_TAR, MAX_BASELINE_BYTES};
use super::VmService;
use crate::services::upload::UploadReader;
use crate::services::CallContext;
use crate::{ServiceError, ServiceResult};

/// An absolute guest path with no `..` (the guest resolves it; this only keeps requests
/// meaningful), or `bad_request` naming `what`.
fn guest_path(what: &str, path: &str) -> ServiceResult<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) || path.contains('\0')
    {
        return Err(ServiceError::bad_request(format!(
            "{what} {path:?} must be an absolute guest path without '..'"
        )));
    }
    Ok(p.to_owned())
}

/// Sends what is written to it as `download` notifications of one stream, through the
/// call's bounded output queue (a caller that does not read holds the download up).
pub(super) struct DownloadWriter<'a> {
    ctx: &'a CallContext,
    stream: DownloadStream,
    index: u32,
    buf: Vec<u8>,
    total: u64,
}

impl<'a> DownloadWriter<'a> {
    pub(super) fn new(ctx: &'a CallContext, stream: DownloadStream, index: u32) -> Self {
        DownloadWriter {
            ctx,
            stream,
            index,
            buf: Vec::with_capacity(DOWNLOAD_CHUNK),
            total: 0,
        }
    }

    fn send(&self, data: Option<&[u8]>, end: Option<DownloadEnd>) -> io::Result<()> {
        let params = DownloadParams {
            stream: self.stream,
            index: self.index,
            data: data.map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
            end,
        };
        self.ctx.output(
            DOWNLOAD_NOTIFICATION,
            serde_json::to_value(params).expect("download params serialise"),
        )
    }

    /// Sends what is buffered, then the stream's end (with `error` when it is incomplete).
    pub(super) fn finish(mut self, skipped: u64, error: Option<String>) -> io::Result<u64> {
        if error.is_none() {
            self.flush()?;
        }
        let end = DownloadEnd {
            bytes: self.total,
            skipped,
            error,
        };
        self.send(None, Some(end))?;
        Ok(self.total)
    }
}

impl Write for DownloadWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.total + data.len() as u64 > MAX_COPY_BYTES {
            return Err(io::Error::other(format!(
                "the download passed {MAX_COPY_BYTES} bytes (MAX_COPY_BYTES)"
            )));
        }
        let n = data.len().min(DOWNLOAD_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.total += n as u64;
        if self.buf.len() == DOWNLOAD_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let data = std::mem::take(&mut self.buf);
            self.send(Some(&data), None)?;
            self.buf = data;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Copies the caller's tar stream `from` into `to`, renaming its one root to `root` when
/// given, refusing entries that climb out, absolute ones, hard links and more than
/// [`MAX_COPY_ENTRIES`]. Streaming: one entry's header at a time is held.
fn rewrite(
    from: impl Read,
    to: &mut dyn Write,
    root: Option<&OsString>,
) -> io::Result<(u64, OsString)> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut archive = tar::Archive::new(from);
    let mut builder = tar::Builder::new(to);
    let mut first: Option<OsString> = None;
    let mut count = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        count += 1;
        if count > MAX_COPY_ENTRIES {
            return Err(bad(format!(
                "more than {MAX_COPY_ENTRIES} entries (MAX_COPY_ENTRIES)"
            )));
        }
        let path = entry.path()?.into_owned();
        let mut parts = path.components();
        let head = match parts.next() {
            Some(Component::Normal(h)) => h.to_owned(),
            _ => return Err(bad(format!("entry {} escapes the copy", path.display()))),
        };
        if parts.clone().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(bad(format!("entry {} escapes the copy", path.display())));
        }
        match &first {
            None => first = Some(head.clone()),
            Some(f) if *f == head => {}
            Some(f) => {
                return Err(bad(format!(
                    "entry {} is outside the copy's root {}",
                    path.display(),
                    Path::new(f).display()
                )))
            }
        }
        let mut name = PathBuf::from(root.unwrap_or(&head));
        name.extend(parts);
        let mut header = entry.header().clone();
        match header.entry_type() {
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()?
                    .ok_or_else(|| bad(format!("symlink {} has no target", path.display())))?
                    .into_owned();
                builder.append_link(&mut header, &name, &link)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Directory => {
                builder.append_data(&mut header, &name, &mut entry)?;
            }
            other => {
                return Err(bad(format!(
                    "entry {} is a {other:?}: only files, directories and symlinks are copied",
                    path.display()
                )))
            }
        }
    }
    let Some(first) = first else {
        return Err(bad("the archive is empty".into()));
    };
    builder.finish()?;
    Ok((count, first))
}

impl VmService {
    /// `vm.cp.in`: unpacks the caller's uploaded tar stream at `params.dest` in the guest
    /// (into it when it is an existing directory, else as it).
    pub fn copy_in(&self, ctx: &CallContext, params: &VmCpInParams) -> ServiceResult<VmCpResult> {
        let dest = guest_path("dest", &params.dest)?;
        let vm = self.show(&params.name)?;
        let client = self.agent(&vm)?;
        // The guest's answer only decides where in the guest the files go: its business.
        let probe = client
            .output(&ExecRequest::new([
                "/bin/sh".into(),
                "-c".into(),
                "test -d \"$1\"".into(),
                "sh".into(),
                OsString::from(&params.dest),
            ]))
            .with_context(|| format!("look at {} in VM {:?}", params.dest, vm.name))?;
        let (unpack_in, rename, final_path) = if probe.status.success() {
            (dest.clone(), None, None)
        } else {
            let parent = dest.parent().unwrap_or(Path::new("/")).to_owned();
            let name = dest
                .file_name()
                .ok_or_else(|| {
                    ServiceError::bad_request(format!("dest {:?} names no file", params.dest))
                })?
                .to_owned();
            (parent, Some(name), Some(dest.clone()))
        };
        let input = ctx
            .take_input()
            .context("no connection to receive the upload from")?;
        let mut reader = UploadReader::new(input);
        let mut root = None;
        let sent = client.upload_stream(&unpack_in, |w| {
            let (_, r) = rewrite(&mut reader, w, rename.as_ref())?;
            root = Some(r);
            // The archive ends before the stream does (its zero blocks, then `eof`).
            io::copy(&mut reader, &mut io::sink()).map(drop)
        });
        let (ended, total) = (reader.ended(), reader.total());
        sent.with_context(|| format!("copy into {} in VM {:?}", unpack_in.display(), vm.name))?;
        if !ended {
            return Err(anyhow::anyhow!(
                "the upload stopped before its end ({total} bytes received)"
            )
            .into());
        }
        Ok(VmCpResult {
            vm: vm.name,
            guest_path: final_path
                .unwrap_or_else(|| unpack_in.join(root.unwrap_or_default()))
                .to_string_lossy()
                .into_owned(),
            bytes: total,
            skipped: 0,
        })
    }

    /// `vm.cp.out`: sends `params.src` from the guest as `download` notifications
    /// (stream `copy`).
    pub fn copy_out(&self, ctx: &CallContext, params: &VmCpOutParams) -> ServiceResult<VmCpResult> {
        let src = guest_path("src", &params.src)?;
        let vm = self.show(&params.name)?;
        let client = self.agent(&vm)?;
        let (bytes, skipped) = send_download(ctx, &client, &src, DownloadStream::Copy, 0)
            .with_context(|| format!("copy {} out of VM {:?}", params.src, vm.name))?;
        Ok(VmCpResult {
            vm: vm.name,
            guest_path: params.src.clone(),
            bytes,
            skipped,
        })
    }

    /// Sends `vm.run`'s exports: each guest path as its own `export` stream, a failure
    /// reported in that stream's end (the others still go).
    pub(super) fn send_exports(&self, ctx: &CallContext, client: &AgentClient, exports: &[String]) {
        for (index, path) in exports.iter().enumerate() {
            let index = index as u32;
            if let Err(e) =
                send_download(ctx, client, Path::new(path), DownloadStream::Export, index)
            {
                tracing::warn!(export = %path, error = %format!("{e:#}"), "export failed");
            }
        }
    }

    /// Checks `vm.run`'s exports before anything starts.
    pub(super) fn check_exports(exports: &[String]) -> ServiceResult<()> {
        if exports.len() > MAX_EXPORTS {
            return Err(ServiceError::bad_request(format!(
                "{} exports, at most {MAX_EXPORTS} (MAX_EXPORTS)",
                exports.len()
            )));
        }
        for e in exports {
            guest_path("export", e)?;
        }
        Ok(())
    }

    /// `vm.diff`: the workspace's changes since `vm.run` uploaded it, sent as `download`
    /// notifications (stream `patch`).
    pub fn diff(&self, ctx: &CallContext, params: &NameParams) -> ServiceResult<VmDiffResult> {
        let vm = self.show(&params.name)?;
        let dir = PathBuf::from(&vm.dir);
        let workspace = baseline_workspace(&dir)
            .map_err(|e| ServiceError::bad_request(format!("VM {:?}: {e:#}", vm.name)))?;
        let client = self.agent(&vm)?;
        send_patch(ctx, &client, &dir, &workspace)
            .with_context(|| format!("diff the workspace of VM {:?}", vm.name))
            .map(|(guest, counts, bytes)| VmDiffResult {
                vm: vm.name.clone(),
                workspace: guest,
                changed: counts.changed,
                added: counts.added,
                deleted: counts.deleted,
                bytes,
            })
            .map_err(Into::into)
    }

    /// `vm.run`'s `patch`: as `vm.diff`, before the VM stops; a failure is the stream's
    /// end error.
    pub(super) fn send_run_patch(&self, ctx: &CallContext, client: &AgentClient, vm_dir: &Path) {
        let result = baseline_workspace(vm_dir).and_then(|w| send_patch(ctx, client, vm_dir, &w));
        if let Err(e) = result {
            let _ = DownloadWriter::new(ctx, DownloadStream::Patch, 0)
                .finish(0, Some(format!("{e:#}")));
        }
    }
}

/// Downloads `src` from the guest into `download` notifications of `stream`; the end
/// carries the outcome. Returns (bytes, skipped).
fn send_download(
    ctx: &CallContext,
    client: &AgentClient,
    src: &Path,
    stream: DownloadStream,
    index: u32,
) -> anyhow::Result<(u64, u64)> {
    let mut writer = DownloadWriter::new(ctx, stream, index);
    match client.download(src, &mut writer) {
        Ok(skipped) => {
            let bytes = writer.finish(u64::from(skipped), None)?;
            Ok((bytes, u64::from(skipped)))
        }
        Err(e) => {
            let e = anyhow::Error::new(e);
            let _ = writer.finish(0, Some(format!("{e:#}")));
            Err(e)
        }
    }
}

/// What `vm.run` recorded about the workspace it uploaded into the VM whose directory is
/// `dir`: its name, when a baseline was kept.
#[derive(serde::Serialize, serde::Deserialize)]
struct BaselineMeta {
    workspace: String,
    /// False when the upload passed [`MAX_BASELINE_BYTES`].
    kept: bool,
}

fn baseline_workspace(dir: &Path) -> anyhow::Result<String> {
    let meta = match std::fs::read(dir.join(BASELINE_META)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("no workspace baseline: only `vm run PATH` uploads one to compare with")
        }
        Err(e) => return Err(e).context(format!("read {}", dir.join(BASELINE_META).display())),
    };
    let meta: BaselineMeta = serde_json::from_slice(&meta).context("decode the baseline record")?;
    if !meta.kept {
        bail!(
            "the workspace upload passed {MAX_BASELINE_BYTES} bytes (MAX_BASELINE_BYTES), so no \
             baseline was kept"
        );
    }
    Ok(meta.workspace)
}

/// Downloads `/root/<workspace>` and streams its patch against the baseline; returns the
/// guest directory, the counts and the patch's size.
fn send_patch(
    ctx: &CallContext,
    client: &AgentClient,
    vm_dir: &Path,
    workspace: &str,
) -> anyhow::Result<(String, diff::DiffCounts, u64)> {
    let guest = format!("/root/{workspace}");
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let (patch, counts) = std::thread::scope(|s| {
        let downloader = s.spawn(|| {
            let mut sink = ChannelWriter { tx };
            client.download(Path::new(&guest), &mut sink)
        });
        let parsed = diff::diff(
            &vm_dir.join(BASELINE_TAR),
            banger_client::copy::channel_reader(rx),
        );
        // The parser stopped early (an error): the downloader's sends fail and it ends.
        let downloaded = downloader
            .join()
            .expect("the download thread does not panic");
        match (parsed, downloaded) {
            (Ok(p), Ok(_)) => Ok(p),
            (_, Err(e)) => Err(anyhow::Error::new(e)),
            (Err(e), Ok(_)) => Err(e),
        }
    })?;
    let mut writer = DownloadWriter::new(ctx, banger_api::DownloadStream::Patch, 0);
    writer.write_all(patch.as_bytes())?;
    let bytes = writer.finish(0, None)?;
    Ok((guest, counts, bytes))
}

struct ChannelWriter {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tx
            .send(data.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the diff stopped reading"))?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Keeps the workspace upload of `vm.run` as the baseline of `vm.diff`, up to
/// [`MAX_BASELINE_BYTES`]: a bigger one is dropped and recorded as not kept.
pub(super) struct BaselineKeeper {
    dir: PathBuf,
    workspace: String,
    file: Option<std::fs::File>,
    written: u64,
}

impl BaselineKeeper {
    pub(super) fn new(dir: &Path, workspace: &str) -> anyhow::Result<BaselineKeeper> {
        let path = dir.join(BASELINE_TAR);
        let file =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(BaselineKeeper {
            dir: dir.to_owned(),
            workspace: workspace.to_owned(),
            file: Some(file),
            written: 0,
        })
    }

    /// Records the outcome once the upload is complete.
    pub(super) fn finish(self) -> anyhow::Result<()> {
        let kept = self.file.is_some();
        if let Some(f) = &self.file {
            f.sync_all().ok();
        } else {
            let _ = std::fs::remove_file(self.dir.join(BASELINE_TAR));
        }
        let meta = BaselineMeta {
            workspace: self.workspace.clone(),
            kept,
        };
        let path = self.dir.join(BASELINE_META);
        std::fs::write(&path, serde_json::to_vec(&meta)?)
            .with_context(|| format!("write {}", path.display()))
    }
}

impl Write for BaselineKeeper {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.file.is_some() {
            self.written += data.len() as u64;
            if self.written > MAX_BASELINE_BYTES {
                self.file = None;
            } else if let Some(f) = &mut self.file {
                f.write_all(data)?;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_renames_the_root_and_refuses_escapes_and_hard_links() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "src", &b""[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o600);
        b.append_data(&mut h, "src/a", &b"hi"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "src/l", "/etc").unwrap();
        let input = b.into_inner().unwrap();
        let mut out = Vec::new();
        let (n, root) = rewrite(&input[..], &mut out, Some(&OsString::from("dst"))).unwrap();
        assert_eq!((n, root), (3, OsString::from("src")));
        assert_eq!(
            banger_testkit::tar_member_names(&out),
            ["dst", "dst/a", "dst/l"]
        );

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "src", "/etc/shadow").unwrap();
        let err = rewrite(&b.into_inner().unwrap()[..], &mut Vec::new(), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("only files, directories and symlinks"),
            "{err}"
        );
    }

    #[test]
    fn guest_paths_must_be_absolute_without_dotdot() {
        assert!(guest_path("src", "/root/out").is_ok());
        for bad in ["root/out", "/root/../etc", ""] {
            assert!(guest_path("src", bad).is_err(), "{bad}");
        }
    }
}
