//! PID 1 and subreaper behaviour of the real binary in fresh namespaces: reaping, signal
//! forwarding, graceful stop, exit statuses, and what the agent process inherits.

mod harness;

use std::fs;
use std::time::Duration;

use harness::{AGENT_UID, Cordon, Mode, Phase, Sandbox, TestConfig};
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(20);

/// Exit code of cordon: from unshare in Pid1 mode, from the shell's report in Subreaper mode.
fn exit_code(c: &mut Cordon, mode: Mode) -> i32 {
    let status = c.wait_exit(Duration::from_secs(30));
    match mode {
        Mode::Pid1 => status.code().unwrap_or_else(|| panic!("unshare ended by a signal: {status}")),
        Mode::Subreaper => {
            let out = c.stdout();
            let line = out
                .lines()
                .find_map(|l| l.strip_prefix("cordon exited "))
                .unwrap_or_else(|| panic!("no exit line in {out:?}"));
            line.trim().parse().unwrap()
        }
    }
}

fn zombies(c: &Cordon) -> usize {
    c.processes().iter().filter(|p| p.state == 'Z').count()
}

fn orphans_are_all_reaped(mode: Mode) {
    let sb = Sandbox::new("orphans");
    // 300 short-lived orphans from inside the agent's tree: each subshell exits at once, so
    // its `sleep` is re-parented to the nearest subreaper (cordon's reaper).
    let cfg = TestConfig {
        agent_command: "for i in $(seq 300); do (sleep 0.05 &); done; touch spawned; exec sleep 1000".into(),
        ..Default::default()
    };
    let mut c = sb.start(&cfg, &[], mode);
    c.wait_phase(Phase::Ready, BOOT);
    harness::wait_until("the agent to spawn its orphans", Duration::from_secs(20), || {
        c.inside(&sb.path("ws/spawned")).exists().then_some(())
    });
    if mode == Mode::Pid1 {
        // And from a `docker exec`-style session: orphans of processes entered from outside
        // are re-parented to PID 1.
        let out = c.exec("for i in $(seq 200); do (sleep 0.05 &); done");
        assert!(out.status.success());
    }
    harness::wait_until("no zombie left in the namespace", Duration::from_secs(10), || {
        (zombies(&c) == 0).then_some(())
    });
    // Give any unreaped orphan time to show up as a zombie, then look again.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(zombies(&c), 0, "zombies: {:?}", c.processes());
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, mode), 0);
}

#[test]
fn pid1_reaps_hundreds_of_orphans_including_exec_sessions() {
    orphans_are_all_reaped(Mode::Pid1);
}

#[test]
fn subreaper_reaps_hundreds_of_orphans() {
    orphans_are_all_reaped(Mode::Subreaper);
}

#[test]
fn kill_term_1_from_inside_stops_gracefully_within_the_grace_period() {
    let sb = Sandbox::new("term1");
    let cfg = TestConfig {
        agent_command: "trap 'echo stopped-by-term > stopped; exit 0' TERM; sleep 1000 & wait".into(),
        stop_grace: "10s",
        ..Default::default()
    };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let t0 = std::time::Instant::now();
    let out = c.exec("kill -TERM 1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0, "graceful stop exits 0; stderr:\n{}", c.stderr());
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}, more than the grace period", t0.elapsed());
    // The agent saw SIGTERM (it wrote the file on the tmpfs, which died with the namespace, so
    // it is the log line that tells): and nothing had to be killed.
    assert!(!c.stderr().contains("ignored SIGTERM"), "{}", c.stderr());
}

#[test]
fn a_child_that_ignores_term_is_killed_after_the_grace_period() {
    let sb = Sandbox::new("grace");
    let cfg = TestConfig {
        agent_command: "trap '' TERM; while :; do sleep 0.1; done".into(),
        stop_grace: "2s",
        ..Default::default()
    };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let t0 = std::time::Instant::now();
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(2), "stopped after {took:?}, before the 2s grace ran out");
    assert!(took < Duration::from_secs(8), "stopped after {took:?}: SIGKILL did not follow the grace promptly");
    assert!(c.stderr().contains("ignored SIGTERM"), "{}", c.stderr());
}

