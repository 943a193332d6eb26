//! `cordon attach`: what an operator's login shell runs. Session ready: attach at once. Still
//! booting: show the boot log live while waiting on the boot lock, then attach. Boot failed:
//! say which stage, its error and the fix, and exit non-zero so the login shell stays usable.
//! Not running here at all: say so, and exit [`NOT_RUNNING`].
//! The tmux client always runs as the agent user: a root client on the agent's server would let
//! the agent run commands as root (`detach-client -E`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::session::tmux;
use crate::state::report::{self, Phase};

pub struct Options {
    pub no_wait: bool,
    pub timeout: Duration,
}

/// Exit status when cordon is not running here at all (as `cordon status` uses 2 for "cannot
/// be reached"); 1 is a boot that failed or a session that is not there.
pub const NOT_RUNNING: u8 = 2;

/// How long an attach waits for any sign of cordon (its state file or boot lock) before it
/// concludes cordon is not running here. The supervisor writes both within milliseconds of
/// starting, and a login into a container cannot come before its entrypoint starts.
const NOT_STARTED_GRACE: Duration = Duration::from_secs(5);

/// Runs attach; returns only when it does not attach (the exit status to use).
pub fn run(config: &Config, opts: &Options, out: &mut dyn Write) -> u8 {
    let dir = &config.supervisor.state_dir;
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut log_pos = 0u64;
    let mut announced = false;
    loop {
        let state = report::read_state(dir).ok();
        if state.is_none() && !dir.join(report::BOOT_LOCK).exists() {
            if opts.no_wait || started.elapsed() >= NOT_STARTED_GRACE.min(opts.timeout) {
                let _ = writeln!(
                    out,
                    "cordon is not running here: no state file and no boot lock in {}.\n\
                     Is this the container cordon runs in, and is supervisor.state_dir the same? \
                     (`cordon status` tells the same)",
                    dir.display()
                );
                return NOT_RUNNING;
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let booting = state.as_ref().is_none_or(|s| s.phase == Phase::Booting);
        // The lock answers "is the boot over" without a race; the state file says how it ended.
        let lock_free = boot_over(dir);
        if !booting || lock_free {
            let state = report::read_state(dir).ok();
            return match state.as_ref().map(|s| &s.phase) {
                Some(Phase::Ready | Phase::Degraded) => attach(config, out),
                Some(Phase::Failed) => {
                    let s = state.expect("checked");
                    let failed = s.stages.iter().find(|st| st.outcome == report::Outcome::Failed);
                    let _ =
                        writeln!(out, "cordon: the boot failed at stage {}:", failed.map_or("?", |f| f.name.as_str()));
                    let _ = writeln!(
                        out,
                        "  {}",
                        failed.and_then(|f| f.error.as_deref()).unwrap_or(s.reason.as_deref().unwrap_or(""))
                    );
                    if let Some(hint) = failed.and_then(|f| f.hint.as_deref()) {
                        let _ = writeln!(out, "  fix: {hint}");
                    }
                    let _ = writeln!(
                        out,
                        "  the agent was not started. Full log: {}; status: cordon status",
                        dir.join(report::BOOT_LOG).display()
                    );
                    1
                }
                Some(Phase::Booting) => {
                    // The lock is free but the boot never ended: whoever held it is gone.
                    let stage = state.as_ref().and_then(|s| s.stages.last()).map_or("?", |st| st.name.as_str());
                    let _ = writeln!(
                        out,
                        "cordon is not running here: its boot stopped during stage {stage} without finishing \
                         (the boot lock in {} is free)",
                        dir.display()
                    );
                    NOT_RUNNING
                }
                Some(Phase::Stopped) => {
                    let _ = writeln!(
                        out,
                        "cordon has stopped; there is no session to attach to (cordon status tells more)"
                    );
                    NOT_RUNNING
                }
                Some(p) => {
                    let _ =
                        writeln!(out, "cordon is {p:?}; there is no session to attach to (cordon status tells more)");
                    1
                }
                None => {
                    let _ = writeln!(out, "cordon has released its boot lock but wrote no state in {}", dir.display());
                    NOT_RUNNING
                }
            };
        }
        if opts.no_wait {
            let stage = state
                .as_ref()
                .and_then(|s| s.stages.last())
                .map(|s| s.name.clone())
                .unwrap_or_else(|| "starting".into());
            let _ = writeln!(
                out,
                "cordon is still booting (stage {stage}); run `cordon attach` without --no-wait to wait for it"
            );
            return 1;
        }
        if !announced {
            let _ = writeln!(
                out,
                "cordon is booting; waiting for the agent session (up to {})...",
                humantime::format_duration(opts.timeout)
            );
            announced = true;
        }
        log_pos = print_new_log(&dir.join(report::BOOT_LOG), log_pos, out);
        if Instant::now() >= deadline {
            let _ = writeln!(
                out,
                "cordon: still booting after {}; see `cordon status`",
                humantime::format_duration(opts.timeout)
            );
            return 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// True when the boot lock exists and can be taken shared: cordon has released it. Without
/// permission to open it (the agent user), the state file decides.
fn boot_over(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir.join(report::BOOT_LOCK)) else { return false };
    file.try_lock_shared().is_ok()
}

fn print_new_log(path: &Path, pos: u64, out: &mut dyn Write) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else { return pos };
    if f.seek(SeekFrom::Start(pos)).is_err() {
        return pos;
    }
    let mut text = String::new();
    let n = f.read_to_string(&mut text).unwrap_or(0);
    // cordon writes the log printable already; this second layer keeps an escape sequence out
    // of the operator's terminal whatever else wrote the file.
    let _ = out.write_all(report::printable_lines(&text).as_bytes());
    let _ = out.flush();
    pos + n as u64
}

/// Replaces this process with a tmux client on the agent's session, running as the agent user.
fn attach(config: &Config, out: &mut dyn Write) -> u8 {
    let user = match crate::session::users::resolve_agent(&config.agent.user) {
        Ok(u) => u,
        Err(e) => {
            let _ = writeln!(out, "cordon attach: {e}");
            return 1;
        }
    };
    if !config.agent.tmux {
        let _ = writeln!(out, "the agent runs headless (agent.tmux = false): there is no session to attach to");
        return 1;
    }
    let socket = tmux::socket_path(&config.supervisor.state_dir);
    let term =
        std::env::var("TERM").ok().filter(|t| !t.is_empty() && t != "dumb").unwrap_or_else(|| "xterm-256color".into());
    let me = nix::unistd::getuid().as_raw();
    let mut cmd = if me == 0 {
        crate::session::users::unprivileged_command("tmux", &user)
    } else if me == user.uid {
        // Already the agent user: nothing to drop, but the same PATH as everything cordon runs
        // as the agent (and no other from the caller's environment).
        let mut cmd = std::process::Command::new("tmux");
        cmd.env("PATH", crate::session::users::AGENT_PATH);
        cmd
    } else {
        let _ = writeln!(out, "cordon attach: only root or the agent user ({}) may attach", user.name);
        return 1;
    };
    cmd.env("TERM", term)
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LANG", std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".into()))
        .env("COLORTERM", "truecolor")
        .env_remove("TMUX")
        .stdin(std::process::Stdio::inherit())
        .arg("-S")
        .arg(&socket)
        .args(["attach-session", "-t", &config.agent.session]);
    let e = cmd.exec();
    let _ = writeln!(out, "cordon attach: cannot run tmux: {e}");
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_log_reaches_the_terminal_without_escape_sequences() {
        let dir = std::env::temp_dir().join(format!("cordon-attach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("boot.log");
        // An OSC 52 clipboard write and a title change, as a tool's output would carry them.
        std::fs::write(&log, "  claude plugin: \x1b]52;c;ZXZpbA==\x07\x1b]0;title\u{9c} done\tok\nnext\n").unwrap();
        let mut out = Vec::new();
        let pos = print_new_log(&log, 0, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out, "  claude plugin: ^[]52;c;ZXZpbA==^G^[]0;title\\u{9c} done\tok\nnext\n");
        assert_eq!(pos, std::fs::metadata(&log).unwrap().len(), "the position counts the file's bytes");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
