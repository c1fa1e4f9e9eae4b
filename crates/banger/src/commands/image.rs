//! `banger image …`: pull, import, list, show, remove, and the layer cache's prune.

use std::process::ExitCode;

use anyhow::Context;
use banger_api::{
    ImageCachePrune, ImageCachePruneParams, ImageImport, ImageImportParams, ImageList,
    ImageNameParams, ImagePull, ImagePullParams, ImageRm, ImageShow, NoParams,
};
use banger_client::rpc::Client;
use clap::Subcommand;

use crate::format;
use crate::output::{call, call_showing_progress, call_streaming, emit, FileToStream};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry and build its root filesystem.
    Pull {
        /// Image reference, e.g. debian:bookworm or 127.0.0.1:5000/x:tag.
        reference: String,
        /// Name to publish under (default: derived from the reference, e.g. debian-bookworm).
        #[arg(long)]
        name: Option<String>,
        /// Size of the root filesystem (default: max(content x 1.5, 1 GiB)), e.g. 4GiB.
        #[arg(long, value_name = "SIZE", value_parser = format::parse_size)]
        size: Option<u64>,
    },
    /// Build an image from an OCI layout directory (DIR or DIR:TAG), an OCI archive
    /// (FILE or FILE:TAG) or a `docker save` tarball, without a registry. A remote daemon
    /// gets the file, or the directory as one tar, streamed over the connection.
    Import {
        /// The layout directory or tarball.
        path: std::path::PathBuf,
        /// Name to publish under (default: derived from the path).
        #[arg(long)]
        name: Option<String>,
        /// Size of the root filesystem (default: max(content x 1.5, 1 GiB)), e.g. 4GiB.
        #[arg(long, value_name = "SIZE", value_parser = format::parse_size)]
        size: Option<u64>,
    },
    /// List images.
    List,
    /// Show one image.
    Show {
        /// The image's name.
        name: String,
    },
    /// Delete an image's root filesystem and record.
    Rm {
        /// The image's name.
        name: String,
    },
    /// The OCI layer cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Remove cached layer blobs. Images never depend on the cache, so this cannot break one;
    /// the next pull of the same image downloads its layers again. Blobs that a running pull
    /// is using are kept.
    Prune {
        /// Report what would be freed without removing anything.
        #[arg(long)]
        dry_run: bool,
        /// Keep the most recently used blobs that fit in SIZE (e.g. 10GiB).
        #[arg(long, value_name = "SIZE", value_parser = format::parse_size)]
        keep_storage: Option<u64>,
        /// Remove only blobs unused for at least DURATION (e.g. 30m, 12h, 7d).
        #[arg(long, value_name = "DURATION", value_parser = format::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
}

/// Runs one `banger image` command.
///
/// `local`: the daemon shares this filesystem, so `import` names the path; otherwise the
/// CLI streams the file over the connection.
pub fn run(
    client: &mut Client,
    command: ImageCommand,
    json: bool,
    local: bool,
) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Pull {
            reference,
            name,
            size,
        } => {
            let params = ImagePullParams {
                reference,
                name,
                size_bytes: size,
            };
            let info = call_showing_progress::<ImagePull>(client, &params, json)?;
            emit(json, &info, |info| {
                println!(
                    "pulled {} as {} ({}, {})",
                    info.reference,
                    info.name,
                    info.manifest_digest,
                    format::format_bytes(info.size_bytes)
                )
            })?;
        }
        ImageCommand::Import { path, name, size } => {
            // The daemon has its own working directory: send an absolute path.
            let path = std::path::absolute(&path)
                .with_context(|| format!("resolve {}", path.display()))?;
            let info = if local {
                let params = ImageImportParams {
                    path: Some(path.display().to_string()),
                    stream: None,
                    tag: None,
                    name,
                    size_bytes: size,
                };
                call_showing_progress::<ImageImport>(client, &params, json)?
            } else {
                let peer = client.peer().to_owned();
                // An OCI layout directory (DIR, or DIR:TAG as skopeo names one) goes as
                // one tar of its files; any other path as the file it is.
                let (layout_dir, tag) = match path.to_str().and_then(|p| p.rsplit_once(':')) {
                    _ if path.is_dir() => (Some(path.clone()), None),
                    Some((dir, tag)) if !path.exists() && std::path::Path::new(dir).is_dir() => {
                        (Some(dir.into()), Some(tag.to_owned()))
                    }
                    _ => (None, None),
                };
                let upload = match &layout_dir {
                    Some(dir) => FileToStream::layout(dir)?,
                    None => FileToStream::open(&path, "image archive", &peer)?,
                };
                let params = ImageImportParams {
                    path: None,
                    stream: Some(upload.declared.clone()),
                    tag,
                    name,
                    size_bytes: size,
                };
                call_streaming::<ImageImport>(client, &params, upload, json)?
            };
            emit(json, &info, |info| {
                println!(
                    "imported {} as {} ({})",
                    info.reference,
                    info.name,
                    format::format_bytes(info.size_bytes)
                )
            })?;
        }
        ImageCommand::List => emit(json, &call::<ImageList>(client, &NoParams {})?, |list| {
            print_image_table(&list.images)
        })?,
        ImageCommand::Show { name } => emit(
            json,
            &call::<ImageShow>(client, &ImageNameParams { name })?,
            |info| {
                println!("name:      {}", info.name);
                println!("id:        {}", info.id);
                println!("reference: {}", info.reference);
                println!("manifest:  {}", info.manifest_digest);
                println!("config:    {}", info.config_digest);
                println!("size:      {}", format::format_bytes(info.size_bytes));
                println!("created:   {}", info.created_at);
                println!("rootfs:    {}", info.rootfs);
            },
        )?,
        ImageCommand::Rm { name } => emit(
            json,
            &call::<ImageRm>(client, &ImageNameParams { name })?,
            |info| println!("removed {} ({})", info.name, info.id),
        )?,
        ImageCommand::Cache {
            command:
                CacheCommand::Prune {
                    dry_run,
                    keep_storage,
                    older_than,
                },
        } => {
            let params = ImageCachePruneParams {
                dry_run,
                keep_storage_bytes: keep_storage,
                older_than_seconds: older_than.map(|d| d.as_secs()),
            };
            emit(json, &call::<ImageCachePrune>(client, &params)?, |result| {
                println!(
                    "{} {} across {} blob(s) in {}",
                    if result.dry_run {
                        "would free"
                    } else {
                        "freed"
                    },
                    format::format_bytes(result.bytes_freed),
                    result.blobs_freed,
                    result.cache_dir
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_image_table(images: &[banger_api::ImageInfo]) {
    let width = crate::format::name_width(images.iter().map(|i| i.name.as_str()));
    println!(
        "{:<width$}  {:>9}  {:<20}  REFERENCE",
        "NAME", "SIZE", "CREATED"
    );
    for image in images {
        println!(
            "{:<width$}  {:>9}  {:<20}  {}",
            image.name,
            format::format_bytes(image.size_bytes),
            image.created_at,
            image.reference
        );
    }
}
