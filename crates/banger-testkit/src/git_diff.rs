//! `git diff` text as the tests of banger's own diffs expect it (bangerd's patch of a VM's
//! workspace, as `vm diff` prints it and `vm run --patch` writes it): the sections git
//! writes for a new file and above a changed one, spelled out once, so each expected patch
//! is put together from them.

/// What `git diff` writes for a new regular file `path` (mode 0644) holding the one line
/// `line`.
pub fn new_file(path: &str, line: &str) -> String {
    format!(
        "diff --git a/{path} b/{path}\n\
         new file mode 100644\n\
         --- /dev/null\n\
         +++ b/{path}\n\
         @@ -0,0 +1 @@\n\
         +{line}\n"
    )
}

/// What `git diff` writes above the hunks of a changed file `path` whose mode stayed.
pub fn changed_file_header(path: &str) -> String {
    format!(
        "diff --git a/{path} b/{path}\n\
         --- a/{path}\n\
         +++ b/{path}\n"
    )
}
