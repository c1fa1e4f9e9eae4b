//! Guest kernels: importing one (from a Debian `linux-image-*.deb`, or from a kernel
//! image plus an optional modules tree), resolving the modules the guest needs, and
//! turning a bzImage into the ELF `vmlinux` Firecracker wants.
//!
//! A kernel directory, once imported, is self-contained:
//!
//! ```text
//! <dir>/vmlinuz          the bzImage, as given (absent when an ELF vmlinux was imported)
//! <dir>/vmlinux          the uncompressed ELF kernel (Firecracker needs it; QEMU boots it too)
//! <dir>/config           the kernel's build config (only from a .deb)
//! <dir>/version          e.g. "6.1.0-56-cloud-amd64", or "unknown"
//! <dir>/modules/<m>.ko   uncompressed modules the guest needs, dependencies included
//! <dir>/modules.load     their names, one a line, in an order insmod accepts (empty for a
//!                        kernel imported without modules: it must have virtio built in)
//! ```

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::error::{format_err, Error, IoContext, Result};

/// Modules a banger guest needs when the kernel builds them as modules (Debian's cloud
/// kernel does): the virtio transports (mmio for QEMU microvm and Firecracker, pci for
/// q35), block for the root disk, net, vsock for the agent channel and the console.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtio_console",
];

/// The version recorded when neither the bzImage header nor the ELF banner names one.
pub const UNKNOWN_VERSION: &str = "unknown";

/// An imported kernel directory (see the module docs for its layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDir {
    root: PathBuf,
    version: String,
    modules: Vec<String>,
}

