//! The boot, as one stage script read top to bottom, in the shape of firecracker's jailer
//! `Env::run`: each stage is a paragraph saying why it sits where it does, then the call to the
//! function of the module that owns it. A stage returns its value and a one-line detail, or an
//! error that carries its fix (`fix::Fix`). A failed stage ends the boot; the agent never starts
//! after one. Every stage is reported in every boot: one that does not apply is skipped, with
//! the reason.
//!
//! To add a stage: write it as a function of the module that owns the effect, returning
//! `Result<(value, detail), impl Fix>`; call it here, at the place its preconditions hold, with
//! a paragraph that says why there; add it to docs/architecture.md's list.

mod stage;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::secrets::Secrets;
use crate::config::{self, Config, ConfigSource};
use crate::egress::{self, Egress};
use crate::fix::Problem;
use crate::mounts;
use crate::service::Services;
use crate::session::agent::{self, AgentSpec};
use crate::session::{claude, clone, credentials, devcontainer, persist, users};
use crate::state::control::Live;
use crate::state::report::Report;
use crate::sys::effects::Host;
use stage::{Ended, Stages};

/// Set in the supervisor's environment to the reaper's pid, so `cordon supervise` can refuse
/// to run without a reaper above it (the sanity stage).
pub(crate) const REAPER_ENV: &str = "CORDON_REAPER_PID";

/// The boot ended at a stage (the report holds which and why). Carries the supervisor
/// settings in force: the configured ones, or the defaults when the config itself failed.
#[derive(Debug)]
pub(crate) struct BootFailed {
    pub supervisor: config::Supervisor,
    /// The stage did not fail: cordon was asked to stop (`command::BOOT`) while it ran.
    pub stopped: bool,
}

/// What a completed boot hands to the supervisor: the running agent and how to restart it,
/// and the egress machinery (None when `network.enforce = false`).
pub(crate) struct Booted {
    pub config: Config,
    pub agent: AgentSpec,
    pub handle: agent::AgentHandle,
    pub egress: Option<Arc<Egress>>,
}

/// Boots the container into its locked-down state and starts the agent. `env` is the
/// environment cordon was started with, already out of the process. Runs on a thread that may
/// block, inside the runtime (the services are tasks); the supervisor ends it early through
/// `command::BOOT`. `live` is what the control socket answers from, filled in as stages
/// complete; `services` receives every long-running task a stage starts.
pub(crate) fn boot(
    source: &ConfigSource,
    env: &BTreeMap<String, String>,
    report: &mut Report,
    live: &Arc<Live>,
    services: &Services,
) -> Result<Booted, BootFailed> {
    let mut supervisor = config::Supervisor::default();
    let mut stages = Stages { report };
    run(&mut stages, source, env, live, services, &mut supervisor)
        .map_err(|end| BootFailed { supervisor, stopped: end == Ended::Stopped })
}

