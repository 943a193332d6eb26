//! Boot failures of the real binary: the stage, the error and the fix are reported; secrets are
//! never printed; the agent never starts; `hold` keeps PID 1 up and `exit` exits non-zero.

mod harness;

use std::fs;
use std::time::Duration;

use harness::{Mode, Phase, Sandbox, TestConfig, WORLD_V4};
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(20);
const SENTINEL: &str = "sk-ant-SENTINEL-never-print-me-77";

#[test]
fn missing_and_empty_secrets_exit_naming_each_and_never_print_values() {
    let sb = Sandbox::new("secrets-exit");
    let cfg = TestConfig { required_secrets: vec!["PRESENT", "ABSENT", "BLANK"], ..Default::default() };
    let mut c = sb.start(&cfg, &[("PRESENT", SENTINEL), ("BLANK", "")], Mode::Pid1);
    let status = c.wait_exit(BOOT);
    assert_eq!(status.code(), Some(1), "on_boot_failure = exit must exit non-zero");
    let err = c.stderr();
    assert!(err.contains("ABSENT (not set)") && err.contains("BLANK (set but empty)"), "{err}");
    assert!(err.contains("fly secrets set"), "the hint says how to set them: {err}");
    assert!(!err.contains(SENTINEL) && !c.stdout().contains(SENTINEL), "a secret value was printed");
    assert!(!err.contains("PRESENT ("), "a present secret is not a problem: {err}");
}