impl KernelDir {
    /// Opens a kernel directory made by [`import_deb`] or [`import_files`].
    pub fn open(root: &Path) -> Result<KernelDir> {
        let version_path = root.join("version");
        let version = fs::read_to_string(&version_path)
            .ctx("read kernel version", &version_path)?
            .trim()
            .to_owned();
        let load_path = root.join("modules.load");
        let modules = fs::read_to_string(&load_path)
            .ctx("read module load list", &load_path)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(KernelDir {
            root: root.to_owned(),
            version,
            modules,
        })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The kernel release, e.g. `6.1.0-56-cloud-amd64` ([`UNKNOWN_VERSION`] when the
    /// image did not say).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The compressed kernel (bzImage) as given; QEMU boots it directly. Absent when the
    /// kernel was imported as an ELF vmlinux.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("vmlinuz")
    }

    /// The kernel's build config (present only for kernels imported from a `.deb`).
    pub fn config(&self) -> PathBuf {
        self.root.join("config")
    }

    /// Module names in load order: every module comes after the ones it depends on.
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// The uncompressed `.ko` file of one of [`KernelDir::modules`].
    pub fn module_path(&self, name: &str) -> PathBuf {
        self.root.join("modules").join(format!("{name}.ko"))
    }

    /// The path of the ELF `vmlinux`, extracting it from the bzImage on first use
    /// (directories imported before imports extracted it up front have none yet).
    ///
    /// Firecracker loads only ELF (or PVH) kernels, not bzImages.
    pub fn ensure_vmlinux(&self) -> Result<PathBuf> {
        let out = self.root.join("vmlinux");
        if out.exists() {
            return Ok(out);
        }
        let src = self.vmlinuz();
        let bz = fs::read(&src).ctx("read bzImage", &src)?;
        let elf = extract_vmlinux(&bz).map_err(|reason| format_err(&src, reason))?;
        write_atomic(&out, &elf)?;
        Ok(out)
    }
}

/// What [`import_files`] imports. Paths may be anywhere; nothing is moved or changed.
#[derive(Debug, Clone, Default)]
pub struct KernelFiles {
    /// An x86 bzImage (`vmlinuz`) or an x86-64 ELF `vmlinux`.
    pub kernel: PathBuf,
    /// The kernel's build config, kept for reference.
    pub config: Option<PathBuf>,
    /// A modules tree in `/lib/modules/<release>` layout (`kernel/**.ko*`, optionally
    /// `modules.builtin`). `modules.dep` is not needed: dependencies are read from each
    /// module's `.modinfo`, which is what `depmod` builds it from.
    pub modules: Option<PathBuf>,
    /// The release, when known better than the image says (a `.deb` names it in the
    /// `vmlinuz-<release>` file name); `None` to read it from the image.
    pub version: Option<String>,
}

/// Imports a kernel image, and `modules` (plus what they depend on) from
/// `files.modules`, into a new directory `dest`. Without a modules tree the kernel must
/// have what a guest needs built in; the directory then lists no modules.
///
/// `dest` must not exist. The directory is assembled next to it and renamed into place
/// last, so a failed import leaves nothing behind and a present `dest` is always whole.
pub fn import_files(files: &KernelFiles, dest: &Path, modules: &[&str]) -> Result<KernelDir> {
    let staging = staging_dir(dest, IMPORT_STAGING_PREFIXES[0])?;
    let stage = staging.path();

    let image = fs::read(&files.kernel).ctx("read kernel image", &files.kernel)?;
    let (elf, header_version) = match sniff_kernel(&image) {
        Some(KernelImage::BzImage) => {
            let elf =
                extract_vmlinux(&image).map_err(|reason| format_err(&files.kernel, reason))?;
            fs::write(stage.join("vmlinuz"), &image).ctx("write", stage.join("vmlinuz"))?;
            (elf, bzimage_version(&image))
        }
        Some(KernelImage::Elf) => (image, None),
        None => return Err(Error::BadInput {
            path: files.kernel.clone(),
            reason:
                "not a kernel: neither an x86 bzImage (no HdrS header) nor an x86-64 ELF vmlinux"
                    .into(),
        }),
    };
    let version = files
        .version
        .clone()
        .or(header_version)
        .or_else(|| elf_banner_version(&elf))
        .unwrap_or_else(|| UNKNOWN_VERSION.to_owned());
    fs::write(stage.join("vmlinux"), &elf).ctx("write", stage.join("vmlinux"))?;
    drop(elf);
    if let Some(config) = &files.config {
        fs::copy(config, stage.join("config")).ctx("copy kernel config", config)?;
    }

    let order = match &files.modules {
        Some(tree) => {
            let release = (version != UNKNOWN_VERSION).then_some(version.as_str());
            install_modules(tree, release, &stage.join("modules"), modules)?
        }
        None => Vec::new(),
    };
    let mut load = order.join("\n");
    if !load.is_empty() {
        load.push('\n');
    }
    fs::write(stage.join("modules.load"), load).ctx("write", stage.join("modules.load"))?;
    fs::write(stage.join("version"), format!("{version}\n")).ctx("write", stage.join("version"))?;

    let stage = staging.keep();
    if let Err(e) = fs::rename(&stage, dest) {
        let _ = fs::remove_dir_all(&stage);
        return Err(e).ctx("publish kernel dir", dest).map_err(Into::into);
    }
    KernelDir::open(dest)
}

/// Imports the kernel, its config and `modules` (plus what they depend on) from a Debian
/// kernel package into a new directory `dest`: the package's `boot/` and `lib/modules/`
/// are unpacked next to `dest`, then imported as [`import_files`] does.
pub fn import_deb(deb: &Path, dest: &Path, modules: &[&str]) -> Result<KernelDir> {
    let unpacked = staging_dir(dest, IMPORT_STAGING_PREFIXES[1])?;
    unpack_deb(deb, unpacked.path())?;
    let boot = unpacked.path().join("boot");
    let mut kernel = None;
    let mut config = None;
    // unpack_deb creates boot/ only when the package has files there.
    let listing = match fs::read_dir(&boot) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format_err(deb, "no boot/vmlinuz-* in the package"))
        }
        Err(e) => {
            return Err(e)
                .ctx("list boot/ unpacked from", deb)
                .map_err(Into::into)
        }
    };
    for entry in listing {
        let entry = entry.ctx("list boot/ unpacked from", deb)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("vmlinuz-") {
            kernel = Some((entry.path(), version.to_owned()));
        } else if name.starts_with("config-") {
            config = Some(entry.path());
        }
    }
    let (kernel, version) =
        kernel.ok_or_else(|| format_err(deb, "no boot/vmlinuz-* in the package"))?;
    let config = config.ok_or_else(|| format_err(deb, "no boot/config-* in the package"))?;
    let tree = unpacked.path().join("lib/modules").join(&version);
    if !tree.is_dir() {
        return Err(format_err(
            deb,
            format!("no lib/modules/{version}/ in the package"),
        ));
    }
    let files = KernelFiles {
        kernel,
        config: Some(config),
        modules: Some(tree),
        version: Some(version),
    };
    import_files(&files, dest, modules).map_err(|e| match e {
        // The unpack dir is about to vanish: name the package the user gave instead.
        Error::MissingModule { module, .. } => Error::MissingModule {
            origin: deb.to_owned(),
            module,
        },
        e => e,
    })
}

