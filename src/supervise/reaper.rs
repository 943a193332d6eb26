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

/// How long the final sweep keeps killing and reaping what the supervisor left behind before
/// exiting anyway (a process stuck in uninterruptible sleep cannot be waited for forever).
const SWEEP_LIMIT: Duration = Duration::from_secs(1);

/// Runs the reaper: never returns. `supervisor_args` are the arguments the supervisor is
/// re-executed with (this binary, `supervise ...`).
pub fn run(supervisor_args: Vec<OsString>) -> ! {
    // Block first, before anything can start a thread: a signal that arrives from here on is
    // held pending and handled by the loop below, never by a default disposition (which for
    // PID 1 would mean "discarded", for anyone else "killed"). All 64, real-time ones included.
    if let Err(e) = sys::block_all_signals() {
        fatal(&format!("cannot block signals: {e}"));
    }
    // Then forget whatever the launcher left ignored: an inherited SIG_IGN on SIGCHLD makes the
    // kernel reap our children itself, so the supervisor's exit status would never be seen.
    // Only SIGPIPE stays ignored (it is the one signal not blocked above).
    if let Err(e) = sys::reset_signal_dispositions(&[Signal::SIGPIPE as i32]) {
        fatal(&format!("cannot reset signal dispositions: {e}"));
    }
    // Nothing of ours is open yet, so everything above stdio came from the launcher.
    match sys::close_inherited_descriptors() {
        Ok(closed) => {
            for (fd, target) in closed {
                tracing::info!(fd, target, "closed a descriptor inherited from the launcher");
            }
        }
        Err(e) => fatal(&format!("cannot close inherited descriptors: {e}")),
    }
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
    // The environment holds the secrets: out of /proc/1/environ, handed to the supervisor
    // explicitly (which scrubs its own copy the same way), and no core dump of this memory.
    // The reaper never starts a thread, so this cannot fail but without /proc.
    let (env, scrubbed) =
        sys::take_environment().unwrap_or_else(|e| fatal(&format!("cannot take the environment out: {e}")));
    if let Err(e) = scrubbed {
        tracing::warn!(
            "cannot overwrite the environment block: {e}; /proc/{}/environ still shows it",
            std::process::id()
        );
    }
    if let Err(e) = sys::set_non_dumpable() {
        fatal(&format!("cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}"));
    }

    // The count of reaped processes the supervisor reports (metrics): created after the
    // inherited descriptors are closed, inherited by the supervisor alone.
    let reaped = sys::ReapedCount::create()
        .inspect_err(|e| tracing::warn!("cannot share the count of reaped processes (memfd_create): {e}"))
        .ok();

    let exe = sys::cordon_exe();
    // The supervisor inherits the blocked mask on purpose: it unblocks once its handlers are
    // installed, so a signal sent during its start-up is delivered late rather than lost.
    #[allow(clippy::zombie_processes, reason = "reaped by reap_exited below, the one waitpid(-1)")]
    let mut command = Command::new(&exe);
    command.args(&supervisor_args).env_clear().envs(env).env(REAPER_ENV, getpid().to_string());
    if let Some(reaped) = &reaped {
        command.env(sys::REAPED_FD_ENV, reaped.fd().to_string());
    }
    let spawned = command.spawn();
    let supervisor = match spawned {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => fatal(&format!("cannot start the supervisor ({}): {e}", exe.display())),
    };
    tracing::debug!(mode, supervisor = supervisor.as_raw(), "reaper started");

    let stop_rtmin3 = sys::stop_signal_rtmin3();
    let code = loop {
        let sig = match sys::wait_signal() {
            Ok(sig) => sig,
            Err(e) => {
                tracing::warn!("waiting for signals failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if sig == Signal::SIGCHLD as i32 {
            let exited = sys::reap_exited();
            if let Some(reaped) = &reaped {
                reaped.add(exited.iter().filter(|(pid, _)| *pid != supervisor).count());
            }
            if let Some(&(_, code)) = exited.iter().find(|(pid, _)| *pid == supervisor) {
                break code;
            }
        } else if sig == stop_rtmin3 {
            // systemd's stop signal (`STOPSIGNAL SIGRTMIN+3` in an image): a stop request,
            // which the supervisor knows as SIGTERM.
            tracing::info!("SIGRTMIN+3: stop requested");
            if kill(supervisor, Signal::SIGTERM).is_err() {
                tracing::debug!("supervisor gone; stop request not forwarded");
            }
        } else if let Some(forwarded) = sys::FORWARDED.iter().find(|s| **s as i32 == sig) {
            if kill(supervisor, *forwarded).is_err() {
                tracing::debug!(signal = %forwarded, "supervisor gone; signal not forwarded");
            }
        } else {
            // Anything else (SIGALRM, the job-control stops, a `kill -SEGV` from outside, the
            // real-time signals) is not for the supervisor: its default action would kill it.
            tracing::debug!(signal = sys::signal_name(sig), "signal ignored");
        }
    };
    sweep(mode == "pid 1");
    std::process::exit(code);
}

/// After the supervisor is gone: kill whatever is left of our subtree and reap it, so that as a
/// subreaper we hand nothing over to the platform's init (as PID 1 the kernel would do it).
/// Killed again on every round, not once from one snapshot: a process that keeps forking
/// would leave a child the snapshot did not know.
fn sweep(pid1: bool) {
    let me = getpid().as_raw();
    let left = sys::live_descendants(me, &sys::processes());
    if left.is_empty() {
        sys::reap_exited();
        return;
    }
    tracing::warn!(count = left.len(), "killing processes left behind by the supervisor");
    let deadline = Instant::now() + SWEEP_LIMIT;
    while Instant::now() < deadline {
        if pid1 {
            sys::kill_namespace();
        }
        sys::kill_descendants(me, me);
        std::thread::sleep(Duration::from_millis(10));
        sys::reap_exited();
        if sys::live_descendants(me, &sys::processes()).is_empty() && sys::reap_exited().is_empty() {
            return;
        }
    }
}

/// Ends the reaper on a start-up failure. The message goes to the log and, should the log be
/// filtered, to stderr; a failed write to stderr is not a reason to panic instead.
fn fatal(message: &str) -> ! {
    use std::io::Write;
    tracing::error!("{message}");
    let _ = writeln!(std::io::stderr(), "cordon: {message}");
    std::process::exit(1)
}
