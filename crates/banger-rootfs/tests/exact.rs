//! Every layer tree banger accepts becomes a valid ext4 equal to what the tar says, the
//! same whether built as root or not; what ext4 cannot hold is refused naming the entry.
//! One test per defect found by a differential check of the flattener and the writer
//! (issue 15), each run in both privilege modes and checked with `e2fsck -fn` and by
//! reading the image back (loop mount or debugfs).

mod exact_support;

use std::os::unix::fs::MetadataExt;

use banger_oci::flatten::Privilege;
use exact_support::*;
use tar::EntryType::*;

/// Builds in every mode; each must succeed, pass e2fsck and pass `check` on the mount.
fn accepted(layers: &[Vec<u8>], check: impl Fn(&Mount, Privilege)) {
    for privilege in modes() {
        let built = build(layers, privilege)
            .unwrap_or_else(|e| panic!("{privilege:?}: refused a valid image: {e}"));
        fsck(&built.image);
        if let Some(m) = mount(&built.image) {
            check(&m, privilege);
        }
    }
}

/// Builds in every mode; each must fail with a message holding every one of `words`.
fn refused(layers: &[Vec<u8>], words: &[&str]) {
    for privilege in modes() {
        match build(layers, privilege) {
            Ok(built) => {
                fsck(&built.image);
                panic!("{privilege:?}: accepted, expected a refusal naming {words:?}")
            }
            Err(msg) => {
                for w in words {
                    assert!(msg.contains(w), "{privilege:?}: {msg:?} lacks {w:?}");
                }
            }
        }
    }
}

/// A VFS POSIX ACL (`system.posix_acl_*` value) of (tag, perm, id) entries.
// 1. Xattr names longer than ext4's 255 bytes.
#[test]
fn xattr_names_longer_than_255_bytes_are_refused_naming_the_entry() {
    let long = [b"trusted.".as_slice(), &[b'n'; 300]].concat();
    for e in [
        ent("run/fifo").kind(Fifo),
        Ent::symlink("bin/link", "target"),
        ent("etc/file").data(b"x"),
    ] {
        let path = String::from_utf8(e.path.clone()).unwrap();
        refused(&[layer(&[e.xattr(&long, b"v")])], &[&path, "255"]);
    }
    // The longest name ext4 holds is fine, on every kind.
    let longest = [b"trusted.".as_slice(), &[b'n'; 247]].concat();
    accepted(
        &[layer(&[
            ent("run/fifo").kind(Fifo).xattr(&longest, b"v1"),
            Ent::symlink("bin/link", "target").xattr(&longest, b"v2"),
            ent("etc/file").data(b"x").xattr(&longest, b"v3"),
        ])],
        |m, _| {
            for (path, v) in [
                ("run/fifo", b"v1"),
                ("bin/link", b"v2"),
                ("etc/file", b"v3"),
            ] {
                assert_eq!(xattrs(&m.path(path))[&longest], v, "{path}");
            }
        },
    );
}

// 2. Hard link counts past ext4's 65,000.
#[test]
fn hard_links_past_ext4s_link_limit_are_refused() {
    let links = |n: usize| {
        let mut es = vec![ent("f").data(b"shared")];
        for i in 0..n {
            es.push(Ent::hardlink(&format!("l/{i}"), "f"));
        }
        layer(&es)
    };
    // 64,999 links + the file itself: exactly ext4's limit.
    accepted(&[links(64_999)], |m, _| {
        assert_eq!(std::fs::metadata(m.path("f")).unwrap().nlink(), 65_000);
        assert_eq!(std::fs::read(m.path("l/64998")).unwrap(), b"shared");
    });
    refused(&[links(65_000)], &["l/64999", "65000"]);
}

// 4. PAX records are length-prefixed: newline bytes in values and paths are data.
#[test]
fn pax_values_and_paths_with_newlines_are_kept() {
    // A v2 file capability whose permitted set has bit 1 and 3 (0x0a).
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0000u32.to_le_bytes());
    cap[4] = 0x0a;
    let weird = b"a\nb=c\n 12 x=y\n".to_vec();
    accepted(
        &[layer(&[
            ent("usr/bin/ping")
                .data(b"ping")
                .mode(0o755)
                .xattr(b"security.capability", &cap)
                .xattr(b"user.weird", &weird),
            ent("etc/new\nline").data(b"nl"),
        ])],
        |m, _| {
            let x = xattrs(&m.path("usr/bin/ping"));
            assert_eq!(x[b"security.capability".as_slice()], cap);
            assert_eq!(x[b"user.weird".as_slice()], weird);
            assert_eq!(std::fs::read(m.path("etc/new\nline")).unwrap(), b"nl");
        },
    );
}