/// QUIT, USR1, USR2 and WINCH reach the agent; HUP is cordon's (a policy reload) and does not.
fn signals_reach_the_agent(mode: Mode) {
    let sb = Sandbox::new("signals");
    let traps: String =
        ["HUP", "QUIT", "USR1", "USR2", "WINCH"].iter().map(|s| format!("trap 'echo {s} >> got' {s}; ")).collect();
    let cfg = TestConfig {
        agent_command: format!("{traps} touch trapped; while :; do sleep 0.05; done"),
        ..Default::default()
    };
    let mut c = sb.start(&cfg, &[], mode);
    c.wait_phase(Phase::Ready, BOOT);
    let got = c.inside(&sb.path("ws/got"));
    harness::wait_until("traps installed", Duration::from_secs(10), || {
        c.inside(&sb.path("ws/trapped")).exists().then_some(())
    });
    // SIGHUP first: cordon's own (a policy reload), never the agent's.
    for sig in [Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGWINCH] {
        let name = &sig.as_str()[3..];
        match mode {
            Mode::Pid1 => assert!(c.exec(&format!("kill -{name} 1")).status.success()),
            Mode::Subreaper => c.kill(c.reaper(), sig),
        }
        if sig == Signal::SIGHUP {
            continue;
        }
        harness::wait_until(&format!("the agent to receive {name}"), Duration::from_secs(10), || {
            fs::read_to_string(&got).ok().filter(|t| t.lines().any(|l| l == name)).map(|_| ())
        });
    }
    let received = fs::read_to_string(&got).unwrap_or_default();
    assert!(!received.lines().any(|l| l == "HUP"), "SIGHUP reached the agent: {received}");
    assert!(c.stderr().contains("egress policy changed"), "SIGHUP reloads: {}", c.stderr());
    c.kill(c.reaper(), Signal::SIGINT);
    assert_eq!(exit_code(&mut c, mode), 0);
}

#[test]
fn signals_reach_the_supervised_process_as_pid1() {
    signals_reach_the_agent(Mode::Pid1);
}

#[test]
fn signals_reach_the_supervised_process_as_subreaper() {
    signals_reach_the_agent(Mode::Subreaper);
}

fn agent_exit_status_becomes_cordons(mode: Mode) {
    let sb = Sandbox::new("exitcode");
    let cfg = TestConfig { agent_command: "sleep 0.2; exit 7".into(), on_exit: "shutdown", ..Default::default() };
    let mut c = sb.start(&cfg, &[], mode);
    assert_eq!(exit_code(&mut c, mode), 7, "stderr:\n{}", c.stderr());

    let sb = Sandbox::new("exitsig");
    let cfg =
        TestConfig { agent_command: "sleep 0.2; kill -KILL $$".into(), on_exit: "shutdown", ..Default::default() };
    let mut c = sb.start(&cfg, &[], mode);
    assert_eq!(exit_code(&mut c, mode), 128 + 9, "stderr:\n{}", c.stderr());
}

#[test]
fn agent_exit_status_becomes_cordons_as_pid1() {
    agent_exit_status_becomes_cordons(Mode::Pid1);
}

#[test]
fn agent_exit_status_becomes_cordons_as_subreaper() {
    agent_exit_status_becomes_cordons(Mode::Subreaper);
}

