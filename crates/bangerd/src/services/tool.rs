//! Running banger's own host tools (`ip`, `nft`, `cp`, `resize2fs`, `qemu-img`, `debugfs`,
//! `ssh-keygen`, `apt-get`, …; never a guest's) to completion: one way to spawn one, feed
//! it, wait for it and say why it failed, naming the program, the step and its stderr.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Runs `command` for the step `what` (which names the program, e.g. `"resize2fs"` or
/// `"cp (copy the image's root filesystem)"`) and returns its stdout.
pub(crate) fn run(command: &mut Command, what: &str) -> anyhow::Result<String> {
    run_with_input(command, what, None)
}

/// [`run`], with `input` written to the tool's stdin (else its stdin is empty).
pub(crate) fn run_with_input(
    command: &mut Command,
    what: &str,
    input: Option<&[u8]>,
) -> anyhow::Result<String> {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("run {what} (is {program} installed?)"))?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(bytes)
            .with_context(|| format!("feed {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait for {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_step_the_status_and_the_stderr() {
        let e = run(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            "sh (break)",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "sh (break) failed (exit status: 3): broken");
    }

    #[test]
    fn input_goes_in_and_stdout_comes_back() {
        let out = run_with_input(&mut Command::new("cat"), "cat", Some(b"hi")).unwrap();
        assert_eq!(out, "hi");
    }

    #[test]
    fn a_missing_program_is_named() {
        let e = run(
            &mut Command::new("banger-no-such-tool"),
            "banger-no-such-tool x",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "run banger-no-such-tool x (is banger-no-such-tool installed?)"
        );
    }
}
