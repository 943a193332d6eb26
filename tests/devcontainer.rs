//! The repository's devcontainer.json lifecycle commands, end to end: a JSONC file whose
//! commands write markers into the workspace, on a volume (a bind mount of the sandbox's `host`
//! directory, kept across restarts like a Docker volume), run by the real cordon as PID 1.

mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cordon::state::report::Outcome;
use harness::world::{FakeDns, Greeter, Rec};
use harness::{AGENT_UID, Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};

const BOOT: Duration = Duration::from_secs(60);

/// A workspace at `host/repo` (a git repository, the agent's) holding `devcontainer.json`,
/// with an empty `marks/` for the commands to write in.
fn workspace(sb: &Sandbox, devcontainer_json: &str) -> PathBuf {
    let repo = sb.path("host/repo");
    fs::create_dir_all(repo.join(".devcontainer")).unwrap();
    fs::create_dir_all(repo.join("marks")).unwrap();
    let ok = std::process::Command::new("git").args(["init", "-q"]).arg(&repo).status().unwrap();
    assert!(ok.success());
    fs::write(repo.join(".devcontainer/devcontainer.json"), devcontainer_json).unwrap();
    let ok = std::process::Command::new("chown")
        .args(["-R", &format!("{AGENT_UID}:{AGENT_UID}")])
        .arg(sb.path("host"))
        .status()
        .unwrap();
    assert!(ok.success());
    repo
}

/// The test config with the agent working in the workspace on the volume.
fn config_on_volume(sb: &Sandbox, cfg: &TestConfig) -> PathBuf {
    let d = sb.dir.display();
    let mut text =
        sb.render_config(cfg).replace(&format!("workdir = \"{d}/ws\""), &format!("workdir = \"{d}/host/repo\""));
    text.push_str(&format!("[filesystem]\nwritable = [\"{d}/host\"]\n"));
    sb.write_file("cordon.toml", &text)
}

fn boot(sb: &Sandbox, cfg: &Path) -> Cordon {
    let before = format!("mount --bind {0} {0}", sb.path("host").display());
    sb.launch(cfg, &[], Mode::Pid1, &before)
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn stop(mut c: Cordon) {
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(0));
}

/// Each of `a` and `b` writes its marker, then waits (bounded, 10 s) for the other's: both
/// succeed only if they run at the same time.
const PARALLEL: &str = r#"
    "postStartCommand": {
        // Each waits for the other: they must run side by side.
        "a": "echo start-a; touch marks/a; i=0; while [ ! -e marks/b ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; test -e marks/b && echo boot >> marks/start",
        "b": ["/bin/sh", "-c", "touch marks/b; i=0; while [ ! -e marks/a ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; test -e marks/a",],
        "net": "getent hosts api.example.com > marks/allowed && timeout 5 bash -c 'exec 3<>/dev/tcp/api.example.com/443 && head -n1 <&3' > marks/greeting; if getent hosts denied.example.net; then echo reached > marks/denied; else echo refused > marks/denied; fi; if timeout 3 bash -c 'exec 3<>/dev/tcp/192.0.2.12/443'; then echo reached > marks/direct; else echo refused > marks/direct; fi",
    },"#;

