//! Where the daemon is and what carries the connection to it: the local socket of a
//! [`Layout`], another socket (`unix:///path`), or a remote host over the system's `ssh`
//! (`ssh://[user@]host[:port]`), the way `DOCKER_HOST=ssh://` works. Over ssh the far side
//! runs `banger daemon dial-stdio`, which joins its stdio to the daemon's socket there
//! (starting that daemon as any banger command would), so the JSON-RPC lines — requests,
//! notifications, uploads, a pty session's keys — travel byte for byte. Using `ssh`
//! itself, not a library, keeps the user's ssh config, agent, known hosts and jump hosts.

use std::fmt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use banger_api::{DaemonPing, NoParams};

use crate::layout::Layout;
use crate::rpc::{self, CallError, Client};

/// The environment variable naming the daemon to talk to, as `--host` does.
pub const HOST_ENV: &str = "BANGER_HOST";
/// The environment variable naming the context to use, as `--context` does.
pub const CONTEXT_ENV: &str = "BANGER_CONTEXT";
/// The ssh program and its leading arguments, split on whitespace (default `ssh`); e.g.
/// `ssh -F /path/config`. Like git's `GIT_SSH_COMMAND`.
pub const SSH_ENV: &str = "BANGER_SSH";
/// The banger the far side runs when a context or `--remote-banger` names none: found
/// on the remote PATH.
pub const DEFAULT_REMOTE_BANGER: &str = "banger";

/// A remote host reached over ssh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    /// The login, when given (else ssh's default: config, then the local user).
    pub user: Option<String>,
    /// Host name or address (as ssh takes it; may be an alias from ssh config).
    pub host: String,
    /// The port, when given (else ssh's default).
    pub port: Option<u16>,
}

impl fmt::Display for SshHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ssh://")?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            write!(f, "{}", self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The socket of a local installation.
    Local(Layout),
    /// A socket at this path (`unix:///path`).
    Socket(PathBuf),
    /// A daemon on another host.
    Ssh {
        /// The host.
        host: SshHost,
        /// The banger program the far side runs.
        remote_banger: String,
        /// Talk to the far side's system daemon.
        system: bool,
    },
}

impl Endpoint {
    /// Whether the daemon shares this machine's filesystem (a host path given to it
    /// means the same file).
    pub fn is_local(&self) -> bool {
        !matches!(self, Endpoint::Ssh { .. })
    }

    /// How the endpoint is named in messages.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Local(layout) => layout.socket().display().to_string(),
            Endpoint::Socket(path) => format!("unix://{}", path.display()),
            Endpoint::Ssh { host, .. } => host.to_string(),
        }
    }
}

/// Parses a `--host` value: `ssh://[user@]host[:port]` (IPv6 in brackets) or
/// `unix:///absolute/socket`.
pub fn parse_host(value: &str) -> anyhow::Result<HostSpec> {
    if let Some(path) = value.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            bail!("host {value:?}: a unix:// socket path must be absolute (unix:///run/x.sock)");
        }
        return Ok(HostSpec::Socket(path));
    }
    let Some(rest) = value.strip_prefix("ssh://") else {
        bail!("host {value:?}: expected ssh://[user@]host[:port] or unix:///path");
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        bail!("host {value:?}: only ssh://[user@]host[:port], no path or query");
    }
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((user, hostport)) => (Some(user.to_owned()), hostport),
        None => (None, rest),
    };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            bail!("host {value:?}: unclosed [ in an IPv6 address");
        };
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| anyhow::anyhow!("host {value:?}: expected :PORT after ]"))?,
            ),
        };
        (host.to_owned(), port)
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (hostport.to_owned(), None),
        }
    };
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| anyhow::anyhow!("host {value:?}: port {p:?} is not 1-65535"))
        })
        .transpose()?;
    // Nothing ssh would read as an option: a host or user starting with '-' is refused.
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:%".contains(c))
    };
    if !plain(&host) {
        bail!("host {value:?}: {host:?} is not a host name or address");
    }
    if let Some(user) = &user {
        if !plain(user) || user.contains(':') {
            bail!("host {value:?}: {user:?} is not a user name");
        }
    }
    Ok(HostSpec::Ssh(SshHost { user, host, port }))
}

/// A parsed `--host` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSpec {
    /// `unix:///path`.
    Socket(PathBuf),
    /// `ssh://…`.
    Ssh(SshHost),
}

