//! The agent process: its explicit environment, how it is started as the unprivileged user,
//! and what happens when it exits.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::secrets::Secrets;
use crate::sys;
use crate::users::AgentUser;

/// PATH for the agent: no user-writable directory first.
pub const AGENT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Secrets the agent reads from its environment by design (Claude Code authenticates with it).
const AGENT_ENV_SECRETS: [&str; 1] = ["CLAUDE_CODE_OAUTH_TOKEN"];

/// Everything needed to start the agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub argv: Vec<String>,
    pub user: AgentUser,
    pub workdir: PathBuf,
    /// The complete environment: nothing of cordon's own environment leaks into the agent.
    pub env: Vec<(String, String)>,
}

/// The agent's environment, built from nothing: the basics, `CLAUDE_CODE_OAUTH_TOKEN`, and the
/// variables `passthrough` names.
pub fn agent_env(
    user: &AgentUser,
    boot_env: &BTreeMap<String, String>,
    secrets: &Secrets,
    passthrough: &[String],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("HOME".to_string(), user.home.display().to_string()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), user.shell.display().to_string()),
        ("PATH".into(), AGENT_PATH.into()),
        ("LANG".into(), boot_env.get("LANG").cloned().unwrap_or_else(|| "C.UTF-8".into())),
        ("TERM".into(), "xterm-256color".into()),
        ("COLORTERM".into(), "truecolor".into()),
    ];
    for name in AGENT_ENV_SECRETS {
        if let Some(s) = secrets.get(name) {
            env.push((name.into(), s.expose().into()));
        }
    }
    for name in passthrough {
        if let Some(v) = boot_env.get(name)
            && !env.iter().any(|(k, _)| k == name)
        {
            env.push((name.clone(), v.clone()));
        }
    }
    env
}

/// Where `program` is found, as a shell finds it: as given when it contains a `/`, else the
/// first executable file of that name on [`AGENT_PATH`], else the first file of that name
/// (whose exec then fails with "Permission denied", status 126, rather than "not found").
/// None: nothing of that name exists (status 127).
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    let candidates: Vec<PathBuf> =
        AGENT_PATH.split(':').map(|d| Path::new(d).join(program)).filter(|p| p.is_file()).collect();
    let executable = |p: &&PathBuf| p.metadata().is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    candidates.iter().find(executable).or(candidates.first()).cloned()
}

/// Why the agent could not be started: the message names the program and the reason, and the
/// status is the shell's (126: found but not executable; 127: not found, which includes a
/// missing `#!` interpreter, as exec reports it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    pub message: String,
    pub status: i32,
}

impl StartError {
    /// The agent program does not exist (on the agent's PATH, for a bare name).
    pub fn not_found(program: &str) -> StartError {
        let reason = if program.contains('/') {
            "No such file or directory".to_string()
        } else {
            format!("not found on the agent's PATH ({AGENT_PATH})")
        };
        StartError::new(program, &reason, 127)
    }

    /// From the error of exec'ing `program`.
    pub fn from_exec(program: &str, e: &std::io::Error) -> StartError {
        if e.kind() != std::io::ErrorKind::NotFound {
            return StartError::new(program, &e.to_string(), 126);
        }
        // ENOENT for a file that exists: the kernel could not find its interpreter.
        let reason = match find_program(program).as_deref().and_then(interpreter) {
            Some(interp) => format!("its interpreter `{interp}` (from its #! line) is missing: {e}"),
            None => e.to_string(),
        };
        StartError::new(program, &reason, 127)
    }

    fn new(program: &str, reason: &str, status: i32) -> StartError {
        StartError { message: format!("cannot start the agent `{program}`: {reason} (exit status {status})"), status }
    }

    /// What to do about it.
    pub fn hint(&self) -> String {
        if self.status == 126 {
            "make agent.command's program executable for the agent user (chmod 755), or point agent.command at one that is".into()
        } else {
            "install the agent (and its #! interpreter) in the image, or set agent.command to a program on the agent's PATH".into()
        }
    }
}

/// The interpreter a `#!` script names, if `path` is one.
fn interpreter(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let interp = String::from_utf8_lossy(line).split_whitespace().next()?.to_string();
    Some(interp)
}