#[test]
fn agent_starts_unprivileged_with_clean_mask_fds_cwd_and_environment() {
    let sb = Sandbox::new("agentproc");
    let cfg = TestConfig { required_secrets: vec!["GH_PAT"], ..Default::default() };
    let sentinel = "ghp_SENTINEL_must_not_leak_4242";
    let mut c = sb.start(&cfg, &[("GH_PAT", sentinel), ("UNRELATED", "x")], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let agent = c.agent();
    let status = fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).map(|v| v.trim().to_string()).unwrap()
    };
    let uid = AGENT_UID.to_string();
    assert_eq!(field("Uid").split_whitespace().collect::<Vec<_>>(), [uid.as_str(); 4]);
    assert_eq!(field("Gid").split_whitespace().collect::<Vec<_>>(), [uid.as_str(); 4]);
    assert_eq!(field("Groups"), AGENT_UID.to_string());
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("SigBlk"), "0000000000000000", "the agent must start with an empty signal mask");
    assert_eq!(field("SigIgn"), "0000000000000000", "the agent must start with default dispositions");
    let fds: Vec<String> = fs::read_dir(format!("/proc/{agent}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut fds: Vec<i32> = fds.iter().map(|f| f.parse().unwrap()).collect();
    fds.sort();
    assert_eq!(fds, [0, 1, 2], "descriptors beyond stdio leaked into the agent");
    assert_eq!(fs::read_link(format!("/proc/{agent}/cwd")).unwrap(), sb.path("ws"));
    let environ = fs::read(format!("/proc/{agent}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(sentinel), "the secret reached the agent's environment");
    assert!(!environ.contains("UNRELATED"), "cordon's environment leaked into the agent's");
    // PID 1 holds no directory busy.
    assert_eq!(fs::read_link(format!("/proc/{}/cwd", c.reaper())).unwrap(), std::path::Path::new("/"));
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
}

#[test]
fn state_file_and_boot_log_record_every_stage_with_durations() {
    let sb = Sandbox::new("state");
    let mut c = sb.start(&TestConfig::default(), &[], Mode::Pid1);
    let state = c.wait_phase(Phase::Ready, BOOT);
    let names: Vec<&str> = state.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "sanity",
            "config",
            "state",
            "secrets",
            "filesystem",
            "persist",
            "dns",
            "firewall",
            "credentials",
            "readonly_root",
            "clone",
            "readiness",
            "devcontainer",
            "plugins",
            "session"
        ]
    );
    let skipped = ["persist", "clone", "devcontainer", "plugins"];
    for s in state.stages.iter().filter(|s| !skipped.contains(&s.name.as_str())) {
        assert_eq!(s.outcome, cordon::state::report::Outcome::Ok, "{s:?}");
        assert!(s.duration_ms.is_some_and(|d| d >= 0.0), "{s:?}");
    }
    assert_eq!(state.init_mode, "pid1");
    assert!(state.boot_ms.is_some_and(|ms| ms > 0.0));
    assert_eq!(state.agent.as_ref().map(|a| a.running), Some(true));
    let log = c.boot_log();
    assert!(log.contains("clone: skipped - no repo.url (REPO_URL)"), "{log}");
    assert!(
        log.contains("devcontainer: skipped - no .devcontainer/devcontainer.json or .devcontainer.json in"),
        "{log}"
    );
    for stage in names.iter().filter(|n| !skipped.contains(n)) {
        assert!(log.contains(&format!("{stage}: ok")), "boot log lacks {stage}:\n{log}");
    }
    assert!(log.contains("ready in"), "{log}");
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
}

#[test]
fn json_logs_on_request() {
    let sb = Sandbox::new("jsonlog");
    let cfg = TestConfig { agent_command: "exit 0".into(), ..Default::default() };
    let mut c = sb.start(&cfg, &[("CORDON_LOG_FORMAT", "json")], Mode::Pid1);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
    let lines: Vec<String> = c.stderr().lines().map(String::from).collect();
    assert!(lines.len() > 5, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}

#[test]
fn the_first_prompt_reaches_the_first_start_only_and_is_never_logged() {
    let sb = Sandbox::new("prompt");
    let prompt = "PROMPT-SENTINEL fix the flaky test";
    let cfg = TestConfig {
        agent_command: "echo \"[$0]\" >> seen; if [ -e ran ]; then exec sleep 1000; fi; touch ran; exit 1".into(),
        on_exit: "restart",
        ..Default::default()
    };
    let text =
        sb.render_config(&cfg).replace("on_exit = \"restart\"", "on_exit = \"restart\"\nrestart_backoff = \"10ms\"");
    let mut c = sb.launch(&sb.write_file("cordon.toml", &text), &[("CLAUDE_PROMPT", prompt)], Mode::Pid1, "");
    harness::wait_until("a restart", BOOT, || {
        c.state().filter(|s| s.agent.as_ref().is_some_and(|a| a.restarts == 1)).map(|_| ())
    });
    let seen = harness::wait_until("both starts recorded", BOOT, || {
        fs::read_to_string(c.inside(&sb.path("ws/seen"))).ok().filter(|t| t.lines().count() == 2)
    });
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], format!("[{prompt}]"), "the first start gets the prompt as its last argument");
    assert_ne!(lines[1], format!("[{prompt}]"), "a restart must not get it again");
    for text in [c.boot_log(), c.stderr(), fs::read_to_string(c.inside(&sb.path("state/state.json"))).unwrap()] {
        assert!(!text.contains("PROMPT-SENTINEL"), "the prompt was logged");
    }
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
}

#[test]
fn configured_variables_and_groups_reach_the_agent_and_nothing_else() {
    let sb = Sandbox::new("passthrough");
    let text = sb
        .render_config(&TestConfig::default())
        .replace("tmux = false", "tmux = false\nenv = [\"PASS_ME\"]\ngroups = [\"users\"]");
    let mut c =
        sb.launch(&sb.write_file("cordon.toml", &text), &[("PASS_ME", "yes"), ("KEEP_OUT", "no")], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let agent = c.agent();
    let environ = String::from_utf8_lossy(&fs::read(format!("/proc/{agent}/environ")).unwrap()).into_owned();
    assert!(environ.split('\0').any(|kv| kv == "PASS_ME=yes"), "{environ}");
    assert!(!environ.contains("KEEP_OUT"));
    let status = fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let groups = status.lines().find_map(|l| l.strip_prefix("Groups:")).unwrap().trim().to_string();
    assert_eq!(groups, format!("100 {AGENT_UID}"), "the agent's group and the configured `users` (100)");
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
}

/// A field of `/proc/PID/status`, trimmed.
fn status_field(pid: i32, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// State letter and process group of a host pid, from `/proc/PID/stat`.
fn state_and_group(pid: i32) -> (char, i32) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[0].chars().next().unwrap(), f[2].parse().unwrap())
}

