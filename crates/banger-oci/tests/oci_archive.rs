//! `read_image_archive`: an OCI layout archived as one tar (what `skopeo copy oci-archive:`
//! writes and what `banger image import DIR` streams to a remote daemon) reads as the
//! layout itself, the tag choosing among its images; a blob that is a link inside the
//! archive is refused as it is in a layout directory; a docker archive still reads, and
//! refuses a tag.

use std::path::Path;

use banger_oci::archive::read_image_archive;
use banger_testkit::{one_file_layer, tar_with_files, LayerCompression, OciLayoutBuilder};

/// `dir` as a tar at `to`, members relative to `dir`, links kept as links.
fn archive_dir(dir: &Path, to: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(to).unwrap());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir).unwrap();
    builder.finish().unwrap();
}

/// A temporary directory and an empty OCI layout in its `layout`, the rest of it free for
/// the archive and what is unpacked from it.
fn temp_layout() -> (tempfile::TempDir, OciLayoutBuilder) {
    let tmp = tempfile::tempdir().unwrap();
    let layout = OciLayoutBuilder::new(&tmp.path().join("layout")).unwrap();
    (tmp, layout)
}

fn layer_digests(image: &banger_oci::archive::LocalImage) -> Vec<String> {
    image.layers.iter().map(|l| l.digest.to_string()).collect()
}

#[test]
fn an_oci_archive_reads_as_its_layout_and_the_tag_chooses_the_image() {
    let (tmp, mut layout) = temp_layout();
    let a = layout
        .image("a", &one_file_layer("a", b"first", LayerCompression::Gzip))
        .unwrap();
    let b = layout
        .image("b", &one_file_layer("b", b"second", LayerCompression::None))
        .unwrap();
    let tarball = tmp.path().join("image.tar");
    archive_dir(layout.dir(), &tarball);

    let image = read_image_archive(&tarball, &tmp.path().join("unpacked-b"), Some("b")).unwrap();
    assert_eq!(layer_digests(&image), [b.layers[0].digest.clone()]);
    assert_eq!(image.config_digest.to_string(), b.config_digest);
    let image = read_image_archive(&tarball, &tmp.path().join("unpacked-a"), Some("a")).unwrap();
    assert_eq!(layer_digests(&image), [a.layers[0].digest.clone()]);

    // Two images and no tag: the error names the archive, not the unpack directory.
    let err = read_image_archive(&tarball, &tmp.path().join("unpacked-none"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds 2 images; name one as PATH:TAG"),
        "{err}"
    );
    assert!(err.contains(&tarball.display().to_string()), "{err}");
    let err = read_image_archive(&tarball, &tmp.path().join("unpacked-c"), Some("c"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no image tagged \"c\""), "{err}");
}

#[test]
fn a_linked_blob_in_an_oci_archive_is_refused_and_a_docker_archive_takes_no_tag() {
    let (tmp, mut layout) = temp_layout();
    let image = layout
        .image(
            "latest",
            &one_file_layer("a", b"first", LayerCompression::None),
        )
        .unwrap();
    // The layer's blob becomes a link to a copy of itself, inside the archive.
    let blobs = layout.dir().join("blobs/sha256");
    let hex = image.layers[0].digest.strip_prefix("sha256:").unwrap();
    std::fs::rename(blobs.join(hex), blobs.join("elsewhere")).unwrap();
    std::os::unix::fs::symlink("elsewhere", blobs.join(hex)).unwrap();
    let tarball = tmp.path().join("linked.tar");
    archive_dir(layout.dir(), &tarball);
    let err = read_image_archive(&tarball, &tmp.path().join("unpacked"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(hex) && err.contains("(it is a symlink); refused"),
        "{err}"
    );

    // A docker archive is read as before; a tag for one is refused, saying why.
    let docker = tmp.path().join("docker.tar");
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest = br#"[{"Config":"config.json","RepoTags":["x:latest"],"Layers":[]}]"#;
    std::fs::write(
        &docker,
        tar_with_files(&[
            ("manifest.json", &manifest[..]),
            ("config.json", &config[..]),
        ]),
    )
    .unwrap();
    read_image_archive(&docker, &tmp.path().join("docker-ok"), None).unwrap();
    let err = read_image_archive(&docker, &tmp.path().join("docker-tag"), Some("latest"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tag \"latest\" given, but this is a docker archive"),
        "{err}"
    );
}
