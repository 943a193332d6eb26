//! The supervisor: the process under the reaper that boots the container and then keeps it
//! running. It owns the agent, forwards signals to it, applies `agent.on_exit`, and performs
//! the graceful stop. Its whole lifecycle is the `supervise` function below.

pub mod idle;
pub mod reaper;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::boot::{self, BootFailed, Booted};
use crate::config::{self, ConfigSource, OnBootFailure, OnExit, Supervisor};
use crate::service::Services;
use crate::session::agent::{self, RestartPolicy};
use crate::state::report::{AgentState, IdleState, Phase, Report};
use crate::sys;

/// PATH for the helper programs cordon runs as root (iptables, git, tmux): system directories
/// only, never one a user can write.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the grace period, how long SIGKILL is repeated until nothing is left: a stop takes at
/// most `stop_grace` + this (but for a process the kernel cannot kill, in uninterruptible sleep).
const KILL_SETTLE: Duration = Duration::from_secs(1);

/// Takes the whole environment out of the process: returned as a map for config and secrets,
/// removed from the process so no child and no library that spawns one can inherit a secret,
/// and zeroed in the process's initial environment block so `/proc/PID/environ` shows none.
/// Runs while the process is single-threaded (before the async runtime is built): `sys`
/// refuses otherwise.
fn take_environment() -> std::io::Result<BTreeMap<String, String>> {
    let (vars, scrubbed) = sys::take_environment()?;
    if let Err(e) = scrubbed {
        tracing::warn!(
            "cannot overwrite the environment block: {e}; /proc/{}/environ still shows it",
            std::process::id()
        );
    }
    let mut env = BTreeMap::new();
    for (k, v) in vars {
        if let (Ok(k), Ok(v)) = (k.into_string(), v.into_string()) {
            env.insert(k, v);
        }
    }
    sys::set_own_path(SYSTEM_PATH)?;
    Ok(env)
}