/// A signal mask of `/proc/PID/status` (SigIgn, SigBlk) with exactly `signals` set.
fn mask(signals: &[i32]) -> String {
    format!("{:016x}", signals.iter().fold(0u64, |m, s| m | 1 << (s - 1)))
}

/// Sends raw signal number `sig` (real-time ones included) to host pid `pid`, or to the
/// process group `-pid`.
fn send(pid: i32, sig: i32) {
    let out =
        std::process::Command::new("/bin/bash").args(["-c", &format!("kill -s {sig} -- {pid}")]).output().unwrap();
    assert!(out.status.success(), "kill -s {sig} {pid}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The agent traps every signal cordon forwards (so it survives them), and says it is ready.
fn trapping_agent() -> String {
    let traps: String =
        ["HUP", "QUIT", "USR1", "USR2", "WINCH"].iter().map(|s| format!("trap 'echo {s} >> got' {s}; ")).collect();
    format!("{traps} touch trapped; while :; do sleep 0.05; done")
}

fn every_signal_is_survived_and_rtmin3_stops_gracefully(mode: Mode) {
    let sb = Sandbox::new("allsignals");
    let cfg = TestConfig { agent_command: trapping_agent(), ..Default::default() };
    let mut c = sb.start(&cfg, &[], mode);
    c.wait_phase(Phase::Ready, BOOT);
    harness::wait_until("traps installed", Duration::from_secs(10), || {
        c.inside(&sb.path("ws/trapped")).exists().then_some(())
    });
    let (reaper, supervisor, agent) = (c.reaper(), c.supervisor(), c.agent());
    let rtmin3 = libc::SIGRTMIN() + 3;
    // Not sent: SIGKILL and SIGSTOP, which no process can catch, block or ignore (signal(7));
    // SIGTERM, SIGINT and SIGRTMIN+3, which stop cordon by design (sent last, below).
    let sent: Vec<i32> =
        (1..=64).filter(|s| ![libc::SIGKILL, libc::SIGSTOP, libc::SIGTERM, libc::SIGINT, rtmin3].contains(s)).collect();
    assert_eq!(sent.len(), 59);
    for &sig in &sent {
        send(reaper, sig);
    }
    if mode == Mode::Pid1 {
        // And from inside the container, by name, as `kill -s RTMIN 1` would.
        let out = c.exec("for s in RTMIN RTMIN+1 RTMAX-1 RTMAX SEGV BUS ILL FPE ABRT TRAP SYS TSTP TTIN TTOU; do kill -s $s 1 || exit 1; done");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    std::thread::sleep(Duration::from_millis(500));
    for (who, pid) in [("reaper", reaper), ("supervisor", supervisor), ("agent", agent)] {
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).ok().map(|_| state_and_group(pid).0);
        assert!(matches!(state, Some('S' | 'R')), "the {who} is {state:?} after the signals; stderr:\n{}", c.stderr());
    }
    let state = c.state().unwrap();
    assert_eq!(state.phase, Phase::Ready, "{state:?}");
    assert_eq!(state.agent.as_ref().map(|a| (a.running, a.restarts)), Some((true, 0)));
    assert!(!c.stderr().contains("panicked"), "{}", c.stderr());

    let t0 = std::time::Instant::now();
    send(reaper, rtmin3);
    assert_eq!(exit_code(&mut c, mode), 0, "SIGRTMIN+3 is a graceful stop; stderr:\n{}", c.stderr());
    assert!(t0.elapsed() < Duration::from_secs(3), "stop took {:?}", t0.elapsed());
    assert!(c.stderr().contains("SIGRTMIN+3: stop requested"), "{}", c.stderr());
}

#[test]
fn every_signal_is_survived_and_rtmin3_stops_gracefully_as_pid1() {
    every_signal_is_survived_and_rtmin3_stops_gracefully(Mode::Pid1);
}

#[test]
fn every_signal_is_survived_and_rtmin3_stops_gracefully_as_subreaper() {
    every_signal_is_survived_and_rtmin3_stops_gracefully(Mode::Subreaper);
}

/// A launcher that gives cordon what `docker run -it --init` gives it: cordon leads a session
/// and its process group is a terminal's foreground job that is *not orphaned* (a member has
/// its parent in another group of the same session; under `--init` that parent is tini). The
/// kernel discards job-control stops sent to an orphaned group, so only this shape shows them.
/// Here the member is a helper that joins cordon's group from a child in a group of its own, and
/// ignores the stops itself.
const FOREGROUND_JOB: &str = r#"
import os, signal, sys
os.setsid()
leader = os.getpid()
if os.fork() == 0:
    os.setpgid(0, 0)
    if os.fork() == 0:
        for s in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(s, signal.SIG_IGN)
        os.setpgid(0, leader)
        while True:
            signal.pause()
    while True:
        signal.pause()
os.execv(sys.argv[1], sys.argv[1:])
"#;

/// `stop` is sent to the whole group at the end: SIGINT (Ctrl-C), or SIGRTMIN+3 (systemd sends
/// its stop signal to every process of a unit).
fn job_control_never_stops_cordon_and_a_stop_to_the_group_is_graceful(mode: Mode, stop: i32) {
    let sb = Sandbox::new("jobctl");
    let cfg = TestConfig { agent_command: trapping_agent(), ..Default::default() };
    let launcher = sb.write_file("foreground.py", FOREGROUND_JOB);
    let mut c = sb.launch(&sb.write_config(&cfg), &[], mode, &format!("WRAP=\"python3 {}\"", launcher.display()));
    c.wait_phase(Phase::Ready, BOOT);
    let (reaper, supervisor) = (c.reaper(), c.supervisor());
    assert_eq!(state_and_group(reaper).1, reaper, "the reaper leads its process group");
    assert_eq!(state_and_group(supervisor).1, reaper, "the supervisor is in the reaper's process group");
    // Ctrl-Z, and background reads and writes of the terminal: to the whole group.
    for sig in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
        send(-reaper, sig);
        std::thread::sleep(Duration::from_millis(200));
        for (who, pid) in [("reaper", reaper), ("supervisor", supervisor)] {
            assert_ne!(state_and_group(pid).0, 'T', "signal {sig} stopped the {who}");
        }
    }
    assert_eq!(c.state().unwrap().phase, Phase::Ready);
    let t0 = std::time::Instant::now();
    send(-reaper, stop);
    assert_eq!(exit_code(&mut c, mode), 0, "stderr:\n{}", c.stderr());
    assert!(t0.elapsed() < Duration::from_secs(3), "the stop took {:?}", t0.elapsed());
}

#[test]
fn job_control_never_stops_cordon_and_ctrl_c_is_a_graceful_stop_as_pid1() {
    job_control_never_stops_cordon_and_a_stop_to_the_group_is_graceful(Mode::Pid1, libc::SIGINT);
}

#[test]
fn job_control_never_stops_cordon_and_ctrl_c_is_a_graceful_stop_as_subreaper() {
    job_control_never_stops_cordon_and_a_stop_to_the_group_is_graceful(Mode::Subreaper, libc::SIGINT);
}

#[test]
fn a_supervisor_killed_by_a_real_time_signal_ends_cordon_with_128_plus_its_number() {
    // Only PID 1 is cordon's signal interface; a real-time signal sent to the supervisor itself
    // ends it. The reaper must still see that status (nix's waitpid cannot represent it) and
    // exit with it, not wait forever.
    for mode in [Mode::Pid1, Mode::Subreaper] {
        let sb = Sandbox::new("rtdeath");
        let mut c = sb.start(&TestConfig::default(), &[], mode);
        c.wait_phase(Phase::Ready, BOOT);
        let sig = libc::SIGRTMIN() + 5;
        send(c.supervisor(), sig);
        assert_eq!(exit_code(&mut c, mode), 128 + sig, "{mode:?}; stderr:\n{}", c.stderr());
    }
}

#[test]
fn sigrtmin_plus_3_to_the_whole_process_group_is_a_graceful_stop() {
    job_control_never_stops_cordon_and_a_stop_to_the_group_is_graceful(Mode::Pid1, libc::SIGRTMIN() + 3);
}

#[test]
fn log_writes_to_a_pipe_without_reader_are_dropped_and_the_agent_is_still_restarted() {
    let sb = Sandbox::new("deadlog");
    let cfg = TestConfig {
        agent_command: "echo run >> runs; [ $(wc -l < runs) -ge 3 ] && exec sleep 1000; exit 1".into(),
        on_exit: "restart",
        ..Default::default()
    };
    let text =
        sb.render_config(&cfg).replace("on_exit = \"restart\"", "on_exit = \"restart\"\nrestart_backoff = \"10ms\"");
    // cordon's stderr is a fifo whose only reader opens it and goes away at once: every log
    // line cordon writes fails with EPIPE.
    let fifo = sb.path("log.fifo");
    let before = format!("mkfifo {f}\n(exec 3<{f}) &\nexec 2>{f}\nwait", f = fifo.display());
    let mut c = sb.launch(&sb.write_file("cordon.toml", &text), &[("CORDON_LOG", "debug")], Mode::Pid1, &before);
    harness::wait_until("the agent restarted twice, each after a logged exit", BOOT, || {
        c.state().filter(|s| s.agent.as_ref().is_some_and(|a| a.restarts == 2 && a.running)).map(|_| ())
    });
    let (reaper, supervisor) = (c.reaper(), c.supervisor());
    assert!(cordon::sys::alive(reaper) && cordon::sys::alive(supervisor));
    assert_eq!(c.state().unwrap().phase, Phase::Ready);
    c.kill(reaper, Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
}

/// A launcher that leaves what a careless parent leaves: signals ignored (SIGCHLD among them,
/// which makes the kernel reap children itself) and blocked, and a pipe's write end open.
/// A child of the launcher reads the pipe and writes `pipe-eof` when it sees EOF.
const HOSTILE_LAUNCHER: &str = r#"
import os, signal, sys
marker = sys.argv[1]
for s in (signal.SIGCHLD, signal.SIGSEGV, signal.SIGTTOU, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGRTMIN):
    signal.signal(s, signal.SIG_IGN)
r, w = os.pipe()
if os.fork() == 0:
    os.close(w)
    while os.read(r, 4096):
        pass
    with open(marker, "w") as f:
        f.write("eof")
    os._exit(0)
os.close(r)
os.set_inheritable(w, True)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGCHLD})
os.execv(sys.argv[2], sys.argv[2:])
"#;

