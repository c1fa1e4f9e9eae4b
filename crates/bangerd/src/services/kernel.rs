//! Guest kernels: imported from Debian `linux-image-*` packages or from a kernel image
//! (plus an optional modules tree) into `<state>/kernels/<name>/`, each with banger's
//! initramfs built next to it, or with the caller's own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use banger_api::{KernelImportParams, KernelInfo, KernelInitrd};
use banger_vmm::initramfs::{write_initramfs, InitramfsSpec, DEFAULT_BUSYBOX};
use banger_vmm::kernel::{import_deb, import_files, KernelDir, KernelFiles, GUEST_MODULES};

use crate::layout::Layout;
use crate::services::{exactly_one, upload, CallContext, OneOf};
use crate::store::Store;
use crate::{ServiceError, ServiceResult};

/// The initramfs banger builds, inside a kernel directory.
pub const INITRAMFS: &str = "initramfs.cpio";
/// The caller's initramfs (`initrd` at import), copied into the kernel directory.
pub const CUSTOM_INITRD: &str = "initrd.custom";

/// Name prefix of the staging directory a streamed `.deb` is received into, next to the
/// kernel dirs: one of [`banger_vmm::kernel::IMPORT_STAGING_PREFIXES`], so start-up
/// removes what a crash leaves.
const STREAM_STAGING_PREFIX: &str = ".kernel-import-upload-";

/// The columns [`kernel_from_row`] reads, in its order.
const KERNEL_COLUMNS: &str = "name, version, created_at, initrd";

/// Imports and keeps guest kernels.
#[derive(Debug)]
pub struct KernelService {
    layout: Layout,
    store: Arc<Store>,
    max_payload: u64,
}

/// Default `kernel_max_payload_bytes`: a distribution kernel package is ~100 MiB, its
/// bzImage ~10 MiB; anything far bigger is not a kernel, and is read into memory.
pub const DEFAULT_MAX_KERNEL_PAYLOAD_BYTES: u64 = 512 << 20;

/// What booting a kernel needs.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// The kernel to hand the VMM (ELF vmlinux: it boots faster under TCG).
    pub kernel: PathBuf,
    /// The initramfs: banger's, or the one given at import.
    pub initrd: PathBuf,
}

/// Where an import takes the kernel from, validated.
enum Source<'a> {
    Deb(&'a Path),
    Files(KernelFiles),
}

/// `params.<param>` as an absolute path that exists (a file, or a directory when `dir`).
fn input_path<'a>(param: &str, value: &'a str, what: &str, dir: bool) -> ServiceResult<&'a Path> {
    let path = Path::new(value);
    if !path.is_absolute() {
        return Err(ServiceError::bad_request(format!(
            "{param} path {value:?} must be absolute"
        )));
    }
    let present = if dir { path.is_dir() } else { path.is_file() };
    if !present {
        return Err(ServiceError::not_found(format!(
            "no {what} at {} (given as {param})",
            path.display()
        )));
    }
    Ok(path)
}

impl KernelService {
    /// The service for `layout`.
    pub fn new(layout: Layout, store: Arc<Store>) -> Self {
        KernelService {
            layout,
            store,
            max_payload: DEFAULT_MAX_KERNEL_PAYLOAD_BYTES,
        }
    }

    /// The same service refusing input files (`.deb`, kernel, initrd) past `bytes`.
    pub fn with_max_payload(mut self, bytes: u64) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Refuses an input file bigger than the payload limit, naming it and the limit.
    fn check_payload(&self, param: &str, path: &Path) -> ServiceResult<()> {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        if size > self.max_payload {
            return Err(ServiceError::bad_request(format!(
                "{param} {} is {size} bytes, more than the limit of {} (kernel_max_payload_bytes)",
                path.display(),
                self.max_payload
            )));
        }
        Ok(())
    }

    /// [`KernelService::max_payload`] for a streamed file.
    fn upload_limit(&self) -> upload::UploadLimit {
        upload::UploadLimit {
            bytes: self.max_payload,
            name: "kernel_max_payload_bytes",
        }
    }

    /// The biggest input file an import reads (`kernel_max_payload_bytes`).
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// Where kernels live (pulls stage their downloads here).
    pub fn kernels_dir(&self) -> PathBuf {
        self.layout.kernels_dir()
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.layout.kernels_dir().join(name)
    }