// 5. Xattrs that do not all fit in the inode: what fits stays there, the rest takes a block.
#[test]
fn xattrs_split_between_the_inode_and_a_block() {
    let small = vec![b's'; 40];
    let big = vec![b'B'; 4000];
    accepted(
        &[layer(&[ent("f")
            .data(b"x")
            .xattr(b"user.a", &small)
            .xattr(b"user.big", &big)])],
        |m, _| {
            let x = xattrs(&m.path("f"));
            assert_eq!(x[b"user.a".as_slice()], small);
            assert_eq!(x[b"user.big".as_slice()], big);
        },
    );
}

fn sparse_expect(m: &Mount, path: &str, size: usize, chunks: &[(usize, u8, usize)]) {
    let body = std::fs::read(m.path(path)).unwrap();
    let mut want = vec![0u8; size];
    for &(at, byte, len) in chunks {
        want[at..at + len].fill(byte);
    }
    assert!(body == want, "{path}: content differs");
    let meta = std::fs::metadata(m.path(path)).unwrap();
    // The blocks each chunk touches.
    let mut data: usize = chunks
        .iter()
        .map(|c| ((c.0 + c.2).div_ceil(4096) - c.0 / 4096) * 4096)
        .sum();
    if chunks.len() > 4 {
        // More extents than the inode holds: one leaf block.
        data += 4096;
    }
    assert!(
        meta.blocks() * 512 <= data as u64,
        "{path}: {} bytes allocated for {data} of data: holes were written",
        meta.blocks() * 512
    );
}

/// The bytes of a sparse file's `chunks` (offset, byte, length) back to back: what an
/// archive member of it stores.
fn chunk_bytes(chunks: &[(usize, u8, usize)]) -> Vec<u8> {
    chunks
        .iter()
        .flat_map(|&(_, byte, len)| vec![byte; len])
        .collect()
}

/// GNU tar's PAX sparse 1.0 member `stored` for the file `real` of `size` bytes holding
/// `chunks`: the map (count, then offset and length of each, a line each) padded to a
/// block, then the chunks' bytes; the records in GNU tar's order.
fn gnu_sparse_1_0(stored: &str, real: &str, size: usize, chunks: &[(usize, u8, usize)]) -> Ent {
    let mut map = format!("{}\n", chunks.len());
    for (at, _, len) in chunks {
        map.push_str(&format!("{at}\n{len}\n"));
    }
    let mut data = map.into_bytes();
    data.resize(data.len().next_multiple_of(512), 0);
    data.extend(chunk_bytes(chunks));
    ent(stored)
        .data(&data)
        .pax("GNU.sparse.major", b"1")
        .pax("GNU.sparse.minor", b"0")
        .pax("GNU.sparse.name", real.as_bytes())
        .pax("GNU.sparse.realsize", size.to_string().as_bytes())
}

/// GNU tar's PAX sparse 0.1 member `stored` for the file `real` of `size` bytes holding
/// `chunks`: the chunks' bytes, the map in `GNU.sparse.map` (offset,length,…).
fn gnu_sparse_0_1(stored: &str, real: &str, size: usize, chunks: &[(usize, u8, usize)]) -> Ent {
    let map: Vec<String> = chunks
        .iter()
        .map(|(at, _, len)| format!("{at},{len}"))
        .collect();
    ent(stored)
        .data(&chunk_bytes(chunks))
        .pax("GNU.sparse.size", size.to_string().as_bytes())
        .pax("GNU.sparse.numblocks", chunks.len().to_string().as_bytes())
        .pax("GNU.sparse.map", map.join(",").as_bytes())
        .pax("GNU.sparse.name", real.as_bytes())
}

