//! Commands that run in a VM with the caller's stdin: which input a call gets (nothing, a
//! pipe, or a pty of our terminal), forwarding it while the call runs, and the local
//! terminal in raw mode for a pty, restored on every way out.

use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use banger_api::{
    Method, Notification, Output, OutputStream, Signal, TtyParams, OUTPUT_NOTIFICATION,
};
use base64::Engine as _;
use rustix::termios::{self, OptionalActions, Termios};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};

use crate::sanitize::Sanitizer;
use banger_client::rpc::{Client, InputSender};

/// The stdin flags of `vm exec` and `vm run`, after `docker exec` with one difference: a
/// pipe or a file on stdin is forwarded without `-i`, so `echo hi | banger vm exec v -- cat`
/// just works. A terminal is forwarded only when asked (`-i`, `-t`): a command that does
/// not read stdin must not swallow what is typed after it.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct StdinArgs {
    /// Forward stdin even when it is a terminal (a pipe or a file always is).
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the command on a pty in the guest, with this terminal in raw mode: for
    /// interactive programs (shells, editors, top). Needs a terminal on stdin.
    #[arg(short, long)]
    pub tty: bool,
    /// Do not forward stdin: the command reads /dev/null (like `ssh -n`; for loops that
    /// read their own stdin).
    #[arg(short = 'n', long, conflicts_with_all = ["interactive", "tty"])]
    pub no_stdin: bool,
}

/// What a call gets for stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/dev/null`.
    Null,
    /// Our stdin, through a pipe, then end-of-file.
    Pipe,
    /// Our terminal, through a pty.
    Tty,
}

const TTY_NEEDS_A_TERMINAL: &str =
    "-t needs a terminal on stdin; leave it out to pipe stdin to the command";

impl StdinArgs {
    /// The mode for a command, given whether our stdin is a terminal.
    pub fn mode(&self, stdin_is_terminal: bool) -> anyhow::Result<Mode> {
        Ok(match *self {
            StdinArgs { tty: true, .. } if !stdin_is_terminal => bail!(TTY_NEEDS_A_TERMINAL),
            StdinArgs { tty: true, .. } => Mode::Tty,
            StdinArgs { no_stdin: true, .. } => Mode::Null,
            StdinArgs {
                interactive: true, ..
            } => Mode::Pipe,
            _ if stdin_is_terminal => Mode::Null,
            _ => Mode::Pipe,
        })
    }

    /// The mode for an interactive shell: a pty on a terminal, else the shell reads its
    /// commands from the pipe (a script).
    pub fn shell_mode(&self, stdin_is_terminal: bool) -> anyhow::Result<Mode> {
        if self.no_stdin {
            bail!("-n/--no-stdin leaves the shell nothing to read; give a command to run");
        }
        if self.tty && !stdin_is_terminal {
            bail!(TTY_NEEDS_A_TERMINAL);
        }
        Ok(if stdin_is_terminal {
            Mode::Tty
        } else {
            Mode::Pipe
        })
    }
}

/// Whether our stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// Our terminal's size and type, for a pty in the guest of the same shape.
pub fn terminal() -> anyhow::Result<TtyParams> {
    let size = termios::tcgetwinsize(std::io::stdin()).context("read the terminal's size")?;
    Ok(TtyParams {
        rows: size.ws_row,
        cols: size.ws_col,
        term: std::env::var("TERM").ok().filter(|t| !t.is_empty()),
    })
}

/// What a call streams before its stdin (`vm run`'s workspace), on the input thread.
pub type Upload = Box<dyn FnOnce(&InputSender) -> anyhow::Result<()> + Send>;

/// Calls `M` with stdin wired as `mode` (the params must say the same), printing the
/// command's output as it comes.
pub fn call<M: Method>(
    client: &mut Client,
    params: &M::Params,
    mode: Mode,
    raw: bool,
) -> anyhow::Result<M::Result> {
    call_uploading::<M>(client, params, mode, raw, None)
}

/// Sends `upload` (when some), then forwards stdin when `stdin`. A failed upload ends
/// banger: closing the connection is what tells the daemon the stream is incomplete (an
/// `eof` would unpack a truncated workspace).
fn feed(input: InputSender, upload: Option<Upload>, stdin: bool) {
    if let Some(upload) = upload {
        if let Err(e) = upload(&input) {
            if !input.is_done() {
                restore_terminal();
                eprintln!("banger: {e:#}");
                std::process::exit(1);
            }
            return;
        }
    }
    if stdin {
        forward_stdin(&input);
    }
}