    /// Start-up repair: removes the work dirs of imports a crash interrupted (an unpacked
    /// package can be hundreds of MiB). Returns how many went.
    pub fn recover(&self) -> anyhow::Result<usize> {
        let dir = self.layout.kernels_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.with_context(|| format!("list {}", dir.display()))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if banger_vmm::kernel::IMPORT_STAGING_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
            {
                let path = entry.path();
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("remove import leftover {}", path.display()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// [`KernelService::import`], taking a `deb_stream` from the call's upload: received
    /// into a private staging directory under the kernels directory (removed on every
    /// exit), then imported exactly as a `deb` on this host is. Blocking.
    pub fn import_call(
        &self,
        ctx: &CallContext,
        params: &KernelImportParams,
    ) -> ServiceResult<KernelInfo> {
        let Some(stream) = &params.deb_stream else {
            return self.import(params);
        };
        if params.deb.is_some() || params.kernel.is_some() {
            return Err(ServiceError::bad_request(
                "deb_stream excludes deb and kernel: give one (deb_stream: a linux-image-*.deb uploaded over the connection)",
            ));
        }
        if params.modules.is_some() || params.initrd.is_some() {
            return Err(ServiceError::bad_request(
                "deb_stream takes no modules or initrd (paths on the daemon's host): a deb brings its own modules",
            ));
        }
        crate::services::vm::validate_name("kernel", &params.name)?;
        // Refused before the upload is read.
        upload::check_declared("deb_stream", stream, self.upload_limit())?;
        if self.find(&params.name)?.is_some() {
            return Err(ServiceError::already_exists(format!(
                "a kernel named {:?} already exists",
                params.name
            )));
        }
        let staged = upload::receive_file(
            ctx,
            "deb_stream",
            stream,
            self.upload_limit(),
            &self.layout.kernels_dir(),
            STREAM_STAGING_PREFIX,
            "upload.deb",
        )?;
        let local = KernelImportParams {
            deb: Some(staged.path().display().to_string()),
            deb_stream: None,
            ..params.clone()
        };
        let imported = self.import(&local);
        drop(staged);
        imported.map_err(|e| ServiceError {
            kind: e.kind,
            error: e
                .error
                .context(format!("import streamed deb {:?}", stream.file_name)),
        })
    }

    /// Imports `params.deb`, or `params.kernel` with `params.modules`, as `params.name`:
    /// an uncompressed vmlinux, the virtio, ext4 and vsock modules (when there are any),
    /// and banger's initramfs, or a copy of `params.initrd` in its place.
    pub fn import(&self, params: &KernelImportParams) -> ServiceResult<KernelInfo> {
        crate::services::vm::validate_name("kernel", &params.name)?;
        // Combinations first: they are wrong whatever the paths hold.
        if params.modules.is_some() && params.initrd.is_some() {
            return Err(ServiceError::bad_request(
                "modules and initrd exclude each other: modules go into banger's initramfs, which initrd replaces",
            ));
        }
        if params.deb_stream.is_some() {
            return Err(ServiceError::bad_request(
                "deb_stream needs the caller's connection to upload over (kernel.import over RPC)",
            ));
        }
        let given = exactly_one(
            &params.deb,
            &params.kernel,
            "deb and kernel exclude each other: give one (deb: a linux-image-*.deb; kernel: a bzImage or vmlinux)",
            "give deb (a linux-image-*.deb) or kernel (a bzImage or vmlinux)",
        )?;
        let source = match given {
            OneOf::First(_) if params.modules.is_some() => {
                return Err(ServiceError::bad_request(
                    "modules goes with kernel: a deb brings its own modules",
                ))
            }
            OneOf::First(deb) => Source::Deb(input_path("deb", deb, "kernel package", false)?),
            OneOf::Second(kernel) => Source::Files(KernelFiles {
                kernel: input_path("kernel", kernel, "kernel image", false)?.to_owned(),
                config: None,
                modules: match &params.modules {
                    Some(m) => {
                        Some(input_path("modules", m, "modules directory", true)?.to_owned())
                    }
                    None => None,
                },
                version: None,
            }),
        };
        let custom_initrd = match &params.initrd {
            Some(i) => Some(input_path("initrd", i, "initramfs", false)?),
            None => None,
        };
        match &source {
            Source::Deb(deb) => self.check_payload("deb", deb)?,
            Source::Files(files) => self.check_payload("kernel", &files.kernel)?,
        }
        if let Some(initrd) = custom_initrd {
            self.check_payload("initrd", initrd)?;
        }
        if self.find(&params.name)?.is_some() {
            return Err(ServiceError::already_exists(format!(
                "a kernel named {:?} already exists",
                params.name
            )));
        }
        let dest = self.dir(&params.name);
        if dest.exists() {
            // Left by an import that crashed before recording it.
            std::fs::remove_dir_all(&dest).with_context(|| format!("remove {}", dest.display()))?;
        }
        std::fs::create_dir_all(self.layout.kernels_dir()).context("create kernels dir")?;
        let (imported, what) = match &source {
            Source::Deb(deb) => (
                import_deb(deb, &dest, GUEST_MODULES),
                format!("import kernel package {}", deb.display()),
            ),
            Source::Files(files) => (
                import_files(files, &dest, GUEST_MODULES),
                format!("import kernel {}", files.kernel.display()),
            ),
        };
        let kernel = imported.map_err(|e| match e {
            // The caller chose the wrong file; anything else is ours or the system's.
            banger_vmm::Error::BadInput { .. } | banger_vmm::Error::MissingModule { .. } => {
                ServiceError::bad_request(e)
            }
            e => anyhow::Error::new(e).context(what).into(),
        })?;
        let built = (|| -> anyhow::Result<()> {
            kernel.ensure_vmlinux().context("extract vmlinux")?;
            match custom_initrd {
                // Copied, not referenced: a kernel directory stays bootable whatever
                // happens to the file it was imported from.
                Some(initrd) => {
                    std::fs::copy(initrd, dest.join(CUSTOM_INITRD))
                        .with_context(|| format!("copy initramfs {}", initrd.display()))?;
                }
                None => {
                    let spec = InitramfsSpec {
                        busybox: DEFAULT_BUSYBOX.into(),
                        kernel: Some(kernel.clone()),
                    };
                    write_initramfs(&spec, &dest.join(INITRAMFS)).context("build initramfs")?;
                }
            }
            Ok(())
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&dest);
            return Err(e.into());
        }
        let info = KernelInfo {
            name: params.name.clone(),
            version: kernel.version().to_owned(),
            created_at: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            dir: dest.display().to_string(),
            initrd: if custom_initrd.is_some() {
                KernelInitrd::Custom
            } else {
                KernelInitrd::Banger
            },
        };
        self.store
            .conn()
            .execute(
                "INSERT INTO kernels (name, version, created_at, initrd) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![
                    info.name,
                    info.version,
                    info.created_at,
                    info.initrd.as_str()
                ],
            )
            .context("record kernel")?;
        Ok(info)
    }

    fn find(&self, name: &str) -> ServiceResult<Option<KernelInfo>> {
        Ok(self.store.optional_row(
            "look up kernel",
            &format!("SELECT {KERNEL_COLUMNS} FROM kernels WHERE name = ?1"),
            [name],
            |r| self.kernel_from_row(r),
        )?)
    }

    /// A kernel's record, from a row of [`KERNEL_COLUMNS`].
    fn kernel_from_row(&self, row: &rusqlite::Row<'_>) -> rusqlite::Result<KernelInfo> {
        let name: String = row.get(0)?;
        Ok(KernelInfo {
            dir: self.dir(&name).display().to_string(),
            name,
            version: row.get(1)?,
            created_at: row.get(2)?,
            initrd: super::vm::parse_column(row, 3)?,
        })
    }

    /// Every kernel, newest first.
    pub fn list(&self) -> ServiceResult<Vec<KernelInfo>> {
        let conn = self.store.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {KERNEL_COLUMNS} FROM kernels ORDER BY created_at DESC, name"
            ))
            .context("list kernels")?;
        let kernels = stmt
            .query_map([], |r| self.kernel_from_row(r))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .context("list kernels")?;
        Ok(kernels)
    }