fn a_hostile_launchers_signals_and_descriptors_are_not_inherited(mode: Mode) {
    let sb = Sandbox::new("hostile");
    let launcher = sb.write_file("hostile.py", HOSTILE_LAUNCHER);
    let marker = sb.path("pipe-eof");
    let before = format!("WRAP=\"python3 {} {}\"", launcher.display(), marker.display());
    let mut c = sb.launch(&sb.write_config(&TestConfig::default()), &[], mode, &before);
    // The boot runs ipset and iptables: with SIGCHLD left ignored, waiting for them failed.
    c.wait_phase(Phase::Ready, BOOT);
    let (reaper, supervisor, agent) = (c.reaper(), c.supervisor(), c.agent());
    assert_eq!(status_field(reaper, "SigIgn"), mask(&[libc::SIGPIPE]), "the reaper ignores SIGPIPE only");
    assert_eq!(
        status_field(supervisor, "SigIgn"),
        mask(&[libc::SIGPIPE, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU]),
        "the supervisor ignores SIGPIPE and the job-control stops only"
    );
    assert_eq!(status_field(agent, "SigIgn"), mask(&[]), "the agent starts with default dispositions");
    assert_eq!(status_field(agent, "SigBlk"), mask(&[]), "the agent starts with an empty mask");
    // The pipe's write end was closed by cordon, so its reader saw EOF.
    harness::wait_until("the launcher's pipe to see EOF", Duration::from_secs(10), || {
        fs::read_to_string(&marker).ok().filter(|t| t == "eof")
    });
    // Above stdio, PID 1 holds its own count of reaped processes (a memfd shared with the
    // supervisor, for the metrics) and nothing else.
    let fds: Vec<(String, String)> = fs::read_dir(format!("/proc/{reaper}/fd"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().into_string().unwrap(), fs::read_link(e.path()).unwrap().display().to_string()))
        .collect();
    assert!(
        fds.iter()
            .all(|(fd, target)| ["0", "1", "2"].contains(&fd.as_str()) || target.starts_with("/memfd:cordon-reaped")),
        "PID 1 holds {fds:?}"
    );
    let log = c.stderr();
    assert!(log.contains("closed a descriptor inherited from the launcher") && log.contains("pipe:["), "{log}");
    c.kill(reaper, Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, mode), 0, "stderr:\n{}", c.stderr());
}