/// Entry point of `cordon supervise`; returns the exit code.
pub fn run(source: ConfigSource) -> i32 {
    // Threads inherit the mask: held until the handlers exist (see `supervise`). Set again here,
    // through glibc, so that its two internal signals, which the reaper blocks too, are not.
    if let Err(e) = sys::block_signals_for_startup() {
        tracing::error!("cannot block signals: {e}");
        return 1;
    }
    // Default dispositions but for the ones cordon ignores on purpose: the job-control stops
    // (a Ctrl-Z on the terminal reaches the reaper's whole process group, this process too).
    if let Err(e) = sys::reset_signal_dispositions(&sys::IGNORED_IN_CORDON) {
        tracing::error!("cannot reset signal dispositions: {e}");
        return 1;
    }
    // Nothing has started a thread yet; the runtime is built below.
    let env = match take_environment() {
        Ok(env) => env,
        Err(e) => {
            tracing::error!("cannot take the environment out: {e}");
            return 1;
        }
    };
    if let Err(e) = sys::set_non_dumpable() {
        tracing::error!("cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}");
        return 1;
    }
    // One malloc arena: the default (one per contending thread, up to 8 per core) keeps each
    // thread's freed memory resident apart. Two arenas and a 4,096-entry answer cache measured
    // 1.8 MiB more RSS with 10,000 admitted addresses (docs/benchmarks.md). The DNS fast path
    // allocates nothing, so the shared arena's lock is taken only off it.
    sys::limit_malloc_arenas(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(supervise(source, env))
}

/// How long each service (control socket, DNS server, refresh, proxy) gets to stop at the end.
const SERVICE_STOP: Duration = Duration::from_secs(1);

/// The supervisor's life, then its services stopped in reverse order of start: the control
/// socket last, so `status` answers until the end.
async fn supervise(source: ConfigSource, env: BTreeMap<String, String>) -> i32 {
    let services = Services::default();
    let code = supervise_with(source, env, &services).await;
    services.stop_all(SERVICE_STOP).await;
    code
}

async fn supervise_with(source: ConfigSource, env: BTreeMap<String, String>, services: &Services) -> i32 {
    // Handlers first, then unblock: signals the reaper forwarded while we started were held
    // pending by the mask we inherited, and are delivered now, to the handlers.
    let mut signals = match install_signal_handlers() {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    if let Err(e) = sys::unblock_all_signals() {
        tracing::error!("cannot unblock signals: {e}");
        return 1;
    }
    let init_mode = if nix::unistd::getppid() == Pid::from_raw(1) { "pid1" } else { "subreaper" };
    let report = Report::new(init_mode);
    let live = crate::state::control::Live::new(report.subscribe());
    // Before any child is started: the descriptor becomes close-on-exec here.
    if let Some(reaped) = env.get(sys::REAPED_FD_ENV).and_then(|fd| sys::ReapedCount::inherited(fd)) {
        let _ = live.reaped.set(reaped);
    }

    let (mut report, booted, stop_requested) =
        match boot_until_stopped(source, env, report, live, services.clone(), &mut signals).await {
            BootEnd::Returned { report, booted, stop_requested } => (report, booted, stop_requested),
            BootEnd::Panicked => return 1,
            BootEnd::Stuck => {
                // The boot thread still owns the report; a fresh one is in memory only (it has no
                // state directory), so the state file keeps the boot's last record.
                stop_all(config::Supervisor::default().stop_grace.0, None, &mut Report::new(init_mode)).await;
                return 0;
            }
        };
    let Booted { config, agent: spec, mut handle, egress } = match booted {
        Ok(booted) => booted,
        Err(BootFailed { supervisor, stopped: true }) => {
            // A stop asked for during the boot is a graceful stop: exit 0, as after a TERM
            // when ready, with the stage it interrupted kept in the final state.
            let stopped = report.state.reason.clone();
            stop_all(supervisor.stop_grace.0, None, &mut report).await;
            report.set_phase(Phase::Stopped, stopped);
            return 0;
        }
        Err(BootFailed { supervisor, stopped: false }) => {
            return hold_or_exit(&supervisor, &mut report, &mut signals, stop_requested).await;
        }
    };
    let grace = config.supervisor.stop_grace.0;
    if stop_requested {
        // The boot completed as the stop request came in.
        stop_all(grace, Some(&mut handle), &mut report).await;
        return 0;
    }
    // The services (DNS server, refresh) are `services`'; egress is what they share, and what
    // SIGHUP reloads.
    let mut state =
        AgentState { pid: handle.pid().map(|p| p as u32), running: true, restarts: 0, last_exit: None, idle: None };
    report.set_agent(state.clone());
    report.ready();
    // The boot is over: its code (clap, TOML, mounts, the firewall, the clone) need not stay
    // mapped. What the services run comes back on first use (sys::memory; docs/benchmarks.md).
    match sys::memory::release_own_code() {
        Ok(released) => {
            tracing::debug!(mappings = released.mappings, kib = released.kib, "gave back the boot's resident code")
        }
        Err(e) => tracing::debug!("cannot give back the boot's resident code: {e}"),
    }

    // Idle stop (supervisor.idle_stop; see idle.rs): a sample now and then, shown in `status`.
    let tmux = match &handle {
        agent::AgentHandle::Tmux { tmux, .. } => Some(tmux.clone()),
        _ => None,
    };
    let idle_stop = config.supervisor.idle_stop.map(|s| s.0);
    let mut idle = idle::Watch::new(idle_stop, spec.user.uid, nix::unistd::getppid().as_raw(), tmux);

    let mut alive = true;
    let mut policy = RestartPolicy::new(config.agent.restart_backoff.0);
    let mut restart_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            Some(sig) = signals.recv() => match sig {
                Signal::SIGTERM | Signal::SIGINT => {
                    tracing::info!(signal = %sig, "stopping");
                    stop_all(grace, Some(&mut handle), &mut report).await;
                    return 0;
                }
                // The daemons' convention: SIGHUP reloads the policy; it is not the agent's.
                Signal::SIGHUP => reload_on_hangup(egress.as_ref()),
                other => forward(other, alive.then(|| handle.pid()).flatten()),
            },
            idle_for = idle.next() => {
                let stop_after = idle_stop.unwrap_or_default();
                state.idle = Some(IdleState { idle_s: idle_for.as_secs(), stop_after_s: stop_after.as_secs() });
                report.set_agent(state.clone());
                if idle_for >= stop_after {
                    let why = format!("idle for {}: stopping (supervisor.idle_stop)", humantime::format_duration(stop_after));
                    report.set_phase(Phase::Stopping, Some(why.clone()));
                    stop_all(grace, Some(&mut handle), &mut report).await;
                    report.set_phase(Phase::Stopped, Some(why));
                    return 0;
                }
            },
            code = handle.wait(), if alive => {
                alive = false;
                tracing::info!(code, "agent exited");
                // An exec failure in the tmux pane is known only from the pane's record: say
                // why before on_exit acts (and, with "shutdown", the pane is gone).
                if let Some(e) = handle.start_error() {
                    report.warn(e);
                }
                state.running = false;
                state.last_exit = Some(code);
                state.pid = None;
                report.set_agent(state.clone());
                match config.agent.on_exit {
                    OnExit::Shutdown => {
                        stop_all(grace, None, &mut report).await;
                        return code;
                    }
                    OnExit::Keep => report.set_phase(Phase::Degraded, Some(format!("agent exited with status {code} (agent.on_exit = \"keep\")"))),
                    OnExit::Restart => match policy.on_exit(Instant::now()) {
                        Some(delay) => restart_at = Some(tokio::time::Instant::now() + delay),
                        None => report.set_phase(Phase::Degraded, Some(format!(
                            "agent exited {} times within {} s (last status {code}); not restarting",
                            RestartPolicy::LIMIT + 1, RestartPolicy::WINDOW.as_secs()))),
                    },
                }
            },
            _ = sleep_until(restart_at), if restart_at.is_some() => {
                restart_at = None;
                match handle.restart(&spec) {
                    Ok(()) => {
                        alive = true;
                        state.restarts += 1;
                        state.pid = handle.pid().map(|p| p as u32);
                        state.running = true;
                        report.set_agent(state.clone());
                    }
                    Err(e) => {
                        report.warn(format!("cannot restart the agent: {e}"));
                        match policy.on_exit(Instant::now()) {
                            Some(delay) => restart_at = Some(tokio::time::Instant::now() + delay),
                            None => report.set_phase(Phase::Degraded, Some(format!("agent cannot be started: {e}"))),
                        }
                    }
                }
            },
        }
    }
}

