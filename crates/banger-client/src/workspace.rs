//! Which files of a workspace `vm run PATH` sends, and the stream itself: the CLI lists
//! and archives the workspace and streams the tar over its connection (`upload`
//! notifications), so the daemon reads no client path and `vm run` works the same against
//! a local, a system or a remote daemon.
//!
//! The listing is the one the daemon used to make (the "boundary" work's
//! `bangerd/src/services/workspace.rs`), moved here unchanged in behaviour.
//!
//! The workspace may be a repository nobody has read: listing
//! it must run nothing the repository controls. `git ls-files` does not qualify: git reads
//! the repository's own `.git/config`, which can name programs git runs while listing
//! (`core.fsmonitor`), clean filters, hooks paths, `include.path`s of other host files,
//! and it refuses "dubious ownership" repositories in ways whose fallbacks leaked `.env`.
//! Neutralising every such key by hand is a list that grows with each git release. So the
//! listing reads the two files that decide it directly, with crates that execute nothing
//! and read no git configuration at all:
//! - the index (`.git/index`, via `gix-index`): the tracked files, ignored or not;
//! - the ignore rules (`.gitignore` files, `.git/info/exclude`, via `ignore`, the
//!   ripgrep walker, with the user-global excludes file off since finding it means
//!   reading git config): the untracked files git would not ignore.
//!
//! What is uploaded: tracked files present on disk plus untracked-not-ignored ones
//! (`git ls-files --cached --others --exclude-standard`); in a plain directory every
//! file. Symlinks go as links, never followed; a path whose parent directory is a symlink
//! is not read (the index could name `link/secret` with `link -> /etc`); sockets, FIFOs
//! and devices are skipped and counted. When the index cannot be used (a `.git` file of
//! a worktree or submodule pointing elsewhere, an unreadable or corrupt index), the copy
//! still honours the ignore rules and leaves `.git/` out, and says so.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;

/// Largest `.git/index` read; a bigger one is refused (decoding allocates about as much).
/// Git's own index of the Linux kernel (80k files) is about 10 MiB.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Most files one workspace copy lists; more is refused rather than held in memory.
pub const MAX_WORKSPACE_FILES: usize = 2_000_000;

/// How the file list was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingKind {
    /// A git work tree: its index plus the untracked files its ignore rules let through.
    GitIndex,
    /// A git work tree whose index could not be used: every file its ignore rules let
    /// through, `.git/` left out.
    GitIgnoreOnly,
    /// Not in a git work tree: every file.
    Plain,
}

/// The files of one workspace, relative to it.
#[derive(Debug, Clone)]
pub struct Listing {
    /// How it was made.
    pub kind: ListingKind,
    /// Files (regular or symlinks) to upload, relative to the workspace, sorted.
    pub files: Vec<PathBuf>,
    /// Sockets, FIFOs and devices left out.
    pub skipped_special: u64,
    /// Tracked paths not read because a parent directory of theirs is a symlink, or the
    /// path is not a plain relative one.
    pub skipped_unsafe: u64,
    /// Why the index was not used ([`ListingKind::GitIgnoreOnly`]).
    pub index_problem: Option<String>,
}

impl Listing {
    /// What the user should be told about this copy, one line each: nothing for a copy
    /// that took everything git would.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(problem) = &self.index_problem {
            out.push(format!(
                "git index not used ({problem}): copied the files .gitignore lets through, without .git/; tracked files that .gitignore matches were left out"
            ));
        }
        if self.skipped_special > 0 {
            out.push(format!(
                "skipped {} special file(s) (sockets, FIFOs, devices)",
                self.skipped_special
            ));
        }
        if self.skipped_unsafe > 0 {
            out.push(format!(
                "skipped {} tracked path(s) below a symlink or outside the work tree",
                self.skipped_unsafe
            ));
        }
        out
    }
}

/// What one path on disk is, for the copy.
enum Kind {
    Upload,
    Special,
    Directory,
    Missing,
}

fn classify(path: &Path) -> Kind {
    match std::fs::symlink_metadata(path) {
        Err(_) => Kind::Missing,
        Ok(meta) => {
            let t = meta.file_type();
            if t.is_file() || t.is_symlink() {
                Kind::Upload
            } else if t.is_dir() {
                Kind::Directory
            } else {
                // Sockets, FIFOs, block and character devices.
                Kind::Special
            }
        }
    }
}

/// The nearest directory at or above `dir` holding a `.git` entry: the work tree's root.
fn work_tree_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| std::fs::symlink_metadata(d.join(".git")).is_ok())
        .map(Path::to_owned)
}