#[test]
fn a_hostile_launchers_signals_and_descriptors_are_not_inherited_as_pid1() {
    a_hostile_launchers_signals_and_descriptors_are_not_inherited(Mode::Pid1);
}

#[test]
fn a_hostile_launchers_signals_and_descriptors_are_not_inherited_as_subreaper() {
    a_hostile_launchers_signals_and_descriptors_are_not_inherited(Mode::Subreaper);
}

/// Processes in the pid namespace whose `ns/pid` link is `ns`, seen from the host.
fn processes_in(ns: &std::path::Path) -> Vec<i32> {
    cordon::sys::processes()
        .into_iter()
        .filter(|p| fs::read_link(format!("/proc/{}/ns/pid", p.pid)).is_ok_and(|l| l == ns))
        .map(|p| p.pid)
        .collect()
}

/// Processes that ignore SIGTERM and keep forking. Hoppers fork their successor and exit at
/// once, so a pid read from /proc is gone by the time it is killed: one in the agent's process
/// group, one in a session of its own (out of the group, as a daemon would be); slower hoppers;
/// and a forker that keeps starting short-lived children. Bounded: a few dozen processes.
const FORK_STORM: &str = "hop() { trap '' TERM; hop & }; hop; \
    setsid -f sh -c 'hop() { trap \"\" TERM; hop & }; hop'; \
    slow() { trap '' TERM; sleep 0.01; slow & }; for i in 1 2 3; do slow & done; \
    (trap '' TERM; while :; do (trap '' TERM; exec sleep 0.3) & sleep 0.02; done) & \
    trap '' TERM; touch storming; while :; do sleep 0.1; done";

