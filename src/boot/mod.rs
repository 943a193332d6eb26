//! The boot, as one stage script read top to bottom. Each stage is a paragraph: why it sits
//! where it does, the call, and an error that names the operation and what to do about it.
//! A failed stage ends the boot; the agent never starts after one.
//!
//! Stages that later work adds (credentials, clone) slot in at the places the design gives
//! them: credentials before `readonly_root`, the clone before `readiness`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::config::secrets::Secrets;
use crate::config::{self, Config, ConfigSource};
use crate::egress::firewall;
use crate::egress::probe;
use crate::egress::{self, Egress};
use crate::mounts::{self, TmpfsSpec};
use crate::session::agent::{self, AgentSpec};
use crate::session::tmux::Tmux;
use crate::session::users::{self, AgentUser};
use crate::state::control::{self, Live};
use crate::state::report::Report;
use crate::sys::command::{self, BOOT};

/// Set in the supervisor's environment to the reaper's pid, so `cordon supervise` can refuse
/// to run without a reaper above it (the sanity stage).
pub const REAPER_ENV: &str = "CORDON_REAPER_PID";

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

/// A stage failed, or cordon was asked to stop during it; the report holds which and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StageFailed {
    Failed,
    Stopped,
}

/// The boot ended at a stage (the report holds which and why). Carries the supervisor
/// settings in force: the configured ones, or the defaults when the config itself failed.
#[derive(Debug)]
pub struct BootFailed {
    pub supervisor: config::Supervisor,
    /// The stage did not fail: cordon was asked to stop (`command::BOOT`) while it ran.
    pub stopped: bool,
}

/// What a completed boot hands to the supervisor: the running agent and how to restart it,
/// and the egress machinery (None when `network.enforce = false`).
pub struct Booted {
    pub config: Config,
    pub agent: AgentSpec,
    pub handle: agent::AgentHandle,
    pub egress: Option<Arc<Egress>>,
}

/// Runs one stage: records its start, outcome and duration in the report. A stop request
/// (`command::BOOT`, set by the supervisor on SIGTERM/SIGINT) ends the boot at the next stage,
/// or at once when the stage is running a command, which is killed; a stage that fails after a
/// stop request is recorded as stopped, since its error is most likely the kill.
fn stage<T>(
    report: &mut Report,
    name: &str,
    f: impl FnOnce(&mut Report) -> Result<(T, String), StageError>,
) -> Result<T, StageFailed> {
    report.begin(name);
    if BOOT.is_requested() {
        report.stopped(STOP_REQUESTED);
        return Err(StageFailed::Stopped);
    }
    match f(report) {
        Ok((value, detail)) => {
            report.ok(detail);
            Ok(value)
        }
        Err(_) if BOOT.is_requested() => {
            report.stopped(STOP_REQUESTED);
            Err(StageFailed::Stopped)
        }
        Err(e) => {
            report.fail(e.error, e.hint);
            Err(StageFailed::Failed)
        }
    }
}

const STOP_REQUESTED: &str = "cordon was asked to stop (SIGTERM or SIGINT)";

/// Boots the container into its locked-down state and starts the agent. `env` is the
/// environment cordon was started with, already removed from the process (see
/// `supervisor::take_environment`). Must run inside the async runtime (the agent is a tokio
/// child), on a thread that may block: the supervisor runs it with `spawn_blocking` and ends it
/// early through `command::BOOT`.
///
/// `live` is what the control socket answers from; the boot fills it in as stages complete.
pub fn boot(
    source: &ConfigSource,
    env: &BTreeMap<String, String>,
    report: &mut Report,
    live: &Arc<Live>,
) -> Result<Booted, BootFailed> {
    let mut supervisor = config::Supervisor::default();
    stages(source, env, report, live, &mut supervisor)
        .map_err(|end| BootFailed { supervisor, stopped: end == StageFailed::Stopped })
}

