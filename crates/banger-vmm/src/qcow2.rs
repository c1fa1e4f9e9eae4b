//! The backing chain of a qcow2 root disk, for a QEMU that may not open it by name.
//!
//! A confined QEMU (see [`crate::confine`]) runs as a user that cannot reach banger's
//! state directory, so it cannot follow the backing file name in an overlay's header.
//! Instead the daemon reads the chain here (each header's backing file name; banger
//! writes every one of them with `qemu-img create -b`), opens every layer itself, and
//! names them to QEMU as `-blockdev` nodes on `/dev/fdset/N` sets whose `backing=`
//! points at the node below ([`blockdev_args`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::confine::PassedFds;
use crate::error::{format_err, IoContext, Result};

/// The most layers a root disk may have (overlay, template or snapshot disks, image):
/// forks of forks add one each; past this the chain is refused, not followed.
pub const MAX_BACKING_CHAIN: usize = 16;
/// The longest backing file name a qcow2 header may hold (QEMU's own limit).
pub const MAX_BACKING_NAME: u32 = 1023;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// One layer of a root disk: its file and QEMU format (`qcow2` or `raw`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The layer's file.
    pub path: PathBuf,
    /// `qcow2` or `raw` ([`crate::qmp::disk_format`]).
    pub format: &'static str,
}

/// The backing file named in the header of the qcow2 file `path`, if any.
pub fn backing_file(path: &Path) -> Result<Option<PathBuf>> {
    let mut file = std::fs::File::open(path).ctx("open qcow2", path)?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header)
        .ctx("read the qcow2 header of", path)?;
    if &header[..4] != QCOW2_MAGIC {
        return Err(format_err(path, "not a qcow2 file (bad magic)"));
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > MAX_BACKING_NAME {
        return Err(format_err(
            path,
            format!(
                "backing file name of {size} bytes exceeds MAX_BACKING_NAME ({MAX_BACKING_NAME})"
            ),
        ));
    }
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))
        .ctx("seek to the backing file name in", path)?;
    let mut name = vec![0u8; size as usize];
    file.read_exact(&mut name)
        .ctx("read the backing file name of", path)?;
    use std::os::unix::ffi::OsStringExt;
    let name = PathBuf::from(std::ffi::OsString::from_vec(name));
    // qemu-img stores a relative name relative to the overlay's directory; banger always
    // writes absolute names, but follow QEMU's rule anyway.
    Ok(Some(if name.is_absolute() {
        name
    } else {
        path.parent().unwrap_or(Path::new("/")).join(name)
    }))
}

/// The layers of the root disk `top`, top first: every qcow2 header's backing file down
/// to a raw file or a qcow2 without one; at most [`MAX_BACKING_CHAIN`].
pub fn chain(top: &Path) -> Result<Vec<Layer>> {
    let mut layers = vec![Layer {
        path: top.to_owned(),
        format: crate::qmp::disk_format(top),
    }];
    loop {
        let last = layers.last().expect("one layer");
        if last.format != "qcow2" {
            return Ok(layers);
        }
        let Some(next) = backing_file(&last.path)? else {
            return Ok(layers);
        };
        if layers.len() >= MAX_BACKING_CHAIN {
            return Err(format_err(
                top,
                format!("backing chain longer than MAX_BACKING_CHAIN ({MAX_BACKING_CHAIN}) layers"),
            ));
        }
        let format = crate::qmp::disk_format(&next);
        layers.push(Layer { path: next, format });
    }
}