/// How the boot thread ended.
#[allow(clippy::large_enum_variant, reason = "made once per process and moved once")]
enum BootEnd {
    /// With the report it owned while it ran, and whether a stop was asked for meanwhile.
    Returned {
        report: Report,
        booted: Result<Booted, BootFailed>,
        stop_requested: bool,
    },
    Panicked,
    /// It did not return within [`BOOT_STOP_LIMIT`] of a stop request.
    Stuck,
}

/// How long the boot may take to end after a stop request. Its commands are killed within
/// `command`'s tick and its own code does not block, so this only bounds a bug.
const BOOT_STOP_LIMIT: Duration = Duration::from_secs(3);

/// Runs the boot on a blocking thread (it is synchronous and runs external commands) while
/// watching the signals: SIGTERM or SIGINT sets the boot's stop request (`command::BOOT`),
/// which kills the command running and ends the boot at the current stage. Other signals have
/// no agent to go to yet and are dropped. The boot owns the report until it returns it.
async fn boot_until_stopped(
    source: ConfigSource,
    env: BTreeMap<String, String>,
    mut report: Report,
    live: std::sync::Arc<crate::state::control::Live>,
    services: Services,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
) -> BootEnd {
    let boot = tokio::task::spawn_blocking(move || {
        let booted = boot::boot(&source, &env, &mut report, &live, &services);
        (report, booted)
    });
    tokio::pin!(boot);
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            joined = &mut boot => return match joined {
                Ok((report, booted)) => BootEnd::Returned { report, booted, stop_requested: stop_at.is_some() },
                Err(e) => {
                    tracing::error!("the boot thread failed: {e}");
                    BootEnd::Panicked
                }
            },
            Some(sig) = signals.recv(), if stop_at.is_none() => match sig {
                Signal::SIGTERM | Signal::SIGINT => {
                    tracing::info!(signal = %sig, "stopping during the boot");
                    crate::sys::command::BOOT.request();
                    stop_at = Some(tokio::time::Instant::now());
                }
                other => tracing::debug!(signal = %other, "no agent yet; signal dropped"),
            },
            _ = sleep_until(stop_at.map(|t| t + BOOT_STOP_LIMIT)), if stop_at.is_some() => {
                tracing::error!("the boot did not end within {BOOT_STOP_LIMIT:?} of the stop request; stopping without it");
                return BootEnd::Stuck;
            }
        }
    }
}

