//! The agent's tmux session and `cordon attach` under a real pty (`script`), as root and as the
//! agent: landing in the session as the agent's uid, waiting through the boot with its progress
//! shown, a failed boot explained, restarts in the pane, exit statuses, window size.

mod harness;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harness::world::{FakeDns, Rec};
use harness::{AGENT_UID, Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};

const BOOT: Duration = Duration::from_secs(60);

fn tmux_config() -> TestConfig {
    TestConfig { tmux: true, on_exit: "restart", ..TestConfig::default() }
}

/// `cordon attach` inside cordon's namespaces under a pty of `cols`x`rows`, in the background;
/// its terminal output goes to `out`.
fn attach(c: &Cordon, sb: &Sandbox, args: &str, as_agent: bool, size: (u16, u16), out: &str) -> Child {
    let init = c.ns_init().to_string();
    let user = if as_agent { format!("-S {AGENT_UID} -G {AGENT_UID}") } else { String::new() };
    let inner = format!(
        "stty cols {} rows {}; exec nsenter -t {init} -p -m -u -n {user} -- env TERM=xterm-256color {} attach {args} --config {}",
        size.0,
        size.1,
        env!("CARGO_BIN_EXE_cordon"),
        sb.path("cordon.toml").display()
    );
    Command::new("script")
        .args(["-qfec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(sb.path(out)).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("script")
}

/// A tmux command on the agent's server, as the agent.
fn tmux(c: &Cordon, sb: &Sandbox, args: &str) -> String {
    let out = c.agent_exec(&format!("tmux -S {} {args}", sb.path("state/tmux/agent.sock").display()));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn clients(c: &Cordon, sb: &Sandbox) -> Vec<String> {
    let out = tmux(c, sb, "list-clients -F '#{client_uid} #{client_width}x#{client_height}'");
    out.lines().map(String::from).collect()
}

/// Shell for `Sandbox::launch`'s `before`: tmux replaced, in cordon's mount namespace, by a
/// script that runs `line` (with the command's arguments in `$*`), then the real tmux.
fn tmux_shim(line: &str) -> String {
    let script = format!("#!/bin/sh\n{line}\nexec /run/tmux.real \"$@\"\n");
    format!(
        "set -e\nreal=$(command -v tmux)\ncp \"$real\" /run/tmux.real\ncat > /run/tmux-shim <<'SHIM'\n{script}SHIM\n\
         chmod 755 /run/tmux-shim\nmount --bind /run/tmux-shim \"$real\"\n"
    )
}

fn stop(mut c: Cordon) {
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn the_session_runs_the_agent_unprivileged_with_a_shell_pane() {
    let sb = Sandbox::new("session");
    let mut c = sb.start(&tmux_config(), &[], Mode::Pid1);
    let state = c.wait_phase(Phase::Ready, BOOT);
    assert!(state.stages.last().unwrap().detail.as_deref().unwrap().contains("tmux session `agent`"));
    let panes = tmux(&c, &sb, "list-panes -t agent -F '#{pane_pid} #{pane_current_command} #{pane_height}'");
    let rows: Vec<&str> = panes.lines().collect();
    assert_eq!(rows.len(), 2, "agent pane and shell pane: {panes}");
    // tmux reports pids of cordon's pid namespace; find the agent's host pid by its command.
    let agent_pid = c
        .processes()
        .into_iter()
        .find(|p| std::fs::read(format!("/proc/{}/cmdline", p.pid)).is_ok_and(|b| b == b"sleep\x001000\x00"))
        .expect("the agent process")
        .pid;
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status")).unwrap();
    assert!(status.contains(&format!("Uid:\t{AGENT_UID}\t{AGENT_UID}\t{AGENT_UID}\t{AGENT_UID}")), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000") && status.contains("CapBnd:\t0000000000000000"));
    assert!(status.contains("NoNewPrivs:\t1"));
    let sock = std::fs::metadata(c.inside(&sb.path("state/tmux/agent.sock"))).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&sock), AGENT_UID, "the tmux server is the agent's");
    stop(c);
}

#[test]
fn attach_as_root_lands_in_the_session_as_the_agent_uid() {
    let sb = Sandbox::new("attach-root");
    let mut c = sb.start(&tmux_config(), &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let mut client = attach(&c, &sb, "", false, (120, 40), "attach.out");
    let seen = harness::wait_until("a client on the agent's session", Duration::from_secs(15), || {
        let cl = clients(&c, &sb);
        (!cl.is_empty()).then_some(cl)
    });
    assert_eq!(seen.len(), 1);
    assert!(seen[0].starts_with(&format!("{AGENT_UID} ")), "the tmux client must run as the agent, not root: {seen:?}");
    let cmd = format!("{} status --json --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
    let v: serde_json::Value = serde_json::from_slice(&c.exec(&cmd).stdout).expect("status");
    assert_eq!(v["session"]["tmux"]["alive"], true, "{v}");
    assert_eq!(v["session"]["tmux"]["clients"].as_array().map(Vec::len), Some(1), "{v}");
    // No root-owned tmux client process anywhere in the namespace.
    for p in c.processes() {
        let cmd = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).starts_with("tmux") {
            let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap_or_default();
            assert!(!status.contains("Uid:\t0\t"), "a root tmux process: {}", String::from_utf8_lossy(&cmd));
        }
    }
    let _ = client.kill();
    let _ = client.wait();
    stop(c);
}

#[test]
fn attach_as_the_agent_works_too_and_a_stray_small_client_does_not_shrink_the_window() {
    let sb = Sandbox::new("attach-size");
    let mut c = sb.start(&tmux_config(), &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let mut big = attach(&c, &sb, "", false, (150, 45), "big.out");
    harness::wait_until("the first client", Duration::from_secs(15), || (clients(&c, &sb).len() == 1).then_some(()));
    let mut small = attach(&c, &sb, "", true, (30, 8), "small.out");
    harness::wait_until("the second client", Duration::from_secs(15), || (clients(&c, &sb).len() == 2).then_some(()));
    std::thread::sleep(Duration::from_millis(300));
    let size = tmux(&c, &sb, "display -p -t agent '#{window_width}x#{window_height}'");
    assert_eq!(size, "150x44", "the window follows the largest client (less the status line)");
    for ch in [&mut big, &mut small] {
        let _ = ch.kill();
        let _ = ch.wait();
    }
    stop(c);
}

#[test]
fn attach_after_a_failed_boot_names_the_stage_error_and_fix() {
    let sb = Sandbox::new("attach-failed");
    let cfg = TestConfig { required_secrets: vec!["GH_PAT"], on_boot_failure: "hold", ..tmux_config() };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    c.wait_phase(Phase::Failed, BOOT);
    let mut client = attach(&c, &sb, "", false, (100, 30), "attach.out");
    let status = client.wait().unwrap();
    assert!(!status.success(), "attach must fail after a failed boot");
    let out = std::fs::read_to_string(sb.path("attach.out")).unwrap();
    assert!(out.contains("the boot failed at stage secrets"), "{out}");
    assert!(out.contains("GH_PAT (not set)") && out.contains("fix:"), "{out}");
    stop(c);
}

#[test]
fn attach_during_the_boot_shows_progress_then_lands_in_the_session() {
    let sb = Sandbox::new("attach-wait");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![Rec::A("192.0.2.10".parse().unwrap())]);
    sb.net.add_world_addr("192.0.2.10");
    let _greeter = harness::world::Greeter::start(&sb.net.world, "192.0.2.10:443".parse().unwrap());
    dns.set_up(false);
    // The readiness probe needs api.example.com: the boot waits in that stage until the
    // upstream answers again.
    let cfg = TestConfig { network: "probe = \"api.example.com:443\"\n".into(), ..tmux_config() };
    let c = sb.start(&cfg, &[], Mode::Pid1);
    harness::wait_until("the readiness stage", BOOT, || {
        c.state().filter(|s| s.stages.last().is_some_and(|st| st.name == "readiness")).map(|_| ())
    });
    let no_wait = attach(&c, &sb, "--no-wait", false, (100, 30), "nowait.out").wait().unwrap();
    assert!(!no_wait.success());
    let text = std::fs::read_to_string(sb.path("nowait.out")).unwrap();
    assert!(text.contains("still booting (stage readiness)"), "{text}");

    let mut client = attach(&c, &sb, "", false, (100, 30), "attach.out");
    std::thread::sleep(Duration::from_millis(800));
    assert!(clients(&c, &sb).is_empty(), "attached before the boot finished");
    dns.set_up(true);
    harness::wait_until("the client after the boot", Duration::from_secs(40), || {
        (!clients(&c, &sb).is_empty()).then_some(())
    });
    let out = std::fs::read_to_string(sb.path("attach.out")).unwrap();
    assert!(out.contains("cordon is booting; waiting"), "{out}");
    assert!(out.contains("readiness: started"), "the boot log is shown while waiting: {out}");
    let _ = client.kill();
    let _ = client.wait();
    stop(c);
}

#[test]
fn a_crashed_agent_is_restarted_in_its_pane_and_attach_still_works() {
    let sb = Sandbox::new("pane-restart");
    let cfg = TestConfig {
        agent_command: "if [ -e ran ]; then exec sleep 1000; fi; touch ran; exit 3".into(),
        ..tmux_config()
    };
    let text =
        sb.render_config(&cfg).replace("on_exit = \"restart\"", "on_exit = \"restart\"\nrestart_backoff = \"100ms\"");
    let mut c = sb.launch(&sb.write_file("cordon.toml", &text), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let state = harness::wait_until("one restart", BOOT, || {
        c.state().filter(|s| s.agent.as_ref().is_some_and(|a| a.restarts == 1 && a.running))
    });
    assert_eq!(state.agent.unwrap().last_exit, Some(3));
    let mut client = attach(&c, &sb, "", false, (100, 30), "attach.out");
    harness::wait_until("a client", Duration::from_secs(15), || (!clients(&c, &sb).is_empty()).then_some(()));
    let _ = client.kill();
    let _ = client.wait();
    stop(c);
}

#[test]
fn on_exit_shutdown_in_tmux_exits_with_the_agents_status() {
    let sb = Sandbox::new("pane-exit");
    let cfg = TestConfig {
        agent_command: "sleep 0.5; exit 7".into(),
        on_exit: "shutdown",
        tmux: true,
        ..TestConfig::default()
    };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    assert_eq!(c.wait_exit(BOOT).code(), Some(7), "{}", c.stderr());
}

#[test]
fn an_attached_client_keeps_an_idle_agent_up_and_cordon_stops_once_it_detaches() {
    let sb = Sandbox::new("idle-attach");
    let text = sb.render_config(&tmux_config()).replacen("[supervisor]\n", "[supervisor]\nidle_stop = \"3s\"\n", 1);
    sb.write_file("cordon.toml", &text);
    let mut c = sb.launch(&sb.path("cordon.toml"), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let mut client = attach(&c, &sb, "", false, (100, 30), "attach.out");
    harness::wait_until("a client on the agent's session", Duration::from_secs(15), || {
        (!clients(&c, &sb).is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(c.state().expect("still running").phase, Phase::Ready, "stopped while a client was attached");
    let cmd = format!("{} status --json --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
    let v: serde_json::Value = serde_json::from_slice(&c.exec(&cmd).stdout).expect("status");
    assert_eq!(v["session"]["agent"]["idle"], serde_json::json!({"idle_s": 0, "stop_after_s": 3}), "{v}");
    let human =
        c.exec(&format!("{} status --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display()));
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("idle 0s (supervisor.idle_stop 3s): stops in 3s unless it becomes active"), "{human}");
    let _ = client.kill();
    let _ = client.wait();
    let detached = std::time::Instant::now();
    let status = c.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "an idle stop is a graceful stop");
    assert!(detached.elapsed() >= Duration::from_secs(2), "stopped {:?} after the detach", detached.elapsed());
    assert!(c.stderr().contains("idle for 3s: stopping"), "{}", c.stderr());
}

#[test]
fn an_idle_session_is_watched_with_one_tmux_command_every_two_seconds_and_a_closed_shell_comes_back() {
    let sb = Sandbox::new("pane-watch");
    // Every tmux command run in the namespaces is logged, by a shim over tmux.
    let shim = format!(
        ": > /run/tmux-calls.log\nchmod 666 /run/tmux-calls.log\n{}",
        tmux_shim("echo \"$*\" >> /run/tmux-calls.log")
    );
    let mut c = sb.launch(&sb.write_config(&tmux_config()), &[], Mode::Pid1, &shim);
    c.wait_phase(Phase::Ready, BOOT);
    let calls = |c: &Cordon| -> Vec<String> {
        String::from_utf8_lossy(&c.exec("cat /run/tmux-calls.log").stdout).lines().map(String::from).collect()
    };
    std::thread::sleep(Duration::from_secs(1));
    let before = calls(&c).len();
    std::thread::sleep(Duration::from_secs(6));
    let after = calls(&c);
    let watching = &after[before..];
    // 6 s at one command per 2 s: 3, give or take one by where the window falls (three
    // commands every 250 ms before: 66 seen).
    let first = &watching[..watching.len().min(6)];
    assert!((2..=4).contains(&watching.len()), "{} tmux commands in 6 s, the first: {first:?}", watching.len());
    assert!(watching.iter().all(|l| l.contains("list-panes")), "{watching:?}");

    // The shell pane, closed with `exit`, is respawned with a new shell.
    let panes = tmux(&c, &sb, "list-panes -t agent -F '#{pane_id} #{pane_pid}'");
    let shell: Vec<&str> = panes.lines().nth(1).expect("the shell pane").split(' ').collect();
    tmux(&c, &sb, &format!("send-keys -t '{}' exit Enter", shell[0]));
    // Within a look at tmux (2 s) and some slack.
    harness::wait_until("the shell pane respawned", Duration::from_secs(5), || {
        let now = tmux(&c, &sb, &format!("display -p -t '{}' '#{{pane_dead}} #{{pane_pid}}'", shell[0]));
        (now.starts_with("0 ") && !now.ends_with(&format!(" {}", shell[1]))).then_some(())
    });
    stop(c);
}

#[test]
fn a_killed_pane_wrapper_ends_the_agent_though_idle_samples_keep_interrupting_the_watch() {
    let sb = Sandbox::new("pane-kill");
    // idle_stop 12 s samples idleness every 1.2 s, each time dropping the supervisor's wait
    // for the agent: less than the 2 s a wrapper must be gone before it counts.
    let text = sb
        .render_config(&tmux_config())
        .replace("on_exit = \"restart\"", "on_exit = \"restart\"\nrestart_backoff = \"100ms\"")
        .replacen("[supervisor]\n", "[supervisor]\nidle_stop = \"12s\"\n", 1);
    let mut c = sb.launch(&sb.write_file("cordon.toml", &text), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    // `cordon pane-run ...` (the tmux server's own command line names it too, further on).
    let wrapper = c
        .processes()
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{}/cmdline", p.pid))
                .is_ok_and(|b| b.split(|&c| c == 0).nth(1) == Some(b"pane-run"))
        })
        .expect("the agent pane's wrapper")
        .pid;
    let killed = std::time::Instant::now();
    c.kill(wrapper, nix::sys::signal::Signal::SIGKILL);
    // Gone without a status: counted as status 1 after 2 s, then restarted (on_exit).
    let state = harness::wait_until("a restart after the wrapper was killed", Duration::from_secs(8), || {
        c.state().filter(|s| s.agent.as_ref().is_some_and(|a| a.restarts == 1 && a.running))
    });
    assert_eq!(state.agent.unwrap().last_exit, Some(1));
    assert!(killed.elapsed() < Duration::from_secs(8));
    stop(c);
}

#[test]
fn the_agents_exit_is_seen_at_once_while_tmux_hangs_on_the_watchs_question() {
    let sb = Sandbox::new("pane-hang");
    // A shim over tmux whose `list-panes` (the watch's only question) hangs until its deadline.
    let shim = tmux_shim("case \"$*\" in *list-panes*) exec sleep 60;; esac");
    let cfg = TestConfig {
        agent_command: "sleep 2; exit 7".into(),
        on_exit: "shutdown",
        tmux: true,
        ..TestConfig::default()
    };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, &shim);
    c.wait_phase(Phase::Ready, BOOT);
    let ready = std::time::Instant::now();
    // The status file is read every 250 ms whatever tmux does: the exit within ~2.3 s, not
    // after the hung question's 10 s deadline.
    assert_eq!(c.wait_exit(Duration::from_secs(8)).code(), Some(7), "{}", c.stderr());
    assert!(ready.elapsed() < Duration::from_secs(6), "seen after {:?}", ready.elapsed());
}