/// A command that runs `program` as `user` with an empty signal mask, no inherited
/// descriptors beyond stdio, an empty environment, and every privilege dropped before exec.
pub fn unprivileged_command(program: impl AsRef<std::ffi::OsStr>, user: &AgentUser) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear().stdin(std::process::Stdio::null());
    let (uid, gid) = (user.uid, user.gid);
    let mut groups = vec![gid];
    groups.extend(user.groups.iter().filter(|g| **g != gid));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (sigprocmask, close_range, prctl, set*id, capset); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            sys::unblock_all_signals()?;
            sys::cloexec_from_3()?;
            sys::drop_privileges(uid, gid, &groups)
        });
    }
    cmd
}

/// Starts the agent as its own process group (so signals reach its children too).
pub fn spawn(spec: &AgentSpec) -> std::io::Result<tokio::process::Child> {
    let mut cmd = unprivileged_command(&spec.argv[0], &spec.user);
    cmd.args(&spec.argv[1..]).envs(spec.env.iter().map(|(k, v)| (k, v))).current_dir(&spec.workdir).process_group(0);
    tokio::process::Command::from(cmd).spawn()
}

/// Crash-loop accounting for `on_exit = "restart"`: backoff from `first` (1 s by default)
/// doubling to 30 s; more than [`RestartPolicy::LIMIT`] exits within [`RestartPolicy::WINDOW`]
/// and it gives up.
#[derive(Debug)]
pub struct RestartPolicy {
    exits: VecDeque<Instant>,
    first: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::new(Duration::from_secs(1))
    }
}

impl RestartPolicy {
    pub const LIMIT: usize = 5;
    pub const WINDOW: Duration = Duration::from_secs(300);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);

    pub fn new(first: Duration) -> RestartPolicy {
        RestartPolicy { exits: VecDeque::new(), first }
    }

    /// Records an exit at `now`: the delay before the next start, or None to stop restarting.
    pub fn on_exit(&mut self, now: Instant) -> Option<Duration> {
        while self.exits.front().is_some_and(|t| now.duration_since(*t) > Self::WINDOW) {
            self.exits.pop_front();
        }
        self.exits.push_back(now);
        let n = self.exits.len();
        if n > Self::LIMIT {
            return None;
        }
        Some((self.first * (1 << (n - 1))).min(Self::MAX_BACKOFF))
    }
}

/// The running agent, however it runs: a child of the supervisor (headless), or the top pane of
/// the agent's tmux session.
pub enum AgentHandle {
    Direct(Option<tokio::process::Child>),
    Tmux { tmux: crate::session::Tmux, pane: String },
}

/// How often the agent pane is looked at.
const PANE_POLL: Duration = Duration::from_millis(250);

impl AgentHandle {
    /// Waits until the agent exits; its status in shell convention. Call only while it runs.
    pub async fn wait(&mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match self {
            AgentHandle::Direct(slot) => {
                let Some(child) = slot.as_mut() else { return std::future::pending().await };
                let code = match child.wait().await {
                    Ok(status) => status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                    Err(e) => {
                        tracing::error!("waiting for the agent failed: {e}");
                        1
                    }
                };
                *slot = None;
                code
            }
            AgentHandle::Tmux { tmux, pane } => {
                // tmux's own view of the pane is unreliable (it can report a live pane dead, and
                // miss a dead one's status), so the agent's end is the status file its pane
                // wrapper writes; the wrapper's own death without one (SIGKILL) ends it too.
                let mut wrapper_gone = 0;
                loop {
                    tokio::time::sleep(PANE_POLL).await;
                    if let Some(code) = crate::session::recorded_status(&tmux.state_dir) {
                        return code;
                    }
                    let (t, p) = (tmux.clone(), pane.clone());
                    let looked = tokio::task::spawn_blocking(move || {
                        // A shell pane closed with `exit` comes back, so the session keeps its shell.
                        for dead in t.dead_shell_panes(&p) {
                            let shell = vec![t.user.shell.display().to_string(), "-l".into()];
                            let _ = t.respawn_raw(&dead, Path::new("."), &shell);
                        }
                        (t.pane(&p), t.has_session())
                    })
                    .await;
                    match looked {
                        Ok((_, false)) => {
                            tracing::error!("the agent's tmux session is gone");
                            return crate::session::recorded_status(&tmux.state_dir).unwrap_or(1);
                        }
                        Ok((Ok(state), true)) if state.pid.is_none_or(|pid| !crate::sys::alive(pid)) => {
                            wrapper_gone += 1;
                            if wrapper_gone >= 8 {
                                tracing::warn!("the agent pane's process is gone without a recorded exit status");
                                return 1;
                            }
                        }
                        _ => wrapper_gone = 0,
                    }
                }
            }
        }
    }