/// Whether `rel` is a plain relative path (no `..`, no root, no `.git` component) none
/// of whose parent directories under `base` is a symlink or a non-directory.
fn safe_relative(base: &Path, rel: &Path) -> bool {
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(part) if !part.eq_ignore_ascii_case(".git") => parts.push(part),
            _ => return false,
        }
    }
    let mut dir = base.to_owned();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.file_type().is_dir() => {}
            _ => return false,
        }
    }
    !parts.is_empty()
}

/// Lists `workspace` (an absolute directory) as described in the module docs.
pub fn list(workspace: &Path) -> anyhow::Result<Listing> {
    let mut listing = Listing {
        kind: ListingKind::Plain,
        files: Vec::new(),
        skipped_special: 0,
        skipped_unsafe: 0,
        index_problem: None,
    };
    let mut files = std::collections::BTreeSet::new();
    let root = work_tree_root(workspace);
    if let Some(root) = &root {
        match read_index(root) {
            Ok(tracked) => {
                listing.kind = ListingKind::GitIndex;
                let prefix = workspace
                    .strip_prefix(root)
                    .expect("the work tree root is an ancestor");
                for path in tracked {
                    let Ok(rel) = path.strip_prefix(prefix) else {
                        continue;
                    };
                    if !safe_relative(workspace, rel) {
                        listing.skipped_unsafe += 1;
                        continue;
                    }
                    match classify(&workspace.join(rel)) {
                        Kind::Upload => {
                            files.insert(rel.to_owned());
                        }
                        Kind::Special => listing.skipped_special += 1,
                        // Deleted but still tracked, or a file replaced by a directory
                        // (whose untracked contents the walk below decides on).
                        Kind::Missing | Kind::Directory => {}
                    }
                }
            }
            Err(problem) => {
                listing.kind = ListingKind::GitIgnoreOnly;
                listing.index_problem = Some(format!("{problem:#}"));
            }
        }
    }
    walk(workspace, root.is_some(), &mut files, &mut listing)?;
    listing.files = files.into_iter().collect();
    Ok(listing)
}

/// The tracked paths (relative to `root`) of the index of the work tree at `root`.
fn read_index(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    let git = root.join(".git");
    let meta =
        std::fs::symlink_metadata(&git).with_context(|| format!("stat {}", git.display()))?;
    if !meta.is_dir() {
        // A worktree's or submodule's `.git` file names a directory elsewhere: reading
        // it would let the repository choose a host path.
        anyhow::bail!("{} is not a directory", git.display());
    }
    let index = git.join("index");
    let size = match std::fs::symlink_metadata(&index) {
        // A fresh `git init`: nothing tracked yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", index.display())),
        Ok(meta) if !meta.is_file() => anyhow::bail!("{} is not a regular file", index.display()),
        Ok(meta) => meta.len(),
    };
    if size > MAX_INDEX_BYTES {
        anyhow::bail!(
            "{} is {size} bytes, over the limit of {MAX_INDEX_BYTES} (MAX_INDEX_BYTES)",
            index.display()
        );
    }
    let options = gix_index::decode::Options {
        alloc_limit_bytes: Some(MAX_INDEX_BYTES as usize * 4),
        ..Default::default()
    };
    // SHA-1: what every repository but an explicit `--object-format=sha256` one uses;
    // a SHA-256 index fails its checksum and takes the ignore-rules-only path.
    let file = gix_index::File::at(&index, gix_hash::Kind::Sha1, false, options)
        .with_context(|| format!("read {}", index.display()))?;
    if file.entries().len() > MAX_WORKSPACE_FILES {
        anyhow::bail!(
            "{} lists {} entries, over the limit of {MAX_WORKSPACE_FILES} (MAX_WORKSPACE_FILES)",
            index.display(),
            file.entries().len()
        );
    }
    let mut out = Vec::with_capacity(file.entries().len());
    for entry in file.entries() {
        // Submodules (their own repositories) and sparse directory entries (not checked
        // out) are not files of this work tree; merge conflicts list a path per stage.
        if entry.mode.is_submodule() || entry.mode.is_sparse() {
            continue;
        }
        let path = std::ffi::OsStr::from_bytes(entry.path(&file));
        out.push(PathBuf::from(path));
    }
    out.dedup();
    Ok(out)
}