/// Name prefixes of the temp dirs an import works in, next to the kernel dirs: what a crash
/// mid-import leaves behind.
pub const IMPORT_STAGING_PREFIXES: [&str; 2] = [".kernel-import-", ".kernel-unpack-"];

/// A temp dir next to `dest` (same filesystem, so the final rename is atomic), its parent
/// created if needed.
fn staging_dir(dest: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).ctx("create kernel dir parent", parent)?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .ctx("create staging dir in", parent)
        .map_err(Into::into)
}

/// What kind of kernel image a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelImage {
    /// An x86 boot-protocol image (`vmlinuz`, `bzImage`).
    BzImage,
    /// A little-endian ELF64 for x86-64 (`vmlinux`).
    Elf,
}

/// Tells a bzImage from an x86-64 ELF by their magic numbers; `None` for anything else.
pub fn sniff_kernel(bytes: &[u8]) -> Option<KernelImage> {
    if bytes.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelImage::BzImage)
    } else if bytes.len() >= 20
        && bytes.starts_with(b"\x7fELF\x02\x01")
        && u16::from_le_bytes([bytes[18], bytes[19]]) == 62
    {
        Some(KernelImage::Elf)
    } else {
        None
    }
}

/// The release named by a bzImage's setup header: `kernel_version` (boot protocol 2.00+,
/// offset 0x20e) points, minus 0x200, at a string such as
/// `6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP …`; the release is its
/// first word. `None` when the header has no such string.
pub fn bzimage_version(bzimage: &[u8]) -> Option<String> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") || le_u16(bzimage, 0x206).ok()? < 0x200 {
        return None;
    }
    let ptr = le_u16(bzimage, 0x20e).ok()?;
    if ptr == 0 {
        return None;
    }
    let text = bzimage.get(ptr as usize + 0x200..)?;
    let text = &text[..text.iter().position(|&b| b == 0)?];
    release_word(text)
}

/// The release in an ELF kernel's `linux_banner` ("Linux version 6.1.0 (user@host) …").
/// Format strings that merely mention "Linux version" (followed by `%s`) are skipped.
pub fn elf_banner_version(elf: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let mut rest = elf;
    while let Some(at) = rest.windows(BANNER.len()).position(|w| w == BANNER) {
        rest = &rest[at + BANNER.len()..];
        let end = rest
            .iter()
            .take(256)
            .position(|&b| b == 0 || b == b'\n')
            .unwrap_or(0);
        if let Some(v) = release_word(&rest[..end]) {
            return Some(v);
        }
    }
    None
}

/// The first word of `text` when it looks like a kernel release (starts with a digit,
/// printable, no format directive).
fn release_word(text: &[u8]) -> Option<String> {
    let word = text.split(|b| b.is_ascii_whitespace()).next()?;
    let ok = word.first().is_some_and(u8::is_ascii_digit)
        && word.iter().all(|b| b.is_ascii_graphic() && *b != b'%');
    ok.then(|| String::from_utf8_lossy(word).into_owned())
}

/// Unpacks the `boot/` and `lib/modules/` files of a Debian package into `into`, streaming
/// its data archive once.
fn unpack_deb(deb: &Path, into: &Path) -> Result<()> {
    let file = fs::File::open(deb).ctx("open kernel package", deb)?;
    let mut archive = ar::Archive::new(io::BufReader::new(file));
    while let Some(entry) = archive.next_entry() {
        let entry = entry.ctx("read ar member of", deb)?;
        let ident = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        // dpkg may pad member names with a trailing '/' (GNU ar style).
        let ident = ident.trim_end_matches('/');
        let data: Box<dyn Read + '_> = match ident {
            "data.tar" => Box::new(entry),
            "data.tar.xz" => Box::new(xz2::read::XzDecoder::new(entry)),
            "data.tar.zst" => Box::new(zstd::stream::read::Decoder::new(entry).ctx("zstd", deb)?),
            "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            _ if ident.starts_with("data.tar") => {
                return Err(format_err(deb, format!("unsupported data member {ident}")))
            }
            _ => continue,
        };
        return unpack_data_tar(deb, data, into);
    }
    Err(format_err(deb, "not a Debian package: no data.tar member"))
}