#[test]
fn lifecycle_commands_run_as_the_agent_in_the_repo_behind_the_firewall_and_create_ones_only_once() {
    let sb = Sandbox::new("devc");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![Rec::A("192.0.2.10".parse().unwrap())]);
    dns.set("denied.example.net", vec![Rec::A("192.0.2.11".parse().unwrap())]);
    sb.net.add_world_addr("192.0.2.10");
    let _greeter = Greeter::start(&sb.net.world, "192.0.2.10:443".parse().unwrap());
    // Up and listening, but never the answer to an allowed name.
    sb.net.add_world_addr("192.0.2.12");
    let _unnamed = Greeter::start(&sb.net.world, "192.0.2.12:443".parse().unwrap());
    let json = format!(
        r#"// A devcontainer.json as VS Code writes it: comments and trailing commas.
{{
    "name": "markers", /* ignored, like image and forwardPorts */
    "image": "mcr.microsoft.com/devcontainers/base:ubuntu",
    "forwardPorts": [3000,],
    "containerEnv": {{ "MODE": "from-container-env", }},
    "remoteEnv": {{ "WHERE": "${{containerWorkspaceFolder}}" }},
    "onCreateCommand": "echo $(id -u) $(pwd) $MODE $WHERE >> marks/create",
    "updateContentCommand": ["touch", "marks/no shell; $MODE",],
    "postCreateCommand": ["/bin/sh", "-c", "echo once >> marks/postcreate",],
    {PARALLEL}
}}
"#
    );
    let repo = workspace(&sb, &json);
    let cfg = TestConfig {
        // The agent records what the commands had done when it started.
        agent_command: "cat marks/start > marks/agent-saw; exec sleep 1000".into(),
        // A plain TCP greeter stands for the allowed service: the address layer is what is
        // tested here (the name-checking proxy would want TLS or HTTP).
        network: "name_binding = false".into(),
        ..TestConfig::default()
    };
    let cfg = config_on_volume(&sb, &cfg);

    let mut c = boot(&sb, &cfg);
    let state = c.wait_phase(Phase::Ready, BOOT);
    let marks = repo.join("marks");
    let me = repo.display().to_string();
    assert_eq!(
        read(marks.join("create")),
        format!("{AGENT_UID} {me} from-container-env {me}\n"),
        "as the agent, in the repository, with containerEnv and remoteEnv"
    );
    assert_eq!(read(marks.join("postcreate")), "once\n");
    assert!(marks.join("no shell; $MODE").exists(), "an array is an argv: no shell expands or splits it");
    assert_eq!(read(marks.join("start")), "boot\n", "the object form's commands ran side by side");
    assert!(read(marks.join("allowed")).contains("192.0.2.10"), "an allowlisted name resolves");
    assert_eq!(read(marks.join("greeting")), "hello from 192.0.2.10:443\n", "and is reached");
    assert_eq!(read(marks.join("denied")), "refused\n", "a name off the allowlist is not resolved");
    assert!(dns.queries().iter().all(|q| !q.contains("denied.example.net")), "nor asked upstream");
    assert_eq!(read(marks.join("direct")), "refused\n", "an address no allowed name resolved to is refused");
    let root = c.exec("timeout 3 bash -c 'exec 3<>/dev/tcp/192.0.2.12/443 && head -n1 <&3'");
    assert_eq!(
        String::from_utf8_lossy(&root.stdout),
        "hello from 192.0.2.12:443\n",
        "though it is up (root reaches it)"
    );
    assert!(repo.join(".git/cordon-devcontainer-created").exists());
    assert_eq!(read(marks.join("agent-saw")), "boot\n", "the agent started after postStart");

    let stage = state.stages.iter().find(|s| s.name == "devcontainer").expect("the devcontainer stage");
    assert_eq!(stage.outcome, Outcome::Ok, "{stage:?}");
    let log = c.boot_log();
    assert!(log.contains("devcontainer: postStartCommand.a: start-a"), "output streams, named:\n{log}");
    let ignored = "cordon does not act on forwardPorts, image, name; ignored";
    assert_eq!(log.matches(ignored).count(), 1, "ignored keys listed once:\n{log}");
    let order: Vec<&str> = state.stages.iter().map(|s| s.name.as_str()).collect();
    let at = |n: &str| order.iter().position(|s| *s == n).unwrap();
    assert!(
        at("firewall") < at("devcontainer")
            && at("readiness") < at("devcontainer")
            && at("devcontainer") < at("session")
    );
    stop(c);

    // A second boot on the same workspace: postStart again, the create commands not.
    for m in ["a", "b"] {
        fs::remove_file(marks.join(m)).unwrap();
    }
    let mut c = boot(&sb, &cfg);
    let state = c.wait_phase(Phase::Ready, BOOT);
    assert_eq!(read(marks.join("start")), "boot\nboot\n", "postStart runs on every boot");
    assert_eq!(read(marks.join("postcreate")), "once\n", "postCreate only once per workspace");
    assert_eq!(read(marks.join("create")).lines().count(), 1, "onCreate only once per workspace");
    let stage = state.stages.iter().find(|s| s.name == "devcontainer").unwrap();
    assert!(stage.detail.as_deref().unwrap().contains("ran postStartCommand (the once-per-workspace"), "{stage:?}");
    stop(c);
}

/// Boots on a workspace with `json`, expecting the boot to fail at the devcontainer stage:
/// returns the stage's error and the boot log, having checked that the agent never started.
fn failed_boot(name: &str, json: &str, extra: &str) -> (String, String) {
    let sb = Sandbox::new(name);
    let repo = workspace(&sb, json);
    let cfg = TestConfig {
        agent_command: "touch marks/agent-ran; exec sleep 1000".into(),
        extra: extra.into(),
        // Held, so the state can be read from inside; then a stop exits 1.
        on_boot_failure: "hold",
        ..TestConfig::default()
    };
    let mut c = boot(&sb, &config_on_volume(&sb, &cfg));
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!((stage.name.as_str(), stage.outcome.clone()), ("devcontainer", Outcome::Failed), "{stage:?}");
    assert!(!repo.join("marks/agent-ran").exists(), "the agent must not start");
    assert!(state.agent.is_none_or(|a| a.pid.is_none()));
    let log = c.boot_log();
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1), "a failed boot exits 1");
    (stage.error.clone().unwrap_or_default(), log)
}

#[test]
fn a_failing_post_start_command_fails_the_boot_with_its_name_status_and_output() {
    let (error, log) =
        failed_boot("devc-fail", r#"{ "postStartCommand": "echo about to fail; echo why >&2; exit 3" }"#, "");
    assert!(error.contains("`postStartCommand` failed (exit status 3)"), "{error}");
    assert!(error.contains("about to fail | why"), "the tail of its output: {error}");
    assert!(log.contains("devcontainer: postStartCommand: about to fail"), "{log}");
}

#[test]
fn a_command_past_the_timeout_is_killed_and_fails_the_boot() {
    let (error, _) = failed_boot(
        "devc-timeout",
        r#"{ "postStartCommand": { "slow": "sleep 60 & sleep 60", "quick": "true" } }"#,
        "[devcontainer]\ntimeout = \"2s\"\n",
    );
    assert!(error.contains("`postStartCommand.slow` did not finish within 2s"), "{error}");
}

#[test]
fn a_devcontainer_json_that_does_not_parse_fails_with_file_and_line() {
    let (error, _) = failed_boot("devc-bad", "{\n  \"postStartCommand\": \"true\",\n  \"image\": nope,\n}\n", "");
    assert!(error.contains(".devcontainer/devcontainer.json:3: not valid JSONC"), "{error}");
}