/// After a failed boot: exit at once (`on_boot_failure = "exit"`, or when a stop was already
/// asked for), or stay up, reaping, until asked to stop, so an operator can attach and read
/// the failure. Either way the exit code is 1.
async fn hold_or_exit(
    policy: &Supervisor,
    report: &mut Report,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    stop_requested: bool,
) -> i32 {
    if policy.on_boot_failure == OnBootFailure::Hold && !stop_requested {
        tracing::info!("boot failed; holding so an operator can see why (supervisor.on_boot_failure = \"hold\")");
        while let Some(sig) = signals.recv().await {
            if matches!(sig, Signal::SIGTERM | Signal::SIGINT) {
                break;
            }
        }
    }
    let failed = report.state.clone();
    stop_all(policy.stop_grace.0, None, report).await;
    // Keep the failure visible in the final state.
    report.set_phase(Phase::Failed, failed.reason);
    1
}

/// Handlers for the forwarded signals, and for SIGRTMIN+3, which arrives as SIGTERM: a stop
/// request whether the reaper translated it or it was sent to the process group (systemd sends
/// it to every process of a unit), where its default action would end the supervisor at once.
fn install_signal_handlers() -> std::io::Result<mpsc::UnboundedReceiver<Signal>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = mpsc::unbounded_channel();
    let handled = sys::FORWARDED.iter().map(|&s| (s as i32, s)).chain([(sys::stop_signal_rtmin3(), Signal::SIGTERM)]);
    for (raw, sig) in handled {
        let mut stream = signal(SignalKind::from_raw(raw))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

/// SIGHUP: `cordon reload`, off the signal loop (it waits on the kernel); recorded like one.
fn reload_on_hangup(egress: Option<&std::sync::Arc<crate::egress::Egress>>) {
    match egress {
        Some(egress) => {
            let egress = egress.clone();
            tokio::task::spawn_blocking(move || egress.change(crate::egress::change::Op::Reload, "SIGHUP"));
        }
        None => tracing::warn!("SIGHUP: egress is not enforced (network.enforce = false), nothing to reload"),
    }
}

/// Passes a signal on to the agent's process group.
fn forward(sig: Signal, pid: Option<i32>) {
    match pid {
        Some(pid) => {
            tracing::debug!(signal = %sig, pid, "forwarding signal to the agent");
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), sig);
        }
        None => tracing::debug!(signal = %sig, "no agent running; signal dropped"),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The graceful stop: SIGTERM to the agent's process group and to every other process below
/// the reaper, up to `grace` for them to exit, then SIGKILL, repeated until nothing is left
/// (for at most [`KILL_SETTLE`]).
async fn stop_all(grace: Duration, agent: Option<&mut agent::AgentHandle>, report: &mut Report) {
    report.set_phase(Phase::Stopping, None);
    let me = std::process::id() as i32;
    let reaper = nix::unistd::getppid().as_raw();
    let others =
        || -> Vec<i32> { sys::live_descendants(reaper, &sys::processes()).into_iter().filter(|&p| p != me).collect() };
    let agent_group = agent.as_ref().and_then(|a| a.pid());
    if let Some(pid) = agent_group {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGTERM);
    }
    sys::signal_all(&others(), Signal::SIGTERM);
    let mut agent = agent;
    let deadline = Instant::now() + grace;
    loop {
        if let Some(a) = agent.as_mut() {
            a.try_reap();
        }
        let left = others();
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            report.warn(format!("{} processes ignored SIGTERM for {:?}; killing them", left.len(), grace));
            kill_until_gone(reaper == 1, agent_group, agent, &others).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.set_phase(Phase::Stopped, None);
}

/// SIGKILL to everything left, again and again until nothing is: one pass over a snapshot of
/// /proc misses the children a process forks between the snapshot and the kill. As PID 1's
/// child, a `kill(-1)` pass reaches the whole namespace atomically; otherwise (subreaper, where
/// the namespace is not ours) the agent's process group and every group wholly below the reaper
/// are killed as groups (also atomic), and each process of a fresh /proc walk.
async fn kill_until_gone(
    pid1: bool,
    agent_group: Option<i32>,
    mut agent: Option<&mut agent::AgentHandle>,
    others: &dyn Fn() -> Vec<i32>,
) {
    let me = std::process::id() as i32;
    let reaper = nix::unistd::getppid().as_raw();
    let settle = Instant::now() + KILL_SETTLE;
    loop {
        if pid1 {
            sys::kill_namespace();
        }
        if let Some(pid) = agent_group {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        sys::kill_descendants(reaper, me);
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Some(a) = agent.as_mut() {
            a.try_reap();
        }
        let left = others();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= settle {
            tracing::warn!(
                count = left.len(),
                "processes still alive after SIGKILL for {KILL_SETTLE:?}; leaving them to the reaper"
            );
            return;
        }
    }
}