/// Adds the untracked files of `workspace` that the ignore rules let through (all files
/// when `git` is false) to `files`.
fn walk(
    workspace: &Path,
    git: bool,
    files: &mut std::collections::BTreeSet<PathBuf>,
    listing: &mut Listing,
) -> anyhow::Result<()> {
    let mut builder = ignore::WalkBuilder::new(workspace);
    builder
        .standard_filters(false)
        .hidden(false)
        .follow_links(false)
        // git's rules only: `.gitignore`s (also those between the work tree root and the
        // workspace), `.git/info/exclude`; not ripgrep's `.ignore`, and not the global
        // excludes file, whose location is git configuration.
        .git_ignore(git)
        .git_exclude(git)
        .parents(git)
        .git_global(false)
        .ignore(false)
        .require_git(true);
    let top = workspace.to_owned();
    builder.filter_entry(move |entry| {
        // `.git` is never copied; a nested repository is its own (git lists it as one
        // directory, not its files).
        let nested_repo = entry.path() != top
            && entry.file_type().is_some_and(|t| t.is_dir())
            && entry.path().join(".git").symlink_metadata().is_ok();
        entry.file_name() != ".git" && !nested_repo
    });
    for entry in builder.build() {
        let entry = entry.with_context(|| format!("list {}", workspace.display()))?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(workspace)
            .expect("the walk stays below its root")
            .to_owned();
        if files.contains(&rel) {
            continue;
        }
        match classify(entry.path()) {
            Kind::Upload => {
                if files.len() >= MAX_WORKSPACE_FILES {
                    anyhow::bail!(
                        "{} holds more than {MAX_WORKSPACE_FILES} files (MAX_WORKSPACE_FILES)",
                        workspace.display()
                    );
                }
                files.insert(rel);
            }
            Kind::Special => listing.skipped_special += 1,
            Kind::Directory | Kind::Missing => {}
        }
    }
    Ok(())
}

/// Writes the listed files of `workspace` as one tar archive into `sink`: what the agent
/// unpacks in the guest. Each file is classified again when archived (the directory may
/// have changed since it was listed); symlinks go as links.
pub fn archive(workspace: &Path, listing: &Listing, sink: impl Write) -> anyhow::Result<()> {
    let mut builder = tar::Builder::new(sink);
    // Symlinks go as links: following one would read a host path the repo chose.
    builder.follow_symlinks(false);
    for file in &listing.files {
        let full = workspace.join(file);
        if let Kind::Upload = classify(&full) {
            builder
                .append_path_with_name(&full, file)
                .with_context(|| format!("archive {}", full.display()))?;
        }
    }
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .context("finish the archive")
}

/// Sends the bytes written to it as the running call's `upload` stream, in chunks of
/// [`banger_api::UPLOAD_CHUNK`]. Writing blocks while the daemon is not reading: the
/// connection's own backpressure is the flow control.
pub struct UploadWriter {
    input: crate::rpc::InputSender,
    buf: Vec<u8>,
}

impl UploadWriter {
    /// A writer into the upload of the call `input` belongs to.
    pub fn new(input: crate::rpc::InputSender) -> Self {
        UploadWriter {
            input,
            buf: Vec::with_capacity(banger_api::UPLOAD_CHUNK),
        }
    }

    /// Sends what is buffered and the end of the stream.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.flush()?;
        self.input.upload_end()
    }
}

