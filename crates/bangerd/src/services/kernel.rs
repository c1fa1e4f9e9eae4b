//! Guest kernels: imported from Debian `linux-image-*` packages into
//! `<state>/kernels/<name>/`, each with banger's initramfs built next to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use banger_api::{KernelImportParams, KernelInfo};
use banger_vmm::initramfs::{write_initramfs, InitramfsSpec, DEFAULT_BUSYBOX};
use banger_vmm::kernel::{import_deb, KernelDir, GUEST_MODULES};
use rusqlite::OptionalExtension;

use crate::layout::Layout;
use crate::store::Store;
use crate::ServiceError;

/// The initramfs file inside a kernel directory.
pub const INITRAMFS: &str = "initramfs.cpio";

/// Imports and keeps guest kernels.
#[derive(Debug)]
pub struct KernelService {
    layout: Layout,
    store: Arc<Store>,
}

/// What booting a kernel needs.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// The kernel to hand the VMM (ELF vmlinux: it boots faster under TCG).
    pub kernel: PathBuf,
    /// banger's initramfs for it.
    pub initrd: PathBuf,
}

impl KernelService {
    /// The service for `layout`.
    pub fn new(layout: Layout, store: Arc<Store>) -> Self {
        KernelService { layout, store }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.layout.kernels_dir().join(name)
    }

    /// Imports the package at `params.deb` as `params.name`: kernel, config and the virtio,
    /// ext4 and vsock modules, an uncompressed vmlinux, and the initramfs.
    pub fn import(&self, params: &KernelImportParams) -> Result<KernelInfo, ServiceError> {
        crate::services::vm::validate_name("kernel", &params.name)?;
        let deb = Path::new(&params.deb);
        if !deb.is_absolute() {
            return Err(ServiceError::bad_request(format!(
                "kernel package path {:?} must be absolute",
                params.deb
            )));
        }
        if !deb.is_file() {
            return Err(ServiceError::not_found(format!(
                "no kernel package at {}",
                deb.display()
            )));
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
        let kernel = import_deb(deb, &dest, GUEST_MODULES)
            .with_context(|| format!("import kernel package {}", deb.display()))?;
        let built = (|| -> anyhow::Result<()> {
            kernel.ensure_vmlinux().context("extract vmlinux")?;
            let spec = InitramfsSpec {
                busybox: DEFAULT_BUSYBOX.into(),
                kernel: Some(kernel.clone()),
            };
            write_initramfs(&spec, &dest.join(INITRAMFS)).context("build initramfs")?;
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
        };
        self.store
            .conn()
            .execute(
                "INSERT INTO kernels (name, version, created_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![info.name, info.version, info.created_at],
            )
            .context("record kernel")?;
        Ok(info)
    }

    fn find(&self, name: &str) -> Result<Option<KernelInfo>, ServiceError> {
        let row = self
            .store
            .conn()
            .query_row(
                "SELECT name, version, created_at FROM kernels WHERE name = ?1",
                [name],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
            .context("look up kernel")?;
        Ok(row.map(|(name, version, created_at)| KernelInfo {
            dir: self.dir(&name).display().to_string(),
            name,
            version,
            created_at,
        }))
    }

    /// Every kernel, newest first.
    pub fn list(&self) -> Result<Vec<KernelInfo>, ServiceError> {
        let conn = self.store.conn();
        let mut stmt = conn
            .prepare("SELECT name, version, created_at FROM kernels ORDER BY created_at DESC, name")
            .context("list kernels")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .context("list kernels")?;
        let mut kernels = Vec::new();
        for row in rows {
            let (name, version, created_at) = row.context("list kernels")?;
            kernels.push(KernelInfo {
                dir: self.dir(&name).display().to_string(),
                name,
                version,
                created_at,
            });
        }
        Ok(kernels)
    }

    /// The kernel called `name`.
    pub fn show(&self, name: &str) -> Result<KernelInfo, ServiceError> {
        self.find(name)?
            .ok_or_else(|| ServiceError::not_found(format!("no kernel named {name:?}")))
    }

    /// Deletes a kernel that no VM uses.
    pub fn remove(&self, name: &str) -> Result<KernelInfo, ServiceError> {
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
    pub fn resolve(
        &self,
        name: Option<&str>,
        default: Option<&str>,
    ) -> Result<KernelInfo, ServiceError> {
        match name.or(default) {
            Some(name) => self.show(name),
            None => self.list()?.into_iter().next().ok_or_else(|| {
                ServiceError::not_found(
                    "no kernel imported: run `banger kernel import NAME --deb linux-image-*.deb`",
                )
            }),
        }
    }

    /// Boot files of the kernel called `name`.
    pub fn boot_files(&self, name: &str) -> Result<BootFiles, ServiceError> {
        let dir = self.dir(name);
        let kernel = KernelDir::open(&dir).with_context(|| format!("open kernel {name:?}"))?;
        Ok(BootFiles {
            kernel: kernel
                .ensure_vmlinux()
                .with_context(|| format!("vmlinux of kernel {name:?}"))?,
            initrd: dir.join(INITRAMFS),
        })
    }
}
