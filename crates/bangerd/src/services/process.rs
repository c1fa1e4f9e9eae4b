//! Knowing a VMM again after the daemon restarted, without trusting a bare pid.
//!
//! A pid is reused as soon as its process is reaped: after a `kill -9` of the daemon and the
//! VMM, the pid in a VM's record may belong to anything (under a root daemon after a
//! reboot, to any root process). So a VMM is recorded as its pid plus the boot it runs in
//! plus its start time (field 22 of `/proc/PID/stat`, clock ticks since boot), and is
//! signalled only through a pidfd whose process was checked to still have that identity
//! after the pidfd was opened: nothing else is ever signalled.

use std::os::fd::OwnedFd;

use rustix::process::{Pid, PidfdFlags, Signal};

/// A process as recorded: pid, boot and start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// The pid.
    pub pid: u32,
    /// `<boot id>:<start time in clock ticks>`, as stored in `vms.pid_identity`.
    pub start: String,
}

/// The kernel's random id of this boot: start times only compare within one boot.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Field 22 (starttime) of `/proc/<pid>/stat`, and whether the process is a lone zombie
/// (exited, not reaped: gone for every purpose here).
fn stat_start(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` may hold spaces and parentheses: fields are counted after the last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is at index 19.
    let start = fields.get(19)?.parse().ok()?;
    let zombie = matches!(fields.first(), Some(&("Z" | "X")))
        && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) <= 1;
    Some((start, zombie))
}

impl ProcessIdentity {
    /// The identity of the live process `pid` now, if there is one.
    pub fn of(pid: u32) -> Option<ProcessIdentity> {
        let (start, zombie) = stat_start(pid)?;
        if zombie {
            return None;
        }
        Some(ProcessIdentity {
            pid,
            start: format!("{}:{start}", boot_id()?),
        })
    }

    /// The identity recorded as `start` for `pid`.
    pub fn recorded(pid: u32, start: &str) -> ProcessIdentity {
        ProcessIdentity {
            pid,
            start: start.to_owned(),
        }
    }

    /// Whether this very process still runs (not merely something with its pid).
    pub fn is_alive(&self) -> bool {
        ProcessIdentity::of(self.pid).is_some_and(|now| now == *self)
    }

    /// A pidfd of this process, if it is still this process once the pidfd is open: the
    /// pidfd then cannot come to refer to anything else, whatever happens to the pid.
    fn pidfd(&self) -> Option<OwnedFd> {
        let pid = Pid::from_raw(i32::try_from(self.pid).ok()?)?;
        let fd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()?;
        self.is_alive().then_some(fd)
    }

    /// Sends SIGKILL to this process if, and only if, it is still this process. Returns
    /// whether a signal was sent.
    pub fn kill(&self) -> bool {
        match self.pidfd() {
            Some(fd) => rustix::process::pidfd_send_signal(&fd, Signal::Kill).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_is_not_the_recorded_process_and_is_never_signalled() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let me = ProcessIdentity::of(child.id()).unwrap();
        assert!(me.is_alive());
        // The same pid with another start time: what a reused pid looks like.
        let (boot, ticks) = me.start.rsplit_once(':').unwrap();
        let stale = ProcessIdentity::recorded(
            me.pid,
            &format!("{boot}:{}", ticks.parse::<u64>().unwrap() - 1),
        );
        assert!(!stale.is_alive());
        assert!(!stale.kill());
        assert!(child.try_wait().unwrap().is_none(), "left alone");
        assert!(me.kill());
        child.wait().unwrap();
        assert!(!me.is_alive());
    }
}
