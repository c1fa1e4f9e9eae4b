//! `vm.exec` and `vm.shell`: a command (or the login shell) run in a running VM through
//! its agent, its output streamed to the caller and the caller's input, resizes and
//! signals passed on.

use std::path::PathBuf;

use anyhow::Context;
use banger_agent::proto::{ExecRequest, ExitStatus, WinSize};
use banger_api::{ExecResult, OutputStream, TtyParams, VmExecParams, VmShellParams};
use banger_vmm::agent::{AgentClient, ExecControl};

use super::{OutputWriter, VmService};
use crate::services::{CallContext, InputEvent, InputReceiver};
use crate::{ServiceError, ServiceResult};

/// The interactive shell of `vm.shell` (and of `vm.run` without a command): a login
/// shell, bash where the image has it (what people expect at a prompt), else the POSIX sh
/// every image has. Chosen in the guest, so no `$SHELL` of the host leaks in.
pub(super) const LOGIN_SHELL: [&str; 3] = [
    "/bin/sh",
    "-c",
    "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l",
];

/// `TERM` in the guest when the caller's terminal does not say.
pub(super) const DEFAULT_TERM: &str = "xterm";

/// How a command's input is wired.
#[derive(Debug, Clone, Default)]
pub(super) struct Stdio {
    /// The caller forwards its stdin.
    pub(super) stdin: bool,
    /// On a pty of the caller's terminal.
    pub(super) tty: Option<TtyParams>,
}

impl VmService {
    /// Runs a command in a running VM, streaming its output to the caller.
    pub fn exec(&self, ctx: &CallContext, params: &VmExecParams) -> ServiceResult<ExecResult> {
        if params.argv.is_empty() {
            return Err(ServiceError::bad_request("no command given"));
        }
        let vm = self.show(&params.name)?;
        let client = self.agent(&vm)?;
        let cwd = params.cwd.clone().unwrap_or_else(|| "/root".into());
        let stdio = Stdio {
            stdin: params.stdin,
            tty: params.tty.clone(),
        };
        self.exec_on(ctx, &client, &vm.name, &params.argv, &cwd, stdio)
    }

    /// Runs the interactive login shell in a running VM, fed by the caller's input.
    pub fn shell(&self, ctx: &CallContext, params: &VmShellParams) -> ServiceResult<ExecResult> {
        let vm = self.show(&params.name)?;
        let client = self.agent(&vm)?;
        let stdio = Stdio {
            stdin: true,
            tty: params.tty.clone(),
        };
        let argv = LOGIN_SHELL.map(String::from);
        self.exec_on(ctx, &client, &vm.name, &argv, "/root", stdio)
    }

    pub(super) fn exec_on(
        &self,
        ctx: &CallContext,
        client: &AgentClient,
        vm: &str,
        argv: &[String],
        cwd: &str,
        stdio: Stdio,
    ) -> ServiceResult<ExecResult> {
        let mut request = ExecRequest::new(argv.iter().map(String::as_str));
        request.cwd = Some(PathBuf::from(cwd));
        request.stdin = stdio.stdin || stdio.tty.is_some();
        if let Some(tty) = &stdio.tty {
            request.tty = Some(WinSize {
                rows: tty.rows,
                cols: tty.cols,
            });
            let term = tty.term.clone().filter(|t| !t.is_empty());
            request = request.env("TERM", term.as_deref().unwrap_or(DEFAULT_TERM));
        }
        let mut stdout = OutputWriter {
            ctx,
            stream: OutputStream::Stdout,
        };
        let mut stderr = OutputWriter {
            ctx,
            stream: OutputStream::Stderr,
        };
        // Taken even when stdin is not forwarded: signals (and the hang-up) come that way.
        let input = ctx.take_input();
        let on_pty = request.tty.is_some();
        let hung_up = ctx.hung_up_flag();
        let start = |control: ExecControl| -> std::io::Result<()> {
            match input {
                Some(input) => {
                    crate::span::spawn_thread("vm-exec-input", move || {
                        forward_input(input, &control, on_pty, &hung_up)
                    })?;
                }
                // Nobody can send input (a call without a connection): end it at once
                // rather than leave the command waiting.
                None if request.stdin => {
                    let _ = control.close_stdin();
                }
                None => {}
            }
            Ok(())
        };
        let status = client
            .exec_with(&request, start, &mut stdout, &mut stderr)
            .with_context(|| format!("run {argv:?} in VM {vm:?}"))?;
        Ok(match status {
            ExitStatus::Code(code) => ExecResult {
                vm: vm.into(),
                exit_code: Some(code),
                signal: None,
            },
            ExitStatus::Signal(signal) => ExecResult {
                vm: vm.into(),
                exit_code: None,
                signal: Some(signal),
            },
        })
    }
}

/// Passes the caller's input (and signals) on to the command until the caller stops sending
/// it. When the caller hangs up (its connection closed) the command is hung up on, on a
/// pty or not: SIGHUP to its process group, SIGKILL after
/// [`banger_vmm::agent::HANGUP_GRACE`] (nobody is left to see its output or stop it). A
/// caller that only shut down its sending half still reads: a command on a pipe then sees
/// its stdin end, one on a pty gets SIGHUP (its terminal went away), as before.
fn forward_input(
    mut input: InputReceiver,
    control: &ExecControl,
    on_pty: bool,
    hung_up: &std::sync::atomic::AtomicBool,
) {
    while let Some(event) = input.blocking_recv() {
        let sent = match event {
            InputEvent::Data(data) => control.stdin(&data),
            InputEvent::Eof => control.close_stdin(),
            InputEvent::Resize { rows, cols } => control.resize(WinSize { rows, cols }),
            InputEvent::Signal(signal) => control.signal(signal),
            // An upload belongs to the step before the command (see services::upload).
            InputEvent::Upload(_) | InputEvent::UploadEnd => Ok(()),
        };
        if sent.is_err() || control.finished() {
            return;
        }
    }
    if control.finished() {
        return;
    }
    if hung_up.load(std::sync::atomic::Ordering::SeqCst) {
        control.hang_up();
    } else if on_pty {
        let _ = control.signal(rustix::process::Signal::Hup as i32);
    } else {
        let _ = control.close_stdin();
    }
}
