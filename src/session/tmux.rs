//! The agent session: a tmux server owned by the agent user on a private socket under the
//! state directory, the agent in the top pane and (optionally) a login shell below it. cordon
//! runs every tmux command as the agent user, watches the agent pane for its death and exit
//! status, and restarts it in place.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::session::users::AgentUser;
use crate::session::users::unprivileged_command;

/// The status line's right in observe mode (`network.mode = "observe"`).
pub const OBSERVE_STATUS: &str =
    "#[bg=colour160,fg=colour231,bold] cordon: egress NOT enforced (observe mode) #[default]";

/// The built-in configuration, used when /etc/cordon/tmux.conf does not exist.
pub const DEFAULT_CONF: &str = include_str!("../../config/tmux.conf");
pub const SHIPPED_CONF: &str = "/etc/cordon/tmux.conf";

/// How long the agent pane may take to exec the agent once its session exists.
const PANE_START_LIMIT: Duration = Duration::from_secs(10);

/// Why [`Tmux::start`] failed.
#[derive(Debug)]
pub enum PaneStartError {
    /// A tmux command failed.
    Tmux(String),
    /// The pane ran, but could not exec the agent.
    Agent(crate::session::users::StartError),
}

/// How long one tmux command may take. Each is a round trip to a local server (or its start);
/// a server that does not answer in this long is wedged.
const TMUX_DEADLINE: Duration = Duration::from_secs(10);

/// The socket of the agent's tmux server in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("tmux").join("agent.sock")
}

/// Where the pane wrapper records the agent's exit status.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("tmux").join("agent.status")
}

/// `cordon pane-run --status-file F -- ARGV`: what the agent pane runs. tmux does not reliably
/// learn a pane's exit status (it can miss SIGCHLD and leave the process a zombie), so this
/// wrapper runs the agent as its child, waits for it, writes its status (shell convention) to
/// `F`, and exits with it. Signals meant for the agent reach it through the process group; the
/// wrapper keeps them blocked, so it outlives the agent and always records the status.
pub fn pane_run(status_file: &Path, argv: &[String]) -> i32 {
    let _ = std::fs::remove_file(status_file);
    if let Err(e) = crate::sys::block_signals() {
        eprintln!("cordon pane-run: cannot block signals: {e}");
    }
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    crate::sys::unblock_signals_at_exec(&mut cmd);
    // std's spawn returns only once the exec succeeded (or with the exec's error), so the
    // marker written after it tells the session stage the agent really started.
    let (code, error) = match cmd.spawn() {
        Ok(mut child) => {
            record(&started_path(status_file), &format!("{}\n", child.id()));
            match child.wait() {
                Ok(status) => (crate::sys::exit_code(status), None),
                Err(e) => (1, Some(format!("cannot wait for the agent `{}`: {e}", argv[0]))),
            }
        }
        Err(e) => {
            let e = crate::session::users::StartError::from_exec(&argv[0], &e);
            (e.status, Some(e.message))
        }
    };
    if let Some(e) = &error {
        eprintln!("cordon: {e}");
    }
    // The status on the first line, the reason the agent could not start (if so) after it.
    record(status_file, &format!("{code}\n{}", error.map(|e| e + "\n").unwrap_or_default()));
    code
}

/// Writes `text` to `path` atomically (temporary file, then rename).
fn record(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).is_err() {
        eprintln!("cordon pane-run: cannot write {}", path.display());
    }
}

/// Where the pane wrapper notes that the agent was exec'd, next to its status file.
fn started_path(status_file: &Path) -> PathBuf {
    status_file.with_extension("started")
}

/// The status `pane_run` recorded, if any.
pub fn recorded_status(state_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(status_path(state_dir)).ok()?.lines().next()?.trim().parse().ok()
}

/// Why the agent could not be started, as `pane_run` recorded it with its status.
pub fn recorded_error(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(status_path(state_dir)).ok()?;
    let error = text.split_once('\n')?.1.trim();
    (!error.is_empty()).then(|| error.to_string())
}

/// How tmux reports a pane (its exit status is not taken from tmux: see `pane_run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaneState {
    pub dead: bool,
    /// In cordon's pid namespace.
    pub pid: Option<i32>,
}