fn stages(
    source: &ConfigSource,
    env: &BTreeMap<String, String>,
    report: &mut Report,
    live: &Arc<Live>,
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
        let config = source.load(env).map_err(|e| {
            let hint = if e.from_environment() {
                "fix the environment variable"
            } else {
                "fix the file, then check it with `cordon check --config FILE`"
            };
            StageError::new(e.to_string(), Some(hint.into()))
        })?;
        let entries = config::load_allowlist(&config).map_err(|errors| {
            StageError::new(
                errors.join("; "),
                Some("each line must be a name (example.com) or a wildcard below one (*.example.com)".into()),
            )
        })?;
        let from = if source.path.exists() { source.path.display().to_string() } else { "built-in defaults".into() };
        let detail = format!("{from}, {} allowlist entries", entries.len());
        Ok(((config, entries), detail))
    });
    let state_dir = config
        .as_ref()
        .map_or_else(|_| PathBuf::from(config::DEFAULT_STATE_DIR), |(c, _)| c.supervisor.state_dir.clone());

    // 3. State directory. Next, so every failure from here on (and the one above) is visible
    //    in the boot log and state file to an operator who attaches.
    stage(report, "state", |report| {
        let warning = mounts::prepare_state_dir(&state_dir).map_err(|e| StageError::from_error(&e, e.hint()))?;
        report.attach_dir(&state_dir);
        if let Some(w) = warning {
            report.warn(w);
        }
        let listener = control::bind(&state_dir).map_err(|e| {
            StageError::new(format!("cannot bind the control socket in {}: {e}", state_dir.display()), None)
        })?;
        control::serve(listener, live.clone());
        Ok(((), format!("{}, control socket ready", state_dir.display())))
    })?;
    let (config, entries) = config?;
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
        let user = users::resolve_agent_with_groups(&config.agent.user, &config.agent.groups).map_err(|e| {
            StageError::from_error(&e, Some("create the agent user in the image (useradd), or set agent.user".into()))
        })?;
        let mut specs = Vec::new();
        for m in &config.tmpfs.0 {
            let (uid, gid) = users::resolve_owner(&m.owner_for(&user.home), &user)
                .map_err(|e| StageError::from_error(&e, Some(format!("fix the owner of tmpfs {}", m.path))))?;
            specs.push(TmpfsSpec { path: m.path.resolve(&user.home), size: m.size.0, mode: m.mode.0, uid, gid });
        }
        control::grant(&state_dir, user.gid)
            .map_err(|e| StageError::new(format!("cannot open the control socket to the agent's group: {e}"), None))?;
        let _ = live.tmpfs.set(specs.iter().map(|s| s.path.clone()).collect());
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

    // 6. DNS. Before the firewall, which names the listener and the upstreams; and before
    //    anything resolves a name (credentials, the clone), so every lookup from here on goes
    //    through the allowlist. resolv.conf is written now, while the root is still writable.
    //    resolv.conf as found (before cordon rewrites it) also names the resolvers the
    //    firewall refuses to the agent.
    let original = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    let egress = if config.network.enforce {
        Some(stage(report, "dns", |_| {
            let upstreams = egress::upstreams(&config.network, &original).map_err(|e| {
                StageError::new(
                    e,
                    Some("set network.upstream, e.g. [\"1.1.1.1\"], or give the container a resolver".into()),
                )
            })?;
            let egress = Egress::start(&config.network, entries, upstreams).map_err(|e| {
                let hint = match &e {
                    egress::EgressError::Bind { .. } => "another DNS server holds the address; change network.listen",
                    egress::EgressError::Ipset(_) => "cordon needs CAP_NET_ADMIN: docker run --cap-add NET_ADMIN",
                };
                StageError::from_error(&e, Some(hint.into()))
            })?;
            let _ = live.egress.set(egress.clone());
            // Already pointing at cordon only (a read-only root started with --dns 127.0.0.53):
            // nothing to write.
            let ours = egress::parse_nameservers(&original).iter().all(|ns| ns.ip() == config.network.listen.ip())
                && !egress::parse_nameservers(&original).is_empty();
            if !ours {
                write_in_place(Path::new(RESOLV_CONF), &egress::render_resolv_conf(config.network.listen, &original))
                    .map_err(|e| {
                    StageError::new(
                        format!("cannot point {RESOLV_CONF} at cordon's DNS server: {e}"),
                        Some(format!(
                            "with a read-only root, start the container with --dns {} (Kubernetes: dnsPolicy None, \
                                 dnsConfig.nameservers) and set network.upstream, or give it a writable {RESOLV_CONF}",
                            config.network.listen.ip()
                        )),
                    )
                })?;
            }
            let ups: Vec<String> = egress.upstreams.iter().map(ToString::to_string).collect();
            let detail = format!(
                "listening on {}, {} allowlist entries, upstream {}",
                config.network.listen,
                egress.allowlist.len(),
                ups.join(" ")
            );
            Ok((egress, detail))
        })?)
    } else {
        report.begin("dns");
        report.skip("network.enforce = false");
        report.warn("egress is NOT enforced (network.enforce = false): the agent's network is unrestricted".into());
        None
    };

    // 7. Firewall. Default-deny for every uid but root, IPv4 and IPv6, before the agent or
    //    anything it influences can open a socket.
    if let Some(egress) = &egress {
        stage(report, "firewall", |report| {
            // --- name binding (issue 12): the proxy is up before the rules that redirect to it.
            let proxy_port = if config.network.name_binding {
                start_name_binding(egress, &config.network)?;
                Some(config.network.proxy_port)
            } else {
                report.warn(
                    "name binding is OFF (network.name_binding = false): connections to admitted addresses are \
                     address-based, any name sharing an address is reachable"
                        .into(),
                );
                None
            };
            // --- end name binding
            let plan = firewall::Plan {
                listen: config.network.listen,
                resolvers: egress::resolver_addresses(&original, &egress.upstreams, config.network.listen),
                ports: config.network.ports.clone(),
                extra_ports: entries_extra_ports(&egress.allowlist),
                raw_ports: egress.allowlist.raw_ports().into_iter().collect(),
                loopback_ports: config.network.loopback_ports.clone(),
                proxy_port,
            };
            let default_timeout =
                u32::try_from((config.network.min_ttl.0 + config.network.grace.0).as_secs()).unwrap_or(u32::MAX);
            firewall::apply(&plan, default_timeout).map_err(|e| StageError::from_error(&e, Some(e.hint())))?;
            let ports: Vec<String> = plan.ports.iter().chain(&plan.extra_ports).map(u16::to_string).collect();
            let raw: Vec<String> = plan.raw_ports.iter().map(|p| format!(",{p} (address-based)")).collect();
            let checked = match plan.proxy_port {
                Some(p) => format!(" name-checked by the proxy on port {p}"),
                None => String::new(),
            };
            Ok((
                (),
                format!(
                    "IPv4 and IPv6 default-deny for uids 1-4294967294; TCP {}{checked}{} to admitted addresses; \
                     {} resolver addresses refused; loopback ports: {}",
                    ports.join(","),
                    raw.concat(),
                    plan.resolvers.len(),
                    if plan.loopback_ports.is_empty() {
                        "none".to_string()
                    } else {
                        plan.loopback_ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                    }
                ),
            ))
        })?;
    }

    // 8. Credentials. After the tmpfs mounts (the files go on the home tmpfs) and the
    //    firewall; before the read-only root and before the clone, which needs them.
    let workdir = if config.repo.url.is_some() { config.repo.dest.clone() } else { config.agent.workdir.clone() };
    stage(report, "credentials", |_| {
        let exe = std::env::current_exe()
            .map_err(|e| StageError::new(format!("cannot find cordon's own binary: {e}"), None))?;
        let summary = crate::session::credentials::write_all(&config, &user, secrets.get("GH_PAT"), &workdir, &exe)
            .map_err(|e| {
                StageError::new(
                    format!("cannot write the credential files in {}: {e}", user.home.display()),
                    Some("the agent's home must be writable (a tmpfs, by default)".into()),
                )
            })?;
        Ok(((), summary))
    })?;

    // 9. Read-only root. After everything boot writes outside the tmpfs mounts, before
    //    anything the agent influences runs. Per mount point, then proven with a write.
    if config.filesystem.readonly_root {
        stage(report, "readonly_root", |report| {
            let writable = writable_paths(&config, &user, &state_dir);
            let mountinfo = mounts::read_mountinfo().map_err(|e| StageError::from_error(&e, None))?;
            let plan = mounts::plan_readonly(&mountinfo, &writable);
            let done = mounts::apply_readonly(&plan).map_err(|e| StageError::from_error(&e, e.hint()))?;
            mounts::verify_readonly(&done.remounted).map_err(|e| StageError::from_error(&e, None))?;
            for w in done.warnings {
                report.warn(w);
            }
            Ok(((), format!("{} mounts read-only, write to / fails with EROFS", done.remounted.len())))
        })?;
    } else {
        report.begin("readonly_root");
        report.skip("filesystem.readonly_root = false");
    }

    // 10. Clone. After the lockdown, so it goes through the firewall like everything the agent
    //     does; as the agent, with the credential helper; before the readiness probes.
    if let Some(url) = &config.repo.url {
        stage(report, "clone", |report| {
            let mut cmd = users::unprivileged_command("git", &user);
            cmd.args(crate::session::clone::clone_args(
                url,
                &config.repo.dest,
                config.repo.branch.as_deref(),
                config.repo.depth,
            ))
            .envs([
                ("HOME", user.home.display().to_string()),
                ("PATH", users::AGENT_PATH.to_string()),
                ("GIT_TERMINAL_PROMPT", "0".to_string()),
                ("LANG", "C.UTF-8".to_string()),
            ])
            .current_dir(config.repo.dest.parent().unwrap_or(Path::new("/")));
            crate::session::clone::run(cmd, config.repo.timeout.0, |line| report.progress(&format!("clone: {line}"))).map_err(|e| {
                StageError::new(
                    e,
                    Some("check REPO_URL and that GH_PAT can read the repository (fine-grained tokens: Contents); the host must be in the allowlist".into()),
                )
            })?;
            let branch = config.repo.branch.as_deref().unwrap_or("the default branch");
            Ok(((), format!("{url} ({branch}) into {}", config.repo.dest.display())))
        })?;
    } else {
        report.begin("clone");
        report.skip("no repo.url (REPO_URL)");
    }

    // 11. Readiness. After the lockdown is complete, before the agent: prove it from the
    //     agent's own uid, positively and negatively. A probe that fails fails the boot.
    if let Some(egress) = &egress {
        stage(report, "readiness", |_| {
            let spec = probe::spec(egress.listen, &egress.upstreams, config.network.probe.clone());
            let results = run_probes(&spec, &user)?;
            let failed: Vec<String> =
                results.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.probe, r.detail)).collect();
            if !failed.is_empty() {
                return Err(StageError::new(
                    format!("{} of {} egress probes failed: {}", failed.len(), results.len(), failed.join("; ")),
                    Some(
                        "the firewall or DNS server is not enforcing the policy; see the boot log and `cordon status`"
                            .into(),
                    ),
                ));
            }
            Ok(((), format!("{} probes passed as uid {}", results.len(), user.uid)))
        })?;
        egress.spawn_refresh(config.network.refresh_interval.0);
    }

    // 12. Session. Last: the agent starts only on a fully locked-down container.
    let (agent, handle) = stage(report, "session", |_| {
        if !workdir.is_dir() {
            return Err(StageError::new(
                format!("the work directory {} is not a directory", workdir.display()),
                Some("set agent.workdir (or repo.dest) to a directory on a tmpfs, e.g. /workspace".into()),
            ));
        }
        let spec = AgentSpec {
            argv: config.agent.command.clone(),
            env: agent::agent_env(&user, env, &secrets, &config.agent.env),
            user: user.clone(),
            workdir: workdir.clone(),
        };
        // A name that exists nowhere fails here; every other exec failure (no x bit, a missing
        // #! interpreter) fails at the exec itself, which both modes wait for, and gives the
        // same error and shell status.
        let program = &spec.argv[0];
        let start_error = |e: users::StartError| StageError::new(e.message.clone(), Some(e.hint()));
        if users::find_program(program).is_none() {
            return Err(start_error(users::StartError::not_found(program)));
        }
        // The first prompt (CLAUDE_PROMPT) is the last argument of the first start only: a
        // restarted agent must not redo the task. It is never logged.
        let mut first = spec.clone();
        first.argv.extend(config.agent.prompt.iter().cloned());
        if config.agent.tmux {
            let tmux = Tmux::prepare(&state_dir, &user, spec.env.clone(), &config.agent.session)
                .map_err(|e| StageError::new(format!("cannot prepare the tmux socket directory: {e}"), None))?;
            let pane = tmux.start(&workdir, &first.argv, config.agent.shell_pane).map_err(|e| match e {
                crate::session::tmux::PaneStartError::Agent(e) => start_error(e),
                crate::session::tmux::PaneStartError::Tmux(e) => {
                    StageError::new(format!("cannot start the agent's tmux session: {e}"), None)
                }
            })?;
            let _ = live.tmux.set(tmux.clone());
            let detail = format!(
                "tmux session `{}` on {}, agent `{}` as {} (uid {})",
                config.agent.session,
                tmux.socket.display(),
                spec.argv[0],
                user.name,
                user.uid
            );
            Ok(((spec, agent::AgentHandle::Tmux { tmux, pane }), detail))
        } else {
            let child = agent::spawn(&first).map_err(|e| start_error(users::StartError::from_exec(program, &e)))?;
            let detail = format!(
                "agent `{}` pid {} as {} (uid {}), headless",
                spec.argv[0],
                child.id().unwrap_or(0),
                user.name,
                user.uid
            );
            Ok(((spec, agent::AgentHandle::Direct(Some(child))), detail))
        }
    })?;

    Ok(Booted { config, agent, handle, egress })
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Rewrites a file's content in place (truncate and write), because /etc/resolv.conf is often a
/// bind mount (Docker, Kubernetes) that a rename cannot replace.
fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).create(true).open(path)?;
    f.write_all(text.as_bytes())
}

