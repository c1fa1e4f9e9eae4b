//! Guest kernels: importing one from a Debian `linux-image-*.deb`, resolving the modules
//! the guest needs, and turning a bzImage into the ELF `vmlinux` Firecracker wants.
//!
//! A kernel directory, once imported, is self-contained:
//!
//! ```text
//! <dir>/vmlinuz          the bzImage, as shipped (QEMU boots this)
//! <dir>/config           the kernel's build config
//! <dir>/version          e.g. "6.1.0-56-cloud-amd64"
//! <dir>/modules/<m>.ko   uncompressed modules the guest needs, dependencies included
//! <dir>/modules.load     their names, one a line, in an order insmod accepts
//! <dir>/vmlinux          only after `KernelDir::ensure_vmlinux` (Firecracker)
//! ```

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

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

/// An imported kernel directory (see the module docs for its layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDir {
    root: PathBuf,
    version: String,
    modules: Vec<String>,
}

impl KernelDir {
    /// Opens a kernel directory made by [`import_deb`].
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

    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The compressed kernel (bzImage) as shipped; QEMU boots it directly.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("vmlinuz")
    }

    /// The kernel's build config.
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

    /// The path of the ELF `vmlinux`, extracting it from the bzImage on first use.
    ///
    /// Firecracker loads only ELF (or PVH) kernels, not bzImages; QEMU does not need it.
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

/// Imports the kernel, its config and `modules` (plus what they depend on) from a Debian
/// kernel package into a new directory `dest`.
///
/// `dest` must not exist. The directory is assembled next to it and renamed into place
/// last, so a failed import leaves nothing behind and a present `dest` is always whole.
pub fn import_deb(deb: &Path, dest: &Path, modules: &[&str]) -> Result<KernelDir> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).ctx("create kernel dir parent", parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".kernel-import-")
        .tempdir_in(parent)
        .ctx("create staging dir in", parent)?;
    let stage = staging.path();

    let contents = read_deb(deb, stage)?;
    let version = contents
        .version
        .ok_or_else(|| format_err(deb, "no boot/vmlinuz-* in the package"))?;
    if !contents.has_config {
        return Err(format_err(deb, "no boot/config-* in the package"));
    }

    let order =
        resolve_modules(&contents.modules, &contents.builtin, modules).map_err(|module| {
            Error::MissingModule {
                package: deb.to_owned(),
                module,
            }
        })?;
    let mod_dir = stage.join("modules");
    fs::create_dir(&mod_dir).ctx("create", &mod_dir)?;
    for name in &order {
        let path = mod_dir.join(format!("{name}.ko"));
        fs::write(&path, &contents.modules[name].bytes).ctx("write module", &path)?;
    }
    let mut load = order.join("\n");
    load.push('\n');
    fs::write(stage.join("modules.load"), load).ctx("write", stage.join("modules.load"))?;
    fs::write(stage.join("version"), format!("{version}\n")).ctx("write", stage.join("version"))?;

    let stage = staging.keep();
    if let Err(e) = fs::rename(&stage, dest) {
        let _ = fs::remove_dir_all(&stage);
        return Err(e).ctx("publish kernel dir", dest);
    }
    KernelDir::open(dest)
}

/// One module found in the package.
struct Module {
    bytes: Vec<u8>,
    depends: Vec<String>,
}

/// What [`read_deb`] found.
struct DebContents {
    version: Option<String>,
    has_config: bool,
    /// Every module in the package, by name. The Debian cloud kernel ships ~90 MB of
    /// them; we keep them all in memory because dependencies are only known after the
    /// whole archive was read, and a second pass through xz costs more than the memory.
    modules: HashMap<String, Module>,
    builtin: HashSet<String>,
}

/// Streams the package's data archive once, writing `vmlinuz` and `config` into `stage`.
fn read_deb(deb: &Path, stage: &Path) -> Result<DebContents> {
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
        return read_data_tar(deb, data, stage);
    }
    Err(format_err(deb, "not a Debian package: no data.tar member"))
}