impl Write for UploadWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.input.is_done() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the call ended before its upload did",
            ));
        }
        let room = banger_api::UPLOAD_CHUNK - self.buf.len();
        let n = bytes.len().min(room);
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() == banger_api::UPLOAD_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.input.upload(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Lists `workspace`, then archives it into the running call's upload and ends it.
pub fn stream(
    workspace: &Path,
    listing: &Listing,
    input: crate::rpc::InputSender,
) -> anyhow::Result<()> {
    let mut writer = UploadWriter::new(input);
    archive(workspace, listing, &mut writer)?;
    writer
        .finish()
        .with_context(|| format!("send {}", workspace.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_testkit::host::{git, git_installed};

    /// A temporary directory holding the tree `name`, each `(path, contents)` of `files`
    /// written below it (directories made on the way); the tree's path.
    fn tree(name: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join(name);
        for (path, contents) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        }
        (tmp, root)
    }

    fn names(listing: &Listing) -> Vec<String> {
        listing
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    }

    #[test]
    fn a_hostile_repo_lists_tracked_and_unignored_files_and_runs_nothing() {
        if !git_installed() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(repo.join("src")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host secret").unwrap();
        git(&repo, &["init", "-q"]);
        std::fs::write(repo.join("src/main.c"), "int main;").unwrap();
        std::fs::write(repo.join(".gitignore"), ".env\n*.log\nbuild/\n").unwrap();
        std::fs::write(repo.join("tracked.log"), "tracked though ignored").unwrap();
        std::fs::create_dir_all(repo.join("d")).unwrap();
        std::fs::write(repo.join("d/f"), "tracked in d").unwrap();
        git(&repo, &["add", "src", ".gitignore", "d"]);
        git(&repo, &["add", "-f", "tracked.log"]);
        git(&repo, &["commit", "-qm", "x"]);
        // `d` becomes a symlink to a host directory: the index still lists d/f.
        std::fs::remove_dir_all(repo.join("d")).unwrap();
        std::fs::copy(outside.join("secret"), outside.join("f")).unwrap();
        std::os::unix::fs::symlink(&outside, repo.join("d")).unwrap();
        let marker = tmp.path().join("marker");
        let hostile = format!(
            "[core]\n\tfsmonitor = \"touch {m}.fsmonitor\"\n\thooksPath = hooks\n[filter \"x\"]\n\tclean = \"touch {m}.clean\"\n\tsmudge = \"touch {m}.smudge\"\n[include]\n\tpath = /etc/passwd\n",
            m = marker.display()
        );
        let mut config = std::fs::read_to_string(repo.join(".git/config")).unwrap();
        config.push_str(&hostile);
        std::fs::write(repo.join(".git/config"), config).unwrap();
        std::fs::write(repo.join(".gitattributes"), "* filter=x\n").unwrap();
        std::fs::write(repo.join(".env"), "TOKEN=1").unwrap();
        std::fs::write(repo.join("new.txt"), "untracked").unwrap();
        std::fs::write(repo.join("run.log"), "ignored").unwrap();
        std::fs::create_dir_all(repo.join("build")).unwrap();
        std::fs::write(repo.join("build/out"), "ignored").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", repo.join("passwd-link")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(repo.join("app.sock")).unwrap();

        let listing = list(&repo).unwrap();
        assert_eq!(listing.kind, ListingKind::GitIndex, "{listing:?}");
        assert_eq!(
            names(&listing),
            [
                ".gitattributes",
                ".gitignore",
                // Now an untracked symlink: sent as a link, as git would list it.
                "d",
                "new.txt",
                "passwd-link",
                "src/main.c",
                "tracked.log"
            ]
        );
        assert_eq!(listing.skipped_special, 1);
        assert_eq!(listing.skipped_unsafe, 1, "d/f below a symlink");
        let warnings = listing.warnings().join("\n");
        assert!(warnings.contains("skipped 1 special file"), "{warnings}");
        for hook in ["fsmonitor", "clean", "smudge"] {
            assert!(
                !tmp.path().join(format!("marker.{hook}")).exists(),
                "{hook} ran"
            );
        }

        // A subdirectory of the work tree: the index's paths below it, the root's rules.
        let listing = list(&repo.join("src")).unwrap();
        assert_eq!(names(&listing), ["main.c"]);
    }

    #[test]
    fn an_unusable_index_still_honours_gitignore_and_says_so() {
        let (_tmp, repo) = tree(
            "wt",
            &[
                (".git/index", "garbage"),
                (".git/HEAD", "ref: refs/heads/main\n"),
                (".gitignore", ".env\n"),
                (".env", "TOKEN=1"),
                ("a", "a"),
            ],
        );
        let listing = list(&repo).unwrap();
        assert_eq!(listing.kind, ListingKind::GitIgnoreOnly);
        assert_eq!(names(&listing), [".gitignore", "a"]);
        assert!(
            listing.warnings()[0].contains("git index not used"),
            "{:?}",
            listing.warnings()
        );

        // A worktree's `.git` file pointing elsewhere is not followed.
        std::fs::remove_dir_all(repo.join(".git")).unwrap();
        std::fs::write(repo.join(".git"), "gitdir: /somewhere/else\n").unwrap();
        let listing = list(&repo).unwrap();
        assert_eq!(listing.kind, ListingKind::GitIgnoreOnly);
        assert_eq!(names(&listing), [".gitignore", "a"]);
    }

    #[test]
    fn a_plain_directory_lists_every_file_but_special_ones() {
        let (_tmp, dir) = tree(
            "plain",
            &[
                (".gitignore", "x\n"),
                ("x", "no git, so not ignored"),
                ("sub/y", "y"),
            ],
        );
        let _socket = std::os::unix::net::UnixListener::bind(dir.join("s.sock")).unwrap();
        use rustix::fs::{mknodat, FileType, Mode, CWD};
        mknodat(
            CWD,
            dir.join("fifo"),
            FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .unwrap();
        let listing = list(&dir).unwrap();
        assert_eq!(listing.kind, ListingKind::Plain);
        assert_eq!(names(&listing), [".gitignore", "sub/y", "x"]);
        assert_eq!(listing.skipped_special, 2);
    }
}