/// `-add-fd` and `-blockdev` arguments opening the root disk `top` and its whole backing
/// chain from descriptors put in `passed`; the top format node is `node`, for
/// `-device ...,drive=<node>`. The top is writable (QEMU gets a read-write and a
/// read-only descriptor: it may probe read-only first), every layer below read-only.
/// Fdsets are numbered from `first_set`.
pub fn blockdev_args(
    top: &Path,
    node: &str,
    first_set: u32,
    passed: &mut PassedFds,
) -> Result<Vec<String>> {
    let layers = chain(top)?;
    let mut args = Vec::new();
    // Bottom first, so each `backing=` names a node that exists already.
    for (i, layer) in layers.iter().enumerate().rev() {
        let set = first_set + i as u32;
        let writable = i == 0;
        let mut fds = Vec::new();
        if writable {
            fds.push(passed.open(&layer.path, true).ctx("open", &layer.path)?);
        }
        fds.push(passed.open(&layer.path, false).ctx("open", &layer.path)?);
        for fd in fds {
            args.extend(["-add-fd".into(), format!("fd={fd},set={set}")]);
        }
        let ro = if writable { "" } else { ",read-only=on" };
        let name = if i == 0 {
            node.to_owned()
        } else {
            format!("{node}-layer{i}")
        };
        // cache.no-flush: a VM's disk is scratch to the host (what cache=unsafe meant);
        // templates and snapshots are flushed by QEMU's `stop` before they are copied.
        args.extend([
            "-blockdev".into(),
            format!(
                "driver=file,node-name={name}-file,filename=/dev/fdset/{set},cache.direct=off,cache.no-flush=on{ro}"
            ),
        ]);
        let mut format_node = format!(
            "driver={},node-name={name},file={name}-file,cache.direct=off,cache.no-flush=on{ro}",
            layer.format
        );
        // A qcow2 without a backing file in its header needs no `backing=`.
        if layer.format == "qcow2" && layers.get(i + 1).is_some() {
            format_node.push_str(&format!(",backing={node}-layer{}", i + 1));
        }
        args.extend(["-blockdev".into(), format_node]);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) -> bool {
        std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn the_chain_follows_backing_names_down_to_the_raw_image() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("rootfs.ext4");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let mid = tmp.path().join("disk.qcow2");
        let top = tmp.path().join("root.qcow2");
        if !banger_testkit::require(
            qemu_img(&["--version"]),
            "qemu-img (qemu-utils) is not installed",
        ) {
            return;
        }
        crate::qmp::create_overlay(&base, &mid, None).unwrap();
        crate::qmp::create_overlay(&mid, &top, Some(2 << 20)).unwrap();
        assert_eq!(
            chain(&top).unwrap(),
            vec![
                Layer {
                    path: top.clone(),
                    format: "qcow2"
                },
                Layer {
                    path: mid.clone(),
                    format: "qcow2"
                },
                Layer {
                    path: base.clone(),
                    format: "raw"
                },
            ]
        );
        let mut passed = PassedFds::default();
        let args = blockdev_args(&top, "root", 1, &mut passed).unwrap();
        let blockdevs: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(blockdevs.len(), 6, "{args:?}");
        assert!(
            blockdevs[0]
                .starts_with("driver=file,node-name=root-layer2-file,filename=/dev/fdset/3,"),
            "{args:?}"
        );
        assert!(blockdevs[0].ends_with(",read-only=on"), "{args:?}");
        assert!(
            blockdevs[1].starts_with("driver=raw,node-name=root-layer2,"),
            "{args:?}"
        );
        assert!(
            blockdevs[3].ends_with(",read-only=on,backing=root-layer2"),
            "{args:?}"
        );
        assert_eq!(
            blockdevs[5],
            "driver=qcow2,node-name=root,file=root-file,cache.direct=off,cache.no-flush=on,backing=root-layer1"
        );
        // Two descriptors for the top, one for each layer below.
        assert_eq!(args.iter().filter(|a| *a == "-add-fd").count(), 4);
    }

    #[test]
    fn a_chain_past_its_bound_and_a_foreign_file_are_refused_naming_them() {
        let tmp = tempfile::tempdir().unwrap();
        if !banger_testkit::require(
            qemu_img(&["--version"]),
            "qemu-img (qemu-utils) is not installed",
        ) {
            return;
        }
        // Two qcow2 files that name each other: the walk must stop at the bound.
        let loop_disk = tmp.path().join("loop.qcow2");
        let other = tmp.path().join("other.qcow2");
        let (l, o) = (loop_disk.to_str().unwrap(), other.to_str().unwrap());
        assert!(qemu_img(&["create", "-q", "-f", "qcow2", o, "1M"]));
        assert!(qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", o, "-F", "qcow2", l
        ]));
        assert!(qemu_img(&["rebase", "-u", "-b", l, "-F", "qcow2", o]));
        let err = chain(&loop_disk).unwrap_err().to_string();
        assert!(err.contains("MAX_BACKING_CHAIN (16)"), "{err}");
        assert!(err.contains("loop.qcow2"), "{err}");
        let fake = tmp.path().join("fake.qcow2");
        std::fs::write(&fake, b"not a qcow2 header at all").unwrap();
        let err = chain(&fake).unwrap_err().to_string();
        assert!(err.contains("fake.qcow2: not a qcow2 file"), "{err}");
    }
}
