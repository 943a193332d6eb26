//! Work of the agent's home kept across restarts (`agent.persist`) and the Claude Code extras
//! (`[claude]`: plugins, the session-naming Stop hook), end to end with the real cordon as PID 1: the volume is a bind mount of
//! the sandbox's `host` directory, kept across restarts like a Docker volume; `claude` is a stub
//! that logs its argv and uid.

mod harness;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{AGENT_UID, Cordon, Mode, Phase, Sandbox, TestConfig};

const BOOT: Duration = Duration::from_secs(60);

/// The test config plus `agent` keys and raw TOML `extra`, the volume listed as writable.
fn config(sb: &Sandbox, agent: &str, extra: &str) -> PathBuf {
    let cfg = TestConfig { on_boot_failure: "hold", ..TestConfig::default() };
    let text = sb.render_config(&cfg).replacen("tmux = false\n", &format!("tmux = false\n{agent}\n"), 1);
    let text = format!("{text}[filesystem]\nwritable = [\"{}\"]\n{extra}", sb.path("host").display());
    sb.write_file("cordon.toml", &text)
}

fn boot(sb: &Sandbox, cfg: &Path, before: &str) -> Cordon {
    let before = format!("mount --bind {0} {0}\n{before}", sb.path("host").display());
    sb.launch(cfg, &[], Mode::Pid1, &before)
}

