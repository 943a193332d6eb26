//! The agent process: its explicit environment, how it is started as the unprivileged user,
//! and what happens when it exits.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::secrets::Secrets;
use crate::session::tmux::{PaneStartError, Tmux};
use crate::session::users::{AGENT_PATH, AgentUser, StartError, unprivileged_command};

/// Secrets the agent reads from its environment by design (Claude Code authenticates with it).
const AGENT_ENV_SECRETS: [&str; 1] = ["CLAUDE_CODE_OAUTH_TOKEN"];

/// Everything needed to start the agent.
#[derive(Debug, Clone)]
pub(crate) struct AgentSpec {
    pub argv: Vec<String>,
    pub user: AgentUser,
    pub workdir: PathBuf,
    /// The complete environment: nothing of cordon's own environment leaks into the agent.
    pub env: Vec<(String, String)>,
}

/// The agent's environment, built from nothing: the basics, `CLAUDE_CODE_OAUTH_TOKEN`, and the
/// variables `passthrough` names.
pub(crate) fn agent_env(
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

/// The boot's `session` stage, last: the agent starts only on a fully locked-down container.
/// In the agent's tmux session (then also returned, for `attach` and `status`), or headless.
/// The first prompt (CLAUDE_PROMPT) is the last argument of the first start only: a restarted
/// agent must not redo the task. It is never logged.
pub(crate) fn start(
    config: &crate::config::Config,
    spec: AgentSpec,
    state_dir: &Path,
) -> crate::fix::StageResult<(AgentSpec, AgentHandle, Option<Tmux>)> {
    use crate::fix::Problem;
    let workdir = &spec.workdir;
    if !workdir.is_dir() {
        return Err(Problem::new(format!("the work directory {} is not a directory", workdir.display()))
            .with_fix("set agent.workdir (or repo.dest) to a directory on a tmpfs, e.g. /workspace"));
    }
    // A name that exists nowhere fails here; every other exec failure (no x bit, a missing #!
    // interpreter) fails at the exec itself, which both modes wait for, and gives the same error
    // and shell status.
    let program = spec.argv[0].clone();
    let start_error = |e: StartError| Problem::new(e.message.clone()).with_fix(e.hint());
    if crate::session::users::find_program(&program).is_none() {
        return Err(start_error(StartError::not_found(&program)));
    }
    let mut first = spec.clone();
    first.argv.extend(config.agent.prompt.iter().cloned());
    let user = &spec.user;
    if config.agent.tmux {
        let tmux = Tmux::prepare(state_dir, user, spec.env.clone(), &config.agent.session)
            .map_err(|e| Problem::caused_by("cannot prepare the tmux socket directory", &e))?;
        let pane = tmux.start(workdir, &first.argv, config.agent.shell_pane).map_err(|e| match e {
            PaneStartError::Agent(e) => start_error(e),
            PaneStartError::Tmux(e) => Problem::new(format!("cannot start the agent's tmux session: {e}")),
        })?;
        let detail = format!(
            "tmux session `{}` on {}, agent `{program}` as {} (uid {})",
            config.agent.session,
            tmux.socket.display(),
            user.name,
            user.uid
        );
        let handle = AgentHandle::Tmux { tmux: tmux.clone(), pane, watch: PaneWatch::default() };
        Ok(((spec, handle, Some(tmux)), detail))
    } else {
        let child = spawn(&first).map_err(|e| start_error(StartError::from_exec(&program, &e)))?;
        let detail =
            format!("agent `{program}` pid {} as {} (uid {}), headless", child.id().unwrap_or(0), user.name, user.uid);
        Ok(((spec, AgentHandle::Direct(Some(child)), None), detail))
    }
}

/// Starts the agent as its own process group (so signals reach its children too).
pub(crate) fn spawn(spec: &AgentSpec) -> std::io::Result<tokio::process::Child> {
    let mut cmd = unprivileged_command(&spec.argv[0], &spec.user);
    cmd.args(&spec.argv[1..]).envs(spec.env.iter().map(|(k, v)| (k, v))).current_dir(&spec.workdir).process_group(0);
    tokio::process::Command::from(cmd).spawn()
}

/// Crash-loop accounting for `on_exit = "restart"`: backoff from `first` (1 s by default)
/// doubling to 30 s; more than [`RestartPolicy::LIMIT`] exits within [`RestartPolicy::WINDOW`]
/// and it gives up.
#[derive(Debug)]
pub(crate) struct RestartPolicy {
    exits: VecDeque<Instant>,
    first: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::new(Duration::from_secs(1))
    }
}

