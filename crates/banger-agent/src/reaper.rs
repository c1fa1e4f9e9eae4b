//! One thread that waits for every child of the agent.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them, and a
//! `waitpid(-1)` loop would also steal the exit statuses of the commands it runs itself.
//! So all waiting happens here: a command's session registers its pid and receives its
//! status over a channel; everything else is reaped and forgotten.
//!
//! The race between "the child exits" and "its session registers it" is closed with a
//! lock and `WNOWAIT`: a session holds the lock from before `spawn` until its pid is
//! registered, and the reaper only *peeks* at an exited child (`WNOWAIT`) before taking
//! the lock, and reaps it after. (Reaping without the lock could also steal the status
//! `std::process::Command::spawn` itself waits for when `exec` fails.)

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::proto::ExitStatus;

#[derive(Default)]
struct State {
    waiting: HashMap<i32, Sender<ExitStatus>>,
    /// Bumped whenever a child is spawned, so a reaper that found no children does not
    /// sleep through a spawn that happened meanwhile.
    spawned: u64,
}

/// The handle sessions use to register children; see the module docs.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<(Mutex<State>, Condvar)>,
}

/// Held while spawning a child; registers it so its exit status is delivered.
pub struct SpawnGuard<'a> {
    state: MutexGuard<'a, State>,
    cv: &'a Condvar,
}

impl SpawnGuard<'_> {
    /// Registers `pid`; its exit status arrives on the returned channel.
    pub fn register(mut self, pid: u32) -> Receiver<ExitStatus> {
        let (tx, rx) = mpsc::channel();
        self.state.waiting.insert(pid as i32, tx);
        self.state.spawned += 1;
        self.cv.notify_all();
        rx
    }
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Reaper> {
        let reaper = Reaper {
            inner: Arc::new((Mutex::new(State::default()), Condvar::new())),
        };
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    /// Locks out reaping until the returned guard registers the spawned child (or is
    /// dropped because the spawn failed).
    pub fn lock(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            state: self.inner.0.lock().unwrap_or_else(|e| e.into_inner()),
            cv: &self.inner.1,
        }
    }

    fn run(&self) {
        let (lock, cv) = &*self.inner;
        loop {
            let seen = lock.lock().unwrap_or_else(|e| e.into_inner()).spawned;
            match peek_exited() {
                Ok(pid) => {
                    let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                    // `None` when someone else (a failed spawn) already reaped it.
                    if let Some(status) = reap(pid) {
                        if let Some(tx) = state.waiting.remove(&pid) {
                            let _ = tx.send(status);
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    let state = lock.lock().unwrap_or_else(|e| e.into_inner());
                    if state.spawned == seen {
                        // The timeout only guards against a child we did not spawn
                        // through a guard (there should be none).
                        let _ = cv.wait_timeout(state, Duration::from_secs(1));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("banger-agent: waitid: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Blocks until some child has exited and returns its pid, leaving it a zombie.
fn peek_exited() -> io::Result<i32> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid with WEXITED filled in a SIGCHLD siginfo, whose si_pid is set.
    Ok(unsafe { info.si_pid() })
}

/// Reaps `pid`, which has exited.
fn reap(pid: i32) -> Option<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out pointer; pid names one of our children.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            break;
        }
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
    Some(if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    })
}