/// Name binding (issue 12): binds the proxy's loopback listeners, builds its policy (the
/// allowlist, ports included, and the DNS answers' bindings) and starts it; the context goes
/// into `egress` for `status`. Fails closed: without the proxy the firewall stage fails.
fn start_name_binding(egress: &Arc<Egress>, network: &config::Network) -> Result<(), StageError> {
    use crate::egress::namebound::{self, proxy};
    let port = network.proxy_port;
    let listen = |addr: std::net::SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    };
    let hint = || {
        Some(format!(
            "another process holds loopback port {port}: set network.proxy_port to a free port (or, for debugging \
             only, network.name_binding = false)"
        ))
    };
    let v4 = listen((std::net::Ipv4Addr::LOCALHOST, port).into()).map_err(|e| {
        StageError::new(format!("cannot bind the name-checking proxy to 127.0.0.1:{port}: {e}"), hint())
    })?;
    // No ::1 means no IPv6 in this container, so nothing of that family to redirect; had there
    // been, its redirected connections would be refused (fail closed), never let through.
    let v6 = match listen((std::net::Ipv6Addr::LOCALHOST, port).into()) {
        Ok(l) => Some(l),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => None,
        Err(e) => {
            return Err(StageError::new(format!("cannot bind the name-checking proxy to [::1]:{port}: {e}"), hint()));
        }
    };
    let allowlist = egress.allowlist.clone();
    let ports = network.ports.clone();
    let allowlisted = move |name: &str, dst_port: u16| {
        allowlist.lookup(name).is_some_and(|r| {
            (r.default_ports && ports.contains(&dst_port))
                || r.extra_ports.contains(&dst_port)
                || r.raw_ports.contains(&dst_port)
        })
    };
    let policy = proxy::BoundNamePolicy::new(Box::new(allowlisted), egress.bindings.clone());
    let ctx = Arc::new(proxy::Ctx::new(
        Box::new(policy),
        Box::new(proxy::KernelOriginalDestination),
        vec![80],
        proxy::Limits::default(),
    ));
    let _ = egress.proxy.set(ctx.clone());
    // Runs until cordon stops; `status` watches the handle.
    let _ = egress.proxy_task.set(namebound::start(v4, v6, ctx));
    Ok(())
}