#[test]
fn hold_keeps_pid1_up_with_the_failure_in_state_and_boot_log() {
    let sb = Sandbox::new("secrets-hold");
    let cfg = TestConfig {
        required_secrets: vec!["PRESENT", "ABSENT"],
        on_boot_failure: "hold",
        agent_command: "touch started".into(),
        ..Default::default()
    };
    let mut c = sb.start(&cfg, &[("PRESENT", SENTINEL)], Mode::Pid1);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let failed = state.stages.last().unwrap();
    assert_eq!(failed.name, "secrets");
    assert!(failed.error.as_deref().unwrap().contains("ABSENT (not set)"), "{failed:?}");
    assert!(state.reason.as_deref().unwrap().contains("stage secrets"), "{state:?}");
    // Still up a while later, reaping, so an operator can attach.
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.state().is_some_and(|s| s.phase == Phase::Failed));
    let log = c.boot_log();
    assert!(log.contains("secrets: FAILED") && log.contains("hint:"), "{log}");
    assert!(log.contains("the agent was not started"), "{log}");
    let state_text = fs::read_to_string(c.inside(&sb.path("state/state.json"))).unwrap();
    for text in [&log, &state_text, &c.stderr()] {
        assert!(!text.contains(SENTINEL), "a secret value was written out");
    }
    assert!(!c.inside(&sb.path("ws/started")).exists(), "the agent ran after a failed boot");
    let t0 = std::time::Instant::now();
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1), "a failed boot exits 1 when stopped");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn config_errors_at_boot_name_key_and_line_and_reach_the_default_boot_log() {
    let sb = Sandbox::new("badconfig");
    let text = sb.render_config(&TestConfig::default()).replace("stop_grace = ", "stop_grase = ");
    let line = text.lines().position(|l| l.starts_with("stop_grase")).unwrap() + 1;
    let cfg = sb.write_file("bad.toml", &text);
    let mut c = sb.launch(&cfg, &[], Mode::Pid1, "");
    // The config failed, so the default policy (hold) and state directory apply.
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.iter().find(|s| s.name == "config").unwrap();
    let expect = format!("bad.toml:{line}: key `supervisor.stop_grase`: unknown field `stop_grase`");
    assert!(stage.error.as_deref().unwrap().contains(&expect), "{stage:?}");
    assert!(stage.hint.as_deref().unwrap().contains("cordon check"), "{stage:?}");
    assert!(c.boot_log().contains("config: FAILED"), "{}", c.boot_log());
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

#[test]
fn missing_agent_user_fails_the_filesystem_stage_with_a_hint() {
    let sb = Sandbox::new("nouser");
    let cfg = TestConfig { on_boot_failure: "hold", ..Default::default() };
    let text = sb.render_config(&cfg).replace("user = \"cagent\"", "user = \"nobody-here\"");
    let mut c = sb.launch(&sb.write_file("alt.toml", &text), &[], Mode::Pid1, "");
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!(stage.name, "filesystem");
    assert!(stage.error.as_deref().unwrap().contains("user `nobody-here` does not exist"), "{stage:?}");
    assert!(stage.hint.as_deref().unwrap().contains("useradd"), "{stage:?}");
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

#[test]
fn a_missing_agent_program_fails_the_session_stage() {
    let sb = Sandbox::new("noagent");
    let text =
        sb.render_config(&TestConfig::default()).replace("command = [\"/bin/sh\"", "command = [\"/no/such/agent\"");
    let mut c = sb.launch(&sb.write_file("alt.toml", &text), &[], Mode::Pid1, "");
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
    let err = c.stderr();
    assert!(err.contains("cannot start the agent `/no/such/agent`"), "{err}");
    assert!(err.contains("agent.command"), "{err}");
}

/// Agent programs that cannot be exec'd, prepared in the namespace's /run by `SETUP`: the
/// program, what the error must say, and the shell status.
const UNSTARTABLE: [(&str, &str, i32); 3] = [
    ("/run/agent-noexec", "Permission denied (os error 13)", 126),
    ("/run/agent-badinterp", "its interpreter `/nonexistent/interp` (from its #! line) is missing", 127),
    ("no-such-agent-anywhere", "not found on the agent's PATH", 127),
];
const SETUP: &str = "printf '#!/bin/sh\\nexec sleep 1000\\n' > /run/agent-noexec; chmod 644 /run/agent-noexec\n\
                     printf '#!/nonexistent/interp\\n' > /run/agent-badinterp; chmod 755 /run/agent-badinterp\n";

/// Each unstartable agent fails the session stage with the program, the reason and the status,
/// in the state file and the boot log; the boot is never "ready".
fn unstartable_agents_fail_the_session_stage(tmux: bool) {
    let sb = Sandbox::new(if tmux { "exec-tmux" } else { "exec-headless" });
    for (program, reason, status) in UNSTARTABLE {
        let cfg = TestConfig { on_boot_failure: "hold", tmux, ..Default::default() };
        let text = sb
            .render_config(&cfg)
            .replace("command = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]", &format!("command = [\"{program}\"]"));
        assert!(text.contains(program));
        // The previous run pointed the sandbox's resolv.conf at itself.
        sb.write_file("resolv.conf", &format!("nameserver {WORLD_V4}\n"));
        let mut c = sb.launch(&sb.write_file("exec.toml", &text), &[], Mode::Pid1, SETUP);
        let state = c.wait_phase(Phase::Failed, BOOT);
        let stage = state.stages.last().unwrap();
        assert_eq!(stage.name, "session", "{program}: {state:?}");
        let error = stage.error.as_deref().unwrap();
        let expect = format!("cannot start the agent `{program}`: ");
        assert!(error.starts_with(&expect) && error.contains(reason), "{program}: {error}");
        assert!(error.ends_with(&format!("(exit status {status})")), "{program}: {error}");
        let hint = stage.hint.as_deref().unwrap();
        assert!(hint.contains(if status == 126 { "chmod" } else { "install" }), "{program}: {hint}");
        assert!(state.agent.is_none(), "the agent counted as started: {state:?}");
        assert!(c.boot_log().contains("session: FAILED") && c.boot_log().contains(error), "{}", c.boot_log());
        assert!(!c.boot_log().contains("ready in"), "{}", c.boot_log());
        c.kill(c.reaper(), Signal::SIGTERM);
        assert_eq!(c.wait_exit(BOOT).code(), Some(1));
    }
}

#[test]
fn an_agent_that_cannot_be_executed_fails_the_headless_session_stage_naming_program_reason_and_status() {
    unstartable_agents_fail_the_session_stage(false);
}

#[test]
fn an_agent_that_cannot_be_executed_fails_the_tmux_session_stage_naming_program_reason_and_status() {
    unstartable_agents_fail_the_session_stage(true);
}

#[test]
fn a_sigterm_during_slow_readiness_probes_stops_cordon_within_the_grace() {
    use harness::world::{FakeDns, Greeter, Rec};
    let sb = Sandbox::new("term-readiness");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![Rec::A("192.0.2.10".parse().unwrap())]);
    sb.net.add_world_addr("192.0.2.10");
    let _greeter = Greeter::start(&sb.net.world, "192.0.2.10:443".parse().unwrap());
    // The probe of api.example.com waits on an upstream that does not answer.
    dns.set_up(false);
    let cfg = TestConfig { network: "probe = \"api.example.com:443\"\n".into(), ..Default::default() };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    harness::wait_until("the readiness stage", BOOT, || {
        c.state().filter(|s| s.stages.last().is_some_and(|st| st.name == "readiness")).map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(300));
    let state_dir = fs::File::open(c.inside(&sb.path("state"))).unwrap();
    let t0 = std::time::Instant::now();
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(0), "{}", c.stderr());
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "cordon took {took:?} to stop (stop_grace is 3s)");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&state_dir);
    let state: harness::State =
        serde_json::from_slice(&fs::read(format!("/proc/self/fd/{fd}/state.json")).unwrap()).unwrap();
    assert_eq!((state.phase, state.reason.as_deref()), (Phase::Stopped, Some("stopped during readiness")));
    assert_eq!(state.stages.last().map(|s| s.outcome.clone()), Some(cordon::state::report::Outcome::Stopped));
    let stderr = c.stderr();
    assert!(!stderr.contains("ignored SIGTERM") && !stderr.contains("left behind"), "{stderr}");
}