fn unpack_data_tar(deb: &Path, data: Box<dyn Read + '_>, into: &Path) -> Result<()> {
    let mut tar = tar::Archive::new(data);
    for entry in tar.entries().ctx("read data archive of", deb)? {
        let mut entry = entry.ctx("read data archive of", deb)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().ctx("read entry path in", deb)?.into_owned();
        // Only plain relative components: a crafted package must not write outside `into`.
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(p) => parts.push(p.to_owned()),
                _ => return Err(format_err(deb, format!("unsafe path {}", path.display()))),
            }
        }
        // Debian moves /lib to /usr/lib (merged /usr) in later releases; accept both.
        if parts.first().is_some_and(|p| p == "usr") {
            parts.remove(0);
        }
        let wanted = match parts.first().and_then(|p| p.to_str()) {
            Some("boot") => true,
            Some("lib") => parts.get(1).is_some_and(|p| p == "modules"),
            _ => false,
        };
        if !wanted {
            continue;
        }
        let to: PathBuf = std::iter::once(into.as_os_str().to_owned())
            .chain(parts)
            .collect();
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).ctx("create", parent)?;
        }
        copy_entry(&mut entry, &to)?;
    }
    Ok(())
}

fn copy_entry(entry: &mut impl Read, to: &Path) -> Result<()> {
    let mut f = fs::File::create(to).ctx("create", to)?;
    io::copy(entry, &mut f).ctx("write", to)?;
    f.flush().ctx("write", to).map_err(Into::into)
}

/// Copies `wanted` and the modules they depend on out of the modules tree `tree` into
/// `out_dir`, uncompressed, and returns their names in load order. Shared by both import
/// sources, so a `.deb` and its unpacked tree yield the same modules.
///
/// With the kernel's `release` known, a module built for another one is refused here:
/// the kernel would refuse it at boot, with nothing but a console line to say why.
fn install_modules(
    tree: &Path,
    release: Option<&str>,
    out_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<String>> {
    let kernel_dir = tree.join("kernel");
    if !kernel_dir.is_dir() {
        return Err(Error::BadInput {
            path: tree.to_owned(),
            reason: "not a modules tree: no kernel/ subdirectory (give /lib/modules/<release>)"
                .into(),
        });
    }
    let mut files = HashMap::new();
    index_modules(&kernel_dir, &mut files)?;
    let builtin_path = tree.join("modules.builtin");
    let builtin: HashSet<String> = match fs::read_to_string(&builtin_path) {
        Ok(text) => text.lines().filter_map(module_name).collect(),
        // A tree without it (hand-made, or a kernel with nothing built in that matters):
        // every wanted module must then be a file.
        Err(e) if e.kind() == io::ErrorKind::NotFound => HashSet::new(),
        Err(e) => return Err(e).ctx("read", builtin_path).map_err(Into::into),
    };

    let mut loaded: HashMap<String, Vec<u8>> = HashMap::new();
    let order = resolve_modules(
        |name| {
            let Some(path) = files.get(name) else {
                return Ok(None);
            };
            let raw = fs::read(path).ctx("read module", path)?;
            let bytes =
                decompress_module(&path.to_string_lossy(), raw).ctx("decompress module", path)?;
            let depends = modinfo_depends(&bytes).map_err(|r| format_err(path, r))?;
            let built_for = modinfo_vermagic_release(&bytes).map_err(|r| format_err(path, r))?;
            if let (Some(release), Some(built_for)) = (release, built_for) {
                if built_for != release {
                    return Err(Error::BadInput {
                        path: path.clone(),
                        reason: format!(
                            "module built for kernel {built_for}, not {release}: the modules tree belongs to another kernel"
                        ),
                    });
                }
            }
            loaded.insert(name.to_owned(), bytes);
            Ok(Some(depends))
        },
        &builtin,
        wanted,
    )
    .map_err(|e| match e {
        Unresolved::Missing(module) => Error::MissingModule {
            origin: tree.to_owned(),
            module,
        },
        Unresolved::Failed(e) => e,
    })?;
    fs::create_dir(out_dir).ctx("create", out_dir)?;
    for name in &order {
        let path = out_dir.join(format!("{name}.ko"));
        fs::write(&path, &loaded[name]).ctx("write module", &path)?;
    }
    Ok(order)
}

/// Every module file under `dir`, by module name.
fn index_modules(dir: &Path, into: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).ctx("list modules in", dir)? {
        let entry = entry.ctx("list modules in", dir)?;
        let kind = entry.file_type().ctx("stat", entry.path())?;
        if kind.is_dir() {
            index_modules(&entry.path(), into)?;
        } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
            into.insert(name, entry.path());
        }
    }
    Ok(())
}