/// Quotes `word` for the remote shell ssh hands its command to.
fn sh_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The `ssh` command line that runs `dial-stdio` on `host`.
pub fn ssh_command(host: &SshHost, remote_banger: &str, system: bool, start: bool) -> Command {
    let ssh = std::env::var(SSH_ENV).unwrap_or_default();
    let mut words = ssh.split_whitespace();
    let mut command = Command::new(words.next().unwrap_or("ssh"));
    command.args(words);
    // No pty on the far side: the connection is a byte stream, not a terminal.
    command.arg("-T");
    if let Some(port) = host.port {
        command.arg("-p").arg(port.to_string());
    }
    match &host.user {
        Some(user) => command.arg(format!("{user}@{}", host.host)),
        None => command.arg(&host.host),
    };
    command.arg("--");
    let mut remote = vec![sh_quote(remote_banger)];
    if system {
        remote.push("--system".into());
    }
    remote.extend(["daemon".into(), "dial-stdio".into()]);
    if !start {
        remote.push("--no-start".into());
    }
    command.arg(remote.join(" "));
    command
}

/// Connects to `endpoint`. With `start`, a daemon that does not run is started (on the
/// far side for ssh); without, only a running one is reached.
pub fn connect(endpoint: &Endpoint, start: bool) -> anyhow::Result<Client> {
    match endpoint {
        Endpoint::Local(layout) if start => rpc::connect_or_start(layout),
        Endpoint::Local(layout) => Client::connect(&layout.socket())
            .with_context(|| format!("connect to {}", layout.socket().display())),
        Endpoint::Socket(path) => {
            Client::connect(path).with_context(|| format!("connect to {}", path.display()))
        }
        Endpoint::Ssh {
            host,
            remote_banger,
            system,
        } => {
            let mut command = ssh_command(host, remote_banger, *system, start);
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                // ssh's own messages (host keys, passwords, errors) reach the user.
                .stderr(Stdio::inherit());
            let program = command.get_program().to_owned();
            let mut child = command.spawn().with_context(|| {
                format!(
                    "run {} to reach {host} (is OpenSSH's client installed? {SSH_ENV} names another)",
                    program.to_string_lossy()
                )
            })?;
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let mut client = Client::over(
                Box::new(stdout),
                Box::new(stdin),
                host.to_string(),
                Some(child),
            );
            match client.call::<DaemonPing>(&NoParams {}) {
                Ok(_) => Ok(client),
                Err(CallError::Rpc(e)) => bail!("daemon.ping on {host}: {e}"),
                Err(CallError::Transport(e)) => Err(e.context(format!(
                    "reach bangerd on {host} through `{}` (ssh's messages are above; is banger \
                     installed there? --remote-banger names its path)",
                    display_command(&ssh_command(host, remote_banger, *system, start))
                ))),
            }
        }
    }
}

fn display_command(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|w| sh_quote(&w.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(user: Option<&str>, host: &str, port: Option<u16>) -> HostSpec {
        HostSpec::Ssh(SshHost {
            user: user.map(String::from),
            host: host.into(),
            port,
        })
    }

    #[test]
    fn host_urls_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_host("ssh://box").unwrap(), ssh(None, "box", None));
        assert_eq!(
            parse_host("ssh://me@box.example:2222").unwrap(),
            ssh(Some("me"), "box.example", Some(2222))
        );
        assert_eq!(
            parse_host("ssh://root@[::1]:22/").unwrap(),
            ssh(Some("root"), "::1", Some(22))
        );
        assert_eq!(
            parse_host("unix:///run/banger/bangerd.sock").unwrap(),
            HostSpec::Socket("/run/banger/bangerd.sock".into())
        );
        for bad in [
            "box",
            "tcp://box:1",
            "ssh://",
            "ssh://box:0",
            "ssh://box:99999",
            "ssh://-oProxyCommand=x",
            "ssh://-l@box",
            "ssh://box/path",
            "ssh://[::1",
            "unix://relative.sock",
        ] {
            assert!(parse_host(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_ssh_command_runs_dial_stdio_with_a_quoted_remote_path() {
        let host = SshHost {
            user: Some("me".into()),
            host: "box".into(),
            port: Some(2222),
        };
        let command = ssh_command(&host, "/opt/my banger/banger", true, false);
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let n = args.len();
        assert_eq!(
            &args[n - 5..],
            [
                "-p",
                "2222",
                "me@box",
                "--",
                "'/opt/my banger/banger' --system daemon dial-stdio --no-start"
            ]
        );
        assert_eq!(host.to_string(), "ssh://me@box:2222");
    }
}