/// Parses `#{pane_dead} #{pane_pid}`.
pub fn parse_pane(line: &str) -> Option<PaneState> {
    let mut f = line.split_whitespace();
    let dead = match f.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    Some(PaneState { dead, pid: f.next().and_then(|p| p.parse().ok()) })
}

/// Parses `list-panes` lines of `#{pane_id} #{pane_dead} #{pane_pid}`; lines that do not
/// parse are left out.
pub fn parse_panes(out: &str) -> Vec<(String, PaneState)> {
    out.lines()
        .filter_map(|l| {
            let (id, rest) = l.trim().split_once(' ')?;
            Some((id.to_string(), parse_pane(rest)?))
        })
        .collect()
}

/// The agent's tmux server.
#[derive(Debug, Clone)]
pub struct Tmux {
    pub socket: PathBuf,
    pub conf: PathBuf,
    pub user: AgentUser,
    /// The agent's environment, which the server and every pane inherit.
    pub env: Vec<(String, String)>,
    pub session: String,
    /// The state directory (the status file lives under it).
    pub state_dir: PathBuf,
}

impl Tmux {
    /// Prepares the socket directory (the agent's, 0700) and the configuration file.
    pub fn prepare(
        state_dir: &Path,
        user: &AgentUser,
        env: Vec<(String, String)>,
        session: &str,
    ) -> std::io::Result<Tmux> {
        use std::os::unix::fs::PermissionsExt;
        let dir = state_dir.join("tmux");
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let conf = if Path::new(SHIPPED_CONF).exists() {
            PathBuf::from(SHIPPED_CONF)
        } else {
            let path = state_dir.join("tmux.conf");
            std::fs::write(&path, DEFAULT_CONF)?;
            path
        };
        Ok(Tmux {
            socket: socket_path(state_dir),
            conf,
            user: user.clone(),
            env,
            session: session.into(),
            state_dir: state_dir.to_path_buf(),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = unprivileged_command("tmux", &self.user);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v))).arg("-S").arg(&self.socket).arg("-f").arg(&self.conf);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.command();
        cmd.args(args);
        let out = crate::sys::command::output(cmd, crate::sys::command::Options::new(TMUX_DEADLINE))
            .map_err(|e| crate::fix::error_chain(&e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("tmux {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// The agent's argv wrapped in `cordon pane-run`.
    fn wrapped(&self, argv: &[String]) -> Vec<String> {
        let exe = crate::sys::cordon_exe();
        let status = status_path(&self.state_dir);
        let _ = std::fs::remove_file(&status);
        let _ = std::fs::remove_file(started_path(&status));
        let mut w = vec![
            exe.display().to_string(),
            "pane-run".into(),
            "--status-file".into(),
            status.display().to_string(),
            "--".into(),
        ];
        w.extend(argv.iter().cloned());
        w
    }

    /// Starts the server and the session, and waits until the agent is exec'd in its pane;
    /// returns the agent pane's id (`%0`), or why the agent could not be started.
    pub fn start(&self, workdir: &Path, argv: &[String], shell_pane: bool) -> Result<String, PaneStartError> {
        let pane = self.start_session(workdir, argv, shell_pane).map_err(PaneStartError::Tmux)?;
        let status = status_path(&self.state_dir);
        let deadline = std::time::Instant::now() + PANE_START_LIMIT;
        while std::time::Instant::now() < deadline && !crate::sys::command::BOOT.is_requested() {
            if let Some(message) = recorded_error(&self.state_dir) {
                let status = recorded_status(&self.state_dir).unwrap_or(127);
                return Err(PaneStartError::Agent(crate::session::users::StartError { message, status }));
            }
            // Started, or already ran and exited: either way the exec worked.
            if started_path(&status).exists() || status.exists() {
                return Ok(pane);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(
            "the agent pane did not report the agent's start within {PANE_START_LIMIT:?}; carrying on (an exec failure will be reported when it exits)"
        );
        Ok(pane)
    }

    fn start_session(&self, workdir: &Path, argv: &[String], shell_pane: bool) -> Result<String, String> {
        let dir = workdir.display().to_string();
        let size = ["-x", "220", "-y", "50"];
        let mut args: Vec<&str> = vec!["new-session", "-d", "-s", &self.session];
        args.extend(size);
        args.extend(["-c", &dir, "-P", "-F", "#{pane_id}", "--"]);
        let wrapped = self.wrapped(argv);
        args.extend(wrapped.iter().map(String::as_str));
        let pane = self.run(&args)?;
        if shell_pane {
            let shell = self.user.shell.display().to_string();
            self.run(&["split-window", "-v", "-d", "-l", "20%", "-t", &pane, "-c", &dir, "--", &shell, "-l"])?;
        }
        Ok(pane)
    }

    /// Replaces the right of the status line (the configuration's is `cordon`).
    pub fn set_status_right(&self, text: &str) -> Result<(), String> {
        self.run(&["set-option", "-g", "status-right", text]).map(|_| ())
    }

    pub fn pane(&self, pane: &str) -> Result<PaneState, String> {
        let line = self.run(&["display-message", "-p", "-t", pane, "#{pane_dead} #{pane_pid}"])?;
        parse_pane(&line).ok_or_else(|| format!("unexpected answer from tmux: {line}"))
    }

    /// Restarts the dead agent pane with `argv`.
    pub fn respawn(&self, pane: &str, workdir: &Path, argv: &[String]) -> Result<(), String> {
        self.respawn_raw(pane, workdir, &self.wrapped(argv))
    }

    /// Restarts a dead pane with `argv` as it is (the shell pane).
    pub fn respawn_raw(&self, pane: &str, workdir: &Path, argv: &[String]) -> Result<(), String> {
        let dir = workdir.display().to_string();
        let mut args: Vec<&str> = vec!["respawn-pane", "-k", "-t", pane, "-c", &dir, "--"];
        args.extend(argv.iter().map(String::as_str));
        self.run(&args).map(|_| ())
    }

    /// Every pane of the agent's session, in one tmux command: Err when the session (or its
    /// server) is gone.
    pub fn panes(&self) -> Result<Vec<(String, PaneState)>, String> {
        let out = self.run(&["list-panes", "-s", "-t", &self.session, "-F", "#{pane_id} #{pane_dead} #{pane_pid}"])?;
        Ok(parse_panes(&out))
    }

    pub fn has_session(&self) -> bool {
        self.run(&["has-session", "-t", &self.session]).is_ok()
    }

    /// When the agent's session last had output in any of its windows (tmux's
    /// `#{window_activity}`, seconds since the epoch), for the idle stop.
    pub fn window_activity(&self) -> Option<u64> {
        let out = self.run(&["list-windows", "-t", &self.session, "-F", "#{window_activity}"]).ok()?;
        out.lines().filter_map(|l| l.trim().parse().ok()).max()
    }

    /// The uids of the attached clients' processes (for `status`), by client pid.
    pub fn clients(&self) -> Vec<String> {
        self.run(&["list-clients", "-F", "#{client_pid} #{client_tty} #{client_width}x#{client_height}"])
            .map(|o| o.lines().map(String::from).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pane_states_parse() {
        assert_eq!(parse_pane("0 42"), Some(PaneState { dead: false, pid: Some(42) }));
        assert_eq!(parse_pane("1 42\n"), Some(PaneState { dead: true, pid: Some(42) }));
        assert_eq!(parse_pane(""), None);
        let panes = parse_panes("%0 0 41\n%1 1 57\nnonsense\n%2 0\n");
        let live = |pid| PaneState { dead: false, pid };
        assert_eq!(
            panes,
            [
                ("%0".to_string(), live(Some(41))),
                ("%1".to_string(), PaneState { dead: true, pid: Some(57) }),
                ("%2".to_string(), live(None)),
            ]
        );
    }

    #[test]
    fn the_built_in_configuration_keeps_dead_panes_and_the_window_large() {
        for line in [
            "set -g remain-on-exit on",
            "set -g window-size largest",
            "set -s escape-time 0",
            "set -g allow-passthrough off",
        ] {
            assert!(DEFAULT_CONF.lines().any(|l| l == line), "{line}");
        }
    }
}
