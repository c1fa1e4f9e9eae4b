//! `banger daemon …` and `banger version`: whether bangerd runs, and stopping it. Neither
//! starts a daemon: they only connect to one that runs.

use std::process::ExitCode;

use anyhow::Context as _;

use banger_api::{DaemonPing, DaemonShutdown, NoParams};
use banger_client::rpc;
use banger_client::{transport, Endpoint, Layout};
use clap::Subcommand;

use crate::output::emit;

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show whether bangerd runs, its version and pid.
    Status,
    /// Stop bangerd, letting running calls finish.
    Stop,
    /// Join stdin and stdout to the daemon's socket, byte for byte, until either side
    /// closes; starts the daemon first like any command. What `--host ssh://` runs on
    /// the far side.
    DialStdio {
        /// Only reach a daemon that runs; fail otherwise.
        #[arg(long)]
        no_start: bool,
    },
}

/// The running daemon's answer to `daemon.ping`, if one runs.
fn ping(endpoint: &Endpoint) -> Option<banger_api::PingResult> {
    transport::connect(endpoint, false)
        .ok()
        .and_then(|mut c| c.call::<DaemonPing>(&NoParams {}).ok())
}

/// Prints `daemon status` (`{"running", <where>, "daemon"}` with `--json`) for the
/// daemon that answered the ping, if one did, at `place`; exits 1 when none did, so
/// scripts can test for a running daemon. Local and remote differ only in where it is.
fn report_status(
    ping: Option<banger_api::PingResult>,
    (where_key, where_value): (&str, serde_json::Value),
    place: &str,
    not_running: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut status = serde_json::json!({ "running": ping.is_some() });
    status[where_key] = where_value;
    status["daemon"] = serde_json::json!(ping);
    emit(json, &status, |_| match &ping {
        Some(p) => println!(
            "bangerd {} running (pid {}, up {}s) on {place}",
            p.version, p.pid, p.uptime_seconds
        ),
        None => println!("{not_running}"),
    })?;
    Ok(if ping.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs one `banger daemon` command. Status and stop work on any endpoint; they differ
/// only in how the daemon's place is named and in whether its pid can be watched.
pub fn run(endpoint: &Endpoint, command: DaemonCommand, json: bool) -> anyhow::Result<ExitCode> {
    // A local daemon is named by its socket; another host's by that host.
    let (where_key, place, not_running) = match endpoint {
        Endpoint::Local(layout) => {
            let place = layout.socket().display().to_string();
            let not_running = format!("bangerd not running ({place})");
            ("socket", place, not_running)
        }
        remote => {
            let place = remote.describe();
            let not_running = format!("bangerd not running on {place}");
            ("host", place, not_running)
        }
    };
    let where_value = match endpoint {
        Endpoint::Local(layout) => serde_json::json!(layout.socket()),
        _ => serde_json::json!(place),
    };
    match command {
        DaemonCommand::DialStdio { no_start } => {
            let Endpoint::Local(layout) = endpoint else {
                anyhow::bail!(
                    "daemon dial-stdio joins this host's own daemon; it takes no --host or context"
                );
            };
            dial_stdio(layout, !no_start)
        }
        DaemonCommand::Status => report_status(
            ping(endpoint),
            (where_key, where_value),
            &place,
            &not_running,
            json,
        ),
        DaemonCommand::Stop => {
            let stopped = stop(endpoint)?;
            let mut result = serde_json::json!({ "stopped": stopped.is_some(), "pid": stopped });
            let own_layout = matches!(endpoint, Endpoint::Local(_));
            if !own_layout {
                result[where_key] = where_value;
            }
            // Only a daemon on this host was watched until it was gone.
            let on_this_host = endpoint.is_local();
            emit(json, &result, |_| match stopped {
                Some(pid) if own_layout => println!("bangerd stopped (pid {pid})"),
                Some(pid) if on_this_host => println!("bangerd on {place} stopped (pid {pid})"),
                Some(pid) => println!("bangerd on {place} asked to stop (pid {pid})"),
                None if own_layout => println!("bangerd was not running"),
                None => println!("bangerd was not running on {place}"),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Stops the daemon at `endpoint` if one answers, returning its pid. The pid of a daemon
/// on this host is watched until the process is gone; another host's means nothing here,
/// so that one is only asked.
fn stop(endpoint: &Endpoint) -> anyhow::Result<Option<u32>> {
    let Ok(mut client) = transport::connect(endpoint, false) else {
        return Ok(None);
    };
    let Ok(ping) = client.call::<DaemonPing>(&NoParams {}) else {
        return Ok(None);
    };
    if endpoint.is_local() {
        rpc::stop_daemon(&mut client, ping.pid)?;
    } else {
        client
            .call::<DaemonShutdown>(&NoParams {})
            .map_err(anyhow::Error::from)?;
    }
    Ok(Some(ping.pid))
}

/// Copies stdin to the daemon's socket and the socket to stdout, unbuffered, until the
/// socket closes (the daemon's end; then we exit) or stdin does (our caller's end; then
/// the socket's write half is shut, the daemon finishes and closes, and we exit).
fn dial_stdio(layout: &Layout, start: bool) -> anyhow::Result<ExitCode> {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    let socket = layout.socket();
    if start {
        // Starts (or replaces) the daemon as any command would; its connection is let go.
        drop(rpc::connect_or_start(layout)?);
    }
    let stream =
        UnixStream::connect(&socket).with_context(|| format!("connect to {}", socket.display()))?;
    let mut to_daemon = stream.try_clone().context("clone the socket")?;
    let mut from_daemon = stream;
    // Raw descriptors, not Rust's line-buffered stdout: bytes leave as they come.
    let mut stdin = std::fs::File::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("dup stdin")?,
    );
    let mut stdout = std::fs::File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("dup stdout")?,
    );
    std::thread::Builder::new()
        .name("dial-stdin".into())
        .spawn(move || {
            let _ = pump(&mut stdin, &mut to_daemon);
            let _ = to_daemon.shutdown(std::net::Shutdown::Write);
        })
        .context("start the stdin copier")?;
    // Our caller hanging up shows here as a write error: the end either way.
    let _ = pump(&mut from_daemon, &mut stdout);
    Ok(ExitCode::SUCCESS)
}

/// Copies until end-of-file with plain read/write: `std::io::copy` may splice between a
/// socket and a pipe, and a splice from a Unix socket was seen to hold a reply back
/// (waiting for more bytes) while the other side waited for it.
fn pump(from: &mut impl std::io::Read, to: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

/// `banger version`: this CLI's version, and the daemon's when one runs.
pub fn version(endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    let daemon = ping(endpoint);
    let versions = serde_json::json!({
        "version": banger_api::VERSION,
        "daemon": daemon,
    });
    emit(json, &versions, |_| {
        println!("banger {}", banger_api::VERSION);
        match &daemon {
            Some(ping) => println!("bangerd {} (pid {})", ping.version, ping.pid),
            None => println!("bangerd not running"),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
