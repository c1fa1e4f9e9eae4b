//! `banger kernel pull`: a kernel artifact pushed to a real registry (the Debian cloud
//! kernel's vmlinuz and modules, as docs/kernel-artifact.md lays them out), verified and
//! bounded; and the distribution's kernel through apt, where apt can reach its mirror.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_testkit::host::run_ok;
use banger_testkit::Registry;
use serde_json::Value;
use sha2::Digest as _;
use support::vms::guest_parts;
use support::{assert_exit, assert_exit_says_all, stderr, stdout, Install};

const ARTIFACT_TYPE: &str = "application/vnd.banger.kernel.v1";
const KERNEL: &str = "application/vnd.banger.kernel.image.v1";
const MODULES: &str = "application/vnd.banger.kernel.modules.v1.tar+gzip";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Uploads `data` as a blob of `repo` (monolithic upload); returns its descriptor.
fn push_blob(registry: &Registry, repo: &str, media_type: &str, file: &Path) -> Value {
    let data = std::fs::read(file).unwrap();
    let digest = sha256(&data);
    let headers = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        &format!("http://{}/v2/{repo}/blobs/uploads/", registry.host()),
    ]);
    let location = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .expect("an upload location")
        .trim();
    let location = if location.starts_with('/') {
        format!("http://{}{location}", registry.host())
    } else {
        location.to_owned()
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{location}{sep}digest={digest}"),
    ]);
    serde_json::json!({ "mediaType": media_type, "digest": digest, "size": data.len() })
}

/// Pushes an artifact manifest over `blobs` as `repo:tag`; returns the manifest digest.
fn push_artifact(
    registry: &Registry,
    repo: &str,
    tag: &str,
    dir: &Path,
    blobs: &[Value],
) -> String {
    let config = dir.join("config.json");
    std::fs::write(&config, b"{}").unwrap();
    let config = push_blob(registry, repo, "application/vnd.oci.empty.v1+json", &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE,
        "config": config,
        "layers": blobs,
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    let path = dir.join(format!("manifest-{tag}.json"));
    std::fs::write(&path, &body).unwrap();
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", path.display()),
        &format!("http://{}/v2/{repo}/manifests/{tag}", registry.host()),
    ]);
    sha256(&body)
}