/// [`call`], streaming `upload` first.
pub fn call_uploading<M: Method>(
    client: &mut Client,
    params: &M::Params,
    mode: Mode,
    raw: bool,
    upload: Option<Upload>,
) -> anyhow::Result<M::Result> {
    call_uploading_with::<M>(client, params, mode, raw, upload, None)
}

/// What a call does with notifications other than `output` (`vm run`'s downloads).
pub type OtherNotes = Box<dyn FnMut(Notification)>;

/// [`call_uploading`], handing every notification but `output` to `others`.
pub fn call_uploading_with<M: Method>(
    client: &mut Client,
    params: &M::Params,
    mode: Mode,
    raw: bool,
    upload: Option<Upload>,
    others: Option<OtherNotes>,
) -> anyhow::Result<M::Result> {
    // A pty session is the guest's terminal by intent; other output is escaped on a
    // terminal unless `raw`.
    let mut output = OutputSink::new(raw || mode == Mode::Tty);
    output.others = others;
    let sink = std::cell::RefCell::new(output);
    // Without a pty, ^C is ours to pass on (a pty carries it as a key): once the command
    // runs, a signal goes to it, like `docker run`'s signal proxy; before that, or on a
    // second ^C, banger stops as usual.
    let running = Arc::new(AtomicBool::new(false));
    let on_output = |note: Notification| {
        if note.method == OUTPUT_NOTIFICATION {
            running.store(true, Ordering::SeqCst);
        }
        sink.borrow_mut().forward(note);
    };
    let proxy_signals = |input: &InputSender| -> std::io::Result<()> {
        let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let (input, running) = (input.clone(), Arc::clone(&running));
        spawn("banger-signals", move || {
            proxy_signals(signals, &input, &running)
        })
    };
    let result = match mode {
        Mode::Null => client.call_with_input::<M>(params, on_output, |input| {
            proxy_signals(&input)?;
            match upload {
                Some(upload) => spawn("banger-upload", move || feed(input, Some(upload), false)),
                None => Ok(()),
            }
        }),
        Mode::Pipe => client.call_with_input::<M>(params, on_output, |input| {
            proxy_signals(&input)?;
            spawn("banger-stdin", move || feed(input, upload, true))
        }),
        Mode::Tty => {
            // Raw from the session's first output on: until then (a VM booting for
            // `vm run`, an image being pulled) ^C still interrupts banger, and keys typed
            // ahead are line-edited here and forwarded as they would be typed.
            let mut raw = None;
            let on_note = |note: Notification| {
                if raw.is_none() && note.method == OUTPUT_NOTIFICATION {
                    raw = Some(RawMode::enable());
                    if let Some(Err(e)) = &raw {
                        eprintln!("banger: {e:#}; keys are sent a line at a time");
                    }
                }
                sink.borrow_mut().forward(note);
            };
            let result = client.call_with_input::<M>(params, on_note, |input| {
                let signals = signal_hook::iterator::Signals::new([
                    SIGWINCH, SIGTERM, SIGHUP, SIGINT, SIGQUIT,
                ])?;
                let for_signals = input.clone();
                spawn("banger-signals", move || {
                    watch_signals(signals, &for_signals)
                })?;
                spawn("banger-stdin", move || feed(input, upload, true))
            });
            drop(raw);
            result
        }
    };
    // The stdin thread may still be blocked reading a terminal: it is left behind, and
    // the process exits without waiting for it.
    result.map_err(anyhow::Error::from)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
}

/// Copies our stdin into the call until it ends (a read error ends it too: the command
/// sees end-of-file either way).
fn forward_stdin(input: &InputSender) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            let _ = input.eof();
            return;
        }
        if input.data(&buf[..n]).is_err() {
            return; // the daemon is gone; the call reports why
        }
    }
}

/// Passes terminal size changes on, and restores the terminal before dying of a signal
/// that would otherwise leave it raw.
fn watch_signals(mut signals: signal_hook::iterator::Signals, input: &InputSender) {
    for signal in signals.forever() {
        if signal == SIGWINCH {
            if let Ok(size) = termios::tcgetwinsize(std::io::stdin()) {
                let _ = input.resize(size.ws_row, size.ws_col);
            }
            continue;
        }
        restore_terminal();
        // Dies of the signal, as the default action would have.
        let _ = signal_hook::low_level::emulate_default_handler(signal);
        std::process::exit(128 + signal);
    }
}

/// Sends INT, TERM and HUP on to a running command, once each: a second ^C (or a signal
/// before the command runs) ends banger the usual way, leaving the command to the daemon.
fn proxy_signals(
    mut signals: signal_hook::iterator::Signals,
    input: &InputSender,
    running: &AtomicBool,
) {
    let mut sent = Vec::new();
    for signal in signals.forever() {
        let name = match signal {
            SIGINT => Signal::Int,
            SIGTERM => Signal::Term,
            _ => Signal::Hup,
        };
        if !running.load(Ordering::SeqCst) || sent.contains(&signal) || input.signal(name).is_err()
        {
            let _ = signal_hook::low_level::emulate_default_handler(signal);
            std::process::exit(128 + signal);
        }
        sent.push(signal);
    }
}

