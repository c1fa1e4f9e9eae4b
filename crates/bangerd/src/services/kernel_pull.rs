//! `kernel.pull`: a guest kernel fetched rather than handed over. Without a reference, the
//! host distribution's cloud kernel package through apt (what `linux-image-cloud-amd64`
//! depends on, `apt-get download` into a staging directory); with one, a kernel artifact
//! from an OCI registry (docs/kernel-artifact.md) through the same client and verified
//! layer cache as images. Either way the files end in [`KernelService::import`].

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::Context;
use banger_api::{KernelImportParams, KernelPullParams, KernelPullResult, KernelSource};
use banger_oci::reference::ImageRef;
use banger_oci::registry::LayerDescriptor;

use super::image::{registry_error, ImageService};
use super::kernel::KernelService;
use super::tool;
use crate::span::blocking;
use crate::{ServiceError, ServiceResult};

/// The distribution's meta package whose dependency is the cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The `artifactType` (or config media type) of a banger kernel artifact.
pub const KERNEL_ARTIFACT_TYPE: &str = "application/vnd.banger.kernel.v1";
/// The kernel image blob: an x86 bzImage or an x86-64 ELF vmlinux, as is.
pub const KERNEL_IMAGE_MEDIA_TYPE: &str = "application/vnd.banger.kernel.image.v1";
/// The modules blob: a tar of `/lib/modules/<release>/` (its root holds `kernel/`).
pub const KERNEL_MODULES_MEDIA_TYPE: &str = "application/vnd.banger.kernel.modules.v1.tar";
/// The same, gzip-compressed.
pub const KERNEL_MODULES_GZIP_MEDIA_TYPE: &str =
    "application/vnd.banger.kernel.modules.v1.tar+gzip";
/// An initramfs to boot instead of banger's (as `kernel import --initrd`).
pub const KERNEL_INITRD_MEDIA_TYPE: &str = "application/vnd.banger.kernel.initrd.v1";

/// Most entries a modules tarball may hold (a Debian cloud kernel has about 4,000).
pub const MAX_MODULE_ENTRIES: u64 = 100_000;

/// Staging directories of pulls start with this (an import prefix, so start-up recovery
/// removes what a crash left).
const STAGING_PREFIX: &str = ".kernel-import-pull-";

/// Pulls a kernel as `params` says and imports it.
pub async fn pull(
    images: &ImageService,
    kernels: Arc<KernelService>,
    params: KernelPullParams,
) -> ServiceResult<KernelPullResult> {
    if let Some(name) = &params.name {
        crate::services::vm::validate_name("kernel", name)?;
    }
    match params.reference.clone() {
        None => blocking("kernel pull", move || pull_apt(&kernels, params.name)).await,
        Some(reference) => pull_oci(images, kernels, &reference, params.name).await,
    }
}

/// A kernel name from free text: lowercase letters, digits and `-`, at most 64.
fn name_from(text: &str) -> String {
    let mut name: String = text
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name.trim_matches('-').to_owned();
    name.truncate(64);
    let name = name.trim_end_matches('-').to_owned();
    if name.is_empty() {
        "kernel".into()
    } else {
        name
    }
}

/// A temp directory under the kernels directory (removed on drop, and at start-up).
fn staging(kernels: &KernelService) -> ServiceResult<tempfile::TempDir> {
    let dir = kernels.kernels_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(&dir)
        .with_context(|| format!("create a staging directory in {}", dir.display()))?)
}

/// The package `KERNEL_META_PACKAGE` depends on, from `apt-cache depends` output.
fn kernel_package(depends: &str) -> Option<&str> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        // A name apt would accept, nothing an argument could be mistaken for.
        .filter(|p| {
            p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".+-".contains(&b))
        })
}

/// Runs an apt tool (see [`tool::run`]), its stdout back.
fn run(command: &mut Command, what: &str) -> ServiceResult<String> {
    Ok(tool::run(command, what)?)
}