impl RestartPolicy {
    pub(crate) const LIMIT: usize = 5;
    pub(crate) const WINDOW: Duration = Duration::from_secs(300);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);

    pub(crate) fn new(first: Duration) -> RestartPolicy {
        RestartPolicy { exits: VecDeque::new(), first }
    }

    /// Records an exit at `now`: the delay before the next start, or None to stop restarting.
    pub(crate) fn on_exit(&mut self, now: Instant) -> Option<Duration> {
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
pub(crate) enum AgentHandle {
    Direct(Option<tokio::process::Child>),
    Tmux { tmux: crate::session::tmux::Tmux, pane: String, watch: PaneWatch },
}

/// What the watch of the agent pane knows between calls of [`AgentHandle::wait`]. The
/// supervisor's `select!` drops a waiting call whenever something else happens (an idle
/// sample, a forwarded signal) and calls again: kept here, the watch carries on where it was.
#[derive(Debug, Default)]
pub(crate) struct PaneWatch {
    /// The pane wrapper's pid, from the last look at tmux; None: the pane was not there.
    wrapper: Option<i32>,
    /// Whether a look has finished since the watch started: no miss is counted before.
    seen: bool,
    /// Ticks in a row that found the wrapper not running.
    misses: u32,
    /// Looks at tmux in a row that failed.
    failures: u32,
    /// When tmux is asked next; None: at the next tick.
    next_look: Option<std::time::Instant>,
    /// The look at tmux under way, beside the ticks: a tmux that hangs (up to its deadline of
    /// 10 s a command) does not hold up the status file or the wrapper's check.
    look: Option<tokio::task::JoinHandle<Result<Option<i32>, String>>>,
}

/// How often the agent's end is looked for: the status file its pane wrapper writes, and
/// whether the wrapper still runs (`/proc`). Neither starts a process.
const PANE_POLL: Duration = Duration::from_millis(250);
/// How often tmux itself is asked about the session: whether it is still there, the agent
/// pane's process, and which shell panes died and are to be respawned. Each ask is one
/// `tmux list-panes`, a process of its own. Three tmux commands every 250 ms kept an idle
/// 2-CPU machine 4.6% busy (docs/benchmarks.md, "An idle container").
const SESSION_POLL: Duration = Duration::from_secs(2);
/// Ticks of [`PANE_POLL`] without the wrapper running, and no status recorded, after which the
/// agent counts as ended (status 1): 2 s.
const WRAPPER_MISSES: u32 = 8;
/// Failed asks in a row (the second at once after the first) after which the session counts
/// as gone: one failure may be a fork refused for a moment.
const LOOK_FAILURES: u32 = 2;

impl AgentHandle {
    /// Waits until the agent exits; its status in shell convention. Call only while it runs.
    pub(crate) async fn wait(&mut self) -> i32 {
        match self {
            AgentHandle::Direct(slot) => {
                let Some(child) = slot.as_mut() else { return std::future::pending().await };
                let code = match child.wait().await {
                    Ok(status) => crate::sys::exit_code(status),
                    Err(e) => {
                        tracing::error!("waiting for the agent failed: {e}");
                        1
                    }
                };
                *slot = None;
                code
            }
            AgentHandle::Tmux { tmux, pane, watch } => {
                // tmux's own view of the pane is unreliable (it can report a live pane dead, and
                // miss a dead one's status), so the agent's end is the status file its pane
                // wrapper writes; the wrapper's own death without one (SIGKILL) ends it too.
                loop {
                    tokio::time::sleep(PANE_POLL).await;
                    if let Some(code) = crate::session::tmux::recorded_status(&tmux.state_dir) {
                        return code;
                    }
                    if let Some(look) = watch.look.take_if(|l| l.is_finished()) {
                        match look.await.map_err(|e| e.to_string()).and_then(|looked| looked) {
                            Ok(pid) => {
                                watch.wrapper = pid;
                                watch.seen = true;
                                watch.failures = 0;
                                watch.next_look = Some(std::time::Instant::now() + SESSION_POLL);
                            }
                            Err(e) => {
                                watch.failures += 1;
                                if watch.failures >= LOOK_FAILURES {
                                    tracing::error!("the agent's tmux session is gone ({e})");
                                    return crate::session::tmux::recorded_status(&tmux.state_dir).unwrap_or(1);
                                }
                                // Asked again at once; a failed ask is no sign of the wrapper.
                                watch.next_look = None;
                            }
                        }
                    }
                    if watch.look.is_none() && watch.next_look.is_none_or(|at| std::time::Instant::now() >= at) {
                        let (t, p) = (tmux.clone(), pane.clone());
                        watch.look = Some(tokio::task::spawn_blocking(move || {
                            let panes = t.panes()?;
                            // A shell pane closed with `exit` comes back, so the session keeps its shell.
                            for (id, _) in panes.iter().filter(|(id, state)| *id != p && state.dead) {
                                let shell = vec![t.user.shell.display().to_string(), "-l".into()];
                                let _ = t.respawn_raw(id, Path::new("."), &shell);
                            }
                            Ok(panes.into_iter().find(|(id, _)| *id == p).and_then(|(_, s)| s.pid))
                        }));
                    }
                    if !watch.seen {
                        continue;
                    }
                    if watch.wrapper.is_none_or(|pid| !crate::sys::alive(pid)) {
                        watch.misses += 1;
                        if watch.misses >= WRAPPER_MISSES {
                            match watch.wrapper {
                                None => tracing::warn!("the agent pane is gone without a recorded exit status"),
                                Some(_) => {
                                    tracing::warn!("the agent pane's process is gone without a recorded exit status")
                                }
                            }
                            return 1;
                        }
                    } else {
                        watch.misses = 0;
                    }
                }
            }
        }
    }

    /// Starts the agent again after it exited.
    pub(crate) fn restart(&mut self, spec: &AgentSpec) -> Result<(), String> {
        match self {
            AgentHandle::Direct(slot) => {
                *slot = Some(spawn(spec).map_err(|e| StartError::from_exec(&spec.argv[0], &e).message)?);
                Ok(())
            }
            AgentHandle::Tmux { tmux, pane, watch } => {
                // A new wrapper: the watch starts over, asking tmux for it at the first tick.
                *watch = PaneWatch::default();
                tmux.respawn(pane, &spec.workdir, &spec.argv)
            }
        }
    }

    /// Why the agent's last start failed, when its pane wrapper recorded one (tmux mode; a
    /// headless start fails in `restart` itself).
    pub(crate) fn start_error(&self) -> Option<String> {
        match self {
            AgentHandle::Direct(_) => None,
            AgentHandle::Tmux { tmux, .. } => crate::session::tmux::recorded_error(&tmux.state_dir),
        }
    }

    /// The agent's pid (the leader of its process group), when it runs.
    pub(crate) fn pid(&self) -> Option<i32> {
        match self {
            AgentHandle::Direct(slot) => slot.as_ref().and_then(|c| c.id()).map(|p| p as i32),
            AgentHandle::Tmux { tmux, pane, .. } => tmux.pane(pane).ok().filter(|s| !s.dead).and_then(|s| s.pid),
        }
    }

    /// Reaps a direct child that already exited (during the graceful stop).
    pub(crate) fn try_reap(&mut self) {
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