fn read_data_tar(deb: &Path, data: Box<dyn Read + '_>, stage: &Path) -> Result<DebContents> {
    let mut out = DebContents {
        version: None,
        has_config: false,
        modules: HashMap::new(),
        builtin: HashSet::new(),
    };
    let mut tar = tar::Archive::new(data);
    for entry in tar.entries().ctx("read data archive of", deb)? {
        let mut entry = entry.ctx("read data archive of", deb)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().ctx("read entry path in", deb)?.into_owned();
        let path = path.to_string_lossy();
        let path = path.trim_start_matches("./");
        // Debian moves /lib to /usr/lib (merged /usr) in later releases; accept both.
        let path = path.strip_prefix("usr/").unwrap_or(path);
        if let Some(version) = path.strip_prefix("boot/vmlinuz-") {
            out.version = Some(version.to_owned());
            copy_entry(&mut entry, &stage.join("vmlinuz"))?;
        } else if path.starts_with("boot/config-") {
            out.has_config = true;
            copy_entry(&mut entry, &stage.join("config"))?;
        } else if let Some(rest) = path.strip_prefix("lib/modules/") {
            let Some((_release, rel)) = rest.split_once('/') else {
                continue;
            };
            if rel == "modules.builtin" {
                let mut text = String::new();
                entry
                    .read_to_string(&mut text)
                    .ctx("read modules.builtin in", deb)?;
                out.builtin.extend(text.lines().filter_map(module_name));
            } else if rel.starts_with("kernel/") {
                let Some(name) = module_name(rel) else {
                    continue;
                };
                let mut raw = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut raw).ctx("read module in", deb)?;
                let bytes = decompress_module(rel, raw).ctx("decompress module", rel)?;
                let depends = modinfo_depends(&bytes).map_err(|r| format_err(rel, r))?;
                out.modules.insert(name, Module { bytes, depends });
            }
        }
    }
    Ok(out)
}

fn copy_entry(entry: &mut impl Read, to: &Path) -> Result<()> {
    let mut f = fs::File::create(to).ctx("create", to)?;
    io::copy(entry, &mut f).ctx("write", to)?;
    f.flush().ctx("write", to)
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

/// Dependency-first load order of `wanted` and everything they need. Built-in modules
/// are skipped. Returns the name of a module that is neither available nor built in.
fn resolve_modules(
    available: &HashMap<String, Module>,
    builtin: &HashSet<String>,
    wanted: &[&str],
) -> Result<Vec<String>, String> {
    fn visit(
        name: &str,
        available: &HashMap<String, Module>,
        builtin: &HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), String> {
        if done.contains(name) {
            return Ok(());
        }
        // Mark before recursing: module dependencies are acyclic (the kernel refuses
        // cycles), and marking early keeps a malformed package from recursing forever.
        done.insert(name.to_owned());
        if builtin.contains(name) {
            return Ok(());
        }
        let module = available.get(name).ok_or_else(|| name.to_owned())?;
        for dep in &module.depends {
            visit(dep, available, builtin, done, order)?;
        }
        order.push(name.to_owned());
        Ok(())
    }
    let mut done = HashSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(
            &name.replace('-', "_"),
            available,
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

    fn module(depends: &[&str]) -> Module {
        Module {
            bytes: Vec::new(),
            depends: depends.iter().map(|s| s.to_string()).collect(),
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
        let available: HashMap<String, Module> = [
            ("virtio_ring", module(&[])),
            ("virtio", module(&[])),
            ("virtio_blk", module(&["virtio", "virtio_ring"])),
            (
                "virtio_net",
                module(&["net_failover", "virtio", "virtio_ring"]),
            ),
            ("net_failover", module(&["failover"])),
            ("failover", module(&[])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let builtin = HashSet::from(["ext4".to_string()]);
        let order = resolve_modules(&available, &builtin, &["virtio_blk", "ext4", "virtio-net"]);
        assert_eq!(
            order.unwrap(),
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
        let available: HashMap<String, Module> =
            [("a".to_string(), module(&["b"]))].into_iter().collect();
        assert_eq!(
            resolve_modules(&available, &HashSet::new(), &["a"]),
            Err("b".into())
        );
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

    #[test]
    fn extract_vmlinux_rejects_non_bzimage() {
        let err = extract_vmlinux(&[0u8; 4096]).unwrap_err();
        assert!(err.contains("HdrS"), "{err}");
    }
}