/// `kernel/drivers/char/virtio_console.ko.xz` -> `virtio_console`. The kernel treats
/// `-` and `_` in module names alike; we normalise to `_` as `modinfo depends=` does.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn decompress_module(path: &str, raw: Vec<u8>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if path.ends_with(".ko.xz") {
        xz2::read::XzDecoder::new(&raw[..]).read_to_end(&mut out)?;
    } else if path.ends_with(".ko.zst") {
        out = zstd::stream::decode_all(&raw[..])?;
    } else if path.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out)?;
    } else {
        return Ok(raw);
    }
    Ok(out)
}

/// The `depends=` list from a module's `.modinfo` ELF section — the same data `depmod`
/// turns into `modules.dep`, which Debian generates at install time and so does not ship.
fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>, String> {
    let modinfo = elf_section(elf, ".modinfo")?.ok_or("no .modinfo section")?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| v.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(String::from_utf8_lossy)
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// The release a module was built for: the first word of its `vermagic=` modinfo entry
/// (e.g. `6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions`).
fn modinfo_vermagic_release(elf: &[u8]) -> Result<Option<String>, String> {
    let modinfo = elf_section(elf, ".modinfo")?.ok_or("no .modinfo section")?;
    Ok(modinfo
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"vermagic="))
        .and_then(release_word))
}

/// The contents of the named section of a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a little-endian ELF64 file".into());
    }
    let shoff = le_u64(elf, 0x28)? as usize;
    let shentsize = le_u16(elf, 0x3a)? as usize;
    let shnum = le_u16(elf, 0x3c)? as usize;
    let shstrndx = le_u16(elf, 0x3e)? as usize;
    let header = |i: usize| -> Result<(u32, usize, usize), String> {
        let h = shoff + i * shentsize;
        Ok((
            le_u32(elf, h)?,
            le_u64(elf, h + 0x18)? as usize,
            le_u64(elf, h + 0x20)? as usize,
        ))
    };
    let slice = |off: usize, len: usize| {
        off.checked_add(len)
            .and_then(|end| elf.get(off..end))
            .ok_or_else(|| "section out of bounds".to_string())
    };
    let (_, str_off, str_len) = header(shstrndx)?;
    let strtab = slice(str_off, str_len)?;
    for i in 0..shnum {
        let (name_off, off, len) = header(i)?;
        let name = strtab.get(name_off as usize..).unwrap_or_default();
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        if name == wanted.as_bytes() {
            return slice(off, len).map(Some);
        }
    }
    Ok(None)
}

fn le_u16(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("truncated at offset {at:#x}"))
}

fn le_u32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("truncated at offset {at:#x}"))
}

fn le_u64(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("truncated at offset {at:#x}"))
}

/// Why [`resolve_modules`] stopped.
enum Unresolved {
    /// A module that is neither available nor built in.
    Missing(String),
    /// Reading an available module failed.
    Failed(Error),
}