    /// Starts the agent again after it exited.
    pub fn restart(&mut self, spec: &AgentSpec) -> Result<(), String> {
        match self {
            AgentHandle::Direct(slot) => {
                *slot = Some(spawn(spec).map_err(|e| StartError::from_exec(&spec.argv[0], &e).message)?);
                Ok(())
            }
            AgentHandle::Tmux { tmux, pane } => tmux.respawn(pane, &spec.workdir, &spec.argv),
        }
    }

    /// Why the agent's last start failed, when its pane wrapper recorded one (tmux mode; a
    /// headless start fails in `restart` itself).
    pub fn start_error(&self) -> Option<String> {
        match self {
            AgentHandle::Direct(_) => None,
            AgentHandle::Tmux { tmux, .. } => crate::session::recorded_error(&tmux.state_dir),
        }
    }

    /// The agent's pid (the leader of its process group), when it runs.
    pub fn pid(&self) -> Option<i32> {
        match self {
            AgentHandle::Direct(slot) => slot.as_ref().and_then(|c| c.id()).map(|p| p as i32),
            AgentHandle::Tmux { tmux, pane } => tmux.pane(pane).ok().filter(|s| !s.dead).and_then(|s| s.pid),
        }
    }

    /// Reaps a direct child that already exited (during the graceful stop).
    pub fn try_reap(&mut self) {
        if let AgentHandle::Direct(Some(child)) = self {
            let _ = child.try_wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_then_give_up_after_five_crashes_in_five_minutes() {
        let mut p = RestartPolicy::default();
        let t0 = Instant::now();
        let delays: Vec<Option<u64>> =
            (0..6).map(|i| p.on_exit(t0 + Duration::from_secs(i)).map(|d| d.as_secs())).collect();
        assert_eq!(delays, [Some(1), Some(2), Some(4), Some(8), Some(16), None]);
    }

    #[test]
    fn crashes_older_than_the_window_are_forgotten() {
        let mut p = RestartPolicy::default();
        let t0 = Instant::now();
        for i in 0..5 {
            p.on_exit(t0 + Duration::from_secs(i));
        }
        assert_eq!(p.on_exit(t0 + Duration::from_secs(400)), Some(Duration::from_secs(1)));
    }

    #[test]
    fn start_errors_name_the_program_the_reason_and_the_shell_status() {
        let dir = std::env::temp_dir().join(format!("cordon-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("agent");
        std::fs::write(&script, "#!/nonexistent/interp -x\n").unwrap();
        let program = script.display().to_string();

        let e = StartError::from_exec(&program, &std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.status, 127);
        assert_eq!(
            e.message,
            format!(
                "cannot start the agent `{program}`: its interpreter `/nonexistent/interp` (from its #! line) is missing: \
                 No such file or directory (os error 2) (exit status 127)"
            )
        );
        let e = StartError::from_exec(&program, &std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(
            (e.status, e.message),
            (126, format!("cannot start the agent `{program}`: Permission denied (os error 13) (exit status 126)"))
        );
        assert!(StartError::not_found("no-such-agent").message.contains("not found on the agent's PATH"));
        assert_eq!(StartError::not_found("/no/such").status, 127);
        // A file without the x bit is found (its exec fails with 126), not "not found".
        assert_eq!(find_program(&program), Some(script.clone()));
        assert_eq!(find_program("/no/such/agent"), None);
        assert_eq!(find_program("sh").map(|p| p.is_absolute()), Some(true));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn agent_environment_is_explicit_and_carries_only_the_agent_secret() {
        let user = AgentUser {
            name: "agent".into(),
            uid: 5000,
            gid: 5000,
            home: "/home/agent".into(),
            shell: "/bin/bash".into(),
            groups: vec![],
        };
        let boot_env: BTreeMap<String, String> = [("LANG", "en_US.UTF-8"), ("GH_PAT", "ghp_x"), ("SECRET_THING", "y")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut full = boot_env.clone();
        full.insert("CLAUDE_CODE_OAUTH_TOKEN".into(), "tok".into());
        let secrets = Secrets::check(&["GH_PAT".into(), "CLAUDE_CODE_OAUTH_TOKEN".into()], &[], &full);
        let env = agent_env(&user, &boot_env, &secrets, &["SECRET_THING".into(), "MISSING".into()]);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "HOME",
                "USER",
                "LOGNAME",
                "SHELL",
                "PATH",
                "LANG",
                "TERM",
                "COLORTERM",
                "CLAUDE_CODE_OAUTH_TOKEN",
                "SECRET_THING"
            ]
        );
        assert!(env.contains(&("LANG".into(), "en_US.UTF-8".into())));
    }
}