fn stop(mut c: Cordon) {
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

fn agent_ok(c: &Cordon, script: &str) -> String {
    let out = c.agent_exec(script);
    assert!(out.status.success(), "as the agent: {script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_persisted_home_path_survives_a_restart_and_a_symlink_the_agent_plants_on_the_volume_is_refused() {
    let sb = Sandbox::new("persist");
    let host = sb.path("host");
    std::os::unix::fs::chown(&host, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    let home = sb.path("home");
    let cfg = config(&sb, &format!("persist = [\"~/.claude\"]\npersist_volume = \"{}\"", host.display()), "");

    let mut c = boot(&sb, &cfg, "");
    let state = c.wait_phase(Phase::Ready, BOOT);
    let stage = state.stages.iter().find(|s| s.name == "persist").unwrap();
    assert!(stage.detail.as_deref().unwrap().contains("~/.claude kept on"), "{stage:?}");
    agent_ok(
        &c,
        &format!("mkdir -p {0}/.claude/projects && echo session-1 > {0}/.claude/projects/s.jsonl", home.display()),
    );
    let kept = host.join(".cordon/persist/.claude/projects/s.jsonl");
    assert_eq!(fs::read_to_string(&kept).unwrap(), "session-1\n", "written through to the volume");
    assert_eq!(fs::metadata(host.join(".cordon/persist/.claude")).unwrap().uid(), AGENT_UID);
    for root_owned in [".cordon", ".cordon/persist"] {
        let m = fs::symlink_metadata(host.join(root_owned)).unwrap();
        assert!(m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0, "{root_owned} is root's, 0755");
    }
    // The persisted directory itself cannot be swapped: its parent is root's.
    let store = host.join(".cordon/persist");
    for swap in
        [format!("mv {0}/.claude {0}/.claude.old", store.display()), format!("ln -s /etc {}/.x", store.display())]
    {
        assert!(!c.agent_exec(&swap).status.success(), "the agent must not be able to: {swap}");
    }
    stop(c);

    // Positive control: the next boot on the same volume has the agent's file in ~/.claude.
    let mut c = boot(&sb, &cfg, "");
    c.wait_phase(Phase::Ready, BOOT);
    assert_eq!(agent_ok(&c, &format!("cat {}/.claude/projects/s.jsonl", home.display())), "session-1\n");
    // The agent owns the volume's top: it moves cordon's store aside and plants a symlink to a
    // root-owned directory, a stand-in for /etc (so a broken cordon leaves no debris in the
    // host's /etc).
    let etc = sb.path("etc");
    fs::create_dir(&etc).unwrap();
    fs::set_permissions(&etc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    agent_ok(&c, &format!("cd {} && mv .cordon .cordon.moved && ln -s {} .cordon", host.display(), etc.display()));
    stop(c);

    let mut c = boot(&sb, &cfg, "");
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!(stage.name, "persist", "{state:?}");
    let error = stage.error.as_deref().unwrap();
    assert!(error.contains("cannot persist ~/.claude") && error.contains("`.cordon` is a symlink"), "{error}");
    assert!(stage.hint.as_deref().unwrap().contains("move it aside"), "{stage:?}");
    assert_eq!(fs::read_dir(&etc).unwrap().count(), 0, "nothing made in the symlink's target");
    let mounts = fs::read_to_string(format!("/proc/{}/mountinfo", c.reaper())).unwrap();
    assert!(!mounts.contains(&format!("{}/.claude ", home.display())), "no mount on ~/.claude:\n{mounts}");
    assert!(!state.stages.iter().any(|s| s.name == "session"), "no agent");
    stop(c);

    // A directory in its place, the agent's with a symlink inside, is refused as well.
    fs::remove_file(host.join(".cordon")).unwrap();
    fs::create_dir_all(host.join(".cordon")).unwrap();
    std::os::unix::fs::chown(host.join(".cordon"), Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    std::os::unix::fs::symlink(&etc, host.join(".cordon/persist")).unwrap();
    let mut c = boot(&sb, &cfg, "");
    let state = c.wait_phase(Phase::Failed, BOOT);
    let error = state.stages.last().unwrap().error.clone().unwrap();
    assert!(error.contains(&format!("owned by uid {AGENT_UID}")), "{error}");
    assert_eq!(fs::read_dir(&etc).unwrap().count(), 0, "nothing made in the symlink's target");
    stop(c);

    // A persist_volume that does not exist is the operator's mistake, and the fix says so.
    let cfg = config(&sb, &format!("persist = [\"~/.claude\"]\npersist_volume = \"{}/missing\"", host.display()), "");
    let mut c = boot(&sb, &cfg, "");
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert!(stage.error.as_deref().unwrap().contains("cannot open agent.persist_volume"), "{stage:?}");
    assert!(stage.hint.as_deref().unwrap().contains("create it, or mount the volume there"), "{stage:?}");
    stop(c);
}

/// A stub `claude` that logs `uid home argv` to `log` and fails `plugin install broken@m`.
fn stub_claude(sb: &Sandbox) -> (PathBuf, PathBuf) {
    let dir = sb.path("stub-bin");
    fs::create_dir_all(&dir).unwrap();
    // On the volume: the sandbox directory itself is under the read-only root.
    let log = sb.path("host/claude-stub.log");
    fs::write(&log, "").unwrap();
    fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let script = format!(
        "#!/bin/sh\necho \"uid=$(id -u) home=$HOME argv=$*\" >> {}\ncase \"$*\" in -p*) echo 'Fix The Auth Bug!'; exit 0;; esac\ncase \"$*\" in *broken@m*) echo 'plugin \"broken@m\" not found in marketplace \"m\"' >&2; exit 3;; esac\necho done\n",
        log.display()
    );
    fs::write(dir.join("claude"), script).unwrap();
    fs::set_permissions(dir.join("claude"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (dir, log)
}

#[test]
fn plugins_install_as_the_agent_before_it_starts_and_a_failed_one_is_a_warning_in_the_boot_log() {
    let sb = Sandbox::new("plugins");
    std::os::unix::fs::chown(sb.path("host"), Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    let (stub, log) = stub_claude(&sb);
    // The stub joins the agent's PATH (/usr/local/bin) in cordon's mount namespace only.
    let before = format!("mount -t overlay overlay -o lowerdir={}:/usr/local/bin /usr/local/bin", stub.display());
    let extra = "[claude]\nmarketplaces = [\"owner/market\"]\nplugins = [\"good@m\", \"broken@m\"]\n";
    let cfg =
        config(&sb, &format!("persist = [\"~/.claude\"]\npersist_volume = \"{}\"", sb.path("host").display()), extra);

    let mut c = boot(&sb, &cfg, &before);
    let state = c.wait_phase(Phase::Ready, BOOT);
    let plugins = state.stages.iter().find(|s| s.name == "plugins").unwrap();
    let detail = plugins.detail.as_deref().unwrap();
    assert!(detail.contains("installed good@m") && detail.contains("FAILED broken@m"), "{detail}");
    let boot_log = c.boot_log();
    assert!(
        boot_log.contains("warning: `claude plugin install broken@m` failed (exit status 3)")
            && boot_log.contains("not found in marketplace"),
        "{boot_log}"
    );
    assert!(state.warnings.iter().any(|w| w.contains("broken@m")), "{:?}", state.warnings);
    let home = sb.path("home").display().to_string();
    let calls = fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [
            format!("uid={AGENT_UID} home={home} argv=plugin marketplace add owner/market"),
            format!("uid={AGENT_UID} home={home} argv=plugin install good@m"),
            format!("uid={AGENT_UID} home={home} argv=plugin install broken@m"),
        ],
        "each as the agent, in order"
    );
    let order: Vec<&str> = state.stages.iter().map(|s| s.name.as_str()).collect();
    let at = |n: &str| order.iter().position(|s| *s == n).unwrap();
    assert!(at("readiness") < at("plugins") && at("plugins") < at("session"), "{order:?}");
    stop(c);

    // With ~/.claude kept on the volume, the installed plugin is not installed again; the
    // failed one is tried again.
    fs::write(&log, "").unwrap();
    let mut c = boot(&sb, &cfg, &before);
    let state = c.wait_phase(Phase::Ready, BOOT);
    let calls = fs::read_to_string(&log).unwrap();
    assert!(!calls.contains("install good@m"), "{calls}");
    assert!(calls.contains("install broken@m"), "{calls}");
    let detail = state.stages.iter().find(|s| s.name == "plugins").unwrap().detail.clone().unwrap();
    assert!(detail.contains("1 installed on an earlier boot"), "{detail}");
    stop(c);
}

#[test]
fn the_stop_hook_names_the_tmux_session_once_as_the_agent_and_cordon_keeps_supervising_it() {
    for tool in ["/usr/bin/jq", "/usr/bin/tmux"] {
        assert!(Path::new(tool).exists(), "this test needs {tool} (apt-get install jq tmux), as the image has");
    }
    let sb = Sandbox::new("namer");
    std::os::unix::fs::chown(sb.path("host"), Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    let (stub, log) = stub_claude(&sb);
    let before = format!("mount -t overlay overlay -o lowerdir={}:/usr/local/bin /usr/local/bin", stub.display());
    let transcript = sb.path("host/t.jsonl");
    fs::write(&transcript, "{\"type\":\"user\",\"message\":{\"role\":\"user\",\"content\":\"the login fails\"}}\n")
        .unwrap();
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/claude-name-session.sh");
    // The agent's pane runs the hook as Claude Code would at two Stops, then stays.
    let input = format!("{{\"session_id\":\"s1\",\"transcript_path\":\"{}\"}}", transcript.display());
    let run_hook = format!("echo '{input}' | {}", hook.display());
    let command = format!("{run_hook}; sleep 3; {run_hook}; exec sleep 1000");
    let cfg = TestConfig { on_boot_failure: "hold", tmux: true, agent_command: command, ..TestConfig::default() };
    let text = sb.render_config(&cfg).replacen("tmux = true\n", "tmux = true\nshell_pane = false\n", 1);
    let text = format!("{text}[filesystem]\nwritable = [\"{}\"]\n", sb.path("host").display());
    let cfg = sb.write_file("cordon.toml", &text);

    let mut c = boot(&sb, &cfg, &before);
    c.wait_phase(Phase::Ready, BOOT);
    let socket = sb.path("state/tmux/agent.sock");
    let sessions = || agent_ok(&c, &format!("tmux -S {} list-sessions -F '#S'", socket.display()));
    let named = harness::wait_until("the session renamed", Duration::from_secs(20), || {
        Some(sessions()).filter(|s| s.trim() != "agent")
    });
    assert_eq!(named.trim(), "agent-fix-the-auth-bug", "named after the task, keeping the configured prefix");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.state().unwrap().phase, Phase::Ready, "cordon still finds the agent's session");
    assert_eq!(sessions().trim(), "agent-fix-the-auth-bug", "named once: the second Stop left it");
    let calls = fs::read_to_string(&log).unwrap();
    assert_eq!(calls.matches("argv=-p").count(), 1, "one naming call: {calls}");
    assert!(calls.starts_with(&format!("uid={AGENT_UID} ")), "as the agent: {calls}");
    assert!(calls.contains("the login fails"), "the task from the transcript: {calls}");
    let attach = c.exec(&format!("{} status --config {}", env!("CARGO_BIN_EXE_cordon"), cfg.display()));
    assert!(attach.status.success(), "{}", String::from_utf8_lossy(&attach.stdout));
    stop(c);
}

#[test]
fn the_status_line_shows_model_context_use_and_session_from_claude_codes_json() {
    assert!(Path::new("/usr/bin/jq").exists(), "this test needs jq (apt-get install jq), as the image has");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/claude-statusline.sh");
    let run = |json: &str| {
        let mut child = std::process::Command::new("bash")
            .arg(&script)
            .env_remove("TMUX")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), json.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let line = run(
        r#"{"model":{"display_name":"Opus"},"context_window":{"used_percentage":72.4},"session_id":"abcdef123456"}"#,
    );
    assert_eq!(line, "Opus | \u{1b}[33m[#######---] 72%\u{1b}[0m | abcdef12\n", "yellow above 65%");
    let line = run(r#"{"model":{"display_name":"Sonnet"},"context_window":{"used_percentage":10}}"#);
    assert!(line.starts_with("Sonnet | \u{1b}[32m[#---------] 10%"), "{line:?}");
    assert_eq!(run("{}"), "? | [----------] --% | ?\n", "no data: placeholders, never an error");
    assert_eq!(run("not json"), "? | [----------] --% | ?\n");
}