/// Dependency-first load order of `wanted` and everything they need. Built-in modules
/// are skipped. `depends_of` gives a module's dependencies, `None` when there is no such
/// module file; it is asked about each module once.
fn resolve_modules(
    mut depends_of: impl FnMut(&str) -> Result<Option<Vec<String>>>,
    builtin: &HashSet<String>,
    wanted: &[&str],
) -> Result<Vec<String>, Unresolved> {
    fn visit(
        name: &str,
        depends_of: &mut dyn FnMut(&str) -> Result<Option<Vec<String>>>,
        builtin: &HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), Unresolved> {
        if done.contains(name) {
            return Ok(());
        }
        // Mark before recursing: module dependencies are acyclic (the kernel refuses
        // cycles), and marking early keeps a malformed tree from recursing forever.
        done.insert(name.to_owned());
        if builtin.contains(name) {
            return Ok(());
        }
        let depends = depends_of(name)
            .map_err(Unresolved::Failed)?
            .ok_or_else(|| Unresolved::Missing(name.to_owned()))?;
        for dep in &depends {
            visit(dep, depends_of, builtin, done, order)?;
        }
        order.push(name.to_owned());
        Ok(())
    }
    let mut done = HashSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(
            &name.replace('-', "_"),
            &mut depends_of,
            builtin,
            &mut done,
            &mut order,
        )?;
    }
    Ok(order)
}

/// Extracts the uncompressed ELF `vmlinux` from an x86 bzImage.
///
/// The setup header (boot protocol >= 2.08) says where the compressed payload sits:
/// `payload_offset` counts from the start of the protected-mode code, which follows
/// `setup_sects + 1` 512-byte sectors. The kernel build appends the uncompressed size as
/// a little-endian u32 to every format except gzip, which records its own size.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, String> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage: no HdrS setup header magic at 0x202".into());
    }
    let protocol = le_u16(bzimage, 0x206)?;
    if protocol < 0x208 {
        return Err(format!(
            "boot protocol {protocol:#x} predates payload_offset (needs 0x208)"
        ));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4, // "if this field is 0, the real value is 4" (boot protocol docs)
        n => n as usize,
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = pm_start + le_u32(bzimage, 0x248)? as usize;
    let length = le_u32(bzimage, 0x24c)? as usize;
    let payload = bzimage
        .get(offset..offset + length)
        .ok_or("payload_offset/payload_length point outside the file")?;

    let with_size = |p: &[u8]| -> Result<(Vec<u8>, usize), String> {
        let n = p.len().checked_sub(4).ok_or("payload too short")?;
        Ok((p[..n].to_vec(), le_u32(p, n)? as usize))
    };
    let elf = if payload.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(payload)
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip payload: {e}"))?;
        out
    } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        let (body, size) = with_size(payload)?;
        let mut out = Vec::with_capacity(size);
        xz2::read::XzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("xz payload: {e}"))?;
        out
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let (body, _) = with_size(payload)?;
        zstd::stream::decode_all(&body[..]).map_err(|e| format!("zstd payload: {e}"))?
    } else if payload.starts_with(&LZ4_LEGACY_MAGIC) {
        let (body, size) = with_size(payload)?;
        lz4_legacy_decode(&body, size)?
    } else {
        return Err(format!(
            "unsupported payload compression (first bytes {:02x?}); gzip, xz, zstd and lz4 are supported",
            &payload[..payload.len().min(6)]
        ));
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err("decompressed payload is not an ELF file".into());
    }
    Ok(elf)
}

const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Every block of the legacy lz4 format decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decodes the legacy lz4 frame format (`lz4 -l`, what the kernel uses): the magic, then
/// blocks of `[u32 LE compressed size][data]`. lz4_flex's frame decoder handles only the
/// modern format's framing reliably, so we walk the blocks and use its block decoder.
fn lz4_legacy_decode(body: &[u8], size_hint: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(size_hint);
    let mut at = 4; // magic
    while at < body.len() {
        let n = le_u32(body, at)? as usize;
        at += 4;
        if n == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            continue; // concatenated frames restart with the magic
        }
        let block = body
            .get(at..at + n)
            .ok_or_else(|| format!("lz4 block at {at:#x} of {n} bytes is truncated"))?;
        at += n;
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let got = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| format!("lz4 block at {at:#x}: {e}"))?;
        out.truncate(start + got);
    }
    Ok(out)
}