fn a_forking_term_ignoring_tree_is_gone_within_grace_plus_one_second(mode: Mode) {
    // The harness's own share of a stop (signal, teardown, unshare's exit), measured on a
    // stop that needs no killing.
    let slack = {
        let sb = Sandbox::new("stopslack");
        let mut c = sb.start(&TestConfig::default(), &[], mode);
        c.wait_phase(Phase::Ready, BOOT);
        let t0 = std::time::Instant::now();
        c.kill(c.reaper(), Signal::SIGTERM);
        assert_eq!(exit_code(&mut c, mode), 0);
        t0.elapsed()
    };
    let sb = Sandbox::new("forkstorm");
    let cfg = TestConfig { agent_command: FORK_STORM.into(), stop_grace: "2s", ..Default::default() };
    let mut c = sb.start(&cfg, &[], mode);
    c.wait_phase(Phase::Ready, BOOT);
    harness::wait_until("the storm to start", Duration::from_secs(10), || {
        c.inside(&sb.path("ws/storming")).exists().then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let ns = fs::read_link(format!("/proc/{}/ns/pid", c.reaper())).unwrap();
    let before = processes_in(&ns).len();
    assert!(before >= 6, "the storm runs: {before} processes");
    let t0 = std::time::Instant::now();
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, mode), 0, "stderr:\n{}", c.stderr());
    let took = t0.elapsed();
    let limit = Duration::from_secs(3) + slack;
    assert!(took >= Duration::from_secs(2), "stopped after {took:?}, before the 2s grace ran out");
    assert!(took < limit, "stopped after {took:?}; grace 2s + 1s + harness slack {slack:?} = {limit:?}");
    assert!(!c.stderr().contains("still alive after SIGKILL"), "{}", c.stderr());
    assert_eq!(processes_in(&ns), Vec::<i32>::new(), "processes left in cordon's namespace");
}

#[test]
fn a_forking_term_ignoring_tree_is_gone_within_grace_plus_one_second_as_pid1() {
    a_forking_term_ignoring_tree_is_gone_within_grace_plus_one_second(Mode::Pid1);
}

#[test]
fn a_forking_term_ignoring_tree_is_gone_within_grace_plus_one_second_as_subreaper() {
    a_forking_term_ignoring_tree_is_gone_within_grace_plus_one_second(Mode::Subreaper);
}