/// The terminal settings to put back, while raw mode is on.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Our terminal in raw mode (keys go to the guest as typed: ^C, ^D, arrows) until dropped.
struct RawMode;

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).context("read the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        // Now, not after a flush: keys typed ahead of the shell must reach it.
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)
            .context("put the terminal in raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Puts the terminal back as it was before raw mode; does nothing the second time.
fn restore_terminal() {
    if let Some(saved) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // Drain: output already written is shown as raw output, not reprocessed.
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Drain, &saved);
    }
}

/// Writes `output` notifications to our stdout and stderr as they arrive: raw, or with
/// control characters escaped on whichever of the two is a terminal (see
/// [`crate::sanitize`]).
pub struct OutputSink {
    stdout: Option<Sanitizer>,
    stderr: Option<Sanitizer>,
    /// Gets every other notification.
    others: Option<OtherNotes>,
}

impl OutputSink {
    /// Escaping on terminals unless `raw`; a pty session passes `raw = true`: its output
    /// is meant for the terminal, as with ssh.
    pub fn new(raw: bool) -> OutputSink {
        OutputSink {
            stdout: (!raw && std::io::stdout().is_terminal()).then(Sanitizer::default),
            stderr: (!raw && std::io::stderr().is_terminal()).then(Sanitizer::default),
            others: None,
        }
    }

    /// Handles one notification (anything but `output` goes to `others`, if any).
    pub fn forward(&mut self, note: Notification) {
        if note.method != OUTPUT_NOTIFICATION {
            if let Some(others) = &mut self.others {
                others(note);
            }
            return;
        }
        let Ok(output) = serde_json::from_value::<Output>(note.params) else {
            return;
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(output.data) else {
            return;
        };
        let on_stderr = output.stream == OutputStream::Stderr;
        let sanitizer = if on_stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let mut escaped = Vec::new();
        let bytes = match sanitizer {
            Some(s) => {
                s.push(&bytes, &mut escaped);
                &escaped
            }
            None => &bytes,
        };
        // A closed pipe on our side must not abort the remote command's bookkeeping.
        let _ = if on_stderr {
            std::io::stderr().write_all(bytes)
        } else {
            std::io::stdout()
                .write_all(bytes)
                .and_then(|()| std::io::stdout().flush())
        };
    }
}

impl Drop for OutputSink {
    fn drop(&mut self) {
        let mut rest = Vec::new();
        if let Some(s) = &mut self.stdout {
            s.finish(&mut rest);
            let _ = std::io::stdout().write_all(&rest);
            let _ = std::io::stdout().flush();
        }
        rest.clear();
        if let Some(s) = &mut self.stderr {
            s.finish(&mut rest);
            let _ = std::io::stderr().write_all(&rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(interactive: bool, tty: bool, no_stdin: bool) -> StdinArgs {
        StdinArgs {
            interactive,
            tty,
            no_stdin,
        }
    }

    #[test]
    fn a_pipe_is_forwarded_by_default_a_terminal_only_when_asked() {
        let none = args(false, false, false);
        assert_eq!(none.mode(false).unwrap(), Mode::Pipe);
        assert_eq!(none.mode(true).unwrap(), Mode::Null);
        assert_eq!(args(true, false, false).mode(true).unwrap(), Mode::Pipe);
        assert_eq!(args(true, false, false).mode(false).unwrap(), Mode::Pipe);
        assert_eq!(args(false, true, false).mode(true).unwrap(), Mode::Tty);
        assert_eq!(args(true, true, false).mode(true).unwrap(), Mode::Tty);
        assert_eq!(args(false, false, true).mode(false).unwrap(), Mode::Null);
        assert_eq!(args(false, false, true).mode(true).unwrap(), Mode::Null);
        let err = args(false, true, false).mode(false).unwrap_err();
        assert!(err.to_string().contains("-t needs a terminal"), "{err}");
    }

    #[test]
    fn a_shell_gets_a_pty_on_a_terminal_and_reads_a_pipe_otherwise() {
        let none = args(false, false, false);
        assert_eq!(none.shell_mode(true).unwrap(), Mode::Tty);
        assert_eq!(none.shell_mode(false).unwrap(), Mode::Pipe);
        assert!(args(false, true, false).shell_mode(false).is_err());
        assert!(args(false, false, true).shell_mode(true).is_err());
    }
}
