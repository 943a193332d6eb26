//! The init half of cordon: a tiny synchronous process that is PID 1 (or a child subreaper
//! where the platform owns PID 1) and does three things only: reap every zombie, forward
//! signals to the supervisor, and exit with the supervisor's status.
//!
//! Why a separate process: a `waitpid(-1)` in the same process as tokio and std's child
//! handling steals exit statuses from them (measured: 11-65 lost statuses in 200 spawns,
//! `notes/crates.md` §9). Split in two, the supervisor's `Child::wait` and every library that
//! runs a command keep their statuses, and the reaper still collects every orphan.

use std::ffi::OsString;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpid};

use crate::boot::REAPER_ENV;
use crate::sys;

/// How long the final sweep waits for SIGKILLed stragglers to be reaped before exiting anyway
/// (a process stuck in uninterruptible sleep cannot be waited for forever).
const SWEEP_LIMIT: Duration = Duration::from_secs(5);

/// Runs the reaper: never returns. `supervisor_args` are the arguments the supervisor is
/// re-executed with (this binary, `supervise ...`).
pub fn run(supervisor_args: Vec<OsString>) -> ! {
    // Block first, before anything can start a thread: a signal that arrives from here on is
    // held pending and handled by the loop below, never by a default disposition (which for
    // PID 1 would mean "discarded", for anyone else "killed").
    let wait_set = match sys::block_signals() {
        Ok(set) => set,
        Err(e) => fatal(&format!("cannot block signals: {e}")),
    };
    let mode = if getpid() == Pid::from_raw(1) {
        "pid 1"
    } else {
        // Orphans of our subtree must come back to us, not to the platform's init.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            fatal(&format!("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER): {e}"));
        }
        "subreaper"
    };
    // PID 1 holds no directory busy; children get their own cwd from their spawner.
    if let Err(e) = std::env::set_current_dir("/") {
        fatal(&format!("cannot change directory to /: {e}"));
    }
    if let Err(e) = sys::cloexec_from_3() {
        fatal(&format!("cannot mark inherited descriptors close-on-exec: {e}"));
    }

    let exe = sys::cordon_exe();
    // The supervisor inherits the blocked mask on purpose: it unblocks once its handlers are
    // installed, so a signal sent during its start-up is delivered late rather than lost.
    #[allow(clippy::zombie_processes, reason = "reaped by reap_exited below, the one waitpid(-1)")]
    let supervisor = match Command::new(&exe).args(&supervisor_args).env(REAPER_ENV, getpid().to_string()).spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => fatal(&format!("cannot start the supervisor ({}): {e}", exe.display())),
    };
    tracing::debug!(mode, supervisor = supervisor.as_raw(), "reaper started");

    let code = loop {
        match wait_set.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(&(_, code)) = sys::reap_exited().iter().find(|(pid, _)| *pid == supervisor) {
                    break code;
                }
            }
            Ok(sig) if sys::FORWARDED.contains(&sig) => {
                if kill(supervisor, sig).is_err() {
                    tracing::debug!(signal = %sig, "supervisor gone; signal not forwarded");
                }
            }
            // Anything else (SIGALRM, SIGPIPE, ...) is not for the supervisor: its default
            // action would kill it.
            Ok(sig) => tracing::debug!(signal = %sig, "signal ignored"),
            Err(e) => tracing::warn!("sigwait failed: {e}"),
        }
    };
    sweep();
    std::process::exit(code);
}

/// After the supervisor is gone: kill whatever is left of our subtree and reap it, so that as a
/// subreaper we hand nothing over to the platform's init (as PID 1 the kernel would do it).
fn sweep() {
    let me = getpid().as_raw();
    let left = sys::live_descendants(me, &sys::processes());
    if !left.is_empty() {
        tracing::warn!(count = left.len(), "killing processes left behind by the supervisor");
        sys::signal_all(&left, Signal::SIGKILL);
    }
    let deadline = Instant::now() + SWEEP_LIMIT;
    while Instant::now() < deadline {
        sys::reap_exited();
        if sys::live_descendants(me, &sys::processes()).is_empty() && sys::reap_exited().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fatal(message: &str) -> ! {
    tracing::error!("{message}");
    eprintln!("cordon: {message}");
    std::process::exit(1)
}