/// Writes `bytes` to a temp file next to `path` and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).ctx("create temp file in", dir)?;
    tmp.write_all(bytes).ctx("write", tmp.path().to_owned())?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .ctx("rename into", path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `depends_of` for [`resolve_modules`] over a fixed table.
    fn table<'a>(
        modules: &'a [(&str, &[&str])],
    ) -> impl FnMut(&str) -> Result<Option<Vec<String>>> + 'a {
        let mut asked = HashSet::new();
        move |name| {
            assert!(asked.insert(name.to_owned()), "{name} asked for twice");
            Ok(modules
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, deps)| deps.iter().map(|d| d.to_string()).collect()))
        }
    }

    #[test]
    fn module_names_normalise_dashes_and_compression_suffixes() {
        assert_eq!(
            module_name("kernel/a/virtio-rng.ko.xz").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(
            module_name("kernel/a/virtio_blk.ko").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("kernel/a/README"), None);
    }

    #[test]
    fn resolve_orders_dependencies_first_and_skips_builtins() {
        let available: &[(&str, &[&str])] = &[
            ("virtio_ring", &[]),
            ("virtio", &[]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio_net", &["net_failover", "virtio", "virtio_ring"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
        ];
        let builtin = HashSet::from(["ext4".to_string()]);
        let order = resolve_modules(
            table(available),
            &builtin,
            &["virtio_blk", "ext4", "virtio-net"],
        );
        assert_eq!(
            order.ok().unwrap(),
            [
                "virtio",
                "virtio_ring",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn resolve_names_the_missing_module() {
        let available: &[(&str, &[&str])] = &[("a", &["b"])];
        match resolve_modules(table(available), &HashSet::new(), &["a"]) {
            Err(Unresolved::Missing(m)) => assert_eq!(m, "b"),
            Err(Unresolved::Failed(e)) => panic!("{e}"),
            Ok(order) => panic!("resolved {order:?}"),
        }
    }

    #[test]
    fn lz4_legacy_round_trip_through_block_encoder() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut framed = LZ4_LEGACY_MAGIC.to_vec();
        framed.extend((block.len() as u32).to_le_bytes());
        framed.extend(&block);
        assert_eq!(lz4_legacy_decode(&framed, data.len()).unwrap(), data);
    }

    /// A bzImage setup header (no payload) whose `kernel_version` names `version`.
    fn crafted_bzimage(version: Option<&str>) -> Vec<u8> {
        let mut image = vec![0u8; 0x1000];
        image[0x1f1] = 4; // setup_sects
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        if let Some(version) = version {
            // The pointer counts from 0x200, as the boot protocol says.
            let at = 0x5c0usize;
            image[0x20e..0x210].copy_from_slice(&((at - 0x200) as u16).to_le_bytes());
            let text = format!("{version} (builder@host) #1 SMP PREEMPT_DYNAMIC Mon Jan 1\0");
            image[at..at + text.len()].copy_from_slice(text.as_bytes());
        }
        image
    }

    #[test]
    fn bzimage_version_is_the_first_word_of_the_header_string() {
        let image = crafted_bzimage(Some("6.9.1-test+"));
        assert_eq!(sniff_kernel(&image), Some(KernelImage::BzImage));
        assert_eq!(bzimage_version(&image).as_deref(), Some("6.9.1-test+"));
        assert_eq!(bzimage_version(&crafted_bzimage(None)), None);
        assert_eq!(bzimage_version(b"not a kernel at all"), None);
    }

    #[test]
    fn elf_banner_version_skips_format_strings() {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(18, 0);
        elf.extend(62u16.to_le_bytes()); // e_machine: x86-64
        elf.resize(64, 0);
        elf.extend(b"\0Linux version %s (%s)\n\0junk");
        elf.extend(b"\0Linux version 5.10.204 (root@buildkitsandbox) (gcc (Ubuntu 9.4.0) 9.4.0) #1 SMP\n\0");
        assert_eq!(sniff_kernel(&elf), Some(KernelImage::Elf));
        assert_eq!(elf_banner_version(&elf).as_deref(), Some("5.10.204"));
        assert_eq!(elf_banner_version(&elf[..80]), None);
    }

    #[test]
    fn sniff_refuses_other_files() {
        assert_eq!(sniff_kernel(b"#!/bin/sh\necho hi\n"), None);
        // An ELF for another machine (aarch64) is not a kernel banger can boot.
        let mut arm = b"\x7fELF\x02\x01\x01".to_vec();
        arm.resize(18, 0);
        arm.extend(183u16.to_le_bytes());
        assert_eq!(sniff_kernel(&arm), None);
    }

    #[test]
    fn extract_vmlinux_rejects_non_bzimage() {
        let err = extract_vmlinux(&[0u8; 4096]).unwrap_err();
        assert!(err.contains("HdrS"), "{err}");
    }
}
