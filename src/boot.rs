//! The boot, as one stage script read top to bottom. Each stage is a paragraph: why it sits
//! where it does, the call, and an error that names the operation and what to do about it.
//! A failed stage ends the boot; the agent never starts after one.
//!
//! Stages that later work adds (DNS, firewall, credentials, clone, readiness) slot in at the
//! places the design gives them, between `filesystem` and `readonly_root` / `session`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::agent::{self, AgentSpec};
use crate::allowlist;
use crate::config::{self, Config};
use crate::mounts::{self, TmpfsSpec};
use crate::reaper::REAPER_ENV;
use crate::report::Report;
use crate::secrets::Secrets;
use crate::users::{self, AgentUser};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Named by `--config` or `CORDON_CONFIG`: then a missing file is an error.
    pub explicit: bool,
}

/// A stage's failure: the error chain in one line and, where there is one, the fix.
#[derive(Debug)]
pub struct StageError {
    pub error: String,
    pub hint: Option<String>,
}

impl StageError {
    pub fn new(error: impl Into<String>, hint: Option<String>) -> StageError {
        StageError { error: error.into(), hint }
    }

    /// From any error, with its `source()` chain joined by ": ".
    pub fn from_error(e: &dyn std::error::Error, hint: Option<String>) -> StageError {
        StageError { error: error_chain(e), hint }
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// A stage failed; the report holds which and why.
#[derive(Debug)]
struct StageFailed;

/// The boot stopped at a stage (the report holds which and why). Carries the supervisor
/// settings in force: the configured ones, or the defaults when the config itself failed.
#[derive(Debug)]
pub struct BootFailed {
    pub supervisor: config::Supervisor,
}

/// What a completed boot hands to the supervisor: the running agent and how to restart it.
pub struct Booted {
    pub config: Config,
    pub agent: AgentSpec,
    pub child: tokio::process::Child,
}

/// Runs one stage: records its start, outcome and duration in the report.
fn stage<T>(
    report: &mut Report,
    name: &str,
    f: impl FnOnce(&mut Report) -> Result<(T, String), StageError>,
) -> Result<T, StageFailed> {
    report.begin(name);
    match f(report) {
        Ok((value, detail)) => {
            report.ok(detail);
            Ok(value)
        }
        Err(e) => {
            report.fail(e.error, e.hint);
            Err(StageFailed)
        }
    }
}

/// Boots the container into its locked-down state and starts the agent. `env` is the
/// environment cordon was started with, already removed from the process (see
/// `supervisor::take_environment`). Must run inside the async runtime (the agent is a tokio
/// child).
pub fn boot(source: &ConfigSource, env: &BTreeMap<String, String>, report: &mut Report) -> Result<Booted, BootFailed> {
    let mut supervisor = config::Supervisor::default();
    stages(source, env, report, &mut supervisor).map_err(|StageFailed| BootFailed { supervisor })
}

fn stages(
    source: &ConfigSource,
    env: &BTreeMap<String, String>,
    report: &mut Report,
    supervisor: &mut config::Supervisor,
) -> Result<Booted, StageFailed> {
    // 1. Sanity. First, because every later stage needs root, and the supervisor must sit
    //    under a reaper (PID 1 or subreaper) or exit statuses and orphans would go astray.
    stage(report, "sanity", |_| {
        if !nix::unistd::geteuid().is_root() {
            return Err(StageError::new(
                "cordon init must run as root",
                Some("it mounts, sets up the firewall and drops privileges for the agent; start the container as root (no USER in the image, or --user 0)".into()),
            ));
        }
        let parent = nix::unistd::getppid().as_raw().to_string();
        if env.get(REAPER_ENV) != Some(&parent) {
            return Err(StageError::new(
                "the supervisor was started without cordon's reaper above it",
                Some("run `cordon init`, not `cordon supervise`".into()),
            ));
        }
        Ok(((), format!("uid 0, reaper pid {parent}")))
    })?;

    // 2. Config. Before any side effect: a mistake in the file must stop the boot while the
    //    container is still untouched. If it fails, the state directory is the default one,
    //    so that `attach` and `status` can still show why.
    let config = stage(report, "config", |_| {
        let mut config = Config::load(&source.path, source.explicit).map_err(|e| {
            StageError::new(e.to_string(), Some("fix the file, then check it with `cordon check --config FILE`".into()))
        })?;
        config.apply_env(env);
        let entries = load_allowlist(&config).map_err(|errors| {
            StageError::new(
                errors.join("; "),
                Some("each line must be a name (example.com) or a wildcard below one (*.example.com)".into()),
            )
        })?;
        let from = if source.path.exists() { source.path.display().to_string() } else { "built-in defaults".into() };
        Ok((config, format!("{from}, {} allowlist entries", entries.len())))
    });
    let state_dir =
        config.as_ref().map_or_else(|_| PathBuf::from(config::DEFAULT_STATE_DIR), |c| c.supervisor.state_dir.clone());

    // 3. State directory. Next, so every failure from here on (and the one above) is visible
    //    in the boot log and state file to an operator who attaches.
    stage(report, "state", |report| {
        mounts::prepare_state_dir(&state_dir).map_err(|e| StageError::from_error(&e, e.hint()))?;
        report.attach_dir(&state_dir);
        Ok(((), state_dir.display().to_string()))
    })?;
    let config = config?;
    *supervisor = config.supervisor.clone();

    // 4. Secrets. Checked before the filesystem changes, so a missing token fails fast with
    //    every missing name at once. Values were already taken out of the environment.
    let secrets = stage(report, "secrets", |_| {
        let secrets = Secrets::check(&config.secrets.required, &config.secrets.optional, env);
        if let Some(problem) = secrets.problem_report() {
            return Err(StageError::new(problem, Some(secrets.problem_hint())));
        }
        let n = secrets.values.len();
        Ok((secrets, format!("{n} present")))
    })?;

    // 5. Filesystem. tmpfs for everything the agent writes, before anything is written there
    //    (credentials, the clone), and while the root can still take new mount points.
    let user = stage(report, "filesystem", |report| {
        let user = users::resolve_agent(&config.agent.user).map_err(|e| {
            StageError::from_error(&e, Some("create the agent user in the image (useradd), or set agent.user".into()))
        })?;
        let mut specs = Vec::new();
        for m in &config.tmpfs.0 {
            let (uid, gid) = users::resolve_owner(&m.owner, &user)
                .map_err(|e| StageError::from_error(&e, Some(format!("fix the owner of tmpfs {}", m.path))))?;
            specs.push(TmpfsSpec { path: m.path.resolve(&user.home), size: m.size.0, mode: m.mode.0, uid, gid });
        }
        let mountinfo = mounts::read_mountinfo().map_err(|e| StageError::from_error(&e, None))?;
        let plan = mounts::plan_tmpfs(specs, &mountinfo).map_err(|e| StageError::from_error(&e, e.hint()))?;
        for step in &plan {
            tracing::debug!(%step, "tmpfs");
        }
        for warning in mounts::apply_tmpfs(&plan).map_err(|e| StageError::from_error(&e, e.hint()))? {
            report.warn(warning);
        }
        for link in &config.filesystem.links {
            mounts::make_link(&link.path.resolve(&user.home), &link.target)
                .map_err(|e| StageError::from_error(&e, None))?;
        }
        let adopted = plan.iter().filter(|s| matches!(s, mounts::TmpfsStep::Adopt { .. })).count();
        Ok((
            user,
            format!(
                "{} tmpfs mounted, {adopted} provided by the runtime, {} links",
                plan.len() - adopted,
                config.filesystem.links.len()
            ),
        ))
    })?;

    // 8. Read-only root. After everything boot writes outside the tmpfs mounts, before
    //    anything the agent influences runs. Per mount point, then proven with a write.
    if config.filesystem.readonly_root {
        stage(report, "readonly_root", |_| {
            let writable = writable_paths(&config, &user, &state_dir);
            let mountinfo = mounts::read_mountinfo().map_err(|e| StageError::from_error(&e, None))?;
            let plan = mounts::plan_readonly(&mountinfo, &writable);
            mounts::apply_readonly(&plan).map_err(|e| StageError::from_error(&e, e.hint()))?;
            mounts::verify_readonly(&plan).map_err(|e| StageError::from_error(&e, None))?;
            Ok(((), format!("{} mounts read-only, write to / fails with EROFS", plan.len())))
        })?;
    } else {
        report.begin("readonly_root");
        report.skip("filesystem.readonly_root = false");
    }

    // 11. Session. Last: the agent starts only on a fully locked-down container.
    let (agent, child) = stage(report, "session", |_| {
        let workdir = config.agent.workdir.clone();
        if !workdir.is_dir() {
            return Err(StageError::new(
                format!("agent.workdir {} is not a directory", workdir.display()),
                Some("set agent.workdir to a directory on a tmpfs, e.g. /workspace".into()),
            ));
        }
        let spec = AgentSpec {
            argv: config.agent.command.clone(),
            env: agent::agent_env(&user, env, &secrets),
            user: user.clone(),
            workdir,
        };
        let child = agent::spawn(&spec).map_err(|e| {
            StageError::new(
                format!("cannot start the agent `{}`: {e}", spec.argv[0]),
                Some("install the agent in the image, or set agent.command to a program on the agent's PATH".into()),
            )
        })?;
        let detail =
            format!("agent `{}` pid {} as {} (uid {})", spec.argv[0], child.id().unwrap_or(0), user.name, user.uid);
        Ok(((spec, child), detail))
    })?;

    Ok(Booted { config, agent, child })
}

/// Paths that stay writable under the read-only root: the tmpfs mounts, the configured
/// writable mounts and the state directory.
fn writable_paths(config: &Config, user: &AgentUser, state_dir: &Path) -> Vec<PathBuf> {
    let tmpfs = config.tmpfs.0.iter().map(|m| &m.path);
    let mut paths: Vec<PathBuf> = tmpfs.chain(&config.filesystem.writable).map(|p| p.resolve(&user.home)).collect();
    paths.push(state_dir.to_path_buf());
    paths
}

/// The allowlist file plus inline entries, or every bad line.
pub fn load_allowlist(config: &Config) -> Result<Vec<(allowlist::Entry, String)>, Vec<String>> {
    let path = &config.network.allowlist;
    let mut errors = Vec::new();
    let mut entries = match std::fs::read_to_string(path) {
        Ok(text) => allowlist::parse_file(&text, path).unwrap_or_else(|e| {
            errors.extend(e.iter().map(ToString::to_string));
            vec![]
        }),
        Err(e) => {
            errors.push(format!("{}: cannot read the allowlist: {e}", path.display()));
            vec![]
        }
    };
    match allowlist::parse_inline(&config.network.allow) {
        Ok(more) => entries.extend(more),
        Err(e) => errors.extend(e.iter().map(ToString::to_string)),
    }
    if errors.is_empty() { Ok(entries) } else { Err(errors) }
}