fn entries_extra_ports(list: &crate::config::allowlist::Allowlist) -> Vec<u16> {
    list.extra_ports().into_iter().collect()
}

/// Runs the probes in a child that is the agent user, with the agent's privileges.
fn run_probes(spec: &probe::Spec, user: &AgentUser) -> Result<Vec<probe::ProbeResult>, StageError> {
    let exe =
        std::env::current_exe().map_err(|e| StageError::new(format!("cannot find cordon's own binary: {e}"), None))?;
    let spec_json = serde_json::to_string(spec).expect("probe spec serialises");
    let mut cmd = users::unprivileged_command(&exe, user);
    cmd.args(["probe", "--spec", &spec_json]).env("PATH", users::AGENT_PATH).current_dir("/");
    let out = command::output(cmd, command::Options::new(probe::deadline(spec)))
        .map_err(|e| StageError::new(format!("cannot run the readiness probes: {}", error_chain(&e)), None))?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        StageError::new(
            format!(
                "the readiness probes gave no result ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            None,
        )
    })
}

/// Paths that stay writable under the read-only root: the tmpfs mounts, the configured
/// writable mounts and the state directory.
fn writable_paths(config: &Config, user: &AgentUser, state_dir: &Path) -> Vec<PathBuf> {
    let tmpfs = config.tmpfs.0.iter().map(|m| &m.path);
    let mut paths: Vec<PathBuf> = tmpfs.chain(&config.filesystem.writable).map(|p| p.resolve(&user.home)).collect();
    paths.push(state_dir.to_path_buf());
    paths
}