fn run(
    s: &mut Stages,
    source: &ConfigSource,
    env: &BTreeMap<String, String>,
    live: &Arc<Live>,
    services: &Services,
    supervisor: &mut config::Supervisor,
) -> Result<Booted, Ended> {
    // Mounts, file changes and the firewall's commands go through this seam; unit tests pass a
    // recorder instead (`sys::effects`).
    let sys = &Host;

    // 1. Sanity. First, because every later stage needs root, and the supervisor must sit
    //    under a reaper (PID 1 or subreaper) or exit statuses and orphans would go astray.
    s.run("sanity", |_| sanity(env))?;

    // 2. Config. Before any side effect: a mistake in the file must stop the boot while the
    //    container is untouched. If it fails, the state directory is the default one.
    let loaded = s.run("config", |_| config::load_for_boot(source, env));
    let state_dir =
        loaded.as_ref().map_or(PathBuf::from(config::DEFAULT_STATE_DIR), |(c, _)| c.supervisor.state_dir.clone());

    // 3. State directory. Next, so every failure from here on (and the one above) is visible in
    //    the boot log, the state file and the control socket to an operator who attaches.
    s.run("state", |report| crate::state::open(&state_dir, report, live, services, sys))?;
    let (config, entries) = loaded?;
    *supervisor = config.supervisor.clone();
    let network = &config.network;

    // 4. Secrets. Before the filesystem changes, so a missing token fails fast, every missing
    //    name at once.
    let secrets = s.run("secrets", |_| Secrets::require(&config.secrets, env))?;

    // 5. Filesystem. tmpfs for everything the agent writes, before anything is written there
    //    (credentials, the clone), while the root can still take new mount points.
    let user = s.run("filesystem", |report| {
        let user = users::agent(&config.agent)?;
        let (tmpfs, detail) = mounts::filesystem(&config, &user, &mut |w| report.warn(w), sys)?;
        crate::state::admit_agent(&state_dir, user.gid, tmpfs, live)?;
        Ok::<_, Problem>((user, detail))
    })?;

    // 5b. Persist. The agent's chosen home paths, bind-mounted from the volume: right after
    //     the home tmpfs exists, before the credentials stage writes into it (a mount there
    //     later would hide what it wrote) and before anything runs as the agent (the clone's
    //     git), so no agent-made symlink can appear in the home while root works in it.
    let persisted = match persist::Plan::of(&config.agent) {
        Some(plan) => s.run("persist", |_| persist::stage(&plan, &user))?,
        None => {
            s.skip("persist", "no agent.persist");
            Vec::new()
        }
    };

    // 6. DNS. Before the firewall, which names the listener and the upstreams; before anything
    //    resolves a name (credentials, the clone), so every lookup from here on goes through the
    //    allowlist; while resolv.conf can still be written. resolv.conf as found also names the
    //    resolvers the firewall refuses to the agent.
    let resolv_conf = std::fs::read_to_string(egress::RESOLV_CONF).unwrap_or_default();
    let egress = if network.enforce {
        let (egress, server) = s.run("dns", |_| egress::start(network, entries, &resolv_conf))?;
        services.add(server);
        let _ = live.egress.set(egress.clone());
        // `cordon reload` and SIGHUP read the same configuration file again, for its
        // network.allowlist file and network.allow entries only; a file (or its directory)
        // another uid could write is refused then, and said now: a previous run's agent may
        // have edited it.
        for problem in config::trust::reload_sources(&source.path, &config) {
            s.report.warn(format!("{problem}; `cordon reload` and SIGHUP will refuse it"));
        }
        let (source, env) = (source.clone(), env.clone());
        egress.policy.set_source(Box::new(move || {
            use config::trust::{not_roots, resolve};
            // Each file is judged, then read at the path it resolved to when judged.
            if let Some(problem) = not_roots(&source.path, "the configuration file") {
                return Err(vec![problem]);
            }
            let resolved = config::ConfigSource { path: resolve(&source.path), ..source.clone() };
            let mut config = resolved.load(&env).map_err(|e| vec![e.to_string()])?;
            if let Some(problem) = not_roots(&config.network.allowlist, "network.allowlist") {
                return Err(vec![problem]);
            }
            config.network.allowlist = resolve(&config.network.allowlist);
            config::load_allowlist(&config)
        }));
        if network.mode == config::Mode::Observe {
            s.report.warn(
                "egress is NOT enforced (network.mode = \"observe\"): names outside the allowlist are resolved and \
                 admitted on the default ports, and recorded for `cordon policy suggest`"
                    .into(),
            );
        }
        // The journal's events file, if configured: opened now, as root, before the read-only
        // root; a failure leaves the journal in memory only (status still shows it).
        if let Some(path) = &config.events.path
            && let Err(e) = egress.journal.write_events_to(path, config.events.max_size.0)
        {
            s.report.warn(format!(
                "cannot open the events file {} (events.path): {e}; refusals are journalled in memory only",
                path.display()
            ));
        }
        Some(egress)
    } else {
        s.skip("dns", "network.enforce = false");
        s.report.warn("egress is NOT enforced (network.enforce = false): the agent's network is unrestricted".into());
        None
    };

    // 7. Firewall. Default-deny for every uid but root, IPv4 and IPv6, before the agent or
    //    anything it influences can open a socket. With name binding, the name-checking proxy
    //    listens first: the rules redirect the agent's connections on the name-checked ports to
    //    it the moment they exist.
    match &egress {
        Some(egress) => {
            let metrics = config.metrics.listen;
            let (proxy, metrics) = s.run("firewall", |r| {
                let (proxy, detail) =
                    egress::lock_down(network, egress, &resolv_conf, metrics.map(|m| m.port()), sys, &mut |w| {
                        r.warn(w)
                    })?;
                // 7b. The metrics listener (`[metrics]`), only now that the rule refusing its
                //     port to the agent's uids is in, and before anything runs as the agent.
                let Some(listen) = metrics else { return Ok::<_, Problem>(((proxy, None), detail)) };
                let served = crate::state::metrics::start(listen, live.clone())?;
                Ok(((proxy, Some(served)), format!("{detail}; metrics on http://{listen}/metrics")))
            })?;
            proxy.into_iter().chain(metrics).for_each(|p| services.add(p));
        }
        None => s.skip("firewall", "network.enforce = false"),
    }

    // 8. Credentials. After the tmpfs mounts (the files go on the home tmpfs) and the
    //    firewall; before the read-only root and before the clone, which needs them.
    let workdir = if config.repo.url.is_some() { config.repo.dest.clone() } else { config.agent.workdir.clone() };
    s.run("credentials", |_| credentials::stage(&config, &user, secrets.get("GH_PAT"), &workdir))?;

    // 9. Read-only root. After everything the boot writes outside the tmpfs mounts, before
    //    anything the agent influences runs.
    if config.filesystem.readonly_root {
        let mut writable = writable_paths(&config, &user, &state_dir);
        writable.extend(persisted);
        s.run("readonly_root", |report| mounts::readonly_root(&writable, &mut |w| report.warn(w), sys))?;
    } else {
        s.skip("readonly_root", "filesystem.readonly_root = false");
    }

    // 10. Clone. After the lockdown, so it goes through the firewall like everything the agent
    //     does; as the agent, with the credential helper; before the readiness probes.
    match &config.repo.url {
        Some(url) => s.run("clone", |report| {
            clone::stage(&config.repo, url, &user, |line| report.progress(&format!("clone: {line}")))
        })?,
        None => s.skip("clone", "no repo.url (REPO_URL)"),
    }

    // 11. Readiness. After the lockdown is complete, before the agent: prove it from the
    //     agent's own uid, positively and negatively. Then the refresh keeps it up to date.
    match &egress {
        Some(egress) => {
            s.run("readiness", |_| egress::probe::stage(egress, network.probe.clone(), &user))?;
            services.add(egress.refresh_service(network.refresh_interval.0));
        }
        None => s.skip("readiness", "network.enforce = false"),
    }

    // 12. Devcontainer. The repository's own lifecycle commands: after the clone (they run in
    //     it) and the readiness probes (so behind the proven firewall, like the agent), before
    //     the agent, which may need what they set up.
    let agent_env = agent::agent_env(&user, env, &secrets, &config.agent.env);
    match devcontainer::applies(&config.devcontainer, &workdir) {
        Ok(file) => s.run("devcontainer", |report| {
            let runner = devcontainer::Runner {
                user: &user,
                workdir: &workdir,
                env: agent_env.clone(),
                timeout: config.devcontainer.timeout.0,
            };
            devcontainer::stage(&file, &runner, &devcontainer::marker(&workdir), &mut |note| match note {
                devcontainer::Note::Progress(line) => report.progress(&format!("devcontainer: {line}")),
                devcontainer::Note::Warn(w) => report.warn(w),
            })
        })?,
        Err(why) => s.skip("devcontainer", &why),
    }

    // 12b. Plugins. Claude Code's plugins, as the agent behind the proven firewall like the
    //      devcontainer commands, before the agent's first start, which loads them. A plugin
    //      that fails to install is a warning: the agent works without it.
    match claude::applies(&config.claude) {
        Ok(()) => s.run("plugins", |report| {
            claude::stage(&config.claude, &user, &agent_env, &mut |note| match note {
                devcontainer::Note::Progress(line) => report.progress(&format!("plugins: {line}")),
                devcontainer::Note::Warn(w) => report.warn(w),
            })
        })?,
        Err(why) => s.skip("plugins", &why),
    }

    // 13. Session. Last: the agent starts only on a fully locked-down container.
    let spec = AgentSpec { argv: config.agent.command.clone(), env: agent_env, user: user.clone(), workdir };
    let (agent, handle, tmux) = s.run("session", |_| agent::start(&config, spec, &state_dir))?;
    if let Some(tmux) = tmux {
        if network.enforce && network.mode == config::Mode::Observe {
            // Said where the operator looks: the session's own status line.
            if let Err(e) = tmux.set_status_right(crate::session::tmux::OBSERVE_STATUS) {
                s.report.warn(format!("cannot say in the tmux status line that egress is not enforced: {e}"));
            }
        }
        let _ = live.tmux.set(tmux);
    }

    Ok(Booted { config, agent, handle, egress })
}

/// The `sanity` stage: root, under cordon's reaper.
fn sanity(env: &BTreeMap<String, String>) -> crate::fix::StageResult<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Problem::new("cordon init must run as root").with_fix(
            "it mounts, sets up the firewall and drops privileges for the agent; start the container as root (no \
             USER in the image, or --user 0)",
        ));
    }
    let parent = nix::unistd::getppid().as_raw().to_string();
    if env.get(REAPER_ENV) != Some(&parent) {
        return Err(Problem::new("the supervisor was started without cordon's reaper above it")
            .with_fix("run `cordon init`, not `cordon supervise`"));
    }
    Ok(((), format!("uid 0, reaper pid {parent}")))
}

/// Paths that stay writable under the read-only root: the tmpfs mounts, the configured
/// writable mounts and the state directory.
fn writable_paths(config: &Config, user: &users::AgentUser, state_dir: &std::path::Path) -> Vec<PathBuf> {
    let tmpfs = config.tmpfs.0.iter().map(|m| &m.path);
    let mut paths: Vec<PathBuf> = tmpfs.chain(&config.filesystem.writable).map(|p| p.resolve(&user.home)).collect();
    paths.push(state_dir.to_path_buf());
    paths
}