// 6. GNU tar's PAX sparse formats (1.0 is GNU tar's default in pax archives; 0.1 older).
#[test]
fn gnu_pax_sparse_files_land_as_the_real_file_with_holes() {
    let one_chunks = [(0, b'A', 4096), (1 << 20, b'B', 4096)];
    let two_chunks = [(0, b'C', 1000), (2_000_000, b'D', 3000)];
    let one = gnu_sparse_1_0("s/GNUSparseFile.77/one", "s/one", 2 << 20, &one_chunks);
    let zero_one = gnu_sparse_0_1("s/GNUSparseFile.78/two", "s/two", 3_000_000, &two_chunks);
    accepted(&[layer(&[Ent::dir("s/"), one, zero_one])], |m, _| {
        sparse_expect(m, "s/one", 2 << 20, &one_chunks);
        sparse_expect(m, "s/two", 3_000_000, &two_chunks);
        let names: Vec<_> = std::fs::read_dir(m.path("s"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no GNUSparseFile.N directories: {names:?}");
    });
}

// 7. A whiteout hides only lower layers, even when it follows its layer's own entries.
#[test]
fn a_whiteout_after_a_readded_directory_hides_the_lower_content() {
    let lower = layer(&[Ent::dir("d/"), ent("d/old").data(b"old"), ent("e/keep")]);
    let upper = layer(&[
        Ent::dir("d/").mode(0o750),
        ent("d/new").data(b"new"),
        ent(".wh.d"),
        ent("e/.wh.keep"),
    ]);
    accepted(&[lower, upper], |m, _| {
        assert_eq!(std::fs::read(m.path("d/new")).unwrap(), b"new");
        assert!(!m.path("d/old").exists(), "d/old survived its whiteout");
        assert_eq!(
            std::fs::metadata(m.path("d")).unwrap().mode() & 0o7777,
            0o750
        );
        assert!(!m.path("e/keep").exists());
    });
}

// 8. Xattr names are bytes.
#[test]
fn non_utf8_xattr_names_are_kept_as_bytes() {
    let name = b"user.caf\xe9\xff".to_vec();
    accepted(
        &[layer(&[ent("f").data(b"x").xattr(&name, b"v")])],
        |m, _| {
            let x = xattrs(&m.path("f"));
            assert_eq!(x.keys().cloned().collect::<Vec<_>>(), vec![name.clone()]);
        },
    );
}

// 9. Negative fractional PAX times, and times past what ext4 holds.
#[test]
fn times_round_down_and_clamp_to_ext4s_range() {
    let mut far = [0u8; 12];
    far[0] = 0x80;
    far[4..].copy_from_slice(&17_200_000_000u64.to_be_bytes()); // year 2515
    let mut far_entry = ent("far").data(b"x");
    far_entry.raw_mtime = Some(far);
    // GNU base-256 for -100 (1969): two's complement over the whole field.
    let mut before = [0xffu8; 12];
    before[4..].copy_from_slice(&(-100i64).to_be_bytes());
    let mut before_entry = ent("before-1970").data(b"x");
    before_entry.raw_mtime = Some(before);
    accepted(
        &[layer(&[
            ent("neg").data(b"x").pax("mtime", b"-1.5"),
            ent("negint").data(b"x").pax("mtime", b"-3"),
            ent("fine").data(b"x").pax("mtime", b"1700000000.000000123"),
            far_entry,
            before_entry,
            ent("far-pax").data(b"x").pax("mtime", b"99999999999.5"),
            ent("early").data(b"x").pax("mtime", b"-9999999999"),
        ])],
        |m, _| {
            let t = |p: &str| {
                let md = std::fs::symlink_metadata(m.path(p)).unwrap();
                (md.mtime(), md.mtime_nsec())
            };
            assert_eq!(t("neg"), (-2, 500_000_000));
            assert_eq!(t("negint"), (-3, 0));
            assert_eq!(t("fine"), (1_700_000_000, 123));
            // ext4's 34-bit seconds end in 2446: later times are clamped to its last second.
            assert_eq!(t("far").0, 15_032_385_535);
            assert_eq!(t("far-pax").0, 15_032_385_535);
            assert_eq!(t("early").0, -2_147_483_648);
            assert_eq!(t("before-1970"), (-100, 0));
        },
    );
}

// Root and unprivileged builds used to differ. Each of these is one such difference.

#[test]
fn a_repeated_directory_entry_replaces_the_xattrs_of_the_first() {
    accepted(
        &[layer(&[
            Ent::dir("d/").xattr(b"user.a", b"1").xattr(b"user.b", b"2"),
            Ent::dir("d/").xattr(b"user.a", b"3"),
        ])],
        |m, p| {
            let x = xattrs(&m.path("d"));
            assert_eq!(x.len(), 1, "{p:?}: {x:?}");
            assert_eq!(x[b"user.a".as_slice()], b"3");
        },
    );
}

#[test]
fn a_directory_reemitted_without_its_default_acl_loses_it() {
    let lower = layer(&[Ent::dir("d/")
        .xattr(b"system.posix_acl_default", &default_acl())
        .xattr(b"user.gone", b"1")]);
    let upper = layer(&[Ent::dir("d/").mode(0o700)]);
    accepted(&[lower, upper], |m, p| {
        assert!(xattrs(&m.path("d")).is_empty(), "{p:?}");
        assert_eq!(
            std::fs::metadata(m.path("d")).unwrap().mode() & 0o7777,
            0o700
        );
    });
}

#[test]
fn files_under_a_default_acl_get_only_the_xattrs_their_header_has() {
    accepted(
        &[layer(&[
            Ent::dir("d/").xattr(b"system.posix_acl_default", &default_acl()),
            ent("d/f").data(b"f").mode(0o640),
            Ent::dir("d/sub/"),
        ])],
        |m, p| {
            assert!(xattrs(&m.path("d/f")).is_empty(), "{p:?}: host ACL leaked");
            assert!(
                xattrs(&m.path("d/sub")).is_empty(),
                "{p:?}: host ACL leaked"
            );
            assert_eq!(
                std::fs::metadata(m.path("d/f")).unwrap().mode() & 0o7777,
                0o640
            );
            assert!(xattrs(&m.path("d")).contains_key(b"system.posix_acl_default".as_slice()));
        },
    );
}

#[test]
fn implicit_directories_are_root_owned_0755_whatever_their_parent() {
    accepted(
        &[layer(&[
            Ent::dir("p/").mode(0o2775).owner(7, 50),
            ent("p/q/r/file").data(b"x").owner(1000, 1000),
        ])],
        |m, p| {
            for d in ["p/q", "p/q/r"] {
                let md = std::fs::metadata(m.path(d)).unwrap();
                assert_eq!(
                    (md.mode() & 0o7777, md.uid(), md.gid()),
                    (0o755, 0, 0),
                    "{p:?} {d}"
                );
            }
        },
    );
}

#[test]
fn symlinks_are_0777_whatever_the_header_says() {
    accepted(
        &[layer(&[
            Ent::symlink("plain", "t").mode(0o755),
            Ent::symlink("with-xattr", "t")
                .mode(0o700)
                .xattr(b"user.x", b"1"),
        ])],
        |m, p| {
            for l in ["plain", "with-xattr"] {
                let md = std::fs::symlink_metadata(m.path(l)).unwrap();
                assert_eq!(md.mode() & 0o7777, 0o777, "{p:?} {l}");
            }
        },
    );
}

#[test]
fn linux_invalid_id_is_refused_naming_the_entry() {
    refused(
        &[layer(&[ent("bad-uid").pax("uid", b"4294967295")])],
        &["bad-uid", "4294967295"],
    );
    refused(
        &[layer(&[ent("bad-gid").pax("gid", b"4294967295")])],
        &["bad-gid", "4294967295"],
    );
    accepted(
        &[layer(&[ent("big")
            .pax("uid", b"4294967294")
            .pax("gid", b"100000")])],
        |m, _| {
            let md = std::fs::metadata(m.path("big")).unwrap();
            assert_eq!((md.uid(), md.gid()), (4_294_967_294, 100_000));
        },
    );
}

#[test]
fn device_numbers_ext4_cannot_hold_are_refused_naming_the_entry() {
    refused(
        &[layer(&[ent("dev/c").kind(Char).dev(4096, 1)])],
        &["dev/c", "4096"],
    );
    refused(
        &[layer(&[ent("dev/b").kind(Block).dev(1, 1 << 20)])],
        &["dev/b", "1048576"],
    );
    accepted(
        &[layer(&[
            ent("dev/max").kind(Char).dev(4095, (1 << 20) - 1),
            ent("dev/small").kind(Block).dev(8, 1),
        ])],
        |m, _| {
            let md = std::fs::symlink_metadata(m.path("dev/max")).unwrap();
            assert_eq!(
                (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev())),
                (4095, (1 << 20) - 1)
            );
            let md = std::fs::symlink_metadata(m.path("dev/small")).unwrap();
            assert_eq!(md.rdev(), rustix::fs::makedev(8, 1));
        },
    );
}

// Runs of zeros are holes, as mkfs makes them.
#[test]
fn zero_runs_are_written_as_holes() {
    let mut body = vec![b'x'; 4096];
    body.extend_from_slice(&vec![0u8; 1 << 20]);
    body.extend_from_slice(&[b'y'; 4096]);
    body.extend_from_slice(&vec![0u8; 300_000]);
    let zeros = vec![0u8; 2 << 20];
    let mut short_run = vec![b'a'; 4096];
    short_run.extend_from_slice(&[0u8; 4096]);
    short_run.extend_from_slice(&[b'b'; 100]);
    accepted(
        &[layer(&[
            ent("holey").data(&body),
            ent("zeros").data(&zeros),
            ent("short-run").data(&short_run),
        ])],
        |m, _| {
            assert!(std::fs::read(m.path("holey")).unwrap() == body);
            assert!(std::fs::read(m.path("zeros")).unwrap() == zeros);
            assert_eq!(std::fs::read(m.path("short-run")).unwrap(), short_run);
            let blocks = |p: &str| std::fs::metadata(m.path(p)).unwrap().blocks() * 512;
            assert_eq!(blocks("holey"), 2 * 4096);
            assert_eq!(blocks("zeros"), 0);
            assert_eq!(blocks("short-run"), 3 * 4096, "a one-block run stays");
        },
    );
}

// Reserved blocks: a documented choice of none (docs/oci-import.md).
#[test]
fn images_reserve_no_blocks_for_root() {
    let built = build(&[layer(&[ent("f").data(b"x")])], Privilege::Unprivileged).unwrap();
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&built.image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Reserved block count:     0"), "{text}");
}

// docs/oci-import.md says resize2fs grows these images (what a VM's disk gets before boot).
#[test]
fn images_grow_with_resize2fs_and_stay_clean() {
    let built = build(
        &[layer(&[ent("f").data(&[7u8; 100_000]), Ent::dir("d/")])],
        Privilege::Unprivileged,
    )
    .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&built.image)
        .unwrap();
    f.set_len(3 << 30).unwrap();
    drop(f);
    banger_testkit::command::run_ok(
        std::process::Command::new("resize2fs").arg(&built.image),
        "grow the image",
    );
    fsck(&built.image);
    assert!(debugfs(&built.image, "stat /f").contains("Size: 100000"));
}

