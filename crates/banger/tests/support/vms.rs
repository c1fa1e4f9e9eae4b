//! Installations that can boot VMs: a real Debian cloud kernel, banger's agent and a
//! busybox image (the same recipe as `vm.rs`, shared with the other VM test files).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use banger_testkit::{guest, push_oci_layout, LayerCompression, OciLayoutBuilder, Registry};

use super::{stderr, stdout, Install, NetNs};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Agent binary and kernel package, built/downloaded once per test process.
pub fn guest_parts() -> Option<&'static (PathBuf, PathBuf)> {
    static PARTS: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    PARTS
        .get_or_init(|| {
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let deb = match guest::fetch_test_kernel(
                &workspace_root(),
                &tmp.join("banger-test-kernel"),
            ) {
                Ok(deb) => deb,
                Err(e) => {
                    banger_testkit::require(false, e);
                    return None;
                }
            };
            let agent =
                guest::build_guest_agent(&workspace_root(), &tmp.join("banger-agent-build"))
                    .unwrap_or_else(|e| panic!("{e}"));
            Some((agent, deb))
        })
        .as_ref()
}

/// An installation configured with `config`, whose banger runs in `netns` when given,
/// with a kernel and a busybox image named `bb`: pulled from `registry`, or imported from
/// an OCI layout (a daemon inside a namespace cannot reach the host's loopback registry).
pub fn ready_install_in(
    config: &str,
    netns: Option<&NetNs>,
    registry: Option<&Registry>,
) -> Option<Install> {
    let (agent, deb) = guest_parts()?;
    let mut install = Install::new();
    install
        .extra_env
        .push(("BANGER_AGENT".into(), agent.into()));
    install.netns = netns.map(|ns| ns.name.clone());
    install.write_config(config);
    let layout_dir = busybox_layout(&install);
    match registry {
        Some(registry) => push_and_pull(&install, &layout_dir, registry, "busybox", "bb"),
        None => import_busybox(&install, &layout_dir),
    }
    import_kernel(&install, deb);
    Some(install)
}

/// Writes the busybox image, tagged `v1`, as an OCI layout in the installation's
/// `layout/`; returns that directory.
pub fn busybox_layout(install: &Install) -> PathBuf {
    let layout_dir = install.dir.path().join("layout");
    let mut layout = OciLayoutBuilder::new(&layout_dir).unwrap();
    layout
        .image("v1", &[(guest::busybox_layer(), LayerCompression::Gzip)])
        .unwrap();
    layout_dir
}

/// Pushes the `v1` of the OCI layout `layout_dir` to `registry` as `repo`, then pulls it
/// from there as image `name`.
pub fn push_and_pull(
    install: &Install,
    layout_dir: &Path,
    registry: &Registry,
    repo: &str,
    name: &str,
) {
    push_oci_layout(layout_dir, "v1", registry, repo);
    let out = install.banger(&[
        "image",
        "pull",
        &registry.reference(repo, "v1"),
        "--name",
        name,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "image pull {repo}: {}",
        stderr(&out)
    );
}

/// Imports the busybox layout `layout_dir` (see [`busybox_layout`]) as image `bb`.
pub fn import_busybox(install: &Install, layout_dir: &Path) {
    let out = install.banger(&[
        "image",
        "import",
        &format!("{}:v1", layout_dir.display()),
        "--name",
        "bb",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Imports the kernel package `deb` as kernel `cloud`.
pub fn import_kernel(install: &Install, deb: &Path) {
    let out = install.banger(&["kernel", "import", "cloud", "--deb", deb.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("imported kernel cloud ("),
        "{}",
        stdout(&out)
    );
}