    /// The kernel called `name`.
    pub fn show(&self, name: &str) -> ServiceResult<KernelInfo> {
        self.find(name)?
            .ok_or_else(|| ServiceError::not_found(format!("no kernel named {name:?}")))
    }

    /// Deletes a kernel that no VM uses.
    pub fn remove(&self, name: &str) -> ServiceResult<KernelInfo> {
        let info = self.show(name)?;
        let users: i64 = self
            .store
            .conn()
            .query_row("SELECT COUNT(*) FROM vms WHERE kernel = ?1", [name], |r| {
                r.get(0)
            })
            .context("count VMs using the kernel")?;
        if users > 0 {
            return Err(ServiceError::bad_request(format!(
                "kernel {name:?} is used by {users} VM(s); remove them first"
            )));
        }
        self.store
            .conn()
            .execute("DELETE FROM kernels WHERE name = ?1", [name])
            .context("delete kernel record")?;
        std::fs::remove_dir_all(self.dir(name)).with_context(|| format!("remove {}", info.dir))?;
        Ok(info)
    }

    /// The kernel to boot: `name`, else `default`, else the newest import.
    pub fn resolve(&self, name: Option<&str>, default: Option<&str>) -> ServiceResult<KernelInfo> {
        match name.or(default) {
            Some(name) => self.show(name),
            None => self.list()?.into_iter().next().ok_or_else(|| {
                ServiceError::not_found(
                    "no kernel imported: run `banger kernel import NAME --deb linux-image-*.deb` (or --kernel vmlinuz)",
                )
            }),
        }
    }

    /// Boot files of the kernel called `name`.
    pub fn boot_files(&self, name: &str) -> ServiceResult<BootFiles> {
        let info = self.show(name)?;
        let dir = self.dir(name);
        let kernel = KernelDir::open(&dir).with_context(|| format!("open kernel {name:?}"))?;
        Ok(BootFiles {
            kernel: kernel
                .ensure_vmlinux()
                .with_context(|| format!("vmlinux of kernel {name:?}"))?,
            initrd: dir.join(match info.initrd {
                KernelInitrd::Custom => CUSTOM_INITRD,
                KernelInitrd::Banger => INITRAMFS,
            }),
        })
    }
}