#[test]
fn no_secret_is_left_in_any_environ_of_the_container() {
    let sb = Sandbox::new("environ");
    let cfg = TestConfig { required_secrets: vec!["GH_PAT", "CLAUDE_CODE_OAUTH_TOKEN"], ..Default::default() };
    let (pat, oauth, other) =
        ("ghp_SENTINEL_environ_4242", "oauth_SENTINEL_environ_4242", "other_SENTINEL_environ_4242");
    let env = [("GH_PAT", pat), ("CLAUDE_CODE_OAUTH_TOKEN", oauth), ("SOME_API_KEY", other)];
    let mut c = sb.start(&cfg, &env, Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let agent = c.agent();
    let processes = c.processes();
    assert!(processes.len() >= 3, "{processes:?}");
    for p in &processes {
        let environ = fs::read(format!("/proc/{}/environ", p.pid)).unwrap_or_default();
        let environ = String::from_utf8_lossy(&environ);
        for sentinel in [pat, other] {
            assert!(!environ.contains(sentinel), "a secret in /proc/{}/environ ({})", p.pid, cmdline_of(p.pid));
        }
        // The agent gets CLAUDE_CODE_OAUTH_TOKEN in its environment by design (Claude Code
        // reads it there; docs/security.md); nothing else may hold it.
        if p.pid == agent {
            assert!(environ.split('\0').any(|kv| kv == format!("CLAUDE_CODE_OAUTH_TOKEN={oauth}")));
        } else {
            assert!(!environ.contains(oauth), "the agent's token in /proc/{}/environ ({})", p.pid, cmdline_of(p.pid));
        }
    }
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
}

fn cmdline_of(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

/// Holds a pseudo-terminal for the test: prints the terminal's path, then copies everything
/// written to it into the file `argv[1]`, so the terminal never fills up.
const PTY_HOLDER: &str = r#"
import os, sys
master, slave = os.openpty()
print(os.ttyname(slave), flush=True)
with open(sys.argv[1], "ab", buffering=0) as out:
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        out.write(data)
"#;

#[test]
fn log_writes_while_the_agent_holds_a_tostop_terminal_do_not_stop_or_kill_cordon() {
    let sb = Sandbox::new("tostop");
    // cordon leads a session whose controlling terminal has `tostop` set (as `docker run -it`
    // gives PID 1); the agent makes its own process group the terminal's foreground and exits,
    // so the supervisor logs the exit (and restarts it) as a background writer.
    let cfg = TestConfig {
        agent_command:
            "echo run >> runs; python3 -c 'import os, signal; signal.signal(signal.SIGTTOU, signal.SIG_IGN); \
                        os.tcsetpgrp(1, os.getpgrp())'; [ $(wc -l < runs) -ge 3 ] && exec sleep 1000; exit 1"
                .into(),
        on_exit: "restart",
        ..Default::default()
    };
    let text =
        sb.render_config(&cfg).replace("on_exit = \"restart\"", "on_exit = \"restart\"\nrestart_backoff = \"10ms\"");
    let terminal_log = sb.path("terminal.log");
    let mut holder = KillOnDrop(
        std::process::Command::new("python3")
            .args(["-c", PTY_HOLDER, terminal_log.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut tty = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.0.stdout.take().unwrap()), &mut tty).unwrap();
    let before = format!("exec 0<>{tty} 1>&0 2>&0\nstty tostop\nWRAP='setsid -c'", tty = tty.trim());
    let mut c = sb.launch(&sb.write_file("cordon.toml", &text), &[], Mode::Pid1, &before);
    harness::wait_until("the agent restarted twice, each exit logged from the background", BOOT, || {
        c.state().filter(|s| s.agent.as_ref().is_some_and(|a| a.restarts == 2 && a.running)).map(|_| ())
    });
    for (who, pid) in [("reaper", c.reaper()), ("supervisor", c.supervisor())] {
        assert!(matches!(state_and_group(pid).0, 'S' | 'R'), "the {who} is stopped or gone");
    }
    let shown = harness::wait_until("the exits on the terminal", Duration::from_secs(5), || {
        fs::read_to_string(&terminal_log).ok().filter(|t| t.matches("agent exited").count() >= 2)
    });
    assert!(!shown.contains("panicked"), "{shown}");
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
}

/// A helper process of the test, killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test config with `[supervisor] idle_stop` set, written as the sandbox's cordon.toml.
fn with_idle_stop(sb: &Sandbox, cfg: &TestConfig, idle_stop: &str) -> std::path::PathBuf {
    let text =
        sb.render_config(cfg).replacen("[supervisor]\n", &format!("[supervisor]\nidle_stop = \"{idle_stop}\"\n"), 1);
    sb.write_file("cordon.toml", &text)
}

#[test]
fn a_quiet_headless_agent_makes_cordon_stop_with_status_0_after_idle_stop() {
    let sb = Sandbox::new("idle-headless");
    let cfg =
        with_idle_stop(&sb, &TestConfig { agent_command: "exec sleep 1000".into(), ..TestConfig::default() }, "3s");
    let mut c = sb.launch(&cfg, &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let ready = std::time::Instant::now();
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0, "an idle stop is a graceful stop");
    let after = ready.elapsed();
    assert!(after >= Duration::from_secs(2), "stopped after {after:?}, before idle_stop");
    assert!(after < Duration::from_secs(12), "stopped only after {after:?}");
    let log = c.stderr();
    assert!(log.contains("idle for 3s: stopping"), "{log}");
}

#[test]
fn an_established_connection_keeps_an_otherwise_quiet_agent_up() {
    use harness::WORLD_V4;
    use harness::world::{FakeDns, Rec, TcpService};
    use std::io::Read;
    let sb = Sandbox::new("idle-conn");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![Rec::A("192.0.2.10".parse().unwrap())]);
    sb.net.add_world_addr("192.0.2.10");
    // A model call in flight: the server holds the connection 9 s without a byte either way.
    let _api = TcpService::start(&sb.net.world, "192.0.2.10:443".parse().unwrap(), |mut conn| {
        conn.set_read_timeout(Some(Duration::from_secs(9))).unwrap();
        let _ = conn.read(&mut [0u8; 1]);
    });
    let agent = TestConfig {
        agent_command: "exec 3<>/dev/tcp/api.example.com/443; cat <&3; exec sleep 1000".into(),
        network: "name_binding = false".into(),
        ..TestConfig::default()
    };
    // /dev/tcp is bash's.
    let text = fs::read_to_string(with_idle_stop(&sb, &agent, "3s")).unwrap();
    let cfg = sb.write_file("cordon.toml", &text.replace("[\"/bin/sh\", \"-c\"", "[\"/bin/bash\", \"-c\""));
    let mut c = sb.launch(&cfg, &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let ready = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(c.state().expect("still running").phase, Phase::Ready, "stopped during the call");
    // The call ends: the agent is quiet from then on, and cordon stops.
    assert_eq!(exit_code(&mut c, Mode::Pid1), 0);
    let after = ready.elapsed();
    assert!(after >= Duration::from_secs(9) + Duration::from_secs(2), "stopped after {after:?}");
    assert!(c.stderr().contains("idle for 3s: stopping"));
}