/// The cloud kernel package unpacked: (vmlinuz, modules.tgz of /lib/modules/<release>).
fn kernel_files(deb: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("deb");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    let vmlinuz = std::fs::read_dir(root.join("boot"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("a vmlinuz in the package");
    let release = std::fs::read_dir(root.join("lib/modules"))
        .unwrap()
        .flatten()
        .next()
        .expect("a modules tree")
        .path();
    let tgz = dir.join("modules.tgz");
    run_ok(
        Command::new("tar")
            .arg("czf")
            .arg(&tgz)
            .arg("-C")
            .arg(&release)
            .arg("."),
    );
    (vmlinuz, tgz)
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", stdout(out), stderr(out)))
}

#[test]
fn an_oci_kernel_artifact_is_pulled_verified_bounded_and_imported_like_the_deb() {
    let Some((_, deb)) = guest_parts() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (vmlinuz, modules) = kernel_files(deb, tmp.path());
    let kernel_blob = push_blob(&registry, "kernels/cloud", KERNEL, &vmlinuz);
    let modules_blob = push_blob(&registry, "kernels/cloud", MODULES, &modules);
    let digest = push_artifact(
        &registry,
        "kernels/cloud",
        "v1",
        tmp.path(),
        &[kernel_blob.clone(), modules_blob],
    );
    let reference = registry.reference("kernels/cloud", "v1");
    let repo = reference.rsplit_once(':').unwrap().0.to_owned();

    let install = Install::new();
    let out = install.banger(&["kernel", "import", "deb", "--deb", deb.to_str().unwrap()]);
    assert_exit(&out, 0);
    let deb_info = json_of(&install.banger(&["--json", "kernel", "show", "deb"]));

    let out = install.banger(&["--json", "kernel", "pull", &reference]);
    assert_exit(&out, 0);
    let pulled = json_of(&out);
    assert_eq!(pulled["source"], "oci");
    assert_eq!(pulled["reference"], reference.as_str());
    assert_eq!(pulled["manifest_digest"], digest.as_str());
    // The default name: the repository's last component and the tag.
    assert_eq!(pulled["kernel"]["name"], "cloud-v1");
    assert_eq!(pulled["kernel"]["version"], deb_info["version"]);
    assert_eq!(pulled["kernel"]["initrd"], "banger");
    let dir = PathBuf::from(pulled["kernel"]["dir"].as_str().unwrap());
    assert!(dir.join("initramfs.cpio").is_file());
    // Nothing staged is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Prose, pinned by the digest it printed.
    let out = install.banger(&[
        "kernel",
        "pull",
        &format!("{repo}@{digest}"),
        "--name",
        "pinned",
    ]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).starts_with(&format!(
            "pulled kernel pinned ({}) from ",
            deb_info["version"].as_str().unwrap()
        )),
        "{}",
        stdout(&out)
    );

    // A pinned digest that is not the manifest's: refused, nothing imported.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = install.banger(&[
        "kernel",
        "pull",
        &format!("{repo}@{wrong}"),
        "--name",
        "bad",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains(&wrong), "{}", stderr(&out));
    assert!(install.banger(&["kernel", "show", "bad"]).status.code() != Some(0));

    // An artifact with a blob of a type banger does not know: refused, naming it.
    let odd = tmp.path().join("odd");
    std::fs::write(&odd, b"odd").unwrap();
    let odd_blob = push_blob(&registry, "kernels/cloud", "application/x-odd", &odd);
    push_artifact(
        &registry,
        "kernels/cloud",
        "odd",
        tmp.path(),
        &[kernel_blob.clone(), odd_blob],
    );
    let out = install.banger(&[
        "kernel",
        "pull",
        &registry.reference("kernels/cloud", "odd"),
    ]);
    assert_exit_says_all(
        &out,
        1,
        &[
            "unknown blob media type \"application/x-odd\"",
            "bad_request",
        ],
    );

    // The size bound: a kernel blob over kernel_max_payload_bytes is refused before a
    // byte of it is fetched.
    let small = Install::with_config("kernel_max_payload_bytes = 1048576\n");
    let out = small.banger(&["kernel", "pull", &reference]);
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert!(
        message.contains(&format!(
            "is {} bytes, more than the limit of 1048576 (kernel_max_payload_bytes)",
            kernel_blob["size"]
        )),
        "{message}"
    );
    assert!(!small
        .cache_dir()
        .join("blobs/sha256")
        .join(
            kernel_blob["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
        )
        .exists());
}

#[test]
fn an_image_is_not_a_kernel_artifact() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = banger_testkit::OciLayoutBuilder::new(&tmp.path().join("layout")).unwrap();
    layout
        .image(
            "v1",
            &[(
                banger_testkit::guest::busybox_layer(),
                banger_testkit::LayerCompression::Gzip,
            )],
        )
        .unwrap();
    banger_testkit::push_oci_layout(&tmp.path().join("layout"), "v1", &registry, "busybox");
    let install = Install::new();
    let out = install.banger(&["kernel", "pull", &registry.reference("busybox", "v1")]);
    assert_exit_says_all(
        &out,
        1,
        &[
            "is not a kernel artifact",
            "application/vnd.oci.image.config.v1+json",
        ],
    );
}

#[test]
fn without_a_reference_the_distribution_cloud_kernel_comes_through_apt() {
    let depends = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output();
    let known = depends
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Depends: linux-image-"));
    if !banger_testkit::require(known, "apt-cache knows no linux-image-cloud-amd64 here") {
        return;
    }
    let install = Install::new();
    let out = install.banger(&["--json", "kernel", "pull"]);
    if out.status.code() != Some(0) && stderr(&out).contains("apt-get download") {
        banger_testkit::require(
            false,
            format!("apt cannot reach its mirror: {}", stderr(&out)),
        );
        return;
    }
    assert_exit(&out, 0);
    let pulled = json_of(&out);
    assert_eq!(pulled["source"], "apt");
    let package = pulled["package"].as_str().unwrap();
    let expected = String::from_utf8_lossy(&depends.unwrap().stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(package, expected);
    let release = package.trim_start_matches("linux-image-");
    assert_eq!(pulled["kernel"]["version"], release);
    assert_eq!(pulled["kernel"]["name"], release.replace('.', "-"));
}
