//! Credentials and the clone, end to end: a private repository on the world's git server (HTTP
//! with basic auth) is cloned as the agent through the firewall with GH_PAT given by the
//! credential helper, and the token is nowhere it must not be.

mod harness;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use harness::world::{FakeDns, GitServer, Rec, make_repo};
use harness::{AGENT_UID, Mode, Phase, Sandbox, TestConfig, WORLD_V4};

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
