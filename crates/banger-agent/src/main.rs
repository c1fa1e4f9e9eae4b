//! The `banger-agent` binary: wires arguments to the library (see its docs).
//!
//! ```text
//! banger-agent                       find the virtio-serial port "banger.agent" and serve it
//! banger-agent --port /dev/vport0p1  serve this port
//! banger-agent --vsock PORT          serve AF_VSOCK connections on PORT (Firecracker)
//! banger-agent --listen PATH         serve connections on a Unix socket (tests, host use)
//! ```
//!
//! Without arguments, `banger.agent_vsock=PORT` on the kernel command line selects vsock.
//!
//! As PID 1 it first mounts the basic filesystems, sets the hostname and configures the
//! network from the kernel command line, and powers the VM off on Shutdown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use banger_agent::net::{self, NetConfig};
use banger_agent::system::{self, Cmdline};
use banger_agent::transport::{self, Transport, UnixSocket, VirtioPort, VsockListener};
use banger_agent::{Agent, Outcome};

enum Listen {
    FindPort,
    Port(PathBuf),
    Vsock(u32),
    Unix(PathBuf),
}

fn parse_args() -> Result<Listen, String> {
    let mut args = std::env::args_os().skip(1);
    let mut listen = Listen::FindPort;
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--port") => {
                listen = Listen::Port(args.next().ok_or("--port needs a path")?.into())
            }
            Some("--vsock") => {
                let port = args.next().ok_or("--vsock needs a port")?;
                let port = port.to_str().and_then(|p| p.parse().ok()).ok_or_else(|| {
                    format!("--vsock {port:?}: not a port number")
                })?;
                listen = Listen::Vsock(port)
            }
            Some("--listen") => {
                listen = Listen::Unix(args.next().ok_or("--listen needs a path")?.into())
            }
            Some("--refresh-identity") => {
                // Run by the host right after a snapshot restore (see the module).
                match banger_agent::identity::refresh_from_env() {
                    Ok(()) => std::process::exit(0),
                    Err(e) => {
                        eprintln!("banger-agent: refresh identity: {e}");
                        std::process::exit(1);
                    }
                }
            }
            Some("--version") => {
                println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ => {
                return Err(format!(
                    "unknown argument {a:?}; usage: banger-agent [--port DEV | --vsock PORT | --listen SOCKET]"
                ))
            }
        }
    }
    Ok(listen)
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    if pid1 {
        init();
    }
    let result = run(parse_args());
    if pid1 {
        if let Err(e) = result {
            eprintln!("banger-agent: {e}; powering off");
        }
        system::power_off();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// PID 1 duties before serving. Failures are reported, not fatal: a guest without a
/// hostname or network can still run commands.
fn init() {
    for problem in system::mount_basics() {
        eprintln!("banger-agent: {problem}");
    }
    // Before any thread exists: changing the environment is only sound single-threaded.
    std::env::set_var("PATH", system::DEFAULT_PATH);
    std::env::set_var("HOME", "/root");
    let _ = std::env::set_current_dir("/");
    let cmdline = match Cmdline::read() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("banger-agent: read /proc/cmdline: {e}");
            return;
        }
    };
    if let Some(name) = cmdline.get(system::HOSTNAME_PARAM) {
        if let Err(e) = system::set_hostname(name) {
            eprintln!("banger-agent: {e}");
        }
    }
    match NetConfig::from_cmdline(&cmdline) {
        Ok(Some(cfg)) => {
            // In the background: the interface may take a moment to appear, and commands
            // that need no network should not wait for it.
            std::thread::spawn(move || {
                if let Err(e) = net::configure(&cfg, Duration::from_secs(10)) {
                    eprintln!("banger-agent: network: {e}");
                }
            });
        }
        // No network device (`--network none`): loopback still works, as on any host.
        Ok(None) => {
            if let Err(e) = net::loopback_up() {
                eprintln!("banger-agent: network: {e}");
            }
        }
        Err(e) => eprintln!("banger-agent: network: {e}"),
    }
}

/// The vsock port the kernel command line asks the agent to serve, if any.
fn vsock_port() -> Result<Option<u32>, String> {
    match Cmdline::read() {
        Ok(cmdline) => transport::vsock_port_from_cmdline(&cmdline),
        // Not in a VM (no /proc, or a test): the virtio-serial default applies.
        Err(_) => Ok(None),
    }
}

fn run(listen: Result<Listen, String>) -> Result<(), String> {
    let mut transport: Box<dyn Transport> = match listen? {
        Listen::FindPort if vsock_port()?.is_some() => {
            let port = vsock_port()?.unwrap_or(transport::DEFAULT_VSOCK_PORT);
            Box::new(
                VsockListener::bind_waiting(port, Duration::from_secs(30))
                    .map_err(|e| e.to_string())?,
            )
        }
        Listen::Vsock(port) => Box::new(VsockListener::bind(port).map_err(|e| e.to_string())?),
        Listen::FindPort => {
            let dev = transport::find_virtio_port(transport::PORT_NAME, Duration::from_secs(30))
                .map_err(|e| e.to_string())?;
            Box::new(VirtioPort::open(&dev).map_err(|e| e.to_string())?)
        }
        Listen::Port(dev) => Box::new(VirtioPort::open(&dev).map_err(|e| e.to_string())?),
        Listen::Unix(path) => Box::new(UnixSocket::bind(&path).map_err(|e| e.to_string())?),
    };
    let agent = Agent::new().map_err(|e| format!("start: {e}"))?;
    loop {
        let (reader, writer) = transport
            .accept()
            .map_err(|e| format!("accept a connection: {e}"))?;
        match agent.serve(reader, writer) {
            Ok(Outcome::Shutdown) => return Ok(()),
            Ok(Outcome::Disconnected) => {}
            // A broken frame: drop the connection, keep serving.
            Err(e) => eprintln!("banger-agent: {e}"),
        }
    }
}