fn pull_apt(kernels: &KernelService, name: Option<String>) -> ServiceResult<KernelPullResult> {
    let depends = run(
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
        &format!("apt-cache depends {KERNEL_META_PACKAGE}"),
    )?;
    let package = kernel_package(&depends).ok_or_else(|| {
        ServiceError::not_found(format!(
            "apt-cache names no linux-image-* package behind {KERNEL_META_PACKAGE} (run apt-get update)"
        ))
    })?;
    let name = name.unwrap_or_else(|| name_from(package.trim_start_matches("linux-image-")));
    let stage = staging(kernels)?;
    // apt drops privileges to _apt for downloads; it must be able to write here.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(stage.path(), std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", stage.path().display()))?;
    run(
        Command::new("apt-get")
            .args(["download", "-qq", package])
            .current_dir(stage.path()),
        &format!("apt-get download {package}"),
    )?;
    let debs: Vec<PathBuf> = std::fs::read_dir(stage.path())
        .with_context(|| format!("list {}", stage.path().display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    let [deb] = debs.as_slice() else {
        return Err(anyhow::anyhow!(
            "expected one .deb from apt-get download {package}, got {}",
            debs.len()
        )
        .into());
    };
    let kernel = kernels.import(&KernelImportParams {
        name,
        deb: Some(deb.display().to_string()),
        deb_stream: None,
        kernel: None,
        modules: None,
        initrd: None,
    })?;
    Ok(KernelPullResult {
        kernel,
        source: KernelSource::Apt,
        package: Some(package.to_owned()),
        reference: None,
        manifest_digest: None,
    })
}

/// The blobs of a kernel artifact, by role.
struct KernelBlobs {
    kernel: LayerDescriptor,
    modules: Option<LayerDescriptor>,
    initrd: Option<LayerDescriptor>,
}

fn classify(reference: &str, blobs: &[LayerDescriptor]) -> ServiceResult<KernelBlobs> {
    let (mut kernel, mut modules, mut initrd) = (None, None, None);
    for blob in blobs {
        let slot = match blob.media_type.as_str() {
            KERNEL_IMAGE_MEDIA_TYPE => &mut kernel,
            KERNEL_MODULES_MEDIA_TYPE | KERNEL_MODULES_GZIP_MEDIA_TYPE => &mut modules,
            KERNEL_INITRD_MEDIA_TYPE => &mut initrd,
            other => {
                return Err(ServiceError::bad_request(format!(
                    "kernel artifact {reference}: unknown blob media type {other:?} (expected {KERNEL_IMAGE_MEDIA_TYPE}, {KERNEL_MODULES_GZIP_MEDIA_TYPE}, {KERNEL_MODULES_MEDIA_TYPE} or {KERNEL_INITRD_MEDIA_TYPE})"
                )))
            }
        };
        if slot.replace(blob.clone()).is_some() {
            return Err(ServiceError::bad_request(format!(
                "kernel artifact {reference}: more than one {} blob",
                blob.media_type
            )));
        }
    }
    let kernel = kernel.ok_or_else(|| {
        ServiceError::bad_request(format!(
            "kernel artifact {reference}: no {KERNEL_IMAGE_MEDIA_TYPE} blob"
        ))
    })?;
    Ok(KernelBlobs {
        kernel,
        modules,
        initrd,
    })
}

async fn pull_oci(
    images: &ImageService,
    kernels: Arc<KernelService>,
    reference: &str,
    name: Option<String>,
) -> ServiceResult<KernelPullResult> {
    let parsed = ImageRef::parse(reference).map_err(ServiceError::bad_request)?;
    let artifact = images
        .registry()
        .resolve_artifact(&parsed)
        .await
        .map_err(registry_error)?;
    if !artifact.is(KERNEL_ARTIFACT_TYPE) {
        return Err(ServiceError::bad_request(format!(
            "{reference} is not a kernel artifact: artifactType {:?}, config media type {:?} (expected {KERNEL_ARTIFACT_TYPE})",
            artifact.artifact_type.as_deref().unwrap_or(""),
            artifact.config_media_type
        )));
    }
    let blobs = classify(reference, &artifact.blobs)?;
    // Bounded before a byte is fetched; the download itself refuses more than declared.
    let max = kernels.max_payload();
    for blob in [
        Some(&blobs.kernel),
        blobs.modules.as_ref(),
        blobs.initrd.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if blob.size > max {
            return Err(ServiceError::bad_request(format!(
                "kernel artifact {reference}: blob {} ({}) is {} bytes, more than the limit of {max} (kernel_max_payload_bytes)",
                blob.digest, blob.media_type, blob.size
            )));
        }
    }
    let cache = images.cache();
    let all: Vec<LayerDescriptor> = [
        Some(&blobs.kernel),
        blobs.modules.as_ref(),
        blobs.initrd.as_ref(),
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    // Held until the import copied the files: no prune may take a blob we still read.
    let _lease = cache.lease(all.iter().map(|b| b.digest.clone()));
    for blob in &all {
        images
            .registry()
            .fetch_blob_into_cache(&parsed, blob, cache, |_| {})
            .await
            .map_err(registry_error)?;
    }
    let name = name.unwrap_or_else(|| {
        let repo = parsed.repository().rsplit('/').next().unwrap_or("kernel");
        match parsed.tag() {
            Some(tag) => name_from(&format!("{repo}-{tag}")),
            None => name_from(repo),
        }
    });
    let cache = Arc::clone(cache);
    let manifest_digest = artifact.manifest_digest.to_string();
    let reference = reference.to_owned();
    blocking("kernel pull", move || {
        let stage = staging(&kernels)?;
        let copy_out = |blob: &LayerDescriptor, file: &str| -> ServiceResult<PathBuf> {
            let path = stage.path().join(file);
            let mut from = cache
                .open(&blob.digest)
                .with_context(|| format!("open cached blob {}", blob.digest))?;
            let mut to = std::fs::File::create(&path)
                .with_context(|| format!("create {}", path.display()))?;
            std::io::copy(&mut from, &mut to)
                .with_context(|| format!("copy blob {} to {}", blob.digest, path.display()))?;
            Ok(path)
        };
        let kernel_path = copy_out(&blobs.kernel, "kernel")?;
        let initrd = blobs
            .initrd
            .as_ref()
            .map(|b| copy_out(b, "initrd"))
            .transpose()?;
        let modules = match &blobs.modules {
            Some(blob) => {
                let dir = stage.path().join("modules");
                let file = cache
                    .open(&blob.digest)
                    .with_context(|| format!("open cached blob {}", blob.digest))?;
                let reader: Box<dyn Read> = if blob.media_type == KERNEL_MODULES_GZIP_MEDIA_TYPE {
                    Box::new(flate2::read::GzDecoder::new(file))
                } else {
                    Box::new(file)
                };
                unpack_modules(reader, &dir, kernels.max_payload()).map_err(|e| {
                    ServiceError::bad_request(format!(
                        "kernel artifact {reference}: modules blob {}: {e:#}",
                        blob.digest
                    ))
                })?;
                Some(dir)
            }
            None => None,
        };
        let kernel = kernels.import(&KernelImportParams {
            name,
            deb: None,
            deb_stream: None,
            kernel: Some(kernel_path.display().to_string()),
            modules: modules.map(|m| m.display().to_string()),
            initrd: initrd.map(|i| i.display().to_string()),
        })?;
        Ok(KernelPullResult {
            kernel,
            source: KernelSource::Oci,
            package: None,
            reference: Some(reference),
            manifest_digest: Some(manifest_digest),
        })
    })
    .await
}

/// Unpacks a modules tarball into `dest` (created): plain files and directories only, at
/// relative paths without `..`, at most `max_bytes` of file data and
/// [`MAX_MODULE_ENTRIES`] entries. Links (a tree's `build` and `source`) are skipped: the
/// import reads modules, never through a link the artifact chose.
pub fn unpack_modules(reader: impl Read, dest: &Path, max_bytes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("create {}", dest.display()))?;
    let mut archive = tar::Archive::new(reader);
    let mut written = 0u64;
    let mut entries = 0u64;
    for entry in archive.entries().context("read the tar stream")? {
        let mut entry = entry.context("read a tar entry")?;
        entries += 1;
        if entries > MAX_MODULE_ENTRIES {
            anyhow::bail!("more than MAX_MODULE_ENTRIES ({MAX_MODULE_ENTRIES}) entries");
        }
        let path = entry.path().context("an entry's path")?.into_owned();
        let mut relative = PathBuf::new();
        for component in path.components() {
            match component {
                Component::Normal(part) => relative.push(part),
                Component::CurDir => {}
                _ => anyhow::bail!("entry {} leaves the modules tree", path.display()),
            }
        }
        if relative.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&relative);
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&target)
                .with_context(|| format!("create {}", target.display()))?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().context("an entry's size")?;
                written = written.saturating_add(size);
                if written > max_bytes {
                    anyhow::bail!(
                        "more than {max_bytes} bytes of files (kernel_max_payload_bytes)"
                    );
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("create {}", parent.display()))?;
                }
                let mut file = std::fs::File::create(&target)
                    .with_context(|| format!("create {}", target.display()))?;
                std::io::copy(&mut (&mut entry).take(size), &mut file)
                    .with_context(|| format!("write {}", target.display()))?;
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {}
            other => anyhow::bail!("entry {} is a {other:?}, not a file", path.display()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_package_is_the_linux_image_dependency() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            kernel_package(out),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(kernel_package("x\n  Depends: linux-image-$(rm)\n"), None);
        assert_eq!(kernel_package("x\n  Recommends: foo\n"), None);
    }

    #[test]
    fn names_are_derived_within_the_kernel_name_rules() {
        assert_eq!(name_from("6.1.0-56-cloud-amd64"), "6-1-0-56-cloud-amd64");
        assert_eq!(name_from("Kernels-V1.2"), "kernels-v1-2");
        assert_eq!(name_from("..."), "kernel");
        assert!(name_from(&"a.".repeat(100)).len() <= 64);
    }

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    #[test]
    fn unpack_writes_files_and_skips_links() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tar_of(|b| {
            file(b, "kernel/drivers/virtio.ko", b"ko");
            file(b, "./modules.order", b"order");
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "build", "/etc").unwrap();
        });
        let dest = tmp.path().join("m");
        unpack_modules(&data[..], &dest, 1 << 20).unwrap();
        assert_eq!(
            std::fs::read(dest.join("kernel/drivers/virtio.ko")).unwrap(),
            b"ko"
        );
        assert_eq!(std::fs::read(dest.join("modules.order")).unwrap(), b"order");
        assert!(std::fs::symlink_metadata(dest.join("build")).is_err());
    }

    #[test]
    fn unpack_refuses_escapes_devices_and_too_many_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        // The tar crate refuses to write `..` itself: patch the name into the header.
        let mut escape = tar_of(|b| file(b, "xx/evil.ko", b"x"));
        escape[..10].copy_from_slice(b"../evil.ko");
        let mut h = tar::Header::from_byte_slice(&escape[..512]).clone();
        h.set_cksum();
        escape[..512].copy_from_slice(h.as_bytes());
        let err = unpack_modules(&escape[..], &tmp.path().join("a"), 1 << 20).unwrap_err();
        assert_eq!(err.to_string(), "entry ../evil.ko leaves the modules tree");
        assert!(!tmp.path().join("evil.ko").exists());

        let fifo = tar_of(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Fifo);
            h.set_size(0);
            b.append_data(&mut h, "pipe", &[][..]).unwrap();
        });
        let err = unpack_modules(&fifo[..], &tmp.path().join("b"), 1 << 20).unwrap_err();
        assert_eq!(err.to_string(), "entry pipe is a Fifo, not a file");

        let big = tar_of(|b| file(b, "big.ko", &[0; 100]));
        let err = unpack_modules(&big[..], &tmp.path().join("c"), 99).unwrap_err();
        assert_eq!(
            err.to_string(),
            "more than 99 bytes of files (kernel_max_payload_bytes)"
        );
    }
}
