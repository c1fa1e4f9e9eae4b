//! How every command prints: JSON (`--json`) or prose, from one place; and the two ways of
//! making a call (plain, or drawing its progress on a terminal).

use std::io::IsTerminal;

use anyhow::Context;
use banger_client::rpc::{CallError, Client};
use serde::Serialize;

use crate::progress;

/// Prints `value` as pretty JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encode result")?
    );
    Ok(())
}

/// Prints `value` as JSON when `json`, else as `prose` words it.
pub fn emit<T: Serialize>(json: bool, value: &T, prose: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        print_json(value)
    } else {
        prose(value);
        Ok(())
    }
}

/// Calls `M`.
pub fn call<M: banger_api::Method>(
    client: &mut Client,
    params: &M::Params,
) -> anyhow::Result<M::Result> {
    client.call::<M>(params).map_err(anyhow::Error::from)
}

/// Calls `M`, drawing its progress notifications as bars when stderr is a terminal and
/// the output is not JSON.
pub fn call_showing_progress<M: banger_api::Method>(
    client: &mut Client,
    params: &M::Params,
    json: bool,
) -> anyhow::Result<M::Result> {
    let mut bars = progress::Bars::new(!json && std::io::stderr().is_terminal());
    let result = client.call_with_progress::<M>(params, |p| bars.update(&p));
    bars.finish();
    result.map_err(anyhow::Error::from)
}

/// A file the CLI streams to its daemon instead of naming its path: its bytes, with the
/// [`banger_api::StreamedFile`] declaring them.
pub struct FileToStream {
    source: Box<dyn std::io::Read + Send>,
    /// What the call's params declare.
    pub declared: banger_api::StreamedFile,
    path: std::path::PathBuf,
}

impl FileToStream {
    /// Opens `path` (a regular file; `what` names it in messages) to stream to `peer`.
    pub fn open(path: &std::path::Path, what: &str, peer: &str) -> anyhow::Result<FileToStream> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("open {what} {} to stream to {peer}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("stat {what} {}", path.display()))?;
        if !meta.is_file() {
            anyhow::bail!(
                "{what} {} is not a regular file: only a file can be streamed to the daemon at {peer}",
                path.display()
            );
        }
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(FileToStream {
            source: Box::new(file),
            declared: banger_api::StreamedFile {
                bytes: meta.len(),
                file_name,
            },
            path: path.to_owned(),
        })
    }

    /// The OCI layout directory `dir` as one tar, written into the upload as it is read
    /// (banger_client::layout_archive): its size is planned up front, so nothing is staged.
    pub fn layout(dir: &std::path::Path) -> anyhow::Result<FileToStream> {
        let archive = banger_client::layout_archive::LayoutArchive::plan(dir)?;
        let file_name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (reader, writer) = std::io::pipe().context("make the layout's upload pipe")?;
        let declared = banger_api::StreamedFile {
            bytes: archive.bytes,
            file_name,
        };
        let shown = dir.to_owned();
        std::thread::Builder::new()
            .name("banger-layout-tar".into())
            .spawn(move || {
                // A failure cuts the stream short, which the daemon refuses; say why here.
                if let Err(e) = archive.write_to(writer) {
                    eprintln!("banger: {e:#}");
                }
            })
            .context("start the layout's tar writer")?;
        Ok(FileToStream {
            source: Box::new(reader),
            declared,
            path: shown,
        })
    }
}

/// Calls `M` while streaming `upload` as the call's `upload` notifications (exactly its
/// declared bytes, then the end), drawing progress as [`call_showing_progress`] does.
pub fn call_streaming<M: banger_api::Method>(
    client: &mut Client,
    params: &M::Params,
    upload: FileToStream,
    json: bool,
) -> anyhow::Result<M::Result> {
    let mut bars = progress::Bars::new(!json && std::io::stderr().is_terminal());
    let result = client.call_with_input::<M>(
        params,
        |note| {
            if note.method == banger_api::PROGRESS_NOTIFICATION {
                if let Ok(p) = serde_json::from_value(note.params) {
                    bars.update(&p);
                }
            }
        },
        |input| {
            std::thread::Builder::new()
                .name("banger-upload".into())
                .spawn(move || {
                    use std::io::Read;
                    let FileToStream {
                        source,
                        declared,
                        path,
                    } = upload;
                    let mut writer = banger_client::workspace::UploadWriter::new(input.clone());
                    // Exactly what was declared: a file that grew meanwhile is cut, one
                    // that shrank ends short (and the daemon says so).
                    let copied = std::io::copy(&mut source.take(declared.bytes), &mut writer);
                    if let Err(e) = copied {
                        if input.is_done() {
                            return;
                        }
                        eprintln!("banger: read {}: {e}", path.display());
                    }
                    let _ = writer.finish();
                })
                .map(drop)
        },
    );
    bars.finish();
    result.map_err(anyhow::Error::from)
}

/// Prints a failure: on stderr always (with the error kind and op_id the daemon gave), and
/// as `{"error": …}` on stdout with `--json`.
pub fn report_error(error: &anyhow::Error, json: bool) {
    if let Some(CallError::Rpc(rpc)) = error.downcast_ref::<CallError>() {
        if json {
            println!("{}", serde_json::json!({ "error": rpc }));
        }
        eprintln!(
            "banger: {} [{}, {}]",
            rpc.message, rpc.data.kind, rpc.data.op_id
        );
    } else {
        if json {
            println!(
                "{}",
                serde_json::json!({ "error": { "message": format!("{error:#}") } })
            );
        }
        eprintln!("banger: {error:#}");
    }
}