// The old GNU sparse format (`S` members, `tar --format=gnu --sparse`) still lands as the
// real file, its map read from the header and an extension block.
#[test]
fn old_gnu_sparse_members_land_with_holes() {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(GNUSparse);
    h.set_path("old-sparse").unwrap();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(0o644);
    h.set_mtime(MTIME);
    // Five segments: four in the header, the fifth in one extension block.
    let segments: Vec<(u64, u64)> = (0..5).map(|i| (i * 1_000_000, 512)).collect();
    let real = 5_000_000u64;
    let octal = |field: &mut [u8], v: u64| {
        let s = format!("{v:0w$o}", w = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
        field[s.len()] = 0;
    };
    {
        let gnu = h.as_gnu_mut().unwrap();
        for (i, (off, len)) in segments.iter().take(4).enumerate() {
            octal(&mut gnu.sparse[i].offset, *off);
            octal(&mut gnu.sparse[i].numbytes, *len);
        }
        gnu.isextended[0] = 1;
        octal(&mut gnu.realsize, real);
    }
    h.set_size(segments.len() as u64 * 512);
    h.set_cksum();
    let mut ext = [0u8; 512];
    let (off, len) = segments[4];
    let o = format!("{off:011o}");
    let l = format!("{len:011o}");
    ext[..11].copy_from_slice(o.as_bytes());
    ext[12..23].copy_from_slice(l.as_bytes());
    let mut blob = h.as_bytes().to_vec();
    blob.extend_from_slice(&ext);
    for i in 0..5u8 {
        blob.extend_from_slice(&[b'a' + i; 512]);
    }
    blob.extend_from_slice(&[0u8; 1024]);
    accepted(&[blob], |m, _| {
        let chunks: Vec<(usize, u8, usize)> = segments
            .iter()
            .enumerate()
            .map(|(i, &(o, l))| (o as usize, b'a' + i as u8, l as usize))
            .collect();
        sparse_expect(m, "old-sparse", real as usize, &chunks);
    });
}
