//! Credentials and the clone, end to end: a private repository on the world's git server (HTTP
//! with basic auth) is cloned as the agent through the firewall with GH_PAT given by the
//! credential helper, and the token is nowhere it must not be.

mod harness;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cordon::state::report::{Outcome, State};
use harness::world::{FakeDns, GitServer, Rec, TcpService, make_repo};
use harness::{AGENT_UID, Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};

const BOOT: Duration = Duration::from_secs(60);
const TOKEN: &str = "ghp_CLONE_SENTINEL_0123456789abcdef";

/// A world with git.example.com serving repo.git (one commit, README "hello from the world").
fn git_world(sb: &Sandbox) -> (FakeDns, GitServer) {
    sb.write_file("domains.conf", "git.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("git.example.com", vec![Rec::A("192.0.2.80".parse().unwrap())]);
    sb.net.add_world_addr("192.0.2.80");
    let srv = sb.path("srv");
    make_repo(&srv, "hello from the world\n");
    let server = GitServer::start(&sb.net.world, "192.0.2.80:80".parse().unwrap(), srv, "x-access-token", TOKEN);
    (dns, server)
}

fn config(sb: &Sandbox, url: &str) -> TestConfig {
    TestConfig {
        required_secrets: vec!["GH_PAT"],
        extra: format!(
            "[repo]\nurl = \"{url}\"\ndest = \"{}\"\ntimeout = \"30s\"\n[git]\ncredential_hosts = [\"http://git.example.com\"]\nuser_name = \"Robot\"\n",
            sb.path("ws/repo").display()
        ),
        ..TestConfig::default()
    }
}

#[test]
fn a_private_repo_clones_with_gh_pat_and_the_token_is_nowhere_it_must_not_be() {
    let sb = Sandbox::new("clone");
    let (_dns, server) = git_world(&sb);
    let mut c = sb.start(&config(&sb, "http://git.example.com/repo.git"), &[("GH_PAT", TOKEN)], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);

    let readme = fs::read_to_string(c.inside(&sb.path("ws/repo/README"))).expect("the clone");
    assert_eq!(readme, "hello from the world\n");
    let repo = fs::metadata(c.inside(&sb.path("ws/repo"))).unwrap();
    assert_eq!(repo.uid(), AGENT_UID, "cloned as the agent");
    assert!(server.requests.lock().unwrap().iter().any(|(_, auth)| auth.is_some()), "the credential helper was used");
    let agent = c.agent();
    assert_eq!(
        fs::read_link(format!("/proc/{agent}/cwd")).unwrap(),
        sb.path("ws/repo"),
        "the clone is the work directory"
    );

    // Where the token must be: one 0600 file of the agent's, and gh's config.
    let token_file = fs::metadata(c.inside(&sb.path("home/.config/cordon/github-token"))).unwrap();
    assert_eq!((token_file.uid(), token_file.mode() & 0o777), (AGENT_UID, 0o600));
    let gh = fs::metadata(c.inside(&sb.path("home/.config/gh/hosts.yml"))).unwrap();
    assert_eq!(gh.mode() & 0o777, 0o600);
    let gitconfig = fs::read_to_string(c.inside(&sb.path("home/.gitconfig"))).unwrap();
    assert!(
        gitconfig.contains("name = \"Robot\"") && gitconfig.contains("git-credential --host http://git.example.com")
    );

    // Where it must not be.
    let dot_git_config = fs::read_to_string(c.inside(&sb.path("ws/repo/.git/config"))).unwrap();
    let environ = String::from_utf8_lossy(&fs::read(format!("/proc/{agent}/environ")).unwrap()).into_owned();
    let argv: String = c
        .processes()
        .iter()
        .map(|p| {
            fs::read(format!("/proc/{}/cmdline", p.pid))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        })
        .collect();
    let state = fs::read_to_string(c.inside(&sb.path("state/state.json"))).unwrap();
    for (place, text) in [
        (".git/config", dot_git_config.as_str()),
        ("gitconfig", gitconfig.as_str()),
        ("the agent's environment", environ.as_str()),
        ("any process's argv", argv.as_str()),
        ("the boot log", c.boot_log().as_str()),
        ("the state file", state.as_str()),
        ("cordon's log", c.stderr().as_str()),
    ] {
        assert!(!text.contains(TOKEN), "the token leaked into {place}");
    }
    assert!(c.boot_log().contains("clone: ok"), "{}", c.boot_log());
    // The agent's git works with the helper too (a fetch needs the token again).
    let fetch = c.agent_exec(&format!(
        "cd {} && HOME={} git fetch -q origin 2>&1 && echo fetched",
        sb.path("ws/repo").display(),
        sb.path("home").display()
    ));
    assert!(String::from_utf8_lossy(&fetch.stdout).contains("fetched"), "{}", String::from_utf8_lossy(&fetch.stdout));
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

/// A config whose repo.dest is on a volume (a bind mount of the sandbox's `host` directory,
/// kept across restarts like a Docker volume), listed in filesystem.writable.
fn volume_config(sb: &Sandbox, url: &str) -> TestConfig {
    let mut cfg = config(sb, url);
    cfg.extra =
        cfg.extra.replace(&sb.path("ws/repo").display().to_string(), &sb.path("host/repo").display().to_string());
    cfg.extra.push_str(&format!("[filesystem]\nwritable = [\"{}\"]\n", sb.path("host").display()));
    cfg.on_boot_failure = "hold";
    cfg
}

fn boot_on_volume(sb: &Sandbox, cfg: &TestConfig) -> Cordon {
    let host = sb.path("host");
    std::os::unix::fs::chown(&host, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    let before = format!("mount --bind {0} {0}", host.display());
    sb.launch(&sb.write_config(cfg), &[("GH_PAT", TOKEN)], Mode::Pid1, &before)
}

#[test]
fn a_restart_on_a_workspace_volume_keeps_uncommitted_work_and_only_fetches() {
    let sb = Sandbox::new("clone-volume");
    let (_dns, _server) = git_world(&sb);
    let cfg = volume_config(&sb, "http://git.example.com/repo.git");
    let repo = sb.path("host/repo");
    let mut c = boot_on_volume(&sb, &cfg);
    c.wait_phase(Phase::Ready, BOOT);
    let out = c.agent_exec(&format!("cd {} && echo draft > untracked.txt && echo edited >> README", repo.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(0));

    // Upstream moves on while the container is down.
    let src = sb.path("srv/src");
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git").current_dir(&src).args(args).status().unwrap().success();
        assert!(ok, "git {args:?}");
    };
    fs::write(src.join("NEWS"), "second\n").unwrap();
    git(&["add", "NEWS"]);
    git(&["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "second"]);
    git(&["push", "-q", &sb.path("srv/repo.git").display().to_string(), "main"]);
    let ok = std::process::Command::new("git")
        .current_dir(sb.path("srv/repo.git"))
        .args(["update-server-info"])
        .status()
        .unwrap();
    assert!(ok.success());
    let head = std::process::Command::new("git").current_dir(&src).args(["rev-parse", "HEAD"]).output().unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();

    let mut c = boot_on_volume(&sb, &cfg);
    let state = c.wait_phase(Phase::Ready, BOOT);
    let clone = state.stages.iter().find(|s| s.name == "clone").unwrap();
    assert!(clone.detail.as_deref().unwrap_or("").contains("kept as it is and fetched"), "{clone:?}");
    assert_eq!(fs::read_to_string(repo.join("untracked.txt")).unwrap(), "draft\n", "untracked work kept");
    assert_eq!(
        fs::read_to_string(repo.join("README")).unwrap(),
        "hello from the world\nedited\n",
        "uncommitted edit kept"
    );
    assert!(!repo.join("NEWS").exists(), "fetched, not merged or reset");
    let fetched = std::process::Command::new("git")
        .current_dir(&repo)
        .args(["-c", "safe.directory=*", "rev-parse", "origin/main"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fetched.stdout).trim(), head, "origin/main is the new upstream commit");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(0));

    // Another remote for the same workspace is refused, and the work is left alone.
    let mut c = boot_on_volume(&sb, &volume_config(&sb, "http://git.example.com/other.git"));
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!(stage.name, "clone");
    let error = stage.error.as_deref().unwrap();
    assert!(
        error.contains("already holds a clone of http://git.example.com/repo.git") && error.contains("other.git"),
        "{error}"
    );
    assert!(stage.hint.as_deref().unwrap().contains("repo.dest"));
    assert!(repo.join("untracked.txt").exists());
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn a_wrong_token_fails_the_clone_stage_with_a_clear_error() {
    let sb = Sandbox::new("clone-badtoken");
    let (_dns, _server) = git_world(&sb);
    let cfg = TestConfig {
        on_boot_failure: "hold",
        agent_command: "touch started; exec sleep 1000".into(),
        ..config(&sb, "http://git.example.com/repo.git")
    };
    let mut c = sb.start(&cfg, &[("GH_PAT", "ghp_wrong_token")], Mode::Pid1);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!(stage.name, "clone");
    let error = stage.error.as_deref().unwrap();
    assert!(
        error.contains("git clone failed") && (error.contains("Authentication failed") || error.contains("401")),
        "{error}"
    );
    assert!(stage.hint.as_deref().unwrap().contains("GH_PAT"));
    assert!(!error.contains("ghp_wrong_token"));
    assert!(!c.inside(&sb.path("ws/started")).exists(), "the agent ran after a failed clone");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

#[test]
fn a_repo_url_carrying_credentials_or_an_option_is_refused_at_config() {
    let sb = Sandbox::new("clone-badurl");
    for (url, expect) in [
        ("http://ghp_secret@git.example.com/repo.git", "carries credentials"),
        ("--upload-pack=touch /tmp/x", "read as an option"),
    ] {
        let cfg = TestConfig { on_boot_failure: "hold", ..TestConfig::default() };
        let mut c = sb.start(&cfg, &[("REPO_URL", url)], Mode::Pid1);
        let state = c.wait_phase(Phase::Failed, BOOT);
        let stage = state.stages.iter().find(|s| s.name == "config").unwrap();
        assert!(stage.error.as_deref().unwrap().contains(expect), "{url}: {stage:?}");
        assert!(!serde_json::to_string(&state).unwrap().contains("ghp_secret"), "the URL's credential was echoed");
        c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
        c.wait_exit(BOOT);
    }
}

/// A world where git.example.com accepts TCP connections and never answers (nor closes them).
fn silent_world(sb: &Sandbox) -> (FakeDns, TcpService) {
    sb.write_file("domains.conf", "git.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("git.example.com", vec![Rec::A("192.0.2.80".parse().unwrap())]);
    sb.net.add_world_addr("192.0.2.80");
    let held = Arc::new(Mutex::new(Vec::new()));
    let server = TcpService::start(&sb.net.world, "192.0.2.80:80".parse().unwrap(), move |conn| {
        held.lock().unwrap().push(conn);
    });
    (dns, server)
}

fn with_timeout(cfg: TestConfig, timeout: &str) -> TestConfig {
    TestConfig { extra: cfg.extra.replace("timeout = \"30s\"", &format!("timeout = \"{timeout}\"")), ..cfg }
}

/// git (and its remote helper) among cordon's processes.
fn git_processes(c: &Cordon) -> Vec<String> {
    c.processes()
        .iter()
        .filter_map(|p| fs::read(format!("/proc/{}/cmdline", p.pid)).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .filter(|cmd| {
            let program = cmd.split(' ').next().unwrap_or("");
            program.rsplit('/').next().unwrap_or("").starts_with("git")
        })
        .collect()
}

/// The state directory, held open: it is a tmpfs in cordon's mount namespace, which goes away
/// with cordon, and an open directory keeps it readable after that.
fn hold_state_dir(c: &Cordon, sb: &Sandbox) -> fs::File {
    fs::File::open(c.inside(&sb.path("state"))).expect("the state directory")
}

fn final_state(dir: &fs::File) -> State {
    use std::os::fd::AsRawFd;
    let text = fs::read(format!("/proc/self/fd/{}/state.json", dir.as_raw_fd())).expect("the final state file");
    serde_json::from_slice(&text).expect("state.json")
}

#[test]
fn a_clone_from_a_server_that_never_answers_fails_at_the_timeout_and_leaves_no_git() {
    let sb = Sandbox::new("clone-silent");
    let (_dns, _server) = silent_world(&sb);
    let cfg =
        TestConfig { on_boot_failure: "hold", ..with_timeout(config(&sb, "http://git.example.com/repo.git"), "3s") };
    let mut c = sb.start(&cfg, &[("GH_PAT", TOKEN)], Mode::Pid1);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!(stage.name, "clone");
    let error = stage.error.as_deref().unwrap();
    assert!(error.contains("the clone did not finish within 3s"), "{error}");
    // The deadline is the timeout: not the server hanging up (it never does).
    let took = Duration::from_secs_f64(stage.duration_ms.unwrap() / 1000.0);
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(5), "the clone stage took {took:?}");
    assert_eq!(git_processes(&c), Vec::<String>::new(), "git or its remote helper outlived the timeout");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

#[test]
fn a_sigterm_in_the_middle_of_a_slow_clone_stops_cordon_within_the_grace() {
    let sb = Sandbox::new("clone-term");
    let (_dns, _server) = silent_world(&sb);
    // stop_grace is 3 s; the clone would wait 60 s.
    let cfg = with_timeout(config(&sb, "http://git.example.com/repo.git"), "60s");
    let mut c = sb.start(&cfg, &[("GH_PAT", TOKEN)], Mode::Pid1);
    harness::wait_until("git running in the clone stage", BOOT, || {
        let cloning = c.state().is_some_and(|s| s.stages.last().is_some_and(|st| st.name == "clone"));
        (cloning && git_processes(&c).iter().any(|g| g.contains("remote-http"))).then_some(())
    });
    let state_dir = hold_state_dir(&c, &sb);
    let t0 = Instant::now();
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    let status = c.wait_exit(BOOT);
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "a stop during the boot is a graceful stop; stderr:\n{}", c.stderr());
    eprintln!("cordon stopped {took:?} after the SIGTERM");
    assert!(took < Duration::from_secs(3), "cordon took {took:?} to stop (stop_grace is 3s)");

    let state = final_state(&state_dir);
    assert_eq!(state.phase, Phase::Stopped, "{state:?}");
    assert_eq!(state.reason.as_deref(), Some("stopped during clone"), "{state:?}");
    let clone = state.stages.last().unwrap();
    assert_eq!((clone.name.as_str(), &clone.outcome), ("clone", &Outcome::Stopped), "{clone:?}");
    assert!(state.stages.iter().all(|s| s.name != "session"), "the agent was started: {state:?}");
    let log =
        fs::read_to_string(format!("/proc/self/fd/{}/boot.log", std::os::fd::AsRawFd::as_raw_fd(&state_dir))).unwrap();
    assert!(log.contains("clone: STOPPED") && log.contains("boot stopped during stage clone"), "{log}");
    // The clone's processes were killed by cordon itself, not left to the final sweep.
    let stderr = c.stderr();
    assert!(!stderr.contains("ignored SIGTERM") && !stderr.contains("left behind"), "{stderr}");
}
