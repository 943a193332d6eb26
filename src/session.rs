//! The agent session: a tmux server owned by the agent user on a private socket under the
//! state directory, the agent in the top pane and (optionally) a login shell below it. cordon
//! runs every tmux command as the agent user, watches the agent pane for its death and exit
//! status, and restarts it in place.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::agent::unprivileged_command;
use crate::users::AgentUser;

/// The built-in configuration, used when /etc/cordon/tmux.conf does not exist.
pub const DEFAULT_CONF: &str = include_str!("../config/tmux.conf");
pub const SHIPPED_CONF: &str = "/etc/cordon/tmux.conf";

/// The socket of the agent's tmux server in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("tmux").join("agent.sock")
}

/// How tmux reports a pane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaneState {
    pub dead: bool,
    /// Shell convention: the exit code, or 128 + signal.
    pub exit: Option<i32>,
    pub pid: Option<i32>,
}

/// Parses `#{pane_dead} #{pane_dead_status} #{pane_dead_signal} #{pane_pid}`.
pub fn parse_pane(line: &str) -> Option<PaneState> {
    let f: Vec<&str> = line.trim().split(' ').collect();
    let dead = match *f.first()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let status = f.get(1).and_then(|s| s.parse::<i32>().ok());
    let signal = f.get(2).and_then(|s| s.parse::<i32>().ok());
    let pid = f.get(3).and_then(|s| s.parse::<i32>().ok());
    let exit = if dead { status.or(signal.map(|s| 128 + s)) } else { None };
    Some(PaneState { dead, exit, pid })
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
        Ok(Tmux { socket: socket_path(state_dir), conf, user: user.clone(), env, session: session.into() })
    }

    fn command(&self) -> Command {
        let mut cmd = unprivileged_command("tmux", &self.user);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v))).arg("-S").arg(&self.socket).arg("-f").arg(&self.conf);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self.command().args(args).output().map_err(|e| format!("cannot run tmux: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("tmux {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Starts the server and the session; returns the agent pane's id (`%0`).
    pub fn start(&self, workdir: &Path, argv: &[String], shell_pane: bool) -> Result<String, String> {
        let dir = workdir.display().to_string();
        let mut args: Vec<&str> = vec![
            "new-session",
            "-d",
            "-s",
            &self.session,
            "-x",
            "220",
            "-y",
            "50",
            "-c",
            &dir,
            "-P",
            "-F",
            "#{pane_id}",
            "--",
        ];
        args.extend(argv.iter().map(String::as_str));
        let pane = self.run(&args)?;
        if shell_pane {
            let shell = self.user.shell.display().to_string();
            self.run(&["split-window", "-v", "-d", "-l", "20%", "-t", &pane, "-c", &dir, "--", &shell, "-l"])?;
        }
        Ok(pane)
    }

    pub fn pane(&self, pane: &str) -> Result<PaneState, String> {
        let line = self.run(&[
            "display-message",
            "-p",
            "-t",
            pane,
            "#{pane_dead} #{pane_dead_status} #{pane_dead_signal} #{pane_pid}",
        ])?;
        parse_pane(&line).ok_or_else(|| format!("unexpected answer from tmux: {line}"))
    }

    /// Restarts a dead pane with `argv`.
    pub fn respawn(&self, pane: &str, workdir: &Path, argv: &[String]) -> Result<(), String> {
        let dir = workdir.display().to_string();
        let mut args: Vec<&str> = vec!["respawn-pane", "-k", "-t", pane, "-c", &dir, "--"];
        args.extend(argv.iter().map(String::as_str));
        self.run(&args).map(|_| ())
    }

    /// Panes other than the agent's that died (the shell pane after `exit`), to respawn.
    pub fn dead_shell_panes(&self, agent_pane: &str) -> Vec<String> {
        self.run(&["list-panes", "-s", "-t", &self.session, "-F", "#{pane_id} #{pane_dead}"])
            .map(|out| {
                out.lines()
                    .filter_map(|l| l.split_once(' '))
                    .filter(|(id, dead)| *id != agent_pane && *dead == "1")
                    .map(|(id, _)| id.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn has_session(&self) -> bool {
        self.run(&["has-session", "-t", &self.session]).is_ok()
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
    fn pane_states_parse_exit_codes_and_signals() {
        assert_eq!(parse_pane("0   42"), Some(PaneState { dead: false, exit: None, pid: Some(42) }));
        assert_eq!(parse_pane("1 7  42"), Some(PaneState { dead: true, exit: Some(7), pid: Some(42) }));
        assert_eq!(parse_pane("1  9 42"), Some(PaneState { dead: true, exit: Some(137), pid: Some(42) }));
        assert_eq!(parse_pane(""), None);
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
